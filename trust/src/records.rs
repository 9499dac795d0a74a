//! Node records: who owns a node name, and which names are revoked.
//!
//! Each name has at most one record: `owned` (the SHA-256 of the public key that joined, was
//! issued or last renewed under the name), `revoked` (no tunnel, no join, no renewal), or
//! `forgotten` (the name is free for a new join; no certificate is good for it until then).
//! Servers exchange records with their peers and merge them by one rule, so a revocation or a
//! forget on any server reaches all of them, and the order in which they hear of it does not
//! matter.
//!
//! No clock decides anything. A record carries:
//! - `epoch`: how many times the name was forgotten. A higher epoch wins outright: a forget
//!   ends everything that came before it.
//! - within an epoch, `revoked` wins over any other state, whatever its version: only a forget
//!   lifts a revocation, so a renewal that races with one (on this server, or on a peer that
//!   has not heard of it yet) loses.
//! - otherwise `version` (bumped by one at every write of the name): the higher wins; ties
//!   break on the state and then on `writer`, the id of the server or command that wrote it,
//!   so every server picks the same record.
//!
//! `at` (Unix milliseconds) is kept for people and for 0.1 servers, which order by it.
//!
//! The records of a data directory live in `DIR/nodes`, one per line, changed under a lock
//! (`DIR/.lock`) by the commands and by the running server alike. A line 0.1 wrote (`name state
//! at`) reads as epoch 0, version 0; 0.1 reads the first three fields of a line this release
//! writes. A line that does not parse stops the load with the file and line number: a records
//! file that cannot be read never means "nothing is revoked".

use crate::{lock_file, read_string, write_file, CertError};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::Path;

/// The record file of a data directory.
pub const NODES_FILE: &str = "nodes";

/// Largest version or epoch accepted from a file or a peer: a name is written a few times a
/// year, so anything near `u64::MAX` is an attempt to pin a record for good.
pub const MAX_VERSION: u64 = 1 << 32;
/// Longest writer id kept.
pub const MAX_WRITER: usize = 64;

/// The state of one node name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeState {
    /// Owned by the key with this hex SHA-256 of its SubjectPublicKeyInfo.
    Owned(String),
    Revoked,
    Forgotten,
}

/// One name's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub name: String,
    pub state: NodeState,
    /// Forgets of this name so far.
    pub epoch: u32,
    /// Writes of this name within the epoch.
    pub version: u64,
    /// Who wrote it (a server's id, or the host name of the command that did).
    pub writer: String,
    /// For an owned name that was renewed: the key before the renewal. Good for new tunnels
    /// until the new key is `seen` in a handshake (so a renewal whose answer was lost does not
    /// lock the node out); after that good only for the tunnels it already has.
    pub previous: Option<String>,
    /// The owner's key has been seen in a handshake since the renewal.
    pub seen: bool,
    /// When it was written, Unix milliseconds: for people, and the order 0.1 servers use.
    pub at: u64,
    /// The IP addresses this node owns (sorted, no repeats): the egress proxy sends a CONNECT
    /// to one of them to this node and to no other, whether or not it is connected. An address
    /// is owned from its first claim (or from `issue-agent --address`, or a join token that
    /// names it) until `agent release-address` or `agent forget`. A revoked node keeps its
    /// addresses, so that nobody else can take them while it is locked out.
    pub addresses: Vec<IpAddr>,
}

/// How long a forgotten name's record is kept before it is removed (`--max-nodes` counts
/// records). Longer than the certificates tether issues live (a year by default): a name with
/// no record admits any certificate for it, so a certificate made before the forget must have
/// expired by the time its record goes.
pub const FORGOTTEN_KEPT_MS: u64 = 400 * 24 * 3600 * 1000;

/// Most addresses one node may own: a node has a few interfaces, each with an address or two.
pub const MAX_ADDRESSES: usize = 32;

/// Why a record from a file or a peer was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordError {
    #[error("invalid node name {0:?}")]
    Name(String),
    #[error("key {0:?} is not a hex SHA-256")]
    Key(String),
    #[error("{what} {value} is absurd (at most {max})")]
    Absurd {
        what: &'static str,
        value: u64,
        max: u64,
    },
    #[error("writer id {0:?} is too long or not printable")]
    Writer(String),
    #[error("{0} addresses are more than a node may own (at most {MAX_ADDRESSES})")]
    Addresses(usize),
    #[error("a forgotten name owns no address")]
    ForgottenWithAddresses,
    #[error("{0}")]
    Syntax(String),
}

fn is_sha256_hex(k: &str) -> bool {
    k.len() == 64
        && k.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl NodeRecord {
    /// Checks everything a peer or a file could get wrong: the name, the key, the counters.
    pub fn validate(&self) -> Result<(), RecordError> {
        crate::validate_node_name(&self.name).map_err(|_| RecordError::Name(self.name.clone()))?;
        if let NodeState::Owned(k) = &self.state {
            if !is_sha256_hex(k) {
                return Err(RecordError::Key(k.clone()));
            }
        }
        match (&self.state, &self.previous) {
            (_, None) => {}
            (NodeState::Owned(_), Some(p)) if is_sha256_hex(p) => {}
            (_, Some(p)) => return Err(RecordError::Key(p.clone())),
        }
        if self.version > MAX_VERSION {
            return Err(RecordError::Absurd {
                what: "version",
                value: self.version,
                max: MAX_VERSION,
            });
        }
        if u64::from(self.epoch) > MAX_VERSION {
            return Err(RecordError::Absurd {
                what: "epoch",
                value: u64::from(self.epoch),
                max: MAX_VERSION,
            });
        }
        if self.writer.len() > MAX_WRITER || !self.writer.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(RecordError::Writer(self.writer.clone()));
        }
        if self.addresses.len() > MAX_ADDRESSES {
            return Err(RecordError::Addresses(self.addresses.len()));
        }
        if self.state == NodeState::Forgotten && !self.addresses.is_empty() {
            return Err(RecordError::ForgottenWithAddresses);
        }
        Ok(())
    }

    /// A forgotten record past [`FORGOTTEN_KEPT_MS`]: removed, and not taken from a peer.
    pub fn expired(&self, now_ms: u64) -> bool {
        self.state == NodeState::Forgotten && self.at.saturating_add(FORGOTTEN_KEPT_MS) < now_ms
    }

    /// Whether this record should replace `old` (see the module's documentation).
    pub fn beats(&self, old: &NodeRecord) -> bool {
        if self.epoch != old.epoch {
            return self.epoch > old.epoch;
        }
        match (&self.state, &old.state) {
            (NodeState::Revoked, NodeState::Revoked) => {}
            (NodeState::Revoked, _) => return true,
            (_, NodeState::Revoked) => return false,
            _ => {}
        }
        (self.version, rank(&self.state), self.writer.as_str())
            > (old.version, rank(&old.state), old.writer.as_str())
    }

    /// A record as a 0.1 server sends it (ordered by time), given what this server holds for
    /// the name. It becomes the next write of the name if it is newer by time, and never lifts
    /// a revocation; `None` when it loses.
    pub fn from_v1(
        name: &str,
        state: NodeState,
        at: u64,
        held: Option<&NodeRecord>,
    ) -> Option<NodeRecord> {
        let mut rec = NodeRecord {
            name: name.to_string(),
            state,
            epoch: 0,
            version: 0,
            writer: "v1-peer".into(),
            previous: None,
            seen: false,
            at,
            addresses: Vec::new(),
        };
        if let Some(old) = held {
            if (at, rank(&rec.state)) <= (old.at, rank(&old.state)) {
                return None;
            }
            if rec.state != NodeState::Forgotten {
                rec.addresses = old.addresses.clone();
            }
            rec.epoch = old.epoch;
            rec.version = old.version.saturating_add(1);
            if rec.state == NodeState::Forgotten && old.state != NodeState::Forgotten {
                rec.epoch = old.epoch.saturating_add(1);
                rec.version = 0;
            }
        }
        rec.beats_or_new(held).then_some(rec)
    }

    fn beats_or_new(&self, held: Option<&NodeRecord>) -> bool {
        match held {
            Some(old) => self.beats(old),
            None => true,
        }
    }
}

fn rank(s: &NodeState) -> (u8, &str) {
    match s {
        NodeState::Owned(k) => (0, k.as_str()),
        NodeState::Forgotten => (1, ""),
        NodeState::Revoked => (2, ""),
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Who writes records made on this machine: its host name, else `local`.
pub fn local_writer() -> String {
    crate::hostname()
        .map(|h| {
            h.chars()
                .filter(|c| c.is_ascii_graphic())
                .take(MAX_WRITER)
                .collect()
        })
        .filter(|h: &String| !h.is_empty())
        .unwrap_or_else(|| "local".into())
}

/// All records, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Records {
    pub by_name: BTreeMap<String, NodeRecord>,
}

/// What a node's certificate is allowed, as the records say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Allowed,
    Revoked,
    /// The name is owned by another key.
    OtherOwner,
    /// The name was forgotten: it is free for a new join, and no certificate is good for it
    /// until one has joined.
    Forgotten,
    /// The key before the name's last renewal, after the new key was seen: refused for new
    /// tunnels, while the tunnels it has stay up (they belong to the same node).
    Superseded,
}

impl Records {
    /// Merges one record; true when it changed anything.
    pub fn merge(&mut self, rec: NodeRecord) -> bool {
        if rec.expired(now_ms()) && !self.by_name.contains_key(&rec.name) {
            // Removed here already (or never held): a peer's copy does not bring it back.
            return false;
        }
        match self.by_name.get(&rec.name) {
            Some(old) if !rec.beats(old) => false,
            _ => {
                self.by_name.insert(rec.name.clone(), rec);
                true
            }
        }
    }

    /// Whether a certificate for `name` with public key hash `key` may connect. A forgotten
    /// name admits no certificate (a certificate made before the forget is exactly what the
    /// forget is for); a name with no record at all is allowed, since a peer's record of a
    /// fresh join or `issue-agent` may not have arrived yet. The key before a renewal is
    /// allowed until the new one has been seen.
    pub fn check(&self, name: &str, key: &str) -> Verdict {
        let Some(r) = self.by_name.get(name) else {
            return Verdict::Allowed;
        };
        match &r.state {
            NodeState::Revoked => Verdict::Revoked,
            NodeState::Forgotten => Verdict::Forgotten,
            NodeState::Owned(k) if k == key => Verdict::Allowed,
            NodeState::Owned(_) if r.previous.as_deref() == Some(key) => {
                if r.seen {
                    Verdict::Superseded
                } else {
                    Verdict::Allowed
                }
            }
            NodeState::Owned(_) => Verdict::OtherOwner,
        }
    }

    /// The forgotten names whose records have expired (see [`NodeRecord::expired`]).
    pub fn expired(&self, now_ms: u64) -> Vec<String> {
        self.by_name
            .values()
            .filter(|r| r.expired(now_ms))
            .map(|r| r.name.clone())
            .collect()
    }

    /// Whether `key` is a renewed owner not yet seen in a handshake (see [`confirm`]).
    pub fn unconfirmed(&self, name: &str, key: &str) -> bool {
        self.by_name.get(name).is_some_and(|r| {
            r.previous.is_some() && !r.seen && matches!(&r.state, NodeState::Owned(k) if k == key)
        })
    }

    /// Reads `DIR/nodes`; a missing file is no records, a line that does not parse is an
    /// error naming the file and the line.
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let path = dir.join(NODES_FILE);
        let mut r = Records::default();
        if !path.exists() {
            return Ok(r);
        }
        for (i, line) in read_string(&path)?.lines().enumerate() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let rec = parse_line(line).map_err(|e| CertError::Records {
                path: path.clone(),
                line: i + 1,
                detail: e.to_string(),
            })?;
            r.merge(rec);
        }
        Ok(r)
    }

    fn save(&self, dir: &Path) -> Result<(), CertError> {
        let mut text = String::from(
            "# name state at-ms e=epoch v=version w=writer [p=previous key [seen=1]] (state: owned:<sha256 of key>, revoked, forgotten)\n",
        );
        for r in self.by_name.values() {
            text.push_str(&r.to_line());
            text.push('\n');
        }
        write_file(&dir.join(NODES_FILE), text.as_bytes(), 0o600)
    }
}

impl NodeRecord {
    /// The record as one line of `DIR/nodes` (without the newline); [`parse_line`] reads it
    /// back. The etcd datastore stores the same line as a key's value.
    pub fn to_line(&self) -> String {
        let state = match &self.state {
            NodeState::Owned(k) => format!("owned:{k}"),
            NodeState::Revoked => "revoked".into(),
            NodeState::Forgotten => "forgotten".into(),
        };
        let previous = self
            .previous
            .as_ref()
            .map(|p| format!(" p={p}{}", if self.seen { " seen=1" } else { "" }))
            .unwrap_or_default();
        let addresses = if self.addresses.is_empty() {
            String::new()
        } else {
            let list: Vec<String> = self.addresses.iter().map(|a| a.to_string()).collect();
            format!(" a={}", list.join(","))
        };
        format!(
            "{} {state} {} e={} v={} w={}{previous}{addresses}",
            self.name, self.at, self.epoch, self.version, self.writer
        )
    }
}

/// One line of `DIR/nodes`: `name state at [e=N] [v=N] [w=ID]`.
pub fn parse_line(line: &str) -> Result<NodeRecord, RecordError> {
    let mut f = line.split(' ');
    let (Some(name), Some(state), Some(at)) = (f.next(), f.next(), f.next()) else {
        return Err(RecordError::Syntax(
            "expected `name state at-ms`".to_string(),
        ));
    };
    let at: u64 = at
        .parse()
        .map_err(|_| RecordError::Syntax(format!("{at:?} is not a time in milliseconds")))?;
    let state = match state {
        "revoked" => NodeState::Revoked,
        "forgotten" => NodeState::Forgotten,
        other => match other.strip_prefix("owned:") {
            Some(k) => NodeState::Owned(k.to_string()),
            None => return Err(RecordError::Syntax(format!("unknown state {other:?}"))),
        },
    };
    let mut rec = NodeRecord {
        name: name.to_string(),
        state,
        epoch: 0,
        version: 0,
        writer: String::new(),
        previous: None,
        seen: false,
        at,
        addresses: Vec::new(),
    };
    let number = |v: &str, what: &str| {
        v.parse::<u64>()
            .map_err(|_| RecordError::Syntax(format!("{what} {v:?} is not a number")))
    };
    for field in f {
        match field.split_once('=') {
            Some(("e", v)) => {
                let e = number(v, "epoch")?;
                rec.epoch = u32::try_from(e).map_err(|_| RecordError::Absurd {
                    what: "epoch",
                    value: e,
                    max: MAX_VERSION,
                })?;
            }
            Some(("v", v)) => rec.version = number(v, "version")?,
            Some(("w", v)) => rec.writer = v.to_string(),
            Some(("p", v)) => rec.previous = Some(v.to_string()),
            Some(("seen", "1")) => rec.seen = true,
            Some(("a", v)) => {
                let mut list = Vec::new();
                for a in v.split(',') {
                    if list.len() == MAX_ADDRESSES {
                        return Err(RecordError::Addresses(v.split(',').count()));
                    }
                    list.push(
                        a.parse::<IpAddr>().map_err(|_| {
                            RecordError::Syntax(format!("{a:?} is not an IP address"))
                        })?,
                    );
                }
                rec.addresses = normalized(list);
            }
            _ => return Err(RecordError::Syntax(format!("unknown field {field:?}"))),
        }
    }
    rec.validate()?;
    Ok(rec)
}

/// Merges `records` into the directory's file under its lock; returns the merged whole.
pub fn merge_into(dir: &Path, records: &[NodeRecord]) -> Result<Records, CertError> {
    update(dir, |all| {
        let mut changed = false;
        for r in records {
            changed |= all.merge(r.clone());
        }
        (all.clone(), changed)
    })
}

/// Writes a record made here and now (an operator's command, a join, a renewal), stamped after
/// the record it replaces so that it wins even within the same millisecond.
pub fn write_local(dir: &Path, name: &str, state: NodeState) -> Result<Records, CertError> {
    update(dir, |all| {
        all.write_local(name, state);
        (all.clone(), true)
    })
}

impl Records {
    /// Writes a record made here and now (an operator's command, a join, a renewal): the next
    /// version of the name, or the first of a new epoch for a forget.
    pub fn write_local(&mut self, name: &str, state: NodeState) {
        self.write_local_with(name, state, None, false)
    }

    fn write_local_with(
        &mut self,
        name: &str,
        state: NodeState,
        previous: Option<String>,
        seen: bool,
    ) {
        let old = self.by_name.get(name);
        let (mut epoch, mut version) = old
            .map(|r| (r.epoch, r.version.saturating_add(1)))
            .unwrap_or((0, 1));
        if state == NodeState::Forgotten && old.is_some_and(|r| r.state != NodeState::Forgotten) {
            epoch = epoch.saturating_add(1);
            version = 1;
        }
        let after = old.map(|r| r.at.saturating_add(1)).unwrap_or(0);
        // The addresses stay with the name through renewals and revocations; a forget frees them.
        let addresses = match (&state, old) {
            (NodeState::Forgotten, _) | (_, None) => Vec::new(),
            (_, Some(r)) if r.state == NodeState::Forgotten => Vec::new(),
            (_, Some(r)) => r.addresses.clone(),
        };
        let rec = NodeRecord {
            name: name.to_string(),
            state,
            epoch,
            version,
            writer: local_writer(),
            previous,
            seen,
            at: now_ms().max(after),
            addresses,
        };
        self.by_name.insert(name.to_string(), rec);
    }
}

/// Runs one of the record rules below on the directory's records under its lock, and saves
/// them when the rule changed anything.
pub fn update<T>(dir: &Path, rule: impl FnOnce(&mut Records) -> (T, bool)) -> Result<T, CertError> {
    let _guard = lock_file(dir)?;
    let mut all = Records::load(dir)?;
    let (out, changed) = rule(&mut all);
    if changed {
        all.save(dir)?;
    }
    Ok(out)
}

/// [`Records::renew`] on a data directory, under its lock.
pub fn renew(
    dir: &Path,
    name: &str,
    current_key: &str,
    new_key: &str,
) -> Result<Result<(), NameRefusal>, CertError> {
    update(dir, |all| {
        let r = all.renew(name, current_key, new_key);
        let changed = r.is_ok();
        (r, changed)
    })
}

/// [`Records::confirm`] on a data directory, under its lock.
pub fn confirm(dir: &Path, name: &str, key: &str) -> Result<bool, CertError> {
    update(dir, |all| {
        let changed = all.confirm(name, key);
        (changed, changed)
    })
}

/// [`Records::claim`] on a data directory, under its lock.
pub fn claim(dir: &Path, name: &str, key: &str) -> Result<Result<(), NameRefusal>, CertError> {
    update(dir, |all| all.claim(name, key))
}

/// Why the records refuse a join's claim or a renewal of a node name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameRefusal {
    /// The name is revoked: nothing is issued for it until an operator forgets it.
    #[error(
        "node name {0:?} is revoked; an operator must run `tether-server agent forget {0}` first"
    )]
    Revoked(String),
    /// The name was forgotten: the node must join again (a renewal cannot bring it back).
    #[error("node name {0:?} was forgotten; the node must join again")]
    Forgotten(String),
    /// Another key owns the name: a join of a reinstalled node, or an impostor.
    #[error("node name {0:?} is already owned by another key; if the node was reinstalled, an operator must run `tether-server agent forget {0}` first")]
    OwnedByAnother(String),
    /// The renewing certificate's key no longer owns the name (a renewal since, or a rejoin).
    #[error("the key of this certificate no longer owns node name {0:?}")]
    KeyNoLongerOwns(String),
}

/// The rules by which names change owner. Each reads and writes only the record of the name
/// it is given, so a store that keeps one record per key (etcd) can run them on that record
/// alone and write it back with a compare-and-swap.
impl Records {
    /// Moves `name` to `new_key` for a renewal presented with `current_key`: only the current
    /// owner may renew, never a revoked or forgotten name, so a renewal cannot undo a
    /// revocation however it races with one.
    pub fn renew(
        &mut self,
        name: &str,
        current_key: &str,
        new_key: &str,
    ) -> Result<(), NameRefusal> {
        let held = self.by_name.get(name).cloned();
        let previous = match held
            .as_ref()
            .map(|r| (&r.state, r.previous.as_deref().filter(|_| !r.seen)))
        {
            Some((NodeState::Revoked, _)) => return Err(NameRefusal::Revoked(name.into())),
            Some((NodeState::Forgotten, _)) => return Err(NameRefusal::Forgotten(name.into())),
            // The owner renews: its key stays good until the new one is seen.
            Some((NodeState::Owned(k), _)) if k == current_key => current_key,
            // The key before the last renewal renews again: that renewal's answer was lost,
            // and its key never used. It is replaced; the old key stays good.
            Some((NodeState::Owned(_), Some(p))) if p == current_key => current_key,
            Some((NodeState::Owned(_), _)) => {
                return Err(NameRefusal::KeyNoLongerOwns(name.into()))
            }
            // No record (a certificate from before records, or whose record has not arrived).
            None => current_key,
        };
        self.write_local_with(
            name,
            NodeState::Owned(new_key.to_string()),
            Some(previous.to_string()),
            false,
        );
        Ok(())
    }

    /// The renewed key of `name` was seen in a handshake: the key before the renewal is no
    /// longer good for new tunnels. True when it changed the records.
    pub fn confirm(&mut self, name: &str, key: &str) -> bool {
        if !self.unconfirmed(name, key) {
            return false;
        }
        let previous = self.by_name.get(name).and_then(|r| r.previous.clone());
        self.write_local_with(name, NodeState::Owned(key.to_string()), previous, true);
        true
    }

    /// Records the owner of `name` unless another key owns it (the check and the write are one
    /// step under the store's lock or compare-and-swap, so two joins of one name cannot both
    /// win); the second value tells whether anything was written.
    pub fn claim(&mut self, name: &str, key: &str) -> (Result<(), NameRefusal>, bool) {
        match self.by_name.get(name).map(|r| r.state.clone()) {
            Some(NodeState::Revoked) => return (Err(NameRefusal::Revoked(name.into())), false),
            Some(NodeState::Owned(k)) if k != key => {
                return (Err(NameRefusal::OwnedByAnother(name.into())), false)
            }
            Some(NodeState::Owned(_)) => return (Ok(()), false),
            _ => {}
        }
        self.write_local(name, NodeState::Owned(key.to_string()));
        (Ok(()), true)
    }
}

/// Sorts and dedups a list of addresses: the one form a record holds them in, so that two
/// servers write the same line for the same set.
/// An IPv4-mapped IPv6 address is kept as its IPv4 address, so that one address has one form.
pub fn normalized(list: Vec<IpAddr>) -> Vec<IpAddr> {
    let mut list: Vec<IpAddr> = list.into_iter().map(|a| a.to_canonical()).collect();
    list.sort();
    list.dedup();
    list
}

/// What became of a node's claim of its addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AddressClaim {
    /// Addresses the node owns now, including those it owned before.
    pub owned: Vec<IpAddr>,
    /// Addresses refused: owned by another node (named), or past [`MAX_ADDRESSES`] (`None`).
    pub refused: Vec<(IpAddr, Option<String>)>,
}

/// Address ownership: which node an address leads to. Like the name rules above, the writes
/// read and write one name's record only; the check against the other names' records is made
/// by the caller on the records it holds (see `Authority::claim_addresses`).
impl Records {
    /// The names whose records own `addr` (sorted). More than one only when two servers took
    /// two first claims at once, before either heard of the other: the address then leads
    /// nowhere until an operator releases it (`agent release-address`).
    pub fn owners_of(&self, addr: IpAddr) -> Vec<&str> {
        let addr = addr.to_canonical();
        self.by_name
            .values()
            .filter(|r| r.state != NodeState::Forgotten && r.addresses.contains(&addr))
            .map(|r| r.name.as_str())
            .collect()
    }

    /// Every address owned by more than one name, with those names.
    pub fn contested(&self) -> Vec<(IpAddr, Vec<String>)> {
        let mut by_addr: BTreeMap<IpAddr, Vec<String>> = BTreeMap::new();
        for r in self.by_name.values() {
            if r.state == NodeState::Forgotten {
                continue;
            }
            for a in &r.addresses {
                by_addr.entry(*a).or_default().push(r.name.clone());
            }
        }
        by_addr.into_iter().filter(|(_, n)| n.len() > 1).collect()
    }

    /// Adds `addrs` to the addresses `name` owns (a node's first claim, or a pin by an
    /// operator). `key` is the claiming certificate's key: a name with no record yet is
    /// recorded as its owner first (as a join would); a name owned by another key, revoked or
    /// forgotten takes no claim. The caller has already removed the addresses other names own.
    /// Returns what the name owns after, and whether anything was written.
    pub fn add_addresses(
        &mut self,
        name: &str,
        key: Option<&str>,
        addrs: &[IpAddr],
    ) -> (AddressClaim, bool) {
        let mut out = AddressClaim::default();
        let held = self.by_name.get(name);
        let may = match (held.map(|r| &r.state), key) {
            (Some(NodeState::Owned(k)), Some(key)) => {
                k == key || held.and_then(|r| r.previous.as_deref()) == Some(key)
            }
            // An operator's pin (no key): any record that is not forgotten.
            (Some(NodeState::Owned(_) | NodeState::Revoked), None) => true,
            (None, Some(_)) => true,
            _ => false,
        };
        if !may {
            out.refused = addrs.iter().map(|a| (*a, None)).collect();
            return (out, false);
        }
        let mut list = held.map(|r| r.addresses.clone()).unwrap_or_default();
        let before = list.clone();
        for a in &normalized(addrs.to_vec()) {
            if list.contains(a) {
                continue;
            }
            if list.len() >= MAX_ADDRESSES {
                out.refused.push((*a, None));
                continue;
            }
            list.push(*a);
        }
        let list = normalized(list);
        out.owned = list.clone();
        if list == before && held.is_some() {
            return (out, false);
        }
        match (held, key) {
            (None, Some(key)) => self.write_local(name, NodeState::Owned(key.to_string())),
            (Some(r), _) => {
                let (state, previous, seen) = (r.state.clone(), r.previous.clone(), r.seen);
                self.write_local_with(name, state, previous, seen);
            }
            (None, None) => return (out, false),
        }
        if let Some(r) = self.by_name.get_mut(name) {
            r.addresses = list;
        }
        (out, true)
    }

    /// Lifts `name`'s ownership of `addr`; true when it owned it.
    pub fn release_address(&mut self, name: &str, addr: IpAddr) -> bool {
        let Some(r) = self.by_name.get(name) else {
            return false;
        };
        if !r.addresses.contains(&addr) {
            return false;
        }
        let (state, previous, seen) = (r.state.clone(), r.previous.clone(), r.seen);
        self.write_local_with(name, state, previous, seen);
        if let Some(r) = self.by_name.get_mut(name) {
            r.addresses.retain(|a| *a != addr);
        }
        true
    }
}

#[cfg(test)]
mod tests;
