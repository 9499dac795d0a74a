//! One stream of a tunnel: what its first frame asks for (the control stream, a stream to relay,
//! a renewal, a peer's egress request), and for a stream to relay, the way to an upstream: the
//! local one when healthy, else a peer's (one hop at most), answered with one status, then
//! relayed.

use crate::metrics::Limit;
use crate::state::{Party, State};
use crate::{control, egress, join};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use tether_link::pool::{Link, Policy};
use tether_process::telemetry::{Counted, GaugeGuard, Label};
use tether_proto::capability::Capabilities;
use tether_proto::{code, Message, StatusCode, Target, PROTOCOL_VERSION, SERVICE_APISERVER};
use tether_transport::open::{self, answer};
use tether_transport::relay;
use tether_transport::transport::Stream;
use tracing::{debug, warn};

/// Serves one stream: the control stream, or a stream to relay.
pub(crate) async fn serve_stream(
    mut stream: Stream,
    node: &str,
    party: Party,
    tunnel_id: usize,
    open_streams: Arc<std::sync::atomic::AtomicUsize>,
    state: &State,
) {
    let first = tokio::time::timeout(state.config.header_timeout, stream.recv.read_message()).await;
    let msg = match first {
        Ok(Ok(Some(msg))) => msg,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            state.metrics.protocol_errors.inc();
            warn!(node, error = %e, "stream refused: bad header");
            stream.reset(code::PROTOCOL).await;
            return;
        }
        Err(_) => {
            state.metrics.protocol_errors.inc();
            warn!(node, timeout = ?state.config.header_timeout, "stream refused: no header in time");
            stream.reset(code::PROTOCOL).await;
            return;
        }
    };
    match msg {
        Message::Hello {
            min_version,
            max_version,
            node_name,
            capabilities,
        } => {
            let hello = control::Hello {
                min: min_version,
                max: max_version,
                capabilities: Capabilities::from_announced(&capabilities),
            };
            if party == Party::Peer && !node_name.is_empty() {
                state.announcer.add_inbound_peer(tunnel_id, node_name);
            }
            if party == Party::Agent {
                state
                    .registry
                    .set_capabilities(node, tunnel_id, hello.capabilities.clone());
            }
            control::control(stream, node, party, tunnel_id, hello, state).await
        }
        Message::Open {
            target: Target::Address { host, port },
            hops,
            ..
        } if party == Party::Peer && hops >= 1 => {
            egress::serve_peer_request(stream, host, port, state).await
        }
        Message::Open {
            version,
            target,
            hops,
        } => {
            let count = StreamCount::new(open_streams);
            let tunnel_limit = state.config.limits.max_streams as usize;
            if count.counter().load(Ordering::Relaxed) > tunnel_limit {
                let why = "stream limit of the tunnel reached";
                return busy(
                    &mut stream,
                    node,
                    Limit::StreamsPerTunnel,
                    tunnel_limit,
                    why,
                    state,
                )
                .await;
            }
            let node_limit = state.config.max_streams_per_node;
            if party == Party::Agent && state.registry.node_streams(node) > node_limit {
                let why = "stream limit of the node reached";
                return busy(
                    &mut stream,
                    node,
                    Limit::StreamsPerNode,
                    node_limit,
                    why,
                    state,
                )
                .await;
            }
            serve_open(stream, node, version, target, hops, state).await
        }
        Message::Renew { csr } if party == Party::Agent => {
            let key = state
                .registry
                .tunnels(node)
                .into_iter()
                .find(|e| e.tunnel.id() == tunnel_id)
                .map(|e| e.key_hash);
            let Some(key) = key else {
                return stream.reset(code::REVOKED).await;
            };
            match state.renewals.begin(node, std::time::Instant::now()) {
                Ok(_permit) => join::renew(stream, node, &key, csr, state).await,
                Err(why) => join::refuse_renewal(stream, node, why, state).await,
            }
        }
        other => {
            state.metrics.protocol_errors.inc();
            warn!(
                node,
                message = other.name(),
                "stream refused: unexpected first message"
            );
            stream.reset(code::PROTOCOL).await;
        }
    }
}

/// Refuses a stream with a status (and counts it).
async fn refuse(stream: &mut Stream, code: StatusCode, message: String, state: &State) {
    state.metrics.stream_failed(code);
    let _ = answer(stream, code, message).await;
}

/// Refuses a stream because a stream limit was reached: `busy` (the agent tries the next
/// server), a log line and the limit's metric.
async fn busy(
    stream: &mut Stream,
    node: &str,
    limit_name: Limit,
    limit: usize,
    why: &str,
    state: &State,
) {
    state.metrics.limit_hit(limit_name);
    warn!(node, limit, limit_name = %limit_name.label(), "stream refused: {why}");
    refuse(stream, StatusCode::Busy, why.to_string(), state).await
}

/// A stream to relay: check it, then reach an apiserver, answer the status, relay.
async fn serve_open(
    mut stream: Stream,
    node: &str,
    version: u8,
    target: Target,
    hops: u8,
    state: &State,
) {
    // Counted from before the drain check until it relays: a drain that begins in between
    // waits for this stream.
    let opening = GaugeGuard::new(&state.opening);
    if version != PROTOCOL_VERSION {
        let why = format!("unsupported stream version {version}");
        warn!(node, "stream refused: {why}");
        return refuse(&mut stream, StatusCode::BadRequest, why, state).await;
    }
    // The apiserver is health-checked; a named service is tried as if healthy.
    let (service, upstream, checked) = match &target {
        Target::Service(s) if s == SERVICE_APISERVER => (s.as_str(), state.upstream.clone(), true),
        Target::Service(s) => match state.services.get(s) {
            Some(up) => (s.as_str(), up.clone(), false),
            None => {
                warn!(node, service = %s, "stream refused: unknown service");
                let why = format!("unknown service {s:?}");
                return refuse(&mut stream, StatusCode::UnknownService, why, state).await;
            }
        },
        Target::Address { .. } => {
            warn!(node, %target, "stream refused: servers do not open arbitrary addresses");
            let why = "servers do not open arbitrary addresses".to_string();
            return refuse(&mut stream, StatusCode::RefusedByPolicy, why, state).await;
        }
    };
    if state.draining.load(Ordering::Relaxed) {
        let why = "server is draining".to_string();
        return refuse(&mut stream, StatusCode::Draining, why, state).await;
    }
    let Ok(_permit) = state.streams.clone().try_acquire_owned() else {
        let (limit, why) = (state.config.max_streams, "server stream limit reached");
        return busy(
            &mut stream,
            node,
            Limit::StreamsPerServer,
            limit,
            why,
            state,
        )
        .await;
    };

    // A healthy upstream first. When it is known to be down, a peer first, and the upstream
    // only as a last resort (the check may be a second old). A relayed stream (hops > 0) is
    // never relayed again: one hop at most, so no loop.
    let healthy = !checked || upstream.is_healthy();
    let mut last_error = String::from("no healthy peer");
    if healthy {
        match upstream.connect().await {
            Ok(tcp) => return relay_answered(stream, tcp, None, node, state, opening).await,
            Err(e) => last_error = format!("upstream {} unreachable: {e}", upstream.addr()),
        }
    }
    if hops == 0 {
        if let Some((link, peer_stream)) = open_via_peer(state, service).await {
            return relay_answered(stream, peer_stream, Some(link), node, state, opening).await;
        }
    }
    if !healthy {
        match upstream.connect().await {
            Ok(tcp) => return relay_answered(stream, tcp, None, node, state, opening).await,
            Err(e) => last_error = format!("upstream {} unreachable: {e}", upstream.addr()),
        }
    }
    debug!(node, error = %last_error, service, "no way to the upstream");
    refuse(
        &mut stream,
        StatusCode::UpstreamUnreachable,
        last_error,
        state,
    )
    .await;
}

/// Answers the node's stream `Ok` and relays it to `near`: the upstream's socket, or the stream
/// of the peer it goes `through`. Counted on the server, on the node, and on the peer's link
/// (which is then not retired under it).
async fn relay_answered<A: relay::End>(
    mut stream: Stream,
    near: A,
    through: Option<Arc<Link>>,
    node: &str,
    state: &State,
    opening: GaugeGuard<'_>,
) {
    if answer(&mut stream, StatusCode::Ok, "").await.is_err() {
        return;
    }
    state.metrics.shared.streams_total.inc();
    if through.is_some() {
        state.metrics.peer_relayed.inc();
    }
    let _open = GaugeGuard::new(&state.metrics.shared.streams_open);
    drop(opening);
    let _on_link = through.as_ref().map(|l| l.stream_guard());
    let peer = through.as_ref().map(|l| l.server.clone());
    let node_meter = state.registry.meter(node).unwrap_or_default();
    // The near end first, the node's stream as the tunnel: bytes count as on the way to or from
    // the node.
    let summary = relay::relay(near, stream, &[&state.metrics.shared.bytes, &*node_meter]).await;
    debug!(node, ?peer, up = summary.from_tunnel, down = summary.to_tunnel, outcome = ?summary.outcome,
        "stream done");
}

/// Opens a stream to `service` through the first healthy peer that accepts it.
async fn open_via_peer(state: &State, service: &str) -> Option<(Arc<Link>, Stream)> {
    for link in state.peers.candidates(Policy::LeastStreams) {
        if !link.healthy() {
            continue;
        }
        let target = Target::Service(service.into());
        match open::open(&link.tunnel, target, 1, state.config.peer_open_timeout).await {
            Ok(s) => return Some((link, s)),
            Err(e) => {
                state.metrics.peer_relay_failures.inc();
                debug!(peer = %link.server, error = %e, "peer did not take a relayed stream");
            }
        }
    }
    None
}

/// Counts a tunnel's open streams while alive.
type StreamCount = Counted<Arc<std::sync::atomic::AtomicUsize>>;
