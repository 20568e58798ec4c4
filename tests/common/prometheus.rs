//! A real Prometheus server owned by one test (`/usr/bin/prometheus`, Debian package
//! `prometheus`), scraping the given targets every second, on a free port of 127.0.0.1 with its
//! own config and TSDB in a temporary directory. Killed when dropped.
//!
//! No Prometheus binary is a test failure, not a skip: CI installs the package (`.ci/run`).

use super::free_port;
use super::http;
use serde_json::Value as Json;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;
use tokio::time::Instant;

/// A running Prometheus; see the module docs.
pub struct Prometheus {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    child: Child,
}

/// `/usr/bin/NAME` or NAME on `PATH`; panics with how to install it otherwise.
pub fn prometheus_binary(name: &str) -> PathBuf {
    let debian = Path::new("/usr/bin").join(name);
    if debian.is_file() {
        return debian;
    }
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|path| std::env::split_paths(&path).collect::<Vec<_>>())
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!(
                "{name} not found (neither /usr/bin/{name} nor on PATH): install the Debian \
                 package `prometheus` (`apt-get install --no-install-recommends prometheus`, as \
                 .ci/run does)"
            )
        })
}

impl Prometheus {
    /// Starts Prometheus scraping `targets` (job `mqtt-connector`, every second) and returns
    /// once `/-/ready` answers 200 and every target is up (`up == 1`); panics (with the tail of
    /// Prometheus' log) after 60 s.
    pub async fn start(targets: &[SocketAddr]) -> Prometheus {
        let binary = prometheus_binary("prometheus");
        let dir = tempfile::Builder::new()
            .prefix("prometheus-")
            .tempdir()
            .expect("create prometheus dir");
        let targets_yaml: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             scrape_configs:\n  - job_name: mqtt-connector\n    static_configs:\n      \
             - targets: [{}]\n",
            targets_yaml.join(", ")
        );
        let config_path = dir.path().join("prometheus.yml");
        std::fs::write(&config_path, config).expect("write prometheus.yml");

        // The port may be taken between free_port() and Prometheus' bind: try another one.
        let log_path = dir.path().join("prometheus.log");
        let mut attempt = 0;
        let (addr, child) = loop {
            attempt += 1;
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let log = std::fs::File::create(&log_path).expect("create prometheus.log");
            let mut child = Command::new(&binary)
                .arg(format!("--config.file={}", config_path.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("clone log handle"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("start {}: {e}", binary.display()));
            match wait_ready(&mut child, addr, Duration::from_secs(30)).await {
                Ok(()) => break (addr, child),
                Err(exited) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    assert!(
                        exited && attempt < 5,
                        "Prometheus on {addr} not ready within 30 s (attempt {attempt}); log:\n{}",
                        tail(&log_path)
                    );
                }
            }
        };
        let prometheus = Prometheus { dir, addr, child };
        prometheus
            .wait_targets_up(targets.len(), Duration::from_secs(30))
            .await;
        prometheus
    }

    /// Waits until `n` targets of job `mqtt-connector` report `up == 1`.
    async fn wait_targets_up(&self, n: usize, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let last = self.query(r#"up{job="mqtt-connector"} == 1"#).await;
            if matches!(&last, Ok(result) if result.len() == n) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{n} target(s) not up in Prometheus within {within:?}; last `up` query: {last:?}; \
                 /api/v1/targets: {:?}\nlog:\n{}",
                http::get(self.addr, "/api/v1/targets").await,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Where Prometheus listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// An instant query: the `data.result` array, or why there is none (HTTP error, PromQL
    /// error, not JSON).
    pub async fn query(&self, expr: &str) -> Result<Vec<Json>, String> {
        let path = format!("/api/v1/query?query={}", percent_encode(expr));
        let (status, body) = http::get(self.addr, &path).await?;
        let json: Json = serde_json::from_str(&body)
            .map_err(|e| format!("HTTP {status}, not JSON ({e}): {body}"))?;
        if status != 200 || json["status"] != "success" {
            return Err(format!("HTTP {status}: {json}"));
        }
        json["data"]["result"]
            .as_array()
            .cloned()
            .ok_or_else(|| format!("no data.result array: {json}"))
    }

    /// The last 40 lines of Prometheus' log.
    pub fn log_tail(&self) -> String {
        tail(&self.dir.path().join("prometheus.log"))
    }
}

fn tail(log: &Path) -> String {
    let log = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Polls `/-/ready` until 200; `Err(true)` if the process exited first, `Err(false)` on timeout.
async fn wait_ready(child: &mut Child, addr: SocketAddr, within: Duration) -> Result<(), bool> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Some(_)) = child.try_wait() {
            return Err(true);
        }
        if matches!(http::get(addr, "/-/ready").await, Ok((200, _))) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(false);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes everything but RFC 3986's unreserved characters.
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The sample values of an instant-query result (`value: [time, "text"]`), parsed as `f64`
/// (`NaN`, `+Inf` included).
pub fn sample_values(result: &[Json]) -> Vec<f64> {
    result
        .iter()
        .filter_map(|sample| sample["value"][1].as_str()?.parse::<f64>().ok())
        .collect()
}
