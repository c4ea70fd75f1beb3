//! keel: hands commands to remote agents, delivers notifications, and does not fall over.
//!
//! The binary's parts, one module each:
//! - [`config`]: the typed configuration, merged from defaults, `keel.toml`, `KEEL_*`
//!   variables and flags, and validated.
//! - [`cli`]: the command line (`keel serve`, `keel config`, `keel migrate`, `keel store copy`,
//!   `keel --version`).
//! - [`http`]: the HTTP API: the request lifecycle layer (request id, panic catching, timeout,
//!   access records), the one JSON error shape, health, metrics and admin routes.
//! - [`telemetry`]: the Prometheus recorder.
//! - [`failpoints`]: the names of every fault-injection point.
//! - [`server`]: wires everything together, runs it and shuts it down on a signal.
//! - [`commands`]: commands beyond the store: long-poll wake-ups and the release-stuck job.
//! - [`cluster`]: several instances on one PostgreSQL database: the elected job runner, wake-ups
//!   across instances, the database probe behind readiness.
//! - [`deliveries`]: the delivery processor pool, its channels and jobs.
//! - [`notifications`]: classification, routing, rendering and signing of notifications.
//! - [`admin`]: `keel admin`, organisations and API keys from the command line.
//! - [`agent`]: `keel agent`, the ready agent that runs a program per command.
//!
//! The panic-safety runtime lives in `keel-guard`, the async logger in `keel-log`.

pub mod admin;
pub mod agent;
pub mod cli;
pub mod cluster;
pub mod commands;
pub mod config;
pub mod deliveries;
pub mod failpoints;
pub mod http;
pub mod notifications;
pub mod server;
pub mod telemetry;
