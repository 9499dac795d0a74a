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
use std::time::{Duration, Instant, SystemTime};
use tether_common::transport::Tunnel;
use tether_proto::capability::Capabilities;
use tokio::sync::watch;

/// What the registry needs of a tunnel: to tell it apart and to close it. The registry's rules
/// (who an address leads to, what is contested) are thus tested without a network.
pub trait TunnelRef: Clone + std::fmt::Debug {
    fn id(&self) -> usize;
    fn close(&self, code: u32, reason: &str);
}

impl TunnelRef for Tunnel {
    fn id(&self) -> usize {
        Tunnel::id(self)
    }

    fn close(&self, code: u32, reason: &str) {
        Tunnel::close(self, code, reason)
    }
}

/// One agent tunnel.
#[derive(Debug, Clone)]
pub struct Entry<T = Tunnel> {
    pub tunnel: T,
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
pub enum Route<T = Tunnel> {
    /// No connected node has this name or claims this address.
    Unknown,
    /// This node, through these tunnels (newest first).
    Node(String, Vec<Entry<T>>),
    /// More than one node claims this address: it leads nowhere until only one does.
    Contested(Vec<String>),
}

/// How long a node that lost its last tunnel here is remembered ([`Registry::left_at`]): longer
/// than any wait for its return.
const LEFT_KEPT: Duration = Duration::from_secs(30);

/// Connected nodes by name. A node may hold several tunnels (a restart overlapping the old
/// connection's timeout, or several NAT paths).
#[derive(Debug)]
pub struct Registry<T = Tunnel> {
    nodes: Mutex<HashMap<String, Vec<Entry<T>>>>,
    /// Nodes that lost their last tunnel here in the last [`LEFT_KEPT`]: when, and the
    /// addresses they had claimed. Bounded by the nodes whose certificates connected.
    left: Mutex<HashMap<String, (Instant, Vec<String>)>>,
    /// Bumped on every tunnel added, for those who wait for a node's return.
    added: watch::Sender<u64>,
}

impl<T> Default for Registry<T> {
    fn default() -> Self {
        Registry {
            nodes: Mutex::default(),
            left: Mutex::default(),
            added: watch::channel(0).0,
        }
    }
}

impl<T: TunnelRef> Registry<T> {
    pub fn add(&self, node: &str, entry: Entry<T>) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        nodes.entry(node.to_string()).or_default().push(entry);
        drop(nodes);
        self.added.send_modify(|n| *n = n.wrapping_add(1));
    }

    pub fn remove(&self, node: &str, tunnel_id: usize) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        let Some(list) = nodes.get_mut(node) else {
            return;
        };
        let addresses: Vec<String> = list
            .iter()
            .filter(|e| e.tunnel.id() == tunnel_id)
            .flat_map(|e| e.addresses.iter().cloned())
            .collect();
        list.retain(|e| e.tunnel.id() != tunnel_id);
        if list.is_empty() {
            nodes.remove(node);
            drop(nodes);
            let now = Instant::now();
            let mut left = self.left.lock().unwrap_or_else(|p| p.into_inner());
            left.retain(|_, (at, _)| now.duration_since(*at) < LEFT_KEPT);
            left.insert(node.to_string(), (now, addresses));
        }
    }

    /// When the node `host` names (by name, or by an address it had claimed) lost its last
    /// tunnel here, if it has none now and that was less than [`LEFT_KEPT`] ago.
    pub fn left_at(&self, host: &str) -> Option<Instant> {
        if !matches!(self.find(host), Route::Unknown) {
            return None;
        }
        let left = self.left.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        let recent = |at: &Instant| now.duration_since(*at) < LEFT_KEPT;
        if let Some((at, _)) = left.get(host).filter(|(at, _)| recent(at)) {
            return Some(*at);
        }
        // By address: only when exactly one node that left had claimed it.
        let mut claimants = left
            .values()
            .filter(|(at, addrs)| recent(at) && addrs.iter().any(|a| a == host));
        match (claimants.next(), claimants.next()) {
            (Some((at, _)), None) => Some(*at),
            _ => None,
        }
    }

    /// Waits until `host` leads to a tunnel here that is not in `tried`, or `until` passes.
    pub async fn wait_for_tunnel(&self, host: &str, tried: &[usize], until: Instant) -> bool {
        // Subscribed before looking, so that a tunnel added in between is not missed.
        let mut added = self.added.subscribe();
        loop {
            if let Route::Node(_, tunnels) = self.find(host) {
                if tunnels.iter().any(|e| !tried.contains(&e.tunnel.id())) {
                    return true;
                }
            }
            match tokio::time::timeout_at(until.into(), added.changed()).await {
                Ok(Ok(())) => continue,
                _ => return false,
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
    pub fn find(&self, host: &str) -> Route<T> {
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
    pub fn tunnels(&self, node: &str) -> Vec<Entry<T>> {
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
    pub fn snapshot(&self) -> Vec<(String, Vec<Entry<T>>)> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use std::sync::Arc;
    use std::time::Duration;

    /// A tunnel that records its close.
    #[derive(Debug, Clone)]
    struct Fake {
        id: usize,
        closed: Arc<Mutex<Vec<u32>>>,
    }

    impl TunnelRef for Fake {
        fn id(&self) -> usize {
            self.id
        }
        fn close(&self, code: u32, _reason: &str) {
            self.closed.lock().unwrap().push(code);
        }
    }

    fn entry(id: usize, age_s: u64, closed: &Arc<Mutex<Vec<u32>>>) -> Entry<Fake> {
        Entry {
            tunnel: Fake {
                id,
                closed: closed.clone(),
            },
            remote: SocketAddr::from(([192, 0, 2, 1], 40000 + id as u16)),
            since: SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 - age_s),
            cert_not_after: 0,
            key_hash: format!("key-{id}"),
            addresses: Vec::new(),
            streams: Arc::default(),
            meter: Arc::default(),
            capabilities: Capabilities::default(),
        }
    }

    fn node_of(route: Route<Fake>) -> Option<(String, Vec<usize>)> {
        match route {
            Route::Node(n, list) => Some((n, list.iter().map(|e| e.tunnel.id).collect())),
            _ => None,
        }
    }

    #[test]
    fn a_name_leads_to_its_tunnels_newest_first() {
        let closed = Arc::default();
        let r = Registry::default();
        r.add("edge-1", entry(1, 30, &closed));
        r.add("edge-1", entry(2, 10, &closed));
        r.add("edge-2", entry(3, 5, &closed));
        assert_eq!(
            node_of(r.find("edge-1")),
            Some(("edge-1".into(), vec![2, 1]))
        );
        assert!(matches!(r.find("edge-9"), Route::Unknown));
        assert_eq!(r.node_names(), vec!["edge-1", "edge-2"]);
        r.tunnels("edge-1")[0].streams.store(3, Ordering::Relaxed);
        r.tunnels("edge-1")[1].streams.store(4, Ordering::Relaxed);
        assert_eq!(r.node_streams("edge-1"), 7);
        // The newest tunnel's meter counts the node's bytes.
        let newest = r.tunnels("edge-1")[1].meter.clone();
        assert!(Arc::ptr_eq(&r.meter("edge-1").unwrap(), &newest));
        r.remove("edge-1", 2);
        r.remove("edge-1", 1);
        assert!(matches!(r.find("edge-1"), Route::Unknown));
        assert_eq!(r.node_names(), vec!["edge-2"]);
    }

    #[test]
    fn an_address_leads_to_the_one_node_that_claims_it() {
        let closed = Arc::default();
        let r = Registry::default();
        r.add("edge-1", entry(1, 10, &closed));
        r.add("edge-2", entry(2, 10, &closed));
        let ip = "10.0.0.7".to_string();
        assert!(r.set_addresses("edge-1", 1, vec![ip.clone()]).is_empty());
        assert_eq!(node_of(r.find(&ip)), Some(("edge-1".into(), vec![1])));

        // A second claim is reported with the first claimant, and the address is contested.
        let conflicts = r.set_addresses("edge-2", 2, vec![ip.clone()]);
        assert_eq!(conflicts, vec![(ip.clone(), "edge-1".to_string())]);
        match r.find(&ip) {
            Route::Contested(nodes) => assert_eq!(nodes, vec!["edge-1", "edge-2"]),
            other => panic!("expected contested, got {other:?}"),
        }
        assert_eq!(
            r.contested(),
            vec![(ip.clone(), vec!["edge-1".into(), "edge-2".into()])]
        );
        // A name is never contested by an address claim.
        assert_eq!(
            node_of(r.find("edge-1")).map(|n| n.0),
            Some("edge-1".into())
        );

        // When one claimant goes, the address leads to the other.
        r.remove("edge-1", 1);
        assert_eq!(node_of(r.find(&ip)), Some(("edge-2".into(), vec![2])));
        assert!(r.contested().is_empty());
    }

    #[test]
    fn a_node_named_like_another_nodes_address_wins_by_name() {
        let closed = Arc::default();
        let r = Registry::default();
        r.add("edge-1", entry(1, 10, &closed));
        r.add("node-b", entry(2, 10, &closed));
        r.set_addresses("edge-1", 1, vec!["node-b".into()]);
        assert_eq!(node_of(r.find("node-b")), Some(("node-b".into(), vec![2])));
    }

    #[test]
    fn a_node_that_left_is_remembered_by_name_and_by_its_one_claim() {
        let closed = Arc::default();
        let r: Registry<Fake> = Registry::default();
        r.add("a", entry(1, 5, &closed));
        r.add("a", entry(2, 1, &closed));
        r.set_addresses("a", 2, vec!["10.0.0.1".into(), "10.0.0.9".into()]);
        r.add("b", entry(3, 1, &closed));
        r.set_addresses("b", 3, vec!["10.0.0.9".into()]);
        r.remove("a", 1);
        assert!(r.left_at("a").is_none(), "one tunnel left: still here");
        r.remove("a", 2);
        assert!(r.left_at("a").is_some());
        assert!(r.left_at("10.0.0.1").is_some(), "by the address it claimed");
        assert!(r.left_at("10.0.0.9").is_none(), "another node still has it");
        assert!(r.left_at("c").is_none(), "never here");
        r.add("a", entry(4, 0, &closed));
        assert!(r.left_at("a").is_none(), "back");
    }

    #[tokio::test]
    async fn a_wait_for_a_node_ends_when_it_has_a_tunnel_not_yet_tried() {
        let closed = Arc::default();
        let r: Arc<Registry<Fake>> = Arc::default();
        r.add("a", entry(1, 5, &closed));
        let soon = Instant::now() + Duration::from_millis(50);
        assert!(
            !r.wait_for_tunnel("a", &[1], soon).await,
            "only the tried one"
        );
        let waiter = {
            let r = r.clone();
            tokio::spawn(async move {
                let until = Instant::now() + Duration::from_secs(10);
                r.wait_for_tunnel("a", &[1], until).await
            })
        };
        r.add("b", entry(2, 0, &closed));
        r.add("a", entry(3, 0, &closed));
        assert!(waiter.await.unwrap());
    }

    #[test]
    fn close_all_closes_every_tunnel() {
        let closed: Arc<Mutex<Vec<u32>>> = Arc::default();
        let r = Registry::default();
        r.add("edge-1", entry(1, 10, &closed));
        r.add("edge-2", entry(2, 10, &closed));
        r.close_all(3, "bye");
        assert_eq!(*closed.lock().unwrap(), vec![3, 3]);
    }
}
