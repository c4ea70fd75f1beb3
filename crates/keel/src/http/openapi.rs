//! The OpenAPI 3.1 document of the API, generated from the handlers' annotations and served at
//! `GET /openapi.json` (no credentials needed).

use axum::Router;
use axum::routing::get;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::AppState;
use super::json::Json;
use super::{
    admin, agents, command_batches, commands, health, notification_settings, notifications,
    operations, organisations, queues, schedules, ui,
};

/// The document: every route, its bodies, its errors and its credentials.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "keel",
        description = "Hands commands to remote agents. Every error answers \
            `{\"error\":{\"code\",\"message\",\"request_id\"}}` (`ErrorBody`); `docs/http.md` and \
            `docs/commands.md` are the reference.",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        health::healthz,
        health::readyz,
        health::metrics,
        openapi_json,
        agents::list,
        agents::check_in,
        agents::get_one,
        agents::set_labels,
        agents::cordon,
        agents::uncordon,
        queues::list,
        queues::pause,
        queues::resume,
        commands::create,
        commands::list,
        commands::claim,
        commands::release_stuck,
        commands::list_dead,
        command_batches::create_batch,
        command_batches::report_batch,
        commands::get_one,
        commands::cancel,
        commands::requeue,
        commands::heartbeat,
        commands::complete,
        commands::fail,
        schedules::create,
        schedules::list,
        schedules::get_one,
        schedules::list_fires,
        schedules::pause,
        schedules::resume,
        schedules::delete,
        notifications::trigger_event,
        notifications::send,
        notifications::list,
        notifications::list_dead,
        notifications::circuits,
        notifications::requeue_many,
        notifications::get_one,
        notifications::requeue,
        notifications::preview,
        notification_settings::rules::list,
        notification_settings::rules::create,
        notification_settings::rules::get_one,
        notification_settings::rules::replace,
        notification_settings::rules::remove,
        notification_settings::policies::list,
        notification_settings::policies::create,
        notification_settings::policies::get_one,
        notification_settings::policies::replace,
        notification_settings::policies::remove,
        notification_settings::channels::list,
        notification_settings::channels::create,
        notification_settings::channels::get_one,
        notification_settings::channels::replace,
        notification_settings::channels::remove,
        notification_settings::senders::list,
        notification_settings::senders::create,
        notification_settings::senders::get_one,
        notification_settings::senders::replace,
        notification_settings::senders::remove,
        notification_settings::templates::list,
        notification_settings::templates::create,
        notification_settings::templates::get_one,
        notification_settings::templates::replace,
        notification_settings::templates::remove,
        notification_settings::routing::list,
        notification_settings::routing::create,
        notification_settings::routing::get_one,
        notification_settings::routing::replace,
        notification_settings::routing::remove,
        admin::components,
        admin::panics,
        admin::jobs,
        admin::set_job_interval,
        admin::log_filters,
        admin::set_log_filters,
        admin::overload,
        admin::set_overload_mode,
        organisations::list,
        organisations::create,
        organisations::list_keys,
        organisations::create_key,
        organisations::revoke_key,
        operations::summary,
        operations::agents,
        operations::fleet,
        operations::dead_commands,
        operations::requeue,
        ui::to_page,
        ui::page,
        ui::script,
        ui::style,
        ui::current_session,
        ui::sign_in,
        ui::sign_out,
    ),
    components(schemas(super::error::ErrorBody, super::error::ErrorCode)),
    modifiers(&SecuritySchemes, &CommonErrors),
    tags(
        (name = "health", description = "Liveness, readiness, metrics and this document"),
        (name = "agents", description = "What agents call (a key with the `agent` scope), and the agent list"),
        (name = "commands", description = "Create, read, list, cancel and requeue commands"),
        (name = "queues", description = "The organisation's queues; pause and resume one"),
        (name = "schedules", description = "Schedules that create commands at the fire times of a cron pattern in a time zone"),
        (name = "notifications", description = "Trigger events, send messages, read deliveries and their attempts, requeue them, preview templates"),
        (name = "notification settings", description = "Classification rules, severity policies, channels, senders, templates and routing rules"),
        (name = "admin", description = "The keel process itself: operators only (an operator key or the admin token)"),
        (name = "operator page", description = "`/ui/`: the operator page and its session cookie (docs/operator-page.md)"),
    )
)]
pub struct ApiDoc;

/// The errors the layers in front of every `/v1/` handler can answer, whatever the handler
/// does: added to each operation here, once, so each handler's annotation lists only its own
/// answers (an entry a handler gives itself is kept).
///
/// - credentials: 401, and 403 (an organisation's key on `/v1/admin/`, or a key without the
///   route's scope elsewhere);
/// - 503 `overloaded` (in-flight limit, pressure, a busy store) or `unavailable`;
/// - outside `/v1/admin/`: 429 `rate_limited` (the organisation's buckets);
/// - with a request body: 400 (malformed JSON, or a bad path parameter), 413 (the body
///   limit), 415 (not JSON) and 422 (a body that is not valid).
struct CommonErrors;

impl Modify for CommonErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
        let error = |description: &str| {
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build()
        };
        for (path, item) in openapi.paths.paths.iter_mut() {
            let Some(route) = path.strip_prefix("/v1/") else {
                continue;
            };
            let admin = route.starts_with("admin/");
            let operations = [
                &mut item.get,
                &mut item.post,
                &mut item.put,
                &mut item.patch,
                &mut item.delete,
            ];
            for operation in operations.into_iter().flatten() {
                let mut common = vec![
                    if admin {
                        ("401", "`unauthorized`: no or an unknown credential")
                    } else {
                        ("401", "`unauthorized`: no or an unknown key")
                    },
                    if admin {
                        ("403", "`forbidden`: an organisation's API key")
                    } else {
                        ("403", "`forbidden`: the key lacks the scope")
                    },
                ];
                if operation.request_body.is_some() {
                    common.push(("400", "`malformed_json` or `bad_request`"));
                    common.push(("413", "`payload_too_large`"));
                    common.push(("415", "`unsupported_media_type`"));
                    common.push(("422", "`validation_failed`"));
                }
                if !admin {
                    common.push(("429", "`rate_limited`"));
                }
                common.push(("503", "`overloaded` or `unavailable`"));
                for (status, description) in common {
                    operation
                        .responses
                        .responses
                        .entry(status.to_owned())
                        .or_insert_with(|| error(description).into());
                }
            }
        }
    }
}

/// The bearer credentials the routes name.
struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        let bearer = |description: &str| {
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(description))
                    .build(),
            )
        };
        components.add_security_scheme(
            "api_key",
            bearer(
                "An organisation's API key. Its scopes: `admin` (includes `commands:read`, \
                 `commands:write`, `notifications:read` and `notifications:write`), \
                 `commands:write`, `commands:read`, `notifications:write`, `notifications:read`, \
                 `agent` (bound to one agent).",
            ),
        );
        components.add_security_scheme(
            "operator",
            bearer(
                "An operator key or the admin token; only these open `/v1/admin/*` (an \
                 organisation's API key is 403 there, whatever its scopes).",
            ),
        );
        components.add_security_scheme(
            "metrics_token",
            bearer("`metrics.token`, when one is configured."),
        );
    }
}

/// The document as JSON.
pub fn document() -> utoipa::openapi::OpenApi {
    ApiDoc::openapi()
}

/// `GET /openapi.json`.
pub fn routes() -> Router<AppState> {
    Router::new().route("/openapi.json", get(openapi_json))
}

/// This document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "health",
    responses((status = 200, description = "The OpenAPI 3.1 document", body = Object))
)]
async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(document())
}
