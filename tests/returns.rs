//! A publish RabbitMQ returns (mandatory, no queue) is never taken as delivered, however many
//! publishes share its channel (SPEC.md "Delivery": "Every job ends, once"). lapin hands a
//! `basic.return` to whichever confirm it completes next; the worker's publisher gives each
//! return to its own publish.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::worker::{TestBed, connectors_dir, job, metric_sum, with};
use common::{Amqp, Mosquitto, unique_name};
use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation};
use mqtt_connector::amqp::confirms::{Published, Publisher};
use serde_json::json;
use tokio::task::JoinSet;
use tokio::time::Instant;

const T: Duration = Duration::from_secs(15);
/// The reply window (30 s) and a margin: a job whose reply is lost is dead-lettered by then.
const DEAD_LETTERED_WITHIN: Duration = Duration::from_secs(45);
/// Publishes sent at once on one channel, and every how many of them goes to a missing queue.
const PUBLISHES: usize = 600;
const MISSING_EVERY: usize = 3;

/// What one publish was told: returned or not.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Told {
    Delivered,
    Returned,
    Other,
}

/// Sends [`PUBLISHES`] mandatory publishes at once through `publish` (routing key, correlation
/// id), a third of them to queues that do not exist, and returns those told wrong
/// (correlation id, whether its queue exists, what it was told), with how many each existing
/// queue got.
async fn publish_to_a_mix_of_queues<F, Fut>(amqp: &Amqp, publish: F) -> Vec<(String, bool, Told)>
where
    F: Fn(String, String) -> Fut,
    Fut: Future<Output = Told> + Send + 'static,
{
    let mut existing = Vec::new();
    for _ in 0..4 {
        existing.push(amqp.declare_reply_queue().await);
    }
    let missing: Vec<String> = (0..4).map(|_| unique_name("gone")).collect();
    let mut sent = JoinSet::new();
    let mut expected_in: HashMap<String, u32> = HashMap::new();
    for i in 0..PUBLISHES {
        let exists = i % MISSING_EVERY != 0;
        let queue = if exists {
            existing[i % existing.len()].clone()
        } else {
            missing[i % missing.len()].clone()
        };
        let correlation_id = format!("publish-{i}");
        if exists {
            *expected_in.entry(queue.clone()).or_default() += 1;
        }
        let told = publish(queue, correlation_id.clone());
        sent.spawn(async move { (correlation_id, exists, told.await) });
    }
    let mut wrong = Vec::new();
    let deadline = Instant::now() + T;
    while let Some(done) = tokio::time::timeout_at(deadline, sent.join_next())
        .await
        .expect("every publish is told what became of it")
    {
        let (correlation_id, exists, told) = done.expect("publish task");
        let right = if exists {
            Told::Delivered
        } else {
            Told::Returned
        };
        if told != right {
            wrong.push((correlation_id, exists, told));
        }
    }
    if wrong.is_empty() {
        for (queue, expected) in expected_in {
            assert_eq!(
                amqp.queue_message_count(&queue).await,
                Some(expected),
                "{queue} holds every publish acked for it"
            );
        }
    }
    wrong
}

fn properties(correlation_id: &str) -> BasicProperties {
    BasicProperties::default().with_correlation_id(correlation_id.into())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_of_many_concurrent_publishes_learns_whether_its_own_queue_took_it() {
    let amqp = Amqp::connect().await;
    let publisher = Publisher::start(amqp.channel.clone());
    let started = Instant::now();
    let wrong = publish_to_a_mix_of_queues(&amqp, |queue, correlation_id| {
        let publisher = publisher.clone();
        async move {
            match publisher
                .publish(&queue, true, b"{}", properties(&correlation_id))
                .await
            {
                Published::Acked => Told::Delivered,
                Published::Returned => Told::Returned,
                _ => Told::Other,
            }
        }
    })
    .await;
    println!(
        "{PUBLISHES} publishes through the publisher, 1 in {MISSING_EVERY} to a missing queue: {} told wrong, {:?}",
        wrong.len(),
        started.elapsed()
    );
    assert!(wrong.is_empty(), "told wrong: {wrong:?}");
}

/// The trap itself, kept to show it is still there: trusting `Confirmation::Ack(Some(_))` on a
/// shared channel tells some publishes to existing queues they were returned, and some to
/// missing queues they were delivered. Timing-dependent, so not part of the suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "shows lapin's misattribution of returns; run by hand"]
async fn plain_lapin_confirms_give_returns_to_the_wrong_publish() {
    let amqp = Amqp::connect().await;
    let channel: Channel = amqp.channel.clone();
    let started = Instant::now();
    let wrong = publish_to_a_mix_of_queues(&amqp, |queue, correlation_id| {
        let channel = channel.clone();
        async move {
            let options = BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            };
            let confirm = channel
                .basic_publish(
                    "".into(),
                    queue.as_str().into(),
                    options,
                    b"{}",
                    properties(&correlation_id),
                )
                .await;
            match confirm {
                Ok(confirm) => match confirm.await {
                    Ok(Confirmation::Ack(None)) => Told::Delivered,
                    Ok(Confirmation::Ack(Some(_))) => Told::Returned,
                    _ => Told::Other,
                },
                Err(_) => Told::Other,
            }
        }
    })
    .await;
    let delivered_but_told_returned = wrong.iter().filter(|(_, exists, _)| *exists).count();
    println!(
        "plain lapin: {} of {PUBLISHES} told wrong ({delivered_but_told_returned} delivered but told returned), {:?}",
        wrong.len(),
        started.elapsed()
    );
    assert!(!wrong.is_empty(), "lapin matched every return this time");
}

/// Jobs whose reply queue is gone, sent among many jobs whose replies get through, on one
/// worker (one channel for every reply): each job is answered exactly once or dead-lettered
/// with its outcome; none is acked without either, none answered twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn among_many_replies_each_job_is_answered_once_or_dead_lettered() {
    const JOBS: usize = 600;
    const GONE_EVERY: usize = 4;
    let broker = Mosquitto::plain();
    let dead = unique_name("dead");
    let dead_for_worker = dead.clone();
    let mut bed = TestBed::start_with(connectors_dir(), move |options| {
        options.dead_letter_queue = Some(dead_for_worker);
    })
    .await;
    let gone = bed.amqp.declare_reply_queue().await;
    bed.amqp.delete_queue(&gone).await;
    let topic = unique_name("many");
    let client_ids: Vec<String> = (0..8).map(|_| unique_name("many")).collect();
    let id = |i: usize| format!("job-{i}");
    for i in 0..JOBS {
        let body = with(
            job(&broker.url(), &topic, &format!("job {i}")),
            json!({"client-id": client_ids[i % client_ids.len()]}),
        )
        .to_string();
        let reply_to = if i % GONE_EVERY == 0 {
            &gone
        } else {
            &bed.reply_queue
        };
        bed.amqp
            .send_job(&bed.queue, body.as_bytes(), Some(reply_to), Some(&id(i)))
            .await;
    }

    // The dead-letter queue fills once the gone replies' window is over.
    let expected_dead = JOBS.div_ceil(GONE_EVERY);
    let mut dead_lettered: HashMap<String, u32> = HashMap::new();
    let deadline = Instant::now() + DEAD_LETTERED_WITHIN;
    while dead_lettered.values().sum::<u32>() < expected_dead as u32 && Instant::now() < deadline {
        match bed.amqp.get_message(&dead).await {
            Some(message) => {
                let correlation_id = message
                    .properties
                    .correlation_id()
                    .as_ref()
                    .map(|id| id.to_string())
                    .unwrap_or_default();
                *dead_lettered.entry(correlation_id).or_default() += 1;
            }
            None => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
    // Every job settled: none running, none back on the queue.
    let addr = bed.worker.metrics_addr();
    let deadline = Instant::now() + T;
    loop {
        let (status, text) = common::http::get(addr, "/metrics")
            .await
            .expect("GET /metrics");
        assert_eq!(status, 200);
        if metric_sum(&text, "mqtt_connector_jobs_in_flight") == 0.0 {
            break;
        }
        assert!(Instant::now() < deadline, "jobs still in flight");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bed.wait_queue_empty(T).await;
    while let Some(message) = bed.amqp.get_message(&dead).await {
        let correlation_id = message
            .properties
            .correlation_id()
            .as_ref()
            .map(|id| id.to_string());
        *dead_lettered
            .entry(correlation_id.unwrap_or_default())
            .or_default() += 1;
    }
    let mut replied: HashMap<String, u32> = HashMap::new();
    while let Some(reply) = bed.replies.try_reply(Duration::from_secs(2)).await {
        assert_eq!(reply.exit_code(), 0, "{}", reply.body);
        *replied
            .entry(reply.correlation_id.unwrap_or_default())
            .or_default() += 1;
    }
    bed.worker.stop().await;
    let (ready, _) = bed.amqp.queue_counts(&bed.queue).await.expect("queue");

    let mut wrong = Vec::new();
    for i in 0..JOBS {
        let (replies, dead) = (
            replied.get(&id(i)).copied().unwrap_or(0),
            dead_lettered.get(&id(i)).copied().unwrap_or(0),
        );
        let gone_reply = i % GONE_EVERY == 0;
        let right = if gone_reply {
            (replies, dead) == (0, 1)
        } else {
            (replies, dead) == (1, 0)
        };
        if !right {
            wrong.push(format!(
                "{} (reply queue {}): {replies} replies, dead-lettered {dead} times",
                id(i),
                if gone_reply { "gone" } else { "there" }
            ));
        }
    }
    println!(
        "{JOBS} jobs, {expected_dead} with their reply queue gone: {} replies, {} dead-lettered, {} wrong",
        replied.values().sum::<u32>(),
        dead_lettered.values().sum::<u32>(),
        wrong.len()
    );
    assert!(wrong.is_empty(), "{wrong:#?}");
    assert_eq!(ready, 0, "no job back on the queue");
    bed.amqp.delete_queue(&bed.queue).await;
    bed.amqp.delete_queue(&dead).await;
}
