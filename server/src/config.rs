//! Run-time settings of a server, as the library takes them (the binary maps flags onto them).

use crate::datastore::etcd::EtcdSettings;
use crate::datastore::Kind;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tether_transport::tls::{Liveness, TunnelLimits};

/// The etcd key prefix unless `--etcd-prefix` says otherwise.
pub const DEFAULT_ETCD_PREFIX: &str = "/tether/";

/// Everything `tether-server run` can be told.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Holds `ca.crt`, `server.crt` and `server.key`.
    pub data_dir: PathBuf,
    /// Address of the listeners: QUIC on its UDP port, TLS over TCP on the same TCP port.
    pub listen: SocketAddr,
    /// The kube-apiserver every stream is relayed to, `host:port`.
    pub upstream: String,
    /// More upstreams that agents may reach by name (`name -> host:port`): for example a
    /// konnectivity or registry endpoint next to the apiserver. Only these names are relayed:
    /// a server never opens an address an agent chooses.
    pub services: Vec<(String, String)>,
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
    /// Most node records in the cluster: a join that would add one more is refused, so that no
    /// token, however many uses it has, can grow the records (and etcd) without bound.
    pub max_nodes: usize,
    /// Lifetime of certificates signed for joining and renewing agents.
    pub agent_cert_lifetime: Duration,
    /// How often the node records and certificate files are checked for changes.
    pub reload_interval: Duration,
    /// The egress proxy (reverse path) listeners.
    pub egress: EgressConfig,
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
    /// Most streams one node may have open at once over all its tunnels.
    pub max_streams_per_node: usize,
    pub liveness: Liveness,
    pub limits: TunnelLimits,
    /// Where records, tokens and (etcd) membership live.
    pub datastore: Kind,
    /// How to reach etcd, with `datastore: Kind::Etcd`.
    pub etcd: EtcdSettings,
}

impl ServerConfig {
    /// Defaults for everything but the data directory.
    pub fn new(data_dir: PathBuf) -> Self {
        ServerConfig {
            data_dir,
            listen: SocketAddr::from(([0, 0, 0, 0], 9443)),
            upstream: "127.0.0.1:6443".into(),
            services: Vec::new(),
            egress: Default::default(),
            max_tunnels_per_node: 8,
            join_rate_per_minute: 10,
            max_nodes: 50_000,
            agent_cert_lifetime: Duration::from_secs(365 * 86400),
            reload_interval: Duration::from_millis(500),
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
            max_streams_per_node: 8192,
            liveness: Liveness::default(),
            limits: TunnelLimits::default(),
            datastore: Kind::Dir,
            etcd: EtcdSettings {
                prefix: DEFAULT_ETCD_PREFIX.into(),
                ..Default::default()
            },
        }
    }
}

/// What a QUIC connection may have in flight towards this server before it is known not to be a
/// join: an unauthenticated join connection keeps this window (and one stream); a tunnel gets
/// its full `conn_window` right after the handshake.
pub const JOIN_WINDOW: u32 = 64 * 1024;

impl ServerConfig {
    /// The transport's stream limit sits a little above the server's own, so that the server's
    /// check (a clear `busy` status, a log line, a metric) bites first and the control and
    /// renewal streams always fit.
    pub fn transport_limits(&self) -> TunnelLimits {
        let mut l = self.limits;
        l.max_streams = l.max_streams.saturating_add(16);
        l
    }

    /// The QUIC transport of the listener (see [`JOIN_WINDOW`]).
    pub fn listener_transport(&self) -> quinn::TransportConfig {
        let mut t = tether_transport::tls::quic_transport(self.liveness, self.transport_limits());
        t.receive_window(JOIN_WINDOW.into());
        t
    }
}

/// Egress listener settings.
#[derive(Debug, Clone, Default)]
pub struct EgressConfig {
    pub listen: Option<std::net::SocketAddr>,
    pub uds: Option<std::path::PathBuf>,
    /// Serve TLS with this certificate and key.
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    /// Require client certificates signed by this CA.
    pub client_ca: Option<std::path::PathBuf>,
}

/// Why a `--service` did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceError {
    #[error("{0:?}: expected NAME=HOST:PORT")]
    Shape(String),
    #[error(transparent)]
    Name(#[from] tether_proto::BadServiceName),
    #[error("the apiserver is set with --upstream, not --service")]
    Apiserver,
    #[error("{0:?}: expected HOST:PORT")]
    Address(String),
}

/// Parses `NAME=HOST:PORT` for `--service`. Names are what agents put in their stream header,
/// so they follow the same rule as node names; `apiserver` is the upstream itself.
pub fn parse_service(s: &str) -> Result<(String, String), ServiceError> {
    let (name, addr) = s
        .split_once('=')
        .ok_or_else(|| ServiceError::Shape(s.to_string()))?;
    tether_proto::validate_service_name(name)?;
    if name == tether_proto::SERVICE_APISERVER {
        return Err(ServiceError::Apiserver);
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok() => {}
        _ => return Err(ServiceError::Address(addr.to_string())),
    }
    Ok((name.to_string(), addr.to_string()))
}

#[cfg(test)]
mod tests {
    use super::parse_service;

    #[test]
    fn services_parse_and_bad_ones_say_why() {
        assert_eq!(
            parse_service("bulk=127.0.0.1:5201"),
            Ok(("bulk".into(), "127.0.0.1:5201".into()))
        );
        assert!(parse_service("bulk").is_err());
        assert!(parse_service("apiserver=1.2.3.4:6443").is_err());
        assert!(parse_service("Bad Name=1.2.3.4:1").is_err());
        assert!(parse_service("x=host").is_err());
        assert!(parse_service("x=host:99999").is_err());
    }
}
