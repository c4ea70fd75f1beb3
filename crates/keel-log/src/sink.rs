//! Sinks: stdout, stderr, rotated files and caller-supplied writers.
//!
//! A sink that returns an I/O error loses the record at hand (counted in
//! `keel_log_sink_lost_total{sink}`, with the error in `keel_log_sink_errors_total{sink}`) and is
//! retried on the next record; a file sink is reopened first. The failpoint `log.sink` fires
//! before each write.
//!
//! Files rotate by size with the `file-rotate` crate: `ContentLimit::BytesSurpassed` (a file is
//! rotated before the write that follows the one that took it past `max_size`, so a line is
//! never split across two files), `AppendTimestamp` suffixes with `FileLimit::MaxFiles` for the
//! number of backups, and `Compression::OnRotate(0)` (every rotated file is gzipped at once).
//! `file-rotate` takes either a count or an age limit, not both, so the age limit is enforced
//! here: after each rotation, and when the file is opened, rotated files whose modification
//! time is older than `max_age` are deleted.

use std::fs::{self, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use file_rotate::compression::Compression;
use file_rotate::suffix::{AppendTimestamp, FileLimit};
use file_rotate::{ContentLimit, FileRotate};

use crate::config::{FileConfig, Format, LogConfig, SinkConfig, SinkKind};
use crate::error::LogInitError;
use crate::format;
use crate::record::{Record, log_scope};
use crate::stream::{Stream, StreamSet};

/// A sink whose writer the caller supplies: for tests, benchmarks, or an embedding program.
/// Writes are not buffered by the logger; wrap the writer in a `BufWriter` if it should be.
pub struct CustomSink {
    /// The sink's name, used in metrics and stats.
    pub name: String,
    /// The streams this sink takes.
    pub streams: Vec<Stream>,
    /// How each record is written.
    pub format: Format,
    /// Where the lines go.
    pub writer: Box<dyn Write + Send>,
}

/// Error and loss counts of one sink, readable without the sinks' lock.
#[derive(Debug)]
pub(crate) struct SinkCounters {
    pub(crate) name: String,
    pub(crate) errors: AtomicU64,
    pub(crate) lost: AtomicU64,
}

/// How a sink (re)opens its output.
enum Spec {
    Stdout,
    Stderr,
    File { path: PathBuf, config: FileConfig },
    Custom,
}

enum Output {
    Stdout(BufWriter<io::Stdout>),
    Stderr(io::Stderr),
    File(Box<BufWriter<RotatingFile>>),
    Custom(Box<dyn Write + Send>),
}

impl Output {
    fn writer(&mut self) -> &mut dyn Write {
        match self {
            Output::Stdout(w) => w,
            Output::Stderr(w) => w,
            Output::File(w) => w,
            Output::Custom(w) => w,
        }
    }
}

/// One configured sink.
pub(crate) struct Sink {
    streams: Vec<Stream>,
    stream_set: StreamSet,
    format: Format,
    spec: Spec,
    /// `None` after an error on a file: reopened before the next write.
    out: Option<Output>,
    counters: Arc<SinkCounters>,
    /// Records written into the buffer since the last successful flush.
    pending: u64,
    /// True between an error and the next success, so the error is reported on stderr once.
    failing: bool,
}

impl Sink {
    pub(crate) fn from_config(config: &SinkConfig, log: &LogConfig) -> Result<Self, LogInitError> {
        let bad = |reason: &str| LogInitError::Config {
            field: format!("sinks.{}", config.name),
            reason: reason.to_owned(),
        };
        if config.streams.is_empty() {
            return Err(bad("a sink needs at least one stream"));
        }
        let spec = match (config.kind, &config.file) {
            (SinkKind::File, Some(file)) => {
                if file.max_size.0 == 0 {
                    return Err(bad("file.max_size must be more than 0"));
                }
                Spec::File {
                    path: log.resolve(&file.path),
                    config: file.clone(),
                }
            }
            (SinkKind::File, None) => return Err(bad("a file sink needs a `file` table")),
            (_, Some(_)) => return Err(bad("`file` is only for sinks of kind \"file\"")),
            (SinkKind::Stdout, None) => Spec::Stdout,
            (SinkKind::Stderr, None) => Spec::Stderr,
        };
        let out = open(&spec).map_err(|source| LogInitError::Sink {
            sink: config.name.clone(),
            source,
        })?;
        Ok(Self::new(
            config.name.clone(),
            config.streams.clone(),
            config.format,
            spec,
            out,
        ))
    }

    pub(crate) fn custom(custom: CustomSink) -> Self {
        Self::new(
            custom.name,
            custom.streams,
            custom.format,
            Spec::Custom,
            Output::Custom(custom.writer),
        )
    }

    fn new(name: String, streams: Vec<Stream>, format: Format, spec: Spec, out: Output) -> Self {
        Self {
            stream_set: StreamSet::of(&streams),
            streams,
            format,
            spec,
            out: Some(out),
            counters: Arc::new(SinkCounters {
                name,
                errors: AtomicU64::new(0),
                lost: AtomicU64::new(0),
            }),
            pending: 0,
            failing: false,
        }
    }

    pub(crate) fn counters(&self) -> Arc<SinkCounters> {
        Arc::clone(&self.counters)
    }

    /// The stream a record is labelled with in this sink, or `None` when the sink does not take
    /// it. A record goes once to a sink, under its own stream when the sink takes that one.
    fn label_for(&self, record: &Record) -> Option<Stream> {
        if self.stream_set.contains(record.stream) {
            return Some(record.stream);
        }
        if !self.stream_set.intersects(record.streams) {
            return None;
        }
        self.streams
            .iter()
            .copied()
            .find(|s| record.streams.contains(*s))
    }

    fn write_line(&mut self, line: &[u8]) {
        if self.out.is_none() {
            match open(&self.spec) {
                Ok(out) => self.out = Some(out),
                Err(err) => {
                    self.lost(1);
                    self.error(&err);
                    return;
                }
            }
        }
        fail::fail_point!("log.sink");
        let Some(out) = self.out.as_mut() else { return };
        match out.writer().write_all(line) {
            Ok(()) => {
                self.pending += 1;
                self.failing = false;
            }
            Err(err) => {
                let lost = 1 + std::mem::take(&mut self.pending);
                self.lost(lost);
                self.error(&err);
            }
        }
    }

    fn flush(&mut self) {
        let Some(out) = self.out.as_mut() else { return };
        if let Err(err) = out.writer().flush() {
            let lost = std::mem::take(&mut self.pending);
            self.lost(lost);
            self.error(&err);
        } else {
            self.pending = 0;
        }
    }

    fn lost(&self, n: u64) {
        if n > 0 {
            self.counters.lost.fetch_add(n, Ordering::Relaxed);
            metrics::counter!("keel_log_sink_lost_total", "sink" => self.counters.name.clone())
                .increment(n);
        }
    }

    fn error(&mut self, err: &io::Error) {
        self.counters.errors.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("keel_log_sink_errors_total", "sink" => self.counters.name.clone())
            .increment(1);
        if !self.failing {
            self.failing = true;
            let _ = writeln!(
                io::stderr(),
                "keel-log: sink `{}` failed: {err} (retried on the next record)",
                self.counters.name
            );
        }
        if matches!(self.spec, Spec::File { .. }) {
            // Reopen the file before the next write; what is left in the buffer is lost.
            self.out = None;
        }
    }
}

fn open(spec: &Spec) -> io::Result<Output> {
    Ok(match spec {
        Spec::Stdout => Output::Stdout(BufWriter::with_capacity(64 * 1024, io::stdout())),
        Spec::Stderr => Output::Stderr(io::stderr()),
        Spec::File { path, config } => {
            let file = RotatingFile::open(path, config)?;
            let capacity = usize::try_from(config.max_size.0)
                .unwrap_or(usize::MAX)
                .clamp(256, 64 * 1024);
            Output::File(Box::new(BufWriter::with_capacity(capacity, file)))
        }
        Spec::Custom => {
            return Err(io::Error::other("a custom sink cannot be reopened"));
        }
    })
}

/// Every sink of a logger; the writer thread (or, after shutdown, a caller) holds their lock.
pub(crate) struct Sinks {
    sinks: Vec<Sink>,
}

impl Sinks {
    pub(crate) fn new(sinks: Vec<Sink>) -> Self {
        Self { sinks }
    }

    /// Renders `record` once per (format, stream label) and writes it to every sink that takes
    /// one of its streams.
    pub(crate) fn write_record(&mut self, record: &Record) {
        let mut rendered: Vec<(Format, Stream, Vec<u8>)> = Vec::new();
        for sink in &mut self.sinks {
            let Some(stream) = sink.label_for(record) else {
                continue;
            };
            let format = sink.format;
            if !rendered
                .iter()
                .any(|(f, s, _)| *f == format && *s == stream)
            {
                let mut line = Vec::with_capacity(256);
                format::render(record, stream, format, &mut line);
                rendered.push((format, stream, line));
            }
            if let Some((_, _, line)) = rendered
                .iter()
                .find(|(f, s, _)| *f == format && *s == stream)
            {
                sink.write_line(line);
            }
        }
    }

    /// Flushes every sink's buffer.
    pub(crate) fn flush(&mut self) {
        for sink in &mut self.sinks {
            // A panicking custom writer loses its buffer, not the other sinks' flush.
            let _ = keel_guard::isolate(log_scope(), || sink.flush());
        }
    }
}

/// A size-rotated file: `file-rotate` plus the age limit it cannot combine with a count.
struct RotatingFile {
    rotate: FileRotate<AppendTimestamp>,
    path: PathBuf,
    config: FileConfig,
    max_bytes: u64,
    /// Mirrors the byte count `file-rotate` keeps, to know when it rotates.
    written: u64,
}

impl RotatingFile {
    fn open(path: &Path, config: &FileConfig) -> io::Result<Self> {
        let parent = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .ok_or_else(|| io::Error::other(format!("{} has no directory", path.display())))?;
        fs::create_dir_all(parent)?;
        // `file-rotate` drops writes silently when it cannot open its file: open it once here
        // so that an unwritable path is an error.
        OpenOptions::new().create(true).append(true).open(path)?;
        let mut file = Self {
            rotate: new_rotate(path, config)?,
            path: path.to_path_buf(),
            config: config.clone(),
            max_bytes: config.max_size.0,
            written: fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        };
        file.enforce_max_age()?;
        Ok(file)
    }

    /// Deletes rotated files older than `max_age`; rebuilds the rotator if it deleted any, so
    /// its list of backups matches the directory again.
    fn enforce_max_age(&mut self) -> io::Result<()> {
        let Some(max_age) = self.config.max_age else {
            return Ok(());
        };
        if remove_older_than(&self.path, max_age) > 0 {
            self.rotate = new_rotate(&self.path, &self.config)?;
        }
        Ok(())
    }
}

fn new_rotate(path: &Path, config: &FileConfig) -> io::Result<FileRotate<AppendTimestamp>> {
    let max_bytes = usize::try_from(config.max_size.0)
        .unwrap_or(usize::MAX)
        .max(1);
    let compression = if config.compress {
        Compression::OnRotate(0)
    } else {
        Compression::None
    };
    let backups = config.max_backups;
    // `FileRotate::new` panics when it cannot create the directory or read it; the directory
    // was created just before, and a panic anyway becomes an error here.
    keel_guard::isolate(log_scope(), || {
        FileRotate::new(
            path,
            AppendTimestamp::default(FileLimit::MaxFiles(backups)),
            ContentLimit::BytesSurpassed(max_bytes),
            compression,
            None,
        )
    })
    .map_err(|panicked| {
        io::Error::other(format!(
            "cannot open {}: {}",
            path.display(),
            panicked.message
        ))
    })
}

/// Deletes the rotated siblings of `path` (`<name>.<timestamp>[.n][.gz]`) last modified more
/// than `max_age` ago; returns how many it deleted.
pub(crate) fn remove_older_than(path: &Path, max_age: Duration) -> usize {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return 0;
    };
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let prefix = format!("{name}.");
    let now = SystemTime::now();
    let mut removed = 0;
    for entry in entries.flatten() {
        let file_name = entry.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        if !rest.starts_with(|c: char| c.is_ascii_digit()) {
            continue;
        }
        let old = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|modified| now.duration_since(modified).ok())
            .is_some_and(|age| age > max_age);
        if old && fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let rotates = self.written > self.max_bytes;
        let n = self.rotate.write(buf)?;
        if rotates {
            self.written = 0;
            self.enforce_max_age()?;
        }
        self.written = self.written.saturating_add(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.rotate.flush()
    }
}
