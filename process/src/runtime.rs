//! The async runtime of both binaries.
//!
//! One thread is the default for the agent: a node's agent carries kubelet's and kube-proxy's
//! traffic, which one core handles many times over, and on small VMs a wake-up that crosses
//! CPUs costs tens of microseconds, more than the relay's own work per round trip. Servers
//! carry many nodes and default to one thread per CPU. `--threads` overrides either.

/// Builds the runtime: `threads` 1 is a single-threaded runtime (no hand-offs between
/// threads), 0 one worker per CPU, any other number that many workers.
pub fn build(threads: usize) -> std::io::Result<tokio::runtime::Runtime> {
    match threads {
        1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        0 => tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
}
