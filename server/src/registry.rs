//! Which nodes are connected to this server, and through which tunnels.
//!
//! The registry knows nodes by name only: a node's name is proven by its certificate. Which
//! node an IP address leads to is a question for the node records (`Authority::resolve`),
//! where an address is owned by the first node that claimed it, connected or not; the
//! registry only keeps, for `status`, what each tunnel's agent claimed and what was refused.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};
use tether_proto::capability::Capabilities;
use tether_transport::transport::Tunnel;
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
    /// The hash of the CA that issued the certificate (`trust::Trust::issuer_of`); `None` for
    /// one trusted no more.
    pub issuer: Option<String>,
    /// The addresses the node owns, as its agent claimed them on this tunnel.
    pub addresses: Vec<String>,
    /// Addresses its agent claimed that another node owns (address, owner), or that were past
    /// the bound (owner empty): refused, and shown in `status`.
    pub refused: Vec<(String, String)>,
    /// Streams open on this tunnel.
    pub streams: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    /// Bytes relayed for streams of this tunnel (for `status`).
    pub meter: std::sync::Arc<tether_transport::relay::Meter>,
    /// What the agent announced in its hello (empty until the hello, and from a 0.1 agent
    /// nothing but `apiserver`): new behaviour towards it is used only when announced.
    pub capabilities: Capabilities,
}

/// How long a node that lost its last tunnel here is remembered ([`Registry::left_at`]): longer
/// than any wait for its return.
const LEFT_KEPT: Duration = Duration::from_secs(30);

/// Connected nodes by name. A node may hold several tunnels (a restart overlapping the old
/// connection's timeout, or several NAT paths).
#[derive(Debug)]
pub struct Registry<T = Tunnel> {
    nodes: Mutex<HashMap<String, Vec<Entry<T>>>>,
    /// Nodes that lost their last tunnel here in the last [`LEFT_KEPT`], and when. Bounded by
    /// the nodes whose certificates connected.
    left: Mutex<HashMap<String, Instant>>,
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
        list.retain(|e| e.tunnel.id() != tunnel_id);
        if list.is_empty() {
            nodes.remove(node);
            drop(nodes);
            let now = Instant::now();
            let mut left = self.left.lock().unwrap_or_else(|p| p.into_inner());
            left.retain(|_, at| now.duration_since(*at) < LEFT_KEPT);
            left.insert(node.to_string(), now);
        }
    }

    /// When `node` lost its last tunnel here, if it has none now and that was less than
    /// [`LEFT_KEPT`] ago.
    pub fn left_at(&self, node: &str) -> Option<Instant> {
        if !self.tunnels(node).is_empty() {
            return None;
        }
        let left = self.left.lock().unwrap_or_else(|p| p.into_inner());
        left.get(node)
            .copied()
            .filter(|at| at.elapsed() < LEFT_KEPT)
    }

    /// Waits until `node` has a tunnel here that is not in `tried`, or `until` passes.
    pub async fn wait_for_tunnel(&self, node: &str, tried: &[usize], until: Instant) -> bool {
        // Subscribed before looking, so that a tunnel added in between is not missed.
        let mut added = self.added.subscribe();
        loop {
            if self
                .tunnels(node)
                .iter()
                .any(|e| !tried.contains(&e.tunnel.id()))
            {
                return true;
            }
            match tokio::time::timeout_at(until.into(), added.changed()).await {
                Ok(Ok(())) => continue,
                _ => return false,
            }
        }
    }

    /// Records what came of the addresses a node's agent claimed on one tunnel (for `status`).
    pub fn set_addresses(
        &self,
        node: &str,
        tunnel_id: usize,
        owned: Vec<String>,
        refused: Vec<(String, String)>,
    ) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = nodes
            .get_mut(node)
            .and_then(|l| l.iter_mut().find(|e| e.tunnel.id() == tunnel_id))
        {
            e.addresses = owned;
            e.refused = refused;
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

    /// The tunnels of `node`, newest first.
    pub fn find(&self, node: &str) -> Vec<Entry<T>> {
        let mut tunnels = self.tunnels(node);
        tunnels.sort_by_key(|e| std::cmp::Reverse(e.since));
        tunnels
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
    pub fn meter(&self, node: &str) -> Option<std::sync::Arc<tether_transport::relay::Meter>> {
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
            issuer: None,
            addresses: Vec::new(),
            refused: Vec::new(),
            streams: Arc::default(),
            meter: Arc::default(),
            capabilities: Capabilities::default(),
        }
    }

    fn ids(list: Vec<Entry<Fake>>) -> Vec<usize> {
        list.iter().map(|e| e.tunnel.id).collect()
    }

    #[test]
    fn a_name_leads_to_its_tunnels_newest_first() {
        let closed = Arc::default();
        let r = Registry::default();
        r.add("edge-1", entry(1, 30, &closed));
        r.add("edge-1", entry(2, 10, &closed));
        r.add("edge-2", entry(3, 5, &closed));
        assert_eq!(ids(r.find("edge-1")), vec![2, 1]);
        assert!(r.find("edge-9").is_empty());
        assert_eq!(r.node_names(), vec!["edge-1", "edge-2"]);
        r.tunnels("edge-1")[0].streams.store(3, Ordering::Relaxed);
        r.tunnels("edge-1")[1].streams.store(4, Ordering::Relaxed);
        assert_eq!(r.node_streams("edge-1"), 7);
        // The newest tunnel's meter counts the node's bytes.
        let newest = r.tunnels("edge-1")[1].meter.clone();
        assert!(Arc::ptr_eq(&r.meter("edge-1").unwrap(), &newest));
        r.remove("edge-1", 2);
        r.remove("edge-1", 1);
        assert!(r.find("edge-1").is_empty());
        assert_eq!(r.node_names(), vec!["edge-2"]);
    }

    #[test]
    fn a_node_that_left_is_remembered_by_name() {
        let closed = Arc::default();
        let r: Registry<Fake> = Registry::default();
        r.add("a", entry(1, 5, &closed));
        r.add("a", entry(2, 1, &closed));
        r.remove("a", 1);
        assert!(r.left_at("a").is_none(), "one tunnel left: still here");
        r.remove("a", 2);
        assert!(r.left_at("a").is_some());
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
