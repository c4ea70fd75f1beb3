//! The contenders of the logger benchmarks: keel's logger and `tracing-appender`'s non-blocking
//! writer (behind `tracing_subscriber::fmt`), each writing text lines to a size-rotated file in
//! a temporary directory, or to a writer that blocks until the run ends.

#![allow(dead_code)] // Each bench binary uses a different subset.

use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use file_rotate::compression::Compression;
use file_rotate::suffix::{AppendTimestamp, FileLimit};
use file_rotate::{ContentLimit, FileRotate};
use keel_log::{ByteSize, CustomSink, FileConfig, Format, LogConfig, SinkConfig, SinkKind, Stream};
use parking_lot::{Condvar, Mutex};
use tracing::Dispatch;
use tracing_appender::non_blocking::{NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::layer::SubscriberExt;

/// Queue capacity given to both contenders, so they drop at the same depth.
pub const QUEUE: usize = 8192;
/// Rotation size of the files (bounded disk use however long criterion runs).
pub const FILE_SIZE: u64 = 64 * 1024 * 1024;

/// One contender, ready to be the thread's dispatcher.
pub struct Contender {
    pub name: &'static str,
    pub dispatch: Dispatch,
    /// Records dropped by the contender so far (its queue was full).
    pub dropped: Box<dyn Fn() -> u64>,
    /// Releases stalled writers and waits for the writer to end.
    pub finish: Box<dyn FnOnce()>,
}

/// The log call being measured.
#[inline(always)]
pub fn log_call(i: u64) {
    tracing::info!(
        request_id = "7f9c2d",
        route = "/v1/commands",
        n = i,
        "command claimed"
    );
}

/// A gate that blocks every write until it is opened.
#[derive(Clone, Default)]
pub struct Gate(Arc<(Mutex<bool>, Condvar)>);

impl Gate {
    pub fn open(&self) {
        *self.0.0.lock() = true;
        self.0.1.notify_all();
    }
}

/// A writer that waits for its gate, then discards.
pub struct Stalled(pub Gate);

impl Write for Stalled {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut open = self.0.0.0.lock();
        while !*open {
            self.0.0.1.wait(&mut open);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

pub fn keel_file(dir: &Path) -> Contender {
    let mut file = FileConfig::new("keel.log");
    file.max_size = ByteSize(FILE_SIZE);
    file.max_backups = 1;
    file.compress = false;
    let config = LogConfig {
        queue_capacity: QUEUE,
        dir: dir.to_path_buf(),
        sinks: vec![SinkConfig {
            name: "file".to_owned(),
            kind: SinkKind::File,
            streams: Stream::ALL.to_vec(),
            format: Format::Text,
            file: Some(file),
        }],
        ..LogConfig::development()
    };
    let (logger, layer) = keel_log::build(&config).unwrap();
    let stats = logger.clone();
    Contender {
        name: "keel (file)",
        dispatch: Dispatch::new(tracing_subscriber::registry().with(layer)),
        dropped: Box::new(move || stats.stats().dropped_total),
        finish: Box::new(move || {
            logger.shutdown(Duration::from_secs(30));
        }),
    }
}

pub fn keel_stalled() -> Contender {
    let gate = Gate::default();
    let config = LogConfig {
        queue_capacity: QUEUE,
        sinks: Vec::new(),
        ..LogConfig::development()
    };
    let (logger, layer) = keel_log::build_with_sinks(
        &config,
        vec![CustomSink {
            name: "stalled".to_owned(),
            streams: Stream::ALL.to_vec(),
            format: Format::Text,
            writer: Box::new(Stalled(gate.clone())),
        }],
    )
    .unwrap();
    let stats = logger.clone();
    Contender {
        name: "keel (stalled sink)",
        dispatch: Dispatch::new(tracing_subscriber::registry().with(layer)),
        dropped: Box::new(move || stats.stats().dropped_total),
        finish: Box::new(move || {
            gate.open();
            logger.shutdown(Duration::from_secs(30));
        }),
    }
}

fn appender(
    name: &'static str,
    writer: impl Write + Send + 'static,
    on_finish: impl FnOnce() + 'static,
) -> Contender {
    let (non_blocking, guard): (_, WorkerGuard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUE)
        .finish(writer);
    let errors = non_blocking.error_counter();
    let layer = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(non_blocking);
    Contender {
        name,
        dispatch: Dispatch::new(tracing_subscriber::registry().with(layer)),
        dropped: Box::new(move || errors.dropped_lines() as u64),
        finish: Box::new(move || {
            on_finish();
            drop(guard);
        }),
    }
}

pub fn appender_file(dir: &Path) -> Contender {
    let file = FileRotate::new(
        dir.join("appender.log"),
        AppendTimestamp::default(FileLimit::MaxFiles(1)),
        ContentLimit::BytesSurpassed(FILE_SIZE as usize),
        Compression::None,
        None,
    );
    appender("tracing-appender (file)", file, || {})
}

pub fn appender_stalled() -> Contender {
    let gate = Gate::default();
    let release = gate.clone();
    appender(
        "tracing-appender (stalled writer)",
        Stalled(gate),
        move || release.open(),
    )
}
