//! Which nodes are connected to this server, through which tunnels, and which node an address
//! leads to.
//!
//! A node's name is proven by its certificate; its addresses are only claimed by its agent. So
//! an address leads to a node only while exactly one node claims it: when a second node claims
//! an address another node already claims, both claims stay on record, the address is
//! *contested*, and the egress proxy refuses it (409) until one of the two goes away. A node
//! that claims another's address can block routing by that address, never take its traffic.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::SystemTime;
use tether_common::transport::Tunnel;
use tether_proto::capability::Capabilities;

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

/// Where a host named in a request leads.
#[derive(Debug)]
pub enum Route {
    /// No connected node has this name or claims this address.
    Unknown,
    /// This node, through these tunnels (newest first).
    Node(String, Vec<Entry>),
    /// More than one node claims this address: it leads nowhere until only one does.
    Contested(Vec<String>),
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

    /// Records the addresses a node's agent reported on one tunnel; returns the addresses that
    /// another node already claims, each with that node's name (the caller logs and counts
    /// them: from now on they are contested).
    pub fn set_addresses(
        &self,
        node: &str,
        tunnel_id: usize,
        addresses: Vec<String>,
    ) -> Vec<(String, String)> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let mut conflicts = Vec::new();
        for a in &addresses {
            for (other, list) in nodes.iter() {
                if other != node && list.iter().any(|e| e.addresses.contains(a)) {
                    conflicts.push((a.clone(), other.clone()));
                }
            }
        }
        if let Some(e) = nodes
            .get_mut(node)
            .and_then(|l| l.iter_mut().find(|e| e.tunnel.id() == tunnel_id))
        {
            e.addresses = addresses;
        }
        conflicts
    }

    /// The addresses that more than one node claims, each with the claiming nodes (sorted).
    pub fn contested(&self) -> Vec<(String, Vec<String>)> {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_addr: std::collections::BTreeMap<&str, std::collections::BTreeSet<&str>> =
            Default::default();
        for (name, list) in nodes.iter() {
            for a in list.iter().flat_map(|e| e.addresses.iter()) {
                by_addr.entry(a).or_default().insert(name);
            }
        }
        by_addr
            .into_iter()
            .filter(|(_, names)| names.len() > 1)
            .map(|(a, names)| (a.to_string(), names.into_iter().map(String::from).collect()))
            .collect()
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

    /// Where `host` leads: the node of that name (its certificate says so), else the one node
    /// whose agent reported `host` as an address. Tunnels newest first.
    pub fn find(&self, host: &str) -> Route {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let (name, list) = match nodes.get(host) {
            Some(list) => (host.to_string(), list),
            None => {
                let claimants: Vec<&String> = nodes
                    .iter()
                    .filter(|(_, l)| l.iter().any(|e| e.addresses.iter().any(|a| a == host)))
                    .map(|(n, _)| n)
                    .collect();
                match claimants.as_slice() {
                    [] => return Route::Unknown,
                    [one] => match nodes.get(*one) {
                        Some(list) => (one.to_string(), list),
                        None => return Route::Unknown,
                    },
                    many => {
                        let mut names: Vec<String> = many.iter().map(|n| n.to_string()).collect();
                        names.sort();
                        return Route::Contested(names);
                    }
                }
            }
        };
        let mut tunnels = list.clone();
        tunnels.sort_by_key(|e| std::cmp::Reverse(e.since));
        Route::Node(name, tunnels)
    }

    /// Streams open now over all of a node's tunnels.
    pub fn node_streams(&self, node: &str) -> usize {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.get(node).map_or(0, |l| {
            l.iter()
                .map(|e| e.streams.load(std::sync::atomic::Ordering::Relaxed))
                .sum()
        })
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
