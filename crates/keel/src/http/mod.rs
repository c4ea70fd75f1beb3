//! The HTTP API.
//!
//! - [`lifecycle`]: the layer every request goes through (request id, span, timeout, panic
//!   isolation, JSON error safety net, access record).
//! - [`error`]: the one error type and its JSON shape; [`json`]: the JSON extractor that
//!   answers bad bodies in that shape, and [`query`] the query-string one that answers bad
//!   query strings in it; [`request_id`]: the request id.
//! - [`connections`]: the accept loop, connection timeouts and the connection cap.
//! - [`health`]: `/healthz`, `/readyz`, `/metrics`; [`openapi`]: `/openapi.json`, the OpenAPI
//!   document generated from the handlers.
//! - [`admin`]: `/v1/admin/*`, for operators only (the admin token or an operator key);
//!   [`organisations`]: its organisations and their API keys.
//! - [`auth`]: API keys, organisations and scopes; [`agents`] and [`commands`]: the commands
//!   API (`docs/commands.md`); [`command_batches`]: many commands created, or many reports
//!   made, in one request; [`broadcasts`]: one command to every agent a label selector
//!   matches; [`queues`]: the queues, paused and resumed; [`schedules`]: schedules that create
//!   commands at cron fire times.
//! - [`notifications`]: events, deliveries and template previews; [`notification_settings`]:
//!   rules, policies, channels, senders, templates and routes (`docs/notifications.md`).
//! - [`ui`]: `/ui/`, the operator page and its sessions; [`operations`]: the operator routes
//!   that gather what it shows across organisations (command counts and rates, agents, dead
//!   letters).
//! - [`overload`]: the in-flight limit, pressure and its shedding; [`rate_limit`]: per-organisation
//!   token buckets; [`waiting_claims`]: the long-poll caps (`docs/overload.md`).

pub mod admin;
pub mod agents;
pub mod auth;
pub mod broadcasts;
pub mod command_batches;
pub mod commands;
pub mod connections;
pub mod error;
pub mod health;
pub mod json;
pub mod lifecycle;
pub mod notification_settings;
pub mod notifications;
pub mod openapi;
pub mod operations;
pub mod organisations;
pub mod overload;
pub mod query;
pub mod queues;
pub mod rate_limit;
pub mod request_id;
pub mod schedules;
pub mod ui;
pub mod validate;
pub mod waiting_claims;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use keel_guard::components::Components;
use keel_guard::periodic::JobHandle;
use keel_log::Logger;
use keel_store::{SecretString, Store};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::sync::CancellationToken;

use error::ApiError;
use lifecycle::Lifecycle;

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    /// Every supervised component and periodic job.
    pub components: Components,
    /// The async logger (its filters are changed through the admin API).
    pub logger: Logger,
    /// Renders `/metrics`.
    pub metrics: PrometheusHandle,
    /// The bearer token of the admin routes (besides operator keys).
    pub admin_token: Arc<SecretString>,
    /// The bearer token `/metrics` asks for, when one is configured.
    pub metrics_token: Option<Arc<SecretString>>,
    /// Organisations, keys, agents and commands.
    pub store: Arc<dyn Store>,
    /// Wakes long-polling claims on enqueue.
    pub wakeups: crate::commands::wakeups::Wakeups,
    /// Cancelled at shutdown: long-polling claims answer at once.
    pub shutdown: CancellationToken,
    /// The request timeout (a long-poll ends before it).
    pub request_timeout: Duration,
    /// The longest long-poll wait.
    pub max_claim_wait: Duration,
    /// An agent seen within this window is online.
    pub agent_online_window: Duration,
    /// The largest `params`, `result`, `error` and `progress` (told to agents at check-in).
    pub command_limits: crate::config::CommandLimits,
    /// keel's periodic jobs by name, whose interval the admin API can change.
    pub jobs: Arc<BTreeMap<String, JobHandle>>,
    /// Rate limits, long-poll caps, the in-flight limit and pressure.
    pub overload: Arc<overload::Overload>,
    /// API keys verified recently.
    pub keys: Arc<auth::KeyCache>,
    /// The operator page's sessions and its sign-in limiter.
    pub ui_sessions: Arc<ui::Sessions>,
    /// The overviews the operator page polls, shared by every page.
    pub overviews: Arc<operations::Overviews>,
    /// Senders' secret sealing and the delivery workers' wake-up.
    pub notifications: Arc<crate::notifications::NotificationState>,
}

/// The whole API, with the lifecycle layer on every route and fallback.
pub fn router(state: AppState, lifecycle: Lifecycle) -> Router {
    Router::new()
        .merge(health::routes())
        .merge(openapi::routes())
        .merge(ui::routes())
        .nest("/v1/admin", admin::routes(state.clone()))
        .nest("/v1/agents", agents::routes())
        .nest("/v1/commands", commands::routes())
        .nest("/v1/queues", queues::routes())
        .nest("/v1/schedules", schedules::routes())
        .merge(notifications::routes())
        .merge(notification_settings::routes())
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(middleware::from_fn_with_state(
            state.clone(),
            overload::admit,
        ))
        .with_state(state)
        .layer(DefaultBodyLimit::max(lifecycle.body_limit))
        .layer(middleware::from_fn_with_state(
            lifecycle,
            lifecycle::lifecycle,
        ))
}
