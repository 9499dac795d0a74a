//! The join rate limit: attempts per source per minute, in bounded memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most distinct source addresses the rate limiter remembers; beyond it, the oldest are
/// forgotten (a flood of spoofed sources cannot grow memory).
const MAX_TRACKED_SOURCES: usize = 65_536;

/// Join attempts per source address per minute.
pub struct JoinLimiter {
    per_minute: u32,
    seen: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl JoinLimiter {
    pub fn new(per_minute: u32) -> Self {
        JoinLimiter {
            per_minute,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Counts an attempt; false when the source is over its limit. IPv6 sources count by
    /// their /64: one host usually has a whole /64, and could otherwise rotate addresses.
    pub fn allow(&self, ip: IpAddr) -> bool {
        let ip = source_key(ip);
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        let now = Instant::now();
        if seen.len() >= MAX_TRACKED_SOURCES {
            seen.retain(|_, (start, _)| now.duration_since(*start) < Duration::from_secs(60));
            if seen.len() >= MAX_TRACKED_SOURCES {
                return false;
            }
        }
        let entry = seen.entry(ip).or_insert((now, 0));
        if now.duration_since(entry.0) >= Duration::from_secs(60) {
            *entry = (now, 0);
        }
        entry.1 += 1;
        entry.1 <= self.per_minute
    }
}

/// What the rate limit counts a source as: IPv4 addresses one by one (an IPv4-mapped IPv6
/// address as its IPv4 one), IPv6 addresses by /64.
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv6_sources_count_by_their_64() {
        let l = JoinLimiter::new(2);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(l.allow(a));
        assert!(l.allow(b));
        assert!(!l.allow(a), "a third attempt from the same /64");
        assert!(l.allow(other), "another /64 has its own budget");
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert!(l.allow(v4));
        assert!(l.allow(mapped));
        assert!(!l.allow(v4), "a mapped address counts as its IPv4 one");
    }
}
