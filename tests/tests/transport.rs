//! The transports under stress that the relay tests do not give them: a local close of a TCP
//! tunnel, and control frames that arrive a byte at a time while the server's control loop has
//! other work (heartbeats) to do.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tether_endpoint::status::Status;
use tether_proto::capability::{self, Capabilities};
use tether_proto::{self as protocol, Message};
use tether_tests::*;
use tether_transport::tls;
use tether_transport::transport::tcp::TcpTunnel;
use tether_transport::transport::CloseReason;
use tether_transport::transport::Tunnel;

/// TLS for a node's tunnel: the agent identity of `node` from the test PKI.
fn agent_tls(pki: &Pki, node: &str) -> Arc<rustls::ClientConfig> {
    let dir = pki.agent_dir(node);
    let roots = tls::load_roots(&dir.join("ca.crt")).unwrap();
    let id = tls::Identity::load(&dir.join("agent.crt"), &dir.join("agent.key")).unwrap();
    Arc::new(tls::client_config(roots, id, tls::PostQuantum::Prefer).unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_close_of_a_tcp_tunnel_flushes_and_says_goodbye() {
    init_logging();
    let pki = Pki::new();
    let dir = pki.server_dir();
    let roots = tls::load_roots(&dir.join("ca.crt")).unwrap();
    let id = tls::Identity::load(&dir.join("server.crt"), &dir.join("server.key")).unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(
        tls::server_config(roots, id, tls::PostQuantum::Prefer).unwrap(),
    ));
    let listener = tokio::net::TcpListener::bind(loopback0()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await.unwrap();
        let t = TcpTunnel::accept(tcp, acceptor, Default::default(), 64)
            .await
            .unwrap();
        let (_send, mut recv) = t.accept_stream().await.unwrap();
        let mut got = Vec::new();
        let end = loop {
            match recv.read_chunk(64 * 1024).await {
                Ok(Some(b)) => got.extend_from_slice(&b),
                Ok(None) => break "finished".to_string(),
                Err(e) => break e.to_string(),
            }
        };
        (got, end, t.closed().await)
    });
    let client = TcpTunnel::connect(
        addr,
        "localhost",
        agent_tls(&pki, "closer"),
        Default::default(),
        64,
    )
    .await
    .unwrap();
    let (mut send, _recv) = client.open().await.unwrap();
    let data = random_bytes(3 * 1024 * 1024, 9);
    for chunk in data.chunks(16 * 1024) {
        send.write_chunk(bytes::Bytes::copy_from_slice(chunk))
            .await
            .unwrap();
    }
    send.finish().await;
    // The stream was written and finished; the tunnel is closed right away, from this side.
    client.close("test done");
    let (got, end, server_saw) = within("server side", Duration::from_secs(10), server)
        .await
        .unwrap();
    assert_eq!(
        got.len(),
        data.len(),
        "everything written before the close arrived"
    );
    assert!(got == data, "the bytes are the ones sent");
    assert_eq!(end, "finished");
    assert_eq!(
        server_saw,
        CloseReason::Peer {
            code: None,
            reason: String::new()
        },
        "the peer saw an orderly goodbye"
    );
    let here = within("client side", Duration::from_secs(5), client.closed()).await;
    assert!(here.is_local(), "{here}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_frame_split_byte_by_byte_arrives_whole_while_heartbeats_tick() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let mut sc = server_config(&pki, echo.addr);
    sc.admin = Some("127.0.0.1:0".parse().unwrap());
    // Heartbeats (TCP tunnels) every 10 ms: the control loop's `select!` fires between bytes.
    sc.liveness.keepalive_interval = Duration::from_millis(10);
    let server = tether_server::start(sc).await.unwrap();
    let addr: SocketAddr = server.local_addr;
    let t = TcpTunnel::connect(
        addr,
        "localhost",
        agent_tls(&pki, "slow"),
        Default::default(),
        64,
    )
    .await
    .unwrap();
    let tunnel = Tunnel::from_tcp(t);
    // An agent from before the liveness capability: the server sends it heartbeats.
    let older: Vec<String> = Capabilities::ours(&[])
        .into_iter()
        .filter(|c| c != capability::LIVENESS)
        .collect();
    let mut control = say_hello_with(&tunnel, "slow", older).await;
    let info = Message::NodeInfo {
        addresses: vec!["192.0.2.17".into(), "2001:db8::17".into()],
    };
    let bytes = protocol::encode_to_bytes(&info).unwrap();
    for b in bytes.iter() {
        control
            .send
            .write_chunk(bytes::Bytes::copy_from_slice(&[*b]))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let admin = server.admin_addr.unwrap();
    let whole = || async {
        let (_, body) = http_get(admin, "/status").await.unwrap();
        let addresses = match serde_json::from_str(&body) {
            Ok(Status::Server(s)) => s.nodes.first().map(|n| n.addresses.clone()),
            _ => None,
        };
        addresses == Some(vec!["192.0.2.17".into(), "2001:db8::17".into()])
    };
    wait_for(
        "the node's addresses to arrive whole",
        Duration::from_secs(5),
        whole,
    )
    .await;
    // And the stream still has its framing: the server's heartbeats keep coming.
    let next = within(
        "heartbeat",
        Duration::from_secs(5),
        control.recv.read_message(),
    )
    .await
    .unwrap();
    assert!(next.is_some());
    assert!(tunnel.close_reason().is_none());
    server.shutdown().await;
}

/// An agent with the liveness capability gets no heartbeats (an idle tunnel stays silent), an
/// answer to each ping, and word of a peer server its server lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probing_agent_gets_pongs_and_no_heartbeats() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let mut sc = server_config(&pki, echo.addr);
    sc.liveness.keepalive_interval = Duration::from_millis(10);
    let server = tether_server::start(sc).await.unwrap();
    let t = TcpTunnel::connect(
        server.local_addr,
        "localhost",
        agent_tls(&pki, "quiet"),
        Default::default(),
        64,
    )
    .await
    .unwrap();
    let tunnel = Tunnel::from_tcp(t);
    let mut control = say_hello(&tunnel, "quiet").await;
    // Whatever the server announces first (its server list, its health) comes at once; after
    // that, nothing: with heartbeats every 10 ms, a quiet half second would be impossible.
    let drained = async {
        while let Ok(Ok(Some(_))) =
            tokio::time::timeout(Duration::from_millis(500), control.recv.read_message()).await
        {
        }
    };
    within("the announcements to end", Duration::from_secs(10), drained).await;
    let before = tunnel.traffic().answers;
    control
        .send
        .write_message(&Message::Ping { nonce: 42 })
        .await
        .unwrap();
    let pong = within(
        "the pong",
        Duration::from_secs(5),
        control.recv.read_message(),
    )
    .await
    .unwrap();
    assert_eq!(pong, Some(Message::Pong { nonce: 42 }));
    assert!(tunnel.traffic().answers > before, "the pong was counted");
    server.shutdown().await;
}

/// Over QUIC a relay that ended cleanly returns only once the far end acknowledged its last
/// bytes, so a tunnel closed the moment its streams are done (an agent moving to a renewed
/// certificate, a drain) delivers them whole. QUIC sends a finished stream's data in the
/// background and a connection's close discards what is left: the soak across a cellular link
/// lost a reverse stream's answer so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quic_tunnel_closed_as_its_relay_returns_delivers_every_byte() {
    use tether_transport::relay::relay;
    use tokio::io::AsyncWriteExt;
    init_logging();
    let pki = Pki::new();
    let dir = pki.server_dir();
    let roots = tls::load_roots(&dir.join("ca.crt")).unwrap();
    let id = tls::Identity::load(&dir.join("server.crt"), &dir.join("server.key")).unwrap();
    let cfg = tls::quic_server_config(
        tls::server_config(roots, id, tls::PostQuantum::Prefer).unwrap(),
        tls::quic_transport(Default::default(), Default::default()),
    )
    .unwrap();
    let ep = quinn::Endpoint::server(cfg, loopback0()).unwrap();
    let addr = ep.local_addr().unwrap();
    let far = tokio::spawn(async move {
        let conn = ep.accept().await.unwrap().await.unwrap();
        let t = Tunnel::from_quic(conn, 64);
        let mut s = t.accept_stream().await.unwrap();
        // Nothing to say back: this direction ends at once.
        s.send.finish().await;
        let mut got = Vec::new();
        let end = loop {
            match s.recv.read_chunk(1 << 16).await {
                Ok(Some(b)) => got.extend_from_slice(&b),
                Ok(None) => break "finished".to_string(),
                Err(e) => break e.to_string(),
            }
        };
        (got, end)
    });
    let conn = raw_client(&pki, Some("mover"), addr).await.unwrap();
    let tunnel = Tunnel::from_quic(conn, 64);
    let stream = tunnel.open_stream().await.unwrap();
    let l = tokio::net::TcpListener::bind(loopback0()).await.unwrap();
    let (client, near) = tokio::join!(
        tokio::net::TcpStream::connect(l.local_addr().unwrap()),
        l.accept()
    );
    let (mut client, near) = (client.unwrap(), near.unwrap().0);
    let relayed = tokio::spawn(async move { relay(near, stream, &[]).await });
    let data = random_bytes(16 << 20, 7);
    client.write_all(&data).await.unwrap();
    client.shutdown().await.unwrap();
    let summary = within("the relay", Duration::from_secs(30), relayed)
        .await
        .unwrap();
    assert_eq!(summary.to_tunnel, data.len() as u64);
    // As a retired tunnel is, the moment its last stream is done.
    tunnel.close(tether_proto::code::OK, "moved to a new tunnel");
    let (got, end) = within("the far end", Duration::from_secs(30), far)
        .await
        .unwrap();
    assert_eq!(end, "finished");
    assert_eq!(got.len(), data.len());
    assert!(got == data, "the bytes differ");
}

/// TLS as tether 0.2 spoke it: the `ring` provider, whose key exchanges are X25519 and the NIST
/// curves, no ML-KEM.
fn classic_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A node's tunnel TLS as a 0.2 agent makes it.
fn classic_agent_tls(pki: &Pki, node: &str) -> Arc<rustls::ClientConfig> {
    let dir = pki.agent_dir(node);
    let roots = tls::load_roots(&dir.join("ca.crt")).unwrap();
    let id = tls::Identity::load(&dir.join("agent.crt"), &dir.join("agent.key")).unwrap();
    let mut cfg = rustls::ClientConfig::builder_with_provider(classic_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(id.chain, id.key)
        .unwrap();
    cfg.alpn_protocols = vec![tls::ALPN.to_vec()];
    Arc::new(cfg)
}

/// The tunnels' key exchange is the post-quantum hybrid on both transports, as `status` and
/// the metrics say; a 0.2 agent (X25519 only) still connects to a server that prefers it, and
/// is refused by one that requires it; an agent that requires it does not connect to a 0.2
/// server. Fails without the aws-lc-rs provider and its group order (the tunnels agreed X25519).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tunnels_agree_the_post_quantum_hybrid_and_require_it_when_asked() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let mut cfg = server_config(&pki, echo.addr);
    cfg.admin = Some(loopback0());
    let server = tether_server::start(cfg).await.unwrap();
    for transport in [
        tether_link::reconnect::TransportChoice::Quic,
        tether_link::reconnect::TransportChoice::Tcp,
    ] {
        let mut acfg = agent_config(&pki, "node-pq", &[server.local_addr]);
        acfg.transport = transport;
        acfg.admin = Some(loopback0());
        let agent = tether_agent::start(acfg).await.unwrap();
        wait_for("the tunnel", Duration::from_secs(10), || async {
            agent.tunnels_up() == 1
        })
        .await;
        let (_, text) = http_get(agent.admin_addr.unwrap(), "/status")
            .await
            .unwrap();
        let Ok(Status::Agent(v)) = serde_json::from_str::<Status>(&text) else {
            panic!("not an agent's status: {text}");
        };
        assert_eq!(
            v.servers[0].key_exchange.as_deref(),
            Some("X25519MLKEM768"),
            "{transport}"
        );
        let (_, m) = http_get(agent.admin_addr.unwrap(), "/metrics")
            .await
            .unwrap();
        assert_eq!(
            metric(&m, "tether_tunnels_key_exchange{group=\"X25519MLKEM768\"}"),
            Some(1.0),
            "{m}"
        );
        let (_, text) = http_get(server.admin_addr.unwrap(), "/status")
            .await
            .unwrap();
        let Ok(Status::Server(v)) = serde_json::from_str::<Status>(&text) else {
            panic!("not a server's status: {text}");
        };
        assert_eq!(
            v.nodes[0].key_exchange.as_deref(),
            Some("X25519MLKEM768"),
            "{transport}"
        );
        agent.shutdown().await;
    }

    // A 0.2 agent: X25519 against a server that prefers the hybrid.
    let old = TcpTunnel::connect(
        server.local_addr,
        "localhost",
        classic_agent_tls(&pki, "node-old"),
        Default::default(),
        64,
    )
    .await
    .expect("a 0.2 agent connects");
    assert_eq!(Tunnel::from_tcp(old).key_exchange(), Some("X25519"));

    // A server that requires the hybrid refuses it.
    let mut cfg = server_config(&pki, echo.addr);
    cfg.limits.post_quantum = tls::PostQuantum::Require;
    let strict = tether_server::start(cfg).await.unwrap();
    let refused = TcpTunnel::connect(
        strict.local_addr,
        "localhost",
        classic_agent_tls(&pki, "node-old"),
        Default::default(),
        64,
    )
    .await;
    assert!(
        refused.is_err(),
        "a 0.2 agent got through a server that requires the hybrid"
    );
    let new = TcpTunnel::connect(
        strict.local_addr,
        "localhost",
        agent_tls(&pki, "node-new"),
        Default::default(),
        64,
    )
    .await
    .expect("an agent of this release connects to it");
    assert_eq!(Tunnel::from_tcp(new).key_exchange(), Some("X25519MLKEM768"));

    // An agent that requires it does not connect to a 0.2 server.
    let dir = pki.server_dir();
    let roots = tls::load_roots(&dir.join("ca.crt")).unwrap();
    let id = tls::Identity::load(&dir.join("server.crt"), &dir.join("server.key")).unwrap();
    let mut old_server = rustls::ServerConfig::builder_with_provider(classic_provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                classic_provider(),
            )
            .build()
            .unwrap(),
        )
        .with_single_cert(id.chain, id.key)
        .unwrap();
    old_server.alpn_protocols = vec![tls::ALPN.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(old_server));
    let listener = tokio::net::TcpListener::bind(loopback0()).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = TcpTunnel::accept(tcp, acceptor.clone(), Default::default(), 64).await;
        }
    });
    let dir = pki.agent_dir("node-strict");
    let roots = tls::load_roots(&dir.join("ca.crt")).unwrap();
    let id = tls::Identity::load(&dir.join("agent.crt"), &dir.join("agent.key")).unwrap();
    let strict_agent = Arc::new(tls::client_config(roots, id, tls::PostQuantum::Require).unwrap());
    let refused = TcpTunnel::connect(addr, "localhost", strict_agent, Default::default(), 64).await;
    assert!(
        refused.is_err(),
        "an agent that requires the hybrid reached a 0.2 server"
    );
    server.shutdown().await;
    strict.shutdown().await;
}
