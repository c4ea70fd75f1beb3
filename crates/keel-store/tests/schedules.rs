//! Schedules on an SQLite file: each fire time creates its commands once across a close and
//! reopen of the store (a restart), and with two stores on one file (two instances).

// Test code: a failed expectation is meant to fail the test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::path::Path;
use std::sync::Arc;

use keel_store::conformance::{START, fired_times, new_schedule, run, tenant};
use keel_store::{ManualClock, MissedFires, SqliteOptions, SqliteStore, Store};
use time::Duration;

async fn open(path: &Path, clock: &Arc<ManualClock>) -> SqliteStore {
    SqliteStore::open(path, SqliteOptions::default(), clock.clone())
        .await
        .unwrap()
}

#[tokio::test]
async fn every_second_fires_once_per_fire_time_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.db");
    let clock = Arc::new(ManualClock::new(START));

    let store = open(&path, &clock).await;
    let org = tenant(&store, "acme").await.org;
    let schedule = store
        .create_schedule(org, new_schedule("* * * * * *", "ticks", MissedFires::Skip))
        .await
        .unwrap();
    for _ in 0..5 {
        clock.advance(Duration::seconds(1));
        assert_eq!(run(&store).await.len(), 1);
    }
    // The last run's instant again, then a restart at that same instant: nothing new is due.
    assert!(run(&store).await.is_empty());
    store.close().await;

    let store = open(&path, &clock).await;
    assert!(
        run(&store).await.is_empty(),
        "fire time 5 again after the restart"
    );
    for _ in 0..5 {
        clock.advance(Duration::seconds(1));
        assert_eq!(run(&store).await.len(), 1);
    }
    let expected: Vec<i64> = (1..=10)
        .map(|s| (START + Duration::seconds(s)).unix_timestamp())
        .collect();
    assert_eq!(fired_times(&store, org, "ticks").await, expected);
    let fires = store
        .list_schedule_fires(org, schedule.id, None, 100)
        .await
        .unwrap();
    assert_eq!(fires.len(), 10);
    assert!(fires.iter().all(|f| f.command_ids.len() == 1));
    store.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_instances_on_one_file_fire_each_time_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keel.db");
    let clock = Arc::new(ManualClock::new(START));
    let first: Arc<dyn Store> = Arc::new(open(&path, &clock).await);
    let second: Arc<dyn Store> = Arc::new(open(&path, &clock).await);
    let org = tenant(first.as_ref(), "acme").await.org;
    for queue in ["a", "b", "c"] {
        first
            .create_schedule(org, new_schedule("* * * * * *", queue, MissedFires::Skip))
            .await
            .unwrap();
    }
    for _ in 0..10 {
        clock.advance(Duration::seconds(1));
        let (one, other) = {
            let (first, second) = (first.clone(), second.clone());
            tokio::join!(
                tokio::spawn(async move { run(first.as_ref()).await.len() }),
                tokio::spawn(async move { run(second.as_ref()).await.len() }),
            )
        };
        assert_eq!(
            one.unwrap() + other.unwrap(),
            3,
            "three schedules fire once each"
        );
    }
    let expected: Vec<i64> = (1..=10)
        .map(|s| (START + Duration::seconds(s)).unix_timestamp())
        .collect();
    for queue in ["a", "b", "c"] {
        assert_eq!(fired_times(first.as_ref(), org, queue).await, expected);
    }
    first.close().await;
    second.close().await;
}
