//! The QEMU backend end to end: real guest images, real microVMs (software
//! emulated on hosts without usable KVM), the real `hearth` binary.
//!
//! These tests take minutes, so there are few of them and each server is
//! reused for many checks. Without qemu-system-x86_64, the guest kernel
//! (`tools/fetch-kernel.sh`), Node.js or the static agent
//! (`tools/build-agent.sh`), every test prints why and returns.

mod common;

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Client, Response};
use hearth::guest::{ext4, images, kernel};

/// Longest wait for one answer: deploys boot a VM under emulation.
const SLOW: Duration = Duration::from_secs(180);

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn static_agent() -> PathBuf {
    root().join("target/x86_64-unknown-linux-gnu/release/hearth-agent")
}

/// Why these tests cannot run here, if they cannot.
fn skip_reason() -> Option<String> {
    if let Err(e) = hearth::sandbox::qemu::find_qemu() {
        return Some(e);
    }
    let scratch = common::temp_dir("qemu-kernel-probe");
    let k = kernel::locate(&scratch);
    let _ = fs::remove_dir_all(&scratch);
    if let Err(e) = k {
        return Some(e.to_string());
    }
    if !static_agent().is_file() {
        return Some(format!(
            "{} is missing: run tools/build-agent.sh",
            static_agent().display()
        ));
    }
    if let Err(e) = hearth::sandbox::process_backend::find_node() {
        return Some(e);
    }
    if ext4::mkfs_path().is_none() {
        return Some("mkfs.ext4 is missing: install e2fsprogs".into());
    }
    None
}

macro_rules! require_qemu {
    () => {
        if let Some(why) = skip_reason() {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

/// A `hearth serve --backend qemu` on a state directory that outlives it,
/// so a second server can pick the functions up again.
struct Hearth {
    addr: SocketAddr,
    child: Child,
    log: PathBuf,
}

impl Hearth {
    fn start(state: &Path, log: &Path, extra: &[&str]) -> Hearth {
        let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args([
                "serve",
                "--backend",
                "qemu",
                "--listen",
                "127.0.0.1:0",
                "--state-dir",
            ])
            .arg(state)
            .args(extra)
            .env("HEARTH_AGENT", static_agent())
            .env_remove("HEARTH_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(fs::File::create(log).unwrap())
            .spawn()
            .expect("spawn hearth");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("hearth: listening on http://") {
                    let _ = tx.send(a.trim().to_string());
                }
            }
        });
        // Building the runtime image on a first start takes a while.
        let addr = rx.recv_timeout(SLOW).unwrap_or_else(|_| {
            let _ = child.kill();
            panic!(
                "hearth did not start:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            )
        });
        Hearth {
            addr: addr.parse().unwrap(),
            child,
            log: log.to_path_buf(),
        }
    }

    fn stderr(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn call(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Response {
        let mut c = Client::connect(self.addr);
        c.stream.set_read_timeout(Some(SLOW)).unwrap();
        c.request(method, path, headers, body)
    }

    fn get(&self, path: &str) -> Response {
        self.call("GET", path, &[], b"")
    }

    fn deploy_raw(&self, fixture: &str, query: &str) -> Response {
        let zip = common::zip_fixture(fixture);
        let path = if query.is_empty() {
            "/deploy".to_string()
        } else {
            format!("/deploy?{query}")
        };
        self.call("POST", &path, &[("content-type", "application/zip")], &zip)
    }

    fn deploy(&self, fixture: &str, query: &str) -> String {
        let t = Instant::now();
        let r = self.deploy_raw(fixture, query);
        assert_eq!(
            r.status,
            201,
            "deploy {fixture}: {}\n{}",
            r.text(),
            self.stderr()
        );
        let v = r.json();
        assert_eq!(v["backend"], "qemu", "{v}");
        assert_eq!(v["snapshotReady"], true, "{v}");
        eprintln!("deployed {fixture} in {} ms", t.elapsed().as_millis());
        v["functionId"].as_str().unwrap().to_string()
    }

    /// SIGTERM, then wait (SIGKILL after a grace period).
    fn stop(mut self) {
        // SAFETY: kill with a pid we own.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Hearth {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pids of the QEMU processes running instances of function `id` (templates excluded).
fn instance_vms(id: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("qemu-system")
            && cmd.contains("-incoming")
            && cmd.contains(&format!("/{id}-"))
        {
            pids.push(pid);
        }
    }
    pids
}

fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}

#[test]
fn guest_images_are_valid_ext4_with_root_owned_files() {
    require_qemu!();
    let dir = common::temp_dir("qemu-images");
    let state = dir.join("state");
    std::env::set_var("HEARTH_AGENT", static_agent());
    let guest = images::prepare_guest(&state).expect("guest images");
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };

    ext4::check(&guest.runtime_image).expect("runtime image passes e2fsck -fn");
    let (u, g, mode) = ext4::stat_in_image(&guest.runtime_image, "/usr/bin/node").unwrap();
    assert_eq!((u, g), (uid, uid), "node's owner in the image");
    assert_eq!(mode & 0o777, 0o755);
    for p in ["/hearth/bootstrap.js", "/lib64/ld-linux-x86-64.so.2"] {
        ext4::stat_in_image(&guest.runtime_image, p).unwrap_or_else(|e| panic!("{p}: {e}"));
    }
    // Mount points the agent needs in the new root.
    for p in ["/", "/var/task", "/tmp", "/proc", "/dev", "/sys"] {
        let (u, g, mode) = ext4::stat_in_image(&guest.runtime_image, p).unwrap();
        assert_eq!((u, g, mode & 0o7777), (0, 0, 0o755), "{p}");
    }

    // The code image holds the function's files.
    let fn_dir = dir.join("fn");
    let code = fn_dir.join("code");
    fs::create_dir_all(code.join("lib")).unwrap();
    fs::write(
        code.join("index.js"),
        "exports.handler = async () => ({});\n",
    )
    .unwrap();
    fs::write(code.join("lib/data.bin"), vec![1u8; 50_000]).unwrap();
    let image = images::code_image(&fn_dir).unwrap();
    assert!(image
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("code-"));
    ext4::check(&image).expect("code image passes e2fsck -fn");
    assert_eq!(ext4::stat_in_image(&image, "/index.js").unwrap().0, uid);
    assert!(ext4::stat_in_image(&image, "/lib/data.bin").is_ok());
    let mtime = fs::metadata(&image).unwrap().modified().unwrap();
    assert_eq!(
        images::code_image(&fn_dir).unwrap(),
        image,
        "same code, same image"
    );
    assert_eq!(
        fs::metadata(&image).unwrap().modified().unwrap(),
        mtime,
        "not rebuilt"
    );
    fs::write(code.join("index.js"), "exports.handler = async () => 1;\n").unwrap();
    assert_ne!(
        images::code_image(&fn_dir).unwrap(),
        image,
        "new code, new image"
    );

    // The initramfs: the static agent as /init, then the modules in load order.
    let list = Command::new("cpio")
        .args(["-t", "--quiet", "-F"])
        .arg(&guest.initramfs)
        .output();
    if let Ok(out) = list {
        let names = String::from_utf8_lossy(&out.stdout);
        assert!(names.lines().any(|l| l == "init"), "{names}");
        assert!(names.lines().any(|l| l == "dev/console"), "{names}");
        let ring = names.find("modules/virtio_ring.ko").expect("virtio_ring");
        let virtio = names.find("modules/virtio.ko").expect("virtio");
        assert!(ring < virtio, "{names}");
    }

    // The ELF kernel for Firecracker is cut out of the bzImage.
    let vmlinux = guest.kernel.vmlinux(&dir.join("vmlinux")).unwrap();
    let head = fs::read(&vmlinux).unwrap();
    assert_eq!(&head[..4], b"\x7fELF");
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn qemu_functions_deploy_invoke_and_survive_a_restart() {
    require_qemu!();
    let dir = common::temp_dir("qemu-serve");
    let state = dir.join("state");
    let s = Hearth::start(&state, &dir.join("serve-1.log"), &[]);

    // Plain handler: event, cookies, headers, bodies.
    let id = s.deploy("plain", "env=%7B%22GREETING%22%3A%22hi%22%7D");
    let fn_dir = state.join("functions").join(&id);
    // Instances map the RAM file privately: their writes never reach it.
    let ram_mtime = || {
        fs::metadata(fn_dir.join("vm.ram"))
            .unwrap()
            .modified()
            .unwrap()
    };
    let ram_before = ram_mtime();
    let t = Instant::now();
    let r = s.call(
        "POST",
        &format!("/f/{id}/a/b?x=1&x=2"),
        &[
            ("cookie", "c1=v1; c2=v2"),
            ("x-rep", "a"),
            ("x-rep", "b"),
            ("content-type", "text/plain"),
        ],
        b"hello",
    );
    eprintln!(
        "first request (restore) answered in {} ms",
        t.elapsed().as_millis()
    );
    assert_eq!(r.status, 200, "{}\n{}", r.text(), s.stderr());
    let v = r.json();
    let e = &v["event"];
    assert_eq!(e["rawPath"], "/a/b");
    assert_eq!(e["queryStringParameters"]["x"], "1,2");
    assert_eq!(e["cookies"], serde_json::json!(["c1=v1", "c2=v2"]));
    assert_eq!(e["headers"]["x-rep"], "a,b");
    assert_eq!(e["body"], "hello");
    assert_eq!(v["env"]["GREETING"], "hi");
    assert_eq!(v["cwd"], "/var/task");
    let r = s.get(&format!("/f/{id}/headers"));
    assert_eq!(r.status, 201);
    let cookies: Vec<_> = r
        .headers
        .iter()
        .filter(|(k, _)| k == "set-cookie")
        .map(|(_, v)| v.as_str())
        .collect();
    assert_eq!(cookies, ["a=1; Path=/", "b=2"]);
    let r = s.get(&format!("/f/{id}/error"));
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["errorType"], "TypeError");

    // Binary bodies both ways, byte-exact.
    let bin = s.deploy("binary", "");
    let payload: Vec<u8> = (0..70_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let r = s.call(
        "POST",
        &format!("/f/{bin}/"),
        &[("content-type", "application/octet-stream")],
        &payload,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.body, payload);

    // A handler that fails to load: 422 with the runtime's message, nothing deployed.
    let r = s.deploy_raw("init-error", "");
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        r.text().contains("init-error fixture fails while loading"),
        "{}",
        r.text()
    );

    // The Express app (needs `npm ci` in its directory).
    let express = root().join("tests/fixtures/express-app/node_modules/express");
    let app = if express.is_dir() {
        let t = Instant::now();
        let app = s.deploy("express-app", "");
        let deploy_ms = t.elapsed().as_millis();
        assert!(deploy_ms < 60_000, "express deploy took {deploy_ms} ms");
        let r = s.get(&format!("/f/{app}/"));
        assert_eq!((r.status, r.text().as_str()), (200, "Hello from hearth"));
        let r = s.call(
            "POST",
            &format!("/f/{app}/greet"),
            &[("content-type", "application/json")],
            br#"{"name":"vm"}"#,
        );
        assert_eq!(r.json()["message"], "Hello, vm");
        let r = s.call(
            "GET",
            &format!("/f/{app}/cookie"),
            &[("cookie", "k=v")],
            b"",
        );
        assert_eq!(r.json()["cookie"], "k=v");
        assert_eq!(
            r.headers.iter().filter(|(k, _)| k == "set-cookie").count(),
            2
        );
        let r = s.get(&format!("/f/{app}/bin"));
        assert_eq!(r.body, (0..=255u8).collect::<Vec<_>>());
        Some(app)
    } else {
        eprintln!("express app skipped: run `npm ci` in tests/fixtures/express-app");
        None
    };

    // The snapshot and its description are the function's artifacts.
    for f in ["vm.snap", "vm.ram", "qemu.json"] {
        assert!(fn_dir.join(f).is_file(), "{f} in {}", fn_dir.display());
    }

    let r = s.get(&format!("/functions/{id}"));
    assert_eq!(r.status, 200);

    // Restart: the functions come back from their saved snapshots (no rebuild).
    s.stop();
    assert!(
        wait_until(Duration::from_secs(10), || instance_vms(&id).is_empty()),
        "VMs outlived their server: {:?}",
        instance_vms(&id)
    );
    let s2 = Hearth::start(&state, &dir.join("serve-2.log"), &[]);
    let t = Instant::now();
    let r = s2.get(&format!("/f/{id}/again"));
    assert_eq!(r.status, 200, "{}\n{}", r.text(), s2.stderr());
    assert_eq!(r.json()["event"]["rawPath"], "/again");
    eprintln!(
        "first request after restart answered in {} ms",
        t.elapsed().as_millis()
    );
    if let Some(app) = app {
        let r = s2.get(&format!("/f/{app}/q?a=1"));
        assert_eq!(r.json()["a"], "1");
    }
    assert!(!s2.stderr().contains("rebuilding"), "{}", s2.stderr());
    assert_eq!(ram_mtime(), ram_before, "an instance wrote to vm.ram");
    s2.stop();
    let _ = fs::remove_dir_all(&dir);
}

#[test]
fn qemu_instances_that_hang_or_die_are_replaced() {
    require_qemu!();
    let dir = common::temp_dir("qemu-faults");
    // One core: one warm VM, so the one killed below is the one serving.
    let s = Hearth::start(
        &dir.join("state"),
        &dir.join("serve.log"),
        &["--cores", "1"],
    );
    let id = s.deploy("behave", "timeout_ms=4000");
    let base = format!("/f/{id}");
    let r = s.get(&format!("{base}/whoami"));
    assert_eq!(r.status, 200, "{}\n{}", r.text(), s.stderr());

    // Past the deadline: 504, and the VM is destroyed.
    let t = Instant::now();
    let r = s.get(&format!("{base}/spin"));
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(
        wait_until(Duration::from_secs(10), || instance_vms(&id).is_empty()),
        "the timed-out VM is still running: {:?}",
        instance_vms(&id)
    );

    // The runtime exits: the agent powers the VM off, 502, a new VM serves.
    let r = s.get(&format!("{base}/exit"));
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(s.get(&format!("{base}/whoami")).status, 200);

    // The VM is killed mid-request: 502, then a fresh VM answers.
    let mut slow = Client::connect(s.addr);
    slow.stream.set_read_timeout(Some(SLOW)).unwrap();
    slow.write(format!("GET {base}/sleep?ms=5000 HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
    std::thread::sleep(Duration::from_millis(800));
    let vms = instance_vms(&id);
    assert_eq!(vms.len(), 1, "{vms:?}");
    // SAFETY: kill with a pid read from /proc just now.
    unsafe { libc::kill(vms[0], libc::SIGKILL) };
    let r = slow.response();
    assert_eq!(r.status, 502, "{}", r.text());
    let r = s.get(&format!("{base}/whoami"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["calls"], 1, "a fresh VM from the snapshot");

    // Several VMs at once from the one snapshot (its RAM file mapped
    // copy-on-write by each): each keeps its own state.
    let mut clients: Vec<Client> = (0..3)
        .map(|_| {
            let mut c = Client::connect(s.addr);
            c.stream.set_read_timeout(Some(SLOW)).unwrap();
            c.write(format!("GET {base}/sleep?ms=1500 HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
            c
        })
        .collect();
    let calls: Vec<u64> = clients
        .iter_mut()
        .map(|c| {
            let r = c.response();
            assert_eq!(r.status, 200, "{}", r.text());
            r.json()["calls"].as_u64().unwrap()
        })
        .collect();
    assert!(instance_vms(&id).len() >= 3, "{:?}", instance_vms(&id));
    assert!(calls.iter().filter(|&&c| c == 1).count() >= 2, "{calls:?}");
    s.stop();
    let _ = fs::remove_dir_all(&dir);
}
