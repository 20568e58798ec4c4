//! RabbitMQ flow control (SPEC.md "Delivery": "RabbitMQ flow control"): a memory alarm on a
//! private node blocks the worker's connection while it has replies to send. `/readyz` answers
//! 503 while blocked and 200 again once the alarm clears; every job is answered 0, none lost or
//! failed for it; the Rust client's `call` returns within its timeout meanwhile.

mod common;

use common::worker::{connectors_dir, job, metric_sum, spawn_worker_with, with};
use common::*;
use mqtt_connector::amqp::queue::QueueSettings;
use mqtt_connector::client::{Client, ClientError, ClientOptions, JobRequest};
use mqtt_connector::worker::WorkerOptions;
use rumqttc::QoS;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

const JOBS: usize = 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_memory_alarm_makes_the_worker_unready_until_it_clears_and_every_job_is_answered_0() {
    let node = RabbitCluster::start(1, &RabbitConfig::default()).await;
    let url = node.url(0);
    let amqp = Amqp::connect_to(&url).await;
    let mut broker = Mosquitto::plain();
    let topic = unique_name("flow");
    let mut sub = Subscriber::start(broker.port(), &topic, QoS::AtLeastOnce).await;
    let queue = unique_name("jobs-flow");
    let dir = connectors_dir();
    let mut options = WorkerOptions::new(url.clone(), queue.clone(), dir.path());
    options.metrics_addr = Some("127.0.0.1:0".parse().expect("address"));
    let worker = spawn_worker_with(options).await;
    let addr = worker.metrics_addr();
    let (reply_queue, mut replies) = amqp.reply_queue().await;

    // Jobs in flight, held by a frozen MQTT broker, so their replies come after the alarm.
    broker.freeze();
    let client_id = unique_name("flow");
    for i in 0..JOBS {
        let body = with(
            job(&broker.url(), &topic, &format!("job {i}")),
            json!({"client-id": client_id, "timeout": 60_000}),
        );
        amqp.send_job(
            &queue,
            body.to_string().as_bytes(),
            Some(&reply_queue),
            Some(&format!("corr-{i}")),
        )
        .await;
    }
    common::http::wait_for_status(addr, "/readyz", 200, Duration::from_secs(5)).await;

    let start = Instant::now();
    let mut timeline: Vec<(Duration, String)> = Vec::new();
    node.ctl(0, &["set_vm_memory_high_watermark", "0.0000001"]);
    timeline.push((start.elapsed(), "alarm raised".into()));
    broker.thaw();
    timeline.push((
        start.elapsed(),
        "MQTT broker thawed: replies to send".into(),
    ));

    // /readyz goes 503 once RabbitMQ blocks the connection (on the worker's first reply).
    let unready = poll_readyz(addr, 503, Duration::from_secs(20)).await;
    timeline.push((
        start.elapsed(),
        format!("/readyz 503 (polled {unready} times)"),
    ));
    let blocked = metric_sum(
        &worker.metrics().await,
        "mqtt_connector_amqp_connection_blocked",
    );
    assert_eq!(blocked, 1.0, "amqp_connection_blocked while blocked");
    let up = metric_sum(&worker.metrics().await, "mqtt_connector_amqp_consumer_up");
    assert_eq!(up, 1.0, "the consumer stays up while blocked");

    // The Rust client's call returns within its timeout, though its publish is held.
    let client = Client::connect_with(
        &url,
        ClientOptions {
            queue: QueueSettings::classic(queue.clone()),
            ..ClientOptions::default()
        },
    )
    .await
    .expect("client connects during the alarm");
    let bound = Duration::from_secs(2);
    let called = Instant::now();
    let request = JobRequest::new()
        .broker(broker.url())
        .client_id(unique_name("call"))
        .topic(topic.clone())
        .content("by call")
        .qos(1);
    let result = tokio::time::timeout(Duration::from_secs(10), client.call(&request, bound))
        .await
        .expect("call came back");
    let took = called.elapsed();
    timeline.push((
        start.elapsed(),
        format!("Client::call gave up after {took:?}"),
    ));
    assert!(
        matches!(result, Err(ClientError::NoReply(_))),
        "call under an alarm: {result:?}"
    );
    assert!(
        took < bound + Duration::from_millis(500),
        "call took {took:?}"
    );

    // Still blocked a few seconds on: no job failed meanwhile, /readyz stays 503.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (status, _) = common::http::get(addr, "/readyz").await.expect("readyz");
    assert_eq!(status, 503, "still blocked");
    assert!(
        replies
            .try_reply(Duration::from_millis(100))
            .await
            .is_none(),
        "no reply leaves while blocked"
    );

    node.ctl(0, &["set_vm_memory_high_watermark", "0.4"]);
    timeline.push((start.elapsed(), "alarm cleared".into()));
    let ready = poll_readyz(addr, 200, Duration::from_secs(20)).await;
    timeline.push((
        start.elapsed(),
        format!("/readyz 200 (polled {ready} times)"),
    ));

    let mut answers: BTreeMap<String, i64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    // The client's job (published during the alarm) may be answered too; count ours only.
    while answers.len() < JOBS {
        let left = deadline.saturating_duration_since(Instant::now());
        let reply = replies.expect_reply(left).await;
        let id = reply.correlation_id.clone().unwrap_or_default();
        assert!(
            answers.insert(id.clone(), reply.exit_code()).is_none(),
            "{id} answered twice"
        );
    }
    timeline.push((start.elapsed(), format!("all {JOBS} jobs answered")));
    for (at, what) in &timeline {
        println!("flow control timeline: {:>7.2} s  {what}", at.as_secs_f64());
    }
    assert!(
        answers.values().all(|code| *code == 0),
        "every job 0: {answers:?}"
    );
    let published = sub.drain().len();
    assert!(published >= JOBS, "{published} MQTT messages");
    let text = worker.metrics().await;
    assert_eq!(metric_sum(&text, "mqtt_connector_replies_lost_total"), 0.0);
    assert_eq!(
        metric_sum(&text, "mqtt_connector_amqp_connection_blocked"),
        0.0
    );
    client.close().await;
    worker.stop().await;
}

/// Polls `/readyz` every 20 ms until it answers `status`; returns the number of polls.
async fn poll_readyz(addr: std::net::SocketAddr, status: u16, within: Duration) -> usize {
    let deadline = Instant::now() + within;
    let mut polls = 0;
    loop {
        polls += 1;
        if let Ok((got, _)) = common::http::get(addr, "/readyz").await
            && got == status
        {
            return polls;
        }
        assert!(
            Instant::now() < deadline,
            "/readyz did not answer {status} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
