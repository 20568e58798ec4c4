//! One job from body to outcome: decode, hold it to the trust boundary, merge with its
//! connector, validate, then publish through the pool with retries and backoff, all inside the
//! job's timeout. Used by the worker for every delivery and by `send` directly.
//!
//! One job cannot harm another: a job whose publish was lost with a connection becomes a
//! *suspect* and retries alone on the next one (the pool's [`Gate`]), so a broker that closes
//! the connection on one message costs the others on it one retry each, and the job lost again
//! while alone is the culprit: it ends 7 after [`CULPRIT_LOSSES`] such losses. The job's
//! deadline counts from when a worker first took it ([`Taken`]), across hand-backs.
//!
//! A stale command is not published ([`crate::expiry`]): a job whose validity (`not-after`,
//! AMQP `timestamp` + `expiration`) has passed ends 9, checked when taken, while it waits for a
//! connection and right before each publish; with MQTT 5 the publish carries the validity left
//! as its Message Expiry Interval.
//!
//! A `request` subscribes to its response topic on the connection it publishes on (SUBACK
//! before the publish), publishes as a `send` does (never again once acknowledged), then waits
//! for the answer within what is left of its timeout, subscribing again on a new connection if
//! the one it waited on is lost; no answer in time is exit-code 10.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use prometheus_client::metrics::histogram::Histogram;
use rand::Rng;
use tokio::time::timeout_at;

use crate::backoff::Backoff;
use crate::connectors::{Connector, ConnectorStore};
use crate::expiry::{self, Check, Validity};
use crate::job::{Job, JobError, Limits, MqttVersion, Params, Qos, Request};
use crate::metrics::{ConnectorMetrics, ExpiredWhen, Metrics, RequestMetrics};
use crate::mqtt::MqttError;
use crate::mqtt::connection::{Ack, AnswerWait, End};
use crate::mqtt::pool::{Gate, Held, Lease, Pool, Suspect, Waited};
use crate::mqtt::responses::{Incoming, Matching};
use crate::outcome::{ExitCode, Outcome, RequestEnd, Response};
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
/// Attempts of one job that may fail uncounted because the connection they waited for ended
/// before they could publish on it (see [`Blame::Unused`]).
const UNUSED_FREE: u32 = 3;
/// Connections lost while this job's publish was alone on them before it is the culprit: one
/// may be a coincidence (a broker restart), two are the broker refusing this message.
const CULPRIT_LOSSES: u32 = 2;
/// A `first_taken` further back than this is not believed: it counts as now.
const ABSURD_AGE: Duration = Duration::from_secs(24 * 3600);

/// Everything a job needs, shared by all jobs of a worker.
#[derive(Clone)]
pub struct Pipeline {
    connectors: Arc<ConnectorStore>,
    /// Metric handles by connector label: every connector's name, `none` and `unknown`.
    labels: Arc<Labels>,
    publish_latency: Arc<[Histogram; 3]>,
    /// Requests by how they ended, answer latency, expired jobs.
    requests: RequestMetrics,
    pool: Pool,
    limits: Limits,
    policy: Arc<Policy>,
    /// Whether a job whose client-id another worker holds may go back to the queue (a worker
    /// that has siblings on its queue) or must wait for it within its timeout (`send`).
    siblings: Option<Siblings>,
}

/// When a job was first taken by a worker and how often it was handed back since: carried by
/// the job across hand-backs (AMQP headers), so its timeout counts from the first taking.
/// Also when its AMQP message expires, if it says ([`expiry::amqp_expiry`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Taken {
    pub first_taken: SystemTime,
    pub handbacks: u32,
    /// The AMQP message's `timestamp` + `expiration`, when it has both.
    pub expires_at: Option<SystemTime>,
    /// Handed back to the worker holding its client-id, yet it came back through the request
    /// queue: nobody consumed it there, the holder is gone (see [`crate::amqp::held`]).
    pub orphaned: bool,
}

impl Taken {
    /// A job taken now for the first time.
    pub fn now() -> Self {
        Self {
            first_taken: SystemTime::now(),
            handbacks: 0,
            expires_at: None,
            orphaned: false,
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
    /// With `requeue_after`: the client-id held elsewhere, and its broker.
    pub held_elsewhere: Option<Held>,
}

/// How long a deferred job is held before it goes back: a moment, so that a job nobody holds
/// the client-id for does not spin through the queue; it goes to the holder directly.
const DEFER_MIN: Duration = Duration::from_millis(100);
const DEFER_MAX: Duration = Duration::from_millis(500);
/// Hand-backs after which a job is no longer handed back: the worker holding it takes the
/// client-id back for it. A hand-back goes to the holder in one hop; a job handed back this
/// often did not find one.
const MAX_HANDBACKS: u32 = 3;
/// Time a hand-back needs besides its delay before its job runs again: a wait in the queue
/// of a holder that is gone (see [`crate::amqp::held::HELD_TTL`]) and the way back. A job with
/// less time left (or half its timeout, if that is less) is not handed back: its worker takes
/// the client-id for it.
const HANDBACK_RESERVE: Duration = Duration::from_millis(3000);

/// What to do after an attempt failed with a transient error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Wait this long, then try again.
    Retry(Duration),
    /// The next attempt would start after the deadline: this failure is the outcome.
    GiveUp,
    /// Hand the job back to the queue (a sibling worker holds its client-id).
    Defer,
    /// Its client-id was held elsewhere until the job's deadline: answer 6.
    HeldTooLong,
}

/// The retry decision, pure: a client-id held elsewhere is deferred where deferring is
/// possible (siblings on the queue) and the job would come back before its deadline;
/// otherwise retry after `delay` unless that passes the deadline, where a client-id still
/// held elsewhere is its own answer.
fn next_after(
    failure: &MqttError,
    may_defer: bool,
    now: tokio::time::Instant,
    deadline: tokio::time::Instant,
    delay: Duration,
) -> Next {
    let held = matches!(failure, MqttError::HeldElsewhere { .. });
    if held && may_defer && now + DEFER_MAX < deadline {
        Next::Defer
    } else if now + delay >= deadline {
        if held {
            Next::HeldTooLong
        } else {
            Next::GiveUp
        }
    } else {
        Next::Retry(delay)
    }
}

/// How much of the job's timeout is left at `now` (wall clock), counted from when a worker
/// first took it. A `first_taken` in the future, or absurdly far back, counts as now.
fn time_left(first_taken: SystemTime, now: SystemTime, timeout: Duration) -> Duration {
    match now.duration_since(first_taken) {
        Ok(age) if age <= ABSURD_AGE => timeout.saturating_sub(age),
        _ => timeout,
    }
}

/// What an attempt's failure says about the job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Blame {
    /// Nothing: the attempt failed before publishing, or not because the broker or the
    /// network ended the connection.
    None,
    /// The connection was lost with this publish and others on it.
    Shared,
    /// The connection was lost while this publish was alone on it.
    Alone,
    /// The connection this attempt waited for ended before it could publish on it: the
    /// attempt did not happen (it goes back through the gate, behind the suspects).
    Unused,
}

/// A failed attempt and what it says about the job.
struct Failed {
    error: MqttError,
    blame: Blame,
}

impl From<MqttError> for Failed {
    fn from(error: MqttError) -> Self {
        Self {
            error,
            blame: Blame::None,
        }
    }
}

/// Why an attempt ended without an acknowledgement.
enum Missed {
    Failed(Failed),
    /// The job's validity passed before it was published: nothing was sent.
    Expired(Validity),
}

impl From<MqttError> for Missed {
    fn from(error: MqttError) -> Self {
        Missed::Failed(error.into())
    }
}

/// A job's validity and when it passes on tokio's clock (`None`: the job never expires).
type Lapse = Option<(Validity, tokio::time::Instant)>;

/// [`Lapse`] as seen at `now` (wall clock).
fn lapse_at(validity: Option<Validity>, now: SystemTime) -> Lapse {
    let validity = validity?;
    let left = match validity.check(now) {
        Check::Valid { left } => left,
        Check::Expired { .. } => Duration::ZERO,
    };
    Some((validity, tokio::time::Instant::now() + left))
}

/// Resolves when the job's validity passes while its attempt has not published yet; an
/// attempt that has published waits for its acknowledgement whatever the validity.
async fn lapse(lapse: Lapse, published: &AtomicBool) -> Validity {
    let Some((validity, at)) = lapse else {
        return std::future::pending().await;
    };
    tokio::time::sleep_until(at).await;
    if published.load(Ordering::Relaxed) {
        std::future::pending::<()>().await;
    }
    validity
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
            requests: metrics.requests(),
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
        // The pool yields a client-id only while there is a sibling to yield it to.
        self.pool.follow_siblings(siblings.clone());
        self.siblings = Some(siblings);
        self
    }

    pub fn pool(&self) -> &Pool {
        &self.pool
    }

    /// Runs one job body to its final outcome and records it in the metrics. `taken` says when
    /// a worker first took the job (its timeout counts from then) and how often it was handed back.
    pub async fn run(&self, body: &[u8], taken: Taken) -> Finished {
        self.run_correlated(body, taken, None).await
    }

    /// [`Pipeline::run`] for a job with an AMQP `correlation_id` (what `{correlation-id}`
    /// stands for, and a MQTT 5 request's Correlation Data unless the job sets its own).
    pub async fn run_correlated(
        &self,
        body: &[u8],
        taken: Taken,
        correlation_id: Option<&str>,
    ) -> Finished {
        let started = Instant::now();
        let (result, label, target) = match self.prepare(body, correlation_id).await {
            Ok((job, label)) => {
                let result = self.publish(&job, label, taken).await;
                if let (Some(_), Ok(outcome)) = (&job.request, &result) {
                    let end = outcome.request_end.unwrap_or(RequestEnd::NotPublished);
                    self.requests.ended(end);
                }
                (result, label, Some(job.target))
            }
            Err((err, label)) => (Ok(Outcome::from(err)), label, None),
        };
        let connector = Arc::clone(&label.name);
        match result {
            Ok(outcome) => {
                label.job_finished(outcome.exit_code, started.elapsed());
                Finished {
                    outcome,
                    connector,
                    requeue_after: None,
                    held_elsewhere: None,
                }
            }
            Err(deferred) => {
                label.deferred();
                let delay = rand::rng().random_range(DEFER_MIN..=DEFER_MAX);
                Finished {
                    outcome: deferred,
                    connector,
                    requeue_after: Some(delay),
                    held_elsewhere: target.map(|target| self.pool.held_by(&target)),
                }
            }
        }
    }

    /// Decode, hold to the trust boundary, merge, validate; also which connector label the
    /// job counts under.
    async fn prepare(&self, body: &[u8], correlation_id: Option<&str>) -> Prepared<'_> {
        let none = &self.labels.none;
        let params = Params::decode(body).map_err(|err| (err, none))?;
        if let Some(action) = params
            .action
            .as_deref()
            .filter(|action| !matches!(*action, "send" | "request"))
        {
            let message =
                format!("unknown action {action:?}: the actions are \"send\" and \"request\"");
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
            .admit(params, connector, correlation_id)
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
        correlation_id: Option<&str>,
    ) -> Result<Job, JobError> {
        if let Some((name, connector)) = connector {
            policy::job_may_set(&params, name, connector)?;
        }
        let params = self.resolve_files(params).await?;
        let mut merged = match connector {
            Some((name, connector)) => {
                policy::secrets_stay_with_broker(&params, name, connector)?;
                params.over(&connector.defaults)
            }
            None => params,
        };
        correlate(&mut merged, correlation_id)?;
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
    async fn publish(
        &self,
        job: &Job,
        label: &ConnectorMetrics,
        taken: Taken,
    ) -> Result<Outcome, Outcome> {
        let started = Instant::now();
        let validity = Validity::of(job.not_after, taken.expires_at);
        if let Some(validity) = validity
            && let Check::Expired { ago } = validity.check(SystemTime::now())
        {
            self.requests.expired(ExpiredWhen::Taken);
            return Ok(expired_when_taken(validity, ago));
        }
        if taken.orphaned {
            // Sent to the holder of its client-id, and nobody took it there: this worker takes
            // the client-id.
            self.pool.take_back(&job.target);
        }
        let left = time_left(taken.first_taken, SystemTime::now(), job.timeout);
        let deadline = tokio::time::Instant::now() + left;
        if left.is_zero() && taken.handbacks > 0 {
            return Ok(held_too_long(job, &self.pool, taken, 0));
        }
        let gate = self.pool.gate(&job.target);
        // Set once the job's publish was lost with a connection: from then on it goes alone.
        let mut suspect: Option<Suspect> = None;
        let mut alone_losses = 0;
        let mut backoff = Backoff::new(FIRST_RETRY_DELAY, MAX_RETRY_DELAY);
        let mut last_failure: Option<MqttError> = None;
        let mut attempts = 0;
        // Whether a publish was ever handed to a connection (then maybe lost unacknowledged).
        let mut ever_sent = false;
        let mut unused = 0;
        loop {
            let lapses = lapse_at(validity, SystemTime::now());
            if let Some((validity, at)) = lapses
                && at <= tokio::time::Instant::now()
            {
                let failure = last_failure.as_ref();
                let tried = Tried::new(attempts, ever_sent, started.elapsed());
                self.requests.expired(ExpiredWhen::Retrying);
                return Ok(expired_retrying(validity, failure, tried));
            }
            attempts += 1;
            let sent = AtomicBool::new(false);
            let alone = suspect.is_some();
            // What the lease waited through (the loss the pool pauses after, while this
            // attempt waits for it to reconnect).
            let mut waited = Waited::default();
            let attempt = tokio::select! {
                attempt = timeout_at(
                    deadline,
                    self.attempt(job, &gate, alone, validity, &sent, &mut waited),
                ) => attempt,
                // Waiting for a connection past the validity: stop, nothing was published.
                validity = lapse(lapses, &sent) => Ok(Err(Missed::Expired(validity))),
            };
            ever_sent |= sent.load(Ordering::Relaxed);
            let phase = if sent.load(Ordering::Relaxed) {
                Phase::AwaitingAck
            } else {
                Phase::Connecting
            };
            let failure = match attempt {
                Ok(Ok((ack, waiting))) => {
                    let published = published(job, ack, attempts, &self.pool);
                    return Ok(match (&job.request, waiting) {
                        (Some(request), Some(waiting)) => {
                            self.await_answer(job, request, published, waiting, deadline)
                                .await
                        }
                        _ => published,
                    });
                }
                Ok(Err(Missed::Expired(validity))) => {
                    let failure = last_failure.as_ref().or(waited.paused.as_ref());
                    let tried = Tried::new(attempts, ever_sent, started.elapsed());
                    self.requests.expired(ExpiredWhen::Retrying);
                    return Ok(expired_retrying(validity, failure, tried));
                }
                Ok(Err(Missed::Failed(Failed { error, .. }))) if error.is_permanent() => {
                    let outcome = Outcome::new(error.exit_code(), error.to_string(), attempts);
                    return Ok(match error {
                        MqttError::SubscribeRefused { .. } => {
                            outcome.ending(RequestEnd::SubscriptionRefused)
                        }
                        _ => outcome,
                    });
                }
                Ok(Err(Missed::Failed(Failed {
                    error,
                    blame: Blame::Unused,
                }))) if unused < UNUSED_FREE => {
                    unused += 1;
                    attempts -= 1;
                    tracing::debug!(%error, "the connection ended before this job could publish on it: not an attempt");
                    last_failure = Some(error);
                    // A moment for the jobs lost with that connection to line up as suspects:
                    // they go before this one.
                    tokio::time::sleep(FIRST_RETRY_DELAY).await;
                    continue;
                }
                Ok(Err(Missed::Failed(Failed { error, mut blame }))) => {
                    // A broker on which nothing ever worked drops every connection: no job's
                    // doing.
                    if blame == Blame::Alone && !self.pool.has_worked(&job.target) {
                        blame = Blame::None;
                    }
                    match blame {
                        Blame::Shared => suspect = suspect.or_else(|| Some(gate.suspect())),
                        Blame::Alone => alone_losses += 1,
                        Blame::None | Blame::Unused => {}
                    }
                    if alone_losses >= CULPRIT_LOSSES {
                        return Ok(culprit(job, &error, attempts, started.elapsed()));
                    }
                    error
                }
                Err(_elapsed) => {
                    tracing::debug!(
                        attempt = attempts,
                        ?phase,
                        alone,
                        "the job's timeout ran out during an attempt"
                    );
                    return Ok(timed_out(
                        job,
                        phase,
                        last_failure.or(waited.paused),
                        attempts,
                        started.elapsed(),
                    ));
                }
            };
            let now = tokio::time::Instant::now();
            // Room for the trip, half the timeout at most (short timeouts hand back too).
            let reserve = HANDBACK_RESERVE.min(job.timeout / 2);
            let may_defer = self.siblings.as_ref().is_some_and(Siblings::present)
                && taken.handbacks < MAX_HANDBACKS
                && now + reserve < deadline;
            let next = next_after(&failure, may_defer, now, deadline, backoff.next_delay());
            if matches!(failure, MqttError::HeldElsewhere { .. }) && matches!(next, Next::Retry(_))
            {
                // Handed back often enough, or too close to its deadline to go round again:
                // this worker takes the client-id for it.
                self.pool.take_back(&job.target);
            }
            match next {
                Next::Defer => {
                    return Err(Outcome::new(
                        failure.exit_code(),
                        failure.to_string(),
                        attempts,
                    ));
                }
                Next::GiveUp => return Ok(gave_up(job, &failure, attempts, started.elapsed())),
                Next::HeldTooLong => {
                    return Ok(held_too_long(job, &self.pool, taken, attempts));
                }
                Next::Retry(delay) => {
                    tracing::debug!(attempt = attempts, error = %failure, ?delay, "publish failed, will retry");
                    label.retry();
                    last_failure = Some(failure);
                    // A validity that passes during the pause ends the job then, not after it.
                    let resume = now + delay;
                    let lapses = lapse_at(validity, SystemTime::now());
                    tokio::time::sleep_until(lapses.map_or(resume, |(_, at)| at.min(resume))).await;
                }
            }
        }
    }

    /// One publish: a turn at the gate (alone for a suspect), a lease, the validity checked
    /// once more, the acknowledgement. `published` is set once the message is handed over.
    async fn attempt(
        &self,
        job: &Job,
        gate: &Gate,
        alone: bool,
        validity: Option<Validity>,
        published: &AtomicBool,
        waited: &mut Waited,
    ) -> Result<(Ack, Option<Waiting>), Missed> {
        let (_alone_turn, _turn) = if alone {
            (Some(gate.alone().await), None)
        } else {
            (None, Some(gate.ordinary().await))
        };
        let connection = match self.pool.lease_noting(&job.target, waited).await {
            Ok(connection) => connection,
            Err(error) if waited.ended_first => {
                return Err(Missed::Failed(Failed {
                    error,
                    blame: Blame::Unused,
                }));
            }
            Err(error) => return Err(error.into()),
        };
        let message = match validity.map(|validity| (validity, validity.check(SystemTime::now()))) {
            None => Cow::Borrowed(&job.message),
            Some((validity, Check::Expired { .. })) => return Err(Missed::Expired(validity)),
            // The broker is told too, so it does not hand the message to a subscriber late.
            Some((_, Check::Valid { left })) if job.target.version == MqttVersion::V5 => {
                let secs = expiry::message_expiry(left, job.message.properties.message_expiry);
                Cow::Owned(job.message.with_message_expiry(secs))
            }
            Some((_, Check::Valid { .. })) => Cow::Borrowed(&job.message),
        };
        // A request has its SUBACK before it publishes: no answer can come before it listens.
        let wait = match &job.request {
            Some(request) => Some(
                connection
                    .await_answer(request.response_topic.as_str(), matching(request))
                    .await?,
            ),
            None => None,
        };
        published.store(true, Ordering::Relaxed);
        let sent = Instant::now();
        // No stall timer of our own: the connection gives itself up when the broker owes an
        // answer and stays silent for the keep-alive (see mqtt::connection::health), which a
        // large payload or a small Receive Maximum does not trip.
        connection.set_alone(alone);
        let ack = match connection.publish(&message).await {
            // The client may fail its publishes before the event loop has recorded why the
            // connection ended: only a close of ours or a takeover is no loss of this job's.
            Err(error @ MqttError::PublishLost { .. })
                if !matches!(connection.end(), Some(End::Closed | End::TakenOver(_))) =>
            {
                // Left marked alone: the pool attributes the loss to this job.
                let blame = if alone { Blame::Alone } else { Blame::Shared };
                return Err(Missed::Failed(Failed { error, blame }));
            }
            result => {
                connection.set_alone(false);
                result?
            }
        };
        self.publish_latency[usize::from(ack.qos.level())].observe(sent.elapsed().as_secs_f64());
        #[cfg(feature = "soak-faults")]
        if crate::fault::double_publish() {
            // The job keeps the first acknowledgement; the copy only has to reach subscribers.
            let _twice = connection.publish(&message).await;
        }
        // The lease is kept while the job waits: a connection with answers awaited is busy, so
        // idle eviction and `--max-connections` never close it under the job.
        Ok((ack, wait.map(|wait| (connection, wait))))
    }

    /// A request published and acknowledged: waits for its answer until `deadline`, on the
    /// connection it published on and, once that is lost, on new ones (subscribing again) while
    /// time is left. Never publishes again.
    async fn await_answer(
        &self,
        job: &Job,
        request: &Request,
        published: Outcome,
        waiting: Waiting,
        deadline: tokio::time::Instant,
    ) -> Outcome {
        let acked_at = Instant::now();
        let mut held = Some(waiting);
        let mut backoff = Backoff::new(FIRST_RETRY_DELAY, MAX_RETRY_DELAY);
        let mut losses = 0u32;
        let mut last_failure: Option<MqttError> = None;
        loop {
            let (lease, mut wait) = match held.take() {
                Some(held) => held,
                None => match timeout_at(deadline, self.resubscribe(job, request)).await {
                    Ok(Ok(held)) => {
                        backoff = Backoff::new(FIRST_RETRY_DELAY, MAX_RETRY_DELAY);
                        held
                    }
                    Ok(Err(failure)) => {
                        tracing::debug!(error = %failure, "subscribing again failed");
                        last_failure = Some(failure);
                        let resume = tokio::time::Instant::now() + backoff.next_delay();
                        if resume >= deadline {
                            let waited = acked_at.elapsed();
                            return no_answer(
                                job,
                                request,
                                published,
                                waited,
                                losses,
                                last_failure,
                            );
                        }
                        tokio::time::sleep_until(resume).await;
                        continue;
                    }
                    Err(_elapsed) => {
                        let waited = acked_at.elapsed();
                        return no_answer(job, request, published, waited, losses, last_failure);
                    }
                },
            };
            match timeout_at(deadline, wait.answer()).await {
                Ok(Some(answer)) => {
                    drop(wait);
                    drop(lease);
                    return self.answered(published, answer, acked_at.elapsed());
                }
                Ok(None) => {
                    losses += 1;
                    last_failure = Some(lease.lost());
                    tracing::debug!(
                        "connection lost while waiting for an answer; subscribing again"
                    );
                }
                Err(_elapsed) => {
                    let waited = acked_at.elapsed();
                    return no_answer(job, request, published, waited, losses, last_failure);
                }
            }
        }
    }

    /// A lease on a working connection to the job's broker and the job's wait on it, subscribed.
    async fn resubscribe(&self, job: &Job, request: &Request) -> Result<Waiting, MqttError> {
        let lease = self.pool.lease(&job.target).await?;
        let wait = lease
            .await_answer(request.response_topic.as_str(), matching(request))
            .await?;
        Ok((lease, wait))
    }

    /// The answer in the reply, or 10 when it is over `--max-response-bytes`.
    fn answered(&self, published: Outcome, answer: Incoming, waited: Duration) -> Outcome {
        self.requests.answered_after(waited);
        let size = answer.payload.len();
        let max = self.limits.max_response_bytes;
        if size > max {
            return Outcome::new(
                ExitCode::NoResponse,
                format!(
                    "{}; the answer on {} came after {} ms but is {size} bytes, over this \
                     worker's --max-response-bytes of {max}: not kept",
                    published.message,
                    answer.topic,
                    waited.as_millis()
                ),
                published.attempts,
            )
            .ending(RequestEnd::TooLarge);
        }
        let message = format!(
            "{}; answered on {} after {} ms ({size} bytes)",
            published.message,
            answer.topic,
            waited.as_millis()
        );
        let mut outcome = Outcome::new(ExitCode::Published, message, published.attempts)
            .ending(RequestEnd::Answered);
        outcome.response = Some(Response::new(
            answer.topic,
            &answer.payload,
            answer.content_type,
            answer.user_properties,
        ));
        outcome
    }
}

/// A request's connection (held, so the pool counts it busy) and its wait for the answer.
type Waiting = (Lease, AnswerWait);

/// How a request's answer is recognised: MQTT 5 by its Correlation Data, 3.1.1 as the first
/// message on the topic.
fn matching(request: &Request) -> Matching {
    match &request.correlation {
        Some(data) => Matching::Correlation(data.clone()),
        None => Matching::First,
    }
}

/// What `{correlation-id}` is replaced with in a response topic.
const CORRELATION_ID: &str = "{correlation-id}";

/// Puts the job's correlation id (the AMQP one, or one made here) where the job needs it:
/// `{correlation-id}` in `response-topic`, and with MQTT 5 the Correlation Data when the job
/// sets none (a request's answer is recognised by it; a `send` that names its response topic by
/// the id tells the device the same). An id that cannot stand in a topic level is an invalid
/// job.
fn correlate(params: &mut Params, correlation_id: Option<&str>) -> Result<(), JobError> {
    let in_topic = params
        .response_topic
        .as_deref()
        .is_some_and(|topic| topic.contains(CORRELATION_ID));
    let is_v5 = MqttVersion::parse(params.mqtt_version.clone()) == Ok(MqttVersion::V5);
    let as_data = (in_topic || params.action.as_deref() == Some("request"))
        && is_v5
        && params.correlation_data.is_none();
    if !in_topic && !as_data {
        return Ok(());
    }
    let id = match correlation_id {
        Some(id) => id.to_owned(),
        None => uuid::Uuid::new_v4().simple().to_string(),
    };
    if in_topic {
        if let Some(bad) = id.chars().find(|c| matches!(c, '/' | '+' | '#' | '\0')) {
            return Err(JobError::Invalid(format!(
                "the correlation id {:?} holds {bad:?}, which cannot stand in the response topic's \
                 {CORRELATION_ID} (no '/', '+', '#' or U+0000)",
                id.chars().take(200).collect::<String>()
            )));
        }
        params.response_topic = params
            .response_topic
            .take()
            .map(|topic| topic.replace(CORRELATION_ID, &id));
    }
    if as_data {
        params.correlation_data = Some(id);
    }
    Ok(())
}

/// A request that got no usable answer in time: 10, saying how long it waited.
fn no_answer(
    job: &Job,
    request: &Request,
    published: Outcome,
    waited: Duration,
    losses: u32,
    last_failure: Option<MqttError>,
) -> Outcome {
    let mut message = format!(
        "{}; no answer on {} within the job's {} ms timeout (waited {} ms after the \
         acknowledgement; the command was published once and not repeated)",
        published.message,
        request.response_topic.as_str(),
        job.timeout.as_millis(),
        waited.as_millis()
    );
    if losses > 0 {
        message.push_str(&format!(
            "; the connection was lost {losses} time(s) during the wait"
        ));
    }
    if let Some(failure) = last_failure {
        message.push_str(&format!("; last: {failure}"));
    }
    Outcome::new(ExitCode::NoResponse, message, published.attempts).ending(RequestEnd::NoAnswer)
}

/// Where an attempt was when the timeout ran out.
#[derive(Debug, Clone, Copy)]
enum Phase {
    Connecting,
    AwaitingAck,
}

fn published(job: &Job, ack: Ack, attempts: u32, pool: &Pool) -> Outcome {
    let asked = job.message.qos;
    let target = &job.target;
    let mut message = format!(
        "published to {} on {} as {} (qos {})",
        job.message.topic.as_str(),
        target.broker,
        pool.client_id(target),
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

/// The job whose publish the broker answered by closing the connection, each time, also alone.
fn culprit(job: &Job, failure: &MqttError, attempts: u32, elapsed: Duration) -> Outcome {
    Outcome::new(
        ExitCode::PublishFailed,
        format!(
            "the broker closed the connection each time this message was published, also with \
             nothing else in flight on it ({attempts} attempts in {} ms): {} refuses this \
             message (a topic or payload its policy denies?); the other jobs went on. Last: {failure}",
            elapsed.as_millis(),
            job.target.broker
        ),
        attempts,
    )
}

/// The job whose validity had passed when it was taken.
fn expired_when_taken(validity: Validity, ago: Duration) -> Outcome {
    Outcome::new(
        ExitCode::Expired,
        format!(
            "expired: {} had passed {} before the job was taken; nothing published",
            validity.describe(),
            // Milliseconds say how close it was; beyond a few seconds they only get in the way.
            if ago < Duration::from_secs(10) {
                format!("{} ms", ago.as_millis())
            } else {
                format!("{} s", ago.as_secs())
            }
        ),
        0,
    )
}

/// What a job had tried when it stopped.
struct Tried {
    attempts: u32,
    /// A publish was handed to a connection (and lost unacknowledged) at least once.
    ever_sent: bool,
    elapsed: Duration,
}

impl Tried {
    fn new(attempts: u32, ever_sent: bool, elapsed: Duration) -> Self {
        Self {
            attempts,
            ever_sent,
            elapsed,
        }
    }
}

/// The job whose validity passed while it waited for a connection or a retry.
fn expired_retrying(validity: Validity, last_failure: Option<&MqttError>, tried: Tried) -> Outcome {
    let Tried {
        attempts,
        ever_sent,
        elapsed,
    } = tried;
    let tries = if attempts == 1 { "attempt" } else { "attempts" };
    let published = if ever_sent {
        "no publish was acknowledged and none is made again"
    } else {
        "nothing published"
    };
    let last = last_failure.map_or_else(String::new, |failure| format!(". Last: {failure}"));
    Outcome::new(
        ExitCode::Expired,
        format!(
            "expired: {} passed while the job was still trying ({attempts} {tries} in {} ms); \
             {published}{last}",
            validity.describe(),
            elapsed.as_millis()
        ),
        attempts,
    )
}

/// The job whose client-id another connection held until the job's deadline.
fn held_too_long(job: &Job, pool: &Pool, taken: Taken, attempts: u32) -> Outcome {
    let handbacks = taken.handbacks;
    let s = if handbacks == 1 { "" } else { "s" };
    Outcome::new(
        ExitCode::Timeout,
        format!(
            "the client-id {} on {} was held by another connection for the job's whole \
             timeout of {} ms ({handbacks} hand-back{s})",
            pool.client_id(&job.target),
            job.target.broker,
            job.timeout.as_millis()
        ),
        attempts,
    )
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

    fn request(extra: serde_json::Value) -> Params {
        let mut body = serde_json::json!({"action": "request", "response-topic": "dev/{correlation-id}/answer"});
        if let (Some(body), Some(extra)) = (body.as_object_mut(), extra.as_object()) {
            body.extend(extra.clone());
        }
        Params::decode(body.to_string().as_bytes()).expect("params")
    }

    #[test]
    fn the_amqp_correlation_id_takes_the_place_of_the_placeholder() {
        let mut params = request(serde_json::json!({}));
        correlate(&mut params, Some("abc-1")).expect("ok");
        assert_eq!(params.response_topic.as_deref(), Some("dev/abc-1/answer"));
        // 3.1.1: no Correlation Data.
        assert_eq!(params.correlation_data, None);
    }

    #[test]
    fn without_an_amqp_correlation_id_the_worker_makes_one_and_sends_it_as_correlation_data() {
        let mut params = request(serde_json::json!({"mqtt-version": "5"}));
        correlate(&mut params, None).expect("ok");
        let id = params.correlation_data.clone().expect("made");
        assert_eq!(
            params.response_topic.as_deref(),
            Some(format!("dev/{id}/answer").as_str())
        );
    }

    #[test]
    fn the_jobs_own_correlation_data_is_kept() {
        let mut params =
            request(serde_json::json!({"mqtt-version": 5, "correlation-data": "mine"}));
        correlate(&mut params, Some("amqp")).expect("ok");
        assert_eq!(params.correlation_data.as_deref(), Some("mine"));
        assert_eq!(params.response_topic.as_deref(), Some("dev/amqp/answer"));
    }

    #[test]
    fn a_correlation_id_that_cannot_stand_in_a_topic_is_an_invalid_job() {
        for bad in ["a/b", "a+", "#", "a\0b"] {
            let mut params = request(serde_json::json!({}));
            let err = correlate(&mut params, Some(bad)).expect_err(bad);
            assert!(matches!(err, JobError::Invalid(_)), "{bad}");
        }
    }

    #[test]
    fn an_mqtt_5_send_naming_its_response_topic_by_the_id_carries_it_as_correlation_data() {
        let mut params =
            Params::decode(br#"{"mqtt-version": "5", "response-topic": "r/{correlation-id}"}"#)
                .expect("params");
        correlate(&mut params, Some("c-9")).expect("ok");
        assert_eq!(params.response_topic.as_deref(), Some("r/c-9"));
        assert_eq!(params.correlation_data.as_deref(), Some("c-9"));
    }

    #[test]
    fn a_send_without_the_placeholder_is_left_as_it_is() {
        let mut params = Params::decode(br#"{"mqtt-version": "5"}"#).expect("params");
        correlate(&mut params, Some("a/b")).expect("ok");
        assert_eq!(params.correlation_data, None);
    }

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
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_id_held_elsewhere_past_the_deadline_is_answered_not_handed_back_again() {
        let start = tokio::time::Instant::now();
        let deadline = start + Duration::from_secs(10);
        let delay = Duration::from_millis(100);
        // Close to the deadline, a hand-back would come back too late: wait here instead.
        tokio::time::advance(Duration::from_secs(10) - DEFER_MAX).await;
        let near = tokio::time::Instant::now();
        assert_eq!(
            next_after(&held(), true, near, deadline, delay),
            Next::Retry(delay)
        );
        tokio::time::advance(DEFER_MAX).await;
        let late = tokio::time::Instant::now();
        for may_defer in [true, false] {
            assert_eq!(
                next_after(&held(), may_defer, late, deadline, delay),
                Next::HeldTooLong
            );
        }
        // Other failures at the deadline are simply the outcome.
        assert_eq!(
            next_after(&lost(), true, late, deadline, delay),
            Next::GiveUp
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_passing_validity_stops_an_attempt_that_has_not_published_and_not_one_that_has() {
        let soon = Validity::of(Some(SystemTime::now() + Duration::from_secs(2)), None);
        let lapses = lapse_at(soon, SystemTime::now());
        let within = Duration::from_secs(3);
        let published = AtomicBool::new(false);
        let stopped = tokio::time::timeout(within, lapse(lapses, &published)).await;
        assert_eq!(
            stopped.ok().map(|v| v.source),
            Some(expiry::Source::NotAfter)
        );
        published.store(true, Ordering::Relaxed);
        assert!(
            tokio::time::timeout(within, lapse(lapses, &published))
                .await
                .is_err()
        );
        let never = lapse_at(None, SystemTime::now());
        let unpublished = AtomicBool::new(false);
        assert!(
            tokio::time::timeout(within, lapse(never, &unpublished))
                .await
                .is_err()
        );
    }

    #[test]
    fn the_deadline_counts_from_the_first_taking_and_a_first_taking_in_the_future_or_absurd_is_now()
    {
        let now = SystemTime::now();
        let timeout = Duration::from_secs(20);
        let secs = Duration::from_secs;
        assert_eq!(time_left(now - secs(5), now, timeout), secs(15));
        assert_eq!(time_left(now - secs(25), now, timeout), Duration::ZERO);
        assert_eq!(time_left(now + secs(3600), now, timeout), timeout);
        assert_eq!(time_left(SystemTime::UNIX_EPOCH, now, timeout), timeout);
        assert_eq!(time_left(now, now, timeout), timeout);
    }
}
