//! Join tokens: `K10<hex SHA-256 of the CA certificate>::<id>.<secret>`.
//!
//! The first part pins the CA: a joining agent checks the CA the server presents against it
//! before it trusts anything. The second part is the credential: the server keeps only the
//! SHA-256 of each secret (in `DIR/tokens`, one line per token), so a copy of the data
//! directory does not leak usable tokens. `DIR/token` holds the first token in full, for the
//! operator who ran `init`.

use crate::{lock_file, read_string, write_file, CertError};
use ring::digest::{digest, SHA256};
use ring::rand::SecureRandom;
use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;

/// Prefix of every token: the format's version, as in k3s.
pub const PREFIX: &str = "K10";
/// The token store of a data directory.
pub const TOKENS_FILE: &str = "tokens";
/// The first token, in full, as written by `init`.
pub const TOKEN_FILE: &str = "token";

/// A parsed token.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    /// Hex SHA-256 of the CA certificate (DER).
    pub ca_hash: String,
    pub id: String,
    pub secret: String,
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secret.
        write!(f, "Token({}::{}.***)", self.ca_hash, self.id)
    }
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}::{}.{}", self.ca_hash, self.id, self.secret)
    }
}

/// Why a token string is not a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenFormatError {
    #[error("a token starts with {PREFIX}")]
    Prefix,
    #[error("a token has the form K10<64 hex digits>::<id>.<secret>")]
    Shape,
    #[error("the CA hash of a token is 64 hex digits")]
    CaHash,
    #[error("the token id and secret are lower-case letters and digits")]
    Credential,
}

impl FromStr for Token {
    type Err = TokenFormatError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s
            .trim()
            .strip_prefix(PREFIX)
            .ok_or(TokenFormatError::Prefix)?;
        let (hash, cred) = rest.split_once("::").ok_or(TokenFormatError::Shape)?;
        let (id, secret) = cred.split_once('.').ok_or(TokenFormatError::Shape)?;
        if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(TokenFormatError::CaHash);
        }
        let ok = |p: &str| {
            !p.is_empty()
                && p.len() <= 64
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        };
        if !ok(id) || !ok(secret) {
            return Err(TokenFormatError::Credential);
        }
        Ok(Token {
            ca_hash: hash.to_ascii_lowercase(),
            id: id.to_string(),
            secret: secret.to_string(),
        })
    }
}

/// Hex SHA-256 of a CA certificate's DER: what a token pins. The same as
/// `openssl x509 -in ca.crt -outform der | sha256sum`.
pub fn ca_hash(ca_der: &[u8]) -> String {
    hex::encode(digest(&SHA256, ca_der))
}

/// Compares without an early exit, so that timing tells nothing about where hashes differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn secret_hash(secret: &str) -> String {
    hex::encode(digest(&SHA256, secret.as_bytes()))
}

fn random_hex(bytes: usize) -> Result<String, CertError> {
    let mut b = vec![0u8; bytes];
    ring::rand::SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| CertError::Generate("no randomness available".into()))?;
    Ok(hex::encode(b))
}

/// How long the token that `tether-server init` makes is good for, as kubeadm's are.
pub const INIT_TOKEN_TTL: u64 = 24 * 3600;

/// What a token may do besides joining: how many joins, and which addresses the node that
/// joins with it owns from the start (`token create --uses`, `--address`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenGrant {
    /// Joins it is good for; 0 for any number (the default, as before 0.3).
    pub uses: u32,
    /// Addresses pinned to the node that joins with it (see `records::NodeRecord::addresses`).
    pub addresses: Vec<IpAddr>,
}

/// One entry of the token store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    pub id: String,
    secret_hash: String,
    /// Unix seconds; 0 for never.
    pub expires: i64,
    pub created: i64,
    pub description: String,
    pub grant: TokenGrant,
    /// Joins made with it so far (counted only when `grant.uses` bounds them).
    pub used: u32,
}

impl TokenEntry {
    pub fn expired(&self, now: i64) -> bool {
        self.expires != 0 && now >= self.expires
    }

    /// Whether its joins are spent.
    pub fn used_up(&self) -> bool {
        self.grant.uses != 0 && self.used >= self.grant.uses
    }
}

/// Why a token was not accepted: for the server's log. The joining agent is told only
/// [`BAD_TOKEN`], so that a stranger cannot learn which token ids exist.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenRejection {
    #[error("unknown token id {0:?} (revoked, or created on another server)")]
    Unknown(String),
    #[error("token {0:?} expired")]
    Expired(String),
    #[error("wrong secret for token {0:?}")]
    WrongSecret(String),
    #[error("token {0:?} has been used as many times as it may")]
    UsedUp(String),
}

/// What a joining agent is told for any [`TokenRejection`].
pub const BAD_TOKEN: &str =
    "bad token: unknown, revoked, expired or a wrong secret (ask for a new one with `tether-server token create`)";

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// Reads the token store; a missing store is empty.
pub fn list(dir: &Path) -> Result<Vec<TokenEntry>, CertError> {
    let path = dir.join(TOKENS_FILE);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = read_string(&path)?;
    Ok(text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(TokenEntry::parse_line)
        .collect())
}

impl TokenEntry {
    /// One line of the token store: `id sha256(secret) expires created [+u=USED/USES]
    /// [+a=IP,IP] description`. The etcd datastore keeps the same line as a key's value. A 0.2
    /// server reads the `+` fields as the start of the description: it does not count uses.
    pub fn to_line(&self) -> String {
        let mut grant = String::new();
        if self.grant.uses != 0 {
            grant.push_str(&format!("+u={}/{} ", self.used, self.grant.uses));
        }
        if !self.grant.addresses.is_empty() {
            let list: Vec<String> = self.grant.addresses.iter().map(|a| a.to_string()).collect();
            grant.push_str(&format!("+a={} ", list.join(",")));
        }
        format!(
            "{} {} {} {} {grant}{}",
            self.id,
            self.secret_hash,
            self.expires,
            self.created,
            self.description.replace('\n', " ")
        )
    }

    /// Reads a line [`to_line`](Self::to_line) wrote; `None` for anything else.
    pub fn parse_line(line: &str) -> Option<TokenEntry> {
        let mut f = line.splitn(5, ' ');
        let mut e = TokenEntry {
            id: f.next()?.to_string(),
            secret_hash: f.next()?.to_string(),
            expires: f.next()?.parse().ok()?,
            created: f.next()?.parse().ok()?,
            description: String::new(),
            grant: TokenGrant::default(),
            used: 0,
        };
        let mut rest = f.next().unwrap_or("");
        loop {
            let (field, after) = rest.split_once(' ').unwrap_or((rest, ""));
            if let Some(v) = field.strip_prefix("+u=") {
                let (used, uses) = v.split_once('/')?;
                e.used = used.parse().ok()?;
                e.grant.uses = uses.parse().ok()?;
            } else if let Some(v) = field.strip_prefix("+a=") {
                let list = v
                    .split(',')
                    .map(|a| a.parse::<IpAddr>().ok())
                    .collect::<Option<Vec<_>>>()?;
                if list.len() > crate::records::MAX_ADDRESSES {
                    return None;
                }
                e.grant.addresses = list;
            } else {
                break;
            }
            rest = after;
        }
        e.description = rest.to_string();
        Some(e)
    }

    /// A new token for a CA and its stored entry; `taken` says which ids are in use already.
    pub fn generate(
        ca_der: &[u8],
        ttl_secs: u64,
        description: &str,
        grant: &TokenGrant,
        taken: impl Fn(&str) -> bool,
    ) -> Result<(Token, TokenEntry), CertError> {
        // Ids are short (they are typed and logged), so a new one is drawn until it is unique.
        let mut id = random_hex(3)?;
        let mut tries = 0;
        while taken(&id) {
            tries += 1;
            if tries > 64 {
                return Err(CertError::Generate(
                    "no free token id; revoke unused tokens".into(),
                ));
            }
            id = random_hex(3)?;
        }
        let token = Token {
            ca_hash: ca_hash(ca_der),
            id,
            secret: random_hex(16)?,
        };
        let created = now();
        let entry = TokenEntry {
            id: token.id.clone(),
            secret_hash: secret_hash(&token.secret),
            expires: if ttl_secs == 0 {
                0
            } else {
                created.saturating_add(ttl_secs as i64)
            },
            created,
            description: description.to_string(),
            grant: grant.clone(),
            used: 0,
        };
        Ok((token, entry))
    }
}

fn save(dir: &Path, entries: &[TokenEntry]) -> Result<(), CertError> {
    let mut text = String::from("# id sha256(secret) expires created description\n");
    for e in entries {
        text.push_str(&e.to_line());
        text.push('\n');
    }
    write_file(&dir.join(TOKENS_FILE), text.as_bytes(), 0o600)
}

/// Adds the entries whose ids the store lacks (an export from etcd); how many it holds after.
pub fn add_entries(dir: &Path, new: &[TokenEntry]) -> Result<usize, CertError> {
    let _guard = lock_file(dir)?;
    let mut entries = list(dir)?;
    for e in new {
        if !entries.iter().any(|x| x.id == e.id) {
            entries.push(e.clone());
        }
    }
    save(dir, &entries)?;
    Ok(entries.len())
}

/// The CA certificate of a data directory in DER, which every token pins.
pub fn ca_der_of(dir: &Path) -> Result<Vec<u8>, CertError> {
    let ca_pem = read_string(&dir.join(crate::files::CA_CERT))?;
    crate::pem_to_der(&ca_pem, &dir.join(crate::files::CA_CERT))
}

/// Creates a token valid for `ttl_secs` (0: no expiry) and stores its hash.
pub fn create(dir: &Path, ttl_secs: u64, description: &str) -> Result<Token, CertError> {
    create_with(dir, ttl_secs, description, &TokenGrant::default())
}

/// [`create`] with a bound on its joins and addresses for the node that joins.
pub fn create_with(
    dir: &Path,
    ttl_secs: u64,
    description: &str,
    grant: &TokenGrant,
) -> Result<Token, CertError> {
    let ca_der = ca_der_of(dir)?;
    let _guard = lock_file(dir)?;
    let mut entries = list(dir)?;
    let (token, entry) = TokenEntry::generate(&ca_der, ttl_secs, description, grant, |id| {
        entries.iter().any(|e| e.id == id)
    })?;
    entries.push(entry);
    save(dir, &entries)?;
    Ok(token)
}

/// Removes a token; false when there was none with that id.
pub fn revoke(dir: &Path, id: &str) -> Result<bool, CertError> {
    let _guard = lock_file(dir)?;
    let mut entries = list(dir)?;
    let before = entries.len();
    entries.retain(|e| e.id != id);
    if entries.len() == before {
        return Ok(false);
    }
    save(dir, &entries)?;
    Ok(true)
}

/// Checks a token's credential against the store as it is on disk now, so that tokens created
/// or revoked while the server runs take effect at once.
pub fn verify(dir: &Path, token: &Token) -> Result<Result<(), TokenRejection>, CertError> {
    let entries = list(dir)?;
    Ok(check(entries.iter().find(|e| e.id == token.id), token))
}

/// Redeems a token for one join, under the store's lock: checked as [`verify`] does, and one
/// of its uses spent when they are bounded (so that two joins cannot both take the last).
/// Returns what the token grants.
pub fn redeem(dir: &Path, token: &Token) -> Result<Result<TokenGrant, TokenRejection>, CertError> {
    let _guard = lock_file(dir)?;
    let mut entries = list(dir)?;
    let Some(e) = entries.iter_mut().find(|e| e.id == token.id) else {
        return Ok(check(None, token).map(|_| TokenGrant::default()));
    };
    if let Err(r) = check(Some(e), token) {
        return Ok(Err(r));
    }
    let grant = e.grant.clone();
    if e.grant.uses != 0 {
        e.used += 1;
        save(dir, &entries)?;
    }
    Ok(Ok(grant))
}

/// Checks a token's credential against its stored entry (`None`: no token with that id).
pub fn check(entry: Option<&TokenEntry>, token: &Token) -> Result<(), TokenRejection> {
    let given = secret_hash(&token.secret);
    let Some(e) = entry else {
        // The same work as for a known id, so the time taken does not tell whether it exists.
        let _ = same(given.as_bytes(), given.as_bytes());
        return Err(TokenRejection::Unknown(token.id.clone()));
    };
    if e.expired(now()) {
        return Err(TokenRejection::Expired(token.id.clone()));
    }
    if !same(given.as_bytes(), e.secret_hash.as_bytes()) {
        return Err(TokenRejection::WrongSecret(token.id.clone()));
    }
    if e.used_up() {
        return Err(TokenRejection::UsedUp(token.id.clone()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_and_print() {
        let t: Token = format!("K10{}::abc123.s3cr3t", "a".repeat(64))
            .parse()
            .unwrap();
        assert_eq!(t.id, "abc123");
        assert_eq!(
            t.to_string(),
            format!("K10{}::abc123.s3cr3t", "a".repeat(64))
        );
        assert!(!format!("{t:?}").contains("s3cr3t"));
        assert_eq!("X10".parse::<Token>(), Err(TokenFormatError::Prefix));
        assert_eq!("K10abc".parse::<Token>(), Err(TokenFormatError::Shape));
        assert_eq!(
            "K10abc::a.b".parse::<Token>(),
            Err(TokenFormatError::CaHash)
        );
        let bad = format!("K10{}::ID.x", "a".repeat(64));
        assert_eq!(bad.parse::<Token>(), Err(TokenFormatError::Credential));
    }

    #[test]
    fn create_verify_revoke_expire() {
        let d = std::env::temp_dir().join(format!("tether-token-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        crate::init(&d, &[], 10, 1).unwrap();
        let t = create(&d, 0, "first").unwrap();
        assert_eq!(verify(&d, &t).unwrap(), Ok(()));
        let text = std::fs::read_to_string(d.join(TOKENS_FILE)).unwrap();
        assert!(!text.contains(&t.secret), "only the hash is stored");
        let wrong = Token {
            secret: "nope".into(),
            ..t.clone()
        };
        assert!(matches!(
            verify(&d, &wrong).unwrap(),
            Err(TokenRejection::WrongSecret(_))
        ));
        let short = create(&d, 1, "short").unwrap();
        let mut entries = list(&d).unwrap();
        entries.iter_mut().for_each(|e| {
            if e.id == short.id {
                e.expires = 1;
            }
        });
        save(&d, &entries).unwrap();
        assert!(matches!(
            verify(&d, &short).unwrap(),
            Err(TokenRejection::Expired(_))
        ));
        assert!(revoke(&d, &t.id).unwrap());
        assert!(matches!(
            verify(&d, &t).unwrap(),
            Err(TokenRejection::Unknown(_))
        ));
        assert!(!revoke(&d, &t.id).unwrap());
        // A token for two joins, with an address for the node.
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let grant = TokenGrant {
            uses: 2,
            addresses: vec![ip],
        };
        let two = create_with(&d, 0, "two joins", &grant).unwrap();
        let line = list(&d)
            .unwrap()
            .into_iter()
            .find(|e| e.id == two.id)
            .unwrap();
        assert_eq!(
            (line.grant.clone(), line.description.as_str()),
            (grant.clone(), "two joins")
        );
        assert_eq!(redeem(&d, &two).unwrap(), Ok(grant.clone()));
        assert_eq!(redeem(&d, &two).unwrap(), Ok(grant));
        assert!(matches!(
            redeem(&d, &two).unwrap(),
            Err(TokenRejection::UsedUp(_))
        ));
        assert!(matches!(
            verify(&d, &two).unwrap(),
            Err(TokenRejection::UsedUp(_))
        ));
        // A 0.2 line reads as before: any number of joins.
        let old = TokenEntry::parse_line("abc123 ff 0 1 a note").unwrap();
        assert_eq!((old.grant.uses, old.description.as_str()), (0, "a note"));
        // Ids stay unique however many tokens there are.
        for _ in 0..200 {
            create(&d, 0, "many").unwrap();
        }
        let ids: std::collections::BTreeSet<String> =
            list(&d).unwrap().into_iter().map(|e| e.id).collect();
        assert_eq!(ids.len(), list(&d).unwrap().len());
        let _ = std::fs::remove_dir_all(&d);
    }
}
