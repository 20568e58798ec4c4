//! A worker that stops unbinds its client-ids' queues at once: jobs handed back for them then go
//! back through the request queue (the exchange's alternate exchange), not into a queue nobody
//! will consume, whose way back — RabbitMQ's dead-lettering of expired messages — is at most
//! once (the 30-minute soak lost jobs so when that queue's node died right after). Two workers
//! on the machine's RabbitMQ and a private Mosquitto; the bindings are read with `rabbitmqctl`.

mod common;
mod mqtt_support;

use std::process::Command;
use std::time::{Duration, Instant};

use common::worker::{connectors_dir, spawn_worker_with};
use common::*;
use mqtt_connector::worker::WorkerOptions;
use mqtt_support::job_and_reply_queues;
use serde_json::json;

const T: Duration = Duration::from_secs(30);

/// The queues bound to `exchange` on the machine's RabbitMQ.
fn bound_to(exchange: &str) -> Vec<String> {
    let output = Command::new("rabbitmqctl")
        .args(["list_bindings", "-s", "source_name", "destination_name"])
        .output()
        .expect("run rabbitmqctl list_bindings");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut fields = line.split('\t');
            (fields.next() == Some(exchange)).then(|| fields.next().map(str::to_owned))?
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_worker_unbinds_the_queues_of_the_client_ids_it_held() {
    let broker = Mosquitto::plain();
    let connectors = connectors_dir();
    write_connector(
        connectors.path(),
        "shared",
        json!({"broker": broker.url(), "client-id": unique_name("held"),
               "topic": unique_name("held"), "qos": 1, "timeout": 5000}),
    );
    let (amqp, queue, reply_queue, mut replies) = job_and_reply_queues().await;
    let options = || {
        let mut options = WorkerOptions::new(amqp_url(), queue.clone(), connectors.path());
        options.metrics_addr = Some("127.0.0.1:0".parse().expect("addr"));
        options
    };
    let holder = spawn_worker_with(options()).await;
    let job = json!({"connector": "shared", "content": "hold the client-id"}).to_string();
    amqp.send_job(&queue, job.as_bytes(), Some(&reply_queue), Some("1"))
        .await;
    assert_eq!(replies.expect_reply(T).await.exit_code(), 0);
    // With a sibling on the queue, the holder consumes its client-id's queue, bound by then.
    let sibling = spawn_worker_with(options()).await;
    let exchange = format!("{queue}.held");
    let deadline = Instant::now() + T;
    let held = loop {
        let bound = bound_to(&exchange);
        if !bound.is_empty() {
            break bound;
        }
        assert!(
            Instant::now() < deadline,
            "the holder never bound its client-id's queue"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };

    holder.stop().await;
    let left = bound_to(&exchange);
    sibling.stop().await;
    for queue in &held {
        amqp.delete_queue(queue).await;
    }
    for exchange in [exchange.clone(), format!("{queue}.unheld")] {
        amqp.delete_exchange(&exchange).await;
    }
    amqp.delete_queue(&queue).await;
    assert!(
        left.is_empty(),
        "still bound to {exchange} after the holder stopped: {left:?}"
    );
}
