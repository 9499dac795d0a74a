//! Process plumbing shared by both binaries: flags and settings files, logging and metric
//! primitives, systemd notification, the runtime, shutdown, and units.
#![forbid(unsafe_code)]

pub mod cli;
pub mod config_file;
pub mod diagnose;
pub mod notify;
pub mod runtime;
pub mod shutdown;
pub mod telemetry;
pub mod units;

/// The release, as both binaries report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
