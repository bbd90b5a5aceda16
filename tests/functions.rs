//! Functions end to end on the process backend: real zips, real Node.js, real
//! sandboxes, the real `hearth` binary on a real socket.
//!
//! The process backend needs root (user namespaces with uid mapping, cgroups)
//! and the static guest agent (`tools/build-agent.sh`); without them every test
//! here prints why and returns.

mod common;

use std::fs;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

use common::{
    anon as call_anon, control as call, deploy_fixture as deploy, deploy_zip, fixture,
    functions_on_disk, header_values, zip_fixture, Client, Server,
};

#[test]
fn plain_handler_gets_a_function_url_event() {
    require_sandbox!();
    let s = Server::start(&[]);
    // The original project's multipart form, as `curl -F code=@f.zip` sends it.
    let zip = zip_fixture("plain");
    let mut body = b"--XyZ\r\nContent-Disposition: form-data; name=\"code\"; filename=\"f.zip\"\r\nContent-Type: application/zip\r\n\r\n".to_vec();
    body.extend_from_slice(&zip);
    body.extend_from_slice(b"\r\n--XyZ\r\nContent-Disposition: form-data; name=\"env\"\r\n\r\n{\"GREETING\":\"hi\"}\r\n--XyZ--\r\n");
    let r = call(
        &s,
        "POST",
        "/deploy",
        &[("content-type", "multipart/form-data; boundary=XyZ")],
        &body,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    let v = r.json();
    let id = v["functionId"].as_str().unwrap();
    assert!(
        id.len() == 16 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{v}"
    );
    assert_eq!(v["status"], "deployed");
    assert_eq!(v["snapshotReady"], true);
    assert_eq!(v["url"], format!("http://t/f/{id}"));

    let r = call(
        &s,
        "POST",
        &format!("/f/{id}/a/b?x=1&y=2&x=3"),
        &[
            ("cookie", "c1=v1; c2=v2"),
            ("x-rep", "a"),
            ("x-rep", "b"),
            ("content-type", "text/plain"),
        ],
        b"hello",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-fixture"), Some("plain"));
    let v = r.json();
    let e = &v["event"];
    assert_eq!(e["version"], "2.0");
    assert_eq!(e["routeKey"], "$default");
    assert_eq!(e["rawPath"], "/a/b");
    assert_eq!(e["rawQueryString"], "x=1&y=2&x=3");
    assert_eq!(e["queryStringParameters"]["x"], "1,3");
    assert_eq!(e["cookies"], serde_json::json!(["c1=v1", "c2=v2"]));
    assert_eq!(e["headers"]["x-rep"], "a,b");
    assert!(e["headers"].get("cookie").is_none());
    assert_eq!(e["body"], "hello");
    assert_eq!(e["isBase64Encoded"], false);
    assert_eq!(e["requestContext"]["http"]["method"], "POST");
    assert_eq!(e["requestContext"]["http"]["sourceIp"], "127.0.0.1");
    assert_eq!(v["context"]["functionName"], id);
    assert_eq!(v["context"]["memoryLimitInMB"], "128");
    assert!(v["context"]["remainingMs"].as_u64().unwrap() > 25_000);
    assert_eq!(v["env"]["GREETING"], "hi");
    assert_eq!(v["cwd"], "/var/task");

    // Empty path is "/", HEAD gets no body, result without statusCode is JSON.
    let r = call(&s, "GET", &format!("/f/{id}"), &[], b"");
    assert_eq!(r.json()["event"]["rawPath"], "/");
    let r = call(
        &s,
        "POST",
        &format!("/f/{id}/result"),
        &[("content-type", "application/json")],
        br#"{"value":{"a":[1,2]}}"#,
    );
    assert_eq!(
        (r.status, r.header("content-type"), r.text().as_str()),
        (200, Some("application/json"), r#"{"a":[1,2]}"#)
    );
    let r = call(&s, "GET", &format!("/f/{id}/headers"), &[], b"");
    assert_eq!(r.status, 201);
    assert_eq!(r.header("x-single"), Some("one"));
    let multi = header_values(&r, "x-multi");
    assert_eq!(multi, ["a", "b"]);
    let cookies = header_values(&r, "set-cookie");
    assert_eq!(cookies, ["a=1; Path=/", "b=2"]);
    assert_eq!(r.body, b"made", "the handler's Content-Length must not win");
    // A handler error is a 502 with the runtime's error.
    let r = call(&s, "GET", &format!("/f/{id}/error"), &[], b"");
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["errorType"], "TypeError");
}

#[test]
fn express_app_with_serverless_http_works_unchanged() {
    require_sandbox!();
    if !fixture("express-app/node_modules/express").is_dir() {
        eprintln!("skipped: run `npm ci` in tests/fixtures/express-app (tools/setup.sh does)");
        return;
    }
    let s = Server::start(&[]);
    let id = deploy(&s, "express-app", "");
    let r = call(&s, "GET", &format!("/f/{id}/"), &[], b"");
    assert_eq!((r.status, r.text().as_str()), (200, "Hello from hearth"));
    let r = call(
        &s,
        "POST",
        &format!("/f/{id}/greet"),
        &[("content-type", "application/json")],
        br#"{ "name": "John Doe" }"#,
    );
    assert_eq!(
        (r.status, r.json()["message"].as_str()),
        (200, Some("Hello, John Doe"))
    );
    let r = call(&s, "GET", &format!("/f/{id}/q?a=1&b=two"), &[], b"");
    assert_eq!(r.json(), serde_json::json!({"a": "1", "b": "two"}));
    let r = call(
        &s,
        "GET",
        &format!("/f/{id}/cookie"),
        &[("cookie", "k=v")],
        b"",
    );
    assert_eq!(r.json()["cookie"], "k=v");
    let set = header_values(&r, "set-cookie");
    assert_eq!(set.len(), 2, "{set:?}");
    let r = call(&s, "GET", &format!("/f/{id}/redirect"), &[], b"");
    assert_eq!((r.status, r.header("location")), (302, Some("/")));
    let r = call(&s, "GET", &format!("/f/{id}/bin"), &[], b"");
    assert_eq!(r.body, (0..=255u8).collect::<Vec<_>>());
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let r = call(
        &s,
        "POST",
        &format!("/f/{id}/echo-bin"),
        &[("content-type", "application/octet-stream")],
        &payload,
    );
    assert_eq!(r.status, 200);
    assert!(
        r.body == payload,
        "binary body changed on the way ({} bytes back)",
        r.body.len()
    );
}

#[test]
fn esm_callback_and_binary_handlers_work() {
    require_sandbox!();
    let s = Server::start(&[]);
    for name in ["esm", "callback"] {
        let id = deploy(&s, name, "");
        let r = call(&s, "GET", &format!("/f/{id}/x"), &[], b"");
        assert!(r.status / 100 == 2, "{name}: {}", r.text());
    }
    let id = deploy(&s, "binary", "");
    let r = call(&s, "GET", &format!("/f/{id}/"), &[], b"");
    assert_eq!(r.body, (0..=255u8).collect::<Vec<_>>());
    let bytes: Vec<u8> = (0..=255u8).rev().collect();
    let r = call(
        &s,
        "POST",
        &format!("/f/{id}/"),
        &[("content-type", "application/octet-stream")],
        &bytes,
    );
    assert_eq!(r.body, bytes);
    assert_eq!(r.header("x-request-base64"), Some("true"));
}

#[test]
fn bad_deploys_are_refused_and_leave_nothing_behind() {
    require_sandbox!();
    let s = Server::start(&[]);
    let r = deploy_zip(&s, b"this is not a zip", "");
    assert_eq!(r.status, 400);
    r.assert_json_error("not_a_zip");
    // Zip slip.
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    w.start_file("../evil.js", zip::write::SimpleFileOptions::default())
        .unwrap();
    std::io::Write::write_all(&mut w, b"x").unwrap();
    let evil = w.finish().unwrap().into_inner();
    let r = deploy_zip(&s, &evil, "");
    assert_eq!(r.status, 400);
    r.assert_json_error("unsafe_path");
    let r = deploy_zip(&s, &zip_fixture("plain"), "handler=missing.handler");
    assert_eq!(r.status, 400);
    r.assert_json_error("bad_handler");
    let r = deploy_zip(&s, &zip_fixture("plain"), "memory_mb=1");
    assert_eq!(r.status, 400);
    r.assert_json_error("bad_setting");
    let r = call(
        &s,
        "POST",
        "/deploy",
        &[("content-type", "text/plain")],
        b"x",
    );
    assert_eq!(r.status, 415);
    for name in ["init-error", "no-export"] {
        let r = deploy_zip(&s, &zip_fixture(name), "");
        assert_eq!(r.status, 422, "{name}: {}", r.text());
        let v = r.json();
        assert_eq!(v["code"], "init_error");
        assert!(!v["error"].as_str().unwrap().is_empty());
    }
    assert!(
        functions_on_disk(&s).is_empty(),
        "left behind: {:?}",
        functions_on_disk(&s)
    );
    let r = call(&s, "GET", "/f/0123456789abcdef/", &[], b"");
    assert_eq!(r.status, 404);
    r.assert_json_error("function_not_found");
    s.assert_healthy();
}

/// `zip` followed by an end of central directory record declaring one entry in
/// a directory that cannot be where it says (at the record itself). The zip
/// reader passes over such a record to the one before it.
fn with_a_broken_last_end_record(mut zip: Vec<u8>) -> Vec<u8> {
    let at = zip.len() as u32;
    zip.extend_from_slice(b"PK\x05\x06\0\0\0\0\x01\0\x01\0");
    zip.extend_from_slice(&46u32.to_le_bytes());
    zip.extend_from_slice(&at.to_le_bytes());
    zip.extend_from_slice(&[0, 0]);
    zip
}

/// A zip64 archive of one empty file and `records` central records (names
/// `0000`, `0001`, … as little-endian numbers) all pointing at it.
fn zip64_with_records(records: u32) -> Vec<u8> {
    let mut zip = b"PK\x03\x04\x14".to_vec();
    zip.resize(26, 0);
    zip.extend_from_slice(&[1, 0, 0, 0]);
    zip.push(b'a');
    let directory_at = zip.len() as u64;
    for i in 0..records {
        zip.extend_from_slice(b"PK\x01\x02\x1e\x03\x14");
        zip.resize(zip.len() + 21, 0);
        zip.extend_from_slice(&[4, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        zip.extend_from_slice(&(0o100644u32 << 16).to_le_bytes());
        zip.extend_from_slice(&0u32.to_le_bytes());
        zip.extend_from_slice(&i.to_le_bytes());
    }
    let directory_bytes = zip.len() as u64 - directory_at;
    let eocd64_at = zip.len() as u64;
    zip.extend_from_slice(b"PK\x06\x06");
    zip.extend_from_slice(&44u64.to_le_bytes());
    zip.extend_from_slice(&[0x1e, 0x03, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    for field in [
        u64::from(records),
        u64::from(records),
        directory_bytes,
        directory_at,
    ] {
        zip.extend_from_slice(&field.to_le_bytes());
    }
    zip.extend_from_slice(b"PK\x06\x07\0\0\0\0");
    zip.extend_from_slice(&eocd64_at.to_le_bytes());
    zip.extend_from_slice(&1u32.to_le_bytes());
    zip.extend_from_slice(b"PK\x05\x06");
    zip.extend_from_slice(&[0xff; 16]);
    zip.extend_from_slice(&[0, 0]);
    zip
}

#[test]
fn an_archive_read_through_an_earlier_end_record_is_refused() {
    let s = Server::start(&[]);
    // Other tools read the last record, find no directory there and give up;
    // the zip reader took the record before it and deployed the code.
    let r = deploy_zip(&s, &with_a_broken_last_end_record(zip_fixture("plain")), "");
    assert_eq!(r.status, 400, "{}", r.text());
    r.assert_json_error("not_a_zip");
    // The last record declares one entry, the one before 400,000: refused
    // before the zip reader holds a record of each (hundreds of MiB).
    let before = common::peak_rss_kib(s.pid());
    let zip = with_a_broken_last_end_record(zip64_with_records(400_000));
    let r = deploy_zip(&s, &zip, "");
    assert_eq!(r.status, 413, "{}", r.text());
    r.assert_json_error("too_many_entries");
    let grown_mib = common::peak_rss_kib(s.pid()).saturating_sub(before) / 1024;
    eprintln!(
        "peak memory grew {grown_mib} MiB for a {} MiB archive",
        zip.len() >> 20
    );
    assert!(grown_mib < 100, "peak memory grew {grown_mib} MiB");
    assert!(functions_on_disk(&s).is_empty());
    s.assert_healthy();
}

#[test]
fn concurrency_limit_queues_then_throttles_with_429() {
    require_sandbox!();
    let s = Server::start(&["--cores", "1", "--queue-depth-max", "2"]);
    let id = deploy(&s, "behave", "concurrency=1");
    let path = format!("/f/{id}/sleep?ms=600");
    let mut clients: Vec<Client> = (0..5).map(|_| s.connect()).collect();
    for c in clients.iter_mut() {
        c.write(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
    }
    let statuses: Vec<u16> = clients.iter_mut().map(|c| c.response().status).collect();
    let ok = statuses.iter().filter(|&&st| st == 200).count();
    let throttled = statuses.iter().filter(|&&st| st == 429).count();
    assert_eq!(
        (ok, throttled),
        (3, 2),
        "one running + two queued succeed, the rest are throttled: {statuses:?}"
    );
    let r = call(&s, "GET", &path, &[], b"");
    assert_eq!(r.status, 200);
    let v = call(&s, "GET", &format!("/functions/{id}"), &[], b"").json();
    assert!(v["instances"].as_u64().unwrap() <= 1, "{v}");
}

#[test]
fn a_flooded_function_does_not_starve_another() {
    require_sandbox!();
    // One core: the two functions compete for the same event loop and CPU.
    let s = Server::start(&["--cores", "1", "--queue-depth-max", "50"]);
    let busy = deploy(&s, "behave", "concurrency=2");
    let quiet = deploy(&s, "plain", "");
    assert_eq!(
        call(&s, "GET", &format!("/f/{quiet}/"), &[], b"").status,
        200
    );
    let mut flood: Vec<Client> = (0..40).map(|_| s.connect()).collect();
    for c in flood.iter_mut() {
        c.write(format!("GET /f/{busy}/sleep?ms=300 HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
    }
    std::thread::sleep(Duration::from_millis(100));
    // Behind the flood the quiet function would wait about 6 s (40 runs of
    // 300 ms, two at a time); five warm calls take a few ms each, and up to
    // 3 s leaves room for a loaded machine.
    let t = Instant::now();
    for _ in 0..5 {
        assert_eq!(
            call(&s, "GET", &format!("/f/{quiet}/"), &[], b"").status,
            200
        );
    }
    let quiet_took = t.elapsed();
    assert!(
        quiet_took < Duration::from_secs(3),
        "the quiet function waited {quiet_took:?} behind the flood"
    );
    let statuses: Vec<u16> = flood.iter_mut().map(|c| c.response().status).collect();
    assert!(statuses.iter().all(|&st| st == 200), "{statuses:?}");
}

#[test]
fn functions_survive_a_restart() {
    require_sandbox!();
    let mut s = Server::start(&[]);
    let id = deploy(&s, "plain", "");
    assert_eq!(call(&s, "GET", &format!("/f/{id}/"), &[], b"").status, 200);
    let (status, _) = s.stop();
    assert!(status.success(), "{status:?}");
    let state = s.dir.join("state");
    // A runtime root of an older build (another node, agent or shim) is
    // pruned at start-up; the current one stays.
    let roots = |state: &Path| -> Vec<String> {
        let mut r: Vec<String> = std::fs::read_dir(state.join("cache"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("runtime-"))
            .collect();
        r.sort();
        r
    };
    let current = roots(&state);
    assert_eq!(current.len(), 1, "{current:?}");
    std::fs::create_dir_all(state.join("cache/runtime-0000old/usr/bin")).unwrap();
    let s2 = Server::start(&["--state-dir", state.to_str().unwrap()]);
    let r = call(&s2, "GET", &format!("/f/{id}/again"), &[], b"");
    assert_eq!(r.status, 200, "{} / {}", r.text(), s2.stderr());
    assert_eq!(r.json()["path"], "/again");
    let list = call(&s2, "GET", "/functions", &[], b"").json();
    assert_eq!(list["functions"][0]["functionId"], id.as_str());
    assert_eq!(roots(&state), current);
    assert!(
        s2.stderr().contains("removed 1 unused runtime root"),
        "{}",
        s2.stderr()
    );
}

#[test]
fn delete_waits_for_in_flight_requests() {
    require_sandbox!();
    let s = Server::start(&[]);
    let id = deploy(&s, "behave", "");
    let mut slow = s.connect();
    slow.write(format!("GET /f/{id}/sleep?ms=800 HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
    // Received before the delete, however late a loaded machine reads it;
    // then a moment for it to reach the instance.
    let deadline = Instant::now() + Duration::from_secs(10);
    while call(&s, "GET", &format!("/functions/{id}"), &[], b"").json()["invocations"] == 0 {
        assert!(Instant::now() < deadline, "the slow request never arrived");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(200));
    let r = call(&s, "DELETE", &format!("/functions/{id}"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        slow.response().status,
        200,
        "the in-flight request finishes"
    );
    assert_eq!(call(&s, "GET", &format!("/f/{id}/"), &[], b"").status, 404);
    assert_eq!(
        call(&s, "GET", &format!("/functions/{id}"), &[], b"").status,
        404
    );
    assert!(
        functions_on_disk(&s).is_empty(),
        "{:?}",
        functions_on_disk(&s)
    );
}

#[test]
fn timeouts_crashes_and_memory_hogs_are_contained() {
    require_sandbox!();
    let s = Server::start(&[]);
    let id = deploy(&s, "behave", "timeout_ms=1000&memory_mb=128");
    let other = deploy(&s, "plain", "");
    let base = format!("/f/{id}");
    assert_eq!(
        call(&s, "GET", &format!("{base}/whoami"), &[], b"").status,
        200
    );
    // Infinite loop: 504 at the deadline, the instance is destroyed.
    let t = Instant::now();
    let r = call(&s, "GET", &format!("{base}/spin"), &[], b"");
    assert_eq!(r.status, 504, "{}", r.text());
    // At the 1 s deadline, with room for a loaded machine to answer late.
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    // A process that exits: 502, then a fresh instance serves.
    let r = call(&s, "GET", &format!("{base}/exit"), &[], b"");
    assert_eq!(r.status, 502, "{}", r.text());
    let r = call(&s, "GET", &format!("{base}/whoami"), &[], b"");
    assert_eq!(r.status, 200);
    // The agent's note on the exit reaches the function's log.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let logs = call(&s, "GET", &format!("/functions/{id}/logs"), &[], b"").text();
        if logs.contains("runtime exited with status 3") {
            break;
        }
        assert!(Instant::now() < deadline, "no exit note in the log: {logs}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Memory hog: killed at its limit, 502 naming the limit; the server and others are fine.
    let r = call(&s, "GET", &format!("{base}/hog"), &[], b"");
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("memory"), "{}", r.text());
    assert_eq!(
        call(&s, "GET", &format!("/f/{other}/"), &[], b"").status,
        200
    );
    assert_eq!(
        call(&s, "GET", &format!("{base}/whoami"), &[], b"").status,
        200
    );
    // Fork bomb: stopped inside the sandbox, by the pids limit (spawn fails) or the
    // memory limit (the instance is killed); either way the host is unaffected.
    let r = call(&s, "GET", &format!("{base}/fork"), &[], b"");
    if r.status == 200 {
        let v = r.json();
        assert!(
            v["error"].is_string() && v["spawned"].as_u64().unwrap() < 400,
            "{v}"
        );
    } else {
        // 502 when a limit killed the instance; 504 when spawning hundreds of
        // processes on a loaded machine outlasted the 1 s timeout.
        assert!(matches!(r.status, 502 | 504), "{}", r.text());
    }
    s.assert_healthy();
    assert_eq!(
        call(&s, "GET", &format!("{base}/whoami"), &[], b"").status,
        200
    );
}

#[test]
fn functions_are_isolated_from_the_host_and_each_other() {
    require_sandbox!();
    let s = Server::start(&[]);
    let a = deploy(&s, "behave", "");
    let b = deploy(&s, "plain", "");
    let state = s.dir.join("state");
    let other_code = state.join("functions").join(&b).join("code/index.js");
    for p in [
        "/etc/shadow",
        state
            .join("functions")
            .join(&a)
            .join("meta.json")
            .to_str()
            .unwrap(),
        other_code.to_str().unwrap(),
    ] {
        let v = call(&s, "GET", &format!("/f/{a}/read?path={p}"), &[], b"").json();
        assert_eq!(v["ok"], false, "{p} was readable: {v}");
    }
    let v = call(
        &s,
        "GET",
        &format!("/f/{a}/read?path=/var/task/index.js"),
        &[],
        b"",
    )
    .json();
    assert_eq!(v["ok"], true, "its own code is readable");
    for p in ["/var/task/x", "/etc/x", "/x"] {
        let v = call(&s, "GET", &format!("/f/{a}/write?path={p}"), &[], b"").json();
        assert_eq!(v["ok"], false, "{p} was writable: {v}");
    }
    let v = call(&s, "GET", &format!("/f/{a}/write?path=/tmp/x"), &[], b"").json();
    assert_eq!(v["ok"], true, "/tmp is writable");
    let port = s.addr.port();
    let v = call(&s, "GET", &format!("/f/{a}/net?port={port}"), &[], b"").json();
    assert_ne!(v["local"], "connected", "reached the host's loopback: {v}");
    assert_ne!(v["remote"], "connected", "reached the network: {v}");
    let v = call(&s, "GET", &format!("/f/{a}/ps"), &[], b"").json();
    assert!(
        v["pids"].as_array().unwrap().len() <= 3,
        "host processes visible: {v}"
    );
}

#[test]
fn logs_metrics_and_listing_report_functions() {
    require_sandbox!();
    let s = Server::start(&[]);
    let id = deploy(&s, "behave", "");
    let r = call(&s, "GET", &format!("/f/{id}/log"), &[], b"");
    assert_eq!(r.status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let logs = call(&s, "GET", &format!("/functions/{id}/logs"), &[], b"").json();
        let lines = logs["logs"].as_array().unwrap().clone();
        let out = lines.iter().find(|l| {
            l["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("hello from stdout")
        });
        let err = lines.iter().find(|l| l["message"] == "hello from stderr");
        // Raw fd writes reach the log through the agent's pipe, untagged.
        let raw = lines.iter().find(|l| l["message"] == "raw write to fd 1");
        if let (Some(out), Some(err), Some(raw)) = (out, err, raw) {
            assert_eq!(out["stream"], "stdout");
            assert_eq!(err["stream"], "stderr");
            assert_eq!(raw["stream"], "stdout");
            assert_eq!(err["requestId"], out["requestId"]);
            let rid = out["requestId"].as_str().unwrap();
            assert!(
                !rid.is_empty() && out["message"].as_str().unwrap().ends_with(rid),
                "{out}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "log lines missing: {logs}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let metrics = call(&s, "GET", "/metrics", &[], b"").text();
    assert!(
        metrics.contains(&format!(
            "hearth_function_invocations_total{{function=\"{id}\"}} 1"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "hearth_function_duration_seconds_count{{function=\"{id}\"}} 1"
        )),
        "{metrics}"
    );
    let list = call(&s, "GET", "/functions", &[], b"").json();
    assert_eq!(list["functions"].as_array().unwrap().len(), 1);
}

#[test]
fn admin_token_guards_the_control_plane_only() {
    require_sandbox!();
    let s = Server::start(&["--admin-token", "s3cret"]);
    let r = call_anon(
        &s,
        "POST",
        "/deploy",
        &[("content-type", "application/zip")],
        &zip_fixture("plain"),
    );
    assert_eq!(r.status, 401);
    r.assert_json_error("unauthorized");
    assert_eq!(
        call(
            &s,
            "GET",
            "/functions",
            &[("authorization", "Bearer wrong")],
            b""
        )
        .status,
        401
    );
    let r = call(
        &s,
        "POST",
        "/deploy",
        &[
            ("content-type", "application/zip"),
            ("authorization", "Bearer s3cret"),
        ],
        &zip_fixture("plain"),
    );
    assert_eq!(r.status, 201);
    let id = r.json()["functionId"].as_str().unwrap().to_string();
    assert_eq!(
        call(&s, "GET", &format!("/f/{id}/"), &[], b"").status,
        200,
        "invocations stay public"
    );
    assert_eq!(
        call_anon(&s, "DELETE", &format!("/functions/{id}"), &[], b"").status,
        401
    );
    assert_eq!(
        call(
            &s,
            "DELETE",
            &format!("/functions/{id}"),
            &[("authorization", "Bearer s3cret")],
            b""
        )
        .status,
        200
    );
}

#[test]
fn kill_9_during_a_deploy_leaves_no_half_function() {
    require_sandbox!();
    if !fixture("express-app/node_modules/express").is_dir() {
        eprintln!("skipped: run `npm ci` in tests/fixtures/express-app (tools/setup.sh does)");
        return;
    }
    let mut s = Server::start(&[]);
    let zip = zip_fixture("express-app");
    let state = s.dir.join("state");
    // Start a deploy (unpacking 600+ files and booting a runtime takes a while)…
    let mut c = s.connect();
    c.write(format!("POST /deploy HTTP/1.1\r\nHost: t\r\n{}Content-Type: application/zip\r\nContent-Length: {}\r\n\r\n", s.auth_line(), zip.len()).as_bytes());
    c.write(&zip);
    // …and kill the server in the middle of it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_dir(state.join("functions"))
        .map(|d| {
            d.flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with(".staging-"))
        })
        .unwrap_or(false)
    {
        assert!(Instant::now() < deadline, "no deploy started");
        std::thread::sleep(Duration::from_millis(2));
    }
    s.signal(libc::SIGKILL);
    let _ = s.stop();
    let s2 = Server::start(&["--state-dir", state.to_str().unwrap()]);
    let list = call(&s2, "GET", "/functions", &[], b"").json();
    let listed = list["functions"].as_array().unwrap().len();
    let on_disk = functions_on_disk(&s);
    assert!(
        on_disk.iter().all(|n| !n.starts_with('.')),
        "leftovers: {on_disk:?}"
    );
    assert_eq!(
        listed,
        on_disk.len(),
        "listed {list} vs on disk {on_disk:?}"
    );
    // Whatever survived is whole and serves.
    for f in list["functions"].as_array().unwrap() {
        let id = f["functionId"].as_str().unwrap();
        assert_eq!(call(&s2, "GET", &format!("/f/{id}/"), &[], b"").status, 200);
    }
}

#[test]
fn idle_instances_scale_to_zero_and_come_back() {
    require_sandbox!();
    let s = Server::start(&["--keep-warm-ms", "300"]);
    let id = deploy(&s, "behave", "");
    assert_eq!(call(&s, "GET", &format!("/f/{id}/"), &[], b"").status, 200);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let v = call(&s, "GET", &format!("/functions/{id}"), &[], b"").json();
        if v["instances"] == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "instances never reaped: {v}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let r = call(&s, "GET", &format!("/f/{id}/"), &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["calls"], 1, "a fresh instance served the request");
}

#[test]
fn the_cli_drives_the_server() {
    require_sandbox!();
    let s = Server::start(&["--admin-token", "tok"]);
    let server = s.addr.to_string();
    let hearth = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(args)
            .args(["--server", &server, "--token", "tok"])
            .output()
            .expect("run hearth");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, out, err) = hearth(&[
        "deploy",
        fixture("behave").to_str().unwrap(),
        "--timeout-ms",
        "5000",
        "-e",
        "A=1",
    ]);
    assert!(ok, "{out}{err}");
    assert!(
        err.contains("packing") && err.contains("ready in"),
        "progress is shown: {err}"
    );
    let id = serde_json::from_str::<serde_json::Value>(&out).unwrap()["functionId"]
        .as_str()
        .unwrap()
        .to_string();
    let invoke = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(args)
            .args(["--server", &server])
            .output()
            .expect("run hearth");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (ok, out) = invoke(&["invoke", &id, "/log", "-X", "POST", "-d", "x"]);
    assert!(ok && out.contains("logged"), "{out}");
    let (ok, out, _) = hearth(&["ls"]);
    assert!(
        ok && out.contains(&id) && out.contains("index.handler"),
        "{out}"
    );
    let (ok, out, _) = hearth(&["logs", &id]);
    assert!(ok && out.contains("hello from stdout"), "{out}");
    let (ok, out, _) = hearth(&["rm", &id]);
    assert!(ok && out.contains("deleted"), "{out}");
    let (ok, _, err) = hearth(&["rm", &id]);
    assert!(!ok && err.contains("404"), "{err}");
}

#[test]
fn a_second_server_cannot_share_a_state_dir() {
    let s = Server::start(&[]);
    let state = s.dir.join("state");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
            state.to_str().unwrap(),
        ])
        .env("HEARTH_NODE", "/usr/bin/true")
        .output()
        .expect("run hearth");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("another hearth serve is using the state dir"),
        "{err}"
    );
    s.assert_healthy();
}

/// An agent built before the wire protocol changed (a static binary of its own,
/// easily left stale) would misread every request; the server refuses it at
/// start-up and says how to fix it. The stand-in prints what such an agent's
/// `--version` printed.
#[test]
fn a_guest_agent_of_another_protocol_is_refused_at_start() {
    let dir = common::temp_dir("stale-agent");
    for (name, line, says) in [
        ("old", "hearth-agent 0.1.0", "reports no wire protocol"),
        (
            "other",
            "hearth-agent 0.1.0 (protocol 1)",
            "speaks wire protocol 1",
        ),
    ] {
        let agent = dir.join(name);
        std::fs::write(&agent, format!("#!/bin/sh\necho '{line}'\n")).unwrap();
        std::fs::set_permissions(&agent, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let state = dir.join(format!("state-{name}"));
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(["serve", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(&state)
            .env("HEARTH_AGENT", &agent)
            .env("HEARTH_NODE", "/usr/bin/true")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("run hearth");
        // A server that accepted the agent would serve until stopped.
        let started = Instant::now();
        while child.try_wait().unwrap().is_none() {
            if started.elapsed() > Duration::from_secs(20) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{name}: the server started with an agent of another protocol");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: {err}");
        assert!(
            err.contains(says) && err.contains("tools/build-agent.sh"),
            "{name}: {err}"
        );
        let roots = std::fs::read_dir(state.join("cache"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name() != "bootstrap.js")
                    .count()
            })
            .unwrap_or(0);
        assert_eq!(
            roots, 0,
            "{name}: a runtime root was built with the refused agent"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_jailer_flag_needs_the_firecracker_backend() {
    let dir = common::temp_dir("jailer-flag");
    for backend in ["process", "qemu"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(["serve", "--listen", "127.0.0.1:0", "--backend", backend])
            .args(["--jailer", "--state-dir"])
            .arg(dir.join("state"))
            .output()
            .expect("run hearth");
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("--jailer") && err.contains("firecracker"),
            "{err}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn slow_handlers_fan_out_to_their_concurrency() {
    require_sandbox!();
    let s = Server::start(&["--cores", "1"]);
    let id = deploy(&s, "behave", "concurrency=4");
    assert_eq!(call(&s, "GET", &format!("/f/{id}/"), &[], b"").status, 200);
    let t = Instant::now();
    let mut clients: Vec<Client> = (0..4).map(|_| s.connect()).collect();
    for c in clients.iter_mut() {
        c.write(format!("GET /f/{id}/sleep?ms=3000 HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
    }
    for c in clients.iter_mut() {
        assert_eq!(c.response().status, 200);
    }
    // Serially this takes 12 s; waiting requests on an idle core scale out at
    // once, and three cold starts in parallel leave 3 s or more to spare even
    // on a loaded machine (with 1.5 s runs, 2.5 s was left for them).
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "4 requests of 3 s took {took:?}: they did not run in parallel"
    );
    let v = call(&s, "GET", &format!("/functions/{id}"), &[], b"").json();
    assert_eq!(v["instances"], 4, "{v}");
}

/// A request that queues behind a quick request is sent to the busy instance
/// ahead of time (the shim holds it, runs it next): still one invocation at
/// a time, each with its whole timeout from its own start, and one whose
/// instance dies before it starts runs on a new instance, not lost with it.
/// On both I/O drivers.
#[test]
fn requests_sent_ahead_run_one_at_a_time_and_survive_their_instance() {
    require_sandbox!();
    for io in ["uring", "epoll"] {
        let s = Server::start(&["--cores", "1", "--io", io]);
        let id = deploy(&s, "behave", "concurrency=1&timeout_ms=3000");
        let ahead = |s: &Server| {
            let v = call(s, "GET", &format!("/functions/{id}"), &[], b"").json();
            v["sent_ahead"].as_u64().unwrap()
        };
        assert_eq!(
            call(&s, "GET", &format!("/f/{id}/whoami"), &[], b"").status,
            200
        );
        // Eight clients, 25 quick requests each, on the one instance.
        let mut clients: Vec<Client> = (0..8).map(|_| s.connect()).collect();
        for _ in 0..25 {
            for c in clients.iter_mut() {
                c.write(format!("GET /f/{id}/overlap HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
            }
            for c in clients.iter_mut() {
                let r = c.response();
                assert_eq!(r.status, 200, "{io}: {}", r.text());
                let v = r.json();
                assert_eq!(v["maxActive"], 1, "{io}: one invocation at a time: {v}");
                let left = v["remaining"].as_u64().unwrap();
                assert!(
                    (2500..=3000).contains(&left),
                    "{io}: {left} ms left at the start"
                );
            }
        }
        assert!(ahead(&s) > 0, "{io}: nothing was sent ahead");
        // The instance exits 400 ms into a request; a quick one sent ahead
        // of it meanwhile runs on the next instance (its first call there).
        // Whether it goes ahead depends on the last request having been
        // quick (2 ms at most): on a loaded machine, try again.
        let mut went = false;
        for _ in 0..5 {
            for _ in 0..5 {
                assert_eq!(
                    call(&s, "GET", &format!("/f/{id}/whoami"), &[], b"").status,
                    200
                );
            }
            let mut dying = s.connect();
            dying.write(format!("GET /f/{id}/exit?ms=400 HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
            std::thread::sleep(Duration::from_millis(100));
            let before = ahead(&s);
            let mut next = s.connect();
            next.write(format!("GET /f/{id}/whoami HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
            std::thread::sleep(Duration::from_millis(100));
            went = ahead(&s) == before + 1;
            assert_eq!(dying.response().status, 502, "{io}");
            let r = next.response();
            assert_eq!(r.status, 200, "{io}: {}", r.text());
            assert_eq!(r.json()["calls"], 1, "{io}: it ran on a new instance");
            if went {
                break;
            }
        }
        assert!(
            went,
            "{io}: no request went ahead of a dying one in five tries"
        );
        s.assert_healthy();
    }
}

/// A Node.js function with concurrency 1 has its requests served by the core
/// holding its instance, and that instance's Node runs its main thread on the
/// next core's CPU, beside the worker feeding it, and V8's helper threads
/// (collecting in parallel) on the worker's; with `--instances-on-own-cpu` or
/// `--no-connection-moves`, or when it may have more instances, all on the
/// worker's own CPU, collecting on the main thread.
#[test]
fn a_node_instance_held_to_one_runs_beside_its_worker() {
    require_sandbox!();
    if std::thread::available_parallelism().map_or(1, |n| n.get()) < 2 {
        eprintln!("skipped: needs 2 CPUs (workers pinned to CPUs 0 and 1)");
        return;
    }
    for (flags, concurrency, beside) in [
        (&[][..], 1, true),
        // No standby: the instance is the deploy's, or a fresh spawn split
        // once its threads exist.
        (&["--no-standby"][..], 1, true),
        (&["--instances-on-own-cpu"][..], 1, false),
        (&["--no-connection-moves"][..], 1, false),
        (&[][..], 2, false),
    ] {
        let mut args = vec!["--cores", "2"];
        args.extend_from_slice(flags);
        let s = Server::start(&args);
        let id = deploy(&s, "behave", &format!("concurrency={concurrency}"));
        let answered = |s: &Server| -> Vec<u64> {
            let m = call(s, "GET", "/metrics", &[], b"").text();
            (0..2)
                .map(|c| {
                    let label = format!("core=\"{c}\",class=\"2xx\"");
                    common::metric_sum(&m, "hearth_responses_total", &label)
                })
                .collect()
        };
        let before = answered(&s);
        // One connection: with concurrency 1 it moves to the core holding the
        // instance (or, without moves, the instance comes to it); with 2 its
        // core starts one of its own.
        let mut c = s.connect();
        // The main thread's CPUs, the other threads', and whether V8 collects
        // on the main thread alone.
        let mut cpus = std::collections::BTreeSet::new();
        for _ in 0..12 {
            c.write(format!("GET /f/{id}/cpus HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
            let r = c.response();
            assert_eq!(r.status, 200, "{}", r.text());
            let j = r.json();
            cpus.insert((
                j["cpus"].as_str().unwrap().to_string(),
                j["helpers"].to_string(),
                j["singleThreadedGc"].as_bool().unwrap(),
            ));
        }
        let after = answered(&s);
        let served: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let what =
            format!("{flags:?}, concurrency {concurrency}: served {served:?}, cpus {cpus:?}");
        // The one before's own answer may count on either core.
        let core = if served[0] >= 12 { 0 } else { 1 };
        assert!(served[core] >= 12 && served[1 - core] <= 1, "{what}");
        // Beside: Node's main thread on the other CPU, V8's helpers (which
        // then collect: no --single-threaded-gc) on the worker's.
        let main = if beside { 1 - core } else { core };
        assert_eq!(
            cpus.into_iter().collect::<Vec<_>>(),
            [(main.to_string(), format!("[\"{core}\"]"), !beside)],
            "{what}"
        );
        // The collector's helpers get a quarter core of quota on top of the
        // main thread's one, and only then (standbys included: every Node
        // process of the function has it).
        let quota_us = if beside { 125_000 } else { 100_000 };
        let nodes: Vec<i32> = common::descendants(s.pid() as i32)
            .into_iter()
            .filter(|p| {
                fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "node")
            })
            .collect();
        assert!(!nodes.is_empty(), "{what}: no node process found");
        let mut read = 0;
        for p in nodes {
            if let Some((_, quota)) = common::cpu_cgroup(p) {
                let quota = quota.split(' ').next().unwrap_or_default().to_string();
                assert_eq!(quota, quota_us.to_string(), "{what}: node {p}");
                read += 1;
            }
        }
        if read == 0 {
            eprintln!("{what}: quota not checked (no cpu cgroup controller here)");
        }
    }
}

/// A Node.js instance of the process backend talks to hearth over a pair of
/// pipes (fd 3 in, fd 4 out; a socketpair before: twice the kernel's work per
/// message), and bodies of several MiB cross them whole both ways, on both
/// I/O drivers (io_uring reads and writes pipes with READ/WRITE, not
/// RECV/SEND; epoll registers the two ends apart).
#[test]
fn node_instances_talk_over_pipes_on_both_drivers() {
    require_sandbox!();
    for io in ["uring", "epoll"] {
        let s = Server::start(&["--io", io]);
        let id = deploy(&s, "behave", "");
        let r = call(&s, "GET", &format!("/f/{id}/fds"), &[], b"");
        assert_eq!(r.status, 200, "{io}: {}", r.text());
        assert_eq!(
            r.json(),
            serde_json::json!({"3": "pipe", "4": "pipe"}),
            "{io}"
        );
        // 4 MiB of every byte value: a binary body arrives base64-encoded and
        // the answer goes back the same way, ~5.6 MB on each pipe.
        let body: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        for _ in 0..3 {
            let r = call(
                &s,
                "POST",
                &format!("/f/{id}/echo"),
                &[("content-type", "application/octet-stream")],
                &body,
            );
            assert_eq!(r.status, 200, "{io}: {}", r.text());
            assert!(
                r.body == body,
                "{io}: the body came back changed ({} bytes)",
                r.body.len()
            );
        }
    }
}

/// `--worker-policy batch` runs the worker threads as SCHED_BATCH (woken by a
/// client's bytes, a worker does not preempt the instance running on its core)
/// and their instances still with the default policy, though the starts run on
/// threads a worker spawned (they inherited SCHED_BATCH before the starter
/// threads and the launcher reset it); `normal`, the hidden `--batch-workers`
/// (same as batch) and the adaptive default (the core idle) as they say.
#[test]
fn batch_workers_run_as_batch_and_their_instances_with_the_default_policy() {
    require_sandbox!();
    for (flags, workers) in [
        (
            &["--cores", "2", "--worker-policy", "batch"][..],
            libc::SCHED_BATCH,
        ),
        (&["--cores", "2", "--batch-workers"][..], libc::SCHED_BATCH),
        (
            &["--cores", "2", "--worker-policy", "normal"][..],
            libc::SCHED_OTHER,
        ),
        (&["--cores", "2"][..], libc::SCHED_OTHER),
    ] {
        let s = Server::start(flags);
        let id = deploy(&s, "behave", "");
        let r = call(&s, "GET", &format!("/f/{id}/policy"), &[], b"");
        assert_eq!(r.status, 200, "{flags:?}: {}", r.text());
        assert_eq!(r.json()["policy"], libc::SCHED_OTHER, "{flags:?}");
        let seen = worker_policies(s.pid());
        assert_eq!(seen.len(), 2, "{flags:?}: worker threads {seen:?}");
        assert!(seen.iter().all(|&p| p == workers), "{flags:?}: {seen:?}");
    }
}

/// Under the adaptive default, a worker whose core is crowded (its CPU
/// saturated, every request queued behind a handler that runs for a
/// millisecond) turns SCHED_BATCH after a couple of ticks, says so in
/// `hearth_worker_batch`, and turns back once the load stops; the instance
/// keeps the default policy throughout. On both drivers (the decision is the
/// worker's, driver-independent).
#[test]
fn a_crowded_core_runs_its_worker_as_batch_until_the_load_stops() {
    require_sandbox!();
    for io in ["uring", "epoll"] {
        crowded_core_turns_batch(io);
    }
}

fn crowded_core_turns_batch(io: &str) {
    let s = Server::start(&["--cores", "1", "--io", io]);
    let id = deploy(&s, "behave", "concurrency=1");
    assert_eq!(worker_policies(s.pid()), [libc::SCHED_OTHER]);
    let batch_gauge = || {
        let text = call(&s, "GET", "/metrics", &[], b"").text();
        text.lines()
            .find_map(|l| l.strip_prefix("hearth_worker_batch{core=\"0\"} "))
            .map(str::to_owned)
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (turned, gauge) = std::thread::scope(|scope| {
        for _ in 0..6 {
            let (s, id, stop) = (&s, &id, &stop);
            scope.spawn(move || {
                let mut c = s.connect();
                while !stop.load(Relaxed) {
                    let r = c.request("GET", &format!("/f/{id}/burn?ms=1"), &[], b"");
                    assert_eq!(r.status, 200, "{}", r.text());
                }
            });
        }
        let start = Instant::now();
        let mut turned = None;
        while turned.is_none() && start.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(50));
            if worker_policies(s.pid()) == [libc::SCHED_BATCH] {
                turned = Some(start.elapsed());
            }
        }
        let gauge = batch_gauge();
        let r = call(&s, "GET", &format!("/f/{id}/policy"), &[], b"");
        assert_eq!(r.json()["policy"], libc::SCHED_OTHER, "the instance");
        stop.store(true, Relaxed);
        (turned, gauge)
    });
    let turned =
        turned.unwrap_or_else(|| panic!("{io}: the worker never turned SCHED_BATCH under load"));
    eprintln!("{io}: turned batch after {turned:?}");
    assert_eq!(gauge.as_deref(), Some("1"));
    let start = Instant::now();
    while worker_policies(s.pid()) != [libc::SCHED_OTHER] {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{io}: still SCHED_BATCH 2 s after the load stopped"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(batch_gauge().as_deref(), Some("0"));
    s.assert_healthy();
}

/// The `/proc` directories of the worker (`hearth-w*`) threads of process `pid`.
fn worker_tasks(pid: u32) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.starts_with("hearth-w") {
            out.push(dir);
        }
    }
    out
}

/// The scheduling policy of each worker thread of process `pid`.
fn worker_policies(pid: u32) -> Vec<i32> {
    let mut out = Vec::new();
    for dir in worker_tasks(pid) {
        let stat = std::fs::read_to_string(dir.join("stat")).unwrap();
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        out.push(fields[41 - 3].parse().unwrap());
    }
    out
}

/// A worker yields its CPU rather than sleeping while an instance on its core
/// runs a request, but only while yielding lets something else run: with the
/// largest bound (`--spin-wait-us 10000`) and a handler that waits 50 ms on a
/// timer (nothing to run meanwhile), the worker still sleeps through the
/// waits. Were it to yield for the whole bound, it would use at least 10 ms of
/// CPU per request; it may use 2.5. Both I/O drivers.
#[test]
fn workers_sleep_while_a_handler_waits_on_a_timer() {
    require_sandbox!();
    for io in ["uring", "epoll"] {
        let s = Server::start(&["--io", io, "--cores", "1", "--spin-wait-us", "10000"]);
        let id = deploy(&s, "behave", "");
        let sleep = format!("/f/{id}/sleep?ms=50");
        assert_eq!(call(&s, "GET", &sleep, &[], b"").status, 200, "{io}");
        let before = workers_cpu_ns(s.pid());
        for _ in 0..10 {
            let r = call(&s, "GET", &sleep, &[], b"");
            assert_eq!(r.status, 200, "{io}: {}", r.text());
        }
        let used_ms = (workers_cpu_ns(s.pid()) - before) / 1_000_000;
        assert!(
            used_ms < 25,
            "{io}: the worker used {used_ms} ms of CPU for 10 requests"
        );
    }
}

/// CPU time of the worker threads of process `pid` so far, ns (schedstat).
fn workers_cpu_ns(pid: u32) -> u64 {
    let mut ns = 0;
    for dir in worker_tasks(pid) {
        let stat = std::fs::read_to_string(dir.join("schedstat")).unwrap();
        ns += stat.split(' ').next().unwrap().parse::<u64>().unwrap();
    }
    ns
}

/// A function limited to one instance on a two-core server, with keep-alive clients on
/// both cores: the connections accepted by the core without the instance move to the
/// one holding it, and the instance stays put. (Before, the instance was handed back
/// and forth between the cores every few milliseconds for as long as both had
/// clients: 20 and more hand-overs here; and before connections took the unwritten
/// rest of earlier answers along, those with one still to write could not move:
/// dozens.) Both I/O drivers move connections.
#[test]
fn connections_follow_a_single_instance_to_its_core() {
    connections_follow_a_single_instance(&["--io", "uring"]);
    connections_follow_a_single_instance(&["--io", "epoll"]);
}

fn connections_follow_a_single_instance(io: &[&str]) {
    require_sandbox!();
    const CONNS: usize = 16;
    const EACH: usize = 25;
    let s = Server::start(&[&["--cores", "2"], io].concat());
    let id = deploy(&s, "behave", "concurrency=1");
    let whoami = format!("GET /f/{id}/whoami HTTP/1.1\r\nHost: t\r\n\r\n");
    // 16 connections: the kernel spreads them over both cores' listeners (all on
    // one core: a chance of 2 in 65,536).
    // Half the clients pipeline each invocation behind a request the core
    // answers itself, so the connection has an answer still to write when
    // the invocation is read: it takes that answer along.
    let healthz = "GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n";
    let mut clients: Vec<Client> = (0..CONNS).map(|_| s.connect()).collect();
    std::thread::scope(|scope| {
        for (k, c) in clients.iter_mut().enumerate() {
            let whoami = &whoami;
            scope.spawn(move || {
                for _ in 0..EACH {
                    if k % 2 == 0 {
                        c.write(format!("{healthz}{whoami}").as_bytes());
                        let r = c.response();
                        assert_eq!((r.status, r.text()), (200, "ok".to_string()));
                    } else {
                        c.write(whoami.as_bytes());
                    }
                    let r = c.response();
                    assert_eq!(r.status, 200, "{}", r.text());
                    assert!(r.text().contains("calls"), "{}", r.text());
                }
            });
        }
    });
    let m = call(&s, "GET", "/metrics", &[], b"").text();
    let label = format!("function=\"{id}\"");
    let moved = common::metric_sum(&m, "hearth_function_connections_moved_total", &label);
    let handovers = common::metric_sum(&m, "hearth_function_instance_handovers_total", &label);
    eprintln!("{moved} connection moves, {handovers} hand-overs");
    assert!(moved >= 1, "no connection moved");
    // The first requests may queue on both cores before the instance is anybody's
    // (a hand-over or two, the queue behind going after it): a few of each.
    assert!(handovers <= 8, "{handovers} hand-overs");
    assert!(moved <= 2 * CONNS as u64, "{moved} connection moves");
    // Pipelined requests travel with a moving connection and are answered in order.
    let mut last = 0;
    for _ in 0..4 {
        let mut c = s.connect();
        c.write(whoami.repeat(3).as_bytes());
        for _ in 0..3 {
            let calls = c.response().json()["calls"].as_u64().unwrap();
            assert!(calls > last, "answers out of order: {calls} after {last}");
            last = calls;
        }
    }
    // One instance served everything, over the same (moved) connections.
    let c = &mut clients[0];
    c.write(whoami.as_bytes());
    let calls = c.response().json()["calls"].as_u64().unwrap();
    assert_eq!(calls as usize, CONNS * EACH + 13, "one instance served all");
    s.assert_healthy();
}

/// A request that would queue behind its core's busy instance while the other core's
/// instance is idle goes there with its connection (`sched::spill`). Here one instance
/// of a concurrency-2 function sleeps 8 s while quick requests arrive, one at a time,
/// each on a new connection (the kernel spreads them over both cores): those accepted
/// on the sleeping instance's core spill to the idle one. (Before, each such request
/// marked its core starved and the other core handed its idle instance over, at its
/// next tick; the next request accepted on the other core then called it back: a
/// hand-over for every change of core, about half the requests: 0 spilled, 13
/// hand-overs, the slowest 202 ms.)
#[test]
fn a_request_behind_a_busy_instance_spills_to_an_idle_one_on_the_other_core() {
    require_sandbox!();
    const QUICK: usize = 24;
    let s = Server::start(&["--cores", "2"]);
    let id = deploy(&s, "behave", "concurrency=2");
    let whoami = format!("GET /f/{id}/whoami HTTP/1.1\r\nHost: t\r\n\r\n");
    // Two instances, each warm (on a loaded machine the scheduler may wait
    // before starting the second: ask again until it is there).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        std::thread::scope(|scope| {
            for _ in 0..2 {
                scope.spawn(|| {
                    let r = call_anon(&s, "GET", &format!("/f/{id}/sleep?ms=300"), &[], b"");
                    assert_eq!(r.status, 200, "{}", r.text());
                });
            }
        });
        let v = call(&s, "GET", &format!("/functions/{id}"), &[], b"").json();
        if v["instances"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no second instance: {v}");
    }
    let label = format!("function=\"{id}\"");
    let counters = || {
        let m = call(&s, "GET", "/metrics", &[], b"").text();
        let get = |name| common::metric_sum(&m, name, &label);
        (
            get("hearth_function_requests_spilled_total"),
            get("hearth_function_instance_handovers_total"),
        )
    };
    let mut slow = s.connect();
    slow.stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    slow.write(format!("GET /f/{id}/sleep?ms=8000 HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
    std::thread::sleep(Duration::from_millis(200));
    let (spilled0, handovers0) = counters();
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    for _ in 0..QUICK {
        let t = Instant::now();
        let mut c = s.connect();
        c.write(whoami.as_bytes());
        let r = c.response();
        assert_eq!(r.status, 200, "{}", r.text());
        slowest = slowest.max(t.elapsed());
    }
    let (spilled, handovers) = counters();
    let (spilled, handovers) = (spilled - spilled0, handovers - handovers0);
    eprintln!(
        "{spilled} of {QUICK} quick requests spilled, {handovers} hand-overs, slowest {slowest:?}"
    );
    // Behind the slow one they would all be answered after its 8 s; 24 quick
    // requests take well under a second, and up to 6 s leaves room for a
    // loaded machine (with a 3 s slow one and a 2.5 s bound, only 0.5 s told
    // the two apart).
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "the quick ones waited for the slow one: {:?}",
        started.elapsed()
    );
    // All 24 on the other core: a chance of 2 in 16 million.
    assert!(spilled >= 1, "no request spilled");
    // The instances stay where they are: one moves if the warm-up left both on
    // one core, a few more on a loaded machine (a core's fit or saturation
    // changing under other tests; 3 seen in CI); before spilling, about every
    // second request cost one (13 here).
    assert!(handovers <= QUICK as u64 / 4, "{handovers} hand-overs");
    let r = slow.response();
    assert_eq!(r.status, 200, "{}", r.text());
    s.assert_healthy();
}

/// Connections move to a core only while it holds under ¾ of its connection limit
/// (counting those on their way), so it keeps room for its own accepts: with a limit
/// of 12 (room for 9) and 10 clients of a concurrency-1 function, no core ends up with
/// more than 9 connections unless the kernel gave it more itself. (Before, every one
/// of the 10 moved to the instance's core, checked against the limit itself on a count
/// that lagged behind the moves.)
#[test]
fn connections_move_only_while_the_target_core_has_room() {
    require_sandbox!();
    let s = Server::start(&["--cores", "2", "--connections-per-core-max", "12"]);
    let id = deploy(&s, "behave", "concurrency=1");
    assert_eq!(call(&s, "GET", &format!("/f/{id}/"), &[], b"").status, 200);
    // Metrics are read over one kept connection, so reading them adds none.
    let mut scraper = s.connect();
    let scrape_open = |c: &mut Client| -> [u64; 2] {
        c.write(format!("GET /metrics HTTP/1.1\r\nHost: t\r\n{}\r\n", s.auth_line()).as_bytes());
        let m = c.response().text();
        [0, 1].map(|k| common::metric_sum(&m, "hearth_open_connections", &format!("core=\"{k}\"")))
    };
    let mut clients: Vec<Client> = (0..10).map(|_| s.connect()).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    let accepted = loop {
        let open = scrape_open(&mut scraper);
        if open[0] + open[1] == 11 || Instant::now() > deadline {
            break open;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(accepted[0] + accepted[1], 11, "{accepted:?}");
    // Each request carries a body, charged to the input budget of the core
    // that read it; a moved connection takes its charge along.
    let req = format!("POST /f/{id}/ HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\n\r\nhello");
    for _ in 0..3 {
        for c in clients.iter_mut() {
            c.write(req.as_bytes());
        }
        for c in clients.iter_mut() {
            assert_eq!(c.response().status, 200);
        }
    }
    let open = scrape_open(&mut scraper);
    assert_eq!(open[0] + open[1], 11, "{open:?}");
    for k in 0..2 {
        assert!(
            open[k] <= accepted[k].max(9),
            "core {k} holds {} connections (accepted {}, room 9)",
            open[k],
            accepted[k]
        );
    }
    // Something moved, unless the kernel itself gave 9 or more of the 11 to one
    // core (67 runs in 1,024): then the instance's core may refuse moves for want
    // of room and the instance be handed over instead, and with all ten clients on
    // one core nothing needs to move. CI met a run with nothing moved (its counts
    // were not printed; now they are).
    let m = call(&s, "GET", "/metrics", &[], b"").text();
    let label = format!("function=\"{id}\"");
    let moved = common::metric_sum(&m, "hearth_function_connections_moved_total", &label);
    eprintln!("accepted {accepted:?}, open {open:?}, {moved} moved");
    assert!(
        moved >= 1 || accepted.iter().any(|&a| a >= 9),
        "no connection moved though both cores had room: accepted {accepted:?}"
    );
    // All answered: every charge was given back, on whichever core it moved to
    // (the gauge is refreshed each 100 ms tick).
    let held = || {
        let m = call(&s, "GET", "/metrics", &[], b"").text();
        common::metric_sum(&m, "hearth_in_held_bytes", "core=")
    };
    let deadline = Instant::now() + Duration::from_secs(3);
    while held() != 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(held(), 0, "input budget charges were not all returned");
}

#[test]
fn cpu_bound_handlers_scale_in_on_a_saturated_core_io_bound_ones_do_not() {
    require_sandbox!();
    let s = Server::start(&["--cores", "1"]);
    let cpu = deploy(&s, "behave", "concurrency=8");
    let io = deploy(&s, "behave", "concurrency=8");
    // Eight clients each: the CPU-bound ones start eight instances at once
    // (the core was idle), the sleepers need eight to overlap. The load runs
    // until the CPU-bound function is down to its fit (at most 8 s).
    let instances = |id: &str| {
        call(&s, "GET", &format!("/functions/{id}"), &[], b"").json()["instances"]
            .as_u64()
            .unwrap()
    };
    let stop = std::sync::atomic::AtomicBool::new(false);
    let served = std::sync::atomic::AtomicUsize::new(0);
    let (n_cpu, n_io, took) = std::thread::scope(|scope| {
        for n in 0..16 {
            let (id, path) = if n % 2 == 0 {
                (&cpu, "burn?ms=3")
            } else {
                (&io, "sleep?ms=50")
            };
            let (s, served, stop) = (&s, &served, &stop);
            scope.spawn(move || {
                let mut c = s.connect();
                while !stop.load(Relaxed) {
                    let r = c.request("GET", &format!("/f/{id}/{path}"), &[], b"");
                    assert_eq!(r.status, 200, "{}", r.text());
                    served.fetch_add(1, Relaxed);
                }
            });
        }
        let start = Instant::now();
        std::thread::sleep(Duration::from_secs(2));
        let mut counts = (instances(&cpu), instances(&io));
        while counts.0 > 2 && start.elapsed() < Duration::from_secs(8) {
            std::thread::sleep(Duration::from_millis(200));
            counts = (instances(&cpu), instances(&io));
        }
        stop.store(true, Relaxed);
        (counts.0, counts.1, start.elapsed())
    });
    // One busy core: a CPU-bound function needs one instance to fill it, the
    // rest were retired once idle; the sleepers keep theirs (each mostly waits).
    eprintln!(
        "served {}, after {took:?} instances: cpu-bound {n_cpu}, sleeping {n_io}",
        served.load(Relaxed)
    );
    assert!(
        n_cpu <= 2,
        "CPU-bound function kept {n_cpu} instances on one core"
    );
    assert!(
        n_io >= 6,
        "sleeping function has only {n_io} instances for 8 clients"
    );
    s.assert_healthy();
}

#[test]
fn raw_output_keeps_flowing_and_the_instance_lives() {
    require_sandbox!();
    // One core: every request goes to the same instance.
    let s = Server::start(&["--cores", "1"]);
    let id = deploy(&s, "behave", "");
    // Each /log also writes a line straight to fd 1 (the agent's pipe, then
    // its log socket): separate requests, separate reads on the host.
    for _ in 0..3 {
        assert_eq!(
            call(&s, "GET", &format!("/f/{id}/log"), &[], b"").status,
            200
        );
        std::thread::sleep(Duration::from_millis(150));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let logs = call(&s, "GET", &format!("/functions/{id}/logs"), &[], b"").json();
        let raw = logs["logs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| l["message"] == "raw write to fd 1")
            .count();
        if raw == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "{raw} raw lines: {logs}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Still the same instance: /whoami counts the calls it has served.
    let r = call(&s, "GET", &format!("/f/{id}/whoami"), &[], b"");
    assert_eq!(r.json()["calls"], 4, "{}", r.text());
}

#[test]
fn a_second_server_cannot_share_a_port() {
    let s = Server::start(&[]);
    let other = common::temp_dir("second-port");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args([
            "serve",
            "--listen",
            &s.addr.to_string(),
            "--state-dir",
            other.join("state").to_str().unwrap(),
        ])
        .env("HEARTH_NODE", "/usr/bin/true")
        .output()
        .expect("run hearth");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("already in use"), "{err}");
    s.assert_healthy();
}

/// The cpu cgroup directory holding the sandboxes of a process in `pid`'s
/// cgroup, with the file that holds a CPU weight there (`cpu.shares` on
/// cgroup v1, `cpu.weight` on v2) and its default value; `None` without a
/// cpu controller (or before any sandbox made the directory).
fn sandboxes_cpu_dir(pid: u32) -> Option<(std::path::PathBuf, &'static str, u64)> {
    let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let (base, file, default) = match own.lines().find_map(|l| {
        let mut f = l.splitn(3, ':');
        let (_, ctl, path) = (f.next()?, f.next()?, f.next()?);
        ctl.split(',').any(|c| c == "cpu").then(|| path.to_string())
    }) {
        Some(path) => (
            Path::new("/sys/fs/cgroup/cpu")
                .join(path.trim_start_matches('/'))
                .join("hearth"),
            "cpu.shares",
            1024,
        ),
        None => (
            Path::new("/sys/fs/cgroup/hearth").to_path_buf(),
            "cpu.weight",
            100,
        ),
    };
    base.join(file).exists().then_some((base, file, default))
}

/// The cpu cgroup directories of server `pid`'s sandboxes of function `id`,
/// oldest first, with the file that holds their CPU weight and its default
/// value (see [`sandboxes_cpu_dir`]); `None` without a cpu controller.
fn cpu_groups(pid: u32, id: &str) -> Option<(Vec<std::path::PathBuf>, &'static str, u64)> {
    let (base, file, default) = sandboxes_cpu_dir(pid)?;
    let prefix = format!("{id}-{pid}-");
    let mut dirs: Vec<(u64, std::path::PathBuf)> = std::fs::read_dir(&base)
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let n = name.strip_prefix(&prefix)?.parse().ok()?;
            e.path().join(file).exists().then(|| (n, e.path()))
        })
        .collect();
    dirs.sort();
    Some((dirs.into_iter().map(|(_, d)| d).collect(), file, default))
}

/// Every sandbox's cgroup sits in one `hearth` directory, scheduled as one
/// entity beside the server's worker threads. At the kernel's default weight
/// all instances on a core weighed less than their worker, and a busy one got
/// the CPU only when the worker slept (`cgroup::INSTANCES_CPU_WEIGHT_DEFAULT`);
/// the server gives it the host's CPUs x `--instances-cpu-weight` default
/// weights (whatever its own `--cores`).
#[test]
fn the_directory_holding_the_sandboxes_gets_the_instances_cpu_weight() {
    require_sandbox!();
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as u64;
    let s = Server::start(&["--cores", "1", "--instances-cpu-weight", "5"]);
    let read = || -> Option<(u64, u64, std::path::PathBuf)> {
        let (dir, file, default) = sandboxes_cpu_dir(s.pid())?;
        let w = std::fs::read_to_string(dir.join(file)).ok()?;
        Some((w.trim().parse().ok()?, default, dir))
    };
    // Each new sandbox writes the weight; other tests' servers share the
    // directory and write theirs, so a read may follow another's write:
    // another sandbox of this server writes it again.
    let mut seen = Vec::new();
    for n in 0..20 {
        deploy(&s, "behave", "");
        let Some((weight, default, dir)) = read() else {
            eprintln!("skipped: no cpu cgroup controller for the sandboxes");
            return;
        };
        if weight == (5 * cpus * default).min(if default == 1024 { 262_144 } else { 10_000 }) {
            s.assert_healthy();
            return;
        }
        seen.push(weight);
        assert!(n < 19, "{}: {seen:?}", dir.display());
    }
}

#[test]
fn standbys_initialise_at_a_background_cpu_weight_until_taken() {
    require_sandbox!();
    let s = Server::start(&["--cores", "1"]);
    let id = deploy(&s, "behave", "concurrency=2");
    // The first request takes the deploy's standby; a refill makes the next.
    assert_eq!(
        call_anon(&s, "GET", &format!("/f/{id}/"), &[], b"").status,
        200
    );
    let weight = |dir: &Path, file: &str| -> u64 {
        std::fs::read_to_string(dir.join(file))
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let (dirs, file, default) = loop {
        let Some(found) = cpu_groups(s.pid(), &id) else {
            eprintln!("skipped: no cpu cgroup controller for the sandboxes");
            return;
        };
        if found.0.len() >= 2 {
            break found;
        }
        assert!(Instant::now() < deadline, "no refill: {:?}", found.0);
        std::thread::sleep(Duration::from_millis(20));
    };
    let (serving, standby) = (&dirs[0], &dirs[1]);
    assert_eq!(weight(serving, file), default, "{}", serving.display());
    assert_eq!(weight(standby, file), default / 16, "{}", standby.display());
    // Two requests at once: the second scales out and takes the standby,
    // which serves at the default weight from then on.
    let mut clients: Vec<Client> = (0..2).map(|_| s.connect()).collect();
    for c in clients.iter_mut() {
        c.write(format!("GET /f/{id}/sleep?ms=500 HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes());
    }
    for c in clients.iter_mut() {
        assert_eq!(c.response().status, 200);
    }
    let v = call(&s, "GET", &format!("/functions/{id}"), &[], b"").json();
    assert_eq!(v["instances"], 2, "{v}");
    assert_eq!(weight(standby, file), default, "{}", standby.display());
    s.assert_healthy();
}
