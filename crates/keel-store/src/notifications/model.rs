//! Notification types: settings, events, deliveries and their attempts.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::model::{ClaimToken, Idempotency, OrgId, UnknownName, id_type, named_enum};

id_type!(
    /// Identifies a notification setting (rule, policy, channel, sender, template, route).
    SettingId
);
id_type!(
    /// Identifies a triggered event; v7, so identifiers sort by creation time.
    EventId
);
id_type!(
    /// Identifies a delivery; v7, so identifiers sort by creation time.
    DeliveryId
);
id_type!(
    /// Identifies one delivery processor worker (chosen anew by each keel process); it holds
    /// the leases of the deliveries it claims.
    WorkerId
);

named_enum!(
    /// What a notification setting is.
    SettingKind, "setting kind" {
        /// A classification rule: an event-type pattern gives the domain, a keyword the
        /// severity.
        Rule => "rule",
        /// What a severity means: priority, attempts, throttle window.
        Policy => "policy",
        /// Where messages go: a webhook endpoint, email recipients, Telegram chats.
        Channel => "channel",
        /// Credentials to send with: an SMTP server, a bot token, webhook signing secrets.
        Sender => "sender",
        /// How an event type is written for a channel type.
        Template => "template",
        /// Which events go to which channels.
        Route => "route",
    }
);

named_enum!(
    /// How serious an event is.
    Severity, "severity" {
        /// Something is down or broken.
        Critical => "critical",
        /// Something failed.
        High => "high",
        /// A warning.
        Medium => "medium",
        /// Worth knowing.
        Low => "low",
        /// Something happened as it should.
        Info => "info",
    }
);

named_enum!(
    /// How a message is delivered.
    ChannelType, "channel type" {
        /// An HTTP POST signed as Standard Webhooks say.
        Webhook => "webhook",
        /// An email over SMTP.
        Email => "email",
        /// A Telegram Bot API `sendMessage`.
        Telegram => "telegram",
    }
);

named_enum!(
    /// Where a delivery is in its life (the lease engine's statuses).
    DeliveryStatus, "delivery status" {
        /// Waiting to be claimed by a worker (at or after `run_at`).
        Pending => "pending",
        /// Claimed by a worker that is sending it.
        Executing => "executing",
        /// Delivered (terminal).
        Completed => "completed",
        /// Refused for good by the receiver (terminal, requeue-able).
        Failed => "failed",
        /// Cancelled (terminal).
        Cancelled => "cancelled",
        /// Its attempts ran out, or its lease expired on its last one (terminal, requeue-able).
        Dead => "dead",
        /// Folded into a digest inside its severity's throttle window (terminal; the digest is
        /// sent instead).
        Throttled => "throttled",
    }
);

/// A channel's credentials, encrypted by the server: the store keeps and returns these bytes,
/// never the secret in clear. Prints as its length only.
#[derive(Clone, PartialEq, Eq)]
pub struct SealedSecret(pub Vec<u8>);

impl fmt::Debug for SealedSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SealedSecret({} bytes)", self.0.len())
    }
}

/// A setting to create or to replace another with.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSetting {
    /// A label for people.
    pub name: String,
    /// What must be unique among the organisation's settings of this kind, if anything.
    pub unique_key: Option<String>,
    /// The setting itself, as the server validated it.
    pub body: Value,
    /// Encrypted credentials (senders).
    pub sealed_secret: Option<SealedSecret>,
}

/// A notification setting as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    /// Its identifier.
    pub id: SettingId,
    /// Its organisation.
    pub org_id: OrgId,
    /// What it is.
    pub kind: SettingKind,
    /// Its label.
    pub name: String,
    /// What is unique among its kind in the organisation.
    pub unique_key: Option<String>,
    /// The setting itself.
    pub body: Value,
    /// Encrypted credentials (senders).
    pub sealed_secret: Option<SealedSecret>,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// When it last changed.
    pub updated_at: OffsetDateTime,
}

/// A classified event to record with its deliveries.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    /// Its identifier, chosen by the caller (templates may show it before it is stored).
    pub id: EventId,
    /// What happened (`order_failed`, `disk.space_warning`).
    pub event_type: String,
    /// Its data, which templates render.
    pub payload: Value,
    /// The domain its classification gave.
    pub domain: String,
    /// The severity its classification gave.
    pub severity: Severity,
    /// The caller's idempotency key and the request's hash.
    pub idempotency: Option<Idempotency>,
}

/// An event as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Its identifier.
    pub id: EventId,
    /// Its organisation.
    pub org_id: OrgId,
    /// What happened.
    pub event_type: String,
    /// Its data.
    pub payload: Value,
    /// Its domain.
    pub domain: String,
    /// Its severity.
    pub severity: Severity,
    /// The idempotency key it was triggered with.
    pub idempotency_key: Option<String>,
    /// When it was triggered.
    pub created_at: OffsetDateTime,
}

/// One rendered message to deliver to one recipient over one channel.
#[derive(Debug, Clone, PartialEq)]
pub struct NewDelivery {
    /// The channel setting it goes through (none for a message sent directly).
    pub channel_id: Option<SettingId>,
    /// How it is delivered.
    pub channel_type: ChannelType,
    /// A URL, an email address or a chat id.
    pub recipient: String,
    /// The rendered subject.
    pub subject: String,
    /// The rendered body.
    pub body: String,
    /// Higher is claimed first.
    pub priority: i32,
    /// How many attempts it gets (at least 1).
    pub max_attempts: u32,
    /// How long a worker's claim holds.
    pub lease_duration: std::time::Duration,
    /// The severity's throttle window: within it, a second delivery of the same event type to
    /// the same channel and recipient is folded into a digest.
    pub throttle: Option<std::time::Duration>,
}

/// A delivery as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivery {
    /// Its identifier.
    pub id: DeliveryId,
    /// Its organisation.
    pub org_id: OrgId,
    /// The event it delivers.
    pub event_id: EventId,
    /// That event's type.
    pub event_type: String,
    /// That event's severity.
    pub severity: Severity,
    /// The channel setting it goes through.
    pub channel_id: Option<SettingId>,
    /// How it is delivered.
    pub channel_type: ChannelType,
    /// A URL, an email address or a chat id.
    pub recipient: String,
    /// The rendered subject.
    pub subject: String,
    /// The rendered body.
    pub body: String,
    /// Where it is in its life.
    pub status: DeliveryStatus,
    /// Higher is claimed first.
    pub priority: i32,
    /// Attempts so far.
    pub attempts: u32,
    /// Attempts it gets.
    pub max_attempts: u32,
    /// Not claimed before this instant.
    pub run_at: OffsetDateTime,
    /// The worker that holds its lease, or held it last.
    pub claimed_by: Option<WorkerId>,
    /// When the current lease ends (while executing).
    pub lease_expires_at: Option<OffsetDateTime>,
    /// What the channel reported on success.
    pub result: Option<Value>,
    /// What the channel reported on the last failure.
    pub error: Option<Value>,
    /// Why it is dead: `attempts_exhausted` or `lease_expired`.
    pub dead_reason: Option<String>,
    /// A digest: the delivery whose throttle window it closes.
    pub digest_of: Option<DeliveryId>,
    /// A throttled delivery: the digest it is folded into.
    pub digest_id: Option<DeliveryId>,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// When it last changed.
    pub updated_at: OffsetDateTime,
    /// When it reached its terminal state.
    pub finished_at: Option<OffsetDateTime>,
}

/// The outcome of a trigger: the event, its deliveries, and whether this call created them.
#[derive(Debug, Clone, PartialEq)]
pub struct Triggered {
    /// The event (an earlier one when the idempotency key was seen before).
    pub event: Event,
    /// Its deliveries.
    pub deliveries: Vec<Delivery>,
    /// `false` when an earlier trigger with the same idempotency key created them.
    pub created: bool,
}

/// A delivery handed to a worker by a claim.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedDelivery {
    /// The delivery, now executing.
    pub delivery: Delivery,
    /// The token to complete or fail it with.
    pub claim_token: ClaimToken,
}

/// How a delivery attempt failed.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryFailure {
    /// What the channel reported (error, status, duration, response excerpt).
    pub detail: Value,
    /// Whether another attempt may succeed (a permanent refusal is not).
    pub retryable: bool,
    /// The receiver asked not to be tried again before this (`Retry-After`); the backoff
    /// applies when it is longer.
    pub not_before: Option<OffsetDateTime>,
}

/// What came of sending one claimed delivery, to be recorded.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryOutcome {
    /// Delivered; what the channel reported.
    Delivered(Value),
    /// Not delivered (see [`DeliveryFailure`]).
    Failed(DeliveryFailure),
    /// Not sent (its endpoint's circuit is open): pending again, due at this time, its attempt
    /// unspent.
    Postponed(OffsetDateTime),
}

/// One claimed delivery's outcome, fenced by the claim that handed it out.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryReport {
    /// The delivery.
    pub id: DeliveryId,
    /// The token of the claim that handed it out.
    pub claim_token: ClaimToken,
    /// What came of it.
    pub outcome: DeliveryOutcome,
}

/// How one attempt at a delivery ended.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryAttempt {
    /// 1 for the first, counting on across requeues.
    pub number: u32,
    /// The worker that made it.
    pub worker_id: WorkerId,
    /// When it was claimed.
    pub claimed_at: OffsetDateTime,
    /// When it ended; `None` while it runs.
    pub ended_at: Option<OffsetDateTime>,
    /// `completed`, `retry`, `failed`, `lease_expired` or `cancelled`; `None` while it runs.
    pub outcome: Option<String>,
    /// What the channel reported.
    pub detail: Option<Value>,
}

/// Which deliveries to list or requeue; `None` fields do not filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeliveryFilter {
    /// Only in this status.
    pub status: Option<DeliveryStatus>,
    /// Only of this event.
    pub event_id: Option<EventId>,
    /// Only over this channel type.
    pub channel_type: Option<ChannelType>,
}

/// One page of deliveries, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct DeliveryPage {
    /// The deliveries of this page.
    pub items: Vec<Delivery>,
    /// Pass as `cursor` to get the next page; `None` on the last page.
    pub next_cursor: Option<DeliveryId>,
}

/// What a recorded outcome left a delivery as: the few columns the processor reads, so that a
/// record does not read back whole rows (bodies included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordedDelivery {
    /// The delivery.
    pub id: DeliveryId,
    /// Its organisation.
    pub org_id: OrgId,
    /// The event it delivers.
    pub event_id: EventId,
    /// How it is delivered.
    pub channel_type: ChannelType,
    /// Its status now.
    pub status: DeliveryStatus,
    /// Attempts so far.
    pub attempts: u32,
}

impl From<Delivery> for RecordedDelivery {
    fn from(delivery: Delivery) -> Self {
        Self {
            id: delivery.id,
            org_id: delivery.org_id,
            event_id: delivery.event_id,
            channel_type: delivery.channel_type,
            status: delivery.status,
            attempts: delivery.attempts,
        }
    }
}

/// A delivery whose lease expired, as the release reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReleasedDelivery {
    /// The delivery.
    pub delivery_id: DeliveryId,
    /// Its organisation.
    pub org_id: OrgId,
    /// Its status now: pending again, or dead.
    pub status: DeliveryStatus,
}
