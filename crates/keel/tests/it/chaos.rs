//! The chaos soak (docs/reliability.md): real `keel serve` instances (one on SQLite, three on
//! PostgreSQL), real `keel agent` processes and real receivers (a webhook endpoint, an SMTP
//! server, a Bot API), failpoints set at chosen rates in every part, `SIGKILL` sent to agents
//! and servers at random moments, a bounded workload of commands and deliveries; then the
//! invariants: every process not killed is alive, every command and delivery is in exactly one
//! terminal state and none is lost, the panics counted are the panics injected (each with its
//! log record), no lease is left held, and memory at the end is within 20 % of memory after
//! warm-up. It prints what it injected and what it found.
//!
//! `CHAOS_SIZE=large` runs the larger workload (the default, `small`, is what CI runs);
//! `CHAOS_SEED=n` repeats the random moments of an earlier run (each run prints its seed).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use keel_store::conformance::postgres::{TestSchema, test_url};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::agents::{AgentProcess, script};
use crate::deliveries::SmtpServer;
use crate::harness::{Api, Options, Server, poll_until};

/// How much work a soak does and how much it breaks.
#[derive(Clone, Copy, Debug)]
struct Size {
    name: &'static str,
    /// Commands created (in batches of 50).
    commands: usize,
    /// Deliveries sent to each of the three channels.
    deliveries: usize,
    /// `keel agent` processes.
    agents: usize,
    /// `SIGKILL`s sent to servers (each restarted), and to agents (each started again).
    server_kills: usize,
    agent_kills: usize,
}

fn size() -> Size {
    match std::env::var("CHAOS_SIZE").as_deref() {
        Ok("large") => Size {
            name: "large",
            commands: 20_000,
            deliveries: 2_000,
            agents: 4,
            server_kills: 6,
            agent_kills: 12,
        },
        Ok("small") | Err(_) => Size {
            name: "small",
            commands: 1_500,
            deliveries: 150,
            agents: 3,
            server_kills: 2,
            agent_kills: 4,
        },
        Ok(other) => panic!("CHAOS_SIZE={other}: small or large"),
    }
}

/// A failpoint the soak sets on every server, and what it injects.
struct Fault {
    point: &'static str,
    /// The `fail` action: a rate and a count, so each server process injects exactly `count`
    /// once the point has been reached often enough (the workload reaches each point many
    /// times more than `count / rate`).
    action: &'static str,
    count: u32,
    kind: Kind,
    /// Whether every server process reaches the point many times, whatever share of the work
    /// it gets. Elected jobs' ticks and delivery items are reached only by the instance that
    /// runs that work: on several instances each one shows, by its panic records, how many of
    /// its `count` fired.
    everywhere: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    /// A panic keel catches, counts in `keel_panics_total` and logs with its backtrace.
    Panic,
    /// A panic inside the log writer: caught and counted like the others, and the record
    /// being written is lost and counted in `keel_log_failed_total` (when that record was a
    /// panic's own, that panic is counted but has no record).
    LogPanic,
    /// An injected error (a failed send, retried).
    Error,
}

const FAULTS: &[Fault] = &[
    Fault {
        point: "http.handler",
        action: "5%20*panic(chaos: http.handler)",
        count: 20,
        kind: Kind::Panic,
        everywhere: true,
    },
    Fault {
        point: "store.claim",
        action: "25%5*panic(chaos: store.claim)",
        count: 5,
        kind: Kind::Panic,
        everywhere: true,
    },
    Fault {
        point: "store.heartbeat",
        action: "80%3*panic(chaos: store.heartbeat)",
        count: 3,
        kind: Kind::Panic,
        everywhere: true,
    },
    Fault {
        point: "periodic.tick",
        action: "20%3*panic(chaos: periodic.tick)",
        count: 3,
        kind: Kind::Panic,
        everywhere: false,
    },
    Fault {
        point: "supervisor.task",
        action: "1*panic(chaos: supervisor.task)",
        count: 1,
        kind: Kind::Panic,
        everywhere: true,
    },
    Fault {
        point: "deliveries.item",
        action: "2*panic(chaos: deliveries.item)",
        count: 2,
        kind: Kind::Panic,
        everywhere: false,
    },
    Fault {
        point: "log.format",
        action: "2%5*panic(chaos: log.format)",
        count: 5,
        kind: Kind::LogPanic,
        everywhere: true,
    },
    Fault {
        point: "log.sink",
        action: "2%5*panic(chaos: log.sink)",
        count: 5,
        kind: Kind::LogPanic,
        everywhere: true,
    },
    Fault {
        point: "channels.webhook.send",
        action: "5%5*return",
        count: 5,
        kind: Kind::Error,
        everywhere: true,
    },
    Fault {
        point: "channels.email.send",
        action: "5%5*return",
        count: 5,
        kind: Kind::Error,
        everywhere: true,
    },
    Fault {
        point: "channels.telegram.send",
        action: "5%5*return",
        count: 5,
        kind: Kind::Error,
        everywhere: true,
    },
];

fn failpoints() -> &'static str {
    Box::leak(
        FAULTS
            .iter()
            .map(|f| format!("{}={}", f.point, f.action))
            .collect::<Vec<_>>()
            .join(";")
            .into_boxed_str(),
    )
}

fn injected(kinds: &[Kind]) -> u32 {
    FAULTS
        .iter()
        .filter(|f| kinds.contains(&f.kind))
        .map(|f| f.count)
        .sum()
}

/// Webhook deliveries whose subject makes `deliveries.item` fire on them, sent once the kills
/// are over (so the server processes that run to the end handle them).
const MARKED_DELIVERIES: usize = 30;

/// Sends delivery `n` of channel `name` (its body carries the marker the receivers count);
/// a `marked` one's subject makes `deliveries.item` fire on it.
async fn send(notifiers: &[Api], channel: &str, name: &str, n: usize, marked: bool) {
    let key = format!("{name}-{n}");
    let subject = if marked {
        "failpoint:deliveries.item".to_owned()
    } else {
        format!("chaos {n}")
    };
    let body = json!({"channel_id": channel, "idempotency_key": key, "subject": subject,
                      "body": format!("delivery chaos-{name}-{n}")});
    post_until(notifiers, n, "/v1/deliveries", &key, &body, 202).await;
}

const CONFIG: &str = "[notifications]\nallowed_networks = [\"127.0.0.1\"]\nworkers = 4\n\
     secret_key = \"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\"\n\
     release_interval = \"500ms\"\n\n[commands]\nrelease_stuck_interval = \"500ms\"\n\n\
     [overload.rate_limits]\nwork_per_second = 1000000\nwork_burst = 1000000\n\
     agent_per_second = 1000000\nagent_burst = 1000000\n";

/// The webhook endpoint and the Bot API: how many times each delivery's marker arrived.
#[derive(Clone, Default)]
struct Receivers {
    seen: Arc<Mutex<HashMap<String, u32>>>,
}

impl Receivers {
    async fn start() -> (Self, String) {
        let receivers = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(
                |axum::extract::State(receivers): axum::extract::State<Receivers>,
                 uri: axum::http::Uri,
                 body: String| async move {
                    receivers.saw(&body);
                    if uri.path().starts_with("/bot") {
                        axum::Json(json!({"ok": true, "result": {"message_id": 1}})).into_response()
                    } else {
                        axum::http::StatusCode::OK.into_response()
                    }
                },
            )
            .with_state(receivers.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receivers, format!("http://{address}"))
    }

    fn saw(&self, text: &str) {
        let mut seen = self.seen.lock();
        for marker in markers(text) {
            *seen.entry(marker).or_default() += 1;
        }
    }
}

/// The delivery markers (`chaos-webhook-12`) in a message, once each.
fn markers(text: &str) -> Vec<String> {
    let mut found = Vec::new();
    for channel in ["webhook", "email", "telegram"] {
        let prefix = format!("chaos-{channel}-");
        for rest in text.split(&prefix).skip(1) {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            let marker = format!("{prefix}{digits}");
            if !digits.is_empty() && !found.contains(&marker) {
                found.push(marker);
            }
        }
    }
    found
}

/// An injected panic (500) and overload (429, 503) are retried, as a careful client would.
const RETRIED: &[u16] = &[429, 500, 503];

/// [`harness::post_until`](crate::harness::post_until), retrying [`RETRIED`].
async fn post_until(
    apis: &[Api],
    first: usize,
    path: &str,
    key: &str,
    body: &Value,
    expect: u16,
) -> Value {
    crate::harness::post_until(apis, first, path, key, body, expect, RETRIED).await
}

/// GETs `path` until an instance answers 200 (an injected panic or a killed instance is tried
/// again).
async fn get_until(apis: &[Api], path: &str) -> Value {
    for attempt in 0..600 {
        let api = &apis[attempt % apis.len()];
        let response = api
            .client
            .get(format!("{}{path}", api.base))
            .bearer_auth(&api.token)
            .send()
            .await;
        if let Ok(response) = response
            && response.status() == 200
        {
            return response.json().await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("GET {path} never answered 200");
}

/// Every command (or delivery) of the organisation, page by page.
async fn every_item(apis: &[Api], resource: &str) -> Vec<Value> {
    let mut items = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/{resource}?limit=500");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = get_until(apis, &path).await;
        items.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return items,
        }
    }
}

async fn unfinished(apis: &[Api], resource: &str) -> usize {
    let mut count = 0;
    for status in ["pending", "executing"] {
        let page = get_until(apis, &format!("/v1/{resource}?status={status}&limit=500")).await;
        count += page["items"].as_array().unwrap().len();
    }
    count
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The JSON records of a server's log written since byte `from` (a record cut by a kill is
/// skipped: that process is not checked).
fn records_since(server: &Server, from: u64) -> Vec<Value> {
    let text = std::fs::read(server.log_path()).unwrap_or_default();
    let from = usize::try_from(from).unwrap().min(text.len());
    String::from_utf8_lossy(&text[from..])
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

fn log_len(server: &Server) -> u64 {
    std::fs::metadata(server.log_path()).map_or(0, |m| m.len())
}

/// The panics one server process (from its last start to the end) counted and logged.
struct PanicTally {
    server: usize,
    /// Whether this is the only server (then every failpoint is reached by it).
    alone: bool,
    /// `keel_panics_total`, all components.
    counted: u32,
    /// `keel_log_failed_total`, all streams.
    log_failed: u32,
    /// Panic records in the error stream, and those with their backtrace (or the note that the
    /// rate limit skipped it).
    logged: u32,
    with_trace: u32,
    /// Panic records by the failpoint named in their message.
    by_point: BTreeMap<&'static str, u32>,
}

impl PanicTally {
    async fn of(server: usize, process: &Server, log_from: u64, alone: bool) -> Self {
        let metrics = process.metrics().await;
        let total = |name: &str| -> u32 {
            let sum: f64 = metrics
                .lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            sum as u32
        };
        let records: Vec<Value> = records_since(process, log_from)
            .into_iter()
            .filter(|r| r["stream"] == "error" && r["target"] == "keel::panic")
            .collect();
        let mut by_point = BTreeMap::new();
        for fault in FAULTS.iter().filter(|f| f.kind != Kind::Error) {
            let message = format!("chaos: {}", fault.point);
            let n = records.iter().filter(|r| r["message"] == message).count();
            by_point.insert(fault.point, u32::try_from(n).unwrap());
        }
        let with_trace = records
            .iter()
            .filter(|r| r["backtrace"].is_string() || r["backtrace_skipped"] == true)
            .count();
        Self {
            server,
            alone,
            counted: total("keel_panics_total"),
            log_failed: total("keel_log_failed_total"),
            logged: u32::try_from(records.len()).unwrap(),
            with_trace: u32::try_from(with_trace).unwrap(),
            by_point,
        }
    }

    /// The panics injected into this process, as a range: exactly the count of each point it
    /// reaches whatever its share of the work; for the others (on several instances), at least
    /// what their records show (a record an injected log fault hit is missing) and at most
    /// their count.
    fn injected(&self) -> (u32, u32) {
        FAULTS
            .iter()
            .filter(|f| f.kind != Kind::Error)
            .map(|f| {
                if f.everywhere || self.alone {
                    (f.count, f.count)
                } else {
                    (self.by_point[f.point], f.count)
                }
            })
            .fold((0, 0), |(low, high), (l, h)| (low + l, high + h))
    }

    /// [`PanicTally::injected`] as the table shows it.
    fn injected_text(&self) -> String {
        match self.injected() {
            (low, high) if low == high => low.to_string(),
            (low, high) => format!("{low} to {high}"),
        }
    }

    fn check(&self) {
        let server = self.server;
        let (low, high) = self.injected();
        assert!(
            (low..=high).contains(&self.counted),
            "server {server}: {} panics counted, {} injected ({:?})",
            self.counted,
            self.injected_text(),
            self.by_point
        );
        for fault in FAULTS.iter().filter(|f| f.kind != Kind::Error) {
            assert!(
                self.by_point[fault.point] <= fault.count,
                "server {server}: more {} panics than injected",
                fault.point
            );
        }
        // Every panic has its record, except where an injected log fault hit that very record
        // (each counted in `keel_log_failed_total`).
        assert_eq!(
            self.log_failed,
            injected(&[Kind::LogPanic]),
            "server {server}: records lost"
        );
        assert!(
            self.logged <= self.counted && self.counted - self.logged <= self.log_failed,
            "server {server}: {} panic records for {} panics",
            self.logged,
            self.counted
        );
        assert_eq!(
            self.with_trace, self.logged,
            "server {server}: records with a backtrace"
        );
    }
}

/// The whole soak on `servers` (1 on SQLite, 3 on PostgreSQL); servers in `victims` may be
/// killed.
#[allow(clippy::too_many_lines)]
async fn soak(backend: &str, mut servers: Vec<Server>, victims: &[usize]) {
    let size = size();
    let seed: u64 = std::env::var("CHAOS_SEED")
        .ok()
        .map(|s| s.parse().expect("CHAOS_SEED is a number"))
        .unwrap_or_else(rand::random);
    println!("chaos soak on {backend}, size {size:?}, CHAOS_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let started = Instant::now();

    // The tenant, its keys and the three channels, set up while failpoints already fire.
    servers[0].create_org("acme");
    let writer = servers[0].key("acme", "commands:write,commands:read", None);
    let notifier = servers[0].key("acme", "notifications:write,notifications:read", None);
    let writers: Vec<Api> = servers.iter().map(|s| s.api(&writer.token)).collect();
    let notifiers: Vec<Api> = servers.iter().map(|s| s.api(&notifier.token)).collect();
    let (receivers, receiver_url) = Receivers::start().await;
    let smtp = SmtpServer::start().await;
    let mut channels = BTreeMap::new();
    for (name, sender, channel) in [
        (
            "webhook",
            json!({"name": "hook", "type": "webhook",
                   "secrets": {"signing_secrets": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]}}),
            json!({"name": "hook", "type": "webhook", "url": format!("{receiver_url}/hook"),
                   "timeout_seconds": 2}),
        ),
        (
            "email",
            json!({"name": "mail", "type": "email", "host": "127.0.0.1", "port": smtp.port,
                   "tls": "plain", "from": "keel@example.com"}),
            json!({"name": "mail", "type": "email", "recipients": ["ops@example.com"]}),
        ),
        (
            "telegram",
            json!({"name": "bot", "type": "telegram", "base_url": receiver_url,
                   "secrets": {"bot_token": "123456:chaos"}}),
            json!({"name": "chat", "type": "telegram", "chat_ids": ["-1001"]}),
        ),
    ] {
        let sender = post_until(&notifiers, 0, "/v1/senders", name, &sender, 201).await;
        let mut channel = channel;
        channel["sender_id"] = sender["id"].clone();
        let channel = post_until(&notifiers, 0, "/v1/channels", name, &channel, 201).await;
        channels.insert(name, channel["id"].as_str().unwrap().to_owned());
    }

    // Enough attempts that the injected faults and kills cannot use them all up: a delivery
    // that ends dead here is a bug, not bad luck.
    for severity in ["critical", "high", "medium", "low", "info"] {
        let policy = json!({"severity": severity, "priority": 0, "max_attempts": 20});
        post_until(&notifiers, 0, "/v1/policies", severity, &policy, 201).await;
    }

    // The agents: each run appends its command id to one file; one command in 10 is slow
    // enough to heartbeat.
    let runs = servers[0].dir.path().join("runs");
    let program = script(
        &servers[0],
        "chaos.sh",
        &format!(
            "cat >/dev/null\necho \"$KEEL_COMMAND_ID\" >> {}\n\
             if [ \"$KEEL_COMMAND_TYPE\" = slow ]; then sleep 3; fi",
            runs.display()
        ),
    );
    let agent_keys: Vec<Api> = (0..size.agents)
        .map(|n| servers[0].key("acme", "agent", Some(&format!("agent-{n}"))))
        .collect();
    let start_agent = |n: usize, servers: &[Server]| {
        let server = &servers[n % servers.len()];
        AgentProcess::start(
            server,
            &server.api(&agent_keys[n].token),
            &program,
            &["--queues", "work", "--concurrency", "4"],
        )
    };
    let mut agents: Vec<AgentProcess> =
        (0..size.agents).map(|n| start_agent(n, &servers)).collect();

    // The workload: commands in batches of 50, deliveries ten at a time on each channel.
    let creating = {
        let writers = writers.clone();
        tokio::spawn(async move {
            for batch in 0..size.commands / 50 {
                let items: Vec<Value> = (0..50)
                    .map(|i| {
                        let n = batch * 50 + i;
                        let kind = if n % 10 == 7 { "slow" } else { "run" };
                        json!({"type": kind, "queue": "work", "lease_seconds": 6,
                               "max_attempts": 20, "params": {"n": n}})
                    })
                    .collect();
                let body = json!({"commands": items});
                post_until(
                    &writers,
                    batch,
                    "/v1/commands/batch",
                    &format!("batch-{batch}"),
                    &body,
                    201,
                )
                .await;
            }
        })
    };
    let mut sending = Vec::new();
    for (name, channel) in &channels {
        let (notifiers, channel, name) = (notifiers.clone(), channel.clone(), *name);
        sending.push(tokio::spawn(async move {
            for chunk in 0..size.deliveries.div_ceil(10) {
                let batch = (chunk * 10..(chunk * 10 + 10).min(size.deliveries)).map(|n| {
                    let (notifiers, channel) = (&notifiers, &channel);
                    send(notifiers, channel, name, n, false)
                });
                futures::future::join_all(batch).await;
            }
        }));
    }

    // The kills, at random moments while the first 40 % of the commands run (each when the
    // commands run so far pass a point drawn at random): a killed agent is started again at
    // once (a service manager would), a killed server after up to 2 s.
    let ran = || {
        std::fs::read_to_string(&runs)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let mut moments: Vec<(usize, bool)> = (0..size.server_kills)
        .map(|_| true)
        .chain((0..size.agent_kills).map(|_| false))
        .map(|server| (rng.random_range(1..size.commands * 2 / 5), server))
        .collect();
    moments.sort_unstable();
    let mut kills: Vec<(String, usize, Duration)> = Vec::new();
    let (mut server_kills, mut agent_kills) = (0, 0);
    let mut killed_servers = vec![false; servers.len()];
    let mut log_from = vec![0u64; servers.len()];
    for (at, server) in moments {
        let waiting = Instant::now();
        while ran() < at {
            assert!(
                waiting.elapsed() < Duration::from_secs(600),
                "the workload did not progress: {} runs",
                ran()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if server {
            let victim = victims[rng.random_range(0..victims.len())];
            servers[victim].kill9();
            kills.push((format!("server {victim}"), at, started.elapsed()));
            tokio::time::sleep(Duration::from_millis(rng.random_range(100..2000))).await;
            log_from[victim] = log_len(&servers[victim]);
            servers[victim].restart_with(Some(failpoints())).await;
            killed_servers[victim] = true;
            server_kills += 1;
        } else {
            let victim = rng.random_range(0..agents.len());
            agents[victim].kill9();
            kills.push((format!("agent {victim}"), at, started.elapsed()));
            agents[victim] = start_agent(victim, &servers);
            agent_kills += 1;
        }
    }
    let marked = (size.deliveries..size.deliveries + MARKED_DELIVERIES)
        .map(|n| send(&notifiers, &channels["webhook"], "webhook", n, true));
    futures::future::join_all(marked).await;
    println!(
        "kills: {}",
        kills
            .iter()
            .map(|(what, runs, at)| format!("{what} after {runs} runs ({:.1} s)", at.as_secs_f64()))
            .collect::<Vec<_>>()
            .join(", ")
    );

    // Warm-up is over once the processes left running have done a tenth of the work since the
    // last kill: their memory then is the reference.
    let warm_from = ran();
    poll_until(Duration::from_secs(600), || async {
        ran() >= (warm_from + size.commands / 10).min(size.commands)
    })
    .await;
    let warm_rss: Vec<u64> = servers.iter().map(|s| rss_kib(s.pid())).collect();

    creating.await.unwrap();
    for task in sending {
        task.await.unwrap();
    }
    let accepted_at = started.elapsed();
    // Everything reaches a terminal state.
    let drain = Instant::now();
    loop {
        let left =
            unfinished(&writers, "commands").await + unfinished(&notifiers, "deliveries").await;
        if left == 0 {
            break;
        }
        assert!(
            drain.elapsed() < Duration::from_secs(600),
            "{left} commands and deliveries not finished 600 s after the workload"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let drained_at = started.elapsed();

    // Every process not killed is alive; the killed ones were started again and are alive too.
    for (n, server) in servers.iter_mut().enumerate() {
        assert!(server.still_running(), "server {n} died");
    }
    for (n, agent) in agents.iter_mut().enumerate() {
        assert!(agent.still_running(), "agent {n} died");
    }

    // Commands: each created once, each in one terminal state, each run at least once.
    let commands = every_item(&writers, "commands").await;
    let mut by_n: HashMap<u64, u32> = HashMap::new();
    let mut statuses: BTreeMap<String, usize> = BTreeMap::new();
    for command in &commands {
        *by_n
            .entry(command["params"]["n"].as_u64().unwrap())
            .or_default() += 1;
        *statuses
            .entry(command["status"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    let lost_commands = (0..size.commands as u64)
        .filter(|n| !by_n.contains_key(n))
        .count();
    let duplicate_commands: u32 = by_n.values().map(|c| c - 1).sum();
    let runs_text = std::fs::read_to_string(&runs).unwrap();
    let mut run_counts: HashMap<&str, u32> = HashMap::new();
    for id in runs_text.lines() {
        *run_counts.entry(id).or_default() += 1;
    }
    let mut never_ran = 0;
    let mut completed_twice = 0;
    for command in &commands {
        let id = command["id"].as_str().unwrap();
        let runs = run_counts.get(id).copied().unwrap_or(0);
        if command["status"] == "completed" && runs == 0 {
            never_ran += 1;
        }
        if runs > 1 {
            let detail = get_until(&writers, &format!("/v1/commands/{id}")).await;
            let completed = detail["attempt_history"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|a| a["outcome"] == "completed")
                .count();
            if completed > 1 {
                completed_twice += 1;
            }
        }
    }
    let repeated_runs: u32 = run_counts.values().map(|c| c - 1).sum();

    // Deliveries: each queued once, in one terminal state; each delivered one reached its
    // receiver.
    let deliveries = every_item(&notifiers, "deliveries").await;
    let mut delivery_statuses: BTreeMap<String, usize> = BTreeMap::new();
    for delivery in &deliveries {
        *delivery_statuses
            .entry(delivery["status"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    for mail in smtp.messages() {
        receivers.saw(&mail);
    }
    let seen = receivers.seen.lock().clone();
    let expected_markers: Vec<String> = ["webhook", "email", "telegram"]
        .iter()
        .flat_map(|c| {
            let sent = if *c == "webhook" {
                size.deliveries + MARKED_DELIVERIES
            } else {
                size.deliveries
            };
            (0..sent).map(move |n| format!("chaos-{c}-{n}"))
        })
        .collect();
    let undelivered = expected_markers
        .iter()
        .filter(|m| !seen.contains_key(*m))
        .count();
    let repeated_sends: u32 = seen.values().map(|c| c - 1).sum();

    // Every server process reaches the points of requests and claims many more times than
    // their counts (whatever share of the workload it got): 400 reads and 100 empty claims
    // each, whose answers (some injected 500s) are not the point.
    let top_up = servers[0].key("acme", "agent", Some("top-up"));
    for server in &servers {
        let (reader, claimer) = (server.api(&writer.token), server.api(&top_up.token));
        post_until(
            std::slice::from_ref(&claimer),
            0,
            "/v1/agents/check-in",
            "top-up",
            &json!({"version": "chaos", "queues": ["top-up"], "boot_id": uuid::Uuid::new_v4()}),
            200,
        )
        .await;
        for n in 0..400 {
            let _ = reader
                .client
                .get(format!("{}/v1/commands?limit=1", reader.base))
                .bearer_auth(&reader.token)
                .send()
                .await;
            if n % 4 == 0 {
                let _ = claimer
                    .client
                    .post(format!("{}/v1/commands/claim", claimer.base))
                    .bearer_auth(&claimer.token)
                    .json(&json!({"limit": 1, "queues": ["top-up"], "wait_seconds": 0}))
                    .send()
                    .await;
            }
        }
    }

    // Panics and injected faults, counted by each server process that ran to the end.
    let mut tallies = Vec::new();
    for (n, server) in servers.iter().enumerate() {
        tallies.push(PanicTally::of(n, server, log_from[n], servers.len() == 1).await);
    }
    let end_rss: Vec<u64> = servers.iter().map(|s| rss_kib(s.pid())).collect();

    // The table.
    println!("\n| chaos soak, {backend}, {} | |\n|---|---|", size.name);
    println!("| seed | {seed} |");
    println!("| servers, agents | {}, {} |", servers.len(), size.agents);
    println!("| SIGKILLs | {server_kills} to servers, {agent_kills} to agents |");
    println!(
        "| failpoints (each server process) | {} |",
        FAULTS
            .iter()
            .map(|f| format!("`{}={}`", f.point, f.action))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| commands | {} accepted, {} stored, lost {lost_commands}, stored twice \
         {duplicate_commands}, {statuses:?} |",
        size.commands,
        commands.len()
    );
    println!(
        "| command runs | {} runs, {repeated_runs} repeated (at-least-once), completed under two \
         claims {completed_twice}, completed but never ran {never_ran} |",
        runs_text.lines().count()
    );
    println!(
        "| deliveries | {} accepted, {} stored, {delivery_statuses:?}, never received \
         {undelivered}, received again {repeated_sends} |",
        3 * size.deliveries + MARKED_DELIVERIES,
        deliveries.len()
    );
    for tally in &tallies {
        let restarted = if killed_servers[tally.server] {
            " (since its last restart)"
        } else {
            ""
        };
        println!(
            "| server {}{restarted}: panics injected / counted / logged (with backtrace) | \
             {} / {} / {} ({}) |",
            tally.server,
            tally.injected_text(),
            tally.counted,
            tally.logged,
            tally.with_trace
        );
        println!(
            "| server {}{restarted}: panic records by failpoint | {} |",
            tally.server,
            tally
                .by_point
                .iter()
                .map(|(point, n)| format!("{point} {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!(
            "| server {}{restarted}: log writer panics injected / records lost counted | {} / {} |",
            tally.server,
            injected(&[Kind::LogPanic]),
            tally.log_failed
        );
    }
    for (n, (warm, end)) in warm_rss.iter().zip(&end_rss).enumerate() {
        println!(
            "| server {n} RSS after warm-up / at the end | {} / {} MiB ({:+.0} %) |",
            warm / 1024,
            end / 1024,
            (*end as f64 / *warm as f64 - 1.0) * 100.0
        );
    }
    println!(
        "| time | accepted {:.0} s, all terminal {:.0} s |\n",
        accepted_at.as_secs_f64(),
        drained_at.as_secs_f64()
    );

    // The invariants.
    assert_eq!(lost_commands, 0, "commands lost");
    assert_eq!(duplicate_commands, 0, "commands stored twice");
    assert_eq!(commands.len(), size.commands);
    let terminal = ["completed", "failed", "dead", "cancelled"];
    assert!(
        statuses.keys().all(|s| terminal.contains(&s.as_str())),
        "commands not terminal: {statuses:?}"
    );
    assert_eq!(never_ran, 0, "a command completed without running");
    assert_eq!(completed_twice, 0, "a command completed under two claims");
    assert_eq!(
        deliveries.len(),
        3 * size.deliveries + MARKED_DELIVERIES,
        "deliveries lost or doubled"
    );
    assert!(
        delivery_statuses
            .keys()
            .all(|s| ["completed", "failed", "dead"].contains(&s.as_str())),
        "deliveries not terminal: {delivery_statuses:?}"
    );
    assert_eq!(
        delivery_statuses.get("completed").copied().unwrap_or(0),
        3 * size.deliveries + MARKED_DELIVERIES,
        "every delivery is delivered: {delivery_statuses:?}"
    );
    assert_eq!(
        undelivered, 0,
        "completed deliveries that never reached a receiver"
    );
    for tally in &tallies {
        tally.check();
    }
    for (n, (warm, end)) in warm_rss.iter().zip(&end_rss).enumerate() {
        assert!(
            *end as f64 <= *warm as f64 * 1.2,
            "server {n}: RSS {end} KiB at the end, {warm} KiB after warm-up"
        );
    }
    drop(agents);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_soak_on_sqlite() {
    let server = Server::start_with(Options {
        failpoints: Some(failpoints()),
        extra_toml: CONFIG,
        ..Options::default()
    })
    .await;
    soak("SQLite", vec![server], &[0]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn chaos_soak_on_postgres() {
    let Some(url) = test_url() else { return };
    let schema = TestSchema::create(&url).await;
    let toml: &'static str = Box::leak(
        format!("{}{CONFIG}", crate::postgres::store_toml(&url, &schema)).into_boxed_str(),
    );
    let mut servers = Vec::new();
    for _ in 0..3 {
        servers.push(
            Server::start_with(Options {
                failpoints: Some(failpoints()),
                extra_toml: toml,
                ..Options::default()
            })
            .await,
        );
    }
    // The first instance is never killed; the two others are.
    soak("PostgreSQL", servers, &[1, 2]).await;
}
