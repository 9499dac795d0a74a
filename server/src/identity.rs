//! The server's identity and what the records admit: loading the certificate and CA, reloading
//! them when the files change (or on SIGHUP), and the sweep that closes tunnels the records no
//! longer admit (revoked, forgotten, another key's) within a second of the change.

use crate::error::ServerError;
use crate::state::State;
use crate::trust::Trust;
use std::sync::Arc;
use std::time::SystemTime;
use tether_process::shutdown::ShutdownSignal;
use tether_proto::code;
use tether_transport::tls;
use tether_trust::files;
use tether_trust::records::Verdict;
use tether_trust::rotation;
use tracing::{info, warn};

/// The CA roots (the issuing CA, and the old one while a rotation runs), this server's
/// identity, and the CAs as [`Trust`].
///
/// The identity's chain is the certificate, the cross-signed certificate of the last rotation
/// (nodes that trust only the old CA reach the new one through it), then every trusted CA (a
/// joining agent finds the CA its token pins among them).
pub(crate) fn load_identity(
    dir: &std::path::Path,
) -> Result<(rustls::RootCertStore, tls::Identity, Trust), tls::TlsError> {
    let read = |path: std::path::PathBuf| {
        std::fs::read_to_string(&path).map_err(|source| tls::TlsError::Read { path, source })
    };
    let mut bundle = read(dir.join(files::CA_CERT))?;
    let mut cas = tls::load_certs(&dir.join(files::CA_CERT))?;
    let old = dir.join(rotation::CA_OLD);
    if old.exists() {
        cas.extend(tls::load_certs(&old)?);
        if !bundle.ends_with('\n') {
            bundle.push('\n');
        }
        bundle.push_str(&read(old)?);
    }
    let mut roots = rustls::RootCertStore::empty();
    for ca in &cas {
        roots.add(ca.clone()).map_err(|e| tls::TlsError::BadCa {
            path: dir.join(files::CA_CERT),
            detail: e.to_string(),
        })?;
    }
    let mut identity =
        tls::Identity::load(&dir.join(files::SERVER_CERT), &dir.join(files::SERVER_KEY))?;
    let cross = dir.join(rotation::CA_CROSS);
    if cross.exists() {
        identity.chain.extend(tls::load_certs(&cross)?);
    }
    for ca in cas {
        if !identity.chain.contains(&ca) {
            identity.chain.push(ca);
        }
    }
    Ok((roots, identity, Trust::new(&bundle)))
}

pub(crate) fn cert_expiry(state: &State) {
    let path = state.config.data_dir.join(files::SERVER_CERT);
    if let Some(info) = tls::load_certs(&path)
        .ok()
        .and_then(|c| c.first().and_then(tls::peer_info))
    {
        state.metrics.shared.cert_expiry.set(info.not_after);
    }
}

/// Reloads the certificate and key from disk and uses them for new handshakes (agents and
/// peers); tunnels that are up keep going.
pub(crate) fn reload_certificates(state: &State) -> Result<(), ServerError> {
    let (roots, identity, trust) = load_identity(&state.config.data_dir)?;
    let pq = state.config.limits.post_quantum;
    let cfg = tls::server_config(roots.clone(), identity.clone(), pq)?;
    *state.tcp_tls.write().unwrap_or_else(|p| p.into_inner()) =
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg.clone()));
    let transport = state.config.listener_transport();
    state
        .endpoint
        .set_server_config(Some(tls::quic_server_config(cfg, transport)?));
    if let Some(d) = state.peer_dialer.get() {
        let client = tls::client_config(roots, identity, pq)?;
        let transport = tls::peer_quic_transport(state.config.liveness, state.config.limits);
        d.set_client_config(tls::quic_client_config(client.clone(), transport)?, client);
    }
    state.metrics.cert_reloads.inc();
    cert_expiry(state);
    info!("reloaded the server certificate");
    // The CAs changed (a rotation started, reached this master, or finished): the agents are
    // asked to renew (`control` sends each a `RenewNow`), and tunnels from a CA trusted no more
    // close.
    let changed = state.trust.send_if_modified(|t| {
        let changed = t.hashes() != trust.hashes();
        *t = trust;
        changed
    });
    if changed {
        let t = state.trust.borrow();
        info!(issuer = %t.issuer(), trusted = t.hashes().len(), "the CAs changed; asking the agents to renew");
        drop(t);
        crate::ca::close_untrusted(state);
    }
    Ok(())
}

fn files_mtime(dir: &std::path::Path) -> Vec<Option<SystemTime>> {
    [
        files::CA_CERT,
        files::SERVER_CERT,
        files::SERVER_KEY,
        rotation::CA_OLD,
        rotation::CA_CROSS,
    ]
    .iter()
    .map(|f| {
        std::fs::metadata(dir.join(f))
            .and_then(|m| m.modified())
            .ok()
    })
    .collect()
}

/// How often expired forgotten records are looked for.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Watches the data directory: node records (revocations close tunnels within a second or
/// two) and the certificate files (reloaded when they change).
pub(crate) async fn watch_files(state: Arc<State>, mut stop: ShutdownSignal) {
    let mut certs = files_mtime(&state.config.data_dir);
    // Records merged from a peer take effect at once, not at the next look at the file.
    let mut records = state.authority.subscribe();
    let mut pruned = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(state.config.reload_interval) => {}
            r = records.changed() => if r.is_err() { return },
            _ = stop.wait() => return,
        }
        state.authority.poll();
        close_refused(&state);
        if pruned.elapsed() >= PRUNE_EVERY {
            pruned = std::time::Instant::now();
            match state.authority.remove_expired().await {
                Ok(0) => {}
                Ok(n) => info!(
                    records = n,
                    "removed the records of names forgotten long ago"
                ),
                Err(e) => warn!(error = %e, "cannot remove expired records; trying again later"),
            }
        }
        let now = files_mtime(&state.config.data_dir);
        if now != certs {
            certs = now;
            if let Err(e) = reload_certificates(&state) {
                warn!(error = %e, "cannot reload the server certificate; keeping the old one");
            }
        }
    }
}

/// Why the records refuse a certificate for new tunnels: the close code and the reason said to
/// the agent and logged; `None` when they admit it.
pub(crate) fn refusal(verdict: &Verdict) -> Option<(u32, &'static str)> {
    match verdict {
        Verdict::Allowed => None,
        Verdict::Revoked => Some((code::REVOKED, "this node is revoked")),
        Verdict::OtherOwner => Some((code::REFUSED, "the node name belongs to another key")),
        Verdict::Forgotten => Some((
            code::REFUSED,
            "the node name was forgotten; the node must join again",
        )),
        Verdict::Superseded => Some((
            code::REFUSED,
            "the node name belongs to another key (this certificate was renewed)",
        )),
    }
}

/// Whether the records let a tunnel whose certificate has this verdict carry streams: an
/// admitted key, or the key before a renewal (its tunnels are the same node's). The egress
/// route asks only such tunnels, and [`close_refused`] closes the others.
pub(crate) fn carries(verdict: &Verdict) -> bool {
    matches!(verdict, Verdict::Allowed | Verdict::Superseded)
}

/// Closes the tunnels whose certificate the records no longer admit: revoked nodes, names that
/// were forgotten (a certificate from before a forget is what the forget is for), and keys that
/// another key owns the name for. The tunnels of a renewed node's previous key stay up: they are
/// the same node's.
pub(crate) fn close_refused(state: &State) {
    for name in state.registry.node_names() {
        for e in state.registry.tunnels(&name) {
            let verdict = state.authority.check(&name, &e.key_hash);
            if carries(&verdict) {
                continue;
            }
            let Some((code, why)) = refusal(&verdict) else {
                continue;
            };
            state.metrics.revoked_closed.inc();
            warn!(node = %name, peer = %e.remote, reason = why, "closing tunnel");
            e.tunnel.close(code, why);
            state.registry.remove(&name, e.tunnel.id());
        }
    }
}
