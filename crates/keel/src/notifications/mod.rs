//! Notifications beyond the store: what an event means and how it is written.
//!
//! - [`config`]: the `[notifications]` table of the configuration.
//! - [`settings`]: the settings the API takes (rules, policies, channels, senders, templates,
//!   routes), validated.
//! - [`classify`]: an event type's domain and severity.
//! - [`render`]: templates in minijinja, strict about undefined variables.
//! - [`trigger`]: settings, classification, routing and rendering for one event: its
//!   deliveries.
//! - [`secrets`]: senders' credentials sealed at rest.
//! - [`webhook`]: Standard Webhooks signing.

pub mod classify;
pub mod config;
pub mod render;
pub mod secrets;
pub mod settings;
pub mod trigger;
pub mod webhook;

use std::sync::Arc;

/// What the HTTP handlers and the delivery workers share.
#[derive(Debug)]
pub struct NotificationState {
    /// Seals and opens senders' secrets.
    pub secrets: secrets::SecretBox,
    /// Wakes the delivery claimers (of every instance) when deliveries are queued.
    pub wakeups: crate::commands::wakeups::Wakeups,
    /// The webhook endpoints' circuits.
    pub breakers: Arc<crate::deliveries::breaker::Breakers>,
}

impl NotificationState {
    /// Deliveries were queued (created or requeued): the idle claimer looks for them now (one
    /// that is busy finds a stored wake-up when it next waits).
    pub fn wake_workers(&self) {
        self.wakeups.wake_deliveries();
    }
}
