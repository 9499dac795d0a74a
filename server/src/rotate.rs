//! `tether-server ca rotate | status | finish`: a CA rotation as the operator drives it, on a
//! master's data directory and the datastore (the data directory, or etcd). The files are
//! `tether_trust::rotation`'s; the running servers' part is `ca`'s.

use crate::datastore::{Datastore, DatastoreError};
use serde::Serialize;
use std::path::Path;
use tether_trust::rotation::{self, Rotation, RotationError};

#[derive(Debug, thiserror::Error)]
pub enum CaCommandError {
    #[error(transparent)]
    Rotation(#[from] RotationError),
    #[error("the datastore: {0}")]
    Store(#[from] DatastoreError),
    #[error("no CA rotation has started (`tether-server ca rotate`)")]
    NoRotation,
    #[error("{0} does not hold the rotation's new CA: run `tether-server ca rotate --from` on this master first (finish once every master holds it)")]
    NotAdopted(String),
    #[error("{} node(s) are still on the old CA: {}; wait for them to renew (they are asked to at once when connected), revoke or forget the ones that are gone, or finish with --force (they must join again)", .0.len(), .0.join(", "))]
    Pending(Vec<String>),
    #[error("{from} holds rotation {new}, but the datastore's rotation is {store}: copy the data directory of the master that ran `ca rotate`")]
    OtherRotation {
        from: String,
        new: String,
        store: String,
    },
}

/// What a rotation command did, or what `ca status` found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CaReport {
    /// This master's issuing CA.
    pub issuer: String,
    /// The CAs this master trusts.
    pub trusted: Vec<String>,
    pub rotation: Option<RotationView>,
    /// The names still on the old CA of the running rotation.
    pub nodes_on_old_ca: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct RotationView {
    pub old: String,
    pub new: String,
    pub started: i64,
    pub finished: Option<i64>,
    pub nodes_at_start: usize,
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// `ca rotate`: without `from`, starts a rotation here (a new CA, the record in the store);
/// with it, brings the rotation started on another master to this one.
pub async fn rotate(
    dir: &Path,
    store: &Datastore,
    from: Option<&Path>,
    ca_days: u32,
    leaf_days: u32,
) -> Result<CaReport, CaCommandError> {
    let Some(from) = from else {
        let (records, _) = store.load_records().await?;
        let done = match rotation::rotate(dir, ca_days, leaf_days) {
            Ok(r) => r,
            Err(RotationError::Running(d)) => {
                // Started here before, and the record never written (a crash, etcd down):
                // written now; any other case is a rotation that runs.
                let mine = rotation::hashes(&rotation::trusted(dir).map_err(RotationError::from)?);
                match store.rotation(None).await? {
                    Some(r) if !r.running() || Some(&r.new) != mine.first() => {}
                    Some(_) => return Err(RotationError::Running(d).into()),
                    None => {}
                }
                rotation::Rotated {
                    new: mine.first().cloned().unwrap_or_default(),
                    old: mine.get(1).cloned().unwrap_or_default(),
                    names: Vec::new(),
                }
            }
            Err(e) => return Err(e.into()),
        };
        store
            .put_rotation(&Rotation::start(done.old, done.new, &records, now()))
            .await?;
        return status(dir, store).await;
    };
    let done = rotation::adopt(dir, from, leaf_days)?;
    match store.rotation(None).await? {
        Some(r) if r.new == done.new => {}
        Some(r) => {
            return Err(CaCommandError::OtherRotation {
                from: from.display().to_string(),
                new: done.new,
                store: r.new,
            })
        }
        // A data-directory store whose copy came without `ca-rotation`: started over here.
        None => {
            let (records, _) = store.load_records().await?;
            store
                .put_rotation(&Rotation::start(done.old, done.new, &records, now()))
                .await?;
        }
    }
    status(dir, store).await
}

/// `ca status`: this master's CAs, the store's rotation, and the nodes still on the old CA.
pub async fn status(dir: &Path, store: &Datastore) -> Result<CaReport, CaCommandError> {
    let trusted = rotation::hashes(&rotation::trusted(dir).map_err(RotationError::from)?);
    let r = store.rotation(None).await?;
    let pending = match &r {
        Some(r) if r.running() => {
            let (records, _) = store.load_records().await?;
            r.pending(&records)
        }
        _ => Vec::new(),
    };
    Ok(CaReport {
        issuer: trusted.first().cloned().unwrap_or_default(),
        trusted,
        rotation: r.map(|r| RotationView {
            nodes_at_start: r.nodes.len(),
            old: r.old,
            new: r.new,
            started: r.started,
            finished: r.finished,
        }),
        nodes_on_old_ca: pending,
    })
}

/// `ca finish`: refused while nodes remain on the old CA, unless `force`. Marks the rotation
/// finished in the store (etcd: every master then finishes it in its own data directory) and
/// finishes it in this master's data directory.
pub async fn finish(
    dir: &Path,
    store: &Datastore,
    force: bool,
) -> Result<CaReport, CaCommandError> {
    let mut r = store
        .rotation(None)
        .await?
        .ok_or(CaCommandError::NoRotation)?;
    let mine = rotation::hashes(&rotation::trusted(dir).map_err(RotationError::from)?);
    if mine.first() != Some(&r.new) {
        return Err(CaCommandError::NotAdopted(dir.display().to_string()));
    }
    if r.running() {
        let (records, _) = store.load_records().await?;
        let pending = r.pending(&records);
        if !pending.is_empty() && !force {
            return Err(CaCommandError::Pending(pending));
        }
        r.finished = Some(now());
        store.put_rotation(&r).await?;
    }
    rotation::finish(dir)?;
    status(dir, store).await
}

impl CaReport {
    /// The report for people.
    pub fn text(&self) -> String {
        let mut t = format!("this master issues from CA {}\n", self.issuer);
        for h in self.trusted.iter().skip(1) {
            t.push_str(&format!("and also trusts CA {h}\n"));
        }
        match &self.rotation {
            None => t.push_str("no CA rotation has started\n"),
            Some(r) => {
                let when = tether_process::units::format_unix(r.started);
                t.push_str(&format!(
                    "rotation from {} to {}, started {when} with {} node(s)\n",
                    r.old, r.new, r.nodes_at_start
                ));
                match r.finished {
                    Some(f) => t.push_str(&format!(
                        "finished {}: the old CA is trusted no more\n",
                        tether_process::units::format_unix(f)
                    )),
                    None => {
                        if self.issuer != r.new {
                            t.push_str("THIS MASTER DOES NOT HOLD THE NEW CA: run `tether-server ca rotate --from` with a copy of the first master's data directory\n");
                        }
                        t.push_str(&format!(
                            "{} node(s) on the old CA{}\n",
                            self.nodes_on_old_ca.len(),
                            if self.nodes_on_old_ca.is_empty() {
                                ": `tether-server ca finish` may end it".to_string()
                            } else {
                                format!(": {}", self.nodes_on_old_ca.join(", "))
                            }
                        ));
                    }
                }
            }
        }
        t
    }
}
