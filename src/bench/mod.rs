//! `hearth bench`: an HTTP/1.1 load generator and the charts drawn from its results.
//!
//! - [`args`]: the command line and its validation into a [`args::Plan`];
//!   [`request`] serialises the requests once, before the run.
//! - [`driver`]: one event loop per thread ([`poller`]: level-triggered epoll)
//!   driving keep-alive connections in closed or open loop; [`conn`] reads
//!   answers, sans I/O.
//! - [`stats`]: HDR histograms and counters, and the JSON report.
//! - [`output`]: the human table, the JSON and the live progress line.
//! - [`plot`]: `hearth bench plot`, PNG and SVG charts from JSON reports.
//! - [`flame`]: `hearth bench flame`, flame graphs from `perf script` output.
//! - [`timing`]: the server's `Server-Timing` phases, aggregated.

pub mod args;
mod conn;
mod driver;
pub mod flame;
mod output;
mod plot;
mod poller;
mod request;
pub mod stats;
mod timing;

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub use args::{BenchArgs, BenchCommand};

use args::{Load, Plan, Stop};
use driver::{Progress, Window};
use stats::{Output, RunReport, Stats};

/// Runs `hearth bench` (a load run, a sweep, or `plot`).
pub fn run(a: &BenchArgs) -> Result<(), String> {
    match &a.command {
        Some(BenchCommand::Plot(p)) => return plot::run(p),
        Some(BenchCommand::Flame(f)) => return flame::run(f),
        None => {}
    }
    let plan = a.plan()?;
    raise_fd_limit(plan.connections);
    let live = std::io::stdout().is_terminal() && !a.json;
    let runs = if plan.sweep.is_empty() {
        vec![measure(&plan, plan.load, live)?]
    } else {
        let mut runs = Vec::new();
        for &rate in &plan.sweep {
            let run = measure(&plan, Load::Open { rate_per_s: rate }, live)?;
            if !a.json {
                output::print_sweep_row(&run, runs.is_empty());
            }
            runs.push(run);
        }
        runs
    };
    let out = Output {
        format: stats::FORMAT.to_string(),
        label: plan.label.clone(),
        sweep: !plan.sweep.is_empty(),
        runs,
    };
    if a.json {
        let text = serde_json::to_string_pretty(&out).map_err(|e| e.to_string())?;
        let mut stdout = std::io::stdout().lock();
        // A closed pipe (`| head`) is the reader's choice, not a failure.
        let _ = writeln!(stdout, "{text}");
    } else if !out.sweep {
        output::print_table(&out.runs[0]);
    }
    Ok(())
}

/// Runs the plan once with the given load and summarises it.
fn measure(plan: &Plan, load: Load, live: bool) -> Result<RunReport, String> {
    let shares = driver::shares(plan);
    let progress: Vec<Progress> = shares.iter().map(|_| Progress::default()).collect();
    let start = Instant::now();
    let measure_from = start + plan.warmup;
    let window = Window {
        start,
        measure_from,
        end: match plan.stop {
            Stop::After(d) => Some(measure_from + d),
            Stop::Requests(_) => None,
        },
    };
    let done = AtomicBool::new(false);
    let outcomes = std::thread::scope(|s| {
        let handles: Vec<_> = shares
            .iter()
            .zip(&progress)
            .map(|(share, p)| s.spawn(move || driver::run_thread(plan, load, window, share, p)))
            .collect();
        if live {
            s.spawn(|| output::progress_line(&progress, start, plan.warmup, &done));
        }
        let results: Vec<_> = handles
            .into_iter()
            .map(|h| h.join().expect("a bench thread panicked"))
            .collect();
        done.store(true, Ordering::Relaxed);
        results
    });
    let mut stats = Stats::new();
    let mut last = None;
    for o in outcomes {
        let o = o.map_err(|e| format!("event loop failed: {e}"))?;
        stats.merge(&o.stats);
        last = last.max(o.last_answer);
    }
    let measured = match plan.stop {
        Stop::After(d) => d,
        Stop::Requests(_) => last
            .map(|l| l.saturating_duration_since(measure_from))
            .unwrap_or_default()
            .max(Duration::from_micros(1)),
    };
    Ok(report(plan, load, &stats, measured))
}

fn report(plan: &Plan, load: Load, s: &Stats, measured: Duration) -> RunReport {
    let requests = s.answers();
    let ok = s.status[200..300].iter().sum();
    let (mode, rate_rps) = match load {
        Load::Closed => ("closed", None),
        Load::Open { rate_per_s } => ("open", Some(rate_per_s)),
    };
    let mut per_second = s.per_second.clone();
    if let Stop::After(d) = plan.stop {
        per_second.resize(d.as_secs_f64().ceil() as usize, 0);
    }
    RunReport {
        label: plan.label.clone(),
        url: plan.url.clone(),
        method: plan.method.clone(),
        mode: mode.to_string(),
        rate_rps,
        connections: plan.connections,
        threads: plan.threads,
        warmup_s: plan.warmup.as_secs_f64(),
        duration_s: measured.as_secs_f64(),
        requests,
        ok,
        throughput_rps: requests as f64 / measured.as_secs_f64(),
        errors: s.errors,
        status: stats::status_map(&s.status),
        latency_us: stats::latency(&s.latency_us),
        percentiles: stats::percentiles(&s.latency_us),
        per_second,
        phases: s.phases.summary(),
    }
}

/// Raises the soft open-files limit to the hard one when the connections need it.
fn raise_fd_limit(connections: usize) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: lim is a valid rlimit to fill in.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let want = (connections as libc::rlim_t + 64).min(lim.rlim_max);
    if lim.rlim_cur < want {
        lim.rlim_cur = want;
        // SAFETY: lim is a valid rlimit; failure leaves the old limit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}
