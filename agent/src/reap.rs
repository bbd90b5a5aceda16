//! Signals and children. The agent blocks the signals it cares about and
//! reads them from a signalfd in its event loop; as PID 1 it reaps every
//! child, including orphans the runtime leaves behind.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use std::time::{Duration, Instant};

use crate::runtime::RuntimeHandle;
use crate::sys::{self, cvt};

/// Signals handled through the signalfd: child exits and shutdown requests.
const HANDLED: [libc::c_int; 3] = [libc::SIGCHLD, libc::SIGTERM, libc::SIGINT];

/// A signalfd for [`HANDLED`], which stay blocked for normal delivery.
/// (Blocked signals are queued even for a namespace's init process, which
/// would otherwise ignore signals it has no handler for.)
pub struct Signals {
    fd: OwnedFd,
}

impl Signals {
    /// Blocks the handled signals and opens the signalfd. Call before
    /// spawning anything, so no child exit can be missed. Children start with
    /// an empty mask: std's process spawning resets it.
    pub fn install() -> io::Result<Signals> {
        // SAFETY: sigset_t is plain data; the calls fill the set we own.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for sig in HANDLED {
                libc::sigaddset(&mut set, sig);
            }
            let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            if rc != 0 {
                return Err(io::Error::from_raw_os_error(rc));
            }
            let fd = cvt(libc::signalfd(
                -1,
                &set,
                libc::SFD_NONBLOCK | libc::SFD_CLOEXEC,
            ))?;
            Ok(Signals {
                fd: OwnedFd::from_raw_fd(fd),
            })
        }
    }

    /// The fd to poll for readability.
    pub fn fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// Signal numbers pending, in arrival order (standard signals coalesce).
    pub fn drain(&self) -> Vec<libc::c_int> {
        let mut got = Vec::new();
        // SAFETY: signalfd_siginfo is plain data.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        loop {
            // SAFETY: we read at most `size` bytes into `info`.
            let n = unsafe {
                sys::read_raw(
                    self.fd(),
                    (&mut info as *mut libc::signalfd_siginfo).cast(),
                    size,
                )
            };
            match n {
                Ok(n) if n == size => got.push(info.ssi_signo as libc::c_int),
                _ => return got,
            }
        }
    }
}

/// How the runtime ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeExit {
    /// `exit(code)`.
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl RuntimeExit {
    /// Decodes a `waitpid` status.
    pub fn from_wait_status(status: libc::c_int) -> RuntimeExit {
        if libc::WIFSIGNALED(status) {
            RuntimeExit::Signal(libc::WTERMSIG(status))
        } else {
            RuntimeExit::Code(libc::WEXITSTATUS(status))
        }
    }

    /// "exited with status 3" / "killed by signal SIGKILL".
    pub fn describe(&self) -> String {
        match *self {
            RuntimeExit::Code(c) => format!("exited with status {c}"),
            RuntimeExit::Signal(s) => format!("killed by signal {}", signal_name(s)),
        }
    }

    /// The `errorMessage` Lambda reports for a runtime that died mid-request.
    pub fn lambda_message(&self) -> String {
        match *self {
            RuntimeExit::Code(c) => format!("Runtime exited with error: exit status {c}"),
            RuntimeExit::Signal(s) => {
                format!("Runtime exited with error: signal: {}", signal_words(s))
            }
        }
    }
}

/// Reaps every exited child without blocking; returns how `runtime_pid`
/// ended if it was among them. Other children are orphans re-parented to us.
///
/// When the runtime has exited, its process group is SIGKILLed *before* the
/// runtime is reaped: until then its zombie holds the pid, so the group id
/// cannot have been handed to an unrelated process (pids wrap quickly when
/// `pid_max` is 32768).
pub fn reap_children(runtime_pid: libc::pid_t) -> Option<RuntimeExit> {
    let mut runtime = None;
    loop {
        // Peek at the next zombie without reaping it.
        // SAFETY: siginfo_t is plain data; waitid fills the one we own.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let flags = libc::WEXITED | libc::WNOHANG | libc::WNOWAIT;
        // SAFETY: waitid writes only into `info`, which we own.
        let rc = unsafe { libc::waitid(libc::P_ALL, 0, &mut info, flags) };
        // SAFETY: waitid succeeded, so si_pid is the field it filled (0: none).
        let pid = if rc == 0 { unsafe { info.si_pid() } } else { 0 };
        if pid <= 0 {
            return runtime;
        }
        if pid == runtime_pid {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(-runtime_pid, libc::SIGKILL) };
        }
        let mut status = 0;
        // SAFETY: waitpid writes the status we own.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            reaped if reaped == runtime_pid => {
                runtime = Some(RuntimeExit::from_wait_status(status))
            }
            reaped if reaped > 0 => {}
            _ => return runtime,
        }
    }
}

/// "SIGKILL" for 9, the bare number for anything unusual.
pub fn signal_name(sig: i32) -> String {
    let name = match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGTRAP => "SIGTRAP",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGALRM => "SIGALRM",
        libc::SIGTERM => "SIGTERM",
        libc::SIGXCPU => "SIGXCPU",
        libc::SIGXFSZ => "SIGXFSZ",
        libc::SIGSYS => "SIGSYS",
        _ => return sig.to_string(),
    };
    name.to_string()
}

/// The words Go's os package (and so Lambda) uses: "killed", "aborted", ...
fn signal_words(sig: i32) -> String {
    let words = match sig {
        libc::SIGKILL => "killed",
        libc::SIGTERM => "terminated",
        libc::SIGABRT => "aborted",
        libc::SIGSEGV => "segmentation fault",
        libc::SIGBUS => "bus error",
        libc::SIGILL => "illegal instruction",
        libc::SIGFPE => "floating point exception",
        libc::SIGINT => "interrupt",
        libc::SIGPIPE => "broken pipe",
        libc::SIGSYS => "bad system call",
        libc::SIGXCPU => "CPU time limit exceeded",
        _ => return signal_name(sig),
    };
    words.to_string()
}

/// What the agent knows of its runtime's life: its exit once reaped, and a
/// requested shutdown (SIGTERM sent, SIGKILL due at `kill_at`). Shared by the
/// relaying and the supervising loop.
pub struct Life {
    pub runtime: RuntimeHandle,
    pub exit: Option<RuntimeExit>,
    pub shutdown_requested: bool,
    pub kill_at: Option<Instant>,
}

impl Life {
    /// A runtime just started.
    pub fn new(runtime: RuntimeHandle) -> Life {
        Life {
            runtime,
            exit: None,
            shutdown_requested: false,
            kill_at: None,
        }
    }

    /// Takes pending signals: SIGCHLD reaps; the first SIGTERM or SIGINT sends
    /// the runtime SIGTERM and schedules SIGKILL after `grace`.
    pub fn on_signals(&mut self, signals: &Signals, grace: Duration) {
        for sig in signals.drain() {
            match sig {
                libc::SIGCHLD => {
                    if let Some(exit) = reap_children(self.runtime.pid) {
                        self.exit = Some(exit);
                    }
                }
                _ if !self.shutdown_requested => {
                    diag!("{} received; stopping the runtime", signal_name(sig));
                    self.shutdown_requested = true;
                    if self.exit.is_none() {
                        self.runtime.signal(libc::SIGTERM);
                    }
                    self.kill_at = Some(Instant::now() + grace);
                }
                _ => {}
            }
        }
    }

    /// SIGKILLs the runtime's process group unless it is reaped (its pid
    /// could belong to someone else by then).
    pub fn kill(&self) {
        if self.exit.is_none() {
            self.runtime.kill_group();
        }
    }

    /// Kills the runtime if a shutdown's grace period ran out.
    pub fn kill_if_due(&mut self) {
        if self.kill_at.is_some_and(|at| Instant::now() >= at) {
            self.kill_at = None;
            diag!("runtime still running; sending SIGKILL");
            self.kill();
        }
    }

    /// Milliseconds until [`Life::kill_if_due`] has work, for a poll timeout (-1: none).
    pub fn poll_timeout_ms(&self) -> i32 {
        self.kill_at.map_or(-1, |at| {
            at.saturating_duration_since(Instant::now())
                .as_millis()
                .min(i32::MAX as u128 - 1) as i32
                + 1
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_read_like_lambda() {
        let code = RuntimeExit::from_wait_status(3 << 8);
        assert_eq!(code, RuntimeExit::Code(3));
        assert_eq!(code.describe(), "exited with status 3");
        assert_eq!(
            code.lambda_message(),
            "Runtime exited with error: exit status 3"
        );
        let sig = RuntimeExit::from_wait_status(libc::SIGKILL);
        assert_eq!(sig.describe(), "killed by signal SIGKILL");
        assert_eq!(
            sig.lambda_message(),
            "Runtime exited with error: signal: killed"
        );
        assert_eq!(RuntimeExit::Signal(50).describe(), "killed by signal 50");
    }
}
