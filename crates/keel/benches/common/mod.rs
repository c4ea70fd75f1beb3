//! What the HTTP benches share: the configuration that lifts the organisation quotas, unexpected
//! answers counted by kind, percentiles, numbers from the environment, and the metric lines worth
//! printing after a run.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

/// `[overload.rate_limits]` lifted: the benches measure capacity, and no organisation quota may
/// cut them short.
pub const UNLIMITED_RATES: &str = r#"# The bench measures capacity: no organisation quota may cut it short.
[overload.rate_limits]
work_per_second = 1000000
work_burst = 1000000
agent_per_second = 1000000
agent_burst = 1000000
"#;

/// Unexpected answers and transport errors, by `what status`; reported, never fatal.
#[derive(Clone, Default)]
pub struct Errors(Arc<Mutex<BTreeMap<String, u64>>>);

impl Errors {
    pub fn record(&self, what: String) {
        *self.0.lock().entry(what).or_default() += 1;
    }

    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.0.lock().clone()
    }
}

/// The `q` quantile of sorted durations (zero when there are none).
pub fn percentile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// The number in the environment variable `name`, or `default` when it is unset or not one.
pub fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(default)
}

pub fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

pub fn per_second(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(f64::EPSILON)
}

/// The lines of a `/metrics` answer whose series start with one of `families`, and every HTTP
/// request count of a status other than 2xx.
pub fn metric_lines(text: &str, families: &[&str]) -> Vec<String> {
    text.lines()
        .filter(|line| {
            families.iter().any(|family| line.starts_with(family))
                || (line.starts_with("keel_http_requests_total") && !line.contains("status=\"2"))
        })
        .map(str::to_owned)
        .collect()
}
