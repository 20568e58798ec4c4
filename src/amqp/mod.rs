//! The RabbitMQ side: the nodes of a cluster and TLS to them ([`nodes`], [`tls`]), the request
//! queue and a consuming session on it ([`queue`], [`consumer`]), publishes told what became of
//! them, each return given to its own publish ([`confirms`]), replies ([`replier`]), jobs handed
//! back for another worker ([`handback`]), deliveries settled in batches ([`settler`]).

pub mod confirms;
pub mod consumer;
pub mod handback;
pub mod held;
pub mod nodes;
pub mod queue;
pub mod replier;
pub mod settler;
pub mod tls;

/// The request queue's default name.
pub const DEFAULT_QUEUE: &str = "mqtt-connector.send";
/// The default RabbitMQ URL.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A URL fit for logs: the password replaced by `***`; a text that does not parse as a URL
/// (a fragment of a list split inside a password, say) is not shown at all.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url.trim()) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                // Cannot fail for a URL with a host, which a password implies.
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "(a URL that does not parse, not shown)".to_owned(),
    }
}

/// A comma-separated list of URLs fit for logs (see [`redact_url`]). If any part does not
/// parse, none is shown: a list split at a raw comma inside a password leaves its first half
/// in a part that parses (`amqp://user:123` reads as host `user`, port 123).
pub fn redact_urls(urls: &str) -> String {
    let parts: Vec<&str> = urls
        .split(',')
        .filter(|url| !url.trim().is_empty())
        .collect();
    if parts.iter().any(|url| url::Url::parse(url.trim()).is_err()) {
        return format!("({} URLs, not all parse: none shown)", parts.len());
    }
    parts
        .into_iter()
        .map(redact_url)
        .collect::<Vec<_>>()
        .join(",")
}

/// An error and its sources in one line (`a: b: c`), for logs: a source whose text its parent
/// already shows is not repeated (lapin prints its IO error inside its own message).
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_lose_their_password_in_logs() {
        assert_eq!(
            redact_url("amqp://guest:s3cret@h:5672/%2f"),
            "amqp://guest:***@h:5672/%2f"
        );
        assert_eq!(redact_url("amqp://h:5672"), "amqp://h:5672");
    }

    #[test]
    fn a_list_split_inside_a_password_shows_none_of_it() {
        let shown = redact_urls("amqp://guest:123,456@h:5672/%2f");
        assert!(!shown.contains("123") && !shown.contains("456"), "{shown}");
        assert_eq!(
            redact_urls("amqp://u:p@a/%2f,amqp://b"),
            "amqp://u:***@a/%2f,amqp://b"
        );
    }

    #[test]
    fn an_error_chain_shows_each_cause_once() {
        let io = std::io::Error::other("invalid peer certificate: UnknownIssuer");
        let err = lapin::Error::from(io);
        assert_eq!(
            error_chain(&err),
            "IO error: invalid peer certificate: UnknownIssuer"
        );
    }
}
