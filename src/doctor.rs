//! `hearth doctor`: what this host can run, and what to do about what it can't.
//!
//! Probes are read-only apart from one forked child that tries to create the
//! namespaces the process sandbox uses. The report has a section for the host
//! and one per backend; each backend's first line is its verdict.

use std::path::Path;
use std::process::Command;

use crate::guest::{ext4, images, kernel};
use crate::runtime;
use crate::sandbox::{firecracker, qemu};
use crate::util::program::which;

/// One finding.
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// A titled group of findings; for a backend, `verdict` says whether it runs here.
pub struct Section {
    pub title: &'static str,
    pub verdict: Option<Check>,
    pub checks: Vec<Check>,
}

fn check(name: &str, ok: bool, detail: impl Into<String>) -> Check {
    Check {
        name: name.to_string(),
        ok,
        detail: detail.into(),
    }
}

fn from_result(name: &str, r: Result<String, String>) -> Check {
    match r {
        Ok(d) => check(name, true, d),
        Err(e) => check(name, false, e),
    }
}

/// Everything `hearth doctor` reports, for `state_dir`.
pub fn report(state_dir: &Path) -> Vec<Section> {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    let uring = crate::engine::uring::probe();
    let userns = probe_namespaces();
    let cgroups = cgroup_summary();
    let node = runtime::find_node().map_err(|e| e.to_string());
    let agent = runtime::find_static_agent().map_err(|e| e.to_string());
    let dev_kvm = dev_kvm();
    let kvm = qemu::kvm_usable();

    let host = Section {
        title: "host",
        verdict: None,
        checks: vec![
            check(
                "io_uring",
                uring.is_ok(),
                uring
                    .err()
                    .map(|e| format!("{e}; the engine falls back to epoll (check /proc/sys/kernel/io_uring_disabled, seccomp)"))
                    .unwrap_or_else(|| "available".into()),
            ),
            from_result("namespaces", userns.clone()),
            from_result("cgroups", cgroups.clone()),
            from_result("node", node.clone().map(|p| p.display().to_string())),
            from_result(
                "guest agent",
                agent.clone().map(|p| match runtime::is_static_elf(&p) {
                    Ok(true) => format!(
                        "{} (static, wire protocol {})",
                        p.display(),
                        crate::protocol::VERSION
                    ),
                    _ => format!("{} (dynamically linked: fine for the process backend; microVMs need a static build: tools/build-agent.sh)", p.display()),
                }),
            ),
            from_result("/dev/kvm", dev_kvm.clone()),
            from_result("kvm guests", kvm.clone().map(|_| "KVM can run a standard Linux guest".into())),
        ],
    };

    let process_problems: Vec<String> = [
        (!root).then(|| "needs root (each instance gets its own host uid and cgroups): run hearth serve as root".to_string()),
        userns.as_ref().err().cloned(),
        node.as_ref().err().cloned(),
        agent.as_ref().err().cloned(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let process = Section {
        title: "process backend",
        verdict: Some(if process_problems.is_empty() {
            check(
                "runs here",
                true,
                format!(
                    "namespaces, seccomp, {}; `--backend auto` picks it unless KVM can run guests",
                    cgroups.as_deref().unwrap_or("no cgroup limits")
                ),
            )
        } else {
            check("runs here", false, process_problems.join("; "))
        }),
        checks: Vec::new(),
    };

    let qemu_bin = qemu::find_qemu();
    let qemu_version = qemu_bin
        .as_ref()
        .map_err(Clone::clone)
        .and_then(|q| qemu::qemu_version(q));
    let kern = kernel::locate(state_dir);
    let kernel_check = match &kern {
        Ok(k) => check(
            "guest kernel",
            true,
            format!(
                "{} ({} virtio modules){}",
                k.image.display(),
                k.modules.len(),
                if k.release.is_empty() {
                    String::new()
                } else {
                    format!(", release {}", k.release)
                }
            ),
        ),
        Err(e) if which("apt-get").is_some() => check(
            "guest kernel",
            true,
            format!("not fetched yet; the first `hearth serve --backend qemu` fetches it ({e})"),
        ),
        Err(e) => check("guest kernel", false, e.to_string()),
    };
    let mkfs = ext4::mkfs_path();
    let qemu_checks = vec![
        from_result(
            "qemu",
            qemu_version.clone().map(|v| {
                format!(
                    "{v} ({})",
                    qemu_bin
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                )
            }),
        ),
        kernel_check,
        check(
            "mkfs.ext4",
            mkfs.is_some(),
            mkfs.map(|p| p.display().to_string())
                .unwrap_or_else(|| "not found: install e2fsprogs".into()),
        ),
        from_result(
            "static agent",
            agent.clone().map(|p| p.display().to_string()),
        ),
        guest_images(state_dir),
    ];
    let qemu_problems: Vec<String> = [
        qemu_version.as_ref().err().cloned(),
        (!qemu_checks[1].ok).then(|| qemu_checks[1].detail.clone()),
        (!qemu_checks[2].ok).then(|| qemu_checks[2].detail.clone()),
        agent.as_ref().err().cloned(),
        node.as_ref().err().cloned(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let qemu_verdict = if !qemu_problems.is_empty() {
        check("runs here", false, qemu_problems.join("; "))
    } else {
        match &kvm {
            Ok(()) => check("runs here", true, "with KVM (-accel kvm); `--backend auto` picks it"),
            Err(why) => check(
                "runs here",
                true,
                format!(
                    "only with software emulation (-accel tcg: guest code runs 10-40x slower than native; `--backend qemu` to use it, \
                     auto does not): {why}"
                ),
            ),
        }
    };
    let qemu = Section {
        title: "qemu backend",
        verdict: Some(qemu_verdict),
        checks: qemu_checks,
    };

    let fc_version = firecracker::find_firecracker().and_then(|p| {
        firecracker::firecracker_version(&p).map(|v| format!("{v} ({})", p.display()))
    });
    let jailer = firecracker::find_jailer()
        .and_then(|p| version_line(&p).map(|v| format!("{v} ({})", p.display())));
    let fc_kernel = firecracker::guest_kernel_report(state_dir);
    let fc_kvm = kvm
        .clone()
        .map(|_| "KVM can run guests (vmx/svm, hardware or nested)".to_string())
        .map_err(|why| format!("KVM cannot run guests here: {why}"));
    let fc_problems: Vec<String> = [
        fc_version.as_ref().err().cloned(),
        fc_kvm.as_ref().err().cloned(),
        fc_kernel.as_ref().err().cloned(),
        agent.as_ref().err().cloned(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let firecracker = Section {
        title: "firecracker backend",
        verdict: Some(if fc_problems.is_empty() {
            check(
                "runs here",
                true,
                "`--backend firecracker`; `--backend auto` picks it",
            )
        } else {
            check("runs here", false, fc_problems.join("; "))
        }),
        checks: vec![
            from_result("firecracker", fc_version),
            from_result("jailer", jailer),
            from_result("kvm guests", fc_kvm),
            from_result("guest kernel", fc_kernel),
        ],
    };
    vec![host, process, qemu, firecracker]
}

/// Tries the namespaces the process sandbox creates, in a forked child.
fn probe_namespaces() -> Result<String, String> {
    let flags = libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNS
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUTS;
    // SAFETY: the child only calls unshare and _exit (async-signal-safe).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid == 0 {
        // SAFETY: as above.
        unsafe {
            let rc = libc::unshare(flags);
            let errno = if rc == 0 {
                0
            } else {
                *libc::__errno_location()
            };
            libc::_exit(errno.min(255));
        }
    }
    let mut status = 0;
    // SAFETY: waits for the child just forked.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let code = libc::WEXITSTATUS(status);
    if libc::WIFEXITED(status) && code == 0 {
        return Ok("user, pid, mount, net, ipc and uts namespaces can be created".into());
    }
    let max = std::fs::read_to_string("/proc/sys/user/max_user_namespaces").unwrap_or_default();
    let unpriv =
        std::fs::read_to_string("/proc/sys/kernel/unprivileged_userns_clone").unwrap_or_default();
    let mut why = format!(
        "unshare(user|pid|mount|net|ipc|uts) failed: {}",
        std::io::Error::from_raw_os_error(code)
    );
    if max.trim() == "0" {
        why.push_str("; user namespaces are disabled: sysctl user.max_user_namespaces=15000");
    } else if unpriv.trim() == "0" {
        why.push_str("; sysctl kernel.unprivileged_userns_clone=1, or run as root");
    } else {
        why.push_str("; in a container, allow unshare/CLONE_NEWUSER in its seccomp profile");
    }
    Err(why)
}

/// Which cgroup hierarchies are mounted and which controllers they offer.
fn cgroup_summary() -> Result<String, String> {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo")
        .map_err(|e| format!("/proc/self/mountinfo: {e}"))?;
    let wanted = ["memory", "pids", "cpu"];
    let mut v1 = Vec::new();
    let mut v2 = None;
    for line in mounts.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let mount_point = left.split(' ').nth(4).unwrap_or("");
        let mut r = right.split(' ');
        match r.next() {
            Some("cgroup2") => {
                let ctl =
                    std::fs::read_to_string(Path::new(mount_point).join("cgroup.controllers"))
                        .unwrap_or_default();
                let have: Vec<&str> = wanted
                    .iter()
                    .copied()
                    .filter(|w| ctl.split_whitespace().any(|c| c == *w))
                    .collect();
                v2 = Some(have.join(", "));
            }
            Some("cgroup") => {
                let opts = r.nth(1).unwrap_or("");
                for w in wanted {
                    if opts.split(',').any(|o| o == w) && !v1.contains(&w) {
                        v1.push(w);
                    }
                }
            }
            _ => {}
        }
    }
    match (v1.is_empty(), v2) {
        (false, _) => Ok(format!("v1: {}", v1.join(", "))),
        (true, Some(c)) if !c.is_empty() => Ok(format!("v2: {c}")),
        _ => Err("no cgroup memory/pids/cpu controllers: instances run without those limits (mount cgroup2 with the controllers enabled)".into()),
    }
}

fn dev_kvm() -> Result<String, String> {
    let p = Path::new("/dev/kvm");
    if !p.exists() {
        return Err(
            "/dev/kvm does not exist: load kvm_intel or kvm_amd (and enable VT-x/AMD-V)".into(),
        );
    }
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .map(|_| {
            let pvm = Path::new("/sys/module/kvm_pvm").exists();
            format!(
                "opens read-write{}",
                if pvm { " (module kvm_pvm)" } else { "" }
            )
        })
        .map_err(|e| format!("/dev/kvm: {e}: add this user to group kvm, or run as root"))
}

/// What is built in `<state>/cache/guest`.
fn guest_images(state_dir: &Path) -> Check {
    let dir = images::cache_dir(state_dir);
    let mut runtime = 0;
    let mut initramfs = 0;
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if n.starts_with("runtime-") && n.ends_with(".ext4") {
            runtime += 1;
        } else if n.starts_with("initramfs-") && n.ends_with(".cpio") {
            initramfs += 1;
        }
    }
    if runtime > 0 && initramfs > 0 {
        check(
            "guest images",
            true,
            format!(
                "{runtime} runtime image(s), {initramfs} initramfs in {}",
                dir.display()
            ),
        )
    } else {
        check(
            "guest images",
            true,
            format!(
                "not built yet in {}; `hearth serve --backend qemu` builds them at start",
                dir.display()
            ),
        )
    }
}

fn version_line(bin: &Path) -> Result<String, String> {
    let out = Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(str::to_string)
        .filter(|l| out.status.success() && !l.is_empty())
        .ok_or_else(|| format!("{} --version failed", bin.display()))
}

/// Prints the report; never fails.
pub fn run(state_dir: &Path) -> Result<(), String> {
    for s in report(state_dir) {
        match &s.verdict {
            Some(v) => println!(
                "{:<20} {:<4} {}",
                s.title,
                if v.ok { "yes" } else { "NO" },
                v.detail
            ),
            None => println!("{}", s.title),
        }
        for c in &s.checks {
            println!(
                "  {:<18} {:<4} {}",
                c.name,
                if c.ok { "ok" } else { "NO" },
                c.detail
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_has_a_verdict_for_every_backend() {
        let dir = std::env::temp_dir().join(format!("hearth-doctor-{}", std::process::id()));
        let r = report(&dir);
        let titles: Vec<&str> = r.iter().map(|s| s.title).collect();
        assert_eq!(
            titles,
            [
                "host",
                "process backend",
                "qemu backend",
                "firecracker backend"
            ]
        );
        for s in &r[1..] {
            let v = s.verdict.as_ref().expect("backend verdict");
            assert!(!v.detail.is_empty(), "{}", s.title);
        }
        // Firecracker runs only where KVM can run guests, and says why not.
        let fc = r[3].verdict.as_ref().unwrap();
        if qemu::kvm_usable().is_err() {
            assert!(!fc.ok && fc.detail.contains("KVM"), "{}", fc.detail);
        }
    }
}
