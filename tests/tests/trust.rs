//! The trust suite: each test is an attack that worked before tether 0.2, tried the way an
//! attacker would, and what must hold now. docs/security.md lists them.
//!
//! - A node that claims another node's address gets none of its traffic.
//! - A renewal cannot undo a revocation, on the server that revoked or on a peer that had not
//!   heard of it yet; `forget` does not bring an old certificate back.
//! - A certificate that expires while its tunnel is up ends the tunnel.
//! - Strangers cannot make a server hold memory through join connections.

use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tether_proto::capability::Capabilities;
use tether_proto::{self as protocol, Message, StatusCode};
use tether_tests::*;
use tether_transport::tls;
use tether_transport::transport::Tunnel;
use tether_trust::records::{write_local, NodeState};
use tokio::io::AsyncReadExt;

/// Sends one CONNECT through the egress proxy; returns the status code and the answer's text.
async fn connect_status(proxy: SocketAddr, target: &str) -> (u16, String) {
    let c = tokio::net::TcpStream::connect(proxy).await.unwrap();
    let (code, body, _) = connect_on(c, target).await.unwrap();
    (code, body)
}

/// A server with the egress proxy and the admin endpoint (no upstream: the reverse path alone),
/// and a kubelet stand-in on the node.
async fn egress_lab(pki: &Pki) -> (tether_server::ServerHandle, Echo) {
    let kubelet = start_echo();
    let mut sc = server_config(pki, "127.0.0.1:9".parse().unwrap());
    sc.egress.listen = Some("127.0.0.1:0".parse().unwrap());
    sc.admin = Some("127.0.0.1:0".parse().unwrap());
    (tether_server::start(sc).await.unwrap(), kubelet)
}

/// A node of `server` that lets the control plane reach `kubelet`'s port.
fn node_of(
    pki: &Pki,
    node: &str,
    server: &tether_server::ServerHandle,
    kubelet: &Echo,
) -> tether_agent::config::AgentConfig {
    let mut c = agent_config(pki, node, &[server.local_addr]);
    c.allow_ports = vec![kubelet.addr.port()];
    c
}

/// A joined node of the attacker's, speaking the protocol itself: its hello, then the
/// addresses it claims (any strings, as a rogue agent would send). The tunnel stays open, so
/// that a CONNECT routed to it would arrive as a stream.
async fn impostor(pki: &Pki, name: &str, server: SocketAddr, claims: &[&str]) -> Tunnel {
    let conn = raw_client(pki, Some(name), server).await.unwrap();
    let tunnel = Tunnel::from_quic(conn, 64);
    let mut control = say_hello(&tunnel, name).await;
    let info = Message::NodeInfo {
        addresses: claims.iter().map(|c| c.to_string()).collect(),
    };
    control.send.write_message(&info).await.unwrap();
    // The control stream must stay open with the tunnel: keep it in a task.
    tokio::spawn(async move { while let Ok(Some(_)) = control.recv.read_message().await {} });
    tunnel
}

/// Whether a stream (a CONNECT routed to this tunnel) arrives within a short while.
async fn receives_a_stream(t: &Tunnel) -> bool {
    tokio::time::timeout(Duration::from_millis(500), t.accept_stream())
        .await
        .is_ok_and(|s| s.is_ok())
}

fn server_status(text: &str) -> tether_endpoint::status::ServerStatus {
    match serde_json::from_str(text).unwrap() {
        tether_endpoint::status::Status::Server(s) => s,
        other => panic!("not a server's status: {other:?}"),
    }
}

/// The attack of the 0.2 review: a joined node claims another node's *name* as an address,
/// and its IP address while it is offline. Before the fix the impostor received the CONNECTs
/// (`edge-1:PORT` and `127.0.0.1:PORT`) whenever edge-1 had no tunnel. Now an address belongs
/// to the first node that claimed it, a name is never an address, and a CONNECT whose node is
/// away waits for it and is then refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_impostor_claiming_a_name_or_an_offline_nodes_address_gets_none_of_its_traffic() {
    init_logging();
    let pki = Pki::new();
    let (server, kubelet) = egress_lab(&pki).await;
    let port = kubelet.addr.port();
    let proxy = server.egress_addr.unwrap();
    let admin = server.admin_addr.unwrap();
    let mut c = node_of(&pki, "edge-1", &server, &kubelet);
    c.node_ips = vec!["127.0.0.1".parse().unwrap()];
    let real = tether_agent::start(c.clone()).await.unwrap();
    let by_ip = format!("127.0.0.1:{port}");
    let by_name = format!("edge-1:{port}");
    let routed = || async { connect_status(proxy, &by_ip).await.0 == 200 };
    wait_for("routing by IP", Duration::from_secs(10), routed).await;
    assert_eq!(real.metrics().reverse_streams.get(), 1);

    // While edge-1 is connected, the impostor claims its name and its address.
    let rogue = impostor(
        &pki,
        "impostor",
        server.local_addr,
        &["edge-1", "127.0.0.1"],
    )
    .await;
    wait_for("both claims refused", Duration::from_secs(10), || async {
        server.metrics().address_conflicts.get() >= 2
    })
    .await;
    let (_, text) = http_get(admin, "/status").await.unwrap();
    let st = server_status(&text);
    let node = st.nodes.iter().find(|n| n.name == "impostor").unwrap();
    assert!(
        node.refused_addresses
            .iter()
            .any(|r| r.address == "127.0.0.1" && r.owner == "edge-1"),
        "status shows the refused claim with its owner: {text}"
    );
    assert!(node.addresses.is_empty(), "{text}");
    assert_eq!(connect_status(proxy, &by_ip).await.0, 200);
    assert_eq!(connect_status(proxy, &by_name).await.0, 200);

    // edge-1 stops: its name and its address wait for it, then are refused.
    real.shutdown().await;
    for target in [&by_ip, &by_name] {
        let (code, body) = connect_status(proxy, target).await;
        assert_eq!(code, 404, "{target}: {body}");
        assert!(body.contains("edge-1"), "{body}");
    }
    assert!(
        !receives_a_stream(&rogue).await,
        "the impostor received a CONNECT meant for edge-1"
    );

    // An address nobody owns leads nowhere, whoever is connected.
    assert_eq!(
        connect_status(proxy, &format!("127.0.0.9:{port}")).await.0,
        404
    );

    // edge-1 returns: reached by address and name again.
    let real = tether_agent::start(c).await.unwrap();
    wait_for("routing by IP again", Duration::from_secs(10), routed).await;
    assert_eq!(connect_status(proxy, &by_name).await.0, 200);
    assert!(!receives_a_stream(&rogue).await);
    rogue.close(0, "done");
    real.shutdown().await;
    server.shutdown().await;
}

/// The same attack before the real node ever connected: the operator pinned its address when
/// issuing its certificate, so even the first claim cannot be raced; and through a peer, which
/// routes by the same records.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pinned_address_leads_to_its_node_alone_before_it_connects_and_through_a_peer() {
    init_logging();
    let pair = PeeredPair::start_with(|c| {
        c.egress.listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let kubelet = start_echo();
    let port = kubelet.addr.port();
    // The node is issued with its address pinned, in the first server's data directory, as
    // `tether-server issue-agent --address 127.0.0.1` does.
    pair.pki.agent_dir("edge-1");
    let store = tether_server::datastore::Datastore::Dir(pair.pki.server_dir());
    let ip: std::net::IpAddr = "127.0.0.1".parse().unwrap();
    let claim = store.pin_addresses("edge-1", &[ip]).await.unwrap();
    assert!(
        claim.refused.is_empty() && claim.owned == vec![ip],
        "{claim:?}"
    );
    wait_for(
        "the pin reaches the peer",
        Duration::from_secs(10),
        || async {
            tether_trust::records::Records::load(pair.second.path())
                .map(|r| r.owners_of(ip) == vec!["edge-1"])
                .unwrap_or(false)
        },
    )
    .await;
    // The impostor connects to the second server first and claims the address.
    let rogue = impostor(&pair.pki, "impostor", pair.addrs[1], &["127.0.0.1"]).await;
    wait_for("the claim refused", Duration::from_secs(10), || async {
        pair.servers[1].metrics().address_conflicts.get() >= 1
    })
    .await;
    // A CONNECT at the first server goes to its peer, which has only the impostor.
    let proxy = pair.servers[0].egress_addr.unwrap();
    let by_ip = format!("127.0.0.1:{port}");
    let (code, body) = connect_status(proxy, &by_ip).await;
    assert_eq!(code, 404, "{body}");
    assert!(
        !receives_a_stream(&rogue).await,
        "the impostor received, through a peer, a CONNECT meant for edge-1"
    );
    // The real node connects to the second server: reached through the peer.
    let mut c = agent_config(&pair.pki, "edge-1", &[pair.addrs[1]]);
    c.node_ips = vec![ip];
    c.allow_ports = vec![port];
    let real = tether_agent::start(c).await.unwrap();
    let routed = || async { connect_status(proxy, &by_ip).await.0 == 200 };
    wait_for("routing through the peer", Duration::from_secs(10), routed).await;
    assert!(!receives_a_stream(&rogue).await);
    rogue.close(0, "done");
    real.shutdown().await;
    pair.shutdown().await;
}

#[test]
fn node_names_that_read_as_addresses_are_refused() {
    let pki = Pki::new();
    for name in ["10.0.0.5", "::1", "fe80::1", "127.0.0.1"] {
        assert!(tether_trust::validate_node_name(name).is_err(), "{name}");
        let out = pki
            .dir
            .path()
            .join(format!("out-{}", name.replace(':', "_")));
        let err = tether_trust::issue_agent_files(&pki.server_dir(), name, &out, 1).unwrap_err();
        assert!(err.to_string().contains("not an IP address"), "{err}");
    }
    assert!(tether_trust::validate_node_name("node-10.0.0.5").is_ok());
}

/// Sends a renewal request on a tunnel opened with `conn`; returns the answer.
async fn renew_on(conn: &quinn::Connection, csr: Vec<u8>) -> Result<(StatusCode, String), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let req = protocol::encode_to_bytes(&Message::Renew { csr }).unwrap();
    send.write_all(&req).await.map_err(|e| e.to_string())?;
    let _ = send.finish();
    let data = within(
        "renewal answer",
        Duration::from_secs(10),
        recv.read_to_end(64 * 1024),
    )
    .await
    .map_err(|e| e.to_string())?;
    match protocol::decode(&data) {
        Ok(Some((
            Message::Certificate {
                code,
                message,
                cert_pem,
                ..
            },
            _,
        ))) => Ok((
            code,
            if code == StatusCode::Ok {
                cert_pem
            } else {
                message
            },
        )),
        other => Err(format!("not a certificate answer: {other:?}")),
    }
}

fn records_say(dir: &std::path::Path, name: &str, state: &str) -> bool {
    std::fs::read_to_string(dir.join("nodes"))
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with(&format!("{name} {state}")))
}

/// One tunnel sent 150 renewals in half a second and got 150 certificates, each a write of the
/// records (with etcd, a transaction every server applies). Now a node gets its burst (3), one
/// at a time, and every other request is answered busy with nothing signed or written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_flood_signs_no_more_than_the_nodes_burst() {
    init_logging();
    let pki = Pki::new();
    let server = start_server(&pki, "127.0.0.1:9".parse().unwrap()).await;
    let conn = raw_client(&pki, Some("flood"), server.local_addr)
        .await
        .unwrap();
    wait_for("the node is seen", Duration::from_secs(10), || async {
        server.connected_nodes() == ["flood"]
    })
    .await;
    let records = || std::fs::read_to_string(pki.server_dir().join("nodes")).unwrap_or_default();
    let before = records();
    let mut asks = Vec::new();
    for _ in 0..40 {
        let (csr, _) = tether_trust::make_csr("flood").unwrap();
        let conn = conn.clone();
        asks.push(tokio::spawn(async move { renew_on(&conn, csr).await }));
    }
    let (mut signed, mut busy) = (0, 0);
    for a in asks {
        match a.await.unwrap() {
            Ok((StatusCode::Ok, _)) => signed += 1,
            Ok((StatusCode::Busy, why)) => {
                assert!(why.contains("renewal"), "{why}");
                busy += 1
            }
            other => panic!("{other:?}"),
        }
    }
    assert!((1..=3).contains(&signed), "signed {signed}");
    assert_eq!(signed + busy, 40);
    let renewals = tether_server::metrics::Limit::Renewals;
    assert_eq!(server.metrics().limit_hits.get(renewals), busy as u64);
    assert_ne!(records(), before, "the granted renewals were recorded");
    conn.close(0u32.into(), b"done");
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_cannot_undo_a_revocation_on_any_server() {
    init_logging();
    let p = PeeredPair::start().await;
    let (s1, s2) = (&p.servers[0], &p.servers[1]);
    // The thief holds the node's certificate and key, with a tunnel to each server.
    let c1 = raw_client(&p.pki, Some("thief"), s1.local_addr)
        .await
        .unwrap();
    let c2 = raw_client(&p.pki, Some("thief"), s2.local_addr)
        .await
        .unwrap();
    wait_for(
        "both servers see the node",
        Duration::from_secs(10),
        || async { s1.connected_nodes() == ["thief"] && s2.connected_nodes() == ["thief"] },
    )
    .await;

    // The operator revokes on the first server; the thief renews at once on both, before the
    // first server has looked at its records file and before the second has heard of it.
    write_local(&p.pki.server_dir(), "thief", NodeState::Revoked).unwrap();
    let (csr1, _) = tether_trust::make_csr("thief").unwrap();
    let (csr2, key2) = tether_trust::make_csr("thief").unwrap();
    let (r1, r2) = tokio::join!(renew_on(&c1, csr1), renew_on(&c2, csr2));
    if let Ok((code, msg)) = &r1 {
        assert_ne!(*code, StatusCode::Ok, "the revoking server renewed: {msg}");
    }

    // Whatever the second server answered, the revocation wins everywhere within a second
    // or so, and stays.
    wait_for(
        "revoked on both servers, every tunnel closed",
        Duration::from_secs(3),
        || async {
            records_say(&p.pki.server_dir(), "thief", "revoked")
                && records_say(p.second.path(), "thief", "revoked")
                && s1.connected_nodes().is_empty()
                && s2.connected_nodes().is_empty()
        },
    )
    .await;
    // A certificate the second server may have signed before it heard gets no tunnel.
    if let Ok((StatusCode::Ok, cert_pem)) = r2 {
        let id = tls::Identity::from_pem(&cert_pem, &key2).unwrap();
        for s in [s1, s2] {
            if let Ok(c) = raw_client_with(&p.pki, Some(id.clone()), tls::ALPN, s.local_addr).await
            {
                within(
                    "renewed certificate refused",
                    Duration::from_secs(5),
                    c.closed(),
                )
                .await;
            }
        }
        assert!(s1.connected_nodes().is_empty() && s2.connected_nodes().is_empty());
    }
    // Renewing again is refused with a reason.
    let c = raw_client(&p.pki, Some("thief"), s2.local_addr).await;
    if let Ok(c) = c {
        let (csr, _) = tether_trust::make_csr("thief").unwrap();
        if let Ok((code, _)) = renew_on(&c, csr).await {
            assert_ne!(code, StatusCode::Ok);
        }
    }
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forget_does_not_bring_an_old_certificate_back() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let server = start_server(&pki, echo.addr).await;
    let agent = start_agent(&pki, "reinstalled", &[server.local_addr]).await;
    write_local(&pki.server_dir(), "reinstalled", NodeState::Revoked).unwrap();
    wait_for("revoked", Duration::from_secs(3), || async {
        agent.tunnels_up() == 0
    })
    .await;
    // The operator forgets the name so the reinstalled machine can join again: the old
    // certificate stays out, at once and on every later try.
    write_local(&pki.server_dir(), "reinstalled", NodeState::Forgotten).unwrap();
    let before = server.metrics().handshake_failures.get();
    wait_for(
        "old certificate refused",
        Duration::from_secs(10),
        || async { server.metrics().handshake_failures.get() >= before + 2 },
    )
    .await;
    assert_eq!(agent.tunnels_up(), 0);
    assert!(server.connected_nodes().is_empty());
    // A new join under the name works.
    let token = std::fs::read_to_string(pki.server_dir().join("token")).unwrap();
    let d = TempDir::new("rejoin");
    let mut c = tether_agent::config::AgentConfig::new(
        vec![server.local_addr.to_string()],
        d.path().to_path_buf(),
    );
    c.listen = "127.0.0.1:0".parse().unwrap();
    c.token = Some(token.trim().to_string());
    c.node_name = Some("reinstalled".into());
    let fresh = tether_agent::start(c).await.unwrap();
    wait_for("the new key's tunnel", Duration::from_secs(10), || async {
        fresh.tunnels_up() == 1
    })
    .await;
    assert_eq!(agent.tunnels_up(), 0, "the old certificate stays out");
    fresh.shutdown().await;
    agent.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_expires_while_its_tunnel_is_up_ends_the_tunnel() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let server = start_server(&pki, echo.addr).await;
    let short = pki.agent_cert("brief", -60, 3);
    let id = tls::Identity::from_pem(&short.cert_pem, &short.key_pem).unwrap();
    let conn = raw_client_with(&pki, Some(id), tls::ALPN, server.local_addr)
        .await
        .unwrap();
    wait_for("tunnel up", Duration::from_secs(5), || async {
        server.connected_nodes() == ["brief"]
    })
    .await;
    let closed = within("closed at expiry", Duration::from_secs(8), conn.closed()).await;
    assert!(
        closed.to_string().contains("expired"),
        "closed for another reason: {closed}"
    );
    assert_eq!(server.metrics().expired_closed.get(), 1);
    server.shutdown().await;
}

/// A stranger's join connection over TCP, as a raw client would make it.
async fn tcp_join_connection(
    pki: &Pki,
    server: SocketAddr,
) -> std::io::Result<tether_transport::transport::tcp::TcpTunnel> {
    let token: tether_trust::token::Token = std::fs::read_to_string(pki.server_dir().join("token"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let cfg = tls::join_client_config(&token.ca_hash, tls::PostQuantum::Prefer).unwrap();
    tether_transport::transport::tcp::TcpTunnel::connect(
        server,
        "localhost",
        cfg.into(),
        Default::default(),
        2048,
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_cannot_make_a_server_hold_memory_through_joins() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let logs = TempDir::new("join-flood");
    let server = tether_tests::process::ServerProcess::start(
        &pki.server_dir(),
        echo.addr,
        &[],
        logs.path().join("server.log"),
    )
    .await;
    let addr = server.addr;
    let baseline = rss_kib(server.proc.pid());

    // The attack that grew a server from 10 to 274 MiB: join connections over TCP whose first
    // stream sends the start of a request and stops (the server waits for the rest), while 256
    // more streams are filled to their windows. Now a second stream ends the connection.
    // Each attacker holds what it got until the server's memory has been measured.
    let (flooded_tx, mut flooded) = tokio::sync::mpsc::channel::<usize>(16);
    let (release_tx, release) = tokio::sync::watch::channel(false);
    let mut tasks = tokio::task::JoinSet::new();
    let mut attackers = 0;
    for _ in 0..4 {
        let Ok(conn) = tcp_join_connection(&pki, addr).await else {
            continue;
        };
        attackers += 1;
        let (flooded_tx, mut release) = (flooded_tx.clone(), release.clone());
        tasks.spawn(async move {
            let mut held = Vec::new();
            for i in 0..257 {
                let Ok(Ok((mut send, recv))) =
                    tokio::time::timeout(Duration::from_millis(500), conn.open()).await
                else {
                    break;
                };
                // The first stream: one byte of a Join frame. The others: junk to the window.
                let junk = if i == 0 {
                    bytes::Bytes::from_static(&[0x20])
                } else {
                    bytes::Bytes::from(vec![0x5au8; 256 * 1024 - 16])
                };
                let sent =
                    tokio::time::timeout(Duration::from_millis(500), send.write_chunk(junk)).await;
                held.push((send, recv));
                if !matches!(sent, Ok(Ok(()))) {
                    break;
                }
            }
            let _ = flooded_tx.send(held.len()).await;
            let _ = release.wait_for(|r| *r).await;
            drop(conn);
        });
    }
    // And over QUIC: the same shape, megabytes on each further stream.
    for _ in 0..4 {
        let Ok(c) = raw_client_with(&pki, None, tls::ALPN_JOIN, addr).await else {
            continue;
        };
        attackers += 1;
        let (flooded_tx, mut release) = (flooded_tx.clone(), release.clone());
        tasks.spawn(async move {
            let mut held = Vec::new();
            for i in 0..64 {
                let Ok(Ok((mut send, recv))) =
                    tokio::time::timeout(Duration::from_millis(500), c.open_bi()).await
                else {
                    break;
                };
                let junk = if i == 0 {
                    vec![0x20u8]
                } else {
                    vec![0xa5u8; 2 * 1024 * 1024]
                };
                let _ =
                    tokio::time::timeout(Duration::from_millis(500), send.write_all(&junk)).await;
                held.push((send, recv));
            }
            let _ = flooded_tx.send(held.len()).await;
            let _ = release.wait_for(|r| *r).await;
            drop(c);
        });
    }
    drop(flooded_tx);
    let mut streams = Vec::new();
    for _ in 0..attackers {
        let n = within("the flood", Duration::from_secs(60), flooded.recv()).await;
        streams.extend(n);
    }
    // Let the server take in what arrived.
    let settled = Instant::now();
    let mut peak = rss_kib(server.proc.pid());
    while settled.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        peak = peak.max(rss_kib(server.proc.pid()));
    }
    let _ = release_tx.send(true);
    let _ = within("attackers leave", Duration::from_secs(10), tasks.join_all()).await;
    eprintln!("join flood: streams per attacker {streams:?}");
    eprintln!("join flood: server RSS {baseline} KiB before, {peak} KiB during");
    assert!(
        peak < baseline + 48 * 1024,
        "the join flood grew the server from {baseline} KiB to {peak} KiB"
    );
    // The server still serves a legitimate node.
    let agent = start_agent(&pki, "legit", &[addr]).await;
    echo_roundtrip(agent.listen_addr, random_bytes(100_000, 7))
        .await
        .unwrap();
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_whose_answer_is_lost_does_not_lock_the_node_out() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let server = start_server(&pki, echo.addr).await;
    let conn = raw_client(&pki, Some("unlucky"), server.local_addr)
        .await
        .unwrap();
    wait_for("tunnel", Duration::from_secs(5), || async {
        server.connected_nodes() == ["unlucky"]
    })
    .await;
    // The server signs and records the new key; the answer never reaches the node.
    let (csr, _lost_key) = tether_trust::make_csr("unlucky").unwrap();
    let (code, _) = renew_on(&conn, csr).await.unwrap();
    assert_eq!(code, StatusCode::Ok);
    conn.close(0u32.into(), b"crashed");
    // The node comes back with the certificate it still has, and renews again.
    let conn = raw_client(&pki, Some("unlucky"), server.local_addr)
        .await
        .expect("the key before the renewal is still good");
    let (csr, key) = tether_trust::make_csr("unlucky").unwrap();
    let (code, cert_pem) = renew_on(&conn, csr).await.unwrap();
    assert_eq!(code, StatusCode::Ok, "{cert_pem}");
    // The new pair works; once it has been seen, the old one is done for new tunnels.
    let id = tls::Identity::from_pem(&cert_pem, &key).unwrap();
    let renewed = raw_client_with(&pki, Some(id), tls::ALPN, server.local_addr)
        .await
        .unwrap();
    wait_for("renewed key seen", Duration::from_secs(5), || async {
        server.connected_nodes() == ["unlucky"]
            && std::fs::read_to_string(pki.server_dir().join("nodes"))
                .unwrap_or_default()
                .lines()
                .any(|l| l.starts_with("unlucky owned:") && l.contains(" seen=1"))
    })
    .await;
    let old = raw_client(&pki, Some("unlucky"), server.local_addr)
        .await
        .unwrap();
    let closed = within("old key refused", Duration::from_secs(5), old.closed()).await;
    assert!(closed.to_string().contains("renewed"), "{closed}");
    // The tunnel the node opened with the old key before renewing stays up.
    assert!(conn.close_reason().is_none());
    drop(renewed);
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stall_cannot_lock_others_out_of_the_admin_endpoint() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let mut sc = server_config(&pki, echo.addr);
    sc.admin = Some("127.0.0.1:0".parse().unwrap());
    let server = tether_server::start(sc).await.unwrap();
    let admin = server.admin_addr.unwrap();
    // One address opens every slot the endpoint has and sends nothing.
    let mut stalled = Vec::new();
    for _ in 0..tether_endpoint::admin::MAX_CONNECTIONS {
        stalled.push(tokio::net::TcpStream::connect(admin).await.unwrap());
    }
    // Another address is served at once, not after the stalled ones time out.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
    let start = Instant::now();
    let mut c = sock.connect(admin).await.unwrap();
    let (code, _) = within(
        "served",
        Duration::from_secs(3),
        tether_endpoint::http::get(&mut c, "x", "/healthz", 1024),
    )
    .await
    .unwrap();
    assert_eq!(code, 200);
    assert!(
        start.elapsed() < tether_endpoint::admin::REQUEST_TIMEOUT,
        "waited {:?} behind stalled clients",
        start.elapsed()
    );
    // The stalled address's connections past its share were closed at once.
    let mut closed = 0;
    for mut s in stalled {
        let mut b = [0u8; 1];
        if let Ok(Ok(0)) = tokio::time::timeout(Duration::from_millis(100), s.read(&mut b)).await {
            closed += 1;
        }
    }
    assert!(
        closed >= tether_endpoint::admin::MAX_CONNECTIONS - tether_endpoint::admin::MAX_PER_CLIENT,
        "only {closed} of the stalled connections were refused"
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_egress_proxy_off_loopback_needs_client_certificates() {
    init_logging();
    let pki = Pki::new();
    let mut sc = server_config(&pki, "127.0.0.1:9".parse().unwrap());
    sc.egress.listen = Some("0.0.0.0:0".parse().unwrap());
    let err = tether_server::start(sc).await.err().expect("refused");
    let text = err.to_string();
    assert!(
        text.contains("--egress-client-ca") && text.contains("--egress-uds"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_records_file_stops_the_start_naming_file_and_line() {
    init_logging();
    let pki = Pki::new();
    let nodes = pki.server_dir().join("nodes");
    std::fs::write(
        &nodes,
        "# name state at-ms\nedge-1 revoked 1700000000000\nedge-2 owned:nothex 1\n",
    )
    .unwrap();
    let err = tether_server::start(server_config(&pki, "127.0.0.1:9".parse().unwrap()))
        .await
        .err()
        .expect("a corrupt records file stops the start");
    let text = err.to_string();
    assert!(text.contains("nodes") && text.contains("line 3"), "{text}");
    // The real binary says the same and exits non-zero.
    let out = std::process::Command::new(tether_tests::process::bin("tether-server"))
        .args([
            "run",
            "--data-dir",
            pki.server_dir().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("line 3"), "{stderr}");
}

/// One address held every handshake slot with TCP connections that sent nothing (each for the
/// whole 10 s timeout), and no other node could connect, over QUIC either. Now a silent TCP
/// connection is closed after 2 s, and one source holds at most its share of the slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_tcp_connections_from_one_source_cannot_lock_out_new_tunnels() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let server = start_server(&pki, echo.addr).await;
    // 4,100 silent connections from 127.0.0.2.
    let mut silent = Vec::new();
    for _ in 0..4100 {
        let sock = tokio::net::TcpSocket::new_v4().unwrap();
        sock.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        match sock.connect(server.local_addr).await {
            Ok(c) => silent.push(c),
            Err(e) => panic!("connect: {e}"),
        }
    }
    // A node from another address connects at once, over QUIC and over TCP.
    for transport in [
        tether_link::reconnect::TransportChoice::Quic,
        tether_link::reconnect::TransportChoice::Tcp,
    ] {
        let mut c = agent_config(&pki, "fresh", &[server.local_addr]);
        c.transport = transport;
        let agent = tether_agent::start(c).await.unwrap();
        wait_for(
            "a tunnel despite the silent ones",
            Duration::from_secs(5),
            || async { agent.tunnels_up() == 1 },
        )
        .await;
        echo_roundtrip(agent.listen_addr, random_bytes(1000, 5))
            .await
            .unwrap();
        agent.shutdown().await;
    }
    // Every silent connection is closed within about 2 s of its start.
    let mut c = silent.pop().unwrap();
    let mut b = [0u8; 1];
    let n = within(
        "the last silent connection closed",
        Duration::from_secs(5),
        c.read(&mut b),
    )
    .await;
    assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
    let handshakes = tether_server::metrics::Limit::Handshakes;
    assert!(server.metrics().limit_hits.get(handshakes) > 0);
    server.shutdown().await;
}

/// 4,200 idle connections from the address kube-apiserver itself uses made its real CONNECT
/// fail (the per-client cap refused newcomers). Now the oldest connection that has not sent its
/// request head is closed to make room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_egress_connections_from_the_apiservers_address_do_not_block_its_connect() {
    init_logging();
    let pki = Pki::new();
    let (server, kubelet) = egress_lab(&pki).await;
    let port = kubelet.addr.port();
    let proxy = server.egress_addr.unwrap();
    let agent = tether_agent::start(node_of(&pki, "edge-1", &server, &kubelet))
        .await
        .unwrap();
    let target = format!("edge-1:{port}");
    wait_for("routing", Duration::from_secs(10), || async {
        connect_status(proxy, &target).await.0 == 200
    })
    .await;
    let mut idle = Vec::new();
    for _ in 0..4200 {
        idle.push(tokio::net::TcpStream::connect(proxy).await.unwrap());
    }
    let (code, body) = connect_status(proxy, &target).await;
    assert_eq!(code, 200, "the real CONNECT after 4,200 idle ones: {body}");
    drop(idle);
    agent.shutdown().await;
    server.shutdown().await;
}

/// Any holder of a server certificate could make every node dial any address, for good:
/// the cloud metadata address, loopback ports. Now an announced address of such a kind is not
/// dialed (unless the agent was given a server of that kind, or allows the network), and the
/// node keeps working with its real servers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_link_local_announcement_is_not_dialed() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let mut sc = server_config(&pki, echo.addr);
    sc.advertise = Some("169.254.169.254:80".into());
    let server = tether_server::start(sc).await.unwrap();
    let agent = start_agent(&pki, "edge-1", &[server.local_addr]).await;
    wait_for(
        "the announcement refused",
        Duration::from_secs(10),
        || async { agent.metrics().announced_refused.get() == 1 },
    )
    .await;
    echo_roundtrip(agent.listen_addr, random_bytes(1000, 4))
        .await
        .unwrap();
    assert_eq!(agent.tunnels_up(), 1, "only the real server");
    agent.shutdown().await;
    server.shutdown().await;
}

/// A holder of another server certificate from the CA answered with a real server's instance
/// id, and the agent, taking it for a second address of that server, stayed off the real one.
/// Now two links are one server only when the key their certificates prove agrees too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spoofed_server_id_does_not_keep_the_agent_off_the_real_server() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let mut sc = server_config(&pki, echo.addr);
    sc.admin = Some("127.0.0.1:0".parse().unwrap());
    let real = tether_server::start(sc).await.unwrap();
    let (_, text) = http_get(real.admin_addr.unwrap(), "/status").await.unwrap();
    let real_id = server_status(&text).instance;

    // The impostor: its own server certificate from the same CA, answering every hello with
    // the real server's id.
    let ca = tether_trust::Ca::load(&pki.server_dir()).unwrap();
    let issued = ca
        .issue_server(&loopback_names(), tether_trust::Lifetime::days(1))
        .unwrap();
    let identity = tls::Identity::from_pem(&issued.cert_pem, &issued.key_pem).unwrap();
    let roots = tls::load_roots(&pki.server_dir().join("ca.crt")).unwrap();
    let cfg = tls::quic_server_config(
        tls::server_config(roots, identity, tls::PostQuantum::Prefer).unwrap(),
        tls::quic_transport(Default::default(), Default::default()),
    )
    .unwrap();
    let endpoint = tether_endpoint::net::quic_endpoint(loopback0(), Some(cfg)).unwrap();
    let rogue_addr = endpoint.local_addr().unwrap();
    let served = tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            let real_id = real_id.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let tunnel = Tunnel::from_quic(conn, 8);
                let Ok(mut control) = tunnel.accept_stream().await else {
                    return;
                };
                if let Ok(Some(Message::Hello { .. })) = control.recv.read_message().await {
                    let welcome = Message::Welcome {
                        version: protocol::PROTOCOL_VERSION,
                        server_id: real_id,
                        capabilities: Capabilities::ours(&[]),
                    };
                    let _ = control.send.write_message(&welcome).await;
                    tunnel.closed().await;
                }
            });
        }
    });
    // The impostor first in the agent's list, the real server second.
    let agent = start_agent(&pki, "edge-1", &[rogue_addr, real.local_addr]).await;
    wait_for(
        "a tunnel to the real server too",
        Duration::from_secs(10),
        || async { agent.tunnels_up() == 2 },
    )
    .await;
    assert_eq!(real.connected_nodes(), ["edge-1"]);
    agent.shutdown().await;
    served.abort();
    real.shutdown().await;
}

/// A data directory restored from a backup taken before a revocation: its peers know better,
/// and the revocation comes back with their records; the revoked node stays out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_data_directory_restored_from_before_a_revocation_learns_it_back_from_its_peer() {
    init_logging();
    let mut pair = PeeredPair::start().await;
    pair.pki.agent_dir("stolen");
    let nodes = pair.pki.server_dir().join("nodes");
    let backup = std::fs::read_to_string(&nodes).unwrap();
    write_local(&pair.pki.server_dir(), "stolen", NodeState::Revoked).unwrap();
    wait_for(
        "the revocation reaches the peer",
        Duration::from_secs(10),
        || async { records_say(pair.second.path(), "stolen", "revoked") },
    )
    .await;
    // The first server goes down and its directory is restored from the backup.
    let first = pair.servers.remove(0);
    first.shutdown().await;
    std::fs::write(&nodes, backup).unwrap();
    assert!(!records_say(&pair.pki.server_dir(), "stolen", "revoked"));
    // On a new port: a port just closed may be taken as the source of the peer's redial.
    let mut c = server_config(&pair.pki, pair.echo.addr);
    c.peers = vec![pair.addrs[1].to_string()];
    let again = tether_server::start(c).await.unwrap();
    wait_for(
        "the revocation learnt back",
        Duration::from_secs(10),
        || async { records_say(&pair.pki.server_dir(), "stolen", "revoked") },
    )
    .await;
    let agent = tether_agent::start(agent_config(&pair.pki, "stolen", &[again.local_addr]))
        .await
        .unwrap();
    assert!(
        !eventually(Duration::from_secs(2), || async { agent.tunnels_up() > 0 }).await,
        "the revoked node stays out"
    );
    agent.shutdown().await;
    again.shutdown().await;
    pair.shutdown().await;
}
