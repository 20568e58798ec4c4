//! The connection pool: one connection per target (broker, client-id, credentials, TLS),
//! shared by every job for that target, and at most `max_connections` of them open. Concurrent
//! jobs for a target that is still connecting wait for the same attempt, which is abandoned (its
//! socket closed) as soon as no job waits for it any more; a connection that ended is replaced
//! on the next lease; one idle longer than the idle timeout is closed by a reaper. At the bound,
//! the least recently used idle connection makes room, and a connect that finds every
//! connection busy waits (within its job's timeout) for one to fall idle.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared, WeakShared};
use rand::Rng;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;

use super::MqttError;
use super::connection::{Connection, ConnectionSettings, End};
use super::tls::TlsConfigs;
use crate::backoff::Backoff;
use crate::job::{Broker, Target};
use crate::metrics::Metrics;

/// The contract's default for `--max-connections`.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1000;

type ConnectFuture = BoxFuture<'static, Result<Arc<Connection>, MqttError>>;
type Opening = Shared<ConnectFuture>;

/// Backstop for one connect attempt shared by many jobs; each job's own timeout is usually shorter.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection lost sooner than this after opening counts as a quick loss: the next one to the
/// same target waits first (two workers sharing a client-id take the connection from each other).
const QUICK_LOSS: Duration = Duration::from_secs(10);
/// How long a worker first stops competing for a client-id that another connection took over
/// from a working one; doubled each time it happens again, up to [`MAX_YIELD`].
const FIRST_YIELD: Duration = Duration::from_secs(60);
const MAX_YIELD: Duration = Duration::from_secs(600);
/// How long a worker waits before reconnecting after the first quick loss of a working
/// connection.
const BLIP_PAUSE_MIN: Duration = Duration::from_millis(500);
const BLIP_PAUSE_MAX: Duration = Duration::from_millis(1500);
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

enum State {
    Open(Arc<Connection>),
    /// Lost quickly several times in a row: until `until`, leases fail at once with `error`
    /// (the job retries with its own backoff) instead of reconnecting.
    Resting {
        until: Instant,
        error: MqttError,
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

/// What a lease does next, decided under the lock.
enum Step {
    Ready(Lease),
    Wait(Opening),
    Fail(MqttError),
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
        });
        tokio::spawn(reap_idle(Arc::downgrade(&inner), idle_timeout));
        Pool { inner }
    }

    /// A live connection to `target`, opening one if needed.
    pub async fn lease(&self, target: &Target) -> Result<Lease, MqttError> {
        let step = {
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
        };
        match step {
            Step::Ready(lease) => Ok(lease),
            Step::Fail(error) => Err(error),
            Step::Wait(opening) => {
                let connection = opening.await?;
                let leased = lease(&connection, &self.inner);
                if connection.is_ended() {
                    // Closed between its CONNACK and this lease (made room for another, or
                    // lost): the job retries on a new one.
                    return Err(connection.lost());
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
            State::Resting { until, error } if Instant::now() < *until => Step::Fail(error.clone()),
            State::Resting { .. } => Step::Wait(self.reopen(slot, target, false)),
            State::Open(connection) => {
                let loss = match connection.end() {
                    Some(End::Lost(reason)) => Some(reason.clone()),
                    _ => None,
                };
                if loss.is_some() {
                    self.inner
                        .metrics
                        .mqtt_reconnect(&target.broker.to_string());
                }
                let quick_loss = loss.filter(|_| connection.age() < QUICK_LOSS);
                let worked = connection.has_worked();
                match after_loss(slot, target, quick_loss, worked) {
                    AfterLoss::Rest(state, error) => {
                        slot.state = state;
                        Step::Fail(error)
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
                    Ok(connection) => slot.state = State::Open(Arc::clone(connection)),
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

/// What follows the end of a connection.
enum AfterLoss {
    Reconnect,
    /// Reconnect, unless the broker's port answers: see [`after_loss`].
    ProbeThenReconnect,
    Rest(State, MqttError),
}

/// What follows the end of a connection. A working connection lost quickly while its broker
/// still accepts connections was taken over: another connection (a sibling worker with the
/// same options) holds the client-id, and this worker yields it for a while instead of taking
/// it back, so the broker does not see the two take it from each other in a loop. (A broker
/// that went down refuses the probe, and the connection is simply retried.) A connection lost
/// quickly before it ever worked is retried with a short backoff.
fn after_loss(
    slot: &mut Slot,
    target: &Target,
    quick_loss: Option<String>,
    worked: bool,
) -> AfterLoss {
    slot.worked |= worked;
    let Some(reason) = quick_loss else {
        slot.quick_losses = 0;
        slot.yields = 0;
        return AfterLoss::Reconnect;
    };
    slot.quick_losses += 1;
    // Twice in a row, a working client-id is being taken from us. Once may be a blip (a
    // connection cut on the way): reconnect after a moment, spread so that workers kicked
    // together do not all come back together.
    if slot.worked && slot.quick_losses > 1 {
        return AfterLoss::ProbeThenReconnect;
    }
    let delay = if slot.worked {
        rand::rng().random_range(BLIP_PAUSE_MIN..=BLIP_PAUSE_MAX)
    } else {
        reconnect_delay(slot.quick_losses)
    };
    let error = MqttError::PublishLost {
        broker: target.broker.to_string(),
        reason: format!(
            "{reason} (lost {} times in a row soon after connecting; next connect in {} ms)",
            slot.quick_losses,
            delay.as_millis()
        ),
    };
    let state = State::Resting {
        until: Instant::now() + delay,
        error: error.clone(),
    };
    AfterLoss::Rest(state, error)
}

/// Whether the broker's port accepts a TCP connection (no MQTT: nothing is taken over).
async fn port_accepts(broker: &Broker) -> bool {
    let connect = tokio::net::TcpStream::connect((broker.host.as_str(), broker.port));
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, connect).await,
        Ok(Ok(_))
    )
}

/// The slot yields its client-id: it rests (leases answer [`MqttError::HeldElsewhere`]) for
/// a while that doubles each time in a row.
fn yield_client_id(inner: &Inner, target: &Target, id: u64) -> MqttError {
    let mut slots = lock(inner);
    let slot = slots
        .get_mut(target)
        .filter(|slot| matches!(slot.state, State::Opening { id: current, .. } if current == id));
    let yields = slot.as_ref().map_or(1, |slot| slot.yields + 1);
    let delay = yield_delay(yields);
    let error = MqttError::HeldElsewhere {
        broker: target.broker.to_string(),
        client_id: target.client_id.clone(),
        rest_ms: delay.as_millis(),
    };
    if let Some(slot) = slot {
        slot.yields = yields;
        slot.state = State::Resting {
            until: Instant::now() + delay,
            error: error.clone(),
        };
    }
    error
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

    fn target() -> Target {
        Target {
            broker: Broker::parse("tcp://h:1883").expect("broker"),
            client_id: "c".into(),
            username: None,
            password: None,
            tls: None,
            version: MqttVersion::V3_1_1,
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
            },
            quick_losses: 0,
            yields: 0,
            worked: false,
        }
    }

    #[test]
    fn a_connection_that_lived_long_is_simply_reconnected_and_the_counters_reset() {
        let mut slot = Slot {
            quick_losses: 3,
            yields: 2,
            ..slot()
        };
        assert!(matches!(
            after_loss(&mut slot, &target(), None, true),
            AfterLoss::Reconnect
        ));
        assert_eq!((slot.quick_losses, slot.yields), (0, 0));
    }

    #[test]
    fn a_connection_lost_quickly_before_it_ever_worked_rests_with_the_loss_as_its_answer() {
        let mut slot = slot();
        match after_loss(&mut slot, &target(), Some("closed".into()), false) {
            AfterLoss::Rest(State::Resting { .. }, MqttError::PublishLost { reason, .. }) => {
                assert!(
                    reason.contains("closed") && reason.contains("1 times"),
                    "{reason}"
                );
            }
            _ => panic!("expected a rest"),
        }
    }

    #[test]
    fn a_working_connection_lost_quickly_twice_probes_the_broker_before_reconnecting() {
        let mut slot = slot();
        assert!(matches!(
            after_loss(&mut slot, &target(), Some("cut".into()), true),
            AfterLoss::Rest(..)
        ));
        assert!(matches!(
            after_loss(&mut slot, &target(), Some("closed".into()), true),
            AfterLoss::ProbeThenReconnect
        ));
        // Once a connection to this target worked, later quick losses probe too.
        assert!(matches!(
            after_loss(&mut slot, &target(), Some("closed".into()), false),
            AfterLoss::ProbeThenReconnect
        ));
    }

    #[test]
    fn yields_double_from_the_first_and_stay_bounded() {
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
        };
        let opening = Slot {
            state: State::Opening {
                id: 7,
                future: None,
            },
            ..slot()
        };
        lock(&inner).insert(target(), opening);
        let error = yield_client_id(&inner, &target(), 7);
        assert!(matches!(error, MqttError::HeldElsewhere { .. }));
        let slots = lock(&inner);
        let slot = slots.get(&target()).expect("slot");
        assert_eq!(slot.yields, 1);
        assert!(matches!(&slot.state, State::Resting { until, .. } if *until > Instant::now()));
    }
}
