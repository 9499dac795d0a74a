use std::collections::BTreeSet;

/// Offered by every server since 0.1: the kube-apiserver service.
pub const APISERVER: &str = super::SERVICE_APISERVER;
/// Said by a server that dials a peer (since 0.1): the tunnel is a server-to-server link.
pub const PEER: &str = "peer";
/// Since 0.2: node records travel as [`super::Message::NodeRecordV2`], ordered by epoch and
/// version instead of clocks, in both directions of a server-to-server link.
pub const RECORDS_V2: &str = "records-v2";
/// Since 0.3: node records carry the addresses each node owns (a record with addresses
/// travels as a frame of kind `NODE_RECORD_V3`); a peer without it gets them without.
pub const RECORDS_ADDRESSES: &str = "records-addresses";
/// Since 0.2: the side announces its capabilities. A hello or welcome without it comes from
/// 0.1, which knows only [`APISERVER`] and [`PEER`].
pub const CAPABILITIES: &str = "caps";

/// Since 0.2: a server that reads an `Open` leaves the bytes behind it on the stream, and
/// relays them once its upstream is connected, so an agent may send a TLS client's first
/// bytes with the open (docs/protocol.md, "Early bytes").
pub const EARLY_DATA: &str = "early-data";

/// Since 0.3, said by agents and servers: liveness is the agent's to probe. The agent sends
/// [`super::Message::Ping`] as often as its NAT bindings need and when it doubts a server;
/// the server answers each with [`super::Message::Pong`], sends no heartbeats of its own
/// over TCP, and reports a peer server it lost with [`super::Message::ServerDown`]. Idle
/// tunnels go near-silent, and a link blackout no longer reads as a dead server
/// (docs/operations.md, "Liveness: a dead server, or a dead link").
pub const LIVENESS: &str = "liveness";

/// Since 0.3, said by agents: send [`super::Message::Clock`] after the welcome, so that the
/// agent can show how far its clock is from the server's.
pub const CLOCK: &str = "clock";

/// Since 0.3, said by agents: the server may send [`super::Message::RenewNow`] (a CA
/// rotation asks every connected node to renew at once). Agents without it renew when their
/// certificate is due, as before.
pub const RENEW_NOW: &str = "renew-now";

/// What this build announces on every tunnel, besides the role-specific [`PEER`].
pub const ANNOUNCED: &[&str] = &[
    APISERVER,
    CAPABILITIES,
    RECORDS_V2,
    EARLY_DATA,
    RECORDS_ADDRESSES,
    LIVENESS,
    CLOCK,
    RENEW_NOW,
];

/// Longest capability name kept; longer ones are ignored.
pub const MAX_NAME: usize = 64;

/// The capabilities the other side announced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Capabilities(BTreeSet<String>);

impl Capabilities {
    /// What this build announces, plus `extra` (for example [`PEER`]).
    pub fn ours(extra: &[&str]) -> Vec<String> {
        ANNOUNCED
            .iter()
            .chain(extra.iter())
            .map(|s| s.to_string())
            .collect()
    }

    /// The set a peer announced. The list is already bounded by the decoder
    /// ([`super::MAX_LIST_ITEMS`]); names longer than [`MAX_NAME`] are dropped.
    pub fn from_announced(list: &[String]) -> Self {
        Capabilities(
            list.iter()
                .filter(|c| !c.is_empty() && c.len() <= MAX_NAME)
                .cloned()
                .collect(),
        )
    }

    pub fn has(&self, name: &str) -> bool {
        self.0.contains(name)
    }

    /// The names, sorted (for `status`).
    pub fn names(&self) -> Vec<String> {
        self.0.iter().cloned().collect()
    }
}
