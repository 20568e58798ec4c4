//! Nothing invalid ever reaches a shared connection: jobs the MQTT 5 encoder or the broker would
//! refuse (NUL or oversize properties, retain without Retain Available, QoS above the broker's
//! Maximum QoS) mixed into a stream of good jobs on ONE client-id, against a private Mosquitto 2.0.

mod common;

use common::worker::{TestBed, job, metric_sum, with};
use common::*;
use rumqttc5::QoS;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// The kinds of job in a stream, each with the answer it must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Good,
    NulContentType,
    NulUserProperty,
    LongContentType,
    LongCorrelationData,
    /// Retained, to a broker with `retain_available false`: refused by the client (0x9A).
    Retained,
    /// QoS 2 to a broker whose Maximum QoS is 1: published at QoS 1.
    Qos2,
}

impl Kind {
    /// The job's keys beyond a good job's.
    fn extra(self) -> serde_json::Value {
        match self {
            Kind::Good => json!({}),
            Kind::NulContentType => json!({"content-type": "text/\u{0}plain"}),
            Kind::NulUserProperty => json!({"user-properties": {"site": "no\u{0}rth"}}),
            Kind::LongContentType => json!({"content-type": "t".repeat(70_000)}),
            Kind::LongCorrelationData => json!({"correlation-data": "c".repeat(70_000)}),
            Kind::Retained => json!({"retain": true}),
            Kind::Qos2 => json!({"qos": 2}),
        }
    }

    /// The exit-code it must get.
    fn exit_code(self) -> i64 {
        match self {
            Kind::Good | Kind::Qos2 => 0,
            Kind::Retained => 8,
            _ => 1,
        }
    }

    /// Whether a subscriber must receive it.
    fn delivered(self) -> bool {
        matches!(self, Kind::Good | Kind::Qos2)
    }
}

/// What a stream's run measured.
struct Figures {
    replies: HashMap<String, (Kind, Reply, Duration)>,
    received: HashSet<String>,
    deferred: f64,
    connections: usize,
}

/// Sends `kinds` in order (one job each) on one client-id over MQTT 5 to `broker`, awaits every
/// reply and what a subscriber on the stream's topics received, then reads the worker's deferred
/// count and how many connections the broker saw for the client-id.
async fn run_stream(broker: &Mosquitto, kinds: &[Kind], timeout_ms: u64) -> Figures {
    let client_id = unique_name("contained");
    let prefix = unique_name("stream");
    let mut sub = Subscriber5::start(broker.port(), &format!("{prefix}/#"), QoS::AtLeastOnce).await;
    let mut bed = TestBed::start_with(common::worker::connectors_dir(), |options| {
        options.prefetch = 64;
    })
    .await;
    let mut sent = HashMap::new();
    for (i, kind) in kinds.iter().enumerate() {
        let body = with(
            with(
                job(&broker.url(), &format!("{prefix}/{i}"), &format!("job-{i}")),
                json!({"client-id": client_id, "mqtt-version": "5", "timeout": timeout_ms}),
            ),
            kind.extra(),
        );
        let correlation_id = format!("{i}");
        bed.amqp
            .send_job(
                &bed.queue,
                body.to_string().as_bytes(),
                Some(&bed.reply_queue),
                Some(&correlation_id),
            )
            .await;
        sent.insert(correlation_id, (*kind, Instant::now()));
    }
    let mut replies = HashMap::new();
    let deadline = Duration::from_millis(timeout_ms) + Duration::from_secs(30);
    while replies.len() < kinds.len() {
        let Some(reply) = bed.replies.try_reply(deadline).await else {
            let missing: Vec<_> = sent.keys().filter(|c| !replies.contains_key(*c)).collect();
            panic!(
                "{} of {} jobs unanswered: {missing:?}\n{}",
                missing.len(),
                kinds.len(),
                broker.log()
            );
        };
        let correlation_id = reply.correlation_id.clone().expect("correlation id");
        let (kind, at) = sent[&correlation_id];
        replies.insert(correlation_id, (kind, reply, at.elapsed()));
    }
    let expected = kinds.iter().filter(|k| k.delivered()).count();
    let mut received = HashSet::new();
    while received.len() < expected {
        match sub.recv(Duration::from_secs(10)).await {
            Some(message) => {
                received.insert(String::from_utf8_lossy(&message.payload).into_owned());
            }
            None => break,
        }
    }
    let deferred = metric_sum(
        &bed.worker.metrics().await,
        "mqtt_connector_jobs_deferred_total",
    );
    bed.finish().await;
    let connections = broker
        .log()
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(&client_id))
        .count();
    Figures {
        replies,
        received,
        deferred,
        connections,
    }
}

/// Asserts every job got its own answer and prints the figures.
fn check(figures: &Figures, broker: &Mosquitto) {
    let mut good_retried = 0;
    let mut good = 0;
    let mut slowest_bad: HashMap<Kind, Duration> = HashMap::new();
    for (correlation_id, (kind, reply, took)) in &figures.replies {
        assert_eq!(
            reply.exit_code(),
            kind.exit_code(),
            "job {correlation_id} ({kind:?}): {}",
            reply.body
        );
        let attempts = reply.body["attempts"].as_i64().unwrap_or(-1);
        let payload = format!("job-{correlation_id}");
        if kind.delivered() {
            assert!(
                figures.received.contains(&payload),
                "{kind:?} job {correlation_id} not received"
            );
        } else {
            assert!(
                !figures.received.contains(&payload),
                "{kind:?} job {correlation_id} reached the subscriber"
            );
        }
        match kind {
            Kind::Good => {
                good += 1;
                assert!(attempts <= 2, "good job {correlation_id}: {}", reply.body);
                if attempts > 1 {
                    good_retried += 1;
                }
            }
            Kind::Qos2 => {
                assert!(
                    reply.message().contains("Maximum QoS is 1")
                        && reply.message().contains("(qos 1)"),
                    "{}",
                    reply.body
                );
            }
            _ => {
                assert!(attempts <= 1, "{kind:?}: {}", reply.body);
                let slowest = slowest_bad.entry(*kind).or_default();
                *slowest = (*slowest).max(*took);
            }
        }
    }
    println!(
        "FIGURES: {good} good jobs answered 0, {good_retried} of them retried; \
         deferred {}; connections for the client-id {}; slowest answer per bad class: {slowest_bad:?}",
        figures.deferred, figures.connections
    );
    assert_eq!(figures.deferred, 0.0, "a worker without siblings handed back");
    assert_eq!(figures.connections, 1, "{}", broker.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_encoder_would_refuse_answers_1_and_the_shared_connection_carries_on() {
    let broker = Mosquitto::plain_with("retain_available false\n");
    let bad = [
        Kind::NulContentType,
        Kind::NulUserProperty,
        Kind::LongContentType,
        Kind::LongCorrelationData,
        Kind::Retained,
    ];
    let kinds: Vec<Kind> = (0..40)
        .map(|i| if i % 8 == 3 { bad[i / 8] } else { Kind::Good })
        .collect();
    let figures = run_stream(&broker, &kinds, 10_000).await;
    check(&figures, &broker);
    let message = |kind: Kind| {
        figures
            .replies
            .values()
            .find(|(k, _, _)| *k == kind)
            .map(|(_, reply, _)| reply.message().to_owned())
            .expect("a reply of that kind")
    };
    assert!(message(Kind::NulContentType).contains("content-type"));
    assert!(message(Kind::NulUserProperty).contains("user-properties"));
    assert!(message(Kind::LongCorrelationData).contains("65,535"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos_2_job_to_a_broker_whose_maximum_qos_is_1_is_published_at_qos_1_and_says_so() {
    // A listener option in Mosquitto 2.0: the harness writes it after its `listener` line.
    let broker = Mosquitto::plain_with("max_qos 1\n");
    let kinds: Vec<Kind> = (0..20)
        .map(|i| if i % 4 == 1 { Kind::Qos2 } else { Kind::Good })
        .collect();
    let figures = run_stream(&broker, &kinds, 10_000).await;
    check(&figures, &broker);
    for (kind, reply, _) in figures.replies.values() {
        if *kind == Kind::Qos2 {
            assert_eq!(reply.body["attempts"], 1, "{}", reply.body);
            assert!(
                reply
                    .message()
                    .contains("published at QoS 1 instead of 2"),
                "{}",
                reply.body
            );
        }
    }
    assert!(!broker.log().contains("Too high QoS"), "{}", broker.log());
}
