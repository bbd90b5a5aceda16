//! Starting and stopping the language runtime: `node <shim>` (or, for other
//! languages, the agent itself in runtime-API mode) with the frame
//! socket on fd 3 (a socketpair to the agent, or in direct mode the host's
//! channel itself; over pipes, fd 3 reads from the host and fd 4 writes to
//! it) and its stdout/stderr on pipes back to the agent.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use crate::rapi::Kind;
use crate::sys;

/// The fd number on which a runtime finds its frame socket.
pub const RUNTIME_CHANNEL_FD: RawFd = 3;
/// Where it writes its frames when the channel is a pipe pair (fd 3 is then
/// the read end; the shim tells the two cases apart by fd 3's type).
pub const RUNTIME_CHANNEL_OUT_FD: RawFd = 4;

/// What to run and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuntimeSpec {
    /// The Node.js binary.
    pub node: PathBuf,
    /// The runtime shim script node runs.
    pub shim: PathBuf,
    /// Working directory (the function code).
    pub cwd: PathBuf,
    /// Environment on top of the fixed base set, `KEY=VALUE` pairs.
    pub extra_env: Vec<(String, String)>,
    /// Not Node.js: the agent itself serves the Runtime API to this runtime.
    pub api: Option<Kind>,
    /// With `api`: hearth serves the Runtime API itself (see `host_api`).
    pub host_serves: bool,
    /// Node.js without [`SINGLE_THREADED_GC`]: hearth runs V8's helper threads
    /// on another CPU than the main thread (`InstanceCpus` in hearth).
    pub parallel_gc: bool,
}

impl RuntimeSpec {
    /// The V8 flags Node.js starts with.
    pub fn node_flags(&self) -> Vec<&'static str> {
        let mut flags = Vec::with_capacity(NODE_FLAGS.len() + 1);
        if !self.parallel_gc {
            flags.push(SINGLE_THREADED_GC);
        }
        flags.extend(NODE_FLAGS);
        flags
    }

    /// The command line, for messages.
    pub fn describe(&self) -> String {
        match self.api {
            Some(kind) => format!("{RUNTIME_API_EXE} --runtime-api {}", kind.name()),
            None => format!(
                "{} {} {}",
                self.node.display(),
                self.node_flags().join(" "),
                self.shim.display()
            ),
        }
    }
}

/// V8 flag of a Node.js runtime whose threads all share one CPU (perf/RESULTS.md
/// has the runs): hearth pins an instance to the core that owns it, and a
/// microVM has one vCPU, where V8's parallel and concurrent collector threads
/// cannot run beside the main thread, only take turns with it and with
/// hearth's worker. The Express app through the shim, pinned (`SHIM_APP=express
/// taskset -c 1 node perf/shim-bench.js`): 7.0k -> 8.4k round trips/s, 126 ->
/// 104 us of CPU each, p99 1.6-1.8 -> 0.6 ms. Left out with
/// [`RuntimeSpec::parallel_gc`], where the helpers get a CPU of their own.
pub const SINGLE_THREADED_GC: &str = "--single-threaded-gc";

/// V8 flags every Node.js runtime starts with (perf/RESULTS.md has the runs).
///
/// `--no-allocation-site-pretenuring`: V8 allocates straight into the old
/// generation from an allocation site whose objects mostly survived earlier
/// scavenges. Express's per-request objects survive scavenges far more than a
/// request's objects should (on Node 20 every property added after its
/// `Object.setPrototypeOf` makes a new hidden class; about 5 kB a request was
/// promoted whatever the young generation's size), and V8 pretenured two of
/// their allocation sites. The Express app alone in-process
/// (`perf/functions/handler-loop.js`): each scavenge paused 8.8 -> 5.0 ms and
/// promoted 4.1 -> 3.0 MB, 80 -> 65 us per call; through the shim (as above):
/// 111-118 -> 95-102 us of CPU per round trip, p99 0.7-0.9 -> 0.5 ms. The
/// trivial handler is unchanged; a handler that keeps every object it makes (a
/// 200k-entry cache) pays 0.6 -> 0.7 us per call.
pub const NODE_FLAGS: [&str; 1] = ["--no-allocation-site-pretenuring"];

/// How the agent runs itself in runtime-API mode.
const RUNTIME_API_EXE: &str = "/proc/self/exe";

/// The environment every runtime starts with; `--env` adds to or overrides it.
pub const BASE_ENV: [(&str, &str); 5] = [
    ("PATH", "/usr/bin:/bin"),
    ("HOME", "/tmp"),
    ("LANG", "C.UTF-8"),
    ("TZ", ":UTC"),
    ("LAMBDA_TASK_ROOT", "/var/task"),
];

/// A running runtime and the agent's ends of its three streams.
pub struct Runtime {
    /// The process, for signals.
    pub handle: RuntimeHandle,
    /// Agent end of the frame socket, non-blocking; `None` in direct mode.
    pub channel: Option<OwnedFd>,
    /// Read ends of stdout and stderr, non-blocking.
    pub stdout: OwnedFd,
    pub stderr: OwnedFd,
}

impl Runtime {
    /// Starts the runtime. The caller must already have blocked SIGCHLD
    /// (see `reap::Signals`) so its exit cannot be missed. With `direct`, the
    /// runtime's fd 3 is that socket (the host's channel), not one to the agent,
    /// or that pipe's read end with the write end (≥ 5) as fd 4.
    pub fn spawn(
        spec: &RuntimeSpec,
        direct: Option<(OwnedFd, Option<OwnedFd>)>,
    ) -> io::Result<Runtime> {
        let (agent_end, runtime_end, runtime_out) = match direct {
            Some((fd, out)) => (None, fd, out),
            None => {
                let (a, r) = sys::stream_socketpair()?;
                (Some(a), r, None)
            }
        };
        let runtime_fd = runtime_end.as_raw_fd();
        let out_fd = runtime_out.as_ref().map(|o| o.as_raw_fd());
        let mut cmd = match spec.api {
            Some(kind) => {
                let mut c = Command::new(RUNTIME_API_EXE);
                c.args(["--runtime-api", kind.name()]);
                c
            }
            None => {
                let mut c = Command::new(&spec.node);
                c.args(spec.node_flags()).arg(&spec.shim);
                c
            }
        };
        cmd.env_clear()
            .envs(BASE_ENV)
            .envs(spec.extra_env.iter().map(|(k, v)| (k, v)))
            .current_dir(&spec.cwd)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so stopping it also stops whatever it started.
            .process_group(0);
        // SAFETY: the closure runs in the forked child before exec and only
        // makes async-signal-safe system calls.
        unsafe {
            cmd.pre_exec(move || {
                if runtime_fd == RUNTIME_CHANNEL_FD {
                    sys::set_cloexec(runtime_fd, false)?;
                } else {
                    sys::cvt(libc::dup2(runtime_fd, RUNTIME_CHANNEL_FD))?;
                }
                // The command line keeps the out fd at 5 or above, so neither
                // dup2 overwrites the other's source.
                let mut last = RUNTIME_CHANNEL_FD;
                if let Some(out) = out_fd {
                    sys::cvt(libc::dup2(out, RUNTIME_CHANNEL_OUT_FD))?;
                    last = RUNTIME_CHANNEL_OUT_FD;
                }
                // Nothing else the agent holds (or inherited) may leak into
                // the runtime: mark every higher fd close-on-exec. Closing them
                // outright would also close std's exec-error pipe. Old kernels
                // without close_range just keep relying on O_CLOEXEC.
                libc::close_range(
                    last as libc::c_uint + 1,
                    libc::c_uint::MAX,
                    libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
                );
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        // Only the runtime holds the host's channel now: its exit is the
        // host's end of file.
        drop(runtime_end);
        drop(runtime_out);
        let stdout: OwnedFd = child.stdout.take().expect("stdout is piped").into();
        let stderr: OwnedFd = child.stderr.take().expect("stderr is piped").into();
        for fd in [stdout.as_raw_fd(), stderr.as_raw_fd()]
            .into_iter()
            .chain(agent_end.as_ref().map(|a| a.as_raw_fd()))
        {
            sys::set_nonblocking(fd, true)?;
        }
        // The Child handle is dropped without waiting: the reaper owns exits.
        let handle = RuntimeHandle {
            pid: child.id() as libc::pid_t,
        };
        Ok(Runtime {
            handle,
            channel: agent_end,
            stdout,
            stderr,
        })
    }
}

/// The runtime process, by pid; it also leads its own process group.
#[derive(Clone, Copy, Debug)]
pub struct RuntimeHandle {
    pub pid: libc::pid_t,
}

impl RuntimeHandle {
    /// Sends `sig` to the runtime process only.
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(self.pid, sig) };
    }

    /// SIGKILLs the runtime's whole process group. Only while the runtime is
    /// not yet reaped: afterwards its pid may belong to someone else.
    pub fn kill_group(&self) {
        // SAFETY: as above.
        unsafe { libc::kill(-self.pid, libc::SIGKILL) };
    }
}
