//! Scale: N simulated agents held against one server process, to see what an idle agent costs
//! its server in memory and CPU.
//!
//! Each simulated agent is the agent's own reconnect loop (`reconnect::maintain`, with the
//! hello, keepalives and liveness of a real agent), with its own certificate, its own node name
//! and its own UDP socket (or TCP connection), all in this process. Only the server is measured.

use crate::load::Upstream;
use crate::path::{Pki, Server};
use crate::procs::usage;
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_link::backoff::Backoff;
use tether_link::pool::Pool;
use tether_link::reconnect::{self, Dialer, LinkStats, TransportChoice};
use tether_process::shutdown::Shutdown;
use tether_transport::tls;

/// New tunnels started per second: a storm of thousands of handshakes at once would measure
/// the handshake queue, not the cost of an idle agent.
const RAMP_PER_SECOND: usize = 1000;
/// Handshakes outstanding at most: on a small machine the bench's and the server's handshakes
/// compete for the same CPUs, and past a few hundred they time out and retry in a storm.
const IN_FLIGHT: usize = 200;
/// How long the server is watched, idle with N agents, for its CPU figure.
const IDLE_WINDOW: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, serde::Serialize)]
pub struct ScalePoint {
    pub transport: String,
    pub agents: usize,
    /// Tunnels up when measured (less than `agents` means the server or the bench gave out).
    pub connected: usize,
    pub seconds_to_connect: f64,
    pub server_rss_kb_before: u64,
    pub server_rss_kb: u64,
    pub server_kib_per_agent: f64,
    /// Share of one CPU the server spends on N idle agents (keepalives both ways).
    pub server_cpu_percent: f64,
    /// The keepalive interval of both ends, which the CPU figure is proportional to.
    pub keepalive_ms: u64,
}

pub fn measure(
    work: &Path,
    pki: &Pki,
    up: &Upstream,
    transport: &str,
    counts: &[usize],
    keepalive: Duration,
) -> Result<Vec<ScalePoint>> {
    let (liveness, server_args) = liveness_of(keepalive);
    let max = counts.iter().copied().max().unwrap_or(0);
    let started = Instant::now();
    let configs = agent_identities(pki, "sim", max)?;
    eprintln!(
        "  scale: {max} agent certificates issued in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let choice: TransportChoice = transport.parse().map_err(anyhow::Error::msg)?;
    let mut out = Vec::new();
    for &n in counts {
        let server = Server::start(
            work,
            pki,
            &format!("scale-{transport}-{n}"),
            up.echo,
            up.sink,
            &server_args,
        )?;
        let point = hold_agents(&server, choice, &configs[..n], transport, liveness)?;
        eprintln!(
            "  scale {transport} {n}: {} up in {:.1} s, server {:.1} KiB per agent, {:.1}% CPU idle",
            point.connected, point.seconds_to_connect, point.server_kib_per_agent, point.server_cpu_percent
        );
        out.push(point);
    }
    Ok(out)
}

/// TLS settings of `n` simulated agents named `PREFIX-i`, each with a certificate of its own
/// from the bench's CA.
fn agent_identities(pki: &Pki, prefix: &str, n: usize) -> Result<Vec<Arc<rustls::ClientConfig>>> {
    let ca = tether_trust::Ca::load(&pki.server_dir).context("load the bench CA")?;
    let roots = tls::load_roots(&pki.server_dir.join(tether_trust::files::CA_CERT))?;
    let mut configs = Vec::with_capacity(n);
    for i in 0..n {
        let issued = ca.issue_agent(&format!("{prefix}-{i}"), tether_trust::Lifetime::days(1))?;
        let id = tls::Identity::from_pem(&issued.cert_pem, &issued.key_pem)?;
        configs.push(Arc::new(tls::client_config(
            roots.clone(),
            id,
            tls::PostQuantum::Prefer,
        )?));
    }
    Ok(configs)
}

/// The liveness of the simulated agents (idle timeout: five keepalives), and the server's
/// flags for the same.
fn liveness_of(keepalive: Duration) -> (tls::Liveness, [String; 4]) {
    let liveness = tls::Liveness {
        keepalive_interval: keepalive,
        idle_timeout: keepalive * 5,
        blackout_tolerance: keepalive * 5,
    };
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let args = [
        "--keepalive-interval".to_string(),
        ms(liveness.keepalive_interval),
        "--idle-timeout".to_string(),
        ms(liveness.idle_timeout),
    ];
    (liveness, args)
}

fn hold_agents(
    server: &Server,
    choice: TransportChoice,
    configs: &[Arc<rustls::ClientConfig>],
    transport: &str,
    liveness: tls::Liveness,
) -> Result<ScalePoint> {
    let pid = server.proc.pid();
    std::thread::sleep(Duration::from_secs(1));
    let before = usage(pid)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let stats = Arc::new(LinkStats::default());
    let shutdown = Shutdown::new();
    let n = configs.len();
    let started = Instant::now();
    let connected = rt.block_on(spawn_agents(
        server.addr,
        choice,
        configs,
        liveness,
        stats.clone(),
        &shutdown,
    ))?;
    let seconds_to_connect = started.elapsed().as_secs_f64();
    rt.block_on(async { tokio::time::sleep(Duration::from_secs(2)).await });
    let u1 = usage(pid)?;
    rt.block_on(async { tokio::time::sleep(IDLE_WINDOW).await });
    let u2 = usage(pid)?;
    shutdown.trigger();
    rt.shutdown_timeout(Duration::from_secs(5));
    let grown = u1.rss_kb.saturating_sub(before.rss_kb) as f64;
    Ok(ScalePoint {
        transport: transport.into(),
        agents: n,
        connected,
        seconds_to_connect,
        server_rss_kb_before: before.rss_kb,
        server_rss_kb: u1.rss_kb,
        server_kib_per_agent: if connected > 0 {
            grown / connected as f64
        } else {
            0.0
        },
        server_cpu_percent: (u2.cpu_s - u1.cpu_s) / IDLE_WINDOW.as_secs_f64() * 100.0,
        keepalive_ms: liveness.keepalive_interval.as_millis() as u64,
    })
}

/// Starts one simulated agent per certificate against `server` (ramped, with a bounded number
/// of handshakes outstanding) and waits until all are up or a deadline passes; how many are.
async fn spawn_agents(
    server: SocketAddr,
    choice: TransportChoice,
    configs: &[Arc<rustls::ClientConfig>],
    liveness: tls::Liveness,
    stats: Arc<LinkStats>,
    shutdown: &Shutdown,
) -> Result<usize> {
    let n = configs.len();
    let target = reconnect::resolve(&server.to_string(), 0)
        .await?
        .into_iter()
        .next()
        .context("the server address resolves to nothing")?;
    let shared = match choice {
        TransportChoice::Tcp => Some(sim_endpoint()?),
        _ => None,
    };
    for (i, cfg) in configs.iter().enumerate() {
        let endpoint = match &shared {
            // Over TCP the endpoint is never used: one for all spares a descriptor each.
            Some(e) => e.clone(),
            None => sim_endpoint()
                .context("a UDP socket for a simulated agent (raise the open file limit)")?,
        };
        let quic = tls::quic_client_config(
            (**cfg).clone(),
            // A keepalive of the transport's own, as agents before 0.3 sent: the simulated
            // agents run no link monitor, and the figure is the server's cost of busy tunnels.
            tls::peer_quic_transport(liveness, Default::default()),
        )?;
        let dialer = Arc::new(Dialer {
            endpoint,
            client_config: std::sync::RwLock::new(quic),
            tcp_tls: std::sync::RwLock::new(cfg.clone()),
            transport: choice,
            liveness,
            max_streams: tls::TunnelLimits::default().max_streams,
            hello_name: format!("sim-{i}"),
            capabilities: tether_proto::capability::Capabilities::ours(&[]),
            own_server_id: None,
            handshake_timeout: Duration::from_secs(10),
            pool: Arc::new(Pool::default()),
            stats: stats.clone(),
            changed: Arc::new(tokio::sync::Notify::new()),
            kind: tether_link::reconnect::LinkKind::Server,
            proxy: None,
            on_message: None,
            outbox: None,
            after_welcome: Vec::new(),
            on_stream: None,
            identity: Default::default(),
            on_down: None,
        });
        let backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
        tokio::spawn(reconnect::maintain(
            target.clone(),
            dialer,
            backoff,
            shutdown.signal(),
        ));
        if (i + 1) % (RAMP_PER_SECOND / 10) == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Closed loop: past IN_FLIGHT handshakes outstanding, wait for them, as long as
        // tunnels keep coming up (a server that stops accepting must not stall the bench).
        let mut seen = stats.up.get();
        let mut progress = Instant::now();
        while (i + 1).saturating_sub(seen.max(0) as usize) >= IN_FLIGHT
            && progress.elapsed() < Duration::from_secs(5)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let now = stats.up.get();
            if now > seen {
                seen = now;
                progress = Instant::now();
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30 + n as u64 / 100);
    while (stats.up.get() as usize) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    anyhow::Ok(stats.up.get().max(0) as usize)
}

/// A simulated agent's QUIC endpoint: tether's own socket and settings, one datagram per
/// receive. quinn's own socket layer sizes an endpoint's receive buffer as largest datagram x
/// GRO segments (64) x batch (32), about 3 MB; a real agent has one endpoint, whose untouched
/// pages cost nothing, but with thousands in one process the allocator hands out recycled
/// memory that calloc must clear, and the bench, not the server, runs out of memory.
fn sim_endpoint() -> std::io::Result<quinn::Endpoint> {
    let sock = tether_endpoint::net::udp_socket(SocketAddr::from(([127, 0, 0, 1], 0)))?;
    let sock: Arc<dyn quinn::AsyncUdpSocket> =
        Arc::new(PlainUdp(Arc::new(tokio::net::UdpSocket::from_std(sock)?)));
    let runtime = quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for QUIC"))?;
    quinn::Endpoint::new_with_abstract_socket(
        tether_endpoint::net::endpoint_config()?,
        None,
        sock,
        runtime,
    )
}

/// A UDP socket without batching, GSO or GRO: a datagram per system call, plenty for an idle
/// agent's keepalives.
#[derive(Debug)]
struct PlainUdp(Arc<tokio::net::UdpSocket>);

impl quinn::AsyncUdpSocket for PlainUdp {
    fn create_io_poller(self: Arc<Self>) -> std::pin::Pin<Box<dyn quinn::UdpPoller>> {
        Box::pin(Writable(self.0.clone()))
    }

    fn try_send(&self, transmit: &quinn::udp::Transmit) -> std::io::Result<()> {
        // max_transmit_segments is 1, so quinn hands over one datagram at a time.
        self.0
            .try_send_to(transmit.contents, transmit.destination)
            .map(|_| ())
    }

    fn poll_recv(
        &self,
        cx: &mut std::task::Context,
        bufs: &mut [std::io::IoSliceMut<'_>],
        meta: &mut [quinn::udp::RecvMeta],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let (Some(buf), Some(m)) = (bufs.first_mut(), meta.first_mut()) else {
            return std::task::Poll::Ready(Ok(0));
        };
        let mut rb = tokio::io::ReadBuf::new(buf);
        let from = std::task::ready!(self.0.poll_recv_from(cx, &mut rb))?;
        let len = rb.filled().len();
        *m = quinn::udp::RecvMeta {
            addr: from,
            len,
            stride: len,
            ecn: None,
            dst_ip: None,
        };
        std::task::Poll::Ready(Ok(1))
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn may_fragment(&self) -> bool {
        true
    }
}

#[derive(Debug)]
struct Writable(Arc<tokio::net::UdpSocket>);

impl quinn::UdpPoller for Writable {
    fn poll_writable(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.0.poll_send_ready(cx)
    }
}

/// A reconnect storm: what happens when every agent of a server reconnects at once.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Storm {
    pub transport: String,
    pub agents: usize,
    /// Agents back when the wait ended.
    pub back: usize,
    /// From the restarted server's readiness to the last agent back.
    pub seconds_to_all_back: f64,
    /// The restarted server's peak share of one CPU (200 ms samples) and peak RSS.
    pub peak_cpu_percent: f64,
    pub peak_rss_kb: u64,
}

/// `agents` simulated agents on one server; the server is killed with -9, the agents notice,
/// and it is started again on the same address: how long until every agent is back, and what
/// the storm costs the server.
pub fn storm(
    work: &Path,
    pki: &Pki,
    up: &Upstream,
    transport: &str,
    agents: usize,
    keepalive: Duration,
) -> Result<Storm> {
    let (liveness, server_args) = liveness_of(keepalive);
    let configs = agent_identities(pki, "storm", agents)?;
    let choice: TransportChoice = transport.parse().map_err(anyhow::Error::msg)?;
    let name = format!("storm-{transport}");
    let server = Server::start(work, pki, &name, up.echo, up.sink, &server_args)?;
    let addr = server.addr;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let stats = Arc::new(LinkStats::default());
    let shutdown = Shutdown::new();
    let connected = rt.block_on(spawn_agents(
        addr,
        choice,
        &configs,
        liveness,
        stats.clone(),
        &shutdown,
    ))?;
    if connected < agents {
        anyhow::bail!("only {connected} of {agents} simulated agents connected before the storm");
    }
    // kill -9, and wait until every agent has noticed.
    drop(server);
    crate::procs::wait_until(
        "the agents notice the dead server",
        liveness.idle_timeout * 3,
        || stats.up.get() <= 0,
    )?;
    let server = Server::start_on(
        work,
        pki,
        &format!("{name}-again"),
        addr,
        (up.echo, up.sink),
        &server_args,
    )?;
    let pid = server.proc.pid();
    let started = Instant::now();
    let deadline = Duration::from_secs(120);
    let (mut peak_cpu, mut peak_rss) = (0.0f64, 0u64);
    let mut last = usage(pid)?;
    while (stats.up.get().max(0) as usize) < agents && started.elapsed() < deadline {
        std::thread::sleep(Duration::from_millis(200));
        let now = usage(pid)?;
        peak_cpu = peak_cpu.max((now.cpu_s - last.cpu_s) / 0.2 * 100.0);
        peak_rss = peak_rss.max(now.rss_kb);
        last = now;
    }
    let seconds = started.elapsed().as_secs_f64();
    let back = stats.up.get().max(0) as usize;
    shutdown.trigger();
    rt.shutdown_timeout(Duration::from_secs(5));
    Ok(Storm {
        transport: transport.into(),
        agents,
        back,
        seconds_to_all_back: seconds,
        peak_cpu_percent: peak_cpu,
        peak_rss_kb: peak_rss,
    })
}
