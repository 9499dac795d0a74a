//! Keeps one tunnel to one server up: connect, hello, serve, and on any failure reconnect with
//! exponential backoff and jitter.

use crate::metrics::Metrics;
use crate::pool::{Link, Pool};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tether_common::backoff::Backoff;
use tether_common::protocol::{Message, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, SERVICE_APISERVER};
use tether_common::shutdown::ShutdownSignal;
use tether_common::transport::{Stream, Tunnel};
use tracing::{debug, info, warn};

/// What a reconnect loop needs from its agent.
pub struct Dialer {
    pub endpoint: quinn::Endpoint,
    pub client_config: quinn::ClientConfig,
    pub node_name: String,
    pub handshake_timeout: Duration,
    pub pool: Arc<Pool>,
    pub metrics: Arc<Metrics>,
}

/// Why one connection attempt failed.
#[derive(Debug, thiserror::Error)]
enum DialError {
    #[error("cannot resolve {0}: {1}")]
    Resolve(String, std::io::Error),
    #[error("{0} resolves to no address")]
    NoAddress(String),
    #[error("{0}")]
    Connect(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("server refused the hello: {0}")]
    Hello(String),
}

/// Runs until shutdown, keeping a tunnel to `server` in the pool whenever one can be had.
pub async fn maintain(
    server: String,
    dialer: Arc<Dialer>,
    backoff: Backoff,
    mut stop: ShutdownSignal,
) {
    let mut backoff = backoff;
    let mut failures = 0u32;
    loop {
        let attempt = tokio::time::timeout(dialer.handshake_timeout, dial(&server, &dialer));
        let result = tokio::select! {
            r = attempt => r.unwrap_or(Err(DialError::Timeout(dialer.handshake_timeout))),
            _ = stop.wait() => return,
        };
        match result {
            Ok((tunnel, control)) => {
                backoff.reset();
                failures = 0;
                serve(&server, tunnel, control, &dialer, &mut stop).await;
                if stop.fired() {
                    return;
                }
            }
            Err(e) => {
                dialer.metrics.tunnel_connect_failures.inc();
                failures += 1;
                // The first failure and then every tenth: a server that stays down for hours
                // must not flood the log.
                if failures == 1 || failures.is_multiple_of(10) {
                    warn!(server = %server, attempts = failures, error = %e, "cannot reach server; retrying");
                } else {
                    debug!(server = %server, error = %e, "cannot reach server");
                }
            }
        }
        let delay = backoff.next_delay(fastrand::f64());
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait() => return,
        }
    }
}

async fn dial(server: &str, d: &Dialer) -> Result<(Tunnel, Stream), DialError> {
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host(server)
        .await
        .map_err(|e| DialError::Resolve(server.to_string(), e))?
        .collect();
    let name = server_name(server);
    let mut last = DialError::NoAddress(server.to_string());
    for addr in addrs {
        let connecting = match d.endpoint.connect_with(d.client_config.clone(), addr, name) {
            Ok(c) => c,
            Err(e) => {
                last = DialError::Connect(e.to_string());
                continue;
            }
        };
        match connecting.await {
            Ok(conn) => {
                let tunnel = Tunnel::from_quic(conn);
                let control = hello(&tunnel, &d.node_name).await?;
                return Ok((tunnel, control));
            }
            Err(e) => last = DialError::Connect(e.to_string()),
        }
    }
    Err(last)
}

/// The name the server's certificate must carry: the host part of `host:port`.
pub fn server_name(server: &str) -> &str {
    let host = server.rsplit_once(':').map(|(h, _)| h).unwrap_or(server);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// Opens the control stream and agrees on the protocol version.
async fn hello(tunnel: &Tunnel, node_name: &str) -> Result<Stream, DialError> {
    let err = |e: String| DialError::Hello(e);
    let mut control = tunnel.open_stream().await.map_err(|e| err(e.to_string()))?;
    let msg = Message::Hello {
        min_version: MIN_PROTOCOL_VERSION,
        max_version: PROTOCOL_VERSION,
        node_name: node_name.to_string(),
        capabilities: vec![SERVICE_APISERVER.into()],
    };
    control
        .send
        .write_message(&msg)
        .await
        .map_err(|e| err(e.to_string()))?;
    match control.recv.read_message().await {
        Ok(Some(Message::Welcome { version, .. })) if version == PROTOCOL_VERSION => Ok(control),
        Ok(Some(Message::Welcome { version, .. })) => {
            Err(err(format!("server chose unsupported version {version}")))
        }
        Ok(Some(other)) => Err(err(format!("unexpected {} message", other.name()))),
        Ok(None) => Err(err("control stream closed".into())),
        Err(e) => Err(err(e.to_string())),
    }
}

/// Serves a connected tunnel until it closes or the agent stops.
async fn serve(
    server: &str,
    tunnel: Tunnel,
    mut control: Stream,
    d: &Dialer,
    stop: &mut ShutdownSignal,
) {
    let link = Arc::new(Link::new(server.to_string(), tunnel.clone()));
    d.pool.add(link.clone());
    d.metrics.tunnel_connects.inc();
    d.metrics.tunnels_up.inc();
    info!(server = %server, peer = %tunnel.remote_addr(), transport = tunnel.transport(), "tunnel up");
    let reason = tokio::select! {
        e = tunnel.closed() => e.to_string(),
        r = read_control(&mut control) => r,
        _ = stop.wait() => "agent shutting down".to_string(),
    };
    d.pool.remove(&link);
    d.metrics.tunnels_up.dec();
    tunnel.close(tether_common::protocol::code::SHUTDOWN, "tunnel closed");
    if stop.fired() {
        info!(server = %server, peer = %tunnel.remote_addr(), reason = %reason, "tunnel down");
    } else {
        warn!(server = %server, peer = %tunnel.remote_addr(), reason = %reason, "tunnel down");
    }
}

/// Reads control messages until the stream ends; returns why it ended.
async fn read_control(control: &mut Stream) -> String {
    loop {
        match control.recv.read_message().await {
            Ok(Some(m)) => debug!(message = m.name(), "control message"),
            Ok(None) => return "server closed the control stream".into(),
            Err(e) => return format!("control stream failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn server_names() {
        assert_eq!(super::server_name("10.0.0.1:9443"), "10.0.0.1");
        assert_eq!(super::server_name("[::1]:9443"), "::1");
        assert_eq!(super::server_name("cp.example:9443"), "cp.example");
    }
}
