//! Helpers shared by `faults_mqtt.rs` and `fleet.rs` (on top of `tests/common`): bursts of jobs
//! sent with pipelined publisher confirms, replies gathered by correlation id, a Mosquitto tuned
//! for bursts, and a worker run as a child process (for its open fds, RSS and logs).
#![allow(dead_code)]

use crate::common::amqp::{Amqp, Reply, ReplyStream};
use crate::common::{Mosquitto, free_port};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::{Instant, timeout_at};

/// Appends `lines` to a (running) Mosquitto's config and restarts it on the same port, so later
/// lines override the harness defaults (e.g. `persistence true`).
pub fn reconfigure(broker: &mut Mosquitto, lines: &str) {
    let conf = broker.dir().join("mosquitto.conf");
    let mut text = std::fs::read_to_string(&conf).expect("read mosquitto.conf");
    text.push('\n');
    text.push_str(&lines.replace("{DIR}", broker.dir().to_str().expect("utf-8 dir")));
    text.push('\n');
    std::fs::write(&conf, text).expect("write mosquitto.conf");
    broker.restart();
}

/// No limit on QoS 1/2 messages in flight to, or queued for, one subscriber: a burst of
/// thousands is written to the subscriber's socket as it comes instead of being queued in the
/// broker (20 in flight and 1,000 queued by default, beyond which Mosquitto drops messages).
pub const UNLIMITED_QUEUES: &str = "max_inflight_messages 0\nmax_queued_messages 0\n";

/// A RabbitMQ connection, a fresh request queue (`jobs-…`) declared durable, and a reply queue
/// being consumed: `(amqp, queue, reply_queue, replies)`.
pub async fn job_and_reply_queues() -> (Amqp, String, String, ReplyStream) {
    let amqp = Amqp::connect().await;
    let queue = crate::common::unique_name("jobs");
    amqp.declare_job_queue(&queue).await;
    let (reply_queue, replies) = amqp.reply_queue().await;
    (amqp, queue, reply_queue, replies)
}

/// Publishes every `(correlation_id, body)` to `queue` with `reply_to`, all at once, then awaits
/// every publisher confirm (30 s at most). Panics on a nack or a return.
pub async fn send_burst(amqp: &Amqp, queue: &str, reply_to: &str, jobs: &[(String, Vec<u8>)]) {
    let mut confirms = Vec::with_capacity(jobs.len());
    for (correlation_id, body) in jobs {
        let properties = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2)
            .with_reply_to(reply_to.into())
            .with_correlation_id(correlation_id.as_str().into());
        let confirm = amqp
            .channel
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
            .unwrap_or_else(|e| panic!("publish to {queue}: {e}"));
        confirms.push(confirm);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    for confirm in confirms {
        let confirmation = timeout_at(deadline, confirm)
            .await
            .expect("publisher confirms within 30 s")
            .expect("publisher confirm");
        assert!(
            matches!(confirmation, lapin::Confirmation::Ack(None)),
            "job not accepted by RabbitMQ: {confirmation:?}"
        );
    }
}

/// Replies gathered by correlation id.
#[derive(Default)]
pub struct Replies {
    pub by_id: HashMap<String, Vec<Reply>>,
}

impl Replies {
    /// Reads replies until every id in `expected` has at least one, then for `quiet` more (to
    /// catch a second reply to the same job). Panics after `within` saying how many are missing.
    pub async fn gather(
        stream: &mut ReplyStream,
        expected: usize,
        within: Duration,
        quiet: Duration,
    ) -> Replies {
        let mut replies = Replies::default();
        let deadline = Instant::now() + within;
        while replies.by_id.len() < expected {
            match timeout_at(deadline, stream.try_reply(within)).await {
                Ok(Some(reply)) => replies.add(reply),
                _ => panic!(
                    "only {} of {expected} jobs answered within {within:?} ({} replies); codes so far: {:?}",
                    replies.by_id.len(),
                    replies.total(),
                    replies.codes()
                ),
            }
        }
        while let Some(reply) = stream.try_reply(quiet).await {
            replies.add(reply);
        }
        replies
    }

    fn add(&mut self, reply: Reply) {
        let id = reply
            .correlation_id
            .clone()
            .unwrap_or_else(|| panic!("reply without correlation id: {}", reply.body));
        self.by_id.entry(id).or_default().push(reply);
    }

    pub fn total(&self) -> usize {
        self.by_id.values().map(Vec::len).sum()
    }

    /// Jobs answered more than once.
    pub fn answered_twice(&self) -> Vec<&String> {
        self.by_id
            .iter()
            .filter(|(_, r)| r.len() > 1)
            .map(|(id, _)| id)
            .collect()
    }

    /// How many replies per exit-code.
    pub fn codes(&self) -> std::collections::BTreeMap<i64, usize> {
        let mut codes = std::collections::BTreeMap::new();
        for reply in self.by_id.values().flatten() {
            *codes.entry(reply.exit_code()).or_default() += 1;
        }
        codes
    }

    /// The first reply of each job.
    pub fn first(&self, id: &str) -> &Reply {
        &self.by_id[id][0]
    }

    /// A few examples of replies with `code`, for a failure message.
    pub fn examples(&self, code: i64, n: usize) -> Vec<String> {
        self.by_id
            .values()
            .flatten()
            .filter(|r| r.exit_code() == code)
            .take(n)
            .map(|r| r.body.to_string())
            .collect()
    }
}

/// A worker run as a child process of the test (`mqtt-connector worker`), its stdout and stderr
/// in one log file. Killed on drop.
pub struct ChildWorker {
    child: Child,
    pub metrics_addr: SocketAddr,
    pub log: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChildWorker {
    /// Starts a worker on `queue` with `connectors` and `/metrics` on a free port, plus `env`
    /// (e.g. `MQTT_CONNECTOR_PREFETCH`, `RUST_LOG`); returns once `/readyz` answers 200.
    pub async fn start(queue: &str, connectors: &Path, env: &[(&str, &str)]) -> ChildWorker {
        let dir = tempfile::Builder::new()
            .prefix("worker-")
            .tempdir()
            .expect("tempdir");
        let log = dir.path().join("worker.log");
        let out = std::fs::File::create(&log).expect("create worker.log");
        let metrics_addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let mut command = Command::new(env!("CARGO_BIN_EXE_mqtt-connector"));
        command
            .arg("worker")
            .env("MQTT_CONNECTOR_AMQP_URL", crate::common::amqp_url())
            .env("MQTT_CONNECTOR_QUEUE", queue)
            .env("MQTT_CONNECTOR_CONNECTORS", connectors)
            .env("MQTT_CONNECTOR_METRICS_ADDR", metrics_addr.to_string())
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("clone fd"))
            .stderr(out);
        for (key, value) in env {
            command.env(key, value);
        }
        let child = command.spawn().expect("spawn mqtt-connector worker");
        let worker = ChildWorker {
            child,
            metrics_addr,
            log,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok((200, _)) = crate::common::http::get(metrics_addr, "/readyz").await {
                return worker;
            }
            assert!(
                Instant::now() < deadline,
                "worker child not ready within 20 s; log:\n{}",
                worker.output()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Open file descriptors (`/proc/PID/fd`).
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .expect("read /proc/PID/fd")
            .count()
    }

    /// Resident set size in KiB (`VmRSS` of `/proc/PID/status`).
    pub fn rss_kib(&self) -> u64 {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).expect("status");
        status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS")
    }

    /// Everything it wrote to stdout and stderr so far.
    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `/metrics` text.
    pub async fn metrics(&self) -> String {
        let (status, body) = crate::common::http::get(self.metrics_addr, "/metrics")
            .await
            .expect("GET /metrics");
        assert_eq!(status, 200);
        body
    }

    /// SIGTERM, then waits (20 s at most) for it to exit; returns its exit status.
    pub async fn stop(self) -> std::process::ExitStatus {
        self.stop_with_output().await.0
    }

    /// [`stop`](Self::stop), also returning everything it wrote.
    pub async fn stop_with_output(mut self) -> (std::process::ExitStatus, String) {
        let pid = self.pid().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return (status, self.output());
            }
            assert!(
                Instant::now() < deadline,
                "worker did not exit within 20 s of SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for ChildWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
