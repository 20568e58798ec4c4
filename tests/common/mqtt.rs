//! MQTT clients for tests (rumqttc, MQTT 3.1.1): a [`Subscriber`] that records what arrives on a
//! topic, and a [`Publisher`] that publishes with tracked acknowledgements.
//!
//! Both run the rumqttc event loop in a spawned task (aborted on drop), use a fresh client id
//! (`harness-…`), a 16 MiB maximum packet size each way and a request channel of 10,000. After
//! a connection error the task waits 200 ms before polling again (rumqttc has no reconnect
//! backoff), so a restarted broker is reconnected to.

use super::certs::{Certs, ClientCert};
use super::{install_crypto_provider, unique_name};
use rumqttc::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, PublishOptions, PublishResult, QoS,
    SubscribeReasonCode, Transport,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant, timeout};

const MAX_PACKET: usize = 16 * 1024 * 1024;
const CAPACITY: usize = 10_000;
const RETRY_DELAY: Duration = Duration::from_millis(200);

/// Options for a plain-TCP connection to `host:port`, with a unique client id, a 16 MiB maximum
/// packet size and a 30 s keep-alive. Adjust (credentials, TLS, …) before passing them to
/// [`Subscriber::start_with`] or [`Publisher::connect`].
pub fn mqtt_options(host: &str, port: u16) -> MqttOptions {
    let mut opts = MqttOptions::new(unique_name("harness"), (host, port));
    opts.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    opts.set_keep_alive(30);
    opts
}

/// Options for a TLS connection to `localhost:port` trusting `certs`' CA, optionally presenting
/// `client` (certificate and key). Installs the ring crypto provider if needed.
pub fn tls_options(port: u16, certs: &Certs, client: Option<&ClientCert>) -> MqttOptions {
    tls_options_with_ca(port, certs.ca_pem(), client)
}

/// Like [`tls_options`] with any CA PEM (e.g. `certs.other_ca_pem()` for a wrong-CA test).
pub fn tls_options_with_ca(port: u16, ca_pem: Vec<u8>, client: Option<&ClientCert>) -> MqttOptions {
    install_crypto_provider();
    let mut opts = mqtt_options("localhost", port);
    let auth = client.map(|c| (c.crt_pem(), c.key_pem()));
    opts.set_transport(Transport::tls(ca_pem, auth, None));
    opts
}

/// One publish received by a [`Subscriber`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Received {
    /// The topic it was published on.
    pub topic: String,
    /// The payload bytes.
    pub payload: Vec<u8>,
    /// The QoS it was delivered at: min(publish QoS, subscription QoS) on Mosquitto.
    pub qos: QoS,
    /// The retain flag as delivered: true for a retained message sent on subscribe.
    pub retain: bool,
}

impl Received {
    /// The payload as UTF-8 (lossy).
    pub fn payload_str(&self) -> String {
        String::from_utf8_lossy(&self.payload).into_owned()
    }
}

/// An MQTT subscriber on one topic filter that collects every publish it receives.
///
/// It re-subscribes after each reconnect (clean sessions), so it keeps receiving across a
/// [`Mosquitto::restart`](super::Mosquitto::restart), but publishes sent while it was
/// disconnected are not delivered to it.
pub struct Subscriber {
    client: AsyncClient,
    rx: mpsc::UnboundedReceiver<Received>,
    task: JoinHandle<()>,
    client_id: String,
    last_error: Arc<Mutex<Option<String>>>,
}

impl Subscriber {
    /// Connects to `127.0.0.1:port` (plain TCP, anonymous), subscribes to `topic` at `qos` and
    /// returns once the broker granted the subscription (SubAck). Panics after 10 s.
    pub async fn start(port: u16, topic: &str, qos: QoS) -> Subscriber {
        Self::start_with(mqtt_options("127.0.0.1", port), topic, qos).await
    }

    /// Like [`start`](Self::start) with your own options (credentials, TLS from
    /// [`tls_options`], another host).
    pub async fn start_with(opts: MqttOptions, topic: &str, qos: QoS) -> Subscriber {
        let client_id = opts.client_id();
        let (client, eventloop) = AsyncClient::builder(opts).capacity(CAPACITY).build();
        let (tx, rx) = mpsc::unbounded_channel();
        let last_error = Arc::new(Mutex::new(None));
        let notice = client
            .subscribe_tracked(topic.to_string(), qos)
            .await
            .expect("queue subscribe");
        let task = tokio::spawn(subscriber_loop(
            eventloop,
            client.clone(),
            topic.to_string(),
            qos,
            tx,
            last_error.clone(),
        ));
        let suback = match timeout(Duration::from_secs(10), notice.wait_async()).await {
            Ok(Ok(suback)) => suback,
            Ok(Err(e)) => panic!(
                "subscribe to {topic:?} failed: {e} (last connection error: {:?})",
                last_error.lock().unwrap()
            ),
            Err(_) => panic!(
                "no SubAck for {topic:?} within 10 s (last connection error: {:?})",
                last_error.lock().unwrap()
            ),
        };
        assert!(
            suback
                .return_codes
                .iter()
                .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
            "subscription to {topic:?} refused: {suback:?}"
        );
        Subscriber {
            client,
            rx,
            task,
            client_id,
            last_error,
        }
    }

    /// This subscriber's MQTT client id.
    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    /// The next publish received, or `None` if none arrives within `within`.
    pub async fn recv(&mut self, within: Duration) -> Option<Received> {
        timeout(within, self.rx.recv()).await.ok().flatten()
    }

    /// The next publish received; panics if none arrives within `within`.
    pub async fn expect(&mut self, within: Duration) -> Received {
        match self.recv(within).await {
            Some(r) => r,
            None => panic!(
                "subscriber {} received nothing within {within:?} (last connection error: {:?})",
                self.client_id,
                self.last_error.lock().unwrap()
            ),
        }
    }

    /// Up to `n` publishes, returning as soon as `n` arrived or when `within` ran out (so the
    /// result may be shorter: assert on its length).
    pub async fn collect(&mut self, n: usize, within: Duration) -> Vec<Received> {
        let deadline = Instant::now() + within;
        let mut got = Vec::with_capacity(n);
        while got.len() < n {
            match tokio::time::timeout_at(deadline, self.rx.recv()).await {
                Ok(Some(r)) => got.push(r),
                _ => break,
            }
        }
        got
    }

    /// Everything already received and not yet taken, without waiting.
    pub fn drain(&mut self) -> Vec<Received> {
        let mut got = Vec::new();
        while let Ok(r) = self.rx.try_recv() {
            got.push(r);
        }
        got
    }

    /// The client, e.g. to publish from the same connection.
    pub fn client(&self) -> &AsyncClient {
        &self.client
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn subscriber_loop(
    mut eventloop: EventLoop,
    client: AsyncClient,
    topic: String,
    qos: QoS,
    tx: mpsc::UnboundedSender<Received>,
    last_error: Arc<Mutex<Option<String>>>,
) {
    let mut connacks = 0u32;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let _ = tx.send(Received {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload.to_vec(),
                    qos: p.qos,
                    retain: p.retain,
                });
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                connacks += 1;
                if connacks > 1 {
                    // Clean session: the subscription died with the old connection.
                    let _ = client.try_subscribe(topic.clone(), qos);
                }
            }
            Ok(_) => {}
            Err(e) => {
                *last_error.lock().unwrap() = Some(e.to_string());
                tokio::time::sleep(RETRY_DELAY).await; // reconnect backoff
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum ConnState {
    Connecting,
    Connected,
    Failed(String),
}

/// An MQTT publisher whose publishes resolve when the broker acknowledged them.
pub struct Publisher {
    client: AsyncClient,
    task: JoinHandle<()>,
    state: watch::Receiver<ConnState>,
}

impl Publisher {
    /// Connects and waits (10 s at most) for the broker's answer: `Ok` on an accepted CONNACK,
    /// `Err(message)` with rumqttc's error otherwise (refused CONNACK such as "Connection
    /// refused, return code: `NotAuthorized`", TLS failure, closed port, timeout). On `Err` the
    /// client is dropped.
    pub async fn connect(opts: MqttOptions) -> Result<Publisher, String> {
        let (client, eventloop) = AsyncClient::builder(opts).capacity(CAPACITY).build();
        let (state_tx, mut state) = watch::channel(ConnState::Connecting);
        let task = tokio::spawn(publisher_loop(eventloop, state_tx));
        let result = match timeout(
            Duration::from_secs(10),
            state.wait_for(|s| *s != ConnState::Connecting),
        )
        .await
        {
            Ok(Ok(s)) => s.clone(),
            Ok(Err(_)) => ConnState::Failed("event loop ended".into()),
            Err(_) => ConnState::Failed("no CONNACK within 10 s".into()),
        };
        match result {
            ConnState::Connected => Ok(Publisher {
                client,
                task,
                state,
            }),
            ConnState::Failed(e) => {
                task.abort();
                Err(e)
            }
            ConnState::Connecting => unreachable!(),
        }
    }

    /// Publishes and waits (10 s at most) for the acknowledgement the QoS requires (none for
    /// QoS 0: until written). Returns the QoS the broker acknowledged at, or an error message.
    pub async fn publish(
        &self,
        topic: &str,
        payload: impl Into<Vec<u8>>,
        qos: QoS,
        retain: bool,
    ) -> Result<QoS, String> {
        let notice = self
            .client
            .publish_tracked(
                topic.to_string(),
                payload.into(),
                PublishOptions::new(qos).retain(retain),
            )
            .await
            .map_err(|e| e.to_string())?;
        match timeout(Duration::from_secs(10), notice.wait_async()).await {
            Ok(Ok(r)) => Ok(match r {
                PublishResult::Qos0Flushed => QoS::AtMostOnce,
                PublishResult::Qos1(_) => QoS::AtLeastOnce,
                PublishResult::Qos2Completed(_) => QoS::ExactlyOnce,
            }),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no acknowledgement within 10 s".into()),
        }
    }

    /// The client.
    pub fn client(&self) -> &AsyncClient {
        &self.client
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn publisher_loop(mut eventloop: EventLoop, state: watch::Sender<ConnState>) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                state.send_replace(ConnState::Connected);
            }
            Ok(_) => {}
            Err(e) => {
                state.send_replace(ConnState::Failed(e.to_string()));
                tokio::time::sleep(RETRY_DELAY).await; // reconnect backoff
            }
        }
    }
}
