//! The MQTT side: TLS material ([`tls`]), one connection that owns its event loop and reports
//! each publish's acknowledgement, over MQTT 3.1.1 or 5 ([`connection`]), the pool that reuses
//! connections across jobs ([`pool`]), and what MQTT 5 reason codes mean for a job ([`reason`]).

pub mod connection;
pub mod pool;
pub mod reason;
pub mod responses;
pub mod tls;

use crate::outcome::ExitCode;

/// Why a publish attempt failed, with the exit-code it maps to and whether retrying can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MqttError {
    /// No connection: name not resolved, refused, unreachable, or lost before CONNACK.
    #[error("could not connect to {broker}: {reason}")]
    Connect { broker: String, reason: String },
    /// The broker answered CONNECT with a refusal.
    #[error("{broker} refused the connection: {reason}")]
    Refused { broker: String, reason: String },
    /// Certificates, keys or the handshake.
    #[error("TLS with {broker} failed: {reason}")]
    Tls { broker: String, reason: String },
    /// The broker stopped answering (no CONNACK or no acknowledgement in time).
    #[error("{broker} did not answer: {reason}")]
    NoAnswer { broker: String, reason: String },
    /// Connected, but the connection ended before the broker acknowledged the publish.
    #[error(
        "the connection to {broker} ended before the broker acknowledged the publish: {reason}"
    )]
    PublishLost { broker: String, reason: String },
    /// MQTT 5: the broker answered the publish with a PUBACK/PUBREC reason code of 0x80 or more.
    #[error("{broker} refused the message: {}", reason::describe(*.code))]
    MessageRefused { broker: String, code: u8 },
    /// MQTT 5: the message is larger than the broker's Maximum Packet Size; nothing was sent.
    #[error(
        "the message is a {size}-byte MQTT packet, over the {max}-byte Maximum Packet Size {broker} \
         accepts; nothing was sent"
    )]
    TooLarge {
        broker: String,
        size: usize,
        max: u32,
    },
    /// The message is larger than this worker sends (its content limit plus room for the topic
    /// and headers); nothing was sent.
    #[error(
        "the message is a {size}-byte MQTT packet, over this worker's limit of {max} bytes \
         (--max-content-bytes plus 64 KiB for topic and headers); nothing was sent"
    )]
    OverWorkerLimit { size: usize, max: usize },
    /// Asked for MQTT 5, the broker answered as a 3.1.1-only broker does.
    #[error(
        "{broker} does not speak MQTT 5 ({reason}); use \"mqtt-version\": \"3.1.1\" for this broker"
    )]
    NoMqtt5 { broker: String, reason: String },
    /// Another client (usually a sibling worker with the same options) holds this client-id:
    /// this worker stopped competing for it for a while.
    #[error(
        "client-id {client_id} on {broker} is held by another connection (the broker said the \
         session was taken over, or a working connection was taken from us twice in a row); \
         this worker stops competing for it for {rest_ms} ms"
    )]
    HeldElsewhere {
        broker: String,
        client_id: String,
        rest_ms: u128,
    },
    /// The broker refused a request's SUBSCRIBE to its response topic (SUBACK 0x80 or more);
    /// nothing was published.
    #[error(
        "{broker} refused the subscription to response topic {topic:?}: {}; nothing was published",
        reason::describe(*.code)
    )]
    SubscribeRefused {
        broker: String,
        topic: String,
        code: u8,
    },
    /// The job's values cannot make a connection (e.g. a client-id the client refuses).
    #[error("cannot connect to {broker} with these values: {reason}")]
    BadOptions { broker: String, reason: String },
    /// A bug on our side (a task that panicked): not the broker's doing, not retried.
    #[error("internal error while talking to {broker}: {reason}")]
    Internal { broker: String, reason: String },
}

impl MqttError {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            MqttError::Connect { .. } => ExitCode::ConnectFailed,
            MqttError::Refused { .. } => ExitCode::NotAuthorized,
            MqttError::Tls { .. } => ExitCode::Tls,
            MqttError::NoAnswer { .. } => ExitCode::Timeout,
            MqttError::PublishLost { .. }
            | MqttError::HeldElsewhere { .. }
            | MqttError::Internal { .. } => ExitCode::PublishFailed,
            MqttError::BadOptions { .. }
            | MqttError::TooLarge { .. }
            | MqttError::OverWorkerLimit { .. } => ExitCode::InvalidJob,
            MqttError::MessageRefused { .. } | MqttError::SubscribeRefused { .. } => {
                ExitCode::MessageRefused
            }
            MqttError::NoMqtt5 { .. } => ExitCode::NotAuthorized,
        }
    }

    /// Transient failures are retried within the job's timeout; permanent ones end the job.
    pub fn is_permanent(&self) -> bool {
        match self {
            // Quota exceeded (0x97) may clear: retried, and 8 if the timeout runs out first.
            MqttError::MessageRefused { code, .. } => {
                reason::ack(*code) != reason::AckVerdict::RefusedForNow
            }
            MqttError::Internal { .. } => true,
            _ => self.exit_code().is_permanent(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(code: u8) -> MqttError {
        MqttError::MessageRefused {
            broker: "tcp://b:1883".into(),
            code,
        }
    }

    #[test]
    fn a_refused_message_is_exit_code_8_naming_the_reason() {
        let err = refused(0x87);
        assert_eq!(err.exit_code(), ExitCode::MessageRefused);
        assert!(err.is_permanent());
        assert!(err.to_string().contains("not authorized (0x87)"), "{err}");
    }

    #[test]
    fn quota_exceeded_is_exit_code_8_but_retried() {
        let err = refused(0x97);
        assert_eq!(err.exit_code(), ExitCode::MessageRefused);
        assert!(!err.is_permanent());
    }

    #[test]
    fn a_message_over_the_maximum_packet_size_is_an_invalid_job() {
        let err = MqttError::TooLarge {
            broker: "tcp://b:1883".into(),
            size: 2000,
            max: 1024,
        };
        assert_eq!(err.exit_code(), ExitCode::InvalidJob);
        assert!(err.is_permanent());
    }
}
