//! The PostgreSQL backend: several keel instances share one database.
//!
//! - `accounts`: organisations, API and operator keys, agents, labels, cordons, paused queues.
//! - `commands`: commands and the lease engine (claim with `FOR UPDATE SKIP LOCKED`,
//!   heartbeat, complete, fail, release, requeue, hand-back, attempts, retention) and
//!   broadcasts.
//! - `schedules`: schedules and their fire times.
//! - `notifications`: notification settings, events and deliveries.
//!
//! Every instant the store writes comes from the database's clock through the SQL function
//! `keel_now()` (see the first migration), so instances on several machines agree on leases
//! and due times. A test injects its own [`Clock`]: each connection then carries it in the
//! setting `keel.now`, refreshed whenever the pool hands the connection out.
//!
//! Migrations are embedded (`migrations/postgres`). [`PgStore::connect`] applies none; keel
//! applies them with [`PgStore::migrate`] (`keel migrate`, and `keel serve` at start) and
//! refuses a database whose schema is newer than itself ([`PgStore::check_schema`]).

mod accounts;
mod broadcasts;
mod commands;
mod create_groups;
mod groups;
mod notifications;
mod report_groups;
mod schedules;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Executor, PgConnection};
use time::OffsetDateTime;

use crate::clock::{Clock, SystemClock};
use crate::crash::{self, Phase, Step};
use crate::error::{StoreError, StoreResult};
use crate::labels::Labels;
use crate::model::{
    Agent, AgentId, ApiKey, ApiKeyId, Attempt, CheckIn, ClaimToken, Claimed, Command,
    CommandFilter, CommandId, CommandStatus, Created, CreatedApiKey, CreatedOperatorKey,
    FinishedCount, Idempotency, Lease, NewApiKey, NewBroadcast, NewCommand, NewCommandItem,
    OperatorKey, OperatorKeyId, OrgId, Organisation, Page, PausedQueue, Principal, Released,
};
use crate::model::{ScheduleId, ScheduleState};
use crate::schedule::{
    AdvanceOutcome, NewSchedule, Schedule, ScheduleAdvance, ScheduleFire, SchedulePage,
};
use crate::store::Store;

/// The embedded PostgreSQL migrations.
pub static MIGRATOR: Migrator = sqlx::migrate!("./migrations/postgres");

/// How to reach the PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// `postgres://user:password@host:port/database` (libpq's URL form, with its parameters).
    pub url: SecretString,
    /// The most connections this instance opens.
    pub max_connections: u32,
    /// Connections kept open while idle.
    pub min_connections: u32,
    /// How long an operation waits for a free connection (or for a new one to open) before it
    /// fails with `Busy` (503 with `Retry-After`).
    pub acquire_timeout: Duration,
    /// The schema keel's tables live in (`search_path`); `None`: the database's default
    /// (`public`).
    pub schema: Option<String>,
}

impl PgOptions {
    /// Options for `url` with the default pool settings.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: SecretString::from(url.into()),
            max_connections: 16,
            min_connections: 1,
            acquire_timeout: Duration::from_secs(5),
            schema: None,
        }
    }
}

/// Whether `url` names a PostgreSQL database (`postgres://` or `postgresql://`).
pub fn is_postgres_url(url: &str) -> bool {
    url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// The [`Store`] on a PostgreSQL database.
#[derive(Debug, Clone)]
pub struct PgStore {
    pool: PgPool,
    clock: Arc<dyn Clock>,
    /// Single creates, grouped into shared statements under load.
    creates: Arc<groups::Groups<create_groups::Creates>>,
    /// Completions, grouped into shared statements under load.
    reports: Arc<groups::Groups<report_groups::Completions>>,
}

impl PgStore {
    /// Opens a pool on the database; applies no migration. With `clock`, every instant the
    /// store writes is that clock's (tests); without, the database's `now()`.
    pub async fn connect(options: &PgOptions, clock: Option<Arc<dyn Clock>>) -> StoreResult<Self> {
        let mut connect: PgConnectOptions = options
            .url
            .expose_secret()
            .parse()
            .map_err(|err| StoreError::InvalidInput(format!("store.url: {err}")))?;
        connect = connect.application_name("keel");
        if let Some(schema) = &options.schema {
            connect = connect.options([("search_path", schema.as_str())]);
        }
        let mut pool = PgPoolOptions::new()
            .max_connections(options.max_connections.max(1))
            .min_connections(options.min_connections.min(options.max_connections))
            .acquire_timeout(options.acquire_timeout)
            // No ping before each use (a round trip per operation): a connection the server
            // dropped (a restart, a failover) fails its next operation with `Unavailable` (503,
            // `Retry-After`) and is replaced.
            .test_before_acquire(false);
        if let Some(clock) = clock.clone() {
            let on_connect = clock.clone();
            pool = pool
                .after_connect(move |conn, _| {
                    let clock = on_connect.clone();
                    Box::pin(async move { set_test_clock(conn, clock.now()).await })
                })
                .before_acquire(move |conn, _| {
                    let clock = clock.clone();
                    Box::pin(async move {
                        set_test_clock(conn, clock.now()).await?;
                        Ok(true)
                    })
                });
        }
        let pool = pool.connect_lazy_with(connect);
        Ok(Self {
            creates: Arc::new(groups::Groups::start(pool.clone())),
            reports: Arc::new(groups::Groups::start(pool.clone())),
            pool,
            clock: clock.unwrap_or_else(|| Arc::new(SystemClock)),
        })
    }

    /// The connection pool.
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Applies the embedded migrations that the database lacks (under PostgreSQL's advisory
    /// lock, so instances starting together apply each once). Refuses a newer schema.
    pub async fn migrate(&self) -> StoreResult<()> {
        self.check_schema().await?;
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// `Err` when the database holds a migration this keel does not know: a newer keel
    /// migrated it, and this one could misread its data.
    pub async fn check_schema(&self) -> StoreResult<()> {
        let table: Option<String> =
            sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
                .fetch_one(&self.pool)
                .await?;
        if table.is_none() {
            return Ok(());
        }
        let applied: Vec<i64> =
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations ORDER BY version")
                .fetch_all(&self.pool)
                .await?;
        let known: Vec<i64> = MIGRATOR.iter().map(|m| m.version).collect();
        match applied.iter().find(|version| !known.contains(version)) {
            Some(version) => Err(StoreError::InvalidInput(format!(
                "the database schema is newer than this keel (it has migration {version}, which \
                 this keel does not know): run a keel at least as new as the one that migrated it"
            ))),
            None => Ok(()),
        }
    }

    /// How many embedded migrations the database lacks.
    pub async fn pending_migrations(&self) -> StoreResult<usize> {
        let table: Option<String> =
            sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations')::text")
                .fetch_one(&self.pool)
                .await?;
        let applied: Vec<i64> = if table.is_some() {
            sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
                .fetch_all(&self.pool)
                .await?
        } else {
            Vec::new()
        };
        Ok(MIGRATOR
            .iter()
            .filter(|m| !applied.contains(&m.version))
            .count())
    }
}

/// Sets the injected clock's instant on a connection (`keel.now`, read by `keel_now()`).
/// Runs `query` (one statement of a batch: a claim, a release) and returns its rows. When
/// `store.crash` names `step`, it runs in a transaction of its own, so that the "before" point
/// comes after the statement, just before the `COMMIT`; both points only when it returned rows.
async fn fetch_all_or_crash<'q, O>(
    pool: &PgPool,
    step: Step,
    query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
) -> Result<Vec<O>, sqlx::Error>
where
    O: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin,
{
    if !crash::armed(step) {
        return query.fetch_all(pool).await;
    }
    let mut tx = pool.begin().await?;
    let rows = query.fetch_all(&mut *tx).await?;
    crash::point_if(step, Phase::Before, !rows.is_empty());
    tx.commit().await?;
    crash::point_if(step, Phase::After, !rows.is_empty());
    Ok(rows)
}

async fn set_test_clock(conn: &mut PgConnection, now: OffsetDateTime) -> Result<(), sqlx::Error> {
    conn.execute(
        sqlx::query("SELECT set_config('keel.now', $1::timestamptz::text, false)").bind(now),
    )
    .await?;
    Ok(())
}

#[async_trait]
impl Store for PgStore {
    fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    fn notifications(&self) -> &dyn crate::notifications::NotificationStore {
        self
    }

    async fn close(&self) {
        self.pool.close().await;
    }

    async fn create_organisation(&self, name: &str) -> StoreResult<Organisation> {
        accounts::create_organisation(self, name).await
    }

    async fn list_organisations(&self) -> StoreResult<Vec<Organisation>> {
        accounts::list_organisations(self).await
    }

    async fn find_org_by_name(&self, name: &str) -> StoreResult<Option<Organisation>> {
        accounts::find_org_by_name(self, name).await
    }

    async fn create_api_key(&self, org: OrgId, key: NewApiKey) -> StoreResult<CreatedApiKey> {
        accounts::create_api_key(self, org, key).await
    }

    async fn list_api_keys(&self, org: OrgId) -> StoreResult<Vec<ApiKey>> {
        accounts::list_api_keys(self, org).await
    }

    async fn revoke_api_key(&self, org: OrgId, key: ApiKeyId) -> StoreResult<()> {
        accounts::revoke_api_key(self, org, key).await
    }

    async fn authenticate(&self, token: &str) -> StoreResult<Option<Principal>> {
        accounts::authenticate(self, token).await
    }

    async fn create_operator_key(&self, name: &str) -> StoreResult<CreatedOperatorKey> {
        accounts::create_operator_key(self, name).await
    }

    async fn list_operator_keys(&self) -> StoreResult<Vec<OperatorKey>> {
        accounts::list_operator_keys(self).await
    }

    async fn revoke_operator_key(&self, key: OperatorKeyId) -> StoreResult<()> {
        accounts::revoke_operator_key(self, key).await
    }

    async fn authenticate_operator(&self, token: &str) -> StoreResult<Option<OperatorKey>> {
        accounts::authenticate_operator(self, token).await
    }

    async fn check_in(&self, org: OrgId, agent: AgentId, check_in: CheckIn) -> StoreResult<Agent> {
        accounts::check_in(self, org, agent, check_in).await
    }

    async fn get_agent(&self, org: OrgId, agent: AgentId) -> StoreResult<Option<Agent>> {
        accounts::get_agent(self, org, agent).await
    }

    async fn list_agents(&self, org: OrgId) -> StoreResult<Vec<Agent>> {
        accounts::list_agents(self, org).await
    }

    async fn set_agent_labels(
        &self,
        org: OrgId,
        agent: AgentId,
        labels: Labels,
    ) -> StoreResult<Agent> {
        accounts::set_agent_labels(self, org, agent, labels).await
    }

    async fn set_agent_cordoned(
        &self,
        org: OrgId,
        agent: AgentId,
        cordoned: bool,
    ) -> StoreResult<Agent> {
        accounts::set_agent_cordoned(self, org, agent, cordoned).await
    }

    async fn pause_queue(&self, org: OrgId, queue: &str) -> StoreResult<PausedQueue> {
        accounts::pause_queue(self, org, queue).await
    }

    async fn resume_queue(&self, org: OrgId, queue: &str) -> StoreResult<bool> {
        accounts::resume_queue(self, org, queue).await
    }

    async fn list_paused_queues(&self, org: OrgId) -> StoreResult<Vec<PausedQueue>> {
        accounts::list_paused_queues(self, org).await
    }

    async fn count_cordoned_and_paused(&self) -> StoreResult<(u64, u64)> {
        accounts::count_cordoned_and_paused(self).await
    }

    async fn create_command(
        &self,
        org: OrgId,
        command: NewCommand,
        idempotency: Option<Idempotency>,
    ) -> StoreResult<Created> {
        crash::around(
            Step::Create,
            commands::create_command(self, org, command, idempotency),
        )
        .await
    }

    async fn create_commands(
        &self,
        org: OrgId,
        items: Vec<NewCommandItem>,
    ) -> StoreResult<Vec<Created>> {
        crash::around(Step::Create, commands::create_commands(self, org, items)).await
    }

    async fn create_broadcast(
        &self,
        org: OrgId,
        broadcast: NewBroadcast,
        idempotency: Option<Idempotency>,
    ) -> StoreResult<Created> {
        crash::around(
            Step::Create,
            commands::create_broadcast(self, org, broadcast, idempotency),
        )
        .await
    }

    async fn find_idempotent(
        &self,
        org: OrgId,
        idempotency: &Idempotency,
    ) -> StoreResult<Option<Created>> {
        commands::find_idempotent(self, org, idempotency).await
    }

    async fn list_children(&self, org: OrgId, parent: CommandId) -> StoreResult<Vec<Command>> {
        commands::list_children(self, org, parent).await
    }

    async fn get_command(&self, org: OrgId, id: CommandId) -> StoreResult<Option<Command>> {
        commands::get_command(self, org, id).await
    }

    async fn list_commands(
        &self,
        org: OrgId,
        filter: CommandFilter,
        cursor: Option<CommandId>,
        limit: u32,
    ) -> StoreResult<Page> {
        commands::list_commands(self, org, filter, cursor, limit).await
    }

    async fn cancel_command(&self, org: OrgId, id: CommandId) -> StoreResult<Command> {
        crash::around(Step::Cancel, commands::cancel_command(self, org, id)).await
    }

    async fn claim(
        &self,
        org: OrgId,
        agent: AgentId,
        queues: &[String],
        limit: u32,
    ) -> StoreResult<Vec<Claimed>> {
        commands::claim(self, org, agent, queues, limit).await
    }

    async fn hand_back(
        &self,
        org: OrgId,
        agent: AgentId,
        claims: Vec<(CommandId, ClaimToken)>,
    ) -> StoreResult<u64> {
        crash::around(
            Step::HandBack,
            commands::hand_back(self, org, agent, claims),
        )
        .await
    }

    async fn list_attempts(&self, org: OrgId, id: CommandId) -> StoreResult<Vec<Attempt>> {
        commands::list_attempts(self, org, id).await
    }

    async fn heartbeat(
        &self,
        org: OrgId,
        agent: AgentId,
        id: CommandId,
        token: &ClaimToken,
        progress: Option<Value>,
    ) -> StoreResult<Lease> {
        crash::around(
            Step::Heartbeat,
            commands::heartbeat(self, org, agent, id, token, progress),
        )
        .await
    }

    async fn complete(
        &self,
        org: OrgId,
        agent: AgentId,
        id: CommandId,
        token: &ClaimToken,
        result: Value,
    ) -> StoreResult<Command> {
        crash::around(
            Step::Complete,
            commands::complete(self, org, agent, id, token, result),
        )
        .await
    }

    async fn complete_batch(
        &self,
        org: OrgId,
        agent: AgentId,
        reports: Vec<(CommandId, ClaimToken, Value)>,
    ) -> StoreResult<Vec<StoreResult<Command>>> {
        crash::around(
            Step::Complete,
            commands::complete_batch(self, org, agent, reports),
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
        crash::around(
            Step::Fail,
            commands::fail(self, org, agent, id, token, error, retryable),
        )
        .await
    }

    async fn release_expired_leases(
        &self,
        org: Option<OrgId>,
        limit: u32,
    ) -> StoreResult<Vec<Released>> {
        commands::release_expired_leases(self, org, limit).await
    }

    async fn purge_finished(&self, before: OffsetDateTime, limit: u32) -> StoreResult<u64> {
        commands::purge_finished(self, before, limit).await
    }

    async fn list_dead(
        &self,
        org: OrgId,
        cursor: Option<CommandId>,
        limit: u32,
    ) -> StoreResult<Page> {
        commands::list_dead(self, org, cursor, limit).await
    }

    async fn count_commands_by_status(&self, org: OrgId) -> StoreResult<Vec<(CommandStatus, u64)>> {
        commands::count_commands_by_status(self, org).await
    }

    async fn finished_per_minute(&self, since: OffsetDateTime) -> StoreResult<Vec<FinishedCount>> {
        commands::finished_per_minute(self, since).await
    }

    async fn requeue(&self, org: OrgId, id: CommandId) -> StoreResult<Command> {
        crash::around(Step::Requeue, commands::requeue(self, org, id)).await
    }

    async fn next_due_at(
        &self,
        org: OrgId,
        agent: AgentId,
        queues: &[String],
    ) -> StoreResult<Option<OffsetDateTime>> {
        commands::next_due_at(self, org, agent, queues).await
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
}
