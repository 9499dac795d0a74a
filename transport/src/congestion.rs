//! BBR with a window that follows the link: quinn's BBR, with the congestion window held to a
//! small multiple of the bandwidth-delay product measured here.
//!
//! Why: quinn's BBR keeps two bandwidth-delay products in flight *of its own estimate*, and that
//! estimate is the largest rate between two consecutive packets it ever saw (acks arrive in
//! bursts, so a 50 Mbit/s link read as 300 in the WAN lab). quinn also paces by the window, not
//! by BBR's rate. So a bulk stream keeps megabytes in flight and the bottleneck's queue full: BBR
//! ignores the losses that overflow it, and every packet behind them, a small request on the same
//! tunnel included, waits the whole queue (a round trip of 200 ms on a 100 ms link).
//!
//! [`Estimator`] measures what the link delivers the way BBR is meant to: bytes acknowledged
//! over the round trip of each acknowledged packet (the delivery rate of RFC drafts and of the
//! kernel), the largest such rate over ten round trips, and the smallest round trip over
//! [`MIN_RTT_WINDOW`]. Once the rate stops growing (three round trips under 25% more, BBR's own
//! test that startup is over) the window is held to [`HEADROOM`] times that product, and the
//! rate over [`HOST_SLACK`] more: a queue of a quarter of the round trip (and 5 ms) at most, and
//! room for the rate to grow by a quarter a round trip when the link gets faster. Startup is
//! BBR's own, so short transfers are as fast as before. Paths under [`MIN_CAPPED_RTT`] (loopback,
//! a LAN) are not capped: their queue is short anyway, and the hosts' own delays dominate.
//!
//! A window cut to a stale product starves: the rate measured under it falls, and with it the
//! window, round after round. Two rules keep that from happening. The round trip's minimum is
//! windowed ([`MIN_RTT_WINDOW`]), not quinn's lifetime minimum, and BBR's `ProbeRTT` drains the
//! queue every 10 s, which refreshes it. And while no round trip of the last few came within
//! half of the minimum, the cap is off: the queue is not this sender's (the cap would keep it
//! short), so either the path got longer (a NAT rebinding, a route change) or another flow
//! fills the bottleneck, and the tunnel then competes as plain BBR does.

use quinn::congestion::{BbrConfig, Controller, ControllerFactory, ControllerMetrics};
use quinn_proto::RttEstimator;
use std::any::Any;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The window, as a multiple of the measured bandwidth-delay product, once startup is over.
pub const HEADROOM: f64 = 1.25;

/// How long a round-trip minimum stands (a little longer than BBR's 10 s between drains).
pub const MIN_RTT_WINDOW: Duration = Duration::from_secs(12);

/// How many round trips the recent minimum round trip covers.
const RECENT_ROUNDS: u32 = 4;

/// A recent minimum this many times the minimum (and [`HOST_SLACK`]) means a queue not of our
/// making.
const FOREIGN_QUEUE: f64 = 1.5;

/// Time the hosts themselves add to a round trip under load: acks sent in batches, a busy
/// scheduler. The window always has room for the rate over this much more than the round trip;
/// without it, on loopback (a round trip of 30 us, acks a millisecond apart) the cap held QUIC
/// to a fifth of its rate (docs/performance.md). Queues worth capping are longer than this.
pub const HOST_SLACK: Duration = Duration::from_millis(5);

/// Paths with a shorter minimum round trip are not capped: their queue, even at BBR's two
/// products, is a few milliseconds, while the time the hosts themselves add (a receiver busy
/// with 500 streams acks milliseconds late) dwarfs the round trip, and a window cut to the
/// product would starve (the forward suite's 500 concurrent streams over loopback were reset
/// when it was).
pub const MIN_CAPPED_RTT: Duration = Duration::from_millis(10);

/// How many round trips a rate maximum stands.
const BW_WINDOW_ROUNDS: u32 = 10;

/// The window is never held below this (bytes): ten full packets.
pub const MIN_WINDOW: u64 = 10 * 1200;

/// Sends remembered for rate samples, at most: more than the largest window of packets in
/// flight (the connection window, 4 MiB, is 3,500 packets), so that a full log means a peer that
/// does not acknowledge; then the oldest are forgotten, and their acks give no sample.
const MAX_LOG: usize = 8192;

/// Builds [`CappedBbr`] controllers.
#[derive(Debug, Clone, Default)]
pub struct CappedBbrConfig {
    bbr: Arc<BbrConfig>,
}

impl ControllerFactory for CappedBbrConfig {
    fn build(self: Arc<Self>, now: Instant, current_mtu: u16) -> Box<dyn Controller> {
        Box::new(CappedBbr {
            inner: self.bbr.clone().build(now, current_mtu),
            estimator: Estimator::default(),
        })
    }
}

/// quinn's BBR with its window capped by an [`Estimator`]; see the module's doc.
pub struct CappedBbr {
    inner: Box<dyn Controller>,
    estimator: Estimator,
}

impl Controller for CappedBbr {
    fn on_sent(&mut self, now: Instant, bytes: u64, last_packet_number: u64) {
        self.estimator.on_sent(now);
        self.inner.on_sent(now, bytes, last_packet_number)
    }

    fn on_ack(
        &mut self,
        now: Instant,
        sent: Instant,
        bytes: u64,
        app_limited: bool,
        rtt: &RttEstimator,
    ) {
        self.estimator.on_ack(now, sent, bytes, app_limited);
        self.inner.on_ack(now, sent, bytes, app_limited, rtt)
    }

    fn on_end_acks(
        &mut self,
        now: Instant,
        in_flight: u64,
        app_limited: bool,
        largest_packet_num_acked: Option<u64>,
    ) {
        self.inner
            .on_end_acks(now, in_flight, app_limited, largest_packet_num_acked)
    }

    fn on_congestion_event(
        &mut self,
        now: Instant,
        sent: Instant,
        is_persistent_congestion: bool,
        lost_bytes: u64,
    ) {
        self.inner
            .on_congestion_event(now, sent, is_persistent_congestion, lost_bytes)
    }

    fn on_mtu_update(&mut self, new_mtu: u16) {
        self.inner.on_mtu_update(new_mtu)
    }

    fn window(&self) -> u64 {
        let bbr = self.inner.window();
        match self.estimator.cap() {
            Some(cap) => bbr.min(cap),
            None => bbr,
        }
    }

    fn metrics(&self) -> ControllerMetrics {
        let mut m = self.inner.metrics();
        m.congestion_window = self.window();
        m
    }

    fn clone_box(&self) -> Box<dyn Controller> {
        Box::new(CappedBbr {
            inner: self.inner.clone_box(),
            estimator: self.estimator.clone(),
        })
    }

    fn initial_window(&self) -> u64 {
        self.inner.initial_window()
    }

    fn into_any(self: Box<Self>) -> Box<dyn Any> {
        self
    }
}

/// What the link delivers and how long its round trip is, from sends and acks alone: no I/O,
/// no clock but the instants it is given.
#[derive(Debug, Clone, Default)]
pub struct Estimator {
    /// Bytes acknowledged so far, and when the last were.
    delivered: u64,
    delivered_at: Option<Instant>,
    /// For each send not yet acknowledged: when, and `delivered`/`delivered_at` then.
    log: VecDeque<Sent>,
    bw: WindowedFilter<u64>,
    min_rtt: WindowedFilter<Duration>,
    /// The round trip, smoothed (RFC 6298's 1/8): the length of a round for the rate's window.
    srtt: Option<Duration>,
    /// The smallest round trip of the last few ([`RECENT_ROUNDS`]).
    recent_rtt: WindowedFilter<Duration>,
    /// Startup is over once the rate grew less than 25% in three round trips in a row.
    full_bw: u64,
    flat_rounds: u8,
    startup_over: bool,
    /// The end of the current round trip, and whether it had a sample not limited by the
    /// application (a round of only app-limited samples says nothing about the link).
    round_end: Option<Instant>,
    round_measured: bool,
}

#[derive(Debug, Clone, Copy)]
struct Sent {
    at: Instant,
    delivered: u64,
    delivered_at: Option<Instant>,
}

impl Estimator {
    /// Whether this path is too short to cap (see [`MIN_CAPPED_RTT`]): then no rate is measured,
    /// which spares loopback and LAN tunnels the bookkeeping of every send.
    fn short_path(&self) -> bool {
        self.min_rtt.get().is_some_and(|m| m < MIN_CAPPED_RTT)
    }

    /// Packets were sent at `now`.
    pub fn on_sent(&mut self, now: Instant) {
        if self.short_path() {
            self.log.clear();
            return;
        }
        if self.log.back().is_some_and(|s| s.at == now) {
            return; // The same instant's entry serves all its packets.
        }
        if self.log.len() >= MAX_LOG {
            self.log.pop_front();
        }
        self.log.push_back(Sent {
            at: now,
            delivered: self.delivered,
            delivered_at: self.delivered_at,
        });
    }

    /// `bytes` sent at `sent` were acknowledged at `now`.
    pub fn on_ack(&mut self, now: Instant, sent: Instant, bytes: u64, app_limited: bool) {
        self.delivered += bytes;
        self.delivered_at = Some(now);
        let rtt = now.saturating_duration_since(sent);
        if !rtt.is_zero() {
            self.srtt = Some(match self.srtt {
                Some(s) => (s * 7 + rtt) / 8,
                None => rtt,
            });
            self.min_rtt.update_min(now, rtt, MIN_RTT_WINDOW);
            let recent = self.min_rtt.get().unwrap_or(rtt) * RECENT_ROUNDS;
            self.recent_rtt
                .update_min(now, rtt, recent.max(Duration::from_millis(200)));
        }
        if self.short_path() {
            return;
        }
        // Sends older than this one were acknowledged or lost; either way they are done.
        while self.log.front().is_some_and(|s| s.at < sent) {
            self.log.pop_front();
        }
        let Some(entry) = self.log.front().filter(|s| s.at == sent).copied() else {
            return;
        };
        let Some(since) = entry.delivered_at else {
            return;
        };
        let interval = now.saturating_duration_since(since);
        let Some(min_rtt) = self.min_rtt.get() else {
            return;
        };
        // An interval under the round trip is a burst of acks, not a rate.
        if interval < min_rtt {
            return;
        }
        let rate = ((self.delivered - entry.delivered) as f64 / interval.as_secs_f64()) as u64;
        let bw_window = self.srtt.unwrap_or(min_rtt).max(min_rtt) * BW_WINDOW_ROUNDS;
        if !app_limited || rate >= self.bw.get().unwrap_or(0) {
            self.bw.update_max(now, rate, bw_window);
            self.round_measured |= !app_limited;
        }
        self.end_round(now, min_rtt);
    }

    /// Once a round trip: did the rate grow?
    fn end_round(&mut self, now: Instant, min_rtt: Duration) {
        match self.round_end {
            Some(end) if now < end => return,
            _ => {}
        }
        self.round_end = Some(now + min_rtt);
        if !std::mem::take(&mut self.round_measured) || self.startup_over {
            return;
        }
        let bw = self.bw.get().unwrap_or(0);
        if bw as f64 >= self.full_bw as f64 * 1.25 {
            self.full_bw = bw;
            self.flat_rounds = 0;
        } else {
            self.flat_rounds += 1;
            self.startup_over = self.flat_rounds >= 3;
        }
    }

    /// The largest window worth having, once startup is over.
    ///
    /// None while no round trip of the last few came near the minimum: a queue the cap would
    /// keep short cannot be this sender's, so it is another flow's (the tunnel then holds its
    /// share as plain BBR does) or the path got longer (the minimum is stale, and a window cut
    /// to it would starve).
    pub fn cap(&self) -> Option<u64> {
        if !self.startup_over {
            return None;
        }
        let min_rtt = self.min_rtt.get()?;
        if min_rtt < MIN_CAPPED_RTT {
            return None;
        }
        let recent = self.recent_rtt.get()?;
        if recent > min_rtt.mul_f64(FOREIGN_QUEUE) + HOST_SLACK {
            return None;
        }
        let bw = self.bw.get()? as f64;
        let cap = bw * (min_rtt.as_secs_f64() * HEADROOM + HOST_SLACK.as_secs_f64());
        Some((cap as u64).max(MIN_WINDOW))
    }
}

/// The best of the samples of a sliding time window, kept as the best three of its thirds
/// (Kathleen Nichols' algorithm, as in the kernel's `win_minmax`): a few bytes, no history.
#[derive(Debug, Clone, Copy, Default)]
struct WindowedFilter<T> {
    s: [Option<(Instant, T)>; 3],
}

impl<T: Copy + PartialOrd> WindowedFilter<T> {
    fn get(&self) -> Option<T> {
        self.s[0].map(|(_, v)| v)
    }

    fn update_max(&mut self, now: Instant, v: T, window: Duration) {
        self.update(now, v, window, |a, b| a >= b)
    }

    fn update_min(&mut self, now: Instant, v: T, window: Duration) {
        self.update(now, v, window, |a, b| a <= b)
    }

    /// `better(a, b)`: a is at least as good as b.
    fn update(&mut self, now: Instant, v: T, window: Duration, better: fn(T, T) -> bool) {
        let sample = Some((now, v));
        let (Some((t0, v0)), Some((_, v1)), Some((t2, v2))) = (self.s[0], self.s[1], self.s[2])
        else {
            self.s = [sample; 3];
            return;
        };
        if better(v, v0) || now.saturating_duration_since(t2) > window {
            self.s = [sample; 3];
            return;
        }
        if better(v, v1) {
            self.s[1] = sample;
            self.s[2] = sample;
        } else if better(v, v2) {
            self.s[2] = sample;
        }
        // The best has stood a whole window: the second best takes over, and so on.
        let age = now.saturating_duration_since(t0);
        if age > window {
            self.s = [self.s[1], self.s[2], sample];
            if self.s[0].is_some_and(|(t, _)| now.saturating_duration_since(t) > window) {
                self.s = [self.s[1], self.s[2], sample];
            }
        } else if self.s[1].map(|(t, _)| t) == Some(t0) && age > window / 4 {
            self.s[1] = sample;
            self.s[2] = sample;
        } else if self.s[2].map(|(t, _)| t) == self.s[1].map(|(t, _)| t) && age > window / 2 {
            self.s[2] = sample;
        }
    }
}

#[cfg(test)]
mod tests {
    //! A packet-level bottleneck in virtual time: a sender whose window is the larger of what it
    //! had and what was acknowledged (what quinn's BBR does at 1% loss with its inflated
    //! estimate) and that drains to four packets for 200 ms every 10 s (BBR's `ProbeRTT`), a
    //! queue of bounded delay served at the link's rate, random loss, and the [`Estimator`]'s cap
    //! on top or not.
    use super::*;
    use std::collections::VecDeque;

    const MTU: u64 = 1200;

    struct Link {
        rate: f64, // bytes a second
        one_way: Duration,
        max_queue: Duration,
        loss: f64,
        /// Up to this much more before an ack leaves the receiver (a busy host).
        ack_jitter: Duration,
    }

    struct Outcome {
        goodput: f64,        // bytes a second over the last half
        queue_p90: Duration, // queueing delay of the last half's packets
    }

    /// Runs a bulk sender for `secs` over `link` (changing to `later` halfway, if given).
    fn run(link: Link, later: Option<Link>, secs: u64, capped: bool) -> Outcome {
        let start = Instant::now();
        let tick = Duration::from_micros(500);
        let end = start + Duration::from_secs(secs);
        let half = start + Duration::from_secs(secs / 2);
        let mut link = link;
        let mut later = later;
        let mut est = Estimator::default();
        let mut window: u64 = 10 * MTU;
        let mut in_flight: u64 = 0;
        // Packets on the way: (arrives at the queue, sent at).
        let mut to_queue: VecDeque<(Instant, Instant)> = VecDeque::new();
        let mut queue: VecDeque<(Instant, Instant)> = VecDeque::new(); // (entered, sent)
        let mut acks: VecDeque<(Instant, Instant)> = VecDeque::new(); // (arrives, sent)
        let mut free_at = start; // when the link is done with the packet it sends
        let mut delivered_late = 0u64;
        let mut delays = Vec::new();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut now = start;
        while now < end {
            if now >= half {
                if let Some(l) = later.take() {
                    link = l;
                }
            }
            // Acks in.
            while acks.front().is_some_and(|(at, _)| *at <= now) {
                let Some((_, sent)) = acks.pop_front() else {
                    break;
                };
                in_flight -= MTU;
                est.on_ack(now, sent, MTU, false);
                window += MTU; // grows with every ack, never shrinks on loss
                if now >= half {
                    delivered_late += MTU;
                }
            }
            // The queue drains at the link's rate.
            while let Some(&(entered, sent)) = queue.front() {
                let start_tx = free_at.max(entered);
                let done = start_tx + Duration::from_secs_f64(MTU as f64 / link.rate);
                if done > now {
                    break;
                }
                queue.pop_front();
                free_at = done;
                if sent >= half {
                    delays.push(start_tx - entered);
                }
                let late = link.ack_jitter.mul_f64(rng.f64());
                let at = (done + link.one_way + late).max(acks.back().map_or(done, |a| a.0));
                acks.push_back((at, sent));
            }
            // Packets reach the queue; a full one (by delay) drops them, as does random loss.
            while to_queue.front().is_some_and(|(at, _)| *at <= now) {
                let Some((at, sent)) = to_queue.pop_front() else {
                    break;
                };
                let backlog = queue.len() as f64 * MTU as f64 / link.rate;
                if rng.f64() < link.loss || backlog > link.max_queue.as_secs_f64() {
                    in_flight -= MTU; // lost: no ack (the sender learns it by time)
                    continue;
                }
                queue.push_back((at, sent));
            }
            // Send what the window allows.
            let since_start = now - start;
            let probing_rtt =
                since_start > Duration::from_secs(10) && since_start.as_millis() % 10_000 < 200;
            let allowed = match (capped, est.cap()) {
                _ if probing_rtt => 4 * MTU,
                (true, Some(cap)) => window.min(cap),
                _ => window,
            };
            let mut sent_any = false;
            while in_flight + MTU <= allowed {
                in_flight += MTU;
                to_queue.push_back((now + link.one_way, now));
                sent_any = true;
            }
            if sent_any {
                est.on_sent(now);
            }
            // Never let the window run away past what the simulation can hold.
            window = window.min(64 * 1024 * 1024);
            now += tick;
        }
        delays.sort();
        let queue_p90 = delays
            .get(delays.len() * 9 / 10)
            .copied()
            .unwrap_or_default();
        Outcome {
            goodput: delivered_late as f64 / (secs / 2) as f64,
            queue_p90,
        }
    }

    fn continental() -> Link {
        Link {
            rate: 50e6 / 8.0,
            one_way: Duration::from_millis(50),
            max_queue: Duration::from_millis(100),
            loss: 0.01,
            ack_jitter: Duration::ZERO,
        }
    }

    #[test]
    fn a_busy_receiver_does_not_starve_the_window() {
        // Acks leave the receiver up to 40 ms late, at random: the round trips the cap sees
        // swing, and the rate measured under it must not spiral down.
        let busy = Link {
            ack_jitter: Duration::from_millis(40),
            ..continental()
        };
        let out = run(busy, None, 30, true);
        assert!(
            out.goodput > 0.85 * continental().rate,
            "goodput {:.1} Mbit/s",
            out.goodput * 8.0 / 1e6
        );
    }

    #[test]
    fn a_short_path_is_not_capped() {
        let t = Instant::now();
        let mut e = Estimator::default();
        // A second of a saturated 1 ms path: a rate and a round trip, and no cap.
        for i in 0..1000u32 {
            let at = t + Duration::from_millis(u64::from(i));
            e.on_sent(at);
            e.on_ack(at + Duration::from_millis(1), at, 125_000, false);
        }
        assert!(e.min_rtt.get() < Some(MIN_CAPPED_RTT));
        assert_eq!(e.cap(), None);
    }

    #[test]
    fn the_cap_keeps_the_queue_short_at_the_links_rate() {
        let capped = run(continental(), None, 20, true);
        let rate = continental().rate;
        assert!(
            capped.goodput > 0.85 * rate,
            "goodput {:.1} Mbit/s",
            capped.goodput * 8.0 / 1e6
        );
        assert!(
            capped.queue_p90 <= Duration::from_millis(40),
            "queue p90 {:?}",
            capped.queue_p90
        );
    }

    #[test]
    fn without_the_cap_the_queue_stays_full() {
        // What the cap is for: the same sender, uncapped, keeps the queue at its limit.
        let uncapped = run(continental(), None, 20, false);
        assert!(
            uncapped.queue_p90 >= Duration::from_millis(90),
            "queue p90 {:?}",
            uncapped.queue_p90
        );
    }

    #[test]
    fn a_path_that_gets_longer_does_not_starve_the_window() {
        // The round trip goes from 100 to 300 ms halfway: the minimum ages out and the window
        // grows to the new product.
        let longer = Link {
            one_way: Duration::from_millis(150),
            ..continental()
        };
        let out = run(continental(), Some(longer), 60, true);
        assert!(
            out.goodput > 0.9 * continental().rate,
            "goodput {:.1} Mbit/s",
            out.goodput * 8.0 / 1e6
        );
    }

    #[test]
    fn a_faster_link_is_found() {
        let faster = Link {
            rate: 200e6 / 8.0,
            ..continental()
        };
        let out = run(continental(), Some(faster), 30, true);
        assert!(
            out.goodput > 0.7 * 200e6 / 8.0,
            "goodput {:.1} Mbit/s",
            out.goodput * 8.0 / 1e6
        );
    }

    #[test]
    fn the_windowed_filter_forgets_an_old_best() {
        let t = Instant::now();
        let w = Duration::from_secs(10);
        let mut f = WindowedFilter::default();
        f.update_min(t, Duration::from_millis(100), w);
        f.update_min(t + Duration::from_secs(3), Duration::from_millis(150), w);
        f.update_min(t + Duration::from_secs(6), Duration::from_millis(160), w);
        assert_eq!(f.get(), Some(Duration::from_millis(100)));
        f.update_min(t + Duration::from_secs(11), Duration::from_millis(170), w);
        assert!(f.get() > Some(Duration::from_millis(100)), "{:?}", f.get());
        let mut m = WindowedFilter::default();
        m.update_max(t, 10u64, w);
        m.update_max(t + Duration::from_secs(1), 5, w);
        assert_eq!(m.get(), Some(10));
        m.update_max(t + Duration::from_secs(12), 4, w);
        assert!(m.get() < Some(10));
    }

    #[test]
    fn the_log_is_bounded() {
        let t = Instant::now();
        let mut e = Estimator::default();
        for i in 0..(MAX_LOG as u64 * 2) {
            e.on_sent(t + Duration::from_micros(i));
        }
        assert_eq!(e.log.len(), MAX_LOG);
    }
}
