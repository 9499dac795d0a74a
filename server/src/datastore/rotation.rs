//! The CA rotation record in the datastore: `DIR/ca-rotation`, or the etcd key
//! `PREFIX ca/rotation` (one value, written whole; see `tether_trust::rotation`).

use super::{Datastore, DatastoreError};
use tether_trust::rotation::{self, Rotation};

/// The etcd key of the rotation record, below the configured prefix.
pub const KEY: &str = "ca/rotation";

impl Datastore {
    /// The last CA rotation this store knows of, running or finished.
    pub async fn rotation(&self) -> Result<Option<Rotation>, DatastoreError> {
        match self {
            Datastore::Dir(dir) => rotation::load(dir).map_err(from_rotation),
            Datastore::Etcd(e) => match e.get(KEY).await? {
                None => Ok(None),
                Some(kv) => {
                    let text =
                        std::str::from_utf8(&kv.value).map_err(|_| DatastoreError::Corrupt {
                            key: kv.key.clone(),
                            detail: "not UTF-8".into(),
                        })?;
                    Rotation::parse(text, &kv.key)
                        .map(Some)
                        .map_err(from_rotation)
                }
            },
        }
    }

    /// Writes the rotation record whole.
    pub async fn put_rotation(&self, r: &Rotation) -> Result<(), DatastoreError> {
        match self {
            Datastore::Dir(dir) => rotation::save(dir, r).map_err(from_rotation),
            Datastore::Etcd(e) => {
                let put = super::Op::Put {
                    key: KEY.into(),
                    value: r.to_text().into_bytes(),
                    lease: 0,
                };
                e.txn(&[], &[put]).await?;
                Ok(())
            }
        }
    }
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
