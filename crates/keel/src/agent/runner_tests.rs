//! Tests of the runner: the pure parts, then real `sh` programs against a fake server.

use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;

use super::*;
use crate::agent::report::ReportLimits;

#[test]
fn progress_lines_are_recognised() {
    assert_eq!(
        parse_progress(r#"KEEL_PROGRESS {"pct": 40}"#),
        Some(json!({"pct": 40}))
    );
    assert_eq!(
        parse_progress("KEEL_PROGRESS\t\"copying\"  "),
        Some(json!("copying"))
    );
    assert_eq!(parse_progress("KEEL_PROGRESS 7"), Some(json!(7)));
    assert_eq!(parse_progress("KEEL_PROGRESS {not json"), None);
    assert_eq!(parse_progress("KEEL_PROGRESS"), None);
    assert_eq!(parse_progress(r#"KEEL_PROGRESS{"pct": 1}"#), None);
    assert_eq!(parse_progress(r#" KEEL_PROGRESS {"pct": 1}"#), None);
    assert_eq!(parse_progress("warning: disk almost full"), None);
}

#[test]
fn a_progress_number_is_sent_as_the_program_wrote_it() {
    // The nearest double to 1.1111111111111111e24, which a parser that rounds in two steps
    // misses by one unit in the last place (found by fuzzing).
    let progress =
        parse_progress(r#"KEEL_PROGRESS {"done": 2, "total": 1.1111111111111111e+24}"#).unwrap();
    assert_eq!(progress["total"].as_f64(), Some(1.111_111_111_111_111_1e24));
    assert_eq!(
        parse_progress(&format!("KEEL_PROGRESS {progress}")),
        Some(progress)
    );
}

#[test]
fn lines_are_split_across_chunks_and_cut_when_too_long() {
    let mut lines = LineSplitter::new(8);
    assert!(lines.push(b"hel").is_empty());
    assert_eq!(lines.push(b"lo\r\nwor"), ["hello"]);
    assert_eq!(lines.push(b"ld\n\n"), ["world", ""]);
    assert_eq!(lines.push(b"0123456789abcdef\nend"), ["01234567"]);
    assert_eq!(lines.finish().as_deref(), Some("end"));
    assert_eq!(lines.finish(), None);
}

#[tokio::test]
async fn stdout_is_capped_and_read_to_the_end() {
    let output = Arc::new(Mutex::new(Output::new(&ReportLimits::default())));
    let big = vec![b'a'; STDOUT_LIMIT + 100_000];
    read_stdout(big.as_slice(), Arc::clone(&output)).await;
    let output = output.lock();
    assert_eq!(output.stdout.bytes().len(), STDOUT_LIMIT);
    assert_eq!(output.stdout.seen(), (STDOUT_LIMIT + 100_000) as u64);
    assert!(output.stdout.is_cut());
}

#[tokio::test]
async fn stderr_feeds_progress_and_the_tail() {
    let output = Arc::new(Mutex::new(Output::new(&ReportLimits::default())));
    let stderr = b"starting\nKEEL_PROGRESS {\"pct\": 10}\nKEEL_PROGRESS {\"pct\": 20}\nKEEL_PROGRESS oops\ndone";
    read_stderr(stderr.as_slice(), Arc::clone(&output)).await;
    let output = output.lock();
    assert_eq!(output.progress, Some(json!({"pct": 20})));
    assert_eq!(output.tail.text(), "starting\nKEEL_PROGRESS oops\ndone\n");
}

#[tokio::test]
async fn a_progress_value_over_the_limit_is_dropped_and_the_last_one_that_fit_kept() {
    let limits = ReportLimits {
        progress: 100,
        ..ReportLimits::default()
    };
    let output = Arc::new(Mutex::new(Output::new(&limits)));
    // 60 characters of `1e2` are 180 bytes as written but 300 once parsed and serialised
    // (`100.0`): the measure is the serialised value, as the server's.
    let numbers = vec!["1e2"; 60].join(",");
    let stderr = format!("KEEL_PROGRESS {{\"pct\": 5}}\nKEEL_PROGRESS [{numbers}]\n");
    assert!(stderr.len() < 300);
    read_stderr(stderr.as_bytes(), Arc::clone(&output)).await;
    let output = output.lock();
    assert_eq!(output.progress, Some(json!({"pct": 5})));
    assert_eq!(output.tail.text(), "");
}

#[test]
fn heartbeats_come_every_third_of_the_lease() {
    let floor = Duration::from_secs(1);
    assert_eq!(
        heartbeat_interval(Duration::from_secs(300), floor),
        Duration::from_secs(100)
    );
    assert_eq!(heartbeat_interval(Duration::from_secs(2), floor), floor);
}

#[test]
fn a_claimed_command_loses_its_token_on_the_way_to_the_program() {
    let command = ClaimedCommand::from_json(claimed(30)).unwrap();
    assert_eq!(command.claim_token, "tok-1");
    assert_eq!(command.kind, "restart");
    assert_eq!(command.attempts, 2);
    assert_eq!(command.lease, Duration::from_secs(30));
    assert!(!command.object.contains_key("claim_token"));
    assert_eq!(
        command.object.get("params"),
        Some(&json!({"service": "nginx"}))
    );

    let mut no_token = claimed(30);
    no_token.as_object_mut().unwrap().remove("claim_token");
    assert!(ClaimedCommand::from_json(no_token).is_err());
    assert!(ClaimedCommand::from_json(json!([1])).is_err());
}

// ---- real programs against a fake server ----

const ID: &str = "0193a3c4-0000-7000-8000-000000000001";

fn claimed(lease_seconds: u64) -> Value {
    json!({
        "id": ID,
        "type": "restart",
        "target": {"queue": "deploys"},
        "params": {"service": "nginx"},
        "lease_seconds": lease_seconds,
        "status": "executing",
        "attempts": 2,
        "claim_token": "tok-1",
    })
}

#[derive(Clone, Copy, PartialEq)]
enum HeartbeatMode {
    /// 200, no cancel.
    Renew,
    /// 200 with `cancel_requested` once a heartbeat carries progress.
    CancelAfterProgress,
    /// 409 `stale_claim`.
    Stale,
    /// 503: the server cannot renew the lease.
    Unavailable,
    /// 413 when the heartbeat carries progress, else 200.
    RefuseProgress,
}

#[derive(Default)]
struct Recorded {
    heartbeats: Vec<Value>,
    completes: Vec<Value>,
    fails: Vec<Value>,
    auth: Vec<String>,
}

#[derive(Clone)]
struct Fake {
    recorded: Arc<Mutex<Recorded>>,
    mode: HeartbeatMode,
    /// Reports answered 503 before one is taken.
    unavailable: Arc<AtomicUsize>,
}

type Answer = (StatusCode, Json<Value>);

fn stale() -> Answer {
    (
        StatusCode::CONFLICT,
        Json(json!({"error": {"code": "stale_claim", "message": "stale claim token"}})),
    )
}

fn check(headers: &HeaderMap, fake: &Fake, id: &str) {
    assert_eq!(id, ID);
    let auth = headers
        .get("authorization")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default();
    fake.recorded.lock().auth.push(auth.to_owned());
}

async fn heartbeat(
    State(fake): State<Fake>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Answer {
    check(&headers, &fake, &id);
    let has_progress = body.get("progress").is_some();
    fake.recorded.lock().heartbeats.push(body);
    match fake.mode {
        HeartbeatMode::Stale => stale(),
        HeartbeatMode::Unavailable => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": {"code": "unavailable", "message": "overloaded"}})),
        ),
        HeartbeatMode::RefuseProgress if has_progress => (
            StatusCode::PAYLOAD_TOO_LARGE,
            Json(json!({"error": {"code": "payload_too_large", "message": "progress"}})),
        ),
        mode => {
            let cancel = mode == HeartbeatMode::CancelAfterProgress && has_progress;
            (
                StatusCode::OK,
                Json(
                    json!({"lease_expires_at": "2030-01-01T00:00:00Z", "cancel_requested": cancel}),
                ),
            )
        }
    }
}

async fn report(fake: &Fake, body: Value, complete: bool) -> Answer {
    let unavailable = fake
        .unavailable
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if unavailable {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"error": {"code": "unavailable", "message": "restarting"}})),
        );
    }
    let mut recorded = fake.recorded.lock();
    if complete {
        recorded.completes.push(body);
    } else {
        recorded.fails.push(body);
    }
    (StatusCode::OK, Json(json!({"id": ID})))
}

async fn complete(
    State(fake): State<Fake>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Answer {
    check(&headers, &fake, &id);
    report(&fake, body, true).await
}

async fn fail(
    State(fake): State<Fake>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Answer {
    check(&headers, &fake, &id);
    report(&fake, body, false).await
}

/// Serves heartbeat, complete and fail for the one command; answers its client.
async fn fake_server(mode: HeartbeatMode, unavailable: usize) -> (Client, Fake) {
    let fake = Fake {
        recorded: Arc::default(),
        mode,
        unavailable: Arc::new(AtomicUsize::new(unavailable)),
    };
    let router = axum::Router::new()
        .route("/v1/commands/{id}/heartbeat", post(heartbeat))
        .route("/v1/commands/{id}/complete", post(complete))
        .route("/v1/commands/{id}/fail", post(fail))
        .with_state(fake.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    let client = Client::new(&format!("http://{address}"), "agent-key".into()).unwrap();
    (client, fake)
}

fn shell(script: &str) -> RunnerConfig {
    RunnerConfig {
        heartbeat_floor: Duration::from_millis(20),
        kill_grace: Duration::from_millis(500),
        ..RunnerConfig::new(Program {
            path: PathBuf::from("sh"),
            args: vec!["-c".into(), script.into()],
        })
    }
}

/// Whether process `pid` is gone (a zombie waiting for a parent that never reaps counts).
fn gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

/// Waits up to 5 s for every process of `pids` to be gone (a signal is delivered, and a
/// process ends, a moment after `kill` returns).
async fn all_gone_soon(pids: &[String]) {
    let started = Instant::now();
    while !pids.iter().all(|pid| gone(pid)) {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{pids:?} outlived the stop"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Reads the pids a script wrote to `path` (one per line), waiting up to 10 s for `count`.
async fn pids(path: &std::path::Path, count: usize) -> Vec<String> {
    let started = Instant::now();
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let pids: Vec<String> = text.lines().map(str::to_owned).collect();
        if pids.len() >= count {
            return pids;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "no pids in {path:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs the command to the end, failing the test after 20 s.
async fn run_to_end(
    client: &Client,
    config: &RunnerConfig,
    lease_seconds: u64,
    controls: &Controls,
) -> Outcome {
    let command = ClaimedCommand::from_json(claimed(lease_seconds)).unwrap();
    tokio::time::timeout(
        Duration::from_secs(20),
        run(client, config, command, Instant::now(), controls),
    )
    .await
    .expect("the runner did not finish")
}

#[tokio::test]
async fn exit_0_completes_with_stdout_as_json() {
    let (client, fake) = fake_server(HeartbeatMode::Renew, 0).await;
    let script = r#"input=$(cat)
printf '{"stdin": %s, "id": "%s", "type": "%s", "attempt": %s, "token": "%s"}\n' \
  "$input" "$KEEL_COMMAND_ID" "$KEEL_COMMAND_TYPE" "$KEEL_COMMAND_ATTEMPT" "${KEEL_AGENT_TOKEN:-}""#;
    let outcome = run_to_end(&client, &shell(script), 30, &Controls::default()).await;
    assert_eq!(outcome, Outcome::Completed);

    let recorded = fake.recorded.lock();
    assert!(recorded.fails.is_empty());
    let [body] = recorded.completes.as_slice() else {
        panic!("{:?}", recorded.completes)
    };
    assert_eq!(body["claim_token"], "tok-1");
    let result = &body["result"];
    assert_eq!(result["id"], ID);
    assert_eq!(result["type"], "restart");
    assert_eq!(result["attempt"], 2);
    assert_eq!(result["token"], "");
    assert_eq!(result["stdin"]["params"], json!({"service": "nginx"}));
    assert_eq!(result["stdin"]["id"], ID);
    assert!(result["stdin"].get("claim_token").is_none());
    assert!(recorded.auth.iter().all(|auth| auth == "Bearer agent-key"));
}

#[tokio::test]
async fn a_non_zero_exit_fails_retryable_with_the_stderr_tail() {
    let (client, fake) = fake_server(HeartbeatMode::Renew, 0).await;
    let script = r#"echo "disk full" >&2
echo 'KEEL_PROGRESS {"pct": 50}' >&2
echo "partial output"
exit 3"#;
    let outcome = run_to_end(&client, &shell(script), 30, &Controls::default()).await;
    assert_eq!(outcome, Outcome::Failed);

    let recorded = fake.recorded.lock();
    assert!(recorded.completes.is_empty());
    let [body] = recorded.fails.as_slice() else {
        panic!("{:?}", recorded.fails)
    };
    assert_eq!(body["claim_token"], "tok-1");
    assert_eq!(body["retryable"], true);
    assert_eq!(
        body["error"],
        json!({"exit_code": 3, "signal": null, "stderr_tail": "disk full\n"})
    );
}

#[tokio::test]
async fn a_program_killed_by_a_signal_fails_retryable() {
    let (client, fake) = fake_server(HeartbeatMode::Renew, 0).await;
    let outcome = run_to_end(&client, &shell("kill -9 $$"), 30, &Controls::default()).await;
    assert_eq!(outcome, Outcome::Failed);
    let recorded = fake.recorded.lock();
    let [body] = recorded.fails.as_slice() else {
        panic!("{:?}", recorded.fails)
    };
    assert_eq!(body["retryable"], true);
    assert_eq!(body["error"]["exit_code"], Value::Null);
    assert_eq!(body["error"]["signal"], 9);
}

#[tokio::test]
async fn a_requested_cancel_kills_the_program_and_fails_for_good() {
    let (client, fake) = fake_server(HeartbeatMode::CancelAfterProgress, 0).await;
    let script = r#"echo 'KEEL_PROGRESS {"step": 1}' >&2
exec sleep 60"#;
    let outcome = run_to_end(&client, &shell(script), 1, &Controls::default()).await;
    assert_eq!(outcome, Outcome::Cancelled);

    let recorded = fake.recorded.lock();
    assert!(recorded.completes.is_empty());
    let [body] = recorded.fails.as_slice() else {
        panic!("{:?}", recorded.fails)
    };
    assert_eq!(body["retryable"], false);
    assert_eq!(body["error"], json!({"cancelled": true}));
    let last = recorded.heartbeats.last().unwrap();
    assert_eq!(last["claim_token"], "tok-1");
    assert_eq!(last["progress"], json!({"step": 1}));
}

#[tokio::test]
async fn a_stale_heartbeat_kills_the_program_and_drops_the_command() {
    let (client, fake) = fake_server(HeartbeatMode::Stale, 0).await;
    let outcome = run_to_end(&client, &shell("exec sleep 60"), 1, &Controls::default()).await;
    assert_eq!(outcome, Outcome::LeaseLost);
    let recorded = fake.recorded.lock();
    assert_eq!(recorded.heartbeats.len(), 1);
    assert!(recorded.completes.is_empty() && recorded.fails.is_empty());
}

#[tokio::test]
async fn shutdown_kills_the_program_and_hands_the_command_back() {
    let (client, fake) = fake_server(HeartbeatMode::Renew, 0).await;
    let controls = Controls::default();
    let command = ClaimedCommand::from_json(claimed(1)).unwrap();
    let config = shell("exec sleep 60");
    let running = {
        let client = client.clone();
        let controls = controls.clone();
        tokio::spawn(async move { run(&client, &config, command, Instant::now(), &controls).await })
    };
    // Heartbeats show the program is running.
    let started = Instant::now();
    while fake.recorded.lock().heartbeats.is_empty() {
        assert!(started.elapsed() < Duration::from_secs(10), "no heartbeat");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    controls.kill.cancel();
    let outcome = tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(outcome, Outcome::HandedBack);
    let recorded = fake.recorded.lock();
    let [body] = recorded.fails.as_slice() else {
        panic!("{:?}", recorded.fails)
    };
    assert_eq!(body["retryable"], true);
    assert_eq!(body["error"], json!({"agent_shutdown": true}));
}

#[tokio::test]
async fn a_report_is_retried_while_the_server_is_unavailable() {
    let (client, fake) = fake_server(HeartbeatMode::Renew, 2).await;
    let outcome = run_to_end(&client, &shell("echo done"), 30, &Controls::default()).await;
    assert_eq!(outcome, Outcome::Completed);
    let recorded = fake.recorded.lock();
    let [body] = recorded.completes.as_slice() else {
        panic!("{:?}", recorded.completes)
    };
    assert_eq!(body["result"], json!({"stdout": "done\n"}));
    assert_eq!(fake.unavailable.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_program_that_cannot_start_fails_retryable() {
    let (client, fake) = fake_server(HeartbeatMode::Renew, 0).await;
    let mut config = shell("");
    config.program.path = PathBuf::from("/nonexistent/keel-agent-program");
    let outcome = run_to_end(&client, &config, 30, &Controls::default()).await;
    assert_eq!(outcome, Outcome::Failed);
    let recorded = fake.recorded.lock();
    let [body] = recorded.fails.as_slice() else {
        panic!("{:?}", recorded.fails)
    };
    assert_eq!(body["retryable"], true);
    assert!(body["error"]["spawn_error"].is_string());
}

#[tokio::test]
async fn a_lease_not_renewed_in_time_stops_the_whole_group_and_reports_nothing() {
    let (client, fake) = fake_server(HeartbeatMode::Unavailable, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pids");
    // The program starts a grandchild, then waits; both ignore nothing.
    let script = format!(
        "sleep 60 &\necho $! >> {file}\necho $$ >> {file}\nwait",
        file = file.display()
    );
    let started = Instant::now();
    let outcome = run_to_end(&client, &shell(&script), 1, &Controls::default()).await;
    assert_eq!(outcome, Outcome::LeaseLost);
    // Stopped at the 1 s lease deadline, not when the 60 s sleep ended.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    all_gone_soon(&pids(&file, 2).await).await;
    let recorded = fake.recorded.lock();
    assert!(!recorded.heartbeats.is_empty());
    assert!(recorded.completes.is_empty() && recorded.fails.is_empty());
}

#[tokio::test]
async fn a_cancel_sends_sigterm_then_sigkill_to_the_group_after_the_grace() {
    let (client, fake) = fake_server(HeartbeatMode::CancelAfterProgress, 0).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("pids");
    let termed = dir.path().join("termed");
    // The program notes SIGTERM and ignores it; its grandchild ignores it too.
    let script = format!(
        "trap 'touch {termed}' TERM\n(trap '' TERM; sleep 60) &\necho $! >> {file}\necho $$ >> {file}\n\
         echo 'KEEL_PROGRESS 1' >&2\nwhile true; do sleep 0.05; done",
        file = file.display(),
        termed = termed.display(),
    );
    let mut config = shell(&script);
    config.kill_grace = Duration::from_millis(700);
    let outcome = run_to_end(&client, &config, 1, &Controls::default()).await;
    assert_eq!(outcome, Outcome::Cancelled);
    assert!(termed.exists(), "SIGTERM came first");
    all_gone_soon(&pids(&file, 2).await).await;
    assert_eq!(fake.recorded.lock().fails.len(), 1);
}

#[tokio::test]
async fn the_program_gets_a_cleared_environment() {
    let (client, fake) = fake_server(HeartbeatMode::Renew, 0).await;
    let mut config = shell("env");
    // The test process's own variables: PATH is kept, CARGO_PKG_NAME only when passed.
    config.env_pass = vec!["CARGO_PKG_NAME".to_owned()];
    let outcome = run_to_end(&client, &config, 30, &Controls::default()).await;
    assert_eq!(outcome, Outcome::Completed);
    let recorded = fake.recorded.lock();
    let env = recorded.completes[0]["result"]["stdout"]
        .as_str()
        .unwrap()
        .to_owned();
    let names: Vec<&str> = env
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, _)| name)
        .collect();
    assert!(names.contains(&"PATH"), "{env}");
    assert!(names.contains(&"CARGO_PKG_NAME"), "{env}");
    assert!(names.contains(&"KEEL_COMMAND_ID"), "{env}");
    assert!(!names.contains(&"CARGO_MANIFEST_DIR"), "{env}");
}

#[tokio::test]
async fn a_heartbeat_refused_for_its_progress_is_resent_without_it_and_the_lease_kept() {
    let (client, fake) = fake_server(HeartbeatMode::RefuseProgress, 0).await;
    // Runs past three leases of 1 s while its progress is refused.
    let script = "echo 'KEEL_PROGRESS {\"pct\": 1}' >&2\nsleep 3\necho done";
    let outcome = run_to_end(&client, &shell(script), 1, &Controls::default()).await;
    assert_eq!(outcome, Outcome::Completed);
    let recorded = fake.recorded.lock();
    assert!(
        recorded
            .heartbeats
            .iter()
            .any(|body| body.get("progress").is_some())
    );
    assert!(
        recorded
            .heartbeats
            .last()
            .unwrap()
            .get("progress")
            .is_none()
    );
}
