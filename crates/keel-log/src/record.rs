//! The owned record a caller hands to the writer, and the field visitor that builds it.
//!
//! A record owns everything it carries (strings are copied out of the event), so nothing is
//! shared between the caller and the writer thread. Rendering a field with `Debug`/`Display`
//! runs under [`keel_guard::isolate`]: a panicking implementation gives a placeholder for that
//! field, and the panic is reported by the keel panic hook under component `log`.

use std::fmt;
use std::sync::LazyLock;

use keel_guard::Scope;
use time::OffsetDateTime;
use tracing::field::{Field, Visit};

use crate::stream::{Level, Stream, StreamSet};

/// Written instead of a field whose `Debug` or `Display` panicked.
pub const PANICKED_FIELD: &str = "<panicked while formatting>";

/// Component name under which the logger's own panics are reported.
pub const COMPONENT: &str = "log";

static LOG_SCOPE: LazyLock<Scope> = LazyLock::new(|| Scope::new(COMPONENT));

/// The scope every isolated piece of logger code runs under.
pub(crate) fn log_scope() -> Scope {
    LOG_SCOPE.clone()
}

/// A field value, typed so JSON output keeps numbers and booleans.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum FieldValue {
    Str(String),
    I64(i64),
    U64(u64),
    F64(f64),
    Bool(bool),
}

/// Where a record came from, for the feedback guard of panic records.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    /// A `tracing` event.
    Event,
    /// A panic report from the keel panic hook.
    Panic,
}

/// One log record, owned.
#[derive(Debug)]
pub(crate) struct Record {
    pub(crate) time: OffsetDateTime,
    pub(crate) level: Level,
    /// The stream the record belongs to (used for drop counts and labels).
    pub(crate) stream: Stream,
    /// Every stream the record is written to (the primary one, plus `error` for app errors).
    pub(crate) streams: StreamSet,
    pub(crate) target: &'static str,
    pub(crate) message: String,
    pub(crate) fields: Vec<(&'static str, FieldValue)>,
    pub(crate) origin: Origin,
}

/// Sets `name` to `value`, replacing an earlier value of the same name (an inner span or the
/// event itself overrides an outer span).
pub(crate) fn upsert(
    fields: &mut Vec<(&'static str, FieldValue)>,
    name: &'static str,
    value: FieldValue,
) {
    if let Some(slot) = fields.iter_mut().find(|(n, _)| *n == name) {
        slot.1 = value;
    } else {
        fields.push((name, value));
    }
}

/// Renders with `render`; a panic inside gives [`PANICKED_FIELD`].
pub(crate) fn render_guarded(render: impl FnOnce() -> String) -> String {
    keel_guard::isolate(log_scope(), render).unwrap_or_else(|_| PANICKED_FIELD.to_owned())
}

/// The fields stored in a span's extensions, recorded on `on_new_span` and `on_record`.
#[derive(Debug, Default)]
pub(crate) struct SpanFields(pub(crate) Vec<(&'static str, FieldValue)>);

/// Collects fields into a list; the `message` field goes to `message` when one is given.
pub(crate) struct FieldCollector<'a> {
    pub(crate) fields: &'a mut Vec<(&'static str, FieldValue)>,
    pub(crate) message: Option<&'a mut String>,
}

impl FieldCollector<'_> {
    fn put(&mut self, field: &Field, value: FieldValue) {
        if field.name() == "message"
            && let Some(message) = self.message.as_deref_mut()
        {
            *message = match value {
                FieldValue::Str(s) => s,
                other => plain(&other),
            };
            return;
        }
        upsert(self.fields, field.name(), value);
    }
}

fn plain(value: &FieldValue) -> String {
    match value {
        FieldValue::Str(s) => s.clone(),
        FieldValue::I64(v) => v.to_string(),
        FieldValue::U64(v) => v.to_string(),
        FieldValue::F64(v) => v.to_string(),
        FieldValue::Bool(v) => v.to_string(),
    }
}

impl Visit for FieldCollector<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.put(field, FieldValue::F64(value));
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, FieldValue::I64(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, FieldValue::U64(value));
    }

    fn record_i128(&mut self, field: &Field, value: i128) {
        self.put(field, FieldValue::Str(value.to_string()));
    }

    fn record_u128(&mut self, field: &Field, value: u128) {
        self.put(field, FieldValue::Str(value.to_string()));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, FieldValue::Bool(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, FieldValue::Str(value.to_owned()));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        let text = render_guarded(|| value.to_string());
        self.put(field, FieldValue::Str(text));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = render_guarded(|| format!("{value:?}"));
        self.put(field, FieldValue::Str(text));
    }
}

/// The value of the string field `name`, if set.
pub(crate) fn str_field<'a>(
    fields: &'a [(&'static str, FieldValue)],
    name: &str,
) -> Option<&'a str> {
    fields.iter().find_map(|(n, v)| match v {
        FieldValue::Str(s) if *n == name => Some(s.as_str()),
        _ => None,
    })
}
