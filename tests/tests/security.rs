//! The security suite: a stranger gets nothing, a bad input gets a clear error and a log line,
//! and the server keeps serving. Joins, renewal, revocation, rotation and limits.

use std::net::SocketAddr;
use std::time::Duration;
use tether_agent::join::JoinError;
use tether_agent::AgentError;
use tether_proto::{self as protocol, Message, StatusCode, Target};
use tether_tests::*;
use tether_trust::records::{write_local, NodeState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The token `init` wrote for the test PKI.
fn init_token(pki: &Pki) -> String {
    std::fs::read_to_string(pki.server_dir().join("token"))
        .unwrap()
        .trim()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_with_a_token_and_keeps_its_certificate() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let server = start_server(&pki, echo.addr).await;
    let node_dir = TempDir::new("join");
    let agent = tether_agent::start(joining_agent(
        &node_dir,
        "edge-7",
        server.local_addr,
        &init_token(&pki),
    ))
    .await
    .expect("joins");
    assert_eq!(agent.node_name, "edge-7");
    wait_for("tunnel", Duration::from_secs(10), || async {
        agent.tunnels_up() == 1
    })
    .await;
    echo_roundtrip(agent.listen_addr, random_bytes(50_000, 1))
        .await
        .unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(node_dir.path().join("agent.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    assert_eq!(
        std::fs::read(node_dir.path().join("ca.crt")).unwrap(),
        std::fs::read(pki.server_dir().join("ca.crt")).unwrap()
    );
    assert_eq!(server.metrics().joins.get(), 1);
    agent.shutdown().await;

    // Later starts use the stored certificate; the token is optional.
    let mut again = joining_agent(&node_dir, "edge-7", server.local_addr, "");
    again.token = None;
    let agent = tether_agent::start(again)
        .await
        .expect("starts from its stored certificate");
    wait_for("tunnel", Duration::from_secs(10), || async {
        agent.tunnels_up() == 1
    })
    .await;
    assert_eq!(server.metrics().joins.get(), 1);
    agent.shutdown().await;
    server.shutdown().await;
}

/// One token used to join any number of names, and records were never bounded: past 64 MiB
/// under the etcd prefix every server's first read failed. Now a token may be made for N joins
/// (and names the addresses its node owns), and the cluster holds at most `--max-nodes`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_joins_no_more_than_its_uses_and_the_cluster_no_more_than_max_nodes() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let mut sc = server_config(&pki, echo.addr);
    // The server's own records hold none yet; three joins fill it.
    sc.max_nodes = 3;
    let server = tether_server::start(sc).await.unwrap();
    let dir = pki.server_dir();
    let ip: std::net::IpAddr = "127.0.0.42".parse().unwrap();
    let grant = tether_trust::token::TokenGrant {
        uses: 2,
        addresses: vec![ip],
    };
    let two = tether_trust::token::create_with(&dir, 3600, "two", &grant)
        .unwrap()
        .to_string();
    let join = |node: &'static str, token: String| {
        let d = TempDir::new(node);
        let server = server.local_addr;
        async move {
            let r = tether_agent::start(joining_agent(&d, node, server, &token)).await;
            (d, r)
        }
    };
    let (_d1, first) = join("u1", two.clone()).await;
    first.expect("first use").shutdown().await;
    // The token's address is the first node's, before it ever claimed it.
    let records = tether_trust::records::Records::load(&dir).unwrap();
    assert_eq!(records.owners_of(ip), vec!["u1"]);
    // Its second use: the address is taken, so this join is refused (and spends the use).
    let (_d2, second) = join("u2", two.clone()).await;
    let err = second.err().unwrap().to_string();
    assert!(err.contains("another node owns"), "{err}");
    let (_d3, third) = join("u3", two.clone()).await;
    let err = third.err().unwrap().to_string();
    assert!(err.contains("bad token"), "a token past its uses: {err}");

    // Any number of uses, but the cluster is full at 3 records (u1, u2 and one more).
    let any = tether_trust::token::create(&dir, 3600, "any")
        .unwrap()
        .to_string();
    let (_d4, fourth) = join("u4", any.clone()).await;
    fourth.expect("third record").shutdown().await;
    let (_d5, fifth) = join("u5", any.clone()).await;
    let err = fifth.err().unwrap().to_string();
    assert!(err.contains("max-nodes"), "{err}");
    let nodes = tether_server::metrics::Limit::Nodes;
    assert_eq!(server.metrics().limit_hits.get(nodes), 1);
    // A node already on record joins again (a reinstall after forget is a known name).
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_and_taken_names_are_refused_clearly() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let server = start_server(&pki, echo.addr).await;
    let token = init_token(&pki);

    // A wrong secret.
    let (head, _) = token.rsplit_once('.').unwrap();
    let wrong = format!("{head}.0000000000000000");
    let d = TempDir::new("wrong");
    let err = tether_agent::start(joining_agent(&d, "n1", server.local_addr, &wrong))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, AgentError::Join(JoinError::Refused(m)) if m.contains("bad token")),
        "{err}"
    );
    assert!(!d.path().join("agent.crt").exists());

    // A CA hash with one character changed: the agent refuses the server.
    let mut chars: Vec<char> = token.chars().collect();
    chars[3] = if chars[3] == 'a' { 'b' } else { 'a' };
    let forged: String = chars.into_iter().collect();
    let d = TempDir::new("forged");
    let err = tether_agent::start(joining_agent(&d, "n1", server.local_addr, &forged))
        .await
        .err()
        .unwrap();
    assert!(
        matches!(&err, AgentError::Join(JoinError::CaMismatch(m)) if m.contains("does not match")),
        "{err}"
    );

    // A revoked token, and one created while the server runs.
    let dir = pki.server_dir();
    let fresh = tether_trust::token::create(&dir, 3600, "test")
        .unwrap()
        .to_string();
    let d = TempDir::new("fresh");
    let a = tether_agent::start(joining_agent(&d, "n1", server.local_addr, &fresh))
        .await
        .expect("new token works at once");
    a.shutdown().await;
    let id = fresh.split("::").nth(1).unwrap().split('.').next().unwrap();
    assert!(tether_trust::token::revoke(&dir, id).unwrap());
    let d = TempDir::new("revoked-token");
    let err = tether_agent::start(joining_agent(&d, "n2", server.local_addr, &fresh))
        .await
        .err()
        .unwrap();
    // The same words as for a wrong secret: whether an id exists is not told.
    assert!(err.to_string().contains("bad token"), "{err}");
    assert!(!err.to_string().contains(id), "{err}");

    // A second key for a taken name is refused until an operator forgets the name.
    let d = TempDir::new("second-key");
    let err = tether_agent::start(joining_agent(&d, "n1", server.local_addr, &token))
        .await
        .err()
        .unwrap();
    assert!(
        err.to_string().contains("already owned by another key"),
        "{err}"
    );
    write_local(&dir, "n1", NodeState::Forgotten).unwrap();
    let a = tether_agent::start(joining_agent(&d, "n1", server.local_addr, &token))
        .await
        .expect("joins after forget");
    wait_for("tunnel", Duration::from_secs(10), || async {
        a.tunnels_up() == 1
    })
    .await;
    a.shutdown().await;

    // Wrong secret, revoked token, taken name (the forged CA hash fails in TLS, before a join).
    assert!(server.metrics().join_failures.get() >= 3);
    // Still serving.
    let agent = start_agent(&pki, "still-fine", &[server.local_addr]).await;
    echo_roundtrip(agent.listen_addr, random_bytes(1000, 2))
        .await
        .unwrap();
    agent.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn join_attempts_are_rate_limited_per_source() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let mut sc = server_config(&pki, echo.addr);
    sc.join_rate_per_minute = 2;
    let server = tether_server::start(sc).await.unwrap();
    let token = init_token(&pki);
    let (head, _) = token.rsplit_once('.').unwrap();
    let wrong = format!("{head}.1111");
    for i in 0..2 {
        let d = TempDir::new("rate");
        let err = tether_agent::start(joining_agent(
            &d,
            &format!("r{i}"),
            server.local_addr,
            &wrong,
        ))
        .await
        .err()
        .unwrap();
        assert!(err.to_string().contains("wrong secret"), "{err}");
    }
    // The third attempt this minute is cut off before its request is read; the agent retries,
    // so give it a moment and check the server's count.
    let d = TempDir::new("rate3");
    let third = tokio::spawn(tether_agent::start(joining_agent(
        &d,
        "r3",
        server.local_addr,
        &token,
    )));
    wait_for("rate limit bites", Duration::from_secs(10), || async {
        metric(
            &server_metrics(&server),
            "tether_limit_hits_total{limit=\"join_rate\"}",
        ) >= Some(1.0)
    })
    .await;
    third.abort();
    // Per source: another address joins at once, while this one is still held back.
    let d = TempDir::new("rate-elsewhere");
    let elsewhere = joining_agent(&d, "r4", server.local_addr, &token);
    let endpoint =
        tether_endpoint::net::quic_endpoint("127.0.0.2:0".parse().unwrap(), None).unwrap();
    within(
        "a join from another source",
        Duration::from_secs(10),
        tether_agent::join::join(&elsewhere, &endpoint, &token),
    )
    .await
    .unwrap();
    assert!(d.path().join("agent.crt").exists());
    let limited = metric(
        &server_metrics(&server),
        "tether_limit_hits_total{limit=\"join_rate\"}",
    );
    let d = TempDir::new("rate5");
    let again = tokio::spawn(tether_agent::start(joining_agent(
        &d,
        "r5",
        server.local_addr,
        &token,
    )));
    wait_for(
        "the first source still held back",
        Duration::from_secs(10),
        || async {
            metric(
                &server_metrics(&server),
                "tether_limit_hits_total{limit=\"join_rate\"}",
            ) > limited
        },
    )
    .await;
    again.abort();
    server.shutdown().await;
}

fn server_metrics(server: &tether_server::ServerHandle) -> String {
    server
        .metrics()
        .render(&Default::default(), &Default::default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_and_foreign_certificates_get_no_tunnel() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let server = start_server(&pki, echo.addr).await;
    let old = pki.agent_cert("stale", -30 * 86400, -86400);
    let d = TempDir::new("expired");
    std::fs::copy(pki.server_dir().join("ca.crt"), d.path().join("ca.crt")).unwrap();
    old.save(&d.path().join("agent.crt"), &d.path().join("agent.key"))
        .unwrap();
    let mut c = tether_agent::config::AgentConfig::new(
        vec![server.local_addr.to_string()],
        d.path().to_path_buf(),
    );
    c.listen = "127.0.0.1:0".parse().unwrap();
    let agent = tether_agent::start(c).await.unwrap();
    wait_for(
        "expired certificate refused",
        Duration::from_secs(10),
        || async { server.metrics().handshake_failures.get() >= 1 },
    )
    .await;
    assert_eq!(agent.tunnels_up(), 0);
    assert!(server.connected_nodes().is_empty());
    agent.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_certificate_bad_headers_and_stalls_are_refused_and_bounded() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let mut sc = server_config(&pki, echo.addr);
    sc.header_timeout = Duration::from_millis(300);
    let server = tether_server::start(sc).await.unwrap();

    // No certificate: the connection is closed with "refused", no tunnel, counted.
    let conn = raw_client(&pki, None, server.local_addr)
        .await
        .expect("TLS completes");
    let reason = within("closed", Duration::from_secs(5), conn.closed()).await;
    assert!(
        reason
            .to_string()
            .contains("client certificate is required"),
        "{reason}"
    );
    assert!(server.connected_nodes().is_empty());
    assert_eq!(server.metrics().handshake_failures.get(), 1);

    let conn = raw_client(&pki, Some("prober"), server.local_addr)
        .await
        .unwrap();
    let before = server.metrics().protocol_errors.get();
    // An oversized header (a length over the limit), a malformed one, a wrong first message,
    // and a stream that sends nothing: each is reset, and counted.
    let bad: Vec<Vec<u8>> = vec![
        vec![0x10, 0xff, 0xff, 1, 2, 3],
        vec![0x10, 0x00, 0x02, 0x01, 0x09],
        protocol::encode_to_bytes(&Message::Drain).unwrap().to_vec(),
        vec![],
    ];
    for bytes in &bad {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        if bytes.is_empty() {
            // Nothing at all: the stream only exists for the server once it carries a byte,
            // so send a partial header and stall.
            send.write_all(&[0x10]).await.unwrap();
        } else {
            send.write_all(bytes).await.unwrap();
        }
        let mut buf = [0u8; 64];
        let r = within("reset", Duration::from_secs(5), recv.read(&mut buf)).await;
        assert!(
            matches!(r, Err(quinn::ReadError::Reset(_)) | Ok(None)),
            "{r:?}"
        );
    }
    wait_for(
        "protocol errors counted",
        Duration::from_secs(5),
        || async { server.metrics().protocol_errors.get() >= before + 4 },
    )
    .await;
    // An unknown service and an arbitrary address are answered with a status, not served.
    for target in [
        Target::Service("etcd".into()),
        Target::Address {
            host: "10.0.0.1".into(),
            port: 22,
        },
    ] {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let open = Message::Open {
            version: 1,
            target,
            hops: 0,
        };
        send.write_all(&protocol::encode_to_bytes(&open).unwrap())
            .await
            .unwrap();
        let mut buf = vec![0u8; 256];
        let n = within("status", Duration::from_secs(5), recv.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let (msg, _) = protocol::decode(&buf[..n]).unwrap().unwrap();
        assert!(
            matches!(
                msg,
                Message::Status {
                    code: StatusCode::UnknownService | StatusCode::RefusedByPolicy,
                    ..
                }
            ),
            "{msg:?}"
        );
    }
    // The same tunnel still relays.
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let open = Message::Open {
        version: 1,
        target: Target::Service("apiserver".into()),
        hops: 0,
    };
    send.write_all(&protocol::encode_to_bytes(&open).unwrap())
        .await
        .unwrap();
    send.write_all(b"ping").await.unwrap();
    send.finish().unwrap();
    let got = within("echo", Duration::from_secs(5), recv.read_to_end(1024))
        .await
        .unwrap();
    let (msg, used) = protocol::decode(&got).unwrap().unwrap();
    assert_eq!(
        msg,
        Message::Status {
            code: StatusCode::Ok,
            message: String::new()
        }
    );
    assert_eq!(&got[used..], b"ping");
    conn.close(0u32.into(), b"");

    // Garbage at the admin port: an error answer, still serving.
    let mut sc = server_config(&pki, echo.addr);
    sc.admin = Some("127.0.0.1:0".parse().unwrap());
    let s2 = tether_server::start(sc).await.unwrap();
    let admin = s2.admin_addr.unwrap();
    for i in 0..50u64 {
        let mut c = tokio::net::TcpStream::connect(admin).await.unwrap();
        let _ = c.write_all(&random_bytes(20_000, i)).await;
        let mut out = Vec::new();
        let _ = within(
            "admin answers garbage",
            Duration::from_secs(10),
            c.read_to_end(&mut out),
        )
        .await;
    }
    assert_eq!(http_get(admin, "/healthz").await.unwrap().0, 200);
    s2.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_node_loses_its_tunnels_on_every_server_within_seconds() {
    init_logging();
    // Two servers with their own data directories (one CA), peers of each other.
    let p = PeeredPair::start().await;
    let (pki, second, [a1, a2]) = (&p.pki, &p.second, p.addrs);
    let (s1, s2) = (&p.servers[0], &p.servers[1]);
    let agent = start_agent(pki, "stolen", &[a1, a2]).await;
    wait_for(
        "both servers see the node",
        Duration::from_secs(10),
        || async { s1.connected_nodes() == ["stolen"] && s2.connected_nodes() == ["stolen"] },
    )
    .await;

    let start = std::time::Instant::now();
    write_local(&pki.server_dir(), "stolen", NodeState::Revoked).unwrap();
    wait_for(
        "tunnels closed on both servers",
        Duration::from_secs(5),
        || async {
            s1.connected_nodes().is_empty()
                && s2.connected_nodes().is_empty()
                && agent.tunnels_up() == 0
        },
    )
    .await;
    assert!(start.elapsed() < Duration::from_secs(5));
    // And it stays out: its reconnects are refused.
    let before = s2.metrics().handshake_failures.get();
    wait_for("reconnects refused", Duration::from_secs(10), || async {
        s2.metrics().handshake_failures.get() > before
    })
    .await;
    assert_eq!(agent.tunnels_up(), 0);
    // The second server wrote the revocation to its own records.
    let text = std::fs::read_to_string(second.path().join("nodes")).unwrap();
    assert!(text.contains("stolen revoked"), "{text}");
    agent.shutdown().await;
    p.shutdown().await;
}

/// Agent settings with the certificate `issued` (and the PKI's CA) stored in `dir`.
fn agent_with_cert(
    pki: &Pki,
    issued: &tether_trust::Issued,
    dir: &TempDir,
    server: SocketAddr,
) -> tether_agent::config::AgentConfig {
    std::fs::copy(pki.server_dir().join("ca.crt"), dir.path().join("ca.crt")).unwrap();
    issued
        .save(&dir.path().join("agent.crt"), &dir.path().join("agent.key"))
        .unwrap();
    let mut c =
        tether_agent::config::AgentConfig::new(vec![server.to_string()], dir.path().to_path_buf());
    c.listen = "127.0.0.1:0".parse().unwrap();
    c
}

/// A server that holds the CA's certificate but not its key (or a rogue one) answers a renewal
/// with a certificate no real server accepts. Before 0.3 the agent wrote it to disk, and kept
/// it across restarts; now the answer is checked against the pinned CA first, and the old
/// identity stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_renewal_answer_never_reaches_the_disk() {
    init_logging();
    let pki = Pki::new();
    let other = Pki::new();
    let echo = start_echo();
    let dir = TempDir::new("forging-server");
    for f in ["ca.crt", "server.crt", "server.key"] {
        std::fs::copy(pki.server_dir().join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(other.server_dir().join("ca.key"), dir.path().join("ca.key")).unwrap();
    let mut sc = server_config(&pki, echo.addr);
    sc.data_dir = dir.path().to_path_buf();
    let server = tether_server::start(sc).await.unwrap();
    // Due for renewal at once.
    let short = pki.agent_cert("forged", -40, 20);
    let d = TempDir::new("forged");
    let agent = tether_agent::start(agent_with_cert(&pki, &short, &d, server.local_addr))
        .await
        .unwrap();
    wait_for(
        "the server signs a renewal",
        Duration::from_secs(15),
        || async { server.metrics().shared.renewals.get() >= 1 },
    )
    .await;
    let kept =
        || async { std::fs::read_to_string(d.path().join("agent.crt")).unwrap() != short.cert_pem };
    assert!(
        !eventually(Duration::from_secs(2), kept).await,
        "the forged certificate was written over the node's identity"
    );
    assert_eq!(agent.metrics().shared.renewals.get(), 0);
    // The node still works with its own identity.
    echo_roundtrip(agent.listen_addr, random_bytes(1000, 9))
        .await
        .unwrap();
    agent.shutdown().await;
    server.shutdown().await;
}

/// A server with a real server certificate but a CA of its own (a stolen `server.key` on a
/// rogue host) passes itself off as mid-rotation: it trusts its CA and the cluster's, asks the
/// node to renew, and answers with a certificate from its CA and both CAs. The node must take
/// neither: a CA it does not trust is taken only when one it trusts vouches for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_without_the_ca_key_cannot_hand_a_node_a_ca_of_its_own() {
    init_logging();
    let pki = Pki::new();
    let rogue = Pki::new();
    let echo = start_echo();
    let dir = TempDir::new("rogue-rotation");
    for f in ["server.crt", "server.key"] {
        std::fs::copy(pki.server_dir().join(f), dir.path().join(f)).unwrap();
    }
    for f in ["ca.crt", "ca.key"] {
        std::fs::copy(rogue.server_dir().join(f), dir.path().join(f)).unwrap();
    }
    std::fs::copy(
        pki.server_dir().join("ca.crt"),
        dir.path().join(tether_trust::rotation::CA_OLD),
    )
    .unwrap();
    let mut sc = server_config(&pki, echo.addr);
    sc.data_dir = dir.path().to_path_buf();
    let server = tether_server::start(sc).await.unwrap();
    let d = TempDir::new("rogue-rotation-node");
    let issued = pki.agent_cert("steady", -60, 3600);
    let agent = tether_agent::start(agent_with_cert(&pki, &issued, &d, server.local_addr))
        .await
        .unwrap();
    wait_for(
        "the rogue server signs a renewal",
        Duration::from_secs(15),
        || async { server.metrics().shared.renewals.get() >= 1 },
    )
    .await;
    let ca_before = std::fs::read_to_string(pki.server_dir().join("ca.crt")).unwrap();
    let untouched = || async {
        std::fs::read_to_string(d.path().join("agent.crt")).unwrap() == issued.cert_pem
            && std::fs::read_to_string(d.path().join("ca.crt")).unwrap() == ca_before
    };
    assert!(
        !eventually(Duration::from_secs(2), || async { !untouched().await }).await,
        "the node took the rogue server's certificate or CA"
    );
    assert_eq!(agent.metrics().shared.renewals.get(), 0);
    agent.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificates_renew_and_rotate_without_dropping_streams() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let mut sc = server_config(&pki, echo.addr);
    sc.reload_interval = Duration::from_millis(200);
    let server = tether_server::start(sc).await.unwrap();

    // An agent certificate that is due for renewal after about 4 s.
    let short = pki.agent_cert("renewer", 0, 6);
    let d = TempDir::new("renew");
    let agent = tether_agent::start(agent_with_cert(&pki, &short, &d, server.local_addr))
        .await
        .unwrap();
    wait_for("tunnel", Duration::from_secs(10), || async {
        agent.tunnels_up() == 1
    })
    .await;

    // A stream held open across the renewal and the server's rotation.
    let mut held = tokio::net::TcpStream::connect(agent.listen_addr)
        .await
        .unwrap();
    held.write_all(b"1").await.unwrap();
    let mut b = [0u8; 1];
    held.read_exact(&mut b).await.unwrap();

    wait_for("renewed", Duration::from_secs(15), || async {
        agent.metrics().shared.renewals.get() >= 1
    })
    .await;
    let renewed = std::fs::read_to_string(d.path().join("agent.crt")).unwrap();
    assert_ne!(renewed, short.cert_pem);

    // Rotate the server certificate by replacing its files.
    let mut names = loopback_names();
    names.push("rotated.example".into());
    tether_trust::init(&pki.server_dir(), &names, 1, 1).unwrap();
    wait_for("server reloads", Duration::from_secs(10), || async {
        server.metrics().cert_reloads.get() >= 1
    })
    .await;

    held.write_all(b"2").await.unwrap();
    held.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"2", "the held stream survived renewal and rotation");
    // The agent moved to a tunnel with the renewed certificate (one more connection); the
    // held stream finished its exchange on the old one.
    wait_for(
        "a tunnel with the renewed certificate",
        Duration::from_secs(10),
        || async { agent.metrics().links.connects.get() == 2 },
    )
    .await;
    // New tunnels use the renewed certificate against the rotated server.
    let agent2 = {
        let mut c = tether_agent::config::AgentConfig::new(
            vec![server.local_addr.to_string()],
            d.path().to_path_buf(),
        );
        c.listen = "127.0.0.1:0".parse().unwrap();
        c.state_dir = None;
        tether_agent::start(c).await.unwrap()
    };
    wait_for(
        "new tunnel with renewed certificate",
        Duration::from_secs(10),
        || async { agent2.tunnels_up() == 1 },
    )
    .await;
    echo_roundtrip(agent2.listen_addr, random_bytes(1000, 5))
        .await
        .unwrap();
    drop(held);
    agent2.shutdown().await;
    agent.shutdown().await;
    server.shutdown().await;
}

/// A renewal moves the agent's tunnels to the new certificate at once. Before, tunnels up since
/// before a renewal kept the old certificate, and the server closed them, with every stream on
/// them, when it expired: every tunnel of a node at the same instant.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewal_moves_tunnels_to_the_new_certificate_before_the_old_expires() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let server = start_server(&pki, echo.addr).await;
    // Due for renewal in about a second (two thirds of its life), expiring in 10 s.
    let short = pki.agent_cert("mover", -16, 10);
    let expires = std::time::Instant::now() + Duration::from_secs(10);
    let d = TempDir::new("rotate");
    let agent = tether_agent::start(agent_with_cert(&pki, &short, &d, server.local_addr))
        .await
        .unwrap();
    wait_for("renewed", Duration::from_secs(5), || async {
        agent.metrics().shared.renewals.get() >= 1
    })
    .await;
    wait_for(
        "a tunnel with the renewed certificate, before the old one expires",
        Duration::from_secs(3),
        || async { agent.metrics().links.connects.get() == 2 },
    )
    .await;
    assert!(
        std::time::Instant::now() < expires,
        "the test ran too slowly to tell"
    );
    // Past the old certificate's expiry: nothing was closed, nothing reconnected.
    tokio::time::sleep_until((expires + Duration::from_secs(1)).into()).await;
    echo_roundtrip(agent.listen_addr, random_bytes(10_000, 9))
        .await
        .unwrap();
    assert_eq!(agent.tunnels_up(), 1);
    assert_eq!(
        agent.metrics().links.connects.get(),
        2,
        "no tunnel was cut at the old certificate's expiry"
    );
    assert_eq!(server.metrics().expired_closed.get(), 0);
    agent.shutdown().await;
    server.shutdown().await;
}

/// A reverse stream (a `kubectl exec` or `logs -f`) open on a tunnel that a renewal leaves for
/// a new one runs on to its end: the old tunnel stays up while it does. Before, the old tunnel
/// closed as soon as its forward streams ended, and cut the reverse ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reverse_stream_outlives_the_renewal_that_moves_its_tunnel() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let target = start_echo();
    let mut sc = server_config(&pki, echo.addr);
    sc.egress.listen = Some("127.0.0.1:0".parse().unwrap());
    let server = tether_server::start(sc).await.unwrap();
    let proxy = server.egress_addr.unwrap();
    // Due for renewal in about two seconds, expiring in 20 s.
    let short = pki.agent_cert("mover", -34, 20);
    let d = TempDir::new("rotate-reverse");
    let mut ac = agent_with_cert(&pki, &short, &d, server.local_addr);
    ac.allow_ports = vec![target.addr.port()];
    let agent = tether_agent::start(ac).await.unwrap();
    wait_for("tunnel", Duration::from_secs(10), || async {
        agent.tunnels_up() == 1
    })
    .await;
    let mut held = connect_proxy(proxy, &format!("mover:{}", target.addr.port()))
        .await
        .unwrap();
    let mut back = [0u8; 5];
    held.write_all(b"first").await.unwrap();
    held.read_exact(&mut back).await.unwrap();
    assert_eq!(
        agent.metrics().links.connects.get(),
        1,
        "renewed too early to tell"
    );
    wait_for("renewed and moved", Duration::from_secs(10), || async {
        agent.metrics().links.connects.get() == 2
    })
    .await;
    // Long enough for the old tunnel to be closed had the stream not counted (it is looked
    // at every 200 ms).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    held.write_all(b"again").await.unwrap();
    within(
        "the echo after the move",
        Duration::from_secs(5),
        held.read_exact(&mut back),
    )
    .await
    .expect("the reverse stream survived the move");
    assert_eq!(&back, b"again");
    drop(held);
    agent.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limits_bite_with_a_metric() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let mut sc = server_config(&pki, echo.addr);
    sc.max_tunnels_per_node = 1;
    sc.limits.max_streams = 2;
    let server = tether_server::start(sc).await.unwrap();
    let a1 = start_agent(&pki, "twin", &[server.local_addr]).await;
    // A second tunnel for the same identity is refused.
    let a2 = tether_agent::start(agent_config(&pki, "twin", &[server.local_addr]))
        .await
        .unwrap();
    wait_for("second tunnel refused", Duration::from_secs(10), || async {
        metric(
            &server_metrics(&server),
            "tether_limit_hits_total{limit=\"tunnels_per_node\"}",
        ) >= Some(1.0)
    })
    .await;
    assert_eq!(a2.tunnels_up(), 0);
    a2.shutdown().await;
    // Two streams fill the tunnel; the third is answered busy and its client reset.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = tokio::net::TcpStream::connect(a1.listen_addr)
            .await
            .unwrap();
        c.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap();
        held.push(c);
    }
    // Refused: a reset, which may arrive before connect() even returns.
    if let Ok(mut c) = tokio::net::TcpStream::connect(a1.listen_addr).await {
        let mut b = [0u8; 1];
        let r = within(
            "third stream refused",
            Duration::from_secs(10),
            c.read(&mut b),
        )
        .await;
        assert!(matches!(r, Ok(0) | Err(_)));
    }
    assert!(
        metric(
            &server_metrics(&server),
            "tether_limit_hits_total{limit=\"streams_per_tunnel\"}"
        ) >= Some(1.0)
    );
    drop(held);
    a1.shutdown().await;
    server.shutdown().await;
}

/// One round of hostile input: garbage datagrams, certificate-less connections, bad stream
/// headers, garbage at the admin port.
async fn flood(pki: &Pki, udp: SocketAddr, admin: SocketAddr, round: u64) {
    let sock = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let mut rng = fastrand::Rng::with_seed(round);
    for _ in 0..10_000 {
        let mut d = vec![0u8; rng.usize(1..=1400)];
        rng.fill(&mut d);
        let _ = sock.send_to(&d, udp).await;
    }
    for _ in 0..50 {
        if let Ok(c) = raw_client(pki, None, udp).await {
            let _ = within("refused", Duration::from_secs(5), c.closed()).await;
        }
    }
    let conn = raw_client(pki, Some("flooder"), udp).await.unwrap();
    for i in 0..300u64 {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let _ = send.write_all(&random_bytes(64, round * 1000 + i)).await;
        // Ended mid-frame: refused at once, not after the header timeout.
        let _ = send.finish();
        let mut b = [0u8; 8];
        let _ = within(
            "bad header reset",
            Duration::from_secs(5),
            recv.read(&mut b),
        )
        .await;
    }
    conn.close(0u32.into(), b"");
    for i in 0..50u64 {
        let mut c = tokio::net::TcpStream::connect(admin).await.unwrap();
        let _ = c.write_all(&random_bytes(10_000, i)).await;
        let mut out = Vec::new();
        let _ = within("admin", Duration::from_secs(10), c.read_to_end(&mut out)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_bad_input_leaves_the_process_serving_and_its_memory_flat() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let logs = TempDir::new("flood");
    let server = tether_tests::process::ServerProcess::start(
        &pki.server_dir(),
        echo.addr,
        &["--header-timeout", "300ms"],
        logs.path().join("server.log"),
    )
    .await;
    let (udp, admin) = (server.addr, server.admin);
    let server = server.proc;
    let agent = start_agent(&pki, "good", &[udp]).await;
    echo_roundtrip(agent.listen_addr, random_bytes(100_000, 1))
        .await
        .unwrap();

    let mut rss = Vec::new();
    for round in 0..3 {
        flood(&pki, udp, admin, round).await;
        // Serving: the good agent still relays, health still answers.
        echo_roundtrip(agent.listen_addr, random_bytes(100_000, round + 2))
            .await
            .unwrap();
        assert_eq!(http_get(admin, "/healthz").await.unwrap().0, 200);
        rss.push(rss_kib(server.pid()));
    }
    // The first round warms caches and allocator arenas; later rounds must not grow.
    let growth = rss[2].saturating_sub(rss[1]);
    eprintln!("server RSS after each flood: {rss:?} KiB");
    assert!(
        growth < 4096,
        "memory grew by {growth} KiB between identical floods: {rss:?} KiB"
    );
    let log = server.log_text();
    for expected in [
        "refused tunnel: no client certificate",
        "stream refused: bad header",
        "peer=127.0.0.1:",
    ] {
        assert!(log.contains(expected), "the log says {expected:?}");
    }
    agent.shutdown().await;
}
