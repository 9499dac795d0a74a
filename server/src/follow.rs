//! Following etcd: read everything once, then watch every key under the prefix from the
//! revision read, applying each change as it comes. Records go to the authority (which closes
//! the tunnels a revocation names, at once), memberships to the announcer and the peer links.
//!
//! When etcd cannot be reached the server serves from the last state it read (fail static) and
//! says so (`tether_datastore_available`, `/readyz`'s text, `status`); it reconnects with
//! backoff and resumes the watch from the last revision it applied, so a change made meanwhile
//! is applied, not lost. Only a compacted revision makes it read everything again.
//!
//! The records read are also written to the data directory's `nodes` file, which in etcd mode
//! is only a cache: a server that starts while etcd is down serves from it.

use crate::announce::Announcer;
use crate::authority::Authority;
use crate::datastore::etcd::{Etcd, Event, WatchEnd};
use crate::datastore::members::Member;
use crate::datastore::{parse_record, StoreHealth, NODES, SERVERS};
use crate::peers::Discovered;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tether_link::backoff::Backoff;
use tether_process::shutdown::ShutdownSignal;
use tether_trust::records::{self, NodeRecord};
use tracing::{info, warn};

/// What the follower updates.
pub struct Follower {
    pub etcd: Arc<Etcd>,
    pub authority: Arc<Authority>,
    pub announcer: Announcer,
    pub discovered: Arc<Discovered>,
    pub health: Arc<StoreHealth>,
    /// Where the cache of records is written.
    pub data_dir: PathBuf,
}

/// The membership as read so far, by server id.
type Members = BTreeMap<String, Member>;

/// Most servers followed from the membership: a control plane has a handful; anything far
/// beyond that is a broken or hostile etcd, which must not make a server dial without bound.
pub const MAX_MEMBERS: usize = 64;

/// How often the watch is checked against etcd (see [`Follower::fell_behind`]): a watch that
/// died silently is noticed within twice this, and a revocation made meanwhile applied.
pub const WATCH_CHECK: Duration = Duration::from_secs(2);

/// Whether a membership address is `HOST:PORT` of a sane length.
fn valid_address(a: &str) -> bool {
    a.len() <= 261
        && a.rsplit_once(':').is_some_and(|(host, port)| {
            !host.is_empty()
                && port.parse::<u16>().is_ok_and(|p| p != 0)
                && host.bytes().all(|b| b.is_ascii_graphic())
        })
}

impl Follower {
    fn apply(&self, events: Vec<Event>, members: &mut Members) -> bool {
        let mut recs: Vec<NodeRecord> = Vec::new();
        let mut members_changed = false;
        for e in events {
            let (key, value) = match &e {
                Event::Put(kv) => (kv.key.as_str(), Some(&kv.value)),
                Event::Delete { key, .. } => (key.as_str(), None),
            };
            let Some(rel) = self.etcd.relative(key) else {
                continue;
            };
            if rel.starts_with(NODES) {
                // A record is never deleted by tether; a deleted key changes nothing (it
                // cannot lift a revocation).
                if let Some(v) = value {
                    match parse_record(key, v) {
                        Ok(r) => recs.push(r),
                        Err(e) => warn!(error = %e, "ignored a node record in etcd"),
                    }
                }
            } else if let Some(id) = rel.strip_prefix(SERVERS) {
                members_changed = true;
                match value.map(|v| serde_json::from_slice::<Member>(v)) {
                    Some(Ok(m)) if !valid_address(&m.address) => {
                        warn!(key, address = %m.address, "ignored a membership key in etcd: not HOST:PORT");
                        members.remove(id);
                    }
                    Some(Ok(m)) => {
                        members.insert(id.to_string(), m);
                    }
                    Some(Err(e)) => {
                        warn!(key, error = %e, "ignored a membership key in etcd");
                        members.remove(id);
                    }
                    None => {
                        members.remove(id);
                    }
                }
            }
        }
        if !recs.is_empty() {
            if let Err(e) = records::merge_into(&self.data_dir, &recs) {
                warn!(error = %e, "cannot write the cache of node records");
            }
            self.authority.apply(recs);
        }
        members_changed
    }

    fn publish(&self, members: &Members, stop: &ShutdownSignal) {
        let mut addrs: Vec<String> = members.values().map(|m| m.address.clone()).collect();
        addrs.sort();
        addrs.dedup();
        if addrs.len() > MAX_MEMBERS {
            warn!(
                servers = addrs.len(),
                max = MAX_MEMBERS,
                "etcd lists more servers than are followed; using the first"
            );
            addrs.truncate(MAX_MEMBERS);
        }
        self.discovered.set(&addrs, stop);
        self.announcer.set_discovered(addrs);
    }

    /// Follows etcd until `stop`.
    pub async fn run(self, mut stop: ShutdownSignal) {
        let mut members = Members::new();
        let mut revision = 0i64;
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            if revision == 0 {
                match self.etcd.range_prefix("").await {
                    Ok((kvs, rev)) => {
                        members.clear();
                        self.apply(kvs.into_iter().map(Event::Put).collect(), &mut members);
                        self.publish(&members, &stop);
                        revision = rev;
                        self.health.revision.store(rev, Ordering::Relaxed);
                    }
                    Err(e) => {
                        self.down(&e.to_string());
                        tokio::select! {
                            _ = tokio::time::sleep(backoff.next_delay(fastrand::f64())) => continue,
                            _ = stop.wait() => return,
                        }
                    }
                }
            }
            if !self.health.available.swap(true, Ordering::Relaxed) {
                info!(revision, "following etcd");
            }
            backoff.reset();
            let links_stop = stop.clone();
            let watch = self.etcd.watch(revision + 1, |events, rev| {
                if self.apply(events, &mut members) {
                    self.publish(&members, &links_stop);
                }
                if rev > revision {
                    revision = rev;
                    self.health.revision.store(rev, Ordering::Relaxed);
                }
            });
            let end = tokio::select! {
                r = watch => r,
                (missed, seen) = self.fell_behind() => {
                    warn!(
                        missed,
                        seen,
                        "the etcd watch went silent: a change etcd holds has not come through it; watching again"
                    );
                    self.health.silent_watches.fetch_add(1, Ordering::Relaxed);
                    Ok(WatchEnd::Canceled)
                }
                _ = stop.wait() => return,
            };
            match end {
                Ok(WatchEnd::Compacted(at)) => {
                    warn!(
                        revision,
                        compacted = at,
                        "etcd compacted past the last revision applied; reading everything again"
                    );
                    revision = 0;
                }
                Ok(WatchEnd::Canceled) => {
                    // etcd ended the watch (a member losing its leader, say): watch again after
                    // a pause, from the last revision applied.
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay(fastrand::f64())) => {}
                        _ = stop.wait() => return,
                    }
                }
                Err(e) => {
                    self.down(&e.to_string());
                    tokio::select! {
                        _ = tokio::time::sleep(backoff.next_delay(fastrand::f64())) => {}
                        _ = stop.wait() => return,
                    }
                }
            }
        }
    }

    /// Resolves when the watch has fallen behind etcd: a change under the prefix that etcd
    /// already held one [`WATCH_CHECK`] ago has still not come through it. Returns that
    /// change's revision and the last the watch brought.
    ///
    /// A watch is one long answer on one connection. When that connection dies without a
    /// reset (a partition, a firewall or NAT that dropped its state, a member's host that lost
    /// power), nothing arrives, and etcd's progress notices come only every ten minutes by
    /// default: until then the server would miss every change, a revocation included, while
    /// its other calls to etcd succeed on new connections. So the watch is checked against
    /// etcd itself: every [`WATCH_CHECK`], the latest change under the prefix is read; one that
    /// the watch has not delivered by the next check means it is dead.
    async fn fell_behind(&self) -> (i64, i64) {
        let mut pending: Option<i64> = None;
        let mut tick = tokio::time::interval(WATCH_CHECK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let seen = self.health.revision.load(Ordering::Relaxed);
            if let Some(missed) = pending.filter(|&m| seen < m) {
                return (missed, seen);
            }
            // Unreachable etcd says nothing of the watch: its own errors end it.
            pending = match self.etcd.latest_change().await {
                Ok(latest) if latest > seen => Some(latest),
                _ => None,
            };
        }
    }

    fn down(&self, why: &str) {
        if self.health.available.swap(false, Ordering::Relaxed) {
            warn!(error = why, "etcd unavailable: serving from the last state read; joins, renewals and token and node commands are refused until it returns");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::valid_address;

    #[test]
    fn membership_addresses_are_host_and_port() {
        assert!(valid_address("10.0.0.1:9443"));
        assert!(valid_address("[fd00::1]:9443"));
        assert!(valid_address("master-1.example:9443"));
        for bad in [
            "",
            "host",
            ":9443",
            "host:0",
            "host:99999",
            "a b:1",
            &"a".repeat(300),
        ] {
            assert!(!valid_address(bad), "{bad:?}");
        }
    }
}
