//! Request bodies of every route that takes one, through the real router over a real SQLite
//! store (in a temporary directory), with valid credentials.
//!
//! Input: a first line naming the route (`POST /v1/commands`, as the OpenAPI document spells
//! it); the rest is the body. A first line that names no route picks one by its bytes, so
//! every input reaches some route. The routes are the OpenAPI document's own: a route added
//! there is fuzzed without touching this file.
//!
//! What a client relies on, checked on every answer:
//! - no panic (libFuzzer's hook makes any panic a crash, even one the lifecycle layer would
//!   have turned into a 500);
//! - never a 5xx: a bad body is the client's error;
//! - a 4xx answer is the one JSON error shape, `{"error": {"code", "message", "request_id"}}`,
//!   with a non-empty code and message;
//! - a 2xx answer with a body is JSON.
#![no_main]

use std::num::NonZeroU32;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use http::{Method, Request, header};
use keel::config::Config;
use keel::http::lifecycle::Lifecycle;
use keel::http::overload::{Mode, Overload};
use keel::http::{AppState, router};
use keel::notifications::NotificationState;
use keel_store::{ExposeSecret, NewApiKey, Scope, SecretString};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tower::ServiceExt;

/// Who calls a route.
#[derive(Debug, Clone, Copy)]
enum Caller {
    /// The admin token (`/v1/admin/*`).
    Operator,
    /// The organisation's key with every scope but `agent`.
    Org,
    /// The agent's key.
    Agent,
}

struct Route {
    method: Method,
    /// The path with its parameters filled in.
    path: String,
    /// The OpenAPI template (`/v1/commands/{id}/complete`), as the input's first line names it.
    template: String,
    caller: Caller,
}

struct World {
    runtime: tokio::runtime::Runtime,
    app: Router,
    routes: Vec<Route>,
    admin: String,
    org: String,
    agent: String,
    /// Back to `auto` after each input: a forced `critical` (`PUT /v1/admin/overload`) would
    /// shed what follows with 503s, as it should.
    overload: Arc<Overload>,
    /// Holds the database, the log directory and the notification key.
    _dir: tempfile::TempDir,
}

const ADMIN_TOKEN: &str = "fuzz-admin-token-0123456789abcdef";

/// The paths of the routes that only an agent's key may call.
fn agent_route(method: &Method, template: &str) -> bool {
    *method == Method::POST
        && matches!(
            template,
            "/v1/agents/check-in"
                | "/v1/commands/claim"
                | "/v1/commands/reports"
                | "/v1/commands/{id}/heartbeat"
                | "/v1/commands/{id}/complete"
                | "/v1/commands/{id}/fail"
        )
}

/// `template` with each `{name}` replaced: an existing organisation, queue or job, else an id
/// that names nothing (the body is read and checked before the lookup that answers 404).
fn fill(template: &str) -> String {
    let mut path = String::new();
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        path.push_str(&rest[..open]);
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        let name = &rest[open + 1..open + close];
        path.push_str(match name {
            "org" => "default",
            "queue" => "fuzz",
            "name" => "telemetry",
            "kind" => "rules",
            "event_type" => "order_failed",
            "channel_type" => "webhook",
            _ => "0190a0a0-0000-7000-8000-000000000001",
        });
        rest = &rest[open + close + 1..];
    }
    path.push_str(rest);
    path
}

fn routes() -> Vec<Route> {
    let document = keel::http::openapi::document();
    let mut routes = Vec::new();
    for (template, item) in &document.paths.paths {
        for (method, operation) in [
            (Method::POST, &item.post),
            (Method::PUT, &item.put),
            (Method::PATCH, &item.patch),
        ] {
            if operation.is_none() {
                continue;
            }
            let caller = if template.starts_with("/v1/admin/") {
                Caller::Operator
            } else if agent_route(&method, template) {
                Caller::Agent
            } else {
                Caller::Org
            };
            routes.push(Route {
                path: fill(template),
                template: template.clone(),
                method,
                caller,
            });
        }
    }
    if std::env::var_os("FUZZ_SHOW").is_some() {
        for route in &routes {
            eprintln!("route: {} {}", route.method, route.template);
        }
    }
    assert!(
        routes.len() > 20,
        "the OpenAPI document lists only {} routes with a body",
        routes.len()
    );
    routes
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let dir = tempfile::tempdir().expect("a temporary directory");
        let (app, org, agent, overload) = runtime.block_on(build(dir.path()));
        World {
            runtime,
            app,
            routes: routes(),
            admin: ADMIN_TOKEN.to_owned(),
            org,
            agent,
            overload,
            _dir: dir,
        }
    })
}

/// The router as `keel serve` builds it (`keel::server::run`), without the listener and the
/// background jobs; a store with one organisation, its key and an agent's key.
async fn build(dir: &std::path::Path) -> (Router, String, String, Arc<Overload>) {
    let mut config = Config::default();
    config.data_dir = dir.to_path_buf();
    // Limits that would turn later inputs into 429s and hide the parsers behind them.
    let many = NonZeroU32::new(u32::MAX).expect("non-zero");
    config.overload.rate_limits.work_per_second = many;
    config.overload.rate_limits.work_burst = many;
    config.overload.rate_limits.agent_per_second = many;
    config.overload.rate_limits.agent_burst = many;
    config.http.request_timeout = Duration::from_secs(10);

    let store = keel::server::open_store(&config).await.expect("the store");
    let organisation = store
        .create_organisation("default")
        .await
        .expect("an organisation");
    let org_key = store
        .create_api_key(
            organisation.id,
            NewApiKey {
                name: "fuzz".to_owned(),
                scopes: vec![
                    Scope::Admin,
                    Scope::CommandsWrite,
                    Scope::CommandsRead,
                    Scope::NotificationsWrite,
                    Scope::NotificationsRead,
                ],
                agent_name: None,
            },
        )
        .await
        .expect("an org key");
    let agent_key = store
        .create_api_key(
            organisation.id,
            NewApiKey {
                name: "fuzz-agent".to_owned(),
                scopes: vec![Scope::Agent],
                agent_name: Some("fuzz-agent".to_owned()),
            },
        )
        .await
        .expect("an agent key");

    let mut log = keel_log::LogConfig::development();
    log.sinks = Vec::new();
    log.dir = dir.join("logs");
    let (logger, _layer) = keel_log::build(&log).expect("a logger");
    let metrics = metrics_exporter_prometheus::PrometheusBuilder::new()
        .build_recorder()
        .handle();
    let wakeups = keel::commands::wakeups::Wakeups::default();
    let notifications = Arc::new(NotificationState {
        secrets: keel::notifications::secrets::SecretBox::load(None, dir).expect("a key"),
        wakeups: wakeups.clone(),
        breakers: Arc::new(keel::deliveries::breaker::Breakers::new(
            config.notifications.breaker_failures,
            config.notifications.breaker_cooldown,
        )),
    });
    // The jobs the routes name (`release-stuck` runs its work through its handle); their own
    // ticks do nothing, once an hour.
    let components = keel_guard::components::Components::new();
    let supervisor = keel_guard::supervisor::Supervisor::new(
        components.clone(),
        config.supervisor.clone(),
        tokio_util::sync::CancellationToken::new(),
        tokio_util::task::TaskTracker::new(),
    );
    let jobs = [keel::commands::release::JOB_NAME, "telemetry"]
        .into_iter()
        .map(|name| {
            let job = supervisor.every(name, Duration::from_secs(3600), || async {});
            (name.to_owned(), job)
        })
        .collect();
    let overload = Arc::new(Overload::new(
        &config.overload,
        Arc::new(keel::http::overload::StorePressure::new(store.clone())),
    ));
    let state = AppState {
        components,
        logger,
        metrics,
        admin_token: Arc::new(SecretString::from(ADMIN_TOKEN.to_owned())),
        metrics_token: None,
        store: store.clone(),
        wakeups,
        shutdown: tokio_util::sync::CancellationToken::new(),
        request_timeout: config.http.request_timeout,
        // Claims answer at once: a long-poll would only slow the fuzzer down.
        max_claim_wait: Duration::ZERO,
        agent_online_window: config.commands.agent_online_window,
        command_limits: config.commands.limits,
        jobs: Arc::new(jobs),
        overload: overload.clone(),
        keys: Arc::new(keel::http::auth::KeyCache::new()),
        ui_sessions: Arc::new(keel::http::ui::Sessions::default()),
        overviews: Arc::new(keel::http::operations::Overviews::default()),
        notifications,
    };
    let lifecycle = Lifecycle {
        timeout: config.http.request_timeout,
        body_limit: config.http.body_limit,
    };
    (
        router(state, lifecycle),
        org_key.token.expose_secret().to_owned(),
        agent_key.token.expose_secret().to_owned(),
        overload,
    )
}

/// The route the input's first line names, and the body after it.
fn split(data: &[u8]) -> (&Route, &[u8]) {
    let world = world();
    let (line, body) = match data.iter().position(|byte| *byte == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (&[][..], data),
    };
    let named = std::str::from_utf8(line).ok().and_then(|line| {
        let (method, template) = line.trim().split_once(' ')?;
        world
            .routes
            .iter()
            .find(|route| route.method.as_str() == method && route.template == template)
    });
    let route = named.unwrap_or_else(|| {
        let pick = line.iter().fold(0usize, |sum, byte| {
            sum.wrapping_mul(31).wrapping_add(usize::from(*byte))
        });
        &world.routes[pick % world.routes.len()]
    });
    (route, if named.is_some() { body } else { data })
}

fn check(route: &Route, body: &[u8]) {
    let world = world();
    let token = match route.caller {
        Caller::Operator => &world.admin,
        Caller::Org => &world.org,
        Caller::Agent => &world.agent,
    };
    let request = Request::builder()
        .method(route.method.clone())
        .uri(&route.path)
        .header(header::AUTHORIZATION, format!("Bearer {token}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body.to_vec()))
        .expect("a request");
    let (status, bytes) = world.runtime.block_on(async {
        let response = world
            .app
            .clone()
            .oneshot(request)
            .await
            .expect("infallible");
        let status = response.status();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("the answer's body");
        (status, bytes)
    });
    let shown = String::from_utf8_lossy(&bytes);
    let what = format!("{} {}", route.method, route.template);
    // `FUZZ_SHOW=1`: each answer, to see how deep the seeds go.
    if std::env::var_os("FUZZ_SHOW").is_some() {
        eprintln!(
            "{what} -> {status} {}",
            shown.chars().take(200).collect::<String>()
        );
    }
    assert!(
        !status.is_server_error(),
        "{what} answered {status} to a client's body: {shown}"
    );
    if status.is_client_error() {
        let error: Value = serde_json::from_slice(&bytes).unwrap_or_else(|e| {
            panic!("{what} answered {status} with a body that is not JSON ({e}): {shown}")
        });
        let code = error.pointer("/error/code").and_then(Value::as_str);
        let message = error.pointer("/error/message").and_then(Value::as_str);
        assert!(
            code.is_some_and(|c| !c.is_empty()) && message.is_some_and(|m| !m.is_empty()),
            "{what} answered {status} without the error shape: {shown}"
        );
        assert!(
            error.pointer("/error/request_id").is_some(),
            "{what} answered {status} without a request id: {shown}"
        );
    } else if !bytes.is_empty() {
        assert!(
            serde_json::from_slice::<Value>(&bytes).is_ok(),
            "{what} answered {status} with a body that is not JSON: {shown}"
        );
    }
}

fuzz_target!(|data: &[u8]| {
    let (route, body) = split(data);
    check(route, body);
    world().overload.set_mode(Mode::Auto);
});
