//! Every change a person makes is in the audit stream, whether made through `keel admin` or
//! over HTTP.

use std::time::Duration;

use serde_json::{Value, json};

use crate::harness::{ADMIN_TOKEN, Server, poll_until};

fn audit_actions(server: &Server) -> Vec<Value> {
    server
        .log_records()
        .into_iter()
        .filter(|r| r["stream"] == "audit")
        .collect()
}

#[tokio::test]
async fn organisations_keys_cancels_and_interval_changes_are_audited() {
    let server = Server::start().await;
    server.create_org("acme");
    let _first = server.key("acme", "commands:write,commands:read", None);
    let listed = server.admin_cli(&["list-keys", "--org", "acme"]);
    let key_id = listed.split('\t').next().unwrap().to_owned();
    server.admin_cli(&["revoke-key", "--org", "acme", &key_id]);

    let second = server.key("acme", "commands:write,commands:read", None);
    let created = second
        .post("/v1/commands", &json!({"type": "t", "queue": "q1"}), 201)
        .await;
    let id = created["id"].as_str().unwrap();
    second
        .post(&format!("/v1/commands/{id}/cancel"), &json!({}), 200)
        .await;
    let response = server
        .client
        .put(server.url("/v1/admin/jobs/telemetry/interval"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({"interval": "2s"}))
        .send()
        .await
        .unwrap();
    assert!(response.status().is_success(), "{}", response.status());

    poll_until(Duration::from_secs(5), || async {
        audit_actions(&server)
            .iter()
            .any(|r| r["action"] == "job.interval")
    })
    .await;
    let records = audit_actions(&server);
    let find = |action: &str| -> Vec<&Value> {
        records.iter().filter(|r| r["action"] == action).collect()
    };
    assert_eq!(find("organisation.create").len(), 1, "{records:?}");
    assert_eq!(find("organisation.create")[0]["org"], "acme");
    assert_eq!(find("api_key.create").len(), 2, "{records:?}");
    let revoked = find("api_key.revoke");
    assert_eq!(revoked.len(), 1, "{records:?}");
    assert_eq!(revoked[0]["key_id"], key_id.as_str());
    assert_eq!(find("command.cancel").len(), 1, "{records:?}");
    assert_eq!(find("command.cancel")[0]["command_id"], id);
    // No record carries a token.
    for record in &records {
        let text = record.to_string();
        assert!(!text.contains(&second.token), "{text}");
    }
}
