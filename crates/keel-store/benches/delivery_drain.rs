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
//! `--`); prints 3 runs at FULL and NORMAL. With `BACKLOG=1000000` it measures instead how the
//! cost grows: on one store at FULL, three rounds of `N` queued and `N` drained (serial, then
//! overlapped) with that many older deliveries pending, next to the same on an empty store.

// Bench code: set-up failures are meant to stop the run.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_store::notifications::model::{
    ChannelType, ClaimedDelivery, DeliveryOutcome, DeliveryReport, EventId, NewDelivery, NewEvent,
    Severity, WorkerId,
};
use keel_store::{OrgId, SqliteOptions, SqliteStore, Store, Synchronous, SystemClock};
use serde_json::json;

/// Deliveries per claim, as the processor's claimer takes them (half of its buffer).
const BATCH: u32 = 256;

fn main() {
    let n: usize = std::env::args()
        .skip(1)
        .find_map(|arg| arg.parse().ok())
        .unwrap_or(10_000);
    let backlog: usize = std::env::var("BACKLOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if backlog > 0 {
        // The same measures with `backlog` older deliveries pending, next to an empty queue.
        for (name, pending) in [("empty", 0), ("backlog", backlog)] {
            for (round, (queued, serial, overlapped)) in rt
                .block_on(run_on_one_store(n, pending))
                .into_iter()
                .enumerate()
            {
                println!(
                    "FULL, {name} ({pending} pending), round {}: queued {queued:.0}/s, \
                     serial drain {serial:.0}/s, overlapped drain {overlapped:.0}/s",
                    round + 1
                );
            }
        }
        return;
    }
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

async fn open(dir: &tempfile::TempDir, synchronous: Synchronous) -> (SqliteStore, OrgId) {
    let options = SqliteOptions {
        synchronous,
        ..SqliteOptions::default()
    };
    let store = SqliteStore::open(&dir.path().join("keel.db"), options, Arc::new(SystemClock))
        .await
        .unwrap();
    let org = store.create_organisation("bench").await.unwrap().id;
    (store, org)
}

/// Returns (deliveries queued per second, deliveries drained per second).
async fn run(n: usize, synchronous: Synchronous, overlapped: bool) -> (f64, f64) {
    let dir = tempfile::tempdir().unwrap();
    let (store, org) = open(&dir, synchronous).await;
    let queued = queue(&store, org, n).await;
    let drained = drain(&store, n, overlapped).await;
    assert_eq!(
        store
            .notifications()
            .claim_deliveries(WorkerId::new(), 1)
            .await
            .unwrap()
            .len(),
        0,
        "every queued delivery was drained once"
    );
    store.close().await;
    (queued, drained)
}

/// At FULL, on one store with `pending` older deliveries queued first (1,000 an event), three
/// rounds of: `n` queued (per second), `n` drained serially (per second), `n` more queued and
/// `n` drained overlapped (per second). The oldest go first, so from the backlog when there is
/// one; the rounds show whether a first drain's cost after the fill lasts.
async fn run_on_one_store(n: usize, pending: usize) -> Vec<(f64, f64, f64)> {
    let dir = tempfile::tempdir().unwrap();
    let (store, org) = open(&dir, Synchronous::Full).await;
    let mut filled = 0;
    while filled < pending {
        let count = (pending - filled).min(1000);
        let deliveries = (filled..filled + count).map(delivery).collect();
        store
            .notifications()
            .trigger(org, event(), deliveries)
            .await
            .unwrap();
        filled += count;
    }
    let mut rounds = Vec::new();
    for _ in 0..3 {
        let queued = queue(&store, org, n).await;
        let serial = drain(&store, n, false).await;
        queue(&store, org, n).await;
        let overlapped = drain(&store, n, true).await;
        rounds.push((queued, serial, overlapped));
    }
    store.close().await;
    rounds
}

/// Queues `n` deliveries, one event each, by 8 callers at once as the HTTP triggers queue them;
/// returns how many a second.
async fn queue(store: &SqliteStore, org: OrgId, n: usize) -> f64 {
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
    n as f64 / started.elapsed().as_secs_f64()
}

/// Claims `n` deliveries in claims of [`BATCH`] and records each claim delivered; returns how
/// many a second.
async fn drain(store: &SqliteStore, n: usize, overlapped: bool) -> f64 {
    let notifications = store.notifications();
    let worker = WorkerId::new();
    let claim = |drained: usize| {
        let want = u32::try_from((n - drained).min(BATCH as usize)).unwrap();
        notifications.claim_deliveries(worker, want)
    };
    let started = Instant::now();
    let mut drained = 0;
    if overlapped {
        let mut claimed = claim(drained).await.unwrap();
        while !claimed.is_empty() {
            drained += claimed.len();
            let next = async {
                if drained < n {
                    claim(drained).await.unwrap()
                } else {
                    Vec::new()
                }
            };
            let (next, recorded) = tokio::join!(
                next,
                notifications.record_deliveries(worker, delivered(&claimed)),
            );
            assert_all_recorded(recorded.unwrap(), claimed.len());
            claimed = next;
        }
    } else {
        while drained < n {
            let claimed = claim(drained).await.unwrap();
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
    assert_eq!(drained, n, "{n} deliveries drained, each once");
    n as f64 / elapsed.max(Duration::from_micros(1)).as_secs_f64()
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
        // One recipient each: deliveries of one event are unique per recipient.
        recipient: format!("http://127.0.0.1:9/hook/{i}"),
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
