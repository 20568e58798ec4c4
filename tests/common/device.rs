//! A device that answers commands: a real MQTT 5 client (rumqttc-v5) subscribed to a command
//! topic, answering each command on the Response Topic property (or, for a 3.1.1 worker, on the
//! topic the command names under `reply`), copying the Correlation Data, from inside its event
//! loop (its "message callback") unless the command asks for a delay. Used by the `request`
//! tests of the worker, the CLI, the Rust client and the examples.

use super::unique_name;
use rumqttc5::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, PublishOptions, PublishProperties, QoS,
    SubscribeReasonCode,
};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::task::JoinHandle;

/// A device listening on one command topic.
pub struct Device {
    commands: Arc<AtomicUsize>,
    pub client: AsyncClient,
    task: JoinHandle<()>,
}

impl Device {
    /// Connects, subscribes to `commands` and returns once the broker granted it.
    pub async fn start(port: u16, commands: &str) -> Device {
        let mut options = MqttOptions::new(unique_name("device"), ("127.0.0.1", port));
        options.set_keep_alive(30);
        let (client, eventloop) = AsyncClient::builder(options).capacity(1000).build();
        let notice = client
            .subscribe_tracked(commands.to_owned(), QoS::AtLeastOnce)
            .await
            .expect("queue subscribe");
        let count = Arc::new(AtomicUsize::new(0));
        let task = tokio::spawn(serve(eventloop, client.clone(), Arc::clone(&count)));
        let suback = tokio::time::timeout(Duration::from_secs(10), notice.wait_async())
            .await
            .expect("SUBACK in time")
            .expect("subscribed");
        assert!(matches!(
            suback.return_codes.first(),
            Some(SubscribeReasonCode::Success(_))
        ));
        Device {
            commands: count,
            client,
            task,
        }
    }

    /// Commands received so far.
    pub fn received(&self) -> usize {
        self.commands.load(Ordering::SeqCst)
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The device's event loop. A command is JSON: `say` (the answer, default "ok"), `binary`
/// (answer bytes that are not UTF-8), `size` (an answer of that many bytes), `delay-ms`,
/// `wrong-first` (first an answer with other Correlation Data), `silent` (no answer), `reply`
/// (the topic to answer on when the command has no Response Topic: MQTT 3.1.1).
async fn serve(mut eventloop: EventLoop, client: AsyncClient, count: Arc<AtomicUsize>) {
    loop {
        let publish = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(publish))) => publish,
            Ok(_) => continue,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        count.fetch_add(1, Ordering::SeqCst);
        let command: serde_json::Value =
            serde_json::from_slice(&publish.payload).unwrap_or_default();
        let properties = publish.properties.unwrap_or_default();
        let Some(reply_to) = properties
            .response_topic
            .clone()
            .or_else(|| command["reply"].as_str().map(str::to_owned))
        else {
            continue;
        };
        if command["silent"].as_bool() == Some(true) {
            continue;
        }
        let payload: Vec<u8> = if command["binary"].as_bool() == Some(true) {
            vec![0xff, 0x00, 0x80, 0xfe]
        } else if let Some(size) = command["size"].as_u64() {
            vec![b'x'; usize::try_from(size).expect("size")]
        } else {
            command["say"].as_str().unwrap_or("ok").as_bytes().to_vec()
        };
        let answer = |correlation: Option<bytes::Bytes>| {
            PublishOptions::new(QoS::AtLeastOnce).properties(PublishProperties {
                correlation_data: correlation,
                content_type: Some("text/plain".into()),
                user_properties: vec![
                    ("device".into(), "d1".into()),
                    ("k".into(), "1".into()),
                    ("k".into(), "2".into()),
                ],
                ..PublishProperties::default()
            })
        };
        if command["wrong-first"].as_bool() == Some(true) {
            let wrong = Some(bytes::Bytes::from_static(b"not-yours"));
            let _ = client.try_publish(reply_to.clone(), b"wrong".to_vec(), answer(wrong));
        }
        let options = answer(properties.correlation_data);
        match command["delay-ms"].as_u64() {
            // Answered right here, inside the message callback.
            None | Some(0) => {
                let _ = client.try_publish(reply_to, payload, options);
            }
            Some(ms) => {
                let client = client.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                    let _ = client.publish(reply_to, payload, options).await;
                });
            }
        }
    }
}
