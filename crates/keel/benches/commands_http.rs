//! Commands end to end over HTTP: the real `keel serve` binary on a loopback port, driven with
//! reqwest (keep-alive), once at `[store] synchronous = "normal"` and once at `"full"`.
//!
//! 1. Throughput: create → claim → complete, claim batches of 1, 10 and 100.
//! 2. Claim latency with 10 agents draining a pre-filled pool.
//! 3. Enqueue → long-poll latency: from just before the create is sent to the waiting agent
//!    receiving its claim answer; alone, then with 9 other agents long-polling the same
//!    organisation on another queue.
//!
//! 4. Concurrency: 1, 8 and 64 agents at once, each on its own queue: create 10 commands one
//!    request at a time, claim them in one request, report them in one `POST
//!    /v1/commands/reports`; `BENCH_ONLY=concurrency` runs only this phase.
//!
//! `cargo bench -p keel --bench commands_http` (`BENCH_QUICK=1` for a short smoke run).
//! Results and the reading are in `docs/benchmarks.md`.
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

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::{Errors, UNLIMITED_RATES, metric_lines, ms, per_second, percentile};

/// Commands per claim batch size in the throughput phase.
const THROUGHPUT_COMMANDS: usize = 2_000;
const BATCHES: [u32; 3] = [1, 10, 100];
/// Concurrent tasks sending creates.
const CREATORS: usize = 4;
/// Agents in the claim-latency and long-poll phases.
const AGENTS: usize = 10;
/// Pooled commands the agents drain in the claim-latency phase.
const POOL: usize = 3_000;
/// Enqueue → long-poll rounds.
const LONG_POLL_ROUNDS: usize = 200;
/// Time given to a waiting agent's claim to reach the server before the create is sent.
const LONG_POLL_SETTLE: Duration = Duration::from_millis(50);
/// No phase runs longer than this; a phase that hits it reports what it did.
const PHASE_DEADLINE: Duration = Duration::from_secs(180);
/// Per-request timeout of the client.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(45);

const QUEUE: &str = "bench";
const IDLE_QUEUE: &str = "idle";
const ORG: &str = "bench";

fn main() {
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let scale = if quick { 10 } else { 1 };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    if std::env::var("BENCH_ONLY").as_deref() == Ok("concurrency") {
        for synchronous in ["normal", "full"] {
            runtime.block_on(concurrency_run(synchronous, scale));
        }
        return;
    }
    let mut reports = Vec::new();
    for synchronous in ["normal", "full"] {
        println!("\n=== [store] synchronous = \"{synchronous}\" ===");
        let report = runtime.block_on(run(synchronous, scale));
        reports.push((synchronous, report));
    }
    print_summary(&reports);
}

// ---------------------------------------------------------------------------------------------
// The server.

/// `keel serve` as a child process; killed when dropped (also while unwinding from a panic).
struct Server {
    child: Child,
    config_path: PathBuf,
    base: String,
    dir: tempfile::TempDir,
}

impl Server {
    fn start(synchronous: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // No `[log]` table: the default configuration, one `stdout` text sink taking every
        // stream at info (an access record per request), with stdout sent to /dev/null below.
        let config = format!(
            r#"data_dir = "{data}"

[http]
listen = "127.0.0.1:{port}"

[store]
synchronous = "{synchronous}"

{UNLIMITED_RATES}"#,
            data = dir.path().join("data").display(),
        );
        let config_path = dir.path().join("keel.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
        command
            .arg("serve")
            .arg("--config")
            .arg(&config_path)
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        clear_keel_env(&mut command);
        let mut child = command.spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[keel stderr] {line}");
            }
        });
        let mut server = Server {
            child,
            config_path,
            base: format!("http://127.0.0.1:{port}"),
            dir,
        };
        let address = format!("127.0.0.1:{port}");
        let started = Instant::now();
        while std::net::TcpStream::connect(&address).is_err() {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("keel serve exited during start-up: {status}");
            }
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "keel serve did not listen within 30 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }

    /// `keel admin --config <this server's config> ARGS`; its stdout, trimmed.
    fn admin(&self, args: &[&str]) -> String {
        let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
        command
            .arg("admin")
            .arg("--config")
            .arg(&self.config_path)
            .args(args)
            .current_dir(self.dir.path());
        clear_keel_env(&mut command);
        let output = command.output().unwrap();
        assert!(output.status.success(), "keel admin {args:?}: {output:?}");
        String::from_utf8(output.stdout).unwrap().trim().to_owned()
    }

    /// A new client (its own connection pool) with a new key of organisation [`ORG`].
    fn key(&self, scopes: &str, agent: Option<&str>) -> Api {
        let mut args = vec![
            "create-key",
            "--org",
            ORG,
            "--name",
            "bench",
            "--scopes",
            scopes,
        ];
        if let Some(agent) = agent {
            args.extend(["--agent", agent]);
        }
        Api {
            client: client(),
            base: self.base.clone(),
            token: self.admin(&args),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The child must not pick up configuration from the environment of the bench.
fn clear_keel_env(command: &mut Command) {
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KEEL_") {
            command.env_remove(name);
        }
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .unwrap()
}

// ---------------------------------------------------------------------------------------------
// The client side.

/// A client with one API key.
#[derive(Clone)]
struct Api {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    /// POSTs `body`; the answer's JSON when its status is `expect`, else `None` (recorded).
    async fn post(
        &self,
        what: &str,
        path: &str,
        body: &Value,
        expect: u16,
        errors: &Errors,
    ) -> Option<Value> {
        let response = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await;
        let response = match response {
            Ok(response) => response,
            Err(err) => {
                errors.record(format!("{what}: transport error: {err}"));
                return None;
            }
        };
        let status = response.status().as_u16();
        let text = match response.text().await {
            Ok(text) => text,
            Err(err) => {
                errors.record(format!("{what}: body error: {err}"));
                return None;
            }
        };
        if status != expect {
            let code = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|body| body["error"]["code"].as_str().map(str::to_owned))
                .unwrap_or_default();
            errors.record(format!("{what}: {status} {code}"));
            return None;
        }
        match serde_json::from_str(&text) {
            Ok(value) => Some(value),
            Err(err) => {
                errors.record(format!("{what}: bad JSON: {err}"));
                None
            }
        }
    }

    async fn create(&self, n: usize, errors: &Errors) -> Option<Value> {
        self.post(
            "create",
            "/v1/commands",
            &json!({"type": "bench", "queue": QUEUE, "params": {"n": n}}),
            201,
            errors,
        )
        .await
    }

    /// Claims up to `limit` from the agent's queues (or `queues`), waiting up to `wait` s.
    async fn claim(
        &self,
        limit: u32,
        wait: u64,
        queues: Option<&[&str]>,
        errors: &Errors,
    ) -> Option<Vec<Value>> {
        let mut body = json!({"limit": limit, "wait_seconds": wait});
        if let Some(queues) = queues {
            body["queues"] = json!(queues);
        }
        let answer = self
            .post("claim", "/v1/commands/claim", &body, 200, errors)
            .await?;
        answer["commands"].as_array().cloned()
    }

    async fn complete(&self, command: &Value, errors: &Errors) -> bool {
        let id = command["id"].as_str().unwrap_or_default();
        self.post(
            "complete",
            &format!("/v1/commands/{id}/complete"),
            &json!({"claim_token": command["claim_token"], "result": {"ok": true}}),
            200,
            errors,
        )
        .await
        .is_some()
    }

    async fn check_in(&self, errors: &Errors) {
        self.post(
            "check-in",
            "/v1/agents/check-in",
            &json!({"version": "bench", "queues": [QUEUE], "boot_id": uuid::Uuid::new_v4()}),
            200,
            errors,
        )
        .await
        .expect("check-in failed");
    }

    async fn metrics(&self) -> String {
        let response = self
            .client
            .get(format!("{}/metrics", self.base))
            .send()
            .await;
        match response {
            Ok(response) => response.text().await.unwrap_or_default(),
            Err(err) => format!("# /metrics failed: {err}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One run.

struct Throughput {
    batch: u32,
    completed: usize,
    elapsed: Duration,
    creates_done: Duration,
    claims: usize,
    claim_p50: Duration,
}

struct ClaimLatency {
    prefill: usize,
    prefill_elapsed: Duration,
    completed: usize,
    elapsed: Duration,
    claim: Vec<Duration>,
    complete: Vec<Duration>,
}

struct LongPoll {
    label: &'static str,
    latency: Vec<Duration>,
    create: Vec<Duration>,
    missed: usize,
}

struct Report {
    throughput: Vec<Throughput>,
    claim: ClaimLatency,
    long_poll: Vec<LongPoll>,
    errors: BTreeMap<String, u64>,
    metrics: Vec<String>,
}

async fn run(synchronous: &str, scale: usize) -> Report {
    let server = Server::start(synchronous);
    server.admin(&["create-org", ORG]);
    let ops = server.key("commands:write,commands:read", None);
    let errors = Errors::default();
    let mut agents = Vec::new();
    for i in 0..AGENTS {
        let agent = server.key("agent", Some(&format!("agent-{i}")));
        agent.check_in(&errors).await;
        agents.push(agent);
    }

    let mut throughput = Vec::new();
    for batch in BATCHES {
        let result = throughput_phase(
            &ops,
            &agents[0],
            batch,
            THROUGHPUT_COMMANDS / scale,
            &errors,
        )
        .await;
        println!(
            "throughput batch {:>3}: {:>5} commands in {:>7.2} s = {:>7.0} commands/s \
             (creates done at {:.2} s; {} claims, {:.1} per claim; claim p50 {:.2} ms)",
            batch,
            result.completed,
            result.elapsed.as_secs_f64(),
            per_second(result.completed, result.elapsed),
            result.creates_done.as_secs_f64(),
            result.claims,
            result.completed as f64 / result.claims.max(1) as f64,
            ms(result.claim_p50),
        );
        throughput.push(result);
    }

    let claim = claim_latency_phase(&ops, &agents, POOL / scale, &errors).await;
    println!(
        "claim latency, {} agents: prefill {} creates in {:.2} s ({:.0}/s); drained {} in {:.2} s \
         = {:.0} commands/s; claim p50 {:.2} ms p99 {:.2} ms; complete p50 {:.2} ms p99 {:.2} ms",
        AGENTS,
        claim.prefill,
        claim.prefill_elapsed.as_secs_f64(),
        per_second(claim.prefill, claim.prefill_elapsed),
        claim.completed,
        claim.elapsed.as_secs_f64(),
        per_second(claim.completed, claim.elapsed),
        ms(percentile(&claim.claim, 0.50)),
        ms(percentile(&claim.claim, 0.99)),
        ms(percentile(&claim.complete, 0.50)),
        ms(percentile(&claim.complete, 0.99)),
    );

    let mut long_poll = Vec::new();
    for others in [0, AGENTS - 1] {
        let result =
            long_poll_phase(&ops, &agents, others, LONG_POLL_ROUNDS / scale, &errors).await;
        println!(
            "long-poll ({}): p50 {:.2} ms p99 {:.2} ms over {} rounds ({} missed); \
             create alone p50 {:.2} ms p99 {:.2} ms",
            result.label,
            ms(percentile(&result.latency, 0.50)),
            ms(percentile(&result.latency, 0.99)),
            result.latency.len(),
            result.missed,
            ms(percentile(&result.create, 0.50)),
            ms(percentile(&result.create, 0.99)),
        );
        long_poll.push(result);
    }

    let metrics = metric_lines(
        &ops.metrics().await,
        &[
            "keel_log_dropped_total",
            "keel_log_fallback_total",
            "keel_panics_total",
            "keel_commands_finished_total",
        ],
    );
    drop(server);
    Report {
        throughput,
        claim,
        long_poll,
        errors: errors.snapshot(),
        metrics,
    }
}

/// Commands each agent runs per round of the concurrency phase.
const CONCURRENCY_BATCH: usize = 10;

/// Throughput through the real server with 1, 8 and 64 agents working at once.
async fn concurrency_run(synchronous: &str, scale: usize) {
    let server = Server::start(synchronous);
    server.admin(&["create-org", ORG]);
    let ops = server.key("commands:write,commands:read", None);
    let errors = Errors::default();
    let mut agents = Vec::new();
    for i in 0..64 {
        let agent = server.key("agent", Some(&format!("agent-{i}")));
        agent.check_in(&errors).await;
        agents.push(agent);
    }
    for concurrency in [1_usize, 8, 64] {
        // About 2,000 commands per setting (fewer with BENCH_QUICK).
        let rounds = (2000 / scale / (CONCURRENCY_BATCH * concurrency)).max(2);
        let started = Instant::now();
        let tasks: Vec<_> = agents
            .iter()
            .take(concurrency)
            .enumerate()
            .map(|(n, agent)| {
                let (ops, agent, errors) = (ops.clone(), agent.clone(), errors.clone());
                tokio::spawn(async move {
                    let queue = format!("c{n}");
                    let mut done = 0;
                    for _ in 0..rounds {
                        for i in 0..CONCURRENCY_BATCH {
                            let body = json!({"type": "bench", "queue": queue, "params": {"i": i}});
                            ops.post("create", "/v1/commands", &body, 201, &errors)
                                .await;
                        }
                        let Some(claimed) = agent
                            .claim(
                                CONCURRENCY_BATCH as u32,
                                0,
                                Some(&[queue.as_str()]),
                                &errors,
                            )
                            .await
                        else {
                            continue;
                        };
                        if claimed.is_empty() {
                            continue;
                        }
                        let reports: Vec<Value> = claimed
                            .iter()
                            .map(|c| {
                                json!({"id": c["id"], "claim_token": c["claim_token"],
                                       "outcome": "completed", "result": {"ok": true}})
                            })
                            .collect();
                        let answer = agent
                            .post(
                                "reports",
                                "/v1/commands/reports",
                                &json!({"reports": reports}),
                                200,
                                &errors,
                            )
                            .await;
                        if let Some(answer) = answer {
                            done += answer["results"].as_array().map_or(0, |r| {
                                r.iter().filter(|r| r["status"] == "completed").count()
                            });
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
        println!(
            "synchronous {synchronous:>6}, {concurrency:>2} agents: {done:>5} commands in {:>6.2} s = {:>6.0} commands/s",
            elapsed.as_secs_f64(),
            per_second(done, elapsed),
        );
    }
    let errors = errors.snapshot();
    if !errors.is_empty() {
        println!("  unexpected answers: {errors:?}");
    }
}

/// Creates `n` pooled commands from [`CREATORS`] tasks sharing `ops`'s client; how many were
/// created.
async fn create_many(ops: &Api, n: usize, deadline: Instant, errors: &Errors) -> usize {
    let next = Arc::new(AtomicUsize::new(0));
    let created = Arc::new(AtomicUsize::new(0));
    let mut creators = Vec::new();
    for _ in 0..CREATORS {
        let (ops, next, created, errors) =
            (ops.clone(), next.clone(), created.clone(), errors.clone());
        creators.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n || Instant::now() >= deadline {
                    break;
                }
                if ops.create(i, &errors).await.is_some() {
                    created.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for creator in creators {
        creator.await.unwrap();
    }
    created.load(Ordering::Relaxed)
}

/// Creates run in [`CREATORS`] tasks while one agent claims `batch` at a time (long-polling up
/// to 1 s when nothing is there) and completes each claimed command, one after the other.
async fn throughput_phase(
    ops: &Api,
    agent: &Api,
    batch: u32,
    n: usize,
    errors: &Errors,
) -> Throughput {
    let started = Instant::now();
    let deadline = started + PHASE_DEADLINE;
    let creates_finished = Arc::new(AtomicBool::new(false));
    let creates = {
        let (ops, errors, finished) = (ops.clone(), errors.clone(), creates_finished.clone());
        tokio::spawn(async move {
            create_many(&ops, n, deadline, &errors).await;
            finished.store(true, Ordering::SeqCst);
            started.elapsed()
        })
    };
    let mut completed = 0;
    let mut claims = 0;
    let mut claim_times = Vec::new();
    while completed < n && Instant::now() < deadline {
        // Read before claiming: an empty answer after the creates finished means done.
        let finished = creates_finished.load(Ordering::SeqCst);
        let before = Instant::now();
        let Some(commands) = agent.claim(batch, 1, None, errors).await else {
            continue;
        };
        if commands.is_empty() {
            if finished {
                break;
            }
            continue;
        }
        claim_times.push(before.elapsed());
        claims += 1;
        for command in &commands {
            if agent.complete(command, errors).await {
                completed += 1;
            }
        }
    }
    let elapsed = started.elapsed();
    let creates_done = creates.await.unwrap();
    claim_times.sort();
    Throughput {
        batch,
        completed,
        elapsed,
        creates_done,
        claims,
        claim_p50: percentile(&claim_times, 0.50),
    }
}

/// Fills the pool with `n` commands, then every agent loops claim (limit 1, no wait) →
/// complete until its claim comes back empty.
async fn claim_latency_phase(ops: &Api, agents: &[Api], n: usize, errors: &Errors) -> ClaimLatency {
    let prefill_started = Instant::now();
    let prefill = create_many(ops, n, prefill_started + PHASE_DEADLINE, errors).await;
    let prefill_elapsed = prefill_started.elapsed();

    let started = Instant::now();
    let deadline = started + PHASE_DEADLINE;
    let mut tasks = Vec::new();
    for agent in agents {
        let (agent, errors) = (agent.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut claim = Vec::new();
            let mut complete = Vec::new();
            let mut failures = 0;
            // Bounded: never more claims than commands in the pool, plus a few failures.
            for _ in 0..=n {
                if Instant::now() >= deadline || failures > 10 {
                    break;
                }
                let before = Instant::now();
                let Some(commands) = agent.claim(1, 0, None, &errors).await else {
                    failures += 1;
                    continue;
                };
                claim.push(before.elapsed());
                let Some(command) = commands.first() else {
                    break;
                };
                let before = Instant::now();
                if agent.complete(command, &errors).await {
                    complete.push(before.elapsed());
                } else {
                    failures += 1;
                }
            }
            (claim, complete)
        }));
    }
    let mut claim = Vec::new();
    let mut complete = Vec::new();
    for task in tasks {
        let (c, d) = task.await.unwrap();
        claim.extend(c);
        complete.extend(d);
    }
    let elapsed = started.elapsed();
    claim.sort();
    complete.sort();
    ClaimLatency {
        prefill,
        prefill_elapsed,
        completed: complete.len(),
        elapsed,
        claim,
        complete,
    }
}

/// `agents[0]` long-polls (limit 1, wait 30 s) [`QUEUE`]; the bench waits
/// [`LONG_POLL_SETTLE`] so the claim is parked in the server, then times from just before it
/// sends a create to the agent's claim answer. `others` further agents long-poll
/// [`IDLE_QUEUE`] (which stays empty) in the same organisation the whole time.
async fn long_poll_phase(
    ops: &Api,
    agents: &[Api],
    others: usize,
    rounds: usize,
    errors: &Errors,
) -> LongPoll {
    let stop = Arc::new(AtomicBool::new(false));
    let mut idle = Vec::new();
    for agent in agents.iter().skip(1).take(others) {
        let (agent, errors, stop) = (agent.clone(), errors.clone(), stop.clone());
        idle.push(tokio::spawn(async move {
            // Bounded by `stop` and by 100 waits of up to 10 s.
            for _ in 0..100 {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                agent.claim(1, 10, Some(&[IDLE_QUEUE]), &errors).await;
            }
        }));
    }
    if others > 0 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let deadline = Instant::now() + PHASE_DEADLINE;
    let waiter = agents[0].clone();
    let mut latency = Vec::new();
    let mut create = Vec::new();
    let mut missed = 0;
    for round in 0..rounds {
        if Instant::now() >= deadline {
            break;
        }
        let (sent_tx, sent_rx) = tokio::sync::oneshot::channel();
        let claim = {
            let (waiter, errors) = (waiter.clone(), errors.clone());
            tokio::spawn(async move {
                let _ = sent_tx.send(());
                let commands = waiter.claim(1, 30, None, &errors).await;
                (Instant::now(), commands)
            })
        };
        sent_rx.await.unwrap();
        tokio::time::sleep(LONG_POLL_SETTLE).await;
        let before = Instant::now();
        let created = ops.create(round, errors).await;
        create.push(before.elapsed());
        let (received, commands) = claim.await.unwrap();
        match commands.as_deref() {
            Some([command]) if created.is_some() => {
                latency.push(received - before);
                waiter.complete(command, errors).await;
            }
            _ => missed += 1,
        }
    }
    stop.store(true, Ordering::SeqCst);
    for task in idle {
        task.abort();
    }
    latency.sort();
    create.sort();
    LongPoll {
        label: if others == 0 {
            "1 waiting agent"
        } else {
            "1 + 9 agents waiting on another queue"
        },
        latency,
        create,
        missed,
    }
}

// ---------------------------------------------------------------------------------------------
// Numbers.

fn print_summary(reports: &[(&str, Report)]) {
    println!("\n## Summary (markdown)\n");
    println!("| synchronous | claim batch | commands | s | commands/s | commands per claim |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (synchronous, report) in reports {
        for t in &report.throughput {
            println!(
                "| {synchronous} | {} | {} | {:.2} | {:.0} | {:.1} |",
                t.batch,
                t.completed,
                t.elapsed.as_secs_f64(),
                per_second(t.completed, t.elapsed),
                t.completed as f64 / t.claims.max(1) as f64,
            );
        }
    }
    println!();
    println!(
        "| synchronous | prefill creates/s | drained | commands/s | claim p50 ms | claim p99 ms \
         | complete p50 ms | complete p99 ms |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|");
    for (synchronous, report) in reports {
        let c = &report.claim;
        println!(
            "| {synchronous} | {:.0} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} |",
            per_second(c.prefill, c.prefill_elapsed),
            c.completed,
            per_second(c.completed, c.elapsed),
            ms(percentile(&c.claim, 0.50)),
            ms(percentile(&c.claim, 0.99)),
            ms(percentile(&c.complete, 0.50)),
            ms(percentile(&c.complete, 0.99)),
        );
    }
    println!();
    println!(
        "| synchronous | waiting | rounds | missed | enqueue→claim p50 ms | p99 ms \
         | create alone p50 ms | p99 ms |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (synchronous, report) in reports {
        for l in &report.long_poll {
            println!(
                "| {synchronous} | {} | {} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
                l.label,
                l.latency.len(),
                l.missed,
                ms(percentile(&l.latency, 0.50)),
                ms(percentile(&l.latency, 0.99)),
                ms(percentile(&l.create, 0.50)),
                ms(percentile(&l.create, 0.99)),
            );
        }
    }
    for (synchronous, report) in reports {
        println!("\n{synchronous}: unexpected answers: {:?}", report.errors);
        for line in &report.metrics {
            println!("{synchronous}: {line}");
        }
    }
}
