//! Certificate renewal over a tunnel, when two thirds of the certificate's lifetime have passed.
//!
//! The agent makes a new key, sends a signing request on a stream of any tunnel (the tunnel's
//! certificate proves who it is), stores the new key and certificate, and uses them for the
//! tunnels it opens from then on. Tunnels that are up keep their TLS session: no stream drops.

use crate::config::AgentConfig;
use crate::metrics::Metrics;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tether_link::pool::Pool;
use tether_link::reconnect::Dialer;
use tether_process::shutdown::ShutdownSignal;
use tether_proto::{Message, StatusCode};
use tether_transport::tls;
use tracing::{info, warn};

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// When the certificate on disk is due for renewal (Unix seconds), and when it expires.
fn due(config: &AgentConfig) -> Option<(i64, i64)> {
    let info = tls::load_certs(&config.cert)
        .ok()?
        .first()
        .and_then(tls::peer_info)?;
    let life = info.not_after - info.not_before;
    Some((info.not_before + life * 2 / 3, info.not_after))
}

/// Renews whenever due, until shutdown.
pub async fn run(
    config: AgentConfig,
    node_name: String,
    pool: Arc<Pool>,
    dialer: Arc<Dialer>,
    metrics: Arc<Metrics>,
    mut stop: ShutdownSignal,
) {
    loop {
        let wait = match due(&config) {
            Some((due, expiry)) => {
                metrics.shared.cert_expiry.set(expiry);
                Duration::from_secs(due.saturating_sub(now()).max(0) as u64)
            }
            None => Duration::from_secs(60),
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait() => return,
        }
        if due(&config).is_some_and(|(d, _)| d > now()) {
            continue; // renewed meanwhile (or the clock moved)
        }
        match renew(&config, &node_name, &pool, &dialer).await {
            Ok(until) => {
                metrics.shared.renewals.inc();
                info!(node = %node_name, valid_until = until, "renewed the agent certificate");
            }
            Err(e) => {
                warn!(node = %node_name, error = %e, "certificate renewal failed; retrying in 10 s");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(10)) => {}
                    _ = stop.wait() => return,
                }
            }
        }
    }
}

/// Why a renewal failed; the old identity stays, and the agent tries again.
#[derive(Debug, thiserror::Error)]
pub enum RenewError {
    #[error("no tunnel is up to renew through")]
    NoTunnel,
    #[error("cannot make a key and request: {0}")]
    Request(tether_trust::CertError),
    #[error("cannot open a stream for the renewal: {0}")]
    Open(#[from] tether_transport::transport::TransportError),
    #[error("the renewal's stream failed: {0}")]
    Stream(#[from] tether_transport::transport::StreamError),
    #[error("the renewal's answer could not be read: {0}")]
    Frame(#[from] tether_transport::transport::FrameError),
    #[error("no answer within {0:?}")]
    TimedOut(Duration),
    #[error("refused: {0}")]
    Refused(String),
    #[error("unexpected answer: {0}")]
    Unexpected(&'static str),
    #[error("cannot read the pinned CA {path}: {source}")]
    Ca {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the new certificate does not check out: {0}")]
    Issued(tether_trust::CertError),
    #[error("cannot store the new identity: {0}")]
    Store(tether_trust::CertError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
}

/// How long a renewal's exchange may take.
const RENEW_TIMEOUT: Duration = Duration::from_secs(15);

async fn renew(
    config: &AgentConfig,
    node_name: &str,
    pool: &Pool,
    dialer: &Dialer,
) -> Result<i64, RenewError> {
    let link = pool.all().into_iter().next().ok_or(RenewError::NoTunnel)?;
    let (csr, key_pem) = tether_trust::make_csr(node_name).map_err(RenewError::Request)?;
    let exchange = async {
        let mut s = link.tunnel.open_stream().await?;
        s.send.write_message(&Message::Renew { csr }).await?;
        s.send.finish().await;
        Ok::<_, RenewError>(s.recv.read_message().await?)
    };
    let answer = tokio::time::timeout(RENEW_TIMEOUT, exchange)
        .await
        .map_err(|_| RenewError::TimedOut(RENEW_TIMEOUT))??;
    let cert_pem = match answer {
        Some(Message::Certificate {
            code: StatusCode::Ok,
            cert_pem,
            ..
        }) => cert_pem,
        Some(Message::Certificate { message, .. }) => return Err(RenewError::Refused(message)),
        Some(other) => return Err(RenewError::Unexpected(other.name())),
        None => return Err(RenewError::Unexpected("the end of the stream")),
    };
    // Checked against the pinned CA before it touches the disk: a bad answer is logged by the
    // caller, and the old identity stays.
    let ca_pem = std::fs::read_to_string(&config.ca).map_err(|source| RenewError::Ca {
        path: config.ca.clone(),
        source,
    })?;
    tether_trust::check_issued(&cert_pem, &ca_pem, node_name, &key_pem, now())
        .map_err(RenewError::Issued)?;
    // A crash while storing leaves a matching pair: the old one, or the new one.
    tether_trust::write_identity(&config.cert, &config.key, &cert_pem, &key_pem)
        .map_err(RenewError::Store)?;
    let roots = tls::load_roots(&config.ca)?;
    let identity = tls::Identity::load(&config.cert, &config.key)?;
    let client = tls::client_config(roots, identity, config.limits.post_quantum)?;
    let quic = tls::quic_client_config(
        client.clone(),
        tls::quic_transport(config.liveness, config.limits),
    )?;
    dialer.set_client_config(quic, client);
    Ok(due(config).map(|(_, exp)| exp).unwrap_or(0))
}
