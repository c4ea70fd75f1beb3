//! The process-wide panic hook and the registry of recent panics.
//!
//! For each panic the hook, in this order: writes one line to stderr synchronously (component,
//! message, location); captures a backtrace unless the rate limit says otherwise, in its short
//! form ([`crate::forensics::short_backtrace`]) unless [`set_full_backtraces`] asked for the
//! whole; counts it per component (published as `keel_panics_total{component}` by
//! [`export_metrics`]); hands the report to the reporter (the logger, which turns it into an
//! `error` stream record); keeps it in a bounded list of recent panics and counts it in its
//! group ([`groups`]: one per fingerprint, location plus message shape).
//!
//! Re-entry: the standard library aborts the process when a panic starts while the hook runs
//! on the same thread ("panicked while processing panic"), before any hook could be entered
//! again. So the hook's guard against re-entry is that it cannot panic:
//! - it formats only owned strings, never `unwrap`s, indexes or slices;
//! - the reporter it calls (the logger's) only builds an owned record and `try_send`s it;
//! - it takes no lock the logger can hold: the reporter is loaded lock-free (`arc-swap`), and
//!   the recent list has its own lock, taken with a timeout, never waited on forever.
//!
//! Panics on other threads run the hook concurrently; everything it touches is thread-safe.

use std::backtrace::Backtrace;
use std::cell::Cell;
use std::collections::{BTreeMap, VecDeque};
use std::io::Write;
use std::sync::Arc;
use std::sync::Once;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use parking_lot::Mutex;
use serde::Serialize;
use time::OffsetDateTime;

use crate::forensics;
use crate::scope;

/// Component name of a panic raised outside any [`crate::Scope`].
pub const UNSCOPED: &str = "unscoped";

/// How many recent panics the registry keeps.
pub const RECENT_CAPACITY: usize = 100;

/// How many groups of panics (distinct fingerprints) the registry keeps; when a new one comes
/// beyond that, the group seen least recently is forgotten.
pub const GROUPS_CAPACITY: usize = 1000;

/// How many request ids each group keeps (the most recent).
pub const GROUP_REQUEST_IDS: usize = 5;

/// Backtraces captured per second at most, by default; beyond that a panic is reported with its
/// message and location only, and counted in `keel_panic_backtraces_skipped_total`.
pub const DEFAULT_BACKTRACES_PER_SECOND: u32 = 5;

/// One panic, as the hook saw it.
#[derive(Debug, Clone, Serialize)]
pub struct PanicReport {
    /// The component the panicking code ran under ([`UNSCOPED`] when none).
    pub component: String,
    /// Extra detail from the scope, such as the HTTP route.
    pub context: Option<String>,
    /// The panic message.
    pub message: String,
    /// `file:line:column`.
    pub location: Option<String>,
    /// The name of the panicking thread.
    pub thread: Option<String>,
    /// The backtrace, unless the rate limit skipped it.
    pub backtrace: Option<String>,
    /// True when the backtrace was skipped by the rate limit.
    pub backtrace_skipped: bool,
    /// The panic's group: location plus message shape ([`crate::forensics::fingerprint`]).
    pub fingerprint: String,
    /// The request being handled, when the panic happened in one.
    pub request_id: Option<String>,
    /// When it happened.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

/// The panics that share a fingerprint: one bug, however often it fires.
#[derive(Debug, Clone, Serialize)]
pub struct PanicGroup {
    /// Location plus message shape, hashed ([`crate::forensics::fingerprint`]).
    pub fingerprint: String,
    /// The component of the latest panic of the group.
    pub component: String,
    /// `file:line:column`.
    pub location: Option<String>,
    /// The message with numbers and hex ids replaced ([`crate::forensics::message_shape`]).
    pub message_shape: String,
    /// The message of the latest panic of the group.
    pub last_message: String,
    /// Panics of the group since the process started (or since the group was last evicted).
    pub count: u64,
    /// The first panic of the group.
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: OffsetDateTime,
    /// The latest panic of the group.
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
    /// The request ids of the latest panics of the group that had one, oldest first (at most
    /// [`GROUP_REQUEST_IDS`]).
    pub recent_request_ids: VecDeque<String>,
}

/// Receives every panic report; the logger installs one. It runs inside the panic hook, so it
/// must not panic (that would abort the process) and must not block.
pub type Reporter = dyn Fn(&PanicReport) + Send + Sync;

static INSTALL: Once = Once::new();
static REPORTER: ArcSwapOption<Box<Reporter>> = ArcSwapOption::const_empty();
static TOTAL: AtomicU64 = AtomicU64::new(0);
static BY_COMPONENT: Mutex<BTreeMap<String, u64>> = parking_lot::const_mutex(BTreeMap::new());
static BACKTRACES_SKIPPED: AtomicU64 = AtomicU64::new(0);
static RECENT: Mutex<VecDeque<PanicReport>> = parking_lot::const_mutex(VecDeque::new());
static GROUPS: Mutex<BTreeMap<String, PanicGroup>> = parking_lot::const_mutex(BTreeMap::new());
static FULL_BACKTRACES: AtomicBool = AtomicBool::new(false);
static BACKTRACES_PER_SECOND: AtomicU32 = AtomicU32::new(DEFAULT_BACKTRACES_PER_SECOND);
/// The backtrace budget: the wall-clock second it counts (high bits) and the backtraces taken
/// in it (the low [`COUNT_BITS`]), one value so that a new second and its count change together.
static BACKTRACE_BUDGET: AtomicU64 = AtomicU64::new(0);
const COUNT_BITS: u32 = 24;

thread_local! {
    static LAST_LOCATION: Cell<Option<String>> = const { Cell::new(None) };
}

/// Installs keel's panic hook. Safe to call many times: only the first call installs it.
pub fn install_hook() {
    INSTALL.call_once(|| std::panic::set_hook(Box::new(hook)));
}

/// Sets (or replaces) the reporter that receives every panic report.
pub fn set_reporter(reporter: Box<Reporter>) {
    REPORTER.store(Some(Arc::new(reporter)));
}

/// Removes the reporter; panics are then only written to stderr, counted and kept.
pub fn clear_reporter() {
    REPORTER.store(None);
}

/// Sets how many backtraces the hook captures per second at most.
pub fn set_backtraces_per_second(limit: u32) {
    BACKTRACES_PER_SECOND.store(limit, Ordering::Relaxed);
}

/// Whether panic reports carry the whole captured backtrace (`true`) or its short form, the
/// frames from the panicking code to the task's entry (`false`, the default).
pub fn set_full_backtraces(full: bool) {
    FULL_BACKTRACES.store(full, Ordering::Relaxed);
}

/// How many panics the hook has seen since the process started.
pub fn total() -> u64 {
    TOTAL.load(Ordering::Relaxed)
}

/// How many panics each component has had since the process started.
pub fn counts_by_component() -> Vec<(String, u64)> {
    BY_COMPONENT
        .lock()
        .iter()
        .map(|(component, count)| (component.clone(), *count))
        .collect()
}

/// Counts panics of `components` from now on even before their first panic, so
/// `keel_panics_total{component}` exists at 0 from the start.
pub fn track_components(components: &[&str]) {
    let mut counts = BY_COMPONENT.lock();
    for component in components {
        counts.entry((*component).to_owned()).or_insert(0);
    }
}

/// Publishes the counts to the metrics recorder: `keel_panics_total{component}` and
/// `keel_panic_backtraces_skipped_total`. `GET /metrics` calls it before rendering, so the
/// exposition is always current. The hook itself never touches the recorder: the recorder's
/// registry has locks that other code, the logger's among it, may hold when it panics.
pub fn export_metrics() {
    for (component, count) in counts_by_component() {
        metrics::counter!("keel_panics_total", "component" => component).absolute(count);
    }
    metrics::counter!("keel_panic_backtraces_skipped_total")
        .absolute(BACKTRACES_SKIPPED.load(Ordering::Relaxed));
}

/// The most recent panics, newest last (at most [`RECENT_CAPACITY`]).
pub fn recent() -> Vec<PanicReport> {
    RECENT.lock().iter().cloned().collect()
}

/// The groups of panics, the most recently seen first.
pub fn groups() -> Vec<PanicGroup> {
    let mut groups: Vec<PanicGroup> = GROUPS.lock().values().cloned().collect();
    groups.sort_by_key(|group| std::cmp::Reverse(group.last_seen));
    groups
}

/// The location of the last panic seen on this thread (used by [`crate::Panicked`]).
pub(crate) fn last_panic_location() -> Option<String> {
    LAST_LOCATION.try_with(Cell::take).ok().flatten()
}

/// The message of a panic payload: the `&str` or `String` it carries, or a placeholder.
pub fn payload_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "<non-string panic payload>".to_owned()
    }
}

fn hook(info: &std::panic::PanicHookInfo<'_>) {
    // One instant for the report and for the backtrace budget: the record's second is the
    // second whose budget paid for its backtrace.
    let at = OffsetDateTime::now_utc();
    let scope = scope::current();
    let component = scope
        .as_ref()
        .map_or_else(|| UNSCOPED.to_owned(), |s| s.component.to_string());
    let request_id = scope
        .as_ref()
        .and_then(|s| s.request_id.as_ref().map(|r| r.to_string()));
    let context = scope.and_then(|s| s.context.map(|c| c.to_string()));
    let message = payload_message(info.payload());
    let location = info
        .location()
        .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()));
    let _ = LAST_LOCATION.try_with(|cell| cell.set(location.clone()));
    let thread = std::thread::current().name().map(str::to_owned);

    let _ = writeln!(
        std::io::stderr(),
        "keel: panic component={component}{} message={message:?} location={}",
        context
            .as_deref()
            .map(|c| format!(" context={c:?}"))
            .unwrap_or_default(),
        location.as_deref().unwrap_or("unknown"),
    );

    let second = at.unix_timestamp().unsigned_abs();
    let limit = BACKTRACES_PER_SECOND.load(Ordering::Relaxed);
    let backtrace = take_backtrace_token(&BACKTRACE_BUDGET, second, limit).then(|| {
        let full = Backtrace::force_capture().to_string();
        if FULL_BACKTRACES.load(Ordering::Relaxed) {
            full
        } else {
            forensics::short_backtrace(&full)
        }
    });
    let backtrace_skipped = backtrace.is_none();
    if backtrace_skipped {
        BACKTRACES_SKIPPED.fetch_add(1, Ordering::Relaxed);
    }

    TOTAL.fetch_add(1, Ordering::Relaxed);
    if let Some(mut counts) = BY_COMPONENT.try_lock_for(Duration::from_millis(50)) {
        *counts.entry(component.clone()).or_insert(0) += 1;
    }

    let shape = forensics::message_shape(&message);
    let fingerprint = forensics::fingerprint(location.as_deref(), &shape);
    let report = PanicReport {
        component,
        context,
        message,
        location,
        thread,
        backtrace,
        backtrace_skipped,
        fingerprint,
        request_id,
        at,
    };
    if let Some(mut groups) = GROUPS.try_lock_for(Duration::from_millis(50)) {
        count_in_group(&mut groups, &report, shape);
    }

    if let Some(reporter) = REPORTER.load_full() {
        reporter(&report);
    }

    // Nothing holds this lock for long; the timeout only guards against the unthinkable.
    if let Some(mut recent) = RECENT.try_lock_for(Duration::from_millis(50)) {
        if recent.len() >= RECENT_CAPACITY {
            recent.pop_front();
        }
        recent.push_back(report);
    }
}

/// Counts `report` in its group, making the group when it is the first of its fingerprint (and
/// forgetting the least recently seen group when there are [`GROUPS_CAPACITY`] already).
fn count_in_group(groups: &mut BTreeMap<String, PanicGroup>, report: &PanicReport, shape: String) {
    if !groups.contains_key(&report.fingerprint) && groups.len() >= GROUPS_CAPACITY {
        let stalest = groups
            .values()
            .min_by_key(|group| group.last_seen)
            .map(|group| group.fingerprint.clone());
        if let Some(stalest) = stalest {
            groups.remove(&stalest);
        }
    }
    let group = groups
        .entry(report.fingerprint.clone())
        .or_insert_with(|| PanicGroup {
            fingerprint: report.fingerprint.clone(),
            component: report.component.clone(),
            location: report.location.clone(),
            message_shape: shape,
            last_message: String::new(),
            count: 0,
            first_seen: report.at,
            last_seen: report.at,
            recent_request_ids: VecDeque::new(),
        });
    group.count += 1;
    group.last_seen = report.at;
    group.component.clone_from(&report.component);
    group.last_message.clone_from(&report.message);
    if let Some(request_id) = &report.request_id {
        if group.recent_request_ids.len() >= GROUP_REQUEST_IDS {
            group.recent_request_ids.pop_front();
        }
        group.recent_request_ids.push_back(request_id.clone());
    }
}

/// True when a backtrace may be taken for a panic of wall-clock `second`: at most `limit` per
/// second. A panic of a second older than the one being counted (its thread was overtaken) is
/// refused, since that second's count is gone. Atomics only: the hook never waits here.
fn take_backtrace_token(budget: &AtomicU64, second: u64, limit: u32) -> bool {
    let mask = (1u64 << COUNT_BITS) - 1;
    let second = second & (u64::MAX >> COUNT_BITS);
    let mut current = budget.load(Ordering::Relaxed);
    loop {
        let (counted_second, taken) = (current >> COUNT_BITS, current & mask);
        let taken = match counted_second.cmp(&second) {
            std::cmp::Ordering::Equal => taken,
            std::cmp::Ordering::Less => 0,
            std::cmp::Ordering::Greater => return false,
        };
        if taken >= u64::from(limit).min(mask) {
            return false;
        }
        let next = (second << COUNT_BITS) | (taken + 1);
        match budget.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return true,
            Err(seen) => current = seen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::isolate;

    #[test]
    fn the_hook_keeps_a_report_with_component_message_location_and_backtrace() {
        install_hook();
        let before = total();
        let _ = isolate("hook-test", || panic!("kept {}", "here"));
        assert!(total() > before);
        let report = recent()
            .into_iter()
            .rev()
            .find(|r| r.component == "hook-test")
            .unwrap();
        assert_eq!(report.message, "kept here");
        assert!(report.location.unwrap().contains("panic.rs"));
        // The rate limit is shared by the whole test binary; a backtrace is present or counted.
        assert!(report.backtrace.is_some() || report.backtrace_skipped);
    }

    #[test]
    fn a_storm_of_panics_captures_only_a_few_backtraces() {
        install_hook();
        for _ in 0..50 {
            let _ = isolate("storm-test", || panic!("storm"));
        }
        let storm: Vec<_> = recent()
            .into_iter()
            .filter(|r| r.component == "storm-test")
            .collect();
        assert_eq!(storm.len(), 50);
        // At most the limit in each second of the reports' own times.
        let mut by_second: BTreeMap<i64, u32> = BTreeMap::new();
        for report in storm.iter().filter(|r| r.backtrace.is_some()) {
            *by_second.entry(report.at.unix_timestamp()).or_default() += 1;
        }
        assert!(
            by_second
                .values()
                .all(|n| *n <= DEFAULT_BACKTRACES_PER_SECOND),
            "{by_second:?}"
        );
        assert!(storm.iter().any(|r| r.backtrace_skipped));
    }

    #[test]
    fn the_backtrace_budget_gives_the_limit_per_second_to_racing_threads() {
        let budget = AtomicU64::new(0);
        let taken = AtomicU32::new(0);
        std::thread::scope(|threads| {
            for _ in 0..8 {
                threads.spawn(|| {
                    for _ in 0..1_000 {
                        if take_backtrace_token(&budget, 1_000, 5) {
                            taken.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
            }
        });
        assert_eq!(taken.load(Ordering::Relaxed), 5);
        // The next second has its own five; a panic of the second before it gets none.
        let next: Vec<bool> = (0..7)
            .map(|_| take_backtrace_token(&budget, 1_001, 5))
            .collect();
        assert_eq!(next.iter().filter(|t| **t).count(), 5);
        assert!(!take_backtrace_token(&budget, 1_000, 5));
        assert!(!take_backtrace_token(&budget, 1_001, 5));
        assert!(take_backtrace_token(&budget, 1_002, 5));
    }

    #[test]
    fn the_reporter_receives_each_panic_once() {
        use std::sync::atomic::AtomicUsize;
        install_hook();
        static SEEN: AtomicUsize = AtomicUsize::new(0);
        set_reporter(Box::new(|report| {
            if report.component == "reporter-test" {
                SEEN.fetch_add(1, Ordering::SeqCst);
            }
        }));
        let _ = isolate("reporter-test", || panic!("one"));
        let _ = isolate("reporter-test", || panic!("two"));
        assert_eq!(SEEN.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn a_panic_caught_inside_isolated_code_is_reported_on_its_own() {
        install_hook();
        let err = isolate("outer-test", || {
            let inner = isolate("inner-test", || panic!("inner"));
            assert!(inner.is_err());
            panic!("outer")
        })
        .unwrap_err();
        assert_eq!(err.message, "outer");
        let reports = recent();
        let inner = reports
            .iter()
            .rev()
            .find(|r| r.component == "inner-test")
            .unwrap();
        let outer = reports
            .iter()
            .rev()
            .find(|r| r.component == "outer-test")
            .unwrap();
        assert_eq!(inner.message, "inner");
        assert_eq!(outer.message, "outer");
    }
}
