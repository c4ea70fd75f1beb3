//! Every kind of bad request gets its documented JSON error, with the request id.

use reqwest::StatusCode;
use serde_json::Value;

use crate::harness::{ADMIN_TOKEN, Options, Server};

async fn error_of(response: reqwest::Response) -> (StatusCode, Value) {
    let status = response.status();
    let request_id = response
        .headers()
        .get("x-request-id")
        .expect("every response carries x-request-id")
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        response.headers()["content-type"],
        "application/json",
        "error bodies are JSON"
    );
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["request_id"], request_id.as_str());
    (status, body["error"].clone())
}

#[tokio::test]
async fn each_bad_request_gets_its_json_error() {
    let server = Server::start().await;
    let filters = server.url("/v1/admin/log-filters");
    let filters_before = server.admin_get("/v1/admin/log-filters").await;

    // Unknown route: 404.
    let (status, error) = error_of(server.get("/no/such/route").await).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error["code"], "not_found");

    // Wrong method: 405.
    let response = server
        .client
        .post(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(error["code"], "method_not_allowed");

    // Malformed JSON: 400.
    let response = server
        .client
        .put(&filters)
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body("{\"app\": ")
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error["code"], "malformed_json");

    // Wrong content type: 415.
    let response = server
        .client
        .put(&filters)
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!(status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(error["code"], "unsupported_media_type");

    // Well-formed JSON that is not a valid request: 422.
    let response = server
        .client
        .put(&filters)
        .bearer_auth(ADMIN_TOKEN)
        .json(&serde_json::json!({"app": {"level": "loud"}}))
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error["code"], "validation_failed");

    // Over the body limit (1 MiB by default): 413.
    let big = format!("{{\"pad\": \"{}\"}}", "x".repeat(1024 * 1024 + 1));
    let response = server
        .client
        .put(&filters)
        .bearer_auth(ADMIN_TOKEN)
        .header("content-type", "application/json")
        .body(big)
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error["code"], "payload_too_large");
    assert!(error["message"].as_str().unwrap().contains("1048576"));

    // No admin token, or a wrong one: 401.
    let (status, error) = error_of(server.get("/v1/admin/components").await).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error["code"], "unauthorized");
    let response = server
        .client
        .get(server.url("/v1/admin/components"))
        .bearer_auth("not-the-token")
        .send()
        .await
        .unwrap();
    assert_eq!(error_of(response).await.0, StatusCode::UNAUTHORIZED);

    // The filters were not changed by any of the bad requests above.
    assert_eq!(
        server.admin_get("/v1/admin/log-filters").await,
        filters_before
    );
}

#[tokio::test]
async fn a_request_not_answered_in_time_gets_408() {
    let server = Server::start_with(Options {
        http: "request_timeout = \"300ms\"",
        failpoints: Some("http.delay=return(3000)"),
        ..Options::default()
    })
    .await;
    let response = server
        .client
        .get(server.url("/healthz"))
        .header("x-request-id", "slow-1")
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!(status, StatusCode::REQUEST_TIMEOUT);
    assert_eq!(error["code"], "timeout");
    assert_eq!(error["request_id"], "slow-1");
}

#[tokio::test]
async fn a_truncated_body_is_malformed_json_even_after_a_wrong_field() {
    let server = Server::start().await;
    server.create_org("acme");
    let agent = server.key("acme", "agent", Some("a1"));
    let id = "0193a1b2-0000-7000-8000-000000000000";
    // A wrong field comes before the end: serde meets it first, yet the body is not JSON.
    let truncated = "{\"not_a_field\": 1, \"limit\": ";
    let mut routes = vec![
        ("POST", "/v1/commands/claim".to_owned(), agent.token.clone()),
        (
            "POST",
            "/v1/agents/check-in".to_owned(),
            agent.token.clone(),
        ),
        (
            "PUT",
            "/v1/admin/jobs/telemetry/interval".to_owned(),
            ADMIN_TOKEN.to_owned(),
        ),
        (
            "PUT",
            "/v1/admin/log-filters".to_owned(),
            ADMIN_TOKEN.to_owned(),
        ),
    ];
    for action in ["heartbeat", "complete", "fail"] {
        routes.push((
            "POST",
            format!("/v1/commands/{id}/{action}"),
            agent.token.clone(),
        ));
    }
    for (method, path, token) in routes {
        let response = server
            .client
            .request(method.parse().unwrap(), server.url(&path))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body(truncated)
            .send()
            .await
            .unwrap();
        let (status, error) = error_of(response).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{method} {path}: {error}");
        assert_eq!(error["code"], "malformed_json", "{method} {path}");
        // The complete body with the same wrong field is well-formed: 422.
        let response = server
            .client
            .request(method.parse().unwrap(), server.url(&path))
            .bearer_auth(&token)
            .header("content-type", "application/json")
            .body("{\"not_a_field\": 1}")
            .send()
            .await
            .unwrap();
        let (status, error) = error_of(response).await;
        assert_eq!(
            status,
            StatusCode::UNPROCESSABLE_ENTITY,
            "{method} {path}: {error}"
        );
    }
}

#[tokio::test]
async fn log_filters_that_name_no_stream_are_refused_and_change_nothing() {
    let server = Server::start().await;
    let url = server.url("/v1/admin/log-filters");
    let mut filters = server.admin_get("/v1/admin/log-filters").await;
    filters["app"]["level"] = "warn".into();
    let response = server
        .client
        .put(&url)
        .bearer_auth(ADMIN_TOKEN)
        .json(&filters)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let before = server.admin_get("/v1/admin/log-filters").await;
    assert_eq!(before["app"]["level"], "warn");

    for (body, says) in [
        (serde_json::json!({}), "every stream"),
        (serde_json::json!([]), "must be a JSON object"),
        (
            serde_json::json!({"app": before["app"].clone()}),
            "every stream",
        ),
    ] {
        let response = server
            .client
            .put(&url)
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let (status, error) = error_of(response).await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        assert_eq!(error["code"], "validation_failed");
        assert!(error["message"].as_str().unwrap().contains(says), "{error}");
    }
    assert_eq!(server.admin_get("/v1/admin/log-filters").await, before);
}

#[tokio::test]
async fn an_idempotency_key_with_a_tab_is_refused() {
    let server = Server::start().await;
    server.create_org("acme");
    let ops = server.key("acme", "commands:write,commands:read", None);
    let response = server
        .client
        .post(server.url("/v1/commands"))
        .bearer_auth(&ops.token)
        .header(
            "idempotency-key",
            reqwest::header::HeaderValue::from_bytes(b"order\t42").unwrap(),
        )
        .json(&serde_json::json!({"type": "t", "queue": "q1"}))
        .send()
        .await
        .unwrap();
    let (status, error) = error_of(response).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("Idempotency-Key"),
        "{error}"
    );
    // Nothing was created.
    let listed = ops.get("/v1/commands", 200).await;
    assert_eq!(listed["items"], serde_json::json!([]), "{listed}");
}

/// A body refused with 413 before it was read still reaches the client as an answer: keel
/// reads and drops the rest of the body before it closes, so the client's last writes do not
/// reset the connection under its answer.
#[tokio::test]
async fn an_oversize_body_sent_in_full_gets_its_413_every_time() {
    let server = Server::start().await;
    let big = "x".repeat(4 * 1024 * 1024);
    for _ in 0..20 {
        let response = server
            .client
            .post(server.url("/v1/commands"))
            .bearer_auth("keel_nobody_0000")
            .header("content-type", "application/json")
            .body(big.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
