//! When a QUIC link in `auto` moves to TLS over TCP: the part of the link's lifecycle
//! ([`super::Lifecycle`]) that reads the liveness watch's doubt.
//!
//! A QUIC tunnel the liveness watch doubts may have lost UDP alone (a firewall that starts
//! dropping it), which looks like a blackout from here. A TCP tunnel to the same server tells
//! them apart, but only if read with care:
//!
//! - a doubt that one probe clears is no sign of a lost path (a new tunnel starts in doubt
//!   until its first answer): TCP is tried only after [`DOUBT_BEFORE_TCP`] of doubt;
//! - TCP answering is lost UDP only if QUIC stays silent: after a blackout of the whole link
//!   (and a NAT that rebound in it) a new TCP handshake is answered at once, while QUIC is
//!   heard again only at its next retransmission, whose backoff grew through the blackout. The
//!   soak across a cellular link saw tunnels moved, and their streams reset, 0.6 s after a
//!   3.6 s blackout. So QUIC gets as long again as the doubt has lasted (1 to
//!   [`QUIC_RECOVERY_MAX`]) to answer before the link moves.

use std::time::Duration;
use tokio::time::Instant;

/// How long a QUIC link stays in doubt before a TCP tunnel is tried beside it.
pub const DOUBT_BEFORE_TCP: Duration = Duration::from_secs(1);
/// The least and the most a doubted QUIC link is given to answer once a TCP tunnel beside it
/// did.
pub const QUIC_RECOVERY_MIN: Duration = Duration::from_secs(1);
pub const QUIC_RECOVERY_MAX: Duration = Duration::from_secs(10);
/// How long after a TCP dial that failed (or a QUIC that answered after all) the rule starts
/// over.
pub const RETRY_AFTER: Duration = Duration::from_secs(1);

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Nothing yet: look again at the next check.
    Wait,
    /// Dial a TCP tunnel to the same server, then report it with [`MoveToTcp::dialed`].
    DialTcp,
    /// TCP answers and QUIC stayed silent through its recovery: move the link to TCP.
    Move,
    /// QUIC answered after all: close the TCP tunnel dialed for nothing.
    KeepQuic,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// QUIC is trusted (or the rule rests until `until` after a try).
    Trusting { until: Option<Instant> },
    /// QUIC has been in doubt since then.
    Doubting { since: Instant },
    /// A TCP tunnel is being dialed for a doubt that began then.
    Dialing { since: Instant },
    /// TCP answered; QUIC has until then to be heard.
    Recovering { until: Instant },
}

/// The rule for one QUIC link: feed it whether the link is in doubt at each check.
#[derive(Debug, Clone)]
pub struct MoveToTcp {
    state: State,
}

impl Default for MoveToTcp {
    fn default() -> Self {
        MoveToTcp {
            state: State::Trusting { until: None },
        }
    }
}

impl MoveToTcp {
    /// One check: whether the liveness watch doubts the QUIC link now.
    pub fn check(&mut self, now: Instant, doubted: bool) -> Step {
        match self.state {
            State::Trusting { until } => {
                if doubted && until.is_none_or(|u| now >= u) {
                    self.state = State::Doubting { since: now };
                }
                Step::Wait
            }
            State::Doubting { since } => {
                if !doubted {
                    self.state = State::Trusting { until: None };
                    Step::Wait
                } else if now - since >= DOUBT_BEFORE_TCP {
                    self.state = State::Dialing { since };
                    Step::DialTcp
                } else {
                    Step::Wait
                }
            }
            // The dial's outcome moves the machine on.
            State::Dialing { .. } => Step::Wait,
            State::Recovering { until } => {
                if !doubted {
                    self.state = State::Trusting {
                        until: Some(now + RETRY_AFTER),
                    };
                    Step::KeepQuic
                } else if now >= until {
                    self.state = State::Trusting { until: None };
                    Step::Move
                } else {
                    Step::Wait
                }
            }
        }
    }

    /// The TCP dial asked for by [`Step::DialTcp`] ended: `ok` if TCP answered.
    pub fn dialed(&mut self, now: Instant, ok: bool) {
        let State::Dialing { since } = self.state else {
            return;
        };
        self.state = if ok {
            let recovery = (now - since).clamp(QUIC_RECOVERY_MIN, QUIC_RECOVERY_MAX);
            State::Recovering {
                until: now + recovery,
            }
        } else {
            State::Trusting {
                until: Some(now + RETRY_AFTER),
            }
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TICK: Duration = Duration::from_millis(100);

    /// Runs the rule every tick for `d`, the link doubted as `doubted` says (from the start),
    /// the TCP dial taking `dial` and answering as `tcp_ok`; returns what it decided, and when.
    fn run(
        d: Duration,
        doubted: impl Fn(Duration) -> bool,
        dial: Duration,
        tcp_ok: bool,
    ) -> Vec<(Duration, Step)> {
        let start = Instant::now();
        let mut m = MoveToTcp::default();
        let mut out = Vec::new();
        let mut dial_ends = None;
        let mut t = Duration::ZERO;
        while t <= d {
            let now = start + t;
            if dial_ends.is_some_and(|e| now >= e) {
                m.dialed(now, tcp_ok);
                dial_ends = None;
            }
            let step = m.check(now, doubted(t));
            if step != Step::Wait {
                out.push((t, step));
            }
            if step == Step::DialTcp {
                dial_ends = Some(now + dial);
            }
            if step == Step::Move {
                break;
            }
            t += TICK;
        }
        out
    }

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_doubt_one_probe_clears_dials_nothing() {
        // In doubt for half a second now and then: never a TCP dial.
        let steps = run(20 * S, |t| t.as_millis() % 5000 < 500, S / 2, true);
        assert!(steps.is_empty(), "{steps:?}");
    }

    #[test]
    fn lost_udp_moves_to_tcp_after_the_doubt_and_as_long_again() {
        // QUIC silent from 2 s on; TCP answers 200 ms after the dial.
        let steps = run(20 * S, |t| t >= 2 * S, S / 5, true);
        assert_eq!(steps[0], (3 * S, Step::DialTcp), "{steps:?}");
        // Dialed at 3 s after 1 s of doubt, answered at 3.2 s: QUIC gets 1.2 s more.
        assert_eq!(steps[1].1, Step::Move, "{steps:?}");
        assert_eq!(steps[1].0, Duration::from_millis(4400), "{steps:?}");
    }

    #[test]
    fn quic_heard_in_its_recovery_keeps_the_link_on_quic() {
        // A 3.6 s blackout from 2 s: TCP answers as it ends, QUIC 1.5 s later.
        let steps = run(
            20 * S,
            |t| t >= 2 * S && t < Duration::from_millis(7100),
            Duration::from_millis(2600),
            true,
        );
        assert_eq!(steps.len(), 2, "{steps:?}");
        assert_eq!(steps[0], (3 * S, Step::DialTcp));
        assert_eq!(steps[1].1, Step::KeepQuic, "{steps:?}");
    }

    #[test]
    fn the_recovery_is_at_most_ten_seconds() {
        // QUIC silent for good; the TCP dial itself takes 30 s to answer.
        let steps = run(60 * S, |t| t >= S, 30 * S, true);
        let dialed = steps[0].0;
        let moved = steps.iter().find(|s| s.1 == Step::Move).map(|s| s.0);
        assert_eq!(
            moved,
            Some(dialed + 30 * S + QUIC_RECOVERY_MAX),
            "{steps:?}"
        );
    }

    #[test]
    fn a_failed_dial_rests_a_second_and_tries_again() {
        let steps = run(10 * S, |t| t >= S, S / 5, false);
        let dials: Vec<Duration> = steps
            .iter()
            .filter(|s| s.1 == Step::DialTcp)
            .map(|s| s.0)
            .collect();
        assert!(dials.len() >= 3, "{steps:?}");
        // Dial, 200 ms, a second of rest, a second of doubt: one every 2.2 s.
        assert_eq!(
            dials[1] - dials[0],
            Duration::from_millis(2200),
            "{steps:?}"
        );
        assert!(steps.iter().all(|s| s.1 != Step::Move));
    }
}
