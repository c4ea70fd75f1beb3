//! Operator keys on SQLite: the `operator_keys` table, outside every organisation.

use super::rows::from_micros;
use super::writer::Lane;
use super::{SqliteStore, TokenRow, find_by_token, found, insert_with_new_token};
use crate::error::{StoreError, StoreResult};
use crate::model::{CreatedOperatorKey, OperatorKey, OperatorKeyId};

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

impl TokenRow for OperatorKeyRow {
    fn token_hash(&self) -> &str {
        &self.token_hash
    }

    fn is_revoked(&self) -> bool {
        self.revoked_at.is_some()
    }
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
        .write_one(Lane::Bulk, move |conn| {
            Box::pin(async move {
                let sql = format!(
                    "INSERT INTO operator_keys (id, name, prefix, token_hash, created_at) \
                     VALUES (?, ?, ?, ?, ?) RETURNING {COLUMNS}"
                );
                let (row, token) = insert_with_new_token(conn, move |conn, new| {
                    let (sql, name) = (sql.clone(), name.clone());
                    let (prefix, hash) = (new.prefix.clone(), new.hash.clone());
                    Box::pin(async move {
                        sqlx::query_as::<_, OperatorKeyRow>(&sql)
                            .bind(OperatorKeyId::new())
                            .bind(name)
                            .bind(prefix)
                            .bind(hash)
                            .bind(now_us)
                            .fetch_one(conn)
                            .await
                            .map_err(StoreError::from)
                    })
                })
                .await?;
                Ok(CreatedOperatorKey {
                    key: row.into_key()?,
                    token,
                })
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
        .write_one(Lane::Bulk, move |conn| {
            Box::pin(async move {
                let done = sqlx::query(
                    "UPDATE operator_keys SET revoked_at = COALESCE(revoked_at, ?) WHERE id = ?",
                )
                .bind(now_us)
                .bind(key)
                .execute(&mut *conn)
                .await?;
                found(done.rows_affected())
            })
        })
        .await
}

pub(super) async fn authenticate(
    store: &SqliteStore,
    token: &str,
) -> StoreResult<Option<OperatorKey>> {
    let select = format!("SELECT {COLUMNS} FROM operator_keys WHERE prefix = ?");
    let row: Option<OperatorKeyRow> = find_by_token(&store.read, &select, token).await?;
    row.map(OperatorKeyRow::into_key).transpose()
}
