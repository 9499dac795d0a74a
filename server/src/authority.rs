//! Who may connect: the node records of the data directory (owner keys, revocations), kept in
//! memory, reloaded when the file changes, merged with what peers announce, and applied to the
//! tunnels that are up.

use std::path::PathBuf;
use std::sync::RwLock;
use std::time::SystemTime;
use tether_certs::records::{self, NodeRecord, NodeState, Records, Verdict};
use tether_common::protocol::{Message, RecordState};
use tokio::sync::watch;
use tracing::warn;

pub struct Authority {
    dir: PathBuf,
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
    pub fn new(dir: PathBuf) -> Self {
        let records = Records::load(&dir).unwrap_or_else(|e| {
            warn!(error = %e, "cannot read node records; starting with none");
            Records::default()
        });
        Authority {
            mtime: std::sync::Mutex::new(mtime(&dir)),
            dir,
            records: RwLock::new(records),
            version: watch::channel(0).0,
        }
    }

    pub fn check(&self, name: &str, key: &str) -> Verdict {
        self.read().check(name, key)
    }

    /// Reloads the file if it changed since the last look; true when anything changed.
    pub fn poll(&self) -> bool {
        let now = mtime(&self.dir);
        {
            let mut last = self.mtime.lock().unwrap_or_else(|p| p.into_inner());
            if *last == now {
                return false;
            }
            *last = now;
        }
        match Records::load(&self.dir) {
            Ok(r) => self.replace(r),
            Err(e) => {
                warn!(error = %e, "cannot reload node records");
                false
            }
        }
    }

    fn replace(&self, new: Records) -> bool {
        let mut cur = self.records.write().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        for r in new.by_name.into_values() {
            changed |= cur.merge(r);
        }
        drop(cur);
        if changed {
            self.version.send_modify(|v| *v += 1);
        }
        changed
    }

    /// Merges records into the file (under its lock) and memory.
    pub fn merge(&self, recs: Vec<NodeRecord>) -> Result<bool, tether_certs::CertError> {
        let all = records::merge_into(&self.dir, &recs)?;
        *self.mtime.lock().unwrap_or_else(|p| p.into_inner()) = mtime(&self.dir);
        Ok(self.replace(all))
    }

    /// Writes a record made here (a renewal's new key), newer than the one it replaces.
    pub fn write_local(&self, name: &str, state: NodeState) -> Result<(), tether_certs::CertError> {
        let all = records::write_local(&self.dir, name, state)?;
        *self.mtime.lock().unwrap_or_else(|p| p.into_inner()) = mtime(&self.dir);
        self.replace(all);
        Ok(())
    }

    /// Claims a node name for a key, under the file's lock.
    pub fn claim(
        &self,
        name: &str,
        key: &str,
    ) -> Result<Result<(), String>, tether_certs::CertError> {
        let r = records::claim(&self.dir, name, key)?;
        if r.is_ok() {
            self.poll();
        }
        Ok(r)
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Every record, for a peer's control stream.
    pub fn all(&self) -> Vec<NodeRecord> {
        self.read().by_name.values().cloned().collect()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Records> {
        self.records.read().unwrap_or_else(|p| p.into_inner())
    }
}

pub fn to_message(r: &NodeRecord) -> Message {
    Message::NodeRecord {
        name: r.name.clone(),
        state: match &r.state {
            NodeState::Owned(k) => RecordState::Owned(k.clone()),
            NodeState::Revoked => RecordState::Revoked,
            NodeState::Forgotten => RecordState::Forgotten,
        },
        at_ms: r.at,
    }
}

pub fn from_message(m: &Message) -> Option<NodeRecord> {
    let Message::NodeRecord { name, state, at_ms } = m else {
        return None;
    };
    tether_certs::validate_node_name(name).ok()?;
    Some(NodeRecord {
        name: name.clone(),
        state: match state {
            RecordState::Owned(k) => NodeState::Owned(k.clone()),
            RecordState::Revoked => NodeState::Revoked,
            RecordState::Forgotten => NodeState::Forgotten,
        },
        at: *at_ms,
    })
}
