//! The `supervisor.task` and `periodic.tick` failpoints.
//!
//! Failpoints are process-global, so this binary holds a single test that sets them one after
//! the other and removes each before the next step.

// Test code: a failed expectation is meant to fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use keel_guard::components::{ComponentState, Components};
use keel_guard::periodic::RunNowError;
use keel_guard::supervisor::{RestartPolicy, Supervisor, TaskError};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[tokio::test(start_paused = true)]
async fn failpoints_make_runs_and_ticks_panic_and_are_counted() {
    keel_guard::panic::install_hook();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let supervisor = Supervisor::new(
        Components::new(),
        RestartPolicy {
            initial_backoff: Duration::from_millis(10),
            ..RestartPolicy::default()
        },
        cancel.clone(),
        tracker.clone(),
    );

    // `periodic.tick`: the next tick panics before the tick closure runs.
    let ticks = Arc::new(AtomicU32::new(0));
    let seen = ticks.clone();
    let job = supervisor.every("fp-job", Duration::from_secs(3600), move || {
        seen.fetch_add(1, Ordering::SeqCst);
        async {}
    });
    fail::cfg("periodic.tick", "1*panic(injected tick)").unwrap();
    let err = job.run_now().await.unwrap_err();
    assert!(
        matches!(&err, RunNowError::Panicked(p) if p.message == "injected tick" && p.component == "fp-job"),
        "{err:?}"
    );
    assert_eq!(ticks.load(Ordering::SeqCst), 0);
    job.run_now().await.unwrap();
    fail::remove("periodic.tick");
    assert_eq!(ticks.load(Ordering::SeqCst), 1);
    let stats = supervisor.components().job("fp-job").unwrap();
    assert_eq!((stats.runs, stats.failures), (2, 1));
    assert_eq!(stats.last_error.as_deref(), Some("injected tick"));

    // `supervisor.task`: the next two runs panic at their start, then the task runs.
    fail::cfg("supervisor.task", "2*panic(injected run)").unwrap();
    let runs = Arc::new(AtomicU32::new(0));
    let seen = runs.clone();
    supervisor.spawn("fp-task", move |token: CancellationToken| {
        seen.fetch_add(1, Ordering::SeqCst);
        async move {
            token.cancelled().await;
            Ok::<(), TaskError>(())
        }
    });
    tokio::time::timeout(Duration::from_secs(5), async {
        while runs.load(Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    })
    .await
    .unwrap();
    fail::remove("supervisor.task");
    let status = supervisor.components().get("fp-task").unwrap();
    assert_eq!(status.state, ComponentState::Running);
    assert_eq!(status.restarts, 2);
    assert_eq!(status.last_panic.unwrap().message, "injected run");
    // The failpoint fires before the task closure is called.
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    cancel.cancel();
    tracker.close();
    tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .unwrap();
}
