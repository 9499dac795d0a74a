//! The reverse path on the node: the control plane asks, through a tunnel, to reach a target
//! on this node (the kubelet, for logs, exec and port-forward). The agent decides what it
//! allows; the server never does. By default that is only the kubelet: 127.0.0.1:10250 and the
//! node's own addresses on port 10250.

use crate::metrics::Metrics;
use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tether_process::telemetry::GaugeGuard;
use tether_proto::{code, Message, StatusCode, Target, PROTOCOL_VERSION};
use tether_transport::open::answer;
use tether_transport::relay;
use tether_transport::transport::Stream;
use tokio::sync::Semaphore;
use tracing::{debug, warn};

/// The kubelet's port.
pub const KUBELET_PORT: u16 = 10250;

/// Why the node's policy refuses a target.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyRefusal {
    /// Only the node's own name and IP literals are targets: no name is resolved on a
    /// request's word.
    #[error("{0:?} is neither this node's name nor an IP address")]
    NotAnAddress(String),
    /// The address is not among those the node allows.
    #[error("{addr} is not allowed on node {node}")]
    NotAllowed { addr: SocketAddr, node: String },
}

/// What the control plane may reach on this node.
#[derive(Debug, Clone)]
pub struct Policy {
    pub node_name: String,
    pub node_ips: Vec<IpAddr>,
    allowed: BTreeSet<SocketAddr>,
}

impl Policy {
    /// The kubelet on loopback and on every node address, plus `extra` addresses, plus
    /// `ports` on loopback and on every node address.
    pub fn new(
        node_name: String,
        node_ips: Vec<IpAddr>,
        extra: &[SocketAddr],
        ports: &[u16],
    ) -> Self {
        let mut allowed = BTreeSet::new();
        let local: Vec<IpAddr> = std::iter::once(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .chain(node_ips.iter().copied())
            .collect();
        for port in std::iter::once(KUBELET_PORT).chain(ports.iter().copied()) {
            for ip in &local {
                allowed.insert(SocketAddr::new(*ip, port));
            }
        }
        allowed.extend(extra.iter().copied());
        Policy {
            node_name,
            node_ips,
            allowed,
        }
    }

    /// Where a requested target goes on this node, if it is allowed. The node's own name means
    /// loopback; anything else must be an IP literal (no name is resolved on a request's word).
    pub fn resolve(&self, host: &str, port: u16) -> Result<SocketAddr, PolicyRefusal> {
        let ip = if host.eq_ignore_ascii_case(&self.node_name) || host == "localhost" {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            host.trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<IpAddr>()
                .map_err(|_| PolicyRefusal::NotAnAddress(host.to_string()))?
        };
        let addr = SocketAddr::new(ip, port);
        if self.allowed.contains(&addr) {
            Ok(addr)
        } else {
            Err(PolicyRefusal::NotAllowed {
                addr,
                node: self.node_name.clone(),
            })
        }
    }
}

/// Most reverse streams served at once.
pub const MAX_REVERSE_STREAMS: usize = 1024;
/// How long a connection to a target on the node may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Serves streams the servers open towards this node.
pub struct Reverse {
    pub policy: Policy,
    pub metrics: Arc<Metrics>,
    pub limit: Arc<Semaphore>,
}

impl Reverse {
    pub async fn serve(self: Arc<Self>, mut stream: Stream) {
        let Ok(_permit) = self.limit.clone().try_acquire_owned() else {
            warn!(
                limit = MAX_REVERSE_STREAMS,
                "reverse stream refused: limit reached"
            );
            let _ = answer(&mut stream, StatusCode::Busy, "too many reverse streams").await;
            return;
        };
        let first = tokio::time::timeout(Duration::from_secs(10), stream.recv.read_message()).await;
        let (host, port) = match first {
            Ok(Ok(Some(Message::Open {
                version: PROTOCOL_VERSION,
                target: Target::Address { host, port },
                ..
            }))) => (host, port),
            Ok(Ok(Some(other))) => {
                warn!(
                    message = other.name(),
                    "reverse stream refused: not an address to reach"
                );
                let why = "expected an address to reach".to_string();
                let _ = answer(&mut stream, StatusCode::BadRequest, why).await;
                return;
            }
            _ => {
                stream.reset(code::PROTOCOL).await;
                return;
            }
        };
        let target = match self.policy.resolve(&host, port) {
            Ok(t) => t,
            Err(why) => {
                self.metrics.reverse_refused.inc();
                warn!(target = %format!("{host}:{port}"), reason = %why, "reverse stream refused by policy");
                let _ = answer(&mut stream, StatusCode::RefusedByPolicy, why.to_string()).await;
                return;
            }
        };
        let tcp =
            match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target))
                .await
            {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    debug!(%target, error = %e, "reverse target unreachable");
                    let why = format!("cannot connect to {target}: {e}");
                    let _ = answer(&mut stream, StatusCode::UpstreamUnreachable, why).await;
                    return;
                }
                Err(_) => {
                    let why = format!("{target} did not answer within {CONNECT_TIMEOUT:?}");
                    let _ = answer(&mut stream, StatusCode::Timeout, why).await;
                    return;
                }
            };
        if answer(&mut stream, StatusCode::Ok, "").await.is_err() {
            return;
        }
        self.metrics.reverse_streams.inc();
        let _open = GaugeGuard::new(&self.metrics.reverse_open);
        let summary = relay::relay(tcp, stream, &[&self.metrics.shared.bytes]).await;
        debug!(%target, outcome = ?summary.outcome, "reverse stream done");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_kubelet_and_what_is_added() {
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let p = Policy::new(
            "node-1".into(),
            vec![ip],
            &["127.0.0.1:9100".parse().unwrap()],
            &[8080],
        );
        assert_eq!(
            p.resolve("node-1", 10250).unwrap(),
            "127.0.0.1:10250".parse().unwrap()
        );
        assert_eq!(
            p.resolve("NODE-1", 8080).unwrap(),
            "127.0.0.1:8080".parse().unwrap()
        );
        assert!(p.resolve("10.1.2.3", 10250).is_ok());
        assert!(p.resolve("10.1.2.3", 8080).is_ok());
        assert!(p.resolve("127.0.0.1", 9100).is_ok());
        assert!(p.resolve("10.1.2.3", 9100).is_err());
        assert!(p.resolve("10.1.2.3", 10251).is_err());
        assert!(
            p.resolve("10.9.9.9", 10250).is_err(),
            "another host is never reachable"
        );
        assert!(p.resolve("node-2", 10250).is_err());
        assert!(p.resolve("example.com", 10250).is_err());
    }
}
