//! Exponential backoff with full jitter, for reconnect loops.
//!
//! Thousands of agents lose their server at the same moment when a master dies; full jitter
//! (a random delay between zero and the exponential bound) spreads their reconnects so that the
//! surviving servers are not hit by a synchronized wave.

use std::time::Duration;

/// Delays between attempts: each bound doubles from `initial` up to `max`; each delay is drawn
/// uniformly below the bound.
#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Self {
        Backoff {
            initial: initial.max(Duration::from_millis(1)),
            max: max.max(initial),
            attempt: 0,
        }
    }

    /// The upper bound of the next delay.
    pub fn bound(&self) -> Duration {
        let factor = 1u32 << self.attempt.min(20);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay to wait, with jitter; advances the attempt count.
    pub fn next_delay(&mut self, random: f64) -> Duration {
        let bound = self.bound();
        self.attempt = self.attempt.saturating_add(1);
        bound.mul_f64(random.clamp(0.0, 1.0))
    }

    /// Starts over after a success.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let bounds: Vec<_> = (0..10)
            .map(|_| {
                let bound = b.bound();
                assert!(b.next_delay(1.0) <= bound);
                bound.as_millis()
            })
            .collect();
        assert_eq!(bounds[..7], [100, 200, 400, 800, 1600, 3200, 5000]);
        assert_eq!(bounds[9], 5000);
        b.reset();
        assert_eq!(b.bound(), Duration::from_millis(100));
        assert_eq!(b.next_delay(0.0), Duration::ZERO);
    }

    #[test]
    fn never_overflows() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(5));
        for _ in 0..1000 {
            assert!(b.next_delay(0.5) <= Duration::from_secs(5));
        }
    }
}
