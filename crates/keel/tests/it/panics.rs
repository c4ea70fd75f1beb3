//! Panics in a handler, in the log sink and in a periodic tick: caught, answered, counted,
//! logged once with a backtrace; the server goes on.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::Value;

use crate::harness::{Options, Server, metric, poll_until};

#[tokio::test]
async fn a_handler_panic_gets_a_json_500_and_the_next_request_succeeds() {
    let server = Server::start_with(Options {
        failpoints: Some("http.handler=1*panic(handler exploded)"),
        ..Options::default()
    })
    .await;

    let response = server
        .client
        .get(server.url("/healthz"))
        .header("x-request-id", "panic-req-1")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(response.headers()["x-request-id"], "panic-req-1");
    let text = response.text().await.unwrap();
    assert!(!text.contains("exploded"), "the panic text leaked: {text}");
    let body: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        body,
        serde_json::json!({"error": {"code": "internal", "message": "internal error", "request_id": "panic-req-1"}})
    );

    assert_eq!(server.get("/healthz").await.status(), StatusCode::OK);
    let metrics = server.metrics().await;
    assert_eq!(
        metric(&metrics, r#"keel_panics_total{component="http"}"#),
        Some(1.0),
        "{metrics}"
    );

    // One panic record in the error stream, with its backtrace and the request id.
    poll_until(Duration::from_secs(5), || async {
        panic_records(&server, "http").len() == 1
    })
    .await;
    let record = &panic_records(&server, "http")[0];
    assert!(
        record["backtrace"]
            .as_str()
            .unwrap_or_default()
            .contains("lifecycle"),
        "{record}"
    );
    assert!(record["context"].as_str().unwrap().contains("GET /healthz"));
    assert!(record["context"].as_str().unwrap().contains("panic-req-1"));
    assert_eq!(record["message"], "handler exploded");

    // The admin API lists it too, alone in its group.
    let panics = server.admin_get("/v1/admin/panics").await;
    assert_eq!(panics["recent"][0]["component"], "http");
    assert_eq!(panics["recent"][0]["message"], "handler exploded");
    assert_eq!(panics["recent"][0]["request_id"], "panic-req-1");
    assert_eq!(panics["groups"][0]["count"], 1);
    assert_eq!(panics["groups"][0]["fingerprint"], record["fingerprint"]);
    assert_eq!(
        panics["groups"][0]["recent_request_ids"],
        serde_json::json!(["panic-req-1"])
    );
}

/// Starts a server whose handlers all panic (with `log_extra` in `[log]`), sends one request
/// and returns the panic record it leaves.
async fn one_handler_panic_record(log_extra: &'static str) -> Value {
    let server = Server::start_with(Options {
        failpoints: Some("http.handler=panic(handler exploded)"),
        log_extra,
        ..Options::default()
    })
    .await;
    let response = server.get("/v1/commands").await;
    assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    poll_until(Duration::from_secs(5), || async {
        !panic_records(&server, "http").is_empty()
    })
    .await;
    panic_records(&server, "http").remove(0)
}

#[tokio::test]
async fn a_handler_panic_record_has_the_short_backtrace_and_fits_in_4_kb() {
    let record = &one_handler_panic_record("").await;
    let size = record.to_string().len();
    assert!(size < 4096, "{size} bytes: {record:#}");
    let backtrace = record["backtrace"].as_str().unwrap();
    assert!(backtrace.contains("keel::http::lifecycle"), "{backtrace}");
    for machinery in [
        "keel_guard::panic::hook",
        "std::panicking",
        "tokio::",
        "hyper::",
        "core::ops::function",
    ] {
        assert!(!backtrace.contains(machinery), "{machinery} in {backtrace}");
    }
}

#[tokio::test]
async fn full_backtraces_can_be_switched_on() {
    let record = one_handler_panic_record("full_backtraces = true").await;
    let backtrace = record["backtrace"].as_str().unwrap();
    assert!(backtrace.contains("tokio::"), "{backtrace}");
    assert!(backtrace.contains("keel::http::lifecycle"), "{backtrace}");
}

#[tokio::test]
async fn a_hundred_handler_panics_at_one_place_are_one_group_of_a_hundred() {
    let server = Server::start_with(Options {
        failpoints: Some("http.handler=100*panic(handler exploded)"),
        ..Options::default()
    })
    .await;
    for i in 0..100 {
        let response = server
            .client
            .get(server.url(&format!("/v1/commands/{i}")))
            .header("x-request-id", format!("storm-{i}"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }
    let panics = server.admin_get("/v1/admin/panics").await;
    let groups = panics["groups"].as_array().unwrap();
    assert_eq!(groups.len(), 1, "{panics:#}");
    assert_eq!(groups[0]["count"], 100);
    assert_eq!(groups[0]["component"], "http");
    assert_eq!(
        groups[0]["recent_request_ids"],
        serde_json::json!(["storm-95", "storm-96", "storm-97", "storm-98", "storm-99"])
    );
    assert_eq!(panics["recent"].as_array().unwrap().len(), 100);
}

#[tokio::test]
async fn one_panicking_route_gets_json_500s_while_the_other_routes_answer() {
    let server = Server::start_with(Options {
        failpoints: Some("http.route_panic=return(/v1/schedules)"),
        ..Options::default()
    })
    .await;
    server.create_org("acme");
    let api = server.key("acme", "commands:write,commands:read", None);
    for round in 0..5 {
        let id = format!("route-panic-{round}");
        let response = server
            .client
            .get(server.url("/v1/schedules"))
            .bearer_auth(&api.token)
            .header("x-request-id", &id)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body: Value = response.json().await.unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": {"code": "internal", "message": "internal error", "request_id": id}})
        );
        let created = api
            .post(
                "/v1/commands",
                &serde_json::json!({"type": "job", "queue": "q"}),
                201,
            )
            .await;
        let command_id = created["id"].as_str().unwrap();
        api.get(&format!("/v1/commands/{command_id}"), 200).await;
        api.get("/v1/commands", 200).await;
        assert_eq!(server.get("/healthz").await.status(), StatusCode::OK);
    }
    let metrics = server.metrics().await;
    assert_eq!(
        metric(&metrics, r#"keel_panics_total{component="http"}"#),
        Some(5.0),
        "{metrics}"
    );
    poll_until(Duration::from_secs(5), || async {
        panic_records(&server, "http").len() == 5
    })
    .await;
    for record in panic_records(&server, "http") {
        let context = record["context"].as_str().unwrap();
        assert!(context.starts_with("GET /v1/schedules "), "{record}");
    }
}

fn panic_records(server: &Server, component: &str) -> Vec<Value> {
    server
        .log_records()
        .into_iter()
        .filter(|r| r["stream"] == "error" && r["component"] == component)
        .collect()
}

#[tokio::test]
async fn a_panicking_log_sink_loses_one_record_and_the_server_keeps_serving() {
    let server = Server::start_with(Options {
        failpoints: Some("log.sink=1*panic(sink exploded)"),
        ..Options::default()
    })
    .await;
    for _ in 0..3 {
        assert_eq!(server.get("/healthz").await.status(), StatusCode::OK);
    }
    // The panic is counted by the panic hook as it happens, the lost record once the sink's
    // unwinding is caught: a scrape between the two sees only the first.
    let lost_one = |metrics: &str| {
        metrics
            .lines()
            .any(|l| l.starts_with("keel_log_failed_total") && l.ends_with(" 1"))
    };
    poll_until(Duration::from_secs(5), || async {
        let metrics = server.metrics().await;
        metric(&metrics, r#"keel_panics_total{component="log"}"#) == Some(1.0) && lost_one(&metrics)
    })
    .await;
    let metrics = server.metrics().await;
    assert_eq!(
        metric(&metrics, r#"keel_panics_total{component="log"}"#),
        Some(1.0),
        "{metrics}"
    );
    assert!(lost_one(&metrics), "{metrics}");
    // Later records are written: the access records of the three requests.
    poll_until(Duration::from_secs(5), || async {
        server
            .log_records()
            .iter()
            .filter(|r| r["stream"] == "access" && r["route"] == "/healthz")
            .count()
            >= 3
    })
    .await;
}

#[tokio::test]
async fn a_panicking_tick_is_counted_and_the_next_tick_runs_on_time() {
    let server = Server::start_with(Options {
        failpoints: Some("job.telemetry=1*panic(tick exploded)"),
        extra_toml: "[jobs]\ntelemetry_interval = \"100ms\"\n",
        ..Options::default()
    })
    .await;
    poll_until(Duration::from_secs(10), || async {
        let jobs = server.admin_get("/v1/admin/jobs").await;
        let job = telemetry(&jobs);
        job["runs"].as_u64().unwrap() >= 4
    })
    .await;
    let jobs = server.admin_get("/v1/admin/jobs").await;
    let job = telemetry(&jobs);
    assert_eq!(job["failures"], 1, "{job}");
    assert_eq!(job["interval_ms"], 100);
    // The schedule is kept: the next tick is one interval after the last one began.
    let at = |field: &str| {
        time::OffsetDateTime::parse(
            job[field].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    let gap = at("next_tick") - at("last_tick");
    assert!(
        gap <= time::Duration::milliseconds(100) && gap > time::Duration::ZERO,
        "{job}"
    );
    let components = server.admin_get("/v1/admin/components").await;
    let component = components
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "telemetry")
        .unwrap();
    assert_eq!(component["state"], "running", "{component}");
    assert_eq!(component["last_panic"]["message"], "tick exploded");
    let metrics = server.metrics().await;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("keel_panics_total{component=\"")
                && l.contains("telemetry")
                && l.ends_with(" 1")),
        "{metrics}"
    );
}

fn telemetry(jobs: &Value) -> Value {
    jobs.as_array()
        .unwrap()
        .iter()
        .find(|j| j["name"] == "telemetry")
        .cloned()
        .unwrap()
}
