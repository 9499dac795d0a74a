//! The egress proxy: how the control plane reaches a node through the node's own outbound
//! tunnel, as kube-apiserver's EgressSelectorConfiguration (protocol HTTPConnect) expects.
//!
//! A client sends `CONNECT host:port HTTP/1.1`, where host is a node name or one of the node's
//! addresses. The server opens a stream to that node's agent (or asks its peers, when the node
//! is connected elsewhere), the agent decides whether the target is allowed and connects to it,
//! and once both sides are up the client reads `HTTP/1.1 200 Connection established` and bytes
//! flow. Failures answer with a status and a reason: 400, 403 (the agent refuses the target),
//! 404 (no such node connected anywhere), 502 (the agent could not connect), 504 (timeout).

use crate::authority::Resolved;
use crate::identity;
use crate::route::{self, Answer, Route, Scope};
pub use crate::route::{wait_until, Refusal};
use crate::state::State;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_endpoint::client_slots::{ClientSlot, ClientSlots, Eviction};
use tether_endpoint::http;
use tether_link::pool::Policy;
use tether_process::telemetry::GaugeGuard;
use tether_proto::{StatusCode, Target};
use tether_transport::open::{self, answer, OpenError};
use tether_transport::relay::{self, Resettable};
use tether_transport::transport::{Stream, Tunnel};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tracing::{debug, info, warn};

/// Time a client has to send its request head.
pub const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// Time to reach the target through the tunnel, before answering 504, at least: a node's link
/// in a blackout is waited for as long as its tunnel is held (`--blackout-tolerance`), so that an
/// `exec` started during a cellular handover goes through when the link returns (see
/// [`open_timeout`]).
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Most egress connections at once.
pub const MAX_CONNECTIONS: usize = 4096;
/// Most egress connections one client address holds at once (the apiserver opens one per
/// `exec`, `logs` or `port-forward`, so this is generous; it keeps one client from taking all).
pub const MAX_PER_CLIENT: usize = MAX_CONNECTIONS / 4;
/// How long a CONNECT waits for a node that is gone from here for a moment (see [`route`]): the
/// agent's own `--reconnect-grace` default.
pub use tether_link::RECONNECT_GRACE;
/// Time to write an answer (an error, or `200 Connection established`): a client that never
/// reads it gives its slot back after this.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

pub use tether_endpoint::http::{parse_connect, ConnectRequest};

/// Answers an egress client with an error (the connection then ends).
async fn respond<S: AsyncWrite + Unpin>(s: &mut S, code: u16, body: &str) {
    let _ = tokio::time::timeout(
        ANSWER_TIMEOUT,
        http::respond(s, code, "text/plain", body.as_bytes()),
    )
    .await;
}

/// How long an open waits for the agent's verdict. The agent answers within its own connect
/// timeout, so only a silent link runs this out; the server holds a silent agent's tunnel for
/// the blackout tolerance, and an open on it waits as long (QUIC retransmits the `Open` when
/// the link returns). Before, an open sent early in a 6 s blackout could be answered 504: the
/// retransmission, backed off, came after the 10 s.
pub fn open_timeout(state: &State) -> Duration {
    OPEN_TIMEOUT.max(state.config.liveness.blackout_tolerance)
}

/// Opens a stream on `tunnel` asking for `host:port` and waits for the answer.
async fn ask(
    state: &State,
    tunnel: &Tunnel,
    req: &ConnectRequest,
    hops: u8,
) -> Result<Stream, OpenError> {
    let target = Target::Address {
        host: req.host.clone(),
        port: req.port,
    };
    open::open(tunnel, target, hops, open_timeout(state)).await
}

/// The node a CONNECT's host leads to: the node of that name, or the one node that owns that
/// IP address (whether or not it is connected: an address never leads to another node because
/// its owner is away). An address no node owns, or more than one, leads nowhere.
pub fn resolve(state: &State, host: &str) -> Result<String, Refusal> {
    match state.authority.resolve(host) {
        Resolved::Node(node) => Ok(node),
        Resolved::Unowned(addr) => Err(Refusal::NoNode(format!("no node owns address {addr}"))),
        Resolved::Contested(nodes) => Err(Refusal::Contested(
            format!(
                "address {host} is owned by more than one node ({}); an operator must release it (`tether-server agent release-address {host}`), or reach the node by its name",
                nodes.join(", ")
            ),
        )),
    }
}

/// The node's tunnels here, newest first, each with whether the node records admit its
/// certificate now (see [`crate::route`]).
/// A tunnel whose certificate is from a CA trusted no more (a rotation finished) carries the
/// streams it has, and no new one.
fn local_tunnels(state: &State, node: &str) -> Vec<route::Local<Tunnel>> {
    let trust = state.trust.borrow().clone();
    state
        .registry
        .find(node)
        .into_iter()
        .map(|e| route::Local {
            id: e.tunnel.id(),
            admitted: identity::carries(&state.authority.check(node, &e.key_hash))
                && trust.trusts(e.issuer.as_deref()),
            via: e.tunnel,
        })
        .collect()
}

/// The peer links a client's CONNECT may ask, least busy first.
fn peer_tunnels(state: &State, scope: Scope) -> Vec<Tunnel> {
    match scope {
        Scope::Client => state
            .peers
            .candidates(Policy::LeastStreams)
            .into_iter()
            .map(|l| l.tunnel.clone())
            .collect(),
        Scope::ForPeer => Vec::new(),
    }
}

/// Reaches `host:port` on `node` by the rule of [`crate::route`]: through this server's
/// tunnels, else through a peer that has the node; when the node is gone from here for a
/// moment, through its next tunnel.
///
/// A node is gone for a moment when its tunnels here died under the request (its network
/// changed, UDP was blocked: the agent falls back to TCP or redials within a second or two), or
/// when it lost its last tunnel here less than [`RECONNECT_GRACE`] ago (its agent restarting,
/// or moving to a renewed certificate), or when this server started less than that ago (a
/// restart or an upgrade: the nodes and the peer links are on their way back, and a server
/// that just started cannot tell a node that is coming from one that never will). kubectl's
/// `exec`, `logs` and `port-forward` do not retry, so the request waits for the node's return,
/// as the agent's own connections do (`--reconnect-grace`), and then goes through, here or at
/// a peer. A node that never connected, or left longer ago, is answered at once.
pub async fn route(
    state: &State,
    node: &str,
    req: &ConnectRequest,
    scope: Scope,
) -> Result<Stream, Refusal> {
    let mut r = Route::new(node, scope);
    r.offer(local_tunnels(state, node), peer_tunnels(state, scope));
    loop {
        let history = route::History {
            left_at: state.registry.left_at(node),
            started: state.started,
        };
        match r.next(Instant::now(), history) {
            route::Step::Ask { via, hops } => match ask(state, &via, req, hops).await {
                Ok(s) => {
                    if hops > 0 {
                        debug!(node, host = %req.host, "egress through a peer");
                    }
                    return Ok(s);
                }
                Err(e) => r.answered(answer_of(e, hops)),
            },
            route::Step::Wait { until } => {
                state.metrics.egress_waited.inc();
                debug!(
                    node,
                    "egress: the node is gone from here for now; waiting for its next tunnel"
                );
                state.registry.wait_for_tunnel(node, r.tried(), until).await;
                // Then once more, whether or not a tunnel came here: a peer may have the node
                // by now.
                r.offer(local_tunnels(state, node), peer_tunnels(state, scope));
            }
            route::Step::Refuse(refusal) => return Err(refusal),
        }
    }
}

/// What a failed open means to the route: from a tunnel here, a tunnel failure or the agent's
/// verdict; from a peer, also "not mine".
fn answer_of(e: OpenError, hops: u8) -> Answer {
    match e {
        OpenError::Refused {
            code: StatusCode::NoRoute,
            ..
        } if hops > 0 => Answer::NotThere,
        e @ OpenError::Tunnel(_) => Answer::TunnelFailed(Refusal::from_open(e)),
        e => Answer::Verdict(Refusal::from_open(e)),
    }
}

/// Serves one egress client.
pub async fn serve_client<S: AsyncRead + AsyncWrite + Resettable + Send + Unpin>(
    mut s: S,
    who: &str,
    slot: &ClientSlot,
    state: &State,
) {
    let (head, rest) = match tokio::time::timeout(HEAD_TIMEOUT, http::read_head(&mut s)).await {
        Ok(Ok(h)) => {
            slot.head_done();
            h
        }
        Ok(Err(e)) => {
            let code = e.status();
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
    let routed = match resolve(state, &req.host) {
        Ok(node) => route(state, &node, &req, Scope::Client)
            .await
            .map(|s| (node, s)),
        Err(refusal) => Err(refusal),
    };
    let (node, stream) = match routed {
        Ok(routed) => routed,
        Err(refusal) => {
            let code = refusal.http();
            state.metrics.egress_failed(code);
            warn!(client = who, node = %req.host, port = req.port, status = code, reason = %refusal,
                "egress CONNECT failed");
            return respond(&mut s, code, &format!("{refusal}\n")).await;
        }
    };
    let established = s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n");
    if !matches!(
        tokio::time::timeout(ANSWER_TIMEOUT, established).await,
        Ok(Ok(()))
    ) {
        return;
    }
    info!(client = who, host = %req.host, port = req.port, node = %node, "egress CONNECT established");
    state.metrics.egress_streams.inc();
    let _open = GaugeGuard::new(&state.metrics.shared.streams_open);
    let summary =
        relay::relay_with(relay::Io(s), rest, stream, &[&state.metrics.shared.bytes]).await;
    debug!(client = who, node = %node, outcome = ?summary.outcome, "egress CONNECT done");
}

/// A stream from a peer asking for a node connected here: local tunnels only (one hop).
pub async fn serve_peer_request(mut stream: Stream, host: String, port: u16, state: &State) {
    let req = ConnectRequest { host, port };
    // The asking server waits for a node that is gone for a moment; its peers answer at once.
    // The host leads where this server's records say, by the same rule as at the asker.
    let routed = match resolve(state, &req.host) {
        Ok(node) => route(state, &node, &req, Scope::ForPeer).await,
        Err(refusal) => Err(refusal),
    };
    match routed {
        Ok(target) => {
            if answer(&mut stream, StatusCode::Ok, "").await.is_ok() {
                let _open = GaugeGuard::new(&state.metrics.shared.streams_open);
                // The asking peer's stream is the near end, the node's the tunnel.
                relay::relay(stream, target, &[&state.metrics.shared.bytes]).await;
            }
        }
        Err(refusal) => {
            let _ = answer(&mut stream, refusal.wire(), refusal.to_string()).await;
        }
    }
}

/// Builds the egress TLS acceptor, when TLS was asked for.
pub fn tls_acceptor(
    c: &crate::config::EgressConfig,
) -> Result<Option<tokio_rustls::TlsAcceptor>, tether_transport::tls::TlsError> {
    use tether_transport::tls;
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

/// The caps of one egress listener: [`MAX_CONNECTIONS`] in all, [`MAX_PER_CLIENT`] per client;
/// when full, the oldest connection still sending its request head is closed for the newcomer,
/// so idle connections from the apiserver's own address cannot make its real CONNECT fail.
fn egress_slots() -> Arc<ClientSlots> {
    ClientSlots::new(MAX_CONNECTIONS, MAX_PER_CLIENT, Eviction::OldestIdle)
}

/// Serves one egress connection in its slot, until it ends or is closed to make room.
async fn serve_in_slot<S: AsyncRead + AsyncWrite + Resettable + Send + Unpin>(
    conn: S,
    who: &str,
    slot: &ClientSlot,
    state: &State,
) {
    tokio::select! {
        _ = serve_client(conn, who, slot, state) => {}
        _ = slot.evicted() => debug!(client = who, "egress: an idle connection closed to make room"),
    }
}

/// Serves egress clients on a TCP listener until the task is dropped.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    state: Arc<State>,
) {
    let slots = egress_slots();
    loop {
        let (conn, peer) = tether_endpoint::net::accept_retrying(
            || listener.accept(),
            |e| warn!(error = %e, "egress accept failed"),
        )
        .await;
        let Some(slot) = slots.take(peer.ip()) else {
            warn!(client = %peer, limit = MAX_PER_CLIENT, "egress connection refused: too many from this client, none idle");
            continue;
        };
        let _ = conn.set_nodelay(true);
        let (state, tls) = (state.clone(), tls.clone());
        tokio::spawn(async move {
            let who = peer.to_string();
            match tls {
                Some(acceptor) => {
                    let shake = tokio::time::timeout(HEAD_TIMEOUT, acceptor.accept(conn));
                    let accepted = tokio::select! {
                        a = shake => a,
                        _ = slot.evicted() => return,
                    };
                    match accepted {
                        Ok(Ok(s)) => serve_in_slot(s, &who, &slot, &state).await,
                        Ok(Err(e)) => {
                            warn!(client = %who, error = %e, "egress TLS handshake failed")
                        }
                        Err(_) => warn!(client = %who, "egress TLS handshake timed out"),
                    }
                }
                None => serve_in_slot(conn, &who, &slot, &state).await,
            }
        });
    }
}

/// Serves egress clients on a Unix socket until the task is dropped. Every client of the
/// socket counts as one (its callers share the host), under the same caps as TCP.
pub async fn serve_uds(listener: tokio::net::UnixListener, state: Arc<State>) {
    let slots = egress_slots();
    let socket = std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
    loop {
        let (conn, _) = tether_endpoint::net::accept_retrying(
            || listener.accept(),
            |e| warn!(error = %e, "egress accept failed"),
        )
        .await;
        let Some(slot) = slots.take(socket) else {
            warn!(
                limit = MAX_PER_CLIENT,
                "egress connection on the Unix socket refused: too many, none idle"
            );
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            serve_in_slot(conn, "unix socket", &slot, &state).await;
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
