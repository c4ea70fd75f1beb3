//! Model-based tests of the lease state machine.
//!
//! proptest (with `proptest-state-machine`) runs random sequences of operations against a real
//! store — creates (targeted at one of three agents or pooled on one of two queues, with
//! priorities, attempts, leases and due times), claims by the three agents with limits,
//! `next_due_at`, pausing and resuming queues, cordoning and uncordoning agents, heartbeats, completions (single and batched), failures (retryable or not),
//! hand-backs, clock moves, releases of expired leases (of the case's organisation or of all),
//! cancels, requeues and purges — and compares every answer with [`Model`], a small reference
//! model of the state machine written here. Reports name the current claim token, an earlier
//! one or a made-up one, sent by the holder or by another agent: fencing is the point. After
//! every step the stored state of every command (status, attempts, holder, lease, due time,
//! cancel flag, finish time) is compared with the model too, and so is the attempt history
//! (`list_attempts`) of each command the step changed (of every command every
//! [`ATTEMPTS_EVERY`] steps and at the end). On a difference proptest shrinks the sequence, and
//! the test prints the minimal failing one, step by step, with the commands, tokens and agents
//! each step names. A minimal sequence worth keeping becomes a plain test at the end of this
//! file ([`replay`] runs it on both backends).
//!
//! Both backends: SQLite on a temporary file, and PostgreSQL on a schema of its own (skipped
//! without `KEEL_TEST_POSTGRES_URL`, failing instead with `KEEL_REQUIRE_POSTGRES=1`). One store
//! serves all the cases of a test, each case in an organisation of its own: a case first
//! advances the clock an hour, releases every expired lease and purges every finished command
//! (so the store-wide release and purge it runs see only its own commands), then creates its
//! organisation and agents. This keeps a PostgreSQL case as cheap as a SQLite one (no schema
//! and migration per case), shrinking included.
//!
//! `PROPTEST_CASES` sets the number of cases per backend (default [`DEFAULT_CASES`]);
//! `MODEL_MAX_STEPS` bounds the length of a sequence (default [`DEFAULT_MAX_STEPS`]). The test
//! prints how often each operation got each kind of answer (`--nocapture`).
//!
//! What the store chooses and the model cannot know is checked, then learnt: the due time of a
//! retry (random within its backoff: it must lie in `[step/2, step]`), and which of several
//! leases expiring at the same instant (or commands finished at the same instant) a bounded
//! release (purge) takes (any of them, as long as none later is taken before them).
//! Broadcasts are not modelled (the conformance suite covers them).

// Test code: a failed expectation is meant to fail the test.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap};
use std::fmt::{self, Write as _};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use keel_store::conformance::START;
use keel_store::conformance::postgres::TestSchema;
use keel_store::{
    AgentId, AttemptOutcome, ClaimToken, Clock, Command, CommandFilter, CommandId, CommandStatus,
    ManualClock, NewCommand, OrgId, ReleaseOutcome, SqliteOptions, SqliteStore, Store, StoreError,
    Target,
};
use proptest::prelude::*;
use proptest::sample::{select, subsequence};
use proptest::test_runner::{Config, TestError, TestRunner};
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest};
use serde_json::json;
use time::{Duration, OffsetDateTime};

/// Cases per backend unless `PROPTEST_CASES` says otherwise.
const DEFAULT_CASES: u32 = 256;

/// The longest generated sequence unless `MODEL_MAX_STEPS` says otherwise.
const DEFAULT_MAX_STEPS: usize = 40;

/// The attempts of every command are compared after every this many steps, and at the end.
const ATTEMPTS_EVERY: usize = 4;

/// Agents per case; agent `n` is `agent-n`.
const AGENTS: usize = 3;

/// The queues pooled commands go to.
const QUEUES: [&str; 2] = ["q0", "q1"];

// --- operations ---

/// Who a command is for: an agent (by number) or a queue (by number).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tgt {
    Agent(usize),
    Queue(usize),
}

/// Which token a report presents.
#[derive(Clone, Copy, Debug)]
enum Tok {
    /// The one the latest claim of the command handed out (stale once that claim ended).
    Current,
    /// One of an earlier claim (the current one when there is no earlier).
    Earlier(usize),
    /// A token no claim handed out.
    Forged,
}

/// Which agent reports.
#[derive(Clone, Copy, Debug)]
enum By {
    /// The agent the token was handed to.
    Holder,
    /// Another agent of the organisation.
    Other,
}

/// A report (heartbeat, complete, fail, hand-back) on command number `cmd` (modulo the
/// commands created so far; a made-up id while there is none).
#[derive(Clone, Copy, Debug)]
struct Report {
    cmd: usize,
    tok: Tok,
    by: By,
}

/// One operation on the store.
#[derive(Clone, Debug)]
enum Op {
    Create {
        target: Tgt,
        priority: i32,
        max_attempts: u32,
        lease_secs: u64,
        /// Due this long after now (0: no `run_at`, due at creation).
        delay_secs: i64,
    },
    Claim {
        agent: usize,
        queues: Vec<usize>,
        limit: u32,
    },
    /// `pause_queue` (`on`) or `resume_queue`.
    Pause {
        queue: usize,
        on: bool,
    },
    /// `set_agent_cordoned`.
    Cordon {
        agent: usize,
        on: bool,
    },
    /// `next_due_at`: the earliest due time of what the agent could claim with the queues.
    NextDue {
        agent: usize,
        queues: Vec<usize>,
    },
    Heartbeat(Report),
    Complete(Report),
    /// `complete_batch` by one agent: the holder of the first report's token (or, with
    /// `by: Other`, another agent); each report names its command and token as a single
    /// report does.
    CompleteBatch {
        reports: Vec<(usize, Tok)>,
        by: By,
    },
    Fail {
        report: Report,
        retryable: bool,
    },
    HandBack(Report),
    Advance {
        secs: i64,
    },
    /// `release_expired_leases`, for the case's organisation or (`scoped: false`) for all.
    Release {
        scoped: bool,
        limit: u32,
    },
    Cancel {
        cmd: usize,
    },
    Requeue {
        cmd: usize,
    },
    /// `purge_finished` of what finished more than `age_secs` before now.
    Purge {
        age_secs: i64,
        limit: u32,
    },
}

impl Op {
    fn name(&self) -> &'static str {
        match self {
            Op::Create { .. } => "create",
            Op::Claim { .. } => "claim",
            Op::NextDue { .. } => "next_due",
            Op::Pause { .. } => "pause",
            Op::Cordon { .. } => "cordon",
            Op::Heartbeat(_) => "heartbeat",
            Op::Complete(_) => "complete",
            Op::CompleteBatch { .. } => "batch",
            Op::Fail { .. } => "fail",
            Op::HandBack(_) => "hand_back",
            Op::Advance { .. } => "advance",
            Op::Release { .. } => "release",
            Op::Cancel { .. } => "cancel",
            Op::Requeue { .. } => "requeue",
            Op::Purge { .. } => "purge",
        }
    }
}

/// A command number, most often one of `hot` (the commands an operation acts on in earnest),
/// else any of the `n` created.
fn some_command(hot: Vec<usize>, n: usize) -> BoxedStrategy<usize> {
    if hot.is_empty() {
        (0..n).boxed()
    } else {
        prop_oneof![4 => select(hot), 1 => 0..n].boxed()
    }
}

/// The operations to draw from `state`: any operation on any command can come at any time,
/// but reports mostly name executing commands and requeues mostly dead or failed ones, so that
/// the interesting paths are reached often.
fn ops(state: &Model) -> BoxedStrategy<Op> {
    use CommandStatus::*;
    let n = state.cmds.len().max(1);
    let with = |statuses: &[CommandStatus]| -> Vec<usize> {
        (0..state.cmds.len())
            .filter(|&i| !state.cmds[i].purged && statuses.contains(&state.cmds[i].status))
            .collect()
    };
    let tok = prop_oneof![
        6 => Just(Tok::Current),
        2 => (0..4usize).prop_map(Tok::Earlier),
        1 => Just(Tok::Forged),
    ];
    let by = prop_oneof![5 => Just(By::Holder), 1 => Just(By::Other)];
    let report = (some_command(with(&[Executing]), n), tok.clone(), by.clone())
        .prop_map(|(cmd, tok, by)| Report { cmd, tok, by });
    let batch = (
        prop::collection::vec((some_command(with(&[Executing]), n), tok), 1..=4),
        by,
    )
        .prop_map(|(reports, by)| Op::CompleteBatch { reports, by });
    let target = prop_oneof![
        (0..AGENTS).prop_map(Tgt::Agent),
        (0..QUEUES.len()).prop_map(Tgt::Queue),
    ];
    let create = (
        target,
        0..3i32,
        1..=3u32,
        select(vec![2u64, 10, 30]),
        select(vec![0i64, 0, 0, 5, 20]),
    )
        .prop_map(
            |(target, priority, max_attempts, lease_secs, delay_secs)| Op::Create {
                target,
                priority,
                max_attempts,
                lease_secs,
                delay_secs,
            },
        );
    let queues = prop_oneof![
        2 => Just(vec![0usize, 1]),
        1 => subsequence(vec![0usize, 1], 0..=2),
    ];
    // Mostly an agent with a targeted command due, when there is one.
    let due_for: Vec<usize> = state
        .cmds
        .iter()
        .filter(|c| !c.purged && c.status == Pending && c.run_at <= state.now)
        .filter_map(|c| match c.target {
            Tgt::Agent(a) => Some(a),
            Tgt::Queue(_) => None,
        })
        .collect();
    let agent = if due_for.is_empty() {
        (0..AGENTS).boxed()
    } else {
        prop_oneof![2 => select(due_for), 1 => 0..AGENTS].boxed()
    };
    let claim = (agent, queues, 1..=3u32).prop_map(|(agent, queues, limit)| Op::Claim {
        agent,
        queues,
        limit,
    });
    let executing = with(&[Executing]);
    let expired = executing.iter().any(|&i| {
        state.cmds[i]
            .lease_expires_at
            .is_some_and(|at| at < state.now)
    });
    let weight = |hot: bool, w: u32| if hot { w } else { 1 };
    let reports = !executing.is_empty();
    prop_oneof![
        weight(state.cmds.len() < 3, 3) * 3 => create,
        5 => claim,
        1 => (0..AGENTS, subsequence(vec![0usize, 1], 0..=2))
            .prop_map(|(agent, queues)| Op::NextDue { agent, queues }),
        1 => (0..QUEUES.len(), any::<bool>()).prop_map(|(queue, on)| Op::Pause { queue, on }),
        1 => (0..AGENTS, any::<bool>()).prop_map(|(agent, on)| Op::Cordon { agent, on }),
        weight(reports, 2) => report.clone().prop_map(Op::Heartbeat),
        weight(reports, 3) => report.clone().prop_map(Op::Complete),
        weight(reports, 2) => batch,
        weight(reports, 3) => (report.clone(), any::<bool>())
            .prop_map(|(report, retryable)| Op::Fail { report, retryable }),
        weight(reports, 2) => report.prop_map(Op::HandBack),
        3 => select(vec![1i64, 2, 3, 5, 10, 30, 300]).prop_map(|secs| Op::Advance { secs }),
        weight(expired, 4) => (any::<bool>(), 1..=3u32)
            .prop_map(|(scoped, limit)| Op::Release { scoped, limit }),
        2 => some_command(with(&[Pending, Executing]), n).prop_map(|cmd| Op::Cancel { cmd }),
        weight(!with(&[Dead, Failed]).is_empty(), 3)
            => some_command(with(&[Dead, Failed]), n).prop_map(|cmd| Op::Requeue { cmd }),
        1 => (select(vec![0i64, 1, 10, 60]), 1..=3u32)
            .prop_map(|(age_secs, limit)| Op::Purge { age_secs, limit }),
    ]
    .boxed()
}

// --- the model ---

/// One command as the model sees it. Times are offsets from the case's start.
#[derive(Clone, Debug, PartialEq)]
struct Cmd {
    target: Tgt,
    priority: i32,
    max_attempts: u32,
    lease: Duration,
    status: CommandStatus,
    attempts: u32,
    run_at: Duration,
    lease_expires_at: Option<Duration>,
    claimed_by: Option<usize>,
    /// The agent each claim's token went to, in claim order (a hand-back included).
    holders: Vec<usize>,
    /// The claim whose token fences the command now (while executing).
    current: Option<usize>,
    /// Its attempts, first first (attempt `n` at `n - 1`).
    history: Vec<Try>,
    cancel_requested: bool,
    finished_at: Option<Duration>,
    purged: bool,
}

/// One attempt at a command, as the model and `list_attempts` are compared on.
#[derive(Clone, Debug, PartialEq)]
struct Try {
    agent: usize,
    claimed_at: At,
    ended_at: Option<At>,
    outcome: Option<AttemptOutcome>,
}

/// An instant as its offset from the case's start, shown as `12.5s`.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct At(Duration);

impl fmt::Debug for At {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// What the model and the store are compared on, for one command.
#[derive(Clone, Debug, PartialEq)]
struct View {
    status: CommandStatus,
    attempts: u32,
    run_at: At,
    lease_expires_at: Option<At>,
    claimed_by: Option<usize>,
    cancel_requested: bool,
    finished_at: Option<At>,
}

/// A refusal.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    NotFound,
    StaleClaim,
    InvalidState,
}

/// An answer of one operation, as compared.
#[derive(Clone, Debug, PartialEq)]
enum Answer {
    Done,
    Created(View),
    /// Command numbers in the order handed out, each as it is after the claim.
    Claimed(Vec<(usize, View)>),
    /// `next_due_at` when nothing the agent could claim is due: the earliest due time.
    Due(Option<At>),
    /// Paused or cordoned since (`None`: not).
    Since(Option<At>),
    /// `resume_queue`: whether it was paused.
    Was(bool),
    /// `next_due_at` when something is due: any instant up to now (the store says now, or
    /// the due time of one that waits to be taken).
    DueNow,
    Lease {
        expires_at: At,
        cancel_requested: bool,
    },
    Command(View),
    /// One answer per report, in order.
    Batch(Vec<Answer>),
    Count(u64),
    /// By command number.
    Released(Vec<(usize, ReleaseOutcome, u32)>),
    Refused(Kind),
    /// An error the model never gives.
    Unexpected(String),
}

impl Answer {
    /// The answer's kind, for the tally.
    fn name(&self) -> String {
        match self {
            Answer::Done => "done".into(),
            Answer::Created(_) => "created".into(),
            Answer::Claimed(got) => format!("claimed {}", got.len()),
            Answer::Due(due) => if due.is_some() { "later" } else { "none" }.into(),
            Answer::DueNow => "now".into(),
            Answer::Since(since) => if since.is_some() { "on" } else { "off" }.into(),
            Answer::Was(was) => format!("was paused: {was}"),
            Answer::Lease { .. } => "renewed".into(),
            Answer::Command(c) => format!("ok: {}", c.status),
            Answer::Batch(answers) => {
                let done = answers
                    .iter()
                    .filter(|a| matches!(a, Answer::Command(_)))
                    .count();
                format!("{done} of {} completed", answers.len())
            }
            Answer::Count(n) => format!("count {n}"),
            Answer::Released(got) => format!("released {}", got.len()),
            Answer::Refused(kind) => format!("{kind:?}"),
            Answer::Unexpected(_) => "unexpected".into(),
        }
    }
}

/// Which commands a bounded release or purge must take: all of `sure`, and `from_tie` of
/// `tie` (they share the instant at the limit, in an order the store is free to choose).
#[derive(Debug)]
struct Plan {
    sure: Vec<usize>,
    tie: Vec<usize>,
    from_tie: usize,
}

impl Plan {
    /// `candidates` as (instant, command number), `limit` at most taken, earliest first.
    fn new(mut candidates: Vec<(Duration, usize)>, limit: u32) -> Self {
        candidates.sort();
        let take = candidates.len().min(limit as usize);
        if take == candidates.len() {
            return Plan {
                sure: candidates.into_iter().map(|(_, i)| i).collect(),
                tie: Vec::new(),
                from_tie: 0,
            };
        }
        let edge = candidates[take - 1].0;
        let sure: Vec<usize> = candidates
            .iter()
            .filter(|(at, _)| *at < edge)
            .map(|(_, i)| *i)
            .collect();
        let tie: Vec<usize> = candidates
            .iter()
            .filter(|(at, _)| *at == edge)
            .map(|(_, i)| *i)
            .collect();
        let from_tie = take - sure.len();
        Plan {
            sure,
            tie,
            from_tie,
        }
    }

    fn first_choice(&self) -> Vec<usize> {
        let mut chosen = self.sure.clone();
        chosen.extend(self.tie.iter().take(self.from_tie));
        chosen
    }

    /// Whether `chosen` is a choice the plan allows.
    fn allows(&self, chosen: &[usize]) -> bool {
        let mut chosen = chosen.to_vec();
        chosen.sort_unstable();
        chosen.dedup();
        chosen.len() == self.sure.len() + self.from_tie
            && self.sure.iter().all(|i| chosen.contains(i))
            && chosen
                .iter()
                .filter(|i| !self.sure.contains(i))
                .all(|i| self.tie.contains(i))
    }
}

/// The reference model: the clock (from the case's start) and every command created, in
/// creation order.
#[derive(Clone, Debug, Default)]
struct Model {
    now: Duration,
    cmds: Vec<Cmd>,
    /// Since when each queue is paused.
    paused: [Option<Duration>; QUEUES.len()],
    /// Since when each agent is cordoned.
    cordoned: [Option<Duration>; AGENTS],
}

/// A report resolved against the model: the command number (none while there is none), the
/// claim whose token it presents (none for a made-up token), and the reporting agent.
struct Resolved {
    cmd: Option<usize>,
    token: Option<usize>,
    agent: usize,
}

/// The backoff ceiling after `attempts` attempts: 5 s, doubling, at most 600 s.
fn backoff_step(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(10);
    Duration::seconds((5i64 << exp).min(600))
}

impl Model {
    /// `op` with the command, token and agents it resolves to here (before it applies).
    fn describe(&self, op: &Op) -> String {
        let command = |cmd: usize| {
            self.pick(cmd).map_or_else(
                || "no command yet: a made-up id".to_owned(),
                |i| format!("command {i}"),
            )
        };
        match op {
            Op::Heartbeat(r) | Op::Complete(r) | Op::HandBack(r) | Op::Fail { report: r, .. } => {
                let resolved = self.resolve(r);
                let token = match (resolved.cmd, resolved.token) {
                    (Some(i), Some(t)) => {
                        format!(
                            "the token of its claim {} (to agent {})",
                            t + 1,
                            self.cmds[i].holders[t]
                        )
                    }
                    _ => "a made-up token".to_owned(),
                };
                format!(
                    "{op:?}: {}, {token}, sent by agent {}",
                    command(r.cmd),
                    resolved.agent
                )
            }
            Op::CompleteBatch { reports, by } => {
                let resolved = self.resolve_batch(reports, *by);
                let named: Vec<String> = resolved
                    .iter()
                    .map(|r| match (r.cmd, r.token) {
                        (Some(i), Some(t)) => format!("command {i} with its claim {}", t + 1),
                        (Some(i), None) => format!("command {i} with a made-up token"),
                        _ => "a made-up id".to_owned(),
                    })
                    .collect();
                format!(
                    "{op:?}: {}, sent by agent {}",
                    named.join("; "),
                    resolved[0].agent
                )
            }
            Op::Cancel { cmd } | Op::Requeue { cmd } => format!("{op:?}: {}", command(*cmd)),
            Op::Create { .. } => format!("{op:?}: command {}", self.cmds.len()),
            _ => format!("{op:?}"),
        }
    }

    /// Whether `agent`, claiming with `queues`, may take `c`: not cordoned, and `c` is its own
    /// or on one of the queues that is not paused.
    fn serves(&self, c: &Cmd, agent: usize, queues: &[usize]) -> bool {
        self.cordoned[agent].is_none()
            && match c.target {
                Tgt::Agent(a) => a == agent,
                Tgt::Queue(q) => queues.contains(&q) && self.paused[q].is_none(),
            }
    }

    fn pick(&self, cmd: usize) -> Option<usize> {
        (!self.cmds.is_empty()).then(|| cmd % self.cmds.len())
    }

    fn resolve(&self, r: &Report) -> Resolved {
        let Some(i) = self.pick(r.cmd) else {
            return Resolved {
                cmd: None,
                token: None,
                agent: 0,
            };
        };
        let claims = self.cmds[i].holders.len();
        let token = match r.tok {
            _ if claims == 0 => None,
            Tok::Forged => None,
            Tok::Current => Some(claims - 1),
            Tok::Earlier(k) if claims >= 2 => Some(k % (claims - 1)),
            Tok::Earlier(_) => Some(claims - 1),
        };
        let holder = token.map_or(0, |t| self.cmds[i].holders[t]);
        let agent = match r.by {
            By::Holder => holder,
            By::Other => (holder + 1) % AGENTS,
        };
        Resolved {
            cmd: Some(i),
            token,
            agent,
        }
    }

    /// The command a report may act on: executing under the presented token, reported by its
    /// holder.
    fn fenced(&self, r: &Report) -> Result<usize, Kind> {
        self.fence(&self.resolve(r))
    }

    /// The reports of a batch, resolved, each sent by the batch's agent.
    fn resolve_batch(&self, reports: &[(usize, Tok)], by: By) -> Vec<Resolved> {
        let mut agent = None;
        reports
            .iter()
            .map(|&(cmd, tok)| {
                let mut r = self.resolve(&Report { cmd, tok, by });
                r.agent = *agent.get_or_insert(r.agent);
                r
            })
            .collect()
    }

    fn fence(&self, r: &Resolved) -> Result<usize, Kind> {
        let Some(i) = r.cmd else {
            return Err(Kind::NotFound);
        };
        let c = &self.cmds[i];
        if c.purged {
            Err(Kind::NotFound)
        } else if c.status == CommandStatus::Executing
            && r.token.is_some()
            && c.current == r.token
            && c.claimed_by == Some(r.agent)
        {
            Ok(i)
        } else {
            Err(Kind::StaleClaim)
        }
    }

    fn view(&self, i: usize) -> View {
        let c = &self.cmds[i];
        View {
            status: c.status,
            attempts: c.attempts,
            run_at: At(c.run_at),
            lease_expires_at: c.lease_expires_at.map(At),
            claimed_by: c.claimed_by,
            cancel_requested: c.cancel_requested,
            finished_at: c.finished_at.map(At),
        }
    }

    /// The commands not purged, as the store should list them.
    fn views(&self) -> Vec<(usize, View)> {
        (0..self.cmds.len())
            .filter(|&i| !self.cmds[i].purged)
            .map(|i| (i, self.view(i)))
            .collect()
    }

    fn release_plan(&self, limit: u32) -> Plan {
        let now = self.now;
        Plan::new(
            self.cmds
                .iter()
                .enumerate()
                .filter(|(_, c)| !c.purged && c.status == CommandStatus::Executing)
                .filter_map(|(i, c)| c.lease_expires_at.filter(|at| *at < now).map(|at| (at, i)))
                .collect(),
            limit,
        )
    }

    fn purge_plan(&self, age_secs: i64, limit: u32) -> Plan {
        let before = self.now - Duration::seconds(age_secs);
        Plan::new(
            self.cmds
                .iter()
                .enumerate()
                .filter(|(_, c)| !c.purged && c.status.is_terminal())
                .filter_map(|(i, c)| c.finished_at.filter(|at| *at < before).map(|at| (at, i)))
                .collect(),
            limit,
        )
    }

    /// Ends the current claim (if any) and finishes the command as `status`, now.
    fn finish(&mut self, i: usize, status: CommandStatus) {
        let now = self.now;
        let c = &mut self.cmds[i];
        c.status = status;
        c.finished_at = Some(now);
        c.current = None;
        c.lease_expires_at = None;
    }

    /// Ends the running attempt with `outcome`, now.
    fn end_attempt(&mut self, i: usize, outcome: AttemptOutcome) {
        let now = self.now;
        let last = self.cmds[i].history.last_mut().expect("an attempt runs");
        last.ended_at = Some(At(now));
        last.outcome = Some(outcome);
    }

    /// Back to pending, due at `run_at`, its claim ended.
    fn pend(&mut self, i: usize, run_at: Duration) {
        let c = &mut self.cmds[i];
        c.status = CommandStatus::Pending;
        c.run_at = run_at;
        c.current = None;
        c.lease_expires_at = None;
        c.finished_at = None;
    }

    /// Applies `op` and returns the answer the store must give. `chosen` is what a release or
    /// purge took (a choice its plan allows; the plan's first when `None`). A retry is made
    /// due at its backoff's ceiling: the caller learns the store's instant.
    fn apply(&mut self, op: &Op, chosen: Option<&[usize]>) -> Answer {
        use CommandStatus::*;
        let now = self.now;
        match op {
            Op::Create {
                target,
                priority,
                max_attempts,
                lease_secs,
                delay_secs,
            } => {
                self.cmds.push(Cmd {
                    target: *target,
                    priority: *priority,
                    max_attempts: *max_attempts,
                    lease: Duration::seconds(i64::try_from(*lease_secs).unwrap()),
                    status: Pending,
                    attempts: 0,
                    run_at: now + Duration::seconds(*delay_secs),
                    lease_expires_at: None,
                    claimed_by: None,
                    holders: Vec::new(),
                    history: Vec::new(),
                    current: None,
                    cancel_requested: false,
                    finished_at: None,
                    purged: false,
                });
                Answer::Created(self.view(self.cmds.len() - 1))
            }
            Op::Claim {
                agent,
                queues,
                limit,
            } => {
                let mut due: Vec<usize> = (0..self.cmds.len())
                    .filter(|&i| {
                        let c = &self.cmds[i];
                        !c.purged
                            && c.status == Pending
                            && c.run_at <= now
                            && self.serves(c, *agent, queues)
                    })
                    .collect();
                due.sort_by_key(|&i| {
                    let c = &self.cmds[i];
                    (std::cmp::Reverse(c.priority), c.run_at, i)
                });
                due.truncate(*limit as usize);
                for &i in &due {
                    let c = &mut self.cmds[i];
                    c.status = Executing;
                    c.attempts += 1;
                    c.holders.push(*agent);
                    c.history.push(Try {
                        agent: *agent,
                        claimed_at: At(now),
                        ended_at: None,
                        outcome: None,
                    });
                    c.current = Some(c.holders.len() - 1);
                    c.claimed_by = Some(*agent);
                    c.lease_expires_at = Some(now + c.lease);
                }
                Answer::Claimed(due.iter().map(|&i| (i, self.view(i))).collect())
            }
            Op::Pause { queue, on: true } => {
                let since = *self.paused[*queue].get_or_insert(now);
                Answer::Since(Some(At(since)))
            }
            Op::Pause { queue, on: false } => Answer::Was(self.paused[*queue].take().is_some()),
            Op::Cordon { agent, on } => {
                let since = &mut self.cordoned[*agent];
                if *on {
                    since.get_or_insert(now);
                } else {
                    *since = None;
                }
                Answer::Since(since.map(At))
            }
            Op::NextDue { agent, .. } if self.cordoned[*agent].is_some() => Answer::Due(None),
            Op::NextDue { agent, queues } => {
                let due = self
                    .cmds
                    .iter()
                    .filter(|c| !c.purged && c.status == Pending && self.serves(c, *agent, queues))
                    .map(|c| c.run_at)
                    .min();
                match due {
                    Some(at) if at <= now => Answer::DueNow,
                    due => Answer::Due(due.map(At)),
                }
            }
            Op::Heartbeat(r) => match self.fenced(r) {
                Ok(i) => {
                    let c = &mut self.cmds[i];
                    c.lease_expires_at = Some(now + c.lease);
                    Answer::Lease {
                        expires_at: At(now + c.lease),
                        cancel_requested: c.cancel_requested,
                    }
                }
                Err(kind) => Answer::Refused(kind),
            },
            Op::Complete(r) => match self.fenced(r) {
                Ok(i) => {
                    self.end_attempt(i, AttemptOutcome::Completed);
                    self.finish(i, Completed);
                    Answer::Command(self.view(i))
                }
                Err(kind) => Answer::Refused(kind),
            },
            Op::CompleteBatch { reports, by } => {
                let answers = self
                    .resolve_batch(reports, *by)
                    .iter()
                    .map(|r| match self.fence(r) {
                        Ok(i) => {
                            self.end_attempt(i, AttemptOutcome::Completed);
                            self.finish(i, Completed);
                            Answer::Command(self.view(i))
                        }
                        Err(kind) => Answer::Refused(kind),
                    })
                    .collect();
                Answer::Batch(answers)
            }
            Op::Fail { report, retryable } => match self.fenced(report) {
                Ok(i) => {
                    let c = &self.cmds[i];
                    if c.cancel_requested {
                        self.end_attempt(i, AttemptOutcome::Cancelled);
                        self.finish(i, Cancelled);
                    } else if *retryable && c.attempts < c.max_attempts {
                        let run_at = now + backoff_step(c.attempts);
                        self.end_attempt(i, AttemptOutcome::Retry);
                        self.pend(i, run_at);
                    } else {
                        self.end_attempt(i, AttemptOutcome::Failed);
                        self.finish(i, Failed);
                    }
                    Answer::Command(self.view(i))
                }
                Err(kind) => Answer::Refused(kind),
            },
            Op::HandBack(r) => match self.fenced(r) {
                Ok(i) if self.cmds[i].cancel_requested => {
                    self.end_attempt(i, AttemptOutcome::Cancelled);
                    self.finish(i, Cancelled);
                    Answer::Count(0)
                }
                Ok(i) => {
                    let run_at = self.cmds[i].run_at;
                    self.pend(i, run_at);
                    self.cmds[i].attempts -= 1;
                    self.cmds[i].history.pop();
                    Answer::Count(1)
                }
                Err(_) => Answer::Count(0),
            },
            Op::Advance { secs } => {
                self.now += Duration::seconds(*secs);
                Answer::Done
            }
            Op::Release { limit, .. } => {
                let chosen = chosen.map_or_else(
                    || self.release_plan(*limit).first_choice(),
                    <[usize]>::to_vec,
                );
                let mut released = Vec::new();
                for i in chosen {
                    let c = &self.cmds[i];
                    let outcome = if c.cancel_requested {
                        self.end_attempt(i, AttemptOutcome::Cancelled);
                        self.finish(i, Cancelled);
                        ReleaseOutcome::Cancelled
                    } else if c.attempts < c.max_attempts {
                        self.end_attempt(i, AttemptOutcome::LeaseExpired);
                        self.pend(i, now);
                        ReleaseOutcome::Requeued
                    } else {
                        self.end_attempt(i, AttemptOutcome::LeaseExpired);
                        self.finish(i, Dead);
                        ReleaseOutcome::Dead
                    };
                    released.push((i, outcome, self.cmds[i].attempts));
                }
                released.sort_by_key(|r| r.0);
                Answer::Released(released)
            }
            Op::Cancel { cmd } => match self.pick(*cmd) {
                Some(i) if !self.cmds[i].purged => match self.cmds[i].status {
                    Pending => {
                        self.finish(i, Cancelled);
                        Answer::Command(self.view(i))
                    }
                    Executing => {
                        self.cmds[i].cancel_requested = true;
                        Answer::Command(self.view(i))
                    }
                    _ => Answer::Refused(Kind::InvalidState),
                },
                _ => Answer::Refused(Kind::NotFound),
            },
            Op::Requeue { cmd } => match self.pick(*cmd) {
                Some(i) if !self.cmds[i].purged => match self.cmds[i].status {
                    Dead | Failed => {
                        self.pend(i, now);
                        let c = &mut self.cmds[i];
                        c.attempts = 0;
                        c.cancel_requested = false;
                        Answer::Command(self.view(i))
                    }
                    _ => Answer::Refused(Kind::InvalidState),
                },
                _ => Answer::Refused(Kind::NotFound),
            },
            Op::Purge { age_secs, limit } => {
                let chosen = chosen.map_or_else(
                    || self.purge_plan(*age_secs, *limit).first_choice(),
                    <[usize]>::to_vec,
                );
                for &i in &chosen {
                    self.cmds[i].purged = true;
                }
                Answer::Count(chosen.len() as u64)
            }
        }
    }
}

// --- the store under test ---

/// The backend a test runs its cases on: one store, its clock, and the runtime it lives in.
struct Backend {
    store: Arc<dyn Store>,
    clock: Arc<ManualClock>,
    /// Cases so far (each names its organisation after its number).
    cases: Cell<u32>,
    /// How often each operation got each kind of answer, to show what the cases reached.
    tally: RefCell<BTreeMap<String, u64>>,
    /// The temporary directory or schema; dropped after the store.
    _guard: Box<dyn std::any::Any>,
    /// Dropped last.
    rt: tokio::runtime::Runtime,
}

thread_local! {
    /// The backend of the test running on this thread (proptest runs its cases on it).
    static BACKEND: RefCell<Option<Rc<Backend>>> = const { RefCell::new(None) };
}

/// One case: its organisation and agents, the ids and tokens the store gave, and the model
/// (the copy that learns the store's free choices).
struct Sut {
    backend: Rc<Backend>,
    org: OrgId,
    agents: Vec<AgentId>,
    start: OffsetDateTime,
    ids: Vec<CommandId>,
    numbers: HashMap<CommandId, usize>,
    /// Per command, the token of each claim, in claim order.
    tokens: Vec<Vec<ClaimToken>>,
    model: Model,
    step: usize,
}

fn refused(err: StoreError) -> Answer {
    match err {
        StoreError::NotFound => Answer::Refused(Kind::NotFound),
        StoreError::StaleClaim => Answer::Refused(Kind::StaleClaim),
        StoreError::InvalidState(_) => Answer::Refused(Kind::InvalidState),
        other => Answer::Unexpected(format!("{other:?}")),
    }
}

impl Sut {
    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.backend.rt.block_on(f)
    }

    fn store(&self) -> &dyn Store {
        &*self.backend.store
    }

    fn number(&self, id: CommandId) -> usize {
        *self.numbers.get(&id).unwrap_or_else(|| {
            panic!(
                "step {}: the store named {id}, no command of this case",
                self.step
            )
        })
    }

    fn agent_number(&self, id: AgentId) -> usize {
        self.agents
            .iter()
            .position(|a| *a == id)
            .unwrap_or_else(|| panic!("step {}: unknown agent {id}", self.step))
    }

    fn at(&self, offset: Duration) -> OffsetDateTime {
        self.start + offset
    }

    fn view(&self, c: &Command) -> View {
        View {
            status: c.status,
            attempts: c.attempts,
            run_at: At(c.run_at - self.start),
            lease_expires_at: c.lease_expires_at.map(|at| At(at - self.start)),
            claimed_by: c.claimed_by.map(|a| self.agent_number(a)),
            cancel_requested: c.cancel_requested,
            finished_at: c.finished_at.map(|at| At(at - self.start)),
        }
    }

    fn id_of(&self, cmd: Option<usize>) -> CommandId {
        cmd.map_or_else(CommandId::new, |i| self.ids[i])
    }

    /// The store's arguments for a report: command id, token and agent.
    fn report(&self, r: &Report) -> (CommandId, ClaimToken, AgentId) {
        let resolved = self.model.resolve(r);
        let (id, token) = self.arguments(&resolved);
        (id, token, self.agents[resolved.agent])
    }

    /// The command id and token a resolved report names.
    fn arguments(&self, r: &Resolved) -> (CommandId, ClaimToken) {
        let token = match (r.cmd, r.token) {
            (Some(i), Some(t)) => self.tokens[i][t].clone(),
            _ => ClaimToken(uuid::Uuid::new_v4().simple().to_string()),
        };
        (self.id_of(r.cmd), token)
    }

    fn answer<T>(&self, result: Result<T, StoreError>, ok: impl FnOnce(T) -> Answer) -> Answer {
        result.map_or_else(refused, ok)
    }

    /// Runs `op` on the store; returns (the model's answer, the store's).
    fn run(&mut self, op: &Op) -> (Answer, Answer) {
        let org = self.org;
        match op {
            Op::Create {
                target,
                priority,
                max_attempts,
                lease_secs,
                delay_secs,
            } => {
                let target = match target {
                    Tgt::Agent(a) => Target::Agent(self.agents[*a]),
                    Tgt::Queue(q) => Target::Queue(QUEUES[*q].to_owned()),
                };
                let mut command = NewCommand::new("run", target, json!({}));
                command.priority = *priority;
                command.max_attempts = *max_attempts;
                command.lease_duration = StdDuration::from_secs(*lease_secs);
                command.run_at = (*delay_secs > 0)
                    .then(|| self.at(self.model.now + Duration::seconds(*delay_secs)));
                let result = self.block_on(self.store().create_command(org, command, None));
                let actual = match result {
                    Ok(created) => {
                        let id = created.command.id;
                        self.numbers.insert(id, self.ids.len());
                        self.ids.push(id);
                        self.tokens.push(Vec::new());
                        Answer::Created(self.view(&created.command))
                    }
                    Err(err) => refused(err),
                };
                (self.model.apply(op, None), actual)
            }
            Op::Claim {
                agent,
                queues,
                limit,
            } => {
                let names: Vec<String> = queues.iter().map(|q| QUEUES[*q].to_owned()).collect();
                let result =
                    self.block_on(self.store().claim(org, self.agents[*agent], &names, *limit));
                let actual = match result {
                    Ok(claimed) => {
                        let mut got = Vec::new();
                        for c in claimed {
                            let i = self.number(c.command.id);
                            assert_eq!(
                                Some(c.lease_expires_at),
                                c.command.lease_expires_at,
                                "step {}: a claim's lease differs from its command's",
                                self.step
                            );
                            self.tokens[i].push(c.claim_token);
                            got.push((i, self.view(&c.command)));
                        }
                        Answer::Claimed(got)
                    }
                    Err(err) => refused(err),
                };
                (self.model.apply(op, None), actual)
            }
            Op::Pause { queue, on } => {
                let name = QUEUES[*queue];
                let actual = if *on {
                    let result = self.block_on(self.store().pause_queue(org, name));
                    self.answer(result, |p| {
                        Answer::Since(Some(At(p.paused_at - self.start)))
                    })
                } else {
                    let result = self.block_on(self.store().resume_queue(org, name));
                    self.answer(result, Answer::Was)
                };
                (self.model.apply(op, None), actual)
            }
            Op::Cordon { agent, on } => {
                let result = self.block_on(self.store().set_agent_cordoned(
                    org,
                    self.agents[*agent],
                    *on,
                ));
                let actual = self.answer(result, |a| {
                    Answer::Since(a.cordoned_at.map(|at| At(at - self.start)))
                });
                (self.model.apply(op, None), actual)
            }
            Op::NextDue { agent, queues } => {
                let names: Vec<String> = queues.iter().map(|q| QUEUES[*q].to_owned()).collect();
                let result =
                    self.block_on(self.store().next_due_at(org, self.agents[*agent], &names));
                let now = self.model.now;
                let actual = self.answer(result, |due| match due.map(|at| at - self.start) {
                    Some(at) if at <= now => Answer::DueNow,
                    due => Answer::Due(due.map(At)),
                });
                (self.model.apply(op, None), actual)
            }
            Op::Heartbeat(r) => {
                let (id, token, agent) = self.report(r);
                let result = self.block_on(self.store().heartbeat(
                    org,
                    agent,
                    id,
                    &token,
                    Some(json!({"step": self.step})),
                ));
                let actual = self.answer(result, |lease| Answer::Lease {
                    expires_at: At(lease.expires_at - self.start),
                    cancel_requested: lease.cancel_requested,
                });
                (self.model.apply(op, None), actual)
            }
            Op::Complete(r) => {
                let (id, token, agent) = self.report(r);
                let result =
                    self.block_on(self.store().complete(org, agent, id, &token, json!("ok")));
                let actual = self.answer(result, |c| Answer::Command(self.view(&c)));
                (self.model.apply(op, None), actual)
            }
            Op::CompleteBatch { reports, by } => {
                let resolved = self.model.resolve_batch(reports, *by);
                let agent = self.agents[resolved[0].agent];
                let reports = resolved
                    .iter()
                    .map(|r| {
                        let (id, token) = self.arguments(r);
                        (id, token, json!("ok"))
                    })
                    .collect();
                let result = self.block_on(self.store().complete_batch(org, agent, reports));
                let actual = self.answer(result, |answers| {
                    Answer::Batch(
                        answers
                            .into_iter()
                            .map(|a| self.answer(a, |c| Answer::Command(self.view(&c))))
                            .collect(),
                    )
                });
                (self.model.apply(op, None), actual)
            }
            Op::Fail { report, retryable } => {
                let (id, token, agent) = self.report(report);
                let result = self.block_on(self.store().fail(
                    org,
                    agent,
                    id,
                    &token,
                    json!("boom"),
                    *retryable,
                ));
                let actual = self.answer(result, |c| Answer::Command(self.view(&c)));
                let now = self.model.now;
                let mut expected = self.model.apply(op, None);
                // A retry: due at a random instant within its backoff, which the model learns.
                if let (Answer::Command(want), Answer::Command(got)) = (&mut expected, &actual)
                    && want.status == CommandStatus::Pending
                    && got.status == CommandStatus::Pending
                {
                    let ceiling = want.run_at.0;
                    let floor = now + (ceiling - now) / 2;
                    assert!(
                        got.run_at.0 >= floor && got.run_at.0 <= ceiling,
                        "step {}: {op:?}: the retry is due at {:?}, outside its backoff [{floor}, {ceiling}]",
                        self.step,
                        got.run_at
                    );
                    want.run_at = got.run_at;
                    let i = self.number(id);
                    self.model.cmds[i].run_at = got.run_at.0;
                }
                (expected, actual)
            }
            Op::HandBack(r) => {
                let (id, token, agent) = self.report(r);
                let result = self.block_on(self.store().hand_back(org, agent, vec![(id, token)]));
                let actual = self.answer(result, Answer::Count);
                (self.model.apply(op, None), actual)
            }
            Op::Advance { secs } => {
                self.backend.clock.advance(Duration::seconds(*secs));
                (self.model.apply(op, None), Answer::Done)
            }
            Op::Release { scoped, limit } => {
                let plan = self.model.release_plan(*limit);
                let result = self.block_on(
                    self.store()
                        .release_expired_leases(scoped.then_some(org), *limit),
                );
                match result {
                    Ok(released) => {
                        let mut got: Vec<_> = released
                            .iter()
                            .map(|r| {
                                assert_eq!(
                                    r.org_id, org,
                                    "step {}: released in another organisation",
                                    self.step
                                );
                                (self.number(r.command_id), r.outcome, r.attempts)
                            })
                            .collect();
                        got.sort_by_key(|r| r.0);
                        let chosen: Vec<usize> = got.iter().map(|r| r.0).collect();
                        assert!(
                            plan.allows(&chosen),
                            "step {}: {op:?}: released {chosen:?}; the model allows {plan:?} \
                             (earliest expiry first)",
                            self.step
                        );
                        (self.model.apply(op, Some(&chosen)), Answer::Released(got))
                    }
                    Err(err) => (self.model.apply(op, None), refused(err)),
                }
            }
            Op::Cancel { cmd } => {
                let id = self.id_of(self.model.pick(*cmd));
                let result = self.block_on(self.store().cancel_command(org, id));
                let actual = self.answer(result, |c| Answer::Command(self.view(&c)));
                (self.model.apply(op, None), actual)
            }
            Op::Requeue { cmd } => {
                let id = self.id_of(self.model.pick(*cmd));
                let result = self.block_on(self.store().requeue(org, id));
                let actual = self.answer(result, |c| Answer::Command(self.view(&c)));
                (self.model.apply(op, None), actual)
            }
            Op::Purge { age_secs, limit } => {
                let plan = self.model.purge_plan(*age_secs, *limit);
                let before = self.at(self.model.now - Duration::seconds(*age_secs));
                let result = self.block_on(self.store().purge_finished(before, *limit));
                match result {
                    Ok(count) => {
                        // Which of the commands finished at the limit's instant went.
                        let mut chosen = plan.sure.clone();
                        for &i in &plan.tie {
                            let got = self.block_on(self.store().get_command(org, self.ids[i]));
                            if got.unwrap().is_none() {
                                chosen.push(i);
                            }
                        }
                        assert!(
                            plan.allows(&chosen),
                            "step {}: {op:?}: purged {chosen:?} (of those at the limit); \
                             the model allows {plan:?} (oldest first)",
                            self.step
                        );
                        (self.model.apply(op, Some(&chosen)), Answer::Count(count))
                    }
                    Err(err) => (self.model.apply(op, None), refused(err)),
                }
            }
        }
    }

    /// Compares every command's attempts (`list_attempts`) with the model's.
    fn check_attempts(&self) {
        for i in 0..self.model.cmds.len() {
            self.check_attempts_of(i);
        }
    }

    /// Compares command `i`'s attempts (`list_attempts`) with the model's.
    fn check_attempts_of(&self, i: usize) {
        if self.model.cmds[i].purged {
            return;
        }
        let stored = self
            .block_on(self.store().list_attempts(self.org, self.ids[i]))
            .unwrap();
        let got: Vec<(u32, Try)> = stored
            .iter()
            .map(|a| {
                let attempt = Try {
                    agent: self.agent_number(a.agent_id),
                    claimed_at: At(a.claimed_at - self.start),
                    ended_at: a.ended_at.map(|at| At(at - self.start)),
                    outcome: a.outcome,
                };
                (a.number, attempt)
            })
            .collect();
        let want: Vec<(u32, Try)> = (1..)
            .zip(self.model.cmds[i].history.iter().cloned())
            .collect();
        assert!(
            got == want,
            "after step {}: the attempts of command {i} differ from the model:\n  model {want:?}\n  store {got:?}",
            self.step
        );
    }

    /// Every command of the case as stored, by number.
    fn stored(&self) -> Vec<(usize, View)> {
        let page = self
            .block_on(self.store().list_commands(
                self.org,
                CommandFilter::default(),
                None,
                keel_store::MAX_PAGE_SIZE,
            ))
            .unwrap();
        let mut stored: Vec<_> = page
            .items
            .iter()
            .map(|c| (self.number(c.id), self.view(c)))
            .collect();
        stored.sort_by_key(|c| c.0);
        stored
    }
}

/// The state machine: [`Model`] drives generation; [`Sut`] runs it on the store.
struct LeaseMachine;

impl ReferenceStateMachine for LeaseMachine {
    type State = Model;
    type Transition = Op;

    fn init_state() -> BoxedStrategy<Model> {
        Just(Model::default()).boxed()
    }

    fn transitions(state: &Model) -> BoxedStrategy<Op> {
        ops(state)
    }

    fn apply(mut state: Model, op: &Op) -> Model {
        state.apply(op, None);
        state
    }
}

impl StateMachineTest for LeaseMachine {
    type SystemUnderTest = Sut;
    type Reference = LeaseMachine;

    fn init_test(_: &Model) -> Sut {
        let backend = BACKEND
            .with(|b| b.borrow().clone())
            .expect("a backend is set");
        let case = backend.cases.get() + 1;
        backend.cases.set(case);
        let store = &*backend.store;
        let clock = &backend.clock;
        let (org, agents) = backend.rt.block_on(async {
            // What earlier cases left: their leases expired and released, their finished
            // commands purged. A store-wide release or purge of this case sees its own only.
            clock.advance(Duration::hours(1));
            while store
                .release_expired_leases(None, 1000)
                .await
                .unwrap()
                .len()
                == 1000
            {}
            let all = clock.now() + Duration::seconds(1);
            while store.purge_finished(all, 1000).await.unwrap() == 1000 {}
            clock.advance(Duration::hours(1));
            let org = store
                .create_organisation(&format!("case-{case}"))
                .await
                .unwrap()
                .id;
            let mut agents = Vec::new();
            for n in 0..AGENTS {
                agents
                    .push(keel_store::conformance::agent(store, org, &format!("agent-{n}")).await);
            }
            (org, agents)
        });
        Sut {
            start: backend.clock.now(),
            backend,
            org,
            agents,
            ids: Vec::new(),
            numbers: HashMap::new(),
            tokens: Vec::new(),
            model: Model::default(),
            step: 0,
        }
    }

    fn apply(mut sut: Sut, _: &Model, op: Op) -> Sut {
        sut.step += 1;
        let before = sut.model.cmds.clone();
        let (expected, actual) = sut.run(&op);
        let key = format!("{:<9} {}", op.name(), expected.name());
        *sut.backend.tally.borrow_mut().entry(key).or_default() += 1;
        assert!(
            expected == actual,
            "step {}: {op:?}\n  the model answers {expected:?}\n  the store answers {actual:?}",
            sut.step
        );
        // The attempts of the commands this step changed (all of them every few steps).
        for i in 0..sut.model.cmds.len() {
            if before.get(i) != sut.model.cmds.get(i) {
                sut.check_attempts_of(i);
            }
        }
        sut
    }

    fn teardown(sut: Sut, _: Model) {
        sut.check_attempts();
    }

    fn check_invariants(sut: &Sut, _: &Model) {
        if sut.step.is_multiple_of(ATTEMPTS_EVERY) {
            sut.check_attempts();
        }
        let want = sut.model.views();
        let got = sut.stored();
        if want != got {
            let mut diff = String::new();
            for i in 0..sut.model.cmds.len() {
                let w = want.iter().find(|c| c.0 == i).map(|c| &c.1);
                let g = got.iter().find(|c| c.0 == i).map(|c| &c.1);
                if w != g {
                    let _ = write!(
                        diff,
                        "\n  command {i}: model {w:?}\n  command {i}: store {g:?}"
                    );
                }
            }
            panic!(
                "after step {}: the stored commands differ from the model:{diff}",
                sut.step
            );
        }
    }
}

// --- running ---

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Runs the cases on `backend`; on a difference, fails with the minimal sequence, one step a
/// line.
fn run(backend: Backend) {
    let config = Config {
        cases: env_or("PROPTEST_CASES", DEFAULT_CASES),
        failure_persistence: None,
        ..Config::default()
    };
    let max_steps = env_or("MODEL_MAX_STEPS", DEFAULT_MAX_STEPS);
    let backend = Rc::new(backend);
    BACKEND.with(|b| *b.borrow_mut() = Some(backend.clone()));
    let mut runner = TestRunner::new(config.clone());
    let result = runner.run(
        &LeaseMachine::sequential_strategy(1..max_steps),
        |(state, transitions, seen)| {
            LeaseMachine::test_sequential(config.clone(), state, transitions, seen);
            Ok(())
        },
    );
    BACKEND.with(|b| b.borrow_mut().take());
    backend.rt.block_on(backend.store.close());
    let mut tally = format!(
        "{} cases; steps by operation and answer:",
        backend.cases.get()
    );
    for (key, count) in backend.tally.borrow().iter() {
        let _ = write!(tally, "\n  {key:<40} {count:>6}");
    }
    eprintln!("{tally}");
    match result {
        Ok(()) => {}
        Err(TestError::Fail(reason, (_, transitions, _))) => {
            let mut steps = String::new();
            let mut model = Model::default();
            for (n, op) in transitions.iter().enumerate() {
                let _ = write!(steps, "\n  {}. {}", n + 1, model.describe(op));
                model.apply(op, None);
            }
            panic!(
                "the store differs from the model: {reason}\nminimal failing sequence \
                 ({} steps):{steps}",
                transitions.len()
            );
        }
        Err(err) => panic!("{err}"),
    }
}

/// The SQLite backend: a store on a new file in a temporary directory.
fn sqlite() -> Backend {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START));
    let store = rt
        .block_on(SqliteStore::open(
            dir.path().join("keel.db"),
            SqliteOptions::default(),
            clock.clone(),
        ))
        .unwrap();
    Backend {
        store: Arc::new(store),
        clock,
        cases: Cell::new(0),
        tally: RefCell::default(),
        _guard: Box::new(dir),
        rt,
    }
}

/// The PostgreSQL backend: a store on a new schema; `None` when PostgreSQL is not configured
/// (see `keel_store::conformance::postgres::test_url`).
fn postgres() -> Option<Backend> {
    let rt = runtime();
    let (schema, store, clock) = rt.block_on(keel_store::conformance::postgres::fresh_store())?;
    Some(Backend {
        store,
        clock,
        cases: Cell::new(0),
        tally: RefCell::default(),
        _guard: Box::new(schema),
        rt,
    })
}

/// Runs one fixed sequence on each backend, checked as a generated one is.
fn replay(ops: &[Op]) {
    for backend in std::iter::once(sqlite()).chain(postgres()) {
        replay_on(backend, ops);
    }
}

/// Runs one fixed sequence on `backend`, checked as a generated one is.
fn replay_on(backend: Backend, ops: &[Op]) {
    let backend = Rc::new(backend);
    BACKEND.with(|b| *b.borrow_mut() = Some(backend.clone()));
    LeaseMachine::test_sequential(Config::default(), Model::default(), ops.to_vec(), None);
    BACKEND.with(|b| b.borrow_mut().take());
    backend.rt.block_on(backend.store.close());
}

#[test]
fn sqlite_follows_the_model() {
    run(sqlite());
}

#[test]
fn postgres_follows_the_model() {
    if let Some(backend) = postgres() {
        run(backend);
    }
}

// --- fixed sequences ---
//
// Minimal sequences the runs above printed, kept as plain tests. Each names how it was found.

/// Printed (its first three steps) when the SQLite store's `complete` was made, on purpose, to
/// ignore who holds the lease: the holder's token sent by another agent is stale, for every
/// report.
#[test]
fn another_agent_cannot_complete_with_the_holders_token() {
    let report = Report {
        cmd: 0,
        tok: Tok::Current,
        by: By::Other,
    };
    replay(&[
        Op::Create {
            target: Tgt::Agent(2),
            priority: 0,
            max_attempts: 1,
            lease_secs: 2,
            delay_secs: 0,
        },
        Op::Claim {
            agent: 2,
            queues: vec![0, 1],
            limit: 1,
        },
        Op::Complete(report),
        Op::Heartbeat(report),
        Op::Fail {
            report,
            retryable: false,
        },
        Op::HandBack(report),
    ]);
}

/// Printed (its first four steps) when PostgreSQL's release was made, on purpose, to take a
/// lease that ends exactly now: a lease holds through its last instant.
#[test]
fn a_lease_holds_through_its_last_instant() {
    replay(&[
        Op::Create {
            target: Tgt::Agent(1),
            priority: 0,
            max_attempts: 1,
            lease_secs: 10,
            delay_secs: 0,
        },
        Op::Claim {
            agent: 1,
            queues: vec![0, 1],
            limit: 1,
        },
        Op::Advance { secs: 10 },
        Op::Release {
            scoped: false,
            limit: 1,
        },
        Op::Advance { secs: 1 },
        Op::Release {
            scoped: false,
            limit: 1,
        },
    ]);
}

/// Found by the SQLite run: a claim handed back and claimed again, then asked to cancel, lost
/// its running attempt (the cancel's update of the status, which leaves it `executing`, fired
/// the trigger that deletes a handed-back attempt, as the row still carried the hand-back's
/// outcome); its end was then recorded nowhere. Printed as the first five steps and one more;
/// the last two steps here end the attempt and check it is kept.
#[test]
fn a_cancel_after_a_hand_back_and_a_new_claim_keeps_the_attempt() {
    let holder = Report {
        cmd: 0,
        tok: Tok::Current,
        by: By::Holder,
    };
    replay(&[
        Op::Create {
            target: Tgt::Queue(0),
            priority: 0,
            max_attempts: 1,
            lease_secs: 2,
            delay_secs: 0,
        },
        Op::Claim {
            agent: 0,
            queues: vec![0, 1],
            limit: 1,
        },
        Op::HandBack(holder),
        Op::Claim {
            agent: 0,
            queues: vec![0, 1],
            limit: 1,
        },
        Op::Cancel { cmd: 0 },
        Op::Advance { secs: 1 },
        Op::Fail {
            report: holder,
            retryable: true,
        },
    ]);
}

/// Found by the PostgreSQL run (1000 cases, the store holding the commands of the earlier
/// ones): a batch naming one command twice, with its current token, had it completed by the
/// second report (the first answered `StaleClaim`): the statement joined both reports to the
/// row and PostgreSQL took either, as its plan went. As for reports made one after the other,
/// the first completes it and the repeat finds it taken. On PostgreSQL the store's connections
/// are told to avoid nested-loop and merge joins: the hash join a store in use may choose is
/// the plan that took the second report.
#[test]
fn a_batch_naming_a_command_twice_completes_it_with_the_first_report() {
    let current = (0, Tok::Current);
    let ops = [
        Op::Create {
            target: Tgt::Agent(1),
            priority: 0,
            max_attempts: 1,
            lease_secs: 30,
            delay_secs: 0,
        },
        Op::Claim {
            agent: 1,
            queues: vec![],
            limit: 1,
        },
        Op::CompleteBatch {
            reports: vec![current, current, (0, Tok::Forged)],
            by: By::Holder,
        },
    ];
    replay_on(sqlite(), &ops);
    let Some(url) = keel_store::conformance::postgres::test_url() else {
        return;
    };
    let rt = runtime();
    let clock = Arc::new(ManualClock::new(START));
    let (schema, store) = rt.block_on(async {
        let schema = TestSchema::create(&url).await;
        let mut options = schema.options();
        let hash_join = "options=-c%20enable_nestloop%3Doff%20-c%20enable_mergejoin%3Doff";
        let sep = if url.contains('?') { '&' } else { '?' };
        options.url = format!("{url}{sep}{hash_join}").into();
        let store = keel_store::PgStore::connect(&options, Some(clock.clone()))
            .await
            .unwrap();
        store.migrate().await.unwrap();
        (schema, store)
    });
    replay_on(
        Backend {
            store: Arc::new(store),
            clock,
            cases: Cell::new(0),
            tally: RefCell::default(),
            _guard: Box::new(schema),
            rt,
        },
        &ops,
    );
}
