//! Real processes end to end: `keel serve` plus `keel agent` running a real script.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Api, Options, Server, pipe_to_test_output, poll_until};

/// A `keel agent` process, killed when dropped.
pub(crate) struct AgentProcess {
    child: Option<Child>,
}

impl AgentProcess {
    /// Starts `keel agent`; its programs get `KEEL_TEST_DIR`, the server's directory.
    pub(crate) fn start(server: &Server, key: &Api, script: &Path, args: &[&str]) -> AgentProcess {
        Self::start_with_env(server, key, script, args, &[])
    }

    pub(crate) fn start_with_env(
        server: &Server,
        key: &Api,
        script: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> AgentProcess {
        let mut command = Self::command(server, script, args, env);
        command.env("KEEL_AGENT_TOKEN", &key.token);
        Self::spawn(command)
    }

    /// `keel agent` with its flags but no token.
    fn command(server: &Server, script: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
        command
            .arg("agent")
            .arg("--server")
            .arg(&server.base)
            .arg("--exec")
            .arg(script)
            .args(["--wait-seconds", "5", "--log-level", "warn"])
            .args(["--env-pass", "KEEL_TEST_DIR"])
            .args(args)
            .env_remove("KEEL_AGENT_TOKEN")
            .envs(env.iter().copied())
            .env("KEEL_TEST_DIR", server.dir.path())
            .current_dir(server.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    fn spawn(mut command: Command) -> AgentProcess {
        let mut child = command.spawn().unwrap();
        pipe_to_test_output(child.stderr.take().unwrap(), "keel agent");
        AgentProcess { child: Some(child) }
    }

    /// Sends SIGTERM, as a service manager or a first Ctrl-C would.
    fn terminate(&self) {
        let pid = self.child.as_ref().unwrap().id();
        let status = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the agent to exit, at most `deadline`.
    async fn wait_exit(&mut self, deadline: Duration) -> std::process::ExitStatus {
        let child = self.child.as_mut().unwrap();
        let started = std::time::Instant::now();
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status;
            }
            assert!(started.elapsed() < deadline, "keel agent did not exit");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Whether the agent is still running.
    pub(crate) fn still_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    /// SIGKILL: the agent dies mid-command without a word.
    pub(crate) fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill().unwrap();
            child.wait().unwrap();
        }
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Writes an executable shell script into the server's directory.
pub(crate) fn script(server: &Server, name: &str, body: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = server.dir.path().join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

async fn command(ops: &Api, id: &str) -> Value {
    ops.get(&format!("/v1/commands/{id}"), 200).await
}

/// Releases expired leases every 100 ms, so lease expiry is seen quickly.
const FAST_RELEASE: &str = "[commands]\nrelease_stuck_interval = \"100ms\"\n";

#[tokio::test]
async fn a_thousand_commands_two_agents_every_one_completed_once() {
    let server = Server::start().await;
    server.create_org("acme");
    let ops = server.key("acme", "commands:write,commands:read", None);
    let one = server.key("acme", "agent", Some("one"));
    let two = server.key("acme", "agent", Some("two"));
    let id_one = one.check_in(&["work"]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let id_two = two.check_in(&["work"]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // Each run appends its command id and attempt to runs.log, then prints a JSON result.
    let runs = server.dir.path().join("runs.log");
    let work = script(
        &server,
        "work.sh",
        "cat > /dev/null\necho \"$KEEL_COMMAND_ID $KEEL_COMMAND_ATTEMPT\" >> \"$KEEL_TEST_DIR/runs.log\"\necho \"{\\\"ran\\\": \\\"$KEEL_COMMAND_ID\\\", \\\"type\\\": \\\"$KEEL_COMMAND_TYPE\\\"}\"",
    );

    let mut ids = Vec::new();
    for n in 0..1000 {
        let target = match n % 3 {
            0 => json!({"agent_id": id_one}),
            1 => json!({"agent_id": id_two}),
            _ => json!({"queue": "work"}),
        };
        let mut body = json!({"type": "run_job", "params": {"n": n}});
        body.as_object_mut()
            .unwrap()
            .extend(target.as_object().unwrap().clone());
        ids.push(
            ops.post("/v1/commands", &body, 201).await["id"]
                .as_str()
                .unwrap()
                .to_owned(),
        );
    }
    let _agents = [
        AgentProcess::start(
            &server,
            &one,
            &work,
            &["--queues", "work", "--concurrency", "4"],
        ),
        AgentProcess::start(
            &server,
            &two,
            &work,
            &["--queues", "work", "--concurrency", "4"],
        ),
    ];

    poll_until(Duration::from_secs(240), || async {
        let page = ops
            .get("/v1/commands?status=completed&limit=500", 200)
            .await;
        let second = match page["next_cursor"].as_str() {
            Some(cursor) => ops
                .get(
                    &format!("/v1/commands?status=completed&limit=500&cursor={cursor}"),
                    200,
                )
                .await["items"]
                .as_array()
                .unwrap()
                .len(),
            None => 0,
        };
        page["items"].as_array().unwrap().len() + second >= 1000
    })
    .await;

    // Every command completed exactly once, by a run of its own, with its result stored.
    let log = std::fs::read_to_string(&runs).unwrap();
    let mut seen = std::collections::HashMap::new();
    for line in log.lines() {
        let (id, attempt) = line.split_once(' ').unwrap();
        assert_eq!(attempt, "1", "no command needed a second attempt: {line}");
        *seen.entry(id.to_owned()).or_insert(0) += 1;
    }
    assert_eq!(seen.len(), 1000);
    assert!(seen.values().all(|&runs| runs == 1));
    for id in ids.iter().step_by(37) {
        let done = command(&ops, id).await;
        assert_eq!(done["status"], "completed");
        assert_eq!(done["attempts"], 1);
        assert_eq!(done["result"]["ran"], id.as_str());
        assert_eq!(done["result"]["type"], "run_job");
        // Targeted commands ran on their own agent.
        if let Some(agent) = done["target"]["agent_id"].as_str() {
            assert_eq!(done["claimed_by"], agent);
        }
    }
    // No report was refused as stale: each claim token completed once.
    let metrics = server.metrics().await;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("keel_http_requests_total") && l.contains("status=\"409\"")),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_killed_agents_command_is_rerun_by_the_other_agent_after_its_lease_expires() {
    let server = Server::start_with(Options {
        extra_toml: FAST_RELEASE,
        ..Options::default()
    })
    .await;
    server.create_org("acme");
    let ops = server.key("acme", "commands:write,commands:read", None);
    let first = server.key("acme", "agent", Some("first"));
    let second = server.key("acme", "agent", Some("second"));
    // The first attempt signals that it started, then takes long enough to be killed mid-way.
    let work = script(
        &server,
        "work.sh",
        "cat > /dev/null\nif [ \"$KEEL_COMMAND_ATTEMPT\" = 1 ]; then touch \"$KEEL_TEST_DIR/started\"; sleep 8; fi\necho '{\"done\": true}'",
    );
    let created = ops
        .post(
            "/v1/commands",
            &json!({"type": "deploy", "queue": "work", "lease_seconds": 5}),
            201,
        )
        .await;
    let id = created["id"].as_str().unwrap();

    let mut doomed = AgentProcess::start(&server, &first, &work, &["--queues", "work"]);
    let started = server.dir.path().join("started");
    poll_until(Duration::from_secs(20), || async { started.exists() }).await;
    doomed.kill9();
    assert_eq!(command(&ops, id).await["status"], "executing");

    let _survivor = AgentProcess::start(&server, &second, &work, &["--queues", "work"]);
    poll_until(Duration::from_secs(30), || async {
        command(&ops, id).await["status"] == "completed"
    })
    .await;
    let done = command(&ops, id).await;
    assert_eq!(done["attempts"], 2);
    assert_eq!(done["result"], json!({"done": true}));
    let survivor_id = second.check_in(&["work"]).await["id"].clone();
    assert_eq!(done["claimed_by"], survivor_id);
}

#[tokio::test]
async fn a_command_whose_agent_always_dies_ends_dead_with_lease_expired() {
    let server = Server::start_with(Options {
        extra_toml: FAST_RELEASE,
        ..Options::default()
    })
    .await;
    server.create_org("acme");
    let ops = server.key("acme", "commands:write,commands:read", None);
    let agent = server.key("acme", "agent", Some("fragile"));
    let work = script(
        &server,
        "work.sh",
        "cat > /dev/null\ntouch \"$KEEL_TEST_DIR/started-$KEEL_COMMAND_ATTEMPT\"\nsleep 8",
    );
    let created = ops
        .post(
            "/v1/commands",
            &json!({"type": "t", "queue": "work", "lease_seconds": 5, "max_attempts": 2}),
            201,
        )
        .await;
    let id = created["id"].as_str().unwrap();
    for attempt in 1..=2 {
        let mut process = AgentProcess::start(&server, &agent, &work, &["--queues", "work"]);
        let started = server.dir.path().join(format!("started-{attempt}"));
        poll_until(Duration::from_secs(30), || async { started.exists() }).await;
        process.kill9();
    }
    poll_until(Duration::from_secs(30), || async {
        command(&ops, id).await["status"] == "dead"
    })
    .await;
    let dead = command(&ops, id).await;
    assert_eq!(dead["dead_reason"], "lease_expired");
    assert_eq!(dead["attempts"], 2);
    let listed = ops.get("/v1/commands/dead", 200).await;
    assert_eq!(listed["items"][0]["id"], created["id"]);
}

#[tokio::test]
async fn accepted_commands_survive_a_server_kill_and_are_run_after_the_restart() {
    let mut server = Server::start().await;
    server.create_org("acme");
    let ops = server.key("acme", "commands:write,commands:read", None);
    let agent = server.key("acme", "agent", Some("steady"));
    agent.check_in(&["work"]).await;
    let mut ids = Vec::new();
    for n in 0..50 {
        let created = ops
            .post(
                "/v1/commands",
                &json!({"type": "t", "queue": "work", "params": {"n": n}}),
                201,
            )
            .await;
        ids.push(created["id"].as_str().unwrap().to_owned());
    }
    server.kill9();
    server.restart().await;

    let work = script(&server, "work.sh", "cat > /dev/null\necho '{\"ok\": true}'");
    let _agent = AgentProcess::start(
        &server,
        &agent,
        &work,
        &["--queues", "work", "--concurrency", "4"],
    );
    poll_until(Duration::from_secs(60), || async {
        let page = ops
            .get("/v1/commands?status=completed&limit=100", 200)
            .await;
        page["items"].as_array().unwrap().len() == 50
    })
    .await;
    for id in &ids {
        assert_eq!(command(&ops, id).await["result"], json!({"ok": true}));
    }
}

/// Whether process `pid` is gone (a zombie left to a parent that does not reap counts).
fn gone(pid: &str) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}

#[tokio::test]
async fn a_lost_lease_stops_the_program_and_its_grandchildren() {
    let mut server = Server::start().await;
    server.create_org("acme");
    let (_agent, pids) = start_waiting_program(&server, "cut-off", &["--kill-grace", "1s"]).await;

    // No renewal can succeed now: within the 5 s lease (and the 1 s kill grace) the agent
    // stops the whole group, grandchild included.
    server.kill9();
    poll_until(Duration::from_secs(15), || async {
        pids.iter().all(|pid| gone(pid))
    })
    .await;
}

/// Starts a command whose program runs a background grandchild and waits, under `agent`;
/// answers the program's and the grandchild's pids once both run.
async fn start_waiting_program(
    server: &Server,
    name: &str,
    args: &[&str],
) -> (AgentProcess, Vec<String>) {
    let ops = server.key("acme", "commands:write,commands:read", None);
    let agent = server.key("acme", "agent", Some(name));
    let work = script(
        server,
        "work.sh",
        "cat > /dev/null\nsleep 300 &\necho $! > \"$KEEL_TEST_DIR/pids.tmp\"\necho $$ >> \"$KEEL_TEST_DIR/pids.tmp\"\nmv \"$KEEL_TEST_DIR/pids.tmp\" \"$KEEL_TEST_DIR/pids\"\nwait",
    );
    ops.post(
        "/v1/commands",
        &json!({"type": "t", "queue": "work", "lease_seconds": 5}),
        201,
    )
    .await;
    let mut all_args = vec!["--queues", "work"];
    all_args.extend_from_slice(args);
    let process = AgentProcess::start(server, &agent, &work, &all_args);
    let pids_file = server.dir.path().join("pids");
    poll_until(Duration::from_secs(20), || async { pids_file.exists() }).await;
    let pids: Vec<String> = std::fs::read_to_string(&pids_file)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(pids.len(), 2);
    assert!(pids.iter().all(|pid| !gone(pid)));
    (process, pids)
}

#[tokio::test]
async fn a_second_signal_kills_the_programs_whole_group_as_the_agent_exits() {
    let server = Server::start().await;
    server.create_org("acme");
    let (mut agent, pids) =
        start_waiting_program(&server, "impatient", &["--shutdown-grace", "60s"]).await;
    agent.terminate();
    // The first signal waits for the program (60 s grace): it is still there a moment later.
    // (The pause also keeps two back-to-back signals from arriving as one.)
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(pids.iter().all(|pid| !gone(pid)));
    agent.terminate();
    let status = agent.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(2));
    poll_until(Duration::from_secs(5), || async {
        pids.iter().all(|pid| gone(pid))
    })
    .await;
}

/// Queues one command (`command`, on queue `work`), runs `keel agent` with `program` (after
/// `cat > /dev/null`) until the command is finished, and answers the command.
async fn run_one(
    server: &Server,
    agent: &Api,
    program: &str,
    command: Value,
    env: &[(&str, &str)],
    args: &[&str],
) -> Value {
    let ops = server.key("acme", "commands:write,commands:read", None);
    let work = script(server, "work.sh", &format!("cat > /dev/null\n{program}"));
    let mut body = json!({"type": "t", "queue": "work"});
    body.as_object_mut()
        .unwrap()
        .extend(command.as_object().unwrap().clone());
    let created = ops.post("/v1/commands", &body, 201).await;
    let id = created["id"].as_str().unwrap();
    let mut all_args = vec!["--queues", "work"];
    all_args.extend_from_slice(args);
    let _agent = AgentProcess::start_with_env(server, agent, &work, &all_args, env);
    poll_until(Duration::from_secs(40), || async {
        let status = self::command(&ops, id).await["status"].clone();
        status == "completed" || status == "failed" || status == "dead"
    })
    .await;
    self::command(&ops, id).await
}

#[tokio::test]
async fn the_program_sees_only_the_allowed_environment() {
    let server = Server::start().await;
    server.create_org("acme");
    let agent = server.key("acme", "agent", Some("clean"));
    let done = run_one(
        &server,
        &agent,
        "env",
        json!({}),
        &[("KEEL_SECRET_X", "1"), ("KEEL_PASSED_Y", "yes")],
        &["--env-pass", "KEEL_PASSED_Y"],
    )
    .await;
    assert_eq!(done["status"], "completed", "{done}");
    let id = done["id"].as_str().unwrap();
    let env = done["result"]["stdout"].as_str().unwrap();
    let names: Vec<&str> = env
        .lines()
        .filter_map(|line| line.split_once('='))
        .map(|(name, _)| name)
        .collect();
    assert!(env.lines().any(|line| line == "KEEL_PASSED_Y=yes"), "{env}");
    assert!(
        env.lines()
            .any(|line| line == format!("KEEL_COMMAND_ID={id}")),
        "{env}"
    );
    assert!(names.contains(&"PATH"), "{env}");
    assert!(!names.contains(&"KEEL_SECRET_X"), "{env}");
    assert!(!names.contains(&"KEEL_AGENT_TOKEN"), "{env}");
}

#[tokio::test]
async fn a_program_printing_700_kb_completes_with_the_end_of_its_output() {
    let server = Server::start().await;
    server.create_org("acme");
    let agent = server.key("acme", "agent", Some("chatty"));
    let program = "head -c 700000 /dev/zero | tr '\\0' 'a'\necho\necho THE-END";
    let done = run_one(&server, &agent, program, json!({}), &[], &[]).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["attempts"], 1);
    let result = &done["result"];
    assert_eq!(result["stdout_truncated"], true);
    assert_eq!(result["stdout_bytes"], 700_000 + 1 + 8);
    let stdout = result["stdout"].as_str().unwrap();
    assert!(
        stdout.starts_with("[keel agent: output truncated; the last "),
        "{}",
        stdout.get(..80).unwrap_or(stdout)
    );
    assert!(stdout.ends_with("aaaa\nTHE-END\n"));
    // As much as the default 64 KiB limit takes, less the agent's margin.
    let size = serde_json::to_vec(result).unwrap().len();
    assert!((60_000..=64 * 1024).contains(&size), "{size}");
}

#[tokio::test]
async fn an_oversize_progress_line_costs_neither_the_lease_nor_the_attempt() {
    let server = Server::start_with(Options {
        extra_toml: FAST_RELEASE,
        ..Options::default()
    })
    .await;
    server.create_org("acme");
    let agent = server.key("acme", "agent", Some("busy"));
    // 60 KB as written; 90 KB once the server parses and re-serialises it (`1e2` -> `100.0`).
    // The program runs past its 5 s lease, so the lease must be renewed.
    let program = "echo 'KEEL_PROGRESS {\"pct\": 10}' >&2\nprintf 'KEEL_PROGRESS [%s]\\n' \"$(yes 1e2 | head -n 15000 | paste -sd, -)\" >&2\nsleep 8\necho done";
    let command = json!({"lease_seconds": 5});
    let done = run_one(&server, &agent, program, command, &[], &[]).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["attempts"], 1);
    assert_eq!(done["result"], json!({"stdout": "done\n"}));
    // The last progress that fit is the one the server kept.
    assert_eq!(done["progress"], json!({"pct": 10}));
    // No heartbeat was refused.
    let metrics = server.metrics().await;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("keel_http_requests_total")
                && (l.contains("status=\"413\"") || l.contains("status=\"409\""))),
        "{metrics}"
    );
}

#[tokio::test]
async fn agents_learn_the_configured_limits_at_check_in_and_keep_to_them() {
    let server = Server::start_with(Options {
        extra_toml: "[commands.limits]\nresult_bytes = 2048\nprogress_bytes = 1024\n",
        ..Options::default()
    })
    .await;
    server.create_org("acme");
    let agent = server.key("acme", "agent", Some("small"));
    let checked_in = agent.check_in(&["work"]).await;
    assert_eq!(
        checked_in["limits"],
        json!({"params_bytes": 65536, "result_bytes": 2048, "error_bytes": 65536, "progress_bytes": 1024})
    );
    // The server refuses a larger result itself.
    let program = "head -c 10000 /dev/zero | tr '\\0' 'b'\necho THE-END";
    let done = run_one(&server, &agent, program, json!({}), &[], &[]).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["attempts"], 1);
    let size = serde_json::to_vec(&done["result"]).unwrap().len();
    assert!((1500..=2048).contains(&size), "{size}");
    assert!(
        done["result"]["stdout"]
            .as_str()
            .unwrap()
            .ends_with("bbbTHE-END\n")
    );
}

#[tokio::test]
async fn the_server_holds_every_report_to_its_configured_limit() {
    let server = Server::start_with(Options {
        extra_toml: "[commands.limits]\nparams_bytes = 1024\nresult_bytes = 2048\nerror_bytes = 1500\nprogress_bytes = 1200\n",
        ..Options::default()
    })
    .await;
    server.create_org("acme");
    let ops = server.key("acme", "commands:write,commands:read", None);
    let agent = server.key("acme", "agent", Some("strict"));
    agent.check_in(&["work"]).await;
    let text = |bytes: usize| "x".repeat(bytes);
    // `{"s":"…"}` is 8 bytes around the text.
    let refused = ops
        .post(
            "/v1/commands",
            &json!({"type": "t", "queue": "work", "params": {"s": text(1017)}}),
            413,
        )
        .await;
    assert_eq!(refused["error"]["code"], "payload_too_large");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("`params` is larger than 1024 bytes"),
        "{refused}"
    );
    ops.post(
        "/v1/commands",
        &json!({"type": "t", "queue": "work", "params": {"s": text(1016)}}),
        201,
    )
    .await;
    let claimed = agent
        .post("/v1/commands/claim", &json!({"limit": 1}), 200)
        .await;
    let id = claimed["commands"][0]["id"].as_str().unwrap().to_owned();
    let token = claimed["commands"][0]["claim_token"].clone();
    let at = |route: &str| format!("/v1/commands/{id}/{route}");
    for (route, field, limit) in [
        ("heartbeat", "progress", 1200),
        ("complete", "result", 2048),
        ("fail", "error", 1500),
    ] {
        let body = json!({"claim_token": token, field: {"s": text(limit - 7)}, "retryable": true});
        let mut body = body.as_object().unwrap().clone();
        if route != "fail" {
            body.remove("retryable");
        }
        let refused = agent.post(&at(route), &Value::Object(body), 413).await;
        let message = refused["error"]["message"].as_str().unwrap();
        assert!(
            message.contains(&format!("`{field}` is larger than {limit} bytes")),
            "{message}"
        );
    }
    // Measured as serialised: 200 numbers written `1e2` (3 bytes) count as `100.0` (5 bytes).
    let numbers: Vec<Value> = vec![json!(1e2); 200];
    let written = format!(
        "{{\"claim_token\":{token},\"progress\":[{}]}}",
        vec!["1e2"; 200].join(",")
    );
    assert!(written.len() < 1200);
    assert!(serde_json::to_vec(&numbers).unwrap().len() > 1200);
    let response = agent
        .client
        .post(format!("{}{}", agent.base, at("heartbeat")))
        .bearer_auth(&agent.token)
        .header("content-type", "application/json")
        .body(written)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 413);
    // Nothing changed: the command completes with a result within the limit.
    agent
        .post(
            &at("complete"),
            &json!({"claim_token": token, "result": {"s": text(2040)}}),
            200,
        )
        .await;
}

#[tokio::test]
async fn an_agent_reads_its_token_from_a_file() {
    use std::os::unix::fs::PermissionsExt;
    let server = Server::start().await;
    server.create_org("acme");
    let ops = server.key("acme", "commands:write,commands:read", None);
    let agent = server.key("acme", "agent", Some("filed"));
    let token_file = server.dir.path().join("agent-token");
    std::fs::write(&token_file, format!("{}\n", agent.token)).unwrap();
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).unwrap();
    let work = script(&server, "ok.sh", "cat > /dev/null\necho '{\"ok\": true}'");
    let id = ops
        .post("/v1/commands", &json!({"type": "t", "queue": "q"}), 201)
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let token_file = token_file.to_str().unwrap();
    let _agent = AgentProcess::spawn(AgentProcess::command(
        &server,
        &work,
        &["--queues", "q", "--token-file", token_file],
        &[],
    ));
    poll_until(Duration::from_secs(20), || async {
        command(&ops, &id).await["status"] == "completed"
    })
    .await;
    assert_eq!(command(&ops, &id).await["result"], json!({"ok": true}));
}

#[tokio::test]
async fn a_token_on_the_command_line_is_warned_about_and_never_printed() {
    let server = Server::start().await;
    let bogus = "keel_zzzzzzzz_notarealtokennotarealtokennotareal";
    let run = |on_command_line: bool| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_keel"));
        command
            .args(["agent", "--server", &server.base, "--exec", "/bin/true"])
            .env_remove("KEEL_AGENT_TOKEN")
            .stdin(Stdio::null());
        if on_command_line {
            command.args(["--token", bogus]);
        } else {
            command.env("KEEL_AGENT_TOKEN", bogus);
        }
        command.output().unwrap()
    };
    let warning = "visible to every local user";
    let flagged = run(true);
    let from_env = run(false);
    for output in [&flagged, &from_env] {
        // The server refuses the key: the agent stops, saying so, without printing it.
        assert!(!output.status.success());
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("401"), "{stderr}");
        assert!(!stderr.contains("notarealtoken"), "{stderr}");
        assert!(!String::from_utf8_lossy(&output.stdout).contains("notarealtoken"));
    }
    assert!(String::from_utf8_lossy(&flagged.stderr).contains(warning));
    assert!(!String::from_utf8_lossy(&from_env.stderr).contains(warning));
}
