//! The queue core over real HTTP: batch creates (all or nothing), batch reports (each on its
//! own), the attempt history, and a claim whose client left being handed back at once.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{Options, Server, poll_until};

fn ids(commands: &Value) -> Vec<String> {
    commands
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_batch_is_created_whole_or_not_at_all_and_reports_are_taken_one_by_one() {
    let server = Server::start().await;
    server.create_org("acme");
    let ops = server.key("acme", "commands:write,commands:read", None);
    let agent = server.key("acme", "agent", Some("a1"));
    agent.check_in(&["q1"]).await;

    // One bad item: 422 naming it, nothing created.
    let bad = ops
        .post(
            "/v1/commands/batch",
            &json!({"commands": [
                {"type": "a", "queue": "q1"},
                {"type": "b", "queue": "not a queue"},
            ]}),
            422,
        )
        .await;
    let message = bad["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("commands[1]"), "{message}");
    let listed = ops.get("/v1/commands", 200).await;
    assert!(listed["items"].as_array().unwrap().is_empty());
    ops.post("/v1/commands/batch", &json!({"commands": []}), 422)
        .await;
    let too_many: Vec<Value> = (0..1001)
        .map(|_| json!({"type": "a", "queue": "q1"}))
        .collect();
    ops.post("/v1/commands/batch", &json!({"commands": too_many}), 422)
        .await;

    // 300 in one request, in order.
    let batch: Vec<Value> = (0..300)
        .map(|n| json!({"type": "work", "queue": "q1", "params": {"n": n}}))
        .collect();
    let created = ops
        .post("/v1/commands/batch", &json!({"commands": batch}), 201)
        .await;
    let created = created["commands"].as_array().unwrap();
    assert_eq!(created.len(), 300);
    for (n, command) in created.iter().enumerate() {
        assert_eq!(command["params"]["n"], n);
        assert_eq!(command["status"], "pending");
    }

    // Claim 3; report them in one request, one with a stale token.
    let claimed = agent
        .post("/v1/commands/claim", &json!({"limit": 3}), 200)
        .await["commands"]
        .clone();
    let claimed_ids = ids(&claimed);
    let token = |n: usize| claimed[n]["claim_token"].as_str().unwrap().to_owned();
    let results = agent
        .post(
            "/v1/commands/reports",
            &json!({"reports": [
                {"id": claimed_ids[0], "claim_token": token(0), "outcome": "completed", "result": {"ok": 1}},
                {"id": claimed_ids[1], "claim_token": "stale", "outcome": "completed"},
                {"id": claimed_ids[2], "claim_token": token(2), "outcome": "failed", "error": {"exit": 3}, "retryable": true},
            ]}),
            200,
        )
        .await;
    let results = results["results"].as_array().unwrap();
    assert_eq!(results[0]["status"], "completed");
    assert_eq!(results[1]["error"]["code"], "stale_claim");
    assert_eq!(results[2]["status"], "pending");
    let first = ops
        .get(&format!("/v1/commands/{}", claimed_ids[0]), 200)
        .await;
    assert_eq!(first["result"], json!({"ok": 1}));
    let stale = ops
        .get(&format!("/v1/commands/{}", claimed_ids[1]), 200)
        .await;
    assert_eq!(stale["status"], "executing");

    // The failed one shows its attempt.
    let failed = ops
        .get(&format!("/v1/commands/{}", claimed_ids[2]), 200)
        .await;
    let history = failed["attempt_history"].as_array().unwrap();
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["attempt"], 1);
    assert_eq!(history[0]["outcome"], "retry");
    assert_eq!(history[0]["error"], json!({"exit": 3}));
    assert!(history[0]["ended_at"].is_string());

    // Reports need an agent key.
    ops.post(
        "/v1/commands/reports",
        &json!({"reports": [{"id": claimed_ids[1], "claim_token": "x", "outcome": "completed"}]}),
        403,
    )
    .await;

    // A batch retried with its Idempotency-Key answers the same commands.
    let keyed = |expect| {
        let ops = &ops;
        async move {
            let response = ops
                .client
                .post(format!("{}/v1/commands/batch", ops.base))
                .bearer_auth(&ops.token)
                .header("idempotency-key", "batch-7")
                .json(&json!({"commands": [{"type": "x", "queue": "q1"}, {"type": "y", "queue": "q1"}]}))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status().as_u16(), expect);
            ids(&response.json::<Value>().await.unwrap()["commands"])
        }
    };
    let first = keyed(201).await;
    assert_eq!(keyed(200).await, first);
}

/// A claim whose client disconnects after the claim committed leaves the command pending again
/// at once, with its attempts unchanged.
#[tokio::test]
async fn a_claim_whose_client_left_is_handed_back_at_once() {
    // Every commit waits 1.5 s, so the client can give up while its claim commits; slow
    // commits must not make keel shed the test's own create.
    let server = Server::start_with(Options {
        failpoints: Some("store.commit=sleep(1500)"),
        extra_toml: "[overload.pressure]\nelevated_commit_latency = \"1h\"\n\
                     critical_commit_latency = \"2h\"\n",
        ..Options::default()
    })
    .await;
    server.create_org("acme");
    let ops = server.key("acme", "commands:write,commands:read", None);
    let agent = server.key("acme", "agent", Some("a1"));
    agent.check_in(&["q1"]).await;
    let id = ops
        .post("/v1/commands", &json!({"type": "x", "queue": "q1"}), 201)
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned();

    let gave_up = agent
        .client
        .post(format!("{}/v1/commands/claim", agent.base))
        .bearer_auth(&agent.token)
        .json(&json!({"limit": 1}))
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(gave_up.unwrap_err().is_timeout());

    poll_until(Duration::from_secs(15), || async {
        let command = ops.get(&format!("/v1/commands/{id}"), 200).await;
        command["status"] == "pending" && !command["claimed_by"].is_null()
    })
    .await;
    let command = ops.get(&format!("/v1/commands/{id}"), 200).await;
    assert_eq!(command["attempts"], 0);
    assert_eq!(command["attempt_history"], json!([]));
}

/// A queue named twice at check-in is kept once, in the order given.
#[tokio::test]
async fn a_queue_named_twice_at_check_in_is_kept_once() {
    let server = Server::start().await;
    server.create_org("acme");
    let agent = server.key("acme", "agent", Some("a1"));
    let checked_in = agent.check_in(&["q2", "q1", "q2", "q1"]).await;
    assert_eq!(checked_in["queues"], json!(["q2", "q1"]));
}
