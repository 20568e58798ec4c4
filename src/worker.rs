//! The worker: consume deliveries, run each job through the [`Pipeline`], reply, settle.
//! Reconnects to RabbitMQ with backoff whenever the session ends; on shutdown stops
//! consuming, lets the jobs in flight finish (within a grace period) and closes everything.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use lapin::Channel;
use lapin::message::Delivery;
use lapin::options::BasicCancelOptions;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::amqp::consumer::{Session, SessionError};
use crate::amqp::settler::Settler;
use crate::amqp::{self, replier};
use crate::backoff::Backoff;
use crate::connectors::{ConnectorError, ConnectorStore};
use crate::http::{self, Readiness};
use crate::job::Limits;
use crate::metrics::Metrics;
use crate::mqtt::connection::ConnectionSettings;
use crate::mqtt::pool::Pool;
use crate::outcome::Reply;
use crate::pipeline::Pipeline;
use crate::policy::Policy;
use crate::settle::{ReplyStatus, Settlement, settle};

/// How long the acks of finished jobs may take to leave at shutdown.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Everything a worker is configured with.
#[derive(Clone)]
pub struct WorkerOptions {
    pub amqp_url: String,
    pub queue: String,
    pub connectors_dir: PathBuf,
    /// Unacknowledged deliveries RabbitMQ hands this worker at once: its concurrency.
    pub prefetch: u16,
    pub metrics_addr: Option<SocketAddr>,
    /// MQTT connections unused this long are closed.
    pub idle_timeout: Duration,
    /// How long jobs in flight may take to finish after SIGTERM.
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
            queue: queue.into(),
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
}

/// The AMQP URL's password stays out of any debug output.
impl std::fmt::Debug for WorkerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerOptions")
            .field("amqp_url", &amqp::redact_url(&self.amqp_url))
            .field("queue", &self.queue)
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
    #[error("cannot serve metrics on {addr}: {source}")]
    Metrics {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A worker that has loaded its connectors and bound its HTTP endpoint, ready to [`Worker::run`].
pub struct Worker {
    options: WorkerOptions,
    pipeline: Pipeline,
    metrics: Metrics,
    readiness: Readiness,
    metrics_addr: Option<SocketAddr>,
    shutdown: CancellationToken,
    /// Stops the HTTP endpoint when the worker is done (dropped), not at `shutdown`: while
    /// it drains, `/healthz` still answers 200, `/readyz` 503 and `/metrics` shows the drain.
    http_stop: CancellationToken,
}

impl Worker {
    /// Loads the connectors (a bad file stops the start) and binds `/metrics`.
    pub async fn start(
        options: WorkerOptions,
        shutdown: CancellationToken,
    ) -> Result<Worker, WorkerError> {
        let connectors = Arc::new(ConnectorStore::load(&options.connectors_dir)?);
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
        .deferring();
        tracing::info!(
            connectors = connectors.len(),
            queue = %options.queue,
            amqp = %amqp::redact_url(&options.amqp_url),
            metrics = ?metrics_addr,
            "worker started"
        );
        Ok(Worker {
            options,
            pipeline,
            metrics,
            readiness,
            metrics_addr,
            shutdown,
            http_stop,
        })
    }

    /// The address `/metrics` is served on, if any.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_addr
    }

    /// Consumes until the shutdown token is cancelled, then drains and returns.
    pub async fn run(self) {
        let tracker = TaskTracker::new();
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(15));
        while !self.shutdown.is_cancelled() {
            let ended = match Session::open(
                &self.options.amqp_url,
                &self.options.queue,
                self.options.prefetch,
            )
            .await
            {
                Ok(session) => {
                    backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(15));
                    self.consume(session, &tracker).await
                }
                Err(err) => Err(err),
            };
            self.set_ready(false);
            match ended {
                Ok(()) => break,
                Err(err) => {
                    let delay = backoff.next_delay();
                    tracing::warn!(error = %err, retry_in = ?delay, "not consuming from RabbitMQ");
                    tokio::select! {
                        _ = self.shutdown.cancelled() => break,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        // Jobs of a session that failed may still run; they get the same grace period.
        tracker.close();
        let _ = tokio::time::timeout(self.options.grace_period, tracker.wait()).await;
        self.pipeline.pool().close_all();
        tracing::info!("worker stopped");
    }

    /// Runs one session until it fails (`Err`) or shutdown is requested and its jobs are done.
    async fn consume(&self, session: Session, tracker: &TaskTracker) -> Result<(), SessionError> {
        let Session {
            connection,
            channel,
            mut consumer,
        } = session;
        self.set_ready(true);
        tracing::info!(queue = %self.options.queue, prefetch = self.options.prefetch, "consuming");
        let (settler, settler_task) = Settler::start(channel.clone());
        let ended = loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break Ok(()),
                delivery = consumer.next() => match delivery {
                    Some(Ok(delivery)) => {
                        settler.taken(delivery.delivery_tag);
                        let job = handle(delivery, channel.clone(), settler.clone(), self.pipeline.clone(), self.metrics.clone());
                        tracker.spawn(job);
                    }
                    Some(Err(err)) => break Err(SessionError::Amqp(err)),
                    None => break Err(SessionError::ConsumerEnded),
                },
            }
        };
        if ended.is_ok() {
            // Stop deliveries, finish what we hold (its replies and acks need this channel),
            // then close: deliveries prefetched but not started go back to the queue.
            self.set_ready(false);
            let _ = channel
                .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                .await;
            tracker.close();
            if tokio::time::timeout(self.options.grace_period, tracker.wait())
                .await
                .is_err()
            {
                tracing::warn!(grace = ?self.options.grace_period, "jobs still running at the end of the grace period; RabbitMQ will redeliver them");
            }
            // The jobs' acks are decided; send them before closing, or they would be redelivered.
            settler_task.finish(settler, SETTLE_TIMEOUT).await;
            let _ = connection.close(200, "worker shutting down".into()).await;
        }
        ended
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

/// One delivery: run the job, reply, settle.
async fn handle(
    delivery: Delivery,
    channel: Channel,
    settler: Settler,
    pipeline: Pipeline,
    metrics: Metrics,
) {
    metrics.jobs_in_flight().inc();
    let started = Instant::now();
    let finished = pipeline.run(&delivery.data).await;
    let properties = &delivery.properties;
    let correlation_id = properties.correlation_id().as_ref().map(|id| id.as_str());
    if let Some(delay) = finished.requeue_after {
        // Not final: back to the queue, unanswered, for the worker holding the client-id.
        tracing::debug!(
            correlation_id = correlation_id.unwrap_or(""),
            requeue_in = ?delay,
            "{}", finished.outcome.message
        );
        tokio::time::sleep(delay).await;
        settler.settle(delivery.delivery_tag, Settlement::Requeue);
        metrics.jobs_in_flight().dec();
        return;
    }
    let reply_status = match properties.reply_to() {
        Some(reply_to) => {
            let body = Reply::new(&finished.outcome, started.elapsed()).to_json();
            replier::reply(&channel, reply_to.as_str(), correlation_id, &body).await
        }
        None => ReplyStatus::NotRequested,
    };
    let settlement = settle(finished.outcome.exit_code, reply_status);
    settler.settle(delivery.delivery_tag, settlement);
    tracing::info!(
        correlation_id = correlation_id.unwrap_or(""),
        connector = %finished.connector,
        exit_code = finished.outcome.exit_code.code(),
        attempts = finished.outcome.attempts,
        duration_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        redelivered = delivery.redelivered,
        reply = ?reply_status,
        settlement = ?settlement,
        "{}", finished.outcome.message
    );
    metrics.jobs_in_flight().dec();
}
