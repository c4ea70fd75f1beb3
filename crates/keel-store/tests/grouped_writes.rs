//! Grouped single creates and completions on PostgreSQL (the `store.create_group` and
//! `store.report_group` failpoints): a group whose fate is unknown is answered `Unavailable`
//! and never written again; a group the database refused is written one by one.
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

use std::future::Future;

use keel_store::conformance::postgres::fresh_store;
use keel_store::conformance::{Tenant, tenant};
use keel_store::{Claimed, CommandStatus, NewCommand, Store, StoreError, Target};
use serde_json::json;

/// How many writes at once: they make groups (any that goes alone is written as it is).
const AT_ONCE: usize = 40;

/// The answers of `writes`, run with `failpoint` set to `action`.
async fn injected<F: Future<Output = Vec<Result<(), StoreError>>>>(
    failpoint: &str,
    action: &str,
    writes: F,
) -> Vec<Result<(), StoreError>> {
    fail::cfg(failpoint, action).unwrap();
    let answers = writes.await;
    fail::remove(failpoint);
    answers
}

/// Of answers to writes whose groups failed in doubt: how many were written alone (`Ok`). Every
/// other is `Unavailable`, and there are some.
fn written_alone(answers: &[Result<(), StoreError>]) -> usize {
    let ok = answers.iter().filter(|a| a.is_ok()).count();
    let unavailable = answers
        .iter()
        .filter(|a| matches!(a, Err(StoreError::Unavailable(_))))
        .count();
    assert_eq!(ok + unavailable, AT_ONCE, "{answers:?}");
    assert!(unavailable > 0, "the others were grouped: {answers:?}");
    ok
}

async fn creates_at_once(store: &dyn Store, t: &Tenant) -> Vec<Result<(), StoreError>> {
    let creates = (0..AT_ONCE).map(|n| {
        let command = NewCommand::new("run", Target::Queue("q".to_owned()), json!({"n": n}));
        async move { store.create_command(t.org, command, None).await.map(|_| ()) }
    });
    futures::future::join_all(creates).await
}

async fn completes_at_once(
    store: &dyn Store,
    t: &Tenant,
    claimed: &[Claimed],
) -> Vec<Result<(), StoreError>> {
    let completes = claimed.iter().map(|c| async move {
        store
            .complete(t.org, t.agent, c.command.id, &c.claim_token, json!({}))
            .await
            .map(|_| ())
    });
    futures::future::join_all(completes).await
}

/// The commands of `t` in `status`, or in any status.
async fn stored(store: &dyn Store, t: &Tenant, status: Option<CommandStatus>) -> usize {
    let counts = store.count_commands_by_status(t.org).await.unwrap();
    let n: u64 = counts
        .into_iter()
        .filter(|(s, _)| status.is_none_or(|status| *s == status))
        .map(|(_, n)| n)
        .sum();
    usize::try_from(n).unwrap()
}

#[tokio::test]
async fn a_group_in_doubt_is_not_written_again_and_a_refused_one_is_written_one_by_one() {
    let Some((_schema, store, _clock)) = fresh_store().await else {
        return;
    };
    let store = store.as_ref();
    let t = tenant(store, "acme").await;

    // Creates. In doubt: only a create that went alone (not a group) is stored.
    let answers = injected("store.create_group", "return", creates_at_once(store, &t)).await;
    let alone = written_alone(&answers);
    assert_eq!(
        stored(store, &t, None).await,
        alone,
        "nothing answered 503 is stored"
    );
    // Refused: nothing of the group was written, so each create is written alone.
    let answers = injected(
        "store.create_group",
        "return(refused)",
        creates_at_once(store, &t),
    )
    .await;
    assert!(answers.iter().all(Result::is_ok), "{answers:?}");
    let created = stored(store, &t, None).await;
    assert_eq!(created, alone + AT_ONCE);

    // Completions of the first 40.
    let claimed = store
        .claim(t.org, t.agent, &["q".to_owned()], 40)
        .await
        .unwrap();
    assert_eq!(claimed.len(), AT_ONCE);
    let answers = injected(
        "store.report_group",
        "return",
        completes_at_once(store, &t, &claimed),
    )
    .await;
    let alone = written_alone(&answers);
    let completed = Some(CommandStatus::Completed);
    assert_eq!(
        stored(store, &t, completed).await,
        alone,
        "nothing answered 503 is completed"
    );
    // Refused: each is written alone; those completed already are stale, the others (still
    // holding their claims) complete now.
    let answers = injected(
        "store.report_group",
        "return(refused)",
        completes_at_once(store, &t, &claimed),
    )
    .await;
    let stale = answers
        .iter()
        .filter(|a| matches!(a, Err(StoreError::StaleClaim)))
        .count();
    assert_eq!(stale, alone, "{answers:?}");
    assert_eq!(
        answers.iter().filter(|a| a.is_ok()).count(),
        AT_ONCE - alone
    );
    assert_eq!(stored(store, &t, completed).await, AT_ONCE);
}
