//! Hostile input, generated: the job decoder and the connector loader never panic, and every
//! rejection is an invalid job (exit-code 1) whose message says what is wrong: the key at fault
//! for a JSON object, the problem with the JSON (and where) for anything else. Through a real
//! worker, rejected bodies publish nothing and a good job after them is answered.
//!
//! The bodies are biased towards what reaches the decoder's interesting paths: mostly JSON
//! objects with job keys and plausible values (many of them valid jobs), then the same bodies
//! cut short, with a byte changed, or with something after the object; random bytes are a
//! minority. `bodies_are_mostly_job_like_json` measures that mix, so the bias cannot rot.
//! 2,000 cases per property by default; `PROPTEST_CASES` sets another count (the worker test
//! sends a tenth of it, at least 20 and at most 300 bodies).

mod common;

use common::worker::{TestBed, job};
use common::{Mosquitto, Subscriber};
use mqtt_connector::connectors;
use mqtt_connector::job::{Job, JobError, Limits, Params};
use mqtt_connector::outcome::{ExitCode, Outcome};
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use std::time::Duration;

const KEYS: &[&str] = &[
    "action",
    "connector",
    "broker",
    "username",
    "password",
    "client-id",
    "topic",
    "qos",
    "content",
    "retain",
    "root-ca-crt",
    "certificate",
    "private-key",
    "use-certificate",
    "alpn",
    "timeout",
    "unknown",
    "",
];

/// Any JSON value, a few levels deep.
fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(serde_json::Value::from),
        ".{0,40}".prop_map(serde_json::Value::from),
        prop::sample::select(vec![
            "tcp://h",
            "ssl://h:8883",
            "ws://h",
            "a/#",
            "${X}",
            "0",
            "3"
        ])
        .prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
            prop::collection::btree_map(".{0,8}", inner, 0..4)
                .prop_map(|map| serde_json::Value::Object(map.into_iter().collect())),
        ]
    })
}

/// Values a job key plausibly holds: most valid for some key, a few near misses.
fn plausible_value() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::json;
    prop::sample::select(vec![
        json!("send"),
        json!("local"),
        json!("tcp://127.0.0.1:1883"),
        json!("ssl://broker.example:8883"),
        json!("wss://broker.example:443/mqtt"),
        json!("mqtt://[::1]:1883"),
        json!("client-1"),
        json!("a/b"),
        json!("a/+/c"),
        json!("hello"),
        json!(""),
        json!(0),
        json!(1),
        json!(2),
        json!(3),
        json!(true),
        json!(false),
        json!(5000),
        json!(-1),
        json!(3_600_001),
        json!("x-amzn-mqtt-ca"),
        json!(["mqtt", "x-amzn-mqtt-ca"]),
        json!("/etc/ssl/certs/ca.pem"),
        json!(null),
    ])
}

/// A JSON object whose keys are mostly job keys, with mostly plausible values.
fn job_object() -> impl Strategy<Value = serde_json::Value> {
    let value = prop_oneof![3 => plausible_value(), 1 => json_value()];
    prop::collection::btree_map(prop::sample::select(KEYS), value, 0..10).prop_map(|map| {
        serde_json::Value::Object(map.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    })
}

/// A valid-looking job: every required key with a plausible value, plus at most one random one.
fn near_valid_job() -> impl Strategy<Value = serde_json::Value> {
    (job_object(), any::<u8>()).prop_map(|(extra, qos)| {
        let mut job = serde_json::json!({
            "broker": "tcp://127.0.0.1:1883", "client-id": "c", "topic": "a/b",
            "content": "hi", "qos": qos % 3,
        });
        let object = job.as_object_mut().expect("an object");
        for (key, value) in extra.as_object().expect("an object").iter().take(1) {
            object.insert(key.clone(), value.clone());
        }
        job
    })
}

/// What is done to a serialized object before it is decoded.
#[derive(Debug, Clone)]
enum Mutation {
    None,
    /// Cut after this many bytes (modulo the length).
    Truncate(usize),
    /// Replace the byte at this position (modulo the length).
    Flip(usize, u8),
    /// Append these bytes after the object (a second object, garbage, a NUL…).
    Append(Vec<u8>),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => Just(Mutation::None),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (any::<usize>(), any::<u8>()).prop_map(|(at, byte)| Mutation::Flip(at, byte)),
        1 => prop_oneof![
            Just(b"{}".to_vec()),
            Just(b"\0".to_vec()),
            Just(b" \n".to_vec()),
            prop::collection::vec(any::<u8>(), 1..8),
        ]
        .prop_map(Mutation::Append),
    ]
}

fn mutate(mut body: Vec<u8>, mutation: &Mutation) -> Vec<u8> {
    match mutation {
        Mutation::None => {}
        Mutation::Truncate(at) => body.truncate(at % (body.len() + 1)),
        Mutation::Flip(at, byte) => {
            if !body.is_empty() {
                let at = at % body.len();
                body[at] = *byte;
            }
        }
        Mutation::Append(tail) => body.extend_from_slice(tail),
    }
    body
}

/// Job bodies: mostly job-like JSON objects (some mutated), a few random bytes.
fn job_body() -> impl Strategy<Value = Vec<u8>> {
    let object = prop_oneof![3 => job_object(), 3 => near_valid_job(), 1 => json_value()];
    prop_oneof![
        8 => (object, mutation())
            .prop_map(|(value, mutation)| mutate(value.to_string().into_bytes(), &mutation)),
        1 => prop::collection::vec(any::<u8>(), 0..256),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(|tail| {
            let mut body = b"{".to_vec();
            body.extend(tail);
            body
        }),
    ]
}

/// `PROPTEST_CASES` when set, else 2,000 cases per property.
fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|cases| cases.parse().ok())
        .unwrap_or(2_000);
    ProptestConfig {
        cases,
        ..ProptestConfig::default()
    }
}

/// Whether `message` tells the sender of `body` what is wrong. A JSON object's rejection names
/// the key at fault: one of the object's keys (unknown, wrong type or value) or a job key it
/// lacks. Anything else says it is not the one JSON object expected, where its JSON breaks, or
/// (a broken body can fail at a key before its end is read) which key.
fn explains(body: &[u8], message: &str) -> bool {
    let object = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|value| value.as_object().cloned());
    match object {
        Some(object) => {
            let names = |key: &str| {
                message.contains(&format!("key {key:?}"))
                    || message.contains(&format!("unknown field `{key}`"))
                    // The worker checks `action` before anything else, in its own words.
                    || (key == "action" && message.contains("unknown action"))
            };
            object.keys().any(|key| names(key))
                || Params::default().keys().iter().any(|(key, _)| names(key))
        }
        None => {
            [
                "not UTF-8 JSON",
                "is empty",
                "not a JSON object",
                "more than one JSON object",
            ]
            .iter()
            .any(|words| message.contains(words))
                || located(message)
                || message.contains("key \"")
                || message.contains("unknown field `")
        }
    }
}

/// Whether `message` says where the JSON breaks (serde's "at line L column C").
fn located(message: &str) -> bool {
    message.split(" at line ").skip(1).any(|rest| {
        let mut words = rest.split(' ');
        let line = words.next().and_then(|l| l.parse::<u64>().ok());
        let column = words.next() == Some("column")
            && words
                .next()
                .and_then(|c| {
                    c.trim_end_matches(|c: char| !c.is_ascii_digit())
                        .parse::<u64>()
                        .ok()
                })
                .is_some();
        line.is_some() && column
    })
}

fn assert_rejection_explained(body: &[u8], err: JobError) {
    let outcome = Outcome::from(err);
    assert_eq!(
        outcome.exit_code,
        ExitCode::InvalidJob,
        "{}",
        outcome.message
    );
    assert!(
        explains(body, &outcome.message),
        "the message does not say what is wrong with {:?}: {}",
        String::from_utf8_lossy(body),
        outcome.message
    );
}

/// A connector file's error says what is wrong: not JSON, not an object, or (for an object) the
/// key at fault, one of the file's keys or a job key.
fn assert_connector_error_explained(text: &str, err: &connectors::ConnectorFileError) {
    use connectors::ConnectorFileError as E;
    let message = err.to_string();
    match serde_json::from_str::<serde_json::Value>(text) {
        Err(_) => assert!(matches!(err, E::NotJson(_)), "{text:?}: {message}"),
        Ok(serde_json::Value::Object(object)) => {
            let names = |key: &str| {
                message.contains(&format!("key {key:?}"))
                    || message.contains(&format!("unknown field `{key}`"))
            };
            assert!(
                object.keys().any(|key| names(key))
                    || Params::default().keys().iter().any(|(key, _)| names(key)),
                "{text:?}: {message}"
            );
        }
        Ok(_) => assert!(matches!(err, E::NotAnObject), "{text:?}: {message}"),
    }
}

/// What the validator made of one body.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Valid,
    Invalid,
}

/// Decodes and validates `body`; any rejection must be exit-code 1 with a message that says
/// what is wrong.
fn judge(body: &[u8]) -> Verdict {
    let result = Params::decode(body).and_then(|params| Job::validate(params, Limits::default()));
    match result {
        Ok(_) => Verdict::Valid,
        Err(err) => {
            assert_rejection_explained(body, err);
            Verdict::Invalid
        }
    }
}

#[test]
fn a_message_that_names_no_key_or_place_does_not_explain() {
    // The checker itself must be able to say no.
    assert!(!explains(
        br#"{"qos": 3}"#,
        "invalid job: something is wrong"
    ));
    assert!(!explains(
        br#"{"qos": 3}"#,
        "invalid job: key \"topic2\" is bad"
    ));
    assert!(!explains(b"{", "invalid job: something is wrong"));
    assert!(explains(
        br#"{"qos": 3}"#,
        "invalid job: key \"qos\": 3 is not 0, 1 or 2"
    ));
    assert!(explains(br#"{"qos": 3}"#, "key \"topic\" is missing"));
    assert!(explains(
        b"{",
        "EOF while parsing an object at line 1 column 1"
    ));
}

/// The generator's mix, measured on 2,000 samples: at least 80 % of the bodies start with `{`
/// and at least 5 % are valid jobs (so validation past the decoder is exercised too).
#[test]
fn bodies_are_mostly_job_like_json() {
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = job_body();
    let samples = 2_000;
    let (mut objects, mut valid) = (0, 0);
    for _ in 0..samples {
        let body = strategy
            .new_tree(&mut runner)
            .expect("generate a body")
            .current();
        if body.first() == Some(&b'{') {
            objects += 1;
        }
        if judge(&body) == Verdict::Valid {
            valid += 1;
        }
    }
    eprintln!(
        "fuzz bodies: {objects} of {samples} start with '{{', {valid} are valid jobs; {} cases \
         per property",
        config().cases
    );
    assert!(
        objects * 100 >= samples * 80,
        "{objects} of {samples} objects"
    );
    assert!(
        valid * 100 >= samples * 5,
        "{valid} of {samples} valid jobs"
    );
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_body_decodes_or_is_rejected_as_invalid(body in job_body()) {
        judge(&body);
    }

    #[test]
    fn any_job_object_validates_or_is_rejected_as_invalid(object in job_object()) {
        judge(object.to_string().as_bytes());
    }

    #[test]
    fn any_connector_text_loads_or_names_a_problem(object in job_object(), junk in ".{0,40}") {
        let env = |name: &str| (name == "X").then(|| "value".to_owned());
        for text in [object.to_string(), junk] {
            if let Err(err) = connectors::parse(&text, &env) {
                assert_connector_error_explained(&text, &err);
            }
        }
    }
}

/// What the worker must answer a rejected body: 2 for a decodable job naming a connector (the
/// worker has none), else 1.
fn expected_code(body: &[u8]) -> i64 {
    match Params::decode(body) {
        Ok(params)
            if params.connector.is_some()
                && params
                    .action
                    .as_deref()
                    .is_none_or(|action| action == "send") =>
        {
            2
        }
        _ => 1,
    }
}

/// Generated bodies the validator rejects, sent to a real worker: each answered once with its
/// exit-code and a message that says what is wrong, nothing published to MQTT, and a good job
/// after them answered 0 and received.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_bodies_publish_nothing_and_the_worker_answers_a_good_job_after_them() {
    let mosquitto = Mosquitto::plain();
    // Every broker address the generator writes is pointed at this test's own Mosquitto: a
    // body wrongly published would reach the subscriber, never a shared or outside broker.
    let own = format!("127.0.0.1:{}", mosquitto.port());
    let local = |body: Vec<u8>| -> Vec<u8> {
        let mut text = String::from_utf8_lossy(&body).into_owned();
        if text.as_bytes() != body.as_slice() {
            return body; // Not UTF-8: no address to rewrite, and the bytes must stay as made.
        }
        for address in [
            "127.0.0.1:1883",
            "[::1]:1883",
            "broker.example:8883",
            "broker.example:443",
        ] {
            text = text.replace(address, &own);
        }
        text.into_bytes()
    };
    let count = (config().cases as usize / 10).clamp(20, 300);
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    let strategy = job_body();
    let mut bodies = Vec::with_capacity(count);
    while bodies.len() < count {
        let body = local(strategy.new_tree(&mut runner).expect("a body").current());
        if judge(&body) == Verdict::Invalid {
            bodies.push(body);
        }
    }
    let mut subscriber = Subscriber::start(mosquitto.port(), "#", rumqttc::QoS::AtLeastOnce).await;
    let mut bed = TestBed::new().await;
    let started = std::time::Instant::now();
    for (index, body) in bodies.iter().enumerate() {
        bed.amqp
            .send_job(
                &bed.queue,
                body,
                Some(&bed.reply_queue),
                Some(&index.to_string()),
            )
            .await;
    }
    let replies = bed
        .replies
        .expect_replies(bodies.len(), Duration::from_secs(30))
        .await;
    let mut answered = vec![0; bodies.len()];
    for reply in &replies {
        let index: usize = reply
            .correlation_id
            .as_deref()
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("reply without our correlation id: {}", reply.body));
        answered[index] += 1;
        let body = &bodies[index];
        let shown = String::from_utf8_lossy(body);
        assert_eq!(
            reply.exit_code(),
            expected_code(body),
            "{shown:?}: {}",
            reply.body
        );
        if reply.exit_code() == 1 {
            assert!(explains(body, reply.message()), "{shown:?}: {}", reply.body);
        } else {
            assert!(
                reply.message().contains("unknown connector"),
                "{}",
                reply.body
            );
        }
    }
    assert!(
        answered.iter().all(|&n| n == 1),
        "answers per body: {answered:?}"
    );
    eprintln!(
        "{} rejected bodies answered by the worker in {:?}",
        bodies.len(),
        started.elapsed()
    );

    let topic = common::unique_name("fuzz-after");
    let reply = bed
        .run(
            job(&mosquitto.url(), &topic, "after"),
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    // The broker forwards each publish before it acknowledges it, and every reply above came
    // before this job was sent: a rejected body published would have arrived first.
    let first = subscriber.expect(Duration::from_secs(10)).await;
    assert_eq!(
        (first.topic.as_str(), first.payload_str().as_str()),
        (topic.as_str(), "after")
    );
    assert_eq!(subscriber.drain(), vec![], "published besides the good job");
    bed.wait_queue_empty(Duration::from_secs(10)).await;
    bed.finish().await;
}
