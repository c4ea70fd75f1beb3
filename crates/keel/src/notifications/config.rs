//! The `[notifications]` table of the configuration.

use serde::{Deserialize, Serialize};

use crate::config::Secret;

/// Notifications: senders' secrets and the delivery workers.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NotificationsConfig {
    /// The key that seals senders' secrets at rest: 32 bytes, base64. When unset, keel creates
    /// one at first start and keeps it in `<data_dir>/notification-key` (readable by its owner
    /// only). Losing it loses the stored secrets.
    pub secret_key: Option<Secret>,
}
