//! An MQTT 5 subscriber for tests (the `rumqttc-v5-next` crate the worker itself uses for
//! MQTT 5): it records each publish with its MQTT 5 properties, so a test can assert on what a
//! real MQTT 5 client received.
//!
//! Like [`Subscriber`](super::Subscriber): a fresh client id (`harness5-…`), the event loop in a
//! spawned task (aborted on drop), returns once the broker granted the subscription (SUBACK).

use super::unique_name;
use rumqttc5::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, PublishProperties, QoS, SubscribeReasonCode,
};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::timeout;

/// One publish received by a [`Subscriber5`].
#[derive(Clone, Debug)]
pub struct Received5 {
    pub topic: String,
    pub payload: Vec<u8>,
    pub qos: QoS,
    pub retain: bool,
    /// The MQTT 5 properties as delivered (`None`: the publish carried none).
    pub properties: Option<PublishProperties>,
}

/// An MQTT 5 subscriber on one topic filter, anonymous, on `127.0.0.1:port`.
pub struct Subscriber5 {
    rx: mpsc::UnboundedReceiver<Received5>,
    task: JoinHandle<()>,
    client: AsyncClient,
}

impl Subscriber5 {
    /// Connects, subscribes to `filter` at `qos` and returns once the broker granted it.
    /// Retained messages on the filter arrive right after, as with any subscriber.
    pub async fn start(port: u16, filter: &str, qos: QoS) -> Subscriber5 {
        Self::start_with(port, filter, qos, None).await
    }

    /// Like [`start`](Self::start), authenticated as `user` with `password`.
    pub async fn start_with(
        port: u16,
        filter: &str,
        qos: QoS,
        credentials: Option<(&str, &str)>,
    ) -> Subscriber5 {
        let mut options = MqttOptions::new(unique_name("harness5"), ("127.0.0.1", port));
        options.set_keep_alive(30);
        if let Some((user, password)) = credentials {
            options.set_credentials(user, password.to_owned());
        }
        let (client, eventloop) = AsyncClient::builder(options).capacity(1000).build();
        let notice = client
            .subscribe_tracked(filter.to_owned(), qos)
            .await
            .expect("queue subscribe");
        let (tx, rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(receive(eventloop, tx));
        let suback = timeout(Duration::from_secs(10), notice.wait_async())
            .await
            .unwrap_or_else(|_| panic!("no SUBACK for {filter:?} within 10 s"))
            .unwrap_or_else(|e| panic!("subscribe to {filter:?} failed: {e}"));
        assert!(
            suback
                .return_codes
                .iter()
                .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
            "subscription to {filter:?} refused: {suback:?}"
        );
        Subscriber5 { rx, task, client }
    }

    /// The next publish, or `None` if none arrives within `within`.
    pub async fn recv(&mut self, within: Duration) -> Option<Received5> {
        timeout(within, self.rx.recv()).await.ok().flatten()
    }

    /// The next publish; panics if none arrives within `within`.
    pub async fn expect(&mut self, within: Duration) -> Received5 {
        self.recv(within)
            .await
            .unwrap_or_else(|| panic!("the MQTT 5 subscriber received nothing within {within:?}"))
    }

    /// The client, e.g. to publish from the same connection.
    pub fn client(&self) -> &AsyncClient {
        &self.client
    }
}

impl Drop for Subscriber5 {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(mut eventloop: EventLoop, tx: mpsc::UnboundedSender<Received5>) {
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let _ = tx.send(Received5 {
                    topic: String::from_utf8_lossy(&p.topic).into_owned(),
                    payload: p.payload.to_vec(),
                    qos: p.qos,
                    retain: p.retain,
                    properties: p.properties,
                });
            }
            Ok(_) => {}
            // The tests' brokers outlive their subscribers; a lost connection ends the test's
            // wait with "received nothing", which names the problem well enough.
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
