//! The deliveries' periodic jobs: release of expired leases (a worker that died or a keel that
//! was killed mid-send), and the cleanup of finished deliveries past their retention.

use std::time::Duration;

use keel_store::notifications::model::DeliveryStatus;
use keel_store::{Store, StoreError};

/// The name of the release job.
pub const RELEASE_JOB: &str = "delivery-release";

/// The name of the cleanup job.
pub const CLEANUP_JOB: &str = "delivery-cleanup";

/// How many deliveries one store call releases or deletes.
const BATCH: u32 = 500;

/// The most batches one run handles; the rest waits for the next run.
const MAX_BATCHES: u32 = 100;

/// Releases expired delivery leases; returns how many. Those put back to pending wake the
/// workers through `wake`.
pub async fn release_expired(store: &dyn Store, wake: impl Fn()) -> Result<usize, StoreError> {
    let mut total = 0;
    for _ in 0..MAX_BATCHES {
        let released = store
            .notifications()
            .release_expired_deliveries(BATCH)
            .await?;
        for r in &released {
            tracing::info!(target: "keel::audit", action = "delivery.lease_expired", delivery_id = %r.delivery_id, org_id = %r.org_id, status = r.status.as_str(), "delivery lease expired");
            if r.status == DeliveryStatus::Dead {
                tracing::warn!(target: "keel::audit", action = "delivery.exhausted", delivery_id = %r.delivery_id, org_id = %r.org_id, "delivery dead: its lease expired on its last attempt");
            }
        }
        total += released.len();
        if released.len() < BATCH as usize {
            break;
        }
    }
    if total > 0 {
        wake();
    }
    Ok(total)
}

/// Deletes deliveries that finished more than `retention` ago (and the events left without
/// any); returns how many deliveries.
pub async fn purge_finished(store: &dyn Store, retention: Duration) -> Result<u64, StoreError> {
    fail::fail_point!("deliveries.cleanup");
    let before = store
        .now()
        .saturating_sub(time::Duration::try_from(retention).unwrap_or(time::Duration::MAX));
    let mut purged = 0;
    for _ in 0..MAX_BATCHES {
        let batch = store
            .notifications()
            .purge_finished_deliveries(before, BATCH)
            .await?;
        purged += batch;
        if batch < u64::from(BATCH) {
            break;
        }
    }
    if purged > 0 {
        metrics::counter!("keel_deliveries_purged_total").increment(purged);
        tracing::info!(
            purged,
            ?retention,
            "delivery cleanup: finished deliveries deleted"
        );
    }
    Ok(purged)
}
