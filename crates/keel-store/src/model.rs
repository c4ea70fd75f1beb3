//! The store's domain types: identifiers, organisations, API keys, agents and commands.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::labels::Labels;

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
            sqlx::Type, utoipa::ToSchema,
        )]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $name(pub Uuid);

        impl $name {
            /// A new, time-ordered (UUID v7) identifier.
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }

        impl FromStr for $name {
            type Err = uuid::Error;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

id_type!(
    /// Identifies an organisation.
    OrgId
);
id_type!(
    /// Identifies an agent (unique across organisations).
    AgentId
);
id_type!(
    /// Identifies an API key.
    ApiKeyId
);
id_type!(
    /// Identifies an operator key.
    OperatorKeyId
);
id_type!(
    /// Identifies a command; v7, so identifiers sort by creation time.
    CommandId
);
id_type!(
    /// Identifies a schedule; v7, so identifiers sort by creation time.
    ScheduleId
);

/// A text value that names none of the known variants.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown {what} `{value}`")]
pub struct UnknownName {
    /// What was being parsed ("scope", "status", ...).
    pub what: &'static str,
    /// The text that did not match.
    pub value: String,
}

macro_rules! named_enum {
    ($(#[$doc:meta])* $name:ident, $what:literal { $($(#[$vdoc:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            /// Every variant, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The stored and serialised name.
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        // By hand: a derive would not see the names through the macro's `$text`.
        impl utoipa::PartialSchema for $name {
            fn schema() -> utoipa::openapi::RefOr<utoipa::openapi::schema::Schema> {
                utoipa::openapi::schema::ObjectBuilder::new()
                    .schema_type(utoipa::openapi::schema::Type::String)
                    .enum_values(Some([$($text),+]))
                    .into()
            }
        }

        impl utoipa::ToSchema for $name {
            fn name() -> std::borrow::Cow<'static, str> {
                std::borrow::Cow::Borrowed(stringify!($name))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl FromStr for $name {
            type Err = UnknownName;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $($text => Ok(Self::$variant),)+
                    _ => Err(UnknownName { what: $what, value: s.to_owned() }),
                }
            }
        }
    };
}

// The notification types are made with the same macros.
pub(crate) use {id_type, named_enum};

named_enum!(
    /// What an API key may do.
    Scope, "scope" {
        /// Manage the organisation: keys, agents, every command.
        Admin => "admin",
        /// Create and cancel commands.
        CommandsWrite => "commands:write",
        /// Read commands.
        CommandsRead => "commands:read",
        /// Act as the key's agent: check in, claim, heartbeat, complete, fail.
        Agent => "agent",
        /// Trigger events, send messages, change notification settings, requeue deliveries.
        NotificationsWrite => "notifications:write",
        /// Read notification settings and deliveries, preview templates.
        NotificationsRead => "notifications:read",
    }
);

named_enum!(
    /// Where a command is in its life.
    CommandStatus, "command status" {
        /// Waiting to be claimed (at or after `run_at`).
        Pending => "pending",
        /// Claimed by an agent that holds a lease on it.
        Executing => "executing",
        /// Finished successfully (terminal).
        Completed => "completed",
        /// Finished with an error, retries exhausted or not retryable (terminal).
        Failed => "failed",
        /// Cancelled before or while it ran (terminal).
        Cancelled => "cancelled",
        /// Given up after its leases expired `max_attempts` times (terminal, requeue-able).
        Dead => "dead",
    }
);

impl CommandStatus {
    /// Whether the command has reached an end state.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Self::Completed | Self::Failed | Self::Cancelled | Self::Dead
        )
    }
}

named_enum!(
    /// How one attempt at a command ended.
    AttemptOutcome, "attempt outcome" {
        /// The agent completed it.
        Completed => "completed",
        /// The agent reported a failure; the command went back to pending for a retry.
        Retry => "retry",
        /// The agent reported a failure that ended the command (`failed`).
        Failed => "failed",
        /// Its lease expired before the agent reported.
        LeaseExpired => "lease_expired",
        /// The command was cancelled while this attempt ran.
        Cancelled => "cancelled",
    }
);

named_enum!(
    /// What a schedule does with the fire times the scheduler missed (see
    /// [`plan_fire`](crate::schedule::plan_fire)).
    MissedFires, "missed fire policy" {
        /// Nothing is created for them.
        Skip => "skip",
        /// One command (set) is created for all of them, for the latest.
        CatchUpOne => "catch_up_one",
    }
);

named_enum!(
    /// Whether a schedule fires.
    ScheduleState, "schedule state" {
        /// It fires.
        Active => "active",
        /// It does not fire until resumed.
        Paused => "paused",
    }
);

named_enum!(
    /// Why a command is dead.
    DeadReason, "dead reason" {
        /// Its lease expired on its last allowed attempt.
        LeaseExpired => "lease_expired",
    }
);

/// An organisation: the unit of isolation. Nothing crosses from one to another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Organisation {
    /// Its identifier.
    pub id: OrgId,
    /// Its unique name.
    pub name: String,
    /// When it was created.
    pub created_at: OffsetDateTime,
}

/// What to create an API key with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewApiKey {
    /// A label for people ("ci", "agent on web-1").
    pub name: String,
    /// What the key may do.
    pub scopes: Vec<Scope>,
    /// For a key with the [`Scope::Agent`] scope: the agent it acts as, by name; the agent is
    /// created in the organisation if it does not exist. Must be `None` for other keys.
    pub agent_name: Option<String>,
}

/// An API key, as listed (the token itself is never stored).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiKey {
    /// Its identifier.
    pub id: ApiKeyId,
    /// The organisation it belongs to.
    pub org_id: OrgId,
    /// Its label.
    pub name: String,
    /// The public part of the token, to tell keys apart.
    pub prefix: String,
    /// What it may do.
    pub scopes: Vec<Scope>,
    /// The agent an agent key is bound to.
    pub agent_id: Option<AgentId>,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// When it was revoked, if it was.
    pub revoked_at: Option<OffsetDateTime>,
}

/// A new API key and its token. The token is shown this once and cannot be read back; its
/// type prints as `[REDACTED]` (`expose_secret()` reads it).
#[derive(Debug, Clone)]
pub struct CreatedApiKey {
    /// The stored key.
    pub key: ApiKey,
    /// The secret token (`keel_<prefix>_<secret>`).
    pub token: SecretString,
}

/// An operator key, as listed: a credential of the people running keel, outside every
/// organisation. It opens the `/v1/admin` routes and nothing of any organisation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperatorKey {
    /// Its identifier.
    pub id: OperatorKeyId,
    /// Its label (who uses it).
    pub name: String,
    /// The public part of the token, to tell keys apart.
    pub prefix: String,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// When it was revoked, if it was.
    pub revoked_at: Option<OffsetDateTime>,
}

/// A new operator key and its token, shown this once (same format and hashing as API keys).
#[derive(Debug, Clone)]
pub struct CreatedOperatorKey {
    /// The stored key.
    pub key: OperatorKey,
    /// The secret token (`keel_<prefix>_<secret>`).
    pub token: SecretString,
}

/// Who is calling: what a valid token stands for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// The key that was presented.
    pub key_id: ApiKeyId,
    /// The key's organisation: every query of the caller is scoped to it.
    pub org_id: OrgId,
    /// What the key may do.
    pub scopes: Vec<Scope>,
    /// The agent an agent key acts as.
    pub agent_id: Option<AgentId>,
}

impl Principal {
    /// Whether the key carries `scope` (exactly; no scope implies another here).
    pub fn has_scope(&self, scope: Scope) -> bool {
        self.scopes.contains(&scope)
    }
}

/// An agent and what it last reported.
#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    /// Its identifier.
    pub id: AgentId,
    /// Its organisation.
    pub org_id: OrgId,
    /// Its name, unique in the organisation.
    pub name: String,
    /// The version it last reported.
    pub version: Option<String>,
    /// The metadata it last reported (a JSON object).
    pub metadata: Value,
    /// The queues it last said it serves.
    pub queues: Vec<String>,
    /// The boot identifier of its running process.
    pub boot_id: Option<Uuid>,
    /// How many distinct boots it has reported.
    pub boot_count: u32,
    /// When it first reported its current boot identifier.
    pub booted_at: Option<OffsetDateTime>,
    /// When it last checked in; online/offline is derived from this by the caller.
    pub last_seen_at: Option<OffsetDateTime>,
    /// When the record was created.
    pub created_at: OffsetDateTime,
    /// The labels it reported at its last check-in.
    pub reported_labels: Labels,
    /// The labels assigned to it over the API.
    pub assigned_labels: Labels,
    /// Since when it is cordoned (it claims nothing new); `None` when it is not.
    pub cordoned_at: Option<OffsetDateTime>,
}

impl Agent {
    /// Its labels: the reported ones, with the assigned ones over them.
    pub fn labels(&self) -> Labels {
        let mut labels = self.reported_labels.clone();
        labels.extend(
            self.assigned_labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        labels
    }
}

/// What an agent reports when it checks in.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckIn {
    /// A new name for the agent, if it changes.
    pub name: Option<String>,
    /// Its software version.
    pub version: String,
    /// Free-form facts about it (must be a JSON object).
    pub metadata: Value,
    /// The queues it serves.
    pub queues: Vec<String>,
    /// Chosen anew by each process start: a new value means the agent restarted.
    pub boot_id: Uuid,
    /// Its labels; `None` keeps the ones it reported before.
    pub labels: Option<Labels>,
}

/// Who may run a command.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// Only this agent.
    Agent(AgentId),
    /// Any agent of the organisation that serves this queue.
    Queue(String),
    /// Every agent the label selector matched at creation: a broadcast parent, run by its
    /// children, one per agent.
    Broadcast(String),
}

/// How many times a command is handed out before it fails or dies, unless set.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;

/// How long a claim holds without a heartbeat, unless set.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(300);

/// What to create a command with.
#[derive(Debug, Clone, PartialEq)]
pub struct NewCommand {
    /// What to do, as the agent understands it.
    pub command_type: String,
    /// Who may run it.
    pub target: Target,
    /// Its parameters.
    pub params: Value,
    /// Higher runs first.
    pub priority: i32,
    /// Not before this instant; `None` means now.
    pub run_at: Option<OffsetDateTime>,
    /// How many claims it gets (at least 1).
    pub max_attempts: u32,
    /// How long a claim or heartbeat holds.
    pub lease_duration: Duration,
}

impl NewCommand {
    /// A command due now, with priority 0 and the default attempts and lease.
    pub fn new(command_type: impl Into<String>, target: Target, params: Value) -> Self {
        Self {
            command_type: command_type.into(),
            target,
            params,
            priority: 0,
            run_at: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            lease_duration: DEFAULT_LEASE_DURATION,
        }
    }
}

/// An idempotency key and a hash of the request it came with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    /// The caller's key, unique in the organisation.
    pub key: String,
    /// A hash of the request body, to tell a retry from a different request under the same key.
    pub request_hash: String,
}

/// A command as stored. The claim token is not part of it: only the claimer gets it.
#[derive(Debug, Clone, PartialEq)]
pub struct Command {
    /// Its identifier.
    pub id: CommandId,
    /// Its organisation.
    pub org_id: OrgId,
    /// What to do.
    pub command_type: String,
    /// Who may run it.
    pub target: Target,
    /// Its parameters.
    pub params: Value,
    /// Higher runs first.
    pub priority: i32,
    /// Not claimed before this instant.
    pub run_at: OffsetDateTime,
    /// How many claims it gets.
    pub max_attempts: u32,
    /// How long a claim or heartbeat holds.
    pub lease_duration: Duration,
    /// Where it is in its life.
    pub status: CommandStatus,
    /// How many times it was claimed.
    pub attempts: u32,
    /// The agent that holds its lease, or held it last.
    pub claimed_by: Option<AgentId>,
    /// When the current lease ends (while executing).
    pub lease_expires_at: Option<OffsetDateTime>,
    /// The progress last reported by a heartbeat.
    pub progress: Option<Value>,
    /// What the agent reported on completion.
    pub result: Option<Value>,
    /// What the agent reported on its last failure.
    pub error: Option<Value>,
    /// Why it is dead.
    pub dead_reason: Option<DeadReason>,
    /// A cancel was asked while it was executing; the agent learns it from its heartbeat.
    pub cancel_requested: bool,
    /// The idempotency key it was created with.
    pub idempotency_key: Option<String>,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// When it last changed.
    pub updated_at: OffsetDateTime,
    /// When it reached its current terminal state.
    pub finished_at: Option<OffsetDateTime>,
    /// The broadcast it is a child of.
    pub parent_id: Option<CommandId>,
    /// For a broadcast parent: how it was created and the agents it reached.
    pub broadcast: Option<Broadcast>,
}

/// How a broadcast was created, and the agents its selector matched then.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Broadcast {
    /// Only agents online at creation were matched.
    pub online_only: bool,
    /// At most this many children unfinished and released at once; `None`: no limit.
    pub max_concurrency: Option<u32>,
    /// The matched agents, one child each, in child order.
    pub agents: Vec<AgentId>,
}

/// What to create a broadcast with: the parent (its target the selector), and the agents the
/// selector matched, each of which gets a child with the parent's type, parameters and limits.
#[derive(Debug, Clone, PartialEq)]
pub struct NewBroadcast {
    /// The parent; its target is [`Target::Broadcast`].
    pub command: NewCommand,
    /// See [`Broadcast::online_only`].
    pub online_only: bool,
    /// See [`Broadcast::max_concurrency`].
    pub max_concurrency: Option<u32>,
    /// The agents the selector matched (1 to [`crate::MAX_BATCH_CREATE`]).
    pub agents: Vec<AgentId>,
}

/// A paused queue: its pooled commands are not claimed until it is resumed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PausedQueue {
    /// The queue.
    pub queue: String,
    /// Since when.
    pub paused_at: OffsetDateTime,
}

/// The outcome of a create: the command, and whether this call created it.
#[derive(Debug, Clone, PartialEq)]
pub struct Created {
    /// The command (an earlier one when the idempotency key was seen before).
    pub command: Command,
    /// `false` when an earlier request with the same idempotency key and body created it.
    pub created: bool,
}

/// Which commands to list; `None` fields do not filter.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandFilter {
    /// Only in this status.
    pub status: Option<CommandStatus>,
    /// Only targeted at this agent.
    pub agent: Option<AgentId>,
    /// Only pooled on this queue.
    pub queue: Option<String>,
    /// Only of this type.
    pub command_type: Option<String>,
}

/// How many commands finished with one status in one minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FinishedCount {
    /// The minute's start.
    pub minute: OffsetDateTime,
    /// The status they reached.
    pub status: CommandStatus,
    /// How many.
    pub count: u64,
}

/// One page of commands, newest first.
#[derive(Debug, Clone, PartialEq)]
pub struct Page {
    /// The commands of this page.
    pub items: Vec<Command>,
    /// Pass as `cursor` to get the next page; `None` on the last page.
    pub next_cursor: Option<CommandId>,
}

/// The secret that fences one claim of one command: heartbeat, complete and fail need it.
#[derive(Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ClaimToken(pub String);

impl ClaimToken {
    /// The token's text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ClaimToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ClaimToken(<redacted>)")
    }
}

impl From<String> for ClaimToken {
    fn from(token: String) -> Self {
        Self(token)
    }
}

/// A command handed to an agent by a claim.
#[derive(Debug, Clone, PartialEq)]
pub struct Claimed {
    /// The command, now executing.
    pub command: Command,
    /// The token to heartbeat, complete or fail it with.
    pub claim_token: ClaimToken,
    /// When the lease ends unless renewed.
    pub lease_expires_at: OffsetDateTime,
}

/// The state of a lease after a heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lease {
    /// When it now ends unless renewed.
    pub expires_at: OffsetDateTime,
    /// The command should stop: a cancel was requested.
    pub cancel_requested: bool,
}

/// What became of a command whose lease expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReleaseOutcome {
    /// Back to pending, to be claimed again (a targeted one by the same agent).
    Requeued,
    /// Its attempts are used up: dead with reason `lease_expired`.
    Dead,
    /// A cancel was requested while it executed: cancelled.
    Cancelled,
}

/// One command released by [`crate::Store::release_expired_leases`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// The command.
    pub command_id: CommandId,
    /// Its organisation.
    pub org_id: OrgId,
    /// Its attempts so far (the expired one included).
    pub attempts: u32,
    /// What became of it.
    pub outcome: ReleaseOutcome,
}

/// One attempt at a command: one claim and how it ended. Every attempt is kept with its
/// command (a requeue does not erase them); a claim handed back unused is not an attempt.
#[derive(Debug, Clone, PartialEq)]
pub struct Attempt {
    /// 1 for the first claim, counting on across requeues.
    pub number: u32,
    /// The agent that held the lease.
    pub agent_id: AgentId,
    /// When it was claimed.
    pub claimed_at: OffsetDateTime,
    /// When it ended; `None` while it runs.
    pub ended_at: Option<OffsetDateTime>,
    /// How it ended; `None` while it runs.
    pub outcome: Option<AttemptOutcome>,
    /// The error the agent reported, for a failed attempt.
    pub error: Option<Value>,
}

/// A command to create in a batch, with its idempotency key if it has one.
#[derive(Debug, Clone)]
pub struct NewCommandItem {
    /// The command.
    pub command: NewCommand,
    /// Its idempotency key and request hash.
    pub idempotency: Option<Idempotency>,
}
