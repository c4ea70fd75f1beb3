//! Tests of the flags, the check-in data and the claim loop against a fake server.

use super::*;

#[test]
fn queues_are_trimmed_deduplicated_and_checked() {
    let raw = ["deploys", " backups ", "", "deploys", "a.b:c-d_e"].map(String::from);
    assert_eq!(
        queues(&raw).unwrap(),
        ["deploys", "backups", "a.b:c-d_e"].map(String::from)
    );
    assert!(queues(&["has space".to_owned()]).is_err());
    assert!(queues(&["x".repeat(65)]).is_err());
    assert!(queues(&[]).unwrap().is_empty());
}

/// `keel agent`'s flags, parsed on their own.
#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
}

#[test]
fn flags_parse_with_defaults() {
    use clap::Parser;
    let cli = Cli::try_parse_from([
        "keel",
        "--server",
        "http://s",
        "--token",
        "t",
        "--exec",
        "/bin/true",
        "--queues",
        "a,b",
    ])
    .unwrap();
    assert_eq!(cli.agent.queues, ["a", "b"]);
    assert_eq!(token(&cli.agent).unwrap().expose_secret(), "t");
    assert_eq!(cli.agent.concurrency, 1);
    assert_eq!(cli.agent.wait_seconds, 30);
    assert_eq!(cli.agent.shutdown_grace, Duration::from_secs(30));
    assert!(cli.agent.name.is_none());
    assert_eq!(cli.agent.kill_grace, Duration::from_secs(5));
    assert!(cli.agent.env_pass.is_empty());
    let base = ["keel", "--server", "s", "--token", "t", "--exec", "x"];
    let with = |extra: &[&'static str]| Cli::try_parse_from(base.iter().chain(extra));
    let passed = with(&["--env-pass", "AWS_REGION", "--env-pass", "TZ"]).unwrap();
    assert_eq!(passed.agent.env_pass, ["AWS_REGION", "TZ"]);
    // The agent's key never reaches a program; a name must be a variable name.
    assert!(with(&["--env-pass", "KEEL_AGENT_TOKEN"]).is_err());
    assert!(with(&["--env-pass", "A=B"]).is_err());
    assert!(with(&["--env-pass", ""]).is_err());
    assert!(with(&["--kill-grace", "soon"]).is_err());
    assert!(
        Cli::try_parse_from([
            "keel",
            "--server",
            "s",
            "--token",
            "t",
            "--exec",
            "x",
            "--wait-seconds",
            "61"
        ])
        .is_err()
    );
    assert!(
        Cli::try_parse_from([
            "keel",
            "--server",
            "s",
            "--token",
            "t",
            "--exec",
            "x",
            "--concurrency",
            "0"
        ])
        .is_err()
    );
}

#[test]
fn the_token_comes_from_a_file_or_the_flag_never_both_and_never_shows_in_debug() {
    use clap::Parser;
    let secret = "keel_abcdefgh_averysecretagenttokenvalue";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, format!("  {secret}\n")).unwrap();
    let file = file.to_str().unwrap();
    let parse = |credential: &[&str]| {
        let base = ["keel", "--server", "s", "--exec", "x"];
        Cli::try_parse_from(base.iter().chain(credential))
    };
    let from_file = parse(&["--token-file", file]).unwrap();
    assert_eq!(token(&from_file.agent).unwrap().expose_secret(), secret);
    let from_flag = parse(&["--token", secret]).unwrap();
    for args in [&from_file.agent, &from_flag.agent] {
        for shown in [format!("{args:?}"), format!("{args:#?}")] {
            assert!(!shown.contains("averysecret"), "{shown}");
        }
    }
    // Both, neither (without KEEL_AGENT_TOKEN), or a file that cannot be read, are refused.
    assert!(parse(&["--token", "t", "--token-file", file]).is_err());
    if std::env::var_os("KEEL_AGENT_TOKEN").is_none() {
        assert!(parse(&[]).is_err());
    }
    let missing = parse(&["--token-file", "/nonexistent/token"]).unwrap();
    assert!(
        token(&missing.agent)
            .unwrap_err()
            .to_string()
            .contains("/nonexistent/token")
    );
}

#[tokio::test]
async fn metadata_names_the_host_and_process() {
    let metadata = metadata(4).await;
    assert_eq!(metadata["pid"], std::process::id());
    assert_eq!(metadata["concurrency"], 4);
    assert!(metadata.get("hostname").is_some());
}

// ---- the check-in and the claim loop against a fake server ----

mod fake {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use axum::Json;
    use axum::extract::{Path, State};
    use axum::http::StatusCode;
    use axum::response::{IntoResponse, Response};
    use axum::routing::post;
    use parking_lot::Mutex;
    use serde_json::{Value, json};

    use crate::agent::client::Client;

    #[derive(Default)]
    pub struct Server {
        pub pending: VecDeque<Value>,
        pub check_ins: Vec<Value>,
        /// Check-ins answered 503 before this one is answered with `check_in_status`.
        pub check_ins_unavailable: usize,
        /// The `Retry-After` (seconds) those 503s carry.
        pub check_ins_retry_after: Option<u64>,
        /// When each check-in arrived.
        pub check_in_times: Vec<std::time::Instant>,
        pub check_in_status: Option<StatusCode>,
        pub claim_status: Option<StatusCode>,
        /// How long a claim waits before it is answered, as a long poll does.
        pub claim_delay: std::time::Duration,
        pub limits: Vec<u64>,
        pub outstanding: usize,
        pub max_outstanding: usize,
        pub completed: Vec<String>,
        pub fails: Vec<Value>,
    }

    pub type Shared = Arc<Mutex<Server>>;
    type Answer = (StatusCode, Json<Value>);

    fn error(status: StatusCode, code: &str) -> Answer {
        (
            status,
            Json(json!({"error": {"code": code, "message": code}})),
        )
    }

    pub fn command(n: u32, lease_seconds: u64) -> Value {
        json!({
            "id": format!("0193a3c4-0000-7000-8000-{n:012}"),
            "type": "noop",
            "params": {},
            "lease_seconds": lease_seconds,
            "attempts": 1,
            "claim_token": format!("tok-{n}"),
        })
    }

    async fn check_in(State(server): State<Shared>, Json(body): Json<Value>) -> Response {
        let mut server = server.lock();
        server.check_ins.push(body.clone());
        server.check_in_times.push(std::time::Instant::now());
        if server.check_ins_unavailable > 0 {
            server.check_ins_unavailable -= 1;
            let mut answer = error(StatusCode::SERVICE_UNAVAILABLE, "unavailable").into_response();
            if let Some(seconds) = server.check_ins_retry_after {
                answer
                    .headers_mut()
                    .insert(axum::http::header::RETRY_AFTER, seconds.into());
            }
            return answer;
        }
        match server.check_in_status {
            Some(status) => error(status, "unauthorized").into_response(),
            None => (
                StatusCode::OK,
                Json(json!({"id": "agent-1", "boot_id": body["boot_id"]})),
            )
                .into_response(),
        }
    }

    async fn claim(State(server): State<Shared>, Json(body): Json<Value>) -> Answer {
        let delay = server.lock().claim_delay;
        tokio::time::sleep(delay).await;
        let mut server = server.lock();
        if let Some(status) = server.claim_status {
            return error(status, "forbidden");
        }
        let limit = body["limit"].as_u64().unwrap();
        server.limits.push(limit);
        let mut commands = Vec::new();
        while commands.len() < limit as usize {
            let Some(command) = server.pending.pop_front() else {
                break;
            };
            commands.push(command);
        }
        server.outstanding += commands.len();
        server.max_outstanding = server.max_outstanding.max(server.outstanding);
        (StatusCode::OK, Json(json!({"commands": commands})))
    }

    async fn heartbeat() -> Answer {
        (
            StatusCode::OK,
            Json(json!({"lease_expires_at": "2030-01-01T00:00:00Z", "cancel_requested": false})),
        )
    }

    async fn complete(State(server): State<Shared>, Path(id): Path<String>) -> Answer {
        let mut server = server.lock();
        server.outstanding -= 1;
        server.completed.push(id);
        (StatusCode::OK, Json(json!({})))
    }

    async fn fail(State(server): State<Shared>, Json(body): Json<Value>) -> Answer {
        let mut server = server.lock();
        server.outstanding -= 1;
        server.fails.push(body);
        (StatusCode::OK, Json(json!({})))
    }

    pub async fn start(server: Server) -> (Client, Shared) {
        let shared = Arc::new(Mutex::new(server));
        let router = axum::Router::new()
            .route("/v1/agents/check-in", post(check_in))
            .route("/v1/commands/claim", post(claim))
            .route("/v1/commands/{id}/heartbeat", post(heartbeat))
            .route("/v1/commands/{id}/complete", post(complete))
            .route("/v1/commands/{id}/fail", post(fail))
            .with_state(Arc::clone(&shared));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, router).await });
        (
            Client::new(&format!("http://{address}"), "key".into()).unwrap(),
            shared,
        )
    }
}

fn check_in_body() -> CheckIn {
    CheckIn {
        name: Some("web-1".to_owned()),
        version: "0.1.0".to_owned(),
        metadata: json!({"pid": 1}),
        queues: vec!["deploys".to_owned()],
        boot_id: Uuid::new_v4(),
        labels: [("env".to_owned(), "prod".to_owned())].into(),
    }
}

fn agent(client: Client, concurrency: usize, script: &str) -> Agent {
    let mut runner = RunnerConfig::new(Program {
        path: PathBuf::from("sh"),
        args: vec!["-c".into(), script.into()],
    });
    runner.heartbeat_floor = Duration::from_millis(20);
    Agent {
        client,
        queues: vec!["deploys".to_owned()],
        concurrency,
        wait_seconds: 0,
        shutdown_grace: Duration::from_millis(100),
        runner,
        idle_pause: Duration::from_millis(10),
    }
}

/// Polls `condition` every 10 ms for up to 10 s.
async fn until(what: &str, mut condition: impl FnMut() -> bool) {
    let started = Instant::now();
    while !condition() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "timed out: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_first_check_in_rides_out_a_restart() {
    let (client, server) = fake::start(fake::Server {
        check_ins_unavailable: 1,
        ..Default::default()
    })
    .await;
    let body = check_in_body();
    let agent = first_check_in(&client, &body, &CancellationToken::new())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(agent["id"], "agent-1");
    let server = server.lock();
    assert_eq!(server.check_ins.len(), 2);
    let sent = server.check_ins.last().unwrap();
    assert_eq!(sent["name"], "web-1");
    assert_eq!(sent["queues"], json!(["deploys"]));
    assert_eq!(sent["boot_id"], body.boot_id.to_string());
}

#[tokio::test]
async fn the_agent_waits_as_long_as_the_server_s_retry_after_says() {
    let (client, server) = fake::start(fake::Server {
        check_ins_unavailable: 1,
        check_ins_retry_after: Some(2),
        ..Default::default()
    })
    .await;
    first_check_in(&client, &check_in_body(), &CancellationToken::new())
        .await
        .unwrap()
        .unwrap();
    let server = server.lock();
    let [first, second] = server.check_in_times[..] else {
        panic!("{:?}", server.check_in_times);
    };
    // The backoff alone would have retried within 200 ms.
    assert!(
        second - first >= Duration::from_millis(1900),
        "{:?}",
        second - first
    );
}

#[tokio::test]
async fn a_refused_first_check_in_is_fatal_and_says_why() {
    let (client, _server) = fake::start(fake::Server {
        check_in_status: Some(axum::http::StatusCode::UNAUTHORIZED),
        ..Default::default()
    })
    .await;
    let error = first_check_in(&client, &check_in_body(), &CancellationToken::new())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("401") && error.contains("--token"),
        "{error}"
    );
}

#[tokio::test]
async fn claims_never_exceed_the_concurrency_and_every_command_is_reported() {
    let pending = (1..=5).map(|n| fake::command(n, 30)).collect();
    let (client, server) = fake::start(fake::Server {
        pending,
        ..Default::default()
    })
    .await;
    let agent = agent(
        client,
        2,
        "cat >/dev/null; sleep 0.05; echo '{\"ok\": true}'",
    );
    let stop = CancellationToken::new();
    let running = {
        let stop = stop.clone();
        tokio::spawn(async move { agent.run(&stop).await })
    };
    until("all five completed", || server.lock().completed.len() == 5).await;
    stop.cancel();
    running.await.unwrap().unwrap();

    let server = server.lock();
    assert!(server.fails.is_empty(), "{:?}", server.fails);
    assert!(server.max_outstanding <= 2, "{}", server.max_outstanding);
    assert!(server.limits.iter().all(|limit| (1..=2).contains(limit)));
}

#[tokio::test]
async fn a_lease_granted_at_the_end_of_a_long_poll_is_reported_in_full() {
    // The claim is answered 1.5 s after it was sent, with a 1 s lease: the lease runs from the
    // answer, not from the request.
    let (client, server) = fake::start(fake::Server {
        pending: [fake::command(1, 1)].into(),
        claim_delay: Duration::from_millis(1500),
        ..Default::default()
    })
    .await;
    let agent = agent(client, 1, "cat >/dev/null; echo '{\"ok\": true}'");
    let stop = CancellationToken::new();
    let running = {
        let stop = stop.clone();
        tokio::spawn(async move { agent.run(&stop).await })
    };
    until("the command is completed", || {
        server.lock().completed.len() == 1
    })
    .await;
    stop.cancel();
    running.await.unwrap().unwrap();
}

#[tokio::test]
async fn shutdown_hands_back_what_outlives_the_grace() {
    let (client, server) = fake::start(fake::Server {
        pending: [fake::command(1, 30)].into(),
        ..Default::default()
    })
    .await;
    let agent = agent(client, 1, "exec sleep 60");
    let stop = CancellationToken::new();
    let running = {
        let stop = stop.clone();
        tokio::spawn(async move { agent.run(&stop).await })
    };
    until("the command is claimed", || {
        server.lock().pending.is_empty()
    })
    .await;
    stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .unwrap()
        .unwrap()
        .unwrap();

    let server = server.lock();
    let [body] = server.fails.as_slice() else {
        panic!("{:?}", server.fails)
    };
    assert_eq!(body["claim_token"], "tok-1");
    assert_eq!(body["retryable"], true);
    assert_eq!(body["error"], json!({"agent_shutdown": true}));
}

#[tokio::test]
async fn a_refused_claim_stops_the_agent_with_an_error() {
    let (client, _server) = fake::start(fake::Server {
        claim_status: Some(axum::http::StatusCode::FORBIDDEN),
        ..Default::default()
    })
    .await;
    let agent = agent(client, 1, "true");
    let result = tokio::time::timeout(
        Duration::from_secs(10),
        agent.run(&CancellationToken::new()),
    )
    .await
    .unwrap();
    assert!(result.unwrap_err().to_string().contains("403"));
}
