//! Run-time settings of an agent, as the library takes them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tether_link::pool::Policy;
use tether_transport::tls::{Liveness, TunnelLimits};

/// Everything `tether-agent run` can be told.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Servers to keep a tunnel to, `host:port` each.
    pub servers: Vec<String>,
    /// QUIC, TLS over TCP, or QUIC with TCP as the fallback.
    pub transport: tether_link::reconnect::TransportChoice,
    /// The HTTP proxy TLS over TCP and the join dial through (`--proxy`, or `HTTPS_PROXY`).
    pub proxy: Option<tether_link::proxy::Proxy>,
    /// A join token, used when the data directory holds no certificate yet.
    pub token: Option<String>,
    /// The node name to join as (default: the host name).
    pub node_name: Option<String>,
    /// The node's addresses as reported to the servers; empty: discovered from the interfaces.
    pub node_ips: Vec<std::net::IpAddr>,
    /// Extra targets the control plane may reach on this node.
    pub allow: Vec<SocketAddr>,
    /// Extra ports the control plane may reach on loopback and the node's addresses.
    pub allow_ports: Vec<u16>,
    /// Networks where announced servers may be even when loopback or link-local
    /// (`--allow-server-network`; see `server_policy`).
    pub allow_server_networks: Vec<crate::server_policy::Cidr>,
    /// Where the last announced server list is kept (`servers` in the data directory).
    pub state_dir: Option<PathBuf>,
    /// How a new connection picks among healthy servers.
    pub policy: Policy,
    /// How long open streams may take to finish after SIGTERM.
    pub drain_timeout: Duration,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Local TCP listener (the address kubelet and kube-proxy use).
    pub listen: SocketAddr,
    /// More local listeners, each carried to a named service of the servers (`--forward`).
    pub forwards: Vec<(SocketAddr, String)>,
    /// Admin endpoint (health, readiness, metrics); none when unset.
    pub admin: Option<SocketAddr>,
    /// Services whose traffic is TLS, whose first bytes may travel with the open (a retry
    /// elsewhere may send them twice, which only a TLS handshake shrugs off).
    pub early_data: Vec<String>,
    /// How long a server may take to answer a stream open before the next server is tried.
    pub stream_open_timeout: Duration,
    /// How long the last server left may take to answer. Longer than the server's upstream
    /// connect timeout, so that the agent hears the server's verdict.
    pub last_attempt_timeout: Duration,
    /// How long a new local connection that finds no tunnel up waits for one, counted from
    /// when the last tunnel went down. It covers the gap between one tunnel and the next (a
    /// fallback from QUIC to TCP, the last server restarting); past it, connections are
    /// refused at once.
    pub reconnect_grace: Duration,
    /// Longest a tunnel's TLS handshake and hello may take.
    pub handshake_timeout: Duration,
    /// First reconnect delay bound; doubles per failure up to `reconnect_max`.
    pub reconnect_initial: Duration,
    pub reconnect_max: Duration,
    /// Most local connections carried at once; more are reset.
    pub max_connections: usize,
    pub liveness: Liveness,
    pub limits: TunnelLimits,
}

impl AgentConfig {
    pub fn new(servers: Vec<String>, data_dir: PathBuf) -> Self {
        AgentConfig {
            servers,
            transport: tether_link::reconnect::TransportChoice::Auto,
            proxy: None,
            node_ips: Vec::new(),
            allow: Vec::new(),
            allow_ports: Vec::new(),
            allow_server_networks: Vec::new(),
            token: None,
            node_name: None,
            state_dir: Some(data_dir.clone()),
            policy: Policy::LeastStreams,
            drain_timeout: Duration::from_secs(30),
            ca: data_dir.join(tether_trust::files::CA_CERT),
            cert: data_dir.join(tether_trust::files::AGENT_CERT),
            key: data_dir.join(tether_trust::files::AGENT_KEY),
            listen: SocketAddr::from(([127, 0, 0, 1], 6443)),
            forwards: Vec::new(),
            admin: None,
            early_data: vec![tether_proto::SERVICE_APISERVER.to_string()],
            stream_open_timeout: Duration::from_millis(500),
            last_attempt_timeout: Duration::from_secs(5),
            reconnect_grace: tether_link::RECONNECT_GRACE,
            handshake_timeout: Duration::from_secs(5),
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(5),
            max_connections: 16384,
            // The agent probes an idle tunnel every 25 s (under the 30 s that the shortest
            // common NAT keeps a UDP binding), judges a server dead after 2 s of silence while
            // another answers (at once when a surviving server reports it down and it is
            // silent), and holds every tunnel through a 30 s blackout of the link. 1.5 s reset
            // live servers' streams on a busy cellular link (docs/operations.md, "Liveness").
            liveness: Liveness {
                keepalive_interval: Duration::from_secs(25),
                idle_timeout: Duration::from_millis(2000),
                blackout_tolerance: Duration::from_secs(30),
            },
            limits: TunnelLimits {
                // Servers open streams to the agent for the reverse path.
                max_streams: 1024,
                ..TunnelLimits::default()
            },
        }
    }
}

/// Why a `--forward` did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    #[error("{0:?}: expected LISTEN_ADDR=SERVICE")]
    Shape(String),
    #[error("{text:?}: not an address ({why})")]
    Address {
        text: String,
        why: std::net::AddrParseError,
    },
    #[error(transparent)]
    Name(#[from] tether_proto::BadServiceName),
}

/// Parses `LISTEN=NAME` for `--forward`: a local address and the server-side service it reaches.
pub fn parse_forward(s: &str) -> Result<(SocketAddr, String), ForwardError> {
    let (addr, name) = s
        .rsplit_once('=')
        .ok_or_else(|| ForwardError::Shape(s.to_string()))?;
    let addr: SocketAddr = addr.parse().map_err(|why| ForwardError::Address {
        text: addr.to_string(),
        why,
    })?;
    tether_proto::validate_service_name(name)?;
    Ok((addr, name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::parse_forward;

    #[test]
    fn forwards_parse_and_bad_ones_say_why() {
        let (addr, name) = parse_forward("127.0.0.1:7000=bulk").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((addr.port(), name.as_str()), (7000, "bulk"));
        assert!(parse_forward("127.0.0.1:7000").is_err());
        assert!(parse_forward("nohost=bulk").is_err());
        assert!(parse_forward("127.0.0.1:1=UPPER").is_err());
    }
}
