//! One MQTT connection: opened once (CONNECT until CONNACK), then one task owns its event loop
//! while any number of publishes are in flight. Each publish gets its own completion: the
//! broker's PUBACK or PUBCOMP for that very packet, or the reason the connection ended.
//! A connection is never silently re-established: once it ends, it is closed for good and the
//! pool opens a new one, so no publish is replayed behind a job's back.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, NetworkOptions, Packet,
    PublishOptions, TlsConfiguration,
};

use tokio::sync::OwnedSemaphorePermit;

use super::MqttError;
use crate::job::{Message, Qos, Target, Transport};
use crate::metrics::Metrics;

/// Requests the event loop takes from its channel per iteration (rumqttc's default is one).
const REQUEST_BATCH: usize = 64;

/// How connections are opened; the same for every target.
#[derive(Debug, Clone)]
pub struct ConnectionSettings {
    pub keep_alive: Duration,
    /// Publishes in flight on one connection before new ones wait (AWS IoT allows 100).
    pub inflight: u16,
    /// Largest MQTT packet we send or accept.
    pub max_packet_bytes: usize,
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
            client_id_suffix: String::new(),
        }
    }
}

/// The broker's acknowledgement of one publish.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack {
    /// The QoS at which the broker acknowledged (lower than asked when the broker has no QoS 2).
    pub qos: Qos,
}

/// A live connection. Cheap to share; [`Connection::publish`] may be called concurrently.
pub struct Connection {
    client: AsyncClient,
    broker: String,
    /// Set once, when the event loop has ended: why.
    ended: Arc<OnceLock<End>>,
    /// Publishes currently using this connection (the pool never closes a busy one).
    pub(crate) in_use: AtomicUsize,
    /// When the last publish finished, in milliseconds since `opened`.
    last_used_ms: AtomicU64,
    /// Whether the broker acknowledged any publish on this connection: one lost after that was
    /// working, not refused (a sibling's takeover, not a broker that drops every connection).
    acked: AtomicBool,
    opened: Instant,
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum End {
    /// Closed on purpose (idle, shutdown).
    Closed,
    /// Lost: the broker or the network ended it.
    Lost(String),
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
        let mut options = mqtt_options(target, tls, settings, &broker)?;
        options
            .set_keep_alive(u16::try_from(settings.keep_alive.as_secs()).unwrap_or(u16::MAX))
            .set_clean_session(true)
            .set_inflight(settings.inflight.max(1));
        options.set_max_packet_size(settings.max_packet_bytes, settings.max_packet_bytes);
        options.set_request_channel_capacity(usize::from(settings.inflight.max(1)) * 2);
        // Publishes queued together leave in one write instead of one write(2) each.
        options.set_max_request_batch(REQUEST_BATCH);
        if let Some(username) = &target.username {
            let password = target
                .password
                .as_ref()
                .map(|p| p.expose().to_owned())
                .unwrap_or_default();
            options.set_credentials(username.clone(), password);
        }
        let (client, mut eventloop) =
            AsyncClient::builder(options)
                .try_build()
                .map_err(|err| MqttError::BadOptions {
                    broker: broker.clone(),
                    reason: err.to_string(),
                })?;
        let mut network = NetworkOptions::new();
        network.set_tcp_nodelay(true);
        // The job's own timeout bounds every connect; this is only a backstop.
        network.set_connection_timeout(60);
        eventloop.set_network_options(network);

        loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => break,
                Ok(_) => {}
                Err(err) => return Err(connect_error(&broker, target.broker.transport, &err)),
            }
        }

        let ended = Arc::new(OnceLock::new());
        let task_ended = Arc::clone(&ended);
        let gauge = metrics.mqtt_connections(&broker);
        gauge.inc();
        tokio::spawn(async move {
            // The only place this event loop is polled: poll() is never raced against anything.
            let end = loop {
                match eventloop.poll().await {
                    Ok(_) => {}
                    Err(ConnectionError::RequestsDone) => break End::Closed,
                    Err(err) if task_ended.get().is_some() => {
                        tracing::debug!(error = %err, "MQTT connection closed");
                        break End::Closed;
                    }
                    Err(err) => break End::Lost(describe(&err)),
                }
            };
            let _ = task_ended.set(end);
            gauge.dec();
            // Dropping the event loop fails every publish still waiting for its acknowledgement
            // and closes the socket; only then is its place in the pool free.
            drop(eventloop);
            drop(place);
        });

        Ok(Connection {
            client,
            broker,
            ended,
            in_use: AtomicUsize::new(0),
            last_used_ms: AtomicU64::new(0),
            acked: AtomicBool::new(false),
            opened: Instant::now(),
        })
    }

    /// Publishes and waits for the broker's acknowledgement of this publish: PUBACK for QoS 1,
    /// PUBCOMP for QoS 2 (or PUBACK from a broker without QoS 2), written to the socket for QoS 0.
    pub async fn publish(&self, message: &Message) -> Result<Ack, MqttError> {
        let options = PublishOptions::new(message.qos.into()).retain(message.retain);
        let notice = self
            .client
            .publish_tracked(message.topic.as_str(), message.payload.clone(), options)
            .await
            .map_err(|_| self.lost())?;
        let result = notice.wait_async().await;
        // At least 1: 0 means "never used".
        self.last_used_ms
            .store(self.age_ms().max(1), Ordering::Relaxed);
        match result {
            Ok(done) => {
                self.acked.store(true, Ordering::Relaxed);
                Ok(Ack {
                    qos: done.qos().into(),
                })
            }
            Err(_) => Err(self.lost()),
        }
    }

    /// The connection has ended (lost or closed); it will not carry another publish.
    pub fn is_ended(&self) -> bool {
        self.ended.get().is_some()
    }

    /// Why it ended, if it has.
    pub fn end(&self) -> Option<&End> {
        self.ended.get()
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
        let _ = self.client.try_disconnect_now();
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
            Some(End::Lost(reason)) => reason.clone(),
            Some(End::Closed) => "the worker closed the connection".into(),
            None => "the event loop stopped".into(),
        };
        MqttError::PublishLost {
            broker: self.broker.clone(),
            reason,
        }
    }
}

/// The client options for one target, with its transport: TCP, TLS, websocket or websocket
/// over TLS (both TLS ones with our rustls configuration: roots, client certificate, ALPN).
fn mqtt_options(
    target: &Target,
    tls: Option<Arc<rustls::ClientConfig>>,
    settings: &ConnectionSettings,
    broker: &str,
) -> Result<MqttOptions, MqttError> {
    let client_id = format!("{}{}", target.client_id, settings.client_id_suffix);
    let tls_config = tls.map(TlsConfiguration::Rustls);
    let bad_url = |err: rumqttc::OptionError| MqttError::BadOptions {
        broker: broker.to_owned(),
        reason: format!("bad websocket URL: {err}"),
    };
    let url = target.broker.websocket_url();
    match (target.broker.transport, url, tls_config) {
        (Transport::Ws, Some(url), None) => Ok(MqttOptions::new(
            client_id,
            rumqttc::Broker::websocket(url).map_err(bad_url)?,
        )),
        (Transport::Wss, Some(url), Some(tls_config)) => {
            MqttOptions::websocket_with_tls_config(client_id, url, tls_config).map_err(bad_url)
        }
        (Transport::Tcp, None, None) => Ok(MqttOptions::new(
            client_id,
            rumqttc::Broker::tcp(target.broker.host.clone(), target.broker.port),
        )),
        (Transport::Tls, None, Some(tls_config)) => {
            let mut options = MqttOptions::new(
                client_id,
                rumqttc::Broker::tcp(target.broker.host.clone(), target.broker.port),
            );
            options.set_transport(rumqttc::Transport::tls_with_config(tls_config));
            Ok(options)
        }
        // A validated job never gets here: TLS settings exist exactly for TLS transports and a
        // path exactly for websockets.
        (transport, _, _) => Err(MqttError::Connect {
            broker: broker.to_owned(),
            reason: format!("inconsistent target for {}://", transport.scheme()),
        }),
    }
}

/// Maps a failure before CONNACK to the contract's codes.
fn connect_error(broker: &str, transport: Transport, err: &ConnectionError) -> MqttError {
    let broker = broker.to_owned();
    let reason = describe(err);
    let plain = if transport.is_websocket() {
        "ws://"
    } else {
        "tcp://"
    };
    match err {
        ConnectionError::ConnectionRefused(ConnectReturnCode::ServiceUnavailable) => {
            MqttError::Connect { broker, reason }
        }
        ConnectionError::ConnectionRefused(_) => MqttError::Refused { broker, reason },
        ConnectionError::Tls(_) if rustls_error(err).is_none() => MqttError::Tls {
            broker,
            // No TLS error, just the socket closing: the usual cause is a plain-MQTT port.
            reason: format!(
                "{reason}: the server closed the connection during the TLS handshake; \
                 if this port speaks plain MQTT, use {plain} (or the broker's TLS port)"
            ),
        },
        ConnectionError::Tls(_) => MqttError::Tls { broker, reason },
        ConnectionError::NetworkTimeout => MqttError::NoAnswer { broker, reason },
        _ if rustls_error(err).is_some() => MqttError::Tls { broker, reason },
        _ => MqttError::Connect { broker, reason },
    }
}

/// Words for a connection error; never contains credentials (rumqttc errors do not carry them).
fn describe(err: &ConnectionError) -> String {
    match err {
        ConnectionError::ConnectionRefused(code) => match code {
            ConnectReturnCode::BadUserNamePassword => {
                "bad username or password (CONNACK code 4)".into()
            }
            ConnectReturnCode::NotAuthorized => {
                "not authorized: check username, password or client certificate (CONNACK code 5)"
                    .into()
            }
            ConnectReturnCode::BadClientId => "client-id rejected (CONNACK code 2)".into(),
            ConnectReturnCode::RefusedProtocolVersion => {
                "MQTT 3.1.1 not accepted (CONNACK code 1)".into()
            }
            ConnectReturnCode::ServiceUnavailable => "server unavailable (CONNACK code 3)".into(),
            ConnectReturnCode::Success => "refused".into(),
        },
        ConnectionError::NetworkTimeout => "no CONNACK within the connection timeout".into(),
        ConnectionError::Websocket(_) | ConnectionError::ResponseValidation(_)
            if rustls_error(err).is_none() =>
        {
            format!(
                "{err} (the websocket upgrade failed: check that the port is the broker's \
                 websocket listener and the URL's path, /mqtt unless written)"
            )
        }
        _ => match rustls_error(err) {
            Some(tls) => format!("TLS: {tls}"),
            None => err.to_string(),
        },
    }
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
