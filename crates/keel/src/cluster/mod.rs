//! Several keel instances on one PostgreSQL database.
//!
//! - [`election`]: the periodic jobs that must run once (release-stuck, retention, the
//!   scheduler, delivery release and cleanup) run on one elected instance, which holds a
//!   PostgreSQL advisory lock; another takes over within seconds when it dies.
//! - [`wake_bus`]: a command or delivery that becomes claimable wakes the long polls and
//!   delivery workers waiting on every instance (`LISTEN`/`NOTIFY`).
//! - [`database`]: the database probe behind readiness: while the database cannot be reached
//!   the instance reports not ready, keeps serving health and metrics, and answers requests
//!   that need the database with 503 and `Retry-After`.
//!
//! Each instance has a boot id (a UUID drawn at start), shown by the `instance` component and
//! the `keel_instance_info` metric. On SQLite there is one instance: it is always elected and
//! its wake-ups stay in the process.

pub mod database;
pub mod election;
pub mod wake_bus;

use keel_guard::components::{Components, Probe};
use uuid::Uuid;

/// This keel process among the instances sharing its database.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Drawn at start: tells this run apart from every other instance and from its own
    /// earlier runs.
    pub boot_id: Uuid,
    /// `sqlite` or `postgres`.
    pub backend: &'static str,
    probe: Probe,
}

impl Instance {
    /// Registers the `instance` component and the `keel_instance_info` metric.
    pub fn register(components: &Components, backend: &'static str) -> Self {
        let boot_id = Uuid::new_v4();
        metrics::gauge!(
            "keel_instance_info",
            "boot_id" => boot_id.to_string(),
            "backend" => backend,
            "version" => env!("CARGO_PKG_VERSION"),
        )
        .set(1.0);
        let instance = Self {
            boot_id,
            backend,
            probe: components.probe("instance"),
        };
        instance.show_role(backend == "sqlite");
        instance
    }

    /// Shows whether this instance runs the elected jobs (the `instance` component's detail,
    /// the `keel_instance_elected` gauge).
    pub fn show_role(&self, elected: bool) {
        let role = if elected {
            "runs the elected jobs"
        } else {
            "standby for the elected jobs"
        };
        self.probe
            .set_detail(format!("boot {}, {}, {role}", self.boot_id, self.backend));
        metrics::gauge!("keel_instance_elected").set(if elected { 1.0 } else { 0.0 });
    }
}
