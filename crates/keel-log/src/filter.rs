//! Per-stream filters: a default level plus directives by target, HTTP route prefix and method.
//!
//! [`FilterSet`] is what the configuration and the admin endpoint hold; it is validated and
//! compiled into [`CompiledFilters`], which the logger swaps in atomically (`arc-swap`), so a
//! change takes effect on the next record without a lock on the logging path.

use serde::{Deserialize, Serialize};

use crate::stream::{Level, Stream, target_has_prefix};

/// The filters of every stream.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FilterSet {
    /// Filter of the `app` stream.
    pub app: StreamFilter,
    /// Filter of the `audit` stream.
    pub audit: StreamFilter,
    /// Filter of the `access` stream.
    pub access: StreamFilter,
    /// Filter of the `error` stream (panic records are never filtered out).
    pub error: StreamFilter,
}

/// The filter of one stream: a default level and directives that override it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamFilter {
    /// The level used when no directive matches.
    pub level: LevelFilter,
    /// Overrides. The most specific matching directive wins (more conditions first, then longer
    /// prefixes); between equally specific ones, the first listed.
    pub directives: Vec<Directive>,
}

/// An override of the level for records that match every condition it sets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Directive {
    /// Module prefix of the event's target: `keel::store` matches `keel::store::sqlite`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Prefix of the `route` field of the enclosing `request` span (plain string prefix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub route_prefix: Option<String>,
    /// HTTP method of the enclosing `request` span (case-insensitive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The level for matching records.
    pub level: LevelFilter,
}

/// The least severe level a filter keeps, or `off`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LevelFilter {
    /// Everything.
    Trace,
    /// Debug and above.
    Debug,
    /// Info and above.
    #[default]
    Info,
    /// Warnings and errors.
    Warn,
    /// Errors only.
    Error,
    /// Nothing.
    Off,
}

impl LevelFilter {
    /// The lowest level rank this filter keeps (5 for `off`).
    fn min_rank(self) -> u8 {
        match self {
            LevelFilter::Trace => 0,
            LevelFilter::Debug => 1,
            LevelFilter::Info => 2,
            LevelFilter::Warn => 3,
            LevelFilter::Error => 4,
            LevelFilter::Off => 5,
        }
    }

    fn allows(self, level: Level) -> bool {
        level.rank() >= self.min_rank()
    }
}

/// A filter that was refused; `field` is the path of the bad value (`access.directives[0].method`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid log filter at `{field}`: {reason}")]
pub struct FilterError {
    /// Path of the offending field.
    pub field: String,
    /// What is wrong with it.
    pub reason: String,
}

impl FilterSet {
    /// The filter of `stream`.
    pub fn stream(&self, stream: Stream) -> &StreamFilter {
        match stream {
            Stream::App => &self.app,
            Stream::Audit => &self.audit,
            Stream::Access => &self.access,
            Stream::Error => &self.error,
        }
    }

    /// The filter of `stream`, to change it.
    pub fn stream_mut(&mut self, stream: Stream) -> &mut StreamFilter {
        match stream {
            Stream::App => &mut self.app,
            Stream::Audit => &mut self.audit,
            Stream::Access => &mut self.access,
            Stream::Error => &mut self.error,
        }
    }

    /// Parses the JSON body of `PUT /v1/admin/log-filters` and validates it; a type error or an
    /// unknown field is reported with its path, like a validation error.
    pub fn from_json(body: &str) -> Result<FilterSet, FilterError> {
        let mut deserializer = serde_json::Deserializer::from_str(body);
        let filters: FilterSet =
            serde_path_to_error::deserialize(&mut deserializer).map_err(|err| {
                let path = err.path().to_string();
                FilterError {
                    field: if path == "." { String::new() } else { path },
                    reason: err.inner().to_string(),
                }
            })?;
        filters.validate()?;
        Ok(filters)
    }

    /// Checks every directive; the error names the first bad field.
    pub fn validate(&self) -> Result<(), FilterError> {
        for stream in Stream::ALL {
            for (i, directive) in self.stream(stream).directives.iter().enumerate() {
                let at = |field: &str| format!("{}.directives[{i}].{field}", stream.as_str());
                let bad = |field: &str, reason: &str| FilterError {
                    field: at(field),
                    reason: reason.to_owned(),
                };
                if directive.target.is_none()
                    && directive.route_prefix.is_none()
                    && directive.method.is_none()
                {
                    return Err(FilterError {
                        field: format!("{}.directives[{i}]", stream.as_str()),
                        reason: "a directive needs at least one of target, route_prefix, method"
                            .to_owned(),
                    });
                }
                if let Some(target) = &directive.target
                    && (target.is_empty() || target.contains(char::is_whitespace))
                {
                    return Err(bad(
                        "target",
                        "a module path such as `keel::store` is expected",
                    ));
                }
                if let Some(route) = &directive.route_prefix
                    && !route.starts_with('/')
                {
                    return Err(bad("route_prefix", "a route prefix starts with `/`"));
                }
                if let Some(method) = &directive.method
                    && (method.is_empty()
                        || method.len() > 16
                        || !method.bytes().all(|b| b.is_ascii_alphabetic()))
                {
                    return Err(bad(
                        "method",
                        "an HTTP method such as `GET` or `POST` is expected",
                    ));
                }
            }
        }
        Ok(())
    }
}

/// The request a record belongs to, from the fields of its enclosing spans.
#[derive(Debug, Default)]
pub(crate) struct RequestInfo {
    pub(crate) route: Option<String>,
    pub(crate) method: Option<String>,
}

/// A validated [`FilterSet`], ready to be evaluated per record.
#[derive(Debug)]
pub(crate) struct CompiledFilters {
    source: FilterSet,
    app: CompiledStream,
    audit: CompiledStream,
    access: CompiledStream,
    error: CompiledStream,
    /// The lowest level rank any stream may keep: events below it are rejected at the callsite.
    min_rank: u8,
}

#[derive(Debug)]
struct CompiledStream {
    level: LevelFilter,
    /// Sorted most specific first (stable, so the listed order breaks ties).
    directives: Vec<Directive>,
    /// True when some directive looks at the route or the method, so the spans must be read.
    needs_request: bool,
}

impl CompiledStream {
    fn new(filter: &StreamFilter) -> Self {
        let mut directives = filter.directives.clone();
        for directive in &mut directives {
            if let Some(method) = &mut directive.method {
                method.make_ascii_uppercase();
            }
        }
        directives.sort_by_key(|d| std::cmp::Reverse(specificity(d)));
        let needs_request = directives
            .iter()
            .any(|d| d.route_prefix.is_some() || d.method.is_some());
        Self {
            level: filter.level,
            directives,
            needs_request,
        }
    }

    fn allows(&self, level: Level, target: &str, request: &RequestInfo) -> bool {
        self.directives
            .iter()
            .find(|d| matches(d, target, request))
            .map_or(self.level, |d| d.level)
            .allows(level)
    }

    fn min_rank(&self) -> u8 {
        self.directives
            .iter()
            .map(|d| d.level.min_rank())
            .chain(std::iter::once(self.level.min_rank()))
            .min()
            .unwrap_or(0)
    }
}

fn specificity(directive: &Directive) -> (usize, usize) {
    let conditions = usize::from(directive.target.is_some())
        + usize::from(directive.route_prefix.is_some())
        + usize::from(directive.method.is_some());
    let length = directive.target.as_ref().map_or(0, String::len)
        + directive.route_prefix.as_ref().map_or(0, String::len);
    (conditions, length)
}

fn matches(directive: &Directive, target: &str, request: &RequestInfo) -> bool {
    directive
        .target
        .as_ref()
        .is_none_or(|prefix| target_has_prefix(target, prefix))
        && directive.route_prefix.as_ref().is_none_or(|prefix| {
            request
                .route
                .as_ref()
                .is_some_and(|route| route.starts_with(prefix.as_str()))
        })
        && directive.method.as_ref().is_none_or(|method| {
            request
                .method
                .as_ref()
                .is_some_and(|m| m.eq_ignore_ascii_case(method))
        })
}

impl CompiledFilters {
    /// Validates and compiles `source`.
    pub(crate) fn new(source: FilterSet) -> Result<Self, FilterError> {
        source.validate()?;
        let app = CompiledStream::new(&source.app);
        let audit = CompiledStream::new(&source.audit);
        let access = CompiledStream::new(&source.access);
        let error = CompiledStream::new(&source.error);
        let min_rank = [&app, &audit, &access, &error]
            .iter()
            .map(|s| s.min_rank())
            .min()
            .unwrap_or(0);
        Ok(Self {
            source,
            app,
            audit,
            access,
            error,
            min_rank,
        })
    }

    fn stream(&self, stream: Stream) -> &CompiledStream {
        match stream {
            Stream::App => &self.app,
            Stream::Audit => &self.audit,
            Stream::Access => &self.access,
            Stream::Error => &self.error,
        }
    }

    pub(crate) fn source(&self) -> &FilterSet {
        &self.source
    }

    /// The lowest level rank any stream keeps (5 when everything is off).
    pub(crate) fn min_rank(&self) -> u8 {
        self.min_rank
    }

    pub(crate) fn needs_request(&self, stream: Stream) -> bool {
        self.stream(stream).needs_request
    }

    pub(crate) fn allows(
        &self,
        stream: Stream,
        level: Level,
        target: &str,
        request: &RequestInfo,
    ) -> bool {
        self.stream(stream).allows(level, target, request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directive(target: Option<&str>, route: Option<&str>, level: LevelFilter) -> Directive {
        Directive {
            target: target.map(str::to_owned),
            route_prefix: route.map(str::to_owned),
            method: None,
            level,
        }
    }

    #[test]
    fn the_most_specific_directive_wins() {
        let mut set = FilterSet::default();
        set.app.directives = vec![
            directive(Some("keel"), None, LevelFilter::Warn),
            directive(Some("keel::store"), None, LevelFilter::Debug),
        ];
        let compiled = CompiledFilters::new(set).unwrap();
        let none = RequestInfo::default();
        assert!(compiled.allows(Stream::App, Level::Debug, "keel::store::sqlite", &none));
        assert!(!compiled.allows(Stream::App, Level::Info, "keel::http", &none));
        assert!(compiled.allows(Stream::App, Level::Info, "hyper", &none));
        assert_eq!(compiled.min_rank(), Level::Debug.rank());
    }

    #[test]
    fn route_and_method_come_from_the_request() {
        let mut set = FilterSet::default();
        set.access.directives = vec![Directive {
            target: None,
            route_prefix: Some("/v1/admin".to_owned()),
            method: Some("get".to_owned()),
            level: LevelFilter::Off,
        }];
        let compiled = CompiledFilters::new(set).unwrap();
        let get = RequestInfo {
            route: Some("/v1/admin/panics".to_owned()),
            method: Some("GET".to_owned()),
        };
        let post = RequestInfo {
            route: Some("/v1/admin/panics".to_owned()),
            method: Some("POST".to_owned()),
        };
        assert!(compiled.needs_request(Stream::Access));
        assert!(!compiled.allows(Stream::Access, Level::Info, "keel::access", &get));
        assert!(compiled.allows(Stream::Access, Level::Info, "keel::access", &post));
    }

    #[test]
    fn json_errors_name_the_field() {
        let err =
            FilterSet::from_json(r#"{"access":{"directives":[{"level":"loud","target":"x"}]}}"#)
                .unwrap_err();
        assert_eq!(err.field, "access.directives[0].level");
        let err = FilterSet::from_json(r#"{"app":{"levle":"info"}}"#).unwrap_err();
        assert!(err.reason.contains("levle"), "{err}");
        let err = FilterSet::from_json(
            r#"{"access":{"directives":[{"route_prefix":"healthz","level":"off"}]}}"#,
        )
        .unwrap_err();
        assert_eq!(err.field, "access.directives[0].route_prefix");
    }
}
