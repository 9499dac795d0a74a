//! Link keeping: how an agent (or a server, towards its peers) keeps one tunnel up to each server
//! it knows, and picks one for each new stream.
//!
//! [`reconnect`] dials, redials with [`backoff`] and hands each live tunnel to the [`pool`], which
//! chooses among them; [`latency`] learns how fast each server answers an open, for hedging;
//! [`liveness`] tells a dead server from a dead link, and [`monitor`] applies its verdicts.

pub mod backoff;
mod dial;
pub mod latency;
pub mod liveness;
pub mod monitor;
pub mod pool;
pub mod reconnect;

/// How long a connection waits for its peer's next tunnel when it finds none (the agent's
/// `--reconnect-grace` default, and the egress proxy's wait for a node gone for a moment): an
/// agent restarting, a link falling back to TCP or moving to a renewed certificate is back
/// within a second or two.
pub const RECONNECT_GRACE: std::time::Duration = std::time::Duration::from_secs(3);
