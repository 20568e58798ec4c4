//! Helpers shared by `faults_mqtt.rs` and `fleet.rs` (on top of `tests/common`): bursts of jobs
//! sent with pipelined publisher confirms, replies gathered by correlation id, a Mosquitto tuned
//! for bursts; the worker as a child process is the harness' `common::child::ChildWorker`, with
//! a shorthand here to start one against the test RabbitMQ.
#![allow(dead_code)]

pub use crate::common::ChildWorker;
use crate::common::Mosquitto;
use crate::common::amqp::{Amqp, Reply, ReplyStream};
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use std::collections::HashMap;
use std::path::Path;
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

impl ChildWorker {
    /// A worker process on `queue` of the test RabbitMQ with `connectors` and `/metrics` on a
    /// free port, plus `env` (e.g. `MQTT_CONNECTOR_PREFETCH`, `RUST_LOG`); returns once `/readyz`
    /// answers 200.
    pub async fn start(queue: &str, connectors: &Path, env: &[(&str, &str)]) -> ChildWorker {
        ChildWorker::command(&crate::common::amqp_url(), queue, connectors)
            .envs(env)
            .start()
            .await
    }
}
