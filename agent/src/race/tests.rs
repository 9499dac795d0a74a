use super::*;

const MS: Duration = Duration::from_millis(1);

fn timeouts() -> Timeouts {
    Timeouts {
        open: 500 * MS,
        last: 5000 * MS,
        grace: 3000 * MS,
        dark: 30_000 * MS,
    }
}

/// Starts what `poll` says to start, with `hedge_after`; returns its id and link.
fn start(race: &mut Race<&'static str>, hedge_after: Duration) -> (AttemptId, &'static str) {
    match race.poll(Instant::now()) {
        Step::Start { id, link, .. } => {
            race.started(id, hedge_after);
            (id, link)
        }
        other => panic!("expected a start, got {other:?}"),
    }
}

/// Sleeps (paused time) until the timer `poll` names and returns it.
async fn wait_timer(race: &mut Race<&'static str>) -> Timer {
    match race.poll(Instant::now()) {
        Step::Wait {
            timer: Some((at, t)),
        } => {
            tokio::time::sleep_until(at).await;
            t
        }
        other => panic!("expected a wait, got {other:?}"),
    }
}

/// Waits (paused time) for the attempt `id`'s deadline, and checks that it ends it, reset,
/// with no attempt left to promote.
async fn expires(race: &mut Race<&'static str>, id: AttemptId) {
    let t = wait_timer(race).await;
    assert_eq!(
        race.timer(t, || true),
        Decision::Lost {
            ended: id,
            reset: true,
            promote: None
        }
    );
}

#[tokio::test(start_paused = true)]
async fn the_first_choice_alone_carries_early_bytes_and_wins() {
    let mut race = Race::new(vec!["a", "b"], timeouts());
    match race.poll(Instant::now()) {
        Step::Start {
            link,
            place,
            eager,
            timeout,
            id,
        } => {
            assert_eq!((link, place, eager, timeout), ("a", 0, true, 500 * MS));
            race.started(id, 20 * MS);
            assert_eq!(
                race.verdict(id, Verdict::Ok),
                Decision::Won {
                    winner: id,
                    losers: vec![]
                }
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_silent_first_choice_is_hedged_after_its_delay_and_the_hedge_wins() {
    let t0 = Instant::now();
    let mut race = Race::new(vec!["a", "b", "c"], timeouts());
    let (a, _) = start(&mut race, 20 * MS);
    assert_eq!(wait_timer(&mut race).await, Timer::Hedge);
    assert_eq!(Instant::now() - t0, 20 * MS);
    assert_eq!(race.timer(Timer::Hedge, || true), Decision::Hedge);
    match race.poll(Instant::now()) {
        Step::Start {
            id, link, eager, ..
        } => {
            assert_eq!(
                (link, eager),
                ("b", false),
                "a hedge carries no early bytes"
            );
            race.started(id, 20 * MS);
            // Two attempts at most: no third hedge, only the oldest deadline.
            assert_eq!(
                race.poll(Instant::now()),
                Step::Wait {
                    timer: Some((t0 + 500 * MS, Timer::Expired(a)))
                }
            );
            assert_eq!(
                race.verdict(id, Verdict::Ok),
                Decision::Won {
                    winner: id,
                    losers: vec![a]
                }
            );
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn a_spent_budget_stops_hedging_for_the_connection() {
    let t0 = Instant::now();
    let mut race = Race::new(vec!["a", "b"], timeouts());
    let (a, _) = start(&mut race, 20 * MS);
    let t = wait_timer(&mut race).await;
    assert_eq!(race.timer(t, || false), Decision::HedgeDenied);
    // Only the deadline is left; there the next candidate gets the last, longer timeout.
    assert_eq!(wait_timer(&mut race).await, Timer::Expired(a));
    assert_eq!(Instant::now() - t0, 500 * MS);
    assert_eq!(
        race.timer(Timer::Expired(a), || unreachable!()),
        Decision::Lost {
            ended: a,
            reset: true,
            promote: None
        }
    );
    match race.poll(Instant::now()) {
        Step::Start {
            link,
            eager,
            timeout,
            ..
        } => assert_eq!((link, eager, timeout), ("b", true, 5000 * MS)),
        other => panic!("{other:?}"),
    }
}

#[tokio::test(start_paused = true)]
async fn when_the_first_choice_fails_the_hedge_is_promoted() {
    let mut race = Race::new(vec!["a", "b", "c"], timeouts());
    let (a, _) = start(&mut race, 10 * MS);
    let t = wait_timer(&mut race).await;
    race.timer(t, || true);
    let (b, link) = start(&mut race, 10 * MS);
    assert_eq!(link, "b");
    assert_eq!(
        race.verdict(a, Verdict::Refused),
        Decision::Lost {
            ended: a,
            reset: false,
            promote: Some(b)
        }
    );
    // The promoted hedge is now the newest: the third candidate is its hedge.
    assert_eq!(wait_timer(&mut race).await, Timer::Hedge);
}

#[tokio::test(start_paused = true)]
async fn refusals_walk_the_candidates_then_give_up_without_waiting() {
    let mut race = Race::new(vec!["a", "b"], timeouts());
    let (a, _) = start(&mut race, 20 * MS);
    race.verdict(a, Verdict::Refused);
    let (b, link) = start(&mut race, 20 * MS);
    assert_eq!(link, "b");
    race.verdict(b, Verdict::Refused);
    // A refusal is a server's answer, not a tunnel's trouble: nothing to wait for.
    assert_eq!(race.poll(Instant::now()), Step::GiveUp);
}

#[tokio::test(start_paused = true)]
async fn when_every_tunnel_failed_together_a_new_one_is_waited_for_once() {
    let t0 = Instant::now();
    let mut race = Race::new(vec!["quic-a", "quic-b"], timeouts());
    let (a, _) = start(&mut race, 20 * MS);
    race.verdict(a, Verdict::Lost);
    match race.poll(Instant::now()) {
        Step::Start { id, .. } => race.start_failed(id),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        race.poll(Instant::now()),
        Step::WaitForLinks {
            until: t0 + 3000 * MS
        }
    );
    assert_eq!(race.tried(), ["quic-a", "quic-b"]);
    // The fallback's tunnels came up; one tried already is skipped.
    race.add_links(vec!["quic-a", "tcp-a"]);
    match race.poll(Instant::now()) {
        Step::Start {
            id, link, place, ..
        } => {
            assert_eq!((link, place), ("tcp-a", 2));
            race.started(id, 20 * MS);
            race.verdict(id, Verdict::Lost);
        }
        other => panic!("{other:?}"),
    }
    // Only once.
    assert_eq!(race.poll(Instant::now()), Step::GiveUp);
}

#[tokio::test(start_paused = true)]
async fn an_open_on_a_dark_link_is_held_and_answered_when_the_link_returns() {
    let t0 = Instant::now();
    let mut race = Race::new(vec!["a", "b"], timeouts());
    // No hedge for a long while: the first attempt alone, through a blackout.
    let (a, _) = start(&mut race, 60_000 * MS);
    race.set_dark(true);
    for held in 1..=8u32 {
        let t = wait_timer(&mut race).await;
        assert_eq!(t, Timer::Expired(a));
        assert_eq!(race.timer(t, || true), Decision::Held, "hold {held}");
        assert_eq!(Instant::now() - t0, 500 * MS * held);
    }
    // The link came back and the server answered the open it had waited on.
    race.set_dark(false);
    assert_eq!(
        race.verdict(a, Verdict::Ok),
        Decision::Won {
            winner: a,
            losers: vec![]
        }
    );
    assert_eq!(race.tried(), ["a"], "no other server was asked in the dark");
}

#[tokio::test(start_paused = true)]
async fn a_dark_link_holds_an_open_for_the_tolerance_at_most() {
    let t0 = Instant::now();
    let mut race = Race::new(vec!["a"], timeouts());
    let (a, _) = start(&mut race, 60_000 * MS);
    race.set_dark(true);
    loop {
        let t = wait_timer(&mut race).await;
        match race.timer(t, || true) {
            Decision::Held => continue,
            d => {
                assert_eq!(
                    d,
                    Decision::Lost {
                        ended: a,
                        reset: true,
                        promote: None
                    }
                );
                break;
            }
        }
    }
    assert_eq!(Instant::now() - t0, timeouts().dark);
}

#[tokio::test(start_paused = true)]
async fn once_the_link_is_lit_a_deadline_ends_the_attempt_again() {
    let mut race = Race::new(vec!["a", "b"], timeouts());
    let (a, _) = start(&mut race, 60_000 * MS);
    race.set_dark(true);
    let t = wait_timer(&mut race).await;
    assert_eq!(race.timer(t, || true), Decision::Held);
    race.set_dark(false);
    expires(&mut race, a).await;
    // The next candidate is asked, as after any deadline.
    let (_, link) = start(&mut race, 60_000 * MS);
    assert_eq!(link, "b");
}

/// The soak across a cellular link: the first choice's deadline passed as a blackout began,
/// before the watch called the link dark; the only other server was draining and refused.
/// The first choice, whose silence was the link's, is asked once more.
#[tokio::test(start_paused = true)]
async fn an_unanswered_link_is_asked_again_when_every_other_refuses() {
    let mut race = Race::new(vec!["a", "b"], timeouts());
    let (a, _) = start(&mut race, 60_000 * MS);
    expires(&mut race, a).await;
    let (b, link) = start(&mut race, 60_000 * MS);
    assert_eq!(link, "b");
    race.verdict(b, Verdict::Refused);
    let a2 = match race.poll(Instant::now()) {
        Step::Start {
            id,
            link,
            place,
            eager,
            timeout,
        } => {
            assert_eq!((link, place, eager, timeout), ("a", 0, true, 5000 * MS));
            race.started(id, 60_000 * MS);
            id
        }
        other => panic!("{other:?}"),
    };
    // Once: unanswered again, it is not asked a third time.
    let t = wait_timer(&mut race).await;
    assert_eq!(t, Timer::Expired(a2));
    race.timer(t, || true);
    match race.poll(Instant::now()) {
        Step::WaitForLinks { .. } => race.add_links(vec!["a", "b"]),
        other => panic!("{other:?}"),
    }
    assert_eq!(race.poll(Instant::now()), Step::GiveUp);
}

#[tokio::test(start_paused = true)]
async fn no_candidates_gives_up_at_once() {
    let mut race: Race<&str> = Race::new(vec![], timeouts());
    assert_eq!(race.poll(Instant::now()), Step::GiveUp);
}

/// Tunnels up, none usable (every server draining): the connection waits once, for the grace,
/// for one that is; the cellular soak's rolling restart reset one at once.
#[tokio::test(start_paused = true)]
async fn with_every_server_draining_a_usable_tunnel_is_waited_for_once() {
    let mut race: Race<&str> = Race::new(vec![], timeouts());
    race.none_usable();
    let now = Instant::now();
    assert_eq!(
        race.poll(now),
        Step::WaitForLinks {
            until: now + timeouts().grace
        }
    );
    // A restarted server's tunnel comes up: it is asked.
    race.add_links(vec!["b"]);
    assert!(matches!(race.poll(now), Step::Start { link: "b", .. }));

    // None comes: given up after the one wait.
    let mut race: Race<&str> = Race::new(vec![], timeouts());
    race.none_usable();
    assert!(matches!(race.poll(now), Step::WaitForLinks { .. }));
    race.add_links(vec![]);
    assert_eq!(race.poll(now), Step::GiveUp);
}

/// One step of a made-up driver: which verdict or timer comes next.
#[derive(Debug, Clone, Copy)]
enum Event {
    Verdict(Verdict),
    Hedge { budget: bool },
    Expired { dark: bool },
}

fn event() -> impl proptest::strategy::Strategy<Value = (Event, usize, u64)> {
    use proptest::prelude::*;
    let event = prop_oneof![
        Just(Event::Verdict(Verdict::Ok)),
        Just(Event::Verdict(Verdict::Refused)),
        Just(Event::Verdict(Verdict::Lost)),
        any::<bool>().prop_map(|budget| Event::Hedge { budget }),
        any::<bool>().prop_map(|dark| Event::Expired { dark }),
    ];
    (event, 0usize..8, 1u64..2000)
}

proptest::proptest! {
    /// Whatever the servers answer, in whatever order, and whatever the timers do: early
    /// bytes go with at most one live attempt at a time (so at most one upstream that stays
    /// up gets them), a winner is a live attempt, and a wait for new links lasts at most
    /// the grace.
    #[test]
    fn early_bytes_ride_with_one_live_attempt_at_most(
        n in 1usize..5,
        fail_starts in proptest::collection::vec(proptest::bool::weighted(0.15), 8),
        events in proptest::collection::vec(event(), 1..80),
    ) {
        let links = ["a", "b", "c", "d", "e"];
        let mut race = Race::new(links[..n].to_vec(), timeouts());
        let mut now = Instant::now();
        // The driver's view: live attempts and whether each carries early bytes.
        let mut live: Vec<(AttemptId, bool)> = Vec::new();
        let mut starts = 0usize;
        for (ev, pick, ms) in events {
            loop {
                match race.poll(now) {
                    Step::Start { id, eager, .. } => {
                        let failed = fail_starts.get(starts).copied().unwrap_or(false);
                        starts += 1;
                        if failed {
                            race.start_failed(id);
                        } else {
                            race.started(id, 100 * MS);
                            live.push((id, eager));
                        }
                    }
                    Step::WaitForLinks { until } => {
                        proptest::prop_assert!(until <= now + timeouts().grace);
                        race.add_links(Vec::new());
                    }
                    Step::Wait { .. } => break,
                    Step::GiveUp => return Ok(()),
                }
                let eager = live.iter().filter(|a| a.1).count();
                proptest::prop_assert!(eager <= 1, "{live:?}");
            }
            now += Duration::from_millis(ms);
            let decision = match ev {
                Event::Verdict(v) => {
                    let (id, _) = live[pick % live.len()];
                    race.verdict(id, v)
                }
                Event::Hedge { budget } => race.timer(Timer::Hedge, || budget),
                Event::Expired { dark } => {
                    race.set_dark(dark);
                    let (id, _) = live[pick % live.len()];
                    race.timer(Timer::Expired(id), || true)
                }
            };
            match decision {
                Decision::Won { winner, losers } => {
                    proptest::prop_assert!(live.iter().any(|a| a.0 == winner));
                    proptest::prop_assert_eq!(losers.len(), live.len() - 1);
                    return Ok(());
                }
                Decision::Lost { ended, promote, .. } => {
                    live.retain(|a| a.0 != ended);
                    if let Some(p) = promote {
                        proptest::prop_assert_eq!(live.len(), 1);
                        if let Some(a) = live.iter_mut().find(|a| a.0 == p) {
                            a.1 = true;
                        }
                    }
                }
                _ => {}
            }
            let eager = live.iter().filter(|a| a.1).count();
            proptest::prop_assert!(eager <= 1, "{live:?}");
        }
    }
}
