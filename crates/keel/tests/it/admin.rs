//! The admin API: components, jobs and the admin token.

use reqwest::StatusCode;

use crate::harness::Server;

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

#[tokio::test]
async fn an_operator_key_opens_the_admin_routes_and_an_org_admin_key_does_not() {
    let server = Server::start().await;
    server.create_org("acme");
    let operator = server.key("acme", "operator", None);
    let org_admin = server.key("acme", "admin,commands:write,commands:read", None);
    let components = operator.get("/v1/admin/components", 200).await;
    assert!(
        components
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "telemetry")
    );
    let refused = org_admin.get("/v1/admin/components", 403).await;
    assert_eq!(refused["error"]["code"], "forbidden");
    org_admin.get("/v1/admin/panics", 403).await;
}

#[tokio::test]
async fn a_jobs_interval_changes_at_run_time() {
    use std::time::Duration;

    use crate::harness::{ADMIN_TOKEN, poll_until};

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
