//! The RabbitMQ side: a consuming session on the request queue ([`consumer`]) and replies
//! published with publisher confirms ([`replier`]), deliveries settled in batches ([`settler`]).

pub mod consumer;
pub mod replier;
pub mod settler;

/// The request queue's default name.
pub const DEFAULT_QUEUE: &str = "mqtt-connector.send";
/// The default RabbitMQ URL.
pub const DEFAULT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// A URL fit for logs: the password replaced by `***`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _password)) => {
                    format!("{}{user}:***{}", &url[..scheme_end + 3], &url[at..])
                }
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
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
}
