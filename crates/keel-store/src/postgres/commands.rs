//! Commands and the lease engine: create, claim (`FOR UPDATE SKIP LOCKED`), heartbeat,
//! complete, fail, release, requeue, hand-back, attempts, retention; broadcasts.

use serde_json::Value;
use time::OffsetDateTime;

use super::PgStore;
use crate::error::StoreResult;
use crate::model::{
    AgentId, Attempt, ClaimToken, Claimed, Command, CommandFilter, CommandId, CommandStatus,
    Created, FinishedCount, Idempotency, Lease, NewBroadcast, NewCommand, NewCommandItem, OrgId,
    Page, Released,
};

pub(super) async fn create_command(
    _store: &PgStore,
    _org: OrgId,
    _command: NewCommand,
    _idempotency: Option<Idempotency>,
) -> StoreResult<Created> {
    Err(super::accounts::not_yet("create_command"))
}

pub(super) async fn create_commands(
    _store: &PgStore,
    _org: OrgId,
    _items: Vec<NewCommandItem>,
) -> StoreResult<Vec<Created>> {
    Err(super::accounts::not_yet("create_commands"))
}

pub(super) async fn create_broadcast(
    _store: &PgStore,
    _org: OrgId,
    _broadcast: NewBroadcast,
    _idempotency: Option<Idempotency>,
) -> StoreResult<Created> {
    Err(super::accounts::not_yet("create_broadcast"))
}

pub(super) async fn find_idempotent(
    _store: &PgStore,
    _org: OrgId,
    _idempotency: &Idempotency,
) -> StoreResult<Option<Created>> {
    Err(super::accounts::not_yet("find_idempotent"))
}

pub(super) async fn list_children(
    _store: &PgStore,
    _org: OrgId,
    _parent: CommandId,
) -> StoreResult<Vec<Command>> {
    Err(super::accounts::not_yet("list_children"))
}

pub(super) async fn get_command(
    _store: &PgStore,
    _org: OrgId,
    _id: CommandId,
) -> StoreResult<Option<Command>> {
    Err(super::accounts::not_yet("get_command"))
}

pub(super) async fn list_commands(
    _store: &PgStore,
    _org: OrgId,
    _filter: CommandFilter,
    _cursor: Option<CommandId>,
    _limit: u32,
) -> StoreResult<Page> {
    Err(super::accounts::not_yet("list_commands"))
}

pub(super) async fn cancel_command(
    _store: &PgStore,
    _org: OrgId,
    _id: CommandId,
) -> StoreResult<Command> {
    Err(super::accounts::not_yet("cancel_command"))
}

pub(super) async fn claim(
    _store: &PgStore,
    _org: OrgId,
    _agent: AgentId,
    _queues: &[String],
    _limit: u32,
) -> StoreResult<Vec<Claimed>> {
    Err(super::accounts::not_yet("claim"))
}

pub(super) async fn hand_back(
    _store: &PgStore,
    _org: OrgId,
    _agent: AgentId,
    _claims: Vec<(CommandId, ClaimToken)>,
) -> StoreResult<u64> {
    Err(super::accounts::not_yet("hand_back"))
}

pub(super) async fn list_attempts(
    _store: &PgStore,
    _org: OrgId,
    _id: CommandId,
) -> StoreResult<Vec<Attempt>> {
    Err(super::accounts::not_yet("list_attempts"))
}

pub(super) async fn heartbeat(
    _store: &PgStore,
    _org: OrgId,
    _agent: AgentId,
    _id: CommandId,
    _token: &ClaimToken,
    _progress: Option<Value>,
) -> StoreResult<Lease> {
    Err(super::accounts::not_yet("heartbeat"))
}

pub(super) async fn complete(
    _store: &PgStore,
    _org: OrgId,
    _agent: AgentId,
    _id: CommandId,
    _token: &ClaimToken,
    _result: Value,
) -> StoreResult<Command> {
    Err(super::accounts::not_yet("complete"))
}

pub(super) async fn fail(
    _store: &PgStore,
    _org: OrgId,
    _agent: AgentId,
    _id: CommandId,
    _token: &ClaimToken,
    _error: Value,
    _retryable: bool,
) -> StoreResult<Command> {
    Err(super::accounts::not_yet("fail"))
}

pub(super) async fn release_expired_leases(
    _store: &PgStore,
    _org: Option<OrgId>,
    _limit: u32,
) -> StoreResult<Vec<Released>> {
    Err(super::accounts::not_yet("release_expired_leases"))
}

pub(super) async fn purge_finished(
    _store: &PgStore,
    _before: OffsetDateTime,
    _limit: u32,
) -> StoreResult<u64> {
    Err(super::accounts::not_yet("purge_finished"))
}

pub(super) async fn list_dead(
    _store: &PgStore,
    _org: OrgId,
    _cursor: Option<CommandId>,
    _limit: u32,
) -> StoreResult<Page> {
    Err(super::accounts::not_yet("list_dead"))
}

pub(super) async fn count_commands_by_status(
    _store: &PgStore,
    _org: OrgId,
) -> StoreResult<Vec<(CommandStatus, u64)>> {
    Err(super::accounts::not_yet("count_commands_by_status"))
}

pub(super) async fn finished_per_minute(
    _store: &PgStore,
    _since: OffsetDateTime,
) -> StoreResult<Vec<FinishedCount>> {
    Err(super::accounts::not_yet("finished_per_minute"))
}

pub(super) async fn requeue(_store: &PgStore, _org: OrgId, _id: CommandId) -> StoreResult<Command> {
    Err(super::accounts::not_yet("requeue"))
}

pub(super) async fn next_due_at(
    _store: &PgStore,
    _org: OrgId,
    _agent: AgentId,
    _queues: &[String],
) -> StoreResult<Option<OffsetDateTime>> {
    Err(super::accounts::not_yet("next_due_at"))
}
