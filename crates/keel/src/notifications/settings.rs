//! The notification settings as the API takes them, validated, and as the store keeps them
//! (a JSON document per setting; a sender's credentials sealed apart, see [`super::secrets`]).

use keel_store::notifications::model::{ChannelType, SettingId, SettingKind, Severity};
use serde::{Deserialize, Serialize};

/// The longest name, pattern, keyword or subject line.
pub const MAX_TEXT_LEN: usize = 256;

/// The longest template body, in bytes.
pub const MAX_TEMPLATE_LEN: usize = 64 * 1024;

/// The most keywords, severities, channel types, recipients or secrets one setting lists.
pub const MAX_LIST_LEN: usize = 100;

/// The most attempts a policy may give.
pub const MAX_ATTEMPTS: u32 = 100;

/// The longest throttle window, in seconds (a day).
pub const MAX_THROTTLE_SECONDS: u64 = 86_400;

/// The longest channel timeout, in seconds.
pub const MAX_TIMEOUT_SECONDS: u64 = 300;

/// A classification rule: an event whose type matches `pattern` (`*` matches any run of
/// characters) gets `domain` when it is given, and `severity` when it is given and the type
/// contains one of `keywords` (any, when none is listed). An organisation's rules are tried
/// oldest first, before the built-in ones; the first that gives a domain and the first that
/// gives a severity win.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// A label.
    pub name: String,
    /// Event types it applies to, `*` matching any run of characters (`order_*`).
    #[serde(default = "any_pattern")]
    pub pattern: String,
    /// The domain it gives.
    #[serde(default)]
    pub domain: Option<String>,
    /// Words of the event type that give `severity`.
    #[serde(default)]
    pub keywords: Vec<String>,
    /// The severity it gives.
    #[serde(default)]
    pub severity: Option<Severity>,
}

fn any_pattern() -> String {
    "*".to_owned()
}

/// What a severity means for its deliveries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    /// The severity it is for (one policy per severity).
    pub severity: Severity,
    /// Higher is delivered first.
    #[schema(minimum = -1000, maximum = 1000)]
    pub priority: i32,
    /// Attempts before a delivery is dead.
    #[schema(minimum = 1, maximum = 100)]
    pub max_attempts: u32,
    /// A second event of the same type to the same recipient within this window is folded
    /// into a digest (0: no throttle).
    #[serde(default)]
    #[schema(minimum = 0, maximum = 86400)]
    pub throttle_seconds: u64,
}

impl Policy {
    /// The policy of a severity without one configured.
    pub fn default_for(severity: Severity) -> Self {
        let (priority, max_attempts) = match severity {
            Severity::Critical => (100, 8),
            Severity::High => (50, 6),
            Severity::Medium => (10, 5),
            Severity::Low => (0, 4),
            Severity::Info => (0, 3),
        };
        Self {
            severity,
            priority,
            max_attempts,
            throttle_seconds: 0,
        }
    }
}

/// Where messages go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Channel {
    /// A label.
    pub name: String,
    /// How it delivers.
    #[serde(rename = "type")]
    pub channel_type: ChannelType,
    /// The sender whose credentials it uses (its type must match).
    #[serde(default)]
    pub sender_id: Option<SettingId>,
    /// Webhook: the endpoint (http or https).
    #[serde(default)]
    pub url: Option<String>,
    /// Email: the addresses.
    #[serde(default)]
    pub recipients: Vec<String>,
    /// Telegram: the chat ids.
    #[serde(default)]
    pub chat_ids: Vec<String>,
    /// How long one send may take, in seconds (default 10).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 300)]
    pub timeout_seconds: Option<u64>,
}

impl Channel {
    /// Who each message of this channel goes to: its URL, its addresses or its chats.
    pub fn recipients(&self) -> Vec<String> {
        match self.channel_type {
            ChannelType::Webhook => self.url.iter().cloned().collect(),
            ChannelType::Email => self.recipients.clone(),
            ChannelType::Telegram => self.chat_ids.clone(),
        }
    }
}

/// TLS on an SMTP connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// Upgrade with STARTTLS (required).
    Starttls,
    /// No TLS.
    Plain,
}

/// Credentials to send with. What is secret (`signing_secrets`, `password`, `bot_token`) is
/// sealed at rest and never shown again.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Sender {
    /// A label.
    pub name: String,
    /// The channel type it serves.
    #[serde(rename = "type")]
    pub channel_type: ChannelType,
    /// Email: the SMTP server's host.
    #[serde(default)]
    pub host: Option<String>,
    /// Email: the SMTP server's port (default 587).
    #[serde(default)]
    pub port: Option<u16>,
    /// Email: STARTTLS or plain.
    #[serde(default)]
    pub tls: Option<SmtpTls>,
    /// Email: the user name, if the server asks for one.
    #[serde(default)]
    pub username: Option<String>,
    /// Email: the From address.
    #[serde(default)]
    pub from: Option<String>,
    /// Telegram: the Bot API's base URL (default `https://api.telegram.org`).
    #[serde(default)]
    pub base_url: Option<String>,
    /// The secrets, write-only: sealed at rest, never in an answer. On update, absent secrets
    /// keep the stored ones; given ones replace them all.
    #[serde(default, skip_serializing)]
    pub secrets: SenderSecrets,
}

/// A sender's secrets, as given on create or update; sealed, never returned.
#[derive(Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SenderSecrets {
    /// Webhook: `whsec_` secrets; every one signs (several during a rotation).
    #[serde(default)]
    #[schema(value_type = Vec<String>)]
    pub signing_secrets: Vec<keel_store::SecretString>,
    /// Email: the SMTP password.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub password: Option<keel_store::SecretString>,
    /// Telegram: the bot token.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub bot_token: Option<keel_store::SecretString>,
}

impl std::fmt::Debug for SenderSecrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SenderSecrets([REDACTED])")
    }
}

/// How an event type is written for a channel type (minijinja; an undefined variable is an
/// error). The context: `event_type`, `event_id`, `domain`, `severity`, `payload`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Template {
    /// The event type it writes.
    pub event_type: String,
    /// The channel type it writes for.
    pub channel_type: ChannelType,
    /// The subject (email) or title line.
    #[serde(default)]
    pub subject: String,
    /// The body (a webhook sends it as its JSON payload when it is JSON).
    pub body: String,
}

/// Which events go to which channels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Route {
    /// A label.
    pub name: String,
    /// Only this event type (any when absent).
    #[serde(default)]
    pub event_type: Option<String>,
    /// Only this domain (any when absent).
    #[serde(default)]
    pub domain: Option<String>,
    /// Only these severities (any when empty).
    #[serde(default)]
    pub severities: Vec<Severity>,
    /// The organisation's channels of these types (every type when empty).
    #[serde(default)]
    pub channel_types: Vec<ChannelType>,
    /// Only these channels (every channel of `channel_types` when empty).
    #[serde(default)]
    pub channel_ids: Vec<SettingId>,
    /// An inactive route matches nothing.
    #[serde(default = "active")]
    pub active: bool,
}

fn active() -> bool {
    true
}

/// Why a setting is not valid: the field and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Invalid(pub String);

fn invalid<T>(message: impl Into<String>) -> Result<T, Invalid> {
    Err(Invalid(message.into()))
}

fn check_text(field: &str, value: &str) -> Result<(), Invalid> {
    if value.trim().is_empty() || value.len() > MAX_TEXT_LEN || value.chars().any(char::is_control)
    {
        return invalid(format!(
            "{field}: 1 to {MAX_TEXT_LEN} bytes of printable characters"
        ));
    }
    Ok(())
}

fn check_list<T>(field: &str, list: &[T]) -> Result<(), Invalid> {
    if list.len() > MAX_LIST_LEN {
        return invalid(format!("{field}: at most {MAX_LIST_LEN} entries"));
    }
    Ok(())
}

/// A URL keel may call: http or https with a host. (Where it points is checked when it is
/// called, see [`super::address`].)
pub fn check_url(field: &str, url: &str) -> Result<reqwest::Url, Invalid> {
    let parsed = reqwest::Url::parse(url).or_else(|e| invalid(format!("{field}: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return invalid(format!("{field}: an http or https URL with a host"));
    }
    Ok(parsed)
}

/// An event type: the store's name rule (1 to 64 of `a-z A-Z 0-9 _ . : -`).
pub fn check_event_type(field: &str, value: &str) -> Result<(), Invalid> {
    keel_store::check_queue_name(value).or_else(|rule| invalid(format!("{field}: {rule}")))
}

impl Rule {
    /// Checks the rule.
    pub fn validate(&self) -> Result<(), Invalid> {
        check_text("name", &self.name)?;
        check_text("pattern", &self.pattern)?;
        if let Some(domain) = &self.domain {
            check_text("domain", domain)?;
        }
        check_list("keywords", &self.keywords)?;
        for keyword in &self.keywords {
            check_text("keywords", keyword)?;
        }
        if self.domain.is_none() && self.severity.is_none() {
            return invalid("a rule gives a `domain`, a `severity` or both");
        }
        Ok(())
    }
}

impl Policy {
    /// Checks the policy.
    pub fn validate(&self) -> Result<(), Invalid> {
        if !(-1000..=1000).contains(&self.priority) {
            return invalid("priority: between -1000 and 1000");
        }
        if !(1..=MAX_ATTEMPTS).contains(&self.max_attempts) {
            return invalid(format!("max_attempts: between 1 and {MAX_ATTEMPTS}"));
        }
        if self.throttle_seconds > MAX_THROTTLE_SECONDS {
            return invalid(format!(
                "throttle_seconds: between 0 and {MAX_THROTTLE_SECONDS}"
            ));
        }
        Ok(())
    }
}

impl Channel {
    /// Checks the channel: the fields of its type, and none of another type.
    pub fn validate(&self) -> Result<(), Invalid> {
        check_text("name", &self.name)?;
        check_list("recipients", &self.recipients)?;
        check_list("chat_ids", &self.chat_ids)?;
        if let Some(timeout) = self.timeout_seconds
            && !(1..=MAX_TIMEOUT_SECONDS).contains(&timeout)
        {
            return invalid(format!(
                "timeout_seconds: between 1 and {MAX_TIMEOUT_SECONDS}"
            ));
        }
        match self.channel_type {
            ChannelType::Webhook => {
                let Some(url) = &self.url else {
                    return invalid("url: a webhook channel needs one");
                };
                check_url("url", url)?;
                if !self.recipients.is_empty() || !self.chat_ids.is_empty() {
                    return invalid("a webhook channel has a `url` only");
                }
            }
            ChannelType::Email => {
                if self.recipients.is_empty() || self.url.is_some() || !self.chat_ids.is_empty() {
                    return invalid("recipients: an email channel needs them (and only them)");
                }
                for address in &self.recipients {
                    check_email("recipients", address)?;
                }
            }
            ChannelType::Telegram => {
                if self.chat_ids.is_empty() || self.url.is_some() || !self.recipients.is_empty() {
                    return invalid("chat_ids: a telegram channel needs them (and only them)");
                }
                for chat in &self.chat_ids {
                    check_text("chat_ids", chat)?;
                }
            }
        }
        Ok(())
    }
}

/// An address `name@domain` (lettre checks it fully when the message is built).
pub fn check_email(field: &str, address: &str) -> Result<(), Invalid> {
    check_text(field, address)?;
    match address.split_once('@') {
        Some((local, domain))
            if !local.is_empty()
                && !domain.is_empty()
                && !address.contains(char::is_whitespace) =>
        {
            Ok(())
        }
        _ => invalid(format!("{field}: `{address}` is not an email address")),
    }
}

impl Sender {
    /// Checks the sender and its secrets against its type.
    pub fn validate(&self, creating: bool) -> Result<(), Invalid> {
        use keel_store::ExposeSecret;
        let secrets = &self.secrets;
        check_text("name", &self.name)?;
        check_list("signing_secrets", &secrets.signing_secrets)?;
        let email_fields = self.host.is_some()
            || self.port.is_some()
            || self.tls.is_some()
            || self.username.is_some()
            || self.from.is_some()
            || secrets.password.is_some();
        match self.channel_type {
            ChannelType::Webhook => {
                if email_fields || self.base_url.is_some() || secrets.bot_token.is_some() {
                    return invalid("a webhook sender has `signing_secrets` only");
                }
                if creating && secrets.signing_secrets.is_empty() {
                    return invalid("signing_secrets: a webhook sender needs one");
                }
                for secret in &secrets.signing_secrets {
                    super::webhook::decode_secret(secret.expose_secret())
                        .map_err(|e| Invalid(format!("signing_secrets: {e}")))?;
                }
            }
            ChannelType::Email => {
                if self.base_url.is_some()
                    || secrets.bot_token.is_some()
                    || !secrets.signing_secrets.is_empty()
                {
                    return invalid("an email sender has SMTP fields only");
                }
                let Some(host) = &self.host else {
                    return invalid("host: an email sender needs the SMTP server");
                };
                check_text("host", host)?;
                let Some(from) = &self.from else {
                    return invalid("from: an email sender needs a From address");
                };
                check_email("from", from)?;
            }
            ChannelType::Telegram => {
                if email_fields || !secrets.signing_secrets.is_empty() {
                    return invalid("a telegram sender has `base_url` and `bot_token` only");
                }
                if let Some(base) = &self.base_url {
                    check_url("base_url", base)?;
                }
                if creating && secrets.bot_token.is_none() {
                    return invalid("bot_token: a telegram sender needs one");
                }
            }
        }
        Ok(())
    }
}

impl Template {
    /// Checks the template's fields and that both parts parse.
    pub fn validate(&self) -> Result<(), Invalid> {
        check_event_type("event_type", &self.event_type)?;
        if self.subject.len() > MAX_TEXT_LEN * 4 {
            return invalid(format!("subject: at most {} bytes", MAX_TEXT_LEN * 4));
        }
        if self.body.is_empty() || self.body.len() > MAX_TEMPLATE_LEN {
            return invalid(format!("body: 1 to {MAX_TEMPLATE_LEN} bytes"));
        }
        super::render::check_syntax(&self.subject).map_err(|e| Invalid(format!("subject: {e}")))?;
        super::render::check_syntax(&self.body).map_err(|e| Invalid(format!("body: {e}")))?;
        Ok(())
    }

    /// Its key: one template per event type and channel type.
    pub fn unique_key(&self) -> String {
        format!("{}/{}", self.event_type, self.channel_type)
    }
}

impl Route {
    /// Checks the route.
    pub fn validate(&self) -> Result<(), Invalid> {
        check_text("name", &self.name)?;
        if let Some(event_type) = &self.event_type {
            check_event_type("event_type", event_type)?;
        }
        if let Some(domain) = &self.domain {
            check_text("domain", domain)?;
        }
        check_list("severities", &self.severities)?;
        check_list("channel_types", &self.channel_types)?;
        check_list("channel_ids", &self.channel_ids)?;
        Ok(())
    }
}

/// The path segment of each kind, as the API names it.
pub fn kind_path(kind: SettingKind) -> &'static str {
    match kind {
        SettingKind::Rule => "rules",
        SettingKind::Policy => "policies",
        SettingKind::Channel => "channels",
        SettingKind::Sender => "senders",
        SettingKind::Template => "templates",
        SettingKind::Route => "routes",
    }
}

/// The kind a path segment names.
pub fn kind_of_path(segment: &str) -> Option<SettingKind> {
    SettingKind::ALL
        .iter()
        .copied()
        .find(|kind| kind_path(*kind) == segment)
}
