//! Link keeping: one tunnel per server kept up (dialing QUIC, then TLS over TCP, and again with
//! backoff), the pool of live tunnels an agent chooses from, and the liveness watch that tells
//! a dead server from a dead link, with the monitor that drives it.
#![forbid(unsafe_code)]

pub mod backoff;
mod dial;
pub mod latency;
pub mod lifecycle;
pub mod liveness;
pub mod monitor;
pub mod pool;
pub mod proxy;
pub mod reconnect;

/// How long a connection waits for its peer's next tunnel when it finds none (the agent's
/// `--reconnect-grace` default, and the egress proxy's wait for a node gone for a moment): an
/// agent restarting, a link falling back to TCP or moving to a renewed certificate is back
/// within a second or two.
pub const RECONNECT_GRACE: std::time::Duration = std::time::Duration::from_secs(3);
