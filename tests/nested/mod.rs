//! The nested-KVM test host ("L1"): a Linux guest that QEMU runs under
//! software emulation with AMD SVM and nested paging (`-M q35 -cpu
//! EPYC-Rome,+svm,+npt`), whose `kvm_amd` gives it a working `/dev/kvm`. It
//! runs `hearth serve` with the VM backends the host itself cannot run, and
//! the tests talk to that server over a forwarded loopback port (QEMU user
//! networking with `restrict=on`: L1 reaches no network).
//!
//! L1's kernel, initramfs and root disk come from `tools/nested/build-l1.sh`;
//! the root disk is attached with `snapshot=on`, so nothing L1 writes reaches
//! the file and every boot starts clean. The test drives L1 through its second
//! serial port ([`L1::sh`]: a shell command in, its output and status out),
//! and L1's console goes to a file that is printed when a test fails.
#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;

use crate::common::{self, Client, Response};

/// L1's memory: its own needs, hearth's state and the L2 guests' RAM.
const L1_MEMORY_MB: u32 = 3072;
/// From QEMU's start to L1 answering a control command.
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
/// Default limit for one control command.
pub const SH_TIMEOUT: Duration = Duration::from_secs(60);
/// From `hearth serve` in L1 to `/healthz` answering (a first start builds
/// the runtime image inside L1, at emulation speed).
const SERVE_TIMEOUT: Duration = Duration::from_secs(300);
/// From the poweroff command to QEMU's exit.
const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(20);
/// The port hearth listens on inside L1.
const GUEST_PORT: u16 = 8080;
/// The admin token of the server in L1 (it is reachable only from this host's loopback).
pub const TOKEN: &str = "nested-kvm-test-token";
/// Where hearth keeps its state inside L1.
pub const STATE: &str = "/state/hearth";
/// hearth's stderr inside L1.
const SERVE_LOG: &str = "/state/serve.log";
/// A reply longer than this from one control command is a harness bug.
const SH_OUTPUT_BYTES_MAX: usize = 4 << 20;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn static_agent() -> PathBuf {
    root().join("target/x86_64-unknown-linux-gnu/release/hearth-agent")
}

/// Why L1 cannot be booted here, if it cannot.
pub fn skip_reason() -> Option<String> {
    if Command::new("qemu-system-x86_64")
        .arg("--version")
        .output()
        .map(|o| !o.status.success())
        .unwrap_or(true)
    {
        return Some("qemu-system-x86_64 not found: install qemu-system-x86".into());
    }
    let help = Command::new("qemu-system-x86_64")
        .args(["-cpu", "help"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if !help.contains("EPYC-Rome") {
        return Some("this QEMU has no EPYC-Rome CPU model to emulate SVM with".into());
    }
    if !Path::new("/usr/bin/busybox").is_file() && !Path::new("/bin/busybox").is_file() {
        return Some("busybox is missing: apt-get install busybox-static".into());
    }
    if !static_agent().is_file() {
        return Some(format!(
            "{} is missing: run tools/build-agent.sh release",
            static_agent().display()
        ));
    }
    let kernel = Path::new(
        &std::env::var("HEARTH_KERNEL_DIR").unwrap_or_else(|_| "/var/cache/hearth/kernel".into()),
    )
    .join("current/boot");
    if !fs::read_dir(&kernel)
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("vmlinuz-"))
        })
        .unwrap_or(false)
    {
        return Some("no Debian kernel: run tools/fetch-kernel.sh".into());
    }
    for tool in ["node", "mkfs.ext4", "cpio"] {
        let found = std::env::var_os("PATH")
            .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
            .unwrap_or(false)
            || Path::new("/usr/sbin").join(tool).is_file();
        if !found {
            return Some(format!("{tool} is missing (tools/setup.sh installs it)"));
        }
    }
    None
}

/// A port on this host's loopback that was free a moment ago.
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

/// A running L1: the QEMU process, its control channel and console file.
pub struct L1 {
    child: Child,
    ctl: BufReader<UnixStream>,
    dir: PathBuf,
    console: PathBuf,
    /// Where hearth in L1 is reached from this host.
    pub addr: SocketAddr,
    seq: u64,
    /// When QEMU was started.
    pub started: Instant,
}

impl L1 {
    /// Builds L1's disk if needed (`tools/nested/build-l1.sh`) and boots it.
    pub fn boot() -> L1 {
        let out = root().join("target/nested");
        let t = Instant::now();
        let status = Command::new("bash")
            .arg(root().join("tools/nested/build-l1.sh"))
            .arg(&out)
            .arg(env!("CARGO_BIN_EXE_hearth"))
            .arg(static_agent())
            .status()
            .expect("run tools/nested/build-l1.sh");
        assert!(
            status.success(),
            "tools/nested/build-l1.sh failed: {status}"
        );
        eprintln!("nested: L1 disk ready in {} ms", t.elapsed().as_millis());

        let dir = common::temp_dir("nested-l1");
        let console = dir.join("console.log");
        let ctl_path = dir.join("ctl.sock");
        let port = free_port();
        let started = Instant::now();
        let child = Command::new("qemu-system-x86_64")
            .args(["-accel", "tcg", "-M", "q35", "-cpu", "EPYC-Rome,+svm,+npt"])
            .args(["-m", &L1_MEMORY_MB.to_string(), "-smp", "1"])
            .args([
                "-display",
                "none",
                "-no-reboot",
                "-nodefaults",
                "-no-user-config",
            ])
            .arg("-kernel")
            .arg(out.join("vmlinuz"))
            .arg("-initrd")
            .arg(out.join("initrd.cpio"))
            .args(["-append", "console=ttyS0 panic=-1 quiet"])
            .arg("-drive")
            .arg(format!(
                "file={},if=virtio,format=raw,snapshot=on",
                out.join("root.ext4").display()
            ))
            // restrict=on: L1 gets no route to any network, only this forward.
            .arg("-netdev")
            .arg(format!(
                "user,id=n0,restrict=on,hostfwd=tcp:127.0.0.1:{port}-:{GUEST_PORT}"
            ))
            .args(["-device", "virtio-net-pci,netdev=n0"])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .arg("-serial")
            .arg(format!("unix:{},server=on,wait=off", ctl_path.display()))
            .env("TMPDIR", &dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(dir.join("qemu.stderr")).unwrap())
            .spawn()
            .expect("spawn qemu-system-x86_64");
        let mut l1 = L1 {
            child,
            ctl: BufReader::new(Self::connect_ctl(&ctl_path, started + BOOT_TIMEOUT)),
            dir,
            console,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            seq: 0,
            started,
        };
        l1.wait_booted();
        eprintln!(
            "nested: L1 booted in {} ms",
            l1.started.elapsed().as_millis()
        );
        l1
    }

    fn connect_ctl(path: &Path, deadline: Instant) -> UnixStream {
        loop {
            match UnixStream::connect(path) {
                Ok(s) => return s,
                Err(e) if Instant::now() >= deadline => {
                    panic!("L1 control socket {}: {e}", path.display())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    /// Sends no-op commands until one is answered: the channel only carries
    /// what is written while a reader is attached on both ends.
    fn wait_booted(&mut self) {
        let deadline = self.started + BOOT_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.fail(&format!("L1's QEMU exited during boot: {status}"));
            }
            if self.try_sh("true", Duration::from_secs(2)).is_some() {
                return;
            }
            if Instant::now() >= deadline {
                self.fail(&format!(
                    "L1 did not answer within {} s",
                    BOOT_TIMEOUT.as_secs()
                ));
            }
        }
    }

    /// Runs `cmd` with L1's shell; `None` when no answer came within `limit`.
    pub fn try_sh(&mut self, cmd: &str, limit: Duration) -> Option<(i32, String)> {
        self.seq += 1;
        let id = self.seq;
        let b64 = base64::engine::general_purpose::STANDARD.encode(cmd);
        let line = format!("{id} {b64}\n");
        self.ctl.get_mut().write_all(line.as_bytes()).ok()?;
        let deadline = Instant::now() + limit;
        let marker = format!("@@{id} ");
        let mut body = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            self.ctl.get_ref().set_read_timeout(Some(left)).unwrap();
            let mut l = String::new();
            match self.ctl.read_line(&mut l) {
                Ok(0) => return None,
                Ok(_) => {}
                Err(_) => return None,
            }
            if let Some(rc) = l.trim().strip_prefix(marker.trim()) {
                let out = base64::engine::general_purpose::STANDARD
                    .decode(body.as_bytes())
                    .unwrap_or_default();
                let rc = rc.trim().parse().unwrap_or(-1);
                return Some((rc, String::from_utf8_lossy(&out).into_owned()));
            }
            if l.starts_with("@@") {
                // The answer to an earlier command that timed out.
                body.clear();
                continue;
            }
            body.push_str(l.trim());
            assert!(
                body.len() < SH_OUTPUT_BYTES_MAX,
                "runaway output from {cmd}"
            );
        }
    }

    /// Runs `cmd` in L1 and returns its output; fails the test on a non-zero
    /// status or when it takes longer than `limit`.
    pub fn sh_within(&mut self, cmd: &str, limit: Duration) -> String {
        match self.try_sh(cmd, limit) {
            Some((0, out)) => out,
            Some((rc, out)) => self.fail(&format!("L1: `{cmd}` exited {rc}:\n{out}")),
            None => self.fail(&format!("L1: `{cmd}` gave no answer in {limit:?}")),
        }
    }

    /// [`L1::sh_within`] with [`SH_TIMEOUT`].
    pub fn sh(&mut self, cmd: &str) -> String {
        self.sh_within(cmd, SH_TIMEOUT)
    }

    /// Starts `hearth serve` in L1 with `args` (after the listen, state and
    /// token options) and the environment assignments `env`, and waits until
    /// it answers `/healthz` from this host.
    pub fn start_hearth(&mut self, env: &str, args: &str) {
        let t = Instant::now();
        self.sh(&format!(
            "mkdir -p {STATE}; cd /state; ulimit -n 65536; echo '--- {env} hearth serve {args}' >> {SERVE_LOG}; \
             {env} HEARTH_AGENT=/opt/hearth/hearth-agent setsid /opt/hearth/hearth serve \
             --listen 0.0.0.0:{GUEST_PORT} --state-dir {STATE} --admin-token {TOKEN} {args} \
             < /dev/null >> {SERVE_LOG} 2>&1 &"
        ));
        let deadline = t + SERVE_TIMEOUT;
        loop {
            if healthz(self.addr) {
                break;
            }
            if Instant::now() >= deadline {
                self.fail("hearth in L1 did not answer /healthz");
            }
            let alive = self.sh("pidof hearth || true");
            if alive.trim().is_empty() {
                self.fail("hearth in L1 exited at start");
            }
            std::thread::sleep(Duration::from_millis(500));
        }
        eprintln!(
            "nested: {env} hearth serve {args} up in {} ms",
            t.elapsed().as_millis()
        );
    }

    /// Stops hearth in L1 with SIGTERM (SIGKILL after 30 s) and checks that no
    /// VMM outlives it.
    pub fn stop_hearth(&mut self) {
        self.sh_within(
            "pid=$(pidof hearth) || exit 0; kill -TERM $pid; i=0; \
             while kill -0 $pid 2>/dev/null && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done; \
             kill -KILL $pid 2>/dev/null; true",
            Duration::from_secs(60),
        );
        let left = self.sh_within(
            "i=0; while [ $i -lt 100 ] && pidof qemu-system-x86_64 firecracker >/dev/null; do \
             sleep 0.1; i=$((i+1)); done; pidof qemu-system-x86_64 firecracker || true",
            Duration::from_secs(30),
        );
        if !left.trim().is_empty() {
            self.fail(&format!("VMMs outlived hearth in L1: {left}"));
        }
    }

    /// hearth's log in L1.
    pub fn serve_log(&mut self) -> String {
        self.try_sh(&format!("cat {SERVE_LOG}"), Duration::from_secs(20))
            .map(|(_, out)| out)
            .unwrap_or_else(|| "(L1 did not answer)".into())
    }

    /// L1's console so far.
    pub fn console(&self) -> String {
        fs::read_to_string(&self.console).unwrap_or_default()
    }

    /// Why L1 itself stopped running after its console had `seen` bytes, if
    /// it did: its kernel reported a soft lockup (its CPU was not run for tens
    /// of seconds: the emulator's doing, as nothing inside L1 can stop the
    /// idle task), or its shell does not answer within a minute.
    /// Software-emulated SVM has hung L1 this way in the middle of an L2 boot
    /// (a 420 s soft lockup in CI, 2026-12-03).
    pub fn stalled_since(&mut self, seen: usize) -> Option<String> {
        let console = self.console();
        let lockup = console
            .get(seen..)
            .and_then(|new| new.lines().find(|l| l.contains("soft lockup")))
            .map(|l| format!("L1's console: {}", l.trim()));
        lockup.or_else(|| {
            self.try_sh("true", Duration::from_secs(60))
                .is_none()
                .then(|| "L1's shell did not answer within 60 s".to_string())
        })
    }

    /// Kills this L1 and boots a fresh one in its place (nothing of the old
    /// one's state is kept: its disk is a snapshot).
    pub fn reboot(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        *self = L1::boot();
    }

    /// Fails the test with `why`, L1's console and hearth's log.
    pub fn fail(&mut self, why: &str) -> ! {
        let log = if self.child.try_wait().ok().flatten().is_none() {
            self.serve_log()
        } else {
            "(L1 is not running)".into()
        };
        panic!(
            "{why}\n--- L1 console ({}):\n{}\n--- hearth log in L1:\n{}",
            self.console.display(),
            tail(&self.console(), 200),
            tail(&log, 200)
        );
    }

    /// Powers L1 off and waits for QEMU to exit (killed after the timeout).
    pub fn shutdown(mut self) {
        let t = Instant::now();
        let _ = self.try_sh(
            "pid=$(pidof hearth) && kill -TERM $pid; sleep 1; sync; (sleep 0.2; poweroff -f) &",
            Duration::from_secs(40),
        );
        let deadline = Instant::now() + SHUTDOWN_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                eprintln!(
                    "nested: L1 shut down in {} ms; {} s since boot",
                    t.elapsed().as_millis(),
                    self.started.elapsed().as_secs()
                );
                let _ = fs::remove_dir_all(&self.dir);
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "L1 did not power off within {} s",
            SHUTDOWN_TIMEOUT.as_secs()
        );
    }

    /// One request to hearth in L1 with the admin token.
    /// A request that gets no answer within `limit` fails the test with
    /// hearth's log, which says what it was doing.
    pub fn call(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        limit: Duration,
    ) -> Response {
        let auth = format!("Bearer {TOKEN}");
        let mut h = headers.to_vec();
        h.push(("authorization", &auth));
        let addr = self.addr;
        let answer = std::panic::catch_unwind(|| {
            let mut c = Client::connect(addr);
            c.stream.set_read_timeout(Some(limit)).unwrap();
            c.request(method, path, &h, body)
        });
        match answer {
            Ok(r) => r,
            Err(e) => {
                let why = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                self.fail(&format!("{method} {path} (limit {limit:?}): {why}"))
            }
        }
    }
}

impl Drop for L1 {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- L1 console ({}):\n{}",
                self.console.display(),
                tail(&self.console(), 100)
            );
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a server at `addr` answers `GET /healthz` with 200 right now.
fn healthz(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if s.write_all(b"GET /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.1 200")
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
