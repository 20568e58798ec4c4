//! The request queue: declared durable with the configured type (classic or quorum), delivery
//! limit and dead-letter queue when it is missing; used as it is when it exists, even with
//! another type or other arguments (then only checked with a passive declare).

use std::time::Duration;

use lapin::Connection;
use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable, ShortString};

/// Bounds each declare, so a RabbitMQ that never answers cannot hang us.
const DECLARE_TIMEOUT: Duration = Duration::from_secs(10);

/// The type with which a missing request queue is declared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum QueueType {
    #[default]
    Classic,
    /// Replicated over the cluster (Raft): survives the loss of a minority of nodes, and counts
    /// deliveries so a job whose worker keeps dying can be dead-lettered.
    Quorum,
}

/// How to declare the request queue if it is missing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueSettings {
    pub name: String,
    pub queue_type: QueueType,
    /// Quorum only: deliveries whose worker died after which a job is dead-lettered
    /// (`x-delivery-limit` N - 1: RabbitMQ counts returns beyond the first delivery).
    pub delivery_limit: Option<u32>,
    /// A queue (declared durable if missing) that receives what the request queue
    /// dead-letters: jobs over the delivery limit and permanent failures.
    pub dead_letter_queue: Option<String>,
}

/// Why the queue settings cannot be used, or a declare failed.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error(
        "--delivery-limit needs --queue-type quorum (a classic queue does not count deliveries)"
    )]
    DeliveryLimitOnClassic,
    #[error("--delivery-limit must be at least 1")]
    ZeroDeliveryLimit,
    #[error("cannot declare queue {queue}")]
    Declare {
        queue: String,
        #[source]
        source: lapin::Error,
    },
    #[error("RabbitMQ did not answer the declare of queue {queue} within {after:?}")]
    Timeout { queue: String, after: Duration },
}

impl QueueSettings {
    /// A classic queue named `name`, no delivery limit, no dead-letter queue.
    pub fn classic(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            ..Self::default()
        }
    }

    /// Checks the combination before anything connects.
    pub fn validate(&self) -> Result<(), QueueError> {
        match (self.queue_type, self.delivery_limit) {
            (_, Some(0)) => Err(QueueError::ZeroDeliveryLimit),
            (QueueType::Classic, Some(_)) => Err(QueueError::DeliveryLimitOnClassic),
            _ => Ok(()),
        }
    }

    /// The arguments a missing request queue is declared with.
    pub fn arguments(&self) -> FieldTable {
        let mut arguments = FieldTable::default();
        if self.queue_type == QueueType::Quorum {
            arguments.insert(
                ShortString::from("x-queue-type"),
                AMQPValue::LongString("quorum".into()),
            );
        }
        if let Some(limit) = self.delivery_limit {
            // RabbitMQ dead-letters a message returned *more* than x-delivery-limit times
            // (seen with 3.10: limit 2 took three deaths); ours counts deaths: N deaths, out.
            arguments.insert(
                ShortString::from("x-delivery-limit"),
                AMQPValue::LongLongInt(i64::from(limit) - 1),
            );
        }
        if let Some(dead_letters) = &self.dead_letter_queue {
            // Through the default exchange, straight to the queue: nothing else to set up.
            arguments.insert(
                ShortString::from("x-dead-letter-exchange"),
                AMQPValue::LongString("".into()),
            );
            arguments.insert(
                ShortString::from("x-dead-letter-routing-key"),
                AMQPValue::LongString(dead_letters.as_str().into()),
            );
            if self.queue_type == QueueType::Quorum {
                // A quorum queue dead-letters at most once by default: a job dead-lettered
                // while the dead-letter queue has no leader (its node just died) was dropped
                // (seen in the soak; tests/dead_letters.rs). At least once, RabbitMQ keeps it
                // until the dead-letter queue confirms it. That strategy needs reject-publish
                // (the default drop-head falls back to at most once); without a length limit
                // it refuses nothing.
                arguments.insert(
                    ShortString::from("x-dead-letter-strategy"),
                    AMQPValue::LongString("at-least-once".into()),
                );
                arguments.insert(
                    ShortString::from("x-overflow"),
                    AMQPValue::LongString("reject-publish".into()),
                );
            }
        }
        arguments
    }
}

/// Makes sure the request queue (and the dead-letter queue, if configured) exists. An existing
/// queue is used as it is, whatever its type and arguments.
pub async fn ensure(connection: &Connection, settings: &QueueSettings) -> Result<(), QueueError> {
    if let Some(dead_letters) = &settings.dead_letter_queue {
        ensure_one(connection, dead_letters, FieldTable::default()).await?;
    }
    ensure_one(connection, &settings.name, settings.arguments()).await
}

async fn ensure_one(
    connection: &Connection,
    queue: &str,
    arguments: FieldTable,
) -> Result<(), QueueError> {
    let declare_error = |source| QueueError::Declare {
        queue: queue.to_owned(),
        source,
    };
    // Declare first: a missing queue is created and one declared the same way (our own, on a
    // restart) is confirmed, with no channel error (lapin logs every channel the server closes
    // at ERROR, so a passive declare of a missing queue would make a normal first start log
    // one). Only a queue that exists with other arguments refuses it: then check it exists
    // (a passive declare, on a fresh channel: the refusal closed the first) and use it as it is.
    let channel = bounded(queue, connection.create_channel())
        .await?
        .map_err(declare_error)?;
    let declared = bounded(
        queue,
        channel.queue_declare(queue.into(), QueueDeclareOptions::durable(), arguments),
    )
    .await?;
    if declared.is_ok() {
        let _ = tokio::time::timeout(DECLARE_TIMEOUT, channel.close(200, "ok".into())).await;
        return Ok(());
    }
    let probe = bounded(queue, connection.create_channel())
        .await?
        .map_err(declare_error)?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    bounded(
        queue,
        probe.queue_declare(queue.into(), passive, FieldTable::default()),
    )
    .await?
    .map_err(declare_error)?;
    let _ = tokio::time::timeout(DECLARE_TIMEOUT, probe.close(200, "ok".into())).await;
    Ok(())
}

/// `future` within [`DECLARE_TIMEOUT`].
async fn bounded<T>(queue: &str, future: impl Future<Output = T>) -> Result<T, QueueError> {
    tokio::time::timeout(DECLARE_TIMEOUT, future)
        .await
        .map_err(|_| QueueError::Timeout {
            queue: queue.to_owned(),
            after: DECLARE_TIMEOUT,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_classic_queue_has_no_arguments() {
        assert_eq!(
            QueueSettings::classic("q").arguments(),
            FieldTable::default()
        );
    }

    #[test]
    fn a_quorum_queue_carries_its_type_limit_and_dead_letter_route() {
        let settings = QueueSettings {
            name: "jobs".into(),
            queue_type: QueueType::Quorum,
            delivery_limit: Some(2),
            dead_letter_queue: Some("jobs.dead".into()),
        };
        settings.validate().expect("valid");
        let arguments = settings.arguments();
        let get = |key: &str| arguments.inner().get(key).cloned();
        assert_eq!(
            get("x-queue-type"),
            Some(AMQPValue::LongString("quorum".into()))
        );
        assert_eq!(get("x-delivery-limit"), Some(AMQPValue::LongLongInt(1)));
        assert_eq!(
            get("x-dead-letter-exchange"),
            Some(AMQPValue::LongString("".into()))
        );
        assert_eq!(
            get("x-dead-letter-routing-key"),
            Some(AMQPValue::LongString("jobs.dead".into()))
        );
        assert_eq!(
            get("x-dead-letter-strategy"),
            Some(AMQPValue::LongString("at-least-once".into()))
        );
        assert_eq!(
            get("x-overflow"),
            Some(AMQPValue::LongString("reject-publish".into()))
        );
    }

    #[test]
    fn a_classic_queue_dead_letters_as_classic_queues_can() {
        // Classic queues know no dead-letter strategy: the arguments would be refused.
        let settings = QueueSettings {
            dead_letter_queue: Some("jobs.dead".into()),
            ..QueueSettings::classic("jobs")
        };
        let arguments = settings.arguments();
        assert!(arguments.inner().contains_key("x-dead-letter-routing-key"));
        assert!(!arguments.inner().contains_key("x-dead-letter-strategy"));
        assert!(!arguments.inner().contains_key("x-overflow"));
    }

    #[test]
    fn a_delivery_limit_needs_a_quorum_queue() {
        let settings = QueueSettings {
            delivery_limit: Some(3),
            ..QueueSettings::classic("q")
        };
        assert!(matches!(
            settings.validate(),
            Err(QueueError::DeliveryLimitOnClassic)
        ));
    }
}
