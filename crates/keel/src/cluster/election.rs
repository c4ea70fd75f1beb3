//! One instance runs the jobs that must run once.
//!
//! On PostgreSQL the instance that holds the advisory lock ([`LOCK_CLASS`], its schema) is
//! elected. The lock
//! lives on a connection of its own, outside the pool: when the instance dies (or the
//! connection does), PostgreSQL releases it and the next instance to try (every
//! [`RETRY_EVERY`]) takes over. The holder checks its connection every [`RETRY_EVERY`] too, and
//! steps down as soon as a check fails, before another could take over. Every elected job is
//! also safe when two instances run it at once for a moment (claims skip locked rows, schedule
//! fires are recorded once, deletes are idempotent): the election saves work, it is not what
//! keeps the data right.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use keel_guard::supervisor::{Supervisor, TaskError};
use sqlx::postgres::PgPool;
use sqlx::{ConnectOptions, Connection};
use tokio_util::sync::CancellationToken;

use super::Instance;

/// The first half of the elected instance's advisory lock ("keel" in ASCII); the second is
/// the hash of the schema keel's tables are in (`hashtext(current_schema())`), so that keel
/// installations in several schemas of one database each elect their own.
pub const LOCK_CLASS: i32 = 0x6b65_656c;

/// How often a standby tries the lock, and the holder checks its connection.
pub const RETRY_EVERY: Duration = Duration::from_secs(1);

/// How long a check of the holder's connection may take before it steps down.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);

/// Whether this instance runs the elected jobs now.
#[derive(Debug, Clone)]
pub struct Election {
    elected: Arc<AtomicBool>,
}

impl Election {
    /// The only instance (SQLite): always elected.
    pub fn sole() -> Self {
        Self {
            elected: Arc::new(AtomicBool::new(true)),
        }
    }

    /// Campaigns for the lock on `pool`'s database, as the supervised task `election`.
    pub fn campaign(supervisor: &Supervisor, pool: PgPool, instance: Instance) -> Self {
        let elected = Arc::new(AtomicBool::new(false));
        let state = elected.clone();
        supervisor.spawn("election", move |cancel| {
            let (pool, state, instance) = (pool.clone(), state.clone(), instance.clone());
            async move {
                let result = campaign(&pool, &state, &instance, &cancel).await;
                step_down(&state, &instance);
                result
            }
        });
        Self { elected }
    }

    /// Whether this instance runs the elected jobs now.
    pub fn is_elected(&self) -> bool {
        self.elected.load(Ordering::Acquire)
    }
}

/// Tries the lock until cancelled; holds it while its connection answers. An `Err` (the
/// connection failed) makes the supervisor start it again after its backoff.
async fn campaign(
    pool: &PgPool,
    elected: &AtomicBool,
    instance: &Instance,
    cancel: &CancellationToken,
) -> Result<(), TaskError> {
    let options = pool.connect_options();
    let mut conn = tokio::select! {
        () = cancel.cancelled() => return Ok(()),
        conn = options.connect() => conn?,
    };
    loop {
        let holding = elected.load(Ordering::Acquire);
        let check = async {
            if holding {
                sqlx::query("SELECT 1")
                    .execute(&mut conn)
                    .await
                    .map(|_| true)
            } else {
                sqlx::query_scalar::<_, bool>(
                    "SELECT pg_try_advisory_lock($1, hashtext(current_schema()))",
                )
                .bind(LOCK_CLASS)
                .fetch_one(&mut conn)
                .await
            }
        };
        let answer = tokio::time::timeout(CHECK_TIMEOUT, check).await;
        match answer {
            Ok(Ok(true)) if !holding => {
                elected.store(true, Ordering::Release);
                instance.show_role(true);
                tracing::info!(boot_id = %instance.boot_id, "elected: this instance runs the elected jobs");
            }
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return Err(error.into()),
            Err(_) => return Err("the election's connection did not answer in time".into()),
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(RETRY_EVERY) => {}
        }
    }
    // Shutting down: hand the lock over at once rather than when the connection drops.
    if elected.load(Ordering::Acquire) {
        let _ = sqlx::query("SELECT pg_advisory_unlock($1, hashtext(current_schema()))")
            .bind(LOCK_CLASS)
            .execute(&mut conn)
            .await;
    }
    let _ = conn.close().await;
    Ok(())
}

fn step_down(elected: &AtomicBool, instance: &Instance) {
    if elected.swap(false, Ordering::AcqRel) {
        instance.show_role(false);
        tracing::warn!(boot_id = %instance.boot_id, "no longer elected: another instance may take the elected jobs over");
    }
}
