//! Spilling: a request that has to wait on its core while another core holds
//! an idle instance of its function moves there with its connection.
//!
//! Each core serves the connections it accepted with its own instances. With
//! a function settled at one or two instances per core, a request arriving
//! while its core's instances are busy waits behind them, even when another
//! core's instance sits idle: two cores behave like two separate
//! single-server queues, and a pause of one instance (a major garbage
//! collection, a slow request) holds every request its core queues
//! meanwhile. Spilling makes them one queue served by all instances, without
//! sending a request to an instance that is not free:
//!
//! - a core queueing a request of a function that another core advertises
//!   an idle instance of (`Function::idle_on`) sends it there once its queue
//!   is stuck ([`SPILL_AFTER`]: the oldest waited that long, or every
//!   instance of it here has been busy that long, or none is here), the
//!   oldest first; a queue not stuck yet is looked at again when it would
//!   be (the loop wakes for it: [`CorePool::spill_due`]);
//! - a core whose instance parks idle with nothing queued asks a core with a
//!   backlog of the function (`Function::backlog`) for its oldest request
//!   ([`Action::Pull`]). That wakes a core whose instance is paused and whose
//!   loop would otherwise sleep with its queue.
//!
//! Each tick re-checks both (a bit restored, a queue left behind an instance
//! that stayed paused).
//!
//! The request travels as a queued one does behind a handed-over instance
//! ([`Action::Relocate`]): with its connection, at most
//! [`super::RELOCATIONS_MAX`] times, to be placed by arrival (under the
//! queue's bound there, as an arrival); one that cannot move stays queued
//! here (under the bound too), its move not counted. The sender clears
//! the target's idle bit (so that, as a rule, each idle instance is sent one
//! request); the target sets it again when an instance of it parks, and at
//! each tick. A request that arrives to find the instance taken (by the
//! target's own request, a hand-over, a retirement) queues there by arrival
//! and may spill on while its moves last. Off with `--no-connection-moves`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::migrate::{next_core, relocate};
use super::{Action, CorePool, RELOCATIONS_MAX};
use crate::metrics::add;

/// How long this core's queue of a function must be stuck before a request
/// of it spills: its oldest waited this long, or every instance of it here
/// has been running its request this long. A move costs about what a quick
/// request does (a detach, a message, an attach, on both cores); spilling a
/// queue that is about to move on its own cost the trivial handler 3-4 % of
/// its answers at 85 % load (measured). Normal requests of the functions
/// measured run well under it (Express POST: 90 % under 0.5 ms); a major
/// collection (5-10 ms) or a slow request does not.
pub const SPILL_AFTER: Duration = Duration::from_micros(500);

impl CorePool {
    /// A request of `id` was queued here: while another core has an idle
    /// instance of it and the queue here is stuck ([`SPILL_AFTER`]), send
    /// it our oldest waiting request.
    pub(super) fn spill(&mut self, id: &str, now: Instant) {
        let me = 1u64 << self.cfg.core;
        let Some(fs) = self.fns.get(id) else { return };
        let free = fs.f.idle_on.load(Relaxed) & !me;
        if !self.cfg.moves || free == 0 || fs.f.deleted.load(Relaxed) {
            return;
        }
        if !self.stuck(id, now) {
            return self.recheck(id);
        }
        self.spill_to(id, next_core(free, self.cfg.core));
    }

    /// Looks at the queue of `id` again once its oldest request will have
    /// waited [`SPILL_AFTER`] (the loop wakes for it: [`CorePool::spill_due`]).
    fn recheck(&mut self, id: &str) {
        let Some(head) = self.fns.get(id).and_then(|fs| fs.queue.front()) else {
            return;
        };
        let at = head.arrived + SPILL_AFTER;
        self.spill_check = Some(self.spill_check.map_or(at, |t| t.min(at)));
        if !self.spill_ids.iter().any(|k| k == id) {
            self.spill_ids.push(id.to_string());
        }
    }

    /// When the loop should wake to look at a queue again (see [`CorePool::on_spill_check`]).
    pub fn spill_due(&self) -> Option<Instant> {
        self.spill_check
    }

    /// Event: a queue that another core's idle instance could serve has been
    /// waiting [`SPILL_AFTER`] (its first look found it not yet stuck, and
    /// nothing else happened here since): offer it again.
    pub fn on_spill_check(&mut self, now: Instant) {
        self.spill_check = None;
        for id in std::mem::take(&mut self.spill_ids) {
            if self.fns.get(&id).is_some_and(|fs| !fs.queue.is_empty()) {
                self.spill(&id, now);
            }
        }
        self.check_invariants();
    }

    /// Event: core `from` has an idle instance of `id` and nothing queued
    /// for it (see [`CorePool::pull`]): send it our oldest waiting request,
    /// if the queue here is stuck (else the loop looks again once it would
    /// be: [`CorePool::spill_due`]).
    pub fn on_pull(&mut self, id: &str, from: usize, now: Instant) {
        let Some(fs) = self.fns.get(id) else { return };
        // Taken meanwhile (by a request of its own or one spilled from elsewhere).
        if fs.f.idle_on.load(Relaxed) & (1u64 << from) == 0 || fs.f.deleted.load(Relaxed) {
            return;
        }
        if !self.stuck(id, now) {
            self.recheck(id);
        } else {
            self.spill_to(id, from);
        }
        self.check_invariants();
    }

    /// Whether the queue of `id` here has been stuck for [`SPILL_AFTER`]:
    /// its oldest request waited that long, or every instance of it here
    /// has been busy that long (none is about to take the next), or there
    /// is none here to take it (all elsewhere, or starting).
    fn stuck(&self, id: &str, now: Instant) -> bool {
        let fs = &self.fns[id];
        let Some(head) = fs.queue.front() else {
            return false;
        };
        if now.saturating_duration_since(head.arrived) >= SPILL_AFTER {
            return true;
        }
        let mut busy = false;
        for (_, inst) in &self.insts {
            if !Arc::ptr_eq(&inst.function, &fs.f) {
                continue;
            }
            if let Some(b) = &inst.busy {
                if now.saturating_duration_since(b.started) < SPILL_AFTER {
                    return false;
                }
                busy = true;
            }
        }
        busy || fs.live == 0
    }

    /// Instance `i` of `id` parked idle with nothing queued here: asks a core
    /// with a backlog of `id` for a request.
    pub(super) fn pull(&mut self, id: &str) {
        let me = 1u64 << self.cfg.core;
        let Some(fs) = self.fns.get(id) else { return };
        let waiting = fs.f.backlog.load(Relaxed) & !me;
        if !self.cfg.moves || waiting == 0 || fs.f.deleted.load(Relaxed) {
            return;
        }
        let core = next_core(waiting, self.cfg.core);
        self.actions.push_back(Action::Pull {
            core,
            function: id.to_string(),
        });
    }

    /// After a tick changed the core's saturation and the fits: re-evaluates
    /// which functions' idle instances may take spilled requests (restoring
    /// bits another core cleared for a request that then could not move),
    /// asks for work for those with nothing queued here, and offers queued
    /// requests to idle instances elsewhere (an arrival or a park is what
    /// triggers both otherwise).
    pub(super) fn reopen(&mut self, now: Instant) {
        let ids: Vec<String> = self
            .fns
            .iter()
            .filter(|(_, fs)| !fs.idle.is_empty() || !fs.queue.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            let open = self.under_fit(&id);
            let fs = self.fns.get_mut(&id).expect("listed above");
            fs.open = open;
            fs.sync_idle();
            match (fs.queue.is_empty(), open && !fs.idle.is_empty()) {
                (true, true) => self.pull(&id),
                (false, _) => self.spill(&id, now),
                (true, false) => {}
            }
        }
    }

    /// Sends the oldest queued request of `id` that may still move to
    /// `target`, whose idle instance it is for.
    fn spill_to(&mut self, id: &str, target: usize) {
        let fs = self.fns.get_mut(id).expect("checked by the callers");
        while let Some(at) = fs
            .queue
            .iter()
            .position(|p| p.relocations < RELOCATIONS_MAX)
        {
            let pending = fs.take_at(at, &mut self.queued);
            if super::forget_if_left(&mut self.gone, &mut self.service, &pending.to) {
                // Its client left; nothing to send.
                continue;
            }
            fs.f.idle_on.fetch_and(!(1u64 << target), Relaxed);
            if fs.queue.is_empty() {
                // Nothing left waiting here: no instance should come for it.
                fs.f.starved.fetch_and(!(1u64 << self.cfg.core), Relaxed);
            }
            add(&fs.f.metrics.requests_spilled, 1);
            let go = relocate(&mut self.service, &fs.f, pending, target);
            self.actions.push_back(go);
            return;
        }
    }
}
