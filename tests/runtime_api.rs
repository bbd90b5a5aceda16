//! Functions of runtimes other than Node.js on the process backend, end to end: the guest
//! agent serves them the Lambda Runtime API on 127.0.0.1:9001 inside each sandbox. A shell
//! `bootstrap` speaking the API with curl (as AWS's custom-runtime tutorial), the `python3`
//! runtime (hearth's Python bootstrap) and, when it can be installed, the official Python
//! runtime interface client `awslambdaric`. Needs root and the static agent, like the other
//! sandbox tests; the shell and Python tests also need the host's /bin/sh, curl and
//! /usr/bin/python3, which the sandbox sees read-only.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{anon as call, deploy_ok, deploy_zip, header_values, zip, Server};

/// The function's log, once it contains `needle` (panics after a few seconds).
fn wait_log(s: &Server, id: &str, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let logs = s
            .control("GET", &format!("/functions/{id}/logs"), &[], b"")
            .text();
        if logs.contains(needle) {
            return logs;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} not in the log: {logs}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// AWS's custom-runtime tutorial bootstrap, extended: it probes the API's error statuses at
/// init and echoes what it got into each response's headers.
const SHELL_BOOTSTRAP: &str = r#"#!/bin/sh
set -eu
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
PROBE="$(code -X POST -d x "$API/invocation/nope/response"),$(code "$API/nowhere"),$(code -X POST "$API/invocation/next")"
echo "shell init handler=$_HANDLER probe=$PROBE"
while true; do
  HEADERS="$(mktemp)"
  EVENT=$(curl -sS -LD "$HEADERS" "$API/invocation/next")
  REQUEST_ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)
  ARN=$(grep -Fi Lambda-Runtime-Invoked-Function-Arn "$HEADERS" | tr -d '[:space:]' | cut -d: -f2-)
  DEADLINE=$(grep -Fi Lambda-Runtime-Deadline-Ms "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)
  PATH_SEEN=$(echo "$EVENT" | sed -n 's/.*"rawPath":"\([^"]*\)".*/\1/p')
  echo "handling $REQUEST_ID"
  RESPONSE="{\"statusCode\":201,\"headers\":{\"content-type\":\"text/plain\",\"x-probe\":\"$PROBE\",\"x-arn\":\"$ARN\",\"x-deadline\":\"$DEADLINE\",\"x-fn\":\"$AWS_LAMBDA_FUNCTION_NAME\",\"x-root\":\"$LAMBDA_TASK_ROOT\"},\"cookies\":[\"s=1\"],\"body\":\"path=$PATH_SEEN\"}"
  STATUS=$(code -X POST "$API/invocation/$REQUEST_ID/response" -d "$RESPONSE")
  AGAIN=$(code -X POST "$API/invocation/$REQUEST_ID/response" -d "{}")
  echo "posted $STATUS again $AGAIN"
  rm -f "$HEADERS"
done
"#;

#[test]
fn a_shell_bootstrap_with_curl_serves_function_url_requests() {
    require_sandbox!();
    if !Path::new("/usr/bin/curl").is_file() {
        eprintln!("skipped: the shell bootstrap needs /usr/bin/curl on the host");
        return;
    }
    let s = Server::start(&[]);
    let code = zip(&[("bootstrap", SHELL_BOOTSTRAP.as_bytes(), 0o755)]);
    let id = deploy_ok(
        &s,
        &code,
        "runtime=provided.al2023&handler=function.handler",
    );
    let info = s.control("GET", &format!("/functions/{id}"), &[], b"");
    assert_eq!(info.json()["runtime"], "provided", "{}", info.text());

    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    for round in 0..3 {
        let r = call(&s, "GET", &format!("/f/{id}/hello/{round}"), &[], b"");
        assert_eq!(r.status, 201, "{} / {}", r.text(), s.stderr());
        assert_eq!(r.text(), format!("path=/hello/{round}"));
        assert_eq!(r.header("content-type"), Some("text/plain"));
        assert_eq!(header_values(&r, "set-cookie"), ["s=1"]);
        // Wrong id: 400; unknown path: 404; /next with POST: 405.
        assert_eq!(r.header("x-probe"), Some("400,404,405"));
        assert_eq!(r.header("x-fn"), Some(id.as_str()));
        assert_eq!(r.header("x-root"), Some("/var/task"));
        let arn = r.header("x-arn").unwrap();
        assert!(
            arn.starts_with("arn:aws:lambda:us-east-1:")
                && arn.ends_with(&format!(":function:{id}")),
            "{arn}"
        );
        let deadline: u64 = r.header("x-deadline").unwrap().parse().unwrap();
        assert!(
            deadline > before && deadline < before + 120_000,
            "{deadline}"
        );
    }
    // The bootstrap's output reaches the function's log; a second answer for an
    // invocation is refused with 403.
    let logs = wait_log(&s, &id, "posted 202 again 403");
    assert!(
        logs.contains("shell init handler=function.handler"),
        "{logs}"
    );
    s.assert_healthy();
}

#[test]
fn a_provided_function_needs_an_executable_bootstrap_and_unknown_runtimes_are_refused() {
    require_sandbox!();
    let s = Server::start(&[]);
    let r = deploy_zip(
        &s,
        &zip(&[("bootstrap", b"#!/bin/sh\n", 0o644)]),
        "runtime=provided",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    assert!(r.text().contains("not executable"), "{}", r.text());
    let r = deploy_zip(&s, &zip(&[("other", b"x", 0o755)]), "runtime=provided");
    assert_eq!(r.status, 400, "{}", r.text());
    let r = deploy_zip(&s, &zip(&[("bootstrap", b"x", 0o755)]), "runtime=java21");
    assert_eq!(r.status, 400, "{}", r.text());
    r.assert_json_error("bad_setting");
    assert!(r.text().contains("python3"), "{}", r.text());
    // A bootstrap that exits during init: 422 with what it printed.
    let r = deploy_zip(
        &s,
        &zip(&[(
            "bootstrap",
            b"#!/bin/sh\necho dying at init\nexit 7\n",
            0o755,
        )]),
        "runtime=provided",
    );
    assert_eq!(r.status, 422, "{}", r.text());
    let text = r.text();
    assert!(
        text.contains("Runtime.ExitError") && text.contains("exit status 7"),
        "{text}"
    );
    assert!(text.contains("dying at init"), "{text}");
}

const PYTHON_APP: &str = r#"
import base64, json, os, sys, time
print("python init", sys.version_info[0])

def lambda_handler(event, context):
    path = event["rawPath"]
    if path == "/boom":
        raise ValueError("boom here")
    if path == "/sleep":
        time.sleep(30)
    if path == "/exit":
        os._exit(3)
    if path == "/bin":
        return {"statusCode": 200, "headers": {"content-type": "application/octet-stream"},
                "body": base64.b64encode(bytes(range(256))).decode(), "isBase64Encoded": True}
    if path == "/plain":
        return {"hello": "world"}
    print("handling", context.aws_request_id)
    return {
        "statusCode": 202,
        "headers": {"x-py": "1", "x-req": context.aws_request_id},
        "multiValueHeaders": {"x-multi": ["a", "b"]},
        "cookies": ["a=1; Path=/", "b=2"],
        "body": json.dumps({
            "method": event["requestContext"]["http"]["method"],
            "query": event.get("queryStringParameters"),
            "body": event.get("body"),
            "cookies": event.get("cookies"),
            "remaining_ok": 0 < context.get_remaining_time_in_millis() <= 2000,
            "function": context.function_name,
            "memory": context.memory_limit_in_mb,
            "arn": context.invoked_function_arn,
            "api": os.environ.get("AWS_LAMBDA_RUNTIME_API"),
            "handler": os.environ.get("_HANDLER"),
            "exec_env": os.environ.get("AWS_EXECUTION_ENV"),
            "mine": os.environ.get("MY_VAR"),
        }),
    }
"#;

#[test]
fn the_python3_runtime_runs_file_function_handlers() {
    require_sandbox!();
    if !Path::new("/usr/bin/python3").is_file() {
        eprintln!("skipped: the python3 runtime needs /usr/bin/python3 on the host");
        return;
    }
    let s = Server::start(&[]);
    let code = zip(&[("app.py", PYTHON_APP.as_bytes(), 0o644)]);
    let id = deploy_ok(
        &s,
        &code,
        "runtime=python3.12&handler=app.lambda_handler&timeout_ms=2000&memory_mb=256&env=%7B%22MY_VAR%22%3A%22mine%22%7D",
    );
    let base = format!("/f/{id}");

    let r = call(
        &s,
        "POST",
        &format!("{base}/echo?x=1&x=2&y=%41"),
        &[("content-type", "text/plain"), ("cookie", "c1=v1; c2=v2")],
        b"payload",
    );
    assert_eq!(r.status, 202, "{} / {}", r.text(), s.stderr());
    assert_eq!(r.header("x-py"), Some("1"));
    assert!(!r.header("x-req").unwrap_or("").is_empty());
    assert_eq!(header_values(&r, "x-multi"), ["a", "b"]);
    assert_eq!(header_values(&r, "set-cookie"), ["a=1; Path=/", "b=2"]);
    let v = r.json();
    assert_eq!(v["method"], "POST");
    assert_eq!(v["query"], serde_json::json!({"x": "1,2", "y": "A"}));
    assert_eq!(v["body"], "payload");
    assert_eq!(v["cookies"], serde_json::json!(["c1=v1", "c2=v2"]));
    assert_eq!(v["remaining_ok"], true, "{v}");
    assert_eq!(v["function"], id.as_str());
    assert_eq!(v["memory"], "256");
    assert!(v["arn"]
        .as_str()
        .unwrap()
        .ends_with(&format!(":function:{id}")));
    assert_eq!(v["api"], "127.0.0.1:9001");
    assert_eq!(v["handler"], "app.lambda_handler");
    assert_eq!(v["exec_env"], "AWS_Lambda_python3");
    assert_eq!(v["mine"], "mine");
    // What the handler printed is in the log, tagged with its request.
    let req = r.header("x-req").unwrap().to_string();
    wait_log(&s, &id, &format!("handling {req}"));
    let logs = s
        .control("GET", &format!("/functions/{id}/logs"), &[], b"")
        .json();
    let line = logs["logs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .unwrap_or("")
                .contains(&format!("handling {req}"))
        })
        .unwrap()
        .clone();
    assert_eq!(line["requestId"], req.as_str(), "{line}");

    // A binary body, base64-encoded by the handler, arrives as bytes.
    let r = call(&s, "GET", &format!("{base}/bin"), &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.body, (0..=255u8).collect::<Vec<_>>());
    // No statusCode: the JSON of the result.
    let r = call(&s, "GET", &format!("{base}/plain"), &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json(), serde_json::json!({"hello": "world"}));
    // A handler exception: 502 with its type and message, and the traceback in the log.
    let r = call(&s, "GET", &format!("{base}/boom"), &[], b"");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["errorType"], "ValueError");
    assert_eq!(r.json()["errorMessage"], "boom here");
    wait_log(&s, &id, "[ERROR] ValueError: boom here");
    wait_log(&s, &id, "python init 3");
    // The instance survives a handler error.
    assert_eq!(
        call(&s, "GET", &format!("{base}/again"), &[], b"").status,
        202
    );
    // The timeout: 504 at the deadline.
    let t = Instant::now();
    let r = call(&s, "GET", &format!("{base}/sleep"), &[], b"");
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    // The runtime exiting mid-invocation: 502, then a fresh instance serves.
    let r = call(&s, "GET", &format!("{base}/exit"), &[], b"");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(
        call(&s, "GET", &format!("{base}/after"), &[], b"").status,
        202
    );
    s.assert_healthy();
}

#[test]
fn python3_init_failures_fail_the_deploy() {
    require_sandbox!();
    if !Path::new("/usr/bin/python3").is_file() {
        eprintln!("skipped: the python3 runtime needs /usr/bin/python3 on the host");
        return;
    }
    let s = Server::start(&[]);
    for (files, handler, want) in [
        (
            &[(
                "app.py",
                &b"print('loading')\nraise RuntimeError('bad init')\n"[..],
                0o644,
            )][..],
            "app.handler",
            "RuntimeError",
        ),
        (
            &[("app.py", &b"def other(e, c):\n    return 1\n"[..], 0o644)][..],
            "app.handler",
            "Runtime.HandlerNotFound",
        ),
        (
            &[("app.py", &b"import no_such_module_here\n"[..], 0o644)][..],
            "app.handler",
            "Runtime.ImportModuleError",
        ),
        (
            &[("app.py", &b"def handler(:\n"[..], 0o644)][..],
            "app.handler",
            "Runtime.UserCodeSyntaxError",
        ),
    ] {
        let r = deploy_zip(
            &s,
            &zip(files),
            &format!("runtime=python3&handler={handler}"),
        );
        assert_eq!(r.status, 422, "{want}: {}", r.text());
        assert!(r.text().contains(want), "{want}: {}", r.text());
    }
    // A handler naming a missing file is refused before anything starts.
    let r = deploy_zip(
        &s,
        &zip(&[("app.py", b"", 0o644)]),
        "runtime=python3&handler=nope.handler",
    );
    assert_eq!(r.status, 400, "{}", r.text());
    r.assert_json_error("bad_handler");
    s.assert_healthy();
}

/// The official Python runtime interface client from PyPI, vendored into the zip with
/// `pip install --target`, started by the function's own `bootstrap`.
#[test]
fn the_official_python_runtime_client_runs_unchanged() {
    require_sandbox!();
    if !Path::new("/usr/bin/python3").is_file() {
        eprintln!("skipped: awslambdaric needs /usr/bin/python3 on the host");
        return;
    }
    let dir = common::temp_dir("awslambdaric");
    let pip = std::process::Command::new("/usr/bin/python3")
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--target",
        ])
        .arg(&dir)
        .arg("awslambdaric")
        .output();
    match pip {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            eprintln!(
                "skipped: pip install --target awslambdaric failed: {}",
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            return;
        }
        Err(e) => {
            eprintln!("skipped: cannot run /usr/bin/python3 -m pip: {e}");
            return;
        }
    }
    let bootstrap = dir.join("bootstrap");
    std::fs::write(
        &bootstrap,
        "#!/bin/sh\ncd \"$LAMBDA_TASK_ROOT\"\nexec /usr/bin/python3 -m awslambdaric \"$_HANDLER\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bootstrap, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        dir.join("app.py"),
        "import base64\n\
         def handler(event, context):\n\
         \x20   if event['rawPath'] == '/boom':\n\
         \x20       raise KeyError('missing')\n\
         \x20   return {'statusCode': 200, 'headers': {'x-ric': context.aws_request_id},\n\
         \x20           'cookies': ['r=1'], 'isBase64Encoded': True,\n\
         \x20           'body': base64.b64encode(b'\\x00ric' + event['rawPath'].encode()).decode()}\n",
    )
    .unwrap();
    let (code, _) = hearth::cli::zip_dir(&dir).unwrap();
    let s = Server::start(&[]);
    let id = deploy_ok(&s, &code, "runtime=provided.al2023&handler=app.handler");
    let r = call(&s, "GET", &format!("/f/{id}/x"), &[], b"");
    assert_eq!(r.status, 200, "{} / {}", r.text(), s.stderr());
    assert_eq!(r.body, b"\x00ric/x");
    assert!(!r.header("x-ric").unwrap_or("").is_empty());
    assert_eq!(header_values(&r, "set-cookie"), ["r=1"]);
    let r = call(&s, "GET", &format!("/f/{id}/boom"), &[], b"");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["errorType"], "KeyError", "{}", r.text());
    assert_eq!(call(&s, "GET", &format!("/f/{id}/y"), &[], b"").status, 200);
    s.assert_healthy();
}

/// A response over Lambda's 6 MiB limit: 413 to the runtime, the invocation fails, the
/// instance keeps serving.
#[test]
fn oversized_responses_are_refused_and_the_instance_stays_usable() {
    require_sandbox!();
    if !Path::new("/usr/bin/curl").is_file() || !Path::new("/usr/bin/head").is_file() {
        eprintln!("skipped: needs /usr/bin/curl and /usr/bin/head on the host");
        return;
    }
    let script = r#"#!/bin/sh
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
head -c 7000000 /dev/zero > /tmp/big
while true; do
  H="$(mktemp)"
  EVENT=$(curl -sS -D "$H" "$API/invocation/next")
  ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$H" | tr -d '[:space:]' | cut -d: -f2)
  case "$EVENT" in
    *'"rawPath":"/big"'*)
      STATUS=$(curl -s -o /tmp/answer -w '%{http_code}' -X POST --data-binary @/tmp/big "$API/invocation/$ID/response")
      echo "big answered $STATUS $(cat /tmp/answer)" ;;
    *)
      curl -sS -X POST -d '{"statusCode":200,"body":"small"}' "$API/invocation/$ID/response" >/dev/null ;;
  esac
done
"#;
    let s = Server::start(&[]);
    let id = deploy_ok(
        &s,
        &zip(&[("bootstrap", script.as_bytes(), 0o755)]),
        "runtime=provided",
    );
    let r = call(&s, "GET", &format!("/f/{id}/big"), &[], b"");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(
        r.json()["errorType"],
        "Function.ResponseSizeTooLarge",
        "{}",
        r.text()
    );
    wait_log(&s, &id, "big answered 413");
    let r = call(&s, "GET", &format!("/f/{id}/small"), &[], b"");
    assert_eq!((r.status, r.text()), (200, "small".to_string()));
}

/// A bootstrap speaking the API over raw sockets in the three ways a client may order its
/// requests, picked by the first segment of each event's path: `pipelined` (the response and the next `/next` in
/// one write on one connection), `late` (the next `/next` 300 ms after the 202, so the
/// agent must wait for it), `two` (the response and the next `/next` on a fresh
/// connection, the old one closed). Its first connection sends nothing for 1.5 s. Any
/// status other than 202 for a response ends it with status 3.
const SOCKET_BOOTSTRAP: &str = r#"#!/usr/bin/python3
import json, os, socket, sys, time
host, port = os.environ["AWS_LAMBDA_RUNTIME_API"].split(":")
BASE = "/2018-06-01/runtime/invocation/"
NEXT = ("GET " + BASE + "next HTTP/1.1\r\nHost: api\r\n\r\n").encode()

def connect():
    s = socket.create_connection((host, int(port)))
    return s, s.makefile("rb")

def answer(f):
    status = int(f.readline().split()[1])
    headers = {}
    while True:
        line = f.readline()
        if line in (b"\r\n", b""):
            break
        k, v = line.decode().split(":", 1)
        headers[k.strip().lower()] = v.strip()
    return status, headers, f.read(int(headers.get("content-length", "0")))

def post(rid, doc):
    body = json.dumps(doc).encode()
    head = "POST %s%s/response HTTP/1.1\r\nHost: api\r\nContent-Length: %d\r\n\r\n" % (BASE, rid, len(body))
    return head.encode() + body

def accepted(f):
    status, _, _ = answer(f)
    if status != 202:
        print("response got", status, flush=True)
        sys.exit(3)

# The first connection stays silent past the agent's deferred accept (1 s): it must
# still be taken and served.
sock, f = connect()
time.sleep(1.5)
sock.sendall(NEXT)
while True:
    _, headers, event = answer(f)
    rid = headers["lambda-runtime-aws-request-id"]
    path = json.loads(event)["rawPath"]
    mode = path.split("/")[1]
    doc = {"statusCode": 200, "body": path + " " + mode}
    if mode == "pipelined":
        sock.sendall(post(rid, doc) + NEXT)
        accepted(f)
    elif mode == "late":
        sock.sendall(post(rid, doc))
        accepted(f)
        time.sleep(0.3)
        sock.sendall(NEXT)
    else:
        new, nf = connect()
        new.sendall(post(rid, doc))
        accepted(nf)
        sock.close()
        sock, f = new, nf
        sock.sendall(NEXT)
"#;

#[test]
fn pipelined_late_and_second_connection_next_polls_are_all_served() {
    require_sandbox!();
    if !Path::new("/usr/bin/python3").is_file() {
        eprintln!("skipped: the socket bootstrap needs /usr/bin/python3 on the host");
        return;
    }
    let s = Server::start(&[]);
    let code = zip(&[("bootstrap", SOCKET_BOOTSTRAP.as_bytes(), 0o755)]);
    let id = deploy_ok(&s, &code, "runtime=provided.al2023&timeout_ms=3000");
    for (round, mode) in ["pipelined", "late", "two"]
        .iter()
        .cycle()
        .take(9)
        .enumerate()
    {
        let r = call(&s, "GET", &format!("/f/{id}/{mode}/{round}"), &[], b"");
        assert_eq!(r.status, 200, "{} / {}", r.text(), s.stderr());
        assert_eq!(r.text(), format!("/{mode}/{round} {mode}"));
    }
    s.assert_healthy();
}

/// A bootstrap that opens 80 Runtime API connections at init, each with half a
/// request head, counts how many the agent closed, lets the rest go, and then
/// serves invocations over one connection, answering with that count.
const HOARDING_BOOTSTRAP: &str = r#"#!/usr/bin/python3
import json, os, select, socket, time, urllib.request
api = os.environ["AWS_LAMBDA_RUNTIME_API"]
host, port = api.split(":")
hoard = []
for _ in range(80):
    s = socket.create_connection((host, int(port)))
    s.sendall(b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\n")
    hoard.append(s)
# The ones the agent closes turn readable (end of file or reset) at once.
closed = set()
end = time.monotonic() + 1.5
while time.monotonic() < end:
    ready, _, _ = select.select([s for s in hoard if s not in closed], [], [], 0.1)
    for s in ready:
        try:
            if s.recv(1) == b"":
                closed.add(s)
        except ConnectionResetError:
            closed.add(s)
closed = len(closed)
for s in hoard:
    s.close()
base = "http://" + api + "/2018-06-01/runtime/invocation/"
while True:
    with urllib.request.urlopen(base + "next") as r:
        rid = r.headers["Lambda-Runtime-Aws-Request-Id"]
        r.read()
    body = json.dumps({"statusCode": 200, "body": str(closed)}).encode()
    urllib.request.urlopen(urllib.request.Request(base + rid + "/response", data=body, method="POST")).read()
"#;

/// The agent holds at most `CONNS_MAX` (64) Runtime API connections: the ones
/// over it are closed at once, and the runtime is served afterwards.
#[test]
fn runtime_api_connections_over_the_limit_are_closed() {
    require_sandbox!();
    let s = Server::start(&[]);
    let id = deploy_ok(
        &s,
        &zip(&[("bootstrap", HOARDING_BOOTSTRAP.as_bytes(), 0o755)]),
        "runtime=provided&timeout_ms=10000",
    );
    let r = call(&s, "GET", &format!("/f/{id}/"), &[], b"");
    assert_eq!(r.status, 200, "{} / {}", r.text(), s.stderr());
    assert_eq!(r.text(), "16", "80 connections, 64 kept");
    s.assert_healthy();
}

/// A runtime that, after answering its first invocation, writes without reading:
/// first into a parked `/next` (nothing more is expected on it), then requests
/// pipelined behind each other whose answers it never reads; it logs "floods
/// done" after them, and its next invocation's answer says how each ended (how
/// much it could send: the kernel's socket buffers take several MiB of it).
const FLOODING_BOOTSTRAP: &str = r#"#!/usr/bin/python3
import os, socket
host, port = os.environ["AWS_LAMBDA_RUNTIME_API"].split(":")
PATH = "/2018-06-01/runtime/invocation/"

def connect():
    s = socket.create_connection((host, int(port)))
    s.settimeout(3)
    return s

def answer(s):
    # One answer: its head, then Content-Length bytes of body.
    data = b""
    while b"\r\n\r\n" not in data:
        data += s.recv(65536)
    head, rest = data.split(b"\r\n\r\n", 1)
    fields = dict(l.split(b": ", 1) for l in head.split(b"\r\n")[1:])
    n = int(fields[b"Content-Length"])
    while len(rest) < n:
        rest += s.recv(65536)
    return fields, rest

def next_event(s):
    s.settimeout(None)
    s.sendall(("GET " + PATH + "next HTTP/1.1\r\nHost: x\r\n\r\n").encode())
    fields, body = answer(s)
    if b"Lambda-Runtime-Aws-Request-Id" not in fields:
        raise SystemExit("no event: %r %r" % (fields, body))
    rid = fields[b"Lambda-Runtime-Aws-Request-Id"].decode()
    s.settimeout(3)
    return rid

def respond(rid, text):
    s = connect()
    body = ('{"statusCode":200,"body":"%s"}' % text).encode()
    s.sendall(("POST %s%s/response HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
               % (PATH, rid, len(body))).encode() + body)
    answer(s)
    s.close()

def flood(s, piece, limit):
    sent = 0
    try:
        while sent < limit:
            s.sendall(piece)
            sent += len(piece)
        return "all %d" % sent
    except socket.timeout:
        return "held %d" % sent
    except OSError:
        return "refused %d" % sent

a = connect()
respond(next_event(a), "first")
a.sendall(("GET " + PATH + "next HTTP/1.1\r\nHost: x\r\n\r\n").encode())
parked = flood(a, b"\0" * 65536, 256 << 20)
b = connect()
pipelined = flood(b, b"GET /nowhere HTTP/1.1\r\nHost: x\r\n\r\n" * 2000, 32 << 20)
print("floods done", flush=True)
while True:
    respond(next_event(connect()), parked + " / " + pipelined)
"#;

/// hearth serves the Runtime API in its own process, so a runtime that writes
/// without reading must not grow hearth's memory: a parked `/next` takes
/// little before a 413 closes it, and pipelined requests are read only as fast
/// as their answers are (the runtime's writes then block).
#[test]
fn a_runtime_that_writes_without_reading_holds_little_of_hearths_memory() {
    require_sandbox!();
    let s = Server::start(&[]);
    let id = deploy_ok(
        &s,
        &zip(&[("bootstrap", FLOODING_BOOTSTRAP.as_bytes(), 0o755)]),
        "runtime=provided&timeout_ms=30000",
    );
    let r = call(&s, "GET", &format!("/f/{id}/"), &[], b"");
    let logs = || {
        s.control("GET", &format!("/functions/{id}/logs"), &[], b"")
            .text()
    };
    assert_eq!((r.status, r.text()), (200, "first".into()), "{}", logs());
    let before = common::rss_kib(s.pid());
    let pid = s.pid();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(common::rss_kib(pid), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    // An invocation sent now would go to the parked /next being flooded.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !logs().contains("floods done") {
        assert!(
            Instant::now() < deadline,
            "the floods did not end: {}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    let r = call(&s, "GET", &format!("/f/{id}/"), &[], b"");
    let grew_mib = peak
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(before)
        >> 10;
    let text = r.text();
    assert_eq!(r.status, 200, "{text} / {}", logs());
    let (parked, pipelined) = text.split_once(" / ").expect("two outcomes");
    let sent = |outcome: &str| outcome.rsplit(' ').next().unwrap().parse::<u64>().unwrap();
    assert!(
        parked.starts_with("refused") && sent(parked) < 64 << 20,
        "{text}"
    );
    assert!(pipelined.starts_with("held"), "{text}");
    assert!(grew_mib < 48, "hearth grew by {grew_mib} MiB ({text})");
    s.assert_healthy();
}

/// Command lines of every process below `root` (its descendants, by parent pid).
fn descendants(root: u32) -> Vec<(u32, u32, String)> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The parent pid is the second field after the command's closing parenthesis.
        let Some(ppid) = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        all.push((pid, ppid, cmd));
    }
    let mut mine = vec![root];
    let mut out = Vec::new();
    while let Some(p) = mine.pop() {
        for (pid, ppid, cmd) in &all {
            if *ppid == p {
                mine.push(*pid);
                out.push((*pid, *ppid, cmd.clone()));
            }
        }
    }
    out
}

/// On the process backend hearth's cores serve the Runtime API: the sandbox holds the
/// agent (PID 1) and the bootstrap as its child, and no `--runtime-api` relay process.
/// With `--runtime-api-relay` the relay is there (so the check can see one).
#[test]
fn the_runtime_api_is_served_by_hearth_without_a_relay_process() {
    require_sandbox!();
    for relay in [false, true] {
        let s = Server::start(if relay { &["--runtime-api-relay"] } else { &[] });
        let id = deploy_ok(
            &s,
            &zip(&[("bootstrap", SHELL_BOOTSTRAP.as_bytes(), 0o755)]),
            "runtime=provided.al2023&timeout_ms=5000",
        );
        let r = call(&s, "GET", &format!("/f/{id}/x"), &[], b"");
        assert_eq!(r.status, 201, "{} / {}", r.text(), s.stderr());
        let procs = descendants(s.pid());
        let relays: Vec<_> = procs
            .iter()
            .filter(|(_, _, c)| c.contains("--runtime-api"))
            .collect();
        let bootstrap = procs
            .iter()
            .find(|(_, _, c)| c.contains("/var/task/bootstrap"))
            .unwrap_or_else(|| panic!("no bootstrap in {procs:#?}"));
        let parent = procs.iter().find(|(p, _, _)| *p == bootstrap.1).unwrap();
        if relay {
            // One per sandbox: the instance's and its standby's.
            assert!(!relays.is_empty(), "{procs:#?}");
            assert!(parent.2.contains("--runtime-api"), "{procs:#?}");
        } else {
            assert!(relays.is_empty(), "a relay process: {procs:#?}");
            assert!(
                parent.2.contains("--host-serves-api"),
                "the bootstrap's parent is the agent: {procs:#?}"
            );
        }
        s.assert_healthy();
    }
}

/// A function limited to one instance on a two-core server: clients on both cores keep
/// the instance moving between them (hand-over), with its Runtime API connections,
/// parked `/next` and session, and every request is answered by the same runtime.
/// (`--no-connection-moves`: otherwise the clients' connections move to the
/// instance's core instead, and hand-overs become rare.)
#[test]
fn an_instance_moves_between_cores_with_its_runtime_api() {
    require_sandbox!();
    if !Path::new("/usr/bin/python3").is_file() {
        eprintln!("skipped: the python3 runtime needs /usr/bin/python3 on the host");
        return;
    }
    let s = Server::start(&["--cores", "2", "--no-connection-moves"]);
    let app = "import os\ndef handler(event, context):\n    return {'statusCode': 200, 'body': str(os.getpid())}\n";
    let id = deploy_ok(
        &s,
        &zip(&[("app.py", app.as_bytes(), 0o644)]),
        "runtime=python3&handler=app.handler&concurrency=1&timeout_ms=5000",
    );
    let pids: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..6)
            .map(|t| {
                let (s, id) = (&s, &id);
                scope.spawn(move || {
                    (0..25)
                        .map(|k| {
                            let r = call(s, "GET", &format!("/f/{id}/{t}/{k}"), &[], b"");
                            assert_eq!(r.status, 200, "{} / {}", r.text(), s.stderr());
                            r.text()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let joined: Vec<_> = workers.into_iter().map(|w| w.join()).collect();
        if joined.iter().any(Result::is_err) {
            let logs = s.control("GET", &format!("/functions/{id}/logs"), &[], b"");
            panic!(
                "a client failed; stderr:\n{}\nlogs: {}",
                s.stderr(),
                logs.text()
            );
        }
        joined.into_iter().flat_map(Result::unwrap).collect()
    });
    assert_eq!(pids.len(), 150);
    assert!(pids.iter().all(|p| *p == pids[0]), "one runtime: {pids:?}");
    let metrics = s.control("GET", "/metrics", &[], b"").text();
    let handovers: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("hearth_function_instance_handovers_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(handovers > 0, "no hand-over happened:\n{metrics}");
    s.assert_healthy();
}
