//! keel on PostgreSQL over HTTP, with 1 and with 3 instances sharing one database: the real
//! `keel serve` binary (started by the integration tests' harness) on loopback ports.
//!
//! For each instance count, on a fresh schema of the server at `KEEL_TEST_POSTGRES_URL`
//! (default `postgres://postgres@127.0.0.1:5432/test`):
//!
//! 1. **Single creates**: 8 tasks each `POST /v1/commands` one command at a time (spread over
//!    the instances) for `SECS` seconds (default 15): commands accepted per second.
//! 2. **Claim → complete**: 4 agents per instance each claim 10 (`POST /v1/commands/claim`) and
//!    complete them in one `POST /v1/commands/reports`, until the commands of phase 1 are all
//!    done: no-op commands per second. Then as many again (created in batches), each of the 10
//!    completed by its own `POST /v1/commands/{id}/complete`, the 10 at once, as `keel agent`
//!    reports each command as it ends.
//! 3. **Deliveries**: 8 tasks queue `DELIVERIES` (default 10,000) webhook deliveries
//!    (`POST /v1/deliveries`) while every instance's workers send them to a receiver in this
//!    process: deliveries received per second, from the first queued to the last received.
//!
//! `cargo bench -p keel --bench postgres`; `INSTANCES="1 3"`, `SECS`, `DELIVERIES`.
//! Run `../shared/peers/graphile.sh` beside it (single `addJob`). Results in
//! `docs/benchmarks.md`.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

// Shared by the benches; this one uses part of it.
#[allow(dead_code)]
mod common;
#[path = "../tests/it/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use keel_store::MAX_BATCH_CREATE;
use keel_store::conformance::postgres::TestSchema;
use serde_json::{Value, json};

use common::{Errors, UNLIMITED_RATES, per_second};
use harness::{Api, Options, Server};

const CREATORS: usize = 8;
const AGENTS_PER_INSTANCE: usize = 4;
const QUEUERS: usize = 8;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let url = std::env::var("KEEL_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned());
    let secs: u64 = env_or("SECS", 15);
    let deliveries: usize = env_or("DELIVERIES", 10_000);
    let instances: Vec<usize> = std::env::var("INSTANCES")
        .unwrap_or_else(|_| "1 3".to_owned())
        .split_whitespace()
        .filter_map(|n| n.parse().ok())
        .collect();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    for n in instances {
        runtime.block_on(run(&url, n, Duration::from_secs(secs), deliveries));
    }
}

async fn run(url: &str, instances: usize, duration: Duration, deliveries: usize) {
    let schema = TestSchema::create(url).await;
    let toml: &'static str = Box::leak(
        format!(
            "[store]\nurl = \"{url}\"\n[store.postgres]\nschema = \"{}\"\nmax_connections = 32\n\
             {UNLIMITED_RATES}\n[notifications]\nallowed_networks = [\"127.0.0.1\"]\n\
             workers = 16\nsecret_key = \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"\n",
            schema.name()
        )
        .into_boxed_str(),
    );
    let mut servers = Vec::new();
    for _ in 0..instances {
        servers.push(
            Server::start_with(Options {
                extra_toml: toml,
                ..Options::default()
            })
            .await,
        );
    }
    servers[0].create_org("bench");
    let writer = servers[0].key("bench", "commands:write,commands:read", None);
    let errors = Errors::default();

    // 1. Single creates.
    let writers: Vec<Api> = servers.iter().map(|s| s.api(&writer.token)).collect();
    let created = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..CREATORS)
        .map(|task| {
            let (api, created, errors) = (
                writers[task % writers.len()].clone(),
                created.clone(),
                errors.clone(),
            );
            tokio::spawn(async move {
                let mut n = 0;
                while started.elapsed() < duration {
                    n += 1;
                    let sent = post(
                        &api,
                        "/v1/commands",
                        &json!({"type": "noop", "queue": "q", "params": {"n": n}}),
                    )
                    .await;
                    match sent {
                        Ok(_) => {
                            created.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e) => errors.record(e),
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let created = created.load(Ordering::Relaxed);
    let creates_per_second = per_second(created, started.elapsed());

    // 2. Claim -> complete: the commands of phase 1, reported in batches; then as many again
    // (created in batches), each reported alone.
    let mut agents = Vec::new();
    for (i, server) in servers.iter().enumerate() {
        for a in 0..AGENTS_PER_INSTANCE {
            let key = servers[0].key("bench", "agent", Some(&format!("agent-{i}-{a}")));
            let agent = server.api(&key.token);
            agent.check_in(&["q"]).await;
            agents.push(agent);
        }
    }
    let completes_per_second = drain(&agents, created, Reporting::Batch, &errors).await;
    for first in (0..created).step_by(MAX_BATCH_CREATE) {
        let commands: Vec<Value> = (first..(first + MAX_BATCH_CREATE).min(created))
            .map(|n| json!({"type": "noop", "queue": "q", "params": {"n": n}}))
            .collect();
        let api = &writers[0];
        if let Err(e) = post(api, "/v1/commands/batch", &json!({"commands": commands})).await {
            errors.record(e);
        }
    }
    let single_completes_per_second = drain(&agents, created, Reporting::EachAlone, &errors).await;

    // 3. Deliveries.
    let (received, hook) = receiver().await;
    let notifier = servers[0].key("bench", "notifications:write,notifications:read", None);
    let sender = notifier
        .post(
            "/v1/senders",
            &json!({"name": "s", "type": "webhook",
                    "secrets": {"signing_secrets": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]}}),
            201,
        )
        .await;
    let channel = notifier
        .post(
            "/v1/channels",
            &json!({"name": "hook", "type": "webhook", "url": hook, "sender_id": sender["id"],
                    "timeout_seconds": 10}),
            201,
        )
        .await["id"]
        .clone();
    let notifiers: Vec<Api> = servers.iter().map(|s| s.api(&notifier.token)).collect();
    let started = Instant::now();
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..QUEUERS)
        .map(|task| {
            let (api, next, channel, errors) = (
                notifiers[task % notifiers.len()].clone(),
                next.clone(),
                channel.clone(),
                errors.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= deliveries {
                        return;
                    }
                    let body = json!({"channel_id": channel, "body": format!("{{\"n\": {n}}}")});
                    if let Err(e) = post(&api, "/v1/deliveries", &body).await {
                        errors.record(e);
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let queued_in = started.elapsed();
    while received.load(Ordering::Relaxed) < deliveries
        && started.elapsed() < Duration::from_secs(300)
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let deliveries_per_second = per_second(received.load(Ordering::Relaxed), started.elapsed());

    println!(
        "{instances} instance(s): single creates {creates_per_second:.0}/s ({created} in {:?}, \
         {CREATORS} clients); claim 10 -> report 10 {completes_per_second:.0} commands/s, \
         claim 10 -> complete each {single_completes_per_second:.0} commands/s ({} agents); \
         deliveries {deliveries_per_second:.0}/s ({deliveries} queued in {queued_in:?}, \
         {QUEUERS} clients); errors {:?}",
        duration,
        instances * AGENTS_PER_INSTANCE,
        errors.snapshot()
    );
}

/// How an agent reports the commands it claimed.
#[derive(Clone, Copy)]
enum Reporting {
    /// All in one `POST /v1/commands/reports`.
    Batch,
    /// Each in its own `POST /v1/commands/{id}/complete`, all at once.
    EachAlone,
}

/// Every agent claims 10 and reports them, until `total` commands are completed: completed
/// commands per second.
async fn drain(agents: &[Api], total: usize, reporting: Reporting, errors: &Errors) -> f64 {
    let completed = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = agents
        .iter()
        .cloned()
        .map(|agent| {
            let (completed, errors) = (completed.clone(), errors.clone());
            tokio::spawn(async move {
                while completed.load(Ordering::Relaxed) < total
                    && started.elapsed() < Duration::from_secs(300)
                {
                    let claimed = match post(&agent, "/v1/commands/claim", &json!({"limit": 10}))
                        .await
                    {
                        Ok(answer) => answer["commands"].as_array().cloned().unwrap_or_default(),
                        Err(e) => {
                            errors.record(e);
                            continue;
                        }
                    };
                    if claimed.is_empty() {
                        continue;
                    }
                    let done = match reporting {
                        Reporting::Batch => report_batch(&agent, &claimed).await,
                        Reporting::EachAlone => complete_each(&agent, &claimed).await,
                    };
                    match done {
                        Ok(done) => {
                            completed.fetch_add(done, Ordering::Relaxed);
                        }
                        Err(e) => errors.record(e),
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    per_second(completed.load(Ordering::Relaxed), started.elapsed())
}

/// Reports `claimed` completed in one request: how many were completed.
async fn report_batch(agent: &Api, claimed: &[Value]) -> Result<usize, String> {
    let reports: Vec<Value> = claimed
        .iter()
        .map(|c| {
            json!({"id": c["id"], "claim_token": c["claim_token"],
                   "outcome": "completed", "result": {}})
        })
        .collect();
    let answer = post(agent, "/v1/commands/reports", &json!({"reports": reports})).await?;
    Ok(answer["results"]
        .as_array()
        .map_or(0, |r| r.iter().filter(|r| r["error"].is_null()).count()))
}

/// Completes each of `claimed` in a request of its own, all at once: how many were completed.
async fn complete_each(agent: &Api, claimed: &[Value]) -> Result<usize, String> {
    let completes = claimed.iter().map(|c| {
        let path = format!(
            "/v1/commands/{}/complete",
            c["id"].as_str().unwrap_or_default()
        );
        async move {
            post(
                agent,
                &path,
                &json!({"claim_token": c["claim_token"], "result": {}}),
            )
            .await
        }
    });
    let answers = futures::future::join_all(completes).await;
    let done = answers.iter().filter(|a| a.is_ok()).count();
    match answers.into_iter().find_map(Result::err) {
        Some(e) if done == 0 => Err(e),
        _ => Ok(done),
    }
}

/// POSTs `body`; `Err` names an unexpected status or a transport error.
async fn post(api: &Api, path: &str, body: &Value) -> Result<Value, String> {
    let response = api
        .client
        .post(format!("{}{path}", api.base))
        .bearer_auth(&api.token)
        .json(body)
        .send()
        .await
        .map_err(|e| format!("{path}: {e}"))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("{path} {status}"));
    }
    response.json().await.map_err(|e| format!("{path}: {e}"))
}

/// A receiver answering 200 and counting requests.
async fn receiver() -> (Arc<AtomicUsize>, String) {
    let received = Arc::new(AtomicUsize::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let count = received.clone();
    let app = axum::Router::new().fallback(move || {
        let count = count.clone();
        async move {
            count.fetch_add(1, Ordering::Relaxed);
            StatusCode::OK
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await });
    (received, format!("http://{address}/hook"))
}
