//! The control stream of a tunnel: version agreement, then this server's announcements (health,
//! the server list, drain) as they change, heartbeats over TCP, node records to peers; and what
//! the other side reports (a node's addresses, a peer's records).
//!
//! Reads here sit in a `select!` with the announcements and heartbeats: `read_message` keeps a
//! partly read frame in the stream half, so a cancelled read loses nothing.

use crate::announce;
use crate::authority;
use crate::state::{Party, State};
use tether_proto::capability::{self, Capabilities};
use tether_proto::{code, Message, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use tether_transport::transport::Stream;
use tracing::{debug, warn};

/// What the dialing side said in its hello.
pub(crate) struct Hello {
    pub(crate) min: u8,
    pub(crate) max: u8,
    pub(crate) capabilities: Capabilities,
}

/// The next node records for a peer's control stream; never, for an agent's.
async fn next_records(outbox: &mut Option<authority::RecordsOutbox>) -> Vec<Message> {
    match outbox {
        Some(o) => o.next().await,
        None => std::future::pending().await,
    }
}

/// The control stream: version agreement, then this server's announcements (health, the
/// server list, drain) as they change.
pub(crate) async fn control(
    mut stream: Stream,
    node: &str,
    party: Party,
    tunnel_id: usize,
    hello: Hello,
    state: &State,
) {
    let (min, max, capabilities) = (hello.min, hello.max, &hello.capabilities);
    if !(min..=max).contains(&PROTOCOL_VERSION) {
        state.metrics.protocol_errors.inc();
        warn!(
            node,
            min,
            max,
            ours = PROTOCOL_VERSION,
            oldest = MIN_PROTOCOL_VERSION,
            "no common protocol version"
        );
        stream.reset(code::PROTOCOL).await;
        return;
    }
    let welcome = Message::Welcome {
        version: PROTOCOL_VERSION,
        server_id: state.instance_id.clone(),
        capabilities: Capabilities::ours(&[]),
    };
    if stream.send.write_message(&welcome).await.is_err() {
        return;
    }
    if capabilities.has(capability::CLOCK) {
        let unix_ms = tether_process::units::unix_millis(std::time::SystemTime::now());
        if stream
            .send
            .write_message(&Message::Clock { unix_ms })
            .await
            .is_err()
        {
            return;
        }
    }
    // A node is asked to renew at once when it is not on the CA this server issues from, or
    // trusts other CAs than this server: now, and whenever the CAs change (a CA rotation).
    let renew_now = party == Party::Agent && capabilities.has(capability::RENEW_NOW);
    let mut trust = state.trust.subscribe();
    if renew_now {
        let ask = trust.borrow_and_update().renew_now();
        if stream.send.write_message(&ask).await.is_err() {
            return;
        }
    }
    let mut rx = state.announcer.subscribe();
    let mut sent: Option<announce::Announcement> = None;
    // Over TCP the health is repeated every keepalive interval to agents older than the
    // liveness capability: their proof that this server is alive end to end (see
    // `Stream::needs_heartbeat`). Newer agents probe (`Ping`) as often as they need, and are
    // told at once of a peer this server lost.
    let probes = party == Party::Agent && capabilities.has(capability::LIVENESS);
    let heartbeat = stream.needs_heartbeat() && !probes;
    let mut lost = state.announcer.subscribe_lost();
    let mut beat = tokio::time::interval(state.config.liveness.keepalive_interval);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Peers also get the node records, each when it is new to them.
    let mut records = (party == Party::Peer)
        .then(|| authority::RecordsOutbox::new(state.authority.clone(), capabilities));
    loop {
        let now = rx.borrow_and_update().clone();
        for msg in announce::diff(sent.as_ref(), &now) {
            if stream.send.write_message(&msg).await.is_err() {
                return;
            }
        }
        sent = Some(now);
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            r = trust.changed(), if renew_now => {
                if r.is_err() {
                    return;
                }
                let ask = trust.borrow_and_update().renew_now();
                if stream.send.write_message(&ask).await.is_err() {
                    return;
                }
            }
            msgs = next_records(&mut records) => {
                for m in msgs {
                    if stream.send.write_message(&m).await.is_err() {
                        return;
                    }
                }
            }
            id = lost.recv(), if probes => match id {
                Ok(server_id) => {
                    if stream.send.write_message(&Message::ServerDown { server_id }).await.is_err() {
                        return;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {}
                Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
            },
            _ = beat.tick(), if heartbeat => {
                let healthy = sent.as_ref().is_some_and(|a| a.healthy);
                let msg = Message::Health { upstream_healthy: healthy };
                if stream.send.write_message(&msg).await.is_err() {
                    return;
                }
            }
            m = stream.recv.read_message() => match m {
                Ok(Some(Message::NodeInfo { addresses })) if party == Party::Agent => {
                    debug!(node, ?addresses, "node addresses");
                    claim_addresses(state, node, tunnel_id, addresses).await;
                }
                Ok(Some(m @ (Message::NodeRecord { .. } | Message::NodeRecordV2 { .. })))
                    if party == Party::Peer =>
                {
                    state.authority.merge_from_peer(node, &m)
                }
                Ok(Some(Message::Ping { nonce })) => {
                    if stream.send.write_message(&Message::Pong { nonce }).await.is_err() {
                        return;
                    }
                }
                Ok(Some(m)) => debug!(node, message = m.name(), "control message"),
                Ok(None) => return,
                Err(e) => {
                    state.metrics.protocol_errors.inc();
                    warn!(node, error = %e, "control stream failed; the tunnel's announcements stop");
                    return;
                }
            },
        }
    }
}

/// A node's agent reported its addresses: each must be an IP address, and becomes the node's
/// unless another node owns it (see `Authority::claim_addresses`). What is refused is logged
/// with both names (at most a line a second: a node can repeat its claims), counted, and shown
/// in `status`.
async fn claim_addresses(state: &State, node: &str, tunnel_id: usize, reported: Vec<String>) {
    let mut refused: Vec<(String, String)> = Vec::new();
    let mut addrs = Vec::new();
    for a in reported {
        match a.parse::<std::net::IpAddr>() {
            Ok(ip) => addrs.push(ip),
            Err(_) => {
                state.metrics.address_conflicts.inc();
                if let Some(left_out) = state.noisy_log.allow() {
                    warn!(left_out, node, address = %a, "address claim refused: not an IP address (a node is reached by its name, which its certificate proves)");
                }
                refused.push((a, String::new()));
            }
        }
    }
    let Some(key) = state
        .registry
        .tunnels(node)
        .into_iter()
        .find(|e| e.tunnel.id() == tunnel_id)
        .map(|e| e.key_hash)
    else {
        return;
    };
    let claim = match state.authority.claim_addresses(node, &key, &addrs).await {
        Ok(c) => c,
        Err(e) => {
            warn!(node, error = %e, "cannot record the node's addresses; they lead nowhere until its next claim");
            return;
        }
    };
    for (address, owner) in claim.refused {
        state.metrics.address_conflicts.inc();
        // A node may repeat its claims at will: at most a line a second, the rest counted.
        if let Some(left_out) = state.noisy_log.allow() {
            match &owner {
                Some(other) => warn!(left_out, node, %address, owner = %other,
                    "address claim refused: another node owns this address (`tether-server agent release-address` frees it)"),
                None => warn!(left_out, node, %address,
                    "address claim refused: the node owns as many addresses as it may"),
            }
        }
        refused.push((address.to_string(), owner.unwrap_or_default()));
    }
    // What status shows is bounded like the claim itself.
    refused.truncate(tether_trust::records::MAX_ADDRESSES);
    let owned = claim.owned.iter().map(|a| a.to_string()).collect();
    state
        .registry
        .set_addresses(node, tunnel_id, owned, refused);
}
