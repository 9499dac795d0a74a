//! Sampling the processes (memory, open files, sockets in CLOSE_WAIT) and the agents'
//! renewals while the soak runs.

use super::*;

/// One look at one process.
#[derive(Debug, Clone)]
pub(super) struct Sample {
    /// Seconds since the run began.
    pub(super) t: f64,
    pub(super) name: String,
    pub(super) pid: u32,
    pub(super) rss_kib: u64,
    pub(super) fds: u64,
    pub(super) threads: u64,
}

/// The samples of each process instance (a restart is a new instance), by name and pid.
pub(super) fn instances(samples: &[Sample]) -> BTreeMap<(String, u32), Vec<&Sample>> {
    let mut by: BTreeMap<(String, u32), Vec<&Sample>> = BTreeMap::new();
    for x in samples {
        by.entry((x.name.clone(), x.pid)).or_default().push(x);
    }
    by
}

pub(super) fn status_field(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

pub(super) fn count_dir(path: &str) -> u64 {
    std::fs::read_dir(path)
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

pub(super) fn sample_loop(run: Arc<Run>) {
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
pub(super) fn sample_revoked(run: &Run, t: f64) {
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
pub(super) fn close_wait(pids: &[u32]) -> usize {
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

/// The sampler's pace (processes' memory and files, agents' renewals).
pub(super) const SAMPLE_EVERY: Duration = Duration::from_secs(2);
