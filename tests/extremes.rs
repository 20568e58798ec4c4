//! Every numeric option and every numeric job key at its extremes (0, -1, u64::MAX, 1e30, a
//! word): a clear error naming the option (exit status 2) or the key (exit-code 1, nothing
//! published), or an acceptance SPEC.md and docs/commands.md document; never a panic, never a
//! hang (each run of the binary is bounded and killed past its bound). Also `send` with
//! everything set and no connector, run from a folder without `config/connectors`.

mod common;

use common::child::BIN;
use common::worker::{TestBed, connectors_dir, job, with};
use common::*;
use rumqttc::QoS;
use serde_json::json;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

const EXTREMES: [&str; 5] = ["0", "-1", "18446744073709551615", "1e30", "abc"];

/// Runs the binary to completion with `args` and `envs`, never touching a real queue: the AMQP
/// URL points at a closed loopback port and the queue and connectors are the test's own.
/// Panics if it runs longer than `within` (after killing it).
fn run_bounded(args: &[&str], envs: &[(&str, &str)], within: Duration) -> Output {
    let connectors = connectors_dir();
    let dir = tempfile::tempdir().expect("tempdir");
    let (out, err) = (dir.path().join("out"), dir.path().join("err"));
    let mut command = Command::new(BIN);
    command
        .args(args)
        .env_remove("RUST_LOG")
        .env(
            "MQTT_CONNECTOR_AMQP_URL",
            format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port()),
        )
        .env("MQTT_CONNECTOR_QUEUE", unique_name("extremes"))
        .env("MQTT_CONNECTOR_CONNECTORS", connectors.path())
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out).expect("stdout file"))
        .stderr(std::fs::File::create(&err).expect("stderr file"));
    let mut child = command.spawn().expect("spawn mqtt-connector");
    let deadline = Instant::now() + within;
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "mqtt-connector {args:?} {envs:?} still running after {within:?}: {}",
                std::fs::read_to_string(&err).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: std::fs::read(&out).unwrap_or_default(),
        stderr: std::fs::read(&err).unwrap_or_default(),
    }
}

/// `(command, option, environment variable)` for every numeric option.
const NUMERIC_OPTIONS: [(&str, &str, &str); 8] = [
    ("worker", "--prefetch", "MQTT_CONNECTOR_PREFETCH"),
    ("worker", "--idle-timeout", "MQTT_CONNECTOR_IDLE_TIMEOUT"),
    ("worker", "--grace-period", "MQTT_CONNECTOR_GRACE_PERIOD"),
    (
        "worker",
        "--max-content-bytes",
        "MQTT_CONNECTOR_MAX_CONTENT_BYTES",
    ),
    ("worker", "--mqtt-inflight", "MQTT_CONNECTOR_MQTT_INFLIGHT"),
    (
        "worker",
        "--max-connections",
        "MQTT_CONNECTOR_MAX_CONNECTIONS",
    ),
    (
        "worker",
        "--delivery-limit",
        "MQTT_CONNECTOR_DELIVERY_LIMIT",
    ),
    ("submit", "--wait-timeout", "MQTT_CONNECTOR_WAIT_TIMEOUT"),
];

/// The values documented as accepted among [`EXTREMES`] (docs/commands.md): a grace period of
/// 0 s cancels the jobs in flight at once on SIGTERM.
fn accepted(option: &str, value: &str) -> bool {
    option == "--grace-period" && value == "0"
}

#[test]
fn every_numeric_option_at_an_extreme_is_refused_naming_the_option() {
    for (command, option, env) in NUMERIC_OPTIONS {
        for value in EXTREMES {
            if accepted(option, value) {
                continue;
            }
            let flag = format!("{option}={value}");
            for (args, envs) in [
                (vec![command, flag.as_str()], vec![]),
                (vec![command], vec![(env, value)]),
            ] {
                let output = run_bounded(&args, &envs, T);
                let stderr = String::from_utf8_lossy(&output.stderr);
                assert_eq!(
                    output.status.code(),
                    Some(2),
                    "{args:?} {envs:?}: {}\n{stderr}",
                    output.status
                );
                assert!(
                    stderr.contains(option) && stderr.contains("expected a whole number from"),
                    "{args:?} {envs:?}: {stderr}"
                );
                assert!(!stderr.contains("panicked"), "{stderr}");
            }
        }
    }
}

/// Runs a worker child with `args` on its own queue, waits until it consumes, sends a job and
/// awaits its answer, then SIGTERMs it: exit 0, within the harness's bound.
async fn worker_with_bounds_serves_and_stops(args: &[&str]) {
    let broker = Mosquitto::plain();
    let queue = unique_name("jobs-extremes");
    let connectors = connectors_dir();
    let mut worker = ChildWorker::command(&amqp_url(), &queue, connectors.path())
        .args(args)
        .start()
        .await;
    let amqp = Amqp::connect().await;
    let (reply_queue, mut replies) = amqp.reply_queue().await;
    let topic = unique_name("extremes");
    let mut subscriber = Subscriber::start(broker.port(), &topic, QoS::AtLeastOnce).await;
    let body = job(&broker.url(), &topic, "x").to_string();
    amqp.send_job(&queue, body.as_bytes(), Some(&reply_queue), Some("bounds"))
        .await;
    let reply = replies.expect_reply(T).await;
    assert_eq!(reply.exit_code(), 0, "{args:?}: {}", reply.body);
    assert_eq!(subscriber.expect(T).await.payload_str(), "x");
    let started = Instant::now();
    let exit = worker.terminate().await;
    assert!(exit.success(), "{args:?}: {exit}\n{}", worker.tail(30));
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(!worker.output().contains("panicked"), "{}", worker.tail(30));
    amqp.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_at_the_lowest_bounds_answers_a_job_and_stops_on_sigterm() {
    worker_with_bounds_serves_and_stops(&[
        "--prefetch=1",
        "--idle-timeout=1",
        "--grace-period=0",
        "--max-content-bytes=1",
        "--mqtt-inflight=1",
        "--max-connections=1",
        "--queue-type=quorum",
        "--delivery-limit=1",
    ])
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_at_the_highest_bounds_answers_a_job_and_stops_on_sigterm() {
    worker_with_bounds_serves_and_stops(&[
        "--prefetch=65535",
        "--idle-timeout=604800",
        "--grace-period=3600",
        "--max-content-bytes=268435456",
        "--mqtt-inflight=65535",
        "--max-connections=100000",
        "--queue-type=quorum",
        "--delivery-limit=1000000",
    ])
    .await;
}

/// What a job key at an extreme must give.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// Exit-code 1 naming the key; nothing published.
    Refused,
    /// Published and answered 0 (a documented value).
    Published,
}

/// Every numeric job key with each of [`EXTREMES`] (as JSON for a body, as text for `--set`),
/// with the keys the case also needs, and what it must give.
fn job_key_cases() -> Vec<(
    &'static str,
    serde_json::Value,
    &'static str,
    serde_json::Value,
    Expect,
)> {
    let json_values: [serde_json::Value; 5] = [
        json!(0),
        json!(-1),
        json!(u64::MAX),
        serde_json::from_str("1e30").expect("1e30 is JSON"),
        json!("abc"),
    ];
    let mut cases = Vec::new();
    for key in ["qos", "timeout", "message-expiry", "mqtt-version"] {
        for (text, value) in EXTREMES.iter().zip(json_values.iter()) {
            let expect = match (key, *text) {
                // QoS 0 and an expiry of 0 s are valid values (SPEC.md "What a job may do").
                ("qos", "0") | ("message-expiry", "0") => Expect::Published,
                _ => Expect::Refused,
            };
            let extra = if key == "message-expiry" {
                json!({"mqtt-version": "5"})
            } else {
                json!({})
            };
            cases.push((key, value.clone(), *text, extra, expect));
        }
    }
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_numeric_job_key_at_an_extreme_through_send_set_is_refused_naming_it() {
    let broker = Mosquitto::plain();
    let prefix = unique_name("extremes-send");
    let mut subscriber =
        Subscriber::start(broker.port(), &format!("{prefix}/#"), QoS::AtLeastOnce).await;
    let mut published = Vec::new();
    for (index, (key, _, text, extra, expect)) in job_key_cases().into_iter().enumerate() {
        let topic = format!("{prefix}/{index}");
        let mut sets = vec![
            format!("broker={}", broker.url()),
            format!("topic={topic}"),
            format!("content={index}"),
            format!("client-id={prefix}-{index}"),
            "timeout=5000".to_owned(),
            format!("{key}={text}"),
        ];
        for (extra_key, extra_value) in extra.as_object().expect("object") {
            sets.push(format!(
                "{extra_key}={}",
                extra_value.as_str().unwrap_or_default()
            ));
        }
        let mut args = vec!["send"];
        for set in &sets {
            args.extend(["--set", set.as_str()]);
        }
        let output = tokio::task::block_in_place(|| run_bounded(&args, &[], T));
        let stdout = String::from_utf8_lossy(&output.stdout);
        let reply: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap_or(""))
            .unwrap_or_else(|e| {
                panic!(
                    "{key}={text}: not a JSON result ({e}): {stdout} {}",
                    String::from_utf8_lossy(&output.stderr)
                )
            });
        match expect {
            Expect::Refused => {
                assert_eq!(reply["exit-code"], 1, "{key}={text}: {reply}");
                assert_eq!(output.status.code(), Some(1), "{key}={text}");
                let message = reply["message"].as_str().unwrap_or_default();
                assert!(message.contains(key), "{key}={text}: {message}");
            }
            Expect::Published => {
                assert_eq!(reply["exit-code"], 0, "{key}={text}: {reply}");
                published.push(index.to_string());
            }
        }
    }
    // A last job, published after every other: once it arrives, all before it have.
    let (broker_set, topic_set) = (
        format!("broker={}", broker.url()),
        format!("topic={prefix}/end"),
    );
    let client_set = format!("client-id={prefix}-end");
    let end = [
        "send",
        "--set",
        &broker_set,
        "--set",
        &topic_set,
        "--set",
        &client_set,
        "--set",
        "content=end",
    ];
    let output = tokio::task::block_in_place(|| run_bounded(&end, &[], T));
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stdout)
    );
    let mut received = Vec::new();
    loop {
        let message = subscriber.expect(T).await.payload_str();
        if message == "end" {
            break;
        }
        received.push(message);
    }
    assert_eq!(received, published, "what was published");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_numeric_job_key_at_an_extreme_in_a_job_body_is_refused_naming_it() {
    let broker = Mosquitto::plain();
    let prefix = unique_name("extremes-body");
    let mut subscriber =
        Subscriber::start(broker.port(), &format!("{prefix}/#"), QoS::AtLeastOnce).await;
    let mut bed = TestBed::new().await;
    let mut published = Vec::new();
    for (index, (key, value, text, extra, expect)) in job_key_cases().into_iter().enumerate() {
        let topic = format!("{prefix}/{index}");
        let mut body = with(job(&broker.url(), &topic, &index.to_string()), extra);
        body[key] = value;
        let reply = bed.run(body, T).await;
        match expect {
            Expect::Refused => {
                assert_eq!(reply.exit_code(), 1, "{key}={text}: {}", reply.body);
                assert!(
                    reply.message().contains(key),
                    "{key}={text}: {}",
                    reply.body
                );
            }
            Expect::Published => {
                assert_eq!(reply.exit_code(), 0, "{key}={text}: {}", reply.body);
                published.push(index.to_string());
            }
        }
    }
    let reply = bed
        .run(job(&broker.url(), &format!("{prefix}/end"), "end"), T)
        .await;
    assert_eq!(reply.exit_code(), 0, "{}", reply.body);
    let mut received = Vec::new();
    loop {
        let message = subscriber.expect(T).await.payload_str();
        if message == "end" {
            break;
        }
        received.push(message);
    }
    assert_eq!(received, published, "what was published");
    bed.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_without_a_connector_works_outside_the_repository() {
    let broker = Mosquitto::plain();
    let topic = unique_name("send-anywhere");
    let mut subscriber = Subscriber::start(broker.port(), &topic, QoS::AtLeastOnce).await;
    let cwd = tempfile::tempdir().expect("tempdir");
    let (broker_set, topic_set, client_set) = (
        format!("broker={}", broker.url()),
        format!("topic={topic}"),
        format!("client-id={topic}"),
    );
    let run = |extra: &[&str]| {
        let mut command = Command::new(BIN);
        command
            .current_dir(cwd.path())
            .env_remove("MQTT_CONNECTOR_CONNECTORS")
            .env_remove("MQTT_CONNECTOR_CONNECTOR")
            .args([
                "send",
                "--set",
                &broker_set,
                "--set",
                &topic_set,
                "--set",
                &client_set,
            ])
            .args(extra)
            .stdin(Stdio::null());
        tokio::task::block_in_place(|| command.output()).expect("run send")
    };
    let output = run(&["--set", "content=anywhere"]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(subscriber.expect(T).await.payload_str(), "anywhere");
    // Naming a connector still needs the folder, and says which.
    let output = run(&["--connector", "local", "--set", "content=x"]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("config/connectors"), "{stderr}");
}
