//! Notifications beyond the store: what an event means and how it is written.
//!
//! - [`settings`]: the settings the API takes (rules, policies, channels, senders, templates,
//!   routes), validated.
//! - [`classify`]: an event type's domain and severity.
//! - [`render`]: templates in minijinja, strict about undefined variables.
//! - [`trigger`]: settings, classification, routing and rendering for one event: its
//!   deliveries.
//! - [`secrets`]: senders' credentials sealed at rest.
//! - [`webhook`]: Standard Webhooks signing.

pub mod classify;
pub mod render;
pub mod secrets;
pub mod settings;
pub mod trigger;
pub mod webhook;
