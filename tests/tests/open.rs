//! Opening streams fast: a TLS client's first bytes travel with the open (no round trip of their
//! own), and a server that does not answer is hedged around in milliseconds, never at the cost
//! of a byte lost, doubled or sent early where the service is not TLS.

use std::time::Duration;
use tether_tests::*;
use tokio::net::{TcpSocket, TcpStream};

/// A loopback address whose accept queue is full: connects to it hang (the kernel drops the
/// SYNs), like a host that stopped answering.
async fn black_hole() -> (tokio::net::TcpListener, TcpStream) {
    let s = TcpSocket::new_v4().unwrap();
    s.bind(loopback0()).unwrap();
    let l = s.listen(0).unwrap();
    let filler = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
    (l, filler)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_bytes_travel_with_the_open_and_arrive_once() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let server = start_server(&pki, echo.addr).await;
    let agent = start_agent(&pki, "node-a", &[server.local_addr]).await;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..64u64 {
        // Up to twice the early limit: what does not fit waits for the verdict.
        let size = (i as usize * 2048) % (2 * 64 * 1024 + 1);
        let to = agent.listen_addr;
        tasks.spawn(async move { echo_roundtrip(to, random_bytes(size, i)).await });
    }
    for r in within("64 echoes", Duration::from_secs(30), tasks.join_all()).await {
        r.expect("byte-exact echo");
    }
    // Most, not all: a client's first write races the server's verdict, a loopback round trip
    // away, and on a machine busy with other test binaries the verdict sometimes wins (CI saw
    // 49 of 64). Those connections send their bytes after the verdict, which is correct too.
    assert!(
        agent.metrics().early_data.get() >= 32,
        "the apiserver's first bytes went with the open ({} streams)",
        agent.metrics().early_data.get()
    );
    agent.shutdown().await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_not_marked_tls_sends_nothing_before_the_verdict() {
    init_logging();
    let pki = Pki::new();
    let api = start_echo();
    let plain = start_echo();
    let mut sc = server_config(&pki, api.addr);
    sc.services = vec![("plain".into(), plain.addr.to_string())];
    let server = tether_server::start(sc).await.unwrap();
    let mut ac = agent_config(&pki, "node-a", &[server.local_addr]);
    ac.forwards = vec![(loopback0(), "plain".into())];
    let agent = tether_agent::start(ac).await.unwrap();
    wait_for("tunnel", Duration::from_secs(10), || async {
        agent.tunnels_up() == 1
    })
    .await;
    let to = agent.forward_addrs[0].0;
    for i in 0..8 {
        echo_roundtrip(to, random_bytes(10_000, i)).await.unwrap();
    }
    assert_eq!(agent.metrics().early_data.get(), 0);
    agent.shutdown().await;
    server.shutdown().await;
}

/// The first server cannot reach its upstream and says nothing for a long time; the open is
/// hedged to the second server long before the first's verdict or the open timeout, and the
/// connections after it go to the second server first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_the_first_server_sits_on_is_hedged_to_the_next() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let (_hole, _filler) = black_hole().await;
    let mut slow = server_config(&pki, echo.addr);
    slow.services = vec![("svc".into(), _hole.local_addr().unwrap().to_string())];
    slow.connect_timeout = Duration::from_secs(20);
    let slow = tether_server::start(slow).await.unwrap();
    let mut fine = server_config(&pki, echo.addr);
    fine.services = vec![("svc".into(), echo.addr.to_string())];
    let fine = tether_server::start(fine).await.unwrap();

    let mut ac = agent_config(&pki, "node-a", &[slow.local_addr, fine.local_addr]);
    ac.policy = tether_link::pool::Policy::Ordered;
    ac.forwards = vec![(loopback0(), "svc".into())];
    // So long that, without the hedge, the test's deadline would pass first.
    ac.stream_open_timeout = Duration::from_secs(20);
    ac.last_attempt_timeout = Duration::from_secs(20);
    ac.early_data = vec!["svc".into()];
    let agent = tether_agent::start(ac).await.unwrap();
    wait_for("both tunnels", Duration::from_secs(10), || async {
        agent.tunnels_up() == 2
    })
    .await;
    let to = agent.forward_addrs[0].0;
    for i in 0..5 {
        within(
            "a hedged open",
            Duration::from_secs(5),
            echo_roundtrip(to, random_bytes(20_000, i)),
        )
        .await
        .expect("byte-exact echo through the second server");
    }
    // Only the first connection needed a hedge: the server that sat on it is then tried last.
    assert_eq!(agent.metrics().hedges.get(), 1);
    assert_eq!(fine.metrics().shared.streams_total.get(), 5);
    assert_eq!(
        slow.metrics().shared.streams_total.get(),
        0,
        "the first server never relayed"
    );
    agent.shutdown().await;
    slow.shutdown().await;
    fine.shutdown().await;
}

/// A server killed with early bytes in flight: the agent's kept copy reaches the other server,
/// and every echo comes back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn early_bytes_survive_the_server_dying_under_them() {
    init_logging();
    let pki = Pki::new();
    let echo = start_echo();
    let logs = TempDir::new("dying");
    // The first server is a process of its own, to be killed with -9: no goodbye, no drain.
    let first = tether_tests::process::ServerProcess::start(
        &pki.server_dir(),
        echo.addr,
        &[],
        logs.path().join("first.log"),
    )
    .await;
    let second = start_server(&pki, echo.addr).await;
    let mut ac = agent_config(&pki, "node-a", &[first.addr, second.local_addr]);
    ac.policy = tether_link::pool::Policy::Ordered;
    let agent = tether_agent::start(ac).await.unwrap();
    wait_for("both tunnels", Duration::from_secs(10), || async {
        agent.tunnels_up() == 2
    })
    .await;
    let to = agent.listen_addr;
    // The load runs until told to stop: an early open hedged to the second server puts the
    // first behind it for a few seconds, and a load of fixed length could end before the
    // first server carried any of it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let load = tokio::spawn(async move {
        let mut failures = Vec::new();
        let mut i = 0u64;
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
            if let Err(e) = echo_roundtrip(to, random_bytes(3000, i)).await {
                failures.push(e);
            }
            i += 1;
        }
        failures
    });
    let carried = || async {
        let text = http_get(first.admin, "/metrics").await.map(|r| r.1);
        metric(&text.unwrap_or_default(), "tether_streams_total").unwrap_or(0.0)
    };
    wait_for("load under way", Duration::from_secs(20), || async {
        carried().await >= 20.0
    })
    .await;
    // Killed: its tunnels go silent, the streams on them with them.
    let before = second.metrics().shared.streams_total.get();
    first.proc.signal("KILL");
    wait_for(
        "load on the second server",
        Duration::from_secs(30),
        || async { second.metrics().shared.streams_total.get() >= before + 100 },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let failures = within("the load", Duration::from_secs(60), load)
        .await
        .unwrap();
    // A connection already relayed by the dead server may fail (its bytes were in flight);
    // none after it, and none is corrupted (echo_roundtrip compares checksums).
    assert!(failures.len() <= 1, "{failures:?}");
    assert!(second.metrics().shared.streams_total.get() > 0);
    agent.shutdown().await;
    second.shutdown().await;
}
