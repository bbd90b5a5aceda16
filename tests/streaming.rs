//! Response streaming end to end, against the real server on the process
//! backend with real Node: `awslambda.streamifyResponse` handlers reach a
//! raw-socket function URL client chunk by chunk (`Transfer-Encoding:
//! chunked`, the first bytes long before the handler returns), a slow reader
//! slows the handler down instead of filling the server's memory, a client
//! that leaves mid-stream leaves a usable instance, a handler that fails
//! mid-stream cuts the answer off; boto3's `invoke_with_response_stream`
//! reads the AWS event stream.
//!
//! Needs root and the static agent (the process backend); the boto3 test
//! also needs boto3. Without them each test prints why and returns.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::{deploy_fixture, deploy_ok, zip, Server};

/// Deploys the `streaming` fixture (named `name`) and returns its id.
fn deploy_streaming(s: &Server, name: &str) -> String {
    deploy_fixture(s, "streaming", &format!("name={name}&concurrency=2"))
}

/// A raw HTTP/1.1 client reading a chunked answer piece by piece.
struct Chunked {
    sock: TcpStream,
    buf: Vec<u8>,
}

impl Chunked {
    /// Sends `GET path` and reads the head: its status and head text.
    fn get(s: &Server, path: &str) -> (Chunked, u16, String) {
        let mut sock = TcpStream::connect(s.addr).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        write!(sock, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let mut c = Chunked {
            sock,
            buf: Vec::new(),
        };
        let head = c.until(b"\r\n\r\n").expect("a head");
        let head = String::from_utf8(head).unwrap();
        let status = head[9..12].parse().unwrap();
        (c, status, head.to_ascii_lowercase())
    }

    /// Reads up to and including `delim`; `None` at end of file first.
    fn until(&mut self, delim: &[u8]) -> Option<Vec<u8>> {
        loop {
            if let Some(i) = self.buf.windows(delim.len()).position(|w| w == delim) {
                return Some(self.buf.drain(..i + delim.len()).collect());
            }
            let mut tmp = [0u8; 16384];
            match self.sock.read(&mut tmp) {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
    }

    /// The next chunk's bytes; `Ok(None)` after the last chunk, `Err` when
    /// the connection ended before the body did (a cut-off stream).
    fn chunk(&mut self) -> Result<Option<Vec<u8>>, String> {
        let line = self.until(b"\r\n").ok_or("closed before a chunk size")?;
        let text = String::from_utf8_lossy(&line[..line.len() - 2]).to_string();
        let size = usize::from_str_radix(text.trim(), 16).map_err(|e| format!("{text:?}: {e}"))?;
        while self.buf.len() < size + 2 {
            let mut tmp = vec![0u8; 1 << 16];
            match self.sock.read(&mut tmp) {
                Ok(0) | Err(_) => return Err("closed inside a chunk".into()),
                Ok(n) => self.buf.extend_from_slice(&tmp[..n]),
            }
        }
        let data: Vec<u8> = self.buf.drain(..size).collect();
        assert_eq!(self.buf.drain(..2).collect::<Vec<u8>>(), b"\r\n");
        Ok((size > 0).then_some(data))
    }
}

#[test]
fn chunks_reach_a_raw_socket_client_as_the_handler_writes_them() {
    require_sandbox!();
    let s = Server::start(&[]);
    deploy_streaming(&s, "streamer");
    let t0 = Instant::now();
    let (mut c, status, head) = Chunked::get(&s, "/f/streamer/chunks");
    assert_eq!(status, 201, "{head}");
    assert!(head.contains("transfer-encoding: chunked"), "{head}");
    assert!(!head.contains("content-length"), "{head}");
    assert!(head.contains("x-stream: yes"), "{head}");
    assert!(head.contains("set-cookie: flavour=oat; path=/"), "{head}");
    let mut arrivals = Vec::new();
    let mut text = String::new();
    while let Some(data) = c.chunk().expect("a complete body") {
        arrivals.push(t0.elapsed());
        text.push_str(&String::from_utf8_lossy(&data));
    }
    assert_eq!(text, "chunk 0\nchunk 1\nchunk 2\nchunk 3\nchunk 4\n");
    assert_eq!(arrivals.len(), 5, "one HTTP chunk per write: {arrivals:?}");
    let spread = arrivals[4] - arrivals[0];
    assert!(
        spread >= Duration::from_millis(600),
        "chunks arrived together: {arrivals:?}"
    );
    // The handler writes 500 ms apart (2 s from the first write to the
    // last): the first chunk may come up to 1.4 s late on a loaded machine.
    assert!(arrivals[0] + Duration::from_millis(600) <= arrivals[4]);

    // The connection is kept and serves the next request.
    write!(c.sock, "GET /f/streamer/hello HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let head = String::from_utf8(c.until(b"\r\n\r\n").expect("second head")).unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: text/plain"),
        "{head}"
    );
    let mut body = Vec::new();
    while let Some(data) = c.chunk().expect("second body") {
        body.extend(data);
    }
    assert!(String::from_utf8_lossy(&body).ends_with("bye\n"));
    s.assert_healthy();
}

/// Bytes of answers queued on the server's connections (the
/// `hearth_out_queued_bytes` gauge, summed over cores).
fn out_queued(s: &Server) -> u64 {
    let r = s.control("GET", "/metrics", &[], b"");
    r.text()
        .lines()
        .filter(|l| l.starts_with("hearth_out_queued_bytes"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

#[test]
fn a_slow_reader_slows_the_handler_instead_of_filling_memory() {
    require_sandbox!();
    let s = Server::start(&[]);
    deploy_streaming(&s, "bulk");
    let (mut c, status, _) = Chunked::get(&s, "/f/bulk/big");
    assert_eq!(status, 200);
    // Read nothing for 2 s: the kernel's buffers fill, then the server's.
    std::thread::sleep(Duration::from_secs(2));
    let queued = out_queued(&s);
    assert!(
        queued < 2 << 20,
        "{queued} bytes queued for a client that reads nothing"
    );
    let resumed_ms = hearth::util::time::unix_time_ms();
    let mut body = Vec::new();
    while let Some(data) = c.chunk().expect("a complete body") {
        body.extend(data);
    }
    assert_eq!(body.iter().filter(|&&b| b == b'x').count(), 16 << 20);
    let tail = String::from_utf8_lossy(&body[body.len() - 40..]).to_string();
    let done_ms: u64 = tail
        .trim()
        .rsplit(' ')
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no end time in {tail:?}"));
    assert!(
        done_ms >= resumed_ms,
        "the handler finished at {done_ms}, before the client read (from {resumed_ms})"
    );
}

#[test]
fn a_client_leaving_mid_stream_leaves_a_usable_instance() {
    require_sandbox!();
    let s = Server::start(&[]);
    deploy_streaming(&s, "leaver");
    for _ in 0..2 {
        let (mut c, status, _) = Chunked::get(&s, "/f/leaver/chunks");
        assert_eq!(status, 201);
        assert_eq!(c.chunk().unwrap().unwrap(), b"chunk 0\n");
        drop(c);
    }
    // The instances finish their streams into the void and serve again.
    let (mut c, status, _) = Chunked::get(&s, "/f/leaver/chunks");
    assert_eq!(status, 201);
    let mut n = 0;
    while c.chunk().expect("complete").is_some() {
        n += 1;
    }
    assert_eq!(n, 5);
    s.assert_healthy();
}

#[test]
fn a_handler_failing_mid_stream_cuts_the_answer_off() {
    require_sandbox!();
    let s = Server::start(&[]);
    deploy_streaming(&s, "breaker");
    let (mut c, status, _) = Chunked::get(&s, "/f/breaker/fail");
    assert_eq!(status, 200);
    assert_eq!(c.chunk().unwrap().unwrap(), b"partial 1\n");
    assert_eq!(c.chunk().unwrap().unwrap(), b"partial 2\n");
    let end = c.chunk();
    assert!(end.is_err(), "the body must not end cleanly: {end:?}");
    // The error is in the function's log, and the function serves on.
    let (mut c, status, _) = Chunked::get(&s, "/f/breaker/hello");
    assert_eq!(status, 200);
    while c.chunk().expect("complete").is_some() {}
    s.assert_healthy();
}

/// Why boto3 cannot run here, if it cannot.
fn boto3_missing() -> Option<String> {
    let ok = Command::new("python3")
        .args(["-c", "import boto3"])
        .output()
        .is_ok_and(|o| o.status.success());
    (!ok).then(|| "boto3 is missing (pip install boto3)".to_string())
}

#[test]
fn boto3_reads_invoke_with_response_stream() {
    require_sandbox!();
    skip_if!(boto3_missing());
    let s = Server::start(&[]);
    deploy_streaming(&s, "evstream");
    let plain_zip = zip(&[(
        "index.js",
        b"exports.handler = async (event) => ({ got: event });",
        0o644,
    )]);
    deploy_ok(&s, &plain_zip, "name=plainfn&handler=index.handler");
    let script = format!(
        r#"
import boto3, json, time
from botocore.config import Config
client = boto3.client('lambda', endpoint_url='http://{addr}', region_name='us-east-1',
    aws_access_key_id='hearth', aws_secret_access_key={secret:?},
    config=Config(retries={{'max_attempts': 1}}))
out = {{}}
for mode in ['chunks', 'fail']:
    t0 = time.monotonic()
    r = client.invoke_with_response_stream(FunctionName='evstream',
        Payload=json.dumps({{'mode': mode}}).encode(), LogType='Tail')
    events = []
    for ev in r['EventStream']:
        if 'PayloadChunk' in ev:
            events.append(['chunk', ev['PayloadChunk']['Payload'].decode(), time.monotonic() - t0])
        if 'InvokeComplete' in ev:
            events.append(['complete', ev['InvokeComplete'], time.monotonic() - t0])
    out[mode] = {{'status': r['StatusCode'], 'version': r.get('ExecutedVersion'),
                 'type': r.get('ResponseStreamContentType'), 'events': events}}
r = client.invoke(FunctionName='evstream', Payload=json.dumps({{'mode': 'chunks'}}).encode())
out['collected'] = {{'payload': r['Payload'].read().decode(), 'error': r.get('FunctionError')}}
r = client.invoke_with_response_stream(FunctionName='plainfn', Payload=b'{{"x": 1}}')
out['plain'] = [list(ev.keys())[0] for ev in r['EventStream']]
out['plain_payload'] = ''
for ev in client.invoke_with_response_stream(FunctionName='plainfn', Payload=b'{{"x": 1}}')['EventStream']:
    if 'PayloadChunk' in ev:
        out['plain_payload'] += ev['PayloadChunk']['Payload'].decode()
print(json.dumps(out))
"#,
        addr = s.addr,
        secret = s.token.as_deref().unwrap(),
    );
    let out = Command::new("python3")
        .args(["-c", &script])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.stderr()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let chunks = &v["chunks"];
    assert_eq!(chunks["status"], 200, "{v}");
    assert_eq!(chunks["version"], "$LATEST");
    assert_eq!(chunks["type"], "application/vnd.amazon.eventstream");
    let events = chunks["events"].as_array().unwrap();
    let texts: Vec<&str> = events
        .iter()
        .filter(|e| e[0] == "chunk")
        .map(|e| e[1].as_str().unwrap())
        .collect();
    assert_eq!(
        texts,
        [
            "chunk 0\n",
            "chunk 1\n",
            "chunk 2\n",
            "chunk 3\n",
            "chunk 4\n"
        ]
    );
    let first = events[0][2].as_f64().unwrap();
    let fifth = events[4][2].as_f64().unwrap();
    assert!(fifth - first >= 0.6, "events came together: {events:?}");
    let complete = &events.last().unwrap();
    assert_eq!(complete[0], "complete");
    assert!(complete[1].get("ErrorCode").is_none(), "{complete}");
    assert!(complete[1]["LogResult"].is_string(), "{complete}");

    // A plain Invoke of a streaming handler gets the stream collected.
    assert_eq!(
        v["collected"]["payload"],
        "chunk 0\nchunk 1\nchunk 2\nchunk 3\nchunk 4\n"
    );
    assert!(v["collected"]["error"].is_null(), "{v}");
    // A handler that does not stream: one PayloadChunk, then InvokeComplete.
    assert_eq!(
        v["plain"],
        serde_json::json!(["PayloadChunk", "InvokeComplete"])
    );
    let plain: serde_json::Value =
        serde_json::from_str(v["plain_payload"].as_str().unwrap()).expect("the result's JSON");
    assert_eq!(plain["got"]["x"], 1, "{plain}");

    let failed = v["fail"]["events"].as_array().unwrap();
    assert_eq!(failed[0][1], "partial 1\n");
    let complete = &failed.last().unwrap()[1];
    assert_eq!(complete["ErrorCode"], "Error", "{complete}");
    assert_eq!(complete["ErrorDetails"], "broke mid-stream", "{complete}");
}

/// A zip of `bootstrap` (mode 0755) holding `script`.
fn bootstrap_zip(script: &str) -> Vec<u8> {
    zip(&[("bootstrap", script.as_bytes(), 0o755)])
}

/// Deploys a `provided` function from `script` under `name`; returns its id.
fn deploy_bootstrap(s: &Server, name: &str, script: &str) -> String {
    deploy_ok(
        s,
        &bootstrap_zip(script),
        &format!("name={name}&runtime=provided.al2023&handler=function.handler"),
    )
}

/// A custom runtime in the style of AWS's tutorial that streams its answer
/// with curl: an HTTP prelude, then a line every 200 ms, uploaded from a
/// pipe as it is written (`-T .` reads stdin without waiting for its end).
const CURL_STREAMING_BOOTSTRAP: &str = r#"#!/bin/sh
set -eu
API="http://${AWS_LAMBDA_RUNTIME_API}/2018-06-01/runtime"
while true; do
  HEADERS="$(mktemp)"
  curl -sS -o /dev/null -D "$HEADERS" "$API/invocation/next"
  REQUEST_ID=$(grep -Fi Lambda-Runtime-Aws-Request-Id "$HEADERS" | tr -d '[:space:]' | cut -d: -f2)
  rm -f "$HEADERS"
  {
    printf '{"statusCode":202,"headers":{"x-runtime":"curl"},"cookies":["c=1"]}'
    printf '\000\000\000\000\000\000\000\000'
    for i in 0 1 2 3 4; do echo "line $i"; sleep 0.5; done
  } | curl -sS -o /dev/null -X POST -T . \
      -H 'Lambda-Runtime-Function-Response-Mode: streaming' \
      -H 'Transfer-Encoding: chunked' \
      -H 'Content-Type: application/vnd.awslambda.http-integration-response' \
      "$API/invocation/$REQUEST_ID/response"
done
"#;

#[test]
fn a_curl_bootstrap_streams_through_the_runtime_api() {
    require_sandbox!();
    if !std::path::Path::new("/usr/bin/curl").is_file() {
        eprintln!("skipped: the bootstrap needs /usr/bin/curl on the host");
        return;
    }
    let s = Server::start(&[]);
    deploy_bootstrap(&s, "curlstream", CURL_STREAMING_BOOTSTRAP);
    for _ in 0..2 {
        let t0 = Instant::now();
        let (mut c, status, head) = Chunked::get(&s, "/f/curlstream/");
        assert_eq!(status, 202, "{head}");
        assert!(head.contains("transfer-encoding: chunked"), "{head}");
        assert!(head.contains("x-runtime: curl"), "{head}");
        assert!(head.contains("set-cookie: c=1"), "{head}");
        let mut text = String::new();
        let mut arrivals = Vec::new();
        while let Some(data) = c.chunk().expect("a complete body") {
            arrivals.push((t0.elapsed(), String::from_utf8_lossy(&data).to_string()));
            text.push_str(&String::from_utf8_lossy(&data));
        }
        assert_eq!(text, "line 0\nline 1\nline 2\nline 3\nline 4\n");
        let first = arrivals
            .iter()
            .find(|(_, t)| t.contains("line 0"))
            .unwrap()
            .0;
        let last = arrivals
            .iter()
            .find(|(_, t)| t.contains("line 4"))
            .unwrap()
            .0;
        assert!(
            last - first >= Duration::from_millis(600),
            "the lines arrived together: {arrivals:?}"
        );
    }
    s.assert_healthy();
}

/// A Python bootstrap posting a chunked streamed response by hand, ending
/// it with Lambda's error trailers on `/fail`.
const PYTHON_TRAILERS_BOOTSTRAP: &str = r#"#!/usr/bin/python3
import base64, http.client, json, os, socket, time
host, port = os.environ['AWS_LAMBDA_RUNTIME_API'].split(':')
while True:
    c = http.client.HTTPConnection(host, int(port))
    c.request('GET', '/2018-06-01/runtime/invocation/next')
    r = c.getresponse()
    event = json.loads(r.read())
    rid = r.getheader('Lambda-Runtime-Aws-Request-Id')
    c.close()
    s = socket.create_connection((host, int(port)))
    s.sendall(('POST /2018-06-01/runtime/invocation/%s/response HTTP/1.1\r\nHost: rapi\r\n'
               'Lambda-Runtime-Function-Response-Mode: streaming\r\n'
               'Transfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n' % rid).encode())
    for i in range(2):
        d = ('part %d\n' % i).encode()
        s.sendall(b'%x\r\n%s\r\n' % (len(d), d))
        time.sleep(0.1)
    if event['rawPath'] == '/fail':
        doc = json.dumps({'errorType': 'Oops', 'errorMessage': 'broke', 'stackTrace': []})
        s.sendall(('0\r\nLambda-Runtime-Function-Error-Type: Oops\r\n'
                   'Lambda-Runtime-Function-Error-Body: %s\r\n\r\n'
                   % base64.b64encode(doc.encode()).decode()).encode())
    else:
        s.sendall(b'0\r\n\r\n')
    print('posted', s.recv(4096).split(b'\r\n')[0].decode(), flush=True)
    s.close()
"#;

#[test]
fn runtime_api_error_trailers_cut_a_stream_off() {
    require_sandbox!();
    if !std::path::Path::new("/usr/bin/python3").is_file() {
        eprintln!("skipped: the bootstrap needs /usr/bin/python3 on the host");
        return;
    }
    let s = Server::start(&[]);
    let id = deploy_bootstrap(&s, "trailers", PYTHON_TRAILERS_BOOTSTRAP);
    let (mut c, status, head) = Chunked::get(&s, "/f/trailers/ok");
    assert_eq!(status, 200, "{head}");
    assert!(head.contains("content-type: text/plain"), "{head}");
    let mut text = Vec::new();
    while let Some(data) = c.chunk().expect("a complete body") {
        text.extend(data);
    }
    assert_eq!(text, b"part 0\npart 1\n");

    let (mut c, status, _) = Chunked::get(&s, "/f/trailers/fail");
    assert_eq!(status, 200);
    let mut text = Vec::new();
    let end = loop {
        match c.chunk() {
            Ok(Some(data)) => text.extend(data),
            other => break other,
        }
    };
    assert_eq!(text, b"part 0\npart 1\n");
    assert!(end.is_err(), "the body must not end cleanly: {end:?}");
    // The runtime was told 202 both times and serves on.
    let (mut c, status, _) = Chunked::get(&s, "/f/trailers/ok");
    assert_eq!(status, 200);
    while c.chunk().expect("complete").is_some() {}
    let logs = s
        .control("GET", &format!("/functions/{id}/logs"), &[], b"")
        .text();
    assert!(logs.contains("posted HTTP/1.1 202"), "{logs}");
}
