//! Merged parameters to a [`Job`]: every required key present, every value one the MQTT side
//! can use as it is (a QoS that exists, a topic without wildcards, TLS keys only on TLS,
//! MQTT 5 properties only with MQTT 5, a payload decoded from its content-encoding).

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;

use super::broker::Broker;
use super::message::{
    Message, PayloadFormat, Properties, Qos, Topic, check_field_length, check_mqtt_string,
};
use super::params::{Alpn, Params, VersionValue};
use super::{JobError, invalid, quote_limited};
use crate::secret::Secret;

/// The job's timeout when neither the job nor its connector sets one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(10_000);
/// The longest timeout a job may ask for, so a typo cannot pin a worker slot for days.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3_600);
/// MQTT's own ceiling for a packet (256 MiB); the default content limit.
pub const DEFAULT_MAX_CONTENT_BYTES: usize = 256 * 1024 * 1024;

/// The largest answer to a `request` kept by default (`--max-response-bytes`).
pub const DEFAULT_MAX_RESPONSE_BYTES: usize = 256 * 1024;

/// Limits the worker applies to every job.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_content_bytes: usize,
    /// A `request`'s answer larger than this is no usable answer (exit-code 10).
    pub max_response_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_content_bytes: DEFAULT_MAX_CONTENT_BYTES,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

/// What makes a job a `request`: where its answer comes and how it is recognised.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub response_topic: Topic,
    /// MQTT 5: the Correlation Data the answer must carry. 3.1.1: none, the first message on
    /// the topic is the answer.
    pub correlation: Option<Bytes>,
}

/// A job that passed validation: every value is one the MQTT side can use as it is.
#[derive(Debug, Clone)]
pub struct Job {
    pub target: Target,
    pub message: Message,
    pub timeout: Duration,
    /// The moment after which it must not be published (`not-after`); see [`crate::expiry`].
    pub not_after: Option<SystemTime>,
    /// `"action": "request"`: wait for the device's answer after publishing.
    pub request: Option<Request>,
}

/// Where and as whom to connect. Two jobs with equal targets share one MQTT connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    pub broker: Broker,
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub tls: Option<TlsSettings>,
    /// The protocol spoken: a 3.1.1 and a 5 connection to the same broker are two connections.
    pub version: MqttVersion,
}

/// The MQTT protocol version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MqttVersion {
    #[default]
    V3_1_1,
    V5,
}

impl MqttVersion {
    pub fn parse(value: Option<VersionValue>) -> Result<MqttVersion, JobError> {
        match value {
            None => Ok(MqttVersion::V3_1_1),
            Some(VersionValue::Number(5)) => Ok(MqttVersion::V5),
            Some(VersionValue::Text(text)) if text == "5" || text == "5.0" => Ok(MqttVersion::V5),
            Some(VersionValue::Text(text)) if text == "3.1.1" => Ok(MqttVersion::V3_1_1),
            Some(other) => {
                let written = match other {
                    VersionValue::Number(n) => n.to_string(),
                    VersionValue::Text(text) => format!("{:?}", quote_limited(&text)),
                };
                Err(invalid(format!(
                    "key \"mqtt-version\": {written} is not \"3.1.1\" or \"5\""
                )))
            }
        }
    }
}

impl std::fmt::Display for MqttVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MqttVersion::V3_1_1 => "3.1.1",
            MqttVersion::V5 => "5",
        })
    }
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
    /// Checks merged parameters and builds the job. `connector` is the caller's business and
    /// ignored here; so is an unknown `action` (the pipeline refuses it first): `request` makes
    /// a request, anything else a send.
    pub fn validate(mut params: Params, limits: Limits) -> Result<Job, JobError> {
        let is_request = params.action.as_deref() == Some("request");
        let v5 = MqttVersion::parse(params.mqtt_version.clone())? == MqttVersion::V5;
        // A 3.1.1 request uses its response topic itself: it is no publish property there.
        let own_response_topic = if is_request && !v5 {
            params.response_topic.take()
        } else {
            None
        };
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
        // CONNECT's strings: what the encoder refuses would fail every connect of this target.
        check_mqtt_string("client-id", &client_id)?;
        if let Some(username) = &params.username {
            check_mqtt_string("username", username)?;
        }
        if let Some(password) = &params.password {
            // Binary data in CONNECT: only its length is limited (never quote it).
            check_field_length("password", password.expose().len())?;
        }
        let topic = Topic::parse(params.topic.ok_or_else(|| missing("topic"))?)?;
        let content = params.content.ok_or_else(|| missing("content"))?;
        let payload = payload(content, params.content_encoding.as_deref(), limits)?;
        let version = MqttVersion::parse(params.mqtt_version)?;
        let properties = Properties {
            message_expiry: params.message_expiry,
            content_type: params.content_type,
            user_properties: params.user_properties.map(|p| p.0).unwrap_or_default(),
            response_topic: params
                .response_topic
                .map(|topic| Topic::parse_key("response-topic", topic))
                .transpose()?,
            correlation_data: params.correlation_data.map(Bytes::from),
            payload_format: params
                .payload_format
                .as_deref()
                .map(PayloadFormat::parse)
                .transpose()?,
        };
        properties.check()?;
        let request = if is_request {
            let response_topic = match (own_response_topic, &properties.response_topic) {
                (Some(topic), _) => Topic::parse_key("response-topic", topic)?,
                (None, Some(topic)) => topic.clone(),
                (None, None) => {
                    return Err(invalid(
                        "key \"response-topic\" is missing: a request needs the topic its answer \
                         comes on (set it in the job or its connector)",
                    ));
                }
            };
            Some(Request {
                response_topic,
                correlation: properties.correlation_data.clone(),
            })
        } else {
            None
        };
        if version == MqttVersion::V3_1_1
            && let Some(key) = properties.first_key_set()
        {
            return Err(invalid(format!(
                "key {key:?} is an MQTT 5 publish property: it needs \"mqtt-version\": \"5\" \
                 (this job speaks MQTT 3.1.1)"
            )));
        }
        if properties.payload_format == Some(PayloadFormat::Utf8)
            && std::str::from_utf8(&payload).is_err()
        {
            return Err(invalid(
                "key \"payload-format\" is \"utf-8\" but the payload is not valid UTF-8 \
                 (use \"bytes\" for binary content)",
            ));
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
        let not_after = params.not_after.as_deref().map(not_after).transpose()?;
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
        let message = Message {
            topic,
            payload,
            qos,
            retain: params.retain.unwrap_or(false),
            properties,
        };
        message.check_packet_size(version == MqttVersion::V5)?;
        Ok(Job {
            target: Target {
                broker,
                client_id,
                username: params.username,
                password: params.password,
                tls,
                version,
            },
            message,
            timeout,
            not_after,
            request,
        })
    }
}

/// `not-after` as a moment: RFC 3339 with an offset, or the job is invalid.
fn not_after(text: &str) -> Result<SystemTime, JobError> {
    crate::expiry::parse_rfc3339(text).map_err(|err| {
        invalid(format!(
            "key \"not-after\": {:?} is not an RFC 3339 date-time with an offset, like \
             \"2026-12-05T12:00:00Z\" or \"2026-12-05T13:00:00+01:00\" ({err})",
            quote_limited(text)
        ))
    })
}

/// The bytes to publish: `content` as UTF-8, or decoded from base64; the limit applies to what
/// is published.
fn payload(content: String, encoding: Option<&str>, limits: Limits) -> Result<Bytes, JobError> {
    let payload = match encoding.unwrap_or("utf-8") {
        "utf-8" => Bytes::from(content),
        "base64" => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(content.trim())
                .map_err(|err| {
                    invalid(format!(
                        "key \"content\" is not valid base64 (\"content-encoding\" is \"base64\"): {err}"
                    ))
                })?;
            Bytes::from(decoded)
        }
        other => {
            return Err(invalid(format!(
                "key \"content-encoding\": {:?} is not \"utf-8\" or \"base64\"",
                quote_limited(other)
            )));
        }
    };
    if payload.len() > limits.max_content_bytes {
        return Err(invalid(format!(
            "key \"content\" is {} bytes (as published), over this worker's limit of {} bytes",
            payload.len(),
            limits.max_content_bytes
        )));
    }
    Ok(payload)
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
            ..Limits::default()
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
    fn not_after_is_a_moment_with_an_offset_and_works_with_either_mqtt_version() {
        let noon = SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_472_000);
        for body in [
            with("not-after", json!("2026-12-05T12:00:00Z")),
            v5(json!({"not-after": "2026-12-05T13:00:00+01:00"})),
        ] {
            assert_eq!(job(body).expect("valid").not_after, Some(noon));
        }
        assert_eq!(job(minimal()).expect("valid").not_after, None);
    }

    #[test]
    fn not_after_without_an_offset_or_not_a_date_names_the_key() {
        for bad in [
            json!("2026-12-05T12:00:00"),
            json!("2026-12-05"),
            json!("in 5 minutes"),
        ] {
            let message = message_of(job(with("not-after", bad.clone())));
            assert!(
                message.contains("\"not-after\"") && message.contains("offset"),
                "{bad}: {message}"
            );
        }
        let body = with("not-after", json!(1_796_472_000)).to_string();
        let message = message_of(Params::decode(body.as_bytes()));
        assert!(message.contains("not-after"), "{message}");
    }

    fn v5(extra: serde_json::Value) -> serde_json::Value {
        let mut body = with("mqtt-version", json!("5"));
        for (key, value) in extra.as_object().expect("object") {
            body[key] = value.clone();
        }
        body
    }

    #[test]
    fn mqtt_version_is_3_1_1_by_default_and_5_as_a_string_or_a_number() {
        assert_eq!(
            job(minimal()).expect("valid").target.version,
            MqttVersion::V3_1_1
        );
        for value in [json!("5"), json!(5)] {
            let job = job(with("mqtt-version", value)).expect("valid");
            assert_eq!(job.target.version, MqttVersion::V5);
        }
        assert_eq!(
            job(with("mqtt-version", json!("3.1.1")))
                .expect("valid")
                .target
                .version,
            MqttVersion::V3_1_1
        );
        for bad in [json!(4), json!("3"), json!("v5")] {
            assert!(message_of(job(with("mqtt-version", bad))).contains("mqtt-version"));
        }
    }

    #[test]
    fn every_mqtt_5_property_with_3_1_1_names_the_key_and_the_version_it_needs() {
        for (key, value) in [
            ("message-expiry", json!(10)),
            ("content-type", json!("text/plain")),
            ("user-properties", json!({"a": "b"})),
            ("response-topic", json!("replies/1")),
            ("correlation-data", json!("42")),
            ("payload-format", json!("bytes")),
        ] {
            let message = message_of(job(with(key, value)));
            assert!(message.contains(key), "{message}");
            assert!(
                message.contains("mqtt-version") && message.contains('5'),
                "{message}"
            );
        }
    }

    #[test]
    fn mqtt_5_properties_reach_the_message() {
        let job = job(v5(json!({
            "message-expiry": 60, "content-type": "application/json",
            "user-properties": [["k", "1"], ["k", "2"]], "response-topic": "r/1",
            "correlation-data": "id-7", "payload-format": "utf-8"
        })))
        .expect("valid");
        let p = &job.message.properties;
        assert_eq!(p.message_expiry, Some(60));
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        assert_eq!(p.user_properties.len(), 2);
        assert_eq!(p.response_topic.as_ref().map(Topic::as_str), Some("r/1"));
        assert_eq!(p.correlation_data.as_deref(), Some(&b"id-7"[..]));
        assert_eq!(p.payload_format, Some(PayloadFormat::Utf8));
    }

    #[test]
    fn a_3_1_1_request_waits_on_its_response_topic_without_sending_it_as_a_property() {
        let mut body = with("action", json!("request"));
        body["response-topic"] = json!("dev/1/answers");
        let job = Job::validate(params(body), Limits::default()).expect("valid");
        let request = job.request.expect("a request");
        assert_eq!(request.response_topic.as_str(), "dev/1/answers");
        assert_eq!(request.correlation, None);
        assert!(job.message.properties.is_empty());
    }

    #[test]
    fn an_mqtt_5_request_is_answered_by_its_correlation_data() {
        let mut body = v5(json!({"response-topic": "r/1", "correlation-data": "c-1"}));
        body["action"] = json!("request");
        let job = Job::validate(params(body), Limits::default()).expect("valid");
        let request = job.request.expect("a request");
        assert_eq!(request.correlation.as_deref(), Some(&b"c-1"[..]));
        assert_eq!(
            job.message
                .properties
                .response_topic
                .as_ref()
                .map(Topic::as_str),
            Some("r/1")
        );
    }

    #[test]
    fn a_request_without_a_response_topic_is_invalid() {
        let message = message_of(Job::validate(
            params(with("action", json!("request"))),
            Limits::default(),
        ));
        assert!(
            message.contains("\"response-topic\" is missing"),
            "{message}"
        );
    }

    #[test]
    fn a_3_1_1_send_with_a_response_topic_is_still_invalid() {
        let message = message_of(Job::validate(
            params(with("response-topic", json!("r/1"))),
            Limits::default(),
        ));
        assert!(message.contains("MQTT 5"), "{message}");
    }

    #[test]
    fn a_response_topic_with_a_wildcard_is_invalid() {
        let message = message_of(job(v5(json!({"response-topic": "r/#"}))));
        assert!(message.contains("response-topic"), "{message}");
    }

    #[test]
    fn payload_format_utf_8_needs_a_utf_8_payload() {
        let body =
            v5(json!({"payload-format": "utf-8", "content-encoding": "base64", "content": "/w=="}));
        assert!(message_of(job(body)).contains("UTF-8"));
        let body =
            v5(json!({"payload-format": "bytes", "content-encoding": "base64", "content": "/w=="}));
        assert!(job(body).is_ok());
        assert!(message_of(job(v5(json!({"payload-format": "text"})))).contains("payload-format"));
    }

    #[test]
    fn base64_content_is_decoded_and_invalid_base64_is_refused() {
        let body = with("content-encoding", json!("base64"));
        let mut body = body;
        body["content"] = json!("AAEC/w==");
        assert_eq!(
            &job(body.clone()).expect("valid").message.payload[..],
            &[0, 1, 2, 255]
        );
        body["content"] = json!("not base64!");
        let message = message_of(job(body));
        assert!(message.contains("base64"), "{message}");
        assert!(
            message_of(job(with("content-encoding", json!("gzip")))).contains("content-encoding")
        );
    }

    #[test]
    fn the_content_limit_applies_to_the_decoded_bytes() {
        let limits = Limits {
            max_content_bytes: 3,
            ..Limits::default()
        };
        let mut body = with("content-encoding", json!("base64"));
        body["content"] = json!("AAEC"); // 4 characters, 3 bytes
        assert!(Job::validate(params(body.clone()), limits).is_ok());
        body["content"] = json!("AAECAw=="); // 4 bytes
        assert!(message_of(Job::validate(params(body), limits)).contains("limit"));
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

    #[test]
    fn a_nul_in_any_mqtt_5_string_property_is_refused_naming_its_key() {
        for (key, value) in [
            ("content-type", json!("text/\0plain")),
            ("user-properties", json!({"na\0me": "v"})),
            ("user-properties", json!({"name": "va\0lue"})),
            ("response-topic", json!("r/\0")),
        ] {
            let message = message_of(job(v5(json!({ key: value }))));
            assert!(
                message.contains(key) && message.contains("NUL"),
                "{message}"
            );
        }
    }

    #[test]
    fn a_property_over_65535_bytes_is_refused_and_one_at_65535_is_accepted() {
        let long = "x".repeat(65_536);
        for key in ["content-type", "correlation-data", "response-topic"] {
            let message = message_of(job(v5(json!({ key: long }))));
            assert!(
                message.contains(key) && message.contains("65,535"),
                "{message}"
            );
            assert!(job(v5(json!({ key: &long[1..] }))).is_ok(), "{key}");
        }
        let message = message_of(job(v5(json!({"user-properties": {"k": long}}))));
        assert!(message.contains("user-properties"), "{message}");
    }

    #[test]
    fn the_topic_client_id_and_username_refuse_nul_in_mqtt_3_1_1_too() {
        for (key, value) in [
            ("topic", json!("a/\0")),
            ("client-id", json!("c\0")),
            ("username", json!("u\0")),
        ] {
            let message = message_of(job(with(key, value)));
            assert!(
                message.contains(key) && message.contains("NUL"),
                "{message}"
            );
        }
    }

    #[test]
    fn a_username_or_password_over_65535_bytes_is_refused_without_quoting_it() {
        let mut body = with("username", json!("x".repeat(65_536)));
        assert!(message_of(job(body.clone())).contains("username"));
        body["username"] = json!("u");
        body["password"] = json!(format!("secret{}", "y".repeat(65_536)));
        let message = message_of(job(body));
        assert!(message.contains("password"), "{message}");
        assert!(!message.contains("secret"), "{message}");
    }
}
