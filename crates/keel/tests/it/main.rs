//! keel's integration tests: the real `keel` binary, started as a separate process on a free
//! loopback port with its own data directory, driven over real HTTP.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    missing_docs
)]

mod admin;
mod agents;
mod audit;
mod bad_input;
mod chaos;
mod cli;
mod commands;
mod connections;
mod crash_matrix;
mod deliveries;
mod fleet;
mod harness;
mod http_errors;
mod isolation;
mod logging;
mod metrics;
mod notifications;
mod openapi;
mod operator_page;
mod overload;
mod panics;
mod postgres;
mod profiles;
mod queue_core;
mod schedules;
mod secrets;
mod shutdown;
mod supervision;
mod tenancy;
mod ui_session;
