//! Schedules on SQLite: the `schedules` table and the fire times they handled
//! (`schedule_fires`).

use serde_json::Value;
use sqlx::types::Json;
use time::OffsetDateTime;

use super::rows::{corrupt, from_micros, to_micros};
use super::writer::Lane;
use super::{Placement, SqliteStore, fleet, found, insert_command, page_of, validate_new_command};
use crate::error::{StoreError, StoreResult};
use crate::model::{CommandId, OrgId, ScheduleId, ScheduleState};
use crate::schedule::{
    AdvanceOutcome, FireTimes, NewSchedule, Schedule, ScheduleAdvance, ScheduleFire, SchedulePage,
};
use crate::store::MAX_PAGE_SIZE;

const COLUMNS: &str = "id, org_id, name, cron, timezone, command, missed, state, next_fire_at, \
     last_fire_at, created_at, updated_at";

/// An organisation's schedules after the cursor `?2` (none when NULL), oldest first, at most
/// `?3`.
const LIST_SQL: &str = "SELECT id, org_id, name, cron, timezone, command, missed, state, \
     next_fire_at, last_fire_at, created_at, updated_at FROM schedules INDEXED BY schedules_list \
     WHERE org_id = ?1 AND (?2 IS NULL OR id > ?2) ORDER BY id LIMIT ?3";

/// The latest `?3` fires of schedule `?1` before `?4` (all when NULL), newest first, if it is
/// one of organisation `?2`'s.
const FIRES_SQL: &str = "SELECT schedule_id, fire_at, fired_at, command_ids, error \
     FROM schedule_fires WHERE schedule_id = ?1 AND (?4 IS NULL OR fire_at < ?4) \
     AND EXISTS (SELECT 1 FROM schedules WHERE id = ?1 AND org_id = ?2) \
     ORDER BY fire_at DESC LIMIT ?3";

/// The schedules due at `?1`, earliest first, at most `?2`: read on the due index alone.
const DUE_SQL: &str = "SELECT id, org_id, name, cron, timezone, command, missed, state, \
     next_fire_at, last_fire_at, created_at, updated_at FROM schedules INDEXED BY schedules_due \
     WHERE state = 'active' AND next_fire_at IS NOT NULL AND next_fire_at <= ?1 \
     ORDER BY next_fire_at LIMIT ?2";

#[derive(sqlx::FromRow)]
struct ScheduleRow {
    id: ScheduleId,
    org_id: OrgId,
    name: Option<String>,
    cron: String,
    timezone: String,
    command: Json<Value>,
    missed: String,
    state: String,
    next_fire_at: Option<i64>,
    last_fire_at: Option<i64>,
    created_at: i64,
    updated_at: i64,
}

impl ScheduleRow {
    fn into_schedule(self) -> StoreResult<Schedule> {
        Ok(Schedule {
            id: self.id,
            org_id: self.org_id,
            name: self.name,
            cron: self.cron,
            timezone: self.timezone,
            command: self.command.0,
            missed: self.missed.parse().map_err(corrupt)?,
            state: self.state.parse().map_err(corrupt)?,
            next_fire_at: self.next_fire_at.map(from_micros).transpose()?,
            last_fire_at: self.last_fire_at.map(from_micros).transpose()?,
            created_at: from_micros(self.created_at)?,
            updated_at: from_micros(self.updated_at)?,
        })
    }
}

#[derive(sqlx::FromRow)]
struct FireRow {
    schedule_id: ScheduleId,
    fire_at: i64,
    fired_at: i64,
    command_ids: Json<Vec<CommandId>>,
    error: Option<String>,
}

impl FireRow {
    fn into_fire(self) -> StoreResult<ScheduleFire> {
        Ok(ScheduleFire {
            schedule_id: self.schedule_id,
            fire_at: from_micros(self.fire_at)?,
            fired_at: from_micros(self.fired_at)?,
            command_ids: self.command_ids.0,
            error: self.error,
        })
    }
}

pub(super) async fn create(
    store: &SqliteStore,
    org: OrgId,
    new: NewSchedule,
) -> StoreResult<Schedule> {
    let (now, now_us) = store.now_and_micros();
    let (_, next) = FireTimes::parse_firing(&new.cron, &new.timezone, now)
        .map_err(|err| StoreError::InvalidInput(err.to_string()))?;
    store
        .write_one(Lane::Bulk, move |conn| {
            Box::pin(async move {
                let row: ScheduleRow = sqlx::query_as(&format!(
                    "INSERT INTO schedules (id, org_id, name, cron, timezone, command, missed, \
                     state, next_fire_at, created_at, updated_at) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, 'active', ?, ?, ?) RETURNING {COLUMNS}"
                ))
                .bind(ScheduleId::new())
                .bind(org)
                .bind(&new.name)
                .bind(&new.cron)
                .bind(&new.timezone)
                .bind(Json(&new.command))
                .bind(new.missed.as_str())
                .bind(to_micros(next))
                .bind(now_us)
                .bind(now_us)
                .fetch_one(&mut *conn)
                .await
                .map_err(|err| super::missing_as(StoreError::from(err), StoreError::NotFound))?;
                row.into_schedule()
            })
        })
        .await
}

pub(super) async fn list(
    store: &SqliteStore,
    org: OrgId,
    cursor: Option<ScheduleId>,
    limit: u32,
) -> StoreResult<SchedulePage> {
    let limit = limit.clamp(1, MAX_PAGE_SIZE);
    let rows: Vec<ScheduleRow> = sqlx::query_as(LIST_SQL)
        .bind(org)
        .bind(cursor)
        // One more than asked, to know whether there is a next page.
        .bind(i64::from(limit) + 1)
        .fetch_all(store.pool())
        .await?;
    let items = rows
        .into_iter()
        .map(ScheduleRow::into_schedule)
        .collect::<StoreResult<Vec<_>>>()?;
    let (items, next_cursor) = page_of(items, limit, |s| s.id);
    Ok(SchedulePage { items, next_cursor })
}

pub(super) async fn get(
    store: &SqliteStore,
    org: OrgId,
    id: ScheduleId,
) -> StoreResult<Option<Schedule>> {
    let row: Option<ScheduleRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM schedules WHERE org_id = ? AND id = ?"
    ))
    .bind(org)
    .bind(id)
    .fetch_optional(store.pool())
    .await?;
    row.map(ScheduleRow::into_schedule).transpose()
}

pub(super) async fn set_state(
    store: &SqliteStore,
    org: OrgId,
    id: ScheduleId,
    state: ScheduleState,
) -> StoreResult<Schedule> {
    let (_, now_us) = store.now_and_micros();
    store
        .write_one(Lane::Bulk, move |conn| {
            Box::pin(async move {
                // The next fire time stays as it was: on resume, the fire times that passed
                // while paused are missed ones, and the schedule's policy decides.
                let row: Option<ScheduleRow> = sqlx::query_as(&format!(
                    "UPDATE schedules SET state = ?, updated_at = ? WHERE org_id = ? AND id = ? \
                     RETURNING {COLUMNS}"
                ))
                .bind(state.as_str())
                .bind(now_us)
                .bind(org)
                .bind(id)
                .fetch_optional(&mut *conn)
                .await?;
                row.ok_or(StoreError::NotFound)?.into_schedule()
            })
        })
        .await
}

pub(super) async fn delete(store: &SqliteStore, org: OrgId, id: ScheduleId) -> StoreResult<()> {
    store
        .write_one(Lane::Bulk, move |conn| {
            Box::pin(async move {
                // Its fire records go with it (`ON DELETE CASCADE`); its commands stay.
                let done = sqlx::query("DELETE FROM schedules WHERE org_id = ? AND id = ?")
                    .bind(org)
                    .bind(id)
                    .execute(&mut *conn)
                    .await?;
                found(done.rows_affected())
            })
        })
        .await
}

pub(super) async fn list_fires(
    store: &SqliteStore,
    org: OrgId,
    id: ScheduleId,
    before: Option<OffsetDateTime>,
    limit: u32,
) -> StoreResult<Vec<ScheduleFire>> {
    let limit = limit.clamp(1, MAX_PAGE_SIZE);
    // The organisation is checked on the schedule; the fires are read on their primary key,
    // newest first.
    let rows: Vec<FireRow> = sqlx::query_as(FIRES_SQL)
        .bind(id)
        .bind(org)
        .bind(i64::from(limit))
        .bind(before.map(to_micros))
        .fetch_all(store.pool())
        .await?;
    rows.into_iter().map(FireRow::into_fire).collect()
}

pub(super) async fn due(store: &SqliteStore, limit: u32) -> StoreResult<Vec<Schedule>> {
    let (_, now_us) = store.now_and_micros();
    let rows: Vec<ScheduleRow> = sqlx::query_as(DUE_SQL)
        .bind(now_us)
        .bind(i64::from(limit.clamp(1, MAX_PAGE_SIZE)))
        .fetch_all(store.pool())
        .await?;
    rows.into_iter().map(ScheduleRow::into_schedule).collect()
}

/// Why an advance wrote nothing (rolled back inside its savepoint).
const ALREADY_FIRED: &str = "fire time already recorded";

pub(super) async fn advance(
    store: &SqliteStore,
    step: ScheduleAdvance,
) -> StoreResult<AdvanceOutcome> {
    if let Some(fire) = &step.fire {
        for item in &fire.items {
            validate_new_command(&item.command)?;
        }
        if let Some(broadcast) = &fire.broadcast {
            validate_new_command(&broadcast.command)?;
        }
    }
    let (now, now_us) = store.now_and_micros();
    let outcome = store
        .write(Lane::Bulk, move |conn| {
            Box::pin(async move {
                let ScheduleAdvance {
                    org,
                    schedule,
                    due,
                    next,
                    fire,
                } = step;
                let fire_at = fire.as_ref().map(|f| to_micros(f.fire_at));
                // Only from the next fire time the scheduler read, on an active schedule:
                // another instance, a pause or a delete that came first leaves it alone.
                let moved = sqlx::query(
                    "UPDATE schedules SET next_fire_at = ?, \
                     last_fire_at = COALESCE(?, last_fire_at), updated_at = ? \
                     WHERE org_id = ? AND id = ? AND state = 'active' AND next_fire_at = ?",
                )
                .bind(next.map(to_micros))
                .bind(fire_at)
                .bind(now_us)
                .bind(org)
                .bind(schedule)
                .bind(to_micros(due))
                .execute(&mut *conn)
                .await?;
                if moved.rows_affected() == 0 {
                    return Ok(AdvanceOutcome::Stale);
                }
                let Some(fire) = fire else {
                    return Ok(AdvanceOutcome::Skipped);
                };
                let mut command_ids = Vec::with_capacity(fire.items.len());
                if let Some(broadcast) = fire.broadcast {
                    let new = fleet::resolve_fire(conn, org, broadcast, now).await?;
                    let created = fleet::insert_broadcast(conn, org, new, None, now_us).await?;
                    command_ids.push(created.command.id);
                }
                for item in fire.items {
                    let created = insert_command(
                        conn,
                        org,
                        item.command,
                        item.idempotency,
                        now_us,
                        Placement::default(),
                    )
                    .await?;
                    command_ids.push(created.command.id);
                }
                let recorded = sqlx::query(
                    "INSERT INTO schedule_fires (schedule_id, fire_at, fired_at, command_ids, \
                     error) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
                )
                .bind(schedule)
                .bind(to_micros(fire.fire_at))
                .bind(now_us)
                .bind(Json(&command_ids))
                .bind(&fire.error)
                .execute(&mut *conn)
                .await?;
                if recorded.rows_affected() == 0 {
                    // Undoes the schedule's move and the commands with the savepoint.
                    return Err(StoreError::Conflict(ALREADY_FIRED.to_owned()));
                }
                Ok(AdvanceOutcome::Fired(ScheduleFire {
                    schedule_id: schedule,
                    fire_at: fire.fire_at,
                    fired_at: now,
                    command_ids,
                    error: fire.error,
                }))
            })
        })
        .await;
    match outcome {
        Err(StoreError::Conflict(what)) if what == ALREADY_FIRED => Ok(AdvanceOutcome::Stale),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::{DUE_SQL, FIRES_SQL, LIST_SQL};

    /// The due read, the listing and the fires are each served by an index, in order, without a
    /// scan or a sort.
    #[tokio::test]
    async fn schedule_reads_use_their_indexes() {
        let dir = tempfile::tempdir().unwrap();
        let store = super::SqliteStore::open(
            dir.path().join("keel.db"),
            super::super::SqliteOptions::default(),
            std::sync::Arc::new(crate::SystemClock),
        )
        .await
        .unwrap();
        for (sql, index, parameters) in [
            (DUE_SQL, "schedules_due", 2),
            (LIST_SQL, "schedules_list", 3),
            (FIRES_SQL, "PRIMARY KEY", 4),
        ] {
            let explain = format!("EXPLAIN QUERY PLAN {sql}");
            let mut query = sqlx::query_as(&explain);
            for _ in 0..parameters {
                query = query.bind(0_i64);
            }
            let plan: Vec<(i64, i64, i64, String)> = query.fetch_all(store.pool()).await.unwrap();
            let details: Vec<&str> = plan.iter().map(|row| row.3.as_str()).collect();
            assert!(
                details
                    .iter()
                    .all(|d| !d.starts_with("SCAN") && !d.contains("TEMP B-TREE")),
                "{sql}: {details:?}"
            );
            assert!(
                details.iter().any(|d| d.contains(index)),
                "{sql}: {details:?}"
            );
        }
    }
}
