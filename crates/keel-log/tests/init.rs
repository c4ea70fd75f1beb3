//! `init` installs the global subscriber, the `log` bridge and the panic reporter: its own test
//! binary, since all three are process-wide.

// Test code: a failed setup or assertion must stop the run loudly.
#![allow(clippy::unwrap_used, clippy::panic, clippy::indexing_slicing)]

use std::fs;
use std::time::Duration;

use keel_log::{Format, LogConfig, LogInitError, SinkConfig, Stream};

#[test]
fn init_installs_the_subscriber_and_the_panic_reporter_once() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        dir: dir.path().to_path_buf(),
        sinks: vec![
            SinkConfig::file("app-file", "app.log", Format::Json, vec![Stream::App]),
            SinkConfig::file("error-file", "error.log", Format::Json, vec![Stream::Error]),
        ],
        ..LogConfig::development()
    };
    let logger = keel_log::init(&config).unwrap();
    tracing::info!(answer = 42_u64, "through the global subscriber");
    let _ = keel_guard::isolate("init-test", || panic!("reported by the hook"));
    assert!(logger.flush(Duration::from_secs(20)));

    let app = fs::read_to_string(dir.path().join("app.log")).unwrap();
    assert!(app.contains("through the global subscriber"), "{app}");
    let errors = fs::read_to_string(dir.path().join("error.log")).unwrap();
    let panic: serde_json::Value = errors
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|r| r["component"] == "init-test")
        .unwrap();
    assert_eq!(panic["message"], "reported by the hook");

    match keel_log::init(&config) {
        Err(LogInitError::GlobalSubscriber(_)) => {}
        other => panic!("a second init must fail, got {:?}", other.map(|_| ())),
    }
    keel_guard::panic::clear_reporter();
}
