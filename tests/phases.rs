//! Phase timings end to end: the real server on a real socket with a real
//! function in the process sandbox. `X-Hearth-Timing: 1` gets a
//! `Server-Timing` header whose phases add up within the total (and only then),
//! the `/metrics` phase histograms move, and `hearth bench` aggregates the
//! headers into its phase table and JSON.
//!
//! Needs what the process backend needs (root, the static agent); without it
//! every test prints why and returns.

mod common;

use std::collections::HashMap;
use std::process::Command;

use common::{deploy_fixture, metric_sum, Response, Server};

/// Deploys the `behave` fixture and returns its id.
fn deploy_behave(s: &Server) -> String {
    deploy_fixture(s, "behave", "handler=index.handler")
}

/// The `Server-Timing` entries of `r`, ms by name, in order.
fn server_timing(r: &Response) -> Vec<(String, f64)> {
    let v = r.header("server-timing").expect("a Server-Timing header");
    v.split(',')
        .map(|e| {
            let (name, dur) = e.trim().split_once(";dur=").expect("name;dur=ms");
            (name.to_string(), dur.parse().expect("a number"))
        })
        .collect()
}

fn timed_get(s: &Server, path: &str) -> Response {
    s.connect()
        .request("GET", path, &[("x-hearth-timing", "1")], b"")
}

#[test]
fn server_timing_comes_when_asked_and_the_metrics_move() {
    require_sandbox!();
    let s = Server::start(&[]);
    let id = deploy_behave(&s);

    // The first request waits for an instance to start: an acquire.
    let first = timed_get(&s, &format!("/f/{id}/sleep?ms=1"));
    assert_eq!(first.status, 200, "{}", first.text());
    let t: HashMap<String, f64> = server_timing(&first).into_iter().collect();
    let names: Vec<String> = server_timing(&first).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["parse", "queue", "acquire", "instance", "total"]);
    assert!(t["acquire"] > 0.0, "waited for the start: {t:?}");

    // Warm ones: the handler's 30 ms are in the instance phase, and the
    // phases fit in the total. On a loaded machine the scheduler may retire
    // the instance in between (scale-in), so a start may come first; a few
    // tries find a request served warm, without an acquire.
    let mut warm_seen = false;
    for _ in 0..5 {
        let warm = timed_get(&s, &format!("/f/{id}/sleep?ms=30"));
        assert_eq!(warm.status, 200);
        let t: HashMap<String, f64> = server_timing(&warm).into_iter().collect();
        // Node's timers count in whole milliseconds of its event loop's clock
        // (truncated): 30 ms asked can end up to 1 ms sooner on hearth's clock
        // (29.6 seen in CI).
        assert!(t["instance"] >= 29.0, "{t:?}");
        let sum = t["parse"] + t["queue"] + t["acquire"] + t["instance"];
        assert!(sum <= t["total"] + 1e-9, "phases {sum} > total: {t:?}");
        assert!(t["total"] < 15_000.0, "{t:?}");
        if t["acquire"] == 0.0 {
            warm_seen = true;
            break;
        }
    }
    assert!(warm_seen, "no request was served by a warm instance");

    // Not asked, not given; "0" or another value is not asking.
    let plain = s.get(&format!("/f/{id}/sleep?ms=1"));
    assert_eq!(plain.status, 200);
    assert_eq!(plain.header("server-timing"), None);
    let zero = s.connect().request(
        "GET",
        &format!("/f/{id}/sleep?ms=1"),
        &[("x-hearth-timing", "0")],
        b"",
    );
    assert_eq!(zero.header("server-timing"), None);

    // Answers hearth gives itself have the parse phase and the total.
    let health = timed_get(&s, "/healthz");
    let names: Vec<String> = server_timing(&health).into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["parse", "total"]);

    let metrics = s.control("GET", "/metrics", &[], b"").text();
    let count = |phase: &str| {
        metric_sum(
            &metrics,
            "hearth_phase_seconds_count",
            &format!("phase=\"{phase}\""),
        )
    };
    assert!(count("acquire") >= 1, "{metrics}");
    assert!(count("instance") >= 4, "{metrics}");
    assert!(count("parse") >= 5, "{metrics}");
    assert!(count("write") >= 4, "{metrics}");
    assert_eq!(
        count("queue") + count("acquire"),
        count("instance"),
        "{metrics}"
    );
    let slow = metric_sum(
        &metrics,
        "hearth_phase_seconds_bucket",
        "phase=\"instance\",le=\"0.025\"",
    );
    assert!(
        count("instance") > slow,
        "the 30 ms answer is above the 25 ms bucket:\n{metrics}"
    );
    s.assert_healthy();
}

#[test]
fn bench_splits_latency_into_phases() {
    require_sandbox!();
    let s = Server::start(&[]);
    let id = deploy_behave(&s);
    let url = format!("http://{}/f/{id}/sleep?ms=2", s.addr);
    let bench = |extra: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args(["bench", &url, "-c", "2", "-t", "1", "--duration", "1s"])
            .args(["--warmup", "300ms", "-H", "X-Hearth-Timing: 1"])
            .args(extra)
            .output()
            .expect("run hearth bench");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let table = bench(&[]);
    for row in [
        "parse",
        "queue",
        "instance",
        "total",
        "outside",
        "mean latency",
    ] {
        assert!(table.contains(row), "no {row} row:\n{table}");
    }
    assert!(table.contains("function (instance)"), "{table}");

    let json: serde_json::Value = serde_json::from_str(&bench(&["--json"])).unwrap();
    let run = &json["runs"][0];
    let phases = run["phases"].as_array().expect("phases in the JSON");
    let phase = |name: &str| {
        phases
            .iter()
            .find(|p| p["phase"] == name)
            .unwrap_or_else(|| panic!("no {name} in {phases:?}"))
    };
    let answers = run["requests"].as_u64().unwrap();
    assert!(answers > 10, "{run}");
    assert_eq!(phase("total")["count"].as_u64(), Some(answers));
    assert!(
        phase("instance")["p50"].as_u64().unwrap() >= 2_000,
        "{phases:?}"
    );
    let mean = |name: &str| phase(name)["mean_us"].as_f64().unwrap();
    assert!(mean("instance") <= mean("total"), "{phases:?}");
    // Whatever the client saw beyond the server's total is "outside".
    let latency_mean = run["latency_us"]["mean"].as_f64().unwrap();
    let split = mean("total") + mean("outside");
    assert!(
        (split - latency_mean).abs() <= latency_mean * 0.05 + 5.0,
        "total + outside {split} vs latency {latency_mean}"
    );

    // Without the header there is no phase table.
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .args(["bench", &url, "-c", "1", "-n", "20", "--json"])
        .output()
        .unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json["runs"][0].get("phases").is_none(), "{json}");
}
