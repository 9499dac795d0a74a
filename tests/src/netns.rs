//! Test hosts in network namespaces: the end-to-end suite's own small internet.
//!
//! Each lab is a set of namespaces joined by veth pairs, on addresses from 198.18.0.0/15 (the
//! range set aside for network benchmarks, RFC 2544), which the lab creates itself and which
//! exist only inside its namespaces. Traffic never leaves them: the root namespace gets no
//! address and no route. Labs remove their namespaces when dropped, and a new run removes the
//! leftovers of runs that died.
//!
//! The suite needs root, `ip` and `iptables`. Without them it says so loudly and skips; under
//! CI (`CI=true`) it fails instead, so that CI can never pass without running it.

use crate::process::{spawn_cmd, Proc};
use std::path::Path;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Once;

const PREFIX: &str = "tt";

/// Whether the suite can run here. Skips loudly, or panics under CI.
pub fn available() -> bool {
    // Checked once per test process: parallel tests would race to create the probe namespace.
    static MISSING: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let missing = MISSING.get_or_init(missing_requirement).clone();
    match missing {
        None => {
            static CLEAN: Once = Once::new();
            CLEAN.call_once(remove_stale_namespaces);
            true
        }
        Some(why) => {
            let under_ci = std::env::var("CI").map(|v| v == "true").unwrap_or(false);
            assert!(
                !under_ci,
                "the network-namespace suite must run under CI, but cannot: {why}"
            );
            // Straight to the process's stderr: the test harness captures eprintln!, and a skip
            // must not pass unseen.
            use std::io::Write;
            let _ = write!(
                std::io::stderr().lock(),
                "\n**********\n*** SKIPPED: network-namespace test: {why}.\n*** Run the suite as root with iproute2 and iptables installed (.ci/run installs them).\n**********\n"
            );
            false
        }
    }
}

fn missing_requirement() -> Option<String> {
    let uid = Command::new("id").arg("-u").output().ok()?;
    if String::from_utf8_lossy(&uid.stdout).trim() != "0" {
        return Some("not running as root".into());
    }
    for tool in ["ip", "iptables"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            return Some(format!("{tool} is not installed"));
        }
    }
    let probe = format!("{PREFIX}-probe-{}", std::process::id());
    let ok = sh(&format!("ip netns add {probe} && ip netns del {probe}"))
        .status
        .success();
    if !ok {
        return Some("cannot create network namespaces here".into());
    }
    None
}

/// Removes namespaces left by test processes that no longer run.
fn remove_stale_namespaces() {
    let list = sh("ip netns list");
    for line in String::from_utf8_lossy(&list.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let mut parts = name.split('-');
        if parts.next() != Some(PREFIX) {
            continue;
        }
        if let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = sh(&format!("ip netns del {name}"));
            }
        }
    }
}

fn sh(cmd: &str) -> Output {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}

/// Runs a shell command and panics with its output when it fails.
pub fn sh_ok(cmd: &str) {
    let out = sh(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One test host: a network namespace.
pub struct Host {
    pub ns: String,
}

impl Host {
    /// Runs a shell command inside the host.
    pub fn sh(&self, cmd: &str) -> Output {
        sh(&format!(
            "ip netns exec {} sh -c '{}'",
            self.ns,
            cmd.replace('\'', "'\\''")
        ))
    }

    pub fn sh_ok(&self, cmd: &str) {
        let out = self.sh(cmd);
        assert!(
            out.status.success(),
            "on {}: {cmd:?} failed: {}{}",
            self.ns,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Starts a long-running program inside the host.
    pub fn spawn(
        &self,
        name: &str,
        program: &Path,
        args: &[&str],
        log: std::path::PathBuf,
    ) -> Proc {
        let mut cmd = std::process::Command::new("ip");
        cmd.args(["netns", "exec", &self.ns])
            .arg(program)
            .args(args);
        spawn_cmd(name, &mut cmd, log)
    }
}

/// A node behind a NAT router, and control-plane hosts on a LAN behind it that cannot open
/// connections to the node.
///
/// ```text
///  node 198.18.N.2 --- 198.18.N.1 nat 198.19.N.1 ---[bridge]--- 198.19.N.2 cp0
///                       (masquerades node -> LAN)        `----- 198.19.N.3 cp1 ...
/// ```
pub struct NatLab {
    pub node: Host,
    pub nat: Host,
    pub cps: Vec<Host>,
    pub node_ip: String,
    pub cp_ips: Vec<String>,
}

impl NatLab {
    /// One control-plane host.
    pub fn new() -> Self {
        Self::with_control_plane(1)
    }

    pub fn with_control_plane(count: usize) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let name = |role: &str| format!("{PREFIX}-{pid}-{n}-{role}");
        let net = n % 250 + 1;
        let lab = NatLab {
            node: Host { ns: name("node") },
            nat: Host { ns: name("nat") },
            cps: (0..count)
                .map(|i| Host {
                    ns: name(&format!("cp{i}")),
                })
                .collect(),
            node_ip: format!("198.18.{net}.2"),
            cp_ips: (0..count)
                .map(|i| format!("198.19.{net}.{}", i + 2))
                .collect(),
        };
        for h in [&lab.node, &lab.nat].into_iter().chain(lab.cps.iter()) {
            sh_ok(&format!("ip netns add {}", h.ns));
            h.sh_ok("ip link set lo up");
        }
        sh_ok(&format!(
            "ip -n {} link add eth0 type veth peer name eth0 netns {}",
            lab.node.ns, lab.nat.ns
        ));
        lab.node.sh_ok(&format!(
            "ip addr add {}/24 dev eth0 && ip link set eth0 up && ip route add default via 198.18.{net}.1",
            lab.node_ip
        ));
        lab.nat.sh_ok(&format!(
            "ip addr add 198.18.{net}.1/24 dev eth0 && ip link set eth0 up && \
             ip link add br0 type bridge && ip addr add 198.19.{net}.1/24 dev br0 && ip link set br0 up && \
             sysctl -qw net.ipv4.ip_forward=1 && \
             iptables -t nat -A POSTROUTING -o br0 -j MASQUERADE && \
             iptables -A FORWARD -i br0 -o eth0 -m conntrack --ctstate NEW -j DROP"
        ));
        for (i, (cp, ip)) in lab.cps.iter().zip(&lab.cp_ips).enumerate() {
            sh_ok(&format!(
                "ip -n {} link add cp{i} type veth peer name eth0 netns {}",
                lab.nat.ns, cp.ns
            ));
            lab.nat.sh_ok(&format!(
                "ip link set cp{i} master br0 && ip link set cp{i} up"
            ));
            cp.sh_ok(&format!(
                "ip addr add {ip}/24 dev eth0 && ip link set eth0 up"
            ));
        }
        lab
    }

    /// The first control-plane host.
    pub fn cp(&self) -> &Host {
        &self.cps[0]
    }

    pub fn cp_ip(&self) -> &str {
        &self.cp_ips[0]
    }

    /// Drops (silently) the node's UDP on the NAT router, or lets it pass again.
    pub fn drop_udp(&self, drop: bool) {
        let op = if drop { "-I" } else { "-D" };
        self.nat
            .sh_ok(&format!("iptables {op} FORWARD -p udp -j DROP"));
    }

    /// A link blackout: drops (silently) every packet between the node and the control plane,
    /// both ways, or stops.
    pub fn blackout(&self, on: bool) {
        let op = if on { "-I" } else { "-D" };
        self.nat.sh_ok(&format!(
            "iptables {op} FORWARD -i eth0 -j DROP && iptables {op} FORWARD -o eth0 -j DROP"
        ));
    }

    /// The NAT forgets its UDP mappings and gives each flow a new source port (from a range that
    /// alternates with each call), as a carrier-grade NAT does after a blackout.
    pub fn rebind_udp(&self) {
        static ROUND: AtomicU32 = AtomicU32::new(0);
        let round = ROUND.fetch_add(1, Ordering::Relaxed);
        let (new, old) = if round.is_multiple_of(2) {
            ("40000-40999", "41000-41999")
        } else {
            ("41000-41999", "40000-40999")
        };
        let rule = |ports: &str| {
            format!("POSTROUTING -t nat -o br0 -p udp -j MASQUERADE --to-ports {ports}")
        };
        self.nat.sh(&format!("iptables -D {}", rule(old)));
        self.nat.sh_ok(&format!("iptables -I {}", rule(new)));
        // conntrack exits 1 when there was nothing to forget.
        self.nat.sh("conntrack -D -p udp");
    }

    /// Drops (silently) every packet from the node to one control-plane host, or stops.
    pub fn drop_node_to(&self, cp: usize, drop: bool) {
        let op = if drop { "-I" } else { "-D" };
        self.nat.sh_ok(&format!(
            "iptables {op} FORWARD -s {} -d {} -j DROP",
            self.node_ip, self.cp_ips[cp]
        ));
    }
}

impl Default for NatLab {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NatLab {
    fn drop(&mut self) {
        for h in [&self.node, &self.nat].into_iter().chain(self.cps.iter()) {
            let _ = sh(&format!("ip netns pids {} | xargs -r kill -9", h.ns));
            let _ = sh(&format!("ip netns del {}", h.ns));
        }
    }
}
