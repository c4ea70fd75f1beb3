//! Text and JSON rendering of a record into one line.
//!
//! The failpoint `log.format` fires here, once per rendered line.

use std::io::Write;

use time::format_description::well_known::Rfc3339;

use crate::config::Format;
use crate::record::{FieldValue, Record};
use crate::stream::Stream;

/// Keys the JSON format writes itself; a field with one of these names is written as
/// `fields.<name>` instead.
const RESERVED: [&str; 5] = ["time", "level", "stream", "target", "message"];

/// Appends the line for `record`, labelled with `stream`, to `out` (newline included).
pub(crate) fn render(record: &Record, stream: Stream, format: Format, out: &mut Vec<u8>) {
    fail::fail_point!("log.format");
    render_unchecked(record, stream, format, out);
}

/// [`render`] without the failpoint: for the stderr fallback, which may run inside the panic
/// hook and must not panic.
pub(crate) fn render_unchecked(record: &Record, stream: Stream, format: Format, out: &mut Vec<u8>) {
    match format {
        Format::Text => render_text(record, stream, out),
        Format::Json => render_json(record, stream, out),
    }
}

fn timestamp(record: &Record) -> String {
    record
        .time
        .format(&Rfc3339)
        .unwrap_or_else(|_| record.time.unix_timestamp().to_string())
}

fn render_text(record: &Record, stream: Stream, out: &mut Vec<u8>) {
    // Writes into a Vec cannot fail.
    let _ = write!(
        out,
        "{} {:<5} {} {}: ",
        timestamp(record),
        record.level.as_upper(),
        stream.as_str(),
        record.target,
    );
    // One record, one line: control characters (newlines in a message) are escaped.
    for c in record.message.chars() {
        if c.is_control() {
            let _ = write!(out, "{}", c.escape_default());
        } else {
            let mut utf8 = [0u8; 4];
            out.extend_from_slice(c.encode_utf8(&mut utf8).as_bytes());
        }
    }
    for (name, value) in &record.fields {
        let _ = write!(out, " {name}=");
        match value {
            FieldValue::Str(s) if needs_quotes(s) => {
                let _ = write!(out, "{s:?}");
            }
            FieldValue::Str(s) => out.extend_from_slice(s.as_bytes()),
            FieldValue::I64(v) => {
                let _ = write!(out, "{v}");
            }
            FieldValue::U64(v) => {
                let _ = write!(out, "{v}");
            }
            FieldValue::F64(v) => {
                let _ = write!(out, "{v}");
            }
            FieldValue::Bool(v) => {
                let _ = write!(out, "{v}");
            }
        }
    }
    out.push(b'\n');
}

fn needs_quotes(s: &str) -> bool {
    s.is_empty()
        || s.chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '"' || c == '=')
}

fn json_str(out: &mut Vec<u8>, s: &str) {
    // Serializing a `str` into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, s);
}

fn render_json(record: &Record, stream: Stream, out: &mut Vec<u8>) {
    out.extend_from_slice(b"{\"time\":");
    json_str(out, &timestamp(record));
    out.extend_from_slice(b",\"level\":");
    json_str(out, record.level.as_upper());
    out.extend_from_slice(b",\"stream\":");
    json_str(out, stream.as_str());
    out.extend_from_slice(b",\"target\":");
    json_str(out, record.target);
    out.extend_from_slice(b",\"message\":");
    json_str(out, &record.message);
    for (name, value) in &record.fields {
        out.push(b',');
        if RESERVED.contains(name) {
            json_str(out, &format!("fields.{name}"));
        } else {
            json_str(out, name);
        }
        out.push(b':');
        match value {
            FieldValue::Str(s) => json_str(out, s),
            FieldValue::I64(v) => {
                let _ = write!(out, "{v}");
            }
            FieldValue::U64(v) => {
                let _ = write!(out, "{v}");
            }
            FieldValue::F64(v) if v.is_finite() => {
                let _ = write!(out, "{v}");
            }
            FieldValue::F64(v) => json_str(out, &v.to_string()),
            FieldValue::Bool(v) => {
                let _ = write!(out, "{v}");
            }
        }
    }
    out.extend_from_slice(b"}\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::Origin;
    use crate::stream::{Level, StreamSet};

    fn record() -> Record {
        Record {
            time: time::macros::datetime!(2025-01-02 03:04:05.5 UTC),
            level: Level::Info,
            stream: Stream::App,
            streams: StreamSet::of(&[Stream::App]),
            target: "keel::http",
            message: "hello \"you\"".to_owned(),
            fields: vec![
                ("request_id", FieldValue::Str("r-1".to_owned())),
                ("n", FieldValue::U64(3)),
                ("ok", FieldValue::Bool(true)),
                ("ratio", FieldValue::F64(f64::NAN)),
                ("level", FieldValue::Str("shadow".to_owned())),
                ("note", FieldValue::Str("two words".to_owned())),
            ],
            origin: Origin::Event,
        }
    }

    #[test]
    fn json_lines_parse_and_keep_types() {
        let mut out = Vec::new();
        render(&record(), Stream::App, Format::Json, &mut out);
        let value: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(value["time"], "2025-01-02T03:04:05.5Z");
        assert_eq!(value["level"], "INFO");
        assert_eq!(value["stream"], "app");
        assert_eq!(value["message"], "hello \"you\"");
        assert_eq!(value["n"], 3);
        assert_eq!(value["ok"], true);
        assert_eq!(value["ratio"], "NaN");
        assert_eq!(value["fields.level"], "shadow");
    }

    #[test]
    fn text_lines_quote_values_with_spaces() {
        let mut out = Vec::new();
        render(&record(), Stream::Error, Format::Text, &mut out);
        let line = String::from_utf8(out).unwrap();
        assert_eq!(
            line,
            "2025-01-02T03:04:05.5Z INFO  error keel::http: hello \"you\" request_id=r-1 n=3 \
             ok=true ratio=NaN level=shadow note=\"two words\"\n"
        );
    }
}
