//! What a server tells its agents and peers on every control stream: its upstream health,
//! whether it drains, and the servers of the control plane (itself, its configured peers, and
//! the servers etcd's membership lists, and the peers that dialed it). Each control stream sends
//! what changed since it last sent.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tether_link::pool::Pool;
use tether_process::shutdown::ShutdownSignal;
use tether_proto::{Message, ServerInfo};
use tokio::sync::{watch, Notify};

/// The address to announce: the configured one (`--advertise`), else the listen address when
/// it names one, else the host's first address with the listen port.
pub fn advertise_address(configured: Option<&str>, bound: SocketAddr) -> Option<String> {
    if let Some(a) = configured {
        return Some(a.to_string());
    }
    let ip = if bound.ip().is_unspecified() {
        *tether_endpoint::net::host_addresses().first()?
    } else {
        bound.ip()
    };
    Some(SocketAddr::new(ip, bound.port()).to_string())
}

/// How often the announcement is recomputed even when nothing pokes it (peer health comes from
/// the peers' own control streams).
const REFRESH: Duration = Duration::from_millis(500);

/// One server's announcement.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Announcement {
    pub healthy: bool,
    pub draining: bool,
    pub servers: Vec<ServerInfo>,
}

/// The messages that bring a party that saw `old` up to `new`.
pub fn diff(old: Option<&Announcement>, new: &Announcement) -> Vec<Message> {
    let mut out = Vec::new();
    if old.map(|o| o.healthy) != Some(new.healthy) {
        out.push(Message::Health {
            upstream_healthy: new.healthy,
        });
    }
    if old.map(|o| &o.servers) != Some(&new.servers) {
        out.push(Message::ServerList {
            servers: new.servers.clone(),
        });
    }
    if new.draining && !old.map(|o| o.draining).unwrap_or(false) {
        out.push(Message::Drain);
    }
    out
}

struct Inner {
    advertise: Option<String>,
    configured_peers: Vec<String>,
    /// The servers etcd's membership lists (none with the data-directory store).
    discovered: Mutex<Vec<String>>,
    peers: Arc<Pool>,
    healthy: Mutex<bool>,
    draining: Mutex<bool>,
    inbound: Mutex<BTreeMap<usize, String>>,
    changed: Arc<Notify>,
    tx: watch::Sender<Announcement>,
    /// Instance ids of peers this server just lost, for its agents' control streams.
    lost: tokio::sync::broadcast::Sender<String>,
}

/// Peers lost that a slow control stream may still have to send; one that falls further behind
/// skips the oldest (a lost report only delays an agent's verdict to its own probes).
const LOST_QUEUE: usize = 64;

/// Keeps the announcement current. Cheap to clone.
#[derive(Clone)]
pub struct Announcer(Arc<Inner>);

impl Announcer {
    pub fn new(advertise: Option<String>, configured_peers: Vec<String>, peers: Arc<Pool>) -> Self {
        Announcer(Arc::new(Inner {
            advertise,
            configured_peers,
            discovered: Mutex::new(Vec::new()),
            peers,
            healthy: Mutex::new(false),
            draining: Mutex::new(false),
            inbound: Mutex::new(BTreeMap::new()),
            changed: Arc::new(Notify::new()),
            tx: watch::channel(Announcement::default()).0,
            lost: tokio::sync::broadcast::channel(LOST_QUEUE).0,
        }))
    }

    /// This server lost its link to the peer with this instance id: agents are told.
    pub fn peer_lost(&self, server_id: &str) {
        if !server_id.is_empty() {
            let _ = self.0.lost.send(server_id.to_string());
        }
    }

    /// The peers lost from now on.
    pub fn subscribe_lost(&self) -> tokio::sync::broadcast::Receiver<String> {
        self.0.lost.subscribe()
    }

    pub fn advertise(&self) -> Option<&str> {
        self.0.advertise.as_deref()
    }

    /// Poked whenever something announced may have changed.
    pub fn changed(&self) -> Arc<Notify> {
        self.0.changed.clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Announcement> {
        let rx = self.0.tx.subscribe();
        self.recompute();
        rx
    }

    pub fn set_healthy(&self, v: bool) {
        *lock(&self.0.healthy) = v;
        self.recompute();
    }

    pub fn set_draining(&self) {
        *lock(&self.0.draining) = true;
        self.recompute();
    }

    /// The servers the datastore's membership lists now.
    pub fn set_discovered(&self, servers: Vec<String>) {
        *lock(&self.0.discovered) = servers;
        self.recompute();
    }

    /// A peer dialed us and announced the address it is reached at.
    pub fn add_inbound_peer(&self, tunnel_id: usize, addr: String) {
        lock(&self.0.inbound).insert(tunnel_id, addr);
        self.recompute();
    }

    pub fn remove_inbound_peer(&self, tunnel_id: usize) {
        lock(&self.0.inbound).remove(&tunnel_id);
        self.recompute();
    }

    fn compute(&self) -> Announcement {
        let inner = &self.0;
        let healthy = *lock(&inner.healthy);
        let draining = *lock(&inner.draining);
        let mut servers = Vec::new();
        if let Some(me) = &inner.advertise {
            servers.push(ServerInfo {
                addr: me.clone(),
                healthy,
                draining,
            });
        }
        // A connected peer is announced at the address it advertises for itself (the first
        // entry of its own list), which may differ from the one this server dials it by.
        let links = inner.peers.all();
        let inbound: Vec<String> = lock(&inner.inbound).values().cloned().collect();
        let discovered = lock(&inner.discovered).clone();
        let all = inner.configured_peers.iter().chain(discovered.iter());
        for label in all.chain(inbound.iter()) {
            let link = links.iter().find(|l| &l.server == label);
            let addr = link
                .and_then(|l| l.servers())
                .and_then(|list| list.first().map(|s| s.addr.clone()))
                .unwrap_or_else(|| label.clone());
            if servers.iter().any(|s: &ServerInfo| s.addr == addr) {
                continue;
            }
            servers.push(ServerInfo {
                addr,
                healthy: link.map(|l| l.healthy()).unwrap_or(false),
                draining: link.map(|l| l.draining()).unwrap_or(false),
            });
        }
        Announcement {
            healthy,
            draining,
            servers,
        }
    }

    fn recompute(&self) {
        let now = self.compute();
        self.0.tx.send_if_modified(|cur| {
            if *cur == now {
                false
            } else {
                *cur = now;
                true
            }
        });
    }

    /// Recomputes on every poke and every [`REFRESH`] until shutdown.
    pub async fn run(self, mut stop: ShutdownSignal) {
        loop {
            self.recompute();
            tokio::select! {
                _ = self.0.changed.notified() => {}
                _ = tokio::time::sleep(REFRESH) => {}
                _ = stop.wait() => return,
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff_sends_only_what_changed() {
        let a = Announcement {
            healthy: true,
            draining: false,
            servers: vec![],
        };
        assert_eq!(diff(None, &a).len(), 2);
        assert!(diff(Some(&a), &a).is_empty());
        let b = Announcement {
            draining: true,
            ..a.clone()
        };
        assert_eq!(diff(Some(&a), &b), vec![Message::Drain]);
        let c = Announcement {
            healthy: false,
            ..a.clone()
        };
        assert_eq!(
            diff(Some(&a), &c),
            vec![Message::Health {
                upstream_healthy: false
            }]
        );
    }
}
