//! Link keeping: how an agent (or a server, towards its peers) keeps one tunnel up to each server
//! it knows, and picks one for each new stream.
//!
//! [`reconnect`] dials, redials with [`backoff`] and hands each live tunnel to the [`pool`], which
//! chooses among them; [`latency`] learns how fast each server answers an open, for hedging.

pub mod backoff;
pub mod latency;
pub mod pool;
pub mod reconnect;
