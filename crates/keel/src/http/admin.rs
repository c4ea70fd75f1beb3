//! `/v1/admin/*`: component states, recent panics, job statistics, log filters, overload, and
//! organisations with their keys ([`super::organisations`]): the keel process itself, not one
//! organisation. Every route needs `Authorization: Bearer …` with the admin token or an
//! operator key; an organisation's API key never opens them, whatever its scopes.

use axum::Router;
use axum::extract::Path;
use axum::extract::{Extension, Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, put};
use keel_guard::components::{ComponentStatus, JobStats};
use keel_guard::panic::{PanicGroup, PanicReport};
use keel_log::FilterSet;
use keel_store::{ExposeSecret, OperatorKeyId};
use subtle::ConstantTimeEq;

use super::AppState;
use super::auth::bearer_token;
use super::error::{ApiError, ErrorBody};
use super::json::Json;
use super::overload::{Mode, OverloadView};

/// The admin routes, behind the token check.
pub fn routes(state: AppState) -> axum::Router<AppState> {
    Router::new()
        .route("/components", get(components))
        .route("/panics", get(panics))
        .route("/jobs", get(jobs))
        .route("/jobs/{name}/interval", put(set_job_interval))
        .route("/log-filters", get(log_filters).put(set_log_filters))
        .route("/overload", get(overload).put(set_overload_mode))
        .merge(super::organisations::routes())
        .merge(super::operations::routes())
        .route_layer(middleware::from_fn_with_state(state, require_operator))
}

/// Who passed the operator check; audit records name it.
#[derive(Debug, Clone)]
pub enum Operator {
    /// The configured (or generated) admin token.
    AdminToken,
    /// An operator key.
    Key {
        /// Its id.
        id: OperatorKeyId,
        /// Its public prefix.
        prefix: String,
    },
}

impl std::fmt::Display for Operator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::AdminToken => f.write_str("admin-token"),
            Self::Key { id, prefix } => write!(f, "operator-key:{prefix}:{id}"),
        }
    }
}

/// Admits the operator: the configured (or generated) admin token, compared in constant time,
/// or an operator key; without a bearer token, the operator page's session cookie (with its
/// CSRF token on a request that may change state, see [`super::ui`]). An organisation's API key: 403, whatever its scopes; no or an unknown
/// credential: 401.
async fn require_operator(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(presented) = bearer_token(request.headers()) else {
        // The operator page: a session cookie (and a CSRF token for changes) instead.
        let operator =
            super::ui::operator_from_session(&state, request.method(), request.headers())
                .await
                .ok_or(ApiError::Unauthorized)??;
        request.extensions_mut().insert(operator);
        return Ok(next.run(request).await);
    };
    let admin_token = state.admin_token.expose_secret().as_bytes();
    let operator = if bool::from(presented.as_bytes().ct_eq(admin_token)) {
        Operator::AdminToken
    } else if let Some(key) = state.store.authenticate_operator(presented).await? {
        Operator::Key {
            id: key.id,
            prefix: key.prefix,
        }
    } else if state.store.authenticate(presented).await?.is_some() {
        return Err(ApiError::Forbidden(
            "an organisation's API key never opens /v1/admin: use an operator key or the admin token"
                .to_owned(),
        ));
    } else {
        return Err(ApiError::Unauthorized);
    };
    request.extensions_mut().insert(operator);
    Ok(next.run(request).await)
}

/// Every supervised component: state, restarts, last panic, last and next tick.
#[utoipa::path(
    get,
    path = "/v1/admin/components",
    tag = "admin",
    security(("operator" = [])),
    responses(
        (status = 200, description = "The components", body = Vec<Object>),
    )
)]
pub(super) async fn components(State(state): State<AppState>) -> Json<Vec<ComponentStatus>> {
    Json(state.components.snapshot())
}

/// The body of `GET /v1/admin/panics`.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(super) struct Panics {
    /// One per fingerprint (location plus message shape), the most recently seen first.
    #[schema(value_type = Vec<Object>)]
    groups: Vec<PanicGroup>,
    /// The most recent panics, newest first, with backtraces.
    #[schema(value_type = Vec<Object>)]
    recent: Vec<PanicReport>,
}

/// Panics grouped by fingerprint, and the most recent ones.
/// Panics grouped by fingerprint, and the most recent ones.
#[utoipa::path(
    get,
    path = "/v1/admin/panics",
    tag = "admin",
    security(("operator" = [])),
    responses(
        (status = 200, description = "The panics", body = Panics),
    )
)]
pub(super) async fn panics() -> Json<Panics> {
    let mut recent = keel_guard::panic::recent();
    recent.reverse();
    Json(Panics {
        groups: keel_guard::panic::groups(),
        recent,
    })
}

/// Per periodic job: runs, failures, durations, runs in the last hour.
/// Per periodic job: runs, failures, durations, runs in the last hour.
#[utoipa::path(
    get,
    path = "/v1/admin/jobs",
    tag = "admin",
    security(("operator" = [])),
    responses(
        (status = 200, description = "The jobs", body = Vec<Object>),
    )
)]
pub(super) async fn jobs(State(state): State<AppState>) -> Json<Vec<JobStats>> {
    Json(state.components.jobs())
}

/// The body of `PUT /v1/admin/jobs/{name}/interval`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct JobInterval {
    /// The new interval, as in the configuration (`"30s"`, `"500ms"`).
    #[serde(with = "humantime_serde")]
    #[schema(value_type = String, example = "30s")]
    interval: std::time::Duration,
}

/// Changes a periodic job's interval; it applies from the next tick on.
/// Changes a periodic job's interval; it applies from the next tick on.
#[utoipa::path(
    put,
    path = "/v1/admin/jobs/{name}/interval",
    tag = "admin",
    request_body = JobInterval,
    params(("name" = String, Path, description = "The job's name")),
    security(("operator" = [])),
    responses(
        (status = 200, description = "The job", body = Object),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
pub(super) async fn set_job_interval(
    State(state): State<AppState>,
    Extension(operator): Extension<Operator>,
    Path(name): Path<String>,
    Json(request): Json<JobInterval>,
) -> Result<Json<JobStats>, ApiError> {
    use keel_guard::periodic::{MAX_INTERVAL, MIN_INTERVAL};
    let job = state.jobs.get(&name).ok_or(ApiError::NotFound)?;
    if !(MIN_INTERVAL..=MAX_INTERVAL).contains(&request.interval) {
        return Err(ApiError::Validation(format!(
            "interval: must be between {MIN_INTERVAL:?} and {MAX_INTERVAL:?}"
        )));
    }
    job.set_interval(request.interval);
    tracing::info!(target: "keel::audit", action = "job.interval", %operator, job = %name, interval = ?request.interval, "job interval changed");
    state
        .components
        .job(&name)
        .map(Json)
        .ok_or(ApiError::NotFound)
}

/// The pressure in force, where it comes from, and the load.
/// The pressure in force, where it comes from, and the load.
#[utoipa::path(
    get,
    path = "/v1/admin/overload",
    tag = "admin",
    security(("operator" = [])),
    responses(
        (status = 200, description = "The overload state", body = OverloadView),
    )
)]
pub(super) async fn overload(State(state): State<AppState>) -> Json<OverloadView> {
    Json(state.overload.view())
}

/// The body of `PUT /v1/admin/overload`.
#[derive(Debug, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct OverloadMode {
    /// `auto` (the measured pressure) or the pressure to put in force.
    mode: Mode,
}

/// Puts a pressure in force whatever is measured, or returns to the measured one; until the
/// next change or restart.
/// Puts a pressure in force whatever is measured, or returns to the measured one.
#[utoipa::path(
    put,
    path = "/v1/admin/overload",
    tag = "admin",
    request_body = OverloadMode,
    security(("operator" = [])),
    responses(
        (status = 200, description = "The overload state", body = OverloadView),
    )
)]
pub(super) async fn set_overload_mode(
    State(state): State<AppState>,
    Extension(operator): Extension<Operator>,
    Json(request): Json<OverloadMode>,
) -> Json<OverloadView> {
    state.overload.set_mode(request.mode);
    tracing::info!(target: "keel::audit", action = "overload.mode", %operator, mode = request.mode.as_str(), "overload mode changed");
    Json(state.overload.view())
}

/// The log filters in force.
/// The log filters in force, by stream.
#[utoipa::path(
    get,
    path = "/v1/admin/log-filters",
    tag = "admin",
    security(("operator" = [])),
    responses(
        (status = 200, description = "The filters", body = Object),
    )
)]
pub(super) async fn log_filters(State(state): State<AppState>) -> Json<FilterSet> {
    Json(state.logger.filters())
}

/// Replaces the log filters; they apply from the next record on. The body names every stream,
/// as `GET` answers: a body that names none (`{}`, `[]`) would silently reset them all.
/// Replaces the log filters; the body names every stream, as `GET` answers.
#[utoipa::path(
    put,
    path = "/v1/admin/log-filters",
    tag = "admin",
    request_body = Object,
    security(("operator" = [])),
    responses(
        (status = 200, description = "The filters", body = Object),
    )
)]
pub(super) async fn set_log_filters(
    State(state): State<AppState>,
    Extension(operator): Extension<Operator>,
    Json(body): Json<serde_json::Value>,
) -> Result<Json<FilterSet>, ApiError> {
    let streams = stream_names();
    let names_every_stream = body
        .as_object()
        .is_some_and(|given| streams.iter().all(|stream| given.contains_key(stream)));
    if !names_every_stream {
        return Err(ApiError::Validation(format!(
            "body: an object naming every stream ({}), as GET /v1/admin/log-filters answers",
            streams.join(", ")
        )));
    }
    let filters: FilterSet = serde_path_to_error::deserialize(body)
        .map_err(|e| ApiError::Validation(format!("{}: {}", e.path(), e.inner())))?;
    state
        .logger
        .set_filters(filters)
        .map_err(|e| ApiError::Validation(e.to_string()))?;
    tracing::info!(target: "keel::audit", action = "log_filters.update", %operator, "log filters replaced");
    Ok(Json(state.logger.filters()))
}

/// The streams a filter set names, as it serialises.
fn stream_names() -> Vec<String> {
    match serde_json::to_value(FilterSet::default()) {
        Ok(serde_json::Value::Object(streams)) => streams.keys().cloned().collect(),
        _ => Vec::new(),
    }
}
