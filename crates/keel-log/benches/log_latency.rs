//! Per-call latency (p50, p99, p99.9, max) of one log call, timed call by call with
//! `Instant`, for keel's logger and `tracing-appender` in the same run: to a file, then to a
//! sink that blocks; back to back, and paced so that the writers keep up. Each contender runs twice, alternating, to show the run-to-run noise.
//!
//! `cargo bench -p keel-log --bench log_latency` (`CALLS=...` to change the 100k calls).

// Test and bench code: a failed setup or assertion must stop the run loudly, so unwrap,
// panic and indexing are what is wanted here (the production code denies them).
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

mod common;

use std::time::{Duration, Instant};

use common::{Contender, appender_file, appender_stalled, keel_file, keel_stalled, log_call};

const WARM_UP: u64 = 10_000;

fn measure(contender: Contender, calls: u64, gap: Duration) {
    let mut nanos: Vec<u64> = Vec::with_capacity(calls as usize);
    tracing::dispatcher::with_default(&contender.dispatch, || {
        for i in 0..WARM_UP {
            log_call(i);
        }
        for i in 0..calls {
            let start = Instant::now();
            log_call(i);
            nanos.push(start.elapsed().as_nanos() as u64);
            // Paced runs leave the writer time to keep up (a busy wait: no sleep granularity).
            while start.elapsed() < gap {
                std::hint::spin_loop();
            }
        }
    });
    let dropped = (contender.dropped)();
    (contender.finish)();
    nanos.sort_unstable();
    let at = |q: f64| nanos[((nanos.len() as f64 - 1.0) * q) as usize];
    let mean = nanos.iter().sum::<u64>() / nanos.len() as u64;
    println!(
        "{:<36} {:>8} {:>8} {:>8} {:>10} {:>8} {:>9}",
        contender.name,
        at(0.50),
        at(0.99),
        at(0.999),
        nanos[nanos.len() - 1],
        mean,
        dropped,
    );
}

fn main() {
    // `cargo bench` passes `--bench`; no other arguments are taken.
    let calls: u64 = std::env::var("CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().unwrap();
    println!(
        "{calls} calls per contender after {WARM_UP} warm-up calls, nanoseconds per call; \
         dropped = records the contender dropped (queue full), warm-up included"
    );
    println!(
        "{:<36} {:>8} {:>8} {:>8} {:>10} {:>8} {:>9}",
        "contender", "p50", "p99", "p99.9", "max", "mean", "dropped"
    );
    let burst = Duration::ZERO;
    let paced = Duration::from_micros(5);
    println!("-- to a file, back to back (the writers cannot keep up: both drop)");
    for _round in 0..2 {
        measure(keel_file(dir.path()), calls, burst);
        measure(appender_file(dir.path()), calls, burst);
    }
    println!("-- to a file, one call every {paced:?} (the writers keep up)");
    for _round in 0..2 {
        measure(keel_file(dir.path()), calls, paced);
        measure(appender_file(dir.path()), calls, paced);
    }
    println!("-- to a sink that blocks, back to back");
    for _round in 0..2 {
        measure(keel_stalled(), calls, burst);
        measure(appender_stalled(), calls, burst);
    }
}
