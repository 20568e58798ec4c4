//! A device's answer to a `request` job, typed: what [`super::Client::request`] returns, read
//! from the reply's `response` object.

use base64::Engine as _;

use super::{Reply, ReplyError};

/// The answer's payload as the reply carries it: the text when the device answered valid UTF-8,
/// otherwise its bytes (sent base64 in the reply, decoded here).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    Text(String),
    Binary(Vec<u8>),
}

impl Payload {
    /// The bytes the device published.
    pub fn as_bytes(&self) -> &[u8] {
        match self {
            Payload::Text(text) => text.as_bytes(),
            Payload::Binary(bytes) => bytes,
        }
    }

    /// The text, when the answer was valid UTF-8.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Payload::Text(text) => Some(text),
            Payload::Binary(_) => None,
        }
    }
}

/// A device's answer: its topic, payload and MQTT 5 properties, and the reply that carried it
/// (`exit-code` 0, `message`, the worker's other keys).
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub topic: String,
    pub payload: Payload,
    /// MQTT 5 Content Type, when the answer carried one.
    pub content_type: Option<String>,
    /// MQTT 5 user properties as `(name, value)` pairs, in order, repeats kept.
    pub user_properties: Vec<(String, String)>,
    /// The reply without its `response` (now the fields above).
    pub reply: Reply,
}

/// The reply's `response` object as the worker writes it.
#[derive(serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
struct Wire {
    topic: String,
    content_encoding: String,
    content: String,
    content_type: Option<String>,
    #[serde(default)]
    user_properties: Vec<(String, String)>,
}

impl Answer {
    /// The answer of a reply with exit-code 0; a reply without a readable `response` is an
    /// error (the job was probably not a `request`).
    pub fn from_reply(mut reply: Reply) -> Result<Answer, ReplyError> {
        let response = reply
            .extra
            .remove("response")
            .ok_or(ReplyError::Missing("response"))?;
        let wire: Wire = serde_json::from_value(response).map_err(ReplyError::BadResponse)?;
        let payload = match wire.content_encoding.as_str() {
            "utf-8" => Payload::Text(wire.content),
            "base64" => Payload::Binary(
                base64::engine::general_purpose::STANDARD
                    .decode(&wire.content)
                    .map_err(|_| ReplyError::BadContent("base64"))?,
            ),
            _ => return Err(ReplyError::BadContent("content-encoding")),
        };
        Ok(Answer {
            topic: wire.topic,
            payload,
            content_type: wire.content_type,
            user_properties: wire.user_properties,
            reply,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::ExitCode;

    fn reply(body: serde_json::Value) -> Reply {
        Reply::parse(body.to_string().as_bytes()).expect("reply")
    }

    #[test]
    fn a_text_answer_is_typed_with_its_mqtt_5_properties() {
        let answer = Answer::from_reply(reply(serde_json::json!({
            "exit-code": 0, "message": "answered", "attempts": 1,
            "response": {"topic": "r/1", "content-encoding": "utf-8", "content": "open",
                "content-type": "text/plain", "user-properties": [["k", "1"], ["k", "2"]]}
        })))
        .expect("answer");
        assert_eq!(answer.topic, "r/1");
        assert_eq!(answer.payload.as_str(), Some("open"));
        assert_eq!(answer.content_type.as_deref(), Some("text/plain"));
        assert_eq!(
            answer.user_properties,
            [("k".into(), "1".into()), ("k".into(), "2".into())]
        );
        assert_eq!(answer.reply.exit_code, ExitCode::Published);
        assert!(!answer.reply.extra.contains_key("response"));
        assert_eq!(answer.reply.extra["attempts"], 1);
    }

    #[test]
    fn a_base64_answer_is_its_bytes() {
        let answer = Answer::from_reply(reply(serde_json::json!({
            "exit-code": 0, "message": "answered",
            "response": {"topic": "r", "content-encoding": "base64", "content": "/wCA"}
        })))
        .expect("answer");
        assert_eq!(answer.payload, Payload::Binary(vec![0xff, 0x00, 0x80]));
        assert_eq!(answer.payload.as_str(), None);
        assert!(answer.user_properties.is_empty() && answer.content_type.is_none());
    }

    #[test]
    fn a_reply_without_a_readable_response_is_an_error() {
        let plain = reply(serde_json::json!({"exit-code": 0, "message": "published"}));
        assert!(matches!(
            Answer::from_reply(plain),
            Err(ReplyError::Missing("response"))
        ));
        let bad = |response| {
            reply(serde_json::json!({"exit-code": 0, "message": "m", "response": response}))
        };
        assert!(matches!(
            Answer::from_reply(bad(serde_json::json!({"topic": "r"}))),
            Err(ReplyError::BadResponse(_))
        ));
        assert!(matches!(
            Answer::from_reply(bad(
                serde_json::json!({"topic": "r", "content-encoding": "base64", "content": "!!"})
            )),
            Err(ReplyError::BadContent("base64"))
        ));
        assert!(matches!(
            Answer::from_reply(bad(
                serde_json::json!({"topic": "r", "content-encoding": "rot13", "content": "x"})
            )),
            Err(ReplyError::BadContent("content-encoding"))
        ));
    }
}
