//! The database probe: the `database` component is degraded (and `/readyz` answers 503) while
//! the database does not answer.
//!
//! The pool reconnects by itself: each operation opens a connection when none is idle, and a
//! connection the server dropped is found out before use. Meanwhile requests that need the
//! database fail with 503 and `Retry-After` (`StoreError::Unavailable`, `Busy`), health and
//! metrics keep answering, and the periodic jobs log their failed ticks and try again at the
//! next one.

use std::time::Duration;

use keel_guard::components::Probe;
use keel_guard::supervisor::Supervisor;
use sqlx::postgres::PgPool;

/// How often the probe asks the database.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// How long an answer may take before the database counts as unreachable.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts the supervised task `database-probe`, which keeps the `database` component's state.
pub fn start(supervisor: &Supervisor, pool: PgPool) -> Probe {
    let probe = supervisor.components().probe("database");
    let shown = probe.clone();
    supervisor.spawn("database-probe", move |cancel| {
        let (pool, probe) = (pool.clone(), shown.clone());
        async move {
            loop {
                let answer =
                    tokio::time::timeout(PROBE_TIMEOUT, sqlx::query("SELECT 1").execute(&pool))
                        .await;
                match answer {
                    Ok(Ok(_)) => {
                        if probe.is_degraded() {
                            tracing::info!("the database answers again");
                        }
                        probe.healthy();
                    }
                    Ok(Err(error)) => unreachable_now(&probe, error.to_string()),
                    Err(_) => {
                        unreachable_now(&probe, format!("no answer within {PROBE_TIMEOUT:?}"))
                    }
                }
                tokio::select! {
                    () = cancel.cancelled() => return Ok(()),
                    () = tokio::time::sleep(PROBE_EVERY) => {}
                }
            }
        }
    });
    probe
}

fn unreachable_now(probe: &Probe, error: String) {
    if !probe.is_degraded() {
        tracing::error!(%error, "the database cannot be reached: not ready until it answers");
    }
    probe.degraded(error);
}
