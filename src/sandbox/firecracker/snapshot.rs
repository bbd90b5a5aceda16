//! A function's Firecracker snapshot: a template microVM that has loaded the
//! handler, paused and written as a Full snapshot (`fc.state` device state,
//! `fc.mem` guest memory) into the function's directory, described by
//! `firecracker.json` ([`SnapshotMeta`]); and the check that a snapshot on
//! disk still matches this server, else it is rebuilt.

use std::fs;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::api;
use super::vmm::{Vmm, VmmError};
use super::vsock;
use super::Inner;
use crate::guest::images;
use crate::runtime::RuntimeKind;
use crate::sandbox::qemu::{guest_memory_mb, GUEST_DEVICE_WAIT_MS, TMP_MB};
use crate::sandbox::vmfiles::{publish, write_atomic, RemoveOnDrop};
use crate::sandbox::{handshake, InitLogs, StartError};
use crate::spec::FunctionSpec;
use crate::util::time::unix_time_ms;

/// Boot + handler load in a template VM (generous: nested under software
/// emulation Node runs ~37x slower than native; a loaded host took 100 s).
pub const TEMPLATE_READY_TIMEOUT: Duration = Duration::from_secs(300);
/// Longest a template holds the boot gate ([`crate::sandbox::boot_gate`])
/// if its agent has not taken the connection by then (a slow nested host):
/// the next function's template boots beside it.
pub const TEMPLATE_BOOT_HOLD: Duration = Duration::from_secs(30);
/// Pausing and writing the snapshot.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Each configuration request before the boot.
const CONFIG_TIMEOUT: Duration = Duration::from_secs(10);
/// Device state, guest memory and their description in the function's directory.
pub const STATE_FILE: &str = "fc.state";
pub const MEM_FILE: &str = "fc.mem";
pub const META_FILE: &str = "firecracker.json";
/// Bumped when [`SnapshotMeta`] or the VM configuration changes incompatibly.
const META_FORMAT: u32 = 1;

/// What a function's snapshot was made from (`firecracker.json`). A snapshot
/// is only restored with exactly these inputs; anything else rebuilds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    pub format: u32,
    pub firecracker_version: String,
    pub memory_mb: u32,
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    pub runtime_image: PathBuf,
    /// File names inside the function directory (which is renamed after
    /// deploy; the code drive is given to Firecracker relative to it).
    pub code_image: String,
    pub state: String,
    pub state_bytes: u64,
    pub mem: String,
    pub mem_bytes: u64,
    pub boot_args: String,
    /// Made under the jailer: drive paths are names inside the jail's root.
    #[serde(default)]
    pub jailer: bool,
    /// Template boot to READY, and writing the snapshot.
    pub ready_ms: u64,
    pub snapshot_ms: u64,
    pub created_ms: u64,
}

/// The guest kernel command line for a function of `runtime`: the agent
/// listens on vsock, and serves the Lambda Runtime API to runtimes other
/// than Node.js ([`crate::guest::runtime_api_arg`]).
pub fn boot_args(runtime: RuntimeKind) -> String {
    let mut line = format!(
        "console=ttyS0 reboot=k panic=1 quiet i8042.noaux i8042.nomux i8042.dumbkbd \
         hearth.runtime=/dev/vda hearth.code=/dev/vdb hearth.channel=vsock:{} \
         hearth.tmp_mb={TMP_MB} hearth.wait_ms={GUEST_DEVICE_WAIT_MS}",
        vsock::AGENT_PORT
    );
    if let Some(api) = crate::guest::runtime_api_arg(runtime) {
        line.push(' ');
        line.push_str(&api);
    }
    line
}

/// `cause`, with the phase of the VM's life it happened in and the end of
/// the VMM's log.
pub(super) fn in_vm(phase: &'static str, cause: impl Into<StartError>, vmm: &Vmm) -> StartError {
    StartError::InVm {
        phase,
        cause: Box::new(cause.into()),
        log_tail: vmm.log_tail(),
    }
}

impl Inner {
    /// Boots a template microVM for `spec`, waits for READY, pauses it and
    /// writes the snapshot and `firecracker.json` into `dir`.
    pub(super) fn make_snapshot(
        &self,
        spec: &FunctionSpec,
        dir: &Path,
    ) -> Result<(SnapshotMeta, InitLogs), StartError> {
        // Held for the boot only (kernel and agent: hearth's code, done when
        // the agent takes the connection); the handler's init, which the
        // function controls, runs without it.
        let booting = self.template_gate.enter();
        let code_image = images::code_image(dir).map_err(StartError::Image)?;
        let code_name = code_image
            .file_name()
            .expect("image paths name files")
            .to_string_lossy()
            .into_owned();
        let memory_mb = guest_memory_mb(spec);
        let boot_args = boot_args(spec.runtime);
        let runtime_image = self
            .drives
            .for_runtime(spec.runtime)
            .map_err(StartError::Image)?;
        let state_tmp = dir.join(format!(".{STATE_FILE}.tmp"));
        let mem_tmp = dir.join(format!(".{MEM_FILE}.tmp"));
        // A failed template leaves no half-written files behind.
        let _cleanup = RemoveOnDrop(vec![state_tmp.clone(), mem_tmp.clone()]);
        let started = Instant::now();
        let files = [
            self.vmlinux.as_path(),
            self.guest.initramfs.as_path(),
            runtime_image.as_path(),
            code_image.as_path(),
        ];
        let label = format!("template of {}", spec.id);
        let mut vmm = self.spawn_vmm(spec, "t", dir, label, None, &files)?;
        let fail = |e: VmmError, vmm: &Vmm| in_vm("template VM", e, vmm);
        let deadline = started + CONFIG_TIMEOUT;
        let mut api = vmm.api(deadline).map_err(|e| fail(e, &vmm))?;
        let (uds_vm, uds) = vmm.vsock_paths();
        let (kernel, initrd) = (
            vmm.resource(&self.vmlinux),
            vmm.resource(&self.guest.initramfs),
        );
        let steps = [
            ("/machine-config", api::machine_config(1, memory_mb)),
            (
                "/boot-source",
                api::boot_source(&kernel, &initrd, &boot_args),
            ),
            // Order gives the guest names: runtime /dev/vda, code /dev/vdb.
            (
                "/drives/runtime",
                api::drive("runtime", &vmm.resource(&runtime_image)),
            ),
            // Relative: resolved in the function directory (jailed: the root),
            // wherever it is renamed to.
            ("/drives/code", api::drive("code", Path::new(&code_name))),
            ("/vsock", api::vsock(&uds_vm)),
            ("/actions", api::action("InstanceStart")),
        ];
        for (path, body) in &steps {
            api.put(path, body, Instant::now() + CONFIG_TIMEOUT)
                .map_err(|e| fail(VmmError::Api(e), &vmm))?;
        }
        let ready_deadline = started + TEMPLATE_READY_TIMEOUT;
        let channel = vsock::connect(&uds, vsock::AGENT_PORT, ready_deadline, || {
            vmm.check_alive()
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
        .map_err(|e| fail(VmmError::Vsock(e), &vmm))?;
        drop(booting);
        let left = ready_deadline.saturating_duration_since(Instant::now());
        let logs = match handshake::hello(channel.as_fd(), spec, left) {
            Ok((_init_ms, logs)) => logs,
            Err(e @ StartError::Init { .. }) => return Err(e),
            Err(e) => return Err(in_vm("template VM", e, &vmm)),
        };
        drop(channel);
        let ready_ms = started.elapsed().as_millis() as u64;

        let snap_started = Instant::now();
        let deadline = snap_started + SNAPSHOT_TIMEOUT;
        let fail = |e: VmmError, vmm: &Vmm| in_vm("snapshot", e, vmm);
        let create = api::snapshot_create(&vmm.output(&state_tmp), &vmm.output(&mem_tmp));
        api.patch("/vm", &api::vm_state("Paused"), deadline)
            .and_then(|_| api.put("/snapshot/create", &create, deadline))
            .map_err(|e| fail(VmmError::Api(e), &vmm))?;
        drop(api);
        vmm.collect_output(&state_tmp)
            .and_then(|_| vmm.collect_output(&mem_tmp))
            .map_err(|e| fail(e, &vmm))?;
        drop(vmm);
        let publish_one = |tmp: &Path, name: &str| {
            publish(tmp, dir, name)
                .map_err(|e| StartError::io(format!("snapshot {}", tmp.display()), e))
        };
        // The old snapshot's working set does not fit the new one.
        self.drop_working_set(&spec.id, dir);
        // The memory file is replaced by rename: running clones keep mapping the old one.
        let mem_bytes = publish_one(&mem_tmp, MEM_FILE)?;
        let state_bytes = publish_one(&state_tmp, STATE_FILE)?;
        let meta = SnapshotMeta {
            format: META_FORMAT,
            firecracker_version: self.version.clone(),
            memory_mb,
            vmlinux: self.vmlinux.clone(),
            initramfs: self.guest.initramfs.clone(),
            runtime_image,
            code_image: code_name,
            state: STATE_FILE.to_string(),
            state_bytes,
            mem: MEM_FILE.to_string(),
            mem_bytes,
            boot_args,
            jailer: self.jail.is_some(),
            ready_ms,
            snapshot_ms: snap_started.elapsed().as_millis() as u64,
            created_ms: unix_time_ms(),
        };
        let json = serde_json::to_vec_pretty(&meta).expect("meta serialises");
        write_atomic(dir, META_FILE, &json)
            .map_err(|e| StartError::io(format!("write {}", dir.join(META_FILE).display()), e))?;
        Ok((meta, logs))
    }

    /// Why the snapshot described by `meta` cannot be restored by this server (None: it can).
    fn stale(&self, spec: &FunctionSpec, dir: &Path, meta: &SnapshotMeta) -> Option<String> {
        if meta.format != META_FORMAT {
            return Some(format!("format {} (now {META_FORMAT})", meta.format));
        }
        if meta.firecracker_version != self.version {
            return Some(format!(
                "made by {} (now {})",
                meta.firecracker_version, self.version
            ));
        }
        if meta.memory_mb != guest_memory_mb(spec) {
            return Some(format!("made with {} MiB", meta.memory_mb));
        }
        let runtime_image = match self.drives.for_runtime(spec.runtime) {
            Ok(image) => image,
            Err(e) => return Some(format!("no runtime image: {e}")),
        };
        let current = [
            (&meta.vmlinux, &self.vmlinux, "kernel"),
            (&meta.initramfs, &self.guest.initramfs, "initramfs"),
            (&meta.runtime_image, &runtime_image, "runtime image"),
        ];
        for (then, now, what) in current {
            if then != now {
                return Some(format!("the {what} changed"));
            }
        }
        if meta.jailer != self.jail.is_some() {
            return Some(format!(
                "made {} --jailer",
                if meta.jailer { "with" } else { "without" }
            ));
        }
        if meta.boot_args != boot_args(spec.runtime) {
            return Some("the kernel command line changed".into());
        }
        if !dir.join(&meta.code_image).is_file() {
            return Some(format!("{} is missing", meta.code_image));
        }
        for (f, want) in [(&meta.state, meta.state_bytes), (&meta.mem, meta.mem_bytes)] {
            match fs::metadata(dir.join(f)).map(|m| m.len()) {
                Ok(len) if len == want => {}
                Ok(len) => return Some(format!("{f} is {len} bytes, expected {want}")),
                Err(e) => return Some(format!("{f}: {e}")),
            }
        }
        None
    }

    /// The function's snapshot: cached, loaded from `firecracker.json`, or rebuilt.
    pub(super) fn snapshot(
        &self,
        spec: &FunctionSpec,
        dir: &Path,
    ) -> Result<SnapshotMeta, StartError> {
        let slot = self.slot(&spec.id);
        let mut guard = slot.lock().unwrap();
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
            "hearth: firecracker: function {}: rebuilding its snapshot ({why})",
            spec.id
        );
        let (meta, _logs) = self.make_snapshot(spec, dir)?;
        *guard = Some(meta.clone());
        Ok(meta)
    }
}

/// The snapshot description in `dir`.
pub(super) fn read_meta(dir: &Path) -> Result<SnapshotMeta, String> {
    let path = dir.join(META_FILE);
    let bytes = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_guest_command_line_names_the_vsock_channel_and_drives() {
        let a = boot_args(RuntimeKind::Nodejs);
        assert!(!a.contains("hearth.api"), "{a}");
        for key in [
            "hearth.channel=vsock:5000",
            "hearth.runtime=/dev/vda",
            "hearth.code=/dev/vdb",
            "quiet",
        ] {
            assert!(a.contains(key), "{a}");
        }
        // Firecracker adds pci=off itself; ACPI stays on (devices bind through it).
        assert!(!a.contains("acpi=off") && !a.contains("pci=off"), "{a}");
        for kind in [RuntimeKind::Provided, RuntimeKind::Python3] {
            let b = boot_args(kind);
            assert!(b.starts_with(&a), "{b}");
            assert!(b.ends_with(&format!(" hearth.api={kind}")), "{b}");
        }
    }
}
