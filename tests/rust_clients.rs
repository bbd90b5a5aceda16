//! Rust functions built with AWS's own runtime crates, `lambda_runtime` and `lambda_http`
//! (tests/fixtures/rust-lambda, versions pinned by its Cargo.lock), deployed as their users
//! deploy them: compiled to a static `bootstrap`, zipped, runtime `provided.al2023`. The
//! test builds the fixture itself (its own workspace and target directory, so the main
//! build never compiles its dependency tree; the first build takes a few minutes, later
//! ones are no-ops). Needs root and the static agent, like every sandbox test.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use common::{anon as call, deploy_ok, header_values, zip, Server};

/// Where the fixture's static binaries land.
fn fixture_bin_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/rust-lambda-fixture/x86_64-unknown-linux-gnu/release")
}

/// Builds the fixture once per test binary: `Ok(dir of binaries)`, or `Err(why)` when
/// the crates cannot be fetched here (no registry); a failing compile panics.
fn build_fixture() -> Result<PathBuf, String> {
    static BUILT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let manifest = common::fixture("rust-lambda").join("Cargo.toml");
            let t = Instant::now();
            let out = Command::new(env!("CARGO"))
                .args(["build", "--release", "--locked", "-q"])
                .args(["--target", "x86_64-unknown-linux-gnu", "--manifest-path"])
                .arg(&manifest)
                .env(
                    "CARGO_TARGET_DIR",
                    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/rust-lambda-fixture"),
                )
                // Static, as a `provided` bootstrap must be; an explicit --target keeps
                // the flag away from build scripts and proc-macros.
                .env("RUSTFLAGS", "-C target-feature=+crt-static")
                .output()
                .expect("run cargo");
            let stderr = String::from_utf8_lossy(&out.stderr);
            if !out.status.success() {
                if stderr.contains("failed to download") || stderr.contains("failed to get") {
                    return Err(format!("cannot fetch the fixture's crates: {stderr}"));
                }
                panic!("building tests/fixtures/rust-lambda failed:\n{stderr}");
            }
            eprintln!("rust-lambda fixture built in {:?}", t.elapsed());
            Ok(fixture_bin_dir())
        })
        .clone()
}

/// A zip holding `binary` as the executable `bootstrap`, as `cargo lambda` packages one.
fn bootstrap_zip(binary: &Path) -> Vec<u8> {
    let data = std::fs::read(binary).unwrap_or_else(|e| panic!("{}: {e}", binary.display()));
    zip(&[("bootstrap", &data, 0o755)])
}

/// Builds the fixture, starts a server and deploys `binary` as a `provided` function:
/// `None` (after saying why) when this host cannot run it.
fn deploy(binary: &str, query: &str) -> Option<(Server, String)> {
    if let Some(why) = common::sandbox_skip_reason() {
        eprintln!("skipped: {why}");
        return None;
    }
    let dir = match build_fixture() {
        Ok(dir) => dir,
        Err(why) => {
            eprintln!("skipped: {why}");
            return None;
        }
    };
    let s = Server::start(&[]);
    let id = deploy_ok(
        &s,
        &bootstrap_zip(&dir.join(binary)),
        &format!("runtime=provided.al2023&{query}"),
    );
    Some((s, id))
}

/// The function's log lines (JSON), once one contains `needle` (panics after a few seconds).
fn wait_log(s: &Server, id: &str, needle: &str) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let logs = s.control("GET", &format!("/functions/{id}/logs"), &[], b"");
        let lines = logs.json()["logs"].as_array().cloned().unwrap_or_default();
        if lines
            .iter()
            .any(|l| l["message"].as_str().unwrap_or("").contains(needle))
        {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "{needle:?} not in the log: {}",
            logs.text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_lambda_runtime_function_serves_function_url_requests() {
    let Some((s, id)) = deploy(
        "runtime-fn",
        "timeout_ms=1500&memory_mb=256&env=%7B%22MY_VAR%22%3A%22mine%22%7D",
    ) else {
        return;
    };
    let base = format!("/f/{id}");
    let r = call(
        &s,
        "POST",
        &format!("{base}/echo/me?x=1&y=%41"),
        &[("content-type", "text/plain"), ("cookie", "c1=v1; c2=v2")],
        b"payload",
    );
    assert_eq!(r.status, 201, "{} / {}", r.text(), s.stderr());
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(header_values(&r, "x-multi"), ["one", "two"]);
    assert_eq!(
        header_values(&r, "set-cookie"),
        ["a=1; Path=/", "b=2; HttpOnly"]
    );
    let req = r.header("x-request-id").unwrap_or("").to_string();
    assert!(!req.is_empty());
    let v = r.json();
    assert_eq!(v["path"], "/echo/me");
    assert_eq!(v["method"], "POST");
    assert_eq!(v["query"], serde_json::json!({"x": "1", "y": "A"}));
    assert_eq!(v["cookies"], serde_json::json!(["c1=v1", "c2=v2"]));
    assert_eq!(v["body"], "payload");
    assert_eq!(v["function"], id.as_str());
    assert_eq!(v["memory"], "256");
    assert!(v["arn"]
        .as_str()
        .unwrap()
        .ends_with(&format!(":function:{id}")));
    let remaining = v["remaining_ms"].as_u64().unwrap();
    assert!(remaining > 0 && remaining <= 1500, "{v}");
    // Its output, tagged with the request it was printed during.
    let lines = wait_log(&s, &id, &format!("handling {req}"));
    let line = lines
        .iter()
        .find(|l| l["message"].as_str().unwrap_or("").contains("handling"))
        .unwrap();
    assert_eq!(line["requestId"], req.as_str(), "{line}");
    wait_log(&s, &id, "rust runtime-fn init");
    // Each cold init reports its duration, as Lambda's INIT_REPORT line does.
    let lines = wait_log(&s, &id, "INIT_REPORT Init Duration: ");
    let report = lines
        .iter()
        .find(|l| {
            l["message"]
                .as_str()
                .unwrap_or("")
                .starts_with("INIT_REPORT")
        })
        .unwrap();
    assert_eq!(report["requestId"], "init", "{report}");
    let ms: f64 = report["message"].as_str().unwrap()["INIT_REPORT Init Duration: ".len()..]
        .trim_end_matches(" ms")
        .parse()
        .unwrap();
    assert!(ms > 0.0 && ms < 30_000.0, "{report}");
    let metrics = s.control("GET", "/metrics", &[], b"").text();
    let label = format!("function=\"{id}\"");
    assert!(
        common::metric_sum(&metrics, "hearth_function_cold_starts_total", &label) >= 1,
        "{metrics}"
    );

    // The environment Lambda gives a runtime.
    let env = call(&s, "GET", &format!("{base}/env"), &[], b"").json();
    for (k, want) in [
        ("AWS_LAMBDA_RUNTIME_API", "127.0.0.1:9001"),
        ("_HANDLER", "bootstrap"),
        ("LAMBDA_TASK_ROOT", "/var/task"),
        ("AWS_LAMBDA_FUNCTION_NAME", id.as_str()),
        ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "256"),
        ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
        ("AWS_LAMBDA_LOG_GROUP_NAME", &format!("/aws/lambda/{id}")),
        ("AWS_REGION", "us-east-1"),
        ("AWS_DEFAULT_REGION", "us-east-1"),
        ("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand"),
        ("TZ", ":UTC"),
        ("MY_VAR", "mine"),
    ] {
        assert_eq!(env[k], want, "{k}: {env}");
    }
    for k in [
        "LAMBDA_RUNTIME_DIR",
        "AWS_LAMBDA_LOG_STREAM_NAME",
        "AWS_EXECUTION_ENV",
        "LANG",
        "PATH",
        "LD_LIBRARY_PATH",
    ] {
        assert!(!env[k].as_str().unwrap_or("").is_empty(), "{k}: {env}");
    }

    // A base64 body from the handler arrives as raw bytes.
    let r = call(&s, "GET", &format!("{base}/bin"), &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/octet-stream"));
    assert_eq!(r.body, (0..=255u8).collect::<Vec<_>>());

    // A handler error: 502 with the error type the function's Diagnostic gave.
    let r = call(&s, "GET", &format!("{base}/error"), &[], b"");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["errorType"], "TeapotError", "{}", r.text());
    assert_eq!(r.json()["errorMessage"], "short and stout");
    // A panic: lambda_runtime catches it and reports it as an error; the instance goes on.
    let r = call(&s, "GET", &format!("{base}/panic"), &[], b"");
    assert_eq!(r.status, 502, "{}", r.text());
    let message = r.json()["errorMessage"].as_str().unwrap_or("").to_string();
    assert!(
        message.contains("deliberate panic in the handler"),
        "{}",
        r.text()
    );
    assert_eq!(
        call(&s, "GET", &format!("{base}/after"), &[], b"").status,
        201
    );
    // The timeout: 504 at the deadline.
    let t = Instant::now();
    let r = call(&s, "GET", &format!("{base}/sleep"), &[], b"");
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
    // The process exiting mid-invocation: Runtime.ExitError; a fresh instance serves next.
    let r = call(&s, "GET", &format!("{base}/crash"), &[], b"");
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(r.text().contains("Runtime.ExitError"), "{}", r.text());
    assert!(
        r.text()
            .contains("Runtime exited with error: exit status 9"),
        "{}",
        r.text()
    );
    assert_eq!(call(&s, "GET", &format!("{base}/"), &[], b"").text(), "ok");
    s.assert_healthy();
}

#[test]
fn a_lambda_http_function_reads_function_url_events() {
    let Some((s, id)) = deploy("http-fn", "timeout_ms=5000") else {
        return;
    };
    let base = format!("/f/{id}");
    let r = call(
        &s,
        "POST",
        &format!("{base}/greet?name=Ann"),
        &[("content-type", "text/plain"), ("cookie", "c1=v1")],
        b"hi there",
    );
    assert_eq!(r.status, 418, "{} / {}", r.text(), s.stderr());
    assert_eq!(r.header("content-type"), Some("text/plain"));
    assert!(!r.header("x-request-id").unwrap_or("").is_empty());
    assert_eq!(
        header_values(&r, "set-cookie"),
        ["session=abc; Path=/; HttpOnly", "theme=dark"]
    );
    assert_eq!(r.text(), "POST /greet name=Ann cookie=c1=v1 body=hi there");

    // A binary request body reaches the handler as bytes (base64 in the event).
    let bytes: Vec<u8> = (0..=255u8).collect();
    let r = call(
        &s,
        "PUT",
        &format!("{base}/upload"),
        &[("content-type", "application/octet-stream")],
        &bytes,
    );
    assert_eq!(r.status, 418, "{}", r.text());
    assert!(
        r.text()
            .starts_with("PUT /upload name=nobody cookie= body=256 binary bytes"),
        "{}",
        r.text()
    );
    // A binary response body.
    let r = call(&s, "GET", &format!("{base}/bin"), &[], b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("image/png"));
    assert_eq!(r.body, bytes);
    // Errors and panics: 502 with the message; the instance keeps serving.
    let r = call(&s, "GET", &format!("{base}/error"), &[], b"");
    assert_eq!(r.status, 502, "{}", r.text());
    assert_eq!(r.json()["errorMessage"], "lambda_http handler failed");
    let r = call(&s, "GET", &format!("{base}/panic"), &[], b"");
    assert_eq!(r.status, 502, "{}", r.text());
    assert!(
        r.text().contains("deliberate panic in lambda_http"),
        "{}",
        r.text()
    );
    assert_eq!(call(&s, "GET", &format!("{base}/x"), &[], b"").status, 418);
    s.assert_healthy();
}
