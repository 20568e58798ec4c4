//! What a job publishes: a topic that can be published on, a QoS level, payload and retain,
//! and the MQTT 5 publish properties.

use bytes::Bytes;

use super::{JobError, invalid, quote_limited};

/// What to publish.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: Topic,
    pub payload: Bytes,
    pub qos: Qos,
    pub retain: bool,
    /// MQTT 5 publish properties; all empty for a 3.1.1 job (validation guarantees it).
    pub properties: Properties,
}

/// The MQTT 5 publish properties a job may set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Properties {
    /// Seconds the broker keeps the message for subscribers that have not received it.
    pub message_expiry: Option<u32>,
    pub content_type: Option<String>,
    /// Name-value pairs in the job's order; a name may repeat.
    pub user_properties: Vec<(String, String)>,
    pub response_topic: Option<Topic>,
    pub correlation_data: Option<Bytes>,
    pub payload_format: Option<PayloadFormat>,
}

impl Properties {
    /// No property is set (always so for an MQTT 3.1.1 job).
    pub fn is_empty(&self) -> bool {
        self.first_key_set().is_none()
    }

    /// The job key of the first property that is set, for the "needs MQTT 5" error.
    pub fn first_key_set(&self) -> Option<&'static str> {
        [
            (self.message_expiry.is_some(), "message-expiry"),
            (self.content_type.is_some(), "content-type"),
            (!self.user_properties.is_empty(), "user-properties"),
            (self.response_topic.is_some(), "response-topic"),
            (self.correlation_data.is_some(), "correlation-data"),
            (self.payload_format.is_some(), "payload-format"),
        ]
        .into_iter()
        .find_map(|(set, key)| set.then_some(key))
    }
}

/// MQTT's largest Remaining Length: no packet may carry more after its fixed header.
pub const MQTT_MAX_REMAINING_LENGTH: usize = 268_435_455;

/// The longest UTF-8 string or binary field MQTT can encode (a two-byte length prefix).
const MAX_FIELD_BYTES: usize = u16::MAX as usize;

/// Checks a value sent as an MQTT UTF-8 string: no U+0000 (MQTT-1.5.4-2; the encoder refuses it
/// inside the connection's event loop, ending the connection and every publish on it) and at
/// most 65,535 bytes. A Rust string is valid UTF-8 already.
pub fn check_mqtt_string(key: &str, value: &str) -> Result<(), JobError> {
    if value.contains('\0') {
        return Err(invalid(format!(
            "key {key:?} holds a NUL character (U+0000), which MQTT strings may not contain"
        )));
    }
    check_field_length(key, value.len())
}

/// Checks the length of a value sent as an MQTT string or binary field.
pub fn check_field_length(key: &str, len: usize) -> Result<(), JobError> {
    if len > MAX_FIELD_BYTES {
        return Err(invalid(format!(
            "key {key:?} is {len} bytes, longer than MQTT's 65,535 bytes"
        )));
    }
    Ok(())
}

impl Properties {
    /// Checks every property the way the MQTT 5 encoder and a broker would: strings without
    /// U+0000 and at most 65,535 bytes, binary data at most 65,535 bytes. The response topic
    /// is checked as a [`Topic`] when it is parsed.
    pub fn check(&self) -> Result<(), JobError> {
        if let Some(content_type) = &self.content_type {
            check_mqtt_string("content-type", content_type)?;
        }
        for (name, value) in &self.user_properties {
            check_mqtt_string("user-properties", name)
                .and_then(|()| check_mqtt_string("user-properties", value))
                .map_err(|err| match err {
                    JobError::Invalid(message) => invalid(format!(
                        "{message} (in the property named {:?})",
                        quote_limited(&name.replace('\0', "\\0"))
                    )),
                    other => other,
                })?;
        }
        if let Some(data) = &self.correlation_data {
            check_field_length("correlation-data", data.len())?;
        }
        Ok(())
    }

    /// The bytes these properties take in a PUBLISH packet, without the length in front.
    fn encoded_len(&self) -> usize {
        let string = |s: &str| 1 + 2 + s.len();
        self.payload_format.map_or(0, |_| 2)
            + self.message_expiry.map_or(0, |_| 5)
            + self.content_type.as_deref().map_or(0, string)
            + self
                .response_topic
                .as_ref()
                .map_or(0, |t| string(t.as_str()))
            + self
                .correlation_data
                .as_ref()
                .map_or(0, |d| 1 + 2 + d.len())
            + self
                .user_properties
                .iter()
                .map(|(name, value)| 1 + 2 + name.len() + 2 + value.len())
                .sum::<usize>()
    }
}

impl Message {
    /// The PUBLISH packet's Remaining Length (what follows the fixed header): topic, packet
    /// identifier from QoS 1 on, MQTT 5 properties with their length, payload.
    pub fn remaining_length(&self, mqtt5: bool) -> usize {
        let properties = if mqtt5 {
            let len = self.properties.encoded_len();
            variable_int_len(len) + len
        } else {
            0
        };
        let packet_id = if self.qos == Qos::AtMostOnce { 0 } else { 2 };
        2 + self.topic.as_str().len() + packet_id + properties + self.payload.len()
    }

    /// This message with `secs` as its MQTT 5 Message Expiry Interval: a job whose validity
    /// ends carries the rest of it to the broker (see [`crate::expiry::message_expiry`]).
    pub fn with_message_expiry(&self, secs: u32) -> Message {
        let mut message = self.clone();
        message.properties.message_expiry = Some(secs);
        message
    }

    /// Checks the PUBLISH packet against MQTT's own limit (the encoder refuses a larger one
    /// inside the event loop).
    pub fn check_packet_size(&self, mqtt5: bool) -> Result<(), JobError> {
        let remaining = self.remaining_length(mqtt5);
        if remaining > MQTT_MAX_REMAINING_LENGTH {
            return Err(invalid(format!(
                "the message makes an MQTT packet of {remaining} bytes after its header, over \
                 MQTT's limit of {MQTT_MAX_REMAINING_LENGTH} bytes (key \"content\" is {} bytes)",
                self.payload.len()
            )));
        }
        Ok(())
    }

    /// The whole PUBLISH packet's size, fixed header included (what a broker's Maximum Packet
    /// Size counts).
    pub fn packet_size(&self, mqtt5: bool) -> usize {
        let remaining = self.remaining_length(mqtt5);
        1 + variable_int_len(remaining) + remaining
    }
}

/// Bytes of MQTT's variable byte integer for `value` (values past the largest count as 4).
fn variable_int_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// The payload format indicator: what the payload is, as the subscriber is told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PayloadFormat {
    /// Unspecified bytes (indicator 0).
    Bytes,
    /// UTF-8 text (indicator 1); the payload is checked to be valid UTF-8.
    Utf8,
}

impl PayloadFormat {
    pub fn parse(value: &str) -> Result<PayloadFormat, JobError> {
        match value {
            "bytes" => Ok(PayloadFormat::Bytes),
            "utf-8" => Ok(PayloadFormat::Utf8),
            other => Err(invalid(format!(
                "key \"payload-format\": {:?} is not \"utf-8\" or \"bytes\"",
                quote_limited(other)
            ))),
        }
    }

    /// The indicator byte MQTT 5 sends.
    pub fn indicator(self) -> u8 {
        match self {
            PayloadFormat::Bytes => 0,
            PayloadFormat::Utf8 => 1,
        }
    }
}

/// An MQTT QoS level; only 0, 1 and 2 exist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Qos {
    AtMostOnce = 0,
    AtLeastOnce = 1,
    ExactlyOnce = 2,
}

impl Qos {
    pub fn parse(value: u8) -> Result<Qos, JobError> {
        match value {
            0 => Ok(Qos::AtMostOnce),
            1 => Ok(Qos::AtLeastOnce),
            2 => Ok(Qos::ExactlyOnce),
            other => Err(invalid(format!("key \"qos\": {other} is not 0, 1 or 2"))),
        }
    }

    pub fn level(self) -> u8 {
        self as u8
    }
}

impl From<Qos> for rumqttc::QoS {
    fn from(qos: Qos) -> Self {
        match qos {
            Qos::AtMostOnce => rumqttc::QoS::AtMostOnce,
            Qos::AtLeastOnce => rumqttc::QoS::AtLeastOnce,
            Qos::ExactlyOnce => rumqttc::QoS::ExactlyOnce,
        }
    }
}

impl From<rumqttc::QoS> for Qos {
    fn from(qos: rumqttc::QoS) -> Self {
        match qos {
            rumqttc::QoS::AtMostOnce => Qos::AtMostOnce,
            rumqttc::QoS::AtLeastOnce => Qos::AtLeastOnce,
            rumqttc::QoS::ExactlyOnce => Qos::ExactlyOnce,
        }
    }
}

/// A topic a message can be published on: not empty, no wildcard, no NUL, at most 65,535 bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topic(String);

impl Topic {
    pub fn parse(topic: String) -> Result<Topic, JobError> {
        Self::parse_key("topic", topic)
    }

    /// Parses the topic a job gives under `key` (`topic`, `response-topic`).
    pub fn parse_key(key: &str, topic: String) -> Result<Topic, JobError> {
        if topic.is_empty() {
            return Err(invalid(format!("key {key:?} is empty")));
        }
        if topic.contains(['+', '#']) {
            return Err(invalid(format!(
                "key {key:?}: {:?} holds a wildcard (+ or #); name a concrete topic",
                quote_limited(&topic)
            )));
        }
        check_mqtt_string(key, &topic)?;
        Ok(Topic(topic))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload_len: usize, qos: Qos, properties: Properties) -> Message {
        Message {
            topic: Topic::parse("a/b".into()).expect("topic"),
            // Zeroed pages are not touched: a 256 MiB payload costs nothing here.
            payload: Bytes::from(vec![0; payload_len]),
            qos,
            retain: false,
            properties,
        }
    }

    #[test]
    fn a_packet_over_mqtts_268435455_bytes_is_refused_and_one_at_the_limit_is_not() {
        // Topic (2 + 3) and packet identifier (2) leave this much for the payload.
        let fits = MQTT_MAX_REMAINING_LENGTH - 5 - 2;
        assert!(
            message(fits, Qos::AtLeastOnce, Properties::default())
                .check_packet_size(false)
                .is_ok()
        );
        let err = message(fits + 1, Qos::AtLeastOnce, Properties::default())
            .check_packet_size(false)
            .expect_err("over the limit");
        assert!(err.to_string().contains("268435455"), "{err}");
        // QoS 0 has no packet identifier; MQTT 5 adds at least the properties' length byte.
        assert!(
            message(fits + 2, Qos::AtMostOnce, Properties::default())
                .check_packet_size(false)
                .is_ok()
        );
        assert!(
            message(fits + 2, Qos::AtMostOnce, Properties::default())
                .check_packet_size(true)
                .is_err()
        );
    }

    #[test]
    fn a_message_expiry_set_for_validity_replaces_the_jobs_and_keeps_the_rest() {
        let properties = Properties {
            message_expiry: Some(300),
            content_type: Some("text/plain".into()),
            ..Properties::default()
        };
        let job = message(3, Qos::AtLeastOnce, properties);
        let expiring = job.with_message_expiry(42);
        assert_eq!(expiring.properties.message_expiry, Some(42));
        assert_eq!(
            expiring.properties.content_type.as_deref(),
            Some("text/plain")
        );
        assert_eq!(expiring.payload, job.payload);
        assert_eq!(job.properties.message_expiry, Some(300));
    }

    #[test]
    fn a_user_property_name_with_nul_is_named_without_the_raw_nul() {
        let properties = Properties {
            user_properties: vec![("a\0b".into(), "v".into())],
            ..Properties::default()
        };
        let err = properties.check().expect_err("NUL");
        let text = err.to_string();
        assert!(
            text.contains("user-properties") && !text.contains('\0'),
            "{text}"
        );
    }
}
