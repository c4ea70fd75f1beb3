//! Run named long-lived tasks, restarting them after a panic or an error.
//!
//! Each run of a task is isolated ([`crate::isolate_async`] under a [`Scope`] named after the
//! component), so the panic hook reports it under that name. A failed run is restarted after an
//! exponential backoff; more than [`RestartPolicy::max_restarts`] restarts within
//! [`RestartPolicy::within`] mark the component degraded (alert record, metric, readiness
//! fails), and it goes on being retried at the maximum backoff until it has run cleanly for
//! [`RestartPolicy::reset_after`]. `docs/supervision.md` describes the whole behaviour.
//!
//! Failpoint: `supervisor.task`, evaluated at the start of every run, inside the isolation.

use crate::backoff::Backoff;
use std::collections::VecDeque;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tokio::time::{Instant, sleep, sleep_until};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::components::{ComponentKind, ComponentState, Components, Slot};
use crate::isolate::isolate_async;
use crate::periodic::{self, JobHandle};
use crate::scope::Scope;

/// The error a supervised task may return; it is logged and the task is restarted.
pub type TaskError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// The target of alert records (a component degraded or recovered).
pub const ALERT_TARGET: &str = "keel::alert";

/// How failed tasks are restarted. In `keel.toml` under `[supervisor]`; durations are
/// humantime strings (`"5s"`, `"250ms"`, `"1m"`).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct RestartPolicy {
    /// Delay before the first restart; doubled after each further failure.
    #[serde(with = "humantime_serde")]
    pub initial_backoff: Duration,
    /// The largest delay between restarts; also the retry delay of a degraded component.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// A run that lasts this long is clean: the backoff goes back to `initial_backoff`, the
    /// restart history is cleared and a degraded component is running again.
    #[serde(with = "humantime_serde")]
    pub reset_after: Duration,
    /// More restarts than this within `within` mark the component degraded.
    pub max_restarts: u32,
    /// The window of the intensity limit.
    #[serde(with = "humantime_serde")]
    pub within: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            initial_backoff: Duration::from_secs(5),
            max_backoff: Duration::from_secs(60),
            reset_after: Duration::from_secs(60),
            max_restarts: 10,
            within: Duration::from_secs(60),
        }
    }
}

/// A [`RestartPolicy`] that makes no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// `initial_backoff` is zero: a failing task would be restarted in a busy loop.
    #[error("supervisor.initial_backoff must be greater than zero")]
    ZeroBackoff,
    /// `max_backoff` is smaller than `initial_backoff`.
    #[error(
        "supervisor.max_backoff ({max:?}) is smaller than supervisor.initial_backoff ({initial:?})"
    )]
    MaxBelowInitial {
        /// The initial backoff.
        initial: Duration,
        /// The maximum backoff.
        max: Duration,
    },
    /// `reset_after` or `within` is zero.
    #[error("supervisor.{0} must be greater than zero")]
    ZeroPeriod(&'static str),
}

/// The smallest backoff the supervisor uses, whatever the policy says.
const MIN_BACKOFF: Duration = Duration::from_millis(1);

impl RestartPolicy {
    /// Checks the policy; configuration loading should refuse one that fails.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.initial_backoff.is_zero() {
            return Err(PolicyError::ZeroBackoff);
        }
        if self.max_backoff < self.initial_backoff {
            return Err(PolicyError::MaxBelowInitial {
                initial: self.initial_backoff,
                max: self.max_backoff,
            });
        }
        if self.reset_after.is_zero() {
            return Err(PolicyError::ZeroPeriod("reset_after"));
        }
        if self.within.is_zero() {
            return Err(PolicyError::ZeroPeriod("within"));
        }
        Ok(())
    }

    /// The policy the supervisor actually applies: backoffs at least 1 ms, and the maximum
    /// backoff not below the initial one.
    fn normalized(&self) -> Self {
        let initial_backoff = self.initial_backoff.max(MIN_BACKOFF);
        Self {
            initial_backoff,
            max_backoff: self.max_backoff.max(initial_backoff),
            ..self.clone()
        }
    }
}

/// Runs named tasks and periodic jobs, restarts them after failures and records their state in
/// [`Components`]. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Supervisor {
    components: Components,
    policy: RestartPolicy,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Supervisor {
    /// A supervisor that records into `components`, restarts by `policy` (see
    /// [`RestartPolicy::validate`]; a zero backoff is raised to 1 ms), stops everything when
    /// `cancel` is cancelled and spawns onto `tracker`, so shutdown can wait for its tasks.
    pub fn new(
        components: Components,
        policy: RestartPolicy,
        cancel: CancellationToken,
        tracker: TaskTracker,
    ) -> Self {
        Self {
            components,
            policy: policy.normalized(),
            cancel,
            tracker,
        }
    }

    /// The registry this supervisor records into.
    pub fn components(&self) -> &Components {
        &self.components
    }

    /// The restart policy in force.
    pub fn policy(&self) -> &RestartPolicy {
        &self.policy
    }

    /// The token that stops every component of this supervisor.
    pub fn cancel_token(&self) -> &CancellationToken {
        &self.cancel
    }

    /// Runs `task` as the component `name` until the cancellation token is cancelled or a run
    /// returns `Ok`. A run that panics or returns an error is restarted after the backoff.
    ///
    /// Each run gets a clone of the cancellation token and should return soon after it is
    /// cancelled; the supervisor does not abort a run, so in-flight work can finish (shutdown
    /// bounds the wait with its own deadline). Must be called within a Tokio runtime.
    pub fn spawn<F, Fut>(&self, name: impl Into<String>, task: F)
    where
        F: FnMut(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), TaskError>> + Send + 'static,
    {
        self.spawn_with_policy(name, self.policy.clone(), task);
    }

    /// Like [`Supervisor::spawn`], with a restart policy of its own for this component.
    pub fn spawn_with_policy<F, Fut>(&self, name: impl Into<String>, policy: RestartPolicy, task: F)
    where
        F: FnMut(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), TaskError>> + Send + 'static,
    {
        let name: Arc<str> = Arc::from(name.into());
        let slot = self.components.register(&name, ComponentKind::Task, None);
        let run = supervise(name, slot, policy.normalized(), self.cancel.clone(), task);
        self.tracker.spawn(run);
    }

    /// Runs `tick` every `interval` as the periodic job `name`, under this supervisor.
    ///
    /// Ticks run one at a time on a fixed cadence from the start of the job (the first one
    /// `interval` after it); a tick that overruns skips the ticks it missed. Each tick is
    /// isolated and timed: a panicking tick is counted as a failure and the next one runs on
    /// schedule. The interval is clamped to between 1 ms and one year. The returned handle
    /// changes the interval and triggers ticks on demand. Must be called within a Tokio runtime.
    pub fn every<F, Fut>(&self, name: impl Into<String>, interval: Duration, tick: F) -> JobHandle
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let name: Arc<str> = Arc::from(name.into());
        let interval = periodic::clamp_interval(interval);
        let slot = self
            .components
            .register(&name, ComponentKind::Job, Some(interval));
        let (handle, job) = periodic::job(
            name.clone(),
            interval,
            slot.clone(),
            self.cancel.clone(),
            tick,
        );
        let run = supervise(name, slot, self.policy.clone(), self.cancel.clone(), job);
        let closer = handle.clone();
        self.tracker.spawn(async move {
            run.await;
            closer.close();
        });
        handle
    }
}

/// The restart loop of one component.
async fn supervise<F, Fut>(
    name: Arc<str>,
    slot: Slot,
    policy: RestartPolicy,
    cancel: CancellationToken,
    mut task: F,
) where
    F: FnMut(CancellationToken) -> Fut,
    Fut: Future<Output = Result<(), TaskError>>,
{
    let mut backoff = Backoff::new(policy.initial_backoff, policy.max_backoff);
    let mut restarts: VecDeque<Instant> = VecDeque::new();
    let mut degraded = false;
    let max_restarts = usize::try_from(policy.max_restarts).unwrap_or(usize::MAX);

    while !cancel.is_cancelled() {
        slot.clear_next_restart();
        slot.set_state(if degraded {
            ComponentState::Degraded
        } else {
            ComponentState::Running
        });
        let started = Instant::now();
        // `None` only for a reset period too long to represent: the run is then never clean.
        let clean_at = started.checked_add(policy.reset_after);
        let mut clean = false;

        let token = cancel.clone();
        let task = &mut task;
        let run = isolate_async(Scope::new(name.clone()), async move {
            fail::fail_point!("supervisor.task");
            task(token).await
        });
        tokio::pin!(run);
        let outcome = loop {
            tokio::select! {
                outcome = &mut run => break outcome,
                () = sleep_until(clean_at.unwrap_or(started)), if clean_at.is_some() && !clean => {
                    clean = true;
                    on_clean_run(&name, &slot, &policy, &mut backoff, &mut restarts, &mut degraded);
                }
            }
        };
        if !clean && clean_at.is_some_and(|at| Instant::now() >= at) {
            on_clean_run(
                &name,
                &slot,
                &policy,
                &mut backoff,
                &mut restarts,
                &mut degraded,
            );
        }

        let failure = match outcome {
            Ok(Ok(())) => {
                tracing::info!(component = %name, "component finished");
                break;
            }
            Ok(Err(error)) => {
                let error = error.to_string();
                slot.record_error(error.clone());
                format!("returned an error: {error}")
            }
            Err(panicked) => {
                slot.record_panic(&panicked);
                format!("panicked: {}", panicked.message)
            }
        };
        if cancel.is_cancelled() {
            tracing::info!(component = %name, "component {failure} while stopping; not restarted");
            break;
        }

        let now = Instant::now();
        restarts.push_back(now);
        while restarts
            .front()
            .is_some_and(|at| now.saturating_duration_since(*at) > policy.within)
            || restarts.len() > max_restarts.saturating_add(1)
        {
            restarts.pop_front();
        }
        if !degraded && restarts.len() > max_restarts {
            degraded = true;
            tracing::error!(
                target: ALERT_TARGET,
                component = %name,
                restarts = restarts.len(),
                within = ?policy.within,
                retry_every = ?policy.max_backoff,
                "component degraded: more than {} restarts within {:?}; retrying every {:?}",
                policy.max_restarts,
                policy.within,
                policy.max_backoff,
            );
        }
        let delay = if degraded {
            policy.max_backoff
        } else {
            // Restart delays are exact (no jitter): one task restarts alone.
            backoff.next_ceiling()
        };
        let next_restart = OffsetDateTime::now_utc()
            .checked_add(time::Duration::try_from(delay).unwrap_or(time::Duration::MAX))
            .unwrap_or(OffsetDateTime::now_utc());
        let total = slot.record_restart(next_restart);
        slot.set_state(if degraded {
            ComponentState::Degraded
        } else {
            ComponentState::Restarting
        });
        tracing::warn!(
            component = %name,
            restarts = total,
            delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "component {failure}; restarting in {delay:?}"
        );

        tokio::select! {
            () = cancel.cancelled() => break,
            () = sleep(delay) => {}
        }
    }
    slot.clear_next_restart();
    slot.set_state(ComponentState::Stopped);
}

/// A run has lasted `reset_after`: reset the backoff and the restart history, and recover a
/// degraded component.
fn on_clean_run(
    name: &str,
    slot: &Slot,
    policy: &RestartPolicy,
    backoff: &mut Backoff,
    restarts: &mut VecDeque<Instant>,
    degraded: &mut bool,
) {
    backoff.reset();
    restarts.clear();
    if *degraded {
        *degraded = false;
        slot.set_state(ComponentState::Running);
        tracing::warn!(
            target: ALERT_TARGET,
            component = name,
            "component recovered: ran cleanly for {:?}",
            policy.reset_after,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_policy_matches_the_documented_one() {
        let policy = RestartPolicy::default();
        assert_eq!(policy.initial_backoff, Duration::from_secs(5));
        assert_eq!(policy.max_backoff, Duration::from_secs(60));
        assert_eq!(policy.reset_after, Duration::from_secs(60));
        assert_eq!(policy.max_restarts, 10);
        assert_eq!(policy.within, Duration::from_secs(60));
        assert_eq!(policy.validate(), Ok(()));
    }

    #[test]
    fn the_policy_reads_humantime_strings_and_refuses_unknown_keys() {
        let policy: RestartPolicy =
            toml::from_str("initial_backoff = \"250ms\"\nmax_backoff = \"1m\"\nmax_restarts = 3")
                .unwrap();
        assert_eq!(policy.initial_backoff, Duration::from_millis(250));
        assert_eq!(policy.max_backoff, Duration::from_secs(60));
        assert_eq!(policy.max_restarts, 3);
        assert_eq!(policy.within, Duration::from_secs(60));
        assert!(toml::from_str::<RestartPolicy>("backoff = \"1s\"").is_err());
        let round_trip: RestartPolicy = toml::from_str(&toml::to_string(&policy).unwrap()).unwrap();
        assert_eq!(round_trip, policy);
    }

    #[test]
    fn nonsense_policies_are_refused_and_normalized() {
        let zero = RestartPolicy {
            initial_backoff: Duration::ZERO,
            ..RestartPolicy::default()
        };
        assert_eq!(zero.validate(), Err(PolicyError::ZeroBackoff));
        assert_eq!(zero.normalized().initial_backoff, MIN_BACKOFF);
        let inverted = RestartPolicy {
            initial_backoff: Duration::from_secs(10),
            max_backoff: Duration::from_secs(1),
            ..RestartPolicy::default()
        };
        assert!(matches!(
            inverted.validate(),
            Err(PolicyError::MaxBelowInitial { .. })
        ));
        assert_eq!(inverted.normalized().max_backoff, Duration::from_secs(10));
    }
}
