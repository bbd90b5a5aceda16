//! Sandbox backends: where instances run.
//!
//! Every backend hands back an [`Instance`] whose channel speaks the frames of
//! [`crate::protocol`] to the same guest agent; only how the instance is made
//! differs:
//! - [`process`]: a host process jailed by namespaces + seccomp + cgroups (no
//!   KVM needed); [`process::backend`] is its [`Backend`], with pre-initialised standbys.
//! - [`qemu`]: microVMs restored from a migration snapshot, controlled over QMP.
//! - [`firecracker`]: Firecracker microVMs restored from a Full snapshot, with
//!   the agent's channel on vsock; [`vmfiles`] holds the file chores both VM
//!   backends share, [`vmlog`] their capped logs (VMM output, guest console),
//!   [`vmcgroup`] the CPU cgroup of a VMM process.
//!
//! All start the same runtime root ([`crate::runtime`]) and greet the agent
//! with the same [`handshake`]; this module holds the seam between them and
//! the scheduler: [`Backend`], [`Instance`], [`Endpoint`], [`StartError`].
//! [`runtime_api`]: on the process backend, runtimes other than Node.js get
//! the Lambda Runtime API from hearth's cores instead of a relay process.

pub mod boot_gate;
pub mod firecracker;
pub mod handshake;
pub mod process;
pub mod qemu;
pub mod runtime_api;
pub mod vmcgroup;
pub mod vmfiles;
pub mod vmlog;

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::time::Duration;

use crate::spec::FunctionSpec;

/// CPU of one instance, whatever runs it (a process sandbox, a VMM): its cgroup's quota,
/// 1/1000 of a core per period (one core; see [`HELPERS_CPU_MILLICORES`] for the one kind
/// that gets more). Instances are pinned to their worker's core (or split between it and
/// the next: [`InstanceCpus`]), so what the cgroup adds is that all the instance's threads
/// count as one entity against the other tenants on those CPUs, and the hard ceiling
/// should pinning ever go.
pub const INSTANCE_CPU_MILLICORES: u32 = 1000;

/// CPU on top of [`INSTANCE_CPU_MILLICORES`] for an instance whose helper threads
/// run on a CPU of their own ([`InstanceCpus::split`]; the process backend's Node
/// instances placed beside their worker). Its main thread may fill one core and
/// V8 collects beside it, on the worker's CPU; at one core in all, the
/// collector's share came out of the main thread's time: the Express app at
/// concurrency 1 was throttled in most 100 ms periods, its main thread idle 7 %
/// of the time and its p99 longer (perf/RESULTS.md, "V8's helpers on the
/// worker's CPU"). Express's helpers used ~7 % of a core there; a quarter
/// leaves room for handlers that allocate more. Every thread but each
/// process's main one goes to the worker's CPU whenever hearth pins the
/// instance (at start, for a standby taken, at each hand-over): V8's, and also
/// libuv's pool and any workers the handler started by then (a thread started
/// afterwards inherits its creator's CPU until the next hand-over). A sandbox
/// cannot change its own affinity, so a handler chooses at most which of the
/// two CPUs its threads use; the quota bounds the whole instance: 1.25 cores,
/// at most one of them on either CPU, which it shares with a worker as every
/// instance does.
pub const HELPERS_CPU_MILLICORES: u32 = 250;

/// Why an instance could not be made ready. Every variant but [`StartError::Init`]
/// is a host-side failure (deploy answers 503); the message of each is what
/// users and logs see, so it names what failed and keeps the cause's words.
#[derive(Debug)]
pub enum StartError {
    /// The function's code failed to load (the runtime's message, and the
    /// bounded tail of what it printed). Deploy answers 422.
    Init {
        error_type: String,
        message: String,
        logs: InitLogs,
    },
    /// The server is shutting down and makes no new instance.
    ShuttingDown,
    /// The function was deleted before its instance started.
    Deleted,
    /// A host operation on the way failed; `what` names it.
    Io { what: String, err: std::io::Error },
    /// The process jail could not be made.
    Jail(process::SandboxError),
    /// Every host uid of the process backend is held by a live instance.
    Uids(process::uids::UidsExhausted),
    /// The function's code image could not be built.
    Image(crate::guest::images::ImageError),
    /// QEMU failed: it did not start, exited, or a QMP command or the
    /// migration failed.
    Vm(qemu::VmError),
    /// Firecracker failed: it did not start, exited, an API request failed,
    /// or the agent's vsock port could not be reached.
    Firecracker(firecracker::VmmError),
    /// The runtime sent no READY within `waited`.
    NotReady { waited: Duration },
    /// The instance closed its channel before READY; the last lines it printed.
    Exited { output: InitLogs },
    /// The agent's frames could not be decoded.
    Protocol(crate::protocol::ProtocolError),
    /// The agent sent a frame other than READY, INIT_ERROR or LOG before READY.
    Unexpected(crate::protocol::FrameType),
    /// A start failed, and the runtime's last output lines (read from its log
    /// socket afterwards) say more.
    WithOutput {
        cause: Box<StartError>,
        output: InitLogs,
    },
    /// A phase of a VM's life failed (`template VM`, `snapshot`, `restore`);
    /// `log_tail` is the end of QEMU's and the guest console's output.
    InVm {
        phase: &'static str,
        cause: Box<StartError>,
        log_tail: String,
    },
}

impl StartError {
    /// A host operation `what` failed with `err`.
    pub fn io(what: impl Into<String>, err: std::io::Error) -> StartError {
        StartError::Io {
            what: what.into(),
            err,
        }
    }
}

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StartError::Init {
                error_type,
                message,
                ..
            } => write!(f, "{error_type}: {message}"),
            StartError::ShuttingDown => write!(f, "the server is shutting down"),
            StartError::Deleted => write!(f, "function deleted"),
            StartError::Io { what, err } => write!(f, "{what}: {err}"),
            StartError::Jail(e) => write!(f, "{e}"),
            StartError::Uids(e) => write!(f, "{e}"),
            StartError::Image(e) => write!(f, "{e}"),
            StartError::Vm(e) => write!(f, "{e}"),
            StartError::Firecracker(e) => write!(f, "{e}"),
            StartError::NotReady { waited } => {
                write!(f, "runtime not ready after {} ms", waited.as_millis())
            }
            StartError::Exited { output } if output.is_empty() => {
                write!(f, "instance exited during start-up")
            }
            StartError::Exited { output } => {
                write!(f, "instance exited during start-up: {}", output.join(" | "))
            }
            StartError::Protocol(e) => write!(f, "agent protocol: {e}"),
            StartError::Unexpected(kind) => write!(f, "agent sent {kind:?} before ready"),
            StartError::WithOutput { cause, output } => {
                write!(f, "{cause}: {}", output.join(" | "))
            }
            StartError::InVm {
                phase,
                cause,
                log_tail,
            } => write!(f, "{phase}: {cause}{log_tail}"),
        }
    }
}

impl From<qemu::VmError> for StartError {
    fn from(e: qemu::VmError) -> Self {
        StartError::Vm(e)
    }
}

impl From<firecracker::VmmError> for StartError {
    fn from(e: firecracker::VmmError) -> Self {
        match e {
            firecracker::VmmError::Uids(u) => StartError::Uids(u),
            e => StartError::Firecracker(e),
        }
    }
}

impl std::error::Error for StartError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            StartError::Io { err, .. } => Some(err),
            StartError::Jail(e) => Some(e),
            StartError::Uids(e) => Some(e),
            StartError::Image(e) => Some(e),
            StartError::Protocol(e) => Some(e),
            StartError::Vm(e) => Some(e),
            StartError::Firecracker(e) => Some(e),
            StartError::WithOutput { cause, .. } | StartError::InVm { cause, .. } => Some(&**cause),
            _ => None,
        }
    }
}

/// Why a backend could not be set up at server start ([`select`] reports it,
/// and `auto` falls back to the process backend on it).
#[derive(Debug)]
pub enum SetupError {
    /// A program the backend needs is missing or does not run (QEMU); the
    /// text says what to install or set.
    Host(String),
    /// The runtime root could not be made.
    Runtime(crate::runtime::RuntimeError),
    /// The guest kernel or images could not be had.
    Guest(crate::guest::images::ImageError),
    /// A host operation failed; `what` names it.
    Io { what: String, err: std::io::Error },
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SetupError::Host(m) => write!(f, "{m}"),
            SetupError::Runtime(e) => write!(f, "{e}"),
            SetupError::Guest(e) => write!(f, "{e}"),
            SetupError::Io { what, err } => write!(f, "{what}: {err}"),
        }
    }
}

impl std::error::Error for SetupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SetupError::Host(_) => None,
            SetupError::Runtime(e) => Some(e),
            SetupError::Guest(e) => Some(e),
            SetupError::Io { err, .. } => Some(err),
        }
    }
}

/// How the owning core talks to an instance.
pub enum Endpoint {
    /// Frames on the channel to the guest (the Node shim, or the agent's relay).
    Channel(OwnedFd),
    /// Frames on a pair of pipes: `rx` reads what the guest writes, `tx`
    /// writes to it. The process backend's Node.js instances use them: a
    /// message through a pipe costs the two processes about half what one
    /// through a Unix socket does (`perf/functions/floor.sh`, RESULTS.md).
    Pipes { rx: OwnedFd, tx: OwnedFd },
    /// The Runtime API, served by the core itself ([`runtime_api`]).
    RuntimeApi(Box<runtime_api::Served>),
}

/// The CPUs an instance runs on. Its processes' main threads (Node's event
/// loop, the agent) on `main`; every other thread (V8's collector and compiler
/// helpers) on `helpers`. One CPU for both, except for an instance placed
/// beside its worker (the process backend's Node.js functions limited to one
/// instance): its main thread on the CPU after the worker's, its helpers on
/// the worker's, where they run beside the main thread instead of taking turns
/// with it (perf/RESULTS.md, "V8's helpers on the worker's CPU"). The
/// microVM backends use `main` alone (a VM has one vCPU).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InstanceCpus {
    /// Where each process's main thread runs.
    pub main: usize,
    /// Where the other threads run.
    pub helpers: usize,
}

impl InstanceCpus {
    /// Everything on `cpu`.
    pub fn on(cpu: usize) -> InstanceCpus {
        InstanceCpus {
            main: cpu,
            helpers: cpu,
        }
    }

    /// The helpers run on a CPU of their own.
    pub fn split(self) -> bool {
        self.main != self.helpers
    }
}

/// A running, initialised instance of one function.
pub trait Instance: Send {
    /// What the owning core serves the instance through (taken once): the
    /// host end of the channel to the guest, a pipe pair, or the Runtime API.
    fn take_endpoint(&mut self) -> Option<Endpoint>;
    /// A second socket carrying only LOG frames (the process backend's agent
    /// in direct mode), taken once by the log collector; `None` when logs
    /// travel on the channel.
    fn take_log_channel(&mut self) -> Option<OwnedFd> {
        None
    }
    /// Stops the instance at once (SIGKILL / VM kill); cheap, non-blocking.
    fn kill(&mut self);
    /// Kills if needed and releases everything (waits for exit, removes cgroups, files).
    /// May block; called off the event loops.
    fn destroy(self: Box<Self>);
    /// The instance was handed to another core: run it on `cpus` from now on
    /// (`SchedConfig::instance_cpus`).
    fn repin(&mut self, _cpus: InstanceCpus) {}
    /// Memory charged to the instance, where the backend can tell.
    fn memory_bytes(&self) -> Option<u64>;
    /// The instance answered a request (its response is queued); called on
    /// the owning core after every answer, so it must be cheap.
    fn answered(&mut self) {}
    /// The memory limit was hit (the instance was OOM-killed).
    fn oom_killed(&self) -> bool {
        false
    }
    /// Scheduler time of the threads that serve requests (cumulative), for
    /// the pool's autoscaler; `None` where the backend cannot tell.
    fn sched_time(&mut self) -> Option<SchedTime> {
        None
    }
    /// Whether an INVOKE sent while the instance runs another waits in the
    /// runtime and runs right after it: the Node shim reading a channel of
    /// its own (it queues what arrives meanwhile). The scheduler then sends
    /// such an instance its next request ahead (see `sched::CorePool::send_ahead`).
    /// Not through a relay or the Runtime API, which expect one at a time.
    fn runs_queued(&self) -> bool {
        false
    }
}

/// Where a task's time went, cumulative, from `/proc/<pid>/schedstat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedTime {
    /// Nanoseconds on a CPU.
    pub run_ns: u64,
    /// Nanoseconds runnable but waiting for a CPU.
    pub wait_ns: u64,
}

impl SchedTime {
    /// Reads one task's `schedstat` file (`/proc/<pid>/schedstat`, or
    /// `/proc/<pid>/task/<tid>/schedstat` for a thread).
    pub fn read(path: &std::path::Path) -> Option<SchedTime> {
        let text = std::fs::read_to_string(path).ok()?;
        let mut f = text.split_whitespace().map(|v| v.parse::<u64>().ok());
        Some(SchedTime {
            run_ns: f.next()??,
            wait_ns: f.next()??,
        })
    }
}

impl std::ops::Add for SchedTime {
    type Output = SchedTime;
    fn add(self, o: SchedTime) -> SchedTime {
        SchedTime {
            run_ns: self.run_ns + o.run_ns,
            wait_ns: self.wait_ns + o.wait_ns,
        }
    }
}

/// Lines a runtime printed while starting, kept for the function's logs.
pub type InitLogs = Vec<String>;

/// The server's instance memory budget (MiB) as a backend sees it: what it takes for
/// instances it keeps on its own (standbys), and a hook to give them up.
pub trait MemoryBudget: Send + Sync {
    /// Takes `mb` if it fits, after the reclaim hook freed what it could.
    fn try_take(&self, mb: u64) -> bool;
    /// Gives back what [`MemoryBudget::try_take`] took.
    fn give(&self, mb: u64);
    /// Registers the hook a reservation that does not fit calls first: it frees at least
    /// the MiB it is given if it can, and says whether it freed anything.
    fn set_reclaim(&self, reclaim: Box<dyn Fn(u64) -> bool + Send + Sync>);
}

/// A way of running instances.
pub trait Backend: Send + Sync {
    /// Name shown in logs and `GET /functions/<id>`.
    fn name(&self) -> &'static str;
    /// Deploy-time preparation (image, template, snapshot) in `dir`, the function's
    /// directory; fails with `StartError::Init` when the handler does not load.
    fn prepare(&self, spec: &FunctionSpec, dir: &std::path::Path) -> Result<InitLogs, StartError>;
    /// Makes a new ready instance for `spec`, to run on `cpus`
    /// (`SchedConfig::instance_cpus`). Blocking; runs on a starter thread.
    fn start(
        &self,
        spec: &FunctionSpec,
        dir: &std::path::Path,
        cpus: InstanceCpus,
    ) -> Result<(Box<dyn Instance>, InitLogs), StartError>;
    /// A function was loaded from the state dir at start-up: warm up whatever
    /// makes its first start fast (process: a standby; VMs: check the snapshot).
    fn restore(&self, _spec: &FunctionSpec, _dir: &std::path::Path) {}
    /// The function is gone: drop anything kept for it (standbys, templates in memory).
    fn forget(&self, _id: &str) {}
    /// The most disk [`Backend::prepare`] may add to `dir` (a VM's code image and
    /// snapshot), bytes; the deploy reserves it in the functions' disk budget before
    /// prepare writes anything, and refuses when it does not fit.
    fn prepare_bytes_max(&self, _spec: &FunctionSpec, _dir: &std::path::Path) -> u64 {
        0
    }
    /// Files the backend keeps per function, relative to its directory (for `GET /functions/<id>`).
    fn artifacts(&self, _dir: &std::path::Path) -> Vec<PathBuf> {
        Vec::new()
    }
    /// Releases everything at server shutdown.
    fn shutdown(&self) {}
    /// The server's instance memory budget, given once before serving: a backend that
    /// keeps initialised instances between requests (the process backend's standbys)
    /// reserves their memory in it and gives it up when instances need the room.
    fn use_memory_budget(&self, _memory: std::sync::Arc<dyn MemoryBudget>) {}
    /// Whether [`Backend::prepare`] keeps the instance it made (as a standby, with its own
    /// share of the memory budget), so a deploy need not hold one for it meanwhile.
    fn keeps_standby(&self) -> bool {
        false
    }
    /// Whether the backend runs functions of `runtime` (Node.js everywhere; the others
    /// where the guest agent serves them the Runtime API with a userland to run in).
    fn runs(&self, runtime: crate::runtime::RuntimeKind) -> bool {
        runtime.is_nodejs()
    }
}

/// Picks the backend for `cfg.backend` (`auto`: the best this host runs).
pub fn select(cfg: &crate::config::ServeConfig) -> std::io::Result<Box<dyn Backend>> {
    use crate::config::BackendKind;
    let fail = |m: String| std::io::Error::other(m);
    let process = || -> std::io::Result<Box<dyn Backend>> {
        let b = process::backend::ProcessBackend::new(cfg, cfg.standby)
            .map_err(|m| fail(format!("process backend: {m}")))?;
        Ok(Box::new(b))
    };
    match cfg.backend {
        BackendKind::Process => process(),
        BackendKind::Qemu => {
            let b = qemu::QemuBackend::new(cfg).map_err(|m| fail(format!("qemu backend: {m}")))?;
            Ok(Box::new(b))
        }
        BackendKind::Firecracker => {
            let b = firecracker::FirecrackerBackend::new(cfg)
                .map_err(|m| fail(format!("firecracker backend: {m}")))?;
            Ok(Box::new(b))
        }
        BackendKind::Auto => {
            // MicroVMs only when they run at hardware speed; under software
            // emulation the process backend serves far faster.
            if let Err(why) = qemu::kvm_usable() {
                eprintln!("hearth: backend auto: process (no microVMs: {why})");
                return process();
            }
            // Firecracker where it is installed and starts; else QEMU.
            if firecracker::find_firecracker().is_ok() {
                match firecracker::FirecrackerBackend::new(cfg) {
                    Ok(b) => {
                        eprintln!("hearth: backend auto: firecracker");
                        return Ok(Box::new(b));
                    }
                    Err(why) => eprintln!("hearth: backend auto: not firecracker ({why})"),
                }
            }
            match qemu::QemuBackend::new(cfg) {
                Ok(b) => {
                    eprintln!("hearth: backend auto: qemu with KVM");
                    Ok(Box::new(b))
                }
                Err(why) => {
                    eprintln!("hearth: backend auto: process (qemu unavailable: {why})");
                    process()
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The texts users see in 503 answers and function logs stay what they were
    /// when the causes were strings.
    #[test]
    fn start_errors_read_as_before() {
        let exited = |lines: &[&str]| StartError::Exited {
            output: lines.iter().map(|l| l.to_string()).collect(),
        };
        let cases = [
            (StartError::ShuttingDown, "the server is shutting down"),
            (StartError::Deleted, "function deleted"),
            (
                StartError::NotReady {
                    waited: Duration::from_secs(10),
                },
                "runtime not ready after 10000 ms",
            ),
            (exited(&[]), "instance exited during start-up"),
            (
                exited(&["a", "b"]),
                "instance exited during start-up: a | b",
            ),
            (
                StartError::io("send hello", std::io::Error::other("broken pipe")),
                "send hello: broken pipe",
            ),
            (
                StartError::Unexpected(crate::protocol::FrameType::Response),
                "agent sent Response before ready",
            ),
            (
                StartError::WithOutput {
                    cause: Box::new(exited(&[])),
                    output: vec!["Error: boom".into(), "at x".into()],
                },
                "instance exited during start-up: Error: boom | at x",
            ),
            (
                StartError::InVm {
                    phase: "restore",
                    cause: Box::new(StartError::Vm(qemu::VmError::Migration(
                        "VM is shutdown".into(),
                    ))),
                    log_tail: "\n--- console:\npanic".into(),
                },
                "restore: VM is shutdown\n--- console:\npanic",
            ),
        ];
        for (e, text) in cases {
            assert_eq!(e.to_string(), text, "{e:?}");
        }
        let init = StartError::Init {
            error_type: "Runtime.ImportModuleError".into(),
            message: "no index.js".into(),
            logs: Vec::new(),
        };
        assert_eq!(init.to_string(), "Runtime.ImportModuleError: no index.js");
        use std::error::Error;
        let io = StartError::io("dup channel", std::io::Error::other("EMFILE"));
        assert_eq!(io.source().unwrap().to_string(), "EMFILE");
    }
}
