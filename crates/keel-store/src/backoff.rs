//! The delay before a failed command is tried again.

use std::time::Duration;

use keel_guard::backoff::{Backoff, equal_jitter};
use rand::Rng;

/// The delay after the first failed attempt; it doubles with each further attempt.
pub const RETRY_BASE: Duration = Duration::from_secs(5);

/// The longest delay between two attempts.
pub const RETRY_CAP: Duration = Duration::from_secs(600);

/// The delay before the next attempt, after `attempts` attempts (1 after the first one).
///
/// Exponential from [`RETRY_BASE`], doubling, capped at [`RETRY_CAP`], with "equal jitter":
/// half of the step is fixed and the other half random, so retries of commands that failed
/// together spread out while each still waits at least half its step.
pub fn retry_backoff<R: Rng + ?Sized>(attempts: u32, rng: &mut R) -> Duration {
    let ceiling = Backoff::new(RETRY_BASE, RETRY_CAP).ceiling_after(attempts.saturating_sub(1));
    equal_jitter(ceiling, rng)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    #[test]
    fn doubles_from_five_seconds_within_equal_jitter() {
        let mut rng = StdRng::seed_from_u64(7);
        for (attempts, step) in [(1, 5), (2, 10), (3, 20), (4, 40), (5, 80), (7, 320)] {
            let step = Duration::from_secs(step);
            for _ in 0..200 {
                let d = retry_backoff(attempts, &mut rng);
                assert!(d >= step / 2 && d <= step, "attempt {attempts}: {d:?}");
            }
        }
    }

    #[test]
    fn is_capped_at_ten_minutes() {
        let mut rng = StdRng::seed_from_u64(7);
        for attempts in [8, 9, 20, 31, 32, 1000, u32::MAX] {
            for _ in 0..50 {
                let d = retry_backoff(attempts, &mut rng);
                assert!(
                    d >= RETRY_CAP / 2 && d <= RETRY_CAP,
                    "attempt {attempts}: {d:?}"
                );
            }
        }
    }

    #[test]
    fn zero_attempts_is_treated_as_the_first() {
        let mut rng = StdRng::seed_from_u64(1);
        let d = retry_backoff(0, &mut rng);
        assert!(d >= RETRY_BASE / 2 && d <= RETRY_BASE);
    }

    #[test]
    fn jitter_spreads_the_delays() {
        let mut rng = StdRng::seed_from_u64(3);
        let delays: std::collections::HashSet<_> =
            (0..50).map(|_| retry_backoff(4, &mut rng)).collect();
        assert!(delays.len() > 10);
    }
}
