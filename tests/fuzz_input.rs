//! Hostile input, generated: the job decoder and the connector loader never panic, and every
//! rejection is an invalid job (exit-code 1) with a message. Runs a bounded number of cases in
//! CI (`PROPTEST_CASES` raises it).

use mqtt_connector::connectors;
use mqtt_connector::job::{Job, JobError, Limits, Params};
use mqtt_connector::outcome::{ExitCode, Outcome};
use proptest::prelude::*;

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

/// A JSON object whose keys are mostly job keys.
fn job_object() -> impl Strategy<Value = serde_json::Value> {
    prop::collection::btree_map(prop::sample::select(KEYS), json_value(), 0..10).prop_map(|map| {
        serde_json::Value::Object(map.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())
    })
}

fn assert_rejection_is_exit_one(err: JobError) {
    let outcome = Outcome::from(err);
    assert_eq!(outcome.exit_code, ExitCode::InvalidJob);
    assert!(!outcome.message.is_empty());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2_000, ..ProptestConfig::default() })]

    #[test]
    fn any_bytes_decode_or_are_rejected_as_invalid(body in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Err(err) = Params::decode(&body) {
            assert_rejection_is_exit_one(err);
        }
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
                prop_assert!(!message.is_empty());
            }
        }
    }
}
