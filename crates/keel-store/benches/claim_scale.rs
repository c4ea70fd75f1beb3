//! Claim and list latency as the backlog grows: 1,000, then 100,000, then 1,000,000 pending
//! commands in one queue of one organisation (plus 10 % more scheduled for tomorrow at a higher
//! priority in the same queue, and 10 % more in another organisation), in one run, on one
//! database file.
//!
//! `cargo bench -p keel-store --bench claim_scale` (`KEEL_BENCH_MAX_PENDING=100000` stops
//! earlier). Prints, per backlog: claim (limit 1 and limit 10) p50/p99, a claim by an agent
//! that serves 4 queues, and the first page of two listings.

// Bench code: set-up failures are meant to stop the run.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_store::conformance::{agent, tenant};
use keel_store::{
    CommandFilter, CommandStatus, NewCommand, NewCommandItem, SqliteOptions, SqliteStore, Store,
    SystemClock, Target,
};
use serde_json::json;

/// Claims measured per backlog and shape.
const SAMPLES: usize = 300;

fn main() {
    let max: usize = std::env::var("KEEL_BENCH_MAX_PENDING")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(max));
}

async fn run(max: usize) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(
        dir.path().join("keel.db"),
        SqliteOptions::default(),
        Arc::new(SystemClock),
    )
    .await
    .unwrap();
    let t = tenant(&store, "bench").await;
    let many = agent(&store, t.org, "many-queues").await;
    let four: Vec<String> = ["a", "b", "c", "q"]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    let one = vec!["q".to_owned()];
    // Other organisations' backlogs and other queues share the table and its indexes.
    let other = tenant(&store, "other").await;

    println!(
        "{:>10} | {:>22} | {:>22} | {:>22} | {:>18} | {:>18}",
        "pending",
        "claim 1: p50 / p99 ms",
        "claim 10: p50 / p99 ms",
        "4 queues: p50 / p99 ms",
        "list pending ms",
        "list queue ms"
    );
    let mut pending = 0;
    for target in [1_000, 100_000, 1_000_000] {
        if target > max {
            break;
        }
        let started = Instant::now();
        while pending < target {
            let n = (target - pending).min(1000);
            let items = (0..n)
                .map(|i| NewCommandItem {
                    command: NewCommand {
                        priority: (i % 3) as i32,
                        ..NewCommand::new("run", Target::Queue("q".into()), json!({"n": i}))
                    },
                    idempotency: None,
                })
                .collect();
            store.create_commands(t.org, items).await.unwrap();
            let noise = (0..n / 10)
                .map(|i| NewCommandItem {
                    command: NewCommand::new("run", Target::Queue("q".into()), json!({"n": i})),
                    idempotency: None,
                })
                .collect();
            store.create_commands(other.org, noise).await.unwrap();
            // Commands scheduled for tomorrow at a higher priority sit in the same queue: a
            // claim must not read through them.
            let tomorrow = store.now() + time::Duration::days(1);
            let scheduled = (0..n / 10)
                .map(|i| NewCommandItem {
                    command: NewCommand {
                        priority: 10,
                        run_at: Some(tomorrow),
                        ..NewCommand::new("later", Target::Queue("q".into()), json!({"n": i}))
                    },
                    idempotency: None,
                })
                .collect();
            store.create_commands(t.org, scheduled).await.unwrap();
            pending += n;
        }
        eprintln!(
            "filled to {pending} pending in {:.1} s",
            started.elapsed().as_secs_f64()
        );

        let claim1 = measure(SAMPLES, || async {
            let claimed = store.claim(t.org, t.agent, &one, 1).await.unwrap();
            assert_eq!(claimed.len(), 1);
        })
        .await;
        let claim10 = measure(SAMPLES / 10, || async {
            let claimed = store.claim(t.org, t.agent, &one, 10).await.unwrap();
            assert_eq!(claimed.len(), 10);
        })
        .await;
        let claim4 = measure(SAMPLES, || async {
            let claimed = store.claim(t.org, many, &four, 1).await.unwrap();
            assert_eq!(claimed.len(), 1);
        })
        .await;
        let list_pending = measure(50, || async {
            let filter = CommandFilter {
                status: Some(CommandStatus::Pending),
                ..CommandFilter::default()
            };
            let page = store.list_commands(t.org, filter, None, 50).await.unwrap();
            assert_eq!(page.items.len(), 50);
        })
        .await;
        let list_queue = measure(50, || async {
            let filter = CommandFilter {
                queue: Some("q".into()),
                status: Some(CommandStatus::Executing),
                ..CommandFilter::default()
            };
            let page = store.list_commands(t.org, filter, None, 50).await.unwrap();
            assert!(!page.items.is_empty());
        })
        .await;
        // Claimed commands left the backlog; top it up at the next step.
        pending -= SAMPLES * 2 + (SAMPLES / 10) * 10;
        println!(
            "{:>10} | {:>10.3} / {:>9.3} | {:>10.3} / {:>9.3} | {:>10.3} / {:>9.3} | {:>18.3} | {:>18.3}",
            target,
            ms(claim1.0),
            ms(claim1.1),
            ms(claim10.0),
            ms(claim10.1),
            ms(claim4.0),
            ms(claim4.1),
            ms(list_pending.0),
            ms(list_queue.0),
        );
    }
    store.close().await;
}

/// `(p50, p99)` of `n` runs of `f`, one after the other.
async fn measure<F, Fut>(n: usize, mut f: F) -> (Duration, Duration)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut times = Vec::with_capacity(n);
    for _ in 0..n {
        let started = Instant::now();
        f().await;
        times.push(started.elapsed());
    }
    times.sort();
    let at = |q: f64| times[((times.len() as f64 * q) as usize).min(times.len() - 1)];
    (at(0.5), at(0.99))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
