//! `tether-agent`: listens where kubelet expects the API server and carries each connection
//! through an outbound QUIC tunnel to one of the `tether-server`s, keeping a tunnel to every
//! server it knows.
//!
//! The library runs a whole agent in-process ([`start`]), so that tests and the demo drive the
//! same code the binary runs.
#![forbid(unsafe_code)]

pub mod config;
pub mod diagnose;
pub mod discovery;
pub mod forward;
pub mod join;
pub mod metrics;
pub mod race;
pub mod renew;
pub mod reverse;
pub mod server_policy;

use crate::config::AgentConfig;
use crate::metrics::Metrics;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tether_endpoint::admin::{self, AdminSource, NotReady};
use tether_endpoint::status::{AgentStatus, LinkStatus, Listener, Status};
use tether_link::pool::Pool;
use tether_link::reconnect::Dialer;
use tether_process::shutdown::{self, Shutdown};
use tether_proto::SERVICE_APISERVER;
use tether_transport::tls;
use tokio::task::JoinSet;
use tracing::info;

/// Why an agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}; issue certificates with `tether-server issue-agent` and point --data-dir (or --ca/--cert/--key) at them")]
    Tls(#[from] tls::TlsError),
    #[error("the agent certificate has no common name (node name)")]
    NoNodeName,
    #[error("no --server given: name at least one tether-server (host:port)")]
    NoServers,
    #[error("cannot open a UDP socket for QUIC: {0}")]
    Socket(std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on {addr}: the port is taken by process {holder}; stop it (or choose another --listen)")]
    PortTaken { addr: SocketAddr, holder: String },
    #[error(transparent)]
    Join(#[from] join::JoinError),
    #[error("cannot finish storing a renewed certificate: {0}")]
    Identity(tether_trust::CertError),
}

/// A running agent. Call [`AgentHandle::shutdown`] or [`AgentHandle::drain`] to stop it.
pub struct AgentHandle {
    /// The local listener's address.
    pub listen_addr: SocketAddr,
    /// The `--forward` listeners' addresses and services, in the order given.
    pub forward_addrs: Vec<(SocketAddr, String)>,
    pub admin_addr: Option<SocketAddr>,
    /// The node name, from the agent's certificate.
    pub node_name: String,
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    accepting: Shutdown,
    shutdown: Shutdown,
    endpoint: quinn::Endpoint,
    tasks: JoinSet<()>,
}

impl AgentHandle {
    /// Tunnels up now.
    pub fn tunnels_up(&self) -> usize {
        self.pool.len()
    }

    /// The servers with a tunnel up now, in configured order.
    pub fn connected_servers(&self) -> Vec<String> {
        self.pool.all().iter().map(|l| l.server.clone()).collect()
    }

    /// The connected servers that announced that they are draining.
    pub fn draining_servers(&self) -> Vec<String> {
        self.pool
            .all()
            .iter()
            .filter(|l| l.draining())
            .map(|l| l.server.clone())
            .collect()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Stops accepting new connections, lets open streams finish for up to `timeout`, then
    /// shuts down. Returns how many streams were still open at the end.
    pub async fn drain(self, timeout: Duration) -> i64 {
        info!(timeout = ?timeout, open = self.metrics.shared.streams_open.get(), "draining: no new connections");
        self.metrics.shared.draining.set(1);
        self.accepting.trigger();
        let metrics = &self.metrics;
        shutdown::wait_while(timeout, || metrics.shared.streams_open.get() > 0).await;
        let left = self.metrics.shared.streams_open.get();
        self.shutdown().await;
        left
    }

    /// Stops accepting, closes the tunnels and waits for the tasks to end.
    pub async fn shutdown(mut self) {
        self.accepting.trigger();
        self.shutdown.trigger();
        while self.tasks.join_next().await.is_some() {}
        self.endpoint.close(
            quinn::VarInt::from_u32(tether_proto::code::SHUTDOWN),
            b"agent shutting down",
        );
        self.endpoint.wait_idle().await;
    }
}

/// Loads the certificates, binds the local listener and starts keeping tunnels.
pub async fn start(config: AgentConfig) -> Result<AgentHandle, AgentError> {
    if config.servers.is_empty() {
        return Err(AgentError::NoServers);
    }
    let endpoint = tether_endpoint::net::quic_endpoint(SocketAddr::from(([0u16; 8], 0)), None)
        .or_else(|_| tether_endpoint::net::quic_endpoint(SocketAddr::from(([0u8; 4], 0)), None))
        .map_err(AgentError::Socket)?;
    // A renewal or join that a crash interrupted leaves `NAME.next` files: finish it, or drop
    // the half-written pair, before the identity is read.
    if tether_trust::recover_identity(&config.cert, &config.key).map_err(AgentError::Identity)? {
        info!(cert = %config.cert.display(), "finished storing a certificate that a crash interrupted");
    }
    if !config.cert.exists() || !config.key.exists() {
        let token = config.token.clone().ok_or(join::JoinError::NoToken)?;
        join::join(&config, &endpoint, &token).await?;
    }
    let roots = tls::load_roots(&config.ca)?;
    let identity = tls::Identity::load(&config.cert, &config.key)?;
    let node_name = identity
        .chain
        .first()
        .and_then(tls::peer_info)
        .map(|p| p.common_name)
        .ok_or(AgentError::NoNodeName)?;
    let tls_config = tls::client_config(roots, identity, config.limits.post_quantum)?;
    let transport = tls::quic_transport(config.liveness, config.limits);
    let client_config = tls::quic_client_config(tls_config.clone(), transport)?;

    // The apiserver listener first, then one per --forward; all bound before anything starts,
    // so that a taken port fails the start with its address.
    let mut listeners = Vec::new();
    let wanted = std::iter::once((config.listen, SERVICE_APISERVER.to_string()))
        .chain(config.forwards.iter().cloned());
    for (addr, service) in wanted {
        let l = tether_endpoint::net::listen_tcp(addr).map_err(|source| {
            let holder = (source.kind() == std::io::ErrorKind::AddrInUse)
                .then(|| tether_endpoint::net::port_holder(addr.port()))
                .flatten();
            match holder {
                Some(holder) => AgentError::PortTaken { addr, holder },
                None => AgentError::Listen { addr, source },
            }
        })?;
        let bound = l
            .local_addr()
            .map_err(|source| AgentError::Listen { addr, source })?;
        listeners.push((l, bound, service));
    }
    let listen_addr = listeners[0].1;
    let forward_addrs: Vec<(SocketAddr, String)> = listeners
        .iter()
        .skip(1)
        .map(|(_, a, s)| (*a, s.clone()))
        .collect();

    let pool = Arc::new(Pool::default());
    let metrics = Arc::new(Metrics::default());
    let shutdown = Shutdown::new();
    let accepting = Shutdown::new();
    let mut tasks = JoinSet::new();

    let mut admin_addr = None;
    if let Some(addr) = config.admin {
        let l = tether_endpoint::net::listen_tcp(addr)
            .map_err(|source| AgentError::Listen { addr, source })?;
        admin_addr = l.local_addr().ok();
        let view = AdminView {
            pool: pool.clone(),
            metrics: metrics.clone(),
            node: node_name.clone(),
            listeners: std::iter::once((listen_addr, SERVICE_APISERVER.to_string()))
                .chain(forward_addrs.iter().cloned())
                .collect(),
            seeds: config.servers.clone(),
            proxy: config.proxy.as_ref().map(|p| p.to_string()),
        };
        let mut stop = shutdown.signal();
        tasks.spawn(async move {
            tokio::select! {
                _ = admin::serve(l, Arc::new(view)) => {}
                _ = stop.wait() => {}
            }
        });
    }

    // What the control plane may reach on the node: its own addresses, never those of the
    // container, CNI or IPVS interfaces (see `default_route_addresses`).
    let node_ips = if config.node_ips.is_empty() {
        tether_endpoint::net::default_route_addresses()
    } else {
        config.node_ips.clone()
    };
    let policy = reverse::Policy::new(
        node_name.clone(),
        node_ips.clone(),
        &config.allow,
        &config.allow_ports,
    );
    let reverse = Arc::new(reverse::Reverse {
        policy,
        metrics: metrics.clone(),
        limit: Arc::new(tokio::sync::Semaphore::new(reverse::MAX_REVERSE_STREAMS)),
    });
    // A server's `RenewNow` goes to the renewal loop, with the server it came from.
    let (ask, asks) = tokio::sync::mpsc::channel(renew::ASKS);
    let dialer = Arc::new(Dialer {
        endpoint: endpoint.clone(),
        client_config: std::sync::RwLock::new(client_config),
        tcp_tls: std::sync::RwLock::new(Arc::new(tls_config)),
        transport: config.transport,
        liveness: config.liveness,
        max_streams: config.limits.max_streams,
        hello_name: node_name.clone(),
        capabilities: tether_proto::capability::Capabilities::ours(&[]),
        own_server_id: None,
        handshake_timeout: config.handshake_timeout,
        pool: pool.clone(),
        stats: metrics.links.clone(),
        changed: Arc::new(tokio::sync::Notify::new()),
        kind: tether_link::reconnect::LinkKind::Server,
        proxy: config.proxy.clone(),
        on_message: Some(Box::new(move |link, m| {
            if let tether_proto::Message::RenewNow { issuer, trusted } = m {
                let _ = ask.try_send(renew::Ask {
                    server: link.server.clone(),
                    issuer: issuer.clone(),
                    trusted: trusted.clone(),
                });
            }
        })),
        outbox: None,
        after_welcome: vec![tether_proto::Message::NodeInfo {
            addresses: node_ips.iter().take(64).map(|ip| ip.to_string()).collect(),
        }],
        on_stream: Some(Arc::new(move |s| {
            let r = reverse.clone();
            Box::pin(async move { r.serve(s).await })
        })),
        identity: Default::default(),
        on_down: None,
    });
    tasks.spawn(tether_link::monitor::run(
        pool.clone(),
        tether_link::monitor::settings(config.liveness),
        shutdown.signal(),
    ));
    tasks.spawn(renew::run(
        config.clone(),
        node_name.clone(),
        pool.clone(),
        dialer.clone(),
        metrics.clone(),
        asks,
        shutdown.signal(),
    ));
    let discovery = discovery::Discovery {
        seeds: config.servers.clone(),
        state_file: config
            .state_dir
            .as_ref()
            .map(|d| d.join(discovery::STATE_FILE)),
        dialer,
        reconnect_initial: config.reconnect_initial,
        reconnect_max: config.reconnect_max,
        allowed_networks: config.allow_server_networks.clone(),
        metrics: metrics.clone(),
    };
    tasks.spawn(discovery.run(shutdown.signal()));
    for (listener, _, service) in listeners {
        let settings = forward::Forwarding {
            early_data: config.early_data.contains(&service),
            service,
            policy: config.policy,
            stream_open_timeout: config.stream_open_timeout,
            last_attempt_timeout: config.last_attempt_timeout,
            reconnect_grace: config.reconnect_grace,
            blackout_tolerance: config.liveness.blackout_tolerance,
            max_connections: config.max_connections,
        };
        tasks.spawn(forward::serve(
            listener,
            pool.clone(),
            metrics.clone(),
            settings,
            accepting.signal(),
        ));
    }
    info!(node = %node_name, listen = %listen_addr, servers = ?config.servers,
        policy = config.policy.name(), "tether-agent started");
    Ok(AgentHandle {
        listen_addr,
        forward_addrs,
        admin_addr,
        node_name,
        pool,
        metrics,
        accepting,
        shutdown,
        endpoint,
        tasks,
    })
}

struct AdminView {
    pool: Arc<Pool>,
    metrics: Arc<Metrics>,
    node: String,
    /// Local listeners and the service each reaches.
    listeners: Vec<(SocketAddr, String)>,
    /// The servers given with `--server`, shown as down while no tunnel to them is up.
    seeds: Vec<String>,
    /// The HTTP proxy TLS over TCP dials through, as shown (no password).
    proxy: Option<String>,
}

impl AdminSource for AdminView {
    fn ready(&self) -> Result<String, NotReady> {
        if self.metrics.shared.draining.get() > 0 {
            Err(NotReady::Draining)
        } else if self.pool.is_empty() {
            Err(NotReady::NoTunnel)
        } else {
            Ok("ok".into())
        }
    }

    fn metrics(&self) -> String {
        self.metrics.render(&self.pool)
    }

    fn status(&self) -> Status {
        let links = self.pool.all();
        let mut servers: Vec<_> = links.iter().map(|l| l.status()).collect();
        for seed in &self.seeds {
            if !links.iter().any(|l| &l.server == seed) {
                servers.push(LinkStatus::down(seed));
            }
        }
        let listeners = self
            .listeners
            .iter()
            .map(|(a, s)| Listener {
                address: a.to_string(),
                service: s.clone(),
            })
            .collect();
        let expiry = self.metrics.shared.cert_expiry.get();
        Status::Agent(AgentStatus {
            version: tether_process::VERSION.into(),
            node: self.node.clone(),
            draining: self.metrics.shared.draining.get() > 0,
            certificate_expiry: (expiry > 0).then_some(expiry),
            servers,
            listeners,
            proxy: self.proxy.clone(),
        })
    }
}
