//! The QEMU backend: every instance is a microVM restored from a snapshot of
//! a VM that has already loaded the function's handler.
//!
//! Deploy ([`Backend::prepare`]): build the function's code drive, boot a
//! template VM from the shared guest ([`crate::guest`]) whose RAM is a shared
//! mapping of `<fn dir>/vm.ram`, HELLO → READY over the channel, then QMP
//! `stop`, `migrate` with the `x-ignore-shared` capability (so only device
//! state goes into `<fn dir>/vm.snap`, a few hundred KiB; the RAM already is
//! in `vm.ram`), `quit`. `<fn dir>/qemu.json` records what the snapshot was
//! made from.
//!
//! Instance ([`Backend::start`]): a fresh QEMU with the same command line,
//! except that its RAM maps `vm.ram` *privately* (MAP_PRIVATE: instances share
//! the file's page cache, and each one's writes are copy-on-write), and
//! `-incoming defer`; over QMP, the same capability and `migrate-incoming`
//! from `vm.snap`; once the device state is loaded (`paused`), `cont`; HELLO
//! again on the channel (the agent sets the guest clock, the shim answers
//! READY at once). The destination treats its private RAM block as not
//! shared, so it expects no RAM pages and none come: guest memory is exactly
//! the file's contents, faulted in on demand. Copying the RAM through the
//! migration stream instead (the first design) cost 100-300 ms per restore
//! here, mostly in faulting in fresh host memory.
//!
//! Runtimes: Node.js functions boot from the guest's runtime drive; `provided`
//! and `python3` functions from the userland drive ([`images::userland_image`],
//! built when the first one needs it), with `hearth.api=<runtime>` on the
//! kernel command line so the agent serves them the Lambda Runtime API. Their
//! READY, and so the snapshot, comes once the bootstrap first polls `/next`.
//!
//! Channel: a virtio-serial port named `hearth.agent` whose host side is a
//! Unix socket (QEMU 7.2 cannot migrate vhost-user-vsock). Each VM gets a
//! private directory under `<state>/run/qemu/` (sockets, console log),
//! removed with the VM.
//!
//! Confinement: every QEMU (templates and instances) runs under its own
//! seccomp filter (`-sandbox`, see `args::SECCOMP_SANDBOX`) and in a cgroup of
//! its own ([`crate::sandbox::vmcgroup`]): memory up to its guest's RAM plus
//! [`vmm_overhead_mb`] (with software emulation's translation cache capped
//! at [`TCG_TB_SIZE_MB`]), [`crate::sandbox::vmcgroup::VMM_PIDS_MAX`] tasks
//! (its I/O thread pool capped at [`THREAD_POOL_MAX`]), and the instance CPU
//! contract.
//!
//! Acceleration: KVM when the host's KVM can run a standard guest (vmx/svm
//! and not the paravirtualised `kvm_pvm`), else software emulation (TCG),
//! which needs `-M pc` (`-M microvm` hangs in TSC calibration under TCG).
//!
//! This module is the [`Backend`] (instances, restores, the per-function
//! snapshot slots); its parts:
//! - `args`: the QEMU command line as data, and the guest kernel's command line.
//! - `vm`: one QEMU process (spawn, channel, QMP socket, logs, quit), and
//!   the host probes (QEMU binary, KVM).
//! - `snapshot`: making a function's snapshot, `qemu.json`, and whether a
//!   snapshot on disk can still be restored.
//! - `qmp`: the QMP client.

mod args;
mod qmp;
mod snapshot;
mod vm;

use std::collections::HashMap;
use std::fs;
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;

pub use args::{
    guest_memory_mb, vmm_overhead_mb, Accel, Machine, GUEST_DEVICE_WAIT_MS, TCG_TB_SIZE_MB,
    THREAD_POOL_MAX, TMP_MB,
};
pub use vm::{find_qemu, kvm_usable, qemu_version, VmError};

use super::boot_gate::BootGate;
use super::handshake;
use super::vmcgroup::{self, VmmCgroup};
use super::vmfiles::{prefetch, private_run_dir, rss_anon_bytes, snapshot_bytes_max};
use super::{Backend, Endpoint, InitLogs, Instance, InstanceCpus, SetupError, StartError};
use crate::config::ServeConfig;
use crate::guest::images::{self, Guest, RuntimeDrives};
use crate::runtime::RuntimeKind;
use crate::spec::FunctionSpec;
use args::VmPlan;
use snapshot::{ignore_shared, in_vm, read_meta, SnapshotMeta, META_FILE};
use vm::Vm;

/// From QEMU spawn to READY of a restored instance.
pub const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);
/// The same with KVM, which may run nested under emulation (see
/// `snapshot::TEMPLATE_READY_TIMEOUT_KVM`); as the Firecracker backend's.
pub const RESTORE_TIMEOUT_KVM: Duration = Duration::from_secs(90);

/// An instance: a restored VM and the host end of its channel.
pub struct QemuInstance {
    vm: Vm,
    channel: Option<OwnedFd>,
}

impl Instance for QemuInstance {
    fn take_endpoint(&mut self) -> Option<Endpoint> {
        self.channel.take().map(Endpoint::Channel)
    }
    fn kill(&mut self) {
        self.vm.kill();
    }
    fn destroy(self: Box<Self>) {
        let QemuInstance { vm, channel } = *self;
        drop(channel);
        drop(vm);
    }
    fn memory_bytes(&self) -> Option<u64> {
        // Private memory only: pages still shared with the RAM file's
        // page cache are not this instance's cost.
        rss_anon_bytes(self.vm.pid())
    }
    // No `sched_time`: QEMU's threads also emulate devices and timers, so
    // their CPU time says little about the handler (under TCG nothing at
    // all); VMs keep scaling by queueing delay alone.
}

/// One function's snapshot, loaded or (re)built under the lock.
#[derive(Default)]
struct Slot {
    meta: Mutex<Option<SnapshotMeta>>,
}

struct Inner {
    qemu: PathBuf,
    qemu_version: String,
    accel: Accel,
    machine: Machine,
    guest: Guest,
    /// The runtime drive of each runtime (the userland image built on first use).
    drives: RuntimeDrives,
    /// Parent of the VMs' private directories.
    run_dir: PathBuf,
    seq: AtomicU64,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// One template boots at a time (see [`BootGate`]).
    template_gate: BootGate,
    /// Log the phases of every restore (`HEARTH_QEMU_TRACE=1`).
    trace: bool,
    /// A VM started without its cgroup (or part of it) was reported.
    cgroup_warned: AtomicBool,
}

/// See the module documentation.
pub struct QemuBackend {
    inner: Arc<Inner>,
}

impl QemuBackend {
    /// Finds QEMU and the kernel, builds the shared guest images, picks the accelerator.
    pub fn new(cfg: &ServeConfig) -> Result<QemuBackend, SetupError> {
        let qemu = find_qemu().map_err(SetupError::Host)?;
        let qemu_version = qemu_version(&qemu).map_err(SetupError::Host)?;
        let accel = match kvm_usable() {
            Ok(()) => Accel::Kvm,
            Err(why) => {
                eprintln!("hearth: qemu: software emulation (TCG): {why}");
                Accel::Tcg
            }
        };
        let machine = machine_from_env(accel).map_err(SetupError::Host)?;
        let guest = images::prepare_guest(&cfg.state_dir).map_err(SetupError::Guest)?;
        // One server per state directory: a second one would clear the first's VM directories.
        // VMs of an earlier server are gone (they die with it); so are their
        // directories. Socket paths must fit sun_path, else the dir is in /tmp.
        let preferred = cfg.state_dir.join("run").join("qemu");
        let run_dir = private_run_dir(&preferred, "qemu").map_err(|err| SetupError::Io {
            what: format!("create the run directory for {}", preferred.display()),
            err,
        })?;
        vmcgroup::sweep_in_background();
        eprintln!(
            "hearth: qemu: {qemu_version}, -accel {} -M {}, kernel {} ({} modules), run dir {}",
            accel.as_str(),
            machine.as_str(),
            guest.kernel.source,
            guest.kernel.modules.len(),
            run_dir.display()
        );
        Ok(QemuBackend {
            inner: Arc::new(Inner {
                qemu,
                qemu_version,
                accel,
                machine,
                drives: RuntimeDrives::new(&cfg.state_dir, &guest),
                guest,
                run_dir,
                seq: AtomicU64::new(0),
                slots: Mutex::new(HashMap::new()),
                template_gate: BootGate::new(snapshot::TEMPLATE_BOOT_HOLD),
                trace: std::env::var_os("HEARTH_QEMU_TRACE").is_some_and(|v| v != "0"),
                cgroup_warned: AtomicBool::new(false),
            }),
        })
    }

    /// The accelerator in use.
    pub fn accel(&self) -> Accel {
        self.inner.accel
    }
}

/// The machine type `HEARTH_QEMU_MACHINE` names (default `pc`).
fn machine_from_env(accel: Accel) -> Result<Machine, String> {
    let Some(name) = std::env::var_os("HEARTH_QEMU_MACHINE") else {
        return Ok(Machine::default());
    };
    let name = name.to_string_lossy();
    let machine = Machine::parse(&name)
        .ok_or_else(|| format!("HEARTH_QEMU_MACHINE={name}: expected pc, q35 or microvm"))?;
    if machine == Machine::Microvm && accel == Accel::Tcg {
        return Err(
            "HEARTH_QEMU_MACHINE=microvm needs KVM (under software emulation it hangs in TSC calibration)"
                .into(),
        );
    }
    Ok(machine)
}

impl Inner {
    fn vm_dir(&self, id: &str, role: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.run_dir.join(format!("{id}-{role}{n}"))
    }

    /// The cgroup for a VM of function `id` run as `plan` (none if the host
    /// has no usable cgroup hierarchy: reported once).
    fn cgroup(&self, id: &str, plan: &VmPlan<'_>) -> Option<VmmCgroup> {
        let limits = vmcgroup::limits(plan.memory_mb, vmm_overhead_mb(plan.accel));
        VmmCgroup::create("qemu", id, limits, &self.cgroup_warned)
    }

    /// The runtime drive for `spec`'s runtime: Node.js's own image, or
    /// the userland image of the others (built on first use).
    fn runtime_image(&self, spec: &FunctionSpec) -> Result<PathBuf, StartError> {
        self.drives
            .for_runtime(spec.runtime)
            .map_err(StartError::Image)
    }

    fn slot(&self, id: &str) -> Arc<Slot> {
        self.slots
            .lock()
            .unwrap()
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    /// Restores a VM from the function's snapshot and makes it ready.
    fn restore_instance(
        &self,
        spec: &FunctionSpec,
        dir: &Path,
        core: Option<usize>,
    ) -> Result<(QemuInstance, InitLogs), StartError> {
        let meta = self.snapshot(spec, dir)?;
        let started = Instant::now();
        let deadline = started
            + match self.accel {
                Accel::Kvm => RESTORE_TIMEOUT_KVM,
                Accel::Tcg => RESTORE_TIMEOUT,
            };
        let vm_dir = self.vm_dir(&spec.id, "");
        let snap_path = dir.join(&meta.snapshot);
        let snap = fs::File::open(&snap_path)
            .map_err(|e| StartError::io(format!("snapshot {}", snap_path.display()), e))?;
        let code_image = dir.join(&meta.code_image);
        let ram = dir.join(&meta.ram);
        let plan = VmPlan {
            accel: meta.accel,
            machine: meta.machine,
            memory_mb: meta.memory_mb,
            kernel: &meta.kernel,
            initramfs: &meta.initramfs,
            append: &meta.append,
            runtime_image: &meta.runtime_image,
            code_image: &code_image,
            dir: &vm_dir,
            ram: &ram,
            restore: true,
        };
        let cgroup = self.cgroup(&spec.id, &plan);
        let mut vm = Vm::spawn(&self.qemu, &plan, core, cgroup, Some(&snap))?;
        let fail = |e: VmError, vm: &Vm| in_vm("restore", e, vm);
        // Connected before the guest runs, so nothing it writes can be dropped.
        let channel = vm.connect_channel(deadline).map_err(|e| fail(e, &vm))?;
        let mut q = vm.qmp(deadline).map_err(|e| fail(e, &vm))?;
        // QEMU inherited the snapshot's descriptor under the same number.
        let uri = format!("fd:{}", std::os::fd::AsRawFd::as_raw_fd(&snap));
        q.execute("migrate-set-capabilities", Some(ignore_shared()), deadline)
            .and_then(|_| q.execute("migrate-incoming", Some(json!({ "uri": uri })), deadline))
            .map_err(|e| fail(VmError::Qmp(e), &vm))?;
        drop(snap);
        loop {
            let status = q.status(deadline).map_err(|e| fail(VmError::Qmp(e), &vm))?;
            match status.as_str() {
                "paused" => {
                    q.execute("cont", None, deadline)
                        .map_err(|e| fail(VmError::Qmp(e), &vm))?;
                    break;
                }
                "running" => break,
                "inmigrate" | "prelaunch" | "restore-vm" => {
                    if Instant::now() >= deadline {
                        return Err(fail(
                            VmError::Migration("snapshot not loaded in time".into()),
                            &vm,
                        ));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                other => return Err(fail(VmError::Migration(format!("VM is {other}")), &vm)),
            }
        }
        drop(q);
        let resumed_ms = started.elapsed().as_millis();
        let left = deadline.saturating_duration_since(Instant::now());
        let logs = match handshake::hello(channel.as_fd(), spec, left) {
            Ok((_, logs)) => logs,
            Err(e @ StartError::Init { .. }) => return Err(e),
            Err(e) => return Err(in_vm("restore", e, &vm)),
        };
        if self.trace {
            eprintln!(
                "hearth: qemu: restored {} (pid {}): running after {resumed_ms} ms, ready after {} ms",
                spec.id,
                vm.pid(),
                started.elapsed().as_millis()
            );
        }
        Ok((
            QemuInstance {
                vm,
                channel: Some(OwnedFd::from(channel)),
            },
            logs,
        ))
    }
}

impl Backend for QemuBackend {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn prepare(&self, spec: &FunctionSpec, dir: &Path) -> Result<InitLogs, StartError> {
        let (meta, logs) = self.inner.make_snapshot(spec, dir)?;
        *self.inner.slot(&spec.id).meta.lock().unwrap() = Some(meta);
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
            Ok(meta) => prefetch(&dir.join(&meta.ram)),
            Err(e) => eprintln!(
                "hearth: qemu: function {}: no usable snapshot: {e}",
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
        snapshot_bytes_max(dir, guest_memory_mb(spec))
    }

    fn forget(&self, id: &str) {
        self.inner.slots.lock().unwrap().remove(id);
    }

    fn artifacts(&self, dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Ok(meta) = read_meta(dir) {
            out.push(PathBuf::from(meta.code_image));
            out.push(PathBuf::from(meta.snapshot));
            out.push(PathBuf::from(meta.ram));
            out.push(PathBuf::from(META_FILE));
        }
        out
    }
}
