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
use crate::procs::{lock, run_ok, sibling, wait_until, Proc};
use anyhow::{bail, Context, Result};
use ring::digest::{Context as Digest, SHA256};
use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tether_testkit::upstream::Echo;

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
    pub faults: Option<Vec<FaultKind>>,
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
    /// The hour's settings, or, `quick`, CI's: a shorter warm-up, faults twice as often, two
    /// agents and smaller transfers.
    pub fn new(duration: Duration, quick: bool, seed: u64, out: PathBuf) -> Settings {
        let hour = Settings {
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
        };
        if !quick {
            return hour;
        }
        Settings {
            warmup: Duration::from_secs(20),
            fault_every: Duration::from_secs(6),
            agents: 2,
            rr_rate: 20,
            bulk_max: 8 << 20,
            long_life: (Duration::from_secs(10), Duration::from_secs(40)),
            ..hour
        }
    }
}

mod faults;
mod judge;
mod lab;
mod load;
mod report;
mod sample;
mod scenarios;
#[cfg(test)]
mod tests;

use faults::*;
use judge::*;
use lab::*;
use load::*;
use report::*;
use sample::*;

pub use faults::FaultKind;
pub use scenarios::{disconnected, storm};

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
            .filter(|f| f.kind == FaultKind::LinkBlackout)
            .map(|f| f.end - f.start)
            .collect();
        format!(
            "The agents reach the servers across a `{}` link ({}): {} blackouts of {:.1} s in all, {} NAT rebindings (and those of the `rebind NAT` fault); {} MiB crossed it, {} packets were dropped by it.",
            l.profile.name,
            l.profile.describe(),
            blackouts.len(),
            blackouts.iter().sum::<f64>(),
            rec.faults.iter().filter(|f| f.kind == FaultKind::LinkRebinding).count(),
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
