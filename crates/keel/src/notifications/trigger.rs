//! A trigger, before the store: the organisation's settings, classification, routing and
//! rendering, giving the event and every delivery it makes, which the store then records in
//! one transaction.

use std::time::Duration;

use keel_store::notifications::model::{
    EventId, NewDelivery, NewEvent, Setting, SettingId, SettingKind, Severity,
};
use keel_store::notifications::{MAX_DELIVERIES_PER_EVENT, NotificationStore};
use keel_store::{Idempotency, OrgId, StoreError};
use serde::de::DeserializeOwned;
use serde_json::Value;

use super::classify::{Classification, classify};
use super::render::{RenderError, context, default_template, render};
use super::settings::{Channel, Policy, Route, Rule, Template};

/// How long a worker's claim on a delivery holds beyond its channel's timeout: room to record
/// the outcome after the send.
const LEASE_MARGIN: Duration = Duration::from_secs(30);

/// A channel's send timeout when it sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// An organisation's notification settings, read for one trigger.
#[derive(Debug, Default)]
pub struct Settings {
    /// Classification rules, oldest first.
    pub rules: Vec<Rule>,
    /// Policies by severity.
    pub policies: Vec<Policy>,
    /// Channels with their ids.
    pub channels: Vec<(SettingId, Channel)>,
    /// Templates.
    pub templates: Vec<Template>,
    /// Routing rules.
    pub routes: Vec<Route>,
}

/// The settings of one kind, parsed; a stored one that no longer parses is logged and left
/// out (it was validated when it was written).
fn parse_all<T: DeserializeOwned>(settings: Vec<Setting>) -> Vec<(SettingId, T)> {
    settings
        .into_iter()
        .filter_map(|setting| match serde_json::from_value(setting.body) {
            Ok(parsed) => Some((setting.id, parsed)),
            Err(error) => {
                tracing::error!(setting_id = %setting.id, kind = %setting.kind, %error, "a stored notification setting does not parse; it is ignored");
                None
            }
        })
        .collect()
}

fn without_ids<T>(settings: Vec<(SettingId, T)>) -> Vec<T> {
    settings.into_iter().map(|(_, s)| s).collect()
}

impl Settings {
    /// Reads the organisation's settings.
    pub async fn load(store: &dyn NotificationStore, org: OrgId) -> Result<Self, StoreError> {
        Ok(Self {
            rules: without_ids(parse_all(
                store.list_settings(org, SettingKind::Rule).await?,
            )),
            policies: without_ids(parse_all(
                store.list_settings(org, SettingKind::Policy).await?,
            )),
            channels: parse_all(store.list_settings(org, SettingKind::Channel).await?),
            templates: without_ids(parse_all(
                store.list_settings(org, SettingKind::Template).await?,
            )),
            routes: without_ids(parse_all(
                store.list_settings(org, SettingKind::Route).await?,
            )),
        })
    }

    /// The policy of `severity`: the organisation's, or the built-in one.
    pub fn policy(&self, severity: Severity) -> Policy {
        self.policies
            .iter()
            .find(|p| p.severity == severity)
            .cloned()
            .unwrap_or_else(|| Policy::default_for(severity))
    }

    /// The channels the active routes choose for the event, each once, oldest first.
    pub fn route(&self, event_type: &str, class: &Classification) -> Vec<&(SettingId, Channel)> {
        let chosen = |(id, channel): &(SettingId, Channel)| {
            self.routes.iter().any(|route| {
                route.active
                    && route.event_type.as_deref().is_none_or(|t| t == event_type)
                    && route.domain.as_deref().is_none_or(|d| d == class.domain)
                    && (route.severities.is_empty() || route.severities.contains(&class.severity))
                    && (route.channel_types.is_empty()
                        || route.channel_types.contains(&channel.channel_type))
                    && (route.channel_ids.is_empty() || route.channel_ids.contains(id))
            })
        };
        self.channels.iter().filter(|c| chosen(c)).collect()
    }

    /// The template for the event type on a channel type: the organisation's, or the default.
    pub fn template(&self, event_type: &str, channel: &Channel) -> Template {
        self.templates
            .iter()
            .find(|t| t.event_type == event_type && t.channel_type == channel.channel_type)
            .cloned()
            .unwrap_or_else(|| default_template(channel.channel_type))
    }
}

/// What a trigger asks for.
#[derive(Debug, Clone)]
pub struct Trigger {
    /// The event type.
    pub event_type: String,
    /// Its data.
    pub payload: Value,
    /// The idempotency key and request hash.
    pub idempotency: Option<Idempotency>,
}

/// Why an event gives no deliveries.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// A template does not render.
    #[error(transparent)]
    Render(#[from] RenderError),
    /// The routes reach more recipients than one event may have.
    #[error(
        "the event's routes reach {0} recipients; one event gives at most {MAX_DELIVERIES_PER_EVENT} deliveries"
    )]
    TooManyDeliveries(usize),
    /// The rendered messages, one per recipient, would take more than one event may.
    #[error(
        "the event's rendered messages come to more than {} MiB in all (recipients times rendered size)",
        MAX_EVENT_BYTES / (1024 * 1024)
    )]
    TooLarge,
}

/// The most bytes of subjects and bodies one event's deliveries may hold together.
pub const MAX_EVENT_BYTES: usize = 16 * 1024 * 1024;

/// Classifies, routes and renders: the event and its deliveries, or why there are none (the
/// first template that does not render, or too many deliveries, counted before any render).
pub fn plan(
    settings: &Settings,
    trigger: Trigger,
) -> Result<(NewEvent, Vec<NewDelivery>), PlanError> {
    let class = classify(&trigger.event_type, &settings.rules);
    let event = NewEvent {
        id: EventId::new(),
        event_type: trigger.event_type,
        payload: trigger.payload,
        domain: class.domain.clone(),
        severity: class.severity,
        idempotency: trigger.idempotency,
    };
    let policy = settings.policy(class.severity);
    let channels = settings.route(&event.event_type, &class);
    let reached: usize = channels
        .iter()
        .map(|(_, channel)| channel.recipients().len())
        .sum();
    if reached > MAX_DELIVERIES_PER_EVENT {
        return Err(PlanError::TooManyDeliveries(reached));
    }
    let mut deliveries = Vec::with_capacity(reached);
    let mut bytes = 0usize;
    if !channels.is_empty() {
        let vars = context(&event);
        for (id, channel) in channels {
            let rendered = render(&settings.template(&event.event_type, channel), &vars)?;
            let recipients = channel.recipients();
            bytes = bytes.saturating_add(
                (rendered.subject.len() + rendered.body.len()).saturating_mul(recipients.len()),
            );
            if bytes > MAX_EVENT_BYTES {
                return Err(PlanError::TooLarge);
            }
            for recipient in recipients {
                deliveries.push(NewDelivery {
                    channel_id: Some(*id),
                    channel_type: channel.channel_type,
                    recipient,
                    subject: rendered.subject.clone(),
                    body: rendered.body.clone(),
                    priority: policy.priority,
                    max_attempts: policy.max_attempts,
                    lease_duration: lease_for(channel),
                    throttle: throttle_of(&policy),
                });
            }
        }
    }
    Ok((event, deliveries))
}

/// The policy's throttle window, if it has one.
pub fn throttle_of(policy: &Policy) -> Option<Duration> {
    (policy.throttle_seconds > 0).then(|| Duration::from_secs(policy.throttle_seconds))
}

/// A delivery's lease: its channel's timeout and a margin.
pub fn lease_for(channel: &Channel) -> Duration {
    channel
        .timeout_seconds
        .map_or(DEFAULT_TIMEOUT, Duration::from_secs)
        + LEASE_MARGIN
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use serde_json::json;

    use super::*;

    /// Settings with `channels` email channels of `recipients` addresses each, all routed, and
    /// an email template whose body is `body`.
    fn settings(channels: usize, recipients: usize, body: &str) -> Settings {
        let channel = |n: usize| {
            let addresses: Vec<String> = (0..recipients)
                .map(|r| format!("{n}-{r}@example.com"))
                .collect();
            serde_json::from_value(
                json!({"name": format!("c{n}"), "type": "email", "recipients": addresses}),
            )
            .unwrap()
        };
        Settings {
            rules: Vec::new(),
            policies: Vec::new(),
            channels: (0..channels)
                .map(|n| (SettingId::new(), channel(n)))
                .collect(),
            templates: vec![
                serde_json::from_value(json!({"event_type": "site_down", "channel_type": "email",
                    "subject": "s", "body": body}))
                .unwrap(),
            ],
            routes: vec![serde_json::from_value(json!({"name": "all"})).unwrap()],
        }
    }

    fn trigger() -> Trigger {
        Trigger {
            event_type: "site_down".to_owned(),
            payload: json!({}),
            idempotency: None,
        }
    }

    #[test]
    fn recipients_beyond_the_event_limit_are_refused_before_any_render() {
        // The template does not render: the count is refused first, so nothing was rendered.
        let many = settings(11, 100, "{{ missing }}");
        assert_eq!(
            plan(&many, trigger()).unwrap_err(),
            PlanError::TooManyDeliveries(1100)
        );
        let (_, deliveries) = plan(&settings(10, 100, "b"), trigger()).unwrap();
        assert_eq!(deliveries.len(), MAX_DELIVERIES_PER_EVENT);
    }

    #[test]
    fn rendered_messages_beyond_the_event_size_are_refused() {
        // 1,000 recipients of a 20 KiB body: about 20 MiB.
        let body = "x".repeat(20 * 1024);
        assert_eq!(
            plan(&settings(10, 100, &body), trigger()).unwrap_err(),
            PlanError::TooLarge
        );
        assert!(plan(&settings(1, 100, &body), trigger()).is_ok());
    }
}
