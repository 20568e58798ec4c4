//! The connection pool: one connection per target (broker, client-id, credentials, TLS),
//! shared by every job for that target, and at most `max_connections` of them open. Concurrent
//! jobs for a target that is still connecting wait for the same attempt, which is abandoned (its
//! socket closed) as soon as no job waits for it any more; a connection that ended is replaced
//! on the next lease; one idle longer than the idle timeout is closed by a reaper. At the bound,
//! the least recently used idle connection makes room, and a connect that finds every
//! connection busy waits (within its job's timeout) for one to fall idle.
//!
//! Losses are attributed: each target has a [`Gate`] through which ordinary publishes share
//! the connection and a *suspect* (a job whose publish was lost with a connection before)
//! publishes alone. A connection lost while a suspect was alone on it is that job's doing, and
//! never taken for a takeover; only evidence no job can produce makes the pool yield a
//! client-id (MQTT 5's DISCONNECT 0x8E; for 3.1.1, working connections lost quickly twice in a
//! row with no suspect on them while the broker's port still accepts connections).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared, WeakShared};
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, RwLock, RwLockReadGuard, RwLockWriteGuard, Semaphore};
use tokio::task::JoinHandle;

use super::MqttError;
use super::connection::{Connection, ConnectionSettings, End};
use super::tls::TlsConfigs;
use crate::backoff::Backoff;
use crate::job::{Broker, Target};
use crate::metrics::Metrics;
use crate::pipeline::Siblings;

/// The contract's default for `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1000;

type ConnectFuture = BoxFuture<'static, Result<Arc<Connection>, MqttError>>;
type Opening = Shared<ConnectFuture>;

/// Backstop for one connect attempt shared by many jobs; each job's own timeout is usually shorter.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection lost sooner than this after opening counts as a quick loss: the next one to the
/// same target waits first (two workers sharing a client-id take the connection from each other).
/// Short: siblings fighting over a client-id kick each other within a reconnect pause (0.5-1.5
/// s), while a broker restarted twice, or a link that drops twice, seldom does it that fast.
const QUICK_LOSS: Duration = Duration::from_secs(3);
/// How long a worker first stops competing for a client-id that another connection took over
/// from a working one; doubled each time it happens again, up to [`MAX_YIELD`]. Long: a yield
/// that runs out takes the client-id over from a holder that may well be alive, and a holder
/// that is gone (a CLI `send` a moment later, a worker killed) shows sooner through the jobs
/// themselves: one handed back to it that nobody took ends the yield (see `amqp::held`).
const FIRST_YIELD: Duration = Duration::from_secs(30);
const MAX_YIELD: Duration = Duration::from_secs(600);
/// How long a worker waits before reconnecting after the first quick loss of a working
/// connection.
const BLIP_PAUSE_MIN: Duration = Duration::from_millis(500);
const BLIP_PAUSE_MAX: Duration = Duration::from_millis(1500);
/// Connects to one target after a loss attributed to a job are at least this far apart.
const CONNECT_SPACING: Duration = Duration::from_secs(1);
/// How long the probe of a broker's port may take (see [`after_loss`]).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

struct Slot {
    state: State,
    /// Connections to this target lost quickly, in a row.
    quick_losses: u32,
    /// Times in a row this worker yielded the client-id to another connection.
    yields: u32,
    /// Whether a connection to this target ever carried an acknowledged publish here: a
    /// broker that drops every connection never does, a sibling's takeover ends one that did.
    worked: bool,
}

/// Why a slot rests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rest {
    /// A pause before reconnecting: leases wait for the new connection (within their job's
    /// timeout) rather than fail, which would burn every job's retries.
    Pause,
    /// The client-id is yielded to another connection: leases fail at once with
    /// [`MqttError::HeldElsewhere`] (the job goes back to the queue or retries).
    Yield,
}

enum State {
    Open(Arc<Connection>),
    /// Until `until`, no connect: leases wait ([`Rest::Pause`]) or fail at once with `error`
    /// ([`Rest::Yield`]).
    Resting {
        until: Instant,
        error: MqttError,
        rest: Rest,
    },
    /// A connect in progress, held by the jobs waiting for it (not by the pool: when the last
    /// of them gives up, the attempt is dropped and its socket closed); `id` tells attempts apart.
    Opening {
        id: u64,
        /// `None` only for an attempt that had already finished when it was stored.
        future: Option<WeakShared<ConnectFuture>>,
    },
}

struct Inner {
    slots: Mutex<HashMap<Target, Slot>>,
    settings: ConnectionSettings,
    metrics: Metrics,
    next_id: AtomicU64,
    /// One permit per open (or opening) connection, held until its socket is closed.
    places: Arc<Semaphore>,
    /// Connects waiting for a place; while any waits, a connection that falls idle is closed.
    waiting: AtomicUsize,
    tls: TlsConfigs,
    /// The gate of each target some job holds (see [`Gate`]).
    gates: Mutex<HashMap<Target, Weak<Gate>>>,
    /// Whether other workers consume the queue; unset (`send`) counts as none. Without a
    /// sibling to yield to, a client-id taken over is taken back after a pause.
    siblings: OnceLock<Siblings>,
    /// Bumped whenever a connection opens or goes: the set of client-ids held changed
    /// (see [`Pool::held`]).
    holdings: tokio::sync::watch::Sender<u64>,
}

/// Who publishes on a target's connection: ordinary publishes together, a suspect alone.
/// While suspects are waiting, new ordinary publishes wait for them, so the jobs lost with one
/// connection are each tried alone before anything else shares the next one.
pub struct Gate {
    lock: RwLock<()>,
    suspects: tokio::sync::watch::Sender<usize>,
}

/// A job counted among its target's suspects while it lives.
pub struct Suspect(Arc<Gate>);

impl Drop for Suspect {
    fn drop(&mut self) {
        self.0.suspects.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Gate {
    fn new() -> Self {
        Self {
            lock: RwLock::new(()),
            suspects: tokio::sync::watch::channel(0).0,
        }
    }

    /// An ordinary publish's turn: once no suspect waits, shared with other ordinary ones.
    pub async fn ordinary(&self) -> RwLockReadGuard<'_, ()> {
        let mut suspects = self.suspects.subscribe();
        // The sender lives in `self`: this cannot fail.
        let _ = suspects.wait_for(|n| *n == 0).await;
        self.lock.read().await
    }

    /// A suspect's turn: alone on the connection.
    pub async fn alone(&self) -> RwLockWriteGuard<'_, ()> {
        self.lock.write().await
    }

    /// Counts a job among the suspects until the returned guard is dropped.
    pub fn suspect(self: &Arc<Self>) -> Suspect {
        self.suspects.send_modify(|n| *n += 1);
        Suspect(Arc::clone(self))
    }
}

/// Cloneable handle to the pool.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// A connection in use by one job; the pool will not close it while any lease is held.
pub struct Lease {
    connection: Arc<Connection>,
    pool: Arc<Inner>,
}

impl std::ops::Deref for Lease {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.connection
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let was_last = self.connection.in_use.fetch_sub(1, Ordering::AcqRel) == 1;
        if was_last && self.pool.waiting.load(Ordering::Acquire) > 0 {
            // A connect waits for room and this connection just fell idle: it goes.
            self.connection.close();
            self.pool.metrics.mqtt_connection_evicted();
        }
    }
}

fn lease(connection: &Arc<Connection>, pool: &Arc<Inner>) -> Lease {
    connection.in_use.fetch_add(1, Ordering::AcqRel);
    Lease {
        connection: Arc::clone(connection),
        pool: Arc::clone(pool),
    }
}

/// Aborts the connect task when the last job waiting for it is gone.
struct AbortOnDrop(JoinHandle<Result<Arc<Connection>, MqttError>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counts a connect among those waiting for a place, for as long as it waits.
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn enter(counter: &'a AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::AcqRel);
        Waiting(counter)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a lease waited through (see [`Pool::lease_noting`]).
#[derive(Debug, Default)]
pub struct Waited {
    /// The loss a pause follows, if the lease waited for the pool to reconnect after it.
    pub paused: Option<MqttError>,
    /// The lease failed because the connection it waited for ended before it could be used.
    pub ended_first: bool,
}

/// Why a lease failed.
enum LeaseFailed {
    /// The connection waited for ended between its CONNACK and the lease.
    EndedFirst(MqttError),
    Other(MqttError),
}

impl LeaseFailed {
    fn into_error(self) -> MqttError {
        match self {
            LeaseFailed::EndedFirst(error) | LeaseFailed::Other(error) => error,
        }
    }
}

/// What a lease does next, decided under the lock.
enum Step {
    Ready(Lease),
    Wait(Opening),
    Fail(MqttError),
    /// The slot pauses before reconnecting (after this loss): try again then.
    Sleep(Instant, MqttError),
}

impl Pool {
    /// A pool of at most `max_connections` connections, each closed after `idle_timeout`
    /// without a publish.
    pub fn new(
        settings: ConnectionSettings,
        idle_timeout: Duration,
        max_connections: usize,
        metrics: Metrics,
    ) -> Pool {
        let max_connections = max_connections.clamp(1, Semaphore::MAX_PERMITS);
        metrics.set_mqtt_connections_max(max_connections);
        let inner = Arc::new(Inner {
            slots: Mutex::new(HashMap::new()),
            settings,
            metrics,
            next_id: AtomicU64::new(0),
            places: Arc::new(Semaphore::new(max_connections)),
            waiting: AtomicUsize::new(0),
            tls: TlsConfigs::default(),
            gates: Mutex::new(HashMap::new()),
            siblings: OnceLock::new(),
            holdings: tokio::sync::watch::channel(0).0,
        });
        tokio::spawn(reap_idle(Arc::downgrade(&inner), idle_timeout));
        Pool { inner }
    }

    /// The gate through which jobs publish to `target` (the same for every job holding it).
    pub fn gate(&self, target: &Target) -> Arc<Gate> {
        let mut gates = self
            .inner
            .gates
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(gate) = gates.get(target).and_then(Weak::upgrade) {
            return gate;
        }
        gates.retain(|_, gate| gate.strong_count() > 0);
        let gate = Arc::new(Gate::new());
        gates.insert(target.clone(), Arc::downgrade(&gate));
        gate
    }

    /// Ends a yield of `target`'s client-id at once, so the next lease connects (taking the
    /// session over): for a job handed back too often, or too close to its deadline, to wait for
    /// the holder any longer. One takeover, rather than a job that never reaches the holder.
    pub fn take_back(&self, target: &Target) {
        if let Some(slot) = self.lock().get_mut(target)
            && let State::Resting {
                until,
                rest: Rest::Yield,
                ..
            } = &mut slot.state
        {
            *until = Instant::now();
        }
    }

    /// The client-ids this worker holds a live connection for, with their brokers.
    pub fn held(&self) -> Vec<Held> {
        let mut held: Vec<Held> = self
            .lock()
            .iter()
            .filter(|(_, slot)| matches!(&slot.state, State::Open(c) if !c.is_ended()))
            .map(|(target, _)| self.held_by(target))
            .collect();
        held.sort();
        held.dedup();
        held
    }

    /// `target`'s client-id (with the worker's suffix) and broker, as [`Pool::held`] lists them.
    pub fn held_by(&self, target: &Target) -> Held {
        Held {
            broker: target.broker.to_string(),
            client_id: self.client_id(target),
        }
    }

    /// Changes whenever [`Pool::held`] may have changed.
    pub fn holdings(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.holdings.subscribe()
    }

    /// Yield client-ids taken over only while `siblings` says other workers consume the queue.
    pub fn follow_siblings(&self, siblings: Siblings) {
        let _ = self.inner.siblings.set(siblings);
    }

    /// The client-id the broker sees for `target` (with the worker's suffix).
    pub fn client_id(&self, target: &Target) -> String {
        format!(
            "{}{}",
            target.client_id, self.inner.settings.client_id_suffix
        )
    }

    /// A live connection to `target`, opening one if needed; while the slot pauses before
    /// reconnecting, waits for the new connection.
    pub async fn lease(&self, target: &Target) -> Result<Lease, MqttError> {
        self.lease_noting(target, &mut Waited::default()).await
    }

    /// [`Pool::lease`], noting in `waited` what it waited through: the loss a pause follows
    /// (the job's answer if its timeout runs out there), and whether it failed because the
    /// connection it waited for ended before this job could use it.
    pub async fn lease_noting(
        &self,
        target: &Target,
        waited: &mut Waited,
    ) -> Result<Lease, MqttError> {
        loop {
            match self.lease_step(target) {
                Step::Sleep(until, loss) => {
                    waited.paused = Some(loss);
                    tokio::time::sleep_until(tokio::time::Instant::from_std(until)).await;
                }
                step => {
                    let leased = self.finish_lease(step).await;
                    waited.ended_first = matches!(leased, Err(LeaseFailed::EndedFirst(_)));
                    return leased.map_err(LeaseFailed::into_error);
                }
            }
        }
    }

    /// Whether a connection to `target` ever carried an acknowledged publish.
    pub fn has_worked(&self, target: &Target) -> bool {
        self.lock().get(target).is_some_and(|slot| {
            slot.worked || matches!(&slot.state, State::Open(c) if c.has_worked())
        })
    }

    fn lease_step(&self, target: &Target) -> Step {
        let mut slots = self.lock();
        match slots.get_mut(target) {
            Some(slot) => self.step(slot, target),
            None => {
                let (id, future) = self.open(target, false);
                let state = opening(id, &future);
                slots.insert(
                    target.clone(),
                    Slot {
                        state,
                        quick_losses: 0,
                        yields: 0,
                        worked: false,
                    },
                );
                Step::Wait(future)
            }
        }
    }

    async fn finish_lease(&self, step: Step) -> Result<Lease, LeaseFailed> {
        match step {
            Step::Ready(lease) => Ok(lease),
            Step::Fail(error) => Err(LeaseFailed::Other(error)),
            Step::Sleep(..) => Err(LeaseFailed::Other(MqttError::Internal {
                broker: String::new(),
                reason: "a pause was not waited for".into(),
            })),
            Step::Wait(opening) => {
                let connection = opening.await.map_err(LeaseFailed::Other)?;
                let leased = lease(&connection, &self.inner);
                if connection.is_ended() {
                    // Closed between its CONNACK and this lease: most often by the publish of
                    // a job that woke first (a broker closing the connection on one message),
                    // or to make room. This job published nothing on it.
                    return Err(LeaseFailed::EndedFirst(connection.lost()));
                }
                Ok(leased)
            }
        }
    }

    /// The next step for a target the pool already knows.
    fn step(&self, slot: &mut Slot, target: &Target) -> Step {
        match &slot.state {
            State::Open(connection) if !connection.is_ended() => {
                Step::Ready(lease(connection, &self.inner))
            }
            State::Opening { future, .. } => match future.as_ref().and_then(WeakShared::upgrade) {
                Some(future) => Step::Wait(future),
                // Every job that waited for it gave up: start afresh.
                None => Step::Wait(self.reopen(slot, target, false)),
            },
            State::Resting {
                until,
                error,
                rest: Rest::Pause,
            } if Instant::now() < *until => Step::Sleep(*until, error.clone()),
            // A yield ends early once no sibling consumes the queue: nobody to yield to.
            State::Resting { until, error, .. }
                if Instant::now() < *until
                    && self.inner.siblings.get().is_some_and(Siblings::present) =>
            {
                Step::Fail(error.clone())
            }
            State::Resting { .. } => Step::Wait(self.reopen(slot, target, false)),
            State::Open(connection) => {
                let loss = match connection.end() {
                    Some(End::Lost(reason)) => Some(Loss::Lost(reason.clone())),
                    Some(End::TakenOver(_)) => Some(Loss::TakenOver),
                    _ => None,
                };
                if loss.is_some() {
                    self.inner
                        .metrics
                        .mqtt_reconnect(&target.broker.to_string());
                }
                let seen = Seen {
                    age: connection.age(),
                    quick: connection.age() < QUICK_LOSS,
                    worked: connection.has_worked(),
                    attributed: connection.was_alone(),
                    may_yield: self.inner.siblings.get().is_some_and(Siblings::present),
                };
                if matches!(loss, Some(Loss::TakenOver)) && !seen.may_yield {
                    tracing::warn!(
                        client_id = %self.client_id(target),
                        broker = %target.broker,
                        "another connection took this client-id over (MQTT 5 DISCONNECT 0x8E); \
                         no sibling worker consumes the queue, so this worker takes it back \
                         after a pause"
                    );
                }
                match after_loss(slot, target, loss, seen) {
                    AfterLoss::Pause(state) => {
                        let State::Resting { until, error, .. } = &state else {
                            return Step::Wait(self.reopen(slot, target, false));
                        };
                        let step = Step::Sleep(*until, error.clone());
                        slot.state = state;
                        step
                    }
                    AfterLoss::Yield => {
                        Step::Fail(yield_slot(slot, target, &self.client_id(target)))
                    }
                    AfterLoss::Reconnect => Step::Wait(self.reopen(slot, target, false)),
                    AfterLoss::ProbeThenReconnect => Step::Wait(self.reopen(slot, target, true)),
                }
            }
        }
    }

    /// Starts a new connect for an existing slot (after probing the broker, see [`after_loss`]).
    fn reopen(&self, slot: &mut Slot, target: &Target, probe: bool) -> Opening {
        let (id, future) = self.open(target, probe);
        slot.state = opening(id, &future);
        future
    }

    /// Closes every connection (at shutdown, once no job is in flight).
    pub fn close_all(&self) {
        for (_, slot) in self.lock().drain() {
            if let State::Open(connection) = slot.state {
                connection.close();
            }
        }
    }

    /// Starts connecting in a task of its own, which settles the slot when it ends. The
    /// returned future owns the task: once every job awaiting it is gone, the task is aborted.
    fn open(&self, target: &Target, probe: bool) -> (u64, Opening) {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let target = target.clone();
        let inner = Arc::clone(&self.inner);
        let broker = target.broker.to_string();
        let task = AbortOnDrop(tokio::spawn(async move {
            if probe && port_accepts(&target.broker).await {
                return Err(yield_client_id(&inner, &target, id));
            }
            let result = connect(&inner, &target).await;
            let mut slots = lock(&inner);
            if let Some(slot) = slots.get_mut(&target)
                && matches!(slot.state, State::Opening { id: current, .. } if current == id)
            {
                match &result {
                    Ok(connection) => {
                        slot.state = State::Open(Arc::clone(connection));
                        held_until_gone(&inner, connection);
                    }
                    Err(_) => {
                        slots.remove(&target);
                    }
                }
            }
            result
        }));
        let future = async move {
            let mut task = task;
            (&mut task.0).await.unwrap_or_else(|err| {
                Err(MqttError::Internal {
                    broker,
                    reason: format!("the connect task failed: {err}"),
                })
            })
        }
        .boxed()
        .shared();
        (id, future)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Target, Slot>> {
        lock(&self.inner)
    }
}

fn opening(id: u64, future: &Opening) -> State {
    State::Opening {
        id,
        future: future.downgrade(),
    }
}

/// One connect: a place under the bound, the TLS configuration, CONNECT until CONNACK.
async fn connect(inner: &Arc<Inner>, target: &Target) -> Result<Arc<Connection>, MqttError> {
    let broker = || target.broker.to_string();
    let place = place(inner).await?;
    let tls = match &target.tls {
        Some(settings) => Some(
            inner
                .tls
                .get(settings)
                .await
                .map_err(|err| MqttError::Tls {
                    broker: broker(),
                    reason: err.to_string(),
                })?,
        ),
        None => None,
    };
    let connect = Connection::open(target, tls, &inner.settings, &inner.metrics, place);
    match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
        Ok(result) => result.map(Arc::new),
        Err(_) => Err(MqttError::NoAnswer {
            broker: broker(),
            reason: format!("no CONNACK within {} s", CONNECT_TIMEOUT.as_secs()),
        }),
    }
}

/// A place under the bound: at once if one is free; else the least recently used idle
/// connection is closed to make room, and while none is idle this waits for one to be.
async fn place(inner: &Arc<Inner>) -> Result<OwnedSemaphorePermit, MqttError> {
    if let Ok(place) = Arc::clone(&inner.places).try_acquire_owned() {
        return Ok(place);
    }
    inner.metrics.mqtt_connection_waited();
    // Counted before looking for an idle connection, so one falling idle meanwhile is seen.
    let _waiting = Waiting::enter(&inner.waiting);
    close_least_recently_used(inner);
    Arc::clone(&inner.places)
        .acquire_owned()
        .await
        .map_err(|err| MqttError::Internal {
            broker: String::new(),
            reason: format!("the pool is closed: {err}"),
        })
}

fn close_least_recently_used(inner: &Inner) {
    let slots = lock(inner);
    let idle = slots
        .values()
        .filter_map(|slot| match &slot.state {
            // A connection that has never carried a publish is about to be leased by the job
            // that opened it: not idle.
            State::Open(connection)
                if !connection.is_ended()
                    && connection.in_use.load(Ordering::Acquire) == 0
                    && connection.has_been_used() =>
            {
                Some(connection)
            }
            _ => None,
        })
        .max_by_key(|connection| connection.idle_for());
    if let Some(connection) = idle {
        connection.close();
        inner.metrics.mqtt_connection_evicted();
    }
}

/// How a connection ended, as far as the pool cares.
enum Loss {
    /// The broker or the network ended it.
    Lost(String),
    /// MQTT 5 DISCONNECT 0x8E: another connection took the session over.
    TakenOver,
}

/// What the pool saw of the connection that ended.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// How long it lived.
    age: Duration,
    /// Lost within [`QUICK_LOSS`] of opening.
    quick: bool,
    /// The broker acknowledged a publish on it.
    worked: bool,
    /// A suspect's publish was alone on it: the loss is that job's doing.
    attributed: bool,
    /// Another worker consumes the queue: there is someone to yield the client-id to.
    may_yield: bool,
}

/// What follows the end of a connection.
enum AfterLoss {
    Reconnect,
    /// Reconnect, unless the broker's port answers: see [`after_loss`].
    ProbeThenReconnect,
    /// Leases wait until the pause ends, then reconnect.
    Pause(State),
    /// Another connection holds the client-id: stop competing for it for a while.
    Yield,
}

/// What follows the end of a connection. Only evidence that no job's publish can produce
/// makes the worker yield the client-id: MQTT 5's DISCONNECT 0x8E (session taken over), or,
/// for MQTT 3.1.1 (whose broker says nothing), a working connection lost quickly twice in a row
/// with no suspect alone on either, while the broker still accepts TCP connections (checked by
/// the probe; a broker that went down refuses it). A loss while a suspect was alone on the
/// connection is that job's doing: it resets the count, and the pool only pauses. Pauses make
/// leases wait for the next connection instead of failing.
fn after_loss(slot: &mut Slot, target: &Target, loss: Option<Loss>, seen: Seen) -> AfterLoss {
    slot.worked |= seen.worked;
    let reason = match loss {
        // Closed on purpose (idle, evicted, stalled).
        None => {
            slot.quick_losses = 0;
            slot.yields = 0;
            return AfterLoss::Reconnect;
        }
        Some(Loss::TakenOver) if seen.may_yield => return AfterLoss::Yield,
        Some(Loss::TakenOver) => {
            let delay = rand::rng().random_range(BLIP_PAUSE_MIN..=BLIP_PAUSE_MAX);
            return AfterLoss::Pause(pause(target, "session taken over", 0, delay));
        }
        Some(Loss::Lost(reason)) => reason,
    };
    if seen.attributed {
        slot.quick_losses = 0;
        // No rest for a job's doing, only connects kept a second apart: brokers limit them
        // per client-id (AWS IoT: one a second).
        let delay = CONNECT_SPACING.saturating_sub(seen.age);
        if delay.is_zero() {
            return AfterLoss::Reconnect;
        }
        return AfterLoss::Pause(pause(target, &reason, 0, delay));
    }
    if !seen.quick {
        slot.quick_losses = 0;
        slot.yields = 0;
        return AfterLoss::Reconnect;
    }
    slot.quick_losses += 1;
    // Twice in a row, a working client-id is being taken from us. Once may be a blip (a
    // connection cut on the way): reconnect after a moment, spread so that workers kicked
    // together do not all come back together. (MQTT 5 too: Mosquitto 2.0 closes a v5
    // connection taken over without sending its DISCONNECT 0x8E.)
    if seen.may_yield && slot.worked && slot.quick_losses > 1 {
        return AfterLoss::ProbeThenReconnect;
    }
    let delay = if slot.worked {
        rand::rng().random_range(BLIP_PAUSE_MIN..=BLIP_PAUSE_MAX)
    } else {
        reconnect_delay(slot.quick_losses)
    };
    AfterLoss::Pause(pause(target, &reason, slot.quick_losses, delay))
}

/// A pause of `delay` before the next connect.
fn pause(target: &Target, reason: &str, quick_losses: u32, delay: Duration) -> State {
    let error = MqttError::PublishLost {
        broker: target.broker.to_string(),
        reason: format!(
            "{reason} (lost {quick_losses} times in a row soon after connecting; next connect \
             in {} ms)",
            delay.as_millis()
        ),
    };
    State::Resting {
        until: Instant::now() + delay,
        error,
        rest: Rest::Pause,
    }
}

/// Whether the broker's port accepts a TCP connection (no MQTT: nothing is taken over).
async fn port_accepts(broker: &Broker) -> bool {
    let connect = tokio::net::TcpStream::connect((broker.host.as_str(), broker.port));
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, connect).await,
        Ok(Ok(_))
    )
}

/// A client-id held on a broker (see [`Pool::held`]).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Held {
    pub broker: String,
    pub client_id: String,
}

/// Tells [`Pool::holdings`] watchers that `connection` opened, and again once it is gone.
fn held_until_gone(inner: &Arc<Inner>, connection: &Connection) {
    inner.holdings.send_modify(|generation| *generation += 1);
    let gone = connection.gone();
    let inner = Arc::downgrade(inner);
    tokio::spawn(async move {
        gone.await;
        if let Some(inner) = inner.upgrade() {
            inner.holdings.send_modify(|generation| *generation += 1);
        }
    });
}

/// The slot of the connect `id` yields its client-id (see [`yield_slot`]).
fn yield_client_id(inner: &Inner, target: &Target, id: u64) -> MqttError {
    let client_id = format!("{}{}", target.client_id, inner.settings.client_id_suffix);
    let mut slots = lock(inner);
    match slots
        .get_mut(target)
        .filter(|slot| matches!(slot.state, State::Opening { id: current, .. } if current == id))
    {
        Some(slot) => yield_slot(slot, target, &client_id),
        None => held_elsewhere(target, &client_id, yield_delay(1)),
    }
}

/// The slot yields its client-id: it rests (leases answer [`MqttError::HeldElsewhere`]) for
/// a while that doubles each time in a row. Logged at WARN: jobs wait or go back to the queue.
fn yield_slot(slot: &mut Slot, target: &Target, client_id: &str) -> MqttError {
    slot.yields += 1;
    slot.quick_losses = 0;
    let delay = yield_delay(slot.yields);
    tracing::warn!(
        client_id,
        broker = %target.broker,
        yield_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
        yields_in_a_row = slot.yields,
        "another connection holds this client-id (it took ours over): this worker stops \
         competing for it for a while; its jobs wait or go to a sibling worker"
    );
    let error = held_elsewhere(target, client_id, delay);
    slot.state = State::Resting {
        until: Instant::now() + delay,
        error: error.clone(),
        rest: Rest::Yield,
    };
    error
}

fn held_elsewhere(target: &Target, client_id: &str, delay: Duration) -> MqttError {
    MqttError::HeldElsewhere {
        broker: target.broker.to_string(),
        client_id: client_id.to_owned(),
        rest_ms: delay.as_millis(),
    }
}

/// How long to yield a client-id held elsewhere, the `yields`-th time in a row.
fn yield_delay(yields: u32) -> Duration {
    let mut backoff = Backoff::new(FIRST_YIELD, MAX_YIELD);
    (1..yields).for_each(|_| {
        backoff.next_delay();
    });
    // Never below the first step's half: a yield shorter than a burst only adds takeovers.
    backoff.next_delay().max(FIRST_YIELD / 2)
}

/// How long to rest before reconnecting after quick losses: 200 ms doubling up to 5 s, with
/// jitter (workers kicking each other off one client-id at start-up spread out).
fn reconnect_delay(quick_losses: u32) -> Duration {
    if quick_losses < 1 {
        return Duration::ZERO;
    }
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    (1..quick_losses).for_each(|_| {
        backoff.next_delay();
    });
    backoff.next_delay()
}

fn lock(inner: &Inner) -> std::sync::MutexGuard<'_, HashMap<Target, Slot>> {
    // A panic while holding this lock cannot leave the map inconsistent: keep going.
    inner
        .slots
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Closes idle connections and forgets ended ones and abandoned connects, until the pool is
/// dropped.
async fn reap_idle(pool: Weak<Inner>, idle_timeout: Duration) {
    let period = (idle_timeout / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        tokio::time::sleep(period).await;
        let Some(inner) = pool.upgrade() else { return };
        lock(&inner).retain(|_, slot| match &slot.state {
            State::Open(connection) if connection.idle_for() >= idle_timeout => {
                connection.close();
                false
            }
            State::Resting { until, .. } => Instant::now() < *until + idle_timeout,
            State::Opening { future, .. } => {
                future.as_ref().and_then(WeakShared::upgrade).is_some()
            }
            // An ended connection stays, to remember its quick losses, until idle.
            State::Open(_) => true,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{Broker, MqttVersion, Target};

    fn target(version: MqttVersion) -> Target {
        Target {
            broker: Broker::parse("tcp://h:1883").expect("broker"),
            client_id: "c".into(),
            username: None,
            password: None,
            tls: None,
            version,
        }
    }

    fn slot() -> Slot {
        Slot {
            state: State::Resting {
                until: Instant::now(),
                error: MqttError::Internal {
                    broker: String::new(),
                    reason: String::new(),
                },
                rest: Rest::Pause,
            },
            quick_losses: 0,
            yields: 0,
            worked: false,
        }
    }

    fn lost() -> Option<Loss> {
        Some(Loss::Lost("closed".into()))
    }

    const QUICK_WORKING: Seen = Seen {
        age: Duration::from_millis(100),
        quick: true,
        worked: true,
        attributed: false,
        may_yield: true,
    };

    #[test]
    fn a_connection_that_lived_long_is_simply_reconnected_and_the_counters_reset() {
        let mut slot = Slot {
            quick_losses: 3,
            yields: 2,
            ..slot()
        };
        let seen = Seen {
            quick: false,
            ..QUICK_WORKING
        };
        assert!(matches!(
            after_loss(&mut slot, &target(MqttVersion::V3_1_1), lost(), seen),
            AfterLoss::Reconnect
        ));
        assert_eq!((slot.quick_losses, slot.yields), (0, 0));
    }

    #[test]
    fn a_connection_lost_quickly_before_it_ever_worked_pauses_and_leases_wait() {
        let mut slot = slot();
        let seen = Seen {
            worked: false,
            ..QUICK_WORKING
        };
        match after_loss(&mut slot, &target(MqttVersion::V3_1_1), lost(), seen) {
            AfterLoss::Pause(State::Resting {
                rest: Rest::Pause,
                error: MqttError::PublishLost { reason, .. },
                ..
            }) => {
                assert!(
                    reason.contains("closed") && reason.contains("1 times"),
                    "{reason}"
                );
            }
            _ => panic!("expected a pause"),
        }
    }

    #[test]
    fn a_working_3_1_1_connection_lost_quickly_twice_with_no_suspect_probes_the_broker() {
        let mut slot = slot();
        let v4 = target(MqttVersion::V3_1_1);
        assert!(matches!(
            after_loss(&mut slot, &v4, lost(), QUICK_WORKING),
            AfterLoss::Pause(..)
        ));
        assert!(matches!(
            after_loss(&mut slot, &v4, lost(), QUICK_WORKING),
            AfterLoss::ProbeThenReconnect
        ));
    }

    #[test]
    fn a_loss_with_a_suspect_alone_on_the_connection_is_never_taken_for_a_takeover() {
        let mut slot = slot();
        let v4 = target(MqttVersion::V3_1_1);
        let attributed = Seen {
            attributed: true,
            ..QUICK_WORKING
        };
        for _ in 0..10 {
            assert!(matches!(
                after_loss(&mut slot, &v4, lost(), QUICK_WORKING),
                AfterLoss::Pause(..)
            ));
            assert!(matches!(
                after_loss(&mut slot, &v4, lost(), attributed),
                AfterLoss::Pause(..)
            ));
        }
        assert_eq!((slot.quick_losses, slot.yields), (0, 0));
    }

    #[test]
    fn mqtt_5_yields_at_once_on_session_taken_over() {
        let mut slot = slot();
        let v5 = target(MqttVersion::V5);
        let taken = Some(Loss::TakenOver);
        assert!(matches!(
            after_loss(&mut slot, &v5, taken, QUICK_WORKING),
            AfterLoss::Yield
        ));
    }

    #[test]
    fn a_worker_without_siblings_never_yields_and_takes_its_client_id_back() {
        let alone = Seen {
            may_yield: false,
            ..QUICK_WORKING
        };
        for version in [MqttVersion::V3_1_1, MqttVersion::V5] {
            let mut slot = slot();
            for _ in 0..5 {
                assert!(matches!(
                    after_loss(&mut slot, &target(version), lost(), alone),
                    AfterLoss::Pause(..)
                ));
            }
            assert!(matches!(
                after_loss(&mut slot, &target(version), Some(Loss::TakenOver), alone),
                AfterLoss::Pause(..)
            ));
            assert_eq!(slot.yields, 0);
        }
    }

    #[test]
    fn a_loss_attributed_to_a_job_only_keeps_connects_a_second_apart() {
        let v4 = target(MqttVersion::V3_1_1);
        let attributed = |age| Seen {
            age,
            attributed: true,
            ..QUICK_WORKING
        };
        let mut slot = slot();
        match after_loss(
            &mut slot,
            &v4,
            lost(),
            attributed(Duration::from_millis(300)),
        ) {
            AfterLoss::Pause(State::Resting { until, rest, .. }) => {
                assert_eq!(rest, Rest::Pause);
                assert!(until <= Instant::now() + Duration::from_millis(700));
            }
            _ => panic!("expected a short pause"),
        }
        assert!(matches!(
            after_loss(&mut slot, &v4, lost(), attributed(Duration::from_secs(2))),
            AfterLoss::Reconnect
        ));
    }

    #[tokio::test]
    async fn the_client_id_used_carries_the_workers_suffix() {
        let settings = ConnectionSettings {
            client_id_suffix: "-host-42".into(),
            ..ConnectionSettings::default()
        };
        let pool = Pool::new(settings, Duration::from_secs(60), 10, Metrics::new());
        assert_eq!(pool.client_id(&target(MqttVersion::V5)), "c-host-42");
    }

    #[tokio::test]
    async fn taking_a_client_id_back_ends_its_yield_at_once() {
        let pool = Pool::new(
            ConnectionSettings::default(),
            Duration::from_secs(60),
            10,
            Metrics::new(),
        );
        let target = target(MqttVersion::V3_1_1);
        let mut yielded = slot();
        yield_slot(&mut yielded, &target, "c");
        pool.lock().insert(target.clone(), yielded);
        let resting_until = |pool: &Pool| match &pool.lock().get(&target).expect("slot").state {
            State::Resting { until, .. } => *until,
            _ => panic!("expected a rest"),
        };
        assert!(resting_until(&pool) > Instant::now());
        pool.take_back(&target);
        assert!(resting_until(&pool) <= Instant::now());
    }

    #[test]
    fn yields_double_and_stay_bounded() {
        assert!(yield_delay(1) >= FIRST_YIELD / 2 && yield_delay(1) <= FIRST_YIELD);
        assert!(yield_delay(2) >= FIRST_YIELD);
        assert!(yield_delay(30) <= MAX_YIELD);
    }

    #[tokio::test]
    async fn a_yield_rests_the_slot_that_was_opening() {
        let inner = Inner {
            slots: Mutex::new(HashMap::new()),
            settings: ConnectionSettings::default(),
            metrics: Metrics::new(),
            next_id: AtomicU64::new(0),
            places: Arc::new(Semaphore::new(1)),
            waiting: AtomicUsize::new(0),
            tls: TlsConfigs::default(),
            gates: Mutex::new(HashMap::new()),
            siblings: OnceLock::new(),
            holdings: tokio::sync::watch::channel(0).0,
        };
        let v4 = target(MqttVersion::V3_1_1);
        let opening = Slot {
            state: State::Opening {
                id: 7,
                future: None,
            },
            ..slot()
        };
        lock(&inner).insert(v4.clone(), opening);
        let error = yield_client_id(&inner, &v4, 7);
        assert!(matches!(error, MqttError::HeldElsewhere { .. }));
        let slots = lock(&inner);
        let slot = slots.get(&v4).expect("slot");
        assert_eq!(slot.yields, 1);
        assert!(matches!(
            &slot.state,
            State::Resting { until, rest: Rest::Yield, .. } if *until > Instant::now()
        ));
    }

    #[tokio::test]
    async fn ordinary_publishes_wait_while_a_suspect_waits_and_a_suspect_goes_alone() {
        let gate = Arc::new(Gate::new());
        let suspect = gate.suspect();
        let waiting = tokio::time::timeout(Duration::from_millis(100), gate.ordinary()).await;
        assert!(
            waiting.is_err(),
            "an ordinary publish went before a suspect"
        );
        {
            let _alone = gate.alone().await;
            assert!(gate.lock.try_read().is_err());
        }
        drop(suspect);
        let first = tokio::time::timeout(Duration::from_secs(1), gate.ordinary())
            .await
            .expect("ordinary after the suspect");
        let second = tokio::time::timeout(Duration::from_secs(1), gate.ordinary())
            .await
            .expect("ordinary publishes share");
        drop((first, second));
    }
}
