//! A TCP proxy the test controls, between the worker and a broker, to simulate lost, hung and
//! refused connections with a real broker behind it.
//!
//! Point the worker at `tcp://127.0.0.1:{proxy.port()}`. For TLS, use `ssl://localhost:PORT`:
//! the proxy forwards bytes and does not touch TLS.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Connection counts of a [`TcpProxy`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProxyStats {
    /// Connections currently forwarded.
    pub active: usize,
    /// Connections forwarded since start (not counting refused ones).
    pub total: usize,
    /// Connections closed at once because the proxy was [`refuse`](TcpProxy::refuse)-ing.
    pub refused: usize,
}

struct Shared {
    upstream_port: u16,
    refusing: AtomicBool,
    stalled: watch::Sender<bool>,
    /// Cancelled by `cut()` and replaced; every connection holds a child of the current one.
    generation: std::sync::Mutex<CancellationToken>,
    stats: watch::Sender<ProxyStats>,
}

/// A TCP proxy on 127.0.0.1 to `127.0.0.1:upstream_port`; stops (closing everything) on drop.
pub struct TcpProxy {
    port: u16,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
}

impl TcpProxy {
    /// Listens on a free port and forwards each connection to `127.0.0.1:upstream_port`
    /// (a connection whose upstream connect fails is closed).
    pub async fn start(upstream_port: u16) -> TcpProxy {
        TcpProxy::start_on("127.0.0.1", 0, upstream_port).await
    }

    /// [`start`](Self::start) listening on `host:port` (a loopback address, e.g. `::1`; port 0
    /// for a free one).
    pub async fn start_on(host: &str, port: u16, upstream_port: u16) -> TcpProxy {
        let listener = TcpListener::bind((host, port))
            .await
            .unwrap_or_else(|e| panic!("bind proxy on {host}:{port}: {e}"));
        let port = listener.local_addr().expect("local_addr").port();
        let shutdown = CancellationToken::new();
        let shared = Arc::new(Shared {
            upstream_port,
            refusing: AtomicBool::new(false),
            stalled: watch::channel(false).0,
            generation: std::sync::Mutex::new(shutdown.child_token()),
            stats: watch::channel(ProxyStats::default()).0,
        });
        tokio::spawn(accept_loop(listener, shared.clone(), shutdown.clone()));
        TcpProxy {
            port,
            shared,
            shutdown,
        }
    }

    /// The port to connect to.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The upstream port.
    pub fn upstream_port(&self) -> u16 {
        self.shared.upstream_port
    }

    /// Closes every current connection (both sides see the socket closed; bytes held by a stall
    /// are dropped). New connections are accepted as before.
    pub fn cut(&self) {
        let mut generation = self.shared.generation.lock().unwrap();
        generation.cancel();
        *generation = self.shutdown.child_token();
    }

    /// Stops forwarding bytes in both directions, on current and new connections, without
    /// closing anything: a broker that hangs mid-conversation.
    pub fn stall(&self) {
        self.shared.stalled.send_replace(true);
    }

    /// Forwards again after [`stall`](Self::stall), including the bytes held meanwhile.
    pub fn resume(&self) {
        self.shared.stalled.send_replace(false);
    }

    /// From now on, closes each new connection as soon as it is accepted (current connections
    /// are untouched; combine with [`cut`](Self::cut) for a broker that went away).
    pub fn refuse(&self) {
        self.shared.refusing.store(true, Ordering::SeqCst);
    }

    /// Forwards new connections again after [`refuse`](Self::refuse).
    pub fn accept(&self) {
        self.shared.refusing.store(false, Ordering::SeqCst);
    }

    /// Current connection counts.
    pub fn stats(&self) -> ProxyStats {
        *self.shared.stats.borrow()
    }

    /// Waits until `pred(stats)` holds; panics after `within`. Example:
    /// `proxy.wait_for(|s| s.total >= 2, Duration::from_secs(5))` for "it reconnected".
    pub async fn wait_for(
        &self,
        pred: impl Fn(&ProxyStats) -> bool,
        within: Duration,
    ) -> ProxyStats {
        let mut rx = self.shared.stats.subscribe();
        match tokio::time::timeout(within, rx.wait_for(|s| pred(s))).await {
            Ok(Ok(s)) => *s,
            _ => panic!(
                "proxy stats condition not met within {within:?}; stats: {:?}",
                self.stats()
            ),
        }
    }
}

impl Drop for TcpProxy {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((client, _)) = accepted else { continue };
        if shared.refusing.load(Ordering::SeqCst) {
            shared.stats.send_modify(|s| s.refused += 1);
            drop(client);
            continue;
        }
        let token = shared.generation.lock().unwrap().child_token();
        tokio::spawn(handle(client, shared.clone(), token));
    }
}

async fn handle(client: TcpStream, shared: Arc<Shared>, token: CancellationToken) {
    let upstream = tokio::select! {
        _ = token.cancelled() => return,
        u = TcpStream::connect(("127.0.0.1", shared.upstream_port)) => u,
    };
    let Ok(upstream) = upstream else { return };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    shared.stats.send_modify(|s| {
        s.active += 1;
        s.total += 1;
    });
    let (cr, cw) = client.into_split();
    let (ur, uw) = upstream.into_split();
    let stalled = shared.stalled.subscribe();
    let up = pump(cr, uw, stalled.clone(), token.clone());
    let down = pump(ur, cw, stalled, token.clone());
    tokio::join!(up, down);
    shared.stats.send_modify(|s| s.active -= 1);
}

/// Copies `r` to `w` until EOF (then shuts `w` down) or until `token` is cancelled (then drops
/// both halves, closing the socket). Holds bytes while stalled.
async fn pump(
    mut r: OwnedReadHalf,
    mut w: OwnedWriteHalf,
    mut stalled: watch::Receiver<bool>,
    token: CancellationToken,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = tokio::select! {
            _ = token.cancelled() => return,
            n = r.read(&mut buf) => match n { Ok(0) | Err(_) => break, Ok(n) => n },
        };
        tokio::select! {
            _ = token.cancelled() => return,
            res = stalled.wait_for(|s| !*s) => if res.is_err() { return },
        }
        tokio::select! {
            _ = token.cancelled() => return,
            res = w.write_all(&buf[..n]) => if res.is_err() { return },
        }
    }
    // EOF: pass the half-close on; the socket closes once both pumps are done.
    let _ = w.shutdown().await;
}
