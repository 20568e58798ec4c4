//! Every transport the contract names, each proven by a subscriber receiving what the worker
//! published: `ssl://` with `root-ca-crt`, mutual TLS with each of the three client key formats
//! (PKCS#1 RSA, PKCS#8, SEC1 EC), the `mqtt://` and `mqtts://` schemes, username and password;
//! mutual TLS without a client certificate fails with exit-code 5; and the worker offers the
//! ALPN protocol a job names (`x-amzn-mqtt-ca`).

mod common;

use common::worker::{TestBed, job, with};
use common::*;
use rumqttc::QoS;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssl_with_root_ca_crt_and_mqtts_scheme() {
    let certs = Certs::shared();
    let broker = Mosquitto::tls(certs);
    let topic = unique_name("t");
    let mut sub = Subscriber::start_with(
        tls_options(broker.port(), certs, None),
        &topic,
        QoS::ExactlyOnce,
    )
    .await;
    let mut bed = TestBed::with_job_files_anywhere().await;
    for scheme in ["ssl", "mqtts"] {
        let url = format!("{scheme}://localhost:{}", broker.port());
        let reply = bed
            .run(
                with(
                    job(&url, &topic, scheme),
                    json!({"root-ca-crt": certs.ca_crt}),
                ),
                T,
            )
            .await;
        assert_eq!(reply.exit_code(), 0, "{scheme}: {}", reply.body);
        assert_eq!(sub.expect(T).await.payload_str(), scheme);
    }
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_each_client_key_format() {
    let certs = Certs::shared();
    let broker = Mosquitto::mutual_tls(certs);
    let topic = unique_name("t");
    let mut sub = Subscriber::start_with(
        tls_options(broker.port(), certs, Some(&certs.client_ec_sec1)),
        &topic,
        QoS::ExactlyOnce,
    )
    .await;
    let mut bed = TestBed::with_job_files_anywhere().await;
    for client in [
        &certs.client_rsa_pkcs1,
        &certs.client_pkcs8,
        &certs.client_ec_sec1,
    ] {
        let reply = bed
            .run(
                with(
                    job(&broker.url(), &topic, &client.cn),
                    json!({
                        "root-ca-crt": certs.ca_crt,
                        "use-certificate": true,
                        "certificate": client.crt,
                        "private-key": client.key,
                    }),
                ),
                T,
            )
            .await;
        assert_eq!(reply.exit_code(), 0, "{}: {}", client.cn, reply.body);
        assert_eq!(sub.expect(T).await.payload_str(), client.cn);
        // use_identity_as_username: the broker saw this very certificate.
        assert!(
            broker.log().contains(&format!("u'{}'", client.cn)),
            "{}",
            broker.log()
        );
    }
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_without_client_certificate_is_exit_5() {
    let certs = Certs::shared();
    let broker = Mosquitto::mutual_tls(certs);
    let mut bed = TestBed::with_job_files_anywhere().await;
    let reply = bed
        .run(
            with(
                job(&broker.url(), "t", "x"),
                json!({"root-ca-crt": certs.ca_crt, "timeout": 3000}),
            ),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 5, "{}", reply.body);
    let message = reply.message();
    assert!(
        message.contains(&format!("localhost:{}", broker.port())),
        "{message}"
    );
    assert!(
        message.contains("TLS") && message.to_lowercase().contains("certificate"),
        "says a client certificate is wanted: {message}"
    );
    assert_eq!(reply.body["attempts"], 1, "not retried: {}", reply.body);

    // A certificate from another CA is rejected by the broker: also 5.
    let reply = bed
        .run(
            with(
                job(&broker.url(), "t", "x"),
                json!({
                    "root-ca-crt": certs.ca_crt,
                    "use-certificate": true,
                    "certificate": certs.untrusted_client.crt,
                    "private-key": certs.untrusted_client.key,
                    "timeout": 3000,
                }),
            ),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 5, "{}", reply.body);
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt_and_tcp_schemes() {
    let broker = Mosquitto::plain();
    let topic = unique_name("t");
    let mut sub = Subscriber::start(broker.port(), &topic, QoS::ExactlyOnce).await;
    let mut bed = TestBed::with_job_files_anywhere().await;
    for scheme in ["mqtt", "tcp"] {
        let url = format!("{scheme}://127.0.0.1:{}", broker.port());
        let reply = bed.run(job(&url, &topic, scheme), T).await;
        assert_eq!(reply.exit_code(), 0, "{scheme}: {}", reply.body);
        assert_eq!(sub.expect(T).await.payload_str(), scheme);
    }
    bed.finish().await;
}

/// Without a port, `mqtt://` means 1883: the machine's own Mosquitto.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_port_defaults_to_1883() {
    let topic = unique_name("t");
    let mut sub = Subscriber::start(1883, &topic, QoS::ExactlyOnce).await;
    let mut bed = TestBed::with_job_files_anywhere().await;
    let reply = bed
        .run(job("mqtt://127.0.0.1", &topic, "default port"), T)
        .await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    assert!(reply.message().contains("127.0.0.1:1883"), "{}", reply.body);
    assert_eq!(sub.expect(T).await.payload_str(), "default port");
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn username_and_password_accepted() {
    let broker = Mosquitto::with_password("alice", "pw-7f3a-SECRET");
    let topic = unique_name("t");
    let mut opts = mqtt_options("127.0.0.1", broker.port());
    opts.set_credentials("alice", "pw-7f3a-SECRET");
    let mut sub = Subscriber::start_with(opts, &topic, QoS::ExactlyOnce).await;
    let mut bed = TestBed::with_job_files_anywhere().await;
    let reply = bed
        .run(
            with(
                job(&broker.url(), &topic, "authenticated"),
                json!({"username": "alice", "password": "pw-7f3a-SECRET"}),
            ),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    assert!(!String::from_utf8_lossy(&reply.raw).contains("pw-7f3a-SECRET"));
    assert_eq!(sub.expect(T).await.payload_str(), "authenticated");
    bed.finish().await;
}

/// What the ALPN test server saw.
#[derive(Default)]
struct Seen {
    /// The ALPN protocols each client offered in its ClientHello.
    offered: Vec<Vec<String>>,
    /// The payloads of the PUBLISH packets received.
    published: Vec<Vec<u8>>,
}

/// A TLS server with our test server certificate that records the ALPN protocols each client
/// offers, selects `x-amzn-mqtt-ca`, and speaks just enough MQTT 3.1.1 to accept a connection
/// (CONNACK) and acknowledge QoS 1 publishes (PUBACK).
///
/// It stands in for AWS IoT Core on port 443, which requires ALPN `x-amzn-mqtt-ca`: no real
/// broker on this machine checks ALPN (Mosquitto 2.0.11 has no option for it), so this server
/// proves the worker offers what the job names.
async fn alpn_server(certs: &Certs) -> (u16, Arc<Mutex<Seen>>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&certs.server_crt)
        .expect("open server certificate")
        .collect::<Result<_, _>>()
        .expect("read server certificate");
    let key = PrivateKeyDer::from_pem_file(&certs.server_key).expect("read server key");
    let mut config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("server config");
    config.alpn_protocols = vec![b"x-amzn-mqtt-ca".to_vec()];
    let config = Arc::new(config);
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind ALPN server");
    let port = listener.local_addr().expect("local_addr").port();
    let seen = Arc::new(Mutex::new(Seen::default()));
    let seen_by_server = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (config, seen) = (config.clone(), seen_by_server.clone());
            tokio::spawn(async move {
                let acceptor =
                    tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp);
                let Ok(start) = acceptor.await else { return };
                let offered: Vec<String> = start
                    .client_hello()
                    .alpn()
                    .map(|protocols| {
                        protocols
                            .map(|p| String::from_utf8_lossy(p).into_owned())
                            .collect()
                    })
                    .unwrap_or_default();
                seen.lock().expect("lock").offered.push(offered);
                let Ok(mut tls) = start.into_stream(config).await else {
                    return;
                };
                loop {
                    // One MQTT packet: fixed header, remaining length, body.
                    let Ok(first) = tls.read_u8().await else {
                        return;
                    };
                    let (mut len, mut shift) = (0usize, 0);
                    loop {
                        let Ok(b) = tls.read_u8().await else { return };
                        len |= usize::from(b & 0x7f) << shift;
                        shift += 7;
                        if b & 0x80 == 0 {
                            break;
                        }
                    }
                    let mut body = vec![0u8; len];
                    if tls.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let answer: Vec<u8> = match first >> 4 {
                        1 => vec![0x20, 0x02, 0x00, 0x00], // CONNECT → CONNACK accepted
                        3 => {
                            let qos = (first >> 1) & 0x03;
                            let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
                            let mut at = 2 + topic_len;
                            let mut ack = Vec::new();
                            if qos > 0 {
                                ack = vec![0x40, 0x02, body[at], body[at + 1]]; // PUBACK
                                at += 2;
                            }
                            seen.lock()
                                .expect("lock")
                                .published
                                .push(body[at..].to_vec());
                            ack
                        }
                        12 => vec![0xd0, 0x00], // PINGREQ → PINGRESP
                        _ => Vec::new(),
                    };
                    if !answer.is_empty() && tls.write_all(&answer).await.is_err() {
                        return;
                    }
                    let _ = tls.flush().await;
                }
            });
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_the_alpn_protocols_the_job_names() {
    let certs = Certs::shared();
    install_crypto_provider();
    let (port, seen) = alpn_server(certs).await;
    let mut bed = TestBed::with_job_files_anywhere().await;
    let url = format!("ssl://localhost:{port}");
    let reply = bed
        .run(
            with(
                job(&url, "$aws/things/thing-name/shadow/update", "alpn"),
                json!({"root-ca-crt": certs.ca_crt, "alpn": "x-amzn-mqtt-ca"}),
            ),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    {
        let seen = seen.lock().expect("lock");
        assert_eq!(seen.offered, vec![vec!["x-amzn-mqtt-ca".to_string()]]);
        assert_eq!(seen.published, vec![b"alpn".to_vec()]);
    }

    // A list is offered whole, in order; no `alpn` offers none.
    let reply = bed
        .run(
            with(
                job(&url, "t", "list"),
                json!({"root-ca-crt": certs.ca_crt, "alpn": ["x-amzn-mqtt-ca", "mqtt"]}),
            ),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    let reply = bed
        .run(
            with(job(&url, "t", "none"), json!({"root-ca-crt": certs.ca_crt})),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    {
        let seen = seen.lock().expect("lock");
        assert_eq!(
            seen.offered[1..],
            [
                vec!["x-amzn-mqtt-ca".to_string(), "mqtt".to_string()],
                Vec::<String>::new()
            ]
        );
    }
    bed.finish().await;
}
