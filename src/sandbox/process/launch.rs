//! The launcher: `hearth __sandbox`, a fresh single-threaded process that builds one sandbox.
//!
//! hearth itself is multi-threaded, and after `fork` in a multi-threaded process only
//! async-signal-safe calls are allowed, which rules out the setup below. So hearth runs its own
//! binary as a launcher and the launcher does the work:
//!
//! 1. reads the [`SandboxSpec`] (JSON) from stdin;
//! 2. creates the cgroups and moves itself into them, so the sandbox is born inside its limits
//!    and its cgroup namespace is rooted at its own cgroup;
//! 3. `clone`s the sandbox's PID 1 into new user, PID, mount, network, IPC, UTS and cgroup
//!    namespaces; writes its uid/gid maps; releases it through a pipe;
//! 4. reports the child's host pid, then waits on a close-on-exec status pipe: end-of-file means
//!    `execve` succeeded, bytes are the setup error of the child;
//! 5. exits, so the sandbox is reparented to hearth (a child subreaper).
//!
//! What the launcher reports on stdout is one [`Line`] per line (see [`Line::encode`]).
//!
//! The child, PID 1 of the new namespaces, builds its root (see [`setup_child`]), drops every
//! privilege and `execve`s `spec.argv` with exactly `spec.env`. Until then it runs as host root
//! mapped to nobody in the new user namespace; after `pivot_root` it switches to uid/gid 0 of
//! the namespace, i.e. `host_uid` outside.

use std::ffi::{CStr, CString};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

use super::cgroup::{self, Group, Limits};
use super::seccomp;
use super::SandboxSpec;
use crate::runtime::root::DEVICES;
use crate::util::cpu;

/// Largest spec the launcher accepts on stdin.
const SPEC_BYTES_MAX: u64 = 1 << 20;
/// How long the launcher waits for the child to reach `execve`.
pub const SETUP_TIMEOUT_MS: i32 = 10_000;
/// Size limit of the child's status message.
const STATUS_BYTES_MAX: usize = 4096;
/// Inode limit of `/tmp` is one per this many bytes of `tmp_bytes`, within the bounds below.
const TMP_BYTES_PER_INODE: u64 = 4096;
const TMP_INODES_MIN: u64 = 1024;
const TMP_INODES_MAX: u64 = 1 << 20;
/// RLIMIT_NOFILE inside (what AWS Lambda grants).
pub const NOFILE_MAX: u64 = 1024;
/// The hostname inside every sandbox: fixed, so it tells nothing about the host, hearth or
/// the instance (resolvable through the runtime root's `/etc/hosts`).
pub const HOSTNAME: &str = "localhost";
/// Files of `/proc` that describe the host (kernel symbols, boot command line, build config,
/// keyrings, timers, scheduler internals) or act on it (`sysrq-trigger`): a read-only
/// `/dev/null` is bound over each that exists, as container runtimes do.
pub const PROC_MASKED_FILES: &[&str] = &[
    "kallsyms",
    "kcore",
    "config.gz",
    "cmdline",
    "keys",
    "key-users",
    "modules",
    "timer_list",
    "timer_stats",
    "sched_debug",
    "latency_stats",
    "sysrq-trigger",
];
/// Directories of `/proc` about the host's hardware: an empty read-only tmpfs covers each that
/// exists.
pub const PROC_MASKED_DIRS: &[&str] = &["acpi", "scsi", "asound", "driver"];
/// Environment variable (of hearth, passed on to the launcher): `inherit` keeps hearth's
/// stderr as the sandbox's fd 2, for debugging the agent. Otherwise fd 2 is /dev/null, because
/// anything in the sandbox running as its uid could reach that descriptor via /proc/1/fd/2.
pub const STDERR_ENV: &str = "HEARTH_SANDBOX_STDERR";

/// One line of the launcher's report to `spawn`.
#[derive(Debug, PartialEq)]
pub enum Line {
    /// A limit that could not be applied; the sandbox runs anyway.
    Warning(String),
    /// The sandbox's cgroups (so hearth can read and remove them).
    Cgroup(Group),
    /// Host pid of the sandbox's PID 1.
    Pid(i32),
    /// The sandbox exec'd its command.
    Ok,
    /// Setup failed; nothing is left running.
    Error(String),
}

impl Line {
    /// `warning <text>`, `cgroup <json>`, `pid <n>`, `ok`, `error <text>`; one line each.
    pub fn encode(&self) -> String {
        let one_line = |s: &str| s.replace(['\n', '\r'], " ");
        match self {
            Line::Warning(w) => format!("warning {}\n", one_line(w)),
            Line::Cgroup(g) => format!(
                "cgroup {}\n",
                serde_json::to_string(g).expect("group serialises")
            ),
            Line::Pid(p) => format!("pid {p}\n"),
            Line::Ok => "ok\n".into(),
            Line::Error(e) => format!("error {}\n", one_line(e)),
        }
    }

    /// Parses one line (without its newline).
    pub fn parse(line: &str) -> Result<Line, String> {
        let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
        match word {
            "warning" => Ok(Line::Warning(rest.to_owned())),
            "cgroup" => serde_json::from_str(rest)
                .map(Line::Cgroup)
                .map_err(|e| format!("bad cgroup line: {e}")),
            "pid" => rest
                .parse()
                .map(Line::Pid)
                .map_err(|_| format!("bad pid line {line:?}")),
            "ok" if rest.is_empty() => Ok(Line::Ok),
            "error" => Ok(Line::Error(rest.to_owned())),
            _ => Err(format!("unexpected launcher output {line:?}")),
        }
    }
}

fn report(line: &Line) {
    let mut out = io::stdout().lock();
    // If hearth went away there is nobody to tell; the exit below cleans up.
    let _ = out.write_all(line.encode().as_bytes());
    let _ = out.flush();
}

/// Entry point of `hearth __sandbox`. Never returns.
pub fn launcher_main() -> ! {
    let code = match launch() {
        Ok(()) => 0,
        Err(msg) => {
            report(&Line::Error(msg));
            1
        }
    };
    std::process::exit(code)
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", io::Error::last_os_error())
}

fn check(rc: libc::c_int, what: &str) -> Result<(), String> {
    if rc < 0 {
        Err(os_err(what))
    } else {
        Ok(())
    }
}

fn cstring(s: &str, what: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("{what} {s:?} contains a NUL byte"))
}

fn cpath(p: &Path) -> Result<CString, String> {
    CString::new(p.as_os_str().as_encoded_bytes())
        .map_err(|_| format!("path {} contains a NUL byte", p.display()))
}

fn pipe() -> Result<(OwnedFd, OwnedFd), String> {
    let mut fds = [0; 2];
    check(
        // SAFETY: `fds` has room for the two descriptors pipe2 writes.
        unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) },
        "pipe2",
    )?;
    // SAFETY: pipe2 succeeded, so both descriptors are open and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Everything the child needs, prepared before `clone` so the child allocates little.
struct Prepared {
    root: CString,
    code_dir: CString,
    var_task: CString,
    tmp: CString,
    tmp_options: CString,
    proc_: CString,
    /// `/proc/sys` under the root: made read-only (a sandbox's root may not tune
    /// even its own namespaces' sysctls, such as its sockets' buffer sizes).
    proc_sys: CString,
    /// `(target, is_dir)` for every masked `/proc` path, under the root.
    proc_masks: Vec<(CString, bool)>,
    devices: Vec<(CString, CString)>,
    /// Host directory and its mount point under the root, for each bind.
    binds: Vec<(CString, CString)>,
    hostname: Vec<u8>,
    tmp_bytes: u64,
    pids_rlimit: Option<u64>,
    cpu_core: Option<usize>,
    keep_stderr: bool,
    /// The channel is a pipe pair: its write end back to the host is fd 5.
    pipes: bool,
    filter: Vec<seccomp::SockFilter>,
    exe: CString,
    argv: Vec<CString>,
    env: Vec<CString>,
}

fn prepare(spec: &SandboxSpec, has_pids_cgroup: bool) -> Result<Prepared, String> {
    let root = &spec.runtime_root;
    let inodes = (spec.tmp_bytes / TMP_BYTES_PER_INODE).clamp(TMP_INODES_MIN, TMP_INODES_MAX);
    let mut devices = Vec::new();
    for d in DEVICES {
        devices.push((
            cstring(&format!("/dev/{d}"), "device")?,
            cpath(&root.join("dev").join(d))?,
        ));
    }
    let argv: Vec<CString> = spec
        .argv
        .iter()
        .map(|a| cstring(a, "argument"))
        .collect::<Result<_, _>>()?;
    let env = spec
        .env
        .iter()
        .map(|(k, v)| cstring(&format!("{k}={v}"), "environment variable"))
        .collect::<Result<_, _>>()?;
    Ok(Prepared {
        root: cpath(root)?,
        code_dir: cpath(&spec.code_dir)?,
        var_task: cpath(&root.join("var/task"))?,
        tmp: cpath(&root.join("tmp"))?,
        tmp_options: cstring(
            &format!(
                "size={},nr_inodes={inodes},mode=1777,uid=0,gid=0",
                spec.tmp_bytes
            ),
            "tmpfs options",
        )?,
        proc_: cpath(&root.join("proc"))?,
        proc_sys: cpath(&root.join("proc/sys"))?,
        proc_masks: PROC_MASKED_FILES
            .iter()
            .map(|f| (f, false))
            .chain(PROC_MASKED_DIRS.iter().map(|d| (d, true)))
            .map(|(name, dir)| Ok((cpath(&root.join("proc").join(name))?, dir)))
            .collect::<Result<_, String>>()?,
        devices,
        binds: spec
            .binds
            .iter()
            .map(|b| {
                Ok((
                    cpath(b)?,
                    cpath(&root.join(b.strip_prefix("/").unwrap_or(b)))?,
                ))
            })
            .collect::<Result<_, String>>()?,
        hostname: HOSTNAME.as_bytes().to_vec(),
        tmp_bytes: spec.tmp_bytes,
        // Without a pids cgroup, RLIMIT_NPROC on the sandbox's own host uid is the fallback
        // fork-bomb guard (it counts every task of that uid on the host).
        pids_rlimit: if has_pids_cgroup {
            None
        } else {
            Some(u64::from(spec.pids_max))
        },
        cpu_core: spec.cpu_core,
        keep_stderr: std::env::var(STDERR_ENV).is_ok_and(|v| v == "inherit"),
        pipes: spec.pipes,
        filter: seccomp::build_filter().map_err(|e| format!("building the seccomp filter: {e}"))?,
        exe: argv[0].clone(),
        argv,
        env,
    })
}

fn launch() -> Result<(), String> {
    let mut input = String::new();
    io::stdin()
        .take(SPEC_BYTES_MAX)
        .read_to_string(&mut input)
        .map_err(|e| format!("reading the sandbox spec from stdin: {e}"))?;
    let spec: SandboxSpec =
        serde_json::from_str(&input).map_err(|e| format!("parsing the sandbox spec: {e}"))?;
    spec.validate().map_err(|e| e.to_string())?;

    let limits = Limits {
        memory_bytes: spec.memory_bytes,
        pids_max: spec.pids_max,
        cpu_millicores: spec.cpu_millicores,
        cpu_background: spec.cpu_background,
    };
    cgroup::set_parent_weight(spec.parent_cpu_weight);
    let (group, warnings) = cgroup::create(&spec.name, limits);
    for w in warnings {
        report(&Line::Warning(w));
    }
    if let Some(g) = &group {
        // Reported before joining: whatever happens next, hearth removes these directories.
        report(&Line::Cgroup(g.clone()));
        // SAFETY: getpid has no preconditions.
        if let Err(e) = g.join(unsafe { libc::getpid() }) {
            report(&Line::Warning(format!(
                "cannot join the sandbox cgroups, limits may not apply: {e}"
            )));
        }
    }
    let prepared = prepare(&spec, group.as_ref().is_some_and(Group::has_pids))?;

    // Host root's supplementary groups would survive into the sandbox (setgroups is denied
    // there), so drop them here, while we may.
    // SAFETY: an empty list needs no buffer.
    check(unsafe { libc::setgroups(0, std::ptr::null()) }, "setgroups")?;

    let (release_r, release_w) = pipe()?;
    let (status_r, status_w) = pipe()?;
    let flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWCGROUP;
    // SAFETY: a raw clone without CLONE_VM and with a NULL stack has fork semantics; this
    // process is single-threaded, so the child may keep running ordinary code.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(os_err("clone with new namespaces"));
    }
    if pid == 0 {
        drop(release_w);
        drop(status_r);
        child_main(release_r, status_w, &prepared);
    }
    let pid = pid as i32;
    drop(release_r);
    drop(status_w);

    let kill_child = || {
        // SAFETY: `pid` is our unreaped child, so the pid cannot have been reused.
        unsafe {
            libc::kill(pid, libc::SIGKILL);
            libc::waitpid(pid, std::ptr::null_mut(), 0);
        }
    };
    if let Err(e) = write_id_maps(pid, spec.host_uid) {
        kill_child();
        return Err(e);
    }
    // SAFETY: writes one byte from a valid buffer to our pipe.
    if unsafe { libc::write(release_w.as_raw_fd(), b"1".as_ptr().cast(), 1) } != 1 {
        let e = os_err("releasing the sandbox");
        kill_child();
        return Err(e);
    }
    drop(release_w);
    report(&Line::Pid(pid));

    match read_status(&status_r) {
        Ok(msg) if msg.is_empty() => {
            report(&Line::Ok);
            Ok(())
        }
        Ok(msg) => {
            // The child exits right after reporting; reap it so hearth inherits no zombie.
            // SAFETY: waits for our own child.
            unsafe { libc::waitpid(pid, std::ptr::null_mut(), 0) };
            Err(msg)
        }
        Err(e) => {
            kill_child();
            Err(e)
        }
    }
}

fn write_id_maps(pid: i32, host_uid: u32) -> Result<(), String> {
    let map = format!("0 {host_uid} 1\n");
    for (file, contents) in [
        ("setgroups", "deny\n"),
        ("uid_map", map.as_str()),
        ("gid_map", map.as_str()),
    ] {
        let path = format!("/proc/{pid}/{file}");
        std::fs::write(&path, contents)
            .map_err(|e| format!("writing {contents:?} to {path}: {e}"))?;
    }
    Ok(())
}

/// Reads the child's status pipe to end-of-file, bounded by [`SETUP_TIMEOUT_MS`].
fn read_status(fd: &OwnedFd) -> Result<String, String> {
    let mut buf = Vec::new();
    let deadline =
        std::time::Instant::now() + std::time::Duration::from_millis(SETUP_TIMEOUT_MS as u64);
    loop {
        let left = deadline
            .saturating_duration_since(std::time::Instant::now())
            .as_millis() as i32;
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, left) };
        if n < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(os_err("waiting for the sandbox"));
        }
        if n == 0 {
            return Err(format!(
                "the sandbox did not reach execve within {SETUP_TIMEOUT_MS} ms"
            ));
        }
        let mut chunk = [0u8; 512];
        // SAFETY: reads into a valid buffer of the stated length.
        let r = unsafe { libc::read(fd.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len()) };
        if r < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(os_err("reading the sandbox status"));
        }
        if r == 0 {
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
        buf.extend_from_slice(&chunk[..r as usize]);
        buf.truncate(STATUS_BYTES_MAX);
    }
}

/// PID 1 of the sandbox: waits to be released, sets up, execs. Never returns.
fn child_main(release: OwnedFd, status: OwnedFd, p: &Prepared) -> ! {
    let mut byte = [0u8; 1];
    // SAFETY: reads one byte into a valid buffer.
    let n = unsafe { libc::read(release.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
    if n != 1 {
        // The launcher failed before releasing us; it reports the reason.
        // SAFETY: _exit has no preconditions.
        unsafe { libc::_exit(127) };
    }
    drop(release);
    let msg = match setup_child(p) {
        Err(msg) => msg,
        Ok(never) => match never {},
    };
    let bytes = msg.as_bytes();
    // SAFETY: writes from a valid buffer; nothing to do if the launcher is gone.
    unsafe {
        libc::write(
            status.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len().min(STATUS_BYTES_MAX),
        );
        libc::_exit(127)
    }
}

fn mount(
    src: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
    data: Option<&CStr>,
) -> Result<(), String> {
    let ptr = |c: Option<&CStr>| c.map_or(std::ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is NULL or a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            ptr(src),
            target.as_ptr(),
            ptr(fstype),
            flags,
            ptr(data).cast(),
        )
    };
    check(
        rc,
        &format!(
            "mount {:?} on {:?} (type {:?})",
            src.unwrap_or(c""),
            target,
            fstype.unwrap_or(c"")
        ),
    )
}

/// The flags of the mount at `path` that a user namespace may not clear (mount(2): "locked"
/// flags of mounts inherited from a more privileged namespace), as MS_* bits.
fn locked_flags(path: &CStr) -> Result<libc::c_ulong, String> {
    // SAFETY: statvfs writes into the zeroed struct we own.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    check(
        // SAFETY: statvfs writes only into `st`; `path` is NUL-terminated.
        unsafe { libc::statvfs(path.as_ptr(), &mut st) },
        &format!("statvfs {path:?}"),
    )?;
    let mut flags = 0;
    for (st_flag, ms_flag) in [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ] {
        if st.f_flag & st_flag != 0 {
            flags |= ms_flag;
        }
    }
    if st.f_flag & (libc::ST_NOATIME | libc::ST_RELATIME) == 0 {
        flags |= libc::MS_STRICTATIME;
    }
    Ok(flags)
}

/// Bind-mounts `src` on `target` and makes the new mount read-only, nosuid and nodev.
fn bind_read_only(src: &CStr, target: &CStr) -> Result<(), String> {
    mount(Some(src), target, None, libc::MS_BIND | libc::MS_REC, None)?;
    let keep = locked_flags(target)?;
    mount(
        None,
        target,
        None,
        libc::MS_REMOUNT
            | libc::MS_BIND
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | keep,
        None,
    )
}

/// Covers the host details of the freshly mounted `/proc` (see [`PROC_MASKED_FILES`] and
/// [`PROC_MASKED_DIRS`]); paths this kernel does not have are skipped.
fn mask_proc(masks: &[(CString, bool)]) -> Result<(), String> {
    for (target, is_dir) in masks {
        // SAFETY: an all-zero stat is a valid value of this plain C struct.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: stat writes into the struct we own; the path is NUL-terminated.
        if unsafe { libc::stat(target.as_ptr(), &mut st) } != 0 {
            if io::Error::last_os_error().raw_os_error() == Some(libc::ENOENT) {
                continue;
            }
            return Err(os_err(&format!("stat {target:?}")));
        }
        if *is_dir {
            mount(
                Some(c"tmpfs"),
                target,
                Some(c"tmpfs"),
                libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
                Some(c"size=4k,nr_inodes=1,mode=0555"),
            )?;
        } else {
            // Not `bind_read_only`: a device node on a nodev mount cannot be opened at all,
            // and readers should see an empty file, not EACCES.
            mount(Some(c"/dev/null"), target, None, libc::MS_BIND, None)?;
            let keep = locked_flags(target)?;
            mount(
                None,
                target,
                None,
                libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | keep,
                None,
            )?;
        }
    }
    Ok(())
}

/// Builds the sandbox's view of the world and execs. Returns only on failure.
fn setup_child(p: &Prepared) -> Result<std::convert::Infallible, String> {
    // Nothing we mount may propagate back to the host.
    mount(None, c"/", None, libc::MS_REC | libc::MS_PRIVATE, None)?;

    // The runtime root, bound onto itself so it is a mount point that pivot_root accepts.
    mount(
        Some(&p.root),
        &p.root,
        None,
        libc::MS_BIND | libc::MS_REC,
        None,
    )?;
    bind_read_only(&p.code_dir, &p.var_task)?;
    for (host, target) in &p.binds {
        bind_read_only(host, target)?;
    }
    mount(
        Some(c"tmpfs"),
        &p.tmp,
        Some(c"tmpfs"),
        libc::MS_NOSUID | libc::MS_NODEV,
        Some(&p.tmp_options),
    )?;
    // procfs must be mounted while the host's /proc is still visible in this mount namespace
    // (the kernel only lets a user namespace mount a proc that is already fully visible).
    mount(
        Some(c"proc"),
        &p.proc_,
        Some(c"proc"),
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        None,
    )?;
    mask_proc(&p.proc_masks)?;
    bind_read_only(&p.proc_sys, &p.proc_sys)?;
    for (host, target) in &p.devices {
        mount(Some(host), target, None, libc::MS_BIND, None)?;
    }
    let keep = locked_flags(&p.root)?;
    mount(
        None,
        &p.root,
        None,
        libc::MS_REMOUNT
            | libc::MS_BIND
            | libc::MS_RDONLY
            | libc::MS_NOSUID
            | libc::MS_NODEV
            | keep,
        None,
    )?;

    // pivot_root(".", ".") stacks the old root on top of the new one; detaching it leaves
    // only the new root.
    // SAFETY: plain syscalls on NUL-terminated paths.
    unsafe {
        check(libc::chdir(p.root.as_ptr()), "chdir to the new root")?;
        check(
            libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) as libc::c_int,
            "pivot_root",
        )?;
        check(
            libc::umount2(c".".as_ptr(), libc::MNT_DETACH),
            "detaching the old root",
        )?;
        check(libc::chdir(c"/var/task".as_ptr()), "chdir to /var/task")?;
    }

    // From host root (unmapped here) to uid/gid 0 of the namespace = host_uid outside.
    // Capabilities survive: the namespace's root uid is the target.
    // SAFETY: plain syscalls.
    unsafe {
        check(libc::setresgid(0, 0, 0), "setresgid 0")?;
        check(libc::setresuid(0, 0, 0), "setresuid 0")?;
        check(
            libc::sethostname(p.hostname.as_ptr().cast(), p.hostname.len()),
            "sethostname",
        )?;
    }
    loopback_up()?;
    set_rlimits(p)?;
    if let Some(core) = p.cpu_core {
        pin_to_core(core)?;
    }
    // The default policy, whatever thread of hearth's spawned the launcher
    // (worker threads may run as SCHED_BATCH: `--worker-policy`). Best effort:
    // a policy is a matter of latency, not of isolation.
    let _ = cpu::set_batch(false);
    reset_signals();
    prepare_fds(p.keep_stderr, p.pipes)?;
    drop_privileges()?;
    seccomp::install(&p.filter).map_err(|e| format!("installing the seccomp filter: {e}"))?;

    let mut argv: Vec<*const libc::c_char> = p.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = p.env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    // SAFETY: NULL-terminated arrays of NUL-terminated strings that outlive the call.
    unsafe { libc::execve(p.exe.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Err(os_err(&format!("execve {:?}", p.exe)))
}

fn loopback_up() -> Result<(), String> {
    #[repr(C)]
    struct IfreqFlags {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    // SAFETY: plain socket call.
    let s = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(s, "socket for configuring lo")?;
    // SAFETY: `s` was just opened and is ours.
    let s = unsafe { OwnedFd::from_raw_fd(s) };
    let mut ifr = IfreqFlags {
        name: [0; libc::IFNAMSIZ],
        flags: 0,
        _pad: [0; 22],
    };
    ifr.name[..2].copy_from_slice(b"lo");
    // SAFETY: `ifr` has the layout of `struct ifreq` for the flags ioctls.
    unsafe {
        check(
            libc::ioctl(s.as_raw_fd(), libc::SIOCGIFFLAGS, &mut ifr),
            "SIOCGIFFLAGS lo",
        )?;
        ifr.flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        check(
            libc::ioctl(s.as_raw_fd(), libc::SIOCSIFFLAGS, &ifr),
            "SIOCSIFFLAGS lo up",
        )?;
    }
    Ok(())
}

fn set_rlimits(p: &Prepared) -> Result<(), String> {
    let mut limits = vec![
        (libc::RLIMIT_NOFILE, NOFILE_MAX, "RLIMIT_NOFILE"),
        (libc::RLIMIT_CORE, 0, "RLIMIT_CORE"),
        // No file can usefully outgrow /tmp, the only writable file system.
        (libc::RLIMIT_FSIZE, p.tmp_bytes, "RLIMIT_FSIZE"),
    ];
    if let Some(n) = p.pids_rlimit {
        limits.push((libc::RLIMIT_NPROC, n, "RLIMIT_NPROC"));
    }
    for (resource, value, name) in limits {
        let rl = libc::rlimit {
            rlim_cur: value,
            rlim_max: value,
        };
        check(
            // SAFETY: passes a valid rlimit.
            unsafe { libc::setrlimit(resource, &rl) },
            &format!("setrlimit {name} {value}"),
        )?;
    }
    Ok(())
}

fn pin_to_core(core: usize) -> Result<(), String> {
    if core >= libc::CPU_SETSIZE as usize {
        return Err(format!("cpu_core {core} is out of range"));
    }
    cpu::pin_thread(0, core).map_err(|e| format!("pinning to cpu {core}: {e}"))
}

/// Signal dispositions ignored by the launcher (Rust ignores SIGPIPE) would survive `execve`.
fn reset_signals() {
    // SAFETY: resetting dispositions and the mask of this single-threaded process.
    unsafe {
        for sig in 1..libc::SIGRTMAX() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
    }
}

/// stdin and stdout (the pipe to hearth) become /dev/null, and so does stderr unless
/// [`STDERR_ENV`] asks to keep it; fd 3 is the channel (with `pipes`, the read end of the
/// host's pipe, and fd 5 the write end of the one back), fd 4 the log socket; everything
/// else closes on exec.
fn prepare_fds(keep_stderr: bool, pipes: bool) -> Result<(), String> {
    // SAFETY: plain fd syscalls on descriptors this process owns.
    unsafe {
        let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC);
        check(null, "opening /dev/null")?;
        check(libc::dup2(null, 0), "dup2 /dev/null to stdin")?;
        check(libc::dup2(null, 1), "dup2 /dev/null to stdout")?;
        if !keep_stderr {
            check(libc::dup2(null, 2), "dup2 /dev/null to stderr")?;
        }
        libc::close(null);
        check(
            libc::fcntl(3 as RawFd, libc::F_SETFD, 0),
            "the channel (fd 3)",
        )?;
        check(
            libc::fcntl(4 as RawFd, libc::F_SETFD, 0),
            "the log socket (fd 4)",
        )?;
        let mut first_closed = 5;
        if pipes {
            check(
                libc::fcntl(5 as RawFd, libc::F_SETFD, 0),
                "the channel's way back (fd 5)",
            )?;
            first_closed = 6;
        }
        check(
            libc::close_range(
                first_closed,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
            ),
            "close_range",
        )?;
    }
    Ok(())
}

/// Empties every capability set, locks root's special treatment off, sets no_new_privs.
fn drop_privileges() -> Result<(), String> {
    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let securebits = libc::SECBIT_NOROOT
        | libc::SECBIT_NOROOT_LOCKED
        | libc::SECBIT_NO_SETUID_FIXUP
        | libc::SECBIT_NO_SETUID_FIXUP_LOCKED
        | libc::SECBIT_KEEP_CAPS_LOCKED
        | libc::SECBIT_NO_CAP_AMBIENT_RAISE
        | libc::SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED;
    // SAFETY: prctl/capset with valid arguments.
    unsafe {
        check(
            libc::prctl(
                libc::PR_SET_SECUREBITS,
                securebits as libc::c_ulong,
                0,
                0,
                0,
            ),
            "PR_SET_SECUREBITS",
        )?;
        for cap in 0..64 {
            if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0 {
                // EINVAL: past the last capability this kernel knows.
                if io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL) {
                    break;
                }
                return Err(os_err(&format!(
                    "dropping capability {cap} from the bounding set"
                )));
            }
        }
        check(
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
                0,
                0,
                0,
            ),
            "clearing ambient capabilities",
        )?;
        let header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let data = [CapData {
            effective: 0,
            permitted: 0,
            inheritable: 0,
        }; 2];
        check(
            libc::syscall(libc::SYS_capset, &header, data.as_ptr()) as libc::c_int,
            "capset to nothing",
        )?;
        check(
            libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0),
            "PR_SET_NO_NEW_PRIVS",
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn report_lines_round_trip() {
        let g = Group {
            version: cgroup::Version::V1,
            memory: Some(PathBuf::from("/sys/fs/cgroup/memory/hearth/a")),
            pids: None,
            cpu: Some(PathBuf::from("/sys/fs/cgroup/cpu/hearth/a")),
        };
        for line in [
            Line::Warning("no pids".into()),
            Line::Cgroup(g),
            Line::Pid(4242),
            Line::Ok,
            Line::Error("mount failed".into()),
        ] {
            let text = line.encode();
            assert!(
                text.ends_with('\n') && text.matches('\n').count() == 1,
                "{text:?}"
            );
            assert_eq!(Line::parse(text.trim_end_matches('\n')).unwrap(), line);
        }
    }

    #[test]
    fn multi_line_messages_stay_on_one_line() {
        let text = Line::Error("a\nb".into()).encode();
        assert_eq!(text, "error a b\n");
    }

    #[test]
    fn unknown_report_lines_are_rejected() {
        assert!(Line::parse("hello").is_err());
        assert!(Line::parse("pid x").is_err());
        assert!(Line::parse("ok extra").is_err());
    }
}
