//! What a job publishes: a topic that can be published on, a QoS level, payload and retain.

use bytes::Bytes;

use super::{JobError, invalid, quote_limited};

/// What to publish.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: Topic,
    pub payload: Bytes,
    pub qos: Qos,
    pub retain: bool,
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
        if topic.is_empty() {
            return Err(invalid("key \"topic\" is empty"));
        }
        if topic.contains(['+', '#']) {
            return Err(invalid(format!(
                "key \"topic\": {:?} holds a wildcard (+ or #); publish on a concrete topic",
                quote_limited(&topic)
            )));
        }
        if topic.contains('\0') {
            return Err(invalid("key \"topic\" holds a NUL character"));
        }
        if topic.len() > usize::from(u16::MAX) {
            return Err(invalid("key \"topic\" is longer than MQTT's 65,535 bytes"));
        }
        Ok(Topic(topic))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}
