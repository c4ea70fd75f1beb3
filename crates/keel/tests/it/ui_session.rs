//! The operator page's session over plain HTTP: sign-in, the cookie's attributes, CSRF, a
//! revoked key ending its sessions, sign-out and the sign-in rate limit; and the operator routes
//! the page reads (command counts, agents, dead letters and their requeue).

use reqwest::StatusCode;
use reqwest::header::{COOKIE, SET_COOKIE};
use serde_json::{Value, json};

use crate::harness::{ADMIN_TOKEN, Server};

/// A signed-in page: its cookie and CSRF token.
struct Session {
    cookie: String,
    csrf: String,
}

async fn sign_in(server: &Server, key: &str) -> Session {
    let response = server
        .client
        .post(server.url("/ui/session"))
        .json(&json!({"key": key}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let cookie = response.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    let body: Value = response.json().await.unwrap();
    Session {
        cookie: cookie.split(';').next().unwrap().to_owned(),
        csrf: body["csrf_token"].as_str().unwrap().to_owned(),
    }
}

impl Session {
    async fn call(
        &self,
        server: &Server,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
        csrf: bool,
    ) -> (StatusCode, Value) {
        let mut request = server
            .client
            .request(method, server.url(path))
            .header(COOKIE, &self.cookie);
        if csrf {
            request = request.header("X-CSRF-Token", &self.csrf);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }
}

#[tokio::test]
async fn the_page_is_served_with_its_script_and_a_strict_policy() {
    let server = Server::start().await;
    let page = server.get("/ui/").await;
    assert_eq!(page.status(), StatusCode::OK);
    assert!(
        page.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let policy = page.headers()["content-security-policy"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(policy.contains("frame-ancestors 'none'"), "{policy}");
    assert!(page.text().await.unwrap().contains("app.js"));
    let script = server.get("/ui/app.js").await;
    assert_eq!(script.status(), StatusCode::OK);
    assert!(script.text().await.unwrap().contains("X-CSRF-Token"));
    assert_eq!(server.get("/ui/app.css").await.status(), StatusCode::OK);
    // `/ui` leads to the page.
    assert_eq!(server.get("/ui").await.status(), StatusCode::OK);
}

#[tokio::test]
async fn a_session_opens_the_operator_api_and_changes_need_its_csrf_token() {
    let server = Server::start().await;
    let operator = server.operator();

    // A wrong key: 401 in the JSON error shape, no cookie.
    let refused = server
        .client
        .post(server.url("/ui/session"))
        .json(&json!({"key": "nope"}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::UNAUTHORIZED);
    assert!(refused.headers().get(SET_COOKIE).is_none());
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "unauthorized");

    // The cookie: HttpOnly, SameSite=Strict, an expiry, Secure only behind TLS.
    let response = server
        .client
        .post(server.url("/ui/session"))
        .json(&json!({"key": operator.token}))
        .send()
        .await
        .unwrap();
    let cookie = response.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    for attribute in ["HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"] {
        assert!(cookie.contains(attribute), "{cookie}");
    }
    assert!(!cookie.contains("Secure"), "{cookie}");
    let behind_tls = server
        .client
        .post(server.url("/ui/session"))
        .header("X-Forwarded-Proto", "https")
        .json(&json!({"key": operator.token}))
        .send()
        .await
        .unwrap();
    let cookie = behind_tls.headers()[SET_COOKIE]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(cookie.contains("Secure"), "{cookie}");

    let session = sign_in(&server, &operator.token).await;
    let (status, current) = session
        .call(&server, reqwest::Method::GET, "/ui/session", None, false)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(current["csrf_token"], session.csrf.as_str());
    assert!(
        current["operator"]
            .as_str()
            .unwrap()
            .starts_with("operator-key:")
    );

    // Reads need no CSRF token.
    let (status, _) = session
        .call(
            &server,
            reqwest::Method::GET,
            "/v1/admin/components",
            None,
            false,
        )
        .await;
    assert_eq!(status, StatusCode::OK);

    // A change without the token: 403, and nothing changed.
    let (status, body) = session
        .call(
            &server,
            reqwest::Method::POST,
            "/v1/admin/organisations",
            Some(json!({"name": "no-token"})),
            false,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"]["code"], "forbidden");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("x-csrf-token")
    );
    let orgs = operator.get("/v1/admin/organisations", 200).await;
    assert!(!orgs.to_string().contains("no-token"));
    // A wrong token is no better.
    let wrong = Session {
        cookie: session.cookie.clone(),
        csrf: "0".repeat(64),
    };
    let (status, _) = wrong
        .call(
            &server,
            reqwest::Method::POST,
            "/v1/admin/organisations",
            Some(json!({"name": "wrong-token"})),
            true,
        )
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // With it: done, and audited under the operator's key.
    let (status, _) = session
        .call(
            &server,
            reqwest::Method::POST,
            "/v1/admin/organisations",
            Some(json!({"name": "with-token"})),
            true,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    // Bearer callers need no CSRF token.
    operator
        .post("/v1/admin/organisations", &json!({"name": "bearer"}), 201)
        .await;

    // Sign-out needs the token, then ends the session.
    let (status, _) = session
        .call(&server, reqwest::Method::DELETE, "/ui/session", None, false)
        .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = session
        .call(&server, reqwest::Method::DELETE, "/ui/session", None, true)
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    let (status, _) = session
        .call(
            &server,
            reqwest::Method::GET,
            "/v1/admin/components",
            None,
            false,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    // An unknown session id is no credential either.
    let forged = Session {
        cookie: "keel_session=forged".to_owned(),
        csrf: String::new(),
    };
    let (status, _) = forged
        .call(
            &server,
            reqwest::Method::GET,
            "/v1/admin/components",
            None,
            false,
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn revoking_the_operator_key_ends_its_sessions() {
    let server = Server::start().await;
    let created = server.admin_cli(&["create-operator-key", "--name", "leaving"]);
    let session = sign_in(&server, &created).await;
    let (status, _) = session
        .call(&server, reqwest::Method::GET, "/v1/admin/jobs", None, false)
        .await;
    assert_eq!(status, StatusCode::OK);
    let listed = server.admin_cli(&["list-operator-keys"]);
    let id = listed
        .lines()
        .find(|line| line.contains("leaving"))
        .and_then(|line| {
            line.split_whitespace()
                .find(|w| uuid::Uuid::parse_str(w).is_ok())
        })
        .unwrap_or_else(|| panic!("no key id in {listed}"))
        .to_owned();
    server.admin_cli(&["revoke-operator-key", &id]);
    let (status, _) = session
        .call(&server, reqwest::Method::GET, "/v1/admin/jobs", None, false)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let (status, _) = session
        .call(&server, reqwest::Method::GET, "/ui/session", None, false)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // The admin token signs in too.
    let admin = sign_in(&server, ADMIN_TOKEN).await;
    let (status, body) = admin
        .call(&server, reqwest::Method::GET, "/ui/session", None, false)
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["operator"], "admin-token");

    // Signing in again from the same page ends its previous session.
    let again = server
        .client
        .post(server.url("/ui/session"))
        .header(COOKIE, &admin.cookie)
        .json(&json!({"key": ADMIN_TOKEN}))
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    let (status, _) = admin
        .call(&server, reqwest::Method::GET, "/ui/session", None, false)
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn repeated_sign_in_failures_are_rate_limited() {
    let server = Server::start().await;
    let mut statuses = Vec::new();
    for _ in 0..8 {
        let response = server
            .client
            .post(server.url("/ui/session"))
            .json(&json!({"key": "guess"}))
            .send()
            .await
            .unwrap();
        statuses.push(response.status().as_u16());
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(response.headers().contains_key("retry-after"));
            let body: Value = response.json().await.unwrap();
            assert_eq!(body["error"]["code"], "rate_limited");
        }
    }
    assert_eq!(&statuses[..5], &[401; 5], "{statuses:?}");
    assert_eq!(&statuses[5..], &[429; 3], "{statuses:?}");
}

#[tokio::test]
async fn operators_see_counts_agents_and_dead_letters_of_every_organisation_and_requeue_them() {
    let server = Server::start_with(crate::harness::Options {
        extra_toml: "[commands]\nrelease_stuck_interval = \"100ms\"\n",
        ..Default::default()
    })
    .await;
    let operator = server.operator();
    server.create_org("acme");
    server.create_org("zeta");
    let acme = server.key("acme", "admin", None);
    let zeta = server.key("zeta", "admin", None);
    let agent = server.key("acme", "agent", Some("web-1"));
    agent.check_in(&["q"]).await;
    let dying = acme
        .post(
            "/v1/commands",
            &json!({"type": "t", "queue": "q", "max_attempts": 1, "lease_seconds": 5}),
            201,
        )
        .await;
    zeta.post("/v1/commands", &json!({"type": "t", "queue": "q"}), 201)
        .await;
    agent
        .post(
            "/v1/commands/claim",
            &json!({"limit": 1, "queues": ["q"]}),
            200,
        )
        .await;

    let summary = operator.get("/v1/admin/commands/summary", 200).await;
    assert_eq!(summary["by_status"]["executing"], 1, "{summary}");
    assert_eq!(summary["by_status"]["pending"], 1, "{summary}");
    assert_eq!(summary["finished_per_minute"].as_array().unwrap().len(), 60);
    let agents = operator.get("/v1/admin/agents", 200).await;
    assert_eq!(agents["online"], 1, "{agents}");
    assert_eq!(agents["agents"][0]["org"], "acme");
    assert_eq!(agents["agents"][0]["name"], "web-1");

    let id = dying["id"].as_str().unwrap();
    crate::harness::poll_until(std::time::Duration::from_secs(20), || async {
        let dead = operator.get("/v1/admin/dead-commands", 200).await;
        dead["items"]
            .as_array()
            .is_some_and(|items| items.len() == 1)
    })
    .await;
    let dead = operator.get("/v1/admin/dead-commands?limit=10", 200).await;
    assert_eq!(dead["items"][0]["org"], "acme");
    assert_eq!(dead["items"][0]["id"], id);
    assert_eq!(dead["truncated"], false);
    let summary = operator.get("/v1/admin/commands/summary", 200).await;
    let finished: u64 = summary["finished_per_minute"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["dead"].as_u64().unwrap())
        .sum();
    assert_eq!(finished, 1, "{summary}");

    let unknown = uuid::Uuid::now_v7().to_string();
    let result = operator
        .post(
            "/v1/admin/dead-commands/requeue",
            &json!({"commands": [
                {"org": "acme", "id": id},
                {"org": "zeta", "id": id},
                {"org": "nobody", "id": unknown},
            ]}),
            200,
        )
        .await;
    assert_eq!(result["requeued"][0]["id"], id, "{result}");
    assert_eq!(result["requeued"][0]["status"], "pending");
    let codes: Vec<&str> = result["not_requeued"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["code"].as_str().unwrap())
        .collect();
    assert_eq!(codes, ["not_found", "not_found"], "{result}");
    assert_eq!(
        acme.get(&format!("/v1/commands/{id}"), 200).await["status"],
        "pending"
    );

    // Bad input: 422 or 400, never 500.
    operator
        .post(
            "/v1/admin/dead-commands/requeue",
            &json!({"commands": []}),
            422,
        )
        .await;
    operator
        .post(
            "/v1/admin/dead-commands/requeue",
            &json!({"commands": [{"org": "acme", "id": "x"}]}),
            422,
        )
        .await;
    operator.get("/v1/admin/dead-commands?limit=0", 422).await;
    operator.get("/v1/admin/dead-commands?limit=x", 422).await;
    // Organisations' keys never open them.
    acme.get("/v1/admin/commands/summary", 403).await;
}
