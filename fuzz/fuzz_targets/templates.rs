//! Templates: what an organisation stores (`PUT /v1/templates/...`) and what every event then
//! renders (`keel::notifications::render`).
//!
//! Input: `subject`, `body` and an optional event payload (JSON), separated by lines of
//! `---`.
//!
//! What a user relies on:
//! - no panic, whatever the template or the payload;
//! - a template refused as bad syntax never renders, and one the settings API took
//!   (`Template::validate`) parses;
//! - a render stays within `MAX_RENDERED_LEN` bytes and gives the same text twice;
//! - the default templates render any payload, and the webhook's default body is JSON whose
//!   `data` is the payload itself.
#![no_main]

use keel::notifications::render::{
    MAX_RENDERED_LEN, check_syntax, context, default_template, render,
};
use keel::notifications::settings::Template;
use keel_store::notifications::model::{ChannelType, EventId, NewEvent, Severity};
use libfuzzer_sys::fuzz_target;
use serde_json::{Value, json};

fn event(payload: Value) -> NewEvent {
    NewEvent {
        id: EventId::new(),
        event_type: "order_failed".to_owned(),
        payload,
        domain: "order".to_owned(),
        severity: Severity::High,
        idempotency: None,
    }
}

/// JSON values equal, numbers compared as the floats they may have been printed from.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) if x.is_f64() || y.is_f64() => {
            match (x.as_f64(), y.as_f64()) {
                (Some(x), Some(y)) => {
                    x == y || (x - y).abs() <= f64::EPSILON * x.abs().max(y.abs())
                }
                _ => false,
            }
        }
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.splitn(3, "\n---\n");
    let subject = parts.next().unwrap_or_default();
    let body = parts.next().unwrap_or_default();
    let payload = parts
        .next()
        .and_then(|payload| serde_json::from_str::<Value>(payload).ok());

    let template = Template {
        event_type: "order_failed".to_owned(),
        channel_type: ChannelType::Email,
        subject: subject.to_owned(),
        body: body.to_owned(),
    };
    let syntax_ok = check_syntax(subject).is_ok() && check_syntax(body).is_ok();
    if template.validate().is_ok() {
        assert!(
            syntax_ok,
            "a template the settings API takes does not parse"
        );
    }

    let context = context(&event(payload.clone().unwrap_or_else(
        || json!({"order": {"id": 42, "total": "9.90", "items": [1, 2, 3]}}),
    )));
    let first = render(&template, &context);
    if !syntax_ok {
        assert!(
            first.is_err(),
            "a template with bad syntax rendered: {first:?}"
        );
    }
    if let Ok(rendered) = &first {
        assert!(rendered.subject.len() <= MAX_RENDERED_LEN);
        assert!(rendered.body.len() <= MAX_RENDERED_LEN);
        assert_eq!(
            Ok(rendered),
            render(&template, &context).as_ref(),
            "the same template and event rendered differently"
        );
    }

    if let Some(payload) = payload {
        for channel in ChannelType::ALL {
            let rendered = render(&default_template(*channel), &context);
            let rendered = match rendered {
                Ok(rendered) => rendered,
                // Only a payload whose text is too long may fail a default template.
                Err(error) if error.reason.contains("longer than") => continue,
                Err(error) => panic!("the default {channel} template failed: {error}"),
            };
            if *channel == ChannelType::Webhook {
                let body: Value = serde_json::from_str(&rendered.body).unwrap_or_else(|e| {
                    panic!("the webhook body is not JSON ({e}): {}", rendered.body)
                });
                assert!(
                    same(&body["data"], &payload),
                    "the webhook's data is not the payload: {} vs {payload}",
                    body["data"]
                );
                assert_eq!(body["type"], "order_failed");
            }
        }
    }
});
