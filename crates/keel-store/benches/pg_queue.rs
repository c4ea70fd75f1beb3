//! The PostgreSQL store's own throughput, beside the raw SQL baseline (`../shared/peers/raw-sql.sh`)
//! on the same server: what keel's lease engine costs over the bare statements a job queue needs.
//!
//! On a fresh schema of the server at `KEEL_TEST_POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`), for each client count in `CLIENTS`
//! (default `4 8`), `RUNS` times (default 3), each run `SECS` seconds (default 20):
//!
//! - **enqueue**: each client creates pooled commands one at a time (`create_command`, one
//!   transaction each), as the raw `enqueue` does one `INSERT` per job;
//! - **claim+complete**: with `PREFILL` commands pending (default 1,000,000, as the raw
//!   baseline), each client claims 10 (`claim`) and completes them (`complete_batch`), as the
//!   raw `claim_complete` claims 10 with `FOR UPDATE SKIP LOCKED` and marks them done; a
//!   no-op job. A fresh backlog for each run, as the raw baseline's.
//! - **claim+complete each alone** (`ONLY=claim-each`): the same, but each of the 10 is
//!   completed by its own `complete` call, the 10 at once, as `keel agent` reports each command
//!   as it ends (concurrent ones are grouped into shared statements).
//! - **deliveries**: with `DELIVERY_PREFILL` deliveries pending (default 400,000), each
//!   client claims 100 (`claim_deliveries`) and records them delivered (`record_deliveries`).
//!
//! `cargo bench -p keel-store --bench pg_queue`; prints jobs/s, median and (min-max).

// Bench code: set-up failures are meant to stop the run.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keel_store::conformance::postgres::TestSchema;
use keel_store::notifications::model::{
    ChannelType, DeliveryOutcome, DeliveryReport, EventId, NewDelivery, NewEvent, Severity,
    WorkerId,
};
use keel_store::{
    AgentId, NewApiKey, NewCommand, NewCommandItem, OrgId, PgStore, Scope, Store, Target,
};
use serde_json::json;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let url = std::env::var("KEEL_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let runs: usize = env_or("RUNS", 3);
    let secs: u64 = env_or("SECS", 20);
    let prefill: usize = env_or("PREFILL", 1_000_000);
    let clients: Vec<usize> = std::env::var("CLIENTS")
        .unwrap_or_else(|_| "4 8".to_owned())
        .split_whitespace()
        .filter_map(|c| c.parse().ok())
        .collect();
    let only = std::env::var("ONLY").unwrap_or_default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let duration = Duration::from_secs(secs);
    println!("{:<34} {:>8}   (min-max of {runs})", "measure", "jobs/s");
    for &c in &clients {
        if only.is_empty() || only == "enqueue" {
            let rates: Vec<f64> = (0..runs)
                .map(|_| rt.block_on(enqueue(&url, c, duration)))
                .collect();
            report(&format!("enqueue, {c} clients"), rates);
        }
    }
    for &c in &clients {
        if only.is_empty() || only == "claim" {
            let rates = rt.block_on(claim_complete(
                &url,
                c,
                prefill,
                duration,
                runs,
                Reporting::Batch,
            ));
            report(&format!("claim+complete x10, {c} clients"), rates);
        }
    }
    for &c in &clients {
        if only.is_empty() || only == "claim-each" {
            let rates = rt.block_on(claim_complete(
                &url,
                c,
                prefill,
                duration,
                runs,
                Reporting::EachAlone,
            ));
            report(&format!("claim x10+complete each, {c} cl"), rates);
        }
    }
    for &c in &clients {
        if only.is_empty() || only == "deliveries" {
            let backlog = env_or("DELIVERY_PREFILL", 400_000);
            let rates = rt.block_on(deliveries(&url, c, backlog, duration, runs));
            report(&format!("deliveries x100, {c} clients"), rates);
        }
    }
}

fn report(what: &str, mut rates: Vec<f64>) {
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    println!(
        "{what:<34} {median:>8.0}   ({:.0}-{:.0})",
        rates[0],
        rates[rates.len() - 1]
    );
}

struct Fixture {
    _schema: TestSchema,
    store: Arc<PgStore>,
    org: OrgId,
    agents: Vec<AgentId>,
}

async fn fixture(url: &str, agents: usize) -> Fixture {
    let schema = TestSchema::create(url).await;
    let options = keel_store::PgOptions {
        max_connections: 32,
        ..schema.options()
    };
    let store = Arc::new(PgStore::connect(&options, None).await.unwrap());
    store.migrate().await.unwrap();
    let org = store.create_organisation("bench").await.unwrap().id;
    let mut ids = Vec::new();
    for n in 0..agents {
        let key = store
            .create_api_key(
                org,
                NewApiKey {
                    name: format!("agent {n}"),
                    scopes: vec![Scope::Agent],
                    agent_name: Some(format!("agent-{n}")),
                },
            )
            .await
            .unwrap();
        ids.push(key.key.agent_id.unwrap());
    }
    Fixture {
        _schema: schema,
        store,
        org,
        agents: ids,
    }
}

fn job(n: usize) -> NewCommand {
    NewCommand::new("noop", Target::Queue("q".to_owned()), json!({ "n": n }))
}

/// Runs `clients` loops of `step` for `duration`; jobs per second.
async fn drive<F, Fut>(clients: usize, duration: Duration, step: F) -> f64
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = usize> + Send,
{
    let step = Arc::new(step);
    let done = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|client| {
            let (step, done) = (step.clone(), done.clone());
            tokio::spawn(async move {
                while started.elapsed() < duration {
                    let n = step(client).await;
                    done.fetch_add(n, Ordering::Relaxed);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

async fn enqueue(url: &str, clients: usize, duration: Duration) -> f64 {
    let f = fixture(url, 0).await;
    let (store, org) = (f.store.clone(), f.org);
    drive(clients, duration, move |client| {
        let store = store.clone();
        async move {
            store.create_command(org, job(client), None).await.unwrap();
            1
        }
    })
    .await
}

async fn prefill_commands(store: &Arc<PgStore>, org: OrgId, n: usize) {
    // Four writers at once, batches of 1000.
    let tasks: Vec<_> = (0..4)
        .map(|w| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut created = w * 1000;
                while created < n {
                    let items: Vec<NewCommandItem> = (0..(n - created).min(1000))
                        .map(|i| NewCommandItem {
                            command: job(created + i),
                            idempotency: None,
                        })
                        .collect();
                    store.create_commands(org, items).await.unwrap();
                    created += 4000;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    sqlx::query("VACUUM ANALYZE commands")
        .execute(store.pool())
        .await
        .unwrap();
}

/// How a client reports the commands it claimed.
#[derive(Clone, Copy)]
enum Reporting {
    /// All in one `complete_batch`.
    Batch,
    /// Each in its own `complete`, all at once.
    EachAlone,
}

async fn claim_complete(
    url: &str,
    clients: usize,
    prefill: usize,
    duration: Duration,
    runs: usize,
    reporting: Reporting,
) -> Vec<f64> {
    let mut rates = Vec::new();
    for _ in 0..runs {
        // A fresh backlog for each run, as the raw baseline's.
        let f = fixture(url, clients).await;
        prefill_commands(&f.store, f.org, prefill).await;
        rates.push(claim_complete_run(&f, clients, duration, reporting).await);
    }
    rates
}

async fn claim_complete_run(
    f: &Fixture,
    clients: usize,
    duration: Duration,
    reporting: Reporting,
) -> f64 {
    let (store, org, agents) = (f.store.clone(), f.org, Arc::new(f.agents.clone()));
    let queues = Arc::new(vec!["q".to_owned()]);
    drive(clients, duration, move |client| {
        let (store, agents, queues) = (store.clone(), agents.clone(), queues.clone());
        async move {
            let agent = agents[client];
            let claimed = store.claim(org, agent, &queues, 10).await.unwrap();
            match reporting {
                Reporting::Batch => {
                    let reports = claimed
                        .iter()
                        .map(|c| (c.command.id, c.claim_token.clone(), json!(null)))
                        .collect();
                    let done = store.complete_batch(org, agent, reports).await.unwrap();
                    done.iter().filter(|r| r.is_ok()).count()
                }
                Reporting::EachAlone => {
                    let reports = claimed.iter().map(|c| {
                        store.complete(org, agent, c.command.id, &c.claim_token, json!(null))
                    });
                    let done = futures::future::join_all(reports).await;
                    done.iter().filter(|r| r.is_ok()).count()
                }
            }
        }
    })
    .await
}

async fn deliveries(
    url: &str,
    clients: usize,
    prefill: usize,
    duration: Duration,
    runs: usize,
) -> Vec<f64> {
    let f = fixture(url, 0).await;
    let notifications = f.store.notifications();
    let mut queued = 0;
    while queued < prefill {
        let event = NewEvent {
            id: EventId::new(),
            event_type: "bench".to_owned(),
            payload: json!({}),
            domain: "bench".to_owned(),
            severity: Severity::Info,
            idempotency: None,
        };
        let batch: Vec<NewDelivery> = (0..100)
            .map(|n| NewDelivery {
                channel_id: None,
                channel_type: ChannelType::Webhook,
                recipient: format!("http://127.0.0.1:9/{n}"),
                subject: String::new(),
                body: "{}".to_owned(),
                priority: 0,
                max_attempts: 3,
                lease_duration: Duration::from_secs(30),
                throttle: None,
            })
            .collect();
        notifications.trigger(f.org, event, batch).await.unwrap();
        queued += 100;
    }
    sqlx::query("VACUUM ANALYZE deliveries")
        .execute(f.store.pool())
        .await
        .unwrap();
    let mut rates = Vec::new();
    for _ in 0..runs {
        rates.push(deliveries_run(&f, clients, duration).await);
    }
    rates
}

async fn deliveries_run(f: &Fixture, clients: usize, duration: Duration) -> f64 {
    let store = f.store.clone();
    drive(clients, duration, move |_| {
        let store = store.clone();
        async move {
            let worker = WorkerId::new();
            let notifications = store.notifications();
            let claimed = notifications.claim_deliveries(worker, 100).await.unwrap();
            let reports = claimed
                .iter()
                .map(|d| DeliveryReport {
                    id: d.delivery.id,
                    claim_token: d.claim_token.clone(),
                    outcome: DeliveryOutcome::Delivered(json!({"status": 200})),
                })
                .collect();
            let answers = notifications
                .record_deliveries(worker, reports)
                .await
                .unwrap();
            answers.iter().filter(|a| a.is_ok()).count()
        }
    })
    .await
}
