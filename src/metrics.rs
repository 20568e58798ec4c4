//! Every metric of the worker, its name and its labels, in one place: the Grafana dashboard and
//! the alert rules match what is written here. Names are prefixed `mqtt_connector_`; label
//! values are bounded whatever jobs write: connector names, exit-codes, QoS, and the host:port
//! of brokers that connectors name ([`JOB_BROKER`] for every other broker), never a topic,
//! client-id or correlation id.

use std::collections::HashSet;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::outcome::{ExitCode, RequestEnd};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct JobLabels {
    connector: String,
    exit_code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ConnectorLabels {
    connector: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QosLabels {
    qos: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BrokerLabels {
    broker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExpiredLabels {
    when: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabels {
    version: &'static str,
}

/// Buckets from 1 ms to about 33 s, doubling.
fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 2.0, 16))
}

/// The `broker` label of every broker no connector names: a job may write any host, and a label
/// value per host would let a job stream grow every scrape without bound.
pub const JOB_BROKER: &str = "job";

struct Inner {
    registry: Registry,
    /// Brokers named by connectors (host:port): the only broker label values besides [`JOB_BROKER`].
    named_brokers: RwLock<HashSet<String>>,
    mqtt_connection_evictions: Counter,
    mqtt_connection_waits: Counter,
    mqtt_connections_max: Gauge,
    jobs: Family<JobLabels, Counter>,
    job_duration: Family<ConnectorLabels, Histogram, fn() -> Histogram>,
    publish_duration: Family<QosLabels, Histogram, fn() -> Histogram>,
    retries: Family<ConnectorLabels, Counter>,
    deferred: Family<ConnectorLabels, Counter>,
    jobs_in_flight: Gauge,
    mqtt_connections: Family<BrokerLabels, Gauge>,
    mqtt_reconnects: Family<BrokerLabels, Counter>,
    amqp_consumer_up: Gauge,
    amqp_connection_blocked: Gauge,
    replies_lost: Counter,
    requests: Family<RequestLabels, Counter>,
    answer_latency: Histogram,
    expired: Family<ExpiredLabels, Counter>,
}

/// When an expired job (exit-code 9) was found: the `when` label of
/// `mqtt_connector_jobs_expired_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpiredWhen {
    /// Already expired when the worker took it (it waited too long in the queue).
    Taken,
    /// Its validity passed while it retried or waited for a connection (a broker down).
    Retrying,
}

impl ExpiredWhen {
    const ALL: [ExpiredWhen; 2] = [ExpiredWhen::Taken, ExpiredWhen::Retrying];

    fn label(self) -> &'static str {
        match self {
            ExpiredWhen::Taken => "taken",
            ExpiredWhen::Retrying => "retrying",
        }
    }
}

/// The handles of the `request` and expiry metrics, resolved once (no label lookup per job).
#[derive(Clone)]
pub struct RequestMetrics {
    ended: [Counter; RequestEnd::ALL.len()],
    answer_latency: Histogram,
    expired: [Counter; ExpiredWhen::ALL.len()],
}

impl RequestMetrics {
    /// A request that ended as `end`.
    pub fn ended(&self, end: RequestEnd) {
        self.ended[end as usize].inc();
    }

    /// An answer that came `after` the broker acknowledged the command.
    pub fn answered_after(&self, after: Duration) {
        self.answer_latency.observe(after.as_secs_f64());
    }

    /// A job that ended 9 (expired), found `when`.
    pub fn expired(&self, when: ExpiredWhen) {
        self.expired[when as usize].inc();
    }
}

/// The metrics of one connector label (a connector's name, `none` or `unknown`).
#[derive(Clone)]
pub struct ConnectorMetrics {
    pub name: Arc<str>,
    jobs: [Counter; ExitCode::ALL.len()],
    duration: Histogram,
    retries: Counter,
    deferred: Counter,
}

impl ConnectorMetrics {
    /// One finished job.
    pub fn job_finished(&self, exit_code: ExitCode, duration: Duration) {
        self.jobs[exit_code as usize].inc();
        self.duration.observe(duration.as_secs_f64());
    }

    pub fn retry(&self) {
        self.retries.inc();
    }

    /// A job handed back to the queue for the worker that holds its client-id.
    pub fn deferred(&self) {
        self.deferred.inc();
    }
}

/// The worker's metrics. Cheap to clone; every clone records into the same registry.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mqtt_connector");
        let jobs = Family::default();
        registry.register(
            "jobs",
            "Jobs finished, by connector and exit-code",
            jobs.clone(),
        );
        let job_duration = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "job_duration_seconds",
            "Time from taking a job to its final outcome, retries included",
            job_duration.clone(),
        );
        let publish_duration = Family::new_with_constructor(latency_histogram as fn() -> Histogram);
        registry.register(
            "publish_duration_seconds",
            "Time from handing a publish to the MQTT connection to the broker's acknowledgement",
            publish_duration.clone(),
        );
        let retries = Family::default();
        registry.register(
            "retries",
            "Publish attempts retried after a transient failure",
            retries.clone(),
        );
        let deferred = Family::default();
        registry.register(
            "jobs_deferred",
            "Jobs handed back to the queue because another worker holds their MQTT client-id",
            deferred.clone(),
        );
        let jobs_in_flight = Gauge::default();
        registry.register(
            "jobs_in_flight",
            "Jobs taken and not yet settled",
            jobs_in_flight.clone(),
        );
        let mqtt_connections = Family::default();
        registry.register(
            "mqtt_connections",
            "Open MQTT connections, by broker",
            mqtt_connections.clone(),
        );
        let mqtt_reconnects = Family::default();
        registry.register(
            "mqtt_reconnects",
            "MQTT connections opened again after one to the same target was lost",
            mqtt_reconnects.clone(),
        );
        let mqtt_connections_max = Gauge::default();
        registry.register(
            "mqtt_connections_max",
            "The most MQTT connections this worker holds open (--max-connections)",
            mqtt_connections_max.clone(),
        );
        let mqtt_connection_evictions = Counter::default();
        registry.register(
            "mqtt_connection_evictions",
            "Idle MQTT connections closed early to make room under --max-connections",
            mqtt_connection_evictions.clone(),
        );
        let mqtt_connection_waits = Counter::default();
        registry.register(
            "mqtt_connection_waits",
            "Connects that waited for room under --max-connections (every connection was busy)",
            mqtt_connection_waits.clone(),
        );
        let amqp_consumer_up = Gauge::default();
        registry.register(
            "amqp_consumer_up",
            "1 while the worker consumes from RabbitMQ, else 0",
            amqp_consumer_up.clone(),
        );
        let amqp_connection_blocked = Gauge::default();
        registry.register(
            "amqp_connection_blocked",
            "1 while RabbitMQ blocks the worker's connection (a memory or disk alarm), else 0",
            amqp_connection_blocked.clone(),
        );
        let replies_lost = Counter::default();
        registry.register(
            "replies_lost",
            "Replies RabbitMQ refused, could not route or did not confirm within 30 s: the job was settled without one",
            replies_lost.clone(),
        );
        let requests = Family::default();
        registry.register(
            "requests",
            "Request jobs (\"action\": \"request\") ended, by outcome: answered, no_answer, too_large, subscription_refused, not_published",
            requests.clone(),
        );
        let answer_latency = latency_histogram();
        registry.register(
            "request_answer_seconds",
            "Time from the broker's acknowledgement of a request's command to the device's answer",
            answer_latency.clone(),
        );
        let expired = Family::default();
        registry.register(
            "jobs_expired",
            "Jobs ended 9 because their not-after or AMQP expiration had passed (nothing published), by when: taken or retrying",
            expired.clone(),
        );
        let build_info = Family::<VersionLabels, Gauge>::default();
        build_info
            .get_or_create(&VersionLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        registry.register("build_info", "The running version, always 1", build_info);
        Self {
            inner: Arc::new(Inner {
                registry,
                named_brokers: RwLock::default(),
                mqtt_connection_evictions,
                mqtt_connection_waits,
                mqtt_connections_max,
                jobs,
                job_duration,
                publish_duration,
                retries,
                deferred,
                jobs_in_flight,
                mqtt_connections,
                mqtt_reconnects,
                amqp_consumer_up,
                amqp_connection_blocked,
                replies_lost,
                requests,
                answer_latency,
                expired,
            }),
        }
    }

    /// The handles of one connector label, built once (when the connectors are loaded) so
    /// that recording a job takes neither an allocation nor the registry's lock. Building them
    /// also makes every series exist from the start, at 0.
    pub fn connector(&self, connector: &str) -> ConnectorMetrics {
        let inner = &self.inner;
        let jobs = ExitCode::ALL.map(|exit_code| {
            inner.jobs.get_or_create_owned(&JobLabels {
                connector: connector.to_owned(),
                exit_code: exit_code.label(),
            })
        });
        let labels = ConnectorLabels {
            connector: connector.to_owned(),
        };
        ConnectorMetrics {
            name: connector.into(),
            jobs,
            duration: inner.job_duration.get_or_create_owned(&labels),
            retries: inner.retries.get_or_create_owned(&labels),
            deferred: inner.deferred.get_or_create_owned(&labels),
        }
    }

    /// The handles of the request and expiry metrics; building them makes every series exist
    /// from the start, at 0.
    pub fn requests(&self) -> RequestMetrics {
        let inner = &self.inner;
        RequestMetrics {
            ended: RequestEnd::ALL.map(|end| {
                inner.requests.get_or_create_owned(&RequestLabels {
                    outcome: end.label(),
                })
            }),
            answer_latency: inner.answer_latency.clone(),
            expired: ExpiredWhen::ALL.map(|when| {
                inner
                    .expired
                    .get_or_create_owned(&ExpiredLabels { when: when.label() })
            }),
        }
    }

    /// The publish-latency histograms, by QoS.
    pub fn publish_latency(&self) -> [Histogram; 3] {
        ["0", "1", "2"].map(|qos| {
            self.inner
                .publish_duration
                .get_or_create_owned(&QosLabels { qos })
        })
    }

    /// The in-flight gauge; the caller increments and decrements around each job.
    pub fn jobs_in_flight(&self) -> &Gauge {
        &self.inner.jobs_in_flight
    }

    /// The brokers (host:port) that connectors name: they get a `broker` label value of their
    /// own; every other broker counts under [`JOB_BROKER`].
    pub fn name_brokers(&self, brokers: impl IntoIterator<Item = String>) {
        let mut named = self
            .inner
            .named_brokers
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        named.extend(brokers);
    }

    /// The `broker` label value of a broker: itself if a connector names it, else [`JOB_BROKER`].
    fn broker_label(&self, broker: &str) -> BrokerLabels {
        let named = self
            .inner
            .named_brokers
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        BrokerLabels {
            broker: if named.contains(broker) {
                broker.to_owned()
            } else {
                JOB_BROKER.to_owned()
            },
        }
    }

    /// The open-connections gauge of one broker.
    pub fn mqtt_connections(&self, broker: &str) -> Gauge {
        self.inner
            .mqtt_connections
            .get_or_create_owned(&self.broker_label(broker))
    }

    pub fn mqtt_reconnect(&self, broker: &str) {
        self.inner
            .mqtt_reconnects
            .get_or_create(&self.broker_label(broker))
            .inc();
    }

    /// The pool's bound on open connections.
    pub fn set_mqtt_connections_max(&self, max: usize) {
        self.inner
            .mqtt_connections_max
            .set(i64::try_from(max).unwrap_or(i64::MAX));
    }

    /// An idle connection closed to make room under the bound.
    pub fn mqtt_connection_evicted(&self) {
        self.inner.mqtt_connection_evictions.inc();
    }

    /// A connect that found no room under the bound and waited.
    pub fn mqtt_connection_waited(&self) {
        self.inner.mqtt_connection_waits.inc();
    }

    pub fn set_connection_blocked(&self, blocked: bool) {
        self.inner.amqp_connection_blocked.set(i64::from(blocked));
    }

    /// A reply given up on after its window; the job was settled without it.
    pub fn reply_lost(&self) {
        self.inner.replies_lost.inc();
    }

    pub fn set_consumer_up(&self, up: bool) {
        self.inner.amqp_consumer_up.set(i64::from(up));
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.inner.registry);
        text
    }

    /// The registry in the classic Prometheus text format (`text/plain; version=0.0.4`), for
    /// clients that do not ask for OpenMetrics (curl, `promtool check metrics`).
    pub fn encode_classic(&self) -> String {
        openmetrics_to_classic(&self.encode())
    }
}

/// The OpenMetrics text of prometheus-client as the classic text format: a counter family is
/// named by its samples (`x_total`, not `x`) in `# HELP` and `# TYPE`; `# UNIT` and `# EOF`
/// do not exist there. Every other line is the same in both formats.
fn openmetrics_to_classic(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut text = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| Some((prefix, line.strip_prefix(prefix)?)));
        match meta {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                text.push_str(prefix);
                text.push_str(name);
                if counters.contains(name) && !name.ends_with("_total") {
                    text.push_str("_total");
                }
                text.push(' ');
                text.push_str(tail);
            }
            None => text.push_str(line),
        }
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_job_shows_up_with_connector_and_exit_code() {
        let metrics = Metrics::new();
        metrics
            .connector("local")
            .job_finished(ExitCode::ConnectFailed, Duration::from_millis(3));
        let text = metrics.encode();
        assert!(
            text.contains(r#"mqtt_connector_jobs_total{connector="local",exit_code="3"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("mqtt_connector_job_duration_seconds_bucket"),
            "{text}"
        );
        assert!(
            text.contains("mqtt_connector_build_info{version="),
            "{text}"
        );
    }

    #[test]
    fn requests_and_expired_jobs_are_counted_by_bounded_labels_and_exist_from_the_start() {
        let metrics = Metrics::new();
        let requests = metrics.requests();
        let text = metrics.encode();
        for end in RequestEnd::ALL {
            let series = format!(
                "mqtt_connector_requests_total{{outcome=\"{}\"}} 0",
                end.label()
            );
            assert!(text.contains(&series), "{text}");
        }
        assert!(
            text.contains(r#"mqtt_connector_jobs_expired_total{when="taken"} 0"#),
            "{text}"
        );
        requests.ended(RequestEnd::TooLarge);
        requests.answered_after(Duration::from_millis(30));
        requests.expired(ExpiredWhen::Retrying);
        let text = metrics.encode();
        assert!(
            text.contains(r#"mqtt_connector_requests_total{outcome="too_large"} 1"#),
            "{text}"
        );
        assert!(
            text.contains("mqtt_connector_request_answer_seconds_count 1"),
            "{text}"
        );
        assert!(
            text.contains(r#"mqtt_connector_jobs_expired_total{when="retrying"} 1"#),
            "{text}"
        );
    }

    #[test]
    fn broker_labels_stay_bounded_whatever_brokers_jobs_name() {
        let metrics = Metrics::new();
        metrics.name_brokers(["mqtt.prod:1883".to_owned()]);
        metrics.mqtt_connections("mqtt.prod:1883").inc();
        for i in 0..1_000 {
            let broker = format!("host-{i}.example:1883");
            metrics.mqtt_connections(&broker).inc();
            metrics.mqtt_reconnect(&broker);
        }
        let text = metrics.encode();
        let series = |name: &str| {
            text.lines()
                .filter(|line| line.starts_with(name) && line.contains("broker="))
                .count()
        };
        assert_eq!(series("mqtt_connector_mqtt_connections{"), 2, "{text}");
        assert_eq!(series("mqtt_connector_mqtt_reconnects_total{"), 1, "{text}");
        assert!(
            text.contains(r#"mqtt_connector_mqtt_connections{broker="job"} 1000"#),
            "{text}"
        );
    }

    #[test]
    fn the_classic_format_names_counters_by_their_samples() {
        let metrics = Metrics::new();
        metrics
            .connector("local")
            .job_finished(ExitCode::Published, Duration::from_millis(3));
        let text = metrics.encode_classic();
        assert!(
            text.contains("# TYPE mqtt_connector_jobs_total counter\n"),
            "{text}"
        );
        assert!(
            text.contains("# HELP mqtt_connector_jobs_total Jobs finished"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE mqtt_connector_jobs_in_flight gauge\n"),
            "{text}"
        );
        assert!(!text.contains("# EOF"), "{text}");
        assert!(!text.contains("# UNIT"), "{text}");
    }
}
