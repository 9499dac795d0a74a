//! The CAs of a running server: the one it issues from and every one it trusts (two while a CA
//! rotation runs), as loaded from the data directory (see `identity::load_identity`). The
//! server's part in a rotation is `ca`'s.

use tether_proto::Message;
use tether_trust::rotation;

/// The CAs this server uses now.
#[derive(Debug, Clone, Default)]
pub(crate) struct Trust {
    /// Each CA's hash and subject (DER), the issuing one first.
    cas: Vec<(String, Vec<u8>)>,
}

impl Trust {
    /// The CAs of a PEM bundle, the issuing one first.
    pub(crate) fn new(bundle: &str) -> Self {
        let cas = tether_trust::pem_ders(bundle)
            .into_iter()
            .filter_map(|der| {
                let (subject, _) = rotation::names_of(&der)?;
                Some((tether_trust::token::ca_hash(&der), subject))
            })
            .collect();
        Trust { cas }
    }

    /// The hash of the CA this server issues from.
    pub(crate) fn issuer(&self) -> &str {
        self.cas.first().map_or("", |(h, _)| h.as_str())
    }

    pub(crate) fn hashes(&self) -> Vec<String> {
        self.cas.iter().map(|(h, _)| h.clone()).collect()
    }

    /// Which trusted CA issued a certificate the handshake verified, by the issuer's name
    /// (CAs that rotate have distinct names); `None` for one this server trusts no more.
    pub(crate) fn issuer_of(&self, cert_der: &[u8]) -> Option<String> {
        let (_, issuer) = rotation::names_of(cert_der)?;
        self.cas
            .iter()
            .find(|(_, subject)| *subject == issuer)
            .map(|(h, _)| h.clone())
    }

    /// Whether a tunnel whose certificate `issuer_of` gave this is from a CA trusted now.
    pub(crate) fn trusts(&self, issuer: Option<&str>) -> bool {
        issuer.is_some_and(|i| self.cas.iter().any(|(h, _)| h == i))
    }

    /// What an agent is asked after the welcome and whenever this changes.
    pub(crate) fn renew_now(&self) -> Message {
        Message::RenewNow {
            issuer: self.issuer().to_string(),
            trusted: self.hashes(),
        }
    }
}
