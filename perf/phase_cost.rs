//! What per-request phase timing costs hearth's request path, measured
//! in-process: the [`Track`] calls a request makes (first bytes, dispatched,
//! answered by an instance, flushed), with the histogram updates they do, run
//! in a loop over varied durations so the bucket searches differ as they do
//! under load. Prints nanoseconds per request, to set against hearth's CPU per
//! request (`perf/functions/cpu-split.sh`).
//!
//! Run: `cargo run --release --example phase-cost [-- REQUESTS]`

use std::hint::black_box;
use std::time::{Duration, Instant};

use hearth::engine::phases::Track;
use hearth::functions::sched::Served;
use hearth::metrics::PhaseMetrics;

fn main() {
    let n: u64 = std::env::args()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000_000);
    let m = PhaseMetrics::default();
    let t0 = Instant::now();
    let mut track = Track::new(t0);
    // Offsets in µs cycling through a few decades, as real phases do.
    let steps: Vec<Duration> = (0..64u64)
        .map(|i| Duration::from_micros((i * 37) % 5_000 + (i % 3) * 20_000))
        .collect();
    let mut best = f64::MAX;
    for _round in 0..5 {
        let start = Instant::now();
        for i in 0..n {
            let d = steps[(i % 64) as usize];
            let base = t0 + d;
            track.head(black_box(base));
            track.dispatched(black_box(base + d / 8), false, &m);
            let served = Served {
                sent: base + d / 4,
                cold: i % 97 == 0,
            };
            black_box(track.answered(black_box(base + d), Some(served), &m));
            track.flushed(black_box(base + d + d / 16), &m);
        }
        let ns = start.elapsed().as_nanos() as f64 / n as f64;
        best = best.min(ns);
    }
    println!("phase timing: {best:.1} ns per request (best of 5 rounds of {n} requests)");
}
