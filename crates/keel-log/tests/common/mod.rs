//! Helpers shared by the integration tests: capture writers, a gate that stalls a sink, configs.

#![allow(dead_code)] // Each test binary uses a different subset.

use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_log::{CustomSink, FilterSet, Format, KeelLayer, LogConfig, Logger, Stream};
use parking_lot::{Condvar, Mutex};
use tracing_subscriber::layer::SubscriberExt;

pub const LONG: Duration = Duration::from_secs(20);

/// A writer that appends to a shared buffer.
#[derive(Clone, Default)]
pub struct Capture(pub Arc<Mutex<Vec<u8>>>);

impl Capture {
    pub fn text(&self) -> String {
        String::from_utf8(self.0.lock().clone()).unwrap()
    }

    pub fn lines(&self) -> Vec<String> {
        self.text().lines().map(str::to_owned).collect()
    }

    pub fn json(&self) -> Vec<serde_json::Value> {
        self.lines()
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    }

    pub fn sink(&self, name: &str, streams: &[Stream], format: Format) -> CustomSink {
        CustomSink {
            name: name.to_owned(),
            streams: streams.to_vec(),
            format,
            writer: Box::new(self.clone()),
        }
    }
}

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A gate that blocks every write until it is opened.
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    pub fn open(&self) {
        *self.0.0.lock() = true;
        self.0.1.notify_all();
    }

    fn wait(&self) {
        let mut open = self.0.0.lock();
        while !*open {
            self.0.1.wait(&mut open);
        }
    }
}

/// A capture whose writes wait for the gate.
#[derive(Clone)]
pub struct Gated {
    pub gate: Gate,
    pub capture: Capture,
}

impl Write for Gated {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.gate.wait();
        self.capture.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A config with no sinks of its own, files under `dir`.
pub fn bare_config(dir: &Path) -> LogConfig {
    LogConfig {
        dir: dir.to_path_buf(),
        sinks: Vec::new(),
        filters: FilterSet::default(),
        ..LogConfig::development()
    }
}

/// Runs `f` with the layer as the thread's default subscriber.
pub fn with_layer<T>(layer: &KeelLayer, f: impl FnOnce() -> T) -> T {
    let subscriber = tracing_subscriber::registry().with(layer.clone());
    tracing::subscriber::with_default(subscriber, f)
}

/// A logger writing every stream as JSON into one capture.
pub fn capture_logger(config: &LogConfig) -> (Logger, KeelLayer, Capture) {
    let capture = Capture::default();
    let (logger, layer) = keel_log::build_with_sinks(
        config,
        vec![capture.sink("capture", &Stream::ALL, Format::Json)],
    )
    .unwrap();
    (logger, layer, capture)
}

/// Polls `condition` until it holds or `timeout` passes.
pub fn eventually(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let until = Instant::now() + timeout;
    while Instant::now() < until {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    condition()
}
