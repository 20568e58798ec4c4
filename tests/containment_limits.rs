//! Nothing invalid ever reaches a shared connection: jobs the MQTT 5 encoder or the broker would
//! refuse (NUL or oversize properties, retain without Retain Available, QoS above the broker's
//! Maximum QoS) mixed into a stream of good jobs on ONE client-id, against a private Mosquitto 2.0.

mod common;

use common::worker::{TestBed, job, metric_sum, with};
use common::*;
use rumqttc5::QoS;
use serde_json::json;
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The kinds of job in a stream, each with the answer it must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Good,
    NulContentType,
    NulUserProperty,
    LongContentType,
    LongCorrelationData,
    /// Retained, to a broker with `retain_available false`: refused by the client (0x9A).
    Retained,
    /// QoS 2 to a broker whose Maximum QoS is 1: published at QoS 1.
    Qos2,
}

impl Kind {
    /// The job's keys beyond a good job's.
    fn extra(self) -> serde_json::Value {
        match self {
            Kind::Good => json!({}),
            Kind::NulContentType => json!({"content-type": "text/\u{0}plain"}),
            Kind::NulUserProperty => json!({"user-properties": {"site": "no\u{0}rth"}}),
            Kind::LongContentType => json!({"content-type": "t".repeat(70_000)}),
            Kind::LongCorrelationData => json!({"correlation-data": "c".repeat(70_000)}),
            Kind::Retained => json!({"retain": true}),
            Kind::Qos2 => json!({"qos": 2}),
        }
    }

    /// The exit-code it must get.
    fn exit_code(self) -> i64 {
        match self {
            Kind::Good | Kind::Qos2 => 0,
            Kind::Retained => 8,
            _ => 1,
        }
    }

    /// Whether a subscriber must receive it.
    fn delivered(self) -> bool {
        matches!(self, Kind::Good | Kind::Qos2)
    }
}

/// What a stream's run measured.
struct Figures {
    replies: HashMap<String, (Kind, Reply, Duration)>,
    received: HashSet<String>,
    deferred: f64,
    connections: usize,
}

/// Sends `kinds` in order (one job each) on one client-id over MQTT 5 to `broker`, awaits every
/// reply and what a subscriber on the stream's topics received, then reads the worker's deferred
/// count and how many connections the broker saw for the client-id.
async fn run_stream(broker: &Mosquitto, kinds: &[Kind], timeout_ms: u64) -> Figures {
    let client_id = unique_name("contained");
    let prefix = unique_name("stream");
    let mut sub = Subscriber5::start(broker.port(), &format!("{prefix}/#"), QoS::AtLeastOnce).await;
    let mut bed = TestBed::start_with(common::worker::connectors_dir(), |options| {
        options.prefetch = 64;
    })
    .await;
    let mut sent = HashMap::new();
    for (i, kind) in kinds.iter().enumerate() {
        let body = with(
            with(
                job(&broker.url(), &format!("{prefix}/{i}"), &format!("job-{i}")),
                json!({"client-id": client_id, "mqtt-version": "5", "timeout": timeout_ms}),
            ),
            kind.extra(),
        );
        let correlation_id = format!("{i}");
        bed.amqp
            .send_job(
                &bed.queue,
                body.to_string().as_bytes(),
                Some(&bed.reply_queue),
                Some(&correlation_id),
            )
            .await;
        sent.insert(correlation_id, (*kind, Instant::now()));
    }
    let mut replies = HashMap::new();
    let deadline = Duration::from_millis(timeout_ms) + Duration::from_secs(30);
    while replies.len() < kinds.len() {
        let Some(reply) = bed.replies.try_reply(deadline).await else {
            let missing: Vec<_> = sent.keys().filter(|c| !replies.contains_key(*c)).collect();
            panic!(
                "{} of {} jobs unanswered: {missing:?}\n{}",
                missing.len(),
                kinds.len(),
                broker.log()
            );
        };
        let correlation_id = reply.correlation_id.clone().expect("correlation id");
        let (kind, at) = sent[&correlation_id];
        replies.insert(correlation_id, (kind, reply, at.elapsed()));
    }
    let expected = kinds.iter().filter(|k| k.delivered()).count();
    let mut received = HashSet::new();
    while received.len() < expected {
        match sub.recv(Duration::from_secs(10)).await {
            Some(message) => {
                received.insert(String::from_utf8_lossy(&message.payload).into_owned());
            }
            None => break,
        }
    }
    let deferred = metric_sum(
        &bed.worker.metrics().await,
        "mqtt_connector_jobs_deferred_total",
    );
    bed.finish().await;
    let connections = broker
        .log()
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(&client_id))
        .count();
    Figures {
        replies,
        received,
        deferred,
        connections,
    }
}

/// Asserts every job got its own answer and prints the figures.
fn check(figures: &Figures, broker: &Mosquitto) {
    let mut good_retried = 0;
    let mut good = 0;
    let mut slowest_bad: HashMap<Kind, Duration> = HashMap::new();
    for (correlation_id, (kind, reply, took)) in &figures.replies {
        assert_eq!(
            reply.exit_code(),
            kind.exit_code(),
            "job {correlation_id} ({kind:?}): {}",
            reply.body
        );
        let attempts = reply.body["attempts"].as_i64().unwrap_or(-1);
        let payload = format!("job-{correlation_id}");
        if kind.delivered() {
            assert!(
                figures.received.contains(&payload),
                "{kind:?} job {correlation_id} not received"
            );
        } else {
            assert!(
                !figures.received.contains(&payload),
                "{kind:?} job {correlation_id} reached the subscriber"
            );
        }
        match kind {
            Kind::Good => {
                good += 1;
                assert!(attempts <= 2, "good job {correlation_id}: {}", reply.body);
                if attempts > 1 {
                    good_retried += 1;
                }
            }
            Kind::Qos2 => {
                assert!(attempts <= 1, "{}", reply.body);
                let slowest = slowest_bad.entry(*kind).or_default();
                *slowest = (*slowest).max(*took);
                assert!(
                    reply.message().contains("Maximum QoS is 1")
                        && reply.message().contains("(qos 1)"),
                    "{}",
                    reply.body
                );
            }
            _ => {
                assert!(attempts <= 1, "{kind:?}: {}", reply.body);
                let slowest = slowest_bad.entry(*kind).or_default();
                *slowest = (*slowest).max(*took);
            }
        }
    }
    println!(
        "FIGURES: {good} good jobs answered 0, {good_retried} of them retried; \
         deferred {}; connections for the client-id {}; slowest answer per bad (or lowered) class: {slowest_bad:?}",
        figures.deferred, figures.connections
    );
    assert_eq!(
        figures.deferred, 0.0,
        "a worker without siblings handed back"
    );
    assert_eq!(figures.connections, 1, "{}", broker.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_the_encoder_would_refuse_answers_1_and_the_shared_connection_carries_on() {
    let broker = Mosquitto::plain_with("retain_available false\n");
    let bad = [
        Kind::NulContentType,
        Kind::NulUserProperty,
        Kind::LongContentType,
        Kind::LongCorrelationData,
        Kind::Retained,
    ];
    let kinds: Vec<Kind> = (0..40)
        .map(|i| if i % 8 == 3 { bad[i / 8] } else { Kind::Good })
        .collect();
    let figures = run_stream(&broker, &kinds, 10_000).await;
    check(&figures, &broker);
    let message = |kind: Kind| {
        figures
            .replies
            .values()
            .find(|(k, _, _)| *k == kind)
            .map(|(_, reply, _)| reply.message().to_owned())
            .expect("a reply of that kind")
    };
    assert!(message(Kind::NulContentType).contains("content-type"));
    assert!(message(Kind::NulUserProperty).contains("user-properties"));
    assert!(message(Kind::LongCorrelationData).contains("65,535"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qos_2_job_to_a_broker_whose_maximum_qos_is_1_is_published_at_qos_1_and_says_so() {
    // A listener option in Mosquitto 2.0: the harness writes it after its `listener` line.
    let broker = Mosquitto::plain_with("max_qos 1\n");
    let kinds: Vec<Kind> = (0..20)
        .map(|i| if i % 4 == 1 { Kind::Qos2 } else { Kind::Good })
        .collect();
    let figures = run_stream(&broker, &kinds, 10_000).await;
    check(&figures, &broker);
    for (kind, reply, _) in figures.replies.values() {
        if *kind == Kind::Qos2 {
            assert_eq!(reply.body["attempts"], 1, "{}", reply.body);
            assert!(
                reply.message().contains("published at QoS 1 instead of 2"),
                "{}",
                reply.body
            );
        }
    }
    assert!(!broker.log().contains("Too high QoS"), "{}", broker.log());
}

/// A scripted broker that accepts CONNECT and then sends a PUBLISH of `payload_len` bytes
/// unasked. A real broker cannot be made to: it sends PUBLISH only on a subscription, and the
/// worker never subscribes. Returns its port; connections it served count in `served`.
async fn oversending_broker(
    mqtt5: bool,
    payload_len: usize,
    served: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) -> u16 {
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let _ = socket.read(&mut buf).await; // CONNECT
                let connack: &[u8] = if mqtt5 {
                    &[0x20, 0x03, 0x00, 0x00, 0x00]
                } else {
                    &[0x20, 0x02, 0x00, 0x00]
                };
                // PUBLISH QoS 0 on "big": topic, (MQTT 5: empty properties), payload.
                let remaining = 2 + 3 + usize::from(mqtt5) + payload_len;
                let mut packet = vec![0x30];
                let mut x = remaining;
                loop {
                    let byte = u8::try_from(x % 128).expect("7 bits");
                    x /= 128;
                    packet.push(if x > 0 { byte | 0x80 } else { byte });
                    if x == 0 {
                        break;
                    }
                }
                packet.extend_from_slice(&[0x00, 0x03, b'b', b'i', b'g']);
                if mqtt5 {
                    packet.push(0x00);
                }
                packet.resize(packet.len() + payload_len, b'x');
                let _ = socket.write_all(connack).await;
                let _ = socket.write_all(&packet).await;
                // Never acknowledges: the job ends by the client's limit or by its timeout.
                while socket.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            });
        }
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_sending_a_packet_over_the_incoming_limit_ends_the_connection_not_our_memory() {
    let mut bed = TestBed::new().await;
    // The worker's setting (1 MiB by default), for MQTT 5 also announced in CONNECT.
    for (mqtt5, len) in [(false, 2 * 1024 * 1024), (true, 2 * 1024 * 1024)] {
        let served = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let port = oversending_broker(mqtt5, len, served.clone()).await;
        let version = if mqtt5 { "5" } else { "3.1.1" };
        let reply = bed
            .run(
                with(
                    job(&format!("tcp://127.0.0.1:{port}"), "t", "x"),
                    json!({"mqtt-version": version, "timeout": 3000}),
                ),
                Duration::from_secs(20),
            )
            .await;
        println!(
            "FIGURES: MQTT {version}, {len}-byte incoming PUBLISH: exit {} after {} connections: {}",
            reply.exit_code(),
            served.load(std::sync::atomic::Ordering::SeqCst),
            reply.message()
        );
        // Without a limit the client would read the packet and wait for an ack: 6.
        assert_eq!(reply.exit_code(), 7, "{}", reply.body);
        assert!(
            reply.message().contains("size limit exceeded")
                || reply.message().contains("has been exceeded"),
            "{}",
            reply.body
        );
    }
    bed.finish().await;
}

/// A job on `client_id` over `version` through `port`, with a generous timeout.
fn job_on(
    port: u16,
    client_id: &str,
    version: &str,
    i: usize,
    timeout_ms: u64,
) -> serde_json::Value {
    with(
        job(
            &format!("tcp://127.0.0.1:{port}"),
            &format!("health/{i}"),
            "x",
        ),
        json!({"client-id": client_id, "mqtt-version": version, "timeout": timeout_ms}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_queued_behind_receive_maximum_through_a_10_s_silence_keep_their_connection() {
    // Receive Maximum 1: with 20 jobs at once, 19 wait in the client for the one in flight.
    let broker = Mosquitto::plain_with("max_inflight_messages 1\n");
    let proxy = TcpProxy::start(broker.port()).await;
    let mut bed = TestBed::new().await;
    let client_id = unique_name("patient");
    let first = bed
        .run(
            job_on(proxy.port(), &client_id, "5", 0, 40_000),
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(first.exit_code(), 0, "{}", first.body);
    proxy.stall();
    let started = Instant::now();
    for i in 1..=20 {
        let body = job_on(proxy.port(), &client_id, "5", i, 40_000);
        bed.amqp
            .send_job(
                &bed.queue,
                body.to_string().as_bytes(),
                Some(&bed.reply_queue),
                None,
            )
            .await;
    }
    // Longer than the old fixed 8 s stall timer, shorter than the 30 s keep-alive.
    bed.replies.expect_no_reply(Duration::from_secs(10)).await;
    proxy.resume();
    let replies = bed
        .replies
        .expect_replies(20, Duration::from_secs(40))
        .await;
    let waited = started.elapsed();
    for reply in &replies {
        assert_eq!(reply.exit_code(), 0, "{}", reply.body);
        assert_eq!(reply.body["attempts"], 1, "{}", reply.body);
    }
    println!(
        "FIGURES: 20 publishes queued behind Receive Maximum 1 through a 10 s silence: all 0 at \
         attempt 1 after {} ms, {} connection(s)",
        waited.as_millis(),
        proxy.stats().total
    );
    assert_eq!(proxy.stats().total, 1, "{:?}", proxy.stats());
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_stops_answering_is_given_up_within_the_keep_alive_and_the_job_retried() {
    // Frozen (SIGSTOP), the broker can close nothing: only the worker's own judgement ends the
    // connection. The proxy (never stalled) counts the connections.
    let mut broker = Mosquitto::plain();
    let proxy = TcpProxy::start(broker.port()).await;
    let keep_alive = Duration::from_secs(2);
    let mut bed = TestBed::start_with(common::worker::connectors_dir(), |options| {
        options.mqtt.keep_alive = keep_alive;
    })
    .await;
    for version in ["3.1.1", "5"] {
        let client_id = unique_name("silenced");
        let first = bed
            .run(
                job_on(proxy.port(), &client_id, version, 0, 20_000),
                Duration::from_secs(20),
            )
            .await;
        assert_eq!(first.exit_code(), 0, "{}", first.body);
        let before = proxy.stats().total;
        broker.freeze();
        let frozen = Instant::now();
        // The job's timeout runs out while the broker is frozen, so its reply names the failure
        // that ended its first attempt.
        let body = job_on(proxy.port(), &client_id, version, 1, 8_000);
        bed.amqp
            .send_job(
                &bed.queue,
                body.to_string().as_bytes(),
                Some(&bed.reply_queue),
                None,
            )
            .await;
        // A new connection means the silent one was given up.
        proxy
            .wait_for(|s| s.total > before, Duration::from_secs(15))
            .await;
        let detected = frozen.elapsed();
        let reply = bed.replies.expect_reply(Duration::from_secs(25)).await;
        broker.thaw();
        println!(
            "FIGURES: MQTT {version}, keep-alive {} s: new connection {} ms after the broker froze \
             (given up, then the pool's reconnect pause); job: {}",
            keep_alive.as_secs(),
            detected.as_millis(),
            reply.body
        );
        assert_eq!(reply.exit_code(), 7, "{}", reply.body);
        assert!(reply.message().contains("owed an answer"), "{}", reply.body);
        // The keep-alive, the watchdog's 1 s tick, the pool's pause (up to 1.5 s), and slack.
        assert!(
            detected < keep_alive + Duration::from_secs(5),
            "{detected:?}"
        );
        // Thawed, the same client-id works again.
        let after = bed
            .run(
                job_on(proxy.port(), &client_id, version, 2, 20_000),
                Duration::from_secs(30),
            )
            .await;
        assert_eq!(after.exit_code(), 0, "{}", after.body);
    }
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_mqtt_5_broker_closing_before_connack_is_retried_and_the_job_succeeds_once_it_accepts() {
    // The proxy closes each connection as soon as it is accepted: what a broker at its
    // connection limit, a restart or a load balancer without a backend does, and not "does not
    // speak MQTT 5". (Mosquitto's own `max_connections 1` with one connection held let the
    // worker's connection through under this harness, though it refuses a second client when
    // started by hand: not investigated, so the proxy it is.)
    let broker = Mosquitto::plain();
    let proxy = TcpProxy::start(broker.port()).await;
    proxy.refuse();
    let topic = unique_name("full");
    let mut sub = Subscriber5::start(broker.port(), &topic, QoS::AtLeastOnce).await;
    let mut bed = TestBed::new().await;
    let body = with(
        job(&format!("tcp://127.0.0.1:{}", proxy.port()), &topic, "x"),
        json!({"mqtt-version": "5", "timeout": 20_000}),
    );
    bed.amqp
        .send_job(
            &bed.queue,
            body.to_string().as_bytes(),
            Some(&bed.reply_queue),
            None,
        )
        .await;
    // Closed before CONNACK for 3 s: retried, not answered.
    bed.replies.expect_no_reply(Duration::from_secs(3)).await;
    let refused = proxy.stats().refused;
    let accepting = Instant::now();
    proxy.accept();
    let reply = bed.replies.expect_reply(Duration::from_secs(25)).await;
    println!(
        "FIGURES: closed before CONNACK: exit {} after {} attempts ({refused} connections closed \
         in 3 s), {} ms after the broker accepted again",
        reply.exit_code(),
        reply.body["attempts"],
        accepting.elapsed().as_millis(),
    );
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    assert!(reply.body["attempts"].as_i64() >= Some(2), "{}", reply.body);
    assert!(refused >= 2, "{refused}");
    assert_eq!(sub.expect(Duration::from_secs(10)).await.payload, b"x");
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_always_closes_before_connack_is_a_connect_failure_3_not_4() {
    // A plain TCP server that reads CONNECT and closes, every time (what a load balancer with no
    // healthy backend does); a real broker cannot be made to do it for ever.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut buf = [0u8; 512];
            let _ = socket.read(&mut buf).await;
        }
    });
    let mut bed = TestBed::new().await;
    let reply = bed
        .run(
            with(
                job(&format!("tcp://127.0.0.1:{port}"), "t", "x"),
                json!({"mqtt-version": "5", "timeout": 3000}),
            ),
            Duration::from_secs(20),
        )
        .await;
    println!("FIGURES: always closed before CONNACK: {}", reply.body);
    assert_eq!(reply.exit_code(), 3, "{}", reply.body);
    assert!(reply.body["attempts"].as_i64() >= Some(2), "{}", reply.body);
    assert!(reply.message().contains("before CONNACK"), "{}", reply.body);
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hundred_good_jobs_on_one_client_id_pass_every_bad_class_mixed_in() {
    let broker = Mosquitto::plain_with("max_qos 1\nretain_available false\n");
    let bad = [
        Kind::NulContentType,
        Kind::NulUserProperty,
        Kind::LongContentType,
        Kind::LongCorrelationData,
        Kind::Qos2,
        Kind::Retained,
    ];
    // 300 good jobs; every 17th place from the 5th on holds the next bad one (3 of each class).
    let mut kinds = Vec::new();
    let mut next_bad = 0;
    while kinds.iter().filter(|k| **k == Kind::Good).count() < 300 {
        if kinds.len() % 17 == 5 && next_bad < bad.len() * 3 {
            kinds.push(bad[next_bad % bad.len()]);
            next_bad += 1;
        } else {
            kinds.push(Kind::Good);
        }
    }
    assert_eq!(next_bad, 18, "all bad jobs placed");
    let started = Instant::now();
    let figures = run_stream(&broker, &kinds, 10_000).await;
    println!(
        "FIGURES: {} jobs ({} bad) answered in {} ms",
        kinds.len(),
        next_bad,
        started.elapsed().as_millis()
    );
    check(&figures, &broker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_3_1_1_packet_over_the_workers_own_limit_is_refused_before_the_shared_connection() {
    // The longest topic with content at the worker's limit makes a packet 8 bytes over
    // "--max-content-bytes plus 64 KiB", which the 3.1.1 client would refuse in its event loop.
    let broker = Mosquitto::plain();
    let mut bed = TestBed::start_with(common::worker::connectors_dir(), |options| {
        options.limits.max_content_bytes = 1000;
        options.mqtt.max_packet_bytes = 1000 + 64 * 1024;
    })
    .await;
    let client_id = unique_name("edge");
    let on = |topic: &str, content: &str| {
        with(
            job(&broker.url(), topic, content),
            json!({"client-id": client_id, "timeout": 10_000}),
        )
    };
    let first = bed.run(on("edge/0", "x"), Duration::from_secs(20)).await;
    assert_eq!(first.exit_code(), 0, "{}", first.body);
    let long_topic = "t".repeat(65_535);
    let reply = bed
        .run(on(&long_topic, &"c".repeat(1000)), Duration::from_secs(20))
        .await;
    assert_eq!(reply.exit_code(), 1, "{}", reply.body);
    assert!(reply.message().contains("worker's limit"), "{}", reply.body);
    let after = bed.run(on("edge/1", "x"), Duration::from_secs(20)).await;
    assert_eq!(after.exit_code(), 0, "{}", after.body);
    assert_eq!(after.body["attempts"], 1, "{}", after.body);
    let connections = broker
        .log()
        .lines()
        .filter(|l| l.contains("New client connected") && l.contains(&client_id))
        .count();
    assert_eq!(connections, 1, "{}", broker.log());
    bed.finish().await;
}
