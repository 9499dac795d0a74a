//! The join rate limit: attempts per source per minute, in bounded memory.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tether_endpoint::client_slots::source_key;

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

/// Most renewals a node may make at once, and in a row before it must wait for the bucket to
/// refill.
pub const RENEWAL_BURST: u32 = 3;
/// The slowest refill of the renewal bucket: 3 renewals an hour.
pub const RENEWAL_REFILL_MAX: Duration = Duration::from_secs(20 * 60);

/// Renewals per node: at most one in flight, and a token bucket of [`RENEWAL_BURST`] refilled
/// one token per `refill`. A renewal writes the node's record (with etcd, a transaction that
/// every server then applies), so a node must not be able to drive writes into the store: one
/// tunnel once sent 150 renewals in half a second and got 150 certificates.
///
/// The rule takes the time as an input, so it is tested without waiting.
pub struct RenewalLimiter {
    refill: Duration,
    nodes: Mutex<HashMap<String, RenewalBucket>>,
}

#[derive(Debug, Clone, Copy)]
struct RenewalBucket {
    /// Tokens as of `at`.
    tokens: u32,
    at: Instant,
    in_flight: bool,
}

/// Why a renewal was not begun.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RenewalRefusal {
    #[error("a renewal of this node is already in progress; retry later")]
    InFlight,
    #[error("too many renewals of this node; retry in {0:?}")]
    Rate(Duration),
}

/// A renewal in progress: ends when dropped.
pub struct RenewalPermit<'a> {
    limiter: &'a RenewalLimiter,
    node: String,
}

impl Drop for RenewalPermit<'_> {
    fn drop(&mut self) {
        let mut nodes = self.limiter.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(b) = nodes.get_mut(&self.node) {
            b.in_flight = false;
        }
    }
}

impl RenewalLimiter {
    /// A node renews at two thirds of its certificate's life, so the refill follows the
    /// lifetime the server gives: a sixth of it (three renewals per renewal period, for lost
    /// answers and restarts), and never slower than [`RENEWAL_REFILL_MAX`].
    pub fn for_lifetime(agent_cert_lifetime: Duration) -> Self {
        let refill = (agent_cert_lifetime / 6).clamp(Duration::from_secs(1), RENEWAL_REFILL_MAX);
        RenewalLimiter {
            refill,
            nodes: Mutex::new(HashMap::new()),
        }
    }

    /// Begins a renewal of `node` at `now`, or says why not.
    pub fn begin(&self, node: &str, now: Instant) -> Result<RenewalPermit<'_>, RenewalRefusal> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner());
        if nodes.len() >= MAX_TRACKED_SOURCES && !nodes.contains_key(node) {
            // Full buckets hold nothing worth keeping.
            let (refill, burst) = (self.refill, RENEWAL_BURST);
            nodes.retain(|_, b| b.in_flight || now.duration_since(b.at) < refill * burst);
            if nodes.len() >= MAX_TRACKED_SOURCES {
                return Err(RenewalRefusal::Rate(self.refill));
            }
        }
        let b = nodes.entry(node.to_string()).or_insert(RenewalBucket {
            tokens: RENEWAL_BURST,
            at: now,
            in_flight: false,
        });
        if b.in_flight {
            return Err(RenewalRefusal::InFlight);
        }
        // Refill whole tokens since `at`, keeping the remainder of the interval.
        let elapsed = now.saturating_duration_since(b.at);
        let earned = (elapsed.as_nanos() / self.refill.as_nanos().max(1)) as u32;
        if earned > 0 {
            b.tokens = (b.tokens.saturating_add(earned)).min(RENEWAL_BURST);
            b.at = if b.tokens == RENEWAL_BURST {
                now
            } else {
                b.at + self.refill * earned
            };
        }
        if b.tokens == 0 {
            let wait = (b.at + self.refill).saturating_duration_since(now);
            return Err(RenewalRefusal::Rate(wait));
        }
        if b.tokens == RENEWAL_BURST {
            b.at = now;
        }
        b.tokens -= 1;
        b.in_flight = true;
        Ok(RenewalPermit {
            limiter: self,
            node: node.to_string(),
        })
    }
}

#[cfg(test)]
mod renewal_tests {
    use super::*;

    #[test]
    fn a_node_renews_one_at_a_time_and_at_most_its_burst_then_at_the_refill_rate() {
        let l = RenewalLimiter::for_lifetime(Duration::from_secs(365 * 86400));
        let t0 = Instant::now();
        let first = l.begin("a", t0).unwrap();
        assert_eq!(l.begin("a", t0).err(), Some(RenewalRefusal::InFlight));
        // Another node is not held up.
        drop(l.begin("b", t0).unwrap());
        drop(first);
        drop(l.begin("a", t0).unwrap());
        drop(l.begin("a", t0).unwrap());
        // The burst of 3 is spent: refused, with the wait until the next token.
        match l.begin("a", t0 + Duration::from_secs(60)) {
            Err(RenewalRefusal::Rate(wait)) => {
                assert_eq!(wait, RENEWAL_REFILL_MAX - Duration::from_secs(60))
            }
            other => panic!("{:?}", other.map(|_| ())),
        }
        // 150 attempts within the hour: one more at 20 minutes and one at 40.
        let mut granted = 0;
        for i in 0..150u64 {
            if l.begin("a", t0 + Duration::from_secs(i * 24)).is_ok() {
                granted += 1;
            }
        }
        assert_eq!(granted, 2);
    }

    #[test]
    fn the_refill_follows_the_certificate_lifetime() {
        // Five-minute certificates renew every 200 s: a token every 50 s keeps up.
        let l = RenewalLimiter::for_lifetime(Duration::from_secs(300));
        let t0 = Instant::now();
        for i in 0..20u64 {
            assert!(
                l.begin("a", t0 + Duration::from_secs(i * 100)).is_ok(),
                "{i}"
            );
        }
    }
}
