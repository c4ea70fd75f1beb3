//! The logger end to end, without failpoints: formats, span fields, routing, filters, files,
//! stalls, flush and shutdown.

// Test and bench code: a failed setup or assertion must stop the run loudly, so unwrap,
// panic and indexing are what is wanted here (the production code denies them).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::time::{Duration, Instant, SystemTime};

use common::*;
use keel_log::{
    ByteSize, Directive, FileConfig, FilterSet, Format, Level, LevelFilter, LogConfig,
    LogInitError, SinkConfig, Stream,
};
use tracing::{error, info, info_span, warn};

#[test]
fn json_lines_carry_time_level_stream_target_message_and_fields() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = bare_config(dir.path());
    config.sinks = vec![SinkConfig::file(
        "app-file",
        "app.log",
        Format::Json,
        vec![Stream::App],
    )];
    let (logger, layer) = keel_log::build(&config).unwrap();
    with_layer(&layer, || {
        info!(user = "ana", attempts = 3_u64, ok = true, "signed in");
        warn!(ratio = 0.5, "half");
    });
    assert!(logger.flush(LONG));

    let text = fs::read_to_string(dir.path().join("app.log")).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    let first = &lines[0];
    for key in ["time", "level", "stream", "target", "message"] {
        assert!(first.get(key).is_some(), "missing {key} in {first}");
    }
    assert_eq!(first["level"], "INFO");
    assert_eq!(first["stream"], "app");
    assert_eq!(first["target"], "logger");
    assert_eq!(first["message"], "signed in");
    assert_eq!(first["user"], "ana");
    assert_eq!(first["attempts"], 3);
    assert_eq!(first["ok"], true);
    assert_eq!(lines[1]["level"], "WARN");
    assert_eq!(lines[1]["ratio"], 0.5);
    // RFC 3339, UTC.
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
}

#[test]
fn span_fields_appear_in_every_record_of_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let (logger, layer, capture) = capture_logger(&bare_config(dir.path()));
    with_layer(&layer, || {
        let request = info_span!(
            "request",
            request_id = "req-42",
            method = "GET",
            route = "/v1/commands",
            status = tracing::field::Empty
        );
        let _entered = request.enter();
        info!("first");
        {
            let _inner = info_span!("claim", batch = 10_u64).entered();
            info!(batch = 11_u64, "inner overrides outer");
        }
        request.record("status", 200_u64);
        info!("after record");
        drop(_entered);
        info!("outside");
    });
    assert!(logger.flush(LONG));
    let records = capture.json();
    assert_eq!(records.len(), 4);
    for record in &records[..3] {
        assert_eq!(record["request_id"], "req-42", "{record}");
        assert_eq!(record["route"], "/v1/commands");
    }
    assert_eq!(records[1]["batch"], 11);
    assert_eq!(records[2]["status"], 200);
    assert!(records[3].get("request_id").is_none());
}

#[test]
fn events_are_routed_to_their_streams_and_app_errors_also_to_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = bare_config(dir.path());
    config.sinks = Stream::ALL
        .iter()
        .map(|s| {
            SinkConfig::file(
                format!("{}-file", s.as_str()),
                format!("{}.log", s.as_str()),
                Format::Json,
                vec![*s],
            )
        })
        .collect();
    let (logger, layer) = keel_log::build(&config).unwrap();
    with_layer(&layer, || {
        info!(target: "keel::audit", actor = "admin", "api key created");
        info!(target: "keel::access", status = 200_u64, "GET /healthz");
        info!(target: "keel::http", "plain");
        error!(target: "keel::store", "disk full");
    });
    logger.panic_reporter()(&keel_guard::panic::PanicReport {
        component: "job:cleanup".to_owned(),
        context: None,
        message: "boom".to_owned(),
        location: Some("src/x.rs:1:2".to_owned()),
        thread: Some("worker".to_owned()),
        backtrace: None,
        backtrace_skipped: true,
        fingerprint: "0123456789abcdef".to_owned(),
        request_id: None,
        at: time::OffsetDateTime::now_utc(),
    });
    assert!(logger.flush(LONG));

    let read = |name: &str| -> Vec<serde_json::Value> {
        fs::read_to_string(dir.path().join(name))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let audit = read("audit.log");
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0]["stream"], "audit");
    assert_eq!(read("access.log").len(), 1);
    let app = read("app.log");
    assert_eq!(app.len(), 2);
    let errors = read("error.log");
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert_eq!(errors[0]["message"], "disk full");
    assert_eq!(errors[0]["stream"], "error");
    assert_eq!(errors[1]["target"], "keel::panic");
    assert_eq!(errors[1]["component"], "job:cleanup");
    assert_eq!(errors[1]["location"], "src/x.rs:1:2");
    assert_eq!(errors[1]["thread"], "worker");
    assert_eq!(errors[1]["backtrace_skipped"], true);
}

#[test]
fn a_sink_taking_two_streams_writes_an_app_error_once() {
    let dir = tempfile::tempdir().unwrap();
    let (logger, layer, capture) = capture_logger(&bare_config(dir.path()));
    with_layer(&layer, || error!("once"));
    assert!(logger.flush(LONG));
    let records = capture.json();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["stream"], "app");
}

struct Exploding;

impl fmt::Display for Exploding {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        panic!("display exploded")
    }
}

impl fmt::Debug for Exploding {
    fn fmt(&self, _: &mut fmt::Formatter<'_>) -> fmt::Result {
        panic!("debug exploded")
    }
}

#[test]
fn a_field_whose_display_panics_gets_a_placeholder_and_the_caller_survives() {
    let dir = tempfile::tempdir().unwrap();
    let (logger, layer, capture) = capture_logger(&bare_config(dir.path()));
    with_layer(&layer, || {
        info!(bad = %Exploding, worse = ?Exploding, good = 1_u64, "still here");
        let _span = info_span!("request", request_id = %Exploding).entered();
        info!("in a span with a bad field");
    });
    assert!(logger.flush(LONG));
    let records = capture.json();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0]["message"], "still here");
    assert_eq!(records[0]["bad"], keel_log::PANICKED_FIELD);
    assert_eq!(records[0]["worse"], keel_log::PANICKED_FIELD);
    assert_eq!(records[0]["good"], 1);
    assert_eq!(records[1]["request_id"], keel_log::PANICKED_FIELD);
}

/// A logger whose one sink takes every stream and blocks until its gate opens.
fn stalled_logger(
    dir: &std::path::Path,
    capacity: usize,
    reserved: usize,
) -> (keel_log::Logger, keel_log::KeelLayer, Gated) {
    let mut config = bare_config(dir);
    config.queue_capacity = capacity;
    config.reserved_for_warnings = reserved;
    let gated = Gated {
        gate: Gate::default(),
        capture: Capture::default(),
    };
    let (logger, layer) = keel_log::build_with_sinks(
        &config,
        vec![keel_log::CustomSink {
            name: "stalled".to_owned(),
            streams: Stream::ALL.to_vec(),
            format: Format::Json,
            writer: Box::new(gated.clone()),
        }],
    )
    .unwrap();
    (logger, layer, gated)
}

#[test]
fn a_stalled_sink_does_not_block_callers_drops_info_and_keeps_every_error() {
    let dir = tempfile::tempdir().unwrap();
    let (logger, layer, gated) = stalled_logger(dir.path(), 64, 16);

    let calls = 20_000;
    let started = Instant::now();
    with_layer(&layer, || {
        for i in 0..calls {
            info!(i, "chatter");
        }
        for i in 0..10 {
            error!(i, "must survive");
        }
    });
    let elapsed = started.elapsed();
    // Blocking calls would never return at all while the gate is shut; the bound is loose
    // because the machine is shared.
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert!(
        !logger.flush(Duration::from_millis(50)),
        "the sink is stalled"
    );

    let stats = logger.stats();
    let dropped = stats.dropped(Stream::App, Level::Info);
    assert!(dropped >= calls as u64 - 64, "dropped {dropped}");
    assert_eq!(stats.dropped_total, dropped);
    assert_eq!(stats.fallback, 0);

    gated.gate.open();
    assert!(logger.flush(LONG));
    let records = gated.capture.json();
    let errors: Vec<_> = records.iter().filter(|r| r["level"] == "ERROR").collect();
    assert_eq!(errors.len(), 10);
    let infos = records.iter().filter(|r| r["level"] == "INFO").count() as u64;
    assert_eq!(infos + dropped, calls as u64);
    assert_eq!(logger.stats().written, records.len() as u64);
}

#[test]
fn with_the_queue_full_of_info_records_audit_records_are_still_written() {
    let dir = tempfile::tempdir().unwrap();
    let (logger, layer, gated) = stalled_logger(dir.path(), 64, 16);

    with_layer(&layer, || {
        for i in 0..1_000 {
            info!(i, "chatter");
        }
        // The low-level part of the queue is full: info records are dropped, audit ones are not.
        for i in 0..10 {
            info!(target: "keel::audit", action = "key.create", i, "audited");
        }
        info!("dropped as well");
    });
    let stats = logger.stats();
    assert!(
        stats.dropped(Stream::App, Level::Info) >= 1_000 - 64,
        "{stats:?}"
    );
    assert_eq!(stats.dropped(Stream::Audit, Level::Info), 0, "{stats:?}");
    assert_eq!(stats.fallback, 0, "{stats:?}");

    gated.gate.open();
    assert!(logger.flush(LONG));
    let records = gated.capture.json();
    let audited: Vec<_> = records.iter().filter(|r| r["stream"] == "audit").collect();
    assert_eq!(audited.len(), 10, "{records:?}");
    assert!(audited.iter().all(|r| r["action"] == "key.create"));
}

#[test]
fn when_even_the_reserve_is_full_errors_go_to_stderr_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let (logger, layer, gated) = stalled_logger(dir.path(), 8, 4);
    with_layer(&layer, || {
        for i in 0..30 {
            error!(i, "flood");
        }
    });
    // One record is held by the stalled writer, eight wait: the rest went to stderr.
    let stats = logger.stats();
    assert!(stats.fallback >= 30 - 9, "{stats:?}");
    assert_eq!(stats.dropped_total, 0);
    gated.gate.open();
    assert!(logger.flush(LONG));
    let written = gated.capture.lines().len() as u64;
    assert_eq!(written + logger.stats().fallback, 30);
}

#[test]
fn flush_waits_for_the_queue_and_after_shutdown_callers_write_synchronously() {
    let dir = tempfile::tempdir().unwrap();
    let (logger, layer, capture) = capture_logger(&bare_config(dir.path()));
    with_layer(&layer, || {
        for i in 0..1000 {
            info!(i, "queued");
        }
    });
    assert!(logger.flush(LONG));
    assert_eq!(capture.lines().len(), 1000);

    with_layer(&layer, || info!("before shutdown"));
    assert!(logger.shutdown(LONG));
    assert_eq!(capture.lines().len(), 1001);
    assert!(logger.stats().synchronous);
    assert!(!logger.writer_alive());

    with_layer(&layer, || info!("after shutdown"));
    // Written by the caller before the call returned: no flush needed.
    let lines = capture.json();
    assert_eq!(lines.len(), 1002);
    assert_eq!(lines[1001]["message"], "after shutdown");
    assert!(logger.flush(LONG));
    assert!(logger.shutdown(LONG), "shutdown is idempotent");
}

#[test]
fn files_rotate_by_size_keep_the_backup_limit_and_are_compressed() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = bare_config(dir.path());
    let mut file = FileConfig::new("app.log");
    file.max_size = ByteSize(1024);
    file.max_backups = 3;
    file.compress = true;
    config.sinks = vec![SinkConfig {
        name: "app-file".to_owned(),
        kind: keel_log::SinkKind::File,
        streams: vec![Stream::App],
        format: Format::Json,
        file: Some(file),
    }];
    let (logger, layer) = keel_log::build(&config).unwrap();
    with_layer(&layer, || {
        for i in 0..200 {
            info!(
                i,
                padding = "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",
                "rotating"
            );
            if i % 10 == 0 {
                assert!(logger.flush(LONG));
            }
        }
    });
    assert!(logger.flush(LONG));

    let mut backups = Vec::new();
    for entry in fs::read_dir(dir.path()).unwrap() {
        let name = entry.unwrap().file_name().into_string().unwrap();
        if name != "app.log" {
            backups.push(name);
        }
    }
    assert!(!backups.is_empty(), "no rotation happened");
    assert!(backups.len() <= 3, "{backups:?}");
    let current = fs::read_to_string(dir.path().join("app.log")).unwrap();
    // A line is never split: every line of every file parses.
    for line in current.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap();
    }
    for name in &backups {
        assert!(
            name.starts_with("app.log.") && name.ends_with(".gz"),
            "{name}"
        );
        let bytes = fs::read(dir.path().join(name)).unwrap();
        assert_eq!(&bytes[..2], &[0x1f, 0x8b], "gzip magic in {name}");
        let mut text = String::new();
        flate2::read::GzDecoder::new(&bytes[..])
            .read_to_string(&mut text)
            .unwrap();
        assert!(text.len() >= 1024, "{name} holds {} bytes", text.len());
        for line in text.lines() {
            let record: serde_json::Value = serde_json::from_str(line).unwrap();
            assert_eq!(record["message"], "rotating");
        }
    }
}

#[test]
fn rotated_files_older_than_max_age_are_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let old = dir.path().join("app.log.20000101T000000.gz");
    let fresh = dir.path().join("app.log.20000102T000000.gz");
    let unrelated = dir.path().join("app.log.keep");
    for path in [&old, &fresh, &unrelated] {
        fs::write(path, b"x").unwrap();
    }
    let ten_days_ago = SystemTime::now() - Duration::from_secs(10 * 24 * 3600);
    for path in [&old, &unrelated] {
        fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(ten_days_ago)
            .unwrap();
    }
    let mut config = bare_config(dir.path());
    let mut file = FileConfig::new("app.log");
    file.max_age = Some(Duration::from_secs(24 * 3600));
    config.sinks = vec![SinkConfig {
        name: "app-file".to_owned(),
        kind: keel_log::SinkKind::File,
        streams: vec![Stream::App],
        format: Format::Text,
        file: Some(file),
    }];
    let (_logger, _layer) = keel_log::build(&config).unwrap();
    assert!(!old.exists());
    assert!(fresh.exists());
    assert!(unrelated.exists(), "only rotated files are aged out");
}

#[test]
fn a_directive_silences_a_route_prefix_of_the_access_stream() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = bare_config(dir.path());
    config.filters.access.directives = vec![Directive {
        target: None,
        route_prefix: Some("/healthz".to_owned()),
        method: None,
        level: LevelFilter::Off,
    }];
    let (logger, layer, capture) = capture_logger(&config);
    with_layer(&layer, || {
        for route in ["/healthz", "/v1/commands"] {
            let _span = info_span!("request", request_id = "r", method = "GET", route).entered();
            info!(target: "keel::access", status = 200_u64, "request done");
            info!(target: "keel::http", "app records are not filtered by the access directive");
        }
    });
    assert!(logger.flush(LONG));
    let records = capture.json();
    let access: Vec<_> = records.iter().filter(|r| r["stream"] == "access").collect();
    assert_eq!(access.len(), 1);
    assert_eq!(access[0]["route"], "/v1/commands");
    assert_eq!(records.iter().filter(|r| r["stream"] == "app").count(), 2);
}

#[test]
fn set_filters_applies_to_the_next_record_and_invalid_filters_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (logger, layer, capture) = capture_logger(&bare_config(dir.path()));
    with_layer(&layer, || {
        info!("kept");
        tracing::debug!("below info");
        let mut filters = logger.filters();
        filters.app.level = LevelFilter::Warn;
        filters.app.directives.push(Directive {
            target: Some("keel::store".to_owned()),
            route_prefix: None,
            method: None,
            level: LevelFilter::Debug,
        });
        logger.set_filters(filters.clone()).unwrap();
        assert_eq!(logger.filters(), filters);
        info!("now silenced");
        warn!("still kept");
        tracing::debug!(target: "keel::store::sqlite", "store debug kept");
    });
    assert!(logger.flush(LONG));
    let messages: Vec<String> = capture
        .json()
        .iter()
        .map(|r| r["message"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(messages, ["kept", "still kept", "store debug kept"]);

    let mut bad = FilterSet::default();
    bad.access.directives.push(Directive {
        target: None,
        route_prefix: None,
        method: Some("GE T".to_owned()),
        level: LevelFilter::Off,
    });
    let err = logger.set_filters(bad).unwrap_err();
    assert_eq!(err.field, "access.directives[0].method");
    // The filters in force did not change.
    assert_eq!(logger.filters().app.level, LevelFilter::Warn);

    let err = FilterSet::from_json(r#"{"audit": {"level": "chatty"}}"#).unwrap_err();
    assert_eq!(err.field, "audit.level");
}

/// Fails every write between `from` and `to` (counting writes), then works again.
struct Flaky {
    writes: usize,
    failing: std::ops::Range<usize>,
    capture: Capture,
}

impl Write for Flaky {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.writes += 1;
        if self.failing.contains(&self.writes) {
            return Err(io::Error::other("disk on fire"));
        }
        self.capture.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_sink_error_loses_that_record_for_that_sink_and_the_next_record_is_retried() {
    let dir = tempfile::tempdir().unwrap();
    let flaky = Capture::default();
    let steady = Capture::default();
    let (logger, layer) = keel_log::build_with_sinks(
        &bare_config(dir.path()),
        vec![
            keel_log::CustomSink {
                name: "flaky".to_owned(),
                streams: vec![Stream::App],
                format: Format::Text,
                writer: Box::new(Flaky {
                    writes: 0,
                    failing: 2..3,
                    capture: flaky.clone(),
                }),
            },
            steady.sink("steady", &[Stream::App], Format::Text),
        ],
    )
    .unwrap();
    with_layer(&layer, || {
        for i in 0..3 {
            info!(i, "line");
            assert!(logger.flush(LONG));
        }
    });
    assert_eq!(flaky.lines().len(), 2);
    assert!(flaky.lines()[1].contains("i=2"));
    assert_eq!(steady.lines().len(), 3);
    let stats = logger.stats();
    let sink = stats.sinks.iter().find(|s| s.name == "flaky").unwrap();
    assert_eq!((sink.errors, sink.lost), (1, 1));
    assert_eq!(stats.failed, 0);
}

/// Panics on the write of any line containing `poison`.
struct Poisoned(Capture);

impl Write for Poisoned {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        assert!(
            !String::from_utf8_lossy(buf).contains("poison"),
            "sink panicked"
        );
        self.0.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_sink_that_panics_loses_one_record_and_the_writer_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let capture = Capture::default();
    let (logger, layer) = keel_log::build_with_sinks(
        &bare_config(dir.path()),
        vec![keel_log::CustomSink {
            name: "poisoned".to_owned(),
            streams: vec![Stream::App],
            format: Format::Text,
            writer: Box::new(Poisoned(capture.clone())),
        }],
    )
    .unwrap();
    with_layer(&layer, || {
        info!("before");
        info!("poison");
        info!("after");
    });
    assert!(logger.flush(LONG));
    let lines = capture.lines();
    assert_eq!(lines.len(), 2);
    assert!(lines[1].contains("after"));
    let stats = logger.stats();
    assert_eq!((stats.failed, stats.written), (1, 2));
    assert_eq!(stats.writer_restarts, 0);
}

#[test]
fn bad_configs_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = bare_config(dir.path());
    config.reserved_for_warnings = config.queue_capacity;
    match keel_log::build(&config) {
        Err(LogInitError::Config { field, .. }) => assert_eq!(field, "reserved_for_warnings"),
        other => panic!("{:?}", other.err()),
    }
    let mut config = bare_config(dir.path());
    config.sinks = vec![SinkConfig {
        file: None,
        ..SinkConfig::file("f", "f.log", Format::Text, vec![Stream::App])
    }];
    match keel_log::build(&config) {
        Err(LogInitError::Config { field, .. }) => assert_eq!(field, "sinks.f"),
        other => panic!("{:?}", other.err()),
    }
}

#[test]
fn the_production_defaults_open_one_file_per_stream() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        dir: dir.path().join("logs"),
        ..LogConfig::production()
    };
    let (logger, layer) = keel_log::build(&config).unwrap();
    with_layer(&layer, || info!(target: "keel::audit", "audited"));
    assert!(logger.flush(LONG));
    for stream in Stream::ALL {
        assert!(
            dir.path()
                .join(format!("logs/{}.log", stream.as_str()))
                .exists()
        );
    }
    let audit = fs::read_to_string(dir.path().join("logs/audit.log")).unwrap();
    assert!(audit.contains("\"audited\""));
    assert!(logger.shutdown(LONG));
}

#[test]
fn text_lines_are_readable() {
    let dir = tempfile::tempdir().unwrap();
    let capture = Capture::default();
    let (logger, layer) = keel_log::build_with_sinks(
        &bare_config(dir.path()),
        vec![capture.sink("text", &Stream::ALL, Format::Text)],
    )
    .unwrap();
    with_layer(&layer, || {
        let _span = info_span!("request", request_id = "r-7").entered();
        warn!(target: "keel::http", attempt = 2_u64, "slow\nupstream");
    });
    assert!(logger.flush(LONG));
    let line = capture.text();
    assert!(
        line.ends_with(" WARN  app keel::http: slow\\nupstream request_id=r-7 attempt=2\n"),
        "{line}"
    );
}
