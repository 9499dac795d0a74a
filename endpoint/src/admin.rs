//! The admin endpoint: `/healthz`, `/readyz`, `/metrics` and `/status` (JSON) over plain HTTP.
//!
//! A deliberately tiny HTTP/1.1 server: one request per connection, `GET` only, the request head
//! bounded in size and time, a bounded number of connections at once. Monitoring needs nothing
//! more, and a small surface is easy to keep safe on a port that operators may expose.

use crate::client_slots::{ClientSlot, ClientSlots, Eviction};
use crate::http::{self, respond, HeadError};
use crate::status::Status;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// Time a client has to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a whole exchange may take, from the accept to the last byte of the answer: a client
/// that never reads its answer gives its slot back after this.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most admin connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Most admin connections one client address holds at once.
pub const MAX_PER_CLIENT: usize = 8;

/// Why a process is not ready to serve traffic (`/readyz` answers 503 with it).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    /// It is draining: finishing what it carries, taking nothing new.
    #[error("draining")]
    Draining,
    /// An agent with no tunnel up.
    #[error("no tunnel is up")]
    NoTunnel,
    /// A server whose apiserver does not answer.
    #[error("upstream {0} unreachable")]
    UpstreamUnreachable(String),
}

/// What the admin endpoint shows; each binary implements it.
pub trait AdminSource: Send + Sync + 'static {
    /// `Ok` when ready to serve traffic, with a line that may say more (`ok`, or what is
    /// degraded but still serving), or why not.
    fn ready(&self) -> Result<String, NotReady>;
    /// Prometheus text exposition.
    fn metrics(&self) -> String;
    /// What `status` shows: the connected parties and their state.
    fn status(&self) -> Status;
}

/// Serves the admin endpoint until the task is dropped.
pub async fn serve(listener: TcpListener, source: Arc<dyn AdminSource>) {
    // When full, the oldest connection still sending its request head makes room: idle
    // connections cannot keep a real scrape out.
    let slots = ClientSlots::new(MAX_CONNECTIONS, MAX_PER_CLIENT, Eviction::OldestIdle);
    loop {
        let (conn, peer) = crate::net::accept_retrying(
            || listener.accept(),
            |e| tracing::warn!(error = %e, "admin endpoint: accept failed"),
        )
        .await;
        let Some(slot) = slots.take(peer.ip()) else {
            tracing::debug!(%peer, limit = MAX_PER_CLIENT, "admin endpoint: too many connections from this client");
            continue;
        };
        let source = source.clone();
        tokio::spawn(async move {
            let exchange = tokio::time::timeout(EXCHANGE_TIMEOUT, handle(conn, &*source, &slot));
            tokio::select! {
                r = exchange => match r {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "admin endpoint: request failed"),
                    Err(_) => tracing::debug!(%peer, "admin endpoint: exchange took too long; closed"),
                },
                _ = slot.evicted() => tracing::debug!(%peer, "admin endpoint: an idle connection closed to make room"),
            }
        });
    }
}

async fn handle(
    mut conn: TcpStream,
    source: &dyn AdminSource,
    slot: &ClientSlot,
) -> std::io::Result<()> {
    let text = "text/plain";
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, http::read_head(&mut conn)).await {
        Ok(Ok((head, _))) => {
            slot.head_done();
            head
        }
        Ok(Err(HeadError::Io(e))) => return Err(e),
        Ok(Err(e)) => {
            let code = e.status();
            return respond(&mut conn, code, text, format!("{e}\n").as_bytes()).await;
        }
        Err(_) => return respond(&mut conn, 408, text, b"request timeout\n").await,
    };
    let Some((method, path)) = http::parse_request(&head) else {
        return respond(&mut conn, 400, text, b"bad request\n").await;
    };
    if method != "GET" {
        return respond(&mut conn, 405, text, b"only GET is served\n").await;
    }
    match path.as_str() {
        "/healthz" => respond(&mut conn, 200, text, b"ok\n").await,
        "/readyz" => match source.ready() {
            Ok(line) => respond(&mut conn, 200, text, format!("{line}\n").as_bytes()).await,
            Err(why) => {
                respond(
                    &mut conn,
                    503,
                    text,
                    format!("not ready: {why}\n").as_bytes(),
                )
                .await
            }
        },
        "/metrics" => {
            let body = source.metrics();
            respond(&mut conn, 200, "text/plain; version=0.0.4", body.as_bytes()).await
        }
        "/status" => match serde_json::to_vec(&source.status()) {
            Ok(body) => respond(&mut conn, 200, "application/json", &body).await,
            Err(e) => respond(&mut conn, 500, text, format!("status: {e}\n").as_bytes()).await,
        },
        _ => respond(&mut conn, 404, text, b"not found\n").await,
    }
}
