//! The practical limit of keel's own schema: `../shared/peers/sqlite-raw.sh`'s loop (one
//! `INSERT` commit per command, then claim 10 in one commit and complete those 10 in another),
//! run with bare SQLite calls on one connection, but on keel's `commands` table, with its
//! indexes (claim, listing, retention) and its attempt-history triggers.
//!
//! The raw peer's table has one index; keel's keeps every listing filter and the attempt history
//! indexed, and that B-tree work is paid by any writer, however thin. Set beside the raw peer and
//! the store bench, it splits keel's gap into what the schema costs and what keel's own path
//! (the async API, the writer task, sqlx) costs.
//!
//! `cargo bench -p keel-store --bench schema_limit` (`[N=20000]` as the first argument after
//! `--`); prints 3 runs at FULL and NORMAL, like the raw peer.

// Bench code: set-up failures are meant to stop the run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;
use std::time::Instant;

use keel_store::conformance::tenant;
use keel_store::{SqliteOptions, SqliteStore, Store, SystemClock};
use rusqlite::{Connection, params};

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse().ok())
        .unwrap_or(20_000);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "{:<8} {:>12} {:>20} {:>14}",
        "sync", "enqueue/s", "claim10+complete/s", "per command/s"
    );
    for _ in 0..3 {
        for sync in ["FULL", "NORMAL"] {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("keel.db");
            // keel's schema, one organisation and its agent, made by keel itself.
            let (org, agent) = rt.block_on(async {
                let store =
                    SqliteStore::open(&path, SqliteOptions::default(), Arc::new(SystemClock))
                        .await
                        .unwrap();
                let t = tenant(&store, "bench").await;
                store.close().await;
                (t.org.0, t.agent.0)
            });
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(&format!(
                "PRAGMA journal_mode = WAL; PRAGMA synchronous = {sync}; \
                 PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY; \
                 PRAGMA cache_size = -32768;"
            ))
            .unwrap();
            let (enqueue, claim_complete) = run(&conn, n, org, agent);
            let per_command = 1.0 / (1.0 / enqueue + 1.0 / claim_complete);
            println!("{sync:<8} {enqueue:>12.0} {claim_complete:>20.0} {per_command:>14.0}");
        }
    }
}

/// Returns (enqueues per second, commands claimed and completed per second).
fn run(conn: &Connection, n: usize, org: uuid::Uuid, agent: uuid::Uuid) -> (f64, f64) {
    let started = Instant::now();
    for i in 0..n {
        let now = now_us();
        conn.prepare_cached(
            "INSERT INTO commands (id, org_id, command_type, target_agent_id, queue, params, \
               priority, run_at, max_attempts, lease_duration_ms, status, idempotency_key, \
               request_hash, created_at, updated_at, scheduled) \
             VALUES (?1, ?2, 'run', NULL, 'q', ?3, 0, ?4, 3, 300000, 'pending', NULL, NULL, \
               ?4, ?4, 0)",
        )
        .unwrap()
        .execute(params![
            uuid::Uuid::now_v7(),
            org,
            format!("{{\"i\":{i}}}"),
            now
        ])
        .unwrap();
    }
    let enqueue = n as f64 / started.elapsed().as_secs_f64();

    let started = Instant::now();
    let mut done = 0;
    loop {
        let now = now_us();
        let claimed: Vec<(uuid::Uuid, String)> = conn
            .prepare_cached(
                "UPDATE commands SET status = 'executing', attempts = attempts + 1, \
                   claim_token = lower(hex(randomblob(16))), \
                   lease_expires_at = ?3 + lease_duration_ms * 1000, claimed_by = ?1, \
                   updated_at = ?3 \
                 WHERE status = 'pending' AND id IN ( \
                   SELECT id FROM commands INDEXED BY commands_claim_queue \
                   WHERE org_id = ?2 AND queue = 'q' AND target_agent_id IS NULL \
                     AND status = 'pending' AND scheduled = 0 \
                   ORDER BY priority DESC, run_at, id LIMIT 10) \
                 RETURNING id, claim_token",
            )
            .unwrap()
            .query_map(params![agent, org, now], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        if claimed.is_empty() {
            break;
        }
        let tx = conn.unchecked_transaction().unwrap();
        for (id, token) in &claimed {
            let changed = tx
                .prepare_cached(
                    "UPDATE commands SET status = 'completed', attempt_outcome = 'completed', \
                       result = '{\"ok\":1}', claim_token = NULL, lease_expires_at = NULL, \
                       finished_at = ?1, updated_at = ?1 \
                     WHERE org_id = ?2 AND id = ?3 AND status = 'executing' \
                       AND claim_token = ?4 AND claimed_by = ?5",
                )
                .unwrap()
                .execute(params![now, org, id, token, agent])
                .unwrap();
            assert_eq!(changed, 1);
        }
        tx.commit().unwrap();
        done += claimed.len();
    }
    assert_eq!(done, n);
    (enqueue, n as f64 / started.elapsed().as_secs_f64())
}

fn now_us() -> i64 {
    let now = time::OffsetDateTime::now_utc();
    i64::try_from(now.unix_timestamp_nanos() / 1000).unwrap()
}
