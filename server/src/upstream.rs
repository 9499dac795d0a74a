//! The server's way to its kube-apiserver: connecting for a stream, and checking its health.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{lookup_host, TcpStream};

/// Where streams go, and whether the last check found it reachable.
#[derive(Debug)]
pub struct Upstream {
    addr: String,
    connect_timeout: Duration,
    healthy: AtomicBool,
}

impl Upstream {
    pub fn new(addr: String, connect_timeout: Duration) -> Self {
        Upstream {
            addr,
            connect_timeout,
            healthy: AtomicBool::new(false),
        }
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Connects to the upstream (every address its name resolves to, in order) within the
    /// connect timeout.
    pub async fn connect(&self) -> io::Result<TcpStream> {
        let attempt = async {
            let mut last = io::Error::new(io::ErrorKind::NotFound, "name resolved to no address");
            for addr in lookup_host(&self.addr).await? {
                match TcpStream::connect(addr).await {
                    Ok(s) => {
                        let _ = s.set_nodelay(true);
                        return Ok(s);
                    }
                    Err(e) => last = e,
                }
            }
            Err(last)
        };
        match tokio::time::timeout(self.connect_timeout, attempt).await {
            Ok(r) => r,
            Err(_) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no connection within {:?}", self.connect_timeout),
            )),
        }
    }

    /// Checks the upstream every `interval` until the task is dropped, logging each change.
    pub async fn watch(self: Arc<Self>, interval: Duration, on_change: impl Fn(bool)) {
        let mut first = true;
        loop {
            let ok = match self.connect().await {
                Ok(_) => true,
                Err(e) => {
                    if self.is_healthy() || first {
                        tracing::warn!(upstream = %self.addr, error = %e, "upstream unhealthy");
                    }
                    false
                }
            };
            let was = self.healthy.swap(ok, Ordering::Relaxed);
            if ok && (!was || first) {
                tracing::info!(upstream = %self.addr, "upstream healthy");
            }
            if was != ok || first {
                on_change(ok);
            }
            first = false;
            tokio::time::sleep(interval).await;
        }
    }
}
