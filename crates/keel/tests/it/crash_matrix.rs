//! The crash matrix: for every transition of a command and of a delivery, a real `keel serve`
//! (on SQLite, and on PostgreSQL when `KEEL_TEST_POSTGRES_URL` is set) stops at the
//! `store.crash` failpoint just before or just after the transition's commit, driven over HTTP
//! (it sends itself SIGKILL there: the test sees it killed, and nothing else signals it). The
//! test starts it again without the failpoint, checks that a "before" crash left no trace of
//! the transition and an "after" one kept it, lets the work finish, and checks the invariants:
//! every command and delivery accepted before the crash is still there and ends in exactly one
//! terminal state, nothing is lost or done twice (beyond the at-least-once resend of a delivery
//! whose outcome was not durable), a report with the old claim token either completes once or
//! is refused, and no lease is left held. It prints a table of the cases.
//!
//! The `hand_back` step has no case: no request reaches the store's hand back (keel agent hands
//! a command back with a retryable `fail`, which is the `fail` step).
//!
//! `CRASH_MATRIX_STEPS=claim,send` runs only the cases of those `store.crash` steps.

use std::fmt::Write as _;
use std::future::Future;
use std::os::unix::process::ExitStatusExt as _;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use futures::StreamExt;
use keel_store::conformance::postgres::{TestSchema, test_url};
use keel_store::crash::{Phase, SIGNAL};
use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::harness::{Api, Options, Server, poll_until};

/// Cases run at once (each is one or two keel processes, mostly waiting).
const PARALLEL: usize = 8;
/// Fewer on PostgreSQL, for the database's connection limit.
const PARALLEL_POSTGRES: usize = 5;

/// Jobs tick only when a case asks them to (it rewrites the configuration and restarts), so a
/// "before" crash is not followed by the job doing the work before the test looks.
const BASE_TOML: &str = r#"
[commands]
release_stuck_interval = "1h"
retention = "1s"
retention_interval = "1h"

[notifications]
allowed_networks = ["127.0.0.1"]
workers = 2
release_interval = "1s"
retention = "1s"
cleanup_interval = "1h"
"#;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// The point `store.crash` names: `before:claim`, `after:claim`…
fn point(phase: Phase, step: &str) -> String {
    format!("{phase:?}:{step}").to_lowercase()
}

/// `before` or `after`, as `phase` is.
fn either<T>(phase: Phase, before: T, after: T) -> T {
    match phase {
        Phase::Before => before,
        Phase::After => after,
    }
}

/// Which key of a [`Node`] sends a request.
#[derive(Clone, Copy)]
enum Key {
    Agent,
    Admin,
}

/// POSTs `body` (none when `None`) to `path` with `api`'s key: the answer, if one comes.
async fn post(api: &Api, path: &str, body: Option<&Value>) -> reqwest::Result<reqwest::Response> {
    let mut request = api
        .client
        .post(format!("{}{path}", api.base))
        .bearer_auth(&api.token);
    if let Some(body) = body {
        request = request.json(body);
    }
    request.send().await
}

/// One keel on its own data directory (and schema), with an agent key (`web-1`) and an
/// organisation admin key.
struct Node {
    server: Server,
    agent: Api,
    admin: Api,
    /// The signal that ended keel at each stop at the failpoint, for the table.
    exits: Exits,
    _schema: Option<TestSchema>,
}

type Exits = Arc<Mutex<Vec<Option<i32>>>>;

impl Node {
    async fn start(backend: Backend, url: Option<&str>, exits: Exits) -> Node {
        let (store, schema) = match backend {
            Backend::Sqlite => (String::new(), None),
            Backend::Postgres => {
                let url = url.unwrap();
                let schema = TestSchema::create(url).await;
                (
                    format!(
                        // Few connections: the database is shared with other tests.
                        "[store]\nurl = \"{url}\"\n[store.postgres]\nschema = \"{}\"\n\
                         max_connections = 4\n",
                        schema.name()
                    ),
                    Some(schema),
                )
            }
        };
        let server = Server::start_with(Options {
            extra_toml: Box::leak(format!("{store}{BASE_TOML}").into_boxed_str()),
            ..Options::default()
        })
        .await;
        server.create_org("acme");
        let agent = server.key("acme", "agent", Some("web-1"));
        let admin = server.key("acme", "admin", None);
        Node {
            server,
            agent,
            admin,
            exits,
            _schema: schema,
        }
    }

    /// Kills keel (`kill -9`) and starts it again with `store.crash` at `phase:step`.
    async fn arm(&mut self, phase: Phase, step: &str) {
        self.server.kill9();
        let failpoints = format!("store.crash=return({})", point(phase, step));
        self.server.restart_with(Some(&failpoints)).await;
    }

    /// Waits for keel to stop at the failpoint, then starts it again without it.
    async fn crashed(&mut self, deadline: Duration) -> Result<(), String> {
        let stopped = self.stopped(deadline).await;
        self.server.restart().await;
        stopped
    }

    /// Waits for keel to stop at the failpoint (and leaves it stopped).
    async fn stopped(&mut self, deadline: Duration) -> Result<(), String> {
        let status = self.server.wait_exit(deadline).await;
        // Nothing else sends it a signal: killed by SIGKILL is the failpoint's doing.
        let signal = status.signal();
        self.exits.lock().push(signal);
        match signal {
            Some(SIGNAL) => Ok(()),
            _ => Err(format!("keel ended with {status}, not at the failpoint")),
        }
    }

    /// Rewrites `key = "…"` in keel's configuration (a job's interval).
    fn set(&self, key: &str, value: &str) {
        let text = std::fs::read_to_string(&self.server.config_path).unwrap();
        let text: String = text
            .lines()
            .map(|line| match line.split_once(" = ") {
                Some((k, _)) if k == key => format!("{key} = \"{value}\"\n"),
                _ => format!("{line}\n"),
            })
            .collect();
        std::fs::write(&self.server.config_path, text).unwrap();
    }

    fn api(&self, key: Key) -> &Api {
        match key {
            Key::Agent => &self.agent,
            Key::Admin => &self.admin,
        }
    }

    /// Starts keel with `store.crash` at `phase:step`, sends a request whose answer never
    /// comes (keel exits on the way), waits for keel to stop at the failpoint and starts it
    /// again without it.
    async fn crash_on(
        &mut self,
        phase: Phase,
        step: &str,
        key: Key,
        path: &str,
        body: Value,
    ) -> Result<(), String> {
        self.arm(phase, step).await;
        let _ = post(self.api(key), path, Some(&body)).await;
        self.crashed(Duration::from_secs(20)).await
    }

    /// An admin's `action` on `item` (`requeue`, `cancel`) cut by the crash at `phase:step`:
    /// `item` as the restarted keel has it, then the status of the same action sent again.
    async fn crashed_action(
        &mut self,
        phase: Phase,
        step: &str,
        item: &str,
        action: &str,
    ) -> Result<(Value, u16), String> {
        let path = format!("{item}/{action}");
        self.crash_on(phase, step, Key::Admin, &path, json!({}))
            .await?;
        let found = self.admin.get(item, 200).await;
        Ok((found, self.status(Key::Admin, &path, None).await))
    }

    /// POSTs `body` (none when `None`) to `path` with `key`: the answer's status.
    async fn status(&self, key: Key, path: &str, body: Option<&Value>) -> u16 {
        post(self.api(key), path, body)
            .await
            .unwrap()
            .status()
            .as_u16()
    }

    /// The `items` of the list at `path`.
    async fn items(&self, path: &str) -> Vec<Value> {
        let page = self.admin.get(path, 200).await;
        page["items"].as_array().unwrap().clone()
    }

    async fn command(&self, id: &str) -> Value {
        self.admin.get(&format!("/v1/commands/{id}"), 200).await
    }

    async fn commands(&self) -> Vec<Value> {
        self.items("/v1/commands?limit=100").await
    }

    async fn create(&self, lease_seconds: u32) -> String {
        let created = self
            .admin
            .post("/v1/commands", &command_body(lease_seconds), 201)
            .await;
        created["id"].as_str().unwrap().to_owned()
    }

    /// One claim of the agent: (id, token) of what it got.
    async fn claim(&self) -> Option<(String, String)> {
        let claimed = self
            .agent
            .post(
                "/v1/commands/claim",
                &json!({"limit": 1, "queues": ["q"], "wait_seconds": 0}),
                200,
            )
            .await;
        claimed["commands"].as_array().unwrap().first().map(|c| {
            (
                c["id"].as_str().unwrap().to_owned(),
                c["claim_token"].as_str().unwrap().to_owned(),
            )
        })
    }

    /// A report with `token`; its status.
    async fn report(&self, id: &str, what: &str, token: &str) -> u16 {
        let body = report_body(what, token);
        self.status(
            Key::Agent,
            &format!("/v1/commands/{id}/{what}"),
            Some(&body),
        )
        .await
    }

    /// Claims the command `id` again (the agent's next claim gets it): its token.
    async fn reclaim(&self, id: &str) -> String {
        let (claimed, token) = self.claim().await.unwrap();
        assert_eq!(claimed, id);
        token
    }

    async fn release_stuck(&self) {
        self.admin
            .post("/v1/commands/release-stuck", &json!({}), 200)
            .await;
    }

    async fn delivery(&self, id: &str) -> Value {
        self.admin.get(&format!("/v1/deliveries/{id}"), 200).await
    }

    async fn deliveries(&self) -> Vec<Value> {
        self.items("/v1/deliveries?limit=100").await
    }

    /// A webhook channel to `url`.
    async fn channel(&self, url: &str) -> String {
        let channel = self
            .admin
            .post(
                "/v1/channels",
                &json!({"name": "hook", "type": "webhook", "url": url, "timeout_seconds": 1}),
                201,
            )
            .await;
        channel["id"].as_str().unwrap().to_owned()
    }

    /// A [`Receiver`] answering `script`, and a webhook channel to it.
    async fn hook(&self, script: Vec<u16>) -> (Receiver, String) {
        let receiver = Receiver::start(script).await;
        let channel = self.channel(&receiver.url).await;
        (receiver, channel)
    }

    /// Sends a message to `channel` and waits for its delivery to be `status`: its id.
    async fn sent(&self, channel: &str, status: &str) -> String {
        assert_eq!(send_message(self, channel, None).await.unwrap(), 202);
        let id = the_delivery(self).await["id"].as_str().unwrap().to_owned();
        self.wait_delivery(&id, status).await;
        id
    }

    async fn wait_delivery(&self, id: &str, status: &str) -> Value {
        let started = Instant::now();
        loop {
            let d = self.delivery(id).await;
            if d["status"] == status {
                return d;
            }
            assert!(
                started.elapsed() < Duration::from_secs(90),
                "delivery {id} is not {status}: {d}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// The body of a `complete`, `fail` (for good) or `heartbeat` report.
fn report_body(what: &str, token: &str) -> Value {
    match what {
        "complete" => json!({"claim_token": token, "result": {"ok": true}}),
        "fail" => json!({"claim_token": token, "error": {"why": "test"}, "retryable": false}),
        _ => json!({"claim_token": token, "progress": {"step": 1}}),
    }
}

fn command_body(lease_seconds: u32) -> Value {
    json!({"type": "run", "queue": "q", "params": {}, "lease_seconds": lease_seconds,
           "max_attempts": 3})
}

/// Checks that a command or a delivery holds no lease and that each of its attempts ended: its
/// attempts.
fn released(item: &Value) -> &Vec<Value> {
    assert!(
        item.get("lease_expires_at").is_none_or(Value::is_null),
        "lease held: {item}"
    );
    let history = item["attempt_history"].as_array().unwrap();
    assert!(
        history.iter().all(|a| !a["outcome"].is_null()),
        "an attempt still runs: {item}"
    );
    history
}

/// The outcomes of `item`'s attempts, in order.
fn outcomes(item: &Value) -> Vec<&str> {
    item["attempt_history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect()
}

/// The invariants every command case ends with: each command is in one terminal state, its
/// attempts all ended, no lease is held, and exactly `completed` attempts completed.
async fn settled(node: &Node, id: &str, status: &str, completed: usize) {
    let command = node.command(id).await;
    assert_eq!(command["status"], status, "{command}");
    let history = released(&command);
    assert!(command.get("claim_token").is_none_or(Value::is_null));
    let done = history
        .iter()
        .filter(|a| a["outcome"] == "completed")
        .count();
    assert_eq!(done, completed, "completed attempts: {command}");
    let all = node.commands().await;
    assert_eq!(all.len(), 1, "one command, no more: {all:?}");
    assert!(node.claim().await.is_none(), "nothing left to claim");
}

/// The `webhook-id` of every request a [`Receiver`] got.
type Seen = Arc<Mutex<Vec<String>>>;

/// A webhook receiver that answers its first requests with `script`, then 200, and counts
/// every `webhook-id`.
#[derive(Clone, Default)]
struct Receiver {
    seen: Seen,
    url: String,
}

impl Receiver {
    async fn start(script: Vec<u16>) -> Receiver {
        let seen = Seen::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let state = (seen.clone(), Arc::new(script));
        let app = axum::Router::new()
            .fallback(
                |State((seen, script)): State<(Seen, Arc<Vec<u16>>)>,
                 headers: HeaderMap| async move {
                    let mut seen = seen.lock();
                    let n = seen.len();
                    seen.push(headers["webhook-id"].to_str().unwrap().to_owned());
                    StatusCode::from_u16(script.get(n).copied().unwrap_or(200)).unwrap()
                },
            )
            .with_state(state);
        tokio::spawn(async move { axum::serve(listener, app).await });
        Receiver {
            seen,
            url: format!("http://{address}/hook"),
        }
    }

    fn count(&self) -> usize {
        self.seen.lock().len()
    }
}

/// The invariants every delivery case ends with: one delivery, `status`, no lease held, and the
/// receiver got it `sends` times.
async fn delivered(node: &Node, receiver: &Receiver, status: &str, sends: usize) -> Value {
    let all = node.deliveries().await;
    assert_eq!(all.len(), 1, "one delivery, no more: {all:?}");
    let id = all[0]["id"].as_str().unwrap();
    released(&node.wait_delivery(id, status).await);
    // Nothing more arrives once it is finished.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let delivery = node.wait_delivery(id, status).await;
    assert_eq!(
        receiver.count(),
        sends,
        "sends: {:?} of {delivery}",
        receiver.seen.lock()
    );
    delivery
}

type CaseFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// One row of the matrix: the transition (and what it is tested with) and the step named in
/// `store.crash`.
struct Case {
    transition: &'static str,
    step: &'static str,
    run: fn(Node, Phase) -> CaseFuture,
}

macro_rules! case {
    ($transition:expr, $step:expr, $f:ident) => {
        Case {
            transition: $transition,
            step: $step,
            run: |node, phase| Box::pin($f(node, phase)),
        }
    };
}

/// The cases, or those whose `store.crash` step is named in `CRASH_MATRIX_STEPS` (`claim,send`).
fn cases() -> Vec<Case> {
    let only = std::env::var("CRASH_MATRIX_STEPS").unwrap_or_default();
    let only: Vec<&str> = only.split(',').filter(|s| !s.is_empty()).collect();
    let mut cases = all_cases();
    if !only.is_empty() {
        cases.retain(|c| only.contains(&c.step));
    }
    cases
}

fn all_cases() -> Vec<Case> {
    vec![
        case!("command create", "create", create),
        case!("command claim", "claim", claim),
        case!("command heartbeat", "heartbeat", heartbeat),
        case!("command complete", "complete", complete),
        case!("command fail", "fail", fail),
        case!("command release (lease expired)", "release", release),
        case!("command requeue", "requeue", requeue),
        case!("command cancel", "cancel", cancel),
        case!("command purge (retention)", "purge", purge),
        case!("delivery enqueue", "enqueue", enqueue),
        case!("delivery claim/send", "send", send),
        case!("delivery record: delivered", "record", record_delivered),
        case!("delivery record: retry", "record", record_retry),
        case!("delivery record: failed", "record", record_failed),
        case!("delivery record: dead", "record", record_dead),
        case!(
            "delivery release (lease expired)",
            "delivery_release",
            delivery_release
        ),
        case!("delivery requeue", "delivery_requeue", delivery_requeue),
        case!("delivery cleanup (retention)", "cleanup", cleanup),
    ]
}

async fn create(mut node: Node, phase: Phase) -> Result<(), String> {
    node.agent.check_in(&["q"]).await;
    node.arm(phase, "create").await;
    let key = [("idempotency-key", "crash-1")];
    let request = |api: &Api| {
        api.client
            .post(format!("{}/v1/commands", api.base))
            .bearer_auth(&api.token)
            .header(key[0].0, key[0].1)
            .json(&command_body(30))
            .send()
    };
    let _ = request(&node.admin).await;
    node.crashed(Duration::from_secs(20)).await?;
    let listed = node.commands().await;
    match phase {
        Phase::Before => assert!(listed.is_empty(), "no trace: {listed:?}"),
        Phase::After => {
            assert_eq!(listed.len(), 1, "the create was kept: {listed:?}");
            assert_eq!(listed[0]["status"], "pending", "{listed:?}");
        }
    }
    // The client, not having heard, sends it again with the same key.
    let again = request(&node.admin).await.unwrap();
    let expected = either(phase, 201, 200);
    assert_eq!(again.status().as_u16(), expected, "the create sent again");
    let (id, token) = node.claim().await.unwrap();
    assert_eq!(node.report(&id, "complete", &token).await, 200);
    settled(&node, &id, "completed", 1).await;
    Ok(())
}

async fn claim(mut node: Node, phase: Phase) -> Result<(), String> {
    node.agent.check_in(&["q"]).await;
    let id = node.create(2).await;
    let body = json!({"limit": 1, "queues": ["q"]});
    node.crash_on(phase, "claim", Key::Agent, "/v1/commands/claim", body)
        .await?;
    let command = node.command(&id).await;
    match phase {
        Phase::Before => {
            assert_eq!(command["status"], "pending", "{command}");
            assert_eq!(command["attempts"], 0, "{command}");
        }
        Phase::After => {
            // Leased to an agent that never heard of it: the lease expires and is released.
            assert_eq!(command["status"], "executing", "{command}");
            assert_eq!(command["attempts"], 1, "{command}");
            assert!(node.claim().await.is_none(), "leased: not claimable");
            tokio::time::sleep(Duration::from_millis(2100)).await;
            node.release_stuck().await;
        }
    }
    let token = node.reclaim(&id).await;
    assert_eq!(node.report(&id, "complete", &token).await, 200);
    settled(&node, &id, "completed", 1).await;
    Ok(())
}

/// A command claimed by the agent, with a lease of `lease_seconds`: (id, token).
async fn claimed(node: &Node, lease_seconds: u32) -> (String, String) {
    node.agent.check_in(&["q"]).await;
    let id = node.create(lease_seconds).await;
    let token = node.reclaim(&id).await;
    (id, token)
}

async fn heartbeat(mut node: Node, phase: Phase) -> Result<(), String> {
    let (id, token) = claimed(&node, 60).await;
    let lease = node.command(&id).await["lease_expires_at"].clone();
    // The renewed lease ends visibly later.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let path = format!("/v1/commands/{id}/heartbeat");
    let body = report_body("heartbeat", &token);
    node.crash_on(phase, "heartbeat", Key::Agent, &path, body)
        .await?;
    let command = node.command(&id).await;
    assert_eq!(command["status"], "executing", "{command}");
    match phase {
        Phase::Before => assert_eq!(command["lease_expires_at"], lease, "{command}"),
        Phase::After => assert_ne!(command["lease_expires_at"], lease, "{command}"),
    }
    // The lease survived the restart: the agent goes on with its token.
    assert_eq!(node.report(&id, "heartbeat", &token).await, 200);
    assert_eq!(node.report(&id, "complete", &token).await, 200);
    settled(&node, &id, "completed", 1).await;
    Ok(())
}

/// A report (`complete` or `fail`) cut by the crash, then sent again with the same token.
async fn report_case(mut node: Node, phase: Phase, what: &str) -> Result<(), String> {
    let (id, token) = claimed(&node, 60).await;
    let path = format!("/v1/commands/{id}/{what}");
    node.crash_on(phase, what, Key::Agent, &path, report_body(what, &token))
        .await?;
    let command = node.command(&id).await;
    let ended = if what == "complete" {
        "completed"
    } else {
        "failed"
    };
    assert_eq!(
        command["status"],
        either(phase, "executing", ended),
        "{command}"
    );
    // The agent, not having heard, reports again with its old token: taken once, or refused.
    let again = node.report(&id, what, &token).await;
    match phase {
        Phase::Before => assert_eq!(again, 200, "the report sent again"),
        Phase::After => assert!(again == 200 || again == 409, "{again}"),
    }
    settled(&node, &id, ended, usize::from(what == "complete")).await;
    Ok(())
}

async fn complete(node: Node, phase: Phase) -> Result<(), String> {
    report_case(node, phase, "complete").await
}

async fn fail(node: Node, phase: Phase) -> Result<(), String> {
    report_case(node, phase, "fail").await
}

async fn release(mut node: Node, phase: Phase) -> Result<(), String> {
    let (id, token) = claimed(&node, 2).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let path = "/v1/commands/release-stuck";
    node.crash_on(phase, "release", Key::Admin, path, json!({}))
        .await?;
    let command = node.command(&id).await;
    match phase {
        Phase::Before => assert_eq!(command["status"], "executing", "{command}"),
        Phase::After => {
            assert_eq!(command["status"], "pending", "{command}");
            assert_eq!(
                command["attempt_history"][0]["outcome"], "lease_expired",
                "{command}"
            );
        }
    }
    // The old holder reports late: after the release it is refused; before, its expired but
    // unreleased lease may still take it. Either way the command completes once.
    let late = node.report(&id, "complete", &token).await;
    match phase {
        Phase::Before => assert!(late == 200 || late == 409, "{late}"),
        Phase::After => assert_eq!(late, 409, "a released claim's token is refused"),
    }
    if late != 200 {
        node.release_stuck().await;
        let token = node.reclaim(&id).await;
        assert_eq!(node.report(&id, "complete", &token).await, 200);
    }
    settled(&node, &id, "completed", 1).await;
    Ok(())
}

async fn requeue(mut node: Node, phase: Phase) -> Result<(), String> {
    let (id, first) = claimed(&node, 60).await;
    assert_eq!(node.report(&id, "fail", &first).await, 200);
    let item = format!("/v1/commands/{id}");
    let (command, again) = node
        .crashed_action(phase, "requeue", &item, "requeue")
        .await?;
    match phase {
        Phase::Before => {
            assert_eq!(command["status"], "failed", "{command}");
            assert_eq!(again, 200, "requeued when sent again");
        }
        Phase::After => {
            assert_eq!(command["status"], "pending", "{command}");
            assert_eq!(command["attempts"], 0, "{command}");
            assert_eq!(again, 409, "requeued once");
        }
    }
    let token = node.reclaim(&id).await;
    // The token of the attempt before the requeue is refused.
    assert_eq!(node.report(&id, "complete", &first).await, 409);
    assert_eq!(node.report(&id, "complete", &token).await, 200);
    settled(&node, &id, "completed", 1).await;
    Ok(())
}

async fn cancel(mut node: Node, phase: Phase) -> Result<(), String> {
    node.agent.check_in(&["q"]).await;
    let id = node.create(60).await;
    let item = format!("/v1/commands/{id}");
    let (command, again) = node
        .crashed_action(phase, "cancel", &item, "cancel")
        .await?;
    match phase {
        Phase::Before => {
            assert_eq!(command["status"], "pending", "{command}");
            assert_eq!(again, 200);
        }
        Phase::After => {
            assert_eq!(command["status"], "cancelled", "{command}");
            assert_eq!(again, 409, "cancelled once");
        }
    }
    settled(&node, &id, "cancelled", 0).await;
    Ok(())
}

/// Runs a job once with `store.crash` set: its interval `key` is made 1 s for that start, then
/// long again for the checks.
async fn crash_in_job(node: &mut Node, phase: Phase, step: &str, key: &str) -> Result<(), String> {
    node.set(key, "1s");
    node.arm(phase, step).await;
    let stopped = node.stopped(Duration::from_secs(60)).await;
    node.set(key, "1h");
    node.server.restart().await;
    stopped
}

/// Lets the job with interval `key` run (1 s) until `done`.
async fn run_job<F, Fut>(node: &mut Node, key: &str, done: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    node.set(key, "1s");
    node.server.kill9();
    node.server.restart().await;
    poll_until(Duration::from_secs(30), done).await;
}

/// The retention job with interval `key` cut by the crash at `step` once `item` (finished,
/// `status`) is older than the retention (1 s): after a "before" crash it is still `status`
/// until the job runs again; then it is gone (`deleted` says what did it).
async fn crash_in_retention(
    node: &mut Node,
    phase: Phase,
    step: &str,
    key: &str,
    item: &str,
    status: &str,
    deleted: &str,
) -> Result<(), String> {
    // Older than the retention (1 s) when the job runs.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    crash_in_job(node, phase, step, key).await?;
    if phase == Phase::Before {
        assert_eq!(node.admin.get(item, 200).await["status"], status);
        let admin = node.admin.clone();
        run_job(node, key, || {
            let admin = admin.clone();
            let item = item.to_owned();
            async move { gone(&admin, &item).await }
        })
        .await;
    }
    assert!(gone(&node.admin, item).await, "{deleted}");
    Ok(())
}

async fn purge(mut node: Node, phase: Phase) -> Result<(), String> {
    let (id, token) = claimed(&node, 60).await;
    assert_eq!(node.report(&id, "complete", &token).await, 200);
    let item = format!("/v1/commands/{id}");
    let key = "retention_interval";
    crash_in_retention(&mut node, phase, "purge", key, &item, "completed", "purged").await?;
    assert!(node.commands().await.is_empty());
    Ok(())
}

/// Whether GET `path` is 404.
async fn gone(api: &Api, path: &str) -> bool {
    api.client
        .get(format!("{}{path}", api.base))
        .bearer_auth(&api.token)
        .send()
        .await
        .unwrap()
        .status()
        == StatusCode::NOT_FOUND
}

/// The body of a message to `channel`, with an idempotency `key`.
fn message(channel: &str, key: Option<&str>) -> Value {
    let mut body = json!({"channel_id": channel, "body": "{\"n\": 1}"});
    if let Some(key) = key {
        body["idempotency_key"] = json!(key);
    }
    body
}

/// Sends a message to `channel` (its answer may not come).
async fn send_message(node: &Node, channel: &str, key: Option<&str>) -> reqwest::Result<u16> {
    post(&node.admin, "/v1/deliveries", Some(&message(channel, key)))
        .await
        .map(|r| r.status().as_u16())
}

/// Sends a message to `channel` with `store.crash` at `phase:step` (see [`Node::crash_on`]).
async fn crash_on_message(
    node: &mut Node,
    phase: Phase,
    step: &str,
    channel: &str,
    key: Option<&str>,
) -> Result<(), String> {
    let body = message(channel, key);
    node.crash_on(phase, step, Key::Admin, "/v1/deliveries", body)
        .await
}

async fn enqueue(mut node: Node, phase: Phase) -> Result<(), String> {
    let (receiver, channel) = node.hook(Vec::new()).await;
    crash_on_message(&mut node, phase, "enqueue", &channel, Some("crash-1")).await?;
    let listed = node.deliveries().await;
    match phase {
        Phase::Before => assert!(listed.is_empty(), "no trace: {listed:?}"),
        Phase::After => assert_eq!(listed.len(), 1, "{listed:?}"),
    }
    // Sent again with the same key: one delivery.
    assert_eq!(
        send_message(&node, &channel, Some("crash-1"))
            .await
            .unwrap(),
        202
    );
    delivered(&node, &receiver, "completed", 1).await;
    Ok(())
}

/// The one delivery there is.
async fn the_delivery(node: &Node) -> Value {
    let listed = node.deliveries().await;
    assert_eq!(listed.len(), 1, "{listed:?}");
    listed[0].clone()
}

async fn send(mut node: Node, phase: Phase) -> Result<(), String> {
    let (receiver, channel) = node.hook(Vec::new()).await;
    crash_on_message(&mut node, phase, "send", &channel, None).await?;
    if phase == Phase::After {
        assert_eq!(receiver.count(), 0, "nothing was sent before the crash");
        // Leased to a worker that is gone: sent once its lease expires.
        let delivery = the_delivery(&node).await;
        assert_eq!(delivery["status"], "executing", "{delivery}");
    }
    // (Before: the restarted keel claims it at once, so its state is read at the end.)
    let delivery = delivered(&node, &receiver, "completed", 1).await;
    let outcomes = outcomes(&delivery);
    match phase {
        Phase::Before => assert_eq!(outcomes, ["completed"], "no trace of the lost claim"),
        Phase::After => assert_eq!(outcomes, ["lease_expired", "completed"]),
    }
    Ok(())
}

/// A delivery sent to a receiver answering `script`, the record of its first attempt cut by
/// the crash: its status right after an "after" crash (`recorded`), and its final status and
/// the receiver's count of sends after a "before" and after an "after" crash.
async fn record_case(
    mut node: Node,
    phase: Phase,
    script: Vec<u16>,
    recorded: &str,
    ended: [(&str, usize); 2],
) -> Result<Value, String> {
    let (receiver, channel) = node.hook(script).await;
    crash_on_message(&mut node, phase, "record", &channel, None).await?;
    assert_eq!(receiver.count(), 1, "sent once before the crash");
    let delivery = the_delivery(&node).await;
    // Before: the outcome was not durable: the lease expires and it is sent again.
    let status = either(phase, "executing", recorded);
    assert_eq!(delivery["status"], status, "{delivery}");
    let (ended, sends) = either(phase, ended[0], ended[1]);
    Ok(delivered(&node, &receiver, ended, sends).await)
}

async fn record_delivered(node: Node, phase: Phase) -> Result<(), String> {
    // At least once: the send whose outcome was lost is sent again.
    let ended = [("completed", 2), ("completed", 1)];
    record_case(node, phase, Vec::new(), "completed", ended)
        .await
        .map(|_| ())
}

async fn record_retry(node: Node, phase: Phase) -> Result<(), String> {
    // The 500 is recorded as a retry (after), or not at all (before): sent again either way.
    let ended = [("completed", 2), ("completed", 2)];
    record_case(node, phase, vec![500], "pending", ended)
        .await
        .map(|_| ())
}

async fn record_failed(node: Node, phase: Phase) -> Result<(), String> {
    // 410 is permanent: failed for good once recorded (after); when the record was lost
    // (before), it is sent again and the receiver now answers 200.
    let ended = [("completed", 2), ("failed", 1)];
    record_case(node, phase, vec![410], "failed", ended)
        .await
        .map(|_| ())
}

async fn record_dead(node: Node, phase: Phase) -> Result<(), String> {
    // One attempt (the policy of direct sends' severity): the 500 makes it dead when recorded
    // (attempts_exhausted); when the record was lost, its lease expires on its last attempt
    // (dead, lease_expired). Sent once either way.
    node.admin
        .post(
            "/v1/policies",
            &json!({"severity": "low", "priority": 0, "max_attempts": 1}),
            201,
        )
        .await;
    let ended = [("dead", 1), ("dead", 1)];
    let dead = record_case(node, phase, vec![500], "dead", ended).await?;
    let reason = either(phase, "lease_expired", "attempts_exhausted");
    assert_eq!(dead["dead_reason"], reason, "{dead}");
    Ok(())
}

async fn delivery_release(mut node: Node, phase: Phase) -> Result<(), String> {
    let (receiver, channel) = node.hook(Vec::new()).await;
    // A worker takes it and is gone (the process stops right after the claim's commit).
    crash_on_message(&mut node, Phase::After, "send", &channel, None).await?;
    // The lease (the channel's 1 s timeout and 30 s) expires; the release job runs every 1 s.
    let started = Instant::now();
    crash_in_job(&mut node, phase, "delivery_release", "release_interval").await?;
    assert!(
        started.elapsed() > Duration::from_secs(25),
        "after the lease"
    );
    let delivery = the_delivery(&node).await;
    let id = delivery["id"].as_str().unwrap().to_owned();
    let first = node.delivery(&id).await["attempt_history"][0].clone();
    match phase {
        Phase::Before => {
            assert_eq!(delivery["status"], "executing", "{delivery}");
            assert!(first["outcome"].is_null(), "no trace: {first}");
            run_job(&mut node, "release_interval", || async { true }).await;
        }
        // Released (and perhaps claimed again at once by the keel started since).
        Phase::After => assert_eq!(first["outcome"], "lease_expired", "{first}"),
    }
    let delivery = delivered(&node, &receiver, "completed", 1).await;
    assert_eq!(
        outcomes(&delivery),
        ["lease_expired", "completed"],
        "released once"
    );
    Ok(())
}

async fn delivery_requeue(mut node: Node, phase: Phase) -> Result<(), String> {
    let (receiver, channel) = node.hook(vec![410]).await;
    let id = node.sent(&channel, "failed").await;
    let item = format!("/v1/deliveries/{id}");
    let (delivery, again) = node
        .crashed_action(phase, "delivery_requeue", &item, "requeue")
        .await?;
    match phase {
        Phase::Before => {
            assert_eq!(delivery["status"], "failed", "{delivery}");
            assert_eq!(again, 200, "requeued when sent again");
        }
        Phase::After => {
            assert_ne!(delivery["status"], "failed", "{delivery}");
            // Requeued once: a second requeue finds it pending, or already sent.
            assert_eq!(again, 409, "requeued once");
        }
    }
    delivered(&node, &receiver, "completed", 2).await;
    Ok(())
}

async fn cleanup(mut node: Node, phase: Phase) -> Result<(), String> {
    let (receiver, channel) = node.hook(Vec::new()).await;
    let id = node.sent(&channel, "completed").await;
    let item = format!("/v1/deliveries/{id}");
    let key = "cleanup_interval";
    crash_in_retention(
        &mut node,
        phase,
        "cleanup",
        key,
        &item,
        "completed",
        "cleaned up",
    )
    .await?;
    assert!(node.deliveries().await.is_empty());
    assert_eq!(receiver.count(), 1);
    Ok(())
}

/// What one case gave: the exit statuses at the failpoint, and whether the invariants held.
struct Row {
    transition: &'static str,
    point: String,
    exits: Vec<Option<i32>>,
    outcome: Result<(), String>,
}

/// Runs every case at both phases on `backend`, prints the table and fails when a case did.
async fn matrix(backend: Backend, url: Option<String>) {
    let started = Instant::now();
    let runs = cases()
        .into_iter()
        .flat_map(|c| [Phase::Before, Phase::After].map(|p| (c.transition, c.step, p, c.run)));
    let rows: Vec<Row> = futures::stream::iter(runs.map(|(transition, step, phase, run)| {
        let url = url.clone();
        async move {
            let exits = Exits::default();
            let node_exits = exits.clone();
            let outcome = tokio::spawn(async move {
                let node = Node::start(backend, url.as_deref(), node_exits).await;
                run(node, phase).await
            })
            .await
            .unwrap_or_else(|panicked| {
                let message = panicked
                    .into_panic()
                    .downcast::<String>()
                    .map(|m| *m)
                    .unwrap_or_else(|_| "panicked".to_owned());
                Err(format!("invariant broken: {message}"))
            });
            Row {
                transition,
                point: point(phase, step),
                exits: exits.lock().clone(),
                outcome,
            }
        }
    }))
    .buffer_unordered(match backend {
        Backend::Sqlite => PARALLEL,
        Backend::Postgres => PARALLEL_POSTGRES,
    })
    .collect()
    .await;
    let mut rows = rows;
    rows.sort_by(|a, b| (a.transition, &a.point).cmp(&(b.transition, &b.point)));
    let mut table = format!(
        "\ncrash matrix on {backend:?} ({} cases, {:.0?})\n\n| transition | store.crash | exited at the point | invariants held |\n|---|---|---|---|\n",
        rows.len(),
        started.elapsed()
    );
    let mut failed = Vec::new();
    for Row {
        transition,
        point,
        exits,
        outcome,
    } in &rows
    {
        let exited = if !exits.is_empty() && exits.iter().all(|e| *e == Some(SIGNAL)) {
            "yes".to_owned()
        } else {
            format!("NO: {exits:?}")
        };
        let held = match outcome {
            Ok(()) => "yes".to_owned(),
            Err(e) => format!("NO: {e}"),
        };
        writeln!(table, "| {transition} | {point} | {exited} | {held} |").unwrap();
        if outcome.is_err() || exited != "yes" {
            failed.push(format!("{transition} {point}"));
        }
    }
    println!("{table}");
    assert!(failed.is_empty(), "cases failed on {backend:?}: {failed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_transition_survives_a_crash_before_and_after_its_commit_on_sqlite() {
    matrix(Backend::Sqlite, None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_transition_survives_a_crash_before_and_after_its_commit_on_postgres() {
    let Some(url) = test_url() else { return };
    matrix(Backend::Postgres, Some(url)).await;
}
