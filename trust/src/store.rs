//! Storing a node's or a CA's key and certificate as a pair that a crash never splits.

use crate::{key_hash_of_cert_pem, key_hash_of_key_pem, write_file, CertError};
use std::fs;
use std::path::{Path, PathBuf};

pub(crate) fn next_path(p: &Path) -> PathBuf {
    let name = p
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    p.with_file_name(format!("{name}.next"))
}

/// Whether the certificate at `cert` is for the key at `key`; false when either is unreadable.
pub(crate) fn pair_matches(cert: &Path, key: &Path) -> bool {
    let (Ok(c), Ok(k)) = (fs::read_to_string(cert), fs::read_to_string(key)) else {
        return false;
    };
    match (key_hash_of_cert_pem(&c), key_hash_of_key_pem(&k)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// Stores a new key and its certificate so that a crash at any point leaves a matching pair:
/// both are written beside their places as `NAME.next` first, then moved, the key first.
/// [`recover_identity`], run before the pair is loaded, finishes a move a crash interrupted or
/// drops a pair that was not completely written.
pub fn write_identity(
    cert: &Path,
    key: &Path,
    cert_pem: &str,
    key_pem: &str,
) -> Result<(), CertError> {
    let (cert_next, key_next) = (next_path(cert), next_path(key));
    write_file(&key_next, key_pem.as_bytes(), 0o600)?;
    write_file(&cert_next, cert_pem.as_bytes(), 0o644)?;
    let mv = |from: &Path, to: &Path| {
        fs::rename(from, to).map_err(|source| CertError::Write {
            path: to.to_owned(),
            source,
        })
    };
    mv(&key_next, key)?;
    mv(&cert_next, cert)
}

/// Finishes or undoes a [`write_identity`] that a crash interrupted; true when it changed
/// anything. Whatever it finds, `cert` and `key` afterwards match, if they matched before the
/// interrupted write or the new pair was written whole.
pub fn recover_identity(cert: &Path, key: &Path) -> Result<bool, CertError> {
    let (cert_next, key_next) = (next_path(cert), next_path(key));
    let rm = |p: &Path| {
        let _ = fs::remove_file(p);
    };
    let mv = |from: &Path, to: &Path| {
        fs::rename(from, to).map_err(|source| CertError::Write {
            path: to.to_owned(),
            source,
        })
    };
    let mut changed = false;
    if key_next.exists() {
        // The crash came before the key moved: move the new pair if it was written whole.
        if pair_matches(&cert_next, &key_next) {
            mv(&key_next, key)?;
        } else {
            rm(&key_next);
            rm(&cert_next);
        }
        changed = true;
    }
    if cert_next.exists() {
        // The key moved; its certificate is next to it.
        if pair_matches(&cert_next, key) {
            mv(&cert_next, cert)?;
        } else {
            rm(&cert_next);
        }
        changed = true;
    }
    Ok(changed)
}
