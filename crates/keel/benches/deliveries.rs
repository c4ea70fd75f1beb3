//! Notifications end to end: the real `keel serve` binary (started by the integration tests'
//! harness) sends webhooks to a receiver in this process, on loopback, beside a plain HTTP load
//! loop driving the same receiver in the same run.
//!
//! For each concurrency N in 1, 8 and 64, on a fresh server with `notifications.workers = N`:
//!
//! 1. **Drain**: the receiver holds every request until its gate opens; a backlog of events is
//!    triggered (`POST /v1/events`, one webhook delivery each), then the gate opens and the time
//!    to the last delivery's arrival gives the processor's deliveries per second with N workers.
//! 2. **Sustained**: N tasks trigger events one after the other while the N workers send; from
//!    the first trigger to the last arrival. The trigger answer times are kept (trigger latency
//!    with N triggering at once).
//! 3. **Latency**: one event at a time, the next once the receiver got the last: trigger
//!    latency (the `POST /v1/events` round trip) and trigger-to-receiver latency (from just
//!    before the trigger is sent to the receiver getting the webhook).
//! 4. **Load tool**: N tasks loop `POST` to the same receiver with reqwest (keep-alive), a
//!    body of a webhook's size and a unique `webhook-id`: what the receiver takes from a plain
//!    HTTP client at that concurrency.
//!
//! `cargo bench -p keel --bench deliveries` (`BENCH_QUICK=1` for a short smoke run;
//! `BENCH_SYNCHRONOUS=normal` for `[store] synchronous = "normal"`, keel's default being
//! `"full"`). Results and the reading are in `docs/benchmarks.md`.
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

use std::collections::{BTreeMap, HashMap, hash_map::Entry};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use parking_lot::Mutex;
use serde_json::{Value, json};

use common::{Errors, UNLIMITED_RATES, metric_lines, ms, percentile};
use harness::{Api, Options, Server};

/// Worker pool sizes, and as many triggering tasks (sustained) or load-loop tasks.
const CONCURRENCY: [usize; 3] = [1, 8, 64];
/// Deliveries per drain.
const DRAIN_DELIVERIES: usize = 10_000;
/// Deliveries per sustained phase.
const DELIVERIES: usize = 3_000;
/// Tasks triggering the backlog of the drain phase.
const PREFILL_TASKS: usize = 8;
/// One-at-a-time rounds of the latency phase.
const LATENCY_ROUNDS: usize = 300;
/// Requests the load loop sends per concurrency.
const LOAD_REQUESTS: usize = 10_000;
/// The webhook channel's timeout: a request held by the closed gate must not time out.
const CHANNEL_TIMEOUT_SECONDS: u64 = 120;
/// No phase waits longer than this; a phase that hits it reports what it did.
const PHASE_DEADLINE: Duration = Duration::from_secs(120);
/// How often the bench looks whether the receiver got what it waits for (the arrival times are
/// taken by the receiver, so this only paces the bench).
const POLL: Duration = Duration::from_millis(1);

const ORG: &str = "bench";
const EVENT_TYPE: &str = "bench_completed";

fn main() {
    let quick = std::env::var_os("BENCH_QUICK").is_some();
    let scale = if quick { 10 } else { 1 };
    // The receiver runs on a runtime of its own, so the bench's clients do not delay it.
    let receiver = Receiver::start();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut results = Vec::new();
    for concurrency in CONCURRENCY {
        let result = runtime.block_on(run(&receiver, concurrency, scale));
        result.print();
        results.push(result);
    }
    print_summary(&results);
}

// ---------------------------------------------------------------------------------------------
// The receiver.

/// An HTTP receiver on 127.0.0.1 that answers 200 once its gate is open, counts requests and
/// keeps the first arrival time of each `webhook-id`.
struct Receiver {
    url: String,
    state: Arc<Received>,
    _runtime: tokio::runtime::Runtime,
}

struct Received {
    requests: AtomicUsize,
    repeats: AtomicUsize,
    arrivals: Mutex<HashMap<String, Instant>>,
    gate: tokio::sync::watch::Sender<bool>,
}

impl Receiver {
    fn start() -> Receiver {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let state = Arc::new(Received {
            requests: AtomicUsize::new(0),
            repeats: AtomicUsize::new(0),
            arrivals: Mutex::new(HashMap::new()),
            gate: tokio::sync::watch::Sender::new(true),
        });
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .unwrap();
        let address = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(state.clone());
        runtime.spawn(async move { axum::serve(listener, app).await });
        Receiver {
            url: format!("http://{address}/hook"),
            state,
            _runtime: runtime,
        }
    }

    fn set_gate(&self, open: bool) {
        self.state.gate.send_replace(open);
    }

    fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }

    fn arrival(&self, delivery: &str) -> Option<Instant> {
        self.state
            .arrivals
            .lock()
            .get(&webhook_id(delivery))
            .copied()
    }

    /// Waits until the receiver has seen `n` requests in all, or `deadline`.
    async fn wait_for_requests(&self, n: usize, deadline: Instant) {
        while self.requests() < n && Instant::now() < deadline {
            tokio::time::sleep(POLL).await;
        }
    }
}

async fn receive(
    State(state): State<Arc<Received>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let mut gate = state.gate.subscribe();
    let _ = gate.wait_for(|open| *open).await;
    let at = Instant::now();
    if let Some(id) = headers.get("webhook-id").and_then(|id| id.to_str().ok()) {
        match state.arrivals.lock().entry(id.to_owned()) {
            Entry::Occupied(_) => {
                state.repeats.fetch_add(1, Ordering::SeqCst);
            }
            Entry::Vacant(entry) => {
                entry.insert(at);
            }
        }
    }
    state.requests.fetch_add(1, Ordering::SeqCst);
    drop(body);
    StatusCode::OK
}

// ---------------------------------------------------------------------------------------------
// The triggering client.

/// `POST /v1/events`; the id of its one delivery, or `None` (recorded in `errors`).
async fn trigger(api: &Api, n: usize, errors: &Errors) -> Option<String> {
    let response = api
        .client
        .post(format!("{}/v1/events", api.base))
        .bearer_auth(&api.token)
        .json(&json!({"event_type": EVENT_TYPE, "payload": {"n": n, "source": "bench"}}))
        .send()
        .await;
    let response = match response {
        Ok(response) => response,
        Err(err) => {
            errors.record(format!("trigger: transport error: {err}"));
            return None;
        }
    };
    let status = response.status().as_u16();
    let answer: Value = match response.json().await {
        Ok(answer) => answer,
        Err(err) => {
            errors.record(format!("trigger: {status}: body error: {err}"));
            return None;
        }
    };
    if status != 202 {
        errors.record(format!("trigger: {status} {}", answer["error"]["code"]));
        return None;
    }
    match answer["deliveries"].as_array().map(Vec::as_slice) {
        Some([id]) => id.as_str().map(str::to_owned),
        _ => {
            errors.record(format!("trigger: not one delivery: {answer}"));
            None
        }
    }
}

/// Triggers `n` events from `tasks` tasks; each trigger's send time, delivery id and answer
/// time.
async fn trigger_many(api: &Api, n: usize, tasks: usize, errors: &Errors) -> Vec<Triggered> {
    let next = Arc::new(AtomicUsize::new(0));
    let deadline = Instant::now() + PHASE_DEADLINE;
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let (api, next, errors) = (api.clone(), next.clone(), errors.clone());
            tokio::spawn(async move {
                let mut triggered = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n || Instant::now() >= deadline {
                        break;
                    }
                    let sent = Instant::now();
                    if let Some(delivery) = trigger(&api, i, &errors).await {
                        triggered.push(Triggered {
                            sent,
                            answered: sent.elapsed(),
                            delivery,
                        });
                    }
                }
                triggered
            })
        })
        .collect();
    let mut triggered = Vec::new();
    for handle in handles {
        triggered.extend(handle.await.unwrap());
    }
    triggered
}

struct Triggered {
    sent: Instant,
    answered: Duration,
    delivery: String,
}

// ---------------------------------------------------------------------------------------------
// One concurrency.

struct Run {
    concurrency: usize,
    /// Delivered, and the time from the gate's opening to the last arrival.
    drain: (usize, Duration),
    prefill: (usize, Duration),
    /// Delivered, and the time from the first trigger to the last arrival.
    sustained: (usize, Duration),
    sustained_trigger: Vec<Duration>,
    sustained_end_to_end: Vec<Duration>,
    latency_trigger: Vec<Duration>,
    latency_end_to_end: Vec<Duration>,
    latency_missed: usize,
    /// Answered requests of the load loop, and its time.
    load: (usize, Duration),
    errors: BTreeMap<String, u64>,
    repeats: usize,
    metrics: Vec<String>,
}

async fn run(receiver: &Receiver, concurrency: usize, scale: usize) -> Run {
    // keel's default is "full"; `BENCH_SYNCHRONOUS=normal` shows what the commits' fsyncs cost.
    let synchronous = std::env::var("BENCH_SYNCHRONOUS").unwrap_or_else(|_| "full".to_owned());
    // Each configuration text lives for the whole bench: the harness takes `&'static str`.
    let extra_toml: &'static str = Box::leak(
        format!(
            r#"[store]
synchronous = "{synchronous}"

[notifications]
allowed_networks = ["127.0.0.1"]
workers = {concurrency}

{UNLIMITED_RATES}"#
        )
        .into_boxed_str(),
    );
    let server = Server::start_with(Options {
        extra_toml,
        ..Options::default()
    })
    .await;
    server.create_org(ORG);
    let ops = server.key(ORG, "notifications:write,notifications:read", None);
    // A signing sender, as a webhook in production has: each request carries an HMAC.
    let sender = ops
        .post(
            "/v1/senders",
            &json!({"name": "signing", "type": "webhook",
                    "secrets": {"signing_secrets": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]}}),
            201,
        )
        .await;
    ops.post(
        "/v1/channels",
        &json!({"name": "receiver", "type": "webhook", "url": receiver.url,
                "sender_id": sender["id"], "timeout_seconds": CHANNEL_TIMEOUT_SECONDS}),
        201,
    )
    .await;
    ops.post("/v1/routes", &json!({"name": "all"}), 201).await;
    let errors = Errors::default();
    let repeats_before = receiver.state.repeats.load(Ordering::SeqCst);

    // Warm-up: the server's first trigger and its first connection to the receiver.
    let before = receiver.requests();
    let warm = trigger_many(&ops, 10, 1, &errors).await;
    receiver
        .wait_for_requests(before + warm.len(), Instant::now() + PHASE_DEADLINE)
        .await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    // 1. Drain: a backlog behind the closed gate, then the gate opens.
    let n = DRAIN_DELIVERIES / scale;
    receiver.set_gate(false);
    let before = receiver.requests();
    let started = Instant::now();
    let backlog = trigger_many(&ops, n, PREFILL_TASKS, &errors).await;
    let prefill = (backlog.len(), started.elapsed());
    let opened = Instant::now();
    receiver.set_gate(true);
    receiver
        .wait_for_requests(before + backlog.len(), opened + PHASE_DEADLINE)
        .await;
    let (delivered, last) = arrivals(receiver, &backlog);
    let drain = (delivered, last.map_or(Duration::ZERO, |last| last - opened));

    // 2. Sustained: N tasks trigger while the N workers send.
    let n = DELIVERIES / scale;
    let before = receiver.requests();
    let triggered = trigger_many(&ops, n, concurrency, &errors).await;
    receiver
        .wait_for_requests(before + triggered.len(), Instant::now() + PHASE_DEADLINE)
        .await;
    let (delivered, last) = arrivals(receiver, &triggered);
    let first = triggered.iter().map(|t| t.sent).min();
    let sustained = (
        delivered,
        match (first, last) {
            (Some(first), Some(last)) => last - first,
            _ => Duration::ZERO,
        },
    );
    let mut sustained_trigger: Vec<Duration> = triggered.iter().map(|t| t.answered).collect();
    let mut sustained_end_to_end: Vec<Duration> = triggered
        .iter()
        .filter_map(|t| Some(receiver.arrival(&t.delivery)? - t.sent))
        .collect();
    sustained_trigger.sort();
    sustained_end_to_end.sort();

    // 3. Latency: one event at a time.
    let mut latency_trigger = Vec::new();
    let mut latency_end_to_end = Vec::new();
    let mut latency_missed = 0;
    let deadline = Instant::now() + PHASE_DEADLINE;
    for round in 0..LATENCY_ROUNDS / scale {
        if Instant::now() >= deadline {
            break;
        }
        let sent = Instant::now();
        let Some(delivery) = trigger(&ops, round, &errors).await else {
            latency_missed += 1;
            continue;
        };
        latency_trigger.push(sent.elapsed());
        let wait_until = Instant::now() + Duration::from_secs(10);
        let arrived = loop {
            if let Some(at) = receiver.arrival(&delivery) {
                break Some(at);
            }
            if Instant::now() >= wait_until {
                break None;
            }
            tokio::time::sleep(POLL).await;
        };
        match arrived {
            Some(at) => latency_end_to_end.push(at - sent),
            None => latency_missed += 1,
        }
    }
    latency_trigger.sort();
    latency_end_to_end.sort();

    // 4. The load loop against the same receiver, keel idle.
    let load = load_loop(receiver, concurrency, LOAD_REQUESTS / scale, &errors).await;

    let metrics = metric_lines(
        &server.metrics().await,
        &[
            "keel_delivery_attempts_total",
            "keel_deliveries_created_total",
            "keel_panics_total",
            "keel_log_dropped_total",
        ],
    );
    drop(server);
    Run {
        concurrency,
        drain,
        prefill,
        sustained,
        sustained_trigger,
        sustained_end_to_end,
        latency_trigger,
        latency_end_to_end,
        latency_missed,
        load,
        errors: errors.snapshot(),
        repeats: receiver.state.repeats.load(Ordering::SeqCst) - repeats_before,
        metrics,
    }
}

/// The `webhook-id` keel sends a delivery with: `msg_` and the delivery's id without hyphens.
fn webhook_id(delivery: &str) -> String {
    format!("msg_{}", delivery.replace('-', ""))
}

/// How many of `triggered` reached the receiver, and the last arrival among them.
fn arrivals(receiver: &Receiver, triggered: &[Triggered]) -> (usize, Option<Instant>) {
    let arrivals = receiver.state.arrivals.lock();
    let times: Vec<Instant> = triggered
        .iter()
        .filter_map(|t| arrivals.get(&webhook_id(&t.delivery)).copied())
        .collect();
    (times.len(), times.into_iter().max())
}

/// `tasks` tasks send `n` requests in all to the receiver, each waiting for its answer before
/// the next: a body of a webhook's size, `content-type: application/json` and a unique
/// `webhook-id`, over a keep-alive connection per task.
async fn load_loop(
    receiver: &Receiver,
    tasks: usize,
    n: usize,
    errors: &Errors,
) -> (usize, Duration) {
    let client = reqwest::Client::builder().no_proxy().build().unwrap();
    let body = json!({"type": EVENT_TYPE, "event_id": uuid::Uuid::now_v7(), "domain": "bench",
                      "severity": "info", "data": {"n": 0, "source": "bench"}})
    .to_string();
    let next = Arc::new(AtomicUsize::new(0));
    let answered = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let deadline = started + PHASE_DEADLINE;
    let handles: Vec<_> = (0..tasks)
        .map(|_| {
            let (client, url, body, next, answered, errors) = (
                client.clone(),
                receiver.url.clone(),
                body.clone(),
                next.clone(),
                answered.clone(),
                errors.clone(),
            );
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n || Instant::now() >= deadline {
                        break;
                    }
                    let response = client
                        .post(&url)
                        .header("content-type", "application/json")
                        .header("webhook-id", format!("load_{}", uuid::Uuid::now_v7()))
                        .body(body.clone())
                        .send()
                        .await;
                    match response {
                        Ok(response) if response.status().is_success() => {
                            let _ = response.bytes().await;
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(response) => errors.record(format!("load: {}", response.status())),
                        Err(err) => errors.record(format!("load: transport error: {err}")),
                    }
                }
            })
        })
        .collect();
    for handle in handles {
        handle.await.unwrap();
    }
    (answered.load(Ordering::Relaxed), started.elapsed())
}

// ---------------------------------------------------------------------------------------------
// Numbers.

/// Per second of a (count, time) pair.
fn rate((count, elapsed): (usize, Duration)) -> f64 {
    common::per_second(count, elapsed)
}

impl Run {
    fn print(&self) {
        let n = self.concurrency;
        println!(
            "\n=== {n} worker(s) ===\n\
             drain: {} delivered in {:.2} s = {:.0}/s (backlog of {} triggered by {PREFILL_TASKS} \
             tasks in {:.2} s = {:.0}/s)\n\
             sustained, {n} triggering: {} delivered in {:.2} s = {:.0}/s; trigger p50 {:.2} ms \
             p99 {:.2} ms; trigger→receiver p50 {:.2} ms p99 {:.2} ms\n\
             one at a time: trigger p50 {:.2} ms p99 {:.2} ms; trigger→receiver p50 {:.2} ms p99 \
             {:.2} ms ({} rounds, {} missed)\n\
             load loop, {n} tasks: {} requests in {:.2} s = {:.0}/s",
            self.drain.0,
            self.drain.1.as_secs_f64(),
            rate(self.drain),
            self.prefill.0,
            self.prefill.1.as_secs_f64(),
            rate(self.prefill),
            self.sustained.0,
            self.sustained.1.as_secs_f64(),
            rate(self.sustained),
            ms(percentile(&self.sustained_trigger, 0.50)),
            ms(percentile(&self.sustained_trigger, 0.99)),
            ms(percentile(&self.sustained_end_to_end, 0.50)),
            ms(percentile(&self.sustained_end_to_end, 0.99)),
            ms(percentile(&self.latency_trigger, 0.50)),
            ms(percentile(&self.latency_trigger, 0.99)),
            ms(percentile(&self.latency_end_to_end, 0.50)),
            ms(percentile(&self.latency_end_to_end, 0.99)),
            self.latency_end_to_end.len(),
            self.latency_missed,
            self.load.0,
            self.load.1.as_secs_f64(),
            rate(self.load),
        );
        println!(
            "unexpected answers: {:?}; repeated webhook-ids at the receiver: {}",
            self.errors, self.repeats
        );
        // Zero counts (the log's drops, the panics) are left out.
        for line in self.metrics.iter().filter(|line| !line.ends_with(" 0")) {
            println!("  {line}");
        }
    }
}

fn print_summary(results: &[Run]) {
    println!("\n## Summary (markdown)\n");
    println!(
        "| concurrency | keel drain deliveries/s | keel sustained deliveries/s | load loop requests/s \
         | drain / load loop | sustained / load loop |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let load = rate(r.load);
        println!(
            "| {} | {:.0} | {:.0} | {:.0} | {:.0} % | {:.0} % |",
            r.concurrency,
            rate(r.drain),
            rate(r.sustained),
            load,
            100.0 * rate(r.drain) / load.max(f64::EPSILON),
            100.0 * rate(r.sustained) / load.max(f64::EPSILON),
        );
    }
    println!();
    println!(
        "| workers | triggering | trigger p50 ms | p99 ms | trigger→receiver p50 ms | p99 ms |"
    );
    println!("|---:|---|---:|---:|---:|---:|");
    for r in results {
        println!(
            "| {} | one at a time | {:.2} | {:.2} | {:.2} | {:.2} |",
            r.concurrency,
            ms(percentile(&r.latency_trigger, 0.50)),
            ms(percentile(&r.latency_trigger, 0.99)),
            ms(percentile(&r.latency_end_to_end, 0.50)),
            ms(percentile(&r.latency_end_to_end, 0.99)),
        );
        println!(
            "| {} | {} at once | {:.2} | {:.2} | {:.2} | {:.2} |",
            r.concurrency,
            r.concurrency,
            ms(percentile(&r.sustained_trigger, 0.50)),
            ms(percentile(&r.sustained_trigger, 0.99)),
            ms(percentile(&r.sustained_end_to_end, 0.50)),
            ms(percentile(&r.sustained_end_to_end, 0.99)),
        );
    }
}
