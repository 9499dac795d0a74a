//! The end-to-end suite in network namespaces: real processes on separate test hosts, a NAT
//! router between node and control plane, and iptables for silent failures.

use std::time::{Duration, Instant};
use tether_tests::netns::{self, Host, NatLab};
use tether_tests::process::{bin, exit, Proc};
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
    wait_for(what, deadline, || std::future::ready(cond())).await;
    start.elapsed()
}

/// Like `wait_host`, but says whether the condition came true instead of panicking.
async fn within_host(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    eventually(deadline, || std::future::ready(cond())).await
}

/// A server on the control plane with an echo upstream, and an agent on the node behind NAT.
struct Setup {
    _procs: Vec<Proc>,
    lab: NatLab,
    _pki: Pki,
    logs: TempDir,
}

async fn setup() -> Option<Setup> {
    let (s, _) = start_pair(false).await?;
    wait_host("agent ready", Duration::from_secs(20), || {
        agent_ready(&s.lab.node)
    })
    .await;
    Some(s)
}

/// An echo upstream and a server listening on 0.0.0.0:9443 on the lab's control-plane host;
/// returns once the server listens.
async fn start_cp_server(lab: &NatLab, pki: &Pki, logs: &std::path::Path) -> Vec<Proc> {
    let echo = lab.cp().spawn(
        "echo",
        &bin("tether-probe"),
        &["echo", "127.0.0.1:7000"],
        logs.join("echo.log"),
    );
    let server = lab.cp().spawn(
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
        logs.join("server.log"),
    );
    wait_host("server listening", Duration::from_secs(10), || {
        lab.cp()
            .sh("ss -Hltn 'sport = :9443' | grep -q LISTEN")
            .status
            .success()
    })
    .await;
    vec![echo, server]
}

/// A server on the control plane and an agent (default transport: auto) behind the NAT host,
/// the NAT host dropping UDP or not; with the time the agent was started.
async fn start_pair(udp_blocked: bool) -> Option<(Setup, std::time::Instant)> {
    if !netns::available() {
        return None;
    }
    let lab = NatLab::new();
    if udp_blocked {
        lab.drop_udp(true);
    }
    let pki = Pki::with_sans(&[lab.cp_ip().to_string()]);
    let logs = TempDir::new("netns-logs");
    // The server is listening before the clock starts.
    let mut procs = start_cp_server(&lab, &pki, logs.path()).await;
    let started = std::time::Instant::now();
    let agent = lab.node.spawn(
        "agent",
        &bin("tether-agent"),
        &[
            "run",
            "--server",
            &format!("{}:9443", lab.cp_ip()),
            "--data-dir",
            pki.agent_dir("edge-1").to_str().unwrap(),
            "--listen",
            "127.0.0.1:6443",
            "--admin",
            "127.0.0.1:9090",
        ],
        logs.path().join("agent.log"),
    );
    procs.push(agent);
    Some((
        Setup {
            _procs: procs,
            lab,
            _pki: pki,
            logs,
        },
        started,
    ))
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

/// A long-lived connection through the node's agent (`tether-probe hold`): it echoes a few
/// bytes now and then, and logs `broke` if the connection ends.
struct Held(Proc);

impl Held {
    fn start(node: &Host, name: &str, logs: &std::path::Path) -> Held {
        Held(node.spawn(
            name,
            &bin("tether-probe"),
            &["hold", "127.0.0.1:6443"],
            logs.join(format!("{name}.log")),
        ))
    }

    fn text(&self) -> String {
        self.0.log_text()
    }

    fn echoes(&self) -> usize {
        self.text().matches("hold echoes=").count()
    }

    fn broke(&self) -> bool {
        self.text().contains("broke")
    }

    /// Waits for its first echo.
    async fn echoing(&self, what: &str) {
        wait_host(what, Duration::from_secs(10), || self.echoes() > 0).await;
    }

    /// Waits for two more echoes than now, or for the break; whether it carried on.
    async fn carries_on(&self, what: &str) -> bool {
        let now = self.echoes();
        wait_host(what, Duration::from_secs(20), || {
            self.echoes() > now + 1 || self.broke()
        })
        .await;
        !self.broke()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forward_through_nat_is_byte_exact() {
    let Some(s) = setup().await else { return };
    // The control plane cannot open a connection to the node: only the node dials out.
    let out = s.lab.cp().sh(&format!(
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

/// A blackout of the whole link (UDP and TCP alike), with the NAT rebinding in it, keeps the
/// QUIC tunnel and its streams. When the link returns, a new TCP handshake is answered at once,
/// while the server hears QUIC again only when the agent next sends, after a retransmission
/// backoff that grew through the blackout: the soak across a cellular link found the agent
/// taking that for lost UDP, moving to TCP and resetting every stream of the tunnel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_blackout_keeps_quic_and_its_streams() {
    let Some(s) = setup().await else { return };
    let hold = Held::start(&s.lab.node, "hold", s.logs.path());
    hold.echoing("a held connection").await;
    s.lab.blackout(true);
    let dark = std::time::Instant::now();
    wait_host("a second of blackout", Duration::from_secs(10), || {
        dark.elapsed() >= Duration::from_secs(1)
    })
    .await;
    s.lab.rebind_udp();
    wait_host("four seconds of blackout", Duration::from_secs(10), || {
        dark.elapsed() >= Duration::from_secs(4)
    })
    .await;
    s.lab.blackout(false);
    let carried = hold
        .carries_on("the held connection's echoes after the blackout")
        .await;
    let agent_log = std::fs::read_to_string(s.logs.path().join("agent.log")).unwrap_or_default();
    assert!(carried, "{}\n{agent_log}", hold.text());
    assert!(!agent_log.contains("moved to TCP"), "{agent_log}");
    assert_eq!(
        metric_on(
            &s.lab.node,
            "127.0.0.1:9090",
            "tether_tunnels_by_transport{transport=\"quic\"}",
        ),
        Some(1.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_server_is_noticed_within_seconds() {
    let Some(s) = setup().await else { return };
    check_traffic(&s.lab.node, 20, 100_000, 2);
    // Every packet between node and control plane now vanishes: no error, no reset, silence.
    s.lab.drop_udp(true);
    // A connection made before the agent notices goes to the dead tunnel, which never
    // answers; it is carried by the tunnel that succeeds it (TLS over TCP), not lost.
    let unnoticed = s.lab.node.spawn(
        "unnoticed",
        &bin("tether-probe"),
        &["check", "127.0.0.1:6443", "1", "10", "5"],
        s.logs.path().join("unnoticed.log"),
    );
    // With one server, a silence of QUIC alone looks like a link blackout (held for the
    // tolerance); the TCP tunnel the agent tries beside it tells it apart, and the link moves.
    let noticed = wait_host("agent moves to TCP", Duration::from_secs(10), || {
        metric_on(
            &s.lab.node,
            "127.0.0.1:9090",
            "tether_tunnels_by_transport{transport=\"tcp\"}",
        ) == Some(1.0)
    })
    .await;
    assert!(
        noticed <= Duration::from_secs(4),
        "took {noticed:?} to notice a silent server"
    );
    // A new local connection is carried over TCP.
    let out = s.lab.node.sh(&format!(
        "timeout 10 {} check 127.0.0.1:6443 1 10 3",
        bin("tether-probe").display()
    ));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("passed=1"),
        "{text}\n{}",
        std::fs::read_to_string(s.logs.path().join("agent.log")).unwrap_or_default()
    );
    wait_host(
        "the unnoticed connection ends",
        Duration::from_secs(20),
        || unnoticed.log_text().contains("probe: passed="),
    )
    .await;
    assert!(
        unnoticed.log_text().contains("passed=1"),
        "{}",
        unnoticed.log_text()
    );
    // The connection made before the move waited for the TCP tunnel (the one made after it
    // found it up). With one server QUIC's silence looks like a dark link, so its open is held
    // first, until the move and the transports' catching up after it (see `Watch::dark`).
    let waited = metric_on(
        &s.lab.node,
        "127.0.0.1:9090",
        "tether_connections_waited_total",
    );
    assert!(waited.unwrap_or(0.0) >= 1.0, "{waited:?}");
    // The path heals: the agent reconnects by itself and traffic flows again.
    s.lab.drop_udp(false);
    wait_host("agent reconnects", Duration::from_secs(15), || {
        agent_ready(&s.lab.node)
    })
    .await;
    check_traffic(&s.lab.node, 50, 200_000, 4);
}

/// Reads one metric from an admin endpoint inside a host.
fn metric_on(host: &Host, admin: &str, name: &str) -> Option<f64> {
    let out = host.sh(&format!(
        "{} get {admin} /metrics",
        bin("tether-probe").display()
    ));
    metric(&String::from_utf8_lossy(&out.stdout), name)
}

/// Three servers on the control-plane LAN, peers of each other, each with its own upstream.
struct ControlPlane {
    lab: NatLab,
    pki_dir: TempDir,
    servers: Vec<Option<Proc>>,
    upstreams: Vec<Option<Proc>>,
}

impl ControlPlane {
    fn data_dir(&self, i: usize) -> std::path::PathBuf {
        self.pki_dir.path().join(format!("server{i}"))
    }

    /// As an operator would: `init` on the first server, its CA copied to the others before
    /// their `init`.
    fn new() -> Self {
        let lab = NatLab::with_control_plane(3);
        let pki_dir = TempDir::new("ha-pki");
        let cp = ControlPlane {
            lab,
            pki_dir,
            servers: vec![],
            upstreams: vec![],
        };
        let server = bin("tether-server");
        for i in 0..3 {
            let d = cp.data_dir(i);
            if i > 0 {
                std::fs::create_dir_all(&d).unwrap();
                for f in ["ca.crt", "ca.key"] {
                    std::fs::copy(cp.data_dir(0).join(f), d.join(f)).unwrap();
                }
            }
            tether_tests::process::run_ok(
                &server,
                &[
                    "init",
                    "--data-dir",
                    d.to_str().unwrap(),
                    "--san",
                    &cp.lab.cp_ips[i],
                ],
            );
        }
        tether_tests::process::run_ok(
            &server,
            &[
                "issue-agent",
                "--data-dir",
                cp.data_dir(0).to_str().unwrap(),
                "--node-name",
                "edge-1",
                "--out-dir",
                cp.pki_dir.path().join("node").to_str().unwrap(),
            ],
        );
        cp
    }

    fn start_upstream(&mut self, i: usize) {
        let p = self.lab.cps[i].spawn(
            "echo",
            &bin("tether-probe"),
            &["echo", "127.0.0.1:7000"],
            self.pki_dir.path().join(format!("echo{i}.log")),
        );
        if self.upstreams.len() <= i {
            self.upstreams.resize_with(i + 1, || None);
        }
        self.upstreams[i] = Some(p);
    }

    fn start_server(&mut self, i: usize) {
        let d = self.data_dir(i);
        let mut args: Vec<String> = [
            "run",
            "--data-dir",
            d.to_str().unwrap(),
            "--listen",
            "0.0.0.0:9443",
            "--upstream",
            "127.0.0.1:7000",
            "--admin",
            "127.0.0.1:9444",
            "--drain-timeout",
            "10s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for (j, ip) in self.lab.cp_ips.iter().enumerate() {
            if j != i {
                args.push("--peer".into());
                args.push(format!("{ip}:9443"));
            }
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let p = self.lab.cps[i].spawn(
            "server",
            &bin("tether-server"),
            &args,
            self.pki_dir
                .path()
                .join(format!("server{i}-{}.log", fastrand::u32(..))),
        );
        if self.servers.len() <= i {
            self.servers.resize_with(i + 1, || None);
        }
        self.servers[i] = Some(p);
    }

    fn agent_metric(&self, name: &str) -> f64 {
        metric_on(&self.lab.node, "127.0.0.1:9090", name).unwrap_or(-1.0)
    }

    /// Three servers, each with its upstream.
    fn with_three_servers() -> Self {
        let mut cp = ControlPlane::new();
        for i in 0..3 {
            cp.start_upstream(i);
            cp.start_server(i);
        }
        cp
    }

    /// The node's agent, given only the first server (it learns the others), its admin on
    /// 127.0.0.1:9090 and its log in agent.log.
    fn start_agent(&self) -> Proc {
        let node_dir = self.pki_dir.path().join("node");
        self.lab.node.spawn(
            "agent",
            &bin("tether-agent"),
            &[
                "run",
                "--server",
                &format!("{}:9443", self.lab.cp_ips[0]),
                "--data-dir",
                node_dir.to_str().unwrap(),
                "--listen",
                "127.0.0.1:6443",
                "--admin",
                "127.0.0.1:9090",
            ],
            self.pki_dir.path().join("agent.log"),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_servers_survive_kills_restarts_drains_and_partitions() {
    if !netns::available() {
        return;
    }
    let mut cp = ControlPlane::with_three_servers();
    let _agent = cp.start_agent();
    wait_host(
        "agent learns all three servers",
        Duration::from_secs(30),
        || cp.agent_metric("tether_tunnels_up") == 3.0,
    )
    .await;

    // Continuous new connections while every server, the first included, is killed with -9,
    // restarted, drained with SIGTERM and restarted again.
    let stop = cp.pki_dir.path().join("stop-load");
    let load = cp.lab.node.spawn(
        "load",
        &bin("tether-probe"),
        &["load", "127.0.0.1:6443", "100", stop.to_str().unwrap()],
        cp.pki_dir.path().join("load.log"),
    );
    for i in 0..3 {
        if let Some(p) = cp.servers[i].as_ref() {
            p.signal("KILL");
        }
        wait_host(
            "agent drops the killed server",
            Duration::from_secs(10),
            || cp.agent_metric("tether_tunnels_up") == 2.0,
        )
        .await;
        cp.start_server(i);
        wait_host("agent reconnects", Duration::from_secs(30), || {
            cp.agent_metric("tether_tunnels_up") == 3.0
        })
        .await;
        let mut p = cp.servers[i].take().unwrap();
        p.signal("TERM");
        let status = within(
            "drained server exits",
            Duration::from_secs(15),
            exit(&mut p),
        )
        .await;
        assert!(status.success(), "server {i} exit after SIGTERM: {status}");
        cp.start_server(i);
        wait_host(
            "agent reconnects after drain",
            Duration::from_secs(30),
            || cp.agent_metric("tether_tunnels_up") == 3.0,
        )
        .await;
    }
    std::fs::write(&stop, b"").unwrap();
    let mut load = load;
    within("load ends", Duration::from_secs(30), exit(&mut load)).await;
    let report = load.log_text();
    let failed: usize = report
        .lines()
        .find_map(|l| {
            l.strip_prefix("probe: passed=")
                .and_then(|r| r.split("failed=").nth(1))
        })
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no load report: {report}"));
    let passed: usize = report
        .lines()
        .find_map(|l| {
            l.strip_prefix("probe: passed=")
                .and_then(|r| r.split_whitespace().next())
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    // One connection in flight on a server killed with -9 may be reset: at most one per kill.
    assert!(
        failed <= 3,
        "{failed} of {} new connections failed:\n{report}",
        passed + failed
    );
    // 100 a second for as long as the kills, restarts and drains take (a few seconds now that
    // a killed server is noticed at once): the load ran.
    assert!(passed > 200, "the load ran: {report}");
    eprintln!("load through kills, restarts and drains: {passed} passed, {failed} failed");

    // A long transfer on a server killed with -9 gets its reset within 3 s.
    let hold = Held::start(&cp.lab.node, "hold", cp.pki_dir.path());
    hold.echoing("hold connected").await;
    let mut carrier = None;
    wait_host("find the carrying server", Duration::from_secs(10), || {
        carrier = (0..3).find(|&i| {
            metric_on(&cp.lab.cps[i], "127.0.0.1:9444", "tether_streams_open") == Some(1.0)
        });
        carrier.is_some()
    })
    .await;
    let carrier = carrier.unwrap();
    let killed_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    cp.servers[carrier].as_ref().unwrap().signal("KILL");
    wait_host("hold broken", Duration::from_secs(10), || hold.broke()).await;
    let text = hold.text();
    let broke: u128 = text
        .split("at-ms=")
        .nth(1)
        .and_then(|r| r.split(':').next())
        .and_then(|n| n.parse().ok())
        .unwrap();
    let took = broke.saturating_sub(killed_at);
    assert!(
        took <= 3000,
        "the long transfer got its reset {took} ms after the kill: {text}"
    );
    eprintln!("long transfer reset {took} ms after kill -9");
    cp.start_server(carrier);
    wait_host("all three back", Duration::from_secs(30), || {
        cp.agent_metric("tether_tunnels_up") == 3.0
    })
    .await;

    // Peer relay: the agent reaches only the first server, whose upstream is down.
    cp.lab.drop_node_to(1, true);
    cp.lab.drop_node_to(2, true);
    cp.upstreams[0] = None; // killed on drop

    // Idle tunnels to the unreachable servers are probed only every 25 s, but new connections
    // ask them (when the policy picks them, or as a hedge while the first server relays through
    // its peers), are carried by the first server meanwhile, and the silence while the first
    // server answers closes them. New connections keep coming while the test waits: which
    // server a connection asks depends on timing: once, with the whole suite running, the
    // twenty connections above left the others unasked through the wait (the reason is a
    // guess: no log survived).
    check_traffic(&cp.lab.node, 20, 100_000, 9);
    wait_host(
        "only the first server left, unhealthy",
        Duration::from_secs(15),
        || {
            check_traffic(&cp.lab.node, 2, 10_000, 9);
            cp.agent_metric("tether_tunnels_up") == 1.0
                && cp.agent_metric(&format!(
                    "tether_server_healthy{{server=\"{}:9443\"}}",
                    cp.lab.cp_ips[0]
                )) == 0.0
        },
    )
    .await;
    check_traffic(&cp.lab.node, 50, 100_000, 9);
    let relayed = metric_on(
        &cp.lab.cps[0],
        "127.0.0.1:9444",
        "tether_peer_relayed_streams_total",
    );
    assert!(relayed >= Some(50.0), "relayed through peers: {relayed:?}");
}

/// curl's answer through an egress proxy: the CONNECT status, and the body when it worked.
/// A stream left on a tunnel its successor replaced is reset when its server's host dies, not
/// left hanging. Here the retired tunnel is the TCP one a link leaves when UDP returns and it moves
/// to QUIC; in the soak across a cellular link it was the tunnel a certificate renewal left,
/// and a watch on it hung when its server was killed: nothing watched that tunnel any more
/// (QUIC's own idle timeout, and TCP's, are the blackout tolerance and 5 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_on_a_retired_tunnel_is_reset_when_its_server_dies() {
    if !netns::available() {
        return;
    }
    let cp = ControlPlane::with_three_servers();
    cp.lab.drop_udp(true);
    let _agent = cp.start_agent();
    let by = |t: &str| format!("tether_tunnels_by_transport{{transport=\"{t}\"}}");
    wait_host("three tunnels over TCP", Duration::from_secs(30), || {
        cp.agent_metric(&by("tcp")) == 3.0
    })
    .await;
    let hold = Held::start(&cp.lab.node, "hold", cp.pki_dir.path());
    let mut carrier = None;
    wait_host("the held stream's server", Duration::from_secs(10), || {
        carrier = (0..3).find(|&i| {
            metric_on(&cp.lab.cps[i], "127.0.0.1:9444", "tether_streams_open") == Some(1.0)
        });
        carrier.is_some()
    })
    .await;
    let carrier = carrier.unwrap();
    // UDP returns: the links move to QUIC, and the held stream stays on its TCP tunnel.
    cp.lab.drop_udp(false);
    wait_host("three tunnels over QUIC", Duration::from_secs(30), || {
        cp.agent_metric(&by("quic")) == 3.0
    })
    .await;
    assert!(!hold.broke(), "{}", hold.text());
    // Its host goes away: killed, and silent (no reset from its kernel either).
    let killed = std::time::Instant::now();
    cp.lab.drop_node_to(carrier, true);
    cp.lab.nat.sh_ok(&format!(
        "iptables -I FORWARD -s {} -j DROP",
        cp.lab.cp_ips[carrier]
    ));
    cp.servers[carrier].as_ref().unwrap().signal("KILL");
    let reset = within_host(Duration::from_secs(8), || hold.broke()).await;
    let agent_log =
        std::fs::read_to_string(cp.pki_dir.path().join("agent.log")).unwrap_or_default();
    assert!(
        reset,
        "the stream on the retired tunnel hung for {:?} after its server was killed:\n{agent_log}",
        killed.elapsed()
    );
}

fn curl_via(host: &Host, proxy: &str, url: &str, ca: &std::path::Path) -> (String, String) {
    let out = host.sh(&format!(
        "curl -sS --max-time 20 --proxytunnel --proxy http://{proxy} --cacert {} -w '\\n%{{http_connect}}' {url}",
        ca.display()
    ));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
    (code.trim().to_string(), body.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_reaches_a_kubelet_behind_nat() {
    if !netns::available() {
        return;
    }
    let lab = NatLab::with_control_plane(2);
    let dir = TempDir::new("reverse");
    let server_bin = bin("tether-server");
    let (d0, d1) = (dir.path().join("s0"), dir.path().join("s1"));
    tether_tests::process::run_ok(
        &server_bin,
        &[
            "init",
            "--data-dir",
            d0.to_str().unwrap(),
            "--san",
            &lab.cp_ips[0],
        ],
    );
    std::fs::create_dir_all(&d1).unwrap();
    for f in ["ca.crt", "ca.key"] {
        std::fs::copy(d0.join(f), d1.join(f)).unwrap();
    }
    tether_tests::process::run_ok(
        &server_bin,
        &[
            "init",
            "--data-dir",
            d1.to_str().unwrap(),
            "--san",
            &lab.cp_ips[1],
        ],
    );
    let node_dir = dir.path().join("node");
    tether_tests::process::run_ok(
        &server_bin,
        &[
            "issue-agent",
            "--data-dir",
            d0.to_str().unwrap(),
            "--node-name",
            "edge-1",
            "--out-dir",
            node_dir.to_str().unwrap(),
        ],
    );
    // The kubelet's serving certificate names the node and its address.
    let ca = tether_trust::Ca::load(&d0).unwrap();
    ca.issue_server(
        &["edge-1".into(), lab.node_ip.clone()],
        tether_trust::Lifetime::days(1),
    )
    .unwrap()
    .save(
        &dir.path().join("kubelet.crt"),
        &dir.path().join("kubelet.key"),
    )
    .unwrap();
    let probe = bin("tether-probe");
    let log = |n: &str| dir.path().join(format!("{n}.log"));
    let mut procs = Vec::new();
    for (i, d) in [&d0, &d1].iter().enumerate() {
        let other = &lab.cp_ips[1 - i];
        procs.push(lab.cps[i].spawn(
            "server",
            &server_bin,
            &[
                "run",
                "--data-dir",
                d.to_str().unwrap(),
                "--listen",
                "0.0.0.0:9443",
                "--upstream",
                "127.0.0.1:7000",
                "--egress-listen",
                "127.0.0.1:8131",
                "--peer",
                &format!("{other}:9443"),
            ],
            log(&format!("server{i}")),
        ));
    }
    procs.push(lab.node.spawn(
        "kubelet",
        &probe,
        &[
            "kubelet",
            "0.0.0.0:10250",
            dir.path().join("kubelet.crt").to_str().unwrap(),
            dir.path().join("kubelet.key").to_str().unwrap(),
        ],
        log("kubelet"),
    ));
    procs.push(lab.node.spawn(
        "kubelet-http",
        &probe,
        &["kubelet", "0.0.0.0:10251"],
        log("kubelet-http"),
    ));
    procs.push(
        lab.node
            .spawn("echo", &probe, &["echo", "0.0.0.0:7001"], log("echo")),
    );
    // A CNI bridge and IPVS's interface of Service ClusterIPs (a dummy device on a real node;
    // a bridge here, where the kernel has no dummy) on the node: the control plane
    // must never reach those through tether (they forward into pods and other nodes).
    let cni_ip = "10.244.7.1";
    lab.node.sh_ok(&format!(
        "ip link add cni0 type bridge && ip addr add {cni_ip}/24 dev cni0 && ip link set cni0 up && \
         ip link add kube-ipvs0 type bridge && ip addr add 10.96.0.10/32 dev kube-ipvs0 && ip link set kube-ipvs0 up"
    ));
    // The node reaches only the first server.
    lab.drop_node_to(1, true);
    procs.push(lab.node.spawn(
        "agent",
        &bin("tether-agent"),
        &[
            "run",
            "--server",
            &format!("{}:9443", lab.cp_ips[0]),
            "--data-dir",
            node_dir.to_str().unwrap(),
            "--listen",
            "127.0.0.1:6443",
            "--admin",
            "127.0.0.1:9090",
            "--allow-port",
            "7001",
        ],
        log("agent"),
    ));
    wait_host("agent ready", Duration::from_secs(20), || {
        agent_ready(&lab.node)
    })
    .await;
    let ca_file = d0.join("ca.crt");

    // By node name and by node IP: TLS end to end to the kubelet, through the tunnel.
    let mut ok = (String::new(), String::new());
    wait_host("CONNECT by name", Duration::from_secs(10), || {
        ok = curl_via(
            &lab.cps[0],
            "127.0.0.1:8131",
            "https://edge-1:10250/version",
            &ca_file,
        );
        ok.0 == "200"
    })
    .await;
    assert!(ok.1.contains("kubelet"), "{ok:?}");
    let mut by_ip = (String::new(), String::new());
    wait_host("CONNECT by node IP", Duration::from_secs(10), || {
        by_ip = curl_via(
            &lab.cps[0],
            "127.0.0.1:8131",
            &format!("https://{}:10250/version", lab.node_ip),
            &ca_file,
        );
        by_ip.0 == "200"
    })
    .await;
    assert!(by_ip.1.contains("kubelet"), "{by_ip:?}");
    // A port the agent does not allow, and an unknown node.
    let (code, _) = curl_via(
        &lab.cps[0],
        "127.0.0.1:8131",
        "http://edge-1:10251/",
        &ca_file,
    );
    assert_eq!(code, "403");
    let (code, _) = curl_via(
        &lab.cps[0],
        "127.0.0.1:8131",
        &format!("http://{}:10251/", lab.node_ip),
        &ca_file,
    );
    assert_eq!(code, "403");
    let (code, _) = curl_via(
        &lab.cps[0],
        "127.0.0.1:8131",
        "https://no-such-node:10250/",
        &ca_file,
    );
    assert_eq!(code, "404");
    // The CNI and ClusterIP addresses are not the node's: nobody owns them, so nothing reaches
    // them (before 0.3 the agent reported every interface address, port 7001 allowed on each).
    for ip in [cni_ip, "10.96.0.10"] {
        let (code, _) = curl_via(
            &lab.cps[0],
            "127.0.0.1:8131",
            &format!("http://{ip}:7001/"),
            &ca_file,
        );
        assert_eq!(code, "404", "{ip}");
    }
    // The second server has no tunnel from the node: it serves the CONNECT through its peer.
    let mut via_peer = (String::new(), String::new());
    wait_host("CONNECT through the peer", Duration::from_secs(10), || {
        via_peer = curl_via(
            &lab.cps[1],
            "127.0.0.1:8131",
            "https://edge-1:10250/version",
            &ca_file,
        );
        via_peer.0 == "200"
    })
    .await;
    assert!(via_peer.1.contains("kubelet"), "{via_peer:?}");
    // Throughput and many concurrent reverse streams, byte-exact, from both servers.
    for cp in &lab.cps {
        let out = cp.sh(&format!(
            "{} connect-check 127.0.0.1:8131 edge-1:7001 100 1048576 5",
            probe.display()
        ));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.contains("passed=100 failed=0"), "{text}");
    }

    // The node's link blacks out for 12 s (a handover, a dish losing its satellite): a reverse
    // session open through it (`exec`) stalls and carries on, and one asked for during the
    // blackout waits for the link and goes through. Before, the server gave up on the open's
    // verdict after 10 s and answered 504.
    procs.push(lab.cps[0].spawn(
        "hold",
        &probe,
        &["connect-hold", "127.0.0.1:8131", "edge-1:7001"],
        log("hold"),
    ));
    let read = |n: &str| std::fs::read_to_string(log(n)).unwrap_or_default();
    wait_host("a held reverse session", Duration::from_secs(10), || {
        read("hold").contains("hold connected")
    })
    .await;
    lab.blackout(true);
    let dark = std::time::Instant::now();
    wait_host("a second into the blackout", Duration::from_secs(5), || {
        dark.elapsed() >= Duration::from_secs(1)
    })
    .await;
    let during = lab.cps[0].spawn(
        "connect-during",
        &probe,
        &[
            "connect-check",
            "127.0.0.1:8131",
            "edge-1:7001",
            "4",
            "65536",
            "17",
        ],
        log("connect-during"),
    );
    wait_host("the blackout's end", Duration::from_secs(15), || {
        dark.elapsed() >= Duration::from_secs(12)
    })
    .await;
    lab.blackout(false);
    wait_host(
        "the open asked for in the blackout",
        Duration::from_secs(30),
        || read("connect-during").contains("probe: passed="),
    )
    .await;
    let text = read("connect-during");
    assert!(text.contains("passed=4 failed=0"), "{text}");
    // The held session answers again, and never broke.
    let echoes = |t: &str| t.matches("hold echoes=").count();
    let at_end = echoes(&read("hold"));
    wait_host(
        "the held session's echoes after the blackout",
        Duration::from_secs(20),
        || echoes(&read("hold")) > at_end + 1,
    )
    .await;
    assert!(!read("hold").contains("broke"), "{}", read("hold"));
    drop(during);
    drop(procs);
}

fn agent_metric(node: &Host, name: &str) -> f64 {
    metric_on(node, "127.0.0.1:9090", name).unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_udp_the_agent_falls_back_to_tcp_and_returns_to_quic() {
    let Some((s, started)) = start_pair(true).await else {
        return;
    };
    let up = within_host(Duration::from_secs(10), || agent_ready(&s.lab.node)).await;
    let log = std::fs::read_to_string(s.logs.path().join("agent.log")).unwrap_or_default();
    assert!(up, "agent not up over TCP:\n{log}");
    let took = started.elapsed();
    assert!(took <= Duration::from_secs(3), "up over TCP after {took:?}");
    assert_eq!(
        agent_metric(
            &s.lab.node,
            "tether_tunnels_by_transport{transport=\"tcp\"}"
        ),
        1.0
    );
    eprintln!("phase: traffic over TCP");
    check_traffic(&s.lab.node, 100, 500_000, 11);

    // UDP gets through again: the agent moves to QUIC, and traffic keeps flowing throughout.
    let hold = Held::start(&s.lab.node, "hold", s.logs.path());
    hold.echoing("hold connected").await;
    s.lab.drop_udp(false);
    wait_host("moved to QUIC", Duration::from_secs(30), || {
        agent_metric(
            &s.lab.node,
            "tether_tunnels_by_transport{transport=\"quic\"}",
        ) == 1.0
    })
    .await;
    eprintln!("phase: traffic over QUIC");
    check_traffic(&s.lab.node, 100, 500_000, 12);
    assert!(
        !hold.broke(),
        "the stream open on TCP finished there: {}",
        hold.text()
    );
    let log = std::fs::read_to_string(s.logs.path().join("agent.log")).unwrap_or_default();
    assert!(
        log.contains("moving to a new tunnel") && log.contains("moved to QUIC"),
        "{log}"
    );
}

/// A move to TCP leaves the streams open on QUIC there while QUIC may still answer: TCP
/// answering while QUIC stays silent is lost UDP, or a QUIC connection whose retransmission
/// backoff grew through a blackout, and the soak across a cellular link saw the second reset
/// every stream of such tunnels. A QUIC that is heard again keeps its streams; one that stays
/// silent has them reset, within `QUIC_RETIRED_GRACE` (10 s) of the move, never left hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_left_on_quic_by_a_move_to_tcp_live_if_quic_returns() {
    let Some((s, _)) = start_pair(false).await else {
        return;
    };
    wait_host("agent up", Duration::from_secs(10), || {
        agent_ready(&s.lab.node)
    })
    .await;
    let agent_log = || std::fs::read_to_string(s.logs.path().join("agent.log")).unwrap_or_default();
    let first = Held::start(&s.lab.node, "first", s.logs.path());
    first.echoing("a held connection on QUIC").await;
    // UDP goes: the agent moves to TCP. UDP comes back at once, and QUIC is heard again.
    s.lab.drop_udp(true);
    wait_host("moved to TCP", Duration::from_secs(20), || {
        agent_log().contains("moved to TCP")
    })
    .await;
    s.lab.drop_udp(false);
    let carried = first
        .carries_on("the held connection's echoes after QUIC returned")
        .await;
    assert!(carried, "{}\n{}", first.text(), agent_log());
    assert!(
        !agent_log().contains("QUIC still silent"),
        "{}",
        agent_log()
    );

    // Back on QUIC (the agent tries every 5 s), a second connection; then UDP goes for good.
    wait_host("back on QUIC", Duration::from_secs(30), || {
        agent_metric(
            &s.lab.node,
            "tether_tunnels_by_transport{transport=\"quic\"}",
        ) == 1.0
    })
    .await;
    let second = Held::start(&s.lab.node, "second", s.logs.path());
    second.echoing("a second held connection on QUIC").await;
    s.lab.drop_udp(true);
    let blocked = std::time::Instant::now();
    wait_host(
        "the stream on a silent QUIC reset",
        Duration::from_secs(40),
        || second.broke(),
    )
    .await;
    let took = blocked.elapsed();
    // The move to TCP (about 3 s), then the grace.
    assert!(took <= Duration::from_secs(20), "reset after {took:?}");
    assert!(agent_log().contains("QUIC still silent"), "{}", agent_log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nat_rebinding_does_not_drop_a_quic_tunnel() {
    let Some((s, _)) = start_pair(false).await else {
        return;
    };
    wait_host("agent up", Duration::from_secs(10), || {
        agent_ready(&s.lab.node)
    })
    .await;
    assert_eq!(
        agent_metric(
            &s.lab.node,
            "tether_tunnels_by_transport{transport=\"quic\"}"
        ),
        1.0
    );
    let hold = Held::start(&s.lab.node, "hold", s.logs.path());
    hold.echoing("hold connected").await;
    let before = s.lab.nat.sh("conntrack -L -p udp 2>/dev/null");
    // The NAT host forgets its mapping and maps the node's UDP to a new port range.
    s.lab.nat.sh_ok(
        "iptables -t nat -I POSTROUTING 1 -o br0 -p udp -j MASQUERADE --to-ports 41000-41999 && conntrack -D -p udp >/dev/null 2>&1; true",
    );
    // Traffic across the change, then a check that the mapping really moved.
    check_traffic(&s.lab.node, 50, 1_000_000, 13);
    let after = s.lab.nat.sh("conntrack -L -p udp 2>/dev/null");
    let after = String::from_utf8_lossy(&after.stdout);
    assert!(
        after.contains("sport=41") || after.contains("dport=41"),
        "new mapping: {after}\nbefore: {}",
        String::from_utf8_lossy(&before.stdout)
    );
    assert!(!hold.broke(), "{}", hold.text());
    assert_eq!(
        agent_metric(&s.lab.node, "tether_tunnel_connects_total"),
        1.0,
        "no reconnect"
    );
}

/// Whether squid (Debian's `squid`) is installed; without it the proxy test says SKIPPED
/// loudly, and under CI (`.ci/run` installs it) fails.
fn squid_or_skip(test: &str) -> bool {
    if std::path::Path::new("/usr/sbin/squid").exists() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{test}: no squid under CI (install Debian's squid)"
    );
    eprintln!("\n**********\n*** SKIPPED: {test}: no /usr/sbin/squid\n**********\n");
    false
}

/// Starts squid on `host`, listening on `ip:3128`, with basic authentication (`tether` /
/// `secret`) and CONNECT allowed to port 9443 alone; returns it and its access log.
async fn start_squid(host: &Host, ip: &str, dir: &std::path::Path) -> (Proc, std::path::PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    // squid started as root runs as the user `proxy`, which must write here.
    std::fs::create_dir_all(dir).unwrap();
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let hash = tether_tests::process::run_ok(
        std::path::Path::new("openssl"),
        &["passwd", "-apr1", "secret"],
    );
    let passwd = dir.join("passwd");
    std::fs::write(&passwd, format!("tether:{}\n", hash.trim())).unwrap();
    let d = dir.display();
    let access = dir.join("access.log");
    let conf = dir.join("squid.conf");
    std::fs::write(
        &conf,
        format!(
            "http_port {ip}:3128\n\
             pid_filename {d}/squid.pid\n\
             access_log stdio:{d}/access.log\n\
             cache_log {d}/cache.log\n\
             netdb_filename none\n\
             coredump_dir {d}\n\
             cache deny all\n\
             shutdown_lifetime 1 seconds\n\
             auth_param basic program /usr/lib/squid/basic_ncsa_auth {d}/passwd\n\
             auth_param basic realm tether\n\
             acl tunnel_port port 9443\n\
             acl CONNECT method CONNECT\n\
             acl authed proxy_auth REQUIRED\n\
             http_access deny !CONNECT\n\
             http_access deny CONNECT !tunnel_port\n\
             http_access allow authed\n\
             http_access deny all\n"
        ),
    )
    .unwrap();
    let squid = host.spawn(
        "squid",
        std::path::Path::new("/usr/sbin/squid"),
        &["-N", "-f", conf.to_str().unwrap()],
        dir.join("squid.out"),
    );
    wait_host("squid listening", Duration::from_secs(20), || {
        host.sh("ss -Hltn 'sport = :3128' | grep -q LISTEN")
            .status
            .success()
    })
    .await;
    (squid, access)
}

/// A node at a site that reaches the outside only through an HTTP proxy (squid, with basic
/// authentication): the NAT host forwards nothing from the node, so QUIC gets nowhere. The
/// agent, told of the proxy by `HTTPS_PROXY`, joins with a token through it and keeps its
/// tunnel over TLS/TCP through the proxy's `CONNECT`; `status` names the proxy, and squid's
/// access log shows the CONNECTs. With a wrong password (`--proxy`) squid answers 407 and
/// nothing gets through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_behind_an_http_proxy_joins_and_tunnels_through_it() {
    let test = "an_agent_behind_an_http_proxy_joins_and_tunnels_through_it";
    if !netns::available() || !squid_or_skip(test) {
        return;
    }
    let lab = NatLab::new();
    // The proxy listens on the NAT host's address on the node's side; nothing from the node is
    // forwarded beyond it.
    let proxy_ip = format!("{}.1", lab.node_ip.rsplit_once('.').unwrap().0);
    lab.nat
        .sh_ok(&format!("iptables -I FORWARD -s {} -j DROP", lab.node_ip));
    let pki = Pki::with_sans(&[lab.cp_ip().to_string()]);
    let logs = TempDir::new("netns-proxy");
    let (_squid, access) = start_squid(&lab.nat, &proxy_ip, &logs.path().join("squid")).await;
    let _cp = start_cp_server(&lab, &pki, logs.path()).await;
    let token_file = pki.server_dir().join("token");
    let data = logs.path().join("node");
    let agent_bin = bin("tether-agent");
    let server_at = format!("{}:9443", lab.cp_ip());
    let agent_args = |proxy: &str| -> Vec<String> {
        let mut v: Vec<String> = vec!["env".into()];
        if !proxy.is_empty() {
            v.push(format!("HTTPS_PROXY={proxy}"));
        }
        v.extend(
            [
                agent_bin.to_str().unwrap(),
                "run",
                "--server",
                &server_at,
                "--data-dir",
                data.to_str().unwrap(),
                "--token-file",
                token_file.to_str().unwrap(),
                "--node-name",
                "edge-proxied",
                "--listen",
                "127.0.0.1:6443",
                "--admin",
                "127.0.0.1:9090",
            ]
            .map(String::from),
        );
        v
    };

    // A wrong password: squid refuses the CONNECT, and the node gets nowhere.
    let mut args = agent_args("");
    args.push("--proxy".into());
    args.push(format!("http://tether:wrong@{proxy_ip}:3128"));
    let refs: Vec<&str> = args[1..].iter().map(String::as_str).collect();
    let refused_log = logs.path().join("agent-refused.log");
    let refused = lab.node.spawn(
        "agent",
        std::path::Path::new("/usr/bin/env"),
        &refs,
        refused_log.clone(),
    );
    wait_host(
        "the proxy's 407 in the agent's log",
        Duration::from_secs(30),
        || {
            std::fs::read_to_string(&refused_log)
                .unwrap_or_default()
                .contains("407")
        },
    )
    .await;
    assert!(
        !data.join("agent.crt").exists(),
        "joined without the proxy's consent"
    );
    drop(refused);

    // The right one, from HTTPS_PROXY: the join, then the tunnel, through the proxy.
    let args = agent_args(&format!("http://tether:secret@{proxy_ip}:3128"));
    let refs: Vec<&str> = args[1..].iter().map(String::as_str).collect();
    let _agent = lab.node.spawn(
        "agent",
        std::path::Path::new("/usr/bin/env"),
        &refs,
        logs.path().join("agent.log"),
    );
    wait_host(
        "the agent joined and is ready",
        Duration::from_secs(60),
        || agent_ready(&lab.node),
    )
    .await;
    assert!(data.join("agent.crt").exists());
    check_traffic(&lab.node, 50, 100_000, 21);
    let status = lab.node.sh(&format!(
        "{} status --admin 127.0.0.1:9090 --output json",
        agent_bin.display()
    ));
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(!text.contains("secret"), "the password is shown: {text}");
    let Ok(tether_endpoint::status::Status::Agent(v)) = serde_json::from_str(&text) else {
        panic!("not an agent's status: {text}");
    };
    assert_eq!(
        v.proxy.as_deref(),
        Some(format!("http://tether@{proxy_ip}:3128").as_str())
    );
    assert_eq!(v.servers[0].transport.as_deref(), Some("tcp"), "{text}");
    // squid logs a CONNECT when it ends: the join's is there (the tunnel's is still open).
    let log = std::fs::read_to_string(&access).unwrap_or_default();
    assert!(
        log.lines()
            .any(|l| l.contains(&format!("CONNECT {server_at}")) && l.contains(" tether ")),
        "squid's access log: {log}"
    );
}
