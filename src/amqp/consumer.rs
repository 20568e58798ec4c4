//! One consuming session: connect to the first node that answers, make sure the request queue
//! exists, set the prefetch and publisher confirms, and start consuming. The worker opens a new
//! session, with backoff, whenever one ends.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer, Event};
use tokio::sync::watch;

use super::nodes::{AllNodesFailed, Nodes};
use super::queue::{self, QueueError, QueueSettings};

/// Bounds every setup call, so a RabbitMQ that never answers cannot hang us.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// How long closing a connection may take before we drop it anyway.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a session could not start or ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Connect(#[from] AllNodesFailed),
    #[error(transparent)]
    Queue(#[from] QueueError),
    #[error("RabbitMQ refused to {step}")]
    Setup {
        step: &'static str,
        #[source]
        source: lapin::Error,
    },
    #[error("RabbitMQ did not {step} within {after:?}")]
    Timeout { step: &'static str, after: Duration },
    #[error("the consumer failed")]
    Consumer(#[source] lapin::Error),
    #[error("RabbitMQ cancelled the consumer (queue deleted, or its node lost)")]
    Cancelled,
}

/// A live session: keep it whole while jobs from its consumer are in flight, since their
/// replies and acks go through its channel.
pub struct Session {
    pub connection: Connection,
    pub channel: Channel,
    pub consumer: Consumer,
    /// Which of the nodes it is connected to.
    pub node: usize,
    /// Whether RabbitMQ blocks the connection (an alarm).
    pub flow: Flow,
}

/// Whether RabbitMQ blocks a connection's publishers (`connection.blocked`, a memory or disk
/// alarm) right now. Cheap to clone; follows the connection's events until every clone is gone.
#[derive(Clone, Debug)]
pub struct Flow(watch::Receiver<bool>);

impl Flow {
    /// Follows `connection`'s `connection.blocked` / `connection.unblocked` notifications.
    pub fn watch(connection: &Connection) -> Flow {
        let (sender, receiver) = watch::channel(connection.status().blocked());
        let mut events = connection.events_listener();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = sender.closed() => break,
                    event = events.next() => match event {
                        Some(Event::ConnectionBlocked(reason)) => {
                            tracing::warn!(%reason, "RabbitMQ blocks the connection (an alarm): replies wait until it lifts");
                            sender.send_replace(true);
                        }
                        Some(Event::ConnectionUnblocked) => {
                            tracing::info!("RabbitMQ unblocked the connection");
                            sender.send_replace(false);
                        }
                        Some(_) => {}
                        None => break,
                    },
                }
            }
        });
        Flow(receiver)
    }

    /// A flow that is never blocked (no connection behind it).
    pub fn never_blocked() -> Flow {
        // With its sender gone the value stays `false` and `blocked()` never returns.
        let (_, receiver) = watch::channel(false);
        Flow(receiver)
    }

    /// A flow driven by hand (tests).
    #[cfg(test)]
    pub(crate) fn manual() -> (watch::Sender<bool>, Flow) {
        let (sender, receiver) = watch::channel(false);
        (sender, Flow(receiver))
    }

    pub fn is_blocked(&self) -> bool {
        *self.0.borrow()
    }

    /// Returns once the connection is blocked; never if it never is (or is gone).
    pub async fn blocked(&self) {
        let mut receiver = self.0.clone();
        if receiver.wait_for(|blocked| *blocked).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Returns once the connection is not blocked (at once when it is gone).
    pub async fn unblocked(&self) {
        let mut receiver = self.0.clone();
        let _ = receiver.wait_for(|blocked| !*blocked).await;
    }

    /// Returns at the next change; never once the connection is gone.
    pub async fn changed(&mut self) -> bool {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
        *self.0.borrow_and_update()
    }
}

async fn bounded<T>(
    step: &'static str,
    future: impl Future<Output = lapin::Result<T>>,
) -> Result<T, SessionError> {
    match tokio::time::timeout(SETUP_TIMEOUT, future).await {
        Ok(result) => result.map_err(|source| SessionError::Setup { step, source }),
        Err(_) => Err(SessionError::Timeout {
            step,
            after: SETUP_TIMEOUT,
        }),
    }
}

impl Session {
    /// Connects (trying the nodes from `start`) and starts consuming `queue`.
    pub async fn open(
        nodes: &Nodes,
        start: usize,
        queue: &QueueSettings,
        prefetch: u16,
    ) -> Result<Session, SessionError> {
        let (connection, node) = nodes.connect(start).await?;
        let flow = Flow::watch(&connection);
        match consume(&connection, queue, prefetch).await {
            Ok((channel, consumer)) => Ok(Session {
                connection,
                channel,
                consumer,
                node,
                flow,
            }),
            Err(err) => {
                // A session that failed half-way must not leave its connection open.
                close(&connection, "setup failed").await;
                Err(err)
            }
        }
    }
}

async fn consume(
    connection: &Connection,
    queue: &QueueSettings,
    prefetch: u16,
) -> Result<(Channel, Consumer), SessionError> {
    queue::ensure(connection, queue).await?;
    let channel = bounded("open a channel", connection.create_channel()).await?;
    bounded(
        "set the prefetch",
        channel.basic_qos(prefetch, BasicQosOptions::default()),
    )
    .await?;
    bounded(
        "enable publisher confirms",
        channel.confirm_select(ConfirmSelectOptions::default()),
    )
    .await?;
    let consumer = resume(&channel, queue).await?;
    Ok((channel, consumer))
}

/// Starts (or starts again) consuming `queue` on `channel`.
pub async fn resume(channel: &Channel, queue: &QueueSettings) -> Result<Consumer, SessionError> {
    bounded(
        "start consuming",
        channel.basic_consume(
            queue.name.as_str().into(),
            format!("mqtt-connector-{}", uuid::Uuid::new_v4()).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ),
    )
    .await
}

/// Closes a channel (bounded) if it is still open: before its connection closes, so lapin does
/// not close it by itself (when the last handle goes) in the middle of that.
pub async fn close_channel(channel: &Channel) {
    if channel.status().connected() {
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, channel.close(200, "ok".into())).await;
    }
}

/// Closes a connection (bounded); one already lost is fine.
pub async fn close(connection: &Connection, reason: &str) {
    let closing = connection.close(200, reason.into());
    match tokio::time::timeout(CLOSE_TIMEOUT, closing).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::debug!(error = %err, "closing the RabbitMQ connection"),
        Err(_) => tracing::debug!("RabbitMQ did not confirm the close in time"),
    }
}
