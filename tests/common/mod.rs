//! Integration-test harness for `mqtt-connector`.
//!
//! Everything a test needs around the worker, with real brokers wherever possible:
//!
//! - [`free_port`], [`unique_name`], [`write_connector`], [`install_crypto_provider`]: small
//!   helpers (this file).
//! - [`certs`]: a CA, a server certificate for `localhost`/`127.0.0.1`, client certificates in
//!   the three PEM key formats (PKCS#1 RSA, PKCS#8, SEC1 EC), an unrelated second CA and a client
//!   signed by it; generated with the `openssl` CLI ([`Certs::generate`], [`Certs::shared`]).
//! - [`amqtt`]: an amqtt broker (Python) with TCP, `ws` and `wss` listeners, for MQTT over
//!   websockets (Mosquitto here has none).
//! - [`mosquitto`]: a Mosquitto broker process owned by the test, on its own port and config
//!   ([`Mosquitto::plain`], [`Mosquitto::with_password`], [`Mosquitto::with_acl`],
//!   [`Mosquitto::tls`], [`Mosquitto::mutual_tls`]), which can be killed, restarted, frozen and
//!   thawed.
//! - [`mqtt`]: an MQTT [`Subscriber`] that collects what the worker published, and a
//!   [`Publisher`] that connects (or reports why it could not) and publishes with tracked acks.
//! - [`mqtt5`]: an MQTT 5 [`Subscriber5`] that records each publish with its MQTT 5 properties.
//! - [`amqp`]: the RabbitMQ side: [`Amqp`] (send jobs, declare/delete/count queues) and
//!   [`ReplyStream`] (await the worker's [`Reply`]s).
//! - [`rabbitmq`]: private RabbitMQ nodes and clusters ([`RabbitCluster`]) on their own ports,
//!   names, data directories and cookie, killed on drop (never the shared node on 5672).
//! - [`proxy`]: a [`TcpProxy`] between the worker and a broker that can cut, stall and refuse
//!   connections.
//! - [`prometheus`]: a real Prometheus server ([`prometheus::Prometheus`]) scraping workers,
//!   queried through its HTTP API; [`dashboard`]: the PromQL of the Grafana dashboard and of the
//!   alert rules.
//! - [`child`]: the worker as a child process ([`child::ChildWorker`]), configured through
//!   `MQTT_CONNECTOR_*` variables, for tests that need its exit status, signals, fds, RSS or
//!   logs (the benchmark includes the same file).
//! - [`device`]: a [`Device`] that answers `request` commands (MQTT 5 client; answers 3.1.1
//!   workers on the topic the command names).
//! - [`mock`]: fake brokers for the failures a real broker cannot produce ([`SilentServer`],
//!   [`ConnackThenSilent`], [`ConnackThenClose`], [`DisconnectOnPublish5`]).
//!
//! Every wait in the harness has a deadline; helpers panic with a message that says what was
//! awaited (and, for Mosquitto, the tail of its log) rather than hang.
#![allow(dead_code)]
#![allow(unused_imports)]

pub mod amqp;
pub mod amqtt;
pub mod certs;
pub mod child;
pub mod dashboard;
pub mod device;
pub mod http;
pub mod mock;
pub mod mosquitto;
pub mod mqtt;
pub mod mqtt5;
pub mod prometheus;
pub mod proxy;
pub mod rabbitmq;
pub mod worker;

pub use amqp::{Amqp, Message, Reply, ReplyStream, amqp_url};
pub use certs::{Certs, ClientCert};
pub use child::ChildWorker;
pub use device::Device;
pub use mock::{ConnackThenClose, ConnackThenSilent, DisconnectOnPublish5, SilentServer};
pub use mosquitto::Mosquitto;
pub use mqtt::{Publisher, Received, Subscriber, mqtt_options, tls_options};
pub use mqtt5::{Received5, Subscriber5};
pub use proxy::TcpProxy;
pub use rabbitmq::{RabbitCluster, RabbitConfig};

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::sync::Once;

/// A TCP port on 127.0.0.1 that was free a moment ago: binds `127.0.0.1:0`, reads the port the
/// kernel chose and releases it. Another process may take it before you bind it; the harness'
/// own servers bind it at once (and [`Mosquitto`] retries with another port if it lost the race).
pub fn free_port() -> u16 {
    TcpListener::bind(("127.0.0.1", 0))
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local_addr")
        .port()
}

/// `prefix` followed by `-` and a random UUID (simple form), so that tests running in parallel
/// never share a queue, topic or client id. Example: `unique_name("jobs")` →
/// `jobs-6f1c0e2a9b3d4c5e8f7a6b5c4d3e2f1a`.
pub fn unique_name(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// Writes `json` (pretty-printed) to `dir/NAME.json`, creating `dir` if needed, the way a
/// connector lives in `config/connectors/NAME.json`. Returns the file's path.
pub fn write_connector(dir: &Path, name: &str, json: serde_json::Value) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    let path = dir.join(format!("{name}.json"));
    let text = serde_json::to_string_pretty(&json).expect("serialize connector");
    std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

/// Installs rustls' `ring` crypto provider as the process default, once. rumqttc's TLS transport
/// needs a process-wide provider; calling this more than once (or after someone else installed
/// one) is harmless.
pub fn install_crypto_provider() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}
