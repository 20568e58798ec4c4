//! Scaling out fails nothing: 2, 4 and 8 workers started with the same options share one
//! connector, hence one MQTT client-id, against a private Mosquitto. MQTT lets one connection
//! hold a client-id, so the workers would take it from each other; a worker whose working
//! connection is taken over yields the client-id and hands its jobs to the worker holding it
//! (through a queue of that client-id's own, see `amqp::held`). Every job is answered 0, every
//! message is received, and the broker's log shows fewer than 20 takeovers per run of 2,000
//! jobs with 2 and 4 workers, fewer than 35 with 8, fewer than 10 for 3 workers under a steady
//! load (also when the holder stops half-way).

mod common;
mod mqtt_support;

use common::worker::{RunningWorker, connectors_dir, metric_sum, spawn_worker_with};
use common::*;
use mqtt_connector::amqp::queue::QueueType;
use mqtt_connector::worker::WorkerOptions;
use mqtt_support::{Replies, UNLIMITED_QUEUES, job_and_reply_queues, reconfigure, send_burst};
use rumqttc::QoS;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;
use tokio::time::Instant;

const JOBS: usize = 2000;

/// How the jobs come: all at once, or at a steady rate (where a job lands on any worker, one
/// at a time: the case in which hand-backs through the request queue kept missing the holder).
#[derive(Clone, Copy)]
enum Load {
    Burst,
    Steady {
        jobs: usize,
        per_second: u64,
        /// Half-way through, stop the worker holding the client-id.
        stop_holder: bool,
    },
}

impl Load {
    fn jobs(self) -> usize {
        match self {
            Load::Burst => JOBS,
            Load::Steady { jobs, .. } => jobs,
        }
    }
}

/// Mosquitto logs one line per takeover: "Client X already connected, closing old connection."
fn takeovers(log: &str) -> usize {
    log.lines()
        .filter(|line| line.contains("already connected, closing old connection"))
        .count()
}

/// `max_takeovers`: the bound the broker's log must stay under. `quorum`: the workers declare
/// the request queue as a quorum queue whose delivery limit dead-letters a job at its first
/// return, into a dead-letter queue the test reads: a job handed back by a nack (or returned by
/// any stray redelivery) lands there, one republished as a new message does not. Returns how
/// many jobs were handed back.
async fn shared_client_id(workers: usize, max_takeovers: usize, quorum: bool, load: Load) -> f64 {
    let jobs = load.jobs();
    let mut broker = Mosquitto::plain();
    reconfigure(&mut broker, UNLIMITED_QUEUES);
    let topic = unique_name("shared");
    let mut subscriber = Subscriber::start(broker.port(), &topic, QoS::AtLeastOnce).await;
    let connectors = connectors_dir();
    write_connector(
        connectors.path(),
        "shared",
        json!({"broker": broker.url(), "client-id": unique_name("shared"), "topic": topic,
               "qos": 1, "timeout": 20000}),
    );
    let (amqp, classic_queue, reply_queue, mut replies) = job_and_reply_queues().await;
    // A quorum queue is declared by the workers themselves (a missing queue).
    let queue = if quorum {
        unique_name("quorum-jobs")
    } else {
        classic_queue.clone()
    };
    let dead_letters = unique_name("quorum-dead");
    let mut running: Vec<RunningWorker> = Vec::new();
    for _ in 0..workers {
        // The same options for every worker: no client-id suffix.
        let mut options = WorkerOptions::new(amqp_url(), queue.clone(), connectors.path());
        options.metrics_addr = Some("127.0.0.1:0".parse().expect("addr"));
        if quorum {
            options.queue_type = QueueType::Quorum;
            options.delivery_limit = Some(1);
            options.dead_letter_queue = Some(dead_letters.clone());
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
    match load {
        Load::Burst => send_burst(&amqp, &queue, &reply_queue, &bodies).await,
        Load::Steady {
            per_second,
            stop_holder,
            ..
        } => {
            let mut tick = tokio::time::interval(Duration::from_millis(1000 / per_second));
            for (i, (correlation_id, body)) in bodies.iter().enumerate() {
                tick.tick().await;
                if stop_holder && i == jobs / 2 {
                    let mut holder = None;
                    for (index, worker) in running.iter().enumerate() {
                        let connections =
                            metric_sum(&worker.metrics().await, "mqtt_connector_mqtt_connections");
                        if connections > 0.0 {
                            holder = Some(index);
                        }
                    }
                    let holder = holder.expect("a worker holds the client-id half-way");
                    println!("stopping worker {holder}, which holds the client-id");
                    tokio::spawn(running.remove(holder).stop());
                }
                amqp.send_job(&queue, body, Some(&reply_queue), Some(correlation_id))
                    .await;
            }
        }
    }
    let answered = Replies::gather(
        &mut replies,
        jobs,
        Duration::from_secs(120),
        Duration::from_millis(500),
    )
    .await;
    let elapsed = started.elapsed();
    // At least once: a publish whose acknowledgement was lost with a taken-over connection is
    // published again, so count distinct messages until all are in.
    let mut received: HashSet<String> = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while received.len() < jobs && Instant::now() < deadline {
        if let Some(message) = subscriber.recv(Duration::from_millis(500)).await {
            received.insert(message.payload_str());
        }
    }
    let mut deferred = 0.0;
    for worker in &running {
        deferred += metric_sum(
            &worker.metrics().await,
            "mqtt_connector_jobs_deferred_total",
        );
    }
    let takeovers = takeovers(&broker.log());
    println!(
        "{workers} workers sharing a client-id: {jobs} jobs in {elapsed:?}; codes {:?}; \
         {} distinct messages received; {takeovers} takeovers in the broker's log; \
         {deferred} deferrals (jobs handed back to the queue)",
        answered.codes(),
        received.len()
    );
    assert_eq!(answered.total(), jobs, "jobs not answered");
    assert!(answered.answered_twice().is_empty(), "jobs answered twice");
    assert_eq!(
        answered.codes(),
        [(0, jobs)].into_iter().collect(),
        "{:?} {:?} {:?}",
        answered.examples(3, 2),
        answered.examples(6, 2),
        answered.examples(7, 2)
    );
    let missing = (0..jobs)
        .filter(|i| !received.contains(&format!("{run}-{i}")))
        .count();
    assert_eq!(missing, 0, "{missing} messages answered 0 never arrived");
    assert!(
        takeovers < max_takeovers,
        "{takeovers} takeovers for {workers} workers"
    );
    if quorum {
        // Every deferral was a republish: nothing returned to the queue, nothing dead-lettered.
        let dead = amqp.queue_message_count(&dead_letters).await;
        assert_eq!(
            dead,
            Some(0),
            "jobs returned to the quorum queue (nacked or redelivered)"
        );
    }
    for worker in running {
        worker.stop().await;
    }
    amqp.delete_queue(&queue).await;
    if quorum {
        amqp.delete_queue(&classic_queue).await;
        amqp.delete_queue(&dead_letters).await;
    }
    deferred
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_share_a_client_id_without_failures() {
    shared_client_id(2, 20, false, Load::Burst).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_workers_share_a_client_id_without_failures() {
    // Measured 7-11 (10-19 before hand-backs were routed to the holder).
    shared_client_id(4, 20, false, Load::Burst).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_workers_share_a_client_id_without_failures() {
    // Measured 18: the start-up (7 takeovers as the workers connect) and one reconnect per
    // worker after its first loss (a single loss may be a network blip, not a sibling); 30-47
    // before hand-backs were routed to the holder.
    shared_client_id(8, 35, false, Load::Burst).await;
}

/// Three workers under a steady load: each job lands on any of them, and one handed back goes
/// to the worker holding the client-id (its own queue), so the workers stop taking the
/// client-id from each other once they have settled who holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_a_client_id_under_a_steady_load() {
    shared_client_id(
        3,
        10,
        false,
        Load::Steady {
            jobs: 400,
            per_second: 25,
            stop_holder: false,
        },
    )
    .await;
}

/// The worker holding the client-id stops half-way: jobs handed back to it come back through
/// the request queue (nobody consumes its client-id queue any more), and the worker taking one
/// takes the client-id. Nothing fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_share_a_client_id_when_its_holder_stops() {
    shared_client_id(
        3,
        // Measured 6–10 in runs of this test (the holder's stop takes its client-id over once
        // more, and timing decides how often the others then swap it); 33 before hand-backs
        // were routed to the holder.
        15,
        false,
        Load::Steady {
            jobs: 300,
            per_second: 25,
            stop_holder: true,
        },
    )
    .await;
}

/// Jobs handed back between workers are published again, not nacked: on a quorum queue with a
/// delivery limit of 1 (dead-lettered at the first return), none reaches the dead-letter queue
/// however often it is handed back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_handed_back_do_not_count_against_a_quorum_delivery_limit() {
    // A fleet that settles quickly may hand nothing back; such a run proves nothing here, so
    // the burst is run again (on fresh queues) until jobs were handed back.
    for round in 1..=3 {
        if shared_client_id(4, 30, true, Load::Burst).await > 0.0 {
            return;
        }
        eprintln!("round {round}: no job was handed back; again");
    }
    // Every round still checked that all jobs were answered 0 and none was dead-lettered; the
    // republish itself is also unit-tested (amqp::handback).
    eprintln!(
        "no job was handed back in 3 rounds: this run could not tell a republish from a nack"
    );
}

/// `queue`'s client-id queues (`<queue>.held.<key>`) and their consumers, as RabbitMQ lists
/// them.
fn held_queues(queue: &str) -> Vec<(String, u32)> {
    let out = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "list_queues",
            "name",
            "consumers",
            "--no-table-headers",
        ])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|line| {
            let (name, consumers) = line.split_once('\t')?;
            let consumers = consumers.trim().parse().ok()?;
            name.starts_with(&format!("{queue}.held."))
                .then(|| (name.to_owned(), consumers))
        })
        .collect()
}

fn held_queue_consumers(queue: &str) -> Vec<u32> {
    held_queues(queue).into_iter().map(|(_, n)| n).collect()
}

/// Two workers with identical options sharing the connector `shared` (one client-id) on a
/// private Mosquitto, after a first job answered 0: one of them holds the client-id and
/// consumes its queue.
struct SharedPair {
    _broker: Mosquitto,
    _connectors: tempfile::TempDir,
    amqp: Amqp,
    queue: String,
    reply_queue: String,
    replies: ReplyStream,
    running: Vec<RunningWorker>,
}

impl SharedPair {
    async fn start(dead_letters: Option<&str>) -> SharedPair {
        let broker = Mosquitto::plain();
        let connectors = connectors_dir();
        write_connector(
            connectors.path(),
            "shared",
            json!({"broker": broker.url(), "client-id": unique_name("shared"),
                   "topic": unique_name("held"), "qos": 1, "timeout": 20000}),
        );
        let (amqp, queue, reply_queue, mut replies) = job_and_reply_queues().await;
        let mut running = Vec::new();
        for _ in 0..2 {
            let mut options = WorkerOptions::new(amqp_url(), queue.clone(), connectors.path());
            options.metrics_addr = Some("127.0.0.1:0".parse().expect("addr"));
            options.dead_letter_queue = dead_letters.map(str::to_owned);
            running.push(spawn_worker_with(options).await);
        }
        let first = json!({"connector": "shared", "content": "first"}).to_string();
        amqp.send_job(&queue, first.as_bytes(), Some(&reply_queue), Some("first"))
            .await;
        assert_eq!(
            replies
                .expect_reply(Duration::from_secs(20))
                .await
                .exit_code(),
            0
        );
        // Its client-id's queue is consumed once both workers see each other (siblings).
        let deadline = Instant::now() + Duration::from_secs(20);
        while held_queue_consumers(&queue) != [1] {
            assert!(
                Instant::now() < deadline,
                "the holder never consumed its client-id's queue"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        SharedPair {
            _broker: broker,
            _connectors: connectors,
            amqp,
            queue,
            reply_queue,
            replies,
            running,
        }
    }

    /// Publishes `body` to the client-id's queue, as a worker handing a job to its holder does
    /// (through the exchange, with the queue's routing key).
    async fn hand_to_holder(&self, body: &serde_json::Value, correlation_id: &str) {
        let (held_queue, _) = held_queues(&self.queue).remove(0);
        let key = held_queue.rsplit('.').next().expect("key");
        let confirm = self
            .amqp
            .channel
            .basic_publish(
                format!("{}.held", self.queue).as_str().into(),
                key.into(),
                lapin::options::BasicPublishOptions::default(),
                body.to_string().as_bytes(),
                lapin::BasicProperties::default()
                    .with_reply_to(self.reply_queue.as_str().into())
                    .with_correlation_id(correlation_id.into())
                    .with_delivery_mode(2),
            )
            .await
            .expect("publish");
        confirm.await.expect("confirm");
    }

    /// Stops the workers, then deletes the request queue and `also`.
    async fn stop(self, also: &[&str]) {
        for worker in self.running {
            worker.stop().await;
        }
        self.amqp.delete_queue(&self.queue).await;
        for queue in also {
            self.amqp.delete_queue(queue).await;
        }
    }
}

/// A holder that stops keeps consuming its client-id's queue while its own jobs finish, and
/// sends what is handed to it meanwhile on to the request queue (confirmed) rather than leaving
/// it to RabbitMQ's at-most-once dead-lettering after the queue's TTL. Two workers, one holding
/// the client-id; the holder is given a job that waits 6 s for a broker that never answers, then
/// stopped: seconds into its stop its client-id queue still has its consumer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_holder_forwards_what_is_handed_to_it() {
    let mut pair = SharedPair::start(None).await;
    let mut holder = None;
    for (index, worker) in pair.running.iter().enumerate() {
        if metric_sum(&worker.metrics().await, "mqtt_connector_mqtt_connections") > 0.0 {
            holder = Some(index);
        }
    }
    let holder = pair
        .running
        .remove(holder.expect("a worker holds the client-id"));
    // Two jobs to a broker that never answers (6 s each, no client-id held by it): one lands
    // on each worker, so the holder has one to finish when it stops.
    let silent = SilentServer::start().await;
    for i in 0..2 {
        let body = json!({"broker": silent.url(), "client-id": unique_name("silent"),
                          "topic": "t", "content": "wait", "timeout": 6000});
        pair.amqp
            .send_job(
                &pair.queue,
                body.to_string().as_bytes(),
                Some(&pair.reply_queue),
                Some(&format!("wait-{i}")),
            )
            .await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric_sum(&holder.metrics().await, "mqtt_connector_jobs_in_flight") < 1.0 {
        assert!(
            Instant::now() < deadline,
            "the holder never ran a waiting request"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let stopped = Instant::now();
    let stopping = tokio::spawn(holder.stop());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let consumers = held_queue_consumers(&pair.queue);
    println!("2 s into the holder's stop its client-id queue has consumers {consumers:?}");
    assert!(
        !stopping.is_finished(),
        "the holder stopped within 2 s: nothing was tested"
    );
    assert_eq!(
        consumers,
        [1],
        "the stopping holder still consumes its client-id's queue"
    );
    // A job handed to the stopping holder goes on to the request queue, where the other worker
    // takes it and the client-id.
    let handed = Instant::now();
    pair.hand_to_holder(
        &json!({"connector": "shared", "content": "forwarded"}),
        "forwarded",
    )
    .await;
    let reply = pair.replies.expect_reply(Duration::from_secs(20)).await;
    println!(
        "the job handed to the stopping holder was answered after {:?}",
        handed.elapsed()
    );
    assert_eq!(reply.correlation_id.as_deref(), Some("forwarded"));
    assert_eq!(reply.exit_code(), 0, "{}", reply.message());
    stopping.await.expect("holder stopped");
    println!("the holder stopped after {:?}", stopped.elapsed());
    pair.stop(&[]).await;
}

/// A job that fails for good (here: expired, 9) after it was routed to its client-id's holder
/// is answered once and dead-lettered once: rejected on the client-id's queue it would go back
/// into the request queue (that queue's way back for jobs that waited too long) and run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_failing_for_good_on_its_holder_is_answered_once() {
    let dead_letters = unique_name("held-dead");
    let mut pair = SharedPair::start(Some(&dead_letters)).await;
    pair.hand_to_holder(
        &json!({"connector": "shared", "content": "late", "not-after": "2020-01-01T00:00:00Z"}),
        "late",
    )
    .await;
    let reply = pair.replies.expect_reply(Duration::from_secs(20)).await;
    assert_eq!(reply.correlation_id.as_deref(), Some("late"));
    assert_eq!(reply.exit_code(), 9, "{}", reply.message());
    pair.replies.expect_no_reply(Duration::from_secs(3)).await;
    assert_eq!(
        pair.amqp.queue_message_count(&dead_letters).await,
        Some(1),
        "dead-lettered once"
    );
    pair.stop(&[&dead_letters]).await;
}
