//! Replies RabbitMQ will not take (SPEC.md "Delivery": "Every job ends, once"): a job whose
//! reply is refused is published to MQTT once, settled without its reply after the reply
//! window (30 s), never put back on the queue; the worker serves other jobs meanwhile; with a
//! dead-letter queue the job lands there with its outcome in headers.

mod common;

use common::worker::{TestBed, connectors_dir, job, metric_sum, with};
use common::*;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use rumqttc::QoS;
use serde_json::json;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

const T: Duration = Duration::from_secs(15);
/// The reply window (30 s) and a margin: the job must be settled by then.
const SETTLED_WITHIN: Duration = Duration::from_secs(35);

/// A reply queue that holds at most one message and refuses publishes once full
/// (`x-max-length: 1`, `x-overflow: reject-publish`), already full. Returns its name.
async fn full_reply_queue(amqp: &Amqp) -> String {
    let name = unique_name("full-reply");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), AMQPValue::LongLongInt(1));
    args.insert(
        "x-overflow".into(),
        AMQPValue::LongString("reject-publish".into()),
    );
    let channel = amqp.connection.create_channel().await.expect("channel");
    channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                auto_delete: false,
                ..QueueDeclareOptions::default()
            },
            args,
        )
        .await
        .unwrap_or_else(|e| panic!("declare {name}: {e}"));
    let _ = channel.close(200, "bye".into()).await;
    amqp.publish(
        &name,
        b"{\"blocker\": true}",
        lapin::BasicProperties::default(),
    )
    .await;
    let refused = amqp
        .publish_confirmed(&name, b"{}", lapin::BasicProperties::default(), true)
        .await;
    assert!(
        matches!(refused, lapin::Confirmation::Nack(_)),
        "RabbitMQ nacks a publish to the full queue: {refused:?}"
    );
    name
}

async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (status, text) = common::http::get(addr, "/metrics")
        .await
        .expect("GET /metrics");
    assert_eq!(status, 200);
    metric_sum(&text, name)
}

/// Polls until metric `name` satisfies `pred`; returns when, panics after `within`.
async fn wait_metric(addr: SocketAddr, name: &str, pred: impl Fn(f64) -> bool, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let value = metric(addr, name).await;
        if pred(value) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} not as expected within {within:?}: {value}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The full-reply-queue case of issue 14: the same QoS 1 command was published again every two
/// seconds, for ever. Now: published once (at most twice), settled within 35 s, counted as a
/// lost reply, and three other jobs are answered while it waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_whose_reply_queue_is_full_is_published_once_and_settled_within_35_s() {
    let broker = Mosquitto::plain();
    let topic = unique_name("door");
    let mut sub = Subscriber::start(broker.port(), &topic, QoS::AtLeastOnce).await;
    let mut bed = TestBed::new().await;
    let addr = bed.worker.metrics_addr();
    let full = full_reply_queue(&bed.amqp).await;

    let body = with(
        job(&broker.url(), &topic, "unlock the door"),
        json!({"client-id": unique_name("door")}),
    )
    .to_string();
    let sent = Instant::now();
    bed.amqp
        .send_job(&bed.queue, body.as_bytes(), Some(&full), Some("door"))
        .await;
    assert_eq!(sub.expect(T).await.payload_str(), "unlock the door");

    // The worker goes on serving while the refused reply is retried.
    for i in 0..3 {
        let other = unique_name("other");
        let reply = bed
            .run(job(&broker.url(), &other, &format!("other {i}")), T)
            .await;
        assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    }
    assert_eq!(
        metric(addr, "mqtt_connector_replies_lost_total").await,
        0.0,
        "the others were answered while the refused reply was still being retried"
    );

    wait_metric(
        addr,
        "mqtt_connector_replies_lost_total",
        |v| v == 1.0,
        SETTLED_WITHIN + Duration::from_secs(5),
    )
    .await;
    let lost_after = sent.elapsed();
    wait_metric(addr, "mqtt_connector_jobs_in_flight", |v| v == 0.0, T).await;
    let settled_after = sent.elapsed();
    // Settled means gone from the queue: neither ready (requeued) nor unacked (held).
    bed.wait_queue_empty(T).await;
    bed.worker.stop().await;
    let (ready, _) = bed.amqp.queue_counts(&bed.queue).await.expect("queue");
    assert_eq!(ready, 0, "the job was not put back on the queue");

    // Listen a while longer: a requeued job would be published again.
    let mut again = 0;
    while let Some(got) = sub.recv(Duration::from_secs(3)).await {
        if got.payload_str() == "unlock the door" {
            again += 1;
        }
    }
    let publishes = 1 + again;
    println!(
        "full reply queue: {publishes} MQTT publish(es) of the job; reply lost after {lost_after:?}, settled after {settled_after:?}"
    );
    assert!(
        publishes <= 2,
        "published {publishes} times: the command repeats"
    );
    assert!(
        settled_after <= SETTLED_WITHIN,
        "settled after {settled_after:?}"
    );
    bed.amqp.delete_queue(&bed.queue).await;
    bed.amqp.delete_queue(&full).await;
}

/// With `--dead-letter-queue`, a job whose reply was lost is dead-lettered with its outcome in
/// `x-mqtt-connector-exit-code` and `x-mqtt-connector-message`, body and correlation id intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_whose_reply_was_lost_is_dead_lettered_with_its_outcome_in_headers() {
    let broker = Mosquitto::plain();
    let topic = unique_name("dlq");
    let mut sub = Subscriber::start(broker.port(), &topic, QoS::AtLeastOnce).await;
    let dead = unique_name("dead");
    let dead_for_worker = dead.clone();
    let bed = TestBed::start_with(connectors_dir(), move |options| {
        options.dead_letter_queue = Some(dead_for_worker);
    })
    .await;
    let full = full_reply_queue(&bed.amqp).await;
    let body = with(
        job(&broker.url(), &topic, "dead-lettered"),
        json!({"client-id": unique_name("dlq")}),
    )
    .to_string();
    let sent = Instant::now();
    bed.amqp
        .send_job(&bed.queue, body.as_bytes(), Some(&full), Some("dl-corr"))
        .await;
    assert_eq!(sub.expect(T).await.payload_str(), "dead-lettered");

    let deadline = sent + SETTLED_WITHIN + Duration::from_secs(5);
    let message = loop {
        if let Some(message) = bed.amqp.get_message(&dead).await {
            break message;
        }
        assert!(
            Instant::now() < deadline,
            "nothing in the dead-letter queue"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    println!("lost reply: dead-lettered after {:?}", sent.elapsed());
    let headers = message
        .properties
        .headers()
        .clone()
        .expect("the dead-lettered job has headers");
    let get = |key: &str| headers.inner().get(key).cloned();
    let exit_code = match get("x-mqtt-connector-exit-code") {
        Some(AMQPValue::LongInt(code)) => i64::from(code),
        Some(AMQPValue::LongLongInt(code)) => code,
        Some(AMQPValue::ShortInt(code)) => i64::from(code),
        other => panic!("x-mqtt-connector-exit-code: {other:?}"),
    };
    assert_eq!(exit_code, 0, "the job was published");
    match get("x-mqtt-connector-message") {
        Some(AMQPValue::LongString(text)) => {
            let text = text.to_string();
            assert!(!text.is_empty(), "an empty message");
            println!("x-mqtt-connector-message: {text}");
        }
        other => panic!("x-mqtt-connector-message: {other:?}"),
    }
    assert_eq!(message.body, body.as_bytes(), "the job's own body");
    assert_eq!(
        message
            .properties
            .correlation_id()
            .as_ref()
            .map(|id| id.to_string()),
        Some("dl-corr".to_owned())
    );
    bed.wait_queue_empty(T).await;
    assert_eq!(
        bed.amqp.get_message(&dead).await.map(|m| m.body),
        None,
        "dead-lettered once"
    );
    assert_eq!(
        sub.recv(Duration::from_secs(1)).await,
        None,
        "published once"
    );
    bed.worker.stop().await;
    bed.amqp.delete_queue(&bed.queue).await;
    bed.amqp.delete_queue(&dead).await;
    bed.amqp.delete_queue(&full).await;
}
