//! Deliveries beyond the store: the processor pool that sends them, the channels, the address
//! policy of webhooks, and the periodic jobs.
//!
//! - [`processor`]: supervised workers that claim, send and record, each item isolated.
//! - [`channels`]: sending one delivery (webhook) and what came of it.
//! - [`address`]: which addresses a webhook may reach.
//! - [`jobs`]: release of expired leases, cleanup under retention.

pub mod address;
pub mod channels;
pub mod jobs;
pub mod processor;
