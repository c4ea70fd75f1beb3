//! Schedules and their fire times.

use time::OffsetDateTime;

use super::PgStore;
use crate::error::StoreResult;
use crate::model::{OrgId, ScheduleId, ScheduleState};
use crate::schedule::{
    AdvanceOutcome, NewSchedule, Schedule, ScheduleAdvance, ScheduleFire, SchedulePage,
};

pub(super) async fn create(
    _store: &PgStore,
    _org: OrgId,
    _schedule: NewSchedule,
) -> StoreResult<Schedule> {
    Err(super::accounts::not_yet("create"))
}

pub(super) async fn list(
    _store: &PgStore,
    _org: OrgId,
    _cursor: Option<ScheduleId>,
    _limit: u32,
) -> StoreResult<SchedulePage> {
    Err(super::accounts::not_yet("list"))
}

pub(super) async fn get(
    _store: &PgStore,
    _org: OrgId,
    _id: ScheduleId,
) -> StoreResult<Option<Schedule>> {
    Err(super::accounts::not_yet("get"))
}

pub(super) async fn set_state(
    _store: &PgStore,
    _org: OrgId,
    _id: ScheduleId,
    _state: ScheduleState,
) -> StoreResult<Schedule> {
    Err(super::accounts::not_yet("set_state"))
}

pub(super) async fn delete(_store: &PgStore, _org: OrgId, _id: ScheduleId) -> StoreResult<()> {
    Err(super::accounts::not_yet("delete"))
}

pub(super) async fn list_fires(
    _store: &PgStore,
    _org: OrgId,
    _id: ScheduleId,
    _before: Option<OffsetDateTime>,
    _limit: u32,
) -> StoreResult<Vec<ScheduleFire>> {
    Err(super::accounts::not_yet("list_fires"))
}

pub(super) async fn due(_store: &PgStore, _limit: u32) -> StoreResult<Vec<Schedule>> {
    Err(super::accounts::not_yet("due"))
}

pub(super) async fn advance(
    _store: &PgStore,
    _step: ScheduleAdvance,
) -> StoreResult<AdvanceOutcome> {
    Err(super::accounts::not_yet("advance"))
}
