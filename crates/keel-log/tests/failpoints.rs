//! Failpoints `log.format`, `log.sink`, `log.writer`, `log.writer.exit`, and real panics through
//! the keel panic hook. Failpoints and the panic reporter are process-wide, so these tests run
//! one at a time (the `SERIAL` lock) in their own test binary.

// Test and bench code: a failed setup or assertion must stop the run loudly, so unwrap,
// panic and indexing are what is wanted here (the production code denies them).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use common::*;
use parking_lot::Mutex;
use tracing::info;

/// Taken by every test. Tests that start writer threads which evaluate the writer failpoints
/// shut their logger down before they end, so that no thread of theirs is left to consume the
/// next test's failpoint.
static SERIAL: Mutex<()> = parking_lot::const_mutex(());

/// Removes a failpoint when the test ends, also when it fails.
struct Failpoint(&'static str);

impl Failpoint {
    fn set(name: &'static str, action: &str) -> Self {
        fail::cfg(name, action).unwrap();
        Self(name)
    }
}

impl Drop for Failpoint {
    fn drop(&mut self) {
        fail::remove(self.0);
    }
}

#[test]
fn a_sink_panic_from_the_failpoint_costs_one_record() {
    let _serial = SERIAL.lock();
    let dir = tempfile::tempdir().unwrap();
    let (logger, layer, capture) = capture_logger(&bare_config(dir.path()));
    let _fp = Failpoint::set("log.sink", "1*panic");
    with_layer(&layer, || {
        for i in 0..5_u64 {
            info!(i, "record");
        }
    });
    assert!(logger.flush(LONG));
    let records = capture.json();
    let numbers: Vec<u64> = records.iter().map(|r| r["i"].as_u64().unwrap()).collect();
    assert_eq!(numbers, [1, 2, 3, 4]);
    let stats = logger.stats();
    assert_eq!((stats.failed, stats.written), (1, 4));
}

#[test]
fn a_formatter_panic_from_the_failpoint_costs_one_record() {
    let _serial = SERIAL.lock();
    let dir = tempfile::tempdir().unwrap();
    let (logger, layer, capture) = capture_logger(&bare_config(dir.path()));
    let _fp = Failpoint::set("log.format", "1*panic");
    with_layer(&layer, || {
        for i in 0..3_u64 {
            info!(i, "record");
        }
    });
    assert!(logger.flush(LONG));
    assert_eq!(capture.lines().len(), 2);
    assert_eq!(logger.stats().failed, 1);
}

#[test]
fn a_sink_paused_by_the_failpoint_does_not_block_callers() {
    let _serial = SERIAL.lock();
    let dir = tempfile::tempdir().unwrap();
    let mut config = bare_config(dir.path());
    config.queue_capacity = 32;
    config.reserved_for_warnings = 8;
    let (logger, layer, capture) = capture_logger(&config);
    let fp = Failpoint::set("log.sink", "pause");
    with_layer(&layer, || {
        for i in 0..1000_u64 {
            info!(i, "chatter");
        }
        for i in 0..5_u64 {
            tracing::error!(i, "kept");
        }
    });
    assert!(logger.stats().dropped_total > 0);
    drop(fp); // `remove` also wakes the paused writer.
    assert!(logger.flush(LONG));
    let errors = capture
        .json()
        .iter()
        .filter(|r| r["level"] == "ERROR")
        .count();
    assert_eq!(errors, 5);
}

#[test]
fn a_panic_in_the_writer_loop_restarts_it() {
    let _serial = SERIAL.lock();
    let _fp = Failpoint::set("log.writer", "1*panic");
    let dir = tempfile::tempdir().unwrap();
    let (logger, layer, capture) = capture_logger(&bare_config(dir.path()));
    assert!(eventually(LONG, || logger.stats().writer_restarts == 1));
    with_layer(&layer, || info!("after the restart"));
    assert!(logger.flush(LONG));
    assert_eq!(capture.lines().len(), 1);
    assert!(logger.writer_alive());
    assert!(logger.shutdown(LONG));
}

#[test]
fn a_writer_thread_that_exits_is_restarted_by_the_next_log_call() {
    let _serial = SERIAL.lock();
    let fp = Failpoint::set("log.writer.exit", "1*return");
    let dir = tempfile::tempdir().unwrap();
    let (logger, layer, capture) = capture_logger(&bare_config(dir.path()));
    assert!(eventually(LONG, || !logger.writer_alive()));
    drop(fp);
    assert_eq!(logger.stats().writer_restarts, 0);
    with_layer(&layer, || info!("wakes the watchdog"));
    assert!(logger.flush(LONG));
    assert_eq!(capture.lines().len(), 1);
    assert_eq!(logger.stats().writer_restarts, 1);
    assert!(logger.writer_alive());
    assert!(logger.shutdown(LONG));
}

#[test]
fn a_writer_thread_that_dies_is_restarted_by_flush() {
    let _serial = SERIAL.lock();
    let fp = Failpoint::set("log.writer.exit", "1*panic");
    let dir = tempfile::tempdir().unwrap();
    let (logger, layer, capture) = capture_logger(&bare_config(dir.path()));
    assert!(eventually(LONG, || !logger.writer_alive()));
    drop(fp);
    assert!(logger.flush(LONG));
    assert!(logger.writer_alive());
    assert_eq!(logger.stats().writer_restarts, 1);
    with_layer(&layer, || info!("written by the new writer"));
    assert!(logger.flush(LONG));
    assert_eq!(capture.lines().len(), 1);
    // The new thread must be gone before the next test sets a writer failpoint.
    assert!(logger.shutdown(LONG));
}

#[test]
fn a_real_panic_becomes_an_error_stream_record_with_its_backtrace() {
    let _serial = SERIAL.lock();
    let dir = tempfile::tempdir().unwrap();
    let (logger, _layer, capture) = capture_logger(&bare_config(dir.path()));
    keel_guard::panic::install_hook();
    keel_guard::panic::set_reporter(logger.panic_reporter());
    let result = keel_guard::isolate(
        keel_guard::Scope::new("job:test").with_context("tick 3"),
        || panic!("tick failed"),
    );
    keel_guard::panic::clear_reporter();
    assert!(result.is_err());
    assert!(logger.flush(LONG));
    let records = capture.json();
    let panic = records
        .iter()
        .find(|r| r["target"] == "keel::panic")
        .unwrap();
    assert_eq!(panic["stream"], "error");
    assert_eq!(panic["level"], "ERROR");
    assert_eq!(panic["message"], "tick failed");
    assert_eq!(panic["component"], "job:test");
    assert_eq!(panic["context"], "tick 3");
    assert!(
        panic["location"]
            .as_str()
            .unwrap()
            .contains("failpoints.rs")
    );
    assert!(panic.get("thread").is_some());
    assert!(panic.get("backtrace").is_some() || panic["backtrace_skipped"] == true);
}

#[test]
fn a_sink_panic_is_logged_once_and_does_not_feed_back() {
    let _serial = SERIAL.lock();
    let dir = tempfile::tempdir().unwrap();
    let (logger, layer, capture) = capture_logger(&bare_config(dir.path()));
    keel_guard::panic::install_hook();
    keel_guard::panic::set_reporter(logger.panic_reporter());
    {
        // Every write panics for a while: the panic records of those panics fail too, and must
        // not turn into an endless chain of panic records.
        let _fp = Failpoint::set("log.sink", "3*panic");
        with_layer(&layer, || info!(target: "keel::http", "first"));
        assert!(logger.flush(LONG));
    }
    with_layer(&layer, || info!(target: "keel::http", "second"));
    assert!(logger.flush(LONG));
    keel_guard::panic::clear_reporter();
    let records = capture.json();
    let stats = logger.stats();
    assert!(stats.failed >= 1, "{stats:?}");
    assert!(records.iter().any(|r| r["message"] == "second"));
    let panics = records
        .iter()
        .filter(|r| r["target"] == "keel::panic")
        .count();
    assert!(panics <= 2, "{records:?}");
    // Nothing is left looping in the queue.
    assert_eq!(logger.stats().queue_len, 0);
}
