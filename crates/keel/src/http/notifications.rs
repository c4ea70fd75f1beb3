//! Notifications: `POST /v1/events` (classify, route, render, queue every delivery in one
//! transaction), `POST /v1/deliveries` (one message to one channel), the deliveries with their
//! attempts, dead letters and requeues, and `POST /v1/templates/preview`.
//! `docs/notifications.md` is the reference.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use keel_store::notifications::model::{
    ChannelType, Delivery, DeliveryAttempt, DeliveryFilter, DeliveryId, DeliveryPage,
    DeliveryStatus, EventId, NewDelivery, NewEvent, SettingId, SettingKind, Severity, Triggered,
};
use keel_store::{Idempotency, Scope};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use super::AppState;
use super::auth::Caller;
use super::commands::page_limit;
use super::error::{ApiError, ErrorBody};
use super::json::Json;
use super::query::Query;
use super::validate::check_size;
use crate::notifications::classify::classify;
use crate::notifications::render::{self, context, default_template};
use crate::notifications::settings::{Channel, Template, check_event_type};
use crate::notifications::trigger::{self, Settings, Trigger, lease_for, throttle_of};

/// The longest idempotency key.
const MAX_IDEMPOTENCY_KEY_LEN: usize = 255;

/// The notification routes (full paths).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/events", post(trigger_event))
        .route("/v1/deliveries", post(send).get(list))
        .route("/v1/deliveries/dead", get(list_dead))
        .route("/v1/deliveries/circuits", get(circuits))
        .route("/v1/deliveries/requeue", post(requeue_many))
        .route("/v1/deliveries/{id}", get(get_one))
        .route("/v1/deliveries/{id}/requeue", post(requeue))
        .route("/v1/templates/preview", post(preview))
}

// ---------------------------------------------------------------------------------------------
// What the API shows.

/// A delivery as the API shows it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveryView {
    id: DeliveryId,
    event_id: EventId,
    event_type: String,
    severity: Severity,
    channel_id: Option<SettingId>,
    channel_type: ChannelType,
    recipient: String,
    subject: String,
    body: String,
    status: DeliveryStatus,
    priority: i32,
    attempts: u32,
    max_attempts: u32,
    #[serde(with = "time::serde::rfc3339")]
    run_at: OffsetDateTime,
    #[schema(value_type = Option<Object>)]
    result: Option<Value>,
    #[schema(value_type = Option<Object>)]
    error: Option<Value>,
    dead_reason: Option<String>,
    /// A digest: the delivery whose throttle window it closes.
    digest_of: Option<DeliveryId>,
    /// A throttled delivery: the digest it is folded into.
    digest_id: Option<DeliveryId>,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    finished_at: Option<OffsetDateTime>,
}

impl From<Delivery> for DeliveryView {
    fn from(d: Delivery) -> Self {
        Self {
            id: d.id,
            event_id: d.event_id,
            event_type: d.event_type,
            severity: d.severity,
            channel_id: d.channel_id,
            channel_type: d.channel_type,
            recipient: d.recipient,
            subject: d.subject,
            body: d.body,
            status: d.status,
            priority: d.priority,
            attempts: d.attempts,
            max_attempts: d.max_attempts,
            run_at: d.run_at,
            result: d.result,
            error: d.error,
            dead_reason: d.dead_reason,
            digest_of: d.digest_of,
            digest_id: d.digest_id,
            created_at: d.created_at,
            updated_at: d.updated_at,
            finished_at: d.finished_at,
        }
    }
}

/// One attempt at a delivery.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct DeliveryAttemptView {
    attempt: u32,
    #[serde(with = "time::serde::rfc3339")]
    claimed_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    ended_at: Option<OffsetDateTime>,
    /// `completed`, `retry`, `failed`, `lease_expired` or `cancelled`; absent while it runs.
    outcome: Option<String>,
    /// What the channel reported: status, duration, error, response excerpt.
    #[schema(value_type = Option<Object>)]
    detail: Option<Value>,
}

impl From<DeliveryAttempt> for DeliveryAttemptView {
    fn from(a: DeliveryAttempt) -> Self {
        Self {
            attempt: a.number,
            claimed_at: a.claimed_at,
            ended_at: a.ended_at,
            outcome: a.outcome,
            detail: a.detail,
        }
    }
}

/// A delivery with every attempt at it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct DeliveryDetailView {
    #[serde(flatten)]
    delivery: DeliveryView,
    attempt_history: Vec<DeliveryAttemptView>,
}

/// A page of deliveries.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct DeliveryPageView {
    items: Vec<DeliveryView>,
    next_cursor: Option<DeliveryId>,
}

impl From<DeliveryPage> for DeliveryPageView {
    fn from(page: DeliveryPage) -> Self {
        Self {
            items: page.items.into_iter().map(DeliveryView::from).collect(),
            next_cursor: page.next_cursor,
        }
    }
}

/// The answer of a trigger.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct TriggeredView {
    event_id: EventId,
    domain: String,
    severity: Severity,
    /// `false` when an earlier trigger with the same idempotency key made these.
    created: bool,
    /// The deliveries queued (none when no route matched).
    deliveries: Vec<DeliveryId>,
}

impl From<Triggered> for TriggeredView {
    fn from(t: Triggered) -> Self {
        Self {
            event_id: t.event.id,
            domain: t.event.domain,
            severity: t.event.severity,
            created: t.created,
            deliveries: t.deliveries.into_iter().map(|d| d.id).collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Triggers.

/// The body of `POST /v1/events`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct TriggerEvent {
    #[schema(pattern = "^[a-zA-Z0-9_.:-]{1,64}$")]
    event_type: String,
    /// The event's data (a JSON object), which templates render.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    payload: Option<Value>,
    /// A retry with the same key and body creates nothing and answers the first trigger.
    #[schema(pattern = "^[ -~]{1,255}$")]
    idempotency_key: Option<String>,
}

fn payload_of(state: &AppState, payload: Option<Value>) -> Result<Value, ApiError> {
    let payload = payload.unwrap_or_else(|| Value::Object(Default::default()));
    if !payload.is_object() {
        return Err(ApiError::Validation(
            "payload: must be a JSON object".to_owned(),
        ));
    }
    check_size("payload", &payload, state.command_limits.params_bytes)?;
    Ok(payload)
}

fn idempotency(key: Option<String>, canonical: &Value) -> Result<Option<Idempotency>, ApiError> {
    let Some(key) = key else {
        return Ok(None);
    };
    if !(1..=MAX_IDEMPOTENCY_KEY_LEN).contains(&key.len())
        || !key.bytes().all(|b| matches!(b, b' '..=b'~'))
    {
        return Err(ApiError::Validation(format!(
            "idempotency_key: 1 to {MAX_IDEMPOTENCY_KEY_LEN} printable ASCII characters"
        )));
    }
    // `serde_json::Value` keeps object keys sorted, so the text is canonical.
    Ok(Some(Idempotency {
        key,
        request_hash: hex::encode(Sha256::digest(canonical.to_string().as_bytes())),
    }))
}

/// Records the event and its deliveries, and wakes the delivery workers.
async fn record(
    state: &AppState,
    caller: &Caller,
    event: NewEvent,
    deliveries: Vec<NewDelivery>,
) -> Result<Response, ApiError> {
    let triggered = state
        .store
        .notifications()
        .trigger(caller.org(), event, deliveries)
        .await?;
    if triggered.created && !triggered.deliveries.is_empty() {
        metrics::counter!("keel_deliveries_created_total")
            .increment(triggered.deliveries.len() as u64);
        state.notifications.wake_workers();
    }
    Ok((StatusCode::ACCEPTED, Json(TriggeredView::from(triggered))).into_response())
}

/// Triggers an event: classifies it, routes it, renders a message per channel and queues one
/// delivery per channel and recipient, all in one transaction.
#[utoipa::path(
    post,
    path = "/v1/events",
    tag = "notifications",
    request_body = TriggerEvent,
    security(("api_key" = ["notifications:write"])),
    responses(
        (status = 202, description = "Queued: the delivery ids (none when no route matched; `created: false` for a retry with the same idempotency key)", body = TriggeredView),
        (status = 409, description = "`idempotency_mismatch`: the key was used with another body", body = ErrorBody),
        (status = 422, description = "`validation_failed`: a bad field, or a template that does not render (named, with the reason; nothing is queued)", body = ErrorBody),
    )
)]
pub(super) async fn trigger_event(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    caller.require(Scope::NotificationsWrite)?;
    let request: TriggerEvent = parse_body(body)?;
    check_event_type("event_type", &request.event_type).map_err(invalid)?;
    let payload = payload_of(&state, request.payload)?;
    let canonical = serde_json::json!({"event_type": request.event_type, "payload": payload});
    let idempotency = idempotency(request.idempotency_key, &canonical)?;
    let settings = Settings::load(state.store.notifications(), caller.org()).await?;
    let (event, deliveries) = trigger::plan(
        &settings,
        Trigger {
            event_type: request.event_type,
            payload,
            idempotency,
        },
    )
    .map_err(|error| ApiError::Validation(error.to_string()))?;
    record(&state, &caller, event, deliveries).await
}

/// The body of `POST /v1/deliveries`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct SendMessage {
    /// The channel; the message goes to each of its recipients.
    channel_id: SettingId,
    /// The event type it is recorded under (`direct` when absent); it gives the severity.
    #[serde(default)]
    #[schema(pattern = "^[a-zA-Z0-9_.:-]{1,64}$")]
    event_type: Option<String>,
    #[serde(default)]
    subject: String,
    body: String,
    /// A retry with the same key and body creates nothing.
    #[schema(pattern = "^[ -~]{1,255}$")]
    idempotency_key: Option<String>,
}

/// Sends one message, as written, to one channel (each of its recipients).
#[utoipa::path(
    post,
    path = "/v1/deliveries",
    tag = "notifications",
    request_body = SendMessage,
    security(("api_key" = ["notifications:write"])),
    responses(
        (status = 202, description = "Queued", body = TriggeredView),
        (status = 404, description = "`not_found`: no such channel", body = ErrorBody),
        (status = 409, description = "`idempotency_mismatch`", body = ErrorBody),
    )
)]
pub(super) async fn send(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    caller.require(Scope::NotificationsWrite)?;
    let request: SendMessage = parse_body(body)?;
    let event_type = request.event_type.unwrap_or_else(|| "direct".to_owned());
    check_event_type("event_type", &event_type).map_err(invalid)?;
    if request.body.is_empty() || request.body.len() > render::MAX_RENDERED_LEN {
        return Err(ApiError::Validation(format!(
            "body: 1 to {} bytes",
            render::MAX_RENDERED_LEN
        )));
    }
    if request.subject.len() > 1024 {
        return Err(ApiError::Validation(
            "subject: at most 1024 bytes".to_owned(),
        ));
    }
    let setting = state
        .store
        .notifications()
        .get_setting(caller.org(), SettingKind::Channel, request.channel_id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let channel: Channel = serde_json::from_value(setting.body)
        .map_err(|e| ApiError::Internal(format!("stored channel does not parse: {e}")))?;
    let settings = Settings::load(state.store.notifications(), caller.org()).await?;
    let class = classify(&event_type, &settings.rules);
    let policy = settings.policy(class.severity);
    let canonical = serde_json::json!({
        "channel_id": request.channel_id, "event_type": event_type,
        "subject": request.subject, "body": request.body,
    });
    let event = NewEvent {
        id: EventId::new(),
        event_type,
        payload: Value::Object(Default::default()),
        domain: class.domain,
        severity: class.severity,
        idempotency: idempotency(request.idempotency_key, &canonical)?,
    };
    let deliveries = channel
        .recipients()
        .into_iter()
        .map(|recipient| NewDelivery {
            channel_id: Some(request.channel_id),
            channel_type: channel.channel_type,
            recipient,
            subject: request.subject.clone(),
            body: request.body.clone(),
            priority: policy.priority,
            max_attempts: policy.max_attempts,
            lease_duration: lease_for(&channel),
            throttle: throttle_of(&policy),
        })
        .collect();
    record(&state, &caller, event, deliveries).await
}

/// The body as `T`; a wrong field is a 422 that names it (`severities[0]: unknown variant …`).
pub(super) fn parse_body<T: serde::de::DeserializeOwned>(body: Value) -> Result<T, ApiError> {
    serde_path_to_error::deserialize(body).map_err(|error| {
        let path = error.path().to_string();
        let inner = error.into_inner();
        if path == "." {
            ApiError::Validation(inner.to_string())
        } else {
            ApiError::Validation(format!("{path}: {inner}"))
        }
    })
}

fn invalid(error: crate::notifications::settings::Invalid) -> ApiError {
    ApiError::Validation(error.0)
}

// ---------------------------------------------------------------------------------------------
// Deliveries.

/// The query of `GET /v1/deliveries`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    status: Option<DeliveryStatus>,
    event_id: Option<EventId>,
    channel_type: Option<ChannelType>,
    cursor: Option<DeliveryId>,
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
}

/// The organisation's deliveries, newest first, a page at a time.
#[utoipa::path(
    get,
    path = "/v1/deliveries",
    tag = "notifications",
    params(ListQuery),
    security(("api_key" = ["notifications:read"])),
    responses(
        (status = 200, description = "A page of deliveries", body = DeliveryPageView),
        (status = 422, description = "`validation_failed`", body = ErrorBody),
    )
)]
pub(super) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<DeliveryPageView>, ApiError> {
    caller.require(Scope::NotificationsRead)?;
    let filter = DeliveryFilter {
        status: query.status,
        event_id: query.event_id,
        channel_type: query.channel_type,
    };
    page_of(&state, &caller, filter, query.cursor, query.limit).await
}

/// One page of the caller's deliveries that match `filter`.
async fn page_of(
    state: &AppState,
    caller: &Caller,
    filter: DeliveryFilter,
    cursor: Option<DeliveryId>,
    limit: Option<u32>,
) -> Result<Json<DeliveryPageView>, ApiError> {
    let limit = page_limit(limit)?;
    let page = state
        .store
        .notifications()
        .list_deliveries(caller.org(), filter, cursor, limit)
        .await?;
    Ok(Json(page.into()))
}

/// The query of `GET /v1/deliveries/dead`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub(super) struct PageQuery {
    cursor: Option<DeliveryId>,
    #[param(minimum = 1, maximum = 500)]
    limit: Option<u32>,
}

/// The dead-letter list: deliveries whose attempts ran out, newest first.
#[utoipa::path(
    get,
    path = "/v1/deliveries/dead",
    tag = "notifications",
    params(PageQuery),
    security(("api_key" = ["notifications:read"])),
    responses(
        (status = 200, description = "A page of dead deliveries", body = DeliveryPageView),
        (status = 422, description = "`validation_failed`", body = ErrorBody),
    )
)]
pub(super) async fn list_dead(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<PageQuery>,
) -> Result<Json<DeliveryPageView>, ApiError> {
    caller.require(Scope::NotificationsRead)?;
    let filter = DeliveryFilter {
        status: Some(DeliveryStatus::Dead),
        ..DeliveryFilter::default()
    };
    page_of(&state, &caller, filter, query.cursor, query.limit).await
}

/// The organisation's webhook endpoints whose circuit is failing, open or probing.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct CircuitsView {
    circuits: Vec<crate::deliveries::breaker::CircuitView>,
}

/// The circuit breakers of the organisation's webhook endpoints that are failing or open (in
/// this keel process).
#[utoipa::path(
    get,
    path = "/v1/deliveries/circuits",
    tag = "notifications",
    security(("api_key" = ["notifications:read"])),
    responses(
        (status = 200, description = "The circuits that are not simply closed", body = CircuitsView),
    )
)]
pub(super) async fn circuits(
    State(state): State<AppState>,
    caller: Caller,
) -> Result<Json<CircuitsView>, ApiError> {
    caller.require(Scope::NotificationsRead)?;
    Ok(Json(CircuitsView {
        circuits: state.notifications.breakers.circuits(caller.org()),
    }))
}

/// A delivery id from the path; anything else is a 400.
fn delivery_id(raw: &str) -> Result<DeliveryId, ApiError> {
    uuid::Uuid::parse_str(raw)
        .map(DeliveryId)
        .map_err(|_| ApiError::BadRequest(format!("`{raw}` is not a delivery id")))
}

/// One delivery with every attempt at it.
#[utoipa::path(
    get,
    path = "/v1/deliveries/{id}",
    tag = "notifications",
    params(("id" = uuid::Uuid, Path, description = "The delivery id (anything but a UUID is 400 `bad_request`)")),
    security(("api_key" = ["notifications:read"])),
    responses(
        (status = 200, description = "The delivery", body = DeliveryDetailView),
        (status = 400, description = "`bad_request`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
pub(super) async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DeliveryDetailView>, ApiError> {
    caller.require(Scope::NotificationsRead)?;
    let id = delivery_id(&id)?;
    let store = state.store.notifications();
    let delivery = store
        .get_delivery(caller.org(), id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let attempts = store.list_delivery_attempts(caller.org(), id).await?;
    Ok(Json(DeliveryDetailView {
        delivery: delivery.into(),
        attempt_history: attempts.into_iter().map(Into::into).collect(),
    }))
}

/// Puts a dead or failed delivery back to pending, due now, with its attempts reset.
#[utoipa::path(
    post,
    path = "/v1/deliveries/{id}/requeue",
    tag = "notifications",
    params(("id" = uuid::Uuid, Path, description = "The delivery id (anything but a UUID is 400 `bad_request`)")),
    security(("api_key" = ["notifications:write"])),
    responses(
        (status = 200, description = "The delivery", body = DeliveryView),
        (status = 400, description = "`bad_request`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 409, description = "`invalid_state`: it is not dead or failed", body = ErrorBody),
    )
)]
pub(super) async fn requeue(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<DeliveryView>, ApiError> {
    caller.require(Scope::NotificationsWrite)?;
    let id = delivery_id(&id)?;
    let delivery = state
        .store
        .notifications()
        .requeue_delivery(caller.org(), id)
        .await?;
    tracing::info!(target: "keel::audit", action = "delivery.requeue", delivery_id = %id, "delivery requeued");
    state.notifications.wake_workers();
    Ok(Json(delivery.into()))
}

/// The body of `POST /v1/deliveries/requeue`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct RequeueFilter {
    /// `dead` or `failed` (both when absent).
    status: Option<DeliveryStatus>,
    event_id: Option<EventId>,
    channel_type: Option<ChannelType>,
}

/// How many deliveries a requeue put back.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct RequeuedView {
    requeued: u64,
}

/// Requeues the dead or failed deliveries that match the filter (at most 10 000 at a time).
#[utoipa::path(
    post,
    path = "/v1/deliveries/requeue",
    tag = "notifications",
    request_body = RequeueFilter,
    security(("api_key" = ["notifications:write"])),
    responses(
        (status = 200, description = "How many were requeued", body = RequeuedView),
        (status = 422, description = "`validation_failed`: an unknown field or value, or a status other than `dead` or `failed`", body = ErrorBody),
    )
)]
pub(super) async fn requeue_many(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<Value>,
) -> Result<Json<RequeuedView>, ApiError> {
    caller.require(Scope::NotificationsWrite)?;
    let request: RequeueFilter = parse_body(body)?;
    let filter = DeliveryFilter {
        status: request.status,
        event_id: request.event_id,
        channel_type: request.channel_type,
    };
    let requeued = state
        .store
        .notifications()
        .requeue_deliveries(caller.org(), filter)
        .await?;
    tracing::info!(target: "keel::audit", action = "delivery.requeue_many", requeued, "deliveries requeued");
    if requeued > 0 {
        state.notifications.wake_workers();
    }
    Ok(Json(RequeuedView { requeued }))
}

// ---------------------------------------------------------------------------------------------
// Preview.

/// The body of `POST /v1/templates/preview`: a template (or the organisation's, or the default,
/// for the event type and channel type) and a sample event.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct PreviewRequest {
    #[schema(pattern = "^[a-zA-Z0-9_.:-]{1,64}$")]
    event_type: String,
    channel_type: ChannelType,
    /// The subject to try; with `body` absent, the stored template is rendered.
    subject: Option<String>,
    /// The body to try.
    body: Option<String>,
    /// The sample payload.
    #[serde(default)]
    #[schema(value_type = Option<Object>)]
    payload: Option<Value>,
}

/// A rendered preview.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct PreviewView {
    domain: String,
    severity: Severity,
    subject: String,
    body: String,
}

/// Renders a template with a sample payload, as a trigger would; nothing is stored.
#[utoipa::path(
    post,
    path = "/v1/templates/preview",
    tag = "notifications",
    request_body = PreviewRequest,
    security(("api_key" = ["notifications:read"])),
    responses(
        (status = 200, description = "The rendered subject and body", body = PreviewView),
        (status = 422, description = "`validation_failed`: a bad field, or the template does not render (named, with the reason)", body = ErrorBody),
    )
)]
pub(super) async fn preview(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<Value>,
) -> Result<Json<PreviewView>, ApiError> {
    caller.require(Scope::NotificationsRead)?;
    let request: PreviewRequest = parse_body(body)?;
    check_event_type("event_type", &request.event_type).map_err(invalid)?;
    let payload = payload_of(&state, request.payload)?;
    let settings = Settings::load(state.store.notifications(), caller.org()).await?;
    let template = match request.body {
        Some(body) => {
            let template = Template {
                event_type: request.event_type.clone(),
                channel_type: request.channel_type,
                subject: request.subject.unwrap_or_default(),
                body,
            };
            template.validate().map_err(invalid)?;
            template
        }
        None => settings
            .templates
            .iter()
            .find(|t| t.event_type == request.event_type && t.channel_type == request.channel_type)
            .cloned()
            .unwrap_or_else(|| default_template(request.channel_type)),
    };
    let class = classify(&request.event_type, &settings.rules);
    let event = NewEvent {
        id: EventId::new(),
        event_type: request.event_type,
        payload,
        domain: class.domain.clone(),
        severity: class.severity,
        idempotency: None,
    };
    let rendered = render::render(&template, &context(&event))
        .map_err(|error| ApiError::Validation(error.to_string()))?;
    Ok(Json(PreviewView {
        domain: class.domain,
        severity: class.severity,
        subject: rendered.subject,
        body: rendered.body,
    }))
}
