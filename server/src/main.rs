//! The `tether-server` command: certificates, running a server, and the demo.

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tether_common::units::parse_duration;
use tether_server::config::ServerConfig;

#[derive(Parser)]
#[command(
    name = "tether-server",
    version,
    about = "tether's control-plane side: accepts agent tunnels and relays them to the kube-apiserver"
)]
struct Cli {
    /// Log level (error, warn, info, debug, trace) or a filter; RUST_LOG wins when set.
    /// Default: info (warn for the demo, whose own output tells the story).
    #[arg(long, env = "TETHER_LOG_LEVEL", global = true)]
    log_level: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the CA (unless DIR already has one) and this server's certificate.
    Init(InitArgs),
    /// Issue an agent certificate for one node.
    IssueAgent(IssueAgentArgs),
    /// Run the server.
    Run(Box<RunArgs>),
    /// Run a self-contained demo: two servers, an agent, traffic, and a failover.
    Demo,
}

#[derive(Args)]
struct InitArgs {
    /// Data directory for ca.crt, ca.key, server.crt and server.key.
    #[arg(long, env = "TETHER_DATA_DIR")]
    data_dir: PathBuf,
    /// Extra name or IP address for the server certificate (repeatable).
    #[arg(long = "san", env = "TETHER_SAN", value_delimiter = ',')]
    sans: Vec<String>,
    /// Lifetime of a new CA, in days.
    #[arg(long, env = "TETHER_CA_DAYS", default_value_t = tether_certs::CA_DAYS)]
    ca_days: u32,
    /// Lifetime of the server certificate, in days.
    #[arg(long, env = "TETHER_DAYS", default_value_t = tether_certs::LEAF_DAYS)]
    days: u32,
}

#[derive(Args)]
struct IssueAgentArgs {
    /// Data directory holding the CA (ca.crt and ca.key).
    #[arg(long, env = "TETHER_DATA_DIR")]
    data_dir: PathBuf,
    /// The node's name; it becomes the certificate's common name.
    #[arg(long, env = "TETHER_NODE_NAME")]
    node_name: String,
    /// Where to write ca.crt, agent.crt and agent.key.
    #[arg(long, env = "TETHER_OUT_DIR")]
    out_dir: PathBuf,
    /// Lifetime of the certificate, in days.
    #[arg(long, env = "TETHER_DAYS", default_value_t = tether_certs::LEAF_DAYS)]
    days: u32,
}

#[derive(Args)]
struct RunArgs {
    /// Data directory holding ca.crt, server.crt and server.key.
    #[arg(long, env = "TETHER_DATA_DIR")]
    data_dir: PathBuf,
    /// UDP address for QUIC tunnels.
    #[arg(long, env = "TETHER_LISTEN", default_value = "0.0.0.0:9443")]
    listen: SocketAddr,
    /// The kube-apiserver to relay to (host:port).
    #[arg(long, env = "TETHER_UPSTREAM", default_value = "127.0.0.1:6443")]
    upstream: String,
    /// Admin endpoint (/healthz, /readyz, /metrics); off when unset.
    #[arg(long, env = "TETHER_ADMIN")]
    admin: Option<SocketAddr>,
    /// Another tether-server, host:port (repeatable; a DNS name counts for all its addresses).
    #[arg(long = "peer", env = "TETHER_PEER", value_delimiter = ',')]
    peers: Vec<String>,
    /// The address agents and peers dial for this server, as announced to them (default: the
    /// listen address, or the host's first address with the listen port).
    #[arg(long, env = "TETHER_ADVERTISE")]
    advertise: Option<String>,
    /// CA of the apiserver's certificate: check the upstream with HTTPS GET /readyz.
    #[arg(long, env = "TETHER_UPSTREAM_CA")]
    upstream_ca: Option<PathBuf>,
    /// How long open streams may take to finish after SIGTERM.
    #[arg(long, env = "TETHER_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Longest wait for a connection to the upstream.
    #[arg(long, env = "TETHER_CONNECT_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Longest a TLS handshake may take.
    #[arg(long, env = "TETHER_HANDSHAKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// Longest a new stream may take to send its header.
    #[arg(long, env = "TETHER_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    header_timeout: Duration,
    /// Interval of keepalive packets on idle tunnels.
    #[arg(long, env = "TETHER_KEEPALIVE_INTERVAL", default_value = "500ms", value_parser = parse_duration)]
    keepalive_interval: Duration,
    /// A tunnel that hears nothing for this long is closed.
    #[arg(long, env = "TETHER_IDLE_TIMEOUT", default_value = "2500ms", value_parser = parse_duration)]
    idle_timeout: Duration,
    /// Most concurrent streams per tunnel.
    #[arg(long, env = "TETHER_MAX_STREAMS_PER_TUNNEL", default_value_t = 4096)]
    max_streams_per_tunnel: u32,
    /// Most streams relayed at once by this server; more are answered busy.
    #[arg(long, env = "TETHER_MAX_STREAMS", default_value_t = 65536)]
    max_streams: usize,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let default_level = match cli.command {
        Command::Demo => "warn",
        _ => "info",
    };
    tether_common::telemetry::init_logging(cli.log_level.as_deref().unwrap_or(default_level));
    match cli.command {
        Command::Init(a) => init(a),
        Command::IssueAgent(a) => issue_agent(a),
        Command::Run(a) => runtime()?.block_on(run(*a)),
        Command::Demo => runtime()?.block_on(tether_server::demo::run()),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn init(a: InitArgs) -> Result<()> {
    let report = tether_certs::init(&a.data_dir, &a.sans, a.ca_days, a.days)
        .with_context(|| format!("cannot initialise {}", a.data_dir.display()))?;
    let dir = a.data_dir.display();
    if report.created_ca {
        println!("created a new CA: {dir}/ca.crt and {dir}/ca.key (keep ca.key secret)");
    } else {
        println!("kept the existing CA in {dir} (this server joins that CA)");
    }
    println!("issued {dir}/server.crt for: {}", report.names.join(", "));
    println!("next: tether-server issue-agent --data-dir {dir} --node-name NODE --out-dir OUT, then tether-server run --data-dir {dir}");
    Ok(())
}

fn issue_agent(a: IssueAgentArgs) -> Result<()> {
    tether_certs::issue_agent_files(&a.data_dir, &a.node_name, &a.out_dir, a.days)
        .with_context(|| format!("cannot issue a certificate for node {:?}", a.node_name))?;
    let out = a.out_dir.display();
    println!(
        "issued {out}/agent.crt for node {:?} (with {out}/ca.crt and {out}/agent.key)",
        a.node_name
    );
    println!("next: copy {out} to the node and run tether-agent run --data-dir {out} --server SERVER:9443");
    Ok(())
}

async fn run(a: RunArgs) -> Result<()> {
    let mut config = ServerConfig::new(a.data_dir);
    config.listen = a.listen;
    config.upstream = a.upstream;
    config.admin = a.admin;
    config.connect_timeout = a.connect_timeout;
    config.handshake_timeout = a.handshake_timeout;
    config.header_timeout = a.header_timeout;
    config.liveness.keepalive_interval = a.keepalive_interval;
    config.liveness.idle_timeout = a.idle_timeout;
    config.limits.max_streams = a.max_streams_per_tunnel;
    config.max_streams = a.max_streams;
    config.peers = a.peers;
    config.advertise = a.advertise;
    config.upstream_ca = a.upstream_ca;
    config.drain_timeout = a.drain_timeout;
    let drain_timeout = config.drain_timeout;
    let server = tether_server::start(config)
        .await
        .context("tether-server cannot start")?;
    let sig = tether_common::shutdown::terminate_signal()
        .await
        .context("cannot watch for SIGTERM and SIGINT")?;
    tracing::info!(signal = sig, "draining, then exiting");
    let left = server.drain(drain_timeout).await;
    if left > 0 {
        tracing::warn!(
            streams = left,
            "drain timeout: closed streams that were still open"
        );
    }
    Ok(())
}
