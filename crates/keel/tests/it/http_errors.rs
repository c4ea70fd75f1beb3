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
