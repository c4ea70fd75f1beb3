//! Organisations, API keys, operator keys, agents, labels, cordons and paused queues.

use secrecy::SecretString;
use sqlx::types::Json;
use time::OffsetDateTime;

use super::PgStore;
use crate::common::{conflict_as, corrupt, missing_as};
use crate::error::{StoreError, StoreResult};
use crate::labels::Labels;
use crate::model::{
    Agent, AgentId, ApiKey, ApiKeyId, CheckIn, CreatedApiKey, CreatedOperatorKey, NewApiKey,
    OperatorKey, OperatorKeyId, OrgId, Organisation, PausedQueue, Principal, Scope,
};
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
    let scope_names: Vec<&str> = scopes.iter().map(|s| s.as_str()).collect();
    let sql = format!(
        "INSERT INTO api_keys (id, org_id, name, prefix, token_hash, scopes, agent_id, \
         created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, keel_now()) RETURNING {API_KEY_COLUMNS}"
    );
    let mut attempt = 0;
    let (row, token) = loop {
        attempt += 1;
        let new = token::generate();
        // A savepoint: a taken prefix undoes this insert alone, and another token is drawn.
        let mut savepoint = sqlx::Acquire::begin(&mut *tx).await?;
        let inserted = sqlx::query_as::<_, ApiKeyRow>(&sql)
            .bind(ApiKeyId::new())
            .bind(org)
            .bind(&key.name)
            .bind(&new.prefix)
            .bind(&new.hash)
            .bind(Json(&scope_names))
            .bind(agent)
            .fetch_one(&mut *savepoint)
            .await
            .map_err(|err| missing_as(err.into(), StoreError::NotFound));
        match inserted {
            Ok(row) => {
                savepoint.commit().await?;
                break (row, SecretString::from(new.token));
            }
            Err(StoreError::Conflict(_)) if attempt < PREFIX_ATTEMPTS => {
                savepoint.rollback().await?;
            }
            Err(err) => return Err(err),
        }
    };
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

/// Placeholder answer of a method not yet on PostgreSQL.
pub(super) fn not_yet(what: &str) -> StoreError {
    StoreError::Unavailable(format!("{what} is not on PostgreSQL yet"))
}

pub(super) async fn list_api_keys(_store: &PgStore, _org: OrgId) -> StoreResult<Vec<ApiKey>> {
    Err(not_yet("list_api_keys"))
}

pub(super) async fn revoke_api_key(
    _store: &PgStore,
    _org: OrgId,
    _key: ApiKeyId,
) -> StoreResult<()> {
    Err(not_yet("revoke_api_key"))
}

pub(super) async fn create_operator_key(
    _store: &PgStore,
    _name: &str,
) -> StoreResult<CreatedOperatorKey> {
    Err(not_yet("create_operator_key"))
}

pub(super) async fn list_operator_keys(_store: &PgStore) -> StoreResult<Vec<OperatorKey>> {
    Err(not_yet("list_operator_keys"))
}

pub(super) async fn revoke_operator_key(_store: &PgStore, _key: OperatorKeyId) -> StoreResult<()> {
    Err(not_yet("revoke_operator_key"))
}

pub(super) async fn authenticate_operator(
    _store: &PgStore,
    _token: &str,
) -> StoreResult<Option<OperatorKey>> {
    Err(not_yet("authenticate_operator"))
}

pub(super) async fn check_in(
    _store: &PgStore,
    _org: OrgId,
    _agent: AgentId,
    _check_in: CheckIn,
) -> StoreResult<Agent> {
    Err(not_yet("check_in"))
}

pub(super) async fn get_agent(
    _store: &PgStore,
    _org: OrgId,
    _agent: AgentId,
) -> StoreResult<Option<Agent>> {
    Err(not_yet("get_agent"))
}

pub(super) async fn list_agents(_store: &PgStore, _org: OrgId) -> StoreResult<Vec<Agent>> {
    Err(not_yet("list_agents"))
}

pub(super) async fn set_agent_labels(
    _store: &PgStore,
    _org: OrgId,
    _agent: AgentId,
    _labels: Labels,
) -> StoreResult<Agent> {
    Err(not_yet("set_agent_labels"))
}

pub(super) async fn set_agent_cordoned(
    _store: &PgStore,
    _org: OrgId,
    _agent: AgentId,
    _cordoned: bool,
) -> StoreResult<Agent> {
    Err(not_yet("set_agent_cordoned"))
}

pub(super) async fn pause_queue(
    _store: &PgStore,
    _org: OrgId,
    _queue: &str,
) -> StoreResult<PausedQueue> {
    Err(not_yet("pause_queue"))
}

pub(super) async fn resume_queue(_store: &PgStore, _org: OrgId, _queue: &str) -> StoreResult<bool> {
    Err(not_yet("resume_queue"))
}

pub(super) async fn list_paused_queues(
    _store: &PgStore,
    _org: OrgId,
) -> StoreResult<Vec<PausedQueue>> {
    Err(not_yet("list_paused_queues"))
}

pub(super) async fn count_cordoned_and_paused(_store: &PgStore) -> StoreResult<(u64, u64)> {
    Err(not_yet("count_cordoned_and_paused"))
}
