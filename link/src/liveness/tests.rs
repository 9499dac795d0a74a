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
