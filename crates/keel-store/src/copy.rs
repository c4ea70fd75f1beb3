//! Moving an installation from SQLite to PostgreSQL: every row of every table, as it is.
//!
//! The target is a migrated, empty PostgreSQL database (`migrate` first, then copy). The copy
//! reads the SQLite file in one read transaction (one consistent snapshot) and writes every
//! table, in foreign-key order, in one PostgreSQL transaction: it lands whole or not at all.
//! Rows keep their identifiers and states: pending, scheduled and held commands, executing ones
//! with their claim tokens and leases, attempts, idempotency keys, throttles and digests; API
//! and operator keys keep their token hashes, so their tokens still authenticate. A keel
//! started on the PostgreSQL database afterwards carries on where the SQLite one stopped
//! (stop keel before copying: changes made during the copy are not in its snapshot).
//!
//! Encodings are converted: SQLite's 16-byte UUID blobs, integer microseconds since the epoch,
//! JSON text and 0/1 integers become `uuid`, `timestamptz`, `jsonb` and `boolean`. Rows go in
//! batches of [`BATCH_ROWS`], one `INSERT … SELECT … FROM UNNEST(…)` per batch.

use std::fmt;

use futures::TryStreamExt;
use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::sqlite::SqliteRow;
use sqlx::{Postgres, Row};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::common::{corrupt, from_micros};
use crate::error::{StoreError, StoreResult};
use crate::postgres::PgStore;
use crate::sqlite::SqliteStore;

/// The most rows one `INSERT` writes.
pub const BATCH_ROWS: usize = 1000;

/// How many rows of each table a copy wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CopyReport {
    /// Each table, in the order it was copied, with its row count.
    pub tables: Vec<TableCopied>,
}

/// The rows copied of one table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCopied {
    /// The table's name.
    pub table: &'static str,
    /// How many rows it holds on both sides.
    pub rows: u64,
}

impl CopyReport {
    /// The rows copied of `table`; `None` for a table the copy does not know.
    pub fn rows(&self, table: &str) -> Option<u64> {
        self.tables
            .iter()
            .find(|copied| copied.table == table)
            .map(|copied| copied.rows)
    }

    /// The rows copied in all.
    pub fn total(&self) -> u64 {
        self.tables.iter().map(|copied| copied.rows).sum()
    }
}

impl fmt::Display for CopyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for copied in &self.tables {
            writeln!(f, "{:<24} {:>12}", copied.table, copied.rows)?;
        }
        write!(f, "{:<24} {:>12}", "total", self.total())
    }
}

/// How a column is stored in SQLite, and so how it is read and sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A 16-byte blob; `uuid`.
    Uuid,
    /// Text; `text` (or a JSON string, when the target column is `jsonb`).
    Text,
    /// JSON as text; `jsonb`.
    Json,
    /// An integer; `bigint`, `integer` or `smallint`.
    Int,
    /// 0 or 1; `boolean`.
    Bool,
    /// Microseconds since the Unix epoch; `timestamptz`.
    Time,
    /// A blob; `bytea`.
    Bytes,
}

impl Kind {
    /// The PostgreSQL array type a batch of the column is sent as.
    fn array_type(self) -> &'static str {
        match self {
            Kind::Uuid => "uuid[]",
            Kind::Text | Kind::Json => "text[]",
            Kind::Int => "int8[]",
            Kind::Bool => "bool[]",
            Kind::Time => "timestamptz[]",
            Kind::Bytes => "bytea[]",
        }
    }
}

/// A table to copy: its name and the columns both schemas have.
struct Table {
    name: &'static str,
    columns: &'static [(&'static str, Kind)],
}

use Kind::{Bool, Bytes, Int, Json, Text, Time, Uuid as Id};

/// Every table, parents before the tables that reference them.
const TABLES: &[Table] = &[
    Table {
        name: "organisations",
        columns: &[("id", Id), ("name", Text), ("created_at", Time)],
    },
    Table {
        name: "agents",
        columns: &[
            ("id", Id),
            ("org_id", Id),
            ("name", Text),
            ("version", Text),
            ("metadata", Json),
            ("queues", Json),
            ("boot_id", Id),
            ("boot_count", Int),
            ("booted_at", Time),
            ("last_seen_at", Time),
            ("created_at", Time),
            ("labels", Json),
            ("assigned_labels", Json),
            ("cordoned_at", Time),
        ],
    },
    Table {
        name: "api_keys",
        columns: &[
            ("id", Id),
            ("org_id", Id),
            ("name", Text),
            ("prefix", Text),
            ("token_hash", Text),
            ("scopes", Json),
            ("agent_id", Id),
            ("created_at", Time),
            ("revoked_at", Time),
        ],
    },
    Table {
        name: "operator_keys",
        columns: &[
            ("id", Id),
            ("name", Text),
            ("prefix", Text),
            ("token_hash", Text),
            ("created_at", Time),
            ("revoked_at", Time),
        ],
    },
    Table {
        name: "paused_queues",
        columns: &[("org_id", Id), ("queue", Text), ("paused_at", Time)],
    },
    Table {
        name: "commands",
        columns: &[
            ("id", Id),
            ("org_id", Id),
            ("command_type", Text),
            ("target_agent_id", Id),
            ("queue", Text),
            ("params", Json),
            ("priority", Int),
            ("run_at", Time),
            ("scheduled", Int),
            ("max_attempts", Int),
            ("lease_duration_ms", Int),
            ("status", Text),
            ("attempts", Int),
            ("claim_token", Text),
            ("lease_expires_at", Time),
            ("claimed_by", Id),
            ("progress", Json),
            ("result", Json),
            ("error", Json),
            ("dead_reason", Text),
            ("cancel_requested", Bool),
            ("attempt_outcome", Text),
            ("idempotency_key", Text),
            ("request_hash", Text),
            ("created_at", Time),
            ("updated_at", Time),
            ("finished_at", Time),
            ("parent_id", Id),
            // The label selector's text; a JSON string when the target column is `jsonb`.
            ("selector", Text),
            ("online_only", Bool),
            ("max_concurrency", Int),
            ("broadcast_agents", Json),
        ],
    },
    Table {
        name: "command_attempts",
        columns: &[
            ("command_id", Id),
            ("attempt", Int),
            ("agent_id", Id),
            ("claimed_at", Time),
            ("ended_at", Time),
            ("outcome", Text),
            ("error", Json),
        ],
    },
    Table {
        name: "schedules",
        columns: &[
            ("id", Id),
            ("org_id", Id),
            ("name", Text),
            ("cron", Text),
            ("timezone", Text),
            ("command", Json),
            ("missed", Text),
            ("state", Text),
            ("next_fire_at", Time),
            ("last_fire_at", Time),
            ("created_at", Time),
            ("updated_at", Time),
        ],
    },
    Table {
        name: "schedule_fires",
        columns: &[
            ("schedule_id", Id),
            ("fire_at", Time),
            ("fired_at", Time),
            ("command_ids", Json),
            ("error", Text),
        ],
    },
    Table {
        name: "notification_settings",
        columns: &[
            ("id", Id),
            ("org_id", Id),
            ("kind", Text),
            ("name", Text),
            ("unique_key", Text),
            ("body", Json),
            ("sealed_secret", Bytes),
            ("created_at", Time),
            ("updated_at", Time),
        ],
    },
    Table {
        name: "notification_events",
        columns: &[
            ("id", Id),
            ("org_id", Id),
            ("event_type", Text),
            ("payload", Json),
            ("domain", Text),
            ("severity", Text),
            ("idempotency_key", Text),
            ("request_hash", Text),
            ("created_at", Time),
        ],
    },
    Table {
        name: "deliveries",
        columns: &[
            ("id", Id),
            ("org_id", Id),
            ("status", Text),
            ("run_at", Time),
            ("scheduled", Int),
            ("priority", Int),
            ("attempts", Int),
            ("max_attempts", Int),
            ("lease_duration_ms", Int),
            ("claim_token", Text),
            ("lease_expires_at", Time),
            ("claimed_by", Id),
            ("progress", Json),
            ("result", Json),
            ("error", Json),
            ("dead_reason", Text),
            ("cancel_requested", Bool),
            ("attempt_outcome", Text),
            ("created_at", Time),
            ("updated_at", Time),
            ("finished_at", Time),
            ("event_id", Id),
            ("event_type", Text),
            ("severity", Text),
            ("channel_id", Id),
            ("channel_type", Text),
            ("recipient", Text),
            ("subject", Text),
            ("body", Text),
            ("dedupe_key", Text),
            ("throttle_key", Text),
            ("digest_of", Id),
            ("digest_id", Id),
        ],
    },
    Table {
        name: "delivery_attempts",
        columns: &[
            ("delivery_id", Id),
            ("attempt", Int),
            ("agent_id", Id),
            ("claimed_at", Time),
            ("ended_at", Time),
            ("outcome", Text),
            ("error", Json),
        ],
    },
];

/// One column of a batch, in the Rust type its PostgreSQL array is bound from.
enum Values {
    Uuid(Vec<Option<Uuid>>),
    Text(Vec<Option<String>>),
    Int(Vec<Option<i64>>),
    Bool(Vec<Option<bool>>),
    Time(Vec<Option<OffsetDateTime>>),
    Bytes(Vec<Option<Vec<u8>>>),
}

impl Values {
    fn new(kind: Kind) -> Self {
        match kind {
            Kind::Uuid => Values::Uuid(Vec::with_capacity(BATCH_ROWS)),
            Kind::Text | Kind::Json => Values::Text(Vec::with_capacity(BATCH_ROWS)),
            Kind::Int => Values::Int(Vec::with_capacity(BATCH_ROWS)),
            Kind::Bool => Values::Bool(Vec::with_capacity(BATCH_ROWS)),
            Kind::Time => Values::Time(Vec::with_capacity(BATCH_ROWS)),
            Kind::Bytes => Values::Bytes(Vec::with_capacity(BATCH_ROWS)),
        }
    }

    /// Appends column `index` of an SQLite row.
    fn push(&mut self, row: &SqliteRow, index: usize) -> Result<(), sqlx::Error> {
        match self {
            Values::Uuid(values) => values.push(row.try_get(index)?),
            Values::Text(values) => values.push(row.try_get(index)?),
            Values::Int(values) => values.push(row.try_get(index)?),
            Values::Bool(values) => values.push(row.try_get(index)?),
            Values::Time(values) => {
                let micros: Option<i64> = row.try_get(index)?;
                let instant = micros
                    .map(from_micros)
                    .transpose()
                    .map_err(|err| sqlx::Error::Decode(err.to_string().into()))?;
                values.push(instant);
            }
            Values::Bytes(values) => values.push(row.try_get(index)?),
        }
        Ok(())
    }

    /// Binds the batch's values (and empties them for the next batch).
    fn bind<'q>(
        &mut self,
        query: Query<'q, Postgres, PgArguments>,
    ) -> Query<'q, Postgres, PgArguments> {
        match self {
            Values::Uuid(values) => query.bind(std::mem::take(values)),
            Values::Text(values) => query.bind(std::mem::take(values)),
            Values::Int(values) => query.bind(std::mem::take(values)),
            Values::Bool(values) => query.bind(std::mem::take(values)),
            Values::Time(values) => query.bind(std::mem::take(values)),
            Values::Bytes(values) => query.bind(std::mem::take(values)),
        }
    }
}

/// Copies every row of the SQLite store `from` into the PostgreSQL store `to`, whose schema
/// must be migrated and which must hold no organisation (`InvalidInput` otherwise: copying is
/// for a fresh installation). All or nothing: one PostgreSQL transaction.
pub async fn sqlite_to_postgres(from: &SqliteStore, to: &PgStore) -> StoreResult<CopyReport> {
    sqlite_to_postgres_with_progress(from, to, &mut |_, _| {}).await
}

/// [`sqlite_to_postgres`], calling `progress` with a table's name and the rows of it copied so
/// far after each batch (and once, with 0, when the table starts).
pub async fn sqlite_to_postgres_with_progress(
    from: &SqliteStore,
    to: &PgStore,
    progress: &mut (dyn FnMut(&'static str, u64) + Send),
) -> StoreResult<CopyReport> {
    to.check_schema().await?;
    let pending = to.pending_migrations().await?;
    if pending > 0 {
        return Err(StoreError::InvalidInput(format!(
            "the PostgreSQL database lacks {pending} of keel's migrations: migrate it first, \
             then copy"
        )));
    }
    let mut target = to.pool().begin().await?;
    // Taken until the commit: no keel creates an organisation meanwhile, and a second copy
    // waits here, then finds this one's rows.
    sqlx::query("LOCK TABLE organisations IN EXCLUSIVE MODE")
        .execute(&mut *target)
        .await?;
    let occupied: bool = sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM organisations)")
        .fetch_one(&mut *target)
        .await?;
    if occupied {
        return Err(StoreError::InvalidInput(
            "the PostgreSQL database already holds organisations: copying is for a fresh \
             installation (a new, migrated database)"
                .to_owned(),
        ));
    }
    // One read transaction: every table is read from the same snapshot of the file.
    let mut source = from.pool().begin().await?;
    let mut report = CopyReport::default();
    for table in TABLES {
        progress(table.name, 0);
        let targets = target_types(&mut target, table.name).await?;
        let insert = insert_sql(table, &targets);
        let select = format!(
            "SELECT {} FROM {}",
            table
                .columns
                .iter()
                .map(|(name, _)| *name)
                .collect::<Vec<_>>()
                .join(", "),
            table.name
        );
        let mut rows = sqlx::query(&select).fetch(&mut *source);
        let mut copied: u64 = 0;
        // Each batch is written while the next one is read.
        let mut next = read_batch(&mut rows, table).await?;
        while let Some(batch) = next {
            let (written, following) = futures::join!(
                write_batch(&mut target, &insert, batch),
                read_batch(&mut rows, table)
            );
            copied += written?;
            progress(table.name, copied);
            next = following?;
        }
        report.tables.push(TableCopied {
            table: table.name,
            rows: copied,
        });
    }
    source.rollback().await?;
    running_attempts_onto_commands(&mut target).await?;
    target.commit().await?;
    // Fresh statistics, so the planner knows the tables' sizes from the first query on.
    for table in TABLES {
        sqlx::query(&format!("ANALYZE {}", table.name))
            .execute(to.pool())
            .await?;
    }
    Ok(report)
}

/// SQLite keeps a running attempt as an open row of `command_attempts`; PostgreSQL keeps it on
/// the command's row (`attempt_number`, `claimed_at`) and only ended attempts in the table.
/// Every copied command takes the number of its latest attempt (so the next claim numbers on
/// from it), and each open attempt moves onto its command.
async fn running_attempts_onto_commands(target: &mut sqlx::PgConnection) -> StoreResult<()> {
    sqlx::query(
        "UPDATE commands c SET attempt_number = a.latest, \
           claimed_at = COALESCE(a.running_since, c.claimed_at) \
         FROM (SELECT command_id, MAX(attempt) AS latest, \
                 MAX(claimed_at) FILTER (WHERE ended_at IS NULL) AS running_since \
               FROM command_attempts GROUP BY command_id) AS a \
         WHERE c.id = a.command_id",
    )
    .execute(&mut *target)
    .await?;
    sqlx::query("DELETE FROM command_attempts WHERE ended_at IS NULL")
        .execute(&mut *target)
        .await?;
    Ok(())
}

/// The data types of `table`'s columns in the target schema, by column name.
async fn target_types(
    target: &mut sqlx::PgConnection,
    table: &str,
) -> StoreResult<Vec<(String, String)>> {
    Ok(sqlx::query_as(
        "SELECT column_name::text, data_type::text FROM information_schema.columns \
         WHERE table_schema = current_schema() AND table_name = $1",
    )
    .bind(table)
    .fetch_all(&mut *target)
    .await?)
}

/// The insert of one batch of `table`: one array parameter per column, unnested into rows.
/// JSON text becomes `jsonb` (and plain text a JSON string) where the target column is `jsonb`;
/// integers narrow to the column's type on assignment.
fn insert_sql(table: &Table, targets: &[(String, String)]) -> String {
    let is_json = |column: &str| {
        targets
            .iter()
            .any(|(name, data_type)| name == column && data_type == "jsonb")
    };
    let names: Vec<&str> = table.columns.iter().map(|(name, _)| *name).collect();
    let values: Vec<String> = table
        .columns
        .iter()
        .map(|(name, kind)| match kind {
            Kind::Json if is_json(name) => format!("u.{name}::jsonb"),
            Kind::Text if is_json(name) => format!("to_jsonb(u.{name})"),
            _ => format!("u.{name}"),
        })
        .collect();
    let arrays: Vec<String> = table
        .columns
        .iter()
        .enumerate()
        .map(|(n, (_, kind))| format!("${}::{}", n + 1, kind.array_type()))
        .collect();
    format!(
        "INSERT INTO {table} ({names}) SELECT {values} FROM UNNEST({arrays}) AS u({names})",
        table = table.name,
        names = names.join(", "),
        values = values.join(", "),
        arrays = arrays.join(", "),
    )
}

/// The next rows of `rows` (at most [`BATCH_ROWS`]), by column; `None` when none is left.
async fn read_batch<S>(rows: &mut S, table: &Table) -> StoreResult<Option<Vec<Values>>>
where
    S: futures::Stream<Item = Result<SqliteRow, sqlx::Error>> + Unpin,
{
    let mut batch: Vec<Values> = table
        .columns
        .iter()
        .map(|(_, kind)| Values::new(*kind))
        .collect();
    let mut read = 0;
    while read < BATCH_ROWS {
        let Some(row) = rows.try_next().await? else {
            break;
        };
        for (index, (values, (column, _))) in batch.iter_mut().zip(table.columns).enumerate() {
            values
                .push(&row, index)
                .map_err(|err| corrupt(format!("{}.{column}: {err}", table.name)))?;
        }
        read += 1;
    }
    Ok((read > 0).then_some(batch))
}

/// Writes the batch's rows; returns how many.
async fn write_batch(
    target: &mut sqlx::PgConnection,
    insert: &str,
    mut batch: Vec<Values>,
) -> StoreResult<u64> {
    let mut query = sqlx::query(insert);
    for values in &mut batch {
        query = values.bind(query);
    }
    Ok(query.execute(&mut *target).await?.rows_affected())
}
