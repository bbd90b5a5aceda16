//! Cross-core hand-over: a core whose function is at its concurrency limit
//! and still has requests waiting marks itself starved on the function; a
//! core holding an idle instance of it detaches the instance's channel and
//! hands the instance over, so instances spread evenly over the cores that
//! want them.

use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use super::{Action, CorePool, Inst, InstId};
use crate::functions::Function;
use crate::sandbox::Instance;

/// An instance leaving this core: its function, its handle, the core it goes to.
pub(super) type Moving = (Arc<Function>, Box<dyn Instance>, usize);

/// An idle instance moving between cores, with its channel and unread bytes.
pub struct Migrated {
    function: Arc<Function>,
    handle: Box<dyn Instance>,
    channel: OwnedFd,
    leftover: Vec<u8>,
}

/// The first core after `me` (cyclically) whose bit is set in `mask`.
pub(super) fn next_core(mask: u64, me: usize) -> usize {
    debug_assert!(mask != 0);
    let rotated = mask.rotate_right((me as u32 + 1) % 64);
    (rotated.trailing_zeros() as usize + me + 1) % 64
}

impl CorePool {
    /// The core an instance of `id` that just became free should go to: one
    /// where `id` is starved, if this core holds more than its even share of
    /// the function's instances or has nothing queued for it. Clears that
    /// core's starved bit (it gets this one).
    pub(super) fn hand_over_to(&self, id: &str) -> Option<usize> {
        let fs = self.fns.get(id)?;
        let core = self.cfg.core;
        let starved = fs.f.starved.load(Relaxed) & !(1u64 << core);
        if starved == 0 {
            return None;
        }
        let share = (fs.f.spec.concurrency as usize / (1 + starved.count_ones() as usize)).max(1);
        if !fs.queue.is_empty() && fs.live <= share {
            return None;
        }
        let target = next_core(starved, core);
        fs.f.starved.fetch_and(!(1u64 << target), Relaxed);
        Some(target)
    }

    /// Starts moving idle instance `i` to `target`: its channel is detached
    /// from this core's loop first (see [`CorePool::on_detached`]).
    pub(super) fn migrate(&mut self, i: usize, target: usize) {
        let inst = self.insts.remove(i);
        if let Some(fs) = self.fns.get_mut(&inst.function.spec.id) {
            fs.idle.retain(|&k| k != i);
            fs.live -= 1;
        }
        self.actions.push_back(Action::Detach(inst.id));
        self.migrating
            .insert(inst.id, (inst.function, inst.handle, target));
    }

    /// A migrating instance's channel is free: send the instance to its new core.
    pub(super) fn detached(&mut self, inst: InstId, channel: OwnedFd, leftover: Vec<u8>) {
        let Some((function, handle, core)) = self.migrating.remove(&inst) else {
            return;
        };
        let instance = Migrated {
            function,
            handle,
            channel,
            leftover,
        };
        self.actions.push_back(Action::HandOver { core, instance });
    }

    /// Takes over an instance from another core.
    pub(super) fn migrated_in(&mut self, m: Migrated, now: Instant) {
        let Migrated {
            function: f,
            mut handle,
            channel,
            leftover,
        } = m;
        let id = f.spec.id.clone();
        if !self.fns.contains_key(&id) || f.deleted.load(Relaxed) {
            handle.kill();
            f.metrics.instances.fetch_sub(1, Relaxed);
            f.release();
            self.actions.push_back(Action::Destroy(handle));
            return;
        }
        handle.repin(self.cfg.core);
        let inst_id = self.next_id();
        self.actions.push_back(Action::Attach {
            inst: inst_id,
            channel,
            leftover,
        });
        let inst = Inst::new(inst_id, f, handle, now);
        let i = self.adopt(inst, now);
        self.next_for(i, now);
        self.grow(&id, now);
    }
}
