//! `/v1/commands`: create, read, list, cancel and requeue commands; claim, heartbeat, complete
//! and fail them as an agent; run the release-stuck job now. `docs/commands.md` is the
//! reference.

use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use keel_store::{
    AgentId, AttemptOutcome, ClaimToken, Claimed, Command, CommandFilter, CommandId, CommandStatus,
    DeadReason, Idempotency, LabelSelector, MAX_BATCH_CREATE, MAX_LEASE_SECONDS, MIN_LEASE_SECONDS,
    NewCommand, Page, Scope, Target,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::AppState;
use super::auth::Caller;
use super::broadcasts::{BroadcastView, ChildrenView};
use super::error::{ApiError, ErrorBody};
use super::json::Json;
use super::query::Query;
use super::validate::{MAX_QUEUES, Name, check_name, check_range, check_size};
use crate::commands::release::{self, outcome_name};
use crate::config::CommandLimits;

/// Largest claim batch.
pub const MAX_CLAIM_LIMIT: u32 = keel_store::MAX_CLAIM_BATCH;
/// Longest long-poll wait a claim may ask for.
pub const MAX_WAIT_SECONDS: u64 = 60;
/// Page size when `limit` is not given.
pub const DEFAULT_PAGE_SIZE: u32 = 50;
/// Longest `Idempotency-Key`.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// The command routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", post(create).get(list))
        .route("/claim", post(claim))
        .route("/release-stuck", post(release_stuck))
        .route("/dead", get(list_dead))
        .route("/batch", post(super::command_batches::create_batch))
        .route("/reports", post(super::command_batches::report_batch))
        .route("/{id}", get(get_one))
        .route("/{id}/cancel", post(cancel))
        .route("/{id}/requeue", post(requeue))
        .route("/{id}/heartbeat", post(heartbeat))
        .route("/{id}/complete", post(complete))
        .route("/{id}/fail", post(fail))
}

// ---------------------------------------------------------------------------------------------
// What the API shows.

/// A command as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct CommandView {
    id: CommandId,
    #[serde(rename = "type")]
    command_type: String,
    target: TargetView,
    #[schema(value_type = Object)]
    params: Value,
    priority: i32,
    #[serde(with = "time::serde::rfc3339")]
    run_at: OffsetDateTime,
    max_attempts: u32,
    lease_seconds: u64,
    status: CommandStatus,
    attempts: u32,
    claimed_by: Option<AgentId>,
    #[serde(with = "time::serde::rfc3339::option")]
    lease_expires_at: Option<OffsetDateTime>,
    progress: Option<Value>,
    result: Option<Value>,
    error: Option<Value>,
    dead_reason: Option<DeadReason>,
    cancel_requested: bool,
    idempotency_key: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    finished_at: Option<OffsetDateTime>,
    /// The broadcast this command is a child of.
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_id: Option<CommandId>,
    /// For a broadcast parent: how it was created, the agents it reached and (when one command
    /// is shown) its children.
    #[serde(skip_serializing_if = "Option::is_none")]
    broadcast: Option<BroadcastView>,
}

/// `{"agent_id": …}`, `{"queue": …}` or, for a broadcast parent, `{"selector": …}`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
enum TargetView {
    AgentId(AgentId),
    Queue(String),
    Selector(String),
}

impl CommandView {
    /// The command's id.
    pub(super) fn id(&self) -> CommandId {
        self.id
    }

    /// Adds a broadcast parent's children (nothing for another command).
    pub(super) fn set_children(&mut self, children: Vec<Command>) {
        if let Some(broadcast) = &mut self.broadcast {
            broadcast.children = Some(ChildrenView::new(children));
        }
    }

    /// Whether it is a broadcast parent.
    pub(super) fn is_broadcast(&self) -> bool {
        self.broadcast.is_some()
    }
}

impl From<Command> for CommandView {
    fn from(command: Command) -> Self {
        Self {
            id: command.id,
            command_type: command.command_type,
            target: match command.target {
                Target::Agent(agent) => TargetView::AgentId(agent),
                Target::Queue(queue) => TargetView::Queue(queue),
                Target::Broadcast(selector) => TargetView::Selector(selector),
            },
            params: command.params,
            priority: command.priority,
            run_at: command.run_at,
            max_attempts: command.max_attempts,
            lease_seconds: command.lease_duration.as_secs(),
            status: command.status,
            attempts: command.attempts,
            claimed_by: command.claimed_by,
            lease_expires_at: command.lease_expires_at,
            progress: command.progress,
            result: command.result,
            error: command.error,
            dead_reason: command.dead_reason,
            cancel_requested: command.cancel_requested,
            idempotency_key: command.idempotency_key,
            created_at: command.created_at,
            updated_at: command.updated_at,
            finished_at: command.finished_at,
            parent_id: command.parent_id,
            broadcast: command.broadcast.map(BroadcastView::from),
        }
    }
}

/// A claimed command: the command and its claim token.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ClaimedView {
    #[serde(flatten)]
    command: CommandView,
    claim_token: String,
}

impl From<Claimed> for ClaimedView {
    fn from(claimed: Claimed) -> Self {
        Self {
            command: claimed.command.into(),
            claim_token: claimed.claim_token.0,
        }
    }
}

/// A page of commands.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct PageView {
    items: Vec<CommandView>,
    next_cursor: Option<CommandId>,
}

impl From<Page> for PageView {
    fn from(page: Page) -> Self {
        Self {
            items: page.items.into_iter().map(CommandView::from).collect(),
            next_cursor: page.next_cursor,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Callers: create, read, list, cancel, requeue.

/// The body of `POST /v1/commands`: exactly one of `agent_id` (one agent), `queue` (any agent
/// serving it) and `selector` (a broadcast: one child command per agent whose labels match).
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCommand {
    #[serde(rename = "type")]
    #[schema(pattern = "^[a-zA-Z0-9_.:-]{1,64}$")]
    command_type: String,
    agent_id: Option<AgentId>,
    #[schema(pattern = "^[a-zA-Z0-9_.:-]{1,64}$")]
    queue: Option<String>,
    /// A label selector (`env=prod,os in (linux,bsd),!canary`): a broadcast to every agent it
    /// matches now.
    #[schema(max_length = 1024)]
    selector: Option<String>,
    /// With `selector`: only agents online now (default true).
    online_only: Option<bool>,
    /// With `selector`: at most this many children unfinished at once (default: no limit).
    #[schema(minimum = 1, maximum = 1000)]
    max_concurrency: Option<u32>,
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    params: Option<Value>,
    #[serde(default)]
    #[schema(minimum = -1000, maximum = 1000)]
    priority: i32,
    #[serde(default, with = "time::serde::rfc3339::option")]
    run_at: Option<OffsetDateTime>,
    #[schema(minimum = 1, maximum = 100)]
    max_attempts: Option<u32>,
    /// The lease each claim and heartbeat grants, in seconds.
    #[schema(minimum = 2, maximum = 86400)]
    lease_seconds: Option<u64>,
}

/// A validated `POST /v1/commands` body.
#[derive(Debug, Clone, PartialEq)]
pub enum CommandRequest {
    /// A command for one agent or one queue.
    Single(NewCommand),
    /// A broadcast: `command` (targeted at the selector) runs once on each matched agent.
    Broadcast {
        /// The parent; its target is [`Target::Broadcast`].
        command: NewCommand,
        /// The selector, parsed.
        selector: LabelSelector,
        /// Only agents online now.
        online_only: bool,
        /// At most this many children unfinished at once.
        max_concurrency: Option<u32>,
    },
}

impl CommandRequest {
    /// The command, or a broadcast's parent.
    pub fn command(&self) -> &NewCommand {
        match self {
            Self::Single(command) | Self::Broadcast { command, .. } => command,
        }
    }
}

impl CreateCommand {
    /// Checks every field; a refusal names the field. Also how a schedule's command template
    /// is read, at its creation and at each fire.
    pub fn validate(self, limits: &CommandLimits) -> Result<CommandRequest, ApiError> {
        check_name("type", &self.command_type)?;
        let broadcast_only = self.online_only.is_some() || self.max_concurrency.is_some();
        let (target, selector) = match (self.agent_id, self.queue, self.selector) {
            (Some(agent), None, None) => (Target::Agent(agent), None),
            (None, Some(queue), None) => {
                check_name("queue", &queue)?;
                (Target::Queue(queue), None)
            }
            (None, None, Some(text)) => {
                let selector = LabelSelector::parse(&text)
                    .map_err(|err| ApiError::Validation(format!("selector: {err}")))?;
                if selector.is_empty() {
                    return Err(ApiError::Validation(
                        "selector: must name at least one requirement".to_owned(),
                    ));
                }
                (
                    Target::Broadcast(selector.as_str().to_owned()),
                    Some(selector),
                )
            }
            _ => {
                return Err(ApiError::Validation(
                    "exactly one of `agent_id`, `queue` and `selector` is required".to_owned(),
                ));
            }
        };
        if selector.is_none() && broadcast_only {
            return Err(ApiError::Validation(
                "online_only, max_concurrency: only with `selector`".to_owned(),
            ));
        }
        if let Some(max) = self.max_concurrency {
            check_range("max_concurrency", max, 1, MAX_BATCH_CREATE as u32)?;
        }
        let params = self
            .params
            .unwrap_or_else(|| Value::Object(Default::default()));
        if !params.is_object() {
            return Err(ApiError::Validation(
                "params: must be a JSON object".to_owned(),
            ));
        }
        check_size("params", &params, limits.params_bytes)?;
        check_range("priority", i64::from(self.priority), -1000, 1000)?;
        let mut command = NewCommand::new(self.command_type, target, params);
        command.priority = self.priority;
        command.run_at = self.run_at;
        if let Some(max_attempts) = self.max_attempts {
            check_range("max_attempts", max_attempts, 1, 100)?;
            command.max_attempts = max_attempts;
        }
        if let Some(seconds) = self.lease_seconds {
            check_range(
                "lease_seconds",
                seconds,
                MIN_LEASE_SECONDS,
                MAX_LEASE_SECONDS,
            )?;
            command.lease_duration = Duration::from_secs(seconds);
        }
        Ok(match selector {
            None => CommandRequest::Single(command),
            Some(selector) => CommandRequest::Broadcast {
                command,
                selector,
                online_only: self.online_only.unwrap_or(true),
                max_concurrency: self.max_concurrency,
            },
        })
    }
}

/// Creates a command for one agent (`agent_id`) or a queue (`queue`).
#[utoipa::path(
    post,
    path = "/v1/commands",
    tag = "commands",
    request_body = CreateCommand,
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[ -~]{1,255}$", description = "1 to 255 printable ASCII characters; a retry with the same key and request answers the first command (200)")),
    security(("api_key" = ["commands:write"])),
    responses(
        (status = 201, description = "Created", body = CommandView),
        (status = 200, description = "A retry with the same `Idempotency-Key`: the command created first", body = CommandView),
        (status = 409, description = "`conflict`, `stale_claim`, `idempotency_mismatch` or `invalid_state`", body = ErrorBody),
    )
)]
pub(super) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    caller.require(Scope::CommandsWrite)?;
    let request: CreateCommand = parse_body(body)?;
    let command = match request.validate(&state.command_limits)? {
        CommandRequest::Single(command) => command,
        CommandRequest::Broadcast {
            command,
            selector,
            online_only,
            max_concurrency,
        } => {
            let broadcast = super::broadcasts::Request {
                command,
                selector,
                online_only,
                max_concurrency,
            };
            return super::broadcasts::create(&state, &caller, &headers, broadcast).await;
        }
    };
    state.overload.admit_create(command.priority)?;
    let idempotency = idempotency(&headers, &command)?;
    let created = state
        .store
        .create_command(caller.org(), command, idempotency)
        .await?;
    let status = if created.created {
        metrics::counter!("keel_commands_created_total").increment(1);
        state
            .wakeups
            .wake_target(caller.org(), &created.command.target);
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(CommandView::from(created.command))).into_response())
}

/// The `Idempotency-Key` header with a hash of the validated request, to tell a retry from a
/// reuse: bodies that mean the same command (keys in another order, a default spelt out or
/// left out) hash the same.
pub(super) fn idempotency(
    headers: &HeaderMap,
    command: &NewCommand,
) -> Result<Option<Idempotency>, ApiError> {
    keyed(headers, canonical(command))
}

/// What identifies a command request for its idempotency key: the validated fields, with
/// defaults spelt out.
pub(super) fn canonical(command: &NewCommand) -> Value {
    serde_json::json!({
        "type": command.command_type,
        "target": command.target,
        "params": command.params,
        "priority": command.priority,
        "run_at": command.run_at.map(|at| at.unix_timestamp_nanos().to_string()),
        "max_attempts": command.max_attempts,
        "lease_seconds": command.lease_duration.as_secs(),
    })
}

/// The `Idempotency-Key` header, if any, with a hash of `canonical`.
pub(super) fn keyed(
    headers: &HeaderMap,
    canonical: Value,
) -> Result<Option<Idempotency>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = value
        .to_str()
        .ok()
        .filter(|key| (1..=MAX_IDEMPOTENCY_KEY_LEN).contains(&key.len()))
        // `to_str` lets a tab through; the key is printable ASCII only.
        .filter(|key| key.bytes().all(|b| matches!(b, b' '..=b'~')))
        .ok_or_else(|| {
            ApiError::Validation(format!(
                "Idempotency-Key: 1 to {MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters"
            ))
        })?;
    // `serde_json::Value` keeps object keys sorted, so the text is canonical.
    Ok(Some(Idempotency {
        key: key.to_owned(),
        request_hash: hex::encode(Sha256::digest(canonical.to_string().as_bytes())),
    }))
}

/// One attempt, as `GET /v1/commands/{id}` shows it in `attempt_history`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct AttemptView {
    attempt: u32,
    agent_id: AgentId,
    #[serde(with = "time::serde::rfc3339")]
    claimed_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    ended_at: Option<OffsetDateTime>,
    outcome: Option<AttemptOutcome>,
    error: Option<Value>,
}

/// A command with every attempt at it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct CommandDetailView {
    #[serde(flatten)]
    command: CommandView,
    attempt_history: Vec<AttemptView>,
}

/// One command with every attempt at it.
#[utoipa::path(
    get,
    path = "/v1/commands/{id}",
    tag = "commands",
    params(("id" = uuid::Uuid, Path, description = "The command id (anything but a UUID is 400 `bad_request`)")),
    security(("api_key" = ["commands:read"])),
    responses(
        (status = 200, description = "The command", body = CommandDetailView),
        (status = 400, description = "`malformed_json` or `bad_request`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
pub(super) async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<CommandDetailView>, ApiError> {
    caller.require(Scope::CommandsRead)?;
    let id = command_id(&id)?;
    let command = state
        .store
        .get_command(caller.org(), id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let attempts = state.store.list_attempts(caller.org(), id).await?;
    let mut view = CommandView::from(command);
    super::broadcasts::add_children(&state, caller.org(), &mut view).await?;
    Ok(Json(CommandDetailView {
        command: view,
        attempt_history: attempts
            .into_iter()
            .map(|a| AttemptView {
                attempt: a.number,
                agent_id: a.agent_id,
                claimed_at: a.claimed_at,
                ended_at: a.ended_at,
                outcome: a.outcome,
                error: a.error,
            })
            .collect(),
    }))
}

/// The query of `GET /v1/commands`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    status: Option<CommandStatus>,
    agent_id: Option<AgentId>,
    queue: Option<String>,
    #[serde(rename = "type")]
    command_type: Option<String>,
    cursor: Option<CommandId>,
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
}

/// The organisation's commands, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/commands",
    tag = "commands",
    params(ListQuery),
    security(("api_key" = ["commands:read"])),
    responses(
        (status = 200, description = "A page of commands", body = PageView),
        (status = 422, description = "`validation_failed`", body = ErrorBody),
    )
)]
pub(super) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<PageView>, ApiError> {
    caller.require(Scope::CommandsRead)?;
    let filter = CommandFilter {
        status: query.status,
        agent: query.agent_id,
        queue: query.queue,
        command_type: query.command_type,
    };
    let limit = page_limit(query.limit)?;
    let page = state
        .store
        .list_commands(caller.org(), filter, query.cursor, limit)
        .await?;
    Ok(Json(page.into()))
}

/// The query of `GET /v1/commands/dead`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct PageQuery {
    cursor: Option<CommandId>,
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
}

/// The dead-letter list, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/commands/dead",
    tag = "commands",
    params(PageQuery),
    security(("api_key" = ["commands:read"])),
    responses(
        (status = 200, description = "A page of dead commands", body = PageView),
        (status = 422, description = "`validation_failed`", body = ErrorBody),
    )
)]
pub(super) async fn list_dead(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<PageQuery>,
) -> Result<Json<PageView>, ApiError> {
    caller.require(Scope::CommandsRead)?;
    let limit = page_limit(query.limit)?;
    let page = state
        .store
        .list_dead(caller.org(), query.cursor, limit)
        .await?;
    Ok(Json(page.into()))
}

/// Cancels a pending command, or asks its agent to stop an executing one.
#[utoipa::path(
    post,
    path = "/v1/commands/{id}/cancel",
    tag = "commands",
    params(("id" = uuid::Uuid, Path, description = "The command id (anything but a UUID is 400 `bad_request`)")),
    security(("api_key" = ["commands:write"])),
    responses(
        (status = 200, description = "The command", body = CommandView),
        (status = 400, description = "`malformed_json` or `bad_request`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`conflict`, `stale_claim`, `idempotency_mismatch` or `invalid_state`", body = ErrorBody),
    )
)]
pub(super) async fn cancel(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<CommandView>, ApiError> {
    caller.require(Scope::CommandsWrite)?;
    let id = command_id(&id)?;
    let command = state.store.cancel_command(caller.org(), id).await?;
    tracing::info!(target: "keel::audit", action = "command.cancel", command_id = %id.0, status = command.status.as_str(), "command cancel");
    if command.parent_id.is_some() {
        // A child that held a slot of its broadcast handed it to a held sibling.
        state.wakeups.wake_org(caller.org());
    }
    let mut view = CommandView::from(command);
    super::broadcasts::add_children(&state, caller.org(), &mut view).await?;
    Ok(Json(view))
}

/// Puts a dead command back to pending.
#[utoipa::path(
    post,
    path = "/v1/commands/{id}/requeue",
    tag = "commands",
    params(("id" = uuid::Uuid, Path, description = "The command id (anything but a UUID is 400 `bad_request`)")),
    security(("api_key" = ["commands:write"])),
    responses(
        (status = 200, description = "The command", body = CommandView),
        (status = 400, description = "`malformed_json` or `bad_request`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`conflict`, `stale_claim`, `idempotency_mismatch` or `invalid_state`", body = ErrorBody),
    )
)]
pub(super) async fn requeue(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<CommandView>, ApiError> {
    caller.require(Scope::CommandsWrite)?;
    let id = command_id(&id)?;
    let command = state.store.requeue(caller.org(), id).await?;
    tracing::info!(target: "keel::audit", action = "command.requeue", command_id = %id.0, "command requeued");
    state.wakeups.wake_target(caller.org(), &command.target);
    Ok(Json(command.into()))
}

/// One released command, as `POST /v1/commands/release-stuck` reports it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ReleasedView {
    command_id: CommandId,
    outcome: &'static str,
    attempts: u32,
}

/// The answer of `POST /v1/commands/release-stuck`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct ReleaseStuckView {
    released: Vec<ReleasedView>,
}

/// Runs the release-stuck job now for the organisation.
#[utoipa::path(
    post,
    path = "/v1/commands/release-stuck",
    tag = "commands",
    security(("api_key" = ["admin"])),
    responses(
        (status = 200, description = "The released commands", body = ReleaseStuckView),
    )
)]
pub(super) async fn release_stuck(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<ReleaseStuckView>, ApiError> {
    caller.require(Scope::Admin)?;
    let job = state
        .jobs
        .get(release::JOB_NAME)
        .ok_or_else(|| ApiError::Internal(format!("no job named {}", release::JOB_NAME)))?;
    let released = release::release_now(
        job,
        state.store.clone(),
        state.wakeups.clone(),
        caller.org(),
    )
    .await?;
    Ok(Json(ReleaseStuckView {
        released: released
            .into_iter()
            .map(|release| ReleasedView {
                command_id: release.command_id,
                outcome: outcome_name(release.outcome),
                attempts: release.attempts,
            })
            .collect(),
    }))
}

// ---------------------------------------------------------------------------------------------
// Agents: claim, heartbeat, complete, fail.

/// The body of `POST /v1/commands/claim`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ClaimRequest {
    #[schema(minimum = 1, maximum = 100)]
    limit: u32,
    #[schema(value_type = Option<Vec<Name>>, max_items = 64)]
    queues: Option<Vec<String>>,
    #[serde(default)]
    #[schema(minimum = 0, maximum = 60)]
    wait_seconds: u64,
}

/// The answer of a claim.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct ClaimResponse {
    commands: Vec<ClaimedView>,
}

/// Claims up to `limit` due commands for the calling agent, waiting up to `wait_seconds` for one.
#[utoipa::path(
    post,
    path = "/v1/commands/claim",
    tag = "agents",
    request_body = ClaimRequest,
    security(("api_key" = ["agent"])),
    responses(
        (status = 200, description = "The claimed commands (possibly none)", body = ClaimResponse),
    )
)]
pub(super) async fn claim(
    State(state): State<AppState>,
    caller: Caller,
    Json(request): Json<ClaimRequest>,
) -> Result<Json<ClaimResponse>, ApiError> {
    let agent = caller.agent()?;
    check_range(
        "limit",
        i64::from(request.limit),
        1,
        i64::from(MAX_CLAIM_LIMIT),
    )?;
    check_range(
        "wait_seconds",
        i64::try_from(request.wait_seconds).unwrap_or(i64::MAX),
        0,
        i64::try_from(MAX_WAIT_SECONDS).unwrap_or(i64::MAX),
    )?;
    let org = caller.org();
    let queues = match request.queues {
        Some(queues) => {
            check_range("queues (count)", queues.len(), 0, MAX_QUEUES)?;
            for queue in &queues {
                check_name("queues", queue)?;
            }
            queues
        }
        None => state
            .store
            .get_agent(org, agent)
            .await?
            .map(|agent| agent.queues)
            .unwrap_or_default(),
    };
    // The wait ends before the request timeout would answer 408.
    let wait = Duration::from_secs(request.wait_seconds)
        .min(state.max_claim_wait)
        .min(state.request_timeout.saturating_sub(Duration::from_secs(1)));
    let deadline = tokio::time::Instant::now() + wait;
    let _waiting = (!wait.is_zero())
        .then(|| state.overload.wait_for_claims(org, agent))
        .transpose()?;
    let waiter = state.wakeups.waiter(org, agent, &queues);
    loop {
        let woken = waiter.enable();
        tokio::pin!(woken);
        let claimed = state
            .store
            .claim(org, agent, &queues, request.limit)
            .await?;
        let now = tokio::time::Instant::now();
        if !claimed.is_empty() || now >= deadline {
            metrics::counter!("keel_commands_claimed_total").increment(claimed.len() as u64);
            return Ok(Json(ClaimResponse {
                commands: claimed.into_iter().map(ClaimedView::from).collect(),
            }));
        }
        let wake_at = match state.store.next_due_at(org, agent, &queues).await? {
            Some(due) => {
                let until_due = due - state.store.now();
                let until_due = Duration::try_from(until_due).unwrap_or(Duration::ZERO);
                deadline.min(now + until_due)
            }
            None => deadline,
        };
        tokio::select! {
            () = &mut woken => {}
            () = tokio::time::sleep_until(wake_at) => {}
            () = state.shutdown.cancelled() => {
                return Ok(Json(ClaimResponse { commands: Vec::new() }));
            }
        }
    }
}

/// The body of a heartbeat.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct HeartbeatRequest {
    #[schema(min_length = 1, max_length = 128)]
    claim_token: String,
    #[schema(value_type = Option<Object>)]
    progress: Option<Value>,
}

/// The answer of a heartbeat.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct HeartbeatResponse {
    #[serde(with = "time::serde::rfc3339")]
    lease_expires_at: OffsetDateTime,
    cancel_requested: bool,
}

/// Renews the lease of a claimed command and stores its progress.
#[utoipa::path(
    post,
    path = "/v1/commands/{id}/heartbeat",
    tag = "agents",
    request_body = HeartbeatRequest,
    params(("id" = uuid::Uuid, Path, description = "The command id (anything but a UUID is 400 `bad_request`)")),
    security(("api_key" = ["agent"])),
    responses(
        (status = 200, description = "The new lease", body = HeartbeatResponse),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`conflict`, `stale_claim`, `idempotency_mismatch` or `invalid_state`", body = ErrorBody),
    )
)]
pub(super) async fn heartbeat(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(request): Json<HeartbeatRequest>,
) -> Result<Json<HeartbeatResponse>, ApiError> {
    let agent = caller.agent()?;
    let id = command_id(&id)?;
    if let Some(progress) = &request.progress {
        check_size("progress", progress, state.command_limits.progress_bytes)?;
    }
    let lease = state
        .store
        .heartbeat(
            caller.org(),
            agent,
            id,
            &claim_token(request.claim_token)?,
            request.progress,
        )
        .await?;
    Ok(Json(HeartbeatResponse {
        lease_expires_at: lease.expires_at,
        cancel_requested: lease.cancel_requested,
    }))
}

/// The body of a completion.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CompleteRequest {
    #[schema(min_length = 1, max_length = 128)]
    claim_token: String,
    #[serde(default)]
    result: Value,
}

/// Completes a claimed command.
#[utoipa::path(
    post,
    path = "/v1/commands/{id}/complete",
    tag = "agents",
    request_body = CompleteRequest,
    params(("id" = uuid::Uuid, Path, description = "The command id (anything but a UUID is 400 `bad_request`)")),
    security(("api_key" = ["agent"])),
    responses(
        (status = 200, description = "The command", body = CommandView),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`conflict`, `stale_claim`, `idempotency_mismatch` or `invalid_state`", body = ErrorBody),
    )
)]
pub(super) async fn complete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(request): Json<CompleteRequest>,
) -> Result<Json<CommandView>, ApiError> {
    let limit = state.command_limits.result_bytes;
    let (agent, id, token) = agent_report(
        &caller,
        &id,
        request.claim_token,
        ("result", &request.result, limit),
    )?;
    let command = state
        .store
        .complete(caller.org(), agent, id, &token, request.result)
        .await?;
    reported(&state, caller.org(), &command);
    Ok(Json(command.into()))
}

/// The body of a failure report.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct FailRequest {
    #[schema(min_length = 1, max_length = 128)]
    claim_token: String,
    error: Value,
    retryable: bool,
}

/// Reports a claimed command failed; a retryable failure goes back to pending while attempts remain.
#[utoipa::path(
    post,
    path = "/v1/commands/{id}/fail",
    tag = "agents",
    request_body = FailRequest,
    params(("id" = uuid::Uuid, Path, description = "The command id (anything but a UUID is 400 `bad_request`)")),
    security(("api_key" = ["agent"])),
    responses(
        (status = 200, description = "The command", body = CommandView),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`conflict`, `stale_claim`, `idempotency_mismatch` or `invalid_state`", body = ErrorBody),
    )
)]
pub(super) async fn fail(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Json(request): Json<FailRequest>,
) -> Result<Json<CommandView>, ApiError> {
    let limit = state.command_limits.error_bytes;
    let (agent, id, token) = agent_report(
        &caller,
        &id,
        request.claim_token,
        ("error", &request.error, limit),
    )?;
    let command = state
        .store
        .fail(
            caller.org(),
            agent,
            id,
            &token,
            request.error,
            request.retryable,
        )
        .await?;
    reported(&state, caller.org(), &command);
    Ok(Json(command.into()))
}

/// Checks what every completion and failure report needs: an agent key (its agent must hold
/// the lease), a command id, a claim token and a reported value within the size limit.
pub(super) fn agent_report(
    caller: &Caller,
    id: &str,
    token: String,
    (field, value, limit): (&'static str, &Value, usize),
) -> Result<(AgentId, CommandId, ClaimToken), ApiError> {
    let agent = caller.agent()?;
    let id = command_id(id)?;
    check_size(field, value, limit)?;
    Ok((agent, id, claim_token(token)?))
}

/// Counts a reported command by the status it reached (`pending` again after a retryable
/// failure).
fn count_finished(command: &Command) {
    metrics::counter!("keel_commands_finished_total", "status" => command.status.as_str())
        .increment(1);
}

/// After a completion or failure report: counts it, and wakes the claims that may now take
/// work: the command's own after a retryable failure (they learn its due time), and those of
/// the organisation when a broadcast child finished (it may have handed its slot to a held
/// sibling).
pub(super) fn reported(state: &AppState, org: keel_store::OrgId, command: &Command) {
    count_finished(command);
    if command.status == CommandStatus::Pending {
        state.wakeups.wake_target(org, &command.target);
    } else if command.parent_id.is_some() {
        state.wakeups.wake_org(org);
    }
}

// ---------------------------------------------------------------------------------------------
// Validation.

/// Deserialises a JSON body already parsed as a `Value`; errors name the field (a missing or
/// unknown field names itself in the message).
pub(crate) fn parse_body<T: serde::de::DeserializeOwned>(body: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            ApiError::Validation(e.inner().to_string())
        } else {
            ApiError::Validation(format!("{path}: {}", e.inner()))
        }
    })
}

/// A command id from the path; anything else is a 400.
fn command_id(raw: &str) -> Result<CommandId, ApiError> {
    uuid::Uuid::parse_str(raw)
        .map(CommandId)
        .map_err(|_| ApiError::BadRequest(format!("`{raw}` is not a command id")))
}

fn claim_token(token: String) -> Result<ClaimToken, ApiError> {
    if token.is_empty() || token.len() > 128 {
        return Err(ApiError::Validation(
            "claim_token: 1 to 128 characters".to_owned(),
        ));
    }
    Ok(ClaimToken(token))
}

pub(super) fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    let limit = limit.unwrap_or(DEFAULT_PAGE_SIZE);
    check_range("limit", limit, 1, keel_store::MAX_PAGE_SIZE)?;
    Ok(limit)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_that_mean_the_same_command_hash_equally() {
        let mut headers = HeaderMap::new();
        headers.insert("idempotency-key", "k1".parse().unwrap());
        let hash = |body: &str| {
            let request: CreateCommand = serde_json::from_str(body).unwrap();
            let command = request.validate(&CommandLimits::default()).unwrap();
            idempotency(&headers, command.command())
                .unwrap()
                .unwrap()
                .request_hash
        };
        let base = hash(r#"{"type":"x","queue":"q"}"#);
        assert_eq!(base, hash(r#"{ "queue": "q", "type": "x" }"#));
        assert_eq!(
            base,
            hash(r#"{"type":"x","queue":"q","params":{},"max_attempts":5}"#)
        );
        assert_ne!(base, hash(r#"{"type":"y","queue":"q"}"#));
        assert_ne!(base, hash(r#"{"type":"x","queue":"q","priority":1}"#));
    }

    #[test]
    fn an_idempotency_key_is_printable_ascii_only() {
        let command = serde_json::from_str::<CreateCommand>(r#"{"type":"x","queue":"q"}"#)
            .unwrap()
            .validate(&CommandLimits::default())
            .unwrap();
        let with_key = |key: &[u8]| {
            let mut headers = HeaderMap::new();
            headers.insert(
                "idempotency-key",
                axum::http::HeaderValue::from_bytes(key).unwrap(),
            );
            idempotency(&headers, command.command())
        };
        assert!(with_key(b"order 42/retry~1").is_ok());
        for bad in [&b"a\tb"[..], b"caf\xc3\xa9"] {
            assert!(
                matches!(with_key(bad), Err(ApiError::Validation(_))),
                "{bad:?}"
            );
        }
    }
}
