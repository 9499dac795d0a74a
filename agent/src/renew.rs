//! Certificate renewal over a tunnel, when two thirds of the certificate's lifetime have passed.
//!
//! The agent makes a new key, sends a signing request on a stream of any tunnel (the tunnel's
//! certificate proves who it is), stores the new key and certificate, and uses them for the
//! tunnels it opens from then on. Tunnels that are up keep their TLS session: no stream drops.

use crate::config::AgentConfig;
use crate::metrics::Metrics;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tether_common::link::pool::Pool;
use tether_common::link::reconnect::Dialer;
use tether_common::process::shutdown::ShutdownSignal;
use tether_common::tls;
use tether_proto::{Message, StatusCode};
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

async fn renew(
    config: &AgentConfig,
    node_name: &str,
    pool: &Pool,
    dialer: &Dialer,
) -> Result<i64, String> {
    let link = pool
        .all()
        .into_iter()
        .next()
        .ok_or("no tunnel is up to renew through")?;
    let (csr, key_pem) = tether_certs::make_csr(node_name).map_err(|e| e.to_string())?;
    let exchange = async {
        let mut s = link.tunnel.open_stream().await.map_err(|e| e.to_string())?;
        s.send
            .write_message(&Message::Renew { csr })
            .await
            .map_err(|e| e.to_string())?;
        s.send.finish().await;
        s.recv.read_message().await.map_err(|e| e.to_string())
    };
    let answer = tokio::time::timeout(Duration::from_secs(15), exchange)
        .await
        .map_err(|_| "no answer within 15 s".to_string())??;
    let cert_pem = match answer {
        Some(Message::Certificate {
            code: StatusCode::Ok,
            cert_pem,
            ..
        }) => cert_pem,
        Some(Message::Certificate { message, .. }) => return Err(format!("refused: {message}")),
        other => return Err(format!("unexpected answer: {other:?}")),
    };
    // Checked against the pinned CA before it touches the disk: a bad answer is logged by the
    // caller, and the old identity stays.
    let ca_pem = std::fs::read_to_string(&config.ca)
        .map_err(|e| format!("cannot read the pinned CA {}: {e}", config.ca.display()))?;
    tether_certs::check_issued(&cert_pem, &ca_pem, node_name, &key_pem, now())
        .map_err(|e| e.to_string())?;
    // A crash while storing leaves a matching pair: the old one, or the new one.
    tether_certs::write_identity(&config.cert, &config.key, &cert_pem, &key_pem)
        .map_err(|e| e.to_string())?;
    let roots = tls::load_roots(&config.ca).map_err(|e| e.to_string())?;
    let identity = tls::Identity::load(&config.cert, &config.key).map_err(|e| e.to_string())?;
    let client = tls::client_config(roots, identity).map_err(|e| e.to_string())?;
    let quic = tls::quic_client_config(
        client.clone(),
        tls::quic_transport(config.liveness, config.limits),
    )
    .map_err(|e| e.to_string())?;
    dialer.set_client_config(quic, client);
    Ok(due(config).map(|(_, exp)| exp).unwrap_or(0))
}
