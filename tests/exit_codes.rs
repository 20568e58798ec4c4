//! Every exit-code of the contract, produced for real through a worker consuming RabbitMQ, and
//! asserted on the reply it sent: the code, a message a person can act on (it names the broker,
//! the key or the file at fault), the correlation id copied and `content_type:
//! application/json` (checked by [`TestBed::run`] for every reply).

mod common;

use common::worker::{TestBed, job, with};
use common::*;
use rumqttc::QoS;
use serde_json::json;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_0_published_and_received_exactly() {
    let broker = Mosquitto::plain();
    let topic = unique_name("t");
    let mut sub = Subscriber::start(broker.port(), &topic, QoS::ExactlyOnce).await;
    let mut bed = TestBed::with_job_files_anywhere().await;
    let content = "héllo, wörld ✓ {\"json\": true}";
    let reply = bed
        .run(
            with(
                job(&broker.url(), &topic, content),
                json!({"client-id": "flint_mqtt"}),
            ),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    assert!(reply.message().contains("published"), "{}", reply.body);
    assert!(reply.message().contains("flint_mqtt"), "{}", reply.body);
    assert!(reply.message().contains("qos 1"), "{}", reply.body);
    let got = sub.expect(T).await;
    assert_eq!(got.topic, topic);
    assert_eq!(got.payload, content.as_bytes());
    assert_eq!(sub.recv(Duration::from_millis(200)).await, None);
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_1_bad_job_names_the_key() {
    let mut bed = TestBed::with_job_files_anywhere().await;
    let reply = bed
        .run(
            with(
                job("tcp://127.0.0.1:1883", "t", "x"),
                json!({"content": null}),
            ),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 1, "{}", reply.body);
    assert!(reply.message().contains("content"), "{}", reply.body);
    assert!(reply.message().contains("missing"), "{}", reply.body);
    bed.wait_queue_empty(T).await;
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_2_unknown_connector_names_it() {
    let mut bed = TestBed::with_job_files_anywhere().await;
    let reply = bed
        .run(
            json!({"connector": "no-such-connector", "topic": "t", "content": "x"}),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 2, "{}", reply.body);
    assert!(
        reply.message().contains("no-such-connector"),
        "{}",
        reply.body
    );
    bed.wait_queue_empty(T).await;
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_3_closed_port_after_retries() {
    let port = free_port(); // nothing listens there
    let mut bed = TestBed::with_job_files_anywhere().await;
    let broker = format!("tcp://127.0.0.1:{port}");
    let reply = bed
        .run(with(job(&broker, "t", "x"), json!({"timeout": 1500})), T)
        .await;
    assert_eq!(reply.exit_code(), 3, "{}", reply.body);
    let message = reply.message();
    assert!(
        message.contains(&format!("127.0.0.1:{port}")),
        "the message names the broker: {message}"
    );
    assert!(
        message.contains("attempts"),
        "the message says how many attempts: {message}"
    );
    let attempts = reply.body["attempts"].as_u64().unwrap_or(0);
    assert!(attempts >= 2, "retried: {}", reply.body);
    assert!(
        message.contains(&format!("{attempts} attempts")),
        "{message}"
    );
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_4_wrong_password() {
    let broker = Mosquitto::with_password("alice", "right-password");
    let mut bed = TestBed::with_job_files_anywhere().await;
    let reply = bed
        .run(
            with(
                job(&broker.url(), "t", "x"),
                json!({"username": "alice", "password": "pw-wrong-9c1d"}),
            ),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 4, "{}", reply.body);
    let message = reply.message();
    assert!(
        message.contains(&broker.url()[6..]),
        "names the broker: {message}"
    );
    assert!(
        message.contains("not authorized") || message.contains("password"),
        "{message}"
    );
    assert!(!String::from_utf8_lossy(&reply.raw).contains("pw-wrong-9c1d"));
    assert_eq!(reply.body["attempts"], 1, "not retried: {}", reply.body);
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_5_wrong_ca_and_missing_certificate_file() {
    let certs = Certs::shared();
    let broker = Mosquitto::tls(certs);
    let mut bed = TestBed::with_job_files_anywhere().await;

    let wrong_ca = bed
        .run(
            with(
                job(&broker.url(), "t", "x"),
                json!({"root-ca-crt": certs.other_ca_crt}),
            ),
            T,
        )
        .await;
    assert_eq!(wrong_ca.exit_code(), 5, "{}", wrong_ca.body);
    let message = wrong_ca.message();
    assert!(message.contains("TLS"), "{message}");
    assert!(
        message.contains(&format!("localhost:{}", broker.port())),
        "names the broker: {message}"
    );
    assert!(
        message.to_lowercase().contains("issuer") || message.contains("certificate"),
        "says what is wrong with the certificate: {message}"
    );

    let missing = certs.dir.join("does-not-exist.crt");
    let reply = bed
        .run(
            with(
                job(&broker.url(), "t", "x"),
                json!({
                    "root-ca-crt": certs.ca_crt,
                    "use-certificate": true,
                    "certificate": missing,
                    "private-key": certs.client_ec_sec1.key,
                }),
            ),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 5, "{}", reply.body);
    assert!(
        reply.message().contains("does-not-exist.crt"),
        "names the missing file: {}",
        reply.body
    );
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_6_silent_server_never_sends_connack() {
    let silent = SilentServer::start().await;
    let mut bed = TestBed::with_job_files_anywhere().await;
    let started = std::time::Instant::now();
    let reply = bed
        .run(
            with(job(&silent.url(), "t", "x"), json!({"timeout": 1500})),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 6, "{}", reply.body);
    let message = reply.message();
    assert!(
        message.contains(&silent.url()[6..]),
        "names the broker: {message}"
    );
    assert!(message.contains("1500"), "names the timeout: {message}");
    assert!(message.contains("CONNACK"), "{message}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the job's timeout bounds the wait"
    );
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_6_publish_never_acknowledged() {
    let mock = ConnackThenSilent::start().await;
    let mut bed = TestBed::with_job_files_anywhere().await;
    let reply = bed
        .run(
            with(job(&mock.url(), "t", "x"), json!({"timeout": 1500})),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 6, "{}", reply.body);
    let message = reply.message();
    assert!(
        message.contains(&mock.url()[6..]),
        "names the broker: {message}"
    );
    assert!(message.contains("acknowledgement"), "{message}");
    // The broker saw the publish: the timeout ran out waiting for its PUBACK.
    mock.wait_for(|s| s.publishes >= 1, T).await;
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_7_connection_lost_after_connack_every_time() {
    let mock = ConnackThenClose::start().await;
    let mut bed = TestBed::with_job_files_anywhere().await;
    let reply = bed
        .run(
            with(job(&mock.url(), "t", "x"), json!({"timeout": 1500})),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 7, "{}", reply.body);
    let message = reply.message();
    assert!(
        message.contains(&mock.url()[6..]),
        "names the broker: {message}"
    );
    assert!(message.contains("attempts"), "{message}");
    assert!(
        reply.body["attempts"].as_u64().unwrap_or(0) >= 2,
        "retried: {}",
        reply.body
    );
    assert!(mock.stats().connects >= 2, "{:?}", mock.stats());
    bed.finish().await;
}

/// The transient side of code 7: a publish whose connection is cut after CONNACK, before the
/// broker acknowledged it, is retried on a new connection and succeeds (exit 0, received).
/// With every retry failing too, the code is 7 (see the test above) or, when the broker cannot
/// even be reached any more, 3: the last failure's code.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_cut_after_connack_is_retried_on_a_new_connection() {
    let broker = Mosquitto::plain();
    let proxy = TcpProxy::start(broker.port()).await;
    let topic = unique_name("t");
    let mut sub = Subscriber::start(broker.port(), &topic, QoS::ExactlyOnce).await;
    let mut bed = TestBed::with_job_files_anywhere().await;
    let broker_url = format!("tcp://127.0.0.1:{}", proxy.port());
    let fixed = json!({"client-id": unique_name("cut"), "timeout": 10000});
    // The first job opens the (pooled) connection.
    let ok = bed
        .run(with(job(&broker_url, &topic, "first"), fixed.clone()), T)
        .await;
    assert_eq!(ok.exit_code(), 0, "{}", ok.body);
    assert_eq!(sub.expect(T).await.payload_str(), "first");
    proxy.stall();
    let correlation_id = unique_name("corr");
    let body = with(job(&broker_url, &topic, "second"), fixed).to_string();
    bed.amqp
        .send_job(
            &bed.queue,
            body.as_bytes(),
            Some(&bed.reply_queue),
            Some(&correlation_id),
        )
        .await;
    // No reply while the publish is held by the stall.
    bed.replies
        .expect_no_reply(Duration::from_millis(300))
        .await;
    proxy.cut();
    proxy.resume();
    let reply = bed.replies.expect_reply(T).await;
    assert_eq!(
        reply.correlation_id.as_deref(),
        Some(correlation_id.as_str())
    );
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    assert!(
        reply.body["attempts"].as_u64().unwrap_or(0) >= 2,
        "retried: {}",
        reply.body
    );
    assert_eq!(sub.expect(T).await.payload_str(), "second");
    assert!(proxy.stats().total >= 2, "{:?}", proxy.stats());
    bed.finish().await;
}
