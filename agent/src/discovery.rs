//! Which servers the agent keeps tunnels to.
//!
//! The set is the `--server` addresses (each DNS name counts for every address it resolves to)
//! plus the servers that the connected servers announce. Servers that no announcement names any
//! more are dropped. The last announced list is kept in the data directory (`servers`), and at
//! start the agent dials those too, so that it finds the control plane even when its `--server`
//! addresses no longer answer; an address not announced for [`SAVED_TTL`] expires from it.
//!
//! What servers announce is bounded and checked (`server_policy`): a server certificate is
//! enough to announce, so an announcement cannot point the node anywhere it likes.

use crate::server_policy::{self, Cidr, ServerPolicy};
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tether_link::backoff::Backoff;
use tether_link::reconnect::{self, DialTarget, Dialer};
use tether_process::shutdown::{Shutdown, ShutdownSignal};
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// Name of the file that keeps the last announced server list.
pub const STATE_FILE: &str = "servers";

/// How long a saved server address is dialed at start after it was last announced.
pub const SAVED_TTL: Duration = Duration::from_secs(7 * 24 * 3600);
/// How often the saved list is written again while unchanged, to keep its times fresh.
const SAVE_EVERY: Duration = Duration::from_secs(3600);

/// How often DNS names are resolved again.
pub const RESOLVE_INTERVAL: Duration = Duration::from_secs(30);

/// Settings of the discovery loop.
pub struct Discovery {
    pub seeds: Vec<String>,
    /// Where the last announced list is kept; none to keep nothing.
    pub state_file: Option<PathBuf>,
    pub dialer: Arc<Dialer>,
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    /// `--allow-server-network`.
    pub allowed_networks: Vec<Cidr>,
    pub metrics: Arc<crate::metrics::Metrics>,
}

struct Running {
    stop: Shutdown,
    task: JoinHandle<()>,
}

impl Discovery {
    /// Keeps the dial loops in step with the known servers until shutdown.
    pub async fn run(self, mut stop: ShutdownSignal) {
        let mut remembered: Vec<String> = self.load();
        let mut running: HashMap<(String, std::net::SocketAddr), Running> = HashMap::new();
        let mut resolved: HashMap<String, Vec<DialTarget>> = HashMap::new();
        let mut last_resolve = tokio::time::Instant::now();
        let mut saved = tokio::time::Instant::now();
        let mut refused: BTreeSet<String> = BTreeSet::new();
        loop {
            // What the servers announce now (bounded per announcer and in all); when none has
            // spoken, what they said last time.
            let lists: Vec<Vec<String>> = self
                .dialer
                .pool
                .all()
                .iter()
                .filter_map(|link| link.servers())
                .map(|list| list.into_iter().map(|s| s.addr).collect())
                .collect();
            let heard = !lists.is_empty();
            let mut announced = server_policy::bounded(lists);
            if heard {
                if announced != remembered || saved.elapsed() >= SAVE_EVERY {
                    if announced != remembered {
                        info!(servers = ?announced, "server list changed");
                    }
                    remembered = announced.clone();
                    self.save(&remembered);
                    saved = tokio::time::Instant::now();
                }
            } else {
                announced = remembered.clone();
            }

            let mut labels: Vec<(String, usize)> = Vec::new();
            for (i, s) in self.seeds.iter().enumerate() {
                labels.push((s.clone(), i));
            }
            for (i, s) in announced.iter().enumerate() {
                if !labels.iter().any(|(l, _)| l == s) {
                    labels.push((s.clone(), 1000 + i));
                }
            }
            if last_resolve.elapsed() >= RESOLVE_INTERVAL {
                resolved.clear();
                last_resolve = tokio::time::Instant::now();
            }
            let mut wanted: HashMap<(String, std::net::SocketAddr), DialTarget> = HashMap::new();
            let mut policy = ServerPolicy {
                allowed: self.allowed_networks.clone(),
                seeded: Vec::new(),
            };
            for (label, rank) in &labels {
                if !resolved.contains_key(label) {
                    match reconnect::resolve(label, *rank).await {
                        Ok(targets) => {
                            resolved.insert(label.clone(), targets);
                        }
                        Err(e) => {
                            warn!(server = %label, error = %e, "cannot resolve server address")
                        }
                    }
                }
                for t in resolved.get(label).into_iter().flatten() {
                    let seed = *rank < 1000;
                    if seed {
                        // The operator's own servers: their kinds of address are fine.
                        policy.seeded.extend(server_policy::special(t.addr.ip()));
                    } else if !policy.admits(t.addr.ip()) {
                        if refused.insert(label.clone()) {
                            self.metrics.announced_refused.inc();
                            warn!(server = %label, addr = %t.addr, "announced server refused: loopback, link-local, unspecified or multicast (allow with --allow-server-network)");
                        }
                        continue;
                    }
                    let mut t = t.clone();
                    t.rank = *rank;
                    wanted.insert((t.label.clone(), t.addr), t);
                }
            }
            // Names that failed to resolve keep their running loops until they resolve again.
            let unresolved: BTreeSet<&String> = labels
                .iter()
                .map(|(l, _)| l)
                .filter(|l| !resolved.contains_key(*l))
                .collect();

            let gone: Vec<_> = running
                .keys()
                .filter(|k| !wanted.contains_key(*k) && !unresolved.contains(&k.0))
                .cloned()
                .collect();
            for key in gone {
                if let Some(r) = running.remove(&key) {
                    info!(server = %key.0, addr = %key.1, "server no longer announced; dropping its tunnel");
                    r.stop.trigger();
                    let _ = r.task.await;
                }
            }
            for (key, target) in wanted {
                if running.contains_key(&key) {
                    continue;
                }
                let s = Shutdown::new();
                let backoff = Backoff::new(self.reconnect_initial, self.reconnect_max);
                let task = tokio::spawn(reconnect::maintain(
                    target,
                    self.dialer.clone(),
                    backoff,
                    s.signal(),
                ));
                running.insert(key, Running { stop: s, task });
            }

            tokio::select! {
                _ = self.dialer.changed.notified() => {}
                _ = tokio::time::sleep(RESOLVE_INTERVAL) => {}
                _ = stop.wait() => break,
            }
        }
        for (_, r) in running {
            r.stop.trigger();
            let _ = r.task.await;
        }
    }

    /// The saved list, less what has not been announced for [`SAVED_TTL`] and past the bound.
    fn load(&self) -> Vec<String> {
        let Some(path) = &self.state_file else {
            return Vec::new();
        };
        let Ok(text) = std::fs::read_to_string(path) else {
            return Vec::new();
        };
        let now = unix_now();
        text.lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .filter_map(|l| {
                let (addr, seen) = l.split_once(' ').unwrap_or((l, ""));
                // A line of 0.2 has no time: it counts as seen now, once.
                let seen = seen.trim().parse::<u64>().unwrap_or(now);
                (seen.saturating_add(SAVED_TTL.as_secs()) > now).then(|| addr.to_string())
            })
            .take(server_policy::MAX_ANNOUNCED)
            .collect()
    }

    fn save(&self, list: &[String]) {
        let Some(path) = &self.state_file else { return };
        let mut text = String::from(
            "# Servers last announced to this agent, with when (Unix seconds); dialed at start in addition to --server until they have not been announced for a week.\n",
        );
        let now = unix_now();
        for s in list {
            text.push_str(&format!("{s} {now}\n"));
        }
        if let Err(e) = tether_trust::write_file(path, text.as_bytes(), 0o644) {
            warn!(file = %path.display(), error = %e, "cannot save the server list");
        }
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
