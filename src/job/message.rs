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
        if topic.contains('\0') {
            return Err(invalid(format!("key {key:?} holds a NUL character")));
        }
        if topic.len() > usize::from(u16::MAX) {
            return Err(invalid(format!(
                "key {key:?} is longer than MQTT's 65,535 bytes"
            )));
        }
        Ok(Topic(topic))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}
