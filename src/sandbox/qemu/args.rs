//! The QEMU command line, as data: the machine, the guest RAM mapping, the
//! kernel and its command line, the two read-only drives, the agent's
//! virtio-serial port, QMP and the console (sans-IO: tests check it as a
//! list of strings).

use std::ffi::OsString;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::runtime::RuntimeKind;
use crate::spec::FunctionSpec;

/// Smallest guest: Node.js and the kernel need this much.
pub const MEMORY_MB_MIN: u32 = 256;
/// Size of the guest's tmpfs `/tmp`, MiB.
pub const TMP_MB: u32 = 64;
/// How long the agent waits for drives and the channel port, ms.
pub const GUEST_DEVICE_WAIT_MS: u32 = 20_000;
/// Name of the virtio-serial port the agent looks for.
pub const AGENT_PORT: &str = "hearth.agent";
/// The QEMU id of the guest RAM backend.
const RAM_ID: &str = "pc.ram";
/// QEMU's own seccomp filter (`-sandbox`), on for every VM: no obsolete
/// system calls, no set*uid/set*gid, no fork/exec (so a snapshot is written
/// to a descriptor hearth opened, never through `exec:`), no scheduler or
/// priority changes (hearth pins the VM before exec).
pub const SECCOMP_SANDBOX: &str =
    "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny";
/// Software emulation's translation cache, MiB (`-accel tcg,tb-size=`): the
/// code QEMU generates for the guest's, filled as the guest runs new code and
/// flushed when full. QEMU's default here is 1 GiB (an eighth of host RAM, at
/// most 1 GiB), which a long-running JIT fills and which the VMM's memory
/// limit would then have to allow. A template booting Node.js with an Express
/// app filled 128 MiB; an instance 88 MiB after 2,000 requests.
pub const TCG_TB_SIZE_MB: u32 = 256;
/// Most threads in QEMU's pool for blocking I/O (the drives' reads; its
/// default is 64): with it, the VMM's task limit
/// ([`crate::sandbox::vmcgroup::VMM_PIDS_MAX`]) holds with a margin, rather
/// than QEMU aborting when a burst of guest I/O cannot get a thread.
pub const THREAD_POOL_MAX: u32 = 16;

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
    pub(super) fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// The QEMU machine type (`HEARTH_QEMU_MACHINE`), one per server: a
/// snapshot restores only on the machine it was made on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// i440FX PC (the default; the only one that boots under TCG here).
    #[default]
    Pc,
    /// Q35 with PCI Express.
    Q35,
    /// The minimal `microvm` machine, with a PCIe host so the same virtio-pci
    /// devices work (KVM only: under TCG its TSC calibration hangs).
    Microvm,
}

impl Machine {
    /// `pc`, `q35` or `microvm`.
    pub fn parse(name: &str) -> Option<Machine> {
        match name {
            "pc" => Some(Machine::Pc),
            "q35" => Some(Machine::Q35),
            "microvm" => Some(Machine::Microvm),
            _ => None,
        }
    }

    pub(super) fn as_str(self) -> &'static str {
        match self {
            Machine::Pc => "pc",
            Machine::Q35 => "q35",
            Machine::Microvm => "microvm",
        }
    }

    /// The `-M` value before the RAM backend.
    fn option(self) -> &'static str {
        match self {
            Machine::Microvm => "microvm,pcie=on",
            m => m.as_str(),
        }
    }
}

/// Guest memory for a function.
pub fn guest_memory_mb(spec: &FunctionSpec) -> u32 {
    spec.memory_mb.max(MEMORY_MB_MIN)
}

/// Memory a QEMU may use beyond its guest's RAM before its cgroup kills it:
/// a VMM's allowance ([`crate::sandbox::vmcgroup::VMM_OVERHEAD_MB`]) and,
/// under software emulation, the translation cache. Measured under TCG with a
/// 256 MiB guest running Express: 52-71 MiB of QEMU's own anonymous memory
/// beside the cache.
pub fn vmm_overhead_mb(accel: Accel) -> u32 {
    let allowance = crate::sandbox::vmcgroup::VMM_OVERHEAD_MB;
    match accel {
        Accel::Kvm => allowance,
        Accel::Tcg => allowance + TCG_TB_SIZE_MB,
    }
}

/// The guest kernel command line for a function of `runtime`: runtimes other
/// than Node.js add `hearth.api=<runtime>`, so the agent serves them the
/// Lambda Runtime API.
pub fn kernel_cmdline(runtime: RuntimeKind) -> String {
    let mut line = format!(
        "console=ttyS0 panic=-1 quiet hearth.runtime=/dev/vda hearth.code=/dev/vdb \
         hearth.channel=virtio-port:{AGENT_PORT} hearth.tmp_mb={TMP_MB} hearth.wait_ms={GUEST_DEVICE_WAIT_MS}"
    );
    if let Some(api) = crate::guest::runtime_api_arg(runtime) {
        line.push(' ');
        line.push_str(&api);
    }
    line
}

/// Everything one QEMU command line depends on.
pub struct VmPlan<'a> {
    pub accel: Accel,
    pub machine: Machine,
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

/// The QEMU arguments for `plan`, the guest's serial console written to
/// `console` (sans-IO: tests check them as data).
pub fn qemu_args(p: &VmPlan<'_>, console: &Path) -> Vec<OsString> {
    let path = |x: &Path| x.display().to_string();
    // QEMU's option parser reads ",," as a literal comma.
    let opt_path = |x: &Path| path(x).replace(',', ",,");
    let (accel, cpu) = match p.accel {
        Accel::Kvm => ("kvm".to_string(), "host"),
        Accel::Tcg => (format!("tcg,tb-size={TCG_TB_SIZE_MB}"), "max"),
    };
    let mut a: Vec<String> = [
        "-accel",
        accel.as_str(),
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
        "-sandbox",
        SECCOMP_SANDBOX,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    a[3] = format!("{},memory-backend={RAM_ID}", p.machine.option());
    a.push("-m".into());
    a.push(p.memory_mb.to_string());
    a.push("-object".into());
    a.push(format!(
        "main-loop,id=main-loop,thread-pool-max={THREAD_POOL_MAX}"
    ));
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
    a.push(format!("file:{}", opt_path(console)));
    if p.restore {
        // The migration capability must be set before the stream is read,
        // so the stream is started over QMP.
        a.extend(["-incoming".into(), "defer".into()]);
    }
    a.into_iter().map(OsString::from).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args_text(restore: bool) -> Vec<String> {
        let plan = VmPlan {
            accel: Accel::Tcg,
            machine: Machine::Pc,
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
        qemu_args(&plan, Path::new("/proc/self/fd/9"))
            .into_iter()
            .map(|s| s.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn command_line_has_drives_in_order_the_channel_and_qmp() {
        let a = args_text(false);
        let joined = a.join(" ");
        assert!(
            joined
                .starts_with("-accel tcg,tb-size=256 -M pc,memory-backend=pc.ram -cpu max -smp 1"),
            "{joined}"
        );
        // Bounds on what the VMM's cgroup must allow: the translation cache
        // and the I/O threads.
        assert!(
            joined.contains("-object main-loop,id=main-loop,thread-pool-max=16"),
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
        // The console goes to hearth's capped log pipe, not a file of its own.
        assert!(joined.contains("-serial file:/proc/self/fd/9"), "{joined}");
        assert!(joined.contains(
            "-object memory-backend-file,id=pc.ram,size=256M,mem-path=/f/vm.ram,share=on"
        ));
        assert!(!a.contains(&"-incoming".to_string()));
        assert!(
            joined.contains(
                "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
            ),
            "{joined}"
        );
    }

    #[test]
    fn machine_types_keep_the_ram_backend_and_microvm_gets_a_pcie_host() {
        let m = |machine| {
            let plan = VmPlan {
                accel: Accel::Kvm,
                machine,
                memory_mb: 256,
                kernel: Path::new("/k"),
                initramfs: Path::new("/i"),
                append: "",
                runtime_image: Path::new("/r"),
                code_image: Path::new("/c"),
                dir: Path::new("/d"),
                ram: Path::new("/f/vm.ram"),
                restore: false,
            };
            let a = qemu_args(&plan, Path::new("/c.log"));
            (a[1].clone(), a[3].clone(), a[5].clone())
        };
        assert_eq!(
            m(Machine::Microvm),
            (
                "kvm".into(),
                "microvm,pcie=on,memory-backend=pc.ram".into(),
                "host".into()
            )
        );
        assert_eq!(m(Machine::Q35).1, "q35,memory-backend=pc.ram");
        assert_eq!(m(Machine::Pc).1, "pc,memory-backend=pc.ram");
        for name in ["pc", "q35", "microvm"] {
            assert_eq!(Machine::parse(name).unwrap().as_str(), name);
        }
        assert_eq!(Machine::parse("isapc"), None);
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
    fn software_emulation_adds_its_translation_cache_to_the_vmm_allowance() {
        assert_eq!(vmm_overhead_mb(Accel::Kvm), 128);
        assert_eq!(vmm_overhead_mb(Accel::Tcg), 128 + 256);
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
            name: None,
            service: Default::default(),
            runtime: Default::default(),
        };
        assert_eq!(guest_memory_mb(&spec), MEMORY_MB_MIN);
        spec.memory_mb = 1024;
        assert_eq!(guest_memory_mb(&spec), 1024);
    }

    #[test]
    fn kernel_command_line_names_the_agents_keys() {
        let c = kernel_cmdline(RuntimeKind::Nodejs);
        for key in [
            "hearth.runtime=/dev/vda",
            "hearth.code=/dev/vdb",
            "hearth.channel=virtio-port:hearth.agent",
            "panic=-1",
        ] {
            assert!(c.contains(key), "{c}");
        }
        assert!(!c.contains("hearth.api"), "{c}");
        for kind in [RuntimeKind::Provided, RuntimeKind::Python3] {
            let c = kernel_cmdline(kind);
            assert!(c.ends_with(&format!(" hearth.api={kind}")), "{c}");
        }
    }
}
