//! The notifications API over real HTTP: settings, triggers (classify, route, render, queue),
//! idempotency, refusals, scopes, organisation isolation and sealed secrets.

use reqwest::Method;
use serde_json::{Value, json};

use crate::harness::{Api, Server};

struct Setup {
    server: Server,
    ops: Api,
}

async fn setup() -> Setup {
    let server = Server::start().await;
    server.create_org("acme");
    let ops = server.key("acme", "notifications:write,notifications:read", None);
    Setup { server, ops }
}

/// A webhook sender, a webhook channel and an email channel, routed for every event.
async fn configure(ops: &Api) -> (String, String) {
    let sender = ops
        .post(
            "/v1/senders",
            &json!({"name": "signing", "type": "webhook",
                    "secrets": {"signing_secrets": ["whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"]}}),
            201,
        )
        .await;
    let webhook = ops
        .post(
            "/v1/channels",
            &json!({"name": "hook", "type": "webhook", "url": "http://127.0.0.1:9/hook",
                    "sender_id": sender["id"]}),
            201,
        )
        .await;
    let email = ops
        .post(
            "/v1/channels",
            &json!({"name": "ops mail", "type": "email",
                    "recipients": ["a@example.com", "b@example.com"]}),
            201,
        )
        .await;
    ops.post(
        "/v1/routes",
        &json!({"name": "everything", "severities": ["critical", "high"]}),
        201,
    )
    .await;
    (
        webhook["id"].as_str().unwrap().to_owned(),
        email["id"].as_str().unwrap().to_owned(),
    )
}

fn ids(answer: &Value) -> Vec<String> {
    let mut ids: Vec<String> = answer["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn an_event_is_classified_routed_rendered_and_queued_once() {
    let Setup {
        server: _server,
        ops,
    } = setup().await;
    let (webhook, _) = configure(&ops).await;
    ops.post(
        "/v1/templates",
        &json!({"event_type": "order_failed", "channel_type": "email",
                "subject": "Order {{ payload.order }} failed",
                "body": "Order {{ payload.order }}: {{ payload.reason }}"}),
        201,
    )
    .await;

    let body = json!({"event_type": "order_failed", "payload": {"order": 42, "reason": "card declined"},
                      "idempotency_key": "order-42"});
    let first = ops.post("/v1/events", &body, 202).await;
    assert_eq!(first["severity"], "high");
    assert_eq!(first["domain"], "order");
    assert_eq!(first["created"], true);
    // One webhook endpoint and two email recipients.
    assert_eq!(ids(&first).len(), 3);

    // The same key again creates nothing and answers the same deliveries.
    let again = ops.post("/v1/events", &body, 202).await;
    assert_eq!(again["created"], false);
    assert_eq!(ids(&again), ids(&first));
    let listed = ops.get("/v1/deliveries", 200).await;
    assert_eq!(listed["items"].as_array().unwrap().len(), 3);
    // Another body under the same key is refused.
    let other = json!({"event_type": "order_failed", "payload": {"order": 43, "reason": "x"},
                       "idempotency_key": "order-42"});
    let refused = ops.post("/v1/events", &other, 409).await;
    assert_eq!(refused["error"]["code"], "idempotency_mismatch");

    let emails = ops.get("/v1/deliveries?channel_type=email", 200).await;
    let emails = emails["items"].as_array().unwrap();
    assert_eq!(emails.len(), 2);
    assert_eq!(emails[0]["subject"], "Order 42 failed");
    assert_eq!(emails[0]["body"], "Order 42: card declined");
    assert_eq!(emails[0]["priority"], 50);
    let hook = ops.get("/v1/deliveries?channel_type=webhook", 200).await;
    let hook = &hook["items"][0];
    assert_eq!(hook["channel_id"].as_str().unwrap(), webhook);
    let sent: Value = serde_json::from_str(hook["body"].as_str().unwrap()).unwrap();
    assert_eq!(sent["type"], "order_failed");
    assert_eq!(sent["data"]["order"], 42);
    let one = ops
        .get(
            &format!("/v1/deliveries/{}", hook["id"].as_str().unwrap()),
            200,
        )
        .await;
    assert_eq!(one["id"], hook["id"]);
    assert!(one["attempt_history"].is_array());

    // No route matches an info event: 202 and nothing queued.
    let none = ops
        .post("/v1/events", &json!({"event_type": "order_created"}), 202)
        .await;
    assert_eq!(none["severity"], "info");
    assert_eq!(none["deliveries"], json!([]));
}

#[tokio::test]
async fn a_template_that_does_not_render_queues_nothing() {
    let Setup {
        server: _server,
        ops,
    } = setup().await;
    configure(&ops).await;
    ops.post(
        "/v1/templates",
        &json!({"event_type": "site_down", "channel_type": "email",
                "subject": "down", "body": "{{ payload.host.name }} is down"}),
        201,
    )
    .await;
    let refused = ops
        .post(
            "/v1/events",
            &json!({"event_type": "site_down", "payload": {"site": "shop"}}),
            422,
        )
        .await;
    let message = refused["error"]["message"].as_str().unwrap();
    assert!(message.contains("site_down/email"), "{message}");
    assert!(message.contains("undefined"), "{message}");
    let listed = ops.get("/v1/deliveries", 200).await;
    assert_eq!(
        listed["items"],
        json!([]),
        "not even the webhook's delivery"
    );

    // The preview says the same, and renders with a payload that has the field.
    let preview = json!({"event_type": "site_down", "channel_type": "email",
                         "payload": {"host": {"name": "web-1"}}});
    let rendered = ops.post("/v1/templates/preview", &preview, 200).await;
    assert_eq!(rendered["body"], "web-1 is down");
    assert_eq!(rendered["severity"], "critical");
    let broken = json!({"event_type": "site_down", "channel_type": "email", "body": "{{ nope }}"});
    let refused = ops.post("/v1/templates/preview", &broken, 422).await;
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("undefined")
    );
}

#[tokio::test]
async fn settings_refuse_bad_input_and_keep_secrets_sealed() {
    let Setup { server, ops } = setup().await;
    for (path, body, field) in [
        (
            "/v1/channels",
            json!({"name": "h", "type": "webhook", "url": "ftp://x/"}),
            "url",
        ),
        (
            "/v1/channels",
            json!({"name": "h", "type": "webhook"}),
            "url",
        ),
        (
            "/v1/channels",
            json!({"name": "m", "type": "email", "recipients": ["not-an-address"]}),
            "recipients",
        ),
        (
            "/v1/channels",
            json!({"name": "t", "type": "telegram", "chat_ids": []}),
            "chat_ids",
        ),
        (
            "/v1/senders",
            json!({"name": "s", "type": "webhook", "secrets": {"signing_secrets": ["nope"]}}),
            "signing_secrets",
        ),
        (
            "/v1/senders",
            json!({"name": "s", "type": "telegram"}),
            "bot_token",
        ),
        (
            "/v1/policies",
            json!({"severity": "high", "priority": 1, "max_attempts": 0}),
            "max_attempts",
        ),
        (
            "/v1/templates",
            json!({"event_type": "x", "channel_type": "email", "body": "{% if %}"}),
            "body",
        ),
        (
            "/v1/templates",
            json!({"event_type": "has space", "channel_type": "email", "body": "b"}),
            "event_type",
        ),
        ("/v1/rules", json!({"name": "r", "pattern": "*"}), "domain"),
        (
            "/v1/routes",
            json!({"name": "r", "severities": ["urgent"]}),
            "severities",
        ),
        (
            "/v1/routes",
            json!({"name": "r", "channel_ids": [uuid::Uuid::new_v4()]}),
            "channel_ids: no channel",
        ),
        ("/v1/events", json!({"event_type": ""}), "event_type"),
        (
            "/v1/events",
            json!({"event_type": "x", "payload": [1]}),
            "payload",
        ),
        (
            "/v1/events",
            json!({"event_type": "x", "extra": 1}),
            "extra",
        ),
    ] {
        let refused = ops.post(path, &body, 422).await;
        assert_eq!(
            refused["error"]["code"], "validation_failed",
            "{path} {body}"
        );
        let message = refused["error"]["message"].as_str().unwrap();
        assert!(message.contains(field), "{path} {body}: {message}");
    }
    ops.post("/v1/deliveries/not-an-id/requeue", &json!({}), 400)
        .await;
    ops.get("/v1/channels/not-an-id", 400).await;
    ops.post(
        "/v1/policies",
        &json!({"severity": "high", "priority": 5, "max_attempts": 3}),
        201,
    )
    .await;
    let taken = ops
        .post(
            "/v1/policies",
            &json!({"severity": "high", "priority": 6, "max_attempts": 3}),
            409,
        )
        .await;
    assert_eq!(taken["error"]["code"], "conflict");

    // A sender's secrets are sealed: no answer, no log line, no byte of the database shows them.
    let secret = "hunter2-smtp-password";
    let sender = ops
        .post(
            "/v1/senders",
            &json!({"name": "smtp", "type": "email", "host": "127.0.0.1", "port": 2525,
                    "tls": "plain", "username": "keel", "from": "keel@example.com",
                    "secrets": {"password": secret}}),
            201,
        )
        .await;
    assert_eq!(sender["has_secrets"], true);
    let id = sender["id"].as_str().unwrap();
    let replaced = ops
        .call(
            Method::PUT,
            &format!("/v1/senders/{id}"),
            Some(
                &json!({"name": "smtp-2", "type": "email", "host": "127.0.0.1", "port": 2525,
                         "tls": "plain", "username": "keel", "from": "keel@example.com"}),
            ),
            200,
        )
        .await;
    assert_eq!(
        replaced["has_secrets"], true,
        "an update without secrets keeps them"
    );
    // Pointing it elsewhere without its secrets would hand them to the new server: refused.
    let repointed = ops
        .call(
            Method::PUT,
            &format!("/v1/senders/{id}"),
            Some(
                &json!({"name": "smtp-2", "type": "email", "host": "203.0.113.9", "port": 2525,
                         "tls": "plain", "username": "keel", "from": "keel@example.com"}),
            ),
            422,
        )
        .await;
    assert!(
        repointed["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("secrets:"),
        "{repointed}"
    );
    let answers = [
        sender.to_string(),
        replaced.to_string(),
        ops.get("/v1/senders", 200).await.to_string(),
        ops.get(&format!("/v1/senders/{id}"), 200).await.to_string(),
    ];
    for answer in &answers {
        assert!(!answer.contains(secret), "{answer}");
    }
    let database = std::fs::read(server.dir.path().join("keel.db")).unwrap();
    let wal = std::fs::read(server.dir.path().join("keel.db-wal")).unwrap_or_default();
    for bytes in [&database, &wal] {
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
    }
    for record in server.log_records() {
        assert!(!record.to_string().contains(secret), "{record}");
    }
    ops.call(Method::DELETE, &format!("/v1/senders/{id}"), None, 204)
        .await;
    ops.get(&format!("/v1/senders/{id}"), 404).await;
}

#[tokio::test]
async fn scopes_and_organisations_keep_notifications_apart() {
    let Setup { server, ops } = setup().await;
    let (webhook, _) = configure(&ops).await;
    let triggered = ops
        .post("/v1/events", &json!({"event_type": "db_error"}), 202)
        .await;
    let delivery = triggered["deliveries"][0].as_str().unwrap().to_owned();

    let reader = server.key("acme", "notifications:read", None);
    reader.get("/v1/deliveries", 200).await;
    let refused = reader
        .post("/v1/events", &json!({"event_type": "db_error"}), 403)
        .await;
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("notifications:write")
    );
    let commands_only = server.key("acme", "commands:write,commands:read", None);
    commands_only.get("/v1/deliveries", 403).await;
    commands_only.get("/v1/channels", 403).await;
    let admin = server.key("acme", "admin", None);
    admin.get("/v1/deliveries", 200).await;

    server.create_org("globex");
    let other = server.key("globex", "notifications:write,notifications:read", None);
    other.get(&format!("/v1/deliveries/{delivery}"), 404).await;
    other
        .post(
            &format!("/v1/deliveries/{delivery}/requeue"),
            &json!({}),
            404,
        )
        .await;
    other.get(&format!("/v1/channels/{webhook}"), 404).await;
    other
        .call(
            Method::DELETE,
            &format!("/v1/channels/{webhook}"),
            None,
            404,
        )
        .await;
    assert_eq!(other.get("/v1/deliveries", 200).await["items"], json!([]));
    assert_eq!(other.get("/v1/channels", 200).await, json!([]));
    other
        .post(
            "/v1/deliveries",
            &json!({"channel_id": webhook, "body": "hello"}),
            404,
        )
        .await;

    // A direct message to one channel.
    let sent = ops
        .post(
            "/v1/deliveries",
            &json!({"channel_id": webhook, "subject": "hi", "body": "{\"hello\": 1}"}),
            202,
        )
        .await;
    assert_eq!(sent["deliveries"].as_array().unwrap().len(), 1);
}

#[tokio::test]
async fn a_rule_is_created_read_replaced_and_deleted_and_each_version_classifies_the_next_event() {
    let Setup {
        server: _server,
        ops,
    } = setup().await;
    let classify = |event_type: &'static str| {
        let ops = ops.clone();
        async move {
            let answer = ops
                .post("/v1/events", &json!({"event_type": event_type}), 202)
                .await;
            (answer["domain"].clone(), answer["severity"].clone())
        }
    };
    let (default_domain, default_severity) = classify("invoice_late").await;

    let created = ops
        .post(
            "/v1/rules",
            &json!({"name": "billing", "pattern": "invoice_*", "domain": "billing",
                    "keywords": ["_late"], "severity": "critical"}),
            201,
        )
        .await;
    let id = created["id"].as_str().unwrap().to_owned();
    let path = format!("/v1/rules/{id}");
    let read = ops.get(&path, 200).await;
    assert_eq!(read["domain"], "billing", "{read}");
    assert_eq!(read["pattern"], "invoice_*");
    assert_eq!(
        classify("invoice_late").await,
        (json!("billing"), json!("critical"))
    );

    let replaced = ops
        .call(
            Method::PUT,
            &path,
            Some(&json!({"name": "billing", "pattern": "invoice_*", "domain": "money"})),
            200,
        )
        .await;
    assert_eq!(replaced["domain"], "money");
    assert_eq!(classify("invoice_late").await.0, json!("money"));

    // A bad replacement is refused and changes nothing; an unknown id is 404.
    ops.call(
        Method::PUT,
        &path,
        Some(&json!({"name": "billing", "pattern": "*", "domain": ""})),
        422,
    )
    .await;
    assert_eq!(ops.get(&path, 200).await["domain"], "money");
    ops.call(
        Method::PUT,
        &format!("/v1/rules/{}", uuid::Uuid::now_v7()),
        Some(&json!({"name": "x", "domain": "x"})),
        404,
    )
    .await;

    ops.call(Method::DELETE, &path, None, 204).await;
    ops.get(&path, 404).await;
    assert_eq!(ops.get("/v1/rules", 200).await, json!([]));
    assert_eq!(
        classify("invoice_late").await,
        (default_domain, default_severity)
    );
}
