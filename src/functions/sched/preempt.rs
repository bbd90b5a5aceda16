//! Whether the core's worker gives up wake-up preemption for a while
//! (`--worker-policy adaptive`), decided each tick from what the core's
//! instances did over the last one.
//!
//! Under the default policy a worker woken by a client's bytes or an
//! instance's answer takes the CPU from the instance running there at once:
//! that keeps an answer's latency short. When every request waits behind a
//! handler that runs longer than the gaps between its clients' requests, most
//! of those wake-ups only read a request that cannot run yet, and each costs
//! the instance its CPU, two switches and a colder cache (a Node instance was
//! counted preempted 1.6 times per Express request). As `SCHED_BATCH` the
//! worker waits until the instance blocks or its slice ends and then serves
//! everything that arrived in one turn. Measured always on
//! (`--worker-policy batch`, perf/RESULTS.md): Express 1.07–1.14× the
//! requests per second at 10–17 % less host CPU per request, the trivial
//! handler 0.94–1.00×, and about twice the p99 at half load, where an answer
//! waits behind whatever Node does after writing it. So the worker turns
//! batch only while the core is [`crowded`], and turns back the first tick it
//! is not. Against the default policy (2026-12-04): Express 1.16× on both
//! cores and 1.05× per core, the trivial handler never turns batch, and the
//! p99 at half load does not move; the closed-loop p99 per core grows by
//! about 40 %.

use std::time::Duration;

/// Requests a core must have sent its instances in a tick before it counts
/// as crowded: below that a tick says too little.
pub const CROWDED_SENT_MIN: u32 = 20;
/// Percent of the requests sent in a tick that must have waited in a queue.
/// At utilisation ρ about a fraction ρ of arrivals find the instances busy,
/// so anything below nearly all is a core with room, whose answers should not
/// wait for a slice to end.
pub const CROWDED_WAITED_PCT: u64 = 90;
/// Mean time from dispatch to answer a tick's requests must take. Shorter
/// handlers answer before the next client's bytes arrive, so there is little
/// to fold into one turn, and the batch policy measured 0.94–1.00× for the
/// trivial handler (~20–40 µs) against 1.07–1.14× for Express (~150–300 µs).
pub const CROWDED_RUN_MIN: Duration = Duration::from_micros(100);
/// Crowded ticks in a row before the worker turns batch: one busy tick (a
/// burst) does not change the policy.
pub const CROWDED_TICKS: u8 = 2;

/// What the core's instances did over one tick.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TickLoad {
    /// Requests sent to instances.
    pub sent: u32,
    /// Of those, requests that had waited in a queue.
    pub waited: u32,
    /// Requests answered.
    pub done: u32,
    /// Their time from dispatch to answer, summed.
    pub took: Duration,
}

/// Whether a tick with `load`, on a core `saturated` over it, leaves nothing
/// for the default policy to win: the CPU was all used, nearly every request
/// waited for an instance, and handlers ran long enough for clients' next
/// requests to arrive while they ran.
pub fn crowded(load: &TickLoad, saturated: bool) -> bool {
    saturated
        && load.sent >= CROWDED_SENT_MIN
        && u64::from(load.waited) * 100 >= u64::from(load.sent) * CROWDED_WAITED_PCT
        && load.done > 0
        && load.took / load.done >= CROWDED_RUN_MIN
}

/// A core's running count, and how many crowded ticks in a row it has seen.
#[derive(Debug, Default)]
pub struct Preempt {
    load: TickLoad,
    streak: u8,
}

impl Preempt {
    /// A request was sent to an instance; `waited`: it had been queued.
    pub fn sent(&mut self, waited: bool) {
        self.load.sent = self.load.sent.saturating_add(1);
        self.load.waited = self.load.waited.saturating_add(u32::from(waited));
    }

    /// An instance answered a request it had for `took`.
    pub fn done(&mut self, took: Duration) {
        self.load.done = self.load.done.saturating_add(1);
        self.load.took = self.load.took.saturating_add(took);
    }

    /// Ends a tick: decides from its load and starts counting the next.
    pub fn on_tick(&mut self, saturated: bool) {
        let load = std::mem::take(&mut self.load);
        self.streak = if crowded(&load, saturated) {
            self.streak.saturating_add(1)
        } else {
            0
        };
    }

    /// Whether the worker should run without wake-up preemption now.
    pub fn batch(&self) -> bool {
        self.streak >= CROWDED_TICKS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(sent: u32, waited: u32, took_us: u64) -> TickLoad {
        TickLoad {
            sent,
            waited,
            done: sent,
            took: Duration::from_micros(took_us * u64::from(sent)),
        }
    }

    #[test]
    fn a_slow_handler_with_every_request_queued_on_a_saturated_core_is_crowded() {
        assert!(crowded(&load(400, 400, 250), true));
        assert!(crowded(&load(400, 360, 100), true));
    }

    #[test]
    fn room_on_the_core_a_quick_handler_or_too_few_requests_is_not() {
        // The CPU had room.
        assert!(!crowded(&load(400, 400, 250), false));
        // Some requests found an idle instance: the core keeps up.
        assert!(!crowded(&load(400, 359, 250), true));
        // A quick handler.
        assert!(!crowded(&load(4000, 4000, 30), true));
        // Too few to judge, and nothing answered.
        assert!(!crowded(&load(19, 19, 5000), true));
        let none_done = TickLoad {
            done: 0,
            took: Duration::ZERO,
            ..load(50, 50, 0)
        };
        assert!(!crowded(&none_done, true));
    }

    #[test]
    fn the_worker_turns_batch_after_two_crowded_ticks_and_back_after_one_that_is_not() {
        let mut p = Preempt::default();
        let tick = |p: &mut Preempt, l: TickLoad, saturated: bool| {
            for i in 0..l.sent {
                p.sent(i < l.waited);
            }
            for _ in 0..l.done {
                p.done(l.took / l.done.max(1));
            }
            p.on_tick(saturated);
            p.batch()
        };
        assert!(!tick(&mut p, load(400, 400, 250), true));
        assert!(tick(&mut p, load(400, 400, 250), true));
        assert!(tick(&mut p, load(400, 400, 250), true));
        // One tick with room: back at once, and two more to turn again.
        assert!(!tick(&mut p, load(400, 400, 250), false));
        assert!(!tick(&mut p, load(400, 400, 250), true));
        assert!(tick(&mut p, load(400, 400, 250), true));
        // A quiet tick counts nothing left over from the one before.
        assert!(!tick(&mut p, TickLoad::default(), true));
    }
}
