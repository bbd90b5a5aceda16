//! One QEMU process: finding QEMU and telling whether KVM can run guests,
//! starting it from a [`VmPlan`], reaching its agent channel and QMP socket,
//! quoting its logs in errors, and stopping it.

use std::fmt;
use std::fs;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::args::{qemu_args, VmPlan};
use super::qmp::{Qmp, QmpError};
use crate::sandbox::vmcgroup::VmmCgroup;
use crate::sandbox::vmlog::{self, VmLog};
use crate::util::program::find_program;

/// How long a QEMU asked to `quit` gets before SIGKILL.
pub const QUIT_WAIT: Duration = Duration::from_secs(5);
/// Bytes of console output quoted in error messages.
const LOG_TAIL_BYTES: u64 = 2048;

/// Why a VM did not do what was asked of it.
#[derive(Debug)]
pub enum VmError {
    /// A host operation around the VM failed; `what` names it.
    Io { what: String, err: io::Error },
    /// QEMU could not be started.
    Start { qemu: PathBuf, err: io::Error },
    /// QEMU exited; the end of its output and of the guest console.
    Exited {
        status: ExitStatus,
        log_tail: String,
    },
    /// The agent channel's socket could not be reached in time.
    Channel { path: PathBuf, err: io::Error },
    /// A QMP command failed.
    Qmp(QmpError),
    /// Writing or loading the snapshot failed or stalled; QEMU's reason or the
    /// state the VM was left in.
    Migration(String),
}

impl fmt::Display for VmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmError::Io { what, err } => write!(f, "{what}: {err}"),
            VmError::Start { qemu, err } => write!(f, "cannot start {}: {err}", qemu.display()),
            VmError::Exited { status, log_tail } => write!(f, "QEMU exited ({status}){log_tail}"),
            VmError::Channel { path, err } => {
                write!(f, "channel socket {}: {err}", path.display())
            }
            VmError::Qmp(e) => write!(f, "{e}"),
            VmError::Migration(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for VmError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            VmError::Io { err, .. } | VmError::Start { err, .. } | VmError::Channel { err, .. } => {
                Some(err)
            }
            VmError::Qmp(e) => Some(e),
            VmError::Exited { .. } | VmError::Migration(_) => None,
        }
    }
}

/// Whether this host's KVM can run a standard Linux guest; the error says why not.
pub fn kvm_usable() -> Result<(), String> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let vmx_or_svm = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    if pvm && !vmx_or_svm {
        return Err("KVM here is kvm_pvm (paravirtualised nested KVM) and the CPU shows no vmx/svm: \
                    a standard guest kernel dies with a KVM emulation failure; run on bare metal or \
                    enable nested virtualisation (vmx/svm) for this VM"
            .into());
    }
    if !vmx_or_svm {
        return Err(
            "the CPU has no vmx/svm flag: hardware virtualisation is off or not exposed \
                    to this machine (enable VT-x/AMD-V, or nested virtualisation)"
                .into(),
        );
    }
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| {
            format!("/dev/kvm: {e} (load kvm_intel/kvm_amd, and give this user access: group kvm)")
        })?;
    Ok(())
}

/// `$HEARTH_QEMU` or `qemu-system-x86_64` on PATH.
pub fn find_qemu() -> Result<PathBuf, String> {
    find_program("HEARTH_QEMU", "qemu-system-x86_64").ok_or_else(|| {
        "qemu-system-x86_64 not found: install qemu-system-x86 (Debian) or set HEARTH_QEMU"
            .to_string()
    })
}

/// The first line of `qemu --version`, e.g. "QEMU emulator version 7.2.22 (...)".
pub fn qemu_version(qemu: &Path) -> Result<String, String> {
    let out = Command::new(qemu)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .filter(|l| out.status.success() && !l.is_empty())
        .map(str::to_string)
        .ok_or_else(|| format!("{} --version failed: {}", qemu.display(), out.status))
}

/// A running QEMU and its private directory; dropping it kills the process,
/// reaps it and removes the directory and its cgroup.
pub(super) struct Vm {
    child: Child,
    dir: PathBuf,
    /// Its cgroup (memory, pids, CPU limits), which it joined before exec.
    cgroup: Option<VmmCgroup>,
    /// QEMU's own output (`qemu.log`) and the guest's serial console
    /// (`console.log`), both capped ([`vmlog`]).
    logs: [(VmLog, &'static str); 2],
}

impl Vm {
    /// Starts QEMU for `plan` in `cgroup`, pinned to `core`; `inherit` is a
    /// descriptor it keeps across exec (the snapshot a restore reads or a
    /// template writes).
    pub(super) fn spawn(
        qemu: &Path,
        plan: &VmPlan<'_>,
        core: Option<usize>,
        cgroup: Option<VmmCgroup>,
        inherit: Option<&fs::File>,
    ) -> Result<Vm, VmError> {
        let dir = plan.dir.to_path_buf();
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|err| VmError::Io {
            what: format!("create {}", dir.display()),
            err,
        })?;
        let open_log = |name: &str| {
            let path = dir.join(name);
            vmlog::open(&path).map_err(|err| VmError::Io {
                what: format!("create {}", path.display()),
                err,
            })
        };
        let (qemu_log, out) = open_log("qemu.log")?;
        let (console_log, console) = open_log("console.log")?;
        let err = out.try_clone().map_err(|err| VmError::Io {
            what: "dup the qemu.log pipe".into(),
            err,
        })?;
        // QEMU opens the console pipe by this name (the descriptor is kept across exec).
        let console_fd = console.as_raw_fd();
        let console_path = PathBuf::from(format!("/proc/self/fd/{console_fd}"));
        let inherit_fd = inherit.map(AsRawFd::as_raw_fd);
        let cgroup_fds = cgroup
            .as_ref()
            .map(VmmCgroup::procs_fds)
            .unwrap_or_default();
        let mut cmd = Command::new(qemu);
        cmd.args(qemu_args(plan, &console_path))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Out of the terminal's process group: Ctrl-C is hearth's to handle.
            .process_group(0);
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe system calls on plain data.
        unsafe {
            cmd.pre_exec(move || {
                // The VM dies with the hearth thread that started it (the
                // starter threads live as long as the server).
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                // Opened close-on-exec (no other child inherits them); this one keeps them.
                for fd in inherit_fd.into_iter().chain([console_fd]) {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(core) = core {
                    let _ = crate::util::cpu::pin_thread(0, core);
                }
                VmmCgroup::pre_exec(&cgroup_fds)
            });
        }
        let spawned = cmd.spawn();
        // Only QEMU holds the write ends now: its exit ends the pipes.
        drop(cmd);
        drop(console);
        let child = spawned.map_err(|err| {
            let _ = fs::remove_dir_all(&dir);
            VmError::Start {
                qemu: qemu.to_path_buf(),
                err,
            }
        })?;
        Ok(Vm {
            child,
            dir,
            cgroup,
            logs: [(qemu_log, "qemu"), (console_log, "console")],
        })
    }

    pub(super) fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Connects to the agent channel's socket, waiting for QEMU to make it.
    pub(super) fn connect_channel(&mut self, deadline: Instant) -> Result<UnixStream, VmError> {
        let path = self.dir.join("agent.sock");
        loop {
            match UnixStream::connect(&path) {
                Ok(s) => return Ok(s),
                Err(err) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        return Err(VmError::Exited {
                            status,
                            log_tail: self.log_tail(),
                        });
                    }
                    if Instant::now() >= deadline {
                        return Err(VmError::Channel { path, err });
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }

    pub(super) fn qmp(&mut self, deadline: Instant) -> Result<Qmp, VmError> {
        Qmp::connect(&self.dir.join("qmp.sock"), deadline).map_err(|e| {
            match self.child.try_wait() {
                Ok(Some(status)) => VmError::Exited {
                    status,
                    log_tail: self.log_tail(),
                },
                _ => VmError::Qmp(e),
            }
        })
    }

    /// The end of QEMU's own output and of the guest console, for errors;
    /// first, whether its memory limit killed it (it says nothing itself).
    pub(super) fn log_tail(&self) -> String {
        let mut out = String::new();
        if self.cgroup.as_ref().is_some_and(VmmCgroup::oom_killed) {
            out.push_str("\n--- killed at its cgroup's memory limit");
        }
        for (log, what) in &self.logs {
            let t = log.tail(LOG_TAIL_BYTES);
            if !t.trim().is_empty() {
                out.push_str(&format!("\n--- {what}:\n{}", t.trim_end()));
            }
        }
        out
    }

    /// SIGKILL, unless the child was already reaped (its pid may be reused).
    pub(super) fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// Asks QEMU to exit, SIGKILL after [`QUIT_WAIT`].
    pub(super) fn quit(&mut self, qmp: &mut Qmp) {
        let _ = qmp.execute("quit", None, Instant::now() + QUIT_WAIT);
        let deadline = Instant::now() + QUIT_WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
            let _ = self.child.wait();
        }
        // Empty now: the process is reaped.
        drop(self.cgroup.take());
        let _ = fs::remove_dir_all(&self.dir);
    }
}
