//! When a function scales out or in on a core, as pure functions of a small
//! view of the function and the core, and the fit estimate they use: how many
//! instances of a function keep one core busy.
//!
//! On a saturated core the fit is a cap on how many of a function's requests
//! run at once there ([`run_cap`]); instances beyond it stay idle and go
//! once they have been idle for [`SCALE_IN_IDLE`]. The estimate moves from
//! tick to tick under contention; as a cap that costs nothing, where retiring
//! and restarting instances after each move cost an initialisation each
//! (measured: 6 starts per 5 s of open load at half the bare server's rate,
//! p99 in the seconds).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{CorePool, FnState, SCALE_UP_WAIT, SCALE_UP_WAIT_MAX};
use crate::config::TICK;

/// Busy instance time a function needs in one tick before its fit is re-estimated.
pub const FIT_SAMPLE_MIN: Duration = Duration::from_millis(10);
/// Upper bound of an estimated fit (instances that keep one core busy).
pub const FIT_MAX: usize = 1024;
/// How long an instance beyond its function's fit stays idle on a saturated
/// core before it is retired: long enough that a fit estimate moving by one
/// for a tick or two finds the instance still there.
pub const SCALE_IN_IDLE: Duration = Duration::from_secs(1);

/// What the scale-out decision looks at in a function on one core.
#[derive(Clone, Copy, Debug)]
pub struct FnView {
    /// Requests queued.
    pub queued: usize,
    /// Instances being started.
    pub starting: usize,
    /// Instances ready (idle or busy).
    pub live: usize,
    /// Of those, idle ones.
    pub idle: usize,
    /// How long the first queued request has waited for load (not for a
    /// start): zero while an instance is starting.
    pub head_wait: Duration,
    /// The fit scale-out goes by, if measured: on a core at least
    /// [`FIT_BAND_BUSY_PCT`] busy the lowest of the last [`FIT_BAND`], else
    /// the latest.
    pub fit: Option<usize>,
    /// How many of its requests may run at once on a saturated core (the fit
    /// without the worker's time, see `FnState::run_fit`), if measured.
    pub run_fit: Option<usize>,
}

impl FnView {
    /// The view of `fs` at `now`, on a core `cpu_busy_pct` busy last tick.
    pub(super) fn of(fs: &FnState, now: Instant, cpu_busy_pct: u64) -> FnView {
        let head_wait = match fs.queue.front() {
            // Waits while an instance is starting say nothing about load, nor
            // do waits from before an instance last became ready.
            Some(p) if fs.starting == 0 => {
                now.saturating_duration_since(p.arrived.max(fs.live_since))
            }
            _ => Duration::ZERO,
        };
        FnView {
            queued: fs.queue.len(),
            starting: fs.starting,
            live: fs.live,
            idle: fs.idle.len(),
            head_wait,
            fit: if cpu_busy_pct >= FIT_BAND_BUSY_PCT {
                fs.fit_low()
            } else {
                fs.fit
            },
            run_fit: fs.run_fit,
        }
    }
}

/// How far back the lowest fit is taken for scaling out. Under contention the
/// estimate of a quick handler moves from tick to tick (measured: 2 to 5 for
/// the trivial handler at 80 % of two cores): instances beyond a dip were
/// retired and started again at the next rise, an initialisation each (a
/// Node start takes 100+ ms of the core's CPU; the open-loop p99 went from
/// ~2 ms to 200-600 ms in the runs with starts). With the lowest fit of a
/// few seconds the instance count settles instead.
pub const FIT_BAND: Duration = Duration::from_secs(3);
/// CPU use of a core (percent of the last tick) from which scale-out goes by
/// the lowest fit of the [`FIT_BAND`]. Below it a start costs little (the
/// core has CPU to spare) and the latest fit counts, so one low sample (a
/// CPU-heavy request of a handler that mostly waits) does not hold the
/// function back for seconds. The starts traced under churn came at 71-100 %.
pub const FIT_BAND_BUSY_PCT: u64 = 50;

/// Whether to start one more instance for the queued requests not covered by
/// one starting. Never while an instance idles: requests queue beside one only
/// when the fit holds them back ([`run_cap`]), and another instance would
/// be held back too. Otherwise scale out when nothing runs yet, or the queue
/// is full (`queue_depth_max`), or the first request waited:
/// - with the fit known, [`SCALE_UP_WAIT`] while the function has fewer
///   instances than its fit (on a busy core the lowest of the last
///   [`FIT_BAND`], see [`FnView::fit`]; on a saturated core no more than
///   may run there at once, [`FnView::run_fit`]), whatever the core's load: at its fit the
///   instances keep the core busy, and another would only take CPU from them
///   (on a loaded core a start also costs an initialisation that the requests
///   wait behind; measured with open load near the core's capacity, starting
///   whenever the core dipped below saturation gave six starts per five
///   seconds and a p99 in the seconds);
/// - before it is known, [`SCALE_UP_WAIT`] while the core has CPU to spare, or
///   [`SCALE_UP_WAIT_MAX`] regardless.
pub fn scale_out(f: &FnView, saturated: bool, queue_depth_max: usize) -> bool {
    let uncovered = f.queued.saturating_sub(f.starting);
    if uncovered == 0 || f.idle > 0 {
        return false;
    }
    if f.live + f.starting == 0 || uncovered >= queue_depth_max {
        return true;
    }
    let fit = match (f.fit, f.run_fit) {
        (Some(fit), Some(run)) if saturated => Some(fit.min(run)),
        (fit, _) => fit,
    };
    match fit {
        Some(fit) => f.live + f.starting < fit && f.head_wait >= SCALE_UP_WAIT,
        None => f.head_wait >= SCALE_UP_WAIT_MAX || (f.head_wait >= SCALE_UP_WAIT && !saturated),
    }
}

/// How many of a function's requests may run at once on this core: no cap on
/// an unsaturated core or before its fit is known; on a saturated core its
/// fit (at least one), since more CPU-bound work at once only adds
/// contention (measured: ten instances on two busy cores serve 1.3-1.6x less
/// than two).
pub fn run_cap(fit: Option<usize>, saturated: bool) -> Option<usize> {
    fit.filter(|_| saturated).map(|fit| fit.max(1))
}

/// Instances beyond the fit to scale in: only on a saturated core, where
/// they add contention; an unsaturated core keeps them.
pub fn excess_over_fit(live: usize, fit: Option<usize>, saturated: bool) -> usize {
    match fit {
        Some(fit) if saturated => live.saturating_sub(fit.max(1)),
        _ => 0,
    }
}

/// The fit from one tick of a function's instances: `run_ns` and `wait_ns`
/// their time on a CPU and waiting for one, `busy` their wall time serving
/// requests, `host_ns` the part of that wall time the core spent in its own
/// worker ([`host_share`]). `busy - wait - host` is what a request would take
/// without contention, `run / (busy - wait - host)` the share of it that needs
/// this CPU, so about `(busy - wait - host) / run` instances keep the core
/// busy: 1 for a CPU-bound handler, many for one that mostly waits on I/O.
/// Contention makes the estimate high, so it converges from above as surplus
/// instances go. `None` below [`FIT_SAMPLE_MIN`] of busy time: too little to
/// learn from.
///
/// Two estimates come from it each tick. With `host` 0, the time an instance
/// sits with its answer written while the worker on its CPU reads it and
/// serves the next client counts as room for another instance: that fit sets
/// how many instances a function keeps, so a spare can take a burst while the
/// core has CPU to spare. With `host`, it is the run fit: how many requests
/// may run at once on a saturated core, and how far the function scales out
/// there. A quick handler on a saturated core measured `(100 - 5) / 66` ms
/// per tick with one instance (1.44, rounded to 1, a hair from 2) and `(200 -
/// 71) / 64` with two (2.0), and with one estimate stayed wherever it started;
/// two instances of the trivial handler running on one core served 0.71× what
/// one did (`perf/RESULTS.md`, "the fit counted the worker's time").
pub fn fit_estimate(run_ns: u64, wait_ns: u64, busy: Duration, host_ns: u64) -> Option<usize> {
    if busy < FIT_SAMPLE_MIN {
        return None;
    }
    let busy_ns = busy.as_nanos() as u64;
    let alone = busy_ns
        .saturating_sub(wait_ns)
        .saturating_sub(host_ns)
        .max(run_ns)
        .max(1);
    // No CPU at all in that much busy time: it only waits.
    Some(if run_ns == 0 {
        FIT_MAX
    } else {
        ((alone as f64 / run_ns as f64).round() as usize).clamp(1, FIT_MAX)
    })
}

/// The part of a function's busy time `busy` (summed over its instances, in
/// a tick `tick` long) that the core's worker spent running (`worker` over the
/// tick): the worker's time in proportion to how many of the function's
/// instances were busy on average. While the worker runs on the CPU it shares
/// with them, they are not running; those that wait to run count it as
/// waiting, and those that wait for the worker (their answer not yet read,
/// their next request not yet written) would count it as room for more.
pub fn host_share(worker: Duration, busy: Duration, tick: Duration) -> u64 {
    if tick.is_zero() {
        return 0;
    }
    let share = worker.as_nanos() * busy.as_nanos() / tick.as_nanos();
    u64::try_from(share).unwrap_or(u64::MAX)
}

impl CorePool {
    /// Re-estimates each function's fit from its instances' scheduler time
    /// over the last tick and, on a saturated core, scales in functions that
    /// run here with more instances than their fit: the longest idle first,
    /// once idle for [`SCALE_IN_IDLE`] (busy ones are left to finish; the fit
    /// keeps them from taking more work). Then, where the fit has room again,
    /// idle instances take queued requests.
    pub(super) fn fit_instances(&mut self, now: Instant) {
        let mut per_fn: HashMap<String, (u64, u64, Duration)> = HashMap::new();
        for (_, inst) in self.insts.iter_mut() {
            // Idle for the whole tick: nothing to learn, keep the old mark.
            if inst.busy.is_none()
                && now.saturating_duration_since(inst.idle_since) >= TICK
                && inst.mark.is_some()
            {
                continue;
            }
            let Some(st) = inst.handle.sched_time() else {
                continue;
            };
            let busy = inst.busy_until(now);
            if let Some((prev, prev_busy)) = inst.mark {
                let e =
                    per_fn
                        .entry(inst.function.spec.id.clone())
                        .or_insert((0, 0, Duration::ZERO));
                e.0 += st.run_ns.saturating_sub(prev.run_ns);
                e.1 += st.wait_ns.saturating_sub(prev.wait_ns);
                e.2 += busy.saturating_sub(prev_busy);
            }
            inst.mark = Some((st, busy));
        }
        let saturated = self.saturated();
        let mut retire = Vec::new();
        for (id, fs) in self.fns.iter_mut() {
            if let Some(&(run, wait, busy)) = per_fn.get(id) {
                let host = host_share(self.worker_cpu, busy, self.tick_len);
                if let Some(sample) = fit_estimate(run, wait, busy, 0) {
                    // A rise counts once two ticks in a row show it: one
                    // tick's sample jumps (measured: 1 -> 24..78) when the
                    // instances waited on the host for that tick.
                    let rise_seen = fs.fit_sample.unwrap_or(sample);
                    let fit = sample.min(rise_seen.max(fs.fit.unwrap_or(sample)));
                    fs.fit = Some(fit);
                    fs.fit_sample = Some(sample);
                    fs.run_fit = fit_estimate(run, wait, busy, host).map(|r| r.min(fit));
                    fs.note_fit(fit, now);
                }
            }
            // Only a function running here contends; an idle one's instances
            // wait for keep-warm.
            let running = fs.live > fs.idle.len();
            let excess = excess_over_fit(fs.live, fs.fit_high(), saturated && running);
            let idle_long = |&i: &usize| {
                now.saturating_duration_since(self.insts[i].idle_since) >= SCALE_IN_IDLE
            };
            let n = fs
                .idle
                .iter()
                .take(excess)
                .take_while(|i| idle_long(i))
                .count();
            retire.extend(fs.unpark_oldest(n));
        }
        let mut heirs = Vec::new();
        for i in retire {
            heirs.extend(self.retire(i, now));
        }
        for heir in heirs {
            self.take_over(Some(heir), now);
        }
        let held: Vec<String> = self
            .fns
            .iter()
            .filter(|(_, fs)| !fs.queue.is_empty() && !fs.idle.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        for id in held {
            self.fill(&id, now);
        }
    }
}
