//! microVM boot: everything PID 1 does between the kernel handing over and
//! the runtime starting, and the power-off at the end.
//!
//! initramfs (agent as /init + modules)
//!   -> mount /proc, /sys, /dev -> read /proc/cmdline -> load modules
//!   -> wait for the drives -> mount runtime image ro at /newroot,
//!      code image ro at /newroot/var/task, tmpfs at /newroot/tmp
//!   -> move /proc, /sys, /dev inside -> switch root -> loopback up.
//!
//! The runtime image must contain the mount points `/var/task`, `/tmp`,
//! `/proc` and `/dev` (it is read-only, so they cannot be made here);
//! `/sys` is moved in only if it exists.
//!
//! For trying this path outside a VM (a chroot in fresh PID, mount and network
//! namespaces, with loop devices as drives), `HEARTH_AGENT_CMDLINE` in the
//! agent's environment stands in for `/proc/cmdline`.

use std::ffi::CString;
use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cmdline::{self, CmdlineError, VmConfig};
use crate::modules;
use crate::sys::cvt;

/// Where the new root is assembled inside the initramfs.
const NEWROOT: &str = "/newroot";

/// A boot step that failed; the VM cannot serve and will power off.
#[derive(Debug)]
pub enum BootError {
    /// A mount, mkdir, chroot... failed.
    Step { what: String, err: io::Error },
    /// `/proc/cmdline` has a value the agent cannot use.
    Cmdline(CmdlineError),
    /// A drive did not show up in time.
    DeviceMissing { dev: PathBuf, waited_ms: u64 },
    /// The runtime image lacks a directory the agent mounts over.
    MountPointMissing(PathBuf),
}

impl fmt::Display for BootError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BootError::Step { what, err } => write!(f, "{what}: {err}"),
            BootError::Cmdline(e) => write!(f, "{e}"),
            BootError::DeviceMissing { dev, waited_ms } => {
                write!(f, "block device {} did not appear within {waited_ms} ms (driver module missing from the order file?)", dev.display())
            }
            BootError::MountPointMissing(p) => write!(
                f,
                "the runtime image has no {} to mount over; create it in the image",
                p.display()
            ),
        }
    }
}

fn step<T>(what: impl Into<String>, r: io::Result<T>) -> Result<T, BootError> {
    r.map_err(|err| BootError::Step {
        what: what.into(),
        err,
    })
}

/// Brings the guest from a bare initramfs to the runtime's root filesystem
/// and returns the settings read from the kernel command line.
pub fn boot() -> Result<VmConfig, BootError> {
    mount_api_filesystems()?;
    ensure_console();
    let text = match std::env::var("HEARTH_AGENT_CMDLINE") {
        Ok(text) => text,
        Err(_) => step(
            "read /proc/cmdline",
            std::fs::read_to_string("/proc/cmdline"),
        )?,
    };
    let (cfg, warnings) = cmdline::parse(&text).map_err(BootError::Cmdline)?;
    for w in warnings {
        diag!("{w}");
    }
    let report = modules::load_all(&cfg.modules_dir);
    diag!(
        "modules: {} loaded, {} already present, {} failed",
        report.loaded,
        report.already_loaded,
        report.failed
    );

    let wait = Duration::from_millis(cfg.wait_ms);
    wait_for(&cfg.runtime_dev, wait)?;
    if let Some(code) = &cfg.code_dev {
        wait_for(code, wait)?;
    }
    mkdir(NEWROOT)?;
    mount(
        Some(&cfg.runtime_dev),
        NEWROOT,
        Some(&cfg.fstype),
        libc::MS_RDONLY | libc::MS_NODEV,
        None,
    )?;
    for dir in ["/var/task", "/tmp", "/proc", "/dev"] {
        let p = Path::new(NEWROOT).join(&dir[1..]);
        if !p.is_dir() {
            return Err(BootError::MountPointMissing(PathBuf::from(dir)));
        }
    }
    if let Some(code) = &cfg.code_dev {
        mount(
            Some(code),
            "/newroot/var/task",
            Some(&cfg.fstype),
            libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOSUID,
            None,
        )?;
    }
    let tmp_opts = format!("size={}m,mode=1777", cfg.tmp_mb);
    mount(
        Some(Path::new("tmpfs")),
        "/newroot/tmp",
        Some("tmpfs"),
        libc::MS_NODEV | libc::MS_NOSUID,
        Some(&tmp_opts),
    )?;
    for api in ["/dev", "/proc", "/sys"] {
        let target = Path::new(NEWROOT).join(&api[1..]);
        if target.is_dir() {
            mount(
                Some(Path::new(api)),
                &target.to_string_lossy(),
                None,
                libc::MS_MOVE,
                None,
            )?;
        } else {
            diag!("runtime image has no {api}; leaving it behind in the initramfs");
        }
    }
    switch_root()?;
    if let Err(e) = loopback_up() {
        diag!("cannot bring up loopback: {e}");
    }
    Ok(cfg)
}

/// Flushes filesystems and ends the VM with a reset: QEMU runs with
/// -no-reboot and Firecracker exits on the guest's keyboard-controller reset
/// (`reboot=k`), while a power-off would only halt a Firecracker guest and
/// leave its VMM running. PID 1 must never simply exit: that panics the kernel.
pub fn power_off() -> ! {
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    diag!(
        "power off failed: {}; halting here",
        io::Error::last_os_error()
    );
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn mount_api_filesystems() -> Result<(), BootError> {
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    for (fstype, dir, flags, data) in [
        ("proc", "/proc", nosuid_nodev_noexec, None),
        ("sysfs", "/sys", nosuid_nodev_noexec, None),
        ("devtmpfs", "/dev", libc::MS_NOSUID, Some("mode=0755")),
    ] {
        mkdir(dir)?;
        match mount(Some(Path::new(fstype)), dir, Some(fstype), flags, data) {
            Err(BootError::Step { err, .. }) if err.raw_os_error() == Some(libc::EBUSY) => {}
            other => other?,
        }
    }
    Ok(())
}

/// The kernel opens /dev/console for init only if the initramfs has the node;
/// without it fds 0-2 are closed. Attach them to the console now.
fn ensure_console() {
    // SAFETY: fcntl/open/dup2/close only touch fds.
    unsafe {
        if libc::fcntl(2, libc::F_GETFD) >= 0 {
            return;
        }
        let fd = libc::open(c"/dev/console".as_ptr(), libc::O_RDWR | libc::O_NOCTTY);
        if fd < 0 {
            return;
        }
        for target in 0..=2 {
            if target != fd {
                libc::dup2(fd, target);
            }
        }
        if fd > 2 {
            libc::close(fd);
        }
    }
}

fn wait_for(dev: &Path, wait: Duration) -> Result<(), BootError> {
    let start = Instant::now();
    while !dev.exists() {
        if start.elapsed() >= wait {
            return Err(BootError::DeviceMissing {
                dev: dev.to_path_buf(),
                waited_ms: wait.as_millis() as u64,
            });
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

/// Makes `/newroot` the root: move its mount over `/` and chroot into it.
/// (pivot_root cannot take the initramfs, and the initramfs files are few,
/// so they are simply left in memory.)
fn switch_root() -> Result<(), BootError> {
    step("chdir /newroot", std::env::set_current_dir(NEWROOT))?;
    mount(Some(Path::new(".")), "/", None, libc::MS_MOVE, None)?;
    // SAFETY: chroot takes a NUL-terminated path.
    step("chroot .", cvt(unsafe { libc::chroot(c".".as_ptr()) }))?;
    step("chdir /", std::env::set_current_dir("/"))
}

fn loopback_up() -> io::Result<()> {
    // SAFETY: an ioctl on a fresh datagram socket with an ifreq we own.
    unsafe {
        let fd = cvt(libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0,
        ))?;
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        let r = cvt(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req)).and_then(|_| {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            cvt(libc::ioctl(fd, libc::SIOCSIFFLAGS, &req))
        });
        libc::close(fd);
        // The kernel gives lo 127.0.0.1/8 and ::1 by itself when it comes up.
        r.map(drop)
    }
}

fn mkdir(dir: &str) -> Result<(), BootError> {
    match std::fs::create_dir(dir) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => Err(BootError::Step {
            what: format!("mkdir {dir}"),
            err: e,
        }),
        _ => Ok(()),
    }
}

fn mount(
    source: Option<&Path>,
    target: &str,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<(), BootError> {
    let what = format!(
        "mount {} on {target} ({})",
        source.map_or("none".into(), |s| s.display().to_string()),
        fstype.unwrap_or(if flags & libc::MS_MOVE != 0 {
            "move"
        } else {
            "-"
        })
    );
    let cstr = |s: &str| {
        CString::new(s).map_err(|_| BootError::Step {
            what: what.clone(),
            err: io::ErrorKind::InvalidInput.into(),
        })
    };
    let source = source.map(|s| cstr(&s.to_string_lossy())).transpose()?;
    let target_c = cstr(target)?;
    let fstype = fstype.map(cstr).transpose()?;
    let data = data.map(cstr).transpose()?;
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is null or a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            ptr(&source),
            target_c.as_ptr(),
            ptr(&fstype),
            flags,
            ptr(&data).cast(),
        )
    };
    step(what, cvt(rc).map(drop))
}
