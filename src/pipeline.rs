//! One job from body to outcome: decode, merge with its connector, validate, then publish
//! through the pool with retries and backoff, all inside the job's timeout. Used by the worker
//! for every delivery and by `send` directly.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::time::timeout_at;

use crate::backoff::Backoff;
use crate::connectors::ConnectorStore;
use crate::job::{Job, JobError, Limits, Params, Qos};
use crate::metrics::Metrics;
use crate::mqtt::MqttError;
use crate::mqtt::connection::Ack;
use crate::mqtt::pool::Pool;
use crate::outcome::{ExitCode, Outcome};

const FIRST_RETRY_DELAY: Duration = Duration::from_millis(100);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(5);

/// Everything a job needs, shared by all jobs of a worker.
#[derive(Clone)]
pub struct Pipeline {
    connectors: Arc<ConnectorStore>,
    pool: Pool,
    metrics: Metrics,
    limits: Limits,
}

/// A job's outcome and the connector label it is counted under.
#[derive(Debug)]
pub struct Finished {
    pub outcome: Outcome,
    /// The connector's name, `none` without one, `unknown` for a name with no file
    /// (a name from a job is not a bounded label value).
    pub connector: String,
}

impl Pipeline {
    pub fn new(
        connectors: Arc<ConnectorStore>,
        pool: Pool,
        metrics: Metrics,
        limits: Limits,
    ) -> Self {
        Self {
            connectors,
            pool,
            metrics,
            limits,
        }
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Runs one job body to its final outcome and records it in the metrics.
    pub async fn run(&self, body: &[u8]) -> Finished {
        let started = Instant::now();
        let finished = match self.prepare(body) {
            Ok((job, connector)) => Finished {
                outcome: self.publish(&job, &connector).await,
                connector,
            },
            Err((err, connector)) => Finished {
                outcome: Outcome::from(err),
                connector,
            },
        };
        self.metrics.job_finished(
            &finished.connector,
            finished.outcome.exit_code,
            started.elapsed(),
        );
        finished
    }

    /// Decode, merge, validate.
    fn prepare(&self, body: &[u8]) -> Result<(Job, String), (JobError, String)> {
        let params = Params::decode(body).map_err(|err| (err, "none".to_owned()))?;
        if let Some(action) = params.action.as_deref().filter(|action| *action != "send") {
            let message = format!("unknown action {action:?}: the only action is \"send\"");
            return Err((JobError::Invalid(message), "none".to_owned()));
        }
        let (params, connector) = match params.connector.clone() {
            None => (params, "none".to_owned()),
            Some(name) => match self.connectors.get(&name) {
                Some(defaults) => (params.over(defaults), name),
                None => return Err((JobError::UnknownConnector(name), "unknown".to_owned())),
            },
        };
        Job::validate(params, self.limits)
            .map(|job| (job, connector.clone()))
            .map_err(|err| (err, connector))
    }

    /// Publishes until the broker acknowledges, a permanent failure, or the job's timeout.
    async fn publish(&self, job: &Job, connector: &str) -> Outcome {
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
                Ok(Ok(ack)) => return published(job, ack, attempts),
                Ok(Err(err)) if err.is_permanent() => {
                    return Outcome::new(err.exit_code(), err.to_string(), attempts);
                }
                Ok(Err(err)) => err,
                Err(_elapsed) => {
                    return timed_out(job, phase, last_failure, attempts, started.elapsed());
                }
            };
            let delay = backoff.next_delay();
            if tokio::time::Instant::now() + delay >= deadline {
                return gave_up(job, &failure, attempts, started.elapsed());
            }
            tracing::debug!(attempt = attempts, error = %failure, ?delay, "publish failed, will retry");
            self.metrics.retry(connector);
            last_failure = Some(failure);
            tokio::time::sleep(delay).await;
        }
    }

    async fn attempt(&self, job: &Job, phase: &mut Phase) -> Result<Ack, MqttError> {
        let connection = self.pool.lease(&job.target).await?;
        *phase = Phase::AwaitingAck;
        let sent = Instant::now();
        let ack = connection.publish(&job.message).await?;
        self.metrics.publish_acknowledged(ack.qos, sent.elapsed());
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
    if ack.qos < asked {
        message.push_str(&format!(
            "; the broker acknowledged at QoS {} instead of {} (it has no QoS {}): delivered at least once",
            ack.qos.level(),
            asked.level(),
            asked.level()
        ));
    }
    if asked == Qos::AtMostOnce {
        message.push_str("; QoS 0 has no acknowledgement: written to the connection");
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
