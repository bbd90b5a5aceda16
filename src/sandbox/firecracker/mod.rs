//! The Firecracker backend: every instance is a Firecracker microVM restored
//! from a Full snapshot of a microVM that has already loaded the handler.
//!
//! It boots the same guest as the QEMU backend ([`crate::guest`]: kernel,
//! initramfs with the agent as PID 1, runtime and code drives, read-only),
//! except that the kernel is the ELF `vmlinux` cut out of the bzImage
//! ([`vmlinux`]) and the agent's channel is a vsock port instead of a
//! virtio-serial port.
//!
//! Deploy ([`Backend::prepare`], `snapshot`): `firecracker --api-sock` in a
//! private directory; machine config, boot source, the two drives, the vsock
//! device, `InstanceStart`; hearth connects to the guest's vsock port through
//! Firecracker's Unix socket (`CONNECT`/`OK`), HELLO → READY; `PATCH /vm`
//! Paused; `PUT /snapshot/create` Full into `<fn dir>/fc.state` and
//! `fc.mem`; the template is killed. `<fn dir>/firecracker.json` records
//! what the snapshot was made from.
//!
//! Instance ([`Backend::start`]): a fresh `firecracker` process per restore;
//! `PUT /snapshot/load` (its first request) with the File memory backend —
//! Firecracker maps `fc.mem` MAP_PRIVATE, so clones share its page cache and
//! their writes are copy-on-write; the file is only ever replaced by rename —
//! and a per-instance vsock socket (`vsock_override`), resumed at once; then
//! a new vsock connection (the snapshot reset the old ones; the agent's
//! listener survives) and HELLO with the clock and fresh randomness.
//!
//! Firecracker's working directory is the function directory: the code drive
//! is named relative to it, so the snapshot survives the directory's rename
//! after deploy. Everything writable per instance (API socket, vsock socket,
//! log) lives in a private directory under `<state>/run/firecracker/`,
//! removed with the VMM. A VMM that dies is noticed when its channel closes;
//! its exit status and log tail are logged and the scheduler replaces it.
//!
//! Runtimes: as on the QEMU backend, Node.js functions boot the runtime
//! drive and `provided` and `python3` functions the userland drive
//! ([`images::RuntimeDrives`]) with `hearth.api=<runtime>` on the kernel
//! command line ([`crate::guest::runtime_api_arg`]); the agent's READY, and
//! so the snapshot, comes once their bootstrap first polls `/next`, and a
//! restored clone continues from that poll.
//!
//! Without the jailer each VMM runs in a CPU cgroup of its own with the
//! instance CPU contract ([`crate::sandbox::vmcgroup`]). With `--jailer`
//! every VMM runs under Firecracker's jailer instead: chroot, own uid,
//! cgroup (the same CPU contract), new PID namespace ([`jail`]).
//!
//! Parts: `api` (request bodies and the API client), `vmm` (one process),
//! `vsock` (the host end of the channel), `snapshot` (making and checking a
//! function's snapshot), `vmlinux` (the ELF kernel), `jail` (the jailer).

mod api;
pub mod jail;
mod memory;
mod snapshot;
mod uffd;
mod vmlinux;
mod vmm;
mod vsock;
mod workset;

use std::collections::HashMap;
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use vmm::VmmError;

use super::boot_gate::BootGate;
use super::vmcgroup::{self, VmmCgroup};
use super::vmfiles::{prefetch, private_run_dir, rss_anon_bytes, snapshot_bytes_max};
use super::{
    handshake, Backend, Endpoint, InitLogs, Instance, InstanceCpus, SetupError, StartError,
};
use crate::config::{FcMemory, ServeConfig};
use crate::guest::images::{self, Guest, RuntimeDrives};
use crate::runtime::RuntimeKind;
use crate::spec::FunctionSpec;
use crate::util::program::find_program;
use jail::Jail;
use memory::{UffdMemory, WorkSets};
use snapshot::{in_vm, read_meta, SnapshotMeta, META_FILE};
use vmm::{JailedSpawn, Vmm};

/// From Firecracker spawn to READY of a restored instance (generous: nested
/// under software emulation on a loaded host a restore took 20 s).
pub const RESTORE_TIMEOUT: Duration = Duration::from_secs(90);
/// The oldest release with everything used here (`vsock_override` on load).
pub const VERSION_MIN: (u32, u32) = (1, 16);
/// Longest VMM id [`Inner::vm_dir`] makes that a jail's socket paths are
/// sized for: `<16 hex>-<role><n>` with n below 10^10 (longer ones fail the
/// spawn's own path check).
const VM_ID_BYTES_MAX: usize = 16 + 2 + 10;

/// `$HEARTH_FIRECRACKER`, `firecracker` on PATH, or where
/// `tools/fetch-firecracker.sh` installs it.
pub fn find_firecracker() -> Result<PathBuf, String> {
    find_installed("HEARTH_FIRECRACKER", "firecracker")
}

/// `$HEARTH_JAILER`, `jailer` on PATH, or next to the fetched firecracker.
pub fn find_jailer() -> Result<PathBuf, String> {
    find_installed("HEARTH_JAILER", "jailer")
}

/// Where `tools/fetch-firecracker.sh` puts the binaries by default.
pub const FETCH_DIR: &str = "/var/cache/hearth/firecracker";

fn find_installed(env: &str, name: &str) -> Result<PathBuf, String> {
    if let Some(p) = find_program(env, name) {
        return Ok(p);
    }
    let dir = std::env::var_os("HEARTH_FIRECRACKER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(FETCH_DIR));
    let p = dir.join(name);
    if p.is_file() {
        return Ok(p);
    }
    Err(format!(
        "{name} not found (not in {env}, PATH or {}): run tools/fetch-firecracker.sh",
        dir.display()
    ))
}

/// The version `firecracker --version` prints, e.g. "v1.16.1", checked
/// against [`VERSION_MIN`].
pub fn firecracker_version(bin: &Path) -> Result<String, String> {
    let out = std::process::Command::new(bin)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", bin.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("Firecracker "))
        .map(|v| v.trim().to_string())
        .filter(|_| out.status.success())
        .ok_or_else(|| format!("{} --version printed {:?}", bin.display(), text.trim()))?;
    match parse_version(&version) {
        Some(v) if v >= VERSION_MIN => Ok(version),
        Some(_) => Err(format!(
            "firecracker {version} is too old: v{}.{} or newer is needed (tools/fetch-firecracker.sh)",
            VERSION_MIN.0, VERSION_MIN.1
        )),
        None => Err(format!("cannot read firecracker version {version:?}")),
    }
}

/// `"v1.16.1"` → `(1, 16)`.
pub fn parse_version(v: &str) -> Option<(u32, u32)> {
    let mut parts = v.strip_prefix('v')?.split(['.', '-']);
    Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
}

/// Whether the guest kernel can be booted by Firecracker (an ELF kernel, or
/// a bzImage whose payload is decoded here), for `hearth doctor`.
pub fn guest_kernel_report(state_dir: &Path) -> Result<String, String> {
    if let Some(p) = std::env::var_os("HEARTH_VMLINUX") {
        return Ok(format!("HEARTH_VMLINUX={}", Path::new(&p).display()));
    }
    let k = crate::guest::kernel::locate(state_dir).map_err(|e| e.to_string())?;
    let image = fs::read(&k.image).map_err(|e| format!("{}: {e}", k.image.display()))?;
    let elf = vmlinux::extract(&image).map_err(|e| format!("{}: {e}", k.image.display()))?;
    Ok(format!(
        "{} (ELF vmlinux of {} MiB extracted from its payload)",
        k.image.display(),
        elf.len() >> 20
    ))
}

/// An instance: a restored microVM and the host end of its channel.
pub struct FirecrackerInstance {
    vmm: Vmm,
    channel: Option<OwnedFd>,
    /// With `--fc-memory uffd`: hearth serves its memory (dropped after the VMM).
    memory: Option<UffdMemory>,
}

impl Instance for FirecrackerInstance {
    fn take_endpoint(&mut self) -> Option<Endpoint> {
        self.channel.take().map(Endpoint::Channel)
    }
    fn kill(&mut self) {
        self.vmm.kill();
    }
    fn destroy(self: Box<Self>) {
        let FirecrackerInstance {
            vmm,
            channel,
            memory,
        } = *self;
        drop(channel);
        drop(vmm);
        drop(memory);
    }
    fn answered(&mut self) {
        if let Some(m) = &mut self.memory {
            m.answered();
        }
    }
    fn memory_bytes(&self) -> Option<u64> {
        rss_anon_bytes(self.vmm.pid())
    }
}

struct Inner {
    firecracker: PathBuf,
    version: String,
    guest: Guest,
    /// The runtime drive of each runtime (the userland image built on first use).
    drives: RuntimeDrives,
    vmlinux: PathBuf,
    /// Parent of the VMMs' private directories.
    run_dir: PathBuf,
    seq: AtomicU64,
    /// One snapshot per function, loaded or (re)built under its lock.
    slots: Mutex<HashMap<String, Arc<Mutex<Option<SnapshotMeta>>>>>,
    /// One template boots at a time (see [`BootGate`]).
    template_gate: BootGate,
    /// Log the phases of every restore (`HEARTH_FIRECRACKER_TRACE=1`).
    trace: bool,
    /// `--jailer`: every VMM runs in a jail of its own.
    jail: Option<Jail>,
    /// `--fc-memory`.
    memory: FcMemory,
    /// Working sets of the functions (Uffd restores).
    worksets: WorkSets,
    /// An unjailed VMM started without its CPU cgroup was reported.
    cgroup_warned: AtomicBool,
}

/// See the module documentation.
pub struct FirecrackerBackend {
    inner: Arc<Inner>,
}

impl FirecrackerBackend {
    /// Finds Firecracker and the kernel, checks KVM, builds the shared guest
    /// images and the ELF kernel.
    pub fn new(cfg: &ServeConfig) -> Result<FirecrackerBackend, SetupError> {
        let firecracker = find_firecracker().map_err(SetupError::Host)?;
        let version = firecracker_version(&firecracker).map_err(SetupError::Host)?;
        super::qemu::kvm_usable()
            .map_err(|why| SetupError::Host(format!("firecracker needs KVM: {why}")))?;
        let guest = images::prepare_guest(&cfg.state_dir).map_err(SetupError::Guest)?;
        let vmlinux = vmlinux::ensure(&guest.kernel.image, &images::cache_dir(&cfg.state_dir))
            .map_err(|m| SetupError::Host(format!("guest kernel for firecracker: {m}")))?;
        // One server per state directory: a second one would clear the first's VMM directories.
        // VMs of an earlier server are gone (they die with it); so are their
        // directories. Socket paths must fit sun_path, else the dir is in /tmp.
        let preferred = cfg.state_dir.join("run").join("firecracker");
        let run_dir = private_run_dir(&preferred, "fc").map_err(|err| SetupError::Io {
            what: format!("create the run directory for {}", preferred.display()),
            err,
        })?;
        let jail = if cfg.jailer {
            let jailer = find_jailer().map_err(SetupError::Host)?;
            // A jailed VMM is orphaned by the jailer; hearth must inherit it to reap it.
            super::process::set_subreaper();
            let shared = [
                vmlinux.as_path(),
                guest.initramfs.as_path(),
                guest.runtime_image.as_path(),
            ];
            let j = Jail::new(jailer, &cfg.state_dir, VM_ID_BYTES_MAX, &shared)
                .map_err(SetupError::Host)?;
            eprintln!("hearth: firecracker: {}", j.describe());
            if let Some(why) = j.cpu_unlimited() {
                eprintln!(
                    "hearth: firecracker: warning: jailed VMMs run without a CPU limit: {why}"
                );
            }
            Some(j)
        } else {
            vmcgroup::sweep_in_background();
            None
        };
        eprintln!(
            "hearth: firecracker {version} ({}), kernel {} as {}, run dir {}, memory {:?}",
            firecracker.display(),
            guest.kernel.source,
            vmlinux.display(),
            run_dir.display(),
            cfg.fc_memory
        );
        Ok(FirecrackerBackend {
            inner: Arc::new(Inner {
                firecracker,
                version,
                drives: RuntimeDrives::new(&cfg.state_dir, &guest),
                guest,
                vmlinux,
                run_dir,
                seq: AtomicU64::new(0),
                slots: Mutex::new(HashMap::new()),
                template_gate: BootGate::new(snapshot::TEMPLATE_BOOT_HOLD),
                trace: std::env::var_os("HEARTH_FIRECRACKER_TRACE").is_some_and(|v| v != "0"),
                jail,
                memory: cfg.fc_memory,
                worksets: WorkSets::default(),
                cgroup_warned: AtomicBool::new(false),
            }),
        })
    }
}

impl Inner {
    /// A fresh private directory for a VMM and the `--id` Firecracker gets
    /// (letters, digits and `-`, at most 64).
    fn vm_dir(&self, id: &str, role: &str) -> (PathBuf, String) {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        let name = format!("{id}-{role}{n}");
        (self.run_dir.join(&name), name)
    }

    /// Starts a VMM for `spec` (`role` "t": its template), directly with
    /// `cwd` as working directory, or jailed with `files` linked into its root.
    fn spawn_vmm(
        &self,
        spec: &FunctionSpec,
        role: &str,
        cwd: &Path,
        label: String,
        core: Option<usize>,
        files: &[&Path],
    ) -> Result<Vmm, VmmError> {
        let (vm_dir, vm_id) = self.vm_dir(&spec.id, role);
        match &self.jail {
            None => {
                let memory_mb = super::qemu::guest_memory_mb(spec);
                let limits = vmcgroup::limits(memory_mb, vmcgroup::VMM_OVERHEAD_MB);
                let cgroup =
                    VmmCgroup::create("firecracker", &spec.id, limits, &self.cgroup_warned);
                Vmm::spawn(&self.firecracker, &vm_dir, cwd, &vm_id, label, core, cgroup)
            }
            Some(jail) => {
                let s = JailedSpawn {
                    jail,
                    firecracker: &self.firecracker,
                    files,
                    guest_memory_mb: super::qemu::guest_memory_mb(spec),
                };
                Vmm::spawn_jailed(&s, &vm_id, label, core)
            }
        }
    }

    fn slot(&self, id: &str) -> Arc<Mutex<Option<SnapshotMeta>>> {
        self.slots
            .lock()
            .unwrap()
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    /// Restores a microVM from the function's snapshot and makes it ready.
    fn restore_instance(
        &self,
        spec: &FunctionSpec,
        dir: &Path,
        core: Option<usize>,
    ) -> Result<(FirecrackerInstance, InitLogs), StartError> {
        let meta = self.snapshot(spec, dir)?;
        let started = Instant::now();
        let deadline = started + RESTORE_TIMEOUT;
        let (state, mem) = (dir.join(&meta.state), dir.join(&meta.mem));
        let code = dir.join(&meta.code_image);
        let files = [&state, &mem, &meta.runtime_image, &code].map(PathBuf::as_path);
        let label = format!("instance of {}", spec.id);
        let mut vmm = self.spawn_vmm(spec, "", dir, label, core, &files)?;
        let fail = |e: VmmError, vmm: &Vmm| in_vm("restore", e, vmm);
        let (uds_vm, uds) = vmm.vsock_paths();
        let mut api = vmm.api(deadline).map_err(|e| fail(e, &vmm))?;
        let memory = self
            .load_snapshot(&mut api, &mut vmm, &spec.id, dir, &meta, &uds_vm, deadline)
            .map_err(|e| fail(e, &vmm))?;
        drop(api);
        let resumed_ms = started.elapsed().as_millis();
        let channel = vsock::connect(&uds, vsock::AGENT_PORT, deadline, || {
            vmm.check_alive()
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
        .map_err(|e| fail(VmmError::Vsock(e), &vmm))?;
        let left = deadline.saturating_duration_since(Instant::now());
        let logs = match handshake::hello(channel.as_fd(), spec, left) {
            Ok((_, logs)) => logs,
            Err(e @ StartError::Init { .. }) => return Err(e),
            Err(e) => return Err(in_vm("restore", e, &vmm)),
        };
        if self.trace {
            let faults = memory
                .as_ref()
                .map(|m| format!(", {} page faults served", m.faults()))
                .unwrap_or_default();
            eprintln!(
                "hearth: firecracker: restored {} (pid {}): running after {resumed_ms} ms, ready after {} ms{faults}",
                spec.id,
                vmm.pid(),
                started.elapsed().as_millis()
            );
        }
        Ok((
            FirecrackerInstance {
                vmm,
                channel: Some(OwnedFd::from(channel)),
                memory,
            },
            logs,
        ))
    }
}

impl Backend for FirecrackerBackend {
    fn name(&self) -> &'static str {
        "firecracker"
    }

    fn prepare(&self, spec: &FunctionSpec, dir: &Path) -> Result<InitLogs, StartError> {
        let (meta, logs) = self.inner.make_snapshot(spec, dir)?;
        *self.inner.slot(&spec.id).lock().unwrap() = Some(meta);
        Ok(logs)
    }

    fn start(
        &self,
        spec: &FunctionSpec,
        dir: &Path,
        cpus: InstanceCpus,
    ) -> Result<(Box<dyn Instance>, InitLogs), StartError> {
        let (inst, logs) = self.inner.restore_instance(spec, dir, Some(cpus.main))?;
        Ok((Box::new(inst), logs))
    }

    fn restore(&self, spec: &FunctionSpec, dir: &Path) {
        // Check (or rebuild) the snapshot off the start-up path; the first
        // start of this function waits on the slot's lock meanwhile.
        let (inner, spec, dir) = (self.inner.clone(), spec.clone(), dir.to_path_buf());
        std::thread::spawn(move || match inner.snapshot(&spec, &dir) {
            Ok(meta) => prefetch(&dir.join(&meta.mem)),
            Err(e) => eprintln!(
                "hearth: firecracker: function {}: no usable snapshot: {e}",
                spec.id
            ),
        });
    }

    fn runs(&self, _runtime: RuntimeKind) -> bool {
        // Node.js from the runtime image; `provided` and `python3` from the
        // userland image, served the Runtime API by the agent.
        true
    }

    fn prepare_bytes_max(&self, spec: &FunctionSpec, dir: &Path) -> u64 {
        snapshot_bytes_max(dir, super::qemu::guest_memory_mb(spec))
    }

    fn forget(&self, id: &str) {
        self.inner.slots.lock().unwrap().remove(id);
        self.inner.worksets.lock().unwrap().remove(id);
    }

    fn artifacts(&self, dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Ok(meta) = read_meta(dir) {
            out.push(PathBuf::from(meta.code_image));
            out.push(PathBuf::from(meta.state));
            out.push(PathBuf::from(meta.mem));
            out.push(PathBuf::from(META_FILE));
            if dir.join(workset::WS_FILE).is_file() {
                out.push(PathBuf::from(workset::WS_FILE));
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_compared_by_major_and_minor() {
        assert_eq!(parse_version("v1.16.1"), Some((1, 16)));
        assert_eq!(parse_version("v1.17.0-dev"), Some((1, 17)));
        assert_eq!(parse_version("1.16"), None);
        assert!(parse_version("v1.15.9").unwrap() < VERSION_MIN);
        assert!(parse_version("v2.0.0").unwrap() >= VERSION_MIN);
    }

    /// The shared test binaries (or an installed release) report their version.
    #[test]
    fn an_installed_firecracker_reports_a_usable_version() {
        let Ok(bin) = find_firecracker() else {
            eprintln!("skipped: no firecracker installed (tools/fetch-firecracker.sh)");
            return;
        };
        let v = firecracker_version(&bin).unwrap();
        assert!(v.starts_with('v'), "{v}");
    }
}
