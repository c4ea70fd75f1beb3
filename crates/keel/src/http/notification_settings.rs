//! Notification settings: create, read, list, replace and delete classification rules
//! (`/v1/rules`), severity policies (`/v1/policies`), channels (`/v1/channels`), senders
//! (`/v1/senders`), templates (`/v1/templates`) and routing rules (`/v1/routes`). Reads need
//! `notifications:read`, changes `notifications:write`. A sender's secrets are write-only.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use keel_store::notifications::model::{NewSetting, Setting, SettingId, SettingKind};
use keel_store::{OrgId, Scope};
use serde::Serialize;
use serde_json::Value;
use time::OffsetDateTime;

use super::AppState;
use super::auth::Caller;
use super::error::{ApiError, ErrorBody};
use super::json::Json;
use super::notifications::parse_body;
use crate::notifications::secrets::OpenSecrets;
use crate::notifications::settings::{
    Channel, Invalid, Policy, Route, Rule, Sender, Template, kind_path,
};

/// The settings routes (full paths).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/v1/rules", get(rules::list).post(rules::create))
        .route(
            "/v1/rules/{id}",
            get(rules::get_one)
                .put(rules::replace)
                .delete(rules::remove),
        )
        .route("/v1/policies", get(policies::list).post(policies::create))
        .route(
            "/v1/policies/{id}",
            get(policies::get_one)
                .put(policies::replace)
                .delete(policies::remove),
        )
        .route("/v1/channels", get(channels::list).post(channels::create))
        .route(
            "/v1/channels/{id}",
            get(channels::get_one)
                .put(channels::replace)
                .delete(channels::remove),
        )
        .route("/v1/senders", get(senders::list).post(senders::create))
        .route(
            "/v1/senders/{id}",
            get(senders::get_one)
                .put(senders::replace)
                .delete(senders::remove),
        )
        .route(
            "/v1/templates",
            get(templates::list).post(templates::create),
        )
        .route(
            "/v1/templates/{id}",
            get(templates::get_one)
                .put(templates::replace)
                .delete(templates::remove),
        )
        .route("/v1/routes", get(routing::list).post(routing::create))
        .route(
            "/v1/routes/{id}",
            get(routing::get_one)
                .put(routing::replace)
                .delete(routing::remove),
        )
}

/// A setting as the API shows it: its fields (a sender's without its secrets), with its id
/// and times.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct SettingView {
    id: SettingId,
    #[serde(flatten)]
    #[schema(value_type = Object)]
    fields: Value,
    /// Senders: whether secrets are stored (they are never shown).
    #[serde(skip_serializing_if = "Option::is_none")]
    has_secrets: Option<bool>,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
}

impl From<Setting> for SettingView {
    fn from(setting: Setting) -> Self {
        Self {
            id: setting.id,
            fields: setting.body,
            has_secrets: (setting.kind == SettingKind::Sender)
                .then_some(setting.sealed_secret.is_some()),
            created_at: setting.created_at,
            updated_at: setting.updated_at,
        }
    }
}

fn invalid(error: Invalid) -> ApiError {
    ApiError::Validation(error.0)
}

fn to_value<T: Serialize>(value: &T) -> Result<Value, ApiError> {
    serde_json::to_value(value).map_err(|e| ApiError::Internal(format!("serialising: {e}")))
}

/// The validated setting of `kind` from a request body. A sender's secrets are sealed here.
async fn validated(
    state: &AppState,
    org: OrgId,
    kind: SettingKind,
    body: Value,
    creating: bool,
) -> Result<NewSetting, ApiError> {
    let plain = |name: String, unique_key: Option<String>, body: Value| NewSetting {
        name,
        unique_key,
        body,
        sealed_secret: None,
    };
    Ok(match kind {
        SettingKind::Rule => {
            let rule: Rule = parse_body(body)?;
            rule.validate().map_err(invalid)?;
            plain(rule.name.clone(), None, to_value(&rule)?)
        }
        SettingKind::Policy => {
            let policy: Policy = parse_body(body)?;
            policy.validate().map_err(invalid)?;
            let severity = policy.severity.as_str().to_owned();
            plain(severity.clone(), Some(severity), to_value(&policy)?)
        }
        SettingKind::Channel => {
            let channel: Channel = parse_body(body)?;
            channel.validate().map_err(invalid)?;
            if let Some(sender_id) = channel.sender_id {
                let sender = state
                    .store
                    .notifications()
                    .get_setting(org, SettingKind::Sender, sender_id)
                    .await?
                    .ok_or_else(|| {
                        ApiError::Validation(format!("sender_id: no sender {sender_id}"))
                    })?;
                let sender_type = sender.body.get("type").and_then(Value::as_str);
                if sender_type != Some(channel.channel_type.as_str()) {
                    return Err(ApiError::Validation(format!(
                        "sender_id: the sender is not a {} sender",
                        channel.channel_type
                    )));
                }
            }
            plain(channel.name.clone(), None, to_value(&channel)?)
        }
        SettingKind::Sender => {
            let sender: Sender = parse_body(body)?;
            sender.validate(creating).map_err(invalid)?;
            let secrets = OpenSecrets::from(&sender.secrets);
            let sealed_secret = if secrets.is_empty() {
                None
            } else {
                Some(
                    state
                        .notifications
                        .secrets
                        .seal(org, &secrets)
                        .map_err(|e| ApiError::Internal(e.to_string()))?,
                )
            };
            NewSetting {
                name: sender.name.clone(),
                unique_key: None,
                body: to_value(&sender)?,
                sealed_secret,
            }
        }
        SettingKind::Template => {
            let template: Template = parse_body(body)?;
            template.validate().map_err(invalid)?;
            let key = template.unique_key();
            plain(key.clone(), Some(key), to_value(&template)?)
        }
        SettingKind::Route => {
            let route: Route = parse_body(body)?;
            route.validate().map_err(invalid)?;
            // Each channel named must be one of the organisation's own: another's, or one that
            // does not exist, is refused alike.
            for channel_id in &route.channel_ids {
                state
                    .store
                    .notifications()
                    .get_setting(org, SettingKind::Channel, *channel_id)
                    .await?
                    .ok_or_else(|| {
                        ApiError::Validation(format!("channel_ids: no channel {channel_id}"))
                    })?;
            }
            plain(route.name.clone(), None, to_value(&route)?)
        }
    })
}

fn setting_id(raw: &str) -> Result<SettingId, ApiError> {
    uuid::Uuid::parse_str(raw)
        .map(SettingId)
        .map_err(|_| ApiError::BadRequest(format!("`{raw}` is not an id")))
}

async fn list(
    state: AppState,
    caller: Caller,
    kind: SettingKind,
) -> Result<Json<Vec<SettingView>>, ApiError> {
    caller.require(Scope::NotificationsRead)?;
    let settings = state
        .store
        .notifications()
        .list_settings(caller.org(), kind)
        .await?;
    Ok(Json(settings.into_iter().map(SettingView::from).collect()))
}

async fn create(
    state: AppState,
    caller: Caller,
    kind: SettingKind,
    body: Value,
) -> Result<Response, ApiError> {
    caller.require(Scope::NotificationsWrite)?;
    let setting = validated(&state, caller.org(), kind, body, true).await?;
    let created = state
        .store
        .notifications()
        .create_setting(caller.org(), kind, setting)
        .await?;
    tracing::info!(target: "keel::audit", action = "notification_setting.create", kind = kind_path(kind), setting_id = %created.id, "notification setting created");
    Ok((StatusCode::CREATED, Json(SettingView::from(created))).into_response())
}

async fn get_one(
    state: AppState,
    caller: Caller,
    kind: SettingKind,
    id: String,
) -> Result<Json<SettingView>, ApiError> {
    caller.require(Scope::NotificationsRead)?;
    let id = setting_id(&id)?;
    let setting = state
        .store
        .notifications()
        .get_setting(caller.org(), kind, id)
        .await?
        .ok_or(ApiError::NotFound)?;
    Ok(Json(setting.into()))
}

async fn replace(
    state: AppState,
    caller: Caller,
    kind: SettingKind,
    id: String,
    body: Value,
) -> Result<Json<SettingView>, ApiError> {
    caller.require(Scope::NotificationsWrite)?;
    let id = setting_id(&id)?;
    let setting = validated(&state, caller.org(), kind, body, false).await?;
    if kind == SettingKind::Sender && setting.sealed_secret.is_none() {
        keeps_its_destination(&state, caller.org(), id, &setting.body).await?;
    }
    let updated = state
        .store
        .notifications()
        .update_setting(caller.org(), kind, id, setting)
        .await?;
    tracing::info!(target: "keel::audit", action = "notification_setting.update", kind = kind_path(kind), setting_id = %id, "notification setting replaced");
    Ok(Json(updated.into()))
}

/// A sender replaced without its secrets keeps the stored ones, so it must keep sending where
/// it did: only its name may change. Otherwise a key that may write settings, but was never
/// given a secret, could point the sender at its own server and receive the secret (the bot
/// token in the URL, the SMTP password in AUTH).
async fn keeps_its_destination(
    state: &AppState,
    org: keel_store::OrgId,
    id: SettingId,
    body: &Value,
) -> Result<(), ApiError> {
    let Some(stored) = state
        .store
        .notifications()
        .get_setting(org, SettingKind::Sender, id)
        .await?
    else {
        // The update answers 404.
        return Ok(());
    };
    let without_name = |body: &Value| {
        let mut body = body.clone();
        if let Some(fields) = body.as_object_mut() {
            fields.remove("name");
        }
        body
    };
    if without_name(&stored.body) == without_name(body) {
        Ok(())
    } else {
        Err(ApiError::Validation(
            "secrets: a sender changed in more than its name needs its secrets again".to_owned(),
        ))
    }
}

async fn remove(
    state: AppState,
    caller: Caller,
    kind: SettingKind,
    id: String,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::NotificationsWrite)?;
    let id = setting_id(&id)?;
    state
        .store
        .notifications()
        .delete_setting(caller.org(), kind, id)
        .await?;
    tracing::info!(target: "keel::audit", action = "notification_setting.delete", kind = kind_path(kind), setting_id = %id, "notification setting deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// The five routes of one kind, each documented: `$list` and `$one` are its paths, `$schema`
/// its request body.
macro_rules! setting_routes {
    ($module:ident, $kind:expr, $schema:ident, $list:tt, $one:tt, $what:tt) => {
        #[doc = concat!("The routes of ", $what, ".")]
        pub(super) mod $module {
            use super::*;

            #[doc = concat!("The organisation's ", $what, ", oldest first.")]
            #[utoipa::path(
                get,
                path = $list,
                tag = "notification settings",
                security(("api_key" = ["notifications:read"])),
                responses((status = 200, description = "The settings, oldest first", body = Vec<SettingView>))
            )]
            pub(crate) async fn list(
                State(state): State<AppState>,
                caller: Caller,
            ) -> Result<Json<Vec<SettingView>>, ApiError> {
                super::list(state, caller, $kind).await
            }

            #[doc = concat!("Creates one of the ", $what, ".")]
            #[utoipa::path(
                post,
                path = $list,
                tag = "notification settings",
                request_body = $schema,
                security(("api_key" = ["notifications:write"])),
                responses(
                    (status = 201, description = "Created", body = SettingView),
                    (status = 409, description = "`conflict`: one exists for the same key", body = ErrorBody),
                )
            )]
            pub(crate) async fn create(
                State(state): State<AppState>,
                caller: Caller,
                Json(body): Json<Value>,
            ) -> Result<Response, ApiError> {
                super::create(state, caller, $kind, body).await
            }

            #[doc = concat!("One of the ", $what, ".")]
            #[utoipa::path(
                get,
                path = $one,
                tag = "notification settings",
                params(("id" = uuid::Uuid, Path, description = "Its id (anything but a UUID is 400 `bad_request`)")),
                security(("api_key" = ["notifications:read"])),
                responses(
                    (status = 200, description = "The setting", body = SettingView),
                    (status = 400, description = "`bad_request`", body = ErrorBody),
                    (status = 404, description = "`not_found`", body = ErrorBody),
                )
            )]
            pub(crate) async fn get_one(
                State(state): State<AppState>,
                caller: Caller,
                Path(id): Path<String>,
            ) -> Result<Json<SettingView>, ApiError> {
                super::get_one(state, caller, $kind, id).await
            }

            #[doc = concat!("Replaces one of the ", $what, ".")]
            #[utoipa::path(
                put,
                path = $one,
                tag = "notification settings",
                request_body = $schema,
                params(("id" = uuid::Uuid, Path, description = "Its id (anything but a UUID is 400 `bad_request`)")),
                security(("api_key" = ["notifications:write"])),
                responses(
                    (status = 200, description = "The setting", body = SettingView),
                    (status = 404, description = "`not_found`", body = ErrorBody),
                    (status = 409, description = "`conflict`: one exists for the same key", body = ErrorBody),
                )
            )]
            pub(crate) async fn replace(
                State(state): State<AppState>,
                caller: Caller,
                Path(id): Path<String>,
                Json(body): Json<Value>,
            ) -> Result<Json<SettingView>, ApiError> {
                super::replace(state, caller, $kind, id, body).await
            }

            #[doc = concat!("Deletes one of the ", $what, ".")]
            #[utoipa::path(
                delete,
                path = $one,
                tag = "notification settings",
                params(("id" = uuid::Uuid, Path, description = "Its id (anything but a UUID is 400 `bad_request`)")),
                security(("api_key" = ["notifications:write"])),
                responses(
                    (status = 204, description = "Deleted"),
                    (status = 400, description = "`bad_request`", body = ErrorBody),
                    (status = 404, description = "`not_found`", body = ErrorBody),
                )
            )]
            pub(crate) async fn remove(
                State(state): State<AppState>,
                caller: Caller,
                Path(id): Path<String>,
            ) -> Result<StatusCode, ApiError> {
                super::remove(state, caller, $kind, id).await
            }
        }
    };
}

setting_routes!(
    rules,
    SettingKind::Rule,
    Rule,
    "/v1/rules",
    "/v1/rules/{id}",
    "classification rules"
);
setting_routes!(
    policies,
    SettingKind::Policy,
    Policy,
    "/v1/policies",
    "/v1/policies/{id}",
    "severity policies"
);
setting_routes!(
    channels,
    SettingKind::Channel,
    Channel,
    "/v1/channels",
    "/v1/channels/{id}",
    "channels"
);
setting_routes!(
    senders,
    SettingKind::Sender,
    Sender,
    "/v1/senders",
    "/v1/senders/{id}",
    "senders"
);
setting_routes!(
    templates,
    SettingKind::Template,
    Template,
    "/v1/templates",
    "/v1/templates/{id}",
    "templates"
);
setting_routes!(
    routing,
    SettingKind::Route,
    Route,
    "/v1/routes",
    "/v1/routes/{id}",
    "routing rules"
);
