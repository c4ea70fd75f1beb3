//! The `store.claim`, `store.heartbeat` and `store.complete` failpoints.
//!
//! Failpoints are process-global, so this binary holds a single test that sets them one after
//! the other and removes each before the next step.

// Test code: a failed expectation is meant to fail the test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;

use keel_store::conformance::{START, tenant};
use keel_store::{
    CommandStatus, ManualClock, NewCommand, SqliteOptions, SqliteStore, Store, StoreError, Target,
};
use serde_json::json;

#[tokio::test]
async fn failpoints_fail_or_panic_the_operation_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(dir.path().join("keel.db"), SqliteOptions::default(), clock)
            .await
            .unwrap(),
    );
    let t = tenant(&*store, "acme").await;
    let id = store
        .create_command(
            t.org,
            NewCommand::new("run", Target::Agent(t.agent), json!({})),
            None,
        )
        .await
        .unwrap()
        .command
        .id;

    // `return`: an injected database error, and the command is not claimed.
    fail::cfg("store.claim", "return").unwrap();
    assert!(matches!(
        store.claim(t.org, t.agent, &[], 1).await,
        Err(StoreError::Database(_))
    ));
    fail::remove("store.claim");
    let before = store.get_command(t.org, id).await.unwrap().unwrap();
    assert_eq!(before.status, CommandStatus::Pending);
    assert_eq!(before.attempts, 0);
    let claimed = store.claim(t.org, t.agent, &[], 1).await.unwrap().remove(0);
    let token = claimed.claim_token.clone();

    fail::cfg("store.heartbeat", "return").unwrap();
    assert!(matches!(
        store
            .heartbeat(t.org, t.agent, id, &token, Some(json!(1)))
            .await,
        Err(StoreError::Database(_))
    ));
    fail::remove("store.heartbeat");
    assert_eq!(
        store
            .get_command(t.org, id)
            .await
            .unwrap()
            .unwrap()
            .progress,
        None
    );

    // `panic`: the call panics (the caller's isolation catches it) and nothing is written.
    fail::cfg("store.complete", "panic").unwrap();
    let panicking = {
        let store = Arc::clone(&store);
        let token = token.clone();
        tokio::spawn(async move {
            store
                .complete(t.org, t.agent, id, &token, json!("ok"))
                .await
        })
    };
    assert!(panicking.await.unwrap_err().is_panic());
    fail::remove("store.complete");
    let still = store.get_command(t.org, id).await.unwrap().unwrap();
    assert_eq!(still.status, CommandStatus::Executing);

    let done = store
        .complete(t.org, t.agent, id, &token, json!("ok"))
        .await
        .unwrap();
    assert_eq!(done.status, CommandStatus::Completed);
}
