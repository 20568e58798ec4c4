//! Delivery promises, each proven by what a subscriber received and what came back on the reply
//! queue: every QoS arrives (and the reply says at which QoS the broker acknowledged), retained
//! messages are retained, direct reply-to gets its reply, a job without `reply_to` is still
//! published and acknowledged, connectors merge under job keys and take `${ENV}` values, and a
//! burst of 2,000 jobs gives 2,000 replies and 2,000 messages, none lost, none twice, over
//! reused MQTT connections.

mod common;

use common::amqp::DIRECT_REPLY_TO;
use common::worker::{TestBed, connectors_dir, job, metric_sum, with};
use common::*;
use rumqttc::QoS;
use serde_json::json;
use std::collections::HashSet;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_qos_is_received_and_stated_in_the_reply() {
    let broker = Mosquitto::plain();
    let topic = unique_name("t");
    let mut sub = Subscriber::start(broker.port(), &topic, QoS::ExactlyOnce).await;
    let mut bed = TestBed::new().await;
    for (level, qos) in [
        (0, QoS::AtMostOnce),
        (1, QoS::AtLeastOnce),
        (2, QoS::ExactlyOnce),
    ] {
        let content = format!("qos-{level}");
        let reply = bed
            .run(
                with(job(&broker.url(), &topic, &content), json!({"qos": level})),
                T,
            )
            .await;
        assert_eq!(reply.exit_code(), 0, "{}", reply.body);
        assert!(
            reply.message().contains(&format!("qos {level}")),
            "the reply states the QoS: {}",
            reply.body
        );
        let got = sub.expect(T).await;
        assert_eq!(got.payload_str(), content);
        assert_eq!(got.qos, qos, "delivered at the QoS asked");
        assert!(!got.retain);
    }
    // QoS defaults to 2.
    let reply = bed
        .run(
            with(job(&broker.url(), &topic, "default"), json!({"qos": null})),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    assert!(reply.message().contains("qos 2"), "{}", reply.body);
    assert_eq!(sub.expect(T).await.qos, QoS::ExactlyOnce);
    assert_eq!(sub.recv(Duration::from_millis(200)).await, None);
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_message_reaches_a_later_subscriber() {
    let broker = Mosquitto::plain();
    let topic = unique_name("t");
    let mut bed = TestBed::new().await;
    let reply = bed
        .run(
            with(
                job(&broker.url(), &topic, "kept"),
                json!({"retain": true, "qos": 2}),
            ),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    let mut late = Subscriber::start(broker.port(), &topic, QoS::ExactlyOnce).await;
    let got = late.expect(T).await;
    assert_eq!(got.payload_str(), "kept");
    assert!(got.retain, "delivered as retained");
    // Without retain, a later subscriber gets nothing.
    let other = unique_name("t");
    let reply = bed.run(job(&broker.url(), &other, "not kept"), T).await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    let mut later = Subscriber::start(broker.port(), &other, QoS::ExactlyOnce).await;
    assert_eq!(later.recv(Duration::from_millis(300)).await, None);
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_reply_to_gets_its_reply() {
    let broker = Mosquitto::plain();
    let topic = unique_name("t");
    let mut sub = Subscriber::start(broker.port(), &topic, QoS::ExactlyOnce).await;
    let bed = TestBed::new().await;
    let mut direct = bed.amqp.direct_reply_to().await;
    let body = job(&broker.url(), &topic, "direct").to_string();
    bed.amqp
        .send_job(
            &bed.queue,
            body.as_bytes(),
            Some(DIRECT_REPLY_TO),
            Some("direct-1"),
        )
        .await;
    let reply = direct.expect_reply(T).await;
    assert_eq!(reply.correlation_id.as_deref(), Some("direct-1"));
    assert_eq!(reply.content_type.as_deref(), Some("application/json"));
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    assert_eq!(sub.expect(T).await.payload_str(), "direct");
    // Exactly one reply, and the job is not requeued (direct replies are reported "returned"
    // by RabbitMQ; the worker must not take that for a failure).
    direct.expect_no_reply(Duration::from_millis(500)).await;
    bed.wait_queue_empty(T).await;
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_without_reply_to_is_published_and_acknowledged() {
    let broker = Mosquitto::plain();
    let topic = unique_name("t");
    let mut sub = Subscriber::start(broker.port(), &topic, QoS::ExactlyOnce).await;
    let bed = TestBed::new().await;
    let body = job(&broker.url(), &topic, "fire and forget").to_string();
    bed.amqp
        .send_job(&bed.queue, body.as_bytes(), None, None)
        .await;
    assert_eq!(sub.expect(T).await.payload_str(), "fire and forget");
    bed.wait_queue_empty(T).await;
    // Stopping the worker would return an unacknowledged job to the queue: it stays empty.
    let TestBed {
        amqp,
        queue,
        worker,
        mut replies,
        ..
    } = bed;
    worker.stop().await;
    assert_eq!(amqp.queue_message_count(&queue).await, Some(0));
    replies.expect_no_reply(Duration::from_millis(200)).await;
    assert_eq!(sub.recv(Duration::from_millis(200)).await, None);
    amqp.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_is_merged_under_the_job_keys() {
    let broker = Mosquitto::plain();
    let connector_topic = unique_name("from-connector");
    let job_topic = unique_name("from-job");
    let mut sub_connector =
        Subscriber::start(broker.port(), &connector_topic, QoS::ExactlyOnce).await;
    let mut sub_job = Subscriber::start(broker.port(), &job_topic, QoS::ExactlyOnce).await;
    let dir = connectors_dir();
    write_connector(
        dir.path(),
        "local",
        json!({"broker": broker.url(), "client-id": "flint_mqtt", "qos": 2,
               "topic": connector_topic, "content": "connector content"}),
    );
    let mut bed = TestBed::start(dir).await;
    // Connector only (plus nothing): its topic, content and QoS.
    let reply = bed.run(json!({"connector": "local"}), T).await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    assert!(reply.message().contains("flint_mqtt"), "{}", reply.body);
    assert!(reply.message().contains("qos 2"), "{}", reply.body);
    let got = sub_connector.expect(T).await;
    assert_eq!(got.payload_str(), "connector content");
    assert_eq!(got.qos, QoS::ExactlyOnce);
    // Job keys win.
    let reply = bed
        .run(
            json!({"action": "send", "connector": "local", "topic": job_topic,
                   "content": "job content", "qos": 1}),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    assert!(reply.message().contains("qos 1"), "{}", reply.body);
    let got = sub_job.expect(T).await;
    assert_eq!(got.payload_str(), "job content");
    assert_eq!(got.qos, QoS::AtLeastOnce);
    assert_eq!(sub_connector.recv(Duration::from_millis(200)).await, None);
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connector_takes_env_values() {
    let password_var = format!("MQTT_CONNECTOR_TEST_PW_{}", uuid::Uuid::new_v4().simple());
    let topic_var = format!(
        "MQTT_CONNECTOR_TEST_TOPIC_{}",
        uuid::Uuid::new_v4().simple()
    );
    let topic = unique_name("env");
    // SAFETY: unique variable names that nothing else in this process reads or writes.
    unsafe {
        std::env::set_var(&password_var, "pw-env-5b2e");
        std::env::set_var(&topic_var, &topic);
    }
    let broker = Mosquitto::with_password("alice", "pw-env-5b2e");
    let mut opts = mqtt_options("127.0.0.1", broker.port());
    opts.set_credentials("alice", "pw-env-5b2e");
    let mut sub = Subscriber::start_with(opts, &topic, QoS::ExactlyOnce).await;
    let dir = connectors_dir();
    write_connector(
        dir.path(),
        "secret",
        json!({"broker": broker.url(), "client-id": unique_name("env"),
               "username": "alice", "password": format!("${{{password_var}}}"),
               "topic": format!("${{{topic_var}}}")}),
    );
    let mut bed = TestBed::start(dir).await;
    let reply = bed
        .run(json!({"connector": "secret", "content": "from env"}), T)
        .await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    assert!(!String::from_utf8_lossy(&reply.raw).contains("pw-env-5b2e"));
    let got = sub.expect(T).await;
    assert_eq!(got.topic, topic);
    assert_eq!(got.payload_str(), "from env");
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn burst_of_2000_jobs_none_lost_none_twice_over_one_connection() {
    const N: usize = 2_000;
    let broker = Mosquitto::plain();
    let proxy = TcpProxy::start(broker.port()).await;
    let topic = unique_name("burst");
    let mut sub = Subscriber::start(broker.port(), &topic, QoS::AtLeastOnce).await;
    let mut bed = TestBed::new().await;
    let url = format!("tcp://127.0.0.1:{}", proxy.port());
    let client_id = unique_name("burst");
    let started = std::time::Instant::now();
    let sends = (0..N).map(|i| {
        let body = with(
            job(&url, &topic, &format!("m-{i}")),
            json!({"client-id": client_id, "qos": 1, "timeout": 30000}),
        )
        .to_string();
        let (amqp, queue, reply_queue) = (&bed.amqp, &bed.queue, &bed.reply_queue);
        async move {
            amqp.send_job(
                queue,
                body.as_bytes(),
                Some(reply_queue),
                Some(&format!("c-{i}")),
            )
            .await
        }
    });
    futures_util::future::join_all(sends).await;
    let replies = bed.replies.expect_replies(N, Duration::from_secs(60)).await;
    let mut ids = HashSet::new();
    for reply in &replies {
        assert_eq!(reply.exit_code(), 0, "{}", reply.body);
        let id = reply.correlation_id.clone().expect("correlation id");
        assert!(ids.insert(id.clone()), "two replies for {id}");
    }
    let expected: HashSet<String> = (0..N).map(|i| format!("c-{i}")).collect();
    assert_eq!(ids, expected);

    let received = sub.collect(N, Duration::from_secs(30)).await;
    let mut contents = HashSet::new();
    for r in &received {
        assert!(
            contents.insert(r.payload_str()),
            "{} received twice",
            r.payload_str()
        );
    }
    assert_eq!(
        received.len(),
        N,
        "received {} of {N} messages; missing e.g. {:?}",
        received.len(),
        (0..N)
            .map(|i| format!("m-{i}"))
            .filter(|m| !contents.contains(m))
            .take(5)
            .collect::<Vec<_>>()
    );
    assert_eq!(sub.recv(Duration::from_millis(300)).await, None, "no extra");
    eprintln!("{N} jobs round trip in {:?}", started.elapsed());

    // One target, one connection: reused for every job.
    assert_eq!(proxy.stats().total, 1, "{:?}", proxy.stats());
    let metrics = bed.worker.metrics().await;
    assert_eq!(
        metric_sum(&metrics, "mqtt_connector_mqtt_connections"),
        1.0,
        "{metrics}"
    );
    bed.wait_queue_empty(T).await;
    bed.finish().await;
}

/// An MQTT connection unused for the worker's idle timeout is closed (the broker side of the
/// proxy sees it go, the open-connections gauge falls to 0), and the next job opens a new one:
/// one connection per round, reused within it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_after_the_idle_timeout() {
    let broker = Mosquitto::plain();
    let proxy = TcpProxy::start(broker.port()).await;
    let topic = unique_name("idle");
    let mut sub = Subscriber::start(broker.port(), &topic, QoS::AtLeastOnce).await;
    let amqp = Amqp::connect().await;
    let queue = unique_name("jobs");
    let (reply_queue, mut replies) = amqp.reply_queue().await;
    let dir = connectors_dir();
    let mut options =
        mqtt_connector::worker::WorkerOptions::new(amqp::amqp_url(), queue.clone(), dir.path());
    options.metrics_addr = Some("127.0.0.1:0".parse().expect("socket address"));
    options.idle_timeout = Duration::from_secs(1);
    let worker = common::worker::spawn_worker_with(options).await;
    let broker_url = format!("tcp://127.0.0.1:{}", proxy.port());
    let client_id = unique_name("idle-client");
    for round in 1..=2 {
        for i in 0..3 {
            let content = format!("round {round} job {i}");
            let body = with(
                job(&broker_url, &topic, &content),
                json!({"client-id": client_id}),
            );
            let id = unique_name("corr");
            amqp.send_job(
                &queue,
                body.to_string().as_bytes(),
                Some(&reply_queue),
                Some(&id),
            )
            .await;
            let reply = replies.expect_reply(T).await;
            assert_eq!(reply.exit_code(), 0, "{}", reply.body);
            assert_eq!(sub.expect(T).await.payload_str(), content);
        }
        let closed = proxy
            .wait_for(|s| s.active == 0, Duration::from_secs(15))
            .await;
        assert_eq!(closed.total, round, "one connection per round");
        let gauge = metric_sum(&worker.metrics().await, "mqtt_connector_mqtt_connections");
        assert_eq!(gauge, 0.0, "no connection counted open once it is closed");
    }
    worker.stop().await;
    amqp.delete_queue(&queue).await;
}
