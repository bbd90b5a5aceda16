//! The process backend: each instance is the guest agent as PID 1 of a
//! [`process`](super) sandbox, running Node with the shim from the runtime
//! root ([`crate::runtime`]).
//!
//! There is no memory snapshot on this backend, so its stand-in for one is a
//! **standby**: a fully initialised instance (handler loaded) kept for a
//! function in use, created at deploy (and at server start for loaded
//! functions, up to the bound). A cold start takes the standby, which answers
//! at once, and a replacement is initialised in the background. A standby
//! costs one idle instance's memory and no CPU.
//!
//! Standbys are a cache, kept only for functions used recently: one whose
//! function has not started an instance (nor been deployed) for the keep-warm
//! period is retired, and the next start remakes it in the background. At most
//! `--standbys-max` are kept (the least recently used goes first). Each holds
//! its `memory_mb` of the server's memory budget, and gives it up when an
//! instance or a deploy needs the room ([`MemoryBudget::set_reclaim`]), least
//! recently used first.
//!
//! Every path that makes a sandbox (deploy, start, refill) holds a [`Busy`]
//! token meanwhile, and sandboxes still initialising are tracked by pid. At
//! shutdown the backend stops taking new work, kills what is initialising and
//! waits (up to [`SHUTDOWN_WAIT`]) for the tokens to come back, so no sandbox
//! or cgroup outlives the server, even one a refill was making at that moment.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use super::uids::{UidLease, UidPool};

use super::{Group, Sandbox, SandboxSpec};
use crate::config::ServeConfig;
use crate::runtime::{self, root::Userland, RuntimeKind};
use crate::sandbox::handshake;
use crate::sandbox::process;
use crate::sandbox::runtime_api;
use crate::sandbox::{
    Backend, Endpoint, InitLogs, Instance, InstanceCpus, MemoryBudget, SchedTime, SetupError,
    StartError,
};
use crate::spec::FunctionSpec;
use crate::util::cpu;

/// Time a runtime gets to load the handler (Lambda's init phase limit).
pub const INIT_TIMEOUT: Duration = Duration::from_secs(10);
/// Private /tmp of each instance (charged to its memory limit).
pub const TMP_BYTES: u64 = 64 << 20;
/// Processes and threads per instance (Node uses about a dozen threads).
pub const PIDS_MAX: u32 = 256;
/// First host uid mapped to an instance's root; each live instance holds its own
/// (see [`UidPool`]), so at most this many instances live at once.
const HOST_UID_BASE: u32 = 200_000;
const HOST_UID_SPAN: u32 = 60_000;
/// Default of `--standbys-max`: standbys kept at once (about 7 MiB Pss, 45 MiB RSS each
/// for a trivial Node function).
pub const STANDBYS_MAX_DEFAULT: usize = 64;
/// How long an unused function keeps its standby by default, ms (an hour). Much longer
/// than keep-warm on purpose: the standby is what makes the cold start after an idle
/// period fast (measured 13 ms against 274 ms without), and `--standbys-max` bounds
/// what idle standbys cost.
pub const STANDBY_IDLE_DEFAULT_MS: u64 = 3_600_000;
/// Longest wait at shutdown for sandboxes being made (killed first) to be cleaned up.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);
/// Longest wait at start-up (in the background) for the sandboxes of a killed
/// server to drain from their cgroups, so the groups can be removed.
pub const SWEEP_WAIT: Duration = Duration::from_secs(5);
/// Longest wait of a start for the standby a refill is making (a spawn and an init).
const STANDBY_WAIT: Duration =
    Duration::from_millis(process::SPAWN_TIMEOUT_MS + INIT_TIMEOUT.as_millis() as u64);

/// An instance of the process backend.
pub struct ProcInstance {
    sandbox: Sandbox,
    /// Declared after `sandbox`: dropped (and reusable) only once the sandbox is torn down.
    uid: UidLease,
    channel: Option<OwnedFd>,
    /// With pipes, the write end of the channel (`channel` is the read end).
    channel_out: Option<OwnedFd>,
    /// Host pid of the runtime (the agent's child), found on first use.
    runtime_pid: Option<i32>,
    /// The agent's log socket (raw runtime output), until taken.
    logs: Option<OwnedFd>,
    /// The Runtime API hearth serves this instance (instead of `channel`), until taken.
    served: Option<Box<runtime_api::Served>>,
    /// The Node shim reads the channel itself (no Runtime API): see [`Instance::runs_queued`].
    shim: bool,
}

impl Instance for ProcInstance {
    fn take_endpoint(&mut self) -> Option<Endpoint> {
        if let Some(served) = self.served.take() {
            return Some(Endpoint::RuntimeApi(served));
        }
        let rx = self.channel.take()?;
        Some(match self.channel_out.take() {
            Some(tx) => Endpoint::Pipes { rx, tx },
            None => Endpoint::Channel(rx),
        })
    }
    fn take_log_channel(&mut self) -> Option<OwnedFd> {
        self.logs.take()
    }
    fn kill(&mut self) {
        self.sandbox.kill();
    }
    fn destroy(self: Box<Self>) {
        let ProcInstance {
            sandbox,
            uid,
            channel,
            ..
        } = *self;
        drop(channel);
        retire_uid(sandbox.destroy(), uid);
    }
    fn repin(&mut self, cpus: InstanceCpus) {
        pin_tree(self.sandbox.pid, cpus);
    }
    fn memory_bytes(&self) -> Option<u64> {
        self.sandbox.memory_bytes()
    }
    fn oom_killed(&self) -> bool {
        self.sandbox.oom_killed()
    }
    fn runs_queued(&self) -> bool {
        self.shim
    }
    /// The main threads of the agent and of Node: the ones a request passes
    /// through (V8's helper threads run beside them and are left out).
    fn sched_time(&mut self) -> Option<SchedTime> {
        let agent = self.sandbox.pid;
        if self.runtime_pid.is_none() {
            let children =
                std::fs::read_to_string(format!("/proc/{agent}/task/{agent}/children")).ok()?;
            self.runtime_pid = children.split_whitespace().next()?.parse().ok();
        }
        let runtime = self.runtime_pid?;
        let a = SchedTime::read(Path::new(&format!("/proc/{agent}/schedstat")))?;
        let r = SchedTime::read(Path::new(&format!("/proc/{runtime}/schedstat")))?;
        Some(a + r)
    }
}

struct Inner {
    hearth_exe: PathBuf,
    runtime_root: PathBuf,
    /// The root and host binds of runtimes other than Node.js.
    userland: Userland,
    uids: Arc<UidPool>,
    /// Numbers instances for their cgroup names.
    next_seq: AtomicU32,
    standbys: Mutex<HashMap<String, Standby>>,
    /// When each function was last deployed or started an instance (what keeps its
    /// standby); entries go with the function.
    last_use: Mutex<HashMap<String, Instant>>,
    /// The server's instance memory budget, once the registry has given it.
    memory: OnceLock<Arc<dyn MemoryBudget>>,
    /// A standby unused for this long is retired (the keep-warm period).
    standby_idle: Duration,
    /// Most standbys kept at once.
    standbys_max: usize,
    /// Functions whose standby is being made, and how far.
    refilling: Mutex<HashMap<String, Refill>>,
    /// Signalled when a refill ends (a start may be waiting for its standby).
    refilled: Condvar,
    forgotten: Mutex<HashSet<String>>,
    use_standby: bool,
    /// Runtimes other than Node.js get the Runtime API from the agent's relay
    /// process, not from the worker cores (`--runtime-api-relay`).
    relay_runtime_api: bool,
    /// Instances are placed beside their worker (`ServeConfig::instances_beside`):
    /// those of Node.js functions limited to one instance start with V8's
    /// parallel collector, whose helpers run on the worker's CPU ([`InstanceCpus`]),
    /// and a quota of [`crate::sandbox::HELPERS_CPU_MILLICORES`] more.
    beside: bool,
    /// Work in progress that may make sandboxes; see [`Busy`].
    work: Mutex<Work>,
    /// Signalled when `work.busy` drops.
    work_done: Condvar,
}

/// A function's standby and its share of the memory budget.
struct Standby {
    inst: ProcInstance,
    /// `None` before the registry gave the budget (never, once serving).
    memory: Option<Share>,
}

/// MiB taken from the memory budget, given back on drop.
struct Share {
    budget: Arc<dyn MemoryBudget>,
    mb: u64,
}

impl Drop for Share {
    fn drop(&mut self) {
        self.budget.give(self.mb);
    }
}

/// Sandbox-making work in progress.
#[derive(Default)]
struct Work {
    /// Outstanding [`Busy`] tokens.
    busy: usize,
    /// Set at shutdown: no new work is taken.
    closing: bool,
    /// Host pids of sandboxes between spawn and the end of their init, by ticket.
    initialising: HashMap<u64, i32>,
    next_ticket: u64,
}

/// A token held while something may make a sandbox; shutdown waits for all of them.
struct Busy(Arc<Inner>);

impl Drop for Busy {
    fn drop(&mut self) {
        let mut w = self.0.work.lock().unwrap();
        w.busy -= 1;
        if w.busy == 0 {
            self.0.work_done.notify_all();
        }
    }
}

/// See the module documentation.
pub struct ProcessBackend {
    inner: Arc<Inner>,
}

impl ProcessBackend {
    /// Builds (or reuses) the runtime root under `<state>/cache`.
    pub fn new(cfg: &ServeConfig, use_standby: bool) -> Result<ProcessBackend, SetupError> {
        let cache = cfg.state_dir.join("cache");
        let runtime_root = runtime::ensure(&cache).map_err(SetupError::Runtime)?;
        // At start-up, under the state-dir lock: roots of older builds are unused.
        let userland = runtime::ensure_userland(&cache).map_err(SetupError::Runtime)?;
        let pruned = runtime::root::prune_runtimes(&cache, &runtime_root)
            + runtime::root::prune_userlands(&cache, &userland.root);
        if pruned > 0 {
            eprintln!(
                "hearth: removed {pruned} unused runtime root(s) from {}",
                cache.display()
            );
        }
        // The running binary itself, even if its file was replaced since (upgrades, rebuilds).
        // HEARTH_LAUNCHER_EXE names it instead, for runs under tools that cannot exec
        // /proc/self/exe (valgrind: see perf/profile/).
        let hearth_exe = std::env::var_os("HEARTH_LAUNCHER_EXE")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/proc/self/exe"));
        process::set_subreaper();
        let inner = Arc::new(Inner {
            hearth_exe,
            runtime_root,
            userland,
            // Servers on one host share the range; a pid-derived start keeps their
            // instances apart in practice (one server per host is the supported setup).
            uids: UidPool::new(
                HOST_UID_BASE,
                HOST_UID_SPAN,
                std::process::id().wrapping_mul(7919),
            ),
            next_seq: AtomicU32::new(0),
            standbys: Mutex::new(HashMap::new()),
            last_use: Mutex::new(HashMap::new()),
            memory: OnceLock::new(),
            standby_idle: cfg.standby_idle,
            standbys_max: cfg.standbys_max,
            refilling: Mutex::new(HashMap::new()),
            refilled: Condvar::new(),
            forgotten: Mutex::new(HashSet::new()),
            use_standby,
            relay_runtime_api: cfg.runtime_api_relay,
            beside: cfg.instances_beside,
            work: Mutex::new(Work::default()),
            work_done: Condvar::new(),
        });
        // Off the start-up path: a killed server's sandboxes may take a while
        // to be killed and reaped. Holds a busy token, so shutdown waits for it.
        let busy = inner.busy().expect("not shutting down yet");
        std::thread::Builder::new()
            .name("hearth-sweep".into())
            .spawn(move || {
                let swept = process::cgroup::sweep_stale(SWEEP_WAIT);
                if swept > 0 {
                    eprintln!("hearth: removed {swept} cgroup(s) left by a previous run");
                }
                drop(busy);
            })
            .map_err(|err| SetupError::Io {
                what: "spawn the cgroup sweeper".into(),
                err,
            })?;
        if use_standby {
            let weak = Arc::downgrade(&inner);
            std::thread::Builder::new()
                .name("hearth-standbys".into())
                .spawn(move || retire_idle_standbys(weak))
                .map_err(|err| SetupError::Io {
                    what: "spawn the standby reaper".into(),
                    err,
                })?;
        }
        Ok(ProcessBackend { inner })
    }
}

impl Inner {
    /// A [`Busy`] token, unless the backend is shutting down.
    fn busy(self: &Arc<Self>) -> Result<Busy, StartError> {
        let mut w = self.work.lock().unwrap();
        if w.closing {
            return Err(StartError::ShuttingDown);
        }
        w.busy += 1;
        Ok(Busy(self.clone()))
    }

    /// Records a sandbox as initialising (shutdown kills it); `None` when
    /// shutting down already, and the caller must destroy it.
    fn track(&self, pid: i32) -> Option<u64> {
        let mut w = self.work.lock().unwrap();
        if w.closing {
            return None;
        }
        let ticket = w.next_ticket;
        w.next_ticket += 1;
        w.initialising.insert(ticket, pid);
        Some(ticket)
    }

    /// Makes and initialises a sandbox; the caller holds a [`Busy`] token.
    fn spawn(
        &self,
        spec: &FunctionSpec,
        dir: &Path,
        place: Placement,
    ) -> Result<(ProcInstance, InitLogs), StartError> {
        let n = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let uid = self.uids.lease().map_err(StartError::Uids)?;
        // Direct mode: the runtime gets the channel, the agent stays off the request path and
        // sends raw output on the log socket. Node.js runs in the Node root; other runtimes
        // run in the userland root, where the agent serves them the Runtime API.
        let mut argv: Vec<String> = ["/hearth/agent", "--channel-fd", "3", "--log-fd", "4"]
            .map(String::from)
            .to_vec();
        // Node.js talks to hearth over a pipe pair (see `Endpoint::Pipes`);
        // the Runtime API modes pass descriptors over the channel, which
        // needs a socket.
        let pipes = spec.runtime.is_nodejs();
        // Decided here, before any core holds the instance (a deploy's first
        // instance and standbys are made unpinned): Node's flags and the
        // quota are fixed at its start.
        let helpers_apart = pipes && self.beside && spec.runs_beside_its_worker();
        let (root, binds) = if pipes {
            argv.extend(["--channel-out-fd".to_string(), "5".to_string()]);
            if helpers_apart {
                argv.push("--parallel-gc".to_string());
            }
            (self.runtime_root.clone(), Vec::new())
        } else {
            argv.extend(["--runtime".to_string(), spec.runtime.name().to_string()]);
            if !self.relay_runtime_api {
                argv.push("--host-serves-api".to_string());
            }
            (self.userland.root.clone(), self.userland.binds.clone())
        };
        let sspec = SandboxSpec {
            runtime_root: root,
            code_dir: dir.join("code"),
            tmp_bytes: TMP_BYTES,
            memory_bytes: u64::from(spec.memory_mb) << 20,
            pids_max: PIDS_MAX,
            cpu_millicores: crate::sandbox::INSTANCE_CPU_MILLICORES
                + if helpers_apart {
                    crate::sandbox::HELPERS_CPU_MILLICORES
                } else {
                    0
                },
            cpu_core: match place {
                Placement::Core(cpus) => Some(cpus.main),
                Placement::Deploy | Placement::Standby => None,
            },
            cpu_background: matches!(place, Placement::Standby),
            host_uid: uid.uid(),
            name: process::cgroup::server_group_name(&spec.id, std::process::id(), n),
            argv,
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            binds,
            pipes,
            parent_cpu_weight: process::cgroup::parent_weight(),
        };
        let mut sandbox = process::spawn(&self.hearth_exe, &sspec).map_err(StartError::Jail)?;
        if let (Placement::Standby, Some(group)) = (place, sandbox.group()) {
            if let Some(refill) = self.refilling.lock().unwrap().get_mut(&spec.id) {
                refill.group = Some(group.clone());
                if refill.wanted {
                    refill.promote(&spec.id);
                }
            }
        }
        let log_socket = sandbox.logs.take();
        let Some(ticket) = self.track(sandbox.pid) else {
            sandbox.destroy();
            return Err(StartError::ShuttingDown);
        };
        let result = match spec.runtime.api_kind() {
            Some(kind) if !self.relay_runtime_api => serve_start(&sandbox, kind, spec),
            _ => {
                let tx = sandbox.channel_out.as_ref().unwrap_or(&sandbox.channel);
                handshake::hello_over(sandbox.channel.as_fd(), tx.as_fd(), spec, INIT_TIMEOUT)
                    .map(|(_, logs)| (None, logs))
            }
        };
        // Before anything reaps PID 1: shutdown must not signal a reused pid.
        self.work.lock().unwrap().initialising.remove(&ticket);
        match result {
            Ok((served, logs)) => {
                let dup =
                    |fd: &OwnedFd| fd.try_clone().map_err(|e| StartError::io("dup channel", e));
                let channel = match served {
                    Some(_) => None,
                    None => Some(dup(&sandbox.channel)?),
                };
                let channel_out = match (&served, &sandbox.channel_out) {
                    (None, Some(out)) => Some(dup(out)?),
                    _ => None,
                };
                Ok((
                    ProcInstance {
                        sandbox,
                        uid,
                        channel,
                        channel_out,
                        runtime_pid: None,
                        logs: log_socket,
                        shim: spec.runtime.is_nodejs(),
                        served,
                    },
                    logs,
                ))
            }
            Err(e @ StartError::Init { .. }) => {
                retire_uid(sandbox.destroy(), uid);
                Err(e)
            }
            Err(e) => {
                // What the runtime printed before dying is on the log socket.
                let output = log_socket
                    .map(|fd| handshake::drain_logs(fd.as_fd(), Duration::from_millis(200)))
                    .unwrap_or_default();
                retire_uid(sandbox.destroy(), uid);
                Err(if output.is_empty() {
                    e
                } else {
                    StartError::WithOutput {
                        cause: Box::new(e),
                        output,
                    }
                })
            }
        }
    }

    /// Makes a standby for `spec` in the background unless one exists or is coming.
    fn refill(self: &Arc<Self>, spec: &FunctionSpec, dir: &Path) {
        if !self.use_standby || self.forgotten.lock().unwrap().contains(&spec.id) {
            return;
        }
        if self.standbys.lock().unwrap().contains_key(&spec.id) {
            return;
        }
        // Taken before the thread exists, so shutdown waits for the thread.
        let Ok(busy) = self.busy() else { return };
        match self.refilling.lock().unwrap().entry(spec.id.clone()) {
            Entry::Occupied(_) => return,
            Entry::Vacant(v) => v.insert(Refill::default()),
        };
        let (me, spec, dir) = (self.clone(), spec.clone(), dir.to_path_buf());
        std::thread::spawn(move || {
            if let Ok((inst, _)) = me.spawn(&spec, &dir, Placement::Standby) {
                me.keep_standby(&spec, inst);
            }
            me.refilling.lock().unwrap().remove(&spec.id);
            me.refilled.notify_all();
            drop(busy);
        });
    }

    /// Keeps `inst` as the standby of `spec` if its memory fits in the budget (other
    /// standbys may give theirs up) and beyond the [`Inner::standbys_max`] least recently
    /// used; destroys it if the function is deleted or the backend is shutting down. The
    /// caller holds a [`Busy`] token.
    fn keep_standby(&self, spec: &FunctionSpec, inst: ProcInstance) {
        let id = spec.id.as_str();
        // Taken before the standbys lock: a reservation may reclaim standbys.
        let memory = match self.memory.get() {
            Some(budget) => {
                let mb = u64::from(spec.memory_mb);
                if !budget.try_take(mb) {
                    return Box::new(inst).destroy();
                }
                Some(Share {
                    budget: budget.clone(),
                    mb,
                })
            }
            None => None,
        };
        let mut unwanted = Vec::new();
        {
            let mut standbys = self.standbys.lock().unwrap();
            // Checked under the standbys lock: shutdown sets `closing`, then drains.
            if self.work.lock().unwrap().closing || self.forgotten.lock().unwrap().contains(id) {
                unwanted.push(inst);
            } else {
                let standby = Standby { inst, memory };
                unwanted.extend(standbys.insert(id.to_string(), standby).map(|s| s.inst));
                let last_use = self.last_use.lock().unwrap();
                while standbys.len() > self.standbys_max.max(1) {
                    let lru = least_recent(&standbys, &last_use, id).expect("more than one");
                    unwanted.extend(standbys.remove(&lru).map(|s| s.inst));
                }
            }
        }
        for inst in unwanted {
            Box::new(inst).destroy();
        }
    }

    /// Retires standbys, least recently used first, until they have given up at least
    /// `needed` MiB of the memory budget (or none is left); they are destroyed on another
    /// thread. Returns whether any was retired. The budget's reclaim hook.
    fn reclaim(self: &Arc<Self>, needed: u64) -> bool {
        let mut freed = 0u64;
        let mut evicted = Vec::new();
        {
            let mut standbys = self.standbys.lock().unwrap();
            let last_use = self.last_use.lock().unwrap();
            while freed < needed {
                let Some(lru) = least_recent(&standbys, &last_use, "") else {
                    break;
                };
                let standby = standbys.remove(&lru).expect("present");
                freed += standby.memory.as_ref().map_or(0, |s| s.mb);
                evicted.push(standby);
            }
        }
        if evicted.is_empty() {
            return false;
        }
        // The reservations go now; the sandboxes (a kill and a reap) off the caller's
        // thread, which may be an event loop.
        let insts: Vec<ProcInstance> = evicted.into_iter().map(|s| s.inst).collect();
        self.destroy_later(insts);
        true
    }

    /// Destroys `insts` on a thread of their own (shutdown waits for it), or here when
    /// shutting down already.
    fn destroy_later(self: &Arc<Self>, insts: Vec<ProcInstance>) {
        let Ok(busy) = self.busy() else {
            for inst in insts {
                Box::new(inst).destroy();
            }
            return;
        };
        let spawned = std::thread::Builder::new()
            .name("hearth-standby-rm".into())
            .spawn(move || {
                for inst in insts {
                    Box::new(inst).destroy();
                }
                drop(busy);
            });
        if let Err(e) = spawned {
            eprintln!("hearth: cannot start a thread to destroy standbys: {e}");
        }
    }

    /// Takes the standby of `id`, waiting for one a refill is making.
    fn take_standby(&self, id: &str) -> Option<ProcInstance> {
        let deadline = Instant::now() + STANDBY_WAIT;
        let mut refilling = self.refilling.lock().unwrap();
        loop {
            if let Some(s) = self.standbys.lock().unwrap().remove(id) {
                return Some(s.inst);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let refill = refilling.get_mut(id).filter(|_| !left.is_zero())?;
            // A start waits for it: it initialises at the default weight now.
            refill.wanted = true;
            refill.promote(id);
            refilling = self.refilled.wait_timeout(refilling, left).unwrap().0;
        }
    }
}

impl Backend for ProcessBackend {
    fn name(&self) -> &'static str {
        "process"
    }

    fn prepare(&self, spec: &FunctionSpec, dir: &Path) -> Result<InitLogs, StartError> {
        let _busy = self.inner.busy()?;
        let (inst, logs) = self.inner.spawn(spec, dir, Placement::Deploy)?;
        if self.inner.use_standby {
            self.inner.used(&spec.id);
            self.inner.keep_standby(spec, inst);
        } else {
            Box::new(inst).destroy();
        }
        Ok(logs)
    }

    fn start(
        &self,
        spec: &FunctionSpec,
        dir: &Path,
        cpus: InstanceCpus,
    ) -> Result<(Box<dyn Instance>, InitLogs), StartError> {
        let _busy = self.inner.busy()?;
        self.inner.used(&spec.id);
        let standby = self.inner.take_standby(&spec.id);
        let made = match standby {
            Some(inst) => {
                pin_tree(inst.sandbox.pid, cpus);
                if let Some(Err(e)) = inst.sandbox.group().map(Group::to_foreground) {
                    eprintln!(
                        "hearth: a standby of {} keeps its background cpu weight: {e}",
                        spec.id
                    );
                }
                Ok((inst, Vec::new()))
            }
            None => self
                .inner
                .spawn(spec, dir, Placement::Core(cpus))
                .inspect(|(inst, _)| {
                    // Spawned on `cpus.main`; V8's helper threads exist now.
                    if cpus.split() {
                        pin_tree(inst.sandbox.pid, cpus);
                    }
                }),
        };
        self.inner.refill(spec, dir);
        made.map(|(i, l)| (Box::new(i) as Box<dyn Instance>, l))
    }

    /// Makes standbys for loaded functions while fewer than the bound are kept or coming;
    /// each counts as used now (and is retired after the keep-warm period if not used).
    fn restore(&self, spec: &FunctionSpec, dir: &Path) {
        let inner = &self.inner;
        // One lock at a time (`take_standby` nests them the other way round).
        let standbys = inner.standbys.lock().unwrap().len();
        let kept = standbys + inner.refilling.lock().unwrap().len();
        if kept < inner.standbys_max {
            inner.used(&spec.id);
            inner.refill(spec, dir);
        }
    }

    fn forget(&self, id: &str) {
        self.inner.forgotten.lock().unwrap().insert(id.to_string());
        self.inner.last_use.lock().unwrap().remove(id);
        let standby = self.inner.standbys.lock().unwrap().remove(id);
        if let Some(s) = standby {
            Box::new(s.inst).destroy();
        }
    }

    fn keeps_standby(&self) -> bool {
        self.inner.use_standby
    }

    fn use_memory_budget(&self, memory: Arc<dyn MemoryBudget>) {
        let weak = Arc::downgrade(&self.inner);
        memory.set_reclaim(Box::new(move |needed| {
            weak.upgrade().is_some_and(|inner| inner.reclaim(needed))
        }));
        let _ = self.inner.memory.set(memory);
    }

    fn runs(&self, _runtime: RuntimeKind) -> bool {
        true
    }

    fn shutdown(&self) {
        let inner = &self.inner;
        let mut w = inner.work.lock().unwrap();
        w.closing = true;
        for &pid in w.initialising.values() {
            // SAFETY: `pid` is PID 1 of a sandbox still initialising: our child
            // (we are its subreaper), not reaped before it leaves `initialising`,
            // so the pid cannot have been reused.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while w.busy > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                eprintln!(
                    "hearth: {} sandbox job(s) (starts, refills, the cgroup sweep) still running after {} ms at shutdown",
                    w.busy,
                    SHUTDOWN_WAIT.as_millis()
                );
                break;
            }
            w = inner.work_done.wait_timeout(w, left).unwrap().0;
        }
        drop(w);
        let all: Vec<ProcInstance> = self
            .inner
            .standbys
            .lock()
            .unwrap()
            .drain()
            .map(|(_, s)| s.inst)
            .collect();
        for inst in all {
            Box::new(inst).destroy();
        }
    }
}

impl Inner {
    /// Records that function `id` is in use now (deployed, or starting an instance).
    fn used(&self, id: &str) {
        self.last_use
            .lock()
            .unwrap()
            .insert(id.to_string(), Instant::now());
    }

    /// Standbys of functions unused for the keep-warm period, taken out of the map.
    fn idle_standbys(&self, now: Instant) -> Vec<ProcInstance> {
        let mut standbys = self.standbys.lock().unwrap();
        let last_use = self.last_use.lock().unwrap();
        let idle: Vec<String> = standbys
            .keys()
            .filter(|id| {
                last_use
                    .get(*id)
                    .is_none_or(|t| now.saturating_duration_since(*t) >= self.standby_idle)
            })
            .cloned()
            .collect();
        idle.iter()
            .filter_map(|id| standbys.remove(id).map(|s| s.inst))
            .collect()
    }
}

/// The standby whose function was used least recently, other than `keep`'s.
fn least_recent(
    standbys: &HashMap<String, Standby>,
    last_use: &HashMap<String, Instant>,
    keep: &str,
) -> Option<String> {
    standbys
        .keys()
        .filter(|id| id.as_str() != keep)
        .min_by_key(|id| last_use.get(*id).copied())
        .cloned()
}

/// How often the standby reaper looks for idle standbys, at most.
const STANDBY_SWEEP_MAX: Duration = Duration::from_secs(1);

/// Body of the standby reaper thread: every [`STANDBY_SWEEP_MAX`] (or a quarter of the
/// keep-warm period, if shorter) retires the standbys of functions unused for the
/// keep-warm period; ends when the backend shuts down or is dropped.
fn retire_idle_standbys(inner: Weak<Inner>) {
    let period = inner.upgrade().map_or(STANDBY_SWEEP_MAX, |i| {
        (i.standby_idle / 4).clamp(Duration::from_millis(10), STANDBY_SWEEP_MAX)
    });
    loop {
        std::thread::sleep(period);
        let Some(inner) = inner.upgrade() else { return };
        // Holding a busy token while destroying: shutdown waits for it.
        let Ok(busy) = inner.busy() else { return };
        for inst in inner.idle_standbys(Instant::now()) {
            Box::new(inst).destroy();
        }
        drop(busy);
    }
}

/// Returns a destroyed sandbox's uid to the pool, unless the sandbox could not be reaped:
/// its processes may still run as that uid, so it is never handed to another instance.
/// The start of a Runtime API instance served by hearth: the agent's fds,
/// then HELLO and the runtime's first requests up to its first `/next`.
fn serve_start(
    sandbox: &Sandbox,
    kind: hearth_rapi::api::Kind,
    spec: &FunctionSpec,
) -> Result<(Option<Box<runtime_api::Served>>, InitLogs), StartError> {
    let started = Instant::now();
    let fds = runtime_api::receive_fds(sandbox.channel.as_fd(), INIT_TIMEOUT)?;
    let channel = sandbox
        .channel
        .try_clone()
        .map_err(|e| StartError::io("dup channel", e))?;
    let left = INIT_TIMEOUT.saturating_sub(started.elapsed());
    let (served, _init_ms, logs) = runtime_api::start(channel, fds, kind, spec, left)?;
    Ok((Some(Box::new(served)), logs))
}

fn retire_uid(reaped: bool, uid: UidLease) {
    if !reaped {
        eprintln!(
            "hearth: host uid {} stays reserved: its sandbox was not reaped",
            uid.uid()
        );
        std::mem::forget(uid);
    }
}

/// A standby being made in the background.
#[derive(Default)]
struct Refill {
    /// Its cgroup, once the sandbox exists.
    group: Option<Group>,
    /// A start waits for it.
    wanted: bool,
}

impl Refill {
    /// A start waits for this standby: it initialises at the default CPU
    /// weight from now on (once its cgroup exists).
    fn promote(&mut self, id: &str) {
        if let Some(g) = self.group.take() {
            if let Err(e) = g.to_foreground() {
                eprintln!("hearth: the standby of {id} keeps its background cpu weight: {e}");
            }
        }
    }
}

/// Where a new sandbox initialises, and at which CPU weight.
#[derive(Clone, Copy, Debug)]
enum Placement {
    /// A deploy's first instance (the deploy waits for it). Not pinned here:
    /// it runs on the CPUs of the thread that starts it, which inherited them
    /// from its spawner (a control thread: the CPU of the worker that took the
    /// deploy). A start that takes it as a standby pins it.
    Deploy,
    /// A standby made in the background: not pinned here either (as `Deploy`),
    /// at the background CPU weight ([`process::cgroup::BACKGROUND_CPU_SHARES`]) so that its
    /// initialisation does not take CPU from requests being served; the
    /// start that takes it gives it the default weight.
    Standby,
    /// An instance a core asked for: pinned to `main` from its start (the
    /// start splits off the helpers once they exist).
    Core(InstanceCpus),
}

/// Pins `pid` and its descendants to `cpus`: each process's main thread to
/// `cpus.main`, its other threads to `cpus.helpers`. Threads a main thread
/// makes later inherit its CPU.
fn pin_tree(pid: i32, cpus: InstanceCpus) {
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let Ok(tid) = t.file_name().to_string_lossy().parse::<i32>() else {
                continue;
            };
            let cpu = if tid == p { cpus.main } else { cpus.helpers };
            let _ = cpu::pin_thread(tid, cpu);
            if let Ok(children) = std::fs::read_to_string(t.path().join("children")) {
                todo.extend(
                    children
                        .split_whitespace()
                        .filter_map(|c| c.parse::<i32>().ok()),
                );
            }
        }
    }
}
