//! One Firecracker process: its private directory (API socket, vsock
//! socket, log), spawning it (directly, or under the jailer: see [`super::jail`]),
//! reaching its API, noticing and logging its death, and stopping it.
//! Dropping a [`Vmm`] kills and reaps the process and removes the directory
//! (and, jailed, its cgroup and uid lease).

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::api::{Api, ApiError};
use super::jail::{self, Jail, JailerArgs};
use super::uffd::UFFD_SOCK;
use crate::sandbox::process::uids::{UidLease, UidsExhausted};
use crate::sandbox::vmcgroup::VmmCgroup;
use crate::sandbox::vmfiles::socket_path_fits;
use crate::sandbox::vmlog::{self, VmLog};

/// Bytes of the VMM's log (its own lines and the guest console) quoted in errors.
const LOG_TAIL_BYTES: u64 = 2048;
/// The API socket, the vsock socket and the log inside a VMM's directory.
pub const API_SOCK: &str = "api.sock";
pub const VSOCK_SOCK: &str = "v.sock";
pub const LOG_FILE: &str = "firecracker.log";

/// Why a VMM did not do what was asked of it.
#[derive(Debug)]
pub enum VmmError {
    /// A host operation around the VMM failed; `what` names it.
    Io { what: String, err: io::Error },
    /// A socket path would not fit `sun_path`.
    PathTooLong(PathBuf),
    /// Firecracker could not be started.
    Start { bin: PathBuf, err: io::Error },
    /// Firecracker exited; the end of its log.
    Exited {
        status: ExitStatus,
        log_tail: String,
    },
    /// An API request failed.
    Api(ApiError),
    /// The agent's vsock port could not be reached.
    Vsock(io::Error),
    /// Every jail uid is held by a live VMM.
    Uids(UidsExhausted),
}

impl fmt::Display for VmmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmmError::Io { what, err } => write!(f, "{what}: {err}"),
            VmmError::PathTooLong(p) => write!(
                f,
                "socket path {} is longer than a Unix socket address allows (107 bytes); use a shorter --state-dir",
                p.display()
            ),
            VmmError::Start { bin, err } => write!(f, "cannot start {}: {err}", bin.display()),
            VmmError::Exited { status, log_tail } => {
                write!(f, "firecracker exited ({status}){log_tail}")
            }
            VmmError::Api(e) => write!(f, "{e}"),
            VmmError::Vsock(e) => write!(f, "agent vsock: {e}"),
            VmmError::Uids(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for VmmError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            VmmError::Io { err, .. } | VmmError::Start { err, .. } | VmmError::Vsock(err) => {
                Some(err)
            }
            VmmError::Api(e) => Some(e),
            VmmError::Uids(e) => Some(e),
            _ => None,
        }
    }
}

/// The Firecracker process.
enum Proc {
    /// Started by hearth: its child.
    Child(Child),
    /// Started by the jailer in a new PID namespace; the jailer has exited and
    /// hearth, a child subreaper, inherited it: `waitpid` reaps it.
    Jailed {
        pid: i32,
        status: Option<ExitStatus>,
    },
}

/// A jailed VMM's resources beyond its directory.
struct Jailed {
    /// The chroot (`<dir>/root`).
    root: PathBuf,
    /// Its cgroup, removed after the process.
    cgroup: Option<PathBuf>,
    /// Returned after the process is reaped.
    uid: UidLease,
}

/// A running Firecracker and its private directory.
pub struct Vmm {
    proc: Proc,
    /// Private directory: removed with the VMM (jailed: the whole jail).
    dir: PathBuf,
    api_sock: PathBuf,
    /// Its stdout/stderr, which carry the guest's serial console: capped.
    log: VmLog,
    jailed: Option<Jailed>,
    /// Unjailed: its CPU cgroup, joined before exec, removed after the process.
    cgroup: Option<VmmCgroup>,
    /// Shown in logs: the function and the instance's role.
    label: String,
    /// hearth killed it (its exit is no news), or its exit was logged.
    accounted: bool,
}

/// What a jailed VMM needs besides its id and label.
pub struct JailedSpawn<'a> {
    pub jail: &'a Jail,
    pub firecracker: &'a Path,
    /// Files hard-linked into its root (see [`Vmm::resource`]).
    pub files: &'a [&'a Path],
    pub guest_memory_mb: u32,
}

fn io_at(what: String) -> impl FnOnce(io::Error) -> VmmError {
    move |err| VmmError::Io { what, err }
}

/// The VMM's capped log ([`vmlog`]) and its pipe for stdout and stderr.
fn open_log(path: &Path) -> Result<(VmLog, Stdio, Stdio), VmmError> {
    let what = || format!("create {}", path.display());
    let (log, pipe) = vmlog::open(path).map_err(io_at(what()))?;
    let pipe2 = pipe.try_clone().map_err(io_at(what()))?;
    Ok((log, Stdio::from(pipe), Stdio::from(pipe2)))
}

/// Moves the child out of the terminal's process group and arranges for it to
/// die with the hearth thread that started it (jailed: the jailer only; its
/// clone is handled by [`jail::sweep`]), pinned to `core`, inside `cgroup`.
fn detach_and_pin(cmd: &mut Command, core: Option<usize>, cgroup: Option<&VmmCgroup>) {
    // Out of the terminal's process group: Ctrl-C is hearth's to handle.
    cmd.process_group(0);
    let cgroup_fds = cgroup.map(VmmCgroup::procs_fds).unwrap_or_default();
    // SAFETY: the closure runs between fork and exec and only makes
    // async-signal-safe system calls on plain data.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            if let Some(core) = core {
                let _ = crate::util::cpu::pin_thread(0, core);
            }
            VmmCgroup::pre_exec(&cgroup_fds)
        });
    }
}

impl Vmm {
    /// Starts `firecracker --api-sock <dir>/api.sock` with `cwd` as its
    /// working directory (relative drive paths resolve there), in `cgroup`.
    /// A stale `dir` of an earlier VMM is removed first, sockets included.
    pub fn spawn(
        bin: &Path,
        dir: &Path,
        cwd: &Path,
        id: &str,
        label: String,
        core: Option<usize>,
        cgroup: Option<VmmCgroup>,
    ) -> Result<Vmm, VmmError> {
        for name in [API_SOCK, VSOCK_SOCK] {
            let p = dir.join(name);
            if !socket_path_fits(&p) {
                return Err(VmmError::PathTooLong(p));
            }
        }
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).map_err(io_at(format!("create {}", dir.display())))?;
        let (log, out, err) = open_log(&dir.join(LOG_FILE))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--api-sock")
            .arg(dir.join(API_SOCK))
            .args(["--id", id, "--level", "Warning"])
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        detach_and_pin(&mut cmd, core, cgroup.as_ref());
        let child = cmd.spawn().map_err(|err| {
            let _ = fs::remove_dir_all(dir);
            VmmError::Start {
                bin: bin.to_path_buf(),
                err,
            }
        })?;
        Ok(Vmm {
            proc: Proc::Child(child),
            dir: dir.to_path_buf(),
            api_sock: dir.join(API_SOCK),
            log,
            jailed: None,
            cgroup,
            label,
            accounted: false,
        })
    }

    /// Starts Firecracker under the jailer as jail `id`: a fresh jail whose
    /// root holds hard links to `files`, a uid of its own, its cgroup; waits
    /// for the jailer to hand over (it exits after cloning Firecracker into
    /// a new PID namespace) and takes the VMM's pid from the jail's pid file.
    pub fn spawn_jailed(
        s: &JailedSpawn<'_>,
        id: &str,
        label: String,
        core: Option<usize>,
    ) -> Result<Vmm, VmmError> {
        let dir = s.jail.dir(id);
        let root = dir.join("root");
        for p in [jail::API_SOCK, jail::VSOCK_SOCK, jail::UFFD_SOCK] {
            let p = root.join(p.trim_start_matches('/'));
            if !socket_path_fits(&p) {
                return Err(VmmError::PathTooLong(p));
            }
        }
        let _ = fs::remove_dir_all(&dir);
        let cgroup = s.jail.cgroups.as_ref().map(|c| c.dir(id));
        if let Some(cg) = &cgroup {
            jail::remove_cgroup(cg, Duration::ZERO);
        }
        let uid = s.jail.lease_uid().map_err(VmmError::Uids)?;
        fs::create_dir_all(&root).map_err(io_at(format!("create {}", root.display())))?;
        let (log, out, err) = match open_log(&dir.join(jail::LOG_FILE)) {
            Ok(l) => l,
            Err(e) => {
                let _ = fs::remove_dir_all(&dir);
                return Err(e);
            }
        };
        // From here on, dropping the Vmm removes the jail (and the cgroup).
        let mut vmm = Vmm {
            proc: Proc::Jailed {
                pid: 0,
                status: None,
            },
            dir: dir.clone(),
            api_sock: root.join(jail::API_SOCK.trim_start_matches('/')),
            log,
            jailed: Some(Jailed {
                root: root.clone(),
                cgroup,
                uid,
            }),
            cgroup: None,
            label,
            accounted: true,
        };
        for f in s.files {
            jail::link_in(&root, f).map_err(io_at(format!(
                "link {} into {}",
                f.display(),
                root.display()
            )))?;
        }
        let uid = vmm.jailed.as_ref().map(|j| j.uid.uid()).unwrap_or(0);
        let args = jail::jailer_args(&JailerArgs {
            id,
            exec_file: s.firecracker,
            uid,
            gid: jail::GID,
            base: &s.jail.base,
            cgroups: s.jail.cgroups.as_ref(),
            guest_memory_mb: s.guest_memory_mb,
        });
        let mut cmd = Command::new(&s.jail.jailer);
        cmd.args(&args)
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        detach_and_pin(&mut cmd, core, None);
        let mut jailer = cmd.spawn().map_err(|err| VmmError::Start {
            bin: s.jail.jailer.clone(),
            err,
        })?;
        let deadline = Instant::now() + jail::JAILER_TIMEOUT;
        let status = loop {
            match jailer.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => {
                    let _ = jailer.kill();
                    let _ = jailer.wait();
                    return Err(VmmError::Io {
                        what: format!("jailer {id}"),
                        err: io::ErrorKind::TimedOut.into(),
                    });
                }
            }
        };
        if !status.success() {
            return Err(VmmError::Exited {
                status,
                log_tail: vmm.log_tail(),
            });
        }
        let pid_file = root.join("firecracker.pid");
        let pid = jail::read_pid_file(&pid_file).ok_or_else(|| VmmError::Io {
            what: format!("read {}", pid_file.display()),
            err: io::ErrorKind::InvalidData.into(),
        })?;
        vmm.proc = Proc::Jailed { pid, status: None };
        // Ours to reap (subreaper) — or not ours at all, then no VMM to speak to.
        vmm.accounted = false;
        vmm.check_alive()?;
        Ok(vmm)
    }

    /// The path Firecracker is to be given for host file `host`: itself, or
    /// jailed its name inside the root (where [`Vmm::spawn_jailed`] linked it).
    pub fn resource(&self, host: &Path) -> PathBuf {
        match &self.jailed {
            None => host.to_path_buf(),
            Some(_) => PathBuf::from(host.file_name().unwrap_or(host.as_os_str())),
        }
    }

    /// The vsock socket: the path Firecracker binds, and where hearth reaches it.
    pub fn vsock_paths(&self) -> (PathBuf, PathBuf) {
        match &self.jailed {
            None => (self.dir.join(VSOCK_SOCK), self.dir.join(VSOCK_SOCK)),
            Some(j) => (
                PathBuf::from(jail::VSOCK_SOCK),
                j.root.join(jail::VSOCK_SOCK.trim_start_matches('/')),
            ),
        }
    }

    /// The userfaultfd socket (Uffd restores): the path Firecracker is given,
    /// and where hearth binds it, inside the root when jailed.
    pub fn uffd_paths(&self) -> (PathBuf, PathBuf) {
        match &self.jailed {
            None => (self.dir.join(UFFD_SOCK), self.dir.join(UFFD_SOCK)),
            Some(j) => (
                PathBuf::from(jail::UFFD_SOCK),
                j.root.join(jail::UFFD_SOCK.trim_start_matches('/')),
            ),
        }
    }

    /// Binds the userfaultfd socket hearth waits on ([`Vmm::uffd_paths`]);
    /// jailed, it is handed to the VMM's uid (mode 0600), the only one that
    /// may connect. It goes with the VMM's directory (jailed: the whole jail).
    pub fn bind_uffd_socket(&self) -> io::Result<UnixListener> {
        let (_, host) = self.uffd_paths();
        if let Some(dir) = host.parent() {
            fs::create_dir_all(dir)?;
        }
        let _ = fs::remove_file(&host);
        let listener = UnixListener::bind(&host)?;
        if let Some(j) = &self.jailed {
            std::os::unix::fs::chown(&host, Some(j.uid.uid()), Some(jail::GID))?;
            fs::set_permissions(&host, fs::Permissions::from_mode(0o600))?;
        }
        Ok(listener)
    }

    /// Where Firecracker is to write output file `tmp` (a temporary name in
    /// the function directory): there, or jailed its name inside the root.
    pub fn output(&self, tmp: &Path) -> PathBuf {
        self.resource(tmp)
    }

    /// Brings output file `tmp` (see [`Vmm::output`]) to `tmp`: jailed, it is
    /// taken out of the root ([`jail::take_out`]).
    pub fn collect_output(&self, tmp: &Path) -> Result<(), VmmError> {
        let Some(j) = &self.jailed else {
            return Ok(());
        };
        let inside = j.root.join(self.resource(tmp));
        jail::take_out(&inside, tmp).map_err(io_at(format!("take {} out", inside.display())))
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        match &self.proc {
            Proc::Child(c) => c.id() as i32,
            Proc::Jailed { pid, .. } => *pid,
        }
    }

    /// The exit status, once the process has ended (it is then reaped).
    fn try_status(&mut self) -> Option<ExitStatus> {
        match &mut self.proc {
            Proc::Child(c) => c.try_wait().ok().flatten(),
            Proc::Jailed { pid, status } => {
                if status.is_none() && *pid > 0 {
                    let mut raw = 0;
                    // SAFETY: waitpid on one pid, with a valid status pointer.
                    let r = unsafe { libc::waitpid(*pid, &mut raw, libc::WNOHANG | libc::__WALL) };
                    if r == *pid {
                        *status = Some(ExitStatus::from_raw(raw));
                    } else if r < 0 {
                        // Not a child of ours (hearth is not its subreaper): treated
                        // as gone, exit status 255, so that it is never signalled.
                        *status = Some(ExitStatus::from_raw(255 << 8));
                    }
                }
                *status
            }
        }
    }

    /// `Err(Exited)` once the process has ended.
    pub fn check_alive(&mut self) -> Result<(), VmmError> {
        match self.try_status() {
            Some(status) => Err(VmmError::Exited {
                status,
                log_tail: self.log_tail(),
            }),
            None => Ok(()),
        }
    }

    /// Connects to the API socket, waiting for Firecracker to make it.
    pub fn api(&mut self, deadline: Instant) -> Result<Api, VmmError> {
        let sock = self.api_sock.clone();
        loop {
            match Api::connect(&sock) {
                Ok(a) => return Ok(a),
                Err(err) => {
                    self.check_alive()?;
                    if Instant::now() >= deadline {
                        return Err(VmmError::Io {
                            what: format!("connect {}", sock.display()),
                            err,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }

    /// The end of the VMM's log (its messages and the guest console), for errors.
    pub fn log_tail(&self) -> String {
        let t = self.log.tail(LOG_TAIL_BYTES);
        if t.trim().is_empty() {
            String::new()
        } else {
            format!("\n--- firecracker:\n{}", t.trim_end())
        }
    }

    /// SIGKILL, unless the process already ended by itself: then its exit
    /// status and the end of its log are logged, once.
    pub fn kill(&mut self) {
        if self.accounted {
            return;
        }
        self.accounted = true;
        match self.try_status() {
            Some(status) => eprintln!(
                "hearth: firecracker: VMM of {} (pid {}) died: {status}{}",
                self.label,
                self.pid(),
                self.log_tail()
            ),
            None => match &mut self.proc {
                Proc::Child(c) => {
                    let _ = c.kill();
                }
                Proc::Jailed { pid, .. } => {
                    // SAFETY: kill(2) on a child not yet reaped (its pid cannot be reused).
                    unsafe { libc::kill(*pid, libc::SIGKILL) };
                }
            },
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.kill();
        match &mut self.proc {
            Proc::Child(c) => {
                let _ = c.wait();
            }
            Proc::Jailed { pid, status } => {
                if status.is_none() && *pid > 0 {
                    // SAFETY: waitpid on one pid; a null status pointer is allowed.
                    unsafe { libc::waitpid(*pid, std::ptr::null_mut(), libc::__WALL) };
                }
            }
        }
        let pid = self.pid();
        let id = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        // Empty now: the process is reaped.
        drop(self.cgroup.take());
        let Some(j) = self.jailed.take() else {
            let _ = fs::remove_dir_all(&self.dir);
            return;
        };
        // Whatever else runs in the jail: the VMM when the jailer failed after
        // cloning it (its pid unknown), anything the VMM started. Without a
        // cgroup, or without the VMM's pid, found by its uid and jail id too.
        let id = id.unwrap_or_default();
        let members = jail::Members {
            cgroup: j.cgroup.as_deref(),
            uid: (j.cgroup.is_none() || pid <= 0).then(|| (j.uid.uid(), id.as_str())),
        };
        let gone = jail::kill_members(members, jail::KILL_WAIT);
        let _ = fs::remove_dir_all(&self.dir);
        if let Some(cg) = &j.cgroup {
            jail::remove_cgroup(cg, Duration::from_millis(500));
        }
        if !gone {
            eprintln!(
                "hearth: firecracker: a process of the VMM of {} outlived SIGKILL; uid {} is not leased again",
                self.label,
                j.uid.uid()
            );
            std::mem::forget(j.uid);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A jailer that clones its "VMM" and then fails (times out or exits
    /// non-zero) leaves nothing running: the stand-ins it starts — one in
    /// the VMM's cgroup as root, one outside it as the VMM's uid, one outside
    /// it as root with the jail id (a clone before it drops to the uid) — are
    /// killed and reaped, and the cgroup removed. Before, only the jailer was.
    #[test]
    fn a_jailer_failing_after_the_clone_leaves_no_process_behind() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (cgroups, setpriv)");
            return;
        }
        let mounts = fs::read_to_string("/proc/mounts").unwrap();
        let Some(mount) = jail::cgroup2_mount(&mounts) else {
            eprintln!("skipped: no cgroup v2 hierarchy");
            return;
        };
        crate::sandbox::process::set_subreaper();
        let state = std::env::temp_dir().join(format!("hearth-fcfail-{}", std::process::id()));
        let _ = fs::remove_dir_all(&state);
        fs::create_dir_all(&state).unwrap();
        let out = state.join("out");
        fs::create_dir_all(&out).unwrap();
        let script = state.join("jailer.sh");
        crate::util::program::write_executable(
            &script,
            &format!(
                r#"#!/bin/sh
while [ $# -gt 0 ]; do
  case "$1" in --id) id=$2; shift;; --uid) uid=$2; shift;; --parent-cgroup) parent=$2; shift;; esac
  shift
done
cg="{m}/$parent/$id"
mkdir -p "$cg" && echo $$ > "$cg/cgroup.procs"
sleep 600 & echo $! > "{o}/in-cgroup"
echo $$ > "{m}/$parent/cgroup.procs"
setpriv --reuid=$uid --regid={gid} --clear-groups sleep 600 & echo $! > "{o}/as-uid"
while [ "$(stat -c %u /proc/$!)" != "$uid" ]; do :; done
/usr/bin/python3 -c 'import time; time.sleep(600)' --id "$id" & echo $! > "{o}/clone-as-root"
exit 1
"#,
                m = mount.display(),
                o = out.display(),
                gid = jail::GID,
            ),
        );
        let jail = Jail::new(script, &state, 28, &[]).unwrap();
        let spawn = JailedSpawn {
            jail: &jail,
            firecracker: Path::new("/bin/false"),
            files: &[],
            guest_memory_mb: 256,
        };
        let id = "0123456789abcdef-0";
        let err = Vmm::spawn_jailed(&spawn, id, "test".into(), None)
            .err()
            .expect("the jailer failed");
        assert!(matches!(err, VmmError::Exited { .. }), "{err}");
        for name in ["in-cgroup", "as-uid", "clone-as-root"] {
            let pid = fs::read_to_string(out.join(name)).unwrap();
            let pid = pid.trim();
            assert!(
                !Path::new(&format!("/proc/{pid}")).exists(),
                "the {name} stand-in (pid {pid}) outlived the failed jailer"
            );
        }
        let cg = jail.cgroups.as_ref().unwrap();
        assert!(!cg.dir(id).exists(), "the VMM's cgroup is left");
        let _ = fs::remove_dir(cg.mount.join(&cg.parent));
        drop(jail);
        fs::remove_dir_all(&state).unwrap();
    }

    /// The real jailer and Firecracker on this host (no guest is started, so
    /// KVM need not run one): the VMM serves its API from inside the jail as
    /// a non-root uid in its own PID namespace, sees only its root, and its
    /// jail goes with it; a VMM an earlier server left behind is killed and
    /// its jail removed by the next [`Jail::new`].
    #[test]
    fn a_jailed_vmm_runs_unprivileged_in_its_root_and_leaves_nothing() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: the jailer needs root");
            return;
        }
        let (Ok(fc), Ok(jailer)) = (
            super::super::find_firecracker(),
            super::super::find_jailer(),
        ) else {
            eprintln!("skipped: no firecracker/jailer installed (tools/fetch-firecracker.sh)");
            return;
        };
        crate::sandbox::process::set_subreaper();
        let state = std::env::temp_dir().join(format!("hearth-fcjail-{}", std::process::id()));
        let _ = fs::remove_dir_all(&state);
        fs::create_dir_all(&state).unwrap();
        let image = state.join("code-1.ext4");
        fs::write(&image, b"not really ext4").unwrap();
        let jail = Jail::new(jailer.clone(), &state, 28, &[&image]).unwrap();
        let spawn = JailedSpawn {
            jail: &jail,
            firecracker: &fc,
            files: &[&image],
            guest_memory_mb: 256,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut vmm = Vmm::spawn_jailed(&spawn, "0123456789abcdef-0", "test".into(), None).unwrap();
        let mut api = vmm.api(deadline).unwrap();
        let r = api.call("GET", "/version", None, deadline).unwrap();
        assert!(String::from_utf8_lossy(&r.body).contains("1."), "{r:?}");
        let pid = vmm.pid();
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .unwrap()
                .split_whitespace()
                .map(str::to_string)
                .collect::<Vec<_>>()
        };
        let uid: u32 = field("Uid:")[0].parse().unwrap();
        assert!((jail::UID_BASE..jail::UID_BASE + jail::UID_SPAN).contains(&uid));
        assert_eq!(field("Gid:")[0], jail::GID.to_string());
        assert_eq!(field("NSpid:").last().unwrap(), "1", "{status}");
        let mut seen: Vec<String> = fs::read_dir(format!("/proc/{pid}/root"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        seen.sort();
        assert_eq!(
            seen,
            [
                "code-1.ext4",
                "dev",
                "firecracker",
                "firecracker.pid",
                "run"
            ]
        );
        assert_eq!(vmm.resource(&image), Path::new("code-1.ext4"));
        let (inside, outside) = vmm.vsock_paths();
        assert_eq!(inside, Path::new("/run/v.sock"));
        assert!(outside.starts_with(jail.dir("0123456789abcdef-0").join("root")));
        let dir = jail.dir("0123456789abcdef-0");
        drop(api);
        drop(vmm);
        assert!(!dir.exists(), "the jail outlived its VMM");
        assert!(!Path::new(&format!("/proc/{pid}")).exists());

        // Death is noticed, and a VMM orphaned by a dead server is swept.
        let mut vmm = Vmm::spawn_jailed(&spawn, "0123456789abcdef-1", "test".into(), None).unwrap();
        let pid = vmm.pid();
        // SAFETY: kill(2) on our unreaped child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let t = Instant::now();
        while vmm.check_alive().is_ok() && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(matches!(vmm.check_alive(), Err(VmmError::Exited { .. })));
        drop(vmm);
        let mut vmm = Vmm::spawn_jailed(&spawn, "0123456789abcdef-2", "test".into(), None).unwrap();
        // Serving, as a VMM a dead server left behind is: a jailer still setting
        // its jail up when the sweep removes it exits on its own (status 1)
        // instead of being killed, which under a loaded CI happened here.
        vmm.api(Instant::now() + Duration::from_secs(20)).unwrap();
        let pid = vmm.pid();
        let dir = jail.dir("0123456789abcdef-2");
        std::mem::forget(vmm);
        let again = Jail::new(jailer, &state, 28, &[&image]).unwrap();
        assert!(!dir.exists(), "a leftover jail survived the sweep");
        let mut raw = 0;
        // SAFETY: waitpid on our child (it was killed by the sweep).
        let r = unsafe { libc::waitpid(pid, &mut raw, libc::__WALL) };
        assert_eq!(r, pid);
        assert!(libc::WIFSIGNALED(raw), "{raw:#x}");
        if let Some(cg) = &again.cgroups {
            let _ = fs::remove_dir(cg.mount.join(&cg.parent));
        }
        drop(again);
        fs::remove_dir_all(&state).unwrap();
    }
}
