//! The delivery processor's side of the deliveries: claim, record, release, requeue and
//! retention, each a constant number of statements whatever the number of deliveries.
//!
//! Claims read the `deliveries_claim` partial index with `FOR UPDATE SKIP LOCKED`, so that the
//! workers of several keel processes never take the same delivery. Every report is fenced in
//! its statement's `WHERE` by the worker and the claim token: a stale one matches no row and
//! changes nothing. The attempt history is written in the statement that changes the status.

use std::collections::{HashMap, HashSet};
use std::sync::LazyLock;

use serde_json::Value;
use sqlx::types::Json;
use sqlx::{Connection, PgConnection, Postgres, QueryBuilder};
use time::OffsetDateTime;

use super::super::PgStore;
use super::push_filter;
use super::rows::{DELIVERY_COLUMNS, DeliveryRow, RECORDED_COLUMNS, RecordedRow};
use crate::backoff::retry_backoff;
use crate::common::{ATTEMPTS_EXHAUSTED, check_requeue_filter, corrupt};
use crate::crash::{self, Phase, Step};
use crate::error::{StoreError, StoreResult};
use crate::model::OrgId;
use crate::notifications::model::{
    ClaimedDelivery, Delivery, DeliveryFilter, DeliveryId, DeliveryOutcome, DeliveryReport,
    RecordedDelivery, ReleasedDelivery, WorkerId,
};
use crate::notifications::{MAX_DELIVERY_CLAIM, MAX_DELIVERY_REPORTS, MAX_REQUEUE};

/// `columns` (a list of column names), each qualified by the table alias `alias`.
fn qualified(columns: &str, alias: &str) -> String {
    columns
        .split(',')
        .map(|c| format!("{alias}.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Leases up to `$2` deliveries to the worker `$1` in one statement: the first claimable ones
/// of the claim index and the first due ones of the scheduled index (a backoff or a
/// postponement ended), best priority first, then earliest due, then by id. Each gets a new
/// token, one more attempt and an open attempt row.
pub(super) static CLAIM: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH ready AS (
            SELECT id, priority, run_at FROM deliveries
            WHERE status = 'pending' AND scheduled = 0
            ORDER BY priority DESC, run_at, id LIMIT $2
            FOR UPDATE SKIP LOCKED
        ), due AS (
            SELECT id, priority, run_at FROM deliveries
            WHERE status = 'pending' AND scheduled = 1 AND run_at <= keel_now()
            ORDER BY run_at LIMIT $2
            FOR UPDATE SKIP LOCKED
        ), picked AS (
            SELECT id FROM (SELECT * FROM ready UNION ALL SELECT * FROM due) AS c
            ORDER BY priority DESC, run_at, id LIMIT $2
        ), claimed AS (
            UPDATE deliveries d SET status = 'executing', scheduled = 0,
                attempts = d.attempts + 1,
                claim_token = replace(gen_random_uuid()::text, '-', ''),
                lease_expires_at = keel_now() + d.lease_duration_ms * interval '1 millisecond',
                claimed_by = $1, attempt_outcome = NULL, updated_at = keel_now()
            FROM picked WHERE d.id = picked.id AND d.status = 'pending'
            RETURNING {returning}
        ), opened AS (
            INSERT INTO delivery_attempts (delivery_id, attempt, agent_id, claimed_at)
            SELECT c.id, COALESCE((SELECT max(a.attempt) FROM delivery_attempts a
                                   WHERE a.delivery_id = c.id), 0) + 1,
                $1, c.updated_at
            FROM claimed c
        )
        SELECT {DELIVERY_COLUMNS} FROM claimed ORDER BY priority DESC, run_at, id",
        returning = qualified(DELIVERY_COLUMNS, "d"),
    )
});

/// Completes the deliveries `$1` (ids), `$2` (tokens) held by `$4`, with `$3` what the channel
/// reported; ends their attempts.
pub(super) static DELIVERED: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH r AS (
            SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[]) AS r (id, token, detail)
        ), done AS (
            UPDATE deliveries d SET status = 'completed', attempt_outcome = 'completed',
                result = r.detail, claim_token = NULL, lease_expires_at = NULL,
                finished_at = keel_now(), updated_at = keel_now()
            FROM r
            WHERE d.id = r.id AND d.status = 'executing' AND d.claim_token = r.token
              AND d.claimed_by = $4
            RETURNING {returning}, d.result AS detail
        ), ended AS (
            UPDATE delivery_attempts a SET ended_at = keel_now(), outcome = 'completed',
                error = done.detail
            FROM done WHERE a.delivery_id = done.id AND a.ended_at IS NULL
        )
        SELECT {RECORDED_COLUMNS} FROM done",
        returning = qualified(RECORDED_COLUMNS, "d"),
    )
});

/// Records failed attempts of the deliveries `$1` (ids), `$2` (tokens) held by `$7`: `$3` what
/// the channel reported, `$4` whether it is retryable, `$5` the backoff (µs), `$6` the
/// receiver's earliest retry (or NULL). Back to pending, scheduled after the backoff or at
/// that instant when later, while attempts are left and it is retryable; `dead`
/// (attempts exhausted) when they ran out; `failed` when it is not retryable.
pub(super) static FAILED: LazyLock<String> = LazyLock::new(|| {
    // Whether the delivery is tried again (read on the row as locked by the update).
    let again = "(r.retryable AND NOT d.cancel_requested AND d.attempts < d.max_attempts)";
    format!(
        "WITH r AS (
            SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::jsonb[], $4::bool[], $5::int8[],
                                 $6::timestamptz[])
                AS r (id, token, detail, retryable, backoff_us, not_before)
        ), failed AS (
            UPDATE deliveries d SET
                status = CASE WHEN d.cancel_requested THEN 'cancelled'
                              WHEN {again} THEN 'pending'
                              WHEN r.retryable THEN 'dead'
                              ELSE 'failed' END,
                dead_reason = CASE WHEN NOT d.cancel_requested AND r.retryable AND NOT {again}
                                   THEN '{ATTEMPTS_EXHAUSTED}' ELSE d.dead_reason END,
                run_at = CASE WHEN {again}
                              THEN GREATEST(keel_now() + r.backoff_us * interval '1 microsecond',
                                            r.not_before)
                              ELSE d.run_at END,
                finished_at = CASE WHEN {again} THEN NULL ELSE keel_now() END,
                scheduled = CASE WHEN {again} THEN 1 ELSE 0 END,
                attempt_outcome = CASE WHEN d.cancel_requested THEN 'cancelled'
                                       WHEN {again} THEN 'retry'
                                       ELSE 'failed' END,
                error = r.detail, claim_token = NULL, lease_expires_at = NULL,
                updated_at = keel_now()
            FROM r
            WHERE d.id = r.id AND d.status = 'executing' AND d.claim_token = r.token
              AND d.claimed_by = $7
            RETURNING {returning}, d.attempt_outcome, d.error AS detail
        ), ended AS (
            UPDATE delivery_attempts a SET ended_at = keel_now(),
                outcome = failed.attempt_outcome, error = failed.detail
            FROM failed WHERE a.delivery_id = failed.id AND a.ended_at IS NULL
        )
        SELECT {RECORDED_COLUMNS} FROM failed",
        returning = qualified(RECORDED_COLUMNS, "d"),
    )
});

/// Gives back the deliveries `$1` (ids), `$2` (tokens) held by `$4` without spending their
/// attempt: pending again with one attempt fewer, scheduled at `$3` (or their due time when
/// later), their open attempt deleted.
pub(super) static POSTPONED: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH r AS (
            SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::timestamptz[]) AS r (id, token, until)
        ), back AS (
            UPDATE deliveries d SET status = 'pending', attempts = d.attempts - 1,
                run_at = GREATEST(d.run_at, r.until), scheduled = 1, finished_at = NULL,
                attempt_outcome = 'handed_back', claim_token = NULL, lease_expires_at = NULL,
                updated_at = keel_now()
            FROM r
            WHERE d.id = r.id AND d.status = 'executing' AND d.claim_token = r.token
              AND d.claimed_by = $4 AND NOT d.cancel_requested
            RETURNING {returning}
        ), gone AS (
            DELETE FROM delivery_attempts a USING back
            WHERE a.delivery_id = back.id AND a.ended_at IS NULL
        )
        SELECT {RECORDED_COLUMNS} FROM back",
        returning = qualified(RECORDED_COLUMNS, "d"),
    )
});

/// Releases up to `$1` expired leases, earliest expiry first: back to pending, due now, or
/// `dead` (`lease_expired`) on their last attempt; their attempts end as `lease_expired`.
pub(super) const RELEASE: &str = "\
WITH picked AS (
    SELECT id FROM deliveries
    WHERE status = 'executing' AND lease_expires_at < keel_now()
    ORDER BY lease_expires_at LIMIT $1
    FOR UPDATE SKIP LOCKED
), released AS (
    UPDATE deliveries d SET
        status = CASE WHEN d.cancel_requested THEN 'cancelled'
                      WHEN d.attempts < d.max_attempts THEN 'pending'
                      ELSE 'dead' END,
        dead_reason = CASE WHEN NOT d.cancel_requested AND d.attempts >= d.max_attempts
                           THEN 'lease_expired' END,
        run_at = CASE WHEN NOT d.cancel_requested AND d.attempts < d.max_attempts
                      THEN keel_now() ELSE d.run_at END,
        finished_at = CASE WHEN NOT d.cancel_requested AND d.attempts < d.max_attempts
                           THEN NULL ELSE keel_now() END,
        scheduled = 0,
        attempt_outcome = CASE WHEN d.cancel_requested THEN 'cancelled'
                               ELSE 'lease_expired' END,
        claim_token = NULL, lease_expires_at = NULL, updated_at = keel_now()
    FROM picked WHERE d.id = picked.id AND d.status = 'executing'
    RETURNING d.id, d.org_id, d.status, d.attempt_outcome
), ended AS (
    UPDATE delivery_attempts a SET ended_at = keel_now(), outcome = released.attempt_outcome
    FROM released WHERE a.delivery_id = released.id AND a.ended_at IS NULL
)
SELECT id, org_id, status FROM released";

/// What a requeue sets (after `UPDATE deliveries SET`): pending, due now, attempts reset.
pub(super) const REQUEUE_SET: &str = "status = 'pending', attempts = 0, dead_reason = NULL, \
     run_at = keel_now(), scheduled = 0, finished_at = NULL, cancel_requested = false, \
     updated_at = keel_now()";

/// The attempts so far of the deliveries `$1`.
pub(super) const ATTEMPTS_SO_FAR: &str =
    "SELECT id, attempts FROM deliveries WHERE id = ANY($1::uuid[])";

/// Which of the deliveries `$1` exist.
pub(super) const EXISTING: &str = "SELECT id FROM deliveries WHERE id = ANY($1::uuid[])";

/// Puts back the dead or failed delivery `$2` of the organisation `$1`.
pub(super) static REQUEUE_ONE: LazyLock<String> = LazyLock::new(|| {
    format!(
        "UPDATE deliveries SET {REQUEUE_SET} \
         WHERE org_id = $1 AND id = $2 AND status IN ('dead', 'failed') \
         RETURNING {DELIVERY_COLUMNS}"
    )
});

/// Now when a delivery is claimable, else the earliest due time of a scheduled one.
pub(super) const NEXT_DUE: &str = "\
SELECT CASE WHEN EXISTS (SELECT 1 FROM deliveries WHERE status = 'pending' AND scheduled = 0)
            THEN keel_now()
            ELSE (SELECT min(run_at) FROM deliveries WHERE status = 'pending' AND scheduled = 1)
       END";

/// Deletes up to `$2` deliveries finished before `$1`, oldest first (their attempts with them).
pub(super) const PURGE_FINISHED: &str = "\
DELETE FROM deliveries WHERE id IN (
    SELECT id FROM deliveries
    WHERE status IN ('completed', 'failed', 'cancelled', 'dead') AND finished_at < $1
    ORDER BY finished_at LIMIT $2 FOR UPDATE SKIP LOCKED)";

/// Deletes up to `$2` throttled deliveries folded before `$1` whose digest is gone.
pub(super) const PURGE_THROTTLED: &str = "\
DELETE FROM deliveries WHERE id IN (
    SELECT t.id FROM deliveries t
    WHERE t.status = 'throttled' AND t.finished_at < $1
      AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.id = t.digest_id)
    ORDER BY t.finished_at LIMIT $2 FOR UPDATE OF t SKIP LOCKED)";

/// Deletes up to `$2` events triggered before `$1` that no delivery refers to any more (their
/// idempotency keys with them).
pub(super) const PURGE_EVENTS: &str = "\
DELETE FROM notification_events WHERE id IN (
    SELECT e.id FROM notification_events e
    WHERE e.created_at < $1 AND NOT EXISTS (SELECT 1 FROM deliveries d WHERE d.event_id = e.id)
    ORDER BY e.created_at LIMIT $2 FOR UPDATE OF e SKIP LOCKED)";

pub(super) async fn claim(
    store: &PgStore,
    worker: WorkerId,
    limit: u32,
) -> StoreResult<Vec<ClaimedDelivery>> {
    let limit = limit.clamp(1, MAX_DELIVERY_CLAIM);
    let claim = sqlx::query_as(&CLAIM).bind(worker).bind(i64::from(limit));
    let rows: Vec<DeliveryRow> =
        super::super::fetch_all_or_crash(&store.pool, Step::Send, claim).await?;
    rows.into_iter()
        .map(|row| {
            let (delivery, token) = row.into_delivery()?;
            let claim_token = token
                .ok_or_else(|| corrupt(format!("claimed delivery {} has no token", delivery.id)))?;
            Ok(ClaimedDelivery {
                delivery,
                claim_token,
            })
        })
        .collect()
}

/// The reports of one outcome, as the arrays their statement takes.
#[derive(Default)]
struct Reports<'a> {
    ids: Vec<uuid::Uuid>,
    tokens: Vec<&'a str>,
}

impl<'a> Reports<'a> {
    fn push(&mut self, report: &'a DeliveryReport) {
        self.ids.push(report.id.0);
        self.tokens.push(report.claim_token.as_str());
    }

    fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// The reports of a batch, split by outcome.
#[derive(Default)]
struct Batch<'a> {
    delivered: Reports<'a>,
    results: Vec<Json<&'a Value>>,
    failed: Reports<'a>,
    errors: Vec<Json<&'a Value>>,
    retryable: Vec<bool>,
    not_before: Vec<Option<OffsetDateTime>>,
    postponed: Reports<'a>,
    until: Vec<OffsetDateTime>,
}

impl<'a> Batch<'a> {
    fn of(reports: &'a [DeliveryReport]) -> Self {
        let mut batch = Self::default();
        for report in reports {
            match &report.outcome {
                DeliveryOutcome::Delivered(detail) => {
                    batch.delivered.push(report);
                    batch.results.push(Json(detail));
                }
                DeliveryOutcome::Failed(failure) => {
                    batch.failed.push(report);
                    batch.errors.push(Json(&failure.detail));
                    batch.retryable.push(failure.retryable);
                    batch.not_before.push(failure.not_before);
                }
                DeliveryOutcome::Postponed(until) => {
                    batch.postponed.push(report);
                    batch.until.push(*until);
                }
            }
        }
        batch
    }

    /// How many statements change rows.
    fn writes(&self) -> usize {
        [&self.delivered, &self.failed, &self.postponed]
            .iter()
            .filter(|r| !r.is_empty())
            .count()
    }
}

/// What the batch's statements changed, by outcome.
#[derive(Default)]
struct Applied {
    delivered: HashMap<DeliveryId, RecordedDelivery>,
    failed: HashMap<DeliveryId, RecordedDelivery>,
    postponed: HashMap<DeliveryId, RecordedDelivery>,
}

impl Applied {
    /// What `report` changed (once: the same report twice changed the delivery once).
    fn take(&mut self, report: &DeliveryReport) -> Option<RecordedDelivery> {
        let changed = match report.outcome {
            DeliveryOutcome::Delivered(_) => &mut self.delivered,
            DeliveryOutcome::Failed(_) => &mut self.failed,
            DeliveryOutcome::Postponed(_) => &mut self.postponed,
        };
        changed.remove(&report.id)
    }
}

fn by_id(rows: Vec<RecordedRow>) -> StoreResult<HashMap<DeliveryId, RecordedDelivery>> {
    rows.into_iter()
        .map(|row| Ok((row.id, row.into_recorded()?)))
        .collect()
}

/// Runs one statement per outcome present (`backoff_us`: the failed reports' backoffs).
async fn apply(
    conn: &mut PgConnection,
    worker: WorkerId,
    batch: &Batch<'_>,
    backoff_us: &[i64],
) -> StoreResult<Applied> {
    let mut applied = Applied::default();
    if !batch.delivered.is_empty() {
        let rows: Vec<RecordedRow> = sqlx::query_as(&DELIVERED)
            .bind(&batch.delivered.ids)
            .bind(&batch.delivered.tokens)
            .bind(&batch.results)
            .bind(worker)
            .fetch_all(&mut *conn)
            .await?;
        applied.delivered = by_id(rows)?;
    }
    if !batch.failed.is_empty() {
        let rows: Vec<RecordedRow> = sqlx::query_as(&FAILED)
            .bind(&batch.failed.ids)
            .bind(&batch.failed.tokens)
            .bind(&batch.errors)
            .bind(&batch.retryable)
            .bind(backoff_us)
            .bind(&batch.not_before)
            .bind(worker)
            .fetch_all(&mut *conn)
            .await?;
        applied.failed = by_id(rows)?;
    }
    if !batch.postponed.is_empty() {
        let rows: Vec<RecordedRow> = sqlx::query_as(&POSTPONED)
            .bind(&batch.postponed.ids)
            .bind(&batch.postponed.tokens)
            .bind(&batch.until)
            .bind(worker)
            .fetch_all(&mut *conn)
            .await?;
        applied.postponed = by_id(rows)?;
    }
    Ok(applied)
}

/// The engine's backoff for each failed report, from its delivery's attempts so far (0 for a
/// delivery that is not there: its report is refused anyway).
async fn backoffs(conn: &mut PgConnection, failed: &Reports<'_>) -> StoreResult<Vec<i64>> {
    if failed.is_empty() {
        return Ok(Vec::new());
    }
    // Read before the update: the attempts change only with a new claim, which changes the
    // token too, and the update's fence then refuses the report.
    let attempts: HashMap<uuid::Uuid, i32> = sqlx::query_as(ATTEMPTS_SO_FAR)
        .bind(&failed.ids)
        .fetch_all(&mut *conn)
        .await?
        .into_iter()
        .collect();
    let mut rng = rand::rng();
    Ok(failed
        .ids
        .iter()
        .map(|id| {
            let attempts = attempts.get(id).copied().unwrap_or(0);
            let delay = retry_backoff(u32::try_from(attempts).unwrap_or(0), &mut rng);
            i64::try_from(delay.as_micros()).unwrap_or(i64::MAX)
        })
        .collect())
}

pub(super) async fn record(
    store: &PgStore,
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
    let batch = Batch::of(&reports);
    let mut conn = store.pool.acquire().await?;
    let backoff_us = backoffs(&mut conn, &batch.failed).await?;
    let mut applied = if batch.writes() > 1 {
        let mut tx = conn.begin().await?;
        let applied = apply(&mut tx, worker, &batch, &backoff_us).await?;
        tx.commit().await?;
        applied
    } else {
        // One statement: atomic on its own.
        apply(&mut conn, worker, &batch, &backoff_us).await?
    };
    let mut answers: Vec<Option<RecordedDelivery>> =
        reports.iter().map(|report| applied.take(report)).collect();
    // A report that changed nothing: stale, or about no delivery at all.
    let refused: Vec<uuid::Uuid> = reports
        .iter()
        .zip(&answers)
        .filter(|(_, answer)| answer.is_none())
        .map(|(report, _)| report.id.0)
        .collect();
    let existing: HashSet<DeliveryId> = if refused.is_empty() {
        HashSet::new()
    } else {
        sqlx::query_scalar(EXISTING)
            .bind(&refused)
            .fetch_all(&mut *conn)
            .await?
            .into_iter()
            .collect()
    };
    Ok(reports
        .iter()
        .zip(answers.iter_mut())
        .map(|(report, answer)| match answer.take() {
            Some(recorded) => Ok(recorded),
            None if existing.contains(&report.id) => Err(StoreError::StaleClaim),
            None => Err(StoreError::NotFound),
        })
        .collect())
}

pub(super) async fn release_expired(
    store: &PgStore,
    limit: u32,
) -> StoreResult<Vec<ReleasedDelivery>> {
    let release = sqlx::query_as(RELEASE).bind(i64::from(limit.max(1)));
    let rows: Vec<(DeliveryId, OrgId, String)> =
        super::super::fetch_all_or_crash(&store.pool, Step::DeliveryRelease, release).await?;
    rows.into_iter()
        .map(|(delivery_id, org_id, status)| {
            Ok(ReleasedDelivery {
                delivery_id,
                org_id,
                status: status.parse().map_err(corrupt)?,
            })
        })
        .collect()
}

pub(super) async fn next_due(store: &PgStore) -> StoreResult<Option<OffsetDateTime>> {
    Ok(sqlx::query_scalar(NEXT_DUE).fetch_one(&store.pool).await?)
}

pub(super) async fn requeue_one(
    store: &PgStore,
    org: OrgId,
    id: DeliveryId,
) -> StoreResult<Delivery> {
    let mut conn = store.pool.acquire().await?;
    let row: Option<DeliveryRow> = sqlx::query_as(&REQUEUE_ONE)
        .bind(org)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
    if let Some(row) = row {
        return row.into_plain();
    }
    let status: Option<String> =
        sqlx::query_scalar("SELECT status FROM deliveries WHERE org_id = $1 AND id = $2")
            .bind(org)
            .bind(id)
            .fetch_optional(&mut *conn)
            .await?;
    Err(match status {
        Some(status) => StoreError::InvalidState(format!("it is {status}: it cannot be requeued")),
        None => StoreError::NotFound,
    })
}

pub(super) async fn requeue_many(
    store: &PgStore,
    org: OrgId,
    filter: DeliveryFilter,
) -> StoreResult<u64> {
    check_requeue_filter(&filter)?;
    Ok(requeue_query(org, &filter)
        .build()
        .execute(&store.pool)
        .await?
        .rows_affected())
}

/// Requeues up to [`MAX_REQUEUE`] dead or failed deliveries of the organisation that match
/// `filter`, newest first.
pub(super) fn requeue_query(
    org: OrgId,
    filter: &DeliveryFilter,
) -> QueryBuilder<'static, Postgres> {
    let mut query = QueryBuilder::<Postgres>::new(format!(
        "UPDATE deliveries SET {REQUEUE_SET} WHERE status IN ('dead', 'failed') AND id IN \
         (SELECT id FROM deliveries WHERE org_id = "
    ));
    query.push_bind(org);
    push_filter(&mut query, filter, None);
    if filter.status.is_none() {
        query.push(" AND status IN ('dead', 'failed')");
    }
    query
        .push(" ORDER BY id DESC LIMIT ")
        .push_bind(i64::from(MAX_REQUEUE))
        .push(" FOR UPDATE SKIP LOCKED)");
    query
}

pub(super) async fn purge_finished(
    store: &PgStore,
    before: OffsetDateTime,
    limit: u32,
) -> StoreResult<u64> {
    let limit = i64::from(limit.max(1));
    let mut tx = store.pool.begin().await?;
    let finished = sqlx::query(PURGE_FINISHED)
        .bind(before)
        .bind(limit)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    let throttled = sqlx::query(PURGE_THROTTLED)
        .bind(before)
        .bind(limit)
        .execute(&mut *tx)
        .await?
        .rows_affected();
    sqlx::query(PURGE_EVENTS)
        .bind(before)
        .bind(limit)
        .execute(&mut *tx)
        .await?;
    crash::point_if(Step::Cleanup, Phase::Before, finished + throttled > 0);
    tx.commit().await?;
    crash::point_if(Step::Cleanup, Phase::After, finished + throttled > 0);
    Ok(finished + throttled)
}
