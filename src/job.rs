//! A job: its parameters as written (a job body or a connector file), the merge of the two, and
//! the validated [`Job`] that cannot hold a bad value. Pure: no IO, no broker.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;

use crate::secret::Secret;

/// The job's timeout when neither the job nor its connector sets one.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_millis(10_000);
/// The longest timeout a job may ask for, so a typo cannot pin a worker slot for days.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3_600);
/// MQTT's own ceiling for a packet (256 MiB); the default content limit.
pub const DEFAULT_MAX_CONTENT_BYTES: usize = 256 * 1024 * 1024;
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

/// Job keys exactly as the contract names them; every key optional so the same shape serves
/// a job body, a connector file and their merge.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Params {
    pub action: Option<String>,
    pub connector: Option<String>,
    pub broker: Option<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub client_id: Option<String>,
    pub topic: Option<String>,
    pub qos: Option<u8>,
    pub content: Option<String>,
    pub retain: Option<bool>,
    pub root_ca_crt: Option<PathBuf>,
    pub certificate: Option<PathBuf>,
    pub private_key: Option<PathBuf>,
    pub use_certificate: Option<bool>,
    pub alpn: Option<Alpn>,
    pub timeout: Option<u64>,
}

/// `alpn` may be one protocol name or a list of them.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Alpn {
    One(String),
    Many(Vec<String>),
}

impl Alpn {
    fn into_vec(self) -> Vec<String> {
        match self {
            Alpn::One(name) => vec![name],
            Alpn::Many(names) => names,
        }
    }
}

impl Params {
    /// Parses a job body. Every failure is an [`JobError::Invalid`] naming the key at fault.
    pub fn decode(body: &[u8]) -> Result<Params, JobError> {
        let first = body.iter().find(|b| !b.is_ascii_whitespace());
        if first != Some(&b'{') {
            return Err(invalid(match std::str::from_utf8(body) {
                Err(_) => "the body is not UTF-8 JSON: send one JSON object".to_owned(),
                Ok(_) if first.is_none() => "the body is empty: send one JSON object".to_owned(),
                Ok(_) => "the body is not a JSON object: send one JSON object".to_owned(),
            }));
        }
        Self::from_json(&mut serde_json::Deserializer::from_slice(body))
    }

    /// Deserializes from any JSON source, naming the offending key in the error.
    pub fn from_json<'de, D>(de: D) -> Result<Params, JobError>
    where
        D: serde::Deserializer<'de, Error = serde_json::Error>,
    {
        serde_path_to_error::deserialize(de).map_err(|err| {
            let path = err.path().to_string();
            let inner = err.into_inner().to_string();
            // "?" is serde_path_to_error's path when the error is not at a key (e.g. the body
            // ends early): naming `key "?"` would only confuse.
            if path == "." || path == "?" || path.is_empty() {
                invalid(quote_limited(&inner))
            } else if path == "password" {
                // serde quotes the offending value; a password must not reach a reply or a log.
                invalid("key \"password\" must be a string")
            } else {
                invalid(quote_limited(&format!("key {path:?}: {inner}")))
            }
        })
    }

    /// This job's keys over the connector's: a key set in the job wins.
    pub fn over(self, defaults: &Params) -> Params {
        // Clone only the defaults the job does not set: most jobs set a few keys.
        Params {
            action: self.action.or_else(|| defaults.action.clone()),
            connector: self.connector.or_else(|| defaults.connector.clone()),
            broker: self.broker.or_else(|| defaults.broker.clone()),
            username: self.username.or_else(|| defaults.username.clone()),
            password: self.password.or_else(|| defaults.password.clone()),
            client_id: self.client_id.or_else(|| defaults.client_id.clone()),
            topic: self.topic.or_else(|| defaults.topic.clone()),
            qos: self.qos.or(defaults.qos),
            content: self.content.or_else(|| defaults.content.clone()),
            retain: self.retain.or(defaults.retain),
            root_ca_crt: self.root_ca_crt.or_else(|| defaults.root_ca_crt.clone()),
            certificate: self.certificate.or_else(|| defaults.certificate.clone()),
            private_key: self.private_key.or_else(|| defaults.private_key.clone()),
            use_certificate: self.use_certificate.or(defaults.use_certificate),
            alpn: self.alpn.or_else(|| defaults.alpn.clone()),
            timeout: self.timeout.or(defaults.timeout),
        }
    }
}

fn quote_limited(text: &str) -> String {
    if text.chars().count() <= MAX_QUOTE_CHARS {
        return text.to_owned();
    }
    let cut: String = text.chars().take(MAX_QUOTE_CHARS).collect();
    format!("{cut}… (truncated)")
}

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

/// How bytes reach the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// MQTT over TCP (`tcp://`, `mqtt://`).
    Tcp,
    /// MQTT over TLS (`ssl://`, `mqtts://`, `tls://`).
    Tls,
    /// MQTT over a websocket (`ws://`).
    Ws,
    /// MQTT over a websocket over TLS (`wss://`).
    Wss,
}

impl Transport {
    /// Whether the connection is encrypted (and the TLS keys of a job apply).
    pub fn is_tls(self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss)
    }

    /// Whether MQTT travels in websocket frames.
    pub fn is_websocket(self) -> bool {
        matches!(self, Transport::Ws | Transport::Wss)
    }

    /// The contract's default ports: 1883 plain, 8883 TLS (websockets included).
    pub fn default_port(self) -> u16 {
        if self.is_tls() { 8883 } else { 1883 }
    }

    /// The canonical scheme, as it starts a URL.
    pub fn scheme(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "ssl",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        }
    }
}

/// The websocket path when a `ws://` or `wss://` URL names none (AWS IoT and most brokers).
pub const DEFAULT_WEBSOCKET_PATH: &str = "/mqtt";

/// A broker address from a `scheme://host:port` URL (`scheme://host:port/path` for websockets).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Broker {
    pub transport: Transport,
    pub host: String,
    pub port: u16,
    /// The HTTP path (and query) of the websocket upgrade, starting with `/`; `None` for MQTT
    /// over TCP or TLS.
    pub path: Option<String>,
}

/// Without the query of a websocket path: it may carry a token (AWS IoT custom authorizers).
impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self
            .path
            .as_deref()
            .map(|path| path.split_once('?').map_or(path, |(path, _)| path));
        f.debug_struct("Broker")
            .field("transport", &self.transport)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("path", &path)
            .finish()
    }
}

impl Broker {
    /// Parses `tcp://`, `mqtt://`, `ssl://`, `mqtts://` URLs (the port defaults to 1883 or
    /// 8883), and `ws://`, `wss://` URLs with an optional path (ports 1883 or 8883, path
    /// [`DEFAULT_WEBSOCKET_PATH`] when absent).
    pub fn parse(url: &str) -> Result<Broker, JobError> {
        let bad = |why: &str| invalid(format!("key \"broker\": {:?} {why}", quote_limited(url)));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("is not a URL like tcp://host:1883 or ssl://host:8883"))?;
        let transport = match scheme.to_ascii_lowercase().as_str() {
            "tcp" | "mqtt" => Transport::Tcp,
            "ssl" | "mqtts" | "tls" => Transport::Tls,
            "ws" => Transport::Ws,
            "wss" => Transport::Wss,
            _ => {
                return Err(bad(
                    "has an unknown scheme; use tcp://, mqtt://, ssl://, mqtts://, ws:// or wss://",
                ));
            }
        };
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, ""),
        };
        if authority.contains(['@', '?', '#']) {
            return Err(bad(
                "must be scheme://host:port, without user, query or fragment",
            ));
        }
        let path = if transport.is_websocket() {
            if !path.bytes().all(is_websocket_path_byte) {
                return Err(bad(
                    "has a websocket path with characters a URL path cannot hold (spaces, #, quotes…)",
                ));
            }
            Some(if path.is_empty() {
                DEFAULT_WEBSOCKET_PATH.to_owned()
            } else {
                path.to_owned()
            })
        } else {
            if !path.is_empty() && path != "/" {
                return Err(bad(
                    "must be scheme://host:port, without path (only ws:// and wss:// take one)",
                ));
            }
            None
        };
        let (host, port) = split_host_port(authority).ok_or_else(|| bad("has a bad port"))?;
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        Ok(Broker {
            transport,
            host: host.to_owned(),
            port: port.unwrap_or(transport.default_port()),
            path,
        })
    }

    /// `ws://host:port/path` or `wss://host:port/path` for a websocket broker (the port always
    /// written, since ours are not the HTTP defaults); `None` for MQTT over TCP or TLS.
    pub fn websocket_url(&self) -> Option<String> {
        let path = self.path.as_deref()?;
        self.transport
            .is_websocket()
            .then(|| format!("{}://{self}{path}", self.transport.scheme()))
    }

    /// AWS IoT Core endpoints, which never acknowledge QoS 2.
    pub fn is_aws_iot(&self) -> bool {
        let host = self.host.to_ascii_lowercase();
        host.contains(".iot.") && host.ends_with(".amazonaws.com")
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`. `None` when the port is not a number.
fn split_host_port(authority: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    match port {
        None => Some((host, None)),
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .map(|p| (host, Some(p))),
    }
}

/// RFC 3986 path and query characters (unreserved, sub-delims, `:@/?%`): what an HTTP request
/// line can carry as it is, so a path that passes here never fails later in the upgrade request.
fn is_websocket_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// `host:port`: how logs, messages and metric labels name a broker.
impl fmt::Display for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
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
    use serde_json::json;

    fn params(value: serde_json::Value) -> Params {
        Params::decode(value.to_string().as_bytes()).expect("valid params")
    }

    fn job(value: serde_json::Value) -> Result<Job, JobError> {
        Job::validate(params(value), Limits::default())
    }

    #[test]
    fn truncated_body_does_not_name_a_key() {
        let err = Params::decode(br#"{"content": "x""#).expect_err("truncated");
        let message = err.to_string();
        assert!(!message.contains("key \"?\""), "{message}");
        assert!(message.contains("EOF"), "{message}");
    }

    fn minimal() -> serde_json::Value {
        json!({"broker": "tcp://localhost", "client-id": "c", "topic": "a/b", "content": "hi"})
    }

    fn with(key: &str, value: serde_json::Value) -> serde_json::Value {
        let mut body = minimal();
        body[key] = value;
        body
    }

    fn message_of(result: Result<impl fmt::Debug, JobError>) -> String {
        match result {
            Err(JobError::Invalid(message)) => message,
            other => panic!("expected an invalid job, got {other:?}"),
        }
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
    fn schemes_map_to_transports_and_default_ports() {
        for (url, transport, port) in [
            ("tcp://h", Transport::Tcp, 1883),
            ("mqtt://h:1999", Transport::Tcp, 1999),
            ("ssl://h", Transport::Tls, 8883),
            ("MQTTS://h:443/", Transport::Tls, 443),
        ] {
            let broker = Broker::parse(url).expect(url);
            assert_eq!((broker.transport, broker.port), (transport, port), "{url}");
        }
        assert_eq!(
            Broker::parse("tcp://[::1]:1884").expect("v6").to_string(),
            "[::1]:1884"
        );
    }

    #[test]
    fn bad_broker_urls_are_invalid_jobs() {
        for url in [
            "localhost:1883",
            "http://h",
            "tcp://h:99999",
            "tcp://h:x",
            "tcp://",
            "tcp://u:p@h",
            "tcp://h/mqtt",
            "ws://u:p@h/mqtt",
            "ws://h/a b",
            "wss://h/mqtt#frag",
            "wss://:8883/mqtt",
            "wss://h:0",
        ] {
            assert!(Broker::parse(url).is_err(), "{url} should be rejected");
        }
    }

    #[test]
    fn websocket_urls_default_to_the_contract_ports_and_the_mqtt_path() {
        for (url, transport, port, path) in [
            ("ws://h", Transport::Ws, 1883, "/mqtt"),
            ("WS://h:8080", Transport::Ws, 8080, "/mqtt"),
            ("wss://h", Transport::Wss, 8883, "/mqtt"),
            (
                "wss://h:443/mqtt?x-amz-customauthorizer-name=a",
                Transport::Wss,
                443,
                "/mqtt?x-amz-customauthorizer-name=a",
            ),
            ("ws://h:9001/", Transport::Ws, 9001, "/"),
            ("ws://[::1]/ws/mqtt", Transport::Ws, 1883, "/ws/mqtt"),
        ] {
            let broker = Broker::parse(url).expect(url);
            assert_eq!(
                (broker.transport, broker.port, broker.path.as_deref()),
                (transport, port, Some(path)),
                "{url}"
            );
        }
    }

    #[test]
    fn a_websocket_broker_is_named_host_port_and_connected_to_by_its_full_url() {
        let broker = Broker::parse("wss://h.example/mqtt").expect("valid");
        assert_eq!(broker.to_string(), "h.example:8883");
        assert_eq!(
            broker.websocket_url().as_deref(),
            Some("wss://h.example:8883/mqtt")
        );
        let v6 = Broker::parse("ws://[::1]:9001").expect("valid");
        assert_eq!(v6.websocket_url().as_deref(), Some("ws://[::1]:9001/mqtt"));
        assert_eq!(
            Broker::parse("tcp://h").expect("valid").websocket_url(),
            None
        );
    }

    #[test]
    fn websocket_paths_are_part_of_the_target_so_they_never_share_a_connection() {
        let a = Broker::parse("ws://h:9001/mqtt").expect("valid");
        let b = Broker::parse("ws://h:9001/other").expect("valid");
        assert_ne!(a, b);
        assert_eq!(a, Broker::parse("ws://h:9001").expect("valid"));
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
    fn unknown_key_is_named_in_the_error() {
        let body = with("colour", json!("red")).to_string();
        assert!(message_of(Params::decode(body.as_bytes())).contains("colour"));
    }

    #[test]
    fn wrong_type_names_the_key() {
        let message = message_of(Params::decode(br#"{"qos": "two"}"#));
        assert!(message.contains("qos"), "{message}");
    }

    #[test]
    fn bodies_that_are_not_one_object_are_invalid() {
        for body in [
            &b"not json"[..],
            b"[1,2]",
            b"",
            b"\xff\xfe",
            b"{\"topic\": ",
        ] {
            assert!(Params::decode(body).is_err(), "{body:?}");
        }
    }

    #[test]
    fn deeply_nested_json_is_an_error_not_a_stack_overflow() {
        let body = format!(
            "{{\"alpn\": {}{}}}",
            "[".repeat(100_000),
            "]".repeat(100_000)
        );
        assert!(Params::decode(body.as_bytes()).is_err());
    }

    #[test]
    fn huge_unknown_keys_are_quoted_briefly() {
        let key = "k".repeat(1_000_000);
        let message = message_of(Params::decode(format!("{{\"{key}\": 1}}").as_bytes()));
        assert!(message.len() < 1_000, "{} bytes", message.len());
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
    fn job_keys_override_connector_keys() {
        let connector = params(json!({"broker": "tcp://c", "qos": 1, "topic": "from/connector"}));
        let merged = params(json!({"topic": "from/job"})).over(&connector);
        assert_eq!(merged.topic.as_deref(), Some("from/job"));
        assert_eq!(merged.qos, Some(1));
        assert_eq!(merged.broker.as_deref(), Some("tcp://c"));
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
    fn a_websocket_query_never_appears_in_debug_output() {
        let broker = Broker::parse("wss://h/mqtt?token=s3cr3t").expect("valid");
        let debug = format!("{broker:?}");
        assert!(
            debug.contains("/mqtt") && !debug.contains("s3cr3t"),
            "{debug}"
        );
    }

    #[test]
    fn a_password_of_the_wrong_type_is_not_quoted() {
        let message = message_of(Params::decode(br#"{"password": 987654321}"#));
        assert!(
            message.contains("password") && !message.contains("987654321"),
            "{message}"
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
