//! Tunnel admission: who is on the other end (an agent or a peer server, from the verified
//! certificate alone), whether the records admit its key, whether its node has room for one more
//! tunnel; then the tunnel's streams are accepted until it closes or its certificate expires.

use crate::metrics::Limit;
use crate::registry::Entry;
use crate::state::{Party, State};
use crate::{identity, streams};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tether_proto::capability::Capabilities;
use tether_proto::code;
use tether_transport::tls;
use tether_transport::transport::Tunnel;
use tracing::{info, warn};

/// Serves one authenticated tunnel until it closes.
pub(crate) async fn serve_tunnel(tunnel: Tunnel, state: Arc<State>) {
    let remote = tunnel.remote_addr();
    // The node name comes from the verified certificate, never from what the agent says.
    let Some(cert) = tunnel
        .peer_certificates()
        .and_then(|c| c.into_iter().next())
    else {
        state.metrics.handshake_failures.inc();
        warn!(peer = %remote, "refused tunnel: no client certificate (join with a token, or issue one with `tether-server issue-agent`)");
        tunnel.close(code::REFUSED, "a client certificate is required");
        return;
    };
    let (Some(peer), Some(key)) = (tls::peer_info(&cert), tether_trust::key_hash_of_cert(&cert))
    else {
        state.metrics.handshake_failures.inc();
        warn!(peer = %remote, "refused tunnel: client certificate has no common name");
        tunnel.close(code::PROTOCOL, "certificate has no common name");
        return;
    };
    let party = if peer.server_auth {
        Party::Peer
    } else {
        Party::Agent
    };
    let name = peer.common_name;
    if party == Party::Agent {
        if let Err(e) = tether_trust::validate_node_name(&name) {
            state.metrics.handshake_failures.inc();
            warn!(peer = %remote, error = %e, "refused tunnel: the certificate's node name is not valid");
            tunnel.close(code::REFUSED, "invalid node name");
            return;
        }
    }
    let open_streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    if party == Party::Agent {
        match identity::refusal(&state.authority.check(&name, &key)) {
            None => {
                // Written to the store in the background: the handshake does not wait for it.
                let (authority, name, key) = (state.authority.clone(), name.clone(), key.clone());
                tokio::spawn(async move { authority.confirm(&name, &key).await });
            }
            Some((code, why)) => {
                state.metrics.handshake_failures.inc();
                warn!(node = %name, peer = %remote, reason = why, "refused tunnel");
                tunnel.close(code, why);
                return;
            }
        }
        if state.registry.tunnels(&name).len() >= state.config.max_tunnels_per_node {
            state.metrics.limit_hit(Limit::TunnelsPerNode);
            warn!(node = %name, peer = %remote, limit = state.config.max_tunnels_per_node,
                "refused tunnel: too many tunnels for this node");
            tunnel.close(code::LIMIT, "too many tunnels for this node");
            return;
        }
        state.registry.add(
            &name,
            Entry {
                tunnel: tunnel.clone(),
                remote,
                since: SystemTime::now(),
                cert_not_after: peer.not_after,
                key_hash: key.clone(),
                issuer: state.trust.borrow().issuer_of(&cert),
                addresses: Vec::new(),
                refused: Vec::new(),
                streams: open_streams.clone(),
                meter: Arc::default(),
                capabilities: Capabilities::default(),
            },
        );
        state.metrics.tunnels_total.inc();
        state.metrics.tunnels_up.inc();
        info!(node = %name, peer = %remote, transport = %tunnel.kind(), "tunnel up");
    } else {
        state.metrics.peer_tunnels_in.inc();
        info!(server = %name, peer = %remote, "peer tunnel up");
    }

    // A certificate that expires while its tunnel is up ends the tunnel: the node must renew to
    // stay, as it must to connect.
    let now = tether_process::units::unix_seconds(SystemTime::now());
    let until_expiry = Duration::from_secs(
        u64::try_from(peer.not_after)
            .unwrap_or(0)
            .saturating_sub(now),
    );
    let expired = tokio::time::sleep(until_expiry);
    tokio::pin!(expired);
    loop {
        let accepted = tokio::select! {
            a = tunnel.accept_stream() => a,
            _ = &mut expired => {
                state.metrics.expired_closed.inc();
                warn!(node = %name, peer = %remote, "closing tunnel: its certificate expired");
                tunnel.close(code::REFUSED, "certificate expired");
                break;
            }
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                if party == Party::Agent {
                    info!(node = %name, peer = %remote, reason = %e, "tunnel down");
                } else {
                    info!(server = %name, peer = %remote, reason = %e, "peer tunnel down");
                }
                break;
            }
        };
        let state = state.clone();
        let (name, id) = (name.clone(), tunnel.id());
        let counter = open_streams.clone();
        tokio::spawn(async move {
            streams::serve_stream(stream, &name, party, id, counter, &state).await
        });
    }
    if party == Party::Agent {
        state.registry.remove(&name, tunnel.id());
        state.metrics.tunnels_up.dec();
    } else {
        state.announcer.remove_inbound_peer(tunnel.id());
        state.metrics.peer_tunnels_in.dec();
    }
}
