//! Deployment and observability assets: `docker-compose.yml`, the `Dockerfile`, the Prometheus
//! configuration and alert rules, the Grafana provisioning and the fleet dashboard.
//!
//! These tests only read files: no Docker engine, Prometheus or Grafana is needed.
//!
//! PromQL in the dashboard may use Grafana's `$__rate_interval` (and `$__interval`, `$__range`);
//! `common::dashboard::substitute_grafana_variables` replaces them with `1m`, which is what a test that sends the
//! expressions to a real Prometheus should do too. No other `$` may remain.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde_json::Value as Json;
use serde_yaml_ng::Value as Yaml;

mod common;

use common::dashboard::{
    ALERTS, DASHBOARD, alert_rules, dashboard_exprs, dashboard_panels, substitute_grafana_variables,
};

/// Plain metrics the worker exposes.
const METRICS: &[&str] = &[
    "mqtt_connector_jobs_total",
    "mqtt_connector_retries_total",
    "mqtt_connector_jobs_in_flight",
    "mqtt_connector_mqtt_connections",
    "mqtt_connector_mqtt_reconnects_total",
    "mqtt_connector_amqp_consumer_up",
    "mqtt_connector_build_info",
    "mqtt_connector_requests_total",
    "mqtt_connector_jobs_expired_total",
    "mqtt_connector_replies_lost_total",
];

/// Histograms the worker exposes (as `_bucket`, `_sum` and `_count`).
const HISTOGRAMS: &[&str] = &[
    "mqtt_connector_job_duration_seconds",
    "mqtt_connector_publish_duration_seconds",
    "mqtt_connector_request_answer_seconds",
];

const COMPOSE: &str = "docker-compose.yml";
const PROMETHEUS: &str = "config/prometheus.yml";

// ------------------------------------------------------------------------------------------------
// helpers

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

fn yaml(rel: &str) -> Yaml {
    serde_yaml_ng::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid YAML: {e}"))
}

fn json(rel: &str) -> Json {
    serde_json::from_str(&read(rel)).unwrap_or_else(|e| panic!("{rel} is not valid JSON: {e}"))
}

fn ystr<'a>(v: &'a Yaml, what: &str) -> &'a str {
    v.as_str()
        .unwrap_or_else(|| panic!("{what}: expected a string, found {v:?}"))
}

/// A YAML scalar as text (compose allows numbers and booleans where strings are meant).
fn scalar(v: &Yaml) -> Option<String> {
    match v {
        Yaml::String(s) => Some(s.clone()),
        Yaml::Number(n) => Some(n.to_string()),
        Yaml::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

fn all_metric_names() -> BTreeSet<String> {
    let mut names: BTreeSet<String> = METRICS.iter().map(|s| s.to_string()).collect();
    for h in HISTOGRAMS {
        for suffix in ["_bucket", "_sum", "_count"] {
            names.insert(format!("{h}{suffix}"));
        }
    }
    names
}

const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
const KEYWORDS: &[&str] = &[
    "and",
    "or",
    "unless",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "atan2",
    "inf",
    "nan",
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];

/// The metric names a PromQL expression selects: identifiers that are neither functions,
/// aggregations, keywords, label names (in `{...}`, `by (...)`, `on (...)`...), strings nor
/// numbers/durations.
pub fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    if expr.contains("__name__") {
        return Err(format!(
            "selects by __name__, which this check cannot follow: {expr}"
        ));
    }
    let c: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;

    // Index just past the string literal that starts at `start`.
    let skip_string = |start: usize| -> Result<usize, String> {
        let quote = c[start];
        let mut j = start + 1;
        while j < c.len() {
            if c[j] == '\\' && quote != '`' {
                j += 2;
                continue;
            }
            if c[j] == quote {
                return Ok(j + 1);
            }
            j += 1;
        }
        Err(format!("unterminated string in {expr}"))
    };
    // Index just past the `close` that matches the `open` at `start`, strings skipped.
    let skip_group = |start: usize, open: char, close: char| -> Result<usize, String> {
        let mut depth = 0;
        let mut j = start;
        while j < c.len() {
            match c[j] {
                '"' | '\'' | '`' => {
                    j = skip_string(j)?;
                    continue;
                }
                ch if ch == open => depth += 1,
                ch if ch == close => {
                    depth -= 1;
                    if depth == 0 {
                        return Ok(j + 1);
                    }
                }
                _ => {}
            }
            j += 1;
        }
        Err(format!("unbalanced {open}{close} in {expr}"))
    };
    let is_ident_start = |ch: char| ch.is_ascii_alphabetic() || ch == '_' || ch == ':';
    let is_ident = |ch: char| ch.is_ascii_alphanumeric() || ch == '_' || ch == ':';

    while i < c.len() {
        let ch = c[i];
        if ch == '"' || ch == '\'' || ch == '`' {
            i = skip_string(i)?;
        } else if ch == '{' {
            i = skip_group(i, '{', '}')?;
        } else if ch == '[' {
            i = skip_group(i, '[', ']')?;
        } else if ch == '#' {
            while i < c.len() && c[i] != '\n' {
                i += 1;
            }
        } else if ch.is_ascii_digit()
            || (ch == '.' && c.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            // numbers, durations (5m), hex, exponents
            while i < c.len() && (c[i].is_ascii_alphanumeric() || c[i] == '.') {
                i += 1;
            }
        } else if is_ident_start(ch) {
            let start = i;
            while i < c.len() && is_ident(c[i]) {
                i += 1;
            }
            let ident: String = c[start..i].iter().collect();
            let mut k = i;
            while k < c.len() && c[k].is_whitespace() {
                k += 1;
            }
            let before_paren = c.get(k) == Some(&'(');
            let lower = ident.to_ascii_lowercase();
            if GROUPING.contains(&lower.as_str()) && before_paren {
                i = skip_group(k, '(', ')')?; // label list
            } else if before_paren || KEYWORDS.contains(&lower.as_str()) {
                // function call, aggregation or keyword
            } else {
                names.insert(ident);
            }
        } else {
            i += 1;
        }
    }
    Ok(names)
}

/// Checks one PromQL expression: no unsubstituted variable, at least one metric, and only
/// metrics the worker exposes. Returns the metrics it uses.
fn check_expr(origin: &str, expr: &str) -> BTreeSet<String> {
    assert!(!expr.trim().is_empty(), "{origin}: empty expression");
    assert!(
        !expr.contains('$'),
        "{origin}: unsubstituted variable in {expr:?}"
    );
    let names = metric_names(expr).unwrap_or_else(|e| panic!("{origin}: {e}"));
    assert!(!names.is_empty(), "{origin}: {expr:?} selects no metric");
    let known = all_metric_names();
    let unknown: Vec<_> = names.iter().filter(|n| !known.contains(*n)).collect();
    assert!(
        unknown.is_empty(),
        "{origin}: {expr:?} uses metrics the worker does not expose: {unknown:?}"
    );
    names
}

fn services(compose: &Yaml) -> &serde_yaml_ng::Mapping {
    compose["services"]
        .as_mapping()
        .expect("docker-compose.yml: `services` is not a mapping")
}

fn service<'a>(compose: &'a Yaml, name: &str) -> &'a Yaml {
    compose["services"]
        .get(name)
        .unwrap_or_else(|| panic!("docker-compose.yml: no service {name}"))
}

/// `environment` as a map, from either the mapping or the `KEY=VALUE` list form.
fn environment(svc: &Yaml) -> BTreeMap<String, String> {
    let mut env = BTreeMap::new();
    match &svc["environment"] {
        Yaml::Mapping(m) => {
            for (k, v) in m {
                env.insert(
                    ystr(k, "environment key").to_string(),
                    scalar(v).unwrap_or_default(),
                );
            }
        }
        Yaml::Sequence(list) => {
            for item in list {
                let item = ystr(item, "environment entry");
                let (k, v) = item.split_once('=').unwrap_or((item, ""));
                env.insert(k.to_string(), v.to_string());
            }
        }
        Yaml::Null => {}
        other => panic!("environment: unexpected {other:?}"),
    }
    env
}

/// A volume entry: (host source, container target). The source is `None` for a named volume.
#[derive(Debug)]
struct Mount {
    source: Option<String>,
    named: Option<String>,
    target: String,
}

fn is_host_path(s: &str) -> bool {
    s.starts_with('.') || s.starts_with('/') || s.starts_with('~')
}

fn mounts(svc: &Yaml) -> Vec<Mount> {
    let Some(list) = svc["volumes"].as_sequence() else {
        return Vec::new();
    };
    list.iter()
        .map(|v| match v {
            Yaml::String(s) => {
                let parts: Vec<&str> = s.split(':').collect();
                assert!(
                    parts.len() >= 2,
                    "volume {s:?}: expected SOURCE:TARGET[:MODE]"
                );
                let (src, target) = (parts[0], parts[1].to_string());
                if is_host_path(src) {
                    Mount {
                        source: Some(src.to_string()),
                        named: None,
                        target,
                    }
                } else {
                    Mount {
                        source: None,
                        named: Some(src.to_string()),
                        target,
                    }
                }
            }
            Yaml::Mapping(_) => {
                let kind = v["type"].as_str().unwrap_or("volume");
                let src = v["source"].as_str().map(str::to_string);
                let target = ystr(&v["target"], "volume target").to_string();
                if kind == "bind" {
                    Mount {
                        source: src,
                        named: None,
                        target,
                    }
                } else {
                    Mount {
                        source: None,
                        named: src,
                        target,
                    }
                }
            }
            other => panic!("volume: unexpected {other:?}"),
        })
        .collect()
}

/// Host ports a service publishes, with the container port each maps to.
fn published_ports(svc: &Yaml) -> BTreeMap<u16, u16> {
    let mut ports = BTreeMap::new();
    let Some(list) = svc["ports"].as_sequence() else {
        return ports;
    };
    for p in list {
        let (host, container) = match p {
            Yaml::Mapping(_) => (
                scalar(&p["published"]).expect("port mapping without `published`"),
                scalar(&p["target"]).expect("port mapping without `target`"),
            ),
            _ => {
                let s = scalar(p).expect("port entry");
                let s = s.split('/').next().unwrap().to_string(); // drop /tcp
                let parts: Vec<&str> = s.rsplitn(3, ':').collect();
                match parts.as_slice() {
                    [container, host, ..] => (host.to_string(), container.to_string()),
                    _ => panic!("port {s:?} publishes no fixed host port"),
                }
            }
        };
        let host: u16 = host
            .parse()
            .unwrap_or_else(|_| panic!("host port {host:?} is not a single port"));
        let container: u16 = container
            .parse()
            .unwrap_or_else(|_| panic!("container port {container:?}"));
        assert!(
            ports.insert(host, container).is_none(),
            "host port {host} published twice"
        );
    }
    ports
}

// ------------------------------------------------------------------------------------------------
// the PromQL metric-name extraction itself

#[test]
fn metric_name_extraction() {
    let names = |e: &str| metric_names(e).unwrap().into_iter().collect::<Vec<_>>();
    assert_eq!(names("up"), ["up"]);
    assert_eq!(
        names(
            r#"sum by (exit_code, le) (rate(foo_total{exit_code!="0", a=~"b|{c}"}[5m] offset 1h))"#
        ),
        ["foo_total"]
    );
    assert_eq!(
        names("histogram_quantile(0.99, sum without(instance) (rate(x_bucket[1m]))) > 1e3"),
        ["x_bucket"]
    );
    assert_eq!(
        names(
            "(sum(rate(a[1m])) or vector(0)) / on (instance) group_left(version) b * 0 unless c > bool 2"
        ),
        ["a", "b", "c"]
    );
    assert_eq!(names("absent(m{job=\"x\"}) or sum(m) == 0"), ["m"]);
    assert_eq!(names("count(up) by (job)"), ["up"]);
    assert!(metric_names(r#"{__name__="x"}"#).is_err());
    assert!(metric_names("sum(rate(x[1m]").is_ok()); // parens are not this check's business
    assert!(metric_names("x{a=\"b\"").is_err());
    assert_eq!(
        substitute_grafana_variables("rate(x[$__rate_interval]) + rate(y[${__interval}])"),
        "rate(x[1m]) + rate(y[1m])"
    );
}

// ------------------------------------------------------------------------------------------------
// docker-compose.yml

#[test]
fn compose_has_the_services() {
    let compose = yaml(COMPOSE);
    let names: BTreeSet<&str> = services(&compose)
        .keys()
        .map(|k| ystr(k, "service name"))
        .collect();
    for expected in [
        "rabbitmq",
        "mosquitto",
        "worker1",
        "worker2",
        "prometheus",
        "grafana",
    ] {
        assert!(
            names.contains(expected),
            "docker-compose.yml: no service {expected}; has {names:?}"
        );
    }
    let image = |name: &str| {
        service(&compose, name)["image"]
            .as_str()
            .unwrap_or("")
            .to_string()
    };
    assert_eq!(image("rabbitmq"), "rabbitmq:3.13-management");
    assert!(
        image("mosquitto").starts_with("eclipse-mosquitto:2"),
        "mosquitto image {}",
        image("mosquitto")
    );
    assert!(
        image("prometheus").starts_with("prom/prometheus"),
        "prometheus image {}",
        image("prometheus")
    );
    assert!(
        image("grafana").starts_with("grafana/grafana"),
        "grafana image {}",
        image("grafana")
    );
    // Beyond the fleet: the job generator, so that `docker compose up` alone shows jobs flowing.
    let fleet = [
        "rabbitmq",
        "mosquitto",
        "worker1",
        "worker2",
        "prometheus",
        "grafana",
        "load",
    ];
    let extras: Vec<_> = names.iter().filter(|n| !fleet.contains(n)).collect();
    assert!(extras.is_empty(), "unexpected services {extras:?}");
    let load = service(&compose, "load");
    assert!(
        load["profiles"].as_sequence().is_none_or(|p| p.is_empty()),
        "the job generator runs with a plain `docker compose up`"
    );
}

#[test]
fn compose_builds_the_workers_from_the_dockerfile() {
    let compose = yaml(COMPOSE);
    for (name, svc) in services(&compose) {
        let name = ystr(name, "service name");
        let build = &svc["build"];
        let must_build = name == "worker1" || name == "worker2";
        if build.is_null() {
            assert!(!must_build, "{name} has no `build`");
            continue;
        }
        let (context, dockerfile) = match build {
            Yaml::String(ctx) => (ctx.clone(), "Dockerfile".to_string()),
            Yaml::Mapping(_) => (
                build["context"].as_str().unwrap_or(".").to_string(),
                build["dockerfile"]
                    .as_str()
                    .unwrap_or("Dockerfile")
                    .to_string(),
            ),
            other => panic!("{name}: unexpected build {other:?}"),
        };
        let context = repo().join(context);
        assert!(
            context.is_dir(),
            "{name}: build context {} is not a folder",
            context.display()
        );
        let dockerfile = context.join(dockerfile);
        assert!(
            dockerfile.is_file(),
            "{name}: {} does not exist",
            dockerfile.display()
        );
    }
}

#[test]
fn dockerfile_is_multi_stage_and_runs_the_worker_as_non_root() {
    let d = read("Dockerfile");
    let has = |s: &str| assert!(d.contains(s), "Dockerfile lacks {s:?}");
    has("FROM rust:1-bookworm AS chef");
    has("cargo chef cook --release --locked");
    has("cargo build --release --locked");
    has("FROM debian:bookworm-slim");
    has("ca-certificates");
    has("COPY config/connectors /etc/mqtt-connector/connectors");
    has("MQTT_CONNECTOR_CONNECTORS=/etc/mqtt-connector/connectors");
    has(r#"ENTRYPOINT ["mqtt-connector"]"#);
    has(r#"CMD ["worker"]"#);
    let user = d
        .lines()
        .rfind(|l| l.trim_start().starts_with("USER "))
        .expect("Dockerfile sets no USER");
    assert!(
        !user.contains("root") && !user.contains(" 0"),
        "runs as root: {user}"
    );
    // Everything the Dockerfile copies from the context exists.
    for line in d
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("COPY ") && !l.contains("--from="))
    {
        let words: Vec<&str> = line
            .split_whitespace()
            .skip(1)
            .filter(|w| !w.starts_with("--"))
            .collect();
        for src in &words[..words.len() - 1] {
            assert!(
                repo().join(src).exists(),
                "Dockerfile copies {src}, which does not exist"
            );
        }
    }
}

#[test]
fn compose_mounts_only_existing_host_paths() {
    let compose = yaml(COMPOSE);
    let declared: BTreeSet<String> = compose["volumes"]
        .as_mapping()
        .map(|m| {
            m.keys()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    for (name, svc) in services(&compose) {
        let name = ystr(name, "service name");
        for m in mounts(svc) {
            if let Some(src) = &m.source {
                assert!(
                    !src.starts_with('~'),
                    "{name}: mount {src} depends on the user's home"
                );
                let path = if Path::new(src).is_absolute() {
                    PathBuf::from(src)
                } else {
                    repo().join(src)
                };
                assert!(
                    path.exists(),
                    "{name}: mounts {src} (as {}), which does not exist",
                    m.target
                );
            }
            if let Some(vol) = &m.named {
                assert!(
                    declared.contains(vol),
                    "{name}: named volume {vol} is not declared"
                );
            }
        }
    }
    // The mounts the fleet relies on.
    let expect_mount = |svc: &str, src: &str, target: &str| {
        let ms = mounts(service(&compose, svc));
        let found = ms.iter().any(|m| {
            m.target == target
                && m.source
                    .as_deref()
                    .map(|s| s.trim_start_matches("./").trim_end_matches('/'))
                    == Some(src)
        });
        assert!(
            found,
            "{svc}: expected {src} mounted at {target}, found {ms:?}"
        );
    };
    expect_mount(
        "mosquitto",
        "config/mosquitto/mosquitto.conf",
        "/mosquitto/config/mosquitto.conf",
    );
    expect_mount(
        "worker1",
        "config/connectors",
        "/etc/mqtt-connector/connectors",
    );
    expect_mount(
        "worker2",
        "config/connectors",
        "/etc/mqtt-connector/connectors",
    );
    expect_mount("prometheus", PROMETHEUS, "/etc/prometheus/prometheus.yml");
    expect_mount("prometheus", ALERTS, "/etc/prometheus/alerts.yml");
    expect_mount(
        "grafana",
        "grafana/provisioning",
        "/etc/grafana/provisioning",
    );
    expect_mount(
        "grafana",
        "grafana/dashboards",
        "/var/lib/grafana/dashboards",
    );
}

#[test]
fn compose_publishes_the_expected_ports() {
    let compose = yaml(COMPOSE);
    let expected: BTreeMap<&str, Vec<u16>> = BTreeMap::from([
        ("rabbitmq", vec![5672, 15672, 15692]),
        ("mosquitto", vec![1883]),
        ("worker1", vec![]),
        ("worker2", vec![]),
        ("prometheus", vec![9090]),
        ("grafana", vec![3000]),
    ]);
    let mut all_host_ports = BTreeSet::new();
    for (name, svc) in services(&compose) {
        let name = ystr(name, "service name");
        let ports = published_ports(svc);
        for (host, container) in &ports {
            assert_eq!(
                host, container,
                "{name}: host port {host} maps to container port {container}"
            );
            assert!(
                all_host_ports.insert(*host),
                "host port {host} is published by two services"
            );
        }
        if let Some(want) = expected.get(name) {
            let got: Vec<u16> = ports.keys().copied().collect();
            assert_eq!(&got, want, "{name}: published ports");
        }
    }
}

/// The compose workers run the README's hardened example: an allow-list their connector's broker
/// matches, no job files, a connector that locks its keys.
#[test]
fn compose_workers_are_hardened() {
    let compose = yaml(COMPOSE);
    let connectors =
        mqtt_connector::connectors::ConnectorStore::load(std::path::Path::new("config/connectors"))
            .expect("config/connectors loads");
    let demo = connectors.get("compose").expect("the compose connector");
    assert!(
        demo.job_may_set.is_some(),
        "compose.json has no job-may-set"
    );
    for name in ["worker1", "worker2"] {
        let env = environment(service(&compose, name));
        assert!(
            !env.contains_key("MQTT_CONNECTOR_JOB_FILES"),
            "{name} lets jobs name files"
        );
        let patterns = env
            .get("MQTT_CONNECTOR_ALLOW_BROKER")
            .unwrap_or_else(|| panic!("{name}: no MQTT_CONNECTOR_ALLOW_BROKER"));
        let allowed = mqtt_connector::policy::AllowedBrokers::parse(&[patterns])
            .unwrap_or_else(|err| panic!("{name}: {err}"));
        assert!(
            mqtt_connector::check::problems(demo, &allowed).is_empty(),
            "{name}: the compose connector is outside its own --allow-broker"
        );
    }
}

#[test]
fn compose_configures_the_workers() {
    let compose = yaml(COMPOSE);
    for name in ["worker1", "worker2"] {
        let svc = service(&compose, name);
        let env = environment(svc);
        let get = |k: &str| {
            env.get(k)
                .map(String::as_str)
                .unwrap_or_else(|| panic!("{name}: no {k}"))
        };
        assert_eq!(
            get("MQTT_CONNECTOR_AMQP_URL"),
            "amqp://guest:guest@rabbitmq:5672/%2f"
        );
        assert_eq!(get("MQTT_CONNECTOR_METRICS_ADDR"), "0.0.0.0:9090");
        assert_eq!(
            get("MQTT_CONNECTOR_CONNECTORS"),
            "/etc/mqtt-connector/connectors"
        );
        assert_eq!(
            svc["depends_on"]["rabbitmq"]["condition"].as_str(),
            Some("service_healthy"),
            "{name} must wait for a healthy rabbitmq"
        );
    }
    let health = &service(&compose, "rabbitmq")["healthcheck"]["test"];
    let test: Vec<String> = match health {
        Yaml::Sequence(s) => s.iter().filter_map(scalar).collect(),
        Yaml::String(s) => s.split_whitespace().map(str::to_string).collect(),
        other => panic!("rabbitmq healthcheck: {other:?}"),
    };
    assert!(
        test.join(" ").contains("rabbitmq-diagnostics -q ping"),
        "rabbitmq healthcheck: {test:?}"
    );

    let env = environment(service(&compose, "grafana"));
    assert_eq!(
        env.get("GF_AUTH_ANONYMOUS_ENABLED").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        env.get("GF_AUTH_ANONYMOUS_ORG_ROLE").map(String::as_str),
        Some("Admin")
    );

    let mosquitto = read("config/mosquitto/mosquitto.conf");
    let directives: Vec<&str> = mosquitto
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#'))
        .collect();
    assert!(
        directives.contains(&"listener 1883"),
        "mosquitto.conf: no `listener 1883`"
    );
    assert!(
        directives.contains(&"allow_anonymous true"),
        "mosquitto.conf: no `allow_anonymous true`"
    );

    let connector = json("config/connectors/compose.json");
    assert_eq!(
        connector,
        serde_json::json!({"broker": "tcp://mosquitto:1883", "client-id": "compose-demo", "topic": "demo/compose", "qos": 1,
            "job-may-set": ["topic", "content", "qos", "retain"]})
    );
}

// ------------------------------------------------------------------------------------------------
// Prometheus

#[test]
fn prometheus_config_scrapes_the_fleet_and_loads_the_rules() {
    let config = yaml(PROMETHEUS);
    let jobs = config["scrape_configs"]
        .as_sequence()
        .expect("prometheus.yml: no scrape_configs");
    let targets = |job: &str| -> BTreeSet<String> {
        let cfg = jobs
            .iter()
            .find(|j| j["job_name"].as_str() == Some(job))
            .unwrap_or_else(|| panic!("prometheus.yml: no scrape job {job}"));
        cfg["static_configs"]
            .as_sequence()
            .into_iter()
            .flatten()
            .flat_map(|sc| sc["targets"].as_sequence().into_iter().flatten())
            .filter_map(|t| t.as_str().map(str::to_string))
            .collect()
    };
    let workers = targets("mqtt-connector");
    assert!(
        workers.contains("worker1:9090") && workers.contains("worker2:9090"),
        "worker targets: {workers:?}"
    );
    let all: BTreeSet<String> = jobs
        .iter()
        .filter_map(|j| j["job_name"].as_str())
        .flat_map(&targets)
        .collect();
    assert!(
        all.contains("rabbitmq:15692"),
        "no job scrapes rabbitmq:15692: {all:?}"
    );

    // Scraped hosts are compose services.
    let compose = yaml(COMPOSE);
    for t in workers
        .iter()
        .chain(std::iter::once(&"rabbitmq:15692".to_string()))
    {
        let host = t.split(':').next().unwrap();
        assert!(
            compose["services"].get(host).is_some(),
            "target {t}: no compose service {host}"
        );
    }

    // rule_files resolve relative to the config file, here and in the container.
    let rule_files: Vec<&str> = config["rule_files"]
        .as_sequence()
        .expect("prometheus.yml: no rule_files")
        .iter()
        .map(|r| ystr(r, "rule file"))
        .collect();
    assert!(
        rule_files.contains(&"alerts.yml"),
        "rule_files: {rule_files:?}"
    );
    for file in rule_files {
        assert!(
            repo().join("config").join(file).is_file(),
            "rule file config/{file} does not exist"
        );
    }
}

#[test]
fn alert_rules_use_only_worker_metrics() {
    let rules = alert_rules();
    let names: BTreeSet<&str> = rules.iter().map(|(n, _)| n.as_str()).collect();
    for expected in [
        "MqttConnectorErrorRatioHigh",
        "MqttConnectorNoWorkersUp",
        "MqttConnectorJobsInFlightStuck",
        "MqttConnectorJobDurationP99High",
        "MqttConnectorRequestTimeoutsHigh",
        "MqttConnectorRepliesLost",
    ] {
        assert!(names.contains(expected), "alerts.yml: no alert {expected}");
    }
    for (name, expr) in &rules {
        check_expr(&format!("alert {name}"), expr);
    }
}

// ------------------------------------------------------------------------------------------------
// Grafana

#[test]
fn grafana_provisioning_matches_compose() {
    let ds = yaml("grafana/provisioning/datasources/prometheus.yml");
    let sources = ds["datasources"].as_sequence().expect("no datasources");
    let prom = sources
        .iter()
        .find(|d| d["uid"].as_str() == Some("prometheus"))
        .expect("no datasource with uid prometheus");
    assert_eq!(prom["type"].as_str(), Some("prometheus"));
    assert_eq!(prom["url"].as_str(), Some("http://prometheus:9090"));

    let providers = yaml("grafana/provisioning/dashboards/dashboards.yml");
    let provider = &providers["providers"][0];
    assert_eq!(provider["type"].as_str(), Some("file"));
    assert_eq!(
        provider["options"]["path"].as_str(),
        Some("/var/lib/grafana/dashboards")
    );
}

#[test]
fn dashboard_queries_only_worker_metrics() {
    let dash = json(DASHBOARD);
    let panels = dashboard_panels(&dash);
    assert!(!panels.is_empty(), "dashboard has no panels");

    let mut ids = BTreeSet::new();
    for p in &panels {
        let title = p["title"].as_str().unwrap_or("?");
        assert!(
            ids.insert(p["id"].as_i64()),
            "duplicate panel id {} ({title})",
            p["id"]
        );
        let targets = p["targets"].as_array().filter(|t| !t.is_empty());
        let targets = targets.unwrap_or_else(|| panic!("panel {title:?} has no targets"));
        for t in targets {
            let uid = t["datasource"]["uid"]
                .as_str()
                .or(p["datasource"]["uid"].as_str());
            assert_eq!(uid, Some("prometheus"), "panel {title:?}: datasource uid");
        }
    }

    let mut used = BTreeSet::new();
    let exprs = dashboard_exprs();
    for (title, expr) in &exprs {
        used.extend(check_expr(&format!("panel {title:?}"), expr));
    }
    // The dashboard shows every metric the worker exposes.
    let mut shown: BTreeSet<String> = used.clone();
    for h in HISTOGRAMS {
        if used.iter().any(|u| u.starts_with(h)) {
            shown.insert(h.to_string());
        }
    }
    for m in METRICS.iter().chain(HISTOGRAMS) {
        assert!(shown.contains(*m), "the dashboard never shows {m}");
    }

    // Quantiles of every histogram, per worker and for the fleet.
    for h in HISTOGRAMS {
        for q in ["0.5", "0.95", "0.99"] {
            let fleet = format!("histogram_quantile({q}, sum by (le) (rate({h}_bucket[1m])))");
            let per_worker =
                format!("histogram_quantile({q}, sum by (instance, le) (rate({h}_bucket[1m])))");
            assert!(
                exprs.iter().any(|(_, e)| *e == fleet),
                "no panel shows {fleet}"
            );
            assert!(
                exprs.iter().any(|(_, e)| *e == per_worker),
                "no panel shows {per_worker}"
            );
        }
    }
}
