//! The reverse path on loopback: the control plane reaches a node through the egress proxy
//! (HTTP CONNECT) and the agent's outbound tunnel.

use std::net::SocketAddr;
use std::time::Duration;
use tether_tests::process::free_port;
use tether_tests::*;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

async fn connect(proxy: SocketAddr, target: &str) -> (u16, String, tokio::net::TcpStream) {
    let c = tokio::net::TcpStream::connect(proxy).await.unwrap();
    connect_on(c, target).await.unwrap()
}

/// Echoes through an established CONNECT tunnel and checks the bytes.
async fn echo_through<S: AsyncRead + AsyncWrite + Unpin + Send + 'static>(
    io: S,
    data: Vec<u8>,
) -> Result<(), String> {
    use tokio::io::AsyncReadExt;
    let (mut rd, mut wr) = tokio::io::split(io);
    let expect = sha256(&data);
    let len = data.len();
    let w = tokio::spawn(async move {
        wr.write_all(&data).await?;
        wr.shutdown().await
    });
    let mut got = Vec::new();
    rd.read_to_end(&mut got).await.map_err(|e| e.to_string())?;
    w.await
        .map_err(|e| e.to_string())?
        .map_err(|e| e.to_string())?;
    if got.len() != len || sha256(&got) != expect {
        return Err(format!(
            "got {} of {len} bytes, or different ones",
            got.len()
        ));
    }
    Ok(())
}

/// An echo listening on the same port on 127.0.0.1 and 127.0.0.2 (the test node's "address").
async fn node_echo() -> (Echo, Echo, u16) {
    loop {
        let a = start_echo();
        let port = a.addr.port();
        if std::net::TcpListener::bind(("127.0.0.2", port)).is_ok() {
            let b = Echo::start_on(SocketAddr::from(([127, 0, 0, 2], port))).expect("echo");
            return (a, b, port);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_plane_reaches_an_allowed_target_and_nothing_else() {
    init_logging();
    let pki = Pki::new();
    let (_e1, _e2, port) = node_echo().await;
    let mut sc = server_config(&pki, "127.0.0.1:9".parse().unwrap());
    sc.egress.listen = Some("127.0.0.1:0".parse().unwrap());
    let server = tether_server::start(sc).await.unwrap();
    let proxy = server.egress_addr.unwrap();
    let mut ac = agent_config(&pki, "edge-1", &[server.local_addr]);
    ac.node_ips = vec!["127.0.0.2".parse().unwrap()];
    ac.allow_ports = vec![port];
    let agent = tether_agent::start(ac).await.unwrap();
    wait_for("tunnel", Duration::from_secs(10), || async {
        agent.tunnels_up() == 1
    })
    .await;

    // By node name (loopback on the node) and by node IP.
    let (code, _, c) = connect(proxy, &format!("edge-1:{port}")).await;
    assert_eq!(code, 200);
    echo_through(c, random_bytes(100_000, 1)).await.unwrap();
    // The node reports its addresses just after its tunnel comes up.
    let by_ip = format!("127.0.0.2:{port}");
    let routed = || async { connect(proxy, &by_ip).await.0 == 200 };
    wait_for("the node reached by its IP", Duration::from_secs(2), routed).await;
    let (_, _, c) = connect(proxy, &by_ip).await;
    echo_through(c, random_bytes(10_000, 2)).await.unwrap();

    // A port the agent does not allow: 403, with the reason. An unknown node: 404.
    let (code, body, _) = connect(proxy, "edge-1:22").await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("not allowed"), "{body}");
    let (code, body, _) = connect(proxy, "127.0.0.2:10251").await;
    assert_eq!(code, 403, "{body}");
    let (code, body, _) = connect(proxy, "nowhere:10250").await;
    assert_eq!(code, 404, "{body}");
    // The kubelet port is allowed, but nothing listens: 502.
    let (code, body, _) = connect(proxy, "edge-1:10250").await;
    assert!(code == 502 || code == 200, "{code} {body}");
    // Not a CONNECT: 405.
    let (code, text) = http_get(proxy, "/").await.unwrap();
    assert_eq!(code, 405, "{text}");
    let counted = |code: u16| {
        server
            .metrics()
            .egress_failures
            .get(tether_server::metrics::EgressCode(code))
    };
    assert!(counted(405) >= 1 && counted(403) >= 2 && counted(404) >= 1);
    assert!(agent.metrics().reverse_refused.get() >= 2);

    // Many concurrent reverse streams, byte-exact.
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u64 {
        let target = format!("edge-1:{port}");
        tasks.spawn(async move {
            let (code, body, c) = connect(proxy, &target).await;
            if code != 200 {
                return Err(format!("{code} {body}"));
            }
            echo_through(
                c,
                random_bytes(fastrand::Rng::with_seed(i).usize(..300_000), i),
            )
            .await
        });
    }
    let failed: Vec<_> = within(
        "200 reverse streams",
        Duration::from_secs(120),
        tasks.join_all(),
    )
    .await
    .into_iter()
    .filter_map(Result::err)
    .collect();
    assert!(failed.is_empty(), "{failed:?}");
    agent.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_to_a_server_without_the_node_goes_through_its_peer() {
    init_logging();
    let pki = Pki::new();
    let (_e1, _e2, port) = node_echo().await;
    let (p1, p2) = (free_port(), free_port());
    let a1: SocketAddr = format!("127.0.0.1:{p1}").parse().unwrap();
    let a2: SocketAddr = format!("127.0.0.1:{p2}").parse().unwrap();
    let mut c1 = server_config(&pki, "127.0.0.1:9".parse().unwrap());
    c1.listen = a1;
    c1.peers = vec![a2.to_string()];
    c1.advertise = Some("127.0.0.1:1".into()); // agents cannot reach the first server
    c1.egress.listen = Some("127.0.0.1:0".parse().unwrap());
    let mut c2 = c1.clone();
    c2.listen = a2;
    c2.peers = vec![a1.to_string()];
    c2.advertise = None;
    c2.egress.listen = None;
    let s1 = tether_server::start(c1).await.unwrap();
    let s2 = tether_server::start(c2).await.unwrap();
    wait_for("peers", Duration::from_secs(10), || async {
        s1.peers_up() == 1 && s2.peers_up() == 1
    })
    .await;
    let mut ac = agent_config(&pki, "edge-2", &[a2]);
    ac.allow_ports = vec![port];
    ac.state_dir = None;
    let agent = tether_agent::start(ac).await.unwrap();
    wait_for(
        "tunnel to the second server",
        Duration::from_secs(10),
        || async { agent.tunnels_up() == 1 },
    )
    .await;
    assert!(s1.connected_nodes().is_empty());

    let (code, body, c) = connect(s1.egress_addr.unwrap(), &format!("edge-2:{port}")).await;
    assert_eq!(code, 200, "{body}");
    echo_through(c, random_bytes(500_000, 3)).await.unwrap();
    let (code, _, _) = connect(s1.egress_addr.unwrap(), "edge-2:22").await;
    assert_eq!(
        code, 403,
        "the agent's verdict travels back through the peer"
    );
    agent.shutdown().await;
    s1.shutdown().await;
    s2.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_egress_proxy_serves_a_unix_socket() {
    init_logging();
    let pki = Pki::new();
    let (_e1, _e2, port) = node_echo().await;
    let dir = TempDir::new("uds");
    let path = dir.path().join("egress.sock");
    let mut sc = server_config(&pki, "127.0.0.1:9".parse().unwrap());
    sc.egress.uds = Some(path.clone());
    let server = tether_server::start(sc).await.unwrap();
    let mut ac = agent_config(&pki, "edge-3", &[server.local_addr]);
    ac.allow_ports = vec![port];
    let agent = tether_agent::start(ac).await.unwrap();
    wait_for("tunnel", Duration::from_secs(10), || async {
        agent.tunnels_up() == 1
    })
    .await;
    let io = tokio::net::UnixStream::connect(&path).await.unwrap();
    let (code, body, c) = connect_on(io, &format!("edge-3:{port}")).await.unwrap();
    assert_eq!(code, 200, "{body}");
    echo_through(c, random_bytes(50_000, 4)).await.unwrap();
    agent.shutdown().await;
    server.shutdown().await;
}

/// A target on the node that resets its connection: the egress client reads a reset, not a
/// clean end. The relay towards the client used to drop the connection, a FIN, so a client
/// cut off mid-answer (the node's target gone, or the tunnel lost under it) took what it had
/// for the whole answer; the soak across a cellular link counted one such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reset_on_the_node_reaches_the_egress_client_as_a_reset() {
    use tokio::io::AsyncReadExt;
    init_logging();
    let pki = Pki::new();
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = target.local_addr().unwrap().port();
    let resetter = tokio::spawn(async move {
        loop {
            let Ok((mut c, _)) = target.accept().await else {
                return;
            };
            let mut b = [0u8; 5];
            let _ = c.read_exact(&mut b).await;
            let _ = c.write_all(b"half an answer").await;
            let _ = c.set_zero_linger();
            drop(c);
        }
    });
    let mut sc = server_config(&pki, "127.0.0.1:9".parse().unwrap());
    sc.egress.listen = Some("127.0.0.1:0".parse().unwrap());
    let server = tether_server::start(sc).await.unwrap();
    let proxy = server.egress_addr.unwrap();
    let mut ac = agent_config(&pki, "edge-7", &[server.local_addr]);
    ac.allow_ports = vec![port];
    let agent = tether_agent::start(ac).await.unwrap();
    wait_for("tunnel", Duration::from_secs(10), || async {
        agent.tunnels_up() == 1
    })
    .await;
    let (code, body, mut c) = connect(proxy, &format!("edge-7:{port}")).await;
    assert_eq!(code, 200, "{body}");
    c.write_all(b"hello").await.unwrap();
    let mut got = Vec::new();
    let end = within(
        "the answer's end",
        Duration::from_secs(10),
        c.read_to_end(&mut got),
    )
    .await;
    let err = end.expect_err("a reset, not a clean end");
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    resetter.abort();
    agent.shutdown().await;
    server.shutdown().await;
}

/// `kubectl exec` or `logs` made while its node's agent restarts (or its tunnels die with the
/// network and it reconnects) waits for the node's next tunnel, within 3 s, and goes through;
/// a node that never connected is answered at once, and one that does not come back within
/// the grace is answered 404 when it ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_made_while_its_node_reconnects_waits_for_it() {
    init_logging();
    let pki = Pki::new();
    let (_e1, _e2, port) = node_echo().await;
    let mut sc = server_config(&pki, "127.0.0.1:9".parse().unwrap());
    sc.egress.listen = Some("127.0.0.1:0".parse().unwrap());
    let server = tether_server::start(sc).await.unwrap();
    let proxy = server.egress_addr.unwrap();
    let mut ac = agent_config(&pki, "edge-1", &[server.local_addr]);
    ac.allow_ports = vec![port];
    ac.state_dir = None;
    let agent = tether_agent::start(ac.clone()).await.unwrap();
    wait_for("tunnel", Duration::from_secs(10), || async {
        agent.tunnels_up() == 1
    })
    .await;

    // The agent goes away; a CONNECT comes while it is away, and it comes back.
    agent.shutdown().await;
    wait_for("the node gone", Duration::from_secs(10), || async {
        server.connected_nodes().is_empty()
    })
    .await;
    let target = format!("edge-1:{port}");
    let pending = tokio::spawn(async move { connect(proxy, &target).await });
    let agent = tether_agent::start(ac).await.unwrap();
    let (code, body, c) = within("the CONNECT that waited", Duration::from_secs(5), pending)
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    echo_through(c, random_bytes(100_000, 9)).await.unwrap();
    assert_eq!(server.metrics().egress_waited.get(), 1);

    // Gone for good: the CONNECT waits out the grace, then is told so.
    agent.shutdown().await;
    wait_for("the node gone again", Duration::from_secs(10), || async {
        server.connected_nodes().is_empty()
    })
    .await;
    let (code, body, _) = within("the 404 after the grace", Duration::from_secs(6), async {
        connect(proxy, &format!("edge-1:{port}")).await
    })
    .await;
    assert_eq!(code, 404, "{body}");

    // A node that was never here, past the server's first seconds: 404 at once, no wait.
    let (code, _, _) = within("a 404 for a stranger", Duration::from_secs(1), async {
        connect(proxy, &format!("edge-9:{port}")).await
    })
    .await;
    assert_eq!(code, 404);
    server.shutdown().await;
}

/// A CONNECT that reaches a server in its first moments, before its nodes have come back to
/// it (a restart or an upgrade of the control plane's tether-server, which kube-apiserver's
/// egress uses), waits for the node instead of answering 404: kubectl does not retry `exec` or
/// `logs`. The soak on etcd found these 404s at every drain and rolling restart. A server just
/// started is the same as one just restarted: it has seen no node yet.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connect_made_as_its_server_starts_waits_for_the_node() {
    init_logging();
    let pki = Pki::new();
    let (_e1, _e2, port) = node_echo().await;
    let mut sc = server_config(&pki, "127.0.0.1:9".parse().unwrap());
    sc.egress.listen = Some("127.0.0.1:0".parse().unwrap());
    let server = tether_server::start(sc).await.unwrap();
    let proxy = server.egress_addr.unwrap();

    // The CONNECT comes first, and waits; then the node arrives.
    let target = format!("edge-1:{port}");
    let pending = tokio::spawn(async move { connect(proxy, &target).await });
    wait_for("the CONNECT waits", Duration::from_secs(2), || async {
        server.metrics().egress_waited.get() == 1
    })
    .await;
    let mut ac = agent_config(&pki, "edge-1", &[server.local_addr]);
    ac.allow_ports = vec![port];
    ac.state_dir = None;
    let agent = tether_agent::start(ac).await.unwrap();
    let (code, body, c) = within("the CONNECT that waited", Duration::from_secs(5), pending)
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    echo_through(c, random_bytes(50_000, 3)).await.unwrap();
    agent.shutdown().await;
    server.shutdown().await;
}
