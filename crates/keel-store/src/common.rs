//! Rules every backend applies alike: checks of new commands and notifications, paging, and
//! the mapping of database errors to what they mean.

use std::time::Duration;

use time::OffsetDateTime;

use crate::error::{StoreError, StoreResult};
use crate::labels::Labels;
use crate::model::{AgentId, CommandStatus, NewApiKey, NewBroadcast, NewCommand, Scope, Target};
use crate::notifications::MAX_DELIVERIES_PER_EVENT;
use crate::notifications::model::{
    DeliveryFilter, DeliveryStatus, EventId, NewDelivery, NewEvent, NewSetting, SettingKind,
};
use crate::schedule::BroadcastFire;
use crate::store::MAX_BATCH_CREATE;

/// A page from `items`, read with one more than `limit` to know whether there is a next page:
/// at most `limit` of them, and the cursor of the next page (the last one's id) when there is
/// one.
pub(crate) fn page_of<T, I>(
    mut items: Vec<T>,
    limit: u32,
    id: impl Fn(&T) -> I,
) -> (Vec<T>, Option<I>) {
    if items.len() > limit as usize {
        items.truncate(limit as usize);
        let cursor = items.last().map(id);
        (items, cursor)
    } else {
        (items, None)
    }
}

/// `NotFound` unless a statement changed a row.
pub(crate) fn found(rows_affected: u64) -> StoreResult<()> {
    if rows_affected == 0 {
        Err(StoreError::NotFound)
    } else {
        Ok(())
    }
}

/// The rules every new command meets, whatever its backend.
pub(crate) fn validate_new_command(command: &NewCommand) -> StoreResult<()> {
    let invalid = |msg: &str| Err(StoreError::InvalidInput(msg.to_owned()));
    if command.command_type.trim().is_empty() {
        return invalid("command type is empty");
    }
    if let Target::Queue(queue) = &command.target
        && let Err(rule) = crate::store::check_queue_name(queue)
    {
        return Err(StoreError::InvalidInput(format!("queue: {rule}")));
    }
    if command.max_attempts == 0 {
        return invalid("max_attempts must be at least 1");
    }
    if command.lease_duration < Duration::from_millis(1) {
        return invalid("lease_duration must be at least 1 ms");
    }
    Ok(())
}

/// A broadcast is created with its children ([`Store::create_broadcast`]), never alone.
pub(crate) fn not_a_broadcast(command: &NewCommand) -> StoreResult<()> {
    match command.target {
        Target::Broadcast(_) => Err(StoreError::InvalidInput(
            "a broadcast is created with its children".to_owned(),
        )),
        Target::Agent(_) | Target::Queue(_) => Ok(()),
    }
}

/// Rewrites a `Conflict` with a message that names what exists.
pub(crate) fn conflict_as(err: StoreError, message: String) -> StoreError {
    match err {
        StoreError::Conflict(_) => StoreError::Conflict(message),
        other => other,
    }
}

/// Turns a foreign key violation (a referenced row is missing) into `missing`.
pub(crate) fn missing_as(err: StoreError, missing: StoreError) -> StoreError {
    if err.is_foreign_key_violation() {
        missing
    } else {
        err
    }
}

/// A stored value the code cannot read back.
pub(crate) fn corrupt(what: impl ToString) -> StoreError {
    StoreError::Database(sqlx::Error::Decode(what.to_string().into()))
}

/// An instant kept as microseconds since the Unix epoch (SQLite's encoding).
pub(crate) fn from_micros(micros: i64) -> StoreResult<OffsetDateTime> {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(micros) * 1000)
        .map_err(|err| corrupt(format!("instant {micros} µs: {err}")))
}

/// A stored count as `u32`.
pub(crate) fn to_u32(value: i64) -> StoreResult<u32> {
    u32::try_from(value).map_err(|_| corrupt(format!("{value} is not a count")))
}

/// A stored command status.
pub(crate) fn parse_status(status: &str) -> StoreResult<CommandStatus> {
    status.parse().map_err(corrupt)
}

/// A duration in whole milliseconds, as the lease columns keep it.
pub(crate) fn duration_millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The scopes of a new API key, in their canonical order, and the agent it is bound to; `Err`
/// names what is wrong with the request.
pub(crate) fn check_new_api_key(key: &NewApiKey) -> StoreResult<(Vec<Scope>, Option<String>)> {
    if key.name.trim().is_empty() || key.name.chars().any(char::is_control) {
        return Err(StoreError::InvalidInput(
            "name: printable characters, not empty".to_owned(),
        ));
    }
    let scopes: Vec<Scope> = Scope::ALL
        .iter()
        .copied()
        .filter(|s| key.scopes.contains(s))
        .collect();
    if scopes.is_empty() {
        return Err(StoreError::InvalidInput(
            "an API key needs a scope".to_owned(),
        ));
    }
    let agent_name = match (scopes.contains(&Scope::Agent), &key.agent_name) {
        (true, Some(name)) if !name.trim().is_empty() => Some(name.clone()),
        (true, _) => {
            return Err(StoreError::InvalidInput(
                "an agent key needs an agent name".to_owned(),
            ));
        }
        (false, Some(_)) => {
            return Err(StoreError::InvalidInput(
                "only a key with the agent scope is bound to an agent".to_owned(),
            ));
        }
        (false, None) => None,
    };
    Ok((scopes, agent_name))
}

/// Why a delivery whose retryable failures used up its attempts is dead.
pub(crate) const ATTEMPTS_EXHAUSTED: &str = "attempts_exhausted";

/// The rules every new or replacing notification setting meets.
pub(crate) fn check_new_setting(setting: &NewSetting) -> StoreResult<()> {
    if setting.name.trim().is_empty() || setting.name.chars().any(char::is_control) {
        return Err(StoreError::InvalidInput(
            "name: printable characters, not empty".to_owned(),
        ));
    }
    Ok(())
}

/// The message of a `Conflict` on a setting's unique key.
pub(crate) fn setting_taken(kind: SettingKind, key: Option<&str>) -> String {
    format!("a {kind} for `{}` exists", key.unwrap_or_default())
}

/// The rules a triggered event and its deliveries meet.
pub(crate) fn check_trigger(event: &NewEvent, deliveries: &[NewDelivery]) -> StoreResult<()> {
    if event.event_type.trim().is_empty() {
        return Err(StoreError::InvalidInput("event type is empty".to_owned()));
    }
    if deliveries.len() > MAX_DELIVERIES_PER_EVENT {
        return Err(StoreError::InvalidInput(format!(
            "an event gives at most {MAX_DELIVERIES_PER_EVENT} deliveries"
        )));
    }
    for (n, delivery) in deliveries.iter().enumerate() {
        let invalid =
            |what: &str| Err(StoreError::InvalidInput(format!("deliveries[{n}]: {what}")));
        if delivery.recipient.trim().is_empty() {
            return invalid("recipient is empty");
        }
        if delivery.max_attempts == 0 {
            return invalid("max_attempts must be at least 1");
        }
        if delivery.lease_duration < Duration::from_millis(1) {
            return invalid("lease_duration must be at least 1 ms");
        }
    }
    Ok(())
}

/// Checks a new broadcast: its target is a selector, it reaches 1 to [`MAX_BATCH_CREATE`]
/// agents, each once, and `max_concurrency` is at least 1.
pub(crate) fn check_broadcast(broadcast: &NewBroadcast) -> StoreResult<()> {
    let invalid = |msg: String| Err(StoreError::InvalidInput(msg));
    let Target::Broadcast(selector) = &broadcast.command.target else {
        return invalid("a broadcast's target is its selector".to_owned());
    };
    if broadcast.agents.is_empty() {
        return invalid(format!("selector: `{selector}` matches no agent"));
    }
    if broadcast.agents.len() > MAX_BATCH_CREATE {
        return invalid(format!(
            "selector: `{selector}` matches {} agents; a broadcast reaches at most \
             {MAX_BATCH_CREATE}",
            broadcast.agents.len()
        ));
    }
    if broadcast.max_concurrency == Some(0) {
        return invalid("max_concurrency must be at least 1".to_owned());
    }
    let mut agents = broadcast.agents.clone();
    agents.sort();
    agents.dedup();
    if agents.len() != broadcast.agents.len() {
        return invalid("a broadcast names each agent once".to_owned());
    }
    Ok(())
}

/// What a new delivery is recognised by.
pub(crate) struct DeliveryKeys {
    /// Unique in its organisation: its event, its channel (or channel type, for a message sent
    /// directly) and its recipient.
    pub(crate) dedupe: String,
    /// What its throttle window counts: its event type, channel and recipient.
    pub(crate) throttle: String,
}

/// The keys of `delivery`, a delivery of the event `event_id` of type `event_type`.
pub(crate) fn delivery_keys(
    event_id: EventId,
    event_type: &str,
    delivery: &NewDelivery,
) -> DeliveryKeys {
    let channel = delivery.channel_id.map_or_else(
        || delivery.channel_type.as_str().to_owned(),
        |c| c.to_string(),
    );
    DeliveryKeys {
        dedupe: format!("{event_id}/{channel}/{}", delivery.recipient),
        throttle: format!("{event_type}/{channel}/{}", delivery.recipient),
    }
}

/// A requeue by filter names no status, or `dead` or `failed`.
pub(crate) fn check_requeue_filter(filter: &DeliveryFilter) -> StoreResult<()> {
    if filter
        .status
        .is_some_and(|s| !matches!(s, DeliveryStatus::Dead | DeliveryStatus::Failed))
    {
        return Err(StoreError::InvalidInput(
            "status: only dead or failed deliveries are requeued".to_owned(),
        ));
    }
    Ok(())
}

/// The broadcast a scheduled fire creates at `now`: the agents (id, labels, last seen, in the
/// order their children are made) its selector matches, online ones only when it asks, checked
/// as [`check_broadcast`] checks a created one (errors name the `command.` field).
pub(crate) fn broadcast_of_fire(
    fire: BroadcastFire,
    agents: impl IntoIterator<Item = (AgentId, Labels, Option<OffsetDateTime>)>,
    now: OffsetDateTime,
) -> StoreResult<NewBroadcast> {
    let window = time::Duration::try_from(fire.online_window).unwrap_or(time::Duration::MAX);
    let agents = agents
        .into_iter()
        .filter(|(_, labels, last_seen)| {
            let online = last_seen.is_some_and(|seen| now - seen <= window);
            fire.selector.matches(labels) && (online || !fire.online_only)
        })
        .map(|(id, _, _)| id)
        .collect();
    let new = NewBroadcast {
        command: fire.command,
        online_only: fire.online_only,
        max_concurrency: fire.max_concurrency,
        agents,
    };
    check_broadcast(&new).map_err(|err| match err {
        StoreError::InvalidInput(why) => StoreError::InvalidInput(format!("command.{why}")),
        other => other,
    })?;
    Ok(new)
}

/// A stored command's target: its agent, its queue, or for a broadcast parent (a queue and a
/// selector, see the fleet migration) its selector. `None` for a row that is none of these.
pub(crate) fn command_target(
    agent: Option<AgentId>,
    queue: Option<String>,
    selector: Option<String>,
) -> Option<Target> {
    match (agent, queue, selector) {
        (Some(agent), None, None) => Some(Target::Agent(agent)),
        (None, Some(queue), None) => Some(Target::Queue(queue)),
        (None, Some(_), Some(selector)) => Some(Target::Broadcast(selector)),
        _ => None,
    }
}
