//! Rolling upgrades: the last release's binaries (built by `scripts/build-previous` from the
//! commit in `tests/previous-release`) against the current ones, as processes on loopback.
//!
//! Three mixings, each through the same steps: old agent with new servers, new agent with old
//! servers, and one old and one new server peered. The steps are what a fleet half-way through
//! an upgrade must still do: a join with a token, byte-exact forward traffic, a `CONNECT`
//! through the reverse path on every server, a `kill -9` of a server with new connections
//! still served, and a revocation that holds. Then an agent of the last release across a CA
//! rotation of current servers. A failure names the mixing and the step, with the processes'
//! last log lines.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tether_endpoint::status::Status;
use tether_tests::process::{bin, free_port, run_ok, spawn, Proc};
use tether_tests::*;

/// One release's pair of binaries.
#[derive(Clone)]
struct Release {
    name: String,
    server: PathBuf,
    agent: PathBuf,
}

/// The release the current one must work with, as `tests/previous-release` records it.
fn previous() -> Release {
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("previous-release");
    let text = std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
    let field = |key: &str| {
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .find(|(k, _)| *k == key)
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_else(|| panic!("{} names no {key}", file.display()))
    };
    let tag = field("tag");
    // bin() is TARGET/debug/tether-server; the release is in TARGET/previous/TAG.
    let target = bin("tether-server")
        .parent()
        .and_then(Path::parent)
        .expect("target directory")
        .join("previous")
        .join(&tag);
    let release = Release {
        name: tag.clone(),
        server: target.join("tether-server"),
        agent: target.join("tether-agent"),
    };
    for b in [&release.server, &release.agent] {
        assert!(
            b.exists(),
            "{} of release {tag} is missing: build it with scripts/build-previous (scripts/test does)",
            b.display()
        );
    }
    release
}

fn current() -> Release {
    Release {
        name: format!("current ({})", env!("CARGO_PKG_VERSION")),
        server: bin("tether-server"),
        agent: bin("tether-agent"),
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// One mixing of releases, its processes and where their logs are.
struct Mixing {
    name: String,
    dir: TempDir,
    procs: Vec<Proc>,
}

impl Mixing {
    /// Fails the test naming the mixing, the step and what went wrong, with every log's tail.
    fn fail(&self, step: &str, what: &str) -> ! {
        let mut logs = String::new();
        for p in &self.procs {
            let text = p.log_text();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            logs.push_str(&format!("\n--- {} (last lines)\n", p.name));
            for l in tail.into_iter().rev() {
                logs.push_str(l);
                logs.push('\n');
            }
        }
        panic!(
            "rolling upgrade, mixing \"{}\", step \"{step}\": {what}{logs}",
            self.name
        )
    }

    fn check(&self, step: &str, r: Result<(), String>) {
        if let Err(e) = r {
            self.fail(step, &e)
        }
    }

    fn log(&self, name: &str) -> PathBuf {
        self.dir.path().join(format!("{name}.log"))
    }
}

async fn metric_of(admin: SocketAddr, name: &str) -> Option<f64> {
    let (_, body) = http_get(admin, "/metrics").await.ok()?;
    metric(&body, name)
}

/// Concurrent echoes of random sizes through `via`, each checked by SHA-256.
async fn checked_echoes(via: SocketAddr, streams: u64, max: usize) -> Result<(), String> {
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..streams {
        let size = fastrand::Rng::with_seed(i).usize(..max);
        tasks.spawn(async move { echo_roundtrip(via, random_bytes(size, i)).await });
    }
    let results = tokio::time::timeout(Duration::from_secs(60), tasks.join_all())
        .await
        .map_err(|_| "echoes did not finish in 60 s".to_string())?;
    let failed: Vec<String> = results.into_iter().filter_map(Result::err).collect();
    if failed.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{} of {streams} echoes failed, first: {}",
            failed.len(),
            failed[0]
        ))
    }
}

/// Runs one mixing: `agent` with two servers of the given releases, peered. With
/// `agent_knows_both` false the agent is given only the first server and must learn the second
/// from its announcements.
async fn run(name: &str, agent: &Release, servers: [&Release; 2], agent_knows_both: bool) {
    init_logging();
    let mut m = Mixing {
        name: format!(
            "{name}: agent {}, servers {} and {}",
            agent.name, servers[0].name, servers[1].name
        ),
        dir: TempDir::new("compat"),
        procs: Vec::new(),
    };
    let data: Vec<PathBuf> = (0..2).map(|i| m.dir.path().join(format!("s{i}"))).collect();
    let ds = |i: usize| data[i].to_str().expect("utf-8 path").to_string();

    // Step: certificates, as an operator makes them, each server with its own release.
    run_ok(
        &servers[0].server,
        &[
            "init",
            "--data-dir",
            &ds(0),
            "--san",
            "localhost,127.0.0.1,::1",
        ],
    );
    std::fs::create_dir_all(&data[1]).expect("mkdir");
    for f in ["ca.crt", "ca.key"] {
        std::fs::copy(data[0].join(f), data[1].join(f)).expect("copy CA");
    }
    run_ok(
        &servers[1].server,
        &[
            "init",
            "--data-dir",
            &ds(1),
            "--san",
            "localhost,127.0.0.1,::1",
        ],
    );
    let token_out = run_ok(
        &servers[0].server,
        &["token", "create", "--data-dir", &ds(0)],
    );
    let token = token_out
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    if token.is_empty() {
        m.fail("token create", &format!("no token printed: {token_out:?}"));
    }

    // Step: two peered servers, each with its own upstream, admin endpoint and egress proxy.
    let upstreams = [start_echo(), start_echo()];
    let kubelet = start_echo();
    let port = [free_port(), free_port()];
    let admin = [free_port(), free_port()];
    let egress = [free_port(), free_port()];
    for i in 0..2 {
        let args = [
            "run".to_string(),
            "--data-dir".into(),
            ds(i),
            "--listen".into(),
            loopback(port[i]).to_string(),
            "--upstream".into(),
            upstreams[i].addr.to_string(),
            "--admin".into(),
            loopback(admin[i]).to_string(),
            "--egress-listen".into(),
            loopback(egress[i]).to_string(),
            "--peer".into(),
            loopback(port[1 - i]).to_string(),
        ];
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let log = m.log(&format!("server{i}"));
        m.procs.push(spawn(
            &format!("server{i} ({})", servers[i].name),
            &servers[i].server,
            &args,
            log,
        ));
    }
    for (i, a) in admin.iter().enumerate() {
        let up = eventually(Duration::from_secs(30), || async {
            matches!(http_get(loopback(*a), "/readyz").await, Ok((200, _)))
        })
        .await;
        if !up {
            m.fail("servers start", &format!("server{i} never became ready"));
        }
    }

    // Step: the agent joins with the token, made on the first server.
    let (listen, agent_admin) = (free_port(), free_port());
    let agent_dir = m.dir.path().join("agent");
    let mut args = vec![
        "run".to_string(),
        "--data-dir".into(),
        agent_dir.to_str().expect("utf-8 path").into(),
        "--token".into(),
        token,
        "--node-name".into(),
        "edge-1".into(),
        "--server".into(),
        loopback(port[0]).to_string(),
        "--listen".into(),
        loopback(listen).to_string(),
        "--admin".into(),
        loopback(agent_admin).to_string(),
        "--allow".into(),
        kubelet.addr.to_string(),
    ];
    if agent_knows_both {
        args.push("--server".into());
        args.push(loopback(port[1]).to_string());
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let log = m.log("agent");
    m.procs.push(spawn(
        &format!("agent ({})", agent.name),
        &agent.agent,
        &args,
        log,
    ));
    let joined = eventually(Duration::from_secs(30), || async {
        agent_dir.join("agent.crt").exists()
    })
    .await;
    if !joined {
        m.fail("join with a token", "no certificate stored within 30 s");
    }
    let both = eventually(Duration::from_secs(30), || async {
        metric_of(loopback(agent_admin), "tether_tunnels_up").await == Some(2.0)
    })
    .await;
    if !both {
        let how = if agent_knows_both {
            "configured"
        } else {
            "learned from the first server's announcements"
        };
        m.fail(
            "tunnels to both servers",
            &format!("the agent has no tunnel to each server ({how}) within 30 s"),
        );
    }

    // Step: each current server knows from the agent's hello whether it may use new behaviour
    // (`caps` is announced since 0.2; a 0.1 agent announces only `apiserver`).
    let agent_is_current = agent.agent == current().agent;
    for i in 0..2 {
        if servers[i].agent != current().agent {
            continue;
        }
        let status = http_get(loopback(admin[i]), "/status").await;
        let caps = match status.map(|(_, body)| serde_json::from_str(&body)) {
            Ok(Ok(Status::Server(s))) => s
                .nodes
                .into_iter()
                .find(|n| n.name == "edge-1")
                .map(|n| n.capabilities),
            _ => None,
        };
        let Some(caps) = caps else {
            m.fail(
                "capabilities",
                &format!("server{i}'s status shows no edge-1 with capabilities"),
            );
        };
        if caps.iter().any(|c| c == "caps") != agent_is_current {
            m.fail(
                "capabilities",
                &format!("server{i} sees the agent's capabilities as {caps:?}"),
            );
        }
    }

    // Step: byte-exact forward traffic.
    let via = loopback(listen);
    let r = checked_echoes(via, 64, 512 * 1024).await;
    m.check("forward traffic", r);

    // Step: the control plane reaches the node through each server's egress proxy.
    for (i, e) in egress.iter().enumerate() {
        let target = format!("edge-1:{}", kubelet.addr.port());
        let mut result = Ok(());
        for n in 0..8u64 {
            let data = random_bytes(fastrand::usize(1..64 * 1024), 1000 + n);
            if let Err(err) = proxy_echo(loopback(*e), &target, data).await {
                result = Err(format!("CONNECT {target} through server{i}: {err}"));
                break;
            }
        }
        m.check("reverse path", result);
    }

    // Step: kill -9 of the first server while new connections keep coming. Only a connection
    // in flight on the killed server at that instant may fail; new ones go to the other.
    let stop = Arc::new(AtomicBool::new(false));
    let (passed, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (stop, passed, failed) = (stop.clone(), passed.clone(), failed.clone());
        tokio::spawn(async move {
            let mut errors = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                n += 1;
                match echo_roundtrip(via, random_bytes(1024, n)).await {
                    Ok(()) => passed.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        errors.push(e);
                        failed.fetch_add(1, Ordering::Relaxed)
                    }
                };
            }
            errors
        })
    };
    let warm = eventually(Duration::from_secs(10), || async {
        passed.load(Ordering::Relaxed) >= 50
    })
    .await;
    if !warm {
        m.fail(
            "failover",
            "fewer than 50 connections passed before the kill",
        );
    }
    m.procs[0].signal("KILL");
    let before_kill = passed.load(Ordering::Relaxed);
    let dropped = eventually(Duration::from_secs(10), || async {
        metric_of(loopback(agent_admin), "tether_tunnels_up").await == Some(1.0)
    })
    .await;
    // Keep the load going well past the moment the agent noticed.
    let served_after = eventually(Duration::from_secs(20), || async {
        passed.load(Ordering::Relaxed) >= before_kill + 200
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    let errors = within("load stops", Duration::from_secs(30), load)
        .await
        .unwrap_or_default();
    if !dropped {
        m.fail(
            "failover",
            "the agent still counts two tunnels 10 s after kill -9",
        );
    }
    if !served_after {
        m.fail(
            "failover",
            "fewer than 200 new connections served after kill -9",
        );
    }
    if errors.len() > 1 {
        m.fail(
            "failover",
            &format!(
                "{} connections failed around kill -9 (at most the one in flight may): {:?}",
                errors.len(),
                &errors[..errors.len().min(3)]
            ),
        );
    }
    eprintln!(
        "compat {}: {} connections passed, {} failed across kill -9",
        m.name,
        passed.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );

    // Forward traffic still byte-exact on the server that is left.
    let r = checked_echoes(via, 32, 256 * 1024).await;
    m.check("forward traffic after the failover", r);

    // Revocation, with the command of the release that server runs: its tunnel closes, and
    // stays closed while the agent keeps retrying.
    run_ok(
        &servers[1].server,
        &["agent", "revoke", "edge-1", "--data-dir", &ds(1)],
    );
    let closed = eventually(Duration::from_secs(10), || async {
        metric_of(loopback(agent_admin), "tether_tunnels_up").await == Some(0.0)
    })
    .await;
    if !closed {
        m.fail(
            "revoke",
            "the agent still has a tunnel 10 s after `agent revoke`",
        );
    }
    // Watched for two seconds of the agent's retries.
    let back = eventually(Duration::from_secs(2), || async {
        metric_of(loopback(agent_admin), "tether_tunnels_up").await != Some(0.0)
    })
    .await;
    if back {
        m.fail("revoke", "a revoked agent got a tunnel back");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_agent_works_with_new_servers() {
    let (old, new) = (previous(), current());
    run("old agent, new servers", &old, [&new, &new], true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_agent_works_with_old_servers() {
    let (old, new) = (previous(), current());
    run("new agent, old servers", &new, [&old, &old], true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_and_a_new_server_work_as_peers() {
    let (old, new) = (previous(), current());
    // The agent knows only the old server and learns the new one from it; the old one is the
    // one killed.
    run("old and new servers peered", &new, [&old, &new], false).await;
    // And the other way round: an old agent that knows only the new server, which is killed.
    run("new and old servers peered", &old, [&new, &old], false).await;
}

/// An agent of the last release, which knows nothing of CA rotations, across one: it renews at
/// its usual time (here: a certificate of a few seconds) from the new CA, keeps only the old CA
/// in its `ca.crt` (it never rewrites it), and still verifies the servers, through the
/// certificate the old CA signed for the new one, before and after the rotation finishes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_old_agent_moves_to_a_new_ca_at_its_usual_renewal() {
    init_logging();
    let old = previous();
    let mut m = Mixing {
        name: "old agent across a CA rotation".into(),
        dir: TempDir::new("compat-rotation"),
        procs: Vec::new(),
    };
    let server_dir = m.dir.path().join("server");
    let d = server_dir.to_str().expect("utf-8 path").to_string();
    run_ok(
        &bin("tether-server"),
        &["init", "--data-dir", &d, "--san", "localhost,127.0.0.1,::1"],
    );
    // A certificate due for renewal at two thirds of its 12 s, made before the rotation.
    let agent_dir = m.dir.path().join("agent");
    std::fs::create_dir_all(&agent_dir).expect("mkdir");
    let now = time::OffsetDateTime::now_utc();
    let issued = tether_trust::Ca::load(&server_dir)
        .expect("CA")
        .issue_agent(
            "edge-old",
            tether_trust::Lifetime {
                not_before: now - time::Duration::seconds(1),
                not_after: now + time::Duration::seconds(12),
            },
        )
        .expect("issue");
    issued
        .save(&agent_dir.join("agent.crt"), &agent_dir.join("agent.key"))
        .expect("save");
    std::fs::copy(server_dir.join("ca.crt"), agent_dir.join("ca.crt")).expect("ca");
    let old_ca = std::fs::read_to_string(agent_dir.join("ca.crt")).expect("ca");

    let upstream = start_echo();
    let (port, admin) = (free_port(), free_port());
    let server_args = [
        "run".to_string(),
        "--data-dir".into(),
        d.clone(),
        "--listen".into(),
        loopback(port).to_string(),
        "--upstream".into(),
        upstream.addr.to_string(),
        "--admin".into(),
        loopback(admin).to_string(),
    ];
    let args: Vec<&str> = server_args.iter().map(String::as_str).collect();
    let log = m.log("server");
    m.procs
        .push(spawn("server (current)", &bin("tether-server"), &args, log));
    let (listen, agent_admin) = (free_port(), free_port());
    let agent_args = [
        "run".to_string(),
        "--data-dir".into(),
        agent_dir.to_str().expect("utf-8 path").into(),
        "--server".into(),
        loopback(port).to_string(),
        "--listen".into(),
        loopback(listen).to_string(),
        "--admin".into(),
        loopback(agent_admin).to_string(),
    ];
    let agent_args: Vec<&str> = agent_args.iter().map(String::as_str).collect();
    let start_agent = |m: &mut Mixing| {
        let log = m.log("agent");
        m.procs.push(spawn(
            &format!("agent ({})", old.name),
            &old.agent,
            &agent_args,
            log,
        ));
    };
    start_agent(&mut m);
    let up = || async { metric_of(loopback(agent_admin), "tether_tunnels_up").await == Some(1.0) };
    if !eventually(Duration::from_secs(30), up).await {
        m.fail("tunnel", "no tunnel within 30 s");
    }
    run_ok(&bin("tether-server"), &["ca", "rotate", "--data-dir", &d]);
    let new_ca = std::fs::read_to_string(server_dir.join("ca.crt")).expect("new ca");

    // Its usual renewal gives it a certificate from the new CA; its ca.crt stays the old CA.
    let renewed = eventually(Duration::from_secs(30), || async {
        let cert = std::fs::read_to_string(agent_dir.join("agent.crt")).unwrap_or_default();
        let key = std::fs::read_to_string(agent_dir.join("agent.key")).unwrap_or_default();
        let t = time::OffsetDateTime::now_utc().unix_timestamp();
        tether_trust::check_issued(&cert, &new_ca, "edge-old", &key, t).is_ok()
    })
    .await;
    if !renewed {
        m.fail("renewal", "no certificate from the new CA within 30 s");
    }
    assert_eq!(
        std::fs::read_to_string(agent_dir.join("ca.crt")).expect("ca"),
        old_ca
    );
    // The old certificate expires and its tunnel closes: the next one is the new CA's, and the
    // agent verifies the server through the cross-signed certificate.
    let via = loopback(listen);
    let carried = eventually(Duration::from_secs(30), || async {
        up().await && checked_echoes(via, 8, 64 * 1024).await.is_ok()
    })
    .await;
    if !carried {
        m.fail(
            "after the renewal",
            "no working tunnel with the new certificate",
        );
    }
    // The rotation ends; a restarted old agent still connects and carries.
    run_ok(&bin("tether-server"), &["ca", "finish", "--data-dir", &d]);
    m.procs.pop();
    start_agent(&mut m);
    let carried = eventually(Duration::from_secs(30), || async {
        up().await && checked_echoes(via, 8, 64 * 1024).await.is_ok()
    })
    .await;
    if !carried {
        m.fail(
            "after the finish",
            "the restarted old agent carries no traffic",
        );
    }
}
