//! Single completions, grouped (see [`super::groups`]): concurrent `complete` calls, of any
//! agents and organisations, are written as one statement. Agents finish commands one at a
//! time and report each as it ends; under load, the reports that arrive while a group is being
//! written share the next statement and its commit. A `complete_batch` is a group already: it
//! is written directly, by the same statement.
//!
//! Each report is fenced alone in the statement (its organisation, agent, command, claim token
//! and the executing status): one that no longer holds its claim changes nothing and is
//! answered `StaleClaim` (or `NotFound`), whatever the others of its group.

use std::collections::{HashMap, HashSet};

use serde_json::Value;
use sqlx::postgres::PgPool;
use uuid::Uuid;

use super::commands::{COMMAND_COLUMNS, CommandRow, ended_attempts};
use super::groups::GroupedWrite;
use crate::error::{StoreError, StoreResult};
use crate::model::{AgentId, ClaimToken, Command, CommandId, OrgId};

/// The completions one agent reports in one call (one for `complete`).
pub(super) struct Reports {
    pub(super) org: OrgId,
    pub(super) agent: AgentId,
    pub(super) reports: Vec<(CommandId, ClaimToken, Value)>,
}

/// Grouped completions.
pub(super) struct Completions;

impl GroupedWrite for Completions {
    type Call = Reports;
    type Answer = Vec<StoreResult<Command>>;
    type Key = ();
    const SCOPE: &'static str = "store.report_groups";

    fn key(_: &Reports) {}

    fn rows(call: &Reports) -> usize {
        call.reports.len().max(1)
    }

    /// Failpoint `store.report_group`: `return` fails the group's statement as a lost
    /// connection would (unknown whether it was written), `return(refused)` as a refusal of
    /// the database (nothing written); either way without writing.
    async fn write_group(pool: &PgPool, calls: &[Reports]) -> StoreResult<Vec<Self::Answer>> {
        fail::fail_point!("store.report_group", |how| Err(match how.as_deref() {
            Some("refused") => StoreError::Conflict("injected at store.report_group".to_owned()),
            _ => StoreError::Unavailable("injected at store.report_group".to_owned()),
        }));
        complete(pool, calls).await
    }

    async fn write_one(pool: &PgPool, call: Reports) -> StoreResult<Self::Answer> {
        complete_alone(pool, call).await
    }
}

/// Completes the reports of one call in a statement of their own.
pub(super) async fn complete_alone(
    pool: &PgPool,
    call: Reports,
) -> StoreResult<Vec<StoreResult<Command>>> {
    let mut answers = complete(pool, std::slice::from_ref(&call)).await?;
    Ok(answers.pop().unwrap_or_default())
}

/// A completed command, with the report that completed it (its 1-based place in the
/// statement's reports).
#[derive(sqlx::FromRow)]
struct CompletedRow {
    #[sqlx(flatten)]
    command: CommandRow,
    report: i64,
}

/// Completes the reports of `calls` in one statement: for each call, an answer per report, in
/// order. Each completed command's answer goes to the very report that completed it (a command
/// reported several times in the statement, with the same token and holder, is completed by
/// the first of them, as if they had come one after the other, whatever the join's plan; the
/// others find it taken). The reports that completed nothing are looked up together: `StaleClaim` when their
/// command is in their organisation, `NotFound` when it is not.
async fn complete(pool: &PgPool, calls: &[Reports]) -> StoreResult<Vec<Vec<StoreResult<Command>>>> {
    let rows: usize = calls.iter().map(|c| c.reports.len()).sum();
    let (mut orgs, mut agents, mut ids) = (
        Vec::with_capacity(rows),
        Vec::with_capacity(rows),
        Vec::with_capacity(rows),
    );
    let (mut tokens, mut results) = (Vec::with_capacity(rows), Vec::with_capacity(rows));
    for call in calls {
        for (id, token, result) in &call.reports {
            orgs.push(call.org.0);
            agents.push(call.agent.0);
            ids.push(id.0);
            tokens.push(token.as_str().to_owned());
            results.push(result.to_string());
        }
    }
    let ended = ended_attempts("NULL::jsonb");
    let completed: Vec<CompletedRow> = sqlx::query_as(&format!(
        "WITH reports AS ( \
           SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::text[], $5::text[]) \
             WITH ORDINALITY AS r (org_id, agent_id, id, token, result, report)), \
         done AS ( \
           UPDATE commands c SET status = 'completed', attempt_outcome = 'completed', \
             result = r.result::jsonb, claim_token = NULL, lease_expires_at = NULL, \
             finished_at = keel_now(), updated_at = keel_now() \
           FROM (SELECT DISTINCT ON (org_id, id, token, agent_id) * FROM reports \
                 ORDER BY org_id, id, token, agent_id, report) r \
           WHERE c.org_id = r.org_id AND c.id = r.id AND c.status = 'executing' \
             AND c.claim_token = r.token AND c.claimed_by = r.agent_id \
           RETURNING c.*, r.report), \
         ended AS ({ended} FROM done) \
         SELECT {COMMAND_COLUMNS}, report FROM done"
    ))
    .bind(&orgs)
    .bind(&agents)
    .bind(&ids)
    .bind(&tokens)
    .bind(&results)
    .fetch_all(pool)
    .await?;
    let mut done: HashMap<i64, Command> = HashMap::with_capacity(completed.len());
    for row in completed {
        done.insert(row.report, row.command.into_command()?);
    }
    let missed: Vec<Uuid> = ids
        .iter()
        .zip(1_i64..)
        .filter(|(_, report)| !done.contains_key(report))
        .map(|(id, _)| *id)
        .collect();
    let existing = if missed.is_empty() {
        Ok(HashSet::new())
    } else {
        commands_of(pool, &missed).await
    };
    let mut report = 0_i64;
    let mut answers = Vec::with_capacity(calls.len());
    for call in calls {
        let mut call_answers = Vec::with_capacity(call.reports.len());
        for (id, _, _) in &call.reports {
            report += 1;
            let answer = match (done.remove(&report), &existing) {
                (Some(command), _) => Ok(command),
                (None, Ok(existing)) if existing.contains(&(call.org, *id)) => {
                    Err(StoreError::StaleClaim)
                }
                (None, Ok(_)) => Err(StoreError::NotFound),
                (None, Err(err)) => Err(err.duplicate()),
            };
            call_answers.push(answer);
        }
        answers.push(call_answers);
    }
    Ok(answers)
}

/// Which of `ids` are stored, with their organisations.
async fn commands_of(pool: &PgPool, ids: &[Uuid]) -> StoreResult<HashSet<(OrgId, CommandId)>> {
    let rows: Vec<(OrgId, CommandId)> =
        sqlx::query_as("SELECT org_id, id FROM commands WHERE id = ANY($1::uuid[])")
            .bind(ids)
            .fetch_all(pool)
            .await?;
    Ok(rows.into_iter().collect())
}
