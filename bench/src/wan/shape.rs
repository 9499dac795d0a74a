//! The link model of the WAN lab, free of I/O and clocks: a packet and the time it was offered
//! go in, the time it leaves the far end (or that it is lost) comes out.
//!
//! What a packet meets, in order, as on a real path:
//! 1. a blackout (everything is dropped while the link is dark: a handover, a tunnel, a dish
//!    that lost the satellite);
//! 2. loss, random or in bursts (a two-state Gilbert model: in the bad state every packet is
//!    lost, and the mean burst length sets how long the bad state lasts);
//! 3. the bottleneck: a queue drained at the link's rate, of a bounded depth (measured in time,
//!    as a router's buffer is sized); a packet that would wait longer is dropped at the tail;
//! 4. the propagation delay, with jitter that never reorders packets (a packet never leaves
//!    before the one ahead of it, as on a single physical path).
//!
//! Keeping this pure is what lets the unit tests below check a profile's loss, rate and delay
//! in microseconds rather than by sending packets.

use std::time::Duration;

/// One direction of a link.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    /// One-way propagation delay: half the round-trip time.
    pub delay: Duration,
    /// Jitter: each packet's delay is `delay ± jitter`, uniformly (never reordering).
    pub jitter: Duration,
    /// Long-run fraction of packets lost (0 to 1).
    pub loss: f64,
    /// Mean number of packets lost in a row: 1 is independent random loss; more makes bursts
    /// with the same long-run `loss`.
    pub burst: f64,
    /// Bottleneck rate in bits per second (0: unlimited).
    pub rate_bps: u64,
    /// Deepest the bottleneck queue may get, as time to drain it at `rate_bps`.
    pub queue: Duration,
}

impl Shape {
    /// A link with nothing in the way but its delay.
    #[cfg(test)]
    pub fn delay_only(delay: Duration) -> Shape {
        Shape {
            delay,
            jitter: Duration::ZERO,
            loss: 0.0,
            burst: 1.0,
            rate_bps: 0,
            queue: Duration::ZERO,
        }
    }

    /// Probability of entering the bad (losing) state from the good one, and of leaving it,
    /// for the Gilbert model with this shape's long-run loss and mean burst length.
    fn gilbert(&self) -> (f64, f64) {
        let loss = self.loss.clamp(0.0, 0.999);
        let leave = 1.0 / self.burst.max(1.0);
        // Steady state: loss = enter / (enter + leave).
        let enter = if loss <= 0.0 {
            0.0
        } else {
            leave * loss / (1.0 - loss)
        };
        (enter.min(1.0), leave)
    }
}

/// What became of an offered packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// It leaves the far end this long after the link's epoch.
    Deliver(Duration),
    /// Dropped while the link was dark.
    Dark,
    /// Lost at random (or in a burst).
    Lost,
    /// Dropped at the tail of a full bottleneck queue.
    QueueFull,
}

/// The state of one direction: the bottleneck's backlog, the loss model's state, the last
/// departure (for order). Times are durations since the lab's epoch, so that the tests drive
/// them by hand.
#[derive(Debug)]
pub struct Direction {
    shape: Shape,
    /// When the bottleneck finishes sending what it holds.
    busy_until: Duration,
    /// When the last delivered packet leaves the far end.
    last_out: Duration,
    bad: bool,
    rng: fastrand::Rng,
}

impl Direction {
    pub fn new(shape: Shape, seed: u64) -> Direction {
        Direction {
            shape,
            busy_until: Duration::ZERO,
            last_out: Duration::ZERO,
            bad: false,
            rng: fastrand::Rng::with_seed(seed),
        }
    }

    /// Offers a packet of `len` bytes at `now`, while the link is `dark` or not.
    pub fn offer(&mut self, len: usize, now: Duration, dark: bool) -> Fate {
        if dark {
            return Fate::Dark;
        }
        if self.lose() {
            return Fate::Lost;
        }
        let start = self.busy_until.max(now);
        // An unlimited link (rate 0) serializes in no time.
        let serialize = Duration::from_nanos(
            (len as u64 * 8)
                .saturating_mul(1_000_000_000)
                .checked_div(self.shape.rate_bps)
                .unwrap_or(0),
        );
        if self.shape.rate_bps != 0 && start - now > self.shape.queue {
            return Fate::QueueFull;
        }
        self.busy_until = start + serialize;
        let jitter = self.shape.jitter.as_nanos() as u64;
        let delay = if jitter == 0 {
            self.shape.delay
        } else {
            let swing = self.rng.u64(0..=2 * jitter);
            (self.shape.delay + Duration::from_nanos(swing))
                .saturating_sub(Duration::from_nanos(jitter))
        };
        let out = (self.busy_until + delay).max(self.last_out);
        self.last_out = out;
        Fate::Deliver(out)
    }

    fn lose(&mut self) -> bool {
        if self.shape.loss <= 0.0 {
            return false;
        }
        let (enter, leave) = self.shape.gilbert();
        // Move the chain one step, then the packet meets the state it is in.
        if self.bad {
            if self.rng.f64() < leave {
                self.bad = false;
            }
        } else if self.rng.f64() < enter {
            self.bad = true;
        }
        self.bad
    }
}

/// When the link goes dark: a blackout of a random length in `len` every `every`, the first
/// one `every` after the start. Pure: the same seed gives the same schedule.
#[derive(Debug, Clone)]
pub struct Blackouts {
    /// Start and end of each blackout, in order.
    spans: Vec<(Duration, Duration)>,
}

impl Blackouts {
    /// A schedule for a run of `horizon`.
    pub fn periodic(
        every: Duration,
        len: (Duration, Duration),
        horizon: Duration,
        seed: u64,
    ) -> Blackouts {
        let mut rng = fastrand::Rng::with_seed(seed);
        let mut spans = Vec::new();
        if every.is_zero() {
            return Blackouts { spans };
        }
        let mut at = every;
        while at < horizon {
            let lo = len.0.as_millis() as u64;
            let hi = len.1.as_millis().max(len.0.as_millis()) as u64;
            let l = Duration::from_millis(rng.u64(lo..=hi));
            spans.push((at, at + l));
            at += every;
        }
        Blackouts { spans }
    }

    /// No blackout but those [`Blackouts::add`] adds later (the soak makes its own).
    pub fn none() -> Blackouts {
        Blackouts { spans: Vec::new() }
    }

    /// Adds a blackout (the lab's blackout test, on top of any schedule).
    pub fn add(&mut self, from: Duration, len: Duration) {
        self.spans.push((from, from + len));
        self.spans.sort();
    }

    pub fn dark(&self, now: Duration) -> bool {
        self.spans.iter().any(|&(a, b)| a <= now && now < b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_delay_only_link_delivers_everything_after_its_delay_in_order() {
        let mut d = Direction::new(Shape::delay_only(50 * MS), 1);
        for i in 0..100u32 {
            let now = i * MS;
            assert_eq!(d.offer(1500, now, false), Fate::Deliver(now + 50 * MS));
        }
    }

    #[test]
    fn the_bottleneck_paces_packets_at_its_rate_and_drops_past_its_queue() {
        // 12 Mbit/s: a 1500-byte packet takes 1 ms to send. A queue of 10 ms holds ten.
        let shape = Shape {
            rate_bps: 12_000_000,
            queue: 10 * MS,
            ..Shape::delay_only(20 * MS)
        };
        let mut d = Direction::new(shape, 1);
        let fates: Vec<Fate> = (0..20)
            .map(|_| d.offer(1500, Duration::ZERO, false))
            .collect();
        let delivered: Vec<Duration> = fates
            .iter()
            .filter_map(|f| match f {
                Fate::Deliver(t) => Some(*t),
                _ => None,
            })
            .collect();
        assert_eq!(delivered.len(), 11, "{fates:?}");
        assert_eq!(delivered[0], 21 * MS);
        assert_eq!(delivered[10], 31 * MS);
        assert!(fates[11..].iter().all(|f| *f == Fate::QueueFull));
        // Once the queue drains, packets pass again.
        assert!(matches!(d.offer(1500, 40 * MS, false), Fate::Deliver(_)));
    }

    #[test]
    fn random_and_bursty_loss_keep_their_long_run_rate_and_bursts_come_in_runs() {
        for burst in [1.0, 4.0] {
            let shape = Shape {
                loss: 0.02,
                burst,
                ..Shape::delay_only(MS)
            };
            let mut d = Direction::new(shape, 7);
            let n = 400_000;
            let mut lost = 0;
            let mut runs = 0;
            let mut previous = false;
            for i in 0..n {
                let l = d.offer(100, i * Duration::from_micros(1), false) == Fate::Lost;
                lost += l as u32;
                runs += (l && !previous) as u32;
                previous = l;
            }
            let rate = f64::from(lost) / f64::from(n);
            let mean_run = f64::from(lost) / f64::from(runs.max(1));
            assert!((rate - 0.02).abs() < 0.003, "burst {burst}: loss {rate}");
            assert!(
                (mean_run - burst).abs() < 0.3 * burst,
                "burst {burst}: runs of {mean_run}"
            );
        }
    }

    #[test]
    fn jitter_never_reorders() {
        let shape = Shape {
            jitter: 20 * MS,
            ..Shape::delay_only(60 * MS)
        };
        let mut d = Direction::new(shape, 3);
        let mut last = Duration::ZERO;
        let mut spread = (Duration::MAX, Duration::ZERO);
        for i in 0..10_000u32 {
            let now = i * Duration::from_micros(100);
            let Fate::Deliver(t) = d.offer(200, now, false) else {
                panic!("nothing is lost here")
            };
            assert!(t >= last);
            last = t;
            spread = (spread.0.min(t - now), spread.1.max(t - now));
        }
        assert!(spread.0 >= 40 * MS && spread.1 >= 75 * MS, "{spread:?}");
    }

    #[test]
    fn a_blackout_drops_everything_for_its_length_and_only_then() {
        let mut b = Blackouts::periodic(60_000 * MS, (1000 * MS, 5000 * MS), 200_000 * MS, 9);
        assert!(!b.dark(59_999 * MS));
        assert!(b.dark(60_000 * MS));
        assert!(!b.dark(65_001 * MS));
        b.add(10_000 * MS, 2000 * MS);
        assert!(b.dark(11_999 * MS) && !b.dark(12_000 * MS));
        let mut d = Direction::new(Shape::delay_only(MS), 1);
        assert_eq!(d.offer(100, 11_000 * MS, b.dark(11_000 * MS)), Fate::Dark);
    }
}
