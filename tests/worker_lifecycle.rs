//! The worker's own housekeeping: one shutdown deadline after which running jobs are cancelled
//! (they publish nothing later and RabbitMQ redelivers them), sessions that end leave no
//! connection open, and every log line of a job carries its correlation id.

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::worker::{metric_sum, spawn_worker, spawn_worker_with};
use common::{Amqp, Mosquitto, Subscriber, TcpProxy, unique_name};
use mqtt_connector::worker::WorkerOptions;
use rumqttc::QoS;

const T: Duration = Duration::from_secs(20);

/// Log lines of this test process, captured at debug level for the library.
fn captured_logs() -> Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        let _ = tracing_subscriber::fmt()
            .with_env_filter("mqtt_connector=debug")
            .with_ansi(false)
            .with_writer(move || Sink(Arc::clone(&sink)))
            .try_init();
        logs
    })
    .clone()
}

struct Sink(Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

async fn wait_in_flight(worker: &common::worker::RunningWorker, n: f64) {
    let deadline = tokio::time::Instant::now() + T;
    while metric_sum(&worker.metrics().await, "mqtt_connector_jobs_in_flight") != n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {n} job(s) in flight"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_has_one_deadline_then_cancels_running_jobs() {
    const GRACE: Duration = Duration::from_secs(2);
    let mosquitto = Mosquitto::plain();
    let proxy = TcpProxy::start(mosquitto.port()).await;
    let topic = unique_name("late");
    let mut subscriber = Subscriber::start(mosquitto.port(), &topic, QoS::AtLeastOnce).await;
    let amqp = Amqp::connect().await;
    let queue = unique_name("late-jobs");
    amqp.declare_job_queue(&queue).await;
    let (reply_queue, mut replies) = amqp.reply_queue().await;
    let connectors = common::worker::connectors_dir();
    let mut options = WorkerOptions::new(common::amqp_url(), queue.as_str(), connectors.path());
    options.metrics_addr = Some("127.0.0.1:0".parse().expect("addr"));
    options.grace_period = GRACE;
    let worker = spawn_worker_with(options).await;

    // A job stuck on a broker that does not answer (yet), with a timeout far beyond the grace.
    proxy.stall();
    let job = serde_json::json!({"broker": format!("tcp://127.0.0.1:{}", proxy.port()),
        "client-id": unique_name("late"), "topic": topic, "content": "too late", "qos": 1,
        "timeout": 30_000});
    amqp.send_job(
        &queue,
        job.to_string().as_bytes(),
        Some(&reply_queue),
        Some("late-1"),
    )
    .await;
    wait_in_flight(&worker, 1.0).await;

    let asked = Instant::now();
    worker.stop().await;
    let took = asked.elapsed();
    eprintln!("shutdown with a stuck job took {took:?} (grace {GRACE:?})");
    assert!(
        took < GRACE + Duration::from_millis(1500),
        "one deadline: stopped after {took:?}, grace {GRACE:?}"
    );
    // The broker answers again: the cancelled job must not publish now, nor reply.
    proxy.resume();
    assert!(
        subscriber.recv(Duration::from_secs(3)).await.is_none(),
        "a cancelled job published after shutdown"
    );
    replies.expect_no_reply(Duration::from_millis(100)).await;
    // It was not settled: RabbitMQ has it back for the next worker.
    let deadline = tokio::time::Instant::now() + T;
    while amqp.queue_message_count(&queue).await != Some(1) {
        assert!(tokio::time::Instant::now() < deadline, "job not requeued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    amqp.delete_queue(&queue).await;
}

/// The connections RabbitMQ lists for the worker consuming `queue` (named after it).
fn worker_connections(queue: &str) -> usize {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "client_properties"])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|line| line.contains(&format!("mqtt-connector worker {queue}")))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_that_ends_leaves_no_connection_open() {
    let amqp = Amqp::connect().await;
    let connectors = common::worker::connectors_dir();
    let queue = unique_name("cancelled");
    let worker = spawn_worker(&queue, connectors.path()).await;
    for round in 1..=3 {
        // RabbitMQ cancels the consumer: the session ends while its connection still works.
        amqp.delete_queue(&queue).await;
        let deadline = tokio::time::Instant::now() + T;
        while !matches!(amqp.queue_counts(&queue).await, Ok((_, 1))) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "not consuming again (round {round})"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let open = worker_connections(&queue);
        if open == 1 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{open} connections open after three sessions ended (one expected)"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    worker.stop().await;
    amqp.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_log_line_of_a_job_carries_its_correlation_id() {
    let logs = captured_logs();
    let mut bed = common::worker::TestBed::new().await;
    // Nothing listens there: the job retries until its timeout, logging each retry.
    let closed = common::free_port();
    let job = serde_json::json!({"broker": format!("tcp://127.0.0.1:{closed}"),
        "client-id": unique_name("logged"), "topic": "t", "content": "x", "qos": 1,
        "timeout": 1500});
    let reply = bed.run(job, T).await;
    assert_eq!(reply.exit_code(), 3, "{}", reply.body);
    let correlation_id = reply.correlation_id.clone().expect("correlation id");
    let text =
        String::from_utf8_lossy(&logs.lock().unwrap_or_else(|e| e.into_inner())).into_owned();
    let job_lines: Vec<&str> = text
        .lines()
        .filter(|line| line.contains(&format!("127.0.0.1:{closed}")))
        .collect();
    assert!(
        job_lines.iter().any(|line| line.contains("will retry")),
        "retries were logged: {text}"
    );
    for line in &job_lines {
        assert!(
            line.contains(&correlation_id),
            "a line of the job without its correlation id: {line}"
        );
    }
    bed.finish().await;
}
