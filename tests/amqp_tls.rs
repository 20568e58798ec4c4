//! TLS to RabbitMQ against a private node with a TLS listener (certificates from the harness'
//! CA, `verify_peer`, the `rabbitmq_auth_mechanism_ssl` plugin for EXTERNAL): `amqps://` with
//! the right CA answers a job; the wrong CA is refused with a log line naming the TLS failure
//! while `/readyz` stays 503; a client certificate with `auth_mechanism=external` logs in as
//! its CN, without a password.

mod common;

use std::time::Duration;

use common::child::ChildWorker;
use common::worker::spawn_worker_with;
use common::{Certs, Mosquitto, RabbitCluster, RabbitConfig, Subscriber, unique_name};
use mqtt_connector::amqp::queue::QueueSettings;
use mqtt_connector::amqp::tls::TlsFiles;
use mqtt_connector::client::{Client, ClientError, ClientOptions, JobRequest};
use mqtt_connector::outcome::ExitCode;
use mqtt_connector::worker::WorkerOptions;
use rumqttc::QoS;

fn tls_node_config(certs: &Certs) -> RabbitConfig {
    RabbitConfig {
        tls_listener: true,
        plugins: vec!["rabbitmq_auth_mechanism_ssl".into()],
        // Peers are verified when they present a certificate; a client without one logs in
        // with a password (the right-CA case), one with one may use EXTERNAL.
        extra_conf: format!(
            "ssl_options.cacertfile = {}\n\
             ssl_options.certfile = {}\n\
             ssl_options.keyfile = {}\n\
             ssl_options.verify = verify_peer\n\
             ssl_options.fail_if_no_peer_cert = false\n\
             auth_mechanisms.1 = PLAIN\n\
             auth_mechanisms.2 = AMQPLAIN\n\
             auth_mechanisms.3 = EXTERNAL\n\
             ssl_cert_login_from = common_name\n",
            certs.ca_crt.display(),
            certs.server_crt.display(),
            certs.server_key.display()
        ),
    }
}

/// A job for `mosquitto` on `topic` with `content`.
fn job(mosquitto: &Mosquitto, topic: &str, content: &str) -> JobRequest {
    JobRequest::new()
        .broker(mosquitto.url())
        .client_id(unique_name("tls"))
        .topic(topic)
        .content(content)
        .qos(1)
        .timeout(Duration::from_secs(5))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn amqps_right_ca_wrong_ca_and_external_login() {
    common::install_crypto_provider();
    let certs = Certs::shared();
    let node = RabbitCluster::start(1, &tls_node_config(certs)).await;
    let tls_port = node.tls_port(0);
    let login = &certs.client_pkcs8;
    node.ctl(
        0,
        &["add_user", &login.cn, &uuid::Uuid::new_v4().to_string()],
    );
    node.ctl(
        0,
        &["set_permissions", "-p", "/", &login.cn, ".*", ".*", ".*"],
    );
    let mosquitto = Mosquitto::plain();
    let topic = unique_name("amqps");
    let mut subscriber = Subscriber::start(mosquitto.port(), &topic, QoS::AtLeastOnce).await;
    let connectors = common::worker::connectors_dir();

    // 1. The right CA, password login over TLS.
    let queue = unique_name("tls-jobs");
    let url = format!("amqps://guest:guest@localhost:{tls_port}/%2f");
    let right_ca = TlsFiles {
        ca: Some(certs.ca_crt.clone()),
        ..TlsFiles::default()
    };
    let mut options = WorkerOptions::new(url.as_str(), queue.as_str(), connectors.path());
    options.amqp_tls = right_ca.clone();
    options.metrics_addr = Some("127.0.0.1:0".parse().expect("addr"));
    let worker = spawn_worker_with(options).await;
    let client = Client::connect_with(
        &url,
        ClientOptions {
            tls: right_ca.clone(),
            queue: QueueSettings::classic(queue.as_str()),
        },
    )
    .await
    .expect("client over amqps with the right CA");
    let reply = client
        .call(
            &job(&mosquitto, &topic, "over-tls"),
            Duration::from_secs(20),
        )
        .await
        .expect("reply");
    assert_eq!(reply.exit_code, ExitCode::Published, "{}", reply.message);
    assert_eq!(
        subscriber
            .expect(Duration::from_secs(5))
            .await
            .payload_str(),
        "over-tls"
    );
    client.close().await;
    worker.stop().await;

    // 2. The wrong CA: refused, said so, never ready. A worker process, configured through
    // the environment as in a container.
    let wrong_ca = ChildWorker::spawn_with_env(&[
        ("MQTT_CONNECTOR_AMQP_URL", url.as_str()),
        ("MQTT_CONNECTOR_QUEUE", queue.as_str()),
        (
            "MQTT_CONNECTOR_AMQP_CA",
            certs.other_ca_crt.to_str().expect("utf-8 path"),
        ),
    ]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let output = wrong_ca.output();
        if output.contains("TLS handshake") {
            assert!(
                output.contains("invalid peer certificate") && output.contains("UnknownIssuer"),
                "the log names the TLS failure: {output}"
            );
            assert!(
                !output.contains("guest:guest"),
                "password in the log: {output}"
            );
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no TLS failure logged: {output}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = common::http::get(wrong_ca.metrics_addr, "/readyz")
        .await
        .expect("GET /readyz");
    assert_eq!(status, 503, "not ready with the wrong CA");
    let (status, _) = common::http::get(wrong_ca.metrics_addr, "/healthz")
        .await
        .expect("GET /healthz");
    assert_eq!(status, 200, "alive while it retries");
    drop(wrong_ca);
    let err = Client::connect_with(
        &url,
        ClientOptions {
            tls: TlsFiles {
                ca: Some(certs.other_ca_crt.clone()),
                ..TlsFiles::default()
            },
            queue: QueueSettings::classic(queue.as_str()),
        },
    )
    .await
    .err()
    .expect("the client refuses the wrong CA too");
    let text = mqtt_connector::amqp::error_chain(&err);
    assert!(
        matches!(err, ClientError::Connect(_)) && text.contains("TLS handshake"),
        "{text}"
    );

    // 3. A client certificate and EXTERNAL: no password in the URL; RabbitMQ sees its CN.
    let external = format!("amqps://localhost:{tls_port}/%2f?auth_mechanism=external");
    let identity = TlsFiles {
        ca: Some(certs.ca_crt.clone()),
        cert: Some(login.crt.clone()),
        key: Some(login.key.clone()),
    };
    let mut options = WorkerOptions::new(external.as_str(), queue.as_str(), connectors.path());
    options.amqp_tls = identity.clone();
    options.metrics_addr = Some("127.0.0.1:0".parse().expect("addr"));
    let worker = spawn_worker_with(options).await;
    let connections = node.ctl(0, &["list_connections", "user", "auth_mechanism", "ssl"]);
    assert!(
        connections.lines().any(|line| line.contains(&login.cn)
            && line.contains("EXTERNAL")
            && line.contains("true")),
        "the worker logged in as {} with EXTERNAL over TLS: {connections}",
        login.cn
    );
    let client = Client::connect_with(
        &external,
        ClientOptions {
            tls: identity,
            queue: QueueSettings::classic(queue.as_str()),
        },
    )
    .await
    .expect("client with EXTERNAL");
    let reply = client
        .call(
            &job(&mosquitto, &topic, "external"),
            Duration::from_secs(20),
        )
        .await
        .expect("reply");
    assert_eq!(reply.exit_code, ExitCode::Published, "{}", reply.message);
    assert_eq!(
        subscriber
            .expect(Duration::from_secs(5))
            .await
            .payload_str(),
        "external"
    );
    client.close().await;
    worker.stop().await;
}
