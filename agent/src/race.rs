//! Which server to ask, when to ask another, and when to give up: the decisions of one
//! connection's open, with no I/O and no clock of their own.
//!
//! The forwarder (`forward.rs`) drives a [`Race`]: it asks [`Race::poll`] what to do next
//! (start an attempt on a link, wait for a link that is not there yet, wait for events until a
//! timer, or give up), does it, and reports what happened (an attempt started or not, a
//! verdict, a timer). The rules, tested below on tokio's paused time:
//!
//! - The first choice is asked alone; it may carry the client's early bytes.
//! - When it has not answered within its hedge delay (the driver's estimate from the link's
//!   past answers), the next candidate is asked too, if the hedge budget allows: at most
//!   [`MAX_ATTEMPTS`] at once. A hedge carries no early bytes until it is the only attempt left
//!   ([`Verdict`]s that end the others promote it).
//! - The first `Ok` wins and the others are reset. A refusal or a lost tunnel moves on to the
//!   next candidate; an attempt without a verdict by its deadline is reset and counts as
//!   tunnel trouble. The last candidate gets the longer timeout.
//! - When every candidate failed as a tunnel (no answer, or lost) and none refused, the
//!   tunnels probably died together (UDP blocked, a new network): once, the race waits up to
//!   the reconnect grace for a link that was not tried, and asks it.
//! - An attempt that ended at its deadline got no answer, which is not a refusal: its server
//!   may have been behind a blackout the watch had not called yet. When every other candidate
//!   has failed too, each such link is asked once more (with the last, longer timeout). The
//!   soak across a cellular link saw an open sent as a blackout began give up on its first
//!   choice 0.5 s later, then be refused by the only other server (draining), and reset the
//!   connection while the first choice, alive, answered again moments later.
//! - While the link is dark (every tunnel silent at once, or just back from that while the
//!   transports catch up: the liveness watch's word for a blackout; the driver tells the race
//!   with [`Race::set_dark`]), an attempt's deadline does
//!   not end it: no server can answer, and another would not either. It is held, a timeout at a
//!   time, for up to [`Timeouts::dark`] from its start (the blackout tolerance), and answered
//!   when the link comes back. The soak across a cellular link saw new connections begun at a
//!   blackout's start reset in it.

use std::collections::VecDeque;
use std::time::Duration;
use tokio::time::Instant;

/// Most servers asked at once for one connection: the chosen one and one hedge.
pub const MAX_ATTEMPTS: usize = 2;

/// The race's timeouts.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For a verdict, when more candidates remain.
    pub open: Duration,
    /// For a verdict from the last candidate.
    pub last: Duration,
    /// How long to wait, once, for a new link after every tunnel failed as a tunnel.
    pub grace: Duration,
    /// The longest an attempt is held past its deadline while the link is dark.
    pub dark: Duration,
}

/// A link handle a race can tell apart from others: the same link, not an equal one.
pub trait Candidate: Clone {
    fn same(&self, other: &Self) -> bool;
}

impl<T> Candidate for std::sync::Arc<T> {
    fn same(&self, other: &Self) -> bool {
        std::sync::Arc::ptr_eq(self, other)
    }
}

impl Candidate for &str {
    fn same(&self, other: &Self) -> bool {
        self == other
    }
}

/// An attempt's name, for the driver to find its I/O by.
pub type AttemptId = u64;

/// What the driver does next.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<L> {
    /// Open a stream on `link`, send `Open` (and the kept early bytes if `eager`), within
    /// `timeout`; report with [`Race::started`] or [`Race::start_failed`].
    Start {
        id: AttemptId,
        link: L,
        /// The candidate's place in the order (0: the first choice).
        place: usize,
        eager: bool,
        timeout: Duration,
    },
    /// Wait until `until` for a link not among [`Race::tried`]; report with [`Race::add_links`].
    WaitForLinks { until: Instant },
    /// Wait for verdicts (and client bytes) until the timer, if any; report it with
    /// [`Race::timer`] when it fires first.
    Wait { timer: Option<(Instant, Timer)> },
    /// No candidate is left: the connection is refused.
    GiveUp,
}

/// The timers of a race.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timer {
    /// Time to ask the next candidate too (if the budget allows).
    Hedge,
    /// The attempt's deadline passed without a verdict.
    Expired(AttemptId),
}

/// How an attempt ended without winning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The server answered `Ok`.
    Ok,
    /// The server answered with a refusal (or a message it should not have).
    Refused,
    /// The stream or its tunnel was lost before a verdict.
    Lost,
}

/// What a verdict or a timer means for the driver.
#[derive(Debug, PartialEq, Eq)]
pub enum Decision {
    /// `winner` carries the connection; reset the `losers`.
    Won {
        winner: AttemptId,
        losers: Vec<AttemptId>,
    },
    /// The attempt `ended` is over: by its verdict, or, with `reset`, at its deadline (the
    /// driver resets its stream). `promote` (the one attempt left) may now carry early bytes.
    Lost {
        ended: AttemptId,
        reset: bool,
        promote: Option<AttemptId>,
    },
    /// Ask the next candidate: [`Race::poll`] starts it.
    Hedge,
    /// The hedge budget is spent: no more hedges for this connection.
    HedgeDenied,
    /// The link is dark: the attempt whose deadline passed waits on (see [`Race::set_dark`]).
    Held,
    /// Nothing to do.
    Nothing,
}

#[derive(Debug)]
struct Pending<L> {
    id: AttemptId,
    /// Its link and that link's place, for a second ask if it ends at its deadline.
    link: L,
    place: usize,
    started: Instant,
    deadline: Instant,
    /// When to hedge if this is the newest attempt and it has not answered.
    hedge_at: Option<Instant>,
}

/// An attempt between [`Step::Start`] and its report.
#[derive(Debug)]
struct Starting<L> {
    id: AttemptId,
    at: Instant,
    last: bool,
    link: L,
    place: usize,
}

/// One connection's open; `L` is the driver's handle of a link.
#[derive(Debug)]
pub struct Race<L> {
    timeouts: Timeouts,
    next: VecDeque<(usize, L)>,
    /// Candidates so far (the places of links added later follow on).
    count: usize,
    attempts: Vec<Pending<L>>,
    /// Links whose attempt ended at its deadline without an answer, to be asked once more
    /// when nothing else is left.
    unanswered: Vec<(usize, L)>,
    /// Those were asked again already.
    reasked: bool,
    /// An attempt to start at the next poll (a hedge).
    hedge_due: bool,
    tried: Vec<L>,
    tunnel_trouble: bool,
    retried: bool,
    may_hedge: bool,
    ids: AttemptId,
    /// The attempt the driver is starting, between `Step::Start` and its report.
    starting: Option<Starting<L>>,
    /// The link is dark (see [`Race::set_dark`]).
    dark: bool,
}

impl<L: Candidate> Race<L> {
    /// A race over `candidates`, best first.
    pub fn new(candidates: Vec<L>, timeouts: Timeouts) -> Self {
        Race {
            timeouts,
            count: candidates.len(),
            next: candidates.into_iter().enumerate().collect(),
            attempts: Vec::with_capacity(MAX_ATTEMPTS),
            unanswered: Vec::new(),
            reasked: false,
            hedge_due: false,
            tried: Vec::new(),
            tunnel_trouble: false,
            retried: false,
            may_hedge: true,
            ids: 0,
            starting: None,
            dark: false,
        }
    }

    /// Whether the link is dark now (every tunnel silent at once, or just back from that): the
    /// driver says so before it reports a timer.
    pub fn set_dark(&mut self, dark: bool) {
        self.dark = dark;
    }

    /// How many candidates there were at first.
    pub fn candidates(&self) -> usize {
        self.count
    }

    /// The links asked so far.
    pub fn tried(&self) -> &[L] {
        &self.tried
    }

    /// What to do next.
    pub fn poll(&mut self, now: Instant) -> Step<L> {
        debug_assert!(self.starting.is_none(), "a start was not reported");
        if self.attempts.is_empty() {
            if self.next.is_empty() && !self.unanswered.is_empty() && !self.reasked {
                self.reasked = true;
                self.next.extend(self.unanswered.drain(..));
            }
            if self.next.is_empty() && self.tunnel_trouble && !self.retried {
                self.retried = true;
                return Step::WaitForLinks {
                    until: now + self.timeouts.grace,
                };
            }
            // The only attempt: it may carry early bytes.
            return match self.start_next(now, true) {
                Some(step) => step,
                None => Step::GiveUp,
            };
        }
        if std::mem::take(&mut self.hedge_due) {
            if let Some(step) = self.start_next(now, false) {
                return step;
            }
        }
        Step::Wait {
            timer: self.timer_due(),
        }
    }

    fn start_next(&mut self, now: Instant, eager: bool) -> Option<Step<L>> {
        let (place, link) = self.next.pop_front()?;
        self.tried.push(link.clone());
        let timeout = if self.next.is_empty() {
            self.timeouts.last
        } else {
            self.timeouts.open
        };
        self.ids += 1;
        let id = self.ids;
        self.starting = Some(Starting {
            id,
            at: now,
            last: self.next.is_empty(),
            link: link.clone(),
            place,
        });
        Some(Step::Start {
            id,
            link,
            place,
            eager,
            timeout,
        })
    }

    /// The attempt `id` sent its `Open`; the next candidate is asked `hedge_after` later if it
    /// has not answered by then.
    pub fn started(&mut self, id: AttemptId, hedge_after: Duration) {
        let Some(st) = self.starting.take() else {
            return;
        };
        debug_assert_eq!(st.id, id);
        let timeout = if st.last {
            self.timeouts.last
        } else {
            self.timeouts.open
        };
        self.attempts.push(Pending {
            id,
            link: st.link,
            place: st.place,
            started: st.at,
            deadline: st.at + timeout,
            hedge_at: Some(st.at + hedge_after),
        });
    }

    /// The attempt `id` could not even send its `Open` (no stream, or not in time): a tunnel's
    /// trouble.
    pub fn start_failed(&mut self, id: AttemptId) {
        if let Some(st) = self.starting.take() {
            debug_assert_eq!(st.id, id);
        }
        self.tunnel_trouble = true;
    }

    /// After [`Step::WaitForLinks`]: the links now up (those tried already are skipped).
    pub fn add_links(&mut self, links: Vec<L>) {
        let fresh: Vec<L> = links
            .into_iter()
            .filter(|l| !self.tried.iter().any(|t| t.same(l)))
            .collect();
        let base = self.count;
        self.next
            .extend(fresh.into_iter().enumerate().map(|(i, l)| (base + i, l)));
    }

    /// The attempt `id`'s verdict.
    pub fn verdict(&mut self, id: AttemptId, verdict: Verdict) -> Decision {
        let Some(i) = self.attempts.iter().position(|a| a.id == id) else {
            return Decision::Nothing;
        };
        let a = self.attempts.swap_remove(i);
        if verdict == Verdict::Ok {
            let losers = self.attempts.drain(..).map(|l| l.id).collect();
            return Decision::Won {
                winner: a.id,
                losers,
            };
        }
        self.tunnel_trouble |= verdict == Verdict::Lost;
        Decision::Lost {
            ended: a.id,
            reset: false,
            promote: self.lone(),
        }
    }

    /// A timer of [`Step::Wait`] fired; `budget` is whether the hedge budget gives a hedge
    /// (asked only for [`Timer::Hedge`]).
    pub fn timer(&mut self, timer: Timer, budget: impl FnOnce() -> bool) -> Decision {
        match timer {
            Timer::Hedge => {
                if !self.hedge_possible() {
                    return Decision::Nothing;
                }
                if budget() {
                    self.hedge_due = true;
                    Decision::Hedge
                } else {
                    // Every server slow, not one dead: no more load on them from this
                    // connection.
                    self.may_hedge = false;
                    Decision::HedgeDenied
                }
            }
            Timer::Expired(id) => {
                let Some(i) = self.attempts.iter().position(|a| a.id == id) else {
                    return Decision::Nothing;
                };
                let a = &mut self.attempts[i];
                let held_until = a.started + self.timeouts.dark;
                if self.dark && a.deadline < held_until {
                    // The link is dark: held for another timeout, the tolerance at most.
                    a.deadline = (a.deadline + self.timeouts.open).min(held_until);
                    return Decision::Held;
                }
                let a = self.attempts.swap_remove(i);
                self.tunnel_trouble = true;
                // Not held to the tolerance: no answer is not a refusal, and the link may
                // answer a second ask.
                if a.deadline < held_until {
                    self.unanswered.push((a.place, a.link));
                }
                Decision::Lost {
                    ended: id,
                    reset: true,
                    promote: self.lone(),
                }
            }
        }
    }

    /// How long the attempt `id` has waited for its verdict.
    pub fn waited(&self, id: AttemptId, now: Instant) -> Option<Duration> {
        self.attempts
            .iter()
            .find(|a| a.id == id)
            .map(|a| now.saturating_duration_since(a.started))
    }

    /// Whether more candidates remain after the live attempts.
    pub fn more_left(&self) -> bool {
        !self.next.is_empty()
    }

    fn hedge_possible(&self) -> bool {
        self.may_hedge && self.attempts.len() < MAX_ATTEMPTS && !self.next.is_empty()
    }

    /// The one attempt left, if exactly one is.
    fn lone(&self) -> Option<AttemptId> {
        match self.attempts.as_slice() {
            [only] => Some(only.id),
            _ => None,
        }
    }

    /// The earliest timer: the newest attempt's hedge, or the oldest deadline.
    fn timer_due(&self) -> Option<(Instant, Timer)> {
        let hedge = self
            .hedge_possible()
            .then(|| self.attempts.last().and_then(|a| a.hedge_at))
            .flatten()
            .map(|at| (at, Timer::Hedge));
        let expiry = self
            .attempts
            .iter()
            .min_by_key(|a| a.deadline)
            .map(|a| (a.deadline, Timer::Expired(a.id)));
        match (hedge, expiry) {
            (Some(h), Some(e)) if h.0 < e.0 => Some(h),
            (h, None) => h,
            (_, e) => e,
        }
    }
}

#[cfg(test)]
mod tests {
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
}
