//! The CA rotation record in the datastore: `DIR/ca-rotation`, or in etcd the key
//! `PREFIX ca/rotation` (the record without its nodes, and how many parts hold them) and
//! `PREFIX ca/rotation-nodes/NNNNN` (the nodes, [`PART_NODES`] to a part, so that no value nears
//! etcd's request limit of 1.5 MiB whatever the cluster's size). See `tether_trust::rotation`.

use super::{Datastore, DatastoreError, Op};
use tether_trust::rotation::{self, Rotation};

/// The etcd key of the record, below the configured prefix.
pub const KEY: &str = "ca/rotation";
/// The etcd keys of the record's nodes, below the configured prefix.
pub const PARTS: &str = "ca/rotation-nodes/";
/// Nodes per part: about 400 KiB.
pub const PART_NODES: usize = 4_000;

impl Datastore {
    /// The last CA rotation this store knows of, running or finished. With etcd the nodes are
    /// read only when the record is not `known` already (the same rotation): servers look every
    /// few seconds, and the nodes change only when a rotation starts.
    pub async fn rotation(
        &self,
        known: Option<&Rotation>,
    ) -> Result<Option<Rotation>, DatastoreError> {
        let e = match self {
            Datastore::Dir(dir) => return rotation::load(dir).map_err(from_rotation),
            Datastore::Etcd(e) => e,
        };
        let Some(kv) = e.get(KEY).await? else {
            return Ok(None);
        };
        let text = utf8(&kv.key, &kv.value)?;
        let (header, parts) = split_parts(text);
        let mut r = Rotation::parse(&header, &kv.key).map_err(from_rotation)?;
        if let Some(k) =
            known.filter(|k| (&k.old, &k.new, k.started) == (&r.old, &r.new, r.started))
        {
            r.nodes = k.nodes.clone();
            return Ok(Some(r));
        }
        let (kvs, _) = e.range_prefix(PARTS).await?;
        if kvs.len() != parts {
            return Err(DatastoreError::Corrupt {
                key: kv.key.clone(),
                detail: format!("it names {parts} parts of nodes, etcd holds {}", kvs.len()),
            });
        }
        let mut all = header;
        for p in &kvs {
            all.push_str(utf8(&p.key, &p.value)?);
        }
        Rotation::parse(&all, &kv.key)
            .map(Some)
            .map_err(from_rotation)
    }

    /// Writes the rotation record whole: with etcd the parts first, then the record that counts
    /// them, so that a reader never takes a part-written list for the whole.
    pub async fn put_rotation(&self, r: &Rotation) -> Result<(), DatastoreError> {
        let e = match self {
            Datastore::Dir(dir) => return rotation::save(dir, r).map_err(from_rotation),
            Datastore::Etcd(e) => e,
        };
        let nodes: Vec<(&String, &String)> = r.nodes.iter().collect();
        let parts: Vec<String> = nodes
            .chunks(PART_NODES)
            .map(|c| c.iter().map(|(n, k)| format!("node {n} {k}\n")).collect())
            .collect();
        let (before, _) = e.range_prefix(PARTS).await?;
        for (i, text) in parts.iter().enumerate() {
            let put = Op::Put {
                key: format!("{PARTS}{i:05}"),
                value: text.clone().into_bytes(),
                lease: 0,
            };
            e.txn(&[], &[put]).await?;
        }
        // Parts of an earlier, larger record.
        for kv in before.iter().skip(parts.len()) {
            if let Some(rel) = e.relative(&kv.key) {
                e.delete(rel).await?;
            }
        }
        let mut header = Rotation {
            nodes: Default::default(),
            ..r.clone()
        }
        .to_text();
        header.push_str(&format!("parts {}\n", parts.len()));
        let put = Op::Put {
            key: KEY.into(),
            value: header.into_bytes(),
            lease: 0,
        };
        e.txn(&[], &[put]).await?;
        Ok(())
    }
}

fn utf8<'a>(key: &str, value: &'a [u8]) -> Result<&'a str, DatastoreError> {
    std::str::from_utf8(value).map_err(|_| DatastoreError::Corrupt {
        key: key.to_string(),
        detail: "not UTF-8".into(),
    })
}

/// The record's text without its `parts N` line, and N (0 when absent).
fn split_parts(text: &str) -> (String, usize) {
    let mut parts = 0;
    let mut header = String::new();
    for line in text.lines() {
        match line.strip_prefix("parts ") {
            Some(n) => parts = n.trim().parse().unwrap_or(usize::MAX),
            None => {
                header.push_str(line);
                header.push('\n');
            }
        }
    }
    (header, parts)
}

fn from_rotation(e: rotation::RotationError) -> DatastoreError {
    match e {
        rotation::RotationError::Cert(c) => DatastoreError::Files(c),
        rotation::RotationError::Corrupt { path, detail } => {
            DatastoreError::Corrupt { key: path, detail }
        }
        other => DatastoreError::Corrupt {
            key: rotation::ROTATION_FILE.into(),
            detail: other.to_string(),
        },
    }
}
