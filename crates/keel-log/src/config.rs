//! The logger's configuration: queue sizes, the log directory, sinks and filters.
//!
//! Every field has a default, so an empty `[log]` table is valid; [`LogConfig::development`]
//! (the [`Default`]) and [`LogConfig::production`] are the two starting points.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::filter::FilterSet;
use crate::stream::Stream;

/// Default total queue capacity (records).
pub const DEFAULT_QUEUE_CAPACITY: usize = 8192;
/// Default number of queue slots only warnings, errors and panic records may use.
pub const DEFAULT_RESERVED_FOR_WARNINGS: usize = 1024;
/// Default log directory; relative file paths resolve against it. `keel serve` resolves a
/// relative `dir` against its data directory.
pub const DEFAULT_DIR: &str = "logs";

/// The logger's configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Total capacity of the queue between callers and the writer, in records.
    pub queue_capacity: usize,
    /// Slots of the queue kept for warnings, errors, panic records and every `audit` record:
    /// debug and info records of the other streams are admitted only while fewer than
    /// `queue_capacity - reserved_for_warnings` records wait.
    pub reserved_for_warnings: usize,
    /// Directory of the log files; relative file paths resolve against it. Created at start-up.
    pub dir: PathBuf,
    /// Where records go. A record is written once to every sink that takes one of its streams.
    pub sinks: Vec<SinkConfig>,
    /// Which records are kept, per stream. Changeable at run time.
    pub filters: FilterSet,
    /// Panic records carry the whole captured backtrace (about a hundred frames, tens of KB,
    /// most of them the panic machinery's and the async runtime's) instead of the short form:
    /// the frames from the panicking code to the task's entry.
    pub full_backtraces: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self::development()
    }
}

impl LogConfig {
    /// Development: human-readable text on stdout for every stream, info and above.
    pub fn development() -> Self {
        Self {
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            reserved_for_warnings: DEFAULT_RESERVED_FOR_WARNINGS,
            dir: PathBuf::from(DEFAULT_DIR),
            sinks: vec![SinkConfig::stdout(Format::Text, Stream::ALL.to_vec())],
            filters: FilterSet::default(),
            full_backtraces: false,
        }
    }

    /// Production: JSON on stdout for every stream, plus one rotated, compressed JSON file per
    /// stream (`app.log`, `audit.log`, `access.log`, `error.log` in [`LogConfig::dir`]).
    pub fn production() -> Self {
        let mut sinks = vec![SinkConfig::stdout(Format::Json, Stream::ALL.to_vec())];
        for stream in Stream::ALL {
            let mut file = FileConfig::new(format!("{}.log", stream.as_str()));
            if stream == Stream::Audit {
                // The audit trail is kept longer than operational logs.
                file.max_age = Some(Duration::from_secs(90 * 24 * 3600));
            }
            sinks.push(SinkConfig {
                name: format!("{}-file", stream.as_str()),
                kind: SinkKind::File,
                streams: vec![stream],
                format: Format::Json,
                file: Some(file),
            });
        }
        Self {
            sinks,
            ..Self::development()
        }
    }

    /// The path of a file sink: absolute paths stay, relative ones resolve against `dir`.
    pub(crate) fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_path_buf()
        } else if self.dir.as_os_str().is_empty() {
            Path::new(".").join(path)
        } else {
            self.dir.join(path)
        }
    }
}

/// One destination of records.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// The sink's name, used in metrics (`keel_log_sink_errors_total{sink}`) and stats.
    pub name: String,
    /// Where the records go.
    pub kind: SinkKind,
    /// The streams this sink takes.
    pub streams: Vec<Stream>,
    /// How each record is written.
    #[serde(default)]
    pub format: Format,
    /// File settings; required when `kind = "file"`, refused otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<FileConfig>,
}

impl SinkConfig {
    /// A stdout sink for `streams`.
    pub fn stdout(format: Format, streams: Vec<Stream>) -> Self {
        Self {
            name: "stdout".to_owned(),
            kind: SinkKind::Stdout,
            streams,
            format,
            file: None,
        }
    }

    /// A rotated file sink for `streams`, with the default rotation settings.
    pub fn file(
        name: impl Into<String>,
        path: impl Into<PathBuf>,
        format: Format,
        streams: Vec<Stream>,
    ) -> Self {
        Self {
            name: name.into(),
            kind: SinkKind::File,
            streams,
            format,
            file: Some(FileConfig::new(path)),
        }
    }
}

/// The kind of a sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SinkKind {
    /// The process's standard output.
    Stdout,
    /// The process's standard error.
    Stderr,
    /// A file with size-based rotation (see [`FileConfig`]).
    File,
}

/// How a record is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// One human-readable line: `time LEVEL stream target: message key=value ...`.
    #[default]
    Text,
    /// One JSON object per line: `time`, `level`, `stream`, `target`, `message`, then the fields.
    Json,
}

/// Settings of a file sink.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// The file's path; relative paths resolve against [`LogConfig::dir`].
    pub path: PathBuf,
    /// The file is rotated once it holds more than this (`"64MiB"`, `"500KB"` or a number of
    /// bytes). Lines are never split: a file may exceed it by the last write.
    #[serde(default = "FileConfig::default_max_size")]
    pub max_size: ByteSize,
    /// Rotated files kept; older ones are deleted. `0` keeps none.
    #[serde(default = "FileConfig::default_max_backups")]
    pub max_backups: usize,
    /// Rotated files older than this are deleted (`"30d"`, `"12h"`); none when absent.
    #[serde(
        default = "FileConfig::default_max_age",
        with = "humantime_serde::option"
    )]
    pub max_age: Option<Duration>,
    /// Gzip rotated files (`.gz` suffix).
    #[serde(default = "FileConfig::default_compress")]
    pub compress: bool,
}

impl FileConfig {
    /// A file at `path` with the default rotation: 64 MiB, 10 backups, 30 days, compressed.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            max_size: Self::default_max_size(),
            max_backups: Self::default_max_backups(),
            max_age: Self::default_max_age(),
            compress: Self::default_compress(),
        }
    }

    fn default_max_size() -> ByteSize {
        ByteSize(64 * 1024 * 1024)
    }

    fn default_max_backups() -> usize {
        10
    }

    fn default_max_age() -> Option<Duration> {
        Some(Duration::from_secs(30 * 24 * 3600))
    }

    fn default_compress() -> bool {
        true
    }
}

/// A size in bytes, read from a number or a string with a unit: `B`, `KB`/`KiB`, `MB`/`MiB`,
/// `GB`/`GiB` (decimal and binary units; `K`, `M`, `G` alone are binary).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `"64MiB"`, `"10 MB"`, `"4096"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at_checked(split).unwrap_or((text, ""));
        let number: u64 = digits
            .parse()
            .map_err(|_| format!("`{text}` is not a size such as \"64MiB\""))?;
        let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "kb" => 1000,
            "k" | "kib" => 1024,
            "mb" => 1000 * 1000,
            "m" | "mib" => 1024 * 1024,
            "gb" => 1000 * 1000 * 1000,
            "g" | "gib" => 1024 * 1024 * 1024,
            other => return Err(format!("unknown size unit `{other}` in `{text}`")),
        };
        number
            .checked_mul(factor)
            .map(ByteSize)
            .ok_or_else(|| format!("`{text}` is too large"))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
        for (factor, unit) in UNITS {
            if self.0 >= factor && self.0.is_multiple_of(factor) {
                return write!(f, "{}{unit}", self.0 / factor);
            }
        }
        write!(f, "{}B", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"64MiB\" or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom("a size cannot be negative"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_and_without_units() {
        assert_eq!(ByteSize::parse("64MiB").unwrap(), ByteSize(64 << 20));
        assert_eq!(ByteSize::parse("10 MB").unwrap(), ByteSize(10_000_000));
        assert_eq!(ByteSize::parse("4096").unwrap(), ByteSize(4096));
        assert_eq!(ByteSize::parse("1k").unwrap(), ByteSize(1024));
        assert!(ByteSize::parse("MiB").is_err());
        assert!(ByteSize::parse("3 parsecs").is_err());
        assert_eq!(ByteSize(64 << 20).to_string(), "64MiB");
        assert_eq!(ByteSize(1500).to_string(), "1500B");
    }

    #[test]
    fn the_production_config_round_trips_through_toml() {
        let config = LogConfig::production();
        let text = toml::to_string(&config).unwrap();
        let back: LogConfig = toml::from_str(&text).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn a_documented_example_parses() {
        let text = r#"
            queue_capacity = 4096
            reserved_for_warnings = 512
            dir = "/var/log/keel"

            [[sinks]]
            name = "stdout"
            kind = "stdout"
            streams = ["app", "error"]
            format = "text"

            [[sinks]]
            name = "access-file"
            kind = "file"
            streams = ["access"]
            format = "json"
            file = { path = "access.log", max_size = "64MiB", max_backups = 5, max_age = "7d", compress = true }

            [filters.app]
            level = "info"
            directives = [{ target = "keel::store", level = "debug" }]

            [filters.access]
            level = "info"
            directives = [{ route_prefix = "/healthz", level = "off" }]
        "#;
        let config: LogConfig = toml::from_str(text).unwrap();
        assert_eq!(config.queue_capacity, 4096);
        let file = config.sinks[1].file.as_ref().unwrap();
        assert_eq!(file.max_size, ByteSize(64 << 20));
        assert_eq!(file.max_age, Some(Duration::from_secs(7 * 24 * 3600)));
        assert!(toml::from_str::<LogConfig>("queue_size = 3").is_err());
    }
}
