//! CA rotation: three masters, each with its own data directory, move the cluster to a new CA
//! while checked traffic flows through a node, with the commands an operator runs
//! (`tether-server ca rotate`, `ca rotate --from`, `ca status`, `ca finish`). The etcd variant
//! is in the etcd suite.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tether_server::ServerHandle;
use tether_tests::process::{bin, free_port, run_ok};
use tether_tests::*;
use tether_trust::rotation;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn server_cmd(args: &[&str]) -> Result<String, String> {
    tether_testkit::run(&bin("tether-server"), args).map_err(|e| e.to_string())
}

fn ca_status(dir: &Path) -> serde_json::Value {
    let out = run_ok(
        &bin("tether-server"),
        &[
            "ca",
            "status",
            "--output",
            "json",
            "--data-dir",
            &dir.to_string_lossy(),
        ],
    );
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("ca status: {e}: {out}"))
}

fn old_nodes(dir: &Path) -> Vec<String> {
    serde_json::from_value(ca_status(dir)["nodes_on_old_ca"].clone()).unwrap_or_default()
}

/// A node that joins through the first master with `token`, as `name`, keeping its files in
/// `dir`: started, or why not, within 30 s.
async fn join(
    m: &Masters,
    dir: &TempDir,
    name: &str,
    token: &str,
) -> Result<tether_agent::AgentHandle, tether_agent::AgentError> {
    within(
        &format!("a join of {name}"),
        Duration::from_secs(30),
        tether_agent::start(joining_agent(dir, name, m.servers[0].local_addr, token)),
    )
    .await
}

/// A join token made with `token create` on a master.
fn token(dir: &str, description: &str) -> String {
    run_ok(
        &bin("tether-server"),
        &[
            "token",
            "create",
            "--data-dir",
            dir,
            "--description",
            description,
        ],
    )
    .trim()
    .to_string()
}

fn hashes_of(path: &Path) -> Vec<String> {
    rotation::hashes(&std::fs::read_to_string(path).unwrap_or_default())
}

/// The hash of the CA of `cas` that issued the certificate in `cert`.
fn issuer_of(cert: &Path, cas: &Path) -> Option<String> {
    let cert = tether_trust::pem_ders(&std::fs::read_to_string(cert).ok()?)
        .into_iter()
        .next()?;
    rotation::Cas::parse(&std::fs::read_to_string(cas).ok()?).issuer_of(&cert)
}

/// Three masters on loopback, each with its own data directory holding a copy of one CA, peered
/// with each other.
struct Masters {
    dirs: Vec<PathBuf>,
    servers: Vec<ServerHandle>,
    _tmp: TempDir,
}

async fn masters(upstream: SocketAddr) -> Masters {
    let tmp = TempDir::new("rotation");
    let dirs: Vec<PathBuf> = (1..=3).map(|i| tmp.path().join(format!("m{i}"))).collect();
    tether_trust::init(&dirs[0], &loopback_names(), 3650, 365).expect("init");
    for d in &dirs[1..] {
        std::fs::create_dir_all(d).expect("mkdir");
        for f in ["ca.crt", "ca.key"] {
            std::fs::copy(dirs[0].join(f), d.join(f)).expect("copy the CA");
        }
        tether_trust::init(d, &loopback_names(), 3650, 365).expect("init");
    }
    let addrs: Vec<SocketAddr> = dirs
        .iter()
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
        .collect();
    let mut servers = Vec::new();
    for (d, me) in dirs.iter().zip(&addrs) {
        let mut c = tether_server::config::ServerConfig::new(d.clone());
        c.listen = *me;
        c.upstream = upstream.to_string();
        c.reload_interval = Duration::from_millis(200);
        c.admin = Some("127.0.0.1:0".parse().expect("addr"));
        c.peers = addrs
            .iter()
            .filter(|a| *a != me)
            .map(|a| a.to_string())
            .collect();
        servers.push(tether_server::start(c).await.expect("server starts"));
    }
    wait_for("peers linked", Duration::from_secs(15), || async {
        servers.iter().all(|s| s.peers_up() == 2)
    })
    .await;
    Masters {
        dirs,
        servers,
        _tmp: tmp,
    }
}

/// A node with a certificate from the first master's CA, as `issue-agent` makes it.
fn issued_node(m: &Masters, name: &str) -> tether_agent::config::AgentConfig {
    let out = m.dirs[0]
        .parent()
        .expect("tmp")
        .join(format!("node-{name}"));
    tether_trust::issue_agent_files(&m.dirs[0], name, &out, 365).expect("issue");
    let mut c = tether_agent::config::AgentConfig::new(
        m.servers.iter().map(|s| s.local_addr.to_string()).collect(),
        out,
    );
    c.listen = "127.0.0.1:0".parse().expect("addr");
    c.state_dir = None;
    c
}

/// Checked connections through a node, four at a time, until stopped: each sends random
/// bytes and must get them back whole.
struct Traffic {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<std::sync::Mutex<Vec<String>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn traffic(through: SocketAddr) -> Traffic {
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(std::sync::Mutex::new(Vec::new()));
    let tasks = (0..4u64)
        .map(|w| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    i += 1;
                    let data = random_bytes(4096 + (i as usize % 3) * 20_000, w * 1_000_000 + i);
                    let r = tokio::time::timeout(
                        Duration::from_secs(20),
                        echo_roundtrip(through, data),
                    )
                    .await;
                    match r {
                        Ok(Ok(())) => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        // The first failure ends this worker: it is reported at the end.
                        Ok(Err(e)) => {
                            failed.lock().expect("lock").push(e);
                            return;
                        }
                        Err(_) => {
                            failed.lock().expect("lock").push("hung for 20 s".into());
                            return;
                        }
                    }
                }
            })
        })
        .collect();
    Traffic {
        stop,
        ok,
        failed,
        tasks,
    }
}

impl Traffic {
    async fn end(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.expect("traffic task");
        }
        let failed = self.failed.lock().expect("lock").clone();
        assert!(failed.is_empty(), "connections failed: {failed:?}");
        self.ok.load(Ordering::Relaxed)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_masters_rotate_the_ca_under_checked_traffic_with_no_failed_connection() {
    init_logging();
    let echo = start_echo();
    let m = masters(echo.addr).await;
    let d: Vec<String> = m
        .dirs
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect();
    let old_ca = hashes_of(&m.dirs[0].join("ca.crt"));

    // A node under traffic, one that joins later with a token made now, one that stays away,
    // and one that only comes back while the rotation runs.
    let busy_cfg = issued_node(&m, "busy");
    let busy_dir = busy_cfg.ca.parent().expect("dir").to_path_buf();
    let busy = tether_agent::start(busy_cfg).await.expect("agent");
    wait_for("the node's tunnels", Duration::from_secs(15), || async {
        busy.tunnels_up() == 3
    })
    .await;
    let away = issued_node(&m, "away");
    let late = issued_node(&m, "late");
    let token_before = token(&d[0], "before");
    let load = traffic(busy.listen_addr);
    // A stream held open across the whole rotation.
    let mut held = tokio::net::TcpStream::connect(busy.listen_addr)
        .await
        .expect("held");
    let mut b = [0u8; 1];
    held.write_all(b"a").await.expect("write");
    held.read_exact(&mut b).await.expect("read");

    // Start on the first master, then bring it to the others.
    run_ok(
        &bin("tether-server"),
        &["ca", "rotate", "--data-dir", &d[0]],
    );
    let new_ca = hashes_of(&m.dirs[0].join("ca.crt"));
    assert_ne!(new_ca[0], old_ca[0]);
    assert_eq!(new_ca, vec![new_ca[0].clone()]);
    let status = ca_status(&m.dirs[0]);
    assert_eq!(status["rotation"]["new"], new_ca[0].as_str());
    assert_eq!(status["trusted"].as_array().map(Vec::len), Some(2));
    for dir in &d[1..] {
        run_ok(
            &bin("tether-server"),
            &["ca", "rotate", "--data-dir", dir, "--from", &d[0]],
        );
    }
    // Every master issues from the new CA, and the busy node is asked to renew and does.
    wait_for(
        "the busy node moves to the new CA",
        Duration::from_secs(30),
        || async {
            issuer_of(&busy_dir.join("agent.crt"), &busy_dir.join("ca.crt")).as_deref()
                == Some(new_ca[0].as_str())
        },
    )
    .await;
    assert_eq!(
        hashes_of(&busy_dir.join("ca.crt")),
        vec![new_ca[0].clone(), old_ca[0].clone()]
    );
    for s in &m.servers {
        let admin = s.admin_addr.expect("admin");
        wait_for(
            "the master holds the new CA",
            Duration::from_secs(10),
            || async {
                let (_, body) = http_get(admin, "/status").await.unwrap_or_default();
                body.contains(&format!("\"issuer\":\"{}\"", new_ca[0]))
            },
        )
        .await;
    }

    // A node that comes back now, trusting only the old CA, verifies the masters through the
    // certificate the old CA signed for the new one, and moves too.
    let late_dir = late.ca.parent().expect("dir").to_path_buf();
    let late = tether_agent::start(late).await.expect("late agent");
    wait_for(
        "the late node's tunnels",
        Duration::from_secs(15),
        || async { late.tunnels_up() == 3 },
    )
    .await;
    wait_for("the late node moves", Duration::from_secs(30), || async {
        issuer_of(&late_dir.join("agent.crt"), &late_dir.join("ca.crt")).as_deref()
            == Some(new_ca[0].as_str())
    })
    .await;

    // A token made before the rotation still joins, and the node gets both CAs.
    let joined_tmp = TempDir::new("joined");
    let joined = join(&m, &joined_tmp, "joined", &token_before)
        .await
        .expect("a token from before the rotation joins");
    assert_eq!(
        issuer_of(
            &joined_tmp.path().join("agent.crt"),
            &joined_tmp.path().join("ca.crt")
        ),
        Some(new_ca[0].clone())
    );
    assert_eq!(
        hashes_of(&joined_tmp.path().join("ca.crt")),
        vec![new_ca[0].clone(), old_ca[0].clone()]
    );
    // A token made now pins the new CA.
    let token_after = token(&d[0], "after");
    assert!(
        token_after.contains(&format!("K10{}::", new_ca[0])),
        "{token_after}"
    );

    // Only the node that stayed away is left; finishing is refused while it is.
    wait_for(
        "only the absent node is on the old CA",
        Duration::from_secs(15),
        || async { old_nodes(&m.dirs[0]) == vec!["away".to_string()] },
    )
    .await;
    wait_for("the metrics say so", Duration::from_secs(10), || async {
        let text = server_metrics(&m.servers[0]).await;
        metric(&text, "tether_ca_old_nodes") == Some(1.0)
            && metric(&text, "tether_ca_rotation_running") == Some(1.0)
    })
    .await;
    // So does `status`, with the CA each connected node is on.
    let (_, body) = http_get(m.servers[0].admin_addr.expect("admin"), "/status")
        .await
        .expect("status");
    let status: serde_json::Value = serde_json::from_str(&body).expect("status JSON");
    assert_eq!(
        status["ca"]["nodes_on_old_ca"],
        serde_json::json!(["away"]),
        "{body}"
    );
    let busy_status = status["nodes"]
        .as_array()
        .and_then(|n| n.iter().find(|n| n["name"] == "busy"))
        .cloned()
        .unwrap_or_default();
    assert_eq!(busy_status["ca"], new_ca[0].as_str(), "{body}");
    let refused = server_cmd(&["ca", "finish", "--data-dir", &d[0]]).expect_err("finish refused");
    assert!(refused.contains("away"), "{refused}");
    assert!(rotation::running_in(&m.dirs[0]));
    // Forced, on every master: the old CA is trusted no more.
    for dir in &d {
        run_ok(
            &bin("tether-server"),
            &["ca", "finish", "--force", "--data-dir", dir],
        );
    }
    for dir in &m.dirs {
        assert!(!rotation::running_in(dir));
        assert_eq!(hashes_of(&dir.join("ca.crt")), vec![new_ca[0].clone()]);
    }
    // The nodes are asked again, and drop the old CA from their trust.
    for dir in [&busy_dir, &late_dir, &joined_tmp.path().to_path_buf()] {
        wait_for(
            "the node trusts the new CA alone",
            Duration::from_secs(45),
            || async { hashes_of(&dir.join("ca.crt")) == vec![new_ca[0].clone()] },
        )
        .await;
    }
    // A token made before the rotation joins no more: the masters no longer present its CA.
    let too_late_tmp = TempDir::new("too-late");
    let too_late = join(&m, &too_late_tmp, "too-late", &token_before).await;
    match too_late {
        Err(e) => assert!(
            e.to_string().contains("does not match the join token"),
            "{e}"
        ),
        Ok(_) => panic!("a token from before a finished rotation joined"),
    }
    // The node left on the old CA gets no tunnel any more.
    let away = tether_agent::start(away).await.expect("agent starts");
    assert!(
        !eventually(Duration::from_secs(3), || async { away.tunnels_up() > 0 }).await,
        "a node on the old CA connected after the rotation finished"
    );
    away.shutdown().await;

    // No connection failed, and the stream held since before the rotation still carries.
    let so_far = load.ok.load(Ordering::Relaxed);
    wait_for(
        "traffic goes on after the finish",
        Duration::from_secs(10),
        || async { load.ok.load(Ordering::Relaxed) > so_far + 8 },
    )
    .await;
    let carried = load.end().await;
    assert!(
        carried > 20,
        "too little traffic to judge: {carried} connections"
    );
    held.write_all(b"b").await.expect("held write");
    held.read_exact(&mut b).await.expect("held read");
    assert_eq!(&b, b"b");
    echo_roundtrip(joined.listen_addr, random_bytes(10_000, 3))
        .await
        .expect("the joined node carries");
    for a in [joined, late, busy] {
        a.shutdown().await;
    }
    for s in m.servers {
        s.shutdown().await;
    }
}

async fn server_metrics(s: &ServerHandle) -> String {
    let (_, body) = http_get(s.admin_addr.expect("admin"), "/metrics")
        .await
        .expect("metrics");
    body
}
