//! Fault injection on the RabbitMQ side, against the machine's real RabbitMQ and real Mosquitto
//! brokers owned by each test. One test per promise of SPEC.md "Delivery":
//!
//! - a connection closed by the server is reopened by the worker itself, and no job is lost;
//! - while RabbitMQ refuses connections (a [`TcpProxy`] in front of it) the worker is alive but
//!   not ready, jobs wait in the queue, and it reconnects with backoff;
//! - SIGTERM with 200 jobs in flight: stop consuming, finish them, exit 0, leave the rest queued;
//! - a `reply_to` queue that no longer exists does not make the job loop;
//! - a job left unacknowledged by a crashed consumer is redelivered and answered once;
//! - an invalid job is dead-lettered where the queue has a dead-letter exchange, a valid one not.
//!
//! Every test uses its own queues (`unique_name`), so they run in parallel with each other and
//! with other test files sharing the RabbitMQ. RabbitMQ itself is never stopped.

mod common;

use common::worker::{
    RunningWorker, connectors_dir, job, metric_sum, spawn_worker, spawn_worker_with, with,
};
use common::*;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use mqtt_connector::worker::WorkerOptions;
use rumqttc::QoS;
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::time::Instant;

const T: Duration = Duration::from_secs(20);
/// How long to keep listening after the last expected reply, to catch duplicates.
const QUIET: Duration = Duration::from_millis(500);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// What every test here starts from, named after `name`: its own Mosquitto, the topic
/// (`NAME-…`) and MQTT client id (`NAME-client-…`) of its jobs, a RabbitMQ connection, and the
/// name of its request queue (`jobs-NAME-…`).
async fn setup(name: &str) -> (Mosquitto, String, String, Amqp, String) {
    let broker = Mosquitto::plain();
    let topic = unique_name(name);
    let client_id = unique_name(&format!("{name}-client"));
    let amqp = Amqp::connect().await;
    let queue = unique_name(&format!("jobs-{name}"));
    (broker, topic, client_id, amqp, queue)
}

/// A job to `broker` whose content and correlation id are both `id`; every job of a test shares
/// `client_id`, so the worker reuses one MQTT connection.
fn job_for(broker: &str, topic: &str, client_id: &str, id: &str, timeout_ms: u64) -> Vec<u8> {
    with(
        job(broker, topic, id),
        json!({"client-id": client_id, "timeout": timeout_ms}),
    )
    .to_string()
    .into_bytes()
}

/// Replies counted by correlation id.
#[derive(Default, Debug)]
struct Answers {
    count: BTreeMap<String, usize>,
    exit_codes: BTreeMap<String, i64>,
}

impl Answers {
    fn duplicates(&self) -> Vec<(&String, &usize)> {
        self.count.iter().filter(|(_, n)| **n > 1).collect()
    }
}

/// Reads replies until every id of `expected` has one (panics after `within`, naming what is
/// missing), then keeps reading for [`QUIET`] to catch duplicates. A reply with an id outside
/// `expected` panics.
async fn collect_answers(
    replies: &mut ReplyStream,
    expected: &BTreeSet<String>,
    within: Duration,
) -> Answers {
    let deadline = Instant::now() + within;
    let mut answers = Answers::default();
    let record = |answers: &mut Answers, reply: Reply| {
        let id = reply
            .correlation_id
            .clone()
            .unwrap_or_else(|| panic!("reply without correlation id: {}", reply.body));
        assert!(
            expected.contains(&id),
            "reply for an unknown job {id}: {}",
            reply.body
        );
        *answers.count.entry(id.clone()).or_default() += 1;
        answers.exit_codes.insert(id, reply.exit_code());
    };
    while answers.count.len() < expected.len() {
        let left = deadline.saturating_duration_since(Instant::now());
        match replies.try_reply(left).await {
            Some(reply) => record(&mut answers, reply),
            None => {
                let missing: Vec<_> = expected
                    .iter()
                    .filter(|id| !answers.count.contains_key(*id))
                    .take(5)
                    .collect();
                panic!(
                    "{} of {} jobs answered within {within:?}; missing e.g. {missing:?}",
                    answers.count.len(),
                    expected.len()
                );
            }
        }
    }
    while let Some(reply) = replies.try_reply(QUIET).await {
        record(&mut answers, reply);
    }
    answers
}

/// Polls `GET /metrics` until `metric_sum(name)` satisfies `pred`; panics after `within`.
async fn wait_metric(addr: SocketAddr, name: &str, pred: impl Fn(f64) -> bool, within: Duration) {
    let deadline = Instant::now() + within;
    let mut last = None;
    loop {
        if let Ok((200, text)) = common::http::get(addr, "/metrics").await {
            let value = metric_sum(&text, name);
            if pred(value) {
                return;
            }
            last = Some(value);
        }
        assert!(
            Instant::now() < deadline,
            "{name} on {addr} not as expected within {within:?}; last value {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metric(addr: SocketAddr, name: &str) -> f64 {
    let (status, text) = common::http::get(addr, "/metrics")
        .await
        .expect("GET /metrics");
    assert_eq!(status, 200);
    metric_sum(&text, name)
}

/// `(ready messages, consumers)` of an existing queue.
async fn queue_counts(amqp: &Amqp, name: &str) -> (u32, u32) {
    amqp.queue_counts(name)
        .await
        .unwrap_or_else(|e| panic!("passive declare {name}: {e}"))
}

/// Polls until `(ready, consumers)` of `name` satisfies `pred`; panics after `within`.
async fn wait_queue(amqp: &Amqp, name: &str, pred: impl Fn(u32, u32) -> bool, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let (ready, consumers) = queue_counts(amqp, name).await;
        if pred(ready, consumers) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "queue {name}: {ready} ready, {consumers} consumers after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs `rabbitmqctl ARGS` (off the async threads) and returns its stdout; panics on failure.
async fn rabbitmqctl(args: &[&str]) -> String {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let out = Command::new("rabbitmqctl")
            .args(&args)
            .output()
            .expect("run rabbitmqctl");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    })
    .await
    .expect("rabbitmqctl task")
}

/// `rabbitmqctl LIST -q --no-table-headers KEY VALUE`: the `VALUE` (trimmed) of the first
/// line whose `KEY` is `key`, if any.
async fn rabbitmqctl_lookup(
    list: &str,
    (column, key): (&str, &str),
    value: &str,
) -> Option<String> {
    let lines = rabbitmqctl(&[list, "-q", "--no-table-headers", column, value]).await;
    lines.lines().find_map(|line| {
        let (k, v) = line.split_once('\t')?;
        (k == key).then(|| v.trim().to_string())
    })
}

/// `(pid, name)` of the connection consuming `queue` (found via its channel), if one does.
/// `rabbitmqctl close_connection` takes the pid.
async fn consuming_connection(queue: &str) -> Option<(String, String)> {
    let channel =
        rabbitmqctl_lookup("list_consumers", ("queue_name", queue), "channel_pid").await?;
    let connection = rabbitmqctl_lookup("list_channels", ("pid", &channel), "connection").await?;
    let name = rabbitmqctl_lookup("list_connections", ("pid", &connection), "name").await?;
    Some((connection, name))
}

/// Declares `name` (durable) with `args`, on its own channel.
async fn declare_with_args(amqp: &Amqp, name: &str, args: FieldTable) {
    let ch = amqp.connection.create_channel().await.expect("channel");
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        },
        args,
    )
    .await
    .unwrap_or_else(|e| panic!("declare {name}: {e}"));
    let _ = ch.close(200, "bye".into()).await;
}

// ---------------------------------------------------------------------------------------------
// 1. Connection closed by the server
// ---------------------------------------------------------------------------------------------

/// RabbitMQ closes the worker's connection (`rabbitmqctl close_connection`) while jobs stream
/// in and some are in flight (their MQTT broker hangs behind a stalled proxy for the moment of
/// the cut): `/readyz` goes 503 then 200 again, the consumer runs on a new connection, and every job
/// sent before, during and after gets a reply; only jobs in flight at the cut may be answered
/// twice (reply confirmed, ack lost with the connection): at least once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connection_closed_by_rabbitmq_is_reopened_and_no_job_is_lost() {
    let (broker, topic, client_id, amqp, queue) = setup("cut").await;
    // The MQTT broker hangs for a moment at the cut, so that jobs are in flight when it happens.
    let mqtt_proxy = TcpProxy::start(broker.port()).await;
    let broker_url = format!("tcp://127.0.0.1:{}", mqtt_proxy.port());
    let (reply_queue, mut replies) = amqp.reply_queue().await;
    let dir = connectors_dir();
    let worker = spawn_worker(&queue, dir.path()).await;
    let addr = worker.metrics_addr();

    let send = |ids: &mut BTreeSet<String>, prefix: &str, n: usize| {
        let batch: Vec<String> = (0..n)
            .map(|i| unique_name(&format!("{prefix}{i}")))
            .collect();
        ids.extend(batch.iter().cloned());
        batch
    };
    let mut before = BTreeSet::new();
    for id in send(&mut before, "before", 20) {
        let body = job_for(&broker_url, &topic, &client_id, &id, 10_000);
        amqp.send_job(&queue, &body, Some(&reply_queue), Some(&id))
            .await;
    }
    let answers = collect_answers(&mut replies, &before, T).await;
    assert!(answers.duplicates().is_empty(), "{answers:?}");

    let (old_pid, old) = consuming_connection(&queue)
        .await
        .expect("the worker's consuming connection");
    println!("worker connection: {old} ({old_pid})");

    // Jobs keep coming, one every 5 ms, from another connection, while the cut happens.
    let sent = Arc::new(AtomicUsize::new(0));
    let sender = {
        let (queue, reply_queue, broker, topic, client_id, sent) = (
            queue.clone(),
            reply_queue.clone(),
            broker_url.clone(),
            topic.clone(),
            client_id.clone(),
            sent.clone(),
        );
        tokio::spawn(async move {
            let amqp = Amqp::connect().await;
            let mut ids = BTreeSet::new();
            for i in 0..300 {
                let id = unique_name(&format!("during{i}"));
                let body = job_for(&broker, &topic, &client_id, &id, 10_000);
                amqp.send_job(&queue, &body, Some(&reply_queue), Some(&id))
                    .await;
                ids.insert(id);
                sent.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            ids
        })
    };
    // Watch /readyz closely from now on: the 503 lasts one reconnect backoff (100-200 ms).
    let watcher = tokio::spawn(async move {
        let deadline = Instant::now() + T;
        let mut seen_503 = false;
        while Instant::now() < deadline {
            match common::http::get(addr, "/readyz").await {
                Ok((503, _)) => seen_503 = true,
                Ok((200, _)) if seen_503 => return true,
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        false
    });
    let deadline = Instant::now() + T;
    while sent.load(Ordering::SeqCst) < 60 {
        assert!(Instant::now() < deadline, "sender stuck");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    mqtt_proxy.stall();
    wait_metric(addr, "mqtt_connector_jobs_in_flight", |v| v >= 10.0, T).await;
    rabbitmqctl(&["close_connection", &old_pid, "closed by faults_amqp test"]).await;
    let in_flight_at_cut = metric(addr, "mqtt_connector_jobs_in_flight").await;
    assert!(
        watcher.await.expect("watcher"),
        "/readyz did not go 503 then 200 after the connection was closed"
    );
    mqtt_proxy.resume();
    wait_metric(addr, "mqtt_connector_amqp_consumer_up", |v| v == 1.0, T).await;
    let during = sender.await.expect("sender");
    let (_, new) = consuming_connection(&queue)
        .await
        .expect("a consuming connection after the cut");
    assert_ne!(new, old, "the worker consumes on a new connection");

    let mut after = BTreeSet::new();
    for id in send(&mut after, "after", 20) {
        let body = job_for(&broker_url, &topic, &client_id, &id, 10_000);
        amqp.send_job(&queue, &body, Some(&reply_queue), Some(&id))
            .await;
    }
    let expected: BTreeSet<String> = during.union(&after).cloned().collect();
    let answers = collect_answers(&mut replies, &expected, T).await;
    wait_metric(addr, "mqtt_connector_jobs_in_flight", |v| v == 0.0, T).await;
    wait_queue(&amqp, &queue, |ready, _| ready == 0, T).await;

    let dups = answers.duplicates();
    println!(
        "connection cut: {} jobs during, {} after, {in_flight_at_cut} in flight at the cut, \
         {} answered twice: {dups:?}",
        during.len(),
        after.len(),
        dups.len()
    );
    assert!(
        dups.iter()
            .all(|(id, n)| **n <= 2 && id.starts_with("during")),
        "only jobs in flight at the cut may be answered twice: {dups:?}"
    );
    assert!(
        answers.exit_codes.values().all(|code| *code == 0),
        "every job published: {:?}",
        answers.exit_codes.values().filter(|c| **c != 0).count()
    );
    worker.stop().await;
    amqp.delete_queue(&queue).await;
}

// ---------------------------------------------------------------------------------------------
// 2. RabbitMQ refuses connections for a while
// ---------------------------------------------------------------------------------------------

/// The worker reaches RabbitMQ through a proxy that cuts its connection and then refuses new
/// ones: `/healthz` stays 200, `/readyz` answers 503, jobs published meanwhile stay in the queue,
/// reconnects are spaced by a growing backoff, and once the proxy accepts again the worker
/// consumes again and answers every job exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rabbitmq_refusing_connections_keeps_jobs_queued_until_it_accepts() {
    let (broker, topic, client_id, amqp, queue) = setup("refuse").await;
    let (reply_queue, mut replies) = amqp.reply_queue().await;
    let proxy = TcpProxy::start(5672).await;
    let dir = connectors_dir();
    let url = amqp_url().replace(":5672", &format!(":{}", proxy.port()));
    assert!(url.contains(&proxy.port().to_string()), "proxy in {url}");
    let mut options = WorkerOptions::new(url, queue.clone(), dir.path());
    options.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    let worker = spawn_worker_with(options).await;
    let addr = worker.metrics_addr();

    proxy.refuse();
    proxy.cut();
    common::http::wait_for_status(addr, "/readyz", 503, T).await;
    let refusing_since = Instant::now();
    let (status, _) = common::http::get(addr, "/healthz").await.expect("healthz");
    assert_eq!(status, 200, "/healthz while RabbitMQ refuses");

    let mut ids = BTreeSet::new();
    for i in 0..30 {
        let id = unique_name(&format!("queued{i}"));
        let body = job_for(&broker.url(), &topic, &client_id, &id, 10_000);
        amqp.send_job(&queue, &body, Some(&reply_queue), Some(&id))
            .await;
        ids.insert(id);
    }
    // Three refused reconnects: the worker keeps trying, with delays that grow.
    proxy
        .wait_for(|s| s.refused >= 3, Duration::from_secs(10))
        .await;
    let three_refusals = refusing_since.elapsed();
    assert_eq!(queue_counts(&amqp, &queue).await, (30, 0), "jobs wait");
    assert_eq!(common::http::get(addr, "/readyz").await.unwrap().0, 503);
    assert_eq!(common::http::get(addr, "/healthz").await.unwrap().0, 200);
    assert_eq!(
        metric(addr, "mqtt_connector_amqp_consumer_up").await,
        0.0,
        "consumer down"
    );
    // Delays of 100-200, 200-400 and 400-800 ms: at least 700 ms for three attempts.
    assert!(
        three_refusals >= Duration::from_millis(600),
        "three reconnect attempts in {three_refusals:?}: no backoff"
    );
    assert!(replies.try_reply(Duration::ZERO).await.is_none());

    proxy.accept();
    worker.wait_ready(T).await;
    let answers = collect_answers(&mut replies, &ids, T).await;
    println!(
        "refusing: 3 refused attempts in {three_refusals:?}; {} total refused; answers {}",
        proxy.stats().refused,
        answers.count.len()
    );
    assert!(
        answers.duplicates().is_empty(),
        "{:?}",
        answers.duplicates()
    );
    assert!(answers.exit_codes.values().all(|c| *c == 0), "{answers:?}");
    wait_queue(&amqp, &queue, |ready, _| ready == 0, T).await;
    worker.stop().await;
    amqp.delete_queue(&queue).await;
}

// ---------------------------------------------------------------------------------------------
// 3. SIGTERM with 200 jobs in flight
// ---------------------------------------------------------------------------------------------

/// A worker process on `queue` with `/metrics` on `metrics`, `prefetch` and a grace period of
/// `grace_s` seconds.
fn start_child_worker(
    queue: &str,
    connectors: &Path,
    metrics: SocketAddr,
    prefetch: u16,
    grace_s: u64,
) -> ChildWorker {
    ChildWorker::command(&amqp_url(), queue, connectors)
        .metrics_addr(metrics)
        .env("MQTT_CONNECTOR_PREFETCH", prefetch.to_string())
        .env("MQTT_CONNECTOR_GRACE_PERIOD", grace_s.to_string())
        .env("RUST_LOG", "info")
        .spawn()
}

/// A worker process holds 200 jobs (prefetch 200) whose MQTT broker hangs (a stalled proxy in
/// front of Mosquitto) and 50 more wait in the queue. SIGTERM: it cancels its consumer at once
/// (the 50 stay queued), finishes the 200 once the broker answers again, and exits 0 within its
/// grace period. A second worker then answers the 50. Every job: exactly one reply, one MQTT
/// message; the queue ends empty.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_with_200_jobs_in_flight_finishes_them_and_exits_0() {
    const IN_FLIGHT: usize = 200;
    const QUEUED: usize = 50;
    const GRACE_S: u64 = 20;
    let (broker, topic, client_id, amqp, queue) = setup("term").await;
    let proxy = TcpProxy::start(broker.port()).await;
    let broker_url = format!("tcp://127.0.0.1:{}", proxy.port());
    let mut sub = Subscriber::start(broker.port(), &topic, QoS::AtLeastOnce).await;
    let (reply_queue, mut replies) = amqp.reply_queue().await;
    amqp.declare_job_queue(&queue).await;
    let dir = connectors_dir();
    let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();

    proxy.stall();
    let mut ids = BTreeSet::new();
    for i in 0..IN_FLIGHT + QUEUED {
        let id = unique_name(&format!("term{i}"));
        let body = job_for(&broker_url, &topic, &client_id, &id, 15_000);
        amqp.send_job(&queue, &body, Some(&reply_queue), Some(&id))
            .await;
        ids.insert(id);
    }
    let mut child = start_child_worker(&queue, dir.path(), metrics, IN_FLIGHT as u16, GRACE_S);
    common::http::wait_for_status(metrics, "/readyz", 200, T).await;
    wait_metric(
        metrics,
        "mqtt_connector_jobs_in_flight",
        |v| v == IN_FLIGHT as f64,
        T,
    )
    .await;
    assert_eq!(queue_counts(&amqp, &queue).await, (QUEUED as u32, 1));
    assert!(replies.try_reply(Duration::ZERO).await.is_none());

    let term_at = Instant::now();
    child.signal("TERM");
    // It stops consuming at once, while its 200 jobs are still stuck.
    wait_queue(&amqp, &queue, |_, consumers| consumers == 0, T).await;
    assert_eq!(
        common::http::get(metrics, "/readyz").await.unwrap().0,
        503,
        "not ready while draining"
    );
    assert_eq!(
        common::http::get(metrics, "/healthz").await.unwrap().0,
        200,
        "alive while draining"
    );
    assert_eq!(
        metric(metrics, "mqtt_connector_jobs_in_flight").await,
        IN_FLIGHT as f64,
        "still holding its jobs when the consumer is cancelled"
    );
    proxy.resume();

    let deadline = term_at + Duration::from_secs(GRACE_S + 5);
    let exit = loop {
        if let Some(status) = child.try_wait() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "worker still running {GRACE_S} s + 5 s after SIGTERM; log:\n{}",
            child.tail(30)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let drained_in = term_at.elapsed();
    assert!(
        exit.success(),
        "exit status {exit}; log:\n{}",
        child.tail(30)
    );
    assert!(
        drained_in < Duration::from_secs(GRACE_S),
        "exited after {drained_in:?}"
    );
    let first_log = child.output();

    // The first worker's answers, then the rest from a second worker.
    let mut first: BTreeMap<String, usize> = BTreeMap::new();
    while let Some(reply) = replies.try_reply(Duration::from_millis(200)).await {
        assert_eq!(reply.exit_code(), 0, "{}", reply.body);
        *first
            .entry(reply.correlation_id.clone().expect("correlation id"))
            .or_default() += 1;
    }
    assert_eq!(
        first.len(),
        IN_FLIGHT,
        "the first worker finished all its jobs before exiting; log tail:\n{}",
        child.tail(30)
    );
    assert_eq!(queue_counts(&amqp, &queue).await, (QUEUED as u32, 0));
    let second = spawn_worker(&queue, dir.path()).await;
    let rest: BTreeSet<String> = ids
        .iter()
        .filter(|id| !first.contains_key(*id))
        .cloned()
        .collect();
    assert_eq!(rest.len(), QUEUED);
    let answers = collect_answers(&mut replies, &rest, T).await;
    wait_queue(&amqp, &queue, |ready, _| ready == 0, T).await;
    wait_metric(
        second.metrics_addr(),
        "mqtt_connector_jobs_in_flight",
        |v| v == 0.0,
        T,
    )
    .await;

    let dups_first = first.values().filter(|n| **n > 1).count();
    let dups_second = answers.duplicates().len();
    println!(
        "sigterm: drained {IN_FLIGHT} jobs and exited 0 in {drained_in:?}; second worker \
         answered {}; duplicates {dups_first} + {dups_second}",
        answers.count.len()
    );
    assert_eq!(dups_first + dups_second, 0, "no job answered twice");
    assert!(answers.exit_codes.values().all(|c| *c == 0), "{answers:?}");
    let received = sub.collect(IN_FLIGHT + QUEUED, T).await;
    let contents: BTreeSet<String> = received.iter().map(|r| r.payload_str()).collect();
    assert_eq!(contents, ids, "every job published");
    assert!(
        first_log.contains("stopped"),
        "the first worker logged its stop:\n{}",
        first_log
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
    second.stop().await;
    amqp.delete_queue(&queue).await;
}

// ---------------------------------------------------------------------------------------------
// 4. reply_to names a queue that no longer exists
// ---------------------------------------------------------------------------------------------

/// A job whose `reply_to` queue was deleted is run once and settled without its reply: RabbitMQ
/// returns the unroutable reply, the worker tries it again for the reply window (30 s, the queue
/// may come back), then counts it lost; it never requeues (that would publish the job again).
/// The next job is answered normally on the same channel meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reply_to_a_deleted_queue_does_not_loop() {
    let (broker, topic, client_id, amqp, queue) = setup("gone").await;
    let mut sub = Subscriber::start(broker.port(), &topic, QoS::AtLeastOnce).await;
    let (reply_queue, mut replies) = amqp.reply_queue().await;
    let gone = unique_name("gone-reply");
    amqp.declare_job_queue(&gone).await;
    amqp.delete_queue(&gone).await;
    assert_eq!(amqp.queue_message_count(&gone).await, None, "deleted");

    let dir = connectors_dir();
    let worker = spawn_worker(&queue, dir.path()).await;
    let addr = worker.metrics_addr();
    let body = job_for(&broker.url(), &topic, &client_id, "to-nowhere", 5000);
    amqp.send_job(&queue, &body, Some(&gone), Some("to-nowhere"))
        .await;

    let got = sub.expect(T).await;
    assert_eq!(got.payload_str(), "to-nowhere");
    wait_metric(addr, "mqtt_connector_jobs_total", |v| v >= 1.0, T).await;

    // While the lost reply is retried, the next job is answered on the same channel.
    let body = job_for(&broker.url(), &topic, &client_id, "next", 5000);
    amqp.send_job(&queue, &body, Some(&reply_queue), Some("next"))
        .await;
    let reply = replies.expect_reply(T).await;
    assert_eq!(reply.correlation_id.as_deref(), Some("next"));
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    assert_eq!(sub.expect(T).await.payload_str(), "next");

    let window = Duration::from_secs(40);
    wait_metric(
        addr,
        "mqtt_connector_replies_lost_total",
        |v| v == 1.0,
        window,
    )
    .await;
    wait_metric(addr, "mqtt_connector_jobs_in_flight", |v| v == 0.0, T).await;
    assert_eq!(amqp.queue_message_count(&queue).await, Some(0));
    assert_eq!(
        sub.recv(QUIET).await,
        None,
        "the job ran once, not again and again"
    );
    assert_eq!(metric(addr, "mqtt_connector_jobs_total").await, 2.0);
    assert_eq!(amqp.queue_message_count(&gone).await, None, "not recreated");
    assert_eq!(amqp.queue_message_count(&queue).await, Some(0));
    worker.stop().await;
    amqp.delete_queue(&queue).await;
}

// ---------------------------------------------------------------------------------------------
// 5. A reply RabbitMQ nacks: tests/replies.rs (the job is published once and settled without
//    its reply after the reply window, never run again).
// ---------------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------------
// 6. A job redelivered after a consumer crashed
// ---------------------------------------------------------------------------------------------

/// A plain consumer takes the job and never acks it, then its channel closes (a crashed worker):
/// RabbitMQ redelivers it (`redelivered`) to the worker, which answers it exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_left_unacked_by_a_crashed_consumer_is_answered_once() {
    let (broker, topic, client_id, amqp, queue) = setup("redeliver").await;
    let mut sub = Subscriber::start(broker.port(), &topic, QoS::AtLeastOnce).await;
    let (reply_queue, mut replies) = amqp.reply_queue().await;
    amqp.declare_job_queue(&queue).await;
    let body = job_for(&broker.url(), &topic, &client_id, "crashed", 5000);
    amqp.send_job(&queue, &body, Some(&reply_queue), Some("crashed"))
        .await;

    let crashed = amqp.connection.create_channel().await.expect("channel");
    let mut consumer = crashed
        .basic_consume(
            queue.as_str().into(),
            "crashing-worker".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let delivery = tokio::time::timeout(T, futures_lite::StreamExt::next(&mut consumer))
        .await
        .expect("delivery within 20 s")
        .expect("consumer open")
        .expect("delivery");
    assert!(!delivery.redelivered);
    assert_eq!(delivery.data, body);
    assert_eq!(queue_counts(&amqp, &queue).await, (0, 1), "held, unacked");
    crashed
        .close(200, "crash".into())
        .await
        .expect("close channel");
    wait_queue(&amqp, &queue, |ready, _| ready == 1, T).await;

    let dir = connectors_dir();
    let worker = spawn_worker(&queue, dir.path()).await;
    let reply = replies.expect_reply(T).await;
    assert_eq!(reply.correlation_id.as_deref(), Some("crashed"));
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    assert_eq!(sub.expect(T).await.payload_str(), "crashed");
    wait_metric(
        worker.metrics_addr(),
        "mqtt_connector_jobs_in_flight",
        |v| v == 0.0,
        T,
    )
    .await;
    replies.expect_no_reply(QUIET).await;
    assert_eq!(sub.recv(Duration::ZERO).await, None, "published once");
    assert_eq!(amqp.queue_message_count(&queue).await, Some(0));
    worker.stop().await;
    assert_eq!(
        amqp.queue_message_count(&queue).await,
        Some(0),
        "acked: not back in the queue after the worker closed its connection"
    );
    amqp.delete_queue(&queue).await;
}

// ---------------------------------------------------------------------------------------------
// 7. Dead-lettering
// ---------------------------------------------------------------------------------------------

/// On a request queue with a dead-letter exchange, an invalid job (exit-code 1) is answered
/// and dead-lettered; a valid job is answered and acked, not dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn invalid_job_is_answered_and_dead_lettered_valid_job_is_not() {
    let (broker, topic, client_id, amqp, queue) = setup("dlx").await;
    let (reply_queue, mut replies) = amqp.reply_queue().await;
    let dlq = unique_name("dlq");
    amqp.declare_job_queue(&dlq).await;
    let mut args = FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(dlq.as_str().into()),
    );
    declare_with_args(&amqp, &queue, args).await;
    let dir = connectors_dir();
    let worker: RunningWorker = spawn_worker(&queue, dir.path()).await;
    let addr = worker.metrics_addr();

    let invalid = br#"{"action": "send", "topic": "t", "no-such-key": 1}"#;
    amqp.send_job(&queue, invalid, Some(&reply_queue), Some("invalid"))
        .await;
    let reply = replies.expect_reply(T).await;
    assert_eq!(reply.correlation_id.as_deref(), Some("invalid"));
    assert_eq!(reply.exit_code(), 1, "{}", reply.body);
    wait_queue(&amqp, &dlq, |ready, _| ready == 1, T).await;

    let body = job_for(&broker.url(), &topic, &client_id, "valid", 5000);
    amqp.send_job(&queue, &body, Some(&reply_queue), Some("valid"))
        .await;
    let reply = replies.expect_reply(T).await;
    assert_eq!(reply.correlation_id.as_deref(), Some("valid"));
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    wait_metric(addr, "mqtt_connector_jobs_in_flight", |v| v == 0.0, T).await;
    assert_eq!(metric(addr, "mqtt_connector_jobs_total").await, 2.0);
    assert_eq!(amqp.queue_message_count(&queue).await, Some(0));
    replies.expect_no_reply(QUIET).await;
    assert_eq!(
        amqp.queue_message_count(&dlq).await,
        Some(1),
        "only the invalid job"
    );
    let dead = amqp.get_message(&dlq).await.expect("dead-lettered job");
    assert_eq!(dead.body, invalid);
    assert_eq!(
        dead.properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str()),
        Some("invalid")
    );
    let death = dead
        .properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get("x-death").cloned());
    let reason = match &death {
        Some(AMQPValue::FieldArray(deaths)) => match deaths.as_slice().first() {
            Some(AMQPValue::FieldTable(first)) => match first.inner().get("reason") {
                Some(AMQPValue::LongString(reason)) => {
                    String::from_utf8_lossy(reason.as_bytes()).into_owned()
                }
                _ => String::new(),
            },
            _ => String::new(),
        },
        _ => String::new(),
    };
    assert_eq!(reason, "rejected", "x-death: {death:?}");
    worker.stop().await;
    amqp.delete_queue(&queue).await;
    amqp.delete_queue(&dlq).await;
}
