//! Rendering: a template's subject and body with the event, in minijinja with strict undefined
//! variables (a missing variable is an error, never an empty string) and bounded work.

use keel_store::notifications::model::{ChannelType, NewEvent};
use minijinja::{Environment, UndefinedBehavior};
use serde_json::{Value, json};

use super::settings::Template;

/// The most a rendered subject or body may be, in bytes.
pub const MAX_RENDERED_LEN: usize = 256 * 1024;

/// How much work one render may do (minijinja's fuel): enough for any message, not for a
/// template that loops without end.
const FUEL: u64 = 200_000;

/// A template that failed to render: which one, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("template `{template}`: {reason}")]
pub struct RenderError {
    /// The template's name (`<event type>/<channel type>`, or `default/<channel type>`).
    pub template: String,
    /// What went wrong, as minijinja says it.
    pub reason: String,
}

/// A rendered message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The subject line.
    pub subject: String,
    /// The body.
    pub body: String,
}

fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(FUEL));
    env
}

/// Whether `source` parses as a template; `Err` says why not.
pub fn check_syntax(source: &str) -> Result<(), String> {
    environment()
        .template_from_str(source)
        .map(|_| ())
        .map_err(|e| describe(&e))
}

/// The variables a template sees.
pub fn context(event: &NewEvent) -> Value {
    json!({
        "event_id": event.id,
        "event_type": event.event_type,
        "domain": event.domain,
        "severity": event.severity.as_str(),
        "payload": event.payload,
    })
}

/// The template used for a channel type when the organisation has none for the event type.
pub fn default_template(channel_type: ChannelType) -> Template {
    let (subject, body) = match channel_type {
        ChannelType::Webhook => (
            "{{ event_type }}",
            "{{ {\"type\": event_type, \"event_id\": event_id, \"domain\": domain, \
             \"severity\": severity, \"data\": payload} | tojson }}",
        ),
        ChannelType::Email => (
            "[{{ severity }}] {{ event_type }}",
            "{{ event_type }} ({{ severity }}, {{ domain }})\n\n{{ payload | tojson(indent=2) }}\n",
        ),
        ChannelType::Telegram => (
            "[{{ severity }}] {{ event_type }}",
            "[{{ severity }}] {{ event_type }}\n{{ payload | tojson }}",
        ),
    };
    Template {
        event_type: "default".to_owned(),
        channel_type,
        subject: subject.to_owned(),
        body: body.to_owned(),
    }
}

/// Renders `template` with `context`.
pub fn render(template: &Template, context: &Value) -> Result<Rendered, RenderError> {
    let env = environment();
    let name = template.unique_key();
    let part = |source: &str, what: &str| {
        let refused = |reason: String| RenderError {
            template: name.clone(),
            reason: format!("{what}: {reason}"),
        };
        let compiled = env
            .template_from_str(source)
            .map_err(|e| refused(describe(&e)))?;
        // Written into a buffer that refuses to grow past the limit, so a template that would
        // write gigabytes stops at the limit instead of building them in memory first.
        let mut out = Bounded::default();
        let written = compiled.render_captured_to(context, &mut out);
        if out.overflowed {
            return Err(refused(format!("longer than {MAX_RENDERED_LEN} bytes")));
        }
        written.map_err(|e| refused(describe(&e)))?;
        String::from_utf8(out.bytes).map_err(|_| refused("not UTF-8 text".to_owned()))
    };
    Ok(Rendered {
        subject: part(&template.subject, "subject")?,
        body: part(&template.body, "body")?,
    })
}

/// A render's output, refused once it would pass [`MAX_RENDERED_LEN`] bytes.
#[derive(Debug, Default)]
struct Bounded {
    bytes: Vec<u8>,
    overflowed: bool,
}

impl std::io::Write for Bounded {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len().saturating_add(buf.len()) > MAX_RENDERED_LEN {
            self.overflowed = true;
            return Err(std::io::Error::other("the rendered text is too long"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// minijinja's error with its detail ("undefined value", the line), without the debug dump.
fn describe(error: &minijinja::Error) -> String {
    let mut text = error.kind().to_string();
    if let Some(detail) = error.detail() {
        text.push_str(": ");
        text.push_str(detail);
    }
    if let Some(line) = error.line() {
        text.push_str(&format!(" (line {line})"));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel_store::notifications::model::{EventId, Severity};

    fn event() -> NewEvent {
        NewEvent {
            id: EventId::new(),
            event_type: "order_failed".to_owned(),
            payload: json!({"order": {"id": 42, "total": "9.90"}}),
            domain: "order".to_owned(),
            severity: Severity::High,
            idempotency: None,
        }
    }

    fn template(subject: &str, body: &str) -> Template {
        Template {
            event_type: "order_failed".to_owned(),
            channel_type: ChannelType::Email,
            subject: subject.to_owned(),
            body: body.to_owned(),
        }
    }

    #[test]
    fn renders_the_event() {
        let rendered = render(
            &template(
                "Order {{ payload.order.id }} failed",
                "Total {{ payload.order.total }} ({{ severity }})",
            ),
            &context(&event()),
        )
        .unwrap();
        assert_eq!(rendered.subject, "Order 42 failed");
        assert_eq!(rendered.body, "Total 9.90 (high)");
    }

    #[test]
    fn an_undefined_variable_is_an_error_naming_the_template() {
        let error = render(
            &template("ok", "{{ payload.order.missing }}"),
            &context(&event()),
        )
        .unwrap_err();
        assert_eq!(error.template, "order_failed/email");
        assert!(
            error.reason.starts_with("body: undefined value"),
            "{}",
            error.reason
        );
        assert!(check_syntax("{% if %}").is_err());
        assert!(check_syntax("{{ a }}").is_ok());
    }

    #[test]
    fn a_template_that_never_ends_runs_out_of_fuel() {
        let error = render(
            &template(
                "x",
                "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
            ),
            &context(&event()),
        )
        .unwrap_err();
        assert!(error.reason.contains("fuel"), "{}", error.reason);
    }

    #[test]
    fn a_template_that_writes_too_much_stops_at_the_limit() {
        let error = render(
            &template(
                "x",
                "{% set s = \"x\" * 1000000 %}{% for i in range(100000) %}{{ s }}{% endfor %}",
            ),
            &context(&event()),
        )
        .unwrap_err();
        assert!(error.reason.contains("longer than"), "{}", error.reason);
    }

    #[test]
    fn default_templates_render_every_channel() {
        for channel in ChannelType::ALL {
            let rendered = render(&default_template(*channel), &context(&event())).unwrap();
            assert!(rendered.body.contains("order_failed"));
        }
        let webhook = render(&default_template(ChannelType::Webhook), &context(&event())).unwrap();
        let body: Value = serde_json::from_str(&webhook.body).unwrap();
        assert_eq!(body["type"], "order_failed");
        assert_eq!(body["data"]["order"]["id"], 42);
    }
}
