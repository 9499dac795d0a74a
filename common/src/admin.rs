//! The admin endpoint: `/healthz`, `/readyz`, `/metrics` and `/status` (JSON) over plain HTTP.
//!
//! A deliberately tiny HTTP/1.1 server: one request per connection, `GET` only, the request head
//! bounded in size and time, a bounded number of connections at once. Monitoring needs nothing
//! more, and a small surface is easy to keep safe on a port that operators may expose.

use crate::client_slots::ClientSlots;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

/// Largest request head read; longer requests get 431.
pub const MAX_REQUEST_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a whole exchange may take, from the accept to the last byte of the answer: a client
/// that never reads its answer gives its slot back after this.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most admin connections served at once; more wait in the kernel's accept queue.
pub const MAX_CONNECTIONS: usize = 64;
/// Most admin connections one client address holds at once.
pub const MAX_PER_CLIENT: usize = 8;

/// What the admin endpoint shows; each binary implements it.
pub trait AdminSource: Send + Sync + 'static {
    /// `Ok` when ready to serve traffic, or why not.
    fn ready(&self) -> Result<(), String>;
    /// Prometheus text exposition.
    fn metrics(&self) -> String;
    /// What `status` shows, as a JSON document: the connected parties and their state.
    fn status(&self) -> serde_json::Value;
}

/// Serves the admin endpoint until the task is dropped.
pub async fn serve(listener: TcpListener, source: Arc<dyn AdminSource>) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_client = ClientSlots::new(MAX_PER_CLIENT);
    loop {
        let Ok(permit) = permits.clone().acquire_owned().await else {
            return;
        };
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "admin endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(slot) = per_client.take(peer.ip()) else {
            tracing::debug!(%peer, limit = MAX_PER_CLIENT, "admin endpoint: too many connections from this address");
            continue;
        };
        let source = source.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(EXCHANGE_TIMEOUT, handle(conn, &*source)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "admin endpoint: request failed"),
                Err(_) => tracing::debug!(%peer, "admin endpoint: exchange took too long; closed"),
            }
            drop((permit, slot));
        });
    }
}

async fn handle(mut conn: TcpStream, source: &dyn AdminSource) -> std::io::Result<()> {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut conn)).await {
        Ok(Ok(Some(head))) => head,
        Ok(Ok(None)) => return respond(&mut conn, 431, "text/plain", "request too large\n").await,
        Ok(Err(e)) => return Err(e),
        Err(_) => return respond(&mut conn, 408, "text/plain", "request timeout\n").await,
    };
    let Some((method, path)) = parse_request(head.as_bytes()) else {
        return respond(&mut conn, 400, "text/plain", "bad request\n").await;
    };
    if method != "GET" {
        return respond(&mut conn, 405, "text/plain", "only GET is served\n").await;
    }
    match path.as_str() {
        "/healthz" => respond(&mut conn, 200, "text/plain", "ok\n").await,
        "/readyz" => match source.ready() {
            Ok(()) => respond(&mut conn, 200, "text/plain", "ok\n").await,
            Err(why) => respond(&mut conn, 503, "text/plain", &format!("not ready: {why}\n")).await,
        },
        "/metrics" => {
            let body = source.metrics();
            respond(&mut conn, 200, "text/plain; version=0.0.4", &body).await
        }
        "/status" => {
            let body = source.status().to_string();
            respond(&mut conn, 200, "application/json", &body).await
        }
        _ => respond(&mut conn, 404, "text/plain", "not found\n").await,
    }
}

pub use crate::http::parse_request;

/// Reads up to the blank line that ends a request head; `None` when it is too large.
async fn read_head(conn: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = conn.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&chunk[..n]);
        if buf.windows(4).any(|w| w == b"\r\n\r\n") || buf.windows(2).any(|w| w == b"\n\n") {
            return Ok(Some(String::from_utf8_lossy(&buf).into_owned()));
        }
        if buf.len() > MAX_REQUEST_HEAD {
            return Ok(None);
        }
    }
}

async fn respond(
    conn: &mut TcpStream,
    code: u16,
    content_type: &str,
    body: &str,
) -> std::io::Result<()> {
    let reason = match code {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    };
    let head = format!(
        "HTTP/1.1 {code} {reason}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}
