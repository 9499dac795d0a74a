//! Process plumbing: what every long-running binary needs around its real work.
//!
//! Flags and help ([`cli`]), settings files ([`config_file`]), durations and times ([`units`]),
//! logging and metrics ([`telemetry`]), systemd readiness ([`notify`]), the runtime
//! ([`runtime`]) and an orderly stop ([`shutdown`]).

pub mod cli;
pub mod config_file;
pub mod notify;
pub mod runtime;
pub mod shutdown;
pub mod telemetry;
pub mod units;
