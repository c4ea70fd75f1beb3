//! The HTTP API.
//!
//! - [`lifecycle`]: the layer every request goes through (request id, span, timeout, panic
//!   isolation, JSON error safety net, access record).
//! - [`error`]: the one error type and its JSON shape; [`json`]: the JSON extractor that
//!   answers bad bodies in that shape; [`request_id`]: the request id.
//! - [`health`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`admin`]: `/v1/admin/*`, behind the admin token.

pub mod admin;
pub mod error;
pub mod health;
pub mod json;
pub mod lifecycle;
pub mod request_id;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::middleware;
use keel_guard::components::Components;
use keel_log::Logger;
use metrics_exporter_prometheus::PrometheusHandle;

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
    /// The bearer token of the admin routes.
    pub admin_token: Arc<str>,
}

/// The whole API, with the lifecycle layer on every route and fallback.
pub fn router(state: AppState, lifecycle: Lifecycle) -> Router {
    Router::new()
        .merge(health::routes())
        .nest("/v1/admin", admin::routes(state.clone()))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .with_state(state)
        .layer(DefaultBodyLimit::max(lifecycle.body_limit))
        .layer(middleware::from_fn_with_state(
            lifecycle,
            lifecycle::lifecycle,
        ))
}
