//! What a job came to: its exit-code (the contract's table), a message a person can act on,
//! and the reply body that carries both.

use std::time::Duration;

use serde::Serialize;

/// The contract's exit-codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExitCode {
    Published = 0,
    InvalidJob = 1,
    UnknownConnector = 2,
    ConnectFailed = 3,
    NotAuthorized = 4,
    Tls = 5,
    Timeout = 6,
    PublishFailed = 7,
    /// The broker refused the message: an MQTT 5 PUBACK/PUBREC reason code of 0x80 or more.
    MessageRefused = 8,
    /// The job's `not-after` or its AMQP `timestamp` + `expiration` had passed: nothing published.
    Expired = 9,
    /// `request`: published and acknowledged, but no usable answer within the timeout.
    NoResponse = 10,
}

impl ExitCode {
    pub const ALL: [ExitCode; 11] = [
        ExitCode::Published,
        ExitCode::InvalidJob,
        ExitCode::UnknownConnector,
        ExitCode::ConnectFailed,
        ExitCode::NotAuthorized,
        ExitCode::Tls,
        ExitCode::Timeout,
        ExitCode::PublishFailed,
        ExitCode::MessageRefused,
        ExitCode::Expired,
        ExitCode::NoResponse,
    ];

    pub fn code(self) -> u8 {
        self as u8
    }

    /// The exit-code with this number, if the contract has one.
    pub fn from_code(code: u8) -> Option<ExitCode> {
        ExitCode::ALL
            .into_iter()
            .find(|exit_code| exit_code.code() == code)
    }

    /// A job that ended with this code would end the same way if tried again.
    pub fn is_permanent(self) -> bool {
        matches!(
            self,
            ExitCode::InvalidJob
                | ExitCode::UnknownConnector
                | ExitCode::NotAuthorized
                | ExitCode::Tls
                | ExitCode::MessageRefused
                | ExitCode::Expired
        )
    }

    /// The code as a metric label value ("0".."10"), without allocating.
    pub fn label(self) -> &'static str {
        ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10"][self as usize]
    }
}

/// The final result of one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub exit_code: ExitCode,
    pub message: String,
    /// Publish attempts made; 0 when the job never got as far as the broker.
    pub attempts: u32,
    /// `request`: the device's answer.
    pub response: Option<Response>,
    /// `request`: how it ended, when it got as far as its subscription (for the metrics).
    pub request_end: Option<RequestEnd>,
}

/// How a `request` ended: the `outcome` label of `mqtt_connector_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestEnd {
    /// 0: the device's answer is in the reply.
    Answered,
    /// 10: published and acknowledged, no answer in time.
    NoAnswer,
    /// 10: an answer came, over `--max-response-bytes`.
    TooLarge,
    /// 8: the broker refused the subscription to the response topic; nothing published.
    SubscriptionRefused,
    /// Any other code: the command was never acknowledged (invalid, expired, broker down, …).
    NotPublished,
}

impl RequestEnd {
    pub const ALL: [RequestEnd; 5] = [
        RequestEnd::Answered,
        RequestEnd::NoAnswer,
        RequestEnd::TooLarge,
        RequestEnd::SubscriptionRefused,
        RequestEnd::NotPublished,
    ];

    pub fn label(self) -> &'static str {
        match self {
            RequestEnd::Answered => "answered",
            RequestEnd::NoAnswer => "no_answer",
            RequestEnd::TooLarge => "too_large",
            RequestEnd::SubscriptionRefused => "subscription_refused",
            RequestEnd::NotPublished => "not_published",
        }
    }
}

/// A device's answer to a `request`, as the reply carries it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Response {
    pub topic: String,
    /// `utf-8` (then `content` is the answer) or `base64` (then `content` is its bytes in base64).
    #[serde(rename = "content-encoding")]
    pub content_encoding: &'static str,
    pub content: String,
    /// MQTT 5 Content Type, when the answer carries one.
    #[serde(rename = "content-type", skip_serializing_if = "Option::is_none")]
    pub content_type: Option<String>,
    /// MQTT 5 user properties as `[name, value]` pairs, in order, repeats kept; when present.
    #[serde(rename = "user-properties", skip_serializing_if = "Vec::is_empty")]
    pub user_properties: Vec<(String, String)>,
}

impl Response {
    /// The answer's payload as the reply carries it: a UTF-8 string when it is one, else base64.
    pub fn new(
        topic: String,
        payload: &[u8],
        content_type: Option<String>,
        user_properties: Vec<(String, String)>,
    ) -> Self {
        use base64::Engine as _;
        let (content_encoding, content) = match std::str::from_utf8(payload) {
            Ok(text) => ("utf-8", text.to_owned()),
            Err(_) => (
                "base64",
                base64::engine::general_purpose::STANDARD.encode(payload),
            ),
        };
        Self {
            topic,
            content_encoding,
            content,
            content_type,
            user_properties,
        }
    }
}

impl Outcome {
    pub fn new(exit_code: ExitCode, message: impl Into<String>, attempts: u32) -> Self {
        Self {
            exit_code,
            message: message.into(),
            attempts,
            response: None,
            request_end: None,
        }
    }

    /// The same outcome, marked with how its request ended.
    pub fn ending(mut self, end: RequestEnd) -> Self {
        self.request_end = Some(end);
        self
    }
}

impl From<crate::job::JobError> for Outcome {
    fn from(err: crate::job::JobError) -> Self {
        let exit_code = match err {
            crate::job::JobError::Invalid(_) => ExitCode::InvalidJob,
            crate::job::JobError::UnknownConnector(_) => ExitCode::UnknownConnector,
        };
        Outcome::new(exit_code, err.to_string(), 0)
    }
}

/// The reply body: `exit-code` and `message` always, then what helps a person diagnose.
#[derive(Debug, Serialize)]
pub struct Reply<'a> {
    #[serde(rename = "exit-code")]
    pub exit_code: u8,
    pub message: &'a str,
    pub attempts: u32,
    #[serde(rename = "duration-ms")]
    pub duration_ms: u64,
    /// `request` answered: the device's answer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub response: Option<&'a Response>,
}

impl<'a> Reply<'a> {
    pub fn new(outcome: &'a Outcome, duration: Duration) -> Self {
        Self {
            exit_code: outcome.exit_code.code(),
            message: &outcome.message,
            attempts: outcome.attempts,
            duration_ms: u64::try_from(duration.as_millis()).unwrap_or(u64::MAX),
            response: outcome.response.as_ref(),
        }
    }

    pub fn to_json(&self) -> Vec<u8> {
        // Serializing a struct of integers and a string cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_codes_one_two_four_five_eight_and_nine_are_permanent() {
        let permanent: Vec<u8> = ExitCode::ALL
            .iter()
            .filter(|c| c.is_permanent())
            .map(|c| c.code())
            .collect();
        assert_eq!(permanent, vec![1, 2, 4, 5, 8, 9]);
    }

    #[test]
    fn every_code_reads_back_from_its_number() {
        for code in ExitCode::ALL {
            assert_eq!(ExitCode::from_code(code.code()), Some(code));
        }
        assert_eq!(ExitCode::from_code(200), None);
    }

    #[test]
    fn labels_match_codes() {
        for code in ExitCode::ALL {
            assert_eq!(code.label(), code.code().to_string());
        }
    }

    #[test]
    fn an_answer_in_utf_8_is_a_string_and_any_other_is_base64() {
        let text = Response::new("r".into(), "grüß".as_bytes(), None, Vec::new());
        assert_eq!(
            (text.content_encoding, text.content.as_str()),
            ("utf-8", "grüß")
        );
        let binary = Response::new("r".into(), &[0xff, 0x00, 0x80], None, Vec::new());
        assert_eq!(
            (binary.content_encoding, binary.content.as_str()),
            ("base64", "/wCA")
        );
    }

    #[test]
    fn a_reply_with_an_answer_carries_it_under_response() {
        let mut outcome = Outcome::new(ExitCode::Published, "answered", 1);
        outcome.response = Some(Response::new(
            "r/1".into(),
            b"ok",
            Some("text/plain".into()),
            vec![("k".into(), "1".into()), ("k".into(), "2".into())],
        ));
        let json: serde_json::Value =
            serde_json::from_slice(&Reply::new(&outcome, Duration::ZERO).to_json()).expect("json");
        assert_eq!(
            json["response"],
            serde_json::json!({"topic": "r/1", "content-encoding": "utf-8", "content": "ok",
                "content-type": "text/plain", "user-properties": [["k", "1"], ["k", "2"]]})
        );
        let plain = Outcome::new(ExitCode::Published, "published", 1);
        let json: serde_json::Value =
            serde_json::from_slice(&Reply::new(&plain, Duration::ZERO).to_json()).expect("json");
        assert!(json.get("response").is_none());
    }

    #[test]
    fn reply_has_the_contract_keys() {
        let outcome = Outcome::new(ExitCode::Published, "published to t (qos 1)", 1);
        let json: serde_json::Value =
            serde_json::from_slice(&Reply::new(&outcome, Duration::from_millis(12)).to_json())
                .expect("json");
        assert_eq!(json["exit-code"], 0);
        assert_eq!(json["message"], "published to t (qos 1)");
        assert_eq!(json["duration-ms"], 12);
    }
}
