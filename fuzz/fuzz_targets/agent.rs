//! What `keel agent` reads from outside: the stderr lines of the program it runs (progress
//! lines, `KEEL_PROGRESS <json>`, and the tail kept for a failure), its stdout (the result),
//! and the server's answers (a claim answer, a check-in answer's limits, an error answer).
//!
//! Input: any bytes, read as each of those.
//!
//! What a user relies on:
//! - no panic, whatever the program writes or the server answers;
//! - lines are the same however the stream is cut into reads, none longer than the limit;
//! - a progress line's value is sent as read: printed back, it parses to the same value;
//! - a result or an error built from the program's output fits the budget it was built for;
//! - a claimed command never carries its claim token into the program's object, and its lease
//!   is never zero.
#![no_main]

use std::time::Duration;

use http::StatusCode;
use keel::agent::client::{classify, read_claim_answer};
use keel::agent::report::{ReportLimits, Tail, exit_error, measure, shrink, stdout_result};
use keel::agent::runner::{ClaimedCommand, LineSplitter, parse_progress};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fn lines(data: &[u8], limit: usize, chunk: usize) -> Vec<String> {
    let mut splitter = LineSplitter::new(limit);
    let mut lines = Vec::new();
    for part in data.chunks(chunk.max(1)) {
        lines.extend(splitter.push(part));
    }
    lines.extend(splitter.finish());
    lines
}

fuzz_target!(|data: &[u8]| {
    let (limit, chunk, budget) = match data {
        [a, b, c, ..] => (
            usize::from(*a) * 16 + 1,
            usize::from(*b) + 1,
            128 + usize::from(*c) * 32,
        ),
        _ => (4096, 7, 1024),
    };

    // stderr: lines, progress and the failure's tail.
    let whole = lines(data, limit, data.len());
    assert_eq!(
        whole,
        lines(data, limit, chunk),
        "the lines depend on how the stream was read"
    );
    let mut tail = Tail::new(budget);
    for line in &whole {
        // Each byte of the kept line is at most one replacement character (3 bytes).
        assert!(line.len() <= limit * 3, "a line longer than its limit");
        if let Some(progress) = parse_progress(line) {
            let printed = format!("KEEL_PROGRESS {progress}");
            assert_eq!(
                parse_progress(&printed).as_ref(),
                Some(&progress),
                "a progress value did not print back to itself"
            );
        } else {
            tail.push_line(line);
        }
    }
    let error = exit_error(Some(1), None, &tail.text(), budget);
    assert!(
        measure(&error) <= budget,
        "the failure's error is over its budget: {error}"
    );

    // stdout: the result.
    let mut stdout = Tail::new(budget * 4);
    for part in data.chunks(chunk) {
        stdout.push(part);
    }
    assert_eq!(stdout.seen(), data.len() as u64);
    let result = stdout_result(&stdout, budget);
    assert!(
        measure(&result) <= budget,
        "the result is over its budget: {result}"
    );
    let shrunk = shrink(&result, budget / 2);
    assert!(
        measure(&shrunk) <= budget / 2,
        "a shrunk result is over its budget: {shrunk}"
    );

    // The server's answers.
    if let Ok(commands) = read_claim_answer(data) {
        for object in commands {
            if let Ok(command) = ClaimedCommand::from_json(object) {
                assert!(!command.object.contains_key("claim_token"));
                assert!(command.lease > Duration::ZERO);
            }
        }
    }
    if let Ok(answer) = serde_json::from_slice::<Value>(data) {
        let _ = ReportLimits::from_check_in(&answer);
        if let Ok(command) = ClaimedCommand::from_json(answer) {
            assert!(!command.object.contains_key("claim_token"));
        }
    }
    for status in [400, 404, 409, 413, 429, 500, 503] {
        let status = StatusCode::from_u16(status).expect("a status");
        let _ = classify(status, data);
    }
});
