//! Waiting for an instance's answer by yielding the CPU instead of sleeping.
//!
//! A worker shares its CPU with the instances it owns (they are pinned to it,
//! but for a Node function with concurrency 1, whose main thread is pinned to
//! the next CPU: `SchedConfig::instance_cpus`; its answers come sooner for the
//! spin).
//! When it has handed a request to one of them and has nothing else to do, the
//! answer comes from a process that can only run once the worker lets go of
//! the CPU. Sleeping in the kernel lets go, but then every event meant for the
//! worker has to wake it: the instance's answer, and, the costly part, each
//! client's next request arriving from another CPU (a cross-CPU wake-up, an
//! interrupt on a virtual machine). A worker that yields instead stays
//! runnable: the instance runs, the kernel queues what arrives meanwhile
//! without waking anyone, and the worker picks it all up in its next turn.
//!
//! Yielding only helps while something else wants the CPU. When a yield comes
//! back at once (the instance waits on I/O of its own, or the scheduler will
//! not run it yet), the worker would only burn cycles, so after a few such
//! yields in a row, or once the bound has passed, it goes to sleep as before.
//! Measured in `perf/RESULTS.md` ("a worker that yields while its instance
//! runs"); `serve --spin-wait-us 0` turns it off.

use std::time::{Duration, Instant};

/// A yield shorter than this ran nobody else: the CPU had nothing to give.
const EMPTY_YIELD: Duration = Duration::from_micros(3);
/// Empty yields in a row after which the worker sleeps instead.
const EMPTY_YIELDS_MAX: u32 = 3;

/// How long a worker may keep yielding before it sleeps (see the module).
#[derive(Clone, Copy, Debug)]
pub struct SpinWait {
    max: Duration,
}

impl SpinWait {
    /// At most `max` of yielding per wait; zero: never yield, always sleep.
    pub fn new(max: Duration) -> SpinWait {
        SpinWait { max }
    }

    /// Whether it never yields (`--spin-wait-us 0`).
    pub fn is_off(&self) -> bool {
        self.max.is_zero()
    }

    /// Yields the CPU until `ready` says there is something to do (true), or
    /// until yielding stops paying: [`EMPTY_YIELDS_MAX`] empty yields in a
    /// row, or `max` since the first look (false).
    pub fn wait(&self, mut ready: impl FnMut() -> bool) -> bool {
        if self.max.is_zero() {
            return false;
        }
        let start = Instant::now();
        let mut empty = 0;
        loop {
            if ready() {
                return true;
            }
            let before = Instant::now();
            if before - start >= self.max {
                return false;
            }
            // SAFETY: sched_yield takes no arguments and cannot fail on Linux.
            unsafe { libc::sched_yield() };
            if before.elapsed() < EMPTY_YIELD {
                empty += 1;
                if empty >= EMPTY_YIELDS_MAX {
                    return false;
                }
            } else {
                empty = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_bound_never_looks() {
        let mut looks = 0;
        assert!(!SpinWait::new(Duration::ZERO).wait(|| {
            looks += 1;
            true
        }));
        assert_eq!(looks, 0);
    }

    #[test]
    fn it_returns_as_soon_as_there_is_work() {
        let mut looks = 0;
        let ready = SpinWait::new(Duration::from_secs(1)).wait(|| {
            looks += 1;
            looks == 2
        });
        assert!(ready);
        assert_eq!(looks, 2);
    }

    #[test]
    fn it_gives_up_within_the_bound_when_nothing_comes() {
        // Whether yields here come back at once (an idle CPU: three empty
        // yields end it) or late (other tests' threads ran), the wait ends by
        // the bound, plus one yield's worth of lateness.
        let bound = Duration::from_millis(2);
        let start = Instant::now();
        assert!(!SpinWait::new(bound).wait(|| false));
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "{:?}",
            start.elapsed()
        );
    }
}
