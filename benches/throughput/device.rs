//! A device for the `request` scenario: an MQTT 5 client subscribed to the commands that
//! answers each one at once, inside its event loop, on the command's Response Topic with its
//! Correlation Data copied (what `"action": "request"` jobs wait for).

use std::time::Duration;

use rumqttc5::{
    AsyncClient, Event, EventLoop, MqttOptions, Packet, PublishOptions, PublishProperties, QoS,
};
use tokio::task::JoinHandle;

/// Answers until dropped.
pub struct Device {
    task: JoinHandle<()>,
}

impl Device {
    /// Connects to `port`, subscribes to `commands` and returns once the broker granted it.
    pub async fn start(port: u16, commands: String) -> Device {
        let mut options = MqttOptions::new(
            format!("bench-device-{}", uuid::Uuid::new_v4().simple()),
            ("127.0.0.1", port),
        );
        options.set_keep_alive(30);
        let (client, eventloop) = AsyncClient::builder(options).capacity(10_000).build();
        let granted = client
            .subscribe_tracked(commands, QoS::AtLeastOnce)
            .await
            .expect("device: queue the subscription");
        let task = tokio::spawn(serve(eventloop, client));
        tokio::time::timeout(Duration::from_secs(10), granted.wait_async())
            .await
            .expect("device: SUBACK in time")
            .expect("device: subscribed");
        Device { task }
    }
}

impl Drop for Device {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve(mut eventloop: EventLoop, client: AsyncClient) {
    loop {
        let publish = match eventloop.poll().await {
            Ok(Event::Incoming(Packet::Publish(publish))) => publish,
            Ok(_) => continue,
            Err(_) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let properties = publish.properties.unwrap_or_default();
        let Some(reply_to) = properties.response_topic else {
            continue;
        };
        let options = PublishOptions::new(QoS::AtLeastOnce).properties(PublishProperties {
            correlation_data: properties.correlation_data,
            ..PublishProperties::default()
        });
        // The command's content is the answer: the reply shows it came back.
        let _ = client
            .publish(reply_to, publish.payload.to_vec(), options)
            .await;
    }
}
