//! Broadcasts: `POST /v1/commands` with a `selector` creates a parent command and one child per
//! agent the selector matches now; the parent's view summarises its children.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use keel_store::{
    AgentId, Broadcast, Command, CommandId, CommandStatus, LabelSelector, NewBroadcast, NewCommand,
    OrgId,
};
use serde::Serialize;
use serde_json::Value;

use super::AppState;
use super::auth::Caller;
use super::commands::{CommandView, canonical, keyed};
use super::error::ApiError;
use super::json::Json;
use crate::commands::broadcast;

/// A validated broadcast request.
#[derive(Debug)]
pub(super) struct Request {
    pub(super) command: NewCommand,
    pub(super) selector: LabelSelector,
    pub(super) online_only: bool,
    pub(super) max_concurrency: Option<u32>,
}

/// How a broadcast was created, the agents it reached and, when one command is shown, its
/// children.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct BroadcastView {
    online_only: bool,
    max_concurrency: Option<u32>,
    /// The agents the selector matched at creation, one child each.
    agents: Vec<AgentId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub(super) children: Option<ChildrenView>,
}

impl From<Broadcast> for BroadcastView {
    fn from(broadcast: Broadcast) -> Self {
        Self {
            online_only: broadcast.online_only,
            max_concurrency: broadcast.max_concurrency,
            agents: broadcast.agents,
            children: None,
        }
    }
}

/// A broadcast's children: how many are in each status, which agents' children failed (or were
/// cancelled or died), and each child.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct ChildrenView {
    /// Every status, with 0 for none.
    counts: BTreeMap<&'static str, u64>,
    failed_agents: Vec<AgentId>,
    items: Vec<ChildView>,
}

/// One child: its agent, status and outcome.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ChildView {
    command_id: CommandId,
    agent_id: Option<AgentId>,
    status: CommandStatus,
    attempts: u32,
    result: Option<Value>,
    error: Option<Value>,
}

impl ChildrenView {
    pub(super) fn new(children: Vec<Command>) -> Self {
        let mut counts: BTreeMap<&'static str, u64> = CommandStatus::ALL
            .iter()
            .map(|status| (status.as_str(), 0))
            .collect();
        let mut failed_agents = Vec::new();
        let mut items = Vec::with_capacity(children.len());
        for child in children {
            *counts.entry(child.status.as_str()).or_default() += 1;
            let agent_id = match child.target {
                keel_store::Target::Agent(agent) => Some(agent),
                _ => None,
            };
            let failed = matches!(
                child.status,
                CommandStatus::Failed | CommandStatus::Cancelled | CommandStatus::Dead
            );
            if let (true, Some(agent)) = (failed, agent_id) {
                failed_agents.push(agent);
            }
            items.push(ChildView {
                command_id: child.id,
                agent_id,
                status: child.status,
                attempts: child.attempts,
                result: child.result,
                error: child.error,
            });
        }
        Self {
            counts,
            failed_agents,
            items,
        }
    }
}

/// Adds a broadcast parent's children to its view (nothing for another command).
pub(super) async fn add_children(
    state: &AppState,
    org: OrgId,
    view: &mut CommandView,
) -> Result<(), ApiError> {
    if view.is_broadcast() {
        let children = state.store.list_children(org, view.id()).await?;
        view.set_children(children);
    }
    Ok(())
}

/// Creates a broadcast: resolves the selector now, draws one `work` token per command (parent
/// and children), and creates them all in one transaction.
pub(super) async fn create(
    state: &AppState,
    caller: &Caller,
    headers: &HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    let org = caller.org();
    let Request {
        command,
        selector,
        online_only,
        max_concurrency,
    } = request;
    let mut identity = canonical(&command);
    if let Some(fields) = identity.as_object_mut() {
        fields.insert("online_only".to_owned(), online_only.into());
        fields.insert("max_concurrency".to_owned(), max_concurrency.into());
    }
    let idempotency = keyed(headers, identity)?;
    // A retry answers the broadcast it created, whatever the agents and the bucket are now.
    if let Some(idempotency) = &idempotency
        && let Some(earlier) = state.store.find_idempotent(org, idempotency).await?
    {
        let mut view = CommandView::from(earlier.command);
        add_children(state, org, &mut view).await?;
        return Ok((StatusCode::OK, Json(view)).into_response());
    }
    let agents = broadcast::resolve(
        state.store.as_ref(),
        org,
        &selector,
        online_only,
        state.agent_online_window,
    )
    .await?;
    if agents.is_empty() {
        let which = if online_only { "online agent" } else { "agent" };
        return Err(ApiError::Validation(format!(
            "selector: `{selector}` matches no {which}"
        )));
    }
    state
        .overload
        .admit_batch_create(state.store.as_ref(), org, agents.len() + 1)
        .await?;
    state.overload.admit_create(command.priority)?;
    let created = state
        .store
        .create_broadcast(
            org,
            NewBroadcast {
                command,
                online_only,
                max_concurrency,
                agents: agents.clone(),
            },
            idempotency,
        )
        .await?;
    let status = if created.created {
        metrics::counter!("keel_commands_created_total").increment(agents.len() as u64 + 1);
        tracing::info!(target: "keel::audit", action = "command.broadcast", command_id = %created.command.id, selector = %selector, agents = agents.len(), "broadcast created");
        state.wakeups.wake_target(org, &created.command.target);
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut view = CommandView::from(created.command);
    add_children(state, org, &mut view).await?;
    Ok((status, Json(view)).into_response())
}
