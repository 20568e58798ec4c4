//! Publishes a job's reply on the default exchange with routing key `reply_to` (a queue or
//! RabbitMQ's direct reply-to) and waits for RabbitMQ's publisher confirm.

use std::time::Duration;

use lapin::options::BasicPublishOptions;
use lapin::{BasicProperties, Channel, Confirmation};

use crate::settle::ReplyStatus;

/// RabbitMQ's direct reply-to pseudo-queue; replies go to `amq.rabbitmq.reply-to.<token>`.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// Delays before trying a refused (nacked) reply again; after them the job is requeued.
const NACK_RETRY_DELAYS: [Duration; 3] = [
    Duration::from_millis(100),
    Duration::from_millis(400),
    Duration::from_millis(1600),
];

/// Sends one reply and reports what RabbitMQ made of it. A reply RabbitMQ refuses (nack, e.g.
/// a full reply queue with `reject-publish`) is tried again a few times before giving up, so a
/// refused reply does not turn into a tight requeue loop.
pub async fn reply(
    channel: &Channel,
    reply_to: &str,
    correlation_id: Option<&str>,
    body: &[u8],
) -> ReplyStatus {
    let mut status = publish(channel, reply_to, correlation_id, body).await;
    for delay in NACK_RETRY_DELAYS {
        if status != ReplyStatus::Refused {
            break;
        }
        tokio::time::sleep(delay).await;
        status = publish(channel, reply_to, correlation_id, body).await;
    }
    status
}

async fn publish(
    channel: &Channel,
    reply_to: &str,
    correlation_id: Option<&str>,
    body: &[u8],
) -> ReplyStatus {
    let mut properties = BasicProperties::default().with_content_type("application/json".into());
    if let Some(id) = correlation_id {
        properties = properties.with_correlation_id(id.into());
    }
    // mandatory: a reply_to that routes nowhere comes back instead of vanishing unnoticed.
    // Not for direct reply-to: RabbitMQ delivers those yet reports them as returned (NO_ROUTE).
    let options = BasicPublishOptions {
        mandatory: !reply_to.starts_with(DIRECT_REPLY_TO),
        ..BasicPublishOptions::default()
    };
    let confirm = match channel
        .basic_publish("".into(), reply_to.into(), options, body, properties)
        .await
    {
        Ok(confirm) => confirm,
        Err(err) => {
            tracing::warn!(error = %err, "could not publish the reply");
            return ReplyStatus::Failed;
        }
    };
    match confirm.await {
        Ok(Confirmation::Ack(None)) | Ok(Confirmation::NotRequested) => ReplyStatus::Confirmed,
        Ok(Confirmation::Ack(Some(_returned))) => ReplyStatus::Unroutable,
        Ok(Confirmation::Nack(_)) => ReplyStatus::Refused,
        Err(err) => {
            tracing::warn!(error = %err, "no confirm for the reply");
            ReplyStatus::Failed
        }
    }
}
