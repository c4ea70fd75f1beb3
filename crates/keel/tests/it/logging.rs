//! Log records of a request carry its id; filters change at run time through the admin API.

use std::time::Duration;

use reqwest::StatusCode;

use crate::harness::{ADMIN_TOKEN, Server, poll_until};

#[tokio::test]
async fn every_record_of_a_request_carries_its_request_id() {
    let server = Server::start().await;
    let response = server
        .client
        .get(server.url("/v1/admin/components"))
        .header("x-request-id", "trace-me-1")
        .bearer_auth(ADMIN_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["x-request-id"], "trace-me-1");
    poll_until(Duration::from_secs(5), || async {
        server.log_records().iter().any(|r| {
            r["stream"] == "access"
                && r["request_id"] == "trace-me-1"
                && r["route"] == "/v1/admin/components"
                && r["status"] == 200
                && r["method"] == "GET"
                && r["latency_ms"].is_number()
        })
    })
    .await;

    // A generated id when the client sends none.
    let response = server.get("/healthz").await;
    let generated = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(generated.len(), 36);
}

#[tokio::test]
async fn a_filter_set_at_run_time_silences_a_route_from_the_next_request_on() {
    let server = Server::start().await;
    let filters_url = server.url("/v1/admin/log-filters");
    let mut filters = server.admin_get("/v1/admin/log-filters").await;
    filters["access"]["directives"] = serde_json::json!([
        {"route_prefix": "/healthz", "level": "off"}
    ]);
    let response = server
        .client
        .put(&filters_url)
        .bearer_auth(ADMIN_TOKEN)
        .json(&filters)
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.status(),
        StatusCode::OK,
        "{:?}",
        response.text().await
    );

    server
        .client
        .get(server.url("/healthz"))
        .header("x-request-id", "silenced-1")
        .send()
        .await
        .unwrap();
    server
        .client
        .get(server.url("/metrics"))
        .header("x-request-id", "kept-1")
        .send()
        .await
        .unwrap();
    poll_until(Duration::from_secs(5), || async {
        server
            .log_records()
            .iter()
            .any(|r| r["stream"] == "access" && r["request_id"] == "kept-1")
    })
    .await;
    assert!(
        !server
            .log_records()
            .iter()
            .any(|r| r["stream"] == "access" && r["request_id"] == "silenced-1")
    );
    // The change is in the audit stream.
    assert!(
        server
            .log_records()
            .iter()
            .any(|r| r["stream"] == "audit" && r["action"] == "log_filters.update")
    );
}

#[tokio::test]
async fn a_stalled_sink_blocks_no_request_drops_info_and_keeps_errors() {
    // The first record written stalls the writer for 6 s; the queue holds 64 records, 16 of
    // them kept for warnings and errors.
    let server = Server::start_with(crate::harness::Options {
        failpoints: Some("log.sink=1*sleep(6000);http.handler=3*panic(stalled-test)"),
        extra_toml: "",
        log_extra: "queue_capacity = 64\nreserved_for_warnings = 16\n",
        ..Default::default()
    })
    .await;
    let started = std::time::Instant::now();
    let mut statuses = Vec::new();
    for _ in 0..200 {
        statuses.push(server.get("/healthz").await.status().as_u16());
    }
    // Every request was answered while the sink was still stalled: log calls did not block.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "200 requests took {:?}",
        started.elapsed()
    );
    assert_eq!(statuses.iter().filter(|&&s| s == 500).count(), 3);
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 197);
    let metrics = server.metrics().await;
    let dropped: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("keel_log_dropped_total{") && l.contains("level=\"info\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        dropped > 100.0,
        "info records dropped and counted: {metrics}"
    );

    // Once the sink is back, the three panic records (error stream) are all written.
    poll_until(Duration::from_secs(20), || async {
        server
            .log_records()
            .iter()
            .filter(|r| r["stream"] == "error" && r["message"] == "stalled-test")
            .count()
            == 3
    })
    .await;
}
