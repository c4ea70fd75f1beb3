//! Rows as SQLite stores them, and their encoding (UUID blobs, microsecond instants, JSON text).

use std::time::Duration;

use serde_json::Value;
use sqlx::types::Json;
use time::OffsetDateTime;
use uuid::Uuid;

pub(super) use crate::common::{corrupt, duration_millis, from_micros, parse_status, to_u32};
use crate::error::StoreResult;
use crate::labels::Labels;
use crate::model::{
    Agent, AgentId, ApiKey, ApiKeyId, Attempt, Broadcast, ClaimToken, Claimed, Command, CommandId,
    DeadReason, OrgId, Organisation, PausedQueue, Scope, Target,
};

pub(super) fn truncate_to_micros(t: OffsetDateTime) -> OffsetDateTime {
    from_micros(to_micros(t)).unwrap_or(t)
}

pub(super) fn to_micros(t: OffsetDateTime) -> i64 {
    let micros = t.unix_timestamp_nanos().div_euclid(1000);
    i64::try_from(micros).unwrap_or(if micros < 0 { i64::MIN } else { i64::MAX })
}

#[derive(sqlx::FromRow)]
pub(super) struct OrgRow {
    pub(super) id: OrgId,
    pub(super) name: String,
    pub(super) created_at: i64,
}

impl OrgRow {
    pub(super) fn into_organisation(self) -> StoreResult<Organisation> {
        Ok(Organisation {
            id: self.id,
            name: self.name,
            created_at: from_micros(self.created_at)?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct ApiKeyRow {
    pub(super) id: ApiKeyId,
    pub(super) org_id: OrgId,
    pub(super) name: String,
    pub(super) prefix: String,
    pub(super) token_hash: String,
    pub(super) scopes: Json<Vec<String>>,
    pub(super) agent_id: Option<AgentId>,
    pub(super) created_at: i64,
    pub(super) revoked_at: Option<i64>,
}

impl ApiKeyRow {
    pub(super) fn into_api_key(self) -> StoreResult<ApiKey> {
        let scopes = self
            .scopes
            .0
            .iter()
            .map(|s| s.parse::<Scope>().map_err(corrupt))
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(ApiKey {
            id: self.id,
            org_id: self.org_id,
            name: self.name,
            prefix: self.prefix,
            scopes,
            agent_id: self.agent_id,
            created_at: from_micros(self.created_at)?,
            revoked_at: self.revoked_at.map(from_micros).transpose()?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct AgentRow {
    pub(super) id: AgentId,
    pub(super) org_id: OrgId,
    pub(super) name: String,
    pub(super) version: Option<String>,
    pub(super) metadata: Json<Value>,
    pub(super) queues: Json<Vec<String>>,
    pub(super) boot_id: Option<Uuid>,
    pub(super) boot_count: i64,
    pub(super) booted_at: Option<i64>,
    pub(super) last_seen_at: Option<i64>,
    pub(super) created_at: i64,
    pub(super) labels: Json<Labels>,
    pub(super) assigned_labels: Json<Labels>,
    pub(super) cordoned_at: Option<i64>,
}

impl AgentRow {
    pub(super) fn into_agent(self) -> StoreResult<Agent> {
        Ok(Agent {
            id: self.id,
            org_id: self.org_id,
            name: self.name,
            version: self.version,
            metadata: self.metadata.0,
            queues: self.queues.0,
            boot_id: self.boot_id,
            boot_count: to_u32(self.boot_count)?,
            booted_at: self.booted_at.map(from_micros).transpose()?,
            last_seen_at: self.last_seen_at.map(from_micros).transpose()?,
            created_at: from_micros(self.created_at)?,
            reported_labels: self.labels.0,
            assigned_labels: self.assigned_labels.0,
            cordoned_at: self.cordoned_at.map(from_micros).transpose()?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct CommandRow {
    pub(super) id: CommandId,
    pub(super) org_id: OrgId,
    pub(super) command_type: String,
    pub(super) target_agent_id: Option<AgentId>,
    pub(super) queue: Option<String>,
    pub(super) params: Json<Value>,
    pub(super) priority: i32,
    pub(super) run_at: i64,
    pub(super) max_attempts: i64,
    pub(super) lease_duration_ms: i64,
    pub(super) status: String,
    pub(super) attempts: i64,
    pub(super) claim_token: Option<String>,
    pub(super) lease_expires_at: Option<i64>,
    pub(super) claimed_by: Option<AgentId>,
    pub(super) progress: Option<Json<Value>>,
    pub(super) result: Option<Json<Value>>,
    pub(super) error: Option<Json<Value>>,
    pub(super) dead_reason: Option<String>,
    pub(super) cancel_requested: bool,
    pub(super) idempotency_key: Option<String>,
    pub(super) request_hash: Option<String>,
    pub(super) created_at: i64,
    pub(super) updated_at: i64,
    pub(super) finished_at: Option<i64>,
    pub(super) parent_id: Option<CommandId>,
    pub(super) selector: Option<String>,
    pub(super) online_only: Option<bool>,
    pub(super) max_concurrency: Option<i64>,
    pub(super) broadcast_agents: Option<Json<Vec<AgentId>>>,
}

impl CommandRow {
    /// The command, and its claim token if it is executing.
    pub(super) fn into_command(self) -> StoreResult<(Command, Option<ClaimToken>)> {
        let id = self.id;
        let target = crate::common::command_target(self.target_agent_id, self.queue, self.selector)
            .ok_or_else(|| corrupt(format!("command {id}: bad target")))?;
        // A broadcast parent: see the fleet migration.
        let broadcast = match target {
            Target::Broadcast(_) => Some(Broadcast {
                online_only: self.online_only.unwrap_or(true),
                max_concurrency: self.max_concurrency.map(to_u32).transpose()?,
                agents: self.broadcast_agents.map(|a| a.0).unwrap_or_default(),
            }),
            Target::Agent(_) | Target::Queue(_) => None,
        };
        let command = Command {
            id: self.id,
            org_id: self.org_id,
            command_type: self.command_type,
            target,
            params: self.params.0,
            priority: self.priority,
            run_at: from_micros(self.run_at)?,
            max_attempts: to_u32(self.max_attempts)?,
            lease_duration: Duration::from_millis(
                u64::try_from(self.lease_duration_ms).map_err(corrupt)?,
            ),
            status: parse_status(&self.status)?,
            attempts: to_u32(self.attempts)?,
            claimed_by: self.claimed_by,
            lease_expires_at: self.lease_expires_at.map(from_micros).transpose()?,
            progress: self.progress.map(|j| j.0),
            result: self.result.map(|j| j.0),
            error: self.error.map(|j| j.0),
            dead_reason: self
                .dead_reason
                .map(|r| r.parse::<DeadReason>().map_err(corrupt))
                .transpose()?,
            cancel_requested: self.cancel_requested,
            idempotency_key: self.idempotency_key,
            created_at: from_micros(self.created_at)?,
            updated_at: from_micros(self.updated_at)?,
            finished_at: self.finished_at.map(from_micros).transpose()?,
            parent_id: self.parent_id,
            broadcast,
        };
        Ok((command, self.claim_token.map(ClaimToken)))
    }

    pub(super) fn into_claimed(self) -> StoreResult<Claimed> {
        let (command, token) = self.into_command()?;
        match (token, command.lease_expires_at) {
            (Some(claim_token), Some(lease_expires_at)) => Ok(Claimed {
                command,
                claim_token,
                lease_expires_at,
            }),
            _ => Err(corrupt(format!(
                "claimed command {} has no lease",
                command.id
            ))),
        }
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct AttemptRow {
    pub(super) attempt: i64,
    pub(super) agent_id: AgentId,
    pub(super) claimed_at: i64,
    pub(super) ended_at: Option<i64>,
    pub(super) outcome: Option<String>,
    pub(super) error: Option<Json<Value>>,
}

impl AttemptRow {
    pub(super) fn into_attempt(self) -> StoreResult<Attempt> {
        Ok(Attempt {
            number: to_u32(self.attempt)?,
            agent_id: self.agent_id,
            claimed_at: from_micros(self.claimed_at)?,
            ended_at: self.ended_at.map(from_micros).transpose()?,
            outcome: self
                .outcome
                .map(|o| o.parse().map_err(corrupt))
                .transpose()?,
            error: self.error.map(|j| j.0),
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct PausedQueueRow {
    pub(super) queue: String,
    pub(super) paused_at: i64,
}

impl PausedQueueRow {
    pub(super) fn into_paused_queue(self) -> StoreResult<PausedQueue> {
        Ok(PausedQueue {
            queue: self.queue,
            paused_at: from_micros(self.paused_at)?,
        })
    }
}
