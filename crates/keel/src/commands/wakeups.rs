//! Wakes long-polling claims when a command they could take becomes claimable.
//!
//! A waiting claim listens on its agent and on each queue it serves; a command that becomes
//! claimable (created, requeued, or pending again after a retryable failure) wakes the claims
//! listening on its target only (a targeted command wakes its agent, a pooled one the claims on
//! its queue; a broadcast, or a child of one that finished, the whole organisation), so agents
//! waiting on other queues sleep on. A release of expired leases, which
//! does not report targets, wakes every waiting claim of the organisation.
//!
//! Memory stays bounded by the claims waiting now: an entry lives while a claim listens on it
//! and is removed when the last such claim ends.
//!
//! A claim registers *before* it looks in the database ([`Waiter::enable`]), so a command
//! enqueued between the look and the wait still wakes it.
//!
//! Each wake also goes out on a [`WakeBus`], to the other keel instances sharing the database:
//! [`InProcess`] when there are none (SQLite), `crate::cluster::wake_bus::PgNotify` on
//! PostgreSQL, whose listener hands what others publish to [`Wakeups::apply`]. Delivery
//! workers are woken the same way ([`Wakeups::wake_deliveries`]).

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::select_all;
use keel_store::{AgentId, OrgId, Target};
use parking_lot::Mutex;
use tokio::sync::Notify;

/// What a claim waits for, within its organisation: work for one agent, or on one queue.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Interest {
    /// Commands targeted at the agent.
    Agent(AgentId),
    /// Commands pooled on the queue.
    Queue(String),
}

/// One wake-up, as it travels between instances.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Wake {
    /// Work for one interest of an organisation.
    Interest(OrgId, Interest),
    /// Work for any claim of an organisation.
    Org(OrgId),
    /// Deliveries were queued.
    Deliveries,
}

/// Where wake-ups go beyond this process.
pub trait WakeBus: Send + Sync + std::fmt::Debug {
    /// Tells the other instances; never blocks (a wake that cannot be sent only delays a
    /// claim until its next look).
    fn publish(&self, wake: Wake);
}

/// No other instance: wakes stay in the process.
#[derive(Debug, Clone, Copy, Default)]
pub struct InProcess;

impl WakeBus for InProcess {
    fn publish(&self, _wake: Wake) {}
}

type Registry = HashMap<OrgId, HashMap<Interest, Arc<Notify>>>;

/// The notifiers of the claims waiting now, by organisation and interest, the delivery
/// workers' notifier, and the bus to the other instances.
#[derive(Debug, Clone)]
pub struct Wakeups {
    registry: Arc<Mutex<Registry>>,
    deliveries: Arc<Notify>,
    bus: Arc<dyn WakeBus>,
}

impl Default for Wakeups {
    fn default() -> Self {
        Self {
            registry: Arc::default(),
            deliveries: Arc::new(Notify::new()),
            bus: Arc::new(InProcess),
        }
    }
}

impl Wakeups {
    /// The same waiters, publishing every wake on `bus` too.
    pub fn with_bus(self, bus: Arc<dyn WakeBus>) -> Self {
        Self { bus, ..self }
    }

    /// The notifier the delivery workers wait on.
    pub fn deliveries(&self) -> Arc<Notify> {
        self.deliveries.clone()
    }

    /// Deliveries were queued: wakes an idle delivery claimer here and on every instance.
    pub fn wake_deliveries(&self) {
        self.deliveries.notify_one();
        self.bus.publish(Wake::Deliveries);
    }

    /// A wake another instance published: wakes the waiters of this process it concerns.
    pub fn apply(&self, wake: Wake) {
        match wake {
            Wake::Interest(org, interest) => self.wake_local(org, &interest),
            Wake::Org(org) => self.wake_org_local(org),
            Wake::Deliveries => self.deliveries.notify_one(),
        }
    }

    /// Wakes every waiter of this process: after wakes may have been missed (the bus
    /// reconnected).
    pub fn wake_all_local(&self) {
        let notifies: Vec<Arc<Notify>> = self
            .registry
            .lock()
            .values()
            .flat_map(|of_org| of_org.values().cloned())
            .collect();
        for notify in notifies {
            notify.notify_waiters();
        }
        self.deliveries.notify_one();
    }

    /// The notifiers a claim of `agent` on `queues` listens on, for as long as the returned
    /// waiter lives.
    pub fn waiter(&self, org: OrgId, agent: AgentId, queues: &[String]) -> Waiter {
        let interests: Vec<Interest> = std::iter::once(Interest::Agent(agent))
            .chain(queues.iter().cloned().map(Interest::Queue))
            .collect();
        let mut registry = self.registry.lock();
        let of_org = registry.entry(org).or_default();
        let notifies = interests
            .iter()
            .map(|interest| of_org.entry(interest.clone()).or_default().clone())
            .collect();
        Waiter {
            registry: self.registry.clone(),
            org,
            interests,
            notifies,
        }
    }

    /// A command for `target` became claimable in `org`: wakes the claims that could take it.
    pub fn wake_target(&self, org: OrgId, target: &Target) {
        let interest = match target {
            Target::Agent(agent) => Interest::Agent(*agent),
            Target::Queue(queue) => Interest::Queue(queue.clone()),
            // A broadcast's children (created, or requeued with it) are spread over the
            // organisation's agents.
            Target::Broadcast(_) => return self.wake_org(org),
        };
        self.wake_local(org, &interest);
        self.bus.publish(Wake::Interest(org, interest));
    }

    fn wake_local(&self, org: OrgId, interest: &Interest) {
        let notify = self
            .registry
            .lock()
            .get(&org)
            .and_then(|of_org| of_org.get(interest))
            .cloned();
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }

    /// Wakes every waiting claim of `org`.
    pub fn wake_org(&self, org: OrgId) {
        self.wake_org_local(org);
        self.bus.publish(Wake::Org(org));
    }

    fn wake_org_local(&self, org: OrgId) {
        let notifies: Vec<Arc<Notify>> = self
            .registry
            .lock()
            .get(&org)
            .map(|of_org| of_org.values().cloned().collect())
            .unwrap_or_default();
        for notify in notifies {
            notify.notify_waiters();
        }
    }

    /// How many interests have waiting claims (for tests and gauges).
    pub fn interests(&self) -> usize {
        self.registry.lock().values().map(HashMap::len).sum()
    }
}

/// The notifiers of one waiting claim; dropping it removes the entries no other claim uses.
#[derive(Debug)]
pub struct Waiter {
    registry: Arc<Mutex<Registry>>,
    org: OrgId,
    interests: Vec<Interest>,
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
            if notified.is_empty() {
                std::future::pending::<()>().await;
            } else {
                select_all(notified).await;
            }
        }
    }
}

impl Drop for Waiter {
    fn drop(&mut self) {
        let mut registry = self.registry.lock();
        let Some(of_org) = registry.get_mut(&self.org) else {
            return;
        };
        for (interest, notify) in self.interests.iter().zip(self.notifies.drain(..)) {
            // Two references: this waiter's and the registry's. No other claim listens.
            if Arc::strong_count(&notify) == 2 {
                of_org.remove(interest);
            }
        }
        if of_org.is_empty() {
            registry.remove(&self.org);
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

    #[test]
    fn entries_live_only_while_a_claim_waits_on_them() {
        let wakeups = Wakeups::default();
        let (org, agent) = ids();
        let first = wakeups.waiter(org, agent, &["q".to_owned(), "r".to_owned()]);
        let second = wakeups.waiter(org, agent, &["q".to_owned()]);
        assert_eq!(wakeups.interests(), 3);
        drop(first);
        assert_eq!(wakeups.interests(), 2, "agent and q are still waited on");
        drop(second);
        assert_eq!(wakeups.interests(), 0);
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
