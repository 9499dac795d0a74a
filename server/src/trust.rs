//! The CAs of a running server: the one it issues from and every one it trusts (two while a CA
//! rotation runs), as loaded from the data directory (see `identity::load_identity`). The
//! server's part in a rotation is `ca`'s.

use tether_proto::Message;
use tether_trust::rotation;

/// The CAs this server uses now.
#[derive(Debug, Clone, Default)]
pub(crate) struct Trust {
    /// The issuing one first.
    cas: rotation::Cas,
}

impl Trust {
    /// The CAs of a PEM bundle, the issuing one first.
    pub(crate) fn new(bundle: &str) -> Self {
        Trust {
            cas: rotation::Cas::parse(bundle),
        }
    }

    /// The hash of the CA this server issues from.
    pub(crate) fn issuer(&self) -> &str {
        self.cas.first()
    }

    pub(crate) fn hashes(&self) -> Vec<String> {
        self.cas.hashes()
    }

    /// Which trusted CA issued a certificate the handshake verified; `None` for one this server
    /// trusts no more.
    pub(crate) fn issuer_of(&self, cert_der: &[u8]) -> Option<String> {
        self.cas.issuer_of(cert_der)
    }

    /// Whether a tunnel whose certificate `issuer_of` gave this is from a CA trusted now.
    pub(crate) fn trusts(&self, issuer: Option<&str>) -> bool {
        issuer.is_some_and(|i| self.cas.contains(i))
    }

    /// What an agent is asked after the welcome and whenever this changes.
    pub(crate) fn renew_now(&self) -> Message {
        Message::RenewNow {
            issuer: self.issuer().to_string(),
            trusted: self.hashes(),
        }
    }
}
