//! Periodic jobs: schedule, isolation of ticks, statistics, `set_interval`, `run_now`,
//! `run_with`.
//!
//! Time is paused: the runtime jumps to the next timer whenever every task is idle, so tick
//! instants and durations are exact.

// Test code: a failed expectation is meant to fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use keel_guard::components::{ComponentKind, ComponentState, Components};
use keel_guard::periodic::RunNowError;
use keel_guard::supervisor::{RestartPolicy, Supervisor};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn supervisor() -> (Supervisor, CancellationToken, TaskTracker) {
    keel_guard::panic::install_hook();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let supervisor = Supervisor::new(
        Components::new(),
        RestartPolicy::default(),
        cancel.clone(),
        tracker.clone(),
    );
    (supervisor, cancel, tracker)
}

async fn next_tick(ticks: &mut mpsc::UnboundedReceiver<Instant>) -> Instant {
    tokio::time::timeout(Duration::from_secs(3600), ticks.recv())
        .await
        .expect("no tick within an hour")
        .expect("the job is gone")
}

/// Lets the job loop start (it runs when the test task yields; paused time does not move).
async fn until_running(supervisor: &Supervisor, name: &str) {
    tokio::time::timeout(Duration::from_secs(5), async {
        while supervisor.components().get(name).unwrap().state != ComponentState::Running {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
}

async fn shut_down(cancel: CancellationToken, tracker: TaskTracker) {
    cancel.cancel();
    tracker.close();
    tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .expect("the tracker did not finish");
}

#[tokio::test(start_paused = true)]
async fn a_panicking_tick_is_counted_and_the_next_runs_on_schedule() {
    let (supervisor, cancel, tracker) = supervisor();
    let (tx, mut ticks) = mpsc::unbounded_channel();
    let count = Arc::new(AtomicU32::new(0));
    let start = Instant::now();
    // Ticks take 10, 30 (then panic), 20 ms.
    let job = supervisor.every("tick-panics", ms(100), move || {
        let tx = tx.clone();
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tx.send(Instant::now()).unwrap();
            let took = match n {
                1 => 10,
                2 => 30,
                _ => 20,
            };
            tokio::time::sleep(ms(took)).await;
            if n == 2 {
                panic!("tick {n} failed");
            }
        }
    });
    assert_eq!(job.name(), "tick-panics");
    assert_eq!(job.interval(), ms(100));

    let mut at = Vec::new();
    for _ in 0..3 {
        at.push(next_tick(&mut ticks).await - start);
    }
    // First tick one interval after the start, then a fixed cadence, panic or not.
    assert_eq!(at, vec![ms(100), ms(200), ms(300)]);
    tokio::time::sleep_until(start + ms(350)).await;

    let stats = supervisor.components().job("tick-panics").unwrap();
    assert_eq!(stats.runs, 3);
    assert_eq!(stats.failures, 1);
    assert_eq!(stats.min_ms, Some(10.0));
    assert_eq!(stats.max_ms, Some(30.0));
    assert!((stats.avg_ms - 20.0).abs() < 1e-9, "{}", stats.avg_ms);
    assert_eq!(stats.last_ms, Some(20.0));
    assert_eq!(stats.interval_ms, 100);
    assert_eq!(stats.runs_last_hour, 3);
    assert_eq!(stats.last_error.as_deref(), Some("tick 2 failed"));
    assert!(stats.last_tick.is_some() && stats.next_tick.is_some());
    assert_eq!(supervisor.components().jobs().len(), 1);

    let status = supervisor.components().get("tick-panics").unwrap();
    assert_eq!(status.kind, ComponentKind::Job);
    // A failed tick is not a failed job: the loop keeps running, nothing restarted.
    assert_eq!(status.state, ComponentState::Running);
    assert_eq!(status.restarts, 0);
    assert_eq!(status.last_panic.unwrap().message, "tick 2 failed");
    // The panic hook saw it under the job's name.
    assert!(
        keel_guard::panic::recent()
            .iter()
            .any(|r| r.component == "tick-panics" && r.message == "tick 2 failed")
    );
    shut_down(cancel, tracker).await;
    assert_eq!(
        supervisor.components().get("tick-panics").unwrap().state,
        ComponentState::Stopped
    );
}

#[tokio::test(start_paused = true)]
async fn an_overrunning_tick_skips_the_missed_due_times() {
    let (supervisor, cancel, tracker) = supervisor();
    let (tx, mut ticks) = mpsc::unbounded_channel();
    let count = Arc::new(AtomicU32::new(0));
    let start = Instant::now();
    supervisor.every("slow", ms(100), move || {
        let tx = tx.clone();
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tx.send(Instant::now()).unwrap();
            if n == 1 {
                // Due at 100, ends at 350: the due times 200 and 300 are skipped.
                tokio::time::sleep(ms(250)).await;
            }
        }
    });
    let mut at = Vec::new();
    for _ in 0..3 {
        at.push(next_tick(&mut ticks).await - start);
    }
    assert_eq!(at, vec![ms(100), ms(400), ms(500)]);
    shut_down(cancel, tracker).await;
}

#[tokio::test(start_paused = true)]
async fn set_interval_takes_effect_for_the_next_tick() {
    let (supervisor, cancel, tracker) = supervisor();
    let (tx, mut ticks) = mpsc::unbounded_channel();
    let start = Instant::now();
    let job = supervisor.every("retuned", Duration::from_secs(3600), move || {
        let tx = tx.clone();
        async move {
            tx.send(Instant::now()).unwrap();
        }
    });
    until_running(&supervisor, "retuned").await;

    // Shorter: due 100 ms after the start, without waiting out the hour.
    job.set_interval(ms(100));
    assert_eq!(job.interval(), ms(100));
    assert_eq!(next_tick(&mut ticks).await - start, ms(100));
    assert_eq!(next_tick(&mut ticks).await - start, ms(200));

    // Longer: due 300 ms after the previous tick.
    job.set_interval(ms(300));
    assert_eq!(next_tick(&mut ticks).await - start, ms(500));
    assert_eq!(
        supervisor.components().job("retuned").unwrap().interval_ms,
        300
    );

    // Already elapsed: 250 ms after the tick at 500 we shorten to 200 ms, so it runs at once,
    // and the cadence goes on from there.
    tokio::time::sleep_until(start + ms(750)).await;
    job.set_interval(ms(200));
    assert_eq!(next_tick(&mut ticks).await - start, ms(750));
    assert_eq!(next_tick(&mut ticks).await - start, ms(950));

    // Out-of-range intervals are clamped.
    job.set_interval(Duration::ZERO);
    assert_eq!(job.interval(), keel_guard::periodic::MIN_INTERVAL);
    shut_down(cancel, tracker).await;
}

#[tokio::test(start_paused = true)]
async fn run_now_runs_a_tick_and_returns_its_result_without_overlap() {
    let (supervisor, cancel, tracker) = supervisor();
    let count = Arc::new(AtomicU32::new(0));
    let in_tick = Arc::new(AtomicBool::new(false));
    let overlapped = Arc::new(AtomicBool::new(false));
    let (ticks, in_tick2, overlapped2) = (count.clone(), in_tick.clone(), overlapped.clone());
    let job = supervisor.every("on-demand", Duration::from_secs(3600), move || {
        let n = ticks.fetch_add(1, Ordering::SeqCst) + 1;
        let (in_tick, overlapped) = (in_tick2.clone(), overlapped2.clone());
        async move {
            if in_tick.swap(true, Ordering::SeqCst) {
                overlapped.store(true, Ordering::SeqCst);
            }
            tokio::time::sleep(ms(10)).await;
            in_tick.store(false, Ordering::SeqCst);
            if n == 2 {
                panic!("release-stuck failed");
            }
        }
    });

    let start = Instant::now();
    job.run_now().await.unwrap();
    assert_eq!(count.load(Ordering::SeqCst), 1);
    assert_eq!(start.elapsed(), ms(10));

    let err = job.run_now().await.unwrap_err();
    match err {
        RunNowError::Panicked(p) => {
            assert_eq!(p.component, "on-demand");
            assert_eq!(p.message, "release-stuck failed");
        }
        other => panic!("unexpected {other:?}"),
    }

    // Concurrent requests: a tick is running when the others arrive; they share the next one.
    let (a, b, c) = tokio::join!(job.run_now(), job.run_now(), job.run_now());
    assert!(a.is_ok() && b.is_ok() && c.is_ok());
    assert!(!overlapped.load(Ordering::SeqCst));
    let after_concurrent = count.load(Ordering::SeqCst);
    assert!((3..=5).contains(&after_concurrent), "{after_concurrent}");

    let stats = supervisor.components().job("on-demand").unwrap();
    assert_eq!(stats.runs, u64::from(after_concurrent));
    assert_eq!(stats.failures, 1);
    // The schedule did not move: the next tick is still an hour after the start.
    let next = supervisor.components().get("on-demand").unwrap().next_tick;
    assert!(next.is_some());

    shut_down(cancel, tracker).await;
    assert!(matches!(job.run_now().await, Err(RunNowError::Stopped(name)) if name == "on-demand"));
}

#[tokio::test(start_paused = true)]
async fn runs_in_the_last_hour_are_counted_by_minute() {
    let (supervisor, cancel, tracker) = supervisor();
    let start = Instant::now();
    supervisor.every("ten-minutes", Duration::from_secs(600), || async {});
    // Ticks at 10, 20, ..., 120 minutes.
    tokio::time::sleep_until(start + Duration::from_secs(7200) + ms(1)).await;
    let stats = supervisor.components().job("ten-minutes").unwrap();
    assert_eq!(stats.runs, 12);
    // Minutes 61..=120 are inside the window: the ticks at 70, 80, ..., 120.
    assert_eq!(stats.runs_last_hour, 6);
    shut_down(cancel, tracker).await;
}

#[tokio::test(start_paused = true)]
async fn run_with_runs_work_as_a_counted_tick_that_never_overlaps_one() {
    let (supervisor, cancel, tracker) = supervisor();
    let in_tick = Arc::new(AtomicBool::new(false));
    let flag = in_tick.clone();
    let job = supervisor.every("manual", ms(100), move || {
        let flag = flag.clone();
        async move {
            flag.store(true, Ordering::SeqCst);
            tokio::time::sleep(ms(50)).await;
            flag.store(false, Ordering::SeqCst);
        }
    });
    // Wait into the first scheduled tick, then ask for manual work: it waits for the tick.
    tokio::time::sleep(ms(110)).await;
    assert!(in_tick.load(Ordering::SeqCst));
    let flag = in_tick.clone();
    let output = job
        .run_with(async move { (flag.load(Ordering::SeqCst), 42) })
        .await
        .unwrap();
    assert_eq!(output, (false, 42), "ran after the tick, not during it");

    let failed = job.run_with(async { panic!("manual run failed") }).await;
    assert!(matches!(failed, Err(RunNowError::Panicked(p)) if p.message == "manual run failed"));

    let stats = supervisor.components().job("manual").unwrap();
    assert_eq!(stats.runs, 3, "one scheduled tick and two manual runs");
    assert_eq!(stats.failures, 1);

    shut_down(cancel, tracker).await;
    assert!(matches!(
        job.run_with(async {}).await,
        Err(RunNowError::Stopped(name)) if name == "manual"
    ));
}
