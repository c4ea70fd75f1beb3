//! Deliveries sent by the processor to real receivers: a Python receiver that verifies the
//! Standard Webhooks signature with the `standardwebhooks` package, an SMTP server (`aiosmtpd`),
//! a local endpoint that answers like the Telegram Bot API (429 with `retry_after` included), a
//! receiver that fails then recovers, an item that panics every time, and a private address
//! that is refused.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use parking_lot::Mutex;
use serde_json::{Value, json};

use crate::harness::{Api, Options, Server, free_port, poll_until};

/// Webhooks may reach the test receivers on loopback.
const ALLOW_LOOPBACK: &str = "[notifications]\nallowed_networks = [\"127.0.0.1\"]\nworkers = 4\n";

const SECRET_OLD: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const SECRET_NEW: &str = "whsec_BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";

/// The Python interpreter of a virtual environment with the receivers' packages
/// (`tests/receivers/requirements.txt`), created under the target directory at first use.
/// A missing Python or a failed install fails the test: the receivers are not optional.
pub(crate) fn python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let receivers = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/receivers");
        let venv = concat!(env!("CARGO_TARGET_TMPDIR"), "/receivers-venv");
        let python = format!("{venv}/bin/python");
        let ready = |python: &str| {
            Command::new(python)
                .args(["-c", "import standardwebhooks, aiosmtpd"])
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ready(&python) {
            let created = Command::new("python3")
                .args(["-m", "venv", venv])
                .status()
                .expect("python3 is needed for the webhook receiver");
            assert!(created.success(), "python3 -m venv {venv} failed");
            let installed = Command::new(&python)
                .args(["-m", "pip", "install", "-q", "-r"])
                .arg(format!("{receivers}/requirements.txt"))
                .status()
                .unwrap();
            assert!(
                installed.success(),
                "pip install of the receivers' packages failed"
            );
            assert!(ready(&python));
        }
        python
    })
}

/// The Python receiver, killed when dropped.
struct PythonReceiver {
    child: Child,
    url: String,
}

impl PythonReceiver {
    async fn start(secret: &str) -> Self {
        let port = free_port();
        let child = Command::new(python())
            .arg(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/receivers/webhook_receiver.py"
            ))
            .arg(port.to_string())
            .arg(secret)
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}");
        let receiver = Self { child, url };
        let client = reqwest::Client::new();
        poll_until(Duration::from_secs(20), || {
            let client = client.clone();
            let url = format!("{}/received", receiver.url);
            async move { client.get(url).send().await.is_ok() }
        })
        .await;
        receiver
    }

    async fn received(&self) -> Vec<Value> {
        let url = format!("{}/received", self.url);
        reqwest::get(url).await.unwrap().json().await.unwrap()
    }
}

impl Drop for PythonReceiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One request a [`Receiver`] saw.
#[derive(Debug, Clone)]
struct Seen {
    at: Instant,
    path: String,
    headers: HeaderMap,
    body: String,
}

/// What a [`Receiver`] answers: the statuses of its first requests (with `Retry-After` when
/// given), then 200.
#[derive(Default)]
struct Script {
    answers: Vec<(u16, Option<u64>)>,
    seen: Vec<Seen>,
}

/// An HTTP receiver in the test process that records every request.
#[derive(Clone)]
struct Receiver {
    script: Arc<Mutex<Script>>,
    url: String,
}

impl Receiver {
    async fn start(answers: Vec<(u16, Option<u64>)>) -> Self {
        let script = Arc::new(Mutex::new(Script {
            answers,
            seen: Vec::new(),
        }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address: SocketAddr = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(receive)
            .with_state(script.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            script,
            url: format!("http://{address}/hook"),
        }
    }

    fn seen(&self) -> Vec<Seen> {
        self.script.lock().seen.clone()
    }
}

async fn receive(
    State(script): State<Arc<Mutex<Script>>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: String,
) -> axum::response::Response {
    let mut script = script.lock();
    let n = script.seen.len();
    script.seen.push(Seen {
        at: Instant::now(),
        path: uri.path().to_owned(),
        headers,
        body,
    });
    match script.answers.get(n).copied() {
        Some((status, retry_after)) => {
            let status = StatusCode::from_u16(status).unwrap();
            match retry_after {
                Some(seconds) => {
                    (status, [("retry-after", seconds.to_string())], "try later").into_response()
                }
                // A redirect names another path of this receiver.
                None if status.is_redirection() => {
                    (status, [("location", "/elsewhere")], "moved").into_response()
                }
                None => (status, "no").into_response(),
            }
        }
        None => (StatusCode::OK, "ok").into_response(),
    }
}

async fn setup(failpoints: Option<&'static str>) -> (Server, Api) {
    let server = Server::start_with(Options {
        extra_toml: ALLOW_LOOPBACK,
        failpoints,
        ..Options::default()
    })
    .await;
    server.create_org("acme");
    let ops = server.key("acme", "notifications:write,notifications:read", None);
    (server, ops)
}

/// A webhook channel to `url`, signed by a sender with `secrets`, routed for every event.
async fn webhook_channel(ops: &Api, url: &str, secrets: &[&str]) -> String {
    let sender = ops
        .post(
            "/v1/senders",
            &json!({"name": "signing", "type": "webhook", "secrets": {"signing_secrets": secrets}}),
            201,
        )
        .await;
    let channel = ops
        .post(
            "/v1/channels",
            &json!({"name": "hook", "type": "webhook", "url": url, "sender_id": sender["id"],
                    "timeout_seconds": 5}),
            201,
        )
        .await;
    ops.post("/v1/routes", &json!({"name": "all"}), 201).await;
    channel["id"].as_str().unwrap().to_owned()
}

async fn delivery(ops: &Api, id: &str) -> Value {
    ops.get(&format!("/v1/deliveries/{id}"), 200).await
}

async fn wait_for_status(ops: &Api, id: &str, status: &str, deadline: Duration) -> Value {
    let started = Instant::now();
    loop {
        let d = delivery(ops, id).await;
        if d["status"] == status {
            return d;
        }
        assert!(
            started.elapsed() < deadline,
            "{id} is not {status} in time: {d}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_webhook_is_signed_as_the_standard_says_and_verified_independently() {
    let receiver = PythonReceiver::start(SECRET_NEW).await;
    let (_server, ops) = setup(None).await;
    // During a rotation both secrets sign; the receiver knows only the new one.
    webhook_channel(
        &ops,
        &format!("{}/hook", receiver.url),
        &[SECRET_OLD, SECRET_NEW],
    )
    .await;
    let triggered = ops
        .post(
            "/v1/events",
            &json!({"event_type": "order_failed", "payload": {"order": 7}}),
            202,
        )
        .await;
    let id = triggered["deliveries"][0].as_str().unwrap();
    let done = wait_for_status(&ops, id, "completed", Duration::from_secs(20)).await;
    assert_eq!(done["attempts"], 1);
    assert_eq!(done["attempt_history"][0]["outcome"], "completed");
    assert_eq!(done["attempt_history"][0]["detail"]["status"], 204);

    let received = receiver.received().await;
    assert_eq!(received.len(), 1, "{received:?}");
    let request = &received[0];
    assert_eq!(request["verified"], true, "{request}");
    let signatures = request["headers"]["webhook-signature"].as_str().unwrap();
    assert_eq!(signatures.split(' ').count(), 2, "one signature per secret");
    let body: Value = serde_json::from_str(request["body"].as_str().unwrap()).unwrap();
    assert_eq!(body["type"], "order_failed");
    assert_eq!(body["data"]["order"], 7);
}

#[tokio::test]
async fn a_signature_by_an_unknown_secret_is_refused_by_the_receiver() {
    let receiver = PythonReceiver::start(SECRET_NEW).await;
    let (_server, ops) = setup(None).await;
    webhook_channel(&ops, &format!("{}/hook", receiver.url), &[SECRET_OLD]).await;
    let triggered = ops
        .post("/v1/events", &json!({"event_type": "x_failed"}), 202)
        .await;
    let id = triggered["deliveries"][0].as_str().unwrap();
    // The receiver's 401 is one of the permanent statuses: failed at once, not retried.
    let failed = wait_for_status(&ops, id, "failed", Duration::from_secs(20)).await;
    assert_eq!(failed["attempt_history"][0]["detail"]["status"], 401);
    let received = receiver.received().await;
    assert_eq!(received[0]["verified"], false);
}

#[tokio::test]
async fn a_receiver_that_fails_then_recovers_gets_the_delivery_on_the_fourth_attempt() {
    let receiver = Receiver::start(vec![(500, Some(3)), (500, Some(12)), (500, None)]).await;
    let (_server, ops) = setup(None).await;
    webhook_channel(&ops, &receiver.url, &[SECRET_OLD]).await;
    let triggered = ops
        .post("/v1/events", &json!({"event_type": "payment_failed"}), 202)
        .await;
    let id = triggered["deliveries"][0].as_str().unwrap();
    let done = wait_for_status(&ops, id, "completed", Duration::from_secs(60)).await;
    assert_eq!(done["attempts"], 4);
    let history = done["attempt_history"].as_array().unwrap();
    let outcomes: Vec<&str> = history
        .iter()
        .map(|a| a["outcome"].as_str().unwrap())
        .collect();
    assert_eq!(outcomes, ["retry", "retry", "retry", "completed"]);
    for attempt in &history[..3] {
        assert_eq!(attempt["detail"]["status"], 500, "{attempt}");
        assert_eq!(attempt["detail"]["error"], "HTTP 500");
        assert!(attempt["detail"]["duration_ms"].is_u64());
        assert!(attempt["ended_at"].is_string());
    }
    assert_eq!(history[0]["detail"]["response"], "try later");
    // Each attempt's record says how long the receiver asked to wait.
    assert_eq!(history[0]["detail"]["retry_after_s"], 3);
    assert_eq!(history[1]["detail"]["retry_after_s"], 12);
    assert!(history[2]["detail"].get("retry_after_s").is_none());

    let seen = receiver.seen();
    assert_eq!(seen.len(), 4);
    // The same message id on every attempt.
    let ids: Vec<_> = seen
        .iter()
        .map(|s| s.headers["webhook-id"].clone())
        .collect();
    assert!(ids.windows(2).all(|w| w[0] == w[1]));
    // Retry-After 3 s is honoured; so is 12 s, longer than any second backoff (5 to 10 s):
    // only the header explains that wait. Then the engine's backoff (at least half its 20 s
    // step).
    let gaps: Vec<Duration> = seen.windows(2).map(|w| w[1].at - w[0].at).collect();
    assert!(gaps[0] >= Duration::from_secs(3), "{gaps:?}");
    assert!(gaps[1] >= Duration::from_secs(12), "{gaps:?}");
    assert!(gaps[2] >= Duration::from_secs(10), "{gaps:?}");
    assert!(seen.iter().all(|s| !s.body.is_empty()));
}

#[tokio::test]
async fn configured_permanent_statuses_fail_at_once_and_redirects_are_not_followed() {
    let receiver = Receiver::start(vec![(409, None), (302, None)]).await;
    let server = Server::start_with(Options {
        extra_toml: "[notifications]\nallowed_networks = [\"127.0.0.1\"]\n\
                     permanent_statuses = [409]\n",
        ..Options::default()
    })
    .await;
    server.create_org("acme");
    let ops = server.key("acme", "notifications:write,notifications:read", None);
    webhook_channel(&ops, &receiver.url, &[SECRET_OLD]).await;

    // 409 is permanent by this configuration (it is not by default): failed, not retried.
    let first = ops
        .post("/v1/events", &json!({"event_type": "order_failed"}), 202)
        .await;
    let id = first["deliveries"][0].as_str().unwrap();
    let failed = wait_for_status(&ops, id, "failed", Duration::from_secs(20)).await;
    assert_eq!(failed["attempts"], 1, "{failed}");
    assert_eq!(failed["attempt_history"][0]["outcome"], "failed");
    assert_eq!(failed["attempt_history"][0]["detail"]["status"], 409);

    // A redirect is an answer, not followed: a retryable failure, then the next attempt goes
    // to the channel's own URL again.
    let second = ops
        .post("/v1/events", &json!({"event_type": "order_failed"}), 202)
        .await;
    let id = second["deliveries"][0].as_str().unwrap();
    let done = wait_for_status(&ops, id, "completed", Duration::from_secs(30)).await;
    let history = done["attempt_history"].as_array().unwrap();
    assert_eq!(history.len(), 2, "{done}");
    assert_eq!(history[0]["outcome"], "retry");
    assert_eq!(history[0]["detail"]["status"], 302);
    let paths: Vec<String> = receiver.seen().into_iter().map(|s| s.path).collect();
    assert_eq!(
        paths,
        ["/hook", "/hook", "/hook"],
        "nothing reached the redirect's target"
    );

    // Requeued by filter: bad filters change nothing, another organisation requeues none of
    // these, then the failed one goes out again.
    for bad in [
        json!({"status": "pending"}),
        json!({"status": "bogus"}),
        json!({"channel": "webhook"}),
    ] {
        let refused = ops.post("/v1/deliveries/requeue", &bad, 422).await;
        assert!(refused["error"]["message"].is_string(), "{refused}");
    }
    server.create_org("globex");
    let other = server.key("globex", "notifications:write", None);
    let none = other
        .post("/v1/deliveries/requeue", &json!({"status": "failed"}), 200)
        .await;
    assert_eq!(none["requeued"], 0);
    let failed_id = first["deliveries"][0].as_str().unwrap();
    assert_eq!(delivery(&ops, failed_id).await["status"], "failed");
    let requeued = ops
        .post(
            "/v1/deliveries/requeue",
            &json!({"status": "failed", "channel_type": "webhook"}),
            200,
        )
        .await;
    assert_eq!(requeued["requeued"], 1);
    let redone = wait_for_status(&ops, failed_id, "completed", Duration::from_secs(20)).await;
    assert_eq!(redone["attempt_history"].as_array().unwrap().len(), 2);
    assert_eq!(receiver.seen().len(), 4);
}

#[tokio::test]
async fn an_item_that_panics_every_time_ends_dead_while_the_others_are_delivered() {
    let receiver = Receiver::start(Vec::new()).await;
    let (server, ops) = setup(Some("deliveries.item=panic(poisoned item)")).await;
    let channel = webhook_channel(&ops, &receiver.url, &[SECRET_OLD]).await;
    ops.post(
        "/v1/policies",
        &json!({"severity": "low", "priority": 0, "max_attempts": 2}),
        201,
    )
    .await;
    let poison = ops
        .post(
            "/v1/deliveries",
            &json!({"channel_id": channel, "subject": "failpoint:deliveries.item", "body": "{}"}),
            202,
        )
        .await;
    let poison = poison["deliveries"][0].as_str().unwrap().to_owned();
    let mut others = Vec::new();
    for n in 0..5 {
        let sent = ops
            .post(
                "/v1/deliveries",
                &json!({"channel_id": channel, "subject": "fine", "body": format!("{{\"n\": {n}}}")}),
                202,
            )
            .await;
        others.push(sent["deliveries"][0].as_str().unwrap().to_owned());
    }
    for id in &others {
        wait_for_status(&ops, id, "completed", Duration::from_secs(20)).await;
    }
    let dead = wait_for_status(&ops, &poison, "dead", Duration::from_secs(30)).await;
    assert_eq!(dead["dead_reason"], "attempts_exhausted");
    assert_eq!(dead["attempts"], 2);
    for attempt in dead["attempt_history"].as_array().unwrap() {
        assert_eq!(
            attempt["detail"]["error"], "panicked: poisoned item",
            "{attempt}"
        );
    }
    let listed = ops.get("/v1/deliveries/dead", 200).await;
    assert_eq!(listed["items"][0]["id"], poison.as_str());
    assert_eq!(
        receiver.seen().len(),
        5,
        "the poisoned item never reached the receiver"
    );

    // The exhaustion is audited, and the panics were counted.
    poll_until(Duration::from_secs(10), || async {
        server.log_records().iter().any(|r| {
            r["stream"] == "audit"
                && r["action"] == "delivery.exhausted"
                && r["delivery_id"] == poison.as_str()
        })
    })
    .await;
    let metrics = server.metrics().await;
    assert!(
        metrics.contains("keel_panics_total{component=\"deliveries\"} 2"),
        "{metrics}"
    );

    // A requeue puts it back: it panics again, and goes on being isolated.
    ops.post(&format!("/v1/deliveries/{poison}/requeue"), &json!({}), 200)
        .await;
    wait_for_status(&ops, &poison, "dead", Duration::from_secs(30)).await;
}

#[tokio::test]
async fn a_webhook_to_a_private_address_is_refused_unless_allowed() {
    let receiver = Receiver::start(Vec::new()).await;
    // No allowed networks: loopback is not public.
    let server = Server::start().await;
    server.create_org("acme");
    let ops = server.key("acme", "notifications:write,notifications:read", None);
    let channel = webhook_channel(&ops, &receiver.url, &[SECRET_OLD]).await;
    let sent = ops
        .post(
            "/v1/deliveries",
            &json!({"channel_id": channel, "body": "{}"}),
            202,
        )
        .await;
    let id = sent["deliveries"][0].as_str().unwrap();
    let failed = wait_for_status(&ops, id, "failed", Duration::from_secs(20)).await;
    let error = failed["attempt_history"][0]["detail"]["error"]
        .as_str()
        .unwrap();
    assert!(
        error.contains("127.0.0.1 is not a public address"),
        "{error}"
    );
    // A name that resolves to loopback is refused by the resolver too.
    let by_name = receiver.url.replace("127.0.0.1", "localhost");
    let named = ops
        .post(
            "/v1/channels",
            &json!({"name": "named", "type": "webhook", "url": by_name}),
            201,
        )
        .await;
    let sent = ops
        .post(
            "/v1/deliveries",
            &json!({"channel_id": named["id"], "body": "{}"}),
            202,
        )
        .await;
    let id = sent["deliveries"][0].as_str().unwrap();
    let retried = poll_until(Duration::from_secs(20), || async {
        let d = delivery(&ops, id).await;
        d["attempt_history"][0]["detail"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("not a public address"))
    });
    retried.await;
    assert!(receiver.seen().is_empty());

    // An SMTP server on a private address is refused before any connection, for good.
    let mail_sender = ops
        .post(
            "/v1/senders",
            &json!({"name": "inside", "type": "email", "host": "localhost", "port": 25,
                    "tls": "plain", "from": "keel@example.com"}),
            201,
        )
        .await;
    let mail = ops
        .post(
            "/v1/channels",
            &json!({"name": "mail", "type": "email", "recipients": ["ops@example.com"],
                    "sender_id": mail_sender["id"]}),
            201,
        )
        .await;
    let sent = ops
        .post(
            "/v1/deliveries",
            &json!({"channel_id": mail["id"], "subject": "s", "body": "b"}),
            202,
        )
        .await;
    let id = sent["deliveries"][0].as_str().unwrap();
    let failed = wait_for_status(&ops, id, "failed", Duration::from_secs(20)).await;
    let error = failed["attempt_history"][0]["detail"]["error"]
        .as_str()
        .unwrap();
    assert!(
        error.contains("SMTP host localhost") && error.contains("not a public address"),
        "{error}"
    );
}

/// `aiosmtpd` keeping every message it accepts in a maildir; killed when dropped.
pub(crate) struct SmtpServer {
    child: Child,
    pub(crate) port: u16,
    maildir: tempfile::TempDir,
}

impl SmtpServer {
    pub(crate) async fn start() -> Self {
        let port = free_port();
        let maildir = tempfile::tempdir().unwrap();
        let child = Command::new(python())
            .args(["-m", "aiosmtpd", "-n", "-l"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(maildir.path().join("mail"))
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        poll_until(Duration::from_secs(20), || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_ok()
        })
        .await;
        Self {
            child,
            port,
            maildir,
        }
    }

    /// The raw messages received.
    pub(crate) fn messages(&self) -> Vec<String> {
        let new = self.maildir.path().join("mail/new");
        std::fs::read_dir(new)
            .map(|entries| {
                entries
                    .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the local Bot API saw: the path (with the token) and the JSON of each call.
#[derive(Clone, Default)]
struct BotApi {
    calls: Arc<Mutex<Vec<(Instant, String, Value)>>>,
}

impl BotApi {
    /// Answers like the Bot API: the first `sendMessage` is refused with 429 and
    /// `retry_after: 12`, the next ones succeed.
    async fn start() -> (Self, String) {
        let api = Self::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let app = axum::Router::new()
            .fallback(bot_api_call)
            .with_state(api.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (api, format!("http://{address}"))
    }
}

async fn bot_api_call(
    State(api): State<BotApi>,
    uri: axum::http::Uri,
    axum::Json(body): axum::Json<Value>,
) -> axum::response::Response {
    let mut calls = api.calls.lock();
    calls.push((Instant::now(), uri.path().to_owned(), body.clone()));
    if calls.len() == 1 {
        return (
            StatusCode::TOO_MANY_REQUESTS,
            axum::Json(json!({"ok": false, "error_code": 429,
                              "description": "Too Many Requests: retry after 2",
                              "parameters": {"retry_after": 12}})),
        )
            .into_response();
    }
    axum::Json(
        json!({"ok": true, "result": {"message_id": calls.len(), "chat": {"id": body["chat_id"]},
                                            "text": body["text"]}}),
    )
    .into_response()
}

#[tokio::test]
async fn one_event_reaches_a_webhook_an_inbox_and_a_telegram_chat() {
    let receiver = PythonReceiver::start(SECRET_NEW).await;
    let smtp = SmtpServer::start().await;
    let (bot, bot_url) = BotApi::start().await;
    // The first email and Telegram attempts fail by failpoint: both channels retry.
    let (server, ops) = setup(Some(
        "channels.telegram.send=1*return;channels.email.send=1*return",
    ))
    .await;
    webhook_channel(&ops, &format!("{}/hook", receiver.url), &[SECRET_NEW]).await;

    let mail_sender = ops
        .post(
            "/v1/senders",
            &json!({"name": "mail", "type": "email", "host": "127.0.0.1", "port": smtp.port,
                    "tls": "plain", "from": "keel@example.com"}),
            201,
        )
        .await;
    ops.post(
        "/v1/channels",
        &json!({"name": "ops mail", "type": "email", "recipients": ["ops@example.com"],
                "sender_id": mail_sender["id"]}),
        201,
    )
    .await;
    let bot_token = "123456:bot-token-never-shown";
    let bot_sender = ops
        .post(
            "/v1/senders",
            &json!({"name": "bot", "type": "telegram", "base_url": bot_url,
                    "secrets": {"bot_token": bot_token}}),
            201,
        )
        .await;
    ops.post(
        "/v1/channels",
        &json!({"name": "chat", "type": "telegram", "chat_ids": ["-1001"],
                "sender_id": bot_sender["id"]}),
        201,
    )
    .await;
    ops.post(
        "/v1/templates",
        &json!({"event_type": "site_down", "channel_type": "email",
                "subject": "{{ payload.site }} is down",
                "body": "Site {{ payload.site }} <down> since {{ payload.since }}"}),
        201,
    )
    .await;

    let triggered = ops
        .post(
            "/v1/events",
            &json!({"event_type": "site_down", "payload": {"site": "shop", "since": "12:00"}}),
            202,
        )
        .await;
    let ids: Vec<String> = triggered["deliveries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 3);
    for id in &ids {
        wait_for_status(&ops, id, "completed", Duration::from_secs(60)).await;
    }

    let received = receiver.received().await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0]["verified"], true, "{}", received[0]);

    let messages = smtp.messages();
    assert_eq!(messages.len(), 1, "{messages:?}");
    let mail = &messages[0];
    assert!(mail.contains("Subject: shop is down"), "{mail}");
    assert!(mail.contains("To: ops@example.com"), "{mail}");
    assert!(mail.contains("Content-Type: text/plain"), "{mail}");
    assert!(mail.contains("Content-Type: text/html"), "{mail}");
    assert!(mail.contains("Site shop <down> since 12:00"), "{mail}");
    assert!(mail.contains("&lt;down&gt;"), "{mail}");

    // The Bot API refused the first call with 429 and retry_after 12, longer than any backoff
    // after a second attempt (5 to 10 s): only the answer explains the wait.
    let calls = bot.calls.lock().clone();
    assert_eq!(calls.len(), 2);
    assert_eq!(calls[0].1, format!("/bot{bot_token}/sendMessage"));
    assert_eq!(calls[1].2["chat_id"], "-1001");
    assert!(calls[1].2["text"].as_str().unwrap().contains("site_down"));
    assert!(calls[1].0 - calls[0].0 >= Duration::from_secs(12));
    let telegram = ops.get("/v1/deliveries?channel_type=telegram", 200).await;
    let telegram_id = telegram["items"][0]["id"].as_str().unwrap();
    let detail = delivery(&ops, telegram_id).await;
    let history = detail["attempt_history"].as_array().unwrap();
    assert_eq!(
        history[0]["detail"]["error"],
        "injected by failpoint channels.telegram.send"
    );
    assert_eq!(history[1]["outcome"], "retry");
    assert_eq!(history[1]["detail"]["status"], 429);
    assert_eq!(history[1]["detail"]["retry_after_s"], 12);
    assert_eq!(history[2]["outcome"], "completed");
    let email = ops.get("/v1/deliveries?channel_type=email", 200).await;
    let email = delivery(&ops, email["items"][0]["id"].as_str().unwrap()).await;
    assert_eq!(
        email["attempt_history"][0]["detail"]["error"],
        "injected by failpoint channels.email.send"
    );
    assert_eq!(email["attempt_history"][1]["outcome"], "completed");
    assert_eq!(email["attempt_history"][1]["detail"]["status"], 250);

    // The bot token is in no answer and no log line.
    let everything = format!(
        "{} {} {}",
        ops.get("/v1/deliveries", 200).await,
        ops.get("/v1/senders", 200).await,
        detail
    );
    assert!(!everything.contains(bot_token));
    for record in server.log_records() {
        let line = record.to_string();
        assert!(!line.contains(bot_token), "{line}");
    }
}

#[tokio::test]
async fn channel_failpoints_fail_an_attempt_and_a_panicking_cleanup_tick_is_counted() {
    let receiver = Receiver::start(Vec::new()).await;
    let server = Server::start_with(Options {
        extra_toml: "[notifications]\nallowed_networks = [\"127.0.0.1\"]\ncleanup_interval = \"100ms\"\n",
        failpoints: Some("channels.webhook.send=1*return;deliveries.cleanup=2*panic(cleanup boom)"),
        ..Options::default()
    })
    .await;
    server.create_org("acme");
    let ops = server.key("acme", "notifications:write,notifications:read", None);
    let channel = webhook_channel(&ops, &receiver.url, &[SECRET_OLD]).await;
    let sent = ops
        .post(
            "/v1/deliveries",
            &json!({"channel_id": channel, "body": "{}"}),
            202,
        )
        .await;
    let id = sent["deliveries"][0].as_str().unwrap();
    // The injected failure is a retryable attempt; the next one reaches the receiver.
    let done = wait_for_status(&ops, id, "completed", Duration::from_secs(30)).await;
    assert_eq!(
        done["attempt_history"][0]["detail"]["error"],
        "injected by failpoint channels.webhook.send"
    );
    assert_eq!(receiver.seen().len(), 1);

    // Two cleanup ticks panic; the job is not stopped by them and goes on ticking.
    poll_until(Duration::from_secs(10), || async {
        let jobs = server.admin_get("/v1/admin/jobs").await;
        jobs.as_array().unwrap().iter().any(|j| {
            j["name"] == "delivery-cleanup"
                && j["failures"] == 2
                && j["runs"].as_u64().unwrap() >= 4
        })
    })
    .await;
}

#[tokio::test]
async fn ten_events_inside_a_throttle_window_give_one_message_and_one_digest_of_the_other_nine() {
    let receiver = Receiver::start(Vec::new()).await;
    let (_server, ops) = setup(None).await;
    webhook_channel(&ops, &receiver.url, &[SECRET_OLD]).await;
    ops.post(
        "/v1/policies",
        &json!({"severity": "medium", "priority": 10, "max_attempts": 3, "throttle_seconds": 3}),
        201,
    )
    .await;
    let started = Instant::now();
    for n in 0..10 {
        ops.post(
            "/v1/events",
            &json!({"event_type": "disk_warning", "payload": {"n": n}}),
            202,
        )
        .await;
    }
    let throttled = ops.get("/v1/deliveries?status=throttled", 200).await;
    let throttled = throttled["items"].as_array().unwrap();
    assert_eq!(throttled.len(), 9);
    let digest_id = throttled[0]["digest_id"].as_str().unwrap();
    assert!(throttled.iter().all(|d| d["digest_id"] == digest_id));
    poll_until(Duration::from_secs(20), || async {
        receiver.seen().len() >= 2
    })
    .await;
    // Nothing else comes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen = receiver.seen();
    assert_eq!(seen.len(), 2, "one message and one digest");
    let first: Value = serde_json::from_str(&seen[0].body).unwrap();
    assert_eq!(first["data"]["n"], 0);
    assert!(
        seen[1].at - started >= Duration::from_secs(3),
        "the digest waits for the window"
    );
    let digest: Value = serde_json::from_str(&seen[1].body).unwrap();
    assert_eq!(digest["type"], "digest");
    assert_eq!(digest["count"], 9);
    let listed: Vec<u64> = digest["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["body"]["data"]["n"].as_u64().unwrap())
        .collect();
    assert_eq!(listed, (1..10).collect::<Vec<u64>>());
    let sent = wait_for_status(&ops, digest_id, "completed", Duration::from_secs(5)).await;
    assert!(sent["digest_of"].is_string());
}

#[tokio::test]
async fn an_endpoint_that_is_down_opens_its_circuit_and_its_deliveries_wait_without_spending_attempts()
 {
    // Down for its first four requests, then up.
    let receiver = Receiver::start(vec![(503, None); 4]).await;
    let server = Server::start_with(Options {
        extra_toml: "[notifications]\nallowed_networks = [\"127.0.0.1\"]\nworkers = 1\n\
                     breaker_failures = 3\nbreaker_cooldown = \"3s\"\n",
        ..Options::default()
    })
    .await;
    server.create_org("acme");
    let ops = server.key("acme", "notifications:write,notifications:read", None);
    let channel = webhook_channel(&ops, &receiver.url, &[SECRET_OLD]).await;
    let mut ids = Vec::new();
    for n in 0..8 {
        let sent = ops
            .post(
                "/v1/deliveries",
                &json!({"channel_id": channel, "body": format!("{{\"n\": {n}}}")}),
                202,
            )
            .await;
        ids.push(sent["deliveries"][0].as_str().unwrap().to_owned());
    }
    // Three failures in a row open the circuit; it shows in the API and the metrics.
    poll_until(Duration::from_secs(10), || async {
        let circuits = ops.get("/v1/deliveries/circuits", 200).await;
        circuits["circuits"][0]["state"] == "open"
    })
    .await;
    let circuits = ops.get("/v1/deliveries/circuits", 200).await;
    assert_eq!(circuits["circuits"][0]["endpoint"], receiver.url.as_str());
    assert!(
        server
            .metrics()
            .await
            .contains("keel_delivery_circuits_open 1")
    );
    // While it is open, nothing reaches the endpoint and no attempt is spent.
    let seen_when_opened = receiver.seen().len();
    assert_eq!(seen_when_opened, 3);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(receiver.seen().len(), 3);

    // Then probes: the first fails (the fourth 503) and opens it again; the next succeeds and
    // everything is delivered.
    for id in &ids {
        wait_for_status(&ops, id, "completed", Duration::from_secs(40)).await;
    }
    let mut attempts = 0;
    for id in &ids {
        attempts += delivery(&ops, id).await["attempt_history"]
            .as_array()
            .unwrap()
            .len();
    }
    assert_eq!(
        receiver.seen().len(),
        8 + 4,
        "each delivered once, after four failures"
    );
    assert_eq!(
        attempts,
        8 + 4,
        "attempts only where the endpoint was called"
    );
    assert_eq!(
        ops.get("/v1/deliveries/circuits", 200).await["circuits"],
        json!([])
    );
}

/// How many of the organisation's deliveries are in `status`, page by page.
async fn count_with_status(ops: &Api, status: &str) -> usize {
    let mut count = 0;
    let mut cursor: Option<String> = None;
    loop {
        let mut path = format!("/v1/deliveries?status={status}&limit=500");
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={c}"));
        }
        let page = ops.get(&path, 200).await;
        count += page["items"].as_array().unwrap().len();
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => return count,
        }
    }
}

/// A receiver that takes `delay` per request and counts each `webhook-id`.
async fn counting_receiver(
    delay: Duration,
) -> (Arc<Mutex<std::collections::HashMap<String, u32>>>, String) {
    let counts: Arc<Mutex<std::collections::HashMap<String, u32>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .fallback(
            move |State(counts): State<Arc<Mutex<std::collections::HashMap<String, u32>>>>,
                  headers: HeaderMap| async move {
                tokio::time::sleep(delay).await;
                let id = headers["webhook-id"].to_str().unwrap().to_owned();
                *counts.lock().entry(id).or_default() += 1;
                StatusCode::OK
            },
        )
        .with_state(counts.clone());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (counts, format!("http://{address}/hook"))
}

#[tokio::test]
async fn a_thousand_deliveries_survive_kill_9_and_each_reaches_the_receiver() {
    let (counts, url) = counting_receiver(Duration::from_millis(5)).await;
    let mut server = Server::start_with(Options {
        extra_toml: "[notifications]\nallowed_networks = [\"127.0.0.1\"]\nworkers = 4\n\
                     release_interval = \"500ms\"\n",
        ..Options::default()
    })
    .await;
    server.create_org("acme");
    let ops = server.key("acme", "notifications:write,notifications:read", None);
    let sender = ops
        .post(
            "/v1/senders",
            &json!({"name": "s", "type": "webhook", "secrets": {"signing_secrets": [SECRET_OLD]}}),
            201,
        )
        .await;
    let channel = ops
        .post(
            "/v1/channels",
            &json!({"name": "hook", "type": "webhook", "url": url, "sender_id": sender["id"],
                    "timeout_seconds": 1}),
            201,
        )
        .await;
    let channel = channel["id"].as_str().unwrap().to_owned();
    // 1,000 deliveries, queued concurrently while the workers already send.
    let mut queued = Vec::new();
    for chunk in 0..10 {
        let batch = (0..100).map(|n| {
            let ops = &ops;
            let channel = &channel;
            async move {
                let sent = ops
                    .post(
                        "/v1/deliveries",
                        &json!({"channel_id": channel, "body": format!("{{\"n\": {}}}", chunk * 100 + n)}),
                        202,
                    )
                    .await;
                sent["deliveries"][0].as_str().unwrap().to_owned()
            }
        });
        queued.extend(futures::future::join_all(batch).await);
    }
    assert_eq!(queued.len(), 1000);
    // Killed with deliveries queued and in flight.
    assert!(
        counts.lock().len() < 1000,
        "killed before the receiver saw everything"
    );
    server.kill9();
    let before_restart = counts.lock().len();
    server.restart().await;

    // Every delivery reaches the receiver (leases held at the kill expire and are released).
    poll_until(Duration::from_secs(120), || async {
        counts.lock().len() == 1000 && count_with_status(&ops, "completed").await == 1000
    })
    .await;
    let counts = counts.lock().clone();
    assert_eq!(counts.len(), 1000, "the receiver saw each at least once");
    let duplicates: u32 = counts.values().map(|n| n - 1).sum();
    // At-least-once: a delivery in flight at the kill may be sent twice; it is counted here.
    println!(
        "kill -9 with 1000 deliveries: {before_restart} received before the restart, \
         {duplicates} received twice"
    );
    // Sent again: those in flight at the kill and those whose outcome was not yet durable.
    let bound = keel::deliveries::processor::max_unrecorded(4);
    assert!(
        duplicates as usize <= bound,
        "at most {bound} (sends in flight or not yet recorded at the kill): {duplicates}"
    );
}

#[tokio::test]
async fn a_stopping_keel_gives_its_claimed_deliveries_back_at_once() {
    // A slow receiver and one send slot: at the stop most deliveries are claimed and waiting.
    let (counts, url) = counting_receiver(Duration::from_millis(200)).await;
    let mut server = Server::start_with(Options {
        extra_toml: "[notifications]\nallowed_networks = [\"127.0.0.1\"]\nworkers = 1\n",
        ..Options::default()
    })
    .await;
    server.create_org("acme");
    let ops = server.key("acme", "notifications:write,notifications:read", None);
    let channel = ops
        .post(
            "/v1/channels",
            &json!({"name": "hook", "type": "webhook", "url": url}),
            201,
        )
        .await;
    for n in 0..20 {
        ops.post(
            "/v1/deliveries",
            &json!({"channel_id": channel["id"], "body": format!("{{\"n\": {n}}}")}),
            202,
        )
        .await;
    }
    poll_until(Duration::from_secs(10), || async {
        !counts.lock().is_empty()
    })
    .await;
    server.signal("TERM");
    assert!(server.wait_exit(Duration::from_secs(15)).await.success());
    // Nothing is left leased (the send in flight was recorded, the buffered ones given back),
    // so all are sent long before a lease (the channel's 10 s timeout and 30 s) could expire.
    server.restart().await;
    poll_until(Duration::from_secs(20), || async {
        count_with_status(&ops, "completed").await == 20
    })
    .await;
    let duplicates: u32 = counts.lock().values().map(|n| n - 1).sum();
    assert_eq!(duplicates, 0, "a graceful stop repeats nothing");
}
