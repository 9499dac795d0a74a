//! Dead server or dead link: the agent's verdict on its tunnels, as a state machine with no I/O
//! and no clock of its own.
//!
//! A tunnel that hears nothing is either on a dead server or on a dead link, and the two want
//! opposite answers. A dead server's streams must be reset at once, so that clients retry on a
//! server that works. A link that blacks out (a cellular handover, a roaming laptop, a dish
//! losing the satellite) takes every server away at once and brings them back seconds later:
//! resetting then would cut every `kubectl exec`, log and watch for nothing, and be the worst of
//! both, since no server could take the retries anyway.
//!
//! The rule: **a server is dead when it stays silent while another server keeps answering**.
//! Silence is measured from a question: a probe ([`Action::Probe`], a `Ping` on the control
//! stream) or data this end sent, unanswered. When one tunnel doubts, every tunnel is probed
//! often, so that the others' answers are fresh evidence: if they answer through a whole window
//! of [`Settings::dead_after`] (scaled up for long round trips) while the doubted one does not,
//! its server is dead. When every tunnel is silent, it is the link, and the tunnels are held for
//! [`Settings::tolerance`] (`--blackout-tolerance`). A server that a surviving server reports
//! down ([`Watch::reported`]) is probed at once and judged in a shorter window: the report is
//! itself the evidence that the rest of the control plane is alive.
//!
//! A busy, lossy edge link makes live servers fall silent too: a bottleneck queue kept full by
//! bulk transfers drops a quiet tunnel's packets more often than its share (a drop-tail queue
//! locks sparse flows out), a lost retransmission doubles the transport's backoff, and over
//! TLS/TCP a probe waits behind what the socket already holds. A live server can then be silent
//! for seconds while another tunnel, busy with a bulk transfer, answers all along, and silence
//! alone looks like death. So the machine remembers the longest silence a tunnel came back from
//! lately ([`SLOW_MEMORY`]; blackouts of every tunnel left out). On a link that has shown one
//! longer than the doubt window, an unreported silence is judged in [`SLOW_LINK_WINDOW`] (three
//! times the longest, 6 to 10 s): there the servers' reports are the evidence of a death, and
//! silence alone only a hint (new streams go elsewhere while a tunnel is in doubt). A reported
//! server is judged in its short window grown by that longest silence and a probe's interval,
//! up to [`MAX_GROWN_WINDOW`]. A link that never showed such a silence is judged in the windows
//! above.
//!
//! On an idle tunnel the machine probes only every [`Settings::idle_probe`]: often enough to
//! keep NAT bindings open, seldom enough that an idle tunnel costs a few hundred bytes a minute.
//!
//! The driver (the agent's link monitor) feeds it each tunnel's count of received packets (or
//! bytes) and sent ones every tick, with the time, and carries out the actions. The tests below
//! drive it by hand with made-up instants.

use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

/// The rules' timings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// How long a doubted tunnel may stay silent while another answers, at least (it grows to
    /// three round trips and a half second for long links).
    pub dead_after: Duration,
    /// How long a tunnel may stay silent when every tunnel is silent (a link blackout).
    pub tolerance: Duration,
    /// Probe an idle tunnel this often: NAT bindings stay open, and a server that died quietly
    /// is noticed at the next probe.
    pub idle_probe: Duration,
    /// While a tunnel is in doubt, probe every tunnel this often.
    pub doubt_probe: Duration,
    /// A question unanswered this long puts its tunnel in doubt (grown for long links too).
    pub doubt_after: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            dead_after: Duration::from_millis(2000),
            tolerance: Duration::from_secs(30),
            idle_probe: Duration::from_secs(25),
            doubt_probe: Duration::from_millis(250),
            doubt_after: Duration::from_millis(500),
        }
    }
}

/// How long the longest silence a live tunnel came back from is remembered: long enough to span
/// spells of congestion that come and go, short enough that a link that calmed down is soon
/// judged at its own pace again.
pub const SLOW_MEMORY: Duration = Duration::from_secs(120);

/// The most a slow link may stretch a verdict's window to (the blackout tolerance, if shorter):
/// a dead server's streams are reset within this even on the worst link.
pub const MAX_GROWN_WINDOW: Duration = Duration::from_secs(4);

/// The least and the most a server may stay silent, unreported, while another answers, on a
/// link that has shown slow answers (see [`Watch::unreported_window`]).
pub const SLOW_LINK_WINDOW: (Duration, Duration) =
    (Duration::from_secs(6), Duration::from_secs(10));

/// What one tunnel looks like at a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// Answers received so far (acknowledgements of what we sent, or data): any change means
    /// the server heard us.
    pub received: u64,
    /// Questions sent so far (data or a probe: what the server acknowledges or answers, never
    /// acknowledgements of ours): a change is a question the server should answer within a
    /// round trip.
    pub sent: u64,
    /// Answers to probes (`Pong`s) so far. While a tunnel is in doubt only these clear it: on
    /// a link that lost one direction, the server's packets (announcements, retransmissions,
    /// with acknowledgements of old packets in them) still arrive, but no answer to a probe.
    pub pongs: u64,
    /// The transport's smoothed round-trip time (zero when unknown).
    pub rtt: Duration,
    /// Packets the transport declared lost so far (zero when it cannot tell).
    pub lost: u64,
    /// The server sends on its own often (an older server's keepalives and heartbeats): its
    /// silence counts from when it was last heard, not from a question.
    pub beats: bool,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action<K> {
    /// Send a probe on this tunnel.
    Probe(K),
    /// The server is dead: close the tunnel, resetting its streams.
    DeadServer { key: K, silent: Duration },
    /// The link has been dark for longer than the tolerance: close the tunnel.
    LinkLost { key: K, silent: Duration },
}

/// What the machine knows of one tunnel.
#[derive(Debug, Clone, Copy)]
struct Tunnel {
    received: u64,
    sent: u64,
    pongs: u64,
    rtt: Duration,
    lost: u64,
    beats: bool,
    last_heard: Instant,
    /// The start of the current run of hearing it with no gap longer than the doubt window.
    streak_since: Instant,
    /// The first question since it was last heard.
    asked: Option<Instant>,
    last_probe: Option<Instant>,
    reported: Option<Instant>,
    /// A probe was asked for last tick and has not shown in the sent count yet.
    probe_unsent: bool,
    /// Its silence began in a blackout of every tunnel. After a blackout the transports come
    /// back one by one (each waits out its own retransmission backoff, seconds after a long
    /// outage), so another tunnel answering first proves nothing: only the tolerance judges it.
    in_blackout: bool,
}

impl Tunnel {
    /// When its silence began, if it is silent: a question unanswered, or (for a server that
    /// speaks on its own) its last word.
    fn silent_since(&self) -> Option<Instant> {
        if self.beats {
            return Some(self.last_heard);
        }
        self.asked
    }
}

/// A window of `base`, grown to three round trips and a half second on long links.
fn window(rtt: Duration, base: Duration) -> Duration {
    base.max(rtt * 3 + Duration::from_millis(500))
}

/// A verdict's window `base`, grown to `slow` (what the link's slow answers call for), but not
/// past [`MAX_GROWN_WINDOW`] or the blackout tolerance.
fn grown(s: &Settings, base: Duration, slow: Duration) -> Duration {
    base.max(slow.min(MAX_GROWN_WINDOW.min(s.tolerance)))
}

/// Whether a tunnel is in doubt: reported down, or silent for the doubt window.
fn in_doubt(s: &Settings, t: &Tunnel, now: Instant) -> bool {
    t.reported.is_some()
        || t.silent_since()
            .is_some_and(|since| now - since >= window(t.rtt, s.doubt_after))
}

/// The longest a tunnel may go unheard while probed in doubt and still count as answering.
fn alive_gap(s: &Settings, rtt: Duration) -> Duration {
    s.doubt_after.max(rtt * 2) + s.doubt_probe
}

/// The machine: one per agent, keyed by whatever names a tunnel (its id).
#[derive(Debug)]
pub struct Watch<K: Ord + Clone> {
    settings: Settings,
    tunnels: BTreeMap<K, Tunnel>,
    /// Since when every tunnel has been in doubt, if it has.
    all_in_doubt: Option<Instant>,
    /// The longest silence a tunnel came back from lately, on any tunnel (they share the node's
    /// link), and when (see [`SLOW_MEMORY`]).
    slowest: Option<(Instant, Duration)>,
    /// After a blackout, until when the transports are still catching up (see [`Watch::dark`]).
    recovering_until: Option<Instant>,
    /// When a transport last declared a packet lost (see [`Watch::unreported_window`]).
    lost_at: Option<Instant>,
}

/// The least and the most time the transports get to catch up after a blackout: as long again
/// as it lasted, within these.
pub const RECOVERY: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(10));

impl<K: Ord + Clone> Watch<K> {
    pub fn new(settings: Settings) -> Self {
        Watch {
            settings,
            tunnels: BTreeMap::new(),
            all_in_doubt: None,
            slowest: None,
            recovering_until: None,
            lost_at: None,
        }
    }

    /// The longest silence a tunnel came back from within [`SLOW_MEMORY`].
    fn slowest(&self, now: Instant) -> Duration {
        match self.slowest {
            Some((at, d)) if now - at <= SLOW_MEMORY => d,
            _ => Duration::ZERO,
        }
    }

    /// How long a tunnel may stay silent while another answers before its server is called
    /// dead without a report: [`Settings::dead_after`] on a calm link; on a slow one (within
    /// [`SLOW_MEMORY`], a live tunnel fell in doubt and came back, or a transport declared a
    /// packet lost) three times the longest silence seen, within [`SLOW_LINK_WINDOW`].
    ///
    /// On a slow link silence is weak evidence: the cellular hour saw live servers silent for
    /// 2 to 2.7 s beside a busy tunnel that answered, four times an hour, and their streams were
    /// reset for nothing. A link that loses packets is slow before any silence shows it: the
    /// quick soak across the same link saw a live server called dead a minute in, its first
    /// silence. (A server behind a dropped link loses no packet in the transport's count: with
    /// no acknowledgement coming back, QUIC declares nothing lost.) A server that truly dies is reported by the servers that survive it
    /// (their peer links sit on the masters' LAN and notice within their idle timeout) and is
    /// judged in the short reported window; so a long wait here costs only when one server is
    /// cut off from this node alone and still talks to its peers.
    fn unreported_window(&self, rtt: Duration, now: Instant) -> Duration {
        let s = &self.settings;
        let base = window(rtt, s.dead_after);
        let slowest = self.slowest(now);
        let lossy = self.lost_at.is_some_and(|at| now - at <= SLOW_MEMORY);
        if slowest < window(rtt, s.doubt_after) && !lossy {
            return base;
        }
        let slow = (slowest * 3).clamp(SLOW_LINK_WINDOW.0, SLOW_LINK_WINDOW.1);
        base.max(slow.min(s.tolerance))
    }

    /// A tunnel answered after a silence of `delay`: kept if it is the longest within memory.
    fn answered_after(&mut self, now: Instant, delay: Duration) {
        if delay >= self.slowest(now) {
            self.slowest = Some((now, delay));
        }
    }

    /// A surviving server said this tunnel's server is down: probe it now, judge it soon.
    pub fn reported(&mut self, key: &K, now: Instant) {
        if let Some(t) = self.tunnels.get_mut(key) {
            t.reported = Some(now);
        }
    }

    /// Whether the link is dark: every tunnel silent at once (a blackout, not a server), or
    /// back from a blackout so recently that the transports are still catching up. An open in
    /// flight then waits for the link rather than giving up (see the agent's race).
    ///
    /// After a blackout each transport is heard again only at its next retransmission, whose
    /// backoff grew through the blackout: an open sent in the dark is answered seconds after
    /// the first tunnel is. The hour across a cellular link saw one given up 2 s after a 4 s
    /// blackout. So the link counts as dark for as long again as the blackout lasted
    /// ([`RECOVERY`] bounds it) once a tunnel is heard.
    pub fn dark(&self, now: Instant) -> bool {
        self.all_in_doubt.is_some() || self.recovering_until.is_some_and(|until| now < until)
    }

    /// Whether a tunnel is in doubt now (new streams should prefer others).
    pub fn doubted(&self, key: &K, now: Instant) -> bool {
        self.tunnels
            .get(key)
            .is_some_and(|t| in_doubt(&self.settings, t, now))
    }

    /// One tick: the tunnels as they are now (any tunnel not listed is gone), and what to do.
    pub fn tick(&mut self, now: Instant, samples: &[(K, Sample)]) -> Vec<Action<K>> {
        let s = self.settings;
        self.tunnels
            .retain(|k, _| samples.iter().any(|(key, _)| key == k));
        let mut lost_now = false;
        for (key, sample) in samples {
            // A new tunnel starts from zero, not from its first sample: what it sent before
            // the first tick (a request made the moment it came up) is a question too.
            let t = self.tunnels.entry(key.clone()).or_insert(Tunnel {
                received: 0,
                sent: 0,
                pongs: 0,
                rtt: sample.rtt,
                lost: 0,
                beats: sample.beats,
                last_heard: now,
                streak_since: now,
                asked: None,
                last_probe: None,
                reported: None,
                probe_unsent: false,
                in_blackout: false,
            });
            t.rtt = sample.rtt;
            t.beats = sample.beats;
            if sample.lost > t.lost {
                lost_now = true;
            }
            t.lost = sample.lost;
            // Answers first, then questions: a question sent in the same tick as an answer is
            // still open (the answer was to something earlier). One exception: the probe this
            // machine asked for last tick leaves in that tick's count, and on a fast link its
            // answer comes back within the same tick; it is not a new question.
            let answered = if t.beats || !in_doubt(&s, t, now) {
                sample.received != t.received || sample.pongs != t.pongs
            } else {
                sample.pongs != t.pongs
            };
            t.received = sample.received;
            t.pongs = sample.pongs;
            // The silence a live server came back from, unless the whole link was dark (a
            // blackout's length says nothing of how long a live server may be silent beside
            // others that answer).
            let came_back = (answered && !t.in_blackout && self.all_in_doubt.is_none())
                .then(|| t.silent_since().map(|since| now - since))
                .flatten();
            if answered {
                // A gap longer than the doubt window breaks the streak: the tunnel was not
                // known to be alive through it.
                if now - t.last_heard > alive_gap(&s, t.rtt) {
                    t.streak_since = now;
                }
                t.last_heard = now;
                t.asked = None;
                t.reported = None;
                t.in_blackout = false;
            }
            if sample.sent != t.sent {
                t.sent = sample.sent;
                let probe_answered = t.probe_unsent && answered;
                // Only what asks for an answer is counted (the driver leaves acknowledgements
                // out): a question asked just after an answer is a question all the same.
                if t.asked.is_none() && !probe_answered {
                    t.asked = Some(now);
                }
            }
            t.probe_unsent = false;
            if let Some(d) = came_back {
                self.answered_after(now, d);
            }
        }
        if lost_now {
            self.lost_at = Some(now);
        }
        // Every tunnel in doubt at once, for longer than probes take to clear a doubt: the
        // link, not the servers. (Tunnels asked at the same moment fall in doubt together
        // without a blackout, such as new ones, whose first sample is a question; the first
        // probe's answer clears those.)
        let rtt = self
            .tunnels
            .values()
            .map(|t| t.rtt)
            .max()
            .unwrap_or_default();
        let blackout_after = window(rtt, s.doubt_probe * 2);
        if !self.tunnels.is_empty()
            && self
                .tunnels
                .values()
                .all(|t| in_doubt(&self.settings, t, now))
        {
            let since = *self.all_in_doubt.get_or_insert(now);
            if now - since >= blackout_after {
                for t in self.tunnels.values_mut() {
                    t.in_blackout = true;
                }
            }
        } else if let Some(since) = self.all_in_doubt.take() {
            let lasted = now - since;
            // Only a blackout: not tunnels that fell in doubt together for a probe's time.
            if lasted >= blackout_after {
                self.recovering_until = Some(now + lasted.clamp(RECOVERY.0, RECOVERY.1));
            }
        }
        let mut actions = Vec::new();
        let any_doubt = self
            .tunnels
            .values()
            .any(|t| in_doubt(&self.settings, t, now));
        let keys: Vec<K> = self.tunnels.keys().cloned().collect();
        for key in &keys {
            let Some(t) = self.tunnels.get(key).copied() else {
                continue;
            };
            let probe_every = if any_doubt || t.reported.is_some() {
                s.doubt_probe
            } else {
                s.idle_probe
            };
            let last = t.last_probe.map_or(t.last_heard, |p| p.max(t.last_heard));
            let report_unprobed = t
                .reported
                .is_some_and(|r| t.last_probe.is_none_or(|p| p < r));
            let due = report_unprobed || now - last >= probe_every;
            if due {
                if let Some(t) = self.tunnels.get_mut(key) {
                    t.last_probe = Some(now);
                    t.probe_unsent = true;
                    if t.asked.is_none() {
                        t.asked = Some(now);
                    }
                }
                actions.push(Action::Probe(key.clone()));
            }
        }
        for key in &keys {
            let Some(t) = self.tunnels.get(key).copied() else {
                continue;
            };
            let Some(since) = t.silent_since() else {
                continue;
            };
            let silent = now - since;
            if silent >= s.tolerance {
                actions.push(Action::LinkLost {
                    key: key.clone(),
                    silent,
                });
                continue;
            }
            // Reported down by a server that survives it: dead once silent for a short window
            // (grown to the link's longest silence lately and a probe's interval) since a
            // question. A question left unanswered since before the report is two witnesses
            // at once, the agent's and the peers': a server killed under a request is closed
            // as soon as the report comes. Otherwise the probe sent at the report has a round
            // trip (a probe's interval at least) to be answered.
            let slowest = self.slowest(now);
            if let Some(at) = t.reported {
                let asked = t.asked.unwrap_or(at);
                let window = grown(&s, window(t.rtt, s.doubt_after), slowest + s.doubt_probe);
                let probed = (t.rtt * 2).max(s.doubt_probe);
                if now - asked >= window && (asked < at || now - at >= probed) {
                    actions.push(Action::DeadServer {
                        key: key.clone(),
                        silent,
                    });
                    continue;
                }
            }
            // Silent through a whole window in which another tunnel kept answering.
            if t.in_blackout {
                continue;
            }
            let window = self.unreported_window(t.rtt, now);
            let witnessed = self.tunnels.iter().any(|(k, o)| {
                k != key
                    && now - o.last_heard <= alive_gap(&s, o.rtt)
                    && now - since.max(o.streak_since) >= window
            });
            if witnessed {
                actions.push(Action::DeadServer {
                    key: key.clone(),
                    silent,
                });
            }
        }
        actions
    }
}

#[cfg(test)]
mod tests;
