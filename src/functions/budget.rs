//! Server-wide budgets: memory for instances, disk for functions.
//!
//! Each function's limits are checked at deploy, but a thousand functions of 10 GiB, each with
//! a standby, would outgrow any host. A [`Budget`] is one counter with a ceiling, shared by the
//! whole server; [`Budget::try_reserve`] takes an amount atomically or refuses it, and the
//! [`Reservation`] gives it back when dropped.
//!
//! - **Memory** (`--instance-memory-max-mb`, MiB): the `memory_mb` of every instance alive or
//!   starting, and of each standby the backend keeps. A deploy reserves its first instance
//!   (where the backend keeps it as a standby, the backend's own share replaces it); a
//!   scale-out reserves one instance ([`super::Function::try_reserve`]), released when the
//!   instance is retired. Standbys give theirs up when it is needed (see below).
//! - **Disk** (`--functions-disk-max-mb`, bytes): each function's unpacked code plus its
//!   backend artifacts, reserved at deploy and released when the function is deleted. What
//!   the backend may write (a VM's code image and snapshot, up to its guest memory) is
//!   reserved before it writes anything, then trimmed to what it wrote
//!   ([`Reservation::resize`]).
//!
//! Loaded functions are counted at start-up even beyond the ceiling (an operator may have
//! lowered it); nothing new fits until enough is released.
//!
//! Some of what a budget holds may be given up on demand (the process backend's standbys, a
//! cache of ready instances): its holder registers a [`Reclaim`] hook, which a reservation
//! that does not fit calls before it refuses.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Frees at least `needed` units of a budget if it can, by dropping reservations held only
/// as a cache; returns whether it freed anything. Called without any lock of the budget.
pub type Reclaim = Box<dyn Fn(u64) -> bool + Send + Sync>;

/// A ceiling on a quantity shared by the server, and how much of it is taken.
pub struct Budget {
    what: &'static str,
    unit: &'static str,
    max: u64,
    used: AtomicU64,
    reclaim: OnceLock<Reclaim>,
}

impl std::fmt::Debug for Budget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Budget")
            .field("what", &self.what)
            .field("max", &self.max)
            .field("used", &self.used())
            .finish()
    }
}

/// An amount taken from a [`Budget`], returned on drop.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<Budget>,
    amount: u64,
}

impl Budget {
    /// A budget of `max` units; `what` and `unit` name it in messages ("instance memory", "MiB").
    pub fn new(what: &'static str, unit: &'static str, max: u64) -> Arc<Budget> {
        Arc::new(Budget {
            what,
            unit,
            max,
            used: AtomicU64::new(0),
            reclaim: OnceLock::new(),
        })
    }

    /// Registers the hook that frees cached reservations when one does not fit (once; a
    /// second hook is ignored).
    pub fn set_reclaim(&self, reclaim: Reclaim) {
        let _ = self.reclaim.set(reclaim);
    }

    /// The ceiling.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// How much is taken now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    /// What is left (0 when over the ceiling).
    pub fn remaining(&self) -> u64 {
        self.max.saturating_sub(self.used())
    }

    /// Takes `amount` if it fits under the ceiling.
    pub fn try_reserve(self: &Arc<Self>, amount: u64) -> Option<Reservation> {
        self.try_take(amount).then(|| Reservation {
            budget: self.clone(),
            amount,
        })
    }

    /// Takes `amount` even beyond the ceiling (for what already exists at start-up).
    pub fn reserve_over(self: &Arc<Self>, amount: u64) -> Reservation {
        self.take_over(amount);
        Reservation {
            budget: self.clone(),
            amount,
        }
    }

    /// Takes `amount` if it fits; the caller must [`Budget::give`] it back exactly once.
    /// For counts that already have an owner (a function's instance count); others use
    /// [`Budget::try_reserve`].
    /// When it does not fit, the [`Reclaim`] hook (if any) frees what it can first.
    pub fn try_take(&self, amount: u64) -> bool {
        loop {
            let taken = self
                .used
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                    used.checked_add(amount).filter(|&n| n <= self.max)
                })
                .is_ok();
            if taken {
                return true;
            }
            let needed = self.used().saturating_add(amount).saturating_sub(self.max);
            match self.reclaim.get() {
                // Each round frees something, and what there is to free is finite.
                Some(reclaim) if amount <= self.max && reclaim(needed) => continue,
                _ => return false,
            }
        }
    }

    /// [`Budget::try_take`] even beyond the ceiling (for what already exists at start-up).
    pub fn take_over(&self, amount: u64) {
        self.used.fetch_add(amount, Ordering::AcqRel);
    }

    /// Returns what [`Budget::try_take`] took.
    pub fn give(&self, amount: u64) {
        let prev = self.used.fetch_sub(amount, Ordering::AcqRel);
        assert!(
            prev >= amount,
            "{} budget went below zero ({prev} - {amount})",
            self.what
        );
    }

    /// "instance memory budget: 300 of 300 MiB in use, 128 more needed" and the like.
    pub fn explain(&self, needed: u64) -> String {
        format!(
            "the server's {} budget is exhausted: {} of {} {} in use, {needed} more needed",
            self.what,
            self.used(),
            self.max,
            self.unit
        )
    }
}

impl crate::sandbox::MemoryBudget for Budget {
    fn try_take(&self, mb: u64) -> bool {
        Budget::try_take(self, mb)
    }
    fn give(&self, mb: u64) {
        Budget::give(self, mb)
    }
    fn set_reclaim(&self, reclaim: Reclaim) {
        Budget::set_reclaim(self, reclaim)
    }
}

impl Reservation {
    /// How much this reservation holds.
    pub fn amount(&self) -> u64 {
        self.amount
    }

    /// Makes the reservation hold `amount`: less always works (the rest is given back),
    /// more only if the difference fits ([`Budget::try_take`]); otherwise nothing changes
    /// and it returns false.
    pub fn resize(&mut self, amount: u64) -> bool {
        if amount <= self.amount {
            self.budget.give(self.amount - amount);
        } else if !self.budget.try_take(amount - self.amount) {
            return false;
        }
        self.amount = amount;
        true
    }

    /// The budget it is taken from.
    pub fn budget(&self) -> &Budget {
        &self.budget
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give(self.amount);
    }
}

/// Default memory budget: 75 % of the host's RAM (MemTotal), in MiB; 4 GiB if unknown.
pub fn default_instance_memory_max_mb() -> u64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    match total_kib {
        Some(kib) => kib / 1024 * 3 / 4,
        None => 4096,
    }
}

/// Default disk budget for functions: 20 GiB, in MiB.
pub const FUNCTIONS_DISK_MAX_MB_DEFAULT: u64 = 20 * 1024;

/// Bytes a file or directory tree occupies on disk (allocated blocks, so a sparse VM memory
/// file counts what it really holds); unreadable entries count 0.
pub fn disk_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut total = 0u64;
    let mut todo = vec![path.to_path_buf()];
    while let Some(p) = todo.pop() {
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        total = total.saturating_add(m.blocks().saturating_mul(512));
        if m.is_dir() {
            if let Ok(entries) = std::fs::read_dir(&p) {
                todo.extend(entries.flatten().map(|e| e.path()));
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_fit_under_the_ceiling_and_return_on_drop() {
        let b = Budget::new("instance memory", "MiB", 300);
        let a = b.try_reserve(128).expect("fits");
        let c = b.try_reserve(128).expect("fits");
        assert_eq!(b.used(), 256);
        assert!(b.try_reserve(128).is_none(), "384 > 300");
        assert_eq!(b.used(), 256, "a refused reservation takes nothing");
        assert!(b.try_reserve(44).is_some_and(|r| r.amount() == 44));
        drop(a);
        assert_eq!(b.used(), 128);
        assert!(b.try_reserve(128).is_some());
        drop(c);
        assert_eq!(b.used(), 0);
        assert!(b
            .explain(128)
            .contains("0 of 300 MiB in use, 128 more needed"));
    }

    #[test]
    fn forced_reservations_count_and_block_new_ones() {
        let b = Budget::new("disk", "bytes", 100);
        let old = b.reserve_over(150);
        assert_eq!(b.remaining(), 0);
        assert!(!b.try_take(1));
        drop(old);
        assert!(b.try_take(100));
        b.give(100);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_ceiling() {
        let b = Budget::new("instance memory", "MiB", 1000);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let b = b.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for _ in 0..1000 {
                        if let Some(r) = b.try_reserve(7) {
                            assert!(b.used() <= 1000);
                            held.push(r);
                        }
                        if held.len() > 10 {
                            held.clear();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_reservation_that_does_not_fit_reclaims_cached_ones_first() {
        let b = Budget::new("instance memory", "MiB", 300);
        let cache: Arc<std::sync::Mutex<Vec<Reservation>>> = Default::default();
        for _ in 0..2 {
            let r = b.try_reserve(128).unwrap();
            cache.lock().unwrap().push(r);
        }
        let c = cache.clone();
        b.set_reclaim(Box::new(move |needed| {
            assert!(needed > 0);
            c.lock().unwrap().pop().is_some()
        }));
        let mine = b
            .try_reserve(128)
            .expect("a cached reservation is given up");
        assert_eq!(cache.lock().unwrap().len(), 1, "one was enough");
        assert_eq!(b.used(), 256);
        let more = b.try_reserve(172).expect("the last cached one goes too");
        assert!(cache.lock().unwrap().is_empty());
        assert_eq!(b.used(), 300);
        assert!(b.try_reserve(1).is_none(), "nothing left to reclaim");
        assert!(
            b.try_reserve(400).is_none(),
            "never fits: nothing is reclaimed for it"
        );
        drop((mine, more));
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn a_reservation_shrinks_always_and_grows_only_within_the_ceiling() {
        let b = Budget::new("functions disk", "bytes", 1000);
        let mut r = b.try_reserve(900).unwrap();
        assert!(r.resize(300));
        assert_eq!((r.amount(), b.used()), (300, 300));
        let other = b.try_reserve(600).unwrap();
        assert!(!r.resize(500), "200 more do not fit beside 600");
        assert_eq!((r.amount(), b.used()), (300, 900));
        assert!(r.resize(400));
        assert_eq!(b.used(), 1000);
        drop((r, other));
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn the_default_memory_budget_is_most_of_the_ram() {
        let mb = default_instance_memory_max_mb();
        assert!(mb >= 64, "{mb}");
    }
}
