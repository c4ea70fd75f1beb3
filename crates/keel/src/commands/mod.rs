//! Commands beyond the store: waking long-polling agents, and releasing expired leases.
//!
//! - [`wakeups`]: an enqueue wakes the agents of its organisation that wait in a claim.
//! - [`broadcast`]: the agents a label selector reaches.
//! - [`release`]: the release-stuck job's work, with its audit records and metrics.
//! - [`retention`]: the retention job's work: finished commands past their retention go.
//! - [`scheduler`]: the scheduler job's work: due schedules create their commands, and how a
//!   schedule's command template becomes commands.

pub mod broadcast;
pub mod release;
pub mod retention;
pub mod scheduler;
pub mod wakeups;
