//! The store's ceiling for the delivery processor: how many deliveries a second
//! `claim_deliveries` + `record_deliveries` move from pending to completed through
//! `SqliteStore` when nothing is sent, the processor's store work with the network taken away.
//!
//! 10,000 webhook deliveries (a body of a webhook's size) are queued by `trigger`, one event
//! each; then they are drained in claims of `batch` (the processor claims up to half its
//! 512-delivery buffer at once), each claim's deliveries recorded `Delivered` in one
//! `record_deliveries` call. Two ways:
//!
//! - **serial**: claim, record, claim, record...;
//! - **overlapped**: the next claim is in flight while the last one's outcomes are recorded, as
//!   the processor's claimer and dispatcher overlap them.
//!
//! Set beside the deliveries bench's load loop, it tells whether half of what a plain HTTP
//! client gets from a receiver is within reach of a store that records every delivery durably.
//!
//! `cargo bench -p keel-store --bench delivery_drain` (`[N=10000]` as the first argument after
//! `--`); prints 3 runs at FULL and NORMAL.

// Bench code: set-up failures are meant to stop the run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_store::notifications::model::{
    ChannelType, ClaimedDelivery, DeliveryOutcome, DeliveryReport, EventId, NewDelivery, NewEvent,
    Severity, WorkerId,
};
use keel_store::{SqliteOptions, SqliteStore, Store, Synchronous, SystemClock};
use serde_json::json;

/// Deliveries per claim, as the processor's claimer takes them (half of its buffer).
const BATCH: u32 = 256;

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse().ok())
        .unwrap_or(10_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "{:<8} {:>12} {:>16} {:>20}",
        "sync", "queued/s", "serial drain/s", "overlapped drain/s"
    );
    for _ in 0..3 {
        for (name, sync) in [("FULL", Synchronous::Full), ("NORMAL", Synchronous::Normal)] {
            let (queued, serial) = rt.block_on(run(n, sync, false));
            let (_, overlapped) = rt.block_on(run(n, sync, true));
            println!("{name:<8} {queued:>12.0} {serial:>16.0} {overlapped:>20.0}");
        }
    }
}

/// Returns (deliveries queued per second, deliveries drained per second).
async fn run(n: usize, synchronous: Synchronous, overlapped: bool) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let options = SqliteOptions {
        synchronous,
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(&dir.path().join("keel.db"), options, Arc::new(SystemClock))
        .await
        .unwrap();
    let org = store.create_organisation("bench").await.unwrap().id;
    let notifications = store.notifications();

    // Queued by 8 callers at once, as the HTTP triggers queue them.
    let started = Instant::now();
    let callers: Vec<_> = (0..8)
        .map(|caller| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in (caller..n).step_by(8) {
                    store
                        .notifications()
                        .trigger(org, event(), vec![delivery(i)])
                        .await
                        .unwrap();
                }
            })
        })
        .collect();
    for caller in callers {
        caller.await.unwrap();
    }
    let queued = n as f64 / started.elapsed().as_secs_f64();

    let worker = WorkerId::new();
    let started = Instant::now();
    let mut drained = 0;
    if overlapped {
        let mut claimed = notifications.claim_deliveries(worker, BATCH).await.unwrap();
        while !claimed.is_empty() {
            drained += claimed.len();
            let (next, recorded) = tokio::join!(
                notifications.claim_deliveries(worker, BATCH),
                notifications.record_deliveries(worker, delivered(&claimed)),
            );
            assert_all_recorded(recorded.unwrap(), claimed.len());
            claimed = next.unwrap();
        }
    } else {
        loop {
            let claimed = notifications.claim_deliveries(worker, BATCH).await.unwrap();
            if claimed.is_empty() {
                break;
            }
            drained += claimed.len();
            let recorded = notifications
                .record_deliveries(worker, delivered(&claimed))
                .await
                .unwrap();
            assert_all_recorded(recorded, claimed.len());
        }
    }
    let elapsed = started.elapsed();
    assert_eq!(drained, n, "every queued delivery was drained once");
    store.close().await;
    (
        queued,
        n as f64 / elapsed.max(Duration::from_micros(1)).as_secs_f64(),
    )
}

fn event() -> NewEvent {
    NewEvent {
        id: EventId::new(),
        event_type: "bench_completed".to_owned(),
        payload: json!({"n": 1}),
        domain: "bench".to_owned(),
        severity: Severity::Info,
        idempotency: None,
    }
}

/// A webhook delivery with a body of a webhook's size (~300 bytes).
fn delivery(i: usize) -> NewDelivery {
    NewDelivery {
        channel_id: None,
        channel_type: ChannelType::Webhook,
        recipient: "http://127.0.0.1:9/hook".to_owned(),
        subject: format!("bench_completed {i}"),
        body: json!({
            "event_type": "bench_completed",
            "severity": "info",
            "payload": {"n": i, "host": "bench-host-0001", "detail": "x".repeat(200)},
        })
        .to_string(),
        priority: 0,
        max_attempts: 5,
        lease_duration: Duration::from_secs(30),
        throttle: None,
    }
}

/// Each claimed delivery reported delivered, with what a webhook's success records.
fn delivered(claimed: &[ClaimedDelivery]) -> Vec<DeliveryReport> {
    claimed
        .iter()
        .map(|c| DeliveryReport {
            id: c.delivery.id,
            claim_token: c.claim_token.clone(),
            outcome: DeliveryOutcome::Delivered(
                json!({"status": 200, "duration_ms": 1, "response": "ok"}),
            ),
        })
        .collect()
}

fn assert_all_recorded<T, E: std::fmt::Debug>(recorded: Vec<Result<T, E>>, claimed: usize) {
    assert_eq!(recorded.len(), claimed);
    for answer in recorded {
        answer.unwrap();
    }
}
