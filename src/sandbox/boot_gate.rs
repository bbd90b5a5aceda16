//! One template VM boots at a time (each is CPU-heavy, above all under
//! emulation), but none holds the others back for long: a pass through the
//! gate lapses after a fixed time even if its holder has not given it back.
//! A template's boot is hearth's code (kernel and agent); what comes after,
//! the handler's init, is the function's, and may hang until its deadline.
//! Where the end of the boot cannot be seen (QEMU's channel socket exists
//! before the guest runs), the lapse bounds how long one function's deploy
//! delays another's.

use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// See the module documentation.
pub struct BootGate {
    /// The pass in use: its number and when it lapses.
    held: Mutex<Option<(u64, Instant)>>,
    /// Signalled when a pass is given back.
    freed: Condvar,
    /// How long a pass lasts at most.
    hold_max: Duration,
}

/// Held while a template boots; given back on drop (or lapsed before).
pub struct BootPass<'a> {
    gate: &'a BootGate,
    number: u64,
}

impl BootGate {
    pub fn new(hold_max: Duration) -> BootGate {
        BootGate {
            held: Mutex::new(None),
            freed: Condvar::new(),
            hold_max,
        }
    }

    /// Waits until no other pass is held (or it has lapsed), and takes one.
    pub fn enter(&self) -> BootPass<'_> {
        let mut held = self.held.lock().unwrap();
        loop {
            let now = Instant::now();
            match *held {
                Some((_, lapses)) if now < lapses => {
                    held = self.freed.wait_timeout(held, lapses - now).unwrap().0;
                }
                Some((number, _)) => {
                    *held = Some((number + 1, now + self.hold_max));
                    return BootPass {
                        gate: self,
                        number: number + 1,
                    };
                }
                None => {
                    *held = Some((0, now + self.hold_max));
                    return BootPass {
                        gate: self,
                        number: 0,
                    };
                }
            }
        }
    }
}

impl Drop for BootPass<'_> {
    fn drop(&mut self) {
        let mut held = self.gate.held.lock().unwrap();
        if held.is_some_and(|(number, _)| number == self.number) {
            *held = None;
            self.gate.freed.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pass_given_back_lets_the_next_in_at_once() {
        let gate = BootGate::new(Duration::from_secs(60));
        drop(gate.enter());
        let t = Instant::now();
        drop(gate.enter());
        assert!(t.elapsed() < Duration::from_secs(1));
    }

    #[test]
    fn a_pass_kept_too_long_lapses() {
        let gate = BootGate::new(Duration::from_millis(200));
        // Read before the pass is taken: the pass lapses 200 ms after its
        // own clock reading, which is no earlier than this one.
        let t = Instant::now();
        let kept = gate.enter();
        let next = gate.enter();
        let waited = t.elapsed();
        assert!(waited >= Duration::from_millis(200), "{waited:?}");
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        // The lapsed pass given back late frees nothing of the next one's.
        drop(kept);
        assert!(gate.held.lock().unwrap().is_some());
        drop(next);
        assert!(gate.held.lock().unwrap().is_none());
    }
}
