//! One core's instances and request queues.
//!
//! Per function: a LIFO of idle instances (the warmest first) and a bounded
//! FIFO of requests waiting for one. A request goes to an idle instance at
//! once; otherwise it queues and, below the function's concurrency limit, a
//! new instance is started for it. When the core's instance cap is reached,
//! functions waiting for a slot are served round robin (deficit round robin
//! with unit cost and equal quanta): a finishing instance of a function is
//! retired in favour of the next waiting function instead of serving its own
//! queue again, so a flooded function cannot starve the others.
//! Instances idle past the keep-warm period are destroyed (scale to zero);
//! an instance whose request timed out is destroyed, never reused.

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use super::logs::LogIntake;
use super::{Function, NoSlot, Reply, Started};
use crate::engine::conn::{ConnState, ReplyTo};
use crate::engine::stream::{Kind, Stream};
use crate::engine::worker::Token;
use crate::engine::Shared;
use crate::http::parse::Request;
use crate::metrics::{add, ErrorKind};
use crate::protocol::{self, FrameType, HEADER_BYTES};
use crate::sandbox::{Instance, SchedTime};
use crate::util::random::random_u64;
use crate::util::time::unix_time_ms;

/// Extra time a queued request may wait for an instance to start, beyond the
/// function's timeout (the init phase has its own limit, as on Lambda).
pub const QUEUE_INIT_ALLOWANCE: Duration = crate::sandbox::process::backend::INIT_TIMEOUT;

/// A queued request that waited this long scales its function out, if the
/// core has CPU to spare.
pub const SCALE_UP_WAIT: Duration = Duration::from_millis(2);
/// A queued request that waited this long scales its function out regardless.
pub const SCALE_UP_WAIT_MAX: Duration = Duration::from_millis(100);
/// CPU use (percent of the last tick) at which a core counts as saturated.
pub const CPU_SATURATED_PCT: u64 = 90;
/// Time an instance whose channel closed gets to exit by itself (the agent
/// sends its last log lines) before it is killed; checked every tick.
pub const EXIT_GRACE: Duration = Duration::from_millis(300);
/// A queued request of a function with no instance anywhere, which cannot
/// start one because the server's instance memory budget is taken, gets 503
/// `memory_budget_exhausted` after waiting this long for room.
pub const MEMORY_WAIT_MAX: Duration = Duration::from_secs(1);
/// Busy instance time a function needs in one tick before its fit is re-estimated.
const FIT_SAMPLE_MIN: Duration = Duration::from_millis(10);
/// Upper bound of an estimated fit (instances that keep one core busy).
const FIT_MAX: usize = 1024;

/// This core's CPU use over the last tick, from /proc/stat.
#[derive(Default)]
struct CpuMeter {
    busy: u64,
    total: u64,
    busy_pct: u64,
}

impl CpuMeter {
    fn sample(&mut self, cpu: usize) {
        let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
            return;
        };
        let name = format!("cpu{cpu} ");
        let Some(line) = stat.lines().find(|l| l.starts_with(&name)) else {
            return;
        };
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|x| x.parse().ok())
            .collect();
        if v.len() < 5 {
            return;
        }
        let total: u64 = v.iter().take(8).sum();
        let idle = v[3] + v[4]; // idle + iowait
        let busy = total - idle;
        if self.total > 0 && total > self.total {
            self.busy_pct = (busy - self.busy.min(busy)) * 100 / (total - self.total);
        }
        self.busy = busy;
        self.total = total;
    }

    fn saturated(&self) -> bool {
        self.busy_pct >= CPU_SATURATED_PCT
    }
}

/// Instances one core may hold over all functions.
pub const INSTANCES_PER_CORE_MAX: usize = 256;

/// A request waiting for (or running on) an instance.
struct Pending {
    to: ReplyTo,
    rid: u32,
    request_id: String,
    /// The INVOKE metadata without its closing brace; the deadline is added at dispatch.
    meta_head: Vec<u8>,
    body: Vec<u8>,
    arrived: Instant,
    /// Latest dispatch time: the function timeout plus the init allowance.
    queue_deadline: Instant,
}

/// The metadata of an INVOKE frame (see `include/hearth_protocol.h`), minus
/// `deadline_ms`, which is appended when the request is dispatched.
#[derive(serde::Serialize)]
struct InvokeMeta<'a> {
    method: &'a str,
    path: &'a str,
    query: &'a str,
    headers: &'a [(String, String)],
    source_ip: IpAddr,
    protocol: &'static str,
    request_id: &'a str,
    time_ms: u64,
    domain: &'a str,
}

struct Busy {
    to: ReplyTo,
    rid: u32,
    request_id: String,
    started: Instant,
    deadline: Instant,
}

struct Inst {
    function: Arc<Function>,
    handle: Box<dyn Instance>,
    tok: Token,
    busy: Option<Busy>,
    idle_since: Instant,
    /// Wall time spent on finished requests, cumulative.
    busy_done: Duration,
    /// Scheduler time and busy time at the last fit sample.
    mark: Option<(SchedTime, Duration)>,
    /// Its channel closed: it is exiting by itself.
    exiting: bool,
    /// What it may still add to its function's log from its channel.
    log_intake: LogIntake,
}

impl Inst {
    fn new(function: Arc<Function>, handle: Box<dyn Instance>, tok: Token, now: Instant) -> Inst {
        Inst {
            function,
            handle,
            tok,
            busy: None,
            idle_since: now,
            busy_done: Duration::ZERO,
            mark: None,
            exiting: false,
            log_intake: LogIntake::new(now),
        }
    }

    /// Wall time spent serving requests up to `now`, the running one included.
    fn busy_until(&self, now: Instant) -> Duration {
        self.busy_done
            + self
                .busy
                .as_ref()
                .map_or(Duration::ZERO, |b| now.saturating_duration_since(b.started))
    }
}

struct FnState {
    f: Arc<Function>,
    idle: Vec<usize>,
    queue: VecDeque<Pending>,
    /// Instances being started for this core.
    starting: usize,
    /// Instances of this function on this core (idle, busy; not starting).
    live: usize,
    /// When an instance of this function last became ready here: waits before
    /// it were start-up, not load.
    live_since: Instant,
    /// Instances that keep this core busy with this function's work, estimated
    /// from its instances' scheduler time (see [`CorePool::fit_instances`]);
    /// `None` until measured (and always for backends without schedstat).
    fit: Option<usize>,
    /// Busy instances to retire when they finish (the core is saturated and
    /// the function has more instances here than its fit).
    shrink: usize,
}

/// A core's share of all functions.
pub struct CorePool {
    core: usize,
    shared: Arc<Shared>,
    fns: HashMap<String, FnState>,
    insts: Slab<Inst>,
    /// Functions waiting for a free instance slot on this core, served in turn.
    slot_waiters: VecDeque<String>,
    next_rid: u32,
    rng: u64,
    /// Answers for the worker to write.
    pub replies: VecDeque<Reply>,
    /// Instances whose channel is being detached for a move to another core.
    migrating: HashMap<Token, Moving>,
    cpu: CpuMeter,
    /// Instances exiting by themselves, killed at the deadline if still there.
    dying: Vec<(Instant, Box<dyn Instance>)>,
}

/// An instance leaving this core: its function, its handle, the core it goes to.
type Moving = (Arc<Function>, Box<dyn Instance>, usize);

fn json_reply(to: ReplyTo, status: u16, code: &str, message: &str) -> Reply {
    Reply {
        to,
        status,
        headers: vec![("content-type".into(), "application/json".into())],
        body: crate::http::response::json_error(code, message),
    }
}

/// An idle instance moving between cores, with its channel and unread bytes.
pub struct Migrated {
    function: Arc<Function>,
    handle: Box<dyn Instance>,
    channel: std::os::fd::OwnedFd,
    leftover: Vec<u8>,
}

/// The first core after `me` (cyclically) whose bit is set in `mask`.
fn next_core(mask: u64, me: usize) -> usize {
    debug_assert!(mask != 0);
    let rotated = mask.rotate_right((me as u32 + 1) % 64);
    (rotated.trailing_zeros() as usize + me + 1) % 64
}

/// Is the connection behind `to` still waiting for an answer?
fn client_waiting(streams: &Slab<Stream>, to: ReplyTo) -> bool {
    matches!(streams.get(to.token), Some(Stream { kind: Kind::Client(c), dead: false, .. }) if c.serial == to.serial && matches!(c.state, ConnState::Waiting { .. }))
}

impl CorePool {
    /// An empty pool for `core`; the function view is filled by [`CorePool::refresh`].
    pub fn new(core: usize, shared: Arc<Shared>) -> CorePool {
        let mut p = CorePool {
            core,
            shared,
            fns: HashMap::new(),
            insts: Slab::new(),
            slot_waiters: VecDeque::new(),
            next_rid: 0,
            rng: random_u64() | 1,
            replies: VecDeque::new(),
            migrating: HashMap::new(),
            cpu: CpuMeter::default(),
            dying: Vec::new(),
        };
        p.sync_view(&mut Slab::new(), &mut Vec::new(), Instant::now());
        p
    }

    fn request_uuid(&mut self) -> String {
        // xorshift64*: unique enough for request ids, no syscall per request.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        let a = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        let b = a.rotate_left(29) ^ x;
        format!(
            "{:08x}-{:04x}-4{:03x}-{:04x}-{:012x}",
            (a >> 32) as u32,
            (a >> 16) as u16,
            (a & 0xfff) as u16,
            ((b >> 48) as u16 & 0x3fff) | 0x8000,
            b & 0xffff_ffff_ffff
        )
    }

    /// Handles one invocation request.
    #[allow(clippy::too_many_arguments)]
    pub fn invoke(
        &mut self,
        to: ReplyTo,
        peer: IpAddr,
        id: &str,
        path: &str,
        req: Request,
        body: Vec<u8>,
        streams: &mut Slab<Stream>,
        dirty: &mut Vec<Token>,
        now: Instant,
    ) {
        if !self.fns.contains_key(id) && self.shared.functions.get(id).is_some() {
            // Published after this core last looked (a deploy, or a function
            // replacing another under its name): catch up before answering.
            self.sync_view(streams, dirty, now);
        }
        let Some(fs) = self.fns.get(id) else {
            self.replies.push_back(json_reply(
                to,
                404,
                "function_not_found",
                &format!("no function with id {id}"),
            ));
            return;
        };
        let f = fs.f.clone();
        if f.deleted.load(Relaxed) {
            self.replies.push_back(json_reply(
                to,
                404,
                "function_not_found",
                &format!("function {id} was deleted"),
            ));
            return;
        }
        add(&f.metrics.invocations, 1);
        self.next_rid = self.next_rid.wrapping_add(1).max(1);
        let rid = self.next_rid;
        let request_id = self.request_uuid();
        let meta = InvokeMeta {
            method: &req.method,
            path,
            query: req.query(),
            headers: &req.headers,
            source_ip: peer,
            protocol: match req.version {
                crate::http::parse::Version::Http10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            request_id: &request_id,
            time_ms: unix_time_ms(),
            domain: req.header("host").unwrap_or("localhost"),
        };
        let mut meta_head = Vec::with_capacity(256 + 32 * req.headers.len());
        serde_json::to_writer(&mut meta_head, &meta).expect("json of plain values");
        assert_eq!(
            meta_head.pop(),
            Some(b'}'),
            "a JSON object ends with a brace"
        );
        let pending = Pending {
            to,
            rid,
            request_id,
            meta_head,
            body,
            arrived: now,
            queue_deadline: now + Duration::from_millis(f.spec.timeout_ms) + QUEUE_INIT_ALLOWANCE,
        };
        let fs = self.fns.get_mut(id).expect("looked up above");
        if let Some(i) = fs.idle.pop() {
            self.send(i, pending, streams, dirty, now);
            return;
        }
        // Requests covered by an instance being started for them are not
        // "waiting beyond the limit"; a full queue below the limit scales out.
        let at_limit = f.instances.load(Relaxed) >= f.spec.concurrency;
        if fs.queue.len().saturating_sub(fs.starting) >= self.shared.cfg.queue_depth_max && at_limit
        {
            f.metrics.error(ErrorKind::Throttled);
            let mut r = json_reply(
                to,
                429,
                "too_many_requests",
                &format!("function {id} is at its concurrency limit and its queue is full"),
            );
            r.headers.push(("retry-after".into(), "1".into()));
            self.replies.push_back(r);
            return;
        }
        fs.queue.push_back(pending);
        add(&f.metrics.queue_depth, 1);
        self.grow(id, streams, dirty, now);
    }

    /// Starts instances for queued requests not yet covered by one starting.
    fn grow(&mut self, id: &str, streams: &mut Slab<Stream>, dirty: &mut Vec<Token>, now: Instant) {
        loop {
            let Some(fs) = self.fns.get(id) else { return };
            let uncovered = fs.queue.len().saturating_sub(fs.starting);
            if uncovered == 0 || fs.f.deleted.load(Relaxed) {
                return;
            }
            // Scale out when the wait is worth an instance: nothing runs yet; the
            // queue is full; the first uncovered request waited SCALE_UP_WAIT
            // while this core has CPU to spare or the function has fewer
            // instances here than its fit; or it waited SCALE_UP_WAIT_MAX,
            // unless the core is saturated and the function is at its fit. On a
            // saturated core another CPU-bound instance only adds contention
            // (measured: ten on two busy cores serve 1.3-1.6x less than two).
            // Waits while an instance is starting say nothing about load.
            let nothing_running = fs.live + fs.starting == 0;
            let head_wait = match fs.queue.get(fs.starting) {
                Some(p) if fs.starting == 0 => {
                    now.saturating_duration_since(p.arrived.max(fs.live_since))
                }
                _ => Duration::ZERO,
            };
            let full = uncovered >= self.shared.cfg.queue_depth_max;
            let saturated = self.cpu.saturated();
            let below_fit = fs.fit.is_some_and(|f| fs.live + fs.starting < f);
            let at_fit = saturated && fs.fit.is_some() && !below_fit;
            if !(nothing_running
                || full
                || (head_wait >= SCALE_UP_WAIT_MAX && !at_fit)
                || (head_wait >= SCALE_UP_WAIT && (!saturated || below_fit)))
            {
                return;
            }
            if self.insts.len() + self.starting_total() >= INSTANCES_PER_CORE_MAX {
                if !self.slot_waiters.iter().any(|w| w == id) {
                    self.slot_waiters.push_back(id.to_string());
                }
                // Make room from idle instances of other functions.
                if !self.evict_idle(id, streams, dirty, now) {
                    return;
                }
                continue;
            }
            let fs = self.fns.get_mut(id).expect("present");
            match fs.f.try_reserve() {
                Ok(()) => {}
                Err(NoSlot::Concurrency) => {
                    // At the concurrency limit: let the cores holding instances know.
                    fs.f.starved.fetch_or(1u64 << self.core, Relaxed);
                    return;
                }
                Err(NoSlot::Memory) => {
                    // Make room from idle instances of other functions, as for slots.
                    if self.evict_idle(id, streams, dirty, now) {
                        continue;
                    }
                    self.over_memory_budget(id, now);
                    return;
                }
            }
            fs.starting += 1;
            add(&fs.f.metrics.cold_starts, 1);
            self.shared.functions.request_start(self.core, fs.f.clone());
        }
    }

    /// No room in the memory budget for an instance of `id`: its requests wait for
    /// instances held elsewhere (cores hand idle ones over) or for room; with no
    /// instance anywhere, those that waited [`MEMORY_WAIT_MAX`] get 503.
    fn over_memory_budget(&mut self, id: &str, now: Instant) {
        let Some(fs) = self.fns.get_mut(id) else {
            return;
        };
        fs.f.starved.fetch_or(1u64 << self.core, Relaxed);
        if fs.live + fs.starting > 0 || fs.f.instances.load(Relaxed) > 0 {
            return;
        }
        let memory = &self.shared.functions.memory;
        while fs
            .queue
            .front()
            .is_some_and(|p| now.saturating_duration_since(p.arrived) >= MEMORY_WAIT_MAX)
        {
            let p = fs.queue.pop_front().expect("front exists");
            fs.f.metrics.queue_depth.fetch_sub(1, Relaxed);
            fs.f.metrics.error(ErrorKind::Throttled);
            let mut r = json_reply(
                p.to,
                503,
                "memory_budget_exhausted",
                &format!(
                    "no instance of function {id} can start: {}",
                    memory.explain(u64::from(fs.f.spec.memory_mb))
                ),
            );
            r.headers.push(("retry-after".into(), "1".into()));
            self.replies.push_back(r);
        }
    }

    fn starting_total(&self) -> usize {
        self.fns.values().map(|f| f.starting).sum()
    }

    /// Destroys the longest-idle instance of a function other than `except`.
    fn evict_idle(
        &mut self,
        except: &str,
        streams: &mut Slab<Stream>,
        dirty: &mut Vec<Token>,
        now: Instant,
    ) -> bool {
        let victim = self
            .insts
            .iter()
            .filter(|(_, i)| i.busy.is_none() && i.function.spec.id != except)
            .min_by_key(|(_, i)| i.idle_since)
            .map(|(k, _)| k);
        match victim {
            Some(k) => {
                self.retire(k, streams, dirty, now);
                true
            }
            None => false,
        }
    }

    fn send(
        &mut self,
        i: usize,
        p: Pending,
        streams: &mut Slab<Stream>,
        dirty: &mut Vec<Token>,
        now: Instant,
    ) {
        let inst = &mut self.insts[i];
        let timeout_ms = inst.function.spec.timeout_ms;
        // The handler's clock starts now: queue time does not eat into it.
        let mut meta = p.meta_head;
        meta.extend_from_slice(
            format!(",\"deadline_ms\":{}}}", unix_time_ms() + timeout_ms).as_bytes(),
        );
        let s = &mut streams[inst.tok];
        protocol::encode(&mut s.wbuf, FrameType::Invoke, 0, p.rid, &meta, &p.body);
        dirty.push(inst.tok);
        inst.busy = Some(Busy {
            to: p.to,
            rid: p.rid,
            request_id: p.request_id,
            started: now,
            deadline: now + Duration::from_millis(timeout_ms),
        });
    }

    /// Gives an idle instance its next request, or parks it.
    fn next_for(
        &mut self,
        i: usize,
        streams: &mut Slab<Stream>,
        dirty: &mut Vec<Token>,
        now: Instant,
    ) {
        let id = self.insts[i].function.spec.id.clone();
        // Round robin between functions waiting for a slot on this core: hand this slot over.
        if let Some(pos) = self.slot_waiters.iter().position(|w| *w != id) {
            let waiter = self.slot_waiters.remove(pos).expect("position is valid");
            self.retire(i, streams, dirty, now);
            self.grow(&waiter, streams, dirty, now);
            self.grow(&id, streams, dirty, now);
            return;
        }
        let Some(fs) = self.fns.get_mut(&id) else {
            self.retire(i, streams, dirty, now);
            return;
        };
        // Another core has requests for this function but no slot under its
        // concurrency limit: share instances evenly between the cores that want them.
        let me = 1u64 << self.core;
        let starved = fs.f.starved.load(Relaxed) & !me;
        if starved != 0 {
            let share =
                (fs.f.spec.concurrency as usize / (1 + starved.count_ones() as usize)).max(1);
            if fs.queue.is_empty() || fs.live > share {
                let target = next_core(starved, self.core);
                fs.f.starved.fetch_and(!(1u64 << target), Relaxed);
                self.migrate(i, target, streams, dirty);
                return;
            }
        }
        while let Some(p) = fs.queue.pop_front() {
            fs.f.metrics.queue_depth.fetch_sub(1, Relaxed);
            if client_waiting(streams, p.to) {
                if fs.queue.is_empty() {
                    fs.f.starved.fetch_and(!me, Relaxed);
                }
                self.send(i, p, streams, dirty, now);
                return;
            }
        }
        fs.f.starved.fetch_and(!me, Relaxed);
        if fs.f.deleted.load(Relaxed) {
            self.retire(i, streams, dirty, now);
            return;
        }
        let inst = &mut self.insts[i];
        inst.idle_since = now;
        fs.idle.push(i);
    }

    /// Whether an instance of `id` that just finished a request should be
    /// retired (the core is saturated and `id` has more instances than its fit).
    fn take_shrink(&mut self, id: &str) -> bool {
        let Some(fs) = self.fns.get_mut(id) else {
            return false;
        };
        if fs.shrink > 0 && fs.live > fs.fit.unwrap_or(1).max(1) {
            fs.shrink -= 1;
            return true;
        }
        fs.shrink = 0;
        false
    }

    /// Starts moving an idle instance to `target`: its channel is detached
    /// from this core's driver first (see [`CorePool::finish_migration`]).
    fn migrate(
        &mut self,
        i: usize,
        target: usize,
        streams: &mut Slab<Stream>,
        dirty: &mut Vec<Token>,
    ) {
        let inst = self.insts.remove(i);
        if let Some(fs) = self.fns.get_mut(&inst.function.spec.id) {
            fs.idle.retain(|&k| k != i);
            fs.live -= 1;
        }
        streams[inst.tok].detaching = true;
        dirty.push(inst.tok);
        self.migrating
            .insert(inst.tok, (inst.function, inst.handle, target));
    }

    /// The driver released a migrating instance's channel: send it to its new core.
    pub fn finish_migration(
        &mut self,
        tok: Token,
        channel: std::os::fd::OwnedFd,
        leftover: Vec<u8>,
    ) {
        let Some((function, handle, target)) = self.migrating.remove(&tok) else {
            return;
        };
        let m = Migrated {
            function,
            handle,
            channel,
            leftover,
        };
        self.shared
            .send(target, crate::engine::worker::Msg::InstanceMigrated(m));
    }

    /// Takes over an instance from another core.
    pub fn on_migrated(
        &mut self,
        m: Migrated,
        streams: &mut Slab<Stream>,
        dirty: &mut Vec<Token>,
        now: Instant,
    ) {
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
            self.shared.functions.destroy(handle);
            return;
        }
        handle.repin(self.core);
        let i = self.insts.vacant_key();
        let mut stream = Stream::new(channel, Kind::Channel(i));
        stream.push_input(&leftover);
        let tok = streams.insert(stream);
        dirty.push(tok);
        self.insts.insert(Inst::new(f, handle, tok, now));
        let fs = self.fns.get_mut(&id).expect("checked");
        fs.live += 1;
        fs.live_since = now;
        self.next_for(i, streams, dirty, now);
        self.grow(&id, streams, dirty, now);
    }

    /// Removes an instance and destroys it off-loop; frees its concurrency slot.
    fn retire(
        &mut self,
        i: usize,
        streams: &mut Slab<Stream>,
        dirty: &mut Vec<Token>,
        now: Instant,
    ) {
        let mut inst = self.insts.remove(i);
        if !inst.exiting {
            inst.handle.kill();
        }
        if let Some(s) = streams.get_mut(inst.tok) {
            if !s.dead {
                s.dead = true;
                s.closing = true;
                dirty.push(inst.tok);
            }
        }
        let id = &inst.function.spec.id;
        if let Some(fs) = self.fns.get_mut(id) {
            fs.idle.retain(|&k| k != i);
            fs.live -= 1;
        }
        inst.function.metrics.instances.fetch_sub(1, Relaxed);
        inst.function.release();
        if inst.exiting {
            // It is exiting by itself: give the agent a moment to send its
            // last log lines, then kill it (see `on_tick`).
            self.dying.push((now + EXIT_GRACE, inst.handle));
        } else {
            self.shared.functions.destroy(inst.handle);
        }
        let id = id.clone();
        self.forget_if_drained(&id);
    }

    /// Frames arrived from an instance.
    pub fn on_channel_data(
        &mut self,
        tok: Token,
        i: usize,
        streams: &mut Slab<Stream>,
        dirty: &mut Vec<Token>,
        now: Instant,
    ) {
        loop {
            let Some(inst) = self.insts.get_mut(i) else {
                return;
            };
            let s = &mut streams[tok];
            let input = s.input();
            let h = match protocol::parse_header(input) {
                Ok(Some(h)) if input.len() >= h.frame_len() => h,
                Ok(_) => return,
                Err(e) => {
                    let f = inst.function.clone();
                    f.logs.lock().unwrap().push(
                        "host",
                        true,
                        format!("instance broke the protocol: {e}").as_bytes(),
                    );
                    return self.instance_failed(
                        i,
                        streams,
                        dirty,
                        now,
                        "the instance broke the protocol",
                    );
                }
            };
            let meta = &input[HEADER_BYTES..HEADER_BYTES + h.meta_len];
            let body = &input[HEADER_BYTES + h.meta_len..h.frame_len()];
            match h.kind {
                FrameType::Log => {
                    let rid_text = match &inst.busy {
                        Some(b) if b.rid == h.request_id => b.request_id.as_str(),
                        _ => "",
                    };
                    // Bounded work: LOG frames come from untrusted code.
                    inst.log_intake.take(
                        &inst.function,
                        rid_text,
                        h.flags & protocol::LOG_STDERR != 0,
                        body,
                        now,
                    );
                }
                FrameType::Response | FrameType::Error
                    if inst.busy.as_ref().is_some_and(|b| b.rid == h.request_id) =>
                {
                    let busy = inst.busy.take().expect("checked");
                    let f = inst.function.clone();
                    let took = now.saturating_duration_since(busy.started);
                    inst.busy_done += took;
                    f.metrics.observe_duration(took.as_micros() as u64);
                    let reply = if h.kind == FrameType::Response {
                        match response_reply(busy.to, meta, body) {
                            Ok((reply, dropped)) => {
                                if !dropped.is_empty() {
                                    let note = format!(
                                        "[hearth] left out of the response: {}",
                                        dropped.join(", ")
                                    );
                                    f.logs.lock().unwrap().push(
                                        &busy.request_id,
                                        true,
                                        note.as_bytes(),
                                    );
                                }
                                reply
                            }
                            Err(bad) => {
                                f.metrics.error(ErrorKind::Handler);
                                bad
                            }
                        }
                    } else if is_runtime_exit(meta) {
                        // The runtime died under the request: a crash, not a handler error.
                        inst.busy = Some(busy);
                        streams[tok].consume(h.frame_len());
                        return self.instance_failed(
                            i,
                            streams,
                            dirty,
                            now,
                            "the function's runtime exited",
                        );
                    } else {
                        f.metrics.error(ErrorKind::Handler);
                        let m: serde_json::Value = serde_json::from_slice(meta).unwrap_or_default();
                        let body = serde_json::to_vec(&serde_json::json!({
                            "error": "the function failed",
                            "code": "function_error",
                            "errorType": m["errorType"],
                            "errorMessage": m["errorMessage"],
                        }))
                        .expect("json");
                        Reply {
                            to: busy.to,
                            status: 502,
                            headers: vec![("content-type".into(), "application/json".into())],
                            body,
                        }
                    };
                    self.replies.push_back(reply);
                    streams[tok].consume(h.frame_len());
                    let id = f.spec.id.clone();
                    if self.take_shrink(&id) {
                        // Scale in: the others serve the queue.
                        self.retire(i, streams, dirty, now);
                    } else {
                        self.next_for(i, streams, dirty, now);
                    }
                    // The queue head may have waited long enough to scale out.
                    self.grow(&id, streams, dirty, now);
                    continue;
                }
                other => {
                    let msg = format!("unexpected {other:?} frame for request {}", h.request_id);
                    inst.function
                        .logs
                        .lock()
                        .unwrap()
                        .push("host", true, msg.as_bytes());
                    return self.instance_failed(
                        i,
                        streams,
                        dirty,
                        now,
                        "the instance broke the protocol",
                    );
                }
            }
            streams[tok].consume(h.frame_len());
        }
    }

    /// An instance's channel closed: it died.
    pub fn on_channel_closed(
        &mut self,
        i: usize,
        streams: &mut Slab<Stream>,
        dirty: &mut Vec<Token>,
        now: Instant,
    ) {
        if self.insts.contains(i) {
            self.insts[i].exiting = true;
            self.instance_failed(i, streams, dirty, now, "the instance exited");
        }
    }

    /// Answers the instance's request with 502 (if any), destroys it, replaces it if needed.
    fn instance_failed(
        &mut self,
        i: usize,
        streams: &mut Slab<Stream>,
        dirty: &mut Vec<Token>,
        now: Instant,
        why: &str,
    ) {
        let inst = &mut self.insts[i];
        let f = inst.function.clone();
        if let Some(busy) = inst.busy.take() {
            f.metrics.error(ErrorKind::Crash);
            let oom = inst.handle.oom_killed();
            let msg = if oom {
                format!(
                    "{why}: it exceeded its memory limit of {} MB",
                    f.spec.memory_mb
                )
            } else {
                why.to_string()
            };
            self.replies
                .push_back(json_reply(busy.to, 502, "instance_crashed", &msg));
        }
        self.retire(i, streams, dirty, now);
        let id = f.spec.id.clone();
        self.grow(&id, streams, dirty, now);
    }

    /// A starter thread finished.
    pub fn on_started(
        &mut self,
        started: Started,
        streams: &mut Slab<Stream>,
        dirty: &mut Vec<Token>,
        now: Instant,
    ) {
        let f = started.function;
        let id = f.spec.id.clone();
        if let Some(fs) = self.fns.get_mut(&id) {
            fs.starting = fs.starting.saturating_sub(1);
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
                    self.forget_if_drained(&id);
                    return;
                }
                if let Some(fs) = self.fns.get_mut(&id) {
                    if let Some(p) = fs.queue.pop_front() {
                        f.metrics.queue_depth.fetch_sub(1, Relaxed);
                        self.replies.push_back(json_reply(
                            p.to,
                            503,
                            "instance_start_failed",
                            &format!("could not start an instance: {e}"),
                        ));
                    }
                }
                return;
            }
        };
        let Some(channel) = handle.take_channel() else {
            f.release();
            self.shared.functions.destroy(handle);
            return;
        };
        if !self.fns.contains_key(&id) {
            f.release();
            self.shared.functions.destroy(handle);
            return;
        }
        let i = self.insts.vacant_key();
        let tok = streams.insert(Stream::new(channel, Kind::Channel(i)));
        crate::engine::worker::set_nonblocking(streams[tok].raw());
        dirty.push(tok);
        self.insts.insert(Inst::new(f.clone(), handle, tok, now));
        f.metrics.instances.fetch_add(1, Relaxed);
        let fs = self.fns.get_mut(&id).expect("checked");
        fs.live += 1;
        fs.live_since = now;
        self.next_for(i, streams, dirty, now);
    }

    /// Timeouts (504, instance destroyed), queue expiry, keep-warm reaping.
    pub fn on_tick(&mut self, streams: &mut Slab<Stream>, dirty: &mut Vec<Token>, now: Instant) {
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
            let inst = &mut self.insts[i];
            let busy = inst.busy.take().expect("filtered on busy");
            let f = inst.function.clone();
            f.metrics.error(ErrorKind::Timeout);
            f.logs.lock().unwrap().push(
                &busy.request_id,
                true,
                format!(
                    "Task timed out after {} ms; instance destroyed",
                    f.spec.timeout_ms
                )
                .as_bytes(),
            );
            self.replies.push_back(json_reply(
                busy.to,
                504,
                "function_timeout",
                &format!(
                    "the function did not answer within {} ms",
                    f.spec.timeout_ms
                ),
            ));
            self.retire(i, streams, dirty, now);
            self.grow(&f.spec.id.clone(), streams, dirty, now);
        }
        for fs in self.fns.values_mut() {
            while fs.queue.front().is_some_and(|p| p.queue_deadline <= now) {
                let p = fs.queue.pop_front().expect("front exists");
                fs.f.metrics.queue_depth.fetch_sub(1, Relaxed);
                fs.f.metrics.error(ErrorKind::Timeout);
                let waited = now.duration_since(p.arrived).as_millis();
                self.replies.push_back(json_reply(
                    p.to,
                    504,
                    "function_timeout",
                    &format!("no instance became free within {waited} ms"),
                ));
            }
        }
        let (due, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.dying)
            .into_iter()
            .partition(|(at, _)| *at <= now);
        self.dying = waiting;
        for (_, mut handle) in due {
            handle.kill();
            self.shared.functions.destroy(handle);
        }
        self.cpu.sample(self.core);
        self.fit_instances(streams, dirty, now);
        let waiting: Vec<String> = self
            .fns
            .iter()
            .filter(|(_, f)| !f.queue.is_empty())
            .map(|(id, _)| id.clone())
            .collect();
        for id in waiting {
            self.grow(&id, streams, dirty, now);
        }
        let keep_warm = self.shared.cfg.keep_warm;
        let cold: Vec<usize> = self
            .insts
            .iter()
            .filter(|(_, i)| i.busy.is_none() && now.duration_since(i.idle_since) >= keep_warm)
            .map(|(k, _)| k)
            .collect();
        for i in cold {
            self.retire(i, streams, dirty, now);
        }
    }

    /// Re-estimates each function's fit and, on a saturated core, scales in
    /// functions that have more instances here than their fit.
    ///
    /// Over the last tick, per function: `run` and `wait` are its instances'
    /// time on a CPU and waiting for one, `busy` their wall time serving
    /// requests. `busy - wait` is what a request would take without
    /// contention, `run / (busy - wait)` the share of it that needs this CPU,
    /// so about `(busy - wait) / run` instances keep the core busy: 1 for a
    /// CPU-bound handler, many for one that mostly waits on I/O. Contention
    /// makes the estimate high (the relay through the host is counted as
    /// waiting), so it converges from above as surplus instances go.
    fn fit_instances(&mut self, streams: &mut Slab<Stream>, dirty: &mut Vec<Token>, now: Instant) {
        let mut per_fn: HashMap<String, (u64, u64, Duration)> = HashMap::new();
        for (_, inst) in self.insts.iter_mut() {
            // Idle for the whole tick: nothing to learn, keep the old mark.
            if inst.busy.is_none()
                && now.saturating_duration_since(inst.idle_since) >= crate::engine::uring::TICK
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
        let saturated = self.cpu.saturated();
        let mut retire = Vec::new();
        for (id, fs) in self.fns.iter_mut() {
            if let Some(&(run, wait, busy)) = per_fn.get(id) {
                if busy >= FIT_SAMPLE_MIN {
                    let busy_ns = busy.as_nanos() as u64;
                    let alone = busy_ns.saturating_sub(wait).max(run).max(1);
                    // No CPU at all in that much busy time: it only waits.
                    fs.fit = Some(if run == 0 {
                        FIT_MAX
                    } else {
                        ((alone as f64 / run as f64).round() as usize).clamp(1, FIT_MAX)
                    });
                }
            }
            fs.shrink = 0;
            let Some(fit) = fs.fit else { continue };
            if saturated && fs.live > fit {
                let mut excess = fs.live - fit;
                // Idle ones go now, the longest idle first; busy ones when they finish.
                while excess > 0 && !fs.idle.is_empty() {
                    retire.push(fs.idle.remove(0));
                    excess -= 1;
                }
                fs.shrink = excess;
            }
        }
        for i in retire {
            self.retire(i, streams, dirty, now);
        }
    }

    /// Re-reads the registry after a deploy or delete.
    pub fn refresh(&mut self, streams: &mut Slab<Stream>, dirty: &mut Vec<Token>, now: Instant) {
        self.sync_view(streams, dirty, now);
    }

    fn sync_view(&mut self, streams: &mut Slab<Stream>, dirty: &mut Vec<Token>, now: Instant) {
        let current = self.shared.functions.all();
        for f in &current {
            self.fns
                .entry(f.spec.id.clone())
                .or_insert_with(|| FnState {
                    f: f.clone(),
                    idle: Vec::new(),
                    queue: VecDeque::new(),
                    starting: 0,
                    live: 0,
                    live_since: Instant::now(),
                    fit: None,
                    shrink: 0,
                });
        }
        let gone: Vec<String> = self
            .fns
            .keys()
            .filter(|id| !current.iter().any(|f| &f.spec.id == *id))
            .cloned()
            .collect();
        // A deleted function drains: new requests get 404, requests already queued
        // or running finish on the instances it has; then its state goes.
        for id in gone {
            self.slot_waiters.retain(|w| *w != id);
            let idle: Vec<usize> = self
                .fns
                .get_mut(&id)
                .map(|fs| fs.idle.drain(..).collect())
                .unwrap_or_default();
            for i in idle {
                self.retire(i, streams, dirty, now);
            }
            self.forget_if_drained(&id);
        }
    }

    /// Drops a deleted function's state once no instance of it is left here;
    /// requests still queued then (none could be served) get 404.
    fn forget_if_drained(&mut self, id: &str) {
        let Some(fs) = self.fns.get(id) else { return };
        if !fs.f.deleted.load(Relaxed) || fs.live > 0 || fs.starting > 0 {
            return;
        }
        let mut fs = self.fns.remove(id).expect("present");
        for p in fs.queue.drain(..) {
            fs.f.metrics.queue_depth.fetch_sub(1, Relaxed);
            self.replies.push_back(json_reply(
                p.to,
                404,
                "function_not_found",
                &format!("function {id} was deleted"),
            ));
        }
    }

    /// Kills every instance at server exit.
    pub fn shutdown(&mut self, streams: &mut Slab<Stream>) {
        for (_, mut handle) in self.dying.drain(..) {
            handle.kill();
            handle.destroy();
        }
        let all: Vec<usize> = self.insts.iter().map(|(k, _)| k).collect();
        for i in all {
            let mut inst = self.insts.remove(i);
            inst.handle.kill();
            let _ = streams.try_remove(inst.tok);
            inst.function.release();
            inst.function.metrics.instances.fetch_sub(1, Relaxed);
            inst.handle.destroy();
        }
    }
}

/// True for the ERROR the agent sends when the runtime process died mid-request.
fn is_runtime_exit(meta: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(meta)
        .is_ok_and(|m| m["errorType"] == "Runtime.ExitError")
}

/// Headers hearth owns on the wire: framing and connection management are
/// decided by hearth, never by a handler (RFC 9110 §7.6.1 hop-by-hop fields
/// among them, so no handler can switch a proxy in front into a tunnel).
const RESERVED_HEADERS: [&str; 9] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "upgrade",
    "date",
];

/// An RFC 9110 field name: a non-empty token.
fn is_token(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// An RFC 9110 field value: visible bytes, spaces and tabs, no controls.
fn is_field_value(value: &str) -> bool {
    value
        .bytes()
        .all(|b| b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80)
}

/// Builds the HTTP answer from a RESPONSE frame's metadata and body. Header
/// fields that are not valid RFC 9110 names and values, or that hearth owns,
/// are left out and described in the second value (for the function's log).
/// `Err` is the 502 for a response hearth will not send.
fn response_reply(to: ReplyTo, meta: &[u8], body: &[u8]) -> Result<(Reply, Vec<String>), Reply> {
    #[derive(serde::Deserialize)]
    struct Meta {
        status: u16,
        #[serde(default)]
        headers: Vec<(String, String)>,
    }
    match serde_json::from_slice::<Meta>(meta) {
        // hearth never sends an informational answer for a handler: a 101 would
        // tell a proxy in front to hand the connection over as a raw tunnel.
        Ok(m) if !(200..=599).contains(&m.status) => Err(json_reply(
            to,
            502,
            "bad_function_response",
            &format!(
                "the function answered status {}; a function's status must be 200-599",
                m.status
            ),
        )),
        Ok(m) => {
            let mut dropped = Vec::new();
            let headers = m
                .headers
                .into_iter()
                .filter(|(k, v)| {
                    if !is_token(k) || !is_field_value(v) {
                        dropped.push(format!("invalid header field {:?}", k));
                        return false;
                    }
                    let k = k.to_ascii_lowercase();
                    if RESERVED_HEADERS.contains(&k.as_str()) {
                        dropped.push(format!("header {k:?} (set by hearth)"));
                        return false;
                    }
                    true
                })
                .collect();
            Ok((
                Reply {
                    to,
                    status: m.status,
                    headers,
                    body: body.to_vec(),
                },
                dropped,
            ))
        }
        Err(_) => Err(json_reply(
            to,
            502,
            "bad_function_response",
            "the runtime sent a response hearth could not read",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TO: ReplyTo = ReplyTo {
        token: 0,
        serial: 1,
    };

    #[test]
    fn informational_and_out_of_range_statuses_become_502() {
        for status in [100, 101, 103, 199, 600, 0] {
            let meta = format!(r#"{{"status":{status},"headers":[["upgrade","websocket"]]}}"#);
            let bad = response_reply(TO, meta.as_bytes(), b"").expect_err("refused");
            assert_eq!(bad.status, 502, "status {status}");
        }
        assert!(response_reply(TO, br#"{"status":200}"#, b"").is_ok());
    }

    #[test]
    fn header_fields_must_be_valid_and_not_hearths() {
        let meta = serde_json::json!({
            "status": 200,
            "headers": [
                ["x-ok", "fine value\twith tab"],
                ["transfer-encoding\t", "chunked"],
                ["content-length ", "5"],
                ["Content-Length", "5"],
                ["Upgrade", "websocket"],
                ["bad name", "v"],
                ["", "v"],
                ["x-nul", "a\u{0}b"],
                ["x-ctl", "a\u{1b}b"],
                ["x\u{0}n", "v"],
                ["x-utf8", "héllo"],
            ]
        });
        let (reply, dropped) =
            response_reply(TO, meta.to_string().as_bytes(), b"body").expect("ok");
        let names: Vec<&str> = reply.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["x-ok", "x-utf8"]);
        assert_eq!(dropped.len(), 9, "{dropped:?}");
    }
}
