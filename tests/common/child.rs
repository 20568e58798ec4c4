//! The worker as a child process (`mqtt-connector worker`), the one wrapper shared by the tests
//! and the benchmark (which includes this file and [`super::http`] with `#[path]`).
//!
//! The worker is configured the way an operator does it, through `MQTT_CONNECTOR_*` variables;
//! its stdout and stderr go to files in a temporary folder, so a failing test can print them.
//! It is SIGKILLed and reaped when dropped, also on a panic.
//!
//! ```ignore
//! let mut worker = ChildWorker::command(&amqp_url(), &queue, connectors.path())
//!     .env("MQTT_CONNECTOR_PREFETCH", "200")
//!     .start()            // spawns, then waits until /readyz answers 200
//!     .await;
//! let status = worker.stop().await; // SIGTERM, then waits for it to exit
//! ```

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The binary under test, built by cargo for tests and benchmarks alike.
pub const BIN: &str = env!("CARGO_BIN_EXE_mqtt-connector");

/// How long [`WorkerCommand::start`] waits for `/readyz` and [`ChildWorker::stop`] for the exit.
const PATIENCE: Duration = Duration::from_secs(30);

/// A worker process about to be started: `mqtt-connector [GLOBAL ARGS] worker [ARGS]` with the
/// `MQTT_CONNECTOR_*` environment for one queue and connectors folder.
pub struct WorkerCommand {
    command: Command,
    global_args: Vec<String>,
    args: Vec<String>,
    metrics_addr: SocketAddr,
    stderr_unread: bool,
}

impl WorkerCommand {
    /// Sets one more environment variable (overrides the defaults).
    pub fn env(mut self, key: &str, value: impl AsRef<std::ffi::OsStr>) -> Self {
        self.command.env(key, value);
        self
    }

    /// [`env`](Self::env) for each pair.
    pub fn envs(mut self, pairs: &[(&str, &str)]) -> Self {
        for (key, value) in pairs {
            self.command.env(key, value);
        }
        self
    }

    /// Options before `worker`, e.g. `--log-format json`.
    pub fn global_args(mut self, args: &[&str]) -> Self {
        self.global_args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Options after `worker`.
    pub fn args(mut self, args: &[&str]) -> Self {
        self.args.extend(args.iter().map(|a| a.to_string()));
        self
    }

    /// Serves `/metrics`, `/healthz` and `/readyz` on `addr` instead of a free port.
    pub fn metrics_addr(mut self, addr: SocketAddr) -> Self {
        self.metrics_addr = addr;
        self.command
            .env("MQTT_CONNECTOR_METRICS_ADDR", addr.to_string());
        self
    }

    /// Its stderr a pipe that nobody reads until [`ChildWorker::take_stderr`] (a log collector
    /// that stalled); [`ChildWorker::stderr`] is then empty.
    pub fn stderr_unread(mut self) -> Self {
        self.stderr_unread = true;
        self
    }

    /// Starts the process and returns at once.
    pub fn spawn(mut self) -> ChildWorker {
        let dir = tempfile::Builder::new()
            .prefix("child-worker-")
            .tempdir()
            .expect("create a temporary directory for the worker's output");
        let stdout = std::fs::File::create(dir.path().join("stdout")).expect("create stdout");
        let stderr: Stdio = if self.stderr_unread {
            Stdio::piped()
        } else {
            std::fs::File::create(dir.path().join("stderr"))
                .expect("create stderr")
                .into()
        };
        let child = self
            .command
            .args(&self.global_args)
            .arg("worker")
            .args(&self.args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {BIN} worker: {e}"));
        ChildWorker {
            child,
            metrics_addr: self.metrics_addr,
            dir,
            _connectors: None,
        }
    }

    /// [`spawn`](Self::spawn), then waits until `/readyz` answers 200 (panics with the
    /// worker's output if it exits or is not ready within 30 s).
    pub async fn start(self) -> ChildWorker {
        let mut worker = self.spawn();
        worker.wait_ready(PATIENCE).await;
        worker
    }
}

/// A running `mqtt-connector worker` process; SIGKILLed and reaped on drop.
pub struct ChildWorker {
    child: Child,
    /// Where it serves `/metrics`, `/healthz` and `/readyz`.
    pub metrics_addr: SocketAddr,
    dir: tempfile::TempDir,
    /// An empty connectors folder of its own (see [`ChildWorker::spawn_with_env`]).
    _connectors: Option<tempfile::TempDir>,
}

impl ChildWorker {
    /// A worker consuming `queue` of the RabbitMQ at `amqp_url` with the connectors of
    /// `connectors`, `/metrics` on a free port of 127.0.0.1, `RUST_LOG` and
    /// `MQTT_CONNECTOR_LOG_FORMAT` cleared (its own defaults: info, text).
    pub fn command(amqp_url: &str, queue: &str, connectors: &Path) -> WorkerCommand {
        let metrics_addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut command = Command::new(BIN);
        command
            .env_remove("RUST_LOG")
            .env_remove("MQTT_CONNECTOR_LOG_FORMAT")
            .env("MQTT_CONNECTOR_AMQP_URL", amqp_url)
            .env("MQTT_CONNECTOR_QUEUE", queue)
            .env("MQTT_CONNECTOR_CONNECTORS", connectors)
            .env("MQTT_CONNECTOR_METRICS_ADDR", metrics_addr.to_string());
        WorkerCommand {
            command,
            global_args: Vec::new(),
            args: Vec::new(),
            metrics_addr,
            stderr_unread: false,
        }
    }

    /// A worker configured by `env` alone (`MQTT_CONNECTOR_AMQP_URL`, `MQTT_CONNECTOR_QUEUE`,
    /// …), as in a container, with `RUST_LOG=info` and an empty connectors folder; returns at
    /// once (see [`wait_ready`](Self::wait_ready)).
    pub fn spawn_with_env(env: &[(&str, &str)]) -> ChildWorker {
        let connectors = tempfile::Builder::new()
            .prefix("connectors-")
            .tempdir()
            .expect("create a connectors folder");
        let mut worker = ChildWorker::command("", "", connectors.path())
            .env("RUST_LOG", "info")
            .envs(env)
            .spawn();
        worker._connectors = Some(connectors);
        worker
    }

    /// The read end of its stderr pipe (see [`WorkerCommand::stderr_unread`]).
    pub fn take_stderr(&mut self) -> Option<std::process::ChildStderr> {
        self.child.stderr.take()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What it wrote to stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }

    /// What it wrote to stderr so far (its logs).
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    /// Everything it wrote: stderr, then stdout.
    pub fn output(&self) -> String {
        format!("{}{}", self.stderr(), self.stdout())
    }

    /// The file its logs go to.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("stderr")
    }

    /// The last `lines` lines of [`output`](Self::output), for failure messages.
    pub fn tail(&self, lines: usize) -> String {
        let output = self.output();
        let all: Vec<&str> = output.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Its exit status if it has exited (reaping it), else `None`.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .try_wait()
            .expect("try_wait on the worker process")
    }

    /// Panics with its last output if it has exited.
    pub fn check_running(&mut self) {
        if let Some(status) = self.try_wait() {
            panic!(
                "the worker exited early with {status}; its output:\n{}",
                self.tail(60)
            );
        }
    }

    /// Sends `signal` (`"TERM"`, `"KILL"`, `"STOP"`…) with kill(1).
    pub fn signal(&self, signal: &str) {
        let pid = self.pid();
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} {pid} failed");
    }

    /// SIGKILL, as a crash would, and reap it (its output stays readable).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Waits until `/readyz` answers 200; panics with its output if it exits first or after
    /// `within`.
    pub async fn wait_ready(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Ok((200, _)) = super::http::get(self.metrics_addr, "/readyz").await {
                return;
            }
            self.check_running();
            assert!(
                Instant::now() < deadline,
                "worker not ready within {within:?}; its output:\n{}",
                self.tail(60)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits (`within` at most, else panics with its output) for it to exit; its status.
    pub async fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.try_wait() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "worker did not exit within {within:?}; its output:\n{}",
                self.tail(60)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then waits (30 s at most) for it to exit; returns its exit status. Its output
    /// stays readable.
    pub async fn terminate(&mut self) -> ExitStatus {
        self.signal("TERM");
        self.wait_exit(PATIENCE).await
    }

    /// [`terminate`](Self::terminate), for a worker the caller is done with.
    pub async fn stop(mut self) -> ExitStatus {
        self.terminate().await
    }

    /// [`stop`](Self::stop), also returning everything it wrote.
    pub async fn stop_with_output(mut self) -> (ExitStatus, String) {
        let status = self.terminate().await;
        (status, self.output())
    }

    /// Open file descriptors (`/proc/PID/fd`).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("read /proc/PID/fd")
            .count()
    }

    /// Resident set size in KiB (`VmRSS` of `/proc/PID/status`).
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .expect("read /proc/PID/status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        let (status, body) = super::http::get(self.metrics_addr, "/metrics")
            .await
            .expect("GET /metrics");
        assert_eq!(status, 200, "GET /metrics: {body}");
        body
    }
}

impl Drop for ChildWorker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP port of 127.0.0.1 that was free a moment ago (this file stands alone in the benchmark,
/// so it does not use the harness' own).
fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local_addr of a bound socket")
        .port()
}
