//! The parts of tether that both binaries share, grouped by what they are:
//!
//! - **the tunnel**: [`transport`] (one interface over QUIC and TLS-over-TCP), [`open`] (the
//!   `Open`/`Status` exchange that begins every relayed stream), [`relay`] (copying
//!   bytes between a TCP socket and a stream, with half-close and reset), [`tls`] (certificates,
//!   ALPN, the transports' settings), [`congestion`] (QUIC's BBR with a window that follows the
//!   link) and [`net`] (addresses and sockets);
//! - **link keeping** ([`link`]): dialing, reconnecting with backoff and choosing a server;
//! - **local endpoints** ([`endpoint`]): the one HTTP/1 request parser, per-client slots, and the
//!   admin endpoint (`/metrics`, `/healthz`, `/readyz`, `/status`);
//! - **process plumbing** ([`process`]): flags and settings files, logging and metrics, systemd
//!   notification, the runtime and shutdown;
//! - and what both binaries report: [`status`], the status document they serve and the `status`
//!   command reads, and [`metrics`], the metric families they share.
//!
//! The wire codecs are not here: they are the `tether-proto` crate, which has no I/O.
#![forbid(unsafe_code)]

pub mod congestion;
pub mod endpoint;
pub mod link;
pub mod metrics;
pub mod net;
pub mod open;
pub mod process;
pub mod relay;
pub mod status;
pub mod tls;
pub mod transport;

/// The version of this build, as shown in hellos, logs and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
