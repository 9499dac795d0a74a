//! The `tether-agent` command.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tether_agent::config::AgentConfig;
use tether_process::units::{format_duration, parse_duration};

#[derive(Parser)]
#[command(
    name = "tether-agent",
    version,
    about = "tether's node side: listens where kubelet expects the API server and tunnels each connection to a tether-server"
)]
struct Cli {
    #[command(flatten)]
    log: tether_process::telemetry::LogArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent.
    Run(Box<RunArgs>),
    /// Check, one step at a time with the settings of `run`, why this node can or cannot
    /// connect: settings, certificate, DNS, QUIC, TCP, TLS, the proxy, clocks, the listener,
    /// the running agent. Exit status 0: all ok; 1: a warning; 2: a failure.
    Diagnose(Box<DiagnoseArgs>),
    #[command(flatten)]
    Tools(tether_process::cli::Tools),
}

#[derive(Args)]
struct DiagnoseArgs {
    #[command(flatten)]
    run: RunArgs,
    /// text (one line per check, with a hint when it is not ok) or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

#[derive(Args)]
struct RunArgs {
    /// Settings file (TOML; `config example` prints one). Flags and TETHER_* variables win
    /// over it.
    #[arg(long, env = "TETHER_CONFIG")]
    config: Option<PathBuf>,
    /// A tether-server to keep a tunnel to, host:port (repeatable, or comma-separated).
    #[arg(
        long = "server",
        env = "TETHER_SERVER",
        value_delimiter = ',',
        required = true
    )]
    servers: Vec<String>,
    /// Directory holding ca.crt, agent.crt and agent.key.
    #[arg(long, env = "TETHER_DATA_DIR")]
    data_dir: PathBuf,
    /// CA certificate (default DATA_DIR/ca.crt).
    #[arg(long, env = "TETHER_CA")]
    ca: Option<PathBuf>,
    /// Agent certificate (default DATA_DIR/agent.crt).
    #[arg(long, env = "TETHER_CERT")]
    cert: Option<PathBuf>,
    /// Agent private key (default DATA_DIR/agent.key).
    #[arg(long, env = "TETHER_KEY")]
    key: Option<PathBuf>,
    /// Local listener for kubelet, kube-proxy and friends.
    #[arg(long, env = "TETHER_LISTEN", default_value_t = defaults().listen)]
    listen: SocketAddr,
    /// Another local listener carried to a named service of the servers, LISTEN=NAME
    /// (repeatable; the servers map NAME with --service).
    #[arg(long = "forward", env = "TETHER_FORWARD", value_delimiter = ',', value_parser = tether_agent::config::parse_forward)]
    forwards: Vec<(SocketAddr, String)>,
    /// Admin endpoint (/healthz, /readyz, /metrics); off when unset.
    #[arg(long, env = "TETHER_ADMIN")]
    admin: Option<SocketAddr>,
    /// Services whose traffic is TLS, so that a connection's first bytes travel with its open
    /// and it costs no extra round trip (repeatable; `none` for none). Only TLS: a retry on
    /// another server may deliver the first bytes twice.
    #[arg(long = "early-data", env = "TETHER_EARLY_DATA", value_delimiter = ',', default_values_t = defaults().early_data)]
    early_data: Vec<String>,
    /// How long a server may take to answer a new stream before the next one is tried.
    #[arg(long, env = "TETHER_STREAM_OPEN_TIMEOUT", default_value = format_duration(defaults().stream_open_timeout), value_parser = parse_duration)]
    stream_open_timeout: Duration,
    /// How long the last server left may take to answer a new stream.
    #[arg(long, env = "TETHER_LAST_ATTEMPT_TIMEOUT", default_value = format_duration(defaults().last_attempt_timeout), value_parser = parse_duration)]
    last_attempt_timeout: Duration,
    /// How long a new local connection that finds no tunnel up waits for one, counted from when
    /// the last tunnel went down (0 to refuse at once); past it, connections are refused at once.
    #[arg(long, env = "TETHER_RECONNECT_GRACE", default_value = format_duration(defaults().reconnect_grace), value_parser = parse_duration)]
    reconnect_grace: Duration,
    /// Longest a tunnel's handshake may take.
    #[arg(long, env = "TETHER_HANDSHAKE_TIMEOUT", default_value = format_duration(defaults().handshake_timeout), value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// How often an idle tunnel is probed (a ping on its control stream): often enough to keep
    /// NAT bindings open; a server that died quietly is noticed at the next probe, or at once
    /// when another server reports it.
    #[arg(long, env = "TETHER_KEEPALIVE_INTERVAL", default_value = format_duration(defaults().liveness.keepalive_interval), value_parser = parse_duration)]
    keepalive_interval: Duration,
    /// A server silent for this long while another server answers is dead: its tunnel is closed
    /// and its streams reset (it grows with the round-trip time on long links).
    #[arg(long, env = "TETHER_IDLE_TIMEOUT", default_value = format_duration(defaults().liveness.idle_timeout), value_parser = parse_duration)]
    idle_timeout: Duration,
    /// How long a tunnel between agent and server is held, with its streams, while its link is
    /// silent (a blackout: a cellular handover, a roaming node). Longer blackouts close it.
    #[arg(long, env = "TETHER_BLACKOUT_TOLERANCE", default_value = format_duration(defaults().liveness.blackout_tolerance), value_parser = parse_duration)]
    blackout_tolerance: Duration,
    /// QUIC congestion controller of this end's sending: bbr (holds its rate through random
    /// loss, keeps queues short), cubic or newreno (back off at every loss).
    #[arg(long, env = "TETHER_CONGESTION", default_value_t = tether_transport::tls::Congestion::default())]
    congestion: tether_transport::tls::Congestion,
    /// The key exchange of tunnels and joins: prefer (X25519MLKEM768, the post-quantum hybrid,
    /// first; X25519 for peers without it, such as 0.2) or require (the hybrid only: a peer
    /// without it fails the handshake).
    #[arg(long, env = "TETHER_POST_QUANTUM", default_value_t = tether_transport::tls::PostQuantum::default())]
    post_quantum: tether_transport::tls::PostQuantum,
    /// Upper bound of the reconnect delay.
    #[arg(long, env = "TETHER_RECONNECT_MAX", default_value = format_duration(defaults().reconnect_max), value_parser = parse_duration)]
    reconnect_max: Duration,
    /// Join token (from `tether-server init` or `token create`), used when DATA_DIR holds no
    /// certificate yet.
    #[arg(long, env = "TETHER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// A file holding the join token (its first line): unlike --token, it is not on the
    /// command line, where any local user can read it through /proc. Preferred.
    #[arg(long, env = "TETHER_TOKEN_FILE", conflicts_with = "token")]
    token_file: Option<PathBuf>,
    /// The node name to join as (default: the host name).
    #[arg(long, env = "TETHER_NODE_NAME")]
    node_name: Option<String>,
    /// The node's address as reported to the control plane (repeatable); default: the
    /// addresses of its interfaces.
    #[arg(long = "node-ip", env = "TETHER_NODE_IP", value_delimiter = ',')]
    node_ips: Vec<std::net::IpAddr>,
    /// Let the control plane reach this address on the node too (repeatable); by default it
    /// reaches only the kubelet (port 10250 on loopback and the node's addresses).
    #[arg(long = "allow", env = "TETHER_ALLOW", value_delimiter = ',')]
    allow: Vec<SocketAddr>,
    /// Let the control plane reach this port on loopback and the node's addresses (repeatable).
    #[arg(long = "allow-port", env = "TETHER_ALLOW_PORT", value_delimiter = ',')]
    allow_ports: Vec<u16>,
    /// Dial servers announced in this network even when it is loopback or link-local
    /// (repeatable, CIDR); by default announced servers at such addresses are refused unless a
    /// --server is of the same kind.
    #[arg(
        long = "allow-server-network",
        env = "TETHER_ALLOW_SERVER_NETWORK",
        value_delimiter = ','
    )]
    allow_server_networks: Vec<tether_agent::server_policy::Cidr>,
    /// The transport of the tunnels: auto (QUIC, falling back to TLS over TCP when UDP does not
    /// get through, and back to QUIC when it does), quic, or tcp.
    #[arg(long, env = "TETHER_TRANSPORT", default_value_t = defaults().transport)]
    transport: tether_link::reconnect::TransportChoice,
    /// An HTTP proxy for TLS over TCP and the join, http://[user:password@]host:port (sites
    /// that reach the outside only through one; QUIC is still tried directly first). Unset, the
    /// standard HTTPS_PROXY and NO_PROXY are read; empty, no proxy at all.
    #[arg(long, env = "TETHER_PROXY")]
    proxy: Option<String>,
    /// How a new connection picks among healthy servers: least-streams or ordered.
    #[arg(long, env = "TETHER_POLICY", default_value_t = defaults().policy)]
    policy: tether_link::pool::Policy,
    /// How long open streams may take to finish after SIGTERM.
    #[arg(long, env = "TETHER_DRAIN_TIMEOUT", default_value = format_duration(defaults().drain_timeout), value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Most local connections carried at once; more are reset.
    #[arg(long, env = "TETHER_MAX_CONNECTIONS", default_value_t = defaults().max_connections)]
    max_connections: usize,
    /// Runtime threads: 1 (the default) runs everything on one thread, which is the fastest
    /// for a node's traffic; 0 is one per CPU.
    #[arg(long, env = "TETHER_THREADS", default_value_t = 1)]
    threads: usize,
}

/// The library's defaults, which the flags show and take: written once, in
/// [`AgentConfig::new`].
fn defaults() -> AgentConfig {
    AgentConfig::new(Vec::new(), PathBuf::new())
}

fn main() -> Result<()> {
    let cli: Cli = tether_process::cli::parse();
    cli.log.init("info");
    match cli.command {
        Command::Run(a) => tether_process::runtime::build(a.threads)
            .context("cannot start the async runtime")?
            .block_on(run(*a)),
        Command::Diagnose(d) => {
            let code = tether_process::runtime::build(d.run.threads)
                .context("cannot start the async runtime")?
                .block_on(diagnose(*d));
            std::process::exit(code)
        }
        Command::Tools(t) => Ok(tether_process::cli::run_tool::<Cli>(t)?),
    }
}

/// Runs `diagnose`, prints its report, and returns the exit status.
async fn diagnose(d: DiagnoseArgs) -> i32 {
    use tether_process::diagnose::{Check, Report};
    let report = match settings(d.run) {
        Ok(config) => tether_agent::diagnose::diagnose(&config).await,
        Err(e) => Report {
            checks: vec![Check::fail(
                "settings",
                format!("{e:#}"),
                "fix the setting named (`tether-agent config example` lists them all)",
            )],
        },
    };
    report.print(&d.output)
}

async fn run(a: RunArgs) -> Result<()> {
    match tether_endpoint::net::raise_fd_limit() {
        Ok(n) => tracing::debug!(limit = n, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
    let config = settings(a)?;
    let drain_timeout = config.drain_timeout;
    let agent = tether_agent::start(config)
        .await
        .context("tether-agent cannot start")?;
    // Ready for systemd once a first tunnel is up, or after a while without one: kubelet
    // retries by itself, and a node must boot even with its control plane out of reach.
    let term = tether_process::shutdown::terminate_signal();
    tokio::pin!(term);
    let first_tunnel =
        tether_process::shutdown::wait_while(Duration::from_secs(10), || agent.tunnels_up() == 0);
    tokio::select! {
        _ = first_tunnel => {}
        s = &mut term => {
            let s = s.context("cannot watch for SIGTERM and SIGINT")?;
            tracing::info!(signal = s, "stopping before the first tunnel");
            agent.drain(Duration::ZERO).await;
            return Ok(());
        }
    }
    tether_process::notify::ready(&format!("{} tunnel(s) up", agent.tunnels_up()));
    let sig = term.await.context("cannot watch for SIGTERM and SIGINT")?;
    tracing::info!(signal = sig, "draining, then exiting");
    tether_process::notify::stopping("draining");
    let left = agent.drain(drain_timeout).await;
    if left > 0 {
        tracing::warn!(
            streams = left,
            "drain timeout: closed streams that were still open"
        );
    }
    Ok(())
}

/// The agent's settings from its flags (and settings file and variables): the same for `run`
/// and `diagnose`.
fn settings(a: RunArgs) -> Result<AgentConfig> {
    let mut config = AgentConfig::new(a.servers, a.data_dir);
    if let Some(ca) = a.ca {
        config.ca = ca;
    }
    if let Some(cert) = a.cert {
        config.cert = cert;
    }
    if let Some(key) = a.key {
        config.key = key;
    }
    config.listen = a.listen;
    config.forwards = a.forwards;
    config.admin = a.admin;
    config.early_data = a.early_data.into_iter().filter(|s| s != "none").collect();
    config.stream_open_timeout = a.stream_open_timeout;
    config.last_attempt_timeout = a.last_attempt_timeout;
    config.reconnect_grace = a.reconnect_grace;
    config.handshake_timeout = a.handshake_timeout;
    config.liveness.keepalive_interval = a.keepalive_interval;
    config.liveness.idle_timeout = a.idle_timeout;
    config.liveness.blackout_tolerance = a.blackout_tolerance;
    config.reconnect_max = a.reconnect_max;
    config.limits.congestion = a.congestion;
    config.limits.post_quantum = a.post_quantum;
    config.max_connections = a.max_connections;
    config.policy = a.policy;
    config.token = match (&a.token, &a.token_file) {
        (_, Some(path)) => Some(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read the token file {}", path.display()))?
                .lines()
                .next()
                .unwrap_or("")
                .trim()
                .to_string(),
        ),
        (token, None) => token.clone(),
    };
    if a.token.is_some() && std::env::var_os("TETHER_TOKEN").is_none() {
        tracing::warn!("--token puts the join token on the command line, where any local user can read it; use --token-file or TETHER_TOKEN");
    }
    config.transport = a.transport;
    config.proxy =
        tether_link::proxy::Proxy::from_settings(a.proxy.as_deref(), |k| std::env::var(k).ok())?;
    config.node_ips = a.node_ips;
    config.allow = a.allow;
    config.allow_ports = a.allow_ports;
    config.allow_server_networks = a.allow_server_networks;
    config.node_name = a.node_name;
    config.drain_timeout = a.drain_timeout;
    Ok(config)
}
