//! The scheduler job: the schedules whose fire time has come create their commands, each fire
//! time once (the store records the fire with its commands in one write).

use std::time::Duration;

use keel_store::schedule::{BroadcastFire, FireCommands, run_due_schedules};
use keel_store::{NewCommandItem, Store, StoreError};
use serde_json::Value;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use super::wakeups::Wakeups;
use crate::config::CommandLimits;
use crate::http::commands::{CommandRequest, CreateCommand, parse_body};
use crate::http::error::ApiError;
use crate::http::validate::within;

/// The name of the scheduler job.
pub const JOB_NAME: &str = "scheduler";

/// What one fire of a schedule creates from its template (the body of a `POST /v1/commands`),
/// read exactly as that route reads its body: a command for one agent or one queue, or a
/// broadcast whose selector the store resolves as it writes the fire. With `fire_at`, the
/// command is due at that fire time. Also how a template is checked when its schedule is
/// created (without `fire_at`). Errors name the field under `command` (`command.queue: …`).
pub fn fire_commands(
    template: &Value,
    limits: &CommandLimits,
    online_window: Duration,
    fire_at: Option<OffsetDateTime>,
) -> Result<FireCommands, ApiError> {
    let in_template = |err| within("command", err);
    let request: CreateCommand = parse_body(template.clone()).map_err(in_template)?;
    let mut request = request.validate(limits).map_err(in_template)?;
    let command = match &mut request {
        CommandRequest::Single(command) | CommandRequest::Broadcast { command, .. } => command,
    };
    if command.run_at.is_some() {
        return Err(in_template(ApiError::Validation(
            "run_at: not allowed: each command is due at its fire time".to_owned(),
        )));
    }
    command.run_at = fire_at;
    Ok(match request {
        CommandRequest::Single(command) => FireCommands::Items(vec![NewCommandItem {
            command,
            idempotency: None,
        }]),
        CommandRequest::Broadcast {
            command,
            selector,
            online_only,
            max_concurrency,
        } => FireCommands::Broadcast(BroadcastFire {
            command,
            selector,
            online_only,
            max_concurrency,
            online_window,
        }),
    })
}

/// One run of the scheduler: every due schedule fires (or skips missed fire times, by its
/// policy) until none is due. Each fire is an `audit` record (`schedule.fire`) and counted in
/// `keel_schedule_fires_total{outcome}` (`created`, or `failed` when the template could make no
/// command); the agents that wait for its commands are woken. Returns how many fires.
pub async fn fire_due_schedules(
    store: &dyn Store,
    wakeups: &Wakeups,
    limits: &CommandLimits,
    online_window: Duration,
    grace: Duration,
) -> Result<usize, StoreError> {
    fail::fail_point!("commands.scheduler");
    let fired = run_due_schedules(store, grace, |schedule, fire_at| {
        fire_commands(&schedule.command, limits, online_window, Some(fire_at))
            .map_err(|err| err.to_string())
    })
    .await?;
    for fire in &fired {
        let outcome = if fire.fire.error.is_some() {
            "failed"
        } else {
            "created"
        };
        let command_ids: Vec<String> = fire
            .fire
            .command_ids
            .iter()
            .map(ToString::to_string)
            .collect();
        let fire_at = fire.fire.fire_at.format(&Rfc3339).unwrap_or_default();
        tracing::info!(
            target: "keel::audit",
            action = "schedule.fire",
            schedule_id = %fire.schedule.id,
            org_id = %fire.schedule.org_id.0,
            fire_at,
            command_ids = %command_ids.join(","),
            error = fire.fire.error.as_deref().unwrap_or(""),
            outcome,
            "schedule fired"
        );
        metrics::counter!("keel_schedule_fires_total", "outcome" => outcome).increment(1);
        metrics::counter!("keel_commands_created_total")
            .increment(fire.fire.command_ids.len() as u64);
        for target in &fire.targets {
            wakeups.wake_target(fire.schedule.org_id, target);
        }
    }
    Ok(fired.len())
}
