//! The admin API: components, jobs and the admin token.

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::harness::{Server, poll_until};

#[tokio::test]
async fn components_and_jobs_are_listed_with_their_state() {
    let server = Server::start().await;
    let components = server.admin_get("/v1/admin/components").await;
    let telemetry = components
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "telemetry")
        .expect("the telemetry job is a component");
    assert_eq!(telemetry["restarts"], 0);
    assert!(telemetry["next_tick"].is_string(), "{telemetry}");

    let jobs = server.admin_get("/v1/admin/jobs").await;
    let job = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == "telemetry")
        .unwrap();
    assert_eq!(job["failures"], 0);
    assert_eq!(job["interval_ms"], 5000);

    assert_eq!(
        server.admin_get("/v1/admin/panics").await,
        serde_json::json!({"groups": [], "recent": []})
    );
    assert_eq!(server.get("/readyz").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn without_a_configured_token_one_is_generated_and_kept_private() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["config", "--data-dir"])
        .arg(dir.path())
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(output.status.success());
    // `keel config` does not create a token; `keel serve` does, once.
    assert!(!dir.path().join("admin-token").exists());

    let server = crate::harness::Server::start_without_admin_token().await;
    let path = server.dir.path().join("admin-token");
    let token = std::fs::read_to_string(&path).unwrap();
    assert!(token.starts_with("keel_admin_"));
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let response = server
        .client
        .get(server.url("/v1/admin/components"))
        .bearer_auth(token.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

/// Every `/v1/admin` route, with a body it accepts: `(method, path, body, success status)`.
/// `{key}` stands for the id of a key of `acme`.
fn admin_routes(log_filters: &Value) -> Vec<(Method, String, Option<Value>, u16)> {
    vec![
        (Method::GET, "/v1/admin/components".into(), None, 200),
        (Method::GET, "/v1/admin/panics".into(), None, 200),
        (Method::GET, "/v1/admin/jobs".into(), None, 200),
        (
            Method::PUT,
            "/v1/admin/jobs/telemetry/interval".into(),
            Some(json!({"interval": "5s"})),
            200,
        ),
        (Method::GET, "/v1/admin/log-filters".into(), None, 200),
        (
            Method::PUT,
            "/v1/admin/log-filters".into(),
            Some(log_filters.clone()),
            200,
        ),
        (Method::GET, "/v1/admin/overload".into(), None, 200),
        (
            Method::PUT,
            "/v1/admin/overload".into(),
            Some(json!({"mode": "auto"})),
            200,
        ),
        (Method::GET, "/v1/admin/organisations".into(), None, 200),
        (
            Method::POST,
            "/v1/admin/organisations".into(),
            Some(json!({"name": "new-org"})),
            201,
        ),
        (
            Method::GET,
            "/v1/admin/organisations/acme/keys".into(),
            None,
            200,
        ),
        (
            Method::POST,
            "/v1/admin/organisations/acme/keys".into(),
            Some(json!({"name": "ci", "scopes": ["commands:read"]})),
            201,
        ),
        (
            Method::POST,
            "/v1/admin/organisations/acme/keys/{key}/revoke".into(),
            None,
            204,
        ),
    ]
}

#[tokio::test]
async fn no_organisation_key_opens_any_admin_route_and_an_operator_key_opens_them_all() {
    let server = Server::start().await;
    server.create_org("acme");
    let org_admin = server.key("acme", "admin,commands:write,commands:read", None);
    let agent = server.key("acme", "agent", Some("web-1"));
    let victim = server.key("acme", "commands:read", None);
    let victim_id = server.admin_cli(&["list-keys", "--org", "acme"]);
    let victim_id = victim_id
        .lines()
        .find(|line| {
            victim
                .token
                .contains(&format!("_{}_", line.split('\t').nth(1).unwrap()))
        })
        .and_then(|line| line.split('\t').next())
        .unwrap()
        .to_owned();
    let operator = server.operator();
    let filters = operator.get("/v1/admin/log-filters", 200).await;
    let routes = admin_routes(&filters);

    for key in [&org_admin, &agent] {
        for (method, path, body, _) in &routes {
            let path = path.replace("{key}", &victim_id);
            let refused = key.call(method.clone(), &path, body.as_ref(), 403).await;
            assert_eq!(refused["error"]["code"], "forbidden", "{method} {path}");
        }
    }
    // Refused changed nothing: the key still works, no organisation was created.
    victim.get("/v1/commands", 200).await;
    let orgs = operator.get("/v1/admin/organisations", 200).await;
    assert_eq!(orgs.as_array().unwrap().len(), 2, "{orgs}");

    // Without a credential or with an unknown one: 401.
    let nobody = server.api("keel_zzzzzzzz_notarealtokennotarealtoken");
    for (method, path, body, _) in &routes {
        let path = path.replace("{key}", &victim_id);
        nobody.call(method.clone(), &path, body.as_ref(), 401).await;
    }

    for (method, path, body, status) in &routes {
        let path = path.replace("{key}", &victim_id);
        operator
            .call(method.clone(), &path, body.as_ref(), *status)
            .await;
    }
    victim.get("/v1/commands", 401).await;

    // A revoked operator key opens nothing.
    let listed = server.admin_cli(&["list-operator-keys"]);
    let line = |listed: &str| {
        listed
            .lines()
            .find(|line| line.contains("\ttest-operator"))
            .unwrap()
            .to_owned()
    };
    let id = line(&listed).split('\t').next().unwrap().to_owned();
    server.admin_cli(&["revoke-operator-key", &id]);
    let listed = server.admin_cli(&["list-operator-keys"]);
    assert!(line(&listed).ends_with("\trevoked"), "{listed}");
    assert!(listed.contains("\tbootstrap-operator\n"), "{listed}");
    operator.get("/v1/admin/components", 401).await;
}

#[tokio::test]
async fn operators_manage_organisations_and_keys_over_http_and_each_change_is_audited() {
    let server = Server::start().await;
    let operator = server.operator();
    let created = operator
        .post("/v1/admin/organisations", &json!({"name": "acme"}), 201)
        .await;
    assert_eq!(created["name"], "acme");
    let taken = operator
        .post("/v1/admin/organisations", &json!({"name": "acme"}), 409)
        .await;
    assert_eq!(taken["error"]["code"], "conflict");
    let bad = operator
        .post(
            "/v1/admin/organisations",
            &json!({"name": "has space"}),
            422,
        )
        .await;
    assert_eq!(bad["error"]["code"], "validation_failed");
    let orgs = operator.get("/v1/admin/organisations", 200).await;
    assert!(
        orgs.as_array()
            .unwrap()
            .iter()
            .any(|o| o["id"] == created["id"])
    );

    // An admin key made over HTTP works in its organisation.
    let key = operator
        .post(
            "/v1/admin/organisations/acme/keys",
            &json!({"name": "ops", "scopes": ["admin"]}),
            201,
        )
        .await;
    let token = key["token"].as_str().unwrap();
    assert!(token.starts_with(&format!("keel_{}_", key["prefix"].as_str().unwrap())));
    let admin = server.api(token);
    admin.get("/v1/commands", 200).await;
    // An agent key is bound to its agent.
    let agent_key = operator
        .post(
            "/v1/admin/organisations/acme/keys",
            &json!({"name": "web-1", "scopes": ["agent"], "agent": "web-1"}),
            201,
        )
        .await;
    assert!(agent_key["agent_id"].is_string(), "{agent_key}");
    // The old `operator` scope is no scope: 422, as any unknown one.
    for scopes in [json!(["operator"]), json!([]), json!(["nope"])] {
        let refused = operator
            .post(
                "/v1/admin/organisations/acme/keys",
                &json!({"name": "x", "scopes": scopes}),
                422,
            )
            .await;
        assert_eq!(refused["error"]["code"], "validation_failed", "{scopes}");
    }
    operator
        .post(
            "/v1/admin/organisations/nope/keys",
            &json!({"name": "x", "scopes": ["admin"]}),
            404,
        )
        .await;

    let keys = operator.get("/v1/admin/organisations/acme/keys", 200).await;
    let keys = keys.as_array().unwrap();
    assert_eq!(keys.len(), 2);
    assert!(keys.iter().all(|k| k.get("token").is_none()), "{keys:?}");

    let id = key["id"].as_str().unwrap();
    let revoke = format!("/v1/admin/organisations/acme/keys/{id}/revoke");
    operator.call(Method::POST, &revoke, None, 204).await;
    admin.get("/v1/commands", 401).await;
    operator
        .call(
            Method::POST,
            "/v1/admin/organisations/acme/keys/not-a-uuid/revoke",
            None,
            400,
        )
        .await;
    operator
        .call(
            Method::POST,
            &format!(
                "/v1/admin/organisations/acme/keys/{}/revoke",
                uuid::Uuid::new_v4()
            ),
            None,
            404,
        )
        .await;

    // Each change is one audit record naming the operator key; no record holds a token.
    let prefix = operator.token.split('_').nth(1).unwrap().to_owned();
    poll_until(Duration::from_secs(5), || async {
        server
            .log_records()
            .iter()
            .any(|r| r["stream"] == "audit" && r["action"] == "api_key.revoke")
    })
    .await;
    let records = server.log_records();
    let audits: Vec<&Value> = records.iter().filter(|r| r["stream"] == "audit").collect();
    for (action, count) in [
        ("organisation.create", 1),
        ("api_key.create", 2),
        ("api_key.revoke", 1),
    ] {
        let matching: Vec<_> = audits.iter().filter(|r| r["action"] == action).collect();
        assert_eq!(matching.len(), count, "{action}: {audits:#?}");
        for record in matching {
            let by = record["operator"].as_str().unwrap();
            assert!(
                by.starts_with(&format!("operator-key:{prefix}:")),
                "{record}"
            );
        }
    }
    let text = std::fs::read_to_string(server.log_path()).unwrap();
    for secret in [
        token,
        agent_key["token"].as_str().unwrap(),
        operator.token.as_str(),
    ] {
        assert!(!text.contains(secret), "a token is in the log");
    }
}

#[tokio::test]
async fn a_jobs_interval_changes_at_run_time() {
    use crate::harness::ADMIN_TOKEN;

    let server = Server::start().await;
    let put = |path: &str, body: serde_json::Value| {
        server
            .client
            .put(server.url(path))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
    };
    let changed = put(
        "/v1/admin/jobs/telemetry/interval",
        serde_json::json!({"interval": "100ms"}),
    )
    .await
    .unwrap();
    assert_eq!(changed.status(), StatusCode::OK);
    let job: serde_json::Value = changed.json().await.unwrap();
    assert_eq!(job["interval_ms"], 100);
    // At 100 ms instead of the configured 5 s, ticks come quickly.
    poll_until(Duration::from_secs(5), || async {
        let jobs = server.admin_get("/v1/admin/jobs").await;
        jobs.as_array()
            .unwrap()
            .iter()
            .any(|j| j["name"] == "telemetry" && j["runs"].as_u64().unwrap() >= 3)
    })
    .await;

    let bad = put(
        "/v1/admin/jobs/telemetry/interval",
        serde_json::json!({"interval": "soon"}),
    )
    .await
    .unwrap();
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let zero = put(
        "/v1/admin/jobs/telemetry/interval",
        serde_json::json!({"interval": "0s"}),
    )
    .await
    .unwrap();
    assert_eq!(zero.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let missing = put(
        "/v1/admin/jobs/no-such-job/interval",
        serde_json::json!({"interval": "1s"}),
    )
    .await
    .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let jobs = server.admin_get("/v1/admin/jobs").await;
    let telemetry = jobs
        .as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == "telemetry")
        .unwrap();
    assert_eq!(
        telemetry["interval_ms"], 100,
        "bad requests changed nothing"
    );
}

/// The `release-stuck` entry of `/v1/admin/jobs`.
async fn release_stuck_stats(server: &Server) -> serde_json::Value {
    let jobs = server.admin_get("/v1/admin/jobs").await;
    jobs.as_array()
        .unwrap()
        .iter()
        .find(|job| job["name"] == "release-stuck")
        .unwrap()
        .clone()
}

#[tokio::test]
async fn a_manual_release_stuck_run_is_counted_like_a_tick() {
    let server = Server::start_with(crate::harness::Options {
        // The first manual run succeeds, the second panics; no scheduled tick comes between.
        failpoints: Some("commands.release_stuck=1*off->panic"),
        extra_toml: "[commands]\nrelease_stuck_interval = \"1h\"\n",
        ..crate::harness::Options::default()
    })
    .await;
    server.create_org("acme");
    let admin = server.key("acme", "admin", None);
    let before = release_stuck_stats(&server).await;
    assert_eq!(before["runs"], 0, "{before}");

    let released = admin
        .post("/v1/commands/release-stuck", &serde_json::json!({}), 200)
        .await;
    assert_eq!(released["released"], serde_json::json!([]));
    let after_one = release_stuck_stats(&server).await;
    assert_eq!(after_one["runs"], 1, "{after_one}");
    assert_eq!(after_one["failures"], 0, "{after_one}");

    let failed = admin
        .post("/v1/commands/release-stuck", &serde_json::json!({}), 500)
        .await;
    assert_eq!(failed["error"]["code"], "internal");
    let after_two = release_stuck_stats(&server).await;
    assert_eq!(after_two["runs"], 2, "{after_two}");
    assert_eq!(after_two["failures"], 1, "{after_two}");
    let metrics = server.metrics().await;
    assert_eq!(
        crate::harness::metric(
            &metrics,
            "keel_job_tick_failures_total{job=\"release-stuck\"}"
        ),
        Some(1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn the_first_start_makes_an_operator_key_and_a_separate_admin_key_for_default() {
    use std::io::BufRead;
    use std::os::unix::fs::PermissionsExt;

    let server = Server::start().await;
    let read_key = |name: &str| {
        let path = server.dir.path().join(name);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name}");
        std::fs::read_to_string(&path).unwrap().trim().to_owned()
    };
    let operator = server.api(&read_key("operator-key"));
    let admin = server.api(&read_key("default-admin-key"));
    assert_ne!(operator.token, admin.token);
    operator.get("/v1/admin/components", 200).await;
    operator.get("/v1/commands", 401).await;
    admin.get("/v1/admin/components", 403).await;
    admin.get("/v1/admin/panics", 403).await;
    admin.get("/v1/commands", 200).await;
    let keys = operator
        .get("/v1/admin/organisations/default/keys", 200)
        .await;
    assert_eq!(keys.as_array().unwrap().len(), 1, "{keys}");
    assert_eq!(
        keys[0]["scopes"],
        json!(["admin", "commands:write", "commands:read"])
    );

    // stdout (container logs) shows where the keys are, never the keys.
    let dir = tempfile::tempdir().unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_keel"))
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .current_dir(dir.path())
        .env_remove("KEEL_FAILPOINTS")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // stdout also carries the default log sink: read up to the first-start line.
    let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    while !line.contains("keel: first start") {
        assert!(stdout.read_line(&mut line).unwrap() > 0, "{line}");
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let data = dir.path().join("data");
    for name in ["operator-key", "default-admin-key"] {
        let path = data.join(name);
        assert!(line.contains(&path.display().to_string()), "{line}");
        let token = std::fs::read_to_string(&path).unwrap();
        assert!(!line.contains(token.trim()), "{line}");
    }
}

#[tokio::test]
async fn a_key_revoked_by_another_process_stops_working_within_the_cache_lifetime() {
    let server = Server::start().await;
    server.create_org("acme");
    let key = server.key("acme", "commands:read", None);
    // Used once, so the server has it verified in its cache.
    key.get("/v1/commands", 200).await;
    let listed = server.admin_cli(&["list-keys", "--org", "acme"]);
    let key_id = listed.split('\t').next().unwrap().to_owned();
    server.admin_cli(&["revoke-key", "--org", "acme", &key_id]);
    let revoked_at = std::time::Instant::now();
    poll_until(Duration::from_secs(5), || async {
        let response = key
            .client
            .get(format!("{}/v1/commands", key.base))
            .bearer_auth(&key.token)
            .send()
            .await
            .unwrap();
        response.status() == StatusCode::UNAUTHORIZED
    })
    .await;
    // The cache keeps a verified key for 1 s; the margin is for a slow machine's `keel admin`
    // exit and the poll interval.
    assert!(
        revoked_at.elapsed() < Duration::from_secs(3),
        "{:?}",
        revoked_at.elapsed()
    );
}
