//! Links to the other servers: the configured ones (`--peer`), kept for the server's life, and
//! the ones etcd's membership names, kept while they are members.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tether_link::backoff::Backoff;
use tether_link::reconnect::{self, Dialer};
use tether_process::shutdown::{Shutdown, ShutdownSignal};
use tokio::task::JoinSet;
use tracing::{info, warn};

/// Keeps links to one peer (every address its name resolves to) until `stop`.
pub async fn link(peer: String, rank: usize, dialer: Arc<Dialer>, stop: ShutdownSignal) {
    let liveness_max = Duration::from_secs(5);
    // Resolve until it works: a peer's name may not resolve yet while the cluster boots.
    let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
    let mut wait = stop.clone();
    let targets = loop {
        match reconnect::resolve(&peer, rank).await {
            Ok(t) if !t.is_empty() => break t,
            Ok(_) => warn!(peer = %peer, "peer name resolves to no address"),
            Err(e) => warn!(peer = %peer, error = %e, "cannot resolve peer"),
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff.next_delay(fastrand::f64())) => {}
            _ = wait.wait() => return,
        }
    };
    let mut set = JoinSet::new();
    for t in targets {
        let b = Backoff::new(Duration::from_millis(100), liveness_max);
        set.spawn(reconnect::maintain(t, dialer.clone(), b, stop.clone()));
    }
    while set.join_next().await.is_some() {}
}

/// The peers found through the datastore: a link to each while it is a member.
pub struct Discovered {
    dialer: Arc<Dialer>,
    /// This server's own address, never dialed.
    own: Option<String>,
    links: Mutex<BTreeMap<String, Shutdown>>,
    /// Rank after the configured peers, so that configured ones are preferred.
    first_rank: usize,
}

impl Discovered {
    pub fn new(dialer: Arc<Dialer>, own: Option<String>, first_rank: usize) -> Self {
        Discovered {
            dialer,
            own,
            links: Mutex::new(BTreeMap::new()),
            first_rank,
        }
    }

    /// Links to exactly `addresses` (less this server's own): new ones are dialed, gone ones
    /// closed. The links end with `stop`, or when the peer leaves.
    pub fn set(&self, addresses: &[String], stop: &ShutdownSignal) {
        let mut links = self.links.lock().unwrap_or_else(|p| p.into_inner());
        links.retain(|addr, s| {
            let keep = addresses.contains(addr);
            if !keep {
                info!(peer = %addr, "peer left the membership; closing the link");
                s.trigger();
            }
            keep
        });
        for (i, addr) in addresses.iter().enumerate() {
            if Some(addr) == self.own.as_ref() || links.contains_key(addr) {
                continue;
            }
            info!(peer = %addr, "peer found in the membership; linking");
            // The link ends when its entry leaves the map (its `Shutdown` fires or is dropped),
            // or with the server.
            let own_stop = Shutdown::new();
            let link = link(
                addr.clone(),
                self.first_rank + i,
                self.dialer.clone(),
                own_stop.signal(),
            );
            let mut global = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    _ = link => {}
                    _ = global.wait() => {}
                }
            });
            links.insert(addr.clone(), own_stop);
        }
    }
}
