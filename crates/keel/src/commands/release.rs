//! The release-stuck job: commands whose lease expired go back to pending, or die.

use std::collections::BTreeSet;

use keel_store::{OrgId, ReleaseOutcome, Released, Store, StoreError};

use super::wakeups::Wakeups;

/// Releases the expired leases of `org` (of every organisation when `None`, as the job does);
/// each release is an `audit` record and counted in `keel_commands_released_total{outcome}`;
/// organisations with requeued commands wake their waiting agents.
pub async fn release_expired_leases(
    store: &dyn Store,
    wakeups: &Wakeups,
    org: Option<OrgId>,
) -> Result<Vec<Released>, StoreError> {
    fail::fail_point!("commands.release_stuck");
    let released = store.release_expired_leases(org).await?;
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
