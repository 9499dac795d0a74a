//! Link keeping: how an agent (or a server, towards its peers) keeps one tunnel up to each server
//! it knows, and picks one for each new stream.
//!
//! [`reconnect`] dials, redials with [`backoff`] and hands each live tunnel to the [`pool`], which
//! chooses among them; [`latency`] learns how fast each server answers an open, for hedging;
//! [`liveness`] tells a dead server from a dead link, and [`monitor`] applies its verdicts.

pub mod backoff;
pub mod latency;
pub mod liveness;
pub mod monitor;
pub mod pool;
pub mod reconnect;
