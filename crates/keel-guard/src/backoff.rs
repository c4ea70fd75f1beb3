//! Exponential backoff with equal jitter: the one implementation keel uses for retrying a
//! command, restarting a supervised task and an agent's retries towards the server.
//!
//! The ceiling starts at `base` and doubles after each failure, never above `cap`. A delay is
//! drawn from the upper half of the ceiling ("equal jitter"): half is fixed, so each wait is at
//! least half its step, and half is random, so work that failed together spreads out.

use std::time::Duration;

use rand::Rng;

/// Doubling ceilings from `base` to `cap`, with jittered delays below them.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    failures: u32,
}

impl Backoff {
    /// Delays starting at `base` and never above `cap` (a `cap` below `base` is raised to it).
    pub fn new(base: Duration, cap: Duration) -> Self {
        Self {
            base,
            cap: cap.max(base),
            failures: 0,
        }
    }

    /// The ceiling after `failures` failures: `base * 2^failures`, at most `cap`.
    pub fn ceiling_after(&self, failures: u32) -> Duration {
        let factor = 1u32.checked_shl(failures.min(31)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The ceiling of the next delay.
    pub fn ceiling(&self) -> Duration {
        self.ceiling_after(self.failures)
    }

    /// The next ceiling itself, without jitter (for delays that must be exact, such as the
    /// supervisor's restarts); the ceiling then doubles.
    pub fn next_ceiling(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.failures = self.failures.saturating_add(1);
        ceiling
    }

    /// The next delay, between half the ceiling and the ceiling; the ceiling then doubles.
    pub fn next_delay(&mut self) -> Duration {
        equal_jitter(self.next_ceiling(), &mut rand::rng())
    }

    /// Starts over from `base` (after a success).
    pub fn reset(&mut self) {
        self.failures = 0;
    }
}

/// A delay between half of `ceiling` and `ceiling`, uniformly at random in the upper half.
pub fn equal_jitter<R: Rng + ?Sized>(ceiling: Duration, rng: &mut R) -> Duration {
    let half = ceiling / 2;
    let spread = u64::try_from((ceiling - half).as_micros()).unwrap_or(u64::MAX);
    let jitter = if spread == 0 {
        0
    } else {
        rng.random_range(0..=spread)
    };
    half.saturating_add(Duration::from_micros(jitter))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_from_base_to_cap() {
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        let mut ceilings = Vec::new();
        for _ in 0..12 {
            ceilings.push(backoff.next_ceiling());
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
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
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
        let mut backoff = Backoff::new(Duration::from_millis(10), Duration::from_secs(1));
        for _ in 0..10_000 {
            backoff.next_delay();
        }
        assert_eq!(backoff.ceiling(), Duration::from_secs(1));
        assert_eq!(backoff.ceiling_after(u32::MAX), Duration::from_secs(1));
        backoff.reset();
        assert_eq!(backoff.ceiling(), Duration::from_millis(10));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..50 {
            let mut backoff = Backoff::new(Duration::from_secs(1), Duration::from_secs(1));
            seen.insert(backoff.next_delay());
        }
        assert!(seen.len() > 1, "all 50 delays were equal");
    }
}
