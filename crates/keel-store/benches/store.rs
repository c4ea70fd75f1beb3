//! Commands per second through the SQLite store: create → claim (batches of 1, 10, 100) →
//! complete, at `synchronous` FULL and NORMAL, on a temporary database file.
//!
//! `cargo bench -p keel-store --bench store`

// Bench code: set-up failures are meant to stop the run; the criterion macros generate
// functions without doc comments.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use keel_store::conformance::tenant;
use keel_store::{NewCommand, SqliteOptions, SqliteStore, Store, Synchronous, SystemClock, Target};
use serde_json::json;

/// Commands created, claimed and completed per measured iteration.
const COMMANDS: u64 = 100;

fn create_claim_complete(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut group = c.benchmark_group("store_create_claim_complete");
    group
        .throughput(Throughput::Elements(COMMANDS))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(6));
    for (sync_name, synchronous) in [("full", Synchronous::Full), ("normal", Synchronous::Normal)] {
        for batch in [1_u32, 10, 100] {
            let dir = tempfile::tempdir().unwrap();
            let (store, t) = rt.block_on(async {
                let store = SqliteStore::open(
                    dir.path().join("keel.db"),
                    SqliteOptions {
                        synchronous,
                        ..SqliteOptions::default()
                    },
                    Arc::new(SystemClock),
                )
                .await
                .unwrap();
                let t = tenant(&store, "bench").await;
                (store, t)
            });
            let queues = vec!["q".to_owned()];
            group.bench_function(BenchmarkId::new(sync_name, format!("batch{batch}")), |b| {
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            for _ in 0..COMMANDS {
                                store
                                    .create_command(
                                        t.org,
                                        NewCommand::new(
                                            "run",
                                            Target::Queue("q".into()),
                                            json!({"n": 1}),
                                        ),
                                        None,
                                    )
                                    .await
                                    .unwrap();
                            }
                            let mut done = 0;
                            while done < COMMANDS {
                                let claimed =
                                    store.claim(t.org, t.agent, &queues, batch).await.unwrap();
                                assert!(!claimed.is_empty());
                                for c in claimed {
                                    store
                                        .complete(
                                            t.org,
                                            t.agent,
                                            c.command.id,
                                            &c.claim_token,
                                            json!({"ok": true}),
                                        )
                                        .await
                                        .unwrap();
                                    done += 1;
                                }
                            }
                        }
                        start.elapsed()
                    })
                });
            });
            rt.block_on(store.close());
        }
    }
    group.finish();
}

criterion_group!(benches, create_claim_complete);
criterion_main!(benches);
