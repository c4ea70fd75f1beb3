//! The group-commit writer: each caller gets its own result, a failed or panicking write costs
//! only itself, and a claim whose caller left before the commit answered is handed back.
//!
//! Failpoints are process-global, so this binary holds a single test that sets them one after
//! the other.

// Test code: a failed expectation is meant to fail the test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;
use std::time::Duration;

use keel_store::conformance::{START, tenant};
use keel_store::{
    CommandStatus, ManualClock, NewCommand, SqliteOptions, SqliteStore, Store, StoreError, Target,
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn group_commit_isolates_each_write() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(dir.path().join("keel.db"), SqliteOptions::default(), clock)
            .await
            .unwrap(),
    );

    // 64 concurrent writes, one of which conflicts: each caller gets its own answer.
    store.create_organisation("taken").await.unwrap();
    let tasks: Vec<_> = (0..64)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                let name = if n == 17 {
                    "taken".to_owned()
                } else {
                    format!("org-{n}")
                };
                store.create_organisation(&name).await
            })
        })
        .collect();
    let mut conflicts = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(_) => {}
            Err(StoreError::Conflict(_)) => conflicts += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(conflicts, 1);
    assert_eq!(store.list_organisations().await.unwrap().len(), 64);

    // A write that panics is rolled back alone; the writer goes on.
    let t = tenant(&*store, "acme").await;
    fail::cfg("store.write", "1*panic").unwrap();
    let err = store
        .create_command(t.org, pooled(), None)
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    fail::remove("store.write");
    let id = store
        .create_command(t.org, pooled(), None)
        .await
        .unwrap()
        .command
        .id;
    let all = store
        .list_commands(t.org, Default::default(), None, 10)
        .await
        .unwrap();
    assert_eq!(all.items.len(), 1, "the panicked write left nothing behind");

    // A failed commit fails its callers and changes nothing; the next group commits.
    fail::cfg("store.commit", "1*return").unwrap();
    assert!(store.cancel_command(t.org, id).await.is_err());
    fail::remove("store.commit");
    let command = store.get_command(t.org, id).await.unwrap().unwrap();
    assert_eq!(command.status, CommandStatus::Pending);

    // A claim whose caller gives up while its group commits: the commit goes through, nobody
    // receives the commands, so they are handed back at once, attempts unchanged.
    fail::cfg("store.commit", "1*sleep(400)").unwrap();
    let gave_up = tokio::time::timeout(
        Duration::from_millis(100),
        store.claim(t.org, t.agent, &["q".to_owned()], 10),
    )
    .await;
    assert!(gave_up.is_err(), "the claim should still be waiting");
    fail::remove("store.commit");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let command = store.get_command(t.org, id).await.unwrap().unwrap();
        if command.status == CommandStatus::Pending && command.claimed_by.is_some() {
            assert_eq!(command.attempts, 0);
            assert!(store.list_attempts(t.org, id).await.unwrap().is_empty());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not handed back: {command:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let claimed = store
        .claim(t.org, t.agent, &["q".to_owned()], 10)
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    assert_eq!(claimed[0].command.attempts, 1);
    store.close().await;
}

fn pooled() -> NewCommand {
    NewCommand::new("run", Target::Queue("q".into()), json!({}))
}
