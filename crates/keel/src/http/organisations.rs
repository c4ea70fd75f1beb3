//! `/v1/admin/organisations`: operators create organisations and manage their API keys over
//! HTTP, as `keel admin` does on the command line. Behind the operator check of
//! [`super::admin`]; every change is an audit record naming the operator.

use axum::Router;
use axum::extract::{Extension, Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use keel_store::{AgentId, ApiKey, ApiKeyId, ExposeSecret, NewApiKey, OrgId, Organisation, Scope};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::AppState;
use super::admin::Operator;
use super::error::{ApiError, ErrorBody};
use super::json::Json;
use super::validate::check_name;

/// Longest key name.
const MAX_KEY_NAME_LEN: usize = 128;

/// The organisation routes, nested under `/v1/admin`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/organisations", get(list).post(create))
        .route("/organisations/{org}/keys", get(list_keys).post(create_key))
        .route("/organisations/{org}/keys/{id}/revoke", post(revoke_key))
}

/// An organisation as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct OrganisationView {
    id: OrgId,
    name: String,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
}

impl From<Organisation> for OrganisationView {
    fn from(org: Organisation) -> Self {
        Self {
            id: org.id,
            name: org.name,
            created_at: org.created_at,
        }
    }
}

/// An API key as the API shows it (never its token).
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct KeyView {
    id: ApiKeyId,
    name: String,
    prefix: String,
    scopes: Vec<Scope>,
    agent_id: Option<AgentId>,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    revoked_at: Option<OffsetDateTime>,
}

impl From<ApiKey> for KeyView {
    fn from(key: ApiKey) -> Self {
        Self {
            id: key.id,
            name: key.name,
            prefix: key.prefix,
            scopes: key.scopes,
            agent_id: key.agent_id,
            created_at: key.created_at,
            revoked_at: key.revoked_at,
        }
    }
}

/// The answer of a key creation: the key and its token, shown this once.
#[derive(Serialize, utoipa::ToSchema)]
pub(super) struct CreatedKeyView {
    #[serde(flatten)]
    key: KeyView,
    token: String,
}

/// The body of `POST /v1/admin/organisations`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewOrganisation {
    #[schema(pattern = "^[a-zA-Z0-9_.:-]{1,64}$")]
    name: String,
}

/// The body of `POST /v1/admin/organisations/{org}/keys`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct NewKey {
    #[schema(min_length = 1, max_length = 128)]
    name: String,
    scopes: Vec<Scope>,
    #[serde(default)]
    #[schema(pattern = "^[a-zA-Z0-9_.:-]{1,64}$")]
    agent: Option<String>,
}

/// Every organisation, by name.
/// Every organisation, by name.
#[utoipa::path(
    get,
    path = "/v1/admin/organisations",
    tag = "admin",
    security(("operator" = [])),
    responses(
        (status = 200, description = "The organisations", body = Vec<OrganisationView>),
    )
)]
pub(super) async fn list(
    State(state): State<AppState>,
) -> Result<Json<Vec<OrganisationView>>, ApiError> {
    let orgs = state.store.list_organisations().await?;
    Ok(Json(orgs.into_iter().map(OrganisationView::from).collect()))
}

/// Creates an organisation; a taken name is 409.
/// Creates an organisation; a taken name is 409.
#[utoipa::path(
    post,
    path = "/v1/admin/organisations",
    tag = "admin",
    request_body = NewOrganisation,
    security(("operator" = [])),
    responses(
        (status = 201, description = "Created", body = OrganisationView),
        (status = 409, description = "`conflict`, `stale_claim`, `idempotency_mismatch` or `invalid_state`", body = ErrorBody),
    )
)]
pub(super) async fn create(
    State(state): State<AppState>,
    Extension(operator): Extension<Operator>,
    Json(request): Json<NewOrganisation>,
) -> Result<(StatusCode, Json<OrganisationView>), ApiError> {
    check_name("name", &request.name)?;
    let org = state.store.create_organisation(&request.name).await?;
    tracing::info!(target: "keel::audit", action = "organisation.create", %operator, org = %org.name, org_id = %org.id, "organisation created");
    Ok((StatusCode::CREATED, Json(org.into())))
}

/// The organisation's keys, oldest first.
/// The organisation's API keys, oldest first (never their tokens).
#[utoipa::path(
    get,
    path = "/v1/admin/organisations/{org}/keys",
    tag = "admin",
    params(("org" = String, Path, description = "The organisation's name")),
    security(("operator" = [])),
    responses(
        (status = 200, description = "The keys", body = Vec<KeyView>),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
pub(super) async fn list_keys(
    State(state): State<AppState>,
    Path(org): Path<String>,
) -> Result<Json<Vec<KeyView>>, ApiError> {
    let org = find_org(&state, &org).await?;
    let keys = state.store.list_api_keys(org.id).await?;
    Ok(Json(keys.into_iter().map(KeyView::from).collect()))
}

/// Creates an API key of the organisation; the answer holds its token, shown this once.
/// Creates an API key of the organisation; the answer holds its token, shown this once.
#[utoipa::path(
    post,
    path = "/v1/admin/organisations/{org}/keys",
    tag = "admin",
    request_body = NewKey,
    params(("org" = String, Path, description = "The organisation's name")),
    security(("operator" = [])),
    responses(
        (status = 201, description = "Created", body = CreatedKeyView),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`conflict`, `stale_claim`, `idempotency_mismatch` or `invalid_state`", body = ErrorBody),
    )
)]
pub(super) async fn create_key(
    State(state): State<AppState>,
    Extension(operator): Extension<Operator>,
    Path(org): Path<String>,
    Json(request): Json<NewKey>,
) -> Result<(StatusCode, Json<CreatedKeyView>), ApiError> {
    let name = request.name.trim();
    if name.is_empty() || name.chars().count() > MAX_KEY_NAME_LEN {
        return Err(ApiError::Validation(format!(
            "name: 1 to {MAX_KEY_NAME_LEN} characters"
        )));
    }
    if let Some(agent) = &request.agent {
        check_name("agent", agent)?;
    }
    let org = find_org(&state, &org).await?;
    let created = state
        .store
        .create_api_key(
            org.id,
            NewApiKey {
                name: name.to_owned(),
                scopes: request.scopes,
                agent_name: request.agent,
            },
        )
        .await?;
    let scopes: Vec<&str> = created.key.scopes.iter().map(|s| s.as_str()).collect();
    tracing::info!(target: "keel::audit", action = "api_key.create", %operator, org = %org.name, key_id = %created.key.id, key_prefix = %created.key.prefix, scopes = %scopes.join(","), "API key created");
    let token = created.token.expose_secret().to_owned();
    Ok((
        StatusCode::CREATED,
        Json(CreatedKeyView {
            key: created.key.into(),
            token,
        }),
    ))
}

/// Revokes a key of the organisation: it stops working at once. Revoking twice is not an
/// error; a key of another organisation is 404.
/// Revokes a key of the organisation: it stops working at once.
#[utoipa::path(
    post,
    path = "/v1/admin/organisations/{org}/keys/{id}/revoke",
    tag = "admin",
    params(("org" = String, Path, description = "The organisation's name"), ("id" = uuid::Uuid, Path, description = "The key id (anything but a UUID is 400 `bad_request`)")),
    security(("operator" = [])),
    responses(
        (status = 204, description = "Revoked (or revoked before)"),
        (status = 400, description = "`malformed_json` or `bad_request`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
pub(super) async fn revoke_key(
    State(state): State<AppState>,
    Extension(operator): Extension<Operator>,
    Path((org, id)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    let id = uuid::Uuid::parse_str(&id)
        .map(ApiKeyId)
        .map_err(|_| ApiError::BadRequest(format!("`{id}` is not a key id")))?;
    let org = find_org(&state, &org).await?;
    state.store.revoke_api_key(org.id, id).await?;
    state.keys.forget_all();
    tracing::info!(target: "keel::audit", action = "api_key.revoke", %operator, org = %org.name, key_id = %id, "API key revoked");
    Ok(StatusCode::NO_CONTENT)
}

/// The organisation named `name`; 404 when there is none.
async fn find_org(state: &AppState, name: &str) -> Result<Organisation, ApiError> {
    state
        .store
        .find_org_by_name(name)
        .await?
        .ok_or(ApiError::NotFound)
}
