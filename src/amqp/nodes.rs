//! The RabbitMQ nodes to connect to: `--amqp-url` as one URL or a comma-separated list of one
//! cluster's nodes, plus the TLS configuration for `amqps://`. lapin takes one URI per
//! connection, so trying the next node when one does not answer is ours. URLs are parsed with
//! the `url` crate and the address handed to lapin by us: amq-protocol-uri reads the host with
//! `Url::domain()`, which is `None` for an IP literal, and then silently uses `localhost`.

use std::sync::Arc;
use std::time::Duration;

use lapin::tcp::{AsyncTcpStream, RustlsConnector};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{Connection, ConnectionProperties};

use super::tls::{TlsError, TlsFiles};

/// Bounds one connection attempt (TCP, TLS, AMQP handshake), so a node that never answers
/// cannot hold the worker.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Why `--amqp-url` and the TLS options cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum NodesError {
    #[error("--amqp-url is empty: give one URL or a comma-separated list")]
    Empty,
    // The URL itself is never shown: a list split inside a password (a raw comma) would print
    // the password's halves. Its position in the list is enough to find it.
    #[error(
        "--amqp-url: URL {item} of {count} is not a valid AMQP URL: {reason} (not shown: it may hold a password; a comma in a password is written %2C)"
    )]
    BadUrl {
        item: usize,
        count: usize,
        reason: BadUrl,
    },
    #[error("--amqp-ca, --amqp-cert and --amqp-key are for amqps:// URLs; none is given")]
    TlsWithoutAmqps,
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// What is wrong with one URL of the list, in words that repeat none of it.
#[derive(Debug, thiserror::Error)]
pub enum BadUrl {
    #[error("{0}")]
    Syntax(#[source] url::ParseError),
    #[error("the scheme must be amqp:// or amqps://")]
    Scheme,
    #[error("the user name or password is not valid percent-encoded UTF-8")]
    Userinfo,
    #[error("the virtual host is not valid percent-encoded UTF-8")]
    Vhost,
    #[error(
        "a query parameter is not valid (frame_max, channel_max, heartbeat, connection_timeout: numbers; auth_mechanism: plain, amqplain, external, anonymous)"
    )]
    Query,
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

/// One URL of the list as lapin's `AMQPUri`, its host taken from the parsed URL: a domain as
/// written, an IP address without brackets (what `lookup_host` and TLS server names take).
fn parse_node(text: &str) -> Result<Node, BadUrl> {
    let url = url::Url::parse(text).map_err(BadUrl::Syntax)?;
    let scheme = match url.scheme() {
        "amqp" => AMQPScheme::AMQP,
        "amqps" => AMQPScheme::AMQPS,
        _ => return Err(BadUrl::Scheme),
    };
    if url.cannot_be_a_base() {
        return Err(BadUrl::Syntax(url::ParseError::EmptyHost));
    }
    let host = match url.host() {
        Some(url::Host::Domain(domain)) => domain.to_owned(),
        Some(url::Host::Ipv4(address)) => address.to_string(),
        Some(url::Host::Ipv6(address)) => address.to_string(),
        // `amqp:///vhost`: the AMQP URI spec's default host.
        None => "localhost".to_owned(),
    };
    let decode = |part: &str| {
        percent_encoding::percent_decode_str(part)
            .decode_utf8()
            .map(|text| text.into_owned())
    };
    let defaults = AMQPUri::default();
    let username = match url.username() {
        "" => defaults.authority.userinfo.username.clone(),
        name => decode(name).map_err(|_| BadUrl::Userinfo)?,
    };
    let password = match url.password() {
        None => defaults.authority.userinfo.password.clone(),
        Some(password) => decode(password).map_err(|_| BadUrl::Userinfo)?,
    };
    let vhost = decode(url.path().get(1..).unwrap_or("/")).map_err(|_| BadUrl::Vhost)?;
    // The query parameters as amq-protocol-uri reads them, from the query alone: its errors
    // hold no part of the URL, and a URL without userinfo holds no password.
    let query = match url.query() {
        Some(query) => {
            format!("amqp://h/?{query}")
                .parse::<AMQPUri>()
                .map_err(|_| BadUrl::Query)?
                .query
        }
        None => Default::default(),
    };
    let port = url.port().unwrap_or_else(|| scheme.default_port());
    let shown = shown_url(&url);
    Ok(Node {
        uri: AMQPUri {
            scheme,
            authority: lapin::uri::AMQPAuthority {
                userinfo: lapin::uri::AMQPUserInfo { username, password },
                host,
                port,
            },
            vhost,
            query,
        },
        shown,
    })
}

/// The URL as it may be logged: a password, if any, replaced by `***`.
fn shown_url(url: &url::Url) -> String {
    let mut shown = url.clone();
    if shown.password().is_some() {
        // Cannot fail for a URL with a host, which a password implies.
        let _ = shown.set_password(Some("***"));
    }
    shown.to_string()
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
    /// Parses `urls` (comma-separated; a comma inside a password is written `%2C`) and reads the
    /// TLS files if any URL is `amqps://`. Blocking file reads: call at start-up.
    pub fn parse(urls: &str, tls: &TlsFiles) -> Result<Nodes, NodesError> {
        let items: Vec<&str> = urls
            .split(',')
            .map(str::trim)
            .filter(|url| !url.is_empty())
            .collect();
        let count = items.len();
        let nodes = items
            .iter()
            .enumerate()
            .map(|(index, url)| {
                parse_node(url).map_err(|reason| NodesError::BadUrl {
                    item: index + 1,
                    count,
                    reason,
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
    fn a_bad_url_is_named_by_its_place_without_any_of_it() {
        let err = Nodes::parse(
            "amqp://h/%2f,amqp://guest:hunter2@h:notaport/%2f",
            &TlsFiles::default(),
        )
        .expect_err("bad port");
        let text = err.to_string();
        assert!(text.contains("URL 2 of 2"), "{text}");
        assert!(
            !text.contains("hunter2") && !text.contains("guest"),
            "{text}"
        );
    }

    #[test]
    fn an_ipv6_node_is_connected_to_at_its_address_not_localhost() {
        let nodes = Nodes::parse(
            "amqp://guest:pw@[fd00::10]:5673/%2f,amqps://[::1]/v",
            &TlsFiles::default(),
        );
        // amqps:// reads the system roots; this machine may have none, so check amqp:// alone.
        let nodes = match nodes {
            Ok(nodes) => nodes,
            Err(NodesError::Tls(_)) => {
                Nodes::parse("amqp://guest:pw@[fd00::10]:5673/%2f", &TlsFiles::default())
                    .expect("parse")
            }
            Err(err) => panic!("{err}"),
        };
        let uri = &nodes.nodes[0].uri;
        assert_eq!(uri.authority.host, "fd00::10");
        assert_eq!(uri.authority.port, 5673);
        assert_eq!(uri.vhost, "/");
        assert_eq!(nodes.shown(0), "amqp://guest:***@[fd00::10]:5673/%2f");
    }

    #[test]
    fn ip_v4_literals_and_names_keep_their_host() {
        let nodes = Nodes::parse(
            "amqp://127.0.0.2:5999/vh,amqp://rabbit-0.rabbit/",
            &TlsFiles::default(),
        )
        .expect("parse");
        assert_eq!(nodes.nodes[0].uri.authority.host, "127.0.0.2");
        assert_eq!(nodes.nodes[0].uri.authority.port, 5999);
        assert_eq!(nodes.nodes[0].uri.vhost, "vh");
        assert_eq!(nodes.nodes[0].uri.authority.userinfo.username, "guest");
        assert_eq!(nodes.nodes[1].uri.authority.host, "rabbit-0.rabbit");
        assert_eq!(nodes.nodes[1].uri.authority.port, 5672);
    }

    #[test]
    fn a_comma_in_a_password_is_written_percent_2c_and_never_shown() {
        let nodes = Nodes::parse(
            "amqp://u%40x:pa%2Css%3Aw@h/%2f?heartbeat=7&auth_mechanism=plain,amqp://h2",
            &TlsFiles::default(),
        )
        .expect("parse");
        assert_eq!(nodes.len(), 2);
        let info = &nodes.nodes[0].uri.authority.userinfo;
        assert_eq!(
            (info.username.as_str(), info.password.as_str()),
            ("u@x", "pa,ss:w")
        );
        assert_eq!(nodes.nodes[0].uri.query.heartbeat, Some(7));
        assert!(!nodes.shown_all().contains("pa"), "{}", nodes.shown_all());
    }

    #[test]
    fn a_raw_comma_in_a_password_prints_no_fragment_of_it() {
        for urls in [
            "amqp://guest:sec,ret@h:5672/%2f",
            "amqp://guest:123,456@h/%2f",
            "amqp://guest:s,x:y@h/%2f",
        ] {
            let err = Nodes::parse(urls, &TlsFiles::default()).expect_err(urls);
            let text = err.to_string();
            for fragment in ["sec", "ret", "123", "456", "x:y"] {
                assert!(!text.contains(fragment), "{text}");
            }
            assert!(text.contains("%2C"), "{text}");
        }
    }

    #[test]
    fn a_bad_query_or_scheme_is_refused_without_echoing_it() {
        for urls in [
            "amqp://h/?heartbeat=zzz",
            "http://u:zzz@h/",
            "amqp://h/?auth_mechanism=zzz",
        ] {
            let text = Nodes::parse(urls, &TlsFiles::default())
                .expect_err(urls)
                .to_string();
            assert!(!text.contains("zzz"), "{text}");
        }
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
