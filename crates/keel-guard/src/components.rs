//! The state of every named long-lived part of keel, as `/readyz` and the admin API see it.
//!
//! The [`crate::supervisor::Supervisor`] registers each task and periodic job it runs here and
//! keeps its entry up to date: state, restarts, last panic, and for jobs the tick statistics.
//! Readers take a [`Components::snapshot`], the names of the [`Components::degraded`] ones, or
//! the [`Components::jobs`] statistics; none of them waits on a running task.
//!
//! Every state change is mirrored in metrics:
//! - `keel_component_state{component, state}`: 1 for the current state, 0 for the others;
//! - `keel_component_degraded{component}`: 1 while the component is degraded, else 0.

use std::collections::VecDeque;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};
use serde::Serialize;
use time::OffsetDateTime;
use tokio::time::Instant;

use crate::isolate::Panicked;

/// The life-cycle state of a component. See `docs/supervision.md` for the transitions.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ComponentState {
    /// Registered; its first run has not begun yet.
    Starting,
    /// A run is in progress.
    Running,
    /// The last run failed; waiting out the backoff before the next one.
    Restarting,
    /// Past the restart intensity limit: still retried at the maximum backoff, and shown as
    /// degraded (readiness fails) until it has run cleanly for the reset period.
    Degraded,
    /// Finished: its task returned `Ok`, or the supervisor was cancelled.
    Stopped,
}

impl ComponentState {
    /// Every state, in life-cycle order.
    pub const ALL: [ComponentState; 5] = [
        ComponentState::Starting,
        ComponentState::Running,
        ComponentState::Restarting,
        ComponentState::Degraded,
        ComponentState::Stopped,
    ];

    /// The state's name, as serialized and as used in the `state` metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentState::Starting => "starting",
            ComponentState::Running => "running",
            ComponentState::Restarting => "restarting",
            ComponentState::Degraded => "degraded",
            ComponentState::Stopped => "stopped",
        }
    }
}

impl fmt::Display for ComponentState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of component an entry describes.
#[derive(Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ComponentKind {
    /// A long-lived task run by [`crate::supervisor::Supervisor::spawn`].
    Task,
    /// A periodic job run by [`crate::supervisor::Supervisor::every`].
    Job,
    /// A state reported from outside through a [`Probe`] (the database, this instance).
    Probe,
}

/// The last panic of a component, without the backtrace (that is in [`crate::panic::recent`]).
#[derive(Serialize, Clone, Debug, PartialEq, Eq)]
pub struct PanicSummary {
    /// The panic message.
    pub message: String,
    /// `file:line:column` of the panic, when known.
    pub location: Option<String>,
    /// When the panic was caught.
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

impl PanicSummary {
    /// A summary of `panicked`, timed now.
    pub fn from_panicked(panicked: &Panicked) -> Self {
        Self {
            message: panicked.message.clone(),
            location: panicked.location.clone(),
            at: OffsetDateTime::now_utc(),
        }
    }
}

/// One component, as seen from outside.
#[derive(Serialize, Clone, Debug)]
pub struct ComponentStatus {
    /// The component name (also the panic scope and the `component` metric label).
    pub name: String,
    /// Task or periodic job.
    pub kind: ComponentKind,
    /// The current state.
    pub state: ComponentState,
    /// When the state last changed.
    #[serde(with = "time::serde::rfc3339")]
    pub since: OffsetDateTime,
    /// How many times the component has been restarted after a failure.
    pub restarts: u64,
    /// The last panic of a run (tasks) or a tick (jobs).
    pub last_panic: Option<PanicSummary>,
    /// The last failure as text: the error a run returned, or the message of a panic.
    pub last_error: Option<String>,
    /// When the next restart is due, while the component waits out its backoff.
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_restart: Option<OffsetDateTime>,
    /// When the last tick started (jobs only).
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_tick: Option<OffsetDateTime>,
    /// When the next scheduled tick is due (jobs only, while the job runs).
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_tick: Option<OffsetDateTime>,
    /// What a probe says of itself (probes only).
    pub detail: Option<String>,
}

/// Tick statistics of one periodic job.
#[derive(Serialize, Clone, Debug)]
pub struct JobStats {
    /// The job name.
    pub name: String,
    /// The component state of the job loop.
    pub state: ComponentState,
    /// The current interval between scheduled ticks, in milliseconds.
    pub interval_ms: u64,
    /// Ticks run since start, failed ones included (scheduled and `run_now` alike).
    pub runs: u64,
    /// Ticks that panicked.
    pub failures: u64,
    /// Mean tick duration in milliseconds (0 before the first tick).
    pub avg_ms: f64,
    /// Shortest tick duration in milliseconds.
    pub min_ms: Option<f64>,
    /// Longest tick duration in milliseconds.
    pub max_ms: Option<f64>,
    /// Duration of the last tick in milliseconds.
    pub last_ms: Option<f64>,
    /// Ticks started in the last hour (counted in one-minute buckets).
    pub runs_last_hour: u64,
    /// When the last tick started.
    #[serde(with = "time::serde::rfc3339::option")]
    pub last_tick: Option<OffsetDateTime>,
    /// When the next scheduled tick is due.
    #[serde(with = "time::serde::rfc3339::option")]
    pub next_tick: Option<OffsetDateTime>,
    /// The message of the last failed tick, kept after later ticks succeed.
    pub last_error: Option<String>,
}

/// A component whose state is reported from outside ([`Components::probe`]): healthy
/// (running) or degraded, with the error that made it so, and a detail of its own.
#[derive(Clone)]
pub struct Probe(Slot);

impl fmt::Debug for Probe {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Probe")
            .field(&self.0.0.lock().status.name)
            .finish()
    }
}

impl Probe {
    /// Running again (a no-op when it is).
    pub fn healthy(&self) {
        self.0.set_state(ComponentState::Running);
    }

    /// Degraded by `error` (readiness fails while it is).
    pub fn degraded(&self, error: String) {
        self.0.record_error(error);
        self.0.set_state(ComponentState::Degraded);
    }

    /// Sets the detail shown with the component.
    pub fn set_detail(&self, detail: String) {
        self.0.0.lock().status.detail = Some(detail);
    }

    /// Whether it is degraded now.
    pub fn is_degraded(&self) -> bool {
        self.0.0.lock().status.state == ComponentState::Degraded
    }
}

/// The registry of components. Cheap to clone; all clones share the same entries.
#[derive(Clone, Default)]
pub struct Components {
    inner: Arc<RwLock<Vec<Slot>>>,
}

impl fmt::Debug for Components {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Components")
            .field("len", &self.inner.read().len())
            .finish()
    }
}

impl Components {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a probe: a component whose state is set from outside, running until told
    /// otherwise.
    pub fn probe(&self, name: &str) -> Probe {
        let slot = self.register(name, ComponentKind::Probe, None);
        slot.set_state(ComponentState::Running);
        Probe(slot)
    }

    /// Every component, in registration order.
    pub fn snapshot(&self) -> Vec<ComponentStatus> {
        self.slots().iter().map(Slot::status).collect()
    }

    /// One component by name.
    pub fn get(&self, name: &str) -> Option<ComponentStatus> {
        self.find(name).map(|slot| slot.status())
    }

    /// The names of the components currently degraded, in registration order.
    pub fn degraded(&self) -> Vec<String> {
        self.slots()
            .iter()
            .filter_map(|slot| {
                let entry = slot.0.lock();
                (entry.status.state == ComponentState::Degraded).then(|| entry.status.name.clone())
            })
            .collect()
    }

    /// The statistics of every periodic job, in registration order.
    pub fn jobs(&self) -> Vec<JobStats> {
        let now = Instant::now();
        self.slots()
            .iter()
            .filter_map(|slot| slot.job_stats(now))
            .collect()
    }

    /// The statistics of one periodic job by name.
    pub fn job(&self, name: &str) -> Option<JobStats> {
        self.find(name)
            .and_then(|slot| slot.job_stats(Instant::now()))
    }

    /// Registers a component. A name registered again replaces the earlier entry in the
    /// registry (the earlier run, if still alive, goes on updating only its own orphaned entry).
    pub(crate) fn register(
        &self,
        name: &str,
        kind: ComponentKind,
        interval: Option<Duration>,
    ) -> Slot {
        let status = ComponentStatus {
            name: name.to_owned(),
            kind,
            state: ComponentState::Starting,
            since: OffsetDateTime::now_utc(),
            restarts: 0,
            last_panic: None,
            last_error: None,
            next_restart: None,
            last_tick: None,
            next_tick: None,
            detail: None,
        };
        let job = interval.map(JobData::new);
        let slot = Slot(Arc::new(Mutex::new(Entry { status, job })));
        for state in ComponentState::ALL {
            let value = if state == ComponentState::Starting {
                1.0
            } else {
                0.0
            };
            metrics::gauge!("keel_component_state", "component" => name.to_owned(), "state" => state.as_str())
                .set(value);
        }
        metrics::gauge!("keel_component_degraded", "component" => name.to_owned()).set(0.0);
        metrics::counter!("keel_component_restarts_total", "component" => name.to_owned())
            .absolute(0);

        let mut slots = self.inner.write();
        let existing = slots.iter_mut().find(|s| s.0.lock().status.name == name);
        match existing {
            Some(existing) => {
                tracing::warn!(
                    component = name,
                    "component registered twice; the new one replaces it in the registry"
                );
                *existing = slot.clone();
            }
            None => slots.push(slot.clone()),
        }
        slot
    }

    fn slots(&self) -> Vec<Slot> {
        self.inner.read().clone()
    }

    fn find(&self, name: &str) -> Option<Slot> {
        self.inner
            .read()
            .iter()
            .find(|slot| slot.0.lock().status.name == name)
            .cloned()
    }
}

struct Entry {
    status: ComponentStatus,
    job: Option<JobData>,
}

/// Ticks per minute are kept for this many minutes, so `runs_last_hour` stays bounded in memory
/// whatever the interval.
const HOUR_BUCKETS: u64 = 60;

struct JobData {
    interval: Duration,
    runs: u64,
    failures: u64,
    total: Duration,
    min: Option<Duration>,
    max: Option<Duration>,
    last: Option<Duration>,
    last_error: Option<String>,
    next_tick: Option<Instant>,
    /// The reference point of the minute buckets.
    epoch: Instant,
    /// `(minute since epoch, ticks started in that minute)`, oldest first, at most
    /// [`HOUR_BUCKETS`] entries.
    minutes: VecDeque<(u64, u64)>,
}

impl JobData {
    fn new(interval: Duration) -> Self {
        Self {
            interval,
            runs: 0,
            failures: 0,
            total: Duration::ZERO,
            min: None,
            max: None,
            last: None,
            last_error: None,
            next_tick: None,
            epoch: Instant::now(),
            minutes: VecDeque::new(),
        }
    }

    fn minute(&self, at: Instant) -> u64 {
        at.saturating_duration_since(self.epoch).as_secs() / 60
    }

    fn record(&mut self, started: Instant, duration: Duration, error: Option<String>) {
        self.runs = self.runs.saturating_add(1);
        self.total = self.total.saturating_add(duration);
        self.min = Some(self.min.map_or(duration, |m| m.min(duration)));
        self.max = Some(self.max.map_or(duration, |m| m.max(duration)));
        self.last = Some(duration);
        if let Some(error) = error {
            self.failures = self.failures.saturating_add(1);
            self.last_error = Some(error);
        }
        let minute = self.minute(started);
        match self.minutes.back_mut() {
            Some((m, count)) if *m == minute => *count = count.saturating_add(1),
            _ => self.minutes.push_back((minute, 1)),
        }
        while self
            .minutes
            .front()
            .is_some_and(|(m, _)| m.saturating_add(HOUR_BUCKETS) <= minute)
        {
            self.minutes.pop_front();
        }
        // Ticks recorded out of order (never in practice) must not grow the deque either.
        while self.minutes.len() > HOUR_BUCKETS as usize {
            self.minutes.pop_front();
        }
    }

    fn runs_last_hour(&self, now: Instant) -> u64 {
        let minute = self.minute(now);
        self.minutes
            .iter()
            .filter(|(m, _)| m.saturating_add(HOUR_BUCKETS) > minute)
            .map(|(_, count)| *count)
            .sum()
    }
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Wall-clock time of a `tokio` instant (for display only).
pub(crate) fn wall_clock(at: Instant) -> OffsetDateTime {
    let now = Instant::now();
    let wall = OffsetDateTime::now_utc();
    if at >= now {
        wall.checked_add(time::Duration::try_from(at - now).unwrap_or(time::Duration::ZERO))
            .unwrap_or(wall)
    } else {
        wall.checked_sub(time::Duration::try_from(now - at).unwrap_or(time::Duration::ZERO))
            .unwrap_or(wall)
    }
}

/// The writable side of one component entry, held by the loop that runs the component.
#[derive(Clone)]
pub(crate) struct Slot(Arc<Mutex<Entry>>);

impl Slot {
    pub(crate) fn status(&self) -> ComponentStatus {
        let entry = self.0.lock();
        let mut status = entry.status.clone();
        if let Some(job) = &entry.job {
            status.next_tick = job.next_tick.map(wall_clock);
        }
        status
    }

    fn job_stats(&self, now: Instant) -> Option<JobStats> {
        let entry = self.0.lock();
        let job = entry.job.as_ref()?;
        let avg_ms = if job.runs == 0 {
            0.0
        } else {
            millis(job.total) / job.runs as f64
        };
        Some(JobStats {
            name: entry.status.name.clone(),
            state: entry.status.state,
            interval_ms: u64::try_from(job.interval.as_millis()).unwrap_or(u64::MAX),
            runs: job.runs,
            failures: job.failures,
            avg_ms,
            min_ms: job.min.map(millis),
            max_ms: job.max.map(millis),
            last_ms: job.last.map(millis),
            runs_last_hour: job.runs_last_hour(now),
            last_tick: entry.status.last_tick,
            next_tick: job.next_tick.map(wall_clock),
            last_error: job.last_error.clone(),
        })
    }

    /// Moves to `state` and updates the state metrics; returns the previous state.
    pub(crate) fn set_state(&self, state: ComponentState) -> ComponentState {
        let mut entry = self.0.lock();
        let previous = entry.status.state;
        if previous == state {
            return previous;
        }
        entry.status.state = state;
        entry.status.since = OffsetDateTime::now_utc();
        let name = entry.status.name.clone();
        drop(entry);
        metrics::gauge!("keel_component_state", "component" => name.clone(), "state" => previous.as_str())
            .set(0.0);
        metrics::gauge!("keel_component_state", "component" => name.clone(), "state" => state.as_str())
            .set(1.0);
        let degraded = if state == ComponentState::Degraded {
            1.0
        } else {
            0.0
        };
        metrics::gauge!("keel_component_degraded", "component" => name).set(degraded);
        previous
    }

    pub(crate) fn record_restart(&self, next_restart: OffsetDateTime) -> u64 {
        let mut entry = self.0.lock();
        entry.status.restarts = entry.status.restarts.saturating_add(1);
        entry.status.next_restart = Some(next_restart);
        let restarts = entry.status.restarts;
        let name = entry.status.name.clone();
        drop(entry);
        metrics::counter!("keel_component_restarts_total", "component" => name).increment(1);
        restarts
    }

    pub(crate) fn clear_next_restart(&self) {
        self.0.lock().status.next_restart = None;
    }

    pub(crate) fn record_panic(&self, panicked: &Panicked) {
        let mut entry = self.0.lock();
        entry.status.last_panic = Some(PanicSummary::from_panicked(panicked));
        entry.status.last_error = Some(panicked.message.clone());
    }

    pub(crate) fn record_error(&self, error: String) {
        self.0.lock().status.last_error = Some(error);
    }

    pub(crate) fn set_interval(&self, interval: Duration) {
        if let Some(job) = self.0.lock().job.as_mut() {
            job.interval = interval;
        }
    }

    pub(crate) fn set_next_tick(&self, next: Option<Instant>) {
        if let Some(job) = self.0.lock().job.as_mut() {
            job.next_tick = next;
        }
    }

    pub(crate) fn tick_started(&self, at: OffsetDateTime) {
        self.0.lock().status.last_tick = Some(at);
    }

    /// Records a finished tick.
    pub(crate) fn record_tick(
        &self,
        started: Instant,
        duration: Duration,
        result: &Result<(), Panicked>,
    ) {
        let mut entry = self.0.lock();
        if let Err(panicked) = result {
            entry.status.last_panic = Some(PanicSummary::from_panicked(panicked));
            entry.status.last_error = Some(panicked.message.clone());
        }
        if let Some(job) = entry.job.as_mut() {
            job.record(
                started,
                duration,
                result.as_ref().err().map(|p| p.message.clone()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minute_buckets_stay_bounded_and_count_the_last_hour() {
        let mut job = JobData::new(Duration::from_millis(1));
        let epoch = job.epoch;
        // One tick every 100 ms for three hours: 108 000 ticks.
        for i in 0..108_000u64 {
            job.record(
                epoch + Duration::from_millis(i * 100),
                Duration::from_millis(1),
                None,
            );
            assert!(job.minutes.len() <= HOUR_BUCKETS as usize);
        }
        let now = epoch + Duration::from_secs(3 * 3600);
        // Minutes 121..=179 are inside the window: 59 full minutes of 600 ticks.
        assert_eq!(job.runs_last_hour(now), 59 * 600);
        assert_eq!(job.runs, 108_000);
        assert_eq!(job.runs_last_hour(now + Duration::from_secs(2 * 3600)), 0);
    }

    #[test]
    fn stats_track_min_max_average_and_failures() {
        let components = Components::new();
        let slot =
            components.register("unit-job", ComponentKind::Job, Some(Duration::from_secs(1)));
        let now = Instant::now();
        for (ms, failed) in [(10, false), (30, true), (20, false)] {
            let result = if failed {
                Err(Panicked {
                    component: "unit-job".into(),
                    message: "bad tick".into(),
                    location: None,
                })
            } else {
                Ok(())
            };
            slot.record_tick(now, Duration::from_millis(ms), &result);
        }
        let stats = components.job("unit-job").unwrap();
        assert_eq!(stats.runs, 3);
        assert_eq!(stats.failures, 1);
        assert_eq!(stats.min_ms, Some(10.0));
        assert_eq!(stats.max_ms, Some(30.0));
        assert!((stats.avg_ms - 20.0).abs() < 1e-9);
        assert_eq!(stats.runs_last_hour, 3);
        assert_eq!(stats.last_error.as_deref(), Some("bad tick"));
        assert_eq!(
            components
                .get("unit-job")
                .unwrap()
                .last_panic
                .unwrap()
                .message,
            "bad tick"
        );
    }

    #[test]
    fn states_serialize_in_snake_case_and_degraded_is_listed() {
        let components = Components::new();
        let a = components.register("a", ComponentKind::Task, None);
        let _b = components.register("b", ComponentKind::Task, None);
        a.set_state(ComponentState::Degraded);
        assert_eq!(components.degraded(), vec!["a".to_owned()]);
        let json = serde_json::to_value(components.snapshot()).unwrap();
        assert_eq!(json[0]["state"], "degraded");
        assert_eq!(json[0]["kind"], "task");
        assert_eq!(json[1]["state"], "starting");
        assert!(components.jobs().is_empty());
    }
}
