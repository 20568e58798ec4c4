//! The connection pool: one connection per target (broker, client-id, credentials, TLS),
//! shared by every job for that target. Concurrent jobs for a target that is still connecting
//! wait for the same attempt; a connection that ended is replaced on the next lease; one idle
//! longer than the idle timeout is closed by a reaper.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

use super::MqttError;
use super::connection::{Connection, ConnectionSettings, End};
use crate::backoff::Backoff;
use crate::job::Target;
use crate::metrics::Metrics;

type Opening = Shared<BoxFuture<'static, Result<Arc<Connection>, MqttError>>>;

/// Backstop for one connect attempt shared by many jobs; each job's own timeout is usually shorter.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// A connection lost sooner than this after opening counts as a quick loss: the next one to the
/// same target waits first (two workers sharing a client-id take the connection from each other).
const QUICK_LOSS: Duration = Duration::from_secs(10);

struct Slot {
    state: State,
    /// Connections to this target lost quickly, in a row.
    quick_losses: u32,
}

enum State {
    Open(Arc<Connection>),
    /// Lost quickly several times in a row: until `until`, leases fail at once with `error`
    /// (the job retries with its own backoff) instead of reconnecting.
    Resting {
        until: Instant,
        error: MqttError,
    },
    /// A connect in progress, awaited by every job that needs it; `id` tells attempts apart.
    Opening {
        id: u64,
        future: Opening,
    },
}

struct Inner {
    slots: Mutex<HashMap<Target, Slot>>,
    settings: ConnectionSettings,
    metrics: Metrics,
    next_id: AtomicU64,
}

/// Cloneable handle to the pool.
#[derive(Clone)]
pub struct Pool {
    inner: Arc<Inner>,
}

/// A connection in use by one job; the pool will not close it while any lease is held.
pub struct Lease {
    connection: Arc<Connection>,
}

impl std::ops::Deref for Lease {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.connection
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.connection.in_use.fetch_sub(1, Ordering::AcqRel);
    }
}

fn lease(connection: &Arc<Connection>) -> Lease {
    connection.in_use.fetch_add(1, Ordering::AcqRel);
    Lease {
        connection: Arc::clone(connection),
    }
}

impl Pool {
    /// A pool whose connections close after `idle_timeout` without a publish.
    pub fn new(settings: ConnectionSettings, idle_timeout: Duration, metrics: Metrics) -> Pool {
        let inner = Arc::new(Inner {
            slots: Mutex::new(HashMap::new()),
            settings,
            metrics,
            next_id: AtomicU64::new(0),
        });
        tokio::spawn(reap_idle(Arc::downgrade(&inner), idle_timeout));
        Pool { inner }
    }

    /// A live connection to `target`, opening one if needed.
    pub async fn lease(&self, target: &Target) -> Result<Lease, MqttError> {
        let opening = {
            let mut slots = self.lock();
            match slots.get_mut(target) {
                Some(Slot {
                    state: State::Open(connection),
                    ..
                }) if !connection.is_ended() => return Ok(lease(connection)),
                Some(slot) => match &slot.state {
                    State::Opening { future, .. } => future.clone(),
                    State::Resting { until, error } if Instant::now() < *until => {
                        return Err(error.clone());
                    }
                    State::Resting { .. } => self.reopen(slot, target),
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
                        slot.quick_losses = match loss {
                            Some(_) if connection.age() < QUICK_LOSS => slot.quick_losses + 1,
                            _ => 0,
                        };
                        let delay = reconnect_delay(slot.quick_losses);
                        if let Some(reason) = loss.filter(|_| !delay.is_zero()) {
                            let error = MqttError::PublishLost {
                                broker: target.broker.to_string(),
                                reason: format!(
                                    "{reason} (lost {} times in a row soon after connecting; \
                                     next connect in {} ms)",
                                    slot.quick_losses,
                                    delay.as_millis()
                                ),
                            };
                            slot.state = State::Resting {
                                until: Instant::now() + delay,
                                error: error.clone(),
                            };
                            return Err(error);
                        }
                        self.reopen(slot, target)
                    }
                },
                None => {
                    let (id, future) = self.open(target);
                    let state = State::Opening {
                        id,
                        future: future.clone(),
                    };
                    slots.insert(
                        target.clone(),
                        Slot {
                            state,
                            quick_losses: 0,
                        },
                    );
                    future
                }
            }
        };
        opening.await.map(|connection| lease(&connection))
    }

    /// Starts a new connect for an existing slot.
    fn reopen(&self, slot: &mut Slot, target: &Target) -> Opening {
        let (id, future) = self.open(target);
        slot.state = State::Opening {
            id,
            future: future.clone(),
        };
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

    /// Starts connecting in a task of its own, so the attempt runs to its end (and settles the
    /// slot) even when every job waiting for it has timed out.
    fn open(&self, target: &Target) -> (u64, Opening) {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let target = target.clone();
        let inner = Arc::clone(&self.inner);
        let broker = target.broker.to_string();
        let task = tokio::spawn(async move {
            let connect = Connection::open(&target, &inner.settings, &inner.metrics);
            let result = match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
                Ok(result) => result.map(Arc::new),
                Err(_) => Err(MqttError::NoAnswer {
                    broker: target.broker.to_string(),
                    reason: format!("no CONNACK within {} s", CONNECT_TIMEOUT.as_secs()),
                }),
            };
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
        });
        let future = async move {
            task.await.unwrap_or_else(|err| {
                Err(MqttError::Connect {
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

/// How long to rest before reconnecting: not after the first quick loss; then 200 ms doubling
/// up to 5 s, with jitter.
fn reconnect_delay(quick_losses: u32) -> Duration {
    if quick_losses < 2 {
        return Duration::ZERO;
    }
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    (2..quick_losses).for_each(|_| {
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

/// Closes idle connections and forgets ended ones, until the pool is dropped.
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
            // An ended connection stays, to remember its quick losses, until idle.
            _ => true,
        });
    }
}
