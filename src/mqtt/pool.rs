//! The connection pool: one connection per target (broker, client-id, credentials, TLS),
//! shared by every job for that target. Concurrent jobs for a target that is still connecting
//! wait for the same attempt; a connection that ended is replaced on the next lease; one idle
//! longer than the idle timeout is closed by a reaper.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};

use super::MqttError;
use super::connection::{Connection, ConnectionSettings, End};
use crate::job::Target;
use crate::metrics::Metrics;

type Opening = Shared<BoxFuture<'static, Result<Arc<Connection>, MqttError>>>;

enum Slot {
    Open(Arc<Connection>),
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
        let (id, opening) = {
            let mut slots = self.lock();
            match slots.entry(target.clone()) {
                Entry::Occupied(mut slot) => match slot.get() {
                    Slot::Open(connection) if !connection.is_ended() => {
                        return Ok(lease(connection));
                    }
                    Slot::Open(connection) => {
                        if let Some(End::Lost(_)) = connection.end() {
                            self.inner
                                .metrics
                                .mqtt_reconnect(&target.broker.to_string());
                        }
                        let (id, future) = self.open(target);
                        slot.insert(Slot::Opening {
                            id,
                            future: future.clone(),
                        });
                        (id, future)
                    }
                    Slot::Opening { id, future } => (*id, future.clone()),
                },
                Entry::Vacant(slot) => {
                    let (id, future) = self.open(target);
                    slot.insert(Slot::Opening {
                        id,
                        future: future.clone(),
                    });
                    (id, future)
                }
            }
        };
        let result = opening.await;
        let mut slots = self.lock();
        let ours =
            matches!(slots.get(target), Some(Slot::Opening { id: current, .. }) if *current == id);
        match result {
            Ok(connection) => {
                if ours {
                    slots.insert(target.clone(), Slot::Open(Arc::clone(&connection)));
                }
                Ok(lease(&connection))
            }
            Err(err) => {
                if ours {
                    slots.remove(target);
                }
                Err(err)
            }
        }
    }

    /// Closes every connection (at shutdown, once no job is in flight).
    pub fn close_all(&self) {
        for (_, slot) in self.lock().drain() {
            if let Slot::Open(connection) = slot {
                connection.close();
            }
        }
    }

    /// Open connections (for tests and diagnostics).
    pub fn open_connections(&self) -> usize {
        self.lock()
            .values()
            .filter(|slot| matches!(slot, Slot::Open(c) if !c.is_ended()))
            .count()
    }

    fn open(&self, target: &Target) -> (u64, Opening) {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let target = target.clone();
        let inner = Arc::clone(&self.inner);
        let future = async move {
            Connection::open(&target, &inner.settings, &inner.metrics)
                .await
                .map(Arc::new)
        }
        .boxed()
        .shared();
        (id, future)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Target, Slot>> {
        lock(&self.inner)
    }
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
        lock(&inner).retain(|_, slot| match slot {
            Slot::Open(connection) if connection.is_ended() => false,
            Slot::Open(connection) if connection.idle_for() >= idle_timeout => {
                connection.close();
                false
            }
            _ => true,
        });
    }
}
