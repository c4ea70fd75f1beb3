//! Caller-side cost of one log call (criterion, mean): keel's logger against
//! `tracing-appender`'s non-blocking writer, to a file and to a stalled sink.
//!
//! `cargo bench -p keel-log --bench log_call`; `--bench log_latency` gives p50/p99.

// Test and bench code: a failed setup or assertion must stop the run loudly, so unwrap,
// panic and indexing are what is wanted here (the production code denies them).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::Duration;

use common::{Contender, appender_file, appender_stalled, keel_file, keel_stalled, log_call};
use criterion::{Criterion, criterion_group, criterion_main};

fn log_calls(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let contenders: Vec<Box<dyn Fn() -> Contender>> = vec![
        Box::new(|| keel_file(dir.path())),
        Box::new(|| appender_file(dir.path())),
        Box::new(keel_stalled),
        Box::new(appender_stalled),
    ];
    let mut group = c.benchmark_group("log_call");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    for make in contenders {
        let contender = make();
        tracing::dispatcher::with_default(&contender.dispatch, || {
            group.bench_function(contender.name, |b| {
                let mut i = 0_u64;
                b.iter(|| {
                    log_call(i);
                    i += 1;
                });
            });
        });
        (contender.finish)();
    }
    group.finish();
}

// `criterion_group!` defines an undocumented `pub fn benches`.
#[allow(missing_docs)]
mod group {
    use super::*;
    criterion_group!(benches, log_calls);
}
criterion_main!(group::benches);
