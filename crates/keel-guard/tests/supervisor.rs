//! Supervised tasks: backoff, the intensity limit, degraded and recovery, reset, cancellation.
//!
//! Time is paused: the runtime jumps to the next timer whenever every task is idle, so the
//! instants a task records are exact.

// Test code: a failed expectation is meant to fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use keel_guard::components::{ComponentKind, ComponentState, Components};
use keel_guard::supervisor::{RestartPolicy, Supervisor, TaskError};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn policy() -> RestartPolicy {
    RestartPolicy {
        initial_backoff: ms(10),
        max_backoff: ms(200),
        reset_after: ms(1000),
        max_restarts: 3,
        within: ms(10_000),
    }
}

fn supervisor(policy: RestartPolicy) -> (Supervisor, CancellationToken, TaskTracker) {
    keel_guard::panic::install_hook();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let supervisor = Supervisor::new(Components::new(), policy, cancel.clone(), tracker.clone());
    (supervisor, cancel, tracker)
}

fn state(supervisor: &Supervisor, name: &str) -> ComponentState {
    supervisor.components().get(name).unwrap().state
}

/// Receives the next run start, failing the test if none comes within a (virtual) minute.
async fn next_run(runs: &mut mpsc::UnboundedReceiver<Instant>) -> Instant {
    tokio::time::timeout(Duration::from_secs(60), runs.recv())
        .await
        .expect("no run within a minute")
        .expect("the task is gone")
}

async fn shut_down(cancel: CancellationToken, tracker: TaskTracker) {
    cancel.cancel();
    tracker.close();
    tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .expect("the tracker did not finish");
}

#[tokio::test(start_paused = true)]
async fn a_crashing_task_backs_off_degrades_keeps_retrying_and_recovers() {
    let (supervisor, cancel, tracker) = supervisor(policy());
    let (tx, mut runs) = mpsc::unbounded_channel();
    // Runs 1..=6 panic at once; run 7 runs cleanly until cancelled.
    let count = Arc::new(AtomicU32::new(0));
    supervisor.spawn("crashy", move |token: CancellationToken| {
        let tx = tx.clone();
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tx.send(Instant::now()).unwrap();
            if n <= 6 {
                panic!("crash {n}");
            }
            token.cancelled().await;
            Ok::<(), TaskError>(())
        }
    });
    let status = supervisor.components().get("crashy").unwrap();
    assert_eq!(status.kind, ComponentKind::Task);
    assert_eq!(status.state, ComponentState::Starting);

    let mut starts = Vec::new();
    for _ in 0..5 {
        starts.push(next_run(&mut runs).await);
    }
    let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    // Doubling from 10 ms; the 4th restart is past the limit of 3 within 10 s, so the component
    // is degraded and waits the maximum backoff (200 ms) instead of 80 ms.
    assert_eq!(gaps, vec![ms(10), ms(20), ms(40), ms(200)]);

    // Between run 5 (which failed at once) and run 6: 5 restarts, degraded.
    tokio::time::sleep_until(starts[4] + ms(100)).await;
    assert_eq!(state(&supervisor, "crashy"), ComponentState::Degraded);
    assert_eq!(
        supervisor.components().degraded(),
        vec!["crashy".to_owned()]
    );
    let status = supervisor.components().get("crashy").unwrap();
    assert_eq!(status.restarts, 5);
    assert!(status.next_restart.is_some());
    let last_panic = status.last_panic.unwrap();
    assert_eq!(last_panic.message, "crash 5");
    assert!(last_panic.location.unwrap().contains("supervisor.rs"));

    // Still retried, slowly.
    let run6 = next_run(&mut runs).await;
    assert_eq!(run6 - starts[4], ms(200));
    let run7 = next_run(&mut runs).await;
    assert_eq!(run7 - run6, ms(200));
    assert_eq!(state(&supervisor, "crashy"), ComponentState::Degraded);

    // Run 7 is clean: degraded until it has run for `reset_after`, then running again.
    tokio::time::sleep_until(run7 + ms(999)).await;
    assert_eq!(state(&supervisor, "crashy"), ComponentState::Degraded);
    tokio::time::sleep_until(run7 + ms(1001)).await;
    assert_eq!(state(&supervisor, "crashy"), ComponentState::Running);
    assert!(supervisor.components().degraded().is_empty());
    assert_eq!(supervisor.components().get("crashy").unwrap().restarts, 6);

    shut_down(cancel, tracker).await;
    assert_eq!(state(&supervisor, "crashy"), ComponentState::Stopped);
}

#[tokio::test(start_paused = true)]
async fn the_backoff_resets_after_a_clean_period() {
    let (supervisor, cancel, tracker) = supervisor(RestartPolicy {
        reset_after: ms(100),
        ..policy()
    });
    let (tx, mut runs) = mpsc::unbounded_channel();
    let count = Arc::new(AtomicU32::new(0));
    supervisor.spawn("resets", move |token: CancellationToken| {
        let tx = tx.clone();
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tx.send(Instant::now()).unwrap();
            match n {
                // Runs 1-3 fail at once (backoff 10, 20, 40 ms).
                1..=3 => panic!("early crash"),
                // Run 4 is clean for 150 ms, then fails: the next backoff is 10 ms again.
                4 => {
                    tokio::time::sleep(ms(150)).await;
                    Err::<(), TaskError>("late failure".into())
                }
                // Run 5 fails at once: 20 ms.
                5 => panic!("crash after reset"),
                _ => {
                    token.cancelled().await;
                    Ok(())
                }
            }
        }
    });
    let mut starts = Vec::new();
    for _ in 0..6 {
        starts.push(next_run(&mut runs).await);
    }
    let gaps: Vec<Duration> = starts.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(gaps, vec![ms(10), ms(20), ms(40), ms(150 + 10), ms(20)]);
    let status = supervisor.components().get("resets").unwrap();
    assert_eq!(status.state, ComponentState::Running);
    assert_eq!(status.restarts, 5);
    // Five restarts but the history was cleared by the clean run: not degraded.
    assert!(supervisor.components().degraded().is_empty());
    shut_down(cancel, tracker).await;
}

#[tokio::test(start_paused = true)]
async fn an_error_is_restarted_and_recorded_and_ok_stops_for_good() {
    let (supervisor, cancel, tracker) = supervisor(policy());
    let (tx, mut runs) = mpsc::unbounded_channel();
    let count = Arc::new(AtomicU32::new(0));
    let runs_seen = count.clone();
    supervisor.spawn("fallible", move |_token| {
        let tx = tx.clone();
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tx.send(Instant::now()).unwrap();
            if n == 1 {
                return Err::<(), TaskError>("database unreachable".into());
            }
            Ok(())
        }
    });
    let first = next_run(&mut runs).await;
    let second = next_run(&mut runs).await;
    assert_eq!(second - first, ms(10));
    // Poll until the second run's `Ok` is recorded.
    tokio::time::timeout(Duration::from_secs(5), async {
        while state(&supervisor, "fallible") != ComponentState::Stopped {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    let status = supervisor.components().get("fallible").unwrap();
    assert_eq!(status.restarts, 1);
    assert_eq!(status.last_error.as_deref(), Some("database unreachable"));
    assert!(status.last_panic.is_none());
    // Not restarted after `Ok`, however long we wait.
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(runs_seen.load(Ordering::SeqCst), 2);
    shut_down(cancel, tracker).await;
}

#[tokio::test(start_paused = true)]
async fn cancellation_stops_running_and_restarting_tasks_and_jobs() {
    let (supervisor, cancel, tracker) = supervisor(RestartPolicy {
        initial_backoff: Duration::from_secs(30),
        max_backoff: Duration::from_secs(60),
        ..policy()
    });
    let (tx, mut runs) = mpsc::unbounded_channel();
    supervisor.spawn("worker", move |token: CancellationToken| {
        let tx = tx.clone();
        async move {
            tx.send(Instant::now()).unwrap();
            token.cancelled().await;
            Ok::<(), TaskError>(())
        }
    });
    let (crash_tx, mut crashes) = mpsc::unbounded_channel();
    supervisor.spawn("in-backoff", move |_token| {
        let crash_tx = crash_tx.clone();
        async move {
            crash_tx.send(Instant::now()).unwrap();
            panic!("always");
        }
    });
    let job = supervisor.every("ticker", ms(100), || async {});
    next_run(&mut runs).await;
    next_run(&mut crashes).await;
    tokio::time::timeout(Duration::from_secs(5), async {
        while state(&supervisor, "in-backoff") != ComponentState::Restarting
            || state(&supervisor, "ticker") != ComponentState::Running
        {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();

    let started = Instant::now();
    shut_down(cancel, tracker).await;
    // Nobody waited out the 30 s backoff.
    assert!(started.elapsed() < Duration::from_secs(1));
    for status in supervisor.components().snapshot() {
        assert_eq!(status.state, ComponentState::Stopped, "{}", status.name);
        assert!(status.next_restart.is_none());
        assert!(status.next_tick.is_none());
    }
    assert!(matches!(
        job.run_now().await,
        Err(keel_guard::periodic::RunNowError::Stopped(_))
    ));
}

#[tokio::test(start_paused = true)]
async fn a_task_spawned_after_cancellation_never_runs() {
    let (supervisor, cancel, tracker) = supervisor(policy());
    cancel.cancel();
    let count = Arc::new(AtomicU32::new(0));
    let seen = count.clone();
    supervisor.spawn("late", move |_token| {
        count.fetch_add(1, Ordering::SeqCst);
        async { Ok::<(), TaskError>(()) }
    });
    shut_down(cancel, tracker).await;
    assert_eq!(seen.load(Ordering::SeqCst), 0);
    assert_eq!(state(&supervisor, "late"), ComponentState::Stopped);
}
