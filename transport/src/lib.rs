//! The tunnel: one interface over QUIC and TLS over TCP ([`transport`]), the `Open`/`Status`
//! exchange that begins every relayed stream ([`open`]), the one relay that copies bytes both
//! ways with half-close and reset ([`relay`]), certificates, ALPN and the transports' settings
//! ([`tls`]), QUIC's BBR with a window that follows the link ([`congestion`]), and the metric
//! families of what is relayed, which both binaries expose ([`metrics`]).
//!
//! The wire codecs are not here: they are `tether-proto`, which has no I/O.
#![forbid(unsafe_code)]

pub mod congestion;
pub mod metrics;
pub mod open;
pub mod relay;
pub mod tls;
pub mod transport;
