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

    /// Tunnels are up but none may be asked now (every server draining, or the usable ones gone
    /// a moment ago): wait once, for the reconnect grace, for a link that may, as when every
    /// tunnel asked failed together. The cellular soak's rolling restart met it: one server
    /// restarting, one draining, the third not yet reconnected across the link; a new
    /// connection was reset at once, and a tunnel came up 0.2 s later.
    pub fn none_usable(&mut self) {
        if self.next.is_empty() && self.attempts.is_empty() {
            self.tunnel_trouble = true;
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
mod tests;
