//! Streams, levels and the routing of an event to its stream.

use serde::{Deserialize, Serialize};

/// A log stream: a family of records with its own filters and usually its own file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Stream {
    /// Everything that is not audit, access or a panic.
    App,
    /// Events with a target under `keel::audit`.
    Audit,
    /// Events with a target under `keel::access` (one per HTTP request).
    Access,
    /// Panic records, plus a copy of every ERROR record of the `app` stream.
    Error,
}

impl Stream {
    /// Every stream, in a fixed order.
    pub const ALL: [Stream; 4] = [Stream::App, Stream::Audit, Stream::Access, Stream::Error];

    /// The stream's name as written in records and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Stream::App => "app",
            Stream::Audit => "audit",
            Stream::Access => "access",
            Stream::Error => "error",
        }
    }

    pub(crate) fn index(self) -> usize {
        match self {
            Stream::App => 0,
            Stream::Audit => 1,
            Stream::Access => 2,
            Stream::Error => 3,
        }
    }

    /// The stream of an event with `target`: `keel::audit…` → audit, `keel::access…` → access,
    /// anything else → app.
    pub fn of_target(target: &str) -> Stream {
        if target_has_prefix(target, AUDIT_TARGET) {
            Stream::Audit
        } else if target_has_prefix(target, ACCESS_TARGET) {
            Stream::Access
        } else {
            Stream::App
        }
    }
}

/// Target prefix of the audit stream.
pub const AUDIT_TARGET: &str = "keel::audit";
/// Target prefix of the access stream.
pub const ACCESS_TARGET: &str = "keel::access";
/// Target of panic records.
pub const PANIC_TARGET: &str = "keel::panic";

/// True when `target` is `prefix` or a module below it (`keel::store` matches
/// `keel::store::sqlite`, not `keel::storefront`).
pub(crate) fn target_has_prefix(target: &str, prefix: &str) -> bool {
    target
        .strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
}

/// A set of streams, as a bit mask.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct StreamSet(u8);

impl StreamSet {
    pub(crate) fn insert(&mut self, stream: Stream) {
        self.0 |= 1 << stream.index();
    }

    pub(crate) fn contains(self, stream: Stream) -> bool {
        self.0 & (1 << stream.index()) != 0
    }

    pub(crate) fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub(crate) fn of(streams: &[Stream]) -> Self {
        let mut set = Self::default();
        for stream in streams {
            set.insert(*stream);
        }
        set
    }

    pub(crate) fn intersects(self, other: StreamSet) -> bool {
        self.0 & other.0 != 0
    }
}

/// The level of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    /// `TRACE`
    Trace,
    /// `DEBUG`
    Debug,
    /// `INFO`
    Info,
    /// `WARN`
    Warn,
    /// `ERROR`
    Error,
}

impl Level {
    /// Every level, least severe first.
    pub const ALL: [Level; 5] = [
        Level::Trace,
        Level::Debug,
        Level::Info,
        Level::Warn,
        Level::Error,
    ];

    /// The lower-case name, as used in metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Trace => "trace",
            Level::Debug => "debug",
            Level::Info => "info",
            Level::Warn => "warn",
            Level::Error => "error",
        }
    }

    /// The upper-case name, as written in records.
    pub fn as_upper(self) -> &'static str {
        match self {
            Level::Trace => "TRACE",
            Level::Debug => "DEBUG",
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Error => "ERROR",
        }
    }

    /// 0 for trace up to 4 for error.
    pub(crate) fn rank(self) -> u8 {
        match self {
            Level::Trace => 0,
            Level::Debug => 1,
            Level::Info => 2,
            Level::Warn => 3,
            Level::Error => 4,
        }
    }

    /// Warnings and errors use the reserved part of the queue and are never dropped.
    pub(crate) fn is_reserved(self) -> bool {
        self >= Level::Warn
    }
}

/// True for a record that uses the reserved part of the queue and is never dropped: a warning
/// or an error of any stream, or any record of the `audit` stream (who changed what must not
/// be lost to a burst of chatter).
pub(crate) fn uses_reserve(stream: Stream, level: Level) -> bool {
    level.is_reserved() || stream == Stream::Audit
}

impl From<&tracing::Level> for Level {
    fn from(level: &tracing::Level) -> Self {
        match *level {
            tracing::Level::TRACE => Level::Trace,
            tracing::Level::DEBUG => Level::Debug,
            tracing::Level::INFO => Level::Info,
            tracing::Level::WARN => Level::Warn,
            tracing::Level::ERROR => Level::Error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_route_to_streams_by_module_prefix() {
        assert_eq!(Stream::of_target("keel::audit"), Stream::Audit);
        assert_eq!(Stream::of_target("keel::audit::keys"), Stream::Audit);
        assert_eq!(Stream::of_target("keel::access"), Stream::Access);
        assert_eq!(Stream::of_target("keel::auditor"), Stream::App);
        assert_eq!(Stream::of_target("hyper::proto"), Stream::App);
    }
}
