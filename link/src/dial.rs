//! Dialing one server: its addresses, QUIC or TLS over TCP, and the hello that agrees on the
//! protocol. [`super::reconnect`] keeps the tunnel up with it.

use super::reconnect::*;
use std::time::Duration;
use tether_proto::capability::Capabilities;
use tether_proto::{code, Message, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use tether_transport::transport::{Stream, Tunnel};

/// Why one dial failed.
#[derive(Debug, thiserror::Error)]
pub(super) enum DialError {
    #[error("{0}")]
    Connect(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("hello failed: {0}")]
    Hello(String),
    #[error("this is our own address")]
    Itself,
    #[error("already connected to this server (instance {0}) through another address")]
    Duplicate(String),
}

pub(super) async fn dial_quic(target: &DialTarget, d: &Dialer) -> Result<Tunnel, DialError> {
    let connecting = d
        .endpoint
        .connect_with(d.client_config(), target.addr, &target.name)
        .map_err(|e| DialError::Connect(e.to_string()))?;
    let conn = connecting
        .await
        .map_err(|e| DialError::Connect(e.to_string()))?;
    Ok(Tunnel::from_quic(conn, d.max_streams))
}

pub(super) async fn dial_tcp(target: &DialTarget, d: &Dialer) -> Result<Tunnel, DialError> {
    use tether_transport::transport::tcp::TcpTunnel;
    let (tls, max) = (d.tcp_tls(), d.max_streams as usize);
    let proxy = d
        .proxy
        .as_ref()
        .filter(|p| p.applies_to(host_of(&target.label)));
    let t = match proxy {
        // The proxy is given the server as configured or announced, and resolves it itself.
        Some(p) => {
            let s = p
                .connect(&target.label, d.handshake_timeout)
                .await
                .map_err(|e| DialError::Connect(e.to_string()))?;
            TcpTunnel::connect_over(s, target.addr, &target.name, tls, d.liveness, max).await
        }
        None => TcpTunnel::connect(target.addr, &target.name, tls, d.liveness, max).await,
    }
    .map_err(|e| DialError::Connect(format!("over TCP: {e}")))?;
    Ok(Tunnel::from_tcp(t))
}

/// QUIC first; in `auto`, TLS over TCP too once QUIC has had its head start, the first to
/// succeed winning (QUIC when both do).
pub(super) async fn connect(
    target: &DialTarget,
    d: &Dialer,
    choice: TransportChoice,
) -> Result<Tunnel, DialError> {
    match choice {
        TransportChoice::Quic => dial_quic(target, d).await,
        TransportChoice::Tcp => dial_tcp(target, d).await,
        TransportChoice::Auto => {
            let quic = dial_quic(target, d);
            tokio::pin!(quic);
            let quic_err = tokio::select! {
                r = &mut quic => match r {
                    Ok(t) => return Ok(t),
                    Err(e) => Some(e),
                },
                _ = tokio::time::sleep(QUIC_HEAD_START) => None,
            };
            let tcp = dial_tcp(target, d);
            tokio::pin!(tcp);
            if quic_err.is_some() {
                return tcp.await;
            }
            tokio::select! {
                r = &mut quic => match r {
                    Ok(t) => Ok(t),
                    Err(_) => tcp.await,
                },
                r = &mut tcp => match r {
                    Ok(t) => Ok(t),
                    Err(tcp_err) => quic.await.map_err(|q| {
                        DialError::Connect(format!("QUIC: {q}; TCP: {tcp_err}"))
                    }),
                },
            }
        }
    }
}

pub(super) async fn dial(
    target: &DialTarget,
    d: &Dialer,
    choice: TransportChoice,
) -> Result<Established, DialError> {
    // Read before the dial reads the configuration, so that a renewal during the dial shows
    // as a newer generation than the tunnel's (and the tunnel moves), never the reverse.
    let identity = *d.identity.0.borrow();
    let tunnel = connect(target, d, choice).await?;
    let welcomed = match hello(&tunnel, d).await {
        Ok(v) => v,
        Err(e) => {
            tunnel.close(code::OK, "hello failed");
            return Err(e);
        }
    };
    if d.own_server_id.as_deref() == Some(welcomed.server_id.as_str()) {
        tunnel.close(code::OK, "dialed itself");
        return Err(DialError::Itself);
    }
    let server_key = tunnel
        .peer_certificates()
        .and_then(|c| c.first().and_then(tether_transport::tls::peer_info))
        .map(|i| i.key_hash)
        .unwrap_or_default();
    if d.pool
        .has_server(&welcomed.server_id, &server_key, &target.label)
    {
        tunnel.close(code::OK, "duplicate tunnel");
        return Err(DialError::Duplicate(welcomed.server_id));
    }
    Ok(Established {
        tunnel,
        welcomed,
        identity,
        server_key,
    })
}

/// Resolves `label` (`host:port`; a DNS name counts for every address) into dial targets.
pub async fn resolve(label: &str, rank: usize) -> std::io::Result<Vec<DialTarget>> {
    let name = host_of(label).to_string();
    let mut out: Vec<DialTarget> = tokio::net::lookup_host(label)
        .await?
        .map(|addr| DialTarget {
            label: label.to_string(),
            addr,
            name: name.clone(),
            rank,
        })
        .collect();
    out.dedup();
    Ok(out)
}

/// The name the server's certificate must carry: the host part of `host:port`.
pub fn host_of(server: &str) -> &str {
    let host = server.rsplit_once(':').map(|(h, _)| h).unwrap_or(server);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Opens the control stream and agrees on the protocol version.
pub(super) async fn hello(tunnel: &Tunnel, d: &Dialer) -> Result<Welcomed, DialError> {
    let err = |e: String| DialError::Hello(e);
    let mut control = tunnel.open_stream().await.map_err(|e| err(e.to_string()))?;
    let msg = Message::Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        node_name: d.hello_name.clone(),
        capabilities: d.capabilities.clone(),
    };
    control
        .send
        .write_message(&msg)
        .await
        .map_err(|e| err(e.to_string()))?;
    match control.recv.read_message().await {
        Ok(Some(Message::Welcome {
            version,
            server_id,
            capabilities,
        })) if version == PROTOCOL_VERSION => Ok(Welcomed {
            server_id,
            capabilities: Capabilities::from_announced(&capabilities),
            control,
        }),
        Ok(Some(Message::Welcome { version, .. })) => {
            Err(err(format!("server chose unsupported version {version}")))
        }
        Ok(Some(other)) => Err(err(format!("unexpected {} message", other.name()))),
        Ok(None) => Err(err("control stream closed".into())),
        Err(e) => Err(err(e.to_string())),
    }
}

/// What the accepting side said in its welcome, and the control stream it came on.
pub(super) struct Welcomed {
    /// The accepting server's instance id.
    pub(super) server_id: String,
    /// What it announced: new behaviour is used only when it is here.
    pub(super) capabilities: Capabilities,
    pub(super) control: Stream,
}

/// A tunnel whose control stream has agreed on the protocol.
pub(super) struct Established {
    pub(super) tunnel: Tunnel,
    pub(super) welcomed: Welcomed,
    /// The identity generation the tunnel was dialed with.
    pub(super) identity: u64,
    /// What the server's certificate proves (see `Link::server_key`).
    pub(super) server_key: String,
}
