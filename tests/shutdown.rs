//! Shutdown and lost sessions (SPEC.md "Delivery": SIGTERM, lost AMQP sessions): a worker
//! process whose MQTT broker stopped acknowledging exits 0 within `--grace-period` + 5 s of
//! SIGTERM, every job is answered exactly once across it and the worker started after it, and
//! neither start nor stop logs an ERROR line; a worker that loses its AMQP session cancels that
//! session's jobs at once; a grace period of u64::MAX seconds does not panic.

mod common;

use common::worker::{connectors_dir, job, metric_sum, spawn_worker_with, with};
use common::*;
use mqtt_connector::worker::WorkerOptions;
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

const GRACE_S: u64 = 3;
const PREFETCH: usize = 20;
const JOBS: usize = 30;

fn error_lines(log: &str) -> Vec<&str> {
    log.lines()
        .filter(|line| line.contains(" ERROR "))
        .collect()
}

async fn wait_in_flight(metrics: impl AsyncFn() -> String, n: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let value = metric_sum(&metrics().await, "mqtt_connector_jobs_in_flight");
        if value == n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "jobs_in_flight {value}, expected {n}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_stalled_acknowledgements_exits_0_in_time_and_the_next_worker_answers_every_job_once()
 {
    let mut broker = Mosquitto::plain();
    let amqp = Amqp::connect().await;
    // A queue that does not exist yet: the worker's first start declares it.
    let queue = unique_name("jobs-term");
    let (reply_queue, mut replies) = amqp.reply_queue().await;
    let dir = connectors_dir();
    let start = |dir: &std::path::Path| {
        ChildWorker::command(&amqp_url(), &queue, dir)
            .env("MQTT_CONNECTOR_PREFETCH", PREFETCH.to_string())
            .env("MQTT_CONNECTOR_GRACE_PERIOD", GRACE_S.to_string())
            .env("RUST_LOG", "info")
            .spawn()
    };
    let mut first = start(dir.path());
    first.wait_ready(Duration::from_secs(20)).await;

    // The broker stops answering (SIGSTOP): every publish waits for its acknowledgement.
    broker.freeze();
    let client_id = unique_name("term");
    let topic = unique_name("term");
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
    wait_in_flight(|| first.metrics(), PREFETCH as f64, Duration::from_secs(20)).await;

    let signalled = Instant::now();
    first.signal("TERM");
    let status = first.wait_exit(Duration::from_secs(GRACE_S + 15)).await;
    let took = signalled.elapsed();
    println!(
        "SIGTERM with {PREFETCH} jobs stalled: exit {status:?} after {took:?} (grace {GRACE_S} s)"
    );
    assert!(
        status.success(),
        "exit status {status:?}:\n{}",
        first.tail(40)
    );
    assert!(
        took <= Duration::from_secs(GRACE_S + 5),
        "exited {took:?} after SIGTERM, grace {GRACE_S} s"
    );
    assert_eq!(
        replies
            .try_reply(Duration::from_millis(200))
            .await
            .map(|r| r.body),
        None,
        "a stalled job was answered by the worker that was stopped"
    );

    broker.thaw();
    let mut second = start(dir.path());
    second.wait_ready(Duration::from_secs(20)).await;
    let mut answers: BTreeMap<String, i64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while answers.len() < JOBS {
        let left = deadline.saturating_duration_since(Instant::now());
        let reply = replies.expect_reply(left).await;
        let id = reply.correlation_id.clone().unwrap_or_default();
        assert!(
            answers.insert(id.clone(), reply.exit_code()).is_none(),
            "{id} answered twice"
        );
    }
    replies.expect_no_reply(Duration::from_secs(1)).await;
    assert!(answers.values().all(|code| *code == 0), "{answers:?}");
    let stopped = Instant::now();
    let (status, second_log) = second.stop_with_output().await;
    println!(
        "idle worker: exit {status:?} {:?} after SIGTERM",
        stopped.elapsed()
    );
    assert!(status.success());
    let first_log = first.output();
    let errors: Vec<&str> = error_lines(&first_log)
        .into_iter()
        .chain(error_lines(&second_log))
        .collect();
    assert!(
        errors.is_empty(),
        "ERROR lines in a normal start and stop:\n{}",
        errors.join("\n")
    );
    assert_eq!(amqp.queue_message_count(&queue).await, Some(0));
    amqp.delete_queue(&queue).await;
}

/// A worker whose AMQP connection is cut cancels that session's jobs at once (RabbitMQ
/// redelivers them): they do not go on to publish after their broker answers again. Once it
/// consumes again, each job is answered exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_amqp_session_cancels_its_jobs_at_once_and_each_is_answered_once_later() {
    let mut broker = Mosquitto::plain();
    let amqp = Amqp::connect().await;
    let rabbit_port: u16 = amqp_url()
        .rsplit(':')
        .next()
        .and_then(|tail| tail.split('/').next()?.parse().ok())
        .unwrap_or(5672);
    let proxy = TcpProxy::start(rabbit_port).await;
    let queue = unique_name("jobs-lost");
    amqp.declare_job_queue(&queue).await;
    let (reply_queue, mut replies) = amqp.reply_queue().await;
    let dir = connectors_dir();
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", proxy.port());
    let mut options = WorkerOptions::new(url, queue.clone(), dir.path());
    options.metrics_addr = Some("127.0.0.1:0".parse().expect("address"));
    options.prefetch = 10;
    let worker = spawn_worker_with(options).await;
    let topic = unique_name("lost");
    let mut sub = Subscriber::start(broker.port(), &topic, rumqttc::QoS::AtLeastOnce).await;
    broker.freeze();
    let client_id = unique_name("lost");
    for i in 0..10 {
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
    wait_in_flight(|| worker.metrics(), 10.0, Duration::from_secs(20)).await;
    let cut = Instant::now();
    proxy.refuse();
    proxy.cut();
    wait_in_flight(|| worker.metrics(), 0.0, Duration::from_secs(10)).await;
    println!(
        "session lost: its 10 jobs cancelled within {:?}",
        cut.elapsed()
    );
    broker.thaw();
    proxy.accept();
    let mut answers: BTreeMap<String, i64> = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while answers.len() < 10 {
        let left = deadline.saturating_duration_since(Instant::now());
        let reply = replies.expect_reply(left).await;
        let id = reply.correlation_id.clone().unwrap_or_default();
        assert!(
            answers.insert(id.clone(), reply.exit_code()).is_none(),
            "{id} answered twice"
        );
    }
    replies.expect_no_reply(Duration::from_secs(1)).await;
    assert!(answers.values().all(|code| *code == 0), "{answers:?}");
    let _ = sub.drain();
    worker.stop().await;
    amqp.delete_queue(&queue).await;
}

/// `--grace-period` of u64::MAX seconds: the deadline cannot be computed, the worker waits for
/// its jobs' own ends instead of panicking ("overflow when adding duration to instant").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grace_period_of_u64_max_seconds_stops_without_panicking() {
    let queue = unique_name("jobs-forever");
    let dir = connectors_dir();
    let mut options = WorkerOptions::new(amqp_url(), queue.clone(), dir.path());
    options.metrics_addr = Some("127.0.0.1:0".parse().expect("address"));
    options.grace_period = Duration::from_secs(u64::MAX);
    let worker = spawn_worker_with(options).await;
    let stopped = Instant::now();
    worker.stop().await;
    assert!(stopped.elapsed() < Duration::from_secs(10));
    Amqp::connect().await.delete_queue(&queue).await;
}
