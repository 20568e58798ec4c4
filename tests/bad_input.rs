//! Bad input never hurts the worker: each bad job gets exactly one reply with exit-code 1 (2 for
//! an unknown connector) and a message that names what is wrong, nothing is requeued, and the
//! worker keeps publishing valid jobs afterwards. Passwords never appear in a reply.

mod common;

use common::worker::{TestBed, job, with};
use common::*;
use rumqttc::QoS;
use serde_json::json;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);
const PASSWORD: &str = "pw-7f3a-SECRET";

/// A bad body, the exit-code it must get and words its message must contain (any of them,
/// case-insensitive).
struct Case {
    name: &'static str,
    body: Vec<u8>,
    code: i64,
    words: &'static [&'static str],
}

fn case(
    name: &'static str,
    body: impl Into<Vec<u8>>,
    code: i64,
    words: &'static [&'static str],
) -> Case {
    Case {
        name,
        body: body.into(),
        code,
        words,
    }
}

fn cases(broker: &str) -> Vec<Case> {
    let valid = |extra: serde_json::Value| with(job(broker, "t", "x"), extra).to_string();
    // `alpn` takes a string or a list: an untagged value, buffered whole before it is matched,
    // so the nesting really is parsed (no type mismatch stops it early).
    let deep = format!(r#"{{"alpn": {}}}"#, "[".repeat(10_000));
    let big_key = format!(r#"{{"{}": 1, "content": "x"}}"#, "k".repeat(1024 * 1024));
    vec![
        case("not JSON", "this is not json", 1, &["json"]),
        case("empty", "", 1, &["empty", "json"]),
        case("JSON array", r#"[{"content": "x"}]"#, 1, &["object"]),
        case(
            "non-UTF-8 bytes",
            b"\xff\xfe\x00garbage".to_vec(),
            1,
            &["utf-8", "json"],
        ),
        case(
            "non-UTF-8 in a string",
            [&br#"{"content": ""#[..], b"\xff\xfe", br#""}"#].concat(),
            1,
            &["utf-8", "json", "content"],
        ),
        case(
            "truncated JSON",
            r#"{"content": "x""#,
            1,
            &["eof", "json", "end"],
        ),
        case(
            "unknown key",
            valid(json!({"colour": "red"})),
            1,
            &["colour"],
        ),
        case("wrong type", valid(json!({"qos": "two"})), 1, &["qos"]),
        case("qos 3", valid(json!({"qos": 3})), 1, &["qos"]),
        case(
            "topic with #",
            valid(json!({"topic": "a/#"})),
            1,
            &["topic"],
        ),
        case(
            "topic with +",
            valid(json!({"topic": "a/+/b"})),
            1,
            &["topic"],
        ),
        case(
            "missing content",
            valid(json!({"content": null})),
            1,
            &["content"],
        ),
        case(
            "missing broker",
            valid(json!({"broker": null})),
            1,
            &["broker"],
        ),
        case(
            "missing client-id",
            valid(json!({"client-id": null})),
            1,
            &["client-id"],
        ),
        case(
            "bad broker URL",
            valid(json!({"broker": "http://x"})),
            1,
            &["broker"],
        ),
        case("timeout 0", valid(json!({"timeout": 0})), 1, &["timeout"]),
        case(
            "unknown action",
            valid(json!({"action": "receive"})),
            1,
            &["action"],
        ),
        case(
            "unknown connector",
            valid(json!({"connector": "nope"})),
            2,
            &["nope"],
        ),
        case(
            "path as connector",
            valid(json!({"connector": "../etc/passwd"})),
            2,
            &["../etc/passwd"],
        ),
        case(
            "deeply nested JSON",
            deep,
            1,
            &["recursion", "nest", "depth", "alpn"],
        ),
        case(
            "deeply nested array body",
            "[".repeat(10_000),
            1,
            &["object"],
        ),
        case("1 MB key", big_key, 1, &["unknown", "key"]),
        // A bad job carrying a password: the message must not repeat it.
        case(
            "bad job with password",
            valid(json!({"username": "u", "password": PASSWORD, "qos": "two"})),
            1,
            &["qos"],
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_bad_job_gets_a_clear_reply_and_the_worker_keeps_working() {
    let broker = Mosquitto::plain();
    let topic = unique_name("t");
    let mut sub = Subscriber::start(broker.port(), &topic, QoS::ExactlyOnce).await;
    let mut bed = TestBed::new().await;
    let mut raw_replies = Vec::new();
    for c in cases(&broker.url()) {
        let reply = bed.run_raw(&c.body, T).await;
        assert_eq!(reply.exit_code(), c.code, "{}: {}", c.name, reply.body);
        let message = reply.message().to_lowercase();
        assert!(
            c.words.iter().any(|w| message.contains(&w.to_lowercase())),
            "{}: the message should mention one of {:?}: {message}",
            c.name,
            c.words
        );
        assert!(
            reply.raw.len() < 4096,
            "{}: a reply of {} bytes is not a clear message",
            c.name,
            reply.raw.len()
        );
        assert!(
            !message.contains("key \"?\""),
            "{}: names a key that is not one: {message}",
            c.name
        );
        eprintln!("{}: {}", c.name, reply.message());
        raw_replies.push(reply.raw);
    }
    // Nothing was published by any of them.
    assert_eq!(sub.recv(Duration::from_millis(200)).await, None);
    // The worker still works.
    let reply = bed.run(job(&broker.url(), &topic, "still alive"), T).await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    assert_eq!(sub.expect(T).await.payload_str(), "still alive");
    // One reply per job, nothing requeued.
    bed.replies
        .expect_no_reply(Duration::from_millis(300))
        .await;
    bed.wait_queue_empty(T).await;
    for raw in &raw_replies {
        assert!(!String::from_utf8_lossy(raw).contains(PASSWORD));
    }
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_password_never_appears_in_a_reply() {
    let broker = Mosquitto::with_password("alice", "the-right-one");
    let mut bed = TestBed::new().await;
    let reply = bed
        .run(
            with(
                job(&broker.url(), "t", "x"),
                json!({"username": "alice", "password": PASSWORD}),
            ),
            T,
        )
        .await;
    assert_eq!(reply.exit_code(), 4, "{}", reply.body);
    assert!(!String::from_utf8_lossy(&reply.raw).contains(PASSWORD));
    assert!(!String::from_utf8_lossy(&reply.raw).contains("7f3a"));
    // And not in the metrics either.
    let metrics = bed.worker.metrics().await;
    assert!(!metrics.contains(PASSWORD));
    bed.wait_queue_empty(T).await;
    bed.finish().await;
}
