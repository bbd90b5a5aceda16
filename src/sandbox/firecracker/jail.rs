//! `--jailer`: every Firecracker (templates and instances) runs under
//! Firecracker's `jailer`, which gives it a chroot of its own, a new mount
//! and PID namespace, a cgroup with the function's limits, and drops it from
//! root to an unprivileged uid before exec.
//!
//! Layout: the jail base is `<state>/jail`; the jailer makes each VMM's root
//! `<base>/firecracker/<id>/root` (`firecracker` is the exec file's name).
//! hearth fills that root before the jailer runs with **hard links** to the
//! read-only inputs (kernel, initramfs, runtime and code images, snapshot
//! files), so nothing is copied and everything must be on the state dir's
//! filesystem ([`Jail::new`] checks). Inside, Firecracker is given paths
//! relative to its root (a file's name); hearth reaches the API socket and
//! the vsock socket at `<root>/run/…` from outside. The VMM's log is the
//! jailer's stdout/stderr, a pipe hearth drains into the capped
//! `<base>/firecracker/<id>/firecracker.log` ([`crate::sandbox::vmlog`]),
//! outside the root.
//!
//! Identity: each VMM gets a uid of its own leased from [`UID_BASE`]..
//! (+[`UID_SPAN`]), all share the gid [`GID`]. The linked files are owned by
//! root, group [`GID`], mode 0640: a VMM reads them and changes nothing (hard
//! links share the inode with the originals).
//!
//! Cgroups (v2 only, the hierarchy the jailer finds first in /proc/mounts):
//! each VMM gets `<cgroup2>/hearth-fc-<hash of the state dir>/<id>` with the
//! limits of every VMM ([`crate::sandbox::vmcgroup::limits`]): `memory.max`
//! (guest memory + [`vmcgroup::VMM_OVERHEAD_MB`]), the instance CPU contract
//! (`cpu.max` from [`crate::sandbox::INSTANCE_CPU_MILLICORES`]) and
//! `pids.max` ([`vmcgroup::VMM_PIDS_MAX`]), as far as the hierarchy offers
//! those controllers.
//!
//! Cleanup: a jailed VMM is PID 1 of its own PID namespace and a child of
//! hearth only through `PR_SET_CHILD_SUBREAPER` (the jailer exits after the
//! clone), so it does not die with hearth: [`Jail::new`] kills what an
//! earlier server left behind (by cgroup, and by the pid files in the jails)
//! and removes the old jails and cgroups. A VMM's jail and cgroup go when it
//! is dropped ([`super::vmm::Vmm`]).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::sandbox::process::cgroup;
use crate::sandbox::process::uids::{UidLease, UidPool, UidsExhausted};
use crate::sandbox::vmcgroup;
use crate::sandbox::vmfiles::{open_plain, SOCKET_PATH_BYTES_MAX};

/// The jail base directory's name inside the state directory.
pub const JAIL_DIR: &str = "jail";
/// First uid leased to jailed VMMs (after the process backend's 200000..260000).
pub const UID_BASE: u32 = 260_001;
/// How many uids: at most this many VMMs are alive at once.
pub const UID_SPAN: u32 = 8192;
/// The group every jailed VMM runs as; the linked files are readable by it.
pub const GID: u32 = 260_000;
/// The API and vsock sockets as the jailed Firecracker sees them.
pub const API_SOCK: &str = "/run/api.sock";
pub const VSOCK_SOCK: &str = "/run/v.sock";
/// The socket hearth listens on for a jailed Firecracker's userfaultfd
/// (`--fc-memory uffd`): bound by hearth inside the root, owned by the VMM's uid.
pub const UFFD_SOCK: &str = "/run/uf.sock";
/// The VMM's output, next to (not inside) its root.
pub const LOG_FILE: &str = "firecracker.log";
/// Longest jail id (the jailer's limit).
pub const ID_BYTES_MAX: usize = 64;
/// From the jailer's start to its exit after cloning Firecracker (it copies
/// the Firecracker binary into the jail; slow under nested emulation).
pub const JAILER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for leftover VMMs to die at start-up.
const SWEEP_WAIT: Duration = Duration::from_secs(5);
/// How long a VMM's processes get to die when it goes, before its uid is
/// written off (never leased again) for something of it may still run.
pub const KILL_WAIT: Duration = Duration::from_secs(2);
/// Controllers whose limits are set, if the hierarchy has them.
const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// The cgroup v2 parent of the VMMs' cgroups.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cgroups {
    /// Where the v2 hierarchy is mounted.
    pub mount: PathBuf,
    /// `hearth-fc-<hash>`, relative to the mount.
    pub parent: String,
    /// Which of [`CONTROLLERS`] the hierarchy offers.
    pub controllers: Vec<String>,
}

impl Cgroups {
    /// The cgroup of VMM `id`.
    pub fn dir(&self, id: &str) -> PathBuf {
        self.mount.join(&self.parent).join(id)
    }
}

/// What one jailer invocation is given.
#[derive(Debug)]
pub struct JailerArgs<'a> {
    pub id: &'a str,
    pub exec_file: &'a Path,
    pub uid: u32,
    pub gid: u32,
    pub base: &'a Path,
    pub cgroups: Option<&'a Cgroups>,
    pub guest_memory_mb: u32,
}

/// The jailer's command line (without the program): identity, chroot base,
/// new PID namespace, cgroup limits, then Firecracker's own arguments.
pub fn jailer_args(a: &JailerArgs<'_>) -> Vec<OsString> {
    let mut v: Vec<OsString> = Vec::new();
    let mut push = |s: &str| v.push(s.into());
    push("--id");
    push(a.id);
    push("--exec-file");
    v.push(a.exec_file.into());
    let mut push = |s: &str| v.push(s.into());
    push("--uid");
    push(&a.uid.to_string());
    push("--gid");
    push(&a.gid.to_string());
    push("--chroot-base-dir");
    v.push(a.base.into());
    let mut push = |s: &str| v.push(s.into());
    push("--new-pid-ns");
    if let Some(cg) = a.cgroups {
        // Without properties the jailer (v2) still moves itself into the parent.
        push("--cgroup-version");
        push("2");
        push("--parent-cgroup");
        push(&cg.parent);
        for (file, value) in limits(&cg.controllers, a.guest_memory_mb) {
            push("--cgroup");
            push(&format!("{file}={value}"));
        }
    }
    push("--");
    push("--api-sock");
    push(API_SOCK);
    push("--level");
    push("Warning");
    v
}

/// The cgroup files and values for a VMM whose guest has `guest_memory_mb`,
/// limited to the `controllers` present. Its CPU is an instance's, not one
/// core per vCPU ([`cgroup::cpu_settings`]).
pub fn limits(controllers: &[String], guest_memory_mb: u32) -> Vec<(String, String)> {
    let has = |c: &str| controllers.iter().any(|x| x == c);
    let l = vmcgroup::limits(guest_memory_mb, vmcgroup::VMM_OVERHEAD_MB);
    let mut out = Vec::new();
    if has("memory") {
        out.push(("memory.max".into(), l.memory_bytes.to_string()));
    }
    if has("cpu") {
        let cpu = cgroup::cpu_settings(cgroup::Version::V2, &l);
        out.extend(cpu.into_iter().map(|(f, v)| (f.to_string(), v)));
    }
    if has("pids") {
        out.push(("pids.max".into(), l.pids_max.to_string()));
    }
    out
}

/// Where the first cgroup2 hierarchy in `/proc/mounts` text is mounted (the
/// one the jailer uses).
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let (_dev, dir, kind) = (f.next()?, f.next()?, f.next()?);
        (kind == "cgroup2").then(|| PathBuf::from(dir))
    })
}

/// `hearth-fc-<8 hex digits>`: one parent cgroup per state directory, so two
/// servers on one host never sweep each other's VMMs.
pub fn parent_cgroup(state_dir: &Path) -> String {
    let sum = crate::util::crc::crc32(state_dir.as_os_str().as_encoded_bytes());
    format!("hearth-fc-{sum:08x}")
}

/// The longest socket path hearth uses for a jail whose id is at most
/// `id_bytes` long, under `base` (the API socket; the vsock socket is
/// shorter, and hearth makes no guest-initiated vsock connections, whose
/// socket would carry a `_<port>` suffix).
pub fn longest_socket_path(base: &Path, id_bytes: usize) -> usize {
    base.join("firecracker")
        .join("x".repeat(id_bytes))
        .join("root")
        .as_os_str()
        .len()
        + API_SOCK.len().max(VSOCK_SOCK.len()).max(UFFD_SOCK.len())
}

/// The jail set-up shared by all VMMs of one server.
pub struct Jail {
    /// The jailer binary.
    pub jailer: PathBuf,
    /// `<state>/jail`.
    pub base: PathBuf,
    /// `None`: no cgroup v2 hierarchy, VMMs run without cgroup limits.
    pub cgroups: Option<Cgroups>,
    uids: Arc<UidPool>,
}

impl Jail {
    /// Sets up `<state>/jail`: checks that socket paths for ids of up to
    /// `id_bytes` fit `sun_path` and that every file in `shared` can be
    /// hard-linked into it (same filesystem), finds the cgroup hierarchy,
    /// and kills and removes what an earlier server left behind.
    pub fn new(
        jailer: PathBuf,
        state_dir: &Path,
        id_bytes: usize,
        shared: &[&Path],
    ) -> Result<Jail, String> {
        let base = state_dir.join(JAIL_DIR);
        let longest = longest_socket_path(&base, id_bytes);
        if longest > SOCKET_PATH_BYTES_MAX {
            return Err(format!(
                "--jailer: socket paths under {} would be {longest} bytes, more than a Unix socket \
                 address holds ({SOCKET_PATH_BYTES_MAX}); use a shorter --state-dir",
                base.display()
            ));
        }
        let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
        let cgroups = cgroup2_mount(&mounts).map(|mount| {
            let offered = fs::read_to_string(mount.join("cgroup.controllers")).unwrap_or_default();
            let controllers = CONTROLLERS
                .iter()
                .filter(|c| offered.split_whitespace().any(|o| o == **c))
                .map(|c| c.to_string())
                .collect();
            Cgroups {
                mount,
                parent: parent_cgroup(state_dir),
                controllers,
            }
        });
        sweep(&base, cgroups.as_ref());
        fs::create_dir_all(base.join("firecracker"))
            .map_err(|e| format!("create {}: {e}", base.display()))?;
        fs::set_permissions(&base, fs::Permissions::from_mode(0o700))
            .map_err(|e| format!("chmod {}: {e}", base.display()))?;
        let dev = fs::metadata(&base)
            .map_err(|e| format!("{}: {e}", base.display()))?
            .dev();
        for f in shared {
            let m = fs::metadata(f).map_err(|e| format!("{}: {e}", f.display()))?;
            if m.dev() != dev {
                return Err(format!(
                    "--jailer: {} is on another filesystem than {}: the jails hard-link it \
                     (keep the state dir on one filesystem; with HEARTH_VMLINUX, put the kernel there)",
                    f.display(),
                    base.display()
                ));
            }
        }
        if let Some(cg) = &cgroups {
            // The jailer moves itself into the parent when there are no limits to set.
            let _ = fs::create_dir_all(cg.mount.join(&cg.parent));
        }
        Ok(Jail {
            jailer,
            base,
            cgroups,
            uids: UidPool::new(UID_BASE, UID_SPAN, std::process::id() % UID_SPAN),
        })
    }

    /// `<base>/firecracker/<id>`: the jail (its root and the VMM's log).
    pub fn dir(&self, id: &str) -> PathBuf {
        self.base.join("firecracker").join(id)
    }

    /// A uid for one VMM, returned when the lease is dropped.
    pub fn lease_uid(&self) -> Result<UidLease, UidsExhausted> {
        self.uids.lease()
    }

    /// Why jailed VMMs run without a CPU limit, if they do: no cgroup v2
    /// hierarchy, or one without the cpu controller.
    pub fn cpu_unlimited(&self) -> Option<String> {
        match &self.cgroups {
            None => {
                Some("no cgroup v2 hierarchy (the jailer is given cgroup v2 limits only)".into())
            }
            Some(c) if !c.controllers.iter().any(|x| x == "cpu") => Some(format!(
                "the cgroup v2 hierarchy at {} offers no cpu controller",
                c.mount.display()
            )),
            Some(_) => None,
        }
    }

    /// A short description for the start-up log.
    pub fn describe(&self) -> String {
        let cg = match &self.cgroups {
            Some(c) if !c.controllers.is_empty() => format!(
                "cgroup {}/{} ({})",
                c.mount.display(),
                c.parent,
                c.controllers.join(", ")
            ),
            Some(c) => format!(
                "cgroup {}/{} (no memory/cpu/pids controllers: no limits)",
                c.mount.display(),
                c.parent
            ),
            None => "no cgroup v2 hierarchy: no limits".into(),
        };
        format!(
            "jailer {}, jails in {}, uids {UID_BASE}..{} gid {GID}, {cg}",
            self.jailer.display(),
            self.base.display(),
            UID_BASE + UID_SPAN - 1
        )
    }
}

/// Hard-links `src` into `root` under its file name, after making it
/// root-owned, group [`GID`], mode 0640 (the inode is shared: this changes the
/// original too). Returns the name, which is the path Firecracker is given.
pub fn link_in(root: &Path, src: &Path) -> io::Result<PathBuf> {
    let name = PathBuf::from(src.file_name().ok_or_else(|| {
        io::Error::new(io::ErrorKind::InvalidInput, "a path without a file name")
    })?);
    // On the opened file, never through a link: the inode is shared with
    // jails whose VMMs may not be trusted.
    let (f, m) = open_plain(src)?;
    if m.gid() != GID || m.uid() != 0 {
        std::os::unix::fs::fchown(&f, Some(0), Some(GID))?;
    }
    if m.mode() & 0o7777 != 0o640 {
        f.set_permissions(fs::Permissions::from_mode(0o640))?;
    }
    fs::hard_link(src, root.join(&name)).map_err(|e| {
        if e.raw_os_error() == Some(libc::EXDEV) {
            io::Error::new(
                e.kind(),
                format!(
                    "{} and {} are on different filesystems (hard links need one)",
                    src.display(),
                    root.display()
                ),
            )
        } else {
            e
        }
    })?;
    Ok(name)
}

/// Takes a file the jailed VMM wrote out of its root: it must be a plain
/// file with one link (not a link the VMM made to something else); it becomes
/// root's, group [`GID`], mode 0640, and is renamed to `to` (same filesystem).
/// Everything is checked and changed on the opened file, and `to` must be
/// that file after the rename: the VMM may swap the name meanwhile.
pub fn take_out(from: &Path, to: &Path) -> io::Result<()> {
    let not_own = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} {what}", from.display()),
        )
    };
    let (f, m) = open_plain(from)?;
    if m.nlink() != 1 {
        return Err(not_own("is not a plain file of its own"));
    }
    std::os::unix::fs::fchown(&f, Some(0), Some(GID))?;
    f.set_permissions(fs::Permissions::from_mode(0o640))?;
    fs::rename(from, to)?;
    let moved = fs::symlink_metadata(to)?;
    if moved.dev() != m.dev() || moved.ino() != m.ino() || f.metadata()?.nlink() != 1 {
        let _ = fs::remove_file(to);
        return Err(not_own("was replaced or linked while being taken out"));
    }
    Ok(())
}

/// The pid in a jail's `firecracker.pid`, a file the VMM's uid may replace:
/// not followed if a link, not waited on if a FIFO, at most 32 bytes read.
pub fn read_pid_file(path: &Path) -> Option<i32> {
    use std::io::Read;
    let (f, _) = open_plain(path).ok()?;
    let mut text = String::new();
    f.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

/// Removes cgroup `dir` once its processes are gone, waiting up to `wait`.
pub fn remove_cgroup(dir: &Path, wait: Duration) {
    let deadline = Instant::now() + wait;
    loop {
        match fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            _ => return,
        }
    }
}

/// The processes of one VMM: the members of its cgroup and, with `uid`, the
/// processes running as its uid (a VMM's uid is its own) or carrying its
/// jail id (`--id <id>`: the jailer, and its clone before it drops to the uid).
#[derive(Clone, Copy)]
pub struct Members<'a> {
    pub cgroup: Option<&'a Path>,
    pub uid: Option<(u32, &'a str)>,
}

impl Members<'_> {
    /// The live processes, and zombies (to reap if they are hearth's).
    fn find(&self) -> (Vec<i32>, Vec<i32>) {
        let (mut live, mut zombies) = (Vec::new(), Vec::new());
        if let Some(cg) = self.cgroup {
            let procs = fs::read_to_string(cg.join("cgroup.procs")).unwrap_or_default();
            live.extend(procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()));
        }
        if let Some((uid, id)) = self.uid {
            for e in fs::read_dir("/proc").into_iter().flatten().flatten() {
                let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let Some((uids, state)) = proc_uid_state(pid) else {
                    continue;
                };
                if !uids.contains(&uid) && !is_jailed_vmm(pid, id) {
                    continue;
                }
                if state == 'Z' {
                    zombies.push(pid);
                } else if !live.contains(&pid) {
                    live.push(pid);
                }
            }
        }
        live.retain(|&p| p > 1);
        (live, zombies)
    }

    /// Whether `pid` is (still) one of them: checked after pinning it.
    fn has(&self, pid: i32) -> bool {
        let in_cgroup = self.cgroup.is_some_and(|cg| {
            let (Some(id), Some(parent)) = (cg.file_name(), cg.parent().and_then(Path::file_name))
            else {
                return false;
            };
            let suffix = format!("/{}/{}", parent.to_string_lossy(), id.to_string_lossy());
            fs::read_to_string(format!("/proc/{pid}/cgroup")).is_ok_and(|c| {
                c.lines()
                    .any(|l| l.starts_with("0::") && l.ends_with(&suffix))
            })
        });
        in_cgroup
            || self.uid.is_some_and(|(uid, id)| {
                proc_uid_state(pid).is_some_and(|(u, _)| u.contains(&uid)) || is_jailed_vmm(pid, id)
            })
    }
}

/// A process's uids (real, effective, saved, filesystem) and state letter.
fn proc_uid_state(pid: i32) -> Option<(Vec<u32>, char)> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |k: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .map(str::trim)
    };
    let uids = field("Uid:")?
        .split_whitespace()
        .filter_map(|u| u.parse().ok())
        .collect();
    let state = field("State:")?.chars().next()?;
    Some((uids, state))
}

/// A pidfd on `pid`, if it is still one of `members` once pinned (so a pid
/// reused meanwhile is never signalled).
fn pin(pid: i32, members: Members<'_>) -> Option<OwnedFd> {
    let fd = crate::util::sys::pidfd_open(pid)?;
    members.has(pid).then_some(fd)
}

/// Reaps the pinned process if it is hearth's child and has ended; true once
/// it has ended (reaped here, or not hearth's to reap).
fn ended(fd: &OwnedFd) -> bool {
    // SAFETY: zeroed siginfo is a valid out-parameter for waitid.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: waitid on a pidfd we own, with a valid siginfo pointer.
    let r = unsafe {
        libc::waitid(
            libc::P_PIDFD,
            fd.as_raw_fd() as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::__WALL,
        )
    };
    if r == 0 {
        // SAFETY: waitid filled `info` (si_pid 0: still running).
        return unsafe { info.si_pid() } != 0;
    }
    if io::Error::last_os_error().raw_os_error() != Some(libc::ECHILD) {
        return true;
    }
    // Not hearth's child: a pidfd turns readable when its process ends.
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd, no wait.
    unsafe { libc::poll(&mut p, 1, 0) == 1 }
}

/// SIGKILLs every process of a VMM ([`Members`]; a cgroup also through
/// `cgroup.kill`) and reaps those that are hearth's children (it is their
/// subreaper). True once none is left; false if one still is after `wait`.
pub fn kill_members(members: Members<'_>, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    let mut pinned: HashMap<i32, OwnedFd> = HashMap::new();
    loop {
        let (live, zombies) = members.find();
        for pid in live.iter().chain(&zombies) {
            if !pinned.contains_key(pid) {
                if let Some(fd) = pin(*pid, members) {
                    pinned.insert(*pid, fd);
                }
            }
        }
        if let Some(cg) = members.cgroup {
            // Also those forked since the list was read (cgroup v2, Linux 5.14+).
            let _ = fs::write(cg.join("cgroup.kill"), "1");
        }
        for fd in pinned.values() {
            crate::util::sys::pidfd_kill(fd);
        }
        pinned.retain(|_, fd| !ended(fd));
        if live.is_empty() && pinned.is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Whether process `pid` is a jailed Firecracker with jail id `id` (its
/// command line carries `--id <id>`).
fn is_jailed_vmm(pid: i32, id: &str) -> bool {
    let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
        return false;
    };
    let mut args = cmdline.split(|b| *b == 0);
    while let Some(a) = args.next() {
        if a == b"--id" {
            return args.next() == Some(id.as_bytes());
        }
    }
    false
}

/// Kills the VMMs an earlier server left running (found through the pid
/// files in its jails, checked against their command lines, and through the
/// cgroups), then removes the jails and the cgroups.
pub fn sweep(base: &Path, cgroups: Option<&Cgroups>) {
    let mut killed = Vec::new();
    let jails = base.join("firecracker");
    if let Ok(entries) = fs::read_dir(&jails) {
        for e in entries.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = read_pid_file(&e.path().join("root/firecracker.pid")) else {
                continue;
            };
            if pid > 1 && is_jailed_vmm(pid, &id) {
                // SAFETY: kill(2) with plain integers.
                unsafe { libc::kill(pid, libc::SIGKILL) };
                killed.push(pid);
            }
        }
    }
    let mut groups = Vec::new();
    if let Some(cg) = cgroups {
        let parent = cg.mount.join(&cg.parent);
        if let Ok(entries) = fs::read_dir(&parent) {
            for e in entries.flatten().filter(|e| e.path().is_dir()) {
                let procs = fs::read_to_string(e.path().join("cgroup.procs")).unwrap_or_default();
                for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    // SAFETY: kill(2) with plain integers.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                    killed.push(pid);
                }
                groups.push(e.path());
            }
        }
    }
    let deadline = Instant::now() + SWEEP_WAIT;
    for pid in &killed {
        while Path::new(&format!("/proc/{pid}")).exists() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    for g in groups {
        remove_cgroup(&g, Duration::from_millis(500));
    }
    if !killed.is_empty() {
        eprintln!(
            "hearth: firecracker: killed {} VMM(s) left by an earlier server",
            killed.len()
        );
    }
    let _ = fs::remove_dir_all(&jails);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[OsString]) -> Vec<String> {
        v.iter().map(|s| s.to_string_lossy().into_owned()).collect()
    }

    #[test]
    fn the_jailer_gets_identity_namespace_cgroups_then_firecrackers_args() {
        let cg = Cgroups {
            mount: "/sys/fs/cgroup".into(),
            parent: "hearth-fc-0badcafe".into(),
            controllers: vec!["memory".into(), "cpu".into(), "pids".into()],
        };
        let a = JailerArgs {
            id: "0123456789abcdef-3",
            exec_file: Path::new("/opt/fc/firecracker"),
            uid: 260_007,
            gid: GID,
            base: Path::new("/s/jail"),
            cgroups: Some(&cg),
            guest_memory_mb: 256,
        };
        let args = strings(&jailer_args(&a));
        let text = args.join(" ");
        assert_eq!(
            text,
            "--id 0123456789abcdef-3 --exec-file /opt/fc/firecracker --uid 260007 --gid 260000 \
             --chroot-base-dir /s/jail --new-pid-ns --cgroup-version 2 --parent-cgroup \
             hearth-fc-0badcafe --cgroup memory.max=402653184 --cgroup cpu.max=100000 100000 \
             --cgroup pids.max=64 -- --api-sock /run/api.sock --level Warning"
        );
        // One argument per value, spaces included.
        assert!(args.contains(&"cpu.max=100000 100000".to_string()));
        let none = strings(&jailer_args(&JailerArgs { cgroups: None, ..a }));
        assert!(!none.iter().any(|s| s.contains("cgroup")), "{none:?}");
        assert!(none.contains(&"--new-pid-ns".to_string()));
    }

    #[test]
    fn limits_follow_the_guest_and_the_controllers_present() {
        let all: Vec<String> = CONTROLLERS.iter().map(|c| c.to_string()).collect();
        // CPU is an instance's (the process sandbox's contract), not a core per vCPU.
        assert_eq!(
            limits(&all, 512),
            vec![
                ("memory.max".to_string(), ((512u64 + 128) << 20).to_string()),
                ("cpu.max".to_string(), "100000 100000".to_string()),
                ("pids.max".to_string(), "64".to_string()),
            ]
        );
        assert_eq!(limits(&["pids".to_string()], 512).len(), 1);
        assert!(limits(&[], 512).is_empty());
    }

    #[test]
    fn the_cgroup2_mount_is_the_first_one_listed() {
        let hybrid = "cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n\
                      none /x cgroup2 rw 0 0\n";
        assert_eq!(
            cgroup2_mount(hybrid),
            Some(PathBuf::from("/sys/fs/cgroup/unified"))
        );
        assert_eq!(cgroup2_mount("proc /proc proc rw 0 0\n"), None);
    }

    #[test]
    fn parent_cgroups_differ_per_state_dir() {
        let a = parent_cgroup(Path::new("/state/a"));
        assert!(a.starts_with("hearth-fc-") && a.len() == 18, "{a}");
        assert_eq!(a, parent_cgroup(Path::new("/state/a")));
        assert_ne!(a, parent_cgroup(Path::new("/state/b")));
    }

    #[test]
    fn socket_paths_count_the_jail_root_and_run() {
        let base = Path::new("/state/hearth/jail");
        // "/state/hearth/jail/firecracker/<24>/root" + "/run/api.sock"
        assert_eq!(longest_socket_path(base, 24), 18 + 12 + 25 + 5 + 13);
        let deep = PathBuf::from("/").join("d".repeat(60)).join("jail");
        assert!(longest_socket_path(&deep, ID_BYTES_MAX) > SOCKET_PATH_BYTES_MAX);
    }

    /// Linking in and taking out on a real filesystem: shared inodes, modes,
    /// and a link the VMM made is refused.
    #[test]
    fn files_go_in_as_links_and_come_out_only_as_plain_files() {
        let dir = std::env::temp_dir().join(format!("hearth-jail-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let root = dir.join("root");
        fs::create_dir_all(&root).unwrap();
        let src = dir.join("runtime-1.ext4");
        fs::write(&src, b"image").unwrap();
        let name = link_in(&root, &src).unwrap();
        assert_eq!(name, Path::new("runtime-1.ext4"));
        let (a, b) = (
            fs::metadata(&src).unwrap(),
            fs::metadata(root.join(&name)).unwrap(),
        );
        assert_eq!((a.ino(), a.nlink()), (b.ino(), 2));
        assert_eq!((a.uid(), a.gid(), a.mode() & 0o7777), (0, GID, 0o640));

        let out = root.join("fc.mem.tmp");
        fs::write(&out, b"memory").unwrap();
        take_out(&out, &dir.join("fc.mem")).unwrap();
        let m = fs::metadata(dir.join("fc.mem")).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, GID, 0o640));
        assert!(!out.exists());
        // A hard link to a linked-in file, or a symlink, stays where it is.
        fs::hard_link(root.join(&name), &out).unwrap();
        assert!(take_out(&out, &dir.join("x")).is_err());
        fs::remove_file(&out).unwrap();
        std::os::unix::fs::symlink("/etc/passwd", &out).unwrap();
        assert!(take_out(&out, &dir.join("x")).is_err());
        assert!(!dir.join("x").exists());
        // A FIFO is refused without waiting for a writer.
        fs::remove_file(&out).unwrap();
        mkfifo(&out);
        assert!(take_out(&out, &dir.join("x")).is_err());
        fs::remove_dir_all(&dir).unwrap();
    }

    fn mkfifo(path: &Path) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo with a NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }

    /// Files a VMM's uid can replace are opened, never followed: a link in
    /// place of a file linked in, or of the pid file, is refused, and a FIFO
    /// pid file does not hang the sweep (before, both were followed/read).
    #[test]
    fn links_and_fifos_in_place_of_jail_files_are_refused() {
        let dir = std::env::temp_dir().join(format!("hearth-jailf-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let root = dir.join("root");
        fs::create_dir_all(&root).unwrap();
        let victim = dir.join("host-file");
        fs::write(&victim, b"secret").unwrap();
        fs::set_permissions(&victim, fs::Permissions::from_mode(0o600)).unwrap();
        let link = dir.join("fc.mem");
        std::os::unix::fs::symlink(&victim, &link).unwrap();
        assert!(link_in(&root, &link).is_err());
        let m = fs::metadata(&victim).unwrap();
        assert_eq!(
            (m.gid(), m.mode() & 0o7777),
            (0, 0o600),
            "the target was changed"
        );
        assert!(!root.join("fc.mem").exists());

        let pid_file = root.join("firecracker.pid");
        fs::write(&pid_file, b"4242\n").unwrap();
        assert_eq!(read_pid_file(&pid_file), Some(4242));
        fs::remove_file(&pid_file).unwrap();
        mkfifo(&pid_file);
        let t = Instant::now();
        assert_eq!(read_pid_file(&pid_file), None);
        assert!(t.elapsed() < Duration::from_secs(1));
        fs::remove_file(&pid_file).unwrap();
        fs::write(dir.join("pid"), b"77").unwrap();
        std::os::unix::fs::symlink(dir.join("pid"), &pid_file).unwrap();
        assert_eq!(read_pid_file(&pid_file), None);
        fs::remove_file(&pid_file).unwrap();
        fs::write(&pid_file, "1".repeat(1 << 20)).unwrap();
        assert_eq!(read_pid_file(&pid_file), None);
        // The sweep reads that FIFO too, and returns.
        fs::remove_file(&pid_file).unwrap();
        let jails = dir.join("base");
        fs::create_dir_all(jails.join("firecracker/abc/root")).unwrap();
        mkfifo(&jails.join("firecracker/abc/root/firecracker.pid"));
        sweep(&jails, None);
        assert!(!jails.join("firecracker").exists());
        fs::remove_dir_all(&dir).unwrap();
    }
}
