//! Bringing up tether as a path under test: a CA and certificates made by the real
//! `tether-server init` and `issue-agent`, then `tether-server run` and `tether-agent run` as
//! processes of their own, so that their memory and CPU are theirs alone.

use crate::load::{free_port, probe};
use crate::procs::{http_get, metric, run_ok, sibling, wait_until, Proc};
use anyhow::{Context, Result};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The service name the bench's bulk sink is reached by.
pub const BULK_SERVICE: &str = "bulk";

/// Certificates of one run.
pub struct Pki {
    pub server_dir: PathBuf,
    pub agent_dir: PathBuf,
}

impl Pki {
    pub fn create(work: &Path) -> Result<Pki> {
        Self::create_for(work, "localhost,127.0.0.1,::1", "bench-node")
    }

    /// Certificates for servers named `sans` (comma-separated) and one node.
    pub fn create_for(work: &Path, sans: &str, node: &str) -> Result<Pki> {
        let server = sibling("tether-server")?;
        let server_dir = work.join("pki-server");
        let agent_dir = work.join("pki-agent");
        let sd = server_dir.to_string_lossy().into_owned();
        let ad = agent_dir.to_string_lossy().into_owned();
        run_ok(&server, &["init", "--data-dir", &sd, "--san", sans])?;
        run_ok(
            &server,
            &[
                "issue-agent",
                "--data-dir",
                &sd,
                "--node-name",
                node,
                "--out-dir",
                &ad,
            ],
        )?;
        Ok(Pki {
            server_dir,
            agent_dir,
        })
    }

    /// A private copy of a data directory, so that processes never share state files.
    fn copy(from: &Path, to: &Path) -> Result<()> {
        copy_dir(from, to)
    }
}

/// Copies the files of a directory (not its subdirectories) into another.
pub fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))
                .with_context(|| format!("copy {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// `tether-server run` relaying to `echo` (as the apiserver) and `sink` (as `bulk`).
pub fn server_args(
    dir: &Path,
    listen: SocketAddr,
    (echo, sink): (SocketAddr, SocketAddr),
    admin: SocketAddr,
) -> Vec<String> {
    let mut args = run_args(dir, &listen.to_string(), admin);
    args.extend([
        "--upstream".into(),
        echo.to_string(),
        "--service".into(),
        format!("{BULK_SERVICE}={sink}"),
    ]);
    args
}

/// `run` with the settings every bench process has: quiet logs, its data directory, where it
/// listens and its admin endpoint.
pub fn run_args(dir: &Path, listen: &str, admin: SocketAddr) -> Vec<String> {
    [
        "--log-level",
        "warn",
        "run",
        "--data-dir",
        &dir.to_string_lossy(),
        "--listen",
        listen,
        "--admin",
        &admin.to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// `tether-agent run` listening on `api` (the apiserver) and `bulk`, with tunnels to `servers`.
pub fn agent_args(
    dir: &Path,
    (api, bulk): (SocketAddr, SocketAddr),
    admin: SocketAddr,
    transport: &str,
    servers: &[String],
) -> Vec<String> {
    let mut args = run_args(dir, &api.to_string(), admin);
    args.extend([
        "--forward".into(),
        format!("{bulk}={BULK_SERVICE}"),
        "--transport".into(),
        transport.into(),
    ]);
    for s in servers {
        args.push("--server".into());
        args.push(s.clone());
    }
    args
}

/// A running `tether-server`.
pub struct Server {
    pub proc: Proc,
    /// Where agents dial it (UDP for QUIC, TCP for the fallback: the same port).
    pub addr: SocketAddr,
}

impl Server {
    /// Starts a server relaying to `echo` (as the apiserver) and to `sink` (as `bulk`).
    pub fn start(
        work: &Path,
        pki: &Pki,
        name: &str,
        echo: SocketAddr,
        sink: SocketAddr,
        extra: &[String],
    ) -> Result<Server> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        Self::start_on(work, pki, name, addr, (echo, sink), extra)
    }

    /// [`start`](Self::start) on a given address (a restart where agents expect it).
    pub fn start_on(
        work: &Path,
        pki: &Pki,
        name: &str,
        addr: SocketAddr,
        (echo, sink): (SocketAddr, SocketAddr),
        extra: &[String],
    ) -> Result<Server> {
        let dir = work.join(name);
        Pki::copy(&pki.server_dir, &dir)?;
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut args = server_args(&dir, addr, (echo, sink), admin);
        args.extend_from_slice(extra);
        let log = work.join(format!("{name}.log"));
        let mut proc = Proc::spawn(name, &sibling("tether-server")?, &args, &log)?;
        wait_until(&format!("{name} ready"), Duration::from_secs(20), || {
            proc.check_alive().is_ok() && http_get(admin, "/readyz").is_ok()
        })
        .with_context(|| format!("{name} did not start; see {}", log.display()))?;
        Ok(Server { proc, addr })
    }
}

/// A running `tether-agent`.
pub struct Agent {
    pub proc: Proc,
    /// The apiserver listener (reaches the echo server).
    pub api: SocketAddr,
    /// The `--forward` listener that reaches the bulk sink.
    pub bulk: SocketAddr,
    pub admin: SocketAddr,
}

impl Agent {
    /// Starts an agent with tunnels to `servers`, over `transport` (quic, tcp or auto).
    pub fn start(
        work: &Path,
        pki: &Pki,
        name: &str,
        servers: &[String],
        transport: &str,
        extra: &[String],
    ) -> Result<Agent> {
        let dir = work.join(name);
        Pki::copy(&pki.agent_dir, &dir)?;
        let api = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let bulk = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let mut args = agent_args(&dir, (api, bulk), admin, transport, servers);
        args.extend_from_slice(extra);
        let log = work.join(format!("{name}.log"));
        let mut proc = Proc::spawn(name, &sibling("tether-agent")?, &args, &log)?;
        let want = servers.len() as f64;
        wait_until(
            &format!("{name} tunnels up"),
            Duration::from_secs(20),
            || {
                proc.check_alive().is_ok()
                    && http_get(admin, "/metrics")
                        .ok()
                        .and_then(|m| metric(&m, "tether_tunnels_up "))
                        .is_some_and(|up| up >= want)
            },
        )
        .with_context(|| format!("{name} did not connect; see {}", log.display()))?;
        wait_until("an echo through the agent", Duration::from_secs(10), || {
            probe(api, Duration::from_secs(2)).is_ok()
        })?;
        Ok(Agent {
            proc,
            api,
            bulk,
            admin,
        })
    }

    /// The agent's tunnels that are up, from its metrics.
    pub fn tunnels_up(&self) -> f64 {
        http_get(self.admin, "/metrics")
            .ok()
            .and_then(|m| metric(&m, "tether_tunnels_up "))
            .unwrap_or(-1.0)
    }
}

/// One server and one agent: tether as a forwarding path.
pub struct Tether {
    pub server: Server,
    pub agent: Agent,
}

impl Tether {
    /// `extra`: more arguments for the server's and the agent's `run`.
    pub fn start(
        work: &Path,
        pki: &Pki,
        transport: &str,
        echo: SocketAddr,
        sink: SocketAddr,
        extra: (&[String], &[String]),
    ) -> Result<Tether> {
        let server = Server::start(
            work,
            pki,
            &format!("server-{transport}"),
            echo,
            sink,
            extra.0,
        )?;
        let agent = Agent::start(
            work,
            pki,
            &format!("agent-{transport}"),
            &[server.addr.to_string()],
            transport,
            extra.1,
        )?;
        Ok(Tether { server, agent })
    }

    /// The processes that are "the path" for memory and CPU figures: both ends.
    pub fn pids(&self) -> [u32; 2] {
        [self.server.proc.pid(), self.agent.proc.pid()]
    }
}
