//! Cross-core hand-over: a core whose function is at its concurrency limit
//! and still has requests waiting marks itself starved on the function, with
//! the arrival time of its oldest waiting request; a core holding an idle
//! instance of it detaches the instance's channel and hands the instance over,
//! so instances spread evenly over the cores that want them. An instance that
//! cannot reach its core (that core's loop has ended) comes back and serves
//! on the core it left ([`CorePool::on_hand_over_failed`]).
//!
//! A core that holds all of a function's instances (a function limited to one
//! concurrent execution, typically) also gives one up while it still has
//! requests queued, once a starved core's oldest request has waited
//! [`HAND_OVER_SLACK`] longer than its own oldest: requests are served in
//! about their global arrival order, in turns of about the slack per core,
//! rather than the holding core serving its own clients for as long as they
//! keep its queue non-empty (a closed-loop load never lets it empty: measured,
//! the other core's requests waited 100+ ms).

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use std::collections::VecDeque;

use rustc_hash::FxHashMap;

use super::{Action, CorePool, Inst, InstId, Pending, Queued, ServiceInvoke, RELOCATIONS_MAX};
use crate::functions::Function;
use crate::http::reply::ReplyTo;
use crate::metrics::add;
use crate::sandbox::{Endpoint, Instance};

/// How much longer than this core's oldest waiting request a starved core's
/// must have waited before this core, holding all of the function's
/// instances, hands one over with requests of its own still queued. Each turn
/// costs one hand-over (a detach, a message to the other core, an attach);
/// the slack bounds how far service strays from arrival order.
pub const HAND_OVER_SLACK: Duration = Duration::from_millis(5);

/// `t` as nanoseconds on a scale every core shares (for [`Function::starved_since`]).
pub(super) fn stamp(t: Instant) -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    // An hour before first use, so that times a little earlier (a test's
    // simulated clock starts before its first stamp) still map in order.
    let epoch = EPOCH.get_or_init(|| {
        let now = Instant::now();
        now.checked_sub(Duration::from_secs(3600)).unwrap_or(now)
    });
    t.saturating_duration_since(*epoch).as_nanos() as u64
}

/// An instance leaving this core: its function, its handle, the core it goes to.
pub(super) type Moving = (Arc<Function>, Box<dyn Instance>, usize);

/// An idle instance moving between cores, with its channel and unread bytes.
pub struct Migrated {
    function: Arc<Function>,
    handle: Box<dyn Instance>,
    channel: Endpoint,
    leftover: Vec<u8>,
}

impl Migrated {
    /// Ends an instance handed to a core whose loop ended before it took it
    /// (at server exit), as that core's [`CorePool::shutdown`] would have.
    pub fn discard(self) {
        super::end_at_exit(&self.function, self.handle);
    }
}

/// The starved core (a bit in `mask`) whose oldest request arrived first, and when.
fn oldest_starved(f: &Function, mask: u64) -> (usize, u64) {
    let mut best = (next_core(mask, 0), u64::MAX);
    let mut rest = mask;
    while rest != 0 {
        let core = rest.trailing_zeros() as usize;
        rest &= rest - 1;
        let since = f.starved_since[core].load(Relaxed);
        if since < best.1 {
            best = (core, since);
        }
    }
    best
}

/// The first core after `me` (cyclically) whose bit is set in `mask`.
pub(super) fn next_core(mask: u64, me: usize) -> usize {
    debug_assert!(mask != 0);
    let rotated = mask.rotate_right((me as u32 + 1) % 64);
    (rotated.trailing_zeros() as usize + me + 1) % 64
}

/// The move of queued request `pending` of function `f` to core `target`
/// with its connection (counted against [`RELOCATIONS_MAX`]); a service API
/// invocation takes its answer's shape along from `service`.
pub(super) fn relocate(
    service: &mut FxHashMap<ReplyTo, ServiceInvoke>,
    f: &Function,
    mut pending: Pending,
    target: usize,
) -> Action {
    pending.relocations += 1;
    let service = match service.is_empty() {
        true => None,
        false => service.remove(&pending.to),
    };
    let queued = Queued {
        function: f.spec.id.clone(),
        // A code update can replace the function under its name meanwhile.
        name: f
            .spec
            .name
            .clone()
            .filter(|_| f.spec.service.version.is_none()),
        pending,
        service,
    };
    Action::Relocate {
        core: target,
        queued,
    }
}

impl CorePool {
    /// The core an instance of `id` that just became free should go to: one
    /// where `id` is starved, if this core holds more than its even share of
    /// the function's instances or has nothing queued for it, or holds all of
    /// them and a starved core waited [`HAND_OVER_SLACK`] longer (the one that
    /// waited longest). Clears that core's starved bit (it gets this one).
    pub(super) fn hand_over_to(&self, id: &str) -> Option<usize> {
        let fs = self.fns.get(id)?;
        let core = self.cfg.core;
        let starved = fs.f.starved.load(Relaxed) & !(1u64 << core);
        // A deleted function's instances serve out the queue here and go.
        if starved == 0 || fs.f.deleted.load(Relaxed) {
            return None;
        }
        let share = (fs.f.spec.concurrency as usize / (1 + starved.count_ones() as usize)).max(1);
        let target = match fs.queue.front() {
            Some(head) if fs.live <= share => {
                let holds_all = fs.live as u32 >= fs.f.instances.load(Relaxed);
                let (target, since) = oldest_starved(&fs.f, starved);
                let slack = HAND_OVER_SLACK.as_nanos() as u64;
                if !holds_all || since.saturating_add(slack) >= stamp(head.arrived) {
                    return None;
                }
                target
            }
            _ => next_core(starved, core),
        };
        fs.f.starved.fetch_and(!(1u64 << target), Relaxed);
        Some(target)
    }

    /// Starts moving idle instance `i` to `target`: its channel is detached
    /// from this core's loop first (see [`CorePool::on_detached`]).
    pub(super) fn migrate(&mut self, i: usize, target: usize, now: Instant) {
        let inst = self.insts.remove(i);
        if let Some(fs) = self.fns.get_mut(&inst.function.spec.id) {
            fs.unpark_slot(i);
            fs.live -= 1;
            fs.sync_home(self.cfg.core);
            // Its connections may go there while it is on its way.
            fs.f.homes.fetch_or(1u64 << target, Relaxed);
        }
        self.leave_queue_behind(&inst.function.spec.id, target, now);
        self.actions.push_back(Action::Detach(inst.id));
        self.migrating
            .insert(inst.id, (inst.function, inst.handle, target));
    }

    /// The instance of `id` leaving for `target` leaves this core's queue of
    /// it behind. With none left here, the queued requests go after it with
    /// their connections (so the instance need not come back for them, and a
    /// function with one instance settles on one core instead of shuttling
    /// between cores whose clients all keep a request queued); otherwise, or
    /// with connection moves off, this core waits for one back.
    fn leave_queue_behind(&mut self, id: &str, target: usize, now: Instant) {
        let core = self.cfg.core;
        let Some(fs) = self.fns.get_mut(id) else {
            return;
        };
        if fs.queue.is_empty() {
            return;
        }
        if self.cfg.moves && fs.live + fs.starting == 0 {
            let mut stay = VecDeque::new();
            while let Some(pending) = fs.dequeue(&mut self.queued) {
                if super::forget_if_left(&mut self.gone, &mut self.service, &pending.to) {
                    continue;
                }
                if pending.relocations >= RELOCATIONS_MAX {
                    stay.push_back(pending);
                    continue;
                }
                let go = relocate(&mut self.service, &fs.f, pending, target);
                self.actions.push_back(go);
            }
            for pending in stay {
                fs.enqueue(pending, &mut self.queued);
            }
        }
        if fs.queue.is_empty() {
            // Whatever this core waited for went after the instance: it must
            // not call the instance back.
            fs.f.starved.fetch_and(!(1u64 << core), Relaxed);
        } else {
            // Given away in turn: this core's requests wait for one back.
            fs.mark_starved(core, now);
        }
    }

    /// A migrating instance's channel is free: send the instance to its new core.
    pub(super) fn detached(&mut self, inst: InstId, channel: Endpoint, leftover: Vec<u8>) {
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

    /// Takes over an instance another core handed over: a hand-over done,
    /// counted here (one that fails comes back instead, see
    /// [`CorePool::came_back`]).
    pub(super) fn handed_in(&mut self, m: Migrated, now: Instant) {
        add(&m.function.metrics.handovers, 1);
        self.migrated_in(m, now);
    }

    /// Takes back an instance whose hand-over to `core` failed (see
    /// [`CorePool::on_hand_over_failed`]). `core` was made a home of its
    /// function as the instance left ([`CorePool::migrate`]), and with its
    /// loop ended it never clears that itself: connections would keep
    /// trying to move there.
    pub(super) fn came_back(&mut self, core: usize, m: Migrated, now: Instant) {
        m.function.homes.fetch_and(!(1u64 << core), Relaxed);
        self.migrated_in(m, now);
    }

    /// Takes over an instance from another core. One whose function this
    /// core has let go (deleted, or replaced by a code update, while it
    /// travelled) is destroyed: the requests that followed it go to the
    /// successor ([`CorePool::on_relocated`]). One whose function is deleted
    /// but still draining here serves what is queued for it, then is retired
    /// like the function's other instances ([`CorePool::next_for`]).
    pub(super) fn migrated_in(&mut self, m: Migrated, now: Instant) {
        let Migrated {
            function: f,
            mut handle,
            channel,
            leftover,
        } = m;
        let id = f.spec.id.clone();
        if !self.fns.contains_key(&id) {
            // The sender marked this core a home of the function.
            f.homes.fetch_and(!(1u64 << self.cfg.core), Relaxed);
            handle.kill();
            f.metrics.instances.fetch_sub(1, Relaxed);
            add(&f.metrics.retired, 1);
            f.release();
            self.actions.push_back(Action::Destroy(handle));
            return;
        }
        handle.repin(self.cfg.instance_cpus(&f));
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
