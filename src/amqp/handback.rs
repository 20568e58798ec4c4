//! A job handed back to its queue for another worker: published again as a new message (same
//! body and properties) and confirmed by RabbitMQ before the original delivery is acked. Unlike
//! a nack with requeue, this does not count as a delivery against a quorum queue's delivery
//! limit, so a job passed between workers is never dead-lettered for it.

use lapin::message::Delivery;
use lapin::options::BasicPublishOptions;
use lapin::{Channel, Confirmation};

/// How long RabbitMQ may take to confirm a job handed back.
const CONFIRM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Publishes `delivery` again on `queue` and waits for the confirm; `false` when RabbitMQ did
/// not take it (the caller then requeues the original instead).
pub async fn hand_back(channel: &Channel, queue: &str, delivery: &Delivery) -> bool {
    let options = BasicPublishOptions {
        mandatory: true,
        ..BasicPublishOptions::default()
    };
    let published = async {
        channel
            .basic_publish(
                "".into(),
                queue.into(),
                options,
                &delivery.data,
                delivery.properties.clone(),
            )
            .await?
            .await
    };
    match tokio::time::timeout(CONFIRM_TIMEOUT, published).await {
        Ok(Ok(confirmation)) => matches!(confirmation, Confirmation::Ack(None)),
        Ok(Err(err)) => {
            tracing::debug!(error = %err, "could not hand the job back to the queue");
            false
        }
        Err(_) => false,
    }
}
