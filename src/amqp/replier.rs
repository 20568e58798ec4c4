//! Publishes a job's reply on the default exchange with routing key `reply_to` (a queue or
//! RabbitMQ's direct reply-to) and waits for RabbitMQ's publisher confirm. A reply RabbitMQ
//! refuses or cannot route is tried again with backoff for at most [`REPLY_WINDOW`]; then it is
//! lost and the job is settled without it (never requeued: that would publish the job again).
//! The window counts only time the connection is not blocked by a RabbitMQ alarm: while it is
//! blocked, replies wait (see [`Flow`]).

use std::pin::pin;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, ShortString};
use tokio::time::Instant;

use super::confirms::{Published, Publisher};
use super::consumer::Flow;
use crate::outcome::Outcome;
use crate::settle::{LostReply, ReplyStatus};

/// RabbitMQ's direct reply-to pseudo-queue; replies go to `amq.rabbitmq.reply-to.<token>`.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// How long (of unblocked time) a reply may take to get through, retries included.
pub const REPLY_WINDOW: Duration = Duration::from_secs(30);

/// The first delay between two tries of a refused or unroutable reply, and the longest.
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// The AMQP headers that carry a job's outcome when its reply was lost.
pub const EXIT_CODE_HEADER: &str = "x-mqtt-connector-exit-code";
pub const MESSAGE_HEADER: &str = "x-mqtt-connector-message";

/// Time left to wait on RabbitMQ, spent only while the connection is not blocked.
pub struct Budget {
    left: Duration,
    flow: Flow,
}

impl Budget {
    pub fn new(window: Duration, flow: Flow) -> Self {
        Self { left: window, flow }
    }

    /// Runs `future` until it ends (`Some`) or the budget is spent (`None`). While the
    /// connection is blocked the clock stops: nothing can leave until RabbitMQ unblocks it.
    pub async fn run<F: Future>(&mut self, future: F) -> Option<F::Output> {
        let mut future = pin!(future);
        loop {
            if self.flow.is_blocked() {
                tokio::select! {
                    out = &mut future => return Some(out),
                    () = self.flow.unblocked() => continue,
                }
            }
            let started = Instant::now();
            let outcome = tokio::select! {
                out = &mut future => Some(Some(out)),
                () = tokio::time::sleep(self.left) => Some(None),
                () = self.flow.blocked() => None,
            };
            self.left = self.left.saturating_sub(started.elapsed());
            if let Some(out) = outcome {
                return out;
            }
        }
    }

    /// Sleeps `delay` (cut to what is left); `false` when nothing is left afterwards.
    async fn sleep(&mut self, delay: Duration) -> bool {
        let delay = delay.min(self.left);
        let _ = self.run(tokio::time::sleep(delay)).await;
        !self.left.is_zero()
    }
}

/// Sends one reply and reports what became of it after at most [`REPLY_WINDOW`] of unblocked
/// time. A confirm that does not come is waited for, never published again (no duplicate
/// reply); a nack or a return is tried again with backoff.
pub async fn reply(
    publisher: &Publisher,
    flow: &Flow,
    reply_to: &str,
    correlation_id: Option<&str>,
    body: &[u8],
) -> ReplyStatus {
    #[cfg(feature = "soak-faults")]
    if crate::fault::drop_reply(correlation_id) {
        return ReplyStatus::Confirmed;
    }
    let mut budget = Budget::new(REPLY_WINDOW, flow.clone());
    let mut delay = RETRY_FIRST;
    loop {
        let sent = budget
            .run(publish(publisher, reply_to, correlation_id, body))
            .await;
        let lost = match sent {
            Some(Published::Acked) => return ReplyStatus::Confirmed,
            Some(Published::Returned) => LostReply::Unroutable,
            Some(Published::Nacked) => LostReply::Refused,
            Some(Published::Failed(err)) => {
                // The channel failed: nothing sent on it can be confirmed or settled any more.
                tracing::debug!(error = ?err, "no confirm for the reply");
                return ReplyStatus::Lost(LostReply::Unconfirmed);
            }
            None => return ReplyStatus::Lost(LostReply::Unconfirmed),
        };
        if !budget.sleep(delay).await {
            return ReplyStatus::Lost(lost);
        }
        delay = (delay * 2).min(RETRY_MAX);
    }
}

async fn publish(
    publisher: &Publisher,
    reply_to: &str,
    correlation_id: Option<&str>,
    body: &[u8],
) -> Published {
    let mut properties = BasicProperties::default().with_content_type("application/json".into());
    if let Some(id) = correlation_id {
        properties = properties.with_correlation_id(id.into());
    }
    // mandatory: a reply_to that routes nowhere comes back instead of vanishing unnoticed.
    // Not for direct reply-to: RabbitMQ delivers those yet reports them as returned (NO_ROUTE).
    let mandatory = !reply_to.starts_with(DIRECT_REPLY_TO);
    publisher
        .publish(reply_to, mandatory, body, properties)
        .await
}

/// Publishes a job whose reply was lost to the dead-letter queue `queue`, with its outcome in
/// the headers [`EXIT_CODE_HEADER`] and [`MESSAGE_HEADER`] (its own properties and headers
/// kept), and waits (bounded, unblocked time) for the confirm. `false` when RabbitMQ did not
/// take it.
pub async fn forward_with_outcome(
    publisher: &Publisher,
    flow: &Flow,
    queue: &str,
    delivery: &lapin::message::Delivery,
    outcome: &Outcome,
) -> bool {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    headers.insert(
        ShortString::from(EXIT_CODE_HEADER),
        AMQPValue::LongInt(i32::from(outcome.exit_code.code())),
    );
    headers.insert(
        ShortString::from(MESSAGE_HEADER),
        AMQPValue::LongString(outcome.message.as_str().into()),
    );
    let properties = delivery.properties.clone().with_headers(headers);
    let published = publisher.publish(queue, true, &delivery.data, properties);
    let mut budget = Budget::new(FORWARD_WINDOW, flow.clone());
    matches!(budget.run(published).await, Some(Published::Acked))
}

/// How long (of unblocked time) forwarding a job to the dead-letter queue may take.
const FORWARD_WINDOW: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_reply_window_runs_out_when_nothing_comes() {
        let (_sender, flow) = Flow::manual();
        let mut budget = Budget::new(Duration::from_secs(30), flow);
        let started = Instant::now();
        assert_eq!(budget.run(std::future::pending::<()>()).await, None);
        assert_eq!(started.elapsed(), Duration::from_secs(30));
    }

    #[tokio::test(start_paused = true)]
    async fn the_reply_window_stops_while_the_connection_is_blocked() {
        let (sender, flow) = Flow::manual();
        let mut budget = Budget::new(Duration::from_secs(30), flow);
        let started = Instant::now();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            sender.send_replace(true);
            // Blocked for 100 s: the window does not run meanwhile.
            tokio::time::sleep(Duration::from_secs(100)).await;
            sender.send_replace(false);
            std::future::pending::<()>().await;
        });
        assert_eq!(budget.run(std::future::pending::<()>()).await, None);
        assert_eq!(started.elapsed(), Duration::from_secs(130));
    }

    #[tokio::test(start_paused = true)]
    async fn what_ends_within_the_window_is_returned() {
        let (_sender, flow) = Flow::manual();
        let mut budget = Budget::new(Duration::from_secs(30), flow);
        let done = budget
            .run(async {
                tokio::time::sleep(Duration::from_secs(29)).await;
                7
            })
            .await;
        assert_eq!(done, Some(7));
        assert!(
            !budget.sleep(Duration::from_secs(5)).await,
            "1 s left, not 5"
        );
    }
}
