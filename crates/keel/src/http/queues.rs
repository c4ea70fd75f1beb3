//! `/v1/queues`: the organisation's queues (served by its agents, or paused), and pausing and
//! resuming one. A paused queue's pooled commands are not handed out; creates are still
//! accepted.

use std::collections::BTreeMap;

use axum::Router;
use axum::extract::{Path, State};
use axum::routing::{get, post};
use keel_store::{Scope, Target};
use serde::Serialize;
use time::OffsetDateTime;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::json::Json;
use super::validate::check_name;

/// The queue routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", get(list))
        .route("/{queue}/pause", post(pause))
        .route("/{queue}/resume", post(resume))
}

/// A queue as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct QueueView {
    queue: String,
    /// Its pooled commands are not handed out while it is paused.
    paused: bool,
    #[serde(with = "time::serde::rfc3339::option")]
    paused_at: Option<OffsetDateTime>,
    /// The agents that said at their last check-in they serve it, by name.
    agents: Vec<String>,
}

/// The answer of `GET /v1/queues`.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct QueueList {
    queues: Vec<QueueView>,
}

/// The organisation's queues: each one an agent serves or that is paused, by name.
#[utoipa::path(
    get,
    path = "/v1/queues",
    tag = "queues",
    security(("api_key" = ["commands:read"])),
    responses((status = 200, description = "The queues", body = QueueList))
)]
pub(super) async fn list(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<QueueList>, ApiError> {
    caller.require(Scope::CommandsRead)?;
    let org = caller.org();
    let mut queues: BTreeMap<String, QueueView> = BTreeMap::new();
    for agent in state.store.list_agents(org).await? {
        for queue in &agent.queues {
            queue_entry(&mut queues, queue)
                .agents
                .push(agent.name.clone());
        }
    }
    for paused in state.store.list_paused_queues(org).await? {
        let view = queue_entry(&mut queues, &paused.queue);
        view.paused = true;
        view.paused_at = Some(paused.paused_at);
    }
    Ok(Json(QueueList {
        queues: queues.into_values().collect(),
    }))
}

/// The view of `name` in `queues`, added (not paused, no agent) if absent.
fn queue_entry<'a>(queues: &'a mut BTreeMap<String, QueueView>, name: &str) -> &'a mut QueueView {
    queues.entry(name.to_owned()).or_insert_with(|| QueueView {
        queue: name.to_owned(),
        paused: false,
        paused_at: None,
        agents: Vec::new(),
    })
}

/// Pauses a queue: its pooled commands are not handed out until it is resumed; creates are
/// still accepted. Pausing a paused queue keeps the first time.
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/pause",
    tag = "queues",
    params(("queue" = String, Path, pattern = "^[a-zA-Z0-9_.:-]{1,64}$", description = "The queue")),
    security(("api_key" = ["commands:write"])),
    responses(
        (status = 200, description = "The queue, paused", body = QueueView),
        (status = 422, description = "`validation_failed`: not a queue name", body = ErrorBody),
    )
)]
pub(super) async fn pause(
    State(state): State<AppState>,
    caller: Caller,
    Path(queue): Path<String>,
) -> Result<Json<QueueView>, ApiError> {
    caller.require(Scope::CommandsWrite)?;
    check_name("queue", &queue)?;
    let paused = state.store.pause_queue(caller.org(), &queue).await?;
    tracing::info!(target: "keel::audit", action = "queue.pause", %queue, "queue paused");
    crate::telemetry::refresh_fleet_gauges(state.store.as_ref()).await;
    Ok(Json(QueueView {
        queue: paused.queue,
        paused: true,
        paused_at: Some(paused.paused_at),
        agents: serving(&state, caller.org(), &queue).await?,
    }))
}

/// Resumes a queue: its pooled commands are handed out again (resuming one that is not paused
/// changes nothing).
#[utoipa::path(
    post,
    path = "/v1/queues/{queue}/resume",
    tag = "queues",
    params(("queue" = String, Path, pattern = "^[a-zA-Z0-9_.:-]{1,64}$", description = "The queue")),
    security(("api_key" = ["commands:write"])),
    responses(
        (status = 200, description = "The queue, not paused", body = QueueView),
        (status = 422, description = "`validation_failed`: not a queue name", body = ErrorBody),
    )
)]
pub(super) async fn resume(
    State(state): State<AppState>,
    caller: Caller,
    Path(queue): Path<String>,
) -> Result<Json<QueueView>, ApiError> {
    caller.require(Scope::CommandsWrite)?;
    check_name("queue", &queue)?;
    let was_paused = state.store.resume_queue(caller.org(), &queue).await?;
    if was_paused {
        tracing::info!(target: "keel::audit", action = "queue.resume", %queue, "queue resumed");
        crate::telemetry::refresh_fleet_gauges(state.store.as_ref()).await;
        // Its waiting claims look again at once.
        state
            .wakeups
            .wake_target(caller.org(), &Target::Queue(queue.clone()));
    }
    Ok(Json(QueueView {
        agents: serving(&state, caller.org(), &queue).await?,
        queue,
        paused: false,
        paused_at: None,
    }))
}

/// The names of the organisation's agents that serve `queue`.
async fn serving(
    state: &AppState,
    org: keel_store::OrgId,
    queue: &str,
) -> Result<Vec<String>, ApiError> {
    Ok(state
        .store
        .list_agents(org)
        .await?
        .into_iter()
        .filter(|agent| agent.queues.iter().any(|q| q == queue))
        .map(|agent| agent.name)
        .collect())
}
