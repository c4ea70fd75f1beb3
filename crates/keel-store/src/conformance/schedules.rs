//! Schedules: create, read, pause, resume, delete, the due read, and the fire steps (once per
//! fire time; the missed-fire policies).

use std::time::Duration as StdDuration;

use serde_json::json;
use time::macros::datetime;
use time::{Duration, OffsetDateTime};

use super::{START, agent, tenant};
use crate::schedule::{
    AdvanceOutcome, FireCommands, FireRecord, Fired, NewSchedule, Schedule, ScheduleAdvance,
    run_due_schedules,
};
use crate::{
    CommandFilter, ManualClock, MissedFires, NewCommand, NewCommandItem, OrgId, ScheduleState,
    Store, StoreError, Target,
};

/// The grace the suite's scheduler runs with: the clock moves in whole seconds, so a fire time
/// is on time only at the instant it is due.
pub const GRACE: StdDuration = StdDuration::from_millis(500);

/// A schedule on `cron` (Europe/Berlin) whose commands go to the queue `queue`.
pub fn new_schedule(cron: &str, queue: &str, missed: MissedFires) -> NewSchedule {
    NewSchedule {
        name: Some(format!("{cron} on {queue}")),
        cron: cron.to_owned(),
        timezone: "Europe/Berlin".to_owned(),
        command: json!({"type": "tick", "queue": queue}),
        missed,
    }
}

/// The suite's stand-in for the HTTP layer's template reader: one command on the template's
/// `queue`, or for the template's `agent_id`, due at the fire time, which it carries in params.
pub fn items_for(
    schedule: &Schedule,
    fire_at: OffsetDateTime,
) -> Result<Vec<NewCommandItem>, String> {
    let target = match (
        schedule.command.get("queue").and_then(|q| q.as_str()),
        schedule.command.get("agent_id").and_then(|a| a.as_str()),
    ) {
        (Some(queue), _) => Target::Queue(queue.to_owned()),
        (None, Some(agent)) => Target::Agent(agent.parse().map_err(|_| "bad agent")?),
        _ => return Err("no target".to_owned()),
    };
    let mut command = NewCommand::new("tick", target, json!({"fire_at": fire_at.unix_timestamp()}));
    command.run_at = Some(fire_at);
    Ok(vec![NewCommandItem {
        command,
        idempotency: None,
    }])
}

/// One scheduler run at the store's now.
pub async fn run(store: &dyn Store) -> Vec<Fired> {
    run_due_schedules(store, GRACE, |schedule, fire_at| {
        items_for(schedule, fire_at).map(FireCommands::Items)
    })
    .await
    .unwrap()
}

/// The fire times (Unix seconds) of the commands on `queue`, as their params carry them,
/// oldest first.
pub async fn fired_times(store: &dyn Store, org: OrgId, queue: &str) -> Vec<i64> {
    let filter = CommandFilter {
        queue: Some(queue.to_owned()),
        ..CommandFilter::default()
    };
    let page = store.list_commands(org, filter, None, 500).await.unwrap();
    let mut times: Vec<i64> = page
        .items
        .iter()
        .map(|c| c.params["fire_at"].as_i64().unwrap())
        .collect();
    times.sort_unstable();
    times
}

fn secs(s: i64) -> Duration {
    Duration::seconds(s)
}

fn at(s: i64) -> i64 {
    (START + secs(s)).unix_timestamp()
}

pub async fn schedules_create_read_pause_delete(store: &dyn Store, clock: &ManualClock) {
    let org = tenant(store, "acme").await.org;
    for (cron, timezone, field) in [
        ("61 * * * *", "Europe/Berlin", "cron"),
        ("* * * * * * 2030", "Europe/Berlin", "cron"),
        ("0 2 * * *", "Europe/Nowhere", "timezone"),
        ("0 0 30 2 *", "UTC", "cron"),
    ] {
        let mut new = new_schedule(cron, "q", MissedFires::Skip);
        new.timezone = timezone.to_owned();
        match store.create_schedule(org, new).await {
            Err(StoreError::InvalidInput(what)) => {
                assert!(what.starts_with(&format!("{field}:")), "{what}");
            }
            other => panic!("{cron} in {timezone}: {other:?}"),
        }
    }

    let daily = store
        .create_schedule(org, new_schedule("0 2 * * *", "q", MissedFires::Skip))
        .await
        .unwrap();
    assert_eq!(daily.state, ScheduleState::Active);
    assert_eq!(daily.next_fire_at, Some(datetime!(2030-01-01 02:00 +01:00)));
    assert_eq!(daily.last_fire_at, None);
    assert_eq!(daily.command, json!({"type": "tick", "queue": "q"}));
    assert_eq!(
        store.get_schedule(org, daily.id).await.unwrap(),
        Some(daily.clone())
    );

    let second = store
        .create_schedule(
            org,
            new_schedule("*/5 * * * *", "q", MissedFires::CatchUpOne),
        )
        .await
        .unwrap();
    let third = store
        .create_schedule(org, new_schedule("0 * * * *", "q", MissedFires::Skip))
        .await
        .unwrap();
    let first_page = store.list_schedules(org, None, 2).await.unwrap();
    let ids: Vec<_> = first_page.items.iter().map(|s| s.id).collect();
    assert_eq!(ids, vec![daily.id, second.id]);
    assert_eq!(first_page.next_cursor, Some(second.id));
    let rest = store
        .list_schedules(org, first_page.next_cursor, 2)
        .await
        .unwrap();
    assert_eq!(rest.items.len(), 1);
    assert_eq!(rest.items[0].id, third.id);
    assert_eq!(rest.next_cursor, None);

    // A paused schedule is not due, however late it gets; pausing twice is not an error.
    let paused = store
        .set_schedule_state(org, daily.id, ScheduleState::Paused)
        .await
        .unwrap();
    assert_eq!(paused.state, ScheduleState::Paused);
    store
        .set_schedule_state(org, daily.id, ScheduleState::Paused)
        .await
        .unwrap();
    clock.advance(secs(3 * 3600));
    let due: Vec<_> = store
        .due_schedules(100)
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.id)
        .collect();
    assert_eq!(due, vec![second.id, third.id]);
    let resumed = store
        .set_schedule_state(org, daily.id, ScheduleState::Active)
        .await
        .unwrap();
    assert_eq!(resumed.state, ScheduleState::Active);
    // The next fire time stayed: the fire time passed while paused is due (and missed).
    assert_eq!(resumed.next_fire_at, daily.next_fire_at);
    let due = store.due_schedules(100).await.unwrap();
    assert_eq!(due.len(), 3);
    assert!(due.iter().any(|s| s.id == daily.id));
    assert!(
        due.windows(2)
            .all(|w| w[0].next_fire_at <= w[1].next_fire_at),
        "earliest next fire time first"
    );

    store.delete_schedule(org, daily.id).await.unwrap();
    assert_eq!(store.get_schedule(org, daily.id).await.unwrap(), None);
    assert!(matches!(
        store.delete_schedule(org, daily.id).await,
        Err(StoreError::NotFound)
    ));
    assert!(matches!(
        store
            .set_schedule_state(org, daily.id, ScheduleState::Active)
            .await,
        Err(StoreError::NotFound)
    ));
}

pub async fn schedules_are_isolated(store: &dyn Store, clock: &ManualClock) {
    let a = tenant(store, "a").await.org;
    let b = tenant(store, "b").await.org;
    let schedule = store
        .create_schedule(a, new_schedule("* * * * * *", "q", MissedFires::Skip))
        .await
        .unwrap();
    clock.advance(secs(1));
    assert_eq!(run(store).await.len(), 1);

    assert_eq!(store.get_schedule(b, schedule.id).await.unwrap(), None);
    assert!(
        store
            .list_schedules(b, None, 100)
            .await
            .unwrap()
            .items
            .is_empty()
    );
    assert!(
        store
            .list_schedule_fires(b, schedule.id, None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    for state in [ScheduleState::Paused, ScheduleState::Active] {
        assert!(matches!(
            store.set_schedule_state(b, schedule.id, state).await,
            Err(StoreError::NotFound)
        ));
    }
    assert!(matches!(
        store.delete_schedule(b, schedule.id).await,
        Err(StoreError::NotFound)
    ));
    // B cannot move A's schedule on either.
    let step = ScheduleAdvance {
        org: b,
        schedule: schedule.id,
        due: START + secs(2),
        next: Some(START + secs(3)),
        fire: None,
    };
    assert_eq!(
        store.advance_schedule(step).await.unwrap(),
        AdvanceOutcome::Stale
    );
    let after = store.get_schedule(a, schedule.id).await.unwrap().unwrap();
    assert_eq!(after.state, ScheduleState::Active);
    assert_eq!(after.next_fire_at, Some(START + secs(2)));
    assert_eq!(
        store
            .list_schedule_fires(a, schedule.id, None, 10)
            .await
            .unwrap()
            .len(),
        1
    );
}

pub async fn schedule_fires_once_per_fire_time(store: &dyn Store, clock: &ManualClock) {
    let org = tenant(store, "acme").await.org;
    let schedule = store
        .create_schedule(org, new_schedule("* * * * * *", "ticks", MissedFires::Skip))
        .await
        .unwrap();
    assert!(run(store).await.is_empty(), "nothing is due yet");
    for n in 1..=5 {
        clock.advance(secs(1));
        let fired = run(store).await;
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].fire.fire_at, START + secs(n));
        assert_eq!(fired[0].fire.command_ids.len(), 1);
        assert_eq!(fired[0].targets, vec![Target::Queue("ticks".to_owned())]);
        // A second run at the same instant finds nothing due.
        assert!(run(store).await.is_empty());
    }
    assert_eq!(
        fired_times(store, org, "ticks").await,
        (1..=5).map(at).collect::<Vec<_>>()
    );
    let current = store.get_schedule(org, schedule.id).await.unwrap().unwrap();
    assert_eq!(current.last_fire_at, Some(START + secs(5)));
    assert_eq!(current.next_fire_at, Some(START + secs(6)));

    // The fire records name their commands, newest first.
    let fires = store
        .list_schedule_fires(org, schedule.id, None, 3)
        .await
        .unwrap();
    assert_eq!(
        fires.iter().map(|f| f.fire_at).collect::<Vec<_>>(),
        vec![START + secs(5), START + secs(4), START + secs(3)]
    );
    let command = store
        .get_command(org, fires[0].command_ids[0])
        .await
        .unwrap()
        .unwrap();
    assert_eq!(command.run_at, START + secs(5));
    // The next page: the fires before the last one listed.
    let older = store
        .list_schedule_fires(org, schedule.id, Some(fires[2].fire_at), 3)
        .await
        .unwrap();
    assert_eq!(
        older.iter().map(|f| f.fire_at).collect::<Vec<_>>(),
        vec![START + secs(2), START + secs(1)]
    );

    // A step from a next fire time the schedule has left writes nothing.
    let template = Schedule {
        next_fire_at: Some(START + secs(5)),
        ..current.clone()
    };
    let stale = ScheduleAdvance {
        org,
        schedule: schedule.id,
        due: START + secs(5),
        next: Some(START + secs(6)),
        fire: Some(FireRecord {
            fire_at: START + secs(5),
            items: items_for(&template, START + secs(5)).unwrap(),
            broadcast: None,
            error: None,
        }),
    };
    assert_eq!(
        store.advance_schedule(stale).await.unwrap(),
        AdvanceOutcome::Stale
    );
    // A step from the current next fire time that names a fire time already recorded is
    // refused whole: no command, and the schedule does not move.
    let again = ScheduleAdvance {
        org,
        schedule: schedule.id,
        due: START + secs(6),
        next: Some(START + secs(7)),
        fire: Some(FireRecord {
            fire_at: START + secs(5),
            items: items_for(&template, START + secs(5)).unwrap(),
            broadcast: None,
            error: None,
        }),
    };
    assert_eq!(
        store.advance_schedule(again).await.unwrap(),
        AdvanceOutcome::Stale
    );
    assert_eq!(fired_times(store, org, "ticks").await.len(), 5);
    assert_eq!(
        store.get_schedule(org, schedule.id).await.unwrap().unwrap(),
        current
    );
}

/// Fires at 1 s, then a gap: the fire times 2 … 11 are missed (10 of them), and the run comes
/// at 12 s.
async fn run_across_a_gap(
    store: &dyn Store,
    clock: &ManualClock,
    org: OrgId,
    missed: MissedFires,
    queue: &str,
) -> Vec<i64> {
    store
        .create_schedule(org, new_schedule("* * * * * *", queue, missed))
        .await
        .unwrap();
    clock.set(START + secs(1));
    run(store).await;
    clock.set(START + secs(12));
    run(store).await;
    clock.set(START + secs(13));
    run(store).await;
    fired_times(store, org, queue).await
}

/// Pauses the organisation's one schedule after its fire time 13, and resumes it at 24: the
/// fire times 14 … 23 passed while it was paused (10 of them), and none fired meanwhile.
async fn pause_across_a_gap(store: &dyn Store, clock: &ManualClock, org: OrgId) -> Schedule {
    let schedule = store.list_schedules(org, None, 10).await.unwrap().items[0].clone();
    store
        .set_schedule_state(org, schedule.id, ScheduleState::Paused)
        .await
        .unwrap();
    clock.set(START + secs(24));
    assert!(run(store).await.is_empty());
    store
        .set_schedule_state(org, schedule.id, ScheduleState::Active)
        .await
        .unwrap()
}

pub async fn skip_fires_nothing_for_missed_times(store: &dyn Store, clock: &ManualClock) {
    let org = tenant(store, "acme").await.org;
    let times = run_across_a_gap(store, clock, org, MissedFires::Skip, "skip").await;
    // Nothing for 2 … 11; 12 is on time when the run comes, 13 follows.
    assert_eq!(times, vec![at(1), at(12), at(13)]);

    // The same after a pause: resumed 10 fire times later, nothing for the paused time.
    let schedule = pause_across_a_gap(store, clock, org).await;
    run(store).await;
    assert_eq!(
        fired_times(store, org, "skip").await,
        vec![at(1), at(12), at(13), at(24)]
    );
    let fired = store.get_schedule(org, schedule.id).await.unwrap().unwrap();
    assert_eq!(fired.next_fire_at, Some(START + secs(25)));
}

pub async fn catch_up_one_fires_once_for_missed_times(store: &dyn Store, clock: &ManualClock) {
    let org = tenant(store, "acme").await.org;
    let times = run_across_a_gap(store, clock, org, MissedFires::CatchUpOne, "catch-up").await;
    // One command for 2 … 11, for the latest of them; then 12 on time, and 13.
    assert_eq!(times, vec![at(1), at(11), at(12), at(13)]);

    // The same after a pause.
    pause_across_a_gap(store, clock, org).await;
    let fired = run(store).await;
    assert_eq!(fired.len(), 2);
    assert_eq!(
        fired_times(store, org, "catch-up").await,
        vec![at(1), at(11), at(12), at(13), at(23), at(24)]
    );
}

pub async fn a_refused_fire_is_recorded_with_its_reason(store: &dyn Store, clock: &ManualClock) {
    let acme = tenant(store, "acme").await;
    let other = tenant(store, "other").await;
    let elsewhere = agent(store, other.org, "theirs").await;
    // A template that names another organisation's agent: the store refuses its command.
    let mut new = new_schedule("* * * * * *", "unused", MissedFires::Skip);
    new.command = json!({"type": "tick", "agent_id": elsewhere.to_string()});
    let schedule = store.create_schedule(acme.org, new).await.unwrap();
    clock.advance(secs(1));
    let fired = run(store).await;
    assert_eq!(fired.len(), 1);
    assert!(fired[0].fire.command_ids.is_empty());
    assert!(fired[0].targets.is_empty());
    assert_eq!(
        fired[0].fire.error.as_deref(),
        Some(StoreError::UnknownAgent.to_string().as_str())
    );
    let page = store
        .list_commands(acme.org, CommandFilter::default(), None, 10)
        .await
        .unwrap();
    assert!(page.items.is_empty());
    // The schedule moved on: the next run fires the next time, not this one again.
    let after = store
        .get_schedule(acme.org, schedule.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(after.next_fire_at, Some(START + secs(2)));
    clock.advance(secs(1));
    assert_eq!(run(store).await[0].fire.fire_at, START + secs(2));
}

pub async fn a_panicking_template_fails_its_own_fire_alone(store: &dyn Store, clock: &ManualClock) {
    let org = tenant(store, "acme").await.org;
    for queue in ["boom", "fine"] {
        store
            .create_schedule(org, new_schedule("* * * * * *", queue, MissedFires::Skip))
            .await
            .unwrap();
    }
    clock.advance(secs(1));
    let fired = run_due_schedules(store, GRACE, |schedule, fire_at| {
        if schedule.command["queue"] == "boom" {
            panic!("template reader failed");
        }
        items_for(schedule, fire_at).map(FireCommands::Items)
    })
    .await
    .unwrap();
    assert_eq!(fired.len(), 2);
    let boom = fired
        .iter()
        .find(|f| f.schedule.command["queue"] == "boom")
        .unwrap();
    assert!(boom.fire.command_ids.is_empty());
    let error = boom.fire.error.as_deref().unwrap();
    assert!(error.contains("template reader failed"), "{error}");
    assert_eq!(fired_times(store, org, "fine").await, vec![at(1)]);
    // Both go on at the next fire time.
    clock.advance(secs(1));
    assert_eq!(run(store).await.len(), 2);
}
