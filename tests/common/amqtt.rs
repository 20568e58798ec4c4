//! An amqtt broker (Python, PyPI `amqtt==0.12.1`) owned by one test, for MQTT over websockets:
//! Mosquitto 2.0.11 on this machine is built without websockets, amqtt serves them.
//!
//! One process, three listeners on 127.0.0.1, each on its own free port: plain MQTT over TCP
//! (for the test's [`Subscriber`](super::Subscriber)), `ws` and — with certificates — `wss`
//! (the harness server certificate for `localhost`/`127.0.0.1`; client certificates optional,
//! but one that is presented must be signed by the harness CA). amqtt accepts a websocket
//! upgrade on any path and answers with the `mqtt` subprotocol. Anonymous clients are allowed.
//!
//! It runs as `python3 -m amqtt.scripts.broker_script -c amqtt.yaml` (no dependence on where
//! pip put the `amqtt` entry point). Without the package the constructor panics with the
//! command that installs it: these tests fail rather than skip. [`Amqtt::start`] returns once
//! every port accepts TCP connections (30 s deadline); if the process exits first (a port taken
//! between [`free_port`] and the bind) it is started again on other ports, up to 5 times. The
//! broker is killed when the value is dropped.

use super::certs::Certs;
use super::free_port;
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const INSTALL: &str = "pip install amqtt==0.12.1 (python3 -m pip install amqtt==0.12.1)";
const START_DEADLINE: Duration = Duration::from_secs(30);

/// A running amqtt broker; see the module docs.
pub struct Amqtt {
    dir: tempfile::TempDir,
    tcp_port: u16,
    ws_port: u16,
    wss_port: Option<u16>,
    child: Option<Child>,
}

impl Amqtt {
    /// A broker with a TCP and a `ws` listener, and a `wss` one serving `certs`' server
    /// certificate when `certs` is given.
    pub fn start(certs: Option<&Certs>) -> Amqtt {
        require_amqtt();
        let mut last_log = String::new();
        for _ in 0..5 {
            let mut broker = Amqtt {
                dir: tempfile::Builder::new()
                    .prefix("amqtt-")
                    .tempdir()
                    .expect("create amqtt dir"),
                tcp_port: free_port(),
                ws_port: free_port(),
                wss_port: certs.map(|_| free_port()),
                child: None,
            };
            broker.write_config(certs);
            match broker.spawn_and_wait() {
                Ok(()) => return broker,
                Err(log) => last_log = log,
            }
        }
        panic!("amqtt did not start after 5 attempts; last log:\n{last_log}");
    }

    /// The plain MQTT port (127.0.0.1), for a subscriber.
    pub fn tcp_port(&self) -> u16 {
        self.tcp_port
    }

    /// The websocket port (127.0.0.1).
    pub fn ws_port(&self) -> u16 {
        self.ws_port
    }

    /// The websocket-over-TLS port (127.0.0.1); panics for a broker started without certs.
    pub fn wss_port(&self) -> u16 {
        self.wss_port
            .expect("this amqtt was started without certificates: no wss listener")
    }

    /// amqtt's output (it logs to stderr).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("amqtt.log")).unwrap_or_default()
    }

    /// The last lines of [`log`](Self::log), for assertion messages.
    pub fn log_tail(&self) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    fn write_config(&self, certs: Option<&Certs>) {
        let mut yaml = format!(
            "listeners:\n\
             \x20 default:\n    type: tcp\n    bind: 127.0.0.1:{tcp}\n\
             \x20 ws:\n    type: ws\n    bind: 127.0.0.1:{ws}\n",
            tcp = self.tcp_port,
            ws = self.ws_port
        );
        if let (Some(certs), Some(port)) = (certs, self.wss_port) {
            yaml.push_str(&format!(
                "  wss:\n    type: ws\n    bind: 127.0.0.1:{port}\n    ssl: true\n    \
                 certfile: {crt:?}\n    keyfile: {key:?}\n    cafile: {ca:?}\n",
                crt = certs.server_crt.display().to_string(),
                key = certs.server_key.display().to_string(),
                ca = certs.ca_crt.display().to_string(),
            ));
        }
        yaml.push_str(
            "plugins:\n  amqtt.plugins.authentication.AnonymousAuthPlugin:\n    \
             allow_anonymous: true\n",
        );
        std::fs::write(self.dir.path().join("amqtt.yaml"), yaml).expect("write amqtt.yaml");
    }

    fn ports(&self) -> Vec<u16> {
        [Some(self.tcp_port), Some(self.ws_port), self.wss_port]
            .into_iter()
            .flatten()
            .collect()
    }

    /// Starts the process and waits for every port; on failure returns the log.
    fn spawn_and_wait(&mut self) -> Result<(), String> {
        let log = std::fs::File::create(self.dir.path().join("amqtt.log")).expect("amqtt.log");
        let child = Command::new("python3")
            .args(["-m", "amqtt.scripts.broker_script", "-c"])
            .arg(self.dir.path().join("amqtt.yaml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone fd"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn python3 for amqtt: {e}; {INSTALL}"));
        self.child = Some(child);
        let deadline = Instant::now() + START_DEADLINE;
        let mut waiting = self.ports();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!("amqtt exited with {status}\n{}", self.log()));
            }
            waiting.retain(|port| {
                let addr: SocketAddr = ([127, 0, 0, 1], *port).into();
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err()
            });
            if waiting.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                self.kill();
                return Err(format!(
                    "amqtt did not listen on 127.0.0.1 ports {waiting:?} within {START_DEADLINE:?}\n{}",
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the broker and reaps it. Idempotent.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Amqtt {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Panics, naming the install command, unless `python3` can import amqtt 0.12.x.
fn require_amqtt() {
    static FOUND: OnceLock<Result<(), String>> = OnceLock::new();
    let found = FOUND.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import amqtt; print(amqtt.__version__)"])
            .output()
            .map_err(|e| format!("python3 cannot be run: {e}"))?;
        let version = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if !out.status.success() {
            return Err(format!(
                "python3 cannot import amqtt: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        if !version.starts_with("0.12.") {
            return Err(format!(
                "amqtt {version} is installed, these tests need 0.12.1"
            ));
        }
        Ok(())
    });
    if let Err(why) = found {
        panic!(
            "the websocket tests need the amqtt MQTT broker (Mosquitto here has no websockets): \
             {why}. Install it: {INSTALL}"
        );
    }
}
