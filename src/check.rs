//! `check`: what is wrong with a connector, found before a job runs into it — a value no job
//! could use, or a certificate or key file that is missing or unreadable.

use crate::job::{Job, Limits, Params};
use crate::mqtt::tls;

/// The problems of one connector, in words; empty when it is fine. A connector without a
/// broker is a partial default (jobs bring the rest) and only its file was checked, at load.
pub fn problems(params: &Params) -> Vec<String> {
    if params.broker.is_none() {
        return Vec::new();
    }
    // Validate as a job would be, with placeholders for what jobs usually bring.
    let mut sample = params.clone();
    sample.topic = sample.topic.or_else(|| Some("check".into()));
    sample.client_id = sample.client_id.or_else(|| Some("check".into()));
    sample.content = Some(String::new());
    match Job::validate(sample, Limits::default()) {
        Ok(job) => job
            .target
            .tls
            .map(|settings| tls::check_files(&settings))
            .unwrap_or_default()
            .into_iter()
            .map(|err| err.to_string())
            .collect(),
        Err(err) => vec![err.to_string()],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(json: &str) -> Params {
        Params::decode(json.as_bytes()).expect("valid params")
    }

    #[test]
    fn a_connector_without_a_broker_has_nothing_to_check() {
        assert!(problems(&params(r#"{"qos": 1}"#)).is_empty());
    }

    #[test]
    fn a_bad_broker_is_reported_once() {
        let found = problems(&params(r#"{"broker": "http://h"}"#));
        assert_eq!(found.len(), 1, "{found:?}");
    }

    #[test]
    fn missing_certificate_files_are_each_reported() {
        let found = problems(&params(
            r#"{"broker": "ssl://h", "root-ca-crt": "/nope/ca.crt", "use-certificate": true,
                "certificate": "/nope/c.crt", "private-key": "/nope/k.key"}"#,
        ));
        assert_eq!(found.len(), 3, "{found:?}");
    }
}
