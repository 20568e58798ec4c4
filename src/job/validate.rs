//! Merged parameters to a [`Job`]: every required key present, every value one the MQTT side
//! can use as it is (a QoS that exists, a topic without wildcards, TLS keys only on TLS).

use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;

use super::broker::Broker;
use super::message::{Message, Qos, Topic};
use super::params::{Alpn, Params};
use super::{JobError, invalid};
use crate::secret::Secret;

/// The job's timeout when neither the job nor its connector sets one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(10_000);
/// The longest timeout a job may ask for, so a typo cannot pin a worker slot for days.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3_600);
/// MQTT's own ceiling for a packet (256 MiB); the default content limit.
pub const DEFAULT_MAX_CONTENT_BYTES: usize = 256 * 1024 * 1024;

/// Limits the worker applies to every job.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_content_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_content_bytes: DEFAULT_MAX_CONTENT_BYTES,
        }
    }
}

/// A job that passed validation: every value is one the MQTT side can use as it is.
#[derive(Debug, Clone)]
pub struct Job {
    pub target: Target,
    pub message: Message,
    pub timeout: Duration,
}

/// Where and as whom to connect. Two jobs with equal targets share one MQTT connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub broker: Broker,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub tls: Option<TlsSettings>,
}

/// The TLS side of a target: whom to trust, which certificate to show, which ALPN to offer.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TlsSettings {
    /// CA certificates to trust (PEM); `None` means the system's roots.
    pub root_ca: Option<PathBuf>,
    pub client_cert: Option<ClientCert>,
    pub alpn: Vec<String>,
}

/// Paths of a client certificate (chain) and its private key, both PEM.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ClientCert {
    pub certificate: PathBuf,
    pub private_key: PathBuf,
}

impl Job {
    /// Checks merged parameters and builds the job. `action` and `connector` are the caller's
    /// business and ignored here.
    pub fn validate(params: Params, limits: Limits) -> Result<Job, JobError> {
        let missing = |key: &str| {
            invalid(format!(
                "key {key:?} is missing (set it in the job or its connector)"
            ))
        };
        let broker = Broker::parse(params.broker.as_deref().ok_or_else(|| missing("broker"))?)?;
        let client_id = params.client_id.ok_or_else(|| missing("client-id"))?;
        if client_id.is_empty() || client_id.len() > usize::from(u16::MAX) {
            return Err(invalid("key \"client-id\" must be 1 to 65,535 bytes"));
        }
        let topic = Topic::parse(params.topic.ok_or_else(|| missing("topic"))?)?;
        let content = params.content.ok_or_else(|| missing("content"))?;
        if content.len() > limits.max_content_bytes {
            return Err(invalid(format!(
                "key \"content\" is {} bytes, over this worker's limit of {} bytes",
                content.len(),
                limits.max_content_bytes
            )));
        }
        let qos = Qos::parse(params.qos.unwrap_or(2))?;
        if qos == Qos::ExactlyOnce && broker.is_aws_iot() {
            return Err(invalid(
                "AWS IoT Core does not support QoS 2 (it never acknowledges it); use qos 0 or 1",
            ));
        }
        let timeout = match params.timeout {
            None => DEFAULT_TIMEOUT,
            Some(0) => return Err(invalid("key \"timeout\" must be at least 1 millisecond")),
            Some(ms) if Duration::from_millis(ms) > MAX_TIMEOUT => {
                return Err(invalid(format!(
                    "key \"timeout\": {ms} ms is over the maximum of {} ms",
                    MAX_TIMEOUT.as_millis()
                )));
            }
            Some(ms) => Duration::from_millis(ms),
        };
        if params.username.is_none() && params.password.is_some() {
            return Err(invalid("key \"password\" is set without \"username\""));
        }
        let tls = tls_settings(
            &broker,
            params.root_ca_crt,
            params.certificate,
            params.private_key,
            params.use_certificate,
            params.alpn,
        )?;
        Ok(Job {
            target: Target {
                broker,
                client_id,
                username: params.username,
                password: params.password,
                tls,
            },
            message: Message {
                topic,
                payload: Bytes::from(content),
                qos,
                retain: params.retain.unwrap_or(false),
            },
            timeout,
        })
    }
}

fn tls_settings(
    broker: &Broker,
    root_ca: Option<PathBuf>,
    certificate: Option<PathBuf>,
    private_key: Option<PathBuf>,
    use_certificate: Option<bool>,
    alpn: Option<Alpn>,
) -> Result<Option<TlsSettings>, JobError> {
    let use_certificate = use_certificate.unwrap_or(false);
    if !broker.transport.is_tls() {
        // TLS keys on a plain-text broker would silently send everything in clear: refuse.
        let tls_key = [
            (use_certificate, "use-certificate"),
            (root_ca.is_some(), "root-ca-crt"),
            (alpn.is_some(), "alpn"),
        ]
        .into_iter()
        .find_map(|(set, key)| set.then_some(key));
        return match tls_key {
            Some(key) => Err(invalid(if broker.transport.is_websocket() {
                format!("key {key:?} needs a TLS broker, but {broker} is plain ws://; use wss://")
            } else {
                format!(
                    "key {key:?} needs a TLS broker, but {broker} is plain tcp://; use ssl:// or mqtts://"
                )
            })),
            None => Ok(None),
        };
    }
    let client_cert = if use_certificate {
        match (certificate, private_key) {
            (Some(certificate), Some(private_key)) => Some(ClientCert {
                certificate,
                private_key,
            }),
            (None, _) => {
                return Err(invalid(
                    "key \"use-certificate\" is true but \"certificate\" is missing",
                ));
            }
            (_, None) => {
                return Err(invalid(
                    "key \"use-certificate\" is true but \"private-key\" is missing",
                ));
            }
        }
    } else {
        None
    };
    let alpn = alpn.map(Alpn::into_vec).unwrap_or_default();
    if alpn.iter().any(|name| name.is_empty() || name.len() > 255) {
        return Err(invalid(
            "key \"alpn\": each protocol name must be 1 to 255 bytes",
        ));
    }
    Ok(Some(TlsSettings {
        root_ca,
        client_cert,
        alpn,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::testing::{message_of, params};
    use serde_json::json;

    fn job(value: serde_json::Value) -> Result<Job, JobError> {
        Job::validate(params(value), Limits::default())
    }

    fn minimal() -> serde_json::Value {
        json!({"broker": "tcp://localhost", "client-id": "c", "topic": "a/b", "content": "hi"})
    }

    fn with(key: &str, value: serde_json::Value) -> serde_json::Value {
        let mut body = minimal();
        body[key] = value;
        body
    }

    #[test]
    fn minimal_job_gets_the_contract_defaults() {
        let job = job(minimal()).expect("valid");
        assert_eq!(job.message.qos, Qos::ExactlyOnce);
        assert!(!job.message.retain);
        assert_eq!(job.timeout, DEFAULT_TIMEOUT);
        assert_eq!(job.target.broker.port, 1883);
        assert!(job.target.tls.is_none());
    }

    #[test]
    fn wss_takes_the_tls_keys_and_ws_refuses_them() {
        let mut body = with("broker", json!("wss://h"));
        body["root-ca-crt"] = json!("/ca.pem");
        body["alpn"] = json!("mqtt");
        let tls = job(body).expect("valid").target.tls.expect("tls");
        assert_eq!(
            tls.root_ca.as_deref(),
            Some(std::path::Path::new("/ca.pem"))
        );
        assert_eq!(tls.alpn, vec!["mqtt"]);

        let mut body = with("broker", json!("ws://h"));
        body["root-ca-crt"] = json!("/ca.pem");
        let message = message_of(job(body));
        assert!(
            message.contains("wss://") && message.contains("TLS"),
            "{message}"
        );
        assert!(
            job(with("broker", json!("ws://h")))
                .expect("valid")
                .target
                .tls
                .is_none()
        );
    }

    #[test]
    fn wss_with_use_certificate_carries_the_client_certificate() {
        let mut body = with("broker", json!("wss://h"));
        body["use-certificate"] = json!(true);
        body["certificate"] = json!("/c.pem");
        body["private-key"] = json!("/k.pem");
        let tls = job(body).expect("valid").target.tls.expect("tls");
        assert!(tls.client_cert.is_some());
    }

    #[test]
    fn qos_three_is_rejected_with_its_key() {
        assert!(message_of(job(with("qos", json!(3)))).contains("qos"));
    }

    #[test]
    fn wildcard_topics_are_rejected() {
        for topic in ["a/#", "a/+/b", ""] {
            assert!(job(with("topic", json!(topic))).is_err(), "{topic}");
        }
    }

    #[test]
    fn missing_required_keys_are_named() {
        for key in ["broker", "client-id", "topic", "content"] {
            let mut body = minimal();
            body.as_object_mut().expect("object").remove(key);
            assert!(message_of(job(body)).contains(key), "{key}");
        }
    }

    #[test]
    fn certificates_need_a_tls_broker() {
        assert!(message_of(job(with("use-certificate", json!(true)))).contains("ssl://"));
        assert!(message_of(job(with("root-ca-crt", json!("/ca.pem")))).contains("TLS"));
    }

    #[test]
    fn use_certificate_needs_both_files() {
        let mut body = with("broker", json!("ssl://h"));
        body["use-certificate"] = json!(true);
        body["certificate"] = json!("/c.pem");
        assert!(message_of(job(body)).contains("private-key"));
    }

    #[test]
    fn alpn_accepts_one_name_or_a_list() {
        let mut body = with("broker", json!("ssl://h:443"));
        body["alpn"] = json!("x-amzn-mqtt-ca");
        let tls = job(body.clone()).expect("valid").target.tls.expect("tls");
        assert_eq!(tls.alpn, vec!["x-amzn-mqtt-ca"]);
        body["alpn"] = json!(["a", "b"]);
        assert_eq!(
            job(body).expect("valid").target.tls.expect("tls").alpn,
            vec!["a", "b"]
        );
    }

    #[test]
    fn aws_iot_rejects_qos_two_up_front() {
        let body = with(
            "broker",
            json!("ssl://abc.iot.us-east-1.amazonaws.com:8883"),
        );
        assert!(message_of(job(body)).contains("AWS"));
    }

    #[test]
    fn content_over_the_limit_is_invalid() {
        let limits = Limits {
            max_content_bytes: 4,
        };
        let result = Job::validate(params(with("content", json!("12345"))), limits);
        assert!(message_of(result).contains("limit"));
    }

    #[test]
    fn timeout_zero_and_too_long_are_invalid() {
        assert!(job(with("timeout", json!(0))).is_err());
        assert!(job(with("timeout", json!(10_000_000))).is_err());
        assert_eq!(
            job(with("timeout", json!(250))).expect("valid").timeout,
            Duration::from_millis(250)
        );
    }

    #[test]
    fn password_never_appears_in_debug_output() {
        let job = job(
            json!({"broker": "tcp://h", "client-id": "c", "topic": "t", "content": "x",
                             "username": "u", "password": "s3cr3t-pw"}),
        )
        .expect("valid");
        assert!(!format!("{job:?}").contains("s3cr3t-pw"));
    }
}
