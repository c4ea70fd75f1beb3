//! The `[notifications]` table of the configuration.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Secret;

/// Notifications: senders' secrets, the delivery workers, where webhooks may go, retention.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationsConfig {
    /// The key that seals senders' secrets at rest: 32 bytes, base64. When unset, keel creates
    /// one at first start and keeps it in `<data_dir>/notification-key` (readable by its owner
    /// only). Losing it loses the stored secrets.
    pub secret_key: Option<Secret>,
    /// Delivery workers: how many deliveries are sent at once.
    pub workers: usize,
    /// Networks (`10.0.0.0/8`) or addresses (`127.0.0.1`) webhooks and SMTP servers may reach
    /// although they are not public. Loopback, private, link-local (cloud metadata) and other non-public
    /// addresses are refused otherwise.
    pub allowed_networks: Vec<String>,
    /// HTTP statuses after which a webhook delivery is not retried: it fails at once.
    pub permanent_statuses: Vec<u16>,
    /// Retryable failures in a row after which a webhook endpoint's circuit opens: its
    /// deliveries wait, without spending attempts, until a probe succeeds.
    pub breaker_failures: u32,
    /// How long an open circuit waits before it lets a probe through.
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
    /// How often deliveries whose worker's lease expired (a killed keel) are put back.
    #[serde(with = "humantime_serde")]
    pub release_interval: Duration,
    /// Finished deliveries (delivered, failed, dead) older than this are deleted, with their
    /// attempts, and events left without deliveries with them.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often the cleanup job runs.
    #[serde(with = "humantime_serde")]
    pub cleanup_interval: Duration,
}

impl Default for NotificationsConfig {
    fn default() -> Self {
        Self {
            secret_key: None,
            workers: 8,
            allowed_networks: Vec::new(),
            permanent_statuses: vec![400, 401, 403, 404, 405, 410, 413, 415, 422],
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(30),
            release_interval: Duration::from_secs(30),
            retention: Duration::from_secs(7 * 24 * 3600),
            cleanup_interval: Duration::from_secs(600),
        }
    }
}

impl NotificationsConfig {
    /// Checks the values serde cannot: `(key, problem)`.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1..=256).contains(&self.workers) {
            return Err((
                "notifications.workers",
                "must be between 1 and 256".to_owned(),
            ));
        }
        if let Err(bad) = crate::deliveries::address::AddressPolicy::new(&self.allowed_networks) {
            return Err((
                "notifications.allowed_networks",
                format!("`{bad}` is not an address or a network"),
            ));
        }
        if self
            .permanent_statuses
            .iter()
            .any(|s| !(400..=599).contains(s))
        {
            return Err((
                "notifications.permanent_statuses",
                "statuses must be between 400 and 599".to_owned(),
            ));
        }
        if !(1..=1000).contains(&self.breaker_failures) {
            return Err((
                "notifications.breaker_failures",
                "must be between 1 and 1000".to_owned(),
            ));
        }
        for (key, interval) in [
            ("notifications.breaker_cooldown", self.breaker_cooldown),
            ("notifications.release_interval", self.release_interval),
            ("notifications.cleanup_interval", self.cleanup_interval),
            // Finished deliveries must stay long enough to be read back.
            ("notifications.retention", self.retention),
        ] {
            if interval.is_zero() {
                return Err((key, "must be longer than 0s".to_owned()));
            }
        }
        if let Some(key) = &self.secret_key
            && crate::notifications::secrets::SecretBox::from_base64(
                &keel_store::SecretString::from(key.expose_secret()),
            )
            .is_err()
        {
            return Err((
                "notifications.secret_key",
                "must be 32 bytes, base64-encoded".to_owned(),
            ));
        }
        Ok(())
    }
}
