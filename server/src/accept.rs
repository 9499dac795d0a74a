//! Accepting tunnels on both transports: the QUIC endpoint and the TLS-over-TCP listener share
//! one port, one budget of handshakes in progress, one way to fail a handshake, and hand every
//! finished handshake to the same place ([`serve_connection`]): a join, or a tunnel to admit.

use crate::metrics::Limit;
use crate::state::State;
use crate::{admission, join};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tether_endpoint::client_slots::ClientSlot;
use tether_process::shutdown::ShutdownSignal;
use tether_proto::code;
use tether_transport::tls;
use tether_transport::transport::{tcp::TcpTunnel, TransportKind, Tunnel};
use tracing::warn;

/// Most handshakes in progress at once, over both transports. Past half of it, QUIC clients
/// whose address is not validated yet are asked to retry (proving their address); past all of
/// it, new handshakes are refused.
pub const MAX_HANDSHAKES: usize = 4096;
/// Most handshakes in progress from one source (an IPv4 address, an IPv6 /64), over both
/// transports: one address once held all [`MAX_HANDSHAKES`] and refused every new tunnel and
/// join. Generous for many nodes behind one NAT reconnecting at once (a handshake takes
/// milliseconds); past half of it, that source's QUIC clients must prove their address.
pub const MAX_HANDSHAKES_PER_SOURCE: usize = MAX_HANDSHAKES / 16;
/// A TCP connection that sends no TLS byte within this is closed: a real client sends its
/// ClientHello at once, and a silent one would hold a handshake slot for the whole timeout.
pub const FIRST_BYTE_TIMEOUT: Duration = Duration::from_secs(2);

/// Most join connections served at once: each holds at most [`crate::config::JOIN_WINDOW`] (QUIC) or one yamux
/// window (TCP), so strangers can hold at most a few MiB of this server together.
pub const MAX_JOINS: usize = 64;

/// A place among the handshakes in progress, or `None` (counted and logged) when all are
/// taken, or all of the source's.
fn handshake_slot(state: &State, remote: SocketAddr, kind: TransportKind) -> Option<ClientSlot> {
    let slot = state.handshakes.take(remote.ip());
    if slot.is_none() {
        state.metrics.limit_hit(Limit::Handshakes);
        if let Some(left_out) = state.noisy_log.allow() {
            warn!(left_out, peer = %remote, transport = %kind, "refused tunnel: too many handshakes in progress (in all, or from this source)");
        }
    }
    slot
}

/// Runs a handshake within the handshake timeout. A failure or a stall is counted and logged
/// here, the same for both transports (at most a line a second: anyone can cause them).
async fn handshake<T, E: std::fmt::Display>(
    state: &State,
    remote: SocketAddr,
    kind: TransportKind,
    shake: impl Future<Output = Result<T, E>>,
) -> Option<T> {
    let timeout = state.config.handshake_timeout;
    let failure = match tokio::time::timeout(timeout, shake).await {
        Ok(Ok(t)) => return Some(t),
        Ok(Err(e)) => e.to_string(),
        Err(_) => {
            state.metrics.limit_hit(Limit::HandshakeTimeout);
            format!("did not complete within {timeout:?}")
        }
    };
    state.metrics.handshake_failures.inc();
    if let Some(left_out) = state.noisy_log.allow() {
        warn!(left_out, peer = %remote, transport = %kind, error = %failure, "refused tunnel: TLS handshake failed");
    }
    None
}

/// Accepts QUIC connections until shutdown.
pub(crate) async fn accept_quic(
    endpoint: quinn::Endpoint,
    state: Arc<State>,
    mut stop: ShutdownSignal,
) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = stop.wait() => return,
        };
        let Some(incoming) = incoming else { return };
        if state.draining.load(Ordering::Relaxed) {
            incoming.refuse();
            continue;
        }
        let remote = incoming.remote_address();
        let (all, mine) = state.handshakes.held(remote.ip());
        let busy = all >= MAX_HANDSHAKES / 2 || mine >= MAX_HANDSHAKES_PER_SOURCE / 2;
        if busy && !incoming.remote_address_validated() && incoming.may_retry() {
            // Many handshakes at once, in all or from this source: make the client prove its
            // address first (one round trip for a real client, nothing kept here for a
            // spoofed one, whose handshakes then never count against a real source).
            let _ = incoming.retry();
            continue;
        }
        let Some(permit) = handshake_slot(&state, remote, TransportKind::Quic) else {
            incoming.refuse();
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let shake = async {
                let connecting = incoming.accept().map_err(|e| e.to_string())?;
                connecting.await.map_err(|e| e.to_string())
            };
            let Some(conn) = handshake(&state, remote, TransportKind::Quic, shake).await else {
                return;
            };
            drop(permit);
            let mut max = state.config.transport_limits().max_streams;
            if tls::alpn_of(&conn).as_deref() == Some(tls::ALPN_JOIN) {
                max = 1;
                conn.set_max_concurrent_bi_streams(1u32.into());
            } else {
                conn.set_receive_window(state.config.limits.conn_window.into());
            }
            serve_connection(Tunnel::from_quic(conn, max), remote, state).await;
        });
    }
}

/// Accepts tunnels over TLS on TCP (the fallback transport) until shutdown.
pub(crate) async fn accept_tcp(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    mut stop: ShutdownSignal,
) {
    loop {
        let accepted = tether_endpoint::net::accept_retrying(
            || listener.accept(),
            |e| {
                if let Some(left_out) = state.noisy_log.allow() {
                    warn!(left_out, error = %e, "TCP accept failed");
                }
            },
        );
        let (tcp, remote) = tokio::select! {
            a = accepted => a,
            _ = stop.wait() => return,
        };
        if state.draining.load(Ordering::Relaxed) {
            continue;
        }
        let Some(permit) = handshake_slot(&state, remote, TransportKind::Tcp) else {
            continue;
        };
        let state = state.clone();
        let acceptor = state
            .tcp_tls
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let max_streams = state.config.transport_limits().max_streams as usize;
        tokio::spawn(async move {
            // Nothing is read or allocated for a connection that has sent nothing yet.
            if !matches!(
                tokio::time::timeout(FIRST_BYTE_TIMEOUT, tcp.readable()).await,
                Ok(Ok(()))
            ) {
                state.metrics.limit_hit(Limit::HandshakeTimeout);
                if let Some(left_out) = state.noisy_log.allow() {
                    warn!(left_out, peer = %remote, "refused tunnel: no TLS bytes within {FIRST_BYTE_TIMEOUT:?}");
                }
                return;
            }
            let shake = TcpTunnel::accept(tcp, acceptor, state.config.liveness, max_streams);
            let Some(t) = handshake(&state, remote, TransportKind::Tcp, shake).await else {
                return;
            };
            drop(permit);
            serve_connection(Tunnel::from_tcp(t), remote, state).await;
        });
    }
}

/// A tunnel whose handshake completed, on either transport: a join, or a tunnel to serve.
async fn serve_connection(tunnel: Tunnel, remote: SocketAddr, state: Arc<State>) {
    if tunnel.alpn().as_deref() == Some(tls::ALPN_JOIN) {
        let Ok(_slot) = state.joins.clone().try_acquire_owned() else {
            state.metrics.limit_hit(Limit::Joins);
            if let Some(left_out) = state.noisy_log.allow() {
                warn!(left_out, peer = %remote, limit = MAX_JOINS, "refused join: too many joins in progress");
            }
            tunnel.close(code::LIMIT, "too many joins in progress; retry later");
            return;
        };
        return join::serve(tunnel, remote, &state).await;
    }
    admission::serve_tunnel(tunnel, state).await;
}
