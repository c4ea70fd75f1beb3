//! Grouped single creates on PostgreSQL (the `store.create_group` failpoint): a group whose
//! fate is unknown is answered `Unavailable` and never written again; a group the database
//! refused is written one by one.
//!
//! Failpoints are process-global, so this binary holds a single test. It needs PostgreSQL
//! (`KEEL_TEST_POSTGRES_URL`) and says when it skips.

// Test code: a failed expectation is meant to fail the test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::sync::Arc;

use keel_store::conformance::postgres::{TestSchema, test_url};
use keel_store::conformance::{START, tenant};
use keel_store::{ManualClock, NewCommand, OrgId, PgStore, Store, StoreError, Target};
use serde_json::json;

/// 40 creates at once: they make groups (any that goes alone is written as it is).
async fn creates_at_once(store: &PgStore, org: OrgId) -> Vec<Result<(), StoreError>> {
    let creates = (0..40).map(|n| {
        let command = NewCommand::new("run", Target::Queue("q".to_owned()), json!({"n": n}));
        async move { store.create_command(org, command, None).await.map(|_| ()) }
    });
    futures::future::join_all(creates).await
}

async fn stored(store: &PgStore, org: OrgId) -> usize {
    let counts = store.count_commands_by_status(org).await.unwrap();
    usize::try_from(counts.into_iter().map(|(_, n)| n).sum::<u64>()).unwrap()
}

#[tokio::test]
async fn a_group_in_doubt_is_not_written_again_and_a_refused_one_is_written_one_by_one() {
    let Some(url) = test_url() else { return };
    let schema = TestSchema::create(&url).await;
    let clock = Arc::new(ManualClock::new(START));
    let store = PgStore::connect(&schema.options(), Some(clock))
        .await
        .unwrap();
    store.migrate().await.unwrap();
    let t = tenant(&store, "acme").await;

    // Unknown whether written: every grouped caller is told so, and only a create that went
    // alone (not a group) is stored.
    fail::cfg("store.create_group", "return").unwrap();
    let answers = creates_at_once(&store, t.org).await;
    fail::remove("store.create_group");
    let ok = answers.iter().filter(|a| a.is_ok()).count();
    let unavailable = answers
        .iter()
        .filter(|a| matches!(a, Err(StoreError::Unavailable(_))))
        .count();
    assert_eq!(ok + unavailable, 40, "{answers:?}");
    assert!(unavailable > 0, "the others were grouped: {answers:?}");
    assert_eq!(
        stored(&store, t.org).await,
        ok,
        "nothing answered 503 is stored"
    );

    // Refused: nothing of the group was written, so each create is written alone.
    fail::cfg("store.create_group", "return(refused)").unwrap();
    let answers = creates_at_once(&store, t.org).await;
    fail::remove("store.create_group");
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    assert_eq!(stored(&store, t.org).await, ok + 40);
}
