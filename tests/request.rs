//! `"action": "request"` end to end: a worker consuming RabbitMQ publishes a command to a device
//! on a private Mosquitto and returns the device's answer. The device is the harness'
//! [`common::Device`]: a real MQTT 5 client that answers on the Response Topic (or, for a 3.1.1
//! worker, on the topic named in the command), copying the Correlation Data.

mod common;

use common::worker::{TestBed, connectors_dir, job, with};
use common::*;
use rumqttc5::{PublishOptions, QoS};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

const T: Duration = Duration::from_secs(20);

/// A request job to `broker` on `commands`, answered on `response` (written in the command for
/// 3.1.1), with `command`'s keys as the command's content.
fn request(
    broker: &str,
    version: &str,
    commands: &str,
    response: &str,
    command: serde_json::Value,
) -> serde_json::Value {
    let mut content = command;
    content["reply"] = json!(response);
    with(
        job(broker, commands, &content.to_string()),
        json!({"action": "request", "response-topic": response, "mqtt-version": version}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_is_answered_over_mqtt_3_1_1_and_mqtt_5() {
    let broker = Mosquitto::plain();
    let commands = unique_name("cmd");
    let device = Device::start(broker.port(), &commands).await;
    let mut bed = TestBed::new().await;
    for version in ["3.1.1", "5"] {
        let response = unique_name("resp");
        let say = format!("done over {version}");
        let job = request(
            &broker.url(),
            version,
            &commands,
            &response,
            json!({"say": say}),
        );
        let reply = bed.run(job, T).await;
        assert_eq!(reply.exit_code(), 0, "{}", reply.body);
        let answer = &reply.body["response"];
        eprintln!("{version}: {}", reply.body);
        assert_eq!(answer["topic"], json!(response));
        assert_eq!(answer["content-encoding"], "utf-8");
        assert_eq!(answer["content"], json!(say));
        if version == "5" {
            assert_eq!(answer["content-type"], "text/plain");
            assert_eq!(
                answer["user-properties"],
                json!([["device", "d1"], ["k", "1"], ["k", "2"]])
            );
        } else {
            // 3.1.1 carries no properties.
            assert!(answer.get("content-type").is_none(), "{answer}");
        }
    }
    assert_eq!(device.received(), 2);
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_correlation_id_stands_in_the_response_topic_and_is_the_correlation_data() {
    let broker = Mosquitto::plain();
    let commands = unique_name("cmd");
    let _device = Device::start(broker.port(), &commands).await;
    let mut bed = TestBed::new().await;
    let prefix = unique_name("resp");
    let job = request(
        &broker.url(),
        "5",
        &commands,
        &format!("{prefix}/{{correlation-id}}"),
        json!({}),
    );
    let reply = bed.run(job, T).await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    let id = reply.correlation_id.clone().expect("correlation id");
    assert_eq!(
        reply.body["response"]["topic"],
        json!(format!("{prefix}/{id}"))
    );
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_after_a_delay_is_waited_for() {
    let broker = Mosquitto::plain();
    let commands = unique_name("cmd");
    let _device = Device::start(broker.port(), &commands).await;
    let mut bed = TestBed::new().await;
    for version in ["3.1.1", "5"] {
        let job = request(
            &broker.url(),
            version,
            &commands,
            &unique_name("resp"),
            json!({"say": "late", "delay-ms": 1500}),
        );
        let started = Instant::now();
        let reply = bed.run(job, T).await;
        assert_eq!(reply.exit_code(), 0, "{}", reply.body);
        assert_eq!(reply.body["response"]["content"], "late");
        assert!(started.elapsed() >= Duration::from_millis(1500));
        eprintln!("{version}: answered after {:?}", started.elapsed());
    }
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_answer_is_exit_code_10_and_the_command_was_published_exactly_once() {
    let broker = Mosquitto::plain();
    let commands = unique_name("cmd");
    let device = Device::start(broker.port(), &commands).await;
    let mut bed = TestBed::new().await;
    for (n, version) in ["3.1.1", "5"].into_iter().enumerate() {
        let job = with(
            request(
                &broker.url(),
                version,
                &commands,
                &unique_name("resp"),
                json!({"silent": true}),
            ),
            json!({"timeout": 2000}),
        );
        let started = Instant::now();
        let reply = bed.run(job, T).await;
        eprintln!("{version}: {} after {:?}", reply.body, started.elapsed());
        assert_eq!(reply.exit_code(), 10, "{}", reply.body);
        assert!(reply.message().contains("no answer"), "{}", reply.body);
        assert!(reply.message().contains("waited"), "{}", reply.body);
        assert_eq!(reply.body["attempts"], 1, "{}", reply.body);
        assert!(reply.body.get("response").is_none());
        assert_eq!(device.received(), n + 1, "the command was published again");
    }
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_with_other_correlation_data_is_not_the_answer() {
    let broker = Mosquitto::plain();
    let commands = unique_name("cmd");
    let _device = Device::start(broker.port(), &commands).await;
    let mut bed = TestBed::new().await;
    let job = request(
        &broker.url(),
        "5",
        &commands,
        &unique_name("resp"),
        json!({"say": "right", "wrong-first": true, "delay-ms": 200}),
    );
    let reply = bed.run(job, T).await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    assert_eq!(reply.body["response"]["content"], "right");
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_concurrent_requests_on_one_response_topic_answered_in_reverse_order_get_their_own() {
    let broker = Mosquitto::plain();
    let commands = unique_name("cmd");
    let _device = Device::start(broker.port(), &commands).await;
    let mut bed = TestBed::new().await;
    let response = unique_name("resp");
    // One client-id: both jobs ride one connection and share one subscription.
    let client_id = unique_name("worker");
    let mut sent = Vec::new();
    for (say, delay) in [("for the first", 1500), ("for the second", 200)] {
        let job = with(
            request(
                &broker.url(),
                "5",
                &commands,
                &response,
                json!({"say": say, "delay-ms": delay}),
            ),
            json!({"client-id": client_id}),
        );
        let correlation = unique_name("corr");
        bed.amqp
            .send_job(
                &bed.queue,
                job.to_string().as_bytes(),
                Some(&bed.reply_queue),
                Some(&correlation),
            )
            .await;
        sent.push((correlation, say));
    }
    let first_back = bed.replies.expect_reply(T).await;
    let second_back = bed.replies.expect_reply(T).await;
    assert_eq!(
        first_back.correlation_id.as_deref(),
        Some(sent[1].0.as_str())
    );
    for reply in [first_back, second_back] {
        assert_eq!(reply.exit_code(), 0, "{}", reply.body);
        let (_, say) = sent
            .iter()
            .find(|(id, _)| Some(id.as_str()) == reply.correlation_id.as_deref())
            .expect("a reply to a job sent");
        assert_eq!(
            reply.body["response"]["content"],
            json!(say),
            "{}",
            reply.body
        );
    }
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_message_on_the_response_topic_is_not_taken() {
    let broker = Mosquitto::plain();
    let commands = unique_name("cmd");
    let device = Device::start(broker.port(), &commands).await;
    let mut bed = TestBed::new().await;
    for version in ["3.1.1", "5"] {
        let response = unique_name("resp");
        device
            .client
            .publish(
                response.clone(),
                b"stale".to_vec(),
                PublishOptions::new(QoS::AtLeastOnce).retain(true),
            )
            .await
            .expect("publish retained");
        // The retained message is on the broker once a fresh subscriber gets it.
        let mut check =
            Subscriber::start(broker.port(), &response, rumqttc::QoS::AtLeastOnce).await;
        assert_eq!(check.expect(T).await.payload_str(), "stale");
        let job = request(
            &broker.url(),
            version,
            &commands,
            &response,
            json!({"say": "fresh", "delay-ms": 300}),
        );
        let reply = bed.run(job, T).await;
        assert_eq!(reply.exit_code(), 0, "{}", reply.body);
        assert_eq!(reply.body["response"]["content"], "fresh", "{version}");
    }
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_answer_is_returned_in_base64() {
    let broker = Mosquitto::plain();
    let commands = unique_name("cmd");
    let _device = Device::start(broker.port(), &commands).await;
    let mut bed = TestBed::new().await;
    for version in ["3.1.1", "5"] {
        let job = request(
            &broker.url(),
            version,
            &commands,
            &unique_name("resp"),
            json!({"binary": true}),
        );
        let reply = bed.run(job, T).await;
        assert_eq!(reply.exit_code(), 0, "{}", reply.body);
        assert_eq!(reply.body["response"]["content-encoding"], "base64");
        assert_eq!(reply.body["response"]["content"], "/wCA/g==");
    }
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_over_max_response_bytes_is_exit_code_10_naming_its_size() {
    let broker = Mosquitto::plain();
    let commands = unique_name("cmd");
    let _device = Device::start(broker.port(), &commands).await;
    let mut bed = TestBed::new().await;
    for version in ["3.1.1", "5"] {
        let job = request(
            &broker.url(),
            version,
            &commands,
            &unique_name("resp"),
            json!({"size": 300_000}),
        );
        let reply = bed.run(job, T).await;
        eprintln!("{version}: {}", reply.body);
        assert_eq!(reply.exit_code(), 10, "{}", reply.body);
        assert!(reply.message().contains("300000 bytes"), "{}", reply.body);
        // Just under the limit is kept (262,144 bytes by default).
        let job = request(
            &broker.url(),
            version,
            &commands,
            &unique_name("resp"),
            json!({"size": 262_144}),
        );
        let reply = bed.run(job, T).await;
        assert_eq!(reply.exit_code(), 0, "{}", reply.message());
        let content = reply.body["response"]["content"].as_str().unwrap_or("");
        assert_eq!(content.len(), 262_144);
    }
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_answers_inside_its_message_callback_is_never_missed() {
    let broker = Mosquitto::plain();
    let commands = unique_name("cmd");
    let _device = Device::start(broker.port(), &commands).await;
    let mut bed = TestBed::new().await;
    for version in ["3.1.1", "5"] {
        // A fresh response topic each time: every job subscribes anew right before publishing.
        for n in 0..20 {
            let job = request(
                &broker.url(),
                version,
                &commands,
                &unique_name("resp"),
                json!({"say": format!("at once {n}")}),
            );
            let reply = bed.run(job, T).await;
            assert_eq!(reply.exit_code(), 0, "{version} #{n}: {}", reply.body);
            assert_eq!(
                reply.body["response"]["content"],
                json!(format!("at once {n}"))
            );
        }
    }
    bed.finish().await;
}

/// A broker that accepts the connection and refuses every SUBSCRIBE (3.1.1: SUBACK 0x80; MQTT 5:
/// 0x87 not authorized), counting PUBLISH packets. Scripted because Mosquitto 2.0.11 grants a
/// SUBSCRIBE its ACL file denies (it filters at delivery instead): checked by hand with
/// `topic deny` and with no ACL line for the topic.
struct RefusingBroker {
    port: u16,
    publishes: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl RefusingBroker {
    async fn start() -> RefusingBroker {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind");
        let port = listener.local_addr().expect("address").port();
        let publishes = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&publishes);
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(refuse_subscriptions(stream, Arc::clone(&counted)));
            }
        });
        RefusingBroker {
            port,
            publishes,
            task,
        }
    }
}

impl Drop for RefusingBroker {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn refuse_subscriptions(mut stream: tokio::net::TcpStream, publishes: Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut v5 = false;
    loop {
        let Ok(first) = stream.read_u8().await else {
            return;
        };
        let mut len = 0usize;
        for shift in [0, 7, 14, 21] {
            let Ok(b) = stream.read_u8().await else {
                return;
            };
            len |= usize::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        if stream.read_exact(&mut body).await.is_err() {
            return;
        }
        let answer = match first >> 4 {
            1 => {
                v5 = body.get(6) == Some(&5);
                if v5 {
                    vec![0x20, 3, 0, 0, 0]
                } else {
                    vec![0x20, 2, 0, 0]
                }
            }
            3 => {
                publishes.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            8 if v5 => vec![0x90, 4, body[0], body[1], 0x00, 0x87],
            8 => vec![0x90, 3, body[0], body[1], 0x80],
            12 => vec![0xD0, 0],
            _ => continue,
        };
        if stream.write_all(&answer).await.is_err() {
            return;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_subscription_is_exit_code_8_with_nothing_published() {
    let broker = RefusingBroker::start().await;
    let url = format!("tcp://127.0.0.1:{}", broker.port);
    let mut bed = TestBed::start(connectors_dir()).await;
    for (version, code) in [("5", "0x87"), ("3.1.1", "0x80")] {
        let job = request(&url, version, "cmd/1", "resp/1", json!({}));
        let reply = bed.run(job, T).await;
        eprintln!("{version}: {}", reply.body);
        assert_eq!(reply.exit_code(), 8, "{}", reply.body);
        assert!(reply.message().contains("subscription"), "{}", reply.body);
        assert!(reply.message().contains(code), "{}", reply.body);
        assert_eq!(reply.body["attempts"], 1, "{}", reply.body);
    }
    assert_eq!(
        broker.publishes.load(Ordering::SeqCst),
        0,
        "a command was published"
    );
    let metrics = bed.worker.metrics().await;
    assert!(
        metrics.contains("mqtt_connector_requests_total{outcome=\"subscription_refused\"} 2\n"),
        "both refusals counted:\n{metrics}"
    );
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_lost_during_the_wait_is_reconnected_and_subscribed_again() {
    let broker = Mosquitto::plain();
    let proxy = TcpProxy::start(broker.port()).await;
    let commands = unique_name("cmd");
    let device = Device::start(broker.port(), &commands).await;
    let mut bed = TestBed::new().await;
    for (n, version) in ["3.1.1", "5"].into_iter().enumerate() {
        let job = with(
            request(
                &format!("tcp://127.0.0.1:{}", proxy.port()),
                version,
                &commands,
                &unique_name("resp"),
                json!({"say": "after the cut", "delay-ms": 3000}),
            ),
            json!({"timeout": 15000}),
        );
        let correlation = unique_name("corr");
        let connections_before = proxy.stats().total;
        bed.amqp
            .send_job(
                &bed.queue,
                job.to_string().as_bytes(),
                Some(&bed.reply_queue),
                Some(&correlation),
            )
            .await;
        // The command reached the device: the worker is now waiting for the answer.
        let deadline = Instant::now() + T;
        while device.received() < n + 1 {
            assert!(Instant::now() < deadline, "the device got no command");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        proxy.cut();
        let reply = bed.replies.expect_reply(T).await;
        eprintln!("{version}: {}", reply.body);
        assert_eq!(reply.exit_code(), 0, "{}", reply.body);
        assert_eq!(reply.body["response"]["content"], "after the cut");
        assert!(
            proxy.stats().total > connections_before + 1,
            "no new connection"
        );
        assert_eq!(device.received(), n + 1, "the command was published again");
    }
    bed.finish().await;
}

/// The latest `$SYS/broker/subscriptions/count` Mosquitto published that satisfies `pred`;
/// panics after `within` with the last value seen.
async fn subscriptions_until(
    sys: &mut Subscriber,
    broker: &Mosquitto,
    pred: impl Fn(u64) -> bool,
    within: Duration,
) -> u64 {
    let deadline = Instant::now() + within;
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(got) = sys.recv(Duration::from_millis(500)).await {
            let count = got.payload_str().trim().parse::<u64>().unwrap_or(u64::MAX);
            last = Some(count);
            if pred(count) {
                return count;
            }
        }
    }
    panic!(
        "subscription count never as expected within {within:?}; last seen {last:?}; log: {}",
        broker.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_over_fifty_devices_and_eight_workers_each_get_their_own_answer() {
    const DEVICES: usize = 50;
    const JOBS: usize = 1000;
    const WORKERS: usize = 8;
    let broker = Mosquitto::plain_with("sys_interval 1\n");
    let mut devices = Vec::new();
    let mut names = Vec::new();
    for _ in 0..DEVICES {
        let name = unique_name("dev");
        devices.push(Device::start(broker.port(), &format!("cmd/{name}")).await);
        names.push(name);
    }
    let mut sys = Subscriber::start(
        broker.port(),
        "$SYS/broker/subscriptions/count",
        rumqttc::QoS::AtMostOnce,
    )
    .await;
    // The devices' subscriptions and this one.
    let baseline = u64::try_from(DEVICES + 1).expect("small");
    subscriptions_until(&mut sys, &broker, |n| n == baseline, T).await;

    let mut bed =
        TestBed::start_with(connectors_dir(), |o| o.mqtt.client_id_suffix = "-w0".into()).await;
    let mut extra = Vec::new();
    for w in 1..WORKERS {
        let mut options = mqtt_connector::worker::WorkerOptions::new(
            amqp_url(),
            bed.queue.clone(),
            bed.connectors.path(),
        );
        options.mqtt.client_id_suffix = format!("-w{w}");
        extra.push(common::worker::spawn_worker_with(options).await);
    }
    let broker_url = broker.url();
    let mut expected = std::collections::HashMap::new();
    let started = Instant::now();
    for n in 0..JOBS {
        let d = n % DEVICES;
        // Half the devices speak to MQTT 5 jobs sharing one response topic per device
        // (told apart by Correlation Data); the other half to 3.1.1 jobs, one topic each.
        let (version, response) = if d.is_multiple_of(2) {
            ("5", format!("resp/{}", names[d]))
        } else {
            ("3.1.1", format!("resp/{}/{n}", names[d]))
        };
        let say = format!("answer {n}");
        let job = with(
            request(
                &broker_url,
                version,
                &format!("cmd/{}", names[d]),
                &response,
                json!({"say": say}),
            ),
            json!({"client-id": format!("fleet-{}", names[d]), "timeout": 30000}),
        );
        let correlation = format!("job-{n}");
        bed.amqp
            .send_job(
                &bed.queue,
                job.to_string().as_bytes(),
                Some(&bed.reply_queue),
                Some(&correlation),
            )
            .await;
        expected.insert(correlation, say);
    }
    for _ in 0..JOBS {
        let reply = bed.replies.expect_reply(Duration::from_secs(60)).await;
        assert_eq!(reply.exit_code(), 0, "{}", reply.body);
        let id = reply.correlation_id.clone().expect("correlation id");
        let say = expected.remove(&id).expect("one reply per job");
        assert_eq!(
            reply.body["response"]["content"],
            json!(say),
            "{}",
            reply.body
        );
    }
    let elapsed = started.elapsed();
    let commands: usize = devices.iter().map(Device::received).sum();
    assert_eq!(commands, JOBS, "every command published exactly once");
    // Every response topic was unsubscribed with its last job: back to the baseline. Mosquitto
    // publishes the count only when it changed since it last published it, at its 1 s tick, and
    // the whole run may fall between two ticks: marker subscriptions make a change the test
    // controls, so the count seen with them is a fresh one, taken after the run. They take the
    // count above every value published during the run: equal to the last one published, it
    // would not be published again (seen: 1 run in 13 waited in vain with a single marker).
    let during: Vec<u64> = sys
        .drain()
        .iter()
        .filter_map(|got| got.payload_str().trim().parse().ok())
        .collect();
    let peak = during.iter().copied().fold(baseline, u64::max);
    let mut markers = Vec::new();
    for _ in baseline..=peak {
        let topic = unique_name("marker");
        markers.push(Subscriber::start(broker.port(), &topic, rumqttc::QoS::AtMostOnce).await);
    }
    let expected = peak + 1;
    let with_marker = subscriptions_until(&mut sys, &broker, |n| n >= expected, T).await;
    assert_eq!(with_marker, expected, "subscriptions left on the broker");
    drop(markers);
    let after = subscriptions_until(&mut sys, &broker, |n| n == baseline, T).await;
    eprintln!(
        "{JOBS} requests over {DEVICES} devices and {WORKERS} workers answered in {:.1} s ({:.0}/s); \
         subscriptions on the broker during the run (each tick): {during:?}; afterwards: {after} \
         (the {DEVICES} devices' and the probe's)",
        elapsed.as_secs_f64(),
        JOBS as f64 / elapsed.as_secs_f64()
    );
    for worker in extra {
        worker.stop().await;
    }
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_waiting_for_an_answer_is_not_closed_as_idle() {
    let broker = Mosquitto::plain();
    let commands = unique_name("cmd");
    let device = Device::start(broker.port(), &commands).await;
    // Idle connections are closed after 1 s; the answer takes 3 s.
    let mut bed = TestBed::start_with(connectors_dir(), |o| {
        o.idle_timeout = Duration::from_secs(1);
    })
    .await;
    let client_id = unique_name("waiter");
    let job = with(
        request(
            &broker.url(),
            "5",
            &commands,
            &unique_name("resp"),
            json!({"say": "slow", "delay-ms": 3000}),
        ),
        json!({"client-id": client_id}),
    );
    let reply = bed.run(job, T).await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    assert_eq!(reply.body["response"]["content"], "slow");
    let log = broker.log();
    let connections = log
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(&client_id))
        .count();
    assert_eq!(connections, 1, "{log}");
    assert!(
        !log.lines()
            .any(|l| l.contains(&client_id) && l.contains("disconnected")),
        "the waiting connection was closed: {log}"
    );
    assert_eq!(device.received(), 1);
    bed.finish().await;
}
