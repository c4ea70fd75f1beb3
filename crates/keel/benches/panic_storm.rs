//! The panic storm: one route panics on every request for a minute, under load, and the other
//! routes do not notice. The real `keel serve` binary on a loopback port, driven over HTTP.
//!
//! The server runs with `KEEL_FAILPOINTS="http.route_panic=return(/v1/schedules)"`: every
//! request to `/v1/schedules…` panics inside the request lifecycle's isolation, as a handler
//! would. `NORMAL_CLIENTS` clients (default 4) loop over create command, get command, list
//! commands through four phases:
//!
//! 1. warm-up (`WARMUP_SECS`, 5): the normal load, and `STORM_CLIENTS` clients (default 2)
//!    hammering the panicking route, so the panic path (backtrace symbolisation included) and
//!    its connections have made their one-time allocations before memory is measured;
//! 2. baseline (`BASELINE_SECS`, 20): the normal load alone;
//! 3. storm (`STORM_SECS`, 60): the normal load while the storm clients hammer the panicking
//!    route, each sending its next request as soon as its 500 arrives;
//! 4. recovery (`RECOVERY_SECS`, 20): the normal load alone.
//!
//! Per phase it prints the normal routes' throughput and p50/p99, the panics (from
//! `keel_panics_total`), the backtraces logged, the bytes written to the log (the log file and
//! keel's stderr, where the panic hook writes a line per panic) and the server's RSS
//! (`/proc/PID/status` VmRSS). It exits non-zero when, against the baseline, the storm's normal
//! throughput is below 0.5x or its p99 above 2x; when the RSS at the end is above 1.2x the RSS
//! after the warm-up; when more backtraces were logged than the hook's rate limit allows
//! ([`keel_guard::panic::DEFAULT_BACKTRACES_PER_SECOND`] per second); when the log grew past its
//! bound (what the normal requests write, at the baseline's bytes per request, plus
//! [`LOG_BYTES_PER_PANIC`] per panic and [`LOG_BYTES_PER_BACKTRACE`] per backtrace); when a
//! panic was not counted, grouped and logged exactly once; when a normal request got anything
//! but its 2xx; or when the server died.
//!
//! `cargo bench -p keel --bench panic_storm` (`STORM_SECS=10` for a short run). Compare the
//! ratios of one run, not numbers across machines.
//!
//! Two storm clients send about 5,000 panicking requests a second on a 2-core machine, twice
//! the normal clients' rate, a panicking request costing about a quarter of a normal one. The
//! server, the bench's clients and the storm share the cores, so more storm clients measure
//! the share of the CPU they take rather than what the panics cost: with 4 of them the normal
//! throughput fell to 0.55x and the p99 rose to 2.9x (6,200 panics a second).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

#[allow(dead_code)]
mod common;
#[path = "../tests/it/harness.rs"]
#[allow(dead_code)]
mod harness;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use keel_guard::panic::DEFAULT_BACKTRACES_PER_SECOND;
use parking_lot::Mutex;
use serde_json::{Value, json};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use common::{UNLIMITED_RATES, env_number, ms, per_second, percentile};
use harness::{Api, Options, Server, metric};

/// The route that panics, and the failpoint that makes it.
const PANIC_ROUTE: &str = "/v1/schedules";
const FAILPOINTS: &str = "http.route_panic=return(/v1/schedules)";
/// Where the server's stderr goes, in its directory.
const STDERR_FILE: &str = "stderr.log";

/// The bounds.
const MIN_THROUGHPUT_RATIO: f64 = 0.5;
const MAX_P99_RATIO: f64 = 2.0;
const MAX_RSS_RATIO: f64 = 1.2;
/// What one panicking request may add to the log: its access record, its panic record without
/// a backtrace and the hook's stderr line (about 1.2 KiB together).
const LOG_BYTES_PER_PANIC: u64 = 2048;
/// What a backtrace may add to a panic record: the short form is about 2 KB, and a test keeps
/// a whole handler panic record under 4 KB.
const LOG_BYTES_PER_BACKTRACE: u64 = 4096;

const PHASES: [&str; 4] = ["warm-up", "baseline", "storm", "recovery"];
const WARMUP: usize = 0;
const BASELINE: usize = 1;
const STORM: usize = 2;
const RECOVERY: usize = 3;
/// The phase index once the clients are to stop.
const DONE: usize = PHASES.len();

const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

fn main() {
    let seconds = |name: &str, default: u64| Duration::from_secs(env_number(name, default));
    let plan = Plan {
        durations: [
            seconds("WARMUP_SECS", 5),
            seconds("BASELINE_SECS", 20),
            seconds("STORM_SECS", 60),
            seconds("RECOVERY_SECS", 20),
        ],
        normal_clients: env_number("NORMAL_CLIENTS", 4) as usize,
        storm_clients: env_number("STORM_CLIENTS", 2) as usize,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let failures = runtime.block_on(run(&plan));
    if failures.is_empty() {
        println!("\nevery check passed");
    } else {
        println!("\nFAILED:");
        for failure in &failures {
            println!("  - {failure}");
        }
        std::process::exit(1);
    }
}

struct Plan {
    durations: [Duration; 4],
    normal_clients: usize,
    storm_clients: usize,
}

// ---------------------------------------------------------------------------------------------
// The clients.

/// What the clients share: the phase they are in and whether the storm clients send.
#[derive(Clone, Default)]
struct Control {
    phase: Arc<AtomicUsize>,
    storming: Arc<AtomicBool>,
}

/// What one normal client saw, per phase.
#[derive(Default)]
struct NormalSamples {
    latencies: [Vec<Duration>; 4],
    unexpected: BTreeMap<String, u64>,
}

/// One normal client: create a command, get it, list the queue's commands; again.
async fn normal_client(api: Api, control: Control) -> NormalSamples {
    let mut samples = NormalSamples::default();
    let url = |path: &str| format!("{}{path}", api.base);
    let body =
        json!({"type": "storm-normal", "queue": "normal", "params": {"pad": "x".repeat(100)}});
    loop {
        let phase = control.phase.load(Ordering::Relaxed);
        if phase >= DONE {
            return samples;
        }
        let sent = Instant::now();
        let created = api
            .client
            .post(url("/v1/commands"))
            .bearer_auth(&api.token)
            .json(&body)
            .send()
            .await;
        let id = match created {
            Ok(response) if response.status().as_u16() == 201 => {
                let command: Value = response.json().await.unwrap_or(Value::Null);
                samples.latencies[phase].push(sent.elapsed());
                command["id"].as_str().unwrap_or_default().to_owned()
            }
            other => {
                samples.unexpected(phase, "create", other).await;
                continue;
            }
        };
        for path in [
            format!("/v1/commands/{id}"),
            "/v1/commands?queue=normal&limit=20".to_owned(),
        ] {
            let sent = Instant::now();
            let answer = api
                .client
                .get(url(&path))
                .bearer_auth(&api.token)
                .send()
                .await;
            match answer {
                Ok(response) if response.status().as_u16() == 200 => {
                    let _ = response.bytes().await;
                    samples.latencies[phase].push(sent.elapsed());
                }
                other => {
                    let what = if path.contains('?') { "list" } else { "get" };
                    samples.unexpected(phase, what, other).await;
                }
            }
        }
    }
}

impl NormalSamples {
    async fn unexpected(
        &mut self,
        phase: usize,
        what: &str,
        answer: Result<reqwest::Response, reqwest::Error>,
    ) {
        let key = match answer {
            Ok(response) => {
                let status = response.status().as_u16();
                let text = response.text().await.unwrap_or_default();
                format!("{} {what} {status} {text:.120}", PHASES[phase])
            }
            Err(error) => format!("{} {what} transport error: {error}", PHASES[phase]),
        };
        *self.unexpected.entry(key).or_default() += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// What the storm clients saw, for all phases together.
#[derive(Clone, Default)]
struct StormCounts {
    /// JSON 500s with the code `internal`: the panics they caused.
    internal_errors: Arc<AtomicU64>,
    unexpected: Arc<Mutex<BTreeMap<String, u64>>>,
}

/// One storm client: while the storm is on, GET the panicking route as fast as it answers.
async fn storm_client(api: Api, control: Control, counts: StormCounts) {
    let url = format!("{}{PANIC_ROUTE}", api.base);
    while control.phase.load(Ordering::Relaxed) < DONE {
        if !control.storming.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(5)).await;
            continue;
        }
        let answer = api.client.get(&url).bearer_auth(&api.token).send().await;
        let what = match answer {
            Ok(response) => {
                let status = response.status().as_u16();
                let body: Value = response.json().await.unwrap_or(Value::Null);
                if status == 500 && body["error"]["code"] == "internal" {
                    counts.internal_errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                format!("{status} {body}")
            }
            Err(error) => format!("transport error: {error}"),
        };
        *counts.unexpected.lock().entry(what).or_default() += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// What is measured on the server's side.

/// VmRSS of a process, in KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// `RssAnon`, `RssFile` and `RssShmem` of a process, as `/proc/PID/status` gives them.
fn rss_kinds(pid: u32) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kinds: Vec<String> = status
        .lines()
        .filter(|line| line.starts_with("Rss"))
        .map(|line| line.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect();
    Some(kinds.join(", "))
}

/// Samples the server's RSS every 100 ms and keeps the peak of each phase.
fn sample_rss(pid: u32, phase: Arc<AtomicUsize>) -> Arc<Mutex<[u64; 4]>> {
    let peaks = Arc::new(Mutex::new([0u64; 4]));
    let kept = peaks.clone();
    std::thread::spawn(move || {
        loop {
            let now = phase.load(Ordering::Relaxed);
            if now >= DONE {
                return;
            }
            if let Some(rss) = rss_kib(pid) {
                let mut peaks = kept.lock();
                peaks[now] = peaks[now].max(rss);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    peaks
}

/// The server's state at a phase boundary.
#[derive(Clone, Copy)]
struct Mark {
    at: OffsetDateTime,
    instant: Instant,
    panics: f64,
    backtraces_skipped: f64,
    log_bytes: u64,
    stderr_bytes: u64,
    rss_kib: u64,
}

async fn mark(server: &Server, stderr_path: &Path) -> Mark {
    let metrics = server.metrics().await;
    Mark {
        at: OffsetDateTime::now_utc(),
        instant: Instant::now(),
        panics: metric(&metrics, r#"keel_panics_total{component="http"}"#).unwrap_or(0.0),
        backtraces_skipped: metric(&metrics, "keel_panic_backtraces_skipped_total").unwrap_or(0.0),
        log_bytes: file_size(&server.log_path()),
        stderr_bytes: file_size(stderr_path),
        rss_kib: rss_kib(server.pid()).unwrap_or(0),
    }
}

fn file_size(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.len())
}

/// The panic records of the log, by phase (from the phase marks).
#[derive(Default)]
struct PanicRecords {
    records: [u64; 4],
    with_backtrace: [u64; 4],
    bytes: [u64; 4],
    /// Records with a backtrace, by the second of their time.
    backtraces_by_second: BTreeMap<i64, u64>,
    /// Records that were not of the panicking route.
    other: u64,
}

/// Reads the log file (JSON lines; it may be large) once and sorts the panic records of the
/// `http` component into the phases.
fn panic_records(log: &Path, marks: &[Mark]) -> PanicRecords {
    let mut found = PanicRecords::default();
    let file = std::fs::File::open(log).unwrap();
    for line in BufReader::new(file).lines().map_while(Result::ok) {
        if !line.contains(r#""target":"keel::panic""#) {
            continue;
        }
        let record: Value = serde_json::from_str(&line).unwrap();
        let context = record["context"].as_str().unwrap_or_default();
        if record["component"] != "http" || !context.contains(PANIC_ROUTE) {
            found.other += 1;
            continue;
        }
        let at = OffsetDateTime::parse(record["time"].as_str().unwrap(), &Rfc3339).unwrap();
        let phase = marks
            .iter()
            .skip(1)
            .position(|mark| at < mark.at)
            .unwrap_or(PHASES.len() - 1);
        found.records[phase] += 1;
        found.bytes[phase] += line.len() as u64 + 1;
        if record["backtrace"].is_string() {
            found.with_backtrace[phase] += 1;
            *found
                .backtraces_by_second
                .entry(at.unix_timestamp())
                .or_default() += 1;
        }
    }
    found
}

/// Waits until the log file has stopped growing (the writer has drained its queue).
async fn wait_for_quiet_log(path: &Path) {
    let mut last = file_size(path);
    let mut quiet = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while quiet < 4 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = file_size(path);
        quiet = if now == last { quiet + 1 } else { 0 };
        last = now;
    }
}

// ---------------------------------------------------------------------------------------------
// The run.

async fn run(plan: &Plan) -> Vec<String> {
    let mut server = Server::start_with(Options {
        failpoints: Some(FAILPOINTS),
        extra_toml: UNLIMITED_RATES,
        stderr_file: Some(STDERR_FILE),
        ..Options::default()
    })
    .await;
    let stderr_path: PathBuf = server.dir.path().join(STDERR_FILE);
    server.create_org("storm");
    let key = server.key("storm", "commands:write,commands:read", None);
    let client = || {
        reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .build()
            .unwrap()
    };
    // The storm clients are another client than the normal ones: their own runtime and
    // connection pool, so a normal request never waits behind a storm request in the bench's
    // own task queues.
    let normal_api = Api {
        client: client(),
        ..key.clone()
    };
    let storm_api = Api {
        client: client(),
        ..key
    };
    let storm_runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("storm")
        .enable_all()
        .build()
        .unwrap();

    println!(
        "keel serve (pid {}) with {FAILPOINTS}; {} normal clients (create, get, list commands), \
         {} storm clients on {PANIC_ROUTE}; phases {:?} of {:?}",
        server.pid(),
        plan.normal_clients,
        plan.storm_clients,
        PHASES,
        plan.durations,
    );
    let rss_at_start = rss_kib(server.pid()).unwrap_or(0);
    let control = Control::default();
    let rss_peaks = sample_rss(server.pid(), control.phase.clone());
    let storm_counts = StormCounts::default();
    let normal: Vec<_> = (0..plan.normal_clients)
        .map(|_| tokio::spawn(normal_client(normal_api.clone(), control.clone())))
        .collect();
    let storm: Vec<_> = (0..plan.storm_clients)
        .map(|_| {
            storm_runtime.spawn(storm_client(
                storm_api.clone(),
                control.clone(),
                storm_counts.clone(),
            ))
        })
        .collect();

    let mut marks = vec![mark(&server, &stderr_path).await];
    for (phase, duration) in plan.durations.iter().enumerate() {
        control.phase.store(phase, Ordering::Relaxed);
        control
            .storming
            .store(phase == WARMUP || phase == STORM, Ordering::Relaxed);
        tokio::time::sleep(*duration).await;
        if phase == WARMUP || phase == STORM {
            // The panics' records reach the log before the next phase measures its bytes.
            control.storming.store(false, Ordering::Relaxed);
        }
        marks.push(mark(&server, &stderr_path).await);
    }
    control.phase.store(DONE, Ordering::Relaxed);
    let mut samples = Vec::new();
    for client in normal {
        samples.push(client.await.unwrap());
    }
    for client in storm {
        client.await.unwrap();
    }
    storm_runtime.shutdown_background();

    let alive = server.still_running();
    wait_for_quiet_log(&server.log_path()).await;
    let metrics = server.metrics().await;
    let panics_admin = server.admin_get("/v1/admin/panics").await;
    let records = panic_records(&server.log_path(), &marks);
    let report = Report {
        marks: &marks,
        samples: &samples,
        rss_at_start,
        rss_peaks: *rss_peaks.lock(),
        records: &records,
        storm_counts: &storm_counts,
        metrics: &metrics,
        panics_admin: &panics_admin,
        alive,
        pid: server.pid(),
    };
    report.print();
    let failures = report.check();
    server.kill9();
    failures
}

// ---------------------------------------------------------------------------------------------
// The report and the checks.

struct Report<'a> {
    marks: &'a [Mark],
    samples: &'a [NormalSamples],
    rss_at_start: u64,
    rss_peaks: [u64; 4],
    records: &'a PanicRecords,
    storm_counts: &'a StormCounts,
    metrics: &'a str,
    panics_admin: &'a Value,
    alive: bool,
    pid: u32,
}

/// One phase's figures.
struct PhaseFigures {
    elapsed: Duration,
    requests: usize,
    throughput: f64,
    p50: Duration,
    p99: Duration,
    panics: u64,
    backtraces: u64,
    log_bytes: u64,
    stderr_bytes: u64,
    rss_end_kib: u64,
    rss_peak_kib: u64,
}

impl Report<'_> {
    fn phase(&self, phase: usize) -> PhaseFigures {
        let (start, end) = (self.marks[phase], self.marks[phase + 1]);
        let mut latencies: Vec<Duration> = self
            .samples
            .iter()
            .flat_map(|s| s.latencies[phase].iter().copied())
            .collect();
        latencies.sort();
        let elapsed = end.instant - start.instant;
        let panics = (end.panics - start.panics) as u64;
        let skipped = (end.backtraces_skipped - start.backtraces_skipped) as u64;
        PhaseFigures {
            elapsed,
            requests: latencies.len(),
            throughput: per_second(latencies.len(), elapsed),
            p50: percentile(&latencies, 0.50),
            p99: percentile(&latencies, 0.99),
            panics,
            backtraces: panics.saturating_sub(skipped),
            log_bytes: end.log_bytes - start.log_bytes,
            stderr_bytes: end.stderr_bytes - start.stderr_bytes,
            rss_end_kib: end.rss_kib,
            rss_peak_kib: self.rss_peaks[phase].max(end.rss_kib),
        }
    }

    fn print(&self) {
        println!(
            "\n| phase | s | normal req | normal req/s | p50 ms | p99 ms | panics | panics/s | \
             backtraces (metrics / log) | log bytes | stderr bytes | RSS end MiB | RSS peak MiB |"
        );
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for (phase, name) in PHASES.iter().enumerate() {
            let f = self.phase(phase);
            println!(
                "| {name} | {:.1} | {} | {:.0} | {:.1} | {:.1} | {} | {:.0} | {} / {} | {} | {} | {:.1} | {:.1} |",
                f.elapsed.as_secs_f64(),
                f.requests,
                f.throughput,
                ms(f.p50),
                ms(f.p99),
                f.panics,
                per_second(f.panics as usize, f.elapsed),
                f.backtraces,
                self.records.with_backtrace[phase],
                f.log_bytes,
                f.stderr_bytes,
                mib(f.rss_end_kib),
                mib(f.rss_peak_kib),
            );
        }
        let storm = self.phase(STORM);
        println!(
            "\nRSS: {:.1} MiB at start, {:.1} MiB after the warm-up, {:.1} MiB peak, {:.1} MiB at the end",
            mib(self.rss_at_start),
            mib(self.marks[BASELINE].rss_kib),
            mib(self.rss_peaks.iter().copied().max().unwrap_or(0)),
            mib(self.marks[DONE].rss_kib),
        );
        if storm.panics > 0 {
            println!(
                "storm: {:.0} B of panic record per panic, {:.0} B of stderr per panic; \
                 most backtraces logged in one second: {} (limit {DEFAULT_BACKTRACES_PER_SECOND})",
                self.records.bytes[STORM] as f64 / storm.panics as f64,
                storm.stderr_bytes as f64 / storm.panics as f64,
                self.records
                    .backtraces_by_second
                    .values()
                    .max()
                    .unwrap_or(&0),
            );
        }
        println!(
            "RSS at the end by kind: {}",
            rss_kinds(self.pid).unwrap_or_else(|| "unknown (server gone)".to_owned())
        );
        for line in common::metric_lines(
            self.metrics,
            &[
                "keel_panics_total",
                "keel_panic_backtraces_skipped_total",
                "keel_log_dropped_total",
                "keel_log_fallback_total",
                "keel_log_failed_total",
            ],
        ) {
            // Series at 0 say nothing here.
            if !line.ends_with(" 0") {
                println!("  {line}");
            }
        }
    }

    fn check(&self) -> Vec<String> {
        let mut failures = Vec::new();
        let mut fail_if = |failed: bool, what: String| {
            println!("{} {what}", if failed { "FAIL" } else { "ok  " });
            if failed {
                failures.push(what);
            }
        };
        println!();
        let (baseline, storm, recovery) = (
            self.phase(BASELINE),
            self.phase(STORM),
            self.phase(RECOVERY),
        );
        fail_if(
            !self.alive,
            format!("keel serve alive at the end: {}", self.alive),
        );
        fail_if(
            storm.panics == 0,
            format!("the storm panicked: {} panics", storm.panics),
        );

        let ratio = storm.throughput / baseline.throughput.max(f64::EPSILON);
        fail_if(
            ratio < MIN_THROUGHPUT_RATIO,
            format!(
                "normal throughput in the storm {:.0}/s = {ratio:.2}x the baseline's {:.0}/s \
                 (at least {MIN_THROUGHPUT_RATIO}x); recovery {:.2}x",
                storm.throughput,
                baseline.throughput,
                recovery.throughput / baseline.throughput.max(f64::EPSILON),
            ),
        );
        let ratio = ms(storm.p99) / ms(baseline.p99).max(f64::EPSILON);
        fail_if(
            ratio > MAX_P99_RATIO,
            format!(
                "normal p99 in the storm {:.1} ms = {ratio:.2}x the baseline's {:.1} ms \
                 (at most {MAX_P99_RATIO}x); p50 {:.2}x",
                ms(storm.p99),
                ms(baseline.p99),
                ms(storm.p50) / ms(baseline.p50).max(f64::EPSILON),
            ),
        );

        let after_warmup = self.marks[BASELINE].rss_kib;
        let at_end = self.marks[DONE].rss_kib;
        let ratio = at_end as f64 / after_warmup.max(1) as f64;
        fail_if(
            ratio > MAX_RSS_RATIO,
            format!(
                "RSS at the end {:.1} MiB = {ratio:.2}x the RSS after the warm-up {:.1} MiB \
                 (at most {MAX_RSS_RATIO}x)",
                mib(at_end),
                mib(after_warmup),
            ),
        );

        // The hook's window is the wall-clock second; a phase of S seconds touches at most
        // S + 1 of them.
        for phase in [WARMUP, STORM] {
            let figures = self.phase(phase);
            let limit = u64::from(DEFAULT_BACKTRACES_PER_SECOND)
                * (figures.elapsed.as_secs_f64().ceil() as u64 + 1);
            let logged = self.records.with_backtrace[phase];
            fail_if(
                figures.backtraces > limit || logged > limit,
                format!(
                    "{}: {} backtraces captured, {logged} logged, for {} panics (at most \
                     {limit}: {DEFAULT_BACKTRACES_PER_SECOND} a second)",
                    PHASES[phase], figures.backtraces, figures.panics,
                ),
            );
        }
        let busiest = self
            .records
            .backtraces_by_second
            .values()
            .copied()
            .max()
            .unwrap_or(0);
        fail_if(
            busiest > u64::from(DEFAULT_BACKTRACES_PER_SECOND),
            format!(
                "at most {busiest} backtraces logged in one second (limit \
                 {DEFAULT_BACKTRACES_PER_SECOND})"
            ),
        );

        let baseline_bytes_per_request =
            baseline.log_bytes as f64 / baseline.requests.max(1) as f64;
        let bound = (baseline_bytes_per_request * storm.requests as f64) as u64
            + LOG_BYTES_PER_PANIC * storm.panics
            + LOG_BYTES_PER_BACKTRACE * storm.backtraces;
        let written = storm.log_bytes + storm.stderr_bytes;
        fail_if(
            written > bound,
            format!(
                "the log grew by {:.1} MiB in the storm (file {} B, stderr {} B): at most \
                 {:.1} MiB ({baseline_bytes_per_request:.0} B per normal request, \
                 {LOG_BYTES_PER_PANIC} B per panic, {LOG_BYTES_PER_BACKTRACE} B per backtrace)",
                mib(written / 1024),
                storm.log_bytes,
                storm.stderr_bytes,
                mib(bound / 1024),
            ),
        );

        let answered = self.storm_counts.internal_errors.load(Ordering::Relaxed);
        let counted = self.marks[DONE].panics as u64;
        let grouped = self.panics_admin["groups"]
            .as_array()
            .map(|groups| {
                groups
                    .iter()
                    .filter(|g| {
                        g["component"] == "http"
                            && g["last_message"]
                                .as_str()
                                .is_some_and(|m| m.contains("http.route_panic"))
                    })
                    .filter_map(|g| g["count"].as_u64())
                    .sum::<u64>()
            })
            .unwrap_or(0);
        let logged: u64 = self.records.records.iter().sum();
        let fallback = metric(self.metrics, r#"keel_log_fallback_total{stream="error"}"#)
            .unwrap_or(0.0) as u64;
        fail_if(
            counted != answered || grouped != answered || logged + fallback != answered,
            format!(
                "panics: {answered} JSON 500s answered, {counted} counted \
                 (keel_panics_total), {grouped} in their group (/v1/admin/panics), {logged} \
                 panic records logged + {fallback} written to stderr by the fallback"
            ),
        );
        fail_if(
            self.records.other > 0,
            format!("panic records of anything else: {}", self.records.other),
        );

        let mut unexpected: BTreeMap<String, u64> = BTreeMap::new();
        for samples in self.samples {
            for (what, count) in &samples.unexpected {
                *unexpected.entry(what.clone()).or_default() += count;
            }
        }
        fail_if(
            !unexpected.is_empty(),
            format!("normal requests answered otherwise than 2xx: {unexpected:?}"),
        );
        let storm_unexpected = self.storm_counts.unexpected.lock().clone();
        fail_if(
            !storm_unexpected.is_empty(),
            format!("storm requests answered otherwise than a JSON 500: {storm_unexpected:?}"),
        );
        failures
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
