//! Fair sharing and overload on the real server: per-organisation rate limits, the cap on
//! waiting long-polls, the in-flight limit with room kept for agent reports, and pressure set
//! by an operator (docs/overload.md).

use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use crate::harness::{ADMIN_TOKEN, Api, Options, Server, metric, poll_until};

/// A refusal as the client sees it.
struct Answer {
    status: StatusCode,
    retry_after: Option<u64>,
    body: Value,
}

async fn send(api: &Api, method: Method, path: &str, body: Option<&Value>) -> Answer {
    let mut request = api
        .client
        .request(method, format!("{}{path}", api.base))
        .bearer_auth(&api.token);
    if let Some(body) = body {
        request = request.json(body);
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    let retry_after = response
        .headers()
        .get("retry-after")
        .map(|value| value.to_str().unwrap().parse().unwrap());
    let text = response.text().await.unwrap();
    Answer {
        status,
        retry_after,
        body: serde_json::from_str(&text).unwrap_or(Value::Null),
    }
}

/// Checks a 429 or 503 in keel's error shape with a `Retry-After` of at least a second.
fn assert_refused(answer: &Answer, status: StatusCode, code: &str) {
    assert_eq!(answer.status, status, "{}", answer.body);
    assert_eq!(answer.body["error"]["code"], code, "{}", answer.body);
    assert!(answer.body["error"]["request_id"].is_string());
    assert!(answer.retry_after.is_some_and(|seconds| seconds >= 1));
}

fn create_body(priority: i32) -> Value {
    json!({"type": "t", "queue": "q", "priority": priority})
}

/// Sends GET /v1/commands until the organisation's work bucket is empty; the 429.
async fn exhaust_work_bucket(ops: &Api) -> Answer {
    for _ in 0..100 {
        let answer = send(ops, Method::GET, "/v1/commands", None).await;
        if answer.status != StatusCode::OK {
            return answer;
        }
    }
    panic!("100 requests at 1 per second with a burst of 3 were never limited");
}

/// A server with `extra_toml` and the organisations `a` and `b`.
async fn start_with_orgs_a_and_b(extra_toml: &'static str) -> Server {
    let server = Server::start_with(Options {
        extra_toml,
        ..Options::default()
    })
    .await;
    server.create_org("a");
    server.create_org("b");
    server
}

/// Claims one command as `agent`: its id and the body that carries its claim token.
async fn claim_one(agent: &Api) -> (String, Value) {
    let claimed = agent
        .post("/v1/commands/claim", &json!({"limit": 1}), 200)
        .await;
    let command = &claimed["commands"][0];
    let id = command["id"].as_str().unwrap().to_owned();
    (id, json!({"claim_token": command["claim_token"]}))
}

async fn admin_put_mode(server: &Server, mode: &str) -> reqwest::Response {
    server
        .client
        .put(server.url("/v1/admin/overload"))
        .bearer_auth(ADMIN_TOKEN)
        .json(&json!({ "mode": mode }))
        .send()
        .await
        .unwrap()
}

const SMALL_WORK_BUCKET: &str = r#"
[overload.rate_limits]
work_per_second = 1
work_burst = 3

[overload.orgs.roomy]
work_per_second = 1000
work_burst = 1000
"#;

#[tokio::test]
async fn an_org_over_its_rate_limit_gets_429_with_retry_after_while_others_are_served() {
    let server = Server::start_with(Options {
        extra_toml: SMALL_WORK_BUCKET,
        ..Options::default()
    })
    .await;
    for org in ["flood", "quiet", "roomy"] {
        server.create_org(org);
    }
    let flood = server.key("flood", "commands:read", None);
    let quiet = server.key("quiet", "commands:read", None);
    let roomy = server.key("roomy", "commands:read", None);

    let limited = exhaust_work_bucket(&flood).await;
    assert_refused(&limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    quiet.get("/v1/commands", 200).await;
    // The organisation named in `overload.orgs` has its own, larger bucket.
    for _ in 0..20 {
        roomy.get("/v1/commands", 200).await;
    }
    let metrics = server.metrics().await;
    assert!(
        metric(
            &metrics,
            "keel_overload_rejected_total{reason=\"rate_limit\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
}

const BATCH_BUCKET: &str = r#"
[overload.rate_limits]
work_per_second = 1
work_burst = 10
"#;

#[tokio::test]
async fn each_command_of_a_batch_draws_a_token_of_its_org_s_work_bucket() {
    let server = Server::start_with(Options {
        extra_toml: BATCH_BUCKET,
        ..Options::default()
    })
    .await;
    server.create_org("acme");
    let ops = server.key("acme", "commands:write,commands:read", None);
    let batch = |n: usize| json!({"commands": vec![create_body(0); n]});

    // More than the bucket can ever hold: 422 naming the burst, nothing created.
    let over = send(&ops, Method::POST, "/v1/commands/batch", Some(&batch(11))).await;
    assert_eq!(
        over.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "{}",
        over.body
    );
    let message = over.body["error"]["message"].as_str().unwrap();
    assert!(message.contains("burst of 10"), "{message}");
    // 8 fit in what is left (10, less the one the 422 drew); 8 more do not, right after.
    let first = send(&ops, Method::POST, "/v1/commands/batch", Some(&batch(8))).await;
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.body);
    let second = send(&ops, Method::POST, "/v1/commands/batch", Some(&batch(8))).await;
    assert_refused(&second, StatusCode::TOO_MANY_REQUESTS, "rate_limited");

    // The refused batch created nothing.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let listed = ops.get("/v1/commands?limit=100", 200).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 8);
}

#[tokio::test]
async fn agent_reports_go_through_while_their_org_and_another_are_rate_limited_on_work() {
    let server = start_with_orgs_a_and_b(SMALL_WORK_BUCKET).await;
    let a_ops = server.key("a", "commands:write,commands:read", None);
    let a_agent = server.key("a", "agent", Some("a1"));
    let b_ops = server.key("b", "commands:write,commands:read", None);
    let b_agent = server.key("b", "agent", Some("b1"));
    a_agent.check_in(&["q"]).await;
    b_agent.check_in(&["q"]).await;
    a_ops.post("/v1/commands", &create_body(0), 201).await;
    b_ops.post("/v1/commands", &create_body(0), 201).await;

    let limited = exhaust_work_bucket(&a_ops).await;
    assert_refused(&limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    let limited = exhaust_work_bucket(&b_ops).await;
    assert_refused(&limited, StatusCode::TOO_MANY_REQUESTS, "rate_limited");

    // Both organisations' agents claim, heartbeat and complete: their bucket is another.
    for agent in [&a_agent, &b_agent] {
        let (id, token) = claim_one(agent).await;
        agent
            .post(&format!("/v1/commands/{id}/heartbeat"), &token, 200)
            .await;
        let done = agent
            .post(&format!("/v1/commands/{id}/complete"), &token, 200)
            .await;
        assert_eq!(done["status"], "completed");
    }
}

#[tokio::test]
async fn waiting_long_polls_are_capped_per_agent_and_per_org() {
    let server = start_with_orgs_a_and_b(
        "[overload]\nmax_waiting_claims_per_agent = 1\nmax_waiting_claims_per_org = 2\n",
    )
    .await;
    let ops = server.key("a", "commands:write", None);
    let agents: Vec<Api> = ["a1", "a2", "a3"]
        .into_iter()
        .map(|name| server.key("a", "agent", Some(name)))
        .collect();
    let other_org_agent = server.key("b", "agent", Some("b1"));
    for agent in agents.iter().chain([&other_org_agent]) {
        agent.check_in(&["q"]).await;
    }
    let long_poll = json!({"limit": 1, "wait_seconds": 30});
    let waiting: Vec<_> = agents[..2]
        .iter()
        .map(|agent| {
            let agent = agent.clone();
            let body = long_poll.clone();
            tokio::spawn(async move { agent.post("/v1/commands/claim", &body, 200).await })
        })
        .collect();
    poll_until(Duration::from_secs(10), || async {
        server.admin_get("/v1/admin/overload").await["waiting_claims"] == 2
    })
    .await;

    let second_of_agent = send(
        &agents[0],
        Method::POST,
        "/v1/commands/claim",
        Some(&long_poll),
    )
    .await;
    assert_refused(
        &second_of_agent,
        StatusCode::TOO_MANY_REQUESTS,
        "rate_limited",
    );
    assert!(
        second_of_agent.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("agent")
    );
    let third_of_org = send(
        &agents[2],
        Method::POST,
        "/v1/commands/claim",
        Some(&long_poll),
    )
    .await;
    assert_refused(&third_of_org, StatusCode::TOO_MANY_REQUESTS, "rate_limited");
    assert!(
        third_of_org.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("organisation")
    );
    // A claim that does not wait is not capped, and another organisation is not affected.
    agents[2]
        .post("/v1/commands/claim", &json!({"limit": 1}), 200)
        .await;
    other_org_agent
        .post(
            "/v1/commands/claim",
            &json!({"limit": 1, "wait_seconds": 1}),
            200,
        )
        .await;

    // Work for both waiting claims ends their wait and frees their places.
    for _ in 0..2 {
        ops.post("/v1/commands", &create_body(0), 201).await;
    }
    for waiter in waiting {
        let answer = waiter.await.unwrap();
        assert_eq!(answer["commands"].as_array().unwrap().len(), 1);
    }
    assert_eq!(
        server.admin_get("/v1/admin/overload").await["waiting_claims"],
        0
    );
}

/// Opens a `POST /v1/commands` whose body never finishes arriving, so the request holds its
/// in-flight slot until the connection is dropped.
async fn hold_a_slot(server: &Server, api: &Api) -> tokio::net::TcpStream {
    let address = server.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    let head = format!(
        "POST /v1/commands HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {}\r\n\
         Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{\"type\"",
        api.token
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream
}

#[tokio::test]
async fn over_the_in_flight_limit_requests_get_503_and_reports_still_go_through() {
    let server =
        start_with_orgs_a_and_b("[overload]\nmax_in_flight = 2\nreserved_for_reports = 1\n").await;
    let a_ops = server.key("a", "commands:write,commands:read", None);
    let b_ops = server.key("b", "commands:write,commands:read", None);
    let b_agent = server.key("b", "agent", Some("b1"));
    b_agent.check_in(&["q"]).await;
    b_ops.post("/v1/commands", &create_body(0), 201).await;
    let (id, token) = claim_one(&b_agent).await;
    let heartbeat = format!("/v1/commands/{id}/heartbeat");

    let held = hold_a_slot(&server, &a_ops).await;
    poll_until(Duration::from_secs(10), || async {
        server.admin_get("/v1/admin/overload").await["in_flight"] == 1
    })
    .await;

    let shed = send(&b_ops, Method::GET, "/v1/commands", None).await;
    assert_refused(&shed, StatusCode::SERVICE_UNAVAILABLE, "overloaded");
    // The slot kept for reports takes the heartbeat; claims are not counted.
    b_agent.post(&heartbeat, &token, 200).await;
    b_agent
        .post("/v1/commands/claim", &json!({"limit": 1}), 200)
        .await;

    drop(held);
    poll_until(Duration::from_secs(10), || async {
        server.admin_get("/v1/admin/overload").await["in_flight"] == 0
    })
    .await;
    b_ops.get("/v1/commands", 200).await;
    let metrics = server.metrics().await;
    assert!(
        metric(
            &metrics,
            "keel_overload_rejected_total{reason=\"in_flight\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_operator_set_pressure_sheds_low_priority_creates_and_not_reports() {
    let server = Server::start().await;
    server.create_org("a");
    let ops = server.key("a", "commands:write,commands:read", None);
    let agent = server.key("a", "agent", Some("a1"));
    agent.check_in(&["q"]).await;
    ops.post("/v1/commands", &create_body(0), 201).await;
    let (id, token) = claim_one(&agent).await;
    assert_eq!(
        metric(&server.metrics().await, "keel_overload_pressure"),
        Some(0.0)
    );

    let set = admin_put_mode(&server, "critical").await;
    assert_eq!(set.status(), StatusCode::OK);
    let view: Value = set.json().await.unwrap();
    assert_eq!(view["mode"], "critical");
    assert_eq!(view["pressure"], "critical");
    assert_eq!(view["measured"], "normal");
    assert_eq!(
        metric(&server.metrics().await, "keel_overload_pressure"),
        Some(2.0)
    );
    let shed = send(&ops, Method::POST, "/v1/commands", Some(&create_body(499))).await;
    assert_refused(&shed, StatusCode::SERVICE_UNAVAILABLE, "overloaded");
    ops.post("/v1/commands", &create_body(500), 201).await;
    agent
        .post(&format!("/v1/commands/{id}/heartbeat"), &token, 200)
        .await;
    ops.get("/v1/commands", 200).await;

    assert_eq!(admin_put_mode(&server, "elevated").await.status(), 200);
    let shed = send(&ops, Method::POST, "/v1/commands", Some(&create_body(-1))).await;
    assert_refused(&shed, StatusCode::SERVICE_UNAVAILABLE, "overloaded");
    ops.post("/v1/commands", &create_body(0), 201).await;
    agent
        .post(&format!("/v1/commands/{id}/complete"), &token, 200)
        .await;

    assert_eq!(admin_put_mode(&server, "auto").await.status(), 200);
    ops.post("/v1/commands", &create_body(-1000), 201).await;
    assert_eq!(
        metric(&server.metrics().await, "keel_overload_pressure"),
        Some(0.0)
    );
    assert_eq!(
        admin_put_mode(&server, "panic").await.status(),
        StatusCode::UNPROCESSABLE_ENTITY
    );
    let org_key = server
        .client
        .put(server.url("/v1/admin/overload"))
        .bearer_auth(&ops.token)
        .json(&json!({"mode": "normal"}))
        .send()
        .await
        .unwrap();
    assert_eq!(org_key.status(), StatusCode::FORBIDDEN);

    poll_until(Duration::from_secs(10), || async {
        let modes: Vec<Value> = server
            .log_records()
            .into_iter()
            .filter(|record| record["stream"] == "audit" && record["action"] == "overload.mode")
            .map(|record| record["mode"].clone())
            .collect();
        modes == [json!("critical"), json!("elevated"), json!("auto")]
    })
    .await;
}

#[tokio::test]
async fn measured_pressure_sheds_low_priority_creates_and_shows_in_metrics_and_admin() {
    // 2 000 writes waiting: between `elevated_queue_depth` (1 000) and `critical` (5 000).
    let server = Server::start_with(Options {
        failpoints: Some("overload.pressure=return(2000,0)"),
        ..Options::default()
    })
    .await;
    server.create_org("a");
    let ops = server.key("a", "commands:write,commands:read", None);
    let agent = server.key("a", "agent", Some("a1"));
    agent.check_in(&["q"]).await;

    let view = server.admin_get("/v1/admin/overload").await;
    assert_eq!(view["mode"], "auto");
    assert_eq!(view["pressure"], "elevated");
    assert_eq!(view["queue_depth"], 2000);
    let metrics = server.metrics().await;
    assert_eq!(metric(&metrics, "keel_overload_pressure"), Some(1.0));
    assert_eq!(
        metric(&metrics, "keel_overload_pressure_measured"),
        Some(1.0)
    );

    let shed = send(&ops, Method::POST, "/v1/commands", Some(&create_body(-1))).await;
    assert_refused(&shed, StatusCode::SERVICE_UNAVAILABLE, "overloaded");
    ops.post("/v1/commands", &create_body(0), 201).await;
    let (id, token) = claim_one(&agent).await;
    agent
        .post(&format!("/v1/commands/{id}/heartbeat"), &token, 200)
        .await;

    // The operator's `normal` wins over what is measured.
    assert_eq!(admin_put_mode(&server, "normal").await.status(), 200);
    ops.post("/v1/commands", &create_body(-1), 201).await;
    let metrics = server.metrics().await;
    assert_eq!(metric(&metrics, "keel_overload_pressure"), Some(0.0));
    assert_eq!(
        metric(&metrics, "keel_overload_pressure_measured"),
        Some(1.0)
    );
    assert_eq!(metric(&metrics, "keel_overload_mode_override"), Some(1.0));
}
