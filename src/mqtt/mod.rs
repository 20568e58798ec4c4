//! The MQTT side: TLS material ([`tls`]), one connection that owns its event loop and reports
//! each publish's acknowledgement ([`connection`]), and the pool that reuses connections
//! across jobs ([`pool`]).

pub mod connection;
pub mod pool;
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
    /// Another client (usually a sibling worker with the same options) holds this client-id:
    /// this worker stopped competing for it for a while.
    #[error(
        "client-id {client_id} on {broker} is held by another connection (it took ours over \
         more than once); this worker stops competing for it for {rest_ms} ms"
    )]
    HeldElsewhere {
        broker: String,
        client_id: String,
        rest_ms: u128,
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
            MqttError::BadOptions { .. } => ExitCode::InvalidJob,
        }
    }

    /// Transient failures are retried within the job's timeout; permanent ones end the job.
    pub fn is_permanent(&self) -> bool {
        matches!(self, MqttError::Internal { .. }) || self.exit_code().is_permanent()
    }
}
