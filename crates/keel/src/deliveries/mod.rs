//! Deliveries beyond the store: the processor pool that sends them, the channels, the address
//! policy of webhooks, and the periodic jobs.
//!
//! - [`processor`]: supervised workers that claim, send and record, each item isolated.
//! - [`channels`]: sending one delivery (webhook, Telegram, email) and what came of it;
//!   [`email`]: the SMTP part.
//! - [`address`]: which addresses a webhook may reach; [`breaker`]: a circuit breaker per
//!   webhook endpoint.
//! - [`settings_cache`]: the channels and senders sends read, kept for a second.
//! - [`jobs`]: release of expired leases, cleanup under retention.

pub mod address;
pub mod breaker;
pub mod channels;
pub mod email;
pub mod jobs;
pub mod processor;
pub mod settings_cache;
