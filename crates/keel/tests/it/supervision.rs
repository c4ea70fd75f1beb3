//! A supervised task that panics again and again is restarted, then marked degraded, and
//! `/readyz` says so.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::harness::{Options, Server, metric, poll_until};

#[tokio::test]
async fn a_task_that_always_panics_ends_degraded_and_readyz_names_it() {
    // Every start of a supervised task panics; the harness sets 10 ms doubling to 80 ms, and
    // more than 3 restarts within 10 s mean degraded.
    let server = Server::start_with(Options {
        failpoints: Some("supervisor.task=panic(task exploded)"),
        ..Options::default()
    })
    .await;

    // Every job's task panics: another may be degraded before `telemetry` is.
    poll_until(Duration::from_secs(10), || async {
        let response = server.get("/readyz").await;
        response.status() == StatusCode::SERVICE_UNAVAILABLE
            && response.text().await.unwrap().contains("\"telemetry\"")
    })
    .await;
    let response = server.get("/readyz").await;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "degraded");
    assert!(
        body["degraded"]
            .as_array()
            .unwrap()
            .iter()
            .any(|name| name == "telemetry"),
        "{body}"
    );

    let components = server.admin_get("/v1/admin/components").await;
    let telemetry = components
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "telemetry")
        .unwrap();
    assert_eq!(telemetry["state"], "degraded");
    assert!(telemetry["restarts"].as_u64().unwrap() > 3, "{telemetry}");
    assert_eq!(telemetry["last_panic"]["message"], "task exploded");

    // Liveness is not readiness: the process still answers.
    assert_eq!(server.get("/healthz").await.status(), StatusCode::OK);
    let metrics = server.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            r#"keel_component_degraded{component="telemetry"}"#
        ),
        Some(1.0),
        "{metrics}"
    );

    // The restarts came after growing delays: 10 ms doubling to the 80 ms maximum.
    poll_until(Duration::from_secs(5), || async {
        restart_delays(&server).len() >= 6
    })
    .await;
    let delays = restart_delays(&server);
    assert_eq!(delays[..5], [10, 20, 40, 80, 80], "{delays:?}");
    assert!(delays[5..].iter().all(|&d| d == 80), "{delays:?}");

    // The alert record is in the log.
    poll_until(Duration::from_secs(5), || async {
        server
            .log_records()
            .iter()
            .any(|r| r["target"] == "keel::alert" && r["component"] == "telemetry")
    })
    .await;
}

/// The delays before each restart of the telemetry job, in order, from the log.
fn restart_delays(server: &Server) -> Vec<u64> {
    server
        .log_records()
        .iter()
        .filter(|r| r["component"] == "telemetry" && r["delay_ms"].is_u64())
        .map(|r| r["delay_ms"].as_u64().unwrap())
        .collect()
}
