//! CA rotation: a new CA for the cluster without touching a node by hand.
//!
//! A rotation starts, runs while the nodes move, and finishes:
//! - [`rotate`] makes a new CA in a master's data directory. The old CA's certificate moves to
//!   `ca-old.crt` and stays trusted; the new CA becomes `ca.crt` and `ca.key` and issues every
//!   certificate from then on, starting with this master's own. The old CA also signs the new
//!   CA's key into `ca-cross.crt`: servers present it in their chain, so a node that trusts only
//!   the old CA (one that has not renewed yet, or an agent of 0.1, which never updates its
//!   `ca.crt`) still verifies a server whose certificate the new CA issued, and a join token made
//!   before the rotation still finds the CA it pins.
//! - [`adopt`] brings the same new CA to the other masters, from a copy of the first one's files
//!   (the CA's key stays in data directories; no store holds it).
//! - While it runs, servers trust both CAs, hand both to the nodes they renew, and ask every
//!   connected node to renew at once. The [`Rotation`] record (in the datastore) names the nodes
//!   that owned a name when it started, with their keys: a node has moved once its name belongs
//!   to another key, which only a new certificate gives it.
//! - [`finish`] removes `ca-old.crt`: servers stop trusting the old CA, and nodes drop it from
//!   their trust at their next renewal, which the servers ask for at once. `ca-cross.crt` stays,
//!   so 0.1 agents keep verifying the servers; the servers trust nothing through it.
//!
//! The old CA's key is not kept: a rotation is often the answer to a key that leaked.

use crate::records::{NodeState, Records};
use crate::{files, pem_to_der, read_string, write_file, write_identity, Ca, CertError, Lifetime};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The previous CA's certificate, trusted until the rotation finishes.
pub const CA_OLD: &str = "ca-old.crt";
/// The new CA's key certified by the previous CA, presented in every server's chain.
pub const CA_CROSS: &str = "ca-cross.crt";
/// The rotation record of a data-directory store.
pub const ROTATION_FILE: &str = "ca-rotation";

/// Most nodes a rotation record lists: a bound on what is read back, far above what the node
/// records hold (`--max-nodes`, 50,000 by default). A record past it is refused when read,
/// loudly: it is never cut short, since a node left out would not be waited for.
pub const MAX_NODES: usize = 1_000_000;

#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    #[error(transparent)]
    Cert(#[from] CertError),
    #[error("a CA rotation is already running in {0} (it holds {CA_OLD}); finish it with `tether-server ca finish` first")]
    Running(PathBuf),
    #[error("no CA rotation is running in {0} (it holds no {CA_OLD})")]
    NotRunning(PathBuf),
    #[error(
        "{from} holds a rotation from another CA than {dir}'s: its {CA_OLD} is not {dir}/ca.crt"
    )]
    OtherCa { from: PathBuf, dir: PathBuf },
    #[error("{path}: {detail}")]
    Corrupt { path: String, detail: String },
}

/// Hex SHA-256 of each certificate in a PEM text, in order: how tokens and
/// [`crate::token::ca_hash`] name a CA.
pub fn hashes(pem_text: &str) -> Vec<String> {
    crate::pem_ders(pem_text)
        .iter()
        .map(|d| crate::token::ca_hash(d))
        .collect()
}

/// A certificate's subject and issuer names (DER): which CA issued a certificate is the CA whose
/// subject is its issuer (the CAs of successive rotations have distinct names).
pub fn names_of(der: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    Some((c.subject().as_raw().to_vec(), c.issuer().as_raw().to_vec()))
}

/// Each certificate of a PEM text, as its own PEM block and its DER.
fn pem_blocks(text: &str) -> Vec<(String, Vec<u8>)> {
    const END: &str = "-----END CERTIFICATE-----";
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("-----BEGIN CERTIFICATE-----") {
        let Some(len) = rest[start..].find(END) else {
            break;
        };
        let block = &rest[start..start + len + END.len()];
        if let Ok((_, p)) = x509_parser::pem::parse_x509_pem(block.as_bytes()) {
            out.push((format!("{block}\n"), p.contents));
        }
        rest = &rest[start + len + END.len()..];
    }
    out
}

/// The CAs of `sent` (a server's answer to a join or a renewal) that a node may trust: those it
/// trusts already (`held`), and those that a certificate of `chain` (the certificates sent after
/// the node's own) vouches for: the same name and key, signed by a CA of `held`. That is how a
/// rotation's new CA reaches a node: through the certificate the old CA signed for it. A server
/// that holds a server certificate and not the CA's key can hand over nothing else. PEM, in the
/// order sent.
pub fn accepted(sent: &str, held: &str, chain: &str) -> String {
    let held = pem_blocks(held);
    let chain = pem_blocks(chain);
    let vouched = |der: &[u8]| {
        let Some(ca) = parse(der) else {
            return false;
        };
        chain.iter().filter_map(|(_, d)| parse(d)).any(|x| {
            x.subject() == ca.subject()
                && x.public_key().raw == ca.public_key().raw
                && held.iter().filter_map(|(_, h)| parse(h)).any(|h| {
                    x.issuer() == h.subject() && x.verify_signature(Some(h.public_key())).is_ok()
                })
        })
    };
    pem_blocks(sent)
        .into_iter()
        .filter(|(_, der)| held.iter().any(|(_, h)| h == der) || vouched(der))
        .map(|(text, _)| text)
        .collect()
}

/// The certificates of a PEM text whose hashes are among `hashes`, as PEM, in order: a node
/// drops the CAs its servers trust no more (a rotation finished).
pub fn keep(text: &str, hashes: &[String]) -> String {
    pem_blocks(text)
        .into_iter()
        .filter(|(_, der)| hashes.contains(&crate::token::ca_hash(der)))
        .map(|(block, _)| block)
        .collect()
}

/// The certificate of a PEM text whose hash is `hash` (a token's pin), as PEM.
pub fn pinned(text: &str, hash: &str) -> Option<String> {
    pem_blocks(text)
        .into_iter()
        .find(|(_, der)| crate::token::ca_hash(der).eq_ignore_ascii_case(hash))
        .map(|(block, _)| block)
}

/// The CAs of a PEM bundle, in order, each by its hash and its name: which of them issued a
/// certificate is the one whose name is the certificate's issuer (the CAs of successive
/// rotations have distinct names).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Cas(Vec<(String, Vec<u8>)>);

impl Cas {
    pub fn parse(pem_text: &str) -> Self {
        Cas(crate::pem_ders(pem_text)
            .into_iter()
            .filter_map(|der| {
                let (subject, _) = names_of(&der)?;
                Some((crate::token::ca_hash(&der), subject))
            })
            .collect())
    }

    /// The first CA's hash (a server's issuing CA); empty for none.
    pub fn first(&self) -> &str {
        self.0.first().map_or("", |(h, _)| h.as_str())
    }

    pub fn hashes(&self) -> Vec<String> {
        self.0.iter().map(|(h, _)| h.clone()).collect()
    }

    pub fn contains(&self, hash: &str) -> bool {
        self.0.iter().any(|(h, _)| h == hash)
    }

    /// The hash of the CA among these that issued a certificate (DER), by its issuer's name.
    pub fn issuer_of(&self, cert_der: &[u8]) -> Option<String> {
        let (_, issuer) = names_of(cert_der)?;
        self.0
            .iter()
            .find(|(_, subject)| *subject == issuer)
            .map(|(h, _)| h.clone())
    }
}

/// What a rotation has done so far, kept in the datastore (`DIR/ca-rotation`, or one etcd key),
/// so that every master and every command sees the same.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// The CA being replaced (hex SHA-256 of its certificate).
    pub old: String,
    /// The CA that issues from the start of the rotation.
    pub new: String,
    /// Unix seconds.
    pub started: i64,
    /// Unix seconds; `None` while it runs.
    pub finished: Option<i64>,
    /// Each name owned when the rotation started, and the key that owned it then.
    pub nodes: BTreeMap<String, String>,
}

impl Rotation {
    /// A rotation from `old` to `new` starting now, over the nodes `records` holds.
    pub fn start(old: String, new: String, records: &Records, now: i64) -> Self {
        let nodes = records
            .by_name
            .values()
            .filter_map(|r| match &r.state {
                NodeState::Owned(k) => Some((r.name.clone(), k.clone())),
                _ => None,
            })
            .collect();
        Rotation {
            old,
            new,
            started: now,
            finished: None,
            nodes,
        }
    }

    pub fn running(&self) -> bool {
        self.finished.is_none()
    }

    /// The nodes still on the old CA: their name still belongs to the key it had when the
    /// rotation started. A revoked or forgotten name is not waited for.
    pub fn pending(&self, records: &Records) -> Vec<String> {
        self.nodes
            .iter()
            .filter(|(name, key)| {
                records
                    .by_name
                    .get(*name)
                    .is_some_and(|r| r.state == NodeState::Owned((*key).clone()))
            })
            .map(|(name, _)| name.clone())
            .collect()
    }

    pub fn to_text(&self) -> String {
        let mut t = format!(
            "# tether CA rotation\nold {}\nnew {}\nstarted {}\n",
            self.old, self.new, self.started
        );
        if let Some(f) = self.finished {
            t.push_str(&format!("finished {f}\n"));
        }
        for (name, key) in &self.nodes {
            t.push_str(&format!("node {name} {key}\n"));
        }
        t
    }

    /// Reads a record written by [`to_text`](Self::to_text); `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, RotationError> {
        let bad = |line: usize, detail: &str| RotationError::Corrupt {
            path: origin.to_string(),
            detail: format!("line {line}: {detail}"),
        };
        let hash = |line: usize, v: Option<&str>| match v {
            Some(h) if h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()) => {
                Ok(h.to_ascii_lowercase())
            }
            _ => Err(bad(line, "expected a hex SHA-256")),
        };
        let secs = |line: usize, v: Option<&str>| {
            v.and_then(|s| s.parse::<i64>().ok())
                .ok_or_else(|| bad(line, "expected Unix seconds"))
        };
        let (mut old, mut new, mut started, mut finished) = (None, None, None, None);
        let mut nodes = BTreeMap::new();
        for (i, l) in text.lines().enumerate() {
            let n = i + 1;
            let mut f = l.split_whitespace();
            match f.next() {
                None => {}
                Some(c) if c.starts_with('#') => {}
                Some("old") => old = Some(hash(n, f.next())?),
                Some("new") => new = Some(hash(n, f.next())?),
                Some("started") => started = Some(secs(n, f.next())?),
                Some("finished") => finished = Some(secs(n, f.next())?),
                Some("node") => {
                    let name = f.next().unwrap_or_default();
                    crate::validate_node_name(name).map_err(|e| bad(n, &e.to_string()))?;
                    let key = hash(n, f.next())?;
                    if nodes.len() >= MAX_NODES {
                        return Err(bad(n, "more nodes than a rotation lists"));
                    }
                    nodes.insert(name.to_string(), key);
                }
                Some(other) => return Err(bad(n, &format!("unknown field {other:?}"))),
            }
        }
        let missing = |what: &str| bad(0, &format!("no {what}"));
        Ok(Rotation {
            old: old.ok_or_else(|| missing("old"))?,
            new: new.ok_or_else(|| missing("new"))?,
            started: started.ok_or_else(|| missing("started"))?,
            finished,
            nodes,
        })
    }
}

/// The rotation record of a data directory, if it has one.
pub fn load(dir: &Path) -> Result<Option<Rotation>, RotationError> {
    let path = dir.join(ROTATION_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let text = read_string(&path)?;
    Rotation::parse(&text, &path.display().to_string()).map(Some)
}

/// Writes the rotation record of a data directory.
pub fn save(dir: &Path, r: &Rotation) -> Result<(), RotationError> {
    Ok(write_file(
        &dir.join(ROTATION_FILE),
        r.to_text().as_bytes(),
        0o644,
    )?)
}

/// Whether a rotation runs in this data directory (it holds `ca-old.crt`).
pub fn running_in(dir: &Path) -> bool {
    dir.join(CA_OLD).exists()
}

/// Every CA a data directory trusts, the issuing one first: what servers verify agents and peers
/// against, and hand to the nodes they issue for.
pub fn trusted(dir: &Path) -> Result<String, CertError> {
    let mut pem = read_string(&dir.join(files::CA_CERT))?;
    let old = dir.join(CA_OLD);
    if old.exists() {
        if !pem.ends_with('\n') {
            pem.push('\n');
        }
        pem.push_str(&read_string(&old)?);
    }
    Ok(pem)
}

/// The cross-signed certificate of a data directory, if it has one.
pub fn cross(dir: &Path) -> Result<Option<String>, CertError> {
    let path = dir.join(CA_CROSS);
    if path.exists() {
        read_string(&path).map(Some)
    } else {
        Ok(None)
    }
}

/// What [`rotate`] or [`adopt`] did.
#[derive(Debug)]
pub struct Rotated {
    pub old: String,
    pub new: String,
    /// The names in this master's new server certificate.
    pub names: Vec<String>,
}

impl Ca {
    /// A certificate for `new`'s key and name signed by this CA: a chain through it leads a
    /// verifier that trusts only this CA to certificates `new` issued.
    fn cross_sign(&self, new: &Ca, lifetime: Lifetime) -> Result<String, CertError> {
        let der = pem_to_der(&new.cert_pem, Path::new("(new CA)"))?;
        let cn = common_name(&der).unwrap_or_else(|| "tether CA".into());
        let params = ca_params(&cn, lifetime)?;
        params
            .signed_by(new.issuer.key(), &self.issuer)
            .map(|c| c.pem())
            .map_err(crate::gen)
    }

    /// Hex SHA-256 of the certificate: what tokens pin.
    pub fn hash(&self) -> Result<String, CertError> {
        Ok(crate::token::ca_hash(&pem_to_der(
            &self.cert_pem,
            Path::new("(CA)"),
        )?))
    }
}

pub(crate) fn ca_params(
    cn: &str,
    lifetime: Lifetime,
) -> Result<rcgen::CertificateParams, CertError> {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = crate::dn(cn);
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Constrained(0));
    params.key_usages = vec![
        rcgen::KeyUsagePurpose::KeyCertSign,
        rcgen::KeyUsagePurpose::CrlSign,
        rcgen::KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = lifetime.not_before;
    params.not_after = lifetime.not_after;
    params.serial_number = Some(crate::random_serial()?);
    Ok(params)
}

fn common_name(der: &[u8]) -> Option<String> {
    let (_, c) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = c.subject().iter_common_name().next()?.as_str().ok()?;
    Some(cn.to_string())
}

/// The names (DNS names and addresses) a server certificate was issued for, so that the new
/// CA's certificate for this master names the same.
fn server_names(dir: &Path) -> Result<Vec<String>, CertError> {
    use x509_parser::extensions::GeneralName;
    let path = dir.join(files::SERVER_CERT);
    let der = pem_to_der(&read_string(&path)?, &path)?;
    let invalid = |detail: String| CertError::Invalid {
        path: path.clone(),
        what: "server certificate",
        detail,
    };
    let (_, cert) =
        x509_parser::parse_x509_certificate(&der).map_err(|e| invalid(e.to_string()))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_string()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => names.push(
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())
                            .to_string(),
                    ),
                    16 => names.push(
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())
                            .to_string(),
                    ),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    if names.is_empty() {
        return Err(invalid("it names no host".into()));
    }
    Ok(names)
}

/// Issues this master's server certificate from the data directory's CA, for the names its
/// current one has.
fn reissue_server(dir: &Path, ca: &Ca, leaf_days: u32) -> Result<Vec<String>, CertError> {
    let names = server_names(dir)?;
    let issued = ca.issue_server(&names, Lifetime::days(leaf_days))?;
    write_identity(
        &dir.join(files::SERVER_CERT),
        &dir.join(files::SERVER_KEY),
        &issued.cert_pem,
        &issued.key_pem,
    )?;
    Ok(names)
}

/// Starts a rotation in a master's data directory: a new CA (for `ca_days`), cross-signed by
/// the current one, and a new server certificate from it (for `leaf_days`).
///
/// The files change in an order that a server reloading at any moment can use: the old CA is
/// kept as `ca-old.crt` and the cross-signed certificate written before `ca.crt` changes, and
/// the server certificate, still trusted through `ca-old.crt`, changes last.
pub fn rotate(dir: &Path, ca_days: u32, leaf_days: u32) -> Result<Rotated, RotationError> {
    let _lock = crate::lock_file(dir)?;
    if running_in(dir) {
        return Err(RotationError::Running(dir.to_owned()));
    }
    crate::recover_identity(&dir.join(files::CA_CERT), &dir.join(files::CA_KEY))?;
    let old = Ca::load(dir)?;
    let lifetime = Lifetime::days(ca_days);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let new = Ca::generate(&format!("tether CA {now}"), lifetime)?;
    let cross = old.cross_sign(&new, lifetime)?;
    write_cas(dir, &old.cert_pem, &cross, &new)?;
    let names = reissue_server(dir, &new, leaf_days)?;
    Ok(Rotated {
        old: old.hash()?,
        new: new.hash()?,
        names,
    })
}

/// Writes a rotation's CAs in the order a reloading server can use at any moment: the old CA
/// kept and the cross-signed certificate written before `ca.crt` and `ca.key` change.
fn write_cas(dir: &Path, old_pem: &str, cross: &str, new: &Ca) -> Result<(), CertError> {
    write_file(&dir.join(CA_OLD), old_pem.as_bytes(), 0o644)?;
    write_file(&dir.join(CA_CROSS), cross.as_bytes(), 0o644)?;
    write_identity(
        &dir.join(files::CA_CERT),
        &dir.join(files::CA_KEY),
        &new.cert_pem,
        &new.issuer.key().serialize_pem(),
    )
}

/// Brings a rotation started on another master (`from`: a copy of its `ca.crt`, `ca.key`,
/// `ca-old.crt` and `ca-cross.crt`, and `ca-rotation` with the data-directory store) to this
/// one: checked to start from this master's CA, then written in [`rotate`]'s order, with a new
/// server certificate from the new CA. Running it again changes nothing but the server
/// certificate.
pub fn adopt(dir: &Path, from: &Path, leaf_days: u32) -> Result<Rotated, RotationError> {
    let _lock = crate::lock_file(dir)?;
    let new = Ca::load(from)?;
    let from_old = read_string(&from.join(CA_OLD))?;
    let cross = read_string(&from.join(CA_CROSS))?;
    let mine = read_string(&dir.join(files::CA_CERT))?;
    let (old_hash, new_hash) = (hashes(&from_old), new.hash()?);
    let mine_hash = hashes(&mine);
    let already = mine_hash.first() == Some(&new_hash);
    if !already && mine_hash.first() != old_hash.first() {
        return Err(RotationError::OtherCa {
            from: from.to_owned(),
            dir: dir.to_owned(),
        });
    }
    check_cross(&cross, &from_old, &new.cert_pem)?;
    write_cas(dir, &from_old, &cross, &new)?;
    if from.join(ROTATION_FILE).exists() {
        let text = read_string(&from.join(ROTATION_FILE))?;
        write_file(&dir.join(ROTATION_FILE), text.as_bytes(), 0o644)?;
    }
    let names = reissue_server(dir, &new, leaf_days)?;
    Ok(Rotated {
        old: old_hash.into_iter().next().unwrap_or_default(),
        new: new_hash,
        names,
    })
}

/// The cross-signed certificate must carry the new CA's key and name and verify under the old
/// CA: a copy that does not would leave nodes on the old CA unable to verify this master.
fn check_cross(cross: &str, old: &str, new: &str) -> Result<(), RotationError> {
    let bad = |detail: &str| RotationError::Corrupt {
        path: CA_CROSS.into(),
        detail: detail.into(),
    };
    let der = |pem: &str| pem_to_der(pem, Path::new(CA_CROSS));
    let (c, o, n) = (der(cross)?, der(old)?, der(new)?);
    let (Some(c), Some(o), Some(n)) = (parse(&c), parse(&o), parse(&n)) else {
        return Err(bad("unreadable certificate"));
    };
    if c.public_key().raw != n.public_key().raw || c.subject() != n.subject() {
        return Err(bad("it is not for the new CA's key and name"));
    }
    c.verify_signature(Some(o.public_key()))
        .map_err(|_| bad("the old CA did not sign it"))
}

fn parse(d: &[u8]) -> Option<x509_parser::certificate::X509Certificate<'_>> {
    x509_parser::parse_x509_certificate(d).ok().map(|(_, c)| c)
}

/// Ends a rotation in a data directory: the old CA is trusted no more. True when it removed
/// `ca-old.crt`; false when none was there (finished already).
pub fn finish(dir: &Path) -> Result<bool, RotationError> {
    let _lock = crate::lock_file(dir)?;
    let path = dir.join(CA_OLD);
    match std::fs::remove_file(&path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(source) => Err(CertError::Write { path, source }.into()),
    }
}

#[cfg(test)]
mod tests;
