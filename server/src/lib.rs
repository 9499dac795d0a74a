//! `tether-server`: accepts agent tunnels over QUIC with mutual TLS and relays each of their
//! streams to the kube-apiserver, or through a peer server when its own apiserver is down.
//!
//! The library runs a whole server in-process ([`start`]), so that tests and the demo drive the
//! same code the binary runs.
#![forbid(unsafe_code)]

pub mod announce;
pub mod authority;
pub mod config;
pub mod demo;
pub mod egress;
pub mod join;
pub mod metrics;
pub mod registry;
pub mod standin;
pub mod upstream;

use crate::announce::Announcer;
use crate::authority::Authority;
use crate::config::ServerConfig;
use crate::join::JoinLimiter;
use crate::metrics::Metrics;
use crate::registry::{Entry, Registry};
use crate::upstream::Upstream;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tether_certs::files;
use tether_certs::records::Verdict;
use tether_common::admin::{self, AdminSource};
use tether_common::backoff::Backoff;
use tether_common::pool::{Link, Policy, Pool};
use tether_common::protocol::capability::{self, Capabilities};
use tether_common::protocol::{
    code, Message, StatusCode, Target, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, SERVICE_APISERVER,
};
use tether_common::reconnect::{self, Dialer};
use tether_common::relay::{self, Outcome};
use tether_common::shutdown::{Shutdown, ShutdownSignal};
use tether_common::telemetry::GaugeGuard;
use tether_common::tls;
use tether_common::transport::{Stream, Tunnel};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{debug, info, warn};

/// Why a server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("{0}; run `tether-server init --data-dir DIR` to create the certificates")]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on UDP {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot serve the admin endpoint on {addr}: {source}")]
    Admin {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the egress proxy would listen on {0}, which is not loopback, without client certificates: anyone who reaches it could reach every node's kubelet. Add --egress-tls-cert, --egress-tls-key and --egress-client-ca, listen on 127.0.0.1, or use --egress-uds (kube-apiserver's EgressSelectorConfiguration supports a Unix socket)")]
    EgressUnauthenticated(SocketAddr),
    #[error("cannot read the node records: {0}")]
    Records(#[from] tether_certs::CertError),
    #[error("cannot serve the egress proxy on {what}: {source}")]
    Egress {
        what: String,
        source: std::io::Error,
    },
}

/// Shared state of a running server.
pub struct State {
    config: ServerConfig,
    metrics: Arc<Metrics>,
    registry: Registry,
    upstream: Arc<Upstream>,
    /// The named upstreams besides the apiserver (`--service`); not health-checked.
    services: std::collections::HashMap<String, Arc<Upstream>>,
    streams: Arc<Semaphore>,
    /// Handshakes in progress, both transports ([`MAX_HANDSHAKES`]).
    handshakes: Arc<Semaphore>,
    /// Join connections being served ([`MAX_JOINS`]).
    joins: Arc<Semaphore>,
    /// Random per process start: tells this server apart from its peers, and from itself.
    instance_id: String,
    /// Links this server dialed to its peers.
    peers: Arc<Pool>,
    announcer: Announcer,
    draining: AtomicBool,
    authority: Arc<Authority>,
    join_limiter: JoinLimiter,
    /// The CA certificate, handed to joining nodes.
    ca_pem: String,
    endpoint: quinn::Endpoint,
    /// The dialer of peer links, whose client identity is reloaded with the certificate.
    peer_dialer: std::sync::OnceLock<Arc<Dialer>>,
    /// TLS for tunnels over TCP; replaced when the certificate is reloaded.
    tcp_tls: std::sync::RwLock<tokio_rustls::TlsAcceptor>,
    /// One line per second for failures anyone on the network can cause (handshakes that
    /// fail or stall); `left_out` in the next line counts the rest.
    noisy_log: tether_common::telemetry::Throttle,
}

/// A running server.
pub struct ServerHandle {
    /// The UDP address the QUIC listener is bound to.
    pub local_addr: SocketAddr,
    /// The admin endpoint's address, when one was asked for.
    pub admin_addr: Option<SocketAddr>,
    /// The egress proxy's TCP address, when one was asked for.
    pub egress_addr: Option<SocketAddr>,
    state: Arc<State>,
    shutdown: Shutdown,
    endpoint: quinn::Endpoint,
    tasks: JoinSet<()>,
}

impl ServerHandle {
    pub fn metrics(&self) -> &Metrics {
        &self.state.metrics
    }

    /// Names of the nodes connected now.
    pub fn connected_nodes(&self) -> Vec<String> {
        self.state.registry.node_names()
    }

    /// Peers this server has a link to now.
    pub fn peers_up(&self) -> usize {
        self.state.peers.len()
    }

    /// The address this server announces for itself.
    pub fn advertise(&self) -> Option<String> {
        self.state.announcer.advertise().map(String::from)
    }

    /// Tells agents and peers that this server is draining, refuses new tunnels and streams,
    /// lets open streams finish for up to `timeout`, then shuts down. Returns how many streams
    /// were still open at the end.
    pub async fn drain(self, timeout: Duration) -> i64 {
        let open = self.state.metrics.streams_open.get();
        info!(timeout = ?timeout, open, "draining: agents and peers are told to send no new streams");
        self.state.draining.store(true, Ordering::Relaxed);
        self.state.metrics.draining.set(1);
        self.state.announcer.set_draining();
        let start = Instant::now();
        while self.state.metrics.streams_open.get() > 0 && start.elapsed() < timeout {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let left = self.state.metrics.streams_open.get();
        self.shutdown().await;
        left
    }

    /// Reloads the certificate and key from disk (SIGHUP): new handshakes use them, tunnels
    /// that are up keep going.
    pub fn reload_certificates(&self) -> Result<(), ServerError> {
        reload_certificates(&self.state)
    }

    /// Closes every tunnel and stops serving.
    pub async fn shutdown(mut self) {
        self.shutdown.trigger();
        self.state
            .registry
            .close_all(code::SHUTDOWN, "server shutting down");
        self.endpoint.close(
            quinn::VarInt::from_u32(code::SHUTDOWN),
            b"server shutting down",
        );
        self.tasks.shutdown().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.endpoint.wait_idle()).await;
    }
}

/// The transport's stream limit sits a little above the server's own, so that the server's
/// check (a clear `busy` status, a log line, a metric) bites first and the control and renewal
/// streams always fit.
fn transport_limits(config: &ServerConfig) -> tls::TunnelLimits {
    let mut l = config.limits;
    l.max_streams = l.max_streams.saturating_add(16);
    l
}

/// What a QUIC connection may have in flight towards this server before it is known not to be a
/// join: an unauthenticated join connection keeps this window (and one stream); a tunnel gets
/// its full `conn_window` right after the handshake.
pub const JOIN_WINDOW: u32 = 64 * 1024;

/// Most handshakes in progress at once, over both transports. Past half of it, QUIC clients
/// whose address is not validated yet are asked to retry (proving their address); past all of
/// it, new handshakes are refused.
pub const MAX_HANDSHAKES: usize = 4096;

/// Most join connections served at once: each holds at most `JOIN_WINDOW` (QUIC) or one yamux
/// window (TCP), so strangers can hold at most a few MiB of this server together.
pub const MAX_JOINS: usize = 64;

/// The QUIC transport of the listener (see [`JOIN_WINDOW`]).
fn listener_transport(config: &ServerConfig) -> quinn::TransportConfig {
    let mut t = tls::quic_transport(config.liveness, transport_limits(config));
    t.receive_window(JOIN_WINDOW.into());
    t
}

fn random_id() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// The address to announce: the configured one, else the listen address when it names one,
/// else the host's first address with the listen port.
fn advertise_address(config: &ServerConfig, bound: SocketAddr) -> Option<String> {
    if let Some(a) = &config.advertise {
        return Some(a.clone());
    }
    let ip = if bound.ip().is_unspecified() {
        *tether_common::net::host_addresses().first()?
    } else {
        bound.ip()
    };
    Some(SocketAddr::new(ip, bound.port()).to_string())
}

/// Loads the certificates, binds the listeners and starts serving.
pub async fn start(config: ServerConfig) -> Result<ServerHandle, ServerError> {
    let dir = &config.data_dir;
    let (roots, identity, ca_pem) = load_identity(dir)?;
    let tls_config = tls::server_config(roots.clone(), identity.clone())?;
    let tcp_tls = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config.clone()));
    let transport = listener_transport(&config);
    let quic_config = tls::quic_server_config(tls_config, transport)?;
    // QUIC on UDP and TLS on TCP share the port number. With port 0 (tests), retry until the
    // port the kernel picked for UDP is free for TCP too.
    let mut attempts = 0;
    let (endpoint, local_addr, tcp_listener) = loop {
        attempts += 1;
        let endpoint = tether_common::net::quic_endpoint(config.listen, Some(quic_config.clone()))
            .map_err(|source| ServerError::Listen {
                addr: config.listen,
                source,
            })?;
        let local_addr = endpoint
            .local_addr()
            .map_err(|source| ServerError::Listen {
                addr: config.listen,
                source,
            })?;
        match tether_common::net::listen_tcp(local_addr) {
            Ok(l) => break (endpoint, local_addr, l),
            Err(_) if config.listen.port() == 0 && attempts < 20 => continue,
            Err(source) => {
                return Err(ServerError::Listen {
                    addr: local_addr,
                    source,
                })
            }
        }
    };
    // Towards peers this server is a client, presenting its own server certificate.
    let peer_tls = tls::client_config(roots, identity)?;
    let peer_client = tls::quic_client_config(
        peer_tls.clone(),
        tls::quic_transport(config.liveness, config.limits),
    )?;
    let upstream_ca = match &config.upstream_ca {
        Some(path) => Some(tls::load_roots(path)?),
        None => None,
    };
    let upstream = Arc::new(Upstream::new(
        config.upstream.clone(),
        config.connect_timeout,
        upstream_ca,
    )?);
    let mut services = std::collections::HashMap::new();
    for (name, addr) in &config.services {
        let up = Upstream::new(addr.clone(), config.connect_timeout, None)?;
        services.insert(name.clone(), Arc::new(up));
    }

    let authority = Authority::new(config.data_dir.clone())?;
    let metrics = Arc::new(Metrics::default());
    let instance_id = random_id();
    let advertise = advertise_address(&config, local_addr);
    let peers = Arc::new(Pool::default());
    let announcer = Announcer::new(advertise.clone(), config.peers.clone(), peers.clone());
    let state = Arc::new(State {
        authority: Arc::new(authority),
        join_limiter: JoinLimiter::new(config.join_rate_per_minute),
        ca_pem,
        endpoint: endpoint.clone(),
        peer_dialer: std::sync::OnceLock::new(),
        tcp_tls: std::sync::RwLock::new(tcp_tls),
        noisy_log: tether_common::telemetry::Throttle::new(Duration::from_secs(1)),
        streams: Arc::new(Semaphore::new(config.max_streams)),
        handshakes: Arc::new(Semaphore::new(MAX_HANDSHAKES)),
        joins: Arc::new(Semaphore::new(MAX_JOINS)),
        registry: Registry::default(),
        metrics: metrics.clone(),
        upstream: upstream.clone(),
        services,
        instance_id: instance_id.clone(),
        peers: peers.clone(),
        announcer,
        draining: AtomicBool::new(false),
        config,
    });
    let shutdown = Shutdown::new();
    let mut tasks = JoinSet::new();

    let mut admin_addr = None;
    if let Some(addr) = state.config.admin {
        let listener = tether_common::net::listen_tcp(addr)
            .map_err(|source| ServerError::Admin { addr, source })?;
        admin_addr = listener.local_addr().ok();
        tasks.spawn(admin::serve(listener, Arc::new(AdminView(state.clone()))));
    }

    let mut egress_addr = None;
    let acceptor = egress::tls_acceptor(&state.config.egress)?;
    if let Some(addr) = state.config.egress.listen {
        let e = &state.config.egress;
        if !addr.ip().is_loopback() && (e.client_ca.is_none() || acceptor.is_none()) {
            return Err(ServerError::EgressUnauthenticated(addr));
        }
        let l = tether_common::net::listen_tcp(addr).map_err(|source| ServerError::Egress {
            what: addr.to_string(),
            source,
        })?;
        egress_addr = l.local_addr().ok();
        tasks.spawn(egress::serve_tcp(l, acceptor.clone(), state.clone()));
    }
    if let Some(path) = &state.config.egress.uds {
        let l = egress::bind_uds(path).map_err(|source| ServerError::Egress {
            what: path.display().to_string(),
            source,
        })?;
        tasks.spawn(egress::serve_uds(l, state.clone()));
    }

    let s = state.clone();
    tasks.spawn(
        upstream
            .clone()
            .watch(state.config.health_interval, move |ok| {
                s.metrics.upstream_healthy.set(ok as i64);
                s.announcer.set_healthy(ok);
            }),
    );

    // A link to every peer, kept up like an agent keeps its tunnels.
    let dialer = Arc::new(Dialer {
        endpoint: endpoint.clone(),
        client_config: std::sync::RwLock::new(peer_client),
        tcp_tls: std::sync::RwLock::new(Arc::new(peer_tls)),
        // Servers sit on one network: peers talk QUIC.
        transport: reconnect::TransportChoice::Quic,
        liveness: state.config.liveness,
        max_streams: transport_limits(&state.config).max_streams,
        hello_name: advertise.clone().unwrap_or_default(),
        capabilities: Capabilities::ours(&[capability::PEER]),
        own_server_id: Some(instance_id),
        handshake_timeout: state.config.handshake_timeout,
        pool: peers,
        stats: metrics.peer_links.clone(),
        changed: state.announcer.changed(),
        kind: "peer",
        on_message: Some(Box::new({
            let a = state.authority.clone();
            move |m: &Message| a.merge_from_peer("peer", m)
        })),
        after_welcome: Vec::new(),
        // Records travel both ways: the peers this server dials get them too (0.1 servers
        // would ignore them, so they get none).
        outbox: Some(Box::new({
            let a = state.authority.clone();
            move |caps: &Capabilities| -> Box<dyn reconnect::Outbox> {
                if caps.has(capability::RECORDS_V2) {
                    Box::new(authority::RecordsOutbox::new(a.clone(), caps))
                } else {
                    Box::new(reconnect::NoOutbox)
                }
            }
        })),
        on_stream: None,
    });
    let _ = state.peer_dialer.set(dialer.clone());
    cert_expiry(&state);
    for (rank, peer) in state.config.peers.iter().enumerate() {
        if Some(peer) == advertise.as_ref() {
            continue;
        }
        let (peer, dialer, stop) = (peer.clone(), dialer.clone(), shutdown.signal());
        let liveness_max = Duration::from_secs(5);
        tasks.spawn(async move {
            // Resolve until it works: a peer's name may not resolve yet while the cluster boots.
            let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(30));
            let targets = loop {
                match reconnect::resolve(&peer, rank).await {
                    Ok(t) if !t.is_empty() => break t,
                    Ok(_) => warn!(peer = %peer, "peer name resolves to no address"),
                    Err(e) => warn!(peer = %peer, error = %e, "cannot resolve peer"),
                }
                tokio::time::sleep(backoff.next_delay(fastrand::f64())).await;
            };
            let mut set = JoinSet::new();
            for t in targets {
                let b = Backoff::new(Duration::from_millis(100), liveness_max);
                set.spawn(reconnect::maintain(t, dialer.clone(), b, stop.clone()));
            }
            while set.join_next().await.is_some() {}
        });
    }
    tasks.spawn(state.announcer.clone().run(shutdown.signal()));
    tasks.spawn(watch_files(state.clone(), shutdown.signal()));
    tasks.spawn(accept_loop(
        endpoint.clone(),
        state.clone(),
        shutdown.signal(),
    ));
    tasks.spawn(accept_tcp(tcp_listener, state.clone(), shutdown.signal()));
    info!(listen = %local_addr, upstream = %state.config.upstream, advertise = ?advertise,
        peers = ?state.config.peers, "tether-server listening (QUIC on UDP, TLS on TCP)");
    Ok(ServerHandle {
        local_addr,
        admin_addr,
        egress_addr,
        state,
        shutdown,
        endpoint,
        tasks,
    })
}

async fn accept_loop(endpoint: quinn::Endpoint, state: Arc<State>, mut stop: ShutdownSignal) {
    loop {
        let incoming = tokio::select! {
            i = endpoint.accept() => i,
            _ = stop.wait() => return,
        };
        let Some(incoming) = incoming else { return };
        if state.draining.load(Ordering::Relaxed) {
            incoming.refuse();
            continue;
        }
        let free = state.handshakes.available_permits();
        if free < MAX_HANDSHAKES / 2 && !incoming.remote_address_validated() && incoming.may_retry()
        {
            // Many handshakes at once: make the client prove its address first (one round trip
            // for a real client, nothing kept here for a spoofed one).
            let _ = incoming.retry();
            continue;
        }
        let Ok(permit) = state.handshakes.clone().try_acquire_owned() else {
            state.metrics.limit_hit("handshakes");
            if let Some(left_out) = state.noisy_log.allow() {
                warn!(left_out, peer = %incoming.remote_address(), "refused QUIC tunnel: too many handshakes in progress");
            }
            incoming.refuse();
            continue;
        };
        let state = state.clone();
        tokio::spawn(async move {
            let remote = incoming.remote_address();
            let handshake = async {
                let connecting = incoming.accept().map_err(|e| e.to_string())?;
                connecting.await.map_err(|e| e.to_string())
            };
            let conn = match tokio::time::timeout(state.config.handshake_timeout, handshake).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    state.metrics.handshake_failures.inc();
                    if let Some(left_out) = state.noisy_log.allow() {
                        warn!(left_out,peer = %remote, error = %e, "refused tunnel: TLS handshake failed");
                    }
                    return;
                }
                Err(_) => {
                    state.metrics.handshake_failures.inc();
                    state.metrics.limit_hit("handshake_timeout");
                    if let Some(left_out) = state.noisy_log.allow() {
                        warn!(left_out,peer = %remote, timeout = ?state.config.handshake_timeout,
                            "refused tunnel: handshake did not complete in time");
                    }
                    return;
                }
            };
            drop(permit);
            let mut max = transport_limits(&state.config).max_streams;
            if tls::alpn_of(&conn).as_deref() == Some(tls::ALPN_JOIN) {
                max = 1;
                conn.set_max_concurrent_bi_streams(1u32.into());
            } else {
                conn.set_receive_window(state.config.limits.conn_window.into());
            }
            serve_connection(Tunnel::from_quic(conn, max), remote, state).await;
        });
    }
}

/// A tunnel whose handshake completed, on either transport: a join, or a tunnel to serve.
async fn serve_connection(tunnel: Tunnel, remote: SocketAddr, state: Arc<State>) {
    if tunnel.alpn().as_deref() == Some(tls::ALPN_JOIN) {
        let Ok(_slot) = state.joins.clone().try_acquire_owned() else {
            state.metrics.limit_hit("joins");
            if let Some(left_out) = state.noisy_log.allow() {
                warn!(left_out, peer = %remote, limit = MAX_JOINS, "refused join: too many joins in progress");
            }
            tunnel.close(code::LIMIT, "too many joins in progress; retry later");
            return;
        };
        return join::serve(tunnel, remote, &state).await;
    }
    serve_tunnel(tunnel, state).await;
}

/// Accepts tunnels over TLS on TCP (the fallback transport).
async fn accept_tcp(
    listener: tokio::net::TcpListener,
    state: Arc<State>,
    mut stop: ShutdownSignal,
) {
    let limit = state.handshakes.clone();
    loop {
        let (tcp, remote) = tokio::select! {
            a = listener.accept() => match a {
                Ok(c) => c,
                Err(e) => {
                    if let Some(left_out) = state.noisy_log.allow() {
                        warn!(left_out,error = %e, "TCP accept failed");
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.wait() => return,
        };
        if state.draining.load(Ordering::Relaxed) {
            continue;
        }
        // Bounds the handshakes in progress; a flood waits in the kernel's queue.
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            state.metrics.limit_hit("handshakes");
            if let Some(left_out) = state.noisy_log.allow() {
                warn!(left_out,peer = %remote, "refused TCP tunnel: too many handshakes in progress");
            }
            continue;
        };
        let state = state.clone();
        let acceptor = state
            .tcp_tls
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let max_streams = transport_limits(&state.config).max_streams as usize;
        tokio::spawn(async move {
            let handshake = tether_common::tcp::TcpTunnel::accept(
                tcp,
                acceptor,
                state.config.liveness,
                max_streams,
            );
            let t = match tokio::time::timeout(state.config.handshake_timeout, handshake).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    state.metrics.handshake_failures.inc();
                    if let Some(left_out) = state.noisy_log.allow() {
                        warn!(left_out,peer = %remote, error = %e, transport = "tcp", "refused tunnel: TLS handshake failed");
                    }
                    return;
                }
                Err(_) => {
                    state.metrics.handshake_failures.inc();
                    state.metrics.limit_hit("handshake_timeout");
                    if let Some(left_out) = state.noisy_log.allow() {
                        warn!(left_out,peer = %remote, transport = "tcp", "refused tunnel: handshake did not complete in time");
                    }
                    return;
                }
            };
            drop(permit);
            serve_connection(Tunnel::from_tcp(t), remote, state).await;
        });
    }
}

/// Who is on the other end of an inbound tunnel.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Party {
    Agent,
    Peer,
}

/// Serves one authenticated tunnel until it closes.
async fn serve_tunnel(tunnel: Tunnel, state: Arc<State>) {
    let remote = tunnel.remote_addr();
    // The node name comes from the verified certificate, never from what the agent says.
    let Some(cert) = tunnel
        .peer_certificates()
        .and_then(|c| c.into_iter().next())
    else {
        state.metrics.handshake_failures.inc();
        warn!(peer = %remote, "refused tunnel: no client certificate (join with a token, or issue one with `tether-server issue-agent`)");
        tunnel.close(code::REFUSED, "a client certificate is required");
        return;
    };
    let (Some(peer), Some(key)) = (tls::peer_info(&cert), tether_certs::key_hash_of_cert(&cert))
    else {
        state.metrics.handshake_failures.inc();
        warn!(peer = %remote, "refused tunnel: client certificate has no common name");
        tunnel.close(code::PROTOCOL, "certificate has no common name");
        return;
    };
    let party = if peer.server_auth {
        Party::Peer
    } else {
        Party::Agent
    };
    let name = peer.common_name;
    if party == Party::Agent {
        if let Err(e) = tether_certs::validate_node_name(&name) {
            state.metrics.handshake_failures.inc();
            warn!(peer = %remote, error = %e, "refused tunnel: the certificate's node name is not valid");
            tunnel.close(code::REFUSED, "invalid node name");
            return;
        }
    }
    let open_streams = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    if party == Party::Agent {
        match refusal(&state.authority.check(&name, &key)) {
            None => state.authority.confirm(&name, &key),
            Some((code, why)) => {
                state.metrics.handshake_failures.inc();
                warn!(node = %name, peer = %remote, reason = why, "refused tunnel");
                tunnel.close(code, why);
                return;
            }
        }
        if state.registry.tunnels(&name).len() >= state.config.max_tunnels_per_node {
            state.metrics.limit_hit("tunnels_per_node");
            warn!(node = %name, peer = %remote, limit = state.config.max_tunnels_per_node,
                "refused tunnel: too many tunnels for this node");
            tunnel.close(code::LIMIT, "too many tunnels for this node");
            return;
        }
        state.registry.add(
            &name,
            Entry {
                tunnel: tunnel.clone(),
                remote,
                since: SystemTime::now(),
                cert_not_after: peer.not_after,
                key_hash: key.clone(),
                addresses: Vec::new(),
                streams: open_streams.clone(),
                meter: Arc::default(),
                capabilities: Capabilities::default(),
            },
        );
        state.metrics.tunnels_total.inc();
        state.metrics.tunnels_up.inc();
        info!(node = %name, peer = %remote, transport = tunnel.transport(), "tunnel up");
    } else {
        state.metrics.peer_tunnels_in.inc();
        info!(server = %name, peer = %remote, "peer tunnel up");
    }

    // A certificate that expires while its tunnel is up ends the tunnel: the node must renew to
    // stay, as it must to connect.
    let now = tether_common::cli::unix_seconds(SystemTime::now());
    let until_expiry = Duration::from_secs(
        u64::try_from(peer.not_after)
            .unwrap_or(0)
            .saturating_sub(now),
    );
    let expired = tokio::time::sleep(until_expiry);
    tokio::pin!(expired);
    loop {
        let accepted = tokio::select! {
            a = tunnel.accept_stream() => a,
            _ = &mut expired => {
                state.metrics.expired_closed.inc();
                warn!(node = %name, peer = %remote, "closing tunnel: its certificate expired");
                tunnel.close(code::REFUSED, "certificate expired");
                break;
            }
        };
        let stream = match accepted {
            Ok(s) => s,
            Err(e) => {
                if party == Party::Agent {
                    info!(node = %name, peer = %remote, reason = %e, "tunnel down");
                } else {
                    info!(server = %name, peer = %remote, reason = %e, "peer tunnel down");
                }
                break;
            }
        };
        let state = state.clone();
        let (name, id) = (name.clone(), tunnel.id());
        let counter = open_streams.clone();
        tokio::spawn(async move { serve_stream(stream, &name, party, id, counter, &state).await });
    }
    if party == Party::Agent {
        state.registry.remove(&name, tunnel.id());
        state.metrics.tunnels_up.dec();
    } else {
        state.announcer.remove_inbound_peer(tunnel.id());
        state.metrics.peer_tunnels_in.dec();
    }
}

/// Serves one stream: the control stream, or a stream to relay.
async fn serve_stream(
    mut stream: Stream,
    node: &str,
    party: Party,
    tunnel_id: usize,
    open_streams: Arc<std::sync::atomic::AtomicUsize>,
    state: &State,
) {
    let first = tokio::time::timeout(state.config.header_timeout, stream.recv.read_message()).await;
    let msg = match first {
        Ok(Ok(Some(msg))) => msg,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            state.metrics.protocol_errors.inc();
            warn!(node, error = %e, "stream refused: bad header");
            stream.reset(code::PROTOCOL).await;
            return;
        }
        Err(_) => {
            state.metrics.protocol_errors.inc();
            warn!(node, timeout = ?state.config.header_timeout, "stream refused: no header in time");
            stream.reset(code::PROTOCOL).await;
            return;
        }
    };
    match msg {
        Message::Hello {
            min_version,
            max_version,
            node_name,
            capabilities,
        } => {
            let hello = Hello {
                min: min_version,
                max: max_version,
                capabilities: Capabilities::from_announced(&capabilities),
            };
            if party == Party::Peer && !node_name.is_empty() {
                state.announcer.add_inbound_peer(tunnel_id, node_name);
            }
            if party == Party::Agent {
                state
                    .registry
                    .set_capabilities(node, tunnel_id, hello.capabilities.clone());
            }
            control(stream, node, party, tunnel_id, hello, state).await
        }
        Message::Open {
            target: Target::Address { host, port },
            hops,
            ..
        } if party == Party::Peer && hops >= 1 => {
            egress::serve_peer_request(stream, host, port, state).await
        }
        Message::Open {
            version,
            target,
            hops,
        } => {
            let count = StreamCount::new(open_streams);
            let tunnel_limit = state.config.limits.max_streams as usize;
            if count.current() > tunnel_limit {
                let why = "stream limit of the tunnel reached";
                return busy(
                    &mut stream,
                    node,
                    "streams_per_tunnel",
                    tunnel_limit,
                    why,
                    state,
                )
                .await;
            }
            let node_limit = state.config.max_streams_per_node;
            if party == Party::Agent && state.registry.node_streams(node) > node_limit {
                let why = "stream limit of the node reached";
                return busy(
                    &mut stream,
                    node,
                    "streams_per_node",
                    node_limit,
                    why,
                    state,
                )
                .await;
            }
            open(stream, node, version, target, hops, state).await
        }
        Message::Renew { csr } if party == Party::Agent => {
            let key = state
                .registry
                .tunnels(node)
                .into_iter()
                .find(|e| e.tunnel.id() == tunnel_id)
                .map(|e| e.key_hash);
            match key {
                Some(key) => join::renew(stream, node, &key, csr, state).await,
                None => stream.reset(code::REVOKED).await,
            }
        }
        other => {
            state.metrics.protocol_errors.inc();
            warn!(
                node,
                message = other.name(),
                "stream refused: unexpected first message"
            );
            stream.reset(code::PROTOCOL).await;
        }
    }
}

/// What the dialing side said in its hello.
struct Hello {
    min: u8,
    max: u8,
    capabilities: Capabilities,
}

/// The next node records for a peer's control stream; never, for an agent's.
async fn next_records(outbox: &mut Option<authority::RecordsOutbox>) -> Vec<Message> {
    match outbox {
        Some(o) => o.next().await,
        None => std::future::pending().await,
    }
}

/// The control stream: version agreement, then this server's announcements (health, the
/// server list, drain) as they change.
async fn control(
    mut stream: Stream,
    node: &str,
    party: Party,
    tunnel_id: usize,
    hello: Hello,
    state: &State,
) {
    let (min, max, capabilities) = (hello.min, hello.max, &hello.capabilities);
    if !(min..=max).contains(&PROTOCOL_VERSION) {
        state.metrics.protocol_errors.inc();
        warn!(
            node,
            min,
            max,
            ours = PROTOCOL_VERSION,
            oldest = MIN_PROTOCOL_VERSION,
            "no common protocol version"
        );
        stream.reset(code::PROTOCOL).await;
        return;
    }
    let welcome = Message::Welcome {
        version: PROTOCOL_VERSION,
        server_id: state.instance_id.clone(),
        capabilities: Capabilities::ours(&[]),
    };
    if stream.send.write_message(&welcome).await.is_err() {
        return;
    }
    let mut rx = state.announcer.subscribe();
    let mut sent: Option<announce::Announcement> = None;
    // Over TCP the health is repeated every keepalive interval: the agent's proof that this
    // server is alive end to end (see `Stream::needs_heartbeat`).
    let heartbeat = stream.needs_heartbeat();
    let mut beat = tokio::time::interval(state.config.liveness.keepalive_interval);
    beat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Peers also get the node records, each when it is new to them.
    let mut records = (party == Party::Peer)
        .then(|| authority::RecordsOutbox::new(state.authority.clone(), capabilities));
    loop {
        let now = rx.borrow_and_update().clone();
        for msg in announce::diff(sent.as_ref(), &now) {
            if stream.send.write_message(&msg).await.is_err() {
                return;
            }
        }
        sent = Some(now);
        tokio::select! {
            r = rx.changed() => if r.is_err() { return },
            msgs = next_records(&mut records) => {
                for m in msgs {
                    if stream.send.write_message(&m).await.is_err() {
                        return;
                    }
                }
            }
            _ = beat.tick(), if heartbeat => {
                let healthy = sent.as_ref().is_some_and(|a| a.healthy);
                let msg = Message::Health { upstream_healthy: healthy };
                if stream.send.write_message(&msg).await.is_err() {
                    return;
                }
            }
            m = stream.recv.read_message() => match m {
                Ok(Some(Message::NodeInfo { addresses })) if party == Party::Agent => {
                    debug!(node, ?addresses, "node addresses");
                    for (address, other) in state.registry.set_addresses(node, tunnel_id, addresses) {
                        state.metrics.address_conflicts.inc();
                        warn!(node, %address, other_node = %other,
                            "address claimed by two nodes: it is contested, and the egress proxy refuses it until one of them goes away");
                    }
                }
                Ok(Some(m @ (Message::NodeRecord { .. } | Message::NodeRecordV2 { .. })))
                    if party == Party::Peer =>
                {
                    state.authority.merge_from_peer(node, &m)
                }
                Ok(Some(m)) => debug!(node, message = m.name(), "control message"),
                Ok(None) => return,
                Err(e) => {
                    state.metrics.protocol_errors.inc();
                    warn!(node, error = %e, "control stream failed; the tunnel's announcements stop");
                    return;
                }
            },
        }
    }
}

async fn refuse(stream: &mut Stream, code: StatusCode, message: String, state: &State) {
    state.metrics.stream_failed(code);
    let _ = stream
        .send
        .write_message(&Message::Status { code, message })
        .await;
    stream.send.finish().await;
}

/// Refuses a stream because a stream limit was reached: `busy` (the agent tries the next
/// server), a log line and the limit's metric.
async fn busy(
    stream: &mut Stream,
    node: &str,
    limit_name: &str,
    limit: usize,
    why: &str,
    state: &State,
) {
    state.metrics.limit_hit(limit_name);
    warn!(node, limit, limit_name, "stream refused: {why}");
    refuse(stream, StatusCode::Busy, why.to_string(), state).await
}

fn ok_status() -> Message {
    Message::Status {
        code: StatusCode::Ok,
        message: String::new(),
    }
}

/// A stream to relay: check it, then reach an apiserver, answer the status, relay.
async fn open(
    mut stream: Stream,
    node: &str,
    version: u8,
    target: Target,
    hops: u8,
    state: &State,
) {
    if version != PROTOCOL_VERSION {
        let why = format!("unsupported stream version {version}");
        warn!(node, "stream refused: {why}");
        return refuse(&mut stream, StatusCode::BadRequest, why, state).await;
    }
    // The apiserver is health-checked; a named service is tried as if healthy.
    let (service, upstream, checked) = match &target {
        Target::Service(s) if s == SERVICE_APISERVER => (s.as_str(), state.upstream.clone(), true),
        Target::Service(s) => match state.services.get(s) {
            Some(up) => (s.as_str(), up.clone(), false),
            None => {
                warn!(node, service = %s, "stream refused: unknown service");
                let why = format!("unknown service {s:?}");
                return refuse(&mut stream, StatusCode::UnknownService, why, state).await;
            }
        },
        Target::Address { .. } => {
            warn!(node, %target, "stream refused: servers do not open arbitrary addresses");
            let why = "servers do not open arbitrary addresses".to_string();
            return refuse(&mut stream, StatusCode::RefusedByPolicy, why, state).await;
        }
    };
    if state.draining.load(Ordering::Relaxed) {
        let why = "server is draining".to_string();
        return refuse(&mut stream, StatusCode::Draining, why, state).await;
    }
    let Ok(_permit) = state.streams.clone().try_acquire_owned() else {
        let (limit, why) = (state.config.max_streams, "server stream limit reached");
        return busy(&mut stream, node, "streams_per_server", limit, why, state).await;
    };

    // A healthy upstream first. When it is known to be down, a peer first, and the upstream
    // only as a last resort (the check may be a second old). A relayed stream (hops > 0) is
    // never relayed again: one hop at most, so no loop.
    let healthy = !checked || upstream.is_healthy();
    let mut last_error = String::from("no healthy peer");
    if healthy {
        match upstream.connect().await {
            Ok(tcp) => return relay_upstream(stream, tcp, node, state).await,
            Err(e) => last_error = format!("upstream {} unreachable: {e}", upstream.addr()),
        }
    }
    if hops == 0 {
        if let Some((link, peer_stream)) = open_via_peer(state, service).await {
            return relay_peer(stream, link, peer_stream, node, state).await;
        }
    }
    if !healthy {
        match upstream.connect().await {
            Ok(tcp) => return relay_upstream(stream, tcp, node, state).await,
            Err(e) => last_error = format!("upstream {} unreachable: {e}", upstream.addr()),
        }
    }
    debug!(node, error = %last_error, service, "no way to the upstream");
    refuse(
        &mut stream,
        StatusCode::UpstreamUnreachable,
        last_error,
        state,
    )
    .await;
}

async fn relay_upstream(mut stream: Stream, tcp: tokio::net::TcpStream, node: &str, state: &State) {
    if stream.send.write_message(&ok_status()).await.is_err() {
        return;
    }
    state.metrics.streams_total.inc();
    let _open = GaugeGuard::new(&state.metrics.streams_open);
    let node_meter = state.registry.meter(node).unwrap_or_default();
    let summary = relay::relay(tcp, stream, &[&state.metrics.bytes, &*node_meter]).await;
    if summary.outcome != Outcome::Closed {
        state.metrics.stream_resets.inc();
    }
    debug!(node, up = summary.from_tunnel, down = summary.to_tunnel, outcome = ?summary.outcome,
        "stream done");
}

/// Opens a stream to `service` through the first healthy peer that accepts it.
async fn open_via_peer(state: &State, service: &str) -> Option<(Arc<Link>, Stream)> {
    for link in state.peers.candidates(Policy::LeastStreams) {
        if !link.healthy() {
            continue;
        }
        let attempt = async {
            let mut s = link.tunnel.open_stream().await.ok()?;
            let open = Message::Open {
                version: PROTOCOL_VERSION,
                target: Target::Service(service.into()),
                hops: 1,
            };
            s.send.write_message(&open).await.ok()?;
            match s.recv.read_message().await {
                Ok(Some(Message::Status {
                    code: StatusCode::Ok,
                    ..
                })) => Some(s),
                Ok(Some(Message::Status { code, message })) => {
                    debug!(peer = %link.server, %code, %message, "peer refused a relayed stream");
                    None
                }
                _ => {
                    s.reset(code::PROTOCOL).await;
                    None
                }
            }
        };
        match tokio::time::timeout(state.config.peer_open_timeout, attempt).await {
            Ok(Some(s)) => return Some((link, s)),
            _ => state.metrics.peer_relay_failures.inc(),
        }
    }
    None
}

async fn relay_peer(mut stream: Stream, link: Arc<Link>, peer: Stream, node: &str, state: &State) {
    if stream.send.write_message(&ok_status()).await.is_err() {
        return;
    }
    state.metrics.streams_total.inc();
    state.metrics.peer_relayed.inc();
    let _open = GaugeGuard::new(&state.metrics.streams_open);
    let _on_link = link.stream_guard();
    debug!(node, peer = %link.server, "relaying through peer");
    let node_meter = state.registry.meter(node).unwrap_or_default();
    let summary = relay::splice(stream, peer, &[&state.metrics.bytes, &*node_meter]).await;
    if summary.outcome != Outcome::Closed {
        state.metrics.stream_resets.inc();
    }
}

/// Counts a tunnel's open streams while alive.
struct StreamCount(Arc<std::sync::atomic::AtomicUsize>);

impl StreamCount {
    fn new(c: Arc<std::sync::atomic::AtomicUsize>) -> Self {
        c.fetch_add(1, Ordering::Relaxed);
        StreamCount(c)
    }

    fn current(&self) -> usize {
        self.0.load(Ordering::Relaxed)
    }
}

impl Drop for StreamCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The CA roots, this server's identity (its certificate followed by the CA, so that joining
/// agents can check the CA against their token), and the CA in PEM.
fn load_identity(
    dir: &std::path::Path,
) -> Result<(rustls::RootCertStore, tls::Identity, String), tls::TlsError> {
    let ca_path = dir.join(files::CA_CERT);
    let roots = tls::load_roots(&ca_path)?;
    let mut identity =
        tls::Identity::load(&dir.join(files::SERVER_CERT), &dir.join(files::SERVER_KEY))?;
    for ca in tls::load_certs(&ca_path)? {
        if !identity.chain.contains(&ca) {
            identity.chain.push(ca);
        }
    }
    let ca_pem = std::fs::read_to_string(&ca_path).map_err(|source| tls::TlsError::Read {
        path: ca_path,
        source,
    })?;
    Ok((roots, identity, ca_pem))
}

fn cert_expiry(state: &State) {
    let path = state.config.data_dir.join(files::SERVER_CERT);
    if let Some(info) = tls::load_certs(&path)
        .ok()
        .and_then(|c| c.first().and_then(tls::peer_info))
    {
        state.metrics.cert_expiry.set(info.not_after);
    }
}

/// Reloads the certificate and key from disk and uses them for new handshakes (agents and
/// peers); tunnels that are up keep going.
fn reload_certificates(state: &State) -> Result<(), ServerError> {
    let (roots, identity, _) = load_identity(&state.config.data_dir)?;
    let cfg = tls::server_config(roots.clone(), identity.clone())?;
    *state.tcp_tls.write().unwrap_or_else(|p| p.into_inner()) =
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg.clone()));
    let transport = listener_transport(&state.config);
    state
        .endpoint
        .set_server_config(Some(tls::quic_server_config(cfg, transport)?));
    if let Some(d) = state.peer_dialer.get() {
        let client = tls::client_config(roots, identity)?;
        let transport = tls::quic_transport(state.config.liveness, state.config.limits);
        d.set_client_config(tls::quic_client_config(client.clone(), transport)?, client);
    }
    state.metrics.cert_reloads.inc();
    cert_expiry(state);
    info!("reloaded the server certificate");
    Ok(())
}

fn files_mtime(dir: &std::path::Path) -> Vec<Option<SystemTime>> {
    [files::CA_CERT, files::SERVER_CERT, files::SERVER_KEY]
        .iter()
        .map(|f| {
            std::fs::metadata(dir.join(f))
                .and_then(|m| m.modified())
                .ok()
        })
        .collect()
}

/// Watches the data directory: node records (revocations close tunnels within a second or
/// two) and the certificate files (reloaded when they change).
async fn watch_files(state: Arc<State>, mut stop: ShutdownSignal) {
    let mut certs = files_mtime(&state.config.data_dir);
    // Records merged from a peer take effect at once, not at the next look at the file.
    let mut records = state.authority.subscribe();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(state.config.reload_interval) => {}
            r = records.changed() => if r.is_err() { return },
            _ = stop.wait() => return,
        }
        state.authority.poll();
        close_refused(&state);
        let now = files_mtime(&state.config.data_dir);
        if now != certs {
            certs = now;
            if let Err(e) = reload_certificates(&state) {
                warn!(error = %e, "cannot reload the server certificate; keeping the old one");
            }
        }
    }
}

/// Why the records refuse a certificate for new tunnels: the close code and the reason said to
/// the agent and logged; `None` when they admit it.
fn refusal(verdict: &Verdict) -> Option<(u32, &'static str)> {
    match verdict {
        Verdict::Allowed => None,
        Verdict::Revoked => Some((code::REVOKED, "this node is revoked")),
        Verdict::OtherOwner => Some((code::REFUSED, "the node name belongs to another key")),
        Verdict::Forgotten => Some((
            code::REFUSED,
            "the node name was forgotten; the node must join again",
        )),
        Verdict::Superseded => Some((
            code::REFUSED,
            "the node name belongs to another key (this certificate was renewed)",
        )),
    }
}

/// Closes the tunnels whose certificate the records no longer admit: revoked nodes, names that
/// were forgotten (a certificate from before a forget is what the forget is for), and keys that
/// another key owns the name for. The tunnels of a renewed node's previous key stay up: they are
/// the same node's.
fn close_refused(state: &State) {
    for name in state.registry.node_names() {
        for e in state.registry.tunnels(&name) {
            let verdict = state.authority.check(&name, &e.key_hash);
            if verdict == Verdict::Superseded {
                continue;
            }
            let Some((code, why)) = refusal(&verdict) else {
                continue;
            };
            state.metrics.revoked_closed.inc();
            warn!(node = %name, peer = %e.remote, reason = why, "closing tunnel");
            e.tunnel.close(code, why);
            state.registry.remove(&name, e.tunnel.id());
        }
    }
}

/// What the admin endpoint shows of a server.
struct AdminView(Arc<State>);

impl AdminSource for AdminView {
    fn ready(&self) -> Result<(), String> {
        if self.0.draining.load(Ordering::Relaxed) {
            Err("draining".into())
        } else if self.0.upstream.is_healthy() {
            Ok(())
        } else {
            Err(format!("upstream {} unreachable", self.0.upstream.addr()))
        }
    }

    fn metrics(&self) -> String {
        self.0.metrics.render(&self.0.peers)
    }

    fn status(&self) -> serde_json::Value {
        use serde_json::json;
        let s = &self.0;
        let unix = tether_common::cli::unix_seconds;
        let nodes: Vec<_> = s
            .registry
            .snapshot()
            .into_iter()
            .map(|(name, tunnels)| {
                let newest = tunnels.iter().max_by_key(|e| e.since);
                let sum = |f: fn(&Entry) -> u64| tunnels.iter().map(f).sum::<u64>();
                json!({
                    "name": name,
                    "address": newest.map(|e| e.remote.to_string()),
                    "addresses": newest.map(|e| e.addresses.clone()).unwrap_or_default(),
                    "transport": newest.map(|e| e.tunnel.transport()),
                    "tunnels": tunnels.len(),
                    "streams": sum(|e| e.streams.load(Ordering::Relaxed) as u64),
                    "bytes_from_node": sum(|e| e.meter.from_tunnel.load(Ordering::Relaxed)),
                    "bytes_to_node": sum(|e| e.meter.to_tunnel.load(Ordering::Relaxed)),
                    "connected_since": tunnels.iter().map(|e| unix(e.since)).min(),
                    "certificate_expiry": newest.map(|e| e.cert_not_after),
                    "capabilities": newest.map(|e| e.capabilities.names()).unwrap_or_default(),
                })
            })
            .collect();
        let peers: Vec<_> = s.peers.all().into_iter().map(|l| l.status()).collect();
        let services: Vec<_> = s
            .config
            .services
            .iter()
            .map(|(name, addr)| json!({"name": name, "address": addr}))
            .collect();
        let expiry = s.metrics.cert_expiry.get();
        json!({
            "kind": "server",
            "version": env!("CARGO_PKG_VERSION"),
            "instance": s.instance_id,
            "listen": s.endpoint.local_addr().map(|a| a.to_string()).ok(),
            "advertise": s.announcer.advertise(),
            "draining": s.draining.load(Ordering::Relaxed),
            "upstream": {"address": s.upstream.addr(), "healthy": s.upstream.is_healthy()},
            "services": services,
            "certificate_expiry": if expiry > 0 { Some(expiry) } else { None },
            "nodes": nodes,
            "contested_addresses": s.registry.contested().into_iter()
                .map(|(address, nodes)| json!({"address": address, "nodes": nodes}))
                .collect::<Vec<_>>(),
            "configured_peers": s.config.peers,
            "peers": peers,
        })
    }
}
