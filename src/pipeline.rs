//! One job from body to outcome: decode, hold it to the trust boundary, merge with its
//! connector, validate, then publish through the pool with retries and backoff, all inside the
//! job's timeout. Used by the worker for every delivery and by `send` directly.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::histogram::Histogram;
use rand::Rng;
use tokio::time::timeout_at;

use crate::backoff::Backoff;
use crate::connectors::{Connector, ConnectorStore};
use crate::job::{Job, JobError, Limits, Params, Qos};
use crate::metrics::{ConnectorMetrics, Metrics};
use crate::mqtt::MqttError;
use crate::mqtt::connection::Ack;
use crate::mqtt::pool::Pool;
use crate::outcome::{ExitCode, Outcome};
use crate::policy::{self, JobFiles, Policy};

/// Metric handles of every connector label, built once.
struct Labels {
    connectors: HashMap<String, ConnectorMetrics>,
    /// Jobs without a connector.
    none: ConnectorMetrics,
    /// Jobs naming a connector that does not exist (their name is not a bounded label value).
    unknown: ConnectorMetrics,
}

/// A validated job, or why not; with the label it counts under either way.
type Prepared<'a> = Result<(Job, &'a ConnectorMetrics), (JobError, &'a ConnectorMetrics)>;

const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Everything a job needs, shared by all jobs of a worker.
#[derive(Clone)]
pub struct Pipeline {
    connectors: Arc<ConnectorStore>,
    /// Metric handles by connector label: every connector's name, `none` and `unknown`.
    labels: Arc<Labels>,
    publish_latency: Arc<[Histogram; 3]>,
    pool: Pool,
    limits: Limits,
    policy: Arc<Policy>,
    /// Whether a job whose client-id another worker holds may go back to the queue (a worker
    /// that has siblings on its queue) or must wait for it within its timeout (`send`).
    siblings: Option<Siblings>,
}

/// When a job was first taken by a worker and how often it was handed back since: carried by
/// the job across hand-backs (AMQP headers), so its timeout counts from the first taking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub first_taken: SystemTime,
    pub handbacks: u32,
}

impl Taken {
    /// A job taken now for the first time.
    pub fn now() -> Self {
        Self {
            first_taken: SystemTime::now(),
            handbacks: 0,
        }
    }
}

/// Whether other workers consume this worker's queue (kept up to date by the worker): only
/// then can a job be handed back for a sibling that holds its client-id.
#[derive(Debug, Clone, Default)]
pub struct Siblings(Arc<AtomicBool>);

impl Siblings {
    pub fn set(&self, present: bool) {
        self.0.store(present, Ordering::Relaxed);
    }

    pub fn present(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A job's outcome and the connector label it is counted under.
#[derive(Debug)]
pub struct Finished {
    pub outcome: Outcome,
    /// The connector's name, `none` without one, `unknown` for a name with no file
    /// (a name from a job is not a bounded label value).
    pub connector: Arc<str>,
    /// Not final: another worker holds the job's MQTT client-id. Hand the job back to the
    /// queue after this delay (no reply), so it reaches that worker or this one later.
    pub requeue_after: Option<Duration>,
}

/// How long a deferred job is held before it goes back to the queue: long enough that the
/// queue does not spin, short enough that the job soon reaches the worker holding its client-id.
const DEFER_MIN: Duration = Duration::from_millis(500);
const DEFER_MAX: Duration = Duration::from_millis(2000);

/// What to do after an attempt failed with a transient error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Wait this long, then try again.
    Retry(Duration),
    /// The next attempt would start after the deadline: this failure is the outcome.
    GiveUp,
    /// Hand the job back to the queue (a sibling worker holds its client-id).
    Defer,
}

/// The retry decision, pure: a client-id held elsewhere is deferred where deferring is
/// possible; otherwise retry after `delay` unless that passes the deadline.
fn next_after(
    failure: &MqttError,
    may_defer: bool,
    now: tokio::time::Instant,
    deadline: tokio::time::Instant,
    delay: Duration,
) -> Next {
    if may_defer && matches!(failure, MqttError::HeldElsewhere { .. }) {
        Next::Defer
    } else if now + delay >= deadline {
        Next::GiveUp
    } else {
        Next::Retry(delay)
    }
}

impl Pipeline {
    pub fn new(
        connectors: Arc<ConnectorStore>,
        pool: Pool,
        metrics: Metrics,
        limits: Limits,
        policy: Policy,
    ) -> Self {
        let labels = Labels {
            connectors: connectors
                .iter()
                .map(|(name, _)| (name.to_owned(), metrics.connector(name)))
                .collect(),
            none: metrics.connector("none"),
            unknown: metrics.connector("unknown"),
        };
        Self {
            connectors,
            labels: Arc::new(labels),
            publish_latency: Arc::new(metrics.publish_latency()),
            pool,
            limits,
            policy: Arc::new(policy),
            siblings: None,
        }
    }

    /// Jobs whose client-id another worker holds are handed back to the queue
    /// ([`Finished::requeue_after`]) instead of waiting, while `siblings` says other workers
    /// consume the queue.
    pub fn deferring(mut self, siblings: Siblings) -> Self {
        self.siblings = Some(siblings);
        self
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Runs one job body to its final outcome and records it in the metrics. `taken` says when
    /// a worker first took the job (its timeout counts from then) and how often it was handed back.
    pub async fn run(&self, body: &[u8], taken: Taken) -> Finished {
        let _ = taken; // TODO(containment): deadline from taken.first_taken
        let started = Instant::now();
        let (result, label) = match self.prepare(body).await {
            Ok((job, label)) => (self.publish(&job, label).await, label),
            Err((err, label)) => (Ok(Outcome::from(err)), label),
        };
        let connector = Arc::clone(&label.name);
        match result {
            Ok(outcome) => {
                label.job_finished(outcome.exit_code, started.elapsed());
                Finished {
                    outcome,
                    connector,
                    requeue_after: None,
                }
            }
            Err(deferred) => {
                label.deferred();
                let delay = rand::rng().random_range(DEFER_MIN..=DEFER_MAX);
                Finished {
                    outcome: deferred,
                    connector,
                    requeue_after: Some(delay),
                }
            }
        }
    }

    /// Decode, hold to the trust boundary, merge, validate; also which connector label the
    /// job counts under.
    async fn prepare(&self, body: &[u8]) -> Prepared<'_> {
        let none = &self.labels.none;
        let params = Params::decode(body).map_err(|err| (err, none))?;
        if let Some(action) = params.action.as_deref().filter(|action| *action != "send") {
            let message = format!("unknown action {action:?}: the only action is \"send\"");
            return Err((JobError::Invalid(message), none));
        }
        let (connector, label) = match params.connector.as_deref() {
            None => (None, none),
            Some(name) => match self.connectors.get_named(name) {
                Some((name, connector)) => {
                    let label = self
                        .labels
                        .connectors
                        .get(name)
                        .unwrap_or(&self.labels.unknown);
                    (Some((name, connector)), label)
                }
                None => {
                    let err = JobError::UnknownConnector(name.to_owned());
                    return Err((err, &self.labels.unknown));
                }
            },
        };
        let job = self
            .admit(params, connector)
            .await
            .map_err(|err| (err, label))?;
        Ok((job, label))
    }

    /// The trust boundary around merge and validation: keys the connector lets a job set,
    /// files the job may name, secrets that stay with their broker, brokers the worker may reach.
    async fn admit(
        &self,
        params: Params,
        connector: Option<(&str, &Connector)>,
    ) -> Result<Job, JobError> {
        if let Some((name, connector)) = connector {
            policy::job_may_set(&params, name, connector)?;
        }
        let params = self.resolve_files(params).await?;
        let merged = match connector {
            Some((name, connector)) => {
                policy::secrets_stay_with_broker(&params, name, connector)?;
                params.over(&connector.defaults)
            }
            None => params,
        };
        let job = Job::validate(merged, self.limits)?;
        self.policy.allowed_brokers.check(&job.target.broker)?;
        Ok(job)
    }

    /// The job's own file paths, resolved on a blocking thread (symlinks are followed on disk);
    /// most jobs name none and skip this.
    async fn resolve_files(&self, params: Params) -> Result<Params, JobError> {
        if !JobFiles::applies_to(&params) || matches!(self.policy.job_files, JobFiles::Any) {
            return Ok(params);
        }
        let policy = Arc::clone(&self.policy);
        tokio::task::spawn_blocking(move || policy.job_files.resolve(params))
            .await
            .unwrap_or_else(|_| {
                Err(JobError::Invalid(
                    "the job's file paths could not be checked".into(),
                ))
            })
    }

    /// Publishes until the broker acknowledges, a permanent failure, or the job's timeout;
    /// `Err` when the job is to go back to the queue (its why as an outcome, for the log).
    async fn publish(&self, job: &Job, label: &ConnectorMetrics) -> Result<Outcome, Outcome> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + job.timeout;
        let mut backoff = Backoff::new(FIRST_RETRY_DELAY, MAX_RETRY_DELAY);
        let mut last_failure: Option<MqttError> = None;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut phase = Phase::Connecting;
            let attempt = timeout_at(deadline, self.attempt(job, &mut phase)).await;
            let failure = match attempt {
                Ok(Ok(ack)) => return Ok(published(job, ack, attempts)),
                Ok(Err(err)) if err.is_permanent() => {
                    return Ok(Outcome::new(err.exit_code(), err.to_string(), attempts));
                }
                Ok(Err(err)) => err,
                Err(_elapsed) => {
                    return Ok(timed_out(
                        job,
                        phase,
                        last_failure,
                        attempts,
                        started.elapsed(),
                    ));
                }
            };
            let now = tokio::time::Instant::now();
            match next_after(
                &failure,
                self.siblings.as_ref().is_some_and(Siblings::present),
                now,
                deadline,
                backoff.next_delay(),
            ) {
                Next::Defer => {
                    return Err(Outcome::new(
                        failure.exit_code(),
                        failure.to_string(),
                        attempts,
                    ));
                }
                Next::GiveUp => return Ok(gave_up(job, &failure, attempts, started.elapsed())),
                Next::Retry(delay) => {
                    tracing::debug!(attempt = attempts, error = %failure, ?delay, "publish failed, will retry");
                    label.retry();
                    last_failure = Some(failure);
                    tokio::time::sleep(delay).await;
                }
            }
        }
    }

    async fn attempt(&self, job: &Job, phase: &mut Phase) -> Result<Ack, MqttError> {
        let connection = self.pool.lease(&job.target).await?;
        *phase = Phase::AwaitingAck;
        let sent = Instant::now();
        // No stall timer of our own: the connection gives itself up when the broker owes an
        // answer and stays silent for the keep-alive (see mqtt::connection::health), which a
        // large payload or a small Receive Maximum does not trip.
        let ack = connection.publish(&job.message).await?;
        self.publish_latency[usize::from(ack.qos.level())].observe(sent.elapsed().as_secs_f64());
        Ok(ack)
    }
}

/// Where an attempt was when the timeout ran out.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Connecting,
    AwaitingAck,
}

fn published(job: &Job, ack: Ack, attempts: u32) -> Outcome {
    let asked = job.message.qos;
    let target = &job.target;
    let mut message = format!(
        "published to {} on {} as {} (qos {})",
        job.message.topic.as_str(),
        target.broker,
        target.client_id,
        ack.qos.level()
    );
    if let Some(max) = ack.lowered_to_max_qos {
        message.push_str(&format!(
            "; the broker's Maximum QoS is {}: published at QoS {} instead of {}",
            max.level(),
            max.level(),
            asked.level()
        ));
    } else if ack.qos < asked {
        message.push_str(&format!(
            "; the broker acknowledged at QoS {} instead of {} (it has no QoS {}): delivered at least once",
            ack.qos.level(),
            asked.level(),
            asked.level()
        ));
    }
    if ack.qos == Qos::AtMostOnce {
        message.push_str("; QoS 0 has no acknowledgement: written to the connection");
    }
    if ack.no_subscribers {
        message.push_str("; the broker says no matching subscribers (0x10): nobody received it");
    }
    Outcome::new(ExitCode::Published, message, attempts)
}

fn timed_out(
    job: &Job,
    phase: Phase,
    last_failure: Option<MqttError>,
    attempts: u32,
    elapsed: Duration,
) -> Outcome {
    match last_failure {
        Some(failure) => gave_up(job, &failure, attempts, elapsed),
        None => {
            let waiting_for = match phase {
                Phase::Connecting => "a connection (no CONNACK)",
                Phase::AwaitingAck => "the acknowledgement of the publish",
            };
            Outcome::new(
                ExitCode::Timeout,
                format!(
                    "timeout: {} did not answer within the job's {} ms while waiting for {waiting_for}",
                    job.target.broker,
                    job.timeout.as_millis()
                ),
                attempts,
            )
        }
    }
}

fn gave_up(job: &Job, failure: &MqttError, attempts: u32, elapsed: Duration) -> Outcome {
    let tries = if attempts == 1 { "attempt" } else { "attempts" };
    Outcome::new(
        failure.exit_code(),
        format!(
            "{failure} ({attempts} {tries} in {} ms; the job's timeout is {} ms)",
            elapsed.as_millis(),
            job.timeout.as_millis()
        ),
        attempts,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lost() -> MqttError {
        MqttError::PublishLost {
            broker: "h:1883".into(),
            reason: "gone".into(),
        }
    }

    fn held() -> MqttError {
        MqttError::HeldElsewhere {
            broker: "h:1883".into(),
            client_id: "c".into(),
            rest_ms: 10_000,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_failure_is_retried_while_the_retry_starts_before_the_deadline() {
        let start = tokio::time::Instant::now();
        let deadline = start + Duration::from_millis(1_000);
        let delay = Duration::from_millis(400);
        assert_eq!(
            next_after(&lost(), true, start, deadline, delay),
            Next::Retry(delay)
        );
        tokio::time::advance(Duration::from_millis(600)).await;
        let now = tokio::time::Instant::now();
        assert_eq!(
            next_after(&lost(), true, now, deadline, delay),
            Next::GiveUp
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_id_held_elsewhere_is_deferred_by_a_worker_and_waited_for_by_send() {
        let now = tokio::time::Instant::now();
        let deadline = now + Duration::from_secs(10);
        let delay = Duration::from_millis(100);
        assert_eq!(next_after(&held(), true, now, deadline, delay), Next::Defer);
        assert_eq!(
            next_after(&held(), false, now, deadline, delay),
            Next::Retry(delay)
        );
        tokio::time::advance(Duration::from_secs(10)).await;
        let late = tokio::time::Instant::now();
        assert_eq!(
            next_after(&held(), true, late, deadline, delay),
            Next::Defer
        );
        assert_eq!(
            next_after(&held(), false, late, deadline, delay),
            Next::GiveUp
        );
    }
}
