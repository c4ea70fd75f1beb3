//! keel's store: organisations, API keys, agents and the commands agents pull.
//!
//! One trait, [`Store`], with a backend per database; SQLite ([`SqliteStore`]) is the embedded
//! default. Every query that takes an organisation is scoped to it.
//!
//! - [`store`]: the [`Store`] trait and its limits.
//! - [`model`]: identifiers, organisations, keys, agents, commands, claims and leases.
//! - [`labels`]: agent labels and the label selectors that pick agents by them.
//! - [`schedule`]: schedules, their fire times (cron patterns in IANA time zones) and the
//!   missed-fire policy.
//! - [`notifications`]: notification settings, events and deliveries.
//! - [`sqlite`]: the SQLite backend (WAL, migrations applied at open).
//! - [`postgres`]: the PostgreSQL backend (several instances on one database).
//! - [`copy`]: moving an installation from SQLite to PostgreSQL, row for row.
//! - [`clock`]: where "now" comes from ([`SystemClock`], [`ManualClock`] for tests).
//! - [`backoff`]: the delay before a failed command is retried.
//! - [`mod@error`]: the error type, [`StoreError`].
//!
//! Failpoints (the [`fail`] crate): `store.claim`, `store.heartbeat` and `store.complete`, at the
//! start of those methods; `return` makes them fail with an injected database error.
//! `store.crash` ([`crash`]) ends the process just before or after one transition's commit.

pub mod backoff;
pub mod clock;
mod common;
pub mod copy;
pub mod crash;
pub mod error;
pub mod labels;
pub mod model;
pub mod notifications;
pub mod postgres;
pub mod schedule;
pub mod sqlite;
pub mod store;
mod token;

#[cfg(feature = "conformance")]
#[doc(hidden)]
pub mod conformance;
#[cfg(feature = "conformance")]
#[doc(hidden)]
pub mod conformance_notifications;

pub use backoff::retry_backoff;
pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{StoreError, StoreResult};
pub use labels::{LabelSelector, Labels};
pub use model::{
    Agent, AgentId, ApiKey, ApiKeyId, Attempt, AttemptOutcome, Broadcast, CheckIn, ClaimToken,
    Claimed, Command, CommandFilter, CommandId, CommandStatus, Created, CreatedApiKey,
    CreatedOperatorKey, DEFAULT_LEASE_DURATION, DEFAULT_MAX_ATTEMPTS, DeadReason, FinishedCount,
    Idempotency, Lease, MissedFires, NewApiKey, NewBroadcast, NewCommand, NewCommandItem,
    OperatorKey, OperatorKeyId, OrgId, Organisation, Page, PausedQueue, Principal, ReleaseOutcome,
    Released, ScheduleId, ScheduleState, Scope, Target, UnknownName,
};
pub use postgres::{PgOptions, PgStore, is_postgres_url};
pub use secrecy::{ExposeSecret, SecretString};
pub use sqlite::{SqliteOptions, SqliteStore, Synchronous, WritePressure, WriterOptions};
pub use store::{
    MAX_BATCH_CREATE, MAX_CLAIM_BATCH, MAX_LEASE_SECONDS, MAX_PAGE_SIZE, MAX_QUEUE_NAME_LEN,
    MAX_QUEUES_PER_CLAIM, MIN_LEASE_SECONDS, Store, check_queue_name,
};
