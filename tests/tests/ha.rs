//! High availability on loopback, in-process: discovery, health, peer relay, drain, policy.
//! The process-level failures (kill -9, dropped packets) are in the network-namespace suite.

use std::net::SocketAddr;
use std::time::Duration;
use tether_link::pool::Policy;
use tether_proto::{self as protocol, Message, StatusCode, Target};
use tether_server::config::ServerConfig;
use tether_server::ServerHandle;
use tether_tests::process::free_port;
use tether_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Servers on fixed loopback ports so that each can name the others as peers before start.
fn mesh(pki: &Pki, upstreams: &[SocketAddr]) -> Vec<ServerConfig> {
    let addrs: Vec<SocketAddr> = upstreams
        .iter()
        .map(|_| SocketAddr::from(([127, 0, 0, 1], free_port())))
        .collect();
    upstreams
        .iter()
        .zip(&addrs)
        .map(|(up, me)| {
            let mut c = server_config(pki, *up);
            c.listen = *me;
            c.peers = addrs
                .iter()
                .filter(|a| *a != me)
                .map(|a| a.to_string())
                .collect();
            c
        })
        .collect()
}

async fn start_all(configs: Vec<ServerConfig>) -> Vec<ServerHandle> {
    let mut v = Vec::new();
    for c in configs {
        v.push(tether_server::start(c).await.expect("server starts"));
    }
    v
}

/// A dead upstream: a port that refuses connections.
/// Waits for a server's drain, which must end once its last stream closes, with none left.
async fn drain_ends_with_nothing_left(drain: tokio::task::JoinHandle<i64>) {
    let left = within(
        "drain ends once the stream closes",
        Duration::from_secs(10),
        drain,
    )
    .await
    .unwrap();
    assert_eq!(left, 0);
}

fn dead_upstream() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_given_one_server_learns_the_others_and_remembers_them() {
    init_logging();
    let pki = Pki::new();
    let echoes = [start_echo(), start_echo(), start_echo()];
    let servers = start_all(mesh(
        &pki,
        &echoes.iter().map(|e| e.addr).collect::<Vec<_>>(),
    ))
    .await;
    wait_for("peers linked", Duration::from_secs(10), || async {
        servers.iter().all(|s| s.peers_up() == 2)
    })
    .await;

    let agent = tether_agent::start(agent_config(&pki, "node-a", &[servers[0].local_addr]))
        .await
        .unwrap();
    wait_for("tunnels to all three", Duration::from_secs(10), || async {
        agent.tunnels_up() == 3
    })
    .await;
    let state = std::fs::read_to_string(pki.agent_dir("node-a").join("servers")).unwrap();
    for s in &servers {
        assert!(state.contains(&s.local_addr.to_string()), "{state}");
    }
    // Spread by fewest streams: 30 held connections land on all three servers.
    let mut held = Vec::new();
    for _ in 0..30 {
        let mut c = tokio::net::TcpStream::connect(agent.listen_addr)
            .await
            .unwrap();
        c.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).await.unwrap();
        held.push(c);
    }
    for s in &servers {
        assert_eq!(
            s.metrics().shared.streams_open.get(),
            10,
            "least-streams spreads evenly"
        );
    }
    drop(held);
    agent.shutdown().await;

    // A restarted agent whose --server no longer answers finds the others from its saved list.
    let mut cfg = agent_config(&pki, "node-a", &["127.0.0.1:1".parse().unwrap()]);
    cfg.reconnect_max = Duration::from_millis(500);
    let agent = tether_agent::start(cfg).await.unwrap();
    wait_for(
        "tunnels from the saved list",
        Duration::from_secs(10),
        || async { agent.tunnels_up() == 3 },
    )
    .await;
    echo_roundtrip(agent.listen_addr, random_bytes(10_000, 1))
        .await
        .unwrap();
    agent.shutdown().await;
    for s in servers {
        s.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_a_dead_upstream_relays_through_a_healthy_peer() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let mut configs = mesh(&pki, &[dead_upstream(), echo.addr]);
    // The agent must reach only the first server: the second advertises an address that goes
    // nowhere (peers still dial it by its real one).
    configs[1].advertise = Some("127.0.0.1:1".into());
    let servers = start_all(configs).await;
    wait_for("peers linked", Duration::from_secs(10), || async {
        servers.iter().all(|s| s.peers_up() == 1)
    })
    .await;
    let mut cfg = agent_config(&pki, "node-a", &[servers[0].local_addr]);
    cfg.state_dir = None;
    let agent = tether_agent::start(cfg).await.unwrap();
    wait_for(
        "tunnel to the first server",
        Duration::from_secs(10),
        || async { agent.tunnels_up() == 1 },
    )
    .await;
    wait_for(
        "first server unhealthy",
        Duration::from_secs(10),
        || async { servers[0].metrics().upstream_healthy.get() == 0 },
    )
    .await;

    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..50u64 {
        let addr = agent.listen_addr;
        tasks
            .spawn(async move { echo_roundtrip(addr, random_bytes(50_000 + i as usize, i)).await });
    }
    let failed: Vec<_> = tasks
        .join_all()
        .await
        .into_iter()
        .filter_map(Result::err)
        .collect();
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(servers[0].metrics().peer_relayed.get(), 50);
    assert_eq!(servers[1].metrics().shared.streams_total.get(), 50);
    agent.shutdown().await;
    for s in servers {
        s.shutdown().await;
    }
}

/// Sends `Open { apiserver, hops }` on a new stream of `conn`; returns the status code.
async fn open_with_hops(conn: &quinn::Connection, hops: u8) -> StatusCode {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let open = Message::Open {
        version: protocol::PROTOCOL_VERSION,
        target: Target::Service(protocol::SERVICE_APISERVER.into()),
        hops,
    };
    send.write_all(&protocol::encode_to_bytes(&open).unwrap())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        if let Ok(Some((Message::Status { code, .. }, _))) = protocol::decode(&buf) {
            return code;
        }
        let n = within("status", Duration::from_secs(10), recv.read(&mut chunk))
            .await
            .unwrap()
            .unwrap_or(0);
        assert!(n > 0, "stream ended without a status");
        buf.extend_from_slice(&chunk[..n]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relayed_streams_never_loop() {
    init_logging();
    let pki = Pki::new();
    // The first server's upstream is dead, the second's is alive: the first relays through the
    // second, but only a stream that no server has relayed yet.
    let echo = start_echo();
    let servers = start_all(mesh(&pki, &[dead_upstream(), echo.addr])).await;
    wait_for(
        "peers linked, first unhealthy",
        Duration::from_secs(10),
        || async {
            servers.iter().all(|s| s.peers_up() == 1)
                && servers[0].metrics().upstream_healthy.get() == 0
                && servers[1].metrics().upstream_healthy.get() == 1
        },
    )
    .await;
    // A stream already relayed once (hops = 1), as a peer would send it: the one-hop guard
    // answers it here instead of passing it on.
    let id = tether_transport::tls::Identity::load(
        &pki.server_dir().join("server.crt"),
        &pki.server_dir().join("server.key"),
    )
    .unwrap();
    let as_peer = raw_client_with(
        &pki,
        Some(id),
        tether_transport::tls::ALPN,
        servers[0].local_addr,
    )
    .await
    .unwrap();
    assert_eq!(
        open_with_hops(&as_peer, 1).await,
        StatusCode::UpstreamUnreachable
    );
    assert_eq!(
        servers[0].metrics().peer_relayed.get(),
        0,
        "relayed a second hop"
    );
    assert_eq!(servers[1].metrics().shared.streams_total.get(), 0);
    // The same stream from a node (hops = 0) is relayed through the healthy peer.
    let as_node = raw_client(&pki, Some("node-a"), servers[0].local_addr)
        .await
        .unwrap();
    assert_eq!(open_with_hops(&as_node, 0).await, StatusCode::Ok);
    assert_eq!(servers[0].metrics().peer_relayed.get(), 1);
    for s in servers {
        s.shutdown().await;
    }
}

/// A long-lived connection through `agent`, carried (one byte echoed).
async fn held_stream(agent: &tether_agent::AgentHandle) -> tokio::net::TcpStream {
    let mut held = tokio::net::TcpStream::connect(agent.listen_addr)
        .await
        .unwrap();
    held.write_all(b"a").await.unwrap();
    let mut b = [0u8; 1];
    held.read_exact(&mut b).await.unwrap();
    held
}

/// Starts draining `server` (for at most `timeout`), and returns once `agent` sees the drain.
async fn drain_seen(
    agent: &tether_agent::AgentHandle,
    server: tether_server::ServerHandle,
    timeout: Duration,
) -> tokio::task::JoinHandle<i64> {
    let at = server.local_addr.to_string();
    let drain = tokio::spawn(server.drain(timeout));
    wait_for(
        "the agent sees the drain",
        Duration::from_secs(5),
        || async { agent.draining_servers() == vec![at.clone()] },
    )
    .await;
    drain
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_server_finishes_its_streams_and_gets_no_new_ones() {
    init_logging();
    let pki = Pki::new();
    let echoes = [start_echo(), start_echo()];
    let mut servers = start_all(mesh(&pki, &[echoes[0].addr, echoes[1].addr]))
        .await
        .into_iter();
    let (s1, s2) = (servers.next().unwrap(), servers.next().unwrap());
    let mut cfg = agent_config(&pki, "node-a", &[s1.local_addr, s2.local_addr]);
    cfg.policy = Policy::Ordered;
    let agent = tether_agent::start(cfg).await.unwrap();
    wait_for("both tunnels", Duration::from_secs(10), || async {
        agent.tunnels_up() == 2
    })
    .await;

    // A long-lived stream on the first server (ordered policy: it takes everything).
    let mut held = held_stream(&agent).await;
    assert_eq!(s1.metrics().shared.streams_open.get(), 1);

    let s2_before = s2.metrics().shared.streams_total.get();
    let drain = drain_seen(&agent, s1, Duration::from_secs(20)).await;
    // New connections go to the second server; the held one still works.
    for i in 0..10 {
        echo_roundtrip(agent.listen_addr, random_bytes(1000, i))
            .await
            .unwrap();
    }
    assert_eq!(s2.metrics().shared.streams_total.get(), s2_before + 10);
    held.write_all(b"b").await.unwrap();
    let mut b = [0u8; 1];
    held.read_exact(&mut b).await.unwrap();
    assert_eq!(&b, b"b");
    drop(held);
    drain_ends_with_nothing_left(drain).await;
    agent.shutdown().await;
    s2.shutdown().await;
}

/// A drain that begins while a stream is still reaching its upstream waits for it: before, the
/// drain counted only streams already relaying, found none, and closed the tunnel under the
/// stream it had let in. (The soak across a cellular link saw new connections reset this way;
/// there a stream takes a round trip of 60 ms and more to arrive.) Here the upstream's accept
/// queue is full, so the server's connect waits for a SYN retransmission.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_waits_for_a_stream_still_reaching_its_upstream() {
    init_logging();
    let pki = Pki::new();
    // A listener with the shortest accept queue, filled by one connection nobody accepts.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let slow = socket.listen(0).unwrap();
    let slow_addr = slow.local_addr().unwrap();
    let filler = tokio::net::TcpStream::connect(slow_addr).await.unwrap();
    let echo = start_echo();
    let mut cfg = server_config(&pki, echo.addr);
    cfg.services = vec![("slow".into(), slow_addr.to_string())];
    cfg.connect_timeout = Duration::from_secs(10);
    let server = tether_server::start(cfg).await.unwrap();
    let mut acfg = agent_config(&pki, "node-a", &[server.local_addr]);
    acfg.forwards = vec![("127.0.0.1:0".parse().unwrap(), "slow".into())];
    acfg.last_attempt_timeout = Duration::from_secs(20);
    let agent = tether_agent::start(acfg).await.unwrap();
    wait_for("tunnel up", Duration::from_secs(10), || async {
        agent.tunnels_up() == 1
    })
    .await;
    let slow_local = agent.forward_addrs[0].0;
    let mut client = tokio::net::TcpStream::connect(slow_local).await.unwrap();
    client.write_all(b"ping").await.unwrap();
    wait_for(
        "the stream reaching its upstream",
        Duration::from_secs(10),
        || async { server.streams_opening() == 1 },
    )
    .await;
    let drain = tokio::spawn(server.drain(Duration::from_secs(20)));
    // The upstream takes the connections now: the filler's, then the server's at its SYN's
    // next retransmission. It echoes what the stream carries.
    drop(filler);
    let upstream = tokio::spawn(async move {
        loop {
            let (mut c, _) = slow.accept().await.unwrap();
            let mut buf = [0u8; 4];
            if c.read_exact(&mut buf).await.is_ok() {
                c.write_all(&buf).await.unwrap();
                let mut rest = Vec::new();
                let _ = c.read_to_end(&mut rest).await;
                return;
            }
        }
    });
    let mut back = [0u8; 4];
    within(
        "the echo through the draining server",
        Duration::from_secs(15),
        client.read_exact(&mut back),
    )
    .await
    .expect("the stream let in before the drain is carried, not cut");
    assert_eq!(&back, b"ping");
    drop(client);
    drain_ends_with_nothing_left(drain).await;
    let _ = within("upstream done", Duration::from_secs(5), upstream).await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_drains_on_request() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let server = start_server(&pki, echo.addr).await;
    let agent = start_agent(&pki, "node-a", &[server.local_addr]).await;
    let addr = agent.listen_addr;
    let mut held = tokio::net::TcpStream::connect(addr).await.unwrap();
    held.write_all(b"a").await.unwrap();
    let mut b = [0u8; 1];
    held.read_exact(&mut b).await.unwrap();
    let drain = tokio::spawn(agent.drain(Duration::from_secs(20)));
    // The listener closes: new connections are refused.
    wait_for("listener closed", Duration::from_secs(5), || async {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    held.write_all(b"b").await.unwrap();
    held.read_exact(&mut b).await.unwrap();
    drop(held);
    let left = within("agent drain ends", Duration::from_secs(10), drain)
        .await
        .unwrap();
    assert_eq!(left, 0);
    server.shutdown().await;
}

/// The gap between one tunnel and the next (here the only server restarting; in the field
/// also a fallback from QUIC to TCP) costs no connection: a connection that finds no tunnel
/// waits for one, for `reconnect_grace` after the last went down. Past the grace, with no
/// server coming back, connections are refused at once rather than left hanging.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_in_the_gap_between_tunnels_waits_for_the_next() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let server = start_server(&pki, echo.addr).await;
    let at = server.local_addr;
    let grace = Duration::from_secs(5);
    let mut cfg = agent_config(&pki, "node-a", &[at]);
    cfg.reconnect_grace = grace;
    let agent = tether_agent::start(cfg).await.unwrap();
    wait_for("tunnel up", Duration::from_secs(10), || async {
        agent.tunnels_up() == 1
    })
    .await;

    server.shutdown().await;
    wait_for("tunnel down", Duration::from_secs(5), || async {
        agent.tunnels_up() == 0
    })
    .await;
    // A client arrives while no server is up; the server comes back at the same address.
    let client = tokio::spawn(echo_roundtrip(agent.listen_addr, random_bytes(5000, 7)));
    wait_for("the client waits", Duration::from_secs(5), || async {
        agent.metrics().connections_waited.get() == 1
    })
    .await;
    let mut again = server_config(&pki, echo.addr);
    again.listen = at;
    let server = tether_server::start(again).await.expect("server restarts");
    within(
        "the waiting client is served",
        Duration::from_secs(10),
        client,
    )
    .await
    .unwrap()
    .expect("the connection made in the gap is carried");
    assert_eq!(agent.metrics().connections_failed.get(), 0);

    // Down for good: once the grace is over, refusals come at once.
    server.shutdown().await;
    wait_for("tunnel down again", Duration::from_secs(5), || async {
        agent.tunnels_up() == 0
    })
    .await;
    let down = tokio::time::Instant::now();
    let first = echo_roundtrip(agent.listen_addr, random_bytes(10, 1)).await;
    assert!(first.is_err(), "no server, yet answered");
    assert!(
        down.elapsed() <= grace + Duration::from_secs(2),
        "waited {:?}",
        down.elapsed()
    );
    let refused = tokio::time::Instant::now();
    let later = echo_roundtrip(agent.listen_addr, random_bytes(10, 2)).await;
    assert!(later.is_err(), "no server, yet answered");
    assert!(
        refused.elapsed() < grace / 2,
        "a refusal after the grace took {:?}",
        refused.elapsed()
    );
    agent.shutdown().await;
}

/// The cellular soak's rolling restart: the agent's only tunnel drains (a long stream keeps it
/// up) while the next server is not up yet. A new connection waits, up to the reconnect
/// grace, for a tunnel that takes streams, instead of being reset at once because the only
/// tunnel up refuses new ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_every_tunnel_draining_a_new_connection_waits_for_the_next_server() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let first = start_server(&pki, echo.addr).await;
    // The second server's address is known to the agent from the start, but nothing listens
    // there yet: the agent keeps dialing it.
    let second_at: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let mut cfg = agent_config(&pki, "node-a", &[first.local_addr, second_at]);
    cfg.reconnect_grace = Duration::from_secs(10);
    let agent = tether_agent::start(cfg).await.unwrap();
    wait_for("the first tunnel", Duration::from_secs(10), || async {
        agent.tunnels_up() == 1
    })
    .await;

    // A long stream holds the first server in its drain.
    let held = held_stream(&agent).await;
    let drain = drain_seen(&agent, first, Duration::from_secs(30)).await;

    // A new connection now has no tunnel to take it: it waits for one.
    let accepted = agent.metrics().connections_accepted.get();
    let client = tokio::spawn(echo_roundtrip(agent.listen_addr, random_bytes(5000, 3)));
    wait_for(
        "the agent takes the connection",
        Duration::from_secs(5),
        || async { agent.metrics().connections_accepted.get() > accepted },
    )
    .await;
    let mut cfg = server_config(&pki, echo.addr);
    cfg.listen = second_at;
    let second = tether_server::start(cfg)
        .await
        .expect("the second server starts");
    within(
        "the waiting connection is carried by the second server",
        Duration::from_secs(15),
        client,
    )
    .await
    .unwrap()
    .expect("carried, not reset");
    assert_eq!(agent.metrics().connections_failed.get(), 0);
    assert!(second.metrics().shared.streams_total.get() >= 1);

    drop(held);
    drain_ends_with_nothing_left(drain).await;
    second.shutdown().await;
}
