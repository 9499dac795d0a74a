//! How long a server takes to answer an open, learnt from the answers, and how long to wait for
//! one before asking another server too (a hedged open).
//!
//! The estimate is TCP's retransmission timer (RFC 6298): a smoothed mean and a smoothed mean
//! deviation of the samples; the hedge waits for the mean plus four deviations, so that an
//! answer as slow as the slowest few in a hundred still arrives before the hedge. Before any
//! sample, the transport's own round-trip time stands in (three of them: the open, the server's
//! upstream connect, the answer); over TCP, which has none, the configured open timeout.

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The least a hedge waits: below it, the scheduler's noise would open two streams for every
/// connection on a fast network.
pub const HEDGE_FLOOR: Duration = Duration::from_millis(5);

#[derive(Debug, Default)]
pub struct OpenLatency(Mutex<Option<Estimate>>);

#[derive(Debug, Clone, Copy)]
struct Estimate {
    /// Smoothed answer time, seconds.
    mean: f64,
    /// Smoothed mean deviation, seconds.
    deviation: f64,
}

impl OpenLatency {
    /// One answer took `sample`.
    pub fn record(&self, sample: Duration) {
        let s = sample.as_secs_f64();
        let mut e = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *e = Some(match *e {
            None => Estimate {
                mean: s,
                deviation: s / 2.0,
            },
            Some(Estimate { mean, deviation }) => Estimate {
                deviation: 0.75 * deviation + 0.25 * (mean - s).abs(),
                mean: 0.875 * mean + 0.125 * s,
            },
        });
    }

    /// How long to wait for an answer before hedging: the estimate's mean plus four deviations,
    /// else three transport round trips, within `[HEDGE_FLOOR, ceiling]`; `ceiling` (the open
    /// timeout) when nothing is known.
    pub fn hedge_delay(&self, rtt: Duration, ceiling: Duration) -> Duration {
        let e = *self.0.lock().unwrap_or_else(|p| p.into_inner());
        let wait = match e {
            Some(Estimate { mean, deviation }) => {
                Duration::from_secs_f64((mean + 4.0 * deviation).max(0.0))
            }
            None if !rtt.is_zero() => rtt * 3,
            None => ceiling,
        };
        wait.clamp(HEDGE_FLOOR.min(ceiling), ceiling)
    }
}

/// How long a server that let a hedge beat it is tried last: long enough for the agent to see a
/// dead server's tunnel close (about 2 s), short enough that a server
/// that was only slow for a moment gets its share back soon.
pub const PASSED_OVER_FOR: Duration = Duration::from_secs(5);

/// Whether a server lately sat on an open that another server then answered: such a server is
/// tried last for a while, so that the connections after the first one do not each wait for a
/// hedge.
#[derive(Debug, Default)]
pub struct Passed(Mutex<Option<Instant>>);

impl Passed {
    /// Another server answered an open this one had not answered.
    pub fn over(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
    }

    /// This server answered an open: it is tried in its turn again.
    pub fn answered(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// Whether the server is passed over now.
    pub fn now(&self) -> bool {
        let mut p = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match *p {
            Some(at) if at.elapsed() < PASSED_OVER_FOR => true,
            Some(_) => {
                *p = None;
                false
            }
            None => false,
        }
    }
}

/// How many hedges an agent may send: a tenth of its opens, plus a burst of ten. A hedge adds
/// an open to a second server; when every server is slow (overloaded, not dead), hedging every
/// open would double their load exactly when they can least carry it. A dead server needs only
/// the first hedge: the server that lost to it is then passed over ([`Passed`]).
#[derive(Debug)]
pub struct HedgeBudget(Mutex<f64>);

impl HedgeBudget {
    /// Hedges earned per open.
    pub const RATIO: f64 = 0.1;
    /// Most hedges saved up.
    pub const BURST: f64 = 10.0;

    /// An open was made.
    pub fn opened(&self) {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *t = (*t + Self::RATIO).min(Self::BURST);
    }

    /// Takes one hedge if the budget has one.
    pub fn take(&self) -> bool {
        let mut t = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if *t >= 1.0 {
            *t -= 1.0;
            true
        } else {
            false
        }
    }
}

impl Default for HedgeBudget {
    fn default() -> Self {
        HedgeBudget(Mutex::new(Self::BURST))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_hedge_waits_for_the_slow_answers_not_more() {
        let l = OpenLatency::default();
        let ceiling = 500 * MS;
        assert_eq!(
            l.hedge_delay(Duration::ZERO, ceiling),
            ceiling,
            "nothing known"
        );
        assert_eq!(l.hedge_delay(4 * MS, ceiling), 12 * MS, "three round trips");
        for _ in 0..50 {
            l.record(20 * MS);
        }
        let steady = l.hedge_delay(Duration::ZERO, ceiling);
        assert!(steady >= 20 * MS && steady < 25 * MS, "{steady:?}");
        // Jitter widens the wait.
        for i in 0..50 {
            l.record(if i % 2 == 0 { 10 * MS } else { 30 * MS });
        }
        let jittery = l.hedge_delay(Duration::ZERO, ceiling);
        assert!(jittery > 45 * MS && jittery < 80 * MS, "{jittery:?}");
        // Never below the floor, never above the ceiling.
        let fast = OpenLatency::default();
        fast.record(Duration::from_micros(100));
        assert_eq!(fast.hedge_delay(Duration::ZERO, ceiling), HEDGE_FLOOR);
        let slow = OpenLatency::default();
        slow.record(10 * ceiling);
        assert_eq!(slow.hedge_delay(Duration::ZERO, ceiling), ceiling);
    }

    #[test]
    fn hedges_are_a_tenth_of_the_opens_after_a_burst() {
        let b = HedgeBudget::default();
        let mut hedged = 0;
        for _ in 0..1000 {
            b.opened();
            if b.take() {
                hedged += 1;
            }
        }
        assert!((100..=111).contains(&hedged), "{hedged}");
    }

    #[test]
    fn a_passed_over_server_is_tried_in_its_turn_once_it_answers() {
        let p = Passed::default();
        assert!(!p.now());
        p.over();
        assert!(p.now());
        p.answered();
        assert!(!p.now());
    }
}
