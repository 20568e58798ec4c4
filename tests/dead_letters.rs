//! Jobs dead-lettered while the dead-letter queue's node dies are not lost: the worker declares
//! a quorum request queue with at-least-once dead-lettering. A private 3-node cluster: the
//! request queue led by node 0 (declared by a worker connected there), its dead-letter queue
//! led by node 1; node 1 is killed, and at once the worker rejects 20 jobs that can never
//! succeed (exit-code 1), which RabbitMQ dead-letters while the dead-letter queue has no leader
//! yet. RabbitMQ must keep all 20: in the dead-letter queue, or in the request queue until it
//! can publish them there (3.10 does so within about 3 minutes: docs/fleet.md). Beside it, a
//! queue with RabbitMQ's default (at most once) goes through the same, and what it kept is
//! printed: on RabbitMQ 3.10 it loses them.

mod common;

use std::time::Duration;

use common::child::ChildWorker;
use common::{Amqp, RabbitCluster, RabbitConfig, unique_name};
use futures_util::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, BasicRejectOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable};

const JOBS: usize = 20;
fn quorum() -> FieldTable {
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    arguments
}

async fn declare(amqp: &Amqp, queue: &str, arguments: FieldTable) {
    amqp.channel
        .queue_declare(queue.into(), QueueDeclareOptions::durable(), arguments)
        .await
        .unwrap_or_else(|e| panic!("declare {queue}: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_dead_lettered_while_the_dead_letter_queues_node_dies_all_arrive() {
    let mut cluster = RabbitCluster::start(
        3,
        &RabbitConfig {
            ..RabbitConfig::default()
        },
    )
    .await;
    let queue = unique_name("jobs");
    let dead = format!("{queue}.dead");
    let plain = unique_name("at-most-once");
    let plain_dead = format!("{plain}.dead");

    // The dead-letter queues, led by node 1 (quorum queues are led by the declaring node).
    let on_node1 = Amqp::connect_to(&cluster.url(1)).await;
    declare(&on_node1, &dead, quorum()).await;
    declare(&on_node1, &plain_dead, quorum()).await;
    drop(on_node1);

    // The worker, on node 0 only, declares the request queue there.
    let url0 = cluster.url(0);
    let env = [
        ("MQTT_CONNECTOR_AMQP_URL", url0.as_str()),
        ("MQTT_CONNECTOR_QUEUE", queue.as_str()),
        ("MQTT_CONNECTOR_QUEUE_TYPE", "quorum"),
        ("MQTT_CONNECTOR_DELIVERY_LIMIT", "5"),
        ("MQTT_CONNECTOR_DEAD_LETTER_QUEUE", dead.as_str()),
    ];
    let mut worker = ChildWorker::spawn_with_env(&env);
    worker.wait_ready(Duration::from_secs(30)).await;
    let listing = cluster.ctl(
        0,
        &["list_queues", "name", "arguments", "--no-table-headers"],
    );
    let declared = listing
        .lines()
        .find(|line| line.starts_with(&format!("{queue}\t")))
        .unwrap_or_else(|| panic!("{queue} not declared: {listing}"));
    assert!(
        declared.contains("at-least-once") && declared.contains("reject-publish"),
        "declared with at-least-once dead-lettering: {declared}"
    );
    for (name, leader) in [(&queue, 0), (&dead, 1), (&plain_dead, 1)] {
        assert_eq!(cluster.quorum_leader(0, name), leader, "{name}'s leader");
    }

    // The same route with RabbitMQ's default strategy, its messages taken and held by us.
    let amqp = Amqp::connect_to(&url0).await;
    let mut arguments = quorum();
    arguments.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString("".into()),
    );
    arguments.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(plain_dead.as_str().into()),
    );
    declare(&amqp, &plain, arguments).await;
    for i in 0..JOBS {
        amqp.send_job(&plain, format!("plain {i}").as_bytes(), None, None)
            .await;
    }
    let holder = amqp.connection.create_channel().await.expect("channel");
    holder
        .basic_qos(100, BasicQosOptions::default())
        .await
        .expect("qos");
    let mut held = holder
        .basic_consume(
            plain.as_str().into(),
            "holder".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("consume");
    let mut deliveries = Vec::new();
    while deliveries.len() < JOBS {
        let delivery = tokio::time::timeout(Duration::from_secs(10), held.next())
            .await
            .expect("deliveries of the plain queue")
            .expect("consumer open")
            .expect("delivery");
        deliveries.push(delivery);
    }

    cluster.kill(1);
    eprintln!("dead_letters: node 1 (both dead-letter queues' leader) killed");
    // At once: the worker rejects jobs that can never succeed, and we reject ours.
    for i in 0..JOBS {
        amqp.send_job(&queue, b"not json", None, Some(&format!("bad-{i}")))
            .await;
    }
    for delivery in deliveries {
        delivery
            .reject(BasicRejectOptions { requeue: false })
            .await
            .expect("reject");
    }

    // Once the worker has settled all 20: RabbitMQ holds each, delivered to the dead-letter
    // queue or kept in the request queue until it can be (counted in its messages, never
    // delivered again); with the default strategy what it dead-lettered then is gone.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while worker.output().matches("settlement=DeadLetter").count() < JOBS {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the worker did not dead-letter the {JOBS} jobs:\n{}",
            worker.output()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let messages = |listing: &str, name: &str| -> u32 {
        listing
            .lines()
            .find_map(|line| {
                let mut fields = line.split('\t');
                (fields.next() == Some(name)).then(|| fields.next()?.trim().parse().ok())?
            })
            .unwrap_or(0)
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let listing = loop {
        let listing = cluster.ctl(
            0,
            &["list_queues", "name", "messages", "--no-table-headers"],
        );
        if (messages(&listing, &queue) + messages(&listing, &dead)) as usize == JOBS {
            break listing;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "RabbitMQ lost dead-lettered jobs: {listing}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let kept_by_default = messages(&listing, &plain) + messages(&listing, &plain_dead);
    eprintln!(
        "dead_letters: at least once, RabbitMQ holds {JOBS} of {JOBS} ({} arrived, {} waiting); \
         at most once (its default) {kept_by_default} of {JOBS}",
        messages(&listing, &dead),
        messages(&listing, &queue)
    );
    worker.kill();
}
