//! Shared pieces of tether: the wire protocol, the transports, the relay, TLS set-up, telemetry
//! and the admin endpoint.
#![forbid(unsafe_code)]

pub mod admin;
pub mod backoff;
pub mod cli;
pub mod client_slots;
pub mod config_file;
pub mod http;
pub mod net;
pub mod notify;
pub mod pool;
pub mod protocol;
pub mod reconnect;
pub mod relay;
pub mod runtime;
pub mod shutdown;
pub mod stream_framing;
pub mod tcp;
pub mod telemetry;
pub mod tls;
pub mod transport;
pub mod units;

/// The version of this build, as shown in hellos, logs and `--version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
