//! Caps on the connections a listener holds: in all, and per client.
//!
//! The overall cap keeps the process bounded; the per-client cap keeps one client from taking
//! every slot, so a stalled or hostile client cannot lock the others out. A client is an IPv4
//! address, or an IPv6 /64 (one host usually has a whole /64 and could otherwise rotate
//! addresses within it): see [`source_key`].
//!
//! Where a full endpoint would otherwise refuse a real request because idle connections hold
//! the slots (4,200 idle connections from the address kube-apiserver itself uses once made its
//! real CONNECT fail), [`Eviction::OldestIdle`] closes the oldest connection that has not
//! finished its request head to make room for the newcomer instead.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// What a client counts as: an IPv4 address (an IPv4-mapped IPv6 address as its IPv4 one), or
/// an IPv6 address's /64.
pub fn source_key(ip: IpAddr) -> IpAddr {
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

/// What a full endpoint does with a newcomer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Eviction {
    /// Refuse it.
    None,
    /// Close the oldest connection (of the same client when that client is full, else of any)
    /// that has not finished its request head, and take the newcomer; refuse it only when
    /// every connection has.
    OldestIdle,
}

#[derive(Debug)]
struct Held {
    id: u64,
    /// Still reading its request head: may be closed to make room.
    idle: bool,
    evict: Arc<Notify>,
}

#[derive(Debug, Default)]
struct Inner {
    next: u64,
    count: usize,
    by_client: HashMap<IpAddr, Vec<Held>>,
}

/// Counts connections, up to `total` in all and `per_client` per client.
#[derive(Debug)]
pub struct ClientSlots {
    total: usize,
    per_client: usize,
    eviction: Eviction,
    inner: Mutex<Inner>,
}

/// One connection's slot, given back when dropped.
#[derive(Debug)]
pub struct ClientSlot {
    slots: Arc<ClientSlots>,
    client: IpAddr,
    id: u64,
    evict: Arc<Notify>,
}

impl ClientSlots {
    pub fn new(total: usize, per_client: usize, eviction: Eviction) -> Arc<Self> {
        Arc::new(ClientSlots {
            total,
            per_client,
            eviction,
            inner: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A slot for a connection from `ip`, or `None` when there is no room (and, with
    /// [`Eviction::OldestIdle`], no idle connection to close for it). The map holds only
    /// clients with a connection open, so it is bounded by `total`.
    pub fn take(self: &Arc<Self>, ip: IpAddr) -> Option<ClientSlot> {
        let client = source_key(ip);
        let mut inner = self.lock();
        let mine = inner.by_client.get(&client).map_or(0, Vec::len);
        if mine >= self.per_client {
            self.evict_oldest(&mut inner, Some(client))?;
        } else if inner.count >= self.total {
            self.evict_oldest(&mut inner, None)?;
        }
        inner.next += 1;
        let id = inner.next;
        let evict = Arc::new(Notify::new());
        inner.by_client.entry(client).or_default().push(Held {
            id,
            idle: true,
            evict: evict.clone(),
        });
        inner.count += 1;
        Some(ClientSlot {
            slots: self.clone(),
            client,
            id,
            evict,
        })
    }

    /// Closes the oldest idle connection (of `client`, or of anyone) and frees its slot.
    fn evict_oldest(&self, inner: &mut Inner, client: Option<IpAddr>) -> Option<()> {
        if self.eviction == Eviction::None {
            return None;
        }
        let (key, id) = inner
            .by_client
            .iter()
            .filter(|(k, _)| client.is_none() || client == Some(**k))
            .flat_map(|(k, list)| list.iter().filter(|h| h.idle).map(move |h| (*k, h.id)))
            .min_by_key(|(_, id)| *id)?;
        let list = inner.by_client.get_mut(&key)?;
        let at = list.iter().position(|h| h.id == id)?;
        list.remove(at).evict.notify_one();
        if list.is_empty() {
            inner.by_client.remove(&key);
        }
        inner.count -= 1;
        Some(())
    }

    /// Connections held now, in all and by the client of `ip`.
    pub fn held(&self, ip: IpAddr) -> (usize, usize) {
        let inner = self.lock();
        let mine = inner.by_client.get(&source_key(ip)).map_or(0, Vec::len);
        (inner.count, mine)
    }
}

impl ClientSlot {
    /// The connection has read its request head: from now on it is never closed for another.
    pub fn head_done(&self) {
        let mut inner = self.slots.lock();
        if let Some(h) = inner
            .by_client
            .get_mut(&self.client)
            .and_then(|l| l.iter_mut().find(|h| h.id == self.id))
        {
            h.idle = false;
        }
    }

    /// Resolves when the connection was closed to make room for a newer one: its task stops.
    pub async fn evicted(&self) {
        self.evict.notified().await
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        let mut inner = self.slots.lock();
        let Some(list) = inner.by_client.get_mut(&self.client) else {
            return;
        };
        let Some(at) = list.iter().position(|h| h.id == self.id) else {
            return; // evicted: already freed
        };
        list.remove(at);
        if list.is_empty() {
            inner.by_client.remove(&self.client);
        }
        inner.count -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_client_cannot_take_every_slot_and_ipv6_counts_by_64() {
        let slots = ClientSlots::new(100, 2, Eviction::None);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = slots.take(a).unwrap();
        let _s2 = slots.take(a).unwrap();
        assert!(slots.take(a).is_none());
        assert!(slots.take(b).is_some());
        drop(s1);
        assert!(slots.take(a).is_some());
        // Two addresses of one /64 are one client; another /64 is another.
        let _v1 = slots.take("2001:db8:1:2::1".parse().unwrap()).unwrap();
        let _v2 = slots.take("2001:db8:1:2::ffff".parse().unwrap()).unwrap();
        assert!(slots
            .take("2001:db8:1:2:aaaa::9".parse().unwrap())
            .is_none());
        assert!(slots.take("2001:db8:1:3::1".parse().unwrap()).is_some());
        // An IPv4-mapped address is its IPv4 one.
        assert_eq!(source_key("::ffff:192.0.2.1".parse().unwrap()), a);
    }

    #[tokio::test]
    async fn a_full_endpoint_closes_its_oldest_idle_connection_for_a_newcomer() {
        let slots = ClientSlots::new(3, 2, Eviction::OldestIdle);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let oldest = slots.take(a).unwrap();
        let busy = slots.take(a).unwrap();
        busy.head_done();
        // a is full: its oldest idle connection makes room, not the busy one.
        let third = slots.take(a).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), oldest.evicted())
            .await
            .expect("the oldest idle connection is told to close");
        assert_eq!(slots.held(a), (2, 2));
        drop(oldest);
        assert_eq!(slots.held(a), (2, 2), "an evicted slot is freed once");
        // Full in all: b's newcomer takes the oldest idle connection of anyone (a's third).
        let _b1 = slots.take(b).unwrap();
        let _b2 = slots.take(b).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(1), third.evicted())
            .await
            .expect("evicted for another client");
        // Nothing idle is left: refused.
        _b1.head_done();
        _b2.head_done();
        assert!(slots.take(b).is_none());
        drop(busy);
        assert!(slots.take(b).is_none(), "b is at its own cap");
        assert!(slots.take(a).is_some());
    }
}
