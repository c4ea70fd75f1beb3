//! The [`Store`] trait: everything keel keeps, behind one interface per backend.

use async_trait::async_trait;
use serde_json::Value;
use time::OffsetDateTime;

use crate::error::StoreResult;
use crate::labels::Labels;
use crate::model::{
    Agent, AgentId, ApiKey, ApiKeyId, Attempt, CheckIn, ClaimToken, Claimed, Command,
    CommandFilter, CommandId, CommandStatus, Created, CreatedApiKey, CreatedOperatorKey,
    FinishedCount, Idempotency, Lease, NewApiKey, NewBroadcast, NewCommand, NewCommandItem,
    OperatorKey, OperatorKeyId, OrgId, Organisation, Page, PausedQueue, Principal, Released,
};
use crate::model::{ScheduleId, ScheduleState};
use crate::schedule::{
    AdvanceOutcome, NewSchedule, Schedule, ScheduleAdvance, ScheduleFire, SchedulePage,
};
use crate::sqlite::WritePressure;

/// The most commands one claim hands out.
pub const MAX_CLAIM_BATCH: u32 = 100;

/// The most queues one claim may name.
pub const MAX_QUEUES_PER_CLAIM: usize = 64;

/// The longest queue name.
pub const MAX_QUEUE_NAME_LEN: usize = 64;

/// The most commands one batch creates.
pub const MAX_BATCH_CREATE: usize = 1000;

/// The shortest lease a command may ask for, in seconds. `keel agent` heartbeats every third
/// of the lease (never more often than every 500 ms), so even the shortest lease is renewed
/// with two thirds of it to spare.
pub const MIN_LEASE_SECONDS: u64 = 2;

/// The longest lease a command may ask for, in seconds (a day).
pub const MAX_LEASE_SECONDS: u64 = 86_400;

/// The one rule for a queue name: 1 to [`MAX_QUEUE_NAME_LEN`] characters of
/// `a-z A-Z 0-9 _ . : -`. `Err` says what is wrong.
pub fn check_queue_name(name: &str) -> Result<(), String> {
    let valid = (1..=MAX_QUEUE_NAME_LEN).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'));
    if valid {
        Ok(())
    } else {
        Err(format!(
            "1 to {MAX_QUEUE_NAME_LEN} characters of a-z, A-Z, 0-9, _ . : -"
        ))
    }
}

/// The most commands one page lists.
pub const MAX_PAGE_SIZE: u32 = 500;

/// keel's persistent state.
///
/// Every method that takes an `org` is scoped to that organisation: a row of another one is
/// reported as [`StoreError::NotFound`](crate::StoreError::NotFound) (or simply not seen), exactly
/// as a missing one.
#[async_trait]
pub trait Store: Send + Sync {
    // --- organisations and keys ---

    /// Creates an organisation; a taken name is a `Conflict`.
    async fn create_organisation(&self, name: &str) -> StoreResult<Organisation>;

    /// Every organisation, by name.
    async fn list_organisations(&self) -> StoreResult<Vec<Organisation>>;

    /// The organisation with this name.
    async fn find_org_by_name(&self, name: &str) -> StoreResult<Option<Organisation>>;

    /// Creates an API key and returns its token, which is not stored and cannot be read back.
    /// An agent key (scope `agent`) needs `agent_name`; that agent is created if absent.
    async fn create_api_key(&self, org: OrgId, key: NewApiKey) -> StoreResult<CreatedApiKey>;

    /// The organisation's keys, oldest first (without their tokens).
    async fn list_api_keys(&self, org: OrgId) -> StoreResult<Vec<ApiKey>>;

    /// Revokes a key: its token stops authenticating. Revoking twice is not an error.
    async fn revoke_api_key(&self, org: OrgId, key: ApiKeyId) -> StoreResult<()>;

    /// Who `token` stands for; `None` for an unknown, malformed or revoked token (an operator
    /// key's token included: it belongs to no organisation).
    async fn authenticate(&self, token: &str) -> StoreResult<Option<Principal>>;

    // --- operator keys (outside every organisation) ---

    /// Creates an operator key and returns its token, which is not stored and cannot be read
    /// back. An empty name is `InvalidInput`.
    async fn create_operator_key(&self, name: &str) -> StoreResult<CreatedOperatorKey>;

    /// Every operator key, oldest first (without their tokens).
    async fn list_operator_keys(&self) -> StoreResult<Vec<OperatorKey>>;

    /// Revokes an operator key: its token stops authenticating. Revoking twice is not an error;
    /// an unknown id is `NotFound`.
    async fn revoke_operator_key(&self, key: OperatorKeyId) -> StoreResult<()>;

    /// The operator key `token` stands for; `None` for an unknown, malformed or revoked token
    /// (an organisation's API key included).
    async fn authenticate_operator(&self, token: &str) -> StoreResult<Option<OperatorKey>>;

    // --- agents ---

    /// Records a check-in: last seen (now), version, metadata, queues and boot identifier (a new
    /// one counts a boot). `UnknownAgent` if the agent is not in `org`.
    async fn check_in(&self, org: OrgId, agent: AgentId, check_in: CheckIn) -> StoreResult<Agent>;

    /// One agent of the organisation.
    async fn get_agent(&self, org: OrgId, agent: AgentId) -> StoreResult<Option<Agent>>;

    /// The organisation's agents, by name.
    async fn list_agents(&self, org: OrgId) -> StoreResult<Vec<Agent>>;

    /// Replaces the labels assigned to the agent over the API (its reported ones stay).
    async fn set_agent_labels(
        &self,
        org: OrgId,
        agent: AgentId,
        labels: Labels,
    ) -> StoreResult<Agent>;

    /// Cordons the agent (it claims nothing new; what it runs finishes) or uncordons it.
    /// Cordoning twice keeps the first time.
    async fn set_agent_cordoned(
        &self,
        org: OrgId,
        agent: AgentId,
        cordoned: bool,
    ) -> StoreResult<Agent>;

    // --- queues ---

    /// Pauses a queue of the organisation: its pooled commands are not claimed (creates are
    /// still accepted). Pausing twice keeps the first time. The queue need not exist yet.
    async fn pause_queue(&self, org: OrgId, queue: &str) -> StoreResult<PausedQueue>;

    /// Resumes a queue; `false` when it was not paused.
    async fn resume_queue(&self, org: OrgId, queue: &str) -> StoreResult<bool>;

    /// The organisation's paused queues, by name.
    async fn list_paused_queues(&self, org: OrgId) -> StoreResult<Vec<PausedQueue>>;

    /// Across organisations: `(cordoned agents, paused queues)`.
    async fn count_cordoned_and_paused(&self) -> StoreResult<(u64, u64)>;

    // --- commands ---

    /// Creates a command. With an idempotency key seen before: the same request hash gives the
    /// existing command (`created: false`), another one `IdempotencyMismatch`. A target agent
    /// not in `org` is `UnknownAgent`.
    async fn create_command(
        &self,
        org: OrgId,
        command: NewCommand,
        idempotency: Option<Idempotency>,
    ) -> StoreResult<Created>;

    /// Creates several commands in one transaction: all of them or, on the first error, none.
    /// Each item follows [`Store::create_command`]'s rules; answers are in request order.
    async fn create_commands(
        &self,
        org: OrgId,
        items: Vec<NewCommandItem>,
    ) -> StoreResult<Vec<Created>>;

    /// Creates a broadcast: the parent and one child per agent, in one transaction (all or
    /// nothing), with the idempotency rules of [`Store::create_command`] on the parent. Each
    /// child has the parent's type, parameters, priority, due time, attempts and lease, and
    /// targets its agent; with `max_concurrency` n, children after the n-th are held until a
    /// sibling finishes. No agent, or more than `MAX_BATCH_CREATE`, is `InvalidInput`; an
    /// agent not in `org` is `UnknownAgent`.
    async fn create_broadcast(
        &self,
        org: OrgId,
        broadcast: NewBroadcast,
        idempotency: Option<Idempotency>,
    ) -> StoreResult<Created>;

    /// The command created earlier with this idempotency key, as a retry gets it
    /// (`created: false`); `IdempotencyMismatch` when its request hash differs; `None` when the
    /// key is new. A read: a retry answers without work the create would do first.
    async fn find_idempotent(
        &self,
        org: OrgId,
        idempotency: &Idempotency,
    ) -> StoreResult<Option<Created>>;

    /// A broadcast's children, in creation order (empty for a command that has none).
    async fn list_children(&self, org: OrgId, parent: CommandId) -> StoreResult<Vec<Command>>;

    /// One command of the organisation.
    async fn get_command(&self, org: OrgId, id: CommandId) -> StoreResult<Option<Command>>;

    /// The organisation's commands, newest first, after `cursor` (exclusive); `limit` is clamped
    /// to `1..=MAX_PAGE_SIZE`.
    async fn list_commands(
        &self,
        org: OrgId,
        filter: CommandFilter,
        cursor: Option<CommandId>,
        limit: u32,
    ) -> StoreResult<Page>;

    /// Cancels a command: a pending one at once, an executing one by setting `cancel_requested`
    /// (the agent sees it in its heartbeat). `InvalidState` for a finished one. A broadcast
    /// parent cancels its unfinished children the same way and ends `cancelled` with the last
    /// of them.
    async fn cancel_command(&self, org: OrgId, id: CommandId) -> StoreResult<Command>;

    /// Hands up to `limit` (clamped to `1..=MAX_CLAIM_BATCH`) due pending commands to `agent`:
    /// those targeted at it and those pooled on one of `queues` that is not paused, best
    /// priority first, then oldest; nothing while the agent is cordoned. Each gets a new claim token, a lease of its own duration and one more attempt, in
    /// one atomic statement. `UnknownAgent` if the agent is not in `org`.
    async fn claim(
        &self,
        org: OrgId,
        agent: AgentId,
        queues: &[String],
        limit: u32,
    ) -> StoreResult<Vec<Claimed>>;

    /// Hands back commands claimed by `agent` that were never delivered (the claimer gave up
    /// before it got them): each goes back to pending as it was before the claim, with its
    /// attempt count and history unchanged; one whose cancel was requested meanwhile is
    /// cancelled instead. A pair whose token is no longer current is skipped. Returns how many
    /// went back to pending.
    async fn hand_back(
        &self,
        org: OrgId,
        agent: AgentId,
        claims: Vec<(CommandId, ClaimToken)>,
    ) -> StoreResult<u64>;

    /// Every attempt at the command, first first.
    async fn list_attempts(&self, org: OrgId, id: CommandId) -> StoreResult<Vec<Attempt>>;

    /// Renews the lease (now + the command's lease duration) and stores `progress` if given.
    /// `StaleClaim` (and no change) unless the command is executing under `token`.
    async fn heartbeat(
        &self,
        org: OrgId,
        agent: AgentId,
        id: CommandId,
        token: &ClaimToken,
        progress: Option<Value>,
    ) -> StoreResult<Lease>;

    /// Completes the command with `result`. `StaleClaim` (and no change) unless the command is
    /// executing under `token`.
    async fn complete(
        &self,
        org: OrgId,
        agent: AgentId,
        id: CommandId,
        token: &ClaimToken,
        result: Value,
    ) -> StoreResult<Command>;

    /// Completes several commands `agent` holds, each fenced alone by its token as in
    /// [`Store::complete`]: the answers are in the order of `reports`, each the command as it
    /// is now or its own error (a stale one changes nothing, the others complete). At most
    /// [`MAX_CLAIM_BATCH`] reports; more is `InvalidInput`. A backend may record them all in
    /// one statement; this default completes them one by one, concurrently.
    async fn complete_batch(
        &self,
        org: OrgId,
        agent: AgentId,
        reports: Vec<(CommandId, ClaimToken, Value)>,
    ) -> StoreResult<Vec<StoreResult<Command>>> {
        if reports.len() > MAX_CLAIM_BATCH as usize {
            return Err(crate::StoreError::InvalidInput(format!(
                "at most {MAX_CLAIM_BATCH} reports at once"
            )));
        }
        let completes = reports.into_iter().map(|(id, token, result)| async move {
            self.complete(org, agent, id, &token, result).await
        });
        Ok(futures::future::join_all(completes).await)
    }

    /// Records a failed attempt. A retryable failure with attempts left goes back to pending
    /// after a backoff; otherwise the command is failed (cancelled if a cancel was requested).
    /// `StaleClaim` (and no change) unless the command is executing under `token`.
    async fn fail(
        &self,
        org: OrgId,
        agent: AgentId,
        id: CommandId,
        token: &ClaimToken,
        error: Value,
        retryable: bool,
    ) -> StoreResult<Command>;

    /// In `org` (every organisation when `None`): up to `limit` executing commands whose lease
    /// ended before now, earliest expiry first, go back to pending (due now), or to dead
    /// (`lease_expired`) when their attempts are used up, or to cancelled when a cancel was
    /// requested. Fewer than `limit` released means none is left.
    async fn release_expired_leases(
        &self,
        org: Option<OrgId>,
        limit: u32,
    ) -> StoreResult<Vec<Released>>;

    /// Deletes up to `limit` commands (with their attempts and idempotency keys) that finished
    /// before `before`, oldest first; returns how many. Fewer than `limit` means none is left.
    async fn purge_finished(&self, before: OffsetDateTime, limit: u32) -> StoreResult<u64>;

    /// The organisation's dead commands, newest first (see [`Store::list_commands`]).
    async fn list_dead(
        &self,
        org: OrgId,
        cursor: Option<CommandId>,
        limit: u32,
    ) -> StoreResult<Page>;

    /// How many of the organisation's commands are in each status (statuses with none are left
    /// out), in the order of [`CommandStatus`]'s variants. Reads the `(org, status)` index.
    async fn count_commands_by_status(&self, org: OrgId) -> StoreResult<Vec<(CommandStatus, u64)>>;

    /// Commands of every organisation that finished (`completed`, `failed`, `cancelled`, `dead`)
    /// at or after `since`, counted per minute and status, oldest minute first. Reads the
    /// retention index on `finished_at`.
    async fn finished_per_minute(&self, since: OffsetDateTime) -> StoreResult<Vec<FinishedCount>>;

    /// Puts a dead or failed command back to pending, due now, with its attempts reset.
    /// `InvalidState` for a command in another state.
    async fn requeue(&self, org: OrgId, id: CommandId) -> StoreResult<Command>;

    /// The earliest `run_at` among pending commands `agent` could claim with `queues` (it may
    /// be in the past), so a long poll knows how long it may sleep.
    async fn next_due_at(
        &self,
        org: OrgId,
        agent: AgentId,
        queues: &[String],
    ) -> StoreResult<Option<OffsetDateTime>>;

    // --- schedules ---

    /// Creates an active schedule whose next fire time is the pattern's first after now. A
    /// pattern or time zone that cannot be read, or a pattern with no fire time after now, is
    /// `InvalidInput` naming the field (`cron: …`, `timezone: …`). The command template is
    /// stored as given: checking it is the caller's business.
    async fn create_schedule(&self, org: OrgId, schedule: NewSchedule) -> StoreResult<Schedule>;

    /// The organisation's schedules, oldest first, after `cursor` (exclusive); `limit` is
    /// clamped to `1..=MAX_PAGE_SIZE`.
    async fn list_schedules(
        &self,
        org: OrgId,
        cursor: Option<ScheduleId>,
        limit: u32,
    ) -> StoreResult<SchedulePage>;

    /// One schedule of the organisation.
    async fn get_schedule(&self, org: OrgId, id: ScheduleId) -> StoreResult<Option<Schedule>>;

    /// Pauses or resumes a schedule (either twice is not an error). Its next fire time stays:
    /// on resume, the fire times that passed meanwhile are missed ones, handled by its policy.
    async fn set_schedule_state(
        &self,
        org: OrgId,
        id: ScheduleId,
        state: ScheduleState,
    ) -> StoreResult<Schedule>;

    /// Deletes a schedule and its fire records; the commands it created stay.
    async fn delete_schedule(&self, org: OrgId, id: ScheduleId) -> StoreResult<()>;

    /// The schedule's handled fire times before `before` (all when `None`), newest first, at
    /// most `limit` (clamped to `1..=MAX_PAGE_SIZE`); empty for another organisation's
    /// schedule.
    async fn list_schedule_fires(
        &self,
        org: OrgId,
        id: ScheduleId,
        before: Option<OffsetDateTime>,
        limit: u32,
    ) -> StoreResult<Vec<ScheduleFire>>;

    /// Active schedules of every organisation whose next fire time is at or before now,
    /// earliest first, at most `limit` (clamped to `1..=MAX_PAGE_SIZE`). Reads an index of
    /// active schedules by next fire time: the cost does not grow with the schedules not due.
    async fn due_schedules(&self, limit: u32) -> StoreResult<Vec<Schedule>>;

    /// One step of a due schedule, in one transaction: the schedule moves from `step.due` to
    /// `step.next` and, when the step fires, the fire time is recorded with its commands (all
    /// created, or none). Nothing is written (`Stale`) unless the schedule is active with the
    /// next fire time `step.due`, nor when the fire time was recorded before: each fire time
    /// creates its commands once, whatever the restarts and instances.
    async fn advance_schedule(&self, step: ScheduleAdvance) -> StoreResult<AdvanceOutcome>;

    /// Waits for the connections to close; called once at shutdown.
    async fn close(&self);

    /// How loaded the store's write path is (zero for a backend without a write queue).
    fn write_pressure(&self) -> WritePressure {
        WritePressure::default()
    }

    /// Notification settings, events and deliveries (`crate::notifications`).
    fn notifications(&self) -> &dyn crate::notifications::NotificationStore;

    /// "Now" by the store's clock, the one its timestamps (run_at, leases, last seen) use.
    fn now(&self) -> OffsetDateTime;
}
