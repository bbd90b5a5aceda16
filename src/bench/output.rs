//! What `hearth bench` prints for people: the results table, one row per rate
//! of a sweep, and the live progress line (only when stdout is a terminal).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::driver::Progress;
use super::stats::RunReport;

/// Prints the results of one run.
pub fn print_table(r: &RunReport) {
    let mode = match r.rate_rps {
        Some(rate) => format!("open loop at {rate} req/s (latency from intended send times)"),
        None => "closed loop".to_string(),
    };
    println!("hearth bench {} {}", r.method, r.url);
    println!(
        "  {mode}, {} connections, {} threads, {:.2} s measured after {:.2} s warm-up",
        r.connections, r.threads, r.duration_s, r.warmup_s
    );
    println!();
    let l = &r.latency_us;
    println!(
        "  {:<10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "latency", "min", "p50", "p90", "p99", "p99.9", "max", "mean"
    );
    println!(
        "  {:<10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "",
        us(l.min),
        us(l.p50),
        us(l.p90),
        us(l.p99),
        us(l.p999),
        us(l.max),
        us(l.mean as u64)
    );
    println!();
    println!(
        "  requests   {} answered, {} 2xx, {:.1} req/s",
        r.requests, r.ok, r.throughput_rps
    );
    let e = &r.errors;
    println!(
        "  errors     {} (connect {}, timeout {}, non-2xx {}, malformed {}, io {})",
        e.total(),
        e.connect,
        e.timeout,
        e.non_2xx,
        e.malformed,
        e.io
    );
    if r.status.keys().any(|k| !k.starts_with('2')) {
        let codes: Vec<String> = r.status.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        println!("  status     {}", codes.join(", "));
    }
    print_phases(r);
}

/// Prints the server-reported phases and how the mean latency splits
/// between the function, the server around it, and what lies outside it.
fn print_phases(r: &RunReport) {
    if r.phases.is_empty() {
        return;
    }
    println!();
    println!(
        "  {:<10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}  (Server-Timing)",
        "phase", "answers", "mean", "p50", "p90", "p99", "max"
    );
    for p in &r.phases {
        println!(
            "  {:<10} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
            p.phase,
            p.count,
            us(p.mean_us as u64),
            us(p.p50),
            us(p.p90),
            us(p.p99),
            us(p.max)
        );
    }
    let mean = |name: &str| {
        r.phases
            .iter()
            .find(|p| p.phase == name)
            .map_or(0.0, |p| p.mean_us)
    };
    let (total, instance, outside) = (mean("total"), mean("instance"), mean("outside"));
    let end_to_end = total + outside;
    if end_to_end > 0.0 {
        let pct = |v: f64| 100.0 * v / end_to_end;
        println!(
            "  mean latency {}: function (instance) {:.0}%, hearth (total - instance) {:.0}%, outside hearth (network, kernel, client) {:.0}%",
            us(end_to_end as u64),
            pct(instance),
            pct((total - instance).max(0.0)),
            pct(outside)
        );
    }
}

/// Prints one rate of a sweep, with the header before the first.
pub fn print_sweep_row(r: &RunReport, first: bool) {
    if first {
        println!("hearth bench {} {} (rate sweep)", r.method, r.url);
        println!(
            "  {:>10} {:>10} {:>9} {:>9} {:>9} {:>9} {:>8}",
            "offered/s", "answered/s", "p50", "p99", "p99.9", "max", "errors"
        );
    }
    let l = &r.latency_us;
    println!(
        "  {:>10.0} {:>10.1} {:>9} {:>9} {:>9} {:>9} {:>8}",
        r.rate_rps.unwrap_or(0.0),
        r.throughput_rps,
        us(l.p50),
        us(l.p99),
        us(l.p999),
        us(l.max),
        r.errors.total()
    );
}

/// A latency in µs, shown in the unit that suits it.
pub fn us(v: u64) -> String {
    match v {
        0..1_000 => format!("{v}µs"),
        1_000..1_000_000 => format!("{:.2}ms", v as f64 / 1e3),
        _ => format!("{:.2}s", v as f64 / 1e6),
    }
}

/// Redraws a one-line summary every second until `done`, then erases it.
pub fn progress_line(progress: &[Progress], start: Instant, warmup: Duration, done: &AtomicBool) {
    let mut second = 0;
    let mut answers_before = 0;
    let mut out = std::io::stdout();
    while !done.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(100));
        let t = start.elapsed();
        if t.as_secs() == second {
            continue;
        }
        second = t.as_secs();
        // Measured answers only: warm-up ones are not counted anywhere.
        let answers: u64 = progress
            .iter()
            .map(|p| p.answers.load(Ordering::Relaxed))
            .sum();
        let errors: u64 = progress
            .iter()
            .map(|p| p.errors.load(Ordering::Relaxed))
            .sum();
        let per_s = answers.saturating_sub(answers_before);
        answers_before = answers;
        let phase = if t < warmup { "warm-up" } else { "measuring" };
        let _ = write!(
            out,
            "\r\x1b[2K  {phase} {second:>4}s  {per_s:>8} answers/s  {answers} answers  {errors} errors"
        );
        let _ = out.flush();
    }
    let _ = write!(out, "\r\x1b[2K");
    let _ = out.flush();
}
