//! The `tracing` layer: keeps span fields, filters events, builds owned records.

use std::sync::Arc;

use time::OffsetDateTime;
use tracing::span::{Attributes, Id, Record as SpanValues};
use tracing::subscriber::Interest;
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;

use crate::filter::RequestInfo;
use crate::queue::LogQueue;
use crate::record::{FieldCollector, Origin, Record, SpanFields, str_field, upsert};
use crate::stream::{Level, Stream, StreamSet, uses_reserve};

/// The layer to add to a `tracing_subscriber::registry()`; [`crate::init`] installs it
/// globally, [`crate::build`] hands it over.
#[derive(Clone)]
pub struct KeelLayer {
    pub(crate) shared: Arc<LogQueue>,
}

impl std::fmt::Debug for KeelLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeelLayer").finish_non_exhaustive()
    }
}

impl<S> tracing_subscriber::Layer<S> for KeelLayer
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn register_callsite(&self, _metadata: &'static Metadata<'static>) -> Interest {
        // Filters change at run time: ask `enabled` every time rather than caching a verdict.
        Interest::sometimes()
    }

    fn enabled(&self, metadata: &Metadata<'_>, _ctx: Context<'_, S>) -> bool {
        Level::from(metadata.level()).rank()
            >= self
                .shared
                .min_rank
                .load(std::sync::atomic::Ordering::Relaxed)
    }

    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Vec::new();
        attrs.record(&mut FieldCollector {
            fields: &mut fields,
            message: None,
        });
        let mut extensions = span.extensions_mut();
        if let Some(existing) = extensions.get_mut::<SpanFields>() {
            existing.0 = fields;
        } else {
            extensions.insert(SpanFields(fields));
        }
    }

    fn on_record(&self, id: &Id, values: &SpanValues<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut extensions = span.extensions_mut();
        if let Some(existing) = extensions.get_mut::<SpanFields>() {
            values.record(&mut FieldCollector {
                fields: &mut existing.0,
                message: None,
            });
        } else {
            let mut fields = Vec::new();
            values.record(&mut FieldCollector {
                fields: &mut fields,
                message: None,
            });
            extensions.insert(SpanFields(fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let metadata = event.metadata();
        let level = Level::from(metadata.level());
        let target = metadata.target();
        let stream = Stream::of_target(target);
        let also_error = stream == Stream::App && level == Level::Error;

        let mut streams = StreamSet::default();
        {
            let filters = self.shared.filters.load();
            let request = if filters.needs_request(stream)
                || (also_error && filters.needs_request(Stream::Error))
            {
                request_info(&ctx, event)
            } else {
                RequestInfo::default()
            };
            if filters.allows(stream, level, target, &request) {
                streams.insert(stream);
            }
            if also_error && filters.allows(Stream::Error, level, target, &request) {
                streams.insert(Stream::Error);
            }
        }
        if streams.is_empty() {
            return;
        }
        // Checked before any formatting: a dropped record costs almost nothing.
        if !uses_reserve(stream, level) && !self.shared.admits_low_level() {
            self.shared.count_drop(stream, level);
            return;
        }

        let mut fields = Vec::new();
        if let Some(scope) = ctx.event_scope(event) {
            for span in scope.from_root() {
                if let Some(span_fields) = span.extensions().get::<SpanFields>() {
                    for (name, value) in &span_fields.0 {
                        upsert(&mut fields, name, value.clone());
                    }
                }
            }
        }
        let mut message = String::new();
        event.record(&mut FieldCollector {
            fields: &mut fields,
            message: Some(&mut message),
        });
        self.shared.submit(Record {
            time: OffsetDateTime::now_utc(),
            level,
            stream,
            streams,
            target,
            message,
            fields,
            origin: Origin::Event,
        });
    }
}

/// The `route` and `method` of the nearest enclosing spans that have them.
fn request_info<S>(ctx: &Context<'_, S>, event: &Event<'_>) -> RequestInfo
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    let mut info = RequestInfo::default();
    let Some(scope) = ctx.event_scope(event) else {
        return info;
    };
    for span in scope {
        let extensions = span.extensions();
        let Some(fields) = extensions.get::<SpanFields>() else {
            continue;
        };
        if info.route.is_none() {
            info.route = str_field(&fields.0, "route").map(str::to_owned);
        }
        if info.method.is_none() {
            info.method = str_field(&fields.0, "method").map(str::to_owned);
        }
        if info.route.is_some() && info.method.is_some() {
            break;
        }
    }
    info
}
