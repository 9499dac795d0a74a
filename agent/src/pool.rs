//! The tunnels that are up, and the choice of one for each new connection.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tether_common::transport::Tunnel;

/// One live tunnel to one server.
#[derive(Debug)]
pub struct Link {
    /// The server as configured (`host:port`).
    pub server: String,
    pub tunnel: Tunnel,
    pub since: Instant,
    streams: AtomicUsize,
}

impl Link {
    pub fn new(server: String, tunnel: Tunnel) -> Self {
        Link {
            server,
            tunnel,
            since: Instant::now(),
            streams: AtomicUsize::new(0),
        }
    }

    /// Streams open through this link now.
    pub fn streams(&self) -> usize {
        self.streams.load(Ordering::Relaxed)
    }

    /// Counts a stream for as long as the guard lives.
    pub fn stream_guard(self: &Arc<Self>) -> StreamGuard {
        self.streams.fetch_add(1, Ordering::Relaxed);
        StreamGuard(self.clone())
    }
}

pub struct StreamGuard(Arc<Link>);

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.streams.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The live links.
#[derive(Debug, Default)]
pub struct Pool {
    links: Mutex<Vec<Arc<Link>>>,
}

impl Pool {
    pub fn add(&self, link: Arc<Link>) {
        self.lock().push(link);
    }

    pub fn remove(&self, link: &Arc<Link>) {
        self.lock().retain(|l| !Arc::ptr_eq(l, link));
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The links in the order to try them for a new connection: fewest open streams first
    /// (spreading load), ties broken by the order the servers were configured in.
    pub fn candidates(&self) -> Vec<Arc<Link>> {
        let mut v = self.lock().clone();
        v.sort_by_key(|l| l.streams());
        v
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Link>>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }
}
