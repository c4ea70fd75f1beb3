//! Single creates, grouped (see [`super::groups`]): concurrent `create_command` calls without
//! an idempotency key are inserted with one statement per organisation.
//!
//! Creates with an idempotency key go straight to the database (a replay reads what holds the
//! key in the same transaction as its insert).

use sqlx::postgres::PgPool;

use super::commands::{NewRow, insert_rows};
use super::groups::GroupedWrite;
use crate::common::corrupt;
use crate::error::{StoreError, StoreResult};
use crate::model::{Created, OrgId};

/// A single create: the organisation and the row.
pub(super) struct Create {
    pub(super) org: OrgId,
    pub(super) row: NewRow,
}

/// Grouped single creates.
pub(super) struct Creates;

impl GroupedWrite for Creates {
    type Call = Create;
    type Answer = Created;
    type Key = OrgId;
    const SCOPE: &'static str = "store.create_groups";

    fn key(call: &Create) -> OrgId {
        call.org
    }

    fn rows(_: &Create) -> usize {
        1
    }

    /// Failpoint `store.create_group`: `return` fails the group's statement as a lost
    /// connection would (unknown whether it was written), `return(refused)` as a refusal of
    /// the database (nothing written); either way without writing.
    async fn write_group(pool: &PgPool, calls: &[Create]) -> StoreResult<Vec<Created>> {
        fail::fail_point!("store.create_group", |how| Err(match how.as_deref() {
            Some("refused") => StoreError::Conflict("injected at store.create_group".to_owned()),
            _ => StoreError::Unavailable("injected at store.create_group".to_owned()),
        }));
        let Some(first) = calls.first() else {
            return Ok(Vec::new());
        };
        let rows = calls.iter().map(|c| c.row.clone()).collect();
        insert(pool, first.org, rows).await
    }

    async fn write_one(pool: &PgPool, call: Create) -> StoreResult<Created> {
        insert(pool, call.org, vec![call.row])
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| corrupt("no command created"))
    }
}

async fn insert(pool: &PgPool, org: OrgId, rows: Vec<NewRow>) -> StoreResult<Vec<Created>> {
    let mut conn = pool.acquire().await?;
    insert_rows(&mut conn, org, rows).await
}
