//! The [`Store`] trait: everything keel keeps, behind one interface per backend.

use async_trait::async_trait;
use serde_json::Value;
use time::OffsetDateTime;

use crate::error::StoreResult;
use crate::model::{
    Agent, AgentId, ApiKey, ApiKeyId, Attempt, CheckIn, ClaimToken, Claimed, Command,
    CommandFilter, CommandId, CommandStatus, Created, CreatedApiKey, CreatedOperatorKey,
    FinishedCount, Idempotency, Lease, NewApiKey, NewCommand, NewCommandItem, OperatorKey,
    OperatorKeyId, OrgId, Organisation, Page, Principal, Released,
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
    /// (the agent sees it in its heartbeat). `InvalidState` for a finished one.
    async fn cancel_command(&self, org: OrgId, id: CommandId) -> StoreResult<Command>;

    /// Hands up to `limit` (clamped to `1..=MAX_CLAIM_BATCH`) due pending commands to `agent`:
    /// those targeted at it and those pooled on one of `queues`, best priority first, then
    /// oldest. Each gets a new claim token, a lease of its own duration and one more attempt, in
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
