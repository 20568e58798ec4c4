//! A peer: any other worker of the same contract (`--peer "node /path/to/worker.js"`), run as a
//! child process through the same closed loops (QoS 1, 0, 2) and open loop as the worker, on a
//! queue and with a connector of its own, so its rows sit in the same table.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::loadgen::{Load, QOS1, answers_one_job, drive};
use crate::mosquitto::Mosquitto;
use crate::procfs::{ChildGuard, tail};
use crate::scenarios::{Bench, bench_connectors};
use crate::{Config, free_port};

/// Starts `command` (split on whitespace) with `worker --amqp-url … --queue … --connectors …
/// --metrics-addr … --prefetch …` appended, its output in `dir`.
fn spawn_peer(
    config: &Config,
    command: &str,
    queue: &str,
    connectors: &std::path::Path,
    dir: &std::path::Path,
) -> ChildGuard {
    let mut words = command.split_whitespace();
    let program = words.next().expect("--peer needs a command");
    let log = std::fs::File::create(dir.join("peer.log")).expect("create the peer's log");
    let child = Command::new(program)
        .args(words)
        .arg("worker")
        .args(["--amqp-url", &config.amqp_url, "--queue", queue])
        .arg("--connectors")
        .arg(connectors)
        .args(["--metrics-addr", &format!("127.0.0.1:{}", free_port())])
        .args(["--prefetch", &config.prefetch.to_string()])
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("clone the peer's log handle"))
        .stderr(log)
        .spawn()
        .unwrap_or_else(|e| panic!("spawn the peer {command:?}: {e}"));
    ChildGuard { child }
}

impl Bench {
    /// The peer's rows: closed loop at QoS 1, 0 and 2, open loop at `--rate`.
    pub async fn peer(&mut self, command: &str, mosquitto: &Mosquitto, warmup: usize) {
        let config = self.config.clone();
        let queue = format!("bench-peer-{}", self.run_id);
        self.loadgen.declare_queue(&queue).await;
        let dir = tempfile::Builder::new()
            .prefix("bench-peer-")
            .tempdir()
            .expect("create a temporary directory for the peer");
        let connectors = bench_connectors(dir.path(), mosquitto, "bench-peer");
        let mut peer = spawn_peer(&config, command, &queue, &connectors, dir.path());
        let pid = peer.pid();
        let answered = answers_one_job(&self.loadgen, &queue, &self.run_id).await;
        let running = |peer: &mut ChildGuard| {
            if let Ok(Some(status)) = peer.child.try_wait() {
                panic!(
                    "the peer exited with {status}; its log:\n{}",
                    tail(&dir.path().join("peer.log"), 4_000)
                );
            }
        };
        running(&mut peer);
        assert!(
            answered,
            "the peer did not answer its first job; its log:\n{}",
            tail(&dir.path().join("peer.log"), 4_000)
        );
        println!("peer pid {pid} answered its first job");
        let closed = Load::Closed(config.outstanding);
        // A longer warm-up than the worker's: a JIT-compiled peer (Node.js) is still compiling
        // its hot path after a few hundred jobs, and its first row would pay for it.
        drive(
            &self.loadgen,
            &queue,
            warmup.max(config.jobs),
            closed,
            QOS1,
            &self.run_id,
            config.stall,
            None,
        )
        .await;
        self.closed_loops("peer", &queue, pid, || running(&mut peer))
            .await;
        let n = ((config.rate * config.open_seconds).round() as usize).max(1);
        let (row, _) = self
            .scenario(
                &format!("peer open loop {:.0}/s, QoS 1", config.rate),
                &queue,
                pid,
                n,
                Load::Open(config.rate),
                QOS1,
                false,
            )
            .await;
        self.rows.push(row);
        running(&mut peer);
        // SIGTERM first, so that a profiler wrapping the peer (valgrind, perf) writes its output.
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline && matches!(peer.child.try_wait(), Ok(None)) {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(peer);
        self.loadgen.delete_queue(&queue).await;
    }
}
