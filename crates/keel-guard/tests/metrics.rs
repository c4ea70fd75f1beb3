//! The metrics the supervisor and periodic jobs emit, read through a recorder installed for this
//! test binary.

// Test code: a failed expectation is meant to fail the test.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use keel_guard::components::{ComponentState, Components};
use keel_guard::supervisor::{RestartPolicy, Supervisor, TaskError};
use metrics::{Counter, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit};
use parking_lot::Mutex;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl metrics::HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().push(value);
    }
}

/// Keeps every metric in memory, keyed `name{label=value,...}` (labels sorted).
#[derive(Default, Clone)]
struct Memory {
    counters: Arc<Mutex<BTreeMap<String, Arc<AtomicU64>>>>,
    gauges: Arc<Mutex<BTreeMap<String, Arc<AtomicU64>>>>,
    histograms: Arc<Mutex<BTreeMap<String, Arc<Samples>>>>,
}

fn render(key: &Key) -> String {
    let mut labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    labels.sort();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

impl Memory {
    fn counter(&self, key: &str) -> Option<u64> {
        self.counters
            .lock()
            .get(key)
            .map(|c| c.load(Ordering::SeqCst))
    }

    fn gauge(&self, key: &str) -> Option<f64> {
        self.gauges
            .lock()
            .get(key)
            .map(|g| f64::from_bits(g.load(Ordering::SeqCst)))
    }

    fn samples(&self, key: &str) -> Vec<f64> {
        self.histograms
            .lock()
            .get(key)
            .map(|h| h.0.lock().clone())
            .unwrap_or_default()
    }
}

impl Recorder for Memory {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}

    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        Counter::from_arc(self.counters.lock().entry(render(key)).or_default().clone())
    }

    fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::from_arc(self.gauges.lock().entry(render(key)).or_default().clone())
    }

    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::from_arc(
            self.histograms
                .lock()
                .entry(render(key))
                .or_default()
                .clone(),
        )
    }
}

#[tokio::test(start_paused = true)]
async fn degraded_restarts_state_and_tick_metrics_are_emitted() {
    let memory = Memory::default();
    metrics::set_global_recorder(memory.clone()).unwrap();
    keel_guard::panic::install_hook();
    let cancel = CancellationToken::new();
    let tracker = TaskTracker::new();
    let supervisor = Supervisor::new(
        Components::new(),
        RestartPolicy {
            initial_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            reset_after: Duration::from_millis(500),
            max_restarts: 1,
            within: Duration::from_secs(10),
        },
        cancel.clone(),
        tracker.clone(),
    );

    // Two immediate failures (past the limit of 1), then a clean run.
    let count = Arc::new(AtomicU32::new(0));
    supervisor.spawn("metered", move |token: CancellationToken| {
        let n = count.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            if n <= 2 {
                panic!("metered crash {n}");
            }
            token.cancelled().await;
            Ok::<(), TaskError>(())
        }
    });
    let start = tokio::time::Instant::now();
    // Failures at 0 and 10 ms; degraded from 10 ms; the clean run starts at 110 ms.
    tokio::time::sleep_until(start + Duration::from_millis(50)).await;
    assert_eq!(
        supervisor.components().get("metered").unwrap().state,
        ComponentState::Degraded
    );
    assert_eq!(
        memory.gauge("keel_component_degraded{component=metered}"),
        Some(1.0)
    );
    assert_eq!(
        memory.counter("keel_component_restarts_total{component=metered}"),
        Some(2)
    );
    assert_eq!(
        memory.gauge("keel_component_state{component=metered,state=degraded}"),
        Some(1.0)
    );
    assert_eq!(
        memory.gauge("keel_component_state{component=metered,state=running}"),
        Some(0.0)
    );
    keel_guard::panic::export_metrics();
    assert_eq!(
        memory.counter("keel_panics_total{component=metered}"),
        Some(2)
    );

    // Recovered 500 ms into the clean run.
    tokio::time::sleep_until(start + Duration::from_millis(620)).await;
    assert_eq!(
        memory.gauge("keel_component_degraded{component=metered}"),
        Some(0.0)
    );
    assert_eq!(
        memory.gauge("keel_component_state{component=metered,state=running}"),
        Some(1.0)
    );

    // A job: one good tick, one failing tick.
    let ticks = Arc::new(AtomicU32::new(0));
    let job = supervisor.every("metered-job", Duration::from_secs(3600), move || {
        let n = ticks.fetch_add(1, Ordering::SeqCst) + 1;
        async move {
            tokio::time::sleep(Duration::from_millis(25)).await;
            if n == 2 {
                panic!("metered tick");
            }
        }
    });
    job.run_now().await.unwrap();
    job.run_now().await.unwrap_err();
    assert_eq!(
        memory.samples("keel_job_tick_seconds{job=metered-job}"),
        vec![0.025, 0.025]
    );
    assert_eq!(
        memory.counter("keel_job_tick_failures_total{job=metered-job}"),
        Some(1)
    );

    cancel.cancel();
    tracker.close();
    tokio::time::timeout(Duration::from_secs(5), tracker.wait())
        .await
        .unwrap();
    assert_eq!(
        memory.gauge("keel_component_state{component=metered,state=stopped}"),
        Some(1.0)
    );
}
