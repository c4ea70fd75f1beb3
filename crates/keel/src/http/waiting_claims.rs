//! The cap on waiting long-polls (`POST /v1/commands/claim` with `wait_seconds > 0`), per agent
//! and per organisation. A claim over either cap is refused with 429 at once, before it touches
//! the database.
//!
//! Two counting maps behind one lock, written here rather than taken from a crate: a semaphore
//! per key would need the same map to find it, and a counter is all a cap needs.

use std::collections::HashMap;
use std::sync::Arc;

use keel_store::{AgentId, OrgId};
use parking_lot::Mutex;

/// Which cap refused a claim.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CapReached {
    /// The agent already has `per_agent` claims waiting.
    Agent,
    /// The organisation already has `per_org` claims waiting.
    Organisation,
}

#[derive(Default)]
struct Counts {
    by_org: HashMap<OrgId, usize>,
    by_agent: HashMap<(OrgId, AgentId), usize>,
}

/// The waiting claims, counted.
#[derive(Clone)]
pub struct WaitingClaims {
    counts: Arc<Mutex<Counts>>,
    per_agent: usize,
    per_org: usize,
}

impl WaitingClaims {
    /// Caps of `per_agent` waiting claims per agent and `per_org` per organisation.
    pub fn new(per_agent: usize, per_org: usize) -> Self {
        Self {
            counts: Arc::default(),
            per_agent,
            per_org,
        }
    }

    /// Counts one more waiting claim of `agent`, until the returned guard is dropped; or says
    /// which cap it would exceed.
    pub fn enter(&self, org: OrgId, agent: AgentId) -> Result<WaitingClaim, CapReached> {
        let mut counts = self.counts.lock();
        let agent_count = counts.by_agent.get(&(org, agent)).copied().unwrap_or(0);
        if agent_count >= self.per_agent {
            return Err(CapReached::Agent);
        }
        let org_count = counts.by_org.get(&org).copied().unwrap_or(0);
        if org_count >= self.per_org {
            return Err(CapReached::Organisation);
        }
        counts
            .by_agent
            .insert((org, agent), agent_count.saturating_add(1));
        counts.by_org.insert(org, org_count.saturating_add(1));
        Ok(WaitingClaim {
            counts: self.counts.clone(),
            org,
            agent,
        })
    }

    /// Claims waiting now, across organisations.
    pub fn total(&self) -> usize {
        self.counts.lock().by_org.values().sum()
    }
}

/// One waiting claim; uncounted when dropped (also when the request is cancelled or panics).
pub struct WaitingClaim {
    counts: Arc<Mutex<Counts>>,
    org: OrgId,
    agent: AgentId,
}

impl Drop for WaitingClaim {
    fn drop(&mut self) {
        let mut counts = self.counts.lock();
        decrement(&mut counts.by_agent, (self.org, self.agent));
        decrement(&mut counts.by_org, self.org);
    }
}

/// One less for `key`; the entry goes when it reaches zero, so the maps hold only waiters.
fn decrement<K: std::hash::Hash + Eq>(map: &mut HashMap<K, usize>, key: K) {
    if let Some(count) = map.get_mut(&key) {
        *count = count.saturating_sub(1);
        if *count == 0 {
            map.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> (OrgId, AgentId, AgentId) {
        (OrgId::new(), AgentId::new(), AgentId::new())
    }

    #[test]
    fn caps_per_agent_and_per_org_and_frees_on_drop() {
        let waiting = WaitingClaims::new(1, 2);
        let (org, a, b) = ids();
        let first = waiting.enter(org, a).unwrap();
        assert_eq!(waiting.enter(org, a).err(), Some(CapReached::Agent));
        let second = waiting.enter(org, b).unwrap();
        let (other_org, c, _) = ids();
        assert_eq!(waiting.enter(org, c).err(), Some(CapReached::Organisation));
        let third = waiting.enter(other_org, c).unwrap();
        assert_eq!(waiting.total(), 3);
        drop(first);
        assert!(waiting.enter(org, a).is_ok(), "a's slot is free again");
        drop((second, third));
        assert_eq!(waiting.total(), 0);
        assert!(waiting.counts.lock().by_agent.is_empty());
    }
}
