//! Commands beyond the store: waking long-polling agents, and releasing expired leases.
//!
//! - [`wakeups`]: an enqueue wakes the agents of its organisation that wait in a claim.
//! - [`release`]: the release-stuck job's work, with its audit records and metrics.

pub mod release;
pub mod wakeups;
