//! The `store.crash` failpoint: the process exits at once just before or just after one
//! operation's commit, as a power cut or `kill -9` would, to test what a restart finds.
//!
//! Its value names the phase and the step: `KEEL_FAILPOINTS="store.crash=return(before:claim)"`
//! exits before a claim commits (nothing of it is written), `return(after:claim)` right after
//! its commit is durable and before anyone hears of it (the agent never gets its claim). The
//! process sends itself SIGKILL ([`SIGNAL`]): nothing unwinds, flushes or shuts down, and no
//! other thread runs on. A value naming another step does nothing.
//!
//! Every store operation that changes a command or a delivery has the two points of its
//! [`Step`], on both backends. For an operation asked for by a caller (create, claim, report,
//! cancel, requeue, trigger, record), "before" is when the operation starts, before anything of
//! it is written (on SQLite before it is queued for the writer's group), and "after" is when
//! its commit (on SQLite its group's) has returned. For the batch operations of jobs and
//! workers (release, purge, the claim of deliveries, cleanup), which run again and again with
//! nothing to do, both points count only a run that changed something: "before" comes after the
//! batch's statements, inside its transaction, just before the `COMMIT`.

use std::future::Future;

use crate::error::StoreResult;

/// The signal that stops a process at `store.crash`: SIGKILL, sent by the process to itself.
pub const SIGNAL: i32 = 9;

/// The exit status of a process stopped by `store.crash` in the unlikely case that it could
/// not send itself [`SIGNAL`].
pub const EXIT_CODE: i32 = 86;

/// Stops the process at once: SIGKILL to itself, so that no other thread runs on (no worker
/// claims or sends anything more, nothing is flushed, no shutdown runs), as with `kill -9`.
/// `std::process::exit` would not do: other threads go on while it runs the exit handlers.
fn stop(at: &str) {
    eprintln!("store.crash: killed at {at}");
    let killed =
        rustix::process::kill_process(rustix::process::getpid(), rustix::process::Signal::KILL);
    // Not reached once the signal is delivered.
    eprintln!("store.crash: SIGKILL failed ({killed:?}); exiting with {EXIT_CODE}");
    std::process::exit(EXIT_CODE);
}

/// A transition of a command or a delivery, as `store.crash` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// `create`: commands created (single, batch, broadcast).
    Create,
    /// `claim`: commands leased to an agent.
    Claim,
    /// `heartbeat`: a lease renewed.
    Heartbeat,
    /// `complete`: a command completed.
    Complete,
    /// `fail`: a command's attempt failed (retry, failed or dead).
    Fail,
    /// `hand_back`: claimed commands given back unspent.
    HandBack,
    /// `release`: expired leases released (pending again or dead).
    Release,
    /// `requeue`: a dead or failed command pending again.
    Requeue,
    /// `purge`: finished commands deleted.
    Purge,
    /// `cancel`: a command cancelled.
    Cancel,
    /// `enqueue`: an event triggered or a message sent: its deliveries queued.
    Enqueue,
    /// `send`: deliveries leased to a worker, which then sends them.
    Send,
    /// `record`: what came of sent deliveries (delivered, retry, failed, dead, postponed).
    Record,
    /// `delivery_release`: deliveries whose worker's lease expired, pending again or dead.
    DeliveryRelease,
    /// `delivery_requeue`: dead or failed deliveries pending again.
    DeliveryRequeue,
    /// `cleanup`: finished deliveries deleted.
    Cleanup,
}

impl Step {
    /// The name `store.crash`'s value uses.
    pub fn name(self) -> &'static str {
        match self {
            Step::Create => "create",
            Step::Claim => "claim",
            Step::Heartbeat => "heartbeat",
            Step::Complete => "complete",
            Step::Fail => "fail",
            Step::HandBack => "hand_back",
            Step::Release => "release",
            Step::Requeue => "requeue",
            Step::Purge => "purge",
            Step::Cancel => "cancel",
            Step::Enqueue => "enqueue",
            Step::Send => "send",
            Step::Record => "record",
            Step::DeliveryRelease => "delivery_release",
            Step::DeliveryRequeue => "delivery_requeue",
            Step::Cleanup => "cleanup",
        }
    }
}

/// Before or after the commit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Nothing of the operation is committed.
    Before,
    /// The operation is committed; its caller has not been answered.
    After,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Before => "before",
            Phase::After => "after",
        }
    }
}

/// Exits the process with [`EXIT_CODE`] when `store.crash` names `step` at `phase`.
pub(crate) fn point(step: Step, phase: Phase) {
    fail::fail_point!("store.crash", |value: Option<String>| {
        let wanted = format!("{}:{}", phase.name(), step.name());
        if value.as_deref().map(str::trim) == Some(wanted.as_str()) {
            stop(&wanted);
        }
    });
}

/// Whether `store.crash` names `step` (at either phase): a batch operation that commits by a
/// lone statement then runs in a transaction, so that "before" can come after its statements.
pub(crate) fn armed(step: Step) -> bool {
    fail::fail_point!("store.crash", |value: Option<String>| {
        value.is_some_and(|value| {
            value
                .trim()
                .split_once(':')
                .is_some_and(|(_, name)| name == step.name())
        })
    });
    false
}

/// [`point`] for a batch operation (a job's run, a claim of deliveries): only when it did
/// something (`work`), so that an empty run does not stop the process.
pub(crate) fn point_if(step: Step, phase: Phase, work: bool) {
    if work {
        point(step, phase);
    }
}

/// Runs `operation` (one transition) between the two points of `step`; "after" only when it
/// succeeded (a refused operation committed nothing).
pub(crate) async fn around<T>(
    step: Step,
    operation: impl Future<Output = StoreResult<T>>,
) -> StoreResult<T> {
    point(step, Phase::Before);
    let result = operation.await;
    if result.is_ok() {
        point(step, Phase::After);
    }
    result
}
