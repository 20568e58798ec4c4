//! MQTT 5 through `rumqttc-v5-next`: CONNECT until CONNACK (its reason code mapped by
//! [`reason`]), the broker's limits from CONNACK, the event loop (a server DISCONNECT's reason
//! kept for the jobs it ends), and a tracked publish with its properties and reason code.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use futures_util::FutureExt;
use rumqttc5::{
    AsyncClient, ConnectReturnCode, ConnectionError, DisconnectReasonCode, Event,
    IncomingPacketSizeLimit, NetworkOptions, Outgoing, Packet, PublishNoticeError, PublishOptions,
    PublishProperties, PublishResult, QoS, RetainForwardRule, StateError, SubscribeFilterInput,
    SubscribeReasonCode,
};

use super::health::Seen;
use super::{
    Ack, Acked, Client, ConnectionSettings, End, Opened, REQUEST_BATCH, SharedHealth,
    SharedResponses, SubAcked, closed_during_handshake, record, route, rustls_error,
    transport_options, websocket_advice,
};
use crate::job::{Message, Qos, Target, Transport};
use crate::mqtt::responses::Incoming;
use crate::mqtt::{MqttError, reason};

pub(super) async fn open(
    target: &Target,
    settings: &ConnectionSettings,
    broker: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    ended: Arc<OnceLock<End>>,
    health: SharedHealth,
    responses: SharedResponses,
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
    // What we send is bounded by the broker's Maximum Packet Size (CONNACK). What comes in is
    // bounded by our setting, announced in CONNECT as Maximum Packet Size (so the broker does
    // not send more, and a larger packet ends the connection, not our memory). rumqttc-v5 can
    // raise its own unannounced 10 KiB limit (too small for answers to requests) only by
    // announcing a limit or removing it. Announcing makes CONNECT carry a property, on which
    // amqtt 0.12 (3.1.1 only) waits for ever instead of refusing: a CONNECT left unanswered is
    // therefore probed (see `probe_when_silent`).
    let limit = u32::try_from(settings.max_incoming_packet_bytes.max(1)).unwrap_or(u32::MAX);
    options.set_incoming_packet_size_limit(IncomingPacketSizeLimit::Bytes(limit));
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

    let silent = probe_when_silent(target);
    tokio::pin!(silent);
    let mut probed = false;
    let connack = loop {
        // The poll is never cancelled: the probe runs beside it, and only its verdict "3.1.1
        // only" abandons the connection (and with it the event loop).
        let poll = eventloop.poll();
        tokio::pin!(poll);
        let polled = loop {
            tokio::select! {
                polled = &mut poll => break polled,
                answer = &mut silent, if !probed => {
                    probed = true;
                    if answers_as_3_1_1_only(&answer) {
                        return Err(MqttError::NoMqtt5 {
                            broker: broker.to_owned(),
                            reason: format!(
                                "it left an MQTT 5 CONNECT unanswered for {} s, and answered \
                                 another with MQTT 3.1.1's CONNACK \"unacceptable protocol \
                                 version\"",
                                SILENT_CONNECT.as_secs()
                            ),
                        });
                    }
                }
            }
        };
        match polled {
            Ok(Event::Incoming(Packet::ConnAck(connack))) => break connack,
            Ok(_) => {}
            Err(err) if closed_before_connack(&err) => {
                return Err(closed_early(target, broker, &err).await);
            }
            Err(err) => return Err(connect_error(broker, target.broker.transport, &err)),
        }
    };
    let properties = connack.properties.as_ref();
    let max_packet = properties.and_then(|p| p.max_packet_size);
    // Only 0 and 1 may be sent (MQTT-3.2.2-9): absent, or anything else, means QoS 2.
    let max_qos = match properties.and_then(|p| p.max_qos) {
        Some(0) => Some(Qos::AtMostOnce),
        Some(1) => Some(Qos::AtLeastOnce),
        _ => None,
    };
    tracing::debug!(
        broker,
        receive_maximum = properties.and_then(|p| p.receive_max),
        maximum_packet_size = max_packet,
        maximum_qos = max_qos.map(Qos::level),
        "MQTT 5 connection accepted"
    );

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
        max_qos,
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

/// Publishes `message` at `qos` (the job's, or lower: the broker's Maximum QoS).
pub(super) async fn publish(client: &AsyncClient, message: &Message, qos: Qos) -> Acked {
    let mut options = PublishOptions::new(qos.into()).retain(message.retain);
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

/// Subscribes to a response topic at QoS 1 with Retain Handling 2 ("do not send": a retained
/// message is never an answer) and waits for the SUBACK.
pub(super) async fn subscribe(client: &AsyncClient, topic: &str) -> SubAcked {
    let filter = SubscribeFilterInput::new(topic, QoS::AtLeastOnce)
        .retain_forward_rule(RetainForwardRule::Never);
    let Ok(notice) = client.subscribe_many_tracked([filter]).await else {
        return SubAcked::Lost;
    };
    match notice.wait_async().await {
        Ok(suback) => match suback.return_codes.first() {
            Some(SubscribeReasonCode::Success(_)) => SubAcked::Granted,
            Some(code) => SubAcked::Refused(suback_code(*code)),
            None => SubAcked::Refused(0x80),
        },
        Err(_) => SubAcked::Lost,
    }
}

/// A refusing SUBACK reason code's number (the crate keeps its own mapping private).
fn suback_code(code: SubscribeReasonCode) -> u8 {
    match code {
        SubscribeReasonCode::Success(_) => 0x00,
        SubscribeReasonCode::Failure | SubscribeReasonCode::Unspecified => 0x80,
        SubscribeReasonCode::ImplementationSpecific => 0x83,
        SubscribeReasonCode::NotAuthorized => 0x87,
        SubscribeReasonCode::TopicFilterInvalid => 0x8F,
        SubscribeReasonCode::PkidInUse => 0x91,
        SubscribeReasonCode::QuotaExceeded => 0x97,
        SubscribeReasonCode::SharedSubscriptionsNotSupported => 0x9E,
        SubscribeReasonCode::SubscriptionIdNotSupported => 0xA1,
        SubscribeReasonCode::WildcardSubscriptionsNotSupported => 0xA2,
    }
}

/// An incoming PUBLISH as the responses room sees it.
fn incoming(publish: rumqttc5::Publish) -> Incoming {
    let properties = publish.properties.unwrap_or_default();
    Incoming {
        topic: String::from_utf8_lossy(&publish.topic).into_owned(),
        payload: publish.payload,
        retain: publish.retain,
        correlation: properties.correlation_data,
        content_type: properties.content_type,
        user_properties: properties.user_properties,
    }
}

fn accepted(qos: Qos, code: u8) -> Acked {
    match reason::ack(code) {
        reason::AckVerdict::Accepted => Acked::Ack(Ack {
            qos,
            no_subscribers: false,
            lowered_to_max_qos: None,
        }),
        reason::AckVerdict::NoSubscribers => Acked::Ack(Ack {
            qos,
            no_subscribers: true,
            lowered_to_max_qos: None,
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
/// CONNACK 0x84 unsupported protocol version, or a 3.1.1 CONNACK refusing the protocol version
/// (code 1, no MQTT 5 reason code). A close without a CONNACK is not an answer: see
/// [`closed_early`].
fn speaks_no_mqtt5(err: &ConnectionError) -> bool {
    matches!(
        err,
        ConnectionError::ConnectionRefused(
            ConnectReturnCode::UnsupportedProtocolVersion
                | ConnectReturnCode::RefusedProtocolVersion,
        ) | ConnectionError::MqttState(StateError::Deserialization(
            rumqttc5::Error::InvalidConnectReturnCode(1)
        ))
    )
}

/// The connection closed before CONNACK with nothing the client could read as an answer.
fn closed_before_connack(err: &ConnectionError) -> bool {
    match err {
        ConnectionError::MqttState(StateError::ConnectionAborted) => true,
        ConnectionError::Io(io) => io.kind() == std::io::ErrorKind::UnexpectedEof,
        _ => false,
    }
}

/// How long an MQTT 5 CONNECT may go unanswered before [`probe_when_silent`] asks whether the
/// broker speaks MQTT 5 at all.
const SILENT_CONNECT: Duration = Duration::from_secs(2);

/// After [`SILENT_CONNECT`] without CONNACK, over plain TCP, the answer of a bare MQTT 5
/// CONNECT (no properties, a throwaway client-id): amqtt 0.12 answers that with 3.1.1's
/// "unacceptable protocol version" while it never answers ours, which carries Maximum Packet
/// Size. Never resolves over TLS and websockets.
async fn probe_when_silent(target: &Target) -> Vec<u8> {
    if target.broker.transport != Transport::Tcp {
        return std::future::pending().await;
    }
    tokio::time::sleep(SILENT_CONNECT).await;
    tokio::time::timeout(
        PROBE_TIMEOUT,
        probe(&target.broker.host, target.broker.port),
    )
    .await
    .unwrap_or_default()
}

/// How long the probe of [`closed_early`] waits for an answer.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// A close before CONNACK: usually transient (a broker at its connection limit or restarting,
/// a load balancer without a backend): 3, retried. But amqtt 0.12, which speaks only 3.1.1,
/// answers an MQTT 5 CONNECT with a 3.1.1 CONNACK (code 1) and closes at once, and rumqttc-v5
/// reports that as the same close. So over plain TCP the broker is asked once more, by hand,
/// with a throwaway client-id (never the job's: that could take a sibling's session over), and
/// only a 3.1.1 CONNACK refusing the protocol version or MQTT 5's 0x84 makes it "does not speak
/// MQTT 5". Over TLS and websockets it is a connect failure (3).
async fn closed_early(target: &Target, broker: &str, err: &ConnectionError) -> MqttError {
    let broker = broker.to_owned();
    if target.broker.transport == Transport::Tcp {
        let answer = tokio::time::timeout(
            PROBE_TIMEOUT,
            probe(&target.broker.host, target.broker.port),
        )
        .await
        .unwrap_or_default();
        if answers_as_3_1_1_only(&answer) {
            return MqttError::NoMqtt5 {
                broker,
                reason: "it closed the connection on an MQTT 5 CONNECT, and answered another \
                         with MQTT 3.1.1's CONNACK \"unacceptable protocol version\""
                    .into(),
            };
        }
    }
    MqttError::Connect {
        broker,
        reason: format!(
            "{} before CONNACK (a broker at its connection limit or restarting, or a load \
             balancer without a backend?)",
            describe(err)
        ),
    }
}

/// Sends a bare MQTT 5 CONNECT (no properties, a throwaway client-id) and returns the first
/// bytes of the answer (empty when the connection closed or failed first); disconnects politely.
async fn probe(host: &str, port: u16) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut socket) = tokio::net::TcpStream::connect((host, port)).await else {
        return Vec::new();
    };
    let client_id = format!("mqtt-connector-probe-{}", uuid::Uuid::new_v4().simple());
    if socket.write_all(&bare_connect(&client_id)).await.is_err() {
        return Vec::new();
    }
    let mut answer = Vec::new();
    let mut buf = [0u8; 64];
    while answer.len() < 4 {
        match socket.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    let _ = socket.write_all(&[0xE0, 0x00]).await;
    answer
}

/// An MQTT 5 CONNECT: clean start, keep-alive 10 s, no properties, no credentials.
fn bare_connect(client_id: &str) -> Vec<u8> {
    let id = client_id.as_bytes();
    let id_len = u16::try_from(id.len()).unwrap_or(u16::MAX);
    let mut variable = vec![
        0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05, 0x02, 0x00, 0x0A, 0x00,
    ];
    variable.extend_from_slice(&id_len.to_be_bytes());
    variable.extend_from_slice(&id[..usize::from(id_len)]);
    // A throwaway client-id keeps the packet under 128 bytes: one length byte.
    let mut packet = vec![0x10, u8::try_from(variable.len()).unwrap_or(0x7F)];
    packet.extend_from_slice(&variable);
    packet
}

/// Whether the first bytes of an answer to an MQTT 5 CONNECT say "not MQTT 5": a 3.1.1 CONNACK
/// (remaining length 2) with code 1, or an MQTT 5 CONNACK with reason 0x84.
fn answers_as_3_1_1_only(answer: &[u8]) -> bool {
    match answer {
        [0x20, 0x02, _, 0x01, ..] => true,
        [0x20, len, _, 0x84, ..] => *len >= 3,
        _ => false,
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
        // Enhanced authentication, which we never start; it is the broker speaking.
        _ => Seen::Incoming,
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
            "the broker closed the connection".into()
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

    #[test]
    fn the_jobs_own_packet_size_matches_the_encoders_with_every_property() {
        let all = Properties {
            message_expiry: Some(5),
            content_type: Some("application/json".into()),
            user_properties: vec![("k".into(), "v".into()), ("site".into(), "north".into())],
            response_topic: Some(Topic::parse("r/1".into()).expect("topic")),
            correlation_data: Some(bytes::Bytes::from_static(b"id-7")),
            payload_format: Some(crate::job::PayloadFormat::Utf8),
        };
        for properties in [Properties::default(), all] {
            let mut message = message(b"hello", properties);
            for qos in [Qos::AtMostOnce, Qos::AtLeastOnce, Qos::ExactlyOnce] {
                message.qos = qos;
                assert_eq!(message.packet_size(true), packet_size(&message), "{qos:?}");
            }
        }
    }

    #[test]
    fn only_a_3_1_1_refusal_or_0x84_says_the_broker_does_not_speak_mqtt_5() {
        assert!(answers_as_3_1_1_only(&[0x20, 0x02, 0x00, 0x01]));
        assert!(answers_as_3_1_1_only(&[0x20, 0x03, 0x00, 0x84, 0x00]));
        // Closed with nothing, an MQTT 5 acceptance, a 3.1.1 acceptance, other refusals.
        assert!(!answers_as_3_1_1_only(&[]));
        assert!(!answers_as_3_1_1_only(&[0x20, 0x03, 0x00, 0x00, 0x00]));
        assert!(!answers_as_3_1_1_only(&[0x20, 0x02, 0x00, 0x00]));
        assert!(!answers_as_3_1_1_only(&[0x20, 0x03, 0x00, 0x89, 0x00]));
        assert!(!answers_as_3_1_1_only(&[0x20, 0x02]));
    }

    #[test]
    fn the_probes_connect_is_a_well_formed_mqtt_5_connect() {
        let packet = bare_connect("mqtt-connector-probe-0123");
        assert_eq!(packet[0], 0x10);
        assert_eq!(usize::from(packet[1]), packet.len() - 2);
        assert_eq!(&packet[2..9], &[0x00, 0x04, b'M', b'Q', b'T', b'T', 0x05]);
        assert!(packet.ends_with(b"mqtt-connector-probe-0123"));
    }
}
