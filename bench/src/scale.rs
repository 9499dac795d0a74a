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
use tether_common::backoff::Backoff;
use tether_common::pool::Pool;
use tether_common::reconnect::{self, Dialer, LinkStats, TransportChoice};
use tether_common::shutdown::Shutdown;
use tether_common::tls;

/// New tunnels started per second: a storm of thousands of handshakes at once would measure
/// the handshake queue, not the cost of an idle agent.
const RAMP_PER_SECOND: usize = 1000;
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
}

pub fn measure(
    work: &Path,
    pki: &Pki,
    up: &Upstream,
    transport: &str,
    counts: &[usize],
) -> Result<Vec<ScalePoint>> {
    let max = counts.iter().copied().max().unwrap_or(0);
    let ca = tether_certs::Ca::load(&pki.server_dir).context("load the bench CA")?;
    let roots = tls::load_roots(&pki.server_dir.join(tether_certs::files::CA_CERT))?;
    let started = Instant::now();
    let mut configs = Vec::with_capacity(max);
    for i in 0..max {
        let issued = ca.issue_agent(&format!("sim-{i}"), tether_certs::Lifetime::days(1))?;
        let id = tls::Identity::from_pem(&issued.cert_pem, &issued.key_pem)?;
        configs.push(Arc::new(tls::client_config(roots.clone(), id)?));
    }
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
            &[],
        )?;
        let point = hold_agents(&server, choice, &configs[..n], transport)?;
        eprintln!(
            "  scale {transport} {n}: {} up in {:.1} s, server {:.1} KiB per agent, {:.1}% CPU idle",
            point.connected, point.seconds_to_connect, point.server_kib_per_agent, point.server_cpu_percent
        );
        out.push(point);
    }
    Ok(out)
}

fn hold_agents(
    server: &Server,
    choice: TransportChoice,
    configs: &[Arc<rustls::ClientConfig>],
    transport: &str,
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
    let connected = rt.block_on(async {
        let target = reconnect::resolve(&server.addr.to_string(), 0)
            .await?
            .into_iter()
            .next()
            .context("the server address resolves to nothing")?;
        for (i, cfg) in configs.iter().enumerate() {
            let endpoint =
                tether_common::net::quic_endpoint(SocketAddr::from(([127, 0, 0, 1], 0)), None)
                    .context("a UDP socket for a simulated agent (raise the open file limit)")?;
            let quic = tls::quic_client_config(
                (**cfg).clone(),
                tls::quic_transport(Default::default(), Default::default()),
            )?;
            let dialer = Arc::new(Dialer {
                endpoint,
                client_config: std::sync::RwLock::new(quic),
                tcp_tls: std::sync::RwLock::new(cfg.clone()),
                transport: choice,
                liveness: Default::default(),
                max_streams: tls::TunnelLimits::default().max_streams,
                hello_name: format!("sim-{i}"),
                capabilities: vec![tether_common::protocol::SERVICE_APISERVER.into()],
                own_server_id: None,
                handshake_timeout: Duration::from_secs(10),
                pool: Arc::new(Pool::default()),
                stats: stats.clone(),
                changed: Arc::new(tokio::sync::Notify::new()),
                kind: "server",
                on_message: None,
                after_welcome: Vec::new(),
                on_stream: None,
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
        }
        let deadline = Instant::now() + Duration::from_secs(30 + n as u64 / 100);
        while (stats.up.get() as usize) < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::Ok(stats.up.get().max(0) as usize)
    })?;
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
    })
}
