//! `tether-server demo`: a whole control plane on loopback, with a failover, in about 15 s.
//!
//! It makes a temporary CA, starts two stand-in apiservers, two `tether-server` processes (this
//! very binary, so that `kill -9` is real) and a `tether-agent` process (the binary beside this
//! one, as a user would run it), drives HTTPS requests and a watch through the agent's listener,
//! kills the server that carries the watch, and shows that requests keep succeeding and the
//! watch comes back through the other server.
//!
//! Run through `cargo run -p tether-server -- demo`, the agent may not be built yet: then the
//! demo builds it with the same cargo (the server does not link the agent).

use anyhow::{bail, Context, Result};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_endpoint::http;
use tether_endpoint::status::Status;
use tether_standin::StandIn;
use tether_transport::tls;
use tether_trust::{files, Ca, Lifetime};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// One demo server process.
struct ServerProc {
    name: &'static str,
    dir: PathBuf,
    addr: SocketAddr,
    upstream: SocketAddr,
    /// The other server, peered as masters are: it reports this one's death to the agent.
    peer: Option<SocketAddr>,
    child: Option<Child>,
}

impl ServerProc {
    fn start(&mut self) -> Result<()> {
        let exe = std::env::current_exe().context("cannot find this program's path")?;
        let log = std::fs::File::create(self.dir.join("server.log"))?;
        let mut cmd = Command::new(exe);
        cmd.args(["run", "--data-dir"])
            .arg(&self.dir)
            .args(["--listen", &self.addr.to_string()])
            .args(["--upstream", &self.upstream.to_string()]);
        if let Some(peer) = self.peer {
            cmd.args(["--peer", &peer.to_string()]);
        }
        let child = cmd
            .env_remove("TETHER_ADMIN")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", self.name))?;
        self.child = Some(child);
        Ok(())
    }

    async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.start_kill(); // SIGKILL: no goodbye to the agent
            let _ = c.wait().await;
        }
    }

    fn log_tail(&self) -> String {
        tail(&self.dir.join("server.log"))
    }
}

/// An HTTPS client that trusts only the demo CA, for requests through the agent's listener.
struct Client {
    connector: tokio_rustls::TlsConnector,
    via: SocketAddr,
}

impl Client {
    async fn connect(&self) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.via)
            .await
            .context("connect to the agent")?;
        let name = rustls::pki_types::ServerName::try_from("localhost")?;
        self.connector
            .connect(name, tcp)
            .await
            .context("TLS through the tunnel")
    }

    /// GET `path`; returns the status code and body.
    async fn get(&self, path: &str) -> Result<(u16, String)> {
        let mut s = self.connect().await?;
        let (code, body) = http::get(&mut s, "localhost", path, 1 << 20)
            .await
            .context("read the response")?;
        Ok((code, String::from_utf8_lossy(&body).into_owned()))
    }

    /// Opens a watch; events arrive as lines.
    async fn watch(&self) -> Result<BufReader<tokio_rustls::client::TlsStream<TcpStream>>> {
        let mut s = self.connect().await?;
        s.write_all(b"GET /api/v1/watch/pods HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await?;
        Ok(BufReader::new(s))
    }
}

/// Reads the next watch event and returns which apiserver sent it.
async fn next_event<R: tokio::io::AsyncBufRead + Unpin>(r: &mut R) -> Result<String> {
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).await? == 0 {
            bail!("watch ended");
        }
        if let Some(i) = line.find("\"apiserver\":\"") {
            let rest = &line[i + 13..];
            return Ok(rest.split('"').next().unwrap_or("?").to_string());
        }
    }
}

fn apiserver_of(body: &str) -> &str {
    body.split("\"apiserver\":\"")
        .nth(1)
        .and_then(|r| r.split('"').next())
        .unwrap_or("?")
}

fn free_udp_port() -> Result<SocketAddr> {
    let s = std::net::UdpSocket::bind("127.0.0.1:0").context("no free UDP port on loopback")?;
    Ok(s.local_addr()?)
}

fn free_tcp_port() -> Result<SocketAddr> {
    let s = std::net::TcpListener::bind("127.0.0.1:0").context("no free TCP port on loopback")?;
    Ok(s.local_addr()?)
}

async fn wait_until<F: std::future::Future<Output = bool>>(
    what: &str,
    deadline: Duration,
    mut cond: impl FnMut() -> F,
) -> Result<Duration> {
    let start = Instant::now();
    while !cond().await {
        if start.elapsed() > deadline {
            bail!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(start.elapsed())
}

/// The `tether-agent` binary beside this one; built first when the demo runs under `cargo run`
/// and it is not there yet.
fn agent_binary() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot find this program's path")?;
    let agent = exe.with_file_name(format!("tether-agent{}", std::env::consts::EXE_SUFFIX));
    if agent.exists() {
        return Ok(agent);
    }
    let (Some(cargo), Some(manifest)) = (
        std::env::var_os("CARGO"),
        std::env::var_os("CARGO_MANIFEST_DIR"),
    ) else {
        bail!(
            "the demo runs tether-agent, which is not beside this program ({}): install both binaries",
            agent.display()
        );
    };
    println!("    (building tether-agent first: cargo build -p tether-agent)");
    let workspace = PathBuf::from(manifest).join("../Cargo.toml");
    let mut build = std::process::Command::new(cargo);
    build
        .args(["build", "-p", "tether-agent", "--manifest-path"])
        .arg(&workspace);
    if !cfg!(debug_assertions) {
        build.arg("--release");
    }
    let status = build.status().context("cannot run cargo")?;
    if !status.success() || !agent.exists() {
        bail!("cannot build tether-agent ({status})");
    }
    Ok(agent)
}

/// The demo's node agent, as a process.
struct AgentProc {
    child: Child,
    admin: SocketAddr,
    listen: SocketAddr,
    log: PathBuf,
}

impl AgentProc {
    fn start(
        binary: &std::path::Path,
        servers: &[ServerProc],
        dir: &std::path::Path,
        token: &str,
    ) -> Result<Self> {
        let (listen, admin) = (free_tcp_port()?, free_tcp_port()?);
        let log = dir.with_extension("log");
        let mut cmd = Command::new(binary);
        cmd.args(["run", "--data-dir"]).arg(dir);
        for s in servers {
            cmd.args(["--server", &s.addr.to_string()]);
        }
        let child = cmd
            .args(["--listen", &listen.to_string()])
            .args(["--admin", &admin.to_string()])
            .args(["--node-name", "demo-node"])
            .env("TETHER_TOKEN", token)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(std::fs::File::create(&log)?))
            .kill_on_drop(true)
            .spawn()
            .context("cannot start tether-agent")?;
        Ok(AgentProc {
            child,
            admin,
            listen,
            log,
        })
    }

    /// Tunnels up, from the agent's status document (0 while it cannot say).
    async fn tunnels_up(&self) -> usize {
        let Ok(mut tcp) = TcpStream::connect(self.admin).await else {
            return 0;
        };
        let fetched = http::get(&mut tcp, "demo", "/status", 1 << 20);
        let Ok(Ok((200, body))) = tokio::time::timeout(Duration::from_secs(2), fetched).await
        else {
            return 0;
        };
        match serde_json::from_slice(&body) {
            Ok(Status::Agent(a)) => a.servers.iter().filter(|s| s.state == "up").count(),
            _ => 0,
        }
    }

    fn log_tail(&self) -> String {
        tail(&self.log)
    }

    async fn stop(mut self) {
        if let Some(pid) = self.child.id() {
            // SIGTERM: the agent drains and says goodbye.
            let _ = std::process::Command::new("kill")
                .arg(pid.to_string())
                .status();
        }
        if tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
        }
    }
}

fn tail(path: &std::path::Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<_> = text.lines().rev().take(5).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// A temporary directory, removed at the end of the demo.
struct Scratch(PathBuf);

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub async fn run() -> Result<()> {
    let scratch = Scratch(std::env::temp_dir().join(format!("tether-demo-{}", std::process::id())));
    let root = scratch.0.clone();
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;
    println!("tether demo: two servers, two stand-in apiservers, one node agent, one failover\n");
    let agent_bin = agent_binary()?;

    // 1. Certificates: server 1 makes the CA and a join token, server 2 joins the CA.
    let (d1, d2, dn) = (
        root.join("server-1"),
        root.join("server-2"),
        root.join("node"),
    );
    let loopback: Vec<String> = tether_trust::LOOPBACK_NAMES
        .iter()
        .map(|s| s.to_string())
        .collect();
    let report = tether_trust::init(&d1, &loopback, 1, 1)?;
    std::fs::create_dir_all(&d2)?;
    for f in [files::CA_CERT, files::CA_KEY] {
        std::fs::copy(d1.join(f), d2.join(f))?;
    }
    tether_trust::init(&d2, &loopback, 1, 1)?;
    println!(
        " 1. made a CA, server certificates and a join token in {}",
        root.display()
    );

    // 2. Stand-in apiservers, with certificates from the same CA for "localhost".
    let ca = Ca::load(&d1)?;
    let api_cert = ca.issue_server(&["localhost".into(), "127.0.0.1".into()], Lifetime::days(1))?;
    api_cert.save(&root.join("apiserver.crt"), &root.join("apiserver.key"))?;
    let id = tls::Identity::load(&root.join("apiserver.crt"), &root.join("apiserver.key"))?;
    let api_a = StandIn::start("A", id.clone()).await?;
    let api_b = StandIn::start("B", id).await?;
    println!(
        " 2. stand-in apiservers: A on {}, B on {}",
        api_a.addr, api_b.addr
    );

    // 3. Two servers, as processes.
    let mut servers = [
        ServerProc {
            name: "tether-server 1",
            dir: d1,
            addr: free_udp_port()?,
            upstream: api_a.addr,
            peer: None,
            child: None,
        },
        ServerProc {
            name: "tether-server 2",
            dir: d2,
            addr: free_udp_port()?,
            upstream: api_b.addr,
            peer: None,
            child: None,
        },
    ];
    servers[0].peer = Some(servers[1].addr);
    servers[1].peer = Some(servers[0].addr);
    for s in &mut servers {
        s.start()?;
    }
    println!(
        " 3. started {} (udp {}, upstream A) and {} (udp {}, upstream B)",
        servers[0].name, servers[0].addr, servers[1].name, servers[1].addr
    );

    // 4. The node's agent, as its own process: it joins with the token (the token pins the
    // CA; its key is made on the node and never leaves), then keeps a tunnel to each server.
    let agent = AgentProc::start(&agent_bin, &servers, &dn, &report.token.to_string())?;
    if let Err(e) = wait_until("both tunnels", Duration::from_secs(20), || async {
        agent.tunnels_up().await == 2
    })
    .await
    {
        for s in &servers {
            eprintln!("--- {} log:\n{}", s.name, s.log_tail());
        }
        eprintln!("--- tether-agent log:\n{}", agent.log_tail());
        return Err(e);
    }
    println!(
        " 4. tether-agent joined as node demo-node with the token; it listens on {}; tunnels up: 2",
        agent.listen
    );

    let mut roots = rustls::RootCertStore::empty();
    for c in tls::load_certs(&dn.join(files::CA_CERT))? {
        roots.add(c)?;
    }
    let client_cfg = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let client = Client {
        connector: tokio_rustls::TlsConnector::from(Arc::new(client_cfg)),
        via: agent.listen,
    };

    // 5. Requests and a watch through the agent.
    let mut watch = client.watch().await?;
    let first = next_event(&mut watch)
        .await
        .context("the watch sent no event")?;
    println!(" 5. a watch is open through the agent, receiving events from apiserver {first}");
    let (mut ok, mut failed, mut by) = (0u32, 0u32, std::collections::BTreeMap::new());
    for _ in 0..20 {
        match client.get("/version").await {
            Ok((200, body)) => {
                ok += 1;
                *by.entry(apiserver_of(&body).to_string()).or_insert(0u32) += 1;
            }
            _ => failed += 1,
        }
    }
    println!("    20 GET /version through the agent: {ok} ok, {failed} failed, answered by {by:?}");

    // 6. Kill the server that carries the watch.
    let victim = if first == "A" { 0 } else { 1 };
    let survivor = 1 - victim;
    println!(
        " 6. kill -9 {} (it carries the watch)",
        servers[victim].name
    );
    servers[victim].kill().await;
    let killed_at = Instant::now();

    // Requests keep flowing while the agent has not yet noticed the death, and after.
    let during = async {
        let (mut ok, mut failed) = (0u32, 0u32);
        let end = Instant::now() + Duration::from_secs(4);
        while Instant::now() < end {
            match client.get("/version").await {
                Ok((200, _)) => ok += 1,
                _ => failed += 1,
            }
        }
        (ok, failed)
    };
    let watch_end = async {
        loop {
            if next_event(&mut watch).await.is_err() {
                return killed_at.elapsed();
            }
        }
    };
    let ((ok2, failed2), reset_after) = tokio::join!(during, watch_end);
    println!("    requests during the failover: {ok2} ok, {failed2} failed");
    println!(
        "    the watch was reset {:.1} s after the kill (the surviving server reported its peer down; the agent's probe went unanswered)",
        reset_after.as_secs_f64()
    );
    let mut watch = client.watch().await?;
    let again = next_event(&mut watch)
        .await
        .context("the new watch sent no event")?;
    println!("    the client re-opened its watch: events now come from apiserver {again}");
    wait_until(
        "the dead tunnel to be dropped",
        Duration::from_secs(10),
        || async { agent.tunnels_up().await == 1 },
    )
    .await?;
    println!("    tunnels up: 1 ({} only)", servers[survivor].name);

    // 7. Bring the server back.
    servers[victim].start()?;
    let back = wait_until(
        "the agent to reconnect",
        Duration::from_secs(15),
        || async { agent.tunnels_up().await == 2 },
    )
    .await?;
    println!(
        " 7. restarted {}: the agent reconnected after {:.1} s; tunnels up: 2",
        servers[victim].name,
        back.as_secs_f64()
    );

    let total_failed = failed + failed2;
    println!(
        "\nSummary: {} requests, {} failed; the watch moved from apiserver {first} to {again}.",
        ok + failed + ok2 + failed2,
        total_failed
    );
    drop(watch);
    agent.stop().await;
    for s in &mut servers {
        s.kill().await;
    }
    if total_failed > 0 || again == first {
        for s in &servers {
            eprintln!("--- {} log:\n{}", s.name, s.log_tail());
        }
        bail!("the demo saw failures (server logs above)");
    }
    println!("Next: README.md shows how to install tether on real masters and nodes.");
    Ok(())
}
