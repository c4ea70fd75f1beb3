//! Commands and the lease engine: create, claim (`FOR UPDATE SKIP LOCKED`), heartbeat,
//! complete, fail, release, requeue, hand-back, attempts, retention.
//!
//! Every change of a command is one statement that also keeps its attempts (data-modifying
//! `WITH` clauses): a claim opens an attempt (numbered on from the last one); a report, a release
//! or a cancelled hand-back ends it; a hand-back deletes it. Fencing is in each statement's
//! `WHERE`: `status = 'executing' AND claim_token = … AND claimed_by = …`. Broadcast children
//! hand on their slots and end their parent through the triggers of the commands migration.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;
use sqlx::postgres::PgPool;
use sqlx::types::Json;
use sqlx::{PgConnection, Postgres, Transaction};
use time::OffsetDateTime;
use uuid::Uuid;

use super::PgStore;
use super::broadcasts::{self, Role};
use super::create_groups::Create;
use super::report_groups::{self, Reports};
use crate::backoff::retry_backoff;
use crate::common::{
    command_target, corrupt, duration_millis, not_a_broadcast, page_of, parse_status, to_u32,
    validate_new_command,
};
use crate::crash::{self, Phase, Step};
use crate::error::{StoreError, StoreResult};
use crate::model::{
    AgentId, Attempt, Broadcast, ClaimToken, Claimed, Command, CommandFilter, CommandId,
    CommandStatus, Created, DeadReason, FinishedCount, Idempotency, Lease, NewBroadcast,
    NewCommand, NewCommandItem, OrgId, Page, ReleaseOutcome, Released, Target,
};
use crate::store::{MAX_BATCH_CREATE, MAX_CLAIM_BATCH, MAX_PAGE_SIZE};

/// The command columns, as [`CommandRow`] reads them.
pub(super) const COMMAND_COLUMNS: &str = "id, org_id, command_type, target_agent_id, queue, \
     params, priority, run_at, max_attempts, lease_duration_ms, status, attempts, claim_token, \
     lease_expires_at, claimed_by, progress, result, error, dead_reason, cancel_requested, \
     idempotency_key, request_hash, created_at, updated_at, finished_at, parent_id, selector, \
     online_only, max_concurrency, broadcast_agents";

/// Claim order, the order of the claim indexes.
const CLAIM_ORDER: &str = "priority DESC, run_at, id";

/// The most due scheduled commands of one source a claim considers: a claim stays short even
/// when a million scheduled commands fall due at once (the next claims take the rest).
const DUE_BATCH: u32 = 1000;

/// Attempts after which the retry backoff no longer grows (its doubling stops at 31).
const BACKOFF_STEPS: u32 = 32;

/// A command as stored.
#[derive(sqlx::FromRow)]
pub(super) struct CommandRow {
    id: CommandId,
    org_id: OrgId,
    command_type: String,
    target_agent_id: Option<AgentId>,
    queue: Option<String>,
    params: Json<Value>,
    priority: i32,
    run_at: OffsetDateTime,
    max_attempts: i32,
    lease_duration_ms: i64,
    status: String,
    attempts: i32,
    claim_token: Option<String>,
    lease_expires_at: Option<OffsetDateTime>,
    claimed_by: Option<AgentId>,
    progress: Option<Json<Value>>,
    result: Option<Json<Value>>,
    error: Option<Json<Value>>,
    dead_reason: Option<String>,
    cancel_requested: bool,
    idempotency_key: Option<String>,
    request_hash: Option<String>,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
    finished_at: Option<OffsetDateTime>,
    parent_id: Option<CommandId>,
    selector: Option<String>,
    online_only: Option<bool>,
    max_concurrency: Option<i32>,
    broadcast_agents: Option<Json<Vec<AgentId>>>,
}

impl CommandRow {
    /// The command, and its claim token if it is executing.
    pub(super) fn into_parts(self) -> StoreResult<(Command, Option<ClaimToken>)> {
        let id = self.id;
        let target = command_target(self.target_agent_id, self.queue, self.selector)
            .ok_or_else(|| corrupt(format!("command {id}: bad target")))?;
        let broadcast = match target {
            Target::Broadcast(_) => Some(Broadcast {
                online_only: self.online_only.unwrap_or(true),
                max_concurrency: self
                    .max_concurrency
                    .map(|n| to_u32(i64::from(n)))
                    .transpose()?,
                agents: self.broadcast_agents.map(|a| a.0).unwrap_or_default(),
            }),
            Target::Agent(_) | Target::Queue(_) => None,
        };
        let command = Command {
            id,
            org_id: self.org_id,
            command_type: self.command_type,
            target,
            params: self.params.0,
            priority: self.priority,
            run_at: self.run_at,
            max_attempts: to_u32(i64::from(self.max_attempts))?,
            lease_duration: Duration::from_millis(
                u64::try_from(self.lease_duration_ms).map_err(corrupt)?,
            ),
            status: parse_status(&self.status)?,
            attempts: to_u32(i64::from(self.attempts))?,
            claimed_by: self.claimed_by,
            lease_expires_at: self.lease_expires_at,
            progress: self.progress.map(|j| j.0),
            result: self.result.map(|j| j.0),
            error: self.error.map(|j| j.0),
            dead_reason: self
                .dead_reason
                .map(|r| r.parse::<DeadReason>().map_err(corrupt))
                .transpose()?,
            cancel_requested: self.cancel_requested,
            idempotency_key: self.idempotency_key,
            created_at: self.created_at,
            updated_at: self.updated_at,
            finished_at: self.finished_at,
            parent_id: self.parent_id,
            broadcast,
        };
        Ok((command, self.claim_token.map(ClaimToken)))
    }

    /// The command.
    pub(super) fn into_command(self) -> StoreResult<Command> {
        self.into_parts().map(|(command, _)| command)
    }

    fn into_claimed(self) -> StoreResult<Claimed> {
        let (command, token) = self.into_parts()?;
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
struct AttemptRow {
    attempt: i32,
    agent_id: AgentId,
    claimed_at: OffsetDateTime,
    ended_at: Option<OffsetDateTime>,
    outcome: Option<String>,
    error: Option<Json<Value>>,
}

impl AttemptRow {
    fn into_attempt(self) -> StoreResult<Attempt> {
        Ok(Attempt {
            number: to_u32(i64::from(self.attempt))?,
            agent_id: self.agent_id,
            claimed_at: self.claimed_at,
            ended_at: self.ended_at,
            outcome: self
                .outcome
                .map(|o| o.parse().map_err(corrupt))
                .transpose()?,
            error: self.error.map(|j| j.0),
        })
    }
}

// --- creating ---

/// A command to insert, and where it sits in a broadcast.
#[derive(Clone)]
pub(super) struct NewRow {
    pub(super) command: NewCommand,
    pub(super) idempotency: Option<Idempotency>,
    /// The broadcast it is a child of.
    pub(super) parent: Option<CommandId>,
    /// Held (`scheduled = 2`): a parent for good, a child until a sibling hands it a slot.
    pub(super) held: bool,
    /// For a parent: how the broadcast was created.
    pub(super) broadcast: Option<Broadcast>,
}

impl NewRow {
    /// A command outside any broadcast.
    pub(super) fn plain(command: NewCommand, idempotency: Option<Idempotency>) -> Self {
        Self {
            command,
            idempotency,
            parent: None,
            held: false,
            broadcast: None,
        }
    }
}

/// Inserts the rows in one statement, each due at its `run_at` (now when unset) and scheduled
/// when that is later than now. A row whose idempotency key was used before (or earlier in the
/// same rows) is not inserted: it answers with the existing command (`created: false`), or
/// `IdempotencyMismatch` for another request hash. Answers are in the rows' order. When a row
/// is refused the caller's transaction must be dropped, so that the others are undone.
pub(super) async fn insert_rows(
    conn: &mut PgConnection,
    org: OrgId,
    rows: Vec<NewRow>,
) -> StoreResult<Vec<Created>> {
    const SQL: &str = "INSERT INTO commands (id, org_id, command_type, target_agent_id, queue, \
           params, priority, run_at, max_attempts, lease_duration_ms, status, idempotency_key, \
           request_hash, created_at, updated_at, scheduled, parent_id, selector, online_only, \
           max_concurrency, broadcast_agents) \
         SELECT n.id, $1, n.command_type, n.target_agent_id, n.queue, n.params, n.priority, \
           COALESCE(n.run_at, keel_now()), n.max_attempts, n.lease_ms, 'pending', n.key, \
           n.hash, keel_now(), keel_now(), \
           CASE WHEN n.held THEN 2 WHEN n.run_at > keel_now() THEN 1 ELSE 0 END, \
           n.parent_id, n.selector, n.online_only, n.max_concurrency, n.agents \
         FROM UNNEST($2::uuid[], $3::text[], $4::uuid[], $5::text[], $6::jsonb[], $7::int4[], \
           $8::timestamptz[], $9::int4[], $10::int8[], $11::text[], $12::text[], $13::bool[], \
           $14::uuid[], $15::text[], $16::bool[], $17::int4[], $18::jsonb[]) \
           WITH ORDINALITY AS n(id, command_type, target_agent_id, queue, params, priority, \
           run_at, max_attempts, lease_ms, key, hash, held, parent_id, selector, online_only, \
           max_concurrency, agents, ord) \
         ORDER BY n.ord \
         ON CONFLICT (org_id, idempotency_key) WHERE idempotency_key IS NOT NULL DO NOTHING";
    let n = rows.len();
    let mut ids = Vec::with_capacity(n);
    let mut types = Vec::with_capacity(n);
    let mut agents = Vec::with_capacity(n);
    let mut queues = Vec::with_capacity(n);
    let mut params = Vec::with_capacity(n);
    let mut priorities = Vec::with_capacity(n);
    let mut run_ats = Vec::with_capacity(n);
    let mut max_attempts = Vec::with_capacity(n);
    let mut leases = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    let mut hashes = Vec::with_capacity(n);
    let mut held = Vec::with_capacity(n);
    let mut parents = Vec::with_capacity(n);
    let mut selectors = Vec::with_capacity(n);
    let mut online_only = Vec::with_capacity(n);
    let mut concurrency = Vec::with_capacity(n);
    let mut broadcast_agents = Vec::with_capacity(n);
    for row in &rows {
        let command = &row.command;
        let (agent, queue, selector) = match &command.target {
            Target::Agent(agent) => (Some(agent.0), None, None),
            Target::Queue(queue) => (None, Some(queue.clone()), None),
            // The empty queue name, which no agent serves (see the fleet migration).
            Target::Broadcast(selector) => (None, Some(String::new()), Some(selector.clone())),
        };
        ids.push(CommandId::new().0);
        types.push(command.command_type.clone());
        agents.push(agent);
        queues.push(queue);
        params.push(Json(command.params.clone()));
        priorities.push(command.priority);
        run_ats.push(command.run_at);
        max_attempts.push(i32::try_from(command.max_attempts).unwrap_or(i32::MAX));
        leases.push(duration_millis(command.lease_duration));
        keys.push(row.idempotency.as_ref().map(|i| i.key.clone()));
        hashes.push(row.idempotency.as_ref().map(|i| i.request_hash.clone()));
        held.push(row.held);
        parents.push(row.parent.map(|p| p.0));
        selectors.push(selector);
        online_only.push(row.broadcast.as_ref().map(|b| b.online_only));
        concurrency.push(
            row.broadcast
                .as_ref()
                .and_then(|b| b.max_concurrency)
                .map(|c| i32::try_from(c).unwrap_or(i32::MAX)),
        );
        broadcast_agents.push(row.broadcast.as_ref().map(|b| Json(b.agents.clone())));
    }
    let sql = format!("{SQL} RETURNING {COMMAND_COLUMNS}");
    let inserted: Vec<CommandRow> = sqlx::query_as(&sql)
        .bind(org)
        .bind(&ids)
        .bind(types)
        .bind(agents)
        .bind(queues)
        .bind(params)
        .bind(priorities)
        .bind(run_ats)
        .bind(max_attempts)
        .bind(leases)
        .bind(&keys)
        .bind(hashes)
        .bind(held)
        .bind(parents)
        .bind(selectors)
        .bind(online_only)
        .bind(concurrency)
        .bind(broadcast_agents)
        .fetch_all(&mut *conn)
        .await
        .map_err(missing_target)?;
    let mut by_id: HashMap<Uuid, Command> = inserted
        .into_iter()
        .map(|row| row.into_command().map(|c| (c.id.0, c)))
        .collect::<StoreResult<_>>()?;
    // The rows not inserted had a key that was taken: read what holds it.
    let taken: Vec<String> = rows
        .iter()
        .zip(&ids)
        .filter(|(_, id)| !by_id.contains_key(*id))
        .filter_map(|(row, _)| row.idempotency.as_ref().map(|i| i.key.clone()))
        .collect();
    // Each key's holder: its request hash and its command.
    let mut by_key: HashMap<String, (Option<String>, Command)> = HashMap::new();
    if !taken.is_empty() {
        let existing: Vec<CommandRow> = sqlx::query_as(&format!(
            "SELECT {COMMAND_COLUMNS} FROM commands \
             WHERE org_id = $1 AND idempotency_key = ANY($2)"
        ))
        .bind(org)
        .bind(&taken)
        .fetch_all(&mut *conn)
        .await?;
        for row in existing {
            let (key, hash) = (row.idempotency_key.clone(), row.request_hash.clone());
            if let Some(key) = key {
                by_key.insert(key, (hash, row.into_command()?));
            }
        }
    }
    let mut created = Vec::with_capacity(n);
    for (row, id) in rows.iter().zip(&ids) {
        if let Some(command) = by_id.remove(id) {
            created.push(Created {
                command,
                created: true,
            });
            continue;
        }
        let idem = row
            .idempotency
            .as_ref()
            .ok_or_else(|| corrupt(format!("command {id} was not inserted")))?;
        let (hash, command) = by_key
            .get(&idem.key)
            .ok_or_else(|| StoreError::Conflict("idempotency key in use".to_owned()))?;
        if hash.as_deref() != Some(idem.request_hash.as_str()) {
            return Err(StoreError::IdempotencyMismatch);
        }
        created.push(Created {
            command: command.clone(),
            created: false,
        });
    }
    Ok(created)
}

/// A foreign key violation of an insert: the target agent is not in the organisation
/// (`UnknownAgent`), or the organisation does not exist (`NotFound`).
pub(super) fn missing_target(err: sqlx::Error) -> StoreError {
    let target = match &err {
        sqlx::Error::Database(db) => db.constraint() == Some("commands_target_agent"),
        _ => false,
    };
    let err = StoreError::from(err);
    if !err.is_foreign_key_violation() {
        err
    } else if target {
        StoreError::UnknownAgent
    } else {
        StoreError::NotFound
    }
}

/// Prefixes an item's `InvalidInput` with its place in a batch.
fn in_batch(n: usize, err: StoreError) -> StoreError {
    match err {
        StoreError::InvalidInput(what) => {
            StoreError::InvalidInput(format!("commands[{n}]: {what}"))
        }
        other => other,
    }
}

pub(super) async fn create_command(
    store: &PgStore,
    org: OrgId,
    command: NewCommand,
    idempotency: Option<Idempotency>,
) -> StoreResult<Created> {
    validate_new_command(&command)?;
    not_a_broadcast(&command)?;
    if idempotency.is_none() {
        return store
            .creates
            .write(Create {
                org,
                row: NewRow::plain(command, None),
            })
            .await;
    }
    let mut conn = store.pool.acquire().await?;
    // One row: nothing to undo when it is refused.
    let created = insert_rows(&mut conn, org, vec![NewRow::plain(command, idempotency)]).await?;
    created
        .into_iter()
        .next()
        .ok_or_else(|| corrupt("no command created"))
}

pub(super) async fn create_commands(
    store: &PgStore,
    org: OrgId,
    items: Vec<NewCommandItem>,
) -> StoreResult<Vec<Created>> {
    if items.len() > MAX_BATCH_CREATE {
        return Err(StoreError::InvalidInput(format!(
            "a batch holds at most {MAX_BATCH_CREATE} commands"
        )));
    }
    for (n, item) in items.iter().enumerate() {
        validate_new_command(&item.command)
            .and_then(|()| not_a_broadcast(&item.command))
            .map_err(|err| in_batch(n, err))?;
    }
    if items.is_empty() {
        return Ok(Vec::new());
    }
    let rows: Vec<NewRow> = items
        .into_iter()
        .map(|item| NewRow::plain(item.command, item.idempotency))
        .collect();
    if rows.iter().all(|row| row.idempotency.is_none()) {
        // One statement: all of them or none.
        let mut conn = store.pool.acquire().await?;
        return insert_rows(&mut conn, org, rows).await;
    }
    // A replay that does not match undoes the batch.
    let mut tx = store.pool.begin().await?;
    let created = insert_rows(&mut tx, org, rows).await;
    settle(tx, created).await
}

/// Commits `tx` when `result` is `Ok`, rolls it back otherwise (at once: its locks go now, not
/// when the connection is next used).
pub(super) async fn settle<T>(
    tx: Transaction<'_, Postgres>,
    result: StoreResult<T>,
) -> StoreResult<T> {
    match result {
        Ok(value) => {
            tx.commit().await?;
            Ok(value)
        }
        Err(err) => {
            // The error that undid it is the one to report.
            let _ = tx.rollback().await;
            Err(err)
        }
    }
}

pub(super) async fn create_broadcast(
    store: &PgStore,
    org: OrgId,
    broadcast: NewBroadcast,
    idempotency: Option<Idempotency>,
) -> StoreResult<Created> {
    broadcasts::create(store, org, broadcast, idempotency).await
}

pub(super) async fn find_idempotent(
    store: &PgStore,
    org: OrgId,
    idempotency: &Idempotency,
) -> StoreResult<Option<Created>> {
    let existing: Option<CommandRow> = sqlx::query_as(&format!(
        "SELECT {COMMAND_COLUMNS} FROM commands WHERE org_id = $1 AND idempotency_key = $2"
    ))
    .bind(org)
    .bind(&idempotency.key)
    .fetch_optional(&store.pool)
    .await?;
    let Some(existing) = existing else {
        return Ok(None);
    };
    if existing.request_hash.as_deref() != Some(idempotency.request_hash.as_str()) {
        return Err(StoreError::IdempotencyMismatch);
    }
    Ok(Some(Created {
        command: existing.into_command()?,
        created: false,
    }))
}

// --- reading ---

pub(super) async fn list_children(
    store: &PgStore,
    org: OrgId,
    parent: CommandId,
) -> StoreResult<Vec<Command>> {
    broadcasts::list_children(store, org, parent).await
}

pub(super) async fn get_command(
    store: &PgStore,
    org: OrgId,
    id: CommandId,
) -> StoreResult<Option<Command>> {
    let row: Option<CommandRow> = sqlx::query_as(&format!(
        "SELECT {COMMAND_COLUMNS} FROM commands WHERE org_id = $1 AND id = $2"
    ))
    .bind(org)
    .bind(id)
    .fetch_optional(&store.pool)
    .await?;
    row.map(CommandRow::into_command).transpose()
}

pub(super) async fn list_commands(
    store: &PgStore,
    org: OrgId,
    filter: CommandFilter,
    cursor: Option<CommandId>,
    limit: u32,
) -> StoreResult<Page> {
    let limit = limit.clamp(1, MAX_PAGE_SIZE);
    // Only the filters given, in id order: the planner picks the listing index that serves
    // them (`commands_list_*`).
    let mut sql = format!("SELECT {COMMAND_COLUMNS} FROM commands WHERE org_id = $1");
    let mut n = 1;
    let mut condition = |present: bool, column: &str| {
        if present {
            n += 1;
            let _ = write!(sql, " AND {column} ${n}");
        }
    };
    condition(filter.status.is_some(), "status =");
    condition(filter.agent.is_some(), "target_agent_id =");
    condition(filter.queue.is_some(), "queue =");
    condition(filter.command_type.is_some(), "command_type =");
    condition(cursor.is_some(), "id <");
    let _ = write!(sql, " ORDER BY id DESC LIMIT ${}", n + 1);
    let mut query = sqlx::query_as::<Postgres, CommandRow>(&sql).bind(org);
    if let Some(status) = filter.status {
        query = query.bind(status.as_str());
    }
    if let Some(agent) = filter.agent {
        query = query.bind(agent);
    }
    if let Some(queue) = filter.queue {
        query = query.bind(queue);
    }
    if let Some(command_type) = filter.command_type {
        query = query.bind(command_type);
    }
    if let Some(cursor) = cursor {
        query = query.bind(cursor);
    }
    // One more than asked, to know whether there is a next page.
    let rows = query
        .bind(i64::from(limit) + 1)
        .fetch_all(&store.pool)
        .await?;
    let items = rows
        .into_iter()
        .map(CommandRow::into_command)
        .collect::<StoreResult<Vec<_>>>()?;
    let (items, next_cursor) = page_of(items, limit, |c| c.id);
    Ok(Page { items, next_cursor })
}

pub(super) async fn list_dead(
    store: &PgStore,
    org: OrgId,
    cursor: Option<CommandId>,
    limit: u32,
) -> StoreResult<Page> {
    let filter = CommandFilter {
        status: Some(CommandStatus::Dead),
        ..CommandFilter::default()
    };
    list_commands(store, org, filter, cursor, limit).await
}

pub(super) async fn count_commands_by_status(
    store: &PgStore,
    org: OrgId,
) -> StoreResult<Vec<(CommandStatus, u64)>> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, COUNT(*) FROM commands WHERE org_id = $1 GROUP BY status")
            .bind(org)
            .fetch_all(&store.pool)
            .await?;
    let mut counts = rows
        .into_iter()
        .map(|(status, count)| Ok((parse_status(&status)?, u64::try_from(count).unwrap_or(0))))
        .collect::<StoreResult<Vec<_>>>()?;
    counts.sort_by_key(|(status, _)| CommandStatus::ALL.iter().position(|s| s == status));
    Ok(counts)
}

pub(super) async fn finished_per_minute(
    store: &PgStore,
    since: OffsetDateTime,
) -> StoreResult<Vec<FinishedCount>> {
    // Read on the retention index; minutes are UTC minutes.
    let rows: Vec<(OffsetDateTime, String, i64)> = sqlx::query_as(
        "SELECT date_trunc('minute', finished_at, 'UTC'), status, COUNT(*) FROM commands \
         WHERE status IN ('completed', 'failed', 'cancelled', 'dead') AND finished_at >= $1 \
         GROUP BY 1, 2",
    )
    .bind(since)
    .fetch_all(&store.pool)
    .await?;
    let mut counts = rows
        .into_iter()
        .map(|(minute, status, count)| {
            Ok(FinishedCount {
                minute,
                status: parse_status(&status)?,
                count: u64::try_from(count).unwrap_or(0),
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
    counts.sort_by_key(|c| {
        let status = CommandStatus::ALL.iter().position(|s| *s == c.status);
        (c.minute, status)
    });
    Ok(counts)
}

pub(super) async fn list_attempts(
    store: &PgStore,
    org: OrgId,
    id: CommandId,
) -> StoreResult<Vec<Attempt>> {
    // The ended attempts, then the running one, which is on the command's row.
    let rows: Vec<AttemptRow> = sqlx::query_as(
        "SELECT a.attempt, a.agent_id, a.claimed_at, a.ended_at, a.outcome, a.error \
         FROM command_attempts a JOIN commands c ON c.id = a.command_id \
         WHERE c.org_id = $1 AND c.id = $2 \
         UNION ALL \
         SELECT attempt_number, claimed_by, claimed_at, NULL, NULL, NULL FROM commands \
         WHERE org_id = $1 AND id = $2 AND status = 'executing' \
         ORDER BY 1",
    )
    .bind(org)
    .bind(id)
    .fetch_all(&store.pool)
    .await?;
    rows.into_iter().map(AttemptRow::into_attempt).collect()
}

// --- changing state ---

/// A cancel (of a pending or executing command): a pending one at once, an executing one by
/// flagging it.
pub(super) const CANCEL: &str = "status = CASE WHEN status = 'pending' THEN 'cancelled' \
     ELSE status END, \
     finished_at = CASE WHEN status = 'pending' THEN keel_now() ELSE finished_at END, \
     cancel_requested = CASE WHEN status = 'executing' THEN true ELSE cancel_requested END, \
     updated_at = keel_now()";

/// A requeue (of a dead or failed command): pending, due now, its attempts reset.
pub(super) const REQUEUE: &str = "status = 'pending', attempts = 0, dead_reason = NULL, \
     run_at = keel_now(), scheduled = 0, finished_at = NULL, cancel_requested = false, \
     updated_at = keel_now()";

/// Cancels one command that is not a broadcast parent: a pending one at once, an executing one
/// by flagging it. `InvalidState` for a finished one.
pub(super) async fn cancel_one(
    conn: &mut PgConnection,
    org: OrgId,
    id: CommandId,
) -> StoreResult<CommandRow> {
    change_status(conn, org, id, CANCEL, "'pending', 'executing'", "cancelled").await
}

/// Puts a dead or failed command back to pending, due now, with its attempts reset (its
/// attempt history stays).
pub(super) async fn requeue_one(
    conn: &mut PgConnection,
    org: OrgId,
    id: CommandId,
) -> StoreResult<CommandRow> {
    change_status(conn, org, id, REQUEUE, "'dead', 'failed'", "requeued").await
}

/// Applies `set` (SQL assignments, constants of this module) if the status is one of `from` (a
/// SQL list of quoted statuses); otherwise `NotFound`, or `InvalidState` saying it cannot be
/// `verb`.
async fn change_status(
    conn: &mut PgConnection,
    org: OrgId,
    id: CommandId,
    set: &str,
    from: &str,
    verb: &str,
) -> StoreResult<CommandRow> {
    let row: Option<CommandRow> = sqlx::query_as(&format!(
        "UPDATE commands SET {set} \
         WHERE org_id = $1 AND id = $2 AND status IN ({from}) \
         RETURNING {COMMAND_COLUMNS}"
    ))
    .bind(org)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    match row {
        Some(row) => Ok(row),
        None => match status_of(conn, org, id).await? {
            Some(status) => Err(StoreError::InvalidState(format!(
                "it is {status}: it cannot be {verb}"
            ))),
            None => Err(StoreError::NotFound),
        },
    }
}

async fn status_of(
    conn: &mut PgConnection,
    org: OrgId,
    id: CommandId,
) -> StoreResult<Option<String>> {
    Ok(
        sqlx::query_scalar("SELECT status FROM commands WHERE org_id = $1 AND id = $2")
            .bind(org)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?,
    )
}

/// After a fenced statement changed nothing: `NotFound` if the command is not in `org`,
/// `StaleClaim` otherwise.
pub(super) async fn stale_or_missing(pool: &PgPool, org: OrgId, id: CommandId) -> StoreError {
    let mut conn = match pool.acquire().await {
        Ok(conn) => conn,
        Err(err) => return err.into(),
    };
    match status_of(&mut conn, org, id).await {
        Ok(Some(_)) => StoreError::StaleClaim,
        Ok(None) => StoreError::NotFound,
        Err(err) => err,
    }
}

pub(super) async fn cancel_command(
    store: &PgStore,
    org: OrgId,
    id: CommandId,
) -> StoreResult<Command> {
    let mut tx = store.pool.begin().await?;
    let row = async {
        if broadcasts::role(&mut tx, org, id).await? == Role::Parent {
            broadcasts::cancel(&mut tx, org, id).await
        } else {
            cancel_one(&mut tx, org, id).await
        }
    }
    .await;
    settle(tx, row).await?.into_command()
}

pub(super) async fn requeue(store: &PgStore, org: OrgId, id: CommandId) -> StoreResult<Command> {
    let mut tx = store.pool.begin().await?;
    let row = async {
        match broadcasts::role(&mut tx, org, id).await? {
            Role::Parent => {
                broadcasts::refuse_while_cancelling(&mut tx, id).await?;
                broadcasts::requeue(&mut tx, org, id).await
            }
            Role::Child(parent) => {
                broadcasts::refuse_while_cancelling(&mut tx, parent).await?;
                let row = requeue_one(&mut tx, org, id).await?;
                broadcasts::hold_beyond_concurrency(&mut tx, parent).await?;
                Ok(row)
            }
            Role::Plain => requeue_one(&mut tx, org, id).await,
        }
    }
    .await;
    settle(tx, row).await?.into_command()
}

// --- the lease engine ---

/// The sources of an agent's claim: its own commands, then each queue's (`$3…`, those not
/// paused). For each, one `SELECT id, priority, run_at` in claim order on its claim index, and
/// one of the scheduled commands that fell due (at most [`DUE_BATCH`], on the scheduled index).
/// Returns `(every arm, the arms of the scheduled ones)`, each joined with `UNION ALL`.
/// Parameters: `$1` organisation, `$2` agent.
fn claim_sources(queues: usize) -> (String, String) {
    let ready = |source: &str| {
        format!(
            "(SELECT id, priority, run_at FROM commands WHERE {source} \
             AND status = 'pending' AND scheduled = 0 ORDER BY {CLAIM_ORDER})"
        )
    };
    let due = |source: &str| {
        format!(
            "(SELECT id, priority, run_at FROM (SELECT id, priority, run_at FROM commands \
             WHERE {source} AND status = 'pending' AND scheduled = 1 AND run_at <= keel_now() \
             ORDER BY run_at LIMIT {DUE_BATCH}) AS due ORDER BY {CLAIM_ORDER})"
        )
    };
    let mut sources = vec!["org_id = $1 AND target_agent_id = $2".to_owned()];
    for n in 0..queues {
        let q = n + 3;
        sources.push(format!(
            "org_id = $1 AND queue = ${q} AND target_agent_id IS NULL \
             AND NOT EXISTS (SELECT 1 FROM paused_queues WHERE org_id = $1 AND queue = ${q})"
        ));
    }
    let all: Vec<String> = sources
        .iter()
        .flat_map(|source| [ready(source), due(source)])
        .collect();
    let scheduled: Vec<String> = sources.iter().map(|source| due(source)).collect();
    (all.join(" UNION ALL "), scheduled.join(" UNION ALL "))
}

/// The claim: the first `limit` claimable commands of the sources in claim order that no other
/// claim holds (`FOR UPDATE SKIP LOCKED` on the rows as the sources name them, so that the
/// lock reads only as far as it takes), unless the agent is cordoned; each leased to the agent
/// with a new token and one more attempt, which runs on the command's row (its record is
/// written when it ends). The scheduled commands that
/// fell due and were not taken become claimable (into the claim indexes), so that the next
/// claims read them there.
///
/// The limit is written into the statement (a number from 1 to [`MAX_CLAIM_BATCH`], so at most
/// that many statements per queue count): with a `LIMIT` parameter the planner prices the
/// generic plan as if most of the backlog were read, and plans each claim anew, which took
/// longer than running it.
fn claim_sql(queues: usize, limit: u32) -> String {
    let (sources, scheduled) = claim_sources(queues);
    format!(
        "WITH picked AS ( \
           SELECT c.id FROM ({sources} ORDER BY {CLAIM_ORDER}) AS cand \
           JOIN commands c ON c.id = cand.id \
           WHERE c.status = 'pending' AND c.scheduled <> 2 \
             AND EXISTS (SELECT 1 FROM agents WHERE org_id = $1 AND id = $2 \
                         AND cordoned_at IS NULL) \
           ORDER BY cand.priority DESC, cand.run_at, cand.id \
           LIMIT {limit} FOR UPDATE OF c SKIP LOCKED), \
         claimed AS ( \
           UPDATE commands SET status = 'executing', scheduled = 0, attempts = attempts + 1, \
             attempt_number = attempt_number + 1, \
             claim_token = replace(gen_random_uuid()::text, '-', ''), \
             lease_expires_at = keel_now() + lease_duration_ms * interval '1 millisecond', \
             claimed_by = $2, claimed_at = keel_now(), updated_at = keel_now() \
           FROM picked WHERE commands.id = picked.id AND commands.status = 'pending' \
           RETURNING commands.*), \
         promoted AS ( \
           UPDATE commands SET scheduled = 0 WHERE id IN ( \
             SELECT c.id FROM ({scheduled}) AS due JOIN commands c ON c.id = due.id \
             WHERE c.status = 'pending' AND c.scheduled = 1 \
               AND c.id NOT IN (SELECT id FROM picked) \
             FOR UPDATE OF c SKIP LOCKED)) \
         SELECT {COMMAND_COLUMNS} FROM claimed"
    )
}

/// Whether the agent exists and is cordoned, and the organisation's paused queues among
/// `$3`; no row: no such agent.
const GATE_SQL: &str = "SELECT cordoned_at IS NOT NULL, ARRAY(SELECT queue FROM paused_queues \
     WHERE org_id = $1 AND queue = ANY($3)) FROM agents WHERE org_id = $1 AND id = $2";

/// The asked queues, each once.
fn unique_queues(queues: &[String]) -> Vec<String> {
    let mut unique = queues.to_vec();
    unique.sort();
    unique.dedup();
    unique
}

pub(super) async fn claim(
    store: &PgStore,
    org: OrgId,
    agent: AgentId,
    queues: &[String],
    limit: u32,
) -> StoreResult<Vec<Claimed>> {
    fail::fail_point!("store.claim", |_| Err(StoreError::injected("store.claim")));
    let limit = limit.clamp(1, MAX_CLAIM_BATCH);
    // A queue named twice would hand its commands to two arms of the claim.
    let queues = unique_queues(queues);
    let sql = claim_sql(queues.len(), limit);
    let mut query = sqlx::query_as::<Postgres, CommandRow>(&sql)
        .bind(org)
        .bind(agent);
    for queue in &queues {
        query = query.bind(queue);
    }
    let rows = super::fetch_all_or_crash(&store.pool, Step::Claim, query)
        .await
        .map_err(|err| {
            let err = StoreError::from(err);
            if err.is_foreign_key_violation() {
                StoreError::UnknownAgent
            } else {
                err
            }
        })?;
    if rows.is_empty() {
        // Nothing: tell an unknown agent apart.
        let known: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM agents WHERE org_id = $1 AND id = $2)",
        )
        .bind(org)
        .bind(agent)
        .fetch_one(&store.pool)
        .await?;
        if !known {
            return Err(StoreError::UnknownAgent);
        }
        return Ok(Vec::new());
    }
    let mut claimed = rows
        .into_iter()
        .map(CommandRow::into_claimed)
        .collect::<StoreResult<Vec<_>>>()?;
    claimed.sort_by(|a, b| {
        b.command
            .priority
            .cmp(&a.command.priority)
            .then(a.command.run_at.cmp(&b.command.run_at))
            .then(a.command.id.cmp(&b.command.id))
    });
    Ok(claimed)
}

pub(super) async fn hand_back(
    store: &PgStore,
    org: OrgId,
    agent: AgentId,
    claims: Vec<(CommandId, ClaimToken)>,
) -> StoreResult<u64> {
    if claims.is_empty() {
        return Ok(0);
    }
    let (ids, tokens): (Vec<Uuid>, Vec<String>) = claims
        .into_iter()
        .map(|(id, token)| (id.0, token.0))
        .unzip();
    // Back to pending as before the claim (its attempt taken back), or cancelled (its attempt
    // ended so) when a cancel was requested meanwhile.
    let ended = ended_attempts("NULL::jsonb");
    let handed_back: i64 = sqlx::query_scalar(&format!(
        "WITH back AS ( \
           UPDATE commands c SET \
             status = CASE WHEN c.cancel_requested THEN 'cancelled' ELSE 'pending' END, \
             attempts = CASE WHEN c.cancel_requested THEN c.attempts ELSE c.attempts - 1 END, \
             attempt_number = CASE WHEN c.cancel_requested THEN c.attempt_number \
                              ELSE c.attempt_number - 1 END, \
             finished_at = CASE WHEN c.cancel_requested THEN keel_now() END, \
             attempt_outcome = CASE WHEN c.cancel_requested THEN 'cancelled' \
                               ELSE 'handed_back' END, \
             claim_token = NULL, lease_expires_at = NULL, updated_at = keel_now() \
           FROM UNNEST($3::uuid[], $4::text[]) AS h(id, token) \
           WHERE c.org_id = $1 AND c.id = h.id AND c.status = 'executing' \
             AND c.claim_token = h.token AND c.claimed_by = $2 \
           RETURNING c.*), \
         ended AS ({ended} FROM back WHERE status = 'cancelled') \
         SELECT COUNT(*) FROM back WHERE status = 'pending'",
    ))
    .bind(org)
    .bind(agent)
    .bind(ids)
    .bind(tokens)
    .fetch_one(&store.pool)
    .await?;
    Ok(u64::try_from(handed_back).unwrap_or(0))
}

/// The record of the attempts a statement ends, to be followed by `FROM <the changed
/// commands' rows>`: each row's running attempt, ended now with its `attempt_outcome` and the
/// error `error` (an SQL expression).
pub(super) fn ended_attempts(error: &str) -> String {
    format!(
        "INSERT INTO command_attempts \
         (command_id, attempt, agent_id, claimed_at, ended_at, outcome, error) \
         SELECT id, attempt_number, claimed_by, claimed_at, keel_now(), attempt_outcome, {error}"
    )
}

/// The fence of a report: the command of `org`, executing under `$3` for agent `$4`
/// (`$1` organisation, `$2` command).
const FENCE: &str = "org_id = $1 AND id = $2 AND status = 'executing' AND claim_token = $3 \
     AND claimed_by = $4";

pub(super) async fn heartbeat(
    store: &PgStore,
    org: OrgId,
    agent: AgentId,
    id: CommandId,
    token: &ClaimToken,
    progress: Option<Value>,
) -> StoreResult<Lease> {
    fail::fail_point!("store.heartbeat", |_| Err(StoreError::injected(
        "store.heartbeat"
    )));
    let row: Option<(OffsetDateTime, bool)> = sqlx::query_as(&format!(
        "UPDATE commands SET \
           lease_expires_at = keel_now() + lease_duration_ms * interval '1 millisecond', \
           progress = COALESCE($5, progress), updated_at = keel_now() \
         WHERE {FENCE} RETURNING lease_expires_at, cancel_requested"
    ))
    .bind(org)
    .bind(id)
    .bind(token.as_str())
    .bind(agent)
    .bind(progress.map(Json))
    .fetch_optional(&store.pool)
    .await?;
    match row {
        Some((expires_at, cancel_requested)) => Ok(Lease {
            expires_at,
            cancel_requested,
        }),
        None => Err(stale_or_missing(&store.pool, org, id).await),
    }
}

pub(super) async fn complete(
    store: &PgStore,
    org: OrgId,
    agent: AgentId,
    id: CommandId,
    token: &ClaimToken,
    result: Value,
) -> StoreResult<Command> {
    fail::fail_point!("store.complete", |_| Err(StoreError::injected(
        "store.complete"
    )));
    let reports = vec![(id, token.clone(), result)];
    let answers = store
        .reports
        .write(Reports {
            org,
            agent,
            reports,
        })
        .await?;
    answers
        .into_iter()
        .next()
        .unwrap_or_else(|| Err(corrupt("no answer to a report")))
}

/// Completes every report the agent holds in one statement, written directly (it is a group
/// already); each report is fenced alone (a stale one is its own `StaleClaim`, or `NotFound`),
/// and a command reported twice completes once.
pub(super) async fn complete_batch(
    store: &PgStore,
    org: OrgId,
    agent: AgentId,
    reports: Vec<(CommandId, ClaimToken, Value)>,
) -> StoreResult<Vec<StoreResult<Command>>> {
    fail::fail_point!("store.complete", |_| Err(StoreError::injected(
        "store.complete"
    )));
    if reports.len() > MAX_CLAIM_BATCH as usize {
        return Err(StoreError::InvalidInput(format!(
            "at most {MAX_CLAIM_BATCH} reports at once"
        )));
    }
    report_groups::complete_alone(
        &store.pool,
        Reports {
            org,
            agent,
            reports,
        },
    )
    .await
}

pub(super) async fn fail(
    store: &PgStore,
    org: OrgId,
    agent: AgentId,
    id: CommandId,
    token: &ClaimToken,
    error: Value,
    retryable: bool,
) -> StoreResult<Command> {
    // The backoff depends on the attempts so far, which the statement reads: one delay (µs)
    // per count, the last one for every count beyond (the backoff stops growing there).
    let delays: Vec<i64> = {
        let mut rng = rand::rng();
        (1..=BACKOFF_STEPS)
            .map(|attempts| {
                i64::try_from(retry_backoff(attempts, &mut rng).as_micros()).unwrap_or(i64::MAX)
            })
            .collect()
    };
    let retry = "NOT cancel_requested AND $5 AND attempts < max_attempts";
    let ended = ended_attempts("$7::jsonb");
    let row: Option<CommandRow> = sqlx::query_as(&format!(
        "WITH failed AS ( \
           UPDATE commands SET \
             status = CASE WHEN cancel_requested THEN 'cancelled' \
                           WHEN {retry} THEN 'pending' ELSE 'failed' END, \
             run_at = CASE WHEN {retry} THEN keel_now() + ($6::int8[])[LEAST(GREATEST(attempts, \
                           1), {BACKOFF_STEPS})] * interval '1 microsecond' ELSE run_at END, \
             finished_at = CASE WHEN {retry} THEN NULL ELSE keel_now() END, \
             scheduled = CASE WHEN {retry} THEN 1 ELSE 0 END, \
             attempt_outcome = CASE WHEN cancel_requested THEN 'cancelled' \
                           WHEN {retry} THEN 'retry' ELSE 'failed' END, \
             error = $7, claim_token = NULL, lease_expires_at = NULL, updated_at = keel_now() \
           WHERE {FENCE} RETURNING *), \
         ended AS ({ended} FROM failed) \
         SELECT {COMMAND_COLUMNS} FROM failed"
    ))
    .bind(org)
    .bind(id)
    .bind(token.as_str())
    .bind(agent)
    .bind(retryable)
    .bind(delays)
    .bind(Json(error))
    .fetch_optional(&store.pool)
    .await?;
    match row {
        Some(row) => row.into_command(),
        None => Err(stale_or_missing(&store.pool, org, id).await),
    }
}

pub(super) async fn release_expired_leases(
    store: &PgStore,
    org: Option<OrgId>,
    limit: u32,
) -> StoreResult<Vec<Released>> {
    let limit = limit.max(1);
    let ended = ended_attempts("NULL::jsonb");
    let sql = format!(
        "WITH expired AS ( \
           SELECT id FROM commands \
           WHERE status = 'executing' AND lease_expires_at < keel_now() \
             AND ($1::uuid IS NULL OR org_id = $1) \
           ORDER BY lease_expires_at LIMIT $2 FOR UPDATE SKIP LOCKED), \
         released AS ( \
           UPDATE commands c SET \
             status = CASE WHEN c.cancel_requested THEN 'cancelled' \
                           WHEN c.attempts < c.max_attempts THEN 'pending' ELSE 'dead' END, \
             dead_reason = CASE WHEN NOT c.cancel_requested AND c.attempts >= c.max_attempts \
                           THEN 'lease_expired' END, \
             run_at = CASE WHEN NOT c.cancel_requested AND c.attempts < c.max_attempts \
                           THEN keel_now() ELSE c.run_at END, \
             finished_at = CASE WHEN NOT c.cancel_requested AND c.attempts < c.max_attempts \
                           THEN NULL ELSE keel_now() END, \
             scheduled = 0, \
             attempt_outcome = CASE WHEN c.cancel_requested THEN 'cancelled' \
                           ELSE 'lease_expired' END, \
             claim_token = NULL, lease_expires_at = NULL, updated_at = keel_now() \
           FROM expired WHERE c.id = expired.id AND c.status = 'executing' \
           RETURNING c.*), \
         ended AS ({ended} FROM released) \
         SELECT id, org_id, attempts, status FROM released",
    );
    let release = sqlx::query_as::<_, (CommandId, OrgId, i32, String)>(&sql)
        .bind(org)
        .bind(i64::from(limit));
    let rows = super::fetch_all_or_crash(&store.pool, Step::Release, release).await?;
    let mut released = rows
        .into_iter()
        .map(|(command_id, org_id, attempts, status)| {
            let outcome = match parse_status(&status)? {
                CommandStatus::Pending => ReleaseOutcome::Requeued,
                CommandStatus::Cancelled => ReleaseOutcome::Cancelled,
                _ => ReleaseOutcome::Dead,
            };
            Ok(Released {
                command_id,
                org_id,
                attempts: to_u32(i64::from(attempts))?,
                outcome,
            })
        })
        .collect::<StoreResult<Vec<_>>>()?;
    released.sort_by_key(|r| r.command_id);
    Ok(released)
}

pub(super) async fn purge_finished(
    store: &PgStore,
    before: OffsetDateTime,
    limit: u32,
) -> StoreResult<u64> {
    // A broadcast's finished children stay while it runs: its end and its summary read them.
    let armed = crash::armed(Step::Purge);
    let mut tx = match armed {
        true => Some(store.pool.begin().await?),
        false => None,
    };
    let done = sqlx::query(
        "DELETE FROM commands WHERE id IN ( \
           SELECT id FROM commands \
           WHERE status IN ('completed', 'failed', 'cancelled', 'dead') AND finished_at < $1 \
             AND (parent_id IS NULL OR NOT EXISTS (SELECT 1 FROM commands AS parent \
                  WHERE parent.id = commands.parent_id AND parent.status = 'pending')) \
           ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED)",
    )
    .bind(before)
    .bind(i64::from(limit.max(1)));
    let purged = match tx.as_mut() {
        Some(tx) => done.execute(&mut **tx).await?,
        None => done.execute(&store.pool).await?,
    }
    .rows_affected();
    if let Some(tx) = tx {
        // `store.crash` names this step: the points come either side of the commit.
        crash::point_if(Step::Purge, Phase::Before, purged > 0);
        tx.commit().await?;
        crash::point_if(Step::Purge, Phase::After, purged > 0);
    }
    Ok(purged)
}

pub(super) async fn next_due_at(
    store: &PgStore,
    org: OrgId,
    agent: AgentId,
    queues: &[String],
) -> StoreResult<Option<OffsetDateTime>> {
    let queues = unique_queues(queues);
    let gate: Option<(bool, Vec<String>)> = sqlx::query_as(GATE_SQL)
        .bind(org)
        .bind(agent)
        .bind(&queues)
        .fetch_optional(&store.pool)
        .await?;
    let open: Vec<String> = match gate {
        None => return Err(StoreError::UnknownAgent),
        // Nothing until it is uncordoned, which wakes its claims.
        Some((true, _)) => return Ok(None),
        Some((false, paused)) => queues.into_iter().filter(|q| !paused.contains(q)).collect(),
    };
    // Now when something is claimable, else the earliest due time of the scheduled ones, each
    // source read on its index.
    let source = |n: Option<usize>| match n {
        None => "org_id = $1 AND target_agent_id = $2".to_owned(),
        Some(q) => format!(
            "org_id = $1 AND queue = ${} AND target_agent_id IS NULL",
            q + 3
        ),
    };
    let sources: Vec<String> = std::iter::once(None)
        .chain((0..open.len()).map(Some))
        .map(source)
        .collect();
    let claimable = sources
        .iter()
        .map(|s| {
            format!("SELECT 1 FROM commands WHERE {s} AND status = 'pending' AND scheduled = 0")
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let scheduled = sources
        .iter()
        .map(|s| {
            format!(
                "(SELECT run_at FROM commands WHERE {s} AND status = 'pending' \
                 AND scheduled = 1 ORDER BY run_at LIMIT 1)"
            )
        })
        .collect::<Vec<_>>()
        .join(" UNION ALL ");
    let sql = format!(
        "SELECT CASE WHEN EXISTS ({claimable}) THEN keel_now() \
         ELSE (SELECT MIN(run_at) FROM ({scheduled}) AS due) END"
    );
    let mut query = sqlx::query_scalar::<Postgres, Option<OffsetDateTime>>(&sql)
        .bind(org)
        .bind(agent);
    for queue in &open {
        query = query.bind(queue);
    }
    Ok(query.fetch_one(&store.pool).await?)
}
