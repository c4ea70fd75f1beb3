//! The Prometheus recorder behind the `metrics` facade, rendered by `GET /metrics`.

use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};

/// Installs the process-wide Prometheus recorder and describes keel's own metrics.
pub fn install_recorder() -> Result<PrometheusHandle, BuildError> {
    let handle = PrometheusBuilder::new().install_recorder()?;
    describe();
    Ok(handle)
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
        "HTTP requests answered, by method, route and status"
    );
    describe_histogram!(
        "keel_http_request_duration_seconds",
        "Time from receiving a request to answering it"
    );
    describe_gauge!(
        "keel_log_queue_length",
        "Records waiting in the log queue, sampled by the telemetry job"
    );
}
