//! Node records: who owns a node name, and which names are revoked.
//!
//! Each name has at most one record, and the newest record wins (last writer wins, by its
//! timestamp): `owned` (the SHA-256 of the public key that first joined or was issued under the
//! name), `revoked` (no tunnel, no join), or `forgotten` (a tombstone: the name is free again).
//! Servers exchange records with their peers and merge them by the same rule, so a revocation
//! or a forget on any server reaches all of them, and the order in which they hear of it does
//! not matter.
//!
//! The records of a data directory live in `DIR/nodes`, one per line, changed under a lock
//! (`DIR/.lock`) by the commands and by the running server alike.

use crate::{lock_file, read_string, write_file, CertError};
use std::collections::BTreeMap;
use std::path::Path;

/// The record file of a data directory.
pub const NODES_FILE: &str = "nodes";

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
    /// When it was written, Unix milliseconds: the newer record wins.
    pub at: u64,
}

impl NodeRecord {
    pub fn new(name: &str, state: NodeState) -> Self {
        NodeRecord {
            name: name.to_string(),
            state,
            at: now_ms(),
        }
    }

    /// Whether this record should replace `old`. Ties break on the state so that every server
    /// picks the same one.
    pub fn beats(&self, old: &NodeRecord) -> bool {
        (self.at, rank(&self.state)) > (old.at, rank(&old.state))
    }
}

fn rank(s: &NodeState) -> (u8, &str) {
    match s {
        NodeState::Forgotten => (0, ""),
        NodeState::Owned(k) => (1, k.as_str()),
        NodeState::Revoked => (2, ""),
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
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
}

impl Records {
    /// Merges one record; true when it changed anything.
    pub fn merge(&mut self, rec: NodeRecord) -> bool {
        match self.by_name.get(&rec.name) {
            Some(old) if !rec.beats(old) => false,
            _ => {
                self.by_name.insert(rec.name.clone(), rec);
                true
            }
        }
    }

    /// Whether a certificate for `name` with public key hash `key` may connect. A name with no
    /// record (certificates issued before records existed) is allowed.
    pub fn check(&self, name: &str, key: &str) -> Verdict {
        match self.by_name.get(name).map(|r| &r.state) {
            Some(NodeState::Revoked) => Verdict::Revoked,
            Some(NodeState::Owned(k)) if k != key => Verdict::OtherOwner,
            _ => Verdict::Allowed,
        }
    }

    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let path = dir.join(NODES_FILE);
        let mut r = Records::default();
        if !path.exists() {
            return Ok(r);
        }
        for line in read_string(&path)?.lines() {
            if line.starts_with('#') || line.trim().is_empty() {
                continue;
            }
            let mut f = line.split(' ');
            let (Some(name), Some(state), Some(at)) = (f.next(), f.next(), f.next()) else {
                continue;
            };
            let Ok(at) = at.parse() else { continue };
            let state = match state {
                "revoked" => NodeState::Revoked,
                "forgotten" => NodeState::Forgotten,
                other => match other.strip_prefix("owned:") {
                    Some(k) => NodeState::Owned(k.to_string()),
                    None => continue,
                },
            };
            r.merge(NodeRecord {
                name: name.to_string(),
                state,
                at,
            });
        }
        Ok(r)
    }

    fn save(&self, dir: &Path) -> Result<(), CertError> {
        let mut text =
            String::from("# name state at-ms (state: owned:<sha256 of key>, revoked, forgotten)\n");
        for r in self.by_name.values() {
            let state = match &r.state {
                NodeState::Owned(k) => format!("owned:{k}"),
                NodeState::Revoked => "revoked".into(),
                NodeState::Forgotten => "forgotten".into(),
            };
            text.push_str(&format!("{} {state} {}\n", r.name, r.at));
        }
        write_file(&dir.join(NODES_FILE), text.as_bytes(), 0o600)
    }
}

/// Merges `records` into the directory's file under its lock; returns the merged whole.
pub fn merge_into(dir: &Path, records: &[NodeRecord]) -> Result<Records, CertError> {
    let _guard = lock_file(dir)?;
    let mut all = Records::load(dir)?;
    let mut changed = false;
    for r in records {
        changed |= all.merge(r.clone());
    }
    if changed {
        all.save(dir)?;
    }
    Ok(all)
}

/// Writes a record made here and now (an operator's command, a join, a renewal), stamped after
/// the record it replaces so that it wins even within the same millisecond.
pub fn write_local(dir: &Path, name: &str, state: NodeState) -> Result<Records, CertError> {
    let _guard = lock_file(dir)?;
    let mut all = Records::load(dir)?;
    all.write_local(name, state);
    all.save(dir)?;
    Ok(all)
}

impl Records {
    fn write_local(&mut self, name: &str, state: NodeState) {
        let after = self.by_name.get(name).map(|r| r.at + 1).unwrap_or(0);
        let rec = NodeRecord {
            name: name.to_string(),
            state,
            at: now_ms().max(after),
        };
        self.by_name.insert(name.to_string(), rec);
    }
}

/// Records the owner of `name` unless another key owns it; the check and the write happen under
/// one lock, so two joins of one name cannot both win.
pub fn claim(dir: &Path, name: &str, key: &str) -> Result<Result<(), String>, CertError> {
    let _guard = lock_file(dir)?;
    let mut all = Records::load(dir)?;
    match all.by_name.get(name).map(|r| r.state.clone()) {
        Some(NodeState::Revoked) => {
            return Ok(Err(format!(
                "node name {name:?} is revoked; an operator must run `tether-server agent forget {name}` first"
            )))
        }
        Some(NodeState::Owned(k)) if k != key => {
            return Ok(Err(format!(
                "node name {name:?} is already owned by another key; if the node was reinstalled, an operator must run `tether-server agent forget {name}` first"
            )))
        }
        Some(NodeState::Owned(_)) => return Ok(Ok(())),
        _ => {}
    }
    all.write_local(name, NodeState::Owned(key.to_string()));
    all.save(dir)?;
    Ok(Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn newest_wins_in_any_order() {
        let a = NodeRecord {
            name: "n".into(),
            state: NodeState::Owned("k1".into()),
            at: 1,
        };
        let b = NodeRecord {
            name: "n".into(),
            state: NodeState::Revoked,
            at: 2,
        };
        let c = NodeRecord {
            name: "n".into(),
            state: NodeState::Forgotten,
            at: 3,
        };
        let mut x = Records::default();
        let mut y = Records::default();
        for r in [&a, &b, &c] {
            x.merge(r.clone());
        }
        for r in [&c, &a, &b] {
            y.merge(r.clone());
        }
        assert_eq!(x, y);
        assert_eq!(x.check("n", "k2"), Verdict::Allowed);
        let mut z = Records::default();
        z.merge(a.clone());
        assert_eq!(z.check("n", "k2"), Verdict::OtherOwner);
        assert_eq!(z.check("n", "k1"), Verdict::Allowed);
        z.merge(b);
        assert_eq!(z.check("n", "k1"), Verdict::Revoked);
    }

    #[test]
    fn claims_and_files() {
        let d = std::env::temp_dir().join(format!("tether-records-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        assert_eq!(claim(&d, "n1", "k1").unwrap(), Ok(()));
        assert_eq!(claim(&d, "n1", "k1").unwrap(), Ok(()));
        assert!(claim(&d, "n1", "k2").unwrap().is_err());
        write_local(&d, "n1", NodeState::Forgotten).unwrap();
        assert_eq!(claim(&d, "n1", "k2").unwrap(), Ok(()));
        let r = Records::load(&d).unwrap();
        assert_eq!(r.check("n1", "k2"), Verdict::Allowed);
        assert_eq!(r.check("n1", "k1"), Verdict::OtherOwner);
        let _ = std::fs::remove_dir_all(&d);
    }
}
