//! Operator keys on SQLite: the `operator_keys` table, outside every organisation.

use secrecy::SecretString;

use super::rows::from_micros;
use super::{PREFIX_ATTEMPTS, SqliteStore};
use crate::error::{StoreError, StoreResult};
use crate::model::{CreatedOperatorKey, OperatorKey, OperatorKeyId};
use crate::token;

const COLUMNS: &str = "id, name, prefix, token_hash, created_at, revoked_at";

#[derive(sqlx::FromRow)]
struct OperatorKeyRow {
    id: OperatorKeyId,
    name: String,
    prefix: String,
    token_hash: String,
    created_at: i64,
    revoked_at: Option<i64>,
}

impl OperatorKeyRow {
    fn into_key(self) -> StoreResult<OperatorKey> {
        Ok(OperatorKey {
            id: self.id,
            name: self.name,
            prefix: self.prefix,
            created_at: from_micros(self.created_at)?,
            revoked_at: self.revoked_at.map(from_micros).transpose()?,
        })
    }
}

pub(super) async fn create(store: &SqliteStore, name: &str) -> StoreResult<CreatedOperatorKey> {
    let name = name.trim().to_owned();
    if name.is_empty() {
        return Err(StoreError::InvalidInput(
            "an operator key needs a name".to_owned(),
        ));
    }
    let (_, now_us) = store.now_and_micros();
    store
        .write_one(move |conn| {
            Box::pin(async move {
                let mut attempt = 0;
                loop {
                    attempt += 1;
                    let new = token::generate();
                    let inserted = sqlx::query_as::<_, OperatorKeyRow>(&format!(
                        "INSERT INTO operator_keys (id, name, prefix, token_hash, created_at) \
                         VALUES (?, ?, ?, ?, ?) RETURNING {COLUMNS}"
                    ))
                    .bind(OperatorKeyId::new())
                    .bind(&name)
                    .bind(&new.prefix)
                    .bind(&new.hash)
                    .bind(now_us)
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(StoreError::from);
                    match inserted {
                        Ok(row) => {
                            return Ok(CreatedOperatorKey {
                                key: row.into_key()?,
                                token: SecretString::from(new.token),
                            });
                        }
                        // Only the random prefix can collide: draw another token.
                        Err(StoreError::Conflict(_)) if attempt < PREFIX_ATTEMPTS => {}
                        Err(err) => return Err(err),
                    }
                }
            })
        })
        .await
}

pub(super) async fn list(store: &SqliteStore) -> StoreResult<Vec<OperatorKey>> {
    let rows: Vec<OperatorKeyRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM operator_keys ORDER BY created_at, id"
    ))
    .fetch_all(&store.read)
    .await?;
    rows.into_iter().map(OperatorKeyRow::into_key).collect()
}

pub(super) async fn revoke(store: &SqliteStore, key: OperatorKeyId) -> StoreResult<()> {
    let (_, now_us) = store.now_and_micros();
    store
        .write_one(move |conn| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE operator_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                )
                .bind(now_us)
                .bind(key)
                .execute(&mut *conn)
                .await?;
                if done.rows_affected() == 0 {
                    return Err(StoreError::NotFound);
                }
                Ok(())
            })
        })
        .await
}

pub(super) async fn authenticate(
    store: &SqliteStore,
    token: &str,
) -> StoreResult<Option<OperatorKey>> {
    let Some(prefix) = token::prefix_of(token) else {
        return Ok(None);
    };
    let row: Option<OperatorKeyRow> = sqlx::query_as(&format!(
        "SELECT {COLUMNS} FROM operator_keys WHERE prefix = ?"
    ))
    .bind(prefix)
    .fetch_optional(&store.read)
    .await?;
    match row {
        Some(row) if row.revoked_at.is_none() && token::matches(token, &row.token_hash) => {
            row.into_key().map(Some)
        }
        _ => Ok(None),
    }
}
