//! `tether-bench soak`: the whole system under mixed, checked load for a long time while
//! something breaks every few seconds, counting every byte.
//!
//! It builds a control plane of three peered servers on loopback, each with an upstream of its
//! own (an echo server that can be stopped), and several agents with tunnels to all of them,
//! each with a stand-in kubelet. Then, for the duration, at once:
//! - short request-response connections at a steady rate, each payload checked;
//! - bulk connections of random sizes, checked end to end, half-closed both ways;
//! - long-lived connections (like watches) with a checked trickle;
//! - reverse-path CONNECTs through a server's egress proxy to a node's stand-in kubelet;
//! - and a fault every few seconds: `kill -9` and restart of a server, a SIGTERM drain and
//!   restart, an upstream stopped, an agent restarted, every server restarted one after
//!   another, a certificate reload, a node joined and revoked (it keeps dialing: the revocation
//!   must hold); as root, in a network namespace of its own, also packets to one server
//!   dropped, UDP blocked and a NAT rebinding; with `--datastore etcd` (the servers' state in
//!   an etcd of the soak's own, [`crate::etcd`]), also an etcd member killed and a server cut
//!   from etcd.
//!
//! What it asserts: no corrupted, lost or duplicated byte on any connection that ended cleanly;
//! a failed connection only where a fault explains it ([`may_fail`]: a new connection only if it
//! was in flight on what the fault took away, or its agent was down); long-lived connections on
//! a dead or silent server reset within [`RESET_BOUND`], and none silent for 10 s; the memory
//! and open files of every process flat after warm-up; no socket left in CLOSE_WAIT; no revoked
//! node on any server after [`REVOKE_BOUND`], nor renewing. The report
//! (report.md, chart.svg, connections.csv, faults.csv) says what ran and what it found.

use crate::load::free_port;
use crate::path::copy_dir;
use crate::procs::{run_ok, sibling, wait_until, Proc};
use crate::svg::{Canvas, GRID, INK, SERIES};
use anyhow::{bail, Context, Result};
use ring::digest::{Context as Digest, SHA256};
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How the soak runs.
#[derive(Debug, Clone)]
pub struct Settings {
    pub duration: Duration,
    /// Time before memory and file counts are taken as the baseline.
    pub warmup: Duration,
    /// A fault every this long (with jitter).
    pub fault_every: Duration,
    pub agents: usize,
    /// Short request-response connections per second, in all.
    pub rr_rate: u32,
    /// Largest bulk connection, in bytes.
    pub bulk_max: u64,
    /// Lifetime range of long-lived connections.
    pub long_life: (Duration, Duration),
    pub seed: u64,
    pub out: PathBuf,
    /// Running inside a network namespace of its own (as root): the faults that need a
    /// firewall (dropped packets, blocked UDP) are on.
    pub netns: bool,
    /// Only these kinds of fault (default: all that can run here).
    pub faults: Option<Vec<String>>,
    /// The servers keep their shared state in an etcd of the soak's own (`--datastore etcd`)
    /// instead of their data directories and peer links; etcd's faults join the list.
    pub etcd: bool,
    /// The agents reach the servers across an edge link of this profile (`--link`), with its
    /// blackouts and NAT rebindings among the faults.
    pub link: Option<&'static crate::wan::Profile>,
    /// The tether processes' `--log-level` (`warn` unless asked: an hour at `info` is for
    /// looking into a failure).
    pub log_level: String,
}

impl Settings {
    pub fn new(duration: Duration, quick: bool, seed: u64, out: PathBuf) -> Settings {
        if quick {
            Settings {
                duration,
                warmup: Duration::from_secs(20),
                fault_every: Duration::from_secs(6),
                agents: 2,
                rr_rate: 20,
                bulk_max: 8 << 20,
                long_life: (Duration::from_secs(10), Duration::from_secs(40)),
                seed,
                out,
                netns: in_namespace(),
                faults: None,
                etcd: false,
                link: None,
                log_level: "warn".into(),
            }
        } else {
            Settings {
                duration,
                warmup: Duration::from_secs(120),
                fault_every: Duration::from_secs(12),
                agents: 3,
                rr_rate: 30,
                bulk_max: 48 << 20,
                long_life: (Duration::from_secs(60), Duration::from_secs(300)),
                seed,
                out,
                netns: in_namespace(),
                faults: None,
                etcd: false,
                link: None,
                log_level: "warn".into(),
            }
        }
    }
}

/// A small deterministic generator for payloads and choices (xorshift), seeded per use.
#[derive(Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn fill(&mut self, buf: &mut [u8]) {
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
struct Side(Option<Arc<str>>);

impl Side {
    /// Runs `f` on this side: sockets it makes live there.
    fn run<T: Send>(&self, f: impl FnOnce() -> std::io::Result<T> + Send) -> std::io::Result<T> {
        match &self.0 {
            None => f(),
            Some(ns) => crate::wan::lab::in_ns(ns, f)
                .map_err(|e| std::io::Error::other(format!("{e:#}")))?,
        }
    }

    /// The program and arguments that run `bin args` on this side.
    fn command(&self, bin: &Path, args: &[String]) -> (PathBuf, Vec<String>) {
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
    fn http_get(&self, addr: SocketAddr, path: &str) -> Result<String> {
        self.run(|| crate::procs::http_get(addr, path).map_err(std::io::Error::other))
            .map_err(anyhow::Error::from)
    }
}

/// An echo server on a fixed port that can be stopped (new connections refused; the ones open
/// carry on) and started again: an apiserver going away.
struct Upstream {
    addr: SocketAddr,
    down: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Upstream {
    /// An upstream on `side`'s loopback: its thread lives there, as it binds again after each
    /// stop.
    fn start(side: &Side) -> Result<Upstream> {
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
        let (down, stop) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
        );
        let (d, s) = (down.clone(), stop.clone());
        let (bound_tx, bound) = std::sync::mpsc::sync_channel::<Result<()>>(1);
        let ns = side.0.clone();
        std::thread::spawn(move || {
            let first = (|| -> Result<TcpListener> {
                if let Some(ns) = &ns {
                    crate::wan::lab::enter(ns)?;
                }
                let l = TcpListener::bind(addr).with_context(|| format!("bind {addr}"))?;
                l.set_nonblocking(true)?;
                Ok(l)
            })();
            let first = match first {
                Ok(l) => {
                    let _ = bound_tx.send(Ok(()));
                    l
                }
                Err(e) => {
                    let _ = bound_tx.send(Err(e));
                    return;
                }
            };
            let mut listener = Some(first);
            while !s.load(Ordering::Relaxed) {
                if d.load(Ordering::Relaxed) {
                    listener = None;
                } else if listener.is_none() {
                    listener = TcpListener::bind(addr).ok();
                    if let Some(l) = &listener {
                        let _ = l.set_nonblocking(true);
                    }
                }
                match listener.as_ref().map(|l| l.accept()) {
                    Some(Ok((c, _))) => {
                        let _ = c.set_nonblocking(false);
                        std::thread::spawn(move || echo(c));
                    }
                    _ => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        bound
            .recv()
            .context("the upstream's thread ended before binding")??;
        Ok(Upstream { addr, down, stop })
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Echoes until the client's FIN, then sends its own: half-close both ways.
fn echo(mut c: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match c.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if c.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return,
        }
    }
    let _ = c.shutdown(Shutdown::Write);
}

/// A stand-in kubelet on `side`'s loopback: an echo on a port of its own, for the reverse path.
fn kubelet(side: &Side) -> Result<SocketAddr> {
    let l = side.run(|| TcpListener::bind("127.0.0.1:0"))?;
    let addr = l.local_addr()?;
    std::thread::spawn(move || {
        for c in l.incoming().flatten() {
            std::thread::spawn(move || echo(c));
        }
    });
    Ok(addr)
}

struct Slot {
    name: String,
    bin: PathBuf,
    args: Vec<String>,
    log: PathBuf,
    admin: SocketAddr,
    /// Where the process runs (and its admin address is).
    side: Side,
    proc: Option<Proc>,
    starts: u32,
}

impl Slot {
    fn start(&mut self) -> Result<()> {
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
                            tether_common::endpoint::http::get_blocking(
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

    fn pid(&self) -> Option<u32> {
        self.proc.as_ref().map(Proc::pid)
    }

    fn kill9(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.kill();
        }
    }

    /// SIGTERM, then waits up to `deadline` for the exit (a drain); SIGKILL after that.
    fn terminate(&mut self, deadline: Duration) {
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

fn signal(pid: u32, sig: &str) {
    let _ = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

struct Agent {
    slot: Slot,
    node: String,
    api: SocketAddr,
    kubelet: SocketAddr,
}

/// A node that joins only to be revoked: it keeps running after, as
/// a revoked node whose owner has not noticed would, dialing and trying to renew, so that
/// every later fault tests that the revocation holds.
struct Victim {
    slot: Slot,
    node: String,
    /// Renewals it had made when it was revoked.
    renewals_before: u64,
}

/// What starting an agent needs: how to reach the servers and join them.
struct Joining {
    agent_bin: PathBuf,
    server_bin: PathBuf,
    token: String,
    /// The servers' tunnel addresses.
    servers: Vec<String>,
    work: PathBuf,
    /// Where agents run: the nodes' side.
    side: Side,
    log_level: String,
}

impl Joining {
    /// An agent for `node` that joins with the token; `name` names its process and logs.
    fn agent(&self, name: &str, node: &str) -> Result<Agent> {
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
            &kubelet.to_string(),
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

struct Lab {
    /// The servers' tunnel ports (UDP and TCP).
    ports: Vec<u16>,
    upstreams: Vec<Upstream>,
    servers: Vec<Mutex<Slot>>,
    /// Egress proxy of each server.
    egress: Vec<SocketAddr>,
    agents: Vec<Mutex<Agent>>,
    /// The servers' etcd, with `--datastore etcd`.
    etcd: Option<crate::etcd::Etcd>,
    /// The data directory the soak's own commands (revocations) name.
    command_dir: PathBuf,
    joining: Joining,
    victims: Mutex<Vec<Victim>>,
    /// Where the agents (with their kubelets) and the servers (with their upstreams) run.
    node: Side,
    masters: Side,
    /// The edge link between them, with `--link`. Last: dropped after every process, it
    /// removes the namespaces they ran in.
    link: Option<Link>,
}

/// The edge link of `--link PROFILE`: the WAN lab's node and masters namespaces, and the wire
/// between them with the profile's delay, jitter, loss, rate and queue. Its blackouts and NAT
/// rebindings are the soak's to make (see [`link_loop`]), so that the record has each one.
struct Link {
    profile: &'static crate::wan::Profile,
    wire: crate::wan::lab::Lab,
}

impl Link {
    fn start(profile: &'static crate::wan::Profile, seed: u64) -> Result<Link> {
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
const DRAIN: Duration = Duration::from_secs(5);

/// Lifetime of the certificates agents get when they join and renew. Certificates start five
/// minutes in the past (clock skew) and are renewed at two thirds of their life: with 300 s,
/// every agent renews about every 100 s, under load and faults, for the whole run.
const AGENT_CERT_LIFE: Duration = Duration::from_secs(300);

/// The agents' `--blackout-tolerance` (its default, given explicitly): how long every server may be silent at
/// once (a dead link) before the agent gives its tunnels up.
const BLACKOUT_TOLERANCE: Duration = Duration::from_secs(30);

/// How long the agents hold a new connection that finds no tunnel (`--reconnect-grace`, its
/// default), given explicitly so that the disconnected scenario knows what to expect.
const GRACE: Duration = Duration::from_secs(3);

impl Lab {
    /// Three servers and `agents` agents, which join for certificates of `cert_life`. With
    /// `etcd`, the servers share their state through an etcd of the lab's own (and find each
    /// other through it: no `--peer`); otherwise through their data directories and peer links.
    ///
    /// With `link`, the agents run in the node namespace of an edge link of that profile and
    /// the servers in its masters namespace (see [`Link`]).
    fn build(
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
        let ports: Vec<u16> = (0..n).map(|_| free_port()).collect::<Result<_>>()?;
        let addrs: Vec<String> = ports
            .iter()
            .map(|p| SocketAddr::new(server_ip, *p).to_string())
            .collect();
        let mut upstreams = Vec::new();
        let mut servers = Vec::new();
        let mut egress = Vec::new();
        for i in 0..n {
            let up = Upstream::start(&masters)?;
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
    fn pids(&self) -> Vec<(String, u32)> {
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

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

// ---------------------------------------------------------------------------------------------
// What happened: faults, connection outcomes, process samples.

/// A fault, from its start to its end (seconds since the run began).
#[derive(Debug, Clone)]
struct Fault {
    kind: &'static str,
    target: String,
    start: f64,
    /// When it was fully in effect: the kill sent, every firewall rule in (`iptables` takes a
    /// while on a loaded machine). A connection begun before this was in flight at the fault.
    in_effect: f64,
    end: f64,
}

/// How long after a fault ends its effects may still end a connection: a killed or silent
/// server is noticed in ~2.5 s (the idle timeout), a reset arrives a moment later.
const NOTICE: f64 = 6.0;

/// Whether fault `f` may have failed a connection of `kind` that ran from `from` to `to`.
///
/// The rules are the issue's: a new connection (short or bulk) fails only when it was in flight
/// on what the fault took away. One that begins after a server died, went silent or lost UDP is
/// carried by another tunnel, or waits for the next (`--reconnect-grace`), so its failure is
/// tether's. Long-lived connections and reverse CONNECTs live through the fault's window: a
/// watch outlives many faults and only the last can end it (its reset time is judged apart,
/// see [`resets_after_death`]); a CONNECT goes through the one server it asked, as
/// kube-apiserver asks its own, and that server's drain or restart ends it.
fn may_fail(f: &Fault, kind: &str, from: f64, to: f64) -> bool {
    let new_connection = matches!(kind, "short" | "bulk");
    let in_flight_at = |t: f64, slack: f64| from <= t + slack && to >= t - slack;
    let in_window = f.start <= to && f.end + NOTICE >= from;
    match f.kind {
        // The agent itself went away: what it carried, and what was refused while it was down.
        "restart agent" => in_window,
        // The upstream's closing listener resets what it had queued, as a dying apiserver
        // would: connections in flight at that instant. Later ones go to another upstream.
        "stop upstream" => in_flight_at(f.start, 0.5),
        "kill -9 server" | "drop packets to server" | "block UDP" => {
            if new_connection {
                // Begun before the fault was in full effect, ended after it began.
                from <= f.in_effect && to >= f.start
            } else {
                in_window
            }
        }
        // What outlasts the drain timeout is closed: a long-lived connection, or, on a slow
        // link, a bulk one that takes longer than the timeout. Nothing quicker fails.
        "drain server" | "restart all servers" => {
            in_window && (!new_connection || to - from > DRAIN.as_secs_f64())
        }
        // Certificate reloads, NAT rebindings and the link's blackouts (up to the tolerance)
        // must fail nothing: a blackout only delays.
        "link blackout" | "link rebinding" | "rebind NAT" | "reload server certificate" => false,
        _ => false,
    }
}

/// Whether a fault aimed at one agent (a restart) hit this connection's agent: a restart of
/// one node explains nothing on another.
fn aimed_at(f: &Fault, o: &Outcome) -> bool {
    f.kind != "restart agent" || f.target == format!("agent-{}", o.agent)
}

/// The fault that explains a failed connection, if any.
fn explanation<'a>(faults: &'a [Fault], o: &Outcome) -> Option<&'a Fault> {
    faults
        .iter()
        .find(|f| may_fail(f, o.kind, o.start, o.end) && aimed_at(f, o))
}

/// A connection's end.
#[derive(Debug, Clone)]
struct Outcome {
    kind: &'static str,
    /// Seconds since the run began, at the connection's start and end.
    start: f64,
    end: f64,
    bytes: u64,
    /// None: checked and whole. Some: why it failed.
    failure: Option<String>,
    /// Bytes came back different: never explained by a fault.
    corrupt: bool,
    agent: usize,
}

#[derive(Default)]
struct Record {
    faults: Vec<Fault>,
    outcomes: Vec<Outcome>,
    samples: Vec<Sample>,
    /// Certificate renewals by agent process.
    renewals: BTreeMap<u32, u64>,
    /// Each renewal as the sampler saw it: (seconds since the run began, agent). Seen up to a
    /// sampling period ([`SAMPLE_EVERY`]) after it happened.
    renewed: Vec<(f64, usize)>,
    /// Nodes revoked during the run: (seconds since the run began, when the command returned;
    /// node).
    revocations: Vec<(f64, String)>,
    /// A revoked node seen where it must not be: (when, node, where).
    after_revocation: Vec<(f64, String, String)>,
}

/// One look at one process.
#[derive(Debug, Clone)]
struct Sample {
    /// Seconds since the run began.
    t: f64,
    name: String,
    pid: u32,
    rss_kib: u64,
    fds: u64,
    threads: u64,
}

/// The samples of each process instance (a restart is a new instance), by name and pid.
fn instances(samples: &[Sample]) -> BTreeMap<(String, u32), Vec<&Sample>> {
    let mut by: BTreeMap<(String, u32), Vec<&Sample>> = BTreeMap::new();
    for x in samples {
        by.entry((x.name.clone(), x.pid)).or_default().push(x);
    }
    by
}

struct Run {
    lab: Lab,
    record: Mutex<Record>,
    t0: Instant,
    stop: AtomicBool,
    settings: Settings,
    /// Agents being restarted (connections to them are explained).
    bytes: AtomicU64,
}

impl Run {
    fn now(&self) -> f64 {
        self.t0.elapsed().as_secs_f64()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn outcome(&self, o: Outcome) {
        self.bytes.fetch_add(o.bytes, Ordering::Relaxed);
        lock(&self.record).outcomes.push(o);
    }
}

fn sha(data: &[u8]) -> Vec<u8> {
    let mut d = Digest::new(&SHA256);
    d.update(data);
    d.finish().as_ref().to_vec()
}

/// A connection to `addr` on `side`.
fn connect(side: &Side, addr: SocketAddr) -> std::io::Result<TcpStream> {
    let c = side.run(|| TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(Duration::from_secs(15)))?;
    c.set_write_timeout(Some(Duration::from_secs(15)))?;
    Ok(c)
}

/// Sends `data` on one thread while reading the echo on this one, then half-closes and reads
/// to the end: the bytes back, or why not.
fn exchange(
    side: &Side,
    addr: SocketAddr,
    data: Arc<Vec<u8>>,
) -> std::result::Result<Vec<u8>, String> {
    let c = connect(side, addr).map_err(|e| format!("connect: {e}"))?;
    let mut w = c.try_clone().map_err(|e| e.to_string())?;
    let sent = data.clone();
    let writer = std::thread::spawn(move || -> std::io::Result<()> {
        for chunk in sent.chunks(64 * 1024) {
            w.write_all(chunk)?;
        }
        w.shutdown(Shutdown::Write)
    });
    let mut back = Vec::with_capacity(data.len());
    let mut r = c;
    let read = r.read_to_end(&mut back);
    let wrote = writer
        .join()
        .unwrap_or_else(|_| Err(std::io::Error::other("writer panicked")));
    read.map_err(|e| format!("read: {e}"))?;
    wrote.map_err(|e| format!("write: {e}"))?;
    Ok(back)
}

fn pick_agent(run: &Run, rng: &mut Rng) -> (usize, SocketAddr) {
    let j = rng.below(run.lab.agents.len() as u64) as usize;
    (j, lock(&run.lab.agents[j]).api)
}

/// Short request-response connections at a steady rate, spread over a few threads.
fn short_load(run: Arc<Run>, worker: u64, workers: u64) {
    let mut rng = Rng::new(run.settings.seed ^ (0x5157 + worker));
    let gap = Duration::from_secs_f64(workers as f64 / f64::from(run.settings.rr_rate.max(1)));
    while !run.stopped() {
        let next = Instant::now() + gap;
        let (agent, addr) = pick_agent(&run, &mut rng);
        let mut data = vec![0u8; 1 + rng.below(32 * 1024) as usize];
        rng.fill(&mut data);
        let start = run.now();
        let data = Arc::new(data);
        let got = exchange(&run.lab.node, addr, data.clone());
        run.outcome(judge("short", start, run.now(), agent, &data, got));
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
}

fn judge(
    kind: &'static str,
    start: f64,
    end: f64,
    agent: usize,
    sent: &[u8],
    got: std::result::Result<Vec<u8>, String>,
) -> Outcome {
    let (failure, corrupt, bytes) = match got {
        Ok(back) if back.len() == sent.len() && sha(&back) == sha(sent) => {
            (None, false, sent.len() as u64)
        }
        Ok(back) if back.len() < sent.len() && sent.starts_with(&back) => (
            Some(format!(
                "ended after {} of {} bytes",
                back.len(),
                sent.len()
            )),
            false,
            back.len() as u64,
        ),
        Ok(back) => (
            Some(format!(
                "{} bytes back for {} sent, not the same",
                back.len(),
                sent.len()
            )),
            true,
            0,
        ),
        Err(e) => (Some(e), false, 0),
    };
    Outcome {
        kind,
        start,
        end,
        bytes,
        failure,
        corrupt,
        agent,
    }
}

/// Bulk connections of random sizes, checked end to end.
fn bulk_load(run: Arc<Run>, worker: u64) {
    let mut rng = Rng::new(run.settings.seed ^ (0xB01C + worker));
    while !run.stopped() {
        let (agent, addr) = pick_agent(&run, &mut rng);
        let len = 1 + rng.below(run.settings.bulk_max) as usize;
        let mut data = vec![0u8; len];
        rng.fill(&mut data);
        let start = run.now();
        let data = Arc::new(data);
        let got = exchange(&run.lab.node, addr, data.clone());
        let o = judge("bulk", start, run.now(), agent, &data, got);
        let failed = o.failure.is_some();
        run.outcome(o);
        if failed {
            // A client retries, but not in a tight loop.
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Long-lived connections with a checked trickle: 64 bytes every half second, each echoed.
fn long_load(run: Arc<Run>, worker: u64) {
    let mut rng = Rng::new(run.settings.seed ^ (0x1096 + worker));
    let (lo, hi) = run.settings.long_life;
    while !run.stopped() {
        let (agent, addr) = pick_agent(&run, &mut rng);
        let life = lo + Duration::from_millis(rng.below((hi - lo).as_millis() as u64 + 1));
        let start = run.now();
        let result = trickle(&run, addr, life, &mut rng);
        let (bytes, failure, corrupt) = match result {
            Ok(b) => (b, None, false),
            Err((b, why, corrupt)) => (b, Some(why), corrupt),
        };
        let failed = failure.is_some();
        run.outcome(Outcome {
            kind: "long",
            start,
            end: run.now(),
            bytes,
            failure,
            corrupt,
            agent,
        });
        if failed {
            // A watch is re-established, but not in a tight loop.
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

type TrickleError = (u64, String, bool);

fn trickle(
    run: &Run,
    addr: SocketAddr,
    life: Duration,
    rng: &mut Rng,
) -> std::result::Result<u64, TrickleError> {
    let mut c = connect(&run.lab.node, addr).map_err(|e| (0, format!("connect: {e}"), false))?;
    // Silent longer than this is stuck: failures are noticed in ~2.5 s, and a reset travels.
    c.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| (0, e.to_string(), false))?;
    let end = Instant::now() + life;
    let mut bytes = 0u64;
    let mut msg = [0u8; 64];
    let mut back = [0u8; 64];
    while Instant::now() < end && !run.stopped() {
        rng.fill(&mut msg);
        c.write_all(&msg)
            .map_err(|e| (bytes, format!("write: {e}"), false))?;
        match c.read_exact(&mut back) {
            Ok(()) if back == msg => bytes += 64,
            Ok(()) => return Err((bytes, "a trickle came back different".into(), true)),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err((bytes, "stuck: no echo for 10 s".into(), false))
            }
            Err(e) => return Err((bytes, format!("read: {e}"), false)),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    c.shutdown(Shutdown::Write)
        .map_err(|e| (bytes, format!("half-close: {e}"), false))?;
    let mut rest = Vec::new();
    match c.read_to_end(&mut rest) {
        Ok(_) if rest.is_empty() => Ok(bytes),
        Ok(_) => Err((bytes, "bytes after the last echo".into(), true)),
        Err(e) => Err((bytes, format!("reading the end: {e}"), false)),
    }
}

/// CONNECTs through a running server's egress proxy to a node's stand-in kubelet.
fn reverse_load(run: Arc<Run>) {
    let mut rng = Rng::new(run.settings.seed ^ 0xEE);
    while !run.stopped() {
        std::thread::sleep(Duration::from_millis(400));
        let i = rng.below(run.lab.servers.len() as u64) as usize;
        if lock(&run.lab.servers[i]).pid().is_none() {
            continue;
        }
        let j = rng.below(run.lab.agents.len() as u64) as usize;
        let (node, kubelet) = {
            let a = lock(&run.lab.agents[j]);
            (a.node.clone(), a.kubelet)
        };
        let mut data = vec![0u8; 4096];
        rng.fill(&mut data);
        let start = run.now();
        let got = connect_through(
            &run.lab.masters,
            run.lab.egress[i],
            &node,
            kubelet.port(),
            &data,
        );
        let got = got.map(|_| data.clone());
        run.outcome(judge("reverse", start, run.now(), j, &data, got));
    }
}

fn connect_through(
    side: &Side,
    proxy: SocketAddr,
    node: &str,
    port: u16,
    data: &[u8],
) -> std::result::Result<(), String> {
    let mut c = connect(side, proxy).map_err(|e| format!("connect to the egress proxy: {e}"))?;
    let req = format!("CONNECT {node}:{port} HTTP/1.1\r\nHost: {node}:{port}\r\n\r\n");
    c.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() > 8192 || c.read(&mut b).map_err(|e| format!("answer: {e}"))? == 0 {
            return Err("no answer from the egress proxy".into());
        }
        head.push(b[0]);
    }
    let status = String::from_utf8_lossy(&head);
    if !status.starts_with("HTTP/1.1 200") {
        return Err(format!(
            "egress answered {}",
            status.lines().next().unwrap_or("")
        ));
    }
    c.write_all(data).map_err(|e| format!("write: {e}"))?;
    c.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
    let mut back = Vec::new();
    c.read_to_end(&mut back).map_err(|e| format!("read: {e}"))?;
    if back == data {
        Ok(())
    } else {
        Err(format!("{} bytes back for {}", back.len(), data.len()))
    }
}

// ---------------------------------------------------------------------------------------------
// Faults.

/// Every kind of fault, as `--faults` names them (dashes for spaces).
pub const FAULTS: &[&str] = &[
    "kill -9 server",
    "drain server",
    "stop upstream",
    "restart agent",
    "reload server certificate",
    "restart all servers",
    "drop packets to server",
    "block UDP",
    "rebind NAT",
    "kill -9 etcd",
    "cut server from etcd",
    "revoke node",
];

fn fault_loop(run: Arc<Run>) {
    let mut rng = Rng::new(run.settings.seed ^ 0xFA17);
    // The first fault after a little traffic.
    sleep_unless_stopped(&run, Duration::from_secs(5));
    // Those that can run here, in the order of FAULTS (which, with the seed, makes the run).
    let conntrack = run.settings.netns && runs("conntrack", &["-V"]);
    let etcd = run.lab.etcd.is_some();
    let mut kinds: Vec<&'static str> = FAULTS
        .iter()
        .copied()
        .filter(|k| match *k {
            "drop packets to server" | "block UDP" => run.settings.netns,
            "rebind NAT" => conntrack || run.lab.link.is_some(),
            "kill -9 etcd" | "cut server from etcd" => etcd,
            _ => true,
        })
        .collect();
    if let Some(only) = &run.settings.faults {
        kinds.retain(|k| only.iter().any(|o| o == k));
    }
    if kinds.is_empty() {
        return;
    }
    let mut n = 0u64;
    while !run.stopped() && run.now() + 15.0 < run.settings.duration.as_secs_f64() {
        // Every kind comes round; the rolling restart, the longest, a little less often.
        let mut kind = kinds[rng.below(kinds.len() as u64) as usize];
        if kind == "restart all servers" && n % 2 == 1 {
            kind = "kill -9 server";
        }
        n += 1;
        let start = run.now();
        let (target, in_effect) = match inject(&run, kind, &mut rng) {
            Ok(Injected { target, in_effect }) => (target, in_effect.unwrap_or(start)),
            Err(e) => (format!("failed: {e:#}"), start),
        };
        let end = run.now();
        lock(&run.record).faults.push(Fault {
            kind,
            target,
            start,
            in_effect,
            end,
        });
        let every = run.settings.fault_every.as_millis() as u64;
        sleep_unless_stopped(&run, Duration::from_millis(every / 2 + rng.below(every)));
    }
}

/// The link's own weather, with `--link`: a blackout of the profile's length about every
/// `blackout_every_s`, and a NAT rebinding about every `rebind_every_s` (each a quarter early
/// or late at random, so that neither falls into step with the faults). Each goes into the
/// record as a fault that must fail nothing (see [`may_fail`]): streams outlive a blackout up
/// to the tolerance, and QUIC follows its flows to their new ports.
fn link_loop(run: Arc<Run>) {
    let Some(link) = &run.lab.link else { return };
    let p = link.profile;
    let wire = link.wire.handle();
    let mut rng = Rng::new(run.settings.seed ^ 0x11C4);
    let after = |every: u64, rng: &mut Rng| -> Option<f64> {
        (every > 0).then(|| {
            let ms = every * 1000;
            run.now() + (ms * 3 / 4 + rng.below(ms / 2 + 1)) as f64 / 1000.0
        })
    };
    // The first of each comes early (a quarter of the period in), so that a short run has
    // them too.
    let first = |every: u64| (every > 0).then(|| run.now() + every as f64 / 4.0);
    let mut dark_at = first(p.blackout_every_s);
    let mut rebind_at = first(p.rebind_every_s);
    // Like the faults, none in the last moments: the run ends on a working link.
    while !run.stopped() && run.now() + 15.0 < run.settings.duration.as_secs_f64() {
        let now = run.now();
        if dark_at.is_some_and(|t| now >= t) {
            let (lo, hi) = p.blackout_len_s;
            let len_ms = lo * 1000 + rng.below(hi.saturating_sub(lo) * 1000 + 1);
            wire.blackout(Duration::from_millis(len_ms));
            let len = len_ms as f64 / 1000.0;
            lock(&run.record).faults.push(Fault {
                kind: "link blackout",
                target: format!("every server, {len:.1} s"),
                start: now,
                in_effect: now,
                end: now + len,
            });
            dark_at = after(p.blackout_every_s, &mut rng);
        }
        if rebind_at.is_some_and(|t| now >= t) {
            wire.rebind();
            lock(&run.record).faults.push(Fault {
                kind: "link rebinding",
                target: "every UDP flow of the node".into(),
                start: now,
                in_effect: now,
                end: now,
            });
            rebind_at = after(p.rebind_every_s, &mut rng);
        }
        sleep_unless_stopped(&run, Duration::from_millis(100));
    }
}

/// Inserts (`-I`) or deletes (`-D`) one firewall rule, on the servers' side: their own
/// namespace across a `--link`, or the soak's loopback.
fn iptables(side: &Side, op: &str, rule: &str) -> Result<()> {
    let mut args = vec![op.to_string()];
    args.extend(rule.split(' ').map(String::from));
    let (bin, args) = side.command(Path::new("iptables"), &args);
    let st = std::process::Command::new(bin).args(&args).status()?;
    if !st.success() {
        bail!("iptables {op} {rule} failed");
    }
    Ok(())
}

/// Forgets every UDP flow the namespace's connection tracking holds, so that the next packet
/// of each goes through the NAT rules anew.
fn forget_udp_flows() -> Result<()> {
    // conntrack exits 1 when there was nothing to delete.
    std::process::Command::new("conntrack")
        .args(["-D", "-p", "udp"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .context("conntrack")?;
    Ok(())
}

/// Whether `cmd args` runs and succeeds (its output discarded): is a tool here?
fn runs(cmd: &str, args: &[&str]) -> bool {
    std::process::Command::new(cmd)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// UDP flows whose source the NAT rewrote into `range` (the reply goes to a port in it).
fn flows_rebound(range: std::ops::RangeInclusive<u16>) -> usize {
    let Ok(out) = std::process::Command::new("conntrack")
        .args(["-L", "-p", "udp"])
        .stderr(std::process::Stdio::null())
        .output()
    else {
        return 0;
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| {
            // The second `dport=` is the reply's destination: the address the NAT chose.
            l.match_indices("dport=")
                .nth(1)
                .and_then(|(i, _)| l[i + 6..].split(' ').next()?.parse::<u16>().ok())
                .is_some_and(|p| range.contains(&p))
        })
        .count()
}

/// Inserts firewall rules for `hold`, then removes them; returns when they were all in.
fn with_rules(run: &Run, rules: &[String], hold: Duration) -> Result<f64> {
    let mut inserted = 0;
    let mut result = Ok(());
    for r in rules {
        if let Err(e) = iptables(&run.lab.masters, "-I", r) {
            result = Err(e);
            break;
        }
        inserted += 1;
    }
    let in_effect = run.now();
    if result.is_ok() {
        std::thread::sleep(hold);
    }
    // Whatever went in comes out, even when a later rule failed to go in.
    for r in &rules[..inserted] {
        if let Err(e) = iptables(&run.lab.masters, "-D", r) {
            result = result.and(Err(e));
        }
    }
    result.map(|()| in_effect)
}

/// The variable that tells a soak it runs inside the namespace it made.
pub const NETNS_ENV: &str = "TETHER_SOAK_NETNS";

fn in_namespace() -> bool {
    std::env::var_os(NETNS_ENV).is_some()
}

/// Whether a soak can make a network namespace of its own: root, `ip` and `iptables`.
pub fn can_make_namespace() -> bool {
    let root = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(1) == Some("0"))
        })
        .unwrap_or(false);
    root && runs("ip", &["netns", "list"]) && runs("iptables", &["-V"])
}

/// Runs this same command inside a new network namespace (its own loopback and firewall, so
/// that the faults that need a firewall touch nothing else), and removes the namespace after;
/// the command's exit code.
pub fn run_in_namespace(args: Vec<std::ffi::OsString>) -> Result<i32> {
    let name = format!("tsoak{}", std::process::id());
    let ip = |a: &[&str]| -> Result<()> {
        let st = std::process::Command::new("ip").args(a).status()?;
        if !st.success() {
            bail!("ip {} failed", a.join(" "));
        }
        Ok(())
    };
    ip(&["netns", "add", &name])?;
    let result = (|| -> Result<i32> {
        ip(&["-n", &name, "link", "set", "lo", "up"])?;
        eprintln!("soak: running inside network namespace {name} (its own loopback and firewall)");
        let exe = std::env::current_exe()?;
        let st = std::process::Command::new("ip")
            .args(["netns", "exec", &name])
            .arg(exe)
            .args(args)
            .env(NETNS_ENV, &name)
            .status()?;
        Ok(st.code().unwrap_or(1))
    })();
    let _ = ip(&["netns", "del", &name]);
    result
}

fn sleep_unless_stopped(run: &Run, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end && !run.stopped() {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What an injected fault hit, and when it was fully in effect if that matters (see
/// [`Fault::in_effect`]; the fault's start otherwise).
struct Injected {
    target: String,
    in_effect: Option<f64>,
}

impl From<String> for Injected {
    fn from(target: String) -> Self {
        Injected {
            target,
            in_effect: None,
        }
    }
}

/// Injects one fault and repairs it; returns what it hit.
fn inject(run: &Run, kind: &str, rng: &mut Rng) -> Result<Injected> {
    let lab = &run.lab;
    let i = rng.below(lab.servers.len() as u64) as usize;
    match kind {
        "kill -9 server" => {
            let mut s = lock(&lab.servers[i]);
            s.kill9();
            let in_effect = run.now();
            drop(s);
            std::thread::sleep(Duration::from_millis(2000 + rng.below(2000)));
            lock(&lab.servers[i]).start()?;
            Ok(Injected {
                target: format!("server-{i}"),
                in_effect: Some(in_effect),
            })
        }
        "drain server" => {
            lock(&lab.servers[i]).terminate(DRAIN + Duration::from_secs(5));
            lock(&lab.servers[i]).start()?;
            Ok(format!("server-{i}").into())
        }
        "stop upstream" => {
            lab.upstreams[i].down.store(true, Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(4000 + rng.below(4000)));
            lab.upstreams[i].down.store(false, Ordering::Relaxed);
            Ok(format!("upstream of server-{i}").into())
        }
        "restart agent" => {
            let j = rng.below(lab.agents.len() as u64) as usize;
            let mut a = lock(&lab.agents[j]);
            a.slot.terminate(Duration::from_secs(35));
            a.slot.start()?;
            Ok(format!("agent-{j}").into())
        }
        "reload server certificate" => {
            if let Some(p) = lock(&lab.servers[i]).pid() {
                signal(p, "HUP");
            }
            Ok(format!("server-{i}").into())
        }
        "drop packets to server" => {
            // Both directions of the server's port (agents' and peers' tunnels, both
            // transports): a silent partition, noticed only by liveness.
            let port = lab.ports[i];
            let rules = [
                format!("INPUT -p udp --dport {port} -j DROP"),
                format!("INPUT -p udp --sport {port} -j DROP"),
                format!("INPUT -p tcp --dport {port} -j DROP"),
                format!("INPUT -p tcp --sport {port} -j DROP"),
            ];
            let in_effect = with_rules(run, &rules, Duration::from_millis(5000 + rng.below(3000)))?;
            Ok(Injected {
                target: format!("server-{i}"),
                in_effect: Some(in_effect),
            })
        }
        "block UDP" => {
            // QUIC dies everywhere: agents fall back to TLS over TCP, and return after.
            let rules = ["INPUT -p udp -j DROP".to_string()];
            let in_effect =
                with_rules(run, &rules, Duration::from_millis(10_000 + rng.below(5000)))?;
            Ok(Injected {
                target: "all UDP".into(),
                in_effect: Some(in_effect),
            })
        }
        "rebind NAT" if lab.link.is_some() => {
            // The link's own NAT (see `crate::wan::nat`) gives every UDP flow of the node a
            // new source port, and again after a while: the same as below, across the link.
            let wire = lab.link.as_ref().context("no link")?.wire.handle();
            wire.rebind();
            let in_effect = run.now();
            std::thread::sleep(Duration::from_millis(3000 + rng.below(3000)));
            wire.rebind();
            Ok(Injected {
                target: "every UDP flow of the node's link, twice".into(),
                in_effect: Some(in_effect),
            })
        }
        "rebind NAT" => {
            // A NAT in front of the agents forgets its mappings and gives every UDP flow to
            // the servers a new source port: each server sees its agents (and its peers) move
            // to a new address, and QUIC must carry on across the change, losing nothing.
            let ports: Vec<String> = lab.ports.iter().map(u16::to_string).collect();
            let rule = format!(
                "POSTROUTING -t nat -p udp -m multiport --dports {} -j SNAT --to-source 127.0.0.1:42000-42999",
                ports.join(",")
            );
            iptables(&Side::default(), "-I", &rule)?;
            let moved = forget_udp_flows().map(|()| {
                // Keepalives (every 500 ms) move the quiet flows too.
                std::thread::sleep(Duration::from_millis(1500));
                flows_rebound(42000..=42999)
            });
            std::thread::sleep(Duration::from_millis(3000 + rng.below(3000)));
            // And back: the mapping changes a second time.
            let removed = iptables(&Side::default(), "-D", &rule);
            forget_udp_flows()?;
            removed?;
            Ok(format!("{} UDP flows moved to new ports", moved?).into())
        }
        "restart all servers" => {
            for s in &lab.servers {
                lock(s).terminate(DRAIN + Duration::from_secs(5));
                lock(s).start()?;
            }
            Ok(Injected::from("every server in turn".to_string()))
        }
        "kill -9 etcd" => {
            let etcd = lab.etcd.as_ref().context("no etcd in this lab")?;
            let n = etcd.members();
            let m = rng.below(n as u64) as usize;
            // One member in three kills: the others keep a quorum, and nothing may notice.
            // The third time two go, and etcd has no quorum: the servers serve from what they
            // read (fail static) while joins and renewals wait.
            let killed: Vec<usize> = if rng.below(3) == 0 {
                vec![m, (m + 1) % n]
            } else {
                vec![m]
            };
            for &k in &killed {
                etcd.kill(k);
            }
            let in_effect = run.now();
            std::thread::sleep(Duration::from_millis(3000 + rng.below(5000)));
            for &k in &killed {
                etcd.restart(k)?;
            }
            let names: Vec<String> = killed.iter().map(|k| format!("m{k}")).collect();
            let quorum = if killed.len() > n / 2 {
                " (no quorum)"
            } else {
                ""
            };
            Ok(Injected {
                target: format!("etcd {}{quorum}", names.join(" and ")),
                in_effect: Some(in_effect),
            })
        }
        "cut server from etcd" => {
            // A black hole between one server and every etcd member; the connections it had
            // stay silent after (see `crate::etcd::Gate`).
            let etcd = lab.etcd.as_ref().context("no etcd in this lab")?;
            etcd.gates[i].cut();
            let in_effect = run.now();
            std::thread::sleep(Duration::from_millis(5000 + rng.below(10_000)));
            etcd.gates[i].heal();
            Ok(Injected {
                target: format!("server-{i}"),
                in_effect: Some(in_effect),
            })
        }
        "revoke node" => revoke_node(run),
        other => bail!("unknown fault {other}"),
    }
}

/// Most victims left running: each is one more agent dialing every server.
const VICTIMS_RUNNING: usize = 3;

/// A new node joins, gets tunnels to the servers, and is revoked with `tether-server agent
/// revoke` against the datastore (etcd, or the first server's data directory, from where its
/// peers learn it), as an operator would. It keeps running (see [`Victim`]); the
/// sampler watches that no server has it again ([`revocations_broken`]).
fn revoke_node(run: &Run) -> Result<Injected> {
    let lab = &run.lab;
    let k = lock(&lab.victims).len();
    let node = format!("soak-revoked-{k}");
    let mut a = lab.joining.agent(&format!("victim-{k}"), &node)?;
    a.slot.start()?;
    // Tunnels to every server (or as many as come within 10 s): the revocation must close
    // them all.
    let _ = wait_until(
        "the victim on every server",
        Duration::from_secs(10),
        || servers_holding(lab, &node) == lab.servers.len(),
    );
    let held = servers_holding(lab, &node);
    let mut args = vec!["agent", "revoke", &node, "--data-dir"];
    let dir = lab.command_dir.to_string_lossy().into_owned();
    args.push(&dir);
    let flags = lab
        .etcd
        .as_ref()
        .map(|e| e.command_flags())
        .unwrap_or_default();
    args.extend(flags.iter().map(String::as_str));
    let revoked = run_ok(&lab.joining.server_bin, &args);
    let at = run.now();
    // Counted once revoked: a renewal from now on undoes nothing only if it is refused.
    let renewals_before = renewals_of(&lab.node, a.slot.admin).unwrap_or(0);
    let mut victims = lock(&lab.victims);
    victims.push(Victim {
        slot: a.slot,
        node: node.clone(),
        renewals_before,
    });
    let running: Vec<usize> = (0..victims.len())
        .filter(|&v| victims[v].slot.pid().is_some())
        .collect();
    for &v in running
        .iter()
        .take(running.len().saturating_sub(VICTIMS_RUNNING))
    {
        victims[v].slot.kill9();
    }
    drop(victims);
    revoked?;
    lock(&run.record).revocations.push((at, node.clone()));
    Ok(Injected {
        target: format!("{node} (held by {held} servers)"),
        in_effect: Some(at),
    })
}

/// How many servers list `node` among their connected nodes (admin `/status`).
fn servers_holding(lab: &Lab, node: &str) -> usize {
    nodes_on_servers(lab)
        .iter()
        .filter(|(_, nodes)| nodes.iter().any(|n| n == node))
        .count()
}

/// The connected nodes of each server that answers: (server index, node names).
fn nodes_on_servers(lab: &Lab) -> Vec<(usize, Vec<String>)> {
    (0..lab.servers.len())
        .filter_map(|i| {
            let admin = lock(&lab.servers[i]).admin;
            let body = lab.masters.http_get(admin, "/status").ok()?;
            let v: serde_json::Value = serde_json::from_str(&body).ok()?;
            let nodes = v
                .get("nodes")?
                .as_array()?
                .iter()
                .filter_map(|n| n.get("name")?.as_str().map(String::from))
                .collect();
            Some((i, nodes))
        })
        .collect()
}

/// An agent's renewals so far (its admin `/metrics`).
fn renewals_of(side: &Side, admin: SocketAddr) -> Option<u64> {
    let m = side.http_get(admin, "/metrics").ok()?;
    crate::procs::metric(&m, "tether_renewals_total ").map(|n| n as u64)
}

// ---------------------------------------------------------------------------------------------
// Sampling processes.

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

fn count_dir(path: &str) -> u64 {
    std::fs::read_dir(path)
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

fn sample_loop(run: Arc<Run>) {
    while !run.stopped() {
        let t = run.now();
        for (name, pid) in run.lab.pids() {
            let rss = status_field(pid, "VmRSS:").unwrap_or(0);
            let fds = count_dir(&format!("/proc/{pid}/fd"));
            let threads = count_dir(&format!("/proc/{pid}/task"));
            if rss > 0 {
                lock(&run.record).samples.push(Sample {
                    t,
                    name,
                    pid,
                    rss_kib: rss,
                    fds,
                    threads,
                });
            }
        }
        // Renewals each agent instance has made so far (its counter starts again at a restart).
        for (j, a) in run.lab.agents.iter().enumerate() {
            let (pid, admin) = {
                let a = lock(a);
                (a.slot.pid(), a.slot.admin)
            };
            let Some(pid) = pid else { continue };
            let n = renewals_of(&run.lab.node, admin).unwrap_or(0);
            let mut rec = lock(&run.record);
            let seen = rec.renewals.entry(pid).or_default();
            let new = n.saturating_sub(*seen);
            *seen = (*seen).max(n);
            for _ in 0..new {
                rec.renewed.push((t, j));
            }
        }
        sample_revoked(&run, t);
        sleep_unless_stopped(&run, SAMPLE_EVERY);
    }
}

/// Where the nodes revoked so far are seen that they must not be: on a server, or renewed.
fn sample_revoked(run: &Run, t: f64) {
    let revoked: Vec<String> = lock(&run.record)
        .revocations
        .iter()
        .map(|(_, n)| n.clone())
        .collect();
    if revoked.is_empty() {
        return;
    }
    let mut seen = Vec::new();
    for (i, nodes) in nodes_on_servers(&run.lab) {
        for n in nodes.iter().filter(|n| revoked.contains(n)) {
            seen.push((t, n.clone(), format!("connected to server-{i}")));
        }
    }
    for v in lock(&run.lab.victims).iter() {
        if v.slot.pid().is_none() || !revoked.contains(&v.node) {
            continue;
        }
        if let Some(n) = renewals_of(&run.lab.node, v.slot.admin).filter(|&n| n > v.renewals_before)
        {
            seen.push((
                t,
                v.node.clone(),
                format!("renewed its certificate ({n} renewals)"),
            ));
        }
    }
    lock(&run.record).after_revocation.extend(seen);
}

/// Sockets in CLOSE_WAIT held by `pids` (from /proc/net/tcp and tcp6, matched by inode).
/// Sockets in CLOSE_WAIT held by `pids`. Each process's own view of the tables: across a
/// `--link`, agents and servers are in namespaces of their own.
fn close_wait(pids: &[u32]) -> usize {
    let mut inodes = std::collections::BTreeSet::new();
    let files = pids
        .iter()
        .flat_map(|p| [format!("/proc/{p}/net/tcp"), format!("/proc/{p}/net/tcp6")]);
    for file in files {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.get(3) == Some(&"08") {
                if let Some(inode) = f.get(9) {
                    inodes.insert(format!("socket:[{inode}]"));
                }
            }
        }
    }
    let mut n = 0;
    for pid in pids {
        let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            continue;
        };
        for e in dir.flatten() {
            if let Ok(target) = std::fs::read_link(e.path()) {
                if inodes.contains(target.to_string_lossy().as_ref()) {
                    n += 1;
                }
            }
        }
    }
    n
}

// ---------------------------------------------------------------------------------------------
// The run and its verdict.

/// What the soak found: the report's figures and the broken promises.
pub struct Verdict {
    pub violations: Vec<String>,
    pub report: PathBuf,
}

/// The soak's own working directory, emptied: a lab built on an earlier run's certificates and
/// records would test that run's leftovers, not this one.
fn fresh_dir(work: &Path) -> Result<PathBuf> {
    if work.exists() {
        std::fs::remove_dir_all(work)
            .with_context(|| format!("remove the earlier run's {}", work.display()))?;
    }
    std::fs::create_dir_all(work).with_context(|| format!("create {}", work.display()))?;
    Ok(work.to_path_buf())
}

pub fn run(settings: Settings) -> Result<Verdict> {
    let work = fresh_dir(&settings.out.join("work"))?;
    eprintln!(
        "soak: building the lab (3 servers, {} agents) in {}",
        settings.agents,
        work.display()
    );
    let link = settings.link.map(|p| (p, settings.seed));
    let lab = Lab::build(
        &work,
        settings.agents,
        AGENT_CERT_LIFE,
        settings.etcd,
        link,
        &settings.log_level,
    )?;
    let run = Arc::new(Run {
        lab,
        record: Mutex::new(Record::default()),
        t0: Instant::now(),
        stop: AtomicBool::new(false),
        bytes: AtomicU64::new(0),
        settings: settings.clone(),
    });
    // The processes' logs are stamped with the wall clock; the record counts from t0.
    let t0_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    eprintln!(
        "soak: running for {:?} from Unix time {t0_unix:.3} (the record's 0 s)",
        settings.duration
    );
    let mut threads = Vec::new();
    let workers = 4;
    for w in 0..workers {
        let r = run.clone();
        threads.push(std::thread::spawn(move || short_load(r, w, workers)));
    }
    for w in 0..2 {
        let r = run.clone();
        threads.push(std::thread::spawn(move || bulk_load(r, w)));
    }
    for w in 0..4 {
        let r = run.clone();
        threads.push(std::thread::spawn(move || long_load(r, w)));
    }
    let r = run.clone();
    threads.push(std::thread::spawn(move || reverse_load(r)));
    let r = run.clone();
    let faults = std::thread::spawn(move || fault_loop(r));
    let r = run.clone();
    let weather = std::thread::spawn(move || link_loop(r));
    let r = run.clone();
    let sampler = std::thread::spawn(move || sample_loop(r));

    let end = Instant::now() + settings.duration;
    let mut last = Instant::now();
    while Instant::now() < end {
        std::thread::sleep(Duration::from_millis(500));
        if last.elapsed() >= Duration::from_secs(30) {
            last = Instant::now();
            let rec = lock(&run.record);
            let failed = rec.outcomes.iter().filter(|o| o.failure.is_some()).count();
            eprintln!(
                "soak: {:>5.0} s: {} connections ({failed} failed), {} faults, {} MiB checked",
                run.now(),
                rec.outcomes.len(),
                rec.faults.len(),
                run.bytes.load(Ordering::Relaxed) >> 20
            );
        }
    }
    run.stop.store(true, Ordering::Relaxed);
    let _ = faults.join();
    let _ = weather.join();
    for t in threads {
        let _ = t.join();
    }
    let _ = sampler.join();
    // Let the last closes travel, then look for sockets left half-closed. Across an edge link
    // a stream can be waiting out a blackout or a retired tunnel's grace when the load stops:
    // it is carried or reset within the blackout tolerance (30 s), and only one still half
    // closed after that is stuck.
    let pids: Vec<u32> = run.lab.pids().into_iter().map(|(_, p)| p).collect();
    let settle = if run.lab.link.is_some() {
        Duration::from_secs(40)
    } else {
        Duration::from_secs(3)
    };
    let _ = crate::procs::wait_until("half-closed sockets to close", settle, || {
        close_wait(&pids) == 0
    });
    let stuck_sockets = close_wait(&pids);
    let final_fds: Vec<(String, u64)> = run
        .lab
        .pids()
        .into_iter()
        .map(|(n, p)| (n, count_dir(&format!("/proc/{p}/fd"))))
        .collect();
    let rec = std::mem::take(&mut *lock(&run.record));
    let violations = judge_run(&rec, &settings, stuck_sockets);
    let link = run.lab.link.as_ref().map(|l| {
        let c = l.wire.counters();
        let blackouts: Vec<f64> = rec
            .faults
            .iter()
            .filter(|f| f.kind == "link blackout")
            .map(|f| f.end - f.start)
            .collect();
        format!(
            "The agents reach the servers across a `{}` link ({}): {} blackouts of {:.1} s in all, {} NAT rebindings (and those of the `rebind NAT` fault); {} MiB crossed it, {} packets were dropped by it.",
            l.profile.name,
            l.profile.describe(),
            blackouts.len(),
            blackouts.iter().sum::<f64>(),
            rec.faults.iter().filter(|f| f.kind == "link rebinding").count(),
            c.bytes() >> 20,
            c.dropped.load(Ordering::Relaxed)
        )
    });
    let report = write_report(
        &settings,
        &rec,
        &violations,
        stuck_sockets,
        &final_fds,
        link.as_deref(),
    )?;
    Ok(Verdict { violations, report })
}

/// The sampler's pace (processes' memory and files, agents' renewals).
const SAMPLE_EVERY: Duration = Duration::from_secs(2);

/// Whether a long-lived connection was closed because it outlived two renewals of its node's
/// key, which is by design: its tunnel keeps the key it was dialed with, a server accepts a key
/// only until the renewal after the one that replaced it (see docs/security.md), and a TCP
/// connection cannot move to another tunnel. With the soak's 300 s certificates that is a
/// watch of 100 to 200 s; with the default year-long ones, months. It ended, reset, when a
/// renewal of its agent was seen (within a sampling period and the second the servers take to
/// act on the records), and another renewal of that agent was seen after it began.
fn outlived_its_key(rec: &Record, o: &Outcome) -> bool {
    let lag = SAMPLE_EVERY.as_secs_f64() + 1.0;
    let of_agent = || {
        rec.renewed
            .iter()
            .filter(|(_, a)| *a == o.agent)
            .map(|(t, _)| *t)
    };
    o.kind == "long"
        && o.failure.is_some()
        && of_agent().any(|second| {
            o.end >= second - lag
                && o.end <= second + 2.0
                && of_agent().any(|first| first > o.start && first < second)
        })
}

/// How soon after its server died or went silent a long-lived connection must be reset: the
/// agent's idle timeout (~2.5 s), the trickle's pace (0.5 s) and room for a loaded machine.
const RESET_BOUND: f64 = 6.0;

/// Long-lived connections that a server's death or silence ended: (connection, seconds from
/// the fault, or from the connection's start if later, to its reset). The fault is the last
/// to begin before the connection ended, and only if it was a death or a silence: a watch
/// outlives many faults, and only the last can have ended it.
fn resets_after_death(rec: &Record) -> Vec<(&Outcome, f64)> {
    let dying = ["kill -9 server", "drop packets to server"];
    rec.outcomes
        .iter()
        .filter(|o| o.kind == "long" && o.failure.is_some() && !o.corrupt)
        .filter(|o| !outlived_its_key(rec, o))
        .filter_map(|o| {
            let f = rec
                .faults
                .iter()
                .filter(|f| f.start <= o.end)
                .max_by(|a, b| a.start.total_cmp(&b.start))?;
            let related = dying.contains(&f.kind) && f.end + RESET_BOUND >= o.start;
            related.then(|| (o, o.end - told_apart(&rec.faults, f.start.max(o.start))))
        })
        .collect()
}

/// How long an agent takes to call a server dead once the others answer (the issue's bound).
const VERDICT: f64 = 3.0;

/// When a server that died or went silent at `t` can first be told from a dead link: while
/// the link is dark every server is silent, and the agent holds its streams (up to the
/// blackout tolerance). So `t`, or the end of a link blackout under way before the verdict was
/// due. Without `--link` there are none and it is `t`.
fn told_apart(faults: &[Fault], mut t: f64) -> f64 {
    loop {
        let later = faults
            .iter()
            .filter(|f| f.kind == "link blackout" && f.start <= t + VERDICT && f.end > t)
            .map(|f| f.end)
            .fold(t, f64::max);
        if later <= t {
            return t;
        }
        t = later;
    }
}

/// How soon every server must have closed a revoked node's tunnels: a server applies a
/// revocation within a second (tests/tests/etcd.rs), or within two watch checks (4 s) when its
/// watch went silent, as it does after each `cut server from etcd`; and a loaded machine takes
/// a little more.
const REVOKE_BOUND: f64 = 6.0;

/// Each revocation: (when, node, seconds until it was last seen on a server or renewing, or
/// zero if never after the command returned).
fn revocation_times(rec: &Record) -> Vec<(f64, &str, f64)> {
    rec.revocations
        .iter()
        .map(|(at, node)| {
            let last = rec
                .after_revocation
                .iter()
                .filter(|(t, n, _)| n == node && t >= at)
                .map(|(t, _, _)| t - at)
                .fold(0.0, f64::max);
            (*at, node.as_str(), last)
        })
        .collect()
}

/// Revocations that did not hold: a revoked node still on a server, or renewing, after
/// [`REVOKE_BOUND`].
fn revocations_broken(rec: &Record) -> Vec<String> {
    rec.revocations
        .iter()
        .filter_map(|(at, node)| {
            let late: Vec<&(f64, String, String)> = rec
                .after_revocation
                .iter()
                .filter(|(t, n, _)| n == node && *t > at + REVOKE_BOUND)
                .collect();
            let (t, _, what) = late.first()?;
            Some(format!(
                "{node}, revoked at {at:.1} s, was still {what} at {t:.1} s ({} sightings after the {REVOKE_BOUND} s bound, the last at {:.1} s)",
                late.len(),
                late.last().map(|l| l.0).unwrap_or(*t)
            ))
        })
        .collect()
}

fn judge_run(rec: &Record, s: &Settings, close_wait: usize) -> Vec<String> {
    let mut v = revocations_broken(rec);
    for (o, took) in resets_after_death(rec) {
        if took > RESET_BOUND {
            v.push(format!(
                "long connection {:.1}-{:.1} s through agent-{} was reset {took:.1} s after its server died or went silent (bound {RESET_BOUND} s)",
                o.start, o.end, o.agent
            ));
        }
    }
    for o in &rec.outcomes {
        if o.corrupt {
            v.push(format!(
                "{} connection at {:.1} s: corrupted ({})",
                o.kind,
                o.start,
                o.failure.as_deref().unwrap_or("")
            ));
            continue;
        }
        let Some(why) = &o.failure else { continue };
        if explanation(&rec.faults, o).is_none() && !outlived_its_key(rec, o) {
            v.push(format!(
                "{} connection {:.1}-{:.1} s through agent-{} failed with no fault to explain it: {why}",
                o.kind, o.start, o.end, o.agent
            ));
        }
    }
    if rec.outcomes.iter().filter(|o| o.failure.is_none()).count() == 0 {
        v.push("no connection succeeded".into());
    }
    if close_wait > 0 {
        v.push(format!(
            "{close_wait} sockets left in CLOSE_WAIT after the load"
        ));
    }
    // Memory and files flat after warm-up, per process instance that lived long enough.
    let warm = s.warmup.as_secs_f64();
    for ((name, pid), samples) in &instances(&rec.samples) {
        let (Some(first), Some(last)) = (samples.first(), samples.last()) else {
            continue;
        };
        let Some(base) = samples.iter().find(|x| x.t >= first.t + warm) else {
            continue;
        };
        // The second half of the instance's life after warm-up.
        let late: Vec<&&Sample> = samples
            .iter()
            .filter(|x| x.t >= base.t + (last.t - base.t) / 2.0)
            .collect();
        let max_rss = late.iter().map(|x| x.rss_kib).max().unwrap_or(0);
        let max_fds = late.iter().map(|x| x.fds).max().unwrap_or(0);
        // Tolerance: half again the warm RSS plus 32 MiB (allocator arenas and windows fill
        // and empty with the load), and 64 files (connections in flight).
        if max_rss > base.rss_kib * 3 / 2 + 32 * 1024 {
            v.push(format!(
                "{name} (pid {pid}) grew from {} MiB after warm-up to {} MiB",
                base.rss_kib >> 10,
                max_rss >> 10
            ));
        }
        if max_fds > base.fds + 64 {
            v.push(format!(
                "{name} (pid {pid}) open files grew from {} to {max_fds}",
                base.fds
            ));
        }
    }
    v
}

fn write_report(
    s: &Settings,
    rec: &Record,
    violations: &[String],
    close_wait: usize,
    final_fds: &[(String, u64)],
    link: Option<&str>,
) -> Result<PathBuf> {
    use std::fmt::Write as _;
    let mut md = String::new();
    let _ = writeln!(md, "# tether soak report\n");
    let _ = writeln!(
        md,
        "Duration {:?}, seed {}, 3 servers ({}, each with its own upstream), {} agents; a fault every ~{:?}. Chart: chart.svg.\n",
        s.duration,
        s.seed,
        if s.etcd {
            "sharing their state through a three-member etcd"
        } else {
            "peered"
        },
        s.agents,
        s.fault_every
    );
    if let Some(link) = link {
        let _ = writeln!(md, "{link}\n");
    }
    let verdict = if violations.is_empty() {
        "PASS"
    } else {
        "FAIL"
    };
    let _ = writeln!(md, "**{verdict}**\n");
    for v in violations {
        let _ = writeln!(md, "- {v}");
    }
    let _ = writeln!(md, "\n## Connections\n");
    let _ = writeln!(
        md,
        "| kind | connections | ok | failed (explained by a fault) | corrupted | MiB checked |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|");
    for kind in ["short", "bulk", "long", "reverse"] {
        let all: Vec<&Outcome> = rec.outcomes.iter().filter(|o| o.kind == kind).collect();
        let ok = all.iter().filter(|o| o.failure.is_none()).count();
        let corrupt = all.iter().filter(|o| o.corrupt).count();
        let bytes: u64 = all.iter().map(|o| o.bytes).sum();
        let _ = writeln!(
            md,
            "| {kind} | {} | {ok} | {} | {corrupt} | {} |",
            all.len(),
            all.len() - ok - corrupt,
            bytes >> 20
        );
    }
    let resets: Vec<f64> = resets_after_death(rec).iter().map(|r| r.1).collect();
    if !resets.is_empty() {
        let max = resets.iter().copied().fold(0.0, f64::max);
        let mean = resets.iter().sum::<f64>() / resets.len() as f64;
        let _ = writeln!(
            md,
            "\nLong-lived connections on a server killed or cut off: {} reset, {mean:.1} s after the fault on average, {max:.1} s at most (bound {RESET_BOUND} s).",
            resets.len()
        );
    }
    let outlived = rec
        .outcomes
        .iter()
        .filter(|o| outlived_its_key(rec, o))
        .count();
    if outlived > 0 {
        let _ = writeln!(
            md,
            "\nLong-lived connections closed because they outlived two renewals of their node's key (by design; see docs/reliability.md): {outlived}."
        );
    }
    let revocations = revocation_times(rec);
    if !revocations.is_empty() {
        let max = revocations.iter().map(|r| r.2).fold(0.0, f64::max);
        let _ = writeln!(
            md,
            "\nRevocations made during the run: {}. Each revoked node was last seen on a server (or renewing) {max:.1} s after its revocation at most (looked for every {} s; bound {REVOKE_BOUND} s). Revocations that did not hold: {}.",
            revocations.len(),
            SAMPLE_EVERY.as_secs(),
            revocations_broken(rec).len()
        );
    }
    let _ = writeln!(md, "\n## Faults\n");
    let _ = writeln!(
        md,
        "| at (s) | fault | target | took (s) | failed connections it explains |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|");
    for f in &rec.faults {
        let failed = rec
            .outcomes
            .iter()
            .filter(|o| {
                o.failure.is_some()
                    && !o.corrupt
                    && explanation(&rec.faults, o).is_some_and(|e| std::ptr::eq(e, f))
            })
            .count();
        let _ = writeln!(
            md,
            "| {:.1} | {} | {} | {:.1} | {failed} |",
            f.start,
            f.kind,
            f.target,
            f.end - f.start
        );
    }
    let _ = writeln!(md, "\n## Failed connections and their causes\n");
    let mut causes: BTreeMap<String, usize> = BTreeMap::new();
    for o in rec.outcomes.iter().filter(|o| o.failure.is_some()) {
        let fault = if outlived_its_key(rec, o) {
            "outlived two renewals of its key"
        } else {
            explanation(&rec.faults, o)
                .map(|f| f.kind)
                .unwrap_or("NO FAULT")
        };
        let why = o.failure.as_deref().unwrap_or("");
        let why: String = why
            .split(':')
            .next()
            .unwrap_or(why)
            .chars()
            .take(60)
            .collect();
        *causes
            .entry(format!("{} | {fault} | {why}", o.kind))
            .or_default() += 1;
    }
    let _ = writeln!(md, "| kind | fault | error | count |");
    let _ = writeln!(md, "|---|---|---|---|");
    for (k, n) in &causes {
        let _ = writeln!(md, "| {k} | {n} |");
    }
    let _ = writeln!(md, "\n## Processes\n");
    let _ = writeln!(md, "| process | pid | RSS first / after warm-up / max / last (MiB) | open files first / max / last | threads max |");
    let _ = writeln!(md, "|---|---|---|---|---|");
    for ((name, pid), x) in &instances(&rec.samples) {
        let (Some(first), Some(last)) = (x.first(), x.last()) else {
            continue;
        };
        let warm = x
            .iter()
            .find(|y| y.t >= first.t + s.warmup.as_secs_f64())
            .map(|y| format!("{:.1}", y.rss_kib as f64 / 1024.0))
            .unwrap_or_else(|| "-".into());
        let max_rss = x.iter().map(|y| y.rss_kib).max().unwrap_or(0);
        let max_fds = x.iter().map(|y| y.fds).max().unwrap_or(0);
        let max_th = x.iter().map(|y| y.threads).max().unwrap_or(0);
        let _ = writeln!(
            md,
            "| {name} | {pid} | {:.1} / {warm} / {:.1} / {:.1} | {} / {max_fds} / {} | {max_th} |",
            first.rss_kib as f64 / 1024.0,
            max_rss as f64 / 1024.0,
            last.rss_kib as f64 / 1024.0,
            first.fds,
            last.fds
        );
    }
    let _ = writeln!(
        md,
        "\nAgent certificate renewals during the run (each agent renews about every {} s): {}.",
        AGENT_CERT_LIFE.as_secs() / 3,
        rec.renewals.values().sum::<u64>()
    );
    let _ = writeln!(
        md,
        "\nSockets in CLOSE_WAIT after the load: {close_wait}. Open files at the end: {}.",
        final_fds
            .iter()
            .map(|(n, f)| format!("{n} {f}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    std::fs::write(s.out.join("report.md"), md)?;
    let mut csv = String::from("kind,agent,start_s,end_s,bytes,corrupt,failure\n");
    for o in &rec.outcomes {
        let _ = writeln!(
            csv,
            "{},{},{:.3},{:.3},{},{},{}",
            o.kind,
            o.agent,
            o.start,
            o.end,
            o.bytes,
            o.corrupt,
            o.failure.as_deref().unwrap_or("").replace(',', ";")
        );
    }
    std::fs::write(s.out.join("connections.csv"), csv)?;
    let mut csv = String::from("kind,target,start_s,in_effect_s,end_s\n");
    for f in &rec.faults {
        let _ = writeln!(
            csv,
            "{},{},{:.3},{:.3},{:.3}",
            f.kind,
            f.target.replace(',', ";"),
            f.start,
            f.in_effect,
            f.end
        );
    }
    std::fs::write(s.out.join("faults.csv"), csv)?;
    std::fs::write(s.out.join("chart.svg"), chart(s, rec))?;
    Ok(s.out.join("report.md"))
}

/// Two panels over time: connections per 5 s (checked, failed) and RSS per process; faults as
/// vertical marks with their kind.
fn chart(s: &Settings, rec: &Record) -> Vec<u8> {
    let (w, h) = (1000i64, 620i64);
    let mut c = Canvas::new(w as usize, h as usize);
    let (left, right) = (70i64, w - 20);
    let total = s.duration.as_secs_f64().max(1.0);
    let x_of = |t: f64| left + ((t / total) * (right - left) as f64) as i64;
    c.text(left, 6, "tether soak: connections per 5 s (grey: checked, red: failed); RSS per process; faults marked", 2, INK);
    let panels = [(40i64, 260i64), (330i64, 260i64)];
    for (top, ph) in panels {
        c.line((left, top + ph), (right, top + ph), INK);
        c.line((left, top), (left, top + ph), INK);
        for f in &rec.faults {
            let x = x_of(f.start);
            c.line((x, top), (x, top + ph), GRID);
        }
    }
    // Connections per 5 s bucket.
    let buckets = (total / 5.0).ceil() as usize + 1;
    let mut ok = vec![0u64; buckets];
    let mut failed = vec![0u64; buckets];
    for o in &rec.outcomes {
        let b = ((o.end / 5.0) as usize).min(buckets - 1);
        if o.failure.is_some() {
            failed[b] += 1;
        } else {
            ok[b] += 1;
        }
    }
    let top_n = ok
        .iter()
        .chain(failed.iter())
        .copied()
        .max()
        .unwrap_or(1)
        .max(1);
    let (top, ph) = panels[0];
    c.text(4, top, &format!("{top_n}"), 1, INK);
    let bw = ((right - left) as f64 / buckets as f64).max(1.0) as i64;
    for b in 0..buckets {
        let x = x_of(b as f64 * 5.0);
        let hk = (ok[b] as f64 / top_n as f64 * ph as f64) as i64;
        c.rect(x, top + ph - hk, bw.max(1), hk, SERIES[0]);
        let hf = (failed[b] as f64 / top_n as f64 * ph as f64) as i64;
        c.rect(x, top + ph - hf, bw.max(1), hf, 6);
    }
    // RSS per process name.
    let (top, ph) = panels[1];
    let max_rss = rec
        .samples
        .iter()
        .map(|x| x.rss_kib)
        .max()
        .unwrap_or(1)
        .max(1);
    c.text(4, top, &format!("{} MiB", max_rss >> 10), 1, INK);
    let mut names: Vec<&String> = rec.samples.iter().map(|x| &x.name).collect();
    names.sort();
    names.dedup();
    for (k, name) in names.iter().enumerate() {
        let colour = SERIES[1 + k % (SERIES.len() - 1)];
        let pts: Vec<(i64, i64)> = rec
            .samples
            .iter()
            .filter(|x| &x.name == *name)
            .map(|x| {
                let y = x.rss_kib as f64 / max_rss as f64 * ph as f64;
                (x_of(x.t), top + ph - y as i64)
            })
            .collect();
        for pair in pts.windows(2) {
            c.line(pair[0], pair[1], colour);
        }
        c.text(
            left + 10 + (k as i64 % 5) * 180,
            top + ph + 14 + (k as i64 / 5) * 12,
            name,
            1,
            colour,
        );
    }
    for (i, f) in rec.faults.iter().enumerate() {
        let x = x_of(f.start);
        c.text(
            x + 2,
            600 - (i as i64 % 3) * 10,
            f.kind.split(' ').next().unwrap_or(""),
            1,
            INK,
        );
    }
    c.text(
        right - 60,
        panels[1].0 + panels[1].1 + 40,
        &format!("{:.0} s", total),
        1,
        INK,
    );
    c.encode()
}

// ---------------------------------------------------------------------------------------------
// Disconnected for long: an agent whose servers are all gone.

/// An agent whose servers are all unreachable for `outage` while local clients keep
/// connecting: each must be refused at once, the agent's memory and open files must stay
/// flat, and when one server returns the agent must carry traffic again within seconds.
pub fn disconnected(settings: &Settings, outage: Duration) -> Result<Verdict> {
    use std::fmt::Write as _;
    let work = fresh_dir(&settings.out.join("work-disconnected"))?;
    // Certificates that outlive the outage: an agent whose certificate expired while it was
    // cut off must join again, which is not what this scenario looks at.
    let lab = Lab::build(
        &work,
        1,
        outage + Duration::from_secs(3600),
        false,
        None,
        &settings.log_level,
    )?;
    for s in &lab.servers {
        lock(s).kill9();
    }
    let (api, admin, pid) = {
        let a = lock(&lab.agents[0]);
        (
            a.api,
            a.slot.admin,
            a.slot.pid().context("the agent is not running")?,
        )
    };
    // Connections made while the agent has not yet noticed wait for that; the promise is
    // about the outage once it is known. Every server silent at once looks like a dead link,
    // which the agent sits out for its blackout tolerance (30 s by default) before it gives
    // its tunnels up.
    wait_until(
        "the agent notices",
        BLACKOUT_TOLERANCE + Duration::from_secs(15),
        || {
            lab.node
                .http_get(admin, "/metrics")
                .ok()
                .and_then(|m| crate::procs::metric(&m, "tether_tunnels_up "))
                == Some(0.0)
        },
    )?;
    // A connection in the first moments of the outage waits out the grace (a gap between
    // tunnels may end in it), and is then refused; after the grace, refusals come at once.
    let in_grace = Instant::now();
    let first = exchange(&lab.node, api, Arc::new(b"anyone?".to_vec()));
    let grace_wait = in_grace.elapsed();
    let mut violations = Vec::new();
    if first.is_ok_and(|b| !b.is_empty()) {
        violations.push("a local connection was answered with no server up".to_string());
    }
    if grace_wait > GRACE + Duration::from_secs(1) {
        violations.push(format!(
            "a connection at the start of the outage waited {grace_wait:?}, over the {GRACE:?} grace"
        ));
    }
    // The grace counts from the loss of the last tunnel, which came before the notice: once
    // this connection is refused, it is over.
    eprintln!("soak: every server killed; local clients keep connecting for {outage:?}");
    let t0 = Instant::now();
    let (mut refused, mut slow, mut answered) = (0u64, Vec::new(), 0u64);
    let mut samples: Vec<(f64, u64, u64)> = Vec::new();
    let mut next_sample = Instant::now();
    while t0.elapsed() < outage {
        if Instant::now() >= next_sample {
            let rss = status_field(pid, "VmRSS:").unwrap_or(0);
            samples.push((
                t0.elapsed().as_secs_f64(),
                rss,
                count_dir(&format!("/proc/{pid}/fd")),
            ));
            next_sample += Duration::from_secs(2);
        }
        let start = Instant::now();
        let outcome = (|| -> std::io::Result<usize> {
            let mut c = connect(&lab.node, api)?;
            c.set_read_timeout(Some(Duration::from_secs(5)))?;
            let _ = c.write_all(b"are you there?\n");
            let mut b = [0u8; 64];
            c.read(&mut b)
        })();
        let took = start.elapsed();
        match outcome {
            Ok(n) if n > 0 => answered += 1,
            _ if took > Duration::from_secs(1) => slow.push(took),
            _ => refused += 1,
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    lock(&lab.servers[0]).start()?;
    let back = Instant::now();
    let data = Arc::new(b"hello again".to_vec());
    let mut reconnected = None;
    while back.elapsed() < Duration::from_secs(60) {
        if exchange(&lab.node, api, data.clone()).is_ok_and(|b| b == *data) {
            reconnected = Some(back.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    if !slow.is_empty() {
        violations.push(format!(
            "{} local connections waited over 1 s for their refusal (longest {:?})",
            slow.len(),
            slow.iter().max().copied().unwrap_or_default()
        ));
    }
    if answered > 0 {
        violations.push(format!(
            "{answered} local connections were answered with no server up"
        ));
    }
    let base = samples
        .iter()
        .find(|x| x.0 >= outage.as_secs_f64() / 10.0)
        .or(samples.first())
        .copied()
        .unwrap_or_default();
    let (max_rss, max_fds) = samples
        .iter()
        .fold((0, 0), |(r, f), x| (r.max(x.1), f.max(x.2)));
    if max_rss > base.1 + 16 * 1024 {
        violations.push(format!(
            "the agent grew from {} to {} MiB while disconnected",
            base.1 >> 10,
            max_rss >> 10
        ));
    }
    if max_fds > base.2 + 16 {
        violations.push(format!(
            "the agent's open files grew from {} to {max_fds} while disconnected",
            base.2
        ));
    }
    match reconnected {
        Some(t) if t <= Duration::from_secs(10) => {}
        Some(t) => violations.push(format!("the agent took {t:?} to carry traffic again")),
        None => violations.push("the agent did not carry traffic again within 60 s".into()),
    }
    let mut md = String::new();
    let _ = writeln!(md, "# tether soak: disconnected for {outage:?}\n");
    let verdict = if violations.is_empty() {
        "PASS"
    } else {
        "FAIL"
    };
    let _ = writeln!(md, "**{verdict}**\n");
    for v in &violations {
        let _ = writeln!(md, "- {v}");
    }
    let _ = writeln!(
        md,
        "\n| figure | value |\n|---|---|\n| a connection at the start of the outage, refused after (grace {GRACE:?}) | {:.2} s |\n| local connections refused at once after the grace | {refused} |\n| refused after more than 1 s | {} |\n| agent RSS after warm-up / max (MiB) | {:.1} / {:.1} |\n| agent open files after warm-up / max | {} / {max_fds} |\n| traffic again after one server returned | {} |",
        grace_wait.as_secs_f64(),
        slow.len(),
        base.1 as f64 / 1024.0,
        max_rss as f64 / 1024.0,
        base.2,
        reconnected.map_or("never".to_string(), |t| format!("{:.2} s", t.as_secs_f64()))
    );
    let report = settings.out.join("report-disconnected.md");
    std::fs::write(&report, md)?;
    Ok(Verdict { violations, report })
}

/// The reconnect storm's report and verdict (see `scale::storm`).
pub fn storm(settings: &Settings, agents: usize) -> Result<Verdict> {
    use std::fmt::Write as _;
    let work = fresh_dir(&settings.out.join("work-storm"))?;
    let pki = crate::path::Pki::create(&work)?;
    let up = crate::load::Upstream::start()?;
    let mut md = String::from("# tether soak: reconnect storm\n\n| transport | agents | back | seconds until all back | server peak CPU | server peak RSS (MiB) |\n|---|---|---|---|---|---|\n");
    let mut violations = Vec::new();
    for transport in ["quic", "tcp"] {
        eprintln!("soak: {agents} simulated agents over {transport}; the server is killed and started again");
        let s = crate::scale::storm(
            &work,
            &pki,
            &up,
            transport,
            agents,
            Duration::from_millis(500),
        )?;
        let _ = writeln!(
            md,
            "| {transport} | {} | {} | {:.2} | {:.0}% | {:.1} |",
            s.agents,
            s.back,
            s.seconds_to_all_back,
            s.peak_cpu_percent,
            s.peak_rss_kb as f64 / 1024.0
        );
        if s.back < s.agents {
            violations.push(format!(
                "{transport}: {} of {} agents back after {:.0} s",
                s.back, s.agents, s.seconds_to_all_back
            ));
        }
    }
    let verdict = if violations.is_empty() {
        "PASS"
    } else {
        "FAIL"
    };
    let _ = writeln!(md, "\n**{verdict}**");
    for v in &violations {
        let _ = writeln!(md, "- {v}");
    }
    let report = settings.out.join("report-storm.md");
    std::fs::write(&report, md)?;
    Ok(Verdict { violations, report })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_explained_only_by_what_the_fault_took_away() {
        let kill = Fault {
            kind: "kill -9 server",
            target: "server-1".into(),
            start: 10.0,
            in_effect: 10.05,
            end: 13.0,
        };
        // A new connection: only when it was in flight at the kill.
        assert!(may_fail(&kill, "short", 9.9, 12.5));
        assert!(may_fail(&kill, "bulk", 5.0, 12.5));
        assert!(
            may_fail(&kill, "short", 10.01, 12.5),
            "began as the kill was being sent"
        );
        assert!(
            !may_fail(&kill, "short", 10.5, 12.5),
            "began after the kill"
        );
        assert!(!may_fail(&kill, "short", 18.0, 18.5));
        assert!(!may_fail(&kill, "short", 1.0, 2.0));
        // A watch or a CONNECT: in the fault's window, and a while after it.
        assert!(may_fail(&kill, "long", 1.0, 12.5));
        assert!(may_fail(&kill, "reverse", 18.0, 18.5));
        assert!(!may_fail(&kill, "reverse", 20.0, 21.0));
        let block = Fault {
            kind: "block UDP",
            ..kill.clone()
        };
        assert!(may_fail(&block, "bulk", 9.0, 12.0));
        assert!(
            !may_fail(&block, "short", 11.0, 13.5),
            "began during the block"
        );
        let stopped = Fault {
            kind: "stop upstream",
            ..kill.clone()
        };
        assert!(may_fail(&stopped, "short", 9.8, 10.1));
        assert!(!may_fail(&stopped, "short", 11.0, 11.1));
        let drain = Fault {
            kind: "drain server",
            ..kill.clone()
        };
        assert!(!may_fail(&drain, "short", 9.0, 12.5));
        assert!(may_fail(&drain, "long", 9.0, 12.5));
        let agent = Fault {
            kind: "restart agent",
            ..kill.clone()
        };
        assert!(
            may_fail(&agent, "short", 12.0, 12.1),
            "refused while its agent was down"
        );
        // A restart explains failures through that agent only.
        let agent = Fault {
            target: "agent-1".into(),
            ..agent
        };
        let through = |a| Outcome {
            kind: "short",
            start: 12.0,
            end: 12.1,
            bytes: 0,
            failure: Some("reset".into()),
            corrupt: false,
            agent: a,
        };
        let faults = [agent.clone()];
        assert!(explanation(&faults, &through(1)).is_some());
        assert!(explanation(&faults, &through(0)).is_none());
        let rebind = Fault {
            kind: "rebind NAT",
            ..kill
        };
        assert!(!may_fail(&rebind, "long", 9.0, 12.5));
    }

    #[test]
    fn a_corrupt_or_unexplained_connection_fails_the_run() {
        let s = Settings::new(Duration::from_secs(60), true, 1, PathBuf::new());
        let ok = judge("short", 1.0, 1.1, 0, b"abc", Ok(b"abc".to_vec()));
        assert!(ok.failure.is_none());
        let short = judge("short", 1.0, 1.1, 0, b"abc", Ok(b"ab".to_vec()));
        assert!(short.failure.is_some() && !short.corrupt);
        let bad = judge("short", 1.0, 1.1, 0, b"abc", Ok(b"abd".to_vec()));
        assert!(bad.corrupt);
        let rec = Record {
            outcomes: vec![ok.clone(), short],
            ..Default::default()
        };
        assert_eq!(judge_run(&rec, &s, 0).len(), 1, "the unexplained failure");
        let rec = Record {
            outcomes: vec![ok, bad],
            ..Default::default()
        };
        assert!(
            judge_run(&rec, &s, 2).len() == 2,
            "corruption and CLOSE_WAIT"
        );
    }

    #[test]
    fn a_revoked_node_seen_after_its_bound_fails_the_run() {
        let s = Settings::new(Duration::from_secs(60), true, 1, PathBuf::new());
        let ok = judge("short", 1.0, 1.1, 0, b"abc", Ok(b"abc".to_vec()));
        let seen = |t: f64, what: &str| (t, "soak-revoked-0".to_string(), what.to_string());
        let mut rec = Record {
            outcomes: vec![ok],
            revocations: vec![(10.0, "soak-revoked-0".into())],
            // Still on a server just after the command returned: within the bound.
            after_revocation: vec![seen(11.0, "connected to server-1")],
            ..Default::default()
        };
        assert!(judge_run(&rec, &s, 0).is_empty());
        assert_eq!(revocation_times(&rec)[0].2, 1.0);
        // On a server, or renewing, after it: the revocation did not hold.
        for what in [
            "connected to server-2",
            "renewed its certificate (2 renewals)",
        ] {
            rec.after_revocation = vec![seen(10.0 + REVOKE_BOUND + 2.0, what)];
            let v = judge_run(&rec, &s, 0);
            assert!(v.len() == 1 && v[0].contains(what), "{v:?}");
        }
    }

    #[test]
    fn a_long_connection_reset_late_after_its_server_died_fails_the_run() {
        let s = Settings::new(Duration::from_secs(60), true, 1, PathBuf::new());
        let long = |end: f64| Outcome {
            kind: "long",
            start: 1.0,
            end,
            bytes: 64,
            failure: Some("read: connection reset".into()),
            corrupt: false,
            agent: 0,
        };
        let kill = Fault {
            kind: "kill -9 server",
            target: "server-0".into(),
            start: 10.0,
            in_effect: 10.05,
            end: 13.0,
        };
        // One connection that succeeded, so that the run as a whole is not refused for that.
        let ok = judge("short", 1.0, 1.1, 0, b"abc", Ok(b"abc".to_vec()));
        let prompt = Record {
            outcomes: vec![ok.clone(), long(12.8)],
            faults: vec![kill.clone()],
            ..Default::default()
        };
        assert!(judge_run(&prompt, &s, 0).is_empty());
        let late = Record {
            outcomes: vec![ok.clone(), long(18.5)],
            faults: vec![kill.clone()],
            ..Default::default()
        };
        let v = judge_run(&late, &s, 0);
        assert!(v.len() == 1 && v[0].contains("reset 8.5 s after"), "{v:?}");
        // A watch that outlived a kill on another server and ended with a later one: judged
        // by the later kill only.
        let later = Fault {
            start: 40.0,
            in_effect: 40.05,
            end: 43.0,
            ..kill.clone()
        };
        let outlived = Record {
            outcomes: vec![ok.clone(), long(42.0)],
            faults: vec![kill.clone(), later],
            ..Default::default()
        };
        assert!(judge_run(&outlived, &s, 0).is_empty());
        // Reset 8.5 s after a kill, but as its agent renewed for the second time since it
        // began: its tunnel's key was no longer good, which is by design.
        let rotated = |renewed: Vec<(f64, usize)>| Record {
            outcomes: vec![ok.clone(), long(18.5)],
            faults: vec![kill.clone()],
            renewed,
            ..Default::default()
        };
        assert!(judge_run(&rotated(vec![(5.0, 0), (19.0, 0)]), &s, 0).is_empty());
        let once = judge_run(&rotated(vec![(19.0, 0)]), &s, 0);
        assert!(
            once.len() == 1,
            "one renewal leaves the tunnel good: {once:?}"
        );
        let other = judge_run(&rotated(vec![(5.0, 1), (19.0, 1)]), &s, 0);
        assert!(other.len() == 1, "another agent's renewals: {other:?}");
    }

    #[test]
    fn payloads_are_deterministic() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        let (mut x, mut y) = ([0u8; 13], [0u8; 13]);
        a.fill(&mut x);
        b.fill(&mut y);
        assert_eq!(x, y);
        assert!(a.below(10) < 10);
    }
}
