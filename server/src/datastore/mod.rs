//! Where a server keeps what servers share: node records (who owns a name, what is revoked),
//! join tokens, and with etcd the membership of the control plane.
//!
//! Two stores behind one interface:
//! - `dir` (the default): the data directory's `nodes` and `tokens` files, changed under its
//!   lock; peers pass records to each other over their links (see `authority`).
//! - `etcd`: the control plane's own etcd. One key per record (`PREFIX nodes/NAME`, the same
//!   line the `nodes` file holds), one per token (`PREFIX tokens/ID`, hashes only, the TTL an
//!   etcd lease), one per running server (`PREFIX servers/ID`, under a lease of
//!   [`members::MEMBER_TTL`]). Every change of a record is a compare-and-swap on the key's
//!   revision, running the same rules as the files (`tether_trust::records`), so two servers
//!   can never both give one name to two keys, and no clock decides anything.
//!
//! The CA's key stays in each master's data directory: etcd holds no private key.

/// The etcd client, a crate of its own (`etcd/`): a datastore is one of its users.
pub use tether_etcd as etcd;
pub mod members;
pub mod rotation;

use etcd::{Compare, Etcd, EtcdError, Op};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use tether_trust::records::{self, AddressClaim, NameRefusal, NodeRecord, NodeState, Records};
use tether_trust::token::{self, Token, TokenEntry, TokenGrant, TokenRejection};
use tether_trust::CertError;

/// Whether the store answers, and (etcd) the revision applied last; read by metrics,
/// readiness and status. The data directory is always available.
#[derive(Debug, Default)]
pub struct StoreHealth {
    pub available: AtomicBool,
    pub revision: AtomicI64,
    /// Watches found silent and started again (see `follow::Follower::fell_behind`).
    pub silent_watches: AtomicU64,
}

impl StoreHealth {
    pub fn available(&self) -> bool {
        self.available.load(Ordering::Relaxed)
    }
}

/// Key prefixes below the configured prefix.
pub const NODES: &str = "nodes/";
pub const TOKENS: &str = "tokens/";
pub const SERVERS: &str = "servers/";

/// How often a compare-and-swap is retried when other writers keep winning.
const CAS_ATTEMPTS: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum DatastoreError {
    /// etcd cannot be reached: nothing was written.
    #[error("datastore unavailable: {0}")]
    Unavailable(String),
    #[error(transparent)]
    Files(#[from] CertError),
    #[error("etcd: {0}")]
    Etcd(EtcdError),
    /// A value under tether's prefix that is not what tether writes.
    #[error("etcd key {key}: {detail}")]
    Corrupt { key: String, detail: String },
    #[error("{0} kept changing under {CAS_ATTEMPTS} attempts to write it; try again")]
    Contended(String),
}

impl From<EtcdError> for DatastoreError {
    fn from(e: EtcdError) -> Self {
        match e {
            EtcdError::Unavailable(why) => DatastoreError::Unavailable(why),
            other => DatastoreError::Etcd(other),
        }
    }
}

impl DatastoreError {
    pub fn is_unavailable(&self) -> bool {
        matches!(self, DatastoreError::Unavailable(_))
    }
}

/// Which store (`--datastore`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Kind {
    /// The data directory's files; peers exchange records (`--peer`).
    #[default]
    Dir,
    /// The control plane's etcd (`--etcd-*`).
    Etcd,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Dir => "dir",
            Kind::Etcd => "etcd",
        }
    }
}

/// A store of records and tokens. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Datastore {
    Dir(PathBuf),
    Etcd(Arc<Etcd>),
}

/// Stores a token entry unless its id exists; true when it was stored. A token that expires
/// takes its key with it: the key is under a lease that outlives the expiry by a minute (the
/// entry's own expiry is checked too).
async fn put_token_if_absent(e: &Etcd, entry: &TokenEntry) -> Result<bool, DatastoreError> {
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let lease = if entry.expires > 0 {
        e.lease_grant((entry.expires - now).max(1) as u64 + 60)
            .await?
    } else {
        0
    };
    let rel = format!("{TOKENS}{}", entry.id);
    let put = Op::Put {
        key: rel.clone(),
        value: entry.to_line().into_bytes(),
        lease,
    };
    if e.txn(&[Compare::ModRevision(rel, 0)], &[put]).await? {
        return Ok(true);
    }
    if lease != 0 {
        let _ = e.lease_revoke(lease).await;
    }
    Ok(false)
}

/// A record read from etcd: its line, checked, and the name its key gives.
pub fn parse_record(key: &str, value: &[u8]) -> Result<NodeRecord, DatastoreError> {
    let corrupt = |detail: String| DatastoreError::Corrupt {
        key: key.to_string(),
        detail,
    };
    let line = std::str::from_utf8(value).map_err(|_| corrupt("not UTF-8".into()))?;
    let rec = records::parse_line(line.trim_end()).map_err(|e| corrupt(e.to_string()))?;
    let named = key.rsplit('/').next().unwrap_or("");
    if rec.name != named {
        return Err(corrupt(format!(
            "holds the record of {:?}, not of {named:?}",
            rec.name
        )));
    }
    tether_trust::validate_node_name(&rec.name).map_err(|e| corrupt(e.to_string()))?;
    Ok(rec)
}

fn parse_token(key: &str, value: &[u8]) -> Result<TokenEntry, DatastoreError> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|l| TokenEntry::parse_line(l.trim_end()))
        .ok_or_else(|| DatastoreError::Corrupt {
            key: key.to_string(),
            detail: "not a token entry".into(),
        })
}

impl Datastore {
    pub fn kind(&self) -> Kind {
        match self {
            Datastore::Dir(_) => Kind::Dir,
            Datastore::Etcd(_) => Kind::Etcd,
        }
    }

    pub fn etcd(&self) -> Option<&Arc<Etcd>> {
        match self {
            Datastore::Etcd(e) => Some(e),
            Datastore::Dir(_) => None,
        }
    }

    /// Every node record, and (etcd) the revision they were read at.
    pub async fn load_records(&self) -> Result<(Records, i64), DatastoreError> {
        match self {
            Datastore::Dir(dir) => Ok((Records::load(dir)?, 0)),
            Datastore::Etcd(e) => {
                let (kvs, revision) = e.range_prefix(NODES).await?;
                let mut all = Records::default();
                // One bad record is skipped and logged, as the follower does, so that it cannot
                // stop every server's start (a revocation elsewhere still applies).
                for kv in kvs {
                    match parse_record(&kv.key, &kv.value) {
                        Ok(r) => {
                            all.merge(r);
                        }
                        Err(e) => tracing::warn!(error = %e, "ignored a node record in etcd"),
                    }
                }
                Ok((all, revision))
            }
        }
    }

    /// Runs a record rule (`tether_trust::records`) on the record of `name` and stores the
    /// result when the rule changed it: under the directory's lock, or as a compare-and-swap
    /// on the etcd key's revision, retried when another writer came first. Returns the rule's
    /// answer and the record as stored after it.
    pub async fn update<T>(
        &self,
        name: &str,
        rule: impl Fn(&mut Records) -> (T, bool),
    ) -> Result<(T, Option<NodeRecord>), DatastoreError> {
        match self {
            Datastore::Dir(dir) => Ok(records::update(dir, |all| {
                let (out, changed) = rule(all);
                ((out, all.by_name.get(name).cloned()), changed)
            })?),
            Datastore::Etcd(e) => {
                let rel = format!("{NODES}{name}");
                for _ in 0..CAS_ATTEMPTS {
                    let held = e.get(&rel).await?;
                    let mut one = Records::default();
                    let revision = match &held {
                        Some(kv) => {
                            one.merge(parse_record(&kv.key, &kv.value)?);
                            kv.mod_revision
                        }
                        None => 0,
                    };
                    let (out, changed) = rule(&mut one);
                    let rec = one.by_name.get(name).cloned();
                    let Some(new) = rec.clone().filter(|_| changed) else {
                        return Ok((out, rec));
                    };
                    let put = Op::Put {
                        key: rel.clone(),
                        value: new.to_line().into_bytes(),
                        lease: 0,
                    };
                    if e.txn(&[Compare::ModRevision(rel.clone(), revision)], &[put])
                        .await?
                    {
                        return Ok((out, rec));
                    }
                }
                Err(DatastoreError::Contended(rel))
            }
        }
    }

    /// Gives `name` to `key` unless another key owns it (a join).
    pub async fn claim(
        &self,
        name: &str,
        key: &str,
    ) -> Result<(Result<(), NameRefusal>, Option<NodeRecord>), DatastoreError> {
        self.update(name, |all| all.claim(name, key)).await
    }

    /// Moves `name` to a renewal's new key, if `current` owns it.
    pub async fn renew(
        &self,
        name: &str,
        current: &str,
        new: &str,
    ) -> Result<(Result<(), NameRefusal>, Option<NodeRecord>), DatastoreError> {
        self.update(name, |all| {
            let r = all.renew(name, current, new);
            let changed = r.is_ok();
            (r, changed)
        })
        .await
    }

    /// A renewed key was seen: the key before it is done.
    pub async fn confirm(
        &self,
        name: &str,
        key: &str,
    ) -> Result<(bool, Option<NodeRecord>), DatastoreError> {
        self.update(name, |all| {
            let changed = all.confirm(name, key);
            (changed, changed)
        })
        .await
    }

    /// An operator's `agent revoke` or `agent forget`.
    pub async fn set_state(
        &self,
        name: &str,
        state: NodeState,
    ) -> Result<Option<NodeRecord>, DatastoreError> {
        Ok(self
            .update(name, |all| {
                all.write_local(name, state.clone());
                ((), true)
            })
            .await?
            .1)
    }

    /// Merges a record made elsewhere (an import, a peer) by the records' own order.
    pub async fn merge(&self, rec: &NodeRecord) -> Result<bool, DatastoreError> {
        Ok(self
            .update(&rec.name, |all| {
                let changed = all.merge(rec.clone());
                (changed, changed)
            })
            .await?
            .0)
    }

    /// An operator pins addresses to a node (`issue-agent --address`, a join with a token that
    /// names them): from now on they lead to it alone, so even its first claim cannot be
    /// raced. An address another node owns is refused (with its owner), never taken.
    pub async fn pin_addresses(
        &self,
        name: &str,
        addrs: &[IpAddr],
    ) -> Result<AddressClaim, DatastoreError> {
        let (all, _) = self.load_records().await?;
        let mut refused = Vec::new();
        let mut free = Vec::new();
        for a in addrs {
            match all.owners_of(*a).into_iter().find(|o| *o != name) {
                Some(other) => refused.push((*a, Some(other.to_string()))),
                None => free.push(*a),
            }
        }
        let (mut claim, _) = self
            .update(name, |r| r.add_addresses(name, None, &free))
            .await?;
        claim.refused.extend(refused);
        Ok(claim)
    }

    /// `agent release-address`: no node owns `addr` any more (the next claim takes it).
    /// Returns the nodes that owned it.
    pub async fn release_address(&self, addr: IpAddr) -> Result<Vec<String>, DatastoreError> {
        let (all, _) = self.load_records().await?;
        let owners: Vec<String> = all.owners_of(addr).into_iter().map(String::from).collect();
        for name in &owners {
            self.update(name, |r| {
                let released = r.release_address(name, addr);
                (released, released)
            })
            .await?;
        }
        Ok(owners)
    }

    /// Removes the records of `names` that are still expired forgotten records at `now_ms`
    /// (a name joined again meanwhile keeps its record).
    pub async fn remove_expired(
        &self,
        names: &[String],
        now_ms: u64,
    ) -> Result<(), DatastoreError> {
        match self {
            Datastore::Dir(dir) => {
                records::update(dir, |all| {
                    let before = all.by_name.len();
                    all.by_name
                        .retain(|n, r| !(names.contains(n) && r.expired(now_ms)));
                    ((), all.by_name.len() != before)
                })?;
            }
            Datastore::Etcd(e) => {
                for name in names {
                    let rel = format!("{NODES}{name}");
                    let Some(kv) = e.get(&rel).await? else {
                        continue;
                    };
                    if parse_record(&kv.key, &kv.value).is_ok_and(|r| r.expired(now_ms)) {
                        e.txn(
                            &[Compare::ModRevision(rel.clone(), kv.mod_revision)],
                            &[Op::Delete(rel)],
                        )
                        .await?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Every token entry (no secrets: only their hashes are stored).
    pub async fn tokens(&self) -> Result<Vec<TokenEntry>, DatastoreError> {
        match self {
            Datastore::Dir(dir) => Ok(token::list(dir)?),
            Datastore::Etcd(e) => {
                let (kvs, _) = e.range_prefix(TOKENS).await?;
                kvs.iter()
                    .map(|kv| parse_token(&kv.key, &kv.value))
                    .collect()
            }
        }
    }

    /// Creates a join token that pins the CA of `data_dir`.
    pub async fn create_token(
        &self,
        data_dir: &Path,
        ttl_secs: u64,
        description: &str,
        grant: &TokenGrant,
    ) -> Result<Token, DatastoreError> {
        match self {
            Datastore::Dir(dir) => Ok(token::create_with(dir, ttl_secs, description, grant)?),
            Datastore::Etcd(e) => {
                let ca_der = token::ca_der_of(data_dir)?;
                for _ in 0..CAS_ATTEMPTS {
                    let (tok, entry) =
                        TokenEntry::generate(&ca_der, ttl_secs, description, grant, |_| false)?;
                    // Ids are unique: a drawn id that exists already is drawn again.
                    if put_token_if_absent(e, &entry).await? {
                        return Ok(tok);
                    }
                }
                Err(DatastoreError::Contended("a new token id".into()))
            }
        }
    }

    /// Removes a token; false when there was none with that id.
    pub async fn revoke_token(&self, id: &str) -> Result<bool, DatastoreError> {
        match self {
            Datastore::Dir(dir) => Ok(token::revoke(dir, id)?),
            Datastore::Etcd(e) => {
                if id.is_empty() || !id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return Ok(false);
                }
                Ok(e.delete(&format!("{TOKENS}{id}")).await?)
            }
        }
    }

    /// Checks a join token against the store as it is now.
    pub async fn verify_token(
        &self,
        tok: &Token,
    ) -> Result<Result<(), TokenRejection>, DatastoreError> {
        match self {
            Datastore::Dir(dir) => Ok(token::verify(dir, tok)?),
            Datastore::Etcd(e) => {
                if tok.id.is_empty() || !tok.id.bytes().all(|b| b.is_ascii_alphanumeric()) {
                    return Ok(token::check(None, tok));
                }
                let rel = format!("{TOKENS}{}", tok.id);
                let entry = match e.get(&rel).await? {
                    Some(kv) => Some(parse_token(&kv.key, &kv.value)?),
                    None => None,
                };
                Ok(token::check(entry.as_ref(), tok))
            }
        }
    }

    /// Redeems a token for one join: checked against the store as it is now, and one of its
    /// uses spent when they are bounded, in one step (the directory's lock, or a
    /// compare-and-swap on the etcd key), so two joins cannot both take its last use.
    pub async fn redeem_token(
        &self,
        tok: &Token,
    ) -> Result<Result<TokenGrant, TokenRejection>, DatastoreError> {
        let e = match self {
            Datastore::Dir(dir) => return Ok(token::redeem(dir, tok)?),
            Datastore::Etcd(e) => e,
        };
        if tok.id.is_empty() || !tok.id.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Ok(token::check(None, tok).map(|_| TokenGrant::default()));
        }
        let rel = format!("{TOKENS}{}", tok.id);
        for _ in 0..CAS_ATTEMPTS {
            let Some(kv) = e.get(&rel).await? else {
                return Ok(token::check(None, tok).map(|_| TokenGrant::default()));
            };
            let mut entry = parse_token(&kv.key, &kv.value)?;
            if let Err(r) = token::check(Some(&entry), tok) {
                return Ok(Err(r));
            }
            if entry.grant.uses == 0 {
                return Ok(Ok(entry.grant));
            }
            entry.used += 1;
            let put = Op::Put {
                key: rel.clone(),
                value: entry.to_line().into_bytes(),
                lease: kv.lease,
            };
            if e.txn(
                &[Compare::ModRevision(rel.clone(), kv.mod_revision)],
                &[put],
            )
            .await?
            {
                return Ok(Ok(entry.grant));
            }
        }
        Err(DatastoreError::Contended(rel))
    }

    /// Copies a data directory's records and tokens into this store (etcd). Safe to run
    /// again: records merge by their own order, and a token already there is left alone.
    /// Returns how many records and tokens were written.
    pub async fn import(&self, dir: &Path) -> Result<(usize, usize), DatastoreError> {
        let Datastore::Etcd(e) = self else {
            return Ok((0, 0));
        };
        let mut written = 0;
        for rec in Records::load(dir)?.by_name.values() {
            if self.merge(rec).await? {
                written += 1;
            }
        }
        let mut tokens = 0;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        for t in token::list(dir)? {
            if t.expired(now) {
                continue;
            }
            if put_token_if_absent(e, &t).await? {
                tokens += 1;
            }
        }
        Ok((written, tokens))
    }

    /// Writes this store's records and tokens into a data directory (merging records, adding
    /// the tokens it lacks). Returns how many of each it holds after.
    pub async fn export(&self, dir: &Path) -> Result<(usize, usize), DatastoreError> {
        let (all, _) = self.load_records().await?;
        let recs: Vec<NodeRecord> = all.by_name.into_values().collect();
        let merged = records::merge_into(dir, &recs)?;
        let entries = self.tokens().await?;
        let count = token::add_entries(dir, &entries)?;
        Ok((merged.by_name.len(), count))
    }
}
