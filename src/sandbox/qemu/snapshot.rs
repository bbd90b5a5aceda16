//! A function's snapshot: a template VM that has loaded the handler, stopped
//! and migrated to a file (device state in `vm.snap`; guest RAM is already in
//! `vm.ram`), described by `qemu.json` ([`SnapshotMeta`]); and the check that
//! a snapshot on disk still matches this server, else it is rebuilt.

use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;

use super::args::{guest_memory_mb, kernel_cmdline, Accel, Machine, VmPlan};
use super::vm::{Vm, VmError};
use super::Inner;
use crate::guest::images;
use crate::sandbox::vmfiles::{publish, write_atomic, RemoveOnDrop};
use crate::sandbox::{handshake, InitLogs, StartError};
use crate::spec::FunctionSpec;
use crate::util::time::unix_time_ms;

/// Boot + handler load in a template VM under software emulation (slow: ~8 s
/// boot, Node ~37x slower than native).
pub const TEMPLATE_READY_TIMEOUT_TCG: Duration = Duration::from_secs(90);
/// The same with KVM, which may itself run nested in an emulated machine
/// (the test host of `tests/nested_kvm.rs`), where guests run at emulation
/// speed and every VM exit costs about a millisecond: an L2 kernel there was
/// 14–20 s into its boot (guest time) after 40 s, so READY can take minutes
/// on a loaded host. As generous as the Firecracker backend's.
pub const TEMPLATE_READY_TIMEOUT_KVM: Duration = Duration::from_secs(300);
/// Longest a template holds the boot gate ([`crate::sandbox::boot_gate`]) and
/// so delays the next function's template: about twice a boot under
/// emulation (4–7 s measured), whether or not its handler is done loading.
pub const TEMPLATE_BOOT_HOLD: Duration = Duration::from_secs(15);
/// Writing the snapshot.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Device state, guest RAM and their description in the function's directory.
pub const SNAPSHOT_FILE: &str = "vm.snap";
pub const RAM_FILE: &str = "vm.ram";
pub const META_FILE: &str = "qemu.json";
/// Bumped when [`SnapshotMeta`] or the VM command line changes incompatibly.
const META_FORMAT: u32 = 2;

/// What a function's snapshot was made from (`qemu.json`). A snapshot is
/// only restored with exactly these inputs; anything else rebuilds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    pub format: u32,
    pub qemu_version: String,
    pub accel: Accel,
    /// Absent in snapshots made before machine types could be chosen: `pc`.
    #[serde(default)]
    pub machine: Machine,
    pub memory_mb: u32,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub runtime_image: PathBuf,
    /// File names inside the function directory (which is renamed after deploy).
    pub code_image: String,
    pub snapshot: String,
    pub snapshot_bytes: u64,
    pub ram: String,
    pub ram_bytes: u64,
    /// The kernel command line the template booted with.
    pub append: String,
    /// Template boot to READY, and writing the snapshot.
    pub ready_ms: u64,
    pub snapshot_ms: u64,
    pub created_ms: u64,
}

/// The `x-ignore-shared` migration capability, set on both ends: RAM that is
/// a shared file mapping is not copied into the stream.
pub(super) fn ignore_shared() -> serde_json::Value {
    json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })
}

/// Bytes a (sparse) file occupies on disk.
fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

/// `cause`, with the phase of the VM's life it happened in and the end of
/// the VM's output.
pub(super) fn in_vm(phase: &'static str, cause: impl Into<StartError>, vm: &Vm) -> StartError {
    StartError::InVm {
        phase,
        cause: Box::new(cause.into()),
        log_tail: vm.log_tail(),
    }
}

impl Inner {
    /// Boots a template VM for `spec`, waits for READY and writes the
    /// snapshot and `qemu.json` into `dir`.
    pub(super) fn make_snapshot(
        &self,
        spec: &FunctionSpec,
        dir: &Path,
    ) -> Result<(SnapshotMeta, InitLogs), StartError> {
        // The channel's socket exists before the guest runs, so the end of
        // the boot is not seen here: the pass goes back at READY, or lapses
        // after about a boot's time if the handler's init takes longer.
        let booting = self.template_gate.enter();
        let code_image = images::code_image(dir).map_err(StartError::Image)?;
        let runtime_image = self.runtime_image(spec)?;
        let append = kernel_cmdline(spec.runtime);
        let memory_mb = guest_memory_mb(spec);
        let vm_dir = self.vm_dir(&spec.id, "t");
        // The template's RAM is written straight into this file; it replaces
        // vm.ram by rename, so running instances keep mapping the old one.
        let ram_tmp = dir.join(format!(".{RAM_FILE}.tmp"));
        let _ = fs::remove_file(&ram_tmp);
        // A failed template leaves no half-written files behind.
        let tmp = dir.join(format!(".{SNAPSHOT_FILE}.tmp"));
        let _cleanup = RemoveOnDrop(vec![ram_tmp.clone(), tmp.clone()]);
        // The device state goes to a descriptor hearth opens and passes over
        // QMP: QEMU's seccomp filter (`-sandbox spawn=deny`) forbids the
        // `exec:` migration, which ran a shell, and QEMU 7.2 has no `file:` one.
        let snap_out = fs::File::create(&tmp)
            .map_err(|e| StartError::io(format!("create {}", tmp.display()), e))?;
        let plan = VmPlan {
            accel: self.accel,
            machine: self.machine,
            memory_mb,
            kernel: &self.guest.kernel.image,
            initramfs: &self.guest.initramfs,
            append: &append,
            runtime_image: &runtime_image,
            code_image: &code_image,
            dir: &vm_dir,
            ram: &ram_tmp,
            restore: false,
        };
        let started = Instant::now();
        let cgroup = self.cgroup(&spec.id, &plan);
        let mut vm = Vm::spawn(&self.qemu, &plan, None, cgroup, None)?;
        let timeout = match self.accel {
            Accel::Kvm => TEMPLATE_READY_TIMEOUT_KVM,
            Accel::Tcg => TEMPLATE_READY_TIMEOUT_TCG,
        };
        let channel = vm.connect_channel(started + timeout)?;
        let logs = match handshake::hello(channel.as_fd(), spec, timeout) {
            Ok((_init_ms, logs)) => logs,
            Err(e @ StartError::Init { .. }) => return Err(e),
            Err(e) => return Err(in_vm("template VM", e, &vm)),
        };
        drop(booting);
        let ready_ms = started.elapsed().as_millis() as u64;

        let snap_started = Instant::now();
        let deadline = snap_started + SNAPSHOT_TIMEOUT;
        let fail = |e: VmError, vm: &Vm| in_vm("snapshot", e, vm);
        let mut q = vm.qmp(deadline).map_err(|e| fail(e, &vm))?;
        q.pass_fd("snapshot", snap_out.as_fd(), deadline)
            .map_err(|e| fail(VmError::Qmp(e), &vm))?;
        let uri = "fd:snapshot";
        q.execute("migrate-set-capabilities", Some(ignore_shared()), deadline)
            .and_then(|_| q.execute("stop", None, deadline))
            .and_then(|_| q.execute("migrate", Some(json!({ "uri": uri })), deadline))
            .map_err(|e| fail(VmError::Qmp(e), &vm))?;
        loop {
            let st = q
                .execute("query-migrate", None, deadline)
                .map_err(|e| fail(VmError::Qmp(e), &vm))?;
            match st["status"].as_str().unwrap_or("") {
                "completed" => break,
                "failed" | "cancelled" => {
                    let why = st["error-desc"].as_str().unwrap_or("no reason given");
                    return Err(fail(
                        VmError::Migration(format!("migration failed: {why}")),
                        &vm,
                    ));
                }
                _ if Instant::now() >= deadline => {
                    return Err(fail(
                        VmError::Migration(format!(
                            "not written after {} s",
                            SNAPSHOT_TIMEOUT.as_secs()
                        )),
                        &vm,
                    ))
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        vm.quit(&mut q);
        drop(channel);
        drop(vm);
        drop(snap_out);
        let publish = |tmp: &Path, name: &str| {
            publish(tmp, dir, name)
                .map_err(|e| StartError::io(format!("snapshot {}", tmp.display()), e))
        };
        let ram_bytes = publish(&ram_tmp, RAM_FILE)?;
        let bytes = publish(&tmp, SNAPSHOT_FILE)?;
        let meta = SnapshotMeta {
            format: META_FORMAT,
            qemu_version: self.qemu_version.clone(),
            accel: self.accel,
            machine: self.machine,
            memory_mb,
            kernel: self.guest.kernel.image.clone(),
            initramfs: self.guest.initramfs.clone(),
            runtime_image,
            code_image: code_image
                .file_name()
                .expect("image paths name files")
                .to_string_lossy()
                .into_owned(),
            snapshot: SNAPSHOT_FILE.to_string(),
            snapshot_bytes: bytes,
            ram: RAM_FILE.to_string(),
            ram_bytes,
            append,
            ready_ms,
            snapshot_ms: snap_started.elapsed().as_millis() as u64,
            created_ms: unix_time_ms(),
        };
        write_meta(dir, &meta).map_err(|e| StartError::io(META_FILE, e))?;
        eprintln!(
            "hearth: qemu: function {}: template ready in {} ms, snapshot in {} ms ({} KiB of device state, {} MiB of RAM on disk)",
            spec.id,
            meta.ready_ms,
            meta.snapshot_ms,
            bytes >> 10,
            allocated_bytes(&dir.join(RAM_FILE)) >> 20
        );
        Ok((meta, logs))
    }

    /// Why `meta` cannot be restored by this server (None: it can).
    fn stale(&self, spec: &FunctionSpec, dir: &Path, meta: &SnapshotMeta) -> Option<String> {
        if meta.format != META_FORMAT {
            return Some(format!("format {} (now {META_FORMAT})", meta.format));
        }
        if meta.qemu_version != self.qemu_version {
            return Some(format!(
                "made by {} (now {})",
                meta.qemu_version, self.qemu_version
            ));
        }
        if meta.accel != self.accel {
            return Some(format!("made with -accel {}", meta.accel.as_str()));
        }
        if meta.machine != self.machine {
            return Some(format!("made with -M {}", meta.machine.as_str()));
        }
        if meta.memory_mb != guest_memory_mb(spec) {
            return Some(format!("made with {} MiB", meta.memory_mb));
        }
        if meta.append != kernel_cmdline(spec.runtime) {
            return Some("the kernel command line changed".into());
        }
        let runtime_image = match self.runtime_image(spec) {
            Ok(image) => image,
            Err(e) => return Some(format!("no runtime image: {e}")),
        };
        let current = [
            (&meta.kernel, &self.guest.kernel.image, "kernel"),
            (&meta.initramfs, &self.guest.initramfs, "initramfs"),
            (&meta.runtime_image, &runtime_image, "runtime image"),
        ];
        for (then, now, what) in current {
            if then != now {
                return Some(format!("the {what} changed"));
            }
        }
        if !dir.join(&meta.code_image).is_file() {
            return Some(format!("{} is missing", meta.code_image));
        }
        for (f, want) in [
            (&meta.snapshot, meta.snapshot_bytes),
            (&meta.ram, meta.ram_bytes),
        ] {
            match fs::metadata(dir.join(f)).map(|m| m.len()) {
                Ok(len) if len == want => {}
                Ok(len) => return Some(format!("{f} is {len} bytes, expected {want}")),
                Err(e) => return Some(format!("{f}: {e}")),
            }
        }
        None
    }

    /// The function's snapshot: cached, loaded from `qemu.json`, or rebuilt.
    pub(super) fn snapshot(
        &self,
        spec: &FunctionSpec,
        dir: &Path,
    ) -> Result<SnapshotMeta, StartError> {
        let slot = self.slot(&spec.id);
        let mut guard = slot.meta.lock().unwrap();
        if let Some(m) = guard.as_ref() {
            return Ok(m.clone());
        }
        let why = match read_meta(dir) {
            Ok(meta) => match self.stale(spec, dir, &meta) {
                None => {
                    *guard = Some(meta.clone());
                    return Ok(meta);
                }
                Some(why) => why,
            },
            Err(e) => e,
        };
        eprintln!(
            "hearth: qemu: function {}: rebuilding its snapshot ({why})",
            spec.id
        );
        let (meta, _logs) = self.make_snapshot(spec, dir)?;
        *guard = Some(meta.clone());
        Ok(meta)
    }
}

pub(super) fn read_meta(dir: &Path) -> Result<SnapshotMeta, String> {
    let path = dir.join(META_FILE);
    let bytes = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn write_meta(dir: &Path, meta: &SnapshotMeta) -> std::io::Result<()> {
    write_atomic(
        dir,
        META_FILE,
        &serde_json::to_vec_pretty(meta).expect("meta serialises"),
    )
}
