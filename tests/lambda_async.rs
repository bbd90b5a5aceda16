//! Asynchronous invocations (`--invocation-type Event`) driven by the real
//! `aws` CLI against the real server on the process backend: accepted with
//! 202 and run, failures retried then kept and listed, settings validated as
//! Lambda does, no accepted event lost to `kill -9`, and failed events
//! POSTed to the operator's webhook.
//!
//! Which events ran is read from the function's log (the handler prints
//! `event-start [n]` and `event-done [n]`): instances are isolated, so the
//! log is the side effect a test can observe.
//!
//! Needs root and the static agent (the process backend) and `aws`; without
//! them each test prints why and returns.

mod common;

use std::time::{Duration, Instant};

use common::{aws, temp_dir, zip_fixture, Server};

macro_rules! require_clients {
    () => {
        require_sandbox!();
        skip_if!(aws::missing());
    };
}

/// The region the CLI signs for in these tests (it shows in ARNs).
const REGION: &str = "us-east-1";

fn aws_ok(s: &Server, args: &[&str]) -> serde_json::Value {
    aws::ok(s, REGION, args)
}

fn aws_err(s: &Server, args: &[&str], error: &str) {
    aws::fails(s, s.token.as_deref().unwrap(), REGION, args, error)
}

/// Creates the fixture function `name` with `extra` create-function flags.
fn create(s: &Server, name: &str, extra: &[&str]) {
    let zip = s.dir.join(format!("{name}.zip"));
    std::fs::write(&zip, zip_fixture("async-events")).unwrap();
    let zip = format!("fileb://{}", zip.display());
    let args = aws::create_args(name, &zip, extra);
    aws_ok(s, &args);
}

/// Sends an `Event` invocation with the admin token; its status and request id.
fn event(s: &Server, name: &str, payload: &str) -> (u16, Option<String>) {
    let r = s.control(
        "POST",
        &format!("/2015-03-31/functions/{name}/invocations"),
        &[
            ("x-amz-invocation-type", "Event"),
            ("content-type", "application/json"),
        ],
        payload.as_bytes(),
    );
    (r.status, r.header("x-amzn-requestid").map(str::to_string))
}

/// The function's log, as text.
fn logs(s: &Server, name: &str) -> String {
    let r = s.get(&format!("/functions/{name}/logs"));
    assert_eq!(r.status, 200, "{}", r.text());
    r.text()
}

fn wait_for(limit: Duration, what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn events_run_and_failures_are_retried_then_kept_and_listed() {
    require_clients!();
    let s = Server::start(&["--async-retry-base-ms", "100"]);
    create(&s, "ev", &[]);

    // The CLI's own Event invocation: 202, and the handler runs.
    let out = s.dir.join("out.json");
    let invoked = aws_ok(
        &s,
        &[
            "invoke",
            "--function-name",
            "ev",
            "--invocation-type",
            "Event",
            "--payload",
            r#"{"n": 1}"#,
            out.to_str().unwrap(),
        ],
    );
    assert_eq!(invoked["StatusCode"], 202, "{invoked}");
    wait_for(Duration::from_secs(30), "event 1 to run", || {
        logs(&s, "ev").contains("event-done [1]")
    });

    // Settings as Lambda validates them.
    aws_err(
        &s,
        &["get-function-event-invoke-config", "--function-name", "ev"],
        "ResourceNotFoundException",
    );
    aws_err(
        &s,
        &[
            "put-function-event-invoke-config",
            "--function-name",
            "ev",
            "--maximum-retry-attempts",
            "3",
        ],
        "ValidationException",
    );
    aws_err(
        &s,
        &[
            "put-function-event-invoke-config",
            "--function-name",
            "ev",
            "--maximum-event-age-in-seconds",
            "30000",
        ],
        "ValidationException",
    );
    let put = aws_ok(
        &s,
        &[
            "put-function-event-invoke-config",
            "--function-name",
            "ev",
            "--maximum-retry-attempts",
            "1",
        ],
    );
    assert_eq!(
        (
            put["MaximumRetryAttempts"].as_u64(),
            put["MaximumEventAgeInSeconds"].as_u64()
        ),
        (Some(1), Some(21600)),
        "{put}"
    );
    let updated = aws_ok(
        &s,
        &[
            "update-function-event-invoke-config",
            "--function-name",
            "ev",
            "--maximum-event-age-in-seconds",
            "600",
        ],
    );
    assert_eq!(
        (
            updated["MaximumRetryAttempts"].as_u64(),
            updated["MaximumEventAgeInSeconds"].as_u64()
        ),
        (Some(1), Some(600)),
        "{updated}"
    );
    let got = aws_ok(
        &s,
        &["get-function-event-invoke-config", "--function-name", "ev"],
    );
    assert_eq!(
        got["FunctionArn"],
        "arn:aws:lambda:us-east-1:000000000000:function:ev"
    );

    // A failing event runs twice (one retry), then is kept with its error.
    let (status, request_id) = event(&s, "ev", r#"{"n": 2, "fail": true}"#);
    assert_eq!(status, 202);
    let mut failed = serde_json::Value::Null;
    wait_for(Duration::from_secs(30), "event 2 to be given up", || {
        let r = s.get("/functions/ev/async/failed");
        failed = r.json();
        failed["failed"].as_array().is_some_and(|l| !l.is_empty())
    });
    let f = &failed["failed"][0];
    assert_eq!(f["requestId"].as_str(), request_id.as_deref(), "{failed}");
    assert_eq!((&failed["older"], &failed["skip"]), (&0.into(), &1.into()));
    // The next page (skipping the one listed) is empty; unknown parameters are refused.
    let next = s.get("/functions/ev/async/failed?skip=1").json();
    assert_eq!(next["failed"], serde_json::json!([]), "{next}");
    assert_eq!(s.get("/functions/ev/async/failed?limit=5").status, 400);
    assert_eq!(f["condition"], "RetriesExhausted");
    assert_eq!(f["attempts"], 2);
    assert_eq!(f["payload"], r#"{"n": 2, "fail": true}"#);
    assert!(
        f["error"]["errorMessage"]
            .as_str()
            .unwrap()
            .contains("boom [2]"),
        "{failed}"
    );
    assert_eq!(logs(&s, "ev").matches("event-start [2]").count(), 2);
    let metrics = s.get("/metrics").text();
    for (series, want) in [
        ("hearth_async_events_accepted_total", 2),
        ("hearth_async_events_succeeded_total", 1),
        ("hearth_async_events_retried_total", 1),
        ("hearth_async_events_failed_total", 1),
        ("hearth_async_queue_depth", 0),
    ] {
        assert_eq!(
            common::metric_sum(&metrics, series, "function=\"ev\""),
            want,
            "{series}"
        );
    }

    // Bad events are refused before they are queued.
    let big = format!(r#"{{"pad": "{}"}}"#, "x".repeat(1 << 20));
    let r = s.control(
        "POST",
        "/2015-03-31/functions/ev/invocations",
        &[("x-amz-invocation-type", "Event")],
        big.as_bytes(),
    );
    assert_eq!(
        (r.status, r.header("x-amzn-errortype")),
        (413, Some("RequestTooLargeException"))
    );
    assert_eq!(event(&s, "ev", "not json").0, 400);
    assert_eq!(event(&s, "nope", "{}").0, 404);

    aws_ok(
        &s,
        &[
            "delete-function-event-invoke-config",
            "--function-name",
            "ev",
        ],
    );
    aws_err(
        &s,
        &["get-function-event-invoke-config", "--function-name", "ev"],
        "ResourceNotFoundException",
    );
    s.assert_healthy();
}

#[test]
fn accepted_events_survive_kill_9_and_all_run_after_the_restart() {
    require_clients!();
    let dir = temp_dir("async-kill9");
    let state = dir.join("state");
    let state_arg = state.to_str().unwrap();
    let mut s = Server::start(&[
        "--state-dir",
        state_arg,
        "--admin-token",
        "async-test-token",
    ]);
    // Concurrency 2: events run one at a time (half the limit), 300 ms each.
    create(&s, "slow", &["--timeout", "10"]);
    aws_ok(
        &s,
        &[
            "put-function-concurrency",
            "--function-name",
            "slow",
            "--reserved-concurrent-executions",
            "2",
        ],
    );
    const EVENTS: usize = 12;
    for n in 0..EVENTS {
        let (status, _) = event(&s, "slow", &format!(r#"{{"n": {n}, "sleep_ms": 300}}"#));
        assert_eq!(status, 202, "event {n}");
    }
    // Events take at most half the concurrency: a synchronous request is
    // served by the other instance while events are still queued.
    let sync = s.get("/f/slow/");
    assert_eq!(sync.status, 200, "{}", sync.text());
    let depth = common::metric_sum(
        &s.get("/metrics").text(),
        "hearth_async_queue_depth",
        "function=\"slow\"",
    );
    assert!(
        depth > 0,
        "the events drained before a synchronous request was served"
    );
    // An event that finishes after this read started after it (runs take
    // 300 ms), so its ack cannot precede the kill: whatever is not done here
    // must run after the restart.
    let before = logs(&s, "slow");
    s.signal(libc::SIGKILL);
    s.wait_exit(Duration::from_secs(10));
    let ran_before: Vec<usize> = (0..EVENTS)
        .filter(|n| before.contains(&format!("event-done [{n}]")))
        .collect();
    assert!(
        ran_before.len() < EVENTS,
        "every event ran before the kill; the test proves nothing"
    );

    let s = Server::start(&[
        "--state-dir",
        state_arg,
        "--admin-token",
        "async-test-token",
    ]);
    wait_for(
        Duration::from_secs(60),
        "the queued events to run after the restart",
        || {
            let after = logs(&s, "slow");
            (0..EVENTS)
                .all(|n| ran_before.contains(&n) || after.contains(&format!("event-done [{n}]")))
        },
    );
    eprintln!(
        "{} event(s) ran before the kill, {} after the restart",
        ran_before.len(),
        EVENTS - ran_before.len()
    );
    // Nothing stays queued: segments of acked events are removed.
    wait_for(Duration::from_secs(10), "the queue to empty", || {
        common::metric_sum(
            &s.get("/metrics").text(),
            "hearth_async_queue_depth",
            "function=\"slow\"",
        ) == 0
    });
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn deleting_a_function_by_id_deletes_its_versions_aliases_and_events() {
    require_clients!();
    let s = Server::start(&[]);
    create(&s, "gone", &[]);
    let v1 = aws_ok(&s, &["publish-version", "--function-name", "gone"]);
    aws_ok(
        &s,
        &[
            "create-alias",
            "--function-name",
            "gone",
            "--name",
            "live",
            "--function-version",
            "1",
        ],
    );
    assert_eq!(s.get("/f/gone:live/").status, 200);
    let latest = aws_ok(&s, &["get-function", "--function-name", "gone"]);
    let id = latest["Configuration"]["RevisionId"]
        .as_str()
        .unwrap()
        .to_string();
    let v1_id = v1["RevisionId"].as_str().unwrap().to_string();

    let r = s.control("DELETE", &format!("/functions/{id}"), &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        s.get(&format!("/functions/{v1_id}")).status,
        404,
        "version 1 left behind"
    );
    assert_eq!(s.get("/f/gone:1/").status, 404);
    assert_eq!(s.get("/f/gone:live/").status, 404);
    // The name is free again, without stale aliases.
    create(&s, "gone", &[]);
    let aliases = aws_ok(&s, &["list-aliases", "--function-name", "gone"]);
    assert_eq!(
        aliases["Aliases"].as_array().map(Vec::len),
        Some(0),
        "{aliases}"
    );
}

#[test]
fn failed_events_are_posted_to_the_operators_webhook() {
    require_sandbox!();
    use std::io::{Read, Write};
    let hook = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", hook.local_addr().unwrap());
    let s = Server::start(&["--async-failure-webhook", &url]);
    common::deploy_fixture(&s, "async-events", "name=hooked");
    let r = s.control(
        "PUT",
        "/2019-09-25/functions/hooked/event-invoke-config",
        &[("content-type", "application/json")],
        br#"{"MaximumRetryAttempts": 0}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(event(&s, "hooked", r#"{"n": 7, "fail": true}"#).0, 202);

    hook.set_nonblocking(false).unwrap();
    let (mut c, _) = hook.accept().unwrap();
    c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    // Until the head and the Content-Length body are in.
    let complete = |got: &[u8]| {
        let text = String::from_utf8_lossy(got).to_lowercase();
        let Some(end) = text.find("\r\n\r\n") else {
            return false;
        };
        let length = text
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .expect("the webhook request has a content-length");
        got.len() >= end + 4 + length
    };
    while !complete(&got) {
        let n = c.read(&mut buf).unwrap();
        assert!(
            n > 0,
            "the webhook request ended early: {}",
            String::from_utf8_lossy(&got)
        );
        got.extend_from_slice(&buf[..n]);
    }
    c.write_all(b"HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n")
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("POST /hook HTTP/1.1\r\n"), "{text}");
    let body: serde_json::Value =
        serde_json::from_str(&text[text.find("\r\n\r\n").unwrap() + 4..]).unwrap();
    assert_eq!(
        (&body["function"], &body["condition"], &body["attempts"]),
        (&"hooked".into(), &"RetriesExhausted".into(), &1.into()),
        "{body}"
    );
    assert!(body["error"]["errorMessage"]
        .as_str()
        .unwrap()
        .contains("boom [7]"));
}

#[test]
fn reading_or_deleting_event_settings_makes_no_queue() {
    require_sandbox!();
    let s = Server::start(&[]);
    common::deploy_fixture(&s, "async-events", "name=quiet");
    let path = "/2019-09-25/functions/quiet/event-invoke-config";
    for method in ["GET", "DELETE"] {
        let r = s.control(method, path, &[], b"");
        assert_eq!(
            (r.status, r.header("x-amzn-errortype")),
            (404, Some("ResourceNotFoundException")),
            "{method}: {}",
            r.text()
        );
    }
    // A Get racing DeleteFunction would otherwise leave the deleted
    // function's queue behind, made again.
    let queue = s.dir.join("state/async/quiet");
    assert!(!queue.exists(), "{} was made", queue.display());
    // Setting one makes it.
    let r = s.control(
        "PUT",
        path,
        &[("content-type", "application/json")],
        br#"{"MaximumRetryAttempts": 0}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(queue.join("config.json").is_file());
    assert_eq!(s.control("GET", path, &[], b"").status, 200);
}

#[test]
fn an_event_for_a_version_id_runs_that_version() {
    require_clients!();
    let s = Server::start(&[]);
    create(&s, "ver", &[]);
    let v1 = aws_ok(&s, &["publish-version", "--function-name", "ver"]);
    let v1_id = v1["RevisionId"].as_str().unwrap().to_string();
    // By the version's id, as a RequestResponse invoke may name it.
    assert_eq!(event(&s, &v1_id, r#"{"n": 9}"#).0, 202);
    wait_for(
        Duration::from_secs(30),
        "the event to run on version 1",
        || logs(&s, &v1_id).contains("event-done [9]"),
    );
    assert!(
        !logs(&s, "ver").contains("event-start [9]"),
        "the event ran on $LATEST"
    );
    // Its settings are the version's too.
    let r = s.control(
        "PUT",
        &format!("/2019-09-25/functions/{v1_id}/event-invoke-config"),
        &[("content-type", "application/json")],
        br#"{"MaximumRetryAttempts": 0}"#,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let got = aws_ok(
        &s,
        &[
            "get-function-event-invoke-config",
            "--function-name",
            "ver",
            "--qualifier",
            "1",
        ],
    );
    assert_eq!(got["MaximumRetryAttempts"], 0, "{got}");
    aws_err(
        &s,
        &["get-function-event-invoke-config", "--function-name", "ver"],
        "ResourceNotFoundException",
    );
}

/// A function that answers 429 or 404 itself (a RESPONSE frame of its own,
/// past the runtime, with a header claiming a throttle) gives an answer like
/// any other: `Invoke` returns its payload with 200, as Lambda does, and an
/// event of it runs once and succeeds, neither retried as throttled nor
/// dropped as if the function were gone.
#[test]
fn a_functions_own_429_or_404_is_its_answer_not_a_throttle_or_not_found() {
    require_sandbox!();
    let s = Server::start(&["--async-retry-base-ms", "100"]);
    let id = common::deploy_fixture(&s, "own-status", "");
    let invocations = format!("/2015-03-31/functions/{id}/invocations");
    for status in [429, 404] {
        let payload = format!("{{\"status\":{status},\"n\":0}}");
        let json = [("content-type", "application/json")];
        let r = s.control("POST", &invocations, &json, payload.as_bytes());
        assert_eq!(r.status, 200, "{status}: {}", r.text());
        assert_eq!(r.text(), format!("own {status}"));
        assert_eq!(r.header("x-amzn-errortype"), None, "{status}");
        assert_eq!(r.header("x-amz-function-error"), None, "{status}");
        // Its instance exits after answering: let it go before the next request.
        std::thread::sleep(Duration::from_secs(1));
    }
    let attempts = |n: u32| {
        logs(&s, &id)
            .matches(&format!("own-status attempt [{n}]"))
            .count()
    };
    for (n, status) in [(1, 429), (2, 404)] {
        let (code, _) = event(&s, &id, &format!("{{\"status\":{status},\"n\":{n}}}"));
        assert_eq!(code, 202);
        wait_for(Duration::from_secs(20), "the event to run", || {
            attempts(n) > 0
        });
        // A throttled event would be tried again after 200, 400, 800 ms...
        std::thread::sleep(Duration::from_secs(2));
    }
    assert_eq!((attempts(1), attempts(2)), (1, 1), "{}", logs(&s, &id));
    let failed = s.control("GET", &format!("/functions/{id}/async/failed"), &[], b"");
    assert!(!failed.text().contains("own-status"), "{}", failed.text());
    let stderr = s.stderr();
    assert!(!stderr.contains("the function is gone"), "{stderr}");
}

/// How many events the function `name` has queued (waiting, delayed or running).
fn queued(s: &Server, name: &str) -> u64 {
    let r = s.get(&format!("/functions/{name}/async/failed"));
    assert_eq!(r.status, 200, "{}", r.text());
    let v: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
    v["queued"].as_u64().unwrap()
}

#[test]
fn deleting_a_version_or_alias_drops_its_settings_and_queued_events() {
    require_clients!();
    // A failed run waits ten minutes for its retry: the events stay queued.
    let s = Server::start(&["--async-retry-base-ms", "600000"]);
    create(&s, "drop", &[]);
    let v1 = aws_ok(&s, &["publish-version", "--function-name", "drop"]);
    let v1_id = v1["RevisionId"].as_str().unwrap().to_string();
    let alias = |verb: &str| {
        aws_ok(
            &s,
            &[
                verb,
                "--function-name",
                "drop",
                "--name",
                "live",
                "--function-version",
                "1",
            ],
        )
    };
    alias("create-alias");
    let config = |qualifier: &str| {
        [
            "get-function-event-invoke-config",
            "--function-name",
            "drop",
            "--qualifier",
            qualifier,
        ]
        .map(str::to_string)
    };
    for qualifier in ["1", "live"] {
        aws_ok(
            &s,
            &[
                "put-function-event-invoke-config",
                "--function-name",
                "drop",
                "--qualifier",
                qualifier,
                "--maximum-retry-attempts",
                "2",
            ],
        );
    }
    assert_eq!(event(&s, "drop:1", r#"{"n": 1, "fail": true}"#).0, 202);
    assert_eq!(event(&s, "drop:live", r#"{"n": 2, "fail": true}"#).0, 202);
    wait_for(Duration::from_secs(30), "both events to fail once", || {
        let log = logs(&s, &v1_id);
        log.contains("event-start [1]") && log.contains("event-start [2]")
    });
    assert_eq!(queued(&s, "drop"), 2, "both wait for their retry");

    // The alias goes with its settings and its event.
    aws_ok(
        &s,
        &["delete-alias", "--function-name", "drop", "--name", "live"],
    );
    assert_eq!(queued(&s, "drop"), 1, "the alias's event stayed queued");
    alias("create-alias");
    let args = config("live");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    aws_err(&s, &args, "ResourceNotFoundException");

    // So does the version: its settings do not outlive it (and, as on
    // Lambda, its number is not given again).
    aws_ok(
        &s,
        &["delete-alias", "--function-name", "drop", "--name", "live"],
    );
    aws_ok(
        &s,
        &[
            "delete-function",
            "--function-name",
            "drop",
            "--qualifier",
            "1",
        ],
    );
    assert_eq!(queued(&s, "drop"), 0, "the version's event stayed queued");
    let again = aws_ok(&s, &["publish-version", "--function-name", "drop"]);
    assert_eq!(again["Version"], "2", "{again}");
    let args = config("1");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    aws_err(&s, &args, "ResourceNotFoundException");

    // The control plane's delete of a version does the same.
    assert_eq!(event(&s, "drop:2", r#"{"n": 3, "fail": true}"#).0, 202);
    wait_for(Duration::from_secs(30), "the event to fail once", || {
        queued(&s, "drop") == 1 && logs(&s, "drop:2").contains("event-start [3]")
    });
    let r = s.control("DELETE", "/functions/drop:2", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(queued(&s, "drop"), 0, "the version's event stayed queued");
}

#[test]
fn the_server_wide_async_disk_cap_refuses_events_with_429() {
    require_sandbox!();
    // 1 MiB for every function's queued events; failed runs wait ten
    // minutes for their retry, so what is stored stays.
    let s = Server::start(&[
        "--async-disk-max-mb",
        "1",
        "--async-retry-base-ms",
        "600000",
    ]);
    common::deploy_fixture(&s, "async-events", "name=full");
    common::deploy_fixture(&s, "async-events", "name=other");
    let pad = "x".repeat(300 << 10);
    let send = |name: &str, n: u32| {
        s.control(
            "POST",
            &format!("/2015-03-31/functions/{name}/invocations"),
            &[
                ("x-amz-invocation-type", "Event"),
                ("content-type", "application/json"),
            ],
            format!(r#"{{"n": {n}, "fail": true, "pad": "{pad}"}}"#).as_bytes(),
        )
    };
    for n in 0..3 {
        let r = send("full", n);
        assert_eq!(r.status, 202, "{}", r.text());
    }
    let refused = |r: common::Response| {
        assert_eq!(
            (r.status, r.header("x-amzn-errortype")),
            (429, Some("TooManyRequestsException")),
            "{}",
            r.text()
        );
        assert!(r.text().contains("the server's disk"), "{}", r.text());
    };
    refused(send("full", 3));
    // The cap is the server's: another function's event is refused as well,
    // and nothing of it is written.
    refused(send("other", 4));
    let other = s.dir.join("state/async/other");
    assert!(!other.exists(), "{} was made", other.display());
    let used: u64 = std::fs::read_dir(s.dir.join("state/async/full"))
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(used <= 1 << 20, "{used} bytes stored");
}

#[test]
fn a_failed_events_retry_waits_its_turn_across_a_kill_9() {
    require_clients!();
    let dir = temp_dir("async-retry-kill9");
    let state = dir.join("state");
    let args = [
        "--state-dir",
        state.to_str().unwrap(),
        "--admin-token",
        "async-test-token",
        "--async-retry-base-ms",
        "600000",
    ];
    let mut s = Server::start(&args);
    create(&s, "again", &[]);
    assert_eq!(event(&s, "again", r#"{"n": 5, "fail": true}"#).0, 202);
    wait_for(Duration::from_secs(30), "the first run to fail", || {
        common::metric_sum(
            &s.get("/metrics").text(),
            "hearth_async_events_retried_total",
            "function=\"again\"",
        ) == 1
    });
    // The retry record is written before the count (it used to be written
    // just after, and the test slept 200 ms, which a loaded machine may not
    // honour).
    s.signal(libc::SIGKILL);
    s.wait_exit(Duration::from_secs(10));

    // Its retry is ten minutes away: the restart does not run it early.
    let s = Server::start(&args);
    assert_eq!(queued(&s, "again"), 1);
    std::thread::sleep(Duration::from_secs(8));
    assert!(
        !logs(&s, "again").contains("event-start [5]"),
        "the retry ran at the restart"
    );
    assert_eq!(queued(&s, "again"), 1);
    drop(s);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn one_functions_slow_backlog_leaves_invokers_for_another_function() {
    // `async_events::dispatch::INVOKERS_PER_FUNCTION_MAX`: half of the 32 invokers.
    const INVOKERS_PER_FUNCTION_MAX: usize = 16;
    require_clients!();
    let s = Server::start(&[]);
    // A limit of 200 would let the hog run 100 events at once: more than
    // all the invokers, were its share not capped.
    create(&s, "hog", &["--timeout", "30"]);
    aws_ok(
        &s,
        &[
            "put-function-concurrency",
            "--function-name",
            "hog",
            "--reserved-concurrent-executions",
            "200",
        ],
    );
    create(&s, "other", &[]);
    for n in 0..40 {
        let (status, _) = event(&s, "hog", &format!(r#"{{"n": {n}, "sleep_ms": 25000}}"#));
        assert_eq!(status, 202, "event {n}");
    }
    let running = || {
        let l = logs(&s, "hog");
        l.matches("event-start [").count() - l.matches("event-done [").count()
    };
    wait_for(Duration::from_secs(30), "the hog to run its share", || {
        running() >= INVOKERS_PER_FUNCTION_MAX
    });
    // Its runs take 25 s: the other function's event runs on an invoker
    // the hog could not take, not after one of the hog's runs ends. (With
    // 10 s runs and 6 s for the other event, a loaded machine was left little
    // room; now none of the hog's runs may have ended when it is done.)
    let sent = Instant::now();
    let (status, _) = event(&s, "other", r#"{"n": 999}"#);
    assert_eq!(status, 202);
    wait_for(
        Duration::from_secs(20),
        "the other function's event",
        || logs(&s, "other").contains("event-done [999]"),
    );
    eprintln!("the other function's event ran after {:?}", sent.elapsed());
    let hog_done = logs(&s, "hog").matches("event-done [").count();
    assert_eq!(
        hog_done, 0,
        "the other event waited for a run of the hog to end"
    );
    let hog = running();
    assert!(
        hog <= INVOKERS_PER_FUNCTION_MAX,
        "{hog} of the hog's events run at once"
    );
    s.assert_healthy();
}

/// A tmpfs mounted at a directory for a test (root only), unmounted on drop.
struct SmallFs(std::path::PathBuf);

impl SmallFs {
    fn mount(at: &std::path::Path, bytes: u64) -> Option<SmallFs> {
        std::fs::create_dir_all(at).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        mounted.then(|| SmallFs(at.to_path_buf()))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn an_event_the_disk_cannot_hold_is_refused_with_500_and_the_queue_goes_on() {
    require_clients!();
    let dir = temp_dir("async-full-disk");
    let state = dir.join("state");
    let Some(disk) = SmallFs::mount(&state.join("async"), 1 << 20) else {
        eprintln!("skipped: cannot mount a tmpfs");
        return;
    };
    // Declared after the mount: stopped (on drop) before it is unmounted.
    let s = Server::start(&[
        "--state-dir",
        state.to_str().unwrap(),
        "--async-retry-base-ms",
        "600000",
    ]);
    create(&s, "full", &[]);
    let filler = disk.0.join("filler");
    std::fs::write(&filler, vec![0u8; 600 << 10]).unwrap();
    // Each event fails once, then waits ten minutes for its retry: it stays queued.
    let pad = "x".repeat(150 << 10);
    let payload = |n: usize| format!(r#"{{"n": {n}, "fail": true, "pad": "{pad}"}}"#);
    let mut accepted = 0;
    let refused = loop {
        assert!(accepted < 8, "the tmpfs never filled");
        let r = s.control(
            "POST",
            "/2015-03-31/functions/full/invocations",
            &[("x-amz-invocation-type", "Event")],
            payload(accepted).as_bytes(),
        );
        if r.status != 202 {
            break r;
        }
        accepted += 1;
    };
    assert_eq!(refused.status, 500, "{}", refused.text());
    assert_eq!(
        refused.header("x-amzn-errortype"),
        Some("ServiceException"),
        "{}",
        refused.text()
    );
    assert!(
        refused.text().contains("could not be stored"),
        "{}",
        refused.text()
    );
    assert!(accepted >= 1, "not even one event fit");
    // Room again: the queue takes events, and holds only those accepted.
    std::fs::remove_file(&filler).unwrap();
    assert_eq!(event(&s, "full", &payload(99)).0, 202);
    wait_for(
        Duration::from_secs(30),
        "the accepted events to be queued",
        || queued(&s, "full") == accepted as u64 + 1,
    );
    let log = logs(&s, "full");
    assert!(
        !log.contains(&format!("event-start [{accepted}]")),
        "the refused event ran"
    );
    s.assert_healthy();
}
