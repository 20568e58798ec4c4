//! Where a job goes: a broker address from a `scheme://host:port` URL, and its transport.

use std::fmt;

use super::{JobError, invalid, quote_limited};

/// How bytes reach the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    /// MQTT over TCP (`tcp://`, `mqtt://`).
    Tcp,
    /// MQTT over TLS (`ssl://`, `mqtts://`, `tls://`).
    Tls,
    /// MQTT over a websocket (`ws://`).
    Ws,
    /// MQTT over a websocket over TLS (`wss://`).
    Wss,
}

impl Transport {
    /// Whether the connection is encrypted (and the TLS keys of a job apply).
    pub fn is_tls(self) -> bool {
        matches!(self, Transport::Tls | Transport::Wss)
    }

    /// Whether MQTT travels in websocket frames.
    pub fn is_websocket(self) -> bool {
        matches!(self, Transport::Ws | Transport::Wss)
    }

    /// The contract's default ports: 1883 plain, 8883 TLS (websockets included).
    pub fn default_port(self) -> u16 {
        if self.is_tls() { 8883 } else { 1883 }
    }

    /// The canonical scheme, as it starts a URL.
    pub fn scheme(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls => "ssl",
            Transport::Ws => "ws",
            Transport::Wss => "wss",
        }
    }
}

/// The websocket path when a `ws://` or `wss://` URL names none (AWS IoT and most brokers).
pub const DEFAULT_WEBSOCKET_PATH: &str = "/mqtt";

/// A broker address from a `scheme://host:port` URL (`scheme://host:port/path` for websockets).
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Broker {
    pub transport: Transport,
    pub host: String,
    pub port: u16,
    /// The HTTP path (and query) of the websocket upgrade, starting with `/`; `None` for MQTT
    /// over TCP or TLS.
    pub path: Option<String>,
}

/// Without the query of a websocket path: it may carry a token (AWS IoT custom authorizers).
impl fmt::Debug for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let path = self
            .path
            .as_deref()
            .map(|path| path.split_once('?').map_or(path, |(path, _)| path));
        f.debug_struct("Broker")
            .field("transport", &self.transport)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("path", &path)
            .finish()
    }
}

impl Broker {
    /// Parses `tcp://`, `mqtt://`, `ssl://`, `mqtts://` URLs (the port defaults to 1883 or
    /// 8883), and `ws://`, `wss://` URLs with an optional path (ports 1883 or 8883, path
    /// [`DEFAULT_WEBSOCKET_PATH`] when absent).
    pub fn parse(url: &str) -> Result<Broker, JobError> {
        let bad = |why: &str| invalid(format!("key \"broker\": {:?} {why}", quote_limited(url)));
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("is not a URL like tcp://host:1883 or ssl://host:8883"))?;
        let transport = match scheme.to_ascii_lowercase().as_str() {
            "tcp" | "mqtt" => Transport::Tcp,
            "ssl" | "mqtts" | "tls" => Transport::Tls,
            "ws" => Transport::Ws,
            "wss" => Transport::Wss,
            _ => {
                return Err(bad(
                    "has an unknown scheme; use tcp://, mqtt://, ssl://, mqtts://, ws:// or wss://",
                ));
            }
        };
        let (authority, path) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, ""),
        };
        if authority.contains(['@', '?', '#']) {
            return Err(bad(
                "must be scheme://host:port, without user, query or fragment",
            ));
        }
        let path = if transport.is_websocket() {
            if !path.bytes().all(is_websocket_path_byte) {
                return Err(bad(
                    "has a websocket path with characters a URL path cannot hold (spaces, #, quotes…)",
                ));
            }
            Some(if path.is_empty() {
                DEFAULT_WEBSOCKET_PATH.to_owned()
            } else {
                path.to_owned()
            })
        } else {
            if !path.is_empty() && path != "/" {
                return Err(bad(
                    "must be scheme://host:port, without path (only ws:// and wss:// take one)",
                ));
            }
            None
        };
        let (host, port) = split_host_port(authority).ok_or_else(|| bad("has a bad port"))?;
        if host.is_empty() {
            return Err(bad("has no host"));
        }
        Ok(Broker {
            transport,
            host: host.to_owned(),
            port: port.unwrap_or(transport.default_port()),
            path,
        })
    }

    /// `ws://host:port/path` or `wss://host:port/path` for a websocket broker (the port always
    /// written, since ours are not the HTTP defaults); `None` for MQTT over TCP or TLS.
    pub fn websocket_url(&self) -> Option<String> {
        let path = self.path.as_deref()?;
        self.transport
            .is_websocket()
            .then(|| format!("{}://{self}{path}", self.transport.scheme()))
    }

    /// AWS IoT Core endpoints, which never acknowledge QoS 2.
    pub fn is_aws_iot(&self) -> bool {
        let host = self.host.to_ascii_lowercase();
        host.contains(".iot.") && host.ends_with(".amazonaws.com")
    }
}

/// `host`, `host:port`, `[v6]` or `[v6]:port`. `None` when the port is not a number.
fn split_host_port(authority: &str) -> Option<(&str, Option<u16>)> {
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (host, after) = v6.split_once(']')?;
        (host, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (authority, None),
        }
    };
    match port {
        None => Some((host, None)),
        Some(port) => port
            .parse::<u16>()
            .ok()
            .filter(|p| *p != 0)
            .map(|p| (host, Some(p))),
    }
}

/// RFC 3986 path and query characters (unreserved, sub-delims, `:@/?%`): what an HTTP request
/// line can carry as it is, so a path that passes here never fails later in the upgrade request.
fn is_websocket_path_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?%".contains(&b)
}

/// `host:port`: how logs, messages and metric labels name a broker.
impl fmt::Display for Broker {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schemes_map_to_transports_and_default_ports() {
        for (url, transport, port) in [
            ("tcp://h", Transport::Tcp, 1883),
            ("mqtt://h:1999", Transport::Tcp, 1999),
            ("ssl://h", Transport::Tls, 8883),
            ("MQTTS://h:443/", Transport::Tls, 443),
        ] {
            let broker = Broker::parse(url).expect(url);
            assert_eq!((broker.transport, broker.port), (transport, port), "{url}");
        }
        assert_eq!(
            Broker::parse("tcp://[::1]:1884").expect("v6").to_string(),
            "[::1]:1884"
        );
    }

    #[test]
    fn bad_broker_urls_are_invalid_jobs() {
        for url in [
            "localhost:1883",
            "http://h",
            "tcp://h:99999",
            "tcp://h:x",
            "tcp://",
            "tcp://u:p@h",
            "tcp://h/mqtt",
            "ws://u:p@h/mqtt",
            "ws://h/a b",
            "wss://h/mqtt#frag",
            "wss://:8883/mqtt",
            "wss://h:0",
        ] {
            assert!(Broker::parse(url).is_err(), "{url} should be rejected");
        }
    }

    #[test]
    fn websocket_urls_default_to_the_contract_ports_and_the_mqtt_path() {
        for (url, transport, port, path) in [
            ("ws://h", Transport::Ws, 1883, "/mqtt"),
            ("WS://h:8080", Transport::Ws, 8080, "/mqtt"),
            ("wss://h", Transport::Wss, 8883, "/mqtt"),
            (
                "wss://h:443/mqtt?x-amz-customauthorizer-name=a",
                Transport::Wss,
                443,
                "/mqtt?x-amz-customauthorizer-name=a",
            ),
            ("ws://h:9001/", Transport::Ws, 9001, "/"),
            ("ws://[::1]/ws/mqtt", Transport::Ws, 1883, "/ws/mqtt"),
        ] {
            let broker = Broker::parse(url).expect(url);
            assert_eq!(
                (broker.transport, broker.port, broker.path.as_deref()),
                (transport, port, Some(path)),
                "{url}"
            );
        }
    }

    #[test]
    fn a_websocket_broker_is_named_host_port_and_connected_to_by_its_full_url() {
        let broker = Broker::parse("wss://h.example/mqtt").expect("valid");
        assert_eq!(broker.to_string(), "h.example:8883");
        assert_eq!(
            broker.websocket_url().as_deref(),
            Some("wss://h.example:8883/mqtt")
        );
        let v6 = Broker::parse("ws://[::1]:9001").expect("valid");
        assert_eq!(v6.websocket_url().as_deref(), Some("ws://[::1]:9001/mqtt"));
        assert_eq!(
            Broker::parse("tcp://h").expect("valid").websocket_url(),
            None
        );
    }

    #[test]
    fn websocket_paths_are_part_of_the_target_so_they_never_share_a_connection() {
        let a = Broker::parse("ws://h:9001/mqtt").expect("valid");
        let b = Broker::parse("ws://h:9001/other").expect("valid");
        assert_ne!(a, b);
        assert_eq!(a, Broker::parse("ws://h:9001").expect("valid"));
    }

    #[test]
    fn a_websocket_query_never_appears_in_debug_output() {
        let broker = Broker::parse("wss://h/mqtt?token=s3cr3t").expect("valid");
        let debug = format!("{broker:?}");
        assert!(
            debug.contains("/mqtt") && !debug.contains("s3cr3t"),
            "{debug}"
        );
    }
}
