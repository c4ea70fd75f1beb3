//! Many commands in one request: `POST /v1/commands/batch` creates up to
//! [`MAX_BATCH_CREATE`] commands all or nothing; `POST /v1/commands/reports` completes or fails
//! up to [`MAX_CLAIM_BATCH`] claimed commands, each on its own. `docs/commands.md` is the
//! reference.

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use keel_store::{
    Command, CommandStatus, Idempotency, MAX_BATCH_CREATE, MAX_CLAIM_BATCH, NewCommandItem, Scope,
};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::AppState;
use super::auth::Caller;
use super::commands::{
    CommandRequest, CommandView, CreateCommand, agent_report, idempotency, parse_body, reported,
};
use super::error::{ApiError, ErrorBody, ErrorCode};
use super::json::Json;

/// The body of `POST /v1/commands/batch`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct CreateBatch {
    #[schema(value_type = Vec<CreateCommand>, min_items = 1, max_items = 1000)]
    commands: Vec<Value>,
}

/// The answer of a batch create: the commands, in request order.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct BatchView {
    commands: Vec<CommandView>,
}

/// Creates every command of the batch, or none: the first invalid item is a 422 naming it
/// (`commands[3].queue: …`) and nothing is created. With an `Idempotency-Key` header `K`, item
/// `n` is created under the key `K·n` ([`batch_item_key`]): a retried batch answers the same
/// commands (200).
/// Creates up to 1000 commands, all or nothing. Each command draws a token of the
/// organisation's `work` bucket, as its own request would.
#[utoipa::path(
    post,
    path = "/v1/commands/batch",
    tag = "commands",
    request_body = CreateBatch,
    params(("Idempotency-Key" = Option<String>, Header, pattern = "^[ -~]{1,255}$", description = "1 to 255 printable ASCII characters; a retry with the same key and request answers the first command (200)")),
    security(("api_key" = ["commands:write"])),
    responses(
        (status = 201, description = "Created, in request order", body = BatchView),
        (status = 200, description = "A retry with the same `Idempotency-Key`: the commands created first", body = BatchView),
        (status = 409, description = "`conflict`, `stale_claim`, `idempotency_mismatch` or `invalid_state`", body = ErrorBody),
    )
)]
pub(super) async fn create_batch(
    State(state): State<AppState>,
    caller: Caller,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Result<Response, ApiError> {
    caller.require(Scope::CommandsWrite)?;
    let batch: CreateBatch = parse_body(body)?;
    if batch.commands.is_empty() || batch.commands.len() > MAX_BATCH_CREATE {
        return Err(ApiError::Validation(format!(
            "commands: 1 to {MAX_BATCH_CREATE} commands"
        )));
    }
    let mut items = Vec::with_capacity(batch.commands.len());
    for (n, raw) in batch.commands.into_iter().enumerate() {
        let item = parse_body::<CreateCommand>(raw)
            .and_then(|request| request.validate(&state.command_limits))
            .and_then(|request| match request {
                CommandRequest::Single(command) => Ok(command),
                CommandRequest::Broadcast { .. } => Err(ApiError::Validation(
                    "selector: a broadcast is created alone, with POST /v1/commands".to_owned(),
                )),
            })
            .and_then(|command| {
                let idempotency = idempotency(&headers, &command)?.map(|idem| Idempotency {
                    key: batch_item_key(&idem.key, n),
                    request_hash: idem.request_hash,
                });
                Ok(NewCommandItem {
                    command,
                    idempotency,
                })
            })
            .map_err(|err| at_item(n, err))?;
        items.push(item);
    }
    state
        .overload
        .admit_batch_create(state.store.as_ref(), caller.org(), items.len())
        .await?;
    // Under pressure a batch is shed as its lowest priority would be.
    let lowest = items.iter().map(|item| item.command.priority).min();
    if let Some(priority) = lowest {
        state.overload.admit_create(priority)?;
    }
    let created = state
        .store
        .create_commands(caller.org(), items)
        .await
        .map_err(ApiError::from)?;
    let new = created.iter().filter(|c| c.created).count();
    metrics::counter!("keel_commands_created_total").increment(new as u64);
    for command in created.iter().filter(|c| c.created) {
        state
            .wakeups
            .wake_target(caller.org(), &command.command.target);
    }
    let status = if new > 0 {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let commands = created
        .into_iter()
        .map(|c| CommandView::from(c.command))
        .collect();
    Ok((status, Json(BatchView { commands })).into_response())
}

/// The idempotency key of item `n` of a batch sent with `key`: `key·n`. The middle dot is not
/// printable ASCII, so no `Idempotency-Key` of a single create can take it.
fn batch_item_key(key: &str, n: usize) -> String {
    format!("{key}\u{b7}{n}")
}

/// The error of item `n`, naming it.
fn at_item(n: usize, err: ApiError) -> ApiError {
    match err {
        ApiError::Validation(what) => ApiError::Validation(format!("commands[{n}]: {what}")),
        ApiError::FieldTooLarge { field, limit } => {
            ApiError::Validation(format!("commands[{n}].{field}: larger than {limit} bytes"))
        }
        other => other,
    }
}

/// The body of `POST /v1/commands/reports`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ReportBatch {
    #[schema(min_items = 1, max_items = 100)]
    reports: Vec<Report>,
}

/// One report: a completion or a failure of one claimed command.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct Report {
    #[schema(value_type = uuid::Uuid)]
    id: String,
    claim_token: String,
    outcome: ReportOutcome,
    #[serde(default)]
    result: Value,
    #[serde(default)]
    error: Value,
    #[serde(default)]
    retryable: bool,
}

#[derive(Debug, Clone, Copy, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
enum ReportOutcome {
    Completed,
    Failed,
}

/// What became of one report: the command's status, or the error it got.
#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ReportResult {
    id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<CommandStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<ReportError>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
struct ReportError {
    #[schema(value_type = ErrorCode)]
    code: &'static str,
    message: String,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(super) struct ReportsView {
    results: Vec<ReportResult>,
}

/// Completes or fails each reported command on its own (one stale token does not stop the
/// others); the answer lists each report's outcome in request order. The completions are
/// recorded together (`Store::complete_batch`), so a batch costs about one commit.
/// Completes or fails up to 100 claimed commands, each on its own.
#[utoipa::path(
    post,
    path = "/v1/commands/reports",
    tag = "agents",
    request_body = ReportBatch,
    security(("api_key" = ["agent"])),
    responses(
        (status = 200, description = "Each report's outcome, in request order", body = ReportsView),
    )
)]
pub(super) async fn report_batch(
    State(state): State<AppState>,
    caller: Caller,
    Json(body): Json<Value>,
) -> Result<Json<ReportsView>, ApiError> {
    caller.agent()?;
    let batch: ReportBatch = parse_body(body)?;
    if batch.reports.is_empty() || batch.reports.len() > MAX_CLAIM_BATCH as usize {
        return Err(ApiError::Validation(format!(
            "reports: 1 to {MAX_CLAIM_BATCH} reports"
        )));
    }
    let org = caller.org();
    let limits = state.command_limits;
    // Checked first, each on its own; then every completion in one store call (one statement
    // on PostgreSQL), and the failures concurrently.
    let mut outcomes: Vec<Option<Result<Command, ApiError>>> = Vec::new();
    let mut ids = Vec::with_capacity(batch.reports.len());
    let mut completes = Vec::new();
    let mut failures = Vec::new();
    let mut agent_id = None;
    for (n, report) in batch.reports.into_iter().enumerate() {
        ids.push(report.id.clone());
        let checked = match report.outcome {
            ReportOutcome::Completed => ("result", &report.result, limits.result_bytes),
            ReportOutcome::Failed => ("error", &report.error, limits.error_bytes),
        };
        match agent_report(&caller, &report.id, report.claim_token, checked) {
            Err(err) => outcomes.push(Some(Err(err))),
            Ok((agent, command_id, token)) => {
                agent_id = Some(agent);
                outcomes.push(None);
                match report.outcome {
                    ReportOutcome::Completed => {
                        completes.push((n, (command_id, token, report.result)));
                    }
                    ReportOutcome::Failed => {
                        failures.push((n, command_id, token, report.error, report.retryable));
                    }
                }
            }
        }
    }
    if let Some(agent) = agent_id {
        let (at, items): (Vec<usize>, Vec<_>) = completes.into_iter().unzip();
        // The store could record none of them (busy, unreachable): the agent sends the batch
        // again.
        let completed = state.store.complete_batch(org, agent, items).await?;
        for (n, answer) in at.into_iter().zip(completed) {
            if let Some(slot) = outcomes.get_mut(n) {
                *slot = Some(answer.map_err(ApiError::from));
            }
        }
        let failed = futures::future::join_all(failures.into_iter().map(
            |(n, command_id, token, error, retryable)| {
                let store = state.store.clone();
                async move {
                    let answer = store
                        .fail(org, agent, command_id, &token, error, retryable)
                        .await
                        .map_err(ApiError::from);
                    (n, answer)
                }
            },
        ))
        .await;
        for (n, answer) in failed {
            if let Some(slot) = outcomes.get_mut(n) {
                *slot = Some(answer);
            }
        }
    }
    let results = ids
        .into_iter()
        .zip(outcomes)
        .map(|(id, outcome)| {
            match outcome.unwrap_or_else(|| Err(ApiError::Internal("no answer".to_owned()))) {
                Ok(command) => {
                    reported(&state, org, &command);
                    ReportResult {
                        id,
                        status: Some(command.status),
                        error: None,
                    }
                }
                Err(err) => {
                    if let ApiError::Internal(detail) = &err {
                        tracing::error!(command_id = %id, %detail, "report failed inside keel");
                    }
                    ReportResult {
                        id,
                        status: None,
                        error: Some(ReportError {
                            code: err.code(),
                            message: err.to_string(),
                        }),
                    }
                }
            }
        })
        .collect();
    Ok(Json(ReportsView { results }))
}
