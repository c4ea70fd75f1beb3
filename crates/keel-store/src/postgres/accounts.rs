//! Organisations, API keys, operator keys, agents, labels, cordons and paused queues.

use secrecy::SecretString;
use serde_json::Value;
use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::QueryAs;
use sqlx::types::Json;
use sqlx::{PgConnection, Postgres};
use time::OffsetDateTime;
use uuid::Uuid;

use super::PgStore;
use crate::common::{conflict_as, corrupt, found, missing_as, to_u32};
use crate::error::{StoreError, StoreResult};
use crate::labels::{Labels, check_labels};
use crate::model::{
    Agent, AgentId, ApiKey, ApiKeyId, CheckIn, CreatedApiKey, CreatedOperatorKey, NewApiKey,
    OperatorKey, OperatorKeyId, OrgId, Organisation, PausedQueue, Principal, Scope,
};
use crate::store::check_queue_name;
use crate::token;

/// How many times a key is generated again when its random prefix is taken.
const PREFIX_ATTEMPTS: u32 = 3;

const API_KEY_COLUMNS: &str =
    "id, org_id, name, prefix, token_hash, scopes, agent_id, created_at, revoked_at";

#[derive(sqlx::FromRow)]
struct OrgRow {
    id: OrgId,
    name: String,
    created_at: OffsetDateTime,
}

impl From<OrgRow> for Organisation {
    fn from(row: OrgRow) -> Self {
        Organisation {
            id: row.id,
            name: row.name,
            created_at: row.created_at,
        }
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
    created_at: OffsetDateTime,
    revoked_at: Option<OffsetDateTime>,
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
            created_at: self.created_at,
            revoked_at: self.revoked_at,
        })
    }
}

pub(super) async fn create_organisation(store: &PgStore, name: &str) -> StoreResult<Organisation> {
    if name.trim().is_empty() {
        return Err(StoreError::InvalidInput(
            "organisation name is empty".to_owned(),
        ));
    }
    let row: OrgRow = sqlx::query_as(
        "INSERT INTO organisations (id, name, created_at) VALUES ($1, $2, keel_now()) \
         RETURNING id, name, created_at",
    )
    .bind(OrgId::new())
    .bind(name)
    .fetch_one(&store.pool)
    .await
    .map_err(|err| conflict_as(err.into(), format!("organisation `{name}` exists")))?;
    Ok(row.into())
}

pub(super) async fn list_organisations(store: &PgStore) -> StoreResult<Vec<Organisation>> {
    let rows: Vec<OrgRow> =
        sqlx::query_as("SELECT id, name, created_at FROM organisations ORDER BY name")
            .fetch_all(&store.pool)
            .await?;
    Ok(rows.into_iter().map(Organisation::from).collect())
}

pub(super) async fn find_org_by_name(
    store: &PgStore,
    name: &str,
) -> StoreResult<Option<Organisation>> {
    let row: Option<OrgRow> =
        sqlx::query_as("SELECT id, name, created_at FROM organisations WHERE name = $1")
            .bind(name)
            .fetch_optional(&store.pool)
            .await?;
    Ok(row.map(Organisation::from))
}

pub(super) async fn create_api_key(
    store: &PgStore,
    org: OrgId,
    key: NewApiKey,
) -> StoreResult<CreatedApiKey> {
    let (scopes, agent_name) = crate::common::check_new_api_key(&key)?;
    let mut tx = store.pool.begin().await?;
    let agent = match agent_name {
        Some(name) => {
            let id: AgentId = sqlx::query_scalar(
                "INSERT INTO agents (id, org_id, name, created_at) \
                 VALUES ($1, $2, $3, keel_now()) \
                 ON CONFLICT (org_id, name) DO UPDATE SET name = EXCLUDED.name \
                 RETURNING id",
            )
            .bind(AgentId::new())
            .bind(org)
            .bind(&name)
            .fetch_one(&mut *tx)
            .await
            .map_err(|err| missing_as(err.into(), StoreError::NotFound))?;
            Some(id)
        }
        None => None,
    };
    let scope_names: Vec<String> = scopes.iter().map(|s| s.as_str().to_owned()).collect();
    let sql = format!(
        "INSERT INTO api_keys (id, org_id, name, prefix, token_hash, scopes, agent_id, \
         created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, keel_now()) RETURNING {API_KEY_COLUMNS}"
    );
    let (row, token): (ApiKeyRow, _) = insert_with_new_token(&mut tx, &sql, |query, new| {
        query
            .bind(ApiKeyId::new())
            .bind(org)
            .bind(key.name.clone())
            .bind(new.prefix.clone())
            .bind(new.hash.clone())
            .bind(Json(scope_names.clone()))
            .bind(agent)
    })
    .await
    .map_err(|err| missing_as(err, StoreError::NotFound))?;
    tx.commit().await?;
    Ok(CreatedApiKey {
        key: row.into_api_key()?,
        token,
    })
}

pub(super) async fn authenticate(store: &PgStore, token: &str) -> StoreResult<Option<Principal>> {
    let Some(prefix) = token::prefix_of(token) else {
        return Ok(None);
    };
    let row: Option<ApiKeyRow> = sqlx::query_as(&format!(
        "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE prefix = $1"
    ))
    .bind(prefix)
    .fetch_optional(&store.pool)
    .await?;
    let Some(row) =
        row.filter(|row| row.revoked_at.is_none() && token::matches(token, &row.token_hash))
    else {
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

pub(super) async fn list_api_keys(store: &PgStore, org: OrgId) -> StoreResult<Vec<ApiKey>> {
    let rows: Vec<ApiKeyRow> = sqlx::query_as(&format!(
        "SELECT {API_KEY_COLUMNS} FROM api_keys WHERE org_id = $1 ORDER BY created_at, id"
    ))
    .bind(org)
    .fetch_all(&store.pool)
    .await?;
    rows.into_iter().map(ApiKeyRow::into_api_key).collect()
}

pub(super) async fn revoke_api_key(store: &PgStore, org: OrgId, key: ApiKeyId) -> StoreResult<()> {
    let done = sqlx::query(
        "UPDATE api_keys SET revoked_at = COALESCE(revoked_at, keel_now()) \
         WHERE org_id = $1 AND id = $2",
    )
    .bind(org)
    .bind(key)
    .execute(&store.pool)
    .await?;
    found(done.rows_affected())
}

const OPERATOR_KEY_COLUMNS: &str = "id, name, prefix, token_hash, created_at, revoked_at";

#[derive(sqlx::FromRow)]
struct OperatorKeyRow {
    id: OperatorKeyId,
    name: String,
    prefix: String,
    token_hash: String,
    created_at: OffsetDateTime,
    revoked_at: Option<OffsetDateTime>,
}

impl From<OperatorKeyRow> for OperatorKey {
    fn from(row: OperatorKeyRow) -> Self {
        OperatorKey {
            id: row.id,
            name: row.name,
            prefix: row.prefix,
            created_at: row.created_at,
            revoked_at: row.revoked_at,
        }
    }
}

pub(super) async fn create_operator_key(
    store: &PgStore,
    name: &str,
) -> StoreResult<CreatedOperatorKey> {
    let name = name.trim();
    if name.is_empty() {
        return Err(StoreError::InvalidInput(
            "an operator key needs a name".to_owned(),
        ));
    }
    let sql = format!(
        "INSERT INTO operator_keys (id, name, prefix, token_hash, created_at) \
         VALUES ($1, $2, $3, $4, keel_now()) RETURNING {OPERATOR_KEY_COLUMNS}"
    );
    let mut conn = store.pool.acquire().await?;
    let (row, token): (OperatorKeyRow, _) = insert_with_new_token(&mut conn, &sql, |query, new| {
        query
            .bind(OperatorKeyId::new())
            .bind(name.to_owned())
            .bind(new.prefix.clone())
            .bind(new.hash.clone())
    })
    .await?;
    Ok(CreatedOperatorKey {
        key: OperatorKey::from(row),
        token,
    })
}

pub(super) async fn list_operator_keys(store: &PgStore) -> StoreResult<Vec<OperatorKey>> {
    let rows: Vec<OperatorKeyRow> = sqlx::query_as(&format!(
        "SELECT {OPERATOR_KEY_COLUMNS} FROM operator_keys ORDER BY created_at, id"
    ))
    .fetch_all(&store.pool)
    .await?;
    Ok(rows.into_iter().map(OperatorKey::from).collect())
}

pub(super) async fn revoke_operator_key(store: &PgStore, key: OperatorKeyId) -> StoreResult<()> {
    let done = sqlx::query(
        "UPDATE operator_keys SET revoked_at = COALESCE(revoked_at, keel_now()) WHERE id = $1",
    )
    .bind(key)
    .execute(&store.pool)
    .await?;
    found(done.rows_affected())
}

pub(super) async fn authenticate_operator(
    store: &PgStore,
    token: &str,
) -> StoreResult<Option<OperatorKey>> {
    let Some(prefix) = token::prefix_of(token) else {
        return Ok(None);
    };
    let row: Option<OperatorKeyRow> = sqlx::query_as(&format!(
        "SELECT {OPERATOR_KEY_COLUMNS} FROM operator_keys WHERE prefix = $1"
    ))
    .bind(prefix)
    .fetch_optional(&store.pool)
    .await?;
    Ok(row
        .filter(|row| row.revoked_at.is_none() && token::matches(token, &row.token_hash))
        .map(OperatorKey::from))
}

/// The agent columns, in [`AgentRow`] order.
const AGENT_COLUMNS: &str = "id, org_id, name, version, metadata, queues, boot_id, boot_count, \
     booted_at, last_seen_at, created_at, labels, assigned_labels, cordoned_at";

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
    booted_at: Option<OffsetDateTime>,
    last_seen_at: Option<OffsetDateTime>,
    created_at: OffsetDateTime,
    labels: Json<Labels>,
    assigned_labels: Json<Labels>,
    cordoned_at: Option<OffsetDateTime>,
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
            booted_at: self.booted_at,
            last_seen_at: self.last_seen_at,
            created_at: self.created_at,
            reported_labels: self.labels.0,
            assigned_labels: self.assigned_labels.0,
            cordoned_at: self.cordoned_at,
        })
    }
}

pub(super) async fn check_in(
    store: &PgStore,
    org: OrgId,
    agent: AgentId,
    check_in: CheckIn,
) -> StoreResult<Agent> {
    if !check_in.metadata.is_object() {
        return Err(StoreError::InvalidInput(
            "agent metadata must be a JSON object".to_owned(),
        ));
    }
    if let Some(labels) = &check_in.labels {
        check_labels(labels).map_err(|rule| StoreError::InvalidInput(format!("labels: {rule}")))?;
    }
    // SET expressions read the row as it was, so `boot_id IS NOT DISTINCT FROM $5` compares
    // with the old boot. The name is the key's agent's: a check-in may state it (and must
    // state it right), never change it.
    let row: Option<AgentRow> = sqlx::query_as(&format!(
        "UPDATE agents SET \
           version = $2, metadata = $3, queues = $4, \
           boot_count = CASE WHEN boot_id IS NOT DISTINCT FROM $5 \
                        THEN boot_count ELSE boot_count + 1 END, \
           booted_at = CASE WHEN boot_id IS NOT DISTINCT FROM $5 \
                       THEN booted_at ELSE keel_now() END, \
           boot_id = $5, last_seen_at = keel_now(), labels = COALESCE($8, labels) \
         WHERE org_id = $6 AND id = $7 AND ($1::text IS NULL OR name = $1) \
         RETURNING {AGENT_COLUMNS}"
    ))
    .bind(check_in.name.as_deref())
    .bind(&check_in.version)
    .bind(Json(&check_in.metadata))
    .bind(Json(&check_in.queues))
    .bind(check_in.boot_id)
    .bind(org)
    .bind(agent)
    .bind(check_in.labels.map(Json))
    .fetch_optional(&store.pool)
    .await?;
    if let Some(row) = row {
        return row.into_agent();
    }
    let name: Option<String> =
        sqlx::query_scalar("SELECT name FROM agents WHERE org_id = $1 AND id = $2")
            .bind(org)
            .bind(agent)
            .fetch_optional(&store.pool)
            .await?;
    match name {
        Some(name) => Err(StoreError::InvalidInput(format!(
            "name: this key acts as agent `{name}`"
        ))),
        None => Err(StoreError::UnknownAgent),
    }
}

pub(super) async fn get_agent(
    store: &PgStore,
    org: OrgId,
    agent: AgentId,
) -> StoreResult<Option<Agent>> {
    let row: Option<AgentRow> = sqlx::query_as(&format!(
        "SELECT {AGENT_COLUMNS} FROM agents WHERE org_id = $1 AND id = $2"
    ))
    .bind(org)
    .bind(agent)
    .fetch_optional(&store.pool)
    .await?;
    row.map(AgentRow::into_agent).transpose()
}

pub(super) async fn list_agents(store: &PgStore, org: OrgId) -> StoreResult<Vec<Agent>> {
    let rows: Vec<AgentRow> = sqlx::query_as(&format!(
        "SELECT {AGENT_COLUMNS} FROM agents WHERE org_id = $1 ORDER BY name"
    ))
    .bind(org)
    .fetch_all(&store.pool)
    .await?;
    rows.into_iter().map(AgentRow::into_agent).collect()
}

/// Updates one agent of the organisation with `set` (a `SET` clause whose `$1` is `value`).
async fn update_agent<V>(
    store: &PgStore,
    org: OrgId,
    agent: AgentId,
    set: &str,
    value: V,
) -> StoreResult<Agent>
where
    V: for<'q> sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres> + Send,
{
    let row: Option<AgentRow> = sqlx::query_as(&format!(
        "UPDATE agents SET {set} WHERE org_id = $2 AND id = $3 RETURNING {AGENT_COLUMNS}"
    ))
    .bind(value)
    .bind(org)
    .bind(agent)
    .fetch_optional(&store.pool)
    .await?;
    row.ok_or(StoreError::NotFound)?.into_agent()
}

pub(super) async fn set_agent_labels(
    store: &PgStore,
    org: OrgId,
    agent: AgentId,
    labels: Labels,
) -> StoreResult<Agent> {
    check_labels(&labels).map_err(StoreError::InvalidInput)?;
    update_agent(store, org, agent, "assigned_labels = $1", Json(labels)).await
}

pub(super) async fn set_agent_cordoned(
    store: &PgStore,
    org: OrgId,
    agent: AgentId,
    cordoned: bool,
) -> StoreResult<Agent> {
    update_agent(
        store,
        org,
        agent,
        "cordoned_at = CASE WHEN $1 THEN COALESCE(cordoned_at, keel_now()) ELSE NULL END",
        cordoned,
    )
    .await
}

#[derive(sqlx::FromRow)]
struct PausedQueueRow {
    queue: String,
    paused_at: OffsetDateTime,
}

impl From<PausedQueueRow> for PausedQueue {
    fn from(row: PausedQueueRow) -> Self {
        PausedQueue {
            queue: row.queue,
            paused_at: row.paused_at,
        }
    }
}

pub(super) async fn pause_queue(
    store: &PgStore,
    org: OrgId,
    queue: &str,
) -> StoreResult<PausedQueue> {
    check_queue_name(queue).map_err(|rule| StoreError::InvalidInput(format!("queue: {rule}")))?;
    // `DO UPDATE` with no change, so that `RETURNING` gives the row either way.
    let row: PausedQueueRow = sqlx::query_as(
        "INSERT INTO paused_queues (org_id, queue, paused_at) VALUES ($1, $2, keel_now()) \
         ON CONFLICT (org_id, queue) DO UPDATE SET paused_at = paused_queues.paused_at \
         RETURNING queue, paused_at",
    )
    .bind(org)
    .bind(queue)
    .fetch_one(&store.pool)
    .await
    .map_err(|err| missing_as(err.into(), StoreError::NotFound))?;
    Ok(row.into())
}

pub(super) async fn resume_queue(store: &PgStore, org: OrgId, queue: &str) -> StoreResult<bool> {
    let done = sqlx::query("DELETE FROM paused_queues WHERE org_id = $1 AND queue = $2")
        .bind(org)
        .bind(queue)
        .execute(&store.pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

pub(super) async fn list_paused_queues(
    store: &PgStore,
    org: OrgId,
) -> StoreResult<Vec<PausedQueue>> {
    let rows: Vec<PausedQueueRow> = sqlx::query_as(
        "SELECT queue, paused_at FROM paused_queues WHERE org_id = $1 ORDER BY queue",
    )
    .bind(org)
    .fetch_all(&store.pool)
    .await?;
    Ok(rows.into_iter().map(PausedQueue::from).collect())
}

pub(super) async fn count_cordoned_and_paused(store: &PgStore) -> StoreResult<(u64, u64)> {
    let (cordoned, paused): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT COUNT(*) FROM agents WHERE cordoned_at IS NOT NULL), \
                (SELECT COUNT(*) FROM paused_queues)",
    )
    .fetch_one(&store.pool)
    .await?;
    Ok((
        u64::try_from(cordoned).unwrap_or_default(),
        u64::try_from(paused).unwrap_or_default(),
    ))
}

/// A query returning rows of `R`.
type PgQueryAs<'q, R> = QueryAs<'q, Postgres, R, PgArguments>;

/// Runs `sql` (an insert of a credential, returning its row) with `bind`'s parameters for a new
/// token, in a savepoint of `conn`: a taken prefix undoes the insert alone, and another token is
/// drawn (up to [`PREFIX_ATTEMPTS`] times). Returns the row and the token.
async fn insert_with_new_token<R>(
    conn: &mut PgConnection,
    sql: &str,
    bind: impl for<'q> Fn(PgQueryAs<'q, R>, &token::NewToken) -> PgQueryAs<'q, R>,
) -> StoreResult<(R, SecretString)>
where
    R: for<'r> sqlx::FromRow<'r, PgRow> + Send + Unpin,
{
    let mut attempt = 0;
    loop {
        attempt += 1;
        let new = token::generate();
        let mut savepoint = sqlx::Acquire::begin(&mut *conn).await?;
        let inserted = bind(sqlx::query_as::<_, R>(sql), &new)
            .fetch_one(&mut *savepoint)
            .await
            .map_err(StoreError::from);
        match inserted {
            Ok(row) => {
                savepoint.commit().await?;
                return Ok((row, SecretString::from(new.token)));
            }
            Err(StoreError::Conflict(_)) if attempt < PREFIX_ATTEMPTS => {
                savepoint.rollback().await?;
            }
            Err(err) => return Err(err),
        }
    }
}
