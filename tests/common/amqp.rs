//! The RabbitMQ side of a test: put jobs on a queue and await the worker's replies.
//!
//! [`Amqp`] holds one lapin connection and a channel in confirm mode (no auto-recovery: a test
//! that loses RabbitMQ should fail loudly). Queue names should come from
//! [`unique_name`](super::unique_name) so tests can run in parallel.

use futures_lite::StreamExt;
use lapin::options::{
    BasicConsumeOptions, BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions,
    ExchangeDeclareOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{
    BasicProperties, Channel, Confirmation, Connection, ConnectionProperties, Consumer,
    ExchangeKind,
};
use std::time::Duration;
use tokio::time::{Instant, timeout, timeout_at};

/// The AMQP URL of the test RabbitMQ: `MQTT_CONNECTOR_TEST_AMQP_URL`, or
/// `amqp://guest:guest@127.0.0.1:5672/%2f`.
pub fn amqp_url() -> String {
    std::env::var("MQTT_CONNECTOR_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// RabbitMQ's direct reply-to pseudo-queue.
pub const DIRECT_REPLY_TO: &str = "amq.rabbitmq.reply-to";

/// A connection and a confirm-mode channel to the test RabbitMQ.
pub struct Amqp {
    /// The connection.
    pub connection: Connection,
    /// A channel with publisher confirms enabled.
    pub channel: Channel,
}

/// A worker's reply, as read from the reply queue.
#[derive(Clone, Debug)]
pub struct Reply {
    /// The `correlation_id` property.
    pub correlation_id: Option<String>,
    /// The `content_type` property (the contract says `application/json`).
    pub content_type: Option<String>,
    /// The body parsed as JSON (a body that is not JSON panics in [`ReplyStream`]).
    pub body: serde_json::Value,
    /// The raw body bytes.
    pub raw: Vec<u8>,
}

impl Reply {
    /// `body["exit-code"]` as an integer; panics if missing.
    pub fn exit_code(&self) -> i64 {
        self.body["exit-code"]
            .as_i64()
            .unwrap_or_else(|| panic!("reply has no integer exit-code: {}", self.body))
    }

    /// `body["message"]` as a string; panics if missing.
    pub fn message(&self) -> &str {
        self.body["message"]
            .as_str()
            .unwrap_or_else(|| panic!("reply has no string message: {}", self.body))
    }
}

/// A message fetched with [`Amqp::get_message`].
#[derive(Clone, Debug)]
pub struct Message {
    /// Its properties.
    pub properties: BasicProperties,
    /// Its body.
    pub body: Vec<u8>,
    /// Whether RabbitMQ marked it redelivered.
    pub redelivered: bool,
}

impl Amqp {
    /// Connects to [`amqp_url`] (10 s at most), opens a channel and enables publisher confirms.
    pub async fn connect() -> Amqp {
        Amqp::connect_to(&amqp_url()).await
    }

    /// [`connect`](Self::connect) to another RabbitMQ, e.g. a private node of the test's own.
    pub async fn connect_to(url: &str) -> Amqp {
        let connection = timeout(
            Duration::from_secs(10),
            Connection::connect(url, ConnectionProperties::default()),
        )
        .await
        .unwrap_or_else(|_| panic!("AMQP connect to {url} timed out"))
        .unwrap_or_else(|e| panic!("AMQP connect to {url}: {e}"));
        let channel = connection.create_channel().await.expect("create channel");
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .expect("confirm.select");
        Amqp {
            connection,
            channel,
        }
    }

    /// Declares a fresh exclusive, auto-delete reply queue (named `reply-<uuid>`) and returns
    /// its name. It disappears with this connection.
    pub async fn declare_reply_queue(&self) -> String {
        let name = super::unique_name("reply");
        self.channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    exclusive: true,
                    auto_delete: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("declare reply queue");
        name
    }

    /// Declares `name` durable with no arguments, as the worker declares its request queue, so
    /// a test can send jobs before the worker is up. Delete it with
    /// [`delete_queue`](Self::delete_queue) at the end.
    pub async fn declare_job_queue(&self, name: &str) {
        self.channel
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    durable: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("declare queue {name}: {e}"));
    }

    /// Publishes a job `body` to `queue` through the default exchange with the given `reply_to`
    /// and `correlation_id` (persistent, `content_type: application/json`) and waits for the
    /// publisher confirm. Published `mandatory`: panics if no queue named `queue` exists (the
    /// job would otherwise vanish and the test hang).
    pub async fn send_job(
        &self,
        queue: &str,
        body: &[u8],
        reply_to: Option<&str>,
        correlation_id: Option<&str>,
    ) {
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        if let Some(r) = reply_to {
            props = props.with_reply_to(r.into());
        }
        if let Some(c) = correlation_id {
            props = props.with_correlation_id(c.into());
        }
        self.publish(queue, body, props).await;
    }

    /// Publishes `body` with `properties` to `routing_key` on the default exchange, `mandatory`,
    /// and waits for the confirm; panics if it was returned (no such queue) or nacked.
    pub async fn publish(&self, routing_key: &str, body: &[u8], properties: BasicProperties) {
        match self
            .publish_confirmed(routing_key, body, properties, true)
            .await
        {
            Confirmation::Ack(None) => {}
            Confirmation::Ack(Some(returned)) => panic!(
                "message to {routing_key} was returned unroutable (does the queue exist?): {:?}",
                returned.reply_text
            ),
            other => panic!("message to {routing_key} not confirmed: {other:?}"),
        }
    }

    /// Publishes `body` with `properties` to `routing_key` on the default exchange and returns
    /// the publisher confirm as is (panics only on a channel error or after 10 s).
    pub async fn publish_confirmed(
        &self,
        routing_key: &str,
        body: &[u8],
        properties: BasicProperties,
        mandatory: bool,
    ) -> Confirmation {
        let confirm = self
            .channel
            .basic_publish(
                "".into(),
                routing_key.into(),
                BasicPublishOptions {
                    mandatory,
                    ..BasicPublishOptions::default()
                },
                body,
                properties,
            )
            .await
            .unwrap_or_else(|e| panic!("publish to {routing_key}: {e}"));
        timeout(Duration::from_secs(10), confirm)
            .await
            .unwrap_or_else(|_| panic!("no publisher confirm for {routing_key} within 10 s"))
            .unwrap_or_else(|e| panic!("publisher confirm for {routing_key}: {e}"))
    }

    /// Starts consuming `queue` (no-ack) and returns the stream of [`Reply`]s.
    pub async fn consume_replies(&self, queue: &str) -> ReplyStream {
        let consumer = self
            .channel
            .basic_consume(
                queue.into(),
                super::unique_name("harness").as_str().into(),
                BasicConsumeOptions {
                    no_ack: true,
                    ..BasicConsumeOptions::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("consume {queue}: {e}"));
        ReplyStream {
            consumer,
            queue: queue.to_string(),
        }
    }

    /// Declares a reply queue and starts consuming it: `(queue name, replies)`.
    pub async fn reply_queue(&self) -> (String, ReplyStream) {
        let name = self.declare_reply_queue().await;
        let stream = self.consume_replies(&name).await;
        (name, stream)
    }

    /// Consumes RabbitMQ's direct reply-to ([`DIRECT_REPLY_TO`]) on this channel. Send jobs with
    /// `reply_to: Some(DIRECT_REPLY_TO)` through *this* `Amqp` (same channel) afterwards.
    pub async fn direct_reply_to(&self) -> ReplyStream {
        self.consume_replies(DIRECT_REPLY_TO).await
    }

    /// Deletes `name` (no error if it does not exist). Uses a separate channel.
    pub async fn delete_queue(&self, name: &str) {
        let ch = self
            .connection
            .create_channel()
            .await
            .expect("create channel");
        ch.queue_delete(name.into(), QueueDeleteOptions::default())
            .await
            .unwrap_or_else(|e| panic!("delete queue {name}: {e}"));
        let _ = ch.close(200, "bye".into()).await;
    }

    /// Whether the exchange `name` exists (a passive declare, on a channel of its own: a refusal
    /// closes the channel it ran on).
    pub async fn exchange_exists(&self, name: &str) -> bool {
        let ch = self
            .connection
            .create_channel()
            .await
            .expect("create channel");
        let passive = ExchangeDeclareOptions {
            passive: true,
            ..ExchangeDeclareOptions::default()
        };
        let exists = ch
            .exchange_declare(
                name.into(),
                ExchangeKind::Direct,
                passive,
                FieldTable::default(),
            )
            .await
            .is_ok();
        let _ = ch.close(200, "bye".into()).await;
        exists
    }

    /// Deletes the exchange `name` (no error if it does not exist). Uses a separate channel.
    pub async fn delete_exchange(&self, name: &str) {
        let ch = self
            .connection
            .create_channel()
            .await
            .expect("create channel");
        ch.exchange_delete(name.into(), ExchangeDeleteOptions::default())
            .await
            .unwrap_or_else(|e| panic!("delete exchange {name}: {e}"));
        let _ = ch.close(200, "bye".into()).await;
    }

    /// The number of ready messages in `name`, or `None` if it does not exist.
    pub async fn queue_message_count(&self, name: &str) -> Option<u32> {
        self.queue_counts(name).await.ok().map(|(ready, _)| ready)
    }

    /// `(ready messages, consumers)` of `name`, or the error of the passive declare if it does
    /// not exist (passive declare on a separate channel, since a failed passive declare closes
    /// the channel).
    pub async fn queue_counts(&self, name: &str) -> Result<(u32, u32), lapin::Error> {
        let ch = self
            .connection
            .create_channel()
            .await
            .expect("create channel");
        let res = ch
            .queue_declare(
                name.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..QueueDeclareOptions::default()
                },
                FieldTable::default(),
            )
            .await;
        let _ = ch.close(200, "bye".into()).await;
        res.map(|q| (q.message_count(), q.consumer_count()))
    }

    /// Takes one message from `name` (basic.get, auto-ack) if there is one, e.g. to inspect a
    /// dead-letter queue. `None` if the queue is empty.
    pub async fn get_message(&self, name: &str) -> Option<Message> {
        let got = self
            .channel
            .basic_get(name.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap_or_else(|e| panic!("basic.get {name}: {e}"));
        got.map(|m| Message {
            properties: m.delivery.properties.clone(),
            body: m.delivery.data.clone(),
            redelivered: m.delivery.redelivered,
        })
    }
}

/// The replies arriving on one queue; see [`Amqp::consume_replies`].
pub struct ReplyStream {
    consumer: Consumer,
    queue: String,
}

impl ReplyStream {
    /// The next reply, or `None` if none arrives within `within`. Panics if the body is not JSON
    /// or the consumer fails.
    pub async fn try_reply(&mut self, within: Duration) -> Option<Reply> {
        let delivery = timeout(within, self.consumer.next()).await.ok()??;
        let d = delivery.unwrap_or_else(|e| panic!("consumer on {}: {e}", self.queue));
        let body = serde_json::from_slice(&d.data).unwrap_or_else(|e| {
            panic!(
                "reply on {} is not JSON ({e}): {:?}",
                self.queue,
                String::from_utf8_lossy(&d.data)
            )
        });
        Some(Reply {
            correlation_id: d
                .properties
                .correlation_id()
                .as_ref()
                .map(|s| s.to_string()),
            content_type: d.properties.content_type().as_ref().map(|s| s.to_string()),
            body,
            raw: d.data,
        })
    }

    /// The next reply; panics if none arrives within `within`.
    pub async fn expect_reply(&mut self, within: Duration) -> Reply {
        self.try_reply(within)
            .await
            .unwrap_or_else(|| panic!("no reply on {} within {within:?}", self.queue))
    }

    /// `n` replies, in arrival order; panics (saying how many came) if fewer arrive within
    /// `within`.
    pub async fn expect_replies(&mut self, n: usize, within: Duration) -> Vec<Reply> {
        let deadline = Instant::now() + within;
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            match timeout_at(deadline, self.try_reply(left)).await {
                Ok(Some(r)) => got.push(r),
                _ => panic!(
                    "only {} of {n} replies on {} within {within:?}",
                    got.len(),
                    self.queue
                ),
            }
        }
        got
    }

    /// Panics if a reply arrives within `within` (e.g. "exactly one reply").
    pub async fn expect_no_reply(&mut self, within: Duration) {
        if let Some(r) = self.try_reply(within).await {
            panic!("unexpected reply on {}: {}", self.queue, r.body);
        }
    }

    /// The queue consumed.
    pub fn queue(&self) -> &str {
        &self.queue
    }
}
