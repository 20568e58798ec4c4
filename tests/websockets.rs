//! MQTT over websockets, against a real broker with websocket listeners: amqtt (PyPI
//! `amqtt==0.12.1`; this machine's Mosquitto 2.0.11 is built without websockets). A `ws://`
//! job and a `wss://` job with `root-ca-crt` are each acknowledged (exit-code 0) and received by
//! a subscriber on amqtt's plain TCP listener; the path defaults to `/mqtt`; the broker is named
//! `host:port` in replies and metric labels. A wrong CA on `wss://` is exit-code 5, a client
//! certificate is presented (accepted from our CA, refused from another), and a
//! websocket URL pointing at a plain MQTT port is exit-code 3 with a message that says so.
//!
//! Without amqtt these tests fail, naming `pip install amqtt==0.12.1` (CI installs it).

mod common;

use common::amqtt::Amqtt;
use common::worker::{TestBed, job, with};
use common::*;
use rumqttc::QoS;
use serde_json::json;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_jobs_are_acknowledged_and_received_with_any_path() {
    let broker = Amqtt::start(None);
    let topic = unique_name("t");
    let mut sub = Subscriber::start(broker.tcp_port(), &topic, QoS::AtLeastOnce).await;
    let mut bed = TestBed::with_job_files_anywhere().await;
    let port = broker.ws_port();
    for url in [
        format!("ws://127.0.0.1:{port}/"),
        format!("ws://127.0.0.1:{port}"),
        format!("WS://localhost:{port}/custom/path?x=1"),
    ] {
        let reply = bed.run(job(&url, &topic, &url), T).await;
        assert_eq!(
            reply.exit_code(),
            0,
            "{url}: {}\n{}",
            reply.body,
            broker.log_tail()
        );
        let host = if url.contains("localhost") {
            "localhost"
        } else {
            "127.0.0.1"
        };
        assert!(
            reply.message().contains(&format!("on {host}:{port} ")),
            "the broker is named host:port: {}",
            reply.body
        );
        let received = sub.expect(T).await;
        assert_eq!(received.payload_str(), url);
    }
    // No connector names this broker: its connections count under the bounded label `job`,
    // and no label carries a URL or a path.
    let metrics = bed.worker.metrics().await;
    assert!(
        metrics.contains("mqtt_connector_mqtt_connections{broker=\"job\"}"),
        "metric label:\n{metrics}"
    );
    assert!(
        !metrics.contains("ws://") && !metrics.contains("/mqtt\""),
        "a URL in a label:\n{metrics}"
    );
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wss_jobs_with_root_ca_crt_and_client_certificates() {
    let certs = Certs::shared();
    let broker = Amqtt::start(Some(certs));
    let topic = unique_name("t");
    let mut sub = Subscriber::start(broker.tcp_port(), &topic, QoS::AtLeastOnce).await;
    let mut bed = TestBed::with_job_files_anywhere().await;
    let url = format!("wss://localhost:{}", broker.wss_port());
    let reply = bed
        .run(
            with(
                job(&url, &topic, "over wss"),
                json!({"root-ca-crt": certs.ca_crt}),
            ),
            T,
        )
        .await;
    assert_eq!(
        reply.exit_code(),
        0,
        "{}\n{}",
        reply.body,
        broker.log_tail()
    );
    assert_eq!(sub.expect(T).await.payload_str(), "over wss");

    // The server is verified: a CA that did not sign its certificate is exit-code 5.
    let reply = bed
        .run(
            with(
                job(&url, &topic, "never sent"),
                json!({"root-ca-crt": certs.other_ca_crt, "timeout": 3000}),
            ),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 5, "{}", reply.body);
    assert!(reply.message().contains("TLS"), "{}", reply.body);
    assert_eq!(sub.recv(Duration::from_millis(300)).await, None);

    // The client certificate reaches the broker: one from our CA is accepted, one from another
    // CA makes amqtt (which verifies any certificate presented) drop the connection. Under TLS
    // 1.3 that happens after the handshake and amqtt sends no alert, only a close: the worker
    // sees a lost connection (3, retried), unlike Mosquitto's alert (5). Either way: not sent.
    for (client, published) in [
        (&certs.client_pkcs8, true),
        (&certs.untrusted_client, false),
    ] {
        let reply = bed
            .run(
                with(
                    job(&url, &topic, &client.cn),
                    json!({
                        "root-ca-crt": certs.ca_crt,
                        "use-certificate": true,
                        "certificate": client.crt,
                        "private-key": client.key,
                        "timeout": if published { 5000 } else { 1500 },
                    }),
                ),
                T,
            )
            .await;
        if published {
            assert_eq!(reply.exit_code(), 0, "{}: {}", client.cn, reply.body);
        } else {
            assert!(
                [3, 5].contains(&reply.exit_code()),
                "{}: {}",
                client.cn,
                reply.body
            );
        }
    }
    assert_eq!(sub.expect(T).await.payload_str(), certs.client_pkcs8.cn);
    assert_eq!(sub.recv(Duration::from_millis(300)).await, None);
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ws_to_a_plain_mqtt_port_is_exit_3_and_says_websocket() {
    let broker = Mosquitto::plain();
    let mut bed = TestBed::with_job_files_anywhere().await;
    let url = format!("ws://127.0.0.1:{}", broker.port());
    let reply = bed
        .run(with(job(&url, "t", "x"), json!({"timeout": 2000})), T)
        .await;
    assert_eq!(reply.exit_code(), 3, "{}", reply.body);
    let message = reply.message().to_lowercase();
    assert!(message.contains("websocket"), "{message}");
    bed.finish().await;
}
