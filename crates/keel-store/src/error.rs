//! The store's error type.
//!
//! Database errors are classified by their code ([`sqlx::error::ErrorKind`], which each driver
//! derives from the SQLite extended result code or the PostgreSQL SQLSTATE), never by message
//! text.

use sqlx::error::ErrorKind;

/// What a store operation can fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No such row in the caller's organisation (a row of another organisation is reported the
    /// same way, so its existence does not leak).
    #[error("not found")]
    NotFound,
    /// A unique constraint refused the write (a duplicate organisation name, agent name, ...).
    #[error("conflict: {0}")]
    Conflict(String),
    /// The idempotency key was used before with a different request body.
    #[error("idempotency key reused with a different request")]
    IdempotencyMismatch,
    /// The claim token is not the current one, or the command is no longer executing; nothing
    /// was changed.
    #[error("stale claim: the claim token is not current or the command is not executing")]
    StaleClaim,
    /// The command is in a state that does not allow the operation (cancel a finished command,
    /// requeue a pending one).
    #[error("invalid state: {0}")]
    InvalidState(String),
    /// The named agent does not exist in the caller's organisation.
    #[error("unknown agent")]
    UnknownAgent,
    /// The request is malformed in a way the store checks (for example an agent key without an
    /// agent name).
    #[error("invalid input: {0}")]
    InvalidInput(String),
    /// The store is too busy to take the operation now (its write queue stayed full, or the
    /// database stayed locked); retrying later may succeed.
    #[error("store busy: {0}")]
    Busy(String),
    /// The store cannot serve the operation: it is closed, or the operation was rolled back
    /// because it panicked or its group failed to commit.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Any other database error, with its source.
    #[error("database error")]
    Database(#[source] sqlx::Error),
    /// The embedded migrations could not be applied.
    #[error("migration failed")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::Database(db) if db.kind() == ErrorKind::UniqueViolation => {
                let what = db
                    .constraint()
                    .or_else(|| db.table())
                    .unwrap_or("unique constraint");
                StoreError::Conflict(format!("already exists ({what})"))
            }
            sqlx::Error::PoolTimedOut => {
                StoreError::Busy("no database connection free in time".to_owned())
            }
            sqlx::Error::Database(db) if is_postgres_unavailable(db.as_ref()) => {
                StoreError::Unavailable(format!("the database went away ({})", db.message()))
            }
            sqlx::Error::Database(db) if is_busy(db.as_ref()) => {
                StoreError::Busy(format!("database locked ({})", db.message()))
            }
            // The database server cannot be reached, or dropped the connection: the caller may
            // retry once it is back.
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => {
                StoreError::Unavailable(format!("the database cannot be reached ({err})"))
            }
            _ => StoreError::Database(err),
        }
    }
}

impl StoreError {
    /// The error a `return` failpoint injects: a database error naming the failpoint.
    pub(crate) fn injected(failpoint: &str) -> Self {
        StoreError::Database(sqlx::Error::Protocol(format!(
            "injected by failpoint {failpoint}"
        )))
    }

    /// The same error for another caller: every caller of a group that failed to commit gets
    /// one (a database error's source cannot be cloned, so it is kept as text).
    pub(crate) fn duplicate(&self) -> Self {
        match self {
            StoreError::Busy(what) => StoreError::Busy(what.clone()),
            other => StoreError::Unavailable(format!("the commit failed: {}", error_chain(other))),
        }
    }

    /// Whether the database refused a write for a foreign key (a referenced row is missing).
    pub(crate) fn is_foreign_key_violation(&self) -> bool {
        matches!(self, StoreError::Database(sqlx::Error::Database(db))
            if db.kind() == ErrorKind::ForeignKeyViolation)
    }
}

/// A write that lost a race and may simply be retried: SQLite's `SQLITE_BUSY` (5) and
/// `SQLITE_LOCKED` (6), with their extended codes (the low byte is the primary code);
/// PostgreSQL's serialization failure, deadlock and lock-not-available SQLSTATEs.
fn is_busy(db: &dyn sqlx::error::DatabaseError) -> bool {
    let code = db.code();
    let code = code.as_deref();
    if db
        .try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some()
    {
        return matches!(code, Some("40001" | "40P01" | "55P03"));
    }
    code.and_then(|code| code.parse::<i64>().ok())
        .is_some_and(|code| matches!(code & 0xff, 5 | 6))
}

/// PostgreSQL shutting down or not accepting connections yet (SQLSTATE class 08, connection
/// exceptions, and 57P01–57P03).
fn is_postgres_unavailable(db: &dyn sqlx::error::DatabaseError) -> bool {
    db.try_downcast_ref::<sqlx::postgres::PgDatabaseError>()
        .is_some_and(|pg| {
            let code = pg.code();
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
        })
}

/// The error and its sources, as one line.
fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// The result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;
