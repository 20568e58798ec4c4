//! A job: what it says ([`params`]: one JSON object, as written in a job body or a connector
//! file, and the merge of the two), where it goes ([`broker`]), what it publishes ([`message`]),
//! and the checks that turn merged parameters into a [`Job`] that cannot hold a bad value
//! ([`validate`]). Pure: no IO, no broker.

pub mod broker;
pub mod message;
pub mod params;
pub mod validate;

pub use broker::{Broker, DEFAULT_WEBSOCKET_PATH, Transport};
pub use message::{Message, PayloadFormat, Properties, Qos, Topic};
pub use params::{Alpn, Params, UserProperties, VersionValue};
pub use validate::{
    ClientCert, DEFAULT_MAX_CONTENT_BYTES, DEFAULT_MAX_RESPONSE_BYTES, DEFAULT_TIMEOUT, Job,
    Limits, MAX_TIMEOUT, MqttVersion, Request, Target, TlsSettings,
};

/// Error messages quote user input; this keeps a huge key or value from making a huge reply.
const MAX_QUOTE_CHARS: usize = 400;

/// Why a job cannot run. Both are permanent: the same job will fail the same way again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("invalid job: {0}")]
    Invalid(String),
    #[error("unknown connector {0:?}: no such file in the worker's connectors folder")]
    UnknownConnector(String),
}

fn invalid(message: impl Into<String>) -> JobError {
    JobError::Invalid(message.into())
}

fn quote_limited(text: &str) -> String {
    if text.chars().count() <= MAX_QUOTE_CHARS {
        return text.to_owned();
    }
    let cut: String = text.chars().take(MAX_QUOTE_CHARS).collect();
    format!("{cut}… (truncated)")
}

/// Shared by the tests of the job's parts.
#[cfg(test)]
mod testing {
    use super::*;

    pub fn params(value: serde_json::Value) -> Params {
        Params::decode(value.to_string().as_bytes()).expect("valid params")
    }

    pub fn message_of(result: Result<impl std::fmt::Debug, JobError>) -> String {
        match result {
            Err(JobError::Invalid(message)) => message,
            other => panic!("expected an invalid job, got {other:?}"),
        }
    }
}
