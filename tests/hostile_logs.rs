//! Hostile output: functions that flood their log, at run time and while
//! loading, must neither inflate the server's memory nor stall the event loop
//! that other functions share. Real `hearth` binary, real Node, real sandboxes.
//!
//! The process backend needs root and the static guest agent
//! (`tools/build-agent.sh`); without them every test here prints why and returns.

mod common;

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{control, deploy_fixture as deploy, deploy_zip, zip_fixture, Response, Server};

/// Growth of the server's memory a flood may cause (the log ring is 1 MiB;
/// the rest is a channel's read buffer for one 8 MiB frame and allocator slack).
const RSS_GROWTH_KIB_MAX: u64 = 64 * 1024;
/// Slowest answer a bystander may see while a function floods its log. Each
/// answer takes a few ms here, and the worst of a few hundred was 70 ms with
/// the flooding function, its log intake, the bystander's function and another
/// test sharing two cores; a CI machine that also runs a nested VM stretches
/// that further, so the bound leaves room for scheduling. An event loop held
/// by an 8 MiB flood handled line by line would take longer.
const BYSTANDER_LATENCY_MAX: Duration = Duration::from_millis(1000);

/// An invocation of function `id` at `path`.
fn invoke(s: &Server, id: &str, path: &str) -> Response {
    s.connect()
        .request("GET", &format!("/f/{id}{path}"), &[], b"")
}

/// The flood `via` grew the server's memory (KiB) by less than [`RSS_GROWTH_KIB_MAX`] and
/// kept a bystander's slowest answer under [`BYSTANDER_LATENCY_MAX`].
fn assert_bounded(via: &str, rss_before: u64, rss_after: u64, worst: Duration) {
    assert!(
        rss_after.saturating_sub(rss_before) < RSS_GROWTH_KIB_MAX,
        "{via}: server grew from {rss_before} to {rss_after} KiB"
    );
    assert!(
        worst < BYSTANDER_LATENCY_MAX,
        "{via}: a bystander waited {worst:?}"
    );
}

/// The function's kept log lines.
fn logs(s: &Server, id: &str) -> serde_json::Value {
    let r = control(s, "GET", &format!("/functions/{id}/logs"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn messages(logs: &serde_json::Value) -> Vec<String> {
    logs["logs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["message"].as_str().unwrap().to_string())
        .collect()
}

/// A field of /proc/<pid>/status in KiB (`VmRSS`, `VmHWM`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Invokes `id` and asks `/healthz` in a loop until stopped; returns the
/// slowest answer seen and how many were timed.
struct Bystander {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<(Duration, usize)>,
}

impl Bystander {
    fn start(s: &Server, id: &str) -> Bystander {
        let stop = Arc::new(AtomicBool::new(false));
        let (addr, id, flag) = (s.addr, id.to_string(), stop.clone());
        let thread = std::thread::spawn(move || {
            let (mut worst, mut n) = (Duration::ZERO, 0);
            while !flag.load(Relaxed) {
                for path in [format!("/f/{id}/bystander"), "/healthz".to_string()] {
                    let t = Instant::now();
                    let r = common::Client::connect(addr).request("GET", &path, &[], b"");
                    assert_eq!(r.status, 200, "{path}: {}", r.text());
                    worst = worst.max(t.elapsed());
                    n += 1;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            (worst, n)
        });
        Bystander { stop, thread }
    }

    fn finish(self) -> (Duration, usize) {
        self.stop.store(true, Relaxed);
        self.thread.join().expect("bystander thread")
    }
}

/// A one-core server with the flooding function and a bystander, both warm.
fn flood_setup() -> (Server, String, String) {
    let s = Server::start(&["--cores", "1"]);
    let flood = deploy(&s, "log-flood", "");
    let plain = deploy(&s, "plain", "");
    assert_eq!(invoke(&s, &flood, "/warm").status, 200);
    assert_eq!(invoke(&s, &plain, "/warm").status, 200);
    (s, flood, plain)
}

/// The start of the host's note of output it dropped.
const DROP_NOTE: &str = "[hearth: ";
/// The end of that note.
const DROP_NOTE_END: &str = " of output dropped: over the log rate or size limit]";

/// Waits until the function's log has a line starting with `prefix` (and,
/// for the host's drop note, ending like one).
fn wait_for_line(s: &Server, id: &str, prefix: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    let wanted =
        |m: &String| m.starts_with(prefix) && (prefix != DROP_NOTE || m.ends_with(DROP_NOTE_END));
    loop {
        let l = logs(s, id);
        if messages(&l).iter().any(wanted) {
            return l;
        }
        if Instant::now() >= deadline {
            let m = messages(&l);
            let tail = &m[m.len().saturating_sub(3)..];
            panic!("no line {prefix:?} in {} lines; last: {tail:?}", m.len());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The function's count of output lines left out of its log, from /metrics.
fn dropped_lines(s: &Server, id: &str) -> u64 {
    let metrics = control(s, "GET", "/metrics", &[], b"").text();
    let series = format!("hearth_function_log_dropped_lines_total{{function=\"{id}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or_else(|| panic!("no {series} in /metrics"))
        .parse()
        .unwrap()
}

/// One 8 MiB flood of newlines by `via`; checks memory, the bystander's
/// latency and what the log kept.
fn one_flood_is_bounded(via: &str) {
    let (s, flood, plain) = flood_setup();
    let rss_before = status_kib(s.pid(), "VmRSS");
    let bystander = Bystander::start(&s, &plain);
    std::thread::sleep(Duration::from_millis(100));
    let r = invoke(&s, &flood, &format!("/{via}?mb=8"));
    assert_eq!(r.status, 200, "{}", r.text());
    // The agent's route is asynchronous: let its output arrive.
    std::thread::sleep(Duration::from_millis(1000));
    let (worst, n) = bystander.finish();
    let rss_after = status_kib(s.pid(), "VmRSS");
    eprintln!(
        "{via}: server VmRSS {rss_before} -> {rss_after} KiB; bystander worst {worst:?} over {n} requests"
    );
    assert_bounded(via, rss_before, rss_after, worst);
    // The host notes what it left out, within a second even if the
    // function falls silent.
    let l = wait_for_line(&s, &flood, DROP_NOTE);
    let kept = l["logs"].as_array().unwrap().len();
    assert!(kept <= 1000, "{kept} lines kept");
    assert!(dropped_lines(&s, &flood) > 0);
    // Once the flood is over, the function's output is taken again.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(invoke(&s, &flood, "/still-logging").status, 200);
    wait_for_line(&s, &flood, "hello /still-logging");
    s.assert_healthy();
}

#[test]
fn one_raw_8_mib_log_frame_is_bounded() {
    require_sandbox!();
    one_flood_is_bounded("frame");
}

#[test]
fn console_flood_is_bounded() {
    require_sandbox!();
    one_flood_is_bounded("stdout");
}

#[test]
fn raw_fd_flood_is_bounded() {
    require_sandbox!();
    one_flood_is_bounded("fd1");
}

/// A flood of `via` repeated from a timer while the function is idle.
fn repeated_flood_is_bounded(via: &str) {
    let (s, flood, plain) = flood_setup();
    let rss_before = status_kib(s.pid(), "VmRSS");
    let r = invoke(&s, &flood, &format!("/timer?via={via}&ms=100&mb=8"));
    assert_eq!(r.status, 200, "{}", r.text());
    let bystander = Bystander::start(&s, &plain);
    std::thread::sleep(Duration::from_secs(3));
    let (worst, n) = bystander.finish();
    let rss_after = status_kib(s.pid(), "VmRSS");
    assert_eq!(invoke(&s, &flood, "/stop").status, 200);
    eprintln!(
        "{via} every 100 ms: server VmRSS {rss_before} -> {rss_after} KiB; bystander worst {worst:?} over {n} requests"
    );
    assert_bounded(via, rss_before, rss_after, worst);
    // The instance's intake was limited, and the log says so.
    assert!(dropped_lines(&s, &flood) > 0);
    let l = wait_for_line(&s, &flood, DROP_NOTE);
    assert!(l["logs"].as_array().unwrap().len() <= 1000);
    s.assert_healthy();
}

/// The start of the host's note when it retires an idle instance that wrote
/// something other than a small LOG frame to its channel.
const RETIRED_NOTE: &str =
    "instance retired: it sent a Log frame of 8388624 bytes while no request of it was running";

/// The instance of the flooding function writes to its channel from a timer
/// after answering (`path`): the host reads no more than a small frame from an
/// idle instance, retires it with a note in the function's log, and the
/// next request gets a new instance; memory and a bystander stay unaffected.
fn idle_writer_is_retired(path: &str) {
    let (s, flood, plain) = flood_setup();
    let rss_before = status_kib(s.pid(), "VmRSS");
    let bystander = Bystander::start(&s, &plain);
    let r = invoke(&s, &flood, path);
    assert_eq!(r.status, 200, "{}", r.text());
    wait_for_line(&s, &flood, RETIRED_NOTE);
    let (worst, n) = bystander.finish();
    let rss_after = status_kib(s.pid(), "VmRSS");
    eprintln!(
        "{path}: server VmRSS {rss_before} -> {rss_after} KiB; bystander worst {worst:?} over {n} requests"
    );
    assert_bounded(path, rss_before, rss_after, worst);
    let stderr = s.stderr();
    assert!(
        stderr.contains(RETIRED_NOTE),
        "no note on stderr:\n{stderr}"
    );
    // The function is served again, by a new instance.
    assert_eq!(invoke(&s, &flood, "/after").status, 200);
    wait_for_line(&s, &flood, "hello /after");
    s.assert_healthy();
}

#[test]
fn an_idle_instance_that_starts_an_unsolicited_frame_is_retired() {
    require_sandbox!();
    idle_writer_is_retired("/later?via=partial&ms=100&mb=8");
}

#[test]
fn raw_log_frames_from_a_timer_retire_the_idle_instance() {
    require_sandbox!();
    idle_writer_is_retired("/timer?via=frame&ms=100&mb=8");
}

#[test]
fn console_floods_from_a_timer_are_bounded() {
    require_sandbox!();
    repeated_flood_is_bounded("stdout");
}

#[test]
fn raw_fd_floods_from_a_timer_are_bounded() {
    require_sandbox!();
    repeated_flood_is_bounded("fd1");
}

/// Deploys init-flood with `via` and `then`; returns the answer and the
/// growth of the server's peak memory (KiB).
fn deploy_init_flood(via: &str, then: &str) -> (Server, Response, u64) {
    let s = Server::start(&["--cores", "1"]);
    // A first deploy, so the peak already includes what any deploy costs.
    deploy(&s, "plain", "");
    let hwm_before = status_kib(s.pid(), "VmHWM");
    let env = format!("%7B%22FLOOD_VIA%22%3A%22{via}%22%2C%22FLOOD_THEN%22%3A%22{then}%22%7D");
    let r = deploy_zip(&s, &zip_fixture("init-flood"), &format!("env={env}"));
    let hwm_after = status_kib(s.pid(), "VmHWM");
    eprintln!(
        "init flood via {via}, then {then}: {} / server VmHWM {hwm_before} -> {hwm_after} KiB",
        r.status
    );
    (s, r, hwm_after.saturating_sub(hwm_before))
}

fn init_flood_fails_with_a_bounded_tail(via: &str) {
    let (s, r, growth) = deploy_init_flood(via, "throw");
    assert_eq!(r.status, 422, "{}", r.text());
    let v = r.json();
    assert_eq!(v["code"], "init_error", "{v}");
    let tail: Vec<&str> = v["logs"]
        .as_array()
        .unwrap_or_else(|| panic!("no output tail in {v}"))
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    // The last 200 lines, after one note of what came before them.
    assert!(tail.len() <= 201, "{} lines in the tail", tail.len());
    assert!(tail[0].starts_with("[hearth: "), "{}", tail[0]);
    // The runtime's own report of the failure comes last, after the last
    // words, or after the runtime's count of output it had to drop.
    let end = &tail[tail.len() - 2..];
    assert!(end[1].contains("Init failed"), "{end:?}");
    assert!(
        end[0] == "init-flood: last words"
            || end[0].starts_with("[hearth: ") && end[0].ends_with(" bytes of output dropped]"),
        "{end:?}"
    );
    assert!(r.body.len() < 64 * 1024, "a {} byte answer", r.body.len());
    assert!(
        growth < RSS_GROWTH_KIB_MAX,
        "peak memory grew by {growth} KiB"
    );
    s.assert_healthy();
}

#[test]
fn init_output_flood_then_throw_answers_422_with_a_bounded_tail() {
    require_sandbox!();
    init_flood_fails_with_a_bounded_tail("stdout");
}

#[test]
fn init_raw_frames_then_throw_answer_422_with_a_bounded_tail() {
    require_sandbox!();
    init_flood_fails_with_a_bounded_tail("frame");
}

#[test]
fn init_output_flood_then_success_deploys_with_bounded_logs() {
    require_sandbox!();
    let (s, r, growth) = deploy_init_flood("frame", "ok");
    assert_eq!(r.status, 201, "{}", r.text());
    let id = r.json()["functionId"].as_str().unwrap().to_string();
    let l = logs(&s, &id);
    let m = messages(&l);
    assert!(m.len() <= 1000, "{} lines kept", m.len());
    // The runtime's last words, then the host's report of the init.
    let end = &m[m.len() - 2..];
    assert_eq!(end[0], "init-flood: last words", "{end:?}");
    assert!(end[1].starts_with("INIT_REPORT Init Duration: "), "{end:?}");
    assert!(
        growth < RSS_GROWTH_KIB_MAX,
        "peak memory grew by {growth} KiB"
    );
    assert_eq!(invoke(&s, &id, "/").text(), "loaded");
}
