//! The lease engine: claim, heartbeat, complete, fail with backoff, release of expired leases,
//! dead letters, requeue, hand-back, attempt history and retention, written once for every
//! table whose rows are leased to workers.
//!
//! A leased table has these columns, by these names: `id`, `org_id`, `status` (`pending`,
//! `executing`, `completed`, `failed`, `cancelled`, `dead`), `run_at`, `priority`, `attempts`,
//! `max_attempts`, `lease_duration_ms`, `claim_token`, `lease_expires_at`, `claimed_by`,
//! `progress`, `result`, `error`, `dead_reason`, `cancel_requested`, `attempt_outcome`,
//! `updated_at`, `finished_at`. Its attempts table has `(owner, attempt)` as key and `agent_id`,
//! `claimed_at`, `ended_at`, `outcome`, `error`.
//!
//! Every change of a row is one statement (a read may come before it), so the writer needs no
//! savepoint around it. The attempts are kept by the table's triggers (in its migration), from
//! the `attempt_outcome` each statement sets: a claim opens an attempt; a report, a release or
//! a cancel ends it; a hand-back deletes it. Every function runs on the writer's connection, so
//! a read followed by a write here sees no other writer in between. Fencing is by conditional
//! `UPDATE`: `status = 'executing' AND claim_token = ? AND claimed_by = ?`.

use serde_json::Value;
use sqlx::sqlite::SqliteRow;
use sqlx::types::Json;
use sqlx::{FromRow, SqliteConnection};

use crate::backoff::retry_backoff;
use crate::error::{StoreError, StoreResult};
use crate::model::{AgentId, ClaimToken, OrgId};

/// A table whose rows are leased (its attempts are kept by its triggers).
#[derive(Debug)]
pub(super) struct LeaseTable {
    /// The leased table.
    pub(super) table: &'static str,
    /// The columns a row type reads, in its order.
    pub(super) columns: &'static str,
    /// Added to the retention purge's condition (` AND …`, or empty): the finished rows it
    /// must keep all the same.
    pub(super) keep: &'static str,
}

/// What a fenced report names: the row, the holder and its token.
#[derive(Debug, Clone, Copy)]
pub(super) struct Fence<'a> {
    pub(super) org: OrgId,
    pub(super) agent: AgentId,
    pub(super) id: uuid::Uuid,
    pub(super) token: &'a ClaimToken,
}

/// What a claim asks for.
#[derive(Debug, Clone, Copy)]
pub(super) struct Claim<'a> {
    /// `SELECT id …` of the candidates, in claim order (see [`LeaseTable::claim`]).
    pub(super) candidates: &'a str,
    pub(super) org: OrgId,
    pub(super) agent: AgentId,
    /// Bound from `?10` on.
    pub(super) extra: &'a [String],
    pub(super) now_us: i64,
    pub(super) limit: u32,
}

/// One released row: id, organisation, attempts, new status.
pub(super) type ReleasedRow = (uuid::Uuid, OrgId, i64, String);

impl LeaseTable {
    /// Leases up to `limit` rows among `candidates` (a `SELECT id …` in claim order, which may
    /// use the numbered parameters `?1` agent, `?2` organisation, `?3` now, `?4` limit, and
    /// `?10` onwards for `extra`) to `agent`, each with a new token and one more attempt, and
    /// opens an attempt for each.
    ///
    /// The new attempt has no outcome yet: a `handed_back` left by an earlier claim must not
    /// stay on the row, where the trigger that drops a handed-back attempt would take it for
    /// this attempt's at the next update of the status that keeps it `executing` (a cancel
    /// request).
    pub(super) async fn claim<R>(
        &self,
        conn: &mut SqliteConnection,
        claim: Claim<'_>,
    ) -> StoreResult<Vec<R>>
    where
        R: for<'r> FromRow<'r, SqliteRow> + Send + Unpin,
    {
        let Claim {
            candidates,
            org,
            agent,
            extra,
            now_us,
            limit,
        } = claim;
        let Self { table, columns, .. } = self;
        let sql = format!(
            "UPDATE {table} SET \
               status = 'executing', attempts = attempts + 1, attempt_outcome = NULL, \
               claim_token = lower(hex(randomblob(16))), \
               lease_expires_at = ?3 + lease_duration_ms * 1000, \
               claimed_by = ?1, updated_at = ?3 \
             WHERE status = 'pending' AND id IN ({candidates}) \
             RETURNING {columns}"
        );
        let mut query = sqlx::query_as::<_, R>(&sql)
            .bind(agent)
            .bind(org)
            .bind(now_us)
            .bind(i64::from(limit));
        if !extra.is_empty() {
            // ?5 .. ?9 are unused; the extra parameters start at ?10.
            for _ in 5..10 {
                query = query.bind(None::<i64>);
            }
        }
        for value in extra {
            query = query.bind(value);
        }
        Ok(query.fetch_all(&mut *conn).await?)
    }

    /// Renews the lease and stores `progress` if given; `(lease expiry, cancel requested)`.
    pub(super) async fn heartbeat(
        &self,
        conn: &mut SqliteConnection,
        fence: Fence<'_>,
        progress: Option<Value>,
        now_us: i64,
    ) -> StoreResult<(i64, bool)> {
        let table = self.table;
        let row: Option<(i64, bool)> = sqlx::query_as(&format!(
            "UPDATE {table} SET \
               lease_expires_at = ?1 + lease_duration_ms * 1000, \
               progress = COALESCE(?2, progress), updated_at = ?1 \
             WHERE org_id = ?3 AND id = ?4 AND status = 'executing' AND claim_token = ?5 \
               AND claimed_by = ?6 \
             RETURNING lease_expires_at, cancel_requested"
        ))
        .bind(now_us)
        .bind(progress.map(Json))
        .bind(fence.org)
        .bind(fence.id)
        .bind(fence.token.as_str())
        .bind(fence.agent)
        .fetch_optional(&mut *conn)
        .await?;
        match row {
            Some(lease) => Ok(lease),
            None => Err(self.stale_or_missing(conn, fence.org, fence.id).await),
        }
    }

    /// Completes the row with `result`.
    pub(super) async fn complete<R>(
        &self,
        conn: &mut SqliteConnection,
        fence: Fence<'_>,
        result: Value,
        now_us: i64,
    ) -> StoreResult<R>
    where
        R: for<'r> FromRow<'r, SqliteRow> + Send + Unpin,
    {
        let Self { table, columns, .. } = self;
        let row: Option<R> = sqlx::query_as(&format!(
            "UPDATE {table} SET \
               status = 'completed', attempt_outcome = 'completed', result = ?1, \
               claim_token = NULL, lease_expires_at = NULL, finished_at = ?2, updated_at = ?2 \
             WHERE org_id = ?3 AND id = ?4 AND status = 'executing' AND claim_token = ?5 \
               AND claimed_by = ?6 \
             RETURNING {columns}"
        ))
        .bind(Json(&result))
        .bind(now_us)
        .bind(fence.org)
        .bind(fence.id)
        .bind(fence.token.as_str())
        .bind(fence.agent)
        .fetch_optional(&mut *conn)
        .await?;
        match row {
            Some(row) => Ok(row),
            None => Err(self.stale_or_missing(conn, fence.org, fence.id).await),
        }
    }

    /// Completes many rows in one statement, each fenced by its own token and the holder
    /// `agent`: `items` are `(id, token, result)`. Returns the `returning` columns of the rows
    /// completed; an item whose row is not among them was not changed (its claim is stale, or
    /// it does not exist).
    pub(super) async fn complete_many<R>(
        &self,
        conn: &mut SqliteConnection,
        returning: &str,
        agent: AgentId,
        items: &[(uuid::Uuid, &ClaimToken, &Value)],
        now_us: i64,
    ) -> StoreResult<Vec<R>>
    where
        R: for<'r> FromRow<'r, SqliteRow> + Send + Unpin,
    {
        let reports: Vec<Value> = items
            .iter()
            .map(|(id, token, result)| {
                serde_json::json!({
                    "id": id.simple().to_string(),
                    "token": token.as_str(),
                    "result": result,
                })
            })
            .collect();
        Ok(sqlx::query_as(&self.complete_many_sql(returning))
            .bind(Json(&reports))
            .bind(now_us)
            .bind(agent)
            .fetch_all(&mut *conn)
            .await?)
    }

    /// The statement of [`Self::complete_many`]: `?1` the reports (a JSON array of `{"id"`
    /// (hex), `"token", "result"}`), `?2` now, `?3` the holder.
    pub(super) fn complete_many_sql(&self, returning: &str) -> String {
        let table = self.table;
        format!(
            "UPDATE {table} SET \
               status = 'completed', attempt_outcome = 'completed', result = r.report_result, \
               claim_token = NULL, lease_expires_at = NULL, finished_at = ?2, updated_at = ?2 \
             FROM (SELECT unhex(value ->> '$.id') AS report_id, value ->> '$.token' AS report_token, \
                     value -> '$.result' AS report_result FROM json_each(?1)) AS r \
             WHERE {table}.id = r.report_id AND {table}.status = 'executing' \
               AND {table}.claim_token = r.report_token AND {table}.claimed_by = ?3 \
             RETURNING {returning}"
        )
    }

    /// Records a failed attempt: back to pending after a backoff when `retryable` and attempts
    /// are left, otherwise `failed` (`cancelled` if a cancel was requested).
    pub(super) async fn fail<R>(
        &self,
        conn: &mut SqliteConnection,
        fence: Fence<'_>,
        error: Value,
        retryable: bool,
        now: time::OffsetDateTime,
        now_us: i64,
    ) -> StoreResult<R>
    where
        R: for<'r> FromRow<'r, SqliteRow> + Send + Unpin,
    {
        let Self { table, columns, .. } = self;
        // The backoff depends on the attempts so far. This runs on the one writer, so nothing
        // changes the row between this read and the update below.
        let attempts: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT attempts FROM {table} WHERE org_id = ? AND id = ?"
        ))
        .bind(fence.org)
        .bind(fence.id)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(attempts) = attempts else {
            return Err(StoreError::NotFound);
        };
        let delay = retry_backoff(
            u32::try_from(attempts).unwrap_or(u32::MAX),
            &mut rand::rng(),
        );
        let retry_at = super::rows::to_micros(
            now.saturating_add(delay.try_into().unwrap_or(time::Duration::MAX)),
        );
        let row: Option<R> = sqlx::query_as(&format!(
            "UPDATE {table} SET \
               status = CASE WHEN cancel_requested THEN 'cancelled' \
                             WHEN ?1 AND attempts < max_attempts THEN 'pending' \
                             ELSE 'failed' END, \
               run_at = CASE WHEN NOT cancel_requested AND ?1 AND attempts < max_attempts \
                             THEN ?2 ELSE run_at END, \
               finished_at = CASE WHEN NOT cancel_requested AND ?1 AND attempts < max_attempts \
                             THEN NULL ELSE ?3 END, \
               scheduled = CASE WHEN NOT cancel_requested AND ?1 AND attempts < max_attempts \
                             THEN 1 ELSE 0 END, \
               attempt_outcome = CASE WHEN cancel_requested THEN 'cancelled' \
                             WHEN ?1 AND attempts < max_attempts THEN 'retry' \
                             ELSE 'failed' END, \
               error = ?4, claim_token = NULL, lease_expires_at = NULL, updated_at = ?3 \
             WHERE org_id = ?5 AND id = ?6 AND status = 'executing' AND claim_token = ?7 \
               AND claimed_by = ?8 \
             RETURNING {columns}"
        ))
        .bind(retryable)
        .bind(retry_at)
        .bind(now_us)
        .bind(Json(&error))
        .bind(fence.org)
        .bind(fence.id)
        .bind(fence.token.as_str())
        .bind(fence.agent)
        .fetch_optional(&mut *conn)
        .await?;
        match row {
            Some(row) => Ok(row),
            None => Err(self.stale_or_missing(conn, fence.org, fence.id).await),
        }
    }

    /// Releases up to `limit` expired leases, earliest expiry first.
    pub(super) async fn release_expired(
        &self,
        conn: &mut SqliteConnection,
        org: Option<OrgId>,
        now_us: i64,
        limit: u32,
    ) -> StoreResult<Vec<ReleasedRow>> {
        let table = self.table;
        let rows: Vec<ReleasedRow> = sqlx::query_as(&format!(
            "UPDATE {table} SET \
               status = CASE WHEN cancel_requested THEN 'cancelled' \
                             WHEN attempts < max_attempts THEN 'pending' \
                             ELSE 'dead' END, \
               dead_reason = CASE WHEN NOT cancel_requested AND attempts >= max_attempts \
                             THEN 'lease_expired' ELSE NULL END, \
               run_at = CASE WHEN NOT cancel_requested AND attempts < max_attempts \
                             THEN ?1 ELSE run_at END, \
               finished_at = CASE WHEN NOT cancel_requested AND attempts < max_attempts \
                             THEN NULL ELSE ?1 END, \
               scheduled = 0, \
               attempt_outcome = CASE WHEN cancel_requested THEN 'cancelled' \
                             ELSE 'lease_expired' END, \
               claim_token = NULL, lease_expires_at = NULL, updated_at = ?1 \
             WHERE id IN (SELECT id FROM {table} \
                          WHERE status = 'executing' AND lease_expires_at < ?1 \
                            AND (?2 IS NULL OR org_id = ?2) \
                          ORDER BY lease_expires_at LIMIT ?3) \
             RETURNING id, org_id, attempts, status"
        ))
        .bind(now_us)
        .bind(org)
        .bind(i64::from(limit))
        .fetch_all(&mut *conn)
        .await?;
        Ok(rows)
    }

    /// Puts the claims back as they were before they were made: pending, one attempt fewer,
    /// the attempt record removed. A row whose cancel was requested meanwhile is cancelled
    /// instead (its attempt ends as `cancelled`). Returns how many went back to pending.
    pub(super) async fn hand_back(
        &self,
        conn: &mut SqliteConnection,
        org: OrgId,
        agent: AgentId,
        claims: &[(uuid::Uuid, ClaimToken)],
        now_us: i64,
    ) -> StoreResult<u64> {
        let table = self.table;
        let mut handed_back = 0;
        for (id, token) in claims {
            let status: Option<String> = sqlx::query_scalar(&format!(
                "UPDATE {table} SET \
                   status = CASE WHEN cancel_requested THEN 'cancelled' ELSE 'pending' END, \
                   attempts = CASE WHEN cancel_requested THEN attempts ELSE attempts - 1 END, \
                   finished_at = CASE WHEN cancel_requested THEN ?1 ELSE NULL END, \
                   attempt_outcome = CASE WHEN cancel_requested THEN 'cancelled' \
                                     ELSE 'handed_back' END, \
                   claim_token = NULL, lease_expires_at = NULL, updated_at = ?1 \
                 WHERE org_id = ?2 AND id = ?3 AND status = 'executing' AND claim_token = ?4 \
                   AND claimed_by = ?5 \
                 RETURNING status"
            ))
            .bind(now_us)
            .bind(org)
            .bind(*id)
            .bind(token.as_str())
            .bind(agent)
            .fetch_optional(&mut *conn)
            .await?;
            if status.as_deref() == Some("pending") {
                handed_back += 1;
            }
        }
        Ok(handed_back)
    }

    /// Puts a dead or failed row back to pending, due now, with its attempts reset (its
    /// attempt history stays).
    pub(super) async fn requeue<R>(
        &self,
        conn: &mut SqliteConnection,
        org: OrgId,
        id: uuid::Uuid,
        now_us: i64,
    ) -> StoreResult<R>
    where
        R: for<'r> FromRow<'r, SqliteRow> + Send + Unpin,
    {
        self.change_status(
            conn,
            org,
            id,
            now_us,
            "status = 'pending', attempts = 0, dead_reason = NULL, run_at = ?1, \
             scheduled = 0, finished_at = NULL, cancel_requested = 0",
            "'dead', 'failed'",
            "requeued",
        )
        .await
    }

    /// Cancels a row: a pending one at once, an executing one by flagging it.
    pub(super) async fn cancel<R>(
        &self,
        conn: &mut SqliteConnection,
        org: OrgId,
        id: uuid::Uuid,
        now_us: i64,
    ) -> StoreResult<R>
    where
        R: for<'r> FromRow<'r, SqliteRow> + Send + Unpin,
    {
        self.change_status(
            conn,
            org,
            id,
            now_us,
            "status = CASE WHEN status = 'pending' THEN 'cancelled' ELSE status END, \
             finished_at = CASE WHEN status = 'pending' THEN ?1 ELSE finished_at END, \
             cancel_requested = CASE WHEN status = 'executing' THEN 1 ELSE cancel_requested END",
            "'pending', 'executing'",
            "cancelled",
        )
        .await
    }

    /// Deletes up to `limit` rows that finished before `before_us`, oldest first.
    pub(super) async fn purge_finished(
        &self,
        conn: &mut SqliteConnection,
        before_us: i64,
        limit: u32,
    ) -> StoreResult<u64> {
        let Self { table, keep, .. } = self;
        let done = sqlx::query(&format!(
            "DELETE FROM {table} WHERE id IN (SELECT id FROM {table} \
               WHERE status IN ('completed', 'failed', 'cancelled', 'dead') \
                 AND finished_at < ?1{keep} ORDER BY finished_at LIMIT ?2)"
        ))
        .bind(before_us)
        .bind(i64::from(limit))
        .execute(&mut *conn)
        .await?;
        Ok(done.rows_affected())
    }

    /// Applies `set` (SQL assignments; `?1` is now) if the status is one of `from` (a SQL list
    /// of quoted statuses); otherwise `NotFound` or `InvalidState` saying it cannot be `verb`.
    /// Both are constants of this file, never caller input.
    #[allow(clippy::too_many_arguments)] // Each argument is a distinct part of the statement.
    async fn change_status<R>(
        &self,
        conn: &mut SqliteConnection,
        org: OrgId,
        id: uuid::Uuid,
        now_us: i64,
        set: &str,
        from: &str,
        verb: &str,
    ) -> StoreResult<R>
    where
        R: for<'r> FromRow<'r, SqliteRow> + Send + Unpin,
    {
        let Self { table, columns, .. } = self;
        let row: Option<R> = sqlx::query_as(&format!(
            "UPDATE {table} SET {set}, updated_at = ?1 \
             WHERE org_id = ?2 AND id = ?3 AND status IN ({from}) \
             RETURNING {columns}"
        ))
        .bind(now_us)
        .bind(org)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?;
        match row {
            Some(row) => Ok(row),
            None => match self.status_of(conn, org, id).await {
                Ok(Some(status)) => Err(StoreError::InvalidState(format!(
                    "it is {status}: it cannot be {verb}"
                ))),
                Ok(None) => Err(StoreError::NotFound),
                Err(err) => Err(err),
            },
        }
    }

    /// After a fenced update touched nothing: `NotFound` if the row is not in `org`,
    /// `StaleClaim` otherwise.
    async fn stale_or_missing(
        &self,
        conn: &mut SqliteConnection,
        org: OrgId,
        id: uuid::Uuid,
    ) -> StoreError {
        match self.status_of(conn, org, id).await {
            Ok(Some(_)) => StoreError::StaleClaim,
            Ok(None) => StoreError::NotFound,
            Err(err) => err,
        }
    }

    async fn status_of(
        &self,
        conn: &mut SqliteConnection,
        org: OrgId,
        id: uuid::Uuid,
    ) -> StoreResult<Option<String>> {
        let table = self.table;
        Ok(sqlx::query_scalar(&format!(
            "SELECT status FROM {table} WHERE org_id = ? AND id = ?"
        ))
        .bind(org)
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?)
    }
}
