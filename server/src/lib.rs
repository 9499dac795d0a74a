//! `tether-server`: accepts agent tunnels over QUIC (or TLS over TCP) with mutual TLS and relays
//! each of their streams to the kube-apiserver, or through a peer server when its own apiserver
//! is down; and lets the control plane reach nodes through their tunnels (the egress proxy).
//!
//! The library runs a whole server in-process ([`start`]), so that tests and the demo drive the
//! same code the binary runs. This file only builds the [`state::State`] and starts the rooms,
//! each a module with one job:
//!
//! | module | job |
//! |---|---|
//! | [`accept`] | both listeners, one handshake budget and failure path |
//! | [`admission`] | who the peer is (from its certificate), whether it may have a tunnel |
//! | [`streams`] | each stream's first frame; open an upstream (local or a peer's) and relay |
//! | [`control`] | the control stream: version, announcements, heartbeats, reports |
//! | [`identity`] | certificate load and reload, the revocation sweep |
//! | [`join`], [`join_rate`] | joins and renewals; the join rate limit |
//! | [`egress`], [`route`] | the egress proxy (CONNECT to nodes); where a CONNECT goes, without I/O |
//! | [`status`] | readiness, metrics and the status document |
//! | [`datastore`], [`follow`] | records, tokens and membership in the data directory or etcd; following etcd's changes |
//! | [`peers`] | links to the other servers, configured or found in etcd |
//! | [`state`], [`registry`], [`authority`], [`announce`], [`upstream`], [`metrics`] | what they share |
#![forbid(unsafe_code)]

pub mod accept;
pub mod admission;
pub mod announce;
pub mod authority;
pub mod ca;
pub mod config;
pub mod control;
pub mod datastore;
pub mod diagnose;
pub mod egress;
pub mod error;
pub mod follow;
mod handle;
pub mod identity;
pub mod join;
pub mod join_rate;
pub mod metrics;
pub mod peers;
pub mod registry;
pub mod rotate;
pub mod route;
pub mod state;
pub mod status;
pub mod streams;
pub mod trust;
pub mod upstream;

pub use accept::{MAX_HANDSHAKES, MAX_JOINS};
pub use config::JOIN_WINDOW;
pub use error::ServerError;
pub use handle::ServerHandle;

use crate::announce::Announcer;
use crate::authority::Authority;
use crate::config::ServerConfig;
use crate::datastore::Datastore;
use crate::join_rate::JoinLimiter;
use crate::metrics::Metrics;
use crate::registry::Registry;
use crate::state::State;
use crate::upstream::Upstream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;
use tether_endpoint::admin;
use tether_link::pool::Pool;
use tether_link::reconnect::{self, Dialer};
use tether_process::shutdown::Shutdown;
use tether_proto::capability::{self, Capabilities};
use tether_proto::Message;
use tether_transport::tls;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tracing::{info, warn};

fn random_id() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// Opens the configured datastore and reads its records. With etcd, a server that cannot reach
/// it at start serves from the records it cached in its data directory the last time (fail
/// static) and follows etcd once it answers.
async fn open_datastore(
    config: &ServerConfig,
    health: &datastore::StoreHealth,
) -> Result<(Datastore, tether_trust::records::Records), ServerError> {
    use std::sync::atomic::Ordering;
    use tether_trust::records::{self, Records};
    match config.datastore {
        datastore::Kind::Dir => {
            health.available.store(true, Ordering::Relaxed);
            let records = Records::load(&config.data_dir)?;
            Ok((Datastore::Dir(config.data_dir.clone()), records))
        }
        datastore::Kind::Etcd => {
            let etcd = Arc::new(datastore::etcd::Etcd::new(&config.etcd)?);
            let store = Datastore::Etcd(etcd.clone());
            let read = tokio::time::timeout(Duration::from_secs(5), store.load_records()).await;
            match read {
                Ok(Ok((mut records, revision))) => {
                    health.revision.store(revision, Ordering::Relaxed);
                    restore_locked_out(&store, &config.data_dir, &mut records).await?;
                    let all: Vec<_> = records.by_name.values().cloned().collect();
                    records::merge_into(&config.data_dir, &all)?;
                    info!(endpoints = ?etcd.endpoints(), revision, nodes = all.len(), "datastore: etcd");
                    Ok((store, records))
                }
                Ok(Err(e)) if !e.is_unavailable() => Err(ServerError::Store(e)),
                other => {
                    let why = match other {
                        Ok(Err(e)) => e.to_string(),
                        _ => "no answer in 5s".into(),
                    };
                    warn!(error = %why, endpoints = ?etcd.endpoints(),
                        "etcd unavailable at start: serving from the node records cached in the data directory until it answers");
                    Ok((store, Records::load(&config.data_dir)?))
                }
            }
        }
    }
}

/// Fails closed across a restore of etcd: a revocation (or a forget) this server holds in its
/// cache of records but etcd lacks, or holds an older record for, is written back to etcd and
/// logged, so that a snapshot taken before it cannot admit the node again. A cache that cannot
/// be read stops the start, as the data directory's own records do.
async fn restore_locked_out(
    store: &Datastore,
    dir: &std::path::Path,
    records: &mut tether_trust::records::Records,
) -> Result<(), ServerError> {
    use tether_trust::records::{self, NodeState, Records};
    let cached = Records::load(dir)?;
    for rec in cached.by_name.into_values() {
        if matches!(rec.state, NodeState::Owned(_)) || rec.expired(records::now_ms()) {
            continue;
        }
        let lost = match records.by_name.get(&rec.name) {
            Some(held) => rec.beats(held),
            None => true,
        };
        if !lost {
            continue;
        }
        warn!(node = %rec.name, state = ?rec.state, "etcd lacks a revocation or forget this server holds (a restore from an older snapshot?): writing it back");
        store.merge(&rec).await.map_err(ServerError::Store)?;
        records.merge(rec);
    }
    Ok(())
}

/// Loads the certificates, binds the listeners and starts serving.
pub async fn start(config: ServerConfig) -> Result<ServerHandle, ServerError> {
    let dir = &config.data_dir;
    let (roots, identity, trust) = identity::load_identity(dir)?;
    let tls_config =
        tls::server_config(roots.clone(), identity.clone(), config.limits.post_quantum)?;
    let tcp_tls = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config.clone()));
    let transport = config.listener_transport();
    let quic_config = tls::quic_server_config(tls_config, transport)?;
    // QUIC on UDP and TLS on TCP share the port number. With port 0 (tests), retry until the
    // port the kernel picked for UDP is free for TCP too.
    let mut attempts = 0;
    let (endpoint, local_addr, tcp_listener) = loop {
        attempts += 1;
        let endpoint =
            tether_endpoint::net::quic_endpoint(config.listen, Some(quic_config.clone())).map_err(
                |source| ServerError::Listen {
                    addr: config.listen,
                    source,
                },
            )?;
        let local_addr = endpoint
            .local_addr()
            .map_err(|source| ServerError::Listen {
                addr: config.listen,
                source,
            })?;
        match tether_endpoint::net::listen_tcp(local_addr) {
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
    let peer_tls = tls::client_config(roots, identity, config.limits.post_quantum)?;
    let peer_client = tls::quic_client_config(
        peer_tls.clone(),
        tls::peer_quic_transport(config.liveness, config.limits),
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

    let metrics = Arc::new(Metrics::default());
    let (store, records) = open_datastore(&config, &metrics.datastore).await?;
    let authority = Authority::new(store, records);
    let instance_id = random_id();
    let advertise = announce::advertise_address(config.advertise.as_deref(), local_addr);
    let peers = Arc::new(Pool::default());
    let announcer = Announcer::new(advertise.clone(), config.peers.clone(), peers.clone());
    let state = Arc::new(State {
        authority: Arc::new(authority),
        join_limiter: JoinLimiter::new(config.join_rate_per_minute),
        renewals: join_rate::RenewalLimiter::for_lifetime(config.agent_cert_lifetime),
        trust: tokio::sync::watch::channel(trust).0,
        rotation: std::sync::RwLock::new(None),
        endpoint: endpoint.clone(),
        peer_dialer: std::sync::OnceLock::new(),
        tcp_tls: std::sync::RwLock::new(tcp_tls),
        noisy_log: tether_process::telemetry::Throttle::new(Duration::from_secs(1)),
        streams: Arc::new(Semaphore::new(config.max_streams)),
        handshakes: tether_endpoint::client_slots::ClientSlots::new(
            accept::MAX_HANDSHAKES,
            accept::MAX_HANDSHAKES_PER_SOURCE,
            tether_endpoint::client_slots::Eviction::None,
        ),
        joins: Arc::new(Semaphore::new(accept::MAX_JOINS)),
        registry: Registry::default(),
        metrics: metrics.clone(),
        upstream: upstream.clone(),
        services,
        instance_id: instance_id.clone(),
        started: std::time::Instant::now(),
        peers: peers.clone(),
        announcer,
        draining: AtomicBool::new(false),
        opening: Default::default(),
        config,
    });
    let shutdown = Shutdown::new();
    let mut tasks = JoinSet::new();

    let mut admin_addr = None;
    if let Some(addr) = state.config.admin {
        let listener = tether_endpoint::net::listen_tcp(addr)
            .map_err(|source| ServerError::Admin { addr, source })?;
        admin_addr = listener.local_addr().ok();
        tasks.spawn(admin::serve(
            listener,
            Arc::new(status::AdminView(state.clone())),
        ));
    }

    let mut egress_addr = None;
    let acceptor = egress::tls_acceptor(&state.config.egress)?;
    if let Some(addr) = state.config.egress.listen {
        let e = &state.config.egress;
        if !addr.ip().is_loopback() && (e.client_ca.is_none() || acceptor.is_none()) {
            return Err(ServerError::EgressUnauthenticated(addr));
        }
        let l = tether_endpoint::net::listen_tcp(addr).map_err(|source| ServerError::Egress {
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
        max_streams: state.config.transport_limits().max_streams,
        hello_name: advertise.clone().unwrap_or_default(),
        capabilities: Capabilities::ours(&[capability::PEER]),
        own_server_id: Some(instance_id),
        handshake_timeout: state.config.handshake_timeout,
        pool: peers,
        stats: metrics.peer_links.clone(),
        changed: state.announcer.changed(),
        kind: reconnect::LinkKind::Peer,
        proxy: None,
        on_message: Some(Box::new({
            let a = state.authority.clone();
            move |_: &tether_link::pool::Link, m: &Message| a.merge_from_peer("peer", m)
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
        identity: Default::default(),
        // The agents hear of a peer this server lost at once, and probe it (docs/operations.md,
        // "Liveness: a dead server, or a dead link").
        on_down: Some(Box::new({
            let a = state.announcer.clone();
            move |link| a.peer_lost(&link.server_id)
        })),
    });
    let _ = state.peer_dialer.set(dialer.clone());
    identity::cert_expiry(&state);
    for (rank, peer) in state.config.peers.iter().enumerate() {
        if Some(peer) == advertise.as_ref() {
            continue;
        }
        tasks.spawn(peers::link(
            peer.clone(),
            rank,
            dialer.clone(),
            shutdown.signal(),
        ));
    }
    if let Some(etcd) = state.authority.store().etcd() {
        let discovered =
            peers::Discovered::new(dialer.clone(), advertise.clone(), state.config.peers.len());
        let follower = follow::Follower {
            etcd: etcd.clone(),
            authority: state.authority.clone(),
            announcer: state.announcer.clone(),
            discovered: Arc::new(discovered),
            health: state.metrics.datastore.clone(),
            data_dir: state.config.data_dir.clone(),
        };
        tasks.spawn(follower.run(shutdown.signal()));
        tasks.spawn(datastore::members::keep(
            etcd.clone(),
            state.instance_id.clone(),
            state.announcer.clone(),
            shutdown.signal(),
        ));
    }
    tasks.spawn(state.announcer.clone().run(shutdown.signal()));
    tasks.spawn(identity::watch_files(state.clone(), shutdown.signal()));
    tasks.spawn(ca::follow(state.clone(), shutdown.signal()));
    tasks.spawn(accept::accept_quic(
        endpoint.clone(),
        state.clone(),
        shutdown.signal(),
    ));
    tasks.spawn(accept::accept_tcp(
        tcp_listener,
        state.clone(),
        shutdown.signal(),
    ));
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
