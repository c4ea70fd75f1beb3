//! Liveness, readiness and metrics.

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;

use secrecy::ExposeSecret as _;
use subtle::ConstantTimeEq;

use super::AppState;
use super::error::{ApiError, ErrorBody};
use super::json::Json;

/// `/healthz`, `/readyz`, `/metrics`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// The body of `/healthz` and `/readyz`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Health {
    /// `ok`, `ready` or `degraded`.
    #[schema(value_type = String)]
    pub status: &'static str,
    /// The degraded components, by name (empty when ready).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub degraded: Vec<String>,
}

/// The process is up and answering.
/// The process is up and answering.
#[utoipa::path(
    get,
    path = "/healthz",
    tag = "health",
    responses(
        (status = 200, description = "Up", body = Health),
    )
)]
pub(super) async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok",
        degraded: Vec::new(),
    })
}

/// 200 while no component is degraded; 503 naming the degraded ones otherwise.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "health",
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "Degraded", body = Health),
    )
)]
pub(super) async fn readyz(State(state): State<AppState>) -> Response {
    let degraded = state.components.degraded();
    if degraded.is_empty() {
        Json(Health {
            status: "ready",
            degraded,
        })
        .into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(Health {
                status: "degraded",
                degraded,
            }),
        )
            .into_response()
    }
}

/// Prometheus text exposition; with `metrics.token` set, only for its bearer (401 otherwise,
/// compared in constant time).
/// Prometheus text exposition; with `metrics.token` set, only for its bearer.
#[utoipa::path(
    get,
    path = "/metrics",
    tag = "health",
    security(("metrics_token" = []), ()),
    responses(
        (status = 200, description = "The metrics", content_type = "text/plain", body = String),
        (status = 401, description = "`unauthorized`: no or an unknown credential", body = ErrorBody),
    )
)]
pub(super) async fn metrics(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(token) = &state.metrics_token {
        let presented = super::auth::bearer_token(&headers).unwrap_or_default();
        if !bool::from(presented.as_bytes().ct_eq(token.expose_secret().as_bytes())) {
            return ApiError::Unauthorized.into_response();
        }
    }
    keel_guard::panic::export_metrics();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}
