//! Fake MQTT brokers, **only** for failures a real broker cannot be made to produce:
//! a peer that accepts TCP but never sends CONNACK ([`SilentServer`]), a broker that accepts the
//! connection and then never acknowledges a publish ([`ConnackThenSilent`]), one that
//! accepts and immediately closes ([`ConnackThenClose`]), and an MQTT 5 broker that answers a
//! publish with a DISCONNECT naming its reason ([`DisconnectOnPublish5`]: real brokers send one
//! on an operator's kick or a session takeover, but not on cue while a publish is in flight). Everything else (refused credentials,
//! TLS failures, lost connections, restarts) is tested against a real [`Mosquitto`]
//! (see also [`Mosquitto::freeze`] and [`TcpProxy`]).
//!
//! Each listens on 127.0.0.1 on a free port, counts connections (and the MQTT packets it read,
//! by type), and stops on drop, closing its connections.
//!
//! [`Mosquitto`]: super::Mosquitto
//! [`Mosquitto::freeze`]: super::Mosquitto::freeze
//! [`TcpProxy`]: super::TcpProxy

use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// CONNACK, session-present 0, return code 0 (accepted).
pub const CONNACK_ACCEPTED: [u8; 4] = [0x20, 0x02, 0x00, 0x00];

/// MQTT 5 CONNACK: session-present 0, reason code 0x00 (success), no properties.
pub const CONNACK_ACCEPTED_V5: [u8; 5] = [0x20, 0x03, 0x00, 0x00, 0x00];

/// The reason string of the DISCONNECT [`DisconnectOnPublish5`] sends.
pub const DISCONNECT_REASON_STRING: &str = "kicked by the test";

/// MQTT 5 DISCONNECT with reason code 0x98 (administrative action) and a reason string.
fn disconnect_v5() -> Vec<u8> {
    let text = DISCONNECT_REASON_STRING.as_bytes();
    let properties_len = 1 + 2 + text.len();
    let mut packet = vec![0xE0, u8::try_from(2 + properties_len).expect("short")];
    packet.push(0x98);
    packet.push(u8::try_from(properties_len).expect("short"));
    packet.push(0x1F); // reason string
    packet.extend_from_slice(&u16::try_from(text.len()).expect("short").to_be_bytes());
    packet.extend_from_slice(text);
    packet
}

/// What a mock broker saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MockStats {
    /// TCP connections accepted.
    pub connections: usize,
    /// MQTT CONNECT packets read.
    pub connects: usize,
    /// MQTT PUBLISH packets read.
    pub publishes: usize,
    /// Other MQTT packets read (PINGREQ, DISCONNECT, SUBSCRIBE, …).
    pub other_packets: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Behaviour {
    Silent,
    ConnackThenSilent,
    ConnackThenClose,
    DisconnectOnPublish5,
}

struct Mock {
    port: u16,
    stats: watch::Sender<MockStats>,
    shutdown: CancellationToken,
}

impl Mock {
    async fn start(behaviour: Behaviour) -> Mock {
        let listener = TcpListener::bind(("127.0.0.1", 0))
            .await
            .expect("bind mock broker");
        let port = listener.local_addr().expect("local_addr").port();
        let stats = watch::channel(MockStats::default()).0;
        let shutdown = CancellationToken::new();
        let (s, t) = (stats.clone(), shutdown.clone());
        tokio::spawn(async move {
            let stats = Arc::new(s);
            loop {
                let accepted = tokio::select! {
                    _ = t.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((stream, _)) = accepted else { continue };
                stats.send_modify(|s| s.connections += 1);
                let (stats, t) = (stats.clone(), t.clone());
                tokio::spawn(async move {
                    tokio::select! {
                        _ = t.cancelled() => {}
                        _ = serve(stream, behaviour, &stats) => {}
                    }
                });
            }
        });
        Mock {
            port,
            stats,
            shutdown,
        }
    }

    async fn wait_for(&self, pred: impl Fn(&MockStats) -> bool, within: Duration) -> MockStats {
        let mut rx = self.stats.subscribe();
        match tokio::time::timeout(within, rx.wait_for(|s| pred(s))).await {
            Ok(Ok(s)) => *s,
            _ => panic!(
                "mock broker condition not met within {within:?}; stats: {:?}",
                *self.stats.borrow()
            ),
        }
    }
}

impl Drop for Mock {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn serve(mut stream: TcpStream, behaviour: Behaviour, stats: &watch::Sender<MockStats>) {
    if behaviour == Behaviour::Silent {
        // Hold the connection open; read nothing, answer nothing.
        std::future::pending::<()>().await;
    }
    loop {
        let Some(packet_type) = read_packet(&mut stream).await else {
            return;
        };
        stats.send_modify(|s| match packet_type {
            1 => s.connects += 1,
            3 => s.publishes += 1,
            _ => s.other_packets += 1,
        });
        if behaviour == Behaviour::DisconnectOnPublish5 {
            let answer = match packet_type {
                1 => CONNACK_ACCEPTED_V5.to_vec(),
                3 => disconnect_v5(),
                _ => continue,
            };
            if stream.write_all(&answer).await.is_err() || packet_type == 3 {
                let _ = stream.shutdown().await;
                return;
            }
            continue;
        }
        if packet_type == 1 {
            if stream.write_all(&CONNACK_ACCEPTED).await.is_err() {
                return;
            }
            if behaviour == Behaviour::ConnackThenClose {
                let _ = stream.shutdown().await;
                return;
            }
        }
    }
}

/// Reads one MQTT packet (fixed header, remaining length, body) and returns its type (the high
/// nibble of the first byte), or `None` on EOF or a malformed length.
async fn read_packet(stream: &mut TcpStream) -> Option<u8> {
    let first = stream.read_u8().await.ok()?;
    let mut len: usize = 0;
    let mut shift = 0;
    loop {
        let b = stream.read_u8().await.ok()?;
        len |= usize::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return None;
        }
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body).await.ok()?;
    Some(first >> 4)
}

macro_rules! mock_broker {
    ($(#[$doc:meta])* $name:ident, $behaviour:expr) => {
        $(#[$doc])*
        pub struct $name(Mock);

        impl $name {
            /// Starts listening on 127.0.0.1, on a free port.
            pub async fn start() -> $name {
                $name(Mock::start($behaviour).await)
            }

            /// The port it listens on.
            pub fn port(&self) -> u16 {
                self.0.port
            }

            /// `tcp://127.0.0.1:PORT`.
            pub fn url(&self) -> String {
                format!("tcp://127.0.0.1:{}", self.0.port)
            }

            /// What it saw so far.
            pub fn stats(&self) -> MockStats {
                *self.0.stats.borrow()
            }

            /// Waits until `pred(stats)` holds; panics after `within`.
            pub async fn wait_for(
                &self,
                pred: impl Fn(&MockStats) -> bool,
                within: Duration,
            ) -> MockStats {
                self.0.wait_for(pred, within).await
            }
        }
    };
}

mock_broker!(
    /// Accepts TCP connections and never sends a byte (a broker that never answers CONNECT:
    /// the worker must time out, exit-code 6). Mock: a real broker cannot be made to do this
    /// except by freezing it ([`Mosquitto::freeze`](super::Mosquitto::freeze)). Does not read
    /// either, so `stats().connects` stays 0.
    SilentServer,
    Behaviour::Silent
);

mock_broker!(
    /// Answers every MQTT CONNECT with an accepting CONNACK (`20 02 00 00`), then reads and
    /// ignores everything: publishes are never acknowledged, pings never answered. Mock: a real
    /// broker acknowledges every publish it accepts.
    ConnackThenSilent,
    Behaviour::ConnackThenSilent
);

mock_broker!(
    /// Answers an MQTT CONNECT with an accepting CONNACK and closes the connection at once: a
    /// connection lost right after it was made, every time. Mock: a real broker does not do this
    /// reliably.
    ConnackThenClose,
    Behaviour::ConnackThenClose
);

mock_broker!(
    /// MQTT 5: answers CONNECT with an accepting MQTT 5 CONNACK and every PUBLISH with a
    /// DISCONNECT, reason 0x98 (administrative action) and the reason string
    /// [`DISCONNECT_REASON_STRING`], then closes. Mock: real brokers send such a DISCONNECT
    /// when an operator kicks a client, but not on cue while a publish awaits its PUBACK.
    DisconnectOnPublish5,
    Behaviour::DisconnectOnPublish5
);
