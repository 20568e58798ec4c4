//! The Rust client API against a real worker: `call` returns a typed reply (exit-code enum,
//! message, extra keys), `submit` returns the correlation id and the job is published, many
//! calls share one client, a dead first node in the URL list is skipped, and a queue nobody
//! consumes gives `NoReply`.

mod common;

use std::time::Duration;

use common::worker::spawn_worker;
use common::{Mosquitto, Subscriber, unique_name};
use futures_util::future::join_all;
use mqtt_connector::amqp::queue::QueueSettings;
use mqtt_connector::client::{Client, ClientError, ClientOptions, JobRequest};
use mqtt_connector::outcome::ExitCode;
use rumqttc::QoS;

const T: Duration = Duration::from_secs(20);

fn options(queue: &str) -> ClientOptions {
    ClientOptions {
        queue: QueueSettings::classic(queue),
        ..ClientOptions::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn call_submit_and_typed_replies_against_a_real_worker() {
    let mosquitto = Mosquitto::plain();
    let topic = unique_name("client");
    let mut subscriber = Subscriber::start(mosquitto.port(), &topic, QoS::AtLeastOnce).await;
    let connectors = common::worker::connectors_dir();
    common::write_connector(
        connectors.path(),
        "local",
        serde_json::json!({"broker": mosquitto.url(), "client-id": unique_name("client"),
            "qos": 1, "topic": topic}),
    );
    let queue = unique_name("client-jobs");
    let worker = spawn_worker(&queue, connectors.path()).await;
    // The first node of the list does not answer: the client takes the next.
    let closed = common::free_port();
    let urls = format!(
        "amqp://guest:guest@127.0.0.1:{closed}/%2f,{}",
        common::amqp_url()
    );
    let client = Client::connect_with(&urls, options(&queue))
        .await
        .expect("connect");

    let job = JobRequest::new().connector("local").content("called");
    let reply = client.call(&job, T).await.expect("reply");
    assert_eq!(reply.exit_code, ExitCode::Published, "{}", reply.message);
    assert!(reply.is_success());
    assert!(reply.message.contains(&topic), "{}", reply.message);
    assert!(reply.extra.contains_key("duration-ms"), "{:?}", reply.extra);
    assert_eq!(
        subscriber
            .expect(Duration::from_secs(5))
            .await
            .payload_str(),
        "called"
    );

    // Failures are typed too.
    let reply = client
        .call(&JobRequest::new().connector("nope").content("x"), T)
        .await
        .expect("reply");
    assert_eq!(reply.exit_code, ExitCode::UnknownConnector);
    let reply = client
        .call(&job.clone().set("qos", 3), T)
        .await
        .expect("reply");
    assert_eq!(reply.exit_code, ExitCode::InvalidJob, "{}", reply.message);

    // submit: fire and forget; the correlation id comes back, the job is published.
    let id = client
        .submit(&JobRequest::new().connector("local").content("submitted"))
        .await
        .expect("submit");
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "correlation id {id}");
    assert_eq!(
        subscriber
            .expect(Duration::from_secs(5))
            .await
            .payload_str(),
        "submitted"
    );

    // One client, many calls at once: each gets its own reply.
    let calls = (0..50).map(|i| {
        let job = JobRequest::new()
            .connector("local")
            .content(format!("many-{i}"));
        let client = &client;
        async move { client.call(&job, T).await }
    });
    let replies = join_all(calls).await;
    let published = replies
        .iter()
        .filter(|reply| matches!(reply, Ok(reply) if reply.exit_code == ExitCode::Published))
        .count();
    assert_eq!(published, 50, "{replies:?}");
    let received = subscriber.collect(50, Duration::from_secs(10)).await;
    assert_eq!(received.len(), 50);
    client.close().await;
    worker.stop().await;

    // Nobody consumes this queue: no reply within the timeout.
    let idle = unique_name("idle-jobs");
    let client = Client::connect_with(&common::amqp_url(), options(&idle))
        .await
        .expect("connect");
    let err = client
        .call(&job, Duration::from_millis(300))
        .await
        .expect_err("no worker");
    assert!(matches!(err, ClientError::NoReply(_)), "{err}");
    client.close().await;
    common::Amqp::connect().await.delete_queue(&idle).await;
    common::Amqp::connect().await.delete_queue(&queue).await;
}
