//! Fair sharing and load shedding (`docs/overload.md` is the reference):
//!
//! - the in-flight limit: at most `max_in_flight` requests handled at once, of which
//!   `reserved_for_reports` only agent reports (heartbeats, completes, fails, batch reports,
//!   check-ins) may
//!   use; one more gets 503 at once, never a queue;
//! - per-organisation rate limits ([`super::rate_limit`]): 429;
//! - the cap on waiting long-polls ([`super::waiting_claims`]): 429;
//! - pressure, from the store writer's queue depth and commit latency (a [`PressureSource`]) or
//!   set by an operator: low-priority creates get 503 first.
//!
//! Every refusal carries `Retry-After` and keel's JSON error shape. The admin, health and
//! metrics routes are never limited.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;
use keel_store::{AgentId, OrgId, Store};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::AppState;
use super::auth::{Caller, bearer_token};
use super::error::ApiError;
use super::rate_limit::{Bucket, OrgRateLimits, RateLimits, Refusal};
use super::waiting_claims::{CapReached, WaitingClaim, WaitingClaims};

/// The `[overload]` configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OverloadConfig {
    /// Requests handled at once (claims are not counted: a waiting claim holds no database
    /// connection, and claims have their own caps). One more gets 503 with `Retry-After`.
    pub max_in_flight: usize,
    /// Of `max_in_flight`, the slots only agent reports (heartbeats, completes, fails,
    /// check-ins) may use, so a flood of other requests cannot shut them out.
    pub reserved_for_reports: usize,
    /// Waiting long-polls (`wait_seconds > 0`) one agent may have at once; one more gets 429.
    pub max_waiting_claims_per_agent: usize,
    /// Waiting long-polls one organisation may have at once; one more gets 429.
    pub max_waiting_claims_per_org: usize,
    /// `Retry-After` of a 503 (in-flight limit, pressure) and of a 429 for a waiting-claim cap.
    #[serde(with = "humantime_serde")]
    pub retry_after: Duration,
    /// Every organisation's rate limits, unless named in `orgs`.
    pub rate_limits: RateLimits,
    /// Rate limits by organisation name, in place of `rate_limits` (keys not given take the
    /// built-in defaults).
    pub orgs: BTreeMap<String, RateLimits>,
    /// When keel is under pressure and what it sheds then.
    pub pressure: PressureConfig,
}

impl Default for OverloadConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 256,
            reserved_for_reports: 64,
            max_waiting_claims_per_agent: 2,
            max_waiting_claims_per_org: 256,
            retry_after: Duration::from_secs(1),
            rate_limits: RateLimits::default(),
            orgs: BTreeMap::new(),
            pressure: PressureConfig::default(),
        }
    }
}

impl OverloadConfig {
    /// Checks what serde cannot; the error names the key.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1..=Semaphore::MAX_PERMITS).contains(&self.max_in_flight) {
            return Err((
                "overload.max_in_flight",
                format!("must be between 1 and {}", Semaphore::MAX_PERMITS),
            ));
        }
        if self.reserved_for_reports >= self.max_in_flight {
            return Err((
                "overload.reserved_for_reports",
                "must be less than overload.max_in_flight".to_owned(),
            ));
        }
        if self.max_waiting_claims_per_agent == 0 || self.max_waiting_claims_per_org == 0 {
            return Err((
                "overload.max_waiting_claims_per_agent",
                "and max_waiting_claims_per_org must be at least 1".to_owned(),
            ));
        }
        self.pressure.validate()
    }
}

/// `[overload.pressure]`: thresholds on the store writer's figures, and what is shed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PressureConfig {
    /// Writes waiting for the writer at which pressure is `elevated`.
    pub elevated_queue_depth: usize,
    /// Writes waiting for the writer at which pressure is `critical`.
    pub critical_queue_depth: usize,
    /// Recent commit latency at which pressure is `elevated`.
    #[serde(with = "humantime_serde")]
    pub elevated_commit_latency: Duration,
    /// Recent commit latency at which pressure is `critical`.
    #[serde(with = "humantime_serde")]
    pub critical_commit_latency: Duration,
    /// Under `elevated` pressure, creates with a priority below this get 503.
    pub elevated_min_priority: i32,
    /// Under `critical` pressure, creates with a priority below this get 503.
    pub critical_min_priority: i32,
}

impl Default for PressureConfig {
    fn default() -> Self {
        Self {
            elevated_queue_depth: 1_000,
            critical_queue_depth: 5_000,
            elevated_commit_latency: Duration::from_millis(100),
            critical_commit_latency: Duration::from_millis(500),
            elevated_min_priority: 0,
            critical_min_priority: 500,
        }
    }
}

impl PressureConfig {
    fn validate(&self) -> Result<(), (&'static str, String)> {
        // A zero threshold would hold at every figure: pressure would never be `normal`.
        if self.elevated_queue_depth == 0 {
            return Err((
                "overload.pressure.elevated_queue_depth",
                "must be at least 1".to_owned(),
            ));
        }
        if self.elevated_commit_latency.is_zero() {
            return Err((
                "overload.pressure.elevated_commit_latency",
                "must be longer than 0s".to_owned(),
            ));
        }
        if self.elevated_queue_depth > self.critical_queue_depth {
            return Err((
                "overload.pressure.elevated_queue_depth",
                "must not exceed critical_queue_depth".to_owned(),
            ));
        }
        if self.elevated_commit_latency > self.critical_commit_latency {
            return Err((
                "overload.pressure.elevated_commit_latency",
                "must not exceed critical_commit_latency".to_owned(),
            ));
        }
        if self.elevated_min_priority > self.critical_min_priority {
            return Err((
                "overload.pressure.elevated_min_priority",
                "must not exceed critical_min_priority".to_owned(),
            ));
        }
        Ok(())
    }

    /// The pressure these figures mean: the worse of the two inputs.
    pub fn assess(&self, queue_depth: usize, commit_latency: Duration) -> Pressure {
        if queue_depth >= self.critical_queue_depth
            || commit_latency >= self.critical_commit_latency
        {
            Pressure::Critical
        } else if queue_depth >= self.elevated_queue_depth
            || commit_latency >= self.elevated_commit_latency
        {
            Pressure::Elevated
        } else {
            Pressure::Normal
        }
    }

    /// The lowest priority a create may have under `pressure`.
    fn min_priority(&self, pressure: Pressure) -> Option<i32> {
        match pressure {
            Pressure::Normal => None,
            Pressure::Elevated => Some(self.elevated_min_priority),
            Pressure::Critical => Some(self.critical_min_priority),
        }
    }
}

/// What pressure is computed from: the store writer's figures.
pub trait PressureSource: Send + Sync {
    /// Writes waiting for the writer now.
    fn queue_depth(&self) -> usize;
    /// How long recent commits took.
    fn commit_latency(&self) -> Duration;
}

/// The store's write path: how many writes wait for the writer and how long its last group
/// took to commit (`Store::write_pressure`). The failpoint `overload.pressure` can stand in for
/// the measured figures: `return(DEPTH,MS)` reports DEPTH writes waiting and MS milliseconds of
/// commit latency.
#[derive(Clone)]
pub struct StorePressure {
    store: Arc<dyn keel_store::Store>,
}

impl StorePressure {
    /// The pressure of `store`'s write path.
    pub fn new(store: Arc<dyn keel_store::Store>) -> Self {
        Self { store }
    }

    fn injected() -> Option<(usize, Duration)> {
        fail::fail_point!("overload.pressure", |figures| {
            let figures = figures?;
            let (depth, ms) = figures.split_once(',')?;
            Some((
                depth.trim().parse().ok()?,
                Duration::from_millis(ms.trim().parse().ok()?),
            ))
        });
        None
    }
}

impl PressureSource for StorePressure {
    fn queue_depth(&self) -> usize {
        Self::injected().map_or_else(
            || self.store.write_pressure().queue_depth,
            |(depth, _)| depth,
        )
    }
    fn commit_latency(&self) -> Duration {
        Self::injected().map_or_else(
            || self.store.write_pressure().commit_latency,
            |(_, latency)| latency,
        )
    }
}

/// How loaded the store is.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Pressure {
    /// Nothing is shed for pressure.
    Normal,
    /// Creates below `elevated_min_priority` are shed.
    Elevated,
    /// Creates below `critical_min_priority` are shed.
    Critical,
}

impl Pressure {
    /// The value of the `keel_overload_pressure` gauge.
    fn gauge(self) -> f64 {
        match self {
            Self::Normal => 0.0,
            Self::Elevated => 1.0,
            Self::Critical => 2.0,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Self::Normal => "normal",
            Self::Elevated => "elevated",
            Self::Critical => "critical",
        }
    }
}

/// Where the pressure in force comes from: measured, or set by an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// The measured pressure.
    Auto,
    /// `normal`, whatever is measured.
    Normal,
    /// `elevated`, whatever is measured.
    Elevated,
    /// `critical`, whatever is measured.
    Critical,
}

impl Mode {
    /// The pressure in force under this mode; `measured` is asked only in `auto`.
    fn in_force(self, measured: impl FnOnce() -> Pressure) -> Pressure {
        match self {
            Self::Auto => measured(),
            Self::Normal => Pressure::Normal,
            Self::Elevated => Pressure::Elevated,
            Self::Critical => Pressure::Critical,
        }
    }

    /// The name, as in `PUT /v1/admin/overload`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Auto => "auto",
            Self::Normal => "normal",
            Self::Elevated => "elevated",
            Self::Critical => "critical",
        }
    }
}

/// What `GET /v1/admin/overload` shows.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct OverloadView {
    /// `auto` or the operator's setting.
    pub mode: Mode,
    /// The pressure in force.
    pub pressure: Pressure,
    /// The pressure the figures mean.
    pub measured: Pressure,
    /// Writes waiting for the store writer.
    pub queue_depth: usize,
    /// Recent commit latency, in milliseconds.
    pub commit_latency_ms: f64,
    /// Requests being handled, claims excepted.
    pub in_flight: usize,
    /// Long-polls waiting, across organisations.
    pub waiting_claims: usize,
}

/// Which limits a request is subject to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Creates, reads, lists, cancels, requeues: the shared in-flight slots, the work bucket.
    Work,
    /// Heartbeats, completes, fails, check-ins: any in-flight slot, the agent bucket.
    Report,
    /// Claims: the agent bucket; not counted in flight (a waiting claim holds no connection).
    Claim,
}

impl Class {
    /// The class of a route (`None`: not limited: admin, health, metrics, unmatched).
    fn of(method: &Method, route: &str) -> Option<Self> {
        let api = route.strip_prefix("/v1/")?;
        if api.starts_with("admin") {
            return None;
        }
        if *method != Method::POST {
            return Some(Self::Work);
        }
        let report = ["/heartbeat", "/complete", "/fail"]
            .iter()
            .any(|suffix| api.starts_with("commands/{") && api.ends_with(suffix));
        Some(match api {
            "commands/claim" => Self::Claim,
            "agents/check-in" | "commands/reports" => Self::Report,
            _ if report => Self::Report,
            _ => Self::Work,
        })
    }

    fn bucket(self) -> Bucket {
        match self {
            Self::Work => Bucket::Work,
            Self::Report | Self::Claim => Bucket::Agent,
        }
    }
}

/// The overload state the handlers share.
pub struct Overload {
    config: OverloadConfig,
    source: Arc<dyn PressureSource>,
    mode: RwLock<Mode>,
    /// `max_in_flight - reserved_for_reports` slots, for every counted request.
    shared_slots: Arc<Semaphore>,
    /// `reserved_for_reports` slots, for reports when the shared ones are taken.
    report_slots: Arc<Semaphore>,
    rate_limits: OrgRateLimits,
    waiting_claims: WaitingClaims,
}

impl Overload {
    /// The state for `config`, with pressure measured by `source`.
    pub fn new(config: &OverloadConfig, source: Arc<dyn PressureSource>) -> Self {
        let overload = Self {
            config: config.clone(),
            source,
            mode: RwLock::new(Mode::Auto),
            shared_slots: Arc::new(Semaphore::new(
                config
                    .max_in_flight
                    .saturating_sub(config.reserved_for_reports),
            )),
            report_slots: Arc::new(Semaphore::new(config.reserved_for_reports)),
            rate_limits: OrgRateLimits::new(config.rate_limits, &config.orgs),
            waiting_claims: WaitingClaims::new(
                config.max_waiting_claims_per_agent,
                config.max_waiting_claims_per_org,
            ),
        };
        overload.refresh_gauges();
        overload
    }

    /// The pressure in force: the operator's, or the measured one.
    pub fn pressure(&self) -> Pressure {
        let mode = *self.mode.read();
        mode.in_force(|| self.measured())
    }

    fn measured(&self) -> Pressure {
        self.config
            .pressure
            .assess(self.source.queue_depth(), self.source.commit_latency())
    }

    /// Sets where the pressure comes from, from now on (not kept across a restart).
    pub fn set_mode(&self, mode: Mode) {
        *self.mode.write() = mode;
        self.refresh_gauges();
    }

    /// The state, for the admin API.
    pub fn view(&self) -> OverloadView {
        let counted = self
            .config
            .max_in_flight
            .saturating_sub(self.shared_slots.available_permits())
            .saturating_sub(self.report_slots.available_permits());
        OverloadView {
            mode: *self.mode.read(),
            pressure: self.pressure(),
            measured: self.measured(),
            queue_depth: self.source.queue_depth(),
            commit_latency_ms: self.source.commit_latency().as_secs_f64() * 1000.0,
            in_flight: counted,
            waiting_claims: self.waiting_claims.total(),
        }
    }

    /// A batch of `count` creates draws `count` tokens of the `work` bucket, as many requests
    /// would (admission drew one): 429 with `Retry-After` when they are not all there, 422 when
    /// the batch is larger than the bucket can ever hold.
    pub async fn admit_batch_create(
        &self,
        store: &dyn Store,
        org: OrgId,
        count: usize,
    ) -> Result<(), ApiError> {
        let total = u32::try_from(count).unwrap_or(u32::MAX);
        match self
            .rate_limits
            .check_rest(store, org, Bucket::Work, total)
            .await
        {
            Ok(()) => Ok(()),
            Err(Refusal::Wait(retry_after)) => {
                rejected("rate_limit");
                Err(ApiError::RateLimited {
                    message: format!(
                        "this organisation is over its `work` rate limit: a batch of {total} takes {total} of its tokens"
                    ),
                    retry_after,
                })
            }
            Err(Refusal::OverBurst { burst }) => Err(ApiError::Validation(format!(
                "commands: {total} commands are more than this organisation's `work` burst of {burst}; send at most {burst} in one batch"
            ))),
        }
    }

    /// Sheds a create of `priority` under pressure: 503 when it is below the pressure's
    /// minimum priority.
    pub fn admit_create(&self, priority: i32) -> Result<(), ApiError> {
        let pressure = self.pressure();
        match self.config.pressure.min_priority(pressure) {
            Some(min) if priority < min => {
                rejected("pressure");
                Err(ApiError::Overloaded {
                    message: format!(
                        "keel is under {} pressure: creates with a priority below {min} are refused for now",
                        pressure.as_str()
                    ),
                    retry_after: self.config.retry_after,
                })
            }
            _ => Ok(()),
        }
    }

    /// Counts a waiting long-poll of `agent` until the guard is dropped; 429 over a cap.
    pub fn wait_for_claims(&self, org: OrgId, agent: AgentId) -> Result<WaitingClaim, ApiError> {
        self.waiting_claims.enter(org, agent).map_err(|cap| {
            rejected("waiting_claims");
            let (who, limit) = match cap {
                CapReached::Agent => ("agent", self.config.max_waiting_claims_per_agent),
                CapReached::Organisation => {
                    ("organisation", self.config.max_waiting_claims_per_org)
                }
            };
            ApiError::RateLimited {
                message: format!(
                    "this {who} already has {limit} claims waiting (wait_seconds > 0)"
                ),
                retry_after: self.config.retry_after,
            }
        })
    }

    /// An in-flight slot for a request of `class`, held until it is answered (`None` for
    /// claims, which are not counted); 503 when none is free.
    fn in_flight_slot(&self, class: Class) -> Result<Option<OwnedSemaphorePermit>, ApiError> {
        let slot = match class {
            Class::Claim => return Ok(None),
            Class::Work => self.shared_slots.clone().try_acquire_owned().ok(),
            Class::Report => self
                .shared_slots
                .clone()
                .try_acquire_owned()
                .or_else(|_| self.report_slots.clone().try_acquire_owned())
                .ok(),
        };
        match slot {
            Some(slot) => Ok(Some(slot)),
            None => {
                rejected("in_flight");
                Err(ApiError::Overloaded {
                    message: format!(
                        "keel is handling its limit of {} requests; retry later",
                        self.config.max_in_flight
                    ),
                    retry_after: self.config.retry_after,
                })
            }
        }
    }

    fn refresh_gauges(&self) {
        let mode = *self.mode.read();
        let measured = self.measured();
        let overridden = if mode == Mode::Auto { 0.0 } else { 1.0 };
        metrics::gauge!("keel_overload_pressure").set(mode.in_force(|| measured).gauge());
        metrics::gauge!("keel_overload_pressure_measured").set(measured.gauge());
        metrics::gauge!("keel_overload_mode_override").set(overridden);
    }
}

fn rejected(reason: &'static str) {
    metrics::counter!("keel_overload_rejected_total", "reason" => reason).increment(1);
}

/// The layer's function: the in-flight limit, then the caller's key (kept for the handler, so
/// it is looked up once), then the organisation's rate limit.
pub async fn admit(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let overload = state.overload.clone();
    // Every request refreshes the gauges, so `/metrics` shows the pressure in force.
    overload.refresh_gauges();
    let Some(class) = request
        .extensions()
        .get::<MatchedPath>()
        .and_then(|route| Class::of(request.method(), route.as_str()))
    else {
        return Ok(next.run(request).await);
    };
    let _slot = overload.in_flight_slot(class)?;
    // No or an unknown key: the handler answers 401 as it always does.
    let principal = match bearer_token(request.headers()) {
        Some(token) => state.keys.authenticate(state.store.as_ref(), token).await?,
        None => None,
    };
    if let Some(principal) = principal {
        let bucket = class.bucket();
        if let Err(wait) = overload
            .rate_limits
            .check(state.store.as_ref(), principal.org_id, bucket)
            .await
        {
            rejected("rate_limit");
            return Err(ApiError::RateLimited {
                message: format!(
                    "this organisation is over its `{}` rate limit",
                    bucket.as_str()
                ),
                retry_after: wait,
            });
        }
        request.extensions_mut().insert(Caller(principal));
    }
    Ok(next.run(request).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pressure source with figures the test sets.
    struct Figures(parking_lot::Mutex<(usize, Duration)>);

    impl PressureSource for Figures {
        fn queue_depth(&self) -> usize {
            self.0.lock().0
        }
        fn commit_latency(&self) -> Duration {
            self.0.lock().1
        }
    }

    #[test]
    fn pressure_is_the_worse_of_queue_depth_and_commit_latency() {
        let config = PressureConfig::default();
        let ms = Duration::from_millis;
        assert_eq!(config.assess(0, ms(0)), Pressure::Normal);
        assert_eq!(config.assess(999, ms(99)), Pressure::Normal);
        assert_eq!(config.assess(1_000, ms(0)), Pressure::Elevated);
        assert_eq!(config.assess(0, ms(100)), Pressure::Elevated);
        assert_eq!(config.assess(5_000, ms(0)), Pressure::Critical);
        assert_eq!(config.assess(10, ms(500)), Pressure::Critical);
    }

    #[test]
    fn measured_pressure_sheds_low_priorities_first_and_the_operator_overrides_it() {
        let figures = Arc::new(Figures(parking_lot::Mutex::new((0, Duration::ZERO))));
        let overload = Overload::new(&OverloadConfig::default(), figures.clone());
        assert!(overload.admit_create(-1000).is_ok());

        *figures.0.lock() = (1_500, Duration::ZERO);
        assert_eq!(overload.pressure(), Pressure::Elevated);
        let shed = overload.admit_create(-1).unwrap_err();
        assert_eq!(shed.status(), axum::http::StatusCode::SERVICE_UNAVAILABLE);
        assert!(overload.admit_create(0).is_ok());

        *figures.0.lock() = (0, Duration::from_secs(1));
        assert_eq!(overload.pressure(), Pressure::Critical);
        assert!(overload.admit_create(499).is_err());
        assert!(overload.admit_create(500).is_ok());

        overload.set_mode(Mode::Normal);
        assert!(overload.admit_create(-1000).is_ok());
        assert_eq!(overload.view().measured, Pressure::Critical);
        overload.set_mode(Mode::Auto);
        assert!(overload.admit_create(-1000).is_err());
    }

    #[test]
    fn reports_use_the_reserved_slots_when_the_shared_ones_are_taken() {
        let config = OverloadConfig {
            max_in_flight: 2,
            reserved_for_reports: 1,
            ..OverloadConfig::default()
        };
        let idle = Figures(parking_lot::Mutex::new((0, Duration::ZERO)));
        let overload = Overload::new(&config, Arc::new(idle));
        let work = overload.in_flight_slot(Class::Work).unwrap();
        assert!(overload.in_flight_slot(Class::Work).is_err());
        let report = overload.in_flight_slot(Class::Report).unwrap();
        assert!(overload.in_flight_slot(Class::Report).is_err());
        assert!(overload.in_flight_slot(Class::Claim).unwrap().is_none());
        assert_eq!(overload.view().in_flight, 2);
        drop((work, report));
        assert_eq!(overload.view().in_flight, 0);
    }

    #[test]
    fn routes_are_classified_by_template() {
        let post = Method::POST;
        assert_eq!(
            Class::of(&post, "/v1/commands/{id}/heartbeat"),
            Some(Class::Report)
        );
        assert_eq!(
            Class::of(&post, "/v1/commands/{id}/complete"),
            Some(Class::Report)
        );
        assert_eq!(
            Class::of(&post, "/v1/commands/{id}/fail"),
            Some(Class::Report)
        );
        assert_eq!(Class::of(&post, "/v1/agents/check-in"), Some(Class::Report));
        assert_eq!(
            Class::of(&post, "/v1/commands/reports"),
            Some(Class::Report)
        );
        assert_eq!(Class::of(&post, "/v1/commands/batch"), Some(Class::Work));
        assert_eq!(Class::of(&post, "/v1/commands/claim"), Some(Class::Claim));
        assert_eq!(Class::of(&post, "/v1/commands"), Some(Class::Work));
        assert_eq!(
            Class::of(&post, "/v1/commands/{id}/cancel"),
            Some(Class::Work)
        );
        assert_eq!(Class::of(&Method::GET, "/v1/commands"), Some(Class::Work));
        assert_eq!(Class::of(&Method::GET, "/v1/admin/overload"), None);
        assert_eq!(Class::of(&Method::GET, "/metrics"), None);
    }
}
