//! The RabbitMQ nodes to connect to: `--amqp-url` as one URL or a comma-separated list of one
//! cluster's nodes, plus the TLS configuration for `amqps://`. lapin takes one URI per
//! connection, so trying the next node when one does not answer is ours.

use std::sync::Arc;
use std::time::Duration;

use lapin::tcp::{AsyncTcpStream, RustlsConnector};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};

use super::redact_url;
use super::tls::{TlsError, TlsFiles};

/// Bounds one connection attempt (TCP, TLS, AMQP handshake), so a node that never answers
/// cannot hold the worker.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why `--amqp-url` and the TLS options cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NodesError {
    #[error("--amqp-url is empty: give one URL or a comma-separated list")]
    Empty,
    // The parser's reason is all amq-protocol-uri gives (a String); the URL is shown redacted.
    #[error("--amqp-url {url}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error("--amqp-ca, --amqp-cert and --amqp-key are for amqps:// URLs; none is given")]
    TlsWithoutAmqps,
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Why one node could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{node}: {source}")]
    Failed {
        node: String,
        #[source]
        source: lapin::Error,
    },
    #[error("{node}: no answer within {after:?}")]
    Timeout { node: String, after: Duration },
}

/// No node answered; holds why for each, the last one as the source.
#[derive(Debug, thiserror::Error)]
#[error("no RabbitMQ node answered ({}): {}", .tried.len(), .tried.iter().map(|e| super::error_chain(e)).collect::<Vec<_>>().join("; "))]
pub struct AllNodesFailed {
    pub tried: Vec<NodeError>,
}

/// The TLS handshake step of a connection failed (wrong CA, expired or refused certificate).
#[derive(Debug, thiserror::Error)]
#[error("TLS handshake with {host}:{port} failed")]
struct TlsHandshakeFailed {
    host: String,
    port: u16,
    #[source]
    source: std::io::Error,
}

struct Node {
    uri: AMQPUri,
    /// The URL with its password replaced, for logs.
    shown: String,
}

/// One cluster's nodes, in the order given.
#[derive(Clone)]
pub struct Nodes {
    nodes: Arc<[Node]>,
    tls: Option<Arc<rustls::ClientConfig>>,
    name: String,
}

impl std::fmt::Debug for Nodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.nodes.iter().map(|node| &node.shown))
            .finish()
    }
}

impl Nodes {
    /// Parses `urls` (comma-separated) and reads the TLS files if any URL is `amqps://`.
    /// Blocking file reads: call at start-up.
    pub fn parse(urls: &str, tls: &TlsFiles) -> Result<Nodes, NodesError> {
        let nodes = urls
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .map(|url| {
                let shown = redact_url(url);
                url.parse::<AMQPUri>()
                    .map(|uri| Node {
                        uri,
                        shown: shown.clone(),
                    })
                    .map_err(|reason| NodesError::BadUrl {
                        reason: reason.replace(url, &shown),
                        url: shown,
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if nodes.is_empty() {
            return Err(NodesError::Empty);
        }
        let any_tls = nodes
            .iter()
            .any(|node| node.uri.scheme == AMQPScheme::AMQPS);
        let tls = match (any_tls, tls.is_empty()) {
            (true, _) => Some(tls.client_config()?),
            (false, true) => None,
            (false, false) => return Err(NodesError::TlsWithoutAmqps),
        };
        Ok(Nodes {
            nodes: nodes.into(),
            tls,
            name: "mqtt-connector".into(),
        })
    }

    /// The connection name RabbitMQ shows for our connections (management UI, `rabbitmqctl
    /// list_connections client_properties`).
    pub fn with_connection_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Node `index` (modulo the count) as it may be logged.
    pub fn shown(&self, index: usize) -> &str {
        &self.nodes[index % self.nodes.len()].shown
    }

    /// Every node as it may be logged, comma-separated.
    pub fn shown_all(&self) -> String {
        self.nodes
            .iter()
            .map(|node| node.shown.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Connects to the first node that answers, trying them in order from `start`; returns the
    /// connection and the index of the node it reached.
    pub async fn connect(&self, start: usize) -> Result<(Connection, usize), AllNodesFailed> {
        let mut tried = Vec::new();
        for step in 0..self.nodes.len() {
            let index = (start + step) % self.nodes.len();
            match self.connect_to(index).await {
                Ok(connection) => return Ok((connection, index)),
                Err(err) => {
                    tracing::debug!(error = %super::error_chain(&err), "RabbitMQ node did not answer");
                    tried.push(err);
                }
            }
        }
        Err(AllNodesFailed { tried })
    }

    /// Connects to node `index` (bounded by [`CONNECT_TIMEOUT`]).
    pub async fn connect_to(&self, index: usize) -> Result<Connection, NodeError> {
        let node = &self.nodes[index % self.nodes.len()];
        let tls = self.tls.clone();
        let runtime = lapin::runtime::default_runtime().map_err(|source| NodeError::Failed {
            node: node.shown.clone(),
            source,
        })?;
        let properties =
            ConnectionProperties::default().with_connection_name(self.name.as_str().into());
        // Our own transport instead of lapin's: the server is verified against exactly the
        // roots we loaded (lapin's own TLS adds a CA to the system's roots).
        let connect = Connection::connector(
            node.uri.clone(),
            runtime,
            async move |uri: AMQPUri, runtime| {
                let host = uri.authority.host.clone();
                let port = uri.authority.port;
                let addresses: Vec<std::net::SocketAddr> =
                    tokio::net::lookup_host((host.as_str(), port))
                        .await?
                        .collect();
                let stream = AsyncTcpStream::connect(&runtime, addresses).await?;
                match (uri.scheme, &tls) {
                    (AMQPScheme::AMQP, _) => Ok(stream),
                    (AMQPScheme::AMQPS, Some(config)) => stream
                        .into_rustls(&RustlsConnector::from(Arc::clone(config)), &host)
                        .await
                        .map_err(|source| {
                            std::io::Error::new(
                                source.kind(),
                                TlsHandshakeFailed { host, port, source },
                            )
                            .into()
                        }),
                    (AMQPScheme::AMQPS, None) => {
                        Err(std::io::Error::other("amqps:// without a TLS configuration").into())
                    }
                }
            },
            properties,
        );
        match tokio::time::timeout(CONNECT_TIMEOUT, connect).await {
            Ok(Ok(connection)) => Ok(connection),
            Ok(Err(source)) => Err(NodeError::Failed {
                node: node.shown.clone(),
                source,
            }),
            Err(_) => Err(NodeError::Timeout {
                node: node.shown.clone(),
                after: CONNECT_TIMEOUT,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_list_of_urls_is_one_node_each_in_order() {
        let nodes = Nodes::parse(
            "amqp://u:secret@a:5672/%2f, amqp://u:secret@b:5673/%2f,amqp://c",
            &TlsFiles::default(),
        )
        .expect("parse");
        assert_eq!(nodes.len(), 3);
        assert_eq!(nodes.shown(0), "amqp://u:***@a:5672/%2f");
        assert_eq!(nodes.shown(4), "amqp://u:***@b:5673/%2f");
        assert!(!format!("{nodes:?} {}", nodes.shown_all()).contains("secret"));
    }

    #[test]
    fn an_empty_list_is_refused() {
        assert!(matches!(
            Nodes::parse(" , ", &TlsFiles::default()),
            Err(NodesError::Empty)
        ));
    }

    #[test]
    fn a_bad_url_is_named_without_its_password() {
        let err = Nodes::parse("amqp://guest:hunter2@h:notaport/%2f", &TlsFiles::default())
            .expect_err("bad port");
        let text = err.to_string();
        assert!(text.contains("amqp://guest:***@h:notaport"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn tls_options_without_an_amqps_url_are_refused() {
        let files = TlsFiles {
            ca: Some("/tmp/ca.pem".into()),
            ..TlsFiles::default()
        };
        assert!(matches!(
            Nodes::parse("amqp://h", &files),
            Err(NodesError::TlsWithoutAmqps)
        ));
    }

    #[tokio::test]
    async fn every_node_is_tried_and_each_failure_reported() {
        // Two closed ports on loopback: refused at once.
        let ports: Vec<u16> = (0..2)
            .map(|_| {
                let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
                listener.local_addr().expect("addr").port()
            })
            .collect();
        let urls = format!(
            "amqp://guest:pw@127.0.0.1:{}/%2f,amqp://guest:pw@127.0.0.1:{}/%2f",
            ports[0], ports[1]
        );
        let nodes = Nodes::parse(&urls, &TlsFiles::default()).expect("parse");
        let err = nodes.connect(1).await.expect_err("nothing listens");
        assert_eq!(err.tried.len(), 2);
        let text = err.to_string();
        assert!(text.contains(&ports[0].to_string()) && text.contains(&ports[1].to_string()));
        assert!(!text.contains(":pw@"), "{text}");
    }
}
