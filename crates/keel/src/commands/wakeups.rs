//! Wakes long-polling claims when a command of their organisation becomes claimable.
//!
//! A waiting claim registers interest *before* it looks in the database, so an enqueue that
//! lands between the look and the wait still wakes it.

use std::collections::HashMap;
use std::sync::Arc;

use keel_store::OrgId;
use parking_lot::Mutex;
use tokio::sync::Notify;

/// One [`Notify`] per organisation that has had a waiting agent.
#[derive(Debug, Clone, Default)]
pub struct Wakeups {
    by_org: Arc<Mutex<HashMap<OrgId, Arc<Notify>>>>,
}

impl Wakeups {
    /// The notifier of `org`; wait on `notified()` after `enable()`, then look for work.
    pub fn of(&self, org: OrgId) -> Arc<Notify> {
        self.by_org.lock().entry(org).or_default().clone()
    }

    /// Wakes every claim of `org` that waits now.
    pub fn wake(&self, org: OrgId) {
        let notify = self.by_org.lock().get(&org).cloned();
        if let Some(notify) = notify {
            notify.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_registered_waiter_is_woken_even_if_the_wake_comes_before_the_wait() {
        let wakeups = Wakeups::default();
        let org = OrgId(uuid::Uuid::now_v7());
        let notify = wakeups.of(org);
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        wakeups.wake(org);
        tokio::time::timeout(Duration::from_secs(1), notified)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn another_organisation_is_not_woken() {
        let wakeups = Wakeups::default();
        let org = OrgId(uuid::Uuid::now_v7());
        let notify = wakeups.of(org);
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        wakeups.wake(OrgId(uuid::Uuid::now_v7()));
        assert!(
            tokio::time::timeout(Duration::from_millis(50), notified)
                .await
                .is_err()
        );
    }
}
