//! Queues and dispatch: a request goes to an idle instance or waits in its
//! function's queue (bounded: 429 beyond it); instances are started for
//! waiting requests, given their next request when they finish, retired when
//! they are not needed; requests and instances time out on the tick.

use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{
    scale, Action, Busy, CorePool, FnState, Frame, Inst, InstId, Pending, AHEAD_BODY_MAX,
    AHEAD_TOOK_MAX, DEADLINE_SEP, EXIT_GRACE, MEMORY_WAIT_MAX, QUEUE_HARD_FACTOR,
    QUEUE_INIT_ALLOWANCE,
};
use crate::functions::{NoSlot, Started};
use crate::http::parse::{Request, Version};
use crate::http::reply::{Reply, ReplyTo};
use crate::metrics::{add, ErrorKind};
use crate::protocol::FrameType;
use crate::util::decimal::decimal;

/// The metadata of an INVOKE frame (see `include/hearth_protocol.h`): a JSON
/// array of these fields in this order, minus `deadline_ms`, which is appended
/// last when the request is dispatched. An array rather than an object: the Node
/// shim's `JSON.parse` of it costs ~40 % less (perf/RESULTS.md, issue 14).
#[derive(serde::Serialize)]
struct InvokeMeta<'a>(
    /// method
    &'a str,
    /// path
    &'a str,
    /// query
    &'a str,
    /// headers, `[name, value]` pairs
    &'a [(String, String)],
    /// source_ip
    IpAddr,
    /// protocol
    &'static str,
    /// request_id
    &'a str,
    /// time_ms
    u64,
    /// domain
    &'a str,
    /// raw: 1 when the body is the event (the service API's `Invoke`), else 0
    u8,
);

impl CorePool {
    /// A request id in UUID v4 shape.
    pub(super) fn request_uuid(&mut self) -> String {
        // xorshift64*: unique enough for request ids, no syscall per request.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        let a = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let b = a.rotate_left(29) ^ x;
        // Version 4, variant 10xx, written digit by digit: `format!` cost
        // ~10 % of hearth's own instructions per request (perf/callgrind-request.sh).
        let fields = [
            (a >> 32, 8),
            ((a >> 16) & 0xffff, 4),
            (0x4000 | (a & 0xfff), 4),
            (((b >> 48) & 0x3fff) | 0x8000, 4),
            (b & 0xffff_ffff_ffff, 12),
        ];
        let mut text = String::with_capacity(36);
        for (i, (value, digits)) in fields.into_iter().enumerate() {
            if i > 0 {
                text.push('-');
            }
            for k in (0..digits).rev() {
                text.push(char::from(
                    b"0123456789abcdef"[(value >> (4 * k)) as usize & 0xf],
                ));
            }
        }
        text
    }

    /// Handles one invocation request from a function URL.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn invoke(
        &mut self,
        to: ReplyTo,
        peer: IpAddr,
        id: &str,
        path: &str,
        req: Request,
        body: Vec<u8>,
        now: Instant,
    ) {
        self.invoke_as(to, peer, id, path, req, body, false, now);
    }

    /// Handles one invocation request; `raw`: the body is the event itself
    /// (the service API's `Invoke`), not an HTTP request to turn into one.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn invoke_as(
        &mut self,
        to: ReplyTo,
        peer: IpAddr,
        id: &str,
        path: &str,
        req: Request,
        body: Vec<u8>,
        raw: bool,
        now: Instant,
    ) {
        let Some(fs) = self.fns.get(id) else {
            let message = format!("no function with id {id}");
            return self.reply(to, Reply::error(404, "function_not_found", &message));
        };
        let f = fs.f.clone();
        if f.deleted.load(Relaxed) {
            let message = format!("function {id} was deleted");
            return self.reply(to, Reply::error(404, "function_not_found", &message));
        }
        add(&f.metrics.invocations, 1);
        self.next_rid = self.next_rid.wrapping_add(1).max(1);
        let rid = self.next_rid;
        let request_id = self.request_uuid();
        let meta = InvokeMeta(
            &req.method,
            path,
            req.query(),
            &req.headers,
            peer,
            match req.version {
                Version::Http10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            &request_id,
            self.wall_ms(now),
            req.header("host").unwrap_or("localhost"),
            u8::from(raw),
        );
        if raw {
            if let Some(s) = self.service.get_mut(&to) {
                s.request_id.clone_from(&request_id);
                s.function = Some(f.clone());
            }
        }
        let mut meta_head = Vec::with_capacity(256 + 32 * req.headers.len());
        serde_json::to_writer(&mut meta_head, &meta).expect("json of plain values");
        assert_eq!(
            meta_head.pop(),
            Some(b']'),
            "a JSON array ends with a bracket"
        );
        let pending = Pending {
            to,
            rid,
            request_id,
            meta_head,
            body,
            arrived: now,
            queue_deadline: now + Duration::from_millis(f.spec.timeout_ms) + QUEUE_INIT_ALLOWANCE,
            relocations: 0,
        };
        if self.takes_idle(id) {
            return self.dispatch_idle(id, pending, now);
        }
        if let Some(r) = self.queue_full(id) {
            return self.reply(to, r);
        }
        let fs = self.fns.get_mut(id).expect("looked up above");
        fs.enqueue(pending, &mut self.queued);
        if self.ahead_on_arrival(id) {
            return;
        }
        self.spill(id, now);
        self.grow(id, now);
    }

    /// A request of `id` (known here) that just queued alone, behind busy
    /// instances only, goes ahead to one of them that would take it
    /// ([`CorePool::send_ahead`]). Returns whether it went.
    fn ahead_on_arrival(&mut self, id: &str) -> bool {
        let fs = &self.fns[id];
        if fs.queue.len() != 1 || fs.live == 0 {
            return false;
        }
        let f = &fs.f;
        let Some(i) = self.insts.iter().find_map(|(k, inst)| {
            let takes =
                Arc::ptr_eq(&inst.function, f) && inst.busy.is_some() && inst.ahead.is_none();
            takes.then_some(k)
        }) else {
            return false;
        };
        self.send_ahead(i);
        self.insts[i].ahead.is_some()
    }

    /// The 429 a request joining the queue of `id` (known here) gets when the
    /// queue is full, counted as throttled. Requests covered by an instance
    /// being started for them are not "waiting beyond the limit"; a full
    /// queue below the limit scales out, but when no instance can start (the
    /// core holds its most, memory is spent) it may grow only to
    /// [`QUEUE_HARD_FACTOR`] times the bound.
    pub(super) fn queue_full(&self, id: &str) -> Option<Reply> {
        let fs = &self.fns[id];
        let f = &fs.f;
        let at_limit = f.instances.load(Relaxed) >= f.spec.concurrency;
        let uncovered = fs.uncovered();
        let max = self.cfg.queue_depth_max;
        if uncovered < max || (!at_limit && uncovered < max * QUEUE_HARD_FACTOR) {
            return None;
        }
        f.metrics.error(ErrorKind::Throttled);
        let message = match at_limit {
            true => format!("function {id} is at its concurrency limit and its queue is full"),
            false => format!("function {id} has no instance free and its queue is full"),
        };
        Some(Reply::error(429, "too_many_requests", &message).with_header("retry-after", "1"))
    }

    /// Whether a request of `id` (known here) goes to an idle instance at
    /// once rather than into the queue: there is one, and the fit lets one
    /// more request run or the queue is full (a full queue takes an idle
    /// instance even beyond the fit).
    fn takes_idle(&self, id: &str) -> bool {
        let fs = &self.fns[id];
        !fs.idle.is_empty() && (self.under_fit(id) || fs.uncovered() >= self.cfg.queue_depth_max)
    }

    /// Gives `pending` to an idle instance of `id` (there is one).
    fn dispatch_idle(&mut self, id: &str, pending: Pending, now: Instant) {
        let i = self.fns.get_mut(id).and_then(|fs| fs.unpark());
        self.send(i.expect("an idle instance"), pending, now);
    }

    /// Serves a request of `id` accepted on another core (see
    /// [`CorePool::on_relocated`]) as one arriving here would be, queued in
    /// its place by arrival ([`CorePool::queue_by_arrival`]).
    pub(super) fn place(&mut self, id: &str, pending: Pending, now: Instant) {
        if self.queue_by_arrival(id, pending, now) {
            // The idle instance it came for was taken meanwhile: another may be free.
            self.spill(id, now);
            self.grow(id, now);
        }
    }

    /// Queues `pending`, a request of `id` (known here) accepted earlier,
    /// here or on another core, in its place by arrival, as an arrival joins
    /// the queue: it goes to an idle instance at once if one may take it,
    /// and gets the 429 of [`CorePool::queue_full`] beyond the queue's bound
    /// (requests moving between cores would otherwise pile up past it on
    /// one core). Returns whether it queued.
    pub(super) fn queue_by_arrival(&mut self, id: &str, pending: Pending, now: Instant) -> bool {
        if self.takes_idle(id) {
            self.dispatch_idle(id, pending, now);
            return false;
        }
        if let Some(r) = self.queue_full(id) {
            self.reply(pending.to, r);
            return false;
        }
        let fs = self.fns.get_mut(id).expect("queued for a known function");
        fs.insert_by_arrival(pending, &mut self.queued);
        true
    }

    /// Starts instances for queued requests not yet covered by one starting,
    /// as far as [`scale::scale_out`] finds the wait worth it.
    pub(super) fn grow(&mut self, id: &str, now: Instant) {
        loop {
            let Some(fs) = self.fns.get(id) else { return };
            if fs.f.deleted.load(Relaxed) {
                return;
            }
            let view = scale::FnView::of(fs, now, self.cpu_busy_pct);
            if !scale::scale_out(&view, self.saturated(), self.cfg.queue_depth_max) {
                return;
            }
            // A function at its concurrency limit could not use a slot freed
            // for it (an idle instance of another function would be retired
            // for nothing); it only lets the other cores know, below.
            let at_limit = fs.f.instances.load(Relaxed) >= fs.f.spec.concurrency;
            if !at_limit && self.insts.len() + self.starting_total() >= self.cfg.instances_max {
                if !self.slot_waiters.iter().any(|w| w == id) {
                    self.slot_waiters.push_back(id.to_string());
                }
                // Make room from idle instances of other functions.
                if !self.evict_idle(id, now) {
                    return;
                }
                continue;
            }
            let core = self.cfg.core;
            let fs = self.fns.get_mut(id).expect("present");
            match fs.f.try_reserve() {
                Ok(()) => {}
                Err(NoSlot::Concurrency) => {
                    // At the concurrency limit: let the cores holding instances
                    // know, unless one is on its way here already.
                    let arriving = fs.live + fs.starting == 0
                        && fs.f.homes.load(Relaxed) & (1u64 << core) != 0;
                    if !arriving {
                        fs.mark_starved(core, now);
                    }
                    return;
                }
                Err(NoSlot::Memory) => {
                    // Make room from idle instances of other functions, as for slots.
                    if self.evict_idle(id, now) {
                        continue;
                    }
                    self.over_memory_budget(id, now);
                    return;
                }
            }
            fs.starting += 1;
            fs.sync_home(core);
            add(&fs.f.metrics.cold_starts, 1);
            let cpus = self.cfg.instance_cpus(&fs.f);
            self.actions.push_back(Action::Start {
                function: fs.f.clone(),
                cpus,
            });
            // It has its slot (one freed for it, or made by eviction): it no
            // longer waits for one, unless the loop finds it must again.
            if !self.slot_waiters.is_empty() {
                self.slot_waiters.retain(|w| w != id);
            }
        }
    }

    /// No room in the memory budget for an instance of `id`: its requests wait for
    /// instances held elsewhere (cores hand idle ones over) or for room; with no
    /// instance anywhere, those that waited [`MEMORY_WAIT_MAX`] get 503.
    fn over_memory_budget(&mut self, id: &str, now: Instant) {
        let Some(fs) = self.fns.get_mut(id) else {
            return;
        };
        fs.mark_starved(self.cfg.core, now);
        if fs.live + fs.starting > 0 || fs.f.instances.load(Relaxed) > 0 {
            return;
        }
        let mut expired = Vec::new();
        while fs
            .queue
            .front()
            .is_some_and(|p| now.saturating_duration_since(p.arrived) >= MEMORY_WAIT_MAX)
        {
            let p = fs.dequeue(&mut self.queued).expect("front exists");
            fs.f.metrics.error(ErrorKind::Throttled);
            expired.push(p.to);
        }
        if expired.is_empty() {
            return;
        }
        let message = format!(
            "no instance of function {id} can start: {}",
            self.cfg.memory.explain(u64::from(fs.f.spec.memory_mb))
        );
        for to in expired {
            let r = Reply::error(503, "memory_budget_exhausted", &message)
                .with_header("retry-after", "1");
            self.reply(to, r);
        }
    }

    fn starting_total(&self) -> usize {
        self.fns.values().map(|f| f.starting).sum()
    }

    /// Destroys the longest-idle instance of a function other than `except`
    /// (the successor of a replaced function whose last instance it was
    /// takes over its queue at once, see [`CorePool::take_over`]).
    fn evict_idle(&mut self, except: &str, now: Instant) -> bool {
        let victim = self
            .insts
            .iter()
            .filter(|(_, i)| i.busy.is_none() && i.function.spec.id != except)
            .min_by_key(|(_, i)| i.idle_since)
            .map(|(k, _)| k);
        match victim {
            Some(k) => {
                let heir = self.retire(k, now);
                self.take_over(heir, now);
                true
            }
            None => false,
        }
    }

    /// Gives request `p` to idle instance `i`.
    pub(super) fn send(&mut self, i: usize, p: Pending, now: Instant) {
        let wall_ms = self.wall_ms(now);
        let inst = &mut self.insts[i];
        let timeout_ms = inst.function.spec.timeout_ms;
        // The handler's clock starts now: queue time does not eat into it.
        let mut meta = p.meta_head;
        meta.extend_from_slice(DEADLINE_SEP.as_bytes());
        meta.extend_from_slice(decimal(wall_ms + timeout_ms).as_bytes());
        meta.push(b']');
        let frame_len = crate::protocol::HEADER_BYTES + meta.len() + p.body.len();
        self.preempt.sent(p.arrived < now);
        inst.busy = Some(Busy {
            to: p.to,
            rid: p.rid,
            request_id: p.request_id,
            started: now,
            deadline: now + Duration::from_millis(timeout_ms),
            // An instance fresh from its start that finds a request it
            // did not keep waiting was not what that request waited for.
            cold: std::mem::take(&mut inst.fresh) && p.arrived < now,
            arrived: p.arrived,
            frame_len,
            sent_ahead: false,
        });
        let frame = Frame {
            kind: FrameType::Invoke,
            request_id: p.rid,
            meta,
            body: p.body,
        };
        self.actions.push_back(Action::Send {
            inst: inst.id,
            frame,
        });
        // Its other idle instances, if any, may have reached the fit.
        let id = &self.insts[i].function.spec.id;
        if self.fns.get(id).is_some_and(|fs| !fs.idle.is_empty()) {
            let open = self.under_fit(id);
            let fs = self.fns.get_mut(id).expect("checked");
            fs.open = open;
            fs.sync_idle();
        }
    }

    /// Instance `i` finished a request. Round robin between functions waiting
    /// for a slot on this core: its slot goes to the next other function
    /// waiting for one, if any; else it takes its next request. An instance
    /// of a deleted function keeps its slot while requests are queued for it:
    /// none is started for them, so they have no one else.
    pub(super) fn after_request(&mut self, i: usize, now: Instant) {
        let id = self.insts[i].function.spec.id.clone();
        let waiter = match self.drains_queue(&id) {
            true => None,
            false => self.take_waiter(&id),
        };
        if let Some(waiter) = waiter {
            let heir = self.retire(i, now);
            self.grow(&waiter, now);
            self.grow(&id, now);
            self.take_over(heir, now);
            return;
        }
        self.next_for(i, now);
    }

    /// Whether `id` is deleted and has requests queued here, which only its
    /// instances here may serve.
    fn drains_queue(&self, id: &str) -> bool {
        self.fns
            .get(id)
            .is_some_and(|fs| fs.f.deleted.load(Relaxed) && !fs.queue.is_empty())
    }

    /// Gives an idle instance its next request, or parks it. An instance that
    /// just started or moved here got its slot in its function's turn, so it
    /// serves its own queue (see [`CorePool::after_request`] for the turns);
    /// handed over to another core, retired, or with nothing queued for it,
    /// it leaves its slot to the next function waiting for one
    /// ([`CorePool::give_slot`]).
    pub(super) fn next_for(&mut self, i: usize, now: Instant) {
        let id = self.insts[i].function.spec.id.clone();
        if !self.fns.contains_key(&id) {
            self.retire(i, now);
            self.give_slot(&id, now);
            return;
        }
        if let Some(target) = self.hand_over_to(&id) {
            self.migrate(i, target, now);
            // Gone from this core as if retired: a function waiting for a
            // slot here would otherwise wait for its next tick or request.
            self.give_slot(&id, now);
            return;
        }
        let me = 1u64 << self.cfg.core;
        let may_run = self.under_fit(&id);
        // Decided before `fs` is borrowed (nothing below changes it); with
        // no function waiting for a slot it costs nothing.
        let waiter = !self.slot_waiters.is_empty() && self.waiter_after(&id).is_some();
        if let Some(p) = may_run.then(|| self.dequeue_live(&id)).flatten() {
            self.send(i, p, now);
            self.send_ahead(i);
            return;
        }
        let fs = self.fns.get_mut(&id).expect("checked");
        fs.f.starved.fetch_and(!me, Relaxed);
        // Retired: an instance of a deleted function held back by the fit
        // (it leaves the queue to the function's instances still running
        // here; should it be the last, the successor takes the queue), and
        // one that would idle while another function waits for its slot
        // (until the waiter's next event, a tick or a request, evicted it).
        if fs.f.deleted.load(Relaxed) || (fs.queue.is_empty() && waiter) {
            let heir = self.retire(i, now);
            self.take_over(heir, now);
            self.give_slot(&id, now);
            return;
        }
        self.insts[i].idle_since = now;
        fs.open = may_run;
        fs.park(i);
        // (The bits first: no lookup on the usual path, where nothing waits elsewhere.)
        if may_run && fs.queue.is_empty() && fs.f.backlog.load(Relaxed) & !me != 0 {
            self.pull(&id);
        }
    }

    /// Takes the oldest queued request of `id` (known here) whose client is
    /// still waiting, keeping the core's starved mark in step: cleared when
    /// the queue empties, else dated by the new head.
    fn dequeue_live(&mut self, id: &str) -> Option<Pending> {
        let me = 1u64 << self.cfg.core;
        let fs = self.fns.get_mut(id).expect("a known function");
        while let Some(p) = fs.dequeue(&mut self.queued) {
            if super::forget_if_left(&mut self.gone, &mut self.service, &p.to) {
                continue;
            }
            match fs.queue.front() {
                None => {
                    fs.f.starved.fetch_and(!me, Relaxed);
                }
                // Still starved: its oldest waiting request is a newer one now.
                Some(next) if fs.f.starved.load(Relaxed) & me != 0 => {
                    let since = super::migrate::stamp(next.arrived);
                    fs.f.starved_since[self.cfg.core].store(since, Relaxed);
                }
                Some(_) => {}
            }
            return Some(p);
        }
        None
    }

    /// Sends busy instance `i` its function's next queued request behind the
    /// one it runs. The runtime holds it and starts it as soon as it has
    /// answered, without waiting for hearth (and for the worker's turn on
    /// the CPU) to send it, and the runtime need not sleep between the two:
    /// 1.2-1.3x the requests per second for the trivial handler and for
    /// Express, per core and on both (perf/RESULTS.md, issue 14). Still one
    /// invocation at a time per instance; the request carries no deadline
    /// (the shim sets it when it starts the request, and hearth's own clock
    /// for it starts when the previous answer comes, see
    /// [`CorePool::run_ahead`]). Only for runtimes that queue
    /// ([`Instance::runs_queued`]), quick requests ([`AHEAD_TOOK_MAX`]), small
    /// bodies ([`AHEAD_BODY_MAX`]), functions that could not run the request
    /// sooner (at their concurrency limit, or held to the core's fit), and
    /// only where [`CorePool::next_for`] would simply give the instance that
    /// request next: no other core starved of the function or with an idle
    /// instance of it (the queue may spill there, see `spill`: a request
    /// bound to an instance here would wait out that instance's pause, a
    /// collection or a slow request), no other function waiting for a slot
    /// here.
    ///
    /// [`Instance::runs_queued`]: crate::sandbox::Instance::runs_queued
    pub(super) fn send_ahead(&mut self, i: usize) {
        let inst = &self.insts[i];
        if inst.ahead.is_some()
            || inst.busy.is_none()
            || inst.exiting
            || inst.last_took > AHEAD_TOOK_MAX
            || !inst.handle.runs_queued()
        {
            return;
        }
        let f = inst.function.clone();
        let id = f.spec.id.as_str();
        let Some(fs) = self.fns.get(id) else { return };
        let others = !(1u64 << self.cfg.core);
        if fs
            .queue
            .front()
            .is_none_or(|p| p.body.len() > AHEAD_BODY_MAX)
            || f.starved.load(Relaxed) & others != 0
            || f.idle_on.load(Relaxed) & others != 0
            || (!self.slot_waiters.is_empty() && self.waiter_after(id).is_some())
        {
            return;
        }
        // Only where the request could not run sooner anyway: the function
        // is at its concurrency limit, or the core's fit lets no more of it
        // run at once. Elsewhere it may be worth a new instance (a request
        // behind a slow one would wait for it, however quick the last was).
        let at_limit = f.instances.load(Relaxed) >= f.spec.concurrency;
        if !at_limit && self.under_fit(id) {
            return;
        }
        let Some(p) = self.dequeue_live(id) else {
            return;
        };
        if p.body.len() > AHEAD_BODY_MAX {
            let fs = self.fns.get_mut(id).expect("looked up above");
            fs.requeue(p, &mut self.queued);
            return;
        }
        let mut meta = Vec::with_capacity(p.meta_head.len() + 1);
        meta.extend_from_slice(&p.meta_head);
        meta.push(b']');
        let frame = Frame {
            kind: FrameType::Invoke,
            request_id: p.rid,
            meta,
            body: p.body.clone(),
        };
        add(&f.metrics.requests_sent_ahead, 1);
        let inst = &mut self.insts[i];
        inst.ahead = Some(p);
        self.actions.push_back(Action::Send {
            inst: inst.id,
            frame,
        });
    }

    /// Instance `i`, which had a request sent ahead, answered the one it
    /// ran: the runtime has started the one ahead, which becomes its
    /// running request (its timeout counts from now), and the next queued
    /// one may go ahead in turn.
    pub(super) fn run_ahead(&mut self, i: usize, now: Instant) {
        let inst = &mut self.insts[i];
        let p = inst.ahead.take().expect("a request ahead");
        let timeout = Duration::from_millis(inst.function.spec.timeout_ms);
        self.preempt.sent(p.arrived < now);
        inst.busy = Some(Busy {
            frame_len: p.frame_len_ahead(),
            to: p.to,
            rid: p.rid,
            request_id: p.request_id,
            started: now,
            deadline: now + timeout,
            cold: false,
            arrived: p.arrived,
            sent_ahead: true,
        });
        self.send_ahead(i);
    }

    /// A slot here came free outside the turns of [`CorePool::after_request`]:
    /// the next function other than `id` waiting for one gets it, if it is
    /// still free (a waiter that found none would lose its place in line).
    fn give_slot(&mut self, id: &str, now: Instant) {
        if self.insts.len() + self.starting_total() >= self.cfg.instances_max {
            return;
        }
        if let Some(waiter) = self.take_waiter(id) {
            self.grow(&waiter, now);
        }
    }

    /// The place in line of the first function other than `id` waiting for
    /// a slot here that can still use one: it has requests no start covers
    /// and is below its concurrency limit (one whose queue emptied
    /// meanwhile, or that reached its limit on other cores, keeps its place
    /// for when it needs a slot again).
    fn waiter_after(&self, id: &str) -> Option<usize> {
        self.slot_waiters.iter().position(|w| {
            *w != id
                && self.fns.get(w).is_some_and(|fs| {
                    !fs.f.deleted.load(Relaxed)
                        && fs.uncovered() > 0
                        && fs.f.instances.load(Relaxed) < fs.f.spec.concurrency
                })
        })
    }

    /// Takes the function [`CorePool::waiter_after`] finds out of the line.
    fn take_waiter(&mut self, id: &str) -> Option<String> {
        let pos = self.waiter_after(id)?;
        self.slot_waiters.remove(pos)
    }

    /// Whether one more request of `id` may run on this core now (see
    /// [`scale::run_cap`]). Counts the function's busy instances only when
    /// there is a cap.
    pub(super) fn under_fit(&self, id: &str) -> bool {
        let Some(fs) = self.fns.get(id) else {
            return true;
        };
        let Some(cap) = scale::run_cap(fs.run_fit.or(fs.fit), self.saturated()) else {
            return true;
        };
        let running = self
            .insts
            .iter()
            .filter(|(_, i)| i.busy.is_some() && i.function.spec.id == id)
            .count();
        running < cap
    }

    /// Gives queued requests of `id` to its idle instances while its fit
    /// has room (the fit rose, or the core is no longer saturated).
    pub(super) fn fill(&mut self, id: &str, now: Instant) {
        while self.under_fit(id) {
            let Some(fs) = self.fns.get_mut(id) else {
                return;
            };
            if fs.queue.is_empty() {
                return;
            }
            let Some(i) = fs.unpark() else { return };
            self.next_for(i, now);
        }
    }

    /// Adds a ready instance (started here or moved in) and gives it work.
    pub(super) fn adopt(&mut self, inst: Inst, now: Instant) -> usize {
        let fs = self
            .fns
            .get_mut(&inst.function.spec.id)
            .expect("adopted for a known function");
        fs.live += 1;
        fs.sync_home(self.cfg.core);
        fs.live_since = now;
        self.insts.insert(inst)
    }

    /// A fresh instance id for the next slab slot.
    pub(super) fn next_id(&mut self) -> InstId {
        self.gen = self.gen.wrapping_add(1);
        InstId {
            slot: self.insts.vacant_key() as u32,
            gen: self.gen,
        }
    }

    /// Removes an instance and has it destroyed off-loop; frees its
    /// concurrency slot. Returns the function that took over the queue of a
    /// deleted function whose last instance here it was (see
    /// [`CorePool::forget_if_drained`]); every caller hands it to
    /// [`CorePool::take_over`], or those requests wait for the next tick.
    pub(super) fn retire(&mut self, i: usize, now: Instant) -> Option<String> {
        let mut inst = self.insts.remove(i);
        // A request sent ahead never started (it would be running): it
        // queues again in its place, for the caller's `fill` or `grow`.
        if let Some(p) = inst.ahead.take() {
            match self.fns.get_mut(&inst.function.spec.id) {
                Some(fs) => fs.insert_by_arrival(p, &mut self.queued),
                // (A function's state outlives its instances: not reached.)
                None => self.reply(p.to, Reply::error(503, "instance_gone", "try again")),
            }
        }
        // Its streamed answer was ended by whoever retires it busy.
        debug_assert!(!self.streams.contains_key(&inst.id));
        if !inst.exiting {
            inst.handle.kill();
        }
        self.actions.push_back(Action::Close(inst.id));
        let id = &inst.function.spec.id;
        if let Some(fs) = self.fns.get_mut(id) {
            fs.unpark_slot(i);
            fs.live -= 1;
            fs.sync_home(self.cfg.core);
        }
        inst.function.metrics.instances.fetch_sub(1, Relaxed);
        add(&inst.function.metrics.retired, 1);
        inst.function.release();
        if inst.exiting {
            // It is exiting by itself: give the agent a moment to send its
            // last log lines, then kill it (see `tick`).
            self.dying.push((now + EXIT_GRACE, inst.handle));
        } else {
            self.actions.push_back(Action::Destroy(inst.handle));
        }
        let id = id.clone();
        self.forget_if_drained(&id)
    }

    /// Retires instance `i`, which failed while busy (its request answered):
    /// a request it had been sent ahead is queued again, and an idle
    /// instance may take it at once.
    fn retire_failed(&mut self, i: usize, now: Instant) -> Option<String> {
        let inst = &self.insts[i];
        let (had_ahead, f) = (inst.ahead.is_some(), inst.function.clone());
        let heir = self.retire(i, now);
        if had_ahead {
            self.fill(&f.spec.id, now);
        }
        heir
    }

    /// Drops a deleted function's state once no instance of it is left here.
    /// Requests still queued then had not run: when a code update replaced
    /// the function, the one now under its name takes them (in their order,
    /// with their deadlines; those its queue has no room for get 429, see
    /// [`CorePool::queue_full`]) and returns its id, to be served by
    /// [`CorePool::take_over`]; otherwise they get 404. While the core's
    /// view still lists the function, they wait for the refresh instead,
    /// which brings the successor (see [`FnState::listed`]).
    pub(super) fn forget_if_drained(&mut self, id: &str) -> Option<String> {
        let fs = self.fns.get(id)?;
        if !fs.f.deleted.load(Relaxed) || fs.live > 0 || fs.starting > 0 {
            return None;
        }
        let heir = (!fs.queue.is_empty())
            .then(|| fs.f.spec.name.as_deref())
            .flatten()
            .filter(|_| fs.f.spec.service.version.is_none())
            .and_then(|name| self.successor(name))
            .cloned();
        if heir.is_none() && fs.listed && !fs.queue.is_empty() {
            return None;
        }
        let mut fs = self.fns.remove(id).expect("present");
        let Some(heir) = heir else {
            let message = format!("function {id} was deleted");
            while let Some(p) = fs.dequeue(&mut self.queued) {
                self.reply(p.to, Reply::error(404, "function_not_found", &message));
            }
            return None;
        };
        let heir_id = &heir.spec.id;
        while let Some(p) = fs.dequeue(&mut self.queued) {
            self.log_tail_from(p.to, &heir);
            // They join its queue as arrivals do, oldest first: those beyond
            // its bound get the 429 an arrival would.
            if let Some(r) = self.queue_full(heir_id) {
                self.reply(p.to, r);
                continue;
            }
            let hs = self.fns.get_mut(heir_id).expect("a successor known here");
            hs.insert_by_arrival(p, &mut self.queued);
        }
        Some(heir_id.clone())
    }

    /// Serves the requests `heir` took over from a function it replaced (see
    /// [`CorePool::forget_if_drained`]) as newly queued ones of its own: on
    /// an idle instance, spilled to another core, or by scaling out.
    pub(super) fn take_over(&mut self, heir: Option<String>, now: Instant) {
        let Some(id) = heir else { return };
        self.fill(&id, now);
        self.spill(&id, now);
        self.grow(&id, now);
    }

    /// Answers the instance's request with 502 (if any), destroys it, replaces
    /// it if needed; a slot that stays free goes to a function waiting for one.
    pub(super) fn instance_failed(&mut self, i: usize, now: Instant, why: &str) {
        let inst = &mut self.insts[i];
        let f = inst.function.clone();
        if let Some(busy) = inst.busy.take() {
            f.metrics.error(ErrorKind::Crash);
            let msg = if inst.handle.oom_killed() {
                format!(
                    "{why}: it exceeded its memory limit of {} MB",
                    f.spec.memory_mb
                )
            } else {
                why.to_string()
            };
            let (id, reply) = (inst.id, Reply::error(502, "instance_crashed", &msg));
            self.answer_running(id, busy.to, reply, None);
        }
        let heir = self.retire_failed(i, now);
        self.grow(&f.spec.id, now);
        self.take_over(heir, now);
        self.give_slot(&f.spec.id, now);
    }

    /// A start finished: adopt the instance, or answer a waiting request
    /// ([`start_failed_reply`]).
    pub(super) fn started(&mut self, started: Started, now: Instant) {
        let f = started.function;
        let id = f.spec.id.clone();
        if let Some(fs) = self.fns.get_mut(&id) {
            fs.starting = fs.starting.saturating_sub(1);
            fs.sync_home(self.cfg.core);
        }
        let mut handle = match started.result {
            Ok(h) => h,
            Err(e) => {
                f.release();
                f.metrics.error(ErrorKind::Start);
                f.logs.lock().unwrap().push(
                    "host",
                    true,
                    format!("instance start failed: {e}").as_bytes(),
                );
                if f.deleted.load(Relaxed) {
                    let heir = self.forget_if_drained(&id);
                    self.take_over(heir, now);
                    return;
                }
                let waiting = self
                    .fns
                    .get_mut(&id)
                    .and_then(|fs| fs.dequeue(&mut self.queued));
                if let Some(p) = waiting {
                    self.reply(p.to, start_failed_reply(&e));
                }
                return;
            }
        };
        let channel = match handle.take_endpoint() {
            Some(c) if self.fns.contains_key(&id) => c,
            _ => {
                f.release();
                self.actions.push_back(Action::Destroy(handle));
                return;
            }
        };
        let inst_id = self.next_id();
        self.actions.push_back(Action::Attach {
            inst: inst_id,
            channel,
            leftover: Vec::new(),
        });
        f.metrics.instances.fetch_add(1, Relaxed);
        let mut inst = Inst::new(inst_id, f, handle, now);
        inst.fresh = true;
        let i = self.adopt(inst, now);
        self.next_for(i, now);
    }

    /// Timeouts (504, instance destroyed), queue expiry, kills of instances
    /// past their exit grace, fit estimates, scale-out, keep-warm reaping.
    pub(super) fn tick(&mut self, now: Instant) {
        for (_, inst) in self.insts.iter_mut() {
            inst.log_intake.note_drops(&inst.function, now);
        }
        let timed_out: Vec<usize> = self
            .insts
            .iter()
            .filter(|(_, i)| i.busy.as_ref().is_some_and(|b| b.deadline <= now))
            .map(|(k, _)| k)
            .collect();
        for i in timed_out {
            self.timed_out(i, now);
        }
        self.expire_queues(now);
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.dying)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.dying = waiting;
        for (_, mut handle) in due {
            handle.kill();
            self.actions.push_back(Action::Destroy(handle));
        }
        self.fit_instances(now);
        self.hand_over_idle(now);
        let waiting: Vec<String> = self
            .fns
            .iter()
            .filter(|(_, f)| !f.queue.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        for id in waiting {
            self.grow(&id, now);
        }
        let keep_warm = self.cfg.keep_warm;
        let cold: Vec<usize> = self
            .insts
            .iter()
            .filter(|(_, i)| i.busy.is_none() && now.duration_since(i.idle_since) >= keep_warm)
            .map(|(k, _)| k)
            .collect();
        let mut heirs = Vec::new();
        for i in cold {
            heirs.extend(self.retire(i, now));
        }
        for heir in heirs {
            self.take_over(Some(heir), now);
        }
    }

    /// Gives idle instances to cores starved of them. A core that became
    /// starved while this core's instances sat idle is otherwise never
    /// noticed (hand-overs are decided when a request finishes here); with
    /// this it waits at most a tick.
    fn hand_over_idle(&mut self, now: Instant) {
        let me = 1u64 << self.cfg.core;
        let ids: Vec<String> = self
            .fns
            .iter()
            .filter(|(_, fs)| !fs.idle.is_empty() && fs.f.starved.load(Relaxed) & !me != 0)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            while self.fns.get(&id).is_some_and(|fs| !fs.idle.is_empty()) {
                let Some(target) = self.hand_over_to(&id) else {
                    break;
                };
                let i = self.fns.get_mut(&id).and_then(|fs| fs.unpark());
                self.migrate(i.expect("checked non-empty"), target, now);
            }
        }
    }

    /// Instance `i` did not answer in time: 504, and it is destroyed (its
    /// slot as in [`CorePool::instance_failed`]).
    fn timed_out(&mut self, i: usize, now: Instant) {
        let inst = &mut self.insts[i];
        let busy = inst.busy.take().expect("timed out while busy");
        let f = inst.function.clone();
        f.metrics.error(ErrorKind::Timeout);
        let note = format!(
            "Task timed out after {} ms; instance destroyed",
            f.spec.timeout_ms
        );
        f.logs
            .lock()
            .unwrap()
            .push(&busy.request_id, true, note.as_bytes());
        let message = format!(
            "the function did not answer within {} ms",
            f.spec.timeout_ms
        );
        let reply = Reply::error(504, "function_timeout", &message);
        self.answer_running(self.insts[i].id, busy.to, reply, None);
        let heir = self.retire_failed(i, now);
        self.grow(&f.spec.id, now);
        self.take_over(heir, now);
        self.give_slot(&f.spec.id, now);
    }

    /// Queued requests past their queue deadline get 504.
    fn expire_queues(&mut self, now: Instant) {
        let mut expired = Vec::new();
        for fs in self.fns.values_mut() {
            while fs.queue.front().is_some_and(|p| p.queue_deadline <= now) {
                let p = fs.dequeue(&mut self.queued).expect("front exists");
                fs.f.metrics.error(ErrorKind::Timeout);
                expired.push((p.to, now.duration_since(p.arrived).as_millis()));
            }
        }
        for (to, waited) in expired {
            let message = format!("no instance became free within {waited} ms");
            self.reply(to, Reply::error(504, "queue_timeout", &message));
        }
    }
}

impl FnState {
    /// Requests queued beyond those an instance is starting for.
    pub(super) fn uncovered(&self) -> usize {
        self.queue.len().saturating_sub(self.starting)
    }
}

/// The answer to the request a failed start was for: the function's own code
/// failing to load is its error (502 `init_error`, `<errorType>: <message>`;
/// a function error in the service API's shape, using an attempt of an
/// asynchronous event, as on Lambda); anything else is the server's (503
/// `instance_start_failed`, which an asynchronous event retries without using
/// an attempt).
fn start_failed_reply(e: &crate::sandbox::StartError) -> Reply {
    match e {
        crate::sandbox::StartError::Init {
            error_type,
            message,
            ..
        } => Reply::error(502, "init_error", &format!("{error_type}: {message}")),
        _ => Reply::error(
            503,
            "instance_start_failed",
            &format!("could not start an instance: {e}"),
        ),
    }
}
