//! Which announced server addresses the agent dials.
//!
//! Any holder of a server certificate from the CA can announce servers, and the agent dials
//! what it is told, over UDP and TCP, forever: left unchecked, every node becomes a port
//! prober or a flood aimed at one address (loopback, the cloud metadata address
//! 169.254.169.254). So an announcement is bounded (per announcer and in all), and an address
//! of a kind no control plane lives at (loopback, link-local, unspecified, multicast) is
//! refused, unless the agent was given a server of that kind itself (`--server 127.0.0.1:...`
//! on a one-machine lab) or allows that network (`--allow-server-network CIDR`).
//!
//! Pure rules, no I/O: the discovery loop asks them about each resolved address.

use std::net::IpAddr;

/// Most addresses taken from one server's announcement.
pub const MAX_PER_ANNOUNCER: usize = 16;
/// Most announced addresses dialed in all.
pub const MAX_ANNOUNCED: usize = 64;

/// A network, `ADDRESS/BITS`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    bits: u8,
}

/// Why a network did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CidrError {
    #[error("{0:?} is not ADDRESS/BITS (for example 10.0.0.0/8)")]
    NotANetwork(String),
    #[error("{text:?}: the prefix length must be 0 to {max}")]
    PrefixLength { text: String, max: u8 },
}

impl std::str::FromStr for Cidr {
    type Err = CidrError;
    fn from_str(s: &str) -> Result<Self, CidrError> {
        let (a, b) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a
            .parse()
            .map_err(|_| CidrError::NotANetwork(s.to_string()))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = if b.is_empty() {
            max
        } else {
            b.parse::<u8>()
                .ok()
                .filter(|n| *n <= max)
                .ok_or_else(|| CidrError::PrefixLength {
                    text: s.to_string(),
                    max,
                })?
        };
        Ok(Cidr { addr, bits })
    }
}

impl Cidr {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(&n.octets(), &a.octets(), self.bits),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(&n.octets(), &a.octets(), self.bits),
            _ => false,
        }
    }
}

fn prefix_eq(a: &[u8], b: &[u8], bits: u8) -> bool {
    let (whole, rest) = ((bits / 8) as usize, bits % 8);
    if a[..whole] != b[..whole] {
        return false;
    }
    rest == 0 || (a[whole] ^ b[whole]) >> (8 - rest) == 0
}

/// The kinds of address no control plane is announced at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Special {
    Loopback,
    LinkLocal,
    Unspecified,
    Multicast,
}

/// What kind of special address `ip` is, if any.
pub fn special(ip: IpAddr) -> Option<Special> {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
        v4 => v4,
    };
    if ip.is_unspecified() {
        return Some(Special::Unspecified);
    }
    if ip.is_loopback() {
        return Some(Special::Loopback);
    }
    if ip.is_multicast() {
        return Some(Special::Multicast);
    }
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    };
    link_local.then_some(Special::LinkLocal)
}

/// The rules, with what the operator gave.
#[derive(Debug, Clone, Default)]
pub struct ServerPolicy {
    /// `--allow-server-network`.
    pub allowed: Vec<Cidr>,
    /// The kinds of the `--server` addresses themselves: announced addresses of those kinds
    /// are fine (a lab on loopback announces loopback).
    pub seeded: Vec<Special>,
}

impl ServerPolicy {
    /// Whether an announced address may be dialed.
    pub fn admits(&self, ip: IpAddr) -> bool {
        if self.allowed.iter().any(|n| n.contains(ip)) {
            return true;
        }
        match special(ip) {
            None => true,
            Some(k @ (Special::Loopback | Special::LinkLocal)) => self.seeded.contains(&k),
            Some(Special::Unspecified | Special::Multicast) => false,
        }
    }
}

/// The announced addresses to keep, in order: at most [`MAX_PER_ANNOUNCER`] from each
/// announcer and [`MAX_ANNOUNCED`] in all, without repeats.
pub fn bounded(announcements: impl IntoIterator<Item = Vec<String>>) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for list in announcements {
        for addr in list.into_iter().take(MAX_PER_ANNOUNCER) {
            if out.len() == MAX_ANNOUNCED {
                return out;
            }
            if !out.contains(&addr) {
                out.push(addr);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn special_addresses_are_refused_unless_seeded_or_allowed() {
        let p = ServerPolicy::default();
        for bad in [
            "127.0.0.1",
            "::1",
            "169.254.169.254",
            "fe80::1",
            "0.0.0.0",
            "::",
            "224.0.0.1",
            "ff02::1",
            "::ffff:127.0.0.1",
        ] {
            assert!(!p.admits(ip(bad)), "{bad}");
        }
        for good in ["10.0.0.5", "192.0.2.7", "2001:db8::1"] {
            assert!(p.admits(ip(good)), "{good}");
        }
        let lab = ServerPolicy {
            seeded: vec![Special::Loopback],
            ..Default::default()
        };
        assert!(lab.admits(ip("127.0.0.2")));
        assert!(!lab.admits(ip("169.254.169.254")));
        let allowed = ServerPolicy {
            allowed: vec!["169.254.0.0/16".parse().unwrap()],
            ..Default::default()
        };
        assert!(allowed.admits(ip("169.254.169.254")));
        assert!(!allowed.admits(ip("127.0.0.1")));
    }

    #[test]
    fn networks_parse_and_match() {
        let n: Cidr = "10.1.0.0/16".parse().unwrap();
        assert!(n.contains(ip("10.1.200.3")) && !n.contains(ip("10.2.0.1")));
        let n: Cidr = "10.1.0.0/13".parse().unwrap();
        assert!(n.contains(ip("10.7.255.255")) && !n.contains(ip("10.8.0.0")));
        let n: Cidr = "fd00::/8".parse().unwrap();
        assert!(n.contains(ip("fd12::1")) && !n.contains(ip("fe80::1")));
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("nope/8".parse::<Cidr>().is_err());
        let one: Cidr = "192.0.2.1".parse().unwrap();
        assert!(one.contains(ip("192.0.2.1")) && !one.contains(ip("192.0.2.2")));
    }

    #[test]
    fn announcements_are_bounded_per_announcer_and_in_all() {
        let flood: Vec<String> = (0..256).map(|i| format!("10.0.{i}.1:9443")).collect();
        let one = bounded([flood.clone()]);
        assert_eq!(one.len(), MAX_PER_ANNOUNCER);
        let many = bounded((0..10).map(|k| {
            (0..20)
                .map(|i| format!("10.{k}.{i}.1:9443"))
                .collect::<Vec<_>>()
        }));
        assert_eq!(many.len(), MAX_ANNOUNCED);
        assert_eq!(bounded([vec!["a:1".into(), "a:1".into()]]), vec!["a:1"]);
    }
}
