//! The Prometheus recorder behind the `metrics` facade, rendered by `GET /metrics`.
//!
//! Three rules keep the exposition usable (docs/metrics.md):
//! - every label has a bounded set of values: HTTP methods outside [`KNOWN_METHODS`] are
//!   `other`, routes are the matched route template or `unmatched`;
//! - latencies are histograms with fixed buckets ([`HTTP_BUCKETS`], [`JOB_TICK_BUCKETS`]), so
//!   they can be summed across instances;
//! - every counter of a known component exists at 0 from the start ([`seed`]), so `rate()`
//!   and absence alerts work before the first event.

use axum::http::Method;
use keel_log::{Level, Stream};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};

/// Access to `/metrics`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// When set, `/metrics` answers only requests with `Authorization: Bearer <token>` (401
    /// otherwise). Unset: `/metrics` is open, like `/healthz`. A secret: shown redacted.
    pub token: Option<crate::config::Secret>,
}

/// HTTP methods that are their own label value; any other method is counted as `other`.
pub const KNOWN_METHODS: [Method; 7] = [
    Method::GET,
    Method::POST,
    Method::PUT,
    Method::DELETE,
    Method::PATCH,
    Method::HEAD,
    Method::OPTIONS,
];

/// Buckets (seconds) of `keel_http_request_duration_seconds` and of any other histogram
/// without buckets of its own: 1 ms to 60 s (the longest long-poll stays below the timeout).
pub const HTTP_BUCKETS: [f64; 15] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Buckets (seconds) of `keel_job_tick_seconds`: 1 ms to 5 minutes.
pub const JOB_TICK_BUCKETS: [f64; 11] = [
    0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// Components whose panics are counted from the start: the HTTP handlers, the logger, code
/// outside any scope. Periodic jobs are added by name ([`seed`]).
const PANIC_COMPONENTS: [&str; 3] = ["http", keel_log::COMPONENT, keel_guard::panic::UNSCOPED];

/// The method label of a request: its name when known, otherwise `other`.
pub fn method_label(method: &Method) -> &'static str {
    KNOWN_METHODS
        .iter()
        .find(|known| *known == method)
        .map_or("other", Method::as_str)
}

/// Installs the process-wide Prometheus recorder and describes keel's own metrics.
pub fn install_recorder() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new()
        .set_buckets(&HTTP_BUCKETS)?
        .set_buckets_for_metric(
            Matcher::Full("keel_job_tick_seconds".to_owned()),
            &JOB_TICK_BUCKETS,
        )?
        .install_recorder()?;
    describe();
    Ok(handle)
}

/// Creates every counter of a known component at 0: panics per component (`jobs` included),
/// tick failures per job, log drops per stream and level, commands by outcome, overload
/// rejections by reason.
pub fn seed(jobs: &[&str]) {
    let components: Vec<&str> = PANIC_COMPONENTS.iter().chain(jobs).copied().collect();
    keel_guard::panic::track_components(&components);
    keel_guard::panic::export_metrics();
    for job in jobs {
        metrics::counter!("keel_job_tick_failures_total", "job" => (*job).to_owned()).increment(0);
    }
    for stream in Stream::ALL {
        for level in Level::ALL {
            metrics::counter!(
                "keel_log_dropped_total",
                "stream" => stream.as_str(),
                "level" => level.as_str()
            )
            .increment(0);
        }
        metrics::counter!("keel_log_failed_total", "stream" => stream.as_str()).increment(0);
        metrics::counter!("keel_log_fallback_total", "stream" => stream.as_str()).increment(0);
    }
    for outcome in ["requeued", "dead", "cancelled"] {
        metrics::counter!("keel_commands_released_total", "outcome" => outcome).increment(0);
    }
    for outcome in ["created", "failed"] {
        metrics::counter!("keel_schedule_fires_total", "outcome" => outcome).increment(0);
    }
    for status in ["completed", "failed", "pending", "dead", "cancelled"] {
        metrics::counter!("keel_commands_finished_total", "status" => status).increment(0);
    }
    for reason in [
        "pressure",
        "waiting_claims",
        "in_flight",
        "rate_limit",
        "store_busy",
        "store_unavailable",
    ] {
        metrics::counter!("keel_overload_rejected_total", "reason" => reason).increment(0);
    }
    for name in [
        "keel_commands_created_total",
        "keel_commands_claimed_total",
        "keel_commands_purged_total",
        "keel_log_writer_restarts_total",
        "keel_http_accept_errors_total",
    ] {
        metrics::counter!(name).increment(0);
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        "keel_panics_total",
        "Panics caught, by the component they happened in"
    );
    describe_counter!(
        "keel_panic_backtraces_skipped_total",
        "Panics reported without a backtrace because of the capture rate limit"
    );
    describe_counter!(
        "keel_http_requests_total",
        "HTTP requests answered, by method (known methods or `other`), route template \
         (or `unmatched`) and status"
    );
    describe_histogram!(
        "keel_http_request_duration_seconds",
        "Time from receiving a request to answering it, by route template"
    );
    describe_histogram!("keel_job_tick_seconds", "Duration of periodic job ticks");
    describe_counter!(
        "keel_job_tick_failures_total",
        "Periodic job ticks that panicked, by job"
    );
    describe_counter!(
        "keel_log_dropped_total",
        "Log records dropped because the queue was full, by stream and level"
    );
    describe_counter!(
        "keel_commands_released_total",
        "Expired leases released, by outcome"
    );
    describe_counter!(
        "keel_schedule_fires_total",
        "Schedule fire times that created their commands (`created`) or could not (`failed`)"
    );
    describe_counter!(
        "keel_commands_finished_total",
        "Commands reported by agents, by the status they reached"
    );
    describe_counter!(
        "keel_overload_rejected_total",
        "Requests refused under overload, by reason"
    );
    describe_gauge!(
        "keel_log_queue_length",
        "Records waiting in the log queue, sampled by the telemetry job"
    );
    describe_gauge!(
        "keel_agents_cordoned",
        "Agents cordoned (claiming nothing new), across organisations"
    );
    describe_gauge!(
        "keel_queues_paused",
        "Queues paused (their pooled commands not handed out), across organisations"
    );
}

/// Sets the cordoned-agents and paused-queues gauges from the store (at start, and after each
/// cordon, uncordon, pause or resume). A failed read keeps the last values.
pub async fn refresh_fleet_gauges(store: &dyn keel_store::Store) {
    match store.count_cordoned_and_paused().await {
        Ok((cordoned, paused)) => {
            metrics::gauge!("keel_agents_cordoned").set(cordoned as f64);
            metrics::gauge!("keel_queues_paused").set(paused as f64);
        }
        Err(err) => tracing::warn!(error = %err, "fleet gauges not refreshed"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_methods_are_their_own_label_and_the_rest_is_other() {
        assert_eq!(method_label(&Method::GET), "GET");
        assert_eq!(method_label(&Method::OPTIONS), "OPTIONS");
        assert_eq!(method_label(&Method::TRACE), "other");
        assert_eq!(
            method_label(&Method::from_bytes(b"BREW").unwrap_or_default()),
            "other"
        );
    }
}
