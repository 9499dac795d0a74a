//! The cluster's certificate authority: creating it, issuing server and agent certificates, and
//! writing them where the binaries expect them.
//!
//! All keys are ECDSA P-256: small, fast to verify on every handshake, and supported by every TLS
//! stack that might inspect them. Private keys are written with mode 0600 and atomically (a
//! temporary file renamed into place), so that a reader never sees half a key and a server that
//! reloads on change never loads a torn file.
#![forbid(unsafe_code)]

pub mod records;
pub mod rotation;
mod store;
pub mod token;

pub use store::{recover_identity, write_identity};

use rcgen::{
    CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, Issuer, KeyPair,
    KeyUsagePurpose, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use ring::rand::SecureRandom;
use std::fs;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// File names inside a data directory. They are part of the command-line contract.
pub mod files {
    pub const CA_CERT: &str = "ca.crt";
    pub const CA_KEY: &str = "ca.key";
    pub const SERVER_CERT: &str = "server.crt";
    pub const SERVER_KEY: &str = "server.key";
    pub const AGENT_CERT: &str = "agent.crt";
    pub const AGENT_KEY: &str = "agent.key";
}

/// Default lifetime of the CA: ten years, so that it outlives the clusters it anchors.
pub const CA_DAYS: u32 = 3650;
/// Default lifetime of server and agent certificates: one year.
pub const LEAF_DAYS: u32 = 365;

/// Why a certificate operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a usable {what}: {detail}")]
    Invalid {
        path: PathBuf,
        what: &'static str,
        detail: String,
    },
    #[error("invalid node name {0:?}: use 1 to 253 letters, digits, '-', '_' or '.', and not an IP address")]
    BadNodeName(String),
    #[error("{path}, line {line}: {detail}; fix or remove the line (a records file that cannot be read would mean nothing is revoked, so the start stops)")]
    Records {
        path: PathBuf,
        line: usize,
        detail: String,
    },
    #[error("invalid certificate name {name:?}: {detail}")]
    BadName { name: String, detail: String },
    #[error("certificate generation failed: {0}")]
    Generate(String),
    #[error("only one of {0} and {1} exists; restore the other or remove both to create a new CA")]
    HalfCa(PathBuf, PathBuf),
    #[error("invalid certificate signing request: {0}")]
    BadCsr(String),
    /// A certificate a server handed over (a join's or a renewal's answer) that is not a good
    /// identity for this node: kept off the disk.
    #[error("the certificate the server sent is not this node's: {0}")]
    NotOurs(String),
}

fn gen(e: rcgen::Error) -> CertError {
    CertError::Generate(e.to_string())
}

/// When a certificate is valid.
#[derive(Debug, Clone, Copy)]
pub struct Lifetime {
    pub not_before: OffsetDateTime,
    pub not_after: OffsetDateTime,
}

impl Lifetime {
    /// Valid from an hour ago (tolerating clock skew between hosts) for `days`.
    pub fn days(days: u32) -> Self {
        let now = OffsetDateTime::now_utc();
        Lifetime {
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(i64::from(days)),
        }
    }
}

/// A certificate and its private key, in PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// The certificate authority of one cluster.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    /// Creates a new self-signed CA.
    pub fn generate(common_name: &str, lifetime: Lifetime) -> Result<Self, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen)?;
        let params = rotation::ca_params(common_name, lifetime)?;
        let cert = params.self_signed(&key).map_err(gen)?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads `ca.crt` and `ca.key` from a data directory.
    pub fn load(dir: &Path) -> Result<Self, CertError> {
        let cert_path = dir.join(files::CA_CERT);
        let key_path = dir.join(files::CA_KEY);
        let cert_pem = read_string(&cert_path)?;
        let key_pem = read_string(&key_path)?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| CertError::Invalid {
            path: key_path.clone(),
            what: "CA private key",
            detail: e.to_string(),
        })?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| CertError::Invalid {
            path: cert_path.clone(),
            what: "CA certificate",
            detail: e.to_string(),
        })?;
        Ok(Ca { cert_pem, issuer })
    }

    /// Whether `dir` already holds a CA; an error if it holds only half of one.
    pub fn exists_in(dir: &Path) -> Result<bool, CertError> {
        let cert = dir.join(files::CA_CERT);
        let key = dir.join(files::CA_KEY);
        match (cert.exists(), key.exists()) {
            (true, true) => Ok(true),
            (false, false) => Ok(false),
            _ => Err(CertError::HalfCa(cert, key)),
        }
    }

    /// Writes `ca.crt` (0644) and `ca.key` (0600).
    pub fn save(&self, dir: &Path) -> Result<(), CertError> {
        write_file(&dir.join(files::CA_CERT), self.cert_pem.as_bytes(), 0o644)?;
        write_file(
            &dir.join(files::CA_KEY),
            self.issuer.key().serialize_pem().as_bytes(),
            0o600,
        )
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Issues a server certificate valid for `names` (DNS names or IP literals). It serves both
    /// as the TLS server identity towards agents and as the client identity towards peers.
    pub fn issue_server(&self, names: &[String], lifetime: Lifetime) -> Result<Issued, CertError> {
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
        for name in names {
            params.subject_alt_names.push(san(name)?);
        }
        let cn = names.first().map(String::as_str).unwrap_or("tether-server");
        params.distinguished_name = dn(cn);
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        self.issue_leaf(params, lifetime)
    }

    /// Issues an agent (client) certificate whose common name is the node name: the one
    /// identity the server believes.
    pub fn issue_agent(&self, node_name: &str, lifetime: Lifetime) -> Result<Issued, CertError> {
        validate_node_name(node_name)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
        params.distinguished_name = dn(node_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue_leaf(params, lifetime)
    }

    /// Signs a node's certificate signing request. Only the CSR's public key is used: the
    /// certificate names `node_name` (checked by the caller against a token) and may only
    /// authenticate a client.
    pub fn sign_agent_csr(
        &self,
        csr_der: &[u8],
        node_name: &str,
        lifetime: Lifetime,
    ) -> Result<String, CertError> {
        validate_node_name(node_name)?;
        let der = rustls::pki_types::CertificateSigningRequestDer::from(csr_der.to_vec());
        let mut csr = rcgen::CertificateSigningRequestParams::from_der(&der)
            .map_err(|e| CertError::BadCsr(e.to_string()))?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
        params.distinguished_name = dn(node_name);
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = lifetime.not_before;
        params.not_after = lifetime.not_after;
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        csr.params = params;
        Ok(csr.signed_by(&self.issuer).map_err(gen)?.pem())
    }

    fn issue_leaf(
        &self,
        mut params: CertificateParams,
        lifetime: Lifetime,
    ) -> Result<Issued, CertError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen)?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.not_before = lifetime.not_before;
        params.not_after = lifetime.not_after;
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }
}

impl Issued {
    /// Writes the certificate (0644) and key (0600).
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), CertError> {
        write_file(cert_path, self.cert_pem.as_bytes(), 0o644)?;
        write_file(key_path, self.key_pem.as_bytes(), 0o600)
    }
}

/// What `tether-server init` did.
#[derive(Debug)]
pub struct InitReport {
    /// False when an existing CA was kept.
    pub created_ca: bool,
    /// The names in the new server certificate.
    pub names: Vec<String>,
    /// The join token in `DIR/token` (created unless one was there).
    pub token: token::Token,
}

/// Names for a server that agents reach on loopback (tests, the demo, one-machine labs).
pub const LOOPBACK_NAMES: [&str; 3] = ["localhost", "127.0.0.1", "::1"];

/// Prepares a server's data directory: creates the CA unless one exists, then issues a server
/// certificate for the host name and `extra_names` (localhost and the loopback addresses only
/// when they are among them).
pub fn init(
    dir: &Path,
    extra_names: &[String],
    ca_days: u32,
    leaf_days: u32,
) -> Result<InitReport, CertError> {
    create_dir(dir)?;
    let created_ca = !Ca::exists_in(dir)?;
    let ca = if created_ca {
        let ca = Ca::generate("tether CA", Lifetime::days(ca_days))?;
        ca.save(dir)?;
        ca
    } else {
        Ca::load(dir)?
    };
    // Loopback names only when asked (`--san localhost,127.0.0.1,::1`): a certificate that
    // every server shares names for tells no server apart, and an agent checks that a server's
    // certificate names the address it dialed.
    let mut names = Vec::new();
    if let Some(h) = hostname() {
        names.push(h);
    }
    names.extend(extra_names.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.clone()));
    ca.issue_server(&names, Lifetime::days(leaf_days))?
        .save(&dir.join(files::SERVER_CERT), &dir.join(files::SERVER_KEY))?;
    let token_path = dir.join(token::TOKEN_FILE);
    let existing = std::fs::read_to_string(&token_path)
        .ok()
        .and_then(|t| t.trim().parse::<token::Token>().ok())
        .filter(|t| matches!(token::verify(dir, t), Ok(Ok(()))));
    let token = match existing {
        Some(t) => t,
        None => {
            let t = token::create(dir, token::INIT_TOKEN_TTL, "created by init")?;
            write_file(&token_path, format!("{t}\n").as_bytes(), 0o600)?;
            t
        }
    };
    Ok(InitReport {
        created_ca,
        names,
        token,
    })
}

/// Issues an agent certificate into `out_dir` as `ca.crt`, `agent.crt`, `agent.key`.
pub fn issue_agent_files(
    ca_dir: &Path,
    node_name: &str,
    out_dir: &Path,
    days: u32,
) -> Result<(), CertError> {
    validate_node_name(node_name)?;
    let ca = Ca::load(ca_dir)?;
    let issued = ca.issue_agent(node_name, Lifetime::days(days))?;
    // The operator's word is final: the new key owns the name from now on.
    let key = key_hash_of_cert_pem(&issued.cert_pem)?;
    records::write_local(ca_dir, node_name, records::NodeState::Owned(key))?;
    create_dir(out_dir)?;
    write_file(
        &out_dir.join(files::CA_CERT),
        ca.cert_pem().as_bytes(),
        0o644,
    )?;
    issued.save(
        &out_dir.join(files::AGENT_CERT),
        &out_dir.join(files::AGENT_KEY),
    )
}

/// Node names become certificate common names, log fields and metric labels: keep them to the
/// characters Kubernetes allows in node names.
///
/// A name that reads as an IP address is refused: the egress proxy finds a node by its name or
/// by an address, and a node called `10.0.0.5` would stand in for whichever node has that
/// address.
pub fn validate_node_name(name: &str) -> Result<(), CertError> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && name.parse::<std::net::IpAddr>().is_err();
    if ok {
        Ok(())
    } else {
        Err(CertError::BadNodeName(name.to_string()))
    }
}

/// The machine's host name, if it can be read.
pub fn hostname() -> Option<String> {
    ["/proc/sys/kernel/hostname", "/etc/hostname"]
        .iter()
        .filter_map(|p| fs::read_to_string(p).ok())
        .map(|s| s.trim().to_string())
        .find(|s| !s.is_empty())
}

fn dn(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn san(name: &str) -> Result<rcgen::SanType, CertError> {
    if let Ok(ip) = name.parse::<std::net::IpAddr>() {
        return Ok(rcgen::SanType::IpAddress(ip));
    }
    let dns = name
        .to_string()
        .try_into()
        .map_err(|e: rcgen::Error| CertError::BadName {
            name: name.to_string(),
            detail: e.to_string(),
        })?;
    Ok(rcgen::SanType::DnsName(dns))
}

fn random_serial() -> Result<SerialNumber, CertError> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| CertError::Generate("no randomness available".into()))?;
    bytes[0] &= 0x7f; // keep it positive
    Ok(SerialNumber::from_slice(&bytes))
}

/// Holds the data directory's lock (`DIR/.lock`) while alive, so that the commands and a
/// running server never interleave their read-modify-write of the stores.
pub struct DirLock(#[allow(dead_code)] fs::File);

pub(crate) fn lock_file(dir: &Path) -> Result<DirLock, CertError> {
    let path = dir.join(".lock");
    let err = |source| CertError::Write {
        path: path.clone(),
        source,
    };
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(err)?;
    f.lock().map_err(err)?;
    Ok(DirLock(f))
}

/// The DER of every certificate in a PEM text, in order (a CA bundle).
pub fn pem_ders(pem_text: &str) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = pem_text.as_bytes();
    while let Ok((r, p)) = x509_parser::pem::parse_x509_pem(rest) {
        out.push(p.contents);
        rest = r;
    }
    out
}

/// The DER of the first certificate in a PEM text.
pub fn pem_to_der(pem_text: &str, path: &Path) -> Result<Vec<u8>, CertError> {
    x509_parser::pem::parse_x509_pem(pem_text.as_bytes())
        .map(|(_, p)| p.contents)
        .map_err(|e| CertError::Invalid {
            path: path.to_owned(),
            what: "PEM certificate",
            detail: e.to_string(),
        })
}

fn sha256_hex(data: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, data))
}

/// Hex SHA-256 of a certificate's SubjectPublicKeyInfo: the key a node name belongs to.
pub fn key_hash_of_cert(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(sha256_hex(cert.tbs_certificate.subject_pki.raw))
}

/// [`key_hash_of_cert`] of a PEM certificate.
pub fn key_hash_of_cert_pem(pem_text: &str) -> Result<String, CertError> {
    let der = pem_to_der(pem_text, Path::new("(issued certificate)"))?;
    key_hash_of_cert(&der)
        .ok_or_else(|| CertError::Generate("unreadable issued certificate".into()))
}

/// Checks a certificate a server handed to this node (a join's or a renewal's answer) before
/// it touches the disk: signed by the pinned CA (`ca_pem`), issued to `node_name` for client
/// authentication, valid at `now` (Unix seconds), and for the key in `key_pem`. A server
/// without the CA's key, or a rogue one, could otherwise hand over a certificate that every
/// real server refuses, and the node would keep it across restarts.
pub fn check_issued(
    cert_pem: &str,
    ca_pem: &str,
    node_name: &str,
    key_pem: &str,
    now: i64,
) -> Result<(), CertError> {
    use x509_parser::extensions::ParsedExtension;
    use x509_parser::prelude::FromDer;
    let bad = |why: String| CertError::NotOurs(why);
    let cert_der = pem_to_der(cert_pem, Path::new("(issued certificate)"))?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&cert_der)
        .map_err(|e| bad(format!("unreadable: {e}")))?;
    // Any CA of the bundle (two while a CA rotation runs) may have issued it.
    let cas = pem_ders(ca_pem);
    if cas.is_empty() {
        return Err(CertError::Invalid {
            path: "(pinned CA)".into(),
            what: "PEM certificate",
            detail: "no certificate".into(),
        });
    }
    let issued_by = |der: &Vec<u8>| {
        x509_parser::certificate::X509Certificate::from_der(der).is_ok_and(|(_, ca)| {
            cert.issuer() == ca.subject() && cert.verify_signature(Some(ca.public_key())).is_ok()
        })
    };
    if !cas.iter().any(issued_by) {
        return Err(bad("it is not signed by a CA this node trusts".into()));
    }
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|c| c.as_str().ok());
    if cn != Some(node_name) {
        return Err(bad(format!(
            "it names {:?}, not this node ({node_name:?})",
            cn.unwrap_or("")
        )));
    }
    let client_auth = cert.extensions().iter().any(
        |e| matches!(e.parsed_extension(), ParsedExtension::ExtendedKeyUsage(u) if u.client_auth),
    );
    if !client_auth {
        return Err(bad("it is not a client certificate".into()));
    }
    let v = cert.validity();
    if now < v.not_before.timestamp() || now > v.not_after.timestamp() {
        return Err(bad("it is not valid now".into()));
    }
    if key_hash_of_cert(&cert_der) != Some(key_hash_of_key_pem(key_pem)?) {
        return Err(bad(
            "it is for another key than the one this node made".into()
        ));
    }
    Ok(())
}

/// Hex SHA-256 of a signing request's SubjectPublicKeyInfo.
pub fn key_hash_of_csr(der: &[u8]) -> Result<String, CertError> {
    use x509_parser::prelude::FromDer;
    let (_, csr) = x509_parser::certification_request::X509CertificationRequest::from_der(der)
        .map_err(|e| CertError::BadCsr(e.to_string()))?;
    // The signature proves the requester holds the key: checked before the key is recorded as
    // a name's owner.
    csr.verify_signature()
        .map_err(|e| CertError::BadCsr(format!("signature does not verify: {e}")))?;
    Ok(sha256_hex(csr.certification_request_info.subject_pki.raw))
}

/// A new key and a signing request for `node_name`: the key never leaves the node.
pub fn make_csr(node_name: &str) -> Result<(Vec<u8>, String), CertError> {
    validate_node_name(node_name)?;
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(gen)?;
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(gen)?;
    params.distinguished_name = dn(node_name);
    let csr = params.serialize_request(&key).map_err(gen)?;
    Ok((csr.der().to_vec(), key.serialize_pem()))
}

pub(crate) fn read_string(path: &Path) -> Result<String, CertError> {
    fs::read_to_string(path).map_err(|source| CertError::Read {
        path: path.to_owned(),
        source,
    })
}

fn create_dir(dir: &Path) -> Result<(), CertError> {
    fs::create_dir_all(dir).map_err(|source| CertError::Write {
        path: dir.to_owned(),
        source,
    })
}

/// Hex SHA-256 of a private key's public half (its SubjectPublicKeyInfo), to match it with a
/// certificate ([`key_hash_of_cert`]).
pub fn key_hash_of_key_pem(key_pem: &str) -> Result<String, CertError> {
    use rcgen::PublicKeyData;
    let key = KeyPair::from_pem(key_pem).map_err(|e| CertError::Invalid {
        path: PathBuf::from("(private key)"),
        what: "private key",
        detail: e.to_string(),
    })?;
    Ok(sha256_hex(&key.subject_public_key_info()))
}

/// Writes a file atomically with the given mode: a temporary file beside it, then a rename.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<(), CertError> {
    let err = |source| CertError::Write {
        path: path.to_owned(),
        source,
    };
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{file_name}.tmp{}", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(contents).map_err(err)?;
    f.sync_all().map_err(err)?;
    drop(f);
    fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{next_path, pair_matches};
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_signing_request_whose_signature_fails_gives_no_key() {
        let (csr, _) = make_csr("n").unwrap();
        assert!(key_hash_of_csr(&csr).is_ok());
        // The signature is at the end of the request: flip a bit in it.
        let mut bad = csr.clone();
        let last = bad.len() - 3;
        bad[last] ^= 0x01;
        let err = key_hash_of_csr(&bad).unwrap_err();
        assert!(err.to_string().contains("signature"), "{err}");
    }

    #[test]
    fn a_crash_anywhere_in_storing_a_new_pair_leaves_a_matching_pair() {
        let ca_dir = tmpdir("identity-ca");
        init(&ca_dir, &[], 1, 1).unwrap();
        let ca = Ca::load(&ca_dir).unwrap();
        let old = ca.issue_agent("n", Lifetime::days(1)).unwrap();
        let new = ca.issue_agent("n", Lifetime::days(1)).unwrap();
        let d = tmpdir("identity");
        fs::create_dir_all(&d).unwrap();
        let (cert, key) = (d.join("agent.crt"), d.join("agent.key"));
        let (cert_next, key_next) = (next_path(&cert), next_path(&key));
        let reset = || {
            for p in [&cert, &key, &cert_next, &key_next] {
                let _ = fs::remove_file(p);
            }
            fs::write(&cert, &old.cert_pem).unwrap();
            fs::write(&key, &old.key_pem).unwrap();
        };
        let is = |want: &Issued| {
            fs::read_to_string(&cert).unwrap() == want.cert_pem
                && fs::read_to_string(&key).unwrap() == want.key_pem
                && !cert_next.exists()
                && !key_next.exists()
        };
        // Crash while the new key was being written: the old pair stays.
        reset();
        fs::write(&key_next, &new.key_pem[..40]).unwrap();
        assert!(recover_identity(&cert, &key).unwrap());
        assert!(is(&old));
        // Crash after both were written, before any move: the new pair moves in.
        reset();
        fs::write(&key_next, &new.key_pem).unwrap();
        fs::write(&cert_next, &new.cert_pem).unwrap();
        recover_identity(&cert, &key).unwrap();
        assert!(is(&new));
        // Crash between the two moves: the certificate follows its key.
        reset();
        fs::write(&key, &new.key_pem).unwrap();
        fs::write(&cert_next, &new.cert_pem).unwrap();
        recover_identity(&cert, &key).unwrap();
        assert!(is(&new));
        // No crash: nothing to do, and the write itself leaves the new pair.
        reset();
        assert!(!recover_identity(&cert, &key).unwrap());
        write_identity(&cert, &key, &new.cert_pem, &new.key_pem).unwrap();
        assert!(is(&new));
        assert!(pair_matches(&cert, &key));
        let _ = fs::remove_dir_all(&d);
        let _ = fs::remove_dir_all(&ca_dir);
    }

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("tether-trust-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn parse(pem_text: &str) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(pem_text.as_bytes()).unwrap();
        pem.contents
    }

    #[test]
    fn init_creates_then_keeps_the_ca() {
        let d = tmpdir("init");
        let r = init(&d, &["tether.example".into(), "10.0.0.1".into()], 3650, 365).unwrap();
        assert!(r.created_ca);
        let mode = fs::metadata(d.join("ca.key")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let der = parse(&fs::read_to_string(d.join("server.crt")).unwrap());
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let sans = cert.subject_alternative_name().unwrap().unwrap();
        let text = format!("{:?}", sans.value.general_names);
        assert!(text.contains("tether.example"), "{text}");
        // Loopback only when asked: a certificate every server shares names for tells none apart.
        assert!(!text.contains("localhost"), "{text}");
        // The token it makes expires after 24 hours, as kubeadm's do.
        let t = &token::list(&d).unwrap()[0];
        assert_eq!(t.expires - t.created, token::INIT_TOKEN_TTL as i64);
        let ca1 = fs::read_to_string(d.join("ca.crt")).unwrap();
        let r = init(&d, &[], 3650, 365).unwrap();
        assert!(!r.created_ca);
        assert_eq!(ca1, fs::read_to_string(d.join("ca.crt")).unwrap());

        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn agent_certificate_names_the_node() {
        let d = tmpdir("agent");
        init(&d, &[], 3650, 365).unwrap();
        let out = d.join("node");
        issue_agent_files(&d, "node-1", &out, 365).unwrap();
        let der = parse(&fs::read_to_string(out.join("agent.crt")).unwrap());
        let (_, cert) = x509_parser::parse_x509_certificate(&der).unwrap();
        let cn = cert.subject().iter_common_name().next().unwrap();
        assert_eq!(cn.as_str().unwrap(), "node-1");
        let days = (cert.validity().not_after.timestamp() - cert.validity().not_before.timestamp())
            / 86400;
        assert_eq!(days, 365);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn bad_inputs_are_refused() {
        assert!(validate_node_name("").is_err());
        assert!(validate_node_name("a b").is_err());
        assert!(validate_node_name(&"x".repeat(254)).is_err());
        assert!(validate_node_name("node-1.example_x").is_ok());
        let d = tmpdir("half");
        fs::create_dir_all(&d).unwrap();
        fs::write(d.join("ca.crt"), "x").unwrap();
        assert!(matches!(init(&d, &[], 1, 1), Err(CertError::HalfCa(..))));
        fs::write(d.join("ca.key"), "not a key").unwrap();
        assert!(matches!(Ca::load(&d), Err(CertError::Invalid { .. })));
        let _ = fs::remove_dir_all(&d);
    }
}
