//! `tether-bench`: measures tether (one server and one agent, each transport) against a direct
//! connection on loopback, in one run and interleaved, so that a shared machine's drift hits
//! both sides of every ratio. Optionally runs the peers harness (nginx, haproxy, ssh -L) in the
//! same run. Writes report.md, results.json and chart.svg.

mod etcd;
mod failover;
mod load;
mod path;
mod plot;
mod procs;
mod report;
mod scale;
mod soak;
mod wan;

use anyhow::{bail, Context, Result};
use clap::Parser;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(
    name = "tether-bench",
    version,
    about = "Measures tether against a direct connection (and nginx, haproxy, ssh -L) on this machine",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    /// A first look in under two minutes: one rep, short runs, scale up to 1,000 agents.
    #[arg(long)]
    quick: bool,
    /// Seconds, for CI: every measurement once and tiny; the figures mean nothing.
    #[arg(long, conflicts_with = "quick")]
    smoke: bool,
    /// Transports to measure, comma-separated: quic, tcp.
    #[arg(long, value_delimiter = ',', default_value = "quic,tcp")]
    transports: Vec<String>,
    /// Repetitions of each throughput and latency measurement (direct and path alternate).
    #[arg(long, default_value_t = 3)]
    reps: u32,
    #[arg(long, default_value_t = 10.0)]
    bulk_secs: f64,
    /// Round trips per latency run.
    #[arg(long, default_value_t = 20000)]
    rr_count: usize,
    #[arg(long, default_value_t = 5.0)]
    crr_secs: f64,
    /// Idle connections held open for the memory figure.
    #[arg(long, default_value_t = 1000)]
    hold: usize,
    /// Simulated agent counts for the scale figure, comma-separated (empty: skip).
    #[arg(long, value_delimiter = ',', default_value = "100,1000,10000")]
    scale: Vec<usize>,
    /// Keepalive interval, in seconds, of the server and the simulated agents in the scale
    /// figure (idle timeout: five times it). tether's default is 0.5; 2 is what docs/operations.md
    /// recommends for servers with thousands of agents, and what lets a 2-CPU machine run both
    /// the server and 10,000 simulated agents.
    #[arg(long, default_value_t = 2.0)]
    scale_keepalive: f64,
    /// Runtime threads of the tether-server under test (its --threads; 0: one per CPU).
    #[arg(long)]
    server_threads: Option<usize>,
    /// Runtime threads of the tether-agent under test (its --threads).
    #[arg(long)]
    agent_threads: Option<usize>,
    /// Skip the failover measurements.
    #[arg(long)]
    no_failover: bool,
    /// Also run these paths of the peers harness (space- or comma-separated: nginx haproxy ssh),
    /// which needs their Debian packages and iperf3.
    #[arg(long)]
    peers: Option<String>,
    /// The peers harness (run.sh and friends).
    #[arg(long)]
    peers_dir: Option<PathBuf>,
    /// Where report.md, results.json, chart.svg and the logs go (default: target/bench/TIME).
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(clap::Subcommand, Debug)]
enum Sub {
    /// Soak and chaos: three peered servers and several agents under mixed, checked traffic
    /// while a fault strikes every few seconds (kill -9, drains, stopped upstreams, agent
    /// restarts, rolling restarts); asserts that no byte is lost and memory stays flat, and
    /// writes report.md and chart.svg. Exits non-zero when a promise broke.
    Soak(SoakArgs),
    /// The WAN lab: tether, ssh -L and direct TCP across emulated edge links (delay, jitter,
    /// loss, rate, a bounded queue, blackouts, NAT rebinding) between network namespaces, over
    /// the same link in the same run. Needs root. Writes report.md, results.json, chart.svg.
    Wan(wan::WanArgs),
}

#[derive(clap::Args, Debug)]
struct SoakArgs {
    /// How long to run (e.g. 1h, 10m); default 1h, or 2m with --quick.
    #[arg(long, value_parser = tether_process::units::parse_duration)]
    duration: Option<Duration>,
    /// Two minutes, two agents, a fault every ~6 s: what CI runs.
    #[arg(long)]
    quick: bool,
    /// Seed of the payloads, choices and faults (default: from the clock); a run is repeated
    /// with the same seed.
    #[arg(long)]
    seed: Option<u64>,
    /// Where report.md, chart.svg and the processes' logs go (default: target/soak/TIME).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Only these faults, comma-separated (kill-9-server, drain-server, stop-upstream,
    /// restart-agent, reload-server-certificate, restart-all-servers, drop-packets-to-server,
    /// block-udp, rebind-nat, revoke-node; with --datastore etcd also kill-9-etcd,
    /// cut-server-from-etcd); default: all that can run here.
    #[arg(long, value_delimiter = ',')]
    faults: Option<Vec<String>>,
    /// Stay in this network namespace even as root (by default, as root with `ip` and
    /// `iptables`, the soak runs in a namespace of its own and adds dropped packets, blocked
    /// UDP and, with `conntrack`, NAT rebinding to its faults).
    #[arg(long)]
    no_netns: bool,
    /// What to run: mixed (traffic and faults; the default), disconnected (an agent with no
    /// server for 10 minutes, 1 with --quick), storm (1,000 simulated agents reconnecting at
    /// once, 200 with --quick), or all three in turn.
    #[arg(long, value_enum, default_value = "mixed")]
    scenario: Scenario,
    /// Where the servers of the mixed scenario keep their shared state: dir (their data
    /// directories and peer links; the default) or etcd (a three-member etcd of the soak's own,
    /// from the `etcd` on the PATH; adds kill-9-etcd and cut-server-from-etcd to the faults).
    #[arg(long, value_enum, default_value = "dir")]
    datastore: SoakStore,
    /// Put an edge link of this WAN lab profile between the agents and the servers (lan,
    /// regional, continental, cellular, satellite): the agents in a node namespace, the
    /// servers in a masters namespace, and the link's blackouts and NAT rebindings among the
    /// faults. Needs root; runs the mixed scenario, with the servers' state in their data
    /// directories. The load is sized for the link (bulk connections up to 8 MiB).
    #[arg(long, value_name = "PROFILE")]
    link: Option<String>,
    /// The tether processes' log level (their --log-level), for looking into a failure.
    #[arg(long, default_value = "warn")]
    log_level: String,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum SoakStore {
    Dir,
    Etcd,
}

#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Mixed,
    Disconnected,
    Storm,
    All,
}

fn soak(a: SoakArgs) -> Result<()> {
    // What --link cannot do is refused before anything is built.
    let link = a.link.as_deref().map(wan::Profile::by_name).transpose()?;
    if link.is_some() {
        if a.scenario != Scenario::Mixed {
            bail!("soak --link runs the mixed scenario only (the others have no link to cross)");
        }
        if a.datastore == SoakStore::Etcd {
            bail!("soak --link keeps the servers' state in their data directories: drop --datastore etcd");
        }
        if a.no_netns {
            bail!("soak --link builds network namespaces: drop --no-netns");
        }
        if let Some(why) = wan::lab::missing_requirement() {
            bail!("soak --link: {why}");
        }
    }
    if !a.no_netns && std::env::var_os(soak::NETNS_ENV).is_none() && soak::can_make_namespace() {
        let code = soak::run_in_namespace(std::env::args_os().skip(1).collect())?;
        std::process::exit(code);
    }
    let duration = a.duration.unwrap_or(if a.quick {
        Duration::from_secs(120)
    } else {
        Duration::from_secs(3600)
    });
    let seed = a.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(1)
    });
    let out = a
        .out
        .unwrap_or_else(|| PathBuf::from(format!("target/soak/{}", shell("date +%Y%m%d-%H%M%S"))));
    tether_endpoint::net::raise_fd_limit().context("raise the open file limit")?;
    let mut settings = soak::Settings::new(duration, a.quick, seed, out);
    settings.etcd = a.datastore == SoakStore::Etcd;
    settings.link = link;
    settings.log_level = a.log_level.clone();
    if link.is_some() {
        // Two bulk workers of up to 8 MiB keep a 20 Mbit/s link busy without starving the rest.
        settings.bulk_max = settings.bulk_max.min(8 << 20);
    }
    if settings.etcd && !etcd::available() {
        bail!("soak --datastore etcd: no etcd binary on the PATH (install Debian's etcd-server)");
    }
    if let Some(only) = a.faults {
        let mut kinds = Vec::new();
        for k in &only {
            let kind = k
                .replace('-', " ")
                .replace("kill 9", "kill -9")
                .replace("udp", "UDP")
                .replace("nat", "NAT");
            let Some(kind) = soak::FaultKind::from_name(&kind) else {
                bail!("soak: no fault {k:?} (see --help)");
            };
            kinds.push(kind);
        }
        settings.faults = Some(kinds);
    }
    let mut verdicts = Vec::new();
    let all = a.scenario == Scenario::All;
    if all || a.scenario == Scenario::Mixed {
        verdicts.push(soak::run(settings.clone())?);
    }
    if all || a.scenario == Scenario::Disconnected {
        let outage = Duration::from_secs(if a.quick { 60 } else { 600 });
        verdicts.push(soak::disconnected(&settings, outage)?);
    }
    if all || a.scenario == Scenario::Storm {
        verdicts.push(soak::storm(&settings, if a.quick { 200 } else { 1000 })?);
    }
    let mut failed = 0;
    for v in &verdicts {
        println!("{}", v.report.display());
        for line in v.violations.iter().take(20) {
            eprintln!("soak: {line}");
        }
        failed += v.violations.len();
    }
    if failed == 0 {
        eprintln!("soak: PASS (seed {seed})");
        Ok(())
    } else {
        bail!("soak: FAIL, {failed} broken promises (seed {seed}); see the reports")
    }
}

impl Cli {
    fn apply_presets(&mut self) {
        if self.quick {
            self.reps = 1;
            self.bulk_secs = 2.0;
            self.rr_count = 5000;
            self.crr_secs = 2.0;
            self.hold = 200;
            self.scale = vec![100, 1000];
        }
        if self.smoke {
            self.reps = 1;
            self.bulk_secs = 0.3;
            self.rr_count = 200;
            self.crr_secs = 0.3;
            self.hold = 20;
            self.scale = vec![10];
        }
        self.scale.retain(|n| *n > 0);
    }

    fn settings(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        m.insert("reps".into(), self.reps.to_string());
        m.insert("bulk_secs".into(), self.bulk_secs.to_string());
        m.insert("rr_count".into(), self.rr_count.to_string());
        m.insert("crr_secs".into(), self.crr_secs.to_string());
        m.insert("hold".into(), self.hold.to_string());
        m.insert("transports".into(), self.transports.join(","));
        let t = |n: Option<usize>| n.map_or("default".to_string(), |n| n.to_string());
        m.insert("server_threads".into(), t(self.server_threads));
        m.insert("agent_threads".into(), t(self.agent_threads));
        let scale: Vec<String> = self.scale.iter().map(|n| n.to_string()).collect();
        m.insert("scale".into(), scale.join(","));
        m.insert(
            "scale_keepalive".into(),
            format!("{}s", self.scale_keepalive),
        );
        let profile = if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        };
        m.insert("build".into(), profile.into());
        m
    }
}

fn main() {
    if let Err(e) = run() {
        eprintln!("tether-bench: {e:#}");
        std::process::exit(1);
    }
}

fn shell(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn run() -> Result<()> {
    let mut cli = Cli::parse();
    // One match: a `take()` per subcommand would drop the first one it did not match, and
    // `soak` would fall through to the loopback benchmark (it did, for a while).
    match cli.command.take() {
        Some(Sub::Wan(a)) => return wan::run(a),
        Some(Sub::Soak(a)) => return soak(a),
        None => {}
    }
    cli.apply_presets();
    for t in &cli.transports {
        if t != "quic" && t != "tcp" {
            bail!("unknown transport {t:?}: use quic or tcp");
        }
    }
    if cfg!(debug_assertions) && !cli.smoke {
        eprintln!("tether-bench: WARNING: a debug build measures the compiler's settings, not tether; use `cargo run --release -p tether-bench`");
    }
    let fds = tether_endpoint::net::raise_fd_limit().context("raise the open file limit")?;
    if fds < cli.scale.iter().copied().max().unwrap_or(0) as u64 + 1000 {
        eprintln!("tether-bench: the open file limit is {fds}; larger scale points will fail (raise it with ulimit -Hn)");
    }
    let out = match &cli.out {
        Some(o) => o.clone(),
        None => PathBuf::from(format!("target/bench/{}", shell("date +%Y%m%d-%H%M%S"))),
    };
    let work = out.join("work");
    std::fs::create_dir_all(&work).with_context(|| format!("create {}", work.display()))?;

    let mut results = report::Results {
        date: shell("date -Is"),
        machine: format!(
            "kernel {}, {} CPUs, {}",
            shell("uname -r"),
            shell("nproc"),
            shell("grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//'")
        ),
        settings: cli.settings(),
        ..Default::default()
    };
    eprintln!(
        "tether-bench: {}; results in {}",
        results.machine,
        out.display()
    );

    let pki = path::Pki::create(&work)?;
    let up = load::Upstream::start()?;
    let mut samples: BTreeMap<(String, bool), Vec<u64>> = BTreeMap::new();
    for transport in &cli.transports {
        let name = format!("tether-{transport}");
        eprintln!("== {name}");
        let threads = |n: Option<usize>| -> Vec<String> {
            n.map(|n| vec!["--threads".to_string(), n.to_string()])
                .unwrap_or_default()
        };
        let tether = path::Tether::start(
            &work,
            &pki,
            transport,
            up.echo,
            up.sink,
            (&threads(cli.server_threads), &threads(cli.agent_threads)),
        )?;
        measure_path(&cli, &name, &tether, &up, &mut results, &mut samples)?;
    }
    for ((path, pinned), mut v) in samples {
        v.sort_unstable();
        results.latency.push(report::Distribution {
            path,
            pinned,
            points: report::distribution(&v),
        });
    }
    if !cli.no_failover {
        for transport in &cli.transports {
            eprintln!("== failover, {transport}");
            let f = failover::measure(&work, &pki, &up, transport)?;
            eprintln!(
                "  kill -9: first success after {:.0} ms ({} failed); silent drop noticed after {:.0} ms",
                f.kill_to_first_success_ms, f.failed_attempts, f.silent_drop_detected_ms
            );
            results.failover.push(f);
        }
    }
    if !cli.scale.is_empty() {
        for transport in &cli.transports {
            eprintln!("== scale, {transport}");
            results.scale.extend(scale::measure(
                &work,
                &pki,
                &up,
                transport,
                &cli.scale,
                Duration::from_secs_f64(cli.scale_keepalive.clamp(0.05, 60.0)),
            )?);
        }
    }
    if let Some(peers) = &cli.peers {
        run_peers(&cli, peers, &out, &mut results)?;
    }

    results.summarize();
    let md = results.markdown();
    std::fs::write(out.join("report.md"), &md)?;
    std::fs::write(
        out.join("results.json"),
        serde_json::to_string_pretty(&results)?,
    )?;
    std::fs::write(out.join("chart.svg"), results.chart()?)?;
    println!("{md}");
    eprintln!(
        "tether-bench: wrote {0}/report.md, {0}/results.json and {0}/chart.svg",
        out.display()
    );
    Ok(())
}

/// Memory held, then each rep: every metric on direct and on the path back to back, the order
/// alternating by rep.
fn measure_path(
    cli: &Cli,
    name: &str,
    tether: &path::Tether,
    up: &load::Upstream,
    r: &mut report::Results,
    samples: &mut BTreeMap<(String, bool), Vec<u64>>,
) -> Result<()> {
    let pids = tether.pids();
    let idle = procs::usage_of(&pids)?;
    r.add(name, name, 0, "mem_idle_rss_kb", idle.rss_kb as f64);
    let (held, failed) = load::hold(tether.agent.api, cli.hold);
    std::thread::sleep(Duration::from_secs(2));
    let holding = procs::usage_of(&pids)?;
    r.add(name, name, 0, "mem_hold_rss_kb", holding.rss_kb as f64);
    r.add(name, name, 0, "hold_ok", held.len() as f64);
    eprintln!(
        "  memory: idle {} KiB, holding {}/{} connections {} KiB ({failed} failed)",
        idle.rss_kb,
        held.len(),
        cli.hold,
        holding.rss_kb
    );
    drop(held);

    let self_pid = std::process::id();
    for rep in 1..=cli.reps {
        let order = if rep % 2 == 1 {
            [true, false]
        } else {
            [false, true]
        };
        for metric in ["bulk1", "bulk8", "rr", "rr1cpu", "crr"] {
            for direct in order {
                let target = if direct { "direct" } else { name };
                let label = if direct {
                    "direct".to_string()
                } else {
                    name.to_string()
                };
                let summary = match metric {
                    "bulk1" | "bulk8" => {
                        let streams = if metric == "bulk1" { 1 } else { 8 };
                        let addr = if direct { up.sink } else { tether.agent.bulk };
                        let c0 = procs::usage_of(&pids)?.cpu_s;
                        let (bytes, secs) = load::bulk(addr, streams, cli.bulk_secs)?;
                        let c1 = procs::usage_of(&pids)?.cpu_s;
                        let gbps = bytes as f64 * 8.0 / secs / 1e9;
                        r.add(name, target, rep, &format!("{metric}_gbps"), gbps);
                        let mut s = format!("{gbps:.2} Gbit/s");
                        if !direct && bytes > 0 {
                            let per_gb = (c1 - c0) / (bytes as f64 / 1e9);
                            r.add(name, target, rep, &format!("{metric}_cpu_s_per_gb"), per_gb);
                            s.push_str(&format!(", path CPU {per_gb:.2} s/GB"));
                        }
                        s
                    }
                    "rr" | "rr1cpu" => {
                        let pinned = metric == "rr1cpu";
                        let addr = if direct { up.echo } else { tether.agent.api };
                        let mut all = vec![self_pid];
                        if !direct {
                            all.extend_from_slice(&pids);
                        }
                        if pinned {
                            procs::pin(&all, "0")?;
                        }
                        let warmup = (cli.rr_count / 10).max(100);
                        let cpu0 = cpu_by_process(self_pid, &pids)?;
                        let times = load::rr(addr, cli.rr_count, warmup);
                        let cpu1 = cpu_by_process(self_pid, &pids)?;
                        if pinned {
                            procs::pin(&all, &procs::all_cpus())?;
                        }
                        let mut times = times?;
                        times.sort_unstable();
                        let us = |p: f64| load::percentile(&times, p) as f64 / 1000.0;
                        let (p50, p99, p999) = (us(50.0), us(99.0), us(99.9));
                        r.add(name, target, rep, &format!("{metric}_p50_us"), p50);
                        r.add(name, target, rep, &format!("{metric}_p99_us"), p99);
                        r.add(name, target, rep, &format!("{metric}_p999_us"), p999);
                        let trips = (cli.rr_count + warmup) as f64;
                        add_cpu_per(r, name, target, rep, metric, direct, &cpu0, &cpu1, trips);
                        samples.entry((label, pinned)).or_default().extend(times);
                        format!("p50={p50:.1}us p99={p99:.1}us p99.9={p999:.1}us")
                    }
                    _ => {
                        let addr: SocketAddr = if direct { up.echo } else { tether.agent.api };
                        let cpu0 = cpu_by_process(self_pid, &pids)?;
                        let c = load::crr(addr, cli.crr_secs);
                        let cpu1 = cpu_by_process(self_pid, &pids)?;
                        let made = (c.connections + c.errors) as f64;
                        add_cpu_per(r, name, target, rep, metric, direct, &cpu0, &cpu1, made);
                        let cps = c.connections as f64 / c.secs;
                        r.add(name, target, rep, "crr_cps", cps);
                        r.add(name, target, rep, "crr_p50_us", c.p50_ns as f64 / 1000.0);
                        r.add(name, target, rep, "crr_errors", c.errors as f64);
                        format!("{cps:.0} conn/s, {} errors", c.errors)
                    }
                };
                eprintln!("  rep {rep} {metric} {target}: {summary}");
            }
        }
    }
    // Idle again: the last connections closed, the processes had a moment to give back.
    std::thread::sleep(Duration::from_secs(2));
    let after = procs::usage_of(&pids)?;
    r.add(name, name, 0, "mem_after_rss_kb", after.rss_kb as f64);
    Ok(())
}

/// CPU seconds so far of the bench itself (the client and the upstream), the server and the
/// agent.
fn cpu_by_process(bench: u32, path: &[u32; 2]) -> Result<[f64; 3]> {
    Ok([
        procs::usage(bench)?.cpu_s,
        procs::usage(path[0])?.cpu_s,
        procs::usage(path[1])?.cpu_s,
    ])
}

/// Records the CPU microseconds per operation (a round trip, a new connection) of each
/// process between two readings: `{metric}_cpu_us_bench` (client and upstream, which direct
/// pays too), and on the path `_server` and `_agent`. Where the path's extra microseconds go.
#[allow(clippy::too_many_arguments)]
fn add_cpu_per(
    r: &mut report::Results,
    name: &str,
    target: &str,
    rep: u32,
    metric: &str,
    direct: bool,
    before: &[f64; 3],
    after: &[f64; 3],
    ops: f64,
) {
    if ops <= 0.0 {
        return;
    }
    let per = |i: usize| (after[i] - before[i]) / ops * 1e6;
    r.add(name, target, rep, &format!("{metric}_cpu_us_bench"), per(0));
    if !direct {
        r.add(
            name,
            target,
            rep,
            &format!("{metric}_cpu_us_server"),
            per(1),
        );
        r.add(name, target, rep, &format!("{metric}_cpu_us_agent"), per(2));
    }
}

/// Runs the peers harness for `paths` with settings matching this run's, and adds its rows.
fn run_peers(cli: &Cli, paths: &str, out: &Path, r: &mut report::Results) -> Result<()> {
    let dir = match &cli.peers_dir {
        Some(d) => d.clone(),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("peers"),
    };
    let script = dir.join("run.sh");
    if !script.exists() {
        bail!("no peers harness at {} (use --peers-dir)", script.display());
    }
    let paths = paths.replace(',', " ");
    let peers_out = out.join("peers");
    eprintln!("== peers: {paths} (bash {} ...)", script.display());
    let mut cmd = Command::new("bash");
    cmd.arg(&script)
        .args(["--paths", &paths, "--out"])
        .arg(&peers_out);
    cmd.args([
        "--reps",
        &cli.reps.to_string(),
        "--bulk-secs",
        &(cli.bulk_secs.ceil() as u64).max(1).to_string(),
        "--rr-count",
        &cli.rr_count.to_string(),
        "--crr-secs",
        &(cli.crr_secs.ceil() as u64).max(1).to_string(),
        "--hold",
        &cli.hold.to_string(),
    ]);
    let status = cmd.status().context("run the peers harness")?;
    if !status.success() {
        bail!(
            "the peers harness failed ({status}); see {}",
            peers_out.display()
        );
    }
    let csv = std::fs::read_to_string(peers_out.join("results.csv"))
        .context("read the peers harness's results.csv")?;
    r.rows.extend(report::parse_peer_csv(&csv));
    Ok(())
}
