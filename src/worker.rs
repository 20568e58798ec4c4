//! The worker: consume deliveries, run each job through the [`Pipeline`], reply, settle.
//! Consumes from one node of the cluster at a time and moves on to the next that answers, with
//! backoff, whenever its session ends (node lost, consumer cancelled). On shutdown it stops
//! consuming, lets the jobs in flight finish until one deadline (`grace_period` after the
//! shutdown request), cancels those still running (RabbitMQ redelivers them), and closes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::BasicCancelOptions;
use rand::Rng;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::amqp::consumer::{self, Session, SessionError};
use crate::amqp::nodes::{Nodes, NodesError};
use crate::amqp::queue::{QueueError, QueueSettings, QueueType};
use crate::amqp::settler::{Settler, SettlerTask};
use crate::amqp::tls::TlsFiles;
use crate::amqp::{self, handback, replier};
use crate::backoff::Backoff;
use crate::connectors::{ConnectorError, ConnectorStore};
use crate::http::{self, Readiness};
use crate::job::Limits;
use crate::metrics::Metrics;
use crate::mqtt::connection::ConnectionSettings;
use crate::mqtt::pool::Pool;
use crate::outcome::Reply;
use crate::pipeline::{Pipeline, Siblings, Taken};
use crate::policy::Policy;
use crate::settle::{ReplyStatus, Settlement, settle};

/// How long the acks of finished jobs may take to leave when a session is retired.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// After the deadline, how long cancelled jobs and their sessions may take to wind down.
const WIND_DOWN: Duration = Duration::from_secs(5);
/// Reconnect backoff: first delay and cap.
const RECONNECT_FIRST: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(15);
/// A session that lasted this long was healthy: the next reconnect starts the backoff afresh.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);
/// How long a worker stops consuming after handing a job back to the queue for the worker that
/// holds its client-id (jittered, so a fleet does not resume together).
const PAUSE_MIN: Duration = Duration::from_secs(2);
const PAUSE_MAX: Duration = Duration::from_secs(4);

/// Everything a worker is configured with.
#[derive(Clone)]
pub struct WorkerOptions {
    /// One RabbitMQ URL, or a comma-separated list of one cluster's nodes.
    pub amqp_url: String,
    /// TLS files for `amqps://` URLs.
    pub amqp_tls: TlsFiles,
    pub queue: String,
    /// The type with which a missing request queue is declared.
    pub queue_type: QueueType,
    /// Quorum only: deliveries after which a job is dead-lettered.
    pub delivery_limit: Option<u32>,
    /// Declared with a missing request queue, which dead-letters into it.
    pub dead_letter_queue: Option<String>,
    pub connectors_dir: PathBuf,
    /// Unacknowledged deliveries RabbitMQ hands this worker at once: its concurrency.
    pub prefetch: u16,
    pub metrics_addr: Option<SocketAddr>,
    /// MQTT connections unused this long are closed.
    pub idle_timeout: Duration,
    /// How long jobs in flight may take to finish after SIGTERM; then they are cancelled.
    pub grace_period: Duration,
    pub limits: Limits,
    pub mqtt: ConnectionSettings,
    /// What jobs may make this worker do: brokers, files.
    pub policy: Policy,
    /// MQTT connections held open at most.
    pub max_connections: usize,
}

impl WorkerOptions {
    pub fn new(
        amqp_url: impl Into<String>,
        queue: impl Into<String>,
        connectors_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            amqp_url: amqp_url.into(),
            amqp_tls: TlsFiles::default(),
            queue: queue.into(),
            queue_type: QueueType::Classic,
            delivery_limit: None,
            dead_letter_queue: None,
            connectors_dir: connectors_dir.into(),
            prefetch: 256,
            metrics_addr: None,
            idle_timeout: Duration::from_secs(300),
            grace_period: Duration::from_secs(30),
            limits: Limits::default(),
            mqtt: ConnectionSettings::default(),
            policy: Policy::default(),
            max_connections: crate::mqtt::pool::DEFAULT_MAX_CONNECTIONS,
        }
    }

    /// How the request queue is declared if missing.
    pub fn queue_settings(&self) -> QueueSettings {
        QueueSettings {
            name: self.queue.clone(),
            queue_type: self.queue_type,
            delivery_limit: self.delivery_limit,
            dead_letter_queue: self.dead_letter_queue.clone(),
        }
    }
}

/// The AMQP URL's password stays out of any debug output.
impl std::fmt::Debug for WorkerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerOptions")
            .field("amqp_url", &amqp::redact_urls(&self.amqp_url))
            .field("amqp_tls", &self.amqp_tls)
            .field("queue", &self.queue)
            .field("queue_type", &self.queue_type)
            .field("delivery_limit", &self.delivery_limit)
            .field("dead_letter_queue", &self.dead_letter_queue)
            .field("connectors_dir", &self.connectors_dir)
            .field("prefetch", &self.prefetch)
            .field("metrics_addr", &self.metrics_addr)
            .field("idle_timeout", &self.idle_timeout)
            .field("grace_period", &self.grace_period)
            .field("limits", &self.limits)
            .field("mqtt", &self.mqtt)
            .field("policy", &self.policy)
            .field("max_connections", &self.max_connections)
            .finish()
    }
}

/// Why a worker could not start.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Connectors(#[from] ConnectorError),
    #[error(transparent)]
    Nodes(#[from] NodesError),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("cannot serve metrics on {addr}")]
    Metrics {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// A worker that has loaded its connectors and bound its HTTP endpoint, ready to [`Worker::run`].
pub struct Worker {
    options: WorkerOptions,
    nodes: Nodes,
    queue: QueueSettings,
    pipeline: Pipeline,
    metrics: Metrics,
    readiness: Readiness,
    metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    /// Cancelled at the shutdown deadline: every job still running stops where it is.
    jobs_cancel: CancellationToken,
    /// Signalled by a job handed back to the queue (another worker holds its client-id): the
    /// session stops consuming for a moment, so the queue's jobs flow to that worker.
    deferred: Arc<Notify>,
    /// Stops the HTTP endpoint when the worker is done (dropped), not at `shutdown`: while
    /// it drains, `/healthz` still answers 200, `/readyz` 503 and `/metrics` shows the drain.
    http_stop: CancellationToken,
}

/// What ended a session.
enum SessionEnd {
    /// Shutdown was requested: stop.
    Shutdown,
    /// RabbitMQ ended it: consume again, from `next_node`.
    Lost {
        error: SessionError,
        next_node: usize,
        lasted: Duration,
    },
}

impl Worker {
    /// Loads the connectors (a bad file stops the start), reads the TLS files, checks the queue
    /// settings and binds `/metrics`.
    pub async fn start(
        options: WorkerOptions,
        shutdown: CancellationToken,
    ) -> Result<Worker, WorkerError> {
        let connectors = Arc::new(ConnectorStore::load(&options.connectors_dir)?);
        let queue = options.queue_settings();
        queue.validate()?;
        let (urls, tls) = (options.amqp_url.clone(), options.amqp_tls.clone());
        // Certificate files are read off the runtime threads.
        let nodes = match tokio::task::spawn_blocking(move || Nodes::parse(&urls, &tls)).await {
            Ok(parsed) => parsed?,
            Err(join) => std::panic::resume_unwind(join.into_panic()),
        };
        let nodes = nodes.with_connection_name(format!("mqtt-connector worker {}", queue.name));
        if queue.queue_type == QueueType::Quorum
            && queue.delivery_limit.is_some()
            && queue.dead_letter_queue.is_none()
        {
            tracing::warn!(
                queue = %queue.name,
                "--delivery-limit without --dead-letter-queue: unless the queue has a dead-letter exchange of its own, RabbitMQ drops jobs over the limit"
            );
        }
        let metrics = Metrics::new();
        let readiness = Readiness::default();
        let http_stop = CancellationToken::new();
        let metrics_addr = match options.metrics_addr {
            Some(addr) => Some(
                http::serve(addr, metrics.clone(), readiness.clone(), http_stop.clone())
                    .await
                    .map_err(|source| WorkerError::Metrics { addr, source })?,
            ),
            None => None,
        };
        metrics.name_brokers(
            connectors
                .iter()
                .filter_map(|(_, connector)| connector.broker.as_ref().map(ToString::to_string)),
        );
        let pool = Pool::new(
            options.mqtt.clone(),
            options.idle_timeout,
            options.max_connections,
            metrics.clone(),
        );
        let pipeline = Pipeline::new(
            connectors.clone(),
            pool,
            metrics.clone(),
            options.limits,
            options.policy.clone(),
        )
        .deferring({
            // Until the worker watches its queue's consumers, assume siblings (the old behaviour).
            let siblings = Siblings::default();
            siblings.set(true);
            siblings
        });
        tracing::info!(
            connectors = connectors.len(),
            queue = %options.queue,
            amqp = %nodes.shown_all(),
            metrics = ?metrics_addr,
            "worker started"
        );
        Ok(Worker {
            options,
            nodes,
            queue,
            pipeline,
            metrics,
            readiness,
            metrics_addr,
            shutdown,
            jobs_cancel: CancellationToken::new(),
            deferred: Arc::new(Notify::new()),
            http_stop,
        })
    }

    /// The address `/metrics` is served on, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Consumes until the shutdown token is cancelled, then drains and returns: the jobs in
    /// flight get until `grace_period` after the shutdown request, then are cancelled.
    pub async fn run(self) {
        // Every session's retirement (its jobs, its last acks, closing its connection).
        let sessions = TaskTracker::new();
        let mut backoff = Backoff::new(RECONNECT_FIRST, RECONNECT_MAX);
        let mut next_node = 0;
        while !self.shutdown.is_cancelled() {
            let opened = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                opened = Session::open(&self.nodes, next_node, &self.queue, self.options.prefetch) => opened,
            };
            let delay = match opened {
                Ok(session) => match self.consume(session, &sessions).await {
                    SessionEnd::Shutdown => break,
                    SessionEnd::Lost {
                        error,
                        next_node: next,
                        lasted,
                    } => {
                        next_node = next;
                        if lasted >= HEALTHY_SESSION {
                            backoff = Backoff::new(RECONNECT_FIRST, RECONNECT_MAX);
                        }
                        let delay = backoff.next_delay();
                        tracing::warn!(error = %amqp::error_chain(&error), retry_in = ?delay, "stopped consuming from RabbitMQ");
                        delay
                    }
                },
                Err(error) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %amqp::error_chain(&error), retry_in = ?delay, "not consuming from RabbitMQ");
                    delay
                }
            };
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
            }
        }
        self.set_ready(false);
        // One deadline for everything in flight, counted from the shutdown request.
        let deadline = tokio::time::Instant::now() + self.options.grace_period;
        sessions.close();
        if tokio::time::timeout_at(deadline, sessions.wait())
            .await
            .is_err()
        {
            tracing::warn!(grace = ?self.options.grace_period, "jobs still running at the end of the grace period: cancelled, RabbitMQ will redeliver them");
            self.jobs_cancel.cancel();
            if tokio::time::timeout(WIND_DOWN, sessions.wait())
                .await
                .is_err()
            {
                tracing::warn!("sessions did not close in time");
            }
        }
        self.pipeline.pool().close_all();
        tracing::info!("worker stopped");
    }

    /// Runs one session until RabbitMQ ends it or shutdown is requested. Either way the session
    /// is handed to a retiring task (in `sessions`) that waits for its jobs, sends their acks
    /// and closes its connection.
    async fn consume(&self, session: Session, sessions: &TaskTracker) -> SessionEnd {
        let Session {
            connection,
            channel,
            mut consumer,
            node,
        } = session;
        let opened = Instant::now();
        self.set_ready(true);
        tracing::info!(queue = %self.options.queue, node = %self.nodes.shown(node), prefetch = self.options.prefetch, "consuming");
        let (settler, settler_task) = Settler::start(channel.clone());
        let jobs = TaskTracker::new();
        let queue_name: Arc<str> = Arc::from(self.queue.name.as_str());
        let spawn = |delivery: Delivery| {
            settler.taken(delivery.delivery_tag);
            let job = Job {
                delivery,
                channel: channel.clone(),
                settler: settler.clone(),
                pipeline: self.pipeline.clone(),
                metrics: self.metrics.clone(),
                cancel: self.jobs_cancel.clone(),
                deferred: Arc::clone(&self.deferred),
                queue: Arc::clone(&queue_name),
            };
            jobs.spawn(job.run());
        };
        let ended = loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break None,
                _ = self.deferred.notified() => {
                    match self.pause(&channel, &mut consumer, &spawn).await {
                        Ok(true) => {}
                        Ok(false) => break None,
                        Err(err) => break Some(err),
                    }
                }
                delivery = consumer.next() => match delivery {
                    Some(Ok(delivery)) => spawn(delivery),
                    Some(Err(err)) => break Some(SessionError::Consumer(err)),
                    // The stream ends without our asking: RabbitMQ cancelled the consumer.
                    None => break Some(SessionError::Cancelled),
                },
            }
        };
        self.set_ready(false);
        let next_node = ended.as_ref().map_or(node, |error| next_node(node, error));
        if ended.is_none() {
            // Stop deliveries; the jobs we hold finish (their replies and acks need this
            // channel); deliveries prefetched but not started go back when it closes.
            let cancel = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default());
            let _ = tokio::time::timeout(consumer::CLOSE_TIMEOUT, cancel).await;
        }
        drop(consumer);
        sessions.spawn(retire(jobs, settler, settler_task, connection));
        match ended {
            None => SessionEnd::Shutdown,
            Some(error) => SessionEnd::Lost {
                error,
                next_node,
                lasted: opened.elapsed(),
            },
        }
    }

    /// Stops consuming for a moment after a job went back to the queue because another worker
    /// holds its client-id: without it, this worker would keep taking those jobs from the
    /// queue (its prefetch) and handing them back, and the holder would get few of them.
    /// Deliveries already on their way are run; `Ok(false)` when shutdown came meanwhile.
    async fn pause(
        &self,
        channel: &Channel,
        consumer: &mut lapin::Consumer,
        spawn: &impl Fn(Delivery),
    ) -> Result<bool, SessionError> {
        let cancel = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default());
        let _ = tokio::time::timeout(consumer::CLOSE_TIMEOUT, cancel).await;
        // What RabbitMQ sent before the cancel still has to be run (and settled).
        let drained = async {
            while let Some(Ok(delivery)) = consumer.next().await {
                spawn(delivery);
            }
        };
        let _ = tokio::time::timeout(consumer::CLOSE_TIMEOUT, drained).await;
        let pause = rand::rng().random_range(PAUSE_MIN..=PAUSE_MAX);
        tracing::debug!(
            ?pause,
            "jobs went back to the queue for the worker holding their client-id: not consuming for a moment"
        );
        tokio::select! {
            _ = self.shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(pause) => {}
        }
        *consumer = consumer::resume(channel, &self.queue).await?;
        Ok(true)
    }

    fn set_ready(&self, ready: bool) {
        self.readiness.set(ready);
        self.metrics.set_consumer_up(ready);
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.http_stop.cancel();
    }
}

/// Where to consume next after a session on `node` ended with `error`: the same node when only
/// the consumer went (queue deleted, leader lost: the connection still works), else the next.
fn next_node(node: usize, error: &SessionError) -> usize {
    match error {
        SessionError::Cancelled => node,
        _ => node + 1,
    }
}

/// A session that ended: once its jobs are over (finished, or cancelled at the shutdown
/// deadline), send their acks and close its connection, so no connection and no settling task
/// outlives it.
async fn retire(
    jobs: TaskTracker,
    settler: Settler,
    settler_task: SettlerTask,
    connection: lapin::Connection,
) {
    jobs.close();
    jobs.wait().await;
    settler_task.finish(settler, SETTLE_TIMEOUT).await;
    consumer::close(&connection, "session over").await;
}

/// One delivery and what it needs to run, reply and settle.
struct Job {
    deferred: Arc<Notify>,
    /// The request queue, where a job handed back goes.
    queue: Arc<str>,
    delivery: Delivery,
    channel: Channel,
    settler: Settler,
    pipeline: Pipeline,
    metrics: Metrics,
    cancel: CancellationToken,
}

impl Job {
    /// Runs the job in its own span (every line it logs carries its correlation id); cancelled
    /// at the shutdown deadline, it sends no reply and settles nothing (RabbitMQ redelivers it).
    async fn run(self) {
        let correlation_id = self
            .delivery
            .properties
            .correlation_id()
            .as_ref()
            .map(|id| id.as_str().to_owned())
            .unwrap_or_default();
        let span = tracing::info_span!("job", correlation_id = %correlation_id);
        let cancel = self.cancel.clone();
        let metrics = self.metrics.clone();
        metrics.jobs_in_flight().inc();
        async move {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    tracing::warn!("cancelled at the end of the grace period; RabbitMQ will redeliver it");
                }
                _ = self.handle() => {}
            }
        }
        .instrument(span)
        .await;
        metrics.jobs_in_flight().dec();
    }

    /// Run the job, reply, settle.
    async fn handle(self) {
        let started = Instant::now();
        // The AMQP message's timestamp + expiration: a stale command is not published (9).
        let taken = Taken {
            expires_at: crate::expiry::amqp_expiry(&self.delivery.properties),
            ..Taken::now()
        };
        let properties = &self.delivery.properties;
        let correlation_id = properties.correlation_id().as_ref().map(|id| id.as_str());
        let finished = self
            .pipeline
            .run_correlated(&self.delivery.data, taken, correlation_id)
            .await;
        if let Some(delay) = finished.requeue_after {
            // Not final: back to the queue, unanswered, for the worker holding the client-id.
            tracing::debug!(requeue_in = ?delay, "{}", finished.outcome.message);
            self.deferred.notify_one();
            tokio::time::sleep(delay).await;
            let settlement =
                if handback::hand_back(&self.channel, &self.queue, &self.delivery).await {
                    Settlement::Ack
                } else {
                    Settlement::Requeue
                };
            self.settler.settle(self.delivery.delivery_tag, settlement);
            return;
        }
        let reply_status = match properties.reply_to() {
            Some(reply_to) => {
                let body = Reply::new(&finished.outcome, started.elapsed()).to_json();
                replier::reply(&self.channel, reply_to.as_str(), correlation_id, &body).await
            }
            None => ReplyStatus::NotRequested,
        };
        let settlement = settle(finished.outcome.exit_code, reply_status);
        self.settler.settle(self.delivery.delivery_tag, settlement);
        // The span carries the correlation id too; the summary line keeps it as a field of its
        // own, where JSON log pipelines already look for it.
        tracing::info!(
            correlation_id = correlation_id.unwrap_or(""),
            connector = %finished.connector,
            exit_code = finished.outcome.exit_code.code(),
            attempts = finished.outcome.attempts,
            duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            redelivered = self.delivery.redelivered,
            reply = ?reply_status,
            settlement = ?settlement,
            "{}", finished.outcome.message
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cancelled_consumer_stays_on_its_node_a_lost_connection_moves_on() {
        assert_eq!(next_node(1, &SessionError::Cancelled), 1);
        let lost = SessionError::Consumer(lapin::Error::from(std::io::Error::other("reset")));
        assert_eq!(next_node(1, &lost), 2);
    }
}
