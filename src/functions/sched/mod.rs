//! One core's scheduler: its instances and request queues, as a sans-IO core.
//!
//! The engine's worker feeds it events (a request arrived, bytes from an
//! instance's channel, a channel closed, an instance started or failed to, a
//! tick with the time and the core's CPU use, an instance moved in from
//! another core, functions changed, a waiting client left) and carries out the
//! [`Action`]s it queues (write a frame to an instance, answer a client, attach,
//! close or detach a channel, hand an instance to another core, start or
//! destroy an instance). It never touches a socket, a stream or a ring, and time
//! is passed in, so the whole of it runs in unit tests with simulated time and
//! fake instances (`tests.rs`).
//!
//! Per function: a LIFO of idle instances (the warmest first) and a bounded
//! FIFO of requests waiting for one. A request goes to an idle instance at
//! once; otherwise it queues and, when waiting is worth an instance (see
//! [`scale`]), a new one is started for it below the function's concurrency
//! limit. When the core's instance cap is reached, functions waiting for a slot
//! are served round robin (deficit round robin with unit cost and equal
//! quanta): a finishing instance of a function is retired in favour of the
//! next waiting function instead of serving its own queue again, so a flooded
//! function cannot starve the others. Idle instances move to cores where their
//! function is starved ([`migrate`]). Instances idle past the keep-warm period
//! are destroyed (scale to zero); an instance whose request timed out is
//! destroyed, never reused.
//!
//! The modules: [`dispatch`] (queues, dispatch, retiring), [`scale`] (when to
//! scale out or in, and the fit estimate), [`migrate`] (hand-over between
//! cores), [`reply`] (instance answers to HTTP replies), [`stream`]
//! (streamed answers), [`preempt`] (whether the worker gives up wake-up
//! preemption while the core is crowded).

mod dispatch;
mod migrate;
pub mod preempt;
mod reply;
pub mod scale;
mod spill;
pub mod stream;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustc_hash::{FxHashMap, FxHashSet};
use slab::Slab;

use super::budget::Budget;
use super::logs::LogIntake;
use super::{Function, Started};
use crate::http::parse::Request;
use crate::http::reply::{Reply, ReplyTo};
use crate::metrics::add;
use crate::protocol::FrameType;
use crate::sandbox::{Endpoint, Instance, InstanceCpus, SchedTime};
pub use migrate::Migrated;

/// Extra time a queued request may wait for an instance to start, beyond the
/// function's timeout: the init phase has its own limit, as on Lambda. It is
/// the scheduler's own bound, chosen equal to the process backend's init
/// timeout (10 s) so that a request queued behind a cold start that uses all
/// of it still gets served.
pub const QUEUE_INIT_ALLOWANCE: Duration = Duration::from_secs(10);
/// A queued request that waited this long scales its function out while it
/// has fewer instances than its fit, or before the fit is known, while the
/// core has CPU to spare (see [`scale::scale_out`]).
pub const SCALE_UP_WAIT: Duration = Duration::from_millis(2);
/// A queued request that waited this long scales out a function whose fit is
/// not known yet, whatever the core's load.
pub const SCALE_UP_WAIT_MAX: Duration = Duration::from_millis(100);
/// Bound of the fits remembered per function (a tick each, over
/// [`scale::FIT_BAND`]; more only if ticks come faster than [`TICK`]).
const FIT_BAND_TICKS: usize = 64;
/// CPU use (percent of the last tick) at which a core counts as saturated.
pub const CPU_SATURATED_PCT: u64 = 90;
/// Time an instance whose channel closed gets to exit by itself (the agent
/// sends its last log lines) before it is killed; checked every tick.
pub const EXIT_GRACE: Duration = Duration::from_millis(300);
/// A queued request of a function with no instance anywhere, which cannot
/// start one because the server's instance memory budget is taken, gets 503
/// `memory_budget_exhausted` after waiting this long for room.
pub const MEMORY_WAIT_MAX: Duration = Duration::from_secs(1);
/// A function below its concurrency limit queues past `queue_depth_max` (its
/// full queue scales it out), but to no more than this many times it: when no
/// instance can start for it (the core holds its most instances, memory is
/// spent) the rest get 429 as at the limit.
pub const QUEUE_HARD_FACTOR: usize = 4;
/// What precedes the deadline, the INVOKE metadata's last element, added at dispatch.
const DEADLINE_SEP: &str = ",";
/// Times a queued request goes to another core, after an instance handed
/// there or spilled to an idle one (see [`spill`]); after that it waits where
/// it is (so a request cannot bounce between cores for as long as instances
/// do).
pub const RELOCATIONS_MAX: u8 = 2;
/// Instances one core may hold over all functions (the default of
/// [`SchedConfig::instances_max`]).
pub const INSTANCES_PER_CORE_MAX: usize = 256;
/// An instance is sent its next request ahead (see [`CorePool::send_ahead`])
/// only while its last request took at most this long: the request sent
/// ahead is bound to it, so it may wait up to about that long although
/// another instance freed up meanwhile.
pub const AHEAD_TOOK_MAX: Duration = Duration::from_millis(2);
/// Largest body of a request sent ahead: hearth keeps a copy of it, to queue
/// again should the instance fail before it starts.
pub const AHEAD_BODY_MAX: usize = 64 << 10;

/// What a core's scheduler is told once, at creation.
pub struct SchedConfig {
    /// The core it runs on (its bit in [`Function::starved`]).
    pub core: usize,
    /// How many cores serve (a function limited to fewer instances cannot
    /// have one on each: see [`CorePool::home_core`]).
    pub cores: usize,
    /// Client connections may move between cores (`--no-connection-moves`
    /// off): requests left queued behind an instance handed to another core
    /// go after it ([`Action::Relocate`]) instead of waiting for it to return,
    /// and requests spill to other cores' idle instances ([`spill`]).
    pub moves: bool,
    /// Instances of Node.js functions limited to one instance run their main
    /// thread on the next core's CPU and their other threads on this core's
    /// ([`SchedConfig::instance_cpus`]): set for the process backend
    /// (whose Node instances take requests sent ahead) with connection moves
    /// on and workers pinned.
    pub beside: bool,
    /// Requests a function may queue beyond those covered by starting instances
    /// once it is at its concurrency limit (`--queue-depth-max`).
    pub queue_depth_max: usize,
    /// How long an idle instance is kept (`--keep-warm`).
    pub keep_warm: Duration,
    /// Instances this core may hold over all functions.
    pub instances_max: usize,
    /// The server's instance memory budget (for the 503 that explains it).
    pub memory: Arc<Budget>,
    /// Seed of the request-id generator.
    pub seed: u64,
}

impl SchedConfig {
    /// The CPUs an instance of `f` held by this core (`core`) runs on: for a
    /// Node.js function limited to one instance when `beside` is on
    /// ([`crate::spec::FunctionSpec::runs_beside_its_worker`]), its main
    /// thread on the next core's CPU and V8's helper threads on this core's;
    /// else all on this core's. Such a function's requests all come to the
    /// core holding its instance ([`CorePool::home_core`]), so its worker's share of
    /// each request (parse, event, answer) and Node's would otherwise take
    /// turns on one CPU while the next one has room; side by side, a busy
    /// instance runs the request sent ahead to it ([`CorePool::send_ahead`]:
    /// the process backend's Node shim) without waiting for the worker
    /// (perf/RESULTS.md, "an instance beside its worker": Express a median
    /// 1.15x, p99 16-37 % shorter). Without requests sent ahead every request
    /// would cost a cross-CPU wake-up (0.69x for a quick handler, measured
    /// before they existed), so other runtimes stay on the worker's CPU. Only
    /// concurrency 1: the core's CPU load, which scales its instances
    /// (`saturated`, the fit), is read on its own CPU, and a lone
    /// instance's count does not scale. A function allowed more instances
    /// keeps each on its worker's CPU. The helpers: such an instance's Node
    /// runs its collector on helper threads (the process backend starts it
    /// without `--single-threaded-gc`), which on this core's CPU run beside
    /// its main thread instead of taking turns with it (perf/RESULTS.md,
    /// "V8's helpers on the worker's CPU"); this core's CPU load, which other
    /// functions' scaling reads, counts their share (~7 % of a core for
    /// Express at full speed).
    pub fn instance_cpus(&self, f: &Function) -> InstanceCpus {
        let cores = self.cores;
        if self.beside && cores > 1 && f.spec.runs_beside_its_worker() {
            InstanceCpus {
                main: (self.core + 1) % cores,
                helpers: self.core,
            }
        } else {
            InstanceCpus::on(self.core)
        }
    }
}

/// Identifies an instance on its core. The slot is reused after the instance
/// goes, the generation never is, so a stale id matches nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct InstId {
    slot: u32,
    gen: u32,
}

impl InstId {
    /// A small dense index: ids alive at the same time have distinct slots.
    pub fn slot(self) -> usize {
        self.slot as usize
    }
}

/// A frame for an instance's channel (encoded with [`crate::protocol::encode`]).
#[derive(Debug)]
pub struct Frame {
    /// The frame type (today always INVOKE).
    pub kind: FrameType,
    /// The request it belongs to, echoed in the instance's answer.
    pub request_id: u32,
    /// JSON metadata.
    pub meta: Vec<u8>,
    /// The payload (the request body).
    pub body: Vec<u8>,
}

/// What the scheduler asks its owner to do, in order.
pub enum Action {
    /// Write a frame to an instance's channel.
    Send { inst: InstId, frame: Frame },
    /// Answer the client waiting at `to` (if it still is); `served`: how an
    /// instance served it, for the phase timings.
    Reply {
        to: ReplyTo,
        reply: Reply,
        served: Option<Served>,
    },
    /// Start a streamed answer to the client at `to`: `head`'s status and
    /// headers, a body of unknown length to follow (its `body` is empty).
    StreamHead { to: ReplyTo, head: Reply },
    /// The next bytes of the streamed answer at `to`, from instance `inst`'s
    /// channel (whose reading the owner pauses while the client is slow).
    StreamData {
        to: ReplyTo,
        inst: Option<InstId>,
        data: Vec<u8>,
    },
    /// The streamed answer at `to` ends with `data`; `complete` false: it
    /// failed, and is cut off (the connection closes without the body's end).
    StreamEnd {
        to: ReplyTo,
        data: Vec<u8>,
        complete: bool,
    },
    /// Watch a new (or moved-in) instance's channel; `leftover` was read from
    /// it already and comes before anything read next.
    Attach {
        inst: InstId,
        channel: Endpoint,
        leftover: Vec<u8>,
    },
    /// Close an instance's channel: the instance is gone.
    Close(InstId),
    /// Stop watching an instance's channel and give it back, with its unread
    /// bytes, through [`CorePool::on_detached`] (it moves to another core).
    Detach(InstId),
    /// Give a detached instance to another core; should it not get there,
    /// give it back ([`CorePool::on_hand_over_failed`]).
    HandOver { core: usize, instance: Migrated },
    /// Ask `core`, which has requests of `function` queued, for its oldest:
    /// an instance of it is idle here ([`CorePool::on_pull`] there).
    Pull { core: usize, function: String },
    /// Move the connection waiting for `queued` to `core` (where the instance
    /// it waits for went), to be queued there ([`CorePool::on_relocated`]);
    /// if it cannot move, give the request back ([`CorePool::relocate_failed`]).
    Relocate { core: usize, queued: Queued },
    /// Start an instance of the function for this core, to run on `cpus`
    /// ([`SchedConfig::instance_cpus`]), off the event loop; the outcome comes
    /// back as [`CorePool::on_started`].
    Start {
        function: Arc<Function>,
        cpus: InstanceCpus,
    },
    /// Destroy an instance off the event loop.
    Destroy(Box<dyn Instance>),
}

/// How an instance served a request, on the event loop's clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    /// When the request was handed to the instance.
    pub sent: Instant,
    /// The instance was started (or restored) for it: the wait before `sent`
    /// was an acquire, not a queue wait.
    pub cold: bool,
}

/// One periodic tick.
#[derive(Clone, Copy, Debug)]
pub struct Tick {
    /// The event loop's clock.
    pub now: Instant,
    /// Wall clock at `now`, milliseconds since the Unix epoch (for the guest's
    /// deadlines; never read later than `now`, see `util::time::unix_time_ms_at`).
    pub wall_ms: u64,
    /// This core's CPU use over the last tick, percent.
    pub cpu_busy_pct: u64,
    /// CPU time the core's worker thread used over the last tick: hearth's
    /// own share of the core, which the run fit does not count as room for
    /// another running request ([`scale::host_share`]).
    pub worker_cpu: Duration,
}

/// Ends instance `handle` of `f` at server exit: killed and destroyed here
/// and now, its slot given back, no longer counted.
fn end_at_exit(f: &Function, mut handle: Box<dyn Instance>) {
    handle.kill();
    f.release();
    f.metrics.instances.fetch_sub(1, Relaxed);
    handle.destroy();
}

/// Whether the client at `to` left while its request waited (see
/// [`CorePool::on_client_gone`]); if so, it is forgotten with the shape its
/// answer would have had.
fn forget_if_left(
    gone: &mut FxHashSet<ReplyTo>,
    service: &mut FxHashMap<ReplyTo, ServiceInvoke>,
    to: &ReplyTo,
) -> bool {
    if gone.is_empty() || !gone.remove(to) {
        return false;
    }
    service.remove(to);
    true
}

/// A request waiting for an instance.
struct Pending {
    to: ReplyTo,
    rid: u32,
    request_id: String,
    /// The INVOKE metadata without its closing bracket; the deadline is added at dispatch.
    meta_head: Vec<u8>,
    body: Vec<u8>,
    arrived: Instant,
    /// Latest dispatch time: the function timeout plus the init allowance.
    queue_deadline: Instant,
    /// Times it went after an instance to another core (see
    /// [`RELOCATIONS_MAX`]).
    relocations: u8,
}

impl Pending {
    /// Its INVOKE frame's length when sent ahead (no deadline: the runtime
    /// sets it when it starts the request).
    fn frame_len_ahead(&self) -> usize {
        crate::protocol::HEADER_BYTES + self.meta_head.len() + 1 + self.body.len()
    }
}

/// A queued request on its way to another core with its client's connection.
pub struct Queued {
    function: String,
    /// The name of an unpublished function (the one a code update replaces).
    name: Option<String>,
    pending: Pending,
    /// How its answer is shaped, for a request of the Lambda service API.
    service: Option<ServiceInvoke>,
}

impl Queued {
    /// The client waiting for it (on the core it leaves).
    pub fn to(&self) -> ReplyTo {
        self.pending.to
    }

    /// The id of the function it invokes.
    pub fn function(&self) -> &str {
        &self.function
    }
}

/// The request an instance is serving.
struct Busy {
    to: ReplyTo,
    rid: u32,
    request_id: String,
    started: Instant,
    deadline: Instant,
    /// The instance was fresh from its start when it took the request.
    cold: bool,
    /// When the request arrived (it goes back to the queue if the instance
    /// never took it, see [`CorePool::undelivered`]).
    arrived: Instant,
    /// Length of its INVOKE frame on the channel.
    frame_len: usize,
    /// It was sent ahead: its frame carries no deadline.
    sent_ahead: bool,
}

/// An instance on this core.
struct Inst {
    id: InstId,
    function: Arc<Function>,
    handle: Box<dyn Instance>,
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
    /// Started here and not yet given a request (its first one waited for the start).
    fresh: bool,
    /// The request sent behind the running one, waiting in the runtime (a
    /// copy: it goes back to the queue if the instance fails first); only
    /// while `busy`.
    ahead: Option<Pending>,
    /// How long its last request took (`Duration::MAX` before the first).
    last_took: Duration,
}

impl Inst {
    /// A ready, idle instance.
    fn new(id: InstId, function: Arc<Function>, handle: Box<dyn Instance>, now: Instant) -> Inst {
        Inst {
            id,
            function,
            handle,
            busy: None,
            idle_since: now,
            busy_done: Duration::ZERO,
            mark: None,
            exiting: false,
            log_intake: LogIntake::new(now),
            fresh: false,
            ahead: None,
            last_took: Duration::MAX,
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

/// A function's state on this core.
struct FnState {
    f: Arc<Function>,
    /// This core (its bit in the function's `idle_on` and `backlog`).
    core: usize,
    /// Idle instances; changed only through [`FnState::park`] and the
    /// `unpark` methods, which keep `idle_on` in step.
    idle: Vec<usize>,
    /// One more request of it may run here now ([`CorePool::under_fit`], as
    /// of the last dispatch, park or tick): its idle instances take requests
    /// spilled from other cores (see [`spill`]).
    open: bool,
    queue: VecDeque<Pending>,
    /// Instances being started for this core.
    starting: usize,
    /// Instances of this function on this core (idle, busy; not starting).
    live: usize,
    /// When an instance of this function last became ready here: waits before
    /// it were start-up, not load.
    live_since: Instant,
    /// Instances that keep this core busy with this function's work (see
    /// [`scale::fit_estimate`]); `None` until measured (and always for
    /// backends without schedstat).
    fit: Option<usize>,
    /// The last tick's raw fit sample (see [`CorePool::fit_instances`]).
    fit_sample: Option<usize>,
    /// How many of its requests may run at once on a saturated core: the
    /// last tick's fit with the worker's own time on the core left out
    /// ([`scale::host_share`]), never above `fit`. `fit` keeps counting that
    /// time as room, so the instances it keeps serve bursts in parallel while
    /// the core has CPU to spare.
    run_fit: Option<usize>,
    /// The fit after each tick that measured it, over the last
    /// [`scale::FIT_BAND`], oldest first (at most [`FIT_BAND_TICKS`]).
    fit_recent: VecDeque<(Instant, usize)>,
    /// The core's view still lists it. Deleted and still listed, it was
    /// replaced or deleted since the last refresh: the function a code update
    /// put under its name may not be in the view yet.
    listed: bool,
}

impl FnState {
    fn new(f: Arc<Function>, core: usize, now: Instant) -> FnState {
        FnState {
            f,
            core,
            idle: Vec::new(),
            open: true,
            queue: VecDeque::new(),
            starting: 0,
            live: 0,
            live_since: now,
            fit: None,
            fit_sample: None,
            run_fit: None,
            fit_recent: VecDeque::new(),
            listed: true,
        }
    }

    /// Records the fit measured at the tick at `now`, forgetting those older
    /// than [`scale::FIT_BAND`].
    fn note_fit(&mut self, fit: usize, now: Instant) {
        while self
            .fit_recent
            .front()
            .is_some_and(|&(at, _)| now.saturating_duration_since(at) >= scale::FIT_BAND)
            || self.fit_recent.len() >= FIT_BAND_TICKS
        {
            self.fit_recent.pop_front();
        }
        self.fit_recent.push_back((now, fit));
    }

    /// The lowest fit of the last [`scale::FIT_BAND`] in which it was measured
    /// (a function that stopped running keeps the band it had): on a busy
    /// core the function scales out only below it.
    fn fit_low(&self) -> Option<usize> {
        self.fit_recent.iter().map(|&(_, f)| f).min().or(self.fit)
    }

    /// The highest fit of the last [`scale::FIT_BAND`] in which it was
    /// measured: the function scales in only above it.
    fn fit_high(&self) -> Option<usize> {
        self.fit_recent.iter().map(|&(_, f)| f).max().or(self.fit)
    }

    /// Queues a request; `queued` is the core's total.
    fn enqueue(&mut self, p: Pending, queued: &mut usize) {
        self.queue.push_back(p);
        add(&self.f.metrics.queue_depth, 1);
        *queued += 1;
        self.sync_backlog();
    }

    /// Puts a request that never reached its instance back at the head of
    /// the queue; `queued` is the core's total.
    fn requeue(&mut self, p: Pending, queued: &mut usize) {
        self.queue.push_front(p);
        add(&self.f.metrics.queue_depth, 1);
        *queued += 1;
        self.sync_backlog();
    }

    /// Queues a request that arrived earlier, maybe on another core, in its
    /// place by arrival (the queue stays oldest first, so the deadlines that
    /// `expire_queues` checks at the head stay in order); `queued` is the
    /// core's total.
    fn insert_by_arrival(&mut self, p: Pending, queued: &mut usize) {
        let at = self.queue.partition_point(|q| q.arrived <= p.arrived);
        self.queue.insert(at, p);
        add(&self.f.metrics.queue_depth, 1);
        *queued += 1;
        self.sync_backlog();
    }

    /// Takes the queued request at `at` (the head is 0); `queued` is the core's total.
    fn take_at(&mut self, at: usize, queued: &mut usize) -> Pending {
        let p = self.queue.remove(at).expect("a queued request at `at`");
        self.f.metrics.queue_depth.fetch_sub(1, Relaxed);
        *queued -= 1;
        self.sync_backlog();
        p
    }

    /// Takes the oldest queued request; `queued` is the core's total.
    fn dequeue(&mut self, queued: &mut usize) -> Option<Pending> {
        (!self.queue.is_empty()).then(|| self.take_at(0, queued))
    }

    /// Keeps this core's bit in [`Function::backlog`] set while requests queue here.
    fn sync_backlog(&self) {
        set_bit(&self.f.backlog, self.core, !self.queue.is_empty());
    }

    /// Lists instance `i` as idle.
    fn park(&mut self, i: usize) {
        self.idle.push(i);
        self.sync_idle();
    }

    /// Takes the most recently parked idle instance.
    fn unpark(&mut self) -> Option<usize> {
        let i = self.idle.pop();
        self.sync_idle();
        i
    }

    /// Removes instance `i` from the idle list, if it is there.
    fn unpark_slot(&mut self, i: usize) {
        self.idle.retain(|&k| k != i);
        self.sync_idle();
    }

    /// Takes the `n` longest idle instances.
    fn unpark_oldest(&mut self, n: usize) -> Vec<usize> {
        let taken = self.idle.drain(..n).collect();
        self.sync_idle();
        taken
    }

    /// Sets this core's bit in [`Function::idle_on`] when it has an idle
    /// instance that may take a request, clears it otherwise. (A core that sends a
    /// request here clears it too, ahead of the request's arrival.)
    fn sync_idle(&self) {
        set_bit(
            &self.f.idle_on,
            self.core,
            self.open && !self.idle.is_empty(),
        );
    }

    /// Keeps `core`'s bit in [`Function::homes`] set while it holds or starts
    /// an instance of this function; clears it once it has neither. (Another
    /// core sets the bit of a core it hands an instance to.)
    fn sync_home(&self, core: usize) {
        set_bit(&self.f.homes, core, self.live + self.starting > 0);
    }

    /// Tells the cores holding instances that `core` has requests waiting, and
    /// since when (the oldest's arrival, or `now` with none queued).
    fn mark_starved(&self, core: usize, now: Instant) {
        let since = self.queue.front().map_or(now, |p| p.arrived);
        self.f.starved_since[core].store(migrate::stamp(since), Relaxed);
        self.f.starved.fetch_or(1u64 << core, Relaxed);
    }
}

/// Sets or clears `core`'s bit in `bits`, writing only when it changes (the
/// word is shared by all cores; most calls find it as it should be).
fn set_bit(bits: &AtomicU64, core: usize, on: bool) {
    let bit = 1u64 << core;
    if (bits.load(Relaxed) & bit != 0) != on {
        match on {
            true => bits.fetch_or(bit, Relaxed),
            false => bits.fetch_and(!bit, Relaxed),
        };
    }
}

/// What the answer to a service API `Invoke` needs besides the function's.
#[derive(Clone, Default)]
pub struct ServiceInvoke {
    /// `X-Amz-Executed-Version`: `$LATEST` or the version number.
    pub version: String,
    /// `X-Amz-Log-Type: Tail`: return the end of the invocation's log.
    pub tail: bool,
    /// The request id, set when the request is accepted.
    pub request_id: String,
    /// The function, set when the request is accepted (for the log tail).
    pub function: Option<Arc<Function>>,
    /// `InvokeWithResponseStream`: answer in AWS event-stream framing.
    pub stream: bool,
}

/// A core's share of all functions.
pub struct CorePool {
    cfg: SchedConfig,
    /// Looked up several times per request by function id: FxHash, not
    /// SipHash (hashing was ~9 % of hearth's own instructions per request).
    /// Only the server inserts keys (ids of deployed functions, reply
    /// targets), so nobody can feed these maps colliding keys.
    fns: FxHashMap<String, FnState>,
    insts: Slab<Inst>,
    /// Generation of the last instance id handed out.
    gen: u32,
    /// Requests queued over all functions (the sum of the queue lengths).
    queued: usize,
    /// Functions waiting for a free instance slot on this core, served in turn.
    slot_waiters: VecDeque<String>,
    next_rid: u32,
    rng: u64,
    /// Wall clock at an instant: `(instant, ms since the epoch)`, set each tick.
    clock: (Instant, u64),
    /// This core's CPU use over the last tick, percent.
    cpu_busy_pct: u64,
    /// The worker's CPU time over the last tick, and that tick's length.
    worker_cpu: Duration,
    tick_len: Duration,
    /// This tick's requests and answers, and whether the worker should run
    /// without wake-up preemption ([`CorePool::worker_batch`]).
    preempt: preempt::Preempt,
    /// Clients that left while their request was queued or running here.
    gone: FxHashSet<ReplyTo>,
    /// When a queue here that another core could take requests from will be
    /// stuck ([`spill::SPILL_AFTER`]), and the functions to look at then
    /// (see [`CorePool::on_spill_check`]).
    spill_check: Option<Instant>,
    spill_ids: Vec<String>,
    /// Requests that came through the Lambda service API's `Invoke`: their
    /// answers take Lambda's shape ([`reply::service_reply`]).
    service: FxHashMap<ReplyTo, ServiceInvoke>,
    /// Streamed answers in progress, by the instance that streams.
    streams: FxHashMap<InstId, stream::Streaming>,
    /// What the owner is to do next.
    actions: VecDeque<Action>,
    /// Instances whose channel is being detached for a move to another core.
    migrating: FxHashMap<InstId, migrate::Moving>,
    /// Instances exiting by themselves, killed at the deadline if still there.
    dying: Vec<(Instant, Box<dyn Instance>)>,
}

impl CorePool {
    /// A pool for `cfg.core` holding `functions`; `wall_ms` is the wall clock at `now`.
    pub fn new(
        cfg: SchedConfig,
        functions: Vec<Arc<Function>>,
        now: Instant,
        wall_ms: u64,
    ) -> CorePool {
        let rng = cfg.seed | 1;
        let mut p = CorePool {
            cfg,
            fns: FxHashMap::default(),
            insts: Slab::new(),
            gen: 0,
            queued: 0,
            slot_waiters: VecDeque::new(),
            next_rid: 0,
            rng,
            clock: (now, wall_ms),
            cpu_busy_pct: 0,
            worker_cpu: Duration::ZERO,
            tick_len: Duration::ZERO,
            preempt: preempt::Preempt::default(),
            gone: FxHashSet::default(),
            spill_check: None,
            spill_ids: Vec::new(),
            service: FxHashMap::default(),
            streams: FxHashMap::default(),
            actions: VecDeque::new(),
            migrating: FxHashMap::default(),
            dying: Vec::new(),
        };
        p.on_functions_changed(functions, now);
        p
    }

    /// Whether the core was crowded over its last ticks, so that its worker
    /// gains nothing from preempting its instances (see [`preempt`]).
    pub fn worker_batch(&self) -> bool {
        self.preempt.batch()
    }

    /// Whether an instance on this core is running a request.
    pub fn running(&self) -> bool {
        self.insts.iter().any(|(_, i)| i.busy.is_some())
    }

    /// Whether this core has function `id` in its view (its owner refreshes
    /// the view when a function was published after the last refresh).
    pub fn knows(&self, id: &str) -> bool {
        self.fns.contains_key(id)
    }

    /// Whether function `id` takes new requests here: this core's view has
    /// it, not deleted (a deleted one it still has only drains what was
    /// queued or running). Read without the registry's lock: a function is
    /// marked deleted under it as it is unpublished.
    pub fn serves(&self, id: &str) -> bool {
        self.fns
            .get(id)
            .is_some_and(|fs| !fs.f.deleted.load(Relaxed))
    }

    /// The core a client connection whose request for `id` arrived here
    /// should move to, if any: when the function is limited to fewer
    /// instances than there are cores, all of them run (or start) elsewhere
    /// and none can start here, the request would wait for an instance to be
    /// handed over (up to [`migrate::HAND_OVER_SLACK`] plus the other core's
    /// turn, each hand-over a detach and a re-pin, and the instance would
    /// leave that core's own queue behind, to come back for it). Moving the
    /// connection instead puts this and its later requests on a core that
    /// holds, starts or is being handed an instance, where they queue in
    /// arrival order with that core's own: the first of those after this one
    /// (cyclically).
    pub fn home_core(&self, id: &str) -> Option<usize> {
        let fs = self.fns.get(id)?;
        let f = &fs.f;
        if fs.live + fs.starting > 0
            || f.spec.concurrency as usize >= self.cfg.cores
            || f.deleted.load(Relaxed)
            || f.instances.load(Relaxed) < f.spec.concurrency
        {
            return None;
        }
        let homes = f.homes.load(Relaxed) & !(1u64 << self.cfg.core);
        (homes != 0).then(|| migrate::next_core(homes, self.cfg.core))
    }

    /// Event: a connection moved here with `queued`, a request queued on
    /// another core; its answer now goes to `to`. It takes its place in the
    /// queue by arrival, under the queue's bound (see [`CorePool::place`]).
    pub fn on_relocated(&mut self, to: ReplyTo, queued: Queued, now: Instant) {
        let Queued {
            function,
            name,
            mut pending,
            service,
        } = queued;
        pending.to = to;
        if let Some(s) = service {
            self.service.insert(to, s);
        }
        let function = self.reroute(to, function, name.as_deref());
        if let Some(r) = self.refused_queued(&function) {
            self.reply(to, r);
        } else if pending.queue_deadline <= now {
            let waited = now.duration_since(pending.arrived).as_millis();
            let message = format!("no instance became free within {waited} ms");
            self.reply(to, Reply::error(504, "queue_timeout", &message));
        } else {
            self.place(&function, pending, now);
        }
        self.check_invariants();
    }

    /// The function a queued request of `id` (named `name`, if unpublished)
    /// that left its queue goes to here, answered at `to`: `id` itself while
    /// this core may still queue it ([`CorePool::drains`]), else, when a code
    /// update replaced `id` meanwhile, the function that now has its name.
    /// The request had not run; the new code serves it, as it serves every
    /// request arriving after the update (it joins the successor's queue as
    /// an arrival does).
    fn reroute(&mut self, to: ReplyTo, id: String, name: Option<&str>) -> String {
        if self.drains(&id) {
            return id;
        }
        let Some(heir) = name.and_then(|name| self.successor(name)).cloned() else {
            return id;
        };
        self.log_tail_from(to, &heir);
        heir.spec.id.clone()
    }

    /// The deployed function under `name` (the successor of those a code
    /// update unpublished under it), if this core knows it.
    fn successor(&self, name: &str) -> Option<&Arc<Function>> {
        self.fns.values().map(|fs| &fs.f).find(|f| {
            f.spec.name.as_deref() == Some(name)
                && f.spec.service.version.is_none()
                && !f.deleted.load(Relaxed)
        })
    }

    /// A service API request answered at `to` that moved to function `heir`
    /// has the log tail of `heir`.
    fn log_tail_from(&mut self, to: ReplyTo, heir: &Arc<Function>) {
        if let Some(s) = self.service.get_mut(&to) {
            if s.function.is_some() {
                s.function = Some(heir.clone());
            }
        }
    }

    /// Whether a request of `id` accepted earlier may still queue here: `id`
    /// is deployed, or it was deleted and its instances here (running or
    /// starting) finish what was queued for it.
    fn drains(&self, id: &str) -> bool {
        self.fns
            .get(id)
            .is_some_and(|fs| !fs.f.deleted.load(Relaxed) || fs.live + fs.starting > 0)
    }

    /// Event: the connection waiting for `queued` could not move; the request
    /// goes back into its queue here, by arrival, and this core waits for an
    /// instance to be handed over, as it would have without moves. It joins
    /// the queue as an arrival does ([`CorePool::queue_by_arrival`]): an idle
    /// instance here takes it at once, and beyond the queue's bound it gets
    /// 429 (arrivals may have filled its place meanwhile).
    pub fn relocate_failed(&mut self, queued: Queued, now: Instant) {
        let Queued {
            function,
            name,
            mut pending,
            service,
        } = queued;
        // It did not move: the move does not count.
        pending.relocations = pending.relocations.saturating_sub(1);
        if let Some(s) = service {
            self.service.insert(pending.to, s);
        }
        let function = self.reroute(pending.to, function, name.as_deref());
        if let Some(r) = self.refused_queued(&function) {
            self.reply(pending.to, r);
        } else if self.queue_by_arrival(&function, pending, now) {
            let fs = &self.fns[&function];
            // Starved only at the limit: a request that spilled from beside
            // an instance of its own waits for that one.
            if fs.f.instances.load(Relaxed) >= fs.f.spec.concurrency {
                fs.mark_starved(self.cfg.core, now);
            }
            self.grow(&function, now);
        }
        self.check_invariants();
    }

    /// The 404 a request of `id` accepted earlier (queued, then moved) gets
    /// here, if `id` is unknown here, or deleted with nothing of it left to
    /// serve it (see [`CorePool::drains`]).
    fn refused_queued(&self, id: &str) -> Option<Reply> {
        match self.drains(id) {
            true => None,
            false => self.refused(id),
        }
    }

    /// The 404 a request for function `id` gets here, if it is unknown or deleted.
    fn refused(&self, id: &str) -> Option<Reply> {
        let message = match self.fns.get(id) {
            None => format!("no function with id {id}"),
            Some(fs) if fs.f.deleted.load(Relaxed) => format!("function {id} was deleted"),
            Some(_) => return None,
        };
        Some(Reply::error(404, "function_not_found", &message))
    }

    /// Counts a connection sent to another core for function `id` (see [`CorePool::home_core`]).
    pub fn connection_moved(&self, id: &str) {
        if let Some(fs) = self.fns.get(id) {
            add(&fs.f.metrics.connections_moved, 1);
        }
    }

    /// The next thing to do, in the order decided.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Event: a request for function `id` arrived from the client at `to`.
    #[allow(clippy::too_many_arguments)]
    pub fn on_request(
        &mut self,
        to: ReplyTo,
        peer: IpAddr,
        id: &str,
        path: &str,
        req: Request,
        body: Vec<u8>,
        now: Instant,
    ) {
        self.invoke(to, peer, id, path, req, body, now);
        self.check_invariants();
    }

    /// Event: a Lambda service API `Invoke` (`RequestResponse`) of function
    /// `id`: the body is the event's JSON, the answer is the handler's result
    /// as it is, and every outcome is answered in Lambda's shape.
    #[allow(clippy::too_many_arguments)]
    pub fn on_service_invoke(
        &mut self,
        to: ReplyTo,
        peer: IpAddr,
        id: &str,
        req: Request,
        body: Vec<u8>,
        invoke: ServiceInvoke,
        now: Instant,
    ) {
        self.service.insert(to, invoke);
        self.invoke_as(to, peer, id, "/", req, body, true, now);
        self.check_invariants();
    }

    /// Event: bytes arrived on an instance's channel; `input` is all that is
    /// unread. Returns how many bytes were consumed (whole frames).
    pub fn on_channel_input(&mut self, inst: InstId, input: &[u8], now: Instant) -> usize {
        let n = match self.slot_of(inst) {
            Some(i) => self.frames(i, input, now),
            None => 0,
        };
        if let Some(i) = self.slot_of(inst) {
            self.unsolicited(i, &input[n..], now);
        }
        self.check_invariants();
        n
    }

    /// Event: an instance's channel closed (the instance died or exited).
    /// `unsent`: what was written to the channel and never reached the
    /// instance; a request whose whole frame is in it was never seen by the
    /// instance and goes back to the front of the queue instead of getting 502.
    pub fn on_channel_closed(&mut self, inst: InstId, unsent: &[u8], now: Instant) {
        if let Some(i) = self.slot_of(inst) {
            self.insts[i].exiting = true;
            if let Some(p) = self.undelivered(i, unsent) {
                let inst = &mut self.insts[i];
                inst.busy = None;
                let fs = self.fns.get_mut(&inst.function.spec.id);
                fs.expect("instance's function")
                    .requeue(p, &mut self.queued);
            }
            self.instance_failed(i, now, "the instance exited");
        }
        self.check_invariants();
    }

    /// The request instance `i` is busy with, rebuilt from `unsent` if its
    /// whole INVOKE frame is there (written, never taken by the instance).
    fn undelivered(&self, i: usize, unsent: &[u8]) -> Option<Pending> {
        let inst = &self.insts[i];
        let busy = inst.busy.as_ref()?;
        // A request sent ahead went after it: when its whole frame is in
        // `unsent` it goes back to the queue with the instance (see
        // `retire`), and the busy one's frame is the one before it; when
        // part of it was written, so was all of the busy one's.
        let unsent = match &inst.ahead {
            Some(a) => unsent.get(..unsent.len().checked_sub(a.frame_len_ahead())?)?,
            None => unsent,
        };
        let start = unsent.len().checked_sub(busy.frame_len)?;
        let mut decoder = crate::protocol::FrameDecoder::new();
        decoder.push(&unsent[start..]);
        let frame = decoder.next_frame().ok()??;
        if frame.kind != FrameType::Invoke || frame.request_id != busy.rid {
            return None;
        }
        // The metadata ends with the deadline added at dispatch (none for a
        // request sent ahead: only the bracket); a new dispatch adds a new one.
        let mut meta_head = frame.meta;
        let at = match busy.sent_ahead {
            true => meta_head.len().checked_sub(1)?,
            false => memchr::memmem::rfind(&meta_head, DEADLINE_SEP.as_bytes())?,
        };
        meta_head.truncate(at);
        let timeout = Duration::from_millis(inst.function.spec.timeout_ms);
        Some(Pending {
            to: busy.to,
            rid: busy.rid,
            request_id: busy.request_id.clone(),
            meta_head,
            body: frame.body,
            arrived: busy.arrived,
            queue_deadline: busy.arrived + timeout + QUEUE_INIT_ALLOWANCE,
            relocations: 0,
        })
    }

    /// Event: an instance start asked for by [`Action::Start`] finished.
    pub fn on_started(&mut self, started: Started, now: Instant) {
        self.started(started, now);
        self.check_invariants();
    }

    /// Event: the client at `to` left while its request was here (queued or
    /// running): it is not dispatched, and no answer is sent for it.
    pub fn on_client_gone(&mut self, to: ReplyTo) {
        // An answer already decided clears nothing: the owner drops it.
        if !self
            .actions
            .iter()
            .any(|a| matches!(a, Action::Reply { to: t, .. } | Action::StreamEnd { to: t, .. } if *t == to))
        {
            self.gone.insert(to);
        }
        self.check_invariants();
    }

    /// Event: periodic tick. Timeouts (504, instance destroyed), queue expiry,
    /// fit estimates, scale-out of waiting queues, keep-warm reaping.
    pub fn on_tick(&mut self, tick: Tick) {
        self.tick_len = tick.now.saturating_duration_since(self.clock.0);
        self.clock = (tick.now, tick.wall_ms);
        self.cpu_busy_pct = tick.cpu_busy_pct;
        self.worker_cpu = tick.worker_cpu;
        self.preempt.on_tick(self.saturated());
        self.tick(tick.now);
        self.reopen(tick.now);
        self.check_invariants();
    }

    /// Event: another core handed over an instance.
    pub fn on_migrated(&mut self, m: Migrated, now: Instant) {
        self.handed_in(m, now);
        self.check_invariants();
    }

    /// Event: an instance handed over to `core` on [`Action::HandOver`] could
    /// not reach it (that core's loop has ended): it comes back and serves
    /// here, as if handed over to this core, keeping its slot and its counts.
    pub fn on_hand_over_failed(&mut self, core: usize, m: Migrated, now: Instant) {
        self.came_back(core, m, now);
        self.check_invariants();
    }

    /// Event: a channel detached on [`Action::Detach`] is free to move.
    pub fn on_detached(&mut self, inst: InstId, channel: Endpoint, leftover: Vec<u8>) {
        self.detached(inst, channel, leftover);
        self.check_invariants();
    }

    /// Event: functions were deployed or deleted; `current` is all there are.
    /// A deleted function drains: new requests get 404, requests already
    /// queued or running finish on the instances it has; then its state goes.
    /// Requests queued for it with none of its instances here go to the
    /// function a code update put under its name, if any (see
    /// [`CorePool::forget_if_drained`]).
    pub fn on_functions_changed(&mut self, current: Vec<Arc<Function>>, now: Instant) {
        for f in &current {
            self.fns
                .entry(f.spec.id.clone())
                .or_insert_with(|| FnState::new(f.clone(), self.cfg.core, now));
        }
        let gone: Vec<String> = self
            .fns
            .keys()
            .filter(|id| !current.iter().any(|f| &f.spec.id == *id))
            .cloned()
            .collect();
        let mut heirs = Vec::new();
        for id in gone {
            self.slot_waiters.retain(|w| *w != id);
            let idle: Vec<usize> = self
                .fns
                .get_mut(&id)
                .map(|fs| {
                    fs.listed = false;
                    fs.unpark_oldest(fs.idle.len())
                })
                .unwrap_or_default();
            for i in idle {
                heirs.extend(self.retire(i, now));
            }
            heirs.extend(self.forget_if_drained(&id));
        }
        // Served once the view is settled (a heir's scale-out may retire idle
        // instances of other functions).
        for heir in heirs {
            self.take_over(Some(heir), now);
        }
        self.check_invariants();
    }

    /// Kills and destroys every instance, here and now, at server exit: those
    /// here and those whose channel was being detached for another core
    /// (dropped with the pool, they would keep their slots and memory). The
    /// owner has dropped the channels; no action is left to carry out.
    pub fn shutdown(&mut self) {
        for (_, mut handle) in self.dying.drain(..) {
            handle.kill();
            handle.destroy();
        }
        for (_, inst) in std::mem::take(&mut self.insts) {
            end_at_exit(&inst.function, inst.handle);
        }
        for (_, (f, handle, _)) in self.migrating.drain() {
            end_at_exit(&f, handle);
        }
        self.actions.clear();
    }

    /// The slab slot of `id`, if that instance is still here.
    fn slot_of(&self, id: InstId) -> Option<usize> {
        self.insts
            .get(id.slot())
            .is_some_and(|i| i.id == id)
            .then_some(id.slot())
    }

    /// Queues the answer that ends `to`'s request, unless that client left:
    /// a request no instance runs (see [`CorePool::answer_running`]).
    fn reply(&mut self, to: ReplyTo, reply: Reply) {
        self.deliver(to, reply, None);
    }

    /// Queues the answer to `to`, the request instance `inst` runs (`served`:
    /// how an instance gave it, for the phase timings). A streamed answer
    /// already under way ends as failed instead.
    fn answer_running(&mut self, inst: InstId, to: ReplyTo, reply: Reply, served: Option<Served>) {
        if !self.streams.is_empty() && self.streams.contains_key(&inst) {
            let unsent = self.interrupt_stream(inst, to, reply);
            let st = self.streams.remove(&inst).expect("looked up above");
            if let Some(reply) = unsent {
                return self.deliver(to, reply, served);
            }
            // A client that left had its stream dropped and gets nothing.
            if st.client_left() {
                self.service.remove(&to);
                self.gone.remove(&to);
            }
            return;
        }
        self.deliver(to, reply, served);
    }

    /// Queues an answer for `to` in its shape (plain, the service API's, an
    /// event stream), unless that client left.
    fn deliver(&mut self, to: ReplyTo, reply: Reply, served: Option<Served>) {
        let service = match self.service.is_empty() {
            true => None,
            false => self.service.remove(&to),
        };
        if !self.gone.is_empty() && self.gone.remove(&to) {
            return;
        }
        match service {
            Some(s) if s.stream => {
                let reply = reply::service_reply(reply, &s);
                self.actions
                    .extend(stream::events_from_reply(to, reply, &s));
            }
            Some(s) => {
                let reply = reply::service_reply(reply, &s);
                self.actions.push_back(Action::Reply { to, reply, served });
            }
            None => self.actions.push_back(Action::Reply { to, reply, served }),
        }
    }

    /// Whether the request answered at `to` came through the service API.
    fn is_service(&self, to: ReplyTo) -> bool {
        !self.service.is_empty() && self.service.contains_key(&to)
    }

    /// The wall clock at `now`, in milliseconds since the epoch.
    fn wall_ms(&self, now: Instant) -> u64 {
        let (at, ms) = self.clock;
        ms + now.saturating_duration_since(at).as_millis() as u64
    }

    /// Whether the core used at least [`CPU_SATURATED_PCT`] of its CPU last tick.
    fn saturated(&self) -> bool {
        self.cpu_busy_pct >= CPU_SATURATED_PCT
    }

    /// Checks the bookkeeping after an event (debug builds): each function's
    /// live count is its instances here, the core's queue depth is the sum of
    /// the queues, idle lists hold idle instances of their own function, and
    /// every client known to have left still has a request here.
    fn check_invariants(&self) {
        if !cfg!(debug_assertions) {
            return;
        }
        let mut live: HashMap<&str, usize> = HashMap::new();
        let (mut busy, mut ahead) = (0, 0);
        for (_, inst) in &self.insts {
            *live.entry(inst.function.spec.id.as_str()).or_default() += 1;
            busy += usize::from(inst.busy.is_some());
            ahead += usize::from(inst.ahead.is_some());
            debug_assert!(
                inst.ahead.is_none() || inst.busy.is_some(),
                "a request ahead of none running"
            );
        }
        let mut queued = 0;
        for (id, fs) in &self.fns {
            let n = live.remove(id.as_str()).unwrap_or(0);
            debug_assert_eq!(fs.live, n, "live count of {id} is not its instances");
            debug_assert!(
                fs.live + fs.starting == 0
                    || fs.f.homes.load(Relaxed) & (1u64 << self.cfg.core) != 0,
                "{id} has instances here without its home bit"
            );
            queued += fs.queue.len();
            let bit = 1u64 << self.cfg.core;
            debug_assert_eq!(
                fs.f.backlog.load(Relaxed) & bit != 0,
                !fs.queue.is_empty(),
                "{id}: backlog bit out of step with the queue"
            );
            // Other cores clear the idle bit (a request on its way); only
            // this core sets it.
            debug_assert!(
                fs.f.idle_on.load(Relaxed) & bit == 0 || (fs.open && !fs.idle.is_empty()),
                "{id}: idle bit set without an idle instance that may run"
            );
            for &i in &fs.idle {
                let inst = &self.insts[i];
                debug_assert!(inst.busy.is_none(), "busy instance listed idle");
                debug_assert!(inst.ahead.is_none(), "idle instance with a request ahead");
                debug_assert_eq!(&inst.function.spec.id, id, "idle under another function");
            }
        }
        debug_assert!(live.is_empty(), "instances of unknown functions: {live:?}");
        debug_assert_eq!(self.queued, queued, "queue depth is not the sum of queues");
        debug_assert!(
            self.gone.len() <= queued + busy + ahead,
            "clients gone that had nothing here"
        );
        debug_assert!(
            self.service.len() <= queued + busy + ahead,
            "service invocations that are neither queued, sent ahead nor running"
        );
        debug_assert!(
            self.streams.len() <= busy,
            "streamed answers without a running request"
        );
    }
}
