//! What tether's tests (`tether-tests`, on tokio, failing by panics) and `tether-bench` (on
//! threads, failing with errors) share, written once, on plain threads and blocking sockets so
//! that both can use it: processes started with their logs kept and killed when dropped
//! ([`process`]), free loopback ports, a real etcd cluster ([`etcd`]), a gate that can cut or
//! silence one way to a service ([`gate`]), and the echo and sink upstreams ([`upstream`]).
//!
//! Errors are [`KitError`]: the bench carries them up, the tests panic with them.
#![forbid(unsafe_code)]

pub mod etcd;
pub mod gate;
pub mod process;
pub mod upstream;

pub use process::{free_port, run, Proc};

/// Why a piece of the kit could not do its work.
#[derive(Debug, thiserror::Error)]
pub enum KitError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{command} failed ({status}): {stdout}{stderr}")]
    Failed {
        command: String,
        status: std::process::ExitStatus,
        stdout: String,
        stderr: String,
    },
    #[error("{0} exited ({1}); see its log")]
    Exited(String, std::process::ExitStatus),
    #[error(transparent)]
    Certificate(#[from] tether_trust::CertError),
}

impl KitError {
    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> KitError {
        let what = what.into();
        move |source| KitError::Io { what, source }
    }
}
