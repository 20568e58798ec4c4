//! `check`: what is wrong with a connector, found before a job runs into it — a value no job
//! could use, a broker outside `--allow-broker`, or a certificate or key file that is missing
//! or unreadable.

use crate::connectors::Connector;
use crate::job::{Job, Limits};
use crate::mqtt::tls;
use crate::policy::AllowedBrokers;

/// The problems of one connector, in words; empty when it is fine. A connector without a
/// broker is a partial default (jobs bring the rest) and only its file was checked, at load.
pub fn problems(connector: &Connector, allowed: &AllowedBrokers) -> Vec<String> {
    let params = &connector.defaults;
    if params.broker.is_none() {
        return Vec::new();
    }
    if let Some(broker) = &connector.broker
        && !allowed.permits(broker)
    {
        return vec![format!(
            "broker {broker} matches none of the --allow-broker patterns: every job using \
             this connector would be refused"
        )];
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

    fn connector(json: &str) -> Connector {
        crate::connectors::parse(json, &|_| None).expect("valid connector")
    }

    fn problems_of(json: &str) -> Vec<String> {
        problems(&connector(json), &AllowedBrokers::any())
    }

    #[test]
    fn a_broker_outside_the_allow_list_is_reported() {
        let allowed = AllowedBrokers::parse(&["*.internal:1883"]).expect("patterns");
        let inside = connector(r#"{"broker": "tcp://mqtt.internal:1883"}"#);
        assert!(problems(&inside, &allowed).is_empty());
        let outside = connector(r#"{"broker": "tcp://mqtt.example.com:1883"}"#);
        let found = problems(&outside, &allowed);
        assert!(
            found.len() == 1 && found[0].contains("--allow-broker"),
            "{found:?}"
        );
    }

    #[test]
    fn a_connector_without_a_broker_has_nothing_to_check() {
        assert!(problems_of(r#"{"qos": 1}"#).is_empty());
    }

    #[test]
    fn a_bad_broker_is_reported_once() {
        let found = problems_of(r#"{"broker": "http://h"}"#);
        assert_eq!(found.len(), 1, "{found:?}");
    }

    #[test]
    fn missing_certificate_files_are_each_reported() {
        let found = problems_of(
            r#"{"broker": "ssl://h", "root-ca-crt": "/nope/ca.crt", "use-certificate": true,
                "certificate": "/nope/c.crt", "private-key": "/nope/k.key"}"#,
        );
        assert_eq!(found.len(), 3, "{found:?}");
    }
}
