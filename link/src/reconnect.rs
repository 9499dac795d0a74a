//! Keeps one tunnel to one server up: dial, hello, serve, and on any failure dial again with
//! exponential backoff and jitter. Agents run one loop per server; servers run one per peer.

use super::dial::*;
pub use super::dial::{host_of, resolve};
use crate::backoff::Backoff;
use crate::lifecycle::{Action, Lifecycle, Purpose, Retire, Retiring};
use crate::pool::{Link, Pool};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tether_process::shutdown::ShutdownSignal;
use tether_process::telemetry::{Counter, Gauge};
use tether_proto::capability::Capabilities;
use tether_proto::{code, Message};
use tether_transport::transport::{
    FrameError, RecvHalf, SendHalf, Stream, StreamError, TransportError, TransportKind,
};
use tokio::sync::Notify;
use tracing::{debug, info, warn};

/// How long to leave an address alone that turned out to be a second address of a server we
/// already have a tunnel to.
pub const DUPLICATE_RETRY: Duration = Duration::from_secs(30);

/// Tunnel counters of one kind of link (agent to server, or server to peer).
#[derive(Debug, Default)]
pub struct LinkStats {
    pub up: Gauge,
    pub connects: Counter,
    pub connect_failures: Counter,
}

/// One address to keep a tunnel to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DialTarget {
    /// The address as configured or announced, `host:port`: the key, and what logs show.
    pub label: String,
    /// The resolved address to dial.
    pub addr: SocketAddr,
    /// The name the server's certificate must carry.
    pub name: String,
    /// Position in the configured order.
    pub rank: usize,
}

/// Which transport a dialer uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TransportChoice {
    /// QUIC, falling back to TLS over TCP when no QUIC handshake completes within
    /// [`QUIC_HEAD_START`]; a link on TCP keeps trying QUIC and moves to it when it works.
    Auto,
    Quic,
    Tcp,
}

impl std::str::FromStr for TransportChoice {
    type Err = tether_process::units::UnknownChoice;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(TransportChoice::Auto),
            "quic" => Ok(TransportChoice::Quic),
            "tcp" => Ok(TransportChoice::Tcp),
            other => Err(tether_process::units::UnknownChoice {
                what: "transport",
                got: other.to_string(),
                choices: "auto, quic or tcp",
            }),
        }
    }
}

impl std::fmt::Display for TransportChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TransportChoice::Auto => "auto",
            TransportChoice::Quic => "quic",
            TransportChoice::Tcp => "tcp",
        })
    }
}

/// How long QUIC has, in `auto`, before TLS over TCP is tried beside it.
pub const QUIC_HEAD_START: Duration = Duration::from_secs(1);
pub use crate::lifecycle::{QUIC_RETIRED_GRACE, QUIC_RETRY};

/// Receives the control messages the reconnect loop does not act on itself, with the link they
/// came on.
pub type MessageHook = Box<dyn Fn(&Link, &Message) + Send + Sync>;

/// Told of a link that went down.
pub type DownHook = Box<dyn Fn(&Link) + Send + Sync>;

/// Serves a stream the server opened towards us (the reverse path); run on a task of its own.
pub type StreamHook = Arc<dyn Fn(Stream) -> BoxedFuture + Send + Sync>;

/// The messages one link sends on its control stream as something changes (a server's node
/// records, to each peer it dials). Made per link, with what the far side announced.
pub trait Outbox: Send {
    /// Waits until there is something new to send, and returns it. Cancel-safe: what it
    /// returns is marked as sent only when it returns.
    fn next(
        &mut self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Message>> + Send + '_>>;
}

/// An outbox that never has anything to send.
pub struct NoOutbox;

impl Outbox for NoOutbox {
    fn next(
        &mut self,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Vec<Message>> + Send + '_>> {
        Box::pin(std::future::pending())
    }
}

/// Makes the [`Outbox`] of a new link from the capabilities its far side announced.
pub type OutboxHook = Box<dyn Fn(&Capabilities) -> Box<dyn Outbox> + Send + Sync>;

/// A pinned, boxed, sendable future with no output.
pub type BoxedFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// Which link a dialer keeps: an agent's to a server, or a server's to a peer. Logs name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkKind {
    Server,
    Peer,
}

impl LinkKind {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkKind::Server => "server",
            LinkKind::Peer => "peer",
        }
    }
}

/// What a reconnect loop needs.
pub struct Dialer {
    pub endpoint: quinn::Endpoint,
    /// Replaced when the certificate is renewed or reloaded; tunnels that are up keep theirs.
    pub client_config: std::sync::RwLock<quinn::ClientConfig>,
    /// The same identity for TLS over TCP.
    pub tcp_tls: std::sync::RwLock<Arc<rustls::ClientConfig>>,
    pub transport: TransportChoice,
    pub liveness: tether_transport::tls::Liveness,
    /// Most streams the far side may open at once on a tunnel (its limit grows up to this).
    pub max_streams: u32,
    /// Sent in the hello: the node name (agents) or the advertised address (servers).
    pub hello_name: String,
    pub capabilities: Vec<String>,
    /// This process's own instance id when it is a server, to skip dialing itself.
    pub own_server_id: Option<String>,
    pub handshake_timeout: Duration,
    pub pool: Arc<Pool>,
    pub stats: Arc<LinkStats>,
    /// Notified whenever a link comes, goes, or announces a server list.
    pub changed: Arc<Notify>,
    /// What kind of link this is, for logs.
    pub kind: LinkKind,
    /// The HTTP proxy TLS over TCP dials through (agents at sites that allow only that).
    pub proxy: Option<crate::proxy::Proxy>,
    /// Control messages this module does not act on itself (a server's node records).
    pub on_message: Option<MessageHook>,
    /// Messages sent on the control stream right after the welcome (an agent's node info).
    pub after_welcome: Vec<Message>,
    /// Messages sent on the control stream whenever there is something new (a server's node
    /// records to its peers).
    pub outbox: Option<OutboxHook>,
    /// Streams the far side opens towards us; without a hook they are refused.
    pub on_stream: Option<StreamHook>,
    /// Called when a link goes down for any reason but this process's shutdown or a move to a
    /// new tunnel (a server reports its lost peers to its agents through this).
    pub on_down: Option<DownHook>,
    /// Bumped whenever the identity changes ([`Dialer::set_client_config`]), so that tunnels
    /// made with the old one move to the new one.
    pub identity: IdentityGeneration,
}

/// Which identity a dialer presents, counted: every tunnel watches it, and when it changes
/// (a renewed certificate) dials a tunnel with the new identity and moves to it, the old one
/// closing once its open streams are done. Otherwise a tunnel up since before a renewal would
/// be closed by the server when the old certificate expires, with every stream on it.
pub struct IdentityGeneration(pub(super) tokio::sync::watch::Sender<u64>);

impl Default for IdentityGeneration {
    fn default() -> Self {
        IdentityGeneration(tokio::sync::watch::channel(0).0)
    }
}

impl Dialer {
    pub fn client_config(&self) -> quinn::ClientConfig {
        self.client_config
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Uses a new identity for the tunnels dialed from now on.
    pub fn set_client_config(&self, quic: quinn::ClientConfig, tcp: rustls::ClientConfig) {
        *self
            .client_config
            .write()
            .unwrap_or_else(|p| p.into_inner()) = quic;
        *self.tcp_tls.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(tcp);
        self.identity.0.send_modify(|g| *g += 1);
    }

    pub(super) fn tcp_tls(&self) -> Arc<rustls::ClientConfig> {
        self.tcp_tls
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// Runs until shutdown, keeping a tunnel to `target` in the pool whenever one can be had.
pub async fn maintain(
    target: DialTarget,
    dialer: Arc<Dialer>,
    mut backoff: Backoff,
    mut stop: ShutdownSignal,
) {
    let mut failures = 0u32;
    let mut next = None;
    loop {
        let result = match next.take() {
            Some(upgraded) => Ok(upgraded),
            None => {
                let attempt = tokio::time::timeout(
                    dialer.handshake_timeout,
                    dial(&target, &dialer, dialer.transport),
                );
                tokio::select! {
                    r = attempt => r.unwrap_or(Err(DialError::Timeout(dialer.handshake_timeout))),
                    _ = stop.wait() => return,
                }
            }
        };
        let mut delay = None;
        match result {
            Ok(established) => {
                backoff.reset();
                failures = 0;
                next = serve(&target, established, &dialer, &mut stop).await;
                if stop.fired() {
                    return;
                }
                if next.is_some() {
                    continue;
                }
            }
            Err(DialError::Itself) => {
                info!(kind = dialer.kind.as_str(), server = %target.label, "this address is this server itself; not dialing it");
                stop.wait().await;
                return;
            }
            Err(e @ DialError::Duplicate(_)) => {
                debug!(kind = dialer.kind.as_str(), server = %target.label, "{e}");
                delay = Some(DUPLICATE_RETRY);
            }
            Err(e) => {
                dialer.stats.connect_failures.inc();
                failures += 1;
                // The first failure and then every tenth: a server that stays down for hours
                // must not flood the log.
                if failures == 1 || failures.is_multiple_of(10) {
                    warn!(kind = dialer.kind.as_str(), server = %target.label, attempts = failures, error = %e,
                        "cannot reach server; retrying");
                } else {
                    debug!(kind = dialer.kind.as_str(), server = %target.label, error = %e, "cannot reach server");
                }
            }
        }
        let delay = delay.unwrap_or_else(|| backoff.next_delay(fastrand::f64()));
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.wait() => return,
        }
    }
}

/// Serves a connected tunnel until it closes or the process stops; returns a QUIC tunnel that
/// replaces it, when a link on TCP (in `auto`) managed to move to QUIC.
async fn serve(
    target: &DialTarget,
    established: Established,
    d: &Dialer,
    stop: &mut ShutdownSignal,
) -> Option<Established> {
    let Established {
        tunnel,
        welcomed,
        identity: dialed_with,
        server_key,
    } = established;
    let mut control = welcomed.control;
    let link = Arc::new(
        Link::new(
            target.label.clone(),
            tunnel.clone(),
            welcomed.server_id,
            target.rank,
        )
        .with_server_key(server_key)
        .with_capabilities(welcomed.capabilities),
    );
    d.pool.add(link.clone());
    d.stats.connects.inc();
    d.stats.up.inc();
    d.changed.notify_one();
    info!(kind = d.kind.as_str(), server = %target.label, peer = %tunnel.remote_addr(),
        transport = %tunnel.kind(), "tunnel up");
    for m in &d.after_welcome {
        if let Err(e) = control.send.write_message(m).await {
            debug!(kind = d.kind.as_str(), server = %target.label, error = %e, "cannot send after welcome");
        }
    }
    let incoming = accept_incoming(&link, d.on_stream.as_ref());
    let moves = lifecycle(target, d, &link, dialed_with);
    let heartbeat = control.needs_heartbeat();
    let mut outbox = d.outbox.as_ref().map(|make| make(link.capabilities()));
    let mut upgraded = None;
    let mut udp_lost = false;
    let reason = tokio::select! {
        e = incoming => e,
        r = read_control(&mut control.recv, heartbeat, &link, d) => r,
        e = send_control(&mut control.send, outbox.as_mut(), &link) => e,
        (next, purpose) = moves => {
            upgraded = Some(next);
            udp_lost = purpose == Purpose::TcpBeside;
            match purpose {
                Purpose::Quic => LinkEnd::MovedToQuic,
                Purpose::TcpBeside => LinkEnd::MovedToTcp,
                Purpose::Renewed => LinkEnd::MovedToRenewed,
            }
        }
        _ = stop.wait() => LinkEnd::Shutdown,
    };
    d.pool.remove(&link);
    d.stats.up.dec();
    d.changed.notify_one();
    if upgraded.is_some() {
        // New streams go to the new tunnel from now on; the ones open on the old one finish
        // there.
        if udp_lost {
            warn!(kind = d.kind.as_str(), server = %target.label, streams = link.streams(), reason = %reason,
                "moving to a new tunnel; open streams finish on the old one if QUIC is heard again");
        } else {
            info!(kind = d.kind.as_str(), server = %target.label, streams = link.streams(), reason = %reason,
                "moving to a new tunnel; open streams finish on the old one");
        }
        retire(link.clone(), d, udp_lost, target.label.clone());
        return upgraded;
    }
    tunnel.close(code::SHUTDOWN, "tunnel closed");
    if let (Some(hook), false) = (&d.on_down, stop.fired()) {
        hook(&link);
    }
    if stop.fired() {
        info!(kind = d.kind.as_str(), server = %target.label, reason = %reason, "tunnel down");
    } else {
        warn!(kind = d.kind.as_str(), server = %target.label, peer = %tunnel.remote_addr(), reason = %reason,
            "tunnel down");
    }
    None
}

/// Why a link's tunnel stopped being served: logged as the tunnel's end, and, for the moves, why
/// its open streams finish on it while new ones go to its successor.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkEnd {
    /// Accepting the server's streams failed: the tunnel is gone.
    #[error(transparent)]
    Tunnel(TransportError),
    #[error("control stream failed: {0}")]
    ControlWrite(StreamError),
    #[error("control stream failed: {0}")]
    ControlRead(FrameError),
    #[error("server closed the control stream")]
    ControlClosed,
    /// A server older than the liveness capability went silent over TCP past the tolerance.
    #[error("no heartbeat from the server for {0:?}")]
    NoHeartbeat(Duration),
    #[error("moved to QUIC")]
    MovedToQuic,
    #[error("QUIC went silent while TCP answers: moved to TCP")]
    MovedToTcp,
    #[error("moved to the renewed certificate")]
    MovedToRenewed,
    #[error("shutting down")]
    Shutdown,
}

/// Drives the served tunnel's [`Lifecycle`]: dials what it asks for, beside the tunnel, and
/// returns the tunnel the link moves to, and why.
async fn lifecycle(
    target: &DialTarget,
    d: &Dialer,
    link: &Link,
    dialed_with: u64,
) -> (Established, Purpose) {
    use tokio::time::Instant;
    let auto = d.transport == TransportChoice::Auto;
    let mut m = Lifecycle::new(Instant::now(), auto, link.tunnel.kind(), dialed_with);
    let mut identity = d.identity.0.subscribe();
    let mut watching = true;
    let mut held: Option<Established> = None;
    loop {
        let now = Instant::now();
        let generation = *identity.borrow_and_update();
        match m.step(now, link.doubted(), generation) {
            Action::Wait(until) => {
                let timer = async {
                    match until {
                        Some(t) => tokio::time::sleep_until(t).await,
                        None => std::future::pending().await,
                    }
                };
                let renewed = async {
                    if !watching || identity.changed().await.is_err() {
                        // The dialer is gone: no renewal will come.
                        watching = false;
                        std::future::pending::<()>().await;
                    }
                };
                tokio::select! {
                    _ = timer => {}
                    _ = renewed => {}
                }
            }
            Action::Dial { purpose, transport } => {
                let choice = match transport {
                    TransportKind::Quic => TransportChoice::Quic,
                    TransportKind::Tcp => TransportChoice::Tcp,
                };
                let attempt = tokio::time::timeout(d.handshake_timeout, dial(target, d, choice));
                let dialed = attempt.await.ok().and_then(Result::ok);
                debug!(kind = d.kind.as_str(), server = %target.label, ?purpose, ok = dialed.is_some(),
                    "dialed a tunnel beside");
                m.dialed(Instant::now(), dialed.as_ref().map(|e| e.identity));
                held = dialed;
            }
            Action::Move(purpose) => {
                if let Some(next) = held.take() {
                    return (next, purpose);
                }
            }
            Action::Discard => {
                if let Some(extra) = held.take() {
                    extra.tunnel.close(code::OK, "not needed after all");
                }
            }
        }
    }
}

/// Retires a tunnel the link moved away from, on a task of its own, by the rule of
/// [`Retiring`]: its streams finish there (or are reset, when it was left for lost UDP and QUIC
/// stays silent), and the server's reverse streams opened on it meanwhile are served.
fn retire(old: Arc<Link>, d: &Dialer, udp_lost: bool, label: String) {
    let hook = d.on_stream.clone();
    let pool = d.pool.clone();
    let kind = d.kind.as_str();
    pool.retire(old.clone());
    tokio::spawn(async move {
        let now = tokio::time::Instant::now();
        let mut rule = Retiring::new(now, udp_lost, old.tunnel.traffic().answers);
        let accepting = accept_incoming(&old, hook.as_ref());
        tokio::pin!(accepting);
        loop {
            let now = tokio::time::Instant::now();
            let closed = old.tunnel.close_reason().is_some();
            match rule.step(now, old.streams(), closed, old.tunnel.traffic().answers) {
                Retire::Wait(until) => tokio::select! {
                    _ = tokio::time::sleep_until(until) => {}
                    // The tunnel is gone.
                    _ = &mut accepting => break,
                },
                Retire::Close => break,
                Retire::Reset => {
                    warn!(kind, server = %label, streams = old.streams(),
                        "QUIC still silent after moving to TCP: resetting the streams left on it");
                    old.tunnel.close(code::SHUTDOWN, "UDP is blocked");
                    break;
                }
            }
        }
        old.tunnel.close(code::OK, "moved to a new tunnel");
        pool.forget_retired(&old);
    });
}

/// Serves the streams the server opens on the link's tunnel (the reverse path) with `hook`,
/// each counted among the link's streams while it runs, so that a tunnel being left for a
/// new one stays up until they end (a `kubectl exec` is not cut by a renewal); returns why
/// accepting stopped.
async fn accept_incoming(link: &Arc<Link>, hook: Option<&StreamHook>) -> LinkEnd {
    loop {
        match link.tunnel.accept_stream().await {
            Ok(mut s) => match hook {
                Some(hook) => {
                    let guard = link.stream_guard();
                    let served = hook(s);
                    tokio::spawn(async move {
                        served.await;
                        drop(guard);
                    });
                }
                None => s.reset(code::PROTOCOL).await,
            },
            Err(e) => return LinkEnd::Tunnel(e),
        }
    }
}

/// Sends what the link's outbox has, as it comes, and the probes the liveness watch asks for;
/// returns why it stopped.
async fn send_control(
    send: &mut SendHalf,
    mut outbox: Option<&mut Box<dyn Outbox>>,
    link: &Link,
) -> LinkEnd {
    let mut nonce = 0u64;
    loop {
        let next = async {
            match outbox.as_mut() {
                Some(o) => o.next().await,
                None => std::future::pending().await,
            }
        };
        let msgs = tokio::select! {
            m = next => m,
            _ = link.probe_wanted() => {
                nonce += 1;
                vec![Message::Ping { nonce }]
            }
        };
        for m in msgs {
            if let Err(e) = send.write_message(&m).await {
                return LinkEnd::ControlWrite(e);
            }
        }
    }
}

/// Applies the server's announcements until the control stream ends; returns why it ended.
/// Over TCP a server without the liveness capability repeats its health every keepalive
/// interval; the link monitor judges those beats (a dead server or a dead link), and silence for
/// longer than the blackout tolerance ends the tunnel here too, as a backstop.
async fn read_control(recv: &mut RecvHalf, heartbeat: bool, link: &Link, d: &Dialer) -> LinkEnd {
    let heartbeat = heartbeat && !link.has(tether_proto::capability::LIVENESS);
    let hold = d.liveness.tunnel_idle_timeout();
    loop {
        let next = recv.read_message();
        let msg = if heartbeat {
            match tokio::time::timeout(hold, next).await {
                Ok(m) => m,
                Err(_) => return LinkEnd::NoHeartbeat(hold),
            }
        } else {
            next.await
        };
        match msg {
            Ok(Some(Message::Health { upstream_healthy })) => {
                if upstream_healthy != link.healthy() {
                    info!(kind = d.kind.as_str(), server = %link.server, healthy = upstream_healthy,
                        "server's upstream health changed");
                }
                link.set_healthy(upstream_healthy);
            }
            Ok(Some(Message::Drain)) => {
                info!(kind = d.kind.as_str(), server = %link.server, "server is draining; sending it no new streams");
                link.set_draining();
            }
            Ok(Some(Message::Pong { .. })) => link.ponged(),
            Ok(Some(Message::Clock { unix_ms })) => {
                let off = link.clock(unix_ms);
                if off >= crate::pool::CLOCK_SKEW_WARN {
                    warn!(kind = d.kind.as_str(), server = %link.server, skew_ms = link.clock_skew_ms(),
                        "this host's clock is {}s off the server's: certificates, tokens and renewals are checked by the clock; set up NTP",
                        off.as_secs());
                }
            }
            Ok(Some(Message::ServerDown { server_id })) => {
                let n = d.pool.report_down(&server_id);
                info!(kind = d.kind.as_str(), server = %link.server, down = %server_id, links = n,
                    "a server reports a peer down; probing it");
            }
            Ok(Some(Message::ServerList { servers })) => {
                debug!(kind = d.kind.as_str(), server = %link.server, count = servers.len(), "server list");
                link.set_servers(servers);
                d.changed.notify_one();
            }
            Ok(Some(m)) => match &d.on_message {
                Some(f) => f(link, &m),
                None => debug!(message = m.name(), "control message ignored"),
            },
            Ok(None) => return LinkEnd::ControlClosed,
            Err(e) => return LinkEnd::ControlRead(e),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn host_names() {
        assert_eq!(super::host_of("10.0.0.1:9443"), "10.0.0.1");
        assert_eq!(super::host_of("[::1]:9443"), "::1");
        assert_eq!(super::host_of("cp.example:9443"), "cp.example");
    }
}
