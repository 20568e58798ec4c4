//! Jobs handed back go straight to the worker that holds their MQTT client-id, through
//! RabbitMQ (we write no cluster of our own).
//!
//! A worker holding a client-id (a live MQTT connection with it) consumes that client-id's own
//! queue, `<queue>.held.<key>`, bound to the direct exchange `<queue>.held` with routing key
//! `<key>` (a digest of broker and client-id). A worker whose client-id another holds publishes
//! the job to that exchange: it reaches the holder in one hop, where going round the request
//! queue it would reach the holder one time in N in a fleet of N, and the others would take
//! the client-id over for it. Several workers consuming one client-id's queue (the old holder,
//! until it sees the takeover) each get some jobs, never the same one.
//!
//! A worker that stops keeps consuming its client-ids' queues until its own jobs are done, and
//! sends what arrives there meanwhile on to the request queue at once (published again and
//! confirmed before the original is acked): at least once, where RabbitMQ's dead-lettering
//! from a classic queue is at most once and drops a job when the request queue cannot take it
//! at that moment (its leader's node just died; seen in the soak).
//!
//! Nobody holding it: a job waits in the client-id's queue at most [`HELD_TTL`], then RabbitMQ
//! dead-letters it back to the request queue; a key never held (no such queue) goes there at
//! once, through the exchange's alternate exchange `<queue>.unheld`. Either way the job carries
//! [`ROUTED_HEADER`], and a worker taking a job with it from the request queue knows the holder
//! is gone and takes the client-id itself. A client-id's queue is deleted by RabbitMQ a minute
//! after its last consumer went.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use lapin::message::Delivery;
use lapin::options::{
    BasicConsumeOptions, BasicQosOptions, ConfirmSelectOptions, ExchangeDeclareOptions,
    QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{Channel, ChannelStatus, Connection, ExchangeKind};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::confirms::Publisher;
use super::consumer;
use super::handback::{self, HandBackTo};
use super::queue::QueueSettings;
use super::settler::Settler;
use crate::mqtt::pool::{Held, Pool};
use crate::pipeline::Siblings;
use crate::settle::Settlement;

/// How long a job waits in a client-id's queue that nobody consumes before it goes back to the
/// request queue.
pub const HELD_TTL: Duration = Duration::from_secs(2);
/// How long a client-id's queue outlives its last consumer.
const HELD_EXPIRES: Duration = Duration::from_secs(60);
/// Set on a job routed to a client-id's holder: the routing key.
pub const ROUTED_HEADER: &str = "x-mqtt-connector-routed";
/// Bounds every declare and bind.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// Client-id queues one session consumes at most (one channel each; RabbitMQ allows 2,047 per
/// connection by default). Jobs for the others are handed back through the request queue.
const MAX_SERVED: usize = 1000;
/// How often the served client-ids follow whether siblings consume the queue.
const SIBLINGS_EVERY: Duration = Duration::from_secs(3);
/// How long a client-id's queue that could not be consumed is left alone (e.g. a durable queue
/// whose home node is down: RabbitMQ refuses it until the node is back).
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// The names of the routing for one request queue.
#[derive(Debug, Clone)]
pub struct Routes {
    queue: String,
    exchange: String,
    unheld: String,
}

/// A job taken from a client-id's queue, to run (settled and answered on the channel it came
/// on, through that channel's publisher).
pub type RunHeld = Arc<
    dyn Fn(
            Delivery,
            ChannelStatus,
            Publisher,
            Settler,
            OwnedSemaphorePermit,
        ) -> BoxFuture<'static, ()>
        + Send
        + Sync,
>;

impl Routes {
    pub fn new(settings: &QueueSettings) -> Self {
        Self {
            queue: settings.name.clone(),
            exchange: format!("{}.held", settings.name),
            unheld: format!("{}.unheld", settings.name),
        }
    }

    /// The exchange hand-backs are published to.
    pub fn exchange(&self) -> &str {
        &self.exchange
    }

    /// The routing key of a client-id on a broker: a digest, so that any client-id fits in a
    /// queue name and a routing key.
    pub fn key(held: &Held) -> String {
        let digest = ring::digest::digest(
            &ring::digest::SHA256,
            format!("{}\n{}", held.broker, held.client_id).as_bytes(),
        );
        digest.as_ref()[..16]
            .iter()
            .map(|byte| format!("{byte:02x}"))
            .collect()
    }

    fn held_queue(&self, key: &str) -> String {
        format!("{}.{key}", self.exchange)
    }

    /// Declares the exchanges (on a channel of its own: a refusal closes the channel it ran on).
    pub async fn declare(&self, connection: &Connection) -> Result<(), SetupError> {
        let channel = bounded(connection.create_channel()).await?;
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..ExchangeDeclareOptions::default()
        };
        bounded(channel.exchange_declare(
            self.unheld.as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        ))
        .await?;
        bounded(channel.queue_bind(
            self.queue.as_str().into(),
            self.unheld.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        ))
        .await?;
        let mut arguments = FieldTable::default();
        arguments.insert(
            "alternate-exchange".into(),
            AMQPValue::LongString(self.unheld.as_str().into()),
        );
        bounded(channel.exchange_declare(
            self.exchange.as_str().into(),
            ExchangeKind::Direct,
            durable,
            arguments,
        ))
        .await?;
        consumer::close_channel(&channel).await;
        Ok(())
    }

    /// A client-id's queue: expires with no consumer, and sends what waits too long back to the
    /// request queue. Always a classic queue: a classic queue drops what outlived its TTL by
    /// itself, while a quorum queue (RabbitMQ 3.10) only looks when something else happens on
    /// it, so jobs given back to it by a holder that died sat there until the queue expired and
    /// took them along (seen in the soak). It is durable: persistent jobs in it outlive a
    /// RabbitMQ node's restart, and then go back to the request queue.
    fn held_arguments(&self) -> FieldTable {
        let millis = |duration: Duration| {
            AMQPValue::LongLongInt(i64::try_from(duration.as_millis()).unwrap_or(i64::MAX))
        };
        let mut arguments = FieldTable::default();
        arguments.insert("x-expires".into(), millis(HELD_EXPIRES));
        arguments.insert("x-message-ttl".into(), millis(HELD_TTL));
        arguments.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        arguments.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(self.queue.as_str().into()),
        );
        arguments
    }
}

/// Whether a job taken from the request queue was routed to a holder before: then nobody
/// consumed it there, the holder is gone.
pub fn was_routed(headers: Option<&FieldTable>) -> bool {
    headers.is_some_and(|headers| headers.inner().contains_key(ROUTED_HEADER))
}

/// The headers of a job routed to `key`'s holder.
pub fn routed_headers(mut headers: FieldTable, key: &str) -> FieldTable {
    headers.insert(
        ShortString::from(ROUTED_HEADER),
        AMQPValue::LongString(key.into()),
    );
    headers
}

/// Consumes the queue of every client-id the pool holds, for as long as it holds it, until
/// `stop`; only while `siblings` says other workers consume the request queue (nobody else
/// hands jobs back). Jobs run with `run`, each with one of `slots`.
#[allow(clippy::too_many_arguments)]
pub async fn serve(
    connection: Arc<Connection>,
    routes: Routes,
    pool: Pool,
    siblings: Siblings,
    prefetch: u16,
    slots: Arc<Semaphore>,
    run: RunHeld,
    stop: CancellationToken,
    forward_until: CancellationToken,
) {
    let mut holdings = pool.holdings();
    let mut serving: HashMap<String, CancellationToken> = HashMap::new();
    let consumers = TaskTracker::new();
    loop {
        let held: HashMap<String, Held> = if siblings.present() {
            pool.held()
                .into_iter()
                .take(MAX_SERVED)
                .map(|held| (Routes::key(&held), held))
                .collect()
        } else {
            HashMap::new()
        };
        serving.retain(|key, done| {
            let keep = held.contains_key(key) && !done.is_cancelled();
            if !keep {
                done.cancel();
            }
            keep
        });
        for key in held.into_keys() {
            if serving.contains_key(&key) {
                continue;
            }
            let done = stop.child_token();
            serving.insert(key.clone(), done.clone());
            consumers.spawn(consume(
                Arc::clone(&connection),
                routes.clone(),
                key,
                prefetch,
                Arc::clone(&slots),
                Arc::clone(&run),
                Ends {
                    done,
                    stop: stop.clone(),
                    forward_until: forward_until.clone(),
                },
            ));
        }
        tokio::select! {
            () = stop.cancelled() => break,
            changed = holdings.changed() => if changed.is_err() { break },
            () = tokio::time::sleep(SIBLINGS_EVERY) => {}
        }
    }
    consumers.close();
    consumers.wait().await;
}

/// When a client-id's consumer ends.
struct Ends {
    /// The client-id is no longer held here (or the session is over): stop taking jobs.
    done: CancellationToken,
    /// The session is over (the worker stops, or the session was lost).
    stop: CancellationToken,
    /// Once the session is over, what still arrives is sent on to the request queue until
    /// this: the session's own jobs are done.
    forward_until: CancellationToken,
}

/// Consumes one client-id's queue until `ends.done`; when the session is over, goes on
/// forwarding what arrives to the request queue until `ends.forward_until`. Then lets its jobs
/// finish and closes the channel, which gives back to the queue what was received and not
/// started.
async fn consume(
    connection: Arc<Connection>,
    routes: Routes,
    key: String,
    prefetch: u16,
    slots: Arc<Semaphore>,
    run: RunHeld,
    ends: Ends,
) {
    let Ends {
        done,
        stop,
        forward_until,
    } = ends;
    let channel = match open(&connection, &routes, &key, prefetch).await {
        Ok(channel) => channel,
        Err(err) => {
            tracing::warn!(error = %err, retry_after = ?RETRY_AFTER, "cannot consume a held client-id's queue: jobs for it reach this worker through the request queue only");
            rest(&done).await;
            return;
        }
    };
    let tag = format!("mqtt-connector-held-{}", uuid::Uuid::new_v4());
    let consumed = bounded(channel.basic_consume(
        routes.held_queue(&key).as_str().into(),
        tag.as_str().into(),
        BasicConsumeOptions::default(),
        FieldTable::default(),
    ))
    .await;
    let mut deliveries = match consumed {
        Ok(deliveries) => deliveries,
        Err(err) => {
            tracing::debug!(error = %err, "cannot consume a held client-id's queue");
            consumer::close_channel(&channel).await;
            rest(&done).await;
            return;
        }
    };
    let (settler, settler_task) = Settler::start(channel.clone());
    let publisher = Publisher::start(channel.clone());
    let jobs = TaskTracker::new();
    // Taken over by another worker or the siblings gone: stop. The session over: forward.
    let forwarding = || done.is_cancelled() && stop.is_cancelled();
    loop {
        let delivery = tokio::select! {
            () = done.cancelled(), if !forwarding() => {
                if forwarding() { continue } else { break }
            }
            () = forward_until.cancelled(), if forwarding() => break,
            delivery = deliveries.next() => delivery,
        };
        let Some(Ok(delivery)) = delivery else {
            // Cancelled by RabbitMQ (queue deleted, node lost): the next change of holdings
            // starts again.
            done.cancel();
            break;
        };
        settler.taken(delivery.delivery_tag);
        let slot = match forwarding() {
            true => None,
            false => tokio::select! {
                () = done.cancelled() => None,
                slot = Arc::clone(&slots).acquire_owned() => slot.ok(),
            },
        };
        match slot {
            Some(slot) => jobs.spawn(run(
                delivery,
                channel.status().clone(),
                publisher.clone(),
                settler.clone(),
                slot,
            )),
            None if forwarding() => jobs.spawn(forward(
                delivery,
                routes.queue.clone(),
                publisher.clone(),
                settler.clone(),
            )),
            // Not settled: it goes back to this queue, for the new holder, when the channel
            // closes.
            None => break,
        };
    }
    drop(deliveries);
    jobs.close();
    jobs.wait().await;
    settler_task.finish(settler, consumer::CLOSE_TIMEOUT).await;
    consumer::close_channel(&channel).await;
}

/// Sends a job that reached a stopping worker's client-id queue on to the request queue, where
/// the worker that takes it sees it was routed ([`ROUTED_HEADER`]) and takes the client-id
/// itself; acked once RabbitMQ confirmed the copy, else given back to the client-id's queue.
async fn forward(delivery: Delivery, queue: String, publisher: Publisher, settler: Settler) {
    let taken = handback::taken(
        delivery.properties.headers().as_ref(),
        std::time::SystemTime::now(),
    );
    let forwarded =
        handback::hand_back(&publisher, HandBackTo::Queue(&queue), &delivery, taken).await;
    let settlement = match forwarded {
        true => Settlement::Ack,
        false => Settlement::Requeue,
    };
    settler.settle(delivery.delivery_tag, settlement);
}

/// Ends a consumer that could not start: its client-id is not tried again before
/// [`RETRY_AFTER`] (the serving loop sees `done` only then), or before it is held anew.
async fn rest(done: &CancellationToken) {
    tokio::select! {
        () = done.cancelled() => {}
        () = tokio::time::sleep(RETRY_AFTER) => {}
    }
    done.cancel();
}

async fn open(
    connection: &Connection,
    routes: &Routes,
    key: &str,
    prefetch: u16,
) -> Result<Channel, SetupError> {
    let channel = bounded(connection.create_channel()).await?;
    bounded(channel.basic_qos(prefetch, BasicQosOptions::default())).await?;
    // Replies and hand-backs of these jobs are published on this channel, with confirms.
    bounded(channel.confirm_select(ConfirmSelectOptions::default())).await?;
    let queue = routes.held_queue(key);
    bounded(channel.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions::durable(),
        routes.held_arguments(),
    ))
    .await?;
    bounded(channel.queue_bind(
        queue.as_str().into(),
        routes.exchange.as_str().into(),
        key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    ))
    .await?;
    Ok(channel)
}

/// Why a client-id's queue or the exchanges could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Amqp(#[from] lapin::Error),
    #[error("RabbitMQ did not answer within {SETUP_TIMEOUT:?}")]
    TimedOut,
}

async fn bounded<T>(
    future: impl Future<Output = Result<T, lapin::Error>>,
) -> Result<T, SetupError> {
    match tokio::time::timeout(SETUP_TIMEOUT, future).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(SetupError::TimedOut),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_short_stable_and_tell_brokers_and_client_ids_apart() {
        let held = |broker: &str, client_id: &str| Held {
            broker: broker.to_owned(),
            client_id: client_id.to_owned(),
        };
        let key = Routes::key(&held("mqtt://a:1883", "x"));
        assert_eq!(key.len(), 32);
        assert_eq!(key, Routes::key(&held("mqtt://a:1883", "x")));
        assert_ne!(key, Routes::key(&held("mqtt://a:1883", "y")));
        assert_ne!(key, Routes::key(&held("mqtt://b:1883", "x")));
        assert_eq!(
            Routes::key(&held("mqtt://a:1883", &"é".repeat(40_000))).len(),
            32
        );
    }

    #[test]
    fn only_a_routed_job_says_its_holder_is_gone() {
        assert!(!was_routed(None));
        assert!(!was_routed(Some(&FieldTable::default())));
        let headers = routed_headers(FieldTable::default(), "k");
        assert!(was_routed(Some(&headers)));
    }
}
