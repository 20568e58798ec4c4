//! The trust boundary: what a job submitter may make a worker do with the operator's connectors,
//! brokers and disk. Whoever can publish to the request queue is not trusted with them:
//! - a connector's secrets go only to the broker that connector names ([`secrets_stay_with_broker`]),
//! - a connector may list the only keys a job may set ([`job_may_set`]),
//! - the brokers a job may reach ([`AllowedBrokers`]),
//! - the files a job body may name ([`JobFiles`]).
//!
//! Decisions are pure functions of the job, the connector and the worker's options; only
//! [`JobFiles::resolve`] and [`open_file`] touch the file system: a job's file is opened beneath
//! `--job-files` in one step (`openat2` with `RESOLVE_BENEATH`), at admission and when read.

use std::path::{Path, PathBuf};

use crate::connectors::{Connector, JOB_MAY_SET};
use crate::job::{Broker, JobError, Params};

fn refused(message: String) -> JobError {
    JobError::Invalid(message)
}

/// A job naming `connector` sets only the keys the connector's `job-may-set` lists (`action`
/// and `connector` are how it names the connector, always allowed).
pub fn job_may_set(job: &Params, name: &str, connector: &Connector) -> Result<(), JobError> {
    let Some(allowed) = &connector.job_may_set else {
        return Ok(());
    };
    let forbidden = job
        .keys_set()
        .filter(|key| !matches!(*key, "action" | "connector"))
        .find(|key| !allowed.iter().any(|allowed| allowed == key));
    match forbidden {
        None => Ok(()),
        Some(key) => Err(refused(format!(
            "key {key:?} may not be set by a job using connector {name:?} \
             (its {JOB_MAY_SET} allows: {})",
            if allowed.is_empty() {
                "no key".to_owned()
            } else {
                allowed.join(", ")
            }
        ))),
    }
}

/// A connector's password, certificate and private key are used only with the broker that
/// connector names. A job that sets another broker must bring its own credentials for every
/// secret it would otherwise take from the connector.
pub fn secrets_stay_with_broker(
    job: &Params,
    name: &str,
    connector: &Connector,
) -> Result<(), JobError> {
    let Some(job_broker) = job.broker.as_deref() else {
        return Ok(());
    };
    let same_broker = match (Broker::parse(job_broker), &connector.broker) {
        (Ok(job_broker), Some(own)) => same_broker(&job_broker, own),
        // A broker that does not parse is refused by validation anyway.
        _ => false,
    };
    if same_broker {
        return Ok(());
    }
    let defaults = &connector.defaults;
    let use_certificate = job
        .use_certificate
        .or(defaults.use_certificate)
        .unwrap_or(false);
    let borrowed = [
        (
            "password",
            defaults.password.is_some() && job.password.is_none(),
        ),
        (
            "certificate",
            use_certificate && defaults.certificate.is_some() && job.certificate.is_none(),
        ),
        (
            "private-key",
            use_certificate && defaults.private_key.is_some() && job.private_key.is_none(),
        ),
    ]
    .into_iter()
    .find_map(|(key, borrowed)| borrowed.then_some(key));
    match borrowed {
        None => Ok(()),
        Some(key) => Err(refused(format!(
            "the job sets broker {job_broker:?}, which connector {name:?} does not name, but \
             would use that connector's {key}: a connector's secrets go only to its own broker; \
             use the connector's broker or bring your own credentials"
        ))),
    }
}

/// The same broker as far as secrets are concerned: transport, host (case aside), port and
/// websocket path.
fn same_broker(a: &Broker, b: &Broker) -> bool {
    a.transport == b.transport
        && a.host.eq_ignore_ascii_case(&b.host)
        && a.port == b.port
        && a.path == b.path
}

/// A worker's trust boundary: the brokers jobs may reach and the files they may name.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    pub allowed_brokers: AllowedBrokers,
    pub job_files: JobFiles,
}

impl Policy {
    /// `send`: one job run by the invoking user, with that user's rights.
    pub fn for_send() -> Policy {
        Policy {
            allowed_brokers: AllowedBrokers::any(),
            job_files: JobFiles::Any,
        }
    }
}

/// Why a worker option of the trust boundary is unusable.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error(
        "--allow-broker {pattern:?}: {why} (write host or host:port; * stands for any \
         characters within one label of the host, or for any port)"
    )]
    Pattern { pattern: String, why: &'static str },
    #[error("--job-files {}: {source}", dir.display())]
    JobFilesDir {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One `--allow-broker` pattern: `host` (any port), `host:port` or `host:*`; `*` in the host
/// stands for any characters within one DNS label, like a wildcard certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerPattern {
    /// Lower case; IPv6 without brackets.
    host: String,
    /// `None`: any port.
    port: Option<u16>,
}

impl BrokerPattern {
    pub fn parse(pattern: &str) -> Result<BrokerPattern, PolicyError> {
        let bad = |why| PolicyError::Pattern {
            pattern: pattern.to_owned(),
            why,
        };
        let pattern_lower = pattern.trim().to_ascii_lowercase();
        let (host, port) = if let Some(v6) = pattern_lower.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            match after {
                "" => (host, None),
                _ => (
                    host,
                    Some(after.strip_prefix(':').ok_or_else(|| bad("junk after ]"))?),
                ),
            }
        } else {
            match pattern_lower.rsplit_once(':') {
                Some((host, port)) if !host.contains(':') => (host, Some(port)),
                Some(_) => return Err(bad("write an IPv6 address in brackets: [::1]:1883")),
                None => (pattern_lower.as_str(), None),
            }
        };
        if host.is_empty() {
            return Err(bad("the host is empty"));
        }
        if host.contains(['/', '@', '?', '#', ' ']) {
            return Err(bad("a host, not a URL"));
        }
        let port = match port {
            None | Some("*") => None,
            Some(port) => Some(
                port.parse::<u16>()
                    .ok()
                    .filter(|p| *p != 0)
                    .ok_or_else(|| bad("the port is not a number from 1 to 65535 or *"))?,
            ),
        };
        Ok(BrokerPattern {
            host: host.to_owned(),
            port,
        })
    }

    pub fn matches(&self, broker: &Broker) -> bool {
        self.port.is_none_or(|port| port == broker.port)
            && host_matches(&self.host, &broker.host.to_ascii_lowercase())
    }
}

/// Label by label; `*` within a label matches any run of characters except a dot.
fn host_matches(pattern: &str, host: &str) -> bool {
    let (patterns, labels): (Vec<&str>, Vec<&str>) =
        (pattern.split('.').collect(), host.split('.').collect());
    patterns.len() == labels.len()
        && patterns
            .iter()
            .zip(&labels)
            .all(|(pattern, label)| label_matches(pattern.as_bytes(), label.as_bytes()))
}

fn label_matches(pattern: &[u8], label: &[u8]) -> bool {
    match pattern.split_first() {
        None => label.is_empty(),
        Some((b'*', rest)) => (0..=label.len()).any(|skip| label_matches(rest, &label[skip..])),
        Some((first, rest)) => label
            .split_first()
            .is_some_and(|(c, label)| c == first && label_matches(rest, label)),
    }
}

/// `--allow-broker`: the brokers jobs may reach. Empty: any broker.
#[derive(Debug, Clone, Default)]
pub struct AllowedBrokers(Vec<BrokerPattern>);

impl AllowedBrokers {
    /// From the option's values; each may itself be comma-separated (the environment form).
    pub fn parse<S: AsRef<str>>(values: &[S]) -> Result<AllowedBrokers, PolicyError> {
        values
            .iter()
            .flat_map(|value| value.as_ref().split(','))
            .filter(|pattern| !pattern.trim().is_empty())
            .map(BrokerPattern::parse)
            .collect::<Result<_, _>>()
            .map(AllowedBrokers)
    }

    pub fn any() -> AllowedBrokers {
        AllowedBrokers(Vec::new())
    }

    pub fn permits(&self, broker: &Broker) -> bool {
        self.0.is_empty() || self.0.iter().any(|pattern| pattern.matches(broker))
    }

    /// A job's broker (after the merge) must match a pattern.
    pub fn check(&self, broker: &Broker) -> Result<(), JobError> {
        if self.permits(broker) {
            Ok(())
        } else {
            Err(refused(format!(
                "broker {broker} is not one this worker may reach (its --allow-broker \
                 patterns do not match it)"
            )))
        }
    }
}

/// The file keys a job body may name.
const FILE_KEYS: [&str; 3] = ["root-ca-crt", "certificate", "private-key"];

/// Which certificate and key paths a job body may name.
#[derive(Debug, Clone, Default)]
pub enum JobFiles {
    /// None (the worker's default): a job uses its connector's files or none.
    #[default]
    Forbidden,
    /// Only files inside this folder (canonical) once symlinks and `..` are resolved;
    /// relative paths are taken from it.
    Inside(PathBuf),
    /// Any path the process can read (`send`, run with the invoking user's rights).
    Any,
}

impl JobFiles {
    /// `--job-files DIR`: the folder must exist. It is remembered for the process, so that a
    /// job's file beneath it is read beneath it too ([`open_file`]).
    pub fn inside(dir: &Path) -> Result<JobFiles, PolicyError> {
        let dir = dir
            .canonicalize()
            .map_err(|source| PolicyError::JobFilesDir {
                dir: dir.to_owned(),
                source,
            })?;
        register_job_files_dir(&dir);
        Ok(JobFiles::Inside(dir))
    }

    /// Whether the job names any file at all (most do not: no file system work for them).
    pub fn applies_to(job: &Params) -> bool {
        job.root_ca_crt.is_some() || job.certificate.is_some() || job.private_key.is_some()
    }

    /// The job's file paths, opened beneath the allowed folder in one step (no symlink or `..`
    /// leads out), or the same refusal whatever the file system holds (the worker's disk is no
    /// oracle). A file inside that does not exist yet is allowed (it may be mounted later) and
    /// reported when read. Blocking: opens files.
    pub fn resolve(&self, mut job: Params) -> Result<Params, JobError> {
        let dir = match self {
            JobFiles::Any => return Ok(job),
            JobFiles::Inside(dir) => Some(dir),
            JobFiles::Forbidden => None,
        };
        for (key, path) in FILE_KEYS.into_iter().zip([
            &mut job.root_ca_crt,
            &mut job.certificate,
            &mut job.private_key,
        ]) {
            let Some(given) = path.take() else { continue };
            let resolved = dir.and_then(|dir| resolve_inside(dir, &given));
            *path = Some(resolved.ok_or_else(|| file_refused(key, dir.is_some()))?);
        }
        Ok(job)
    }
}

/// One message for every refused path, whatever the file system holds.
fn file_refused(key: &str, have_dir: bool) -> JobError {
    refused(if have_dir {
        format!("key {key:?}: a job may only name files inside this worker's --job-files folder")
    } else {
        format!(
            "key {key:?}: this worker does not accept file paths in jobs (it runs without \
             --job-files); use a connector that names the file"
        )
    })
}

/// The path a job's file is read from, if it lies inside `dir` (canonical): the real path of
/// the file opened beneath `dir`, or for a file not there yet the path as written beneath it.
/// An absolute path must be written under `dir`'s real path; relative ones are taken from it.
fn resolve_inside(dir: &Path, given: &Path) -> Option<PathBuf> {
    if dir == Path::new("/") {
        // Everything is beneath `/`; nothing to enforce.
        return Some(dir.join(given));
    }
    let joined = dir.join(given);
    let relative = beneath(dir, &joined)?;
    match open_beneath(dir, relative) {
        Ok(file) => {
            let real = real_path(&file).ok()?;
            inside(dir, &real).then_some(real)
        }
        // Missing, not escaping (an escape is EXDEV or ELOOP, however the target stands).
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => Some(dir.join(relative)),
        Err(_) => None,
    }
}

/// `path`'s part beneath `dir`, written without a way up; `None` if it is not lexically
/// beneath it.
fn beneath<'p>(dir: &Path, path: &'p Path) -> Option<&'p Path> {
    let relative = path.strip_prefix(dir).ok()?;
    (!relative.as_os_str().is_empty()).then_some(relative)
}

/// `path` (canonical) lies strictly inside `dir` (canonical).
fn inside(dir: &Path, path: &Path) -> bool {
    path.starts_with(dir) && path != dir
}

/// Every `--job-files` folder of this process (canonical). A worker usually has one; tests run
/// several in one process, and a file beneath any of them is read beneath it.
static JOB_FILES_DIRS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn register_job_files_dir(dir: &Path) {
    if dir == Path::new("/") {
        return;
    }
    let mut dirs = JOB_FILES_DIRS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if !dirs.iter().any(|known| known == dir) {
        dirs.push(dir.to_owned());
    }
}

/// Opens a certificate or key file for reading. A file beneath a `--job-files` folder is
/// opened beneath it in one step (`openat2` with `RESOLVE_BENEATH`): a symlink swapped in
/// after the job was admitted cannot lead out of the folder. Other paths (connectors, `send`)
/// are opened as written. Blocking.
pub fn open_file(path: &Path) -> std::io::Result<std::fs::File> {
    let dirs = JOB_FILES_DIRS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .clone();
    // The deepest folder holding the path decides (folders may nest).
    let holder = dirs
        .iter()
        .filter_map(|dir| beneath(dir, path).map(|relative| (dir, relative)))
        .max_by_key(|(dir, _)| dir.as_os_str().len());
    match holder {
        Some((dir, relative)) => open_beneath(dir, relative),
        None => std::fs::File::open(path),
    }
}

/// `relative` opened read-only beneath `dir`; a path that would leave it (`..`, an absolute
/// or escaping symlink, a magic link) fails with EXDEV or ELOOP.
fn open_beneath(dir: &Path, relative: &Path) -> std::io::Result<std::fs::File> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let dir = rustix::fs::open(
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
    let mut attempts = 0;
    loop {
        match rustix::fs::openat2(
            &dir,
            relative,
            OFlags::RDONLY | OFlags::CLOEXEC | OFlags::NOCTTY,
            Mode::empty(),
            resolve,
        ) {
            Ok(fd) => return Ok(std::fs::File::from(fd)),
            // The kernel asks for a retry when a rename raced the lookup.
            Err(rustix::io::Errno::AGAIN) if attempts < 8 => attempts += 1,
            Err(err) => return Err(err.into()),
        }
    }
}

/// The real path of an open file (its `/proc/self/fd` link).
fn real_path(file: &std::fs::File) -> std::io::Result<PathBuf> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::JobError;
    use serde_json::json;

    fn params(value: serde_json::Value) -> Params {
        Params::decode(value.to_string().as_bytes()).expect("valid params")
    }

    fn connector(value: serde_json::Value) -> Connector {
        crate::connectors::parse(&value.to_string(), &|_| None).expect("valid connector")
    }

    fn message(result: Result<impl std::fmt::Debug, JobError>) -> String {
        match result {
            Err(JobError::Invalid(message)) => message,
            other => panic!("expected a refusal, got {other:?}"),
        }
    }

    fn broker(url: &str) -> Broker {
        Broker::parse(url).expect("broker")
    }

    fn prod() -> Connector {
        connector(
            json!({"broker": "tcp://mqtt.prod:1883", "username": "produser",
                         "password": "s3cret-prod", "client-id": "c"}),
        )
    }

    #[test]
    fn a_job_that_redirects_a_connectors_password_is_refused_without_quoting_it() {
        let job = params(json!({"connector": "prod", "broker": "tcp://127.0.0.1:18999"}));
        let text = message(secrets_stay_with_broker(&job, "prod", &prod()));
        assert!(text.contains("password") && text.contains("prod"), "{text}");
        assert!(!text.contains("s3cret-prod"), "{text}");
    }

    #[test]
    fn the_connectors_own_broker_however_spelled_keeps_its_secrets() {
        for url in [
            "tcp://mqtt.prod:1883",
            "mqtt://MQTT.prod",
            "tcp://mqtt.prod",
        ] {
            let job = params(json!({"broker": url}));
            assert!(
                secrets_stay_with_broker(&job, "prod", &prod()).is_ok(),
                "{url}"
            );
        }
        for url in [
            "tcp://mqtt.prod:1884",
            "ssl://mqtt.prod:1883",
            "ws://mqtt.prod:1883",
            "tcp://mqtt.prod.evil:1883",
        ] {
            let job = params(json!({"broker": url}));
            assert!(
                secrets_stay_with_broker(&job, "prod", &prod()).is_err(),
                "{url}"
            );
        }
    }

    #[test]
    fn a_job_bringing_its_own_password_may_use_its_own_broker() {
        let job =
            params(json!({"broker": "tcp://other:1883", "username": "me", "password": "mine"}));
        assert!(secrets_stay_with_broker(&job, "prod", &prod()).is_ok());
    }

    #[test]
    fn a_connector_without_secrets_lends_its_defaults_to_any_broker() {
        let plain = connector(json!({"broker": "tcp://h:1883", "topic": "t", "username": "u"}));
        let job = params(json!({"broker": "tcp://elsewhere:1883"}));
        assert!(secrets_stay_with_broker(&job, "plain", &plain).is_ok());
    }

    #[test]
    fn a_connector_without_a_broker_lends_its_secrets_to_no_broker() {
        let secrets_only = connector(json!({"username": "u", "password": "p"}));
        let job = params(json!({"broker": "tcp://h:1883"}));
        assert!(secrets_stay_with_broker(&job, "s", &secrets_only).is_err());
    }

    #[test]
    fn client_certificates_stay_with_their_broker_unless_the_job_brings_both_files() {
        let aws = connector(json!({"broker": "ssl://a.iot.eu-west-1.amazonaws.com:8883",
            "use-certificate": true, "certificate": "/c.pem", "private-key": "/k.pem"}));
        let elsewhere = json!({"broker": "ssl://evil:8883"});
        assert!(
            message(secrets_stay_with_broker(
                &params(elsewhere.clone()),
                "aws",
                &aws
            ))
            .contains("certificate")
        );
        let mut half = elsewhere.clone();
        half["certificate"] = json!("/mine.pem");
        assert!(
            message(secrets_stay_with_broker(&params(half.clone()), "aws", &aws))
                .contains("private-key")
        );
        half["private-key"] = json!("/mine.key");
        assert!(secrets_stay_with_broker(&params(half), "aws", &aws).is_ok());
        let mut no_cert = elsewhere;
        no_cert["use-certificate"] = json!(false);
        assert!(secrets_stay_with_broker(&params(no_cert), "aws", &aws).is_ok());
    }

    #[test]
    fn job_may_set_allows_what_it_lists_and_names_the_key_and_connector_otherwise() {
        let locked = connector(json!({"broker": "tcp://h", "job-may-set": ["topic", "content"]}));
        let ok =
            params(json!({"connector": "locked", "action": "send", "topic": "t", "content": "x"}));
        assert!(job_may_set(&ok, "locked", &locked).is_ok());
        let bad = params(json!({"connector": "locked", "topic": "t", "qos": 0}));
        let text = message(job_may_set(&bad, "locked", &locked));
        assert!(
            text.contains("\"qos\"") && text.contains("\"locked\""),
            "{text}"
        );
        let open = connector(json!({"broker": "tcp://h"}));
        assert!(job_may_set(&bad, "open", &open).is_ok());
    }

    #[test]
    fn a_locked_connector_allows_requests_only_on_its_own_response_topic() {
        let locked = connector(json!({"broker": "tcp://h", "response-topic": "dev/answers",
                                      "job-may-set": ["content"]}));
        let own = params(json!({"connector": "locked", "action": "request", "content": "x"}));
        assert!(job_may_set(&own, "locked", &locked).is_ok());
        let elsewhere = params(json!({"connector": "locked", "action": "request",
                                      "response-topic": "other/secrets", "content": "x"}));
        let text = message(job_may_set(&elsewhere, "locked", &locked));
        assert!(text.contains("\"response-topic\""), "{text}");
        let listed = connector(json!({"broker": "tcp://h",
                                      "job-may-set": ["content", "response-topic"]}));
        assert!(job_may_set(&elsewhere, "listed", &listed).is_ok());
    }

    #[test]
    fn broker_patterns_match_hosts_label_by_label_and_ports() {
        let cases = [
            (
                "*.iot.eu-west-1.amazonaws.com:8883",
                "ssl://abc-ats.iot.eu-west-1.amazonaws.com:8883",
                true,
            ),
            (
                "*.iot.eu-west-1.amazonaws.com:8883",
                "ssl://abc.iot.eu-west-1.amazonaws.com:443",
                false,
            ),
            (
                "*.iot.eu-west-1.amazonaws.com:8883",
                "ssl://a.b.iot.eu-west-1.amazonaws.com:8883",
                false,
            ),
            (
                "*.iot.eu-west-1.amazonaws.com:8883",
                "ssl://iot.eu-west-1.amazonaws.com.evil:8883",
                false,
            ),
            ("mqtt.internal:*", "tcp://mqtt.internal:1", true),
            ("mqtt.internal:*", "tcp://mqtt.internalx:1883", false),
            ("10.0.0.7", "tcp://10.0.0.7:1883", true),
            ("10.0.0.7", "ssl://10.0.0.7:8883", true),
            ("10.0.0.7", "tcp://10.0.0.70:1883", false),
            ("MQTT.Example.com:1883", "tcp://mqtt.example.COM", true),
            ("broker-*.example.com", "tcp://broker-eu1.example.com", true),
            ("broker-*.example.com", "tcp://other.example.com", false),
            ("[::1]:1883", "tcp://[::1]:1883", true),
            ("[::1]", "tcp://[::2]:1883", false),
        ];
        for (pattern, url, expected) in cases {
            let pattern_parsed = BrokerPattern::parse(pattern).expect(pattern);
            assert_eq!(
                pattern_parsed.matches(&broker(url)),
                expected,
                "{pattern} vs {url}"
            );
        }
    }

    #[test]
    fn bad_patterns_are_refused_at_start() {
        for pattern in ["", "tcp://h:1883", "h:0", "h:x", "::1", "[::1", "u@h"] {
            assert!(BrokerPattern::parse(pattern).is_err(), "{pattern:?}");
        }
    }

    #[test]
    fn an_allow_list_from_the_environment_is_comma_separated() {
        let allowed =
            AllowedBrokers::parse(&["a.example:1883,b.example", "c.example"]).expect("ok");
        assert!(allowed.permits(&broker("tcp://b.example:9999")));
        assert!(allowed.permits(&broker("tcp://c.example")));
        let text = message(allowed.check(&broker("tcp://d.example:1883")));
        assert!(
            text.contains("d.example:1883") && text.contains("--allow-broker"),
            "{text}"
        );
        assert!(AllowedBrokers::any().permits(&broker("tcp://anything")));
    }

    #[test]
    fn job_files_are_refused_alike_whether_or_not_they_exist() {
        let job = params(json!({"root-ca-crt": "/etc/hostname"}));
        let missing = params(json!({"root-ca-crt": "/etc/no-such-file"}));
        let a = message(JobFiles::Forbidden.resolve(job));
        let b = message(JobFiles::Forbidden.resolve(missing));
        assert_eq!(a, b);
        assert!(a.contains("--job-files"), "{a}");
    }

    #[test]
    fn job_files_resolve_inside_the_folder_only() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("certs");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(dir.join("ca.pem"), "x").expect("write");
        std::fs::write(root.path().join("outside.pem"), "x").expect("write");
        std::os::unix::fs::symlink(root.path().join("outside.pem"), dir.join("link.pem"))
            .expect("symlink");
        let files = JobFiles::inside(&dir).expect("dir");
        let canonical = dir.canonicalize().expect("canonical");
        let resolve = |path: &Path| {
            files.resolve(Params {
                certificate: Some(path.to_owned()),
                ..Params::default()
            })
        };
        let ok = resolve(&dir.join("ca.pem")).expect("inside");
        assert_eq!(ok.certificate, Some(canonical.join("ca.pem")));
        let relative = resolve(Path::new("ca.pem")).expect("relative");
        assert_eq!(relative.certificate, Some(canonical.join("ca.pem")));
        // Inside but not there (yet): allowed here, reported when the file is read.
        assert!(resolve(&dir.join("later.pem")).is_ok());
        let refusals: Vec<String> = [
            root.path().join("outside.pem"),
            dir.join("../outside.pem"),
            dir.join("link.pem"),
            root.path().join("missing.pem"),
            PathBuf::from("/etc/shadow"),
            dir.clone(),
        ]
        .iter()
        .map(|path| message(resolve(path)))
        .collect();
        assert!(
            refusals.iter().all(|text| *text == refusals[0]),
            "{refusals:?}"
        );
        assert!(refusals[0].contains("--job-files"), "{}", refusals[0]);
    }

    #[test]
    fn a_dangling_symlink_out_is_refused_like_a_live_one() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("certs");
        std::fs::create_dir(&dir).expect("mkdir");
        std::fs::write(root.path().join("outside.pem"), "x").expect("write");
        std::os::unix::fs::symlink(root.path().join("outside.pem"), dir.join("live.pem"))
            .expect("symlink");
        std::os::unix::fs::symlink(root.path().join("gone.pem"), dir.join("dangling.pem"))
            .expect("symlink");
        std::os::unix::fs::symlink("../gone.pem", dir.join("dangling-relative.pem"))
            .expect("symlink");
        let files = JobFiles::inside(&dir).expect("dir");
        let resolve = |name: &str| {
            message(files.resolve(Params {
                root_ca_crt: Some(dir.join(name)),
                ..Params::default()
            }))
        };
        let live = resolve("live.pem");
        assert!(live.contains("--job-files"), "{live}");
        assert_eq!(resolve("dangling.pem"), live);
        assert_eq!(resolve("dangling-relative.pem"), live);
    }

    #[test]
    fn a_symlink_swapped_in_after_admission_does_not_lead_out_when_the_file_is_read() {
        let root = tempfile::tempdir().expect("tempdir");
        let dir = root.path().join("certs");
        std::fs::create_dir_all(dir.join("sub")).expect("mkdir");
        std::fs::write(dir.join("sub/ca.pem"), "inside").expect("write");
        std::fs::create_dir(root.path().join("elsewhere")).expect("mkdir");
        std::fs::write(root.path().join("elsewhere/ca.pem"), "outside").expect("write");
        let files = JobFiles::inside(&dir).expect("dir");
        let admitted = files
            .resolve(Params {
                root_ca_crt: Some("sub/ca.pem".into()),
                ..Params::default()
            })
            .expect("inside")
            .root_ca_crt
            .expect("path");
        let read = |path: &Path| {
            open_file(path).and_then(|mut file| {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut file, &mut text).map(|_| text)
            })
        };
        assert_eq!(read(&admitted).expect("read"), "inside");
        // The folder on the admitted path becomes a symlink out, after admission.
        std::fs::rename(dir.join("sub"), dir.join("old")).expect("rename");
        std::os::unix::fs::symlink(root.path().join("elsewhere"), dir.join("sub"))
            .expect("symlink");
        let err = read(&admitted).expect_err("refused beneath the folder");
        assert_eq!(
            err.raw_os_error(),
            Some(rustix::io::Errno::XDEV.raw_os_error()),
            "{err}"
        );
        // A path outside every --job-files folder (a connector's) is read as written.
        assert_eq!(
            read(&root.path().join("elsewhere/ca.pem")).expect("read"),
            "outside"
        );
    }

    #[test]
    fn send_accepts_any_path() {
        let job = params(json!({"private-key": "/anywhere/k.pem"}));
        assert!(JobFiles::Any.resolve(job).is_ok());
    }
}
