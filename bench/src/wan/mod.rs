//! `tether-bench wan`: tether across emulated edge links, beside what users would run instead,
//! over the same link in the same run.
//!
//! For each profile the lab ([`lab`]) builds a node and a masters namespace joined by a
//! user-space wire with the profile's delay, jitter, loss, rate, queue, blackouts and NAT
//! rebinding ([`shape`], [`nat`]). On it, one path after another:
//! - `direct`: the node's client straight to the upstream (the kernel's default congestion
//!   control), and `direct-cubic` (cubic, the default of most distributions);
//! - `ssh`: `ssh -L` (one multiplexed connection, aes128-gcm);
//! - `quic` and `tcp`: tether-agent in the node, tether-server in the masters, each transport.
//!
//! Figures per path: bulk with 1 and 8 streams; round trips (64 bytes) idle and while a bulk
//! stream shares the path (for tether: the same tunnel); which blackouts an open connection
//! survives; CPU per GB moved (tether's two processes). Per transport, with three peered
//! servers: the link bytes an idle node sends a minute, per tunnel, and then, while one server
//! is killed with -9, how many new connections fail and how long the slowest takes (the time to
//! move new connections off a dead server). The report (report.md, results.json, chart.svg)
//! goes to `--out`.

pub mod lab;
pub mod nat;
mod paths;
mod report;
pub mod shape;

use paths::*;
use report::*;

use crate::load::{self, percentile, Upstream};
use crate::path::Pki;
use crate::procs::{http_get, metric, sibling, usage_of, wait_until, Proc};
use anyhow::{bail, Context, Result};
use lab::{in_ns, Lab, MASTERS_IP};
use serde::Serialize;
use shape::{Blackouts, Shape};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(clap::Args, Debug)]
pub struct WanArgs {
    /// Profiles to run, comma-separated: lan, regional, continental, cellular, satellite.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "lan,regional,continental,cellular,satellite"
    )]
    profiles: Vec<String>,
    /// Paths to measure, comma-separated: direct, direct-cubic, ssh, quic, tcp.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,direct-cubic,ssh,quic,tcp"
    )]
    paths: Vec<String>,
    /// Seconds of each bulk and round-trip run.
    #[arg(long, default_value_t = 8.0)]
    secs: f64,
    /// Blackouts to try an open connection through, in seconds, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "2,6,20,30")]
    blackouts: Vec<f64>,
    /// Seconds over which an idle node's link bytes are counted (scaled to a minute).
    #[arg(long, default_value_t = 60.0)]
    idle_secs: f64,
    /// For CI: the lan profile, short runs, one blackout; the figures mean little.
    #[arg(long)]
    smoke: bool,
    /// More arguments for every tether-agent (e.g. --blackout-tolerance 30s).
    #[arg(long, allow_hyphen_values = true)]
    agent_arg: Vec<String>,
    /// More arguments for every tether-server.
    #[arg(long, allow_hyphen_values = true)]
    server_arg: Vec<String>,
    /// Seed of the link's loss and jitter.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where report.md, results.json, chart.svg and the logs go (default: target/wan/TIME).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// A link profile: the shape of each direction and the events of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Profile {
    pub name: &'static str,
    pub rtt_ms: u64,
    pub jitter_ms: u64,
    pub loss: f64,
    pub burst: f64,
    pub rate_mbps: u64,
    pub queue_ms: u64,
    /// A blackout of `blackout_len` seconds every `blackout_every` seconds (0: none).
    pub blackout_every_s: u64,
    pub blackout_len_s: (u64, u64),
    /// A NAT rebinding every this many seconds (0: no NAT).
    pub rebind_every_s: u64,
}

pub const PROFILES: [Profile; 5] = [
    Profile {
        name: "lan",
        rtt_ms: 1,
        jitter_ms: 0,
        loss: 0.0,
        burst: 1.0,
        rate_mbps: 0,
        queue_ms: 5,
        blackout_every_s: 0,
        blackout_len_s: (0, 0),
        rebind_every_s: 0,
    },
    Profile {
        name: "regional",
        rtt_ms: 30,
        jitter_ms: 0,
        loss: 0.001,
        burst: 1.0,
        rate_mbps: 200,
        queue_ms: 30,
        blackout_every_s: 0,
        blackout_len_s: (0, 0),
        rebind_every_s: 0,
    },
    Profile {
        name: "continental",
        rtt_ms: 100,
        jitter_ms: 0,
        loss: 0.01,
        burst: 1.0,
        rate_mbps: 50,
        queue_ms: 100,
        blackout_every_s: 0,
        blackout_len_s: (0, 0),
        rebind_every_s: 0,
    },
    Profile {
        name: "cellular",
        rtt_ms: 60,
        jitter_ms: 20,
        loss: 0.02,
        burst: 2.0,
        rate_mbps: 20,
        queue_ms: 150,
        blackout_every_s: 60,
        blackout_len_s: (1, 5),
        rebind_every_s: 180,
    },
    Profile {
        name: "satellite",
        rtt_ms: 600,
        jitter_ms: 0,
        loss: 0.01,
        burst: 1.0,
        rate_mbps: 20,
        queue_ms: 300,
        blackout_every_s: 0,
        blackout_len_s: (0, 0),
        rebind_every_s: 0,
    },
];

impl Profile {
    pub fn by_name(name: &str) -> Result<&'static Profile> {
        PROFILES.iter().find(|p| p.name == name).with_context(|| {
            format!("no link profile {name:?} (lan, regional, continental, cellular, satellite)")
        })
    }

    /// The shape of one direction (both directions are alike).
    pub fn shape(&self) -> Shape {
        let ms = Duration::from_millis;
        Shape {
            delay: Duration::from_micros(self.rtt_ms * 500),
            jitter: ms(self.jitter_ms) / 2,
            loss: self.loss,
            burst: self.burst,
            rate_bps: self.rate_mbps * 1_000_000,
            queue: ms(self.queue_ms),
        }
    }

    /// The profile's own blackouts over a run of `horizon`.
    pub fn blackouts(&self, horizon: Duration, seed: u64) -> Blackouts {
        Blackouts::periodic(
            Duration::from_secs(self.blackout_every_s),
            (
                Duration::from_secs(self.blackout_len_s.0),
                Duration::from_secs(self.blackout_len_s.1),
            ),
            horizon,
            seed,
        )
    }

    pub fn describe(&self) -> String {
        let mut s = format!("RTT {} ms", self.rtt_ms);
        if self.jitter_ms > 0 {
            s += &format!(" ± {} ms", self.jitter_ms / 2);
        }
        s += &format!(", {}% loss", self.loss * 100.0);
        if self.burst > 1.0 {
            s += &format!(" (bursts of {})", self.burst);
        }
        if self.rate_mbps > 0 {
            s += &format!(", {} Mbit/s, queue {} ms", self.rate_mbps, self.queue_ms);
        }
        if self.blackout_every_s > 0 {
            s += &format!(
                ", a {}-{} s blackout every {} s",
                self.blackout_len_s.0, self.blackout_len_s.1, self.blackout_every_s
            );
        }
        if self.rebind_every_s > 0 {
            s += &format!(", a NAT rebinding every {} s", self.rebind_every_s);
        }
        s
    }
}

/// Fixed ports: every lab has namespaces of its own, so nothing else holds them.
const ECHO_PORT: u16 = 7000;
const SINK_PORT: u16 = 7001;
const SERVER_PORTS: [u16; 3] = [9443, 9444, 9445];
const SERVER_ADMIN: u16 = 9200;
const AGENT_API: u16 = 6443;
const AGENT_BULK: u16 = 6444;
const AGENT_ADMIN: u16 = 9100;
const SSH_PORT: u16 = 2222;
const SSH_ECHO: u16 = 6501;
const SSH_SINK: u16 = 6502;

/// Where a path's clients connect, in the node's namespace.
#[derive(Debug, Clone, Copy)]
struct Ends {
    echo: SocketAddr,
    sink: SocketAddr,
    /// Congestion control of the clients' sockets (the direct path's cubic run).
    cc: Option<&'static str>,
}

/// Figures of one path on one profile.
#[derive(Debug, Default, Clone, Serialize)]
pub struct Figures {
    pub bulk1_mbps: Option<f64>,
    pub bulk8_mbps: Option<f64>,
    pub rr_idle_p50_ms: Option<f64>,
    pub rr_idle_p99_ms: Option<f64>,
    pub rr_loaded_p50_ms: Option<f64>,
    pub rr_loaded_p90_ms: Option<f64>,
    pub rr_loaded_p99_ms: Option<f64>,
    /// The bulk stream's rate while the round trips ran.
    pub loaded_bulk_mbps: Option<f64>,
    /// Each blackout tried and what became of the open connection.
    pub blackouts: Vec<(f64, String)>,
    /// Longest blackout survived of those tried.
    pub survives_s: Option<f64>,
    pub cpu_s_per_gb: Option<f64>,
    /// Idle link bytes per minute per tunnel (three servers).
    pub idle_bytes_per_min_per_tunnel: Option<f64>,
    /// New connections (one after another) that failed while one of three servers was killed.
    pub failover_failed: Option<u64>,
    /// The slowest of those new connections, from connect to its echo.
    pub failover_slowest_ms: Option<f64>,
    pub errors: Vec<String>,
}

#[derive(Debug, Serialize)]
struct ProfileResult {
    profile: Profile,
    paths: BTreeMap<String, Figures>,
}

pub fn run(a: WanArgs) -> Result<()> {
    let (profiles, secs, blackouts, idle_secs) = if a.smoke {
        (vec!["lan".to_string()], 1.0, vec![2.0], 5.0)
    } else {
        (a.profiles.clone(), a.secs, a.blackouts.clone(), a.idle_secs)
    };
    // A misspelt profile is refused before anything is built.
    for name in &profiles {
        Profile::by_name(name)?;
    }
    if let Some(why) = lab::missing_requirement() {
        bail!("tether-bench wan: {why}");
    }
    let out = a.out.clone().unwrap_or_else(|| {
        PathBuf::from(format!(
            "target/wan/{}",
            lab::sh("date +%Y%m%d-%H%M%S").unwrap_or_default().trim()
        ))
    });
    std::fs::create_dir_all(&out).with_context(|| format!("create {}", out.display()))?;
    // sshd resolves its files from `/`: a relative --out would lose them.
    let out = std::fs::canonicalize(&out).with_context(|| format!("resolve {}", out.display()))?;
    let mut results = Vec::new();
    for name in &profiles {
        let profile = Profile::by_name(name)?;
        eprintln!("wan: {} ({})", profile.name, profile.describe());
        let work = out.join(profile.name);
        std::fs::create_dir_all(&work)?;
        let r = run_profile(profile, &a, &work, secs, &blackouts, idle_secs)
            .with_context(|| format!("profile {}", profile.name))?;
        results.push(r);
        std::fs::write(
            out.join("results.json"),
            serde_json::to_vec_pretty(&results)?,
        )?;
    }
    std::fs::write(out.join("report.md"), markdown(&results))?;
    std::fs::write(out.join("chart.svg"), chart(&results)?)?;
    println!("{}", out.join("report.md").display());
    Ok(())
}

fn run_profile(
    profile: &'static Profile,
    a: &WanArgs,
    work: &Path,
    secs: f64,
    blackouts: &[f64],
    idle_secs: f64,
) -> Result<ProfileResult> {
    let horizon = Duration::from_secs(3 * 3600);
    let lab = Lab::start(
        profile.shape(),
        profile.shape(),
        profile.blackouts(horizon, a.seed),
        profile.rebind_every_s > 0,
        a.seed,
    )?;
    let rebinder = Rebinder::start(&lab, profile.rebind_every_s);
    let upstream = in_ns(&lab.masters, || {
        Upstream::start_at(
            ([0, 0, 0, 0], ECHO_PORT).into(),
            ([0, 0, 0, 0], SINK_PORT).into(),
        )
    })??;
    let pki = pki(work)?;
    let mut paths = BTreeMap::new();
    for path in &a.paths {
        eprintln!("wan: {}: {path}", profile.name);
        let figures = match run_path(&lab, path, work, &pki, a, secs, blackouts, idle_secs) {
            Ok(f) => f,
            Err(e) => Figures {
                errors: vec![format!("{e:#}")],
                ..Figures::default()
            },
        };
        if !figures.errors.is_empty() {
            eprintln!("wan: {}: {path}: {:?}", profile.name, figures.errors);
        }
        paths.insert(path.clone(), figures);
    }
    drop(rebinder);
    drop(upstream);
    Ok(ProfileResult {
        profile: profile.clone(),
        paths,
    })
}

/// Rebinds the lab's NAT every so often, on a thread of its own, until dropped.
struct Rebinder {
    stop: std::sync::mpsc::Sender<()>,
}

impl Rebinder {
    fn start(lab: &Lab, every_s: u64) -> Option<Rebinder> {
        if every_s == 0 {
            return None;
        }
        let (stop, wait) = std::sync::mpsc::channel::<()>();
        let control = lab.handle();
        std::thread::spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                wait.recv_timeout(Duration::from_secs(every_s))
            {
                control.rebind();
            }
        });
        Some(Rebinder { stop })
    }
}

impl Drop for Rebinder {
    fn drop(&mut self) {
        let _ = self.stop.send(());
    }
}

#[allow(clippy::too_many_arguments)]
fn run_path(
    lab: &Lab,
    path: &str,
    work: &Path,
    pki: &Pki,
    a: &WanArgs,
    secs: f64,
    blackouts: &[f64],
    idle_secs: f64,
) -> Result<Figures> {
    let direct = |cc| Ends {
        echo: (MASTERS_IP, ECHO_PORT).into(),
        sink: (MASTERS_IP, SINK_PORT).into(),
        cc,
    };
    let mut f = Figures::default();
    let mut procs: Vec<Proc> = Vec::new();
    let ends = match path {
        "direct" => direct(None),
        "direct-cubic" => direct(Some("cubic")),
        "ssh" => {
            procs = start_ssh(lab, work)?;
            Ends {
                echo: ([127, 0, 0, 1], SSH_ECHO).into(),
                sink: ([127, 0, 0, 1], SSH_SINK).into(),
                cc: None,
            }
        }
        "quic" | "tcp" => {
            // One server for the throughput and latency figures, so that the round trips
            // share the bulk stream's tunnel.
            procs = start_tether(lab, work, pki, path, 1, a)?;
            Ends {
                echo: ([127, 0, 0, 1], AGENT_API).into(),
                sink: ([127, 0, 0, 1], AGENT_BULK).into(),
                cc: None,
            }
        }
        other => bail!("no path {other:?} (direct, direct-cubic, ssh, quic, tcp)"),
    };
    let pids: Vec<u32> = procs.iter().map(Proc::pid).collect();
    let mbps = |(bytes, s): (u64, f64)| bytes as f64 * 8.0 / s / 1e6;
    let before = usage_of(&pids).unwrap_or_default();
    let mut moved = 0u64;
    match in_ns(&lab.node, || load::bulk_with(ends.sink, 1, secs, ends.cc))? {
        Ok(r) => {
            moved += r.0;
            f.bulk1_mbps = Some(mbps(r));
        }
        Err(e) => f.errors.push(format!("bulk 1: {e:#}")),
    }
    match in_ns(&lab.node, || load::bulk_with(ends.sink, 8, secs, ends.cc))? {
        Ok(r) => {
            moved += r.0;
            f.bulk8_mbps = Some(mbps(r));
        }
        Err(e) => f.errors.push(format!("bulk 8: {e:#}")),
    }
    if !pids.is_empty() && moved > 0 {
        let after = usage_of(&pids).unwrap_or_default();
        f.cpu_s_per_gb = Some((after.cpu_s - before.cpu_s) / (moved as f64 / 1e9));
    }
    match in_ns(&lab.node, || rr_for(ends.echo, secs))? {
        Ok(mut t) => {
            t.sort_unstable();
            f.rr_idle_p50_ms = Some(percentile(&t, 50.0) as f64 / 1e6);
            f.rr_idle_p99_ms = Some(percentile(&t, 99.0) as f64 / 1e6);
        }
        Err(e) => f.errors.push(format!("round trips: {e:#}")),
    }
    let loaded = in_ns(&lab.node, || {
        std::thread::scope(|s| {
            let bulk = s.spawn(|| load::bulk_with(ends.sink, 1, secs + 2.0, ends.cc));
            // Let the bulk stream reach its rate before the first round trip.
            std::thread::sleep(Duration::from_secs(1));
            let rr = rr_for(ends.echo, secs);
            (rr, bulk.join())
        })
    })?;
    match loaded {
        (Ok(mut t), Ok(Ok(b))) => {
            t.sort_unstable();
            f.rr_loaded_p50_ms = Some(percentile(&t, 50.0) as f64 / 1e6);
            f.rr_loaded_p90_ms = Some(percentile(&t, 90.0) as f64 / 1e6);
            f.rr_loaded_p99_ms = Some(percentile(&t, 99.0) as f64 / 1e6);
            f.loaded_bulk_mbps = Some(mbps(b));
        }
        (rr, bulk) => f.errors.push(format!(
            "round trips under load: {:?} / {:?}",
            rr.err().map(|e| format!("{e:#}")),
            bulk.map(|b| b.err().map(|e| format!("{e:#}")))
        )),
    }
    for &d in blackouts {
        let outcome = in_ns(&lab.node, || through_blackout(lab, ends.echo, d))?;
        eprintln!("wan: {path}: a {d} s blackout: {outcome}");
        if outcome == "survives" {
            f.survives_s = Some(f.survives_s.unwrap_or(0.0).max(d));
        }
        f.blackouts.push((d, outcome));
    }
    drop(procs);
    if path == "quic" || path == "tcp" {
        match idle_bytes(lab, work, pki, path, a, idle_secs) {
            Ok((b, failed, slowest)) => {
                f.idle_bytes_per_min_per_tunnel = Some(b);
                f.failover_failed = Some(failed);
                f.failover_slowest_ms = Some(slowest);
            }
            Err(e) => f.errors.push(format!("idle bytes: {e:#}")),
        }
    }
    Ok(f)
}

/// Round trips of 64 bytes on one connection for `secs` (at least 20); nanoseconds each.
fn rr_for(addr: SocketAddr, secs: f64) -> Result<Vec<u64>> {
    let mut c = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .with_context(|| format!("connect {addr}"))?;
    c.set_nodelay(true)?;
    c.set_read_timeout(Some(Duration::from_secs(30)))?;
    let msg = [7u8; load::MESSAGE];
    let mut back = [0u8; load::MESSAGE];
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut times = Vec::new();
    while times.len() < 20 || Instant::now() < end {
        let t = Instant::now();
        c.write_all(&msg)?;
        c.read_exact(&mut back)
            .with_context(|| format!("round trip {}", times.len()))?;
        times.push(t.elapsed().as_nanos() as u64);
    }
    Ok(times)
}

/// An open connection through a blackout of `secs`: "survives" (it echoes after the link
/// comes back), "reset" (it ends with an error or EOF), or "hangs" (neither within 30 s of the
/// link's return, more than any retransmission backoff of a live connection needs).
fn through_blackout(lab: &Lab, echo: SocketAddr, secs: f64) -> String {
    let attempt = || -> std::io::Result<()> {
        let mut c = TcpStream::connect_timeout(&echo, Duration::from_secs(10))?;
        c.set_nodelay(true)?;
        c.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut back = [0u8; load::MESSAGE];
        c.write_all(&[1u8; load::MESSAGE])?;
        c.read_exact(&mut back)?;
        let len = Duration::from_secs_f64(secs);
        lab.blackout(len);
        std::thread::sleep(len);
        c.set_read_timeout(Some(Duration::from_secs(30)))?;
        c.write_all(&[2u8; load::MESSAGE])?;
        c.read_exact(&mut back)?;
        if back != [2u8; load::MESSAGE] {
            return Err(std::io::Error::other("the echo came back changed"));
        }
        Ok(())
    };
    let outcome = match attempt() {
        Ok(()) => "survives".to_string(),
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            "hangs".to_string()
        }
        Err(e) => format!("reset ({})", e.kind()),
    };
    // Let every path find its feet again before the next figure.
    let _ = wait_until(
        "the path back after a blackout",
        Duration::from_secs(60),
        || load::probe(echo, Duration::from_secs(5)).is_ok(),
    );
    outcome
}

/// Link bytes per minute per tunnel of an idle agent with tunnels to three peered servers;
/// then new connections, one after another, while one of the servers is killed with -9: how
/// many failed, and the slowest (the time to move new connections off a dead server).
fn idle_bytes(
    lab: &Lab,
    work: &Path,
    pki: &Pki,
    transport: &str,
    a: &WanArgs,
    secs: f64,
) -> Result<(f64, u64, f64)> {
    let procs = start_tether(lab, work, pki, transport, 3, a)?;
    // Settle: handshakes, announcements and the first renewals check are not idle traffic.
    std::thread::sleep(Duration::from_secs(3));
    let before = lab.counters().bytes();
    let t = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(secs));
    let bytes = lab.counters().bytes() - before;
    let per_min = bytes as f64 * 60.0 / t.elapsed().as_secs_f64() / 3.0;
    let mut procs = procs;
    let echo = SocketAddr::from(([127, 0, 0, 1], AGENT_API));
    let (failed, slowest) = in_ns(&lab.node, || {
        let stop = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|sc| {
            let clients = sc.spawn(|| {
                let (mut failed, mut slowest) = (0u64, Duration::ZERO);
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let t = Instant::now();
                    match load::probe(echo, Duration::from_secs(10)) {
                        Ok(()) => slowest = slowest.max(t.elapsed()),
                        Err(_) => failed += 1,
                    }
                }
                (failed, slowest)
            });
            std::thread::sleep(Duration::from_secs(2));
            procs[0].kill();
            std::thread::sleep(Duration::from_secs(8));
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            clients.join().unwrap_or((u64::MAX, Duration::ZERO))
        })
    })?;
    drop(procs);
    Ok((per_min, failed, slowest.as_secs_f64() * 1000.0))
}
