//! MQTT 3.1.1 through `rumqttc-v4-next`: CONNECT until CONNACK, the event loop, and a tracked
//! publish (3.1.1 acknowledgements carry no reason code).

use std::sync::{Arc, OnceLock};

use futures_util::FutureExt;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, NetworkOptions, Outgoing, Packet,
    PublishOptions, QoS, SubscribeReasonCode,
};

use super::health::Seen;
use super::{
    Ack, Acked, Client, ConnectionSettings, End, Opened, REQUEST_BATCH, SharedHealth,
    SharedResponses, SubAcked, closed_during_handshake, record, route, rustls_error,
    transport_options, websocket_advice,
};
use crate::job::{Message, Target, Transport};
use crate::mqtt::MqttError;
use crate::mqtt::responses::Incoming;

pub(super) async fn open(
    target: &Target,
    settings: &ConnectionSettings,
    broker: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    ended: Arc<OnceLock<End>>,
    health: SharedHealth,
    responses: SharedResponses,
) -> Result<Opened, MqttError> {
    let mut options: rumqttc::MqttOptions =
        transport_options!(rumqttc, target, settings, broker, tls)?;
    options
        .set_keep_alive(u16::try_from(settings.keep_alive.as_secs()).unwrap_or(u16::MAX))
        .set_clean_session(true)
        .set_inflight(settings.inflight.max(1));
    // A broker sends us acknowledgements and answers to requests only: what we accept is
    // bounded (by `--max-response-bytes` plus headers) far below what we may send.
    options.set_max_packet_size(
        settings.max_incoming_packet_bytes.max(1),
        settings.max_packet_bytes,
    );
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
                broker: broker.to_owned(),
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
            Err(err) => return Err(connect_error(broker, target.broker.transport, &err)),
        }
    }

    let run = async move {
        // The only place this event loop is polled: poll() is never raced against anything.
        let end = loop {
            match eventloop.poll().await {
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    record(&health, Seen::Incoming);
                    route(&responses, incoming(publish));
                }
                Ok(event) => record(&health, seen(&event)),
                Err(ConnectionError::RequestsDone) => break End::Closed,
                Err(err) if ended.get().is_some() => {
                    tracing::debug!(error = %err, "MQTT connection closed");
                    break End::Closed;
                }
                Err(err) => break End::Lost(describe(&err)),
            }
        };
        // Why it ended is recorded first: dropping the event loop then fails every publish
        // still awaiting its acknowledgement, and each reads the reason.
        let _ = ended.set(end);
        drop(eventloop);
    };
    Ok(Opened {
        client: Client::V4(client),
        max_packet: None,
        max_qos: None,
        run: run.boxed(),
    })
}

pub(super) async fn publish(client: &AsyncClient, message: &Message) -> Acked {
    let options = PublishOptions::new(message.qos.into()).retain(message.retain);
    let Ok(notice) = client
        .publish_tracked(message.topic.as_str(), message.payload.clone(), options)
        .await
    else {
        return Acked::Lost;
    };
    match notice.wait_async().await {
        Ok(done) => Acked::Ack(Ack {
            qos: done.qos().into(),
            no_subscribers: false,
            lowered_to_max_qos: None,
        }),
        Err(_) => Acked::Lost,
    }
}

/// Subscribes to a response topic at QoS 1 and waits for the SUBACK (3.1.1 has one refusal
/// code, 0x80).
pub(super) async fn subscribe(client: &AsyncClient, topic: &str) -> SubAcked {
    let Ok(notice) = client.subscribe_tracked(topic, QoS::AtLeastOnce).await else {
        return SubAcked::Lost;
    };
    match notice.wait_async().await {
        Ok(suback) => match suback.return_codes.first() {
            Some(SubscribeReasonCode::Success(_)) => SubAcked::Granted,
            _ => SubAcked::Refused(0x80),
        },
        Err(_) => SubAcked::Lost,
    }
}

/// An incoming PUBLISH as the responses room sees it (3.1.1 has no properties).
fn incoming(publish: rumqttc::Publish) -> Incoming {
    Incoming {
        topic: String::from_utf8_lossy(&publish.topic).into_owned(),
        payload: publish.payload,
        retain: publish.retain,
        correlation: None,
        content_type: None,
        user_properties: Vec::new(),
    }
}

/// What an event means for the connection's health.
fn seen(event: &Event) -> Seen {
    match event {
        Event::Incoming(
            Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_) | Packet::PingResp,
        ) => Seen::Answer,
        Event::Incoming(_) => Seen::Incoming,
        // Packet identifier 0: QoS 0, which nobody answers.
        Event::Outgoing(Outgoing::Publish(pkid)) if *pkid != 0 => Seen::Owed,
        Event::Outgoing(Outgoing::PubRel(_) | Outgoing::PingReq) => Seen::Owed,
        Event::Outgoing(_) => Seen::Outgoing,
    }
}

/// Maps a failure before CONNACK to the contract's codes.
fn connect_error(broker: &str, transport: Transport, err: &ConnectionError) -> MqttError {
    let broker = broker.to_owned();
    let reason = describe(err);
    match err {
        ConnectionError::ConnectionRefused(ConnectReturnCode::ServiceUnavailable) => {
            MqttError::Connect { broker, reason }
        }
        ConnectionError::ConnectionRefused(_) => MqttError::Refused { broker, reason },
        ConnectionError::Tls(_) if rustls_error(err).is_none() => MqttError::Tls {
            broker,
            reason: closed_during_handshake(&reason, transport.is_websocket()),
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
            websocket_advice(err)
        }
        _ => match rustls_error(err) {
            Some(tls) => format!("TLS: {tls}"),
            None => err.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use rumqttc::{AsyncClient, Broker, MqttOptions, PublishOptions, QoS};

    /// The crate fact behind `until_gone`: the request channel outlives the event loop, so a
    /// publish queued after the loop's last read of it is never failed by the client.
    #[tokio::test]
    async fn a_publish_queued_just_before_the_event_loop_is_dropped_is_never_answered() {
        let options = MqttOptions::new("c", Broker::tcp("127.0.0.1".to_owned(), 1));
        let (client, eventloop) = AsyncClient::builder(options).try_build().expect("client");
        let notice = client
            .publish_tracked("t", "x", PublishOptions::new(QoS::AtLeastOnce))
            .await
            .expect("queued");
        drop(eventloop);
        let waited = tokio::time::timeout(Duration::from_millis(300), notice.wait_async()).await;
        assert!(waited.is_err(), "the client failed the publish: {waited:?}");
        drop(client);
    }
}
