//! The real `aws` CLI against a test [`Server`]: signed runs of `aws lambda …`
//! with a throwaway environment (no config or credentials files, one attempt),
//! and the `create-function` arguments the service-API tests share.

use std::process::{Command, Output};

use super::Server;

/// Why the `aws` CLI cannot run here, if it cannot.
pub fn missing() -> Option<String> {
    let ok = Command::new("aws")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    (!ok).then(|| "the aws CLI is missing (pip install awscli)".to_string())
}

/// Runs `aws lambda <args>` against `s` in `region`, signed with `secret`.
pub fn run(s: &Server, secret: &str, region: &str, args: &[&str]) -> Output {
    Command::new("aws")
        .arg("lambda")
        .args(args)
        .args([
            "--endpoint-url",
            &format!("http://{}", s.addr),
            "--output",
            "json",
        ])
        .env("AWS_ACCESS_KEY_ID", "hearth")
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("AWS_DEFAULT_REGION", region)
        .env("AWS_CONFIG_FILE", "/nonexistent")
        .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        .env("AWS_MAX_ATTEMPTS", "1")
        .output()
        .expect("run aws")
}

/// `aws lambda …` with the admin token that must succeed; its JSON output
/// (`Null` when it prints nothing).
pub fn ok(s: &Server, region: &str, args: &[&str]) -> serde_json::Value {
    let out = run(s, s.token.as_deref().unwrap(), region, args);
    assert!(
        out.status.success(),
        "aws lambda {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.stderr()
    );
    if out.stdout.is_empty() {
        return serde_json::Value::Null;
    }
    serde_json::from_slice(&out.stdout).expect("aws prints JSON")
}

/// `aws lambda …` signed with `secret` that must fail with `error` (Lambda's
/// exception name) in its output.
pub fn fails(s: &Server, secret: &str, region: &str, args: &[&str], error: &str) {
    let out = run(s, secret, region, args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "aws lambda {args:?} succeeded");
    assert!(stderr.contains(error), "aws lambda {args:?}: {stderr}");
}

/// `create-function` arguments for a Node.js function `name` (handler
/// `index.handler`) from `zip` (a `fileb://` path), with `extra` flags before
/// the code.
pub fn create_args<'a>(name: &'a str, zip: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "create-function",
        "--function-name",
        name,
        "--runtime",
        "nodejs20.x",
        "--role",
        "r",
        "--handler",
        "index.handler",
    ];
    args.extend_from_slice(extra);
    args.extend(["--zip-file", zip]);
    args
}
