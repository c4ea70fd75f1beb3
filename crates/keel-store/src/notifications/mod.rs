//! Notifications in the store: an organisation's settings, the events it triggers and their
//! deliveries, which the lease engine leases to the delivery processor's workers.
//!
//! - [`model`]: the types.
//! - [`NotificationStore`]: what a backend keeps; [`crate::Store::notifications`] reaches it.
//!
//! The store decides nothing about classification, routing or rendering: the server does that
//! and hands it the event with its rendered deliveries, which it records in one transaction.

pub mod model;

use async_trait::async_trait;
use time::OffsetDateTime;

use crate::error::{StoreError, StoreResult};
use crate::model::{ClaimToken, OrgId};
use model::{
    ClaimedDelivery, Delivery, DeliveryAttempt, DeliveryFailure, DeliveryFilter, DeliveryId,
    DeliveryOutcome, DeliveryPage, DeliveryReport, NewDelivery, NewEvent, NewSetting,
    RecordedDelivery, ReleasedDelivery, Setting, SettingId, SettingKind, Triggered, WorkerId,
};

/// The most deliveries one claim hands out.
pub const MAX_DELIVERY_CLAIM: u32 = 1000;

/// The most deliveries one event may give.
pub const MAX_DELIVERIES_PER_EVENT: usize = 1000;

/// The most reports one [`NotificationStore::record_deliveries`] records.
pub const MAX_DELIVERY_REPORTS: usize = 1000;

/// The most deliveries one requeue by filter puts back.
pub const MAX_REQUEUE: u32 = 10_000;

/// Notification settings, events and deliveries. Every method that takes an `org` is scoped to
/// it, as in [`crate::Store`]; the processor's methods (claim, complete, fail, release, purge)
/// serve every organisation.
#[async_trait]
pub trait NotificationStore: Send + Sync {
    // --- settings ---

    /// Creates a setting; a `unique_key` taken in its kind is a `Conflict`.
    async fn create_setting(
        &self,
        org: OrgId,
        kind: SettingKind,
        setting: NewSetting,
    ) -> StoreResult<Setting>;

    /// One setting of the organisation.
    async fn get_setting(
        &self,
        org: OrgId,
        kind: SettingKind,
        id: SettingId,
    ) -> StoreResult<Option<Setting>>;

    /// The organisation's settings of one kind, oldest first.
    async fn list_settings(&self, org: OrgId, kind: SettingKind) -> StoreResult<Vec<Setting>>;

    /// Replaces a setting. A `sealed_secret` of `None` keeps the stored one.
    async fn update_setting(
        &self,
        org: OrgId,
        kind: SettingKind,
        id: SettingId,
        setting: NewSetting,
    ) -> StoreResult<Setting>;

    /// Deletes a setting (deliveries already made through a channel keep its id).
    async fn delete_setting(&self, org: OrgId, kind: SettingKind, id: SettingId)
    -> StoreResult<()>;

    // --- events and deliveries ---

    /// Records the event and every delivery in one transaction: all of them or none. With an
    /// idempotency key seen before, the same request hash answers the earlier event and its
    /// deliveries (`created: false`) and creates nothing; another hash is
    /// `IdempotencyMismatch`. A delivery whose (event, channel, recipient) is already there is
    /// not created twice. A delivery with a throttle window whose (event type, channel,
    /// recipient) had a delivery sent alone within the window is `throttled` and folded into
    /// that delivery's digest, created on the first such fold and due when the window closes.
    async fn trigger(
        &self,
        org: OrgId,
        event: NewEvent,
        deliveries: Vec<NewDelivery>,
    ) -> StoreResult<Triggered>;

    /// One delivery of the organisation.
    async fn get_delivery(&self, org: OrgId, id: DeliveryId) -> StoreResult<Option<Delivery>>;

    /// Every attempt at the delivery, first first.
    async fn list_delivery_attempts(
        &self,
        org: OrgId,
        id: DeliveryId,
    ) -> StoreResult<Vec<DeliveryAttempt>>;

    /// The organisation's deliveries, newest first, after `cursor`; `limit` is clamped to
    /// `1..=MAX_PAGE_SIZE`.
    async fn list_deliveries(
        &self,
        org: OrgId,
        filter: DeliveryFilter,
        cursor: Option<DeliveryId>,
        limit: u32,
    ) -> StoreResult<DeliveryPage>;

    /// The deliveries folded into the digest `digest`, oldest first.
    async fn list_digested(&self, org: OrgId, digest: DeliveryId) -> StoreResult<Vec<Delivery>>;

    /// Puts a dead or failed delivery back to pending, due now, attempts reset.
    /// `InvalidState` for one in another state.
    async fn requeue_delivery(&self, org: OrgId, id: DeliveryId) -> StoreResult<Delivery>;

    /// Requeues up to [`MAX_REQUEUE`] dead or failed deliveries that match `filter` (its
    /// status, when given, must be `dead` or `failed`); returns how many.
    async fn requeue_deliveries(&self, org: OrgId, filter: DeliveryFilter) -> StoreResult<u64>;

    // --- the processor ---

    /// Leases up to `limit` (clamped to `1..=MAX_DELIVERY_CLAIM`) due pending deliveries of
    /// any organisation to `worker`, best priority first, then earliest due, then oldest.
    async fn claim_deliveries(
        &self,
        worker: WorkerId,
        limit: u32,
    ) -> StoreResult<Vec<ClaimedDelivery>>;

    /// Records what came of claimed deliveries, all in one write: each report's answer is what
    /// the delivery is now ([`RecordedDelivery`]), or its own error (`StaleClaim`, and no change, unless `worker`
    /// holds it under the report's token), in the reports' order. At most
    /// [`MAX_DELIVERY_REPORTS`] reports; more is `InvalidInput`.
    ///
    /// - `Delivered`: the attempt succeeded, with what the channel reported.
    /// - `Failed`: back to pending after the engine's backoff (or `not_before` when later)
    ///   while attempts are left and it is retryable; `dead` (`attempts_exhausted`) when they
    ///   ran out; `failed` when it is not retryable.
    /// - `Postponed`: given back without spending its attempt (its endpoint's circuit is
    ///   open): pending again, due at the given time, its attempt count and history as before
    ///   the claim.
    async fn record_deliveries(
        &self,
        worker: WorkerId,
        reports: Vec<DeliveryReport>,
    ) -> StoreResult<Vec<StoreResult<RecordedDelivery>>>;

    /// Records a successful attempt (one report of [`Self::record_deliveries`]).
    async fn complete_delivery(
        &self,
        worker: WorkerId,
        id: DeliveryId,
        token: &ClaimToken,
        detail: serde_json::Value,
    ) -> StoreResult<RecordedDelivery> {
        self.record_one(worker, id, token, DeliveryOutcome::Delivered(detail))
            .await
    }

    /// Records a failed attempt (one report of [`Self::record_deliveries`]).
    async fn fail_delivery(
        &self,
        worker: WorkerId,
        id: DeliveryId,
        token: &ClaimToken,
        failure: DeliveryFailure,
    ) -> StoreResult<RecordedDelivery> {
        self.record_one(worker, id, token, DeliveryOutcome::Failed(failure))
            .await
    }

    /// Gives a claimed delivery back unspent, due at `until` (one report of
    /// [`Self::record_deliveries`]).
    async fn postpone_delivery(
        &self,
        worker: WorkerId,
        id: DeliveryId,
        token: &ClaimToken,
        until: OffsetDateTime,
    ) -> StoreResult<RecordedDelivery> {
        self.record_one(worker, id, token, DeliveryOutcome::Postponed(until))
            .await
    }

    /// One report of [`Self::record_deliveries`], answered alone.
    async fn record_one(
        &self,
        worker: WorkerId,
        id: DeliveryId,
        token: &ClaimToken,
        outcome: DeliveryOutcome,
    ) -> StoreResult<RecordedDelivery> {
        let report = DeliveryReport {
            id,
            claim_token: token.clone(),
            outcome,
        };
        self.record_deliveries(worker, vec![report])
            .await?
            .into_iter()
            .next()
            .unwrap_or(Err(StoreError::NotFound))
    }

    /// Up to `limit` executing deliveries whose lease ended before now go back to pending, or
    /// to `dead` (`lease_expired`) when their attempts are used up.
    async fn release_expired_deliveries(&self, limit: u32) -> StoreResult<Vec<ReleasedDelivery>>;

    /// When the earliest pending delivery is due (now or in the past when one is claimable),
    /// so that idle workers know how long they may sleep.
    async fn next_delivery_due(&self) -> StoreResult<Option<OffsetDateTime>>;

    /// Deletes up to `limit` deliveries that finished before `before`, oldest first, with
    /// their attempts, and then the events left without deliveries; returns how many
    /// deliveries.
    async fn purge_finished_deliveries(
        &self,
        before: OffsetDateTime,
        limit: u32,
    ) -> StoreResult<u64>;
}
