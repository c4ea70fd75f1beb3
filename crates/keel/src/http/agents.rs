//! `/v1/agents`: agents check in; callers list them (all, or those a label selector matches)
//! with online/offline derived from last-seen; labels are assigned and agents cordoned here.

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::{get, post, put};
use keel_store::{Agent, AgentId, CheckIn, LabelSelector, Labels, Scope};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::json::Json;
use super::query::Query;
use super::validate::{MAX_QUEUES, Name, check_name, check_range, check_size};
use crate::commands::broadcast::{is_online, select};
use crate::config::CommandLimits;
use keel_store::Target;
use keel_store::labels::check_labels;

/// Largest agent metadata, serialised.
const MAX_METADATA_BYTES: usize = 16 * 1024;

/// The agent routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(list))
        .route("/check-in", post(check_in))
        .route("/{id}", get(get_one))
        .route("/{id}/labels", put(set_labels))
        .route("/{id}/cordon", post(cordon))
        .route("/{id}/uncordon", post(uncordon))
}

/// An agent as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AgentView {
    #[schema(value_type = uuid::Uuid)]
    id: AgentId,
    name: String,
    version: Option<String>,
    #[schema(value_type = Object)]
    metadata: Value,
    queues: Vec<String>,
    boot_id: Option<Uuid>,
    boot_count: u32,
    #[serde(with = "time::serde::rfc3339::option")]
    booted_at: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    last_seen_at: Option<OffsetDateTime>,
    online: bool,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    /// Its labels: the reported ones with the assigned ones over them.
    #[schema(value_type = BTreeMap<String, String>)]
    labels: Labels,
    /// The labels it reported at its last check-in.
    #[schema(value_type = BTreeMap<String, String>)]
    reported_labels: Labels,
    /// The labels assigned to it over the API.
    #[schema(value_type = BTreeMap<String, String>)]
    assigned_labels: Labels,
    /// A cordoned agent claims nothing new.
    cordoned: bool,
    #[serde(with = "time::serde::rfc3339::option")]
    cordoned_at: Option<OffsetDateTime>,
}

impl AgentView {
    /// Whether it was seen within the online window.
    pub(super) fn is_online(&self) -> bool {
        self.online
    }

    pub(super) fn new(
        agent: Agent,
        now: OffsetDateTime,
        online_window: std::time::Duration,
    ) -> Self {
        let online = is_online(agent.last_seen_at, now, online_window);
        let labels = agent.labels();
        Self {
            id: agent.id,
            name: agent.name,
            version: agent.version,
            metadata: agent.metadata,
            queues: agent.queues,
            boot_id: agent.boot_id,
            boot_count: agent.boot_count,
            booted_at: agent.booted_at,
            last_seen_at: agent.last_seen_at,
            online,
            created_at: agent.created_at,
            labels,
            reported_labels: agent.reported_labels,
            assigned_labels: agent.assigned_labels,
            cordoned: agent.cordoned_at.is_some(),
            cordoned_at: agent.cordoned_at,
        }
    }
}

/// The answer of a check-in: the agent, and the limits its reports must keep to.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct CheckInView {
    #[serde(flatten)]
    agent: AgentView,
    limits: CommandLimits,
}

/// The body of `POST /v1/agents/check-in`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CheckInRequest {
    #[schema(pattern = "^[a-zA-Z0-9_.:-]{1,64}$")]
    name: Option<String>,
    #[schema(min_length = 1, max_length = 64)]
    version: String,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    metadata: Option<Value>,
    #[serde(default)]
    #[schema(value_type = Vec<Name>, max_items = 64)]
    queues: Vec<String>,
    boot_id: Uuid,
    /// The agent's labels (replacing those it reported before); left out, they stay.
    #[serde(default)]
    #[schema(value_type = Option<BTreeMap<String, String>>)]
    labels: Option<Labels>,
}

/// Checks the calling agent in (creating it on first check-in).
#[utoipa::path(
    post,
    path = "/v1/agents/check-in",
    tag = "agents",
    request_body = CheckInRequest,
    security(("api_key" = ["agent"])),
    responses(
        (status = 200, description = "The agent and the limits its reports must keep to", body = CheckInView),
        (status = 400, description = "`malformed_json`", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`: not an agent key", body = ErrorBody),
        (status = 503, description = "`overloaded`", body = ErrorBody),
    )
)]
pub(super) async fn check_in(
    State(state): State<AppState>,
    caller: Caller,
    Json(request): Json<CheckInRequest>,
) -> Result<Json<CheckInView>, ApiError> {
    let agent = caller.agent()?;
    if request.version.is_empty() || request.version.len() > 64 {
        return Err(ApiError::Validation(
            "version: 1 to 64 characters".to_owned(),
        ));
    }
    check_range("queues (count)", request.queues.len(), 0, MAX_QUEUES)?;
    for queue in &request.queues {
        check_name("queues", queue)?;
    }
    if let Some(name) = &request.name {
        check_name("name", name)?;
    }
    let metadata = request
        .metadata
        .unwrap_or_else(|| Value::Object(Default::default()));
    if !metadata.is_object() {
        return Err(ApiError::Validation(
            "metadata: must be a JSON object".to_owned(),
        ));
    }
    check_size("metadata", &metadata, MAX_METADATA_BYTES)?;
    if let Some(labels) = &request.labels {
        check_labels(labels).map_err(|rule| ApiError::Validation(format!("labels: {rule}")))?;
    }
    let checked_in = state
        .store
        .check_in(
            caller.org(),
            agent,
            CheckIn {
                name: request.name,
                version: request.version,
                metadata,
                queues: distinct(request.queues),
                boot_id: request.boot_id,
                labels: request.labels,
            },
        )
        .await?;
    Ok(Json(CheckInView {
        agent: AgentView::new(checked_in, state.store.now(), state.agent_online_window),
        limits: state.command_limits,
    }))
}

/// The answer of `GET /v1/agents`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct AgentList {
    agents: Vec<AgentView>,
}

/// The query of `GET /v1/agents`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    /// Only the agents whose labels match this selector (`env=prod,os in (linux,bsd),!canary`).
    #[param(max_length = 1024)]
    selector: Option<String>,
}

/// The organisation's agents (those a label selector matches, when given), by name, with
/// online/offline derived from last-seen.
#[utoipa::path(
    get,
    path = "/v1/agents",
    tag = "agents",
    params(ListQuery),
    security(("api_key" = ["commands:read"])),
    responses(
        (status = 200, description = "The agents", body = AgentList),
        (status = 422, description = "`validation_failed`: a malformed selector", body = ErrorBody),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 503, description = "`overloaded`", body = ErrorBody),
    )
)]
pub(super) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<AgentList>, ApiError> {
    caller.require(Scope::CommandsRead)?;
    let selector = LabelSelector::parse(query.selector.as_deref().unwrap_or_default())
        .map_err(|err| ApiError::Validation(format!("selector: {err}")))?;
    let agents = state.store.list_agents(caller.org()).await?;
    let now = state.store.now();
    Ok(Json(AgentList {
        agents: select(&agents, &selector, false, now, state.agent_online_window)
            .cloned()
            .map(|agent| AgentView::new(agent, now, state.agent_online_window))
            .collect(),
    }))
}

/// One agent of the organisation.
#[utoipa::path(
    get,
    path = "/v1/agents/{id}",
    tag = "agents",
    params(("id" = uuid::Uuid, Path, description = "The agent id (anything but a UUID is 400 `bad_request`)")),
    security(("api_key" = ["commands:read"])),
    responses(
        (status = 200, description = "The agent", body = AgentView),
        (status = 400, description = "`bad_request`: the id is not a UUID", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
pub(super) async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    caller.require(Scope::CommandsRead)?;
    let id = agent_id(&id)?;
    let agent = state
        .store
        .get_agent(caller.org(), id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(view(&state, agent)))
}

/// The body of `PUT /v1/agents/{id}/labels`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct LabelsRequest {
    /// The labels to assign (replacing the assigned ones; the reported ones stay). On a key the
    /// agent also reports, the assigned value wins.
    #[schema(value_type = BTreeMap<String, String>)]
    labels: Labels,
}

/// Assigns labels to an agent.
#[utoipa::path(
    put,
    path = "/v1/agents/{id}/labels",
    tag = "agents",
    request_body = LabelsRequest,
    params(("id" = uuid::Uuid, Path, description = "The agent id (anything but a UUID is 400 `bad_request`)")),
    security(("api_key" = ["admin"])),
    responses(
        (status = 200, description = "The agent", body = AgentView),
        (status = 400, description = "`bad_request`: the id is not a UUID", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
pub(super) async fn set_labels(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(request): Json<LabelsRequest>,
) -> Result<Json<AgentView>, ApiError> {
    caller.require(Scope::Admin)?;
    let id = agent_id(&id)?;
    check_labels(&request.labels)
        .map_err(|rule| ApiError::Validation(format!("labels: {rule}")))?;
    let agent = state
        .store
        .set_agent_labels(caller.org(), id, request.labels)
        .await?;
    tracing::info!(target: "keel::audit", action = "agent.labels", agent_id = %id, labels = ?agent.assigned_labels, "agent labels assigned");
    Ok(Json(view(&state, agent)))
}

/// Cordons an agent: it claims nothing new (its targeted commands wait for it, pooled ones go to
/// other agents); what it runs finishes.
#[utoipa::path(
    post,
    path = "/v1/agents/{id}/cordon",
    tag = "agents",
    params(("id" = uuid::Uuid, Path, description = "The agent id (anything but a UUID is 400 `bad_request`)")),
    security(("api_key" = ["commands:write"])),
    responses(
        (status = 200, description = "The agent", body = AgentView),
        (status = 400, description = "`bad_request`: the id is not a UUID", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
pub(super) async fn cordon(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    set_cordoned(state, caller, id, true).await
}

/// Uncordons an agent: it claims again.
#[utoipa::path(
    post,
    path = "/v1/agents/{id}/uncordon",
    tag = "agents",
    params(("id" = uuid::Uuid, Path, description = "The agent id (anything but a UUID is 400 `bad_request`)")),
    security(("api_key" = ["commands:write"])),
    responses(
        (status = 200, description = "The agent", body = AgentView),
        (status = 400, description = "`bad_request`: the id is not a UUID", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
pub(super) async fn uncordon(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    set_cordoned(state, caller, id, false).await
}

async fn set_cordoned(
    state: AppState,
    caller: Caller,
    id: String,
    cordoned: bool,
) -> Result<Json<AgentView>, ApiError> {
    caller.require(Scope::CommandsWrite)?;
    let id = agent_id(&id)?;
    let agent = state
        .store
        .set_agent_cordoned(caller.org(), id, cordoned)
        .await?;
    let action = if cordoned {
        "agent.cordon"
    } else {
        // Its long polls look again at once.
        state.wakeups.wake_target(caller.org(), &Target::Agent(id));
        "agent.uncordon"
    };
    tracing::info!(target: "keel::audit", action, agent_id = %id, agent = %agent.name, "agent cordon changed");
    crate::telemetry::refresh_fleet_gauges(state.store.as_ref()).await;
    Ok(Json(view(&state, agent)))
}

fn view(state: &AppState, agent: Agent) -> AgentView {
    AgentView::new(agent, state.store.now(), state.agent_online_window)
}

fn agent_id(raw: &str) -> Result<AgentId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::BadRequest(format!("`{raw}` is not an agent id")))
}

/// The queues in the order given, each once.
fn distinct(queues: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    queues
        .into_iter()
        .filter(|queue| seen.insert(queue.clone()))
        .collect()
}
