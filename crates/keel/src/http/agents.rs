//! `/v1/agents`: agents check in; callers list them with online/offline derived from last-seen.

use axum::Router;
use axum::extract::State;
use axum::routing::{get, post};
use keel_store::{Agent, AgentId, CheckIn, Scope};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::json::Json;
use super::validate::{MAX_QUEUES, Name, check_name, check_range, check_size};
use crate::config::CommandLimits;

/// Largest agent metadata, serialised.
const MAX_METADATA_BYTES: usize = 16 * 1024;

/// The agent routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(list))
        .route("/check-in", post(check_in))
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
        let online = agent.last_seen_at.is_some_and(|seen| {
            (now - seen) <= time::Duration::try_from(online_window).unwrap_or(time::Duration::MAX)
        });
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

/// The organisation's agents, with online/offline derived from last-seen.
#[utoipa::path(
    get,
    path = "/v1/agents",
    tag = "agents",
    security(("api_key" = ["commands:read"])),
    responses(
        (status = 200, description = "The agents", body = AgentList),
        (status = 401, description = "`unauthorized`", body = ErrorBody),
        (status = 403, description = "`forbidden`", body = ErrorBody),
        (status = 503, description = "`overloaded`", body = ErrorBody),
    )
)]
pub(super) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<AgentList>, ApiError> {
    caller.require(Scope::CommandsRead)?;
    let agents = state.store.list_agents(caller.org()).await?;
    let now = state.store.now();
    Ok(Json(AgentList {
        agents: agents
            .into_iter()
            .map(|agent| AgentView::new(agent, now, state.agent_online_window))
            .collect(),
    }))
}

/// The queues in the order given, each once.
fn distinct(queues: Vec<String>) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    queues
        .into_iter()
        .filter(|queue| seen.insert(queue.clone()))
        .collect()
}
