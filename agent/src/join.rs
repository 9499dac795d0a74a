//! Joining with a token: the first start of a node that has no certificate.
//!
//! The agent dials a server with the join protocol and no client certificate. Its TLS verifier
//! trusts the server only through a CA whose hash the token pins, so a wrong server, or a wrong
//! token, stops the join before anything is sent. Then it makes its key (which never leaves the
//! node), sends a signing request with the token, and stores what comes back: `ca.crt`,
//! `agent.crt`, `agent.key` (0600).

use crate::config::AgentConfig;
use std::time::Duration;
use tether_link::backoff::Backoff;
use tether_link::reconnect;
use tether_proto::{Message, StatusCode};
use tether_transport::tls;
use tether_transport::transport::Tunnel;
use tether_trust::token::Token;
use tracing::{debug, info, warn};

/// Why a join failed for good.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error("the agent has no certificate in its data directory and no --token to join with: pass the token that `tether-server init` printed (or one from `tether-server token create`) with --token, or copy in the files of `tether-server issue-agent`")]
    NoToken,
    #[error("invalid --token: {0}")]
    BadToken(#[from] tether_trust::token::TokenFormatError),
    #[error("join refused: {0}")]
    CaMismatch(String),
    #[error("the server refused the join: {0}")]
    Refused(String),
    #[error("cannot store the certificate: {0}")]
    Store(#[from] tether_trust::CertError),
    #[error("{0}")]
    Tls(#[from] tls::TlsError),
}

/// Joins through the first server that answers, retrying with backoff while none does.
pub async fn join(
    config: &AgentConfig,
    endpoint: &quinn::Endpoint,
    token: &str,
) -> Result<(), JoinError> {
    let token: Token = token.parse()?;
    let node_name = config
        .node_name
        .clone()
        .or_else(tether_trust::hostname)
        .unwrap_or_else(|| "node".into());
    tether_trust::validate_node_name(&node_name)?;
    let tls_config = tls::join_client_config(&token.ca_hash, config.limits.post_quantum)?;
    let client = Dial {
        quic: tls::quic_client_config(
            tls_config.clone(),
            tls::quic_transport(config.liveness, config.limits),
        )?,
        tcp: std::sync::Arc::new(tls_config),
        endpoint,
        config,
    };
    let (csr, key_pem) = tether_trust::make_csr(&node_name)?;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
    let mut attempts = 0u32;
    loop {
        for server in &config.servers {
            let targets = match reconnect::resolve(server, 0).await {
                Ok(t) => t,
                Err(e) => {
                    warn!(server = %server, error = %e, "join: cannot resolve server");
                    continue;
                }
            };
            for t in targets {
                match attempt(&client, &t, &token, &node_name, &csr).await {
                    Ok((cert_pem, ca_pem)) => {
                        let answer = Answer {
                            cert_pem: &cert_pem,
                            ca_pem: &ca_pem,
                            key_pem: &key_pem,
                        };
                        let cas = match answer.verify(&token, &node_name) {
                            Ok(cas) => cas,
                            Err(e) => {
                                attempts += 1;
                                warn!(server = %server, error = %e, "join: the answer is not a good identity for this node; nothing stored, trying the next server");
                                continue;
                            }
                        };
                        store(config, &answer, &cas)?;
                        info!(node = %node_name, server = %server, "joined the cluster; certificate stored");
                        return Ok(());
                    }
                    Err(Attempt::Fatal(e)) => return Err(e),
                    Err(Attempt::Retry(why)) => {
                        attempts += 1;
                        if attempts == 1 || attempts.is_multiple_of(10) {
                            warn!(server = %server, error = %why, "join: no answer from this server yet (unreachable, or its datastore is); retrying");
                        }
                    }
                }
            }
        }
        tokio::time::sleep(backoff.next_delay(fastrand::f64())).await;
    }
}

enum Attempt {
    Fatal(JoinError),
    Retry(String),
}

/// How a join reaches a server: QUIC, or TLS over TCP (directly or through the proxy), as the
/// agent's `--transport` says; in `auto`, TCP when QUIC gets no answer.
struct Dial<'a> {
    quic: quinn::ClientConfig,
    tcp: std::sync::Arc<rustls::ClientConfig>,
    endpoint: &'a quinn::Endpoint,
    config: &'a AgentConfig,
}

/// How long a join's handshake may take.
const JOIN_HANDSHAKE: Duration = Duration::from_secs(10);
/// How long a join in `auto` waits for QUIC before it tries TLS over TCP.
const QUIC_JOIN_HEAD_START: Duration = Duration::from_secs(3);

impl Dial<'_> {
    async fn quic(&self, t: &reconnect::DialTarget, within: Duration) -> Result<Tunnel, Attempt> {
        let connecting = self
            .endpoint
            .connect_with(self.quic.clone(), t.addr, &t.name)
            .map_err(|e| Attempt::Retry(e.to_string()))?;
        match tokio::time::timeout(within, connecting).await {
            Ok(Ok(c)) => Ok(Tunnel::from_quic(c, tls::INITIAL_STREAMS)),
            Ok(Err(e)) => Err(failed(e.to_string())),
            Err(_) => Err(Attempt::Retry(format!(
                "no answer over QUIC within {within:?}"
            ))),
        }
    }

    async fn tcp(&self, t: &reconnect::DialTarget) -> Result<Tunnel, Attempt> {
        use tether_transport::transport::tcp::TcpTunnel;
        let (c, tls) = (self.config, self.tcp.clone());
        let max = tls::INITIAL_STREAMS as usize;
        let proxy = c
            .proxy
            .as_ref()
            .filter(|p| p.applies_to(reconnect::host_of(&t.label)));
        let dial = async {
            match proxy {
                Some(p) => {
                    let s = p
                        .connect(&t.label, JOIN_HANDSHAKE)
                        .await
                        .map_err(|e| Attempt::Retry(e.to_string()))?;
                    TcpTunnel::connect_over(s, t.addr, &t.name, tls, c.liveness, max).await
                }
                None => TcpTunnel::connect(t.addr, &t.name, tls, c.liveness, max).await,
            }
            .map_err(|e| failed(e.to_string()))
        };
        match tokio::time::timeout(JOIN_HANDSHAKE, dial).await {
            Ok(r) => r.map(Tunnel::from_tcp),
            Err(_) => Err(Attempt::Retry("no answer over TCP within 10s".into())),
        }
    }

    /// A tunnel for the join by the agent's transport.
    async fn tunnel(&self, t: &reconnect::DialTarget) -> Result<Tunnel, Attempt> {
        use tether_link::reconnect::TransportChoice;
        match self.config.transport {
            TransportChoice::Quic => self.quic(t, JOIN_HANDSHAKE).await,
            TransportChoice::Tcp => self.tcp(t).await,
            // QUIC gets a few seconds (a slow link's handshake), then TCP: where UDP is
            // blocked, or a proxy is the only way out, the join still goes through.
            TransportChoice::Auto => match self.quic(t, QUIC_JOIN_HEAD_START).await {
                Err(Attempt::Retry(why)) => {
                    debug!(server = %t.label, error = %why, "join: no QUIC; trying TLS over TCP");
                    self.tcp(t).await
                }
                other => other,
            },
        }
    }
}

/// A handshake that failed: fatal when the server's CA is not the one the token pins.
fn failed(text: String) -> Attempt {
    if text.contains("does not match the join token") {
        Attempt::Fatal(JoinError::CaMismatch(text))
    } else {
        Attempt::Retry(text)
    }
}

async fn attempt(
    dial: &Dial<'_>,
    t: &reconnect::DialTarget,
    token: &Token,
    node_name: &str,
    csr: &[u8],
) -> Result<(String, String), Attempt> {
    let tunnel = dial.tunnel(t).await?;
    let exchange = async {
        let mut s = tunnel.open_stream().await.map_err(|e| e.to_string())?;
        let req = Message::Join {
            token_id: token.id.clone(),
            secret: token.secret.clone(),
            node_name: node_name.to_string(),
            csr: csr.to_vec(),
        };
        s.send
            .write_message(&req)
            .await
            .map_err(|e| e.to_string())?;
        s.send.finish().await;
        s.recv.read_message().await.map_err(|e| e.to_string())
    };
    let answer = tokio::time::timeout(Duration::from_secs(15), exchange).await;
    tunnel.close(0, "joined");
    match answer {
        Ok(Ok(Some(Message::Certificate {
            code: StatusCode::Ok,
            cert_pem,
            ca_pem,
            ..
        }))) => Ok((cert_pem, ca_pem)),
        // The server cannot decide now (its datastore is unreachable): try again later.
        Ok(Ok(Some(Message::Certificate {
            code: StatusCode::Busy,
            message,
            ..
        }))) => Err(Attempt::Retry(message)),
        Ok(Ok(Some(Message::Certificate { message, .. }))) => {
            Err(Attempt::Fatal(JoinError::Refused(message)))
        }
        Ok(Ok(other)) => Err(Attempt::Retry(format!("unexpected answer: {other:?}"))),
        Ok(Err(e)) => Err(Attempt::Retry(e)),
        Err(_) => Err(Attempt::Retry("no answer to the join within 15s".into())),
    }
}

/// A join's answer, with the key this node made.
struct Answer<'a> {
    cert_pem: &'a str,
    ca_pem: &'a str,
    key_pem: &'a str,
}

impl Answer<'_> {
    /// Checked before anything is stored: the CAs handed over must hold the one the token pins
    /// (the one TLS verified), and the certificate be a good identity for this node under them.
    /// Returns the CAs to trust: the pinned one, and those it vouches for (while a CA rotation
    /// runs, a token made before it pins the old CA, and the certificate the old CA signed for
    /// the new one comes after the node's own).
    fn verify(&self, token: &Token, node_name: &str) -> Result<String, JoinError> {
        let Some(pinned) = tether_trust::rotation::pinned(self.ca_pem, &token.ca_hash) else {
            return Err(JoinError::CaMismatch(
                "the CAs sent with the certificate do not hold the one the token pins".into(),
            ));
        };
        let cas = tether_trust::rotation::accepted(self.ca_pem, &pinned, self.cert_pem);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        tether_trust::check_issued(self.cert_pem, &cas, node_name, self.key_pem, now)?;
        Ok(cas)
    }
}

fn store(config: &AgentConfig, answer: &Answer<'_>, cas: &str) -> Result<(), JoinError> {
    for p in [&config.ca, &config.cert, &config.key] {
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir).map_err(|source| tether_trust::CertError::Write {
                path: dir.to_owned(),
                source,
            })?;
        }
    }
    tether_trust::write_file(&config.ca, cas.as_bytes(), 0o644)?;
    tether_trust::write_identity(&config.cert, &config.key, answer.cert_pem, answer.key_pem)?;
    Ok(())
}
