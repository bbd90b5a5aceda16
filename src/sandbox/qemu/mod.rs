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
//! Channel: a virtio-serial port named `hearth.agent` whose host side is a
//! Unix socket (QEMU 7.2 cannot migrate vhost-user-vsock). Each VM gets a
//! private directory under `<state>/run/qemu/` (sockets, console log),
//! removed with the VM.
//!
//! Acceleration: KVM when the host's KVM can run a standard guest (vmx/svm
//! and not the paravirtualised `kvm_pvm`), else software emulation (TCG),
//! which needs `-M pc` (`-M microvm` hangs in TSC calibration under TCG).

use std::collections::HashMap;
use std::ffi::OsString;
use std::fs;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::json;

pub mod qmp;

use super::handshake;
use super::{Backend, InitLogs, Instance, StartError};
use crate::config::ServeConfig;
use crate::functions::FunctionSpec;
use crate::guest::images::{self, Guest};
use qmp::Qmp;

/// Smallest guest: Node.js and the kernel need this much.
pub const MEMORY_MB_MIN: u32 = 256;
/// Boot + handler load in a template VM under software emulation (slow: ~8 s
/// boot, Node ~37x slower than native).
pub const TEMPLATE_READY_TIMEOUT_TCG: Duration = Duration::from_secs(90);
/// The same with KVM.
pub const TEMPLATE_READY_TIMEOUT_KVM: Duration = Duration::from_secs(30);
/// From QEMU spawn to READY of a restored instance.
pub const RESTORE_TIMEOUT: Duration = Duration::from_secs(30);
/// Writing the snapshot.
pub const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a QEMU asked to `quit` gets before SIGKILL.
pub const QUIT_WAIT: Duration = Duration::from_secs(5);
/// Size of the guest's tmpfs `/tmp`, MiB.
pub const TMP_MB: u32 = 64;
/// How long the agent waits for drives and the channel port, ms.
pub const GUEST_DEVICE_WAIT_MS: u32 = 20_000;
/// Longest Unix socket path (sun_path holds 108 bytes with the NUL).
const SOCKET_PATH_BYTES_MAX: usize = 107;
/// Name of the virtio-serial port the agent looks for.
pub const AGENT_PORT: &str = "hearth.agent";
/// Device state, guest RAM and their description in the function's directory.
pub const SNAPSHOT_FILE: &str = "vm.snap";
pub const RAM_FILE: &str = "vm.ram";
pub const META_FILE: &str = "qemu.json";
/// Bumped when [`SnapshotMeta`] or the VM command line changes incompatibly.
const META_FORMAT: u32 = 2;
/// The QEMU id of the guest RAM backend.
const RAM_ID: &str = "pc.ram";
/// Bytes of console output quoted in error messages.
const LOG_TAIL_BYTES: u64 = 2048;

/// How the VMs run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualisation.
    Kvm,
    /// Software emulation.
    Tcg,
}

impl Accel {
    fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Whether this host's KVM can run a standard Linux guest; the error says why not.
pub fn kvm_usable() -> Result<(), String> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let vmx_or_svm = cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    let pvm = Path::new("/sys/module/kvm_pvm").exists();
    if pvm && !vmx_or_svm {
        return Err("KVM here is kvm_pvm (paravirtualised nested KVM) and the CPU shows no vmx/svm: \
                    a standard guest kernel dies with a KVM emulation failure; run on bare metal or \
                    enable nested virtualisation (vmx/svm) for this VM"
            .into());
    }
    if !vmx_or_svm {
        return Err(
            "the CPU has no vmx/svm flag: hardware virtualisation is off or not exposed \
                    to this machine (enable VT-x/AMD-V, or nested virtualisation)"
                .into(),
        );
    }
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map_err(|e| {
            format!("/dev/kvm: {e} (load kvm_intel/kvm_amd, and give this user access: group kvm)")
        })?;
    Ok(())
}

/// `$HEARTH_QEMU` or `qemu-system-x86_64` on PATH.
pub fn find_qemu() -> Result<PathBuf, String> {
    crate::runtime::find_program("HEARTH_QEMU", "qemu-system-x86_64").ok_or_else(|| {
        "qemu-system-x86_64 not found: install qemu-system-x86 (Debian) or set HEARTH_QEMU"
            .to_string()
    })
}

/// The first line of `qemu --version`, e.g. "QEMU emulator version 7.2.22 (...)".
pub fn qemu_version(qemu: &Path) -> Result<String, String> {
    let out = Command::new(qemu)
        .arg("--version")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", qemu.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .next()
        .filter(|l| out.status.success() && !l.is_empty())
        .map(str::to_string)
        .ok_or_else(|| format!("{} --version failed: {}", qemu.display(), out.status))
}

/// What a function's snapshot was made from (`qemu.json`). A snapshot is
/// only restored with exactly these inputs; anything else rebuilds it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    pub format: u32,
    pub qemu_version: String,
    pub accel: Accel,
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

/// Guest memory for a function.
pub fn guest_memory_mb(spec: &FunctionSpec) -> u32 {
    spec.memory_mb.max(MEMORY_MB_MIN)
}

/// The guest kernel command line.
pub fn kernel_cmdline() -> String {
    format!(
        "console=ttyS0 panic=-1 quiet hearth.runtime=/dev/vda hearth.code=/dev/vdb \
         hearth.channel=virtio-port:{AGENT_PORT} hearth.tmp_mb={TMP_MB} hearth.wait_ms={GUEST_DEVICE_WAIT_MS}"
    )
}

/// Everything one QEMU command line depends on.
pub struct VmPlan<'a> {
    pub accel: Accel,
    pub memory_mb: u32,
    pub kernel: &'a Path,
    pub initramfs: &'a Path,
    pub append: &'a str,
    pub runtime_image: &'a Path,
    pub code_image: &'a Path,
    /// The VM's private directory (sockets, logs).
    pub dir: &'a Path,
    /// The file holding guest RAM.
    pub ram: &'a Path,
    /// Boot a template (RAM mapped shared, written to the file) or restore
    /// (RAM mapped private; device state from a migration stream over QMP).
    pub restore: bool,
}

/// The QEMU arguments for `plan` (sans-IO: tests check them as data).
pub fn qemu_args(p: &VmPlan<'_>) -> Vec<OsString> {
    let path = |x: &Path| x.display().to_string();
    // QEMU's option parser reads ",," as a literal comma.
    let opt_path = |x: &Path| path(x).replace(',', ",,");
    let (accel, cpu) = match p.accel {
        Accel::Kvm => ("kvm", "host"),
        Accel::Tcg => ("tcg", "max"),
    };
    let mut a: Vec<String> = [
        "-accel",
        accel,
        "-M",
        "",
        "-cpu",
        cpu,
        "-smp",
        "1",
        "-display",
        "none",
        "-no-reboot",
        "-nodefaults",
        "-no-user-config",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a[3] = format!("pc,memory-backend={RAM_ID}");
    a.push("-m".into());
    a.push(p.memory_mb.to_string());
    a.push("-object".into());
    a.push(format!(
        "memory-backend-file,id={RAM_ID},size={}M,mem-path={},share={}",
        p.memory_mb,
        opt_path(p.ram),
        if p.restore { "off" } else { "on" }
    ));
    a.extend(["-kernel".into(), path(p.kernel)]);
    a.extend(["-initrd".into(), path(p.initramfs)]);
    a.extend(["-append".into(), p.append.to_string()]);
    // Drive order gives the guest names: runtime /dev/vda, code /dev/vdb.
    for img in [p.runtime_image, p.code_image] {
        a.push("-drive".into());
        a.push(format!(
            "file={},if=virtio,format=raw,readonly=on",
            opt_path(img)
        ));
    }
    let sock = |n: &str| opt_path(&p.dir.join(n));
    a.extend(["-device".into(), "virtio-serial-pci".into()]);
    a.push("-chardev".into());
    a.push(format!(
        "socket,id=agent,path={},server=on,wait=off",
        sock("agent.sock")
    ));
    a.push("-device".into());
    a.push(format!("virtserialport,chardev=agent,name={AGENT_PORT}"));
    a.push("-qmp".into());
    a.push(format!("unix:{},server=on,wait=off", sock("qmp.sock")));
    a.push("-serial".into());
    a.push(format!("file:{}", sock("console.log")));
    if p.restore {
        // The migration capability must be set before the stream is read,
        // so the stream is started over QMP.
        a.extend(["-incoming".into(), "defer".into()]);
    }
    a.into_iter().map(OsString::from).collect()
}

/// A running QEMU and its private directory; dropping it kills the process,
/// reaps it and removes the directory.
struct Vm {
    child: Child,
    dir: PathBuf,
}

impl Vm {
    /// Starts QEMU for `plan`; `inherit` is a descriptor it keeps across exec
    /// (the open snapshot of a restore).
    fn spawn(
        qemu: &Path,
        plan: &VmPlan<'_>,
        core: Option<usize>,
        inherit: Option<&fs::File>,
    ) -> Result<Vm, String> {
        let dir = plan.dir.to_path_buf();
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let log = fs::File::create(dir.join("qemu.log"))
            .map_err(|e| format!("create {}/qemu.log: {e}", dir.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let inherit_fd = inherit.map(std::os::fd::AsRawFd::as_raw_fd);
        let mut cmd = Command::new(qemu);
        cmd.args(qemu_args(plan))
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Out of the terminal's process group: Ctrl-C is hearth's to handle.
            .process_group(0);
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe system calls on plain data.
        unsafe {
            cmd.pre_exec(move || {
                // The VM dies with the hearth thread that started it (the
                // starter threads live as long as the server).
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                if let Some(fd) = inherit_fd {
                    // Opened close-on-exec (no other child inherits it); this one keeps it.
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                if let Some(core) = core {
                    let mut set: libc::cpu_set_t = std::mem::zeroed();
                    libc::CPU_SET(core, &mut set);
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|e| {
            let _ = fs::remove_dir_all(&dir);
            format!("cannot start {}: {e}", qemu.display())
        })?;
        Ok(Vm { child, dir })
    }

    fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Connects to the agent channel's socket, waiting for QEMU to make it.
    fn connect_channel(&mut self, deadline: Instant) -> Result<UnixStream, String> {
        let path = self.dir.join("agent.sock");
        loop {
            match UnixStream::connect(&path) {
                Ok(s) => return Ok(s),
                Err(e) => {
                    if let Ok(Some(status)) = self.child.try_wait() {
                        return Err(format!("QEMU exited ({status}){}", self.log_tail()));
                    }
                    if Instant::now() >= deadline {
                        return Err(format!("channel socket {}: {e}", path.display()));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }

    fn qmp(&mut self, deadline: Instant) -> Result<Qmp, String> {
        Qmp::connect(&self.dir.join("qmp.sock"), deadline).map_err(|e| {
            match self.child.try_wait() {
                Ok(Some(status)) => format!("QEMU exited ({status}){}", self.log_tail()),
                _ => e.to_string(),
            }
        })
    }

    /// The end of QEMU's own output and of the guest console, for errors.
    fn log_tail(&self) -> String {
        let mut out = String::new();
        for (name, what) in [("qemu.log", "qemu"), ("console.log", "console")] {
            let t = tail(&self.dir.join(name), LOG_TAIL_BYTES);
            if !t.trim().is_empty() {
                out.push_str(&format!("\n--- {what}:\n{}", t.trim_end()));
            }
        }
        out
    }

    /// SIGKILL, unless the child was already reaped (its pid may be reused).
    fn kill(&mut self) {
        let _ = self.child.kill();
    }

    /// Asks QEMU to exit, SIGKILL after [`QUIT_WAIT`].
    fn quit(&mut self, qmp: &mut Qmp) {
        let _ = qmp.execute("quit", None, Instant::now() + QUIT_WAIT);
        let deadline = Instant::now() + QUIT_WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.kill();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.kill();
            let _ = self.child.wait();
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// The last `bytes` of a file, lossily decoded.
fn tail(path: &Path, bytes: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(bytes)));
    let mut buf = Vec::new();
    let _ = f.take(bytes).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// An instance: a restored VM and the host end of its channel.
pub struct QemuInstance {
    vm: Vm,
    channel: Option<OwnedFd>,
}

impl Instance for QemuInstance {
    fn take_channel(&mut self) -> Option<OwnedFd> {
        self.channel.take()
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
        let status = fs::read_to_string(format!("/proc/{}/status", self.vm.pid())).ok()?;
        let kb: u64 = status
            .lines()
            // Private memory only: pages still shared with the RAM file's
            // page cache are not this instance's cost.
            .find_map(|l| l.strip_prefix("RssAnon:"))?
            .split_whitespace()
            .next()?
            .parse()
            .ok()?;
        Some(kb * 1024)
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
    guest: Guest,
    /// Parent of the VMs' private directories.
    run_dir: PathBuf,
    seq: AtomicU64,
    slots: Mutex<HashMap<String, Arc<Slot>>>,
    /// One template boot at a time: each is CPU-heavy under emulation.
    template_lock: Mutex<()>,
    /// Log the phases of every restore (`HEARTH_QEMU_TRACE=1`).
    trace: bool,
}

/// See the module documentation.
pub struct QemuBackend {
    inner: Arc<Inner>,
}

impl QemuBackend {
    /// Finds QEMU and the kernel, builds the shared guest images, picks the accelerator.
    pub fn new(cfg: &ServeConfig) -> Result<QemuBackend, String> {
        let qemu = find_qemu()?;
        let qemu_version = qemu_version(&qemu)?;
        let accel = match kvm_usable() {
            Ok(()) => Accel::Kvm,
            Err(why) => {
                eprintln!("hearth: qemu: software emulation (TCG): {why}");
                Accel::Tcg
            }
        };
        let guest = images::prepare_guest(&cfg.state_dir).map_err(|e| e.to_string())?;
        // One server per state directory: a second one would clear the first's VM directories.
        let mut run_dir = cfg.state_dir.join("run").join("qemu");
        // Socket paths must fit sun_path: "<run>/<16 hex>-<seq>/agent.sock".
        if run_dir.as_os_str().len() + 48 > SOCKET_PATH_BYTES_MAX {
            run_dir = std::env::temp_dir().join(format!("hearth-qemu-{}", std::process::id()));
        }
        // VMs of an earlier server are gone (they die with it); so are their directories.
        let _ = fs::remove_dir_all(&run_dir);
        fs::create_dir_all(&run_dir).map_err(|e| format!("create {}: {e}", run_dir.display()))?;
        eprintln!(
            "hearth: qemu: {qemu_version}, -accel {}, kernel {} ({} modules), run dir {}",
            accel.as_str(),
            guest.kernel.source,
            guest.kernel.modules.len(),
            run_dir.display()
        );
        Ok(QemuBackend {
            inner: Arc::new(Inner {
                qemu,
                qemu_version,
                accel,
                guest,
                run_dir,
                seq: AtomicU64::new(0),
                slots: Mutex::new(HashMap::new()),
                template_lock: Mutex::new(()),
                trace: std::env::var_os("HEARTH_QEMU_TRACE").is_some_and(|v| v != "0"),
            }),
        })
    }

    /// The accelerator in use.
    pub fn accel(&self) -> Accel {
        self.inner.accel
    }
}

/// Removes its files when dropped (after a successful rename they are gone already).
struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

/// The `x-ignore-shared` migration capability, set on both ends: RAM that is
/// a shared file mapping is not copied into the stream.
fn ignore_shared() -> serde_json::Value {
    json!({ "capabilities": [{ "capability": "x-ignore-shared", "state": true }] })
}

/// Bytes a (sparse) file occupies on disk.
fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn sandbox_err(m: impl Into<String>) -> StartError {
    StartError::Sandbox(m.into())
}

impl Inner {
    fn vm_dir(&self, id: &str, role: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        self.run_dir.join(format!("{id}-{role}{n}"))
    }

    fn slot(&self, id: &str) -> Arc<Slot> {
        self.slots
            .lock()
            .unwrap()
            .entry(id.to_string())
            .or_default()
            .clone()
    }

    /// Boots a template VM for `spec`, waits for READY and writes the
    /// snapshot and `qemu.json` into `dir`.
    fn make_snapshot(
        &self,
        spec: &FunctionSpec,
        dir: &Path,
    ) -> Result<(SnapshotMeta, InitLogs), StartError> {
        let _one_at_a_time = self.template_lock.lock().unwrap();
        let code_image = images::code_image(dir).map_err(|e| sandbox_err(e.to_string()))?;
        let append = kernel_cmdline();
        let memory_mb = guest_memory_mb(spec);
        let vm_dir = self.vm_dir(&spec.id, "t");
        // The template's RAM is written straight into this file; it replaces
        // vm.ram by rename, so running instances keep mapping the old one.
        let ram_tmp = dir.join(format!(".{RAM_FILE}.tmp"));
        let _ = fs::remove_file(&ram_tmp);
        // A failed template leaves no half-written files behind.
        let _cleanup = RemoveOnDrop(vec![
            ram_tmp.clone(),
            dir.join(format!(".{SNAPSHOT_FILE}.tmp")),
        ]);
        let plan = VmPlan {
            accel: self.accel,
            memory_mb,
            kernel: &self.guest.kernel.image,
            initramfs: &self.guest.initramfs,
            append: &append,
            runtime_image: &self.guest.runtime_image,
            code_image: &code_image,
            dir: &vm_dir,
            ram: &ram_tmp,
            restore: false,
        };
        let started = Instant::now();
        let mut vm = Vm::spawn(&self.qemu, &plan, None, None).map_err(sandbox_err)?;
        let timeout = match self.accel {
            Accel::Kvm => TEMPLATE_READY_TIMEOUT_KVM,
            Accel::Tcg => TEMPLATE_READY_TIMEOUT_TCG,
        };
        let channel = vm.connect_channel(started + timeout).map_err(sandbox_err)?;
        let logs = match handshake::hello(channel.as_fd(), spec, timeout) {
            Ok((_init_ms, logs)) => logs,
            Err(StartError::Sandbox(m)) => {
                return Err(sandbox_err(format!("template VM: {m}{}", vm.log_tail())))
            }
            Err(e) => return Err(e),
        };
        let ready_ms = started.elapsed().as_millis() as u64;

        let snap_started = Instant::now();
        let deadline = snap_started + SNAPSHOT_TIMEOUT;
        let tmp = dir.join(format!(".{SNAPSHOT_FILE}.tmp"));
        let _ = fs::remove_file(&tmp);
        let fail = |m: String, vm: &Vm| sandbox_err(format!("snapshot: {m}{}", vm.log_tail()));
        let mut q = vm.qmp(deadline).map_err(|m| fail(m, &vm))?;
        let uri = format!(
            "exec:cat > {}",
            qmp::shell_quote(&tmp.display().to_string())
        );
        q.execute("migrate-set-capabilities", Some(ignore_shared()), deadline)
            .and_then(|_| q.execute("stop", None, deadline))
            .and_then(|_| q.execute("migrate", Some(json!({ "uri": uri })), deadline))
            .map_err(|e| fail(e.to_string(), &vm))?;
        loop {
            let st = q
                .execute("query-migrate", None, deadline)
                .map_err(|e| fail(e.to_string(), &vm))?;
            match st["status"].as_str().unwrap_or("") {
                "completed" => break,
                "failed" | "cancelled" => {
                    let why = st["error-desc"].as_str().unwrap_or("no reason given");
                    return Err(fail(format!("migration failed: {why}"), &vm));
                }
                _ if Instant::now() >= deadline => {
                    return Err(fail(
                        format!("not written after {} s", SNAPSHOT_TIMEOUT.as_secs()),
                        &vm,
                    ))
                }
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        vm.quit(&mut q);
        drop(channel);
        drop(vm);
        let publish = |tmp: &Path, name: &str| {
            fs::File::open(tmp)
                .and_then(|f| {
                    f.sync_all()?;
                    f.metadata()
                })
                .and_then(|m| fs::rename(tmp, dir.join(name)).map(|_| m.len()))
                .map_err(|e| sandbox_err(format!("snapshot {}: {e}", tmp.display())))
        };
        let ram_bytes = publish(&ram_tmp, RAM_FILE)?;
        let bytes = publish(&tmp, SNAPSHOT_FILE)?;
        let meta = SnapshotMeta {
            format: META_FORMAT,
            qemu_version: self.qemu_version.clone(),
            accel: self.accel,
            memory_mb,
            kernel: self.guest.kernel.image.clone(),
            initramfs: self.guest.initramfs.clone(),
            runtime_image: self.guest.runtime_image.clone(),
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
            created_ms: now_ms(),
        };
        write_meta(dir, &meta).map_err(|e| sandbox_err(format!("{META_FILE}: {e}")))?;
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
        if meta.memory_mb != guest_memory_mb(spec) {
            return Some(format!("made with {} MiB", meta.memory_mb));
        }
        let current = [
            (&meta.kernel, &self.guest.kernel.image, "kernel"),
            (&meta.initramfs, &self.guest.initramfs, "initramfs"),
            (
                &meta.runtime_image,
                &self.guest.runtime_image,
                "runtime image",
            ),
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
    fn snapshot(&self, spec: &FunctionSpec, dir: &Path) -> Result<SnapshotMeta, StartError> {
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

    /// Restores a VM from the function's snapshot and makes it ready.
    fn restore_instance(
        &self,
        spec: &FunctionSpec,
        dir: &Path,
        core: Option<usize>,
    ) -> Result<(QemuInstance, InitLogs), StartError> {
        let meta = self.snapshot(spec, dir)?;
        let started = Instant::now();
        let deadline = started + RESTORE_TIMEOUT;
        let vm_dir = self.vm_dir(&spec.id, "");
        let snap_path = dir.join(&meta.snapshot);
        let snap = fs::File::open(&snap_path)
            .map_err(|e| sandbox_err(format!("snapshot {}: {e}", snap_path.display())))?;
        let code_image = dir.join(&meta.code_image);
        let ram = dir.join(&meta.ram);
        let plan = VmPlan {
            accel: meta.accel,
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
        let mut vm = Vm::spawn(&self.qemu, &plan, core, Some(&snap)).map_err(sandbox_err)?;
        let fail = |m: String, vm: &Vm| sandbox_err(format!("restore: {m}{}", vm.log_tail()));
        // Connected before the guest runs, so nothing it writes can be dropped.
        let channel = vm.connect_channel(deadline).map_err(|m| fail(m, &vm))?;
        let mut q = vm.qmp(deadline).map_err(|m| fail(m, &vm))?;
        // QEMU inherited the snapshot's descriptor under the same number.
        let uri = format!("fd:{}", std::os::fd::AsRawFd::as_raw_fd(&snap));
        q.execute("migrate-set-capabilities", Some(ignore_shared()), deadline)
            .and_then(|_| q.execute("migrate-incoming", Some(json!({ "uri": uri })), deadline))
            .map_err(|e| fail(e.to_string(), &vm))?;
        drop(snap);
        loop {
            let status = q.status(deadline).map_err(|e| fail(e.to_string(), &vm))?;
            match status.as_str() {
                "paused" => {
                    q.execute("cont", None, deadline)
                        .map_err(|e| fail(e.to_string(), &vm))?;
                    break;
                }
                "running" => break,
                "inmigrate" | "prelaunch" | "restore-vm" => {
                    if Instant::now() >= deadline {
                        return Err(fail("snapshot not loaded in time".into(), &vm));
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
                other => return Err(fail(format!("VM is {other}"), &vm)),
            }
        }
        drop(q);
        let resumed_ms = started.elapsed().as_millis();
        let left = deadline.saturating_duration_since(Instant::now());
        let logs = match handshake::hello(channel.as_fd(), spec, left) {
            Ok((_, logs)) => logs,
            Err(StartError::Sandbox(m)) => return Err(fail(m, &vm)),
            Err(e) => return Err(e),
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

/// Asks the kernel to read `path` into the page cache ahead of the first
/// restore after a server start (restores map the guest RAM file).
fn prefetch(path: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(f) = fs::File::open(path) {
        // SAFETY: fadvise on a descriptor we own; advice only.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
    }
}

fn read_meta(dir: &Path) -> Result<SnapshotMeta, String> {
    let path = dir.join(META_FILE);
    let bytes = fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
}

fn write_meta(dir: &Path, meta: &SnapshotMeta) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = dir.join(format!(".{META_FILE}.tmp"));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(meta).expect("meta serialises"))?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(META_FILE))?;
    // Makes both renames (snapshot and meta) durable.
    fs::File::open(dir)?.sync_all()
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
        core: usize,
    ) -> Result<(Box<dyn Instance>, InitLogs), StartError> {
        let (inst, logs) = self.inner.restore_instance(spec, dir, Some(core))?;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn args_text(restore: bool) -> Vec<String> {
        let plan = VmPlan {
            accel: Accel::Tcg,
            memory_mb: 256,
            kernel: Path::new("/k/vmlinuz"),
            initramfs: Path::new("/k/init.cpio"),
            append: "console=ttyS0",
            runtime_image: Path::new("/c/runtime.ext4"),
            code_image: Path::new("/f/a,b/code.ext4"),
            dir: Path::new("/run/vm 1"),
            ram: Path::new("/f/vm.ram"),
            restore,
        };
        qemu_args(&plan)
            .into_iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn command_line_has_drives_in_order_the_channel_and_qmp() {
        let a = args_text(false);
        let joined = a.join(" ");
        assert!(
            joined.starts_with("-accel tcg -M pc,memory-backend=pc.ram -cpu max -smp 1"),
            "{joined}"
        );
        let drives: Vec<&String> = a
            .iter()
            .zip(a.iter().skip(1))
            .filter(|(k, _)| *k == "-drive")
            .map(|(_, v)| v)
            .collect();
        assert_eq!(
            drives,
            [
                "file=/c/runtime.ext4,if=virtio,format=raw,readonly=on",
                // A comma in a path is doubled for QEMU's option parser.
                "file=/f/a,,b/code.ext4,if=virtio,format=raw,readonly=on"
            ]
        );
        assert!(joined.contains("socket,id=agent,path=/run/vm 1/agent.sock,server=on,wait=off"));
        assert!(joined.contains("virtserialport,chardev=agent,name=hearth.agent"));
        assert!(joined.contains("-qmp unix:/run/vm 1/qmp.sock,server=on,wait=off"));
        assert!(joined.contains(
            "-object memory-backend-file,id=pc.ram,size=256M,mem-path=/f/vm.ram,share=on"
        ));
        assert!(!a.contains(&"-incoming".to_string()));
    }

    #[test]
    fn a_restore_maps_ram_privately_and_waits_for_the_stream() {
        let boot = args_text(false);
        let restore = args_text(true);
        assert_eq!(
            restore[restore.len() - 2..],
            ["-incoming".to_string(), "defer".to_string()]
        );
        // Otherwise only the RAM mapping differs: MAP_PRIVATE, copy-on-write.
        let differing: Vec<(&String, &String)> =
            boot.iter().zip(&restore).filter(|(a, b)| a != b).collect();
        assert_eq!(differing.len(), 1, "{differing:?}");
        assert!(differing[0].1.ends_with("share=off"), "{differing:?}");
        assert_eq!(restore.len(), boot.len() + 2);
    }

    #[test]
    fn guests_get_at_least_the_minimum_memory() {
        let mut spec = FunctionSpec {
            id: "0123456789abcdef".into(),
            handler: "index.handler".into(),
            memory_mb: 128,
            timeout_ms: 3000,
            concurrency: 1,
            env: Vec::new(),
            created_ms: 0,
            code_bytes: 0,
            backend: "qemu".into(),
        };
        assert_eq!(guest_memory_mb(&spec), MEMORY_MB_MIN);
        spec.memory_mb = 1024;
        assert_eq!(guest_memory_mb(&spec), 1024);
    }

    #[test]
    fn kernel_command_line_names_the_agents_keys() {
        let c = kernel_cmdline();
        for key in [
            "hearth.runtime=/dev/vda",
            "hearth.code=/dev/vdb",
            "hearth.channel=virtio-port:hearth.agent",
            "panic=-1",
        ] {
            assert!(c.contains(key), "{c}");
        }
    }
}
