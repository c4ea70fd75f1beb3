//! Sending one delivery over its channel, and what came of it.
//!
//! - webhook: an HTTP POST of the body, signed as Standard Webhooks say; a 2xx within the
//!   channel's timeout is delivered, a status of `notifications.permanent_statuses` fails for
//!   good, anything else is retried (after `Retry-After` when the receiver sends one).
//!
//! - telegram: the Bot API's `sendMessage` at the sender's base URL; `ok: true` is delivered,
//!   a 429 waits the `retry_after` it names, a permanent status fails for good.
//! - email: SMTP with `lettre`, STARTTLS or plain per sender, a text and an HTML part; the
//!   server's acceptance is delivered, a permanent (5xx) refusal fails for good.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_store::Store;
use keel_store::notifications::model::{ChannelType, Delivery, SettingKind};
use serde::Deserialize;
use serde_json::{Value, json};

use super::address::{AddressPolicy, CheckedResolver};
use super::settings_cache::SettingsCache;
use crate::http::error::error_chain;
use crate::notifications::secrets::OpenSecrets;
use crate::notifications::secrets::SecretBox;
use crate::notifications::settings::{Channel, Sender};
use crate::notifications::trigger::DEFAULT_TIMEOUT;
use crate::notifications::webhook;

/// The most of a receiver's answer kept with an attempt, in bytes.
pub const RESPONSE_EXCERPT_LEN: usize = 1024;

/// How much of a Bot API answer is read: `sendMessage` echoes the message (at most 4096
/// characters) with the chat and the sender, well within this.
const TELEGRAM_ANSWER_LEN: usize = 64 * 1024;

/// The longest `Retry-After` honoured; a longer one waits this long.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// What one send came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Delivered; what the receiver answered.
    Delivered(Value),
    /// Not delivered.
    Failed {
        /// What went wrong (error, status, duration, response excerpt).
        detail: Value,
        /// Whether another attempt may succeed.
        retryable: bool,
        /// The receiver asked for this wait before the next attempt.
        retry_after: Option<Duration>,
    },
}

impl Outcome {
    /// A failure with only an error message.
    pub fn failed(error: impl Into<String>, retryable: bool) -> Self {
        Self::Failed {
            detail: json!({"error": error.into()}),
            retryable,
            retry_after: None,
        }
    }
}

/// Everything a send needs: the store (channels, senders), the secret box, the HTTP client.
pub struct Channels {
    store: Arc<dyn Store>,
    secrets: SecretBox,
    policy: Arc<AddressPolicy>,
    settings: SettingsCache,
    http: reqwest::Client,
    permanent: Vec<u16>,
}

impl Channels {
    /// The channels, with webhooks limited by `policy` and `permanent` statuses failing for
    /// good.
    pub fn new(
        store: Arc<dyn Store>,
        secrets: SecretBox,
        policy: AddressPolicy,
        permanent: Vec<u16>,
    ) -> Result<Self, reqwest::Error> {
        let policy = Arc::new(policy);
        let http = reqwest::Client::builder()
            // A redirect would lead to an address nobody checked for this channel.
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(Arc::new(CheckedResolver::new(policy.clone())))
            // A proxy would connect on keel's behalf to an address the resolver never saw.
            .no_proxy()
            .user_agent(concat!("keel/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Self {
            store,
            secrets,
            policy,
            settings: SettingsCache::default(),
            http,
            permanent,
        })
    }

    /// Sends `delivery` and says what came of it.
    pub async fn send(&self, delivery: &Delivery) -> Outcome {
        let digest;
        let delivery = if delivery.digest_of.is_some() {
            digest = match self.digest(delivery).await {
                Ok(digest) => digest,
                Err(outcome) => return outcome,
            };
            &digest
        } else {
            delivery
        };
        let channel = match self.channel(delivery).await {
            Ok(channel) => channel,
            Err(outcome) => return outcome,
        };
        match delivery.channel_type {
            ChannelType::Webhook => self.webhook(delivery, &channel).await,
            ChannelType::Telegram => self.telegram(delivery, &channel).await,
            ChannelType::Email => self.email(delivery, &channel).await,
        }
    }

    /// A digest with its message written: the deliveries throttled into it, each listed.
    async fn digest(&self, digest: &Delivery) -> Result<Delivery, Outcome> {
        let folded = self
            .store
            .notifications()
            .list_digested(digest.org_id, digest.id)
            .await
            .map_err(|e| Outcome::failed(format!("reading the digest: {e}"), true))?;
        let mut written = digest.clone();
        written.subject = format!("{} more {} events", folded.len(), digest.event_type);
        written.body = match digest.channel_type {
            ChannelType::Webhook => json!({
                "type": "digest",
                "event_type": digest.event_type,
                "severity": digest.severity.as_str(),
                "count": folded.len(),
                "events": folded
                    .iter()
                    .map(|d| json!({
                        "event_id": d.event_id,
                        "at": d.created_at.unix_timestamp(),
                        "subject": d.subject,
                        "body": serde_json::from_str::<Value>(&d.body)
                            .unwrap_or_else(|_| Value::String(d.body.clone())),
                    }))
                    .collect::<Vec<_>>(),
            })
            .to_string(),
            ChannelType::Email | ChannelType::Telegram => folded
                .iter()
                .map(|d| format!("- {}\n{}", d.subject, d.body))
                .collect::<Vec<_>>()
                .join("\n"),
        };
        Ok(written)
    }

    /// The delivery's channel, as it is now.
    async fn channel(&self, delivery: &Delivery) -> Result<Option<Channel>, Outcome> {
        let Some(id) = delivery.channel_id else {
            return Ok(None);
        };
        let setting = self
            .settings
            .get(
                self.store.as_ref(),
                delivery.org_id,
                SettingKind::Channel,
                id,
            )
            .await
            .map_err(|e| Outcome::failed(format!("reading the channel: {e}"), true))?;
        let Some(setting) = setting else {
            return Err(Outcome::failed("the channel was deleted", false));
        };
        Channel::deserialize(&setting.body)
            .map(Some)
            .map_err(|e| Outcome::failed(format!("the stored channel does not parse: {e}"), false))
    }

    /// The channel's sender and its secrets, opened (`None` without a sender).
    async fn sender(
        &self,
        delivery: &Delivery,
        channel: &Channel,
    ) -> Result<Option<(Sender, OpenSecrets)>, Outcome> {
        let Some(sender_id) = channel.sender_id else {
            return Ok(None);
        };
        let setting = self
            .settings
            .get(
                self.store.as_ref(),
                delivery.org_id,
                SettingKind::Sender,
                sender_id,
            )
            .await
            .map_err(|e| Outcome::failed(format!("reading the sender: {e}"), true))?
            .ok_or_else(|| Outcome::failed("the channel's sender was deleted", false))?;
        let sender = Sender::deserialize(&setting.body).map_err(|e| {
            Outcome::failed(format!("the stored sender does not parse: {e}"), false)
        })?;
        let secrets = match &setting.sealed_secret {
            Some(sealed) => self
                .secrets
                .open(delivery.org_id, sealed)
                .map_err(|e| Outcome::failed(e.to_string(), false))?,
            None => OpenSecrets::default(),
        };
        Ok(Some((sender, secrets)))
    }

    /// The signing keys of the channel's sender (none without a sender).
    async fn signing_keys(
        &self,
        delivery: &Delivery,
        channel: &Channel,
    ) -> Result<Vec<Vec<u8>>, Outcome> {
        let Some((_, secrets)) = self.sender(delivery, channel).await? else {
            return Ok(Vec::new());
        };
        secrets
            .signing_secrets
            .iter()
            .map(|secret| webhook::decode_secret(secret).map_err(|e| Outcome::failed(e, false)))
            .collect()
    }

    async fn webhook(&self, delivery: &Delivery, channel: &Option<Channel>) -> Outcome {
        fail::fail_point!("channels.webhook.send", |_| Outcome::failed(
            "injected by failpoint channels.webhook.send",
            true
        ));
        let url = match reqwest::Url::parse(&delivery.recipient) {
            Ok(url) => url,
            Err(e) => return Outcome::failed(format!("the URL does not parse: {e}"), false),
        };
        if let Err(refused) = self.policy.check_url(&url) {
            return Outcome::failed(refused.to_string(), false);
        }
        let keys = match channel {
            Some(channel) => match self.signing_keys(delivery, channel).await {
                Ok(keys) => keys,
                Err(outcome) => return outcome,
            },
            None => Vec::new(),
        };
        let timeout = channel.as_ref().map_or(DEFAULT_TIMEOUT, timeout_of);
        // The same id on every attempt, so the receiver can tell a retry from a new message.
        let id = format!("msg_{}", delivery.id.0.simple());
        let timestamp = time::OffsetDateTime::now_utc().unix_timestamp();
        let body = delivery.body.as_bytes();
        let mut request = self
            .http
            .post(url)
            .timeout(timeout)
            .header("content-type", "application/json")
            .header("webhook-id", &id)
            .header("webhook-timestamp", timestamp.to_string())
            .body(body.to_vec());
        if !keys.is_empty() {
            request = request.header(
                "webhook-signature",
                webhook::signature_header(&keys, &id, timestamp, body),
            );
        }
        let started = Instant::now();
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                let retryable = !error.is_builder();
                return Outcome::Failed {
                    detail: json!({
                        "error": error_chain(&error),
                        "duration_ms": millis(started.elapsed()),
                    }),
                    retryable,
                    retry_after: None,
                };
            }
        };
        let status = response.status();
        let retry_after = retry_after(response.headers());
        let excerpt = excerpt(response).await;
        let detail = json!({
            "status": status.as_u16(),
            "duration_ms": millis(started.elapsed()),
            "response": excerpt,
        });
        if status.is_success() {
            return Outcome::Delivered(detail);
        }
        let mut detail = detail;
        if let Some(object) = detail.as_object_mut() {
            object.insert(
                "error".to_owned(),
                json!(format!("HTTP {}", status.as_u16())),
            );
        }
        Outcome::Failed {
            detail,
            retryable: !self.permanent.contains(&status.as_u16()),
            retry_after,
        }
    }
}

/// A Bot API answer.
#[derive(Debug, serde::Deserialize)]
struct TelegramAnswer {
    ok: bool,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    parameters: Option<TelegramParameters>,
}

#[derive(Debug, serde::Deserialize)]
struct TelegramParameters {
    #[serde(default)]
    retry_after: Option<u64>,
}

/// The Bot API's address when the sender names none.
pub const TELEGRAM_API: &str = "https://api.telegram.org";

impl Channels {
    async fn telegram(&self, delivery: &Delivery, channel: &Option<Channel>) -> Outcome {
        fail::fail_point!("channels.telegram.send", |_| Outcome::failed(
            "injected by failpoint channels.telegram.send",
            true
        ));
        let Some(channel) = channel else {
            return Outcome::failed("a telegram delivery needs its channel", false);
        };
        let (sender, secrets) = match self.sender(delivery, channel).await {
            Ok(Some(found)) => found,
            Ok(None) => return Outcome::failed("the telegram channel has no sender", false),
            Err(outcome) => return outcome,
        };
        let Some(token) = secrets.bot_token else {
            return Outcome::failed("the telegram sender has no bot token", false);
        };
        let base = sender.base_url.as_deref().unwrap_or(TELEGRAM_API);
        let url = match reqwest::Url::parse(&format!(
            "{}/bot{token}/sendMessage",
            base.trim_end_matches('/')
        )) {
            Ok(url) => url,
            Err(_) => return Outcome::failed("the Bot API URL does not parse", false),
        };
        if let Err(refused) = self.policy.check_url(&url) {
            return Outcome::failed(refused.to_string(), false);
        }
        let text = if delivery.subject.is_empty() {
            delivery.body.clone()
        } else {
            format!("{}\n{}", delivery.subject, delivery.body)
        };
        let started = Instant::now();
        let sent = self
            .http
            .post(url)
            .timeout(timeout_of(channel))
            .json(&json!({"chat_id": delivery.recipient, "text": text}))
            .send()
            .await;
        let response = match sent {
            Ok(response) => response,
            // The URL holds the bot token: the error is kept without it.
            Err(error) => {
                return Outcome::Failed {
                    detail: json!({
                        "error": error_chain(&error.without_url()),
                        "duration_ms": millis(started.elapsed()),
                    }),
                    retryable: true,
                    retry_after: None,
                };
            }
        };
        let status = response.status().as_u16();
        let success = response.status().is_success();
        let header_wait = retry_after(response.headers());
        // The answer echoes the whole message: it is read up to a bound larger than any
        // message, to read `ok`, and only its beginning is kept.
        let answer_bytes = read_prefix(response, TELEGRAM_ANSWER_LEN).await;
        let answer: Option<TelegramAnswer> = serde_json::from_slice(&answer_bytes).ok();
        let mut detail = json!({
            "status": status,
            "duration_ms": millis(started.elapsed()),
            "response": text_excerpt(&answer_bytes),
        });
        // `ok: true`, or a 2xx answer too long to read whole (Telegram answers 200 only with
        // `ok: true`).
        if answer.as_ref().map_or(success, |a| a.ok) {
            return Outcome::Delivered(detail);
        }
        let description = answer
            .as_ref()
            .and_then(|a| a.description.clone())
            .unwrap_or_else(|| format!("HTTP {status}"));
        if let Some(object) = detail.as_object_mut() {
            object.insert("error".to_owned(), json!(description));
        }
        let retry_after = answer
            .as_ref()
            .and_then(|a| a.parameters.as_ref())
            .and_then(|p| p.retry_after)
            .map(|s| Duration::from_secs(s).min(MAX_RETRY_AFTER))
            .or(header_wait);
        Outcome::Failed {
            detail,
            retryable: status == 429 || !self.permanent.contains(&status),
            retry_after,
        }
    }

    async fn email(&self, delivery: &Delivery, channel: &Option<Channel>) -> Outcome {
        fail::fail_point!("channels.email.send", |_| Outcome::failed(
            "injected by failpoint channels.email.send",
            true
        ));
        let Some(channel) = channel else {
            return Outcome::failed("an email delivery needs its channel", false);
        };
        let (sender, secrets) = match self.sender(delivery, channel).await {
            Ok(Some(found)) => found,
            Ok(None) => return Outcome::failed("the email channel has no sender", false),
            Err(outcome) => return outcome,
        };
        super::email::send(
            delivery,
            &sender,
            secrets.password,
            &self.policy,
            timeout_of(channel),
        )
        .await
    }
}

fn timeout_of(channel: &Channel) -> Duration {
    channel
        .timeout_seconds
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs)
}

pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// `Retry-After` in seconds (an HTTP date is not read), at most [`MAX_RETRY_AFTER`].
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let seconds: u64 = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()?;
    Some(Duration::from_secs(seconds).min(MAX_RETRY_AFTER))
}

/// The first [`RESPONSE_EXCERPT_LEN`] bytes of the answer, as text; the rest is not read.
async fn excerpt(response: reqwest::Response) -> String {
    text_excerpt(&read_prefix(response, RESPONSE_EXCERPT_LEN).await)
}

/// The first `limit` bytes of the answer (all of it when shorter); the rest is not read.
async fn read_prefix(mut response: reqwest::Response, limit: usize) -> Vec<u8> {
    let mut bytes = Vec::new();
    while bytes.len() < limit {
        match response.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            _ => break,
        }
    }
    bytes.truncate(limit);
    bytes
}

/// The first [`RESPONSE_EXCERPT_LEN`] bytes, as text.
fn text_excerpt(bytes: &[u8]) -> String {
    let kept = bytes.get(..RESPONSE_EXCERPT_LEN).unwrap_or(bytes);
    String::from_utf8_lossy(kept).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_is_read_and_capped() {
        let mut headers = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&headers), None);
        headers.insert("retry-after", "3".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(3)));
        headers.insert("retry-after", "999999".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(MAX_RETRY_AFTER));
        headers.insert(
            "retry-after",
            "Wed, 21 Oct 2015 07:28:00 GMT".parse().unwrap(),
        );
        assert_eq!(retry_after(&headers), None);
    }
}
