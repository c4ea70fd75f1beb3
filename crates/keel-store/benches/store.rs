//! Store throughput: commands per second through create → claim → complete, at `synchronous`
//! FULL and NORMAL, claim batches of 1, 10 and 100, and 1, 8 and 64 concurrent callers.
//!
//! `cargo bench -p keel-store --bench store` (`KEEL_BENCH_SYNC=full` or `normal` runs one
//! setting). Run `../shared/peers/sqlite-raw.sh` beside it: its figures are the practical
//! limit of a bare SQLite job queue on the same disk (one enqueue commit per job, claim 10 +
//! complete in two commits per 10 jobs).
//!
//! Each caller works its own queue with its own agent, as agents do: it creates `batch`
//! commands one request at a time, claims them in one call, and completes them all at once
//! (concurrent calls, as `POST /v1/commands/reports` makes them).

// Bench code: set-up failures are meant to stop the run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;
use std::time::Instant;

use keel_store::conformance::{agent, tenant};
use keel_store::{NewCommand, SqliteOptions, SqliteStore, Store, Synchronous, SystemClock, Target};
use serde_json::json;

fn main() {
    let only = std::env::var("KEEL_BENCH_SYNC").ok();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "{:<7} {:>6} {:>8} {:>12} {:>10}",
        "sync", "batch", "callers", "commands/s", "commands"
    );
    for (name, synchronous) in [("full", Synchronous::Full), ("normal", Synchronous::Normal)] {
        if only.as_deref().is_some_and(|only| only != name) {
            continue;
        }
        for batch in [1_usize, 10, 100] {
            for callers in [1_usize, 8, 64] {
                let (commands, per_second) = rt.block_on(run(synchronous, batch, callers));
                println!("{name:<7} {batch:>6} {callers:>8} {per_second:>12.0} {commands:>10}");
            }
        }
    }
}

/// Returns (commands done, commands per second).
async fn run(synchronous: Synchronous, batch: usize, callers: usize) -> (usize, f64) {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(
            dir.path().join("keel.db"),
            SqliteOptions {
                synchronous,
                ..SqliteOptions::default()
            },
            Arc::new(SystemClock),
        )
        .await
        .unwrap(),
    );
    let t = tenant(&*store, "bench").await;
    let mut agents = Vec::new();
    for n in 0..callers {
        agents.push(agent(&*store, t.org, &format!("agent-{n}")).await);
    }
    // Enough rounds that each setting runs for a few seconds on a 2-core machine.
    let rounds = (2000 / (batch * callers)).max(2);
    let started = Instant::now();
    let tasks: Vec<_> = agents
        .into_iter()
        .enumerate()
        .map(|(n, agent)| {
            let store = store.clone();
            let queue = format!("q{n}");
            tokio::spawn(async move {
                let queues = vec![queue.clone()];
                let mut done = 0;
                for _ in 0..rounds {
                    for i in 0..batch {
                        store
                            .create_command(
                                t.org,
                                NewCommand::new(
                                    "run",
                                    Target::Queue(queue.clone()),
                                    json!({"i": i}),
                                ),
                                None,
                            )
                            .await
                            .unwrap();
                    }
                    let claimed = store
                        .claim(t.org, agent, &queues, batch as u32)
                        .await
                        .unwrap();
                    assert_eq!(claimed.len(), batch);
                    let completes = claimed.iter().map(|c| {
                        store.complete(t.org, agent, c.command.id, &c.claim_token, json!({"ok": 1}))
                    });
                    for result in futures::future::join_all(completes).await {
                        result.unwrap();
                        done += 1;
                    }
                }
                done
            })
        })
        .collect();
    let mut done = 0;
    for task in tasks {
        done += task.await.unwrap();
    }
    let elapsed = started.elapsed();
    store.close().await;
    (done, done as f64 / elapsed.as_secs_f64())
}
