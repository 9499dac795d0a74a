//! `tether-server`: accepts agent tunnels over QUIC with mutual TLS and relays each of their
//! streams to the kube-apiserver.
//!
//! The library runs a whole server in-process ([`start`]), so that tests and the demo drive the
//! same code the binary runs.
#![forbid(unsafe_code)]

pub mod config;
pub mod demo;
pub mod metrics;
pub mod registry;
pub mod standin;
pub mod upstream;

use crate::config::ServerConfig;
use crate::metrics::Metrics;
use crate::registry::{Entry, Registry};
use crate::upstream::Upstream;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::SystemTime;
use tether_certs::files;
use tether_common::admin::{self, AdminSource};
use tether_common::protocol::{
    code, Message, StatusCode, Target, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, SERVICE_APISERVER,
};
use tether_common::relay::{self, Outcome};
use tether_common::shutdown::{Shutdown, ShutdownSignal};
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
}

/// Shared state of a running server.
struct State {
    config: ServerConfig,
    metrics: Arc<Metrics>,
    registry: Registry,
    upstream: Arc<Upstream>,
    streams: Arc<Semaphore>,
    server_id: String,
}

/// A running server. Dropping it does not stop it; call [`ServerHandle::shutdown`].
pub struct ServerHandle {
    /// The UDP address the QUIC listener is bound to.
    pub local_addr: SocketAddr,
    /// The admin endpoint's address, when one was asked for.
    pub admin_addr: Option<SocketAddr>,
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
        self.endpoint.wait_idle().await;
    }

    /// Waits until the server stops on its own (it does not, short of a fatal error).
    pub async fn wait(&mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

/// Loads the certificates, binds the listeners and starts serving.
pub async fn start(config: ServerConfig) -> Result<ServerHandle, ServerError> {
    let dir = &config.data_dir;
    let roots = tls::load_roots(&dir.join(files::CA_CERT))?;
    let identity =
        tls::Identity::load(&dir.join(files::SERVER_CERT), &dir.join(files::SERVER_KEY))?;
    let server_id = identity
        .chain
        .first()
        .and_then(tls::peer_info)
        .map(|p| p.common_name)
        .unwrap_or_else(|| "tether-server".into());
    let tls_config = tls::server_config(roots, identity)?;
    let transport = tls::quic_transport(config.liveness, config.limits);
    let quic_config = tls::quic_server_config(tls_config, transport)?;
    let endpoint = quinn::Endpoint::server(quic_config, config.listen).map_err(|source| {
        ServerError::Listen {
            addr: config.listen,
            source,
        }
    })?;
    let local_addr = endpoint
        .local_addr()
        .map_err(|source| ServerError::Listen {
            addr: config.listen,
            source,
        })?;

    let metrics = Arc::new(Metrics::default());
    let upstream = Arc::new(Upstream::new(
        config.upstream.clone(),
        config.connect_timeout,
    ));
    let state = Arc::new(State {
        streams: Arc::new(Semaphore::new(config.max_streams)),
        registry: Registry::default(),
        metrics: metrics.clone(),
        upstream: upstream.clone(),
        server_id,
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

    let m = metrics.clone();
    tasks.spawn(
        upstream
            .clone()
            .watch(state.config.health_interval, move |ok| {
                m.upstream_healthy.set(ok as i64)
            }),
    );
    tasks.spawn(accept_loop(
        endpoint.clone(),
        state.clone(),
        shutdown.signal(),
    ));
    info!(listen = %local_addr, upstream = %state.config.upstream, "tether-server listening (QUIC)");
    Ok(ServerHandle {
        local_addr,
        admin_addr,
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
                    warn!(peer = %remote, error = %e, "refused tunnel: TLS handshake failed");
                    return;
                }
                Err(_) => {
                    state.metrics.handshake_failures.inc();
                    warn!(peer = %remote, timeout = ?state.config.handshake_timeout,
                        "refused tunnel: handshake did not complete in time");
                    return;
                }
            };
            serve_tunnel(Tunnel::from_quic(conn), state).await;
        });
    }
}

/// Serves one authenticated tunnel until it closes.
async fn serve_tunnel(tunnel: Tunnel, state: Arc<State>) {
    let remote = tunnel.remote_addr();
    // The node name comes from the verified certificate, never from what the agent says.
    let Some(peer) = tunnel
        .peer_certificates()
        .and_then(|chain| chain.first().and_then(tls::peer_info))
    else {
        state.metrics.handshake_failures.inc();
        warn!(peer = %remote, "refused tunnel: client certificate has no common name");
        tunnel.close(code::PROTOCOL, "certificate has no common name");
        return;
    };
    let node = peer.common_name;
    state.registry.add(
        &node,
        Entry {
            tunnel: tunnel.clone(),
            remote,
            since: SystemTime::now(),
            cert_not_after: peer.not_after,
        },
    );
    state.metrics.tunnels_total.inc();
    state.metrics.tunnels_up.inc();
    info!(node = %node, peer = %remote, transport = tunnel.transport(), "tunnel up");

    loop {
        let stream = match tunnel.accept_stream().await {
            Ok(s) => s,
            Err(e) => {
                info!(node = %node, peer = %remote, reason = %e, "tunnel down");
                break;
            }
        };
        let state = state.clone();
        let node = node.clone();
        tokio::spawn(async move { serve_stream(stream, &node, &state).await });
    }
    state.registry.remove(&node, tunnel.id());
    state.metrics.tunnels_up.dec();
}

/// Serves one stream: the control stream, or a stream to relay.
async fn serve_stream(mut stream: Stream, node: &str, state: &State) {
    let first = tokio::time::timeout(state.config.header_timeout, stream.recv.read_message()).await;
    let msg = match first {
        Ok(Ok(Some(msg))) => msg,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            state.metrics.protocol_errors.inc();
            warn!(node, error = %e, "stream refused: bad header");
            stream.reset(code::PROTOCOL);
            return;
        }
        Err(_) => {
            state.metrics.protocol_errors.inc();
            warn!(node, timeout = ?state.config.header_timeout, "stream refused: no header in time");
            stream.reset(code::PROTOCOL);
            return;
        }
    };
    match msg {
        Message::Hello {
            min_version,
            max_version,
            ..
        } => control(stream, node, min_version, max_version, state).await,
        Message::Open {
            version, target, ..
        } => open(stream, node, version, target, state).await,
        other => {
            state.metrics.protocol_errors.inc();
            warn!(
                node,
                message = other.name(),
                "stream refused: unexpected first message"
            );
            stream.reset(code::PROTOCOL);
        }
    }
}

/// The control stream: version agreement now, announcements in later versions.
async fn control(mut stream: Stream, node: &str, min: u8, max: u8, state: &State) {
    if !(min..=max).contains(&PROTOCOL_VERSION) {
        state.metrics.protocol_errors.inc();
        warn!(
            node,
            min,
            max,
            ours = PROTOCOL_VERSION,
            oldest = MIN_PROTOCOL_VERSION,
            "no common protocol version with agent"
        );
        stream.reset(code::PROTOCOL);
        return;
    }
    let welcome = Message::Welcome {
        version: PROTOCOL_VERSION,
        server_id: state.server_id.clone(),
        capabilities: vec![SERVICE_APISERVER.into()],
    };
    if stream.send.write_message(&welcome).await.is_err() {
        return;
    }
    // Read until the agent closes, skipping messages this version does not act on.
    loop {
        match stream.recv.read_message().await {
            Ok(Some(m)) => debug!(node, message = m.name(), "control message"),
            Ok(None) | Err(_) => return,
        }
    }
}

async fn refuse(stream: &mut Stream, code: StatusCode, message: String, state: &State) {
    state.metrics.stream_failed(code);
    let _ = stream
        .send
        .write_message(&Message::Status { code, message })
        .await;
    stream.send.finish();
}

/// A stream to relay: check it, connect upstream, answer the status, relay.
async fn open(mut stream: Stream, node: &str, version: u8, target: Target, state: &State) {
    if version != PROTOCOL_VERSION {
        let why = format!("unsupported stream version {version}");
        warn!(node, "stream refused: {why}");
        return refuse(&mut stream, StatusCode::BadRequest, why, state).await;
    }
    match &target {
        Target::Service(s) if s == SERVICE_APISERVER => {}
        Target::Service(s) => {
            warn!(node, service = %s, "stream refused: unknown service");
            let why = format!("unknown service {s:?}");
            return refuse(&mut stream, StatusCode::UnknownService, why, state).await;
        }
        Target::Address { .. } => {
            warn!(node, %target, "stream refused: servers do not open arbitrary addresses");
            let why = "servers do not open arbitrary addresses".to_string();
            return refuse(&mut stream, StatusCode::RefusedByPolicy, why, state).await;
        }
    }
    let Ok(_permit) = state.streams.clone().try_acquire_owned() else {
        warn!(
            node,
            limit = state.config.max_streams,
            "stream refused: stream limit reached"
        );
        let why = "server stream limit reached".to_string();
        return refuse(&mut stream, StatusCode::Busy, why, state).await;
    };
    let tcp = match state.upstream.connect().await {
        Ok(tcp) => tcp,
        Err(e) => {
            debug!(node, upstream = %state.upstream.addr(), error = %e, "upstream unreachable");
            let why = format!("upstream {} unreachable: {e}", state.upstream.addr());
            return refuse(&mut stream, StatusCode::UpstreamUnreachable, why, state).await;
        }
    };
    let ok = Message::Status {
        code: StatusCode::Ok,
        message: String::new(),
    };
    if stream.send.write_message(&ok).await.is_err() {
        return;
    }
    state.metrics.streams_total.inc();
    let _open = tether_common::telemetry::GaugeGuard::new(&state.metrics.streams_open);
    let summary = relay::relay(tcp, stream, &[&state.metrics.bytes]).await;
    if summary.outcome != Outcome::Closed {
        state.metrics.stream_resets.inc();
    }
    debug!(node, up = summary.from_tunnel, down = summary.to_tunnel, outcome = ?summary.outcome,
        "stream done");
}

/// What the admin endpoint shows of a server.
struct AdminView(Arc<State>);

impl AdminSource for AdminView {
    fn ready(&self) -> Result<(), String> {
        if self.0.upstream.is_healthy() {
            Ok(())
        } else {
            Err(format!("upstream {} unreachable", self.0.upstream.addr()))
        }
    }

    fn metrics(&self) -> String {
        self.0.metrics.render()
    }
}
