//! Certificate renewal over a tunnel, when two thirds of the certificate's lifetime have passed,
//! or at once when a server asks (`RenewNow`: a CA rotation).
//!
//! The agent makes a new key, sends a signing request on a stream of any tunnel (the tunnel's
//! certificate proves who it is), stores the new key and certificate, and uses them for the
//! tunnels it opens from then on. Tunnels that are up keep their TLS session: no stream drops.
//!
//! The answer carries the CAs the server trusts. They replace `ca.crt` when they differ: the
//! tunnel the answer came on was verified against the CAs this node trusted, so the server is
//! the cluster's, and this is how a CA rotation reaches the node (both CAs while it runs, the
//! new one alone once it finished).

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

/// A server's `RenewNow`: renew unless the certificate is from `issuer` and `ca.crt` holds
/// exactly the CAs in `trusted`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    /// The server it came from: the renewal goes through its tunnel, since it holds the CA.
    pub server: String,
    pub issuer: String,
    pub trusted: Vec<String>,
}

/// Asks waiting for the renewal loop; a full queue drops the newest (each server asks again
/// when its CAs change).
pub const ASKS: usize = 16;

/// Least time between two renewals a server asked for: every server of the cluster asks at
/// once, and a server that keeps asking must not make its node renew in a loop.
pub const ASKED_GAP: Duration = Duration::from_secs(30);

/// What a node does about an [`Ask`].
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// Its certificate is from the issuer and it trusts no CA the server does not.
    Nothing,
    /// Its certificate is from the issuer; it drops the CAs the server trusts no more (the end
    /// of a rotation): `ca.crt` becomes this. A renewal would give it nothing more, and would
    /// move its name to a third key while streams from before the rotation may still run on
    /// tunnels of the first.
    Drop(String),
    /// Its certificate is from another CA: a new one, from the server that asked.
    Renew,
}

impl Ask {
    fn answer(&self, config: &AgentConfig) -> Answer {
        let Ok(bundle) = std::fs::read_to_string(&config.ca) else {
            return Answer::Renew;
        };
        // The CA this node's certificate is from, among those it trusts.
        let mine = tls::load_certs(&config.cert)
            .ok()
            .and_then(|c| c.into_iter().next())
            .and_then(|c| tether_trust::rotation::Cas::parse(&bundle).issuer_of(&c));
        match mine {
            Some(m) if m == self.issuer => {}
            // A server that does not trust this node's CA is one that has not heard of a
            // rotation yet (a tunnel from before it): renewing there would go backwards.
            Some(m) if !self.trusted.contains(&m) => return Answer::Nothing,
            _ => return Answer::Renew,
        }
        // Trusting fewer CAs than the server is fine (a node that joined with a token made
        // after the rotation started has no use for the old CA); trusting more is not. The
        // message only ever takes trust away.
        let held = tether_trust::rotation::hashes(&bundle);
        if held.iter().all(|h| self.trusted.contains(h)) {
            Answer::Nothing
        } else {
            Answer::Drop(tether_trust::rotation::keep(&bundle, &self.trusted))
        }
    }
}

/// Renews whenever due, and when a server asks, until shutdown.
pub async fn run(
    config: AgentConfig,
    node_name: String,
    pool: Arc<Pool>,
    dialer: Arc<Dialer>,
    metrics: Arc<Metrics>,
    mut asks: tokio::sync::mpsc::Receiver<Ask>,
    mut stop: ShutdownSignal,
) {
    let mut asked: Option<Ask> = None;
    let mut last_asked: Option<tokio::time::Instant> = None;
    loop {
        let wait = match due(&config) {
            Some((due, expiry)) => {
                metrics.shared.cert_expiry.set(expiry);
                Duration::from_secs(due.saturating_sub(now()).max(0) as u64)
            }
            None => Duration::from_secs(60),
        };
        // An ask for a renewal waits out the gap since the last one; any other at once.
        let gap = last_asked.map(|t| t + ASKED_GAP);
        let wait = match (asked.as_ref().map(|a| a.answer(&config)), gap) {
            (Some(Answer::Renew), Some(g)) => {
                wait.min(g.saturating_duration_since(tokio::time::Instant::now()))
            }
            (Some(_), _) => Duration::ZERO,
            (None, _) => wait,
        };
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            // A closed channel (no sender left) disables this arm rather than waking it.
            Some(a) = asks.recv() => {
                asked = Some(a);
                continue;
            }
            _ = stop.wait() => return,
        }
        let through = match asked.take() {
            Some(a) => match a.answer(&config) {
                Answer::Nothing => continue,
                Answer::Drop(cas) => {
                    match drop_cas(&config, &dialer, &cas) {
                        Ok(()) => info!(node = %node_name, server = %a.server,
                            "dropped the CAs the servers trust no more"),
                        Err(e) => warn!(node = %node_name, error = %e,
                            "cannot drop the CAs the servers trust no more"),
                    }
                    continue;
                }
                Answer::Renew => {
                    info!(node = %node_name, server = %a.server, "a server asks this node to renew now (its CAs changed)");
                    last_asked = Some(tokio::time::Instant::now());
                    Some(a)
                }
            },
            None if due(&config).is_some_and(|(d, _)| d > now()) => {
                continue; // renewed meanwhile (or the clock moved)
            }
            None => None,
        };
        let server = through.as_ref().map(|a| a.server.as_str());
        match renew(&config, &node_name, &pool, &dialer, server).await {
            Ok(until) => {
                metrics.shared.renewals.inc();
                info!(node = %node_name, valid_until = until, "renewed the agent certificate");
            }
            Err(e) => {
                // An ask that failed is tried again (after the gap).
                asked = asked.or(through);
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
    through: Option<&str>,
) -> Result<i64, RenewError> {
    let links = pool.all();
    let link = links
        .iter()
        .find(|l| Some(l.server.as_str()) == through)
        .or(links.first())
        .ok_or(RenewError::NoTunnel)?;
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
    let (cert_pem, sent_ca) = match answer {
        Some(Message::Certificate {
            code: StatusCode::Ok,
            cert_pem,
            ca_pem,
            ..
        }) => (cert_pem, ca_pem),
        Some(Message::Certificate { message, .. }) => return Err(RenewError::Refused(message)),
        Some(other) => return Err(RenewError::Unexpected(other.name())),
        None => return Err(RenewError::Unexpected("the end of the stream")),
    };
    // Checked against the CAs the server sent (the ones this node holds, from a server before
    // 0.3) before it touches the disk: a bad answer is logged by the caller, and the old
    // identity stays.
    let held = std::fs::read_to_string(&config.ca).map_err(|source| RenewError::Ca {
        path: config.ca.clone(),
        source,
    })?;
    // Only CAs this node trusts, or that one of them vouches for (see `rotation::accepted`).
    let ca_pem = if tether_trust::pem_ders(&sent_ca).is_empty() {
        held.clone()
    } else {
        tether_trust::rotation::accepted(&sent_ca, &held, &cert_pem)
    };
    tether_trust::check_issued(&cert_pem, &ca_pem, node_name, &key_pem, now())
        .map_err(RenewError::Issued)?;
    if ca_pem != held {
        // The CAs first: they trust the old certificate too while a rotation runs, and the new
        // one in any case.
        tether_trust::write_file(&config.ca, ca_pem.as_bytes(), 0o644)
            .map_err(RenewError::Store)?;
        info!(node = %node_name, cas = tether_trust::rotation::hashes(&ca_pem).len(), "the server's CAs replace this node's");
    }
    // A crash while storing leaves a matching pair: the old one, or the new one.
    tether_trust::write_identity(&config.cert, &config.key, &cert_pem, &key_pem)
        .map_err(RenewError::Store)?;
    reload(config, dialer)?;
    Ok(due(config).map(|(_, exp)| exp).unwrap_or(0))
}

/// Writes the CAs a node keeps after its servers dropped some (see [`Answer::Drop`]), and uses
/// them for the tunnels it opens from then on.
fn drop_cas(config: &AgentConfig, dialer: &Dialer, cas: &str) -> Result<(), RenewError> {
    tether_trust::write_file(&config.ca, cas.as_bytes(), 0o644).map_err(RenewError::Store)?;
    reload(config, dialer)
}

/// Builds the dialer's TLS from the files: the CAs and the identity.
fn reload(config: &AgentConfig, dialer: &Dialer) -> Result<(), RenewError> {
    let roots = tls::load_roots(&config.ca)?;
    let identity = tls::Identity::load(&config.cert, &config.key)?;
    let client = tls::client_config(roots, identity, config.limits.post_quantum)?;
    let quic = tls::quic_client_config(
        client.clone(),
        tls::quic_transport(config.liveness, config.limits),
    )?;
    dialer.set_client_config(quic, client);
    Ok(())
}
