//! Which agents a label selector reaches, and whether an agent is online.

use std::time::Duration;

use keel_store::{Agent, AgentId, LabelSelector, OrgId, Store, StoreResult};
use time::OffsetDateTime;

/// Whether an agent last seen at `last_seen` counts as online at `now`.
pub fn is_online(last_seen: Option<OffsetDateTime>, now: OffsetDateTime, window: Duration) -> bool {
    last_seen.is_some_and(|seen| {
        (now - seen) <= time::Duration::try_from(window).unwrap_or(time::Duration::MAX)
    })
}

/// The organisation's agents whose labels `selector` matches (only those online at `now`
/// when `online_only`), by name.
pub fn select<'a>(
    agents: &'a [Agent],
    selector: &LabelSelector,
    online_only: bool,
    now: OffsetDateTime,
    online_window: Duration,
) -> impl Iterator<Item = &'a Agent> {
    agents.iter().filter(move |agent| {
        selector.matches(&agent.labels())
            && (!online_only || is_online(agent.last_seen_at, now, online_window))
    })
}

/// Resolves a broadcast's selector now: the ids of the agents it reaches, by name.
pub async fn resolve(
    store: &dyn Store,
    org: OrgId,
    selector: &LabelSelector,
    online_only: bool,
    online_window: Duration,
) -> StoreResult<Vec<AgentId>> {
    let agents = store.list_agents(org).await?;
    let now = store.now();
    Ok(select(&agents, selector, online_only, now, online_window)
        .map(|agent| agent.id)
        .collect())
}
