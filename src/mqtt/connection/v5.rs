//! MQTT 5 through `rumqttc-v5-next`: CONNECT until CONNACK (its reason code mapped by
//! [`reason`]), the broker's limits from CONNACK, the event loop (a server DISCONNECT's reason
//! kept for the jobs it ends), and a tracked publish with its properties and reason code.

use std::sync::{Arc, OnceLock};

use futures_util::FutureExt;
use rumqttc5::{
    AsyncClient, ConnectReturnCode, ConnectionError, DisconnectReasonCode, Event, NetworkOptions,
    Packet, PublishNoticeError, PublishOptions, PublishProperties, PublishResult, StateError,
};

use super::{
    Ack, Acked, Client, ConnectionSettings, End, Opened, REQUEST_BATCH, closed_during_handshake,
    rustls_error, transport_options, websocket_advice,
};
use crate::job::{Message, Qos, Target, Transport};
use crate::mqtt::{MqttError, reason};

pub(super) async fn open(
    target: &Target,
    settings: &ConnectionSettings,
    broker: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    ended: Arc<OnceLock<End>>,
) -> Result<Opened, MqttError> {
    let mut options: rumqttc5::MqttOptions =
        transport_options!(rumqttc5, target, settings, broker, tls)?;
    options
        .set_keep_alive(u16::try_from(settings.keep_alive.as_secs()).unwrap_or(u16::MAX))
        .set_clean_start(true)
        // The broker's Receive Maximum (CONNACK) lowers this further: the client never has
        // more publishes in flight than the broker allows.
        .set_outgoing_inflight_upper_limit(settings.inflight.max(1))
        .set_request_channel_capacity(usize::from(settings.inflight.max(1)) * 2)
        .set_max_request_batch(REQUEST_BATCH);
    // CONNECT carries no properties: a 3.1.1-only broker then parses it far enough to answer
    // "unacceptable protocol version" (amqtt waits for ever on a CONNECT with properties).
    // We never subscribe, so nothing large comes in; what we send is bounded by the broker's
    // Maximum Packet Size (CONNACK).
    if let Some(username) = &target.username {
        let password = target
            .password
            .as_ref()
            .map(|p| p.expose().to_owned())
            .unwrap_or_default();
        options.set_credentials(username.clone(), password);
    }
    let mut network = NetworkOptions::new();
    network.set_tcp_nodelay(true);
    // The job's own timeout bounds every connect; this is only a backstop.
    network.set_connection_timeout(60);
    options.set_network_options(network);
    let (client, mut eventloop) =
        AsyncClient::builder(options)
            .try_build()
            .map_err(|err| MqttError::BadOptions {
                broker: broker.to_owned(),
                reason: err.to_string(),
            })?;

    let connack = loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(connack))) => break connack,
            Ok(_) => {}
            Err(err) => return Err(connect_error(broker, target.broker.transport, &err)),
        }
    };
    let properties = connack.properties.as_ref();
    let max_packet = properties.and_then(|p| p.max_packet_size);
    tracing::debug!(
        broker,
        receive_maximum = properties.and_then(|p| p.receive_max),
        maximum_packet_size = max_packet,
        "MQTT 5 connection accepted"
    );

    let run = async move {
        // The only place this event loop is polled: poll() is never raced against anything.
        let end = loop {
            match eventloop.poll().await {
                Ok(_) => {}
                Err(ConnectionError::RequestsDone) => break End::Closed,
                Err(err) if ended.get().is_some() => {
                    tracing::debug!(error = %err, "MQTT connection closed");
                    break End::Closed;
                }
                Err(
                    err @ ConnectionError::MqttState(StateError::ServerDisconnect {
                        reason_code: DisconnectReasonCode::SessionTakenOver,
                        ..
                    }),
                ) => break End::TakenOver(describe(&err)),
                Err(err) => break End::Lost(describe(&err)),
            }
        };
        // Why it ended is recorded first: dropping the event loop then fails every publish
        // still awaiting its acknowledgement, and each reads the reason.
        let _ = ended.set(end);
        drop(eventloop);
    };
    Ok(Opened {
        client: Client::V5(client),
        max_packet,
        run: run.boxed(),
    })
}

/// The MQTT 5 properties of a message; `None` when it sets none.
fn properties(message: &Message) -> Option<PublishProperties> {
    let p = &message.properties;
    if p.is_empty() {
        return None;
    }
    Some(PublishProperties {
        payload_format_indicator: p.payload_format.map(|format| format.indicator()),
        message_expiry_interval: p.message_expiry,
        response_topic: p.response_topic.as_ref().map(|t| t.as_str().to_owned()),
        correlation_data: p.correlation_data.clone(),
        user_properties: p.user_properties.clone(),
        content_type: p.content_type.clone(),
        ..PublishProperties::default()
    })
}

/// The size of the PUBLISH packet this message makes, as the broker's Maximum Packet Size
/// counts it (fixed header included).
pub(super) fn packet_size(message: &Message) -> usize {
    let mut publish = rumqttc5::Publish::new(
        message.topic.as_str(),
        message.qos.into(),
        message.payload.clone(),
        properties(message),
    );
    // A packet identifier is present from QoS 1 on; its value does not change the size.
    publish.pkid = 1;
    publish.size()
}

pub(super) async fn publish(client: &AsyncClient, message: &Message) -> Acked {
    let mut options = PublishOptions::new(message.qos.into()).retain(message.retain);
    if let Some(properties) = properties(message) {
        options = options.properties(properties);
    }
    let Ok(notice) = client
        .publish_tracked(message.topic.as_str(), message.payload.clone(), options)
        .await
    else {
        return Acked::Lost;
    };
    match notice.wait_async().await {
        Ok(PublishResult::Qos0Flushed) => accepted(Qos::AtMostOnce, 0x00),
        Ok(PublishResult::Qos1(puback)) => accepted(Qos::AtLeastOnce, puback.reason as u8),
        Ok(PublishResult::Qos2Completed(pubcomp)) => {
            accepted(Qos::ExactlyOnce, pubcomp.reason as u8)
        }
        Ok(PublishResult::Qos2PubRecRejected(pubrec)) => Acked::Refused(pubrec.reason as u8),
        // The broker said in CONNACK that it keeps no retained messages.
        Err(PublishNoticeError::RetainNotSupported) => Acked::Refused(0x9A),
        Err(_) => Acked::Lost,
    }
}

fn accepted(qos: Qos, code: u8) -> Acked {
    match reason::ack(code) {
        reason::AckVerdict::Accepted => Acked::Ack(Ack {
            qos,
            no_subscribers: false,
        }),
        reason::AckVerdict::NoSubscribers => Acked::Ack(Ack {
            qos,
            no_subscribers: true,
        }),
        reason::AckVerdict::RefusedForNow | reason::AckVerdict::Refused => Acked::Refused(code),
    }
}

/// The CONNACK reason code's number (the crate's enum holds 3.1.1's codes too).
fn connack_code(code: ConnectReturnCode) -> u8 {
    match code {
        ConnectReturnCode::Success => 0x00,
        ConnectReturnCode::UnspecifiedError => 0x80,
        ConnectReturnCode::MalformedPacket => 0x81,
        ConnectReturnCode::ProtocolError => 0x82,
        ConnectReturnCode::ImplementationSpecificError => 0x83,
        ConnectReturnCode::UnsupportedProtocolVersion
        | ConnectReturnCode::RefusedProtocolVersion => 0x84,
        ConnectReturnCode::ClientIdentifierNotValid | ConnectReturnCode::BadClientId => 0x85,
        ConnectReturnCode::BadUserNamePassword => 0x86,
        ConnectReturnCode::NotAuthorized => 0x87,
        ConnectReturnCode::ServerUnavailable | ConnectReturnCode::ServiceUnavailable => 0x88,
        ConnectReturnCode::ServerBusy => 0x89,
        ConnectReturnCode::Banned => 0x8A,
        ConnectReturnCode::BadAuthenticationMethod => 0x8C,
        ConnectReturnCode::TopicNameInvalid => 0x90,
        ConnectReturnCode::PacketTooLarge => 0x95,
        ConnectReturnCode::QuotaExceeded => 0x97,
        ConnectReturnCode::PayloadFormatInvalid => 0x99,
        ConnectReturnCode::RetainNotSupported => 0x9A,
        ConnectReturnCode::QoSNotSupported => 0x9B,
        ConnectReturnCode::UseAnotherServer => 0x9C,
        ConnectReturnCode::ServerMoved => 0x9D,
        ConnectReturnCode::ConnectionRateExceeded => 0x9F,
    }
}

/// Whether the broker answered an MQTT 5 CONNECT the way a 3.1.1-only broker does: MQTT 5's
/// CONNACK 0x84 unsupported protocol version, a 3.1.1 CONNACK refusing the protocol version
/// (code 1, no MQTT 5 reason code), or closing the connection without a CONNACK. amqtt 0.12
/// sends the 3.1.1 CONNACK and closes at once: two bytes too short for an MQTT 5 CONNACK, so
/// the client sees the close.
fn speaks_no_mqtt5(err: &ConnectionError) -> bool {
    match err {
        ConnectionError::ConnectionRefused(
            ConnectReturnCode::UnsupportedProtocolVersion
            | ConnectReturnCode::RefusedProtocolVersion,
        )
        | ConnectionError::MqttState(
            StateError::ConnectionAborted
            | StateError::Deserialization(rumqttc5::Error::InvalidConnectReturnCode(1)),
        ) => true,
        ConnectionError::Io(io) => io.kind() == std::io::ErrorKind::UnexpectedEof,
        _ => false,
    }
}

/// Maps a failure before CONNACK to the contract's codes.
fn connect_error(broker: &str, transport: Transport, err: &ConnectionError) -> MqttError {
    let broker = broker.to_owned();
    let reason = describe(err);
    if speaks_no_mqtt5(err) {
        return MqttError::NoMqtt5 { broker, reason };
    }
    match err {
        ConnectionError::ConnectionRefused(code) => match reason::connack(connack_code(*code)) {
            crate::outcome::ExitCode::ConnectFailed => MqttError::Connect { broker, reason },
            _ => MqttError::Refused { broker, reason },
        },
        ConnectionError::Tls(_) if rustls_error(err).is_none() => MqttError::Tls {
            broker,
            reason: closed_during_handshake(&reason, transport.is_websocket()),
        },
        ConnectionError::Tls(_) => MqttError::Tls { broker, reason },
        ConnectionError::Timeout(_) => MqttError::NoAnswer { broker, reason },
        _ if rustls_error(err).is_some() => MqttError::Tls { broker, reason },
        _ => MqttError::Connect { broker, reason },
    }
}

/// Words for a connection error, with MQTT 5 reason codes by name and number; never contains
/// credentials (rumqttc errors do not carry them).
fn describe(err: &ConnectionError) -> String {
    match err {
        ConnectionError::ConnectionRefused(code) => {
            format!("CONNACK {}", reason::describe(connack_code(*code)))
        }
        ConnectionError::MqttState(StateError::ServerDisconnect {
            reason_code,
            reason_string,
        }) => {
            let mut words = format!(
                "the broker sent DISCONNECT: {}",
                reason::describe(*reason_code as u8)
            );
            if let Some(text) = reason_string {
                words.push_str(&format!(" ({text})"));
            }
            words
        }
        ConnectionError::MqttState(StateError::Deserialization(
            rumqttc5::Error::InvalidConnectReturnCode(1),
        )) => "it answered CONNACK code 1, MQTT 3.1.1's \"unacceptable protocol version\"".into(),
        ConnectionError::MqttState(StateError::ConnectionAborted) => {
            "it closed the connection on an MQTT 5 CONNECT without an MQTT 5 CONNACK".into()
        }
        ConnectionError::Timeout(_) => "no CONNACK within the connection timeout".into(),
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
    use super::*;
    use crate::job::{Properties, Topic};

    fn message(payload: &'static [u8], properties: Properties) -> Message {
        Message {
            topic: Topic::parse("a/b".into()).expect("topic"),
            payload: bytes::Bytes::from_static(payload),
            qos: Qos::AtLeastOnce,
            retain: false,
            properties,
        }
    }

    #[test]
    fn packet_size_counts_header_topic_packet_id_properties_and_payload() {
        // 1 type byte + 1 length byte + (2 + 3 topic) + 2 packet id + 1 property length + 5 payload
        assert_eq!(packet_size(&message(b"hello", Properties::default())), 15);
        let with_expiry = Properties {
            message_expiry: Some(5),
            ..Properties::default()
        };
        // + 5 bytes: the property's identifier and its four-byte value
        assert_eq!(packet_size(&message(b"hello", with_expiry)), 20);
    }

    #[test]
    fn a_message_without_properties_sends_none() {
        assert!(properties(&message(b"x", Properties::default())).is_none());
    }
}
