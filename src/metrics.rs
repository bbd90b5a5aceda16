//! Counters exported at `GET /metrics` in the Prometheus text format.
//!
//! Each core owns one [`CoreMetrics`] and is its only writer (relaxed atomics,
//! no locks); `/metrics` reads all of them. Function series are labelled by
//! function id only, so cardinality is bounded by the number of deployed
//! functions (itself limited, see `functions::FUNCTIONS_MAX`).

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Front-end counters of one core.
#[derive(Default)]
pub struct CoreMetrics {
    pub open_connections: AtomicU64,
    pub accepted_connections: AtomicU64,
    pub shed_connections: AtomicU64,
    /// Responses by status class: index 0 = 1xx ... 4 = 5xx.
    pub responses_by_class: [AtomicU64; 5],
    pub parse_errors: AtomicU64,
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    /// Answer bytes queued and not yet written (gauge).
    pub out_queued: AtomicU64,
    /// Request body bytes charged to the core's input budget (gauge).
    pub in_held: AtomicU64,
    /// Times a connection's next request waited for the core's output budget.
    pub budget_waits: AtomicU64,
    /// Connections refused over the per-address limit.
    pub shed_per_ip: AtomicU64,
    /// Requests refused because their body did not fit the input budget.
    pub shed_input: AtomicU64,
    /// Connections closed because their unread answers stalled over the budget.
    pub out_evicted: AtomicU64,
    /// Whether the core's worker runs as `SCHED_BATCH` now (gauge, 0 or 1).
    pub batch: AtomicU64,
    /// Time requests spent in each phase inside hearth.
    pub phases: PhaseMetrics,
}

impl CoreMetrics {
    /// Counts one response of `status`.
    pub fn count_status(&self, status: u16) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        add(&self.responses_by_class[class], 1);
    }
}

/// Relaxed increment (single writer per counter, or tolerant of races).
#[inline]
pub fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Relaxed);
}

/// The phases of a request inside hearth, as timed on the event loop's clock
/// (see `engine::phases`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// From the first bytes of the request to its dispatch (body included).
    Parse = 0,
    /// Waiting in the function's queue for a warm instance.
    Queue = 1,
    /// Waiting for an instance started (or restored) for the request.
    Acquire = 2,
    /// From the frame handed to the instance to its answer read back.
    Instance = 3,
    /// From the answer queued to its last byte handed to the kernel.
    Write = 4,
}

impl Phase {
    /// How many phases there are.
    pub const COUNT: usize = 5;
    /// Their names, as in `/metrics` and `Server-Timing`.
    pub const NAMES: [&'static str; Self::COUNT] =
        ["parse", "queue", "acquire", "instance", "write"];
}

/// Upper bounds (µs) of the phase histogram buckets.
pub const PHASE_BUCKETS_US: [u64; 15] = [
    10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 100_000, 1_000_000, 10_000_000,
    60_000_000,
];

/// One core's phase histograms: a fixed set of buckets per phase, written by
/// the core alone.
pub struct PhaseMetrics {
    buckets: [[AtomicU64; PHASE_BUCKETS_US.len() + 1]; Phase::COUNT],
    sum_us: [AtomicU64; Phase::COUNT],
}

impl Default for PhaseMetrics {
    fn default() -> Self {
        PhaseMetrics {
            buckets: std::array::from_fn(|_| std::array::from_fn(|_| AtomicU64::new(0))),
            sum_us: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl PhaseMetrics {
    /// Records that a request spent `us` microseconds in `phase`. Only the
    /// owning core calls this, so a plain load and store suffice (no locked
    /// read-modify-write on the request path); readers see whole values.
    #[inline]
    pub fn observe(&self, phase: Phase, us: u64) {
        let i = PHASE_BUCKETS_US.partition_point(|&b| b < us);
        let b = &self.buckets[phase as usize][i];
        b.store(b.load(Relaxed) + 1, Relaxed);
        let s = &self.sum_us[phase as usize];
        s.store(s.load(Relaxed) + us, Relaxed);
    }
}

/// Upper bounds (µs) of the invocation duration histogram buckets.
pub const DURATION_BUCKETS_US: [u64; 12] = [
    500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000, 5_000_000,
    30_000_000,
];

/// Per-function counters, shared by all cores.
#[derive(Default)]
pub struct FunctionMetrics {
    pub invocations: AtomicU64,
    /// Errors by kind: see [`ErrorKind`].
    pub errors: [AtomicU64; ErrorKind::COUNT],
    pub cold_starts: AtomicU64,
    /// Instances removed, for any reason (idle past keep-warm, over the fit,
    /// crashed, timed out, evicted for memory, the function deleted).
    pub retired: AtomicU64,
    /// Idle instances handed from one core to another, counted as they
    /// reach it (one that cannot, and comes back, is not).
    pub handovers: AtomicU64,
    /// Client connections moved to the core holding the function's instance.
    pub connections_moved: AtomicU64,
    /// Queued requests sent to another core's idle instance (see `sched::spill`).
    pub requests_spilled: AtomicU64,
    /// Requests sent to a busy instance behind the one it runs (see
    /// `sched::CorePool::send_ahead`).
    pub requests_sent_ahead: AtomicU64,
    pub queue_depth: AtomicU64,
    pub instances: AtomicU64,
    pub duration_buckets: [AtomicU64; DURATION_BUCKETS_US.len() + 1],
    pub duration_sum_us: AtomicU64,
    /// Output lines and bytes left out of the log (rate and size limits).
    pub log_dropped_lines: AtomicU64,
    pub log_dropped_bytes: AtomicU64,
}

/// Why an invocation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// The handler threw or rejected (502).
    Handler = 0,
    /// The deadline passed (504).
    Timeout = 1,
    /// The instance died or broke the protocol (502).
    Crash = 2,
    /// Queue full (429).
    Throttled = 3,
    /// An instance could not be started (503).
    Start = 4,
}

impl ErrorKind {
    pub const COUNT: usize = 5;
    const NAMES: [&'static str; Self::COUNT] =
        ["handler", "timeout", "crash", "throttled", "start"];
}

impl FunctionMetrics {
    /// Records one finished invocation that took `us` microseconds.
    pub fn observe_duration(&self, us: u64) {
        let i = DURATION_BUCKETS_US
            .iter()
            .position(|&b| us <= b)
            .unwrap_or(DURATION_BUCKETS_US.len());
        add(&self.duration_buckets[i], 1);
        add(&self.duration_sum_us, us);
    }

    /// Counts one error.
    pub fn error(&self, kind: ErrorKind) {
        add(&self.errors[kind as usize], 1);
    }
}

/// A metric series: name, type, help text, and how to read it.
type Series<M> = (&'static str, &'static str, &'static str, fn(&M) -> u64);

/// Renders the front-end series of all cores.
pub fn render_cores(out: &mut String, cores: &[std::sync::Arc<CoreMetrics>]) {
    let series: [Series<CoreMetrics>; 13] = [
        (
            "hearth_open_connections",
            "gauge",
            "Open client connections.",
            |m| m.open_connections.load(Relaxed),
        ),
        (
            "hearth_accepted_connections_total",
            "counter",
            "Accepted client connections.",
            |m| m.accepted_connections.load(Relaxed),
        ),
        (
            "hearth_shed_connections_total",
            "counter",
            "Connections refused over the per-core limit.",
            |m| m.shed_connections.load(Relaxed),
        ),
        (
            "hearth_parse_errors_total",
            "counter",
            "Requests rejected as malformed or over a limit.",
            |m| m.parse_errors.load(Relaxed),
        ),
        (
            "hearth_bytes_in_total",
            "counter",
            "Bytes read from clients.",
            |m| m.bytes_in.load(Relaxed),
        ),
        (
            "hearth_bytes_out_total",
            "counter",
            "Bytes written to clients.",
            |m| m.bytes_out.load(Relaxed),
        ),
        (
            "hearth_out_queued_bytes",
            "gauge",
            "Answer bytes buffered for clients and not yet written.",
            |m| m.out_queued.load(Relaxed),
        ),
        (
            "hearth_in_held_bytes",
            "gauge",
            "Request body bytes of unauthenticated clients held until answered (the input budget).",
            |m| m.in_held.load(Relaxed),
        ),
        (
            "hearth_out_budget_waits_total",
            "counter",
            "Requests left unparsed while the core's output budget was exhausted.",
            |m| m.budget_waits.load(Relaxed),
        ),
        (
            "hearth_shed_per_ip_total",
            "counter",
            "Connections refused over the per-address limit.",
            |m| m.shed_per_ip.load(Relaxed),
        ),
        (
            "hearth_shed_input_total",
            "counter",
            "Requests refused because their body did not fit the core's input budget.",
            |m| m.shed_input.load(Relaxed),
        ),
        (
            "hearth_out_evicted_total",
            "counter",
            "Connections closed because their unread answers stalled over the output budget.",
            |m| m.out_evicted.load(Relaxed),
        ),
        (
            "hearth_worker_batch",
            "gauge",
            "1 while the core's worker runs as SCHED_BATCH (--worker-policy), else 0.",
            |m| m.batch.load(Relaxed),
        ),
    ];
    for (name, kind, help, get) in series {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (core, m) in cores.iter().enumerate() {
            let _ = writeln!(out, "{name}{{core=\"{core}\"}} {}", get(m));
        }
    }
    let name = "hearth_responses_total";
    let _ = writeln!(
        out,
        "# HELP {name} Responses by status class.\n# TYPE {name} counter"
    );
    for (core, m) in cores.iter().enumerate() {
        for (i, c) in m.responses_by_class.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{core=\"{core}\",class=\"{}xx\"}} {}",
                i + 1,
                c.load(Relaxed)
            );
        }
    }
    render_phases(out, cores);
}

/// Renders the phase histograms, summed over the cores.
fn render_phases(out: &mut String, cores: &[std::sync::Arc<CoreMetrics>]) {
    let name = "hearth_phase_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Time requests spent in each phase inside hearth (event-loop clock).\n# TYPE {name} histogram"
    );
    for (p, phase) in Phase::NAMES.iter().enumerate() {
        let mut cum = 0;
        for i in 0..=PHASE_BUCKETS_US.len() {
            cum += cores
                .iter()
                .map(|m| m.phases.buckets[p][i].load(Relaxed))
                .sum::<u64>();
            let le = PHASE_BUCKETS_US
                .get(i)
                .map(|us| format!("{}", *us as f64 / 1e6))
                .unwrap_or_else(|| "+Inf".into());
            let _ = writeln!(out, "{name}_bucket{{phase=\"{phase}\",le=\"{le}\"}} {cum}");
        }
        let sum: u64 = cores.iter().map(|m| m.phases.sum_us[p].load(Relaxed)).sum();
        let _ = writeln!(out, "{name}_sum{{phase=\"{phase}\"}} {}", sum as f64 / 1e6);
        let _ = writeln!(out, "{name}_count{{phase=\"{phase}\"}} {cum}");
    }
}

/// Renders the per-function series.
pub fn render_functions<'a>(
    out: &mut String,
    fns: impl Iterator<Item = (&'a str, &'a FunctionMetrics)> + Clone,
) {
    let simple: [Series<FunctionMetrics>; 11] = [
        (
            "hearth_function_invocations_total",
            "counter",
            "Invocations received.",
            |m| m.invocations.load(Relaxed),
        ),
        (
            "hearth_function_cold_starts_total",
            "counter",
            "Invocations that waited for a new instance.",
            |m| m.cold_starts.load(Relaxed),
        ),
        (
            "hearth_function_instances_retired_total",
            "counter",
            "Instances removed: idle past keep-warm, over the fit, crashed, timed out or evicted.",
            |m| m.retired.load(Relaxed),
        ),
        (
            "hearth_function_instance_handovers_total",
            "counter",
            "Idle instances handed from one core to another.",
            |m| m.handovers.load(Relaxed),
        ),
        (
            "hearth_function_connections_moved_total",
            "counter",
            "Client connections moved to another core: to where the function's instances are (functions limited to fewer instances than cores), or with a spilled request.",
            |m| m.connections_moved.load(Relaxed),
        ),
        (
            "hearth_function_requests_spilled_total",
            "counter",
            "Queued requests sent, with their connections, to an idle instance on another core.",
            |m| m.requests_spilled.load(Relaxed),
        ),
        (
            "hearth_function_requests_sent_ahead_total",
            "counter",
            "Requests sent to a busy instance behind the one it runs, to start as soon as it answers (one at a time still).",
            |m| m.requests_sent_ahead.load(Relaxed),
        ),
        (
            "hearth_function_queue_depth",
            "gauge",
            "Requests waiting for an instance.",
            |m| m.queue_depth.load(Relaxed),
        ),
        (
            "hearth_function_instances",
            "gauge",
            "Live instances.",
            |m| m.instances.load(Relaxed),
        ),
        (
            "hearth_function_log_dropped_lines_total",
            "counter",
            "Output lines left out of the log by its rate and size limits.",
            |m| m.log_dropped_lines.load(Relaxed),
        ),
        (
            "hearth_function_log_dropped_bytes_total",
            "counter",
            "Output bytes left out of the log by its rate and size limits.",
            |m| m.log_dropped_bytes.load(Relaxed),
        ),
    ];
    for (name, kind, help, get) in simple {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (id, m) in fns.clone() {
            let _ = writeln!(out, "{name}{{function=\"{id}\"}} {}", get(m));
        }
    }
    let name = "hearth_function_errors_total";
    let _ = writeln!(
        out,
        "# HELP {name} Failed invocations by kind.\n# TYPE {name} counter"
    );
    for (id, m) in fns.clone() {
        for (i, kind) in ErrorKind::NAMES.iter().enumerate() {
            let _ = writeln!(
                out,
                "{name}{{function=\"{id}\",kind=\"{kind}\"}} {}",
                m.errors[i].load(Relaxed)
            );
        }
    }
    let name = "hearth_function_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Invocation time from dispatch to answer.\n# TYPE {name} histogram"
    );
    for (id, m) in fns {
        let mut cum = 0;
        for (i, b) in m.duration_buckets.iter().enumerate() {
            cum += b.load(Relaxed);
            let le = DURATION_BUCKETS_US
                .get(i)
                .map(|us| format!("{}", *us as f64 / 1e6))
                .unwrap_or_else(|| "+Inf".into());
            let _ = writeln!(out, "{name}_bucket{{function=\"{id}\",le=\"{le}\"}} {cum}");
        }
        let _ = writeln!(
            out,
            "{name}_sum{{function=\"{id}\"}} {}",
            m.duration_sum_us.load(Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count{{function=\"{id}\"}} {cum}");
    }
}
