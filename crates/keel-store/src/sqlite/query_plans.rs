//! Every query shape has an index that serves it: `EXPLAIN QUERY PLAN` of each statement the
//! store runs on the commands table must read an index (never scan the table) and must not sort
//! rows in a temporary B-tree, except to merge the few rows a claim's arms hand over.

use std::sync::Arc;

use sqlx::SqlitePool;

use super::{
    COMMAND_COLUMNS, COUNT_BY_STATUS_SQL, FINISHED_SINCE_SQL, SqliteOptions, SqliteStore,
    claim_candidates_sql, list_sql, probe_sql, promote_sql,
};
use crate::conformance::START;
use crate::model::{AgentId, CommandFilter, CommandStatus};
use crate::{ManualClock, Store};

/// The plan's lines, as `EXPLAIN QUERY PLAN` prints their details.
pub(super) async fn plan(pool: &SqlitePool, sql: &str, params: usize) -> Vec<String> {
    let mut query = sqlx::query_as::<_, (i64, i64, i64, String)>(Box::leak(
        format!("EXPLAIN QUERY PLAN {sql}").into_boxed_str(),
    ));
    for _ in 0..params {
        query = query.bind(None::<i64>);
    }
    query
        .fetch_all(pool)
        .await
        .unwrap_or_else(|err| panic!("{sql}: {err}"))
        .into_iter()
        .map(|(_, _, _, detail)| detail)
        .collect()
}

/// Fails on a scan of the commands table or its indexes, and on a sort, unless `merge_sort` is
/// allowed (the claim merges its arms' first rows, at most `limit` per arm).
fn assert_served(what: &str, lines: &[String], merge_sort: bool) {
    for line in lines {
        assert!(
            !line.starts_with("SCAN commands") && !line.starts_with("SCAN command_attempts"),
            "{what}: full scan: {line}\n{lines:#?}"
        );
        if line.contains("TEMP B-TREE") {
            assert!(merge_sort, "{what}: sorts rows: {line}\n{lines:#?}");
        }
    }
    assert!(
        lines.iter().any(|line| line.contains("USING INDEX")
            || line.contains("USING PRIMARY KEY")
            || line.contains("USING COVERING INDEX")),
        "{what}: uses no index\n{lines:#?}"
    );
}

pub(super) async fn store() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(
        dir.path().join("keel.db"),
        SqliteOptions::default(),
        Arc::new(ManualClock::new(START)),
    )
    .await
    .unwrap();
    (dir, store)
}

#[tokio::test]
async fn every_query_shape_is_served_by_an_index() {
    let (_dir, store) = store().await;
    let pool = store.pool();

    for queues in [0, 1, 3] {
        let claim = claim_candidates_sql(queues);
        let lines = plan(pool, &claim, 9 + queues).await;
        // One arm reads its index in claim order; several are merged, each in claim order.
        assert_served(&format!("claim, {queues} queues"), &lines, queues > 0);
        assert!(
            lines
                .iter()
                .filter(|l| l.contains("commands_claim_"))
                .count()
                == queues + 1,
            "claim, {queues} queues: each arm on its claim index\n{lines:#?}"
        );
        if queues == 0 {
            assert!(
                !lines.iter().any(|l| l.contains("TEMP B-TREE")),
                "{lines:#?}"
            );
        }
        let probe = probe_sql(queues);
        let lines = plan(pool, &probe, 9 + queues).await;
        assert_served(&format!("probe, {queues} queues"), &lines, false);
        let promote = promote_sql(queues);
        let lines = plan(pool, &promote, 9 + queues).await;
        assert_served(&format!("promote, {queues} queues"), &lines, false);
        assert!(
            lines
                .iter()
                .filter(|l| l.contains("commands_scheduled_"))
                .count()
                == queues + 1,
            "promote, {queues} queues: each arm on its scheduled index\n{lines:#?}"
        );
    }

    let agent = Some(AgentId::new());
    let statuses = [None, Some(CommandStatus::Pending)];
    for status in statuses {
        for agent in [None, agent] {
            for queue in [None, Some("q".to_owned())] {
                for command_type in [None, Some("t".to_owned())] {
                    for cursor in [false, true] {
                        let filter = CommandFilter {
                            status,
                            agent,
                            queue: queue.clone(),
                            command_type: command_type.clone(),
                        };
                        let sql = list_sql(&filter, cursor);
                        let lines = plan(pool, &sql, 7).await;
                        assert_served(&format!("list {filter:?} cursor {cursor}"), &lines, false);
                    }
                }
            }
        }
    }

    // The statements of the lease engine and the retention job.
    let statements = [
        (
            "release",
            "SELECT id FROM commands WHERE status = 'executing' AND lease_expires_at < ?1 \
             AND (?2 IS NULL OR org_id = ?2) ORDER BY lease_expires_at LIMIT ?3"
                .to_owned(),
            3,
        ),
        (
            "purge",
            "SELECT id FROM commands WHERE status IN ('completed', 'failed', 'cancelled', 'dead') \
             AND finished_at < ?1 ORDER BY finished_at LIMIT ?2"
                .to_owned(),
            2,
        ),
        ("count by status", COUNT_BY_STATUS_SQL.to_owned(), 1),
        ("finished since", FINISHED_SINCE_SQL.to_owned(), 1),
        (
            "get",
            format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE org_id = ? AND id = ?"),
            2,
        ),
        (
            "idempotency",
            format!(
                "SELECT {COMMAND_COLUMNS} FROM commands WHERE org_id = ? AND idempotency_key = ?"
            ),
            2,
        ),
        (
            "attempts",
            "SELECT a.attempt FROM command_attempts a JOIN commands c ON c.id = a.command_id \
             WHERE c.org_id = ? AND c.id = ? ORDER BY a.attempt"
                .to_owned(),
            2,
        ),
        (
            "open attempt",
            "SELECT COALESCE(MAX(attempt), 0) + 1 FROM command_attempts WHERE command_id = ?1"
                .to_owned(),
            1,
        ),
    ];
    for (what, sql, params) in statements {
        let lines = plan(pool, &sql, params).await;
        assert_served(what, &lines, false);
    }

    // Fleet: the claim gate reads two primary keys; a broadcast's children are read on their
    // index and sorted (at most `MAX_BATCH_CREATE` rows).
    let gate = plan(pool, super::fleet::CLAIM_GATE_SQL, 2).await;
    assert!(
        gate.iter().all(|line| !line.starts_with("SCAN")),
        "claim gate scans\n{gate:#?}"
    );
    let children = plan(pool, &super::fleet::children_sql(), 2).await;
    assert_served("children", &children, true);
    store.close().await;
}
