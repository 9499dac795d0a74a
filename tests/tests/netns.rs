//! The end-to-end suite in network namespaces: real processes on separate test hosts, a NAT
//! router between node and control plane, and iptables for silent failures.

use std::time::{Duration, Instant};
use tether_tests::netns::{self, Host, NatLab};
use tether_tests::process::{bin, Proc};
use tether_tests::*;

/// The agent's readiness, asked from inside the node.
fn agent_ready(node: &Host) -> bool {
    let out = node.sh(&format!(
        "{} get 127.0.0.1:9090 /readyz",
        bin("tether-probe").display()
    ));
    String::from_utf8_lossy(&out.stdout).starts_with("200")
}

async fn wait_host(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    start.elapsed()
}

/// A server on the control plane with an echo upstream, and an agent on the node behind NAT.
struct Setup {
    _procs: Vec<Proc>,
    lab: NatLab,
    _pki: Pki,
    logs: TempDir,
}

async fn setup() -> Option<Setup> {
    if !netns::available() {
        return None;
    }
    let lab = NatLab::new();
    let pki = Pki::with_sans(std::slice::from_ref(&lab.cp_ip));
    let logs = TempDir::new("netns-logs");
    let probe = bin("tether-probe");
    let echo = lab.cp.spawn(
        "echo",
        &probe,
        &["echo", "127.0.0.1:7000"],
        logs.path().join("echo.log"),
    );
    let server = lab.cp.spawn(
        "server",
        &bin("tether-server"),
        &[
            "run",
            "--data-dir",
            pki.server_dir().to_str().unwrap(),
            "--listen",
            "0.0.0.0:9443",
            "--upstream",
            "127.0.0.1:7000",
        ],
        logs.path().join("server.log"),
    );
    let agent = lab.node.spawn(
        "agent",
        &bin("tether-agent"),
        &[
            "run",
            "--server",
            &format!("{}:9443", lab.cp_ip),
            "--data-dir",
            pki.agent_dir("edge-1").to_str().unwrap(),
            "--listen",
            "127.0.0.1:6443",
            "--admin",
            "127.0.0.1:9090",
        ],
        logs.path().join("agent.log"),
    );
    let s = Setup {
        _procs: vec![echo, server, agent],
        lab,
        _pki: pki,
        logs,
    };
    wait_host("agent ready", Duration::from_secs(20), || {
        agent_ready(&s.lab.node)
    })
    .await;
    Some(s)
}

fn check_traffic(node: &Host, streams: u32, max: u32, seed: u32) {
    let out = node.sh(&format!(
        "{} check 127.0.0.1:6443 {streams} {max} {seed}",
        bin("tether-probe").display()
    ));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "checksummed traffic failed: {text}");
    assert!(
        text.contains(&format!("passed={streams} failed=0")),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_through_nat_is_byte_exact() {
    let Some(s) = setup().await else { return };
    // The control plane cannot open a connection to the node: only the node dials out.
    let out = s.lab.cp.sh(&format!(
        "{} get {}:9090 /healthz",
        bin("tether-probe").display(),
        s.lab.node_ip
    ));
    assert!(!out.status.success(), "cp reached the node directly");
    check_traffic(&s.lab.node, 200, 1 << 20, 1);
    let log = std::fs::read_to_string(s.logs.path().join("server.log")).unwrap_or_default();
    assert!(
        log.contains("node=edge-1") || log.contains("node=\"edge-1\""),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_noticed_within_seconds() {
    let Some(s) = setup().await else { return };
    check_traffic(&s.lab.node, 20, 100_000, 2);
    // Every packet between node and control plane now vanishes: no error, no reset, silence.
    s.lab.drop_udp(true);
    let noticed = wait_host("agent notices the silence", Duration::from_secs(10), || {
        !agent_ready(&s.lab.node)
    })
    .await;
    assert!(
        noticed <= Duration::from_secs(4),
        "took {noticed:?} to notice a silent server"
    );
    // With no tunnel, a new local connection is reset at once rather than left hanging.
    let out = s.lab.node.sh(&format!(
        "timeout 3 {} check 127.0.0.1:6443 1 10 3",
        bin("tether-probe").display()
    ));
    assert!(String::from_utf8_lossy(&out.stdout).contains("failed=1"));
    // The path heals: the agent reconnects by itself and traffic flows again.
    s.lab.drop_udp(false);
    wait_host("agent reconnects", Duration::from_secs(15), || {
        agent_ready(&s.lab.node)
    })
    .await;
    check_traffic(&s.lab.node, 50, 200_000, 4);
}
