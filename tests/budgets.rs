//! Server-wide budgets on the process backend: the memory all instances (and
//! standbys) may reserve, and the disk all functions may fill. Real server,
//! real zips, real sandboxes.
//!
//! Needs root and the static guest agent (`tools/build-agent.sh`); without
//! them every test prints why and returns.

mod common;

use std::time::{Duration, Instant};

use common::{temp_dir, zip_fixture, Response, Server};

/// The admin token every server here runs with (given explicitly, so the tests hold with or
/// without a generated default).
const TOKEN: &str = "budget-and-sandbox-tests";

/// Starts a server with [`TOKEN`] and `args`.
fn start(args: &[&str]) -> Server {
    let mut all = vec!["--admin-token", TOKEN];
    all.extend_from_slice(args);
    Server::start(&all)
}

/// Every control-plane request goes through here, with the admin token.
fn control(
    s: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    s.control(method, path, headers, body)
}

fn deploy_zip(s: &Server, zip: &[u8], query: &str) -> Response {
    control(
        s,
        "POST",
        &format!("/deploy?{query}"),
        &[("content-type", "application/zip")],
        zip,
    )
}

fn deploy_ok(s: &Server, zip: &[u8], query: &str) -> String {
    let r = deploy_zip(s, zip, query);
    assert_eq!(r.status, 201, "{} / stderr:\n{}", r.text(), s.stderr());
    r.json()["functionId"].as_str().unwrap().to_string()
}

fn invoke(s: &Server, id: &str) -> Response {
    s.connect().request("GET", &format!("/f/{id}/"), &[], b"")
}

/// Everything under the state's `functions/` directory (published, staging, trash).
fn functions_on_disk(s: &Server) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(s.dir.join("state/functions"))
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// A zip of an `index.js` with `source` and, if `pad_bytes` > 0, a file of that many
/// incompressible bytes.
fn zip_of(source: &str, pad_bytes: usize) -> Vec<u8> {
    let dir = temp_dir("budget-fn");
    std::fs::write(dir.join("index.js"), source).unwrap();
    if pad_bytes > 0 {
        let mut pad = vec![0u8; pad_bytes];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for b in pad.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        std::fs::write(dir.join("pad.bin"), pad).unwrap();
    }
    let zip = hearth::cli::zip_dir(&dir).expect("zip").0;
    let _ = std::fs::remove_dir_all(&dir);
    zip
}

#[test]
fn memory_budget_refuses_the_deploy_and_the_scale_out_that_do_not_fit() {
    require_sandbox!();
    // 320 MiB: two 128 MiB standbys fit, a third instance of 128 MiB does not.
    let s = start(&["--cores", "1", "--instance-memory-max-mb", "320"]);
    let zip = zip_fixture("plain");
    let a = deploy_ok(&s, &zip, "memory_mb=128");
    let b = deploy_ok(&s, &zip, "memory_mb=128");

    let r = deploy_zip(&s, &zip, "memory_mb=128");
    assert_eq!(r.status, 503, "{}", r.text());
    r.assert_json_error("memory_budget_exhausted");
    assert!(r.text().contains("256 of 320 MiB"), "{}", r.text());
    assert_eq!(functions_on_disk(&s), {
        let mut v = vec![a.clone(), b.clone()];
        v.sort();
        v
    });

    // A's first instance would be the third 128 MiB (A's standby is refilled): it waits
    // for room, then gets 503.
    let t = Instant::now();
    let r = invoke(&s, &a);
    assert_eq!(r.status, 503, "{}", r.text());
    r.assert_json_error("memory_budget_exhausted");
    assert_eq!(r.header("retry-after"), Some("1"));
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    s.assert_healthy();

    // Deleting B frees its standby's share: A runs.
    let r = control(&s, "DELETE", &format!("/functions/{b}"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = invoke(&s, &a);
    assert_eq!(r.status, 200, "{}", r.text());
    // A's standby and its live instance hold 256 MiB now: still no room for a new function.
    let r = deploy_zip(&s, &zip, "memory_mb=128");
    assert_eq!(r.status, 503, "{}", r.text());
    r.assert_json_error("memory_budget_exhausted");
    // A smaller one fits exactly.
    deploy_ok(&s, &zip, "memory_mb=64");
}

#[test]
fn a_scale_out_beyond_the_memory_budget_waits_for_a_running_instance() {
    require_sandbox!();
    let s = start(&["--cores", "1", "--instance-memory-max-mb", "300"]);
    let slow = zip_of(
        "exports.handler = async () => { await new Promise(r => setTimeout(r, 400)); return { statusCode: 200, body: 'done' }; };\n",
        0,
    );
    let id = deploy_ok(&s, &slow, "memory_mb=128&concurrency=5");
    // Standby 128 + one instance 128; a second instance would need 384.
    let threads: Vec<_> = (0..3)
        .map(|_| {
            let addr = s.addr;
            let id = id.clone();
            std::thread::spawn(move || {
                common::Client::connect(addr).request("GET", &format!("/f/{id}/"), &[], b"")
            })
        })
        .collect();
    for t in threads {
        let r = t.join().unwrap();
        assert_eq!((r.status, r.text().as_str()), (200, "done"));
    }
    let v = control(&s, "GET", &format!("/functions/{id}"), &[], b"").json();
    assert_eq!(v["instances"], 1, "{v}");
}

#[test]
fn disk_budget_refuses_a_bigger_zip_with_507_and_leaves_nothing() {
    require_sandbox!();
    let s = start(&["--cores", "1", "--functions-disk-max-mb", "2"]);
    let big = zip_of("exports.handler = async () => 'big';\n", 3 << 20);
    let r = deploy_zip(&s, &big, "");
    assert_eq!(r.status, 507, "{}", r.text());
    r.assert_json_error("insufficient_storage");
    assert_eq!(functions_on_disk(&s), Vec::<String>::new());
    s.assert_healthy();

    // Small functions fit, until their sum does not.
    let small = zip_of("exports.handler = async () => 'small';\n", 700 << 10);
    let first = deploy_ok(&s, &small, "");
    let second = deploy_ok(&s, &small, "");
    let r = deploy_zip(&s, &small, "");
    assert_eq!(r.status, 507, "{}", r.text());
    r.assert_json_error("insufficient_storage");
    let mut want = vec![first.clone(), second];
    want.sort();
    assert_eq!(functions_on_disk(&s), want);
    // Deleting one makes room again.
    let r = control(&s, "DELETE", &format!("/functions/{first}"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    deploy_ok(&s, &small, "");
}
