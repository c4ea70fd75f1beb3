//! Notification settings, events and deliveries (the lease engine's second table).
//!
//! - this file: settings, triggers (an event and its deliveries, throttled into digests) and
//!   the reads;
//! - `lease`: the processor's side: claim, record, release, requeue, retention;
//! - `rows`: the rows as PostgreSQL returns them.
//!
//! A delivery's `claimed_by` is the processor worker holding its lease (no foreign key). The
//! attempt history is written by the statement that changes a delivery's status, in the same
//! statement.

mod lease;
#[cfg(test)]
mod query_plans;
mod rows;

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use async_trait::async_trait;
use sqlx::types::Json;
use sqlx::{Connection, FromRow, PgConnection, Postgres, QueryBuilder, Row};
use time::OffsetDateTime;

use super::PgStore;
use crate::common::{
    DeliveryKeys, check_new_setting, check_trigger, conflict_as, delivery_keys, duration_millis,
    found, missing_as, page_of, setting_taken,
};
use crate::crash::{self, Step};
use crate::error::{StoreError, StoreResult};
use crate::model::{Idempotency, OrgId};
use crate::notifications::NotificationStore;
use crate::notifications::model::{
    ClaimedDelivery, Delivery, DeliveryAttempt, DeliveryFilter, DeliveryId, DeliveryPage,
    DeliveryReport, Event, NewDelivery, NewEvent, NewSetting, RecordedDelivery, ReleasedDelivery,
    Setting, SettingId, SettingKind, Triggered, WorkerId,
};
use crate::store::MAX_PAGE_SIZE;
use rows::{
    DELIVERY_COLUMNS, DeliveryAttemptRow, DeliveryRow, EVENT_COLUMNS, EventRow, SETTING_COLUMNS,
    SettingRow,
};

/// The class of the advisory locks that serialise the triggers of one throttle key (the
/// second key is the hash of the organisation and the throttle key): ASCII `thrt`.
const THROTTLE_LOCK_CLASS: i32 = 0x7468_7274;

/// Records an event and its deliveries in one statement: the event (nothing when its
/// idempotency key is taken), then each delivery sent alone or throttled into its lead's
/// digest, the digest created on the first fold. Answers one row per delivery created (or one
/// with no delivery when none was), each with the event's `event_created_at`; no row at all
/// when the idempotency key was taken.
///
/// `$1` event id, `$2` organisation, `$3` event type, `$4` payload, `$5` domain, `$6`
/// severity, `$7` idempotency key, `$8` request hash; then one array element per delivery:
/// `$9` id, `$10` id of the digest it would create, `$11` channel id, `$12` channel type,
/// `$13` recipient, `$14` subject, `$15` body, `$16` priority, `$17` max attempts, `$18` lease
/// (ms), `$19` throttle window (ms, 0 for none), `$20` dedupe key, `$21` throttle key.
///
/// Within one event, two deliveries with the same throttle key have the same dedupe key, and
/// only the first is given: no two deliveries of one statement share a lead or a digest.
const TRIGGER: &str = "\
WITH ev AS (
    INSERT INTO notification_events (id, org_id, event_type, payload, domain, severity,
        idempotency_key, request_hash, created_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, keel_now())
    ON CONFLICT (org_id, idempotency_key) DO NOTHING
    RETURNING id, created_at
), n AS (
    SELECT * FROM UNNEST($9::uuid[], $10::uuid[], $11::uuid[], $12::text[], $13::text[],
        $14::text[], $15::text[], $16::int4[], $17::int4[], $18::int8[], $19::int8[],
        $20::text[], $21::text[])
    AS n (id, digest_id, channel_id, channel_type, recipient, subject, body, priority,
        max_attempts, lease_ms, window_ms, dedupe_key, throttle_key)
), t AS (
    SELECT n.*, lead.id AS lead_id, lead.created_at AS lead_at, lead.event_id AS lead_event,
        lead.event_type AS lead_type, lead.severity AS lead_severity,
        dg.id AS open_digest, dg.status AS digest_status
    FROM n
    LEFT JOIN LATERAL (
        SELECT d.id, d.created_at, d.event_id, d.event_type, d.severity FROM deliveries d
        WHERE n.window_ms > 0 AND d.org_id = $2 AND d.throttle_key = n.throttle_key
          AND d.created_at > keel_now() - n.window_ms * interval '1 millisecond'
          AND d.status <> 'throttled' AND d.digest_of IS NULL
        ORDER BY d.created_at DESC LIMIT 1
    ) lead ON true
    LEFT JOIN deliveries dg ON dg.digest_of = lead.id
), folds AS (
    SELECT t.*, CASE
        WHEN t.open_digest IS NOT NULL AND t.digest_status = 'pending' THEN t.open_digest
        WHEN t.lead_id IS NOT NULL AND t.open_digest IS NULL THEN t.digest_id
    END AS fold_into
    FROM t
), digests AS (
    INSERT INTO deliveries (id, org_id, status, run_at, scheduled, priority, max_attempts,
        lease_duration_ms, created_at, updated_at, event_id, event_type, severity, channel_id,
        channel_type, recipient, subject, body, dedupe_key, throttle_key, digest_of)
    SELECT f.digest_id, $2, 'pending', f.lead_at + f.window_ms * interval '1 millisecond', 1,
        f.priority, f.max_attempts, f.lease_ms, keel_now(), keel_now(), f.lead_event,
        f.lead_type, f.lead_severity, f.channel_id, f.channel_type, f.recipient,
        'digest of ' || f.lead_type, '', f.lead_id::text || '/digest', f.throttle_key, f.lead_id
    FROM folds f CROSS JOIN ev
    WHERE f.lead_id IS NOT NULL AND f.open_digest IS NULL
), ins AS (
    INSERT INTO deliveries (id, org_id, status, run_at, priority, max_attempts,
        lease_duration_ms, created_at, updated_at, finished_at, event_id, event_type, severity,
        channel_id, channel_type, recipient, subject, body, dedupe_key, throttle_key, digest_id)
    SELECT f.id, $2, CASE WHEN f.fold_into IS NULL THEN 'pending' ELSE 'throttled' END,
        keel_now(), f.priority, f.max_attempts, f.lease_ms, keel_now(), keel_now(),
        CASE WHEN f.fold_into IS NULL THEN NULL ELSE keel_now() END, ev.id, $3, $6,
        f.channel_id, f.channel_type, f.recipient, f.subject, f.body, f.dedupe_key,
        f.throttle_key, f.fold_into
    FROM folds f CROSS JOIN ev
    ON CONFLICT (org_id, dedupe_key) DO NOTHING
    RETURNING *
)
SELECT ev.created_at AS event_created_at, ins.* FROM ev LEFT JOIN ins ON true";

/// Takes the advisory locks of throttle keys (`$2` organisation, `$3` the keys) in one order,
/// so that two triggers of one key do not both open its window or its digest.
const LOCK_THROTTLES: &str = "\
SELECT pg_advisory_xact_lock($1, h) FROM (
    SELECT DISTINCT hashtext($2::text || '/' || k) AS h FROM unnest($3::text[]) AS k ORDER BY h
) AS keys";

/// The deliveries of the event `$2` of the organisation `$1`, oldest first.
static EVENT_DELIVERIES: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE org_id = $1 AND event_id = $2 \
         ORDER BY id"
    )
});

/// The deliveries folded into the digest `$1` of the organisation `$2`, oldest first.
static DIGESTED: LazyLock<String> = LazyLock::new(|| {
    format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE digest_id = $1 AND org_id = $2 \
         ORDER BY created_at, id"
    )
});

/// The attempts at the delivery `$2` of the organisation `$1`, first first.
const ATTEMPTS: &str = "\
SELECT a.attempt, a.agent_id, a.claimed_at, a.ended_at, a.outcome, a.error
FROM delivery_attempts a JOIN deliveries d ON d.id = a.delivery_id
WHERE d.org_id = $1 AND d.id = $2 ORDER BY a.attempt";

/// The deliveries of a trigger as the statement's arrays, in order, each dedupe key once.
#[derive(Default)]
struct NewDeliveries {
    ids: Vec<uuid::Uuid>,
    digest_ids: Vec<uuid::Uuid>,
    channel_ids: Vec<Option<uuid::Uuid>>,
    channel_types: Vec<&'static str>,
    recipients: Vec<String>,
    subjects: Vec<String>,
    bodies: Vec<String>,
    priorities: Vec<i32>,
    max_attempts: Vec<i32>,
    lease_ms: Vec<i64>,
    window_ms: Vec<i64>,
    dedupe_keys: Vec<String>,
    throttle_keys: Vec<String>,
}

impl NewDeliveries {
    fn of(event: &NewEvent, deliveries: Vec<NewDelivery>) -> Self {
        let mut new = Self::default();
        let mut seen = HashSet::new();
        for delivery in deliveries {
            let DeliveryKeys { dedupe, throttle } =
                delivery_keys(event.id, &event.event_type, &delivery);
            if !seen.insert(dedupe.clone()) {
                continue;
            }
            // The digest's id is drawn first: ids are v7, and a digest is older than the
            // delivery whose fold creates it.
            new.digest_ids.push(DeliveryId::new().0);
            new.ids.push(DeliveryId::new().0);
            new.channel_ids.push(delivery.channel_id.map(|c| c.0));
            new.channel_types.push(delivery.channel_type.as_str());
            new.recipients.push(delivery.recipient);
            new.subjects.push(delivery.subject);
            new.bodies.push(delivery.body);
            new.priorities.push(delivery.priority);
            new.max_attempts
                .push(i32::try_from(delivery.max_attempts).unwrap_or(i32::MAX));
            new.lease_ms.push(duration_millis(delivery.lease_duration));
            new.window_ms
                .push(delivery.throttle.map_or(0, duration_millis).max(0));
            new.dedupe_keys.push(dedupe);
            new.throttle_keys.push(throttle);
        }
        new
    }

    /// The throttle keys of the deliveries that have a throttle window.
    fn throttled_keys(&self) -> Vec<&str> {
        self.throttle_keys
            .iter()
            .zip(&self.window_ms)
            .filter(|(_, window)| **window > 0)
            .map(|(key, _)| key.as_str())
            .collect()
    }
}

/// Runs [`TRIGGER`]: the event's creation time and the deliveries created, in the trigger's
/// order; `None` when the idempotency key is taken.
async fn insert_event(
    conn: &mut PgConnection,
    org: OrgId,
    event: &NewEvent,
    new: NewDeliveries,
) -> StoreResult<Option<(OffsetDateTime, Vec<Delivery>)>> {
    let rows = sqlx::query(TRIGGER)
        .bind(event.id)
        .bind(org)
        .bind(&event.event_type)
        .bind(Json(&event.payload))
        .bind(&event.domain)
        .bind(event.severity.as_str())
        .bind(event.idempotency.as_ref().map(|i| i.key.as_str()))
        .bind(event.idempotency.as_ref().map(|i| i.request_hash.as_str()))
        .bind(&new.ids)
        .bind(&new.digest_ids)
        .bind(&new.channel_ids)
        .bind(&new.channel_types)
        .bind(&new.recipients)
        .bind(&new.subjects)
        .bind(&new.bodies)
        .bind(&new.priorities)
        .bind(&new.max_attempts)
        .bind(&new.lease_ms)
        .bind(&new.window_ms)
        .bind(&new.dedupe_keys)
        .bind(&new.throttle_keys)
        .fetch_all(&mut *conn)
        .await
        .map_err(|err| missing_as(StoreError::from(err), StoreError::NotFound))?;
    let mut created_at = None;
    let mut created = Vec::with_capacity(rows.len());
    for row in rows {
        created_at = Some(row.try_get::<OffsetDateTime, _>("event_created_at")?);
        if row.try_get::<Option<DeliveryId>, _>("id")?.is_some() {
            created.push(DeliveryRow::from_row(&row)?.into_plain()?);
        }
    }
    let order: HashMap<uuid::Uuid, usize> =
        new.ids.iter().enumerate().map(|(n, id)| (*id, n)).collect();
    created.sort_by_key(|d| order.get(&d.id.0).copied().unwrap_or(usize::MAX));
    Ok(created_at.map(|at| (at, created)))
}

/// The answer to a trigger whose idempotency key was seen before.
async fn replay(conn: &mut PgConnection, org: OrgId, idem: &Idempotency) -> StoreResult<Triggered> {
    let existing: Option<EventRow> = sqlx::query_as(&format!(
        "SELECT {EVENT_COLUMNS} FROM notification_events \
         WHERE org_id = $1 AND idempotency_key = $2"
    ))
    .bind(org)
    .bind(&idem.key)
    .fetch_optional(&mut *conn)
    .await?;
    // Taken, then gone: retention removed the event in between.
    let existing = existing.ok_or_else(|| {
        StoreError::Busy("the idempotency key's event was being removed".to_owned())
    })?;
    if existing.request_hash.as_deref() != Some(idem.request_hash.as_str()) {
        return Err(StoreError::IdempotencyMismatch);
    }
    let event = existing.into_event()?;
    let rows: Vec<DeliveryRow> = sqlx::query_as(&EVENT_DELIVERIES)
        .bind(org)
        .bind(event.id)
        .fetch_all(&mut *conn)
        .await?;
    Ok(Triggered {
        event,
        deliveries: rows
            .into_iter()
            .map(DeliveryRow::into_plain)
            .collect::<StoreResult<_>>()?,
        created: false,
    })
}

/// Appends `AND …` for each condition of `filter` (and the cursor) to a statement on
/// `deliveries` whose `WHERE` names the organisation.
fn push_filter(
    query: &mut QueryBuilder<'_, Postgres>,
    filter: &DeliveryFilter,
    cursor: Option<DeliveryId>,
) {
    if let Some(status) = filter.status {
        query.push(" AND status = ").push_bind(status.as_str());
    }
    if let Some(event) = filter.event_id {
        query.push(" AND event_id = ").push_bind(event);
    }
    if let Some(channel) = filter.channel_type {
        query
            .push(" AND channel_type = ")
            .push_bind(channel.as_str());
    }
    if let Some(cursor) = cursor {
        query.push(" AND id < ").push_bind(cursor);
    }
}

/// A page of the organisation's deliveries, newest first: `limit` rows at most.
fn list_query(
    org: OrgId,
    filter: &DeliveryFilter,
    cursor: Option<DeliveryId>,
    limit: i64,
) -> QueryBuilder<'static, Postgres> {
    let mut query = QueryBuilder::new(format!(
        "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE org_id = "
    ));
    query.push_bind(org);
    push_filter(&mut query, filter, cursor);
    query.push(" ORDER BY id DESC LIMIT ").push_bind(limit);
    query
}

#[async_trait]
impl NotificationStore for PgStore {
    async fn create_setting(
        &self,
        org: OrgId,
        kind: SettingKind,
        setting: NewSetting,
    ) -> StoreResult<Setting> {
        check_new_setting(&setting)?;
        let row: SettingRow = sqlx::query_as(&format!(
            "INSERT INTO notification_settings (id, org_id, kind, name, unique_key, body, \
               sealed_secret, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, keel_now(), keel_now()) \
             RETURNING {SETTING_COLUMNS}"
        ))
        .bind(SettingId::new())
        .bind(org)
        .bind(kind.as_str())
        .bind(&setting.name)
        .bind(&setting.unique_key)
        .bind(Json(&setting.body))
        .bind(setting.sealed_secret.as_ref().map(|s| s.0.as_slice()))
        .fetch_one(&self.pool)
        .await
        .map_err(|err| {
            let err = missing_as(StoreError::from(err), StoreError::NotFound);
            conflict_as(err, setting_taken(kind, setting.unique_key.as_deref()))
        })?;
        row.into_setting()
    }

    async fn get_setting(
        &self,
        org: OrgId,
        kind: SettingKind,
        id: SettingId,
    ) -> StoreResult<Option<Setting>> {
        let row: Option<SettingRow> = sqlx::query_as(&format!(
            "SELECT {SETTING_COLUMNS} FROM notification_settings \
             WHERE org_id = $1 AND kind = $2 AND id = $3"
        ))
        .bind(org)
        .bind(kind.as_str())
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(SettingRow::into_setting).transpose()
    }

    async fn list_settings(&self, org: OrgId, kind: SettingKind) -> StoreResult<Vec<Setting>> {
        let rows: Vec<SettingRow> = sqlx::query_as(&format!(
            "SELECT {SETTING_COLUMNS} FROM notification_settings \
             WHERE org_id = $1 AND kind = $2 ORDER BY created_at, id"
        ))
        .bind(org)
        .bind(kind.as_str())
        .fetch_all(&self.pool)
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
        let row: Option<SettingRow> = sqlx::query_as(&format!(
            "UPDATE notification_settings SET name = $1, unique_key = $2, body = $3, \
               sealed_secret = COALESCE($4, sealed_secret), updated_at = keel_now() \
             WHERE org_id = $5 AND kind = $6 AND id = $7 RETURNING {SETTING_COLUMNS}"
        ))
        .bind(&setting.name)
        .bind(&setting.unique_key)
        .bind(Json(&setting.body))
        .bind(setting.sealed_secret.as_ref().map(|s| s.0.as_slice()))
        .bind(org)
        .bind(kind.as_str())
        .bind(id)
        .fetch_optional(&self.pool)
        .await
        .map_err(|err| {
            conflict_as(
                StoreError::from(err),
                setting_taken(kind, setting.unique_key.as_deref()),
            )
        })?;
        row.ok_or(StoreError::NotFound)?.into_setting()
    }

    async fn delete_setting(
        &self,
        org: OrgId,
        kind: SettingKind,
        id: SettingId,
    ) -> StoreResult<()> {
        let done = sqlx::query(
            "DELETE FROM notification_settings WHERE org_id = $1 AND kind = $2 AND id = $3",
        )
        .bind(org)
        .bind(kind.as_str())
        .bind(id)
        .execute(&self.pool)
        .await?;
        found(done.rows_affected())
    }

    async fn trigger(
        &self,
        org: OrgId,
        event: NewEvent,
        deliveries: Vec<NewDelivery>,
    ) -> StoreResult<Triggered> {
        crash::around(Step::Enqueue, async move {
            check_trigger(&event, &deliveries)?;
            let new = NewDeliveries::of(&event, deliveries);
            let throttled: Vec<String> = new
                .throttled_keys()
                .into_iter()
                .map(str::to_owned)
                .collect();
            let mut conn = self.pool.acquire().await?;
            let inserted = if throttled.is_empty() {
                // One statement: atomic on its own.
                insert_event(&mut conn, org, &event, new).await?
            } else {
                // The throttle keys' locks are held until the commit: a trigger of the same key
                // waits, then sees this one's lead or digest.
                let mut tx = conn.begin().await?;
                sqlx::query(LOCK_THROTTLES)
                    .bind(THROTTLE_LOCK_CLASS)
                    .bind(org)
                    .bind(&throttled)
                    .execute(&mut *tx)
                    .await?;
                let inserted = insert_event(&mut tx, org, &event, new).await?;
                tx.commit().await?;
                inserted
            };
            match (inserted, &event.idempotency) {
                (Some((created_at, deliveries)), _) => Ok(Triggered {
                    event: Event {
                        id: event.id,
                        org_id: org,
                        event_type: event.event_type,
                        payload: event.payload,
                        domain: event.domain,
                        severity: event.severity,
                        idempotency_key: event.idempotency.map(|i| i.key),
                        created_at,
                    },
                    deliveries,
                    created: true,
                }),
                (None, Some(idem)) => replay(&mut conn, org, idem).await,
                (None, None) => Err(crate::common::corrupt(
                    "an event without an idempotency key was not recorded",
                )),
            }
        })
        .await
    }

    async fn get_delivery(&self, org: OrgId, id: DeliveryId) -> StoreResult<Option<Delivery>> {
        let row: Option<DeliveryRow> = sqlx::query_as(&format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries WHERE org_id = $1 AND id = $2"
        ))
        .bind(org)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        row.map(DeliveryRow::into_plain).transpose()
    }

    async fn list_delivery_attempts(
        &self,
        org: OrgId,
        id: DeliveryId,
    ) -> StoreResult<Vec<DeliveryAttempt>> {
        let rows: Vec<DeliveryAttemptRow> = sqlx::query_as(ATTEMPTS)
            .bind(org)
            .bind(id)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter()
            .map(DeliveryAttemptRow::into_attempt)
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
        let rows: Vec<DeliveryRow> = list_query(org, &filter, cursor, i64::from(limit) + 1)
            .build_query_as()
            .fetch_all(&self.pool)
            .await?;
        let items = rows
            .into_iter()
            .map(DeliveryRow::into_plain)
            .collect::<StoreResult<Vec<_>>>()?;
        let (items, next_cursor) = page_of(items, limit, |d| d.id);
        Ok(DeliveryPage { items, next_cursor })
    }

    async fn list_digested(&self, org: OrgId, digest: DeliveryId) -> StoreResult<Vec<Delivery>> {
        let rows: Vec<DeliveryRow> = sqlx::query_as(&DIGESTED)
            .bind(digest)
            .bind(org)
            .fetch_all(&self.pool)
            .await?;
        rows.into_iter().map(DeliveryRow::into_plain).collect()
    }

    async fn requeue_delivery(&self, org: OrgId, id: DeliveryId) -> StoreResult<Delivery> {
        crash::around(Step::DeliveryRequeue, lease::requeue_one(self, org, id)).await
    }

    async fn requeue_deliveries(&self, org: OrgId, filter: DeliveryFilter) -> StoreResult<u64> {
        crash::around(
            Step::DeliveryRequeue,
            lease::requeue_many(self, org, filter),
        )
        .await
    }

    async fn claim_deliveries(
        &self,
        worker: WorkerId,
        limit: u32,
    ) -> StoreResult<Vec<ClaimedDelivery>> {
        lease::claim(self, worker, limit).await
    }

    async fn record_deliveries(
        &self,
        worker: WorkerId,
        reports: Vec<DeliveryReport>,
    ) -> StoreResult<Vec<StoreResult<RecordedDelivery>>> {
        crash::around(Step::Record, lease::record(self, worker, reports)).await
    }

    async fn release_expired_deliveries(&self, limit: u32) -> StoreResult<Vec<ReleasedDelivery>> {
        lease::release_expired(self, limit).await
    }

    async fn next_delivery_due(&self) -> StoreResult<Option<OffsetDateTime>> {
        lease::next_due(self).await
    }

    async fn purge_finished_deliveries(
        &self,
        before: OffsetDateTime,
        limit: u32,
    ) -> StoreResult<u64> {
        lease::purge_finished(self, before, limit).await
    }
}
