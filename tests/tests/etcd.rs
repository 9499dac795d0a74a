//! Shared state on etcd, against a real etcd cluster (three members, TLS with client
//! certificates; see `tether_tests::etcd`): servers that find each other with no `--peer`,
//! tokens made on one server that join on another, revocations that close tunnels on every
//! server within a second, two servers racing to give one name to two keys, and etcd's
//! failures: one member killed, a server cut off from etcd, every member killed, and recovery
//! with nothing lost.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tether_server::config::ServerConfig;
use tether_server::datastore::etcd::{Etcd, EtcdSettings};
use tether_server::datastore::{Datastore, Kind};
use tether_server::ServerHandle;
use tether_tests::etcd::{etcd_or_skip, EtcdCluster, Gate};
use tether_tests::*;
use tether_trust::records::NodeState;

/// A running etcd cluster of `members` for `test`, with the test's logging on; `None` (after a
/// loud SKIPPED) where there is no etcd and this is not CI.
async fn etcd_cluster(test: &str, members: usize) -> Option<EtcdCluster> {
    if !etcd_or_skip(test) {
        return None;
    }
    init_logging();
    Some(EtcdCluster::start(members).await)
}

/// A copy of the PKI's server directory (CA, certificate, key) for one server.
fn server_dir(pki: &Pki, root: &TempDir, name: &str) -> PathBuf {
    let dir = root.path().join(name);
    std::fs::create_dir_all(&dir).unwrap();
    for f in ["ca.crt", "ca.key", "server.crt", "server.key"] {
        std::fs::copy(pki.server_dir().join(f), dir.join(f)).unwrap();
    }
    dir
}

async fn etcd_server(dir: &Path, upstream: SocketAddr, etcd: EtcdSettings) -> ServerHandle {
    let mut c = ServerConfig::new(dir.to_path_buf());
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.upstream = upstream.to_string();
    c.admin = Some("127.0.0.1:0".parse().unwrap());
    c.datastore = Kind::Etcd;
    c.etcd = etcd;
    tether_server::start(c).await.expect("server starts")
}

/// The store as the commands open it (`--datastore etcd`).
fn store(settings: &EtcdSettings) -> Datastore {
    Datastore::Etcd(Arc::new(Etcd::new(settings).unwrap()))
}

/// An agent with a certificate for `node`, told of `servers` only (it learns the rest).
async fn agent_of(pki: &Pki, node: &str, servers: &[SocketAddr]) -> tether_agent::AgentHandle {
    let agent = tether_agent::start(agent_config(pki, node, servers))
        .await
        .expect("agent starts");
    wait_for("an agent tunnel up", Duration::from_secs(10), || async {
        agent.tunnels_up() >= 1
    })
    .await;
    agent
}

fn has_node(s: &ServerHandle, node: &str) -> bool {
    s.connected_nodes().iter().any(|n| n == node)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_share_etcd_with_no_peer_list() {
    let Some(cluster) = etcd_cluster("servers_share_etcd_with_no_peer_list", 3).await else {
        return;
    };
    let settings = cluster.settings("/share/");
    let pki = Pki::new();
    let root = TempDir::new("etcd-share");
    let echo = start_echo();
    let dirs: Vec<PathBuf> = (0..3)
        .map(|i| server_dir(&pki, &root, &format!("s{i}")))
        .collect();
    let mut servers = Vec::new();
    for d in &dirs {
        servers.push(etcd_server(d, echo.addr, settings.clone()).await);
    }
    // Each finds the two others through etcd's membership.
    wait_for(
        "every server links to the two others",
        Duration::from_secs(5),
        || async { servers.iter().all(|s| s.peers_up() == 2) },
    )
    .await;

    // An agent told of one server learns all three from the lists it is sent.
    let agent = agent_of(&pki, "node-a", &[servers[0].local_addr]).await;
    wait_for(
        "the agent has a tunnel to all three",
        Duration::from_secs(5),
        || async { agent.tunnels_up() == 3 },
    )
    .await;
    echo_roundtrip(agent.listen_addr, random_bytes(20_000, 1))
        .await
        .unwrap();

    // A token made on the second server joins on the third.
    let token = store(&settings)
        .create_token(&dirs[1], 3600, "made on s1", &Default::default())
        .await
        .unwrap();
    let node_dir = TempDir::new("etcd-join");
    let joined = within(
        "join on another server",
        Duration::from_secs(20),
        tether_agent::start(joining_agent(
            &node_dir,
            "node-j",
            servers[2].local_addr,
            &token.to_string(),
        )),
    )
    .await
    .expect("a token made on one server joins on another");
    wait_for("the joined node is up", Duration::from_secs(10), || async {
        joined.tunnels_up() >= 1
    })
    .await;
    let (owner, _) = store(&settings).load_records().await.unwrap();
    assert!(
        matches!(
            owner.by_name.get("node-j").map(|r| &r.state),
            Some(NodeState::Owned(_))
        ),
        "the join's record is in etcd"
    );

    // A revocation made with the command's store closes the node on every server within 1 s.
    wait_for("node-a on every server", Duration::from_secs(5), || async {
        servers.iter().all(|s| has_node(s, "node-a"))
    })
    .await;
    store(&settings)
        .set_state("node-a", NodeState::Revoked)
        .await
        .unwrap();
    let revoked_at = Instant::now();
    wait_for(
        "node-a closed everywhere",
        Duration::from_secs(5),
        || async { servers.iter().all(|s| !has_node(s, "node-a")) },
    )
    .await;
    let took = revoked_at.elapsed();
    assert!(
        took <= Duration::from_secs(1),
        "revocation took {took:?} to close the node's tunnels on every server"
    );

    // A new server (a process of its own) reaches the node's server list within 5 s; killed
    // with -9, it leaves the membership when its lease ends.
    wait_for("node-j on all three", Duration::from_secs(5), || async {
        joined.tunnels_up() == 3
    })
    .await;
    let flags = etcd_flags(&settings);
    let flag_refs: Vec<&str> = flags.iter().map(String::as_str).collect();
    let d3 = server_dir(&pki, &root, "s3");
    let newcomer = tether_tests::process::ServerProcess::start(
        &d3,
        echo.addr,
        &flag_refs,
        root.path().join("s3.log"),
    )
    .await;
    let started = Instant::now();
    wait_for(
        "node-j reaches the new server",
        Duration::from_secs(5),
        || async { joined.tunnels_up() == 4 },
    )
    .await;
    eprintln!("a new server reached the node in {:?}", started.elapsed());
    let etcd = Etcd::new(&settings).unwrap();
    assert_eq!(etcd.range_prefix("servers/").await.unwrap().0.len(), 4);
    newcomer.proc.signal("KILL");
    let killed = Instant::now();
    wait_for(
        "the killed server leaves the membership",
        Duration::from_secs(10),
        || async {
            matches!(
                etcd.range_prefix("servers/").await.map(|r| r.0.len()),
                Ok(3)
            )
        },
    )
    .await;
    eprintln!(
        "a killed server left the membership in {:?}",
        killed.elapsed()
    );

    // A server that stops cleanly leaves the membership at once: the others drop their link.
    let last = servers.pop().unwrap();
    last.shutdown().await;
    wait_for(
        "the stopped server is dropped",
        Duration::from_secs(8),
        || async { servers.iter().all(|s| s.peers_up() == 1) },
    )
    .await;
    joined.shutdown().await;
    agent.shutdown().await;
    for s in servers {
        s.shutdown().await;
    }
}

/// A watch whose connection went silent (no reset: a firewall or NAT lost its state, or a
/// member's host its power) while the server's other calls to etcd still succeed on new
/// connections: the server notices within two checks and watches again, so a revocation made
/// meanwhile still closes the node's tunnels. Before, it waited for etcd's progress notice
/// (ten minutes by default) and served the revoked node all that time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_watch_is_noticed_and_a_revocation_made_meanwhile_holds() {
    let Some(cluster) = etcd_cluster(
        "a_silent_watch_is_noticed_and_a_revocation_made_meanwhile_holds",
        1,
    )
    .await
    else {
        return;
    };
    let cutter = Gate::start(&[cluster.client_addr(0)]).expect("gate");
    let through = cluster.settings_for(vec![format!("https://{}", cutter.addr())], "/silent/");
    let pki = Pki::new();
    let root = TempDir::new("etcd-silent");
    let echo = start_echo();
    let server = etcd_server(&server_dir(&pki, &root, "s"), echo.addr, through).await;
    let mut c = agent_config(&pki, "node-s", &[server.local_addr]);
    c.node_ips = vec!["192.0.2.5".parse().unwrap()];
    let agent = tether_agent::start(c).await.expect("agent starts");
    // Its address claim is written before the watch goes silent: the one change to be
    // noticed is the revocation. And the server's watch has brought it: the watch is up
    // before it is silenced (a watch that started late, on a new connection, would not be).
    let direct = store(&cluster.settings("/silent/"));
    let direct_etcd = Etcd::new(&cluster.settings("/silent/")).unwrap();
    wait_for(
        "node-s and its address recorded, and the server's watch up to date",
        Duration::from_secs(10),
        || async {
            let claimed = direct.load_records().await.is_ok_and(|(r, _)| {
                r.by_name
                    .get("node-s")
                    .is_some_and(|n| !n.addresses.is_empty())
            });
            let latest = direct_etcd.latest_change().await.unwrap_or(i64::MAX);
            let applied = metric(
                &http_get_admin(&server, "/metrics").await.1,
                "tether_datastore_revision",
            )
            .unwrap_or(0.0);
            claimed && has_node(&server, "node-s") && applied >= latest as f64
        },
    )
    .await;

    cutter.silence();
    direct
        .set_state("node-s", NodeState::Revoked)
        .await
        .unwrap();
    let revoked_at = Instant::now();
    let bound = tether_server::follow::WATCH_CHECK * 2 + Duration::from_secs(3);
    wait_for(
        "the revoked node closed though the watch went silent",
        bound,
        || async { !has_node(&server, "node-s") },
    )
    .await;
    eprintln!(
        "a silent watch was noticed and the revocation applied in {:?}",
        revoked_at.elapsed()
    );
    let metrics = http_get_admin(&server, "/metrics").await.1;
    assert!(
        metrics.contains("tether_datastore_silent_watches_total 1"),
        "{metrics}"
    );
    agent.shutdown().await;
    server.shutdown().await;

    // The check reads the latest change by modification revision, not the prefix's first key.
    let etcd = Etcd::new(&cluster.settings("/order/")).unwrap();
    for k in ["a", "z", "m"] {
        let put = tether_server::datastore::etcd::Op::Put {
            key: k.into(),
            value: b"1".to_vec(),
            lease: 0,
        };
        etcd.txn(&[], &[put]).await.unwrap();
    }
    let z = etcd.get("z").await.unwrap().unwrap().mod_revision;
    let put = tether_server::datastore::etcd::Op::Put {
        key: "z".into(),
        value: b"2".to_vec(),
        lease: 0,
    };
    etcd.txn(&[], &[put]).await.unwrap();
    let latest = etcd.latest_change().await.unwrap();
    assert!(
        latest > z,
        "the latest change is z's second write, {latest} > {z}"
    );
    assert_eq!(latest, etcd.get("z").await.unwrap().unwrap().mod_revision);
}

/// A server that starts while etcd is down serves from the records it cached: a revocation it
/// had read still holds, and a node it knew still connects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_started_while_etcd_is_down_keeps_its_revocations() {
    let Some(cluster) = etcd_cluster(
        "a_server_started_while_etcd_is_down_keeps_its_revocations",
        1,
    )
    .await
    else {
        return;
    };
    let settings = cluster.settings("/cache/");
    let pki = Pki::new();
    let root = TempDir::new("etcd-cache");
    let echo = start_echo();
    let dir = server_dir(&pki, &root, "s");
    store(&settings)
        .set_state("gone", NodeState::Revoked)
        .await
        .unwrap();
    let first = etcd_server(&dir, echo.addr, settings.clone()).await;
    wait_for("the revocation read", Duration::from_secs(5), || async {
        std::fs::read_to_string(dir.join("nodes")).is_ok_and(|t| t.contains("gone revoked"))
    })
    .await;
    first.shutdown().await;
    cluster.kill(0);

    let again = etcd_server(&dir, echo.addr, settings.clone()).await;
    assert!(!again.metrics().datastore.available());
    the_revoked_node_stays_out(&pki, again).await;
}

/// `gone` (revoked) dials `server` and is refused, while `known` gets through; then all stop.
async fn the_revoked_node_stays_out(pki: &Pki, server: ServerHandle) {
    let gone = tether_agent::start(agent_config(pki, "gone", &[server.local_addr]))
        .await
        .expect("agent starts");
    let known = agent_of(pki, "known", &[server.local_addr]).await;
    echo_roundtrip(known.listen_addr, random_bytes(1000, 3))
        .await
        .unwrap();
    assert!(
        !eventually(Duration::from_secs(2), || async { gone.tunnels_up() > 0 }).await,
        "the revoked node stays refused"
    );
    gone.shutdown().await;
    known.shutdown().await;
    server.shutdown().await;
}

/// A restore of etcd from a snapshot older than a revocation: the key is gone, and before 0.3 a
/// restarted server admitted the revoked node. Now the server's cache of records is merged at
/// start and the revocation written back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_lost_by_an_etcd_restore_is_written_back() {
    let Some(cluster) =
        etcd_cluster("a_revocation_lost_by_an_etcd_restore_is_written_back", 1).await
    else {
        return;
    };
    let settings = cluster.settings("/restore/");
    let pki = Pki::new();
    let root = TempDir::new("etcd-restore");
    let echo = start_echo();
    let dir = server_dir(&pki, &root, "s");
    let first = etcd_server(&dir, echo.addr, settings.clone()).await;
    store(&settings)
        .set_state("gone", NodeState::Revoked)
        .await
        .unwrap();
    wait_for("the revocation cached", Duration::from_secs(5), || async {
        std::fs::read_to_string(dir.join("nodes")).is_ok_and(|t| t.contains("gone revoked"))
    })
    .await;
    first.shutdown().await;
    // The restore: etcd no longer has the key.
    let etcd = Etcd::new(&settings).unwrap();
    assert!(etcd.delete("nodes/gone").await.unwrap());

    let again = etcd_server(&dir, echo.addr, settings.clone()).await;
    let (held, _) = store(&settings).load_records().await.unwrap();
    assert_eq!(
        held.by_name.get("gone").map(|r| r.state.clone()),
        Some(NodeState::Revoked),
        "the revocation is back in etcd"
    );
    the_revoked_node_stays_out(&pki, again).await;
}

/// The follower and the commands read the prefix in pages: more records than one page holds
/// are all read, at one revision.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_are_read_in_pages() {
    let Some(cluster) = etcd_cluster("records_are_read_in_pages", 1).await else {
        return;
    };
    let settings = cluster.settings("/pages/");
    let etcd = Etcd::new(&settings).unwrap();
    let n = tether_server::datastore::etcd::RANGE_PAGE * 2 + 7;
    let s = store(&settings);
    for i in 0..n {
        s.set_state(&format!("n{i}"), NodeState::Revoked)
            .await
            .unwrap();
    }
    let (kvs, revision) = etcd.range_prefix("nodes/").await.unwrap();
    assert_eq!(kvs.len(), n);
    assert!(revision > 0);
    let mut keys: Vec<_> = kvs.iter().map(|kv| kv.key.clone()).collect();
    keys.dedup();
    assert_eq!(keys.len(), n, "no key read twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_racing_for_one_name_never_both_win() {
    let Some(cluster) = etcd_cluster("two_servers_racing_for_one_name_never_both_win", 1).await
    else {
        return;
    };
    let settings = cluster.settings("/race/");
    // Two servers' stores: separate clients, as on two masters.
    let (a, b) = (store(&settings), store(&settings));
    let (key_a, key_b) = ("aa".repeat(32), "bb".repeat(32));
    for i in 0..20 {
        let name = format!("race-{i}");
        let (ra, rb) = tokio::join!(a.claim(&name, &key_a), b.claim(&name, &key_b));
        let (ra, rb) = (ra.unwrap().0, rb.unwrap().0);
        assert!(
            ra.is_ok() != rb.is_ok(),
            "{name}: exactly one claim wins (a: {ra:?}, b: {rb:?})"
        );
        let (all, _) = a.load_records().await.unwrap();
        let winner = if ra.is_ok() { &key_a } else { &key_b };
        assert_eq!(
            all.by_name.get(&name).map(|r| &r.state),
            Some(&NodeState::Owned(winner.clone())),
            "{name}: etcd holds the winner"
        );
    }
    // A renewal racing a revocation never undoes it.
    for i in 0..10 {
        let name = format!("renew-{i}");
        a.claim(&name, &key_a).await.unwrap().0.unwrap();
        let new = format!("{:02x}", i).repeat(32);
        let (_, _) = tokio::join!(
            a.set_state(&name, NodeState::Revoked),
            b.renew(&name, &key_a, &new)
        );
        let (all, _) = b.load_records().await.unwrap();
        assert_eq!(
            all.by_name.get(&name).map(|r| &r.state),
            Some(&NodeState::Revoked),
            "{name}: the revocation holds"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_failures_fail_static_and_nothing_is_lost() {
    let Some(cluster) = etcd_cluster("etcd_failures_fail_static_and_nothing_is_lost", 3).await
    else {
        return;
    };
    let direct = cluster.settings("/faults/");
    // Server A reaches etcd through proxies that can cut it off; server B directly.
    let mut cutters = Vec::new();
    for i in 0..3 {
        cutters.push(Gate::start(&[cluster.client_addr(i)]).expect("gate"));
    }
    let through = cluster.settings_for(
        cutters
            .iter()
            .map(|c| format!("https://{}", c.addr()))
            .collect(),
        "/faults/",
    );
    let pki = Pki::new();
    let root = TempDir::new("etcd-faults");
    let echo = start_echo();
    let a = etcd_server(&server_dir(&pki, &root, "a"), echo.addr, through).await;
    let b_dir = server_dir(&pki, &root, "b");
    let b = etcd_server(&b_dir, echo.addr, direct.clone()).await;
    wait_for("A and B linked", Duration::from_secs(5), || async {
        a.peers_up() == 1 && b.peers_up() == 1
    })
    .await;
    let x = agent_of(&pki, "node-x", &[a.local_addr]).await;
    let y = agent_of(&pki, "node-y", &[a.local_addr]).await;
    wait_for(
        "both nodes on both servers",
        Duration::from_secs(10),
        || async {
            ["node-x", "node-y"]
                .iter()
                .all(|n| has_node(&a, n) && has_node(&b, n))
        },
    )
    .await;

    // One member killed: everything keeps working, joins included.
    cluster.kill(0);
    let token = store(&direct)
        .create_token(&b_dir, 3600, "one member down", &Default::default())
        .await
        .expect("a token with one member down");
    let d1 = TempDir::new("etcd-join-1");
    let j1 = within(
        "join with one member down",
        Duration::from_secs(30),
        tether_agent::start(joining_agent(
            &d1,
            "node-j1",
            b.local_addr,
            &token.to_string(),
        )),
    )
    .await
    .expect("joins with one member down");
    echo_roundtrip(x.listen_addr, random_bytes(10_000, 2))
        .await
        .unwrap();

    // A cut off from etcd: it says so, and its agents keep forwarding.
    for c in &cutters {
        c.refuse();
    }
    wait_for(
        "A knows etcd is unreachable",
        Duration::from_secs(10),
        || async { !a.metrics().datastore.available() },
    )
    .await;
    for i in 0..5 {
        echo_roundtrip(x.listen_addr, random_bytes(10_000, 10 + i))
            .await
            .expect("forwarding while the server is cut off from etcd");
    }
    // A revocation made meanwhile: B applies it at once, A cannot know yet...
    store(&direct)
        .set_state("node-y", NodeState::Revoked)
        .await
        .unwrap();
    wait_for("B closes node-y", Duration::from_secs(2), || async {
        !has_node(&b, "node-y")
    })
    .await;
    assert!(has_node(&a, "node-y"), "A serves from the last state read");
    // ...and applies it when it is back: nothing is lost.
    for c in &cutters {
        c.heal();
    }
    wait_for(
        "A catches up and closes node-y",
        Duration::from_secs(10),
        || async { !has_node(&a, "node-y") },
    )
    .await;
    assert!(a.metrics().datastore.available());

    // Every member killed: tunnels and new connections of known nodes keep working; joins
    // and commands are refused with "datastore unavailable" and record nothing.
    for i in 0..3 {
        cluster.kill(i);
    }
    wait_for(
        "both servers know etcd is down",
        Duration::from_secs(10),
        || async { !a.metrics().datastore.available() && !b.metrics().datastore.available() },
    )
    .await;
    let (code, text) = http_get_admin(&a, "/readyz").await;
    assert_eq!(code, 200, "still ready: it serves from the last state");
    assert!(text.contains("datastore unavailable"), "{text}");
    let (_, status) = http_get_admin(&a, "/status").await;
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["datastore"]["kind"], "etcd");
    assert_eq!(status["datastore"]["available"], false, "{status}");
    for i in 0..5 {
        echo_roundtrip(x.listen_addr, random_bytes(10_000, 20 + i))
            .await
            .expect("new connections of a known node while etcd is down");
    }
    let err = store(&direct)
        .create_token(&b_dir, 3600, "etcd down", &Default::default())
        .await
        .expect_err("no token while etcd is down");
    assert!(err.is_unavailable(), "{err}");
    let err = store(&direct)
        .set_state("node-x", NodeState::Revoked)
        .await
        .expect_err("no revocation recorded while etcd is down");
    assert!(err.is_unavailable(), "{err}");
    // A join started now waits (the server answers "datastore unavailable") and completes
    // once etcd is back.
    let failures_before = b.metrics().join_failures.get();
    let d2 = TempDir::new("etcd-join-2");
    let pending = tokio::spawn(tether_agent::start(joining_agent(
        &d2,
        "node-j2",
        b.local_addr,
        &token.to_string(),
    )));
    wait_for(
        "the join is refused for now",
        Duration::from_secs(10),
        || async { b.metrics().join_failures.get() > failures_before },
    )
    .await;
    assert!(!pending.is_finished());

    for i in 0..3 {
        cluster.restart(i);
    }
    cluster.wait_healthy().await;
    wait_for(
        "both servers follow etcd again",
        Duration::from_secs(15),
        || async { a.metrics().datastore.available() && b.metrics().datastore.available() },
    )
    .await;
    let j2 = within(
        "the waiting join completes",
        Duration::from_secs(30),
        pending,
    )
    .await
    .unwrap()
    .expect("joins once etcd is back");
    let (all, _) = store(&direct).load_records().await.unwrap();
    assert_eq!(
        all.by_name.get("node-y").map(|r| &r.state),
        Some(&NodeState::Revoked)
    );
    assert!(
        matches!(
            all.by_name.get("node-x").map(|r| &r.state),
            None | Some(NodeState::Owned(_))
        ),
        "the refused revocation left nothing half-way"
    );
    j2.shutdown().await;
    j1.shutdown().await;
    x.shutdown().await;
    y.shutdown().await;
    a.shutdown().await;
    b.shutdown().await;
}

async fn http_get_admin(s: &ServerHandle, path: &str) -> (u16, String) {
    let admin = s.admin_addr.expect("admin endpoint");
    http_get(admin, path).await.unwrap()
}

/// The `--etcd-*` flags of the commands.
fn etcd_flags(s: &EtcdSettings) -> Vec<String> {
    let mut f = vec!["--datastore".to_string(), "etcd".into()];
    for e in &s.endpoints {
        f.extend(["--etcd-endpoints".to_string(), e.clone()]);
    }
    let path = |p: &Option<PathBuf>| p.as_ref().unwrap().to_string_lossy().into_owned();
    f.extend([
        "--etcd-ca".to_string(),
        path(&s.ca),
        "--etcd-cert".into(),
        path(&s.cert),
        "--etcd-key".into(),
        path(&s.key),
        "--etcd-prefix".into(),
        s.prefix.clone(),
    ]);
    f
}

/// Runs `tether-server ARGS`; its output, and whether it succeeded.
fn server_cmd(args: &[String]) -> (bool, String) {
    let out = std::process::Command::new(tether_tests::process::bin("tether-server"))
        .args(args)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn ok(args: &[&str], extra: &[String]) -> String {
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    all.extend_from_slice(extra);
    let (good, text) = server_cmd(&all);
    assert!(good, "tether-server {all:?} failed: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_import_and_export_work_against_etcd() {
    let Some(cluster) = etcd_cluster("commands_import_and_export_work_against_etcd", 1).await
    else {
        return;
    };
    let settings = cluster.settings("/cmd/");
    let flags = etcd_flags(&settings);
    let pki = Pki::new();
    let dir = pki.server_dir();
    let d = dir.to_string_lossy().into_owned();
    // A data directory's state from before etcd: a revoked node and a token.
    ok(&["agent", "revoke", "old-node", "--data-dir", &d], &[]);
    let token = ok(&["token", "create", "--data-dir", &d, "--ttl", "1h"], &[]);
    let id = token
        .trim()
        .rsplit_once("::")
        .unwrap()
        .1
        .split('.')
        .next()
        .unwrap()
        .to_string();

    let first = ok(&["datastore", "import", "--data-dir", &d], &flags[2..]);
    assert!(
        first.contains("2 node records") || first.contains("node records"),
        "{first}"
    );
    let again = ok(&["datastore", "import", "--data-dir", &d], &flags[2..]);
    assert!(
        again.contains(": 0 node records and 0 tokens written"),
        "import is idempotent: {again}"
    );
    let list = ok(&["token", "list", "--data-dir", &d], &flags);
    assert!(
        list.contains(&id),
        "the imported token is listed from etcd: {list}"
    );
    let (all, _) = store(&settings).load_records().await.unwrap();
    assert_eq!(
        all.by_name.get("old-node").map(|r| &r.state),
        Some(&NodeState::Revoked)
    );

    // issue-agent records the new key's ownership in etcd.
    let issued = TempDir::new("etcd-issued");
    let i = issued.path().to_string_lossy().into_owned();
    ok(
        &[
            "issue-agent",
            "--data-dir",
            &d,
            "--node-name",
            "issued-node",
            "--out-dir",
            &i,
        ],
        &flags,
    );
    let (all, _) = store(&settings).load_records().await.unwrap();
    assert!(
        matches!(
            all.by_name.get("issued-node").map(|r| &r.state),
            Some(NodeState::Owned(_))
        ),
        "issue-agent records the owner in etcd"
    );

    // The commands change etcd, not the directory.
    ok(&["agent", "forget", "old-node", "--data-dir", &d], &flags);
    ok(&["agent", "revoke", "etcd-node", "--data-dir", &d], &flags);
    let made = ok(&["token", "create", "--data-dir", &d], &flags);
    let made_id = made
        .trim()
        .rsplit_once("::")
        .unwrap()
        .1
        .split('.')
        .next()
        .unwrap()
        .to_string();
    ok(&["token", "revoke", &id, "--data-dir", &d], &flags);
    let list = ok(&["token", "list", "--data-dir", &d], &flags);
    assert!(list.contains(&made_id) && !list.contains(&id), "{list}");
    let local = std::fs::read_to_string(dir.join("nodes")).unwrap();
    assert!(!local.contains("etcd-node"), "the directory is untouched");

    // Export writes etcd's state into a directory.
    let out = TempDir::new("etcd-export");
    let o = out.path().to_string_lossy().into_owned();
    ok(&["datastore", "export", "--data-dir", &o], &flags[2..]);
    let nodes = std::fs::read_to_string(out.path().join("nodes")).unwrap();
    assert!(
        nodes.contains("etcd-node revoked") && nodes.contains("old-node forgotten"),
        "{nodes}"
    );
    let tokens = std::fs::read_to_string(out.path().join("tokens")).unwrap();
    assert!(
        tokens.contains(&made_id) && !tokens.contains(&id),
        "{tokens}"
    );

    // etcd unreachable: the commands say so and change nothing.
    let dead = cluster.settings_for(
        vec![format!(
            "https://127.0.0.1:{}",
            tether_tests::process::free_port()
        )],
        "/cmd/",
    );
    let mut args: Vec<String> = ["token", "create", "--data-dir", &d]
        .iter()
        .map(|a| a.to_string())
        .collect();
    args.extend(etcd_flags(&dead));
    let (good, text) = server_cmd(&args);
    assert!(!good && text.contains("datastore unavailable"), "{text}");
}

/// A CA rotation with etcd as the store: one `ca rotate` and one `ca finish` on the first
/// master; the second adopts the new CA with `--from` and finishes by itself when etcd says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_ca_rotation_through_etcd_reaches_every_master() {
    let Some(cluster) = etcd_cluster("a_ca_rotation_through_etcd_reaches_every_master", 1).await
    else {
        return;
    };
    let settings = cluster.settings("/rotation/");
    let flags = etcd_flags(&settings);
    let pki = Pki::new();
    let echo = start_echo();
    let root = TempDir::new("etcd-rotation");
    let (a, b) = (server_dir(&pki, &root, "a"), server_dir(&pki, &root, "b"));
    let (da, db) = (
        a.to_string_lossy().into_owned(),
        b.to_string_lossy().into_owned(),
    );
    let start = |dir: PathBuf| {
        let settings = settings.clone();
        async move {
            let mut c = ServerConfig::new(dir);
            c.listen = "127.0.0.1:0".parse().unwrap();
            c.upstream = echo.addr.to_string();
            c.admin = Some("127.0.0.1:0".parse().unwrap());
            c.datastore = Kind::Etcd;
            c.etcd = settings;
            c.reload_interval = Duration::from_millis(200);
            tether_server::start(c).await.expect("server starts")
        }
    };
    let (sa, sb) = (start(a.clone()).await, start(b.clone()).await);
    // A node issued with its ownership in etcd, connected to both.
    let node = root.path().join("node");
    let n = node.to_string_lossy().into_owned();
    ok(
        &[
            "issue-agent",
            "--data-dir",
            &da,
            "--node-name",
            "n1",
            "--out-dir",
            &n,
        ],
        &flags,
    );
    let mut c = tether_agent::config::AgentConfig::new(
        vec![sa.local_addr.to_string(), sb.local_addr.to_string()],
        node.clone(),
    );
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.state_dir = None;
    let agent = tether_agent::start(c).await.unwrap();
    wait_for("the node's tunnels", Duration::from_secs(10), || async {
        agent.tunnels_up() == 2
    })
    .await;

    let token = ok(&["token", "create", "--data-dir", &da], &flags)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    ok(&["ca", "rotate", "--data-dir", &da], &flags);
    let new_ca =
        tether_trust::rotation::hashes(&std::fs::read_to_string(a.join("ca.crt")).unwrap());
    // The second master sees the rotation in etcd, and says it lacks the new CA.
    let lagging = ok(&["ca", "status", "--data-dir", &db], &flags);
    assert!(lagging.contains("DOES NOT HOLD THE NEW CA"), "{lagging}");
    let mut config = ServerConfig::new(b.clone());
    config.datastore = Kind::Etcd;
    config.etcd = settings.clone();
    let diagnosed = tether_server::diagnose::diagnose(&config).await.text();
    assert!(
        diagnosed
            .lines()
            .any(|l| l.starts_with("fail") && l.contains("ca rotation")),
        "{diagnosed}"
    );
    // Until it holds it, it signs nothing: a join through it waits (answered busy, retried).
    wait_for(
        "the lagging master reads the rotation",
        Duration::from_secs(10),
        || async {
            http_get_admin(&sb, "/status")
                .await
                .1
                .contains("\"rotation\":{")
        },
    )
    .await;
    let joiner = TempDir::new("etcd-rotation-join");
    let joined = tokio::spawn(tether_agent::start(joining_agent(
        &joiner,
        "n2",
        sb.local_addr,
        &token,
    )));
    let signed =
        || async { sb.metrics().joins.get() > 0 || joiner.path().join("agent.crt").exists() };
    assert!(
        !eventually(Duration::from_secs(2), signed).await,
        "a master without the new CA signed a certificate during the rotation"
    );
    ok(&["ca", "rotate", "--data-dir", &db, "--from", &da], &flags);
    let n2 = within("the join goes through", Duration::from_secs(20), joined)
        .await
        .unwrap()
        .expect("n2 joins");
    let ca_of_n2 = std::fs::read_to_string(joiner.path().join("ca.crt")).unwrap();
    assert_eq!(tether_trust::rotation::hashes(&ca_of_n2)[0], new_ca[0]);
    n2.shutdown().await;
    wait_for(
        "the node moves to the new CA",
        Duration::from_secs(20),
        || async {
            let s = ok(
                &["ca", "status", "--output", "json", "--data-dir", &da],
                &flags,
            );
            s.contains("\"nodes_on_old_ca\": []")
                && tether_trust::rotation::hashes(
                    &std::fs::read_to_string(node.join("ca.crt")).unwrap_or_default(),
                )
                .len()
                    == 2
        },
    )
    .await;
    ok(&["ca", "finish", "--data-dir", &da], &flags);
    // The second master finishes by itself, and the node drops the old CA.
    wait_for(
        "the second master finishes",
        Duration::from_secs(10),
        || async { !tether_trust::rotation::running_in(&b) },
    )
    .await;
    wait_for(
        "the node trusts the new CA alone",
        Duration::from_secs(15),
        || async {
            tether_trust::rotation::hashes(
                &std::fs::read_to_string(node.join("ca.crt")).unwrap_or_default(),
            ) == new_ca
        },
    )
    .await;
    echo_roundtrip(agent.listen_addr, random_bytes(20_000, 4))
        .await
        .unwrap();
    agent.shutdown().await;
    sa.shutdown().await;
    sb.shutdown().await;
}

/// A rotation record of any size fits etcd: its nodes are kept in parts, read back whole, and a
/// smaller record that follows leaves no part of the larger one behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_rotation_record_is_kept_in_parts() {
    let Some(cluster) = etcd_cluster("a_large_rotation_record_is_kept_in_parts", 1).await else {
        return;
    };
    let s = store(&cluster.settings("/rotation-parts/"));
    let mut big = tether_trust::rotation::Rotation {
        old: "1".repeat(64),
        new: "2".repeat(64),
        started: 1_800_000_000,
        finished: None,
        nodes: (0..9_500)
            .map(|i| {
                (
                    format!("node-{i:05}-of-a-large-edge-fleet"),
                    format!("{i:064x}"),
                )
            })
            .collect(),
    };
    s.put_rotation(&big).await.unwrap();
    assert_eq!(s.rotation(None).await.unwrap().as_ref(), Some(&big));
    // Read again knowing it: the same, without the parts.
    assert_eq!(s.rotation(Some(&big)).await.unwrap().as_ref(), Some(&big));
    big.finished = Some(1_800_000_100);
    big.nodes
        .retain(|n, _| n.ends_with("fleet") && n < &"node-00002".to_string());
    s.put_rotation(&big).await.unwrap();
    assert_eq!(s.rotation(None).await.unwrap().as_ref(), Some(&big));
}
