//! hearth-agent: PID 1 of every hearth instance.
//!
//! It starts the Node.js runtime shim and relays length-prefixed frames
//! (`include/hearth_protocol.h`) between the host and the runtime, turning
//! the runtime's stdout/stderr into LOG frames and reporting its death.
//!
//! Two ways in (see `cli.rs`):
//! * process sandbox: `--channel-fd N`, everything else already set up; with
//!   `--log-fd M` in direct mode (the runtime gets the channel, the agent
//!   only supervises and forwards raw output);
//! * microVM: `/init` of an initramfs, settings on the kernel command line.
//!
//! Module map:
//! * `cli`      flags and mode choice        * `cmdline`  kernel command-line keys
//! * `vm`       mounts, switch root, power-off * `modules`  finit_module from `order`
//! * `channel`  the host stream per transport * `runtime`  spawning node
//! * `relay`    the relaying event loop      * `frames`   sans-IO frame tracking
//! * `supervise` direct mode's event loop
//! * `output`   stdout/stderr -> LOG frames  * `reap`     signals and child exits
//! * `runtime_api` the Lambda Runtime API mode (its sans-IO HTTP and
//!   translations are the `hearth-rapi` crate) * `epoll` its event set
//! * `buf`, `json`, `sys`, `log`: small helpers.

#[macro_use]
mod log;
mod buf;
mod channel;
mod cli;
mod cmdline;
mod epoll;
mod frames;
mod host_api;
mod json;
mod modules;
mod output;
mod reap;
mod relay;
mod runtime;
mod runtime_api;
mod supervise;
mod sys;
mod vm;

use std::os::fd::{FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::time::Duration;

// The wire protocol shared with hearth, as `crate::protocol` in every module.
use hearth_protocol as protocol;
// The Runtime API's sans-IO translations, as `crate::rapi`.
use hearth_rapi::api as rapi;

use channel::{Channel, ChannelSpec};
use cli::Command;
use reap::Signals;
use relay::{Mode, Outcome, Relay};
use runtime::{Runtime, RuntimeSpec};
use supervise::Supervisor;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let is_pid1 = std::process::id() == 1;
    match cli::parse(&args, is_pid1) {
        Ok(Command::Help) => print!("{}", cli::USAGE),
        // hearth reads the protocol number from this line (`runtime::check_agent`).
        Ok(Command::Version) => println!(
            "hearth-agent {} (protocol {})",
            env!("CARGO_PKG_VERSION"),
            protocol::VERSION
        ),
        Ok(Command::Process {
            channel_fd,
            log_fd,
            channel_out_fd,
            runtime,
        }) => std::process::exit(run_process((channel_fd, channel_out_fd), log_fd, &runtime)),
        Ok(Command::Vm { ignored_args }) => run_vm(&ignored_args),
        Ok(Command::RuntimeApi(kind)) => std::process::exit(runtime_api::run(kind)),
        Err(msg) => {
            diag!("{msg}");
            std::process::exit(2);
        }
    }
}

/// Process sandbox: relay (or, with a log socket, supervise) until the
/// runtime dies or the host leaves. `channel` is the channel's fd and, for a
/// pipe pair, the write end back to the host.
fn run_process(channel: (i32, Option<i32>), log_fd: Option<i32>, spec: &RuntimeSpec) -> i32 {
    ensure_stdio();
    // The runtime runs as the same uid: were the agent dumpable, function code
    // could open /proc/1/mem and rewrite it (seccomp stops ptrace, not /proc),
    // then speak for it on the channel. The runtime's exec makes it dumpable
    // again, as a process of its own.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if std::process::id() != 1 {
        // Outside a PID namespace (tests, debugging) still adopt the
        // runtime's orphans, as PID 1 would.
        // SAFETY: prctl with integer arguments.
        unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    }
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => return fail(&format!("signalfd: {e}")),
    };
    let outcome = match log_fd {
        Some(log_fd) => supervise(channel, log_fd, signals, spec),
        None => relay(channel.0, signals, spec),
    };
    let outcome = match outcome {
        Ok(o) => o,
        Err(code) => return code,
    };
    match &outcome {
        Outcome::RuntimeExited {
            shutdown_requested: true,
            ..
        } => 0,
        Outcome::RuntimeExited { .. } => 1,
        Outcome::HostGone => {
            diag!("the host closed the channel; stopping the runtime");
            0
        }
        Outcome::HostBroken(why) | Outcome::Failed(why) => {
            diag!("{why}; stopping the runtime");
            2
        }
    }
}

/// Relaying mode: the agent sits between the host and the runtime.
fn relay(channel_fd: i32, signals: Signals, spec: &RuntimeSpec) -> Result<Outcome, i32> {
    let channel = match Channel::open(&ChannelSpec::InheritedFd(channel_fd), Duration::ZERO) {
        Ok(c) => c,
        Err(e) => return Err(fail(&e.to_string())),
    };
    let runtime = spawn_runtime(spec, None)?;
    Ok(Relay::new(Mode::Process, channel, signals, runtime).run())
}

/// Direct mode: the runtime gets the channel (a socket, or a pair of pipes:
/// the read end from the host and the write end back); the agent keeps the
/// log socket.
fn supervise(
    (channel_fd, out_fd): (i32, Option<i32>),
    log_fd: i32,
    signals: Signals,
    spec: &RuntimeSpec,
) -> Result<Outcome, i32> {
    let kinds = match out_fd {
        None => vec![(channel_fd, "channel", true), (log_fd, "log", true)],
        Some(out) => vec![
            (channel_fd, "channel", false),
            (out, "channel out", false),
            (log_fd, "log", true),
        ],
    };
    for (fd, what, socket) in kinds {
        let ok = if socket {
            sys::is_socket(fd)
        } else {
            sys::is_fifo(fd)
        };
        if !ok.unwrap_or(false) {
            let kind = if socket { "socket" } else { "pipe" };
            return Err(fail(&format!("{what} fd {fd} is not a {kind}")));
        }
    }
    // Never inherited by the runtime (the launcher cleared close-on-exec).
    if let Err(e) = sys::set_cloexec(log_fd, true) {
        return Err(fail(&format!("log fd {log_fd}: {e}")));
    }
    // SAFETY: the launcher passed these descriptors for the agent to own.
    let (channel, out, log) = unsafe {
        (
            OwnedFd::from_raw_fd(channel_fd),
            out_fd.map(|fd| OwnedFd::from_raw_fd(fd)),
            OwnedFd::from_raw_fd(log_fd),
        )
    };
    if let (Some(kind), true) = (spec.api, spec.host_serves) {
        return serve_by_host(channel, log, signals, kind, spec);
    }
    let runtime = spawn_runtime(spec, Some((channel, out)))?;
    match Supervisor::new(log, signals, runtime) {
        Ok(s) => Ok(s.run()),
        Err(e) => Err(fail(&format!("log socket: {e}"))),
    }
}

/// Host-served Runtime API: the agent keeps the channel, starts the bootstrap
/// on HELLO and reports its exit there (see `host_api`).
fn serve_by_host(
    channel: OwnedFd,
    log: OwnedFd,
    signals: Signals,
    kind: rapi::Kind,
    spec: &RuntimeSpec,
) -> Result<Outcome, i32> {
    use std::os::fd::AsRawFd;
    let _ = sys::set_cloexec(channel.as_raw_fd(), true);
    let started = host_api::start(channel.as_raw_fd(), kind, spec)
        .map_err(|e| fail(&format!("runtime api: {e}")))?;
    let outcome = match Supervisor::without_output(log, signals, started.handle) {
        Ok(s) => s.run(),
        Err(e) => return Err(fail(&format!("log socket: {e}"))),
    };
    if let Outcome::RuntimeExited { exit, .. } = &outcome {
        host_api::report_exit(channel.as_raw_fd(), &exit.lambda_message());
    }
    Ok(outcome)
}

fn spawn_runtime(
    spec: &RuntimeSpec,
    direct: Option<(OwnedFd, Option<OwnedFd>)>,
) -> Result<Runtime, i32> {
    Runtime::spawn(spec, direct)
        .map_err(|e| fail(&format!("cannot start {}: {e}", spec.describe())))
}

fn fail(msg: &str) -> i32 {
    diag!("{msg}");
    2
}

/// microVM: boot, relay across host reconnects, power off when the runtime
/// is gone. Never returns: PID 1 exiting would panic the kernel.
fn run_vm(ignored_args: &[String]) -> ! {
    std::panic::set_hook(Box::new(|info| {
        diag!("{info}");
        vm::power_off();
    }));
    if !ignored_args.is_empty() {
        diag!("ignoring arguments {ignored_args:?}");
    }
    let cfg = match vm::boot() {
        Ok(cfg) => cfg,
        Err(e) => {
            diag!("boot failed: {e}");
            vm::power_off();
        }
    };
    ensure_stdio();
    let signals = Signals::install().unwrap_or_else(|e| stop_vm(&format!("signalfd: {e}")));
    let channel = Channel::open(&cfg.channel, Duration::from_millis(cfg.wait_ms))
        .unwrap_or_else(|e| stop_vm(&format!("channel {}: {e}", cfg.channel)));
    let spec = RuntimeSpec {
        node: cfg.node.clone(),
        shim: cfg.shim.clone(),
        cwd: PathBuf::from("/var/task"),
        extra_env: Vec::new(),
        api: cfg.api,
        host_serves: false,
        // One vCPU: helper threads could only take turns with the main one.
        parallel_gc: false,
    };
    let runtime = Runtime::spawn(&spec, None)
        .unwrap_or_else(|e| stop_vm(&format!("cannot start {}: {e}", spec.describe())));
    diag!(
        "runtime started (pid {}); channel {}",
        runtime.handle.pid,
        cfg.channel
    );
    match Relay::new(Mode::Vm, channel, signals, runtime).run() {
        Outcome::RuntimeExited { .. } => stop_vm("the runtime is gone; powering off"),
        other => stop_vm(&format!("relay ended: {other:?}; powering off")),
    }
}

fn stop_vm(msg: &str) -> ! {
    diag!("{msg}");
    vm::power_off()
}

/// Opens /dev/null on any of fds 0-2 that is closed, so that fds the agent
/// opens later never land on them (the runtime's stdio is dup2'ed there).
fn ensure_stdio() {
    for fd in 0..=2 {
        // SAFETY: fcntl/open only touch the fd table.
        unsafe {
            if libc::fcntl(fd, libc::F_GETFD) < 0 {
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if null >= 0 && null != fd {
                    libc::dup2(null, fd);
                    libc::close(null);
                }
            }
        }
    }
}
