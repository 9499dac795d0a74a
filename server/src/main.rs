//! The `tether-server` command: certificates, running a server, and the demo.

mod ca_command;
mod demo;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tether_process::units::{format_duration, parse_duration};
use tether_server::config::ServerConfig;
use tether_server::datastore::etcd::{Etcd, EtcdSettings};
use tether_server::datastore::{Datastore, Kind};

#[derive(Parser)]
#[command(
    name = "tether-server",
    version,
    about = "tether's control-plane side: accepts agent tunnels and relays them to the kube-apiserver"
)]
struct Cli {
    #[command(flatten)]
    log: tether_process::telemetry::LogArgs,
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
    /// Check, with the settings of `run`, what stands between this master and its job:
    /// certificates, the datastore, the upstream, the listener, the peers, the egress proxy,
    /// the running server. Exit status 0: all ok; 1: a warning; 2: a failure.
    Diagnose(Box<DiagnoseArgs>),
    #[command(flatten)]
    Tools(tether_process::cli::Tools),
    /// Run a self-contained demo: two servers, an agent, traffic, and a failover.
    Demo,
    /// Manage join tokens.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Manage nodes: revoke a node, or forget a name so that a new key may join under it.
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Move records and tokens between a data directory and etcd.
    #[command(subcommand)]
    Datastore(DatastoreCommand),
    /// Replace the cluster's CA without re-joining a node: rotate, watch, finish.
    #[command(subcommand)]
    Ca(ca_command::CaCommand),
}

#[derive(Subcommand)]
enum DatastoreCommand {
    /// Copy a data directory's node records and join tokens into etcd (safe to run again:
    /// records merge by their own order, tokens already there are kept).
    Import {
        #[arg(long, env = "TETHER_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
    /// Write etcd's node records and join tokens into a data directory (merging with what it
    /// holds), for a move back to `--datastore dir` or a backup.
    Export {
        #[arg(long, env = "TETHER_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        etcd: EtcdArgs,
    },
}

/// Where records, tokens and membership live: the `--datastore` and `--etcd-*` settings, the
/// same for `run` and for the commands that change records and tokens.
#[derive(Args, Clone)]
struct StoreArgs {
    /// Where node records, join tokens and server membership live: dir (the data directory;
    /// servers exchange records with their --peer links) or etcd (the control plane's etcd;
    /// servers find each other there).
    #[arg(long, env = "TETHER_DATASTORE", value_enum, default_value = defaults().datastore.name())]
    datastore: Kind,
    #[command(flatten)]
    etcd: EtcdArgs,
}

#[derive(Args, Clone)]
struct EtcdArgs {
    /// An etcd client URL, https://HOST:PORT (repeatable, or comma-separated).
    #[arg(
        long = "etcd-endpoints",
        env = "TETHER_ETCD_ENDPOINTS",
        value_delimiter = ','
    )]
    etcd_endpoints: Vec<String>,
    /// CA of etcd's server certificates (kubeadm: /etc/kubernetes/pki/etcd/ca.crt).
    #[arg(long, env = "TETHER_ETCD_CA")]
    etcd_ca: Option<PathBuf>,
    /// Client certificate for etcd (kubeadm: /etc/kubernetes/pki/apiserver-etcd-client.crt).
    #[arg(long, env = "TETHER_ETCD_CERT", requires = "etcd_key")]
    etcd_cert: Option<PathBuf>,
    /// The key of --etcd-cert (kubeadm: /etc/kubernetes/pki/apiserver-etcd-client.key).
    #[arg(long, env = "TETHER_ETCD_KEY", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// Prefix of every key tether keeps in etcd.
    #[arg(long, env = "TETHER_ETCD_PREFIX", default_value = defaults().etcd.prefix)]
    etcd_prefix: String,
}

impl EtcdArgs {
    fn settings(&self) -> EtcdSettings {
        EtcdSettings {
            endpoints: self.etcd_endpoints.clone(),
            ca: self.etcd_ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
            prefix: self.etcd_prefix.clone(),
        }
    }

    fn open(&self) -> Result<Datastore> {
        let etcd = Etcd::new(&self.settings()).context("cannot use the etcd settings")?;
        Ok(Datastore::Etcd(std::sync::Arc::new(etcd)))
    }
}

impl StoreArgs {
    /// The store the commands change: the data directory, or etcd.
    fn open(&self, data_dir: &std::path::Path) -> Result<Datastore> {
        match self.datastore {
            Kind::Dir => Ok(Datastore::Dir(data_dir.to_path_buf())),
            Kind::Etcd => self.etcd.open(),
        }
    }

    fn describe(&self, data_dir: &std::path::Path) -> String {
        match self.datastore {
            Kind::Dir => data_dir.display().to_string(),
            Kind::Etcd => format!("etcd ({})", self.etcd.etcd_endpoints.join(", ")),
        }
    }
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Create a join token and print it.
    Create {
        #[arg(long, env = "TETHER_DATA_DIR")]
        data_dir: PathBuf,
        /// How long the token is valid (e.g. 24h, 7d); default: until revoked.
        #[arg(long, value_parser = parse_duration)]
        ttl: Option<Duration>,
        /// A note to tell tokens apart in `token list`.
        #[arg(long, default_value = "")]
        description: String,
        /// How many joins it is good for; 0 (the default) for any number, until it expires or
        /// is revoked.
        #[arg(long, default_value_t = 0)]
        uses: u32,
        /// An IP address the node that joins with it owns from the start (repeatable), so that
        /// no other node can claim it first. Best with --uses 1.
        #[arg(long = "address", value_delimiter = ',')]
        addresses: Vec<std::net::IpAddr>,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// List the tokens (ids, expiry, description; never secrets).
    List {
        #[arg(long, env = "TETHER_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Revoke a token by its id: no new node can join with it.
    Revoke {
        id: String,
        #[arg(long, env = "TETHER_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Revoke a node: its tunnels close within seconds and it is refused from then on, on every
    /// server (peers pass the revocation on).
    Revoke {
        name: String,
        #[arg(long, env = "TETHER_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Forget a node name: the next join under it may use a new key (a reinstalled node). Also
    /// lifts a revocation, for a new join only: no certificate made before the forget is good.
    /// The addresses the node owned are free again.
    Forget {
        name: String,
        #[arg(long, env = "TETHER_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Lift a node's ownership of an IP address: the next node to claim it owns it (a node
    /// moved to another address, or two nodes claimed one at once).
    ReleaseAddress {
        address: std::net::IpAddr,
        #[arg(long, env = "TETHER_DATA_DIR")]
        data_dir: PathBuf,
        #[command(flatten)]
        store: StoreArgs,
    },
}

#[derive(Args)]
struct InitArgs {
    /// Data directory for ca.crt, ca.key, server.crt and server.key.
    #[arg(long, env = "TETHER_DATA_DIR")]
    data_dir: PathBuf,
    /// Name or IP address agents dial this server at, for its certificate (repeatable; the
    /// host name is always in). Agents check that the certificate names the address they
    /// dialed, so give every address and name they use; loopback (`localhost,127.0.0.1,::1`)
    /// only when agents dial it there.
    #[arg(long = "san", env = "TETHER_SAN", value_delimiter = ',')]
    sans: Vec<String>,
    /// Lifetime of a new CA, in days.
    #[arg(long, env = "TETHER_CA_DAYS", default_value_t = tether_trust::CA_DAYS)]
    ca_days: u32,
    /// Lifetime of the server certificate, in days.
    #[arg(long, env = "TETHER_DAYS", default_value_t = tether_trust::LEAF_DAYS)]
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
    #[arg(long, env = "TETHER_DAYS", default_value_t = tether_trust::LEAF_DAYS)]
    days: u32,
    /// An IP address of the node, owned by it from now on (repeatable): the egress proxy
    /// sends a CONNECT to it to this node alone, so no other node can claim it first.
    #[arg(long = "address", value_delimiter = ',')]
    addresses: Vec<std::net::IpAddr>,
    /// With --datastore etcd, the new key's ownership of the name is recorded in etcd too.
    #[command(flatten)]
    store: StoreArgs,
}

#[derive(Args)]
struct RunArgs {
    /// Settings file (TOML; `config example` prints one). Flags and TETHER_* variables win
    /// over it.
    #[arg(long, env = "TETHER_CONFIG")]
    config: Option<PathBuf>,
    /// Data directory holding ca.crt, server.crt and server.key.
    #[arg(long, env = "TETHER_DATA_DIR")]
    data_dir: PathBuf,
    #[command(flatten)]
    store: StoreArgs,
    /// Address for tunnels: QUIC on its UDP port, TLS over TCP on the same TCP port.
    #[arg(long, env = "TETHER_LISTEN", default_value_t = defaults().listen)]
    listen: SocketAddr,
    /// The kube-apiserver to relay to (host:port).
    #[arg(long, env = "TETHER_UPSTREAM", default_value = defaults().upstream)]
    upstream: String,
    /// Runtime threads: 0 (the default) is one per CPU; 1 runs everything on one thread.
    #[arg(long, env = "TETHER_THREADS", default_value_t = 0)]
    threads: usize,
    /// Another upstream agents may reach by name, NAME=HOST:PORT (repeatable); agents ask for
    /// it with `--forward LISTEN=NAME`. Only named services are relayed.
    #[arg(long = "service", env = "TETHER_SERVICE", value_delimiter = ',', value_parser = tether_server::config::parse_service)]
    services: Vec<(String, String)>,
    /// Admin endpoint (/healthz, /readyz, /metrics); off when unset.
    #[arg(long, env = "TETHER_ADMIN")]
    admin: Option<SocketAddr>,
    /// Serve the egress proxy (HTTP CONNECT, for kube-apiserver's EgressSelectorConfiguration)
    /// on this TCP address; given without a value: 127.0.0.1:8131.
    #[arg(long, env = "TETHER_EGRESS_LISTEN", num_args = 0..=1, default_missing_value = "127.0.0.1:8131")]
    egress_listen: Option<SocketAddr>,
    /// Serve the egress proxy on this Unix socket too.
    #[arg(long, env = "TETHER_EGRESS_UDS")]
    egress_uds: Option<PathBuf>,
    /// Serve the egress proxy over TLS with this certificate (with --egress-tls-key).
    #[arg(long, env = "TETHER_EGRESS_TLS_CERT", requires = "egress_tls_key")]
    egress_tls_cert: Option<PathBuf>,
    #[arg(long, env = "TETHER_EGRESS_TLS_KEY", requires = "egress_tls_cert")]
    egress_tls_key: Option<PathBuf>,
    /// Require egress clients to present a certificate signed by this CA (with TLS).
    #[arg(long, env = "TETHER_EGRESS_CLIENT_CA", requires = "egress_tls_cert")]
    egress_client_ca: Option<PathBuf>,
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
    #[arg(long, env = "TETHER_DRAIN_TIMEOUT", default_value = format_duration(defaults().drain_timeout), value_parser = parse_duration)]
    drain_timeout: Duration,
    /// Longest wait for a connection to the upstream.
    #[arg(long, env = "TETHER_CONNECT_TIMEOUT", default_value = format_duration(defaults().connect_timeout), value_parser = parse_duration)]
    connect_timeout: Duration,
    /// Longest a TLS handshake may take.
    #[arg(long, env = "TETHER_HANDSHAKE_TIMEOUT", default_value = format_duration(defaults().handshake_timeout), value_parser = parse_duration)]
    handshake_timeout: Duration,
    /// Longest a new stream may take to send its header.
    #[arg(long, env = "TETHER_HEADER_TIMEOUT", default_value = format_duration(defaults().header_timeout), value_parser = parse_duration)]
    header_timeout: Duration,
    /// QUIC congestion controller of this end's sending: bbr (holds its rate through random
    /// loss, keeps queues short), cubic or newreno (back off at every loss).
    #[arg(long, env = "TETHER_CONGESTION", default_value_t = tether_transport::tls::Congestion::default())]
    congestion: tether_transport::tls::Congestion,
    /// The key exchange of tunnels and joins: prefer (X25519MLKEM768, the post-quantum hybrid,
    /// first; X25519 for peers without it, such as 0.2) or require (the hybrid only: a peer
    /// without it fails the handshake).
    #[arg(long, env = "TETHER_POST_QUANTUM", default_value_t = tether_transport::tls::PostQuantum::default())]
    post_quantum: tether_transport::tls::PostQuantum,
    /// Interval of keepalive packets on links to peer servers, and of heartbeats to agents older
    /// than 0.3 over TCP.
    #[arg(long, env = "TETHER_KEEPALIVE_INTERVAL", default_value = format_duration(defaults().liveness.keepalive_interval), value_parser = parse_duration)]
    keepalive_interval: Duration,
    /// A peer server silent for this long is lost (and reported to the agents); also the
    /// silence older agents' tunnels are closed after.
    #[arg(long, env = "TETHER_IDLE_TIMEOUT", default_value = format_duration(defaults().liveness.idle_timeout), value_parser = parse_duration)]
    idle_timeout: Duration,
    /// How long a tunnel between agent and server is held, with its streams, while its link is
    /// silent (a blackout: a cellular handover, a roaming node). Longer blackouts close it.
    #[arg(long, env = "TETHER_BLACKOUT_TOLERANCE", default_value = format_duration(defaults().liveness.blackout_tolerance), value_parser = parse_duration)]
    blackout_tolerance: Duration,
    /// Most concurrent streams per tunnel.
    #[arg(long, env = "TETHER_MAX_STREAMS_PER_TUNNEL", default_value_t = defaults().limits.max_streams)]
    max_streams_per_tunnel: u32,
    /// Most tunnels one node identity may hold at once.
    #[arg(long, env = "TETHER_MAX_TUNNELS_PER_NODE", default_value_t = defaults().max_tunnels_per_node)]
    max_tunnels_per_node: usize,
    /// Join attempts allowed per source address per minute.
    #[arg(long, env = "TETHER_JOIN_RATE_LIMIT", default_value_t = defaults().join_rate_per_minute)]
    join_rate_limit: u32,
    /// Most node records in the cluster: a join of a new name past it is refused.
    #[arg(long, env = "TETHER_MAX_NODES", default_value_t = defaults().max_nodes)]
    max_nodes: usize,
    /// Lifetime of certificates signed for joining and renewing agents.
    #[arg(long, env = "TETHER_AGENT_CERT_LIFETIME", default_value = format_duration(defaults().agent_cert_lifetime), value_parser = parse_duration)]
    agent_cert_lifetime: Duration,
    /// Most streams relayed at once by this server; more are answered busy.
    #[arg(long, env = "TETHER_MAX_STREAMS", default_value_t = defaults().max_streams)]
    max_streams: usize,
    /// Most streams one node may have open at once over all its tunnels, so that no node takes
    /// more than its share of --max-streams.
    #[arg(long, env = "TETHER_MAX_STREAMS_PER_NODE", default_value_t = defaults().max_streams_per_node)]
    max_streams_per_node: usize,
}

/// The library's defaults, which the flags show and take: written once, in
/// [`ServerConfig::new`].
fn defaults() -> ServerConfig {
    ServerConfig::new(PathBuf::new())
}

fn main() -> Result<()> {
    let cli: Cli = tether_process::cli::parse();
    let default_level = match cli.command {
        Command::Demo => "warn",
        _ => "info",
    };
    cli.log.init(default_level);
    match cli.command {
        Command::Init(a) => init(a),
        Command::IssueAgent(a) => runtime(1)?.block_on(issue_agent(a)),
        Command::Run(a) => runtime(a.threads)?.block_on(run(*a)),
        Command::Diagnose(d) => {
            let code = runtime(1)?.block_on(diagnose(*d));
            std::process::exit(code)
        }
        Command::Demo => runtime(0)?.block_on(demo::run()),
        Command::Token(t) => runtime(1)?.block_on(token(t)),
        Command::Agent(a) => runtime(1)?.block_on(agent(a)),
        Command::Datastore(d) => runtime(1)?.block_on(datastore(d)),
        Command::Ca(c) => runtime(1)?.block_on(ca_command::run(c)),
        Command::Tools(t) => Ok(tether_process::cli::run_tool::<Cli>(t)?),
    }
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    tether_process::runtime::build(threads).context("cannot start the async runtime")
}

fn init(a: InitArgs) -> Result<()> {
    let report = tether_trust::init(&a.data_dir, &a.sans, a.ca_days, a.days)
        .with_context(|| format!("cannot initialise {}", a.data_dir.display()))?;
    let dir = a.data_dir.display();
    if report.created_ca {
        println!("created a new CA: {dir}/ca.crt and {dir}/ca.key (keep ca.key secret)");
    } else {
        println!("kept the existing CA in {dir} (this server joins that CA)");
    }
    println!("issued {dir}/server.crt for: {}", report.names.join(", "));
    println!("next: tether-server run --data-dir {dir}; on each node, with the token in a file only root reads: tether-agent run --server THIS_HOST:9443 --data-dir /var/lib/tether-agent --token-file /etc/tether/token");
    println!("join token (also in {dir}/token; it expires in 24 hours and joins any number of nodes; `token create` makes more):");
    println!("{}", report.token);
    Ok(())
}

async fn token(t: TokenCommand) -> Result<()> {
    match t {
        TokenCommand::Create {
            data_dir,
            ttl,
            description,
            uses,
            addresses,
            store,
        } => {
            let secs = ttl.map(|d| d.as_secs().max(1)).unwrap_or(0);
            let grant = tether_trust::token::TokenGrant { uses, addresses };
            let tok = store
                .open(&data_dir)?
                .create_token(&data_dir, secs, &description, &grant)
                .await
                .with_context(|| {
                    format!("cannot create a token in {}", store.describe(&data_dir))
                })?;
            println!("{tok}");
            let expiry = match ttl {
                Some(d) => format!("expires in {}", human(d.as_secs() as i64)),
                None => "never expires (until `token revoke`)".into(),
            };
            let joins = match uses {
                0 => "joins any number of nodes".to_string(),
                n => format!("joins {n} node(s)"),
            };
            eprintln!("this token {expiry} and {joins}; keep it secret, and pass it to agents with --token-file");
        }
        TokenCommand::List { data_dir, store } => {
            let entries = store.open(&data_dir)?.tokens().await.with_context(|| {
                format!("cannot read the tokens of {}", store.describe(&data_dir))
            })?;
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or(0);
            println!("{:<8} {:<22} DESCRIPTION", "ID", "EXPIRES");
            for e in entries {
                let expires = if e.expires == 0 {
                    "never".to_string()
                } else if e.expired(now) {
                    "expired".to_string()
                } else {
                    format!("in {}", human(e.expires - now))
                };
                println!("{:<8} {:<22} {}", e.id, expires, e.description);
            }
        }
        TokenCommand::Revoke {
            id,
            data_dir,
            store,
        } => {
            let where_ = store.describe(&data_dir);
            if store
                .open(&data_dir)?
                .revoke_token(&id)
                .await
                .with_context(|| format!("cannot revoke the token in {where_}"))?
            {
                println!("revoked token {id}: no new node can join with it");
            } else {
                anyhow::bail!(
                    "no token with id {id:?} in {where_} (see `tether-server token list`)"
                );
            }
        }
    }
    Ok(())
}

async fn datastore(d: DatastoreCommand) -> Result<()> {
    let (import, data_dir, etcd) = match d {
        DatastoreCommand::Import { data_dir, etcd } => (true, data_dir, etcd),
        DatastoreCommand::Export { data_dir, etcd } => (false, data_dir, etcd),
    };
    let store = etcd.open()?;
    let dir = data_dir.display();
    if import {
        let (records, tokens) = store
            .import(&data_dir)
            .await
            .with_context(|| format!("cannot import {dir} into etcd"))?;
        println!("imported {dir} into etcd: {records} node records and {tokens} tokens written (the rest were there already)");
    } else {
        let (records, tokens) = store
            .export(&data_dir)
            .await
            .with_context(|| format!("cannot export etcd into {dir}"))?;
        println!(
            "exported etcd into {dir}: it now holds {records} node records and {tokens} tokens"
        );
    }
    Ok(())
}

fn human(secs: i64) -> String {
    match secs {
        s if s >= 86400 => format!("{}d {}h", s / 86400, (s % 86400) / 3600),
        s if s >= 3600 => format!("{}h {}m", s / 3600, (s % 3600) / 60),
        s => format!("{}m {}s", s / 60, s % 60),
    }
}

async fn agent(a: AgentCommand) -> Result<()> {
    use tether_trust::records::NodeState;
    let (name, dir, store, state, what) = match a {
        AgentCommand::ReleaseAddress {
            address,
            data_dir,
            store,
        } => {
            let owners = store
                .open(&data_dir)?
                .release_address(address)
                .await
                .with_context(|| {
                    format!(
                        "cannot update the node records in {}",
                        store.describe(&data_dir)
                    )
                })?;
            if owners.is_empty() {
                println!("address {address} was owned by no node");
            } else {
                println!(
                    "address {address} released (it was owned by {}): the next node to claim it owns it",
                    owners.join(", ")
                );
            }
            return Ok(());
        }
        AgentCommand::Revoke {
            name,
            data_dir,
            store,
        } => (
            name,
            data_dir,
            store,
            NodeState::Revoked,
            "revoked: its tunnels close within seconds, on every server",
        ),
        AgentCommand::Forget {
            name,
            data_dir,
            store,
        } => (
            name,
            data_dir,
            store,
            NodeState::Forgotten,
            "forgotten: the next join under this name may use a new key",
        ),
    };
    tether_trust::validate_node_name(&name)?;
    store
        .open(&dir)?
        .set_state(&name, state)
        .await
        .with_context(|| format!("cannot update the node records in {}", store.describe(&dir)))?;
    println!("node {name:?} {what}");
    Ok(())
}

async fn issue_agent(a: IssueAgentArgs) -> Result<()> {
    tether_trust::validate_node_name(&a.node_name)?;
    // With etcd, the store must answer before a certificate exists that it does not know of.
    let store = a.store.open(&a.data_dir)?;
    if let Datastore::Etcd(_) = &store {
        store
            .tokens()
            .await
            .with_context(|| format!("cannot reach {}", a.store.describe(&a.data_dir)))?;
    }
    tether_trust::issue_agent_files(&a.data_dir, &a.node_name, &a.out_dir, a.days)
        .with_context(|| format!("cannot issue a certificate for node {:?}", a.node_name))?;
    let out = a.out_dir.display();
    if let Datastore::Etcd(_) = &store {
        let cert = std::fs::read_to_string(a.out_dir.join(tether_trust::files::AGENT_CERT))
            .with_context(|| format!("cannot read {out}/agent.crt"))?;
        let key = tether_trust::key_hash_of_cert_pem(&cert)?;
        store
            .set_state(&a.node_name, tether_trust::records::NodeState::Owned(key))
            .await
            .with_context(|| {
                format!(
                    "issued {out}/agent.crt but cannot record its owner in {}; run issue-agent again",
                    a.store.describe(&a.data_dir)
                )
            })?;
    }
    if !a.addresses.is_empty() {
        let claim = store
            .pin_addresses(&a.node_name, &a.addresses)
            .await
            .with_context(|| {
                format!(
                    "issued {out}/agent.crt but cannot record its addresses in {}; run issue-agent again",
                    a.store.describe(&a.data_dir)
                )
            })?;
        if !claim.refused.is_empty() {
            let list: Vec<String> = claim
                .refused
                .iter()
                .map(|(a, owner)| match owner {
                    Some(o) => format!("{a} (owned by {o})"),
                    None => format!("{a} (more than a node may own)"),
                })
                .collect();
            anyhow::bail!(
                "issued {out}/agent.crt, but these addresses are not the node's: {}; release them (`tether-server agent release-address`) and run issue-agent again",
                list.join(", ")
            );
        }
    }
    println!(
        "issued {out}/agent.crt for node {:?} (with {out}/ca.crt and {out}/agent.key)",
        a.node_name
    );
    println!("next: copy {out} to the node and run tether-agent run --data-dir {out} --server SERVER:9443");
    Ok(())
}

async fn run(a: RunArgs) -> Result<()> {
    match tether_endpoint::net::raise_fd_limit() {
        Ok(n) => tracing::debug!(limit = n, "open file limit"),
        Err(e) => tracing::warn!(error = %e, "cannot raise the open file limit"),
    }
    let config = settings(a);
    let drain_timeout = config.drain_timeout;
    let server = tether_server::start(config)
        .await
        .context("tether-server cannot start")?;
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot watch for SIGHUP")?;
    let term = tether_process::shutdown::terminate_signal();
    tokio::pin!(term);
    tether_process::notify::ready(&format!("serving on {}", server.local_addr));
    let sig = loop {
        tokio::select! {
            s = &mut term => break s.context("cannot watch for SIGTERM and SIGINT")?,
            _ = hup.recv() => {
                tether_process::notify::notify("RELOADING=1");
                if let Err(e) = server.reload_certificates() {
                    tracing::error!(error = %e, "SIGHUP: cannot reload the certificate; keeping the old one");
                }
                tether_process::notify::notify("READY=1");
            }
        }
    };
    tracing::info!(signal = sig, "draining, then exiting");
    tether_process::notify::stopping("draining");
    let left = server.drain(drain_timeout).await;
    if left > 0 {
        tracing::warn!(
            streams = left,
            "drain timeout: closed streams that were still open"
        );
    }
    Ok(())
}

/// The server's settings from its flags (and settings file and variables): the same for `run`
/// and `diagnose`.
fn settings(a: RunArgs) -> ServerConfig {
    let mut config = ServerConfig::new(a.data_dir);
    config.datastore = a.store.datastore;
    config.etcd = a.store.etcd.settings();
    config.listen = a.listen;
    config.upstream = a.upstream;
    config.services = a.services;
    config.admin = a.admin;
    config.connect_timeout = a.connect_timeout;
    config.handshake_timeout = a.handshake_timeout;
    config.header_timeout = a.header_timeout;
    config.liveness.keepalive_interval = a.keepalive_interval;
    config.liveness.idle_timeout = a.idle_timeout;
    config.liveness.blackout_tolerance = a.blackout_tolerance;
    config.limits.max_streams = a.max_streams_per_tunnel;
    config.limits.congestion = a.congestion;
    config.limits.post_quantum = a.post_quantum;
    config.max_streams = a.max_streams;
    config.max_streams_per_node = a.max_streams_per_node;
    config.peers = a.peers;
    config.advertise = a.advertise;
    config.upstream_ca = a.upstream_ca;
    config.drain_timeout = a.drain_timeout;
    config.max_tunnels_per_node = a.max_tunnels_per_node;
    config.join_rate_per_minute = a.join_rate_limit;
    config.max_nodes = a.max_nodes;
    config.agent_cert_lifetime = a.agent_cert_lifetime;
    config.egress = tether_server::config::EgressConfig {
        listen: a.egress_listen,
        uds: a.egress_uds,
        tls_cert: a.egress_tls_cert,
        tls_key: a.egress_tls_key,
        client_ca: a.egress_client_ca,
    };
    config
}

#[derive(clap::Args)]
struct DiagnoseArgs {
    #[command(flatten)]
    run: RunArgs,
    /// text (one line per check, with a hint when it is not ok) or json.
    #[arg(long, default_value = "text", value_parser = ["text", "json"])]
    output: String,
}

/// Runs `diagnose`, prints its report, and returns the exit status.
async fn diagnose(d: DiagnoseArgs) -> i32 {
    let report = tether_server::diagnose::diagnose(&settings(d.run)).await;
    report.print(&d.output)
}
