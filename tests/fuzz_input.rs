//! Hostile input, generated: the job decoder and the connector loader never panic, and every
//! rejection is an invalid job (exit-code 1) with a message.
//!
//! The bodies are biased towards what reaches the decoder's interesting paths: mostly JSON
//! objects with job keys and plausible values (many of them valid jobs), then the same bodies
//! cut short, with a byte changed, or with something after the object; random bytes are a
//! minority. `bodies_are_mostly_job_like_json` measures that mix, so the bias cannot rot.
//! 2,000 cases per property by default; `PROPTEST_CASES` sets another count.

use mqtt_connector::connectors;
use mqtt_connector::job::{Job, JobError, Limits, Params};
use mqtt_connector::outcome::{ExitCode, Outcome};
use proptest::prelude::*;
use proptest::strategy::ValueTree;

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

fn assert_rejection_is_exit_one(err: JobError) {
    let outcome = Outcome::from(err);
    assert_eq!(outcome.exit_code, ExitCode::InvalidJob);
    assert!(!outcome.message.is_empty());
}

/// What the validator made of one body.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Valid,
    Invalid,
}

/// Decodes and validates `body`; any rejection must be exit-code 1 with a message.
fn judge(body: &[u8]) -> Verdict {
    match Params::decode(body) {
        Ok(params) => match Job::validate(params, Limits::default()) {
            Ok(_) => Verdict::Valid,
            Err(err) => {
                assert_rejection_is_exit_one(err);
                Verdict::Invalid
            }
        },
        Err(err) => {
            assert_rejection_is_exit_one(err);
            Verdict::Invalid
        }
    }
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
        let body = object.to_string();
        match Params::decode(body.as_bytes()) {
            Ok(params) => {
                if let Err(err) = Job::validate(params, Limits::default()) {
                    assert_rejection_is_exit_one(err);
                }
            }
            Err(err) => assert_rejection_is_exit_one(err),
        }
    }

    #[test]
    fn any_connector_text_loads_or_names_a_problem(object in job_object(), junk in ".{0,40}") {
        let env = |name: &str| (name == "X").then(|| "value".to_owned());
        for text in [object.to_string(), junk] {
            if let Err(message) = connectors::parse(&text, &env) {
                prop_assert!(!message.to_string().is_empty());
            }
        }
    }
}
