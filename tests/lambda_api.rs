//! The Lambda service API driven by the real `aws` CLI and boto3 (the
//! clients nobody here wrote), against the real server on the process
//! backend: create, get, list with paging, configuration and code updates
//! without downtime, concurrency, delete, signatures right, wrong and absent.
//!
//! Needs root and the static agent (the process backend) and `aws` + `boto3`
//! (`tools/setup.sh` installs them); without them each test prints why and
//! returns.

mod common;

use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use common::aws::{self, create_args};
use common::{zip_fixture, Server};
use sha2::{Digest, Sha256};

/// Why the real clients cannot run here, if they cannot.
fn clients_missing() -> Option<String> {
    if let Some(why) = aws::missing() {
        return Some(why);
    }
    let boto = Command::new("python3")
        .args(["-c", "import boto3"])
        .output();
    if !boto.is_ok_and(|o| o.status.success()) {
        return Some("boto3 is missing (pip install boto3)".into());
    }
    None
}

macro_rules! require_clients {
    () => {
        require_sandbox!();
        skip_if!(clients_missing());
    };
}

/// The region the CLI signs for in these tests (it shows in ARNs).
const REGION: &str = "eu-west-1";

fn aws_ok(s: &Server, args: &[&str]) -> serde_json::Value {
    aws::ok(s, REGION, args)
}

fn aws_err(s: &Server, secret: &str, args: &[&str], error: &str) {
    aws::fails(s, secret, REGION, args, error)
}

/// Runs a boto3 script with `client` bound to a Lambda client for `s` (and `secret` to its key).
fn boto3(s: &Server, secret: &str, script: &str) -> Output {
    let prelude = format!(
        "import boto3, json, sys\nfrom botocore.config import Config\n\
         secret = {secret:?}\n\
         client = boto3.client('lambda', endpoint_url='http://{}', region_name='us-east-1', \
         aws_access_key_id='hearth', aws_secret_access_key=secret, \
         config=Config(retries={{'max_attempts': 1}}))\n",
        s.addr
    );
    Command::new("python3")
        .args(["-c", &format!("{prelude}{script}")])
        .output()
        .expect("run python3")
}

/// Runs a boto3 script that prints one JSON value; returns it (fails on a failed run).
fn boto3_json(s: &Server, secret: &str, script: &str) -> serde_json::Value {
    let out = boto3(s, secret, script);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn write_zip(s: &Server, name: &str) -> (String, Vec<u8>) {
    let zip = zip_fixture(name);
    let path = s.dir.join(format!("{name}.zip"));
    std::fs::write(&path, &zip).unwrap();
    (format!("fileb://{}", path.display()), zip)
}

#[test]
fn the_aws_cli_manages_functions_by_name() {
    require_clients!();
    let s = Server::start(&[]);
    let (plain, zip) = write_zip(&s, "plain");
    let created = aws_ok(
        &s,
        &[
            "create-function",
            "--function-name",
            "greet",
            "--runtime",
            "nodejs20.x",
            "--role",
            "arn:aws:iam::123456789012:role/test",
            "--handler",
            "index.handler",
            "--timeout",
            "10",
            "--memory-size",
            "256",
            "--environment",
            "Variables={GREETING=hi}",
            "--zip-file",
            &plain,
        ],
    );
    assert_eq!(created["FunctionName"], "greet");
    assert_eq!(
        created["FunctionArn"],
        "arn:aws:lambda:eu-west-1:000000000000:function:greet"
    );
    assert_eq!(created["Runtime"], "nodejs20.x");
    assert_eq!(created["Role"], "arn:aws:iam::123456789012:role/test");
    assert_eq!(
        (created["Timeout"].as_u64(), created["MemorySize"].as_u64()),
        (Some(10), Some(256))
    );
    assert_eq!(created["Environment"]["Variables"]["GREETING"], "hi");
    assert_eq!(
        created["CodeSha256"],
        base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&zip))
    );
    assert_eq!(created["State"], "Active");

    // The name serves invocations like the id.
    let r = s.get("/f/greet/hello");
    assert_eq!(r.status, 200, "{}", r.text());
    let id = created["RevisionId"].as_str().unwrap().to_string();
    assert_eq!(s.get(&format!("/f/{id}/hello")).status, 200);

    aws_err(
        &s,
        s.token.as_deref().unwrap(),
        &create_args("greet", &plain, &[]),
        "ResourceConflictException",
    );
    aws_err(
        &s,
        s.token.as_deref().unwrap(),
        &create_args("bad name", &plain, &[]),
        "InvalidParameterValueException",
    );

    let got = aws_ok(&s, &["get-function", "--function-name", "greet"]);
    assert_eq!(got["Configuration"]["Handler"], "index.handler");
    let by_arn = aws_ok(
        &s,
        &[
            "get-function-configuration",
            "--function-name",
            "arn:aws:lambda:eu-west-1:000000000000:function:greet",
        ],
    );
    assert_eq!(by_arn["FunctionName"], "greet");
    let listed = aws_ok(&s, &["list-functions"]);
    let names: Vec<_> = listed["Functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["FunctionName"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(names, ["greet"]);

    // A configuration change deploys anew under the name.
    let updated = aws_ok(
        &s,
        &[
            "update-function-configuration",
            "--function-name",
            "greet",
            "--timeout",
            "20",
        ],
    );
    assert_eq!(updated["Timeout"], 20);
    assert_eq!(updated["MemorySize"], 256, "unchanged settings are kept");
    assert_ne!(updated["RevisionId"], id.as_str());
    assert_eq!(s.get("/f/greet/hello").status, 200);
    let concurrency = aws_ok(
        &s,
        &[
            "put-function-concurrency",
            "--function-name",
            "greet",
            "--reserved-concurrent-executions",
            "3",
        ],
    );
    assert_eq!(concurrency["ReservedConcurrentExecutions"], 3);

    aws_ok(&s, &["delete-function", "--function-name", "greet"]);
    aws_err(
        &s,
        s.token.as_deref().unwrap(),
        &["get-function", "--function-name", "greet"],
        "ResourceNotFoundException",
    );
    assert_eq!(s.get("/f/greet/hello").status, 404);
    s.assert_healthy();
}

#[test]
fn code_updates_under_load_fail_no_request() {
    require_clients!();
    let s = Server::start(&[]);
    let (plain, _) = write_zip(&s, "plain");
    let (behave, _) = write_zip(&s, "behave");
    aws_ok(&s, &create_args("live", &plain, &[]));
    let stop = Arc::new(AtomicBool::new(false));
    let (served, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let load: Vec<_> = (0..3)
        .map(|_| {
            let (stop, served, failed) = (stop.clone(), served.clone(), failed.clone());
            let addr = s.addr;
            std::thread::spawn(move || {
                let mut c = common::Client::connect(addr);
                while !stop.load(Ordering::Relaxed) {
                    let r = c.request("GET", "/f/live/whoami", &[], b"");
                    if r.status == 200 {
                        served.fetch_add(1, Ordering::Relaxed);
                    } else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("failed: {} {}", r.status, r.text());
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    aws_ok(
        &s,
        &[
            "update-function-code",
            "--function-name",
            "live",
            "--zip-file",
            &behave,
        ],
    );
    // The new code answers /whoami with its call count (the old echoes).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let r = s.get("/f/live/whoami");
        if r.status == 200 && r.json().get("calls").is_some() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still the old code: {}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    for t in load {
        t.join().unwrap();
    }
    let (served, failed) = (
        served.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    eprintln!("served {served}, failed {failed} across the update");
    assert!(served > 20, "served {served}");
    assert_eq!(failed, 0, "{}", s.stderr());
}

#[test]
fn signatures_are_checked_and_boto3_pages_the_list() {
    require_clients!();
    let s = Server::start(&[]);
    let token = s.token.clone().unwrap();
    let (plain, _) = write_zip(&s, "plain");
    for name in ["a-fn", "b-fn", "c-fn"] {
        aws_ok(&s, &create_args(name, &plain, &[]));
    }
    let pages = boto3_json(
        &s,
        &token,
        "page = client.list_functions(MaxItems=2)\n\
         rest = client.list_functions(Marker=page['NextMarker'], MaxItems=2)\n\
         print(json.dumps([[f['FunctionName'] for f in p['Functions']] for p in (page, rest)] + [('NextMarker' in rest)]))",
    );
    assert_eq!(
        pages,
        serde_json::json!([["a-fn", "b-fn"], ["c-fn"], false])
    );

    // A wrong secret, an unknown key, no signature at all: refused, and the
    // server keeps serving.
    aws_err(
        &s,
        "not-the-secret",
        &["list-functions"],
        "InvalidSignatureException",
    );
    let out = boto3(
        &s,
        &token,
        "from botocore import UNSIGNED\n\
         anon = boto3.client('lambda', endpoint_url=client.meta.endpoint_url, region_name='us-east-1', config=Config(signature_version=UNSIGNED))\n\
         try:\n    anon.list_functions()\nexcept anon.exceptions.ClientError as e:\n    print(e.response['Error']['Code'], e.response['ResponseMetadata']['HTTPStatusCode'])\n",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "UnrecognizedClientException 403",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("aws")
        .args([
            "lambda",
            "list-functions",
            "--endpoint-url",
            &format!("http://{}", s.addr),
        ])
        .env("AWS_ACCESS_KEY_ID", "someone-else")
        .env("AWS_SECRET_ACCESS_KEY", &token)
        .env("AWS_DEFAULT_REGION", "us-east-1")
        .env("AWS_MAX_ATTEMPTS", "1")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("UnrecognizedClientException"));
    // The admin token as a bearer works too (for curl users).
    let r = s.control("GET", "/2015-03-31/functions/", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["Functions"].as_array().unwrap().len(), 3);
    s.assert_healthy();
}

#[test]
fn without_an_admin_token_the_service_api_is_open_on_loopback() {
    require_clients!();
    let s = Server::start(&["--no-admin-token"]);
    let out = boto3(
        &s,
        "anything",
        "print(len(client.list_functions()['Functions']))",
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "0",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn versions_and_weighted_aliases_route_and_survive_a_restart() {
    require_clients!();
    let dir = common::temp_dir("lambda-versions");
    let state = dir.join("state");
    let state_arg = state.to_str().unwrap();
    let mut s = Server::start(&["--state-dir", state_arg]);
    let (plain, _) = write_zip(&s, "plain");
    let (behave, _) = write_zip(&s, "behave");
    aws_ok(&s, &create_args("app", &plain, &[]));
    let v1 = aws_ok(&s, &["publish-version", "--function-name", "app"]);
    assert_eq!(v1["Version"], "1");
    assert_eq!(
        v1["FunctionArn"],
        "arn:aws:lambda:eu-west-1:000000000000:function:app:1"
    );
    aws_ok(
        &s,
        &[
            "update-function-code",
            "--function-name",
            "app",
            "--zip-file",
            &behave,
        ],
    );
    assert_eq!(
        aws_ok(&s, &["publish-version", "--function-name", "app"])["Version"],
        "2"
    );
    let versions: Vec<String> =
        aws_ok(&s, &["list-versions-by-function", "--function-name", "app"])["Versions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["Version"].as_str().unwrap().to_string())
            .collect();
    assert_eq!(versions, ["$LATEST", "1", "2"]);
    let got = aws_ok(
        &s,
        &[
            "get-function-configuration",
            "--function-name",
            "app",
            "--qualifier",
            "1",
        ],
    );
    assert_eq!(got["Version"], "1");

    // Each version keeps its own code: 1 echoes (plain), 2 counts (behave).
    let is_v2 = |r: &common::Response| r.json().get("calls").is_some();
    assert!(!is_v2(&s.get("/f/app:1/whoami")));
    assert!(is_v2(&s.get("/f/app:2/whoami")));

    let alias = aws_ok(
        &s,
        &[
            "create-alias",
            "--function-name",
            "app",
            "--name",
            "live",
            "--function-version",
            "1",
            "--routing-config",
            "AdditionalVersionWeights={2=0.5}",
        ],
    );
    assert_eq!(
        alias["AliasArn"],
        "arn:aws:lambda:eu-west-1:000000000000:function:app:live"
    );
    assert_eq!(alias["RoutingConfig"]["AdditionalVersionWeights"]["2"], 0.5);
    let mut c = s.connect();
    let to_v2 = (0..200)
        .filter(|_| {
            let r = c.request("GET", "/f/app:live/whoami", &[], b"");
            assert_eq!(r.status, 200, "{}", r.text());
            is_v2(&r)
        })
        .count();
    assert!(
        (60..=140).contains(&to_v2),
        "{to_v2} of 200 went to version 2 at weight 0.5"
    );

    aws_err(
        &s,
        s.token.as_deref().unwrap(),
        &[
            "delete-function",
            "--function-name",
            "app",
            "--qualifier",
            "1",
        ],
        "ResourceConflictException",
    );
    aws_err(
        &s,
        s.token.as_deref().unwrap(),
        &[
            "create-alias",
            "--function-name",
            "app",
            "--name",
            "bad",
            "--function-version",
            "9",
        ],
        "ResourceNotFoundException",
    );

    // Aliases and versions are stored: after a restart they route the same.
    let token = s.token.clone();
    s.stop();
    let s = Server::start(&["--state-dir", state_arg]);
    assert_eq!(s.token, token);
    assert!(is_v2(&s.get("/f/app:2/whoami")));
    let listed = aws_ok(&s, &["list-aliases", "--function-name", "app"]);
    assert_eq!(listed["Aliases"][0]["Name"], "live");
    aws_ok(
        &s,
        &[
            "update-alias",
            "--function-name",
            "app",
            "--name",
            "live",
            "--function-version",
            "2",
            "--routing-config",
            "AdditionalVersionWeights={}",
        ],
    );
    assert!(is_v2(&s.get("/f/app:live/whoami")));
    aws_ok(
        &s,
        &[
            "delete-function",
            "--function-name",
            "app",
            "--qualifier",
            "1",
        ],
    );
    aws_ok(&s, &["delete-function", "--function-name", "app"]);
    assert_eq!(s.get("/f/app:2/whoami").status, 404);
    assert_eq!(s.get("/f/app:live/whoami").status, 404);
    assert!(!state.join("aliases/app.json").exists());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn invoke_through_the_service_api_answers_as_lambda_does() {
    require_clients!();
    let s = Server::start(&[]);
    let token = s.token.clone().unwrap();
    let (behave, _) = write_zip(&s, "behave");
    aws_ok(&s, &create_args("inv", &behave, &["--timeout", "2"]));
    // The aws CLI: the payload is the event, the result comes back as is.
    let out_file = s.dir.join("out.json");
    let meta = aws_ok(
        &s,
        &[
            "invoke",
            "--function-name",
            "inv",
            "--payload",
            r#"{"rawPath":"/whoami"}"#,
            out_file.to_str().unwrap(),
        ],
    );
    assert_eq!(meta["StatusCode"], 200, "{meta}");
    assert_eq!(meta["ExecutedVersion"], "$LATEST");
    assert!(meta.get("FunctionError").is_none(), "{meta}");
    // The fixture answers in the function-URL shape; through Invoke that
    // object is the payload itself, untranslated.
    let result: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&out_file).unwrap()).unwrap();
    assert_eq!(result["statusCode"], 200, "{result}");
    let inner: serde_json::Value = serde_json::from_str(result["body"].as_str().unwrap()).unwrap();
    assert_eq!(inner["calls"], 1, "{result}");

    let v = boto3_json(
        &s,
        &token,
        r#"
import base64
def inv(payload, **kw):
    r = client.invoke(FunctionName='inv', Payload=json.dumps(payload).encode(), **kw)
    body = r['Payload'].read()
    return {'status': r['StatusCode'], 'error': r.get('FunctionError'),
            'log': base64.b64decode(r['LogResult']).decode() if 'LogResult' in r else None,
            'version': r.get('ExecutedVersion'), 'body': json.loads(body) if body else None}
out = {}
out['log'] = inv({'rawPath': '/log', 'requestContext': {'requestId': 'r1'}}, LogType='Tail')
out['timeout'] = inv({'rawPath': '/spin'})
out['after'] = inv({'rawPath': '/whoami'})
out['dry'] = client.invoke(FunctionName='inv', InvocationType='DryRun')['StatusCode']
try:
    client.invoke(FunctionName='nope', Payload=b'{}')
except client.exceptions.ResourceNotFoundException as e:
    out['missing'] = e.response['ResponseMetadata']['HTTPStatusCode']
try:
    client.invoke(FunctionName='inv', Payload=b'{not json')
except client.exceptions.InvalidRequestContentException as e:
    out['bad'] = e.response['ResponseMetadata']['HTTPStatusCode']
print(json.dumps(out))
"#,
    );
    assert_eq!(v["log"]["status"], 200, "{v}");
    let log = v["log"]["log"].as_str().unwrap();
    assert!(
        log.contains("hello from stdout") && log.contains("hello from stderr"),
        "{log}"
    );
    assert_eq!(v["timeout"]["status"], 200);
    assert_eq!(v["timeout"]["error"], "Unhandled");
    assert_eq!(v["timeout"]["body"]["errorType"], "Sandbox.Timedout", "{v}");
    let after: serde_json::Value =
        serde_json::from_str(v["after"]["body"]["body"].as_str().unwrap()).unwrap();
    assert_eq!(
        after["calls"], 1,
        "a fresh instance replaced the timed-out one: {v}"
    );
    assert_eq!(v["dry"], 204);
    assert_eq!(v["missing"], 404);
    assert_eq!(v["bad"], 400);

    // A handler that throws: 200 with X-Amz-Function-Error and Lambda's error object.
    let (plain, _) = write_zip(&s, "plain");
    aws_ok(
        &s,
        &[
            "update-function-code",
            "--function-name",
            "inv",
            "--zip-file",
            &plain,
        ],
    );
    let out = boto3(
        &s,
        &token,
        "r = client.invoke(FunctionName='inv', Payload=b'{\"rawPath\":\"/error\"}')\n\
         print(json.dumps({'error': r.get('FunctionError'), 'body': json.loads(r['Payload'].read())}))",
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(v["error"], "Unhandled");
    assert_eq!(v["body"]["errorType"], "TypeError");
    assert_eq!(v["body"]["errorMessage"], "plain fixture failed on purpose");
    assert!(
        v["body"]["trace"][0]
            .as_str()
            .unwrap()
            .starts_with("TypeError"),
        "{v}"
    );
    s.assert_healthy();
}

/// The service API's `Runtime` chooses the runtime: a Python function created with
/// `--runtime python3.12` runs under the python3 runtime; unsupported runtimes are refused.
#[test]
fn the_runtime_field_chooses_the_runtime() {
    require_clients!();
    if !std::path::Path::new("/usr/bin/python3").is_file() {
        eprintln!("skipped: the python3 runtime needs /usr/bin/python3 on the host");
        return;
    }
    let s = Server::start(&[]);
    let py: &[u8] = b"import sys\ndef handler(event, context):\n    return {'statusCode': 200, 'body': 'python %d' % sys.version_info[0]}\n";
    let path = s.dir.join("py.zip");
    std::fs::write(&path, common::zip(&[("app.py", py, 0o644)])).unwrap();
    let zip_arg = format!("fileb://{}", path.display());
    let create = |name: &str, runtime: &str| {
        vec![
            "create-function".to_string(),
            "--function-name".into(),
            name.into(),
            "--runtime".into(),
            runtime.into(),
            "--role".into(),
            "r".into(),
            "--handler".into(),
            "app.handler".into(),
            "--zip-file".into(),
            zip_arg.clone(),
        ]
    };
    let args = create("py", "python3.12");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let created = aws_ok(&s, &args);
    assert_eq!(created["Runtime"], "python3.12");
    let r = s.get("/f/py/x");
    assert_eq!((r.status, r.text()), (200, "python 3".to_string()));
    let info = s.control("GET", "/functions", &[], b"").json();
    assert_eq!(info["functions"][0]["runtime"], "python3", "{info}");

    let args = create("java", "java21");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    aws_err(
        &s,
        s.token.as_deref().unwrap(),
        &args,
        "InvalidParameterValueException",
    );
}

/// boto3 invoking a function with reserved concurrency 1 on a two-core server from
/// sixteen threads (its connection pool keeps them open): the connections the other core
/// accepted move to the instance's core, the instance is not handed back and forth, and
/// one instance answers every invoke. (All connections on one core leave nothing to
/// move: 1 in 128 runs with eight, 1 in 32,768 with sixteen.)
#[test]
fn service_api_invokes_follow_a_single_instance_to_its_core() {
    require_clients!();
    let s = Server::start(&["--cores", "2"]);
    let token = s.token.clone().unwrap();
    let (behave, _) = write_zip(&s, "behave");
    aws_ok(&s, &create_args("one", &behave, &[]));
    let v = boto3_json(
        &s,
        &token,
        r#"
from concurrent.futures import ThreadPoolExecutor
client = boto3.client('lambda', endpoint_url=client.meta.endpoint_url, region_name='us-east-1',
    aws_access_key_id='hearth', aws_secret_access_key=secret,
    config=Config(retries={'max_attempts': 1}, max_pool_connections=16))
client.put_function_concurrency(FunctionName='one', ReservedConcurrentExecutions=1)
def inv(_):
    r = client.invoke(FunctionName='one', Payload=b'{"rawPath":"/whoami"}')
    assert r['StatusCode'] == 200 and 'FunctionError' not in r, r
    return json.loads(json.loads(r['Payload'].read())['body'])['calls']
with ThreadPoolExecutor(16) as pool:
    calls = list(pool.map(inv, range(200)))
print(json.dumps({'calls': sorted(calls)}))
"#,
    );
    let calls: Vec<u64> = serde_json::from_value(v["calls"].clone()).unwrap();
    assert_eq!(
        calls,
        (1..=200).collect::<Vec<u64>>(),
        "one instance served all"
    );
    let m = common::control(&s, "GET", "/metrics", &[], b"").text();
    let moved = common::metric_sum(&m, "hearth_function_connections_moved_total", "");
    let handovers = common::metric_sum(&m, "hearth_function_instance_handovers_total", "");
    eprintln!("{moved} connection moves, {handovers} hand-overs");
    assert!(moved >= 1, "no connection moved");
    assert!(handovers <= 4, "{handovers} hand-overs");
    s.assert_healthy();
}

#[test]
fn a_double_encoded_qualifier_does_not_reach_a_published_version() {
    let s = Server::start(&[]);
    common::deploy_fixture(&s, "plain", "name=rv");
    let r = s.control("POST", "/2015-03-31/functions/rv/versions", &[], b"{}");
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(r.json()["Version"], "1");

    // `%253A` decodes once to `%3A`, which names no function; decoding it a
    // second time would turn it into `:` and edit the published version.
    let r = s.control(
        "PUT",
        "/2015-03-31/functions/rv%253A1/configuration",
        &[],
        br#"{"Timeout":7,"Description":"mutated"}"#,
    );
    assert_eq!(r.status, 404, "{}", r.text());
    let r = s.control(
        "GET",
        "/2015-03-31/functions/rv%3A1/configuration",
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_ne!(r.json()["Timeout"], 7, "{}", r.text());
    assert_ne!(r.json()["Description"], "mutated", "{}", r.text());
    s.assert_healthy();
}

#[test]
fn a_deleted_version_number_is_never_published_again_even_after_a_restart() {
    let dir = common::temp_dir("lambda-version-numbers");
    let state = dir.join("state");
    let state_arg = state.to_str().unwrap();
    let mut s = Server::start(&["--state-dir", state_arg]);
    let publish = |s: &Server| {
        let r = s.control("POST", "/2015-03-31/functions/vn/versions", &[], b"{}");
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["Version"].as_str().unwrap().to_string()
    };
    let delete = |s: &Server, path: &str| {
        let r = s.control("DELETE", path, &[], b"");
        assert!(r.status == 200 || r.status == 204, "{}", r.text());
    };
    common::deploy_fixture(&s, "plain", "name=vn");
    for want in ["1", "2", "3"] {
        assert_eq!(publish(&s), want);
    }
    delete(&s, "/2015-03-31/functions/vn?Qualifier=3");
    assert_eq!(
        publish(&s),
        "4",
        "the deleted newest version's number came back"
    );

    delete(&s, "/2015-03-31/functions/vn?Qualifier=4");
    s.stop();
    let s = Server::start(&["--state-dir", state_arg]);
    assert_eq!(
        publish(&s),
        "5",
        "the highest number was not kept across a restart"
    );

    // A function deleted whole and made again starts from 1, as on Lambda
    // (through the service API or the control plane).
    delete(&s, "/2015-03-31/functions/vn");
    common::deploy_fixture(&s, "plain", "name=vn");
    assert_eq!(publish(&s), "1");
    assert_eq!(publish(&s), "2");
    delete(&s, "/functions/vn");
    common::deploy_fixture(&s, "plain", "name=vn");
    assert_eq!(publish(&s), "1");
    s.assert_healthy();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_delete_stopped_before_its_files_are_trashed_keeps_the_version_count() {
    let dir = common::temp_dir("lambda-version-count-delete");
    let state = dir.join("state");
    let state_arg = state.to_str().unwrap();
    let publish = |s: &Server, name: &str| {
        let path = format!("/2015-03-31/functions/{name}/versions");
        let r = s.control("POST", &path, &[], b"{}");
        assert_eq!(r.status, 201, "{}", r.text());
        r.json()["Version"].as_str().unwrap().to_string()
    };
    let mut s = Server::start(&["--state-dir", state_arg]);
    let id = common::deploy_fixture(&s, "plain", "name=vc");
    for want in ["1", "2", "3"] {
        assert_eq!(publish(&s, "vc"), want);
    }
    let r = s.control("DELETE", "/2015-03-31/functions/vc?Qualifier=3", &[], b"");
    assert_eq!(r.status, 204, "{}", r.text());
    // The whole function's delete cannot move its files into the trash (a
    // directory is in the way): on disk, as if the server died before that.
    let blocker = state.join(format!("functions/.trash-{id}/x"));
    std::fs::create_dir_all(&blocker).unwrap();
    let r = s.control("DELETE", "/functions/vc", &[], b"");
    assert_eq!(r.status, 500, "{}", r.text());
    s.stop();
    let mut s = Server::start(&["--state-dir", state_arg]);
    assert_eq!(
        s.get("/f/vc:2").status,
        200,
        "the function did not come back"
    );
    assert_eq!(
        publish(&s, "vc"),
        "4",
        "the deleted version 3's number was given again"
    );
    // The other order: the files went, the count stayed (stopped before it
    // was forgotten). A function made anew under the name starts from 1.
    s.stop();
    std::fs::write(state.join("versions/ghost"), "7\n").unwrap();
    let s = Server::start(&["--state-dir", state_arg]);
    assert!(
        !state.join("versions/ghost").exists(),
        "the count of a function that is gone was kept"
    );
    common::deploy_fixture(&s, "plain", "name=ghost");
    assert_eq!(publish(&s, "ghost"), "1");
    s.assert_healthy();
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_control_plane_does_not_delete_through_an_alias_or_under_one() {
    let s = Server::start(&[]);
    common::deploy_fixture(&s, "plain", "name=al");
    let r = s.control("POST", "/2015-03-31/functions/al/versions", &[], b"{}");
    assert_eq!(r.status, 201, "{}", r.text());
    let r = s.control(
        "POST",
        "/2015-03-31/functions/al/aliases",
        &[],
        br#"{"Name":"live","FunctionVersion":"1"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());

    // Resolving the alias would delete version 1 and leave `live` dangling.
    let r = s.control("DELETE", "/functions/al:live", &[], b"");
    assert_eq!(r.status, 400, "{}", r.text());
    r.assert_json_error("is_alias");
    let r = s.control("DELETE", "/functions/al:1", &[], b"");
    assert_eq!(r.status, 409, "{}", r.text());
    r.assert_json_error("version_in_use");
    let r = s.control(
        "GET",
        "/2015-03-31/functions/al%3Alive/configuration",
        &[],
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["Version"], "1", "{}", r.text());

    // Once no alias routes to it, the version can go.
    let r = s.control("DELETE", "/2015-03-31/functions/al/aliases/live", &[], b"");
    assert_eq!(r.status, 204, "{}", r.text());
    let r = s.control("DELETE", "/functions/al:1", &[], b"");
    assert_eq!(r.status, 200, "{}", r.text());
    let r = s.control(
        "GET",
        "/2015-03-31/functions/al%3A1/configuration",
        &[],
        b"",
    );
    assert_eq!(r.status, 404, "{}", r.text());
    s.assert_healthy();
}

#[test]
fn a_signed_request_cannot_be_replayed_with_another_body() {
    require_clients!();
    let s = Server::start(&[]);
    let token = s.token.clone().unwrap();
    common::deploy_fixture(&s, "plain", "name=sig");
    // botocore signs a request for one body; it is then sent with another,
    // with and without an X-Amz-Content-Sha256 header claiming the first.
    let statuses = boto3_json(
        &s,
        &token,
        "import hashlib, urllib.request\n\
         from botocore.auth import SigV4Auth\n\
         from botocore.awsrequest import AWSRequest\n\
         from botocore.credentials import Credentials\n\
         url = client.meta.endpoint_url + '/2015-03-31/functions/sig/configuration'\n\
         signed = b'{\"Timeout\":3}'\n\
         req = AWSRequest(method='PUT', url=url, data=signed, headers={'Content-Type': 'application/json'})\n\
         SigV4Auth(Credentials('hearth', secret), 'lambda', 'us-east-1').add_auth(req)\n\
         def send(body, extra):\n\
         \x20   h = dict(req.headers.items()); h.update(extra)\n\
         \x20   try: return urllib.request.urlopen(urllib.request.Request(url, data=body, method='PUT', headers=h)).status\n\
         \x20   except urllib.error.HTTPError as e: return e.code\n\
         evil = b'{\"Timeout\":9}'\n\
         claim = {'X-Amz-Content-Sha256': hashlib.sha256(signed).hexdigest()}\n\
         print(json.dumps([send(evil, claim), send(evil, {}), send(signed, claim), send(signed, {})]))\n",
    );
    assert_eq!(statuses, serde_json::json!([403, 403, 200, 200]));
    let r = s.control("GET", "/2015-03-31/functions/sig/configuration", &[], b"");
    assert_eq!(r.json()["Timeout"], 3, "{}", r.text());
    s.assert_healthy();
}

#[test]
fn invocations_by_name_do_not_wait_for_an_alias_being_stored() {
    require_sandbox!();
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::OpenOptionsExt;
    let s = Server::start(&[]);
    common::deploy_fixture(&s, "plain", "name=stall");
    let r = s.control(
        "POST",
        "/2015-03-31/functions/stall/aliases",
        &[],
        br#"{"Name":"live","FunctionVersion":"$LATEST"}"#,
    );
    assert_eq!(r.status, 201, "{}", r.text());
    // The next store of stall's aliases opens its temporary file, here a FIFO,
    // and waits there until something reads it: a disk that takes its time.
    let tmp = s.dir.join("state/aliases/.stall.json.tmp");
    let path = std::ffi::CString::new(tmp.as_os_str().as_bytes()).unwrap();
    // SAFETY: mkfifo with a NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
    let s = &s;
    std::thread::scope(|scope| {
        let edit = scope.spawn(|| {
            s.control(
                "PUT",
                "/2015-03-31/functions/stall/aliases/live",
                &[],
                br#"{"Description":"stuck"}"#,
            )
        });
        assert!(
            // Where a FIFO's open waits for its reader, by kernel version.
            common::wait_for_wchan(
                s.pid(),
                &["wait_for_partner", "pipe_wait", "fifo_open"],
                Duration::from_secs(5)
            ),
            "the alias store never reached its temporary file"
        );
        let (tx, rx) = std::sync::mpsc::channel();
        scope.spawn(move || {
            let _ = tx.send(s.get("/f/stall/x").status);
        });
        // The store stays stuck until the FIFO is read below, so however
        // long this waits, an invocation waiting for it would not come back.
        let by_name = rx.recv_timeout(Duration::from_secs(20));
        // The store goes on: it writes into the FIFO, cannot fsync it, and
        // changes nothing.
        let reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&tmp)
            .unwrap();
        let edit = edit.join().unwrap();
        drop(reader);
        assert_eq!(
            by_name,
            Ok(200),
            "an invocation by name waited for the alias store"
        );
        assert_eq!(edit.status, 500, "{}", edit.text());
    });
    let r = s.control("GET", "/2015-03-31/functions/stall/aliases/live", &[], b"");
    assert_eq!(r.json()["Description"], "", "{}", r.text());
    assert_eq!(s.get("/f/stall:live/x").status, 200);
    s.assert_healthy();
}

/// A zip of one Node.js handler (`index.handler`) whose module takes `ms` to
/// initialise, so a deploy of it (or of a copy) is under way that long.
fn slow_init_zip(ms: u32) -> Vec<u8> {
    let code = format!(
        "Atomics.wait(new Int32Array(new SharedArrayBuffer(4)), 0, 0, {ms});\n\
         exports.handler = async () => ({{ statusCode: 200, body: 'ok' }});\n"
    );
    common::zip(&[("index.js", code.as_bytes(), 0o644)])
}

#[test]
fn a_delete_during_a_publish_or_a_code_update_leaves_nothing_behind() {
    require_sandbox!();
    let s = Server::start(&[]);
    let zip = slow_init_zip(1500);
    let code = serde_json::json!({
        "ZipFile": base64::engine::general_purpose::STANDARD.encode(&zip)
    })
    .to_string();
    // The change, and the delete that comes while it initialises the new
    // function: the service API's and the control plane's.
    let rounds = [
        (
            "POST",
            "/2015-03-31/functions/race/versions",
            "{}",
            "/2015-03-31/functions/race",
        ),
        (
            "PUT",
            "/2015-03-31/functions/race/code",
            code.as_str(),
            "/functions/race",
        ),
    ];
    let s = &s;
    for (method, path, body, delete) in rounds {
        common::deploy_ok(s, &zip, "name=race");
        std::thread::scope(|scope| {
            let change = scope.spawn(|| s.control(method, path, &[], body.as_bytes()));
            std::thread::sleep(Duration::from_millis(500));
            let r = s.control("DELETE", delete, &[], b"");
            assert!(matches!(r.status, 200 | 204), "{delete}: {}", r.text());
            // Done before the delete (and deleted with the rest), or after it
            // (with nothing left to change).
            let r = change.join().unwrap();
            assert!(
                matches!(r.status, 200 | 201 | 404),
                "{method} {path}: {} {}",
                r.status,
                r.text()
            );
        });
        for key in ["race", "race%3A1"] {
            let r = s.control(
                "GET",
                &format!("/2015-03-31/functions/{key}/configuration"),
                &[],
                b"",
            );
            assert_eq!(r.status, 404, "{key} after {method} {path}: {}", r.text());
        }
        // A function the change replaced is removed in the background.
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !common::functions_on_disk(s).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(
            common::functions_on_disk(s),
            Vec::<String>::new(),
            "left on disk after {method} {path}"
        );
    }
    s.assert_healthy();
}
