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

    /// Whether the database refused a write for a foreign key (a referenced row is missing).
    pub(crate) fn is_foreign_key_violation(&self) -> bool {
        matches!(self, StoreError::Database(sqlx::Error::Database(db))
            if db.kind() == ErrorKind::ForeignKeyViolation)
    }
}

/// The result of a store operation.
pub type StoreResult<T> = Result<T, StoreError>;
