//! The SQLite backend: one database file, WAL, migrations applied at open.
//!
//! - [`writer`]: the one write connection, fed by a group-commit task; every change goes
//!   through it, so writes never wait on SQLite's lock and a group of them costs one commit.
//! - [`lease`]: the lease engine (claim, heartbeat, complete, fail, release, requeue,
//!   hand-back, attempts, retention), written once for every leased table.
//! - `rows`: rows as stored and their encoding.
//! - `notifications`: notification settings, events and deliveries (the lease engine's second
//!   table).
//!
//! Reads use their own pool of `query_only` connections: under WAL they never wait for the
//! writer.

mod fleet;
mod lease;
mod notifications;
mod operator_keys;
mod rows;
mod schedules;
pub mod writer;

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::types::Json;
use sqlx::{ConnectOptions, SqliteConnection};
use time::OffsetDateTime;

use self::fleet::{Gate, Role};
use self::lease::{Claim, Fence, LeaseTable};
use self::rows::{
    AgentRow, ApiKeyRow, AttemptRow, CommandRow, OrgRow, duration_millis, from_micros,
    parse_status, to_micros, to_u32, truncate_to_micros,
};
use self::writer::{Lane, Writer};
pub use self::writer::{WritePressure, WriterOptions};
use crate::clock::Clock;
use crate::common::{
    conflict_as, found, missing_as, not_a_broadcast, page_of, validate_new_command,
};
use crate::crash::{self, Phase, Step};
use crate::error::{StoreError, StoreResult};
use crate::labels::Labels;
use crate::model::{
    Agent, AgentId, ApiKey, ApiKeyId, Attempt, Broadcast, CheckIn, ClaimToken, Claimed, Command,
    CommandFilter, CommandId, CommandStatus, Created, CreatedApiKey, CreatedOperatorKey,
    FinishedCount, Idempotency, Lease, NewApiKey, NewBroadcast, NewCommand, NewCommandItem,
    OperatorKey, OperatorKeyId, OrgId, Organisation, Page, PausedQueue, Principal, ReleaseOutcome,
    Released, Scope, Target,
};
use crate::model::{ScheduleId, ScheduleState};
use crate::schedule::{
    AdvanceOutcome, NewSchedule, Schedule, ScheduleAdvance, ScheduleFire, SchedulePage,
};
use crate::store::{MAX_BATCH_CREATE, MAX_CLAIM_BATCH, MAX_PAGE_SIZE, Store};
use crate::token;

/// How SQLite syncs the WAL to disk (`PRAGMA synchronous`). See `docs/store.md` for what each
/// setting keeps across a process kill and a power loss.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Sync the WAL at every commit: a committed change survives a power loss.
    #[default]
    Full,
    /// Sync only at checkpoints: a committed change survives a process kill, but the last
    /// commits may be lost on a power loss (the database stays consistent).
    Normal,
}

/// How to open the SQLite database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteOptions {
    /// Durability of commits.
    pub synchronous: Synchronous,
    /// Connections in the read pool (reads run in parallel with each other and the writer).
    pub read_connections: u32,
    /// How long the writer waits for another process's write lock (`keel admin` on the same
    /// file), and a reader for a free connection.
    pub busy_timeout: Duration,
    /// The writer's queue and group limits.
    pub writer: WriterOptions,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            synchronous: Synchronous::Full,
            read_connections: 4,
            busy_timeout: Duration::from_secs(5),
            writer: WriterOptions::default(),
        }
    }
}

/// The [`Store`] on an SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    read: SqlitePool,
    writer: Writer,
    clock: Arc<dyn Clock>,
}

/// How many times a key is generated again when its random prefix is taken.
const PREFIX_ATTEMPTS: u32 = 3;

/// The command columns, in [`CommandRow`] order.
const COMMAND_COLUMNS: &str = "id, org_id, command_type, target_agent_id, queue, params, \
     priority, run_at, max_attempts, lease_duration_ms, status, attempts, claim_token, \
     lease_expires_at, claimed_by, progress, result, error, dead_reason, cancel_requested, \
     idempotency_key, request_hash, created_at, updated_at, finished_at, parent_id, selector, \
     online_only, max_concurrency, broadcast_agents";

const AGENT_COLUMNS: &str = "id, org_id, name, version, metadata, queues, boot_id, boot_count, \
     booted_at, last_seen_at, created_at, labels, assigned_labels, cordoned_at";

const API_KEY_COLUMNS: &str =
    "id, org_id, name, prefix, token_hash, scopes, agent_id, created_at, revoked_at";

/// Commands are leased to agents.
const COMMANDS: LeaseTable = LeaseTable {
    table: "commands",
    columns: COMMAND_COLUMNS,
    // A broadcast's finished children stay while it runs: its end and its summary read them.
    keep: " AND (parent_id IS NULL OR NOT EXISTS (SELECT 1 FROM commands AS parent \
           WHERE parent.id = commands.parent_id AND parent.status = 'pending'))",
};

/// Claim order, the order of the claim indexes.
const CLAIM_ORDER: &str = "priority DESC, run_at, id";

/// One `SELECT` per source of an agent's claim (its own commands, then one per queue), each
/// on `index` (`claim` or `scheduled`), joined with `UNION ALL`. `columns` is what each arm
/// selects and `condition` is added to each arm. Parameters: `?1` agent, `?2` organisation,
/// `?10…` the queues (`?3` is now, `?4` the limit, where `condition` or the caller uses them).
fn per_source(queues: usize, index: &str, columns: &str, condition: &str) -> String {
    let scheduled = i32::from(index == "scheduled");
    let mut sql = format!(
        "SELECT {columns} FROM commands INDEXED BY commands_{index}_agent \
         WHERE org_id = ?2 AND target_agent_id = ?1 AND status = 'pending' \
         AND scheduled = {scheduled}{condition}"
    );
    for n in 0..queues {
        let _ = write!(
            sql,
            " UNION ALL SELECT {columns} FROM commands INDEXED BY commands_{index}_queue \
             WHERE org_id = ?2 AND queue = ?{} AND target_agent_id IS NULL \
             AND status = 'pending' AND scheduled = {scheduled}{condition}",
            10 + n
        );
    }
    sql
}

/// The claimable commands, in claim order, at most `?4`: each source read on its claim index
/// in that order, merged.
fn claim_candidates_sql(queues: usize) -> String {
    let arms = per_source(queues, "claim", "id, priority, run_at", "");
    format!("SELECT id FROM ({arms} ORDER BY {CLAIM_ORDER} LIMIT ?4)")
}

/// Scheduled commands that are due now (at most [`PROMOTE_BATCH`]) become claimable.
fn promote_sql(queues: usize) -> String {
    let arms = per_source(queues, "scheduled", "id", " AND run_at <= ?3");
    format!(
        "UPDATE commands SET scheduled = 0 \
         WHERE id IN (SELECT id FROM ({arms}) LIMIT {PROMOTE_BATCH})"
    )
}

/// Whether anything is claimable now, and the earliest due time of the scheduled commands.
fn probe_sql(queues: usize) -> String {
    let claimable = per_source(queues, "claim", "1", "");
    let scheduled = per_source(queues, "scheduled", "MIN(run_at) AS due", "");
    format!("SELECT EXISTS ({claimable}), (SELECT MIN(due) FROM ({scheduled}))")
}

/// How many of an organisation's commands are in each status, on the `(org, status)` index.
const COUNT_BY_STATUS_SQL: &str = "SELECT status, COUNT(*) FROM commands INDEXED BY \
     commands_list_status WHERE org_id = ?1 GROUP BY status";

/// The commands that finished at or after `?1`, on the retention index, in time order.
const FINISHED_SINCE_SQL: &str = "SELECT status, finished_at FROM commands INDEXED BY \
     commands_finished WHERE status IN ('completed', 'failed', 'cancelled', 'dead') \
     AND finished_at >= ?1 ORDER BY finished_at";

/// The most scheduled commands one claim makes claimable, so that a claim stays short even when
/// a million scheduled commands fall due at once; the rest follow with the next claims.
const PROMOTE_BATCH: u32 = 1000;

/// A listing's statement: only the filters given, on the index of the most selective one (with
/// the status when it is given), in id order. Parameters: `?1` organisation, `?2` status, `?3` agent, `?4` queue, `?5` type,
/// `?6` cursor, `?7` limit (the unused ones are bound and ignored).
fn list_sql(filter: &CommandFilter, cursor: bool) -> String {
    let by_status = filter.status.is_some();
    let index = match (
        filter.agent.is_some(),
        filter.queue.is_some(),
        filter.command_type.is_some(),
    ) {
        (true, _, _) if by_status => "commands_list_agent_status",
        (true, _, _) => "commands_list_agent",
        (_, true, _) if by_status => "commands_list_queue_status",
        (_, true, _) => "commands_list_queue",
        (_, _, true) if by_status => "commands_list_type_status",
        (_, _, true) => "commands_list_type",
        _ if by_status => "commands_list_status",
        _ => "commands_list",
    };
    let mut sql =
        format!("SELECT {COMMAND_COLUMNS} FROM commands INDEXED BY {index} WHERE org_id = ?1");
    for (present, condition) in [
        (filter.status.is_some(), " AND status = ?2"),
        (filter.agent.is_some(), " AND target_agent_id = ?3"),
        (filter.queue.is_some(), " AND queue = ?4"),
        (filter.command_type.is_some(), " AND command_type = ?5"),
        (cursor, " AND id < ?6"),
    ] {
        if present {
            sql.push_str(condition);
        }
    }
    // SQLite counts parameters up to the highest number used (`?7`), so all seven are bound
    // whether the filters use them or not.
    sql.push_str(" ORDER BY id DESC LIMIT ?7");
    sql
}

impl SqliteStore {
    /// Opens (creating it if needed) the database at `path`, applies the migrations and
    /// starts the writer.
    pub async fn open(
        path: impl AsRef<Path>,
        options: SqliteOptions,
        clock: Arc<dyn Clock>,
    ) -> StoreResult<Self> {
        let synchronous = match options.synchronous {
            Synchronous::Full => SqliteSynchronous::Full,
            Synchronous::Normal => SqliteSynchronous::Normal,
        };
        let connect = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(synchronous)
            .busy_timeout(options.busy_timeout)
            .foreign_keys(true)
            // 32 MiB of page cache per connection (SQLite's default is 2 MiB): the upper levels
            // of the claim and list indexes stay in memory at millions of rows. Pages are
            // allocated as they are used.
            .pragma("cache_size", "-32768")
            // Statement journals (an `UPDATE` that fires a trigger, a savepoint) stay in memory
            // rather than in temporary files: each costs a `pwrite` per page otherwise.
            .pragma("temp_store", "memory");
        let mut conn = connect.connect().await?;
        sqlx::migrate!("./migrations/sqlite").run(&mut conn).await?;
        let read = SqlitePoolOptions::new()
            .max_connections(options.read_connections.max(1))
            .acquire_timeout(options.busy_timeout)
            .connect_with(connect.clone().pragma("query_only", "1"))
            .await?;
        // A broken write connection is replaced on the same file, never on a new empty one.
        let writer = Writer::start(conn, connect.create_if_missing(false), options.writer);
        Ok(Self {
            read,
            writer,
            clock,
        })
    }

    /// The read pool (for health checks).
    pub fn pool(&self) -> &SqlitePool {
        &self.read
    }

    fn now_and_micros(&self) -> (OffsetDateTime, i64) {
        let now = truncate_to_micros(self.clock.now());
        (now, to_micros(now))
    }

    /// Runs `write`, which changes the database in several statements, on the writer's
    /// connection in the next group commit, inside a savepoint of its own.
    async fn write<T, F>(&self, lane: Lane, write: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, StoreResult<T>>
            + Send
            + 'static,
    {
        self.writer.write(lane, write).await
    }

    /// Runs `write`, which changes the database in at most one statement, in the next group
    /// commit (no savepoint needed: SQLite undoes a failed statement by itself).
    async fn write_one<T, F>(&self, lane: Lane, write: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: for<'c> FnOnce(&'c mut SqliteConnection) -> BoxFuture<'c, StoreResult<T>>
            + Send
            + 'static,
    {
        self.writer.write_one(lane, write).await
    }

    async fn list_page(
        &self,
        org: OrgId,
        filter: CommandFilter,
        cursor: Option<CommandId>,
        limit: u32,
    ) -> StoreResult<Page> {
        let limit = limit.clamp(1, MAX_PAGE_SIZE);
        let sql = list_sql(&filter, cursor.is_some());
        let rows: Vec<CommandRow> = sqlx::query_as(&sql)
            .bind(org)
            .bind(filter.status.map(CommandStatus::as_str))
            .bind(filter.agent)
            .bind(filter.queue)
            .bind(filter.command_type)
            .bind(cursor)
            // One more than asked, to know whether there is a next page.
            .bind(i64::from(limit) + 1)
            .fetch_all(&self.read)
            .await?;
        let items = rows
            .into_iter()
            .map(|row| row.into_command().map(|(command, _)| command))
            .collect::<StoreResult<Vec<_>>>()?;
        let (items, next_cursor) = page_of(items, limit, |c| c.id);
        Ok(Page { items, next_cursor })
    }

    /// `(claimable now, earliest due time of the scheduled ones)` for the agent's sources.
    async fn probe(
        &self,
        org: OrgId,
        agent: AgentId,
        queues: &[String],
    ) -> StoreResult<(bool, Option<i64>)> {
        let sql = probe_sql(queues.len());
        let query = sqlx::query_as(&sql).bind(agent).bind(org);
        Ok(bind_queues(query, queues, 2).fetch_one(&self.read).await?)
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    fn notifications(&self) -> &dyn crate::notifications::NotificationStore {
        self
    }

    fn write_pressure(&self) -> WritePressure {
        self.writer.pressure()
    }

    async fn close(&self) {
        // The writer commits what is queued and closes its connection; SQLite checkpoints the
        // WAL when the last connection closes.
        self.writer.close().await;
        self.read.close().await;
    }

    async fn create_organisation(&self, name: &str) -> StoreResult<Organisation> {
        if name.trim().is_empty() {
            return Err(StoreError::InvalidInput(
                "organisation name is empty".to_owned(),
            ));
        }
        let (_, now_us) = self.now_and_micros();
        let name = name.to_owned();
        self.write_one(Lane::Bulk, move |conn| {
            Box::pin(async move {
                let row: OrgRow = sqlx::query_as(
                    "INSERT INTO organisations (id, name, created_at) VALUES (?, ?, ?) \
                     RETURNING id, name, created_at",
                )
                .bind(OrgId::new())
                .bind(&name)
                .bind(now_us)
                .fetch_one(&mut *conn)
                .await
                .map_err(|err| {
                    conflict_as(
                        StoreError::from(err),
                        format!("organisation `{name}` exists"),
                    )
                })?;
                row.into_organisation()
            })
        })
        .await
    }

    async fn list_organisations(&self) -> StoreResult<Vec<Organisation>> {
        let rows: Vec<OrgRow> =
            sqlx::query_as("SELECT id, name, created_at FROM organisations ORDER BY name")
                .fetch_all(&self.read)
                .await?;
        rows.into_iter().map(OrgRow::into_organisation).collect()
    }

    async fn find_org_by_name(&self, name: &str) -> StoreResult<Option<Organisation>> {
        let row: Option<OrgRow> =
            sqlx::query_as("SELECT id, name, created_at FROM organisations WHERE name = ?")
                .bind(name)
                .fetch_optional(&self.read)
                .await?;
        row.map(OrgRow::into_organisation).transpose()
    }

    async fn create_api_key(&self, org: OrgId, key: NewApiKey) -> StoreResult<CreatedApiKey> {
        let (scopes, agent_name) = crate::common::check_new_api_key(&key)?;
        let (_, now_us) = self.now_and_micros();
        self.write(Lane::Bulk, move |conn| {
            Box::pin(async move {
                let agent = match agent_name {
                    Some(name) => {
                        sqlx::query(
                            "INSERT INTO agents (id, org_id, name, created_at) \
                             VALUES (?, ?, ?, ?) ON CONFLICT (org_id, name) DO NOTHING",
                        )
                        .bind(AgentId::new())
                        .bind(org)
                        .bind(&name)
                        .bind(now_us)
                        .execute(&mut *conn)
                        .await
                        .map_err(|err| missing_as(StoreError::from(err), StoreError::NotFound))?;
                        let id: AgentId = sqlx::query_scalar(
                            "SELECT id FROM agents WHERE org_id = ? AND name = ?",
                        )
                        .bind(org)
                        .bind(&name)
                        .fetch_one(&mut *conn)
                        .await?;
                        Some(id)
                    }
                    None => None,
                };
                insert_api_key(conn, org, &key, &scopes, agent, now_us)
                    .await
                    .map_err(|err| missing_as(err, StoreError::NotFound))
            })
        })
        .await
    }

    async fn list_api_keys(&self, org: OrgId) -> StoreResult<Vec<ApiKey>> {
        let rows: Vec<ApiKeyRow> = sqlx::query_as(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE org_id = ? ORDER BY created_at, id"
        ))
        .bind(org)
        .fetch_all(&self.read)
        .await?;
        rows.into_iter().map(ApiKeyRow::into_api_key).collect()
    }

    async fn revoke_api_key(&self, org: OrgId, key: ApiKeyId) -> StoreResult<()> {
        let (_, now_us) = self.now_and_micros();
        self.write_one(Lane::Bulk, move |conn| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) \
                     WHERE org_id = ? AND id = ?",
                )
                .bind(now_us)
                .bind(org)
                .bind(key)
                .execute(&mut *conn)
                .await?;
                found(done.rows_affected())
            })
        })
        .await
    }

    async fn authenticate(&self, token: &str) -> StoreResult<Option<Principal>> {
        let row: Option<ApiKeyRow> = find_by_token(
            &self.read,
            &format!("SELECT {API_KEY_COLUMNS} FROM api_keys WHERE prefix = ?"),
            token,
        )
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let key = row.into_api_key()?;
        Ok(Some(Principal {
            key_id: key.id,
            org_id: key.org_id,
            scopes: key.scopes,
            agent_id: key.agent_id,
        }))
    }

    async fn create_operator_key(&self, name: &str) -> StoreResult<CreatedOperatorKey> {
        operator_keys::create(self, name).await
    }

    async fn list_operator_keys(&self) -> StoreResult<Vec<OperatorKey>> {
        operator_keys::list(self).await
    }

    async fn revoke_operator_key(&self, key: OperatorKeyId) -> StoreResult<()> {
        operator_keys::revoke(self, key).await
    }

    async fn authenticate_operator(&self, token: &str) -> StoreResult<Option<OperatorKey>> {
        operator_keys::authenticate(self, token).await
    }

    async fn check_in(&self, org: OrgId, agent: AgentId, check_in: CheckIn) -> StoreResult<Agent> {
        if !check_in.metadata.is_object() {
            return Err(StoreError::InvalidInput(
                "agent metadata must be a JSON object".to_owned(),
            ));
        }
        if let Some(labels) = &check_in.labels {
            crate::labels::check_labels(labels)
                .map_err(|rule| StoreError::InvalidInput(format!("labels: {rule}")))?;
        }
        let (_, now_us) = self.now_and_micros();
        self.write_one(Lane::Bulk, move |conn| {
            Box::pin(async move {
                // SET expressions read the row as it was, so `boot_id IS ?` compares with the
                // old boot. The name is the key's agent's: a check-in may state it (and must
                // state it right), never change it.
                let row: Option<AgentRow> = sqlx::query_as(&format!(
                    "UPDATE agents SET \
                       version = ?2, metadata = ?3, queues = ?4, \
                       boot_count = CASE WHEN boot_id IS ?5 THEN boot_count ELSE boot_count + 1 END, \
                       booted_at = CASE WHEN boot_id IS ?5 THEN booted_at ELSE ?6 END, \
                       boot_id = ?5, last_seen_at = ?6, labels = COALESCE(?9, labels) \
                     WHERE org_id = ?7 AND id = ?8 AND (?1 IS NULL OR name = ?1) \
                     RETURNING {AGENT_COLUMNS}"
                ))
                .bind(check_in.name.as_deref())
                .bind(&check_in.version)
                .bind(Json(&check_in.metadata))
                .bind(Json(&check_in.queues))
                .bind(check_in.boot_id)
                .bind(now_us)
                .bind(org)
                .bind(agent)
                .bind(check_in.labels.map(Json))
                .fetch_optional(&mut *conn)
                .await?;
                match row {
                    Some(row) => row.into_agent(),
                    None => {
                        let name: Option<String> = sqlx::query_scalar(
                            "SELECT name FROM agents WHERE org_id = ? AND id = ?",
                        )
                        .bind(org)
                        .bind(agent)
                        .fetch_optional(&mut *conn)
                        .await?;
                        match name {
                            Some(name) => Err(StoreError::InvalidInput(format!(
                                "name: this key acts as agent `{name}`"
                            ))),
                            None => Err(StoreError::UnknownAgent),
                        }
                    }
                }
            })
        })
        .await
    }

    async fn get_agent(&self, org: OrgId, agent: AgentId) -> StoreResult<Option<Agent>> {
        let row: Option<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE org_id = ? AND id = ?"
        ))
        .bind(org)
        .bind(agent)
        .fetch_optional(&self.read)
        .await?;
        row.map(AgentRow::into_agent).transpose()
    }

    async fn list_agents(&self, org: OrgId) -> StoreResult<Vec<Agent>> {
        let rows: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE org_id = ? ORDER BY name"
        ))
        .bind(org)
        .fetch_all(&self.read)
        .await?;
        rows.into_iter().map(AgentRow::into_agent).collect()
    }

    async fn set_agent_labels(
        &self,
        org: OrgId,
        agent: AgentId,
        labels: Labels,
    ) -> StoreResult<Agent> {
        fleet::set_agent_labels(self, org, agent, labels).await
    }

    async fn set_agent_cordoned(
        &self,
        org: OrgId,
        agent: AgentId,
        cordoned: bool,
    ) -> StoreResult<Agent> {
        fleet::set_agent_cordoned(self, org, agent, cordoned).await
    }

    async fn pause_queue(&self, org: OrgId, queue: &str) -> StoreResult<PausedQueue> {
        fleet::pause_queue(self, org, queue).await
    }

    async fn resume_queue(&self, org: OrgId, queue: &str) -> StoreResult<bool> {
        fleet::resume_queue(self, org, queue).await
    }

    async fn list_paused_queues(&self, org: OrgId) -> StoreResult<Vec<PausedQueue>> {
        fleet::list_paused_queues(self, org).await
    }

    async fn count_cordoned_and_paused(&self) -> StoreResult<(u64, u64)> {
        fleet::count_cordoned_and_paused(self).await
    }

    async fn create_command(
        &self,
        org: OrgId,
        command: NewCommand,
        idempotency: Option<Idempotency>,
    ) -> StoreResult<Created> {
        validate_new_command(&command)?;
        not_a_broadcast(&command)?;
        let (_, now_us) = self.now_and_micros();
        crash::around(
            Step::Create,
            self.write_one(Lane::Bulk, move |conn| {
                Box::pin(async move {
                    insert_command(
                        conn,
                        org,
                        command,
                        idempotency,
                        now_us,
                        Placement::default(),
                    )
                    .await
                })
            }),
        )
        .await
    }

    async fn create_commands(
        &self,
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
                .map_err(|err| match err {
                    StoreError::InvalidInput(what) => {
                        StoreError::InvalidInput(format!("commands[{n}]: {what}"))
                    }
                    other => other,
                })?;
        }
        let (_, now_us) = self.now_and_micros();
        crash::around(
            Step::Create,
            self.write(Lane::Bulk, move |conn| {
                Box::pin(async move {
                    let mut created = Vec::with_capacity(items.len());
                    for item in items {
                        created.push(
                            insert_command(
                                conn,
                                org,
                                item.command,
                                item.idempotency,
                                now_us,
                                Placement::default(),
                            )
                            .await?,
                        );
                    }
                    Ok(created)
                })
            }),
        )
        .await
    }

    async fn get_command(&self, org: OrgId, id: CommandId) -> StoreResult<Option<Command>> {
        let row: Option<CommandRow> = sqlx::query_as(&format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE org_id = ? AND id = ?"
        ))
        .bind(org)
        .bind(id)
        .fetch_optional(&self.read)
        .await?;
        Ok(row
            .map(CommandRow::into_command)
            .transpose()?
            .map(|(c, _)| c))
    }

    async fn list_commands(
        &self,
        org: OrgId,
        filter: CommandFilter,
        cursor: Option<CommandId>,
        limit: u32,
    ) -> StoreResult<Page> {
        self.list_page(org, filter, cursor, limit).await
    }

    async fn cancel_command(&self, org: OrgId, id: CommandId) -> StoreResult<Command> {
        let (_, now_us) = self.now_and_micros();
        crash::around(
            Step::Cancel,
            self.write(Lane::Bulk, move |conn| {
                Box::pin(async move {
                    let row: CommandRow = if fleet::role(conn, org, id).await? == Role::Parent {
                        fleet::cancel_broadcast(conn, org, id, now_us).await?
                    } else {
                        COMMANDS.cancel(conn, org, id.0, now_us).await?
                    };
                    Ok(row.into_command()?.0)
                })
            }),
        )
        .await
    }

    async fn create_broadcast(
        &self,
        org: OrgId,
        broadcast: NewBroadcast,
        idempotency: Option<Idempotency>,
    ) -> StoreResult<Created> {
        fleet::create_broadcast(self, org, broadcast, idempotency).await
    }

    async fn find_idempotent(
        &self,
        org: OrgId,
        idempotency: &Idempotency,
    ) -> StoreResult<Option<Created>> {
        let existing: Option<CommandRow> = sqlx::query_as(&format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE org_id = ? AND idempotency_key = ?"
        ))
        .bind(org)
        .bind(&idempotency.key)
        .fetch_optional(&self.read)
        .await?;
        existing.map(|row| replay(row, idempotency)).transpose()
    }

    async fn list_children(&self, org: OrgId, parent: CommandId) -> StoreResult<Vec<Command>> {
        fleet::list_children(self, org, parent).await
    }

    async fn claim(
        &self,
        org: OrgId,
        agent: AgentId,
        queues: &[String],
        limit: u32,
    ) -> StoreResult<Vec<Claimed>> {
        fail::fail_point!("store.claim", |_| Err(StoreError::injected("store.claim")));
        let limit = limit.clamp(1, MAX_CLAIM_BATCH);
        // A queue named twice would hand its commands to two arms of the claim.
        let mut unique: Vec<String> = queues.to_vec();
        unique.sort();
        unique.dedup();
        // Reads first: most claims of idle agents and long polls find nothing, and a read does
        // not queue for the writer. A cordoned agent takes nothing; a paused queue gives nothing.
        let open = match fleet::claim_gate(&self.read, org, agent, &unique).await? {
            Gate::UnknownAgent => return Err(StoreError::UnknownAgent),
            Gate::Cordoned => return Ok(Vec::new()),
            Gate::Open(open) => open,
        };
        let queues = open.as_slice();
        let (_, now_us) = self.now_and_micros();
        let (claimable, next_scheduled) = self.probe(org, agent, queues).await?;
        let fell_due = next_scheduled.is_some_and(|due| due <= now_us);
        if fell_due {
            let promote = promote_sql(queues.len());
            let promoted = queues.to_vec();
            self.write_one(Lane::Lease, move |conn| {
                Box::pin(async move {
                    let query = sqlx::query(&promote).bind(agent).bind(org).bind(now_us);
                    bind_queues(query, &promoted, 3).execute(&mut *conn).await?;
                    Ok(())
                })
            })
            .await?;
        }
        if !claimable && !fell_due {
            return Ok(Vec::new());
        }
        let queues = queues.to_vec();
        let hand_back = self.writer.clone();
        let claimed = crash::around(
            Step::Claim,
            self.writer.write_or_else(
                move |conn| {
                    Box::pin(async move {
                        // Again on the writer: a cordon or a pause that committed since the
                        // read above holds for this claim.
                        let queues =
                            match fleet::claim_gate(&mut *conn, org, agent, &queues).await? {
                                Gate::UnknownAgent => return Err(StoreError::UnknownAgent),
                                Gate::Cordoned => return Ok(Vec::new()),
                                Gate::Open(open) => open,
                            };
                        let candidates = claim_candidates_sql(queues.len());
                        let rows: Vec<CommandRow> = COMMANDS
                            .claim(
                                conn,
                                Claim {
                                    candidates: &candidates,
                                    org,
                                    agent,
                                    extra: &queues,
                                    now_us,
                                    limit,
                                },
                            )
                            .await
                            .map_err(|err| missing_as(err, StoreError::UnknownAgent))?;
                        rows.into_iter()
                            .map(CommandRow::into_claimed)
                            .collect::<StoreResult<Vec<_>>>()
                    })
                },
                // The claimer left before the commit answered (its request timed out or its
                // connection closed): nobody will run these, so they go back at once.
                Box::new(move |claimed: Vec<Claimed>| {
                    let claims: Vec<(uuid::Uuid, ClaimToken)> = claimed
                        .into_iter()
                        .map(|c| (c.command.id.0, c.claim_token))
                        .collect();
                    hand_back.write_detached(move |conn| {
                        Box::pin(async move {
                            COMMANDS
                                .hand_back(conn, org, agent, &claims, now_us)
                                .await
                                .map(|_| ())
                        })
                    });
                }),
            ),
        )
        .await?;
        let mut claimed = claimed;
        claimed.sort_by(|a, b| {
            b.command
                .priority
                .cmp(&a.command.priority)
                .then(a.command.run_at.cmp(&b.command.run_at))
                .then(a.command.id.cmp(&b.command.id))
        });
        Ok(claimed)
    }

    async fn hand_back(
        &self,
        org: OrgId,
        agent: AgentId,
        claims: Vec<(CommandId, ClaimToken)>,
    ) -> StoreResult<u64> {
        let (_, now_us) = self.now_and_micros();
        let claims: Vec<(uuid::Uuid, ClaimToken)> = claims
            .into_iter()
            .map(|(id, token)| (id.0, token))
            .collect();
        crash::around(
            Step::HandBack,
            self.write(Lane::Lease, move |conn| {
                Box::pin(async move { COMMANDS.hand_back(conn, org, agent, &claims, now_us).await })
            }),
        )
        .await
    }

    async fn list_attempts(&self, org: OrgId, id: CommandId) -> StoreResult<Vec<Attempt>> {
        let rows: Vec<AttemptRow> = sqlx::query_as(
            "SELECT a.attempt, a.agent_id, a.claimed_at, a.ended_at, a.outcome, a.error \
             FROM command_attempts a JOIN commands c ON c.id = a.command_id \
             WHERE c.org_id = ? AND c.id = ? ORDER BY a.attempt",
        )
        .bind(org)
        .bind(id)
        .fetch_all(&self.read)
        .await?;
        rows.into_iter().map(AttemptRow::into_attempt).collect()
    }

    async fn heartbeat(
        &self,
        org: OrgId,
        agent: AgentId,
        id: CommandId,
        token: &ClaimToken,
        progress: Option<Value>,
    ) -> StoreResult<Lease> {
        fail::fail_point!("store.heartbeat", |_| Err(StoreError::injected(
            "store.heartbeat"
        )));
        let (_, now_us) = self.now_and_micros();
        let token = token.clone();
        let (expires_at, cancel_requested) = crash::around(
            Step::Heartbeat,
            self.write_one(Lane::Lease, move |conn| {
                Box::pin(async move {
                    let fence = Fence {
                        org,
                        agent,
                        id: id.0,
                        token: &token,
                    };
                    COMMANDS.heartbeat(conn, fence, progress, now_us).await
                })
            }),
        )
        .await?;
        Ok(Lease {
            expires_at: from_micros(expires_at)?,
            cancel_requested,
        })
    }

    async fn complete(
        &self,
        org: OrgId,
        agent: AgentId,
        id: CommandId,
        token: &ClaimToken,
        result: Value,
    ) -> StoreResult<Command> {
        fail::fail_point!("store.complete", |_| Err(StoreError::injected(
            "store.complete"
        )));
        let (_, now_us) = self.now_and_micros();
        let token = token.clone();
        crash::around(
            Step::Complete,
            self.write_one(Lane::Lease, move |conn| {
                Box::pin(async move {
                    let fence = Fence {
                        org,
                        agent,
                        id: id.0,
                        token: &token,
                    };
                    let row: CommandRow = COMMANDS.complete(conn, fence, result, now_us).await?;
                    Ok(row.into_command()?.0)
                })
            }),
        )
        .await
    }

    async fn fail(
        &self,
        org: OrgId,
        agent: AgentId,
        id: CommandId,
        token: &ClaimToken,
        error: Value,
        retryable: bool,
    ) -> StoreResult<Command> {
        let (now, now_us) = self.now_and_micros();
        let token = token.clone();
        crash::around(
            Step::Fail,
            self.write_one(Lane::Lease, move |conn| {
                Box::pin(async move {
                    let fence = Fence {
                        org,
                        agent,
                        id: id.0,
                        token: &token,
                    };
                    let row: CommandRow = COMMANDS
                        .fail(conn, fence, error, retryable, now, now_us)
                        .await?;
                    Ok(row.into_command()?.0)
                })
            }),
        )
        .await
    }

    async fn release_expired_leases(
        &self,
        org: Option<OrgId>,
        limit: u32,
    ) -> StoreResult<Vec<Released>> {
        let (_, now_us) = self.now_and_micros();
        let limit = limit.max(1);
        // In a transaction (not one statement alone), so that `store.crash` can stop before
        // its commit.
        let rows = self
            .write(Lane::Bulk, move |conn| {
                Box::pin(async move {
                    let rows = COMMANDS.release_expired(conn, org, now_us, limit).await?;
                    crash::point_if(Step::Release, Phase::Before, !rows.is_empty());
                    Ok(rows)
                })
            })
            .await?;
        crash::point_if(Step::Release, Phase::After, !rows.is_empty());
        let mut released = rows
            .into_iter()
            .map(|(command_id, org_id, attempts, status)| {
                let outcome = match parse_status(&status)? {
                    CommandStatus::Pending => ReleaseOutcome::Requeued,
                    CommandStatus::Cancelled => ReleaseOutcome::Cancelled,
                    _ => ReleaseOutcome::Dead,
                };
                Ok(Released {
                    command_id: CommandId(command_id),
                    org_id,
                    attempts: to_u32(attempts)?,
                    outcome,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        released.sort_by_key(|r| r.command_id);
        Ok(released)
    }

    async fn purge_finished(&self, before: OffsetDateTime, limit: u32) -> StoreResult<u64> {
        let before_us = to_micros(before);
        let limit = limit.max(1);
        let purged = self
            .write(Lane::Bulk, move |conn| {
                Box::pin(async move {
                    let purged = COMMANDS.purge_finished(conn, before_us, limit).await?;
                    crash::point_if(Step::Purge, Phase::Before, purged > 0);
                    Ok(purged)
                })
            })
            .await?;
        crash::point_if(Step::Purge, Phase::After, purged > 0);
        Ok(purged)
    }

    async fn list_dead(
        &self,
        org: OrgId,
        cursor: Option<CommandId>,
        limit: u32,
    ) -> StoreResult<Page> {
        let filter = CommandFilter {
            status: Some(CommandStatus::Dead),
            ..CommandFilter::default()
        };
        self.list_page(org, filter, cursor, limit).await
    }

    async fn count_commands_by_status(&self, org: OrgId) -> StoreResult<Vec<(CommandStatus, u64)>> {
        let rows: Vec<(String, i64)> = sqlx::query_as(COUNT_BY_STATUS_SQL)
            .bind(org)
            .fetch_all(&self.read)
            .await?;
        let mut counts = rows
            .into_iter()
            .map(|(status, count)| Ok((parse_status(&status)?, u64::try_from(count).unwrap_or(0))))
            .collect::<StoreResult<Vec<_>>>()?;
        counts.sort_by_key(|(status, _)| CommandStatus::ALL.iter().position(|s| s == status));
        Ok(counts)
    }

    async fn finished_per_minute(&self, since: OffsetDateTime) -> StoreResult<Vec<FinishedCount>> {
        const MINUTE_US: i64 = 60_000_000;
        use futures::TryStreamExt as _;
        // Streamed and counted as they come: the rows are never held at once. They come in
        // time order, so only the current minute's counts are searched.
        let mut rows = sqlx::query_as::<_, (String, i64)>(FINISHED_SINCE_SQL)
            .bind(to_micros(since))
            .fetch(&self.read);
        let mut counts: Vec<FinishedCount> = Vec::new();
        while let Some((status, finished_at)) = rows.try_next().await? {
            let status = parse_status(&status)?;
            let minute = from_micros(finished_at.div_euclid(MINUTE_US) * MINUTE_US)?;
            match counts
                .iter_mut()
                .rev()
                .take_while(|c| c.minute == minute)
                .find(|c| c.status == status)
            {
                Some(count) => count.count += 1,
                None => counts.push(FinishedCount {
                    minute,
                    status,
                    count: 1,
                }),
            }
        }
        counts.sort_by_key(|c| {
            let status = CommandStatus::ALL.iter().position(|s| *s == c.status);
            (c.minute, status)
        });
        Ok(counts)
    }

    async fn requeue(&self, org: OrgId, id: CommandId) -> StoreResult<Command> {
        let (_, now_us) = self.now_and_micros();
        crash::around(
            Step::Requeue,
            self.write(Lane::Bulk, move |conn| {
                Box::pin(async move {
                    let row: CommandRow = match fleet::role(conn, org, id).await? {
                        Role::Parent => {
                            fleet::refuse_while_cancelling(conn, id).await?;
                            fleet::requeue_broadcast(conn, org, id, now_us).await?
                        }
                        Role::Child(parent) => {
                            fleet::refuse_while_cancelling(conn, parent).await?;
                            let row = COMMANDS.requeue(conn, org, id.0, now_us).await?;
                            fleet::hold_beyond_concurrency(conn, parent).await?;
                            row
                        }
                        Role::Plain => COMMANDS.requeue(conn, org, id.0, now_us).await?,
                    };
                    Ok(row.into_command()?.0)
                })
            }),
        )
        .await
    }

    async fn create_schedule(&self, org: OrgId, schedule: NewSchedule) -> StoreResult<Schedule> {
        schedules::create(self, org, schedule).await
    }

    async fn list_schedules(
        &self,
        org: OrgId,
        cursor: Option<ScheduleId>,
        limit: u32,
    ) -> StoreResult<SchedulePage> {
        schedules::list(self, org, cursor, limit).await
    }

    async fn get_schedule(&self, org: OrgId, id: ScheduleId) -> StoreResult<Option<Schedule>> {
        schedules::get(self, org, id).await
    }

    async fn set_schedule_state(
        &self,
        org: OrgId,
        id: ScheduleId,
        state: ScheduleState,
    ) -> StoreResult<Schedule> {
        schedules::set_state(self, org, id, state).await
    }

    async fn delete_schedule(&self, org: OrgId, id: ScheduleId) -> StoreResult<()> {
        schedules::delete(self, org, id).await
    }

    async fn list_schedule_fires(
        &self,
        org: OrgId,
        id: ScheduleId,
        before: Option<OffsetDateTime>,
        limit: u32,
    ) -> StoreResult<Vec<ScheduleFire>> {
        schedules::list_fires(self, org, id, before, limit).await
    }

    async fn due_schedules(&self, limit: u32) -> StoreResult<Vec<Schedule>> {
        schedules::due(self, limit).await
    }

    async fn advance_schedule(&self, step: ScheduleAdvance) -> StoreResult<AdvanceOutcome> {
        schedules::advance(self, step).await
    }

    async fn next_due_at(
        &self,
        org: OrgId,
        agent: AgentId,
        queues: &[String],
    ) -> StoreResult<Option<OffsetDateTime>> {
        let queues = match fleet::claim_gate(&self.read, org, agent, queues).await? {
            Gate::UnknownAgent => return Err(StoreError::UnknownAgent),
            // Nothing until it is uncordoned, which wakes its claims.
            Gate::Cordoned => return Ok(None),
            Gate::Open(open) => open,
        };
        let (claimable, next_scheduled) = self.probe(org, agent, &queues).await?;
        if claimable {
            return Ok(Some(self.now()));
        }
        next_scheduled.map(from_micros).transpose()
    }
}

/// Binds the queues at `?10…`, after the `bound` parameters already given (the numbers in
/// between are bound to NULL).
fn bind_queues<'q, Q: BindMore<'q>>(mut query: Q, queues: &'q [String], bound: usize) -> Q {
    if !queues.is_empty() {
        for _ in bound..9 {
            query = query.bind_null();
        }
    }
    for queue in queues {
        query = query.bind_text(queue);
    }
    query
}

/// The two kinds of sqlx query [`bind_queues`] binds on.
trait BindMore<'q>: Sized {
    fn bind_null(self) -> Self;
    fn bind_text(self, value: &'q str) -> Self;
}

impl<'q> BindMore<'q> for sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>> {
    fn bind_null(self) -> Self {
        self.bind(None::<i64>)
    }
    fn bind_text(self, value: &'q str) -> Self {
        self.bind(value)
    }
}

impl<'q, O> BindMore<'q>
    for sqlx::query::QueryAs<'q, sqlx::Sqlite, O, sqlx::sqlite::SqliteArguments<'q>>
{
    fn bind_null(self) -> Self {
        self.bind(None::<i64>)
    }
    fn bind_text(self, value: &'q str) -> Self {
        self.bind(value)
    }
}

/// Where a new command sits in a broadcast; the default is outside any.
#[derive(Debug, Default, Clone, Copy)]
struct Placement<'a> {
    /// The broadcast it is a child of.
    parent: Option<CommandId>,
    /// Held (`scheduled = 2`): the parent for good, a child until a sibling hands it a slot.
    held: bool,
    /// For a parent: how the broadcast was created.
    broadcast: Option<&'a Broadcast>,
}

/// Inserts one command (on the writer's connection), or answers an earlier one with the same
/// idempotency key.
async fn insert_command(
    conn: &mut SqliteConnection,
    org: OrgId,
    command: NewCommand,
    idempotency: Option<Idempotency>,
    now_us: i64,
    placement: Placement<'_>,
) -> StoreResult<Created> {
    if let Some(idem) = &idempotency {
        let existing: Option<CommandRow> = sqlx::query_as(&format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE org_id = ? AND idempotency_key = ?"
        ))
        .bind(org)
        .bind(&idem.key)
        .fetch_optional(&mut *conn)
        .await?;
        if let Some(existing) = existing {
            return replay(existing, idem);
        }
    }
    let (target_agent, queue, selector) = match &command.target {
        Target::Agent(agent) => (Some(*agent), None, None),
        Target::Queue(queue) => (None, Some(queue.as_str()), None),
        // The empty queue name, which no agent serves (see the fleet migration).
        Target::Broadcast(selector) => (None, Some(""), Some(selector.as_str())),
    };
    let run_at = command
        .run_at
        .map_or(now_us, |t| to_micros(truncate_to_micros(t)));
    let scheduled = if placement.held {
        2
    } else {
        // Not due yet: out of the claim indexes until a claim finds it due.
        i64::from(run_at > now_us)
    };
    let broadcast = placement.broadcast;
    let row: CommandRow = sqlx::query_as(&format!(
        "INSERT INTO commands (id, org_id, command_type, target_agent_id, queue, params, \
           priority, run_at, max_attempts, lease_duration_ms, status, idempotency_key, \
           request_hash, created_at, updated_at, scheduled, parent_id, selector, online_only, \
           max_concurrency, broadcast_agents) \
         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) \
         RETURNING {COMMAND_COLUMNS}"
    ))
    .bind(CommandId::new())
    .bind(org)
    .bind(&command.command_type)
    .bind(target_agent)
    .bind(queue)
    .bind(Json(&command.params))
    .bind(command.priority)
    .bind(run_at)
    .bind(i64::from(command.max_attempts))
    .bind(duration_millis(command.lease_duration))
    .bind(idempotency.as_ref().map(|i| i.key.as_str()))
    .bind(idempotency.as_ref().map(|i| i.request_hash.as_str()))
    .bind(now_us)
    .bind(now_us)
    .bind(scheduled)
    .bind(placement.parent)
    .bind(selector)
    .bind(broadcast.map(|b| b.online_only))
    .bind(broadcast.and_then(|b| b.max_concurrency).map(i64::from))
    .bind(broadcast.map(|b| Json(&b.agents)))
    .fetch_one(&mut *conn)
    .await
    .map_err(|err| {
        let missing = if target_agent.is_some() {
            StoreError::UnknownAgent
        } else {
            StoreError::NotFound
        };
        missing_as(StoreError::from(err), missing)
    })?;
    Ok(Created {
        command: row.into_command()?.0,
        created: true,
    })
}

async fn insert_api_key(
    conn: &mut SqliteConnection,
    org: OrgId,
    key: &NewApiKey,
    scopes: &[Scope],
    agent: Option<AgentId>,
    now_us: i64,
) -> StoreResult<CreatedApiKey> {
    let scope_names: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
    let sql = format!(
        "INSERT INTO api_keys (id, org_id, name, prefix, token_hash, scopes, agent_id, \
         created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING {API_KEY_COLUMNS}"
    );
    let name = key.name.clone();
    let (row, token) = insert_with_new_token(conn, move |conn, new| {
        let (sql, name, scope_names) = (sql.clone(), name.clone(), scope_names.clone());
        let (prefix, hash) = (new.prefix.clone(), new.hash.clone());
        Box::pin(async move {
            sqlx::query_as::<_, ApiKeyRow>(&sql)
                .bind(ApiKeyId::new())
                .bind(org)
                .bind(name)
                .bind(prefix)
                .bind(hash)
                .bind(Json(&scope_names))
                .bind(agent)
                .bind(now_us)
                .fetch_one(conn)
                .await
                .map_err(StoreError::from)
        })
    })
    .await?;
    Ok(CreatedApiKey {
        key: row.into_api_key()?,
        token,
    })
}

/// Runs `insert` with a freshly generated token; only its random prefix can collide (a
/// `Conflict`), and then another token is drawn, up to [`PREFIX_ATTEMPTS`] times. Returns the
/// inserted row and the token.
async fn insert_with_new_token<T, F>(
    conn: &mut SqliteConnection,
    insert: F,
) -> StoreResult<(T, secrecy::SecretString)>
where
    F: for<'c> Fn(&'c mut SqliteConnection, &token::NewToken) -> BoxFuture<'c, StoreResult<T>>,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let new = token::generate();
        match insert(&mut *conn, &new).await {
            Ok(row) => return Ok((row, secrecy::SecretString::from(new.token))),
            Err(StoreError::Conflict(_)) if attempt < PREFIX_ATTEMPTS => {}
            Err(err) => return Err(err),
        }
    }
}

/// A stored credential: its token's hash and whether it was revoked.
trait TokenRow {
    /// Hex SHA-256 of the whole token.
    fn token_hash(&self) -> &str;
    /// Whether the key was revoked.
    fn is_revoked(&self) -> bool;
}

impl TokenRow for ApiKeyRow {
    fn token_hash(&self) -> &str {
        &self.token_hash
    }

    fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }
}

/// The row `select` (one `?`: the prefix) finds for `token`; `None` for a malformed token, an
/// unknown prefix, a wrong secret (compared in constant time) or a revoked key.
async fn find_by_token<R>(read: &SqlitePool, select: &str, token: &str) -> StoreResult<Option<R>>
where
    R: for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow> + TokenRow + Send + Unpin,
{
    let Some(prefix) = token::prefix_of(token) else {
        return Ok(None);
    };
    let row: Option<R> = sqlx::query_as(select)
        .bind(prefix)
        .fetch_optional(read)
        .await?;
    Ok(row.filter(|row| !row.is_revoked() && token::matches(token, row.token_hash())))
}

/// The answer to a create whose idempotency key was seen before.
fn replay(existing: CommandRow, idem: &Idempotency) -> StoreResult<Created> {
    if existing.request_hash.as_deref() != Some(idem.request_hash.as_str()) {
        return Err(StoreError::IdempotencyMismatch);
    }
    Ok(Created {
        command: existing.into_command()?.0,
        created: false,
    })
}

#[cfg(test)]
mod query_plans;
