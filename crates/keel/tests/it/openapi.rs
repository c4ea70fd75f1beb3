//! `GET /openapi.json`: the document names every route the router serves, and only those.
// The route scan slices source text at the positions `find` returned.
#![allow(clippy::string_slice)]

use std::collections::BTreeSet;

use serde_json::Value;

use crate::harness::Server;

const METHODS: [&str; 5] = ["get", "post", "put", "patch", "delete"];

/// Every `(METHOD, path)` the document lists.
fn documented(document: &Value) -> BTreeSet<(String, String)> {
    let mut operations = BTreeSet::new();
    // Enums show the names on the wire.
    let statuses = &document["components"]["schemas"]["CommandStatus"]["enum"];
    assert_eq!(
        statuses,
        &serde_json::json!([
            "pending",
            "executing",
            "completed",
            "failed",
            "cancelled",
            "dead"
        ])
    );
    for (path, item) in document["paths"].as_object().unwrap() {
        for method in METHODS {
            if item.get(method).is_some() {
                operations.insert((method.to_uppercase(), path.clone()));
            }
        }
    }
    operations
}

/// Every `(METHOD, path)` the code routes: each `.route("…", get(…).post(…))` of the HTTP
/// modules, under the prefix `http::router` nests the module at.
fn routed() -> BTreeSet<(String, String)> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/http");
    let prefixes = [
        ("health.rs", ""),
        ("openapi.rs", ""),
        ("admin.rs", "/v1/admin"),
        ("organisations.rs", "/v1/admin"),
        ("operations.rs", "/v1/admin"),
        ("ui.rs", ""),
        ("agents.rs", "/v1/agents"),
        ("commands.rs", "/v1/commands"),
        ("queues.rs", "/v1/queues"),
        ("schedules.rs", "/v1/schedules"),
        ("notifications.rs", ""),
        ("notification_settings.rs", ""),
    ];
    let mut routes = BTreeSet::new();
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let source = std::fs::read_to_string(&path).unwrap();
        let file = path.file_name().unwrap().to_str().unwrap().to_owned();
        let mut rest = source.as_str();
        // `.route("…"`, the path on the same line or, as rustfmt may break it, the next.
        while let Some(at) = rest.find(".route(") {
            rest = rest[at + ".route(".len()..].trim_start();
            let Some(path) = rest.strip_prefix('"') else {
                continue;
            };
            rest = path;
            let end = rest.find('"').unwrap();
            let route = &rest[..end];
            // The arguments, up to the parenthesis that closes `.route(`.
            let mut depth = 1;
            let mut close = 0;
            for (i, c) in rest.char_indices() {
                match c {
                    '(' => depth += 1,
                    ')' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    close = i;
                    break;
                }
            }
            let arguments = &rest[end..close];
            let prefix = prefixes
                .iter()
                .find(|(name, _)| *name == file)
                .unwrap_or_else(|| panic!("{file} routes {route}: add its prefix to this test"))
                .1;
            let full = match (prefix, route) {
                (prefix, "/") if !prefix.is_empty() => prefix.to_owned(),
                _ => format!("{prefix}{route}"),
            };
            for method in METHODS {
                let called = format!("{method}(");
                let found = arguments.match_indices(&called).any(|(i, _)| {
                    i == 0
                        || !arguments[..i]
                            .chars()
                            .next_back()
                            .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
                });
                if found {
                    routes.insert((method.to_uppercase(), full.clone()));
                }
            }
        }
    }
    routes
}

#[tokio::test]
async fn the_document_lists_every_route_and_each_is_served() {
    let server = Server::start().await;
    let response = server.get("/openapi.json").await;
    assert_eq!(response.status(), 200, "no credentials needed");
    let document: Value = response.json().await.unwrap();
    assert_eq!(document["openapi"], "3.1.0");

    let documented = documented(&document);
    let routed = routed();
    assert!(
        routed.len() > 25,
        "the route scan found too little: {routed:?}"
    );
    let missing: Vec<_> = routed.difference(&documented).collect();
    let extra: Vec<_> = documented.difference(&routed).collect();
    assert!(missing.is_empty(), "routed but not documented: {missing:?}");
    assert!(extra.is_empty(), "documented but not routed: {extra:?}");

    // Each documented operation is served: without credentials it answers 200 or 401, never
    // the router's 404 or 405.
    let client = reqwest::Client::new();
    for (method, path) in &documented {
        let concrete = path
            .replace("{id}", "01a22513-ba98-70aa-884d-bbbc383d3f6c")
            .replace("{org}", "acme")
            .replace("{name}", "release_stuck")
            .replace("{queue}", "deploy");
        let request = client.request(method.parse().unwrap(), server.url(&concrete));
        let request = if method == "GET" {
            request
        } else {
            request.json(&serde_json::json!({}))
        };
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        assert!(
            status == 200 || status == 401,
            "{method} {path}: {status} {}",
            response.text().await.unwrap_or_default()
        );
    }
}

#[tokio::test]
async fn the_document_names_credentials_and_the_error_shape() {
    let server = Server::start().await;
    let document: Value = server.get("/openapi.json").await.json().await.unwrap();
    let schemes = &document["components"]["securitySchemes"];
    for scheme in ["api_key", "operator"] {
        assert_eq!(schemes[scheme]["scheme"], "bearer", "{scheme}");
    }
    let codes = &document["components"]["schemas"]["ErrorCode"]["enum"];
    for code in ["validation_failed", "stale_claim", "overloaded", "internal"] {
        assert!(
            codes.as_array().unwrap().iter().any(|c| c == code),
            "{code}"
        );
    }
    // Enums show the names on the wire.
    let statuses = &document["components"]["schemas"]["CommandStatus"]["enum"];
    assert_eq!(
        statuses,
        &serde_json::json!([
            "pending",
            "executing",
            "completed",
            "failed",
            "cancelled",
            "dead"
        ])
    );
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let security = operation["security"].to_string();
            if path.starts_with("/v1/admin/") {
                assert!(security.contains("\"operator\""), "{method} {path}");
            } else if path.starts_with("/v1/") {
                assert!(security.contains("\"api_key\""), "{method} {path}");
                assert!(
                    operation["responses"]["401"]["content"]["application/json"]["schema"]["$ref"]
                        == "#/components/schemas/ErrorBody",
                    "{method} {path}"
                );
            }
        }
    }
}

#[tokio::test]
async fn the_documented_lease_range_is_the_one_keel_enforces() {
    let server = Server::start().await;
    let document: Value = server.get("/openapi.json").await.json().await.unwrap();
    let lease = &document["components"]["schemas"]["CreateCommand"]["properties"]["lease_seconds"];
    assert_eq!(lease["minimum"], keel_store::MIN_LEASE_SECONDS, "{lease}");
    assert_eq!(lease["maximum"], keel_store::MAX_LEASE_SECONDS, "{lease}");
}
