//! The cgroup of one VMM process (QEMU; Firecracker without the jailer, whose
//! cgroup the jailer makes from the same [`limits`]): a memory limit of its
//! guest's RAM plus an allowance for the VMM itself, a task limit, and the CPU
//! contract of a process sandbox ([`INSTANCE_CPU_MILLICORES`] as the quota).
//! The memory and task limits bound what a guest (or a VMM bug) can make the
//! host-side process take; killed at the limit, the VMM is one dead instance.
//! Pinned to its worker's core, a spinning guest competes with the other
//! tenants there as one entity, whatever number of threads its VMM runs. VMs
//! have no standbys, so no VMM starts at the background weight.
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

/// Memory a VMM may use beyond its guest's RAM: its own heap, page tables,
/// libraries, and the page cache of the files it reads and writes (clean
/// cache is reclaimed before the limit kills). QEMU under software emulation
/// adds its translation cache (`qemu::vmm_overhead_mb`).
pub const VMM_OVERHEAD_MB: u32 = 128;
/// Tasks (threads) of one VMM: Firecracker runs a handful, QEMU 4 to 6 plus
/// its block I/O pool (capped at `qemu::THREAD_POOL_MAX`).
pub const VMM_PIDS_MAX: u32 = 64;

/// The limits of a VMM whose guest has `guest_memory_mb` of RAM and which may
/// use `overhead_mb` more of its own.
pub fn limits(guest_memory_mb: u32, overhead_mb: u32) -> Limits {
    Limits {
        memory_bytes: (u64::from(guest_memory_mb) + u64::from(overhead_mb)) << 20,
        pids_max: VMM_PIDS_MAX,
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
    /// Makes the group of a VMM of function `id` with `limits` ([`limits`]).
    /// Without one (no usable hierarchy, no permission) the VMM runs without
    /// limits; with a partial one (a controller missing) without those:
    /// `backend`'s first such failure is reported on stderr (`warned`
    /// remembers it).
    pub fn create(
        backend: &str,
        id: &str,
        limits: Limits,
        warned: &AtomicBool,
    ) -> Option<VmmCgroup> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let name = cgroup::server_group_name(id, std::process::id(), n);
        let (group, mut warnings) = cgroup::create(&name, limits);
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
                "VMMs run without memory, pids or CPU limits (no usable cgroup hierarchy)"
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

    /// Whether the kernel killed the VMM at its memory limit.
    pub fn oom_killed(&self) -> bool {
        self.group.oom_killed()
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
        let l = limits(256, VMM_OVERHEAD_MB);
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

    /// Its memory limit is the guest's RAM plus the allowance, in bytes.
    #[test]
    fn a_vmm_may_use_its_guest_memory_plus_its_overhead() {
        let l = limits(256, 384);
        assert_eq!(l.memory_bytes, 640 << 20);
        assert_eq!(l.pids_max, VMM_PIDS_MAX);
        assert_eq!(limits(1024, VMM_OVERHEAD_MB).memory_bytes, 1152 << 20);
    }

    /// The value of `file` in the first of the group's directories that has it.
    fn read_limit(cg: &VmmCgroup, file: &str) -> Option<String> {
        cg.group
            .dirs()
            .iter()
            .find_map(|d| std::fs::read_to_string(d.join(file)).ok())
            .map(|v| v.trim().to_string())
    }

    /// As root with cgroup controllers: the group exists with the memory,
    /// pids and CPU limits written, a child made with its `pre_exec` starts
    /// inside it, and the group goes when dropped after the child.
    #[test]
    fn a_child_joins_its_vmm_cgroup_before_exec() {
        use std::os::unix::process::CommandExt;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        let warned = AtomicBool::new(false);
        let l = limits(256, VMM_OVERHEAD_MB);
        let Some(cg) = VmmCgroup::create("test", "0123456789abcdef", l, &warned) else {
            eprintln!("skipped: no usable cgroup hierarchy here");
            return;
        };
        let (Some(dir), Some(_), Some(_)) = (cg.cpu_dir(), &cg.group.memory, &cg.group.pids) else {
            eprintln!("skipped: no memory, pids and cpu controllers here");
            return;
        };
        let dir = dir.to_path_buf();
        let quota = read_limit(&cg, "cpu.max").or_else(|| read_limit(&cg, "cpu.cfs_quota_us"));
        assert!(quota.as_deref().unwrap().starts_with("100000"), "{quota:?}");
        let memory =
            read_limit(&cg, "memory.max").or_else(|| read_limit(&cg, "memory.limit_in_bytes"));
        assert_eq!(memory, Some(((256 + 128) << 20).to_string()));
        assert_eq!(read_limit(&cg, "pids.max"), Some("64".to_string()));
        let fds = cg.procs_fds();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("5");
        // SAFETY: the closure only writes to descriptors kept open by `cg`.
        unsafe { cmd.pre_exec(move || VmmCgroup::pre_exec(&fds)) };
        let mut child = cmd.spawn().unwrap();
        for d in cg.group.dirs() {
            let procs = std::fs::read_to_string(d.join("cgroup.procs")).unwrap();
            assert!(
                procs.lines().any(|l| l == child.id().to_string()),
                "{}: {procs}",
                d.display()
            );
        }
        child.kill().unwrap();
        child.wait().unwrap();
        let dirs = cg.group.dirs();
        drop(cg);
        assert!(!dir.exists(), "{} outlived its VMM", dir.display());
        for d in dirs {
            assert!(!d.exists(), "{} outlived its VMM", d.display());
        }
    }
}
