//! The CAs of a running server, and its part in a CA rotation (see `tether_trust::rotation` for
//! the files and the record).
//!
//! - [`crate::trust::Trust`]: the CA this server issues from and every CA it trusts (two while a rotation
//!   runs), as loaded from the data directory. Replaced when the files change; each change is
//!   sent to the agents as a `RenewNow`, so that a rotation moves every connected node to the new
//!   CA at once, and its end takes the old CA out of every node's trust.
//! - [`follow`]: reads the rotation record from the datastore every few seconds, for `status`,
//!   the metrics and the issuing guard, and (etcd) finishes the rotation in this master's data
//!   directory once `ca finish` has marked it finished.
//! - [`may_issue`]: while a rotation runs, a master that does not hold its new CA yet refuses to
//!   issue (the node tries another), so that no node gets a certificate from the old CA after
//!   its rotation started.

use crate::state::State;
use std::sync::Arc;
use std::time::Duration;
use tether_process::shutdown::ShutdownSignal;
use tether_trust::rotation::{self, Rotation};
use tracing::{info, warn};

/// How often the rotation record is read from the datastore.
pub(crate) const FOLLOW_EVERY: Duration = Duration::from_secs(2);

/// The nodes still on the old CA, as this server sees them: those the rotation record lists
/// whose name still belongs to the key it had at the start, and those with tunnels here none of
/// which has a certificate from the issuing CA (a node that moved keeps its old tunnels while
/// streams from before run on them). Empty when no rotation runs.
pub(crate) fn pending(state: &State) -> Vec<String> {
    let Some(r) = running(state) else {
        return Vec::new();
    };
    let mut names: std::collections::BTreeSet<String> = state
        .authority
        .with_records(|recs| r.pending(recs))
        .into_iter()
        .collect();
    let issuer = state.trust.borrow().issuer().to_string();
    for (name, tunnels) in state.registry.snapshot() {
        if !tunnels.iter().any(|e| e.issuer.as_deref() == Some(&issuer)) {
            names.insert(name);
        }
    }
    names.into_iter().collect()
}

/// The rotation record as last read, if a rotation runs.
pub(crate) fn running(state: &State) -> Option<Rotation> {
    state
        .rotation
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
        .filter(Rotation::running)
}

/// Whether this server may issue a certificate now: not while a rotation runs whose new CA it
/// does not hold yet. The answer is the reason, for the node and the log.
pub(crate) fn may_issue(state: &State) -> Result<(), String> {
    match running(state) {
        Some(r) if r.new != state.trust.borrow().issuer() => Err(
            "this server does not hold the new CA of the running rotation yet; try another server"
                .into(),
        ),
        _ => Ok(()),
    }
}

/// Closes the tunnels whose certificate no CA this server trusts issued (a rotation finished).
/// A node that moved to the new CA keeps its old tunnels while streams it opened before the
/// move are still on them (a `kubectl exec` of hours): they take no new stream, and close when
/// the last one ends (this runs again every [`FOLLOW_EVERY`]). A node left on the old CA (`ca
/// finish --force`) is cut off at once, as it would be at its next handshake.
pub(crate) fn close_untrusted(state: &State) {
    let trust = state.trust.borrow().clone();
    for name in state.registry.node_names() {
        let tunnels = state.registry.tunnels(&name);
        let moved = tunnels.iter().any(|e| trust.trusts(e.issuer.as_deref()));
        for e in tunnels {
            if trust.trusts(e.issuer.as_deref()) {
                continue;
            }
            if moved && e.streams.load(std::sync::atomic::Ordering::Relaxed) > 0 {
                continue;
            }
            warn!(node = %name, peer = %e.remote,
                "closing tunnel: its certificate is from a CA this server trusts no more");
            e.tunnel.close(
                tether_proto::code::REFUSED,
                "the certificate's CA is trusted no more; join again",
            );
            state.registry.remove(&name, e.tunnel.id());
        }
    }
}

/// Follows the rotation record until shutdown (see the module's documentation).
pub(crate) async fn follow(state: Arc<State>, mut stop: ShutdownSignal) {
    loop {
        let known = state
            .rotation
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        match state.authority.store().rotation(known.as_ref()).await {
            Ok(r) => {
                let finished = r.as_ref().is_some_and(|r| !r.running()).then(|| r.clone());
                *state.rotation.write().unwrap_or_else(|p| p.into_inner()) = r;
                if let Some(Some(r)) = finished {
                    finish_here(&state, &r);
                }
            }
            Err(e) => warn!(error = %e, "cannot read the CA rotation record; trying again"),
        }
        close_untrusted(&state);
        let pending = pending(&state);
        let metrics = &state.metrics;
        metrics.ca_rotation.set(running(&state).is_some() as i64);
        metrics.ca_old_nodes.set(pending.len() as i64);
        tokio::select! {
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
            _ = stop.wait() => return,
        }
    }
}

/// A rotation marked finished in a shared store (etcd) ends in this master's data directory
/// too, once this master holds its new CA: `ca-old.crt` goes, and the file watcher reloads.
fn finish_here(state: &State, r: &Rotation) {
    let dir = &state.config.data_dir;
    if !rotation::running_in(dir) || state.trust.borrow().issuer() != r.new {
        return;
    }
    match rotation::finish(dir) {
        Ok(_) => info!("the CA rotation finished: the old CA is trusted no more"),
        Err(e) => warn!(error = %e, "cannot finish the CA rotation in the data directory"),
    }
}
