//! Binary payloads: `content-encoding: "base64"` publishes the decoded bytes, every byte value
//! intact, at QoS 0, 1 and 2 over MQTT 3.1.1 and 5, through a worker consuming RabbitMQ and a
//! private Mosquitto; invalid base64 is exit-code 1 and nothing is published.

mod common;

use base64::Engine as _;
use common::worker::{TestBed, job, with};
use common::*;
use rumqttc::QoS;
use serde_json::json;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

/// Every byte value, 0 to 255, then the same reversed: 512 bytes no UTF-8 decoder would keep.
fn all_bytes() -> Vec<u8> {
    (0..=255u8).chain((0..=255u8).rev()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_byte_value_is_published_intact_at_every_qos_over_both_versions() {
    let broker = Mosquitto::plain();
    let topic = unique_name("bytes");
    let mut sub = Subscriber::start(broker.port(), &topic, QoS::ExactlyOnce).await;
    let mut bed = TestBed::new().await;
    let bytes = all_bytes();
    let content = base64::engine::general_purpose::STANDARD.encode(&bytes);
    for version in ["3.1.1", "5"] {
        for qos in [0, 1, 2] {
            let reply = bed
                .run(
                    with(
                        job(&broker.url(), &topic, &content),
                        json!({"content-encoding": "base64", "qos": qos, "mqtt-version": version}),
                    ),
                    T,
                )
                .await;
            assert_eq!(
                reply.exit_code(),
                0,
                "version {version}, qos {qos}: {}",
                reply.body
            );
            let got = sub.expect(T).await;
            assert_eq!(got.payload, bytes, "version {version}, qos {qos}");
        }
    }
    eprintln!(
        "{} bytes (base64 {} characters) published intact 6 times: QoS 0/1/2 x MQTT 3.1.1/5",
        bytes.len(),
        content.len()
    );
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_base64_is_exit_code_1_and_nothing_is_published() {
    let broker = Mosquitto::plain();
    let topic = unique_name("bad-base64");
    let mut sub = Subscriber::start(broker.port(), &topic, QoS::ExactlyOnce).await;
    let mut bed = TestBed::new().await;
    for version in ["3.1.1", "5"] {
        let reply = bed
            .run(
                with(
                    job(&broker.url(), &topic, "this is not base64!"),
                    json!({"content-encoding": "base64", "mqtt-version": version}),
                ),
                T,
            )
            .await;
        assert_eq!(reply.exit_code(), 1, "{}", reply.body);
        assert!(reply.message().contains("base64"), "{}", reply.body);
    }
    // A valid job after them is the first thing the subscriber sees.
    let reply = bed
        .run(
            with(
                job(&broker.url(), &topic, "b2s="),
                json!({"content-encoding": "base64"}),
            ),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    assert_eq!(sub.expect(T).await.payload, b"ok");
    bed.wait_queue_empty(T).await;
    bed.finish().await;
}
