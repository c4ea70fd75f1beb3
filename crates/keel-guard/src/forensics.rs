//! What makes a panic report readable and groupable: the short backtrace and the fingerprint.
//!
//! - [`short_backtrace`] keeps the frames between the panicking code and the entry of the task
//!   it ran in: the hook's own frames (the panic machinery of `std`/`core`, keel's hook) and the
//!   runtime's (`tokio`, `hyper`, `axum`, `tower`, `futures`, `std`/`core`/`alloc` internals,
//!   thread start-up) are left out. A captured backtrace of ~110 frames becomes the dozen that
//!   say where the panic came from.
//! - [`message_shape`] replaces the parts of a message that change from one occurrence to the
//!   next (numbers, hex ids, UUIDs) so that [`fingerprint`] (location plus shape) is the same
//!   for every panic of one bug.
//!
//! Everything here runs inside the panic hook: it works on owned strings, never indexes or
//! slices, and cannot panic.

use std::hash::{Hash, Hasher};

/// The most frames a short backtrace keeps; the rest is summarised in one line.
pub const SHORT_BACKTRACE_FRAMES: usize = 40;

/// First path segments of frames that belong to the panic machinery or the runtime.
const RUNTIME_CRATES: &[&str] = &[
    "std",
    "core",
    "alloc",
    "tokio",
    "tokio_util",
    "hyper",
    "hyper_util",
    "h2",
    "futures",
    "futures_util",
    "futures_core",
    "futures_executor",
    "tower",
    "tower_http",
    "tower_layer",
    "tower_service",
    "axum",
    "axum_core",
    "tracing",
    "tracing_core",
    "tracing_futures",
    "tracing_subscriber",
    "backtrace",
];

/// Frames of keel's own panic hook.
const HOOK_PREFIX: &str = "keel_guard::panic::";

/// Below this frame everything is thread or runtime start-up.
const BEGIN_MARKER: &str = "__rust_begin_short_backtrace";

/// One frame of a rendered `std::backtrace::Backtrace`: its header line (`  12: path::to::fn`)
/// and the `at file:line:col` lines below it.
struct Frame<'a> {
    name: &'a str,
    lines: Vec<&'a str>,
}

fn frames(backtrace: &str) -> Vec<Frame<'_>> {
    let mut frames: Vec<Frame<'_>> = Vec::new();
    for line in backtrace.lines() {
        match frame_name(line) {
            Some(name) => frames.push(Frame {
                name,
                lines: vec![line],
            }),
            None => {
                if let Some(frame) = frames.last_mut() {
                    frame.lines.push(line);
                }
            }
        }
    }
    frames
}

/// The function name of a frame header (`  12: keel::http::f` → `keel::http::f`).
fn frame_name(line: &str) -> Option<&str> {
    let (number, name) = line.trim_start().split_once(": ")?;
    (!number.is_empty() && number.bytes().all(|b| b.is_ascii_digit())).then_some(name)
}

/// The crate a frame belongs to: the first path segment, looking through `<…>` and `&dyn`.
fn frame_crate(name: &str) -> &str {
    let name = name.trim_start_matches(['<', '&']);
    let name = name.strip_prefix("dyn ").unwrap_or(name);
    name.split("::").next().unwrap_or(name)
}

fn is_runtime_frame(name: &str) -> bool {
    let krate = frame_crate(name);
    // No path (`__rust_try`, `start_thread`, `main`, `<unknown>`) or a generic parameter
    // (`<F as axum::handler::Handler<…>>::call`): machinery, not keel's code.
    !name.contains("::")
        || krate.starts_with(|c: char| !c.is_ascii_lowercase())
        || name.starts_with(HOOK_PREFIX)
        || RUNTIME_CRATES.contains(&krate)
}

/// The short form of a rendered backtrace: the frames of the code that panicked and of its
/// callers, up to the task's entry, with their original numbers (the gaps show where runtime
/// frames were). At most [`SHORT_BACKTRACE_FRAMES`] frames; text that is not a backtrace
/// (such as "disabled backtrace") is returned as it is.
pub fn short_backtrace(full: &str) -> String {
    let all = frames(full);
    if all.is_empty() {
        return full.to_owned();
    }
    let mut kept = Vec::new();
    let mut omitted = 0usize;
    for frame in &all {
        if frame.name.contains(BEGIN_MARKER) {
            break;
        }
        if is_runtime_frame(frame.name) {
            continue;
        }
        if kept.len() < SHORT_BACKTRACE_FRAMES {
            kept.push(frame);
        } else {
            omitted += 1;
        }
    }
    let mut out = String::new();
    for frame in kept {
        for line in &frame.lines {
            out.push_str(line);
            out.push('\n');
        }
    }
    if omitted > 0 {
        out.push_str(&format!("      … {omitted} more frames of keel's code\n"));
    }
    if out.is_empty() {
        // Only runtime frames (a panic inside the runtime itself): better the whole than none.
        return full.to_owned();
    }
    out
}

/// The message with its variable parts replaced: a hex id (`0x…`, or a word of hex digits and
/// dashes with six or more hex digits, one of them a decimal digit: UUIDs, hashes) becomes
/// `<hex>`, any other run of digits `<n>`.
/// `"order 42 for 3f9a2c1e-…"` and `"order 7 for 0b11…"` have the same shape.
pub fn message_shape(message: &str) -> String {
    let mut shape = String::with_capacity(message.len());
    let mut word = String::new();
    for c in message.chars() {
        if c.is_ascii_alphanumeric() || c == '-' {
            word.push(c);
        } else {
            push_word_shape(&mut shape, &word);
            word.clear();
            shape.push(c);
        }
    }
    push_word_shape(&mut shape, &word);
    shape
}

fn push_word_shape(shape: &mut String, word: &str) {
    if word.is_empty() {
        return;
    }
    let hex_body = word
        .strip_prefix("0x")
        .or_else(|| word.strip_prefix("0X"))
        .filter(|rest| !rest.is_empty());
    let is_hex = match hex_body {
        Some(rest) => rest.bytes().all(|b| b.is_ascii_hexdigit()),
        None => {
            word.bytes().filter(u8::is_ascii_hexdigit).count() >= 6
                && word.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-')
                && word.bytes().any(|b| b.is_ascii_digit())
        }
    };
    if is_hex {
        shape.push_str("<hex>");
        return;
    }
    let mut in_digits = false;
    for c in word.chars() {
        if c.is_ascii_digit() {
            if !in_digits {
                shape.push_str("<n>");
            }
            in_digits = true;
        } else {
            shape.push(c);
            in_digits = false;
        }
    }
}

/// The fingerprint of a panic: 16 hex digits from its location and its message shape. Panics
/// of one bug share it; it is stable for the life of the process (not across builds).
pub fn fingerprint(location: Option<&str>, shape: &str) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    location.hash(&mut hasher);
    shape.hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CAPTURED: &str = "   0: keel_guard::panic::hook
             at ./crates/keel-guard/src/panic.rs:190:53
   1: <alloc::boxed::Box<F,A> as core::ops::function::Fn<Args>>::call
             at /rustc/x/library/alloc/src/boxed.rs:2254:9
   2: std::panicking::panic_with_hook
             at /rustc/x/library/std/src/panicking.rs:833:13
   3: std::sys::backtrace::__rust_end_short_backtrace
             at /rustc/x/library/std/src/sys/backtrace.rs:182:18
   4: core::panicking::panic_fmt
             at /rustc/x/library/core/src/panicking.rs:75:14
   5: keel::http::commands::create::{{closure}}
             at ./crates/keel/src/http/commands.rs:240:9
   6: <core::pin::Pin<P> as core::future::future::Future>::poll
             at /rustc/x/library/core/src/future/future.rs:133:9
   7: <F as axum::handler::Handler<(M,T1),S>>::call::{{closure}}
             at /home/.cargo/axum/src/handler/mod.rs:240:9
   8: keel_guard::isolate::isolate_async::{{closure}}
             at ./crates/keel-guard/src/isolate.rs:80:9
   9: tokio::runtime::task::harness::Harness<T,S>::poll
             at /home/.cargo/tokio/src/runtime/task/harness.rs:150:15
  10: __rust_try
  11: std::sys::backtrace::__rust_begin_short_backtrace
             at /rustc/x/library/std/src/sys/backtrace.rs:166:18
  12: keel::main
             at ./crates/keel/src/main.rs:10:5
  13: start_thread
";

    #[test]
    fn the_short_backtrace_keeps_keel_frames_between_the_panic_and_the_task_entry() {
        let short = short_backtrace(CAPTURED);
        assert_eq!(
            short,
            "   5: keel::http::commands::create::{{closure}}
             at ./crates/keel/src/http/commands.rs:240:9
   8: keel_guard::isolate::isolate_async::{{closure}}
             at ./crates/keel-guard/src/isolate.rs:80:9
"
        );
    }

    #[test]
    fn text_that_is_not_a_backtrace_is_kept() {
        assert_eq!(short_backtrace("disabled backtrace"), "disabled backtrace");
    }

    #[test]
    fn numbers_and_hex_ids_do_not_change_the_shape() {
        let a = message_shape("order 42 of 3f9a2c1e-0b11-4c2d-9e8f-0123456789ab at 0xdeadbeef");
        let b = message_shape("order 7 of 01234567-89ab-cdef-0123-456789abcdef at 0x10");
        assert_eq!(a, b);
        assert_eq!(a, "order <n> of <hex> at <hex>");
        assert_eq!(message_shape("retry2 failed"), "retry<n> failed");
        assert_eq!(message_shape("user-42 gone"), "user-<n> gone");
        assert_eq!(message_shape("index out of bounds"), "index out of bounds");
        assert_ne!(
            message_shape("decode failed"),
            message_shape("encode failed")
        );
    }

    #[test]
    fn the_fingerprint_depends_on_location_and_shape() {
        let here = Some("src/a.rs:1:1");
        assert_eq!(
            fingerprint(here, &message_shape("id 1")),
            fingerprint(here, &message_shape("id 2"))
        );
        assert_ne!(
            fingerprint(here, "x"),
            fingerprint(Some("src/a.rs:2:1"), "x")
        );
        assert_eq!(fingerprint(here, "x").len(), 16);
    }
}
