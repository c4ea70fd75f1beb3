//! Fairness under one organisation's flood, on real processes: the `keel serve` binary on a
//! loopback port with its default `[overload]` configuration, driven over HTTP.
//!
//! Organisation B's 4 agents (in-process HTTP clients: claim, heartbeat, complete) run 500
//! commands alone, then again while organisation A floods creates as fast as it can, ignoring
//! `Retry-After` (from a runtime and connection pool of its own, as another client would). Printed: B's claim and heartbeat latency unloaded vs loaded, whether any of
//! B's leases expired (`keel_commands_released_total`, attempts > 1), whether any command ran
//! twice, and A's status-code histogram (201/429/503 expected, never 500).
//!
//! `cargo bench -p keel --bench fairness`; `FAIRNESS_SECONDS` sets the flood's length (default
//! 60), `FAIRNESS_FLOODERS` its concurrent clients (default 16); `FAIRNESS_WORK_PER_SECOND=N`
//! sets every organisation's `work` bucket to N a second with bursts of 2N;
//! `FAIRNESS_UNLIMITED=1` lifts the rate and in-flight limits, for comparison. Results:
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

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use serde_json::{Value, json};

use common::{env_number, percentile};
use harness::{Api, Options, Server};

/// Commands B's agents run in each phase.
const COMMANDS: usize = 500;
/// B's agents.
const AGENTS: usize = 4;
/// B's lease: the shortest the API accepts.
const LEASE_SECONDS: u64 = keel_store::MIN_LEASE_SECONDS;
/// How long one of B's agents "works" on a command, between its heartbeat and its completion.
const WORK: Duration = Duration::from_millis(10);
/// No phase runs longer than this; a phase that hits it reports what it did.
const PHASE_DEADLINE: Duration = Duration::from_secs(300);
const QUEUE: &str = "work";
/// Expired leases are released within a second, so an expiry shows in the counts.
const RELEASE_EVERY_SECOND: &str = "[commands]\nrelease_stuck_interval = \"1s\"\n";
/// The same, with the rate and in-flight limits out of reach.
const UNLIMITED: &str = "[commands]\nrelease_stuck_interval = \"1s\"\n\
    [overload]\nmax_in_flight = 1000000\nreserved_for_reports = 1\n\
    [overload.rate_limits]\nwork_per_second = 1000000000\nwork_burst = 1000000000\n\
    agent_per_second = 1000000000\nagent_burst = 1000000000\n";

fn main() {
    let seconds = env_number("FAIRNESS_SECONDS", 60);
    let flooders = env_number("FAIRNESS_FLOODERS", 16);
    let extra_toml = if std::env::var_os("FAIRNESS_UNLIMITED").is_some() {
        println!("rate and in-flight limits lifted (FAIRNESS_UNLIMITED)");
        UNLIMITED.to_owned()
    } else if let Ok(rate) = std::env::var("FAIRNESS_WORK_PER_SECOND") {
        let rate: u32 = rate.parse().expect("FAIRNESS_WORK_PER_SECOND: a number");
        println!("work buckets: {rate}/s, bursts of {}", 2 * rate);
        format!(
            "{RELEASE_EVERY_SECOND}[overload.rate_limits]\nwork_per_second = {rate}\nwork_burst = {}\n",
            2 * rate
        )
    } else {
        RELEASE_EVERY_SECOND.to_owned()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The harness takes its configuration as a `&'static str`; this one lives for the run.
    let extra_toml: &'static str = extra_toml.leak();
    runtime.block_on(run(Duration::from_secs(seconds), flooders, extra_toml));
}

// ---------------------------------------------------------------------------------------------
// The client side (the server is started by the integration tests' harness).

/// An answer: its status (0 for a transport error), its JSON, its `Retry-After`.
struct Answer {
    status: u16,
    body: Value,
    retry_after: Option<u64>,
}

/// POSTs `body` as `api`; every answer is counted by the caller, none is fatal.
async fn send(api: &Api, path: &str, body: &Value) -> Answer {
    let sent = api
        .client
        .post(format!("{}{path}", api.base))
        .bearer_auth(&api.token)
        .json(body)
        .send()
        .await;
    let Ok(response) = sent else {
        return Answer {
            status: 0,
            body: Value::Null,
            retry_after: None,
        };
    };
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|value| value.to_str().ok()?.parse().ok());
    let body = response.json().await.unwrap_or(Value::Null);
    Answer {
        status,
        body,
        retry_after,
    }
}

/// Statuses seen, by status (0: transport error).
#[derive(Clone, Default)]
struct Statuses(Arc<Mutex<BTreeMap<u16, u64>>>);

impl Statuses {
    fn record(&self, status: u16) {
        *self.0.lock().entry(status).or_default() += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// The run.

/// What B's agents saw in one phase.
#[derive(Default)]
struct Phase {
    claim: Vec<Duration>,
    heartbeat: Vec<Duration>,
    completed: usize,
    retried: usize,
    elapsed: Duration,
    create_refusals: u64,
    unexpected: BTreeMap<String, u64>,
}

async fn run(flood_for: Duration, flooders: u64, extra_toml: &'static str) {
    let server = Server::start_with(Options {
        extra_toml,
        ..Options::default()
    })
    .await;
    server.create_org("a");
    server.create_org("b");
    let a_ops = server.key("a", "commands:write", None);
    let b_ops = server.key("b", "commands:write", None);
    let agents: Vec<Api> = (0..AGENTS)
        .map(|i| server.key("b", "agent", Some(&format!("b{i}"))))
        .collect();
    for agent in &agents {
        let body =
            json!({"version": "fairness", "queues": [QUEUE], "boot_id": uuid::Uuid::new_v4()});
        assert_eq!(send(agent, "/v1/agents/check-in", &body).await.status, 200);
    }
    // Claims per command id, across both phases: more than one means it ran twice.
    let claims_per_command: Arc<Mutex<HashMap<String, u32>>> = Arc::default();

    println!("B alone: {COMMANDS} commands, {AGENTS} agents, {LEASE_SECONDS} s leases");
    let unloaded = run_b(&b_ops, &agents, &claims_per_command).await;

    println!("A floods creates with {flooders} clients for {flood_for:?}; B runs again");
    let stop = Arc::new(AtomicBool::new(false));
    let a_statuses = Statuses::default();
    // A is another client than B's agents: its tasks run on a runtime (and a connection pool)
    // of their own, so B's requests never wait behind A's in the bench's own task queues.
    let flood_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("flood")
        .enable_all()
        .build()
        .unwrap();
    let a_ops = Api {
        client: reqwest::Client::new(),
        ..a_ops
    };
    let flood_started = Instant::now();
    let flood: Vec<_> = (0..flooders)
        .map(|_| {
            let (api, stop, statuses) = (a_ops.clone(), stop.clone(), a_statuses.clone());
            flood_runtime.spawn(async move {
                let body =
                    json!({"type": "flood", "queue": "flood", "params": {"pad": "x".repeat(200)}});
                while !stop.load(Ordering::Relaxed) {
                    statuses.record(send(&api, "/v1/commands", &body).await.status);
                }
            })
        })
        .collect();
    // The flood is established before B starts.
    tokio::time::sleep(Duration::from_secs(1).min(flood_for)).await;
    let loaded = run_b(&b_ops, &agents, &claims_per_command).await;
    let b_done_at = flood_started.elapsed();
    tokio::time::sleep(flood_for.saturating_sub(flood_started.elapsed())).await;
    stop.store(true, Ordering::Relaxed);
    for task in flood {
        task.await.unwrap();
    }
    let flood_elapsed = flood_started.elapsed();
    flood_runtime.shutdown_background();

    let metrics = server.metrics().await;
    let ran_twice = claims_per_command
        .lock()
        .values()
        .filter(|&&claims| claims > 1)
        .count();
    print_phase("unloaded", &unloaded);
    print_phase("loaded", &loaded);
    println!("B finished its loaded run {b_done_at:.1?} into the flood");
    println!("leases released (keel_commands_released_total):");
    for line in metrics
        .lines()
        .filter(|line| line.starts_with("keel_commands_released_total"))
    {
        println!("  {line}");
    }
    println!(
        "B commands that ran twice (claimed more than once): {ran_twice}; completed with attempts > 1: {}",
        unloaded.retried + loaded.retried
    );
    let statuses = a_statuses.0.lock().clone();
    let total: u64 = statuses.values().sum();
    println!(
        "A's creates: {total} in {flood_elapsed:.1?} ({:.0}/s), by status (0 = transport error): {statuses:?}",
        total as f64 / flood_elapsed.as_secs_f64()
    );
    for line in metrics
        .lines()
        .filter(|line| line.starts_with("keel_overload_rejected_total"))
    {
        println!("  {line}");
    }
    if statuses
        .keys()
        .any(|&status| status >= 500 && status != 503)
    {
        println!("!! A saw an error status other than 503");
    }
}

/// B creates [`COMMANDS`] commands (honouring `Retry-After`), then its agents run them all.
async fn run_b(
    ops: &Api,
    agents: &[Api],
    claims_per_command: &Arc<Mutex<HashMap<String, u32>>>,
) -> Phase {
    let started = Instant::now();
    let mut phase = Phase::default();
    let body =
        json!({"type": "job", "queue": QUEUE, "priority": 100, "lease_seconds": LEASE_SECONDS});
    let mut created = 0;
    while created < COMMANDS && started.elapsed() < PHASE_DEADLINE {
        let answer = send(ops, "/v1/commands", &body).await;
        match answer.status {
            201 => created += 1,
            429 | 503 => {
                phase.create_refusals += 1;
                let wait = answer.retry_after.unwrap_or(1);
                tokio::time::sleep(Duration::from_secs(wait)).await;
            }
            status => {
                *phase
                    .unexpected
                    .entry(format!("create {status}"))
                    .or_default() += 1
            }
        }
    }
    let completed = Arc::new(AtomicUsize::new(0));
    let results: Vec<_> = agents
        .iter()
        .map(|agent| {
            let (agent, completed, claims) =
                (agent.clone(), completed.clone(), claims_per_command.clone());
            tokio::spawn(async move { run_agent(agent, completed, claims, started).await })
        })
        .collect();
    for result in results {
        let agent = result.await.unwrap();
        phase.claim.extend(agent.claim);
        phase.heartbeat.extend(agent.heartbeat);
        phase.completed += agent.completed;
        phase.retried += agent.retried;
        for (what, count) in agent.unexpected {
            *phase.unexpected.entry(what).or_default() += count;
        }
    }
    phase.elapsed = started.elapsed();
    phase
}

/// One agent: claim one, heartbeat, work, complete; until the phase's commands are done.
async fn run_agent(
    agent: Api,
    completed: Arc<AtomicUsize>,
    claims_per_command: Arc<Mutex<HashMap<String, u32>>>,
    started: Instant,
) -> Phase {
    let mut phase = Phase::default();
    let mut unexpected = |what: &str, status: u16| {
        *phase
            .unexpected
            .entry(format!("{what} {status}"))
            .or_default() += 1;
    };
    let mut claim_times = Vec::new();
    let mut heartbeat_times = Vec::new();
    let (mut done, mut retried) = (0, 0);
    while completed.load(Ordering::Relaxed) < COMMANDS && started.elapsed() < PHASE_DEADLINE {
        let sent = Instant::now();
        let answer = send(
            &agent,
            "/v1/commands/claim",
            &json!({"limit": 1, "wait_seconds": 1}),
        )
        .await;
        let took = sent.elapsed();
        if answer.status != 200 {
            unexpected("claim", answer.status);
            tokio::time::sleep(Duration::from_secs(answer.retry_after.unwrap_or(1))).await;
            continue;
        }
        let Some(command) = answer.body["commands"].get(0).cloned() else {
            continue;
        };
        claim_times.push(took);
        let id = command["id"].as_str().unwrap_or_default().to_owned();
        *claims_per_command.lock().entry(id.clone()).or_default() += 1;
        let token = json!({"claim_token": command["claim_token"]});
        let sent = Instant::now();
        let beat = send(&agent, &format!("/v1/commands/{id}/heartbeat"), &token).await;
        heartbeat_times.push(sent.elapsed());
        if beat.status != 200 {
            unexpected("heartbeat", beat.status);
        }
        tokio::time::sleep(WORK).await;
        let done_answer = send(&agent, &format!("/v1/commands/{id}/complete"), &token).await;
        if done_answer.status == 200 {
            done += 1;
            completed.fetch_add(1, Ordering::Relaxed);
            if done_answer.body["attempts"].as_u64().unwrap_or(0) > 1 {
                retried += 1;
            }
        } else {
            unexpected("complete", done_answer.status);
        }
    }
    phase.claim = claim_times;
    phase.heartbeat = heartbeat_times;
    phase.completed = done;
    phase.retried = retried;
    phase
}

fn print_phase(label: &str, phase: &Phase) {
    let (claim, heartbeat) = (sorted(&phase.claim), sorted(&phase.heartbeat));
    println!(
        "{label:>8}: B completed {}/{COMMANDS} in {:.1?}; claim p50 {:.1} ms p99 {:.1} ms; \
         heartbeat p50 {:.1} ms p99 {:.1} ms; B creates refused {}; unexpected {:?}",
        phase.completed,
        phase.elapsed,
        ms(percentile(&claim, 0.50)),
        ms(percentile(&claim, 0.99)),
        ms(percentile(&heartbeat, 0.50)),
        ms(percentile(&heartbeat, 0.99)),
        phase.create_refusals,
        phase.unexpected,
    );
}

fn sorted(samples: &[Duration]) -> Vec<Duration> {
    let mut sorted = samples.to_vec();
    sorted.sort();
    sorted
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}
