//! Which nodes are connected to this server, through which tunnels.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::SystemTime;
use tether_common::protocol::capability::Capabilities;
use tether_common::transport::Tunnel;

/// One agent tunnel.
#[derive(Debug, Clone)]
pub struct Entry {
    pub tunnel: Tunnel,
    pub remote: SocketAddr,
    pub since: SystemTime,
    /// Expiry of the agent's certificate, seconds since the Unix epoch.
    pub cert_not_after: i64,
    /// SHA-256 of the certificate's public key: checked against the node records.
    pub key_hash: String,
    /// The node's addresses, as its agent reported them.
    pub addresses: Vec<String>,
    /// Streams open on this tunnel.
    pub streams: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Bytes relayed for streams of this tunnel (for `status`).
    pub meter: std::sync::Arc<tether_common::relay::Meter>,
    /// What the agent announced in its hello (empty until the hello, and from a 0.1 agent
    /// nothing but `apiserver`): new behaviour towards it is used only when announced.
    pub capabilities: Capabilities,
}

/// Connected nodes by name. A node may hold several tunnels (a restart overlapping the old
/// connection's timeout, or several NAT paths).
#[derive(Debug, Default)]
pub struct Registry {
    nodes: Mutex<HashMap<String, Vec<Entry>>>,
}

impl Registry {
    pub fn add(&self, node: &str, entry: Entry) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.entry(node.to_string()).or_default().push(entry);
    }

    pub fn remove(&self, node: &str, tunnel_id: usize) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = nodes.get_mut(node) {
            list.retain(|e| e.tunnel.id() != tunnel_id);
            if list.is_empty() {
                nodes.remove(node);
            }
        }
    }

    /// Records the addresses a node's agent reported on one tunnel.
    pub fn set_addresses(&self, node: &str, tunnel_id: usize, addresses: Vec<String>) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = nodes
            .get_mut(node)
            .and_then(|l| l.iter_mut().find(|e| e.tunnel.id() == tunnel_id))
        {
            e.addresses = addresses;
        }
    }

    /// Records what a node's agent announced in its hello on one tunnel.
    pub fn set_capabilities(&self, node: &str, tunnel_id: usize, capabilities: Capabilities) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = nodes
            .get_mut(node)
            .and_then(|l| l.iter_mut().find(|e| e.tunnel.id() == tunnel_id))
        {
            e.capabilities = capabilities;
        }
    }

    /// The tunnels of the node called `host`, or whose agent reported `host` as an address;
    /// newest first.
    pub fn find(&self, host: &str) -> Vec<(String, Entry)> {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<(String, Entry)> = match nodes.get(host) {
            Some(list) => list.iter().map(|e| (host.to_string(), e.clone())).collect(),
            None => nodes
                .iter()
                .flat_map(|(n, l)| l.iter().map(move |e| (n.clone(), e.clone())))
                .filter(|(_, e)| e.addresses.iter().any(|a| a == host))
                .collect(),
        };
        out.sort_by_key(|(_, e)| std::cmp::Reverse(e.since));
        out
    }

    /// The tunnels of one node, newest last.
    pub fn tunnels(&self, node: &str) -> Vec<Entry> {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.get(node).cloned().unwrap_or_default()
    }

    /// The byte meter of a node's newest tunnel: where its streams' bytes are counted.
    pub fn meter(&self, node: &str) -> Option<std::sync::Arc<tether_common::relay::Meter>> {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes
            .get(node)
            .and_then(|l| l.iter().max_by_key(|e| e.since))
            .map(|e| e.meter.clone())
    }

    /// Every node with its tunnels, sorted by name.
    pub fn snapshot(&self) -> Vec<(String, Vec<Entry>)> {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = nodes.iter().map(|(n, l)| (n.clone(), l.clone())).collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    /// Names of the connected nodes, sorted.
    pub fn node_names(&self) -> Vec<String> {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = nodes.keys().cloned().collect();
        v.sort();
        v
    }

    /// Closes every tunnel (at shutdown).
    pub fn close_all(&self, code: u32, reason: &str) {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        for e in nodes.values().flatten() {
            e.tunnel.close(code, reason);
        }
    }
}
