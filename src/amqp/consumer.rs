//! One consuming session: connect to the first node that answers, make sure the request queue
//! exists, set the prefetch and publisher confirms, and start consuming. The worker opens a new
//! session, with backoff, whenever one ends.

use std::time::Duration;

use lapin::options::{BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};

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
        match consume(&connection, queue, prefetch).await {
            Ok((channel, consumer)) => Ok(Session {
                connection,
                channel,
                consumer,
                node,
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

/// Closes a connection (bounded); one already lost is fine.
pub async fn close(connection: &Connection, reason: &str) {
    let closing = connection.close(200, reason.into());
    match tokio::time::timeout(CLOSE_TIMEOUT, closing).await {
        Ok(Ok(())) => {}
        Ok(Err(err)) => tracing::debug!(error = %err, "closing the RabbitMQ connection"),
        Err(_) => tracing::debug!("RabbitMQ did not confirm the close in time"),
    }
}
