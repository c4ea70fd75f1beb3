//! Operator routes that gather what the operator page shows across organisations: commands by
//! status and finished per minute over the last hour, agents online and offline, and dead
//! letters with their requeue. Nested under `/v1/admin`, behind its operator check; each reads
//! one organisation at a time through the store's indexed queries, at most once every
//! [`OVERVIEW_TTL`] whatever the number of pages polling.

use axum::Router;
use axum::extract::{Extension, State};
use axum::routing::{get, post};
use keel_store::{CommandId, CommandStatus, Organisation};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;

use super::AppState;
use super::admin::Operator;
use super::agents::AgentView;
use super::commands::CommandView;
use super::error::{ApiError, ErrorBody};
use super::json::Json;
use super::query::Query;

/// The window of `finished_per_minute`.
const RATE_MINUTES: i64 = 60;

/// The most dead commands one listing answers, and the default.
const MAX_DEAD: u32 = 500;
const DEFAULT_DEAD: u32 = 100;

/// The most commands one requeue names.
const MAX_REQUEUE: usize = 100;

/// How long an overview answer is reused: whatever the number of open pages polling them,
/// each overview is read from the store at most once in this time.
const OVERVIEW_TTL: std::time::Duration = std::time::Duration::from_secs(2);

/// One overview's last answer, and what it was asked with.
pub struct Overview<K>(parking_lot::Mutex<Option<(std::time::Instant, K, Value)>>);

impl<K: PartialEq> Overview<K> {
    /// The answer for `key` read less than [`OVERVIEW_TTL`] ago, or `read`'s.
    async fn read<T: Serialize>(
        &self,
        key: K,
        read: impl std::future::Future<Output = Result<T, ApiError>>,
    ) -> Result<Value, ApiError> {
        if let Some((at, asked, value)) = &*self.0.lock()
            && *asked == key
            && at.elapsed() < OVERVIEW_TTL
        {
            return Ok(value.clone());
        }
        let value = serde_json::to_value(read.await?).map_err(|error| {
            ApiError::Internal(format!("an overview did not serialise: {error}"))
        })?;
        *self.0.lock() = Some((std::time::Instant::now(), key, value.clone()));
        Ok(value)
    }

    fn forget(&self) {
        *self.0.lock() = None;
    }
}

impl<K> Default for Overview<K> {
    fn default() -> Self {
        Self(parking_lot::Mutex::new(None))
    }
}

/// The overviews the operator page polls.
#[derive(Default)]
pub struct Overviews {
    summary: Overview<()>,
    agents: Overview<()>,
    dead: Overview<u32>,
    fleet: Overview<()>,
}

impl Overviews {
    /// Forgets the answers that a requeue changes.
    fn forget(&self) {
        self.summary.forget();
        self.dead.forget();
    }
}

/// The routes, nested under `/v1/admin`.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/commands/summary", get(summary))
        .route("/agents", get(agents))
        .route("/fleet", get(fleet))
        .route("/dead-commands", get(dead_commands))
        .route("/dead-commands/requeue", post(requeue))
}

/// How many commands are in each status (every status named, 0 included).
#[derive(Debug, Default, Serialize, utoipa::ToSchema)]
pub(super) struct StatusCounts {
    pending: u64,
    executing: u64,
    completed: u64,
    failed: u64,
    cancelled: u64,
    dead: u64,
}

impl StatusCounts {
    fn add(&mut self, status: CommandStatus, count: u64) {
        let slot = match status {
            CommandStatus::Pending => &mut self.pending,
            CommandStatus::Executing => &mut self.executing,
            CommandStatus::Completed => &mut self.completed,
            CommandStatus::Failed => &mut self.failed,
            CommandStatus::Cancelled => &mut self.cancelled,
            CommandStatus::Dead => &mut self.dead,
        };
        *slot = slot.saturating_add(count);
    }
}

/// One organisation's counts.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct OrganisationCounts {
    org: String,
    by_status: StatusCounts,
}

/// The commands that finished in one minute, by the status they reached.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct FinishedMinute {
    /// The minute's start.
    #[serde(with = "time::serde::rfc3339")]
    minute: OffsetDateTime,
    completed: u64,
    failed: u64,
    cancelled: u64,
    dead: u64,
}

/// The body of `GET /v1/admin/commands/summary`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct CommandSummary {
    /// Every organisation together.
    by_status: StatusCounts,
    /// Per organisation, by name.
    organisations: Vec<OrganisationCounts>,
    /// The last 60 minutes, oldest first, the current minute last (so far).
    finished_per_minute: Vec<FinishedMinute>,
}

/// Commands by status, in total and per organisation, and how many finished in each of the
/// last 60 minutes.
#[utoipa::path(
    get,
    path = "/v1/admin/commands/summary",
    tag = "admin",
    security(("operator" = [])),
    responses(
        (status = 200, description = "The counts", body = CommandSummary),
    )
)]
pub(super) async fn summary(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let overviews = state.overviews.clone();
    overviews
        .summary
        .read((), read_summary(state))
        .await
        .map(Json)
}

async fn read_summary(state: AppState) -> Result<CommandSummary, ApiError> {
    let mut total = StatusCounts::default();
    let mut organisations = Vec::new();
    for org in state.store.list_organisations().await? {
        let mut counts = StatusCounts::default();
        for (status, count) in state.store.count_commands_by_status(org.id).await? {
            counts.add(status, count);
            total.add(status, count);
        }
        organisations.push(OrganisationCounts {
            org: org.name,
            by_status: counts,
        });
    }
    let now = state.store.now();
    let this_minute = now
        - time::Duration::seconds(i64::from(now.second()))
        - time::Duration::nanoseconds(i64::from(now.nanosecond()));
    let first = this_minute - time::Duration::minutes(RATE_MINUTES - 1);
    let mut minutes: Vec<FinishedMinute> = (0..RATE_MINUTES)
        .map(|n| FinishedMinute {
            minute: first + time::Duration::minutes(n),
            completed: 0,
            failed: 0,
            cancelled: 0,
            dead: 0,
        })
        .collect();
    for finished in state.store.finished_per_minute(first).await? {
        let Some(minute) = minutes.iter_mut().find(|m| m.minute == finished.minute) else {
            continue;
        };
        let slot = match finished.status {
            CommandStatus::Completed => &mut minute.completed,
            CommandStatus::Failed => &mut minute.failed,
            CommandStatus::Cancelled => &mut minute.cancelled,
            CommandStatus::Dead => &mut minute.dead,
            CommandStatus::Pending | CommandStatus::Executing => continue,
        };
        *slot = slot.saturating_add(finished.count);
    }
    Ok(CommandSummary {
        by_status: total,
        organisations,
        finished_per_minute: minutes,
    })
}

/// An agent and its organisation.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct OrganisationAgent {
    org: String,
    #[serde(flatten)]
    agent: AgentView,
}

/// The body of `GET /v1/admin/agents`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct AgentsOverview {
    online: usize,
    offline: usize,
    /// By organisation, then as each organisation lists them.
    agents: Vec<OrganisationAgent>,
}

/// Every organisation's agents, online (seen within `commands.agent_online_window`) or not.
#[utoipa::path(
    get,
    path = "/v1/admin/agents",
    tag = "admin",
    security(("operator" = [])),
    responses(
        (status = 200, description = "The agents", body = AgentsOverview),
    )
)]
pub(super) async fn agents(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let overviews = state.overviews.clone();
    overviews
        .agents
        .read((), read_agents(state))
        .await
        .map(Json)
}

async fn read_agents(state: AppState) -> Result<AgentsOverview, ApiError> {
    let now = state.store.now();
    let mut agents = Vec::new();
    for org in state.store.list_organisations().await? {
        for agent in state.store.list_agents(org.id).await? {
            agents.push(OrganisationAgent {
                org: org.name.clone(),
                agent: AgentView::new(agent, now, state.agent_online_window),
            });
        }
    }
    let online = agents.iter().filter(|a| a.agent.is_online()).count();
    Ok(AgentsOverview {
        online,
        offline: agents.len() - online,
        agents,
    })
}

/// A paused queue and its organisation.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct OrganisationQueue {
    org: String,
    queue: String,
    #[serde(with = "time::serde::rfc3339")]
    paused_at: time::OffsetDateTime,
}

/// A schedule and its organisation.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct OrganisationSchedule {
    org: String,
    #[serde(flatten)]
    schedule: super::schedules::ScheduleView,
}

/// The body of `GET /v1/admin/fleet`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct FleetOverview {
    /// Every organisation's paused queues.
    paused_queues: Vec<OrganisationQueue>,
    /// Every organisation's schedules (at most [`MAX_PAGE_SIZE`](keel_store::MAX_PAGE_SIZE)
    /// each, oldest first).
    schedules: Vec<OrganisationSchedule>,
}

/// Every organisation's paused queues and schedules (cordoned agents show in
/// `GET /v1/admin/agents`).
#[utoipa::path(
    get,
    path = "/v1/admin/fleet",
    tag = "admin",
    security(("operator" = [])),
    responses(
        (status = 200, description = "Paused queues and schedules", body = FleetOverview),
    )
)]
pub(super) async fn fleet(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let overviews = state.overviews.clone();
    overviews.fleet.read((), read_fleet(state)).await.map(Json)
}

async fn read_fleet(state: AppState) -> Result<FleetOverview, ApiError> {
    let now = state.store.now();
    let mut paused_queues = Vec::new();
    let mut schedules = Vec::new();
    for org in state.store.list_organisations().await? {
        for paused in state.store.list_paused_queues(org.id).await? {
            paused_queues.push(OrganisationQueue {
                org: org.name.clone(),
                queue: paused.queue,
                paused_at: paused.paused_at,
            });
        }
        let page = state
            .store
            .list_schedules(org.id, None, keel_store::MAX_PAGE_SIZE)
            .await?;
        for schedule in page.items {
            schedules.push(OrganisationSchedule {
                org: org.name.clone(),
                schedule: super::schedules::view(schedule, now),
            });
        }
    }
    Ok(FleetOverview {
        paused_queues,
        schedules,
    })
}

/// The query of `GET /v1/admin/dead-commands`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub(super) struct DeadQuery {
    /// At most this many (1–500, default 100).
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
}

/// A dead command and its organisation.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct DeadCommand {
    org: String,
    #[serde(flatten)]
    command: CommandView,
}

/// The body of `GET /v1/admin/dead-commands`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct DeadCommands {
    /// By organisation (by name), each one's newest first.
    items: Vec<DeadCommand>,
    /// Whether more dead commands exist than were answered.
    truncated: bool,
}

/// Dead commands of every organisation, up to `limit`.
#[utoipa::path(
    get,
    path = "/v1/admin/dead-commands",
    tag = "admin",
    params(DeadQuery),
    security(("operator" = [])),
    responses(
        (status = 200, description = "The dead commands", body = DeadCommands),
        (status = 422, description = "`validation_failed`", body = ErrorBody),
    )
)]
pub(super) async fn dead_commands(
    State(state): State<AppState>,
    Query(query): Query<DeadQuery>,
) -> Result<Json<Value>, ApiError> {
    let limit = query.limit.unwrap_or(DEFAULT_DEAD);
    if !(1..=MAX_DEAD).contains(&limit) {
        return Err(ApiError::Validation(format!(
            "limit: must be between 1 and {MAX_DEAD}"
        )));
    }
    let overviews = state.overviews.clone();
    overviews
        .dead
        .read(limit, read_dead(state, limit))
        .await
        .map(Json)
}

async fn read_dead(state: AppState, limit: u32) -> Result<DeadCommands, ApiError> {
    let mut items = Vec::new();
    let mut truncated = false;
    for org in state.store.list_organisations().await? {
        let left = limit.saturating_sub(u32::try_from(items.len()).unwrap_or(u32::MAX));
        if left == 0 {
            truncated = truncated
                || !state
                    .store
                    .list_dead(org.id, None, 1)
                    .await?
                    .items
                    .is_empty();
            continue;
        }
        let page = state.store.list_dead(org.id, None, left).await?;
        truncated = truncated || page.next_cursor.is_some();
        items.extend(page.items.into_iter().map(|command| DeadCommand {
            org: org.name.clone(),
            command: command.into(),
        }));
    }
    Ok(DeadCommands { items, truncated })
}

/// One command to requeue.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CommandRef {
    /// The organisation's name.
    #[schema(pattern = "^[a-zA-Z0-9_.:-]{1,64}$")]
    org: String,
    /// The command id.
    #[schema(value_type = uuid::Uuid)]
    id: CommandId,
}

/// The body of `POST /v1/admin/dead-commands/requeue`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RequeueRequest {
    #[schema(min_items = 1, max_items = 100)]
    commands: Vec<CommandRef>,
}

/// A command that was not requeued, and why.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct NotRequeued {
    org: String,
    #[schema(value_type = uuid::Uuid)]
    id: CommandId,
    /// `not_found`, `invalid_state`, or `unavailable` (the store could not be reached for this item).
    code: &'static str,
    message: String,
}

/// The answer of `POST /v1/admin/dead-commands/requeue`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct RequeueResult {
    /// The requeued commands, now pending.
    requeued: Vec<DeadCommand>,
    /// The others: unknown, or not dead or failed any more.
    not_requeued: Vec<NotRequeued>,
}

/// Puts dead (or failed) commands of any organisation back to pending, each on its own: one
/// that cannot be requeued does not stop the others.
#[utoipa::path(
    post,
    path = "/v1/admin/dead-commands/requeue",
    tag = "admin",
    request_body = RequeueRequest,
    security(("operator" = [])),
    responses(
        (status = 200, description = "What was requeued and what was not", body = RequeueResult),
        (status = 403, description = "`forbidden`: an organisation's API key, or no CSRF token with a session cookie", body = ErrorBody),
    )
)]
pub(super) async fn requeue(
    State(state): State<AppState>,
    Extension(operator): Extension<Operator>,
    Json(request): Json<RequeueRequest>,
) -> Result<Json<RequeueResult>, ApiError> {
    if request.commands.is_empty() || request.commands.len() > MAX_REQUEUE {
        return Err(ApiError::Validation(format!(
            "commands: 1 to {MAX_REQUEUE} commands"
        )));
    }
    let mut result = RequeueResult {
        requeued: Vec::new(),
        not_requeued: Vec::new(),
    };
    for CommandRef { org, id } in request.commands {
        let refused = |code: &'static str, message: String, org: String| NotRequeued {
            org,
            id,
            code,
            message,
        };
        // Each item stands alone: one that cannot be read now (a busy store) is reported as not
        // requeued, and the items requeued before it stay requeued and reported.
        let found = match state.store.find_org_by_name(&org).await {
            Ok(found) => found,
            Err(error) => {
                let message = ApiError::from(error).to_string();
                result
                    .not_requeued
                    .push(refused("unavailable", message, org));
                continue;
            }
        };
        let Some(Organisation {
            id: org_id, name, ..
        }) = found
        else {
            result
                .not_requeued
                .push(refused("not_found", "no such organisation".to_owned(), org));
            continue;
        };
        match state
            .store
            .requeue(org_id, id)
            .await
            .map_err(ApiError::from)
        {
            Ok(command) => {
                tracing::info!(target: "keel::audit", action = "command.requeue", %operator, org = %name, command_id = %id.0, "command requeued");
                state.wakeups.wake_target(org_id, &command.target);
                result.requeued.push(DeadCommand {
                    org: name,
                    command: command.into(),
                });
            }
            Err(ApiError::NotFound) => {
                result
                    .not_requeued
                    .push(refused("not_found", "no such command".to_owned(), name));
            }
            Err(ApiError::InvalidState(message)) => {
                result
                    .not_requeued
                    .push(refused("invalid_state", message, name));
            }
            Err(other) => {
                result
                    .not_requeued
                    .push(refused("unavailable", other.to_string(), name));
            }
        }
    }
    // What the page shows next reflects the requeue at once.
    state.overviews.forget();
    Ok(Json(result))
}
