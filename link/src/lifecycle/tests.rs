use super::*;
use proptest::prelude::*;

const S: Duration = Duration::from_secs(1);
const Q: TransportKind = TransportKind::Quic;
const T: TransportKind = TransportKind::Tcp;

/// A made-up world around one served tunnel: a clock, the dialer's identity generation, and
/// what each dial of a transport gives.
struct World {
    now: Instant,
    identity: u64,
    quic_answers: bool,
    tcp_answers: bool,
    dial_takes: Duration,
    m: Lifecycle,
    /// What the driver holds beside, with the identity it was dialed with.
    held: Option<(Purpose, u64)>,
}

impl World {
    fn new(auto: bool, on: TransportKind) -> Self {
        let now = Instant::now();
        World {
            now,
            identity: 0,
            quic_answers: true,
            tcp_answers: true,
            dial_takes: S / 5,
            m: Lifecycle::new(now, auto, on, 0),
            held: None,
        }
    }

    /// Steps the machine once and carries out what it says, as `reconnect::serve` does;
    /// returns the action.
    fn turn(&mut self, doubted: bool) -> Action {
        let a = self.m.step(self.now, doubted, self.identity);
        match a {
            Action::Wait(until) => self.now = until.unwrap_or(self.now + 60 * S).max(self.now),
            Action::Dial { purpose, transport } => {
                assert!(
                    self.held.is_none(),
                    "a second tunnel dialed while one is held"
                );
                let with = self.identity;
                self.now += self.dial_takes;
                let ok = match transport {
                    TransportKind::Quic => self.quic_answers,
                    TransportKind::Tcp => self.tcp_answers,
                };
                if ok {
                    self.held = Some((purpose, with));
                }
                self.m.dialed(self.now, ok.then_some(with));
            }
            Action::Move(p) => {
                let held = self.held.take();
                assert_eq!(held.map(|h| h.0), Some(p), "moved to a tunnel not held");
                assert_eq!(
                    held.map(|h| h.1),
                    Some(self.identity),
                    "moved to an old identity"
                );
            }
            Action::Discard => {
                assert!(self.held.take().is_some(), "discarded nothing");
            }
        }
        a
    }

    /// Turns until the machine moves or `within` passes; returns the move and when.
    fn until_move(&mut self, within: Duration, doubted: bool) -> Option<(Purpose, Instant)> {
        let end = self.now + within;
        while self.now < end {
            if let Action::Move(p) = self.turn(doubted) {
                return Some((p, self.now));
            }
        }
        None
    }
}

#[test]
fn a_link_on_tcp_tries_quic_every_five_seconds_and_moves_when_it_answers() {
    let mut w = World::new(true, T);
    let start = w.now;
    w.quic_answers = false;
    let mut dials = Vec::new();
    while w.now < start + 16 * S {
        if let Action::Dial { transport, .. } = w.turn(false) {
            assert_eq!(transport, Q);
            dials.push(w.now - start);
        }
    }
    // Each try 5 s after the last one ended (the dial takes 200 ms).
    assert_eq!(dials.len(), 3, "{dials:?}");
    assert_eq!(dials[1] - dials[0], QUIC_RETRY + S / 5);
    w.quic_answers = true;
    let (p, _) = w.until_move(6 * S, false).expect("moved to QUIC");
    assert_eq!(p, Purpose::Quic);
}

#[test]
fn a_renewed_identity_is_dialed_at_once_over_the_same_transport_and_moved_to() {
    for on in [Q, T] {
        for auto in [false, true] {
            let mut w = World::new(auto, on);
            w.turn(false);
            w.identity = 1;
            let a = w.m.step(w.now, false, w.identity);
            assert_eq!(
                a,
                Action::Dial {
                    purpose: Purpose::Renewed,
                    transport: on
                }
            );
        }
    }
    // Failing dials are retried every second, then moved to.
    let mut w = World::new(false, Q);
    w.identity = 1;
    w.quic_answers = false;
    let start = w.now;
    let mut dials = 0;
    while w.now < start + 5 * S {
        if matches!(w.turn(false), Action::Dial { .. }) {
            dials += 1;
        }
    }
    assert_eq!(dials, 5, "one try every 1.2 s in 5 s");
    w.quic_answers = true;
    assert_eq!(
        w.until_move(2 * S, false).map(|m| m.0),
        Some(Purpose::Renewed)
    );
}

#[test]
fn a_link_not_in_auto_dials_only_for_a_renewal() {
    for on in [Q, T] {
        let mut w = World::new(false, on);
        // Doubted for a minute: no TCP beside, no QUIC try.
        for _ in 0..100 {
            assert!(matches!(w.turn(true), Action::Wait(_)));
        }
    }
}

#[test]
fn a_renewal_while_tcp_waits_beside_goes_first_and_the_tcp_tunnel_is_closed() {
    let mut w = World::new(true, Q);
    // Doubted from the start: a TCP tunnel is dialed after a second, and held through QUIC's
    // last chance.
    let mut dialed_tcp = false;
    while !dialed_tcp {
        dialed_tcp = matches!(
            w.turn(true),
            Action::Dial {
                purpose: Purpose::TcpBeside,
                ..
            }
        );
    }
    assert!(w.held.is_some());
    w.identity = 1;
    assert_eq!(w.turn(true), Action::Discard);
    assert_eq!(
        w.turn(true),
        Action::Dial {
            purpose: Purpose::Renewed,
            transport: Q
        }
    );
    assert_eq!(w.turn(true), Action::Move(Purpose::Renewed));
}

#[test]
fn a_dial_a_renewal_overtook_is_closed_and_the_renewal_dialed() {
    let mut w = World::new(true, T);
    w.now += QUIC_RETRY;
    let a = w.m.step(w.now, false, 0);
    assert!(matches!(
        a,
        Action::Dial {
            purpose: Purpose::Quic,
            ..
        }
    ));
    // The QUIC dial worked with identity 0, but a renewal came meanwhile.
    w.m.dialed(w.now, Some(0));
    assert_eq!(w.m.step(w.now, false, 1), Action::Discard);
    assert_eq!(
        w.m.step(w.now, false, 1),
        Action::Dial {
            purpose: Purpose::Renewed,
            transport: T
        }
    );
}

#[test]
fn a_retired_tunnel_closes_when_its_last_stream_ends() {
    let t0 = Instant::now();
    let mut r = Retiring::new(t0, false, 7);
    assert_eq!(r.step(t0, 2, false, 7), Retire::Wait(t0 + CHECK));
    // Never reset, however long the streams last, after any move but to TCP.
    assert!(matches!(
        r.step(t0 + 3600 * S, 1, false, 7),
        Retire::Wait(_)
    ));
    assert_eq!(r.step(t0 + 3600 * S, 0, false, 7), Retire::Close);
    assert_eq!(
        Retiring::new(t0, true, 7).step(t0, 3, true, 7),
        Retire::Close
    );
}

#[test]
fn quic_left_for_tcp_is_reset_only_if_it_stays_silent_through_the_grace() {
    let t0 = Instant::now();
    let mut silent = Retiring::new(t0, true, 7);
    assert!(matches!(
        silent.step(t0 + 9 * S, 1, false, 7),
        Retire::Wait(_)
    ));
    assert_eq!(silent.step(t0 + 10 * S, 1, false, 7), Retire::Reset);
    let mut heard = Retiring::new(t0, true, 7);
    assert!(matches!(
        heard.step(t0 + 2 * S, 1, false, 8),
        Retire::Wait(_)
    ));
    assert!(matches!(
        heard.step(t0 + 60 * S, 1, false, 8),
        Retire::Wait(_)
    ));
}

/// One thing that happens to the world between two turns.
#[derive(Debug, Clone)]
enum Happening {
    Turn { doubted: bool },
    Renew,
    QuicAnswers(bool),
    TcpAnswers(bool),
    DialTakes(u64),
}

fn happening() -> impl Strategy<Value = Happening> {
    prop_oneof![
        8 => any::<bool>().prop_map(|doubted| Happening::Turn { doubted }),
        1 => Just(Happening::Renew),
        1 => any::<bool>().prop_map(Happening::QuicAnswers),
        1 => any::<bool>().prop_map(Happening::TcpAnswers),
        1 => (0u64..15_000).prop_map(Happening::DialTakes),
    ]
}

proptest! {
    /// Whatever the doubt, renewals and dials do: at most one tunnel is held beside at a time,
    /// the link moves only to a tunnel it holds and that carries the identity it has now, a
    /// link not in `auto` never changes transport, and a renewal is dialed within
    /// [`RENEW_RETRY`] and one other dial of coming.
    #[test]
    fn the_lifecycle_keeps_its_promises(
        auto: bool,
        quic: bool,
        happenings in proptest::collection::vec(happening(), 1..300),
    ) {
        let mut on = if quic { Q } else { T };
        let mut w = World::new(auto, on);
        for h in happenings {
            match h {
                Happening::Turn { doubted } => {
                    let a = w.turn(doubted);
                    if let Action::Dial { purpose, transport } = a {
                        if !auto {
                            prop_assert_eq!(purpose, Purpose::Renewed);
                        }
                        if purpose == Purpose::Renewed {
                            prop_assert_eq!(transport, on);
                        }
                    }
                    if let Action::Move(p) = a {
                        // A move ends this tunnel's lifecycle: the next starts afresh.
                        let transport = match p {
                            Purpose::Renewed => on,
                            Purpose::Quic => Q,
                            Purpose::TcpBeside => T,
                        };
                        prop_assert!(auto || transport == on);
                        on = transport;
                        w.m = Lifecycle::new(w.now, auto, transport, w.identity);
                    }
                }
                Happening::Renew => w.identity += 1,
                Happening::QuicAnswers(b) => w.quic_answers = b,
                Happening::TcpAnswers(b) => w.tcp_answers = b,
                Happening::DialTakes(ms) => w.dial_takes = Duration::from_millis(ms),
            }
        }
        // Then a renewal, with every dial failing: it is dialed within RENEW_RETRY (a renewal
        // dial may just have failed) and one other dial (one may be due meanwhile).
        w.quic_answers = false;
        w.tcp_answers = false;
        w.identity += 1;
        let start = w.now;
        let mut renewed_at = None;
        for _ in 0..1000 {
            let then = w.now;
            if let Action::Dial { purpose: Purpose::Renewed, .. } = w.turn(false) {
                renewed_at = Some(then);
                break;
            }
        }
        let renewed_at = renewed_at.expect("a renewal is dialed");
        prop_assert!(renewed_at - start <= RENEW_RETRY + w.dial_takes + CHECK,
            "renewal dialed {:?} after it came", renewed_at - start);
    }
}
