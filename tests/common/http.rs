//! A minimal HTTP/1.0 GET over a tokio `TcpStream`, for `/metrics`, `/healthz` and `/readyz`.

use std::net::SocketAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout};

/// `GET path` on `addr`: `(status, body)`, or an error message (connect refused, 5 s timeout,
/// malformed answer).
pub async fn get(addr: SocketAddr, path: &str) -> Result<(u16, String), String> {
    let exchange = async {
        let mut stream = TcpStream::connect(addr)
            .await
            .map_err(|e| format!("connect {addr}: {e}"))?;
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let mut raw = Vec::new();
        stream
            .read_to_end(&mut raw)
            .await
            .map_err(|e| format!("read: {e}"))?;
        let text = String::from_utf8_lossy(&raw).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| format!("no HTTP status in {head:?}"))?;
        Ok((status, body.to_string()))
    };
    timeout(Duration::from_secs(5), exchange)
        .await
        .map_err(|_| format!("GET {path} on {addr}: no answer within 5 s"))?
}

/// Polls `GET path` every 50 ms until it answers `status`; panics after `within` with the last
/// answer.
pub async fn wait_for_status(addr: SocketAddr, path: &str, status: u16, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let last = get(addr, path).await;
        if matches!(&last, Ok((s, _)) if *s == status) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "GET {path} on {addr} did not answer {status} within {within:?}; last: {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
