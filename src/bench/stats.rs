//! What a run measures: per-thread [`Stats`] (an HDR latency histogram, counts
//! by status and error kind, completions per second), merged after the run
//! into a [`RunReport`], the serialisable summary that `--json` prints and
//! `hearth bench plot` reads back.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

use super::timing::PhaseStats;
pub use super::timing::PhaseSummary;
use serde::{Deserialize, Serialize};

/// Highest latency the histogram holds, µs (one hour); longer ones are clamped.
pub const LATENCY_US_MAX: u64 = 3_600_000_000;
/// Significant decimal digits the histogram keeps.
const SIGFIGS: u8 = 3;
/// Format tag of the JSON output.
pub const FORMAT: &str = "hearth-bench/1";

/// Errors by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Errors {
    /// Connection attempts that failed.
    pub connect: u64,
    /// Requests with no complete answer within --timeout.
    pub timeout: u64,
    /// Complete answers whose status was not 2xx.
    pub non_2xx: u64,
    /// Answers that could not be parsed or broke a limit.
    pub malformed: u64,
    /// Connections reset or closed mid-request, and failed writes.
    pub io: u64,
}

impl Errors {
    /// All errors together.
    pub fn total(&self) -> u64 {
        self.connect + self.timeout + self.non_2xx + self.malformed + self.io
    }

    fn add(&mut self, o: &Errors) {
        self.connect += o.connect;
        self.timeout += o.timeout;
        self.non_2xx += o.non_2xx;
        self.malformed += o.malformed;
        self.io += o.io;
    }
}

/// One thread's measurements.
pub struct Stats {
    /// Latency of every complete answer, µs.
    pub latency_us: Histogram<u64>,
    pub errors: Errors,
    /// Complete answers by status code (index = status; 0 for out-of-range codes).
    pub status: Vec<u64>,
    /// Complete answers per second of the measured window.
    pub per_second: Vec<u64>,
    /// Server-reported phases of the answers that had them.
    pub phases: PhaseStats,
}

impl Default for Stats {
    fn default() -> Self {
        Self::new()
    }
}

impl Stats {
    /// Empty stats.
    pub fn new() -> Self {
        Stats {
            latency_us: Histogram::new_with_bounds(1, LATENCY_US_MAX, SIGFIGS)
                .expect("histogram bounds are valid"),
            errors: Errors::default(),
            status: vec![0; 600],
            per_second: Vec::new(),
            phases: PhaseStats::default(),
        }
    }

    /// Records a complete answer: its status, its latency, and the second of
    /// the measured window it completed in.
    pub fn answer(&mut self, status: u16, latency_us: u64, second: usize) {
        self.latency_us
            .saturating_record(latency_us.clamp(1, LATENCY_US_MAX));
        let slot = if (status as usize) < self.status.len() {
            status as usize
        } else {
            0
        };
        self.status[slot] += 1;
        if !(200..300).contains(&status) {
            self.errors.non_2xx += 1;
        }
        if self.per_second.len() <= second {
            self.per_second.resize(second + 1, 0);
        }
        self.per_second[second] += 1;
    }

    /// Complete answers recorded.
    pub fn answers(&self) -> u64 {
        self.latency_us.len()
    }

    /// Adds another thread's stats to these.
    pub fn merge(&mut self, o: &Stats) {
        self.latency_us
            .add(&o.latency_us)
            .expect("histograms share their bounds");
        self.errors.add(&o.errors);
        for (a, b) in self.status.iter_mut().zip(&o.status) {
            *a += b;
        }
        if self.per_second.len() < o.per_second.len() {
            self.per_second.resize(o.per_second.len(), 0);
        }
        for (a, b) in self.per_second.iter_mut().zip(&o.per_second) {
            *a += b;
        }
        self.phases.merge(&o.phases);
    }
}

/// Latency summary, µs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latency {
    pub min: u64,
    pub mean: f64,
    pub stdev: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

/// One point of the latency-by-percentile curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Percentile {
    pub percentile: f64,
    pub latency_us: u64,
}

/// The results of one run, as printed by `--json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub label: String,
    pub url: String,
    pub method: String,
    /// "closed" or "open".
    pub mode: String,
    /// Offered rate of an open-loop run, requests/s.
    pub rate_rps: Option<f64>,
    pub connections: usize,
    pub threads: usize,
    pub warmup_s: f64,
    /// Length of the measured window, s.
    pub duration_s: f64,
    /// Complete answers in the measured window (any status).
    pub requests: u64,
    /// Complete 2xx answers.
    pub ok: u64,
    /// Complete answers per second of the measured window.
    pub throughput_rps: f64,
    pub errors: Errors,
    /// Complete answers by status code.
    pub status: BTreeMap<String, u64>,
    pub latency_us: Latency,
    /// The HDR latency-by-percentile curve.
    pub percentiles: Vec<Percentile>,
    /// Complete answers in each second of the measured window.
    pub per_second: Vec<u64>,
    /// Phases the server reported in `Server-Timing` (none without the header).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phases: Vec<PhaseSummary>,
}

/// What `hearth bench --json` prints: one run, or one per rate of a sweep.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Output {
    /// Always [`FORMAT`].
    pub format: String,
    pub label: String,
    /// Whether the runs are a rate sweep.
    pub sweep: bool,
    pub runs: Vec<RunReport>,
}

/// The summary of a latency histogram.
pub fn latency(h: &Histogram<u64>) -> Latency {
    if h.is_empty() {
        return Latency::default();
    }
    Latency {
        min: h.min(),
        mean: h.mean(),
        stdev: h.stdev(),
        p50: h.value_at_quantile(0.50),
        p90: h.value_at_quantile(0.90),
        p99: h.value_at_quantile(0.99),
        p999: h.value_at_quantile(0.999),
        max: h.max(),
    }
}

/// The latency-by-percentile curve: five points per halving of the tail
/// (as HdrHistogram's percentile output has), ending at the maximum.
pub fn percentiles(h: &Histogram<u64>) -> Vec<Percentile> {
    if h.is_empty() {
        return Vec::new();
    }
    let mut out: Vec<Percentile> = h
        .iter_quantiles(5)
        .map(|v| Percentile {
            percentile: v.quantile_iterated_to() * 100.0,
            latency_us: h.highest_equivalent(v.value_iterated_to()),
        })
        .collect();
    out.dedup_by(|b, a| a.percentile == b.percentile);
    out
}

/// Complete answers by status code, as JSON keys.
pub fn status_map(status: &[u64]) -> BTreeMap<String, u64> {
    status
        .iter()
        .enumerate()
        .filter(|(_, &n)| n > 0)
        .map(|(code, &n)| {
            let key = if code == 0 {
                "other".to_string()
            } else {
                code.to_string()
            };
            (key, n)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_counted_by_status_second_and_error_kind() {
        let mut s = Stats::new();
        s.answer(200, 100, 0);
        s.answer(200, 300, 1);
        s.answer(503, 50, 1);
        s.answer(999, 1, 3);
        assert_eq!(s.answers(), 4);
        assert_eq!(s.per_second, vec![1, 2, 0, 1]);
        assert_eq!(s.errors.non_2xx, 2);
        let m = status_map(&s.status);
        assert_eq!(m["200"], 2);
        assert_eq!(m["503"], 1);
        assert_eq!(m["other"], 1);
    }

    #[test]
    fn merging_adds_everything() {
        let mut a = Stats::new();
        let mut b = Stats::new();
        a.answer(200, 10, 0);
        b.answer(200, 20, 2);
        b.errors.timeout = 3;
        a.merge(&b);
        assert_eq!(a.answers(), 2);
        assert_eq!(a.per_second, vec![1, 0, 1]);
        assert_eq!(a.errors.timeout, 3);
        assert_eq!(a.errors.total(), 3);
    }

    #[test]
    fn percentiles_follow_the_distribution() {
        let mut s = Stats::new();
        for v in 1..=10_000u64 {
            s.answer(200, v, 0);
        }
        let l = latency(&s.latency_us);
        assert_eq!(l.min, 1);
        assert!((4990..=5010).contains(&l.p50), "p50 {}", l.p50);
        assert!((9890..=9910).contains(&l.p99), "p99 {}", l.p99);
        assert!((9990..=10_010).contains(&l.max), "max {}", l.max);
        let curve = percentiles(&s.latency_us);
        assert!(curve.len() > 10);
        assert!(curve
            .windows(2)
            .all(|w| w[0].percentile < w[1].percentile && w[0].latency_us <= w[1].latency_us));
        assert_eq!(curve.last().unwrap().percentile, 100.0);
    }

    #[test]
    fn latencies_beyond_the_range_are_clamped() {
        let mut s = Stats::new();
        s.answer(200, 0, 0);
        s.answer(200, u64::MAX, 0);
        assert_eq!(s.answers(), 2);
        assert!(s.latency_us.max() >= LATENCY_US_MAX);
    }

    #[test]
    fn an_empty_run_summarises_to_zeros() {
        let s = Stats::new();
        assert_eq!(latency(&s.latency_us), Latency::default());
        assert!(percentiles(&s.latency_us).is_empty());
    }
}
