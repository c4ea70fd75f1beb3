//! Fitting reports to the server's limits: the `result`, `error` and `progress` the agent sends
//! are measured as the server measures them (the compact serialisation of the parsed JSON
//! value) and kept below the limits the check-in answer names, so a large output costs
//! neither the lease nor the command's success.

use std::collections::VecDeque;

use serde_json::{Value, json};

use crate::config::CommandLimits;

/// The budgets the agent keeps its reports within, each a server limit less a margin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReportLimits {
    /// The most bytes a `result` may take.
    pub result: usize,
    /// The most bytes an `error` may take.
    pub error: usize,
    /// The most bytes a `progress` value may take.
    pub progress: usize,
}

impl Default for ReportLimits {
    /// keel's default limits, for a server whose check-in answer names none.
    fn default() -> Self {
        Self::from_server(&CommandLimits::default())
    }
}

impl ReportLimits {
    /// The budgets for a server with `limits`.
    pub fn from_server(limits: &CommandLimits) -> Self {
        Self {
            result: budget(limits.result_bytes),
            error: budget(limits.error_bytes),
            progress: budget(limits.progress_bytes),
        }
    }

    /// The budgets from a check-in answer's `limits` object; a limit it does not name (an
    /// older server) is keel's default.
    pub fn from_check_in(answer: &Value) -> Self {
        let mut limits = CommandLimits::default();
        let named = |field: &str| {
            answer
                .get("limits")
                .and_then(|limits| limits.get(field))
                .and_then(Value::as_u64)
                .and_then(|bytes| usize::try_from(bytes).ok())
        };
        for (field, slot) in [
            ("result_bytes", &mut limits.result_bytes),
            ("error_bytes", &mut limits.error_bytes),
            ("progress_bytes", &mut limits.progress_bytes),
        ] {
            if let Some(bytes) = named(field) {
                *slot = bytes;
            }
        }
        Self::from_server(&limits)
    }

    /// The budgets that fit every keel server: its smallest allowed limit.
    pub fn smallest() -> Self {
        let least = budget(CommandLimits::MIN_BYTES);
        Self {
            result: least,
            error: least,
            progress: least,
        }
    }
}

/// `limit` less a margin of 1/64 (at least 64 bytes): the agent and the server serialise with
/// the same rules, and the margin covers a server built with another version of them.
pub fn budget(limit: usize) -> usize {
    limit.saturating_sub((limit / 64).max(64))
}

/// The size of `value` as the server measures it: its compact JSON serialisation.
pub fn measure(value: &Value) -> usize {
    serde_json::to_vec(value).map_or(usize::MAX, |bytes| bytes.len())
}

/// The last bytes of a stream, with a count of all it was given.
#[derive(Debug)]
pub struct Tail {
    bytes: VecDeque<u8>,
    limit: usize,
    seen: u64,
}

impl Tail {
    /// A tail of at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        Self {
            bytes: VecDeque::new(),
            limit,
            seen: 0,
        }
    }

    /// Appends `bytes`, dropping the oldest beyond the limit.
    pub fn push(&mut self, bytes: &[u8]) {
        self.seen = self
            .seen
            .saturating_add(u64::try_from(bytes.len()).unwrap_or(u64::MAX));
        // Only the last `limit` bytes of a large chunk can stay.
        let keep = bytes
            .get(bytes.len().saturating_sub(self.limit)..)
            .unwrap_or(bytes);
        self.bytes.extend(keep);
        let excess = self.bytes.len().saturating_sub(self.limit);
        self.bytes.drain(..excess);
    }

    /// Appends `line` and a newline.
    pub fn push_line(&mut self, line: &str) {
        self.push(line.as_bytes());
        self.push(b"\n");
    }

    /// How many bytes were pushed in all.
    pub fn seen(&self) -> u64 {
        self.seen
    }

    /// Whether bytes were dropped: the tail is not the whole stream.
    pub fn is_cut(&self) -> bool {
        self.seen > u64::try_from(self.bytes.len()).unwrap_or(u64::MAX)
    }

    /// The kept bytes.
    pub fn bytes(&self) -> Vec<u8> {
        self.bytes.iter().copied().collect()
    }

    /// The kept bytes as text (invalid UTF-8 replaced); a character cut at the front by the
    /// limit is dropped.
    pub fn text(&self) -> String {
        let skip = if self.is_cut() {
            self.bytes
                .iter()
                .take_while(|byte| *byte & 0b1100_0000 == 0b1000_0000)
                .count()
        } else {
            0
        };
        let bytes: Vec<u8> = self.bytes.iter().copied().skip(skip).collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

/// The `result` for a program that exited 0, within `budget` bytes: its stdout as JSON when
/// the whole of it is one JSON value that fits, else `{"stdout": "<text>"}`; output that does
/// not fit keeps its end, after a marker: `{"stdout": "<marker><tail>", "stdout_truncated":
/// true, "stdout_bytes": <all bytes written>}`.
pub fn stdout_result(stdout: &Tail, budget: usize) -> Value {
    if !stdout.is_cut() {
        if let Ok(value) = serde_json::from_slice::<Value>(&stdout.bytes())
            && measure(&value) <= budget
        {
            return value;
        }
        let whole = json!({"stdout": stdout.text()});
        if measure(&whole) <= budget {
            return whole;
        }
    }
    truncated_stdout(&stdout.text(), stdout.seen(), budget)
}

/// `{"stdout": "<marker><the longest tail of text that fits>", "stdout_truncated": true,
/// "stdout_bytes": total}`; `total` is how many bytes the program wrote.
pub fn truncated_stdout(text: &str, total: u64, budget: usize) -> Value {
    let build = |kept: &str| {
        json!({
            "stdout": format!("{}{kept}", marker(kept.len(), total)),
            "stdout_truncated": true,
            "stdout_bytes": total,
        })
    };
    fit_tail(text, budget, build)
        .unwrap_or_else(|| json!({"stdout_truncated": true, "stdout_bytes": total}))
}

/// The line that starts a truncated stdout.
pub fn marker(kept: usize, total: u64) -> String {
    format!("[keel agent: output truncated; the last {kept} of {total} bytes follow]\n")
}

/// The failure `error` for a program that exited non-zero, its stderr tail cut (from the
/// front) to fit `budget`.
pub fn exit_error(
    code: Option<i32>,
    signal: Option<i32>,
    stderr_tail: &str,
    budget: usize,
) -> Value {
    fit_tail(
        stderr_tail,
        budget,
        |kept| json!({"exit_code": code, "signal": signal, "stderr_tail": kept}),
    )
    .unwrap_or_else(|| json!({"exit_code": code, "signal": signal}))
}

/// A report the server refused as too large although it fit the budgets the agent knew (the
/// server's limits changed): its text form cut to fit `budget`. A `stdout` result keeps its
/// text; any other value is shown as its JSON text.
pub fn shrink(value: &Value, budget: usize) -> Value {
    let text = match value.get("stdout").and_then(Value::as_str) {
        Some(stdout) => stdout.to_owned(),
        None => value.to_string(),
    };
    let total = match value.get("stdout_bytes").and_then(Value::as_u64) {
        Some(total) => total,
        None => u64::try_from(text.len()).unwrap_or(u64::MAX),
    };
    truncated_stdout(&text, total, budget)
}

/// `build(tail)` for the longest tail of `text` (cut at a character boundary) whose size fits
/// `budget`; `None` when not even the empty tail fits. The size grows with the tail, so a
/// binary search over where the tail starts finds it in a few serialisations.
pub fn fit_tail(text: &str, budget: usize, build: impl Fn(&str) -> Value) -> Option<Value> {
    let fits = |start: usize| -> Option<Value> {
        let value = build(text.get(start..)?);
        (measure(&value) <= budget).then_some(value)
    };
    let boundary = |mut at: usize| {
        while at < text.len() && !text.is_char_boundary(at) {
            at += 1;
        }
        at
    };
    if let Some(value) = fits(0) {
        return Some(value);
    }
    // Invariant: the tail from `high` fits (or `high` is the end), the one from `low` not.
    let (mut low, mut high) = (0, text.len());
    fits(high)?;
    while high - low > 1 {
        let middle = low + (high - low) / 2;
        if fits(boundary(middle)).is_some() {
            high = middle;
        } else {
            low = middle;
        }
    }
    fits(boundary(high))
}

/// Whether `progress` may be sent; when not, it is logged and dropped.
pub fn progress_fits(progress: &Value, budget: usize) -> bool {
    let size = measure(progress);
    if size <= budget {
        return true;
    }
    tracing::warn!(
        size,
        limit = budget,
        "a progress value is larger than the server takes; it is dropped (the last one that fit is kept)"
    );
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail_of(bytes: &[u8]) -> Tail {
        let mut tail = Tail::new(1024);
        tail.push(bytes);
        tail
    }

    #[test]
    fn stdout_becomes_the_result() {
        let result = |bytes: &[u8]| stdout_result(&tail_of(bytes), 4096);
        assert_eq!(result(b"{\"ok\": true}\n"), json!({"ok": true}));
        assert_eq!(result(b"  [1, 2]  "), json!([1, 2]));
        assert_eq!(result(b"42"), json!(42));
        assert_eq!(
            result(b"restarted nginx\n"),
            json!({"stdout": "restarted nginx\n"})
        );
        assert_eq!(result(b""), json!({"stdout": ""}));
        assert_eq!(result(b"caf\xff"), json!({"stdout": "caf\u{fffd}"}));
    }

    #[test]
    fn output_cut_by_the_reader_keeps_its_end_after_a_marker() {
        let mut tail = Tail::new(4);
        tail.push(b"{\"cut\": 12}");
        // Even output whose end parses is not trusted once cut.
        assert_eq!(
            stdout_result(&tail, 4096),
            json!({
                "stdout": format!("{} 12}}", marker(4, 11)),
                "stdout_truncated": true,
                "stdout_bytes": 11,
            })
        );
    }

    #[test]
    fn a_large_output_is_cut_to_the_budget_keeping_its_end() {
        let text: String = (0..20_000).map(|n| format!("line {n}\n")).collect();
        let mut tail = Tail::new(text.len());
        tail.push(text.as_bytes());
        let budget = budget(64 * 1024);
        let result = stdout_result(&tail, budget);
        let size = measure(&result);
        assert!(size <= budget, "{size}");
        assert!(size > budget - 16, "the cut keeps as much as fits: {size}");
        let stdout = result["stdout"].as_str().unwrap();
        assert!(stdout.starts_with("[keel agent: output truncated; the last "));
        assert!(stdout.ends_with("line 19998\nline 19999\n"));
        assert_eq!(result["stdout_truncated"], true);
        assert_eq!(result["stdout_bytes"], text.len());
    }

    #[test]
    fn json_that_grows_when_serialised_is_measured_as_serialised() {
        // `1e2` is 3 bytes as written, `100.0` (5) once parsed: 3000 bytes become 5000.
        let numbers = vec!["1e2"; 1000].join(",");
        let written = format!("[{numbers}]");
        let budget = 4500;
        assert!(written.len() < budget);
        let result = stdout_result(&tail_of(written.as_bytes()), budget);
        assert!(measure(&result) <= budget);
        assert_eq!(result["stdout_truncated"], true);
    }

    #[test]
    fn escaping_and_multibyte_characters_are_counted_and_never_split() {
        let text = "é\"\u{1}".repeat(5000);
        let value = truncated_stdout(&text, 1_000_000, 2000);
        assert!(measure(&value) <= 2000);
        let stdout = value["stdout"].as_str().unwrap();
        assert!(stdout.ends_with("é\"\u{1}"));
        // Each 4 bytes serialise to 10 (`é`, `\"`, `\u0001`): most of the budget is used.
        assert!(stdout.len() > 600, "{}", stdout.len());
    }

    #[test]
    fn a_failure_keeps_its_exit_status_and_the_end_of_its_stderr() {
        let stderr = "x".repeat(5000) + "the real cause\n";
        let error = exit_error(Some(3), None, &stderr, 1000);
        assert!(measure(&error) <= 1000);
        assert_eq!(error["exit_code"], 3);
        assert!(
            error["stderr_tail"]
                .as_str()
                .unwrap()
                .ends_with("the real cause\n")
        );
    }

    #[test]
    fn a_refused_report_shrinks_to_fit_any_server() {
        let least = ReportLimits::smallest().result;
        let stdout = "y".repeat(50_000);
        let shrunk = shrink(
            &json!({"stdout": stdout, "stdout_truncated": true, "stdout_bytes": 700_000}),
            least,
        );
        assert!(measure(&shrunk) <= least);
        assert_eq!(shrunk["stdout_bytes"], 700_000);
        let shrunk = shrink(&json!({"list": vec![1; 10_000]}), least);
        assert!(measure(&shrunk) <= least);
        assert!(shrunk["stdout"].as_str().unwrap().ends_with("1,1]}"));
    }

    #[test]
    fn limits_come_from_the_check_in_answer_less_a_margin() {
        let limits = ReportLimits::from_check_in(&json!({
            "id": "a",
            "limits": {"params_bytes": 1, "result_bytes": 640_000, "error_bytes": 8192, "progress_bytes": 2048},
        }));
        assert_eq!(limits.result, 640_000 - 10_000);
        assert_eq!(limits.error, 8192 - 128);
        assert_eq!(limits.progress, 2048 - 64);
        // An older server names none: keel's defaults.
        assert_eq!(
            ReportLimits::from_check_in(&json!({"id": "a"})),
            ReportLimits::default()
        );
        assert_eq!(ReportLimits::default().result, 64 * 1024 - 1024);
    }

    #[test]
    fn the_tail_is_bounded_and_keeps_the_end() {
        let mut tail = Tail::new(64);
        for n in 0..100 {
            tail.push_line(&format!("line {n}"));
        }
        let text = tail.text();
        assert!(text.len() <= 64, "{}", text.len());
        assert!(text.ends_with("line 98\nline 99\n"), "{text:?}");

        let mut tail = Tail::new(100);
        tail.push(&[b'x'; 1000]);
        assert_eq!((tail.bytes().len(), tail.seen()), (100, 1000));

        // A character cut in half at the front is dropped, not garbled.
        let mut tail = Tail::new(4);
        tail.push_line("ééé");
        assert_eq!(tail.text(), "é\n");
    }
}
