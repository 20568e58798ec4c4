//! One consuming session: connect to RabbitMQ, make sure the request queue exists, set the
//! prefetch and publisher confirms, and start consuming. The worker opens a new session, with
//! backoff, whenever one ends.

use std::time::Duration;

use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, ConnectionProperties, Consumer};

/// Bounds connecting and every setup call, so a RabbitMQ that never answers cannot hang us.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a session could not start or ended.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("RabbitMQ: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ did not answer within {0:?}")]
    Timeout(Duration),
    #[error("RabbitMQ ended the consumer (queue deleted or connection closed)")]
    ConsumerEnded,
}

/// A live session: keep it whole while jobs from its consumer are in flight, since their
/// replies and acks go through its channel.
pub struct Session {
    pub connection: Connection,
    pub channel: Channel,
    pub consumer: Consumer,
}

async fn bounded<T>(step: impl Future<Output = lapin::Result<T>>) -> Result<T, SessionError> {
    match tokio::time::timeout(SETUP_TIMEOUT, step).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(SessionError::Timeout(SETUP_TIMEOUT)),
    }
}

impl Session {
    pub async fn open(url: &str, queue: &str, prefetch: u16) -> Result<Session, SessionError> {
        let connection = bounded(Connection::connect(url, ConnectionProperties::default())).await?;
        declare_queue(&connection, queue).await?;
        let channel = bounded(connection.create_channel()).await?;
        bounded(channel.basic_qos(prefetch, BasicQosOptions::default())).await?;
        bounded(channel.confirm_select(ConfirmSelectOptions::default())).await?;
        let consumer = bounded(channel.basic_consume(
            queue.into(),
            format!("mqtt-connector-{}", uuid::Uuid::new_v4()).into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        ))
        .await?;
        Ok(Session {
            connection,
            channel,
            consumer,
        })
    }
}

/// Declares the queue durable if it is missing. An existing queue is used as it is, whatever
/// its arguments (dead-letter exchange, quorum type): we check it passively first.
pub async fn declare_queue(connection: &Connection, queue: &str) -> Result<(), SessionError> {
    let probe = bounded(connection.create_channel()).await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    if bounded(probe.queue_declare(queue.into(), passive, FieldTable::default()))
        .await
        .is_ok()
    {
        let _ = probe.close(200, "ok".into()).await;
        return Ok(());
    }
    // The failed passive declare closed the probe channel (404): declare on a fresh one.
    let channel = bounded(connection.create_channel()).await?;
    bounded(channel.queue_declare(
        queue.into(),
        QueueDeclareOptions::durable(),
        FieldTable::default(),
    ))
    .await?;
    let _ = channel.close(200, "ok".into()).await;
    Ok(())
}
