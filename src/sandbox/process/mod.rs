//! The process backend: [`backend`] is the [`Backend`](super::Backend) (standbys, uid leases,
//! shutdown); this module and the rest of its children are the jail it runs each instance in,
//! a command run as PID 1 of fresh namespaces on the host kernel.
//!
//! An instance is the guest agent (or any command) in new user, PID, mount, network, IPC, UTS
//! and cgroup namespaces, with:
//! - a read-only root built by [`crate::runtime::root::ensure_runtime`], the function code read-only at
//!   `/var/task`, a private size-limited tmpfs at `/tmp`, its own `/proc`, a handful of devices;
//! - only loopback networking;
//! - uid/gid 0 inside mapped to one unprivileged host id, every capability dropped,
//!   `no_new_privs`, a seccomp filter ([`seccomp`]), rlimits;
//! - memory, pids and cpu limits from cgroups v2 or v1 where the host offers them ([`cgroup`]).
//!
//! [`spawn`] runs `hearth __sandbox` ([`launch`]), a single-threaded launcher that does the
//! setup hearth's multi-threaded process cannot safely do after `fork`. The launcher exits once
//! the sandbox has exec'd, and the sandbox's PID 1 is reparented to hearth, which is a child
//! subreaper ([`set_subreaper`]) and therefore reaps it ([`Sandbox::try_wait`]).
//!
//! The channel is a Unix stream socketpair: fd 3 inside, [`Sandbox::channel`] outside; or, with
//! [`SandboxSpec::pipes`], two pipes: fd 3 inside reads what [`Sandbox::channel_out`] writes,
//! fd 5 inside writes what [`Sandbox::channel`] reads. A second socketpair, fd 4 inside and
//! [`Sandbox::logs`] outside, carries the agent's own output. Fds 0-2
//! are /dev/null (`HEARTH_SANDBOX_STDERR=inherit` in hearth's environment keeps hearth's stderr
//! as fd 2, for debugging); no other descriptor survives into the sandbox.
//!
//! This is weaker isolation than a microVM: the sandbox shares the host kernel.

pub mod backend;
pub mod cgroup;
pub mod launch;
pub mod seccomp;
pub mod uids;

use std::fmt;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use cgroup::Group;
use launch::Line;

/// How long [`spawn`] waits for the launcher to report success or failure.
pub const SPAWN_TIMEOUT_MS: u64 = 15_000;
/// How long [`Sandbox::destroy`] waits for PID 1 to be reaped after SIGKILL.
pub const DESTROY_WAIT_MS: u64 = 5_000;
/// Longest instance name (a cgroup directory name).
pub const NAME_BYTES_MAX: usize = 64;
/// Smallest `/tmp`: tmpfs reads `size=0` as "unlimited", so zero must never reach it.
pub const TMP_BYTES_MIN: u64 = 4096;

/// What to run and with which limits.
#[derive(Serialize, Deserialize, Clone, Debug)]
#[serde(deny_unknown_fields)]
pub struct SandboxSpec {
    /// Read-only root file system (from [`crate::runtime::root::ensure_runtime`]).
    pub runtime_root: PathBuf,
    /// Bind-mounted read-only at /var/task. Files must be readable by "others" (the sandbox's
    /// uid is `host_uid`, not their owner).
    pub code_dir: PathBuf,
    /// Size of the private tmpfs at /tmp; also RLIMIT_FSIZE.
    pub tmp_bytes: u64,
    /// cgroup memory limit, swap included where the host accounts swap.
    pub memory_bytes: u64,
    /// cgroup pids limit (tasks, i.e. threads and processes).
    pub pids_max: u32,
    /// cgroup cpu quota in 1/1000 core per 100 ms period; 0 = unlimited.
    pub cpu_millicores: u32,
    /// Pin the sandbox to this CPU.
    pub cpu_core: Option<usize>,
    /// Start with the background CPU weight (a standby made while the cores
    /// serve; [`Group::to_foreground`] ends it).
    #[serde(default)]
    pub cpu_background: bool,
    /// Host uid and gid that uid/gid 0 inside maps to; the only ids mapped. Never 0.
    pub host_uid: u32,
    /// Unique instance name: the cgroup directory name (the hostname inside is always
    /// [`launch::HOSTNAME`]).
    pub name: String,
    /// Command inside; argv[0] is an absolute path in the runtime root.
    pub argv: Vec<String>,
    /// The complete environment of the command.
    pub env: Vec<(String, String)>,
    /// Host directories bind-mounted read-only (nosuid, nodev) at the same path inside, over
    /// empty directories of the root (the userland of non-Node runtimes: `/usr`, …).
    #[serde(default)]
    pub binds: Vec<PathBuf>,
    /// The channel is a pair of pipes rather than a socketpair (see the module doc).
    #[serde(default)]
    pub pipes: bool,
    /// The CPU weight, in default weights, of the directory holding every
    /// sandbox ([`cgroup::set_parent_weight`]); 0 leaves it as it is.
    #[serde(default)]
    pub parent_cpu_weight: u64,
}

/// Why a sandbox could not be created.
#[derive(Debug)]
pub enum SandboxError {
    /// The spec is unusable; nothing was started.
    InvalidSpec(String),
    /// A host-side operation failed.
    Io {
        what: &'static str,
        source: io::Error,
    },
    /// Setting up the sandbox failed (reported by the launcher or the sandbox before exec).
    Setup(String),
    /// The launcher misbehaved: died, timed out or said something unexpected.
    Launcher(String),
}

impl fmt::Display for SandboxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SandboxError::InvalidSpec(m) => write!(f, "invalid sandbox spec: {m}"),
            SandboxError::Io { what, source } => write!(f, "{what}: {source}"),
            SandboxError::Setup(m) => write!(f, "sandbox setup failed: {m}"),
            SandboxError::Launcher(m) => write!(f, "sandbox launcher failed: {m}"),
        }
    }
}

impl std::error::Error for SandboxError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SandboxError::Io { source, .. } => Some(source),
            _ => None,
        }
    }
}

impl SandboxSpec {
    /// Checks what would otherwise fail obscurely inside the launcher.
    pub fn validate(&self) -> Result<(), SandboxError> {
        let bad = |m: String| Err(SandboxError::InvalidSpec(m));
        let n = &self.name;
        if n.is_empty()
            || n.len() > NAME_BYTES_MAX
            || n.starts_with('.')
            || !n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        {
            return bad(format!("name {n:?} must be 1-{NAME_BYTES_MAX} characters of [A-Za-z0-9._-], not starting with '.'"));
        }
        for (what, p) in [
            ("runtime_root", &self.runtime_root),
            ("code_dir", &self.code_dir),
        ] {
            if !p.is_absolute() {
                return bad(format!("{what} {} is not an absolute path", p.display()));
            }
        }
        for b in &self.binds {
            let inside = self.runtime_root.join(b.strip_prefix("/").unwrap_or(b));
            if !b.is_absolute()
                || b.components()
                    .any(|c| matches!(c, std::path::Component::ParentDir))
                || b == Path::new("/")
            {
                return bad(format!(
                    "bind {} is not an absolute path below /",
                    b.display()
                ));
            }
            if !inside.is_dir() {
                return bad(format!(
                    "bind {}: the root has no directory {}",
                    b.display(),
                    inside.display()
                ));
            }
        }
        match self.argv.first() {
            None => return bad("argv is empty".into()),
            Some(a) if !a.starts_with('/') => {
                return bad(format!("argv[0] {a:?} is not an absolute path"))
            }
            _ => {}
        }
        for a in &self.argv {
            if a.contains('\0') {
                return bad(format!("argument {a:?} contains a NUL byte"));
            }
        }
        for (k, v) in &self.env {
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return bad(format!("environment variable {k:?} is malformed"));
            }
        }
        if self.host_uid == 0 {
            return bad("host_uid 0 would make the sandbox's root the host's root".into());
        }
        if self.tmp_bytes < TMP_BYTES_MIN {
            return bad(format!(
                "tmp_bytes {} is below {TMP_BYTES_MIN}",
                self.tmp_bytes
            ));
        }
        if self.memory_bytes == 0 || self.pids_max == 0 {
            return bad("memory_bytes and pids_max must be positive".into());
        }
        Ok(())
    }
}

/// A running sandbox. Dropping it destroys it.
pub struct Sandbox {
    /// Host pid of the sandbox's PID 1.
    pub pid: i32,
    /// Host end of the channel; fd 3 inside. With pipes: the read end of the
    /// pipe whose write end is fd 5 inside.
    pub channel: OwnedFd,
    /// With pipes: the write end of the pipe whose read end is fd 3 inside.
    pub channel_out: Option<OwnedFd>,
    /// Host end of the log socket; fd 4 inside (taken by whoever reads it).
    pub logs: Option<OwnedFd>,
    /// Limits the host could not apply (missing cgroup controllers, ...).
    pub warnings: Vec<String>,
    group: Option<Group>,
    /// Refers to PID 1 even after its pid is reused; used to signal and to wait with a bound.
    pidfd: Option<OwnedFd>,
    status: Option<i32>,
    destroyed: bool,
}

/// Marks the calling process as a child subreaper, so sandboxes orphaned by their launcher
/// become its children. Idempotent; [`spawn`] calls it too.
pub fn set_subreaper() {
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> SandboxError {
    move |source| SandboxError::Io { what, source }
}

/// A connected Unix stream socketpair, close-on-exec.
fn socketpair(what: &'static str) -> Result<(OwnedFd, OwnedFd), SandboxError> {
    let mut pair = [0; 2];
    // SAFETY: `pair` has room for the two descriptors.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            pair.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(SandboxError::Io {
            what,
            source: io::Error::last_os_error(),
        });
    }
    // SAFETY: socketpair succeeded; both descriptors are ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) })
}

/// Bytes a channel pipe holds (the kernel's default is 64 KiB; a Unix
/// socket's send buffer is ~208 KiB): fewer wake-ups for a large body or
/// answer. Best effort: a host whose `fs.pipe-max-size` is lower keeps the
/// default.
const PIPE_BYTES: libc::c_int = 256 * 1024;

/// Two pipes, close-on-exec, as `(host reads, guest writes)` and
/// `(guest reads, host writes)`.
#[allow(clippy::type_complexity)]
fn pipe_pair() -> Result<((OwnedFd, OwnedFd), (OwnedFd, OwnedFd)), SandboxError> {
    let one = || {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return Err(SandboxError::Io {
                what: "pipe for the channel",
                source: io::Error::last_os_error(),
            });
        }
        // SAFETY: pipe2 succeeded; both descriptors are ours. The size is a hint.
        unsafe {
            libc::fcntl(fds[0], libc::F_SETPIPE_SZ, PIPE_BYTES);
            Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
        }
    };
    Ok((one()?, one()?))
}

/// Starts `spec.argv` in a new sandbox. `hearth_exe` is the hearth binary (it runs as the
/// launcher). Blocks until the command has been exec'd (or setup failed).
pub fn spawn(hearth_exe: &Path, spec: &SandboxSpec) -> Result<Sandbox, SandboxError> {
    spec.validate()?;
    set_subreaper();
    let json = serde_json::to_vec(spec).expect("spec serialises");

    let (host_end, guest_end, host_out, guest_out) = if spec.pipes {
        let ((host_reads, guest_writes), (guest_reads, host_writes)) = pipe_pair()?;
        (
            host_reads,
            guest_reads,
            Some(host_writes),
            Some(guest_writes),
        )
    } else {
        let (host_end, guest_end) = socketpair("socketpair for the channel")?;
        (host_end, guest_end, None, None)
    };
    let (host_logs, guest_logs) = socketpair("socketpair for the log socket")?;
    // Become fds 3, 4 and (pipes) 5 in the launcher, and so in the sandbox.
    let mut guest_fds = vec![guest_end.as_raw_fd(), guest_logs.as_raw_fd()];
    guest_fds.extend(guest_out.as_ref().map(|o| o.as_raw_fd()));

    let mut cmd = Command::new(hearth_exe);
    cmd.arg("__sandbox")
        .env_clear()
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(v) = std::env::var_os(launch::STDERR_ENV) {
        cmd.env(launch::STDERR_ENV, v);
    }
    // SAFETY: the closure only calls async-signal-safe functions (dup2, fcntl).
    unsafe {
        cmd.pre_exec(move || {
            // Park them all above 5 first, so no dup2 closes another's source.
            let mut high = [0; 3];
            let high = &mut high[..guest_fds.len()];
            for (h, &fd) in high.iter_mut().zip(&guest_fds) {
                *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                if *h < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            for (i, &h) in high.iter().enumerate() {
                if libc::dup2(h, 3 + i as i32) < 0 {
                    return Err(io::Error::last_os_error());
                }
                libc::close(h);
            }
            Ok(())
        });
    }
    let mut launcher = cmd
        .spawn()
        .map_err(io_err("starting the sandbox launcher (hearth __sandbox)"))?;
    drop(guest_end);
    drop(guest_out);
    drop(guest_logs);
    {
        let mut stdin = launcher.stdin.take().expect("stdin is piped");
        // A launcher that dies early shows up below as a missing report; its error is there.
        let _ = stdin.write_all(&json);
    }
    let stdout = launcher.stdout.take().expect("stdout is piped");

    let mut warnings = Vec::new();
    let mut group = None;
    let mut pid = None;
    let mut pidfd = None;
    let outcome = read_report(&stdout, |line| match line {
        Line::Warning(w) => warnings.push(w),
        Line::Cgroup(g) => group = Some(g),
        Line::Pid(p) => {
            // The launcher has not exited yet, so `p` is still its child: this cannot be
            // another process that reused the pid.
            pidfd = crate::util::sys::pidfd_open(p);
            pid = Some(p);
        }
        Line::Ok | Line::Error(_) => {}
    });
    drop(stdout);

    let failed = match outcome {
        Ok(Line::Ok) => None,
        Ok(Line::Error(e)) => Some(SandboxError::Setup(e)),
        Ok(other) => Some(SandboxError::Launcher(format!(
            "unexpected final line {other:?}"
        ))),
        Err(e) => Some(SandboxError::Launcher(e)),
    };
    if failed.is_some() {
        let _ = launcher.kill();
    }
    let exit = launcher
        .wait()
        .map_err(io_err("waiting for the sandbox launcher"))?;
    let failed = failed.or_else(|| {
        (!exit.success()).then(|| {
            SandboxError::Launcher(format!(
                "launcher exited with {exit} after reporting success"
            ))
        })
    });

    let pid = match (failed, pid) {
        (None, Some(pid)) => pid,
        (failed, pid) => {
            let e = failed.unwrap_or_else(|| {
                SandboxError::Launcher("launcher reported success without a pid".into())
            });
            // Leave nothing behind: the child (if any) and the cgroups. After a setup error
            // the launcher has reaped the child itself; otherwise the child (if there is
            // one) is ours now, unreaped, and must be killed.
            let reaped = pid.is_none() || matches!(e, SandboxError::Setup(_));
            let mut orphan = Sandbox {
                pid: pid.unwrap_or(0),
                channel: host_end,
                channel_out: host_out,
                logs: Some(host_logs),
                warnings,
                group,
                pidfd,
                status: reaped.then_some(-1),
                destroyed: false,
            };
            orphan.teardown();
            return Err(e);
        }
    };
    Ok(Sandbox {
        pid,
        channel: host_end,
        channel_out: host_out,
        logs: Some(host_logs),
        warnings,
        group,
        pidfd,
        status: None,
        destroyed: false,
    })
}

/// Reads launcher report lines until `ok` or `error`, within [`SPAWN_TIMEOUT_MS`].
fn read_report(stdout: &impl AsRawFd, mut each: impl FnMut(Line)) -> Result<Line, String> {
    let fd = stdout.as_raw_fd();
    let deadline = Instant::now() + Duration::from_millis(SPAWN_TIMEOUT_MS);
    let mut buf: Vec<u8> = Vec::new();
    loop {
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line[..line.len() - 1]).into_owned();
            match Line::parse(&text)? {
                l @ (Line::Ok | Line::Error(_)) => return Ok(l),
                l => each(l),
            }
        }
        let left = deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as i32;
        if left == 0 {
            return Err(format!("no report within {SPAWN_TIMEOUT_MS} ms"));
        }
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("waiting for the launcher: {e}"));
        }
        if n == 0 {
            continue;
        }
        let mut chunk = [0u8; 4096];
        // SAFETY: reads into a valid buffer of the stated length.
        let r = unsafe { libc::read(fd, chunk.as_mut_ptr().cast(), chunk.len()) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(format!("reading the launcher's report: {e}"));
        }
        if r == 0 {
            return Err("launcher exited without reporting (see hearth's stderr)".into());
        }
        if buf.len() > 1 << 20 {
            return Err("launcher report too long".into());
        }
        buf.extend_from_slice(&chunk[..r as usize]);
    }
}

impl Sandbox {
    /// Sends SIGKILL to PID 1; the kernel then kills every process of the pid namespace.
    pub fn kill(&self) {
        if self.status.is_some() {
            return;
        }
        match &self.pidfd {
            Some(fd) => crate::util::sys::pidfd_kill(fd),
            // SAFETY: PID 1 is our unreaped child (we are its subreaper), so the pid is still its.
            None => unsafe {
                libc::kill(self.pid, libc::SIGKILL);
            },
        }
    }

    /// Reaps PID 1 if it has exited: `Some(raw wait status)` from then on, `None` while it
    /// runs. -1 means it was reaped by someone else (hearth is not its subreaper).
    pub fn try_wait(&mut self) -> Option<i32> {
        if self.status.is_none() {
            let mut status = 0;
            // SAFETY: waits for a specific pid without blocking.
            let r = unsafe { libc::waitpid(self.pid, &mut status, libc::WNOHANG | libc::__WALL) };
            if r == self.pid {
                self.status = Some(status);
            } else if r < 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ECHILD) {
                self.status = Some(-1);
            }
        }
        self.status
    }

    /// Kills the sandbox, reaps PID 1 (waiting at most [`DESTROY_WAIT_MS`]) and removes its
    /// cgroups. Returns false if PID 1 could not be reaped in time (its processes may live on,
    /// so its host uid must not be reused).
    pub fn destroy(mut self) -> bool {
        self.teardown()
    }

    /// Waits up to `limit` for PID 1 to exit (and reaps it); true once it has.
    pub fn wait_exit(&mut self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.try_wait().is_none() {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .as_millis() as i32;
            if left == 0 {
                return false;
            }
            match &self.pidfd {
                Some(fd) => {
                    // A pidfd turns readable when the process exits.
                    let mut pfd = libc::pollfd {
                        fd: fd.as_raw_fd(),
                        events: libc::POLLIN,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut pfd, 1, left.min(100)) };
                }
                None => std::thread::sleep(Duration::from_millis(2)),
            }
        }
        true
    }

    /// Memory charged to the sandbox's cgroup now; `None` without a memory cgroup.
    pub fn memory_bytes(&self) -> Option<u64> {
        self.group.as_ref()?.memory_bytes()
    }

    /// Its cgroups, if it has any.
    pub fn group(&self) -> Option<&Group> {
        self.group.as_ref()
    }

    /// Whether the kernel OOM killer fired inside the sandbox's memory cgroup.
    pub fn oom_killed(&self) -> bool {
        self.group.as_ref().is_some_and(Group::oom_killed)
    }

    /// The sandbox's cgroup directories (empty without cgroups).
    pub fn cgroup_dirs(&self) -> Vec<PathBuf> {
        self.group.as_ref().map(Group::dirs).unwrap_or_default()
    }

    /// True once PID 1 is reaped (so every process of its pid namespace is gone).
    fn teardown(&mut self) -> bool {
        if self.destroyed {
            return self.status.is_some();
        }
        self.destroyed = true;
        self.kill();
        if !self.wait_exit(Duration::from_millis(DESTROY_WAIT_MS)) {
            eprintln!(
                "hearth: sandbox pid {} did not exit within {DESTROY_WAIT_MS} ms of SIGKILL",
                self.pid
            );
            return false;
        }
        if let Some(g) = &self.group {
            if let Err(e) = g.remove() {
                eprintln!("hearth: removing cgroups of sandbox pid {}: {e}", self.pid);
            }
        }
        true
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.teardown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> SandboxSpec {
        SandboxSpec {
            runtime_root: "/r".into(),
            code_dir: "/c".into(),
            tmp_bytes: 1 << 20,
            memory_bytes: 64 << 20,
            pids_max: 16,
            cpu_millicores: 0,
            cpu_core: None,
            cpu_background: false,
            host_uid: 100_000,
            name: "fn-1.a_b".into(),
            argv: vec!["/usr/bin/node".into()],
            env: vec![("A".into(), "b=c".into())],
            binds: vec![],
            pipes: false,
            parent_cpu_weight: 0,
        }
    }

    #[test]
    fn a_sensible_spec_is_valid() {
        spec().validate().unwrap();
    }

    #[test]
    fn unsafe_or_unusable_specs_are_rejected() {
        type Mutation = Box<dyn Fn(&mut SandboxSpec)>;
        let cases: Vec<(&str, Mutation)> = vec![
            ("name", Box::new(|s| s.name = "../x".into())),
            ("name", Box::new(|s| s.name = "a".repeat(65))),
            ("name", Box::new(|s| s.name = String::new())),
            ("argv", Box::new(|s| s.argv.clear())),
            ("argv[0]", Box::new(|s| s.argv[0] = "node".into())),
            ("NUL", Box::new(|s| s.argv.push("a\0b".into()))),
            (
                "environment",
                Box::new(|s| s.env.push(("A=B".into(), "c".into()))),
            ),
            ("host_uid", Box::new(|s| s.host_uid = 0)),
            ("tmp_bytes", Box::new(|s| s.tmp_bytes = 0)),
            ("absolute", Box::new(|s| s.code_dir = "code".into())),
            ("bind", Box::new(|s| s.binds.push("usr".into()))),
            ("bind", Box::new(|s| s.binds.push("/".into()))),
            ("bind", Box::new(|s| s.binds.push("/usr/../etc".into()))),
            (
                "root has no directory",
                Box::new(|s| s.binds.push("/usr".into())),
            ),
        ];
        for (needle, mutate) in cases {
            let mut s = spec();
            mutate(&mut s);
            let err = s.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} should mention {needle}");
        }
    }

    #[test]
    fn spec_json_rejects_unknown_fields() {
        let mut v = serde_json::to_value(spec()).unwrap();
        v["extra"] = serde_json::json!(1);
        assert!(serde_json::from_value::<SandboxSpec>(v).is_err());
    }
}
