//! Fleet operations on SQLite: agent labels and cordons, paused queues, and broadcasts (a
//! parent command with one child per agent; see the fleet migration for how they are kept).

use sqlx::types::Json;
use sqlx::{Sqlite, SqliteConnection};

use super::rows::{AgentRow, CommandRow, PausedQueueRow};
use super::writer::Lane;
use super::{AGENT_COLUMNS, COMMAND_COLUMNS, COMMANDS, Placement, SqliteStore, insert_command};
use crate::common::{broadcast_of_fire, check_broadcast};
use crate::error::{StoreError, StoreResult};
use crate::labels::{Labels, check_labels};
use crate::model::{
    Agent, AgentId, Broadcast, Command, CommandId, Created, Idempotency, NewBroadcast, OrgId,
    PausedQueue, Target,
};
use crate::schedule::BroadcastFire;
use crate::store::check_queue_name;
use time::OffsetDateTime;

/// Whether the agent is cordoned, and the organisation's paused queues (a JSON array): the
/// agent's primary key and the first rows of `paused_queues`' key. No row: no such agent.
pub(super) const CLAIM_GATE_SQL: &str = "SELECT cordoned_at IS NOT NULL, \
       (SELECT json_group_array(queue) FROM paused_queues WHERE org_id = ?1) \
     FROM agents WHERE org_id = ?1 AND id = ?2";

/// A parent's children in creation order, on `commands_children`; the sort is of at most
/// `MAX_BATCH_CREATE` rows, the most one broadcast has.
pub(super) fn children_sql() -> String {
    format!(
        "SELECT {COMMAND_COLUMNS} FROM commands INDEXED BY commands_children \
         WHERE parent_id = ? AND org_id = ? ORDER BY id"
    )
}

/// What a claim of one agent may take.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Gate {
    /// The agent is not in the organisation.
    UnknownAgent,
    /// The agent is cordoned: nothing.
    Cordoned,
    /// Its own commands, and those of these queues (the asked ones that are not paused).
    Open(Vec<String>),
}

/// Reads the claim gate of `agent` asking for `queues`, in one statement on `executor`.
pub(super) async fn claim_gate<'e, E>(
    executor: E,
    org: OrgId,
    agent: AgentId,
    queues: &[String],
) -> StoreResult<Gate>
where
    E: sqlx::Executor<'e, Database = Sqlite>,
{
    let row: Option<(bool, Json<Vec<String>>)> = sqlx::query_as(CLAIM_GATE_SQL)
        .bind(org)
        .bind(agent)
        .fetch_optional(executor)
        .await?;
    Ok(match row {
        None => Gate::UnknownAgent,
        Some((true, _)) => Gate::Cordoned,
        Some((false, Json(paused))) => Gate::Open(
            queues
                .iter()
                .filter(|queue| !paused.contains(queue))
                .cloned()
                .collect(),
        ),
    })
}

/// Updates one agent of the organisation with `set` (a `SET` clause whose `?1` is `value`).
async fn update_agent<V>(
    store: &SqliteStore,
    org: OrgId,
    agent: AgentId,
    set: &'static str,
    value: V,
) -> StoreResult<Agent>
where
    V: for<'q> sqlx::Encode<'q, Sqlite> + sqlx::Type<Sqlite> + Send + 'static,
{
    store
        .write_one(Lane::Bulk, move |conn| {
            Box::pin(async move {
                let row: Option<AgentRow> = sqlx::query_as(&format!(
                    "UPDATE agents SET {set} WHERE org_id = ?2 AND id = ?3 \
                     RETURNING {AGENT_COLUMNS}"
                ))
                .bind(value)
                .bind(org)
                .bind(agent)
                .fetch_optional(&mut *conn)
                .await?;
                row.ok_or(StoreError::NotFound)?.into_agent()
            })
        })
        .await
}

pub(super) async fn set_agent_labels(
    store: &SqliteStore,
    org: OrgId,
    agent: AgentId,
    labels: Labels,
) -> StoreResult<Agent> {
    check_labels(&labels).map_err(StoreError::InvalidInput)?;
    update_agent(store, org, agent, "assigned_labels = ?1", Json(labels)).await
}

pub(super) async fn set_agent_cordoned(
    store: &SqliteStore,
    org: OrgId,
    agent: AgentId,
    cordoned: bool,
) -> StoreResult<Agent> {
    let (_, now_us) = store.now_and_micros();
    let since = cordoned.then_some(now_us);
    update_agent(
        store,
        org,
        agent,
        "cordoned_at = CASE WHEN ?1 IS NULL THEN NULL ELSE COALESCE(cordoned_at, ?1) END",
        since,
    )
    .await
}

pub(super) async fn pause_queue(
    store: &SqliteStore,
    org: OrgId,
    queue: &str,
) -> StoreResult<PausedQueue> {
    check_queue_name(queue).map_err(|rule| StoreError::InvalidInput(format!("queue: {rule}")))?;
    let queue = queue.to_owned();
    let (_, now_us) = store.now_and_micros();
    store
        .write_one(Lane::Bulk, move |conn| {
            Box::pin(async move {
                // `DO UPDATE` with no change, so that `RETURNING` gives the row either way.
                let row: PausedQueueRow = sqlx::query_as(
                    "INSERT INTO paused_queues (org_id, queue, paused_at) VALUES (?, ?, ?) \
                     ON CONFLICT (org_id, queue) DO UPDATE SET paused_at = paused_at \
                     RETURNING queue, paused_at",
                )
                .bind(org)
                .bind(queue)
                .bind(now_us)
                .fetch_one(&mut *conn)
                .await?;
                row.into_paused_queue()
            })
        })
        .await
}

pub(super) async fn resume_queue(
    store: &SqliteStore,
    org: OrgId,
    queue: &str,
) -> StoreResult<bool> {
    let queue = queue.to_owned();
    store
        .write_one(Lane::Bulk, move |conn| {
            Box::pin(async move {
                let done = sqlx::query("DELETE FROM paused_queues WHERE org_id = ? AND queue = ?")
                    .bind(org)
                    .bind(queue)
                    .execute(&mut *conn)
                    .await?;
                Ok(done.rows_affected() > 0)
            })
        })
        .await
}

pub(super) async fn list_paused_queues(
    store: &SqliteStore,
    org: OrgId,
) -> StoreResult<Vec<PausedQueue>> {
    let rows: Vec<PausedQueueRow> = sqlx::query_as(
        "SELECT queue, paused_at FROM paused_queues WHERE org_id = ? ORDER BY queue",
    )
    .bind(org)
    .fetch_all(&store.read)
    .await?;
    rows.into_iter()
        .map(PausedQueueRow::into_paused_queue)
        .collect()
}

pub(super) async fn count_cordoned_and_paused(store: &SqliteStore) -> StoreResult<(u64, u64)> {
    let (cordoned, paused): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM agents WHERE cordoned_at IS NOT NULL), \
                (SELECT COUNT(*) FROM paused_queues)",
    )
    .fetch_one(&store.read)
    .await?;
    Ok((
        u64::try_from(cordoned).unwrap_or_default(),
        u64::try_from(paused).unwrap_or_default(),
    ))
}

/// Resolves a scheduled broadcast's selector on the writer's connection, on the organisation's
/// agents as they are now (see [`broadcast_of_fire`]).
pub(super) async fn resolve_fire(
    conn: &mut SqliteConnection,
    org: OrgId,
    fire: BroadcastFire,
    now: OffsetDateTime,
) -> StoreResult<NewBroadcast> {
    let rows: Vec<AgentRow> = sqlx::query_as(&format!(
        "SELECT {AGENT_COLUMNS} FROM agents WHERE org_id = ? ORDER BY name"
    ))
    .bind(org)
    .fetch_all(&mut *conn)
    .await?;
    let agents = rows
        .into_iter()
        .map(|row| {
            let agent = row.into_agent()?;
            Ok((agent.id, agent.labels(), agent.last_seen_at))
        })
        .collect::<StoreResult<Vec<_>>>()?;
    broadcast_of_fire(fire, agents, now)
}

pub(super) async fn create_broadcast(
    store: &SqliteStore,
    org: OrgId,
    new: NewBroadcast,
    idempotency: Option<Idempotency>,
) -> StoreResult<Created> {
    super::validate_new_command(&new.command)?;
    check_broadcast(&new)?;
    let (_, now_us) = store.now_and_micros();
    crate::crash::around(
        crate::crash::Step::Create,
        store.write(Lane::Bulk, move |conn| {
            Box::pin(async move { insert_broadcast(conn, org, new, idempotency, now_us).await })
        }),
    )
    .await
}

/// Inserts the parent, then its children (on the writer's connection, in one savepoint).
pub(super) async fn insert_broadcast(
    conn: &mut SqliteConnection,
    org: OrgId,
    new: NewBroadcast,
    idempotency: Option<Idempotency>,
    now_us: i64,
) -> StoreResult<Created> {
    let NewBroadcast {
        command,
        online_only,
        max_concurrency,
        agents,
    } = new;
    let broadcast = Broadcast {
        online_only,
        max_concurrency,
        agents,
    };
    let parent = insert_command(
        conn,
        org,
        command.clone(),
        idempotency,
        now_us,
        Placement {
            parent: None,
            held: true,
            broadcast: Some(&broadcast),
        },
    )
    .await?;
    if !parent.created {
        return Ok(parent);
    }
    let window = max_concurrency.map_or(usize::MAX, |n| n as usize);
    for (n, agent) in broadcast.agents.iter().enumerate() {
        let mut child = command.clone();
        child.target = Target::Agent(*agent);
        insert_command(
            conn,
            org,
            child,
            None,
            now_us,
            Placement {
                parent: Some(parent.command.id),
                held: n >= window,
                broadcast: None,
            },
        )
        .await?;
    }
    Ok(parent)
}

pub(super) async fn list_children(
    store: &SqliteStore,
    org: OrgId,
    parent: CommandId,
) -> StoreResult<Vec<Command>> {
    let rows: Vec<CommandRow> = sqlx::query_as(&children_sql())
        .bind(parent)
        .bind(org)
        .fetch_all(&store.read)
        .await?;
    rows.into_iter()
        .map(|row| row.into_command().map(|(command, _)| command))
        .collect()
}

/// Cancels a broadcast parent (on the writer's connection): the parent notes the cancel, its
/// pending children are cancelled and its executing ones asked to stop; the children's trigger
/// ends the parent with the last of them.
pub(super) async fn cancel_broadcast(
    conn: &mut SqliteConnection,
    org: OrgId,
    parent: CommandId,
    now_us: i64,
) -> StoreResult<CommandRow> {
    let noted = sqlx::query(
        "UPDATE commands SET cancel_requested = 1, updated_at = ?1 \
         WHERE org_id = ?2 AND id = ?3 AND status = 'pending'",
    )
    .bind(now_us)
    .bind(org)
    .bind(parent)
    .execute(&mut *conn)
    .await?;
    if noted.rows_affected() == 0 {
        return Err(StoreError::InvalidState(
            "the broadcast has finished".to_owned(),
        ));
    }
    let children: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT id FROM commands INDEXED BY commands_children \
         WHERE parent_id = ? AND status IN ('pending', 'executing') ORDER BY id",
    )
    .bind(parent)
    .fetch_all(&mut *conn)
    .await?;
    for child in children {
        let _: CommandRow = COMMANDS.cancel(conn, org, child, now_us).await?;
    }
    let row: CommandRow = sqlx::query_as(&format!(
        "SELECT {COMMAND_COLUMNS} FROM commands WHERE org_id = ? AND id = ?"
    ))
    .bind(org)
    .bind(parent)
    .fetch_one(&mut *conn)
    .await?;
    Ok(row)
}

/// A command's place in a broadcast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Role {
    /// Not part of one (or no such command in the organisation).
    Plain,
    /// A broadcast parent.
    Parent,
    /// A child of this parent.
    Child(CommandId),
}

/// Reads the role of a command (on the writer's connection).
pub(super) async fn role(
    conn: &mut SqliteConnection,
    org: OrgId,
    id: CommandId,
) -> StoreResult<Role> {
    let row: Option<(bool, Option<CommandId>)> = sqlx::query_as(
        "SELECT selector IS NOT NULL, parent_id FROM commands WHERE org_id = ? AND id = ?",
    )
    .bind(org)
    .bind(id)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match row {
        Some((true, _)) => Role::Parent,
        Some((false, Some(parent))) => Role::Child(parent),
        _ => Role::Plain,
    })
}

/// A requeue is refused while the broadcast is being cancelled (its cancel waits for executing
/// children): the requeued children would run, or be held for good, against the cancel.
pub(super) async fn refuse_while_cancelling(
    conn: &mut SqliteConnection,
    parent: CommandId,
) -> StoreResult<()> {
    let cancelling: Option<bool> = sqlx::query_scalar(
        "SELECT status = 'pending' AND cancel_requested FROM commands WHERE id = ?",
    )
    .bind(parent)
    .fetch_optional(&mut *conn)
    .await?;
    if cancelling == Some(true) {
        return Err(StoreError::InvalidState(
            "the broadcast is being cancelled".to_owned(),
        ));
    }
    Ok(())
}

/// Requeues a broadcast parent's failed and dead children (on the writer's connection): each
/// goes back to pending with its attempts reset, which reopens the parent; with
/// `max_concurrency`, those beyond the free places are held. `InvalidState` when there is none.
pub(super) async fn requeue_broadcast(
    conn: &mut SqliteConnection,
    org: OrgId,
    parent: CommandId,
    now_us: i64,
) -> StoreResult<CommandRow> {
    let children: Vec<uuid::Uuid> = sqlx::query_scalar(
        "SELECT id FROM commands INDEXED BY commands_children \
         WHERE parent_id = ? AND status IN ('failed', 'dead') ORDER BY id",
    )
    .bind(parent)
    .fetch_all(&mut *conn)
    .await?;
    if children.is_empty() {
        return Err(StoreError::InvalidState(
            "the broadcast has no failed or dead child to requeue".to_owned(),
        ));
    }
    for child in children {
        let _: CommandRow = COMMANDS.requeue(conn, org, child, now_us).await?;
    }
    hold_beyond_concurrency(conn, parent).await?;
    let row: CommandRow = sqlx::query_as(&format!(
        "SELECT {COMMAND_COLUMNS} FROM commands WHERE org_id = ? AND id = ?"
    ))
    .bind(org)
    .bind(parent)
    .fetch_one(&mut *conn)
    .await?;
    Ok(row)
}

/// After children were requeued: with `max_concurrency` n, holds the released, unclaimed
/// children beyond n (the last ones first), so the broadcast keeps to its limit.
pub(super) async fn hold_beyond_concurrency(
    conn: &mut SqliteConnection,
    parent: CommandId,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE commands SET scheduled = 2 WHERE id IN ( \
           SELECT id FROM commands INDEXED BY commands_children \
           WHERE parent_id = ?1 AND status = 'pending' AND scheduled <> 2 \
           ORDER BY id DESC \
           LIMIT MAX(0, \
             (SELECT COUNT(*) FROM commands INDEXED BY commands_children \
              WHERE parent_id = ?1 AND status IN ('pending', 'executing') AND scheduled <> 2) \
             - COALESCE((SELECT max_concurrency FROM commands WHERE id = ?1), 1000000000)))",
    )
    .bind(parent)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
