//! When a function scales out or in on a core, as pure functions of a small
//! view of the function and the core, and the fit estimate they use: how many
//! instances of a function keep one core busy.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{CorePool, FnState, SCALE_UP_WAIT, SCALE_UP_WAIT_MAX};
use crate::config::TICK;

/// Busy instance time a function needs in one tick before its fit is re-estimated.
pub const FIT_SAMPLE_MIN: Duration = Duration::from_millis(10);
/// Upper bound of an estimated fit (instances that keep one core busy).
pub const FIT_MAX: usize = 1024;

/// What the scale-out decision looks at in a function on one core.
#[derive(Clone, Copy, Debug)]
pub struct FnView {
    /// Requests queued.
    pub queued: usize,
    /// Instances being started.
    pub starting: usize,
    /// Instances ready (idle or busy).
    pub live: usize,
    /// How long the first queued request has waited for load (not for a
    /// start): zero while an instance is starting.
    pub head_wait: Duration,
    /// The estimated fit, if measured.
    pub fit: Option<usize>,
}

impl FnView {
    /// The view of `fs` at `now`.
    pub(super) fn of(fs: &FnState, now: Instant) -> FnView {
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
            head_wait,
            fit: fs.fit,
        }
    }
}

/// Whether to start one more instance for the queued requests not covered by
/// one starting. Scale out when the wait is worth an instance: nothing runs
/// yet; the queue is full (`queue_depth_max`); the first request waited
/// [`SCALE_UP_WAIT`] while the core has CPU to spare or the function has fewer
/// instances than its fit; or it waited [`SCALE_UP_WAIT_MAX`], unless the core
/// is saturated and the function is at its fit. On a saturated core another
/// CPU-bound instance only adds contention (measured: ten on two busy cores
/// serve 1.3-1.6x less than two).
pub fn scale_out(f: &FnView, saturated: bool, queue_depth_max: usize) -> bool {
    let uncovered = f.queued.saturating_sub(f.starting);
    if uncovered == 0 {
        return false;
    }
    let nothing_running = f.live + f.starting == 0;
    let full = uncovered >= queue_depth_max;
    let below_fit = f.fit.is_some_and(|fit| f.live + f.starting < fit);
    let at_fit = saturated && f.fit.is_some() && !below_fit;
    nothing_running
        || full
        || (f.head_wait >= SCALE_UP_WAIT_MAX && !at_fit)
        || (f.head_wait >= SCALE_UP_WAIT && (!saturated || below_fit))
}

/// Instances beyond the fit to scale in: only on a saturated core, where
/// they add contention; an unsaturated core keeps them.
pub fn excess_over_fit(live: usize, fit: Option<usize>, saturated: bool) -> usize {
    match fit {
        Some(fit) if saturated => live.saturating_sub(fit),
        _ => 0,
    }
}

/// The fit from one tick of a function's instances: `run_ns` and `wait_ns`
/// their time on a CPU and waiting for one, `busy` their wall time serving
/// requests. `busy - wait` is what a request would take without contention,
/// `run / (busy - wait)` the share of it that needs this CPU, so about
/// `(busy - wait) / run` instances keep the core busy: 1 for a CPU-bound
/// handler, many for one that mostly waits on I/O. Contention makes the
/// estimate high (the relay through the host counts as waiting), so it
/// converges from above as surplus instances go. `None` below
/// [`FIT_SAMPLE_MIN`] of busy time: too little to learn from.
pub fn fit_estimate(run_ns: u64, wait_ns: u64, busy: Duration) -> Option<usize> {
    if busy < FIT_SAMPLE_MIN {
        return None;
    }
    let busy_ns = busy.as_nanos() as u64;
    let alone = busy_ns.saturating_sub(wait_ns).max(run_ns).max(1);
    // No CPU at all in that much busy time: it only waits.
    Some(if run_ns == 0 {
        FIT_MAX
    } else {
        ((alone as f64 / run_ns as f64).round() as usize).clamp(1, FIT_MAX)
    })
}

impl FnState {
    /// Whether an instance that just finished a request should be retired
    /// (scale in: the core is saturated and the function has more instances
    /// here than its fit, see [`CorePool::fit_instances`]); never below the
    /// fit, nor below one.
    pub(super) fn take_shrink(&mut self) -> bool {
        if self.shrink > 0 && self.live > self.fit.unwrap_or(1).max(1) {
            self.shrink -= 1;
            return true;
        }
        self.shrink = 0;
        false
    }
}

impl CorePool {
    /// Re-estimates each function's fit from its instances' scheduler time
    /// over the last tick and, on a saturated core, scales in functions that
    /// have more instances here than their fit: idle ones now (the longest
    /// idle first), busy ones when they finish.
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
                if let Some(fit) = fit_estimate(run, wait, busy) {
                    fs.fit = Some(fit);
                }
            }
            let mut excess = excess_over_fit(fs.live, fs.fit, saturated);
            while excess > 0 && !fs.idle.is_empty() {
                retire.push(fs.idle.remove(0));
                excess -= 1;
            }
            fs.shrink = excess;
        }
        for i in retire {
            self.retire(i, now);
        }
    }
}
