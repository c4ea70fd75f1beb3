//! keel's async logger, on `tracing`.
//!
//! A log call turns the event into an owned record (its fields and those of its enclosing spans)
//! and puts it on a bounded queue; one writer thread formats it and writes it to the sinks. The
//! caller never waits for I/O. `docs/logging.md` is the operator's reference.
//!
//! - [`config`]: [`LogConfig`], sinks, formats, rotation; development and production defaults.
//! - [`filter`]: per-stream filters (level, target, route prefix, method), changeable at run time.
//! - [`stream`]: the streams `app`, `audit`, `access`, `error` and how events are routed to them.
//! - `layer`: the [`KeelLayer`] that builds records from `tracing` events and spans.
//! - `queue`: the bounded queue, its drop/reserve/fallback policy, the isolated writer thread,
//!   its restart loop and watchdog, flush and shutdown.
//! - `sink`: stdout, stderr, rotated files (with max age and gzip) and [`CustomSink`]s.
//! - `format`: text and JSON lines.
//! - `record`: the owned record and the field visitor that survives a panicking `Display`.

pub mod config;
mod error;
pub mod filter;
mod format;
mod layer;
mod queue;
mod record;
mod sink;
pub mod stream;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde::Serialize;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

pub use config::{ByteSize, FileConfig, Format, LogConfig, SinkConfig, SinkKind};
pub use error::LogInitError;
pub use filter::{Directive, FilterError, FilterSet, LevelFilter, StreamFilter};
pub use layer::KeelLayer;
pub use record::{COMPONENT, PANICKED_FIELD};
pub use sink::CustomSink;
pub use stream::{Level, Stream};

use filter::CompiledFilters;
use queue::{LogQueue, WriterState};
use sink::{Sink, Sinks};

/// A handle on the logger: flush, shutdown, filters, stats. Cheap to clone.
#[derive(Clone)]
pub struct Logger {
    shared: Arc<LogQueue>,
}

impl std::fmt::Debug for Logger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Logger")
            .field("queue_len", &self.shared.queue_len())
            .field("synchronous", &self.shared.is_synchronous())
            .finish_non_exhaustive()
    }
}

/// Counts since start-up, for the admin API and tests.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogStats {
    /// Records written (to every sink that takes them; a sink error is counted per sink).
    pub written: u64,
    /// Records lost to a panicking formatter or sink.
    pub failed: u64,
    /// Warnings, errors and panic records written to stderr by the caller because the queue
    /// was full.
    pub fallback: u64,
    /// Debug/info/trace records dropped because the queue was past its low-level limit.
    pub dropped: Vec<DroppedCount>,
    /// The sum of `dropped`.
    pub dropped_total: u64,
    /// Errors and losses per sink.
    pub sinks: Vec<SinkStats>,
    /// Records waiting in the queue.
    pub queue_len: usize,
    /// The queue's capacity.
    pub queue_capacity: usize,
    /// Times the writer was restarted (after a panic in its loop, or by the watchdog).
    pub writer_restarts: u64,
    /// True after shutdown: records are written by the caller.
    pub synchronous: bool,
}

/// Dropped records of one stream and level.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DroppedCount {
    /// The stream.
    pub stream: Stream,
    /// The level.
    pub level: Level,
    /// How many.
    pub count: u64,
}

/// Errors and losses of one sink.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SinkStats {
    /// The sink's name.
    pub name: String,
    /// I/O errors it returned.
    pub errors: u64,
    /// Records it lost to those errors.
    pub lost: u64,
}

impl LogStats {
    /// Dropped records of `stream` at `level`.
    pub fn dropped(&self, stream: Stream, level: Level) -> u64 {
        self.dropped
            .iter()
            .find(|d| d.stream == stream && d.level == level)
            .map_or(0, |d| d.count)
    }
}

impl Logger {
    /// Waits up to `deadline` until every record queued before the call is written and the
    /// sinks flushed; true when that happened in time.
    pub fn flush(&self, deadline: Duration) -> bool {
        self.shared.flush(deadline)
    }

    /// Drains the queue (up to `deadline`), stops the writer thread, and from then on has
    /// callers write their records themselves. True when the queue drained in time.
    pub fn shutdown(&self, deadline: Duration) -> bool {
        self.shared.shutdown(deadline)
    }

    /// The filters in force.
    pub fn filters(&self) -> FilterSet {
        self.shared.filters.load().source().clone()
    }

    /// Validates and installs `filters`; they apply from the next record on.
    pub fn set_filters(&self, filters: FilterSet) -> Result<(), FilterError> {
        let compiled = CompiledFilters::new(filters)?;
        let min_rank = compiled.min_rank();
        self.shared.filters.store(Arc::new(compiled));
        self.shared.min_rank.store(min_rank, Ordering::Relaxed);
        Ok(())
    }

    /// Counts since start-up. Never blocks, even when a sink is stalled.
    pub fn stats(&self) -> LogStats {
        let core = &self.shared.core;
        let counters = &core.counters;
        let mut dropped = Vec::new();
        for stream in Stream::ALL {
            for level in Level::ALL {
                let count = counters
                    .dropped(stream, level)
                    .map_or(0, |c| c.load(Ordering::Relaxed));
                if count > 0 {
                    dropped.push(DroppedCount {
                        stream,
                        level,
                        count,
                    });
                }
            }
        }
        LogStats {
            written: counters.written.load(Ordering::Relaxed),
            failed: counters.failed.load(Ordering::Relaxed),
            fallback: counters.fallback.load(Ordering::Relaxed),
            dropped_total: dropped.iter().map(|d| d.count).sum(),
            dropped,
            sinks: core
                .sink_counters
                .iter()
                .map(|s| SinkStats {
                    name: s.name.clone(),
                    errors: s.errors.load(Ordering::Relaxed),
                    lost: s.lost.load(Ordering::Relaxed),
                })
                .collect(),
            queue_len: self.shared.queue_len(),
            queue_capacity: self.shared.capacity,
            writer_restarts: counters.writer_restarts.load(Ordering::Relaxed),
            synchronous: self.shared.is_synchronous(),
        }
    }

    /// A panic reporter for [`keel_guard::panic::set_reporter`]: each panic becomes a record of
    /// the `error` stream (component, context, message, location, thread, backtrace or
    /// backtrace_skipped). It never blocks and never panics.
    pub fn panic_reporter(&self) -> Box<keel_guard::panic::Reporter> {
        let shared = Arc::clone(&self.shared);
        Box::new(move |report| shared.report_panic(report))
    }

    /// True while the writer thread runs (false after shutdown, or until the watchdog restarts
    /// a writer that died).
    pub fn writer_alive(&self) -> bool {
        self.shared.writer_alive()
    }
}

/// Builds the logger and its layer without installing anything global (for tests, benches,
/// or a program that composes its own subscriber).
pub fn build(config: &LogConfig) -> Result<(Logger, KeelLayer), LogInitError> {
    build_with_sinks(config, Vec::new())
}

/// [`build`], with extra sinks whose writers the caller supplies.
pub fn build_with_sinks(
    config: &LogConfig,
    custom: Vec<CustomSink>,
) -> Result<(Logger, KeelLayer), LogInitError> {
    validate(config, &custom)?;
    let filters = CompiledFilters::new(config.filters.clone())?;
    let mut sinks = Vec::with_capacity(config.sinks.len() + custom.len());
    for sink in &config.sinks {
        sinks.push(Sink::from_config(sink, config)?);
    }
    sinks.extend(custom.into_iter().map(Sink::custom));
    let counters = sinks.iter().map(Sink::counters).collect();
    let core = WriterState::new(Sinks::new(sinks), counters);
    let shared = LogQueue::start(
        core,
        config.queue_capacity,
        config.reserved_for_warnings,
        filters,
    )
    .map_err(LogInitError::Spawn)?;
    Ok((
        Logger {
            shared: Arc::clone(&shared),
        },
        KeelLayer { shared },
    ))
}

/// Builds the logger, installs it as the global `tracing` subscriber
/// (`registry().with(layer)`, plus the `log` crate bridge, so dependencies that use `log` are
/// logged too), installs the keel panic hook and this logger as its reporter.
pub fn init(config: &LogConfig) -> Result<Logger, LogInitError> {
    let (logger, layer) = build(config)?;
    tracing_subscriber::registry().with(layer).try_init()?;
    keel_guard::panic::install_hook();
    keel_guard::panic::set_full_backtraces(config.full_backtraces);
    keel_guard::panic::set_reporter(logger.panic_reporter());
    Ok(logger)
}

fn validate(config: &LogConfig, custom: &[CustomSink]) -> Result<(), LogInitError> {
    let bad = |field: &str, reason: &str| LogInitError::Config {
        field: field.to_owned(),
        reason: reason.to_owned(),
    };
    if config.queue_capacity == 0 {
        return Err(bad("queue_capacity", "must be at least 1"));
    }
    if config.reserved_for_warnings >= config.queue_capacity {
        return Err(bad(
            "reserved_for_warnings",
            "must be less than queue_capacity, or debug and info could never be queued",
        ));
    }
    let mut names = HashSet::new();
    let all_names = config
        .sinks
        .iter()
        .map(|s| s.name.as_str())
        .chain(custom.iter().map(|s| s.name.as_str()));
    for name in all_names {
        if name.is_empty() {
            return Err(bad("sinks.name", "a sink needs a name"));
        }
        if !names.insert(name) {
            return Err(LogInitError::Config {
                field: format!("sinks.{name}"),
                reason: "two sinks have this name".to_owned(),
            });
        }
    }
    Ok(())
}
