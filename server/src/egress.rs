//! The egress proxy: how the control plane reaches a node through the node's own outbound
//! tunnel, as kube-apiserver's EgressSelectorConfiguration (protocol HTTPConnect) expects.
//!
//! A client sends `CONNECT host:port HTTP/1.1`, where host is a node name or one of the node's
//! addresses. The server opens a stream to that node's agent (or asks its peers, when the node
//! is connected elsewhere), the agent decides whether the target is allowed and connects to it,
//! and once both sides are up the client reads `HTTP/1.1 200 Connection established` and bytes
//! flow. Failures answer with a status and a reason: 400, 403 (the agent refuses the target),
//! 404 (no such node connected anywhere), 502 (the agent could not connect), 504 (timeout).

use crate::registry::Route;
use crate::State;
use bytes::Bytes;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tether_common::pool::Policy;
use tether_common::protocol::{Message, StatusCode, Target, PROTOCOL_VERSION};
use tether_common::relay;
use tether_common::telemetry::GaugeGuard;
use tether_common::transport::{Stream, Tunnel};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::Semaphore;
use tracing::{debug, info, warn};

/// Largest CONNECT request head.
pub const MAX_HEAD: usize = 8 * 1024;
/// Time a client has to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to reach the target through the tunnel, before answering 504.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Most egress connections at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// Most egress connections one client address holds at once (the apiserver opens one per
/// `exec`, `logs` or `port-forward`, so this is generous; it keeps one client from taking all).
pub const MAX_PER_CLIENT: usize = MAX_CONNECTIONS / 4;
/// Time to write an answer (an error, or `200 Connection established`): a client that never
/// reads it gives its slot back after this.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

pub use tether_common::http::{parse_connect, ConnectRequest};

fn reason(code: u16) -> &'static str {
    match code {
        200 => "Connection established",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Gateway Timeout",
    }
}

async fn respond<S: AsyncWrite + Unpin>(s: &mut S, code: u16, body: &str) {
    let msg = format!(
        "HTTP/1.1 {code} {}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        reason(code),
        body.len()
    );
    let _ = tokio::time::timeout(ANSWER_TIMEOUT, async {
        let _ = s.write_all(msg.as_bytes()).await;
        let _ = s.shutdown().await;
    })
    .await;
}

/// Reads a request head; returns it and any bytes after it.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Result<(Vec<u8>, Bytes), u16> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 1024];
    loop {
        let n = s.read(&mut chunk).await.map_err(|_| 400u16)?;
        if n == 0 {
            return Err(400);
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let rest = Bytes::copy_from_slice(&buf[i + 4..]);
            buf.truncate(i + 4);
            return Ok((buf, rest));
        }
        if buf.len() > MAX_HEAD {
            return Err(431);
        }
    }
}

/// Where a route ended, as an HTTP status and a reason.
type Refusal = (u16, String);

fn refusal(code: StatusCode, message: String) -> Refusal {
    let http = match code {
        StatusCode::RefusedByPolicy => 403,
        StatusCode::NoRoute => 404,
        StatusCode::Timeout => 504,
        StatusCode::Busy | StatusCode::Draining => 503,
        _ => 502,
    };
    (http, message)
}

/// Opens a stream on `tunnel` asking for `host:port` and waits for the answer.
async fn ask(tunnel: &Tunnel, req: &ConnectRequest, hops: u8) -> Result<Stream, Refusal> {
    let attempt = async {
        let mut s = tunnel
            .open_stream()
            .await
            .map_err(|e| (502, format!("tunnel failed: {e}")))?;
        let open = Message::Open {
            version: PROTOCOL_VERSION,
            target: Target::Address {
                host: req.host.clone(),
                port: req.port,
            },
            hops,
        };
        s.send
            .write_message(&open)
            .await
            .map_err(|e| (502, format!("tunnel failed: {e}")))?;
        match s.recv.read_message().await {
            Ok(Some(Message::Status {
                code: StatusCode::Ok,
                ..
            })) => Ok(s),
            Ok(Some(Message::Status { code, message })) => Err(refusal(code, message)),
            other => Err((502, format!("bad answer from the tunnel: {other:?}"))),
        }
    };
    tokio::time::timeout(OPEN_TIMEOUT, attempt)
        .await
        .unwrap_or_else(|_| Err((504, format!("no answer within {OPEN_TIMEOUT:?}"))))
}

/// Reaches `host:port` through a local tunnel of the node (newest first).
pub async fn route_local(state: &State, req: &ConnectRequest) -> Result<Stream, Refusal> {
    let tunnels = match state.registry.find(&req.host) {
        Route::Node(_, tunnels) => tunnels,
        Route::Unknown => {
            return Err((
                404,
                format!("node {} is not connected to this server", req.host),
            ))
        }
        Route::Contested(nodes) => {
            return Err((
                409,
                format!(
                    "address {} is claimed by more than one node ({}); reach the node by its name",
                    req.host,
                    nodes.join(", ")
                ),
            ))
        }
    };
    let mut last = (502, String::new());
    for entry in tunnels {
        match ask(&entry.tunnel, req, 0).await {
            Ok(s) => return Ok(s),
            // The agent answered: its verdict stands.
            Err(r @ (403 | 504, _)) => return Err(r),
            Err(r) if !r.1.starts_with("tunnel failed") => return Err(r),
            Err(r) => last = r,
        }
    }
    Err(last)
}

/// Reaches `host:port` through this server's tunnels, else through a peer that has the node.
pub async fn route(state: &State, req: &ConnectRequest) -> Result<Stream, Refusal> {
    match route_local(state, req).await {
        Err((404, _)) => {}
        other => return other,
    }
    for link in state.peers.candidates(Policy::LeastStreams) {
        match ask(&link.tunnel, req, 1).await {
            Ok(s) => {
                debug!(node = %req.host, peer = %link.server, "egress through peer");
                return Ok(s);
            }
            Err((404, _)) => continue,
            Err(r) if r.1.starts_with("tunnel failed") => continue,
            Err(r) => return Err(r),
        }
    }
    Err((
        404,
        format!("node {} is not connected to any server", req.host),
    ))
}

/// Serves one egress client.
pub async fn serve_client<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, who: &str, state: &State) {
    let (head, rest) = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut s)).await {
        Ok(Ok(h)) => h,
        Ok(Err(code)) => {
            state.metrics.egress_failed(code);
            return respond(&mut s, code, "malformed request\n").await;
        }
        Err(_) => {
            state.metrics.egress_failed(408);
            return respond(&mut s, 408, "request timeout\n").await;
        }
    };
    let req = match parse_connect(&head) {
        Ok(r) => r,
        Err((code, why)) => {
            state.metrics.egress_failed(code);
            warn!(client = who, reason = %why, "egress request refused");
            return respond(&mut s, code, &format!("{why}\n")).await;
        }
    };
    let stream = match route(state, &req).await {
        Ok(stream) => stream,
        Err((code, why)) => {
            state.metrics.egress_failed(code);
            warn!(client = who, node = %req.host, port = req.port, status = code, reason = %why,
                "egress CONNECT failed");
            return respond(&mut s, code, &format!("{why}\n")).await;
        }
    };
    let established = s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
    if !matches!(
        tokio::time::timeout(ANSWER_TIMEOUT, established).await,
        Ok(Ok(()))
    ) {
        return;
    }
    info!(client = who, node = %req.host, port = req.port, "egress CONNECT established");
    state.metrics.egress_streams.inc();
    let _open = GaugeGuard::new(&state.metrics.streams_open);
    relay::relay_io(s, rest, stream, &[&state.metrics.bytes]).await;
}

/// A stream from a peer asking for a node connected here: local tunnels only (one hop).
pub async fn serve_peer_request(mut stream: Stream, host: String, port: u16, state: &State) {
    let req = ConnectRequest { host, port };
    match route_local(state, &req).await {
        Ok(target) => {
            let ok = Message::Status {
                code: StatusCode::Ok,
                message: String::new(),
            };
            if stream.send.write_message(&ok).await.is_ok() {
                let _open = GaugeGuard::new(&state.metrics.streams_open);
                relay::splice(stream, target, &[&state.metrics.bytes]).await;
            }
        }
        Err((http, message)) => {
            let code = match http {
                403 | 409 => StatusCode::RefusedByPolicy,
                404 => StatusCode::NoRoute,
                504 => StatusCode::Timeout,
                _ => StatusCode::UpstreamUnreachable,
            };
            let _ = stream
                .send
                .write_message(&Message::Status { code, message })
                .await;
            stream.send.finish().await;
        }
    }
}

/// Egress listener settings.
#[derive(Debug, Clone, Default)]
pub struct EgressConfig {
    pub listen: Option<std::net::SocketAddr>,
    pub uds: Option<std::path::PathBuf>,
    /// Serve TLS with this certificate and key.
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    /// Require client certificates signed by this CA.
    pub client_ca: Option<std::path::PathBuf>,
}

/// Builds the egress TLS acceptor, when TLS was asked for.
pub fn tls_acceptor(
    c: &EgressConfig,
) -> Result<Option<tokio_rustls::TlsAcceptor>, tether_common::tls::TlsError> {
    use tether_common::tls;
    let (Some(cert), Some(key)) = (&c.tls_cert, &c.tls_key) else {
        return Ok(None);
    };
    let identity = tls::Identity::load(cert, key)?;
    let builder = rustls::ServerConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls::TlsError::Config(e.to_string()))?;
    let builder = match &c.client_ca {
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(tls::load_roots(ca)?),
                tls::provider(),
            )
            .build()
            .map_err(|e| tls::TlsError::Config(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let cfg = builder
        .with_single_cert(identity.chain, identity.key)
        .map_err(|e| tls::TlsError::Config(e.to_string()))?;
    Ok(Some(tokio_rustls::TlsAcceptor::from(Arc::new(cfg))))
}

/// Serves egress clients on a TCP listener until the task is dropped.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<State>,
) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let per_client = tether_common::client_slots::ClientSlots::new(MAX_PER_CLIENT);
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let (conn, peer) = match listener.accept().await {
            Ok(c) => c,
            Err(e) => {
                warn!(error = %e, "egress accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Some(slot) = per_client.take(peer.ip()) else {
            warn!(client = %peer, limit = MAX_PER_CLIENT, "egress connection refused: too many from this address");
            continue;
        };
        let _ = conn.set_nodelay(true);
        let (state, tls) = (state.clone(), tls.clone());
        tokio::spawn(async move {
            let who = peer.to_string();
            match tls {
                Some(acceptor) => match tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(conn))
                    .await
                {
                    Ok(Ok(s)) => serve_client(s, &who, &state).await,
                    Ok(Err(e)) => warn!(client = %who, error = %e, "egress TLS handshake failed"),
                    Err(_) => warn!(client = %who, "egress TLS handshake timed out"),
                },
                None => serve_client(conn, &who, &state).await,
            }
            drop((permit, slot));
        });
    }
}

/// Serves egress clients on a Unix socket until the task is dropped.
pub async fn serve_uds(listener: tokio::net::UnixListener, state: Arc<State>) {
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = limit.clone().acquire_owned().await else {
            return;
        };
        let conn = match listener.accept().await {
            Ok((c, _)) => c,
            Err(e) => {
                warn!(error = %e, "egress accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let state = state.clone();
        tokio::spawn(async move {
            serve_client(conn, "unix socket", &state).await;
            drop(permit);
        });
    }
}

/// Binds the Unix socket, replacing a stale one from an earlier run.
pub fn bind_uds(path: &Path) -> std::io::Result<tokio::net::UnixListener> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let l = tokio::net::UnixListener::bind(path)?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_requests() {
        let r =
            parse_connect(b"CONNECT node-1:10250 HTTP/1.1\r\nHost: node-1:10250\r\n\r\n").unwrap();
        assert_eq!(
            r,
            ConnectRequest {
                host: "node-1".into(),
                port: 10250
            }
        );
        let r = parse_connect(b"CONNECT [fd00::1]:10250 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(r.host, "fd00::1");
        assert_eq!(parse_connect(b"GET / HTTP/1.1\r\n\r\n").unwrap_err().0, 405);
        assert_eq!(
            parse_connect(b"CONNECT node HTTP/1.1\r\n\r\n")
                .unwrap_err()
                .0,
            400
        );
        assert_eq!(
            parse_connect(b"CONNECT node:99999 HTTP/1.1\r\n\r\n")
                .unwrap_err()
                .0,
            400
        );
        assert_eq!(parse_connect(b"\xff\xfe").unwrap_err().0, 400);
        assert_eq!(
            parse_connect(b"CONNECT :1 HTTP/1.1\r\n\r\n").unwrap_err().0,
            400
        );
    }
}
