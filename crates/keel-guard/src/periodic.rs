//! Periodic jobs: a tick run on a fixed cadence, each tick isolated and timed.
//!
//! Jobs are started by [`crate::supervisor::Supervisor::every`]; the job loop itself runs under
//! the supervisor (a bug in the loop is restarted like any task), while a panicking tick is only
//! counted as a failed tick: the next one runs on schedule.
//!
//! Schedule: the first tick is due one interval after the job starts, the next ones every
//! interval after the previous tick was due (a fixed cadence, not "interval after the end of the
//! previous tick"). Ticks never overlap; a tick that overruns one or more due times skips them
//! (like `MissedTickBehavior::Skip`): the next tick is the next due time on the cadence.
//!
//! Each tick is recorded in `keel_job_tick_seconds{job}` (histogram) and in the in-memory
//! statistics ([`crate::components::Components::jobs`]); failed ticks are also counted in
//! `keel_job_tick_failures_total{job}`.
//!
//! [`JobHandle::run_now`] runs the job's tick now, [`JobHandle::run_with`] runs given work as a
//! tick (a manual run that differs from the scheduled one); both are recorded like any tick.
//!
//! Failpoint: `periodic.tick`, evaluated at the start of every tick (`run_now` and `run_with`
//! included), inside the isolation.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use time::OffsetDateTime;
use tokio::sync::{Notify, oneshot};
use tokio::time::{Instant, sleep_until};
use tokio_util::sync::CancellationToken;

use crate::components::Slot;
use crate::isolate::{Panicked, isolate_async};
use crate::scope::Scope;
use crate::supervisor::TaskError;

/// The shortest interval a job accepts; shorter ones are raised to it.
pub const MIN_INTERVAL: Duration = Duration::from_millis(1);

/// The longest interval a job accepts; longer ones are lowered to it.
pub const MAX_INTERVAL: Duration = Duration::from_secs(365 * 24 * 3600);

/// Why [`JobHandle::run_now`] did not return a tick's result.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RunNowError {
    /// The tick panicked (the panic hook has logged and counted it).
    #[error(transparent)]
    Panicked(#[from] Panicked),
    /// The job has stopped (the supervisor was cancelled); no tick was run.
    #[error("job {0} is stopped")]
    Stopped(String),
}

/// Controls a running periodic job. Cheap to clone.
#[derive(Clone)]
pub struct JobHandle {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for JobHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobHandle")
            .field("name", &self.shared.name)
            .field("interval", &self.interval())
            .finish()
    }
}

struct Shared {
    name: Arc<str>,
    interval: Mutex<Duration>,
    /// The job's registry entry: a new interval shows there at once, not at the next wake.
    slot: Slot,
    requests: Mutex<Requests>,
    /// Wakes the job loop: the interval changed or a tick was requested.
    wake: Notify,
}

#[derive(Default)]
struct Requests {
    waiters: Vec<oneshot::Sender<Result<(), Panicked>>>,
    /// Work given to [`JobHandle::run_with`], each run as a tick of its own.
    work: Vec<(TickFuture, oneshot::Sender<Result<(), Panicked>>)>,
    closed: bool,
}

impl JobHandle {
    /// The job name.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// The current interval between scheduled ticks.
    pub fn interval(&self) -> Duration {
        *self.shared.interval.lock()
    }

    /// Changes the interval (clamped to [`MIN_INTERVAL`]..=[`MAX_INTERVAL`]). The next tick is
    /// then due one new interval after the previous tick was due (or the job started); when that
    /// time has already passed, it runs at once. The cadence goes on from there.
    pub fn set_interval(&self, interval: Duration) {
        let interval = clamp_interval(interval);
        *self.shared.interval.lock() = interval;
        self.shared.slot.set_interval(interval);
        self.shared.wake.notify_one();
    }

    /// Runs a tick now and returns its result. Ticks never overlap: if a tick is running, this
    /// one starts after it; requests made before a tick starts share that tick. The schedule is
    /// not moved: the next scheduled tick stays due when it was.
    ///
    /// Fails with [`RunNowError::Stopped`] once the job has stopped.
    pub async fn run_now(&self) -> Result<(), RunNowError> {
        let (sender, receiver) = oneshot::channel();
        {
            let mut requests = self.shared.requests.lock();
            if requests.closed {
                return Err(RunNowError::Stopped(self.shared.name.to_string()));
            }
            requests.waiters.push(sender);
        }
        self.shared.wake.notify_one();
        match receiver.await {
            Ok(result) => result.map_err(RunNowError::Panicked),
            Err(_) => Err(RunNowError::Stopped(self.shared.name.to_string())),
        }
    }

    /// Runs `work` now as a tick of this job, instead of the job's own tick, and returns its
    /// output: like a tick it never overlaps another one, is isolated (a panic is
    /// [`RunNowError::Panicked`]), and is recorded in the job's statistics,
    /// `keel_job_tick_seconds` and, when it panics, `keel_job_tick_failures_total`. For a
    /// manual run that differs from the scheduled tick (one organisation's share, say) and
    /// whose result the caller needs. The schedule is not moved.
    ///
    /// Fails with [`RunNowError::Stopped`] once the job has stopped.
    pub async fn run_with<T, W>(&self, work: W) -> Result<T, RunNowError>
    where
        T: Send + 'static,
        W: Future<Output = T> + Send + 'static,
    {
        let (output_sender, output) = oneshot::channel();
        let tick: TickFuture = Box::pin(async move {
            // The caller may have given up waiting; nothing to do then.
            let _ = output_sender.send(work.await);
        });
        let (sender, receiver) = oneshot::channel();
        {
            let mut requests = self.shared.requests.lock();
            if requests.closed {
                return Err(RunNowError::Stopped(self.shared.name.to_string()));
            }
            requests.work.push((tick, sender));
        }
        self.shared.wake.notify_one();
        let stopped = || RunNowError::Stopped(self.shared.name.to_string());
        match receiver.await {
            // A tick that completed has sent its output.
            Ok(Ok(())) => output.await.map_err(|_| stopped()),
            Ok(Err(panicked)) => Err(RunNowError::Panicked(panicked)),
            Err(_) => Err(stopped()),
        }
    }

    /// Refuses further `run_now` and `run_with` requests and answers the pending ones with
    /// `Stopped`.
    pub(crate) fn close(&self) {
        let pending = {
            let mut requests = self.shared.requests.lock();
            requests.closed = true;
            (
                std::mem::take(&mut requests.waiters),
                std::mem::take(&mut requests.work),
            )
        };
        // Dropping a sender answers its `run_now` or `run_with` with `Stopped`.
        drop(pending);
    }
}

/// Clamps a job interval to [`MIN_INTERVAL`]..=[`MAX_INTERVAL`].
pub(crate) fn clamp_interval(interval: Duration) -> Duration {
    interval.clamp(MIN_INTERVAL, MAX_INTERVAL)
}

/// Builds the handle of a job and the task (for the supervisor) that runs its loop.
pub(crate) fn job<F, Fut>(
    name: Arc<str>,
    interval: Duration,
    slot: Slot,
    cancel: CancellationToken,
    tick: F,
) -> (
    JobHandle,
    impl FnMut(CancellationToken) -> JobLoop + Send + 'static,
)
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let shared = Arc::new(Shared {
        name,
        interval: Mutex::new(interval),
        slot: slot.clone(),
        requests: Mutex::new(Requests::default()),
        wake: Notify::new(),
    });
    let handle = JobHandle {
        shared: shared.clone(),
    };
    // The tick closure outlives a restart of the loop, so it is shared with each run. The lock
    // is held only while the closure makes the tick's future, never across an `.await`.
    let tick: Arc<Mutex<F>> = Arc::new(Mutex::new(tick));
    let run = move |_token: CancellationToken| -> JobLoop {
        let shared = shared.clone();
        let slot = slot.clone();
        let cancel = cancel.clone();
        let tick = tick.clone();
        let make = move || -> TickFuture {
            let mut tick = tick.lock();
            let future = (*tick)();
            drop(tick);
            Box::pin(future)
        };
        Box::pin(job_loop(shared, slot, cancel, make))
    };
    (handle, run)
}

/// The future of one run of a job loop.
pub(crate) type JobLoop =
    std::pin::Pin<Box<dyn Future<Output = Result<(), TaskError>> + Send + 'static>>;

type TickFuture = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// `t + d`, or `t` when that cannot be represented (intervals are clamped to a year, so it is
/// always representable in practice).
fn after(t: Instant, d: Duration) -> Instant {
    t.checked_add(d).unwrap_or(t)
}

async fn job_loop(
    shared: Arc<Shared>,
    slot: Slot,
    cancel: CancellationToken,
    mut make: impl FnMut() -> TickFuture + Send,
) -> Result<(), TaskError> {
    let mut interval = *shared.interval.lock();
    slot.set_interval(interval);
    // The due time of the previous scheduled tick (the start, before the first one).
    let mut anchor = Instant::now();
    let mut next = after(anchor, interval);
    loop {
        slot.set_next_tick(Some(next));
        let mut due = false;
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            () = shared.wake.notified() => {}
            () = sleep_until(next) => due = true,
        }

        let (waiters, work) = {
            let mut requests = shared.requests.lock();
            (
                std::mem::take(&mut requests.waiters),
                std::mem::take(&mut requests.work),
            )
        };
        if !waiters.is_empty() {
            let result = run_tick(&shared.name, &slot, &mut make).await;
            for waiter in waiters {
                // The caller may have given up waiting; nothing to do then.
                let _ = waiter.send(result.clone());
            }
        }
        for (tick, waiter) in work {
            let mut tick = Some(tick);
            let mut once =
                move || -> TickFuture { tick.take().unwrap_or_else(|| Box::pin(async {})) };
            let result = run_tick(&shared.name, &slot, &mut once).await;
            // The caller may have given up waiting; nothing to do then.
            let _ = waiter.send(result);
        }

        let current = *shared.interval.lock();
        if current != interval {
            interval = current;
            slot.set_interval(interval);
            next = after(anchor, interval).max(Instant::now());
            continue;
        }

        if due || Instant::now() >= next {
            let _ = run_tick(&shared.name, &slot, &mut make).await;
            anchor = next;
            next = after(anchor, interval);
            let now = Instant::now();
            if next <= now {
                // The tick overran: skip the due times it missed, keep the cadence.
                let behind = now.saturating_duration_since(anchor).as_nanos();
                let step = interval.as_nanos().max(1);
                let into_step = behind % step;
                let wait = u64::try_from(step.saturating_sub(into_step)).unwrap_or(u64::MAX);
                next = after(now, Duration::from_nanos(wait));
            }
        }
    }
    slot.set_next_tick(None);
    Ok(())
}

/// Runs one tick, isolated, and records it.
async fn run_tick(
    name: &Arc<str>,
    slot: &Slot,
    make: &mut (impl FnMut() -> TickFuture + Send),
) -> Result<(), Panicked> {
    let started = Instant::now();
    slot.tick_started(OffsetDateTime::now_utc());
    let result = isolate_async(Scope::new(name.clone()), async {
        fail::fail_point!("periodic.tick");
        make().await;
    })
    .await;
    let duration = started.elapsed();
    metrics::histogram!("keel_job_tick_seconds", "job" => name.to_string())
        .record(duration.as_secs_f64());
    if result.is_err() {
        metrics::counter!("keel_job_tick_failures_total", "job" => name.to_string()).increment(1);
    }
    slot.record_tick(started, duration, &result);
    result
}
