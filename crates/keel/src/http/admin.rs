//! `/v1/admin/*`: component states, recent panics, job statistics and log filters. Every route
//! needs `Authorization: Bearer <admin token>`.

use axum::Router;
use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::get;
use keel_guard::components::{ComponentStatus, JobStats};
use keel_guard::panic::PanicReport;
use keel_log::FilterSet;
use subtle::ConstantTimeEq;

use super::AppState;
use super::auth::bearer_token;
use super::error::ApiError;
use super::json::Json;

/// The admin routes, behind the token check.
pub fn routes(state: AppState) -> axum::Router<AppState> {
    Router::new()
        .route("/components", get(components))
        .route("/panics", get(panics))
        .route("/jobs", get(jobs))
        .route("/log-filters", get(log_filters).put(set_log_filters))
        .route_layer(middleware::from_fn_with_state(state, require_admin_token))
}

/// Refuses requests without the admin bearer token (compared in constant time).
async fn require_admin_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let presented = bearer_token(request.headers()).ok_or(ApiError::Unauthorized)?;
    if bool::from(presented.as_bytes().ct_eq(state.admin_token.as_bytes())) {
        Ok(next.run(request).await)
    } else {
        Err(ApiError::Unauthorized)
    }
}

/// Every supervised component: state, restarts, last panic, last and next tick.
async fn components(State(state): State<AppState>) -> Json<Vec<ComponentStatus>> {
    Json(state.components.snapshot())
}

/// The most recent panics, newest first, with backtraces.
async fn panics() -> Json<Vec<PanicReport>> {
    let mut recent = keel_guard::panic::recent();
    recent.reverse();
    Json(recent)
}

/// Per periodic job: runs, failures, durations, runs in the last hour.
async fn jobs(State(state): State<AppState>) -> Json<Vec<JobStats>> {
    Json(state.components.jobs())
}

/// The log filters in force.
async fn log_filters(State(state): State<AppState>) -> Json<FilterSet> {
    Json(state.logger.filters())
}

/// Replaces the log filters; they apply from the next record on.
async fn set_log_filters(
    State(state): State<AppState>,
    Json(filters): Json<FilterSet>,
) -> Result<Json<FilterSet>, ApiError> {
    state
        .logger
        .set_filters(filters)
        .map_err(|e| ApiError::Validation(e.to_string()))?;
    tracing::info!(target: "keel::audit", action = "log_filters.update", "log filters replaced");
    Ok(Json(state.logger.filters()))
}
