//! Per-request phase timings: where a request's time goes inside hearth.
//!
//! Each client connection carries a [`Track`] of its current request's stamps.
//! Every stamp is the worker's event-loop clock (`Worker::now`, read once per
//! loop iteration and already used for deadlines), so timing a request reads
//! no clock and allocates nothing; the resolution is one loop iteration, and
//! work done within one (parsing a request that arrived whole, say) counts as
//! zero. The phases ([`Phase`]):
//!
//! - `parse`: the first bytes of the request seen → the request complete and
//!   dispatched (a body's transfer included);
//! - `queue` / `acquire`: dispatched → handed to an instance, `acquire` when
//!   the instance was started (or restored) for the request;
//! - `instance`: handed to the instance → its answer read back (the frame's
//!   round trip through the channel included);
//! - `write`: the answer queued → its last byte handed to the kernel.
//!
//! All go into the core's histograms ([`PhaseMetrics`], `/metrics`). A request
//! carrying `X-Hearth-Timing: 1` also gets them in a `Server-Timing` header
//! (milliseconds), with `total`, the first bytes seen → the answer queued; the
//! `write` phase happens after the header is written, so it is only in the
//! histograms. Only such a request pays for the header's formatting.

use std::fmt::Write;
use std::time::Instant;

use crate::functions::sched::Served;
use crate::metrics::{Phase, PhaseMetrics};

/// The stamps of a connection's current request.
pub struct Track {
    /// When the request's first bytes were seen.
    head_at: Instant,
    /// When it was complete and dispatched.
    dispatched_at: Instant,
    /// It asked for a `Server-Timing` header.
    timed: bool,
    /// The oldest answer queued and not yet flushed.
    write_since: Option<Instant>,
}

impl Track {
    /// A track for a connection accepted at `now`.
    pub fn new(now: Instant) -> Track {
        Track {
            head_at: now,
            dispatched_at: now,
            timed: false,
            write_since: None,
        }
    }

    /// The first bytes of a request are about to be parsed.
    #[inline]
    pub fn head(&mut self, now: Instant) {
        self.head_at = now;
    }

    /// The request is complete and handed on; `timed`: it asked for timings.
    #[inline]
    pub fn dispatched(&mut self, now: Instant, timed: bool, m: &PhaseMetrics) {
        self.dispatched_at = now;
        self.timed = timed;
        m.observe(Phase::Parse, micros(self.head_at, now));
    }

    /// The answer to the current request is queued at `now`; `served` is how an
    /// instance served it, if one did. Returns the `Server-Timing` value when
    /// the request asked for it.
    #[inline]
    pub fn answered(
        &mut self,
        now: Instant,
        served: Option<Served>,
        m: &PhaseMetrics,
    ) -> Option<String> {
        if self.write_since.is_none() {
            self.write_since = Some(now);
        }
        let (wait, instance) = match served {
            Some(s) => {
                let wait = micros(self.dispatched_at, s.sent);
                let instance = micros(s.sent, now);
                let phase = if s.cold { Phase::Acquire } else { Phase::Queue };
                m.observe(phase, wait);
                m.observe(Phase::Instance, instance);
                (Some((phase, wait)), instance)
            }
            None => (None, 0),
        };
        if !std::mem::take(&mut self.timed) {
            return None;
        }
        let mut v = String::with_capacity(128);
        entry(&mut v, "parse", micros(self.head_at, self.dispatched_at));
        if let Some((phase, us)) = wait {
            let (queue, acquire) = match phase {
                Phase::Acquire => (0, us),
                _ => (us, 0),
            };
            entry(&mut v, "queue", queue);
            entry(&mut v, "acquire", acquire);
            entry(&mut v, "instance", instance);
        }
        entry(&mut v, "total", micros(self.head_at, now));
        Some(v)
    }

    /// All queued output was handed to the kernel at `now`.
    #[inline]
    pub fn flushed(&mut self, now: Instant, m: &PhaseMetrics) {
        if let Some(since) = self.write_since.take() {
            m.observe(Phase::Write, micros(since, now));
        }
    }
}

/// Whole microseconds from `a` to `b` (zero if `b` is earlier). Rounding each
/// phase down keeps their sum within the rounded-down total.
fn micros(a: Instant, b: Instant) -> u64 {
    b.saturating_duration_since(a).as_micros() as u64
}

/// Appends `name;dur=<ms>` to a `Server-Timing` value.
fn entry(v: &mut String, name: &str, us: u64) {
    if !v.is_empty() {
        v.push_str(", ");
    }
    let _ = write!(v, "{name};dur={}.{:03}", us / 1000, us % 1000);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn parse(v: &str) -> Vec<(String, f64)> {
        v.split(", ")
            .map(|e| {
                let (name, dur) = e.split_once(";dur=").unwrap();
                (name.to_string(), dur.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn phases_add_up_to_the_total_and_only_timed_requests_get_a_header() {
        let m = PhaseMetrics::default();
        let t0 = Instant::now();
        let at = |us| t0 + Duration::from_micros(us);
        let mut t = Track::new(t0);
        t.head(at(10));
        t.dispatched(at(1_510), true, &m);
        let served = Served {
            sent: at(3_777),
            cold: false,
        };
        let v = t.answered(at(9_999), Some(served), &m).unwrap();
        let p = parse(&v);
        let names: Vec<&str> = p.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names, ["parse", "queue", "acquire", "instance", "total"]);
        assert_eq!(p[0].1, 1.5);
        assert_eq!(p[1].1, 2.267);
        assert_eq!(p[2].1, 0.0);
        assert_eq!(p[3].1, 6.222);
        assert_eq!(p[4].1, 9.989);
        // The next request did not ask.
        t.head(at(20_000));
        t.dispatched(at(20_000), false, &m);
        let cold = Served {
            sent: at(25_000),
            cold: true,
        };
        assert_eq!(t.answered(at(26_000), Some(cold), &m), None);
        t.flushed(at(30_000), &m);
        let mut text = String::new();
        let cm = crate::metrics::CoreMetrics {
            phases: m,
            ..Default::default()
        };
        crate::metrics::render_cores(&mut text, &[std::sync::Arc::new(cm)]);
        for line in [
            "hearth_phase_seconds_count{phase=\"parse\"} 2",
            "hearth_phase_seconds_count{phase=\"queue\"} 1",
            "hearth_phase_seconds_count{phase=\"acquire\"} 1",
            "hearth_phase_seconds_count{phase=\"instance\"} 2",
            // The write phase runs from the first unflushed answer (at 9 999 µs).
            "hearth_phase_seconds_sum{phase=\"write\"} 0.020001",
            "hearth_phase_seconds_bucket{phase=\"acquire\",le=\"0.005\"} 1",
            "hearth_phase_seconds_bucket{phase=\"acquire\",le=\"0.0025\"} 0",
        ] {
            assert!(text.contains(line), "{line} not in\n{text}");
        }
    }

    #[test]
    fn local_answers_have_parse_and_total_only() {
        let m = PhaseMetrics::default();
        let t0 = Instant::now();
        let mut t = Track::new(t0);
        t.head(t0);
        t.dispatched(t0 + Duration::from_micros(3), true, &m);
        let v = t
            .answered(t0 + Duration::from_micros(1_000_007), None, &m)
            .unwrap();
        assert_eq!(v, "parse;dur=0.003, total;dur=1000.007");
    }
}
