//! The SQLite backend: one database file, WAL, migrations applied at open.
//!
//! Concurrency: SQLite runs one writer at a time; every state change here is a single
//! statement (or a transaction that starts by writing), so writers queue on the busy timeout
//! instead of failing, and each change is atomic. Fencing is done by conditional `UPDATE`s
//! (`WHERE status = 'executing' AND claim_token = ?`); when one touches no row, a second read
//! tells a missing command (`NotFound`) from a stale claim (`StaleClaim`).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::types::Json;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::backoff::retry_backoff;
use crate::clock::Clock;
use crate::error::{StoreError, StoreResult};
use crate::model::{
    Agent, AgentId, ApiKey, ApiKeyId, CheckIn, ClaimToken, Claimed, Command, CommandFilter,
    CommandId, CommandStatus, Created, CreatedApiKey, DeadReason, Idempotency, Lease, NewApiKey,
    NewCommand, OrgId, Organisation, Page, Principal, ReleaseOutcome, Released, Scope, Target,
};
use crate::store::{MAX_CLAIM_BATCH, MAX_PAGE_SIZE, Store};
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
    /// Connections in the pool (readers run in parallel; writers take turns).
    pub max_connections: u32,
    /// How long a writer waits for another one before giving up.
    pub busy_timeout: Duration,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        Self {
            synchronous: Synchronous::Full,
            max_connections: 4,
            busy_timeout: Duration::from_secs(5),
        }
    }
}

/// The [`Store`] on an SQLite file.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
    clock: Arc<dyn Clock>,
}

/// How many times a key is generated again when its random prefix is taken.
const PREFIX_ATTEMPTS: u32 = 3;

/// The command columns, in [`CommandRow`] order.
const COMMAND_COLUMNS: &str = "id, org_id, command_type, target_agent_id, queue, params, \
     priority, run_at, max_attempts, lease_duration_ms, status, attempts, claim_token, \
     lease_expires_at, claimed_by, progress, result, error, dead_reason, cancel_requested, \
     idempotency_key, request_hash, created_at, updated_at, finished_at";

const AGENT_COLUMNS: &str = "id, org_id, name, version, metadata, queues, boot_id, boot_count, \
     booted_at, last_seen_at, created_at";

const API_KEY_COLUMNS: &str =
    "id, org_id, name, prefix, token_hash, scopes, agent_id, created_at, revoked_at";

/// The pending commands an agent may claim (numbered parameters: 1 = agent, 2 = org,
/// 3 = queues as a JSON array).
const CLAIMABLE: &str = "org_id = ?2 AND status = 'pending' \
     AND (target_agent_id = ?1 \
          OR (target_agent_id IS NULL AND queue IN (SELECT value FROM json_each(?3))))";

impl SqliteStore {
    /// Opens (creating it if needed) the database at `path` and applies the migrations.
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
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .connect_with(connect)
            .await?;
        sqlx::migrate!("./migrations/sqlite").run(&pool).await?;
        Ok(Self { pool, clock })
    }

    /// The connection pool (for health checks).
    pub fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    fn now_and_micros(&self) -> (OffsetDateTime, i64) {
        let now = truncate_to_micros(self.clock.now());
        (now, to_micros(now))
    }

    /// After a fenced update touched nothing: `NotFound` if the command is not in `org`,
    /// `StaleClaim` otherwise.
    async fn stale_or_missing(&self, org: OrgId, id: CommandId) -> StoreError {
        match self.command_status(org, id).await {
            Ok(Some(_)) => StoreError::StaleClaim,
            Ok(None) => StoreError::NotFound,
            Err(err) => err,
        }
    }

    /// Applies `set` (SQL assignments; `?1` is now) to the command if its status is one of
    /// `from` (a SQL list of quoted statuses); otherwise `NotFound` or `InvalidState` saying it
    /// cannot be `verb`. Both arguments are constants of this file, never caller input.
    async fn change_status(
        &self,
        org: OrgId,
        id: CommandId,
        set: &str,
        from: &str,
        verb: &str,
    ) -> StoreResult<Command> {
        let (_, now_us) = self.now_and_micros();
        let row: Option<CommandRow> = sqlx::query_as(&format!(
            "UPDATE commands SET {set}, updated_at = ?1 \
             WHERE org_id = ?2 AND id = ?3 AND status IN ({from}) \
             RETURNING {COMMAND_COLUMNS}"
        ))
        .bind(now_us)
        .bind(org)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(row.into_command()?.0),
            None => Err(self.invalid_or_missing(org, id, verb).await),
        }
    }

    /// After a conditional update touched nothing: `NotFound` if the command is not in `org`,
    /// `InvalidState` (naming its status and what could not be done) otherwise.
    async fn invalid_or_missing(&self, org: OrgId, id: CommandId, verb: &str) -> StoreError {
        match self.command_status(org, id).await {
            Ok(Some(status)) => {
                StoreError::InvalidState(format!("the command is {status}: it cannot be {verb}"))
            }
            Ok(None) => StoreError::NotFound,
            Err(err) => err,
        }
    }

    async fn command_status(&self, org: OrgId, id: CommandId) -> StoreResult<Option<String>> {
        Ok(
            sqlx::query_scalar("SELECT status FROM commands WHERE org_id = ? AND id = ?")
                .bind(org)
                .bind(id)
                .fetch_optional(&self.pool)
                .await?,
        )
    }

    async fn agent_exists(&self, org: OrgId, agent: AgentId) -> StoreResult<bool> {
        let found: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM agents WHERE org_id = ? AND id = ?")
                .bind(org)
                .bind(agent)
                .fetch_optional(&self.pool)
                .await?;
        Ok(found.is_some())
    }

    async fn command_by_key(&self, org: OrgId, key: &str) -> StoreResult<Option<CommandRow>> {
        Ok(sqlx::query_as(&format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE org_id = ? AND idempotency_key = ?"
        ))
        .bind(org)
        .bind(key)
        .fetch_optional(&self.pool)
        .await?)
    }

    async fn insert_api_key(
        &self,
        conn: &mut sqlx::SqliteConnection,
        org: OrgId,
        key: &NewApiKey,
        scopes: &[Scope],
        agent: Option<AgentId>,
        now_us: i64,
    ) -> StoreResult<CreatedApiKey> {
        let scope_names: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
        let mut attempt = 0;
        loop {
            attempt += 1;
            let new = token::generate();
            let inserted = sqlx::query_as::<_, ApiKeyRow>(&format!(
                "INSERT INTO api_keys (id, org_id, name, prefix, token_hash, scopes, agent_id, \
                 created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING {API_KEY_COLUMNS}"
            ))
            .bind(ApiKeyId::new())
            .bind(org)
            .bind(&key.name)
            .bind(&new.prefix)
            .bind(&new.hash)
            .bind(Json(&scope_names))
            .bind(agent)
            .bind(now_us)
            .fetch_one(&mut *conn)
            .await
            .map_err(StoreError::from);
            match inserted {
                Ok(row) => {
                    return Ok(CreatedApiKey {
                        key: row.into_api_key()?,
                        token: new.token,
                    });
                }
                // Only the random prefix can collide: draw another token.
                Err(StoreError::Conflict(_)) if attempt < PREFIX_ATTEMPTS => {}
                Err(err) => return Err(err),
            }
        }
    }

    async fn list_page(
        &self,
        org: OrgId,
        filter: CommandFilter,
        cursor: Option<CommandId>,
        limit: u32,
    ) -> StoreResult<Page> {
        let limit = limit.clamp(1, MAX_PAGE_SIZE);
        let rows: Vec<CommandRow> = sqlx::query_as(&format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE org_id = ?1 \
             AND (?2 IS NULL OR status = ?2) \
             AND (?3 IS NULL OR target_agent_id = ?3) \
             AND (?4 IS NULL OR queue = ?4) \
             AND (?5 IS NULL OR command_type = ?5) \
             AND (?6 IS NULL OR id < ?6) \
             ORDER BY id DESC LIMIT ?7"
        ))
        .bind(org)
        .bind(filter.status.map(CommandStatus::as_str))
        .bind(filter.agent)
        .bind(filter.queue)
        .bind(filter.command_type)
        .bind(cursor)
        // One more than asked, to know whether there is a next page.
        .bind(i64::from(limit) + 1)
        .fetch_all(&self.pool)
        .await?;
        let mut items = rows
            .into_iter()
            .map(|row| row.into_command().map(|(command, _)| command))
            .collect::<StoreResult<Vec<_>>>()?;
        let next_cursor = if items.len() > limit as usize {
            items.truncate(limit as usize);
            items.last().map(|c| c.id)
        } else {
            None
        };
        Ok(Page { items, next_cursor })
    }
}

#[async_trait]
impl Store for SqliteStore {
    fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    async fn close(&self) {
        // Closing the pool waits for the connections, and SQLite checkpoints the WAL.
        self.pool.close().await;
    }

    async fn create_organisation(&self, name: &str) -> StoreResult<Organisation> {
        if name.trim().is_empty() {
            return Err(StoreError::InvalidInput(
                "organisation name is empty".to_owned(),
            ));
        }
        let (_, now_us) = self.now_and_micros();
        let row: OrgRow = sqlx::query_as(
            "INSERT INTO organisations (id, name, created_at) VALUES (?, ?, ?) \
             RETURNING id, name, created_at",
        )
        .bind(OrgId::new())
        .bind(name)
        .bind(now_us)
        .fetch_one(&self.pool)
        .await
        .map_err(|err| {
            conflict_as(
                StoreError::from(err),
                format!("organisation `{name}` exists"),
            )
        })?;
        row.into_organisation()
    }

    async fn list_organisations(&self) -> StoreResult<Vec<Organisation>> {
        let rows: Vec<OrgRow> =
            sqlx::query_as("SELECT id, name, created_at FROM organisations ORDER BY name")
                .fetch_all(&self.pool)
                .await?;
        rows.into_iter().map(OrgRow::into_organisation).collect()
    }

    async fn find_org_by_name(&self, name: &str) -> StoreResult<Option<Organisation>> {
        let row: Option<OrgRow> =
            sqlx::query_as("SELECT id, name, created_at FROM organisations WHERE name = ?")
                .bind(name)
                .fetch_optional(&self.pool)
                .await?;
        row.map(OrgRow::into_organisation).transpose()
    }

    async fn create_api_key(&self, org: OrgId, key: NewApiKey) -> StoreResult<CreatedApiKey> {
        let scopes: Vec<Scope> = Scope::ALL
            .iter()
            .copied()
            .filter(|s| key.scopes.contains(s))
            .collect();
        if scopes.is_empty() {
            return Err(StoreError::InvalidInput(
                "an API key needs a scope".to_owned(),
            ));
        }
        let agent_name = match (scopes.contains(&Scope::Agent), &key.agent_name) {
            (true, Some(name)) if !name.trim().is_empty() => Some(name.clone()),
            (true, _) => {
                return Err(StoreError::InvalidInput(
                    "an agent key needs an agent name".to_owned(),
                ));
            }
            (false, Some(_)) => {
                return Err(StoreError::InvalidInput(
                    "only a key with the agent scope is bound to an agent".to_owned(),
                ));
            }
            (false, None) => None,
        };
        let (_, now_us) = self.now_and_micros();
        let mut tx = self.pool.begin().await?;
        let agent = match agent_name {
            Some(name) => {
                // The first statement writes, so the transaction takes the write lock at once
                // (a deferred transaction that read first could not upgrade under WAL).
                sqlx::query(
                    "INSERT INTO agents (id, org_id, name, created_at) VALUES (?, ?, ?, ?) \
                     ON CONFLICT (org_id, name) DO NOTHING",
                )
                .bind(AgentId::new())
                .bind(org)
                .bind(&name)
                .bind(now_us)
                .execute(&mut *tx)
                .await
                .map_err(|err| missing_as(StoreError::from(err), StoreError::NotFound))?;
                let id: AgentId =
                    sqlx::query_scalar("SELECT id FROM agents WHERE org_id = ? AND name = ?")
                        .bind(org)
                        .bind(&name)
                        .fetch_one(&mut *tx)
                        .await?;
                Some(id)
            }
            None => None,
        };
        let created = self
            .insert_api_key(&mut tx, org, &key, &scopes, agent, now_us)
            .await
            .map_err(|err| missing_as(err, StoreError::NotFound))?;
        tx.commit().await?;
        Ok(created)
    }

    async fn list_api_keys(&self, org: OrgId) -> StoreResult<Vec<ApiKey>> {
        let rows: Vec<ApiKeyRow> = sqlx::query_as(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE org_id = ? ORDER BY created_at, id"
        ))
        .bind(org)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(ApiKeyRow::into_api_key).collect()
    }

    async fn revoke_api_key(&self, org: OrgId, key: ApiKeyId) -> StoreResult<()> {
        let (_, now_us) = self.now_and_micros();
        let done = sqlx::query(
            "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE org_id = ? AND id = ?",
        )
        .bind(now_us)
        .bind(org)
        .bind(key)
        .execute(&self.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(StoreError::NotFound);
        }
        Ok(())
    }

    async fn authenticate(&self, token: &str) -> StoreResult<Option<Principal>> {
        let Some(prefix) = token::prefix_of(token) else {
            return Ok(None);
        };
        let row: Option<ApiKeyRow> = sqlx::query_as(&format!(
            "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE prefix = ?"
        ))
        .bind(prefix)
        .fetch_optional(&self.pool)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        if row.revoked_at.is_some() || !token::matches(token, &row.token_hash) {
            return Ok(None);
        }
        let key = row.into_api_key()?;
        Ok(Some(Principal {
            key_id: key.id,
            org_id: key.org_id,
            scopes: key.scopes,
            agent_id: key.agent_id,
        }))
    }

    async fn check_in(&self, org: OrgId, agent: AgentId, check_in: CheckIn) -> StoreResult<Agent> {
        if !check_in.metadata.is_object() {
            return Err(StoreError::InvalidInput(
                "agent metadata must be a JSON object".to_owned(),
            ));
        }
        let (_, now_us) = self.now_and_micros();
        // SET expressions read the row as it was, so `boot_id IS ?` compares with the old boot.
        // The name is the key's agent's: a check-in may state it (and must state it right), never
        // change it.
        let row: Option<AgentRow> = sqlx::query_as(&format!(
            "UPDATE agents SET \
               version = ?2, metadata = ?3, queues = ?4, \
               boot_count = CASE WHEN boot_id IS ?5 THEN boot_count ELSE boot_count + 1 END, \
               booted_at = CASE WHEN boot_id IS ?5 THEN booted_at ELSE ?6 END, \
               boot_id = ?5, last_seen_at = ?6 \
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
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => row.into_agent(),
            None => match self.get_agent(org, agent).await? {
                Some(existing) => Err(StoreError::InvalidInput(format!(
                    "name: this key acts as agent `{}`",
                    existing.name
                ))),
                None => Err(StoreError::UnknownAgent),
            },
        }
    }

    async fn get_agent(&self, org: OrgId, agent: AgentId) -> StoreResult<Option<Agent>> {
        let row: Option<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE org_id = ? AND id = ?"
        ))
        .bind(org)
        .bind(agent)
        .fetch_optional(&self.pool)
        .await?;
        row.map(AgentRow::into_agent).transpose()
    }

    async fn list_agents(&self, org: OrgId) -> StoreResult<Vec<Agent>> {
        let rows: Vec<AgentRow> = sqlx::query_as(&format!(
            "SELECT {AGENT_COLUMNS} FROM agents WHERE org_id = ? ORDER BY name"
        ))
        .bind(org)
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(AgentRow::into_agent).collect()
    }

    async fn create_command(
        &self,
        org: OrgId,
        command: NewCommand,
        idempotency: Option<Idempotency>,
    ) -> StoreResult<Created> {
        if let Some(idem) = &idempotency
            && let Some(existing) = self.command_by_key(org, &idem.key).await?
        {
            return replay(existing, idem);
        }
        validate_new_command(&command)?;
        let (target_agent, queue) = match &command.target {
            Target::Agent(agent) => (Some(*agent), None),
            Target::Queue(queue) => (None, Some(queue.as_str())),
        };
        if let Some(agent) = target_agent
            && !self.agent_exists(org, agent).await?
        {
            return Err(StoreError::UnknownAgent);
        }
        let (_, now_us) = self.now_and_micros();
        let run_at = command
            .run_at
            .map_or(now_us, |t| to_micros(truncate_to_micros(t)));
        let inserted: Option<CommandRow> = sqlx::query_as(&format!(
            "INSERT INTO commands (id, org_id, command_type, target_agent_id, queue, params, \
               priority, run_at, max_attempts, lease_duration_ms, status, idempotency_key, \
               request_hash, created_at, updated_at) \
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?) \
             ON CONFLICT (org_id, idempotency_key) DO NOTHING \
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
        .fetch_optional(&self.pool)
        .await
        .map_err(|err| {
            let missing = if target_agent.is_some() {
                StoreError::UnknownAgent
            } else {
                StoreError::NotFound
            };
            missing_as(StoreError::from(err), missing)
        })?;
        match (inserted, idempotency) {
            (Some(row), _) => Ok(Created {
                command: row.into_command()?.0,
                created: true,
            }),
            // The insert lost a race with another request under the same key.
            (None, Some(idem)) => match self.command_by_key(org, &idem.key).await? {
                Some(existing) => replay(existing, &idem),
                None => Err(StoreError::Conflict(
                    "idempotency key taken and released concurrently".to_owned(),
                )),
            },
            (None, None) => Err(StoreError::Conflict("command id taken".to_owned())),
        }
    }

    async fn get_command(&self, org: OrgId, id: CommandId) -> StoreResult<Option<Command>> {
        let row: Option<CommandRow> = sqlx::query_as(&format!(
            "SELECT {COMMAND_COLUMNS} FROM commands WHERE org_id = ? AND id = ?"
        ))
        .bind(org)
        .bind(id)
        .fetch_optional(&self.pool)
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
        self.change_status(
            org,
            id,
            "status = CASE WHEN status = 'pending' THEN 'cancelled' ELSE status END, \
             finished_at = CASE WHEN status = 'pending' THEN ?1 ELSE finished_at END, \
             cancel_requested = CASE WHEN status = 'executing' THEN 1 ELSE cancel_requested END",
            "'pending', 'executing'",
            "cancelled",
        )
        .await
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
        let (_, now_us) = self.now_and_micros();
        // A read first: most claims of idle agents and long polls find nothing, and a read does
        // not queue for SQLite's one write lock as the claiming `UPDATE` does.
        let due: bool = sqlx::query_scalar(&format!(
            "SELECT EXISTS (SELECT 1 FROM commands WHERE {CLAIMABLE} AND run_at <= ?4)"
        ))
        .bind(agent)
        .bind(org)
        .bind(Json(queues))
        .bind(now_us)
        .fetch_one(&self.pool)
        .await?;
        if !due {
            return if self.agent_exists(org, agent).await? {
                Ok(Vec::new())
            } else {
                Err(StoreError::UnknownAgent)
            };
        }
        let rows: Vec<CommandRow> = sqlx::query_as(&format!(
            "UPDATE commands SET \
               status = 'executing', attempts = attempts + 1, \
               claim_token = lower(hex(randomblob(16))), \
               lease_expires_at = ?4 + lease_duration_ms * 1000, \
               claimed_by = ?1, updated_at = ?4 \
             WHERE status = 'pending' AND id IN ( \
               SELECT id FROM commands WHERE {CLAIMABLE} AND run_at <= ?4 \
               ORDER BY priority DESC, created_at, id LIMIT ?5) \
             RETURNING {COMMAND_COLUMNS}"
        ))
        .bind(agent)
        .bind(org)
        .bind(Json(queues))
        .bind(now_us)
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await
        .map_err(|err| missing_as(StoreError::from(err), StoreError::UnknownAgent))?;
        if rows.is_empty() && !self.agent_exists(org, agent).await? {
            return Err(StoreError::UnknownAgent);
        }
        let mut claimed = rows
            .into_iter()
            .map(CommandRow::into_claimed)
            .collect::<StoreResult<Vec<_>>>()?;
        // RETURNING gives no order; hand them out in claim order.
        claimed.sort_by(|a, b| {
            b.command
                .priority
                .cmp(&a.command.priority)
                .then(a.command.created_at.cmp(&b.command.created_at))
                .then(a.command.id.cmp(&b.command.id))
        });
        Ok(claimed)
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
        let row: Option<(i64, bool)> = sqlx::query_as(
            "UPDATE commands SET \
               lease_expires_at = ?1 + lease_duration_ms * 1000, \
               progress = COALESCE(?2, progress), updated_at = ?1 \
             WHERE org_id = ?3 AND id = ?4 AND status = 'executing' AND claim_token = ?5 \
               AND claimed_by = ?6 \
             RETURNING lease_expires_at, cancel_requested",
        )
        .bind(now_us)
        .bind(progress.map(Json))
        .bind(org)
        .bind(id)
        .bind(token.as_str())
        .bind(agent)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some((expires_at, cancel_requested)) => Ok(Lease {
                expires_at: from_micros(expires_at)?,
                cancel_requested,
            }),
            None => Err(self.stale_or_missing(org, id).await),
        }
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
        let row: Option<CommandRow> = sqlx::query_as(&format!(
            "UPDATE commands SET \
               status = 'completed', result = ?1, claim_token = NULL, lease_expires_at = NULL, \
               finished_at = ?2, updated_at = ?2 \
             WHERE org_id = ?3 AND id = ?4 AND status = 'executing' AND claim_token = ?5 \
               AND claimed_by = ?6 \
             RETURNING {COMMAND_COLUMNS}"
        ))
        .bind(Json(&result))
        .bind(now_us)
        .bind(org)
        .bind(id)
        .bind(token.as_str())
        .bind(agent)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(row.into_command()?.0),
            None => Err(self.stale_or_missing(org, id).await),
        }
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
        // The backoff depends on the attempts so far: read them, then update fenced on them as
        // well as on the token, so the delay matches the row that is changed.
        let current: Option<(String, Option<String>, Option<AgentId>, i64)> = sqlx::query_as(
            "SELECT status, claim_token, claimed_by, attempts FROM commands \
             WHERE org_id = ? AND id = ?",
        )
        .bind(org)
        .bind(id)
        .fetch_optional(&self.pool)
        .await?;
        let Some((status, claim_token, holder, attempts)) = current else {
            return Err(StoreError::NotFound);
        };
        if status != CommandStatus::Executing.as_str()
            || claim_token.as_deref() != Some(token.as_str())
            || holder != Some(agent)
        {
            return Err(StoreError::StaleClaim);
        }
        let (now, now_us) = self.now_and_micros();
        let delay = retry_backoff(
            u32::try_from(attempts).unwrap_or(u32::MAX),
            &mut rand::rng(),
        );
        let retry_at =
            to_micros(now.saturating_add(delay.try_into().unwrap_or(time::Duration::MAX)));
        // `cancel_requested` is read inside the statement, so a cancel that lands between the
        // read above and this update still ends the command `cancelled`.
        let row: Option<CommandRow> = sqlx::query_as(&format!(
            "UPDATE commands SET \
               status = CASE WHEN cancel_requested THEN 'cancelled' \
                             WHEN ?1 AND attempts < max_attempts THEN 'pending' \
                             ELSE 'failed' END, \
               run_at = CASE WHEN NOT cancel_requested AND ?1 AND attempts < max_attempts \
                             THEN ?2 ELSE run_at END, \
               finished_at = CASE WHEN NOT cancel_requested AND ?1 AND attempts < max_attempts \
                             THEN NULL ELSE ?3 END, \
               error = ?4, claim_token = NULL, lease_expires_at = NULL, updated_at = ?3 \
             WHERE org_id = ?5 AND id = ?6 AND status = 'executing' AND claim_token = ?7 \
               AND attempts = ?8 AND claimed_by = ?9 \
             RETURNING {COMMAND_COLUMNS}"
        ))
        .bind(retryable)
        .bind(retry_at)
        .bind(now_us)
        .bind(Json(&error))
        .bind(org)
        .bind(id)
        .bind(token.as_str())
        .bind(attempts)
        .bind(agent)
        .fetch_optional(&self.pool)
        .await?;
        match row {
            Some(row) => Ok(row.into_command()?.0),
            None => Err(self.stale_or_missing(org, id).await),
        }
    }

    async fn release_expired_leases(&self, org: Option<OrgId>) -> StoreResult<Vec<Released>> {
        let (_, now_us) = self.now_and_micros();
        // One statement: each command is released entirely or not at all, and a heartbeat or a
        // completion that commits first keeps its command out of it (its lease is renewed or its
        // status changed).
        let rows: Vec<(CommandId, OrgId, i64, String)> = sqlx::query_as(
            "UPDATE commands SET \
               status = CASE WHEN cancel_requested THEN 'cancelled' \
                             WHEN attempts < max_attempts THEN 'pending' \
                             ELSE 'dead' END, \
               dead_reason = CASE WHEN NOT cancel_requested AND attempts >= max_attempts \
                             THEN 'lease_expired' ELSE NULL END, \
               run_at = CASE WHEN NOT cancel_requested AND attempts < max_attempts \
                             THEN ?1 ELSE run_at END, \
               finished_at = CASE WHEN NOT cancel_requested AND attempts < max_attempts \
                             THEN NULL ELSE ?1 END, \
               claim_token = NULL, lease_expires_at = NULL, updated_at = ?1 \
             WHERE status = 'executing' AND lease_expires_at < ?1 AND (?2 IS NULL OR org_id = ?2) \
             RETURNING id, org_id, attempts, status",
        )
        .bind(now_us)
        .bind(org)
        .fetch_all(&self.pool)
        .await?;
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
                    attempts: to_u32(attempts)?,
                    outcome,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        released.sort_by_key(|r| r.command_id);
        Ok(released)
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

    async fn requeue(&self, org: OrgId, id: CommandId) -> StoreResult<Command> {
        self.change_status(
            org,
            id,
            "status = 'pending', attempts = 0, dead_reason = NULL, run_at = ?1, \
             finished_at = NULL, cancel_requested = 0",
            "'dead', 'failed'",
            "requeued",
        )
        .await
    }

    async fn next_due_at(
        &self,
        org: OrgId,
        agent: AgentId,
        queues: &[String],
    ) -> StoreResult<Option<OffsetDateTime>> {
        let due: Option<i64> = sqlx::query_scalar(&format!(
            "SELECT MIN(run_at) FROM commands WHERE {CLAIMABLE}"
        ))
        .bind(agent)
        .bind(org)
        .bind(Json(queues))
        .fetch_one(&self.pool)
        .await?;
        due.map(from_micros).transpose()
    }
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

fn validate_new_command(command: &NewCommand) -> StoreResult<()> {
    let invalid = |msg: &str| Err(StoreError::InvalidInput(msg.to_owned()));
    if command.command_type.trim().is_empty() {
        return invalid("command type is empty");
    }
    if let Target::Queue(queue) = &command.target
        && queue.trim().is_empty()
    {
        return invalid("queue name is empty");
    }
    if command.max_attempts == 0 {
        return invalid("max_attempts must be at least 1");
    }
    if command.lease_duration < Duration::from_millis(1) {
        return invalid("lease_duration must be at least 1 ms");
    }
    Ok(())
}

/// Rewrites a `Conflict` with a message that names what exists.
fn conflict_as(err: StoreError, message: String) -> StoreError {
    match err {
        StoreError::Conflict(_) => StoreError::Conflict(message),
        other => other,
    }
}

/// Turns a foreign key violation (a referenced row is missing) into `missing`.
fn missing_as(err: StoreError, missing: StoreError) -> StoreError {
    if err.is_foreign_key_violation() {
        missing
    } else {
        err
    }
}

// --- encoding ---

fn truncate_to_micros(t: OffsetDateTime) -> OffsetDateTime {
    from_micros(to_micros(t)).unwrap_or(t)
}

fn to_micros(t: OffsetDateTime) -> i64 {
    let micros = t.unix_timestamp_nanos().div_euclid(1000);
    i64::try_from(micros).unwrap_or(if micros < 0 { i64::MIN } else { i64::MAX })
}

fn from_micros(micros: i64) -> StoreResult<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .map_err(|err| corrupt(format!("instant {micros} µs: {err}")))
}

fn duration_millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn to_u32(value: i64) -> StoreResult<u32> {
    u32::try_from(value).map_err(|_| corrupt(format!("{value} is not a count")))
}

fn parse_status(status: &str) -> StoreResult<CommandStatus> {
    status.parse().map_err(corrupt)
}

/// A stored value the code cannot read back.
fn corrupt(what: impl ToString) -> StoreError {
    StoreError::Database(sqlx::Error::Decode(what.to_string().into()))
}

#[derive(sqlx::FromRow)]
struct OrgRow {
    id: OrgId,
    name: String,
    created_at: i64,
}

impl OrgRow {
    fn into_organisation(self) -> StoreResult<Organisation> {
        Ok(Organisation {
            id: self.id,
            name: self.name,
            created_at: from_micros(self.created_at)?,
        })
    }
}

#[derive(sqlx::FromRow)]
struct ApiKeyRow {
    id: ApiKeyId,
    org_id: OrgId,
    name: String,
    prefix: String,
    token_hash: String,
    scopes: Json<Vec<String>>,
    agent_id: Option<AgentId>,
    created_at: i64,
    revoked_at: Option<i64>,
}

impl ApiKeyRow {
    fn into_api_key(self) -> StoreResult<ApiKey> {
        let scopes = self
            .scopes
            .0
            .iter()
            .map(|s| s.parse::<Scope>().map_err(corrupt))
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(ApiKey {
            id: self.id,
            org_id: self.org_id,
            name: self.name,
            prefix: self.prefix,
            scopes,
            agent_id: self.agent_id,
            created_at: from_micros(self.created_at)?,
            revoked_at: self.revoked_at.map(from_micros).transpose()?,
        })
    }
}

#[derive(sqlx::FromRow)]
struct AgentRow {
    id: AgentId,
    org_id: OrgId,
    name: String,
    version: Option<String>,
    metadata: Json<Value>,
    queues: Json<Vec<String>>,
    boot_id: Option<Uuid>,
    boot_count: i64,
    booted_at: Option<i64>,
    last_seen_at: Option<i64>,
    created_at: i64,
}

impl AgentRow {
    fn into_agent(self) -> StoreResult<Agent> {
        Ok(Agent {
            id: self.id,
            org_id: self.org_id,
            name: self.name,
            version: self.version,
            metadata: self.metadata.0,
            queues: self.queues.0,
            boot_id: self.boot_id,
            boot_count: to_u32(self.boot_count)?,
            booted_at: self.booted_at.map(from_micros).transpose()?,
            last_seen_at: self.last_seen_at.map(from_micros).transpose()?,
            created_at: from_micros(self.created_at)?,
        })
    }
}

#[derive(sqlx::FromRow)]
struct CommandRow {
    id: CommandId,
    org_id: OrgId,
    command_type: String,
    target_agent_id: Option<AgentId>,
    queue: Option<String>,
    params: Json<Value>,
    priority: i32,
    run_at: i64,
    max_attempts: i64,
    lease_duration_ms: i64,
    status: String,
    attempts: i64,
    claim_token: Option<String>,
    lease_expires_at: Option<i64>,
    claimed_by: Option<AgentId>,
    progress: Option<Json<Value>>,
    result: Option<Json<Value>>,
    error: Option<Json<Value>>,
    dead_reason: Option<String>,
    cancel_requested: bool,
    idempotency_key: Option<String>,
    request_hash: Option<String>,
    created_at: i64,
    updated_at: i64,
    finished_at: Option<i64>,
}

impl CommandRow {
    /// The command, and its claim token if it is executing.
    fn into_command(self) -> StoreResult<(Command, Option<ClaimToken>)> {
        let target = match (self.target_agent_id, self.queue) {
            (Some(agent), None) => Target::Agent(agent),
            (None, Some(queue)) => Target::Queue(queue),
            _ => return Err(corrupt(format!("command {}: bad target", self.id))),
        };
        let command = Command {
            id: self.id,
            org_id: self.org_id,
            command_type: self.command_type,
            target,
            params: self.params.0,
            priority: self.priority,
            run_at: from_micros(self.run_at)?,
            max_attempts: to_u32(self.max_attempts)?,
            lease_duration: Duration::from_millis(
                u64::try_from(self.lease_duration_ms).map_err(corrupt)?,
            ),
            status: parse_status(&self.status)?,
            attempts: to_u32(self.attempts)?,
            claimed_by: self.claimed_by,
            lease_expires_at: self.lease_expires_at.map(from_micros).transpose()?,
            progress: self.progress.map(|j| j.0),
            result: self.result.map(|j| j.0),
            error: self.error.map(|j| j.0),
            dead_reason: self
                .dead_reason
                .map(|r| r.parse::<DeadReason>().map_err(corrupt))
                .transpose()?,
            cancel_requested: self.cancel_requested,
            idempotency_key: self.idempotency_key,
            created_at: from_micros(self.created_at)?,
            updated_at: from_micros(self.updated_at)?,
            finished_at: self.finished_at.map(from_micros).transpose()?,
        };
        Ok((command, self.claim_token.map(ClaimToken)))
    }

    fn into_claimed(self) -> StoreResult<Claimed> {
        let (command, token) = self.into_command()?;
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
