//! The release-stuck job: commands whose lease expired go back to pending, or die.

use std::collections::BTreeSet;
use std::sync::Arc;

use keel_guard::periodic::{JobHandle, RunNowError};
use keel_store::{OrgId, ReleaseOutcome, Released, Store, StoreError};

use super::wakeups::Wakeups;

/// How many leases one store call releases: each batch is its own short write, so heartbeats
/// and reports are not held up behind one long release.
pub const RELEASE_BATCH: u32 = 500;

/// The name of the release-stuck job.
pub const JOB_NAME: &str = "release-stuck";

/// Why a manual release-stuck run did not release.
#[derive(Debug, thiserror::Error)]
pub enum ReleaseNowError {
    /// The store failed; nothing was released.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The run panicked (logged and counted as a failed tick) or the job has stopped.
    #[error(transparent)]
    Job(#[from] RunNowError),
}

/// Runs the release-stuck job now for `org` (`POST /v1/commands/release-stuck`), as a tick of
/// `job`: it waits for a tick in progress, and is counted in the job's statistics and metrics
/// like a scheduled tick.
pub async fn release_now(
    job: &JobHandle,
    store: Arc<dyn Store>,
    wakeups: Wakeups,
    org: OrgId,
) -> Result<Vec<Released>, ReleaseNowError> {
    let released = job
        .run_with(async move { release_expired_leases(store.as_ref(), &wakeups, Some(org)).await })
        .await??;
    Ok(released)
}

/// Releases the expired leases of `org` (of every organisation when `None`, as the job does),
/// in batches of [`RELEASE_BATCH`] until none is left; each release is an `audit` record and
/// counted in `keel_commands_released_total{outcome}`; organisations with requeued commands
/// wake their waiting agents.
pub async fn release_expired_leases(
    store: &dyn Store,
    wakeups: &Wakeups,
    org: Option<OrgId>,
) -> Result<Vec<Released>, StoreError> {
    fail::fail_point!("commands.release_stuck");
    let mut released = Vec::new();
    loop {
        let batch = store.release_expired_leases(org, RELEASE_BATCH).await?;
        let last = batch.len() < RELEASE_BATCH as usize;
        released.extend(batch);
        if last {
            break;
        }
    }
    for release in &released {
        let outcome = outcome_name(release.outcome);
        tracing::info!(
            target: "keel::audit",
            action = "command.lease_expired",
            command_id = %release.command_id.0,
            org_id = %release.org_id.0,
            attempts = release.attempts,
            outcome,
            "lease expired"
        );
        metrics::counter!("keel_commands_released_total", "outcome" => outcome).increment(1);
    }
    let requeued_in: BTreeSet<OrgId> = released
        .iter()
        .filter(|release| release.outcome == ReleaseOutcome::Requeued)
        .map(|release| release.org_id)
        .collect();
    for org in requeued_in {
        wakeups.wake_org(org);
    }
    Ok(released)
}

/// The outcome as the API and the metrics name it.
pub fn outcome_name(outcome: ReleaseOutcome) -> &'static str {
    match outcome {
        ReleaseOutcome::Requeued => "requeued",
        ReleaseOutcome::Dead => "dead",
        ReleaseOutcome::Cancelled => "cancelled",
    }
}
