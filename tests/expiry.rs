//! Stale commands end to end (a worker consuming RabbitMQ, a private Mosquitto, subscribers that
//! record what arrives): `not-after` and AMQP `timestamp` + `expiration` that have passed are
//! exit-code 9 with nothing published, a job still retrying against a broker that is down ends
//! 9 once its validity passes and its message never arrives when the broker comes back, and an
//! MQTT 5 subscriber sees the validity left as the Message Expiry Interval.

mod common;

use common::worker::{TestBed, job, with};
use common::*;
use lapin::BasicProperties;
use mqtt_connector::expiry::rfc3339;
use serde_json::json;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const T: Duration = Duration::from_secs(20);
/// How long a subscriber waits to be sure a message does not come after all.
const QUIET: Duration = Duration::from_secs(3);

/// `not-after` `offset` from now (negative: in the past), as RFC 3339.
fn not_after(offset_secs: i64) -> String {
    let now = SystemTime::now();
    let at = if offset_secs >= 0 {
        now + Duration::from_secs(offset_secs.unsigned_abs())
    } else {
        now - Duration::from_secs(offset_secs.unsigned_abs())
    };
    rfc3339(at)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("after 1970")
        .as_secs()
}

/// Puts `job` on the bed's queue with the AMQP properties `timestamp` and `expiration`, and
/// returns its reply.
async fn run_with_expiration(
    bed: &mut TestBed,
    job: serde_json::Value,
    timestamp: u64,
    expiration_ms: u64,
) -> Reply {
    let correlation_id = unique_name("corr");
    let properties = BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_reply_to(bed.reply_queue.as_str().into())
        .with_correlation_id(correlation_id.as_str().into())
        .with_timestamp(timestamp)
        .with_expiration(expiration_ms.to_string().into());
    bed.amqp
        .publish(&bed.queue, job.to_string().as_bytes(), properties)
        .await;
    let reply = bed.replies.expect_reply(T).await;
    assert_eq!(
        reply.correlation_id.as_deref(),
        Some(correlation_id.as_str())
    );
    reply
}

/// Sends a fresh job with `client_id` (so it rides the same MQTT connection as the stale one
/// would have) and asserts it is the first and only message `sub` receives: the stale job's
/// message never arrived, before it or after.
async fn only_the_next_job_arrives(
    bed: &mut TestBed,
    sub: &mut Subscriber,
    broker: &str,
    topic: &str,
    client_id: &str,
) {
    let fresh = with(job(broker, topic, "fresh"), json!({"client-id": client_id}));
    let reply = bed.run(fresh, T).await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    let first = sub.expect(T).await;
    assert_eq!(first.payload_str(), "fresh", "the stale message arrived");
    if let Some(late) = sub.recv(QUIET).await {
        panic!("a message arrived after the fresh one: {late:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_not_after_has_passed_ends_9_and_nothing_is_published() {
    let broker = Mosquitto::plain();
    let topic = unique_name("stale");
    let mut sub = Subscriber::start(broker.port(), &topic, rumqttc::QoS::AtLeastOnce).await;
    let mut bed = TestBed::new().await;
    let client_id = unique_name("worker");
    let stale = with(
        job(&broker.url(), &topic, "stale"),
        json!({"client-id": client_id, "not-after": not_after(-5)}),
    );
    let reply = bed.run(stale, T).await;
    eprintln!("stale not-after: {}", reply.body);
    assert_eq!(reply.exit_code(), 9, "{}", reply.body);
    assert_eq!(reply.body["attempts"], 0, "{}", reply.body);
    assert!(
        reply.message().contains("not-after") && reply.message().contains("nothing published"),
        "{}",
        reply.body
    );
    only_the_next_job_arrives(&mut bed, &mut sub, &broker.url(), &topic, &client_id).await;
    let metrics = bed.worker.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.contains("exit_code=\"9\"") && l.ends_with(" 1")),
        "no job counted under exit-code 9:\n{metrics}"
    );
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_amqp_timestamp_plus_expiration_has_passed_ends_9_and_nothing_is_published() {
    let broker = Mosquitto::plain();
    let topic = unique_name("stale-amqp");
    let mut sub = Subscriber::start(broker.port(), &topic, rumqttc::QoS::AtLeastOnce).await;
    let mut bed = TestBed::new().await;
    let client_id = unique_name("worker");
    let stale = with(
        job(&broker.url(), &topic, "stale"),
        json!({"client-id": client_id}),
    );
    // Sent a minute ago and valid for 30 s: RabbitMQ counts `expiration` from when the message
    // entered the queue and hands it over; only the worker can see it is a minute late.
    let reply = run_with_expiration(&mut bed, stale, unix_now() - 60, 30_000).await;
    eprintln!("stale AMQP expiration: {}", reply.body);
    assert_eq!(reply.exit_code(), 9, "{}", reply.body);
    assert_eq!(reply.body["attempts"], 0, "{}", reply.body);
    assert!(
        reply.message().contains("AMQP timestamp + expiration"),
        "{}",
        reply.body
    );
    only_the_next_job_arrives(&mut bed, &mut sub, &broker.url(), &topic, &client_id).await;
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_retrying_past_its_not_after_ends_9_then_and_never_arrives_when_the_broker_is_back() {
    let broker = Mosquitto::plain();
    let proxy = TcpProxy::start(broker.port()).await;
    let via_proxy = format!("tcp://127.0.0.1:{}", proxy.port());
    let topic = unique_name("retrying");
    // The subscriber is on the broker itself, which stays up: only the worker's way is cut.
    let mut sub = Subscriber::start(broker.port(), &topic, rumqttc::QoS::AtLeastOnce).await;
    let mut bed = TestBed::new().await;
    proxy.refuse();
    let client_id = unique_name("worker");
    let stale = with(
        job(&via_proxy, &topic, "stale"),
        json!({"client-id": client_id, "not-after": not_after(2), "timeout": 10_000}),
    );
    let sent = Instant::now();
    let reply = bed.run(stale, T).await;
    let took = sent.elapsed();
    eprintln!("retrying past not-after: 9 after {took:?}: {}", reply.body);
    assert_eq!(reply.exit_code(), 9, "{}", reply.body);
    // The validity (2 s) ends it, not the 10 s timeout.
    assert!(
        took >= Duration::from_millis(1_500) && took < Duration::from_millis(4_000),
        "{took:?}"
    );
    let attempts = reply.body["attempts"].as_u64().expect("attempts");
    assert!(attempts >= 2, "it was retrying: {}", reply.body);
    assert!(
        reply.message().contains("nothing published") && reply.message().contains("Last:"),
        "{}",
        reply.body
    );
    proxy.accept();
    only_the_next_job_arrives(&mut bed, &mut sub, &via_proxy, &topic, &client_id).await;
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_amqp_expiration_passes_while_its_broker_is_down_ends_9_and_never_arrives() {
    let broker = Mosquitto::plain();
    let proxy = TcpProxy::start(broker.port()).await;
    let via_proxy = format!("tcp://127.0.0.1:{}", proxy.port());
    let topic = unique_name("amqp-retrying");
    let mut sub = Subscriber::start(broker.port(), &topic, rumqttc::QoS::AtLeastOnce).await;
    let mut bed = TestBed::new().await;
    proxy.refuse();
    let client_id = unique_name("worker");
    let stale = with(
        job(&via_proxy, &topic, "stale"),
        json!({"client-id": client_id, "timeout": 10_000}),
    );
    // Valid for 3 s from this second: long enough to reach the consuming worker (RabbitMQ
    // would drop it at the queue's head only after that), short enough to pass while the
    // worker cannot reach the broker.
    let sent = Instant::now();
    let reply = run_with_expiration(&mut bed, stale, unix_now(), 3_000).await;
    let took = sent.elapsed();
    eprintln!(
        "AMQP expiration while retrying: 9 after {took:?}: {}",
        reply.body
    );
    assert_eq!(reply.exit_code(), 9, "{}", reply.body);
    assert!(took < Duration::from_millis(5_000), "{took:?}");
    assert!(
        reply.body["attempts"].as_u64().expect("attempts") >= 2,
        "{}",
        reply.body
    );
    assert!(
        reply.message().contains("AMQP timestamp + expiration"),
        "{}",
        reply.body
    );
    proxy.accept();
    only_the_next_job_arrives(&mut bed, &mut sub, &via_proxy, &topic, &client_id).await;
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_5_publish_carries_the_validity_left_as_message_expiry_or_the_jobs_if_smaller() {
    let broker = Mosquitto::plain();
    let topic = unique_name("expiry5");
    let mut sub = Subscriber5::start(broker.port(), &topic, rumqttc5::QoS::AtLeastOnce).await;
    let mut bed = TestBed::new().await;
    let mut seen = Vec::new();
    // (the job's message-expiry, the range the subscriber must see)
    for (job_expiry, expected) in [(None, 95..=100), (Some(30), 25..=30), (Some(300), 95..=100)] {
        let mut body = with(
            job(&broker.url(), &topic, "valid"),
            json!({"mqtt-version": "5", "not-after": not_after(100)}),
        );
        if let Some(secs) = job_expiry {
            body = with(body, json!({"message-expiry": secs}));
        }
        let reply = bed.run(body, T).await;
        assert_eq!(reply.exit_code(), 0, "{}", reply.body);
        let got = sub.expect(T).await;
        let expiry = got
            .properties
            .and_then(|p| p.message_expiry_interval)
            .expect("a Message Expiry Interval");
        eprintln!("message-expiry {job_expiry:?}, not-after in 100 s: the subscriber saw {expiry}");
        assert!(expected.contains(&expiry), "{job_expiry:?}: {expiry}");
        seen.push(expiry);
    }
    assert!(seen[1] < seen[0], "{seen:?}");
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_with_a_not_after_far_ahead_is_published() {
    let broker = Mosquitto::plain();
    let topic = unique_name("fresh");
    let mut sub = Subscriber::start(broker.port(), &topic, rumqttc::QoS::AtLeastOnce).await;
    let mut bed = TestBed::new().await;
    let body = with(
        job(&broker.url(), &topic, "on time"),
        json!({"not-after": not_after(3_600)}),
    );
    let reply = bed.run(body, T).await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    assert_eq!(sub.expect(T).await.payload_str(), "on time");
    // An AMQP expiration not yet passed does not stop it either.
    let body = job(&broker.url(), &topic, "within its expiration");
    let reply = run_with_expiration(&mut bed, body, unix_now(), 60_000).await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    assert_eq!(sub.expect(T).await.payload_str(), "within its expiration");
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_not_after_without_an_offset_is_exit_code_1_naming_the_key() {
    let broker = Mosquitto::plain();
    let topic = unique_name("no-offset");
    let mut sub = Subscriber::start(broker.port(), &topic, rumqttc::QoS::AtLeastOnce).await;
    let mut bed = TestBed::new().await;
    let body = with(
        job(&broker.url(), &topic, "x"),
        json!({"not-after": "2026-12-05T12:00:00"}),
    );
    let reply = bed.run(body, T).await;
    assert_eq!(reply.exit_code(), 1, "{}", reply.body);
    assert!(reply.message().contains("\"not-after\""), "{}", reply.body);
    assert!(sub.recv(Duration::from_millis(500)).await.is_none());
    bed.finish().await;
}
