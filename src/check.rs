//! `check`: what is wrong with a connector, found before a job runs into it — a file that does
//! not load, a value no job could use, a broker outside `--allow-broker`, or a certificate or
//! key file that is missing or unreadable. Every file of the folder is reported, not only the
//! first that fails.

use std::fmt;
use std::path::{Path, PathBuf};

use crate::connectors::{Connector, ConnectorError, ConnectorStore};
use crate::job::{Job, Limits};
use crate::mqtt::tls;
use crate::policy::AllowedBrokers;

/// What `check` found in a connectors folder: a line per connector (`ok` or each problem), and
/// a closing count. Printed as is by the command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    dir: PathBuf,
    lines: Vec<String>,
    /// Connector files found (loaded or not).
    pub connectors: usize,
    /// Connector files with at least one problem.
    pub with_problems: usize,
}

impl Report {
    /// Whether every connector loaded and has nothing to report.
    pub fn is_clean(&self) -> bool {
        self.with_problems == 0
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for line in &self.lines {
            writeln!(f, "{line}")?;
        }
        writeln!(
            f,
            "{} connector(s) in {}, {} with problems",
            self.connectors,
            self.dir.display(),
            self.with_problems
        )
    }
}

/// Checks every connector file of `dir` (with `${NAME}` from the process environment): those
/// that do not load and those that load with a problem, each by name, sorted. Fails only when
/// the folder cannot be read.
pub fn folder(dir: &Path, allowed: &AllowedBrokers) -> Result<Report, ConnectorError> {
    folder_with_env(dir, allowed, |name| std::env::var(name).ok())
}

/// [`folder`] with the environment given.
pub fn folder_with_env(
    dir: &Path,
    allowed: &AllowedBrokers,
    env: impl Fn(&str) -> Option<String>,
) -> Result<Report, ConnectorError> {
    let (store, errors) = ConnectorStore::load_all(dir, env)?;
    let mut entries: Vec<(String, Vec<String>)> = store
        .iter()
        .map(|(name, connector)| (name.to_owned(), problems(connector, allowed)))
        .collect();
    for err in errors {
        let name = err
            .file()
            .and_then(Path::file_stem)
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_default();
        entries.push((name, vec![err.to_string()]));
    }
    entries.sort();
    let mut lines = Vec::new();
    for (name, notes) in &entries {
        if notes.is_empty() {
            lines.push(format!("ok       {name}"));
        }
        for note in notes {
            lines.push(format!("problem  {name}: {note}"));
        }
    }
    Ok(Report {
        dir: dir.to_owned(),
        lines,
        connectors: entries.len(),
        with_problems: entries
            .iter()
            .filter(|(_, notes)| !notes.is_empty())
            .count(),
    })
}

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
    fn every_file_of_the_folder_is_reported_loaded_or_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let write = |name: &str, text: &str| {
            std::fs::write(dir.path().join(name), text).expect("write");
        };
        write("a-broken.json", r#"{"qos": 1,"#);
        write("b-good.json", r#"{"broker": "tcp://h:1883"}"#);
        write("c-unset.json", r#"{"password": "${NOPE}"}"#);
        write(
            "d-no-ca.json",
            r#"{"broker": "ssl://h", "root-ca-crt": "/nope/ca.crt"}"#,
        );
        let report =
            folder_with_env(dir.path(), &AllowedBrokers::any(), |_| None).expect("a folder");
        let text = report.to_string();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 5, "{text}");
        assert!(
            lines[0].starts_with("problem  a-broken: connector file "),
            "{text}"
        );
        assert!(lines[0].contains("not valid JSON"), "{text}");
        assert_eq!(lines[1], "ok       b-good", "{text}");
        assert!(
            lines[2].starts_with("problem  c-unset: ") && lines[2].contains("NOPE"),
            "{text}"
        );
        assert!(lines[3].starts_with("problem  d-no-ca: ") && lines[3].contains("/nope/ca.crt"));
        assert!(
            lines[4].starts_with("4 connector(s) in ") && lines[4].ends_with(", 3 with problems")
        );
        assert!(!report.is_clean());
    }

    #[test]
    fn a_folder_that_cannot_be_read_is_an_error() {
        let err = folder_with_env(
            Path::new("/nonexistent/connectors"),
            &AllowedBrokers::any(),
            |_| None,
        )
        .expect_err("no folder");
        assert!(err.to_string().contains("/nonexistent/connectors"), "{err}");
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
