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
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// A simulated agent: tunnels whose servers answer or not, ticking every 50 ms.
    struct Sim {
        watch: Watch<u32>,
        now: Instant,
        /// Per tunnel: (received, sent, answering, pongs).
        tunnels: BTreeMap<u32, (u64, u64, bool, u64)>,
        /// Tunnels whose link lost the agent-to-server direction: the server's own packets
        /// still arrive (as received), its answers to probes do not.
        one_way: Vec<u32>,
        /// Probes sent, awaiting an answer, per tunnel: when they will be answered.
        /// (Probes are answered with a `Pong`; requests only with data.)
        pending: Vec<(u32, Instant, bool)>,
        rtt: Duration,
        /// Per tunnel, how much longer than the round trip its answers take (a queue).
        extra: BTreeMap<u32, Duration>,
        /// Per tunnel, packets its transport declared lost.
        lost: BTreeMap<u32, u64>,
        log: Vec<(Duration, Action<u32>)>,
        start: Instant,
    }

    impl Sim {
        fn new(n: u32, rtt: Duration) -> Sim {
            let now = Instant::now();
            Sim {
                watch: Watch::new(Settings::default()),
                now,
                tunnels: (0..n).map(|k| (k, (0, 0, true, 0))).collect(),
                one_way: Vec::new(),
                pending: Vec::new(),
                rtt,
                extra: BTreeMap::new(),
                lost: BTreeMap::new(),
                log: Vec::new(),
                start: now,
            }
        }

        fn set_answering(&mut self, key: u32, answering: bool) {
            if let Some(t) = self.tunnels.get_mut(&key) {
                t.2 = answering;
            }
        }

        /// Data sent on a tunnel (a request): a question its server answers in a round trip.
        fn send(&mut self, key: u32) {
            self.ask(key, false);
        }

        fn ask(&mut self, key: u32, probe: bool) {
            if let Some(t) = self.tunnels.get_mut(&key) {
                t.1 += 1;
            }
            let extra = self.extra.get(&key).copied().unwrap_or_default();
            self.pending.push((key, self.now + self.rtt + extra, probe));
        }

        /// Runs for `d` with a request on each of `keys` every 250 ms.
        fn load(&mut self, keys: &[u32], d: Duration) {
            let end = self.now + d;
            while self.now < end {
                for &k in keys {
                    self.send(k);
                }
                self.run_for(250 * MS);
            }
        }

        fn run_for(&mut self, d: Duration) {
            let end = self.now + d;
            while self.now < end {
                self.now += 50 * MS;
                let now = self.now;
                let mut answered = Vec::new();
                self.pending.retain(|(k, at, probe)| {
                    if *at <= now {
                        answered.push((*k, *probe));
                        false
                    } else {
                        true
                    }
                });
                for (k, probe) in answered {
                    if let Some(t) = self.tunnels.get_mut(&k) {
                        if t.2 {
                            t.0 += 1;
                            t.3 += u64::from(probe);
                        }
                    }
                }
                // The server's announcements and retransmissions keep arriving, now and then.
                if (now - self.start).as_millis() % 700 < 50 {
                    for k in &self.one_way {
                        if let Some(t) = self.tunnels.get_mut(k) {
                            t.0 += 1;
                        }
                    }
                }
                let samples: Vec<(u32, Sample)> = self
                    .tunnels
                    .iter()
                    .map(|(k, t)| {
                        (
                            *k,
                            Sample {
                                received: t.0,
                                sent: t.1,
                                pongs: t.3,
                                rtt: self.rtt,
                                lost: self.lost.get(k).copied().unwrap_or(0),
                                beats: false,
                            },
                        )
                    })
                    .collect();
                for a in self.watch.tick(now, &samples) {
                    match &a {
                        Action::Probe(k) => {
                            let k = *k;
                            self.ask(k, true);
                        }
                        Action::DeadServer { key, .. } | Action::LinkLost { key, .. } => {
                            let key = *key;
                            self.tunnels.remove(&key);
                            self.log.push((now - self.start, a.clone()));
                        }
                    }
                }
            }
        }

        /// `silent` tunnels lose every packet for `d` (a lockout, or with all of them a
        /// blackout) while requests go out on all three; then they answer again.
        fn silence(&mut self, silent: &[u32], d: Duration) {
            for &k in silent {
                self.set_answering(k, false);
            }
            self.load(&[0, 1, 2], d);
            for &k in silent {
                self.set_answering(k, true);
            }
        }

        /// Tunnel `key`'s server dies under a request while `busy` tunnels keep carrying
        /// requests (none: they are only probed) for `wait`; checks that the one verdict is on
        /// it, and returns how long after the death it came.
        fn death_noticed(&mut self, key: u32, busy: &[u32], wait: Duration) -> Duration {
            self.set_answering(key, false);
            let died = self.now - self.start;
            self.send(key);
            if busy.is_empty() {
                self.run_for(wait);
            } else {
                self.load(busy, wait);
            }
            let v = self.verdicts();
            assert_eq!(v.len(), 1, "{v:?}");
            assert!(
                matches!(v[0].1, Action::DeadServer { key: k, .. } if k == key),
                "{v:?}"
            );
            v[0].0 - died
        }

        fn probes(&self) -> usize {
            self.tunnels.values().map(|t| t.1 as usize).sum()
        }

        fn verdicts(&self) -> Vec<(Duration, Action<u32>)> {
            self.log.clone()
        }
    }

    #[test]
    fn an_idle_tunnel_is_probed_only_every_idle_probe() {
        let mut sim = Sim::new(3, 50 * MS);
        sim.run_for(Duration::from_secs(120));
        // Three tunnels, one probe each every 25 s: 4 each in two minutes.
        assert_eq!(sim.probes(), 12);
        assert!(sim.verdicts().is_empty());
    }

    #[test]
    fn a_server_silent_while_others_answer_is_dead_within_three_seconds() {
        let mut sim = Sim::new(3, 50 * MS);
        sim.run_for(Duration::from_secs(10));
        // A request on the dead server's tunnel is the question nobody answers.
        let took = sim.death_noticed(1, &[], Duration::from_secs(5));
        assert!(took <= Duration::from_secs(3), "{took:?}");
    }

    /// The soak across an emulated cellular link found this: a bottleneck queue kept full by
    /// bulk transfers made live servers silent for 1.5 s (then the window) now and then while
    /// other tunnels answered, and the agent reset their streams. On a link that has shown
    /// such silences, an unreported one is judged in the slow link's window; a server that
    /// truly dies unreported is still found, later.
    #[test]
    fn a_slow_answer_on_a_congested_link_is_not_death() {
        let mut sim = Sim::new(3, 60 * MS);
        sim.load(&[0, 1, 2], Duration::from_secs(10));
        // Tunnel 1's packets are locked out of the queue now and then (dropped, each of
        // them), while the others' answers keep coming; then its retransmissions get through.
        // First for 1.5 s: under the first window (2 s), and the machine learns the link's
        // ways.
        sim.silence(&[1], 1500 * MS);
        sim.load(&[0, 1, 2], Duration::from_secs(10));
        // Then for 2.5 s, longer than the first window: a live server all the same.
        sim.silence(&[1], 2500 * MS);
        sim.load(&[0, 2], Duration::from_secs(2));
        sim.load(&[0, 1, 2], Duration::from_secs(10));
        assert!(sim.verdicts().is_empty(), "{:?}", sim.verdicts());
        // Now its server dies, and no server reports it: found within three times the longest
        // silence it came back from (7.5 s), and a tick.
        let took = sim.death_noticed(1, &[0, 2], Duration::from_secs(10));
        assert!(took <= Duration::from_millis(7700), "{took:?}");
    }

    /// The cellular hour's second run: four live servers called dead after 2.0 to 2.7 s of
    /// silence beside a busy tunnel, on a link whose live servers had been silent for a second
    /// before; twice the longest silence was not enough. Without a report, a slow link waits
    /// for 6 s at least.
    #[test]
    fn on_a_slow_link_a_silence_past_twice_the_longest_is_not_death_unreported() {
        let mut sim = Sim::new(3, 60 * MS);
        sim.load(&[0, 1, 2], Duration::from_secs(10));
        sim.silence(&[2], 1000 * MS);
        sim.load(&[0, 1, 2], Duration::from_secs(10));
        sim.silence(&[1], 3500 * MS);
        sim.load(&[0, 1, 2], Duration::from_secs(10));
        assert!(sim.verdicts().is_empty(), "{:?}", sim.verdicts());
    }

    /// The quick soak across a cellular link: a live server called dead after 2.1 s of silence
    /// a minute in, before any live tunnel had come back from a silence, while the transports
    /// declared packets lost all along. A link that loses packets is slow from its first loss.
    #[test]
    fn a_link_that_loses_packets_is_slow_before_any_silence_shows_it() {
        let mut sim = Sim::new(3, 60 * MS);
        sim.load(&[0, 1, 2], Duration::from_secs(10));
        sim.lost.insert(0, 3);
        sim.load(&[0, 1, 2], Duration::from_secs(2));
        sim.silence(&[1], 3500 * MS);
        sim.load(&[0, 1, 2], Duration::from_secs(10));
        assert!(sim.verdicts().is_empty(), "{:?}", sim.verdicts());
        // Without a report, a server that dies on it is found within the slow window's most
        // (10 s: three times that silence is more).
        let took = sim.death_noticed(1, &[0, 2], Duration::from_secs(12));
        assert!(took <= Duration::from_millis(10_200), "{took:?}");
    }

    /// The slow window is only for unreported silence: a server killed on a slow link is
    /// reported by its peers (within their 1.5 s idle timeout) and its streams reset within the
    /// issue's 3 s, with a second to spare.
    #[test]
    fn on_a_slow_link_a_reported_death_is_still_found_within_three_seconds() {
        let mut sim = Sim::new(3, 60 * MS);
        sim.load(&[0, 1, 2], Duration::from_secs(10));
        sim.silence(&[1], 1500 * MS);
        sim.load(&[0, 1, 2], Duration::from_secs(10));
        sim.set_answering(1, false);
        let died = sim.now;
        sim.send(1);
        sim.load(&[0, 2], 1500 * MS);
        sim.watch.reported(&1, sim.now);
        sim.load(&[0, 2], Duration::from_secs(3));
        let v = sim.verdicts();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(matches!(v[0].1, Action::DeadServer { key: 1, .. }), "{v:?}");
        // The silence it came back from (1.5 s), a probe's interval and a tick.
        assert!(
            v[0].0 - (died - sim.start) <= Duration::from_secs(2),
            "{v:?}"
        );
    }

    #[test]
    fn a_blackout_does_not_slow_the_next_verdict() {
        let mut sim = Sim::new(3, 60 * MS);
        sim.load(&[0, 1, 2], Duration::from_secs(5));
        sim.silence(&[0, 1, 2], Duration::from_secs(5));
        sim.load(&[0, 1, 2], Duration::from_secs(5));
        assert!(sim.verdicts().is_empty(), "{:?}", sim.verdicts());
        // The first window (2 s) and a tick: the blackout's 5 s taught it nothing.
        let took = sim.death_noticed(1, &[0, 2], Duration::from_secs(5));
        assert!(took <= Duration::from_millis(2200), "{took:?}");
    }

    #[test]
    fn a_server_that_no_longer_hears_us_is_dead_though_its_packets_still_arrive() {
        let mut sim = Sim::new(2, 20 * MS);
        sim.run_for(Duration::from_secs(3));
        sim.set_answering(1, false);
        sim.one_way.push(1);
        // The request, and the transport's retransmissions of it.
        for _ in 0..6 {
            sim.send(1);
            sim.run_for(Duration::from_millis(600));
        }
        sim.run_for(Duration::from_secs(3));
        let v = sim.verdicts();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(matches!(v[0].1, Action::DeadServer { key: 1, .. }), "{v:?}");
    }

    #[test]
    fn a_blackout_of_every_tunnel_is_held_for_the_tolerance_and_survived() {
        let mut sim = Sim::new(3, 100 * MS);
        sim.run_for(Duration::from_secs(10));
        for k in 0..3 {
            sim.set_answering(k, false);
        }
        sim.send(0);
        sim.run_for(Duration::from_secs(20));
        assert!(sim.verdicts().is_empty(), "{:?}", sim.verdicts());
        // The link comes back, one tunnel before the others (retransmission backoff): nothing
        // is declared dead on the way.
        sim.set_answering(2, true);
        sim.run_for(Duration::from_millis(900));
        sim.set_answering(1, true);
        // One transport waits out a long backoff: 8 s more, still within the tolerance.
        sim.run_for(Duration::from_secs(8));
        sim.set_answering(0, true);
        sim.run_for(Duration::from_secs(10));
        assert!(sim.verdicts().is_empty(), "{:?}", sim.verdicts());
    }

    #[test]
    fn a_blackout_is_dark_and_a_dead_server_is_not() {
        let mut sim = Sim::new(3, 100 * MS);
        sim.run_for(Duration::from_secs(5));
        assert!(!sim.watch.dark(sim.now));
        // One server dies under load: the others answer, so the link is lit throughout.
        sim.set_answering(1, false);
        for _ in 0..12 {
            sim.load(&[0, 1, 2], 250 * MS);
            assert!(!sim.watch.dark(sim.now));
        }
        // Every tunnel falls silent: dark within a second, lit again once one answers.
        sim.set_answering(0, false);
        sim.set_answering(2, false);
        sim.load(&[0, 2], Duration::from_secs(1));
        assert!(sim.watch.dark(sim.now));
        sim.load(&[0, 2], Duration::from_secs(1));
        // A tunnel is heard again: the transports still catch up, for as long again as the
        // blackout lasted (a second at least), then the link is lit.
        sim.set_answering(2, true);
        sim.load(&[0, 2], 500 * MS);
        assert!(sim.watch.dark(sim.now));
        sim.load(&[0, 2], Duration::from_millis(2500));
        assert!(!sim.watch.dark(sim.now));
    }

    #[test]
    fn after_a_long_blackout_the_link_stays_dark_while_the_transports_catch_up() {
        let mut sim = Sim::new(2, 100 * MS);
        sim.run_for(Duration::from_secs(5));
        sim.set_answering(0, false);
        sim.set_answering(1, false);
        sim.load(&[0, 1], Duration::from_secs(4));
        assert!(sim.watch.dark(sim.now));
        sim.set_answering(0, true);
        sim.set_answering(1, true);
        let back = sim.now;
        while sim.watch.dark(sim.now) {
            sim.load(&[0, 1], 250 * MS);
        }
        // About as long again as the blackout (it began to count half a second in).
        let caught_up = sim.now - back;
        assert!(
            caught_up >= Duration::from_secs(3) && caught_up <= Duration::from_secs(5),
            "{caught_up:?}"
        );
        assert!(sim.verdicts().is_empty(), "{:?}", sim.verdicts());
    }

    #[test]
    fn a_request_sent_before_the_first_tick_is_a_question_too() {
        let mut w: Watch<u32> = Watch::new(Settings::default());
        let now = Instant::now();
        let s = |received, sent, pongs| Sample {
            received,
            sent,
            pongs,
            rtt: MS,
            lost: 0,
            beats: false,
        };
        // Tunnel 1 came up, carried a request, and went silent, all before the first tick.
        let mut at = now;
        let mut dead = None;
        let mut pongs = 0;
        for _ in 0..40 {
            at += 100 * MS;
            pongs += 1;
            let acts = w.tick(at, &[(0, s(pongs, pongs, pongs)), (1, s(9, 11, 0))]);
            if let Some(a) = acts.into_iter().find(|a| !matches!(a, Action::Probe(_))) {
                dead = Some((at - now, a));
                break;
            }
        }
        let (after, a) = dead.expect("tunnel 1 judged");
        assert!(matches!(a, Action::DeadServer { key: 1, .. }), "{a:?}");
        assert!(after <= Duration::from_secs(3), "{after:?}");
    }

    #[test]
    fn a_blackout_longer_than_the_tolerance_closes_every_tunnel() {
        let mut sim = Sim::new(2, 100 * MS);
        sim.run_for(Duration::from_secs(5));
        sim.set_answering(0, false);
        sim.set_answering(1, false);
        sim.send(0);
        sim.run_for(Duration::from_secs(40));
        let v = sim.verdicts();
        assert_eq!(v.len(), 2, "{v:?}");
        assert!(v.iter().all(|(_, a)| matches!(a, Action::LinkLost { .. })));
    }

    #[test]
    fn with_one_server_a_silence_is_held_for_the_tolerance() {
        let mut sim = Sim::new(1, 50 * MS);
        sim.run_for(Duration::from_secs(5));
        sim.set_answering(0, false);
        sim.send(0);
        sim.run_for(Duration::from_secs(25));
        assert!(sim.verdicts().is_empty());
        sim.run_for(Duration::from_secs(10));
        assert!(matches!(
            sim.verdicts()[0].1,
            Action::LinkLost { key: 0, .. }
        ));
    }

    #[test]
    fn a_server_killed_under_a_request_is_closed_as_soon_as_it_is_reported() {
        let mut sim = Sim::new(3, 20 * MS);
        sim.watch = Watch::new(Settings {
            dead_after: Duration::from_secs(3),
            ..Settings::default()
        });
        sim.run_for(Duration::from_secs(3));
        sim.set_answering(2, false);
        sim.send(2);
        // Its peers notice 1.5 s later (their idle timeout), and tell the agent.
        sim.run_for(1500 * MS);
        let at = sim.now;
        sim.watch.reported(&2, at);
        sim.run_for(Duration::from_secs(2));
        let v = sim.verdicts();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(matches!(v[0].1, Action::DeadServer { key: 2, .. }));
        // At the report's tick: the question unanswered since before it is the agent's own
        // witness, and no probe's round trip is awaited (the netns suite saw the streams of a
        // server killed under a transfer reset 3.0 to 3.2 s after the kill with that wait and
        // the peers' former 2.5 s).
        assert!(
            v[0].0 - (at - sim.start) <= Duration::from_millis(50),
            "{v:?}"
        );
    }

    #[test]
    fn a_reported_server_is_probed_at_once_and_closed_if_silent() {
        let mut sim = Sim::new(3, 20 * MS);
        sim.run_for(Duration::from_secs(3));
        sim.set_answering(2, false);
        let at = sim.now;
        sim.watch.reported(&2, at);
        sim.run_for(Duration::from_secs(2));
        let v = sim.verdicts();
        assert_eq!(v.len(), 1, "{v:?}");
        assert!(matches!(v[0].1, Action::DeadServer { key: 2, .. }));
        assert!(
            v[0].0 - (at - sim.start) <= Duration::from_millis(700),
            "{v:?}"
        );
    }

    #[test]
    fn a_false_report_about_a_live_server_changes_nothing() {
        let mut sim = Sim::new(2, 20 * MS);
        sim.run_for(Duration::from_secs(3));
        let at = sim.now;
        sim.watch.reported(&1, at);
        sim.run_for(Duration::from_secs(5));
        assert!(sim.verdicts().is_empty());
        assert!(!sim.watch.doubted(&1, sim.now));
    }

    #[test]
    fn a_satellite_round_trip_is_no_reason_for_doubt() {
        // 600 ms round trips, a request every 700 ms on one of two tunnels: answers always
        // come, late; nothing is doubted, nothing declared.
        let mut sim = Sim::new(2, 600 * MS);
        for _ in 0..40 {
            sim.send(0);
            sim.run_for(700 * MS);
            assert!(!sim.watch.doubted(&0, sim.now));
        }
        assert!(sim.verdicts().is_empty());
    }

    #[test]
    fn an_older_server_that_beats_is_judged_from_its_last_word() {
        let mut w: Watch<u32> = Watch::new(Settings::default());
        let t0 = Instant::now();
        let beat = |received| Sample {
            received,
            sent: 0,
            pongs: 0,
            rtt: 10 * MS,
            lost: 0,
            beats: true,
        };
        let mut n = 0u64;
        let mut now = t0;
        for _ in 0..20 {
            now += 100 * MS;
            n += 1;
            // Tunnel 1 stops at 1 s; tunnel 0 beats on.
            let one = if now - t0 <= Duration::from_secs(1) {
                n
            } else {
                10
            };
            let acts = w.tick(now, &[(0, beat(n)), (1, beat(one))]);
            assert!(
                acts.iter().all(|a| matches!(a, Action::Probe(_))),
                "{acts:?}"
            );
        }
        let mut dead = None;
        for _ in 0..40 {
            now += 100 * MS;
            n += 1;
            if let Some(a) = w
                .tick(now, &[(0, beat(n)), (1, beat(10))])
                .into_iter()
                .find(|a| !matches!(a, Action::Probe(_)))
            {
                dead = Some((now - t0, a));
                break;
            }
        }
        let (at, a) = dead.expect("tunnel 1 declared dead");
        assert!(matches!(a, Action::DeadServer { key: 1, .. }));
        // Its last word at 1 s, and the 2 s window.
        assert!(at <= Duration::from_millis(3100), "{at:?}");
    }
}
