//! `/metrics` on the real server: bounded labels, counters at 0 from the start, histograms,
//! the optional bearer token.

use std::collections::BTreeSet;

use reqwest::{Method, StatusCode};

use crate::harness::{Options, Server, metric};

/// The distinct values of `label` among the series of `name`.
fn label_values(text: &str, name: &str, label: &str) -> BTreeSet<String> {
    let prefix = format!("{name}{{");
    let needle = format!("{label}=\"");
    text.lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (_, value) = rest.split_once(&needle)?;
            Some(value.split_once('"')?.0.to_owned())
        })
        .collect()
}

/// A random method token that is not one of the known methods: upper-case letters, 3 to 10 of
/// them (xorshift, seeded by the test).
fn random_method(state: &mut u64) -> Method {
    let mut next = || {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    };
    let length = 3 + next() % 8;
    let mut name: String = (0..length)
        .map(|_| char::from(b'A' + (next() % 26) as u8))
        .collect();
    // A draw of `PUT` or `HEAD` is a known method, rightly its own label: not what is tested.
    if keel::telemetry::KNOWN_METHODS
        .iter()
        .any(|known| known.as_str() == name)
    {
        name.push('X');
    }
    Method::from_bytes(name.as_bytes()).unwrap()
}

#[tokio::test]
async fn a_thousand_requests_with_random_methods_add_at_most_the_other_method_series() {
    let server = Server::start().await;
    assert_eq!(server.get("/healthz").await.status(), StatusCode::OK);
    let before = label_values(
        &server.metrics().await,
        "keel_http_requests_total",
        "method",
    );

    let mut state =
        0x9E37_79B9_7F4A_7C15_u64 ^ u64::from(std::process::id()).wrapping_mul(0x1000_0000_01B3);
    let mut sent = BTreeSet::new();
    for i in 0..1000 {
        let method = random_method(&mut state);
        let path = if i % 2 == 0 {
            "/healthz"
        } else {
            "/no/such/route"
        };
        sent.insert(method.to_string());
        let response = server
            .client
            .request(method, server.url(path))
            .send()
            .await
            .unwrap();
        assert!(response.status().is_client_error(), "{}", response.status());
    }
    assert!(sent.len() > 900, "the test sent too few distinct methods");

    let text = server.metrics().await;
    let methods = label_values(&text, "keel_http_requests_total", "method");
    let new: Vec<_> = methods.difference(&before).collect();
    assert_eq!(new, ["other"], "{text}");
    let routes = label_values(&text, "keel_http_requests_total", "route");
    assert!(routes.contains("unmatched"), "{routes:?}");
    assert!(
        routes
            .iter()
            .all(|r| r == "unmatched" || r.starts_with('/')),
        "{routes:?}"
    );
    assert!(
        !text.contains("/no/such/route"),
        "a raw path became a label"
    );
}

#[tokio::test]
async fn counters_of_known_components_exist_at_zero_right_after_start() {
    let server = Server::start().await;
    let text = server.metrics().await;
    for series in [
        r#"keel_panics_total{component="http"}"#,
        r#"keel_panics_total{component="log"}"#,
        r#"keel_panics_total{component="telemetry"}"#,
        r#"keel_panics_total{component="release-stuck"}"#,
        r#"keel_panics_total{component="retention"}"#,
        r#"keel_job_tick_failures_total{job="telemetry"}"#,
        r#"keel_job_tick_failures_total{job="release-stuck"}"#,
        r#"keel_job_tick_failures_total{job="retention"}"#,
        r#"keel_log_dropped_total{stream="app",level="info"}"#,
        r#"keel_log_dropped_total{stream="audit",level="info"}"#,
        r#"keel_log_dropped_total{stream="access",level="debug"}"#,
        r#"keel_commands_released_total{outcome="requeued"}"#,
        r#"keel_commands_released_total{outcome="dead"}"#,
        r#"keel_commands_finished_total{status="completed"}"#,
        r#"keel_commands_finished_total{status="failed"}"#,
        r#"keel_overload_rejected_total{reason="rate_limit"}"#,
        r#"keel_overload_rejected_total{reason="pressure"}"#,
        r#"keel_overload_rejected_total{reason="in_flight"}"#,
        "keel_panic_backtraces_skipped_total",
        "keel_commands_created_total",
    ] {
        assert_eq!(metric(&text, series), Some(0.0), "{series} in:\n{text}");
    }
}

#[tokio::test]
async fn request_latencies_are_histograms_with_buckets() {
    let server = Server::start().await;
    assert_eq!(server.get("/healthz").await.status(), StatusCode::OK);
    let text = server.metrics().await;
    let bucket = |le: &str| {
        metric(
            &text,
            &format!(r#"keel_http_request_duration_seconds_bucket{{route="/healthz",le="{le}"}}"#),
        )
    };
    assert_eq!(bucket("+Inf"), Some(1.0), "{text}");
    assert!(bucket("0.001").is_some(), "{text}");
    assert!(bucket("60").is_some(), "{text}");
    assert!(
        !text.contains("keel_http_request_duration_seconds{"),
        "a summary quantile is still exported: {text}"
    );
}

#[tokio::test]
async fn a_metrics_token_protects_metrics_and_nothing_else() {
    let server = Server::start_with(Options {
        extra_toml: "[metrics]\ntoken = \"scrape-token-0123\"\n",
        ..Options::default()
    })
    .await;
    assert_eq!(
        server.get("/metrics").await.status(),
        StatusCode::UNAUTHORIZED
    );
    let scrape = |token: &'static str| {
        server
            .client
            .get(server.url("/metrics"))
            .bearer_auth(token)
            .send()
    };
    let wrong = scrape("scrape-token-0124").await.unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let right = scrape("scrape-token-0123").await.unwrap();
    assert_eq!(right.status(), StatusCode::OK);
    assert!(right.text().await.unwrap().contains("keel_panics_total"));
    assert_eq!(server.get("/healthz").await.status(), StatusCode::OK);
}

/// The metric names (`keel_…`) a rules or dashboard file mentions.
fn metric_names_in(relative: &str) -> BTreeSet<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut names = BTreeSet::new();
    let mut rest = text.as_str();
    while let Some(at) = rest.find("keel_") {
        let tail = rest.split_at(at).1;
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        let (name, after) = tail.split_at(end);
        names.insert(name.to_owned());
        rest = after;
    }
    names
}

/// The metric names of an exposition (`name{…} value` or `name value` lines).
fn exported_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[tokio::test]
async fn every_metric_in_the_alert_rules_and_the_dashboard_is_exported() {
    let server = Server::start_with(Options {
        extra_toml: "[jobs]\ntelemetry_interval = \"100ms\"\n",
        ..Options::default()
    })
    .await;
    let rules = metric_names_in("deploy/prometheus/keel-alerts.yml");
    let dashboard = metric_names_in("deploy/grafana/keel-dashboard.json");
    assert!(rules.len() >= 7, "{rules:?}");
    assert!(dashboard.len() >= 10, "{dashboard:?}");
    let wanted: BTreeSet<String> = rules.union(&dashboard).cloned().collect();

    assert_eq!(server.get("/healthz").await.status(), StatusCode::OK);
    // Histogram buckets appear with their first sample (a request, a job tick): poll.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let missing = loop {
        let exported = exported_names(&server.metrics().await);
        let missing: BTreeSet<String> = wanted.difference(&exported).cloned().collect();
        if missing.is_empty() || std::time::Instant::now() > deadline {
            break missing;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(missing.is_empty(), "not exported: {missing:?}");
}
