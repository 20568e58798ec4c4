//! Faults on the MQTT side, through a real worker consuming RabbitMQ and real Mosquitto brokers
//! (mock brokers only for what a real broker cannot do):
//!
//! - a broker killed (SIGKILL) in the middle of a burst of QoS 1 / QoS 2 jobs and restarted 2 s
//!   later on the same port: every job answered exactly once, every job answered 0 received;
//! - brokers that never answer, never acknowledge, or drop the connection after CONNACK: the
//!   right exit-code within the job's timeout, and a worker process's open fds and RSS back to
//!   (near) their baseline after 1,000 such jobs;
//! - secrets: passwords and private keys appear neither in a worker's debug output nor in replies;
//! - limits: content over the maximum, a certificate path that is a directory, 1 MiB content;
//! - `ssl://` to a plain-TCP port fails and never publishes in clear.

mod common;
mod mqtt_support;

use common::worker::{connectors_dir, spawn_worker_with};
use common::*;
use mqtt_connector::worker::WorkerOptions;
use mqtt_support::{ChildWorker, Replies, UNLIMITED_QUEUES, reconfigure, send_burst};
use rumqttc::QoS;
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;

const T: Duration = Duration::from_secs(20);

fn worker_options(queue: &str, connectors: &std::path::Path) -> WorkerOptions {
    let mut options = WorkerOptions::new(amqp_url(), queue.to_string(), connectors);
    options.metrics_addr = Some("127.0.0.1:0".parse().expect("addr"));
    options
}

/// Waits until Mosquitto's persistence file has been written after `since` (autosave).
async fn wait_db_saved(broker: &Mosquitto, since: SystemTime) {
    let db = broker.dir().join("mosquitto.db");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let saved = std::fs::metadata(&db)
            .and_then(|m| m.modified())
            .is_ok_and(|t| t > since);
        if saved {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "mosquitto did not save {} within 10 s\n{}",
            db.display(),
            broker.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The kill-mid-burst scenario at one QoS.
///
/// Choice for the subscriber: a clean-session subscriber misses what is published while it is
/// reconnecting after the restart (the worker may well reconnect and publish first), and a
/// broker killed with SIGKILL loses whatever it queued in memory. So the subscriber has a
/// persistent session (clean_session = false, fixed client id, subscription at the job's QoS) and
/// Mosquitto runs with persistence (autosave every second; the test waits until the subscriber's
/// session is on disk before the burst), so the restarted broker knows the session and queues
/// for it until it is back. Mosquitto also runs with no in-flight or queue limit per client, so
/// a message it acknowledged to the worker was already written to the subscriber's socket (not
/// held in broker memory, lost with the process). The subscription is QoS 1 even for the QoS 2
/// burst (the worker still publishes at QoS 2; only the broker-to-subscriber leg is QoS 1): the
/// restored broker's persisted state is up to a second old, so it reuses packet ids the
/// subscriber still holds as "QoS 2 received, awaiting PUBREL", and rumqttc rightly drops such a
/// publish as a duplicate: about 110 of 1,000 messages vanished that way at the subscriber with a
/// QoS 2 subscription (not the worker's doing). What the test then proves is about the worker: a
/// job answered 0 was acknowledged by the broker, so it was delivered.
async fn broker_killed_mid_burst(qos: u8, jobs: usize) {
    let mut broker = Mosquitto::plain();
    reconfigure(
        &mut broker,
        &format!(
            "persistence true\npersistence_location {{DIR}}/\nautosave_interval 1\n{UNLIMITED_QUEUES}"
        ),
    );
    let topic = unique_name("burst");
    let mut options = mqtt_options("127.0.0.1", broker.port());
    options.set_clean_session(false);
    let subscribed = SystemTime::now();
    let mut sub = Subscriber::start_with(options, &topic, QoS::AtLeastOnce).await;
    wait_db_saved(&broker, subscribed).await;

    let amqp = Amqp::connect().await;
    let queue = unique_name("jobs");
    amqp.declare_job_queue(&queue).await;
    let (reply_queue, mut replies) = amqp.reply_queue().await;
    let run = unique_name("run");
    let client_id = unique_name("burst-client");
    let bodies: Vec<(String, Vec<u8>)> = (0..jobs)
        .map(|i| {
            let body = json!({
                "broker": broker.url(), "client-id": client_id, "topic": topic,
                "content": format!("{run}-{i}"), "qos": qos, "timeout": 15000,
            });
            (format!("{i}"), body.to_string().into_bytes())
        })
        .collect();
    send_burst(&amqp, &queue, &reply_queue, &bodies).await;
    let started = Instant::now();
    let connectors = connectors_dir();
    let worker = spawn_worker_with(worker_options(&queue, connectors.path())).await;

    // Kill once the burst is well under way (a fifth received).
    let mut received: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + T;
    while received.values().sum::<usize>() < jobs / 5 {
        let got = tokio::time::timeout_at(deadline, sub.expect(T))
            .await
            .expect("a fifth of the burst received within 20 s");
        *received.entry(got.payload_str()).or_default() += 1;
    }
    broker.kill();
    let killed_at = started.elapsed();
    // The scenario: the broker is down for 2 s (not a synchronisation).
    tokio::time::sleep(Duration::from_secs(2)).await;
    broker.restart();

    let answered = Replies::gather(
        &mut replies,
        jobs,
        Duration::from_secs(45),
        Duration::from_millis(500),
    )
    .await;
    let all_answered = started.elapsed();
    let twice = answered.answered_twice();
    assert!(twice.is_empty(), "jobs answered twice: {twice:?}");
    assert_eq!(answered.total(), jobs);
    let retried = answered
        .by_id
        .values()
        .filter(|r| r[0].body["attempts"].as_u64().unwrap_or(0) >= 2)
        .count();
    let codes = answered.codes();
    // The broker was back 2 s later, well inside the 15 s timeout: every job must succeed.
    assert_eq!(
        codes.get(&0).copied().unwrap_or(0),
        jobs,
        "codes {codes:?}; examples: {:?} {:?} {:?}",
        answered.examples(3, 2),
        answered.examples(6, 2),
        answered.examples(7, 2)
    );
    assert!(
        retried > 0,
        "the kill hit no job in flight (killed at {killed_at:?}): the test proved nothing"
    );

    let expected: Vec<String> = (0..jobs)
        .filter(|i| answered.first(&i.to_string()).exit_code() == 0)
        .map(|i| format!("{run}-{i}"))
        .collect();
    let deadline = Instant::now() + T;
    while expected.iter().any(|p| !received.contains_key(p)) {
        match tokio::time::timeout_at(deadline, sub.recv(T)).await {
            Ok(Some(got)) => *received.entry(got.payload_str()).or_default() += 1,
            _ => break,
        }
    }
    // Late duplicates (redelivered by the restored session) are counted, not awaited.
    while let Some(got) = sub.recv(Duration::from_millis(300)).await {
        *received.entry(got.payload_str()).or_default() += 1;
    }
    let missing: Vec<&String> = expected
        .iter()
        .filter(|p| !received.contains_key(*p))
        .collect();
    let duplicates: usize = received.values().map(|n| n - 1).sum();
    let duplicated = received.values().filter(|n| **n > 1).count();
    println!(
        "QoS {qos}: {jobs} jobs, broker killed at {killed_at:?} after {} received, all answered at \
         {all_answered:?}; codes {codes:?}; {retried} jobs retried; subscriber: {} distinct, \
         {duplicates} duplicate deliveries ({duplicated} payloads), {} missing",
        jobs / 5,
        received.len(),
        missing.len()
    );
    assert!(
        missing.is_empty(),
        "{} jobs answered 0 never received, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    assert!(received.keys().all(|p| p.starts_with(&run)));
    worker.stop().await;
    amqp.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_mid_burst_qos1_no_job_lost() {
    broker_killed_mid_burst(1, 1000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_mid_burst_qos2_no_job_lost() {
    broker_killed_mid_burst(2, 1000).await;
}
