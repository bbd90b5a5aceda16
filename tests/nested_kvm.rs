//! hearth's VM backends on a real KVM host: a nested one ("L1", see
//! `tests/nested/mod.rs`), booted once under QEMU's software emulation with
//! AMD SVM and nested paging, running `hearth serve` whose microVMs ("L2")
//! use L1's `/dev/kvm`. One L1 boot serves every cycle below (the boot is the
//! fixed cost); each cycle deploys, invokes, breaks and restarts functions
//! through the forwarded port, and looks inside L1 over its control channel.
//! A cycle during which L1 itself stopped running (software-emulated SVM
//! has hung it) runs once more on a fresh L1 ([`part`]).
//!
//! L2 code runs at emulation speed (Node.js ~37× slower than native), so the
//! handlers are tiny and the timeouts generous.

mod common;
mod nested;

use std::time::{Duration, Instant};

use common::{Client, Response};
use nested::{L1, STATE};

/// Longest wait for one answer: a restore, a queued request.
const SLOW: Duration = Duration::from_secs(240);
/// Longest wait for a deploy, which boots a template VM nested: beyond
/// hearth's own limits on a template (300 s to READY, 120 s to write the
/// snapshot), so a stuck one fails with hearth's error and the VMM's log.
const DEPLOY_LIMIT: Duration = Duration::from_secs(450);

fn wait_until(l1: &mut L1, limit: Duration, mut f: impl FnMut(&mut L1) -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f(l1) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    f(l1)
}

fn deploy(l1: &mut L1, fixture: &str, query: &str, backend: &str) -> String {
    deploy_zip(l1, &common::zip_fixture(fixture), fixture, query, backend)
}

fn deploy_zip(l1: &mut L1, zip: &[u8], fixture: &str, query: &str, backend: &str) -> String {
    let t = Instant::now();
    let r = l1.call(
        "POST",
        &format!("/deploy?{query}"),
        &[("content-type", "application/zip")],
        zip,
        DEPLOY_LIMIT,
    );
    if r.status != 201 {
        l1.fail(&format!("deploy {fixture}: {} {}", r.status, r.text()));
    }
    let v = r.json();
    assert_eq!(v["backend"], backend, "{v}");
    assert_eq!(v["snapshotReady"], true, "{v}");
    eprintln!(
        "nested: deployed {fixture} on {backend} in {} ms",
        t.elapsed().as_millis()
    );
    v["functionId"].as_str().unwrap().to_string()
}

/// A VM backend as the cycle drives it.
struct Vmm {
    /// `--backend` value and the `backend` field of deploy answers.
    backend: &'static str,
    /// A shell `case` pattern matching the command line of an instance's VMM
    /// (not a template's); `ID` stands for the function id.
    instance_glob: &'static str,
    /// Files a function's snapshot consists of.
    snapshot_files: &'static [&'static str],
    /// A line hearth logs at start with this backend on KVM.
    kvm_log: &'static str,
}

const QEMU: Vmm = Vmm {
    backend: "qemu",
    instance_glob: "*qemu-system*/ID-[0-9]*-incoming*",
    snapshot_files: &["vm.snap", "vm.ram", "qemu.json"],
    kvm_log: "-accel kvm",
};

const FIRECRACKER: Vmm = Vmm {
    backend: "firecracker",
    instance_glob: "*firecracker*--id?ID-[0-9]*",
    snapshot_files: &["fc.state", "fc.mem", "firecracker.json"],
    kvm_log: "hearth: firecracker v",
};

/// Pids of L1's instance VMMs of function `id`.
fn instances(l1: &mut L1, vmm: &Vmm, id: &str) -> Vec<u32> {
    let out = l1.sh(&format!(
        "for p in /proc/[0-9]*; do c=$(tr '\\0' ' ' < $p/cmdline 2>/dev/null) || continue; \
         case \"$c\" in {}) echo ${{p#/proc/}};; esac; done",
        vmm.instance_glob.replace("ID", id)
    ));
    out.split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Sends `GET path` on a fresh connection without waiting for the answer.
fn send(l1: &L1, path: &str) -> Client {
    let mut c = Client::connect(l1.addr);
    c.stream.set_read_timeout(Some(SLOW)).unwrap();
    c.write(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
    c
}

fn get(l1: &mut L1, path: &str) -> Response {
    l1.call("GET", path, &[], b"", SLOW)
}

/// Everything one backend must do on a KVM host: deploys, restores,
/// concurrency, crashes, timeouts, delete, and a restart of hearth. Returns
/// the Express app's id, deployed and left in place for the next cycle (its
/// other functions are removed), if the fixture's modules are installed.
fn backend_cycle(l1: &mut L1, vmm: &Vmm, serve_args: &str) -> Option<String> {
    let cycle = Instant::now();
    let trace = "HEARTH_FIRECRACKER_TRACE=1";
    l1.start_hearth(trace, serve_args);
    let log = l1.serve_log();
    assert!(
        log.contains(vmm.kvm_log),
        "hearth in L1 did not use KVM:\n{log}"
    );
    let b = vmm.backend;

    // A plain handler: deployed (snapshot on disk), then answered by a restored L2.
    let plain = deploy(l1, "plain", "env=%7B%22GREETING%22%3A%22hi%22%7D", b);
    let dir = format!("{STATE}/functions/{plain}");
    let files = l1.sh(&format!("ls {dir}"));
    for f in vmm.snapshot_files {
        assert!(files.lines().any(|l| l == *f), "{f} not in {dir}: {files}");
    }
    assert!(
        instances(l1, vmm, &plain).is_empty(),
        "no instance before the first call"
    );
    let t = Instant::now();
    let r = get(l1, &format!("/f/{plain}/a/b?x=1"));
    let cold_ms = t.elapsed().as_millis();
    assert_eq!(r.status, 200, "{}", r.text());
    let v = r.json();
    assert_eq!(v["event"]["rawPath"], "/a/b", "{v}");
    assert_eq!(v["env"]["GREETING"], "hi", "{v}");
    assert_eq!(
        instances(l1, vmm, &plain).len(),
        1,
        "restored from the snapshot"
    );
    let t = Instant::now();
    assert_eq!(get(l1, &format!("/f/{plain}/warm")).status, 200);
    eprintln!(
        "nested: {b}: plain handler: cold start by restore {cold_ms} ms, warm {} ms",
        t.elapsed().as_millis()
    );

    // The Express app (its node_modules come from `npm ci`).
    let express =
        env!("CARGO_MANIFEST_DIR").to_string() + "/tests/fixtures/express-app/node_modules/express";
    let app = if std::path::Path::new(&express).is_dir() {
        // The Uffd cycles restore it too: their timeout.
        let app = deploy(l1, "express-app", "timeout_ms=120000", b);
        let t = Instant::now();
        let r = get(l1, &format!("/f/{app}/"));
        assert_eq!((r.status, r.text().as_str()), (200, "Hello from hearth"));
        eprintln!(
            "nested: {b}: express: restore to first response {} ms",
            t.elapsed().as_millis()
        );
        let r = l1.call(
            "POST",
            &format!("/f/{app}/greet"),
            &[("content-type", "application/json")],
            br#"{"name":"L2"}"#,
            SLOW,
        );
        assert_eq!(r.json()["message"], "Hello, L2", "{}", r.text());
        Some(app)
    } else {
        eprintln!("nested: express app skipped: run `npm ci` in tests/fixtures/express-app");
        None
    };

    // `provided` and `python3` (Firecracker: QEMU's are covered by tests/qemu_runtime_api.rs).
    let others = (b == "firecracker").then(|| runtime_api_functions(l1, vmm));

    // Concurrency: three slow calls at once are served by more than one instance.
    let beh = deploy(l1, "behave", "timeout_ms=8000", b);
    let base = format!("/f/{beh}");
    assert_eq!(get(l1, &format!("{base}/whoami")).status, 200);
    let mut clients: Vec<Client> = (0..3)
        .map(|_| send(l1, &format!("{base}/sleep?ms=2500")))
        .collect();
    let calls: Vec<u64> = clients
        .iter_mut()
        .map(|c| {
            let r = c.response();
            assert_eq!(r.status, 200, "{}", r.text());
            r.json()["calls"].as_u64().unwrap()
        })
        .collect();
    let n = instances(l1, vmm, &beh).len();
    assert!(n >= 2, "{n} instance(s) for 3 concurrent calls: {calls:?}");
    assert!(calls.contains(&1), "no fresh instance served: {calls:?}");

    // Crash: the VMM dies mid-request → 502, and a fresh instance takes over.
    let mut slow = send(l1, &format!("{base}/sleep?ms=6000"));
    std::thread::sleep(Duration::from_secs(2));
    let before = instances(l1, vmm, &beh);
    l1.sh(&format!(
        "kill -KILL {}",
        before
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let r = slow.response();
    assert_eq!(r.status, 502, "{}", r.text());
    // The other killed VMMs were idle: hearth may not have seen them die yet (nested, every
    // step is slow), so each can still take one request and answer 502. Past those, a fresh
    // instance serves.
    let mut r = get(l1, &format!("{base}/whoami"));
    for _ in 1..before.len() {
        if r.status != 502 || !r.text().contains("instance_crashed") {
            break;
        }
        r = get(l1, &format!("{base}/whoami"));
    }
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["calls"], 1, "a fresh instance from the snapshot");
    let after = instances(l1, vmm, &beh);
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} {after:?}"
    );

    // Timeout: a handler that never answers → 504, its instance destroyed.
    let t = Instant::now();
    let r = get(l1, &format!("{base}/spin"));
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(60), "{:?}", t.elapsed());

    // Delete: gone from the API, its VMMs and files too.
    let r = l1.call("DELETE", &format!("/functions/{plain}"), &[], b"", SLOW);
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(get(l1, &format!("/f/{plain}/")).status, 404);
    assert!(
        wait_until(l1, Duration::from_secs(30), |l1| instances(l1, vmm, &plain)
            .is_empty()),
        "instances outlived the delete"
    );
    l1.sh(&format!("test ! -e {dir}"));

    // Restart: the functions come back from their snapshots, not rebuilt.
    l1.stop_hearth();
    l1.start_hearth(trace, serve_args);
    let t = Instant::now();
    let r = get(l1, &format!("{base}/whoami"));
    assert_eq!(r.status, 200, "{}", r.text());
    eprintln!(
        "nested: {b}: first call after restart {} ms",
        t.elapsed().as_millis()
    );
    if let Some(app) = &app {
        assert_eq!(get(l1, &format!("/f/{app}/")).status, 200);
        if serve_args.contains("--fc-memory file") {
            // Its first restore (before the restart) recorded the working set
            // through Uffd; this one read it into the page cache.
            l1.sh(&format!("test -s {STATE}/functions/{app}/fc.ws"));
            let read = format!("{app}: working set of ");
            let log = l1.serve_log();
            assert!(
                log.lines()
                    .any(|l| l.contains(&read) && l.contains("read ahead")),
                "{log}"
            );
        }
    }
    for (id, answer) in others.iter().flatten() {
        let r = get(l1, &format!("/f/{id}/again"));
        assert_eq!(
            (r.status, r.text()),
            (200, answer.replace("PATH", "/again")),
            "a clone restored from the snapshot after the restart"
        );
    }
    let log = l1.serve_log();
    assert!(!log.contains("rebuilding"), "{log}");
    l1.stop_hearth();
    let keep = app.as_deref().unwrap_or("-");
    l1.sh(&format!(
        "find {STATE}/functions -mindepth 1 -maxdepth 1 ! -name {keep} -exec rm -rf {{}} +"
    ));
    eprintln!(
        "nested: {b} cycle ({serve_args}) took {} s",
        cycle.elapsed().as_secs()
    );
    app
}

/// A `provided` function: a Python script as its `bootstrap`, speaking the
/// Runtime API itself (the userland drive has Python but no curl in L1).
const PROVIDED_BOOTSTRAP: &str = r#"#!/usr/bin/python3
import http.client, json, os
api = os.environ["AWS_LAMBDA_RUNTIME_API"]
calls = 0
while True:
    c = http.client.HTTPConnection(api)
    c.request("GET", "/2018-06-01/runtime/invocation/next")
    r = c.getresponse()
    event = json.loads(r.read())
    rid = r.getheader("Lambda-Runtime-Aws-Request-Id")
    calls += 1
    out = {"statusCode": 200, "body": "provided %s calls=%d" % (event["rawPath"], calls)}
    c.request("POST", "/2018-06-01/runtime/invocation/%s/response" % rid, json.dumps(out))
    c.getresponse().read()
    c.close()
"#;

/// A `python3` function run by hearth's bootstrap.
const PYTHON_APP: &str = r#"
CALLS = 0
def handler(event, context):
    global CALLS
    CALLS += 1
    return {"statusCode": 200, "body": "python3 %s calls=%d" % (event["rawPath"], CALLS)}
"#;

/// Deploys a `provided` and a `python3` function (their snapshot taken once
/// the runtime polls `/next`, on the userland drive built in L1), invokes
/// each through its function URL twice (a clone restored from the snapshot,
/// then warm) and returns their ids with the answer a fresh clone gives to a
/// path (`PATH` in it).
fn runtime_api_functions(l1: &mut L1, vmm: &Vmm) -> Vec<(String, String)> {
    let b = vmm.backend;
    let provided = deploy_zip(
        l1,
        &common::zip(&[("bootstrap", PROVIDED_BOOTSTRAP.as_bytes(), 0o755)]),
        "provided bootstrap",
        "runtime=provided.al2023&timeout_ms=60000",
        b,
    );
    l1.sh(&format!(
        "grep -q hearth.api=provided {STATE}/functions/{provided}/firecracker.json; \
         grep -q userland- {STATE}/functions/{provided}/firecracker.json; \
         ls {STATE}/cache/guest/userland-*.ext4"
    ));
    let python = deploy_zip(
        l1,
        &common::zip(&[("app.py", PYTHON_APP.as_bytes(), 0o644)]),
        "python3 app",
        "runtime=python3.12&handler=app.handler&timeout_ms=60000",
        b,
    );
    let mut out = Vec::new();
    for (id, kind) in [(provided, "provided"), (python, "python3")] {
        let t = Instant::now();
        let r = get(l1, &format!("/f/{id}/first"));
        assert_eq!(r.status, 200, "{kind}: {}", r.text());
        assert_eq!(r.text(), format!("{kind} /first calls=1"));
        assert_eq!(instances(l1, vmm, &id).len(), 1, "{kind}: restored");
        let cold_ms = t.elapsed().as_millis();
        let r = get(l1, &format!("/f/{id}/second"));
        assert_eq!(
            (r.status, r.text()),
            (200, format!("{kind} /second calls=2"))
        );
        eprintln!("nested: {b}: {kind}: cold start by restore {cold_ms} ms");
        out.push((id, format!("{kind} PATH calls=1")));
    }
    out
}

/// `--backend firecracker --jailer`: deploy and restore in jails (hard-linked
/// inputs, a non-root uid, its own PID namespace and cgroup, only its root
/// visible), a killed VMM replaced and its jail removed, VMMs orphaned by a
/// killed server swept at the next start, delete.
fn jailer_cycle(l1: &mut L1) {
    let cycle = Instant::now();
    let args = "--backend firecracker --jailer --fc-memory uffd";
    let trace = "HEARTH_FIRECRACKER_TRACE=1";
    l1.start_hearth(trace, args);
    let log = l1.serve_log();
    assert!(log.contains("firecracker: jailer "), "{log}");
    // Uffd under the jailer: its socket is bound inside each jail.
    assert!(log.lines().any(|l| l.ends_with("memory Uffd")), "{log}");
    let jails = format!("{STATE}/jail/firecracker");
    // Generous: a cold start by restore took 16 s in L1 on a loaded host.
    let id = deploy(l1, "behave", "timeout_ms=45000", "firecracker");
    let dir = format!("{STATE}/functions/{id}");
    l1.sh(&format!(
        "grep -q '\"jailer\": true' {dir}/firecracker.json"
    ));
    assert_eq!(
        l1.sh(&format!("ls {jails}")).trim(),
        "",
        "the template's jail outlived it"
    );

    let t = Instant::now();
    let r = get(l1, &format!("/f/{id}/whoami"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["calls"], 1);
    eprintln!(
        "nested: jailer: cold start by restore {} ms",
        t.elapsed().as_millis()
    );
    let pids = instances(l1, &FIRECRACKER, &id);
    assert_eq!(pids.len(), 1, "{pids:?}");
    let pid = pids[0];
    // Who it runs as, what it sees, which cgroup holds it.
    let status = l1.sh(&format!("cat /proc/{pid}/status"));
    let field = |k: &str| -> Vec<String> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(k))
            .unwrap_or_default()
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    let uid: u32 = field("Uid:")[0].parse().unwrap();
    assert!(uid >= 260_001, "the VMM runs as uid {uid}:\n{status}");
    assert_eq!(
        field("NSpid:").last().map(String::as_str),
        Some("1"),
        "{status}"
    );
    let root: Vec<String> = l1
        .sh(&format!("ls /proc/{pid}/root"))
        .split_whitespace()
        .map(str::to_string)
        .collect();
    for f in ["fc.mem", "fc.state", "dev", "run", "firecracker"] {
        assert!(root.iter().any(|x| x == f), "{f} not in its root: {root:?}");
    }
    for f in ["opt", "usr", "state", "proc"] {
        assert!(!root.iter().any(|x| x == f), "the VMM sees /{f}: {root:?}");
    }
    let jail = l1.sh(&format!("ls {jails}"));
    let jail = format!("{jails}/{}", jail.trim());
    // The snapshot is hard-linked in: one inode, not a copy.
    let inodes = l1.sh(&format!("stat -c %i {dir}/fc.mem {jail}/root/fc.mem"));
    let inodes: Vec<&str> = inodes.split_whitespace().collect();
    assert_eq!(inodes[0], inodes[1], "fc.mem was copied into the jail");
    let cgroup = l1.sh(&format!("cut -d: -f3 /proc/{pid}/cgroup"));
    assert!(cgroup.contains("/hearth-fc-"), "{cgroup}");
    let max = l1.sh(&format!("cat /sys/fs/cgroup{}/memory.max", cgroup.trim()));
    assert_eq!(max.trim(), ((256u64 + 128) << 20).to_string(), "memory.max");
    // Its memory came over the userfaultfd socket in its root, which is gone
    // once used; the first invocation's working set is recorded.
    let log = l1.serve_log();
    assert!(log.contains(" page faults served"), "{log}");
    l1.sh(&format!("test ! -e {jail}/root/run/uf.sock"));
    let recorded = format!("function {id}: working set recorded");
    assert!(
        wait_until(l1, Duration::from_secs(30), |l1| l1
            .serve_log()
            .contains(&recorded)),
        "{}",
        l1.serve_log()
    );
    l1.sh(&format!("test -s {dir}/fc.ws"));

    // A killed VMM: a fresh instance serves, the old jail and cgroup are gone.
    l1.sh(&format!("kill -KILL {pid}"));
    let mut r = get(l1, &format!("/f/{id}/whoami"));
    if r.status == 502 && r.text().contains("instance_crashed") {
        r = get(l1, &format!("/f/{id}/whoami"));
    }
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["calls"], 1, "a fresh instance from the snapshot");
    // Restored jailed with the working set installed before it resumed.
    let installed = format!("{id}: working set of ");
    assert!(l1.serve_log().contains(&installed), "{}", l1.serve_log());
    let gone = format!(
        "test ! -e {jail} && test ! -e /sys/fs/cgroup{}",
        cgroup.trim()
    );
    assert!(
        wait_until(l1, Duration::from_secs(30), |l1| l1
            .try_sh(&gone, nested::SH_TIMEOUT)
            .is_some_and(|(rc, _)| rc == 0)),
        "{jail} outlived its VMM"
    );
    let log = l1.serve_log();
    assert!(
        log.contains("died"),
        "the VMM's death was not logged:\n{log}"
    );

    // hearth killed outright: its jailed VMMs outlive it (no parent-death
    // signal through the jailer's clone) until the next start sweeps them.
    let orphans = instances(l1, &FIRECRACKER, &id);
    assert_eq!(orphans.len(), 1, "{orphans:?}");
    l1.sh("kill -KILL $(pidof hearth); sleep 0.5");
    l1.start_hearth(trace, args);
    let left = l1.sh(&format!(
        "grep -s '^State' /proc/{}/status | grep -v zombie || true; ls {jails}",
        orphans[0]
    ));
    assert_eq!(
        left.trim(),
        "",
        "a VMM or jail of the killed server survived"
    );
    // Back from the snapshot: two clones at once, each answering its first
    // call, draw different random numbers.
    clones_draw_different_random_numbers(l1, &id);
    assert!(!l1.serve_log().contains("rebuilding"));

    let r = l1.call("DELETE", &format!("/functions/{id}"), &[], b"", SLOW);
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        wait_until(l1, Duration::from_secs(30), |l1| instances(
            l1,
            &FIRECRACKER,
            &id
        )
        .is_empty()),
        "instances outlived the delete"
    );
    l1.stop_hearth();
    assert_eq!(l1.sh(&format!("ls {jails}")).trim(), "");
    l1.sh(&format!("rm -rf {STATE}/functions"));
    eprintln!(
        "nested: firecracker --jailer cycle took {} s",
        cycle.elapsed().as_secs()
    );
}

/// Two concurrent calls to function `id` (the `behave` fixture, with a
/// timeout above 35 s) with no instance yet, so each is a clone's first call
/// (the first holds its instance long enough for the second clone's restore,
/// 16–22 s in L1 on a loaded host): their `Math.random()` and
/// `crypto.randomUUID()` differ (hearth reseeds each clone in its HELLO).
fn clones_draw_different_random_numbers(l1: &mut L1, id: &str) {
    assert!(instances(l1, &FIRECRACKER, id).is_empty());
    let mut clients: Vec<Client> = (0..2)
        .map(|_| send(l1, &format!("/f/{id}/random?ms=35000")))
        .collect();
    let answers: Vec<serde_json::Value> = clients
        .iter_mut()
        .map(|c| {
            let r = c.response();
            assert_eq!(r.status, 200, "{}", r.text());
            r.json()
        })
        .collect();
    assert!(
        answers.iter().all(|a| a["calls"] == 1),
        "one clone served both: {answers:?}"
    );
    assert_ne!(answers[0]["random"], answers[1]["random"], "{answers:?}");
    assert_ne!(answers[0]["uuid"], answers[1]["uuid"], "{answers:?}");
    eprintln!("nested: firecracker clones drew different random numbers: {answers:?}");
}

/// The QEMU backend on a machine type under KVM: a deploy and a restore.
fn machine_check(l1: &mut L1, machine: &str) {
    let t = Instant::now();
    l1.start_hearth(
        &format!("HEARTH_QEMU_TRACE=1 HEARTH_QEMU_MACHINE={machine}"),
        "--backend qemu",
    );
    let log = l1.serve_log();
    assert!(log.contains(&format!("-accel kvm -M {machine}")), "{log}");
    let id = deploy(l1, "plain", "", "qemu");
    let r = get(l1, &format!("/f/{id}/on-{machine}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["event"]["rawPath"], format!("/on-{machine}"));
    assert_eq!(instances(l1, &QEMU, &id).len(), 1);
    let phases = l1.sh(&format!(
        "grep -E 'qemu: (function|restored) {id}' {STATE}/../serve.log || true"
    ));
    l1.stop_hearth();
    l1.sh(&format!("rm -rf {STATE}/functions"));
    eprintln!(
        "nested: qemu -M {machine}: deploy and restore checked in {} s\n{}",
        t.elapsed().as_secs(),
        phases.trim_end()
    );
}

/// Where `tools/fetch-firecracker.sh` installs Firecracker, on the host and in L1.
const FIRECRACKER_IN_L1: &str = "/var/cache/hearth/firecracker/firecracker";

#[test]
fn nested_kvm_host_runs_hearths_vm_backends() {
    if let Some(why) = nested::skip_reason() {
        eprintln!("skipped: {why}");
        return;
    }
    let mut l1 = L1::boot();
    let kvm = l1.sh("cat /sys/module/kvm_amd/parameters/nested /sys/module/kvm_amd/parameters/npt");
    assert_eq!(
        kvm.split_whitespace().collect::<Vec<_>>(),
        ["1", "Y"],
        "{kvm}"
    );
    if l1
        .try_sh(&format!("test -x {FIRECRACKER_IN_L1}"), nested::SH_TIMEOUT)
        .is_some_and(|(rc, _)| rc == 0)
    {
        if let Some(n) = std::env::var("HEARTH_NESTED_PERF")
            .ok()
            .and_then(|v| v.parse().ok())
        {
            restore_perf(&mut l1, n);
            l1.shutdown();
            return;
        }
        // HEARTH_NESTED_ONLY=uffd: only the Uffd cycles (while working on them).
        let app = if std::env::var("HEARTH_NESTED_ONLY").as_deref() != Ok("uffd") {
            part(&mut l1, "firecracker cycle", |l1, _| {
                backend_cycle(l1, &FIRECRACKER, "--backend firecracker --fc-memory file")
            })
        } else {
            None
        };
        // A fresh L1 has none of the first cycle's functions.
        part(&mut l1, "uffd cycles", |l1, fresh| {
            uffd_cycle(l1, if fresh { None } else { app.clone() })
        });
        part(&mut l1, "jailer cycle", |l1, _| jailer_cycle(l1));
    } else {
        eprintln!(
            "nested: firecracker cycle skipped: no firecracker was installed on this host \
             (tools/fetch-firecracker.sh --shared), so L1 has none"
        );
    }
    // The QEMU backend picks KVM in L1 (`-M pc` by default) and serves from
    // a snapshot on `microvm`, the KVM-only type (~1 min; `pc` took twice as
    // long and is the machine every TCG test of the QEMU backend uses).
    part(&mut l1, "qemu on microvm", |l1, _| {
        l1.start_hearth("", "--backend qemu");
        let log = l1.serve_log();
        assert!(log.contains("-accel kvm -M pc"), "{log}");
        l1.stop_hearth();
        machine_check(l1, "microvm");
    });
    // The whole QEMU cycle on KVM, then `-M pc` and `-M q35` (~1.5 min together;
    // the nested group took 308 s with them on this machine).
    part(&mut l1, "qemu cycle", |l1, _| {
        backend_cycle(l1, &QEMU, "--backend qemu");
        l1.sh(&format!("rm -rf {STATE}/functions"));
    });
    part(&mut l1, "qemu on pc", |l1, _| machine_check(l1, "pc"));
    part(&mut l1, "qemu on q35", |l1, _| machine_check(l1, "q35"));
    l1.shutdown();
}

/// Runs one part of the test. When it fails because L1 itself stopped
/// running ([`L1::stalled_since`]), which says nothing about hearth, the part
/// runs once more on a fresh L1 (`run` is told so: the old L1's state is
/// gone); any other failure, or a second one, fails the test.
fn part<T>(l1: &mut L1, name: &str, run: impl Fn(&mut L1, bool) -> T) -> T {
    let seen = l1.console().len();
    let e = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(l1, false))) {
        Ok(v) => return v,
        Err(e) => e,
    };
    match l1.stalled_since(seen) {
        Some(why) => {
            eprintln!(
                "nested: {name}: L1 stopped running ({why}), not hearth; \
                 the part runs once more on a fresh L1"
            );
            drop(e);
            l1.reboot();
            run(l1, true)
        }
        None => std::panic::resume_unwind(e),
    }
}

/// Waits until function `id` has no instance left (scaled to zero after `--keep-warm-ms`).
fn until_scaled_to_zero(l1: &mut L1, id: &str) {
    let idle = wait_until(l1, Duration::from_secs(60), |l1| {
        instances(l1, &FIRECRACKER, id).is_empty()
    });
    assert!(idle, "instances of {id} were not reaped");
}

/// Keep-warm of the Uffd cycles: short, so that later calls restore again,
/// but longer than a loaded host takes between two steps.
const UFFD_KEEP_WARM: &str = "--keep-warm-ms 10000";

/// Firecracker with `--fc-memory uffd-lazy` (hearth serves every page on
/// fault) and then `--fc-memory uffd` (the first invocation's working set is
/// recorded, stored as `fc.ws` and installed before later restores resume),
/// on the same functions: a restart of hearth restores them from their
/// snapshots. `app`: the Express app the File cycle left deployed.
fn uffd_cycle(l1: &mut L1, app: Option<String>) {
    let t = Instant::now();
    let args = |mode: &str| format!("--backend firecracker --fc-memory {mode} {UFFD_KEEP_WARM}");
    l1.start_hearth("HEARTH_FIRECRACKER_TRACE=1", &args("uffd-lazy"));
    assert!(l1.serve_log().contains("memory UffdLazy"));
    let b = "firecracker";
    // Generous timeouts: a queued request waits at most timeout + 10 s, and a
    // loaded host took 35 s for a lazily served restore.
    let plain = deploy(l1, "plain", "timeout_ms=120000", b);
    let beh = deploy(l1, "behave", "timeout_ms=120000", b);
    let express =
        env!("CARGO_MANIFEST_DIR").to_string() + "/tests/fixtures/express-app/node_modules/express";
    let app = app.or_else(|| {
        std::path::Path::new(&express)
            .is_dir()
            .then(|| deploy(l1, "express-app", "timeout_ms=120000", b))
    });
    uffd_checks(l1, &plain, &beh, app.as_deref(), false);
    l1.stop_hearth();
    l1.start_hearth("HEARTH_FIRECRACKER_TRACE=1", &args("uffd"));
    uffd_checks(l1, &plain, &beh, app.as_deref(), true);
    l1.stop_hearth();
    l1.sh(&format!("rm -rf {STATE}/functions"));
    eprintln!("nested: uffd cycles took {} s", t.elapsed().as_secs());
}

/// One mode's checks: restores answered (plain, Express), warm calls,
/// two concurrent instances, a killed VMM replaced, and the working set.
fn uffd_checks(l1: &mut L1, plain: &str, beh: &str, app: Option<&str>, prefetch: bool) {
    let mode = if prefetch { "uffd" } else { "uffd-lazy" };
    let ws = format!("{STATE}/functions/{plain}/fc.ws");
    let t = Instant::now();
    let r = get(l1, &format!("/f/{plain}/a?x=1"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["event"]["rawPath"], "/a");
    let cold_ms = t.elapsed().as_millis();
    assert_eq!(get(l1, &format!("/f/{plain}/warm")).status, 200);
    if prefetch {
        // The first invocation after the restore recorded the set; it is on disk.
        let recorded = format!("function {plain}: working set recorded");
        assert!(
            wait_until(l1, Duration::from_secs(30), |l1| l1
                .serve_log()
                .contains(&recorded)),
            "{}",
            l1.serve_log()
        );
        l1.sh(&format!("test -s {ws}"));
    } else {
        l1.sh(&format!("test ! -e {ws}"));
    }
    if let Some(app) = app {
        let t = Instant::now();
        let r = get(l1, &format!("/f/{app}/"));
        assert_eq!((r.status, r.text().as_str()), (200, "Hello from hearth"));
        eprintln!(
            "nested: {mode}: express: restore to first response {} ms",
            t.elapsed().as_millis()
        );
        let r = l1.call(
            "POST",
            &format!("/f/{app}/greet"),
            &[("content-type", "application/json")],
            br#"{"name":"uffd"}"#,
            SLOW,
        );
        assert_eq!(r.json()["message"], "Hello, uffd", "{}", r.text());
    }
    // A later restore: with prefetch, the recorded set goes in before the VM resumes.
    until_scaled_to_zero(l1, plain);
    let t = Instant::now();
    let r = get(l1, &format!("/f/{plain}/again"));
    assert_eq!(r.status, 200, "{}", r.text());
    eprintln!(
        "nested: {mode}: plain handler: first restore {cold_ms} ms, a later one {} ms",
        t.elapsed().as_millis()
    );
    let installed = format!("{plain}: working set of ");
    assert_eq!(
        l1.serve_log().contains(&installed),
        prefetch,
        "working set installed only with prefetch"
    );

    // Two calls at once: two instances, each served from the snapshot.
    let base = format!("/f/{beh}");
    assert_eq!(get(l1, &format!("{base}/whoami")).status, 200);
    let mut clients: Vec<Client> = (0..2)
        .map(|_| send(l1, &format!("{base}/sleep?ms=4000")))
        .collect();
    for c in &mut clients {
        let r = c.response();
        assert_eq!(r.status, 200, "{}", r.text());
    }
    let before = instances(l1, &FIRECRACKER, beh);
    assert!(before.len() >= 2, "{before:?} for 2 concurrent calls");

    // The VMM dies mid-request (→ 502): hearth frees its memory state and a
    // fresh instance is restored. Idle ones may have been reaped already.
    let mut slow = send(l1, &format!("{base}/sleep?ms=8000"));
    std::thread::sleep(Duration::from_secs(2));
    let before = instances(l1, &FIRECRACKER, beh);
    assert!(!before.is_empty(), "the busy instance is alive");
    l1.sh(&format!(
        "kill -KILL {} 2>/dev/null; true",
        before
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(" ")
    ));
    let r = slow.response();
    assert_eq!(r.status, 502, "{}", r.text());
    let mut r = get(l1, &format!("{base}/whoami"));
    for _ in 0..before.len() {
        if r.status != 502 {
            break;
        }
        r = get(l1, &format!("{base}/whoami"));
    }
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["calls"], 1, "a fresh instance from the snapshot");
    let after = instances(l1, &FIRECRACKER, beh);
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} {after:?}"
    );
    eprintln!("nested: {mode}: checks passed");
}

/// `HEARTH_NESTED_PERF=<n>` (perf/nested-restore.sh): restore-to-first-response
/// of the Express app, `n` restores per Firecracker memory backend and with
/// the QEMU backend (`-accel kvm -M microvm`, the machine the nested test
/// checks), all in this L1 boot. Rounds
/// interleave them (hearth restarted with each; no instance is left from the
/// one before), so a load change on the host hits all alike. The working set
/// is recorded once first. Each VMM has its own copy of the app: the two sets
/// of functions take turns as `{STATE}/functions` (moved aside while the
/// other backend's server runs, so neither rebuilds the other's snapshot).
fn restore_perf(l1: &mut L1, rounds: usize) {
    let express =
        env!("CARGO_MANIFEST_DIR").to_string() + "/tests/fixtures/express-app/node_modules/express";
    assert!(
        std::path::Path::new(&express).is_dir(),
        "run `npm ci` in tests/fixtures/express-app"
    );
    let args = |mode: &str| format!("--backend firecracker --fc-memory {mode}");
    l1.start_hearth("", &args("uffd"));
    let app = deploy(l1, "express-app", "timeout_ms=120000", "firecracker");
    assert_eq!(get(l1, &format!("/f/{app}/")).status, 200);
    let ws = format!("{STATE}/functions/{app}/fc.ws");
    let stored = wait_until(l1, Duration::from_secs(30), |l1| {
        l1.try_sh(&format!("test -s {ws}"), nested::SH_TIMEOUT)
            .is_some_and(|(rc, _)| rc == 0)
    });
    assert!(stored, "no working set recorded");
    l1.stop_hearth();
    let (fns, fc_fns, qemu_fns) = (
        format!("{STATE}/functions"),
        format!("{STATE}/functions.fc"),
        format!("{STATE}/functions.qemu"),
    );
    l1.sh(&format!("mv {fns} {fc_fns}"));
    let qemu_env = "HEARTH_QEMU_MACHINE=microvm";
    l1.start_hearth(qemu_env, "--backend qemu");
    let app_q = deploy(l1, "express-app", "timeout_ms=120000", "qemu");
    assert_eq!(get(l1, &format!("/f/{app_q}/")).status, 200);
    l1.stop_hearth();
    l1.sh(&format!("mv {fns} {qemu_fns}"));
    let modes = ["file-lazy", "file", "uffd-lazy", "uffd", "qemu"];
    // HEARTH_NESTED_PERF_COLD=1: every restore starts with L1's page cache dropped.
    let cold = std::env::var_os("HEARTH_NESTED_PERF_COLD").is_some();
    let mut ms: Vec<Vec<f64>> = vec![Vec::new(); modes.len()];
    for round in 0..rounds {
        for (i, mode) in modes.iter().enumerate() {
            let (set, env, server, id) = match *mode {
                "qemu" => (&qemu_fns, qemu_env, "--backend qemu".to_string(), &app_q),
                _ => (&fc_fns, "HEARTH_FIRECRACKER_TRACE=1", args(mode), &app),
            };
            l1.sh(&format!("mv {set} {fns}"));
            l1.start_hearth(env, &server);
            if cold {
                // Nothing of the snapshot in L1's page cache, as after a reboot
                // or when many functions' snapshots compete for memory.
                l1.sh("sync; echo 3 > /proc/sys/vm/drop_caches");
            }
            let t = Instant::now();
            let r = get(l1, &format!("/f/{id}/"));
            ms[i].push(t.elapsed().as_secs_f64() * 1000.0);
            assert_eq!(r.status, 200, "{}", r.text());
            l1.stop_hearth();
            l1.sh(&format!("mv {fns} {set}"));
            eprintln!("perf: round {round} {mode}: {:.0} ms", ms[i][round]);
        }
    }
    let log = l1.serve_log();
    assert!(!log.contains("rebuilding"));
    // Where each restore's time went (HEARTH_FIRECRACKER_TRACE).
    for line in log.lines() {
        if line.starts_with("--- ")
            || line.contains(": restored ")
            || line.contains("working set of")
        {
            eprintln!("perf-trace: {line}");
        }
    }
    let median = |v: &[f64]| {
        let mut s = v.to_vec();
        s.sort_by(f64::total_cmp);
        s[s.len() / 2]
    };
    let file = median(&ms[0]);
    for (mode, v) in modes.iter().zip(&ms) {
        let list = v
            .iter()
            .map(|m| format!("{m:.0}"))
            .collect::<Vec<_>>()
            .join(" ");
        eprintln!(
            "perf-table: | {mode} | {:.0} ms | {:.2}x | {list} |",
            median(v),
            median(v) / file
        );
    }
    l1.sh(&format!("rm -rf {fc_fns} {qemu_fns}"));
}
