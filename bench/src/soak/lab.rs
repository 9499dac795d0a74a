//! The soak's lab: servers with their upstreams, agents with their stand-in kubelets,
//! victims that join and are revoked, and the link between them (loopback, or the WAN lab's).

use super::*;

/// A small deterministic generator for payloads and choices (xorshift), seeded per use.
#[derive(Clone)]
pub(super) struct Rng(pub(super) u64);

impl Rng {
    pub(super) fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub(super) fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    pub(super) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub(super) fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The lab: upstreams, servers and agents, each of which a fault can stop and start again.

/// Where a part of the lab lives: the soak's own network namespace (loopback), or, with
/// `--link`, one of the WAN lab's namespaces, joined to the other only by the edge link's wire.
/// Every address the soak holds belongs to one side, and it dials it from there.
#[derive(Clone, Default)]
pub(super) struct Side(pub(super) Option<Arc<str>>);

impl Side {
    /// Runs `f` on this side: sockets it makes live there.
    pub(super) fn run<T: Send>(
        &self,
        f: impl FnOnce() -> std::io::Result<T> + Send,
    ) -> std::io::Result<T> {
        match &self.0 {
            None => f(),
            Some(ns) => crate::wan::lab::in_ns(ns, f)
                .map_err(|e| std::io::Error::other(format!("{e:#}")))?,
        }
    }

    /// The program and arguments that run `bin args` on this side.
    pub(super) fn command(&self, bin: &Path, args: &[String]) -> (PathBuf, Vec<String>) {
        match &self.0 {
            None => (bin.to_path_buf(), args.to_vec()),
            Some(ns) => {
                // `ip netns exec` execs the program: the process keeps the pid that signals and
                // samples use.
                let mut all = vec!["netns".into(), "exec".into(), ns.to_string()];
                all.push(bin.to_string_lossy().into_owned());
                all.extend_from_slice(args);
                (PathBuf::from("ip"), all)
            }
        }
    }

    /// A GET of an admin endpoint on this side.
    pub(super) fn http_get(&self, addr: SocketAddr, path: &str) -> Result<String> {
        self.run(|| crate::procs::http_get(addr, path).map_err(std::io::Error::other))
            .map_err(anyhow::Error::from)
    }
}

/// An echo server on a fixed port of `side`'s loopback (the kit's, bound inside the side's
/// namespace, again after each stop) that a fault can stop (new connections refused; the ones
/// open carry on) and start again: an apiserver going away.
pub(super) fn upstream(side: &Side) -> Result<Echo> {
    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let side = side.clone();
    Ok(Echo::start_with(Arc::new(move || {
        side.run(|| TcpListener::bind(addr))
    }))?)
}

/// A stand-in kubelet on `side`'s loopback: an echo on a port of its own, for the reverse path.
pub(super) fn kubelet(side: &Side) -> Result<Echo> {
    let side = side.clone();
    Ok(Echo::start_with(Arc::new(move || {
        side.run(|| TcpListener::bind("127.0.0.1:0"))
    }))?)
}

pub(super) struct Slot {
    pub(super) name: String,
    pub(super) bin: PathBuf,
    pub(super) args: Vec<String>,
    pub(super) log: PathBuf,
    pub(super) admin: SocketAddr,
    /// Where the process runs (and its admin address is).
    pub(super) side: Side,
    pub(super) proc: Option<Proc>,
    pub(super) starts: u32,
}

impl Slot {
    pub(super) fn start(&mut self) -> Result<()> {
        let log = self.log.with_extension(format!("{}.log", self.starts));
        self.starts += 1;
        let (bin, args) = self.side.command(&self.bin, &self.args);
        let mut p = Proc::spawn(&self.name, &bin, &args, &log)?;
        let admin = self.admin;
        let side = &self.side;
        wait_until(
            &format!("{} ready", self.name),
            Duration::from_secs(30),
            || {
                p.check_alive().is_ok()
                    && side
                        .run(|| {
                            tether_endpoint::http::get_blocking(
                                &admin.to_string(),
                                "/readyz",
                                Duration::from_secs(1),
                            )
                        })
                        .is_ok_and(|(code, _)| code == 200)
            },
        )
        .with_context(|| format!("{} did not start; see {}", self.name, log.display()))?;
        self.proc = Some(p);
        Ok(())
    }

    pub(super) fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    pub(super) fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// SIGTERM, then waits up to `deadline` for the exit (a drain); SIGKILL after that.
    pub(super) fn terminate(&mut self, deadline: Duration) {
        if let Some(mut p) = self.proc.take() {
            signal(p.pid(), "TERM");
            let start = Instant::now();
            while start.elapsed() < deadline && p.check_alive().is_ok() {
                std::thread::sleep(Duration::from_millis(50));
            }
            p.kill();
        }
    }
}

pub(super) fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

pub(super) struct Agent {
    pub(super) slot: Slot,
    pub(super) node: String,
    pub(super) api: SocketAddr,
    /// The stand-in kubelet the reverse path reaches.
    pub(super) kubelet: Echo,
}

/// A node that joins only to be revoked: it keeps running after, as
/// a revoked node whose owner has not noticed would, dialing and trying to renew, so that
/// every later fault tests that the revocation holds.
pub(super) struct Victim {
    pub(super) slot: Slot,
    pub(super) node: String,
    /// Renewals it had made when it was revoked.
    pub(super) renewals_before: u64,
}

/// What starting an agent needs: how to reach the servers and join them.
pub(super) struct Joining {
    pub(super) agent_bin: PathBuf,
    pub(super) server_bin: PathBuf,
    pub(super) token: String,
    /// The servers' tunnel addresses.
    pub(super) servers: Vec<String>,
    pub(super) work: PathBuf,
    /// Where agents run: the nodes' side.
    pub(super) side: Side,
    pub(super) log_level: String,
}

impl Joining {
    /// An agent for `node` that joins with the token; `name` names its process and logs.
    pub(super) fn agent(&self, name: &str, node: &str) -> Result<Agent> {
        let d = self.work.join(node).to_string_lossy().into_owned();
        let api = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let kubelet = kubelet(&self.side)?;
        let mut args: Vec<String> = [
            "--log-level",
            &self.log_level,
            "run",
            "--data-dir",
            &d,
            "--listen",
            &api.to_string(),
            "--admin",
            &admin.to_string(),
            "--allow",
            &kubelet.addr.to_string(),
            "--token",
            &self.token,
            "--node-name",
            node,
            "--reconnect-grace",
            &format!("{}s", GRACE.as_secs()),
            "--blackout-tolerance",
            &format!("{}s", BLACKOUT_TOLERANCE.as_secs()),
        ]
        .map(String::from)
        .to_vec();
        for a in &self.servers {
            args.extend(["--server".to_string(), a.clone()]);
        }
        Ok(Agent {
            slot: Slot {
                name: name.to_string(),
                bin: self.agent_bin.clone(),
                args,
                log: self.work.join(name),
                admin,
                side: self.side.clone(),
                proc: None,
                starts: 0,
            },
            node: node.to_string(),
            api,
            kubelet,
        })
    }
}

pub(super) struct Lab {
    /// The servers' tunnel ports (UDP and TCP).
    pub(super) ports: Vec<u16>,
    pub(super) upstreams: Vec<Echo>,
    pub(super) servers: Vec<Mutex<Slot>>,
    /// Egress proxy of each server.
    pub(super) egress: Vec<SocketAddr>,
    pub(super) agents: Vec<Mutex<Agent>>,
    /// The servers' etcd, with `--datastore etcd`.
    pub(super) etcd: Option<crate::etcd::Etcd>,
    /// The data directory the soak's own commands (revocations) name.
    pub(super) command_dir: PathBuf,
    pub(super) joining: Joining,
    pub(super) victims: Mutex<Vec<Victim>>,
    /// Where the agents (with their kubelets) and the servers (with their upstreams) run.
    pub(super) node: Side,
    pub(super) masters: Side,
    /// The edge link between them, with `--link`. Last: dropped after every process, it
    /// removes the namespaces they ran in.
    pub(super) link: Option<Link>,
}

/// The edge link of `--link PROFILE`: the WAN lab's node and masters namespaces, and the wire
/// between them with the profile's delay, jitter, loss, rate and queue. Its blackouts and NAT
/// rebindings are the soak's to make (see [`link_loop`]), so that the record has each one.
pub(super) struct Link {
    pub(super) profile: &'static crate::wan::Profile,
    pub(super) wire: crate::wan::lab::Lab,
}

impl Link {
    pub(super) fn start(profile: &'static crate::wan::Profile, seed: u64) -> Result<Link> {
        let shape = profile.shape();
        // No scheduled blackouts, and the NAT on: `link_loop` and `rebind NAT` drive both.
        let wire = crate::wan::lab::Lab::start(
            shape,
            shape,
            crate::wan::shape::Blackouts::none(),
            true,
            seed,
        )?;
        Ok(Link { profile, wire })
    }
}

/// How long a drained server lets streams finish before it exits.
pub(super) const DRAIN: Duration = Duration::from_secs(5);

/// Lifetime of the certificates agents get when they join and renew. Certificates start five
/// minutes in the past (clock skew) and are renewed at two thirds of their life: with 300 s,
/// every agent renews about every 100 s, under load and faults, for the whole run.
pub(super) const AGENT_CERT_LIFE: Duration = Duration::from_secs(300);

/// The agents' `--blackout-tolerance` (its default, given explicitly): how long every server may be silent at
/// once (a dead link) before the agent gives its tunnels up.
pub(super) const BLACKOUT_TOLERANCE: Duration = Duration::from_secs(30);

/// How long the agents hold a new connection that finds no tunnel (`--reconnect-grace`, its
/// default), given explicitly so that the disconnected scenario knows what to expect.
pub(super) const GRACE: Duration = Duration::from_secs(3);

impl Lab {
    /// Three servers and `agents` agents, which join for certificates of `cert_life`. With
    /// `etcd`, the servers share their state through an etcd of the lab's own (and find each
    /// other through it: no `--peer`); otherwise through their data directories and peer links.
    ///
    /// With `link`, the agents run in the node namespace of an edge link of that profile and
    /// the servers in its masters namespace (see [`Link`]).
    pub(super) fn build(
        work: &Path,
        agents: usize,
        cert_life: Duration,
        etcd: bool,
        link: Option<(&'static crate::wan::Profile, u64)>,
        log_level: &str,
    ) -> Result<Lab> {
        let server_bin = sibling("tether-server")?;
        let agent_bin = sibling("tether-agent")?;
        let link = link.map(|(p, seed)| Link::start(p, seed)).transpose()?;
        let (node, masters, server_ip) = match &link {
            Some(l) => (
                Side(Some(l.wire.node.as_str().into())),
                Side(Some(l.wire.masters.as_str().into())),
                std::net::IpAddr::V4(crate::wan::lab::MASTERS_IP),
            ),
            None => (
                Side::default(),
                Side::default(),
                std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
            ),
        };
        let ca = work.join("ca");
        let cad = ca.to_string_lossy().into_owned();
        let sans = format!("localhost,127.0.0.1,::1,{}", crate::wan::lab::MASTERS_IP);
        run_ok(&server_bin, &["init", "--data-dir", &cad, "--san", &sans])?;
        let n = 3;
        let (etcd, token) = if etcd {
            let (e, token) = crate::etcd::Etcd::start(&work.join("etcd"), n, &server_bin, &ca)?;
            (Some(e), token)
        } else {
            // Agents join with the token `init` made, as nodes do.
            let token =
                std::fs::read_to_string(ca.join("token")).context("the join token init wrote")?;
            (None, token.trim().to_string())
        };
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_, _>>()?;
        let addrs: Vec<String> = ports
            .iter()
            .map(|p| SocketAddr::new(server_ip, *p).to_string())
            .collect();
        let mut upstreams = Vec::new();
        let mut servers = Vec::new();
        let mut egress = Vec::new();
        for i in 0..n {
            let up = upstream(&masters)?;
            let dir = work.join(format!("server-{i}"));
            copy_dir(&ca, &dir)?;
            let admin = SocketAddr::from(([127, 0, 0, 1], free_port()?));
            let eg = SocketAddr::from(([127, 0, 0, 1], free_port()?));
            let mut args = crate::path::run_args(&dir, &addrs[i], admin);
            if let Some(level) = args.iter().position(|a| a == "--log-level") {
                args[level + 1] = log_level.to_string();
            }
            args.extend([
                "--upstream".into(),
                up.addr.to_string(),
                "--egress-listen".into(),
                eg.to_string(),
                "--drain-timeout".into(),
                format!("{}s", DRAIN.as_secs()),
                // Agents renew under load: due about 100 s after each join or renewal.
                "--agent-cert-lifetime".into(),
                format!("{}s", cert_life.as_secs()),
            ]);
            match &etcd {
                Some(e) => args.extend(e.server_flags(i)),
                None => {
                    for (j, a) in addrs.iter().enumerate() {
                        if j != i {
                            args.extend(["--peer".to_string(), a.clone()]);
                        }
                    }
                }
            }
            upstreams.push(up);
            egress.push(eg);
            servers.push(Mutex::new(Slot {
                name: format!("server-{i}"),
                bin: server_bin.clone(),
                args,
                log: work.join(format!("server-{i}")),
                admin,
                side: masters.clone(),
                proc: None,
                starts: 0,
            }));
        }
        for s in &servers {
            lock(s).start()?;
        }
        let joining = Joining {
            agent_bin,
            server_bin,
            token,
            servers: addrs,
            work: work.to_path_buf(),
            side: node.clone(),
            log_level: log_level.to_string(),
        };
        let mut agent_slots = Vec::new();
        for j in 0..agents {
            let mut a = joining.agent(&format!("agent-{j}"), &format!("soak-node-{j}"))?;
            a.slot.start()?;
            agent_slots.push(Mutex::new(a));
        }
        Ok(Lab {
            ports,
            upstreams,
            servers,
            egress,
            agents: agent_slots,
            etcd,
            command_dir: work.join("server-0"),
            joining,
            victims: Mutex::new(Vec::new()),
            node,
            masters,
            link,
        })
    }

    /// Every running tether process: (name, pid).
    pub(super) fn pids(&self) -> Vec<(String, u32)> {
        let mut out = Vec::new();
        for s in &self.servers {
            let s = lock(s);
            if let Some(p) = s.pid() {
                out.push((s.name.clone(), p));
            }
        }
        for a in &self.agents {
            let a = lock(a);
            if let Some(p) = a.slot.pid() {
                out.push((a.slot.name.clone(), p));
            }
        }
        out
    }
}
