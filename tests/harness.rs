//! Self-test of the integration-test harness in `tests/common` against the real brokers: each
//! Mosquitto kind, the certificates in all key formats, RabbitMQ, the proxy and the mock brokers.

mod common;

use common::mqtt::tls_options_with_ca;
use common::*;
use rumqttc::QoS;
use std::time::Duration;

const T: Duration = Duration::from_secs(5);

/// Publishes `payload` at QoS 1 through `publisher` and asserts `sub` receives it.
async fn roundtrip(publisher: &Publisher, sub: &mut Subscriber, topic: &str, payload: &str) {
    let acked = publisher
        .publish(topic, payload, QoS::AtLeastOnce, false)
        .await
        .expect("publish acknowledged");
    assert_eq!(acked, QoS::AtLeastOnce);
    let got = sub.expect(T).await;
    assert_eq!(got.topic, topic);
    assert_eq!(got.payload_str(), payload);
    assert_eq!(got.qos, QoS::AtLeastOnce);
    assert!(!got.retain);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_broker_roundtrip_and_restart() {
    let mut broker = Mosquitto::plain();
    assert_eq!(broker.url(), format!("tcp://127.0.0.1:{}", broker.port()));
    let topic = unique_name("t");
    let mut sub = Subscriber::start(broker.port(), &topic, QoS::AtLeastOnce).await;
    let publisher = Publisher::connect(mqtt_options("127.0.0.1", broker.port()))
        .await
        .expect("connect");
    roundtrip(&publisher, &mut sub, &topic, "hello").await;

    // QoS 2 end to end, and a retained message seen by a later subscriber.
    let acked = publisher
        .publish(&topic, "two", QoS::ExactlyOnce, true)
        .await
        .unwrap();
    assert_eq!(acked, QoS::ExactlyOnce);
    assert_eq!(sub.expect(T).await.payload_str(), "two");
    let mut late = Subscriber::start(broker.port(), &topic, QoS::ExactlyOnce).await;
    let retained = late.expect(T).await;
    assert!(retained.retain);
    assert_eq!(retained.qos, QoS::ExactlyOnce);

    // Kill: the port refuses; restart: same port, the subscriber comes back by itself.
    broker.kill();
    assert!(std::net::TcpStream::connect(("127.0.0.1", broker.port())).is_err());
    broker.restart();
    assert!(broker.is_running());
    let publisher = Publisher::connect(mqtt_options("127.0.0.1", broker.port()))
        .await
        .expect("connect after restart");
    // The subscriber re-subscribes after its reconnect; publish until it sees one.
    let deadline = tokio::time::Instant::now() + T;
    loop {
        publisher
            .publish(&topic, "again", QoS::AtLeastOnce, false)
            .await
            .unwrap();
        if let Some(r) = sub.recv(Duration::from_millis(300)).await {
            assert_eq!(r.payload_str(), "again");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "subscriber did not come back"
        );
    }
    assert!(
        broker.log().contains("mosquitto version"),
        "{}",
        broker.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn password_broker_accepts_user_and_refuses_others() {
    for broker in [
        Mosquitto::with_password("alice", "s3cret"),
        Mosquitto::with_generated_password("alice", "s3cret"),
    ] {
        let mut opts = mqtt_options("127.0.0.1", broker.port());
        opts.set_credentials("alice", "s3cret");
        let topic = unique_name("t");
        let mut sub = Subscriber::start_with(opts.clone(), &topic, QoS::AtLeastOnce).await;
        let mut opts2 = mqtt_options("127.0.0.1", broker.port());
        opts2.set_credentials("alice", "s3cret");
        let publisher = Publisher::connect(opts2).await.expect("connect");
        roundtrip(&publisher, &mut sub, &topic, "pw").await;

        let mut bad = mqtt_options("127.0.0.1", broker.port());
        bad.set_credentials("alice", "wrong");
        let err = Publisher::connect(bad).await.err().expect("refused");
        assert!(err.contains("NotAuthorized"), "{err}");
        let anonymous = Publisher::connect(mqtt_options("127.0.0.1", broker.port())).await;
        assert!(anonymous.is_err());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_broker_with_our_ca_and_every_key_format() {
    let certs = Certs::shared();
    let broker = Mosquitto::tls(certs);
    assert_eq!(broker.url(), format!("ssl://localhost:{}", broker.port()));
    let topic = unique_name("t");
    let mut sub = Subscriber::start_with(
        tls_options(broker.port(), certs, None),
        &topic,
        QoS::AtLeastOnce,
    )
    .await;
    // Server-only TLS, then each client key format (the broker does not require it but the
    // client presents it, which proves rustls can load it).
    let publisher = Publisher::connect(tls_options(broker.port(), certs, None))
        .await
        .expect("tls connect");
    roundtrip(&publisher, &mut sub, &topic, "tls").await;
    for client in certs.clients() {
        let publisher = Publisher::connect(tls_options(broker.port(), certs, Some(client)))
            .await
            .unwrap_or_else(|e| panic!("tls connect with {}: {e}", client.cn));
        roundtrip(&publisher, &mut sub, &topic, &client.cn).await;
    }
    // Trusting the wrong CA fails the handshake.
    let err = Publisher::connect(tls_options_with_ca(
        broker.port(),
        certs.other_ca_pem(),
        None,
    ))
    .await
    .err()
    .expect("wrong CA must fail");
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_broker_requires_a_client_cert_from_our_ca() {
    let certs = Certs::shared();
    let broker = Mosquitto::mutual_tls(certs);
    let topic = unique_name("t");
    let mut sub = Subscriber::start_with(
        tls_options(broker.port(), certs, Some(&certs.client_ec_sec1)),
        &topic,
        QoS::AtLeastOnce,
    )
    .await;
    for client in certs.clients() {
        let publisher = Publisher::connect(tls_options(broker.port(), certs, Some(client)))
            .await
            .unwrap_or_else(|e| panic!("mutual tls with {}: {e}", client.cn));
        roundtrip(&publisher, &mut sub, &topic, &client.cn).await;
    }
    // use_identity_as_username: the certificate's CN is the username in the broker's log.
    assert!(broker.log().contains("u'device-rsa'"), "{}", broker.log());
    // Under TLS 1.3 the broker's verdict arrives after the handshake, as an alert.
    let err = Publisher::connect(tls_options(broker.port(), certs, None))
        .await
        .err()
        .expect("no client certificate must be rejected");
    assert!(err.contains("CertificateRequired"), "{err}");
    let err = Publisher::connect(tls_options(
        broker.port(),
        certs,
        Some(&certs.untrusted_client),
    ))
    .await
    .err()
    .expect("a client certificate from another CA must be rejected");
    assert!(err.contains("UnknownCA"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_broker_accepts_tcp_but_answers_nothing() {
    let mut broker = Mosquitto::plain();
    broker.freeze();
    let connect = tokio::time::timeout(
        Duration::from_millis(500),
        Publisher::connect(mqtt_options("127.0.0.1", broker.port())),
    )
    .await;
    assert!(connect.is_err(), "a frozen broker sends no CONNACK");
    broker.thaw();
    Publisher::connect(mqtt_options("127.0.0.1", broker.port()))
        .await
        .expect("thawed broker answers");
}

#[test]
fn certificate_files_have_the_promised_formats() {
    let dir = tempfile::tempdir().unwrap();
    let certs = Certs::generate(dir.path());
    let head = |p: &std::path::Path| {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        head(&certs.client_rsa_pkcs1.key),
        "-----BEGIN RSA PRIVATE KEY-----"
    );
    assert_eq!(head(&certs.client_pkcs8.key), "-----BEGIN PRIVATE KEY-----");
    assert_eq!(
        head(&certs.client_ec_sec1.key),
        "-----BEGIN EC PRIVATE KEY-----"
    );
    for crt in [
        &certs.ca_crt,
        &certs.server_crt,
        &certs.other_ca_crt,
        &certs.untrusted_client.crt,
    ] {
        assert_eq!(head(crt), "-----BEGIN CERTIFICATE-----");
    }
    // openssl agrees the chain is valid for the server and each client, and not for the other CA.
    let verify = |ca: &std::path::Path, crt: &std::path::Path| {
        std::process::Command::new("openssl")
            .arg("verify")
            .arg("-CAfile")
            .arg(ca)
            .arg(crt)
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(verify(&certs.ca_crt, &certs.server_crt));
    for c in certs.clients() {
        assert!(verify(&certs.ca_crt, &c.crt), "{}", c.cn);
    }
    assert!(!verify(&certs.ca_crt, &certs.untrusted_client.crt));
    assert!(verify(&certs.other_ca_crt, &certs.untrusted_client.crt));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_job_and_reply_roundtrip() {
    let amqp = Amqp::connect().await;
    let queue = unique_name("jobs");
    amqp.declare_job_queue(&queue).await;
    assert_eq!(amqp.queue_message_count(&queue).await, Some(0));
    let (reply_queue, _) = (amqp.declare_reply_queue().await, ());
    amqp.send_job(
        &queue,
        br#"{"content":"hi"}"#,
        Some(&reply_queue),
        Some("c-1"),
    )
    .await;
    assert_eq!(amqp.queue_message_count(&queue).await, Some(1));

    // Play the worker: take the job, reply to its reply_to.
    let job = amqp.get_message(&queue).await.expect("a job");
    assert_eq!(job.body, br#"{"content":"hi"}"#);
    let reply_to = job.properties.reply_to().as_ref().unwrap().to_string();
    assert_eq!(reply_to, reply_queue);
    let mut replies = amqp.consume_replies(&reply_queue).await;
    for i in 0..3 {
        let props = lapin::BasicProperties::default()
            .with_correlation_id(format!("c-{i}").as_str().into())
            .with_content_type("application/json".into());
        let body = serde_json::json!({"exit-code": i, "message": "ok"}).to_string();
        amqp.publish(&reply_to, body.as_bytes(), props).await;
    }
    let first = replies.expect_reply(T).await;
    assert_eq!(first.correlation_id.as_deref(), Some("c-0"));
    assert_eq!(first.content_type.as_deref(), Some("application/json"));
    assert_eq!(first.exit_code(), 0);
    assert_eq!(first.message(), "ok");
    let rest = replies.expect_replies(2, T).await;
    assert_eq!(rest[1].exit_code(), 2);
    replies.expect_no_reply(Duration::from_millis(100)).await;

    // Direct reply-to works through the same channel.
    let mut direct = amqp.direct_reply_to().await;
    amqp.send_job(
        &queue,
        b"{}",
        Some(common::amqp::DIRECT_REPLY_TO),
        Some("d-1"),
    )
    .await;
    let job = amqp.get_message(&queue).await.expect("a job");
    let to = job.properties.reply_to().as_ref().unwrap().to_string();
    assert!(to.starts_with("amq.rabbitmq.reply-to."), "{to}");
    // Reply as a worker would: from another connection, mandatory. RabbitMQ 3.10 delivers it
    // and yet returns it as NO_ROUTE (Ack(Some(returned))): a worker must not take that return
    // as a failed reply for `amq.rabbitmq.reply-to.*`.
    let worker = Amqp::connect().await;
    let confirmation = worker
        .publish_confirmed(
            &to,
            br#"{"exit-code":0,"message":"direct"}"#,
            lapin::BasicProperties::default().with_correlation_id("d-1".into()),
            true,
        )
        .await;
    assert!(
        matches!(confirmation, lapin::Confirmation::Ack(_)),
        "{confirmation:?}"
    );
    assert_eq!(direct.expect_reply(T).await.message(), "direct");

    amqp.delete_queue(&queue).await;
    assert_eq!(amqp.queue_message_count(&queue).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[should_panic(expected = "returned unroutable")]
async fn send_job_to_a_missing_queue_panics() {
    let amqp = Amqp::connect().await;
    amqp.send_job(&unique_name("missing"), b"{}", None, None)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_forwards_cuts_stalls_and_refuses() {
    let broker = Mosquitto::plain();
    let proxy = TcpProxy::start(broker.port()).await;
    let topic = unique_name("t");
    let mut sub = Subscriber::start(broker.port(), &topic, QoS::AtLeastOnce).await;
    let mut via_proxy = Subscriber::start(proxy.port(), &topic, QoS::AtLeastOnce).await;
    let publisher = Publisher::connect(mqtt_options("127.0.0.1", proxy.port()))
        .await
        .expect("connect through proxy");
    assert_eq!(proxy.stats().active, 2);
    roundtrip(&publisher, &mut sub, &topic, "through").await;
    assert_eq!(via_proxy.expect(T).await.payload_str(), "through");

    // Stall: the publish is held, nothing is closed; resume delivers it.
    proxy.stall();
    let p = publisher.client().clone();
    p.publish(
        topic.clone(),
        "held",
        rumqttc::PublishOptions::new(QoS::AtLeastOnce),
    )
    .await
    .unwrap();
    assert_eq!(sub.recv(Duration::from_millis(300)).await, None);
    assert_eq!(proxy.stats().active, 2);
    proxy.resume();
    assert_eq!(sub.expect(T).await.payload_str(), "held");
    assert_eq!(via_proxy.expect(T).await.payload_str(), "held");

    // Refuse + cut: both proxied clients lose their connection and cannot come back.
    proxy.refuse();
    proxy.cut();
    proxy.wait_for(|s| s.active == 0 && s.refused >= 1, T).await;
    let err = Publisher::connect(mqtt_options("127.0.0.1", proxy.port()))
        .await
        .err()
        .expect("refused");
    assert!(!err.is_empty());
    // Accept again: the clients reconnect by themselves.
    proxy.accept();
    proxy.wait_for(|s| s.active == 2 && s.total >= 4, T).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_cut_breaks_a_raw_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let echo = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .unwrap();
    let echo_port = echo.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = echo.accept().await {
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    let proxy = TcpProxy::start(echo_port).await;
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", proxy.port()))
        .await
        .unwrap();
    conn.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(T, conn.read_exact(&mut buf))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&buf, b"ping");
    proxy.cut();
    let n = tokio::time::timeout(T, conn.read(&mut buf))
        .await
        .expect("cut closes the connection")
        .unwrap_or(0);
    assert_eq!(n, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_brokers_behave_as_documented() {
    // Silent: TCP connects, no CONNACK ever.
    let silent = SilentServer::start().await;
    let mut opts = mqtt_options("127.0.0.1", silent.port());
    opts.set_keep_alive(5);
    let connect = tokio::time::timeout(Duration::from_millis(500), Publisher::connect(opts)).await;
    assert!(connect.is_err(), "no CONNACK: still connecting");
    assert_eq!(silent.stats().connections, 1);

    // CONNACK then silent: connects, publishes are read but never acknowledged.
    let mock = ConnackThenSilent::start().await;
    let publisher = Publisher::connect(mqtt_options("127.0.0.1", mock.port()))
        .await
        .expect("mock CONNACK accepted");
    let notice = publisher
        .client()
        .publish_tracked(
            "t".to_string(),
            "x",
            rumqttc::PublishOptions::new(QoS::AtLeastOnce),
        )
        .await
        .unwrap();
    mock.wait_for(|s| s.publishes == 1, T).await;
    let waited = tokio::time::timeout(Duration::from_millis(300), notice.wait_async()).await;
    assert!(waited.is_err(), "never acknowledged");
    assert_eq!(mock.stats().connects, 1);

    // CONNACK then close: the connection is accepted then lost, again and again.
    let closing = ConnackThenClose::start().await;
    let (client, mut eventloop) =
        rumqttc::AsyncClient::builder(mqtt_options("127.0.0.1", closing.port())).build();
    let mut saw_connack = false;
    let mut saw_error = false;
    let deadline = tokio::time::Instant::now() + T;
    while !(saw_connack && saw_error) && tokio::time::Instant::now() < deadline {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_)))) => saw_connack = true,
            Ok(Ok(_)) => {}
            Ok(Err(_)) => saw_error = saw_connack,
            Err(_) => break,
        }
    }
    drop(client);
    assert!(saw_connack && saw_error);
    assert!(closing.stats().connects >= 1);
}

#[test]
fn helpers() {
    let a = free_port();
    assert!(std::net::TcpListener::bind(("127.0.0.1", a)).is_ok());
    let n = unique_name("q");
    assert!(n.starts_with("q-") && n.len() == 2 + 32);
    assert_ne!(unique_name("q"), n);
    let dir = tempfile::tempdir().unwrap();
    let path = write_connector(
        &dir.path().join("connectors"),
        "flint",
        serde_json::json!({"broker": "tcp://localhost:1883", "qos": 2}),
    );
    assert_eq!(path, dir.path().join("connectors/flint.json"));
    let back: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(back["qos"], 2);
    assert!(amqp_url().starts_with("amqp://"));
}
