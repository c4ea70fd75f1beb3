//! The commands API over real HTTP: create, idempotency, claim, heartbeat, complete, fail,
//! cancel, leases, dead letters, long-poll, scopes and bad input.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::harness::{Api, Options, Server, poll_until};

/// A server with organisation `acme`, a writer/reader key and one agent `a1` on queue `q1`.
struct Setup {
    server: Server,
    ops: Api,
    agent: Api,
}

async fn setup_with(options: Options) -> Setup {
    let server = Server::start_with(options).await;
    server.create_org("acme");
    let ops = server.key("acme", "commands:write,commands:read", None);
    let agent = server.key("acme", "agent", Some("a1"));
    agent.check_in(&["q1"]).await;
    Setup { server, ops, agent }
}

async fn setup() -> Setup {
    setup_with(Options::default()).await
}

async fn claim(agent: &Api, limit: u32) -> Vec<Value> {
    agent
        .post("/v1/commands/claim", &json!({"limit": limit}), 200)
        .await["commands"]
        .as_array()
        .unwrap()
        .clone()
}

fn id(command: &Value) -> String {
    command["id"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_command_goes_from_pending_to_completed_and_a_stale_token_changes_nothing() {
    let Setup { server, ops, agent } = setup().await;
    let created = ops
        .post(
            "/v1/commands",
            &json!({"type": "restart", "queue": "q1", "params": {"service": "nginx"}}),
            201,
        )
        .await;
    assert_eq!(created["status"], "pending");
    assert_eq!(created["attempts"], 0);
    assert_eq!(created["max_attempts"], 5);
    assert_eq!(created["lease_seconds"], 300);
    assert!(created.get("claim_token").is_none());

    let claimed = claim(&agent, 10).await;
    assert_eq!(claimed.len(), 1);
    let command = &claimed[0];
    assert_eq!(command["status"], "executing");
    assert_eq!(command["attempts"], 1);
    let token = command["claim_token"].as_str().unwrap();
    let path = format!("/v1/commands/{}", id(command));

    // Another agent of the organisation cannot report on it, even with the token.
    let other = server.key("acme", "agent", Some("a2"));
    for (action, body) in [
        ("heartbeat", json!({"claim_token": token})),
        ("complete", json!({"claim_token": token, "result": {}})),
        (
            "fail",
            json!({"claim_token": token, "error": "x", "retryable": false}),
        ),
    ] {
        let refused = other.post(&format!("{path}/{action}"), &body, 409).await;
        assert_eq!(refused["error"]["code"], "stale_claim");
    }
    assert_eq!(ops.get(&path, 200).await["status"], "executing");

    let lease = agent
        .post(
            &format!("{path}/heartbeat"),
            &json!({"claim_token": token, "progress": {"percent": 50}}),
            200,
        )
        .await;
    assert_eq!(lease["cancel_requested"], false);
    assert!(lease["lease_expires_at"].is_string());
    assert_eq!(
        ops.get(&path, 200).await["progress"],
        json!({"percent": 50})
    );

    let done = agent
        .post(
            &format!("{path}/complete"),
            &json!({"claim_token": token, "result": {"ok": true}}),
            200,
        )
        .await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["result"], json!({"ok": true}));

    // A late report with the (now stale) token: 409, nothing changes.
    let before = ops.get(&path, 200).await;
    let error = agent
        .post(
            &format!("{path}/complete"),
            &json!({"claim_token": token, "result": {"ok": false}}),
            409,
        )
        .await;
    assert_eq!(error["error"]["code"], "stale_claim");
    agent
        .post(
            &format!("{path}/fail"),
            &json!({"claim_token": token, "error": "late", "retryable": true}),
            409,
        )
        .await;
    agent
        .post(
            &format!("{path}/heartbeat"),
            &json!({"claim_token": "wrong"}),
            409,
        )
        .await;
    assert_eq!(ops.get(&path, 200).await, before);
}

#[tokio::test]
async fn an_idempotency_key_returns_the_same_command_or_409_for_another_body() {
    let Setup { server, ops, .. } = setup().await;
    let send = |body: Value, key: &'static str| {
        let ops = ops.clone();
        async move {
            let response = ops
                .client
                .post(format!("{}/v1/commands", ops.base))
                .bearer_auth(&ops.token)
                .header("idempotency-key", key)
                .json(&body)
                .send()
                .await
                .unwrap();
            (
                response.status().as_u16(),
                response.json::<Value>().await.unwrap(),
            )
        }
    };
    let body = json!({"type": "run_job", "queue": "q1", "params": {"job": 7}});
    let (status, first) = send(body.clone(), "job-7").await;
    assert_eq!(status, 201);
    let (status, again) = send(body, "job-7").await;
    assert_eq!(status, 200);
    assert_eq!(again["id"], first["id"]);
    let (status, error) = send(
        json!({"type": "run_job", "queue": "q1", "params": {"job": 8}}),
        "job-7",
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(error["error"]["code"], "idempotency_mismatch");
    let list = ops.get("/v1/commands", 200).await;
    assert_eq!(list["items"].as_array().unwrap().len(), 1);
    drop(server);
}

#[tokio::test]
async fn claims_follow_priority_then_age_and_respect_targets_and_run_at() {
    let Setup { server, ops, agent } = setup().await;
    let other = server.key("acme", "agent", Some("a2"));
    other.check_in(&["q1"]).await;
    let a2 = other.check_in(&["q1"]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let low = ops
        .post("/v1/commands", &json!({"type": "t", "queue": "q1"}), 201)
        .await;
    let high = ops
        .post(
            "/v1/commands",
            &json!({"type": "t", "queue": "q1", "priority": 10}),
            201,
        )
        .await;
    let for_a2 = ops
        .post(
            "/v1/commands",
            &json!({"type": "t", "agent_id": a2, "priority": 100}),
            201,
        )
        .await;
    ops.post(
        "/v1/commands",
        &json!({"type": "t", "queue": "q1", "priority": 50, "run_at": "2999-01-01T00:00:00Z"}),
        201,
    )
    .await;
    ops.post("/v1/commands", &json!({"type": "t", "queue": "other"}), 201)
        .await;

    let claimed = claim(&agent, 100).await;
    let ids: Vec<String> = claimed.iter().map(id).collect();
    assert_eq!(ids, vec![id(&high), id(&low)]);
    let claimed = claim(&other, 100).await;
    assert_eq!(
        claimed.iter().map(id).collect::<Vec<_>>(),
        vec![id(&for_a2)]
    );
}

#[tokio::test]
async fn a_retryable_failure_backs_off_and_a_final_one_fails_for_good() {
    let Setup {
        server: _server,
        ops,
        agent,
    } = setup().await;
    let created = ops
        .post(
            "/v1/commands",
            &json!({"type": "t", "queue": "q1", "max_attempts": 2}),
            201,
        )
        .await;
    let path = format!("/v1/commands/{}", id(&created));
    let token = claim(&agent, 1).await[0]["claim_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let failed = agent
        .post(
            &format!("{path}/fail"),
            &json!({"claim_token": token, "error": {"exit_code": 3}, "retryable": true}),
            200,
        )
        .await;
    assert_eq!(failed["status"], "pending");
    assert!(failed["run_at"].as_str().unwrap() > created["run_at"].as_str().unwrap());
    // Not due yet: the backoff holds it back.
    assert!(claim(&agent, 1).await.is_empty());

    let other = ops
        .post(
            "/v1/commands",
            &json!({"type": "t", "queue": "q1", "priority": 1}),
            201,
        )
        .await;
    let claimed = claim(&agent, 1).await;
    assert_eq!(claimed[0]["id"], other["id"]);
    let token = claimed[0]["claim_token"].as_str().unwrap();
    let failed = agent
        .post(
            &format!("/v1/commands/{}/fail", id(&other)),
            &json!({"claim_token": token, "error": "bad params", "retryable": false}),
            200,
        )
        .await;
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["error"], "bad params");
    assert!(failed["finished_at"].is_string());
}

#[tokio::test]
async fn cancel_is_immediate_when_pending_and_reaches_the_agent_when_executing() {
    let Setup {
        server: _server,
        ops,
        agent,
    } = setup().await;
    let pending = ops
        .post("/v1/commands", &json!({"type": "t", "queue": "q1"}), 201)
        .await;
    let cancelled = ops
        .post(
            &format!("/v1/commands/{}/cancel", id(&pending)),
            &json!({}),
            200,
        )
        .await;
    assert_eq!(cancelled["status"], "cancelled");
    ops.post(
        &format!("/v1/commands/{}/cancel", id(&pending)),
        &json!({}),
        409,
    )
    .await;

    let running = ops
        .post("/v1/commands", &json!({"type": "t", "queue": "q1"}), 201)
        .await;
    let token = claim(&agent, 1).await[0]["claim_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let asked = ops
        .post(
            &format!("/v1/commands/{}/cancel", id(&running)),
            &json!({}),
            200,
        )
        .await;
    assert_eq!(asked["status"], "executing");
    assert_eq!(asked["cancel_requested"], true);
    let lease = agent
        .post(
            &format!("/v1/commands/{}/heartbeat", id(&running)),
            &json!({"claim_token": token}),
            200,
        )
        .await;
    assert_eq!(lease["cancel_requested"], true);
    let ended = agent
        .post(
            &format!("/v1/commands/{}/fail", id(&running)),
            &json!({"claim_token": token, "error": {"cancelled": true}, "retryable": false}),
            200,
        )
        .await;
    assert_eq!(ended["status"], "cancelled");
}

#[tokio::test]
async fn a_long_poll_is_woken_by_the_enqueue() {
    let Setup {
        server: _server,
        ops,
        agent,
    } = setup().await;
    let waiting = tokio::spawn({
        let agent = agent.clone();
        async move {
            let started = Instant::now();
            let claimed = agent
                .post(
                    "/v1/commands/claim",
                    &json!({"limit": 1, "wait_seconds": 20}),
                    200,
                )
                .await;
            (claimed, started.elapsed())
        }
    });
    // Let the claim reach the server and start waiting before the enqueue.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let created = ops
        .post("/v1/commands", &json!({"type": "t", "queue": "q1"}), 201)
        .await;
    let (claimed, waited) = waiting.await.unwrap();
    assert_eq!(claimed["commands"][0]["id"], created["id"]);
    assert!(
        waited < Duration::from_secs(10),
        "woken by the enqueue, not the deadline: {waited:?}"
    );

    // Nothing due: the wait ends empty.
    let empty = agent
        .post(
            "/v1/commands/claim",
            &json!({"limit": 1, "wait_seconds": 1}),
            200,
        )
        .await;
    assert_eq!(empty["commands"], json!([]));
}

#[tokio::test]
async fn an_expired_lease_is_released_then_dead_lettered_and_requeued() {
    let Setup { server, ops, agent } = setup_with(Options {
        extra_toml: "[commands]\nrelease_stuck_interval = \"100ms\"\n",
        ..Options::default()
    })
    .await;
    let created = ops
        .post(
            "/v1/commands",
            &json!({"type": "t", "queue": "q1", "max_attempts": 2, "lease_seconds": 5}),
            201,
        )
        .await;
    let path = format!("/v1/commands/{}", id(&created));
    // Two claims whose leases expire without a heartbeat.
    for attempt in 1..=2 {
        poll_until(Duration::from_secs(15), || async {
            let claimed = claim(&agent, 1).await;
            claimed.len() == 1 && claimed[0]["attempts"] == attempt
        })
        .await;
    }
    poll_until(Duration::from_secs(15), || async {
        ops.get(&path, 200).await["status"] == "dead"
    })
    .await;
    let dead = ops.get(&path, 200).await;
    assert_eq!(dead["dead_reason"], "lease_expired");
    assert_eq!(dead["attempts"], 2);
    let listed = ops.get("/v1/commands/dead", 200).await;
    assert_eq!(listed["items"][0]["id"], created["id"]);

    let requeued = ops.post(&format!("{path}/requeue"), &json!({}), 200).await;
    assert_eq!(requeued["status"], "pending");
    assert_eq!(requeued["attempts"], 0);

    // Every release is an audit record.
    let audits = server
        .log_records()
        .into_iter()
        .filter(|r| r["stream"] == "audit" && r["action"] == "command.lease_expired")
        .count();
    assert_eq!(audits, 2);
    let metrics = server.metrics().await;
    assert!(
        metrics.contains(r#"keel_commands_released_total{outcome="dead"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_panicking_release_stuck_tick_is_followed_by_one_that_releases() {
    let Setup { server, ops, agent } = setup_with(Options {
        failpoints: Some("commands.release_stuck=1*panic(release exploded)"),
        extra_toml: "[commands]\nrelease_stuck_interval = \"200ms\"\n",
        ..Options::default()
    })
    .await;
    let created = ops
        .post(
            "/v1/commands",
            &json!({"type": "t", "queue": "q1", "lease_seconds": 5}),
            201,
        )
        .await;
    assert_eq!(claim(&agent, 1).await.len(), 1);
    let path = format!("/v1/commands/{}", id(&created));
    poll_until(Duration::from_secs(15), || async {
        ops.get(&path, 200).await["status"] == "pending"
    })
    .await;
    assert_eq!(ops.get(&path, 200).await["attempts"], 1);
    let jobs = server.admin_get("/v1/admin/jobs").await;
    let job = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == "release-stuck")
        .unwrap()
        .clone();
    assert_eq!(job["failures"], 1, "{job}");
    let metrics = server.metrics().await;
    assert!(
        metrics.contains(r#"keel_panics_total{component="release-stuck"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_admin_can_run_release_stuck_now() {
    let Setup { server, ops, agent } = setup().await;
    let admin = server.key("acme", "admin", None);
    let created = ops
        .post(
            "/v1/commands",
            &json!({"type": "t", "queue": "q1", "lease_seconds": 5}),
            201,
        )
        .await;
    claim(&agent, 1).await;
    ops.post("/v1/commands/release-stuck", &json!({}), 403)
        .await;
    poll_until(Duration::from_secs(15), || async {
        let released = admin
            .post("/v1/commands/release-stuck", &json!({}), 200)
            .await;
        released["released"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["command_id"] == created["id"] && r["outcome"] == "requeued")
    })
    .await;
}

#[tokio::test]
async fn keys_need_their_scope() {
    let Setup { server, ops, agent } = setup().await;
    let reader = server.key("acme", "commands:read", None);
    let anonymous = Api {
        token: String::new(),
        ..reader.clone()
    };
    let forged = Api {
        token: "keel_aaaaaaaa_notarealtokennotarealtokennotarealtoken".to_owned(),
        ..reader.clone()
    };
    let body = json!({"type": "t", "queue": "q1"});
    assert_eq!(
        anonymous.post("/v1/commands", &body, 401).await["error"]["code"],
        "unauthorized"
    );
    forged.post("/v1/commands", &body, 401).await;
    assert_eq!(
        reader.post("/v1/commands", &body, 403).await["error"]["code"],
        "forbidden"
    );
    agent.post("/v1/commands", &body, 403).await;
    ops.post("/v1/commands/claim", &json!({"limit": 1}), 403)
        .await;
    agent.get("/v1/commands", 403).await;
    reader.get("/v1/commands", 200).await;
    reader.get("/v1/agents", 200).await;
}

#[tokio::test]
async fn bad_input_gets_its_documented_error_and_changes_nothing() {
    let Setup {
        server: _server,
        ops,
        agent,
    } = setup().await;
    let command = ops
        .post("/v1/commands", &json!({"type": "t", "queue": "q1"}), 201)
        .await;
    let path = format!("/v1/commands/{}", id(&command));
    let before = ops.get("/v1/commands", 200).await;

    let code = |v: Value| v["error"]["code"].as_str().unwrap().to_owned();
    for limit in [0, 101] {
        let error = agent
            .post("/v1/commands/claim", &json!({"limit": limit}), 422)
            .await;
        assert_eq!(code(error), "validation_failed");
    }
    agent
        .post(
            "/v1/commands/claim",
            &json!({"limit": 1, "wait_seconds": 61}),
            422,
        )
        .await;
    agent
        .post("/v1/commands/claim", &json!({"limit": "one"}), 422)
        .await;
    let many: Vec<String> = (0..65).map(|n| format!("q{n}")).collect();
    agent
        .post(
            "/v1/commands/claim",
            &json!({"limit": 1, "queues": many}),
            422,
        )
        .await;
    agent
        .post(
            "/v1/commands/claim",
            &json!({"limit": 1, "surprise": true}),
            422,
        )
        .await;
    ops.post(
        "/v1/commands",
        &json!({"type": "t", "queue": "q1", "colour": "red"}),
        422,
    )
    .await;
    ops.post("/v1/commands", &json!({"type": "t"}), 422).await;
    ops.post(
        "/v1/commands",
        &json!({"type": "t", "queue": "q1", "agent_id": uuid::Uuid::now_v7()}),
        422,
    )
    .await;
    ops.post(
        "/v1/commands",
        &json!({"type": "has space", "queue": "q1"}),
        422,
    )
    .await;
    ops.post(
        "/v1/commands",
        &json!({"type": "t", "queue": "q1", "max_attempts": 0}),
        422,
    )
    .await;
    ops.post(
        "/v1/commands",
        &json!({"type": "t", "queue": "q1", "lease_seconds": 1}),
        422,
    )
    .await;
    ops.post(
        "/v1/commands",
        &json!({"type": "t", "agent_id": uuid::Uuid::now_v7()}),
        422,
    )
    .await;
    let big = json!({"type": "t", "queue": "q1", "params": {"blob": "x".repeat(70_000)}});
    assert_eq!(
        code(ops.post("/v1/commands", &big, 413).await),
        "payload_too_large"
    );
    agent
        .post(&format!("{path}/heartbeat"), &json!({}), 422)
        .await;
    agent
        .post(&format!("{path}/complete"), &json!({"result": 1}), 422)
        .await;
    assert_eq!(
        code(ops.get("/v1/commands/not-an-id", 400).await),
        "bad_request"
    );
    agent
        .post(
            "/v1/commands/12345/complete",
            &json!({"claim_token": "x"}),
            400,
        )
        .await;
    ops.get(&format!("/v1/commands/{}", uuid::Uuid::now_v7()), 404)
        .await;
    ops.get("/v1/commands?limit=0", 422).await;
    ops.get("/v1/commands?status=sleeping", 422).await;

    // Check-in: a bad queue name, or another agent's name, is refused and renames nothing.
    let boot = uuid::Uuid::new_v4();
    for body in [
        json!({"version": "1", "queues": ["has space"], "boot_id": boot}),
        json!({"version": "1", "queues": [""], "boot_id": boot}),
        json!({"version": "1", "name": "someone-else", "boot_id": boot}),
        json!({"version": "1", "metadata": [1], "boot_id": boot}),
    ] {
        agent.post("/v1/agents/check-in", &body, 422).await;
    }
    let agents = ops.get("/v1/agents", 200).await;
    assert_eq!(agents["agents"][0]["name"], "a1");
    assert_eq!(agents["agents"][0]["queues"], json!(["q1"]));

    assert_eq!(ops.get("/v1/commands", 200).await, before);
    assert_eq!(ops.get(&path, 200).await["status"], "pending");
}

#[tokio::test]
async fn a_panic_or_an_error_inside_the_store_answers_500_and_changes_nothing() {
    let Setup { server, ops, agent } = setup_with(Options {
        failpoints: Some("store.complete=1*panic(store exploded);store.claim=1*return"),
        ..Options::default()
    })
    .await;
    ops.post("/v1/commands", &json!({"type": "t", "queue": "q1"}), 201)
        .await;
    let error = agent
        .post("/v1/commands/claim", &json!({"limit": 1}), 500)
        .await;
    assert_eq!(error["error"]["message"], "internal error");
    let claimed = claim(&agent, 1).await;
    let token = claimed[0]["claim_token"].as_str().unwrap();
    let path = format!("/v1/commands/{}", id(&claimed[0]));

    let body = json!({"claim_token": token, "result": {"ok": true}});
    let error = agent.post(&format!("{path}/complete"), &body, 500).await;
    assert_eq!(error["error"]["code"], "internal");
    assert!(!error.to_string().contains("exploded"));
    assert_eq!(ops.get(&path, 200).await["status"], "executing");
    // The agent's retry with the same token completes it.
    let done = agent.post(&format!("{path}/complete"), &body, 200).await;
    assert_eq!(done["status"], "completed");

    let metrics = server.metrics().await;
    assert!(
        metrics.contains(r#"keel_panics_total{component="http"} 1"#),
        "{metrics}"
    );
    // The injected database error was logged with its detail.
    poll_until(Duration::from_secs(5), || async {
        server.log_records().iter().any(|r| {
            r["message"] == "request failed"
                && r["detail"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("store.claim")
        })
    })
    .await;
}

/// `params` is a JSON object (or left out, or `null`: `{}`), as the OpenAPI document says; a
/// command created with an array or a number would answer a body that breaks the document.
#[tokio::test]
async fn params_that_are_not_an_object_are_refused() {
    let setup = setup().await;
    let ops = &setup.ops;
    for params in [json!([null, null]), json!(5), json!("x"), json!(true)] {
        let body = json!({"type": "t", "queue": "q1", "params": params});
        let error = ops.post("/v1/commands", &body, 422).await;
        assert_eq!(error["error"]["code"], "validation_failed", "{params}");
        let batch = json!({"commands": [{"type": "t", "queue": "q1"}, body]});
        let error = ops.post("/v1/commands/batch", &batch, 422).await;
        assert!(
            error["error"]["message"]
                .as_str()
                .unwrap()
                .starts_with("commands[1]: params"),
            "{error}"
        );
    }
    let page = ops.get("/v1/commands", 200).await;
    assert_eq!(page["items"], json!([]), "nothing was created");
    for params in [json!(null), json!({"a": [1]})] {
        let body = json!({"type": "t", "queue": "q1", "params": params});
        ops.post("/v1/commands", &body, 201).await;
    }
}
