//! The `mqtt-connector` binary as a user runs it: `send` (synchronous, no queue), `submit` with
//! and without `--wait` against a `worker` child process configured by `MQTT_CONNECTOR_*`
//! environment variables, `check`, the worker's refusal of a bad connector file, its
//! `/healthz` and `/readyz`, and its clean exit on SIGTERM; `send` and `submit --wait` of a
//! `request` print the device's answer.

mod common;

use common::child::BIN;
use common::worker::connectors_dir;
use common::*;
use rumqttc::QoS;
use serde_json::json;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

/// Runs the binary with `args` (and `envs`) to completion, off the async threads; 60 s at most.
async fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut command = Command::new(BIN);
    command.args(args).stdin(Stdio::null());
    for (key, value) in envs {
        command.env(key, value);
    }
    let described = format!("mqtt-connector {args:?}");
    tokio::time::timeout(
        Duration::from_secs(60),
        tokio::task::spawn_blocking(move || command.output()),
    )
    .await
    .unwrap_or_else(|_| panic!("{described} did not finish within 60 s"))
    .expect("join")
    .unwrap_or_else(|e| panic!("run {described}: {e}"))
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The result JSON `send` and `submit --wait` print (the last line of stdout).
fn printed_json(output: &Output) -> serde_json::Value {
    let out = stdout(output);
    let line = out.lines().last().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| {
        panic!(
            "stdout is not a JSON result ({e}): {out:?}; stderr: {}",
            stderr(output)
        )
    })
}

/// A connectors folder with `local`: the machine's Mosquitto on 127.0.0.1:1883.
fn local_connectors() -> tempfile::TempDir {
    let dir = connectors_dir();
    write_connector(
        dir.path(),
        "local",
        json!({"broker": "tcp://127.0.0.1:1883", "client-id": unique_name("cli"), "qos": 1}),
    );
    dir
}

/// A connectors folder with a valid connector `good` and a connector `bad_name` holding `bad`.
fn good_and_bad_connectors(bad_name: &str, bad: serde_json::Value) -> tempfile::TempDir {
    let dir = connectors_dir();
    write_connector(
        dir.path(),
        "good",
        json!({"broker": "tcp://127.0.0.1:1883", "client-id": "c"}),
    );
    write_connector(dir.path(), bad_name, bad);
    dir
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_publishes_and_exits_0() {
    let dir = local_connectors();
    let topic = unique_name("cli");
    let mut sub = Subscriber::start(1883, &topic, QoS::ExactlyOnce).await;
    let out = run(
        &[
            "send",
            "--connector",
            "local",
            "--set",
            &format!("topic={topic}"),
            "--set",
            "content=hi",
            "--connectors",
            path(dir.path()),
        ],
        &[],
    )
    .await;
    let result = printed_json(&out);
    assert_eq!(result["exit-code"], 0, "{result}; stderr: {}", stderr(&out));
    assert!(result["message"].is_string(), "{result}");
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stdout(&out).starts_with("{\"exit-code\":0"),
        "{}",
        stdout(&out)
    );
    assert_eq!(sub.expect(T).await.payload_str(), "hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_to_a_closed_port_exits_3() {
    let dir = connectors_dir();
    let port = free_port();
    let out = run(
        &[
            "send",
            "--set",
            &format!("broker=tcp://127.0.0.1:{port}"),
            "--set",
            "client-id=cli-closed",
            "--set",
            "topic=t",
            "--set",
            "content=x",
            "--set",
            "timeout=1500",
            "--connectors",
            path(dir.path()),
        ],
        &[],
    )
    .await;
    let result = printed_json(&out);
    assert_eq!(result["exit-code"], 3, "{result}");
    assert_eq!(out.status.code(), Some(3));
    let message = result["message"].as_str().unwrap_or_default();
    assert!(message.contains(&format!("127.0.0.1:{port}")), "{message}");
    assert!(message.contains("attempts"), "{message}");
}

/// A `worker` child process for `queue` and `connectors`, configured by `MQTT_CONNECTOR_*`.
fn start_worker(queue: &str, connectors: &Path) -> ChildWorker {
    ChildWorker::command(&amqp_url(), queue, connectors).spawn()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_process_health_submit_and_sigterm() {
    let dir = local_connectors();
    let queue = unique_name("cli-jobs");
    let topic = unique_name("cli");
    let mut sub = Subscriber::start(1883, &topic, QoS::ExactlyOnce).await;
    let mut worker = start_worker(&queue, dir.path());
    common::http::wait_for_status(worker.metrics_addr, "/healthz", 200, T).await;
    common::http::wait_for_status(worker.metrics_addr, "/readyz", 200, T).await;
    let (status, metrics) = common::http::get(worker.metrics_addr, "/metrics")
        .await
        .expect("GET /metrics");
    assert_eq!(status, 200);
    assert!(metrics.contains("mqtt_connector_"), "{metrics}");

    let amqp_url = amqp_url();
    let env = [("MQTT_CONNECTOR_AMQP_URL", amqp_url.as_str())];
    let topic_set = format!("topic={topic}");

    // submit --wait: prints the reply and exits with its exit-code.
    let out = run(
        &[
            "submit",
            "--connector",
            "local",
            "--set",
            &topic_set,
            "--set",
            "content=waited",
            "--wait",
            "--queue",
            &queue,
        ],
        &env,
    )
    .await;
    let result = printed_json(&out);
    assert_eq!(
        result["exit-code"],
        0,
        "{result}; worker log:\n{}",
        worker.output()
    );
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(sub.expect(T).await.payload_str(), "waited");

    let out = run(
        &[
            "submit",
            "--connector",
            "local",
            "--set",
            &topic_set,
            "--set",
            "content=x",
            "--set",
            "qos=3",
            "--wait",
            "--queue",
            &queue,
        ],
        &env,
    )
    .await;
    assert_eq!(printed_json(&out)["exit-code"], 1, "{}", stdout(&out));
    assert_eq!(out.status.code(), Some(1));

    // submit without --wait: prints the correlation id; the worker still publishes it.
    let out = run(
        &[
            "submit",
            "--connector",
            "local",
            "--set",
            &topic_set,
            "--set",
            "content=async",
            "--queue",
            &queue,
        ],
        &env,
    )
    .await;
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let id = stdout(&out).trim().to_string();
    assert!(
        uuid::Uuid::parse_str(&id).is_ok(),
        "a correlation id: {:?}",
        stdout(&out)
    );
    assert_eq!(sub.expect(T).await.payload_str(), "async");

    // SIGTERM: stops and exits 0.
    worker.signal("TERM");
    let code = worker.wait_exit(T).await.code();
    assert_eq!(code, Some(0), "log:\n{}", worker.output());
    assert!(
        common::http::get(worker.metrics_addr, "/healthz")
            .await
            .is_err()
    );

    let amqp = Amqp::connect().await;
    assert_eq!(amqp.queue_message_count(&queue).await, Some(0));
    amqp.delete_queue(&queue).await;
}

/// `--set` arguments for a `request` to the device listening on `commands` at `broker`, which
/// is asked to answer `say` on a fresh response topic (named in the command for 3.1.1).
fn request_sets(broker: &Mosquitto, commands: &str, version: &str, say: &str) -> Vec<String> {
    let response = unique_name("answers");
    let keys = [
        format!("broker={}", broker.url()),
        format!("client-id={}", unique_name("cli")),
        format!("topic={commands}"),
        format!("content={}", json!({"say": say, "reply": response})),
        "action=request".to_owned(),
        format!("response-topic={response}"),
        format!("mqtt-version={version}"),
    ];
    keys.into_iter()
        .flat_map(|key| ["--set".to_owned(), key])
        .collect()
}

/// The reply printed for an answered request says what the device said, as the SPEC's reply
/// shows it.
fn assert_answered(output: &Output, version: &str, say: &str) {
    let result = printed_json(output);
    assert_eq!(
        result["exit-code"],
        0,
        "{result}; stderr: {}",
        stderr(output)
    );
    assert_eq!(output.status.code(), Some(0), "{result}");
    let response = &result["response"];
    assert_eq!(response["content"], say, "{result}");
    assert_eq!(response["content-encoding"], "utf-8", "{result}");
    assert!(
        response["topic"]
            .as_str()
            .is_some_and(|t| t.starts_with("answers-")),
        "{result}"
    );
    if version == "5" {
        assert_eq!(response["content-type"], "text/plain", "{result}");
        assert_eq!(
            response["user-properties"],
            json!([["device", "d1"], ["k", "1"], ["k", "2"]]),
            "{result}"
        );
    } else {
        assert!(response.get("content-type").is_none(), "{result}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_and_submit_wait_print_the_devices_answer() {
    let broker = Mosquitto::plain();
    let commands = unique_name("cmd");
    let device = Device::start(broker.port(), &commands).await;
    for version in ["3.1.1", "5"] {
        let say = format!("unlocked over {version}");
        let mut args = vec!["send".to_owned()];
        args.extend(request_sets(&broker, &commands, version, &say));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_answered(&run(&args, &[]).await, version, &say);
    }

    let dir = connectors_dir();
    let queue = unique_name("cli-requests");
    let mut worker = start_worker(&queue, dir.path());
    common::http::wait_for_status(worker.metrics_addr, "/readyz", 200, T).await;
    let amqp_url = amqp_url();
    let env = [("MQTT_CONNECTOR_AMQP_URL", amqp_url.as_str())];
    for version in ["3.1.1", "5"] {
        let say = format!("metered over {version}");
        let mut args = vec!["submit".to_owned(), "--wait".into(), "--queue".into()];
        args.push(queue.clone());
        args.extend(request_sets(&broker, &commands, version, &say));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = run(&args, &env).await;
        assert_answered(&out, version, &say);
    }
    assert_eq!(device.received(), 4, "one command per request");
    worker.signal("TERM");
    assert_eq!(
        worker.wait_exit(T).await.code(),
        Some(0),
        "{}",
        worker.output()
    );
    Amqp::connect().await.delete_queue(&queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_refuses_a_connector_with_an_unknown_key() {
    let dir = good_and_bad_connectors(
        "typo",
        json!({"broker": "tcp://127.0.0.1:1883", "client_id": "c"}),
    );
    let queue = unique_name("cli-refused");
    let mut worker = start_worker(&queue, dir.path());
    let code = worker.wait_exit(T).await.code();
    let log = worker.output();
    assert!(
        matches!(code, Some(c) if c != 0),
        "exit {code:?}; log:\n{log}"
    );
    assert!(log.contains("typo.json"), "names the file: {log}");
    assert!(log.contains("client_id"), "names the key: {log}");
    // It never consumed: the queue was not even declared.
    let amqp = Amqp::connect().await;
    assert_eq!(amqp.queue_message_count(&queue).await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_the_bad_file_and_key() {
    let dir = good_and_bad_connectors(
        "bad",
        json!({"broker": "tcp://127.0.0.1:1883", "colour": "red"}),
    );
    let out = run(&["check", "--connectors", path(dir.path())], &[]).await;
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert_ne!(out.status.code(), Some(0), "{text}");
    assert!(text.contains("bad.json"), "names the file: {text}");
    assert!(text.contains("colour"), "names the key: {text}");

    // The two examples of the contract load as they stand.
    let dir = connectors_dir();
    std::fs::write(
        dir.path().join("flint.json"),
        r#"{ "broker": "tcp://localhost:1883", "username": "user", "password": "pwd",
  "client-id": "flint_mqtt", "qos": 2, "topic": "flint_topic" }"#,
    )
    .expect("write");
    let out = run(&["check", "--connectors", path(dir.path())], &[]).await;
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert!(stdout(&out).contains("flint"), "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_every_file_that_does_not_load_not_only_the_first() {
    let dir = good_and_bad_connectors(
        "b-unset",
        json!({"broker": "tcp://127.0.0.1:1883", "password": "${MQTT_CONNECTOR_TEST_UNSET_9F2}"}),
    );
    std::fs::write(dir.path().join("a-broken.json"), r#"{"qos": 1,"#).expect("write");
    let out = run(&["check", "--connectors", path(dir.path())], &[]).await;
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert_eq!(out.status.code(), Some(1), "{text}");
    let printed = stdout(&out);
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 4, "{text}");
    assert!(
        lines[0].starts_with("problem  a-broken: ") && lines[0].contains("not valid JSON"),
        "reports the broken JSON: {text}"
    );
    assert!(
        lines[1].starts_with("problem  b-unset: ")
            && lines[1].contains("MQTT_CONNECTOR_TEST_UNSET_9F2"),
        "reports the unset variable too: {text}"
    );
    assert_eq!(
        lines[2], "ok       good",
        "and checks the connector that loads: {text}"
    );
    assert!(lines[3].ends_with(", 2 with problems"), "{text}");
    assert!(lines[3].starts_with("3 connector(s) in "), "{text}");

    // The worker refuses to start on the same folder and lists both as well.
    let queue = unique_name("cli-refused-both");
    let mut worker = start_worker(&queue, dir.path());
    let code = worker.wait_exit(T).await.code();
    let log = worker.output();
    assert!(
        matches!(code, Some(c) if c != 0),
        "exit {code:?}; log:\n{log}"
    );
    assert!(
        log.contains("a-broken.json") && log.contains("b-unset.json"),
        "names both files: {log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_missing_certificate_files() {
    let dir = connectors_dir();
    // The contract's AWS example, as it stands: none of its /certs files exist here.
    std::fs::write(
        dir.path().join("aws.json"),
        r#"{ "broker": "ssl://Z2EBLEZ5JJFGKF.iot.us-east-1.amazonaws.com:8883",
  "client-id": "thing-name", "topic": "$aws/things/thing-name/shadow/update", "qos": 1,
  "root-ca-crt": "/certs/root-CA.crt", "certificate": "/certs/device.pem.crt",
  "private-key": "/certs/device.pem.key", "use-certificate": true }"#,
    )
    .expect("write");
    let out = run(&["check", "--connectors", path(dir.path())], &[]).await;
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert_ne!(out.status.code(), Some(0), "{text}");
    for file in [
        "/certs/root-CA.crt",
        "/certs/device.pem.crt",
        "/certs/device.pem.key",
    ] {
        assert!(text.contains(file), "reports {file}: {text}");
    }
    assert!(text.contains("aws"), "names the connector: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_without_rabbitmq_is_healthy_not_ready_and_keeps_trying() {
    let dir = local_connectors();
    let url = format!("amqp://guest:guest@127.0.0.1:{}/%2f", free_port());
    let mut worker = ChildWorker::command(&url, &unique_name("cli-nomq"), dir.path()).spawn();
    common::http::wait_for_status(worker.metrics_addr, "/healthz", 200, T).await;
    // Still running and still not ready a while later: it does not exit, it retries.
    for _ in 0..5 {
        let (status, _) = common::http::get(worker.metrics_addr, "/readyz")
            .await
            .expect("GET /readyz");
        assert_eq!(
            status,
            503,
            "not ready without RabbitMQ; log:\n{}",
            worker.output()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, metrics) = common::http::get(worker.metrics_addr, "/metrics")
        .await
        .expect("GET /metrics");
    assert!(
        metrics.contains("mqtt_connector_"),
        "metrics served without RabbitMQ: {metrics}"
    );
    worker.signal("TERM");
    assert_eq!(
        worker.wait_exit(T).await.code(),
        Some(0),
        "log:\n{}",
        worker.output()
    );
}

#[tokio::test]
async fn check_reports_connectors_outside_the_allowed_brokers() {
    let dir = connectors_dir();
    write_connector(
        dir.path(),
        "inside",
        json!({"broker": "ssl://abc-ats.iot.eu-west-1.amazonaws.com:8883", "qos": 1}),
    );
    write_connector(
        dir.path(),
        "outside",
        json!({"broker": "tcp://mqtt.example.com:1883"}),
    );
    let folder = dir.path().to_str().expect("utf-8");
    let args = [
        "check",
        "--connectors",
        folder,
        "--allow-broker",
        "*.iot.eu-west-1.amazonaws.com:8883",
    ];
    let output = run(&args, &[]).await;
    let out = stdout(&output);
    assert_eq!(output.status.code(), Some(1), "{out}");
    assert!(out.contains("ok       inside"), "{out}");
    assert!(
        out.contains("problem  outside") && out.contains("--allow-broker"),
        "{out}"
    );
    // The environment form, comma-separated, allows both.
    let env = [(
        "MQTT_CONNECTOR_ALLOW_BROKER",
        "*.iot.eu-west-1.amazonaws.com:8883,mqtt.example.com",
    )];
    let output = run(&["check", "--connectors", folder], &env).await;
    assert_eq!(output.status.code(), Some(0), "{}", stdout(&output));
    // A bad pattern stops it with a message naming the pattern.
    let output = run(
        &["check", "--connectors", folder, "--allow-broker", "tcp://h"],
        &[],
    )
    .await;
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("tcp://h"), "{}", stderr(&output));
}
