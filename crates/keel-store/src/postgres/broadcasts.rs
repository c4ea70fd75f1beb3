//! Broadcasts: a parent command with one child per agent (see the commands migration for the
//! triggers that hand slots on and end the parent).
//!
//! Locks are taken children first, parent second, as a finishing child's trigger takes them:
//! concurrent reports, releases and cancels of one broadcast wait for each other, never
//! deadlock.

use sqlx::PgConnection;
use sqlx::types::Json;
use time::OffsetDateTime;

use super::PgStore;
use super::commands::{CANCEL, COMMAND_COLUMNS, CommandRow, NewRow, REQUEUE, insert_rows, settle};
use crate::common::{broadcast_of_fire, check_broadcast, validate_new_command};
use crate::error::{StoreError, StoreResult};
use crate::labels::Labels;
use crate::model::{
    AgentId, Broadcast, Command, CommandId, Created, Idempotency, NewBroadcast, OrgId, Target,
};
use crate::schedule::BroadcastFire;

pub(super) async fn create(
    store: &PgStore,
    org: OrgId,
    new: NewBroadcast,
    idempotency: Option<Idempotency>,
) -> StoreResult<Created> {
    validate_new_command(&new.command)?;
    check_broadcast(&new)?;
    let mut tx = store.pool.begin().await?;
    let created = insert(&mut tx, org, new, idempotency).await;
    settle(tx, created).await
}

/// Inserts the parent, then its children (in the caller's transaction); a replayed parent
/// creates none.
pub(super) async fn insert(
    conn: &mut PgConnection,
    org: OrgId,
    new: NewBroadcast,
    idempotency: Option<Idempotency>,
) -> StoreResult<Created> {
    let NewBroadcast {
        command,
        online_only,
        max_concurrency,
        agents,
    } = new;
    let children: Vec<AgentId> = agents.clone();
    let parent = NewRow {
        command: command.clone(),
        idempotency,
        parent: None,
        held: true,
        broadcast: Some(Broadcast {
            online_only,
            max_concurrency,
            agents,
        }),
    };
    let parent = insert_rows(conn, org, vec![parent])
        .await?
        .into_iter()
        .next()
        .ok_or_else(|| crate::common::corrupt("no broadcast created"))?;
    if !parent.created {
        return Ok(parent);
    }
    let window = max_concurrency.map_or(usize::MAX, |n| n as usize);
    let rows = children
        .into_iter()
        .enumerate()
        .map(|(n, agent)| {
            let mut child = command.clone();
            child.target = Target::Agent(agent);
            NewRow {
                command: child,
                idempotency: None,
                parent: Some(parent.command.id),
                held: n >= window,
                broadcast: None,
            }
        })
        .collect();
    insert_rows(conn, org, rows).await?;
    Ok(parent)
}

/// Resolves a scheduled broadcast's selector on the organisation's agents as they are now (in
/// the caller's transaction), by name.
pub(super) async fn resolve_fire(
    conn: &mut PgConnection,
    org: OrgId,
    fire: BroadcastFire,
    now: OffsetDateTime,
) -> StoreResult<NewBroadcast> {
    // The assigned labels win on a key both have (`||` keeps the right one).
    let agents: Vec<(AgentId, Json<Labels>, Option<OffsetDateTime>)> = sqlx::query_as(
        "SELECT id, labels || assigned_labels, last_seen_at FROM agents WHERE org_id = $1 \
         ORDER BY name",
    )
    .bind(org)
    .fetch_all(&mut *conn)
    .await?;
    broadcast_of_fire(
        fire,
        agents
            .into_iter()
            .map(|(id, labels, seen)| (id, labels.0, seen)),
        now,
    )
}

pub(super) async fn list_children(
    store: &PgStore,
    org: OrgId,
    parent: CommandId,
) -> StoreResult<Vec<Command>> {
    let rows: Vec<CommandRow> = sqlx::query_as(&format!(
        "SELECT {COMMAND_COLUMNS} FROM commands WHERE parent_id = $1 AND org_id = $2 ORDER BY id"
    ))
    .bind(parent)
    .bind(org)
    .fetch_all(&store.pool)
    .await?;
    rows.into_iter().map(CommandRow::into_command).collect()
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

/// Reads the role of a command.
pub(super) async fn role(conn: &mut PgConnection, org: OrgId, id: CommandId) -> StoreResult<Role> {
    let row: Option<(bool, Option<CommandId>)> = sqlx::query_as(
        "SELECT selector IS NOT NULL, parent_id FROM commands WHERE org_id = $1 AND id = $2",
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

/// Locks the parent's unfinished children, in id order.
async fn lock_children(
    conn: &mut PgConnection,
    parent: CommandId,
    statuses: &str,
) -> StoreResult<Vec<uuid::Uuid>> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT id FROM commands WHERE parent_id = $1 AND status IN ({statuses}) \
         ORDER BY id FOR UPDATE"
    ))
    .bind(parent)
    .fetch_all(&mut *conn)
    .await?)
}

async fn parent_row(
    conn: &mut PgConnection,
    org: OrgId,
    parent: CommandId,
) -> StoreResult<CommandRow> {
    Ok(sqlx::query_as(&format!(
        "SELECT {COMMAND_COLUMNS} FROM commands WHERE org_id = $1 AND id = $2"
    ))
    .bind(org)
    .bind(parent)
    .fetch_one(&mut *conn)
    .await?)
}

/// Cancels a broadcast parent (in the caller's transaction): the parent notes the cancel, its
/// pending children are cancelled and its executing ones asked to stop; the children's trigger
/// ends the parent with the last of them.
pub(super) async fn cancel(
    conn: &mut PgConnection,
    org: OrgId,
    parent: CommandId,
) -> StoreResult<CommandRow> {
    let children = lock_children(conn, parent, "'pending', 'executing'").await?;
    let noted = sqlx::query(
        "UPDATE commands SET cancel_requested = true, updated_at = keel_now() \
         WHERE org_id = $1 AND id = $2 AND status = 'pending'",
    )
    .bind(org)
    .bind(parent)
    .execute(&mut *conn)
    .await?;
    if noted.rows_affected() == 0 {
        return Err(StoreError::InvalidState(
            "the broadcast has finished".to_owned(),
        ));
    }
    if !children.is_empty() {
        sqlx::query(&format!(
            "UPDATE commands SET {CANCEL} WHERE id = ANY($1) AND status IN ('pending', 'executing')"
        ))
        .bind(&children)
        .execute(&mut *conn)
        .await?;
    }
    parent_row(conn, org, parent).await
}

/// A requeue is refused while the broadcast is being cancelled (its cancel waits for executing
/// children): the requeued children would run, or be held for good, against the cancel.
pub(super) async fn refuse_while_cancelling(
    conn: &mut PgConnection,
    parent: CommandId,
) -> StoreResult<()> {
    let cancelling: Option<bool> = sqlx::query_scalar(
        "SELECT status = 'pending' AND cancel_requested FROM commands WHERE id = $1",
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

/// Requeues a broadcast parent's failed and dead children (in the caller's transaction): each
/// goes back to pending with its attempts reset, which reopens the parent; with
/// `max_concurrency`, those beyond the free places are held. `InvalidState` when there is none.
pub(super) async fn requeue(
    conn: &mut PgConnection,
    org: OrgId,
    parent: CommandId,
) -> StoreResult<CommandRow> {
    let children = lock_children(conn, parent, "'failed', 'dead'").await?;
    if children.is_empty() {
        return Err(StoreError::InvalidState(
            "the broadcast has no failed or dead child to requeue".to_owned(),
        ));
    }
    sqlx::query(&format!(
        "UPDATE commands SET {REQUEUE} WHERE id = ANY($1) AND status IN ('failed', 'dead')"
    ))
    .bind(&children)
    .execute(&mut *conn)
    .await?;
    hold_beyond_concurrency(conn, parent).await?;
    parent_row(conn, org, parent).await
}

/// After children were requeued: with `max_concurrency` n, holds the released, unclaimed
/// children beyond n (the last ones first), so the broadcast keeps to its limit.
pub(super) async fn hold_beyond_concurrency(
    conn: &mut PgConnection,
    parent: CommandId,
) -> StoreResult<()> {
    sqlx::query(
        "UPDATE commands SET scheduled = 2 WHERE id IN ( \
           SELECT id FROM commands \
           WHERE parent_id = $1 AND status = 'pending' AND scheduled <> 2 \
           ORDER BY id DESC \
           LIMIT GREATEST(0, \
             (SELECT COUNT(*) FROM commands \
              WHERE parent_id = $1 AND status IN ('pending', 'executing') AND scheduled <> 2) \
             - COALESCE((SELECT max_concurrency FROM commands WHERE id = $1), 1000000000)))",
    )
    .bind(parent)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
