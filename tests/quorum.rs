//! The request queue on a private RabbitMQ node: declared quorum with a delivery limit and a
//! dead-letter queue, so a job whose worker keeps dying is dead-lettered rather than
//! redelivered for ever; an existing queue of another type used as it is; a consumer that
//! RabbitMQ cancels (queue deleted) consuming again.

mod common;

use std::time::Duration;

use common::child::ChildWorker;
use common::worker::{metric_sum, spawn_worker_with};
use common::{Amqp, RabbitCluster, RabbitConfig, SilentServer, unique_name};
use mqtt_connector::amqp::queue::QueueType;
use mqtt_connector::worker::WorkerOptions;

const T: Duration = Duration::from_secs(20);

/// Waits until the worker process holds `n` jobs in flight (its `/metrics`).
async fn wait_in_flight(worker: &ChildWorker, n: f64) {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        if let Ok((200, text)) = common::http::get(worker.metrics_addr, "/metrics").await
            && metric_sum(&text, "mqtt_connector_jobs_in_flight") == n
        {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "worker never held {n} job(s); output:\n{}",
            worker.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A job whose broker never answers (60 s timeout): it hangs until its worker dies.
fn hanging_job(broker: &SilentServer) -> Vec<u8> {
    serde_json::json!({
        "broker": broker.url(), "client-id": unique_name("poison"), "topic": "t",
        "content": "poison", "qos": 1, "timeout": 60_000,
    })
    .to_string()
    .into_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quorum_delivery_limit_dead_letters_a_job_whose_worker_was_killed_twice() {
    let node = RabbitCluster::start(1, &RabbitConfig::default()).await;
    let url = node.url(0);
    let queue = unique_name("poison-jobs");
    let dead = format!("{queue}.dead");
    let broker = SilentServer::start().await;
    let env = [
        ("MQTT_CONNECTOR_AMQP_URL", url.as_str()),
        ("MQTT_CONNECTOR_QUEUE", queue.as_str()),
        ("MQTT_CONNECTOR_QUEUE_TYPE", "quorum"),
        ("MQTT_CONNECTOR_DELIVERY_LIMIT", "2"),
        ("MQTT_CONNECTOR_DEAD_LETTER_QUEUE", dead.as_str()),
    ];
    let mut worker = ChildWorker::spawn_with_env(&env);
    worker.wait_ready(T).await;
    let listing = node.ctl(0, &["list_queues", "name", "type", "arguments"]);
    let declared = listing
        .lines()
        .find(|line| line.starts_with(&format!("{queue}\t")))
        .unwrap_or_else(|| panic!("{queue} not declared: {listing}"));
    assert!(
        declared.contains("quorum") && declared.contains("x-delivery-limit"),
        "declared as a quorum queue with a delivery limit: {declared}"
    );

    let amqp = Amqp::connect_to(&url).await;
    let (reply_queue, mut replies) = amqp.reply_queue().await;
    amqp.send_job(
        &queue,
        &hanging_job(&broker),
        Some(&reply_queue),
        Some("poison-1"),
    )
    .await;
    for death in 1..=2 {
        wait_in_flight(&worker, 1.0).await;
        worker.kill();
        eprintln!("quorum: worker killed with the job in flight ({death})");
        if death < 2 {
            worker = ChildWorker::spawn_with_env(&env);
            worker.wait_ready(T).await;
        }
    }
    // Killed twice: RabbitMQ dead-letters it instead of a third delivery.
    let deadline = tokio::time::Instant::now() + T;
    let message = loop {
        if let Some(message) = amqp.get_message(&dead).await {
            break message;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing in {dead}; {queue} holds {:?}",
            amqp.queue_counts(&queue).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let body: serde_json::Value = serde_json::from_slice(&message.body).expect("job JSON");
    assert_eq!(body["content"], "poison", "the job as sent");
    assert_eq!(
        message
            .properties
            .correlation_id()
            .as_ref()
            .map(|id| id.as_str()),
        Some("poison-1")
    );
    // A worker started now gets nothing: the job is out of the request queue for good.
    let mut worker = ChildWorker::spawn_with_env(&env);
    worker.wait_ready(T).await;
    assert_eq!(amqp.queue_counts(&queue).await.expect("queue").0, 0);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (_, text) = common::http::get(worker.metrics_addr, "/metrics")
        .await
        .expect("metrics");
    assert_eq!(metric_sum(&text, "mqtt_connector_jobs_in_flight"), 0.0);
    replies.expect_no_reply(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_existing_queue_is_used_as_it_is_and_a_deleted_one_is_consumed_again() {
    let node = RabbitCluster::start(1, &RabbitConfig::default()).await;
    let url = node.url(0);
    let amqp = Amqp::connect_to(&url).await;
    let queue = unique_name("existing");
    // A classic queue already there.
    amqp.declare_job_queue(&queue).await;
    let connectors = common::worker::connectors_dir();
    let mut options = WorkerOptions::new(url.as_str(), queue.as_str(), connectors.path());
    options.queue_type = QueueType::Quorum;
    options.delivery_limit = Some(3);
    options.metrics_addr = Some("127.0.0.1:0".parse().expect("addr"));
    let worker = spawn_worker_with(options).await;
    let listing = node.ctl(0, &["list_queues", "name", "type"]);
    assert!(
        listing
            .lines()
            .any(|line| line.starts_with(&queue) && line.contains("classic")),
        "the existing classic queue is used as it is: {listing}"
    );
    let (reply_queue, mut replies) = amqp.reply_queue().await;
    let job = br#"{"topic": "t"}"#; // invalid (no broker): answered at once with exit-code 1
    amqp.send_job(&queue, job, Some(&reply_queue), Some("a"))
        .await;
    assert_eq!(replies.expect_reply(T).await.exit_code(), 1);

    // RabbitMQ cancels the consumer when its queue is deleted; the worker declares the queue
    // again (now missing: as quorum) and consumes.
    amqp.delete_queue(&queue).await;
    let deadline = tokio::time::Instant::now() + T;
    loop {
        if let Ok((_, consumers)) = amqp.queue_counts(&queue).await
            && consumers == 1
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker did not consume the queue again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    worker.wait_ready(T).await;
    let listing = node.ctl(0, &["list_queues", "name", "type"]);
    assert!(
        listing
            .lines()
            .any(|line| line.starts_with(&queue) && line.contains("quorum")),
        "re-declared with the configured type: {listing}"
    );
    amqp.send_job(&queue, job, Some(&reply_queue), Some("b"))
        .await;
    let reply = replies.expect_reply(T).await;
    assert_eq!(reply.correlation_id.as_deref(), Some("b"));
    worker.stop().await;
}
