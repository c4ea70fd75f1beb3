//! The retention job: finished commands older than `commands.retention` are deleted, with their
//! attempts and idempotency keys, in bounded batches.

use std::time::Duration;

use keel_store::{Store, StoreError};

/// How many commands one store call deletes: each batch is its own short write.
pub const PURGE_BATCH: u32 = 1000;

/// The most batches one run deletes; what is left waits for the next run, so one run cannot
/// hold the writer for long after a large backlog of finished commands.
pub const MAX_BATCHES_PER_RUN: u32 = 100;

/// Deletes the commands that finished more than `retention` ago; returns how many. Counted in
/// `keel_commands_purged_total`.
pub async fn purge_finished_commands(
    store: &dyn Store,
    retention: Duration,
) -> Result<u64, StoreError> {
    let before = store
        .now()
        .saturating_sub(time::Duration::try_from(retention).unwrap_or(time::Duration::MAX));
    let mut purged = 0;
    for _ in 0..MAX_BATCHES_PER_RUN {
        let batch = store.purge_finished(before, PURGE_BATCH).await?;
        purged += batch;
        if batch < u64::from(PURGE_BATCH) {
            break;
        }
    }
    if purged > 0 {
        metrics::counter!("keel_commands_purged_total").increment(purged);
        tracing::info!(purged, ?retention, "retention: finished commands deleted");
    }
    Ok(purged)
}
