//! Functions of the `provided` and `python3` runtimes on the QEMU backend, end to end: the
//! userland image (a glibc userland and Python 3 copied from the host), the guest agent as
//! PID 1 serving the Lambda Runtime API on the guest's loopback, the snapshot taken once the
//! runtime polls `/next`, clones restored from it, and a server restart that reuses the
//! snapshots. Real microVMs (software emulated here), the real `hearth` binary, a shell
//! `bootstrap` speaking the API with curl and hearth's Python bootstrap.
//!
//! Without qemu-system-x86_64, the guest kernel, Node.js (the Node image is built at start),
//! the static agent, mkfs.ext4, /usr/bin/python3 or /usr/bin/curl, the test prints why and
//! returns.

mod common;

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::qemu::{self, instance_vms, static_agent, wait_until, SLOW};
use common::{header_values, zip, Client, Response, Server};
use hearth::guest::ext4;

/// Why these tests cannot run here, if they cannot.
fn skip_reason() -> Option<String> {
    if let Some(why) = qemu::skip_reason() {
        return Some(why);
    }
    for p in ["/usr/bin/python3", "/usr/bin/curl"] {
        if !Path::new(p).is_file() {
            return Some(format!("{p} is missing (the userland image copies it)"));
        }
    }
    None
}

fn call(
    addr: SocketAddr,
    token: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut c = Client::connect(addr);
    c.stream.set_read_timeout(Some(SLOW)).unwrap();
    let auth = format!("Bearer {token}");
    let mut h = headers.to_vec();
    h.push(("authorization", &auth));
    c.request(method, path, &h, body)
}

/// AWS's custom-runtime tutorial bootstrap (sh, curl, grep, tr, cut, sed, mktemp), probing
/// the API's error statuses at init and echoing what it got into each response.
const SHELL_BOOTSTRAP: &str = r#"#!/bin/sh
set -eu
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
PROBE="$(code -X POST -d x "$API/invocation/nope/response"),$(code "$API/nowhere")"
echo "shell init handler=$_HANDLER probe=$PROBE"
while true; do
  HEADERS="$(mktemp)"
  EVENT=$(curl -sS -LD "$HEADERS" "$API/invocation/next")
  REQUEST_ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)
  PATH_SEEN=$(echo "$EVENT" | sed -n 's/.*"rawPath":"\([^"]*\)".*/\1/p')
  if [ "$PATH_SEEN" = /fail ]; then
    curl -s -o /dev/null -X POST -H 'Lambda-Runtime-Function-Error-Type: Shell.Failed' \
      -d '{"errorMessage":"asked to fail","errorType":"Shell.Failed"}' "$API/invocation/$REQUEST_ID/error"
  else
    RESPONSE="{\"statusCode\":201,\"headers\":{\"content-type\":\"text/plain\",\"x-probe\":\"$PROBE\",\"x-fn\":\"$AWS_LAMBDA_FUNCTION_NAME\",\"x-tmp\":\"$HEADERS\"},\"cookies\":[\"s=1\"],\"body\":\"path=$PATH_SEEN\"}"
    STATUS=$(code -X POST "$API/invocation/$REQUEST_ID/response" -d "$RESPONSE")
    echo "posted $STATUS"
  fi
  rm -f "$HEADERS"
done
"#;

/// A Python handler that counts its calls (a fresh clone starts at 1).
const PYTHON_APP: &str = r#"
import base64, json, os, sys
CALLS = 0
print("python init", sys.version_info[0])

def lambda_handler(event, context):
    global CALLS
    CALLS += 1
    path = event["rawPath"]
    if path == "/boom":
        raise ValueError("boom in a vm")
    if path == "/exit":
        os._exit(3)
    if path == "/bin":
        return {"statusCode": 200, "headers": {"content-type": "application/octet-stream"},
                "body": base64.b64encode(bytes(range(256))).decode(), "isBase64Encoded": True}
    return {
        "statusCode": 202,
        "headers": {"x-py": "1", "x-req": context.aws_request_id},
        "cookies": ["a=1; Path=/", "b=2"],
        "body": json.dumps({
            "calls": CALLS,
            "body": event.get("body"),
            "cookies": event.get("cookies"),
            "query": event.get("queryStringParameters"),
            "function": context.function_name,
            "api": os.environ.get("AWS_LAMBDA_RUNTIME_API"),
            "mine": os.environ.get("MY_VAR"),
            "cwd": os.getcwd(),
        }),
    }
"#;

#[test]
fn qemu_runs_provided_and_python3_functions_through_the_runtime_api() {
    skip_if!(skip_reason());
    let dir = common::temp_dir("qemu-rapi");
    let state = dir.join("state");
    let state_arg = state.display().to_string();
    let args = [
        "--backend",
        "qemu",
        "--cores",
        "1",
        "--state-dir",
        &state_arg,
    ];
    let s = Server::start_with_env(
        &args,
        &[("HEARTH_AGENT", &static_agent().display().to_string())],
    );
    let token = s.token.clone().unwrap_or_default();
    let req = |method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]| {
        call(s.addr, &token, method, path, headers, body)
    };
    let deploy = |code: &[u8], query: &str| {
        let t = Instant::now();
        let r = req(
            "POST",
            &format!("/deploy?{query}"),
            &[("content-type", "application/zip")],
            code,
        );
        assert_eq!(
            r.status,
            201,
            "deploy {query}: {}\n{}",
            r.text(),
            s.stderr()
        );
        let v = r.json();
        assert_eq!(
            (v["backend"].as_str(), v["snapshotReady"].as_bool()),
            (Some("qemu"), Some(true)),
            "{v}"
        );
        eprintln!("deployed {query} in {} ms", t.elapsed().as_millis());
        v["functionId"].as_str().unwrap().to_string()
    };

    // A runtime nothing here runs is still refused, before anything boots.
    let r = req(
        "POST",
        "/deploy?runtime=java21",
        &[("content-type", "application/zip")],
        &zip(&[("bootstrap", b"x", 0o755)]),
    );
    assert_eq!(r.status, 400, "{}", r.text());
    r.assert_json_error("bad_setting");
    assert!(r.text().contains("python3"), "{}", r.text());

    // provided: a shell bootstrap with curl.
    let shell = deploy(
        &zip(&[("bootstrap", SHELL_BOOTSTRAP.as_bytes(), 0o755)]),
        "runtime=provided.al2023&handler=function.handler",
    );
    let images: Vec<PathBuf> = fs::read_dir(state.join("cache/guest"))
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_string_lossy();
            n.starts_with("userland-") && n.ends_with(".ext4")
        })
        .collect();
    assert_eq!(images.len(), 1, "{images:?}");
    let image = &images[0];
    let on_disk = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(image).unwrap().blocks() * 512
    };
    eprintln!("userland image: {} MiB on disk", on_disk >> 20);
    assert!(on_disk < 512 << 20, "{on_disk} bytes");
    ext4::check(image).expect("the userland image passes e2fsck -fn");
    let python = fs::canonicalize("/usr/bin/python3").unwrap();
    let stdlib = Path::new("/usr/lib").join(python.file_name().unwrap());
    for p in [
        "/bin/sh".into(),
        "/usr/bin/curl".into(),
        "/usr/bin/python3".into(),
        python.display().to_string(),
        stdlib.join("os.py").display().to_string(),
        "/hearth/agent".into(),
        "/hearth/bootstrap.py".into(),
        "/etc/passwd".into(),
    ] {
        ext4::stat_in_image(image, &p).unwrap_or_else(|e| panic!("{p} in the image: {e}"));
    }
    for p in ["/var/task", "/tmp", "/proc", "/dev", "/sys"] {
        let (_, _, mode) = ext4::stat_in_image(image, p).unwrap();
        assert_eq!(mode & 0o7777, 0o755, "{p}");
    }
    assert!(ext4::stat_in_image(
        image,
        &stdlib.join("test/__init__.py").display().to_string()
    )
    .is_err());

    for round in 0..2 {
        let r = req("GET", &format!("/f/{shell}/hello/{round}"), &[], b"");
        assert_eq!(r.status, 201, "{}\n{}", r.text(), s.stderr());
        assert_eq!(r.text(), format!("path=/hello/{round}"));
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert_eq!(header_values(&r, "set-cookie"), ["s=1"]);
        // A wrong request id: 400; an unknown path: 404 (probed during init).
        assert_eq!(r.header("x-probe"), Some("400,404"));
        assert_eq!(r.header("x-fn"), Some(shell.as_str()));
        assert!(
            r.header("x-tmp").unwrap_or("").starts_with("/tmp/"),
            "{:?}",
            r.headers
        );
    }
    let r = req("GET", &format!("/f/{shell}/fail"), &[], b"");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["errorType"], "Shell.Failed", "{}", r.text());
    assert_eq!(r.json()["errorMessage"], "asked to fail");
    let logs = req("GET", &format!("/functions/{shell}/logs"), &[], b"").text();
    assert!(
        logs.contains("shell init handler=function.handler probe=400,404"),
        "{logs}"
    );

    // python3: hearth's bootstrap and a file.function handler.
    let py = deploy(
        &zip(&[("app.py", PYTHON_APP.as_bytes(), 0o644)]),
        "runtime=python3.12&handler=app.lambda_handler&env=%7B%22MY_VAR%22%3A%22mine%22%7D",
    );
    let r = req(
        "POST",
        &format!("/f/{py}/echo?x=1&x=2"),
        &[("content-type", "text/plain"), ("cookie", "c1=v1; c2=v2")],
        b"payload",
    );
    assert_eq!(r.status, 202, "{}\n{}", r.text(), s.stderr());
    assert_eq!(r.header("x-py"), Some("1"));
    assert_eq!(header_values(&r, "set-cookie"), ["a=1; Path=/", "b=2"]);
    let v = r.json();
    assert_eq!(v["calls"], 1, "{v}");
    assert_eq!(v["body"], "payload");
    assert_eq!(v["cookies"], serde_json::json!(["c1=v1", "c2=v2"]));
    assert_eq!(v["query"], serde_json::json!({"x": "1,2"}));
    assert_eq!(v["function"], py.as_str());
    assert_eq!(v["api"], "127.0.0.1:9001");
    assert_eq!(v["mine"], "mine");
    assert_eq!(v["cwd"], "/var/task");
    let r = req("GET", &format!("/f/{py}/bin"), &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, (0..=255u8).collect::<Vec<_>>());
    let r = req("GET", &format!("/f/{py}/boom"), &[], b"");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["errorType"], "ValueError");
    assert_eq!(r.json()["errorMessage"], "boom in a vm");
    let r = req("GET", &format!("/f/{py}/again"), &[], b"");
    assert_eq!(r.json()["calls"], 4, "the same warm VM: {}", r.text());

    // The runtime exits mid-invocation: Runtime.ExitError, the VM powers off,
    // and a fresh clone restored from the snapshot serves the next request,
    // initialised (its module loaded in the template) and with its own state.
    let r = req("GET", &format!("/f/{py}/exit"), &[], b"");
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("Runtime.ExitError"), "{}", r.text());
    let r = req("GET", &format!("/f/{py}/clone"), &[], b"");
    assert_eq!(r.status, 202, "{}\n{}", r.text(), s.stderr());
    assert_eq!(r.json()["calls"], 1, "a fresh clone: {}", r.text());
    let logs = req("GET", &format!("/functions/{py}/logs"), &[], b"").text();
    assert_eq!(
        logs.matches("python init 3").count(),
        1,
        "init ran once, in the template: {logs}"
    );

    // A restart: both functions come back from their snapshots, nothing rebuilt.
    drop(s);
    assert!(
        wait_until(Duration::from_secs(10), || instance_vms(&py).is_empty()),
        "VMs outlived their server"
    );
    let s2 = Server::start_with_env(
        &args,
        &[("HEARTH_AGENT", &static_agent().display().to_string())],
    );
    let token2 = s2.token.clone().unwrap_or_default();
    let r = call(
        s2.addr,
        &token2,
        "GET",
        &format!("/f/{shell}/back"),
        &[],
        b"",
    );
    assert_eq!(
        (r.status, r.text()),
        (201, "path=/back".to_string()),
        "{}",
        s2.stderr()
    );
    let r = call(s2.addr, &token2, "GET", &format!("/f/{py}/back"), &[], b"");
    assert_eq!(r.status, 202, "{}\n{}", r.text(), s2.stderr());
    assert!(!s2.stderr().contains("rebuilding"), "{}", s2.stderr());
    assert!(
        !s2.stderr().contains("built the microVM userland image"),
        "{}",
        s2.stderr()
    );
    drop(s2);
    let _ = fs::remove_dir_all(&dir);
}
