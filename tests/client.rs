//! The Rust client API against a real worker: `call` returns a typed reply (exit-code enum,
//! message, extra keys), `submit` returns the correlation id and the job is published, many
//! calls share one client, a dead first node in the URL list is skipped, and a queue nobody
//! consumes gives `NoReply`; `request` returns a real device's answer typed (text, bytes, MQTT 5
//! properties) and turns exit-codes 10 and others into errors.

mod common;

use std::time::Duration;

use common::worker::spawn_worker;
use common::{Device, Mosquitto, Subscriber, unique_name};
use futures_util::future::join_all;
use mqtt_connector::amqp::queue::QueueSettings;
use mqtt_connector::client::{Client, ClientError, ClientOptions, JobRequest, Payload};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn request_returns_the_devices_answer_typed_and_errors_for_other_exit_codes() {
    let mosquitto = Mosquitto::plain();
    let commands = unique_name("cmd");
    let device = Device::start(mosquitto.port(), &commands).await;
    let connectors = common::worker::connectors_dir();
    let queue = unique_name("client-requests");
    let worker = spawn_worker(&queue, connectors.path()).await;
    let client = Client::connect_with(&common::amqp_url(), options(&queue))
        .await
        .expect("connect");
    // A command for the device, answered on a topic of the job's own (named in the command for
    // 3.1.1, where the device cannot learn it from a Response Topic property).
    let command = |version: &str, command: serde_json::Value| {
        let response = format!("{}/{{correlation-id}}", unique_name("answers"));
        let mut content = command;
        content["reply"] = serde_json::json!(response);
        JobRequest::new()
            .broker(mosquitto.url())
            .client_id(unique_name("client"))
            .topic(commands.as_str())
            .content(content.to_string())
            .qos(1)
            .set("mqtt-version", version)
            .response_topic(response)
            .timeout(Duration::from_secs(5))
    };

    let answer = client
        .request(&command("5", serde_json::json!({"say": "open"})), T)
        .await
        .expect("answered over MQTT 5");
    assert_eq!(answer.payload, Payload::Text("open".into()));
    assert_eq!(answer.content_type.as_deref(), Some("text/plain"));
    let properties: Vec<(&str, &str)> = answer
        .user_properties
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect();
    assert_eq!(properties, [("device", "d1"), ("k", "1"), ("k", "2")]);
    assert!(answer.topic.starts_with("answers-"), "{}", answer.topic);
    assert_eq!(answer.reply.exit_code, ExitCode::Published);
    assert!(
        answer.reply.message.contains("answered"),
        "{}",
        answer.reply.message
    );

    // 3.1.1 and a binary answer. The device learns the topic from the content, where the
    // worker does not fill in {correlation-id}: the job names a topic of its own.
    let mut job = command("3.1.1", serde_json::json!({"binary": true}));
    let response = format!("{}/fixed", unique_name("answers"));
    job = job
        .response_topic(response.clone())
        .content(serde_json::json!({"binary": true, "reply": response}).to_string());
    let answer = client.request(&job, T).await.expect("answered over 3.1.1");
    assert_eq!(
        answer.payload,
        Payload::Binary(vec![0xff, 0x00, 0x80, 0xfe])
    );
    assert_eq!(answer.payload.as_str(), None);
    assert_eq!(answer.topic, response);
    assert!(answer.content_type.is_none(), "3.1.1 has no properties");

    // A silent device: exit-code 10 is an error that holds the reply.
    let silent =
        command("5", serde_json::json!({"silent": true})).timeout(Duration::from_millis(500));
    match client.request(&silent, T).await {
        Err(ClientError::NoAnswer(reply)) => {
            assert_eq!(reply.exit_code, ExitCode::NoResponse);
            assert!(reply.message.contains("no answer"), "{}", reply.message);
        }
        other => panic!("expected NoAnswer, got {other:?}"),
    }
    // No response topic: an invalid job (1), also an error holding the reply.
    let job = JobRequest::new()
        .broker(mosquitto.url())
        .client_id(unique_name("client"))
        .topic(commands.as_str())
        .content("x");
    let err = client
        .request(&job, T)
        .await
        .expect_err("no response topic");
    let text = err.to_string();
    let ClientError::JobFailed(reply) = err else {
        panic!("expected JobFailed, got {text}");
    };
    assert_eq!(reply.exit_code, ExitCode::InvalidJob, "{text}");
    assert!(text.contains("exit-code 1"), "{text}");
    assert_eq!(device.received(), 3, "one command per published request");
    client.close().await;
    worker.stop().await;
    common::Amqp::connect().await.delete_queue(&queue).await;
}
