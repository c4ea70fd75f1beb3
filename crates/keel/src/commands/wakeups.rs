//! Wakes long-polling claims when a command they could take becomes claimable.
//!
//! A waiting claim listens on its agent and on each queue it serves; an enqueue wakes the claims
//! listening on the command's target only (a targeted command wakes its agent, a pooled one the
//! claims on its queue), so agents waiting on other queues sleep on. Changes whose target the
//! caller does not have at hand (a requeue, a release of expired leases, a retry) wake every
//! waiting claim of the organisation.
//!
//! A claim registers *before* it looks in the database ([`Waiter::enable`]), so a command
//! enqueued between the look and the wait still wakes it.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::select_all;
use keel_store::{AgentId, OrgId, Target};
use parking_lot::Mutex;
use tokio::sync::Notify;

/// What a claim waits for: work for one agent, or work on one queue, of one organisation.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Interest {
    Agent(OrgId, AgentId),
    Queue(OrgId, String),
}

impl Interest {
    fn org(&self) -> OrgId {
        match self {
            Self::Agent(org, _) | Self::Queue(org, _) => *org,
        }
    }
}

/// One [`Notify`] per interest that has had a waiting claim.
#[derive(Debug, Clone, Default)]
pub struct Wakeups {
    by_interest: Arc<Mutex<HashMap<Interest, Arc<Notify>>>>,
}

impl Wakeups {
    /// The notifiers a claim of `agent` on `queues` listens on.
    pub fn waiter(&self, org: OrgId, agent: AgentId, queues: &[String]) -> Waiter {
        let mut map = self.by_interest.lock();
        let interests = std::iter::once(Interest::Agent(org, agent))
            .chain(queues.iter().map(|q| Interest::Queue(org, q.clone())));
        Waiter {
            notifies: interests
                .map(|interest| map.entry(interest).or_default().clone())
                .collect(),
        }
    }

    /// A command for `target` was enqueued in `org`: wakes the claims that could take it.
    pub fn wake_target(&self, org: OrgId, target: &Target) {
        let interest = match target {
            Target::Agent(agent) => Interest::Agent(org, *agent),
            Target::Queue(queue) => Interest::Queue(org, queue.clone()),
        };
        let notify = self.by_interest.lock().get(&interest).cloned();
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }

    /// Wakes every waiting claim of `org`.
    pub fn wake_org(&self, org: OrgId) {
        let notifies: Vec<Arc<Notify>> = self
            .by_interest
            .lock()
            .iter()
            .filter(|(interest, _)| interest.org() == org)
            .map(|(_, notify)| notify.clone())
            .collect();
        for notify in notifies {
            notify.notify_waiters();
        }
    }
}

/// The notifiers of one waiting claim.
#[derive(Debug)]
pub struct Waiter {
    notifies: Vec<Arc<Notify>>,
}

impl Waiter {
    /// Registers interest now and returns a future that completes at the next wake; register
    /// before looking for work, then await after finding none.
    pub fn enable(&self) -> impl Future<Output = ()> + Send + '_ {
        let mut notified: Vec<_> = self
            .notifies
            .iter()
            .map(|notify| Box::pin(notify.notified()))
            .collect();
        for future in &mut notified {
            future.as_mut().enable();
        }
        async move {
            if !notified.is_empty() {
                select_all(notified).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn ids() -> (OrgId, AgentId) {
        (OrgId(uuid::Uuid::now_v7()), AgentId(uuid::Uuid::now_v7()))
    }

    async fn woken(future: impl Future<Output = ()>) -> bool {
        tokio::time::timeout(Duration::from_millis(100), future)
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_wake_between_registering_and_waiting_is_not_lost() {
        let wakeups = Wakeups::default();
        let (org, agent) = ids();
        let waiter = wakeups.waiter(org, agent, &["q".to_owned()]);
        let wait = waiter.enable();
        wakeups.wake_target(org, &Target::Queue("q".to_owned()));
        assert!(woken(wait).await);
    }

    #[tokio::test]
    async fn only_claims_that_could_take_the_command_are_woken() {
        let wakeups = Wakeups::default();
        let (org, agent) = ids();
        let on_q = wakeups.waiter(org, agent, &["q".to_owned()]);
        let (_, other_agent) = ids();
        let on_other = wakeups.waiter(org, other_agent, &["other".to_owned()]);
        let (wait_q, wait_other) = (on_q.enable(), on_other.enable());
        wakeups.wake_target(org, &Target::Queue("q".to_owned()));
        assert!(woken(wait_q).await);
        assert!(!woken(wait_other).await);

        // A targeted command wakes its agent, whatever its queues.
        let wait_other = on_other.enable();
        wakeups.wake_target(org, &Target::Agent(other_agent));
        assert!(woken(wait_other).await);
    }

    #[tokio::test]
    async fn another_organisation_is_not_woken_and_wake_org_wakes_all_of_one() {
        let wakeups = Wakeups::default();
        let (org, agent) = ids();
        let (other_org, other_agent) = ids();
        let ours = wakeups.waiter(org, agent, &["q".to_owned()]);
        let theirs = wakeups.waiter(other_org, other_agent, &["q".to_owned()]);
        let (wait_ours, wait_theirs) = (ours.enable(), theirs.enable());
        wakeups.wake_org(org);
        assert!(woken(wait_ours).await);
        assert!(!woken(wait_theirs).await);
    }
}
