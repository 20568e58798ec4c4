//! What a job says: its keys exactly as the contract names them, decoded from a body that is
//! exactly one JSON object, and the merge of a job's keys over its connector's.

use std::path::PathBuf;

use serde::Deserialize;

use super::{JobError, invalid, quote_limited};
use crate::secret::Secret;

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
    /// RFC 3339 with an offset; parsed in validation.
    pub not_after: Option<String>,
    pub mqtt_version: Option<VersionValue>,
    pub content_encoding: Option<String>,
    pub message_expiry: Option<u32>,
    pub content_type: Option<String>,
    pub user_properties: Option<UserProperties>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<String>,
    pub payload_format: Option<String>,
}

/// `mqtt-version` as written: `"3.1.1"`, `"5"` or the number 5 (checked in validation).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum VersionValue {
    Number(u64),
    Text(String),
}

/// `user-properties` as name-value pairs in the order written: from an object of strings or a
/// list of `[name, value]` pairs (where a name may repeat).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserProperties(pub Vec<(String, String)>);

impl<'de> Deserialize<'de> for UserProperties {
    fn deserialize<D: serde::Deserializer<'de>>(de: D) -> Result<Self, D::Error> {
        struct Pairs;
        impl<'de> serde::de::Visitor<'de> for Pairs {
            type Value = UserProperties;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of string values or a list of [name, value] string pairs")
            }

            // An object keeps its keys in the order written (serde_json's map would sort them).
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Self::Value, A::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = map.next_entry::<String, String>()? {
                    pairs.push(pair);
                }
                Ok(UserProperties(pairs))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Self::Value, A::Error> {
                let mut pairs = Vec::new();
                while let Some(pair) = seq.next_element::<(String, String)>()? {
                    pairs.push(pair);
                }
                Ok(UserProperties(pairs))
            }
        }
        de.deserialize_any(Pairs)
    }
}

/// `alpn` may be one protocol name or a list of them.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(untagged)]
pub enum Alpn {
    One(String),
    Many(Vec<String>),
}

impl Alpn {
    pub(crate) fn into_vec(self) -> Vec<String> {
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
        let mut de = serde_json::Deserializer::from_slice(body);
        let params = Self::from_json(&mut de)?;
        // A second object or trailing bytes would otherwise go unseen (and be published).
        de.end().map_err(|_| {
            invalid(
                "the body holds more than one JSON object: send exactly one, with nothing after it",
            )
        })?;
        Ok(params)
    }

    /// Each job key as the contract names it, and whether this job sets it. Destructured
    /// without `..`: a new field does not compile until it is listed here, so `job-may-set`
    /// can never miss a key.
    pub fn keys(&self) -> Vec<(&'static str, bool)> {
        let Params {
            action,
            connector,
            broker,
            username,
            password,
            client_id,
            topic,
            qos,
            content,
            retain,
            root_ca_crt,
            certificate,
            private_key,
            use_certificate,
            alpn,
            timeout,
            not_after,
            mqtt_version,
            content_encoding,
            message_expiry,
            content_type,
            user_properties,
            response_topic,
            correlation_data,
            payload_format,
        } = self;
        vec![
            ("action", action.is_some()),
            ("connector", connector.is_some()),
            ("broker", broker.is_some()),
            ("username", username.is_some()),
            ("password", password.is_some()),
            ("client-id", client_id.is_some()),
            ("topic", topic.is_some()),
            ("qos", qos.is_some()),
            ("content", content.is_some()),
            ("retain", retain.is_some()),
            ("root-ca-crt", root_ca_crt.is_some()),
            ("certificate", certificate.is_some()),
            ("private-key", private_key.is_some()),
            ("use-certificate", use_certificate.is_some()),
            ("alpn", alpn.is_some()),
            ("timeout", timeout.is_some()),
            ("not-after", not_after.is_some()),
            ("mqtt-version", mqtt_version.is_some()),
            ("content-encoding", content_encoding.is_some()),
            ("message-expiry", message_expiry.is_some()),
            ("content-type", content_type.is_some()),
            ("user-properties", user_properties.is_some()),
            ("response-topic", response_topic.is_some()),
            ("correlation-data", correlation_data.is_some()),
            ("payload-format", payload_format.is_some()),
        ]
    }

    /// The keys this job sets.
    pub fn keys_set(&self) -> impl Iterator<Item = &'static str> {
        self.keys()
            .into_iter()
            .filter_map(|(key, set)| set.then_some(key))
    }

    /// Whether `key` is a job key.
    pub fn is_key(key: &str) -> bool {
        Params::default()
            .keys()
            .iter()
            .any(|(name, _)| *name == key)
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
            not_after: self.not_after.or_else(|| defaults.not_after.clone()),
            mqtt_version: self.mqtt_version.or_else(|| defaults.mqtt_version.clone()),
            content_encoding: self
                .content_encoding
                .or_else(|| defaults.content_encoding.clone()),
            message_expiry: self.message_expiry.or(defaults.message_expiry),
            content_type: self.content_type.or_else(|| defaults.content_type.clone()),
            user_properties: self
                .user_properties
                .or_else(|| defaults.user_properties.clone()),
            response_topic: self
                .response_topic
                .or_else(|| defaults.response_topic.clone()),
            correlation_data: self
                .correlation_data
                .or_else(|| defaults.correlation_data.clone()),
            payload_format: self
                .payload_format
                .or_else(|| defaults.payload_format.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::testing::{message_of, params};
    use serde_json::json;

    #[test]
    fn truncated_body_does_not_name_a_key() {
        let err = Params::decode(br#"{"content": "x""#).expect_err("truncated");
        let message = err.to_string();
        assert!(!message.contains("key \"?\""), "{message}");
        assert!(message.contains("EOF"), "{message}");
    }

    #[test]
    fn unknown_key_is_named_in_the_error() {
        let body = json!({"topic": "a/b", "colour": "red"}).to_string();
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
    fn a_body_is_exactly_one_object_with_nothing_after_it() {
        for body in [
            &br#"{"topic": "a"} garbage"#[..],
            br#"{"topic": "a"}{"topic": "b"}"#,
            b"{\"topic\": \"a\"}\0",
            br#"{"topic": "a"},"#,
        ] {
            assert!(
                message_of(Params::decode(body)).contains("exactly one"),
                "{body:?}"
            );
        }
        assert!(Params::decode(b" {\"topic\": \"a\"} \n").is_ok());
    }

    #[test]
    fn keys_lists_exactly_the_keys_serde_accepts() {
        // serde names every field it expects in its unknown-field error (read untruncated:
        // the job's error quotes at most 400 characters).
        let message = serde_json::from_str::<Params>(r#"{"no-such-key": 1}"#)
            .expect_err("unknown key")
            .to_string();
        let expected: Vec<&str> = message.split('`').skip(3).step_by(2).collect();
        let listed: Vec<&str> = Params::default().keys().iter().map(|(k, _)| *k).collect();
        assert_eq!(expected, listed, "{message}");
    }

    #[test]
    fn keys_set_names_what_the_job_wrote() {
        let set: Vec<&str> = params(json!({"topic": "t", "client-id": "c"}))
            .keys_set()
            .collect();
        assert_eq!(set, vec!["client-id", "topic"]);
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
    fn user_properties_keep_their_order_as_an_object_or_a_list_of_pairs() {
        // A literal body: json!() would sort the object's keys before the decoder sees them.
        let object =
            Params::decode(br#"{"user-properties": {"z": "1", "a": "2"}}"#).expect("valid");
        let expected = vec![
            ("z".to_owned(), "1".to_owned()),
            ("a".to_owned(), "2".to_owned()),
        ];
        assert_eq!(object.user_properties, Some(UserProperties(expected)));
        let list = params(json!({"user-properties": [["k", "1"], ["k", "2"], ["a", "3"]]}));
        let names: Vec<_> = list
            .user_properties
            .expect("set")
            .0
            .into_iter()
            .map(|(n, v)| n + &v)
            .collect();
        assert_eq!(names, ["k1", "k2", "a3"]);
    }

    #[test]
    fn user_properties_of_the_wrong_shape_name_the_key() {
        for bad in [
            json!("x"),
            json!({"a": 1}),
            json!([["a"]]),
            json!([["a", "b", "c"]]),
        ] {
            let body = json!({"user-properties": bad}).to_string();
            let message = message_of(Params::decode(body.as_bytes()));
            assert!(message.contains("user-properties"), "{message}");
        }
    }

    #[test]
    fn a_password_of_the_wrong_type_is_not_quoted() {
        let message = message_of(Params::decode(br#"{"password": 987654321}"#));
        assert!(
            message.contains("password") && !message.contains("987654321"),
            "{message}"
        );
    }
}
