//! The CPU cgroup of one VMM process (QEMU; Firecracker without the jailer,
//! whose cgroup the jailer makes from the same [`cgroup::cpu_settings`]):
//! the CPU contract of a process sandbox, [`INSTANCE_CPU_MILLICORES`] as
//! `cpu.max`. Pinned to its worker's core, a spinning guest then competes
//! with the other tenants there as one entity, whatever number of threads
//! its VMM runs. VMs have no standbys, so no VMM starts at the background
//! weight.
//!
//! The child joins its group between fork and exec ([`VmmCgroup::pre_exec`]):
//! the VMM never runs outside it. Groups are named like a process sandbox's
//! ([`cgroup::server_group_name`]), so a killed server's are swept the same
//! way at the next start ([`sweep_in_background`]).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use super::process::cgroup::{self, Group, Limits};
use super::INSTANCE_CPU_MILLICORES;

/// Longest wait at start-up (in the background) for a killed server's VMMs to
/// leave their groups.
const SWEEP_WAIT: Duration = Duration::from_secs(5);

/// The limits a VMM's group is made with (only the cpu ones apply).
pub fn limits() -> Limits {
    Limits {
        memory_bytes: 0,
        pids_max: 0,
        cpu_millicores: INSTANCE_CPU_MILLICORES,
        cpu_background: false,
    }
}

/// A VMM's cgroup; removed when dropped (drop it after the VMM was reaped).
#[derive(Debug)]
pub struct VmmCgroup {
    group: Group,
    /// `cgroup.procs` of the group, for the child to join before exec.
    procs: Vec<File>,
}

impl VmmCgroup {
    /// Makes the group of a VMM of function `id`. Without one (no cpu
    /// controller, no permission) the VMM runs without a CPU limit: `backend`'s
    /// first such failure is reported on stderr (`warned` remembers it).
    pub fn create(backend: &str, id: &str, warned: &AtomicBool) -> Option<VmmCgroup> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = cgroup::server_group_name(id, std::process::id(), n);
        let (group, mut warnings) = cgroup::create_cpu(&name, limits());
        let made = group.and_then(|group| match group.open_procs() {
            Ok(procs) => Some(VmmCgroup { group, procs }),
            Err(e) => {
                warnings.push(format!("cannot join it: {e}"));
                let _ = group.remove();
                None
            }
        });
        if !warnings.is_empty() && !warned.swap(true, Ordering::Relaxed) {
            let what = if made.is_some() {
                "VMM cgroups are incomplete"
            } else {
                "VMMs run without a CPU limit (no usable cgroup cpu controller)"
            };
            eprintln!(
                "hearth: {backend}: {what}: {} (further warnings of this kind are not shown)",
                warnings.join("; ")
            );
        }
        made
    }

    /// The descriptors [`VmmCgroup::pre_exec`] writes to; the child must keep them
    /// until then (they are close-on-exec).
    pub fn procs_fds(&self) -> Vec<RawFd> {
        self.procs.iter().map(AsRawFd::as_raw_fd).collect()
    }

    /// In the child between fork and exec: joins the group whose descriptors are
    /// `fds` ([`VmmCgroup::procs_fds`]). Async-signal-safe.
    pub fn pre_exec(fds: &[RawFd]) -> std::io::Result<()> {
        cgroup::join_self(fds)
    }

    /// The group's directory of the cpu controller.
    pub fn cpu_dir(&self) -> Option<&Path> {
        self.group.cpu.as_deref()
    }
}

impl Drop for VmmCgroup {
    fn drop(&mut self) {
        if let Err(e) = self.group.remove() {
            eprintln!("hearth: cannot remove a VMM cgroup: {e}");
        }
    }
}

/// Removes the groups a killed server left behind, off the start-up path.
pub fn sweep_in_background() {
    let spawned = std::thread::Builder::new()
        .name("hearth-sweep".into())
        .spawn(|| {
            let swept = cgroup::sweep_stale(SWEEP_WAIT);
            if swept > 0 {
                eprintln!("hearth: removed {swept} cgroup(s) left by a previous run");
            }
        });
    if let Err(e) = spawned {
        eprintln!("hearth: cannot start the cgroup sweeper: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use cgroup::Version;

    /// A VMM gets the process sandbox's CPU contract: one core of quota and the
    /// default weight (nothing starts in the background).
    #[test]
    fn a_vmm_gets_the_instance_cpu_quota_at_the_default_weight() {
        let l = limits();
        assert_eq!(
            cgroup::cpu_settings(Version::V2, &l),
            [("cpu.max", "100000 100000".to_string())]
        );
        assert_eq!(
            cgroup::cpu_settings(Version::V1, &l),
            [
                ("cpu.cfs_period_us", "100000".to_string()),
                ("cpu.cfs_quota_us", "100000".to_string())
            ]
        );
    }

    /// As root with a cpu controller: the group exists with the quota written,
    /// a child made with its `pre_exec` starts inside it, and the group goes
    /// when dropped after the child.
    #[test]
    fn a_child_joins_its_vmm_cgroup_before_exec() {
        use std::os::unix::process::CommandExt;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let warned = AtomicBool::new(false);
        let Some(cg) = VmmCgroup::create("test", "0123456789abcdef", &warned) else {
            eprintln!("skipped: no cgroup cpu controller here");
            return;
        };
        let dir = cg.cpu_dir().expect("a cpu directory").to_path_buf();
        let quota = match std::fs::read_to_string(dir.join("cpu.max")) {
            Ok(max) => max,
            Err(_) => std::fs::read_to_string(dir.join("cpu.cfs_quota_us")).unwrap(),
        };
        assert!(quota.starts_with("100000"), "{quota}");
        let fds = cg.procs_fds();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("5");
        // SAFETY: the closure only writes to descriptors kept open by `cg`.
        unsafe { cmd.pre_exec(move || VmmCgroup::pre_exec(&fds)) };
        let mut child = cmd.spawn().unwrap();
        let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap();
        assert!(
            procs.lines().any(|l| l == child.id().to_string()),
            "{procs}"
        );
        child.kill().unwrap();
        child.wait().unwrap();
        drop(cg);
        assert!(!dir.exists(), "{} outlived its VMM", dir.display());
    }
}
