//! The connector store: named job defaults, one JSON file per connector in a folder,
//! with `${ENV_NAME}` values taken from the worker's environment, and the keys a job naming
//! the connector may set (`job-may-set`). Loaded whole or not at all: every file that does not
//! load is reported, not only the first.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::job::{Broker, JobError, Params};

/// The connector key that lists the only job keys a job naming the connector may set.
pub const JOB_MAY_SET: &str = "job-may-set";

/// One connector: the defaults a job starts from, and what a job may change of them.
#[derive(Debug, Clone, Default)]
pub struct Connector {
    pub defaults: Params,
    /// The connector's broker, parsed; `None` without one or when it does not parse (a job
    /// using it fails validation, and `check` reports it).
    pub broker: Option<Broker>,
    /// The only job keys a job naming this connector may set; `None`: every key.
    pub job_may_set: Option<Vec<String>>,
}

impl Connector {
    /// A connector with these defaults and no restriction.
    pub fn new(defaults: Params) -> Self {
        let broker = defaults
            .broker
            .as_deref()
            .and_then(|url| Broker::parse(url).ok());
        Self {
            defaults,
            broker,
            job_may_set: None,
        }
    }
}

/// Why the connectors folder could not be loaded. The worker refuses to start on any of these.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    #[error("cannot read the connectors folder {dir}: {source}")]
    Folder {
        dir: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read connector file {file}: {source}")]
    Read {
        file: PathBuf,
        source: std::io::Error,
    },
    #[error("connector file {file}: {source}")]
    Invalid {
        file: PathBuf,
        #[source]
        source: ConnectorFileError,
    },
    /// More than one file does not load: each is listed, so one run shows every fix to make.
    #[error("{} connector files do not load:{}", .0.len(), list(.0))]
    Several(Vec<ConnectorError>),
}

fn list(errors: &[ConnectorError]) -> String {
    errors.iter().map(|err| format!("\n  - {err}")).collect()
}

impl ConnectorError {
    /// The connector file at fault, if the error is about one file.
    pub fn file(&self) -> Option<&Path> {
        match self {
            ConnectorError::Read { file, .. } | ConnectorError::Invalid { file, .. } => Some(file),
            ConnectorError::Folder { .. } | ConnectorError::Several(_) => None,
        }
    }

    /// Each file's problem on its own (one for a single error).
    pub fn each(&self) -> Vec<&ConnectorError> {
        match self {
            ConnectorError::Several(errors) => errors.iter().collect(),
            other => vec![other],
        }
    }
}

/// All connectors of a folder, by name (the file name without `.json`).
#[derive(Debug, Clone, Default)]
pub struct ConnectorStore {
    connectors: HashMap<String, Arc<Connector>>,
}

impl ConnectorStore {
    /// Loads every `*.json` file of `dir`, reading `${NAME}` values from the process environment.
    pub fn load(dir: &Path) -> Result<Self, ConnectorError> {
        Self::load_with_env(dir, |name| std::env::var(name).ok())
    }

    /// Loads every `*.json` file of `dir`, resolving `${NAME}` through `env`; every file that
    /// does not load is reported (one error, or [`ConnectorError::Several`]).
    pub fn load_with_env(
        dir: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConnectorError> {
        let (store, mut errors) = Self::load_all(dir, env)?;
        match errors.len() {
            0 => Ok(store),
            1 => Err(errors.remove(0)),
            _ => Err(ConnectorError::Several(errors)),
        }
    }

    /// The connectors that load, and why each other file does not (for `check`, which reports
    /// both). Fails only when the folder itself cannot be read.
    pub fn load_all(
        dir: &Path,
        env: impl Fn(&str) -> Option<String>,
    ) -> Result<(Self, Vec<ConnectorError>), ConnectorError> {
        let folder_error = |source| ConnectorError::Folder {
            dir: dir.to_owned(),
            source,
        };
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(folder_error)? {
            let path = entry.map_err(folder_error)?.path();
            if path.extension().is_some_and(|ext| ext == "json") {
                files.push(path);
            }
        }
        files.sort();
        let mut connectors = HashMap::new();
        let mut errors = Vec::new();
        for file in files {
            let Some(name) = file
                .file_stem()
                .and_then(|stem| stem.to_str())
                .map(str::to_owned)
            else {
                continue;
            };
            match load_file(&file, &env) {
                Ok(connector) => {
                    connectors.insert(name, Arc::new(connector));
                }
                Err(err) => errors.push(err),
            }
        }
        Ok((Self { connectors }, errors))
    }

    /// The connector of that name. Names are only ever looked up, never used as paths.
    pub fn get(&self, name: &str) -> Option<&Connector> {
        self.connectors.get(name).map(Arc::as_ref)
    }

    /// The connector of that name, with the name as the store holds it.
    pub fn get_named(&self, name: &str) -> Option<(&str, &Connector)> {
        self.connectors
            .get_key_value(name)
            .map(|(name, connector)| (name.as_str(), connector.as_ref()))
    }

    /// Every connector, sorted by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Connector)> {
        let mut all: Vec<_> = self
            .connectors
            .iter()
            .map(|(name, connector)| (name.as_str(), connector.as_ref()))
            .collect();
        all.sort_by_key(|(name, _)| *name);
        all.into_iter()
    }

    pub fn len(&self) -> usize {
        self.connectors.len()
    }

    pub fn is_empty(&self) -> bool {
        self.connectors.is_empty()
    }
}

fn load_file(
    file: &Path,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Connector, ConnectorError> {
    let text = std::fs::read_to_string(file).map_err(|source| ConnectorError::Read {
        file: file.to_owned(),
        source,
    })?;
    parse(&text, env).map_err(|source| ConnectorError::Invalid {
        file: file.to_owned(),
        source,
    })
}

/// What is wrong with one connector file's text; each names the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorFileError {
    #[error("not valid JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("must hold one JSON object")]
    NotAnObject,
    #[error("key {0:?} belongs in a job, not in a connector")]
    JobOnlyKey(&'static str),
    #[error("key {JOB_MAY_SET:?} must be a list of job keys")]
    JobMaySetNotAList(#[source] serde_json::Error),
    #[error("key {JOB_MAY_SET:?} names {0:?}, which is not a job key")]
    JobMaySetUnknownKey(String),
    #[error("key {key:?} names the environment variable {variable:?}, which is not set")]
    UnsetVariable { key: String, variable: String },
    /// A key the job side refuses (unknown, wrong type); the message names it.
    #[error("{}", .0.to_string().trim_start_matches("invalid job: "))]
    Key(#[source] JobError),
}

/// One connector file's text to a connector.
pub fn parse(
    text: &str,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<Connector, ConnectorFileError> {
    let mut value: serde_json::Value =
        serde_json::from_str(text).map_err(ConnectorFileError::NotJson)?;
    let object = value
        .as_object_mut()
        .ok_or(ConnectorFileError::NotAnObject)?;
    for key in ["action", "connector"] {
        if object.contains_key(key) {
            return Err(ConnectorFileError::JobOnlyKey(key));
        }
    }
    let job_may_set = object.remove(JOB_MAY_SET).map(job_may_set).transpose()?;
    for (key, value) in object.iter_mut() {
        expand_env(key, value, env)?;
    }
    let defaults = Params::from_json(value).map_err(ConnectorFileError::Key)?;
    Ok(Connector {
        job_may_set,
        ..Connector::new(defaults)
    })
}

/// `job-may-set`: a list of job keys (`connector` and `action` are always allowed: they are how
/// a job names its connector).
fn job_may_set(keys: serde_json::Value) -> Result<Vec<String>, ConnectorFileError> {
    let keys: Vec<String> =
        serde_json::from_value(keys).map_err(ConnectorFileError::JobMaySetNotAList)?;
    match keys.iter().find(|key| !Params::is_key(key)) {
        Some(unknown) => Err(ConnectorFileError::JobMaySetUnknownKey(unknown.clone())),
        None => Ok(keys),
    }
}

/// Replaces every `${NAME}` inside string values (also inside lists) with the variable's value.
fn expand_env(
    key: &str,
    value: &mut serde_json::Value,
    env: &impl Fn(&str) -> Option<String>,
) -> Result<(), ConnectorFileError> {
    match value {
        serde_json::Value::String(text) if text.contains("${") => {
            *text = expand(text, env).map_err(|variable| ConnectorFileError::UnsetVariable {
                key: key.to_owned(),
                variable: variable.to_owned(),
            })?;
        }
        serde_json::Value::Array(items) => {
            for item in items {
                expand_env(key, item, env)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// `a${X}b` with X=1 gives `a1b`; `Err(name)` (the variable's name, not an error message) for
/// the first variable that is not set.
fn expand<'a>(text: &'a str, env: &impl Fn(&str) -> Option<String>) -> Result<String, &'a str> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start + 2..].find('}') else {
            break;
        };
        let name = &rest[start + 2..start + 2 + len];
        out.push_str(&rest[..start]);
        out.push_str(&env(name).ok_or(name)?);
        rest = &rest[start + 2 + len + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "PW" => Some("secret".into()),
            "HOST" => Some("mqtt.example".into()),
            _ => None,
        }
    }

    #[test]
    fn the_contracts_two_examples_load_as_they_stand() {
        let flint = r#"{ "broker": "tcp://localhost:1883", "username": "user", "password": "pwd",
            "client-id": "flint_mqtt", "qos": 2, "topic": "flint_topic" }"#;
        let aws = r#"{ "broker": "ssl://Z2EBLEZ5JJFGKF.iot.us-east-1.amazonaws.com:8883",
            "client-id": "thing-name", "topic": "$aws/things/thing-name/shadow/update", "qos": 1,
            "root-ca-crt": "/certs/root-CA.crt", "certificate": "/certs/device.pem.crt",
            "private-key": "/certs/device.pem.key", "use-certificate": true }"#;
        assert_eq!(
            parse(flint, &env)
                .expect("flint")
                .defaults
                .client_id
                .as_deref(),
            Some("flint_mqtt")
        );
        assert_eq!(
            parse(aws, &env).expect("aws").defaults.use_certificate,
            Some(true)
        );
    }

    #[test]
    fn env_placeholders_are_expanded_inside_strings() {
        let params = parse(
            r#"{"broker": "tcp://${HOST}:1883", "password": "${PW}"}"#,
            &env,
        )
        .expect("valid")
        .defaults;
        assert_eq!(params.broker.as_deref(), Some("tcp://mqtt.example:1883"));
        assert_eq!(
            params.password.map(|p| p.expose().to_owned()),
            Some("secret".into())
        );
    }

    #[test]
    fn an_unset_variable_is_named() {
        let err = parse(r#"{"password": "${NOPE}"}"#, &env)
            .expect_err("unset")
            .to_string();
        assert!(err.contains("NOPE") && err.contains("password"), "{err}");
    }

    #[test]
    fn an_unknown_key_is_named() {
        let err = parse(r#"{"brokr": "tcp://h"}"#, &env)
            .expect_err("unknown")
            .to_string();
        assert!(err.contains("brokr"), "{err}");
    }

    #[test]
    fn job_may_set_lists_job_keys_and_names_an_unknown_one() {
        let connector = parse(
            r#"{"broker": "tcp://h", "job-may-set": ["topic", "content"]}"#,
            &env,
        )
        .expect("valid");
        assert_eq!(
            connector.job_may_set,
            Some(vec!["topic".to_owned(), "content".to_owned()])
        );
        assert!(connector.broker.is_some());
        let err = parse(r#"{"job-may-set": ["topic", "colour"]}"#, &env)
            .expect_err("unknown")
            .to_string();
        assert!(
            err.contains("colour") && err.contains("job-may-set"),
            "{err}"
        );
        let err = parse(r#"{"job-may-set": "topic"}"#, &env)
            .expect_err("not a list")
            .to_string();
        assert!(err.contains("list"), "{err}");
    }

    #[test]
    fn job_only_keys_are_refused() {
        assert!(parse(r#"{"action": "send"}"#, &env).is_err());
    }

    #[test]
    fn a_bad_file_stops_the_whole_load_and_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("good.json"), r#"{"qos": 1}"#).expect("write");
        std::fs::write(dir.path().join("bad.json"), r#"{"qos": 1,"#).expect("write");
        let err = ConnectorStore::load_with_env(dir.path(), env).expect_err("bad file");
        assert!(err.to_string().contains("bad.json"), "{err}");
    }

    #[test]
    fn every_file_that_does_not_load_is_reported_not_only_the_first() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("a-broken.json"), r#"{"qos": 1,"#).expect("write");
        std::fs::write(dir.path().join("b-good.json"), r#"{"qos": 1}"#).expect("write");
        std::fs::write(
            dir.path().join("c-unset.json"),
            r#"{"password": "${NOPE}"}"#,
        )
        .expect("write");
        std::fs::create_dir(dir.path().join("d-dir.json")).expect("mkdir");
        let err = ConnectorStore::load_with_env(dir.path(), env).expect_err("bad files");
        let each: Vec<String> = err.each().iter().map(|e| e.to_string()).collect();
        assert_eq!(each.len(), 3, "{each:?}");
        assert!(
            each[0].contains("a-broken.json") && each[0].contains("JSON"),
            "{each:?}"
        );
        assert!(
            each[1].contains("c-unset.json") && each[1].contains("NOPE"),
            "{each:?}"
        );
        assert!(
            each[2].contains("d-dir.json") && each[2].contains("cannot read"),
            "{each:?}"
        );
        let text = err.to_string();
        assert!(text.starts_with("3 connector files do not load:"), "{text}");
        assert!(
            each.iter().all(|line| text.contains(line.as_str())),
            "{text}"
        );
        assert!(!text.contains("b-good"), "{text}");
    }

    #[test]
    fn names_are_file_stems_and_paths_are_never_followed() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("local.json"), r#"{"qos": 1}"#).expect("write");
        let store = ConnectorStore::load_with_env(dir.path(), env).expect("load");
        assert!(store.get("local").is_some());
        assert!(store.get("../local").is_none());
        assert!(store.get("local.json").is_none());
    }
}
