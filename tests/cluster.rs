//! A worker fleet on a 3-node RabbitMQ cluster (private nodes started by the test): a quorum
//! request queue whose leader is on node 0, two workers given all three URLs (worker 1 starting
//! with node 0, worker 2 with node 1), 3,000 QoS 1 jobs. Mid-burst node 0 is killed (SIGKILL):
//! it holds the queue's leader and worker 1's connection, and worker 1 holds a full window of
//! jobs (its MQTT side stalled until then). Every job is answered (at least once),
//! every message reaches an MQTT subscriber, worker 1's `/readyz` goes 503 and back to 200 on
//! another node; the time to recover is printed.

mod common;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::worker::{metric_sum, spawn_worker_with};
use common::{Amqp, Mosquitto, RabbitCluster, RabbitConfig, Subscriber, TcpProxy, unique_name};
use futures_util::future::join_all;
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use mqtt_connector::amqp::queue::QueueType;
use mqtt_connector::worker::WorkerOptions;
use rumqttc::QoS;
use tokio_util::sync::CancellationToken;

const JOBS: usize = 3_000;
const KILL_AFTER: usize = 300;
const PREFETCH: u16 = 50;

/// Records every change of `/readyz` of each address, with its time.
fn watch_readiness(
    addrs: Vec<SocketAddr>,
    stop: CancellationToken,
) -> Arc<Mutex<Vec<(Instant, usize, u16)>>> {
    let changes = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&changes);
    tokio::spawn(async move {
        let mut last = vec![0u16; addrs.len()];
        while !stop.is_cancelled() {
            for (i, addr) in addrs.iter().enumerate() {
                let status = common::http::get(*addr, "/readyz")
                    .await
                    .map(|(status, _)| status)
                    .unwrap_or(0);
                if status != last[i] {
                    last[i] = status;
                    record.lock().unwrap_or_else(|e| e.into_inner()).push((
                        Instant::now(),
                        i,
                        status,
                    ));
                }
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    changes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_node_and_a_workers_node_mid_burst_loses_no_job() {
    let test_started = Instant::now();
    let mut cluster = RabbitCluster::start(3, &RabbitConfig::default()).await;
    let mosquitto = Mosquitto::plain();
    let topic = unique_name("cluster");
    let mut subscriber = Subscriber::start(mosquitto.port(), &topic, QoS::AtLeastOnce).await;
    // Worker 1 reaches Mosquitto through a proxy, stalled until its node is killed: at the
    // kill it holds a full window of jobs, whatever the speed of the machine.
    let proxy = TcpProxy::start(mosquitto.port()).await;
    proxy.stall();
    let connectors = [proxy.port(), mosquitto.port()].map(|port| {
        let dir = common::worker::connectors_dir();
        common::write_connector(
            dir.path(),
            "fleet",
            serde_json::json!({"broker": format!("tcp://127.0.0.1:{port}"), "client-id": "fleet",
                "qos": 1, "topic": topic, "timeout": 20_000}),
        );
        dir
    });

    // The quorum queue, declared through node 0: its leader starts there.
    let queue = unique_name("cluster-jobs");
    let on_zero = Amqp::connect_to(&cluster.url(0)).await;
    let mut arguments = FieldTable::default();
    arguments.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    on_zero
        .channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::durable(),
            arguments,
        )
        .await
        .expect("declare quorum queue");
    drop(on_zero);
    assert_eq!(cluster.quorum_leader(0, &queue), 0, "leader on node 0");

    // The test talks to node 2, which stays up.
    let amqp = Amqp::connect_to(&cluster.url(2)).await;
    let (reply_queue, mut replies) = amqp.reply_queue().await;
    // All jobs wait in the queue before the workers start: the burst is theirs alone.
    let published = Instant::now();
    for chunk in (0..JOBS).collect::<Vec<_>>().chunks(250) {
        let confirms = chunk.iter().map(|i| {
            let id = format!("job-{i}");
            let body = serde_json::json!({"connector": "fleet", "content": id}).to_string();
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2)
                .with_reply_to(reply_queue.as_str().into())
                .with_correlation_id(id.as_str().into());
            let channel = amqp.channel.clone();
            let queue = queue.clone();
            async move {
                channel
                    .basic_publish(
                        "".into(),
                        queue.as_str().into(),
                        BasicPublishOptions::default(),
                        body.as_bytes(),
                        properties,
                    )
                    .await
                    .expect("publish")
                    .await
                    .expect("confirm")
            }
        });
        for confirm in join_all(confirms).await {
            assert!(confirm.is_ack(), "job not confirmed: {confirm:?}");
        }
    }
    eprintln!(
        "cluster: {JOBS} jobs published in {:.1} s",
        published.elapsed().as_secs_f64()
    );

    let mut workers = Vec::new();
    for (first_node, suffix, connectors) in [(0, "-w1", &connectors[0]), (1, "-w2", &connectors[1])]
    {
        let mut options = WorkerOptions::new(
            cluster.urls_from(first_node),
            queue.as_str(),
            connectors.path(),
        );
        options.queue_type = QueueType::Quorum;
        options.metrics_addr = Some("127.0.0.1:0".parse().expect("addr"));
        options.grace_period = Duration::from_secs(5);
        // A smaller window than the default, so the burst lasts long enough to be cut.
        options.prefetch = PREFETCH;
        // Two workers, two MQTT identities: this test is about RabbitMQ, not takeovers.
        options.mqtt.client_id_suffix = suffix.into();
        workers.push(spawn_worker_with(options).await);
    }
    let stop_watch = CancellationToken::new();
    let readiness = watch_readiness(
        workers.iter().map(|w| w.metrics_addr()).collect(),
        stop_watch.clone(),
    );

    let burst = Instant::now();
    let mut answered = HashSet::new();
    let mut replies_total = 0;
    let mut killed_at = None;
    let deadline = Instant::now() + Duration::from_secs(180);
    while answered.len() < JOBS {
        if killed_at.is_none() && answered.len() >= KILL_AFTER {
            let in_flight =
                metric_sum(&workers[0].metrics().await, "mqtt_connector_jobs_in_flight");
            assert_eq!(
                in_flight,
                f64::from(PREFETCH),
                "worker 1 holds a full window"
            );
            cluster.kill(0);
            // Its jobs now publish, but their replies and acks have nowhere to go: RabbitMQ
            // must hand them out again.
            proxy.resume();
            killed_at = Some(Instant::now());
            eprintln!(
                "cluster: node 0 (queue leader, worker 1's node) killed after {} replies, worker 1 holding {in_flight} jobs",
                answered.len()
            );
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(reply) = replies.try_reply(left.min(Duration::from_secs(30))).await else {
            panic!(
                "only {} of {JOBS} jobs answered; worker logs show why",
                answered.len()
            );
        };
        replies_total += 1;
        assert_eq!(
            reply.exit_code(),
            0,
            "every job is published: {}",
            reply.body
        );
        answered.insert(reply.correlation_id.clone().expect("correlation id"));
    }
    let killed_at = killed_at.expect("node killed mid-burst");
    eprintln!(
        "cluster: {JOBS} jobs answered ({replies_total} replies, {} twice) in {:.1} s",
        replies_total - JOBS,
        burst.elapsed().as_secs_f64()
    );

    // Every message reached the subscriber (at least once).
    let mut received = HashSet::new();
    let mqtt_deadline = Instant::now() + Duration::from_secs(30);
    while received.len() < JOBS && Instant::now() < mqtt_deadline {
        match subscriber.recv(Duration::from_secs(5)).await {
            Some(message) => {
                received.insert(message.payload_str());
            }
            None => break,
        }
    }
    assert_eq!(received.len(), JOBS, "distinct messages received");

    // Worker 1 lost its node: 503, then 200 again on another node. Worker 2 never moved.
    stop_watch.cancel();
    let changes = readiness.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let after_kill: Vec<(Duration, usize, u16)> = changes
        .iter()
        .filter(|(at, _, _)| *at >= killed_at)
        .map(|(at, worker, status)| (at.duration_since(killed_at), *worker, *status))
        .collect();
    let down = after_kill
        .iter()
        .find(|(_, worker, status)| *worker == 0 && *status == 503)
        .unwrap_or_else(|| panic!("worker 1 never went 503 after the kill: {after_kill:?}"));
    let back = after_kill
        .iter()
        .find(|(at, worker, status)| *worker == 0 && *status == 200 && *at > down.0)
        .unwrap_or_else(|| panic!("worker 1 never ready again: {after_kill:?}"));
    eprintln!(
        "cluster: worker 1 not ready {:?} after the kill, ready again after {:?} (time to recover)",
        down.0, back.0
    );
    let new_leader = cluster.quorum_leader(1, &queue);
    assert_ne!(new_leader, 0, "a new leader was elected");
    let consumers = cluster.ctl(1, &["list_consumers", "queue_name", "channel_pid"]);
    // The queue may still list the dead node's consumer (suspected down); count the live ones.
    let dead_node = format!("<{}.", cluster.nodes[0].name);
    let live = consumers
        .lines()
        .filter(|line| line.starts_with(&queue) && !line.contains(&dead_node))
        .count();
    assert_eq!(live, 2, "both workers consume on live nodes: {consumers}");
    eprintln!(
        "cluster: new leader on node {new_leader}; test took {:.1} s",
        test_started.elapsed().as_secs_f64()
    );
    for worker in workers {
        worker.stop().await;
    }
}
