//! The README's quick start, followed as a new user would: the server started
//! the way `tools/run.sh` starts it (relative `--state-dir ./state`), then the
//! README's own command lines (CLI deploy, CLI invoke, curl) run by a shell in
//! the same working directory.
//!
//! Needs root, the static guest agent and the Express fixture's node_modules
//! (`tools/setup.sh`); without them the test prints why and returns.

mod common;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{fixture, temp_dir};

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Why the quick start cannot run here, if it cannot.
fn skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("the process sandbox needs root".into());
    }
    let agent = repo().join("target/x86_64-unknown-linux-gnu/release/hearth-agent");
    if !agent.is_file() {
        return Some(format!(
            "{} is missing: run tools/build-agent.sh",
            agent.display()
        ));
    }
    if !fixture("express-app/node_modules/express").is_dir() {
        return Some("run `npm ci` in tests/fixtures/express-app (tools/setup.sh does)".into());
    }
    None
}

/// The arguments `tools/run.sh` passes to `target/release/hearth` (its `exec` line).
fn run_sh_server_args() -> Vec<String> {
    let script = std::fs::read_to_string(repo().join("tools/run.sh")).expect("read tools/run.sh");
    let line = script
        .lines()
        .find_map(|l| l.trim().strip_prefix("exec target/release/hearth "))
        .expect("tools/run.sh execs target/release/hearth");
    line.split_whitespace()
        .filter(|a| *a != "\"$@\"")
        .map(String::from)
        .collect()
}

/// The command lines of the README's quick start block after "Then, in another shell:".
fn readme_quick_start_lines() -> Vec<String> {
    let readme = std::fs::read_to_string(repo().join("README.md")).expect("read README.md");
    let after = readme
        .split_once("Then, in another shell:")
        .expect("README quick start has a second shell")
        .1;
    let block = after
        .split("```")
        .nth(1)
        .expect("a code block follows 'Then, in another shell:'");
    block
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// A fresh directory laid out like the repo for the commands the quick start
/// uses: `target/release/hearth` (this build's binary) and
/// `tests/fixtures/express-app`.
fn fresh_checkout() -> PathBuf {
    let dir = temp_dir("quickstart");
    std::fs::create_dir_all(dir.join("target/release")).unwrap();
    std::os::unix::fs::symlink(
        env!("CARGO_BIN_EXE_hearth"),
        dir.join("target/release/hearth"),
    )
    .unwrap();
    std::fs::create_dir_all(dir.join("tests/fixtures")).unwrap();
    std::os::unix::fs::symlink(
        fixture("express-app"),
        dir.join("tests/fixtures/express-app"),
    )
    .unwrap();
    dir
}

/// The server, killed on drop.
struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.0.id() as libc::pid_t, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// Runs one README line with bash in `cwd`; returns stdout (panics on failure).
fn sh(cwd: &Path, server: &str, line: &str) -> String {
    let out = Command::new("bash")
        .args(["-c", line])
        .current_dir(cwd)
        .env("HEARTH_SERVER", server)
        .env_remove("HEARTH_ADMIN_TOKEN")
        .output()
        .expect("run bash");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "`{line}` failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn the_readme_quick_start_works_as_written() {
    skip_if!(skip_reason());
    let dir = fresh_checkout();
    // `bash tools/run.sh` itself would first run tools/setup.sh, i.e. a release
    // build (minutes, and it would wait for the build lock cargo holds while
    // tests run). So this runs what run.sh then execs, with its exact
    // arguments read from the script (the relative `--state-dir ./state`
    // included), from a fresh working directory. Only the port differs: an
    // ephemeral one, so parallel test runs cannot collide on 3000; the README's
    // lines below get the chosen address the same way (HEARTH_SERVER for the
    // CLI, the URL rewritten for curl).
    let args = run_sh_server_args();
    assert!(
        args.windows(2).any(|w| w == ["--state-dir", "./state"]),
        "{args:?}"
    );
    let mut child = Command::new("target/release/hearth")
        .args(&args)
        .args(["--listen", "127.0.0.1:0"])
        .current_dir(&dir)
        .env(
            "HEARTH_AGENT",
            repo().join("target/x86_64-unknown-linux-gnu/release/hearth-agent"),
        )
        .env_remove("HEARTH_ADMIN_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the server");
    let stdout = child.stdout.take().unwrap();
    let server = Serve(child);
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(a) = line.strip_prefix("hearth: listening on http://") {
                let _ = tx.send(a.trim().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server reports its address");

    let lines = readme_quick_start_lines();
    assert_eq!(lines.len(), 3, "deploy, invoke, curl: {lines:?}");
    assert!(lines[0].starts_with("target/release/hearth deploy tests/fixtures/express-app"));
    let deployed: serde_json::Value =
        serde_json::from_str(&sh(&dir, &addr, &lines[0])).expect("deploy prints JSON");
    let id = deployed["functionId"]
        .as_str()
        .expect("functionId")
        .to_string();

    let want = serde_json::json!({"message": "Hello, John Doe"});
    let have_curl = Command::new("curl").arg("--version").output().is_ok();
    for line in &lines[1..] {
        if line.starts_with("curl ") && !have_curl {
            eprintln!("curl is not installed: its line is checked as raw HTTP below only");
            continue;
        }
        let line = line
            .replace("<functionId>", &id)
            .replace("127.0.0.1:3000", &addr);
        let out = sh(&dir, &addr, &line);
        let got: serde_json::Value = serde_json::from_str(out.trim())
            .unwrap_or_else(|e| panic!("`{line}` printed {out:?}: {e}"));
        assert_eq!(got, want, "`{line}`");
    }
    // What the curl line sends, as raw HTTP.
    let body = br#"{"name":"John Doe"}"#;
    let r = common::Client::connect(addr.parse().unwrap()).request(
        "POST",
        &format!("/f/{id}/greet"),
        &[("content-type", "application/json")],
        body,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json(), want);
    // The relative state dir is where the user expects it.
    assert!(dir
        .join("state/functions")
        .join(&id)
        .join("meta.json")
        .is_file());
    drop(server);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn doctor_reports_the_default_state_dir_as_an_absolute_path() {
    let dir = temp_dir("doctor");
    let out = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .arg("doctor")
        .current_dir(&dir)
        .output()
        .expect("run hearth doctor");
    let text = String::from_utf8_lossy(&out.stdout);
    let Some(line) = text
        .lines()
        .find(|l| l.trim_start().starts_with("guest images"))
    else {
        eprintln!("skipped: doctor printed no guest images line (the only one naming the state dir):\n{text}");
        return;
    };
    // The default `./state`, resolved against the working directory.
    let want = dir.join("state/cache/guest");
    assert!(
        line.contains(&want.display().to_string()),
        "{line:?} should name {}",
        want.display()
    );
    let _ = std::fs::remove_dir_all(&dir);
}
