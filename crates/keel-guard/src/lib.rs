//! keel's panic-safety runtime.
//!
//! A panic anywhere in keel (handler, logger, queue item, job tick) is caught, reported once
//! and counted; the loop it happened in goes on. This crate holds the pieces every other part
//! stands on:
//!
//! - [`mod@panic`]: the process-wide panic hook, the registry of recent panics and the reporter the
//!   logger plugs into.
//! - [`forensics`]: the short backtrace and the fingerprint that groups panics of one bug.
//! - [`backoff`]: exponential backoff with equal jitter, the one every retry in keel uses.
//! - [`scope`]: the component tag that tells the hook where a panic came from.
//! - [`mod@isolate`]: run a closure or a future and get `Err(Panicked)` instead of an unwind.
//! - [`components`]: the state of every named long-lived part, as `/readyz` and the admin API see it.
//! - [`supervisor`]: restart named tasks after a panic, with backoff and an intensity limit.
//! - [`periodic`]: periodic jobs whose ticks are isolated one by one and timed.
//! - [`failpoints`]: named fault-injection points, configured from `KEEL_FAILPOINTS`.

pub mod backoff;
pub mod components;
pub mod failpoints;
pub mod forensics;
pub mod isolate;
pub mod panic;
pub mod periodic;
pub mod scope;
pub mod supervisor;

pub use isolate::{Panicked, isolate, isolate_async};
pub use scope::Scope;
