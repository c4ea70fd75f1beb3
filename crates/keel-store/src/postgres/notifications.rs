//! Notification settings, events and deliveries (the lease engine's second table).

use async_trait::async_trait;
use time::OffsetDateTime;

use super::PgStore;
use crate::error::StoreResult;
use crate::model::OrgId;
use crate::notifications::NotificationStore;
use crate::notifications::model::{
    ClaimedDelivery, Delivery, DeliveryAttempt, DeliveryFilter, DeliveryId, DeliveryPage,
    DeliveryReport, NewDelivery, NewEvent, NewSetting, RecordedDelivery, ReleasedDelivery, Setting,
    SettingId, SettingKind, Triggered, WorkerId,
};

#[async_trait]
impl NotificationStore for PgStore {
    async fn create_setting(
        &self,
        _org: OrgId,
        _kind: SettingKind,
        _setting: NewSetting,
    ) -> StoreResult<Setting> {
        Err(super::accounts::not_yet("create_setting"))
    }

    async fn get_setting(
        &self,
        _org: OrgId,
        _kind: SettingKind,
        _id: SettingId,
    ) -> StoreResult<Option<Setting>> {
        Err(super::accounts::not_yet("get_setting"))
    }

    async fn list_settings(&self, _org: OrgId, _kind: SettingKind) -> StoreResult<Vec<Setting>> {
        Err(super::accounts::not_yet("list_settings"))
    }

    async fn update_setting(
        &self,
        _org: OrgId,
        _kind: SettingKind,
        _id: SettingId,
        _setting: NewSetting,
    ) -> StoreResult<Setting> {
        Err(super::accounts::not_yet("update_setting"))
    }

    async fn delete_setting(
        &self,
        _org: OrgId,
        _kind: SettingKind,
        _id: SettingId,
    ) -> StoreResult<()> {
        Err(super::accounts::not_yet("delete_setting"))
    }

    async fn trigger(
        &self,
        _org: OrgId,
        _event: NewEvent,
        _deliveries: Vec<NewDelivery>,
    ) -> StoreResult<Triggered> {
        Err(super::accounts::not_yet("trigger"))
    }

    async fn get_delivery(&self, _org: OrgId, _id: DeliveryId) -> StoreResult<Option<Delivery>> {
        Err(super::accounts::not_yet("get_delivery"))
    }

    async fn list_delivery_attempts(
        &self,
        _org: OrgId,
        _id: DeliveryId,
    ) -> StoreResult<Vec<DeliveryAttempt>> {
        Err(super::accounts::not_yet("list_delivery_attempts"))
    }

    async fn list_deliveries(
        &self,
        _org: OrgId,
        _filter: DeliveryFilter,
        _cursor: Option<DeliveryId>,
        _limit: u32,
    ) -> StoreResult<DeliveryPage> {
        Err(super::accounts::not_yet("list_deliveries"))
    }

    async fn list_digested(&self, _org: OrgId, _digest: DeliveryId) -> StoreResult<Vec<Delivery>> {
        Err(super::accounts::not_yet("list_digested"))
    }

    async fn requeue_delivery(&self, _org: OrgId, _id: DeliveryId) -> StoreResult<Delivery> {
        Err(super::accounts::not_yet("requeue_delivery"))
    }

    async fn requeue_deliveries(&self, _org: OrgId, _filter: DeliveryFilter) -> StoreResult<u64> {
        Err(super::accounts::not_yet("requeue_deliveries"))
    }

    async fn claim_deliveries(
        &self,
        _worker: WorkerId,
        _limit: u32,
    ) -> StoreResult<Vec<ClaimedDelivery>> {
        Err(super::accounts::not_yet("claim_deliveries"))
    }

    async fn record_deliveries(
        &self,
        _worker: WorkerId,
        _reports: Vec<DeliveryReport>,
    ) -> StoreResult<Vec<StoreResult<RecordedDelivery>>> {
        Err(super::accounts::not_yet("record_deliveries"))
    }

    async fn release_expired_deliveries(&self, _limit: u32) -> StoreResult<Vec<ReleasedDelivery>> {
        Err(super::accounts::not_yet("release_expired_deliveries"))
    }

    async fn next_delivery_due(&self) -> StoreResult<Option<OffsetDateTime>> {
        Err(super::accounts::not_yet("next_delivery_due"))
    }

    async fn purge_finished_deliveries(
        &self,
        _before: OffsetDateTime,
        _limit: u32,
    ) -> StoreResult<u64> {
        Err(super::accounts::not_yet("purge_finished_deliveries"))
    }
}
