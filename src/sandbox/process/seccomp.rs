//! The seccomp filter of the process sandbox: a hand-assembled classic BPF program.
//!
//! Policy: allow by default, deny a fixed list of system calls that a Lambda function never
//! needs and that widen the kernel attack surface (mounts, namespaces, tracing, keyrings, BPF,
//! modules, clocks, ...). Denied calls fail with `EPERM` so runtimes see an ordinary error.
//! `clone` is inspected: any `CLONE_NEW*` flag is denied. `clone3` and `io_uring_*` answer
//! `ENOSYS` instead, because libc (clone3 → clone) and libuv (io_uring → thread pool) fall back
//! on `ENOSYS`, and a BPF filter cannot look into `clone3`'s argument struct. A call made for a
//! foreign architecture kills the process; x32 system calls are denied, and system calls
//! newer than [`SYSCALL_NR_KNOWN_MAX`] answer `ENOSYS`.
//!
//! Two calls are inspected by argument: `socket` may only open the address families a function
//! needs ([`SOCKET_FAMILIES_ALLOWED`]: Unix, IPv4, IPv6, netlink, all confined by the network
//! namespace); any other family (notably `AF_VSOCK`, which ignores network namespaces and
//! reaches the host's hypervisor sockets) fails with `EAFNOSUPPORT`, as on a kernel built
//! without it. `sched_setaffinity` fails with `EPERM`: an instance's threads stay on the CPUs hearth
//! pinned them to (hearth re-pins from outside; `sched_getaffinity`, which libuv reads, stays
//! allowed).
//!
//! The program is built by a tiny assembler with symbolic forward jumps ([`Asm`]), because
//! classic BPF jump offsets are 8-bit and relative: computing them by hand is the classic way to
//! get a filter silently wrong.

use std::io;

// Classic BPF opcodes (linux/bpf_common.h); only what the filter uses.
const BPF_LD_W_ABS: u16 = 0x20; // BPF_LD (0) | BPF_W (0) | BPF_ABS (0x20)
const BPF_JMP_JEQ_K: u16 = 0x05 | 0x10; // BPF_JMP | BPF_JEQ | BPF_K
const BPF_JMP_JGE_K: u16 = 0x05 | 0x30; // BPF_JMP | BPF_JGE | BPF_K
const BPF_JMP_JSET_K: u16 = 0x05 | 0x40; // BPF_JMP | BPF_JSET | BPF_K
const BPF_RET_K: u16 = 0x06; // BPF_RET | BPF_K

// Return values (linux/seccomp.h).
const SECCOMP_RET_KILL_PROCESS: u32 = 0x8000_0000;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;

// Offsets into `struct seccomp_data`.
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
/// Low 32 bits of args[0] (little-endian); clone's flags live there (the kernel ignores the
/// upper half of the flags word of legacy clone), and so does socket's address family (an
/// `int`).
const DATA_ARG0_LO: u32 = 16;

/// Address families `socket` may open: everything else answers `EAFNOSUPPORT`. All four stay
/// inside the sandbox's network namespace (or, for Unix sockets, its mount namespace).
pub const SOCKET_FAMILIES_ALLOWED: &[(&str, i32)] = &[
    ("AF_UNIX", libc::AF_UNIX),
    ("AF_INET", libc::AF_INET),
    ("AF_INET6", libc::AF_INET6),
    ("AF_NETLINK", libc::AF_NETLINK),
];

#[cfg(target_arch = "x86_64")]
const AUDIT_ARCH_NATIVE: u32 = 0xc000_003e; // AUDIT_ARCH_X86_64
#[cfg(target_arch = "aarch64")]
const AUDIT_ARCH_NATIVE: u32 = 0xc000_00b7; // AUDIT_ARCH_AARCH64
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
compile_error!("the process sandbox's seccomp filter knows x86_64 and aarch64 only");

/// x32 system calls are x86_64 numbers with this bit set.
#[cfg(target_arch = "x86_64")]
const X32_SYSCALL_BIT: u32 = 0x4000_0000;

/// Every `CLONE_NEW*` flag, including CLONE_NEWTIME (0x80), which legacy clone cannot take
/// (it overlaps the exit-signal byte) but costs nothing to deny.
pub const CLONE_NEW_MASK: u32 = (libc::CLONE_NEWNS
    | libc::CLONE_NEWCGROUP
    | libc::CLONE_NEWUTS
    | libc::CLONE_NEWIPC
    | libc::CLONE_NEWUSER
    | libc::CLONE_NEWPID
    | libc::CLONE_NEWNET) as u32
    | 0x80;

/// System calls answered with `EPERM`.
pub fn denied_syscalls() -> Vec<(&'static str, i64)> {
    let mut v: Vec<(&'static str, i64)> = vec![
        ("mount", libc::SYS_mount),
        ("umount2", libc::SYS_umount2),
        ("pivot_root", libc::SYS_pivot_root),
        ("chroot", libc::SYS_chroot),
        ("ptrace", libc::SYS_ptrace),
        ("process_vm_readv", libc::SYS_process_vm_readv),
        ("process_vm_writev", libc::SYS_process_vm_writev),
        ("kexec_load", libc::SYS_kexec_load),
        ("kexec_file_load", libc::SYS_kexec_file_load),
        ("bpf", libc::SYS_bpf),
        ("keyctl", libc::SYS_keyctl),
        ("add_key", libc::SYS_add_key),
        ("request_key", libc::SYS_request_key),
        ("perf_event_open", libc::SYS_perf_event_open),
        ("unshare", libc::SYS_unshare),
        ("setns", libc::SYS_setns),
        ("init_module", libc::SYS_init_module),
        ("finit_module", libc::SYS_finit_module),
        ("delete_module", libc::SYS_delete_module),
        ("reboot", libc::SYS_reboot),
        ("swapon", libc::SYS_swapon),
        ("swapoff", libc::SYS_swapoff),
        ("acct", libc::SYS_acct),
        ("open_by_handle_at", libc::SYS_open_by_handle_at),
        ("name_to_handle_at", libc::SYS_name_to_handle_at),
        ("userfaultfd", libc::SYS_userfaultfd),
        ("settimeofday", libc::SYS_settimeofday),
        ("clock_settime", libc::SYS_clock_settime),
        ("clock_adjtime", libc::SYS_clock_adjtime),
        ("adjtimex", libc::SYS_adjtimex),
        ("fanotify_init", libc::SYS_fanotify_init),
        ("lookup_dcookie", libc::SYS_lookup_dcookie),
        ("quotactl", libc::SYS_quotactl),
        ("mount_setattr", libc::SYS_mount_setattr),
        ("open_tree", libc::SYS_open_tree),
        ("move_mount", libc::SYS_move_mount),
        ("fsopen", libc::SYS_fsopen),
        ("fsconfig", libc::SYS_fsconfig),
        ("fsmount", libc::SYS_fsmount),
        ("fspick", libc::SYS_fspick),
        ("pidfd_getfd", libc::SYS_pidfd_getfd),
        ("kcmp", libc::SYS_kcmp),
        ("vhangup", libc::SYS_vhangup),
        ("syslog", libc::SYS_syslog),
        ("quotactl_fd", libc::SYS_quotactl_fd),
        // Secret memory is taken out of the kernel's direct map, which slows the whole host.
        ("memfd_secret", libc::SYS_memfd_secret),
        // Newer than the libc crate's tables; the same number on x86_64 and aarch64.
        ("open_tree_attr", 467),
        // hearth pins each instance to its core; widening the mask would let a function run
        // beside other cores' event loops.
        ("sched_setaffinity", libc::SYS_sched_setaffinity),
    ];
    #[cfg(target_arch = "x86_64")]
    v.extend([
        ("iopl", libc::SYS_iopl),
        ("ioperm", libc::SYS_ioperm),
        ("uselib", libc::SYS_uselib),
        ("modify_ldt", libc::SYS_modify_ldt),
    ]);
    v
}

/// The highest system call number the filter was written against: every
/// later one (added by kernels newer than this list) answers `ENOSYS`, as on
/// a kernel that does not have it, until it has been looked at.
pub const SYSCALL_NR_KNOWN_MAX: u32 = 467;

/// System calls answered with `ENOSYS` so that callers take their fallback path.
pub fn enosys_syscalls() -> Vec<(&'static str, i64)> {
    vec![
        ("clone3", libc::SYS_clone3),
        ("io_uring_setup", libc::SYS_io_uring_setup),
        ("io_uring_enter", libc::SYS_io_uring_enter),
        ("io_uring_register", libc::SYS_io_uring_register),
        // libmount falls back to /proc/self/mountinfo (which shows the same) on ENOSYS.
        // Newer than the libc crate's tables; the same numbers on x86_64 and aarch64.
        ("statmount", 457),
        ("listmount", 458),
    ]
}

/// One classic BPF instruction, laid out as the kernel's `struct sock_filter`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SockFilter {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

/// A position in the program, bound once with [`Asm::bind`].
#[derive(Clone, Copy, Debug)]
pub struct Label(usize);

/// Where a conditional jump goes.
#[derive(Clone, Copy, Debug)]
pub enum Jump {
    /// Fall through to the next instruction.
    Next,
    /// Jump forward to a label.
    To(Label),
}

/// A minimal classic-BPF assembler: forward jumps to labels, resolved by [`Asm::finish`].
#[derive(Default)]
pub struct Asm {
    insns: Vec<(u16, Jump, Jump, u32)>,
    labels: Vec<Option<usize>>,
}

impl Asm {
    /// A fresh, unbound label.
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Binds `label` to the next instruction emitted.
    pub fn bind(&mut self, label: Label) {
        assert!(
            self.labels[label.0].is_none(),
            "label {} bound twice",
            label.0
        );
        self.labels[label.0] = Some(self.insns.len());
    }

    /// Loads the 32-bit word at `offset` of `struct seccomp_data` into the accumulator.
    pub fn load(&mut self, offset: u32) {
        self.insns
            .push((BPF_LD_W_ABS, Jump::Next, Jump::Next, offset));
    }

    /// `if A == k goto jt else goto jf`.
    pub fn jeq(&mut self, k: u32, jt: Jump, jf: Jump) {
        self.insns.push((BPF_JMP_JEQ_K, jt, jf, k));
    }

    /// `if A >= k goto jt else goto jf` (unsigned).
    pub fn jge(&mut self, k: u32, jt: Jump, jf: Jump) {
        self.insns.push((BPF_JMP_JGE_K, jt, jf, k));
    }

    /// `if A & k != 0 goto jt else goto jf`.
    pub fn jset(&mut self, k: u32, jt: Jump, jf: Jump) {
        self.insns.push((BPF_JMP_JSET_K, jt, jf, k));
    }

    /// Returns `value` to the kernel.
    pub fn ret(&mut self, value: u32) {
        self.insns.push((BPF_RET_K, Jump::Next, Jump::Next, value));
    }

    /// Resolves labels into relative 8-bit offsets.
    pub fn finish(self) -> Result<Vec<SockFilter>, String> {
        let mut out = Vec::with_capacity(self.insns.len());
        for (at, &(code, jt, jf, k)) in self.insns.iter().enumerate() {
            let resolve = |j: Jump| -> Result<u8, String> {
                match j {
                    Jump::Next => Ok(0),
                    Jump::To(l) => {
                        let target = self.labels[l.0]
                            .ok_or_else(|| format!("label {} used at {at} but never bound", l.0))?;
                        if target <= at {
                            return Err(format!("jump at {at} to {target} is not forward"));
                        }
                        u8::try_from(target - at - 1).map_err(|_| {
                            format!("jump at {at} to {target} is longer than 255 instructions")
                        })
                    }
                }
            };
            out.push(SockFilter {
                code,
                jt: resolve(jt)?,
                jf: resolve(jf)?,
                k,
            });
        }
        match out.last() {
            Some(last) if last.code == BPF_RET_K => {}
            _ => return Err("program does not end in a return".into()),
        }
        if out.len() > 4096 {
            return Err(format!(
                "program has {} instructions; the kernel takes 4096",
                out.len()
            ));
        }
        Ok(out)
    }
}

fn nr(n: i64) -> u32 {
    u32::try_from(n).expect("system call numbers are small and positive")
}

/// Builds the sandbox filter.
pub fn build_filter() -> Result<Vec<SockFilter>, String> {
    let mut a = Asm::default();
    let kill = a.label();
    let eperm = a.label();
    let enosys = a.label();
    let allow = a.label();
    let clone_check = a.label();
    let socket_check = a.label();

    a.load(DATA_ARCH);
    a.jeq(AUDIT_ARCH_NATIVE, Jump::Next, Jump::To(kill));
    a.load(DATA_NR);
    #[cfg(target_arch = "x86_64")]
    a.jge(X32_SYSCALL_BIT, Jump::To(eperm), Jump::Next);
    a.jge(SYSCALL_NR_KNOWN_MAX + 1, Jump::To(enosys), Jump::Next);
    for (_, n) in denied_syscalls() {
        a.jeq(nr(n), Jump::To(eperm), Jump::Next);
    }
    for (_, n) in enosys_syscalls() {
        a.jeq(nr(n), Jump::To(enosys), Jump::Next);
    }
    a.jeq(nr(libc::SYS_clone), Jump::To(clone_check), Jump::Next);
    a.jeq(
        nr(libc::SYS_socket),
        Jump::To(socket_check),
        Jump::To(allow),
    );

    a.bind(clone_check);
    a.load(DATA_ARG0_LO);
    a.jset(CLONE_NEW_MASK, Jump::To(eperm), Jump::To(allow));

    a.bind(socket_check);
    a.load(DATA_ARG0_LO);
    for &(_, family) in SOCKET_FAMILIES_ALLOWED {
        let family = u32::try_from(family).expect("address families are positive");
        a.jeq(family, Jump::To(allow), Jump::Next);
    }
    a.ret(SECCOMP_RET_ERRNO | libc::EAFNOSUPPORT as u32);

    a.bind(kill);
    a.ret(SECCOMP_RET_KILL_PROCESS);
    a.bind(eperm);
    a.ret(SECCOMP_RET_ERRNO | libc::EPERM as u32);
    a.bind(enosys);
    a.ret(SECCOMP_RET_ERRNO | libc::ENOSYS as u32);
    a.bind(allow);
    a.ret(SECCOMP_RET_ALLOW);
    a.finish()
}

/// Installs `filter` on the calling thread. `PR_SET_NO_NEW_PRIVS` must already be set
/// (otherwise an unprivileged caller gets `EACCES`).
pub fn install(filter: &[SockFilter]) -> io::Result<()> {
    #[repr(C)]
    struct SockFprog {
        len: u16,
        filter: *const SockFilter,
    }
    let prog = SockFprog {
        len: u16::try_from(filter.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?,
        filter: filter.as_ptr(),
    };
    // SAFETY: `prog` points at `filter`, which outlives the call; the kernel copies it.
    let rc = unsafe {
        libc::prctl(
            libc::PR_SET_SECCOMP,
            libc::SECCOMP_MODE_FILTER as libc::c_ulong,
            &prog as *const SockFprog as libc::c_ulong,
            0,
            0,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fields of `struct seccomp_data` the filter can look at.
    struct Data {
        nr: u32,
        arch: u32,
        args: [u64; 6],
    }

    impl Data {
        fn call(nr: i64, arg0: u64) -> Data {
            Data {
                nr: nr as u32,
                arch: AUDIT_ARCH_NATIVE,
                args: [arg0, 0, 0, 0, 0, 0],
            }
        }
        fn word(&self, off: u32) -> u32 {
            match off {
                0 => self.nr,
                4 => self.arch,
                16..=63 if off.is_multiple_of(4) => {
                    let a = self.args[(off as usize - 16) / 8];
                    if off.is_multiple_of(8) {
                        a as u32
                    } else {
                        (a >> 32) as u32
                    }
                }
                _ => panic!("load from unexpected offset {off}"),
            }
        }
    }

    /// A classic-BPF interpreter for the instructions the assembler emits, with the kernel
    /// verifier's checks that matter here (jumps in range, every path returns).
    fn run(prog: &[SockFilter], d: &Data) -> u32 {
        let mut pc = 0usize;
        let mut acc = 0u32;
        let mut steps = 0;
        loop {
            steps += 1;
            assert!(steps <= prog.len(), "filter loops");
            let i = prog
                .get(pc)
                .unwrap_or_else(|| panic!("pc {pc} ran off the program"));
            let cond = |c: bool| pc + 1 + if c { i.jt as usize } else { i.jf as usize };
            match i.code {
                BPF_LD_W_ABS => {
                    acc = d.word(i.k);
                    pc += 1;
                }
                BPF_JMP_JEQ_K => pc = cond(acc == i.k),
                BPF_JMP_JGE_K => pc = cond(acc >= i.k),
                BPF_JMP_JSET_K => pc = cond(acc & i.k != 0),
                BPF_RET_K => return i.k,
                c => panic!("unknown opcode {c:#x}"),
            }
        }
    }

    fn eperm() -> u32 {
        SECCOMP_RET_ERRNO | libc::EPERM as u32
    }
    fn enosys() -> u32 {
        SECCOMP_RET_ERRNO | libc::ENOSYS as u32
    }

    #[test]
    fn every_denied_syscall_gets_eperm() {
        let f = build_filter().unwrap();
        for (name, n) in denied_syscalls() {
            assert_eq!(run(&f, &Data::call(n, 0)), eperm(), "{name}");
        }
    }

    #[test]
    fn clone3_and_io_uring_get_enosys() {
        let f = build_filter().unwrap();
        for (name, n) in enosys_syscalls() {
            assert_eq!(run(&f, &Data::call(n, 0)), enosys(), "{name}");
        }
    }

    #[test]
    fn system_calls_newer_than_the_list_get_enosys() {
        let f = build_filter().unwrap();
        for n in [SYSCALL_NR_KNOWN_MAX + 1, 500, 1023] {
            assert_eq!(run(&f, &Data::call(i64::from(n), 0)), enosys(), "{n}");
        }
        // The newest known ones are judged one by one (mseal is harmless).
        assert_eq!(run(&f, &Data::call(libc::SYS_mseal, 0)), SECCOMP_RET_ALLOW);
        assert_eq!(run(&f, &Data::call(467, 0)), eperm());
    }

    #[test]
    fn ordinary_syscalls_are_allowed() {
        let f = build_filter().unwrap();
        for n in [
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_openat,
            libc::SYS_mmap,
            libc::SYS_execve,
            libc::SYS_futex,
            libc::SYS_epoll_wait,
            libc::SYS_wait4,
            libc::SYS_vfork,
        ] {
            assert_eq!(run(&f, &Data::call(n, 0)), SECCOMP_RET_ALLOW, "syscall {n}");
        }
    }

    #[test]
    fn clone_is_allowed_without_namespace_flags() {
        let f = build_filter().unwrap();
        // What glibc passes for pthread_create and fork.
        let thread = (libc::CLONE_VM
            | libc::CLONE_FS
            | libc::CLONE_FILES
            | libc::CLONE_SIGHAND
            | libc::CLONE_THREAD
            | libc::CLONE_SYSVSEM
            | libc::CLONE_SETTLS
            | libc::CLONE_PARENT_SETTID
            | libc::CLONE_CHILD_CLEARTID) as u64;
        let fork = (libc::CLONE_CHILD_SETTID | libc::CLONE_CHILD_CLEARTID | libc::SIGCHLD) as u64;
        let vfork = (libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD) as u64;
        for flags in [thread, fork, vfork, 0] {
            assert_eq!(
                run(&f, &Data::call(libc::SYS_clone, flags)),
                SECCOMP_RET_ALLOW
            );
        }
        // Garbage in the upper half is not a namespace flag: the kernel ignores it.
        assert_eq!(
            run(&f, &Data::call(libc::SYS_clone, fork | 1 << 40)),
            SECCOMP_RET_ALLOW
        );
    }

    #[test]
    fn clone_with_any_namespace_flag_is_denied() {
        let f = build_filter().unwrap();
        let fork = libc::SIGCHLD as u64;
        for flag in [
            libc::CLONE_NEWNS,
            libc::CLONE_NEWCGROUP,
            libc::CLONE_NEWUTS,
            libc::CLONE_NEWIPC,
            libc::CLONE_NEWUSER,
            libc::CLONE_NEWPID,
            libc::CLONE_NEWNET,
        ] {
            let d = Data::call(libc::SYS_clone, fork | flag as u32 as u64);
            assert_eq!(run(&f, &d), eperm(), "flag {flag:#x}");
        }
    }

    #[test]
    fn sched_setaffinity_is_denied_and_getaffinity_allowed() {
        let f = build_filter().unwrap();
        assert_eq!(
            run(&f, &Data::call(libc::SYS_sched_setaffinity, 0)),
            eperm()
        );
        assert_eq!(
            run(&f, &Data::call(libc::SYS_sched_getaffinity, 0)),
            SECCOMP_RET_ALLOW
        );
    }

    #[test]
    fn socket_opens_only_namespaced_families() {
        let f = build_filter().unwrap();
        let eafnosupport = SECCOMP_RET_ERRNO | libc::EAFNOSUPPORT as u32;
        for &(name, family) in SOCKET_FAMILIES_ALLOWED {
            let d = Data::call(libc::SYS_socket, family as u64);
            assert_eq!(run(&f, &d), SECCOMP_RET_ALLOW, "{name}");
        }
        for family in [
            libc::AF_VSOCK,
            libc::AF_PACKET,
            libc::AF_BLUETOOTH,
            libc::AF_ALG,
            libc::AF_KEY,
            libc::AF_UNSPEC,
            4242,
        ] {
            let d = Data::call(libc::SYS_socket, family as u64);
            assert_eq!(run(&f, &d), eafnosupport, "family {family}");
        }
        // The family is an int: garbage in the upper half does not turn AF_VSOCK into AF_UNIX
        // or the reverse (the kernel reads the low 32 bits).
        let d = Data::call(libc::SYS_socket, libc::AF_INET as u64 | 1 << 40);
        assert_eq!(run(&f, &d), SECCOMP_RET_ALLOW);
        let d = Data::call(libc::SYS_socket, libc::AF_VSOCK as u64 | 1 << 40);
        assert_eq!(run(&f, &d), eafnosupport);
        // socketpair has no family that escapes the namespace worth filtering: it stays allowed.
        assert_eq!(
            run(&f, &Data::call(libc::SYS_socketpair, libc::AF_UNIX as u64)),
            SECCOMP_RET_ALLOW
        );
    }

    #[test]
    fn foreign_architecture_is_killed() {
        let f = build_filter().unwrap();
        let mut d = Data::call(libc::SYS_read, 0);
        d.arch = 0x4000_0003; // AUDIT_ARCH_I386
        assert_eq!(run(&f, &d), SECCOMP_RET_KILL_PROCESS);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn x32_syscalls_are_denied() {
        let f = build_filter().unwrap();
        let d = Data::call(libc::SYS_read | X32_SYSCALL_BIT as i64, 0);
        assert_eq!(run(&f, &d), eperm());
    }

    #[test]
    fn lists_have_no_duplicates_or_allowed_essentials() {
        let mut all: Vec<i64> = denied_syscalls()
            .iter()
            .chain(&enosys_syscalls())
            .map(|p| p.1)
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "a syscall is listed twice");
        for essential in [
            libc::SYS_execve,
            libc::SYS_clone,
            libc::SYS_exit_group,
            libc::SYS_close_range,
        ] {
            assert!(!all.contains(&essential));
        }
    }

    #[test]
    fn assembler_rejects_jumps_longer_than_255() {
        let mut a = Asm::default();
        let far = a.label();
        a.load(DATA_NR);
        a.jeq(1, Jump::To(far), Jump::Next);
        for _ in 0..256 {
            a.ret(SECCOMP_RET_ALLOW);
        }
        a.bind(far);
        a.ret(eperm());
        let err = a.finish().unwrap_err();
        assert!(err.contains("longer than 255"), "{err}");
    }

    #[test]
    fn assembler_resolves_the_longest_legal_jump() {
        let mut a = Asm::default();
        let far = a.label();
        a.load(DATA_NR);
        a.jeq(7, Jump::To(far), Jump::Next);
        for _ in 0..255 {
            a.ret(SECCOMP_RET_ALLOW);
        }
        a.bind(far);
        a.ret(eperm());
        let prog = a.finish().unwrap();
        assert_eq!(prog[1].jt, 255);
        assert_eq!(run(&prog, &Data::call(7, 0)), eperm());
        assert_eq!(run(&prog, &Data::call(8, 0)), SECCOMP_RET_ALLOW);
    }

    #[test]
    fn assembler_rejects_unbound_labels_and_missing_return() {
        let mut a = Asm::default();
        let l = a.label();
        a.load(DATA_NR);
        a.jeq(1, Jump::To(l), Jump::Next);
        a.ret(SECCOMP_RET_ALLOW);
        assert!(a.finish().unwrap_err().contains("never bound"));

        let mut a = Asm::default();
        a.load(DATA_NR);
        assert!(a.finish().unwrap_err().contains("does not end in a return"));
    }
}
