//! One MQTT connection, MQTT 3.1.1 ([`v4`]) or 5 ([`v5`]) behind one interface: opened once
//! (CONNECT until CONNACK), then one task owns its event loop while any number of publishes
//! are in flight. Each publish gets its own completion: the broker's PUBACK or PUBCOMP for that
//! very packet (with its MQTT 5 reason code), or the reason the connection ended.
//! Requests also wait on it for answers: the connection subscribes to their response topics
//! (one SUBSCRIBE per topic, SUBACK awaited) and routes what comes in through [`Responses`].
//! A connection is never silently re-established: once it ends, it is closed for good and the
//! pool opens a new one, so no publish is replayed behind a job's back.

mod health;
mod v4;
mod v5;

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use tokio::sync::{OwnedSemaphorePermit, oneshot};
use tokio_util::sync::CancellationToken;

use super::MqttError;
use super::responses::{Incoming, Matching, Released, Responses};
use crate::job::{Message, MqttVersion, Qos, Target};
use crate::metrics::Metrics;

/// Requests the event loop takes from its channel per iteration (rumqttc's default is one).
const REQUEST_BATCH: usize = 64;

/// How long a publish that the client failed waits for its event loop to be dropped (which
/// follows at once: the loop records why the connection ended, then is dropped).
const GONE_WITHIN: Duration = Duration::from_secs(2);

/// How often a connection's watchdog asks [`health::Health`] for its verdict.
const HEALTH_CHECK_EVERY: Duration = Duration::from_secs(1);

/// A connection's health bookkeeping, shared by its event loop (which records) and its watchdog.
type SharedHealth = Arc<Mutex<health::Health>>;

/// Records what the event loop reported.
fn record(health: &SharedHealth, seen: health::Seen) {
    if let Ok(mut health) = health.lock() {
        health.seen(seen, Instant::now());
    }
}

/// The default for [`ConnectionSettings::max_incoming_packet_bytes`]: acknowledgements are a few
/// bytes; answers to requests need up to `--max-response-bytes` plus headers.
pub const DEFAULT_MAX_INCOMING_PACKET_BYTES: usize = 1024 * 1024;

/// How connections are opened; the same for every target.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    /// MQTT keep-alive; also how long a broker may send nothing while it owes an answer to a
    /// packet written (then the connection is given up: see [`health`]).
    pub keep_alive: Duration,
    /// Publishes in flight on one connection before new ones wait (AWS IoT allows 100). With
    /// MQTT 5 the broker's Receive Maximum lowers it.
    pub inflight: u16,
    /// Largest MQTT packet we send.
    pub max_packet_bytes: usize,
    /// Largest MQTT packet we accept from a broker: any broker a job names could otherwise make
    /// us buffer a huge packet. MQTT 5: also announced in CONNECT as Maximum Packet Size (see
    /// `v5::open`).
    pub max_incoming_packet_bytes: usize,
    /// Appended to every client-id, so workers sharing a connector do not share a client-id
    /// (MQTT lets only one connection hold one). Empty: client-ids are used as written.
    pub client_id_suffix: String,
}

impl Default for ConnectionSettings {
    fn default() -> Self {
        Self {
            keep_alive: Duration::from_secs(30),
            inflight: 1000,
            max_packet_bytes: crate::job::DEFAULT_MAX_CONTENT_BYTES + 64 * 1024,
            max_incoming_packet_bytes: DEFAULT_MAX_INCOMING_PACKET_BYTES,
            client_id_suffix: String::new(),
        }
    }
}

/// The broker's acknowledgement of one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The QoS at which the broker acknowledged (lower than asked when the broker has no QoS 2).
    pub qos: Qos,
    /// MQTT 5: the broker said no client subscribes to the topic (PUBACK 0x10).
    pub no_subscribers: bool,
    /// MQTT 5: the broker's Maximum QoS (CONNACK), when it was below the job's QoS and the
    /// message was published at it instead.
    pub lowered_to_max_qos: Option<Qos>,
}

/// How a SUBSCRIBE ended, as a version's client reports it.
enum SubAcked {
    Granted,
    /// A SUBACK reason code of 0x80 or more.
    Refused(u8),
    /// The connection ended first.
    Lost,
}

/// The jobs waiting for answers on one connection, fed by its event loop.
type SharedResponses = Arc<Responses<MqttError>>;

/// How a publish ended, as a version's client reports it.
enum Acked {
    Ack(Ack),
    /// MQTT 5: a PUBACK/PUBREC/PUBCOMP reason code of 0x80 or more.
    Refused(u8),
    /// The connection ended first.
    Lost,
}

/// The client of one protocol version.
#[derive(Clone)]
enum Client {
    V4(rumqttc::AsyncClient),
    V5(rumqttc5::AsyncClient),
}

/// What a version's `open` hands back once CONNACK accepted the connection.
struct Opened {
    client: Client,
    /// MQTT 5: the broker's Maximum Packet Size from CONNACK (none: MQTT's own limit).
    max_packet: Option<u32>,
    /// MQTT 5: the broker's Maximum QoS from CONNACK (none: QoS 2).
    max_qos: Option<Qos>,
    /// Polls the event loop until the connection ends and records why; run in its own task.
    run: BoxFuture<'static, ()>,
}

/// A live connection. Cheap to share; [`Connection::publish`] may be called concurrently.
pub struct Connection {
    client: Client,
    broker: String,
    max_packet: Option<u32>,
    /// Our own limit on what we send ([`ConnectionSettings::max_packet_bytes`]): the 3.1.1
    /// client refuses a larger packet inside its event loop, ending the connection.
    max_outgoing: usize,
    /// MQTT 5: the highest QoS the broker accepts (CONNACK); a publish above it would be a
    /// protocol error that ends the connection, so it is lowered to this.
    max_qos: Option<Qos>,
    /// Set once, when the event loop has ended: why.
    ended: Arc<OnceLock<End>>,
    /// Cancelled once the event loop has been dropped (every publish it had taken has failed).
    gone: CancellationToken,
    /// Requests waiting for their answers on this connection.
    responses: SharedResponses,
    /// Publishes currently using this connection (the pool never closes a busy one; the
    /// watchdog looks for progress only while there are some).
    pub(crate) in_use: Arc<AtomicUsize>,
    /// When the last publish finished, in milliseconds since `opened`.
    last_used_ms: AtomicU64,
    /// Whether the broker acknowledged any publish on this connection: one lost after that was
    /// working, not refused (a sibling's takeover, not a broker that drops every connection).
    acked: AtomicBool,
    /// A publish alone on this connection (a suspect, see `pipeline`) is in flight, or was
    /// when it ended: a loss then is that job's doing, not a takeover.
    alone: AtomicBool,
    opened: Instant,
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Closed on purpose (idle, shutdown).
    Closed,
    /// Lost: the broker or the network ended it (with an MQTT 5 DISCONNECT's reason, if any).
    Lost(String),
    /// MQTT 5: the broker sent DISCONNECT 0x8E, session taken over: another connection holds
    /// the client-id (evidence no job's publish can fake).
    TakenOver(String),
}

impl Connection {
    /// Connects and waits for CONNACK, then hands the event loop to its own task. `tls` is the
    /// configuration for a TLS target; `place` is held until the socket is closed (the pool's
    /// bound on open connections).
    pub async fn open(
        target: &Target,
        tls: Option<Arc<rustls::ClientConfig>>,
        settings: &ConnectionSettings,
        metrics: &Metrics,
        place: OwnedSemaphorePermit,
    ) -> Result<Connection, MqttError> {
        let broker = target.broker.to_string();
        let ended = Arc::new(OnceLock::new());
        let keep_alive = settings.keep_alive.max(Duration::from_secs(1));
        let health = Arc::new(Mutex::new(health::Health::new(Instant::now(), keep_alive)));
        let responses: SharedResponses = Arc::new(Responses::default());
        let opened = match target.version {
            MqttVersion::V3_1_1 => {
                let (ended, health) = (Arc::clone(&ended), Arc::clone(&health));
                let responses = Arc::clone(&responses);
                v4::open(target, settings, &broker, tls, ended, health, responses).await?
            }
            MqttVersion::V5 => {
                let (ended, health) = (Arc::clone(&ended), Arc::clone(&health));
                let responses = Arc::clone(&responses);
                v5::open(target, settings, &broker, tls, ended, health, responses).await?
            }
        };
        let in_use = Arc::new(AtomicUsize::new(0));

        let gauge = metrics.mqtt_connections(&broker);
        gauge.inc();
        let run = opened.run;
        let watch = watchdog(
            broker.clone(),
            health,
            Arc::clone(&in_use),
            Arc::clone(&ended),
        );
        let gone = CancellationToken::new();
        let dropped = gone.clone();
        let cleared = Arc::clone(&responses);
        tokio::spawn(async move {
            // The event loop is dropped when `run` ends, or when the watchdog gives the
            // connection up (having recorded why): every publish still waiting has failed and
            // the socket is closed; only then is its place in the pool free.
            tokio::select! {
                () = run => {}
                () = watch => {}
            }
            dropped.cancel();
            // Every request still waiting learns that its subscription went with the connection.
            cleared.clear();
            gauge.dec();
            drop(place);
        });

        Ok(Connection {
            client: opened.client,
            broker,
            max_packet: opened.max_packet,
            max_qos: opened.max_qos,
            max_outgoing: settings.max_packet_bytes,
            ended,
            gone,
            responses,
            in_use,
            last_used_ms: AtomicU64::new(0),
            acked: AtomicBool::new(false),
            alone: AtomicBool::new(false),
            opened: Instant::now(),
        })
    }

    /// Publishes and waits for the broker's acknowledgement of this publish: PUBACK for QoS 1,
    /// PUBCOMP for QoS 2 (or PUBACK from a broker without QoS 2), written to the socket for QoS 0.
    /// MQTT 5: a refusing reason code is [`MqttError::MessageRefused`], and a message over the
    /// broker's Maximum Packet Size is [`MqttError::TooLarge`] before anything is sent.
    pub async fn publish(&self, message: &Message) -> Result<Ack, MqttError> {
        if self.is_ended() {
            // Nothing would read it.
            return Err(self.lost());
        }
        let (qos, lowered_to_max_qos) = lower_to(message.qos, self.max_qos);
        let size = message.packet_size(matches!(self.client, Client::V5(_)));
        if size > self.max_outgoing {
            return Err(MqttError::OverWorkerLimit {
                size,
                max: self.max_outgoing,
            });
        }
        if let (Client::V5(_), Some(max)) = (&self.client, self.max_packet) {
            let size = v5::packet_size(message);
            if size > usize::try_from(max).unwrap_or(usize::MAX) {
                return Err(MqttError::TooLarge {
                    broker: self.broker.clone(),
                    size,
                    max,
                });
            }
        }
        let acked = std::pin::pin!(async {
            match &self.client {
                Client::V4(client) => v4::publish(client, message).await,
                Client::V5(client) => v5::publish(client, message, qos).await,
            }
        });
        let acked = until_gone(acked, &self.gone).await;
        // At least 1: 0 means "never used".
        self.last_used_ms
            .store(self.age_ms().max(1), Ordering::Relaxed);
        match acked {
            Acked::Ack(ack) => {
                self.acked.store(true, Ordering::Relaxed);
                Ok(Ack {
                    lowered_to_max_qos,
                    ..ack
                })
            }
            // A refusal is an answer: the connection works.
            Acked::Refused(code) => Err(MqttError::MessageRefused {
                broker: self.broker.clone(),
                code,
            }),
            Acked::Lost => {
                // The client may fail a publish before its event loop has recorded why the
                // connection ended: wait (briefly) for the loop to be gone, so that `ended` is
                // set before this job lets another use the connection (the pool then replaces
                // it) and the error names the real reason.
                if tokio::time::timeout(GONE_WITHIN, self.gone.cancelled())
                    .await
                    .is_err()
                {
                    tracing::debug!(broker = %self.broker, "a publish was lost while the event loop still ran");
                }
                Err(self.lost())
            }
        }
    }

    /// Starts waiting for an answer on `topic`: the job is registered first, then the topic is
    /// subscribed (QoS 1; MQTT 5 with Retain Handling "do not send") unless another job on this
    /// connection already did, and this returns once the broker granted the SUBACK, so an
    /// answer to a publish made after it cannot be missed. A refused SUBACK is
    /// [`MqttError::SubscribeRefused`]. Dropping the wait releases the job's place, and the last
    /// job on a topic unsubscribes it.
    pub async fn await_answer(
        &self,
        topic: &str,
        matching: Matching,
    ) -> Result<AnswerWait, MqttError> {
        if self.is_ended() {
            return Err(self.lost());
        }
        let registered = self.responses.register(topic, matching);
        let wait = AnswerWait {
            responses: Arc::clone(&self.responses),
            client: self.client.clone(),
            topic: topic.to_owned(),
            id: registered.id,
            answer: registered.answer,
        };
        registered
            .suback
            .get_or_init(|| self.subscribe(topic))
            .await
            .clone()?;
        Ok(wait)
    }

    async fn subscribe(&self, topic: &str) -> Result<(), MqttError> {
        let acked = match &self.client {
            Client::V4(client) => v4::subscribe(client, topic).await,
            Client::V5(client) => v5::subscribe(client, topic).await,
        };
        match acked {
            SubAcked::Granted => Ok(()),
            SubAcked::Refused(code) => Err(MqttError::SubscribeRefused {
                broker: self.broker.clone(),
                topic: topic.to_owned(),
                code,
            }),
            SubAcked::Lost => Err(self.lost()),
        }
    }

    /// Requests waiting for answers on this connection (for tests and the pool's accounting).
    pub fn answers_awaited(&self) -> usize {
        self.responses.holders()
    }

    /// Resolves once the connection's event loop is gone (lost, closed or given up).
    pub fn gone(&self) -> tokio_util::sync::WaitForCancellationFutureOwned {
        self.gone.clone().cancelled_owned()
    }

    /// The connection has ended (lost or closed); it will not carry another publish.
    pub fn is_ended(&self) -> bool {
        self.ended.get().is_some()
    }

    /// Why it ended, if it has.
    pub fn end(&self) -> Option<&End> {
        self.ended.get()
    }

    /// Marks (or clears) a publish alone on this connection; left set when the connection is
    /// lost with it, so the pool attributes the loss to that job.
    pub fn set_alone(&self, alone: bool) {
        self.alone.store(alone, Ordering::Relaxed);
    }

    /// Whether a publish was alone on this connection (see [`Connection::set_alone`]).
    pub fn was_alone(&self) -> bool {
        self.alone.load(Ordering::Relaxed)
    }

    /// Whether the broker acknowledged a publish on this connection.
    pub fn has_worked(&self) -> bool {
        self.acked.load(Ordering::Relaxed)
    }

    /// How long since this connection was opened.
    pub fn age(&self) -> Duration {
        self.opened.elapsed()
    }

    /// How long no publish has used this connection; zero while one is in flight.
    pub fn idle_for(&self) -> Duration {
        if self.in_use.load(Ordering::Acquire) > 0 {
            return Duration::ZERO;
        }
        Duration::from_millis(
            self.age_ms()
                .saturating_sub(self.last_used_ms.load(Ordering::Relaxed)),
        )
    }

    /// Sends DISCONNECT and lets the event loop end; publishes in flight are failed.
    pub fn close(&self) {
        let _ = self.ended.set(End::Closed);
        match &self.client {
            Client::V4(client) => {
                let _ = client.try_disconnect_now();
            }
            Client::V5(client) => {
                let _ = client.try_disconnect_now();
            }
        }
    }

    fn age_ms(&self) -> u64 {
        u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Whether any publish has finished on this connection (acknowledged or not).
    pub fn has_been_used(&self) -> bool {
        self.last_used_ms.load(Ordering::Relaxed) > 0
    }

    /// The error of a publish that this connection can no longer carry.
    pub fn lost(&self) -> MqttError {
        let reason = match self.ended.get() {
            Some(End::Lost(reason) | End::TakenOver(reason)) => reason.clone(),
            Some(End::Closed) => "the worker closed the connection".into(),
            None => "the event loop stopped".into(),
        };
        MqttError::PublishLost {
            broker: self.broker.clone(),
            reason,
        }
    }
}

/// The outcome of a publish, or [`Acked::Lost`] once the event loop is `gone` without
/// answering it. The client's request channel outlives its event loop: a publish queued after
/// the loop's last read of the channel (between losing the socket and being dropped) is never
/// failed by the client, and would wait for ever, holding its job's turn at the gate.
/// `acked` is pinned by the caller: held once, in the caller's future (a job's future is copied
/// to the heap whole when its task is spawned).
async fn until_gone(
    mut acked: Pin<&mut impl std::future::Future<Output = Acked>>,
    gone: &CancellationToken,
) -> Acked {
    tokio::select! {
        // An answer that arrived before the loop was dropped wins.
        biased;
        acked = &mut acked => acked,
        () = gone.cancelled() => {
            tracing::debug!("a publish queued after its event loop's last read: lost with the connection");
            Acked::Lost
        }
    }
}

/// One job's wait for its answer on one connection (see [`Connection::await_answer`]).
pub struct AnswerWait {
    responses: SharedResponses,
    client: Client,
    topic: String,
    id: u64,
    answer: oneshot::Receiver<Incoming>,
}

impl AnswerWait {
    /// The job's answer; `None` when the connection ended first (subscribe again on another).
    pub async fn answer(&mut self) -> Option<Incoming> {
        (&mut self.answer).await.ok()
    }
}

impl Drop for AnswerWait {
    fn drop(&mut self) {
        if self.responses.release(&self.topic, self.id) != Released::Unsubscribe {
            return;
        }
        // Queued without waiting: a job that leaves (answered, timed out, dropped) must not
        // block, and on an ended connection the subscription is gone anyway.
        let queued = match &self.client {
            Client::V4(client) => client.try_unsubscribe(self.topic.as_str()).is_ok(),
            Client::V5(client) => client.try_unsubscribe(self.topic.as_str()).is_ok(),
        };
        if !queued {
            tracing::debug!(topic = %self.topic, "UNSUBSCRIBE not queued (connection ended or busy)");
        }
    }
}

/// What an incoming PUBLISH is to the requests waiting on the connection.
fn route(responses: &Responses<MqttError>, incoming: Incoming) {
    let topic = incoming.topic.clone();
    let delivered = responses.deliver(incoming);
    tracing::trace!(%topic, ?delivered, "message on a response topic");
}

/// Resolves when the connection's health says to give it up, having recorded why in `ended`.
async fn watchdog(
    broker: String,
    health: SharedHealth,
    in_use: Arc<AtomicUsize>,
    ended: Arc<OnceLock<End>>,
) {
    let mut tick = tokio::time::interval(HEALTH_CHECK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When publishes were first seen waiting since the connection was last idle.
    let mut busy_since: Option<Instant> = None;
    loop {
        tick.tick().await;
        let now = Instant::now();
        busy_since = match (in_use.load(Ordering::Acquire) > 0, busy_since) {
            (false, _) => None,
            (true, None) => Some(now),
            (true, since) => since,
        };
        let verdict = health
            .lock()
            .ok()
            .and_then(|health| health.verdict(now, busy_since));
        if let Some(reason) = verdict {
            tracing::warn!(broker, %reason, "MQTT connection stuck");
            if ended.set(End::Lost(reason)).is_ok() {
                return;
            }
        }
    }
}

/// The QoS to publish at: the job's, or the broker's Maximum QoS when that is lower (then also
/// returned, for the job's reply).
fn lower_to(asked: Qos, max_qos: Option<Qos>) -> (Qos, Option<Qos>) {
    match max_qos {
        Some(max) if max < asked => (max, Some(max)),
        _ => (asked, None),
    }
}

/// The client options of one target for either crate (their option APIs are the same, their
/// types are not): TCP, TLS, websocket or websocket over TLS, both TLS ones with our rustls
/// configuration (roots, client certificate, ALPN).
macro_rules! transport_options {
    ($lib:ident, $target:expr, $settings:expr, $broker:expr, $tls:expr) => {{
        use crate::job::Transport;
        let target: &crate::job::Target = $target;
        let broker: &str = $broker;
        let client_id = format!("{}{}", target.client_id, $settings.client_id_suffix);
        let tls_config = $tls.map($lib::TlsConfiguration::Rustls);
        let bad_url = |err: $lib::OptionError| MqttError::BadOptions {
            broker: broker.to_owned(),
            reason: format!("bad websocket URL: {err}"),
        };
        let url = target.broker.websocket_url();
        match (target.broker.transport, url, tls_config) {
            (Transport::Ws, Some(url), None) => Ok($lib::MqttOptions::new(
                client_id,
                $lib::Broker::websocket(url).map_err(bad_url)?,
            )),
            (Transport::Wss, Some(url), Some(tls_config)) => {
                $lib::MqttOptions::websocket_with_tls_config(client_id, url, tls_config)
                    .map_err(bad_url)
            }
            (Transport::Tcp, None, None) => Ok($lib::MqttOptions::new(
                client_id,
                $lib::Broker::tcp(target.broker.host.clone(), target.broker.port),
            )),
            (Transport::Tls, None, Some(tls_config)) => {
                let mut options = $lib::MqttOptions::new(
                    client_id,
                    $lib::Broker::tcp(target.broker.host.clone(), target.broker.port),
                );
                options.set_transport($lib::Transport::tls_with_config(tls_config));
                Ok(options)
            }
            // A validated job never gets here: TLS settings exist exactly for TLS transports
            // and a path exactly for websockets.
            (transport, _, _) => Err(MqttError::Connect {
                broker: broker.to_owned(),
                reason: format!("inconsistent target for {}://", transport.scheme()),
            }),
        }
    }};
}
use transport_options;

/// Advice for a TLS handshake the server closed without a TLS error: the usual cause is a
/// plain-MQTT port.
fn closed_during_handshake(reason: &str, websocket: bool) -> String {
    let plain = if websocket { "ws://" } else { "tcp://" };
    format!(
        "{reason}: the server closed the connection during the TLS handshake; \
         if this port speaks plain MQTT, use {plain} (or the broker's TLS port)"
    )
}

/// Advice for a failed websocket upgrade.
fn websocket_advice(err: &dyn std::fmt::Display) -> String {
    format!(
        "{err} (the websocket upgrade failed: check that the port is the broker's \
         websocket listener and the URL's path, /mqtt unless written)"
    )
}

/// The rustls error somewhere in the chain (a rejected client certificate under TLS 1.3 arrives
/// after the handshake, as an alert wrapped in an I/O error).
fn rustls_error<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(tls) = rustls_error(inner)
        {
            return Some(tls);
        }
        current = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_publish_still_waiting_when_its_event_loop_is_gone_is_lost_at_once() {
        let gone = CancellationToken::new();
        gone.cancel();
        let never = std::future::pending::<Acked>();
        let acked = tokio::time::timeout(
            Duration::from_secs(1),
            until_gone(std::pin::pin!(never), &gone),
        )
        .await
        .expect("a publish outlived its event loop");
        assert!(matches!(acked, Acked::Lost));
    }

    #[tokio::test]
    async fn an_answer_that_came_before_the_event_loop_was_gone_wins() {
        let gone = CancellationToken::new();
        gone.cancel();
        let ack = Ack {
            qos: Qos::AtLeastOnce,
            no_subscribers: false,
            lowered_to_max_qos: None,
        };
        let acked = until_gone(std::pin::pin!(std::future::ready(Acked::Ack(ack))), &gone).await;
        assert!(matches!(acked, Acked::Ack(a) if a == ack));
    }

    #[test]
    fn a_qos_above_the_brokers_maximum_is_lowered_to_it_and_says_so() {
        assert_eq!(
            lower_to(Qos::ExactlyOnce, Some(Qos::AtLeastOnce)),
            (Qos::AtLeastOnce, Some(Qos::AtLeastOnce))
        );
        assert_eq!(
            lower_to(Qos::AtLeastOnce, Some(Qos::AtMostOnce)),
            (Qos::AtMostOnce, Some(Qos::AtMostOnce))
        );
    }

    #[test]
    fn a_qos_within_the_brokers_maximum_is_kept() {
        assert_eq!(lower_to(Qos::ExactlyOnce, None), (Qos::ExactlyOnce, None));
        assert_eq!(
            lower_to(Qos::AtLeastOnce, Some(Qos::AtLeastOnce)),
            (Qos::AtLeastOnce, None)
        );
        assert_eq!(
            lower_to(Qos::AtMostOnce, Some(Qos::AtMostOnce)),
            (Qos::AtMostOnce, None)
        );
    }
}
