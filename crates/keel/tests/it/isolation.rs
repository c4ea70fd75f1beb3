//! Organisation A's keys cannot see or touch organisation B's commands, on any route: 404,
//! exactly as if they did not exist, and nothing changes.

use serde_json::json;

use crate::harness::Server;

#[tokio::test]
async fn another_organisations_commands_are_invisible_on_every_route() {
    let server = Server::start().await;
    server.create_org("alpha");
    server.create_org("beta");
    let alpha_ops = server.key("alpha", "admin,commands:write,commands:read", None);
    let alpha_agent = server.key("alpha", "agent", Some("worker"));
    let beta_ops = server.key("beta", "admin,commands:write,commands:read", None);
    // Same agent name and queue name in both organisations.
    let beta_agent = server.key("beta", "agent", Some("worker"));
    alpha_agent.check_in(&["shared"]).await;
    beta_agent.check_in(&["shared"]).await;

    let pending = beta_ops
        .post(
            "/v1/commands",
            &json!({"type": "t", "queue": "shared"}),
            201,
        )
        .await;
    let executing = beta_ops
        .post(
            "/v1/commands",
            &json!({"type": "t", "queue": "shared"}),
            201,
        )
        .await;
    // Alpha's agent claims nothing from beta's pool of the same name.
    let claimed = alpha_agent
        .post("/v1/commands/claim", &json!({"limit": 100}), 200)
        .await;
    assert_eq!(claimed["commands"], json!([]));
    let claimed = beta_agent
        .post("/v1/commands/claim", &json!({"limit": 1}), 200)
        .await;
    let token = claimed["commands"][0]["claim_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let executing_id = claimed["commands"][0]["id"].as_str().unwrap().to_owned();
    assert!(executing_id == executing["id"] || executing_id == pending["id"]);
    let pending_id = if executing_id == executing["id"] {
        pending["id"].as_str().unwrap().to_owned()
    } else {
        executing["id"].as_str().unwrap().to_owned()
    };

    let before = beta_ops.get("/v1/commands", 200).await;
    for id in [&pending_id, &executing_id] {
        let path = format!("/v1/commands/{id}");
        let not_found = alpha_ops.get(&path, 404).await;
        assert_eq!(not_found["error"]["code"], "not_found");
        alpha_ops
            .post(&format!("{path}/cancel"), &json!({}), 404)
            .await;
        alpha_ops
            .post(&format!("{path}/requeue"), &json!({}), 404)
            .await;
        alpha_agent
            .post(
                &format!("{path}/heartbeat"),
                &json!({"claim_token": token}),
                404,
            )
            .await;
        alpha_agent
            .post(
                &format!("{path}/complete"),
                &json!({"claim_token": token, "result": {}}),
                404,
            )
            .await;
        alpha_agent
            .post(
                &format!("{path}/fail"),
                &json!({"claim_token": token, "error": "x", "retryable": false}),
                404,
            )
            .await;
    }
    assert_eq!(alpha_ops.get("/v1/commands", 200).await["items"], json!([]));
    assert_eq!(
        alpha_ops.get("/v1/commands/dead", 200).await["items"],
        json!([])
    );
    let alpha_agents = alpha_ops.get("/v1/agents", 200).await;
    assert_eq!(alpha_agents["agents"].as_array().unwrap().len(), 1);
    let released = alpha_ops
        .post("/v1/commands/release-stuck", &json!({}), 200)
        .await;
    assert_eq!(released["released"], json!([]));
    // Targeting another organisation's agent is refused as an unknown agent.
    let beta_worker = beta_ops.get("/v1/agents", 200).await["agents"][0]["id"].clone();
    alpha_ops
        .post(
            "/v1/commands",
            &json!({"type": "t", "agent_id": beta_worker}),
            422,
        )
        .await;

    assert_eq!(beta_ops.get("/v1/commands", 200).await, before);
    // Beta's own agent still completes it with the same token.
    beta_agent
        .post(
            &format!("/v1/commands/{executing_id}/complete"),
            &json!({"claim_token": token, "result": {}}),
            200,
        )
        .await;
}
