//! A running server's handle: its addresses, and the drain, reload and shutdown an operator
//! (or a test) asks of it.

use crate::error::ServerError;
use crate::identity;
use crate::metrics::Metrics;
use crate::state::State;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_process::shutdown::{self, Shutdown};
use tether_proto::code;
use tokio::task::JoinSet;
use tracing::info;

/// A running server.
pub struct ServerHandle {
    /// The address the listeners are bound to: QUIC on its UDP port, TLS over TCP on its TCP port.
    pub local_addr: SocketAddr,
    /// The admin endpoint's address, when one was asked for.
    pub admin_addr: Option<SocketAddr>,
    /// The egress proxy's TCP address, when one was asked for.
    pub egress_addr: Option<SocketAddr>,
    pub(crate) state: Arc<State>,
    pub(crate) shutdown: Shutdown,
    pub(crate) endpoint: quinn::Endpoint,
    pub(crate) tasks: JoinSet<()>,
}

impl ServerHandle {
    pub fn metrics(&self) -> &Metrics {
        &self.state.metrics
    }

    /// Names of the nodes connected now.
    pub fn connected_nodes(&self) -> Vec<String> {
        self.state.registry.node_names()
    }

    /// Streams this server let in that are not relaying yet (reaching their upstream): a drain
    /// waits for them too.
    pub fn streams_opening(&self) -> i64 {
        self.state.opening.get()
    }

    /// Peers this server has a link to now.
    pub fn peers_up(&self) -> usize {
        self.state.peers.len()
    }

    /// The address this server announces for itself.
    pub fn advertise(&self) -> Option<String> {
        self.state.announcer.advertise().map(String::from)
    }

    /// Tells agents and peers that this server is draining, refuses new tunnels and streams,
    /// lets open streams finish for up to `timeout`, then shuts down. Returns how many streams
    /// were still open at the end.
    pub async fn drain(self, timeout: Duration) -> i64 {
        let open = self.state.metrics.shared.streams_open.get();
        info!(timeout = ?timeout, open, "draining: agents and peers are told to send no new streams");
        self.state.draining.store(true, Ordering::Relaxed);
        self.state.metrics.shared.draining.set(1);
        self.state.announcer.set_draining();
        let start = Instant::now();
        // Streams an agent sent before it heard of the drain are still on their way: they must
        // find the tunnels up and be answered `draining` (the agent retries elsewhere), not be
        // cut by the close. Across a 60 ms edge link the soak saw new connections reset when an
        // idle server closed at once. So the drain lasts two of the slowest round trips at
        // least (see `drain_notice`).
        let notice = drain_notice(&self.state).min(timeout);
        let busy = |s: &State| s.metrics.shared.streams_open.get() > 0 || s.opening.get() > 0;
        let state = &self.state;
        shutdown::wait_while(timeout, || start.elapsed() < notice || busy(state)).await;
        let left = self.state.metrics.shared.streams_open.get() + self.state.opening.get();
        self.shutdown().await;
        left
    }

    /// Reloads the certificate and key from disk (SIGHUP): new handshakes use them, tunnels
    /// that are up keep going.
    pub fn reload_certificates(&self) -> Result<(), ServerError> {
        identity::reload_certificates(&self.state)
    }

    /// Closes every tunnel and stops serving.
    pub async fn shutdown(mut self) {
        self.shutdown.trigger();
        self.state
            .registry
            .close_all(code::SHUTDOWN, "server shutting down");
        self.endpoint.close(
            quinn::VarInt::from_u32(code::SHUTDOWN),
            b"server shutting down",
        );
        self.tasks.shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// The least a drain lasts: two round trips of the slowest agent tunnel and a margin, for the
/// streams sent before the drain was heard of to arrive; at most [`DRAIN_NOTICE_MAX`].
fn drain_notice(state: &State) -> Duration {
    let slowest = state
        .registry
        .snapshot()
        .iter()
        .flat_map(|(_, entries)| entries.iter().map(|e| e.tunnel.rtt()))
        .max()
        .unwrap_or_default();
    (slowest * 2 + Duration::from_millis(100)).min(DRAIN_NOTICE_MAX)
}

/// The longest [`drain_notice`]: a satellite round trip and some.
const DRAIN_NOTICE_MAX: Duration = Duration::from_secs(2);
