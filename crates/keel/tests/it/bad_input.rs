//! Bad input on every route, generated from the OpenAPI document rather than hand-picked: each
//! route that takes a body refuses a malformed one, a wrong content type, a body of the wrong
//! shape and an unknown field; each typed query parameter refuses a value of the wrong type.
//! Every refusal is a documented 4xx with the JSON error, and nothing the API shows changes.

use serde_json::{Value, json};

use crate::harness::{Api, Server};

/// A concrete path for a documented one: ids that name nothing, the organisation, a job, a queue.
fn concrete(path: &str) -> String {
    path.replace("{id}", "01a22513-ba98-70aa-884d-bbbc383d3f6c")
        .replace("{org}", "acme")
        .replace("{name}", "release_stuck")
        .replace("{queue}", "deploy")
}

/// Sends one request with the first key that the route's scope admits (an organisation's key
/// answers 403 on the operator's routes and an operator's on the organisation's).
async fn send(
    keys: &[&Api],
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> (u16, String) {
    let mut answer = (0, String::new());
    for key in keys {
        let response = key
            .client
            .request(method.parse().unwrap(), format!("{}{path}", key.base))
            .bearer_auth(&key.token)
            .header("content-type", content_type)
            .body(body.to_owned())
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        answer = (status, response.text().await.unwrap());
        if status != 403 {
            break;
        }
    }
    answer
}

/// What every parameterless read shows, to compare before and after.
async fn everything_shown(document: &Value, keys: &[&Api]) -> Vec<(String, Value)> {
    // These move on their own: component heartbeats, job ticks, uptime.
    let moving = [
        "/v1/admin/components",
        "/v1/admin/jobs",
        "/v1/admin/fleet",
        "/v1/admin/panics",
    ];
    let mut shown = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        if item.get("get").is_none()
            || !path.starts_with("/v1/")
            || path.contains('{')
            || moving.contains(&path.as_str())
        {
            continue;
        }
        let (status, text) = send(keys, "GET", path, "application/json", "").await;
        assert_eq!(status, 200, "GET {path}: {text}");
        shown.push((path.clone(), serde_json::from_str(&text).unwrap()));
    }
    shown
}

/// A bad value for a typed query parameter, or `None` for a free string.
fn bad_value(parameter: &Value) -> Option<&'static str> {
    if parameter["in"] != "query" {
        return None;
    }
    let schema = &parameter["schema"];
    let typed = schema.get("$ref").is_some()
        || schema["type"] == "integer"
        || schema["type"]
            .as_array()
            .is_some_and(|types| types.iter().any(|t| t == "integer"))
        || schema["format"] == "date-time";
    typed.then_some("not-a-valid-value")
}

#[tokio::test]
async fn every_route_refuses_bad_input_with_its_documented_4xx_and_changes_nothing() {
    let server = Server::start().await;
    server.create_org("acme");
    let tenant = server.key("acme", "admin,agent", Some("probe"));
    let operator = server.operator();
    let keys = [&tenant, &operator];
    // Something to show and to keep: a command and a channel.
    tenant
        .post(
            "/v1/commands",
            &json!({"type": "deploy", "queue": "deploy"}),
            201,
        )
        .await;
    tenant
        .post(
            "/v1/channels",
            &json!({"name": "mail", "type": "email", "recipients": ["a@example.com"]}),
            201,
        )
        .await;
    let document: Value = server.get("/openapi.json").await.json().await.unwrap();
    let before = everything_shown(&document, &keys).await;

    let mut checked = 0;
    let mut wrong = Vec::new();
    for (path, item) in document["paths"].as_object().unwrap() {
        for (method, operation) in item.as_object().unwrap() {
            let target = concrete(path);
            let method = method.to_uppercase();
            let mut check = |what: String, status: u16, text: &str, fits: bool| {
                let error: Value = serde_json::from_str(text).unwrap_or_default();
                let documented = operation["responses"].get(status.to_string()).is_some();
                if !fits || !documented || !error["error"]["code"].is_string() {
                    wrong.push(format!("{method} {what}: {status} {text}"));
                }
                checked += 1;
            };
            if operation.get("requestBody").is_some() {
                for (content_type, body, expected) in [
                    ("application/json", "{\"a\": ", 400),
                    ("text/plain", "{}", 415),
                    ("application/json", "[]", 422),
                    ("application/json", "{\"no_such_field\": 1}", 422),
                ] {
                    let (status, text) = send(&keys, &method, &target, content_type, body).await;
                    check(format!("{path} {body}"), status, &text, status == expected);
                }
            }
            for parameter in operation["parameters"].as_array().into_iter().flatten() {
                let Some(value) = bad_value(parameter) else {
                    continue;
                };
                let name = parameter["name"].as_str().unwrap();
                let query = format!("{target}?{name}={value}");
                let (status, text) = send(&keys, &method, &query, "application/json", "").await;
                // A 400 or 422 whose message names the parameter it refuses.
                let fits = (status == 400 || status == 422) && text.contains(name);
                check(query, status, &text, fits);
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(checked > 100, "too few cases: {checked}");
    let after = everything_shown(&document, &keys).await;
    for ((path, was), (_, is)) in before.iter().zip(&after) {
        assert_eq!(was, is, "GET {path} changed");
    }
    // The comparison saw what was there: the command and the channel.
    let shown = |path: &str| {
        let (_, answer) = before.iter().find(|(p, _)| p == path).unwrap();
        answer.to_string()
    };
    assert!(shown("/v1/commands").contains("\"deploy\""));
    assert!(shown("/v1/channels").contains("a@example.com"));
}
