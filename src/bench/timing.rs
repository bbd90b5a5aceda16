//! Server-side phase timings: answers that carry a `Server-Timing` header
//! (hearth adds one to requests sent with `X-Hearth-Timing: 1`) are split into
//! the phases the server reports, so one run tells the server's share of the
//! latency from the function's and from what lies outside the server (the
//! network, the kernel, this client).
//!
//! The names read are hearth's ([`NAMES`]); other entries are ignored.
//! `outside` is computed here: the latency this client measured minus the
//! server's `total`.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::stats::LATENCY_US_MAX;

/// The `Server-Timing` entries read, then `outside`.
pub const NAMES: [&str; 6] = ["parse", "queue", "acquire", "instance", "total", "outside"];
const TOTAL: usize = 4;
const OUTSIDE: usize = 5;

/// The durations (µs) one answer reported, by [`NAMES`] index.
pub type Sample = [Option<u64>; NAMES.len()];

/// Reads a `Server-Timing` value (`name;dur=<ms>, …`) into `into`; entries
/// with other names or without a valid `dur` are skipped.
pub fn parse_into(value: &[u8], into: &mut Sample) {
    for entry in value.split(|&b| b == b',') {
        let mut params = entry.split(|&b| b == b';');
        let name = params.next().unwrap_or_default().trim_ascii();
        let Some(i) = NAMES[..OUTSIDE]
            .iter()
            .position(|n| name.eq_ignore_ascii_case(n.as_bytes()))
        else {
            continue;
        };
        let dur = params.find_map(|p| {
            let (k, v) = p.trim_ascii().split_at_checked(4)?;
            k.eq_ignore_ascii_case(b"dur=").then_some(v)
        });
        let ms = dur
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.trim_matches('"').parse::<f64>().ok())
            .filter(|ms| ms.is_finite() && *ms >= 0.0);
        if let Some(ms) = ms {
            into[i] = Some((ms * 1000.0).round() as u64);
        }
    }
}

/// Per-phase histograms of one thread, merged after the run.
pub struct PhaseStats {
    hists: Vec<Histogram<u64>>,
}

impl Default for PhaseStats {
    fn default() -> Self {
        PhaseStats {
            hists: NAMES
                .iter()
                .map(|_| Histogram::new_with_bounds(1, LATENCY_US_MAX, 3).expect("valid bounds"))
                .collect(),
        }
    }
}

impl PhaseStats {
    /// Records the phases of one answer whose latency was `latency_us`.
    pub fn record(&mut self, sample: &Sample, latency_us: u64) {
        for (h, v) in self.hists.iter_mut().zip(sample) {
            if let Some(v) = v {
                h.saturating_record((*v).clamp(0, LATENCY_US_MAX));
            }
        }
        if let Some(total) = sample[TOTAL] {
            self.hists[OUTSIDE].saturating_record(latency_us.saturating_sub(total));
        }
    }

    /// Adds another thread's histograms to these.
    pub fn merge(&mut self, o: &PhaseStats) {
        for (a, b) in self.hists.iter_mut().zip(&o.hists) {
            a.add(b).expect("histograms share their bounds");
        }
    }

    /// One summary per phase that was reported at least once.
    pub fn summary(&self) -> Vec<PhaseSummary> {
        NAMES
            .iter()
            .zip(&self.hists)
            .filter(|(_, h)| !h.is_empty())
            .map(|(name, h)| PhaseSummary {
                phase: name.to_string(),
                count: h.len(),
                mean_us: h.mean(),
                p50: h.value_at_quantile(0.5),
                p90: h.value_at_quantile(0.9),
                p99: h.value_at_quantile(0.99),
                max: h.max(),
            })
            .collect()
    }
}

/// One phase over the measured answers that reported it, µs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseSummary {
    pub phase: String,
    /// Answers that reported this phase.
    pub count: u64,
    pub mean_us: f64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub max: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hearths_header_and_others_are_read() {
        let mut s = Sample::default();
        parse_into(
            b"parse;dur=0.012, queue;dur=0.000, acquire;dur=3, instance;desc=\"x\";dur=1.5, total;dur=4.6, cache;dur=9",
            &mut s,
        );
        assert_eq!(
            s,
            [Some(12), Some(0), Some(3000), Some(1500), Some(4600), None]
        );
        let mut s = Sample::default();
        parse_into(
            b"total;dur=abc, instance, parse;dur=-1, queue;DUR=\"2\"",
            &mut s,
        );
        assert_eq!(s, [None, Some(2000), None, None, None, None]);
    }

    #[test]
    fn outside_is_the_latency_beyond_the_servers_total() {
        let mut p = PhaseStats::default();
        let mut s = Sample::default();
        parse_into(b"parse;dur=0.1, instance;dur=1, total;dur=1.2", &mut s);
        p.record(&s, 1_500);
        p.record(&Sample::default(), 99);
        let sum = p.summary();
        let names: Vec<&str> = sum.iter().map(|s| s.phase.as_str()).collect();
        assert_eq!(names, ["parse", "instance", "total", "outside"]);
        assert_eq!(sum[3].count, 1);
        assert_eq!(sum[3].p50, 300);
    }
}
