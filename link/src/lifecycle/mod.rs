//! A link's lifecycle, as state machines of observations and time without I/O, in the manner of
//! quinn-proto: the reconnect loop (`reconnect::serve`) feeds them what it sees and carries out
//! what they return, and the tests drive them with made-up clocks.
//!
//! While a tunnel is served, [`Lifecycle`] decides when to dial a second tunnel to the same
//! server and when to move the link to it:
//!
//! - **a renewed identity**: a certificate renewed (or reloaded) since the tunnel was dialed;
//!   the server keeps only the previous key, so a tunnel that skipped a renewal would be closed
//!   with its streams at the next one. Dialed over the same transport at once, again every
//!   [`RENEW_RETRY`] until it works.
//! - **the move to QUIC**: a link in `auto` that fell back to TLS over TCP tries QUIC every
//!   [`QUIC_RETRY`].
//! - **the move to TCP**: a QUIC link in `auto` that lost UDP ([`MoveToTcp`] reads the
//!   liveness watch's doubt).
//!
//! At most one such tunnel is held at a time, and the link only ever moves to one dialed with
//! the identity it has now (a dial that a renewal overtook is closed, and the renewal dialed).
//!
//! The tunnel left behind is retired: [`Retiring`] says when it closes (its last stream ended)
//! and when, after a move to TCP, its streams are reset because QUIC stayed silent.

mod to_tcp;

pub use to_tcp::*;

use std::time::Duration;
use tether_transport::transport::TransportKind;
use tokio::time::Instant;

/// How often a link on TCP (in `auto`) tries to move to QUIC.
pub const QUIC_RETRY: Duration = Duration::from_secs(5);
/// How long after a failed dial with a renewed identity the next one.
pub const RENEW_RETRY: Duration = Duration::from_secs(1);
/// How often a QUIC link (in `auto`) looks whether the liveness watch doubts it, and a retired
/// tunnel whether its streams are done.
pub const CHECK: Duration = Duration::from_millis(100);
/// How long a QUIC tunnel left for TCP keeps its streams while nothing proves it alive (see
/// [`Retiring`]).
pub const QUIC_RETIRED_GRACE: Duration = Duration::from_secs(10);

/// Why a second tunnel to the same server is dialed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// The identity was renewed: the same transport, the new certificate.
    Renewed,
    /// A link on TCP moves to QUIC.
    Quic,
    /// A doubted QUIC link checks whether TCP answers (lost UDP).
    TcpBeside,
}

/// What the driver does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing until then (or until the identity changes; `None`: only then).
    Wait(Option<Instant>),
    /// Dial a tunnel over `transport`, then report it with [`Lifecycle::dialed`].
    Dial {
        purpose: Purpose,
        transport: TransportKind,
    },
    /// Move the link to the tunnel dialed for this purpose: new streams go there, and the one
    /// served now is retired.
    Move(Purpose),
    /// Close the tunnel held beside: QUIC answered after all, or a renewal overtook it.
    Discard,
}

/// The lifecycle of one served tunnel (see the module's doc).
#[derive(Debug, Clone)]
pub struct Lifecycle {
    /// The link is in `auto`, free to change transport.
    auto: bool,
    /// The served tunnel's transport.
    on: TransportKind,
    /// The identity generation the served tunnel was dialed with.
    dialed_with: u64,
    to_tcp: MoveToTcp,
    /// When the next try of QUIC is due (a link on TCP in `auto`).
    next_quic: Instant,
    /// No dial with a renewed identity before then (one just failed).
    renew_after: Instant,
    /// A dial is out, for this purpose.
    dialing: Option<Purpose>,
    /// A tunnel dialed for this purpose, with this identity, is held.
    held: Option<(Purpose, u64)>,
}

impl Lifecycle {
    /// A tunnel over `on`, dialed with identity generation `dialed_with`, served from `now`.
    pub fn new(now: Instant, auto: bool, on: TransportKind, dialed_with: u64) -> Self {
        Lifecycle {
            auto,
            on,
            dialed_with,
            to_tcp: MoveToTcp::default(),
            next_quic: now + QUIC_RETRY,
            renew_after: now,
            dialing: None,
            held: None,
        }
    }

    /// The next action, given whether the liveness watch doubts the tunnel and the identity
    /// generation the dialer has now.
    pub fn step(&mut self, now: Instant, doubted: bool, identity: u64) -> Action {
        if self.dialing.is_some() {
            // The dial's outcome moves the machine on.
            return Action::Wait(None);
        }
        let renewed = identity != self.dialed_with;
        if let Some((purpose, with)) = self.held {
            // A renewal overtook this dial (never move to an old identity), or came while a
            // TCP tunnel waits beside for QUIC's last chance: the renewal goes first, and
            // only one tunnel is held at a time.
            if with != identity || (renewed && purpose == Purpose::TcpBeside) {
                self.drop_held(now);
                return Action::Discard;
            }
            match purpose {
                Purpose::Renewed | Purpose::Quic => {
                    self.held = None;
                    return Action::Move(purpose);
                }
                // The move to TCP's own rule decides, below.
                Purpose::TcpBeside => {}
            }
        }
        if renewed && now >= self.renew_after {
            return self.dial(Purpose::Renewed, self.on);
        }
        // Still to renew, after a failed dial: the next try's time.
        let renew_at = renewed.then_some(self.renew_after);
        if !self.auto {
            return Action::Wait(renew_at);
        }
        match self.on {
            TransportKind::Quic => match self.to_tcp.check(now, doubted) {
                Step::Wait => Action::Wait(Some(earliest(now + CHECK, renew_at))),
                Step::DialTcp => self.dial(Purpose::TcpBeside, TransportKind::Tcp),
                Step::Move => match self.held.take() {
                    Some(_) => Action::Move(Purpose::TcpBeside),
                    None => Action::Wait(Some(now + CHECK)),
                },
                Step::KeepQuic => match self.held.take() {
                    Some(_) => Action::Discard,
                    None => Action::Wait(Some(now + CHECK)),
                },
            },
            TransportKind::Tcp if now >= self.next_quic => {
                self.dial(Purpose::Quic, TransportKind::Quic)
            }
            TransportKind::Tcp => Action::Wait(Some(earliest(self.next_quic, renew_at))),
        }
    }

    /// The dial asked for by [`Action::Dial`] ended: `Some(identity)` with the identity
    /// generation it was made with when it worked.
    pub fn dialed(&mut self, now: Instant, outcome: Option<u64>) {
        let Some(purpose) = self.dialing.take() else {
            return;
        };
        if purpose == Purpose::TcpBeside {
            self.to_tcp.dialed(now, outcome.is_some());
        }
        match outcome {
            Some(with) => self.held = Some((purpose, with)),
            None => match purpose {
                Purpose::Renewed => self.renew_after = now + RENEW_RETRY,
                Purpose::Quic => self.next_quic = now + QUIC_RETRY,
                Purpose::TcpBeside => {}
            },
        }
    }

    fn dial(&mut self, purpose: Purpose, transport: TransportKind) -> Action {
        self.dialing = Some(purpose);
        Action::Dial { purpose, transport }
    }

    /// Forgets the tunnel held beside, and starts over what it was for.
    fn drop_held(&mut self, now: Instant) {
        match self.held.take() {
            Some((Purpose::TcpBeside, _)) => self.to_tcp = MoveToTcp::default(),
            Some((Purpose::Quic, _)) => self.next_quic = now,
            _ => {}
        }
    }
}

fn earliest(a: Instant, b: Option<Instant>) -> Instant {
    b.map_or(a, |b| a.min(b))
}

/// What happens next to a retired tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retire {
    /// Look again then.
    Wait(Instant),
    /// Its streams are done (or it closed): close it.
    Close,
    /// Left for TCP, and QUIC stayed silent through the grace: UDP really is lost, the streams
    /// cannot be carried, reset them.
    Reset,
}

/// A tunnel the link moved away from: its open streams finish on it (a `kubectl exec` is not
/// cut by a renewal), and the server may still open a reverse stream on it before it learns of
/// the new tunnel.
///
/// After a move to TCP the streams stay too, since the move is a guess: TCP answering while
/// QUIC stays silent is lost UDP, or a QUIC connection whose retransmission backoff grew
/// through a blackout. The soak across a cellular link saw the second after a 4 s blackout
/// with a NAT rebinding in it: the streams were reset while QUIC was heard again seconds later.
/// So only a QUIC that acknowledges nothing new for [`QUIC_RETIRED_GRACE`] has its streams
/// reset.
#[derive(Debug, Clone)]
pub struct Retiring {
    /// Left for lost UDP: the answers counted when it was left, and the end of the grace.
    /// `None` once QUIC was heard, or for any other move.
    silent: Option<(u64, Instant)>,
}

impl Retiring {
    /// A tunnel retired at `now`; `udp_lost` after a move to TCP, `answers` its count of
    /// answers from the peer then.
    pub fn new(now: Instant, udp_lost: bool, answers: u64) -> Self {
        Retiring {
            silent: udp_lost.then_some((answers, now + QUIC_RETIRED_GRACE)),
        }
    }

    /// The next step, given the streams still open on it, whether it closed, and its count of
    /// answers from the peer.
    pub fn step(&mut self, now: Instant, streams: usize, closed: bool, answers: u64) -> Retire {
        if streams == 0 || closed {
            return Retire::Close;
        }
        if let Some((before, until)) = self.silent {
            if answers != before {
                // Heard: the streams finish on it, however long they take.
                self.silent = None;
            } else if now >= until {
                return Retire::Reset;
            }
        }
        Retire::Wait(now + CHECK)
    }
}

#[cfg(test)]
mod tests;
