//! The per-core state every driver runs: streams, their HTTP logic, routing,
//! and this core's share of functions. Drivers call the `on_*` methods and
//! then perform the I/O that [`Worker::take_dirty`] asks for.

use std::net::IpAddr;
use std::os::fd::OwnedFd;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;

use crate::config::{WorkerPolicy, TICK};
use crate::engine::conn::{Conn, ConnState};
use crate::engine::cpu_meter::CpuMeter;
use crate::engine::stream::{Kind, Stream};
use crate::engine::Shared;
use crate::functions::sched::{Action, InstId, SchedConfig, Tick, INSTANCES_PER_CORE_MAX};
use crate::functions::CorePool;
use crate::http::parse::{self, Request};
use crate::http::reply::{Reply, ReplyTo};
use crate::http::response::{self, DateCache, Persistence};
use crate::metrics::{add, CoreMetrics};
use crate::protocol;
use crate::routes::{self, LambdaOp, Route};
use crate::sandbox::Endpoint;

/// How long a closing client may keep sending before it is cut off.
const LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// Over the output budget, a connection whose answers made no progress for this
/// long is closed.
pub const OUT_STALL: std::time::Duration = std::time::Duration::from_secs(1);

/// Index of a stream in the worker's slab.
pub type Token = usize;

/// Messages other threads send to a worker (control plane replies, started instances).
pub enum Msg {
    /// An answer for a connection waiting on the control plane.
    Reply { to: ReplyTo, reply: Reply },
    /// Functions were deployed, changed or deleted: refresh this core's view.
    FunctionsChanged,
    /// An instance finished starting (or failed to).
    InstanceStarted(crate::functions::Started),
    /// Another core hands over an idle instance (its function is starved here).
    InstanceMigrated(crate::functions::sched::Migrated),
    /// Another core sends a client connection with a request for a function
    /// whose instance this core holds (see [`crate::engine::relocate`]).
    ConnectionMoved(Box<crate::engine::relocate::MovedConn>),
    /// Core `from` has an idle instance of `function` and nothing queued for
    /// it: send it a request queued here (see `functions::sched::spill`).
    Pull { function: String, from: usize },
    /// Shut down gracefully.
    Shutdown,
}

/// What kind of invocation a request is, with what that kind needs.
pub enum Invocation {
    /// Through the function's URL, at `path` within it.
    Url { path: String },
    /// Through the Lambda service API (`Invoke`, `InvokeWithResponseStream`).
    Service(crate::functions::sched::ServiceInvoke),
}

/// One core's event-loop state.
pub struct Worker {
    pub core: usize,
    pub shared: Arc<Shared>,
    pub metrics: Arc<CoreMetrics>,
    pub streams: Slab<Stream>,
    pub parse_limits: parse::Limits,
    pub date: DateCache,
    pub now: Instant,
    pub inbox: Receiver<Msg>,
    pub fns: CorePool,
    /// The stream of each instance channel, by [`InstId::slot`].
    channels: Vec<Option<(InstId, Token)>>,
    /// Instances whose Runtime API this core serves, by [`InstId::slot`].
    pub(crate) rapis: Vec<Option<crate::engine::rapi::Rapi>>,
    cpu: CpuMeter,
    /// Set once shutdown started: no new accepts, no keep-alive.
    pub draining: bool,
    drain_deadline: Option<Instant>,
    pub(crate) dirty: Vec<Token>,
    next_serial: u64,
    clients: usize,
    /// Answer bytes queued on this core's connections and not yet sent.
    pub out_queued: usize,
    /// This core's share of `HttpLimits::out_bytes_total_max`.
    pub out_budget: usize,
    /// Connections with input waiting until `out_queued` falls within the budget.
    pub budget_paused: Vec<Token>,
    /// Body bytes charged to this core's connections ([`Conn::in_charge`]).
    pub in_held: usize,
    /// This core's share of `HttpLimits::in_bytes_total_max`.
    pub in_budget: usize,
    /// Whether this worker thread runs as `SCHED_BATCH` now (see `WorkerPolicy`).
    batch: bool,
    /// Setting the policy failed once (reported once).
    policy_failed: bool,
}

impl Worker {
    /// A worker for `core` with an empty slab.
    pub fn new(core: usize, shared: Arc<Shared>, inbox: Receiver<Msg>) -> Worker {
        let h = &shared.cfg.http;
        let parse_limits = parse::Limits {
            head_bytes_max: h.head_bytes_max,
            headers_max: h.headers_max,
            body_bytes_max: h.body_bytes_max,
        };
        let metrics = shared.core_metrics[core].clone();
        let out_budget = (h.out_bytes_total_max / shared.cfg.cores.max(1)).max(h.out_bytes_max);
        let in_budget = h.in_bytes_total_max / shared.cfg.cores.max(1);
        let sched = SchedConfig {
            core,
            cores: shared.core_metrics.len(),
            moves: shared.cfg.connection_moves,
            // Requests sent ahead, which the placement relies on, are the
            // process backend's (its Node shim queues them).
            beside: shared.cfg.instances_beside && shared.functions.backend_name() == "process",
            queue_depth_max: shared.cfg.queue_depth_max,
            keep_warm: shared.cfg.keep_warm,
            instances_max: INSTANCES_PER_CORE_MAX,
            memory: shared.functions.memory.clone(),
            seed: crate::util::random::random_u64(),
        };
        let now = Instant::now();
        Worker {
            core,
            fns: CorePool::new(
                sched,
                shared.functions.all(),
                now,
                crate::util::time::unix_time_ms_at(now),
            ),
            channels: Vec::new(),
            rapis: Vec::new(),
            cpu: CpuMeter::default(),
            shared,
            metrics,
            streams: Slab::with_capacity(1024),
            parse_limits,
            date: DateCache::default(),
            now,
            inbox,
            draining: false,
            drain_deadline: None,
            dirty: Vec::with_capacity(256),
            next_serial: 1,
            clients: 0,
            out_queued: 0,
            out_budget,
            budget_paused: Vec::new(),
            in_held: 0,
            in_budget,
            batch: false,
            policy_failed: false,
        }
    }

    /// Asks the driver to look at `tok` (output queued, closing, read state changed).
    pub fn mark(&mut self, tok: Token) {
        self.dirty.push(tok);
    }

    /// Streams the driver must look at; the list is left empty.
    pub fn take_dirty(&mut self, into: &mut Vec<Token>) {
        into.clear();
        std::mem::swap(into, &mut self.dirty);
    }

    /// Whether the core may accept another connection.
    pub fn can_accept(&self) -> bool {
        !self.draining && self.clients < self.shared.cfg.http.connections_per_core_max
    }

    /// Registers an accepted client socket, or refuses it (503) when its address
    /// already holds `connections_per_ip_max` connections.
    pub fn accepted(&mut self, fd: OwnedFd, peer: IpAddr) -> Option<Token> {
        if !self.shared.peers.try_open(peer) {
            add(&self.metrics.shed_per_ip, 1);
            self.refuse(
                fd,
                "too_many_connections_from_address",
                "this address holds too many connections, retry later",
            );
            return None;
        }
        let conn = Conn {
            serial: self.next_serial(),
            peer,
            state: ConnState::Idle,
            deadline: self.now + self.shared.cfg.http.keepalive_timeout,
            phases: crate::engine::phases::Track::new(self.now),
            moving: None,
            in_charge: 0,
            unacked_seen: 0,
        };
        let tok = self.streams.insert(Stream::new(fd, Kind::Client(conn)));
        self.client_joined();
        add(&self.metrics.accepted_connections, 1);
        self.mark(tok);
        Some(tok)
    }

    /// A fresh serial for a client connection (its replies carry it).
    pub(crate) fn next_serial(&mut self) -> u64 {
        let serial = self.next_serial;
        self.next_serial += 1;
        serial
    }

    /// Counts a client connection that arrived on this core.
    pub(crate) fn client_joined(&mut self) {
        self.clients += 1;
        self.metrics
            .open_connections
            .store(self.clients as u64, Ordering::Relaxed);
    }

    /// Counts a client connection that closed or moved away.
    pub(crate) fn client_left(&mut self) {
        self.clients -= 1;
        self.metrics
            .open_connections
            .store(self.clients as u64, Ordering::Relaxed);
    }

    /// Bytes arrived on `tok`.
    pub fn on_data(&mut self, tok: Token, bytes: &[u8]) {
        let Some(s) = self.streams.get_mut(tok) else {
            return;
        };
        // Input after a client's last answer is never parsed; keeping it would let a
        // peer that does not read grow the buffer without bound.
        if s.linger_until.is_some() || (s.closing && matches!(s.kind, Kind::Client(_))) {
            return;
        }
        s.push_input(bytes);
        if s.detaching {
            // Kept for the core that takes the stream over.
            return;
        }
        match s.kind {
            Kind::Client(_) => {
                add(&self.metrics.bytes_in, bytes.len() as u64);
                self.process_client(tok)
            }
            Kind::Channel(id) => {
                // Bytes from a channel the scheduler let go of are not its business.
                if self.channel(id) != Some(tok) {
                    return;
                }
                let s = &mut self.streams[tok];
                let n = self.fns.on_channel_input(id, s.input(), self.now);
                s.consume(n);
            }
            Kind::Rapi(inst, role) => self.rapi_data(tok, inst, role),
        }
        self.run_actions();
    }

    /// The peer finished sending on `tok` (a read returned EOF). A client may
    /// half-close right after its last request, so answers already queued are
    /// still written before the connection closes; a request still being read
    /// or waited on is abandoned.
    pub fn on_eof(&mut self, tok: Token) {
        let Some(s) = self.streams.get_mut(tok) else {
            return;
        };
        let answered = match &s.kind {
            Kind::Client(c) => !matches!(c.state, ConnState::Waiting { .. }),
            Kind::Channel(_) | Kind::Rapi(..) => false,
        };
        if answered && !s.dead && s.linger_until.is_none() && s.out_pending() > 0 {
            s.peer_closed = true;
            s.closing = true;
            // Reading again would only return EOF again.
            s.read_paused = true;
            self.mark(tok);
        } else {
            self.on_closed(tok);
        }
    }

    /// The peer closed `tok` or it failed.
    pub fn on_closed(&mut self, tok: Token) {
        let Some(s) = self.streams.get(tok) else {
            return;
        };
        if s.detaching {
            // Moving to another core, which will see the end of file itself.
            self.mark(tok);
            return;
        }
        if let Kind::Rapi(inst, role) = s.kind {
            self.rapi_closed(tok, inst, role);
            self.run_actions();
            return;
        }
        if let Kind::Channel(id) = s.kind {
            if self.channel(id) == Some(tok) {
                let unsent = s.unsent();
                self.fns.on_channel_closed(id, &unsent, self.now);
                self.run_actions();
            }
        }
        self.close_stream(tok);
    }

    /// Shuts a stream down now (the driver frees it once idle).
    pub fn close_stream(&mut self, tok: Token) {
        let Some(s) = self.streams.get_mut(tok) else {
            return;
        };
        if !s.dead {
            if matches!(s.kind, Kind::Client(_)) {
                self.stream_resume(tok);
            }
            let s = &mut self.streams[tok];
            s.dead = true;
            s.closing = true;
            if let Kind::Client(c) = &mut s.kind {
                crate::engine::conn::release_input(&mut self.in_held, &self.shared.peers, c);
                if let ConnState::Waiting { invoke: true, .. } = c.state {
                    self.fns.on_client_gone(ReplyTo {
                        token: tok,
                        serial: c.serial,
                    });
                }
                self.shared.peers.close(c.peer);
                self.client_left();
            }
            self.mark(tok);
        }
    }

    /// Moves a closing stream on once its output is flushed. Clients are first
    /// half-closed and lingered (see [`Stream::linger_until`]); others close at once.
    pub fn close_step(&mut self, tok: Token) {
        let now = self.now;
        let Some(s) = self.streams.get_mut(tok) else {
            return;
        };
        if s.dead || !s.closing || s.out_pending() > 0 {
            return;
        }
        if s.peer_closed {
            // Everything the peer sent was read: no reset can hit the answer.
            self.close_stream(tok);
            return;
        }
        match (&s.kind, s.linger_until) {
            (Kind::Client(_), None) => {
                // SAFETY: shutdown on a descriptor we own.
                unsafe { libc::shutdown(s.raw(), libc::SHUT_WR) };
                s.linger_until = Some(now + LINGER);
                s.read_paused = false;
                s.rbuf.clear();
                s.rpos = 0;
            }
            (Kind::Client(_), Some(_)) => {}
            (Kind::Channel(_) | Kind::Rapi(..), _) => self.close_stream(tok),
        }
    }

    /// Refuses a connection over the per-core limit with a 503.
    pub fn shed(&mut self, fd: OwnedFd) {
        add(&self.metrics.shed_connections, 1);
        self.refuse(
            fd,
            "too_many_connections",
            "connection limit reached, retry later",
        );
    }

    /// Writes a 503 with `code` on a connection that is not kept, then drops it.
    fn refuse(&mut self, fd: OwnedFd, code: &str, message: &str) {
        let r = Reply::error(503, code, message).with_header("retry-after", "1");
        let mut out = Vec::with_capacity(256);
        response::write(&mut out, &self.date, &r, Persistence::Close, false);
        // SAFETY: best-effort non-blocking write of a short answer on a socket we own.
        unsafe {
            libc::write(
                std::os::fd::AsRawFd::as_raw_fd(&fd),
                out.as_ptr() as *const libc::c_void,
                out.len(),
            )
        };
    }

    /// True when the loop may stop: drained, or the grace period is over.
    pub fn finished(&self) -> bool {
        self.draining && (self.clients == 0 || self.drain_deadline.is_some_and(|d| self.now >= d))
    }

    /// Called by the driver once a detaching stream has no I/O in flight: the
    /// stream leaves this core (its socket and unread bytes go with it).
    pub fn detached(&mut self, tok: Token) {
        let s = self.streams.remove(tok);
        self.release_out(s.out_counted);
        if matches!(s.kind, Kind::Client(_)) {
            return self.client_detached(s);
        }
        match s.kind {
            Kind::Channel(id) => {
                let leftover = s.rbuf[s.rpos..].to_vec();
                let endpoint = match s.wfd {
                    Some(tx) => Endpoint::Pipes { rx: s.fd, tx },
                    None => Endpoint::Channel(s.fd),
                };
                self.fns.on_detached(id, endpoint, leftover);
                self.run_actions();
            }
            Kind::Rapi(inst, role) => {
                self.rapi_detached(s, inst, role);
                self.run_actions();
            }
            Kind::Client(_) => unreachable!("handled above"),
        }
    }

    /// Called by the driver when a dead stream has no I/O in flight: frees it.
    pub fn free(&mut self, tok: Token) {
        let s = self.streams.remove(tok);
        self.release_out(s.out_counted);
    }

    /// The driver wrote `n` bytes of `tok`'s output.
    pub fn on_sent(&mut self, tok: Token, n: usize) {
        if let Some(s) = self.streams.get_mut(tok) {
            let d = n.min(s.out_counted);
            s.out_counted -= d;
            if n > 0 {
                s.out_progress = Some(self.now);
            }
            self.release_out(d);
        }
    }

    /// Over the core's output budget, closes the connections whose answers have
    /// not moved for [`OUT_STALL`], largest first, until the excess is covered:
    /// clients that never read cannot hold the server's memory.
    fn evict_stalled(&mut self) {
        if self.out_queued <= self.out_budget {
            return;
        }
        let now = self.now;
        let mut stalled: Vec<(usize, Token)> = self
            .streams
            .iter()
            .filter(|(_, s)| {
                // A connection on its way to another core is not this core's
                // to close (closing it here would count it gone twice).
                matches!(s.kind, Kind::Client(_))
                    && !s.dead
                    && !s.detaching
                    && s.out_counted > 0
                    && s.out_progress
                        .is_some_and(|t| now.duration_since(t) >= OUT_STALL)
            })
            .map(|(t, s)| (s.out_counted, t))
            .collect();
        stalled.sort_unstable_by_key(|&(held, _)| std::cmp::Reverse(held));
        let mut excess = self.out_queued - self.out_budget;
        for (held, tok) in stalled {
            if excess == 0 {
                break;
            }
            add(&self.metrics.out_evicted, 1);
            self.close_stream(tok);
            excess = excess.saturating_sub(held);
        }
    }

    /// Returns `n` bytes to the core's output budget; once within it, the
    /// connections that waited for it go on.
    fn release_out(&mut self, n: usize) {
        self.out_queued -= n;
        if self.out_queued <= self.out_budget && !self.budget_paused.is_empty() {
            for tok in std::mem::take(&mut self.budget_paused) {
                // A slot freed meanwhile may hold another stream: only the one
                // that waited is resumed.
                match self.streams.get_mut(tok) {
                    Some(s) if s.budget_wait => s.budget_wait = false,
                    _ => continue,
                }
                self.process_client(tok);
                self.mark(tok);
            }
        }
    }

    /// All of `tok`'s output was written.
    pub fn on_flushed(&mut self, tok: Token) {
        if let Some(s) = self.streams.get_mut(tok) {
            s.trim();
            match &mut s.kind {
                Kind::Client(c) => {
                    c.phases.flushed(self.now, &self.metrics.phases);
                    self.stream_resume(tok);
                    self.process_client(tok);
                }
                &mut Kind::Rapi(inst, crate::engine::rapi::Role::Conn(i)) => {
                    self.rapi_flushed(tok, inst, i)
                }
                Kind::Channel(_) | Kind::Rapi(..) => {}
            }
        }
    }

    /// How long the loop may sleep from `now`: until the next tick
    /// ([`TICK`] after `last_tick`) or the scheduler's next look at a queue
    /// (`CorePool::spill_due`), whichever comes first.
    pub fn sleep_for(&self, last_tick: Instant, now: Instant) -> Duration {
        let tick = (last_tick + TICK).saturating_duration_since(now);
        match self.fns.spill_due() {
            Some(t) => tick.min(t.saturating_duration_since(now)),
            None => tick,
        }
    }

    /// After a wake-up: the scheduler's look at a queue, if due, and the
    /// tick, if [`TICK`] passed since `last_tick`.
    pub fn timers(&mut self, last_tick: &mut Instant) {
        if self.fns.spill_due().is_some_and(|t| t <= self.now) {
            self.fns.on_spill_check(self.now);
            self.run_actions();
        }
        if self.now.duration_since(*last_tick) >= TICK {
            *last_tick = self.now;
            self.on_tick();
        }
    }

    /// Periodic work: timeouts, idle instances, the clock.
    pub fn on_tick(&mut self) {
        self.date.refresh();
        self.evict_stalled();
        self.metrics
            .out_queued
            .store(self.out_queued as u64, Ordering::Relaxed);
        self.metrics
            .in_held
            .store(self.in_held as u64, Ordering::Relaxed);
        self.expire_clients();
        let now = self.now;
        let lingered: Vec<Token> = self
            .streams
            .iter()
            .filter(|(_, s)| !s.dead && s.linger_until.is_some_and(|t| t <= now))
            .map(|(t, _)| t)
            .collect();
        for t in lingered {
            self.close_stream(t);
        }
        let cpu_busy_pct = self.cpu.sample(self.core);
        let worker_cpu = self.cpu.own_cpu();
        self.fns.on_tick(Tick {
            now,
            wall_ms: crate::util::time::unix_time_ms_at(now),
            cpu_busy_pct,
            worker_cpu,
        });
        if self.shared.cfg.worker_policy == WorkerPolicy::Adaptive {
            self.set_batch(self.fns.worker_batch());
        }
        self.run_actions();
    }

    /// Switches this worker thread to `SCHED_BATCH` or back to the default
    /// policy, if it is not there yet. Threads it spawns afterwards inherit
    /// the policy; the starter threads and the sandbox launcher reset it.
    pub fn set_batch(&mut self, batch: bool) {
        if batch == self.batch {
            return;
        }
        match crate::util::cpu::set_batch(batch) {
            Ok(()) => {
                self.batch = batch;
                self.metrics
                    .batch
                    .store(u64::from(batch), Ordering::Relaxed);
            }
            // Logged once: the next tick would fail the same way.
            Err(e) if !self.policy_failed => {
                self.policy_failed = true;
                eprintln!(
                    "hearth: worker {}: cannot set its scheduling policy: {e}",
                    self.core
                );
            }
            Err(_) => {}
        }
    }

    /// Handles queued messages; returns false when the worker should stop.
    pub fn on_wake(&mut self) {
        while let Ok(msg) = self.inbox.try_recv() {
            match msg {
                Msg::Reply { to, reply } => self.answer_async(to, &reply, None),
                Msg::FunctionsChanged => self
                    .fns
                    .on_functions_changed(self.shared.functions.all(), self.now),
                Msg::InstanceStarted(started) => self.fns.on_started(started, self.now),
                Msg::InstanceMigrated(m) => self.fns.on_migrated(m, self.now),
                Msg::ConnectionMoved(m) => self.moved_in(*m),
                Msg::Pull { function, from } => self.fns.on_pull(&function, from, self.now),
                Msg::Shutdown => self.start_drain(),
            }
            self.run_actions();
        }
    }

    /// Stops keep-alive and closes idle connections; in-flight requests finish.
    fn start_drain(&mut self) {
        self.draining = true;
        self.drain_deadline = Some(self.now + self.shared.cfg.shutdown_grace);
        let idle: Vec<Token> = self
            .streams
            .iter()
            .filter(|(_, s)| matches!(&s.kind, Kind::Client(c) if matches!(c.state, ConnState::Idle) && s.out_pending() == 0))
            .map(|(t, _)| t)
            .collect();
        for t in idle {
            self.close_stream(t);
        }
    }

    /// True once draining and no client remains.
    pub fn drained(&self) -> bool {
        self.draining && self.clients == 0
    }

    /// Carries out what the scheduler decided, in order.
    pub(crate) fn run_actions(&mut self) {
        while let Some(action) = self.fns.poll_action() {
            match action {
                Action::Send { inst, frame } => {
                    let Some(tok) = self.channel(inst) else {
                        self.rapi_send(inst, frame);
                        continue;
                    };
                    let f = &frame;
                    let wbuf = &mut self.streams[tok].wbuf;
                    protocol::encode(wbuf, f.kind, 0, f.request_id, &f.meta, &f.body);
                    self.mark(tok);
                }
                Action::Reply { to, reply, served } => self.answer_async(to, &reply, served),
                Action::StreamHead { to, head } => self.stream_head(to, &head),
                Action::StreamData { to, inst, data } => self.stream_data(to, inst, &data),
                Action::StreamEnd { to, data, complete } => self.stream_end(to, &data, complete),
                Action::Attach {
                    inst,
                    channel: Endpoint::RuntimeApi(served),
                    ..
                } => self.attach_rapi(inst, *served),
                Action::Attach {
                    inst,
                    channel: endpoint,
                    leftover,
                } => {
                    let mut stream = match endpoint {
                        Endpoint::Channel(fd) => Stream::new(fd, Kind::Channel(inst)),
                        Endpoint::Pipes { rx, tx } => Stream::pipes(rx, tx, Kind::Channel(inst)),
                        Endpoint::RuntimeApi(_) => unreachable!("matched above"),
                    };
                    if !stream.is_pipe() {
                        // Pipes stay blocking for io_uring, which would
                        // complete a read of an empty non-blocking pipe with
                        // EAGAIN instead of waiting; the epoll driver makes
                        // them non-blocking when it registers them.
                        set_nonblocking(stream.raw());
                    }
                    stream.push_input(&leftover);
                    let tok = self.streams.insert(stream);
                    if self.channels.len() <= inst.slot() {
                        self.channels.resize(inst.slot() + 1, None);
                    }
                    self.channels[inst.slot()] = Some((inst, tok));
                    self.mark(tok);
                }
                Action::Close(inst) => match self.take_channel(inst) {
                    Some(tok) => self.close_stream(tok),
                    None => self.rapi_close(inst),
                },
                Action::Detach(inst) => match self.take_channel(inst) {
                    Some(tok) => {
                        self.streams[tok].detaching = true;
                        self.mark(tok);
                    }
                    None => self.rapi_detach(inst),
                },
                Action::HandOver { core, instance } => {
                    // Dropped, it would keep its slot, memory and count for good.
                    let msg = Msg::InstanceMigrated(instance);
                    if let Err(Msg::InstanceMigrated(back)) = self.shared.try_send(core, msg) {
                        self.fns.on_hand_over_failed(core, back, self.now);
                    }
                }
                Action::Relocate { core, queued } => self.relocate(core, queued),
                Action::Pull { core, function } => {
                    let from = self.core;
                    self.shared.send(core, Msg::Pull { function, from })
                }
                Action::Start { function, cpus } => self
                    .shared
                    .functions
                    .request_start(self.core, cpus, function),
                Action::Destroy(handle) => self.shared.functions.destroy(handle),
            }
        }
    }

    /// Stops or resumes reading instance `inst`'s channel (see [`crate::engine::streamed`]).
    pub fn set_channel_paused(&mut self, inst: InstId, paused: bool) {
        if self.is_rapi(inst) {
            self.rapi_pause(inst, paused);
            return;
        }
        if let Some(tok) = self.channel(inst) {
            if self.streams[tok].read_paused != paused {
                self.streams[tok].read_paused = paused;
                self.mark(tok);
            }
        }
    }

    /// The stream of instance `inst`'s channel.
    fn channel(&self, inst: InstId) -> Option<Token> {
        match self.channels.get(inst.slot()) {
            Some(&Some((i, tok))) if i == inst => Some(tok),
            _ => None,
        }
    }

    /// Forgets instance `inst`'s channel; returns its stream.
    fn take_channel(&mut self, inst: InstId) -> Option<Token> {
        let tok = self.channel(inst)?;
        self.channels[inst.slot()] = None;
        Some(tok)
    }

    /// Kills every instance at server exit, after dropping their channels,
    /// and those sent here that the loop did not take (a start that finished,
    /// an instance handed over): dropped with the inbox, they would keep
    /// their slots and memory.
    pub fn shutdown_instances(&mut self) {
        for (_, tok) in self.channels.drain(..).flatten() {
            let _ = self.streams.try_remove(tok);
        }
        self.drop_rapis();
        self.fns.shutdown();
        while let Ok(msg) = self.inbox.try_recv() {
            match msg {
                Msg::InstanceStarted(started) => started.discard(),
                Msg::InstanceMigrated(m) => m.discard(),
                _ => {}
            }
        }
    }

    /// Refreshes this core's view of the functions if `id` was published
    /// after it last looked (a deploy, or a function replacing another under
    /// its name), so that the request is not answered 404.
    pub(crate) fn catch_up(&mut self, id: &str) {
        if !self.fns.knows(id) && self.shared.functions.get(id).is_some() {
            let all = self.shared.functions.all();
            self.fns.on_functions_changed(all, self.now);
        }
    }

    /// Notes that the connection at `tok` waits on an invocation.
    fn mark_invoking(&mut self, tok: Token) {
        if let Kind::Client(Conn {
            state: ConnState::Waiting { invoke, .. },
            ..
        }) = &mut self.streams[tok].kind
        {
            *invoke = true;
        }
    }

    /// Routes a complete request.
    pub fn dispatch(&mut self, tok: Token, req: Request, body: Vec<u8>) {
        let head_only = req.method == "HEAD";
        let local = match routes::route(&req.method, req.path()) {
            Route::Health => Reply::new(200, "text/plain", b"ok".to_vec()),
            Route::Metrics => {
                let mut text = String::with_capacity(4096);
                crate::metrics::render_cores(&mut text, &self.shared.core_metrics);
                self.shared.functions.render_metrics(&mut text);
                Reply::new(200, "text/plain; version=0.0.4", text.into_bytes())
            }
            Route::MethodNotAllowed(allow) => {
                let message = format!("method {} is not allowed here", req.method);
                Reply::error(405, "method_not_allowed", &message).with_header("allow", allow)
            }
            Route::NotFound => {
                Reply::error(404, "not_found", &format!("no route for {}", req.path()))
            }
            Route::Invoke { id, path } => {
                // A name is looked up once here; the pool knows functions by id.
                let id = match crate::functions::valid_id(id) {
                    true => id.to_string(),
                    false => self
                        .shared
                        .functions
                        .id_of(id)
                        .unwrap_or_else(|| id.to_string()),
                };
                let path = path.to_string();
                return self.invoke(tok, id, Invocation::Url { path }, req, body);
            }
            Route::Lambda(LambdaOp::Invoke(name))
                if req.header("x-amz-invocation-type") == Some("Event") =>
            {
                let to = self.reply_to(tok);
                let (core, inboxes) = (self.core, self.shared.inboxes.clone());
                let done = Box::new(move |reply| inboxes.send(core, Msg::Reply { to, reply }));
                match self.shared.control.service_event(name, &req, body, done) {
                    Ok(()) => return,
                    Err(reply) => reply,
                }
            }
            Route::Lambda(LambdaOp::Invoke(name)) => {
                match self.shared.control.service_invoke(name, &req, &body) {
                    Err(reply) => reply,
                    Ok((id, invoke)) => {
                        return self.invoke(tok, id, Invocation::Service(invoke), req, body);
                    }
                }
            }
            Route::Lambda(LambdaOp::InvokeStream(name)) => {
                let checked = match req.header("x-amz-invocation-type") {
                    Some("Event") => Err(crate::control::lambda::lambda_error(
                        400,
                        "InvalidParameterValueException",
                        "InvokeWithResponseStream takes RequestResponse or DryRun",
                    )),
                    _ => self.shared.control.service_invoke(name, &req, &body),
                };
                match checked {
                    Err(reply) => reply,
                    Ok((id, mut invoke)) => {
                        invoke.stream = true;
                        return self.invoke(tok, id, Invocation::Service(invoke), req, body);
                    }
                }
            }
            _ => {
                let to = self.reply_to(tok);
                let (core, inboxes) = (self.core, self.shared.inboxes.clone());
                let done = Box::new(move |reply| inboxes.send(core, Msg::Reply { to, reply }));
                match self.shared.control.submit(req, body, done) {
                    Ok(()) => return,
                    Err(busy) => Reply::new(503, "application/json", busy),
                }
            }
        };
        self.answer(tok, &local, head_only);
    }

    /// Hands the invocation `req` of function `id` from the connection at
    /// `tok` to this core's scheduler, or first moves the connection to a core
    /// holding the function's instance (see [`crate::engine::relocate`]).
    fn invoke(&mut self, tok: Token, id: String, what: Invocation, req: Request, body: Vec<u8>) {
        self.catch_up(&id);
        let home = match self.shared.cfg.connection_moves {
            true => self.fns.home_core(&id),
            false => None,
        };
        if let Some(core) = home.filter(|&core| self.can_move(tok, core)) {
            return self.move_connection(tok, core, id, what, req, body);
        }
        self.invoke_here(tok, id, what, req, body);
    }

    /// Hands the invocation `req` of function `id` from the connection at
    /// `tok` to this core's scheduler (whose view has caught up with `id`).
    pub(crate) fn invoke_here(
        &mut self,
        tok: Token,
        id: String,
        what: Invocation,
        req: Request,
        body: Vec<u8>,
    ) {
        let to = self.reply_to(tok);
        let peer = self.peer(tok);
        self.mark_invoking(tok);
        match what {
            Invocation::Url { path } => self
                .fns
                .on_request(to, peer, &id, &path, req, body, self.now),
            Invocation::Service(invoke) => self
                .fns
                .on_service_invoke(to, peer, &id, req, body, invoke, self.now),
        }
        self.run_actions();
    }

    fn reply_to(&self, tok: Token) -> ReplyTo {
        match &self.streams[tok].kind {
            Kind::Client(c) => ReplyTo {
                token: tok,
                serial: c.serial,
            },
            Kind::Channel(_) | Kind::Rapi(..) => unreachable!("requests only come from clients"),
        }
    }

    fn peer(&self, tok: Token) -> IpAddr {
        match &self.streams[tok].kind {
            Kind::Client(c) => c.peer,
            Kind::Channel(_) | Kind::Rapi(..) => unreachable!("requests only come from clients"),
        }
    }
}

/// Puts a descriptor in non-blocking mode (the epoll driver needs it; io_uring ignores it).
pub fn set_nonblocking(fd: std::os::fd::RawFd) {
    // SAFETY: fcntl on a descriptor the caller owns.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
    }
}
