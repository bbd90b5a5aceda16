//! Real process sandboxes around real Node.js: what a function can and cannot reach.
//!
//! Each test starts sandboxes with `hearth __sandbox` (the launcher), runs `node -e <script>`
//! (or a syscall probe: this test binary itself, copied into the code directory) as PID 1,
//! and reads the results the script writes to fd 3, the sandbox's end of the channel.
//!
//! They need root (namespaces with an id map, cgroups, mounts); without it they say so and
//! pass vacuously. They need Node.js at /usr/bin/node. Set HEARTH_SANDBOX_STDERR=inherit to
//! see what Node prints inside.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hearth::runtime::root as rootfs;
use hearth::sandbox::process::{spawn, Sandbox, SandboxError, SandboxSpec};
use serde_json::Value;

const NODE: &str = "/usr/bin/node";
const HEARTH: &str = env!("CARGO_BIN_EXE_hearth");
const PROBE_ENV: &str = "HEARTH_SECCOMP_PROBE";

fn can_run() -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipping: process sandbox tests need root (user namespace id maps, cgroups)");
        return false;
    }
    if !Path::new(NODE).exists() {
        eprintln!("skipping: {NODE} is missing");
        return false;
    }
    true
}

/// Test data lives outside /tmp (under the target dir), so "not visible inside" means
/// confinement, not merely "hidden by the sandbox's own /tmp".
fn base_dir() -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("sandbox-isolation-{}", std::process::id()));
    fs::create_dir_all(&d).unwrap();
    d
}

fn runtime_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        let base = base_dir();
        let shim = base.join("bootstrap.js");
        fs::write(&shim, "// test shim\n").unwrap();
        // Shared across runs: building it copies ~100 MB of Node.js.
        let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("sandbox-runtime-cache");
        rootfs::ensure_runtime(&cache, Path::new(NODE), Path::new("/usr/bin/true"), &shim).unwrap()
    })
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique instance name and host uid.
fn identity() -> (String, u32) {
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    (format!("t{pid}-{n}"), 200_000 + (pid % 1000) * 100 + n)
}

/// A code directory holding `index.js`, readable by the sandbox's uid.
fn code_dir(tag: &str) -> PathBuf {
    let d = base_dir().join(format!(
        "code-{tag}-{}",
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::create_dir_all(&d).unwrap();
    fs::write(d.join("index.js"), "module.exports = 42;\n").unwrap();
    fs::set_permissions(&d, fs::Permissions::from_mode(0o755)).unwrap();
    d
}

fn spec_for(code: &Path, argv: Vec<String>) -> SandboxSpec {
    let (name, host_uid) = identity();
    SandboxSpec {
        runtime_root: runtime_root().to_path_buf(),
        code_dir: code.to_path_buf(),
        tmp_bytes: 8 << 20,
        memory_bytes: 256 << 20,
        pids_max: 64,
        cpu_millicores: 0,
        cpu_core: None,
        cpu_background: false,
        host_uid,
        name,
        argv,
        env: vec![
            ("PATH".into(), "/usr/bin".into()),
            ("HOME".into(), "/tmp".into()),
        ],
        binds: vec![],
        pipes: false,
        parent_cpu_weight: 0,
    }
}

fn node_spec(script: &str) -> SandboxSpec {
    spec_for(
        &code_dir("node"),
        vec![NODE.into(), "-e".into(), script.into()],
    )
}

/// Reads one newline-terminated message from the channel (bounded by `timeout`).
fn read_message(fd: &OwnedFd, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    loop {
        if buf.ends_with(b"\n") {
            break;
        }
        let left = deadline
            .saturating_duration_since(Instant::now())
            .as_millis() as i32;
        assert!(
            left > 0,
            "no message from the sandbox within {timeout:?}; got {:?}",
            String::from_utf8_lossy(&buf)
        );
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        if unsafe { libc::poll(&mut pfd, 1, left) } <= 0 {
            continue;
        }
        let mut chunk = [0u8; 65536];
        // SAFETY: reads into a valid buffer.
        let n = unsafe { libc::read(fd.as_raw_fd(), chunk.as_mut_ptr().cast(), chunk.len()) };
        if n <= 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n as usize]);
    }
    String::from_utf8(buf).unwrap()
}

fn read_json(sb: &mut Sandbox) -> Value {
    let text = read_message(&sb.channel, Duration::from_secs(20));
    match serde_json::from_str(text.trim()) {
        Ok(v) => v,
        Err(e) => {
            std::thread::sleep(Duration::from_millis(200));
            panic!(
                "bad message {text:?} ({e}); wait status {:?}",
                sb.try_wait().map(|s| format!("{s:#x}"))
            )
        }
    }
}

/// Waits for PID 1 to exit; returns its raw wait status.
fn wait_exit(sb: &mut Sandbox, timeout: Duration) -> i32 {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = sb.try_wait() {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "sandbox pid {} still running after {timeout:?}",
            sb.pid
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A JS prelude: `t(f)` runs f and returns "ok" or the error code; `send(obj)` reports.
const PRELUDE: &str = r#"
const fs = require('fs');
function t(f) { try { f(); return 'ok'; } catch (e) { return e.code || String(e); } }
function send(o) { fs.writeSync(3, JSON.stringify(o) + '\n'); }
"#;

#[test]
fn file_system_is_confined_read_only_except_a_size_limited_tmp() {
    if !can_run() {
        return;
    }
    let other = code_dir("other");
    let root = runtime_root();
    assert!(Path::new("/etc/shadow").exists() && other.exists() && root.exists());
    let script = format!(
        r#"{PRELUDE}
const r = {{}};
r.shadow = t(() => fs.readFileSync('/etc/shadow'));
r.host_bin = t(() => fs.readFileSync('/usr/bin/ls'));
r.state = t(() => fs.readdirSync({state:?}));
r.other_code = t(() => fs.readdirSync({other:?}));
r.task = fs.readFileSync('/var/task/index.js', 'utf8');
r.task_write = t(() => fs.writeFileSync('/var/task/x', 'x'));
r.task_overwrite = t(() => fs.writeFileSync('/var/task/index.js', 'x'));
r.task_append = t(() => fs.appendFileSync('/var/task/index.js', 'x'));
r.root_write = t(() => fs.writeFileSync('/x', 'x'));
r.etc_write = t(() => fs.appendFileSync('/etc/passwd', 'x'));
r.node_write = t(() => fs.appendFileSync('/usr/bin/node', 'x'));
r.dev_write = t(() => fs.writeFileSync('/dev/x', 'x'));
r.tmp_write = t(() => fs.writeFileSync('/tmp/x', 'hello'));
r.tmp_mode = (fs.statSync('/tmp').mode & 0o7777).toString(8);
r.dev_null = t(() => fs.writeFileSync('/dev/null', 'x'));
r.urandom = fs.readSync(fs.openSync('/dev/urandom', 'r'), Buffer.alloc(8)) === 8;
r.dev_fd = fs.readlinkSync('/dev/fd');
// One file larger than /tmp: RLIMIT_FSIZE or the tmpfs stops it (Node ignores SIGXFSZ).
r.big = t(() => fs.writeFileSync('/tmp/big', Buffer.alloc(9 << 20, 1)));
t(() => fs.unlinkSync('/tmp/big'));
const mb = Buffer.alloc(1 << 20, 1);
let n = 0;
r.fill = (() => {{ try {{ for (let i = 0; i < 64; i++) {{ fs.writeFileSync('/tmp/f' + i, mb); n++; }} return 'no error'; }} catch (e) {{ return e.code; }} }})();
r.filled_mib = n;
r.cwd = process.cwd();
send(r);
"#,
        state = root.parent().unwrap().to_str().unwrap(),
        other = other.to_str().unwrap(),
    );
    let spec = node_spec(&script);
    // The sandbox's root owns its code, so only the read-only mount stands in the way.
    let code = &spec.code_dir;
    for p in [code.clone(), code.join("index.js")] {
        std::os::unix::fs::chown(&p, Some(spec.host_uid), Some(spec.host_uid)).unwrap();
    }
    let mut sb = spawn(Path::new(HEARTH), &spec).unwrap();
    let r = read_json(&mut sb);
    let status = wait_exit(&mut sb, Duration::from_secs(20));
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "status {status:#x}, {r}"
    );
    for key in ["shadow", "host_bin", "state", "other_code"] {
        assert_eq!(r[key], "ENOENT", "{key}: {r}");
    }
    assert_eq!(r["task"], "module.exports = 42;\n");
    for key in [
        "task_write",
        "task_overwrite",
        "task_append",
        "root_write",
        "dev_write",
    ] {
        assert_eq!(r[key], "EROFS", "{key}: {r}");
    }
    // Host-owned files of the root fail the permission check before the read-only one.
    for key in ["etc_write", "node_write"] {
        assert!(r[key] == "EACCES" || r[key] == "EROFS", "{key}: {r}");
    }
    assert_eq!(r["tmp_write"], "ok");
    assert_eq!(r["tmp_mode"], "1777");
    assert_eq!(r["dev_null"], "ok");
    assert_eq!(r["urandom"], true);
    assert_eq!(r["dev_fd"], "/proc/self/fd");
    assert_eq!(r["fill"], "ENOSPC", "{r}");
    assert!(r["big"] == "EFBIG" || r["big"] == "ENOSPC", "{r}");
    // 8 MiB of /tmp: seven whole files fit next to /tmp/x, the eighth does not.
    let filled = r["filled_mib"].as_u64().unwrap();
    assert!((6..=7).contains(&filled), "{r}");
    assert_eq!(r["cwd"], "/var/task");
    sb.destroy();
}

#[test]
fn proc_shows_only_the_sandbox_and_the_environment_is_exactly_the_spec() {
    if !can_run() {
        return;
    }
    let script = format!(
        r#"{PRELUDE}
const os = require('os');
send({{
  pid: process.pid,
  self: fs.readlinkSync('/proc/self'),
  pids: fs.readdirSync('/proc').filter(d => /^\d+$/.test(d)),
  cmdline1: fs.readFileSync('/proc/1/cmdline', 'utf8').split('\0')[0],
  env: process.env,
  hostname: os.hostname(),
  fd2: fs.readlinkSync('/proc/self/fd/2'),
  fd3: fs.readlinkSync('/proc/self/fd/3'),
  cpus_allowed: fs.readFileSync('/proc/self/status', 'utf8').match(/Cpus_allowed_list:\s*(\S+)/)[1],
}});
"#
    );
    let mut spec = node_spec(&script);
    spec.env.push(("GREETING".into(), "a b=c".into()));
    spec.cpu_core = Some(1.min(std::thread::available_parallelism().unwrap().get() - 1));
    let mut sb = spawn(Path::new(HEARTH), &spec).unwrap();
    let r = read_json(&mut sb);
    wait_exit(&mut sb, Duration::from_secs(20));
    assert_eq!(r["pid"], 1);
    assert_eq!(r["self"], "1");
    assert_eq!(r["pids"], serde_json::json!(["1"]));
    assert_eq!(r["cmdline1"], NODE);
    let env: BTreeMap<String, String> = serde_json::from_value(r["env"].clone()).unwrap();
    let want: BTreeMap<String, String> = spec.env.iter().cloned().collect();
    assert_eq!(env, want);
    assert_eq!(r["hostname"], "localhost");
    assert_eq!(
        r["fd2"], "/dev/null",
        "hearth's stderr must not reach the sandbox by default"
    );
    assert!(r["fd3"].as_str().unwrap().starts_with("socket:"), "{r}");
    assert_eq!(r["cpus_allowed"], spec.cpu_core.unwrap().to_string());
}

#[test]
fn network_is_loopback_only() {
    if !can_run() {
        return;
    }
    let host_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = host_listener.local_addr().unwrap().port();
    let script = format!(
        r#"{PRELUDE}
const net = require('net');
const os = require('os');
const r = {{ interfaces: Object.keys(os.networkInterfaces()) }};
const host = net.connect({port}, '127.0.0.1');
host.on('connect', () => {{ r.host = 'connected'; host.destroy(); next(); }});
host.on('error', e => {{ r.host = e.code; next(); }});
function next() {{
  // Loopback inside works: a server of our own is reachable.
  const srv = net.createServer(c => c.end('hi')).listen(0, '127.0.0.1', () => {{
    const c = net.connect(srv.address().port, '127.0.0.1');
    c.on('data', d => {{ r.own = String(d); srv.close(); send(r); }});
    c.on('error', e => {{ r.own = e.code; send(r); }});
  }});
}}
"#
    );
    let mut sb = spawn(Path::new(HEARTH), &node_spec(&script)).unwrap();
    let r = read_json(&mut sb);
    wait_exit(&mut sb, Duration::from_secs(20));
    assert_eq!(r["interfaces"], serde_json::json!(["lo"]), "{r}");
    assert_eq!(r["host"], "ECONNREFUSED", "{r}");
    assert_eq!(r["own"], "hi", "{r}");
    drop(host_listener);
}

fn status_field(status: &str, key: &str) -> String {
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key} in status"))
        .trim()
        .to_string()
}

#[test]
fn root_inside_is_an_unprivileged_host_uid_without_capabilities() {
    if !can_run() {
        return;
    }
    let script = format!(
        r#"{PRELUDE}
send({{ uid: process.getuid(), gid: process.getgid(), groups: process.getgroups(),
        status: fs.readFileSync('/proc/self/status', 'utf8'),
        passwd: t(() => fs.readFileSync('/etc/passwd', 'utf8')) }});
setInterval(() => {{}}, 1e6);
"#
    );
    let mut spec = node_spec(&script);
    spec.cpu_millicores = 500;
    let mut sb = spawn(Path::new(HEARTH), &spec).unwrap();
    let r = read_json(&mut sb);
    assert_eq!(r["uid"], 0);
    assert_eq!(r["gid"], 0);
    // Node adds the effective gid to getgroups(); the supplementary list itself is empty.
    assert_eq!(r["groups"], serde_json::json!([0]), "{r}");
    assert_eq!(r["passwd"], "ok");
    let inside = r["status"].as_str().unwrap();
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        assert_eq!(status_field(inside, cap), "0000000000000000", "{cap}");
    }
    assert_eq!(status_field(inside, "Groups"), "");
    assert_eq!(status_field(inside, "NoNewPrivs"), "1");
    assert_eq!(status_field(inside, "Seccomp"), "2");

    // The host sees the mapped id.
    let host = fs::read_to_string(format!("/proc/{}/status", sb.pid)).unwrap();
    let uid = spec.host_uid.to_string();
    assert_eq!(status_field(&host, "Uid"), [uid.as_str(); 4].join("\t"));
    assert_eq!(status_field(&host, "Gid"), [uid.as_str(); 4].join("\t"));
    // Memory accounting sees Node (tens of MiB resident).
    if let Some(bytes) = sb.memory_bytes() {
        assert!(bytes > 4 << 20 && bytes < spec.memory_bytes, "{bytes}");
    }
    // And the cpu quota is in place where there is a cpu cgroup.
    for d in sb.cgroup_dirs() {
        let quota = d.join("cpu.cfs_quota_us");
        if quota.exists() {
            assert_eq!(fs::read_to_string(quota).unwrap().trim(), "50000");
        }
        let max = d.join("cpu.max");
        if max.exists() {
            assert_eq!(fs::read_to_string(max).unwrap().trim(), "50000 100000");
        }
        // cgroup v1 charges socket buffers only under a TCP limit (v2 always does).
        let tcp = d.join("memory.kmem.tcp.limit_in_bytes");
        if tcp.exists() {
            let limit = fs::read_to_string(tcp).unwrap();
            assert_eq!(limit.trim(), spec.memory_bytes.to_string(), "kmem.tcp");
        }
    }
    sb.destroy();
}

/// Spawns a sandbox whose PID 1 is a copy of this test binary (in `code_dir(tag)`) running
/// only the test `helper`, with `PROBE_ENV` = `probe` and the spec adjusted by `configure`;
/// returns the sandbox, its code directory and the JSON the helper reported on fd 3.
fn run_probe(
    tag: &str,
    helper: &str,
    probe: &str,
    configure: impl FnOnce(&mut SandboxSpec),
) -> (Sandbox, PathBuf, Value) {
    let code = code_dir(tag);
    let exe = code.join("probe");
    fs::copy(std::env::current_exe().unwrap(), &exe).unwrap();
    fs::set_permissions(&exe, fs::Permissions::from_mode(0o755)).unwrap();
    let argv = [
        "/var/task/probe",
        "--exact",
        helper,
        "--test-threads=1",
        "-q",
    ];
    let mut spec = spec_for(&code, argv.map(String::from).to_vec());
    spec.env.push((PROBE_ENV.into(), probe.into()));
    configure(&mut spec);
    let sb = spawn(Path::new(HEARTH), &spec).unwrap();
    let text = read_message(&sb.channel, Duration::from_secs(20));
    let r: Value = serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{text:?}: {e}"));
    (sb, code, r)
}

/// What a probe helper found, as one JSON line on the channel (fd 3).
fn report(r: serde_json::Map<String, Value>) {
    let msg = format!("{}\n", Value::Object(r));
    // SAFETY: writes a valid buffer to the channel.
    unsafe { libc::write(3, msg.as_ptr().cast(), msg.len()) };
}

/// The seccomp probe: runs only inside a sandbox (`PROBE_ENV` set), where this test binary is
/// PID 1. It tries denied and allowed system calls and reports errno values on fd 3.
#[test]
fn seccomp_probe_helper() {
    if std::env::var_os(PROBE_ENV).is_none() {
        return;
    }
    fn errno_of(rc: libc::c_long) -> String {
        if rc >= 0 {
            "ok".into()
        } else {
            let e = std::io::Error::last_os_error().raw_os_error().unwrap();
            match e {
                libc::EPERM => "EPERM".into(),
                libc::ENOSYS => "ENOSYS".into(),
                libc::EINVAL => "EINVAL".into(),
                libc::EFAULT => "EFAULT".into(),
                other => format!("errno {other}"),
            }
        }
    }
    let mut r = serde_json::Map::new();
    let mut put = |k: &str, v: String| {
        r.insert(k.into(), Value::String(v));
    };
    // SAFETY: each call either fails or does something harmless to this throwaway process.
    unsafe {
        put(
            "unshare_user",
            errno_of(libc::unshare(libc::CLONE_NEWUSER) as _),
        );
        put(
            "mount",
            errno_of(libc::mount(
                c"none".as_ptr(),
                c"/tmp".as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null(),
            ) as _),
        );
        let rc = libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_NEWNS | libc::SIGCHLD) as libc::c_ulong,
            0,
            0,
            0,
            0,
        );
        if rc == 0 {
            libc::_exit(0);
        }
        put("clone_newns", errno_of(rc));
        put(
            "clone3",
            errno_of(libc::syscall(libc::SYS_clone3, std::ptr::null::<u8>(), 0)),
        );
        put(
            "io_uring_setup",
            errno_of(libc::syscall(
                libc::SYS_io_uring_setup,
                4,
                std::ptr::null::<u8>(),
            )),
        );
        put(
            "keyctl",
            errno_of(libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0)),
        );
        put("bpf", errno_of(libc::syscall(libc::SYS_bpf, 0, 0, 0)));
        // Reading our own memory needs no privilege (unlike ptrace, which would leave this
        // process traced by hearth if it were allowed).
        let mut word = 0u64;
        let src = 42u64;
        let local = libc::iovec {
            iov_base: (&mut word as *mut u64).cast(),
            iov_len: 8,
        };
        let remote = libc::iovec {
            iov_base: (&src as *const u64).cast_mut().cast(),
            iov_len: 8,
        };
        put(
            "process_vm_readv",
            errno_of(libc::process_vm_readv(libc::getpid(), &local, 1, &remote, 1, 0) as _),
        );
        put(
            "x32_getpid",
            errno_of(libc::syscall(0x4000_0000 | libc::SYS_getpid)),
        );
        // fork through plain clone still works (clone3 above answered ENOSYS, so glibc and
        // libuv take this path).
        let child = libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0);
        if child == 0 {
            libc::_exit(7);
        }
        let mut status = 0;
        libc::waitpid(child as i32, &mut status, 0);
        put(
            "fork",
            if child > 0 && libc::WEXITSTATUS(status) == 7 {
                "ok".into()
            } else {
                format!("failed {child}")
            },
        );
        // Threads: glibc tries clone3, gets ENOSYS, falls back to clone.
        put(
            "thread",
            std::thread::spawn(|| 5)
                .join()
                .map(|v| v.to_string())
                .unwrap_or_default(),
        );
    }
    report(r);
}

#[test]
fn seccomp_filter_denies_dangerous_syscalls_live() {
    if !can_run() {
        return;
    }
    let (mut sb, code, r) = run_probe("probe", "seccomp_probe_helper", "1", |_| {});
    let status = wait_exit(&mut sb, Duration::from_secs(20));
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "status {status:#x}"
    );
    // unshare(CLONE_NEWUSER), clone(CLONE_NEWNS) after it and process_vm_readv on ourselves
    // need no privilege, so EPERM there is the filter's doing.
    for key in [
        "unshare_user",
        "mount",
        "clone_newns",
        "keyctl",
        "bpf",
        "process_vm_readv",
        "x32_getpid",
    ] {
        assert_eq!(r[key], "EPERM", "{key}: {r}");
    }
    assert_eq!(r["clone3"], "ENOSYS", "{r}");
    assert_eq!(r["io_uring_setup"], "ENOSYS", "{r}");
    assert_eq!(r["fork"], "ok", "{r}");
    assert_eq!(r["thread"], "5", "{r}");
    sb.destroy();
    let _ = fs::remove_dir_all(&code);
}

#[test]
fn memory_hog_is_oom_killed() {
    if !can_run() {
        return;
    }
    let script = format!(
        r#"{PRELUDE}
send({{ started: true }});
const keep = [];
for (;;) {{ keep.push(Buffer.alloc(1 << 20, 1)); }}
"#
    );
    let mut spec = node_spec(&script);
    spec.memory_bytes = 64 << 20;
    let mut sb = spawn(Path::new(HEARTH), &spec).unwrap();
    if sb.cgroup_dirs().is_empty() {
        eprintln!("skipping the OOM check: no cgroups ({:?})", sb.warnings);
        return;
    }
    assert_eq!(read_json(&mut sb)["started"], true);
    let status = wait_exit(&mut sb, Duration::from_secs(30));
    assert!(
        libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL,
        "status {status:#x}"
    );
    assert!(sb.oom_killed());
    sb.destroy();
}

#[test]
fn fork_bomb_is_contained_by_the_pids_limit() {
    if !can_run() {
        return;
    }
    let script = format!(
        r#"{PRELUDE}
const {{ spawn }} = require('child_process');
const codes = {{}};
let spawned = 0;
for (let i = 0; i < 200; i++) {{
  try {{
    const c = spawn('/usr/bin/node', ['-e', 'setInterval(() => {{}}, 1e6)'], {{ stdio: 'ignore' }});
    c.on('error', e => {{ codes[e.code] = (codes[e.code] || 0) + 1; }});
    if (c.pid) spawned++;
  }} catch (e) {{ codes[e.code] = (codes[e.code] || 0) + 1; }}
}}
setTimeout(() => send({{ spawned, codes }}), 300);
setInterval(() => {{}}, 1e6);
"#
    );
    let mut spec = node_spec(&script);
    spec.pids_max = 16;
    let mut sb = spawn(Path::new(HEARTH), &spec).unwrap();
    let r = read_json(&mut sb);
    assert!(r["codes"]["EAGAIN"].as_u64().unwrap_or(0) > 0, "{r}");
    assert!(r["spawned"].as_u64().unwrap() < 16, "{r}");
    if let Some(pids) = sb
        .cgroup_dirs()
        .iter()
        .map(|d| d.join("pids.current"))
        .find(|p| p.exists())
    {
        let current: u32 = fs::read_to_string(pids).unwrap().trim().parse().unwrap();
        assert!(current <= 16, "pids.current {current}");
    }
    // The host is fine.
    assert!(std::process::Command::new("/bin/true")
        .status()
        .unwrap()
        .success());
    sb.destroy();
}

/// Host pids of every process whose real uid is `uid`.
fn host_processes_of(uid: u32) -> Vec<i32> {
    let mut v = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(status) = fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        if status_field(&status, "Uid").split('\t').next() == Some(uid.to_string().as_str()) {
            v.push(pid);
        }
    }
    v
}

#[test]
fn destroy_kills_every_process_and_removes_the_cgroups() {
    if !can_run() {
        return;
    }
    let script = format!(
        r#"{PRELUDE}
const {{ spawn }} = require('child_process');
for (let i = 0; i < 3; i++) spawn('/usr/bin/node', ['-e', 'setInterval(() => {{}}, 1e6)'], {{ stdio: 'ignore' }});
setTimeout(() => send({{ n: fs.readdirSync('/proc').filter(d => /^\d+$/.test(d)).length }}), 500);
setInterval(() => {{}}, 1e6);
"#
    );
    let spec = node_spec(&script);
    let mut sb = spawn(Path::new(HEARTH), &spec).unwrap();
    let r = read_json(&mut sb);
    assert_eq!(r["n"], 4, "{r}");
    let before = host_processes_of(spec.host_uid);
    assert_eq!(before.len(), 4, "{before:?}");
    let dirs = sb.cgroup_dirs();
    for d in &dirs {
        assert!(d.exists());
    }
    let t = Instant::now();
    sb.destroy();
    eprintln!("destroy with 4 processes took {:?}", t.elapsed());
    assert_eq!(host_processes_of(spec.host_uid), Vec::<i32>::new());
    for d in &dirs {
        assert!(!d.exists(), "{} still exists", d.display());
    }
}

#[test]
fn setup_failures_are_reported_and_leave_nothing_behind() {
    if !can_run() {
        return;
    }
    let spec = spec_for(
        &code_dir("missing"),
        vec!["/usr/bin/no-such-runtime".into()],
    );
    let err = match spawn(Path::new(HEARTH), &spec) {
        Ok(_) => panic!("a missing command must fail spawn"),
        Err(e) => e,
    };
    assert!(matches!(err, SandboxError::Setup(_)), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("execve") && msg.contains("no-such-runtime") && msg.contains("No such file"),
        "{msg}"
    );
    assert_eq!(host_processes_of(spec.host_uid), Vec::<i32>::new());

    let mut bad = spec_for(&PathBuf::from("/nonexistent/code"), vec![NODE.into()]);
    bad.name.push_str("-nocode");
    let err = spawn(Path::new(HEARTH), &bad)
        .err()
        .expect("a missing code dir must fail spawn");
    assert!(err.to_string().contains("/nonexistent/code"), "{err}");
    // No cgroup directory of either attempt is left.
    let own = fs::read_to_string("/proc/self/cgroup").unwrap();
    if let Some(path) = own.lines().find_map(|l| {
        l.split(':')
            .nth(1)
            .filter(|c| *c == "memory")
            .and(l.split(':').nth(2))
    }) {
        for name in [&spec.name, &bad.name] {
            let dir = Path::new("/sys/fs/cgroup/memory")
                .join(path.trim_start_matches('/'))
                .join("hearth")
                .join(name);
            assert!(!dir.exists(), "{} left behind", dir.display());
        }
    }
}

#[test]
fn channel_carries_bytes_both_ways() {
    if !can_run() {
        return;
    }
    let script = format!(
        r#"{PRELUDE}
const b = Buffer.alloc(64);
const n = fs.readSync(3, b, 0, 64, null);
fs.writeSync(3, 'echo:' + b.toString('utf8', 0, n));
"#
    );
    let mut sb = spawn(Path::new(HEARTH), &node_spec(&script)).unwrap();
    // SAFETY: writes a valid buffer to our end of the socketpair.
    let n = unsafe { libc::write(sb.channel.as_raw_fd(), b"ping\n".as_ptr().cast(), 5) };
    assert_eq!(n, 5);
    assert_eq!(
        read_message(&sb.channel, Duration::from_secs(20)),
        "echo:ping\n"
    );
    let status = wait_exit(&mut sb, Duration::from_secs(20));
    assert_eq!(status, 0);
    // After exit, the channel reports end-of-file.
    let mut f = fs::File::from(sb.channel.try_clone().unwrap());
    let mut rest = Vec::new();
    f.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
}

#[test]
fn concurrent_spawns_do_not_leak_channels_into_each_other() {
    if !can_run() {
        return;
    }
    // If a launcher inherited another sandbox's channel end, that channel would not see
    // end-of-file when its own sandbox exits.
    let threads: Vec<_> = (0..6)
        .map(|_| {
            std::thread::spawn(|| {
                for _ in 0..3 {
                    let spec = node_spec("require('fs').writeSync(3, 'bye')");
                    let mut sb = spawn(Path::new(HEARTH), &spec).unwrap();
                    let mut all = Vec::new();
                    let deadline = Instant::now() + Duration::from_secs(30);
                    loop {
                        let left = deadline.saturating_duration_since(Instant::now());
                        assert!(
                            !left.is_zero(),
                            "channel of {} never reached end-of-file",
                            spec.name
                        );
                        let mut pfd = libc::pollfd {
                            fd: sb.channel.as_raw_fd(),
                            events: libc::POLLIN,
                            revents: 0,
                        };
                        // SAFETY: one valid pollfd.
                        if unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) } <= 0 {
                            continue;
                        }
                        let mut b = [0u8; 64];
                        // SAFETY: reads into a valid buffer.
                        let n = unsafe {
                            libc::read(sb.channel.as_raw_fd(), b.as_mut_ptr().cast(), 64)
                        };
                        if n <= 0 {
                            break;
                        }
                        all.extend_from_slice(&b[..n as usize]);
                    }
                    assert_eq!(all, b"bye", "output of {}", spec.name);
                    assert_eq!(
                        wait_exit(&mut sb, Duration::from_secs(10)),
                        0,
                        "wait status of {}",
                        spec.name
                    );
                    let dirs = sb.cgroup_dirs();
                    sb.destroy();
                    assert!(dirs.iter().all(|d| !d.exists()));
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

/// Time from `spawn()` to the first byte on the channel, against bare `node -e` on the host.
/// Run with `cargo test --test sandbox_isolation -- --ignored --nocapture`.
#[test]
#[ignore = "measurement; run explicitly"]
fn measure_spawn_to_first_byte() {
    if !can_run() {
        return;
    }
    const RUNS: usize = 21;
    let code = code_dir("bench");
    let mut sandboxed = Vec::new();
    let mut spawn_only = Vec::new();
    for _ in 0..RUNS {
        let spec = spec_for(
            &code,
            vec![
                NODE.into(),
                "-e".into(),
                "require('fs').writeSync(3,'x')".into(),
            ],
        );
        let t = Instant::now();
        let sb = spawn(Path::new(HEARTH), &spec).unwrap();
        spawn_only.push(t.elapsed());
        let mut b = [0u8; 1];
        // SAFETY: blocking read of one byte into a valid buffer.
        let n = unsafe { libc::read(sb.channel.as_raw_fd(), b.as_mut_ptr().cast(), 1) };
        assert_eq!(n, 1);
        sandboxed.push(t.elapsed());
        sb.destroy();
    }
    let mut bare = Vec::new();
    for _ in 0..RUNS {
        let t = Instant::now();
        // Same environment as the sandbox: an inherited NODE_EXTRA_CA_CERTS alone adds ~25 ms.
        let mut c = std::process::Command::new(NODE)
            .args(["-e", "process.stdout.write('x')"])
            .env_clear()
            .envs([("PATH", "/usr/bin"), ("HOME", "/tmp")])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut b = [0u8; 1];
        c.stdout.as_mut().unwrap().read_exact(&mut b).unwrap();
        bare.push(t.elapsed());
        c.wait().unwrap();
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    let (s, o, b) = (
        median(&mut sandboxed),
        median(&mut spawn_only),
        median(&mut bare),
    );
    eprintln!("median over {RUNS}: spawn() returned {o:?}; first byte on fd 3 {s:?}; bare node -e first byte {b:?}");
    assert!(s < Duration::from_secs(5));
}

/// Host files of `/proc` that must read as empty inside (each checked only where the host
/// kernel has it), and host directories that must look empty.
const MASKED_FILES: &[&str] = &[
    "kallsyms",
    "cmdline",
    "config.gz",
    "keys",
    "timer_list",
    "sched_debug",
    "modules",
];
const MASKED_DIRS: &[&str] = &["acpi", "scsi"];

#[test]
fn proc_hides_host_details_and_the_hostname_is_neutral() {
    if !can_run() {
        return;
    }
    let script = format!(
        r#"{PRELUDE}
const os = require('os');
const r = {{ files: {{}}, dirs: {{}} }};
for (const f of {files:?}) {{
  try {{ r.files[f] = fs.readFileSync('/proc/' + f).length; }} catch (e) {{ r.files[f] = e.code; }}
}}
for (const d of {dirs:?}) {{
  try {{ r.dirs[d] = fs.readdirSync('/proc/' + d).length; }} catch (e) {{ r.dirs[d] = e.code; }}
}}
r.kcore = t(() => fs.readSync(fs.openSync('/proc/kcore', 'r'), Buffer.alloc(16), 0, 16, 0));
r.kcore_size = t(() => {{ if (fs.statSync('/proc/kcore').size !== 0) throw {{ code: 'nonempty' }}; }});
r.sysrq = t(() => fs.writeFileSync('/proc/sysrq-trigger', 'h'));
r.hostname = os.hostname();
r.uname = fs.readFileSync('/proc/sys/kernel/hostname', 'utf8').trim();
send(r);
"#,
        files = MASKED_FILES,
        dirs = MASKED_DIRS,
    );
    let mut sb = spawn(Path::new(HEARTH), &node_spec(&script)).unwrap();
    let r = read_json(&mut sb);
    wait_exit(&mut sb, Duration::from_secs(20));
    for f in MASKED_FILES {
        let host = Path::new("/proc").join(f);
        if !host.exists() {
            continue;
        }
        assert_eq!(r["files"][f], 0, "/proc/{f} must read as empty inside: {r}");
    }
    for d in MASKED_DIRS {
        let host = Path::new("/proc").join(d);
        if !host.is_dir() {
            continue;
        }
        assert_eq!(r["dirs"][d], 0, "/proc/{d} must look empty inside: {r}");
    }
    if Path::new("/proc/kcore").exists() {
        assert_eq!(r["kcore_size"], "ok", "{r}");
        // Nothing to read: either the read-only /dev/null (0 bytes) or EACCES.
        assert!(r["kcore"] == "ok" || r["kcore"] == "EACCES", "{r}");
    }
    if Path::new("/proc/sysrq-trigger").exists() {
        assert!(r["sysrq"] == "EROFS" || r["sysrq"] == "EACCES", "{r}");
    }
    assert_eq!(r["hostname"], "localhost", "{r}");
    assert_eq!(r["uname"], "localhost", "{r}");
    // Something to compare with: the host does have readable symbols and a command line.
    assert!(!fs::read("/proc/cmdline").unwrap().is_empty());
}

/// The escape probe: runs only inside a sandbox (`PROBE_ENV` = "escape"), where this test
/// binary is PID 1. It tries to widen its CPU affinity and to open sockets of families that
/// reach past the network namespace, and reports on fd 3.
#[test]
fn escape_probe_helper() {
    if std::env::var(PROBE_ENV).as_deref() != Ok("escape") {
        return;
    }
    fn outcome(rc: libc::c_int) -> String {
        if rc >= 0 {
            return "ok".into();
        }
        match std::io::Error::last_os_error().raw_os_error().unwrap() {
            libc::EPERM => "EPERM".into(),
            libc::EAFNOSUPPORT => "EAFNOSUPPORT".into(),
            libc::EACCES => "EACCES".into(),
            other => format!("errno {other}"),
        }
    }
    let cpus = || {
        let s = fs::read_to_string("/proc/self/status").unwrap();
        status_field(&s, "Cpus_allowed_list")
    };
    let mut r = serde_json::Map::new();
    r.insert("cpus_before".into(), cpus().into());
    // SAFETY: plain system calls on this throwaway process; sockets are closed at exit.
    unsafe {
        let mut all: libc::cpu_set_t = std::mem::zeroed();
        for c in 0..libc::CPU_SETSIZE as usize {
            libc::CPU_SET(c, &mut all);
        }
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &all);
        r.insert("setaffinity".into(), outcome(rc).into());
        let mut got: libc::cpu_set_t = std::mem::zeroed();
        let rc = libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut got);
        r.insert("getaffinity".into(), outcome(rc).into());
        for (name, family, kind) in [
            ("vsock", libc::AF_VSOCK, libc::SOCK_STREAM),
            ("packet", libc::AF_PACKET, libc::SOCK_RAW),
            ("inet", libc::AF_INET, libc::SOCK_STREAM),
            ("unix", libc::AF_UNIX, libc::SOCK_STREAM),
            ("netlink", libc::AF_NETLINK, libc::SOCK_RAW),
        ] {
            r.insert(name.into(), outcome(libc::socket(family, kind, 0)).into());
        }
    }
    r.insert("cpus_after".into(), cpus().into());
    report(r);
}

#[test]
fn instances_cannot_leave_their_core_or_open_vsock_sockets() {
    if !can_run() {
        return;
    }
    let (mut sb, code, r) = run_probe("escape", "escape_probe_helper", "escape", |spec| {
        spec.cpu_core = Some(0)
    });
    wait_exit(&mut sb, Duration::from_secs(20));
    assert_eq!(r["cpus_before"], "0", "{r}");
    assert_eq!(r["setaffinity"], "EPERM", "{r}");
    assert_eq!(
        r["cpus_after"], "0",
        "the instance widened its CPU mask: {r}"
    );
    assert_eq!(r["getaffinity"], "ok", "libuv reads its affinity: {r}");
    assert_eq!(r["vsock"], "EAFNOSUPPORT", "{r}");
    assert_eq!(r["packet"], "EAFNOSUPPORT", "{r}");
    for key in ["inet", "unix", "netlink"] {
        assert_eq!(r[key], "ok", "{key}: {r}");
    }
    sb.destroy();
    let _ = fs::remove_dir_all(&code);
}
