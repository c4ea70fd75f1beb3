//! Notifications on SQLite: settings, events and their deliveries (`notification_settings`,
//! `notification_events`, `deliveries`, `delivery_attempts`). Deliveries are the lease
//! engine's second table: claim, complete, fail with backoff, release, requeue, attempts and
//! retention are [`LeaseTable`]'s.
//!
//! The engine names the holder of a lease an agent (`claimed_by`, typed [`AgentId`]); for
//! deliveries the holder is a processor worker, whose [`WorkerId`] is stored in the same column
//! through an [`AgentId`] of the same UUID. The deliveries table has no foreign key on it.

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;
use sqlx::SqliteConnection;
use sqlx::types::Json;
use time::OffsetDateTime;

use super::lease::{Claim, Fence, LeaseTable};
use super::rows::{corrupt, duration_millis, from_micros, to_micros, to_u32};
use super::writer::Lane;
use super::{SqliteStore, conflict_as, found, missing_as};
use crate::common::{
    ATTEMPTS_EXHAUSTED, DeliveryKeys, check_new_setting, check_requeue_filter, check_trigger,
    delivery_keys, setting_taken,
};
use crate::crash::{self, Phase, Step};
use crate::error::{StoreError, StoreResult};
use crate::model::{AgentId, ClaimToken, Idempotency, OrgId};
use crate::notifications::model::{
    ChannelType, ClaimedDelivery, Delivery, DeliveryAttempt, DeliveryFilter, DeliveryId,
    DeliveryOutcome, DeliveryPage, DeliveryReport, DeliveryStatus, Event, EventId, NewDelivery,
    NewEvent, NewSetting, RecordedDelivery, ReleasedDelivery, SealedSecret, Setting, SettingId,
    SettingKind, Severity, Triggered, WorkerId,
};
use crate::notifications::{
    MAX_DELIVERY_CLAIM, MAX_DELIVERY_REPORTS, MAX_REQUEUE, NotificationStore,
};
use crate::store::MAX_PAGE_SIZE;

const SETTING_COLUMNS: &str =
    "id, org_id, kind, name, unique_key, body, sealed_secret, created_at, updated_at";

const EVENT_COLUMNS: &str =
    "id, org_id, event_type, payload, domain, severity, idempotency_key, request_hash, created_at";

/// The delivery columns, in [`DeliveryRow`] order.
const DELIVERY_COLUMNS: &str = "id, org_id, event_id, event_type, severity, channel_id, \
     channel_type, recipient, subject, body, status, priority, attempts, max_attempts, run_at, \
     claimed_by, claim_token, lease_expires_at, result, error, dead_reason, created_at, \
     updated_at, finished_at, digest_of, digest_id";

/// The columns a recorded outcome reads back, in [`RecordedRow`] order.
const RECORDED_COLUMNS: &str = "id, org_id, event_id, channel_type, status, attempts";

/// Deliveries are leased to the processor's workers.
const DELIVERIES: LeaseTable = LeaseTable {
    table: "deliveries",
    columns: DELIVERY_COLUMNS,
    keep: "",
};

/// The claimable deliveries of every organisation, in claim order, at most `?4`. The claim's
/// `?2` (an organisation) is not read: workers serve them all.
const CLAIM_CANDIDATES: &str = "SELECT id FROM deliveries INDEXED BY deliveries_claim \
     WHERE status = 'pending' AND scheduled = 0 ORDER BY priority DESC, run_at, id LIMIT ?4";

/// Deliveries whose backoff ended become claimable, at most this many per claim.
const PROMOTE_BATCH: u32 = 1000;

#[derive(sqlx::FromRow)]
struct SettingRow {
    id: SettingId,
    org_id: OrgId,
    kind: String,
    name: String,
    unique_key: Option<String>,
    body: Json<Value>,
    sealed_secret: Option<Vec<u8>>,
    created_at: i64,
    updated_at: i64,
}

impl SettingRow {
    fn into_setting(self) -> StoreResult<Setting> {
        Ok(Setting {
            id: self.id,
            org_id: self.org_id,
            kind: self.kind.parse().map_err(corrupt)?,
            name: self.name,
            unique_key: self.unique_key,
            body: self.body.0,
            sealed_secret: self.sealed_secret.map(SealedSecret),
            created_at: from_micros(self.created_at)?,
            updated_at: from_micros(self.updated_at)?,
        })
    }
}

#[derive(sqlx::FromRow)]
struct EventRow {
    id: EventId,
    org_id: OrgId,
    event_type: String,
    payload: Json<Value>,
    domain: String,
    severity: String,
    idempotency_key: Option<String>,
    request_hash: Option<String>,
    created_at: i64,
}

impl EventRow {
    fn into_event(self) -> StoreResult<Event> {
        Ok(Event {
            id: self.id,
            org_id: self.org_id,
            event_type: self.event_type,
            payload: self.payload.0,
            domain: self.domain,
            severity: self.severity.parse::<Severity>().map_err(corrupt)?,
            idempotency_key: self.idempotency_key,
            created_at: from_micros(self.created_at)?,
        })
    }
}

#[derive(sqlx::FromRow)]
struct DeliveryRow {
    id: DeliveryId,
    org_id: OrgId,
    event_id: EventId,
    event_type: String,
    severity: String,
    channel_id: Option<SettingId>,
    channel_type: String,
    recipient: String,
    subject: String,
    body: String,
    status: String,
    priority: i32,
    attempts: i64,
    max_attempts: i64,
    run_at: i64,
    claimed_by: Option<WorkerId>,
    claim_token: Option<String>,
    lease_expires_at: Option<i64>,
    result: Option<Json<Value>>,
    error: Option<Json<Value>>,
    dead_reason: Option<String>,
    created_at: i64,
    updated_at: i64,
    finished_at: Option<i64>,
    digest_of: Option<DeliveryId>,
    digest_id: Option<DeliveryId>,
}

impl DeliveryRow {
    fn into_delivery(self) -> StoreResult<(Delivery, Option<ClaimToken>)> {
        let delivery = Delivery {
            id: self.id,
            org_id: self.org_id,
            event_id: self.event_id,
            event_type: self.event_type,
            severity: self.severity.parse().map_err(corrupt)?,
            channel_id: self.channel_id,
            channel_type: self.channel_type.parse::<ChannelType>().map_err(corrupt)?,
            recipient: self.recipient,
            subject: self.subject,
            body: self.body,
            status: self.status.parse::<DeliveryStatus>().map_err(corrupt)?,
            priority: self.priority,
            attempts: to_u32(self.attempts)?,
            max_attempts: to_u32(self.max_attempts)?,
            run_at: from_micros(self.run_at)?,
            claimed_by: self.claimed_by,
            lease_expires_at: self.lease_expires_at.map(from_micros).transpose()?,
            result: self.result.map(|j| j.0),
            error: self.error.map(|j| j.0),
            dead_reason: self.dead_reason,
            digest_of: self.digest_of,
            digest_id: self.digest_id,
            created_at: from_micros(self.created_at)?,
            updated_at: from_micros(self.updated_at)?,
            finished_at: self.finished_at.map(from_micros).transpose()?,
        };
        Ok((delivery, self.claim_token.map(ClaimToken)))
    }

    fn into_plain(self) -> StoreResult<Delivery> {
        Ok(self.into_delivery()?.0)
    }
}

#[derive(sqlx::FromRow)]
struct RecordedRow {
    id: DeliveryId,
    org_id: OrgId,
    event_id: EventId,
    channel_type: String,
    status: String,
    attempts: i64,
}

impl RecordedRow {
    fn into_recorded(self) -> StoreResult<RecordedDelivery> {
        Ok(RecordedDelivery {
            id: self.id,
            org_id: self.org_id,
            event_id: self.event_id,
            channel_type: self.channel_type.parse::<ChannelType>().map_err(corrupt)?,
            status: self.status.parse::<DeliveryStatus>().map_err(corrupt)?,
            attempts: to_u32(self.attempts)?,
        })
    }
}

#[derive(sqlx::FromRow)]
struct DeliveryAttemptRow {
    attempt: i64,
    agent_id: WorkerId,
    claimed_at: i64,
    ended_at: Option<i64>,
    outcome: Option<String>,
    error: Option<Json<Value>>,
}

/// The engine's holder for a worker: the same UUID (see the module's documentation).
fn holder(worker: WorkerId) -> AgentId {
    AgentId(worker.0)
}

async fn deliveries_of(
    conn: &mut SqliteConnection,
    org: OrgId,
    event: EventId,
) -> StoreResult<Vec<Delivery>> {
    let rows: Vec<DeliveryRow> = sqlx::query_as(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE org_id = ? AND event_id = ? ORDER BY id"
    ))
    .bind(org)
    .bind(event)
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter().map(DeliveryRow::into_plain).collect()
}

async fn insert_event(
    conn: &mut SqliteConnection,
    org: OrgId,
    event: NewEvent,
    deliveries: Vec<NewDelivery>,
    now_us: i64,
) -> StoreResult<Triggered> {
    if let Some(idem) = &event.idempotency {
        let existing: Option<EventRow> = sqlx::query_as(&format!(
            "SELECT {EVENT_COLUMNS} FROM notification_events \
             WHERE org_id = ? AND idempotency_key = ?"
        ))
        .bind(org)
        .bind(&idem.key)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(existing) = existing {
            return replay(conn, existing, idem).await;
        }
    }
    let row: EventRow = sqlx::query_as(&format!(
        "INSERT INTO notification_events (id, org_id, event_type, payload, domain, severity, \
           idempotency_key, request_hash, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) \
         RETURNING {EVENT_COLUMNS}"
    ))
    .bind(event.id)
    .bind(org)
    .bind(&event.event_type)
    .bind(Json(&event.payload))
    .bind(&event.domain)
    .bind(event.severity.as_str())
    .bind(event.idempotency.as_ref().map(|i| i.key.as_str()))
    .bind(event.idempotency.as_ref().map(|i| i.request_hash.as_str()))
    .bind(now_us)
    .fetch_one(&mut *conn)
    .await
    .map_err(|err| missing_as(StoreError::from(err), StoreError::NotFound))?;
    let event = row.into_event()?;
    let mut created = Vec::with_capacity(deliveries.len());
    for delivery in deliveries {
        let row = insert_delivery(conn, org, &event, &delivery, now_us).await?;
        if let Some(row) = row {
            created.push(row.into_plain()?);
        }
    }
    Ok(Triggered {
        event,
        deliveries: created,
        created: true,
    })
}

/// Inserts one delivery of `event`: sent alone, or throttled into its lead's digest. `None`
/// when its dedupe key is taken.
async fn insert_delivery(
    conn: &mut SqliteConnection,
    org: OrgId,
    event: &Event,
    delivery: &NewDelivery,
    now_us: i64,
) -> StoreResult<Option<DeliveryRow>> {
    let DeliveryKeys {
        dedupe: dedupe_key,
        throttle: throttle_key,
    } = delivery_keys(event.id, &event.event_type, delivery);
    let taken: Option<i64> =
        sqlx::query_scalar("SELECT 1 FROM deliveries WHERE org_id = ? AND dedupe_key = ?")
            .bind(org)
            .bind(&dedupe_key)
            .fetch_optional(&mut *conn)
            .await?;
    if taken.is_some() {
        return Ok(None);
    }
    let digest = match delivery.throttle.filter(|w| !w.is_zero()) {
        Some(window) => open_digest(conn, org, &throttle_key, delivery, window, now_us).await?,
        None => None,
    };
    let status = if digest.is_some() {
        "throttled"
    } else {
        "pending"
    };
    let row: Option<DeliveryRow> = sqlx::query_as(&format!(
        "INSERT INTO deliveries (id, org_id, status, run_at, priority, max_attempts, \
           lease_duration_ms, created_at, updated_at, finished_at, event_id, event_type, \
           severity, channel_id, channel_type, recipient, subject, body, dedupe_key, \
           throttle_key, digest_id) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         ON CONFLICT (org_id, dedupe_key) DO NOTHING \
         RETURNING {DELIVERY_COLUMNS}"
    ))
    .bind(DeliveryId::new())
    .bind(org)
    .bind(status)
    .bind(now_us)
    .bind(delivery.priority)
    .bind(i64::from(delivery.max_attempts))
    .bind(duration_millis(delivery.lease_duration))
    .bind(now_us)
    .bind(now_us)
    .bind(digest.map(|_| now_us))
    .bind(event.id)
    .bind(&event.event_type)
    .bind(event.severity.as_str())
    .bind(delivery.channel_id)
    .bind(delivery.channel_type.as_str())
    .bind(&delivery.recipient)
    .bind(&delivery.subject)
    .bind(&delivery.body)
    .bind(&dedupe_key)
    .bind(&throttle_key)
    .bind(digest)
    .fetch_optional(&mut *conn)
    .await?;
    Ok(row)
}

/// The digest a delivery with this throttle key is folded into, when a delivery of the key was
/// sent alone within `window`: its pending digest, created due at the window's end if it is
/// the first fold. `None` when the delivery leads (nothing within the window, or the window's
/// digest already went out).
async fn open_digest(
    conn: &mut SqliteConnection,
    org: OrgId,
    throttle_key: &str,
    delivery: &NewDelivery,
    window: Duration,
    now_us: i64,
) -> StoreResult<Option<DeliveryId>> {
    let window_us = duration_millis(window).saturating_mul(1000);
    let lead: Option<(DeliveryId, i64, EventId, String, String)> = sqlx::query_as(
        "SELECT id, created_at, event_id, event_type, severity FROM deliveries \
         INDEXED BY deliveries_throttle \
         WHERE org_id = ?1 AND throttle_key = ?2 AND created_at > ?3 \
           AND status <> 'throttled' AND digest_of IS NULL \
         ORDER BY created_at DESC LIMIT 1",
    )
    .bind(org)
    .bind(throttle_key)
    .bind(now_us.saturating_sub(window_us))
    .fetch_optional(&mut *conn)
    .await?;
    let Some((lead, lead_at, lead_event, event_type, severity)) = lead else {
        return Ok(None);
    };
    let digest: Option<(DeliveryId, String)> =
        sqlx::query_as("SELECT id, status FROM deliveries WHERE digest_of = ?")
            .bind(lead)
            .fetch_optional(&mut *conn)
            .await?;
    match digest {
        Some((id, status)) if status == "pending" => return Ok(Some(id)),
        // The window's digest is out: this one leads a new window.
        Some(_) => return Ok(None),
        None => {}
    }
    let due = lead_at.saturating_add(window_us);
    let id = DeliveryId::new();
    sqlx::query(
        "INSERT INTO deliveries (id, org_id, status, run_at, scheduled, priority, max_attempts, \
           lease_duration_ms, created_at, updated_at, event_id, event_type, severity, \
           channel_id, channel_type, recipient, subject, body, dedupe_key, throttle_key, \
           digest_of) \
         VALUES (?, ?, 'pending', ?, 1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '', ?, ?, ?)",
    )
    .bind(id)
    .bind(org)
    .bind(due)
    .bind(delivery.priority)
    .bind(i64::from(delivery.max_attempts))
    .bind(duration_millis(delivery.lease_duration))
    .bind(now_us)
    .bind(now_us)
    .bind(lead_event)
    .bind(&event_type)
    .bind(&severity)
    .bind(delivery.channel_id)
    .bind(delivery.channel_type.as_str())
    .bind(&delivery.recipient)
    .bind(format!("digest of {event_type}"))
    .bind(format!("{lead}/digest"))
    .bind(throttle_key)
    .bind(lead)
    .execute(&mut *conn)
    .await?;
    Ok(Some(id))
}

/// The answer to a trigger whose idempotency key was seen before.
async fn replay(
    conn: &mut SqliteConnection,
    existing: EventRow,
    idem: &Idempotency,
) -> StoreResult<Triggered> {
    if existing.request_hash.as_deref() != Some(idem.request_hash.as_str()) {
        return Err(StoreError::IdempotencyMismatch);
    }
    let event = existing.into_event()?;
    let deliveries = deliveries_of(conn, event.org_id, event.id).await?;
    Ok(Triggered {
        event,
        deliveries,
        created: false,
    })
}

/// A listing's statement: `?1` organisation, `?2` status, `?3` event, `?4` channel type,
/// `?5` cursor, `?6` limit; only the filters given are read.
fn list_sql(filter: &DeliveryFilter, cursor: bool, columns: &str) -> String {
    let mut sql = format!("SELECT {columns} FROM deliveries WHERE org_id = ?1");
    for (present, condition) in [
        (filter.status.is_some(), " AND status = ?2"),
        (filter.event_id.is_some(), " AND event_id = ?3"),
        (filter.channel_type.is_some(), " AND channel_type = ?4"),
        (cursor, " AND id < ?5"),
    ] {
        if present {
            sql.push_str(condition);
        }
    }
    sql.push_str(" ORDER BY id DESC LIMIT ?6");
    sql
}

#[async_trait]
impl NotificationStore for SqliteStore {
    async fn create_setting(
        &self,
        org: OrgId,
        kind: SettingKind,
        setting: NewSetting,
    ) -> StoreResult<Setting> {
        check_new_setting(&setting)?;
        let (_, now_us) = self.now_and_micros();
        self.write_one(Lane::Bulk, move |conn| {
            Box::pin(async move {
                let row: SettingRow = sqlx::query_as(&format!(
                    "INSERT INTO notification_settings (id, org_id, kind, name, unique_key, \
                       body, sealed_secret, created_at, updated_at) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING {SETTING_COLUMNS}"
                ))
                .bind(SettingId::new())
                .bind(org)
                .bind(kind.as_str())
                .bind(&setting.name)
                .bind(&setting.unique_key)
                .bind(Json(&setting.body))
                .bind(setting.sealed_secret.as_ref().map(|s| s.0.as_slice()))
                .bind(now_us)
                .bind(now_us)
                .fetch_one(&mut *conn)
                .await
                .map_err(|err| {
                    let err = missing_as(StoreError::from(err), StoreError::NotFound);
                    conflict_as(err, setting_taken(kind, setting.unique_key.as_deref()))
                })?;
                row.into_setting()
            })
        })
        .await
    }

    async fn get_setting(
        &self,
        org: OrgId,
        kind: SettingKind,
        id: SettingId,
    ) -> StoreResult<Option<Setting>> {
        let row: Option<SettingRow> = sqlx::query_as(&format!(
            "SELECT {SETTING_COLUMNS} FROM notification_settings \
             WHERE org_id = ? AND kind = ? AND id = ?"
        ))
        .bind(org)
        .bind(kind.as_str())
        .bind(id)
        .fetch_optional(&self.read)
        .await?;
        row.map(SettingRow::into_setting).transpose()
    }

    async fn list_settings(&self, org: OrgId, kind: SettingKind) -> StoreResult<Vec<Setting>> {
        let rows: Vec<SettingRow> = sqlx::query_as(&format!(
            "SELECT {SETTING_COLUMNS} FROM notification_settings \
             WHERE org_id = ? AND kind = ? ORDER BY created_at, id"
        ))
        .bind(org)
        .bind(kind.as_str())
        .fetch_all(&self.read)
        .await?;
        rows.into_iter().map(SettingRow::into_setting).collect()
    }

    async fn update_setting(
        &self,
        org: OrgId,
        kind: SettingKind,
        id: SettingId,
        setting: NewSetting,
    ) -> StoreResult<Setting> {
        check_new_setting(&setting)?;
        let (_, now_us) = self.now_and_micros();
        self.write_one(Lane::Bulk, move |conn| {
            Box::pin(async move {
                let row: Option<SettingRow> = sqlx::query_as(&format!(
                    "UPDATE notification_settings SET name = ?1, unique_key = ?2, body = ?3, \
                       sealed_secret = COALESCE(?4, sealed_secret), updated_at = ?5 \
                     WHERE org_id = ?6 AND kind = ?7 AND id = ?8 RETURNING {SETTING_COLUMNS}"
                ))
                .bind(&setting.name)
                .bind(&setting.unique_key)
                .bind(Json(&setting.body))
                .bind(setting.sealed_secret.as_ref().map(|s| s.0.as_slice()))
                .bind(now_us)
                .bind(org)
                .bind(kind.as_str())
                .bind(id)
                .fetch_optional(&mut *conn)
                .await
                .map_err(|err| {
                    conflict_as(
                        StoreError::from(err),
                        setting_taken(kind, setting.unique_key.as_deref()),
                    )
                })?;
                row.ok_or(StoreError::NotFound)?.into_setting()
            })
        })
        .await
    }

    async fn delete_setting(
        &self,
        org: OrgId,
        kind: SettingKind,
        id: SettingId,
    ) -> StoreResult<()> {
        self.write_one(Lane::Bulk, move |conn| {
            Box::pin(async move {
                let done = sqlx::query(
                    "DELETE FROM notification_settings WHERE org_id = ? AND kind = ? AND id = ?",
                )
                .bind(org)
                .bind(kind.as_str())
                .bind(id)
                .execute(&mut *conn)
                .await?;
                found(done.rows_affected())
            })
        })
        .await
    }

    async fn trigger(
        &self,
        org: OrgId,
        event: NewEvent,
        deliveries: Vec<NewDelivery>,
    ) -> StoreResult<Triggered> {
        check_trigger(&event, &deliveries)?;
        let (_, now_us) = self.now_and_micros();
        crash::around(
            Step::Enqueue,
            self.write(Lane::Bulk, move |conn| {
                Box::pin(async move { insert_event(conn, org, event, deliveries, now_us).await })
            }),
        )
        .await
    }

    async fn get_delivery(&self, org: OrgId, id: DeliveryId) -> StoreResult<Option<Delivery>> {
        let row: Option<DeliveryRow> = sqlx::query_as(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE org_id = ? AND id = ?"
        ))
        .bind(org)
        .bind(id)
        .fetch_optional(&self.read)
        .await?;
        row.map(DeliveryRow::into_plain).transpose()
    }

    async fn list_delivery_attempts(
        &self,
        org: OrgId,
        id: DeliveryId,
    ) -> StoreResult<Vec<DeliveryAttempt>> {
        let rows: Vec<DeliveryAttemptRow> = sqlx::query_as(
            "SELECT a.attempt, a.agent_id, a.claimed_at, a.ended_at, a.outcome, a.error \
             FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id \
             WHERE d.org_id = ? AND d.id = ? ORDER BY a.attempt",
        )
        .bind(org)
        .bind(id)
        .fetch_all(&self.read)
        .await?;
        rows.into_iter()
            .map(|row| {
                Ok(DeliveryAttempt {
                    number: to_u32(row.attempt)?,
                    worker_id: row.agent_id,
                    claimed_at: from_micros(row.claimed_at)?,
                    ended_at: row.ended_at.map(from_micros).transpose()?,
                    outcome: row.outcome,
                    detail: row.error.map(|j| j.0),
                })
            })
            .collect()
    }

    async fn list_deliveries(
        &self,
        org: OrgId,
        filter: DeliveryFilter,
        cursor: Option<DeliveryId>,
        limit: u32,
    ) -> StoreResult<DeliveryPage> {
        let limit = limit.clamp(1, MAX_PAGE_SIZE);
        let sql = list_sql(&filter, cursor.is_some(), DELIVERY_COLUMNS);
        let rows: Vec<DeliveryRow> = sqlx::query_as(&sql)
            .bind(org)
            .bind(filter.status.map(DeliveryStatus::as_str))
            .bind(filter.event_id)
            .bind(filter.channel_type.map(ChannelType::as_str))
            .bind(cursor)
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.read)
            .await?;
        let mut items = rows
            .into_iter()
            .map(DeliveryRow::into_plain)
            .collect::<StoreResult<Vec<_>>>()?;
        let next_cursor = if items.len() > limit as usize {
            items.truncate(limit as usize);
            items.last().map(|d| d.id)
        } else {
            None
        };
        Ok(DeliveryPage { items, next_cursor })
    }

    async fn list_digested(&self, org: OrgId, digest: DeliveryId) -> StoreResult<Vec<Delivery>> {
        let rows: Vec<DeliveryRow> = sqlx::query_as(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries INDEXED BY deliveries_digested \
             WHERE digest_id = ? AND org_id = ? ORDER BY created_at, id"
        ))
        .bind(digest)
        .bind(org)
        .fetch_all(&self.read)
        .await?;
        rows.into_iter().map(DeliveryRow::into_plain).collect()
    }

    async fn requeue_delivery(&self, org: OrgId, id: DeliveryId) -> StoreResult<Delivery> {
        let (_, now_us) = self.now_and_micros();
        crash::around(
            Step::DeliveryRequeue,
            self.write_one(Lane::Bulk, move |conn| {
                Box::pin(async move {
                    let row: DeliveryRow = DELIVERIES.requeue(conn, org, id.0, now_us).await?;
                    row.into_plain()
                })
            }),
        )
        .await
    }

    async fn requeue_deliveries(&self, org: OrgId, filter: DeliveryFilter) -> StoreResult<u64> {
        check_requeue_filter(&filter)?;
        let (_, now_us) = self.now_and_micros();
        crash::around(
            Step::DeliveryRequeue,
            self.write(Lane::Bulk, move |conn| {
                Box::pin(async move {
                    let mut sql = list_sql(&filter, false, "id");
                    if filter.status.is_none() {
                        sql =
                            sql.replace(" ORDER BY", " AND status IN ('dead', 'failed') ORDER BY");
                    }
                    let ids: Vec<DeliveryId> = sqlx::query_scalar(&sql)
                        .bind(org)
                        .bind(filter.status.map(DeliveryStatus::as_str))
                        .bind(filter.event_id)
                        .bind(filter.channel_type.map(ChannelType::as_str))
                        .bind(None::<DeliveryId>)
                        .bind(i64::from(MAX_REQUEUE))
                        .fetch_all(&mut *conn)
                        .await?;
                    let mut requeued = 0;
                    for id in ids {
                        let _: DeliveryRow = DELIVERIES.requeue(conn, org, id.0, now_us).await?;
                        requeued += 1;
                    }
                    Ok(requeued)
                })
            }),
        )
        .await
    }

    async fn claim_deliveries(
        &self,
        worker: WorkerId,
        limit: u32,
    ) -> StoreResult<Vec<ClaimedDelivery>> {
        let limit = limit.clamp(1, MAX_DELIVERY_CLAIM);
        let (_, now_us) = self.now_and_micros();
        let mut claimed = self
            .write(Lane::Lease, move |conn| {
                Box::pin(async move {
                    // Deliveries whose backoff has ended join the claimable ones first.
                    sqlx::query(&format!(
                        "UPDATE deliveries SET scheduled = 0 WHERE id IN (SELECT id FROM \
                         deliveries INDEXED BY deliveries_scheduled WHERE status = 'pending' \
                         AND scheduled = 1 AND run_at <= ?1 ORDER BY run_at LIMIT {PROMOTE_BATCH})"
                    ))
                    .bind(now_us)
                    .execute(&mut *conn)
                    .await?;
                    let rows: Vec<DeliveryRow> = DELIVERIES
                        .claim(
                            conn,
                            Claim {
                                candidates: CLAIM_CANDIDATES,
                                // Not read by the candidates: deliveries of every organisation.
                                org: OrgId(uuid::Uuid::nil()),
                                agent: holder(worker),
                                extra: &[],
                                now_us,
                                limit,
                            },
                        )
                        .await?;
                    rows.into_iter()
                        .map(|row| {
                            let (delivery, token) = row.into_delivery()?;
                            let claim_token = token.ok_or_else(|| {
                                corrupt(format!("claimed delivery {} has no token", delivery.id))
                            })?;
                            Ok(ClaimedDelivery {
                                delivery,
                                claim_token,
                            })
                        })
                        .collect::<StoreResult<Vec<_>>>()
                        .inspect(|claimed| {
                            crash::point_if(Step::Send, Phase::Before, !claimed.is_empty());
                        })
                })
            })
            .await?;
        crash::point_if(Step::Send, Phase::After, !claimed.is_empty());
        claimed.sort_by(|a, b| {
            b.delivery
                .priority
                .cmp(&a.delivery.priority)
                .then(a.delivery.run_at.cmp(&b.delivery.run_at))
                .then(a.delivery.id.cmp(&b.delivery.id))
        });
        Ok(claimed)
    }

    async fn record_deliveries(
        &self,
        worker: WorkerId,
        reports: Vec<DeliveryReport>,
    ) -> StoreResult<Vec<StoreResult<RecordedDelivery>>> {
        if reports.len() > MAX_DELIVERY_REPORTS {
            return Err(StoreError::InvalidInput(format!(
                "at most {MAX_DELIVERY_REPORTS} delivery reports at once"
            )));
        }
        if reports.is_empty() {
            return Ok(Vec::new());
        }
        let (now, now_us) = self.now_and_micros();
        crash::around(
            Step::Record,
            self.write(Lane::Lease, move |conn| {
                Box::pin(async move {
                    let mut answers: Vec<Option<StoreResult<RecordedDelivery>>> =
                        (0..reports.len()).map(|_| None).collect();
                    // The deliveries sent, the common case, all in one statement.
                    let delivered: Vec<(uuid::Uuid, &ClaimToken, &Value)> = reports
                        .iter()
                        .filter_map(|r| match &r.outcome {
                            DeliveryOutcome::Delivered(detail) => {
                                Some((r.id.0, &r.claim_token, detail))
                            }
                            _ => None,
                        })
                        .collect();
                    if !delivered.is_empty() {
                        let rows: Vec<RecordedRow> = DELIVERIES
                            .complete_many(
                                conn,
                                RECORDED_COLUMNS,
                                holder(worker),
                                &delivered,
                                now_us,
                            )
                            .await?;
                        let mut completed: HashMap<DeliveryId, RecordedDelivery> = HashMap::new();
                        for row in rows {
                            let delivery = row.into_recorded()?;
                            completed.insert(delivery.id, delivery);
                        }
                        for (answer, report) in answers.iter_mut().zip(&reports) {
                            if matches!(report.outcome, DeliveryOutcome::Delivered(_)) {
                                *answer = Some(match completed.remove(&report.id) {
                                    Some(delivery) => Ok(delivery),
                                    // Not completed: say why.
                                    None => Err(match org_of(conn, report.id).await {
                                        Ok(_) => StoreError::StaleClaim,
                                        Err(error) => error,
                                    }),
                                });
                            }
                        }
                    }
                    // The rest one by one, each in its own savepoint: one that fails changes
                    // nothing and leaves the others recorded.
                    for (answer, report) in answers.iter_mut().zip(reports) {
                        if answer.is_some() {
                            continue;
                        }
                        sqlx::query("SAVEPOINT report").execute(&mut *conn).await?;
                        let recorded = record(conn, worker, report, now, now_us)
                            .await
                            .map(RecordedDelivery::from);
                        if recorded.is_err() {
                            sqlx::query("ROLLBACK TO report")
                                .execute(&mut *conn)
                                .await?;
                        }
                        sqlx::query("RELEASE report").execute(&mut *conn).await?;
                        *answer = Some(recorded);
                    }
                    Ok(answers
                        .into_iter()
                        .map(|answer| answer.unwrap_or(Err(StoreError::NotFound)))
                        .collect())
                })
            }),
        )
        .await
    }

    async fn release_expired_deliveries(&self, limit: u32) -> StoreResult<Vec<ReleasedDelivery>> {
        let (_, now_us) = self.now_and_micros();
        let limit = limit.max(1);
        // In a transaction (not one statement alone), so that `store.crash` can stop before
        // its commit.
        let rows = self
            .write(Lane::Bulk, move |conn| {
                Box::pin(async move {
                    let rows = DELIVERIES
                        .release_expired(conn, None, now_us, limit)
                        .await?;
                    crash::point_if(Step::DeliveryRelease, Phase::Before, !rows.is_empty());
                    Ok(rows)
                })
            })
            .await?;
        crash::point_if(Step::DeliveryRelease, Phase::After, !rows.is_empty());
        rows.into_iter()
            .map(|(id, org_id, _, status)| {
                Ok(ReleasedDelivery {
                    delivery_id: DeliveryId(id),
                    org_id,
                    status: status.parse().map_err(corrupt)?,
                })
            })
            .collect()
    }

    async fn next_delivery_due(&self) -> StoreResult<Option<OffsetDateTime>> {
        let (claimable, scheduled): (bool, Option<i64>) = sqlx::query_as(
            "SELECT EXISTS (SELECT 1 FROM deliveries INDEXED BY deliveries_claim \
               WHERE status = 'pending' AND scheduled = 0), \
             (SELECT MIN(run_at) FROM deliveries INDEXED BY deliveries_scheduled \
               WHERE status = 'pending' AND scheduled = 1)",
        )
        .fetch_one(&self.read)
        .await?;
        if claimable {
            return Ok(Some(self.clock.now()));
        }
        scheduled.map(from_micros).transpose()
    }

    async fn purge_finished_deliveries(
        &self,
        before: OffsetDateTime,
        limit: u32,
    ) -> StoreResult<u64> {
        let before_us = to_micros(before);
        let limit = limit.max(1);
        let purged = self
            .write(Lane::Bulk, move |conn| {
                Box::pin(async move {
                    let purged = DELIVERIES.purge_finished(conn, before_us, limit).await?;
                    // Throttled deliveries finished when they were folded; they go once their
                    // digest is gone too.
                    let throttled = sqlx::query(
                        "DELETE FROM deliveries WHERE id IN (SELECT t.id FROM deliveries t \
                     INDEXED BY deliveries_throttled WHERE t.status = 'throttled' \
                     AND t.finished_at < ?1 AND NOT EXISTS (SELECT 1 FROM deliveries d \
                     WHERE d.id = t.digest_id) LIMIT ?2)",
                    )
                    .bind(before_us)
                    .bind(i64::from(limit))
                    .execute(&mut *conn)
                    .await?
                    .rows_affected();
                    let purged = purged + throttled;
                    // Events older than the retention that no delivery refers to any more go too
                    // (their idempotency keys with them).
                    sqlx::query(
                        "DELETE FROM notification_events WHERE id IN (SELECT e.id FROM \
                     notification_events e WHERE e.created_at < ?1 AND NOT EXISTS \
                     (SELECT 1 FROM deliveries d WHERE d.event_id = e.id) LIMIT ?2)",
                    )
                    .bind(before_us)
                    .bind(i64::from(limit))
                    .execute(&mut *conn)
                    .await?;
                    crash::point_if(Step::Cleanup, Phase::Before, purged > 0);
                    Ok(purged)
                })
            })
            .await?;
        crash::point_if(Step::Cleanup, Phase::After, purged > 0);
        Ok(purged)
    }
}

/// Records one report on the writer's connection (see
/// [`NotificationStore::record_deliveries`]).
async fn record(
    conn: &mut SqliteConnection,
    worker: WorkerId,
    report: DeliveryReport,
    now: OffsetDateTime,
    now_us: i64,
) -> StoreResult<Delivery> {
    let DeliveryReport {
        id,
        claim_token,
        outcome,
    } = report;
    let org = org_of(conn, id).await?;
    let fence = Fence {
        org,
        agent: holder(worker),
        id: id.0,
        token: &claim_token,
    };
    match outcome {
        DeliveryOutcome::Delivered(detail) => {
            let row: DeliveryRow = DELIVERIES.complete(conn, fence, detail, now_us).await?;
            row.into_plain()
        }
        DeliveryOutcome::Failed(failure) => {
            let not_before_us = failure.not_before.map(to_micros);
            let row: DeliveryRow = DELIVERIES
                .fail(conn, fence, failure.detail, failure.retryable, now, now_us)
                .await?;
            let delivery = row.into_plain()?;
            let follow_up = match delivery.status {
                // A retryable failure with no attempt left: the delivery is given up where
                // everyone can see it, in the dead-letter list.
                DeliveryStatus::Failed if failure.retryable => Some(format!(
                    "UPDATE deliveries SET status = 'dead', dead_reason = \
                     '{ATTEMPTS_EXHAUSTED}' WHERE id = ?1 RETURNING {DELIVERY_COLUMNS}"
                )),
                // The receiver asked for a longer wait than the backoff.
                DeliveryStatus::Pending
                    if not_before_us.is_some_and(|at| at > to_micros(delivery.run_at)) =>
                {
                    Some(format!(
                        "UPDATE deliveries SET run_at = ?2 WHERE id = ?1 \
                         RETURNING {DELIVERY_COLUMNS}"
                    ))
                }
                _ => None,
            };
            match follow_up {
                Some(sql) => {
                    let row: DeliveryRow = sqlx::query_as(&sql)
                        .bind(id)
                        .bind(not_before_us)
                        .fetch_one(&mut *conn)
                        .await?;
                    row.into_plain()
                }
                None => Ok(delivery),
            }
        }
        DeliveryOutcome::Postponed(until) => {
            let claims = [(id.0, claim_token.clone())];
            let handed_back = DELIVERIES
                .hand_back(conn, org, holder(worker), &claims, now_us)
                .await?;
            if handed_back == 0 {
                return Err(StoreError::StaleClaim);
            }
            let row: DeliveryRow = sqlx::query_as(&format!(
                "UPDATE deliveries SET run_at = MAX(run_at, ?1), scheduled = 1 \
                 WHERE id = ?2 AND status = 'pending' RETURNING {DELIVERY_COLUMNS}"
            ))
            .bind(to_micros(until))
            .bind(id)
            .fetch_one(&mut *conn)
            .await?;
            row.into_plain()
        }
    }
}

/// The organisation of a delivery (the engine's fence names it); `NotFound` without one.
async fn org_of(conn: &mut SqliteConnection, id: DeliveryId) -> StoreResult<OrgId> {
    sqlx::query_scalar("SELECT org_id FROM deliveries WHERE id = ?")
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .ok_or(StoreError::NotFound)
}

#[cfg(test)]
mod query_plans {
    use super::super::query_plans::{plan, store};
    use super::*;

    /// Fails unless the plan reads an index of `deliveries` (or `notification_events`) and
    /// never scans the table nor sorts. The claim reads its partial index from the start, in
    /// claim order, and stops at its limit: every row of that index is claimable.
    fn assert_served(what: &str, lines: &[String]) {
        for line in lines {
            let reads_claim_index = what == "claim" && line.contains("INDEX deliveries_claim");
            assert!(
                reads_claim_index
                    || (!line.starts_with("SCAN deliveries")
                        && !line.starts_with("SCAN notification_")),
                "{what}: full scan: {line}\n{lines:#?}"
            );
            assert!(
                !line.contains("TEMP B-TREE"),
                "{what}: sorts rows: {line}\n{lines:#?}"
            );
        }
        assert!(
            lines
                .iter()
                .any(|l| l.contains("INDEX") || l.contains("PRIMARY KEY")),
            "{what}: uses no index\n{lines:#?}"
        );
    }

    #[tokio::test]
    async fn every_delivery_query_shape_is_served_by_an_index() {
        let (_dir, store) = store().await;
        let pool = store.pool();
        let shapes = [
            ("claim", CLAIM_CANDIDATES.to_owned(), 4),
            (
                "promote",
                "SELECT id FROM deliveries INDEXED BY deliveries_scheduled WHERE status = \
                 'pending' AND scheduled = 1 AND run_at <= ?1 ORDER BY run_at LIMIT 1000"
                    .to_owned(),
                1,
            ),
            (
                "release",
                "SELECT id FROM deliveries WHERE status = 'executing' AND lease_expires_at < ?1 \
                 AND (?2 IS NULL OR org_id = ?2) ORDER BY lease_expires_at LIMIT ?3"
                    .to_owned(),
                3,
            ),
            (
                "retention",
                "SELECT id FROM deliveries WHERE status IN ('completed', 'failed', \
                 'cancelled', 'dead') AND finished_at < ?1 ORDER BY finished_at LIMIT ?2"
                    .to_owned(),
                2,
            ),
            (
                "throttle lead",
                "SELECT id, created_at FROM deliveries INDEXED BY deliveries_throttle \
                 WHERE org_id = ?1 AND throttle_key = ?2 AND created_at > ?3 \
                 AND status <> 'throttled' AND digest_of IS NULL \
                 ORDER BY created_at DESC LIMIT 1"
                    .to_owned(),
                3,
            ),
            (
                "complete many",
                DELIVERIES.complete_many_sql(RECORDED_COLUMNS),
                3,
            ),
            (
                "digest of a lead",
                "SELECT id, status FROM deliveries WHERE digest_of = ?".to_owned(),
                1,
            ),
            (
                "an event's deliveries",
                format!(
                    "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE org_id = ? AND \
                     event_id = ? ORDER BY id"
                ),
                2,
            ),
        ];
        for (what, sql, params) in shapes {
            assert_served(what, &plan(pool, &sql, params).await);
        }
        for status in [false, true] {
            for event in [false, true] {
                for channel in [false, true] {
                    for cursor in [false, true] {
                        let filter = DeliveryFilter {
                            status: status.then_some(DeliveryStatus::Dead),
                            event_id: event.then(EventId::new),
                            channel_type: channel.then_some(ChannelType::Webhook),
                        };
                        let sql = list_sql(&filter, cursor, "id");
                        assert_served(&format!("list {filter:?}"), &plan(pool, &sql, 6).await);
                    }
                }
            }
        }
    }
}
