//! The operator page in headless Chromium against a live `keel serve`: the script
//! `crates/keel/tests/browser/operator_page.mjs` (playwright-core) signs in, watches a panic
//! injected through a failpoint appear without reloading, requeues a dead command with a click and another as a selection,
//! creates and revokes an organisation key, is refused without its CSRF token, signs out and
//! saves screenshots at 1280×800 and 390×844.
//!
//! It needs Debian's `chromium` and `npm ci` in `crates/keel/tests/browser`; without them it
//! prints a SKIP line and passes, unless `KEEL_REQUIRE_BROWSER=1` (as `.ci/run` sets), which
//! makes it fail instead.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::json;

use crate::harness::{Options, Server, pipe_to_test_output};

fn browser_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser")
}

/// What is missing to run the browser test, if anything.
fn missing_prerequisite(chromium: &Path) -> Option<String> {
    if !chromium.exists() {
        return Some(format!(
            "{} not found (apt-get install chromium)",
            chromium.display()
        ));
    }
    if !browser_dir().join("node_modules/playwright-core").exists() {
        return Some(format!(
            "playwright-core not installed (npm ci in {})",
            browser_dir().display()
        ));
    }
    let node = Command::new("node").arg("--version").output();
    if !node.is_ok_and(|out| out.status.success()) {
        return Some("node not found".to_owned());
    }
    None
}

#[tokio::test]
async fn the_operator_page_works_in_headless_chromium() {
    let chromium =
        PathBuf::from(std::env::var("KEEL_CHROMIUM").unwrap_or("/usr/bin/chromium".into()));
    if let Some(missing) = missing_prerequisite(&chromium) {
        assert!(
            std::env::var("KEEL_REQUIRE_BROWSER").as_deref() != Ok("1"),
            "KEEL_REQUIRE_BROWSER=1 but the browser test cannot run: {missing}"
        );
        eprintln!("SKIP the_operator_page_works_in_headless_chromium: {missing}");
        return;
    }

    // The release-stuck job never ticks by itself here: the script runs it, and its first run
    // panics through the failpoint.
    let server = Server::start_with(Options {
        failpoints: Some("commands.release_stuck=1*panic(injected by the browser test)"),
        extra_toml: "[commands]\nrelease_stuck_interval = \"1h\"\n",
        ..Options::default()
    })
    .await;
    server.create_org("acme");
    let org_admin = server.key("acme", "admin", None);
    let agent = server.key("acme", "agent", Some("web-1"));
    let operator = server.operator();
    agent.check_in(&["deploys"]).await;
    // Two commands that die when their 5 s leases expire: one requeued by its own button, the
    // other as a selection.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let created = org_admin
            .post(
                "/v1/commands",
                &json!({"type": "deploy", "queue": "deploys", "max_attempts": 1, "lease_seconds": 5}),
                201,
            )
            .await;
        ids.push(created["id"].as_str().unwrap().to_owned());
    }
    let claimed = agent
        .post(
            "/v1/commands/claim",
            &json!({"limit": 2, "queues": ["deploys"]}),
            200,
        )
        .await;
    assert_eq!(claimed["commands"].as_array().unwrap().len(), 2);
    // Fleet state the page shows: a paused queue, a schedule and a cordoned agent.
    org_admin
        .post("/v1/queues/nightly-q/pause", &json!({}), 200)
        .await;
    org_admin
        .post(
            "/v1/schedules",
            &json!({"name": "nightly cleanup", "cron": "30 2 * * *", "timezone": "Europe/Berlin",
                    "command": {"type": "cleanup", "queue": "nightly-q"}}),
            201,
        )
        .await;
    let agent_id = agent.check_in(&["deploys"]).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    org_admin
        .post(&format!("/v1/agents/{agent_id}/cordon"), &json!({}), 200)
        .await;

    let screenshots = Path::new(env!("CARGO_TARGET_TMPDIR")).join("operator-page");
    let mut script = Command::new("node")
        .arg("operator_page.mjs")
        .current_dir(browser_dir())
        .env("KEEL_BASE", &server.base)
        .env("KEEL_OPERATOR_KEY", &operator.token)
        .env("KEEL_ORG_ADMIN_KEY", &org_admin.token)
        .env("KEEL_COMMAND_IDS", ids.join(","))
        .env("KEEL_SCREENSHOTS", &screenshots)
        .env("KEEL_CHROMIUM", &chromium)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    pipe_to_test_output(script.stdout.take().unwrap(), "browser");
    pipe_to_test_output(script.stderr.take().unwrap(), "browser stderr");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = script.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(180) {
            let _ = script.kill();
            panic!("the browser script did not finish within 180 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "the browser script failed: {status}");

    // What the page did, checked over the API.
    for id in &ids {
        let command = org_admin.get(&format!("/v1/commands/{id}"), 200).await;
        assert_eq!(command["status"], "pending", "{command}");
        assert_eq!(command["attempts"], 0);
    }
    let keys = operator
        .get("/v1/admin/organisations/browser-org/keys", 200)
        .await;
    assert_eq!(keys.as_array().unwrap().len(), 1, "{keys}");
    assert_eq!(keys[0]["name"], "browser-key");
    assert!(keys[0]["revoked_at"].is_string(), "{keys}");
    let panics = operator.get("/v1/admin/panics", 200).await;
    assert_eq!(panics["groups"].as_array().unwrap().len(), 1, "{panics}");
    for name in ["operator-page-1280x800.png", "operator-page-390x844.png"] {
        let shot = screenshots.join(name);
        assert!(
            std::fs::metadata(&shot).is_ok_and(|m| m.len() > 10_000),
            "{} missing or empty",
            shot.display()
        );
    }
    eprintln!("screenshots in {}", screenshots.display());
}
