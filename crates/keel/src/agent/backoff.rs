//! Exponential backoff with jitter for retrying requests to the server.

use std::time::Duration;

use rand::Rng;

/// Delays that double from `base` up to `cap`, each drawn at random from the upper half of
/// the current ceiling ("equal jitter"), so that agents restarted together spread out.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    /// The agent's default: 200 ms doubling to 30 s.
    pub fn new() -> Self {
        Self::with(Duration::from_millis(200), Duration::from_secs(30))
    }

    /// Delays starting at `base` and never above `cap`.
    pub fn with(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            failures: 0,
        }
    }

    /// The ceiling of the next delay: `base * 2^failures`, at most `cap`.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.failures.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay (between half the ceiling and the ceiling); the ceiling then doubles.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        let half = ceiling / 2;
        let spread = u64::try_from((ceiling - half).as_micros()).unwrap_or(u64::MAX);
        let jitter = if spread == 0 {
            0
        } else {
            rand::rng().random_range(0..=spread)
        };
        half + Duration::from_micros(jitter)
    }

    /// Starts over from `base` (after a success).
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_base_to_cap() {
        let mut backoff = Backoff::new();
        let mut ceilings = Vec::new();
        for _ in 0..12 {
            ceilings.push(backoff.ceiling());
            backoff.next_delay();
        }
        let millis: Vec<u128> = ceilings.iter().map(Duration::as_millis).collect();
        assert_eq!(
            millis,
            [
                200, 400, 800, 1600, 3200, 6400, 12800, 25600, 30000, 30000, 30000, 30000
            ]
        );
    }

    #[test]
    fn delays_stay_within_the_upper_half_of_the_ceiling() {
        let mut backoff = Backoff::new();
        for _ in 0..200 {
            let ceiling = backoff.ceiling();
            let delay = backoff.next_delay();
            assert!(delay >= ceiling / 2, "{delay:?} < half of {ceiling:?}");
            assert!(delay <= ceiling, "{delay:?} > {ceiling:?}");
        }
        assert_eq!(backoff.ceiling(), Duration::from_secs(30));
    }

    #[test]
    fn reset_starts_over_and_many_failures_do_not_overflow() {
        let mut backoff = Backoff::with(Duration::from_millis(10), Duration::from_secs(1));
        for _ in 0..10_000 {
            backoff.next_delay();
        }
        assert_eq!(backoff.ceiling(), Duration::from_secs(1));
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(10));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let mut backoff = Backoff::with(Duration::from_secs(1), Duration::from_secs(1));
            seen.insert(backoff.next_delay());
        }
        assert!(seen.len() > 1, "all 50 delays were equal");
    }
}
