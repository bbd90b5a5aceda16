//! `hearth bench` end to end: the real binary against hearth's own /healthz
//! and against a small std-only server in the test that answers by path
//! (2xx, 404, garbage, never, chunked), so error kinds, JSON fields, the
//! open-loop rate, request flags and `plot` are checked against real sockets.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{temp_dir, Server};
use serde_json::Value;

/// Runs `hearth bench <args>` and returns its parsed `--json` output.
fn bench_json(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .arg("bench")
        .args(args)
        .arg("--json")
        .output()
        .expect("run hearth bench");
    assert!(
        out.status.success(),
        "hearth bench {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn run0(v: &Value) -> &Value {
    &v["runs"][0]
}

/// Requests the fake server has seen: "METHOD PATH|x-test header|body".
type Seen = Arc<Mutex<Vec<String>>>;

/// A server in the test: answers each request by its path.
fn fake_server() -> (SocketAddr, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().unwrap();
    let seen: Seen = Arc::default();
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for s in listener.incoming().flatten() {
            let seen = seen2.clone();
            std::thread::spawn(move || serve(s, &seen));
        }
    });
    (addr, seen)
}

fn serve(mut s: TcpStream, seen: &Seen) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
        let header = |name: &str| {
            head.lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                })
                .unwrap_or_default()
        };
        let len: usize = header("content-length").parse().unwrap_or(0);
        while buf.len() < head_end + len {
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        let body = String::from_utf8_lossy(&buf[head_end..head_end + len]).to_string();
        buf.drain(..head_end + len);
        let mut words = head.split(' ');
        let (method, path) = (words.next().unwrap_or(""), words.next().unwrap_or(""));
        seen.lock()
            .unwrap()
            .push(format!("{method} {path}|{}|{body}", header("x-test")));
        let answer: &[u8] = match path {
            "/missing" => b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope",
            "/garbage" => b"THIS IS NOT HTTP\r\n\r\n",
            "/slow" => {
                std::thread::sleep(Duration::from_secs(5));
                return;
            }
            "/chunked" => b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n",
            _ => b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
        };
        if s.write_all(answer).is_err() {
            return;
        }
    }
}

#[test]
fn closed_loop_against_hearth_reports_every_field() {
    let server = Server::start(&[]);
    let url = format!("http://{}/healthz", server.addr);
    let v = bench_json(&[&url, "-c", "4", "-t", "2", "--duration", "1s"]);
    assert_eq!(v["format"], "hearth-bench/1");
    assert_eq!(v["sweep"], false);
    let r = run0(&v);
    assert_eq!(r["mode"], "closed");
    assert_eq!(r["connections"], 4);
    assert_eq!(r["threads"], 2);
    let requests = r["requests"].as_u64().unwrap();
    assert!(requests > 100, "only {requests} answers in 1s");
    assert_eq!(r["ok"].as_u64(), Some(requests));
    assert_eq!(r["status"]["200"].as_u64(), Some(requests));
    for kind in ["connect", "timeout", "non_2xx", "malformed", "io"] {
        assert_eq!(r["errors"][kind], 0, "{kind} errors: {r}");
    }
    let l = &r["latency_us"];
    let (p50, p99, max) = (
        l["p50"].as_u64().unwrap(),
        l["p99"].as_u64().unwrap(),
        l["max"].as_u64().unwrap(),
    );
    assert!(0 < p50 && p50 <= p99 && p99 <= max, "{l}");
    let per_second: Vec<u64> = serde_json::from_value(r["per_second"].clone()).unwrap();
    assert_eq!(per_second.len(), 1);
    assert_eq!(per_second.iter().sum::<u64>(), requests);
    let curve = r["percentiles"].as_array().unwrap();
    assert!(curve.len() > 5);
    assert_eq!(curve.last().unwrap()["percentile"], 100.0);
    let rps = r["throughput_rps"].as_f64().unwrap();
    assert!(
        (rps - requests as f64).abs() < 1.0,
        "1s window: {rps} vs {requests}"
    );
}

#[test]
fn open_loop_sends_at_the_asked_rate_and_skips_the_warmup() {
    let server = Server::start(&[]);
    let url = format!("http://{}/healthz", server.addr);
    let v = bench_json(&[
        &url,
        "--rate",
        "200",
        "--duration",
        "2s",
        "-c",
        "4",
        "-t",
        "2",
    ]);
    let r = run0(&v);
    assert_eq!(r["mode"], "open");
    assert_eq!(r["rate_rps"], 200.0);
    let n = r["requests"].as_u64().unwrap();
    assert!((360..=440).contains(&n), "--rate 200 for 2s answered {n}");

    let v = bench_json(&[
        &url,
        "--rate",
        "200",
        "--warmup",
        "1s",
        "--duration",
        "1s",
        "-c",
        "2",
        "-t",
        "1",
    ]);
    // About 200; 400 would mean the warm-up was counted. The band is wide
    // because one second on a loaded machine can lose a late burst.
    let n = run0(&v)["requests"].as_u64().unwrap();
    assert!(
        (140..=230).contains(&n),
        "1s measured after 1s warm-up answered {n}"
    );
}

#[test]
fn non_2xx_answers_count_as_errors_with_their_status() {
    let (addr, _) = fake_server();
    let v = bench_json(&[
        &format!("http://{addr}/missing"),
        "-n",
        "20",
        "-c",
        "2",
        "-t",
        "1",
    ]);
    let r = run0(&v);
    assert_eq!(r["requests"], 20);
    assert_eq!(r["ok"], 0);
    assert_eq!(r["errors"]["non_2xx"], 20);
    assert_eq!(r["status"]["404"], 20);
}

#[test]
fn garbage_answers_count_as_malformed() {
    let (addr, _) = fake_server();
    let v = bench_json(&[
        &format!("http://{addr}/garbage"),
        "-n",
        "5",
        "-c",
        "1",
        "-t",
        "1",
    ]);
    let r = run0(&v);
    assert_eq!(r["errors"]["malformed"], 5, "{r}");
    assert_eq!(r["requests"], 0);
}

#[test]
fn unanswered_requests_time_out() {
    let (addr, _) = fake_server();
    let started = Instant::now();
    let v = bench_json(&[
        &format!("http://{addr}/slow"),
        "-n",
        "2",
        "-c",
        "1",
        "-t",
        "1",
        "--timeout",
        "300ms",
    ]);
    let r = run0(&v);
    assert_eq!(r["errors"]["timeout"], 2, "{r}");
    assert_eq!(r["requests"], 0);
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn refused_connections_count_as_connect_errors() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let v = bench_json(&[
        &format!("http://127.0.0.1:{port}/"),
        "--duration",
        "500ms",
        "-c",
        "2",
        "-t",
        "1",
    ]);
    let r = run0(&v);
    assert!(r["errors"]["connect"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(r["requests"], 0);
}

#[test]
fn chunked_answers_are_read_whole() {
    let (addr, seen) = fake_server();
    let v = bench_json(&[
        &format!("http://{addr}/chunked"),
        "-n",
        "50",
        "-c",
        "2",
        "-t",
        "1",
    ]);
    let r = run0(&v);
    assert_eq!(r["ok"], 50, "{r}");
    assert_eq!(r["errors"]["malformed"], 0);
    assert_eq!(
        seen.lock().unwrap().len(),
        50,
        "one request per answer, no reconnects needed"
    );
}

#[test]
fn method_headers_and_body_come_from_flags_and_files() {
    let (addr, seen) = fake_server();
    let url = format!("http://{addr}/echo");
    bench_json(&[
        &url,
        "-X",
        "POST",
        "-d",
        "hello",
        "-H",
        "X-Test: yes",
        "-n",
        "3",
        "-c",
        "1",
        "-t",
        "1",
    ]);
    let got = seen.lock().unwrap().clone();
    assert_eq!(got, vec!["POST /echo|yes|hello"; 3]);

    let dir = temp_dir("bench-list");
    std::fs::write(dir.join("body.json"), "{\"n\":1}").unwrap();
    std::fs::write(
        dir.join("list"),
        "# two requests\nGET /a\nPUT /b @body.json\n",
    )
    .unwrap();
    seen.lock().unwrap().clear();
    let list = dir.join("list");
    bench_json(&[
        &url,
        "--requests-file",
        list.to_str().unwrap(),
        "-n",
        "4",
        "-c",
        "1",
        "-t",
        "1",
    ]);
    let got = seen.lock().unwrap().clone();
    assert_eq!(
        got,
        vec![
            "GET /a||",
            "PUT /b||{\"n\":1}",
            "GET /a||",
            "PUT /b||{\"n\":1}"
        ]
    );
}

fn assert_png(path: &Path) {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        bytes.starts_with(b"\x89PNG\r\n\x1a\n"),
        "{} is not a PNG",
        path.display()
    );
    assert!(bytes.len() > 5_000, "{} is nearly empty", path.display());
}

fn assert_svg(path: &Path, text: &str) {
    let svg = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        svg.contains("<svg") && svg.trim_end().ends_with("</svg>"),
        "{}",
        path.display()
    );
    assert!(svg.contains(text), "{} lacks {text:?}", path.display());
}

#[test]
fn plot_draws_png_and_svg_charts_from_json_results() {
    let (addr, _) = fake_server();
    let dir = temp_dir("bench-plot");
    let url = format!("http://{addr}/");
    let run = bench_json(&[
        &url,
        "--duration",
        "1s",
        "-c",
        "2",
        "-t",
        "1",
        "--label",
        "closed",
    ]);
    let sweep = bench_json(&[
        &url,
        "--sweep",
        "50:150:50",
        "--duration",
        "500ms",
        "-c",
        "2",
        "-t",
        "1",
        "--label",
        "swept",
    ]);
    assert_eq!(sweep["sweep"], true);
    let rates: Vec<f64> = sweep["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rate_rps"].as_f64().unwrap())
        .collect();
    assert_eq!(rates, vec![50.0, 100.0, 150.0]);
    std::fs::write(dir.join("a.json"), run.to_string()).unwrap();
    std::fs::write(dir.join("b.json"), sweep.to_string()).unwrap();
    let out = dir.join("charts");
    let status = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["bench", "plot"])
        .arg(dir.join("a.json"))
        .arg(dir.join("b.json"))
        .arg("-o")
        .arg(&out)
        .status()
        .unwrap();
    assert!(status.success());
    for name in ["latency", "throughput", "sweep"] {
        assert_png(&out.join(format!("{name}.png")));
    }
    assert_svg(&out.join("latency.svg"), "Latency by percentile");
    assert_svg(&out.join("latency.svg"), "99%");
    assert_svg(&out.join("throughput.svg"), "closed");
    assert_svg(&out.join("sweep.svg"), "swept");

    std::fs::write(dir.join("bad.json"), "{}").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["bench", "plot"])
        .arg(dir.join("bad.json"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a `hearth bench --json` report"));
}
