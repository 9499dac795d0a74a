//! Who may connect: the node records (owner keys, revocations) of the datastore, kept in memory,
//! brought up to date as the store changes (the data directory's file when it changes, or etcd's
//! watch), merged with what peers announce (data-directory store only), and applied to the
//! tunnels that are up.

use crate::datastore::{Datastore, DatastoreError, Kind};
use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::RwLock;
use std::time::SystemTime;
use tether_link::reconnect::Outbox;
use tether_proto::capability::{self, Capabilities};
use tether_proto::{Message, RecordState};
use tether_trust::records::{
    self, AddressClaim, NameRefusal, NodeRecord, NodeState, RecordError, Records, Verdict,
};
use tokio::sync::watch;
use tracing::{error, warn};

/// Where a host named in a CONNECT leads (see [`Authority::resolve`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resolved {
    /// This node: the host is its name, or an address it owns.
    Node(String),
    /// An address no node owns: it leads nowhere.
    Unowned(IpAddr),
    /// An address more than one node owns: it leads nowhere until an operator releases it.
    Contested(Vec<String>),
}

pub struct Authority {
    store: Datastore,
    records: RwLock<Records>,
    mtime: std::sync::Mutex<Option<SystemTime>>,
    /// Bumped whenever the records change, so that peer control streams send what is new.
    version: watch::Sender<u64>,
}

fn mtime(dir: &std::path::Path) -> Option<SystemTime> {
    std::fs::metadata(dir.join(records::NODES_FILE))
        .and_then(|m| m.modified())
        .ok()
}

impl Authority {
    /// Holds `records` (read from `store`, or its cache) in memory. With the data directory
    /// as the store, a file that cannot be read or parsed stops the start: starting without
    /// it would mean that nothing is revoked.
    pub fn new(store: Datastore, records: Records) -> Self {
        let mtime = match &store {
            Datastore::Dir(dir) => mtime(dir),
            Datastore::Etcd(_) => None,
        };
        Authority {
            mtime: std::sync::Mutex::new(mtime),
            store,
            records: RwLock::new(records),
            version: watch::channel(0).0,
        }
    }

    pub fn store(&self) -> &Datastore {
        &self.store
    }

    pub fn check(&self, name: &str, key: &str) -> Verdict {
        self.read().check(name, key)
    }

    /// Reloads the records file if it changed since the last look (data-directory store; with
    /// etcd the follower applies changes as they come); true when anything changed.
    pub fn poll(&self) -> bool {
        let Datastore::Dir(dir) = &self.store else {
            return false;
        };
        let now = mtime(dir);
        {
            let mut last = self.mtime.lock().unwrap_or_else(|p| p.into_inner());
            if *last == now {
                return false;
            }
            *last = now;
        }
        match Records::load(dir) {
            Ok(r) => self.apply(r.by_name.into_values()),
            Err(e) => {
                // The records in memory stay in force: a broken edit revokes nothing and
                // un-revokes nothing.
                error!(error = %e, "cannot reload node records; keeping the ones loaded before");
                false
            }
        }
    }

    /// Merges records read from the store into memory (by their own order, so an older copy
    /// changes nothing); true when anything changed. Tunnels that the change refuses are
    /// closed by the identity room, which watches [`subscribe`](Self::subscribe).
    pub fn apply(&self, new: impl IntoIterator<Item = NodeRecord>) -> bool {
        let mut cur = self.records.write().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        for r in new {
            changed |= cur.merge(r);
        }
        drop(cur);
        if changed {
            self.version.send_modify(|v| *v += 1);
        }
        changed
    }

    fn stored(&self, rec: Option<NodeRecord>) {
        if let Datastore::Dir(dir) = &self.store {
            *self.mtime.lock().unwrap_or_else(|p| p.into_inner()) = mtime(dir);
        }
        self.apply(rec);
    }

    /// Merges a peer's records into the file (under its lock) and memory.
    fn merge(&self, recs: Vec<NodeRecord>) -> Result<bool, tether_trust::CertError> {
        let Datastore::Dir(dir) = &self.store else {
            return Ok(false);
        };
        let all = records::merge_into(dir, &recs)?;
        *self.mtime.lock().unwrap_or_else(|p| p.into_inner()) = mtime(dir);
        Ok(self.apply(all.by_name.into_values()))
    }

    /// Moves a name to a renewal's new key, if `current` owns it now (one step in the store).
    pub async fn renew(
        &self,
        name: &str,
        current: &str,
        new: &str,
    ) -> Result<Result<(), NameRefusal>, DatastoreError> {
        let (r, rec) = self.store.renew(name, current, new).await?;
        self.stored(rec);
        Ok(r)
    }

    /// A renewed key was seen in a handshake: the key before it is done (written to the store
    /// and so to the other servers). Cheap when there is nothing to do.
    pub async fn confirm(&self, name: &str, key: &str) {
        if !self.read().unconfirmed(name, key) {
            return;
        }
        match self.store.confirm(name, key).await {
            Ok((_, rec)) => self.stored(rec),
            Err(e) => warn!(node = name, error = %e, "cannot record that a renewed key was seen"),
        }
    }

    /// Claims a node name for a key (one step in the store).
    pub async fn claim(
        &self,
        name: &str,
        key: &str,
    ) -> Result<Result<(), NameRefusal>, DatastoreError> {
        let (r, rec) = self.store.claim(name, key).await?;
        self.stored(rec);
        Ok(r)
    }

    /// Where a host named in a CONNECT leads, as the records say: a node name leads to that
    /// node; an IP address to the one node that owns it, connected or not. A name is never
    /// taken for an address nor an address for a name (no node name parses as an address).
    pub fn resolve(&self, host: &str) -> Resolved {
        let Ok(addr) = host.parse::<IpAddr>() else {
            return Resolved::Node(host.to_string());
        };
        let all = self.read();
        match all.owners_of(addr).as_slice() {
            [] => Resolved::Unowned(addr),
            [one] => Resolved::Node(one.to_string()),
            many => Resolved::Contested(many.iter().map(|n| n.to_string()).collect()),
        }
    }

    /// Addresses owned by more than one node (two first claims at once on two servers).
    pub fn contested(&self) -> Vec<(IpAddr, Vec<String>)> {
        self.read().contested()
    }

    /// A node's claim of the addresses its agent reported, on a tunnel proven to be `name`
    /// with key `key`: an address no other node owns becomes this node's (written to the
    /// store, and so to every server); one another node owns is refused, with its owner.
    /// Writes nothing when the node owns them all already, so a reconnect costs no write.
    pub async fn claim_addresses(
        &self,
        name: &str,
        key: &str,
        addrs: &[IpAddr],
    ) -> Result<AddressClaim, DatastoreError> {
        let mut refused = Vec::new();
        let mut free = Vec::new();
        let mine = {
            let all = self.read();
            for a in records::normalized(addrs.to_vec()) {
                match all.owners_of(a).into_iter().find(|o| *o != name) {
                    Some(other) => refused.push((a, Some(other.to_string()))),
                    None => free.push(a),
                }
            }
            all.by_name.get(name).map(|r| r.addresses.clone())
        };
        let mut claim = match mine {
            Some(owned) if free.iter().all(|a| owned.contains(a)) => AddressClaim {
                owned,
                refused: Vec::new(),
            },
            _ => {
                let (claim, rec) = self
                    .store
                    .update(name, |all| all.add_addresses(name, Some(key), &free))
                    .await?;
                self.stored(rec);
                claim
            }
        };
        claim.refused.extend(refused);
        Ok(claim)
    }

    /// Pins addresses to a node (a join with a token that names them): see
    /// `Datastore::pin_addresses`. What it wrote is applied here at once.
    pub async fn pin_addresses(
        &self,
        name: &str,
        addrs: &[IpAddr],
    ) -> Result<AddressClaim, DatastoreError> {
        let claim = self.store.pin_addresses(name, addrs).await?;
        let (_, rec) = self.store.update(name, |_| ((), false)).await?;
        self.stored(rec);
        Ok(claim)
    }

    /// Removes the forgotten records that have expired (see `NodeRecord::expired`), from the
    /// store and from memory; returns how many. Every server runs the same rule on the same
    /// records, so they agree on what goes.
    pub async fn remove_expired(&self) -> Result<usize, DatastoreError> {
        let now = records::now_ms();
        let names = self.read().expired(now);
        if names.is_empty() {
            return Ok(0);
        }
        self.store.remove_expired(&names, now).await?;
        let mut cur = self.records.write().unwrap_or_else(|p| p.into_inner());
        for n in &names {
            cur.by_name.remove(n);
        }
        Ok(names.len())
    }

    /// Whether the records hold `name` at all.
    pub fn knows(&self, name: &str) -> bool {
        self.read().by_name.contains_key(name)
    }

    /// How many records there are (`--max-nodes` bounds them).
    pub fn record_count(&self) -> usize {
        self.read().by_name.len()
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Runs `f` over the records in memory.
    pub fn with_records<T>(&self, f: impl FnOnce(&Records) -> T) -> T {
        f(&self.read())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Records> {
        self.records.read().unwrap_or_else(|p| p.into_inner())
    }
}

impl Authority {
    /// The records not yet sent on one server-to-server link, as messages the peer
    /// understands; `sent` is that link's memory of what it has sent.
    pub fn pending(
        &self,
        peer: &Capabilities,
        sent: &mut HashMap<String, RecordId>,
    ) -> Vec<Message> {
        let v2 = peer.has(capability::RECORDS_V2);
        let addresses = peer.has(capability::RECORDS_ADDRESSES);
        let mut out = Vec::new();
        // With etcd every server reads the records from it: peers pass none.
        if self.store.kind() == Kind::Etcd {
            return out;
        }
        for r in self.read().by_name.values() {
            let id = RecordId::of(r);
            if sent.get(&r.name) != Some(&id) {
                out.push(to_message(r, v2, addresses));
                sent.insert(r.name.clone(), id);
            }
        }
        out
    }

    /// Merges a record a peer sent; a malformed or absurd one is refused with a log line.
    pub fn merge_from_peer(&self, peer: &str, m: &Message) {
        let held = |name: &str| self.read().by_name.get(name).cloned();
        match from_message(m, held) {
            Ok(Some(r)) => {
                if let Err(e) = self.merge(vec![r]) {
                    warn!(peer, error = %e, "cannot store a node record from a peer");
                }
            }
            Ok(None) => {}
            Err(e) => warn!(peer, error = %e, "refused a node record from a peer"),
        }
    }
}

/// Which version of a record a link has sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordId(u32, u64, u64, u8);

impl RecordId {
    fn of(r: &NodeRecord) -> Self {
        let state = match r.state {
            NodeState::Owned(_) => 0,
            NodeState::Forgotten => 1,
            NodeState::Revoked => 2,
        };
        RecordId(r.epoch, r.version, r.at, state)
    }
}

fn wire_state(s: &NodeState) -> RecordState {
    match s {
        NodeState::Owned(k) => RecordState::Owned(k.clone()),
        NodeState::Revoked => RecordState::Revoked,
        NodeState::Forgotten => RecordState::Forgotten,
    }
}

fn local_state(s: &RecordState) -> NodeState {
    match s {
        RecordState::Owned(k) => NodeState::Owned(k.clone()),
        RecordState::Revoked => NodeState::Revoked,
        RecordState::Forgotten => NodeState::Forgotten,
    }
}

/// A record as a message: ordered by epoch and version for a peer that has
/// [`capability::RECORDS_V2`], by time for a 0.1 peer; with the node's addresses for a peer
/// that has [`capability::RECORDS_ADDRESSES`].
pub fn to_message(r: &NodeRecord, v2: bool, addresses: bool) -> Message {
    if v2 {
        Message::NodeRecordV2 {
            name: r.name.clone(),
            state: wire_state(&r.state),
            epoch: r.epoch,
            version: r.version,
            writer: r.writer.clone(),
            at_ms: r.at,
            previous: r.previous.clone().unwrap_or_default(),
            seen: r.seen,
            addresses: if addresses {
                r.addresses.iter().map(|a| a.to_string()).collect()
            } else {
                Vec::new()
            },
        }
    } else {
        Message::NodeRecord {
            name: r.name.clone(),
            state: wire_state(&r.state),
            at_ms: r.at,
        }
    }
}

/// How far in the future a peer's record time may be before it is absurd.
const MAX_CLOCK_AHEAD_MS: u64 = 24 * 3600 * 1000;

/// A record from a peer's message: `Ok(None)` for another message, or a 0.1 record that loses
/// to the one held; an error for a malformed or absurd record.
pub fn from_message(
    m: &Message,
    held: impl FnOnce(&str) -> Option<NodeRecord>,
) -> Result<Option<NodeRecord>, RecordError> {
    let rec = match m {
        Message::NodeRecordV2 {
            name,
            state,
            epoch,
            version,
            writer,
            at_ms,
            previous,
            seen,
            addresses,
        } => {
            NodeRecord {
                name: name.clone(),
                state: local_state(state),
                epoch: *epoch,
                version: *version,
                writer: writer.clone(),
                previous: (!previous.is_empty()).then(|| previous.clone()),
                seen: *seen,
                at: *at_ms,
                addresses: {
                    if addresses.len() > records::MAX_ADDRESSES {
                        return Err(RecordError::Addresses(addresses.len()));
                    }
                    let mut list = Vec::with_capacity(addresses.len());
                    for a in addresses {
                        list.push(a.parse().map_err(|_| {
                            RecordError::Syntax(format!("{a:?} is not an IP address"))
                        })?);
                    }
                    records::normalized(list)
                },
            }
        }
        Message::NodeRecord { name, state, at_ms } => {
            tether_trust::validate_node_name(name).map_err(|_| RecordError::Name(name.clone()))?;
            check_time(*at_ms)?;
            match NodeRecord::from_v1(name, local_state(state), *at_ms, held(name).as_ref()) {
                Some(r) => r,
                None => return Ok(None),
            }
        }
        _ => return Ok(None),
    };
    check_time(rec.at)?;
    rec.validate()?;
    Ok(Some(rec))
}

fn check_time(at_ms: u64) -> Result<(), RecordError> {
    let max = records::now_ms().saturating_add(MAX_CLOCK_AHEAD_MS);
    if at_ms > max {
        return Err(RecordError::Absurd {
            what: "time (ms)",
            value: at_ms,
            max,
        });
    }
    Ok(())
}

/// The node records one server-to-server link still has to send: all of them first, then each
/// as it changes. Links this server dialed and links its peers dialed use the same one.
pub struct RecordsOutbox {
    authority: Arc<Authority>,
    changed: watch::Receiver<u64>,
    peer: Capabilities,
    sent: HashMap<String, RecordId>,
    started: bool,
}

impl RecordsOutbox {
    pub fn new(authority: Arc<Authority>, peer: &Capabilities) -> Self {
        RecordsOutbox {
            changed: authority.subscribe(),
            authority,
            peer: peer.clone(),
            sent: HashMap::new(),
            started: false,
        }
    }

    /// Waits until some record is new to this link, and returns those that are.
    pub async fn next(&mut self) -> Vec<Message> {
        loop {
            if self.started && self.changed.changed().await.is_err() {
                return std::future::pending().await;
            }
            self.started = true;
            self.changed.borrow_and_update();
            let out = self.authority.pending(&self.peer, &mut self.sent);
            if !out.is_empty() {
                return out;
            }
        }
    }
}

impl Outbox for RecordsOutbox {
    fn next(&mut self) -> Pin<Box<dyn Future<Output = Vec<Message>> + Send + '_>> {
        Box::pin(RecordsOutbox::next(self))
    }
}
