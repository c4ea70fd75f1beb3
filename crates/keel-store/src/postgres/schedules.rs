//! Schedules and the fire times they handled (`schedule_fires`).

use serde_json::Value;
use sqlx::types::Json;
use time::OffsetDateTime;

use super::PgStore;
use super::broadcasts;
use super::commands::{NewRow, insert_rows, settle};
use crate::common::{corrupt, found, missing_as, page_of, validate_new_command};
use crate::error::{StoreError, StoreResult};
use crate::model::{CommandId, OrgId, ScheduleId, ScheduleState};
use crate::schedule::{
    AdvanceOutcome, FireTimes, NewSchedule, Schedule, ScheduleAdvance, ScheduleFire, SchedulePage,
};
use crate::store::MAX_PAGE_SIZE;

const COLUMNS: &str = "id, org_id, name, cron, timezone, command, missed, state, next_fire_at, \
     last_fire_at, created_at, updated_at";

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
    next_fire_at: Option<OffsetDateTime>,
    last_fire_at: Option<OffsetDateTime>,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
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
            next_fire_at: self.next_fire_at,
            last_fire_at: self.last_fire_at,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
struct FireRow {
    schedule_id: ScheduleId,
    fire_at: OffsetDateTime,
    fired_at: OffsetDateTime,
    command_ids: Json<Vec<CommandId>>,
    error: Option<String>,
}

impl FireRow {
    fn into_fire(self) -> ScheduleFire {
        ScheduleFire {
            schedule_id: self.schedule_id,
            fire_at: self.fire_at,
            fired_at: self.fired_at,
            command_ids: self.command_ids.0,
            error: self.error,
        }
    }
}

pub(super) async fn create(store: &PgStore, org: OrgId, new: NewSchedule) -> StoreResult<Schedule> {
    // The first fire time after now by the store's clock (the one `keel_now()` reads).
    let now: OffsetDateTime = sqlx::query_scalar("SELECT keel_now()")
        .fetch_one(&store.pool)
        .await?;
    let (_, next) = FireTimes::parse_firing(&new.cron, &new.timezone, now)
        .map_err(|err| StoreError::InvalidInput(err.to_string()))?;
    let row: ScheduleRow = sqlx::query_as(&format!(
        "INSERT INTO schedules (id, org_id, name, cron, timezone, command, missed, state, \
         next_fire_at, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', $8, keel_now(), keel_now()) \
         RETURNING {COLUMNS}"
    ))
    .bind(ScheduleId::new())
    .bind(org)
    .bind(&new.name)
    .bind(&new.cron)
    .bind(&new.timezone)
    .bind(Json(&new.command))
    .bind(new.missed.as_str())
    .bind(next)
    .fetch_one(&store.pool)
    .await
    .map_err(|err| missing_as(err.into(), StoreError::NotFound))?;
    row.into_schedule()
}

pub(super) async fn list(
    store: &PgStore,
    org: OrgId,
    cursor: Option<ScheduleId>,
    limit: u32,
) -> StoreResult<SchedulePage> {
    let limit = limit.clamp(1, MAX_PAGE_SIZE);
    let rows: Vec<ScheduleRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM schedules WHERE org_id = $1 AND ($2::uuid IS NULL OR id > $2) \
         ORDER BY id LIMIT $3"
    ))
    .bind(org)
    .bind(cursor)
    // One more than asked, to know whether there is a next page.
    .bind(i64::from(limit) + 1)
    .fetch_all(&store.pool)
    .await?;
    let items = rows
        .into_iter()
        .map(ScheduleRow::into_schedule)
        .collect::<StoreResult<Vec<_>>>()?;
    let (items, next_cursor) = page_of(items, limit, |s| s.id);
    Ok(SchedulePage { items, next_cursor })
}

pub(super) async fn get(
    store: &PgStore,
    org: OrgId,
    id: ScheduleId,
) -> StoreResult<Option<Schedule>> {
    let row: Option<ScheduleRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM schedules WHERE org_id = $1 AND id = $2"
    ))
    .bind(org)
    .bind(id)
    .fetch_optional(&store.pool)
    .await?;
    row.map(ScheduleRow::into_schedule).transpose()
}

pub(super) async fn set_state(
    store: &PgStore,
    org: OrgId,
    id: ScheduleId,
    state: ScheduleState,
) -> StoreResult<Schedule> {
    // The next fire time stays as it was: on resume, the fire times that passed while paused
    // are missed ones, and the schedule's policy decides.
    let row: Option<ScheduleRow> = sqlx::query_as(&format!(
        "UPDATE schedules SET state = $1, updated_at = keel_now() WHERE org_id = $2 AND id = $3 \
         RETURNING {COLUMNS}"
    ))
    .bind(state.as_str())
    .bind(org)
    .bind(id)
    .fetch_optional(&store.pool)
    .await?;
    row.ok_or(StoreError::NotFound)?.into_schedule()
}

pub(super) async fn delete(store: &PgStore, org: OrgId, id: ScheduleId) -> StoreResult<()> {
    // Its fire records go with it (`ON DELETE CASCADE`); its commands stay.
    let done = sqlx::query("DELETE FROM schedules WHERE org_id = $1 AND id = $2")
        .bind(org)
        .bind(id)
        .execute(&store.pool)
        .await?;
    found(done.rows_affected())
}

pub(super) async fn list_fires(
    store: &PgStore,
    org: OrgId,
    id: ScheduleId,
    before: Option<OffsetDateTime>,
    limit: u32,
) -> StoreResult<Vec<ScheduleFire>> {
    let limit = limit.clamp(1, MAX_PAGE_SIZE);
    // The organisation is checked on the schedule; the fires are read on their primary key,
    // newest first.
    let rows: Vec<FireRow> = sqlx::query_as(
        "SELECT schedule_id, fire_at, fired_at, command_ids, error FROM schedule_fires \
         WHERE schedule_id = $1 AND ($4::timestamptz IS NULL OR fire_at < $4) \
           AND EXISTS (SELECT 1 FROM schedules WHERE id = $1 AND org_id = $2) \
         ORDER BY fire_at DESC LIMIT $3",
    )
    .bind(id)
    .bind(org)
    .bind(i64::from(limit))
    .bind(before)
    .fetch_all(&store.pool)
    .await?;
    Ok(rows.into_iter().map(FireRow::into_fire).collect())
}

pub(super) async fn due(store: &PgStore, limit: u32) -> StoreResult<Vec<Schedule>> {
    // On the due index alone.
    let rows: Vec<ScheduleRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM schedules \
         WHERE state = 'active' AND next_fire_at IS NOT NULL AND next_fire_at <= keel_now() \
         ORDER BY next_fire_at LIMIT $1"
    ))
    .bind(i64::from(limit.clamp(1, MAX_PAGE_SIZE)))
    .fetch_all(&store.pool)
    .await?;
    rows.into_iter().map(ScheduleRow::into_schedule).collect()
}

pub(super) async fn advance(store: &PgStore, step: ScheduleAdvance) -> StoreResult<AdvanceOutcome> {
    if let Some(fire) = &step.fire {
        for item in &fire.items {
            validate_new_command(&item.command)?;
        }
        if let Some(broadcast) = &fire.broadcast {
            validate_new_command(&broadcast.command)?;
        }
    }
    let ScheduleAdvance {
        org,
        schedule,
        due,
        next,
        fire,
    } = step;
    let mut tx = store.pool.begin().await?;
    let outcome = async {
        // Only from the next fire time the scheduler read, on an active schedule: another
        // instance, a pause or a delete that came first leaves it alone (a concurrent advance
        // waits for this row, then finds it moved).
        let now: Option<OffsetDateTime> = sqlx::query_scalar(
            "UPDATE schedules SET next_fire_at = $1, last_fire_at = COALESCE($2, last_fire_at), \
         updated_at = keel_now() \
         WHERE org_id = $3 AND id = $4 AND state = 'active' AND next_fire_at = $5 \
         RETURNING updated_at",
        )
        .bind(next)
        .bind(fire.as_ref().map(|f| f.fire_at))
        .bind(org)
        .bind(schedule)
        .bind(due)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(now) = now else {
            return Ok(None);
        };
        let Some(fire) = fire else {
            return Ok(Some(AdvanceOutcome::Skipped));
        };
        let mut command_ids = Vec::with_capacity(fire.items.len() + 1);
        if let Some(broadcast) = fire.broadcast {
            let new = broadcasts::resolve_fire(&mut tx, org, broadcast, now).await?;
            let created = broadcasts::insert(&mut tx, org, new, None).await?;
            command_ids.push(created.command.id);
        }
        if !fire.items.is_empty() {
            let rows = fire
                .items
                .into_iter()
                .map(|item| NewRow::plain(item.command, item.idempotency))
                .collect();
            for created in insert_rows(&mut tx, org, rows).await? {
                command_ids.push(created.command.id);
            }
        }
        let recorded = sqlx::query(
            "INSERT INTO schedule_fires (schedule_id, fire_at, fired_at, command_ids, error) \
         VALUES ($1, $2, keel_now(), $3, $4) ON CONFLICT DO NOTHING",
        )
        .bind(schedule)
        .bind(fire.fire_at)
        .bind(Json(&command_ids))
        .bind(&fire.error)
        .execute(&mut *tx)
        .await?;
        if recorded.rows_affected() == 0 {
            // Recorded before: the schedule's move and the commands are undone with the
            // transaction.
            return Ok(None);
        }
        Ok(Some(AdvanceOutcome::Fired(ScheduleFire {
            schedule_id: schedule,
            fire_at: fire.fire_at,
            fired_at: now,
            command_ids,
            error: fire.error,
        })))
    }
    .await;
    // Stale: nothing is kept.
    match outcome {
        Ok(None) => {
            tx.rollback().await?;
            Ok(AdvanceOutcome::Stale)
        }
        other => settle(tx, other)
            .await
            .map(|o| o.unwrap_or(AdvanceOutcome::Stale)),
    }
}
