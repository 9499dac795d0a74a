//! What a running server shares among its tasks: its settings, the registry of tunnels, the
//! upstreams, the limits, the records and the links to its peers. Built once by
//! `start`; every room of the server reads it, none owns it.

use crate::announce::Announcer;
use crate::authority::Authority;
use crate::config::ServerConfig;
use crate::join_rate::JoinLimiter;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::upstream::Upstream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tether_link::pool::Pool;
use tether_link::reconnect::Dialer;
use tokio::sync::Semaphore;

/// Shared state of a running server.
pub struct State {
    pub(crate) config: ServerConfig,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) registry: Registry,
    pub(crate) upstream: Arc<Upstream>,
    /// The named upstreams besides the apiserver (`--service`); not health-checked.
    pub(crate) services: std::collections::HashMap<String, Arc<Upstream>>,
    pub(crate) streams: Arc<Semaphore>,
    /// Handshakes in progress, both transports (at most `MAX_HANDSHAKES`, see `accept`).
    pub(crate) handshakes: Arc<tether_endpoint::client_slots::ClientSlots>,
    /// Join connections being served (at most `MAX_JOINS`, see `accept`).
    pub(crate) joins: Arc<Semaphore>,
    /// Random per process start: tells this server apart from its peers, and from itself.
    pub(crate) instance_id: String,
    /// When this server started serving: in its first moments it has not yet seen the nodes
    /// that are on their way back to it (see `egress::route`).
    pub(crate) started: std::time::Instant,
    /// Links this server dialed to its peers.
    pub(crate) peers: Arc<Pool>,
    pub(crate) announcer: Announcer,
    pub(crate) draining: AtomicBool,
    /// Streams past the drain check and not yet relaying (reaching an upstream, answering):
    /// a drain waits for them too, or it would close the tunnel under a stream it let in.
    pub(crate) opening: tether_process::telemetry::Gauge,
    pub(crate) authority: Arc<Authority>,
    pub(crate) join_limiter: JoinLimiter,
    /// Renewals per node: one at a time, and a rate (see `RenewalLimiter`).
    pub(crate) renewals: crate::join_rate::RenewalLimiter,
    /// The CAs this server issues from and trusts (see `ca`); changed when the files change.
    pub(crate) trust: tokio::sync::watch::Sender<crate::trust::Trust>,
    /// The datastore's CA rotation record, as `ca::follow` last read it.
    pub(crate) rotation: std::sync::RwLock<Option<tether_trust::rotation::Rotation>>,
    pub(crate) endpoint: quinn::Endpoint,
    /// The dialer of peer links, whose client identity is reloaded with the certificate.
    pub(crate) peer_dialer: std::sync::OnceLock<Arc<Dialer>>,
    /// TLS for tunnels over TCP; replaced when the certificate is reloaded.
    pub(crate) tcp_tls: std::sync::RwLock<tokio_rustls::TlsAcceptor>,
    /// One line per second for failures anyone on the network can cause (handshakes that
    /// fail or stall); `left_out` in the next line counts the rest.
    pub(crate) noisy_log: tether_process::telemetry::Throttle,
}

/// Who is on the other end of an inbound tunnel.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Party {
    Agent,
    Peer,
}
