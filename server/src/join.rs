//! Joins: a node without a certificate trades a token and a signing request for one.
//!
//! The joining agent has already checked this server's CA against the token (in its TLS
//! verifier); here the server checks the token's credential against `DIR/tokens` as it is on
//! disk now, the node name's owner in the node records, and signs the request. The node's key
//! never leaves the node.

use crate::datastore::DatastoreError;
use crate::metrics::Limit;
use crate::state::State;
use std::net::SocketAddr;
use std::time::Duration;
use tether_proto::{code, Message, StatusCode};
use tether_transport::transport::{Stream, Tunnel};
use tether_trust::token::{self, Token};
use tracing::{info, warn};

fn answer(code: StatusCode, message: String, cert_pem: String, ca_pem: String) -> Message {
    Message::Certificate {
        code,
        message,
        cert_pem,
        ca_pem,
    }
}

/// Serves one join connection: one stream, one request, one answer.
pub async fn serve(tunnel: Tunnel, remote: SocketAddr, state: &State) {
    if !state.join_limiter.allow(remote.ip()) {
        state.metrics.limit_hit(Limit::JoinRate);
        warn!(peer = %remote, limit = state.config.join_rate_per_minute,
            "refused join: too many attempts from this address this minute");
        tunnel.close(code::LIMIT, "too many join attempts; wait a minute");
        return;
    }
    let first = tokio::time::timeout(state.config.header_timeout, async {
        let mut s = tunnel.accept_stream().await.ok()?;
        let m = s.recv.read_message().await.ok()??;
        Some((s, m))
    })
    .await;
    let Ok(Some((mut stream, msg))) = first else {
        state.metrics.join_failures.inc();
        warn!(peer = %remote, "refused join: no request in time");
        tunnel.close(code::PROTOCOL, "no join request");
        return;
    };
    let reply = match msg {
        Message::Join {
            token_id,
            secret,
            node_name,
            csr,
        } => decide(&token_id, &secret, &node_name, &csr, remote, state).await,
        other => {
            warn!(peer = %remote, message = other.name(), "refused join: not a join request");
            answer(
                StatusCode::BadRequest,
                "expected a join request".into(),
                String::new(),
                String::new(),
            )
        }
    };
    let ok = matches!(
        reply,
        Message::Certificate {
            code: StatusCode::Ok,
            ..
        }
    );
    if !ok {
        state.metrics.join_failures.inc();
    }
    let _ = stream.send.write_message(&reply).await;
    stream.send.finish().await;
    // Let the answer arrive before the connection goes.
    let _ = tokio::time::timeout(Duration::from_secs(5), tunnel.closed()).await;
    tunnel.close(code::OK, "join done");
}

async fn decide(
    token_id: &str,
    secret: &str,
    node_name: &str,
    csr: &[u8],
    remote: SocketAddr,
    state: &State,
) -> Message {
    let refuse = |why: String| {
        warn!(peer = %remote, node = node_name, reason = %why, "refused join");
        answer(
            StatusCode::RefusedByPolicy,
            why,
            String::new(),
            String::new(),
        )
    };
    // etcd unreachable: nothing is checked or written, and the node is told to try later.
    let unavailable = |e: &DatastoreError| {
        warn!(peer = %remote, node = node_name, error = %e, "refused join: datastore unavailable");
        answer(
            StatusCode::Busy,
            e.to_string(),
            String::new(),
            String::new(),
        )
    };
    let parsed =
        format!("{}{}::{token_id}.{secret}", token::PREFIX, "0".repeat(64)).parse::<Token>();
    let Ok(tok) = parsed else {
        return refuse("malformed token credential".into());
    };
    // Checked before the token's use is spent: the node tries another server.
    if let Err(why) = crate::ca::may_issue(state) {
        warn!(peer = %remote, node = node_name, reason = %why, "refused join for now");
        return answer(StatusCode::Busy, why, String::new(), String::new());
    }
    // The token's use is spent here, before the checks below: a join refused after this
    // point still used it (a name taken, the bound of nodes), which errs on the safe side.
    let grant = match state.authority.store().redeem_token(&tok).await {
        Ok(Ok(grant)) => grant,
        Ok(Err(rejection)) => {
            // The log says which; the stranger only hears "bad token".
            warn!(peer = %remote, node = node_name, reason = %rejection, "refused join");
            return answer(
                StatusCode::RefusedByPolicy,
                token::BAD_TOKEN.into(),
                String::new(),
                String::new(),
            );
        }
        Err(e) if e.is_unavailable() => return unavailable(&e),
        Err(e) => return refuse(format!("server cannot read its token store: {e}")),
    };
    if let Err(e) = tether_trust::validate_node_name(node_name) {
        return refuse(e.to_string());
    }
    let key = match tether_trust::key_hash_of_csr(csr) {
        Ok(k) => k,
        Err(e) => return refuse(e.to_string()),
    };
    if !state.authority.knows(node_name) && state.authority.record_count() >= state.config.max_nodes
    {
        state.metrics.limit_hit(Limit::Nodes);
        return refuse(format!(
            "the cluster has as many node records as it may ({}, --max-nodes); forget unused nodes first",
            state.config.max_nodes
        ));
    }
    match state.authority.claim(node_name, &key).await {
        Ok(Ok(())) => {}
        Ok(Err(why)) => return refuse(why.to_string()),
        Err(e) if e.is_unavailable() => return unavailable(&e),
        Err(e) => return refuse(format!("server cannot record the node: {e}")),
    }
    if !grant.addresses.is_empty() {
        match state
            .authority
            .pin_addresses(node_name, &grant.addresses)
            .await
        {
            Ok(claim) if claim.refused.is_empty() => {}
            Ok(claim) => {
                let list: Vec<String> = claim.refused.iter().map(|(a, _)| a.to_string()).collect();
                return refuse(format!(
                    "the token names addresses this node cannot own ({}): another node owns them",
                    list.join(", ")
                ));
            }
            Err(e) if e.is_unavailable() => return unavailable(&e),
            Err(e) => return refuse(format!("server cannot record the node's addresses: {e}")),
        }
    }
    match sign(csr, node_name, state) {
        Ok((cert_pem, ca_pem)) => {
            state.metrics.joins.inc();
            info!(peer = %remote, node = node_name, token = token_id, "node joined");
            answer(StatusCode::Ok, String::new(), cert_pem, ca_pem)
        }
        Err(why) => refuse(why.to_string()),
    }
}

/// Why this server could not sign a node's request.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// This server has no usable copy of the CA's key.
    #[error("this server cannot sign: {0}")]
    NoCa(tether_trust::CertError),
    /// The request does not make a certificate (bad signature, bad name).
    #[error("{0}")]
    Request(tether_trust::CertError),
}

/// Signs a node's request with this server's copy of the CA, for the configured lifetime.
/// Returns the certificate and the CAs the node is to trust (the issuing one first, and the
/// old one while a rotation runs), read together from the data directory.
pub fn sign(csr: &[u8], node_name: &str, state: &State) -> Result<(String, String), SignError> {
    let dir = &state.config.data_dir;
    let ca = tether_trust::Ca::load(dir).map_err(SignError::NoCa)?;
    let bundle = tether_trust::rotation::trusted(dir).map_err(SignError::NoCa)?;
    let now = time::OffsetDateTime::now_utc();
    let life = time::Duration::try_from(state.config.agent_cert_lifetime)
        .unwrap_or(time::Duration::days(365));
    let lifetime = tether_trust::Lifetime {
        not_before: now - time::Duration::minutes(5),
        not_after: now + life,
    };
    let mut cert = ca
        .sign_agent_csr(csr, node_name, lifetime)
        .map_err(SignError::Request)?;
    // While a rotation runs, the certificate the old CA signed for the new one comes after the
    // node's: a node that trusts only the old CA takes the new one on its word.
    if tether_trust::rotation::running_in(dir) {
        if let Ok(Some(cross)) = tether_trust::rotation::cross(dir) {
            if !cert.ends_with('\n') {
                cert.push('\n');
            }
            cert.push_str(&cross);
        }
    }
    Ok((cert, bundle))
}

/// A renewal on an authenticated tunnel: the node proves its current identity by the tunnel's
/// certificate (`current_key`), and the new key becomes the name's owner.
///
/// The certificate is signed first and the owner changed after, in one step under the records'
/// lock that also checks the name's state: a revoked or forgotten name, or a key that no longer
/// owns the name, gets no certificate, however the renewal races with `agent revoke`.
pub async fn renew(mut stream: Stream, node: &str, current_key: &str, csr: Vec<u8>, state: &State) {
    let fail = |code: StatusCode, why: String| {
        warn!(node, reason = %why, "refused renewal");
        answer(code, why, String::new(), String::new())
    };
    let reply = match (
        tether_trust::key_hash_of_csr(&csr),
        crate::ca::may_issue(state),
    ) {
        (Err(e), _) => fail(StatusCode::BadRequest, e.to_string()),
        (Ok(_), Err(why)) => fail(StatusCode::Busy, why),
        (Ok(key), Ok(())) => match sign(&csr, node, state) {
            Err(why) => fail(StatusCode::Busy, why.to_string()),
            Ok((cert, ca_pem)) => match state.authority.renew(node, current_key, &key).await {
                Err(e) => fail(StatusCode::Busy, format!("cannot record the new key: {e}")),
                Ok(Err(why)) => fail(StatusCode::RefusedByPolicy, why.to_string()),
                Ok(Ok(())) => {
                    state.metrics.shared.renewals.inc();
                    info!(node, "renewed the node's certificate");
                    answer(StatusCode::Ok, String::new(), cert, ca_pem)
                }
            },
        },
    };
    let _ = stream.send.write_message(&reply).await;
    stream.send.finish().await;
}

/// A renewal over the node's bound (see `RenewalLimiter`): answered busy, nothing signed or
/// written; the agent tries again at its next renewal attempt.
pub async fn refuse_renewal(
    mut stream: Stream,
    node: &str,
    why: crate::join_rate::RenewalRefusal,
    state: &State,
) {
    state.metrics.limit_hit(Limit::Renewals);
    // A node may ask again at will: at most a line a second, the rest counted.
    if let Some(left_out) = state.noisy_log.allow() {
        warn!(left_out, node, reason = %why, "refused renewal: over the node's bound");
    }
    let reply = answer(
        StatusCode::Busy,
        why.to_string(),
        String::new(),
        String::new(),
    );
    let _ = stream.send.write_message(&reply).await;
    stream.send.finish().await;
}
