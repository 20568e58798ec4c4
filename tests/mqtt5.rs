//! MQTT 5 end to end, through a worker consuming RabbitMQ, against a private Mosquitto 2.0
//! speaking MQTT 5 (and amqtt, which speaks only 3.1.1): every publish property as a real
//! MQTT 5 subscriber receives it, message expiry, PUBACK/PUBREC reason codes (exit-code 8 for
//! a refusal, "no matching subscribers" for 0x10), CONNACK reason codes, the broker's Maximum
//! Packet Size and Receive Maximum, and a server DISCONNECT's reason in the job's message.

mod common;

use common::worker::{TestBed, job, with};
use common::*;
use rumqttc5::QoS;
use serde_json::json;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

/// `job` over MQTT 5.
fn job5(broker: &str, topic: &str, content: &str) -> serde_json::Value {
    with(job(broker, topic, content), json!({"mqtt-version": "5"}))
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter()
        .map(|(n, v)| ((*n).to_owned(), (*v).to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_property_reaches_an_mqtt_5_subscriber_in_order() {
    let broker = Mosquitto::plain();
    let topic = unique_name("props");
    let mut sub = Subscriber5::start(broker.port(), &topic, QoS::AtLeastOnce).await;
    let mut bed = TestBed::new().await;
    let reply = bed
        .run(
            with(
                job5(&broker.url(), &topic, "{\"temp\": 21.5}"),
                json!({
                    "message-expiry": 120,
                    "content-type": "application/json",
                    "user-properties": [["site", "north"], ["tag", "a"], ["tag", "b"]],
                    "response-topic": "replies/42",
                    "correlation-data": "request-42",
                    "payload-format": "utf-8",
                }),
            ),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    let got = sub.expect(T).await;
    assert_eq!(got.payload, b"{\"temp\": 21.5}");
    let p = got.properties.expect("the publish carried properties");
    eprintln!("received MQTT 5 properties: {p:?}");
    // Mosquitto forwards the remaining lifetime: at most what was set, a second less at worst.
    let expiry = p.message_expiry_interval.expect("message expiry");
    assert!((119..=120).contains(&expiry), "{expiry}");
    assert_eq!(p.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        p.user_properties,
        pairs(&[("site", "north"), ("tag", "a"), ("tag", "b")])
    );
    assert_eq!(p.response_topic.as_deref(), Some("replies/42"));
    assert_eq!(p.correlation_data.as_deref(), Some(&b"request-42"[..]));
    assert_eq!(p.payload_format_indicator, Some(1));

    // The object form keeps the order written: a literal body (json!() would sort the keys).
    let body = format!(
        r#"{{"broker": "{}", "client-id": "{}", "topic": "{topic}", "content": "x", "qos": 1,
            "mqtt-version": 5, "payload-format": "bytes",
            "user-properties": {{"zulu": "1", "alpha": "2", "mike": "3"}}}}"#,
        broker.url(),
        unique_name("worker")
    );
    let reply = bed.run_raw(body.as_bytes(), T).await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    let p = sub.expect(T).await.properties.expect("properties");
    assert_eq!(
        p.user_properties,
        pairs(&[("zulu", "1"), ("alpha", "2"), ("mike", "3")])
    );
    assert_eq!(p.payload_format_indicator, Some(0));
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_retained_message_is_gone_for_a_late_subscriber() {
    let broker = Mosquitto::plain();
    let prefix = unique_name("expiry");
    let mut bed = TestBed::new().await;
    for (leaf, expiry) in [("short", 1), ("long", 600)] {
        let topic = format!("{prefix}/{leaf}");
        let reply = bed
            .run(
                with(
                    job5(&broker.url(), &topic, leaf),
                    json!({"retain": true, "message-expiry": expiry}),
                ),
                T,
            )
            .await;
        assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    }
    // The expiry is what is measured: a subscriber arriving 3 s later, 2 s after the first
    // retained message expired.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut late =
        Subscriber5::start(broker.port(), &format!("{prefix}/#"), QoS::AtLeastOnce).await;
    let got = late.expect(T).await;
    assert_eq!(got.topic, format!("{prefix}/long"), "{got:?}");
    assert!(got.retain);
    let remaining = got.properties.and_then(|p| p.message_expiry_interval);
    eprintln!("late subscriber: got the 600 s message (remaining expiry {remaining:?} s)");
    // Retained messages are sent together right after SUBACK: the expired one would be here.
    assert!(
        late.recv(Duration::from_millis(500)).await.is_none(),
        "the 1 s message was still delivered after 3 s"
    );
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_acl_denied_publish_is_exit_code_8_over_5_and_silently_dropped_over_3_1_1() {
    let acl = "user alice\ntopic read #\ntopic write allowed/#\n";
    let broker = Mosquitto::with_acl("alice", "secret", acl);
    let mut sub = Subscriber5::start_with(
        broker.port(),
        "#",
        QoS::ExactlyOnce,
        Some(("alice", "secret")),
    )
    .await;
    let mut bed = TestBed::new().await;
    let alice = json!({"username": "alice", "password": "secret"});
    let denied = unique_name("denied");

    for qos in [1, 2] {
        let reply = bed
            .run(
                with(
                    job5(&broker.url(), &denied, "no"),
                    with(alice.clone(), json!({"qos": qos})),
                ),
                T,
            )
            .await;
        assert_eq!(reply.exit_code(), 8, "qos {qos}: {}", reply.body);
        assert!(
            reply.message().contains("not authorized (0x87)"),
            "{}",
            reply.body
        );
        assert_eq!(reply.body["attempts"], 1, "not retried: {}", reply.body);
    }

    // MQTT 3.1.1 has no way to say no: Mosquitto acknowledges and drops the message.
    let reply = bed
        .run(with(job(&broker.url(), &denied, "no"), alice.clone()), T)
        .await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);

    // A sentinel the subscriber may read, published after: it must be the first thing it sees
    // (Mosquitto routes a publish to subscribers before acknowledging it).
    let allowed = format!("allowed/{}", unique_name("t"));
    let reply = bed
        .run(with(job5(&broker.url(), &allowed, "yes"), alice), T)
        .await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    let first = sub.expect(T).await;
    assert_eq!(
        first.topic, allowed,
        "a denied message was published: {first:?}"
    );
    // The refusals were final: nothing requeued.
    bed.wait_queue_empty(T).await;
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_over_5_is_exit_code_4_naming_the_reason_code_sent() {
    let broker = Mosquitto::with_password("alice", "secret");
    let mut bed = TestBed::new().await;
    let reply = bed
        .run(
            with(
                job5(&broker.url(), "t", "x"),
                json!({"username": "alice", "password": "wrong-pw-123"}),
            ),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 4, "{}", reply.body);
    // Mosquitto 2.0 answers 0x87 not authorized, not 0x86 bad user name or password.
    assert!(
        reply.message().contains("not authorized (0x87)"),
        "{}",
        reply.body
    );
    assert!(!reply.message().contains("wrong-pw-123"), "{}", reply.body);
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_speaks_only_3_1_1_asked_for_5_is_exit_code_4() {
    let broker = amqtt::Amqtt::start(None);
    let url = format!("tcp://127.0.0.1:{}", broker.tcp_port());
    let mut bed = TestBed::new().await;
    let started = Instant::now();
    let reply = bed.run(job5(&url, "t", "x"), T).await;
    assert_eq!(reply.exit_code(), 4, "{}", reply.body);
    assert!(
        reply.message().contains("does not speak MQTT 5"),
        "{}",
        reply.body
    );
    eprintln!(
        "amqtt asked for MQTT 5: exit-code 4 in {} ms",
        started.elapsed().as_millis()
    );
    // The same job over 3.1.1 is published.
    let reply = bed.run(job(&url, "t", "x"), T).await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_matching_subscribers_is_a_success_that_says_so() {
    let broker = Mosquitto::plain();
    let topic = unique_name("nobody");
    let mut bed = TestBed::new().await;
    let reply = bed.run(job5(&broker.url(), &topic, "x"), T).await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    assert!(
        reply.message().contains("no matching subscribers"),
        "{}",
        reply.body
    );
    let mut sub = Subscriber5::start(broker.port(), &topic, QoS::AtLeastOnce).await;
    let reply = bed.run(job5(&broker.url(), &topic, "x"), T).await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    assert!(
        !reply.message().contains("no matching subscribers"),
        "{}",
        reply.body
    );
    sub.expect(T).await;
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_brokers_maximum_packet_size_and_receive_maximum_are_respected() {
    // Mosquitto announces both in CONNACK: Maximum Packet Size 1000, Receive Maximum 3. A
    // client over the Receive Maximum gets PUBREC 0x97 (quota exceeded) for the excess.
    let broker = Mosquitto::plain_with("max_packet_size 1000\nmax_inflight_messages 3\n");
    let topic = unique_name("limits");
    let mut sub = Subscriber5::start(broker.port(), &topic, QoS::ExactlyOnce).await;
    let mut bed = TestBed::new().await;
    let client_id = unique_name("one-connection");

    let big = "x".repeat(1200);
    let reply = bed
        .run(
            with(
                job5(&broker.url(), &topic, &big),
                json!({"client-id": client_id}),
            ),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 1, "{}", reply.body);
    assert!(
        reply.message().contains("Maximum Packet Size"),
        "{}",
        reply.body
    );

    // 60 QoS 2 jobs at once on one connection: never more than 3 in flight, so none refused.
    let n = 60;
    let started = Instant::now();
    for i in 0..n {
        bed.amqp
            .send_job(
                &bed.queue,
                with(
                    job5(&broker.url(), &topic, &format!("m{i}")),
                    json!({"client-id": client_id, "qos": 2}),
                )
                .to_string()
                .as_bytes(),
                Some(&bed.reply_queue),
                None,
            )
            .await;
    }
    let replies = bed.replies.expect_replies(n, T).await;
    for reply in &replies {
        assert_eq!(reply.exit_code(), 0, "{}", reply.body);
        assert_eq!(reply.body["attempts"], 1, "retried: {}", reply.body);
    }
    eprintln!(
        "{n} QoS 2 jobs on one MQTT 5 connection with Receive Maximum 3: all 0 in {} ms",
        started.elapsed().as_millis()
    );
    // The first thing the subscriber got is a small message: the large one was never sent.
    let first = sub.expect(T).await;
    assert!(first.payload.len() < 10, "{} bytes", first.payload.len());
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_disconnect_reason_reaches_the_message_of_the_job_it_ended() {
    let broker = DisconnectOnPublish5::start().await;
    let mut bed = TestBed::new().await;
    let reply = bed
        .run(
            with(job5(&broker.url(), "t", "x"), json!({"timeout": 1500})),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 7, "{}", reply.body);
    assert!(
        reply.message().contains("administrative action (0x98)"),
        "{}",
        reply.body
    );
    assert!(
        reply.message().contains(mock::DISCONNECT_REASON_STRING),
        "{}",
        reply.body
    );
    bed.finish().await;
}

/// Runs `mqtt-connector send ARGS` to completion (off the async threads) and returns its exit
/// status and the result JSON it printed.
async fn send(args: Vec<String>) -> (i32, serde_json::Value) {
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_mqtt-connector"))
            .arg("send")
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
    })
    .await
    .expect("join")
    .expect("run mqtt-connector send");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().unwrap_or_default();
    let json = serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "not a result ({e}): {stdout:?}; stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code().unwrap_or(-1), json)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_set_types_every_new_key() {
    let broker = Mosquitto::plain();
    let topic = unique_name("cli5");
    let mut sub = Subscriber5::start(broker.port(), &topic, QoS::AtLeastOnce).await;
    let connectors = common::worker::connectors_dir();
    let base = |user_properties: &str| -> Vec<String> {
        [
            "--connectors",
            connectors.path().to_str().expect("utf-8"),
            "--set",
            &format!("broker={}", broker.url()),
            "--set",
            &format!("client-id={}", unique_name("cli")),
            "--set",
            &format!("topic={topic}"),
            "--set",
            "qos=1",
            "--set",
            "mqtt-version=5",
            "--set",
            "message-expiry=90",
            "--set",
            "content-type=text/plain",
            "--set",
            &format!("user-properties={user_properties}"),
            "--set",
            "response-topic=replies/cli",
            "--set",
            "correlation-data=corr-1",
            "--set",
            "payload-format=utf-8",
            "--set",
            "content-encoding=base64",
            "--set",
            "content=aMOpbGxv", // "héllo"
        ]
        .map(str::to_owned)
        .to_vec()
    };

    let (status, result) = send(base(r#"[["k","1"],["k","2"]]"#)).await;
    assert_eq!(status, 0, "{result}");
    let got = sub.expect(T).await;
    assert_eq!(got.payload, "héllo".as_bytes());
    let p = got.properties.expect("properties");
    assert!(
        p.message_expiry_interval
            .is_some_and(|s| (89..=90).contains(&s))
    );
    assert_eq!(p.content_type.as_deref(), Some("text/plain"));
    assert_eq!(p.user_properties, pairs(&[("k", "1"), ("k", "2")]));
    assert_eq!(p.response_topic.as_deref(), Some("replies/cli"));
    assert_eq!(p.correlation_data.as_deref(), Some(&b"corr-1"[..]));
    assert_eq!(p.payload_format_indicator, Some(1));

    let (status, result) = send(base(r#"{"z":"1","a":"2"}"#)).await;
    assert_eq!(status, 0, "{result}");
    let p = sub.expect(T).await.properties.expect("properties");
    assert_eq!(p.user_properties, pairs(&[("z", "1"), ("a", "2")]));

    // The same keys over 3.1.1: exit-code 1 naming the first property and the version it needs.
    let mut args = base("{}");
    let version = args
        .iter()
        .position(|a| a == "mqtt-version=5")
        .expect("version arg");
    args[version] = "mqtt-version=3.1.1".into();
    let (status, result) = send(args).await;
    assert_eq!(status, 1, "{result}");
    let message = result["message"].as_str().unwrap_or_default();
    assert!(
        message.contains("message-expiry") && message.contains("mqtt-version"),
        "{result}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_over_5_and_one_reused_connection_per_version() {
    let certs = Certs::shared();
    let broker = Mosquitto::mutual_tls(certs);
    let client = &certs.client_pkcs8;
    // The files come from a connector (a job body may not name files by default).
    let connectors = common::worker::connectors_dir();
    write_connector(
        connectors.path(),
        "mtls",
        json!({
            "broker": broker.url(),
            "qos": 1,
            "root-ca-crt": certs.ca_crt,
            "use-certificate": true,
            "certificate": client.crt,
            "private-key": client.key,
        }),
    );
    let mut bed = TestBed::start(connectors).await;
    let (id5, id311) = (unique_name("five"), unique_name("three"));
    for i in 0..3 {
        for (version, id) in [("5", &id5), ("3.1.1", &id311)] {
            let reply = bed
                .run(
                    json!({"connector": "mtls", "topic": "tls/t", "content": format!("{version}-{i}"),
                           "mqtt-version": version, "client-id": id}),
                    T,
                )
                .await;
            assert_eq!(reply.exit_code(), 0, "{version}: {}", reply.body);
        }
    }
    // Mosquitto writes a client's protocol in its log: p5 for MQTT 5, p2 for 3.1.1. Six jobs,
    // one connection per version, each reused.
    let log = broker.log();
    let connected = |version: &str, id: &str| {
        log.lines()
            .filter(|l| l.contains("New client connected") && l.contains(id))
            .filter(|l| l.contains(&format!("({version},")))
            .count()
    };
    assert_eq!(connected("p5", &id5), 1, "{log}");
    assert_eq!(connected("p2", &id311), 1, "{log}");
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_publish_to_a_broker_without_retain_is_exit_code_8() {
    let broker = Mosquitto::plain_with("retain_available false\n");
    let mut bed = TestBed::new().await;
    let reply = bed
        .run(
            with(job5(&broker.url(), "t", "x"), json!({"retain": true})),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 8, "{}", reply.body);
    assert!(
        reply.message().contains("retain not supported (0x9A)"),
        "{}",
        reply.body
    );
    let reply = bed.run(job5(&broker.url(), "t", "x"), T).await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    bed.finish().await;
}
