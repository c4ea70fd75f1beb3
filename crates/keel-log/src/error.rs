//! Errors of logger start-up.

use crate::filter::FilterError;

/// The logger could not start.
#[derive(Debug, thiserror::Error)]
pub enum LogInitError {
    /// A configuration value is wrong; `field` names it.
    #[error("log config `{field}`: {reason}")]
    Config {
        /// Path of the offending field (`sinks.app-file`, `queue_capacity`).
        field: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The filters are invalid.
    #[error(transparent)]
    Filter(#[from] FilterError),
    /// A sink could not be opened.
    #[error("log sink `{sink}` cannot be opened: {source}")]
    Sink {
        /// The sink's name.
        sink: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The writer thread could not be started.
    #[error("the log writer thread cannot be started: {0}")]
    Spawn(#[source] std::io::Error),
    /// Another global `tracing` subscriber (or `log` logger) is already installed.
    #[error("the global subscriber cannot be installed: {0}")]
    GlobalSubscriber(#[from] tracing_subscriber::util::TryInitError),
}
