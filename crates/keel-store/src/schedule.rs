//! Schedules: a cron pattern in an IANA time zone that creates commands from a template at
//! each fire time, and what happens to fire times the scheduler missed.
//!
//! Patterns are parsed by [`croner`] (5 fields, or 6 with seconds first; no year field), time
//! zones by [`chrono_tz`] (the tz database compiled in). Daylight saving transitions follow
//! croner's documented rules: a fixed time that falls into a spring-forward gap fires at the
//! first instant after the gap, on the same day; a fixed time that a fall-back repeats fires
//! once, at its first occurrence; wildcard and step fields skip the instants of a gap and fire
//! in both passes of a repeated hour.

use std::time::Duration;

use chrono::{Offset as _, TimeZone as _};
use croner::Cron;
use croner::parser::{CronParser, Seconds, Year};
use serde_json::Value;
use time::{OffsetDateTime, UtcOffset};

use crate::error::{StoreError, StoreResult};
use crate::labels::LabelSelector;
use crate::model::{
    CommandId, MissedFires, NewCommand, NewCommandItem, OrgId, ScheduleId, ScheduleState, Target,
};
use crate::store::Store;

/// The most fire times a schedule's answer lists.
pub const NEXT_FIRES_SHOWN: usize = 5;

/// A schedule's pattern or time zone that cannot be used, with the field it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidSchedule {
    /// `cron` or `timezone`.
    pub field: &'static str,
    /// What is wrong with it.
    pub message: String,
}

/// A parsed cron pattern in its time zone: the fire times of a schedule.
#[derive(Debug, Clone)]
pub struct FireTimes {
    cron: Cron,
    zone: chrono_tz::Tz,
}

impl FireTimes {
    /// Parses `pattern` (5 fields, or 6 with seconds first) in the IANA time zone `timezone`.
    /// A pattern that fires never again after `now` is refused too.
    pub fn parse(pattern: &str, timezone: &str) -> Result<Self, InvalidSchedule> {
        let zone: chrono_tz::Tz = timezone.parse().map_err(|_| InvalidSchedule {
            field: "timezone",
            message: format!("`{timezone}` is not an IANA time zone name (e.g. Europe/Berlin)"),
        })?;
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .year(Year::Disallowed)
            .build()
            .parse(pattern)
            .map_err(|err| InvalidSchedule {
                field: "cron",
                message: format!("`{pattern}`: {err}"),
            })?;
        Ok(Self { cron, zone })
    }

    /// Parses as [`FireTimes::parse`] does, and refuses a pattern that has no fire time after
    /// `now` (`0 0 30 2 *`); returns the first one. Finding that a pattern never matches may
    /// search years ahead (a good part of a second): callers on an async runtime run this on a
    /// blocking thread.
    pub fn parse_firing(
        pattern: &str,
        timezone: &str,
        now: OffsetDateTime,
    ) -> Result<(Self, OffsetDateTime), InvalidSchedule> {
        let times = Self::parse(pattern, timezone)?;
        let first = times.next_after(now).ok_or_else(|| InvalidSchedule {
            field: "cron",
            message: format!("`{pattern}` has no fire time after now"),
        })?;
        Ok((times, first))
    }

    /// The first fire time strictly after `t`, in the schedule's time zone; `None` when there
    /// is none (the pattern never matches again within croner's search range).
    pub fn next_after(&self, t: OffsetDateTime) -> Option<OffsetDateTime> {
        // Fire times are whole seconds: searching after `t` rounded down finds the first one
        // after `t` itself.
        let start = self.to_zone(t)?;
        let found = self.cron.find_next_occurrence(&start, false).ok()?;
        instant(&found)
    }

    /// The first fire time at or after `t`.
    pub fn next_at_or_after(&self, t: OffsetDateTime) -> Option<OffsetDateTime> {
        self.next_after(t - time::Duration::microseconds(1))
    }

    /// The last fire time strictly before `t`.
    pub fn last_before(&self, t: OffsetDateTime) -> Option<OffsetDateTime> {
        // Rounded up to a whole second, so that a fire time between `t` and the next whole
        // second (there is none: fire times are whole seconds) cannot be found.
        let whole = if t.nanosecond() == 0 {
            t
        } else {
            t.replace_nanosecond(0).ok()? + time::Duration::SECOND
        };
        let start = self.to_zone(whole)?;
        let found = self.cron.find_previous_occurrence(&start, false).ok()?;
        instant(&found)
    }

    /// The next `n` fire times strictly after `t`.
    pub fn upcoming(&self, t: OffsetDateTime, n: usize) -> Vec<OffsetDateTime> {
        let mut times = Vec::with_capacity(n);
        let mut cursor = t;
        while times.len() < n {
            let Some(next) = self.next_after(cursor) else {
                break;
            };
            times.push(next);
            cursor = next;
        }
        times
    }

    /// `t` with the offset the schedule's time zone has at that instant.
    pub fn in_zone(&self, t: OffsetDateTime) -> OffsetDateTime {
        self.to_zone(t)
            .and_then(|zoned| instant(&zoned))
            .unwrap_or(t)
    }

    fn to_zone(&self, t: OffsetDateTime) -> Option<chrono::DateTime<chrono_tz::Tz>> {
        let utc = chrono::DateTime::from_timestamp(t.unix_timestamp(), t.nanosecond())?;
        Some(self.zone.from_utc_datetime(&utc.naive_utc()))
    }
}

/// A zoned chrono time as the store's type, with the same offset.
fn instant(zoned: &chrono::DateTime<chrono_tz::Tz>) -> Option<OffsetDateTime> {
    let offset = UtcOffset::from_whole_seconds(zoned.offset().fix().local_minus_utc()).ok()?;
    let utc = OffsetDateTime::from_unix_timestamp(zoned.timestamp()).ok()?;
    Some(utc.to_offset(offset))
}

/// What the scheduler does next for a schedule whose next fire time `due` has come.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FireStep {
    /// Create the commands of the fire time `fire_at`, and wait for `next` (none: the pattern
    /// has no later fire time).
    Fire {
        /// The fire time the commands belong to.
        fire_at: OffsetDateTime,
        /// The schedule's next fire time after this step.
        next: Option<OffsetDateTime>,
    },
    /// Create nothing (the fire times up to `next` were missed, and the policy is `skip`), and
    /// wait for `next`.
    Skip {
        /// The schedule's next fire time after this step.
        next: Option<OffsetDateTime>,
    },
}

/// The step for a schedule due at `due` (its stored next fire time) at `now`. A fire time is
/// on time while it is at most `grace` old; an older one was missed (the server was down, the
/// schedule paused, the scheduler held up):
///
/// - `due` on time: it fires, and the schedule waits for the fire time after it (which may be
///   due already: the next step fires it).
/// - `due` missed, `skip`: nothing fires for the missed times; the schedule waits for the first
///   fire time that is not missed (at or after `now - grace`).
/// - `due` missed, `catch_up_one`: the latest missed fire time fires, once, for all of them;
///   then the schedule waits for the first fire time that is not missed.
pub fn plan_fire(
    times: &FireTimes,
    due: OffsetDateTime,
    now: OffsetDateTime,
    grace: Duration,
    missed: MissedFires,
) -> FireStep {
    let cutoff = now.saturating_sub(time::Duration::try_from(grace).unwrap_or(time::Duration::MAX));
    if due >= cutoff {
        return FireStep::Fire {
            fire_at: due,
            next: times.next_after(due),
        };
    }
    let next = times.next_at_or_after(cutoff);
    match missed {
        MissedFires::Skip => FireStep::Skip { next },
        MissedFires::CatchUpOne => FireStep::Fire {
            // `due` is a missed fire time, so there is one at least; `due` if the search fails.
            fire_at: times
                .last_before(cutoff)
                .filter(|t| *t >= due)
                .unwrap_or(due),
            next,
        },
    }
}

/// What to create a schedule with.
#[derive(Debug, Clone, PartialEq)]
pub struct NewSchedule {
    /// A name for people; not unique.
    pub name: Option<String>,
    /// The cron pattern (5 fields, or 6 with seconds first).
    pub cron: String,
    /// The IANA time zone the pattern is read in.
    pub timezone: String,
    /// The command template: the body of a command create, as the API took it.
    pub command: Value,
    /// What happens to missed fire times.
    pub missed: MissedFires,
}

/// A schedule as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// Its identifier.
    pub id: ScheduleId,
    /// Its organisation.
    pub org_id: OrgId,
    /// A name for people.
    pub name: Option<String>,
    /// The cron pattern.
    pub cron: String,
    /// The IANA time zone the pattern is read in.
    pub timezone: String,
    /// The command template.
    pub command: Value,
    /// What happens to missed fire times.
    pub missed: MissedFires,
    /// Active or paused.
    pub state: ScheduleState,
    /// The next fire time the scheduler will handle (it may have passed while paused); `None`
    /// when the pattern has no further fire time.
    pub next_fire_at: Option<OffsetDateTime>,
    /// The latest fire time handled: it created commands, or its record says why not.
    pub last_fire_at: Option<OffsetDateTime>,
    /// When it was created.
    pub created_at: OffsetDateTime,
    /// When it last changed.
    pub updated_at: OffsetDateTime,
}

impl Schedule {
    /// Its fire times (the pattern and time zone were checked when it was created).
    pub fn fire_times(&self) -> Result<FireTimes, InvalidSchedule> {
        FireTimes::parse(&self.cron, &self.timezone)
    }
}

/// A page of schedules, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct SchedulePage {
    /// The schedules.
    pub items: Vec<Schedule>,
    /// The cursor of the next page, when there is one.
    pub next_cursor: Option<ScheduleId>,
}

/// One fire time of a schedule that the scheduler handled: the commands it created.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleFire {
    /// The schedule.
    pub schedule_id: ScheduleId,
    /// The fire time.
    pub fire_at: OffsetDateTime,
    /// When the commands were created.
    pub fired_at: OffsetDateTime,
    /// The commands created for it, in creation order.
    pub command_ids: Vec<CommandId>,
    /// Why no command was created, when none could be (the template no longer validates, its
    /// agent is gone).
    pub error: Option<String>,
}

/// One step of a due schedule, written at once: the schedule moves from `due` to `next`, and
/// with `fire_at` the fire is recorded with its commands.
#[derive(Debug, Clone)]
pub struct ScheduleAdvance {
    /// The schedule's organisation.
    pub org: OrgId,
    /// The schedule.
    pub schedule: ScheduleId,
    /// Its next fire time as the scheduler read it: the write happens only if it still is
    /// (another instance, a pause or a delete got there first otherwise).
    pub due: OffsetDateTime,
    /// Its next fire time after this step.
    pub next: Option<OffsetDateTime>,
    /// The fire this step records, if it fires.
    pub fire: Option<FireRecord>,
}

/// What a [`ScheduleAdvance`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum AdvanceOutcome {
    /// The fire was recorded with its commands, and the schedule moved on.
    Fired(ScheduleFire),
    /// The schedule moved on without a fire (missed fire times skipped).
    Skipped,
    /// Nothing was written: the schedule is no longer active at `due` (another instance, a
    /// pause or a delete came first), or the fire time was recorded before.
    Stale,
}

/// The fire a [`ScheduleAdvance`] records.
#[derive(Debug, Clone)]
pub struct FireRecord {
    /// The fire time (unique per schedule: a second record of it is refused).
    pub fire_at: OffsetDateTime,
    /// The commands to create.
    pub items: Vec<NewCommandItem>,
    /// A broadcast to create, its selector resolved in the fire's own write.
    pub broadcast: Option<BroadcastFire>,
    /// Why there are no commands, when the template could not make any.
    pub error: Option<String>,
}

/// What one fire of a schedule creates from its template.
#[derive(Debug, Clone)]
pub enum FireCommands {
    /// Commands for one agent or one queue.
    Items(Vec<NewCommandItem>),
    /// A broadcast.
    Broadcast(BroadcastFire),
}

/// A broadcast a fire creates: the selector is resolved when the fire is written, on the agents
/// of that moment, exactly as a `POST /v1/commands` with a selector resolves it.
#[derive(Debug, Clone)]
pub struct BroadcastFire {
    /// The parent; its target is the selector ([`Target::Broadcast`]).
    pub command: NewCommand,
    /// The selector, parsed.
    pub selector: LabelSelector,
    /// Only agents seen within `online_window` of the fire's write.
    pub online_only: bool,
    /// At most this many children unfinished at once.
    pub max_concurrency: Option<u32>,
    /// How recently an agent must have been seen to count as online.
    pub online_window: Duration,
}

/// How many due schedules one read takes.
pub const DUE_BATCH: u32 = 100;

/// The most reads of due schedules one [`run_due_schedules`] makes; what is left waits for the
/// next run, so one run stays bounded after a long stop.
pub const MAX_DUE_ROUNDS: u32 = 100;

/// A fire that [`run_due_schedules`] recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct Fired {
    /// The schedule as it was read before the fire.
    pub schedule: Schedule,
    /// The fire, with the commands it created.
    pub fire: ScheduleFire,
    /// Who may run those commands (to wake the agents waiting for them).
    pub targets: Vec<Target>,
}

/// The scheduler's work: every due schedule takes its steps ([`plan_fire`]) until none is due,
/// each step one [`Store::advance_schedule`]. `items_for(schedule, fire_at)` makes the commands
/// of a fire from the schedule's template; when it cannot (`Err(why)`), or the store refuses
/// them (their agent is gone), the fire is recorded without commands and with the reason, so a
/// broken template cannot hold the schedule up. Each fire time creates its commands once,
/// whoever runs this and however often. Returns the fires recorded.
pub async fn run_due_schedules<F>(
    store: &dyn Store,
    grace: Duration,
    mut items_for: F,
) -> StoreResult<Vec<Fired>>
where
    F: FnMut(&Schedule, OffsetDateTime) -> Result<FireCommands, String> + Send,
{
    let mut fired = Vec::new();
    for _ in 0..MAX_DUE_ROUNDS {
        let due = store.due_schedules(DUE_BATCH).await?;
        if due.is_empty() {
            break;
        }
        let now = store.now();
        for schedule in due {
            let Some(due_at) = schedule.next_fire_at else {
                continue;
            };
            // A panic in one schedule's step (the pattern search, the template) is caught,
            // logged and counted here, so it cannot stop the others at every run.
            let scope = keel_guard::scope::current()
                .unwrap_or_else(|| keel_guard::Scope::new("schedules"))
                .with_context(format!("schedule {}", schedule.id));
            let step = keel_guard::isolate(scope.clone(), || {
                schedule
                    .fire_times()
                    .map(|times| plan_fire(&times, due_at, now, grace, schedule.missed))
            });
            let step = match step {
                Ok(Ok(step)) => step,
                // Checked at creation, so only a damaged row or a panicking search gets here:
                // the schedule stops firing rather than failing every run.
                Ok(Err(_)) | Err(_) => FireStep::Skip { next: None },
            };
            let (next, fire) = match step {
                FireStep::Skip { next } => (next, None),
                FireStep::Fire { fire_at, next } => {
                    let made = keel_guard::isolate(scope, || items_for(&schedule, fire_at))
                        .unwrap_or_else(|panicked| Err(panicked.to_string()));
                    let (items, broadcast, error) = match made {
                        Ok(FireCommands::Items(items)) => (items, None, None),
                        Ok(FireCommands::Broadcast(broadcast)) => {
                            (Vec::new(), Some(broadcast), None)
                        }
                        Err(why) => (Vec::new(), None, Some(why)),
                    };
                    let record = FireRecord {
                        fire_at,
                        items,
                        broadcast,
                        error,
                    };
                    (next, Some(record))
                }
            };
            let targets: Vec<Target> = fire
                .iter()
                .flat_map(|f| {
                    f.items
                        .iter()
                        .map(|item| &item.command)
                        .chain(f.broadcast.iter().map(|b| &b.command))
                        .map(|command| command.target.clone())
                })
                .collect();
            let mut step = ScheduleAdvance {
                org: schedule.org_id,
                schedule: schedule.id,
                due: due_at,
                next,
                fire,
            };
            let outcome = match store.advance_schedule(step.clone()).await {
                Err(refused @ (StoreError::UnknownAgent | StoreError::InvalidInput(_))) => {
                    // Recorded without commands, with the reason.
                    if let Some(fire) = &mut step.fire {
                        fire.items.clear();
                        fire.broadcast = None;
                        fire.error = Some(refused.to_string());
                    }
                    store.advance_schedule(step).await?
                }
                other => other?,
            };
            if let AdvanceOutcome::Fired(fire) = outcome {
                let targets = if fire.command_ids.is_empty() {
                    Vec::new()
                } else {
                    targets.clone()
                };
                fired.push(Fired {
                    schedule,
                    fire,
                    targets,
                });
            }
        }
    }
    Ok(fired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    fn berlin(pattern: &str) -> FireTimes {
        FireTimes::parse(pattern, "Europe/Berlin").unwrap()
    }

    #[test]
    fn five_and_six_fields_are_read_and_bad_input_names_its_field() {
        let minutely = berlin("*/15 * * * *");
        assert_eq!(
            minutely.next_after(datetime!(2030-01-10 12:07:30 UTC)),
            Some(datetime!(2030-01-10 12:15 UTC))
        );
        let every_second = berlin("* * * * * *");
        assert_eq!(
            every_second.next_after(datetime!(2030-01-10 12:07:30.5 UTC)),
            Some(datetime!(2030-01-10 12:07:31 UTC))
        );
        let err = FireTimes::parse("61 * * * *", "Europe/Berlin").unwrap_err();
        assert_eq!(err.field, "cron");
        let err = FireTimes::parse("* * * * * * 2030", "Europe/Berlin").unwrap_err();
        assert_eq!(err.field, "cron");
        let err = FireTimes::parse("nonsense", "UTC").unwrap_err();
        assert_eq!(err.field, "cron");
        let err = FireTimes::parse("* * * * *", "Mars/Olympus").unwrap_err();
        assert_eq!(err.field, "timezone");
    }

    /// Odd patterns are read or refused; none panics or hangs, and each read one answers its
    /// next fire times.
    #[test]
    fn odd_patterns_are_read_or_refused_without_a_panic() {
        let patterns = [
            "",
            " ",
            "*",
            "* * * *",
            "* * * * * * * *",
            "? ? ? ? ?",
            "L * * * *",
            "0 0 L * *",
            "0 0 1W * *",
            "0 0 LW * *",
            "0 0 * * 5#6",
            "0 0 * * 5#0",
            "0 0 * * 5L",
            "*/0 * * * *",
            "0/0 * * * *",
            "1-0 * * * *",
            "59-1 * * * *",
            "-1 * * * *",
            "1,,2 * * * *",
            "99999999999999999999999 * * * *",
            "٣ * * * *",
            "0 0 31 2 *",
            "0 0 30 2 *",
            "0 0 31 4,6,9,11 *",
            "0 0 29 2 *",
            "@yearly",
            "@reboot",
            "@every 5s",
            "0 0 * * 7",
            "0 0 * * 8",
            "0 0 * 13 *",
            "0 0 0 * *",
            "0 24 * * *",
            "60 * * * * *",
            "*/61 * * * * *",
            "0 0 * JAN-DEC MON-SUN",
            "0 0 * * SUN#5",
            "0 0 L-3 * *",
            "0 0 15W 2 *",
            "0 0 * * MON-FRI/2",
            "\u{0} * * * *",
            "0 0 1 1 * 2030",
        ];
        let start = datetime!(2030-01-01 00:00 UTC);
        for pattern in patterns {
            for zone in ["Europe/Berlin", "Pacific/Kiritimati"] {
                if let Ok(times) = FireTimes::parse(pattern, zone) {
                    let upcoming = times.upcoming(start, NEXT_FIRES_SHOWN);
                    assert!(upcoming.windows(2).all(|w| w[0] < w[1]), "{pattern}");
                    let _ = times.last_before(start);
                }
            }
        }
    }

    #[test]
    fn fire_times_carry_the_zone_offset() {
        let daily = berlin("0 2 * * *");
        let next = daily.next_after(datetime!(2030-07-01 12:00 UTC)).unwrap();
        assert_eq!(next, datetime!(2030-07-02 02:00 +02:00));
        assert_eq!(next.offset(), time::macros::offset!(+02:00));
        let next = daily.next_after(datetime!(2030-01-01 12:00 UTC)).unwrap();
        assert_eq!(next.offset(), time::macros::offset!(+01:00));
        assert_eq!(
            daily.upcoming(datetime!(2030-01-01 12:00 UTC), 5),
            vec![
                datetime!(2030-01-02 02:00 +01:00),
                datetime!(2030-01-03 02:00 +01:00),
                datetime!(2030-01-04 02:00 +01:00),
                datetime!(2030-01-05 02:00 +01:00),
                datetime!(2030-01-06 02:00 +01:00),
            ]
        );
    }

    /// 2026-03-29: Berlin's clocks jump from 02:00 to 03:00; 02:30 does not exist. As croner
    /// documents, a fixed time in the gap fires at the first instant after it, that day.
    #[test]
    fn a_fixed_time_in_the_spring_forward_gap_fires_right_after_the_gap() {
        let daily = berlin("30 2 * * *");
        let fires = daily.upcoming(datetime!(2026-03-27 12:00 UTC), 4);
        assert_eq!(
            fires,
            vec![
                datetime!(2026-03-28 02:30 +01:00),
                datetime!(2026-03-29 03:00 +02:00),
                datetime!(2026-03-30 02:30 +02:00),
                datetime!(2026-03-31 02:30 +02:00),
            ]
        );
        // An interval pattern skips the hour that does not exist: 01:00, 01:30, then 03:00.
        let half_hourly = berlin("0,30 * * * *");
        assert_eq!(
            half_hourly.upcoming(datetime!(2026-03-29 00:59 +01:00), 3),
            vec![
                datetime!(2026-03-29 01:00 +01:00),
                datetime!(2026-03-29 01:30 +01:00),
                datetime!(2026-03-29 03:00 +02:00),
            ]
        );
    }

    /// 2026-10-25: Berlin's clocks go back from 03:00 to 02:00; 02:30 happens twice. As croner
    /// documents, a fixed time fires once, at its first occurrence.
    #[test]
    fn a_fixed_time_in_the_fall_back_hour_fires_once() {
        let daily = berlin("30 2 * * *");
        let fires = daily.upcoming(datetime!(2026-10-23 12:00 UTC), 4);
        assert_eq!(
            fires,
            vec![
                datetime!(2026-10-24 02:30 +02:00),
                datetime!(2026-10-25 02:30 +02:00),
                datetime!(2026-10-26 02:30 +01:00),
                datetime!(2026-10-27 02:30 +01:00),
            ]
        );
        // An interval pattern fires in both passes of the repeated hour.
        let half_hourly = berlin("0,30 * * * *");
        assert_eq!(
            half_hourly.upcoming(datetime!(2026-10-25 01:59 +02:00), 5),
            vec![
                datetime!(2026-10-25 02:00 +02:00),
                datetime!(2026-10-25 02:30 +02:00),
                datetime!(2026-10-25 02:00 +01:00),
                datetime!(2026-10-25 02:30 +01:00),
                datetime!(2026-10-25 03:00 +01:00),
            ]
        );
    }

    #[test]
    fn last_before_finds_the_latest_earlier_fire_time() {
        let every_second = berlin("* * * * * *");
        assert_eq!(
            every_second.last_before(datetime!(2030-01-10 12:00:05 UTC)),
            Some(datetime!(2030-01-10 12:00:04 UTC))
        );
        assert_eq!(
            every_second.last_before(datetime!(2030-01-10 12:00:05.3 UTC)),
            Some(datetime!(2030-01-10 12:00:05 UTC))
        );
    }

    #[test]
    fn on_time_fires_fire_and_missed_ones_follow_the_policy() {
        let every_second = berlin("* * * * * *");
        let grace = Duration::from_secs(2);
        let now = datetime!(2030-01-10 12:00:20 UTC);
        // Due one second ago: on time.
        assert_eq!(
            plan_fire(
                &every_second,
                now - time::Duration::SECOND,
                now,
                grace,
                MissedFires::Skip
            ),
            FireStep::Fire {
                fire_at: datetime!(2030-01-10 12:00:19 UTC),
                next: Some(datetime!(2030-01-10 12:00:20 UTC)),
            }
        );
        // Due 12 s ago: 12:00:08 … 12:00:17 were missed (10 fire times), 12:00:18 is on time.
        let due = datetime!(2030-01-10 12:00:08 UTC);
        assert_eq!(
            plan_fire(&every_second, due, now, grace, MissedFires::Skip),
            FireStep::Skip {
                next: Some(datetime!(2030-01-10 12:00:18 UTC))
            }
        );
        assert_eq!(
            plan_fire(&every_second, due, now, grace, MissedFires::CatchUpOne),
            FireStep::Fire {
                fire_at: datetime!(2030-01-10 12:00:17 UTC),
                next: Some(datetime!(2030-01-10 12:00:18 UTC)),
            }
        );
    }
}
