//! The processes under test (the kit's [`Proc`]: started with their logs kept, killed when
//! dropped), their memory and CPU read from /proc, and their pinning to CPUs.

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use tether_testkit::{run as run_ok, Proc};

/// Memory and CPU of one process (all its threads).
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub rss_kb: u64,
    pub pss_kb: u64,
    pub cpu_s: f64,
}

impl std::ops::Add for Usage {
    type Output = Usage;
    fn add(self, o: Usage) -> Usage {
        Usage {
            rss_kb: self.rss_kb + o.rss_kb,
            pss_kb: self.pss_kb + o.pss_kb,
            cpu_s: self.cpu_s + o.cpu_s,
        }
    }
}

fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// Reads /proc/PID/status (VmRSS), smaps_rollup (Pss) and stat (utime + stime).
pub fn usage(pid: u32) -> Result<Usage> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("process {pid} is gone"))?;
    let field = |text: &str, key: &str| -> u64 {
        text.lines()
            .find(|l| l.starts_with(key))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let rss_kb = field(&status, "VmRSS:");
    let pss_kb = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .map(|t| field(&t, "Pss:"))
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name, which ends with the last ')': utime and stime are the
    // 14th and 15th fields of the line, so the 12th and 13th after it.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    Ok(Usage {
        rss_kb,
        pss_kb,
        cpu_s: ticks as f64 / clock_ticks(),
    })
}

/// The summed usage of several processes.
pub fn usage_of(pids: &[u32]) -> Result<Usage> {
    pids.iter()
        .try_fold(Usage::default(), |acc, p| Ok(acc + usage(*p)?))
}

/// Sets the CPU affinity of every thread of each process (`taskset -a -p`). A thread that
/// exits while taskset walks the list makes it fail, so each process gets a few tries.
pub fn pin(pids: &[u32], cpus: &str) -> Result<()> {
    for pid in pids {
        let mut tries = 0;
        loop {
            let ok = Command::new("taskset")
                .args(["-a", "-p", "-c", cpus, &pid.to_string()])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .context("run taskset (util-linux)")?;
            if ok.success() {
                break;
            }
            tries += 1;
            if tries == 5 {
                bail!("taskset could not pin process {pid} to CPUs {cpus}");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    Ok(())
}

/// All CPUs, as taskset writes them.
pub fn all_cpus() -> String {
    let n = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!("0-{}", n - 1)
}

/// Waits until `cond` holds, checking every 20 ms.
pub fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) -> Result<()> {
    let start = Instant::now();
    while !cond() {
        if start.elapsed() > deadline {
            bail!("{what}: not within {deadline:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The directory of the running executable, where cargo puts tether-server and tether-agent.
pub fn bin_dir() -> Result<PathBuf> {
    let exe = std::env::current_exe().context("where is tether-bench")?;
    exe.parent()
        .map(Path::to_path_buf)
        .context("tether-bench has no directory")
}

/// A binary next to tether-bench, or an error that says how to build it.
pub fn sibling(name: &str) -> Result<PathBuf> {
    let p = bin_dir()?.join(name);
    if !p.exists() {
        bail!(
            "{} not found: build it with `cargo build --release --bins` (the same profile as tether-bench)",
            p.display()
        );
    }
    Ok(p)
}

/// One GET on the admin endpoint; the body.
pub fn http_get(addr: std::net::SocketAddr, path: &str) -> Result<String> {
    let (_, body) =
        tether_endpoint::http::get_blocking(&addr.to_string(), path, Duration::from_secs(2))?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// The value of a metric line that starts with `prefix` (name and labels).
pub fn metric(text: &str, prefix: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// Locks `m`, taking the data of a lock a panicking thread left poisoned: the soak's and the
/// etcd cluster's state stays usable for the report after one of their threads failed.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
