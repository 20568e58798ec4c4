//! The worker: consume deliveries, run each job through the [`Pipeline`], reply, settle.
//! Consumes from one node of the cluster at a time and moves on to the next that answers, with
//! backoff, whenever its session ends (node lost, consumer cancelled). On shutdown it stops
//! consuming, lets the jobs in flight finish until one deadline (`grace_period` after the
//! shutdown request), cancels those still running (RabbitMQ redelivers them), and closes.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use futures_util::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicCancelOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, ChannelStatus};
use rand::Rng;
use tokio::sync::{Notify, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::amqp::confirms::Publisher;
use crate::amqp::consumer::{self, Flow, Session, SessionError};
use crate::amqp::held::{self, Routes};
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
use crate::settle::{DeadLetters, ReplyStatus, Settlement, settle};

/// How long the acks of finished jobs may take to leave when a session is retired.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);
/// After the deadline, how long cancelled jobs and their sessions may take to wind down.
/// (Under 5 s: the process exits within `--grace-period` + 5 s of SIGTERM on every path.)
const WIND_DOWN: Duration = Duration::from_secs(4);
/// Reconnect backoff: first delay and cap.
const RECONNECT_FIRST: Duration = Duration::from_millis(200);
const RECONNECT_MAX: Duration = Duration::from_secs(15);
/// A session that lasted this long was healthy: the next reconnect starts the backoff afresh.
const HEALTHY_SESSION: Duration = Duration::from_secs(10);
/// How long a worker takes no new deliveries after handing a job back to the queue for the
/// worker that holds its client-id (jittered, so a fleet does not resume together). It holds
/// its acks meanwhile, so RabbitMQ does not refill its prefetch window and the queue's jobs flow
/// to the other workers; what RabbitMQ already sent is run (handed back at once if it is for
/// the same client-id). It does not cancel its consumer: on a quorum queue deliveries can still
/// arrive after the cancel-ok, lapin drops them unsettled and RabbitMQ returns them when the
/// channel closes — the stray redelivery that a delivery limit of 1 turned into lost jobs.
const PAUSE_MIN: Duration = Duration::from_secs(2);
const PAUSE_MAX: Duration = Duration::from_secs(4);
/// How often a worker counts the consumers of its queue (whether it has siblings).
const SIBLINGS_EVERY: Duration = Duration::from_secs(3);

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
    /// Whether other consumers share the request queue (kept by each session): only then are
    /// jobs whose client-id is held elsewhere handed back.
    siblings: Siblings,
    /// Signalled by a job handed back to the queue (another worker holds its client-id): the
    /// session stops taking deliveries for a moment, so the queue's jobs flow to that worker.
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
        #[cfg(feature = "soak-faults")]
        crate::fault::announce();
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
        let siblings = Siblings::default();
        let pipeline = Pipeline::new(
            connectors.clone(),
            pool,
            metrics.clone(),
            options.limits,
            options.policy.clone(),
        )
        .deferring(siblings.clone());
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
            siblings,
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
        // The grace period counts from the shutdown request, not from when consuming stops.
        let shutdown = self.shutdown.clone();
        let requested = tokio::spawn(async move {
            shutdown.cancelled().await;
            tokio::time::Instant::now()
        });
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
        let requested = requested
            .await
            .unwrap_or_else(|_| tokio::time::Instant::now());
        // A grace period too long to add (u64::MAX seconds) means: wait for the jobs' own ends.
        let deadline = requested.checked_add(self.options.grace_period);
        sessions.close();
        let drained = match deadline {
            Some(deadline) => tokio::time::timeout_at(deadline, sessions.wait())
                .await
                .is_ok(),
            None => {
                sessions.wait().await;
                true
            }
        };
        if !drained {
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
            flow,
        } = session;
        let opened = Instant::now();
        self.set_ready(true);
        tracing::info!(queue = %self.options.queue, node = %self.nodes.shown(node), prefetch = self.options.prefetch, "consuming");
        let (settler, settler_task) = Settler::start(channel.clone());
        // Every publish of the session's jobs goes through it: lapin cannot tell whose a return is.
        let publisher = Publisher::start(channel.clone());
        let jobs = TaskTracker::new();
        let queue_name: Arc<str> = Arc::from(self.queue.name.as_str());
        let dead_letter_queue: Option<Arc<str>> =
            self.queue.dead_letter_queue.as_deref().map(Arc::from);
        let mut flow_changes = flow.clone();
        let session_over = CancellationToken::new();
        // Cancels this session's jobs: at the shutdown deadline (a child of `jobs_cancel`), or
        // at once when the session is lost (nothing they do can be settled any more).
        let session_jobs = self.jobs_cancel.child_token();
        // A channel of its own: a failed passive declare closes the channel it ran on.
        let probe = tokio::time::timeout(consumer::CLOSE_TIMEOUT, connection.create_channel())
            .await
            .ok()
            .and_then(Result::ok);
        let watcher = tokio::spawn(watch_siblings(
            probe,
            Arc::clone(&queue_name),
            self.siblings.clone(),
            session_over.clone(),
        ));
        // Jobs handed back go to the worker holding their client-id (amqp::held); without the
        // exchanges (a user not allowed to declare them), through the request queue.
        // Not with a client-id suffix: every worker's client-ids are its own, nothing to route.
        let routes = Routes::new(&self.queue);
        let routes = match self.options.mqtt.client_id_suffix.is_empty() {
            false => Err(None),
            true => routes
                .declare(&connection)
                .await
                .map(|()| routes)
                .map_err(Some),
        };
        let routes = match routes {
            Ok(routes) => Some(routes),
            Err(None) => None,
            Err(Some(err)) => {
                tracing::warn!(error = %err, "cannot declare the exchanges that take handed-back jobs to the worker holding their client-id: they go back through the request queue");
                None
            }
        };
        let connection = Arc::new(connection);
        // --prefetch bounds the jobs running, whatever consumers RabbitMQ counts it per: a
        // consumer started again after a pause gets a fresh window while older jobs still run.
        let slots = Arc::new(Semaphore::new(usize::from(self.options.prefetch.max(1))));
        let context = JobContext {
            pipeline: self.pipeline.clone(),
            metrics: self.metrics.clone(),
            cancel: session_jobs.clone(),
            deferred: Arc::clone(&self.deferred),
            queue: Arc::clone(&queue_name),
            dead_letter_queue: dead_letter_queue.clone(),
            flow: flow.clone(),
            routes: routes.clone(),
        };
        // Cancelled when the session's own jobs are done (see `retire`).
        let jobs_done = CancellationToken::new();
        let held_server = match &routes {
            Some(routes) => {
                let context = context.clone();
                let run: held::RunHeld =
                    Arc::new(move |delivery, status, publisher, settler, slot| {
                        Box::pin(
                            context
                                .job(delivery, status, publisher, settler, slot, true)
                                .run(),
                        )
                    });
                tokio::spawn(held::serve(
                    Arc::clone(&connection),
                    routes.clone(),
                    self.pipeline.pool().clone(),
                    self.siblings.clone(),
                    self.options.prefetch,
                    Arc::clone(&slots),
                    run,
                    session_over.clone(),
                    jobs_done.clone(),
                ))
            }
            None => tokio::spawn(async {}),
        };
        let spawn = |delivery: Delivery, slot: OwnedSemaphorePermit| {
            settler.taken(delivery.delivery_tag);
            let job = context.job(
                delivery,
                channel.status().clone(),
                publisher.clone(),
                settler.clone(),
                slot,
                false,
            );
            // Boxed before it is spawned: the job's future is kilobytes (the whole pipeline
            // inline), and tokio moves a task's future by value several times while spawning
            // and finishing it; a box moves as one pointer (half the worker's instructions).
            jobs.spawn(Box::pin(job.run()));
        };
        // Deliveries received but not started (drained at a pause): run before any new one.
        let mut backlog: VecDeque<Delivery> = VecDeque::new();
        let mut slot: Option<OwnedSemaphorePermit> = None;
        let mut paused_until: Option<tokio::time::Instant> = None;
        let ended = loop {
            while slot.is_some() && !backlog.is_empty() {
                if let (Some(delivery), Some(permit)) = (backlog.pop_front(), slot.take()) {
                    spawn(delivery, permit);
                }
                slot = Arc::clone(&slots).try_acquire_owned().ok();
            }
            let resume_at = paused_until.unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                _ = self.shutdown.cancelled() => break None,
                blocked = flow_changes.changed() => self.set_blocked(blocked),
                permit = Arc::clone(&slots).acquire_owned(), if slot.is_none() => {
                    slot = permit.ok();
                }
                _ = self.deferred.notified(), if paused_until.is_none() => {
                    let pause = rand::rng().random_range(PAUSE_MIN..=PAUSE_MAX);
                    tracing::debug!(?pause, "jobs went back to the queue for the worker holding their client-id: holding acks for a moment, so no new deliveries come");
                    settler.hold(true);
                    paused_until = Some(tokio::time::Instant::now() + pause);
                }
                _ = tokio::time::sleep_until(resume_at), if paused_until.is_some() => {
                    paused_until = None;
                    settler.hold(false);
                }
                // Read on even with every slot taken (RabbitMQ sends at most a window's worth):
                // that is where a lost session shows.
                delivery = consumer.next() => match (delivery, slot.take()) {
                    (Some(Ok(delivery)), Some(permit)) => spawn(delivery, permit),
                    (Some(Ok(delivery)), None) => backlog.push_back(delivery),
                    (Some(Err(err)), permit) => {
                        drop(permit);
                        break Some(SessionError::Consumer(err));
                    }
                    // The stream ends without our asking: RabbitMQ cancelled the consumer.
                    (None, _) => break Some(SessionError::Cancelled),
                },
            }
        };
        self.set_ready(false);
        session_over.cancel();
        if let Some(error) = &ended {
            // RabbitMQ redelivers every unsettled delivery of a lost session: a job of it that
            // published now would be published twice.
            if !jobs.is_empty() {
                tracing::warn!(jobs = jobs.len(), error = %amqp::error_chain(error), "AMQP session lost: its jobs are cancelled, RabbitMQ will redeliver them");
            }
            session_jobs.cancel();
        }
        let next_node = ended.as_ref().map_or(node, |error| next_node(node, error));
        settler.hold(false);
        if ended.is_none() {
            // Stop deliveries; the jobs we hold finish (their replies and acks need this
            // channel); deliveries prefetched but not started go back when it closes.
            let cancel = channel.basic_cancel(consumer.tag(), BasicCancelOptions::default());
            let _ = tokio::time::timeout(consumer::CLOSE_TIMEOUT, cancel).await;
        }
        drop(consumer);
        sessions.spawn(retire(
            jobs,
            settler,
            settler_task,
            [watcher, held_server],
            jobs_done,
            channel,
            connection,
        ));
        match ended {
            None => SessionEnd::Shutdown,
            Some(error) => SessionEnd::Lost {
                error,
                next_node,
                lasted: opened.elapsed(),
            },
        }
    }

    fn set_ready(&self, ready: bool) {
        self.readiness.set(ready);
        self.metrics.set_consumer_up(ready);
        if !ready {
            self.metrics.set_connection_blocked(false);
        }
    }

    /// A blocked connection (a RabbitMQ alarm) makes the worker unready: its replies wait, so
    /// it should get no new work. The consumer stays up (`amqp_consumer_up` 1): nothing is
    /// lost and work resumes by itself when the alarm clears.
    fn set_blocked(&self, blocked: bool) {
        self.readiness.set(!blocked);
        self.metrics.set_connection_blocked(blocked);
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

/// Keeps `siblings` true only while other consumers share `queue`: counts its consumers every
/// [`SIBLINGS_EVERY`] (a passive declare on a channel of its own, bounded) until `over`; false
/// whenever the count is unknown, and when the session ends.
async fn watch_siblings(
    probe: Option<Channel>,
    queue: Arc<str>,
    siblings: Siblings,
    over: CancellationToken,
) {
    let mut tick = tokio::time::interval(SIBLINGS_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = over.cancelled() => break,
            _ = tick.tick() => {}
        }
        let counted = async {
            let channel = probe.as_ref()?;
            let passive = QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            };
            let declared = channel
                .queue_declare(queue.as_ref().into(), passive, FieldTable::default())
                .await
                .ok()?;
            Some(declared.consumer_count())
        };
        let consumers = tokio::time::timeout(consumer::CLOSE_TIMEOUT, counted)
            .await
            .ok()
            .flatten();
        // Our own consumer is one of them.
        siblings.set(consumers.is_some_and(|count| count > 1));
    }
    siblings.set(false);
    if let Some(channel) = probe {
        consumer::close_channel(&channel).await;
    }
}

/// A session that ended: once its jobs are over (finished, or cancelled at the shutdown
/// deadline), send their acks and close its connection, so no connection and no settling task
/// outlives it.
///
/// Every channel is closed, and awaited, before the connection: lapin closes a channel by itself
/// when its last handle goes, and one doing so while the connection closes is logged at ERROR
/// (`invalid channel state: Closing`), on a perfectly clean stop.
async fn retire(
    jobs: TaskTracker,
    settler: Settler,
    settler_task: SettlerTask,
    helpers: [tokio::task::JoinHandle<()>; 2],
    jobs_done: CancellationToken,
    channel: Channel,
    connection: Arc<lapin::Connection>,
) {
    // While the session's own jobs finish, this worker still holds their client-ids: what is
    // handed back to it meanwhile goes on to the request queue (amqp::held). Then the held
    // queues' consumers end, their jobs done too.
    let [watcher, held_server] = helpers;
    jobs.close();
    jobs.wait().await;
    jobs_done.cancel();
    let _ = held_server.await;
    settler_task.finish(settler, SETTLE_TIMEOUT).await;
    let _ = tokio::time::timeout(consumer::CLOSE_TIMEOUT, watcher).await;
    consumer::close_channel(&channel).await;
    drop(channel);
    consumer::close(&connection, "session over").await;
}

/// What every job of a session shares.
#[derive(Clone)]
struct JobContext {
    pipeline: Pipeline,
    metrics: Metrics,
    cancel: CancellationToken,
    deferred: Arc<Notify>,
    queue: Arc<str>,
    dead_letter_queue: Option<Arc<str>>,
    flow: Flow,
    routes: Option<Routes>,
}

impl JobContext {
    /// A job for `delivery`, settled through `settler` on the channel it came on (whose
    /// `status` it is); `via_held` when it came from the queue of a client-id this worker holds.
    fn job(
        &self,
        delivery: Delivery,
        status: ChannelStatus,
        publisher: Publisher,
        settler: Settler,
        slot: OwnedSemaphorePermit,
        via_held: bool,
    ) -> Job {
        Job {
            _slot: slot,
            deferred: Arc::clone(&self.deferred),
            queue: Arc::clone(&self.queue),
            dead_letter_queue: self.dead_letter_queue.clone(),
            flow: self.flow.clone(),
            delivery,
            channel_status: status,
            publisher,
            settler,
            pipeline: self.pipeline.clone(),
            metrics: self.metrics.clone(),
            cancel: self.cancel.clone(),
            routes: self.routes.clone(),
            via_held,
        }
    }
}

/// One delivery and what it needs to run, reply and settle.
struct Job {
    /// One of the session's `--prefetch` slots, held while the job runs.
    _slot: OwnedSemaphorePermit,
    deferred: Arc<Notify>,
    /// The request queue, where a job handed back goes.
    queue: Arc<str>,
    /// `--dead-letter-queue`: where a job whose reply was lost goes, with its outcome.
    dead_letter_queue: Option<Arc<str>>,
    /// Whether RabbitMQ blocks the session's connection: replies wait meanwhile.
    flow: Flow,
    delivery: Delivery,
    /// Of the channel the delivery came on (a status, not a channel: cloning a lapin channel
    /// for every job cost a dozen atomic counts).
    channel_status: ChannelStatus,
    /// Replies, hand-backs and dead-letter forwards go out through it, on the same channel.
    publisher: Publisher,
    settler: Settler,
    pipeline: Pipeline,
    metrics: Metrics,
    cancel: CancellationToken,
    /// Where jobs handed back go to reach the holder of their client-id (`None`: the queue).
    routes: Option<Routes>,
    /// Taken from the queue of a client-id this worker holds.
    via_held: bool,
}

impl Job {
    /// Runs the job in its own span (every line it logs carries its correlation id); cancelled
    /// at the shutdown deadline, it sends no reply and settles nothing (RabbitMQ redelivers it).
    ///
    /// Not an `async fn`: that would hold the job twice (argument and moved copy) in a future
    /// that is copied whole to the heap for every job.
    fn run(self) -> impl Future<Output = ()> + Send {
        // The span records the id when it is created (nothing at all when it is not logged):
        // borrowed, not copied.
        let span = {
            let properties = &self.delivery.properties;
            let correlation_id = properties
                .correlation_id()
                .as_ref()
                .map_or("", |id| id.as_str());
            tracing::info_span!("job", correlation_id = %correlation_id)
        };
        async move {
            self.metrics.jobs_in_flight().inc();
            tokio::select! {
                biased;
                _ = self.cancel.cancelled() => {
                    tracing::warn!("cancelled (end of the grace period, or its AMQP session was lost); RabbitMQ will redeliver it");
                }
                _ = self.handle() => {}
            }
            self.metrics.jobs_in_flight().dec();
        }
        .instrument(span)
    }

    /// Run the job, reply, settle.
    async fn handle(&self) {
        let started = Instant::now();
        // When a worker first took the job (hand-back headers), and the AMQP message's
        // timestamp + expiration: a stale command is not published (9).
        let headers = self.delivery.properties.headers().as_ref();
        let taken = Taken {
            expires_at: crate::expiry::amqp_expiry(&self.delivery.properties),
            orphaned: !self.via_held && held::was_routed(headers),
            ..handback::taken(headers, SystemTime::now())
        };
        let properties = &self.delivery.properties;
        let correlation_id = properties.correlation_id().as_ref().map(|id| id.as_str());
        let finished = self
            .pipeline
            .run_correlated(&self.delivery.data, taken, correlation_id)
            .await;
        if let Some(delay) = finished.requeue_after {
            // Not final: unanswered, to the worker holding the client-id.
            tracing::debug!(requeue_in = ?delay, handbacks = taken.handbacks, "{}", finished.outcome.message);
            let key = self
                .routes
                .as_ref()
                .zip(finished.held_elsewhere.as_ref())
                .map(|(routes, held)| (routes.exchange(), Routes::key(held)));
            let to = match &key {
                Some((exchange, key)) => handback::HandBackTo::Holder { exchange, key },
                None => {
                    // Through the request queue: this worker takes no new deliveries for a
                    // moment, so that they flow to the holder.
                    self.deferred.notify_one();
                    handback::HandBackTo::Queue(&self.queue)
                }
            };
            tokio::time::sleep(delay).await;
            let settlement =
                if handback::hand_back(&self.publisher, to, &self.delivery, taken).await {
                    Settlement::Ack
                } else {
                    Settlement::Requeue
                };
            self.settler.settle(self.delivery.delivery_tag, settlement);
            return;
        }
        let reply_to = properties.reply_to().as_ref().map(|queue| queue.as_str());
        let reply_status = match reply_to {
            Some(reply_to) => {
                let body = Reply::new(&finished.outcome, started.elapsed()).to_json();
                replier::reply(&self.publisher, &self.flow, reply_to, correlation_id, &body).await
            }
            None => ReplyStatus::NotRequested,
        };
        let dead_letters = match self.dead_letter_queue {
            Some(_) => DeadLetters::Known,
            None => DeadLetters::Unknown,
        };
        let mut settlement = settle(finished.outcome.exit_code, reply_status, dead_letters);
        if matches!(reply_status, ReplyStatus::Lost(_)) && !self.channel_status.connected() {
            // Not a lost reply: the session is gone, nothing can be settled on it, and RabbitMQ
            // redelivers the job (the worker cancels such jobs as soon as it notices).
            tracing::debug!("the AMQP session ended before the reply was confirmed");
            return;
        }
        if self.via_held && settlement == Settlement::DeadLetter {
            // Rejected on a client-id's queue, a job would be dead-lettered into the request
            // queue (that queue's way back for jobs that waited too long) and run again.
            settlement = match self.dead_letter_queue {
                Some(_) => Settlement::ForwardWithOutcome,
                None => Settlement::Ack,
            };
        }
        if let (Settlement::ForwardWithOutcome, Some(queue)) =
            (settlement, self.dead_letter_queue.as_deref())
        {
            let forwarded = replier::forward_with_outcome(
                &self.publisher,
                &self.flow,
                queue,
                &self.delivery,
                &finished.outcome,
            )
            .await;
            settlement = if forwarded || self.via_held {
                Settlement::Ack
            } else {
                Settlement::DeadLetter
            };
        }
        if let ReplyStatus::Lost(lost) = reply_status {
            self.metrics.reply_lost();
            tracing::warn!(
                reply_to = reply_to.unwrap_or(""),
                reason = ?lost,
                window = ?replier::REPLY_WINDOW,
                exit_code = finished.outcome.exit_code.code(),
                settlement = ?settlement,
                "reply lost: RabbitMQ did not take it within the window; the job is settled without it, not run again"
            );
        }
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
