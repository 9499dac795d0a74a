//! The status document: what `GET /status` answers, what `status` prints, and what tests read.
//!
//! One set of types for all three, so a field the server fills is the field the command shows.
//! Reading is lenient (every field has a default and unknown fields are ignored), so that the
//! `status` command of one release reads the document of the release before or after it.

use serde::{Deserialize, Serialize};

/// A server's or an agent's status, told apart by `"kind"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
// One document is built per `/status` request: its size on the stack does not matter.
#[allow(clippy::large_enum_variant)]
pub enum Status {
    Server(ServerStatus),
    Agent(AgentStatus),
}

/// A `tether-server`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ServerStatus {
    pub version: String,
    /// Random per process start: tells a restarted server from the one before.
    pub instance: String,
    pub listen: Option<String>,
    /// The address this server announces to agents and peers.
    pub advertise: Option<String>,
    pub draining: bool,
    pub upstream: Upstream,
    pub services: Vec<Service>,
    /// Unix seconds.
    pub certificate_expiry: Option<i64>,
    pub nodes: Vec<NodeStatus>,
    /// Addresses two nodes own at once (two first claims on two servers before either heard
    /// of the other): egress to them answers 409 until an operator releases them.
    pub contested_addresses: Vec<ContestedAddress>,
    pub configured_peers: Vec<String>,
    pub peers: Vec<LinkStatus>,
    pub datastore: Datastore,
    pub ca: CaStatus,
}

/// The CAs of a server, and the CA rotation it takes part in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CaStatus {
    /// The CA this server issues from (hex SHA-256 of its certificate, as tokens pin it).
    pub issuer: String,
    /// Every CA it trusts, the issuing one first: two while a rotation runs.
    pub trusted: Vec<String>,
    /// The datastore's last rotation, running or finished.
    pub rotation: Option<RotationStatus>,
    /// Nodes still on the old CA of the running rotation (none when none runs).
    pub nodes_on_old_ca: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RotationStatus {
    pub old: String,
    pub new: String,
    /// Unix seconds.
    pub started: i64,
    /// Unix seconds; none while it runs.
    pub finished: Option<i64>,
}

/// Where a server keeps records and tokens, and whether it answers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Datastore {
    /// `dir` or `etcd`.
    pub kind: String,
    /// False while etcd is unreachable: the server serves from the last state it read, and
    /// joins, renewals and commands are refused.
    pub available: bool,
    /// The etcd revision applied last.
    pub revision: i64,
    pub endpoints: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Upstream {
    pub address: String,
    pub healthy: bool,
}

/// A service a server relays to, besides the apiserver.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Service {
    pub name: String,
    pub address: String,
}

/// One node with tunnels to this server.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct NodeStatus {
    pub name: String,
    /// The newest tunnel's remote address.
    pub address: Option<String>,
    /// The addresses the node owns, as its agent claimed them (its egress targets).
    pub addresses: Vec<String>,
    /// Addresses its agent claimed and was refused: owned by another node (named), not an IP
    /// address, or past the bound (no owner).
    pub refused_addresses: Vec<RefusedAddress>,
    pub transport: Option<String>,
    /// The newest tunnel's key-exchange group (`X25519MLKEM768`: post-quantum).
    pub key_exchange: Option<String>,
    pub tunnels: usize,
    pub streams: u64,
    pub bytes_from_node: u64,
    pub bytes_to_node: u64,
    /// Unix seconds of the oldest tunnel.
    pub connected_since: Option<u64>,
    /// Unix seconds.
    pub certificate_expiry: Option<i64>,
    pub capabilities: Vec<String>,
    /// The CA that issued the newest tunnel's certificate (its hash); none for one this server
    /// trusts no more.
    pub ca: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct RefusedAddress {
    pub address: String,
    /// The node that owns it; empty when the claim was refused for another reason.
    pub owner: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ContestedAddress {
    pub address: String,
    pub nodes: Vec<String>,
}

/// A tunnel kept to a server: an agent's servers, a server's peers.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LinkStatus {
    /// The address dialed.
    pub address: String,
    /// `up` or `down`; the fields below are only known while up.
    pub state: String,
    pub instance: Option<String>,
    pub remote: Option<String>,
    pub transport: Option<String>,
    /// The tunnel's key-exchange group (`X25519MLKEM768`: post-quantum).
    pub key_exchange: Option<String>,
    /// Whether the server's upstream was healthy when it last said.
    pub healthy: Option<bool>,
    pub draining: bool,
    pub streams: u64,
    pub rtt_ms: Option<f64>,
    /// Unix seconds.
    pub connected_since: Option<u64>,
    pub capabilities: Vec<String>,
    /// How far the server's clock is ahead of this one's, milliseconds (negative: behind), as
    /// its `Clock` said when the tunnel came up; unknown from a server before 0.3.
    pub clock_skew_ms: Option<i64>,
}

impl LinkStatus {
    /// A server that is known but has no tunnel now.
    pub fn down(address: &str) -> Self {
        LinkStatus {
            address: address.to_string(),
            state: "down".into(),
            ..Default::default()
        }
    }
}

/// A `tether-agent`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AgentStatus {
    pub version: String,
    pub node: String,
    pub draining: bool,
    /// Unix seconds.
    pub certificate_expiry: Option<i64>,
    pub servers: Vec<LinkStatus>,
    pub listeners: Vec<Listener>,
    /// The HTTP proxy TLS over TCP and joins go through (`http://[user@]host:port`), if any.
    pub proxy: Option<String>,
}

/// A local address the agent forwards, and the service it carries.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Listener {
    pub address: String,
    pub service: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_reads_leniently() {
        let doc = Status::Agent(AgentStatus {
            version: "0.2.0".into(),
            node: "edge-1".into(),
            servers: vec![LinkStatus::down("10.0.0.1:9443")],
            ..Default::default()
        });
        let text = serde_json::to_string(&doc).unwrap();
        assert!(text.contains(r#""kind":"agent""#), "{text}");
        assert_eq!(serde_json::from_str::<Status>(&text).unwrap(), doc);
        // A document with fields this release does not know, and without some it does.
        let other: Status = serde_json::from_str(
            r#"{"kind":"server","version":"9.9","shiny":[1],"nodes":[{"name":"n"}]}"#,
        )
        .unwrap();
        match other {
            Status::Server(s) => assert_eq!(s.nodes[0].name, "n"),
            Status::Agent(_) => panic!("a server document read as an agent's"),
        }
    }
}
