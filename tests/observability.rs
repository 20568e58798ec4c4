//! Observability, end to end with real processes: a real Prometheus scraping a worker answers
//! every PromQL query of the Grafana dashboard and of the alert rules; `promtool check metrics`
//! accepts a real scrape; the worker binary logs one JSON line per job with its correlation id,
//! connector, exit-code and duration, respects `RUST_LOG` and never logs a password; `/healthz`
//! and `/readyz` follow RabbitMQ's reachability; the request and expiry metrics count real jobs
//! (answered, no answer, too large, never published; answer latency; expired when taken or
//! while retrying).
//!
//! Alert rules: an alert's expression returns nothing unless it fires, so on a healthy system
//! each rule is checked through [`alert_probes`]: every top-level operand of `and`/`or`/`unless`
//! on its own, its final threshold comparison dropped (`X > 0.05` → `X`) and `absent(X)`
//! replaced by `X`; each probe must return data. The full expression must also be valid PromQL
//! (the query succeeds, empty or not).

mod common;

use common::dashboard::{alert_probes, alert_rules, dashboard_exprs};
use common::prometheus::{Prometheus, prometheus_binary, sample_values};
use common::worker::{RunningWorker, TestBed, connectors_dir, job, metric_sum, with};
use common::*;
use serde_json::{Value as Json, json};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

const T: Duration = Duration::from_secs(20);

// ------------------------------------------------------------------------------------------------
// Prometheus and the dashboard

/// Connectors for the jobs of [`run_job_mix`]: `local` (the machine's Mosquitto), `flaky` (the
/// same broker through `proxy`), `closed` (a port nobody listens on, short timeout).
fn write_mix_connectors(dir: &Path, proxy: &TcpProxy) {
    write_connector(
        dir,
        "local",
        json!({"broker": "tcp://127.0.0.1:1883", "client-id": unique_name("obs-local"),
               "topic": unique_name("obs/local"), "qos": 1}),
    );
    write_connector(
        dir,
        "flaky",
        json!({"broker": format!("tcp://127.0.0.1:{}", proxy.port()),
               "client-id": unique_name("obs-flaky"), "topic": unique_name("obs/flaky"), "qos": 1}),
    );
    write_connector(
        dir,
        "closed",
        json!({"broker": format!("tcp://127.0.0.1:{}", free_port()),
               "client-id": unique_name("obs-closed"), "topic": "obs/closed", "timeout": 700}),
    );
}

/// Successes at QoS 0, 1 and 2 (local and through the proxy), and failures: unknown connector
/// (2), closed port (3, retried), invalid job (1); requests to the device listening on
/// `commands` (answered 0 over MQTT 5, silent 10) and a stale command (9). Asserts every reply's
/// exit-code.
async fn run_job_mix(bed: &mut TestBed, commands: &str) {
    let request = |command: Json, timeout: u64| {
        json!({"connector": "local", "action": "request", "mqtt-version": "5",
               "topic": commands, "content": command.to_string(), "timeout": timeout,
               "response-topic": format!("{}/{{correlation-id}}", unique_name("obs/answers"))})
    };
    let past = mqtt_connector::expiry::rfc3339(std::time::SystemTime::now() - T);
    let jobs = [
        (request(json!({"say": "on"}), 5000), 0),
        (request(json!({"say": "later", "delay-ms": 20}), 5000), 0),
        (request(json!({"silent": true}), 300), 10),
        (
            json!({"connector": "local", "content": "stale", "not-after": past}),
            9,
        ),
        (json!({"connector": "local", "content": "q0", "qos": 0}), 0),
        (json!({"connector": "local", "content": "q1", "qos": 1}), 0),
        (json!({"connector": "local", "content": "q2", "qos": 2}), 0),
        (json!({"connector": "flaky", "content": "via proxy"}), 0),
        (json!({"connector": "no-such-connector", "content": "x"}), 2),
        (json!({"connector": "closed", "content": "x"}), 3),
        (
            json!({"connector": "local", "content": "x", "bogus": true}),
            1,
        ),
    ];
    for (body, code) in jobs {
        let reply = bed.run(body.clone(), T).await;
        assert_eq!(reply.exit_code(), i64::from(code), "{body}: {}", reply.body);
    }
}

/// Why a query result does not count as data: empty, or only NaN samples (`rate` of a counter
/// that did not move, a quantile of empty buckets).
fn no_data(result: &Result<Vec<Json>, String>) -> Option<String> {
    match result {
        Err(e) => Some(e.clone()),
        Ok(r) if r.is_empty() => Some("empty result".into()),
        Ok(r) if !sample_values(r).iter().any(|v| v.is_finite()) => {
            Some(format!("no finite sample: {}", Json::Array(r.clone())))
        }
        Ok(_) => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_answers_every_dashboard_and_alert_query() {
    let proxy = TcpProxy::start(1883).await;
    let dir = connectors_dir();
    write_mix_connectors(dir.path(), &proxy);
    let mut bed = TestBed::start(dir).await;
    let worker_addr = bed.worker.metrics_addr();
    let prometheus = Prometheus::start(&[worker_addr]).await;
    let commands = unique_name("obs/commands");
    let _device = Device::start(1883, &commands).await;

    // First batch: creates every series. Prometheus takes a series' first sample as its
    // start, so wait until it has scraped them before the second batch makes them move.
    run_job_mix(&mut bed, &commands).await;
    let finished = metric_sum(&bed.worker.metrics().await, "mqtt_connector_jobs_total");
    wait_query(
        &prometheus,
        "sum(mqtt_connector_jobs_total)",
        |v| v >= finished,
        T,
    )
    .await;

    // A lost MQTT connection, reopened by the next job: mqtt_reconnects_total.
    let open = metric_sum(
        &bed.worker.metrics().await,
        "mqtt_connector_mqtt_connections",
    );
    proxy.cut();
    wait_worker_metric(&bed.worker, "mqtt_connector_mqtt_connections", |v| v < open).await;
    run_job_mix(&mut bed, &commands).await;
    let text = bed.worker.metrics().await;
    assert!(
        metric_sum(&text, "mqtt_connector_mqtt_reconnects_total") >= 1.0,
        "no reconnect counted after the proxy cut:\n{text}"
    );
    assert!(
        metric_sum(&text, "mqtt_connector_retries_total") >= 1.0,
        "no retry counted for the closed port:\n{text}"
    );

    // Every dashboard expression and every alert probe returns data (polled: rate() needs the
    // scrapes after the second batch).
    let mut queries: Vec<(String, String)> = dashboard_exprs()
        .into_iter()
        .map(|(title, expr)| (format!("panel {title:?}"), expr))
        .collect();
    assert!(
        queries.len() >= 10,
        "too few dashboard queries: {queries:?}"
    );
    let rules = alert_rules();
    assert!(!rules.is_empty(), "no alert rules");
    for (name, expr) in &rules {
        let probes = alert_probes(expr);
        assert!(!probes.is_empty(), "alert {name}: no probe for {expr}");
        for probe in probes {
            assert!(
                !probe.is_empty() && probe != *expr,
                "alert {name}: probe {probe:?} of {expr:?}"
            );
            queries.push((format!("alert {name} (probe of `{expr}`)"), probe));
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let mut failing = Vec::new();
        for (origin, expr) in &queries {
            if let Some(why) = no_data(&prometheus.query(expr).await) {
                failing.push(format!("{origin}: {expr}\n    -> {why}"));
            }
        }
        if failing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} queries return no data from Prometheus:\n{}\nworker /metrics:\n{}",
            failing.len(),
            queries.len(),
            failing.join("\n"),
            bed.worker.metrics().await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // The check can fail: a metric the worker does not expose has no data.
    assert!(
        no_data(
            &prometheus
                .query("sum(rate(mqtt_connector_no_such_metric_total[1m]))")
                .await
        )
        .is_some()
    );

    // The alert expressions as written are valid PromQL.
    for (name, expr) in &rules {
        if let Err(e) = prometheus.query(expr).await {
            panic!("alert {name}: Prometheus rejects {expr:?}: {e}");
        }
    }
    // Prometheus scraped OpenMetrics: the counter is known by its sample name.
    let by_code = prometheus
        .query("sum by (exit_code) (mqtt_connector_jobs_total)")
        .await
        .expect("jobs by exit code");
    // Every series exists from the start at 0: the codes the jobs produced are those above 0.
    let codes: std::collections::BTreeSet<&str> = by_code
        .iter()
        .filter(|s| s["value"][1].as_str().is_some_and(|v| v != "0"))
        .filter_map(|s| s["metric"]["exit_code"].as_str())
        .collect();
    assert_eq!(
        codes,
        ["0", "1", "2", "3", "9", "10"].into_iter().collect(),
        "{by_code:?}"
    );
    drop(prometheus);
    bed.finish().await;
}

/// The value of the one sample of `series` (name and labels exactly as exposed), or `None`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// A request job to the device on `commands` at `broker` (MQTT 5), with `command`'s keys in
/// its content.
fn request_job(broker: &Mosquitto, commands: &str, command: Json) -> Json {
    with(
        job(&broker.url(), commands, &command.to_string()),
        json!({"action": "request", "mqtt-version": "5",
               "response-topic": format!("{}/{{correlation-id}}", unique_name("answers"))}),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_expiry_metrics_count_real_jobs() {
    let broker = Mosquitto::plain();
    let commands = unique_name("cmd");
    let device = Device::start(broker.port(), &commands).await;
    let mut bed = TestBed::new().await;
    let closed = format!("tcp://127.0.0.1:{}", free_port());
    let past = mqtt_connector::expiry::rfc3339(std::time::SystemTime::now() - T);
    let soon =
        mqtt_connector::expiry::rfc3339(std::time::SystemTime::now() + Duration::from_millis(1500));
    let jobs = [
        (
            request_job(&broker, &commands, json!({"say": "a", "delay-ms": 50})),
            0,
        ),
        (
            request_job(&broker, &commands, json!({"say": "b", "delay-ms": 50})),
            0,
        ),
        (request_job(&broker, &commands, json!({"say": "c"})), 0),
        (
            with(
                request_job(&broker, &commands, json!({"silent": true})),
                json!({"timeout": 400}),
            ),
            10,
        ),
        (
            request_job(&broker, &commands, json!({"size": 300_000})),
            10,
        ),
        // Never published: a broker that is not there.
        (
            with(
                request_job(&broker, &commands, json!({})),
                json!({"broker": closed, "timeout": 500}),
            ),
            3,
        ),
        // Not a valid request (no response topic): not counted as a request.
        (
            with(
                request_job(&broker, &commands, json!({})),
                json!({"response-topic": null}),
            ),
            1,
        ),
        // Expired: when taken, and while retrying against a broker that is not there.
        (
            with(
                job(&broker.url(), &commands, "stale"),
                json!({"not-after": past}),
            ),
            9,
        ),
        (
            with(
                job(&closed, &commands, "late"),
                json!({"not-after": soon, "timeout": 10000}),
            ),
            9,
        ),
    ];
    for (body, code) in jobs {
        let reply = bed.run(body.clone(), T).await;
        assert_eq!(reply.exit_code(), code, "{body}: {}", reply.body);
    }
    let text = bed.worker.metrics().await;
    let value = |series: &str| {
        sample(&text, series).unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
    };
    let requests = |outcome: &str| {
        value(&format!(
            "mqtt_connector_requests_total{{outcome=\"{outcome}\"}}"
        ))
    };
    assert_eq!(requests("answered"), 3.0, "{text}");
    assert_eq!(requests("no_answer"), 1.0, "{text}");
    assert_eq!(requests("too_large"), 1.0, "{text}");
    assert_eq!(requests("not_published"), 1.0, "{text}");
    assert_eq!(requests("subscription_refused"), 0.0, "{text}");
    // Every answer that came is timed, the one too large too; the two delayed ones took 50 ms.
    assert_eq!(
        value("mqtt_connector_request_answer_seconds_count"),
        4.0,
        "{text}"
    );
    let latency = value("mqtt_connector_request_answer_seconds_sum");
    assert!(
        (0.05..20.0).contains(&latency),
        "answer latency sum {latency}:\n{text}"
    );
    assert_eq!(
        value(r#"mqtt_connector_jobs_expired_total{when="taken"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(
        value(r#"mqtt_connector_jobs_expired_total{when="retrying"}"#),
        1.0,
        "{text}"
    );
    assert_eq!(device.received(), 5, "one command per published request");
    bed.finish().await;
}

/// Polls Prometheus until `expr`'s first sample satisfies `pred`.
async fn wait_query(
    prometheus: &Prometheus,
    expr: &str,
    pred: impl Fn(f64) -> bool,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    loop {
        let last = prometheus.query(expr).await;
        if let Ok(result) = &last
            && sample_values(result).first().is_some_and(|v| pred(*v))
        {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus: {expr} not as expected within {within:?}; last: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Polls the worker's `/metrics` until the sum of `name` satisfies `pred`.
async fn wait_worker_metric(worker: &RunningWorker, name: &str, pred: impl Fn(f64) -> bool) {
    let deadline = Instant::now() + T;
    loop {
        let text = worker.metrics().await;
        if pred(metric_sum(&text, name)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} not as expected within {T:?}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[test]
fn alert_probes_drop_thresholds_and_split_set_operators() {
    assert_eq!(
        alert_probes("sum(up) == 0\n  or absent(up)"),
        ["sum(up)", "up"]
    );
    assert_eq!(
        alert_probes(r#"(sum(rate(j{c!="0"}[5m])) or vector(0)) / sum(rate(j[5m])) > 0.05"#),
        [r#"(sum(rate(j{c!="0"}[5m])) or vector(0)) / sum(rate(j[5m]))"#]
    );
    assert_eq!(
        alert_probes(
            "sum by (instance) (f) > 0\n  unless on (instance)\nsum by (instance) (rate(j[10m])) > 0"
        ),
        ["sum by (instance) (f)", "sum by (instance) (rate(j[10m]))"]
    );
    assert_eq!(alert_probes("x == bool 1"), ["x"]);
    assert_eq!(alert_probes("x > y"), ["x > y"]);
    assert_eq!(alert_probes(r#"a{l="or"} and b"#), [r#"a{l="or"}"#, "b"]);
    assert_eq!(alert_probes("order_total"), ["order_total"]);
}

// ------------------------------------------------------------------------------------------------
// promtool

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promtool_accepts_a_real_scrape() {
    let proxy = TcpProxy::start(1883).await;
    let dir = connectors_dir();
    write_mix_connectors(dir.path(), &proxy);
    let mut bed = TestBed::start(dir).await;
    let commands = unique_name("obs/commands");
    let _device = Device::start(1883, &commands).await;
    run_job_mix(&mut bed, &commands).await;
    let text = bed.worker.metrics().await;
    for name in [
        "mqtt_connector_jobs_total",
        "mqtt_connector_retries_total",
        "mqtt_connector_job_duration_seconds_bucket",
        "mqtt_connector_publish_duration_seconds_bucket",
        "mqtt_connector_mqtt_connections",
        "mqtt_connector_build_info",
        "mqtt_connector_requests_total",
        "mqtt_connector_request_answer_seconds_bucket",
        "mqtt_connector_jobs_expired_total",
    ] {
        assert!(text.contains(name), "scrape without {name}:\n{text}");
    }

    let promtool = prometheus_binary("promtool");
    let mut child = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("start {}: {e}", promtool.display()));
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write to promtool");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}\nstdout: {}\nstderr: {}\nscrape:\n{text}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    bed.finish().await;
}

// ------------------------------------------------------------------------------------------------
// logs, through the binary

const SECRET: &str = "pw-91c2-SECRET";
const ENV_SECRET: &str = "env-pw-77aa-SECRET";

/// Every non-empty line of `text` parsed as JSON; panics on a line that is not.
fn json_lines(text: &str) -> Vec<Json> {
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}\nall:\n{text}"))
        })
        .collect()
}

/// Connectors for the log tests: `local` (Mosquitto) and `secretive` (a password from the
/// environment, a closed port).
fn log_connectors(closed_port: u16) -> tempfile::TempDir {
    let dir = connectors_dir();
    write_connector(
        dir.path(),
        "local",
        json!({"broker": "tcp://127.0.0.1:1883", "client-id": unique_name("logs"),
               "topic": unique_name("logs/t"), "qos": 1}),
    );
    write_connector(
        dir.path(),
        "secretive",
        json!({"broker": format!("tcp://127.0.0.1:{closed_port}"), "client-id": "secretive",
               "topic": "logs/secret", "username": "user", "password": "${OBS_TEST_MQTT_PASSWORD}",
               "timeout": 600}),
    );
    dir
}

/// Sends each job with its own correlation id and returns (correlation id, exit-code) per job.
async fn send_jobs(queue: &str, jobs: &[(Json, i64)]) -> Vec<(String, i64)> {
    let amqp = Amqp::connect().await;
    let (reply_queue, mut replies) = amqp.reply_queue().await;
    let mut sent = Vec::new();
    for (body, code) in jobs {
        let id = unique_name("corr");
        amqp.send_job(
            queue,
            body.to_string().as_bytes(),
            Some(&reply_queue),
            Some(&id),
        )
        .await;
        let reply = replies.expect_reply(T).await;
        assert_eq!(reply.correlation_id.as_deref(), Some(id.as_str()));
        assert_eq!(reply.exit_code(), *code, "{body}: {}", reply.body);
        assert!(!reply.message().contains("SECRET"), "{}", reply.body);
        sent.push((id, *code));
    }
    sent
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_logs_one_json_line_per_job_without_secrets() {
    let closed = free_port();
    let connectors = log_connectors(closed);
    let queue = unique_name("logs");
    let mut worker = ChildWorker::command(&amqp_url(), &queue, connectors.path())
        .envs(&[
            ("MQTT_CONNECTOR_LOG_FORMAT", "json"),
            ("OBS_TEST_MQTT_PASSWORD", ENV_SECRET),
        ])
        .start()
        .await;
    let jobs = [
        (json!({"connector": "local", "content": "hello"}), 0),
        (json!({"connector": "no-such-connector", "content": "x"}), 2),
        (json!({"connector": "local", "content": "x", "bogus": 1}), 1),
        (
            with(
                job(&format!("tcp://127.0.0.1:{closed}"), "logs/secret", "x"),
                json!({"username": "someone", "password": SECRET, "timeout": 600}),
            ),
            3,
        ),
        (json!({"connector": "secretive", "content": "x"}), 3),
    ];
    let sent = send_jobs(&queue, &jobs).await;
    let exit = worker.terminate().await;
    assert!(
        exit.success(),
        "worker exit after SIGTERM: {exit}; stderr:\n{}",
        worker.stderr()
    );
    Amqp::connect().await.delete_queue(&queue).await;

    let stderr = worker.stderr();
    let stdout = worker.stdout();
    for secret in [SECRET, ENV_SECRET, "guest:guest@"] {
        assert!(
            !stderr.contains(secret) && !stdout.contains(secret),
            "{secret:?} appears in the worker's output:\nstdout:\n{stdout}\nstderr:\n{stderr}"
        );
    }
    let lines = json_lines(&stderr);
    for (id, code) in &sent {
        let mine: Vec<&Json> = lines
            .iter()
            .filter(|l| l["fields"]["correlation_id"] == id.as_str())
            .collect();
        assert_eq!(
            mine.len(),
            1,
            "job {id}: want one line, got {mine:?}\n{stderr}"
        );
        let line = mine[0];
        assert_eq!(line["level"], "INFO", "{line}");
        let fields = &line["fields"];
        assert_eq!(fields["exit_code"].as_i64(), Some(*code), "{line}");
        assert!(
            fields["connector"].as_str().is_some_and(|c| !c.is_empty()),
            "{line}"
        );
        assert!(fields["duration_ms"].as_u64().is_some(), "{line}");
        assert!(
            fields["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{line}"
        );
        assert!(line["timestamp"].is_string(), "{line}");
    }
    let connector_of = |i: usize| {
        lines
            .iter()
            .find(|l| l["fields"]["correlation_id"] == sent[i].0.as_str())
            .map(|l| l["fields"]["connector"].clone())
    };
    assert_eq!(connector_of(0), Some(json!("local")));
    assert_eq!(connector_of(4), Some(json!("secretive")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_format_flag_and_rust_log_are_respected() {
    let closed = free_port();
    let connectors = log_connectors(closed);
    let queue = unique_name("logs");
    // The flag, not the environment, asks for JSON; RUST_LOG keeps `mqtt_connector`'s own info
    // lines (the shutdown line) but silences the worker module (the per-job lines).
    let mut worker = ChildWorker::command(&amqp_url(), &queue, connectors.path())
        .global_args(&["--log-format", "json"])
        .envs(&[
            (
                "RUST_LOG",
                "warn,mqtt_connector=info,mqtt_connector::worker=warn",
            ),
            ("OBS_TEST_MQTT_PASSWORD", ENV_SECRET),
        ])
        .start()
        .await;
    let sent = send_jobs(
        &queue,
        &[
            (json!({"connector": "local", "content": "hello"}), 0),
            (json!({"connector": "secretive", "content": "x"}), 3),
        ],
    )
    .await;
    let exit = worker.terminate().await;
    assert!(
        exit.success(),
        "worker exit after SIGTERM: {exit}; stderr:\n{}",
        worker.stderr()
    );
    Amqp::connect().await.delete_queue(&queue).await;

    let stderr = worker.stderr();
    assert!(!stderr.contains(ENV_SECRET), "{stderr}");
    let lines = json_lines(&stderr);
    assert!(
        lines.iter().any(|l| l["target"] == "mqtt_connector"
            && l["level"] == "INFO"
            && l["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("shutdown requested"))),
        "no JSON shutdown line at info:\n{stderr}"
    );
    for line in &lines {
        assert_ne!(
            line["target"], "mqtt_connector::worker",
            "filtered out: {line}"
        );
        assert!(
            line["fields"]["correlation_id"].is_null(),
            "job line despite RUST_LOG: {line}"
        );
    }
    assert_eq!(sent.len(), 2);
}

// ------------------------------------------------------------------------------------------------
// health and readiness

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_follows_rabbitmq_and_healthz_stays_up() {
    let rabbit = TcpProxy::start(5672).await;
    rabbit.refuse();
    let queue = unique_name("ready");
    let connectors = connectors_dir();
    let amqp = amqp_url();
    let through_proxy = amqp.replacen(":5672", &format!(":{}", rabbit.port()), 1);
    assert_ne!(through_proxy, amqp, "cannot point {amqp} at the proxy");
    let mut options =
        mqtt_connector::worker::WorkerOptions::new(through_proxy, &queue, connectors.path());
    options.metrics_addr = Some("127.0.0.1:0".parse().unwrap());
    mqtt_connector::install_crypto_provider();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let worker = mqtt_connector::worker::Worker::start(options, shutdown.clone())
        .await
        .expect("worker start");
    let addr = worker.metrics_addr().expect("metrics bound");
    let run = tokio::spawn(worker.run());

    // RabbitMQ unreachable: it keeps trying; alive, not ready, consumer down.
    rabbit.wait_for(|s| s.refused >= 2, T).await;
    assert_eq!(http::get(addr, "/healthz").await.map(|r| r.0), Ok(200));
    let (status, body) = http::get(addr, "/readyz").await.expect("GET /readyz");
    assert_eq!(status, 503, "{body}");
    let (_, text) = http::get(addr, "/metrics").await.expect("GET /metrics");
    assert_eq!(
        metric_sum(&text, "mqtt_connector_amqp_consumer_up"),
        0.0,
        "{text}"
    );

    // Reachable again: ready, and it really consumes.
    rabbit.accept();
    http::wait_for_status(addr, "/readyz", 200, T).await;
    assert_eq!(http::get(addr, "/healthz").await.map(|r| r.0), Ok(200));
    let (_, text) = http::get(addr, "/metrics").await.expect("GET /metrics");
    assert_eq!(
        metric_sum(&text, "mqtt_connector_amqp_consumer_up"),
        1.0,
        "{text}"
    );
    let client = Amqp::connect().await;
    let (reply_queue, mut replies) = client.reply_queue().await;
    client
        .send_job(&queue, b"not json", Some(&reply_queue), Some("ready-1"))
        .await;
    let reply = replies.expect_reply(T).await;
    assert_eq!(reply.exit_code(), 1, "{}", reply.body);

    // Lost while consuming: not ready again, still alive.
    rabbit.refuse();
    rabbit.cut();
    http::wait_for_status(addr, "/readyz", 503, T).await;
    assert_eq!(http::get(addr, "/healthz").await.map(|r| r.0), Ok(200));

    shutdown.cancel();
    tokio::time::timeout(T, run)
        .await
        .expect("worker stops")
        .expect("worker task");
    client.delete_queue(&queue).await;
}
