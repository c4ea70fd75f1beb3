//! Per-organisation rate limits: two token buckets per organisation (governor's keyed GCRA
//! limiters), one for new work and reads, one for agent traffic, so that an organisation's
//! flood of creates cannot starve its own agents' heartbeats and reports. An organisation
//! named in `overload.orgs` gets its own quotas; every other one the defaults.

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use keel_store::{OrgId, Store};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

/// The quotas of one organisation (or the defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimits {
    /// Sustained rate of creates, reads, lists, cancels and requeues, per second.
    pub work_per_second: NonZeroU32,
    /// How many of those may come at once after a quiet spell (the bucket's size).
    pub work_burst: NonZeroU32,
    /// Sustained rate of agent requests (claims, check-ins, heartbeats, completes, fails), per
    /// second.
    pub agent_per_second: NonZeroU32,
    /// How many agent requests may come at once after a quiet spell.
    pub agent_burst: NonZeroU32,
}

impl Default for RateLimits {
    fn default() -> Self {
        Self {
            work_per_second: nonzero(1_000),
            work_burst: nonzero(2_000),
            agent_per_second: nonzero(5_000),
            agent_burst: nonzero(10_000),
        }
    }
}

/// `n` as a `NonZeroU32`, for the defaults (1 for 0, which they do not use).
const fn nonzero(n: u32) -> NonZeroU32 {
    match NonZeroU32::new(n) {
        Some(n) => n,
        None => NonZeroU32::MIN,
    }
}

/// Which of an organisation's buckets a request draws from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    /// Creates, reads, lists, cancels, requeues.
    Work,
    /// Claims, check-ins, heartbeats, completes, fails.
    Agent,
}

impl Bucket {
    /// The name used in messages and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Work => "work",
            Self::Agent => "agent",
        }
    }
}

/// Why a request drawing several tokens was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not enough tokens now; this long until there are.
    Wait(Duration),
    /// More tokens than the bucket holds: the request can never pass whole.
    OverBurst {
        /// The bucket's size.
        burst: u32,
    },
}

/// The two limiters of one set of quotas, keyed by organisation.
struct Buckets {
    work: DefaultKeyedRateLimiter<OrgId>,
    agent: DefaultKeyedRateLimiter<OrgId>,
    limits: RateLimits,
}

impl Buckets {
    fn new(limits: RateLimits) -> Arc<Self> {
        Arc::new(Self {
            work: RateLimiter::keyed(
                Quota::per_second(limits.work_per_second).allow_burst(limits.work_burst),
            ),
            agent: RateLimiter::keyed(
                Quota::per_second(limits.agent_per_second).allow_burst(limits.agent_burst),
            ),
            limits,
        })
    }
}

/// Every organisation's buckets.
pub struct OrgRateLimits {
    defaults: Arc<Buckets>,
    /// Quotas by organisation name, from the configuration.
    overrides: BTreeMap<String, Arc<Buckets>>,
    /// Which buckets each organisation seen so far uses. Names are resolved to ids lazily (an
    /// organisation may be created while keel runs); an organisation's name never changes, so
    /// an entry is final.
    resolved: RwLock<HashMap<OrgId, Arc<Buckets>>>,
    clock: DefaultClock,
}

impl OrgRateLimits {
    /// The buckets for `defaults` and the per-organisation `overrides`.
    pub fn new(defaults: RateLimits, overrides: &BTreeMap<String, RateLimits>) -> Self {
        Self {
            defaults: Buckets::new(defaults),
            overrides: overrides
                .iter()
                .map(|(name, limits)| (name.clone(), Buckets::new(*limits)))
                .collect(),
            resolved: RwLock::new(HashMap::new()),
            clock: DefaultClock::default(),
        }
    }

    /// Takes one token from `org`'s `bucket`; when it is empty, how long until one is back.
    pub async fn check(
        &self,
        store: &dyn Store,
        org: OrgId,
        bucket: Bucket,
    ) -> Result<(), Duration> {
        let buckets = self.buckets(store, org).await;
        let limiter = match bucket {
            Bucket::Work => &buckets.work,
            Bucket::Agent => &buckets.agent,
        };
        limiter
            .check_key(&org)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }

    /// For a request worth `total` tokens, which drew one when it was admitted: draws the other
    /// `total - 1`, all or none.
    pub async fn check_rest(
        &self,
        store: &dyn Store,
        org: OrgId,
        bucket: Bucket,
        total: u32,
    ) -> Result<(), Refusal> {
        let buckets = self.buckets(store, org).await;
        let (limiter, burst) = match bucket {
            Bucket::Work => (&buckets.work, buckets.limits.work_burst),
            Bucket::Agent => (&buckets.agent, buckets.limits.agent_burst),
        };
        if total > burst.get() {
            return Err(Refusal::OverBurst { burst: burst.get() });
        }
        let Some(rest) = NonZeroU32::new(total.saturating_sub(1)) else {
            return Ok(());
        };
        match limiter.check_key_n(&org, rest) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => Err(Refusal::Wait(not_until.wait_time_from(self.clock.now()))),
            Err(_) => Err(Refusal::OverBurst { burst: burst.get() }),
        }
    }

    async fn buckets(&self, store: &dyn Store, org: OrgId) -> Arc<Buckets> {
        if let Some(buckets) = self.resolved.read().get(&org) {
            return buckets.clone();
        }
        if self.overrides.is_empty() {
            return self.defaults.clone();
        }
        // Resolve the names not resolved yet; an organisation not named is on the defaults.
        let unresolved: Vec<(&String, &Arc<Buckets>)> = {
            let resolved = self.resolved.read();
            self.overrides
                .iter()
                .filter(|(_, buckets)| !resolved.values().any(|known| Arc::ptr_eq(known, buckets)))
                .collect()
        };
        let mut found = Vec::new();
        for (name, buckets) in unresolved {
            match store.find_org_by_name(name).await {
                Ok(Some(named)) => found.push((named.id, buckets.clone())),
                Ok(None) => {}
                // Not cached: the next request of this organisation tries again.
                Err(error) => {
                    tracing::warn!(%error, org = %name, "rate limits: cannot resolve the organisation; using the defaults for now");
                    return self.defaults.clone();
                }
            }
        }
        let mut resolved = self.resolved.write();
        for (id, buckets) in found {
            resolved.insert(id, buckets);
        }
        resolved
            .entry(org)
            .or_insert_with(|| self.defaults.clone())
            .clone()
    }
}

/// `Retry-After` in whole seconds: rounded up, at least 1.
pub fn retry_after_seconds(wait: Duration) -> u64 {
    let seconds = wait.as_secs();
    let rounded = if wait.subsec_nanos() > 0 {
        seconds.saturating_add(1)
    } else {
        seconds
    };
    rounded.max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(retry_after_seconds(Duration::ZERO), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_secs(1)), 1);
        assert_eq!(retry_after_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(retry_after_seconds(Duration::from_secs(7)), 7);
    }
}
