//! The faults: what strikes every few seconds, and the link's own blackouts and rebindings.

use super::*;

/// Every kind of fault, as `--faults` names them (dashes for spaces).
/// What a fault does. The soak injects the first twelve (in this order, which with the seed makes
/// the run); the link of `--link` makes the last two on its own schedule. The names are what the
/// report, `faults.csv` and `--faults` say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    KillServer,
    DrainServer,
    StopUpstream,
    RestartAgent,
    ReloadCertificate,
    RestartAllServers,
    DropPackets,
    BlockUdp,
    RebindNat,
    KillEtcd,
    CutFromEtcd,
    RevokeNode,
    LinkBlackout,
    LinkRebinding,
}

impl FaultKind {
    /// The fault's name in the report and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::KillServer => "kill -9 server",
            FaultKind::DrainServer => "drain server",
            FaultKind::StopUpstream => "stop upstream",
            FaultKind::RestartAgent => "restart agent",
            FaultKind::ReloadCertificate => "reload server certificate",
            FaultKind::RestartAllServers => "restart all servers",
            FaultKind::DropPackets => "drop packets to server",
            FaultKind::BlockUdp => "block UDP",
            FaultKind::RebindNat => "rebind NAT",
            FaultKind::KillEtcd => "kill -9 etcd",
            FaultKind::CutFromEtcd => "cut server from etcd",
            FaultKind::RevokeNode => "revoke node",
            FaultKind::LinkBlackout => "link blackout",
            FaultKind::LinkRebinding => "link rebinding",
        }
    }

    /// The kind with this name, as `--faults` gives it.
    pub fn from_name(name: &str) -> Option<FaultKind> {
        FAULTS.iter().copied().find(|k| k.name() == name)
    }
}

impl std::fmt::Display for FaultKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The faults the soak injects, in order.
pub const FAULTS: &[FaultKind] = &[
    FaultKind::KillServer,
    FaultKind::DrainServer,
    FaultKind::StopUpstream,
    FaultKind::RestartAgent,
    FaultKind::ReloadCertificate,
    FaultKind::RestartAllServers,
    FaultKind::DropPackets,
    FaultKind::BlockUdp,
    FaultKind::RebindNat,
    FaultKind::KillEtcd,
    FaultKind::CutFromEtcd,
    FaultKind::RevokeNode,
];

pub(super) fn fault_loop(run: Arc<Run>) {
    let mut rng = Rng::new(run.settings.seed ^ 0xFA17);
    // The first fault after a little traffic.
    sleep_unless_stopped(&run, Duration::from_secs(5));
    // Those that can run here, in the order of FAULTS (which, with the seed, makes the run).
    let conntrack = run.settings.netns && runs("conntrack", &["-V"]);
    let etcd = run.lab.etcd.is_some();
    let mut kinds: Vec<FaultKind> = FAULTS
        .iter()
        .copied()
        .filter(|k| match *k {
            FaultKind::DropPackets | FaultKind::BlockUdp => run.settings.netns,
            FaultKind::RebindNat => conntrack || run.lab.link.is_some(),
            FaultKind::KillEtcd | FaultKind::CutFromEtcd => etcd,
            _ => true,
        })
        .collect();
    if let Some(only) = &run.settings.faults {
        kinds.retain(|k| only.contains(k));
    }
    if kinds.is_empty() {
        return;
    }
    let mut n = 0u64;
    while !run.stopped() && run.now() + 15.0 < run.settings.duration.as_secs_f64() {
        // Every kind comes round; the rolling restart, the longest, a little less often.
        let mut kind = kinds[rng.below(kinds.len() as u64) as usize];
        if kind == FaultKind::RestartAllServers && n % 2 == 1 {
            kind = FaultKind::KillServer;
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
pub(super) fn link_loop(run: Arc<Run>) {
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
                kind: FaultKind::LinkBlackout,
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
                kind: FaultKind::LinkRebinding,
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
pub(super) fn iptables(side: &Side, op: &str, rule: &str) -> Result<()> {
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
pub(super) fn forget_udp_flows() -> Result<()> {
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
pub(super) fn runs(cmd: &str, args: &[&str]) -> bool {
    std::process::Command::new(cmd)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// UDP flows whose source the NAT rewrote into `range` (the reply goes to a port in it).
pub(super) fn flows_rebound(range: std::ops::RangeInclusive<u16>) -> usize {
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
pub(super) fn with_rules(run: &Run, rules: &[String], hold: Duration) -> Result<f64> {
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

pub(super) fn sleep_unless_stopped(run: &Run, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end && !run.stopped() {
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// What an injected fault hit, and when it was fully in effect if that matters (see
/// [`Fault::in_effect`]; the fault's start otherwise).
pub(super) struct Injected {
    pub(super) target: String,
    pub(super) in_effect: Option<f64>,
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
pub(super) fn inject(run: &Run, kind: FaultKind, rng: &mut Rng) -> Result<Injected> {
    let lab = &run.lab;
    let i = rng.below(lab.servers.len() as u64) as usize;
    match kind {
        FaultKind::KillServer => {
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
        FaultKind::DrainServer => {
            lock(&lab.servers[i]).terminate(DRAIN + Duration::from_secs(5));
            lock(&lab.servers[i]).start()?;
            Ok(format!("server-{i}").into())
        }
        FaultKind::StopUpstream => {
            lab.upstreams[i].stop();
            std::thread::sleep(Duration::from_millis(4000 + rng.below(4000)));
            lab.upstreams[i].start_again()?;
            Ok(format!("upstream of server-{i}").into())
        }
        FaultKind::RestartAgent => {
            let j = rng.below(lab.agents.len() as u64) as usize;
            let mut a = lock(&lab.agents[j]);
            a.slot.terminate(Duration::from_secs(35));
            a.slot.start()?;
            Ok(format!("agent-{j}").into())
        }
        FaultKind::ReloadCertificate => {
            if let Some(p) = lock(&lab.servers[i]).pid() {
                signal(p, "HUP");
            }
            Ok(format!("server-{i}").into())
        }
        FaultKind::DropPackets => {
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
        FaultKind::BlockUdp => {
            // QUIC dies everywhere: agents fall back to TLS over TCP, and return after.
            let rules = ["INPUT -p udp -j DROP".to_string()];
            let in_effect =
                with_rules(run, &rules, Duration::from_millis(10_000 + rng.below(5000)))?;
            Ok(Injected {
                target: "all UDP".into(),
                in_effect: Some(in_effect),
            })
        }
        FaultKind::RebindNat if lab.link.is_some() => {
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
        FaultKind::RebindNat => {
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
        FaultKind::RestartAllServers => {
            for s in &lab.servers {
                lock(s).terminate(DRAIN + Duration::from_secs(5));
                lock(s).start()?;
            }
            Ok(Injected::from("every server in turn".to_string()))
        }
        FaultKind::KillEtcd => {
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
        FaultKind::CutFromEtcd => {
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
        FaultKind::RevokeNode => revoke_node(run),
        other => bail!("{other} is not a fault the soak injects"),
    }
}

/// Most victims left running: each is one more agent dialing every server.
pub(super) const VICTIMS_RUNNING: usize = 3;

/// A new node joins, gets tunnels to the servers, and is revoked with `tether-server agent
/// revoke` against the datastore (etcd, or the first server's data directory, from where its
/// peers learn it), as an operator would. It keeps running (see [`Victim`]); the
/// sampler watches that no server has it again ([`revocations_broken`]).
pub(super) fn revoke_node(run: &Run) -> Result<Injected> {
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
pub(super) fn servers_holding(lab: &Lab, node: &str) -> usize {
    nodes_on_servers(lab)
        .iter()
        .filter(|(_, nodes)| nodes.iter().any(|n| n == node))
        .count()
}

/// The connected nodes of each server that answers: (server index, node names).
pub(super) fn nodes_on_servers(lab: &Lab) -> Vec<(usize, Vec<String>)> {
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
pub(super) fn renewals_of(side: &Side, admin: SocketAddr) -> Option<u64> {
    let m = side.http_get(admin, "/metrics").ok()?;
    crate::procs::metric(&m, "tether_renewals_total ").map(|n| n as u64)
}

// ---------------------------------------------------------------------------------------------
// Sampling processes.
