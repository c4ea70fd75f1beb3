//! `/v1/schedules`: create, list, read, pause, resume and delete schedules, which create
//! commands from a template at the fire times of a cron pattern in an IANA time zone.
//! `docs/commands.md` (Schedules) is the reference; the scheduler job is
//! [`crate::commands::scheduler`].

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use keel_store::schedule::{
    FireCommands, FireTimes, NEXT_FIRES_SHOWN, NewSchedule, Schedule, ScheduleFire,
};
use keel_store::{CommandId, MissedFires, ScheduleId, ScheduleState, Scope, Target};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::AppState;
use super::auth::Caller;
use super::commands::{CreateCommand, page_limit, parse_body};
use super::error::{ApiError, ErrorBody};
use super::json::Json;
use super::query::Query;
use crate::commands::scheduler::fire_commands;

/// Longest schedule name.
const MAX_NAME_LEN: usize = 128;

/// How many of its latest fires a schedule's own answer lists.
const RECENT_FIRES_SHOWN: u32 = 10;

/// The schedule routes.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/", post(create).get(list))
        .route("/{id}", get(get_one).delete(delete))
        .route("/{id}/fires", get(list_fires))
        .route("/{id}/pause", post(pause))
        .route("/{id}/resume", post(resume))
}

// ---------------------------------------------------------------------------------------------
// What the API shows.

/// A schedule as the API shows it. Times are RFC 3339 with the offset of the schedule's time
/// zone at that instant.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct ScheduleView {
    id: ScheduleId,
    name: Option<String>,
    cron: String,
    timezone: String,
    /// The command template, as given.
    #[schema(value_type = Object)]
    command: Value,
    missed: MissedFires,
    state: ScheduleState,
    /// The next 5 fire times of the pattern after now (a paused schedule fires none of them
    /// unless resumed first); none when the schedule has no fire time left.
    #[schema(value_type = Vec<String>, format = DateTime)]
    next_fires: Vec<String>,
    /// The latest fire time handled: it created commands, or its record says why not.
    #[schema(value_type = Option<String>, format = DateTime)]
    last_fire_at: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    updated_at: OffsetDateTime,
}

/// A schedule with its latest fires.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct ScheduleDetailView {
    #[serde(flatten)]
    schedule: ScheduleView,
    /// Its latest 10 fires, newest first: which commands each fire time created.
    recent_fires: Vec<FireView>,
}

/// One handled fire time of a schedule.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct FireView {
    #[schema(value_type = String, format = DateTime)]
    fire_at: String,
    #[serde(with = "time::serde::rfc3339")]
    fired_at: OffsetDateTime,
    command_ids: Vec<CommandId>,
    /// Why no command was created, when none could be.
    error: Option<String>,
}

/// A page of schedules, oldest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct SchedulePageView {
    items: Vec<ScheduleView>,
    next_cursor: Option<ScheduleId>,
}

/// `t` in RFC 3339, with the offset of `times`' zone.
fn zoned(times: Option<&FireTimes>, t: OffsetDateTime) -> String {
    let t = times.map_or(t, |times| times.in_zone(t));
    t.format(&Rfc3339).unwrap_or_else(|_| t.to_string())
}

pub(super) fn view(schedule: Schedule, now: OffsetDateTime) -> ScheduleView {
    // Checked when the schedule was created; a row that no longer parses shows no fire times,
    // and neither does a schedule that has none left (its next fire time is cleared).
    let times = schedule.fire_times().ok();
    let next_fires = times
        .as_ref()
        .filter(|_| schedule.next_fire_at.is_some())
        .map(|times| {
            times
                .upcoming(now, NEXT_FIRES_SHOWN)
                .into_iter()
                .map(|t| zoned(Some(times), t))
                .collect()
        })
        .unwrap_or_default();
    ScheduleView {
        id: schedule.id,
        name: schedule.name,
        cron: schedule.cron,
        timezone: schedule.timezone,
        command: schedule.command,
        missed: schedule.missed,
        state: schedule.state,
        next_fires,
        last_fire_at: schedule.last_fire_at.map(|t| zoned(times.as_ref(), t)),
        created_at: schedule.created_at,
        updated_at: schedule.updated_at,
    }
}

fn fire_view(fire: ScheduleFire, times: Option<&FireTimes>) -> FireView {
    FireView {
        fire_at: zoned(times, fire.fire_at),
        fired_at: fire.fired_at,
        command_ids: fire.command_ids,
        error: fire.error,
    }
}

// ---------------------------------------------------------------------------------------------
// Routes.

/// The body of `POST /v1/schedules`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateSchedule {
    /// A name for people, 1 to 128 characters.
    name: Option<String>,
    /// A cron pattern: 5 fields (minute hour day-of-month month day-of-week), or 6 with
    /// seconds first.
    #[schema(example = "0 2 * * *")]
    cron: String,
    /// An IANA time zone name.
    #[schema(example = "Europe/Berlin")]
    timezone: String,
    /// The command each fire time creates: a `POST /v1/commands` body, without `run_at`.
    #[schema(value_type = CreateCommand)]
    command: Value,
    /// What happens to fire times the scheduler missed; `skip` unless given.
    #[schema(value_type = Option<MissedFires>)]
    missed: Option<String>,
}

/// Creates a schedule.
#[utoipa::path(
    post,
    path = "/v1/schedules",
    tag = "schedules",
    request_body = CreateSchedule,
    security(("api_key" = ["commands:write"])),
    responses(
        (status = 201, description = "Created", body = ScheduleView),
    )
)]
pub(super) async fn create(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    caller.require(Scope::CommandsWrite)?;
    let request: CreateSchedule = parse_body(body)?;
    if let Some(name) = &request.name
        && (name.trim().is_empty()
            || name.chars().count() > MAX_NAME_LEN
            || name.chars().any(char::is_control))
    {
        return Err(ApiError::Validation(format!(
            "name: 1 to {MAX_NAME_LEN} characters, not blank, no control characters"
        )));
    }
    let missed = match request.missed.as_deref() {
        None => MissedFires::Skip,
        Some(missed) => missed
            .parse()
            .map_err(|_| ApiError::Validation("missed: `skip` or `catch_up_one`".to_owned()))?,
    };
    let (cron, timezone, now) = (
        request.cron.clone(),
        request.timezone.clone(),
        state.store.now(),
    );
    // Finding that a pattern never matches (Feb 30) searches years ahead: off the async
    // threads. A panic there is the hook's to log; the request gets a 500.
    tokio::task::spawn_blocking(move || FireTimes::parse_firing(&cron, &timezone, now))
        .await
        .map_err(|err| ApiError::Internal(format!("reading the cron pattern: {err}")))?
        .map_err(|err| ApiError::Validation(err.to_string()))?;
    // The template is read as POST /v1/commands reads its body, and its agent must exist.
    let commands = fire_commands(
        &request.command,
        &state.command_limits,
        state.agent_online_window,
        None,
    )?;
    if let FireCommands::Items(items) = commands {
        for item in items {
            if let Target::Agent(agent) = item.command.target
                && state.store.get_agent(caller.org(), agent).await?.is_none()
            {
                return Err(ApiError::Validation(
                    "command.agent_id: no such agent in the organisation".to_owned(),
                ));
            }
        }
    }
    let schedule = state
        .store
        .create_schedule(
            caller.org(),
            NewSchedule {
                name: request.name,
                cron: request.cron,
                timezone: request.timezone,
                command: request.command,
                missed,
            },
        )
        .await?;
    tracing::info!(target: "keel::audit", action = "schedule.create", org_id = %caller.org().0, schedule_id = %schedule.id, cron = %schedule.cron, timezone = %schedule.timezone, missed = schedule.missed.as_str(), "schedule created");
    let now = state.store.now();
    Ok((StatusCode::CREATED, Json(view(schedule, now))).into_response())
}

/// The query of `GET /v1/schedules`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct ListQuery {
    /// The `next_cursor` of the previous page.
    cursor: Option<ScheduleId>,
    /// 1 to 500; 50 unless given.
    limit: Option<u32>,
}

/// The organisation's schedules, oldest first.
#[utoipa::path(
    get,
    path = "/v1/schedules",
    tag = "schedules",
    params(ListQuery),
    security(("api_key" = ["commands:read"])),
    responses(
        (status = 200, description = "A page of schedules", body = SchedulePageView),
        (status = 422, description = "`validation_failed`: a bad cursor or limit, or an unknown parameter", body = ErrorBody),
    )
)]
pub(super) async fn list(
    State(state): State<AppState>,
    caller: Caller,
    Query(query): Query<ListQuery>,
) -> Result<Json<SchedulePageView>, ApiError> {
    caller.require(Scope::CommandsRead)?;
    let limit = page_limit(query.limit)?;
    let page = state
        .store
        .list_schedules(caller.org(), query.cursor, limit)
        .await?;
    let now = state.store.now();
    Ok(Json(SchedulePageView {
        items: page.items.into_iter().map(|s| view(s, now)).collect(),
        next_cursor: page.next_cursor,
    }))
}

/// One schedule, with its latest fires and the commands they created.
#[utoipa::path(
    get,
    path = "/v1/schedules/{id}",
    tag = "schedules",
    params(("id" = uuid::Uuid, Path, description = "The schedule id (anything but a UUID is 400 `bad_request`)")),
    security(("api_key" = ["commands:read"])),
    responses(
        (status = 200, description = "The schedule", body = ScheduleDetailView),
        (status = 400, description = "`bad_request`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
pub(super) async fn get_one(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<ScheduleDetailView>, ApiError> {
    caller.require(Scope::CommandsRead)?;
    let id = schedule_id(&id)?;
    let schedule = state
        .store
        .get_schedule(caller.org(), id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let fires = state
        .store
        .list_schedule_fires(caller.org(), id, None, RECENT_FIRES_SHOWN)
        .await?;
    let times = schedule.fire_times().ok();
    let recent_fires = fires
        .into_iter()
        .map(|fire| fire_view(fire, times.as_ref()))
        .collect();
    Ok(Json(ScheduleDetailView {
        schedule: view(schedule, state.store.now()),
        recent_fires,
    }))
}

/// The query of `GET /v1/schedules/{id}/fires`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(super) struct FiresQuery {
    /// Only fire times before this one (RFC 3339): the `next_before` of the previous page.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[param(value_type = Option<String>, format = DateTime)]
    before: Option<OffsetDateTime>,
    /// 1 to 500; 50 unless given.
    limit: Option<u32>,
}

/// A page of a schedule's fires, newest first.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct FirePageView {
    items: Vec<FireView>,
    /// The `before` of the next page, when there may be one.
    #[schema(value_type = Option<String>, format = DateTime)]
    next_before: Option<String>,
}

/// The schedule's handled fire times, newest first, each with the commands it created.
#[utoipa::path(
    get,
    path = "/v1/schedules/{id}/fires",
    tag = "schedules",
    params(("id" = uuid::Uuid, Path, description = "The schedule id (anything but a UUID is 400 `bad_request`)"), FiresQuery),
    security(("api_key" = ["commands:read"])),
    responses(
        (status = 200, description = "A page of fires", body = FirePageView),
        (status = 400, description = "`bad_request`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
        (status = 422, description = "`validation_failed`: a bad `before` or limit, or an unknown parameter", body = ErrorBody),
    )
)]
pub(super) async fn list_fires(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    Query(query): Query<FiresQuery>,
) -> Result<Json<FirePageView>, ApiError> {
    caller.require(Scope::CommandsRead)?;
    let id = schedule_id(&id)?;
    let limit = page_limit(query.limit)?;
    let schedule = state
        .store
        .get_schedule(caller.org(), id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let fires = state
        .store
        .list_schedule_fires(caller.org(), id, query.before, limit)
        .await?;
    let times = schedule.fire_times().ok();
    let next_before = if fires.len() == limit as usize {
        fires.last().map(|fire| zoned(times.as_ref(), fire.fire_at))
    } else {
        None
    };
    Ok(Json(FirePageView {
        items: fires
            .into_iter()
            .map(|fire| fire_view(fire, times.as_ref()))
            .collect(),
        next_before,
    }))
}

/// Pauses a schedule: it creates nothing until resumed.
#[utoipa::path(
    post,
    path = "/v1/schedules/{id}/pause",
    tag = "schedules",
    params(("id" = uuid::Uuid, Path, description = "The schedule id (anything but a UUID is 400 `bad_request`)")),
    security(("api_key" = ["commands:write"])),
    responses(
        (status = 200, description = "The schedule, paused", body = ScheduleView),
        (status = 400, description = "`bad_request`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
pub(super) async fn pause(
    state: State<AppState>,
    caller: Caller,
    id: Path<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    set_state(state, caller, id, ScheduleState::Paused).await
}

/// Resumes a paused schedule. The fire times that passed while it was paused are missed ones:
/// its `missed` policy applies to them.
#[utoipa::path(
    post,
    path = "/v1/schedules/{id}/resume",
    tag = "schedules",
    params(("id" = uuid::Uuid, Path, description = "The schedule id (anything but a UUID is 400 `bad_request`)")),
    security(("api_key" = ["commands:write"])),
    responses(
        (status = 200, description = "The schedule, active", body = ScheduleView),
        (status = 400, description = "`bad_request`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
pub(super) async fn resume(
    state: State<AppState>,
    caller: Caller,
    id: Path<String>,
) -> Result<Json<ScheduleView>, ApiError> {
    set_state(state, caller, id, ScheduleState::Active).await
}

async fn set_state(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
    to: ScheduleState,
) -> Result<Json<ScheduleView>, ApiError> {
    caller.require(Scope::CommandsWrite)?;
    let id = schedule_id(&id)?;
    let schedule = state.store.set_schedule_state(caller.org(), id, to).await?;
    let action = match to {
        ScheduleState::Paused => "schedule.pause",
        ScheduleState::Active => "schedule.resume",
    };
    tracing::info!(target: "keel::audit", action, org_id = %caller.org().0, schedule_id = %id, "schedule {}", to.as_str());
    Ok(Json(view(schedule, state.store.now())))
}

/// Deletes a schedule and its fire records; the commands it created stay.
#[utoipa::path(
    delete,
    path = "/v1/schedules/{id}",
    tag = "schedules",
    params(("id" = uuid::Uuid, Path, description = "The schedule id (anything but a UUID is 400 `bad_request`)")),
    security(("api_key" = ["commands:write"])),
    responses(
        (status = 204, description = "Deleted"),
        (status = 400, description = "`bad_request`", body = ErrorBody),
        (status = 404, description = "`not_found`", body = ErrorBody),
    )
)]
pub(super) async fn delete(
    State(state): State<AppState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.require(Scope::CommandsWrite)?;
    let id = schedule_id(&id)?;
    state.store.delete_schedule(caller.org(), id).await?;
    tracing::info!(target: "keel::audit", action = "schedule.delete", org_id = %caller.org().0, schedule_id = %id, "schedule deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// A schedule id from the path; anything else is a 400.
fn schedule_id(raw: &str) -> Result<ScheduleId, ApiError> {
    uuid::Uuid::parse_str(raw)
        .map(ScheduleId)
        .map_err(|_| ApiError::BadRequest(format!("`{raw}` is not a schedule id")))
}
