//! Several workers on one queue sharing one connector, hence one MQTT client-id, against a real
//! Mosquitto behind a [`TcpProxy`] that counts the connections made:
//!
//! - with `client_id_suffix` set per worker (the documented fix), each worker holds one
//!   connection and never reconnects;
//! - without it, the workers take the client-id from each other (MQTT allows one connection per
//!   client-id); the pool backs off after quick losses. No job may be lost either way; the
//!   reconnects and the jobs that ended non-zero are reported.
//!
//! Every job is answered exactly once and every job answered 0 is received by a subscriber; a
//! run in which no job (or, sharing a client-id, under 90 % of them) answered 0 fails, since it
//! would leave nothing to check.

mod common;
mod mqtt_support;

use common::worker::{RunningWorker, connectors_dir, metric_sum, spawn_worker_with};
use common::*;
use mqtt_connector::worker::WorkerOptions;
use mqtt_support::{Replies, UNLIMITED_QUEUES, job_and_reply_queues, reconfigure, send_burst};
use rumqttc::QoS;
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

struct FleetRun {
    codes: std::collections::BTreeMap<i64, usize>,
    reconnects: Vec<f64>,
    connections: usize,
    duplicates: usize,
    /// Whether the workers declared the exchange that routes hand-backs to a client-id's holder.
    hand_back_routing: bool,
}

async fn fleet(workers: usize, suffix: bool, jobs: usize) -> FleetRun {
    let mut broker = Mosquitto::plain();
    reconfigure(&mut broker, UNLIMITED_QUEUES);
    let proxy = TcpProxy::start(broker.port()).await;
    let topic = unique_name("fleet");
    let mut sub = Subscriber::start(broker.port(), &topic, QoS::AtLeastOnce).await;
    let connectors = connectors_dir();
    write_connector(
        connectors.path(),
        "shared",
        json!({"broker": format!("tcp://127.0.0.1:{}", proxy.port()),
               "client-id": unique_name("shared"), "topic": topic, "qos": 1, "timeout": 20000}),
    );
    let (amqp, queue, reply_queue, mut replies) = job_and_reply_queues().await;
    let mut running: Vec<RunningWorker> = Vec::new();
    for w in 0..workers {
        let mut options = WorkerOptions::new(amqp_url(), queue.clone(), connectors.path());
        options.metrics_addr = Some("127.0.0.1:0".parse().expect("addr"));
        if suffix {
            options.mqtt.client_id_suffix = format!("-w{w}");
        }
        running.push(spawn_worker_with(options).await);
    }
    let run = unique_name("run");
    let bodies: Vec<(String, Vec<u8>)> = (0..jobs)
        .map(|i| {
            let body = json!({"connector": "shared", "content": format!("{run}-{i}")});
            (i.to_string(), body.to_string().into_bytes())
        })
        .collect();
    let started = Instant::now();
    send_burst(&amqp, &queue, &reply_queue, &bodies).await;
    let answered = Replies::gather(
        &mut replies,
        jobs,
        Duration::from_secs(50),
        Duration::from_millis(500),
    )
    .await;
    let elapsed = started.elapsed();
    let twice = answered.answered_twice();
    assert!(twice.is_empty(), "{} jobs answered twice", twice.len());
    assert_eq!(answered.total(), jobs);

    let expected: Vec<String> = (0..jobs)
        .filter(|i| answered.first(&i.to_string()).exit_code() == 0)
        .map(|i| format!("{run}-{i}"))
        .collect();
    // Guard: with every job failed there would be nothing to receive and nothing to check.
    assert!(
        !expected.is_empty(),
        "no job of {jobs} answered 0 (codes {:?}): nothing left to check",
        answered.codes()
    );
    let mut received: HashMap<String, usize> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while expected.iter().any(|p| !received.contains_key(p)) {
        match tokio::time::timeout_at(deadline, sub.recv(Duration::from_secs(20))).await {
            Ok(Some(got)) => *received.entry(got.payload_str()).or_default() += 1,
            _ => break,
        }
    }
    let missing = expected
        .iter()
        .filter(|p| !received.contains_key(*p))
        .count();
    let duplicates: usize = received.values().map(|n| n - 1).sum();
    let mut reconnects = Vec::new();
    for worker in &running {
        reconnects.push(metric_sum(
            &worker.metrics().await,
            "mqtt_connector_mqtt_reconnects_total",
        ));
    }
    let codes = answered.codes();
    let connections = proxy.stats().total;
    println!(
        "{workers} workers, suffix {suffix}: {jobs} jobs answered in {elapsed:?}; codes {codes:?}; \
         MQTT connections through the proxy {connections}; reconnects per worker {reconnects:?}; \
         received {} distinct, {duplicates} duplicates, {missing} missing; non-zero examples {:?}",
        received.len(),
        codes
            .keys()
            .filter(|c| **c != 0)
            .flat_map(|c| answered.examples(*c, 1))
            .collect::<Vec<_>>()
    );
    assert_eq!(missing, 0, "jobs answered 0 but never received");
    for worker in running {
        worker.stop().await;
    }
    let hand_back_routing = amqp.exchange_exists(&format!("{queue}.held")).await;
    for exchange in [format!("{queue}.held"), format!("{queue}.unheld")] {
        amqp.delete_exchange(&exchange).await;
    }
    amqp.delete_queue(&queue).await;
    FleetRun {
        codes,
        reconnects,
        connections,
        duplicates,
        hand_back_routing,
    }
}

fn assert_clean(run: &FleetRun, workers: usize, jobs: usize) {
    assert_eq!(run.codes.get(&0).copied(), Some(jobs), "{:?}", run.codes);
    assert!(
        run.connections <= workers,
        "{} connections for {workers} workers",
        run.connections
    );
    assert!(
        run.reconnects.iter().all(|r| *r == 0.0),
        "{:?}",
        run.reconnects
    );
    assert_eq!(
        run.duplicates, 0,
        "no connection lost, so no publish repeated"
    );
    assert!(
        !run.hand_back_routing,
        "with a client-id suffix every client-id is the worker's own: nothing to route"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_with_suffix_one_connection_each() {
    let run = fleet(2, true, 5000).await;
    assert_clean(&run, 2, 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_with_suffix_one_connection_each() {
    let run = fleet(4, true, 5000).await;
    assert_clean(&run, 4, 5000);
}

/// The pool's backoff after quick losses keeps the fight from becoming a storm: measured about 5
/// connections per worker over a 5,000-job burst; more than 15 per worker fails. And the fight
/// must not fail the jobs wholesale: measured 100 % answered 0 with 2 workers, 96.8 % with 4;
/// under 90 % fails (a run where most jobs fail proves nothing about lost messages).
fn assert_fight_bounded(run: &FleetRun, workers: usize, jobs: usize) {
    let published = run.codes.get(&0).copied().unwrap_or(0);
    assert!(
        published * 10 >= jobs * 9,
        "only {published} of {jobs} jobs answered 0: {:?}",
        run.codes
    );
    assert!(
        run.connections <= 15 * workers,
        "{} connections for {workers} workers (reconnects {:?})",
        run.connections,
        run.reconnects
    );
    assert!(
        run.hand_back_routing,
        "workers sharing a client-id route hand-backs to its holder"
    );
}

/// Without a suffix, every connection a worker opens takes the client-id from another worker's.
/// No job may be lost (each answered once; each answered 0 received); the reconnects and the
/// non-zero codes are printed; the connections are loosely bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_sharing_a_client_id_lose_no_job() {
    let run = fleet(2, false, 5000).await;
    assert_fight_bounded(&run, 2, 5000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_sharing_a_client_id_lose_no_job() {
    let run = fleet(4, false, 5000).await;
    assert_fight_bounded(&run, 4, 5000);
}
