use super::*;
use proptest::prelude::*;
use std::time::Duration;

/// A tunnel here (`"t<id>"`) or a peer link (`"p<n>"`), as the tests name them.
type Via = String;

fn local(id: usize, admitted: bool) -> Local<Via> {
    Local {
        via: format!("t{id}"),
        id,
        admitted,
    }
}

fn peers(n: usize) -> Vec<Via> {
    (0..n).map(|i| format!("p{i}")).collect()
}

fn ask(via: &str, hops: u8) -> Step<Via> {
    Step::Ask {
        via: via.to_string(),
        hops,
    }
}

fn gone() -> Answer {
    Answer::TunnelFailed(Refusal::Unreachable("tunnel closed".into()))
}

/// A server up for long, a node that never left it.
fn settled() -> (Instant, History) {
    let now = Instant::now() + Duration::from_secs(100);
    let h = History {
        left_at: None,
        started: now - Duration::from_secs(100),
    };
    (now, h)
}

#[test]
fn the_tunnels_here_go_first_newest_first_and_a_verdict_stands() {
    let (now, h) = settled();
    let mut r = Route::new("n", Scope::Client);
    r.offer(vec![local(2, true), local(1, true)], peers(2));
    assert_eq!(r.next(now, h), ask("t2", 0));
    r.answered(gone());
    assert_eq!(r.next(now, h), ask("t1", 0));
    r.answered(Answer::Verdict(Refusal::Forbidden("policy".into())));
    assert_eq!(
        r.next(now, h),
        Step::Refuse(Refusal::Forbidden("policy".into()))
    );
}

#[test]
fn peers_are_asked_only_when_no_tunnel_here_is_left() {
    let (now, h) = settled();
    let mut r = Route::new("n", Scope::Client);
    r.offer(vec![], peers(3));
    assert_eq!(r.next(now, h), ask("p0", 1));
    r.answered(Answer::NotThere);
    assert_eq!(r.next(now, h), ask("p1", 1));
    r.answered(gone());
    assert_eq!(r.next(now, h), ask("p2", 1));
    r.answered(Answer::NotThere);
    assert_eq!(
        r.next(now, h),
        Step::Refuse(Refusal::NoNode(
            "node n is not connected to any server".into()
        ))
    );
}

#[test]
fn a_tunnel_that_failed_under_the_request_is_waited_for_once() {
    let (now, h) = settled();
    let mut r = Route::new("n", Scope::Client);
    r.offer(vec![local(1, true)], peers(1));
    assert_eq!(r.next(now, h), ask("t1", 0));
    r.answered(gone());
    // Not the peers yet: the node's agent redials within a second or two.
    assert_eq!(
        r.next(now, h),
        Step::Wait {
            until: now + RECONNECT_GRACE
        }
    );
    assert_eq!(r.tried(), &[1]);
    // The old tunnel is still listed, a new one came: only the new one is asked.
    r.offer(vec![local(2, true), local(1, true)], peers(1));
    assert_eq!(r.next(now, h), ask("t2", 0));
    r.answered(gone());
    // No second wait.
    assert!(matches!(
        r.next(now, h),
        Step::Refuse(Refusal::Unreachable(_))
    ));
}

#[test]
fn after_the_wait_a_node_with_only_failed_tunnels_here_is_looked_for_at_the_peers() {
    let (now, h) = settled();
    let mut r = Route::new("n", Scope::Client);
    r.offer(vec![local(1, true)], peers(1));
    r.next(now, h);
    r.answered(gone());
    assert!(matches!(r.next(now, h), Step::Wait { .. }));
    r.offer(vec![local(1, true)], peers(1));
    assert_eq!(r.next(now, h), ask("p0", 1));
}

/// The attack: a node revoked a moment ago still has its tunnel here until the records'
/// watcher closes it (up to a second). Its tunnels are never asked; the request is answered
/// as for a node not connected here.
#[test]
fn a_revoked_nodes_tunnel_is_never_asked() {
    let (now, h) = settled();
    let mut r = Route::new("n", Scope::Client);
    r.offer(vec![local(1, false)], vec![]);
    assert_eq!(
        r.next(now, h),
        Step::Refuse(Refusal::NoNode(
            "node n is not connected to any server".into()
        ))
    );
    let mut r = Route::new("n", Scope::ForPeer);
    r.offer(vec![local(2, false), local(1, true)], vec![]);
    assert_eq!(r.next(now, h), ask("t1", 0));
}

#[test]
fn a_peers_request_asks_the_tunnels_here_only_and_never_waits() {
    let (now, mut h) = settled();
    // The node left a moment ago: a client's request would wait.
    h.left_at = Some(now - Duration::from_secs(1));
    let mut r = Route::new("n", Scope::ForPeer);
    r.offer(vec![local(1, true)], peers(2));
    assert_eq!(r.next(now, h), ask("t1", 0));
    r.answered(gone());
    assert!(matches!(
        r.next(now, h),
        Step::Refuse(Refusal::Unreachable(_))
    ));
    let mut r = Route::new("n", Scope::ForPeer);
    r.offer(vec![], peers(2));
    assert_eq!(
        r.next(now, h),
        Step::Refuse(Refusal::NoNode(
            "node n is not connected to this server".into()
        ))
    );
}

/// An answer the route gets to an ask, as the strategy draws it.
#[derive(Debug, Clone)]
enum Drawn {
    Stream,
    Failed,
    NotThere,
    Verdict,
}

fn drawn() -> impl Strategy<Value = Drawn> {
    prop_oneof![
        1 => Just(Drawn::Stream),
        4 => Just(Drawn::Failed),
        2 => Just(Drawn::NotThere),
        1 => Just(Drawn::Verdict),
    ]
}

fn tunnels() -> impl Strategy<Value = Vec<(usize, bool)>> {
    proptest::collection::vec((0usize..6, any::<bool>()), 0..5)
}

proptest! {
    /// Whatever the tunnels here and their admission, the peers and the answers: a tunnel the
    /// records do not admit is never asked, a tunnel that failed is not asked again, a peer's
    /// request asks no peer and never waits, a client's waits at most once and at most the
    /// grace, and every route ends.
    #[test]
    fn a_revoked_node_is_never_routed_and_a_route_always_ends(
        for_peer: bool,
        first in tunnels(),
        second in tunnels(),
        npeers in 0usize..4,
        answers in proptest::collection::vec(drawn(), 0..40),
        left_ago in proptest::option::of(0u64..10_000),
        up_for in 0u64..10_000,
    ) {
        let scope = if for_peer { Scope::ForPeer } else { Scope::Client };
        let now = Instant::now() + Duration::from_secs(100);
        let h = History {
            left_at: left_ago.map(|ms| now - Duration::from_millis(ms)),
            started: now - Duration::from_millis(up_for),
        };
        let offered = |set: &[(usize, bool)]| -> Vec<Local<Via>> {
            set.iter().map(|&(id, ok)| local(id, ok)).collect()
        };
        // Admission is by tunnel, and the same in both rounds (a revocation holds).
        let admitted = |id: usize| first.iter().chain(&second).filter(|t| t.0 == id).all(|t| t.1);
        let fix = |set: &[(usize, bool)]| -> Vec<(usize, bool)> {
            set.iter().map(|&(id, _)| (id, admitted(id))).collect()
        };
        let (first, second) = (fix(&first), fix(&second));
        let mut r = Route::new("n", scope);
        r.offer(offered(&first), peers(npeers));
        let mut answers = answers.into_iter();
        let mut failed: Vec<usize> = Vec::new();
        let mut waits = 0;
        let mut steps = 0;
        loop {
            steps += 1;
            prop_assert!(steps < 100, "the route does not end");
            match r.next(now, h) {
                Step::Ask { via, hops } => {
                    if hops == 0 {
                        let id: usize = via[1..].parse().unwrap_or(usize::MAX);
                        prop_assert!(admitted(id), "asked a tunnel the records refuse: {}", via);
                        prop_assert!(!failed.contains(&id), "asked a failed tunnel again: {}", via);
                        match answers.next().unwrap_or(Drawn::Failed) {
                            Drawn::Stream => break,
                            Drawn::Failed | Drawn::NotThere => {
                                failed.push(id);
                                r.answered(gone());
                            }
                            Drawn::Verdict => r.answered(Answer::Verdict(Refusal::Busy("b".into()))),
                        }
                    } else {
                        prop_assert_eq!(scope, Scope::Client, "a peer's request asked a peer");
                        match answers.next().unwrap_or(Drawn::NotThere) {
                            Drawn::Stream => break,
                            Drawn::Failed => r.answered(gone()),
                            Drawn::NotThere => r.answered(Answer::NotThere),
                            Drawn::Verdict => r.answered(Answer::Verdict(Refusal::Busy("b".into()))),
                        }
                    }
                }
                Step::Wait { until } => {
                    waits += 1;
                    prop_assert_eq!(scope, Scope::Client, "a peer's request waited");
                    prop_assert!(waits == 1, "waited twice");
                    prop_assert!(until > now && until <= now + RECONNECT_GRACE);
                    r.offer(offered(&second), peers(npeers));
                }
                Step::Refuse(_) => break,
            }
        }
    }
}

// The refusals and the wait rule.
fn every_kind() -> Vec<Refusal> {
    let m = || "why".to_string();
    vec![
        Refusal::Forbidden(m()),
        Refusal::NoNode(m()),
        Refusal::Contested(m()),
        Refusal::Busy(m()),
        Refusal::Unreachable(m()),
        Refusal::TimedOut(m()),
    ]
}

/// A verdict keeps its meaning across a peer hop: the asking server reads back the refusal
/// the answering one sent, and its client the same HTTP status a local client would. Before,
/// a peer's busy reached the client as 502 and a contested address as 403.
#[test]
fn a_refusal_crosses_a_peer_hop_unchanged() {
    for r in every_kind() {
        let back = Refusal::from_wire(r.wire(), r.to_string());
        assert_eq!(back, r);
        assert_eq!(back.http(), r.http());
    }
    let https: Vec<u16> = every_kind().iter().map(Refusal::http).collect();
    assert_eq!(https, [403, 404, 409, 503, 502, 504]);
}

/// What an agent answers, as its client reads it.
#[test]
fn an_agents_verdict_reads_as_its_http_status() {
    let http = |code| Refusal::from_wire(code, String::new()).http();
    assert_eq!(http(StatusCode::RefusedByPolicy), 403);
    assert_eq!(http(StatusCode::Busy), 503);
    assert_eq!(http(StatusCode::Draining), 503);
    assert_eq!(http(StatusCode::Timeout), 504);
    assert_eq!(http(StatusCode::UpstreamUnreachable), 502);
    assert_eq!(http(StatusCode::Other(200)), 502);
}

const S: Duration = Duration::from_secs(1);

#[test]
fn a_node_that_left_a_moment_ago_is_waited_for_until_the_grace_ends() {
    let t0 = Instant::now();
    let now = t0 + 100 * S;
    assert_eq!(
        wait_until(false, Some(now - S), t0, now),
        Some(now - S + RECONNECT_GRACE)
    );
    // Gone longer than the grace: answered at once.
    assert_eq!(wait_until(false, Some(now - 10 * S), t0, now), None);
    // Never seen, on a server up for long: at once.
    assert_eq!(wait_until(false, None, t0, now), None);
    // Never seen, on a server that just started: until the grace after its start.
    assert_eq!(
        wait_until(false, None, now - S, now),
        Some(now - S + RECONNECT_GRACE)
    );
    // A tunnel failed under the request: the grace from now.
    assert_eq!(
        wait_until(true, Some(now - 10 * S), t0, now),
        Some(now + RECONNECT_GRACE)
    );
}

proptest::proptest! {
    /// Whatever the node's history and the server's age, a request waits at most the grace.
    #[test]
    fn a_request_waits_at_most_the_grace(
        failed_here: bool,
        left_ms in proptest::option::of(0u64..20_000),
        started_ms in 0u64..20_000,
        late_ms in 0u64..5_000,
    ) {
        let t0 = Instant::now();
        let now = t0 + Duration::from_millis(20_000 + late_ms);
        let left_at = left_ms.map(|ms| t0 + Duration::from_millis(ms));
        let started = t0 + Duration::from_millis(started_ms);
        if let Some(until) = wait_until(failed_here, left_at, started, now) {
            proptest::prop_assert!(until > now);
            proptest::prop_assert!(until <= now + RECONNECT_GRACE);
        }
    }
}
