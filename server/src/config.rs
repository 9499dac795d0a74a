//! Run-time settings of a server, as the library takes them (the binary maps flags onto them).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tether_common::tls::{Liveness, TunnelLimits};

/// Everything `tether-server run` can be told.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Holds `ca.crt`, `server.crt` and `server.key`.
    pub data_dir: PathBuf,
    /// UDP address of the QUIC listener.
    pub listen: SocketAddr,
    /// The kube-apiserver every stream is relayed to, `host:port`.
    pub upstream: String,
    /// Other servers (`host:port`; a DNS name counts for every address) to connect to, relay
    /// through, and announce to agents.
    pub peers: Vec<String>,
    /// The address agents and peers should dial for this server, as announced to them. Default:
    /// the listen address when it names one, else the host's first address with the listen port.
    pub advertise: Option<String>,
    /// CA of the apiserver's certificate: when set, the health check is an HTTPS `GET /readyz`.
    pub upstream_ca: Option<PathBuf>,
    /// How long open streams may take to finish after SIGTERM.
    pub drain_timeout: Duration,
    /// How long a peer may take to answer a relayed stream.
    pub peer_open_timeout: Duration,
    /// Most tunnels one node identity may hold at once (restarts overlapping, several paths).
    pub max_tunnels_per_node: usize,
    /// Join attempts allowed per source address per minute.
    pub join_rate_per_minute: u32,
    /// Lifetime of certificates signed for joining and renewing agents.
    pub agent_cert_lifetime: Duration,
    /// How often the node records and certificate files are checked for changes.
    pub reload_interval: Duration,
    /// The egress proxy (reverse path) listeners.
    pub egress: crate::egress::EgressConfig,
    /// Admin endpoint (health, readiness, metrics); none when unset.
    pub admin: Option<SocketAddr>,
    /// Longest wait for a TCP connection to the upstream. Shorter than the agent's last-attempt
    /// wait, so that the agent always hears why a stream failed.
    pub connect_timeout: Duration,
    /// Longest a TLS handshake may take; a stalled client is dropped after it.
    pub handshake_timeout: Duration,
    /// Longest a new stream may take to send its header; a stalled client is reset after it.
    pub header_timeout: Duration,
    /// How often the upstream is checked.
    pub health_interval: Duration,
    /// Most streams relayed at once by this server; more are answered `busy`.
    pub max_streams: usize,
    pub liveness: Liveness,
    pub limits: TunnelLimits,
}

impl ServerConfig {
    /// Defaults for everything but the data directory.
    pub fn new(data_dir: PathBuf) -> Self {
        ServerConfig {
            data_dir,
            listen: SocketAddr::from(([0, 0, 0, 0], 9443)),
            upstream: "127.0.0.1:6443".into(),
            egress: Default::default(),
            max_tunnels_per_node: 8,
            join_rate_per_minute: 10,
            agent_cert_lifetime: Duration::from_secs(365 * 86400),
            reload_interval: Duration::from_secs(1),
            peers: Vec::new(),
            advertise: None,
            upstream_ca: None,
            drain_timeout: Duration::from_secs(30),
            peer_open_timeout: Duration::from_millis(1500),
            admin: None,
            connect_timeout: Duration::from_secs(3),
            handshake_timeout: Duration::from_secs(10),
            header_timeout: Duration::from_secs(10),
            health_interval: Duration::from_secs(1),
            max_streams: 65536,
            liveness: Liveness::default(),
            limits: TunnelLimits::default(),
        }
    }
}
