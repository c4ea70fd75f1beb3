//! The rows of the notification tables as PostgreSQL returns them, and their models.

use serde_json::Value;
use sqlx::types::Json;
use time::OffsetDateTime;

use crate::common::{corrupt, to_u32};
use crate::error::StoreResult;
use crate::model::{ClaimToken, OrgId};
use crate::notifications::model::{
    ChannelType, Delivery, DeliveryAttempt, DeliveryId, DeliveryStatus, Event, EventId,
    RecordedDelivery, SealedSecret, Setting, SettingId, Severity, WorkerId,
};

/// The setting columns, in [`SettingRow`] order.
pub(super) const SETTING_COLUMNS: &str =
    "id, org_id, kind, name, unique_key, body, sealed_secret, created_at, updated_at";

/// The event columns, in [`EventRow`] order.
pub(super) const EVENT_COLUMNS: &str =
    "id, org_id, event_type, payload, domain, severity, idempotency_key, request_hash, created_at";

/// The delivery columns, in [`DeliveryRow`] order.
pub(super) const DELIVERY_COLUMNS: &str = "id, org_id, event_id, event_type, severity, \
     channel_id, channel_type, recipient, subject, body, status, priority, attempts, \
     max_attempts, run_at, claimed_by, claim_token, lease_expires_at, result, error, \
     dead_reason, created_at, updated_at, finished_at, digest_of, digest_id";

/// The columns a recorded outcome reads back, in [`RecordedRow`] order.
pub(super) const RECORDED_COLUMNS: &str = "id, org_id, event_id, channel_type, status, attempts";

#[derive(sqlx::FromRow)]
pub(super) struct SettingRow {
    id: SettingId,
    org_id: OrgId,
    kind: String,
    name: String,
    unique_key: Option<String>,
    body: Json<Value>,
    sealed_secret: Option<Vec<u8>>,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
}

impl SettingRow {
    pub(super) fn into_setting(self) -> StoreResult<Setting> {
        Ok(Setting {
            id: self.id,
            org_id: self.org_id,
            kind: self.kind.parse().map_err(corrupt)?,
            name: self.name,
            unique_key: self.unique_key,
            body: self.body.0,
            sealed_secret: self.sealed_secret.map(SealedSecret),
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct EventRow {
    id: EventId,
    org_id: OrgId,
    event_type: String,
    payload: Json<Value>,
    domain: String,
    severity: String,
    idempotency_key: Option<String>,
    pub(super) request_hash: Option<String>,
    created_at: OffsetDateTime,
}

impl EventRow {
    pub(super) fn into_event(self) -> StoreResult<Event> {
        Ok(Event {
            id: self.id,
            org_id: self.org_id,
            event_type: self.event_type,
            payload: self.payload.0,
            domain: self.domain,
            severity: self.severity.parse::<Severity>().map_err(corrupt)?,
            idempotency_key: self.idempotency_key,
            created_at: self.created_at,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct DeliveryRow {
    id: DeliveryId,
    org_id: OrgId,
    event_id: EventId,
    event_type: String,
    severity: String,
    channel_id: Option<SettingId>,
    channel_type: String,
    recipient: String,
    subject: String,
    body: String,
    status: String,
    priority: i32,
    attempts: i32,
    max_attempts: i32,
    run_at: OffsetDateTime,
    claimed_by: Option<WorkerId>,
    claim_token: Option<String>,
    lease_expires_at: Option<OffsetDateTime>,
    result: Option<Json<Value>>,
    error: Option<Json<Value>>,
    dead_reason: Option<String>,
    created_at: OffsetDateTime,
    updated_at: OffsetDateTime,
    finished_at: Option<OffsetDateTime>,
    digest_of: Option<DeliveryId>,
    digest_id: Option<DeliveryId>,
}

impl DeliveryRow {
    /// The delivery, and its claim token while it is executing.
    pub(super) fn into_delivery(self) -> StoreResult<(Delivery, Option<ClaimToken>)> {
        let delivery = Delivery {
            id: self.id,
            org_id: self.org_id,
            event_id: self.event_id,
            event_type: self.event_type,
            severity: self.severity.parse().map_err(corrupt)?,
            channel_id: self.channel_id,
            channel_type: self.channel_type.parse::<ChannelType>().map_err(corrupt)?,
            recipient: self.recipient,
            subject: self.subject,
            body: self.body,
            status: self.status.parse::<DeliveryStatus>().map_err(corrupt)?,
            priority: self.priority,
            attempts: to_u32(i64::from(self.attempts))?,
            max_attempts: to_u32(i64::from(self.max_attempts))?,
            run_at: self.run_at,
            claimed_by: self.claimed_by,
            lease_expires_at: self.lease_expires_at,
            result: self.result.map(|j| j.0),
            error: self.error.map(|j| j.0),
            dead_reason: self.dead_reason,
            digest_of: self.digest_of,
            digest_id: self.digest_id,
            created_at: self.created_at,
            updated_at: self.updated_at,
            finished_at: self.finished_at,
        };
        Ok((delivery, self.claim_token.map(ClaimToken)))
    }

    /// The delivery alone.
    pub(super) fn into_plain(self) -> StoreResult<Delivery> {
        Ok(self.into_delivery()?.0)
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct RecordedRow {
    pub(super) id: DeliveryId,
    org_id: OrgId,
    event_id: EventId,
    channel_type: String,
    status: String,
    attempts: i32,
}

impl RecordedRow {
    pub(super) fn into_recorded(self) -> StoreResult<RecordedDelivery> {
        Ok(RecordedDelivery {
            id: self.id,
            org_id: self.org_id,
            event_id: self.event_id,
            channel_type: self.channel_type.parse::<ChannelType>().map_err(corrupt)?,
            status: self.status.parse::<DeliveryStatus>().map_err(corrupt)?,
            attempts: to_u32(i64::from(self.attempts))?,
        })
    }
}

#[derive(sqlx::FromRow)]
pub(super) struct DeliveryAttemptRow {
    attempt: i32,
    agent_id: WorkerId,
    claimed_at: OffsetDateTime,
    ended_at: Option<OffsetDateTime>,
    outcome: Option<String>,
    error: Option<Json<Value>>,
}

impl DeliveryAttemptRow {
    pub(super) fn into_attempt(self) -> StoreResult<DeliveryAttempt> {
        Ok(DeliveryAttempt {
            number: to_u32(i64::from(self.attempt))?,
            worker_id: self.agent_id,
            claimed_at: self.claimed_at,
            ended_at: self.ended_at,
            outcome: self.outcome,
            detail: self.error.map(|j| j.0),
        })
    }
}
