//! The local listener: each accepted connection becomes a stream through the best tunnel.

use crate::metrics::{Metrics, OpenFailure};
use std::sync::Arc;
use std::time::Duration;
use tether_common::link::pool::{Link, Policy, Pool};
use tether_common::open::{self, OpenError};
use tether_common::process::shutdown::ShutdownSignal;
use tether_common::process::telemetry::GaugeGuard;
use tether_common::relay::{self, Outcome};
use tether_common::transport::Stream;
use tether_proto::Target;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// Settings of the forwarder.
#[derive(Debug, Clone)]
pub struct Forwarding {
    /// The server-side service each connection is carried to.
    pub service: String,
    pub policy: Policy,
    pub stream_open_timeout: Duration,
    pub last_attempt_timeout: Duration,
    pub max_connections: usize,
}

/// Accepts local connections until shutdown.
pub async fn serve(
    listener: TcpListener,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    settings: Forwarding,
    mut stop: ShutdownSignal,
) {
    let limit = Arc::new(Semaphore::new(settings.max_connections));
    let settings = Arc::new(settings);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait() => return,
        };
        let (conn, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                // Out of file descriptors, mostly: wait a little rather than spin.
                warn!(error = %e, "local accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        metrics.connections_accepted.inc();
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            metrics.connections_over_limit.inc();
            warn!(%peer, limit = settings.max_connections, "connection limit reached; resetting new connection");
            reset(conn);
            continue;
        };
        let (pool, metrics, settings) = (pool.clone(), metrics.clone(), settings.clone());
        tokio::spawn(async move {
            forward(conn, &pool, &metrics, &settings).await;
            drop(permit);
        });
    }
}

/// Closes a connection with a reset, so that the client fails fast instead of waiting.
fn reset(conn: TcpStream) {
    let _ = conn.set_zero_linger();
}

async fn forward(conn: TcpStream, pool: &Pool, metrics: &Metrics, settings: &Forwarding) {
    let candidates = pool.candidates(settings.policy);
    let count = candidates.len();
    for (i, link) in candidates.into_iter().enumerate() {
        let last = i + 1 == count;
        let wait = if last {
            settings.last_attempt_timeout
        } else {
            settings.stream_open_timeout
        };
        match open(&link, &settings.service, wait).await {
            Ok(stream) => {
                if i > 0 {
                    metrics.failovers.inc();
                }
                let _guard = link.stream_guard();
                let _open = GaugeGuard::new(&metrics.shared.streams_open);
                metrics.shared.streams_total.inc();
                let summary = relay::relay(conn, stream, &[&metrics.shared.bytes]).await;
                if summary.outcome != Outcome::Closed {
                    metrics.shared.stream_resets.inc();
                }
                debug!(server = %link.server, sent = summary.to_tunnel, received = summary.from_tunnel,
                    outcome = ?summary.outcome, "stream done");
                return;
            }
            Err((why, detail)) => {
                metrics.open_failed(why);
                debug!(server = %link.server, reason = %detail, "stream open failed");
                if !last {
                    metrics.retries.inc();
                }
            }
        }
    }
    if count == 0 {
        metrics.open_failed(OpenFailure::NoTunnel);
    }
    metrics.connections_failed.inc();
    warn!(
        tunnels = count,
        "no server could carry a new connection; resetting it"
    );
    reset(conn);
}

/// Opens a stream and waits for the server's status. Nothing is read from the local client
/// until this succeeds, so a retry on another server loses no byte.
async fn open(link: &Link, service: &str, wait: Duration) -> Result<Stream, (OpenFailure, String)> {
    let target = Target::Service(service.into());
    open::open(&link.tunnel, target, 0, wait)
        .await
        .map_err(|e| {
            let why = match e {
                OpenError::Tunnel(_) => OpenFailure::TunnelLost,
                OpenError::Refused { .. } | OpenError::Protocol(_) => OpenFailure::Refused,
                OpenError::TimedOut(_) => OpenFailure::Timeout,
            };
            (why, e.to_string())
        })
}
