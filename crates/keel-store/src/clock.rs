//! Where the store's "now" comes from.
//!
//! Every instant the store writes (run-at, lease expiry, last seen, ...) is read from a
//! [`Clock`], so tests move time with a [`ManualClock`] instead of sleeping.

use std::fmt;

use parking_lot::Mutex;
use time::{Duration, OffsetDateTime};

/// A source of the current instant.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current instant.
    fn now(&self) -> OffsetDateTime;
}

/// The system's wall clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> OffsetDateTime {
        OffsetDateTime::now_utc()
    }
}

/// A clock that only moves when told to.
#[derive(Debug)]
pub struct ManualClock {
    now: Mutex<OffsetDateTime>,
}

impl ManualClock {
    /// A clock stopped at `start`.
    pub fn new(start: OffsetDateTime) -> Self {
        Self {
            now: Mutex::new(start),
        }
    }

    /// Sets the current instant.
    pub fn set(&self, now: OffsetDateTime) {
        *self.now.lock() = now;
    }

    /// Moves the clock forward by `by` (backward if negative).
    pub fn advance(&self, by: Duration) {
        let mut now = self.now.lock();
        *now = now.saturating_add(by);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> OffsetDateTime {
        *self.now.lock()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn manual_clock_moves_only_when_told() {
        let clock = ManualClock::new(datetime!(2030-01-01 0:00 UTC));
        assert_eq!(clock.now(), datetime!(2030-01-01 0:00 UTC));
        clock.advance(Duration::seconds(90));
        assert_eq!(clock.now(), datetime!(2030-01-01 0:01:30 UTC));
        clock.set(datetime!(2031-06-01 12:00 UTC));
        assert_eq!(clock.now(), datetime!(2031-06-01 12:00 UTC));
    }
}
