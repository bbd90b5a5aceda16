//! The Lambda Runtime API's translations, sans-IO: routes, the environment a
//! runtime gets from HELLO, INVOKE -> the `/invocation/next` answer (the
//! function-URL event, as the Node shim's `buildEvent`, or the raw body), and
//! the runtime's posts -> RESPONSE/ERROR/INIT_ERROR metadata (as the shim's
//! `sendResult`). Whoever serves the API does the I/O.

use serde_json::{json, Map, Value};

/// Where the API listens inside the instance.
pub const LISTEN_ADDR: &str = "127.0.0.1:9001";
/// Largest response a runtime may post (Lambda's 6 MiB buffered payload).
pub const RESPONSE_BYTES_MAX: usize = 6 << 20;
/// Largest error or init-error document a runtime may post.
pub const ERROR_BYTES_MAX: usize = 1 << 20;
/// Longest error message passed on to the host (keeps metadata small).
const ERROR_MESSAGE_MAX: usize = 64 << 10;
/// Longest `errorType` passed on; longer ones are cut (a type is a short name).
const ERROR_TYPE_MAX: usize = 1 << 10;
/// Region and account used for ARNs when the function's env sets none.
const DEFAULT_REGION: &str = "us-east-1";
const ACCOUNT_ID: &str = "000000000000";

/// Which runtime speaks the API: the program the agent starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The function's own `/var/task/bootstrap` (`provided.al2023`).
    Provided,
    /// hearth's Python bootstrap (`/hearth/bootstrap.py`) under `/usr/bin/python3`.
    Python3,
}

impl Kind {
    /// From the `--runtime` flag's value.
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "provided" => Some(Kind::Provided),
            "python3" => Some(Kind::Python3),
            _ => None,
        }
    }

    /// The flag value.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Provided => "provided",
            Kind::Python3 => "python3",
        }
    }

    /// The command line of the runtime process.
    pub fn command(self, task_root: &str) -> Vec<String> {
        match self {
            Kind::Provided => vec![format!("{}/bootstrap", task_root.trim_end_matches('/'))],
            Kind::Python3 => vec!["/usr/bin/python3".into(), "/hearth/bootstrap.py".into()],
        }
    }

    /// `AWS_EXECUTION_ENV`.
    fn execution_env(self) -> &'static str {
        match self {
            Kind::Provided => "AWS_Lambda_provided.al2023",
            Kind::Python3 => "AWS_Lambda_python3",
        }
    }
}

/// What HELLO says about the function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    pub id: String,
    pub handler: String,
    pub task_root: String,
    pub memory_mb: u64,
    pub timeout_ms: u64,
    pub region: String,
    pub arn: String,
    /// The function's own environment, in order.
    pub env: Vec<(String, String)>,
}

impl Function {
    /// Reads HELLO's metadata; missing fields take the shim's defaults.
    pub fn from_hello(meta: &Value) -> Function {
        let s = |k: &str, d: &str| meta.get(k).and_then(Value::as_str).unwrap_or(d).to_string();
        let n = |k: &str, d: u64| {
            meta.get(k)
                .and_then(Value::as_f64)
                .filter(|v| *v > 0.0)
                .map_or(d, |v| v as u64)
        };
        let env: Vec<(String, String)> = match meta.get("env") {
            Some(Value::Object(m)) => m
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), text_of(v)))
                .collect(),
            _ => Vec::new(),
        };
        let lookup = |name: &str| {
            env.iter()
                .find(|(k, v)| k == name && !v.is_empty())
                .map(|(_, v)| v.clone())
        };
        let region = lookup("AWS_REGION")
            .or_else(|| lookup("AWS_DEFAULT_REGION"))
            .unwrap_or_else(|| DEFAULT_REGION.to_string());
        let id = s("function", "");
        Function {
            arn: format!("arn:aws:lambda:{region}:{ACCOUNT_ID}:function:{id}"),
            handler: s("handler", ""),
            task_root: s("task_root", "/var/task"),
            memory_mb: n("memory_mb", 128),
            timeout_ms: n("timeout_ms", 30_000),
            region,
            env,
            id,
        }
    }

    /// The runtime's environment: `inherited` (the agent's base set: LANG=C.UTF-8, HOME…), then
    /// the function's own variables, then defaults it did not set, then the
    /// identity variables it cannot override, as the Node shim does.
    pub fn environment(
        &self,
        kind: Kind,
        inherited: Vec<(String, String)>,
        log_stream: &str,
    ) -> Vec<(String, String)> {
        let mut env = inherited;
        let set = |env: &mut Vec<(String, String)>, k: &str, v: &str| {
            env.retain(|(name, _)| name != k);
            env.push((k.to_string(), v.to_string()));
        };
        for (k, v) in &self.env {
            set(&mut env, k, v);
        }
        let user = |k: &str| self.env.iter().any(|(name, _)| name == k);
        for (k, v) in [
            ("PATH", "/usr/local/bin:/usr/bin:/bin:/opt/bin"),
            ("LD_LIBRARY_PATH", "/var/task/lib:/opt/lib"),
            ("TZ", ":UTC"),
        ] {
            if !user(k) {
                set(&mut env, k, v);
            }
        }
        set(&mut env, "AWS_REGION", &self.region);
        if !user("AWS_DEFAULT_REGION") {
            set(&mut env, "AWS_DEFAULT_REGION", &self.region);
        }
        let memory = self.memory_mb.to_string();
        let log_group = format!("/aws/lambda/{}", self.id);
        for (k, v) in [
            ("AWS_LAMBDA_RUNTIME_API", LISTEN_ADDR),
            ("_HANDLER", self.handler.as_str()),
            ("LAMBDA_TASK_ROOT", self.task_root.as_str()),
            ("LAMBDA_RUNTIME_DIR", "/hearth"),
            ("AWS_LAMBDA_FUNCTION_NAME", self.id.as_str()),
            ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
            ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", memory.as_str()),
            ("AWS_LAMBDA_LOG_GROUP_NAME", log_group.as_str()),
            ("AWS_LAMBDA_LOG_STREAM_NAME", log_stream),
            ("AWS_LAMBDA_INITIALIZATION_TYPE", "on-demand"),
            ("AWS_EXECUTION_ENV", kind.execution_env()),
        ] {
            set(&mut env, k, v);
        }
        env
    }
}

/// A JSON value as the shim's `String(v)` would give it (strings unquoted).
fn text_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A Runtime API request, by method and path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Route {
    Next,
    Response(String),
    Error(String),
    InitError,
    /// A known path with the wrong method.
    MethodNotAllowed,
    NotFound,
}

/// Routes a request line.
pub fn route(method: &str, target: &str) -> Route {
    let path = target.split('?').next().unwrap_or("");
    let Some(rest) = path.strip_prefix("/2018-06-01/runtime/") else {
        return Route::NotFound;
    };
    let (want, found) = match rest {
        "invocation/next" => ("GET", Route::Next),
        "init/error" => ("POST", Route::InitError),
        _ => match rest
            .strip_prefix("invocation/")
            .and_then(|r| r.rsplit_once('/'))
        {
            Some((id, "response")) if valid_id(id) => ("POST", Route::Response(id.to_string())),
            Some((id, "error")) if valid_id(id) => ("POST", Route::Error(id.to_string())),
            _ => return Route::NotFound,
        },
    };
    if method == want {
        found
    } else {
        Route::MethodNotAllowed
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty() && !id.contains('/')
}

/// The JSON error document Lambda's API answers with.
pub fn error_doc(error_type: &str, message: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"errorMessage": message, "errorType": error_type}))
        .expect("a JSON object serialises")
}

/// One invocation as `/invocation/next` hands it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    /// The frame's request id, for the answer.
    pub frame_id: u32,
    /// `Lambda-Runtime-Aws-Request-Id`: the id in the runtime's answer paths.
    pub request_id: String,
    /// Service API invocation: no function-URL translation either way.
    pub raw: bool,
    /// The `/next` answer's headers (besides Content-Type/Length).
    pub headers: Vec<(String, String)>,
    /// The event JSON.
    pub event: Vec<u8>,
}

/// The INVOKE metadata's positional form (a JSON array, what hearth sends) as the
/// object with named fields the translation reads; None if it is not an array.
fn named_meta(meta: &Value) -> Option<Value> {
    let fields = meta.as_array()?;
    let mut named = Map::new();
    for (name, value) in hearth_protocol::INVOKE_META_FIELDS.iter().zip(fields) {
        let value = match (*name, value) {
            ("raw", v) => Value::Bool(v.as_u64() == Some(1) || v == &Value::Bool(true)),
            (_, v) => v.clone(),
        };
        named.insert((*name).to_string(), value);
    }
    Some(Value::Object(named))
}

/// Translates an INVOKE frame. `trace` is a fresh X-Ray trace id.
pub fn invocation(
    meta: &Value,
    body: &[u8],
    frame_id: u32,
    f: &Function,
    now_ms: u64,
    trace: &str,
) -> Invocation {
    let named = named_meta(meta);
    let meta = named.as_ref().unwrap_or(meta);
    let raw = meta.get("raw") == Some(&Value::Bool(true));
    let request_id = match meta.get("request_id") {
        Some(Value::String(s)) if valid_id(s) => s.clone(),
        Some(v @ Value::Number(_)) => v.to_string(),
        _ => frame_id.to_string(),
    };
    let deadline = meta
        .get("deadline_ms")
        .and_then(Value::as_f64)
        .map_or(now_ms + f.timeout_ms, |d| d as u64);
    let event = if raw {
        if body.is_empty() {
            b"null".to_vec()
        } else {
            body.to_vec()
        }
    } else {
        let ev = build_event(meta, body, &request_id, &f.id, now_ms);
        serde_json::to_vec(&ev).expect("a JSON value serialises")
    };
    let headers = vec![
        ("Lambda-Runtime-Aws-Request-Id".into(), request_id.clone()),
        ("Lambda-Runtime-Deadline-Ms".into(), deadline.to_string()),
        ("Lambda-Runtime-Invoked-Function-Arn".into(), f.arn.clone()),
        ("Lambda-Runtime-Trace-Id".into(), trace.to_string()),
    ];
    Invocation {
        frame_id,
        request_id,
        raw,
        headers,
        event,
    }
}

/// An X-Ray trace header from a time and 128 random bits.
pub fn trace_id(now_ms: u64, random: [u64; 2]) -> String {
    format!(
        "Root=1-{:08x}-{:024x};Parent={:016x};Sampled=0",
        now_ms / 1000,
        (u128::from(random[0]) << 32 | u128::from(random[1] >> 32)) & ((1u128 << 96) - 1),
        random[1]
    )
}

/// The function-URL event (API Gateway HTTP API payload 2.0), field for
/// field as the Node shim builds it.
pub fn build_event(meta: &Value, body: &[u8], request_id: &str, fn_id: &str, now_ms: u64) -> Value {
    let mut headers = Map::new();
    let mut cookies: Vec<Value> = Vec::new();
    if let Some(Value::Array(list)) = meta.get("headers") {
        for pair in list {
            let (Some(k), Some(v)) = (pair.get(0), pair.get(1)) else {
                continue;
            };
            let k = text_of(k).to_ascii_lowercase();
            let v = text_of(v);
            if k == "cookie" {
                cookies.extend(
                    v.split(';')
                        .map(str::trim)
                        .filter(|c| !c.is_empty())
                        .map(|c| Value::String(c.to_string())),
                );
            } else {
                let joined = match headers.get(&k) {
                    Some(Value::String(prev)) => format!("{prev},{v}"),
                    _ => v,
                };
                headers.insert(k, Value::String(joined));
            }
        }
    }
    let str_or = |k: &str, d: &str| match meta.get(k) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => d.to_string(),
    };
    let raw_path = str_or("path", "/");
    let raw_query = match meta.get("query") {
        Some(Value::String(s)) => s.clone(),
        _ => String::new(),
    };
    let time_epoch = meta
        .get("time_ms")
        .and_then(Value::as_u64)
        .unwrap_or(now_ms);
    let host = headers.get("host").and_then(Value::as_str).unwrap_or("");
    let mut domain = str_or("domain", host);
    if domain.is_empty() {
        domain = "localhost".into();
    }
    let header = |k: &str| headers.get(k).and_then(Value::as_str).map(str::to_string);
    let mut event = Map::new();
    event.insert("version".into(), json!("2.0"));
    event.insert("routeKey".into(), json!("$default"));
    event.insert("rawPath".into(), json!(raw_path));
    event.insert("rawQueryString".into(), json!(raw_query));
    if !cookies.is_empty() {
        event.insert("cookies".into(), Value::Array(cookies));
    }
    let user_agent = header("user-agent").unwrap_or_default();
    let content_type = header("content-type");
    event.insert("headers".into(), Value::Object(headers));
    if let Some(qs) = parse_query(&raw_query) {
        event.insert("queryStringParameters".into(), Value::Object(qs));
    }
    event.insert(
        "requestContext".into(),
        json!({
            "accountId": "anonymous",
            "apiId": fn_id,
            "domainName": domain,
            "domainPrefix": domain_prefix(&domain),
            "http": {
                "method": str_or("method", "GET"),
                "path": raw_path,
                "protocol": str_or("protocol", "HTTP/1.1"),
                "sourceIp": str_or("source_ip", ""),
                "userAgent": user_agent,
            },
            "requestId": request_id,
            "routeKey": "$default",
            "stage": "$default",
            "time": clf_time(time_epoch),
            "timeEpoch": time_epoch,
        }),
    );
    if body.is_empty() {
        event.insert("isBase64Encoded".into(), json!(false));
    } else {
        match std::str::from_utf8(body) {
            Ok(text) if is_text_type(content_type.as_deref()) => {
                event.insert("body".into(), json!(text));
                event.insert("isBase64Encoded".into(), json!(false));
            }
            _ => {
                event.insert("body".into(), json!(base64_encode(body)));
                event.insert("isBase64Encoded".into(), json!(true));
            }
        }
    }
    Value::Object(event)
}

/// Decoded query parameters, repeats joined with ','; `None` when empty.
fn parse_query(q: &str) -> Option<Map<String, Value>> {
    let mut out = Map::new();
    for part in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = part.split_once('=').unwrap_or((part, ""));
        let (k, v) = (decode_component(k), decode_component(v));
        let joined = match out.get(&k) {
            Some(Value::String(prev)) => format!("{prev},{v}"),
            _ => v,
        };
        out.insert(k, Value::String(joined));
    }
    (!out.is_empty()).then_some(out)
}

/// `+` as space and %XX escapes; a malformed escape keeps the text as sent.
fn decode_component(s: &str) -> String {
    let s = s.replace('+', " ");
    if !s.contains('%') {
        return s;
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok());
            match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                Some(v) => {
                    out.push(v);
                    i += 3;
                    continue;
                }
                None => return s,
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or(s)
}

/// Whether a request body of this content type is delivered as text.
fn is_text_type(ct: Option<&str>) -> bool {
    let Some(ct) = ct else { return false };
    let t = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    t.starts_with("text/")
        || matches!(
            t.as_str(),
            "application/json"
                | "application/xml"
                | "application/javascript"
                | "application/x-www-form-urlencoded"
        )
        || t.ends_with("+json")
        || t.ends_with("+xml")
}

/// "localhost:3000" -> "localhost", "abc.example.com" -> "abc".
fn domain_prefix(domain: &str) -> String {
    let p = domain.split('.').next().unwrap_or(domain);
    let p = if p.starts_with('[') {
        match p.find(']') {
            Some(end) => &p[..=end],
            None => p,
        }
    } else {
        p.rsplit_once(':').map_or(p, |(host, _)| host)
    };
    p.to_string()
}

/// "27/Nov/2026:01:38:38 +0000".
fn clf_time(ms: u64) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = ms / 1000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let rem = secs % 86_400;
    format!(
        "{d:02}/{}/{y}:{:02}:{:02}:{:02} +0000",
        MONTHS[(m - 1) as usize],
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 -> (year, month 1-12, day 1-31) (H. Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// Headers the host frames itself: never taken from a result.
const DROPPED_HEADERS: [&str; 4] = [
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
];

fn push_header(out: &mut Vec<Value>, name: &str, value: &Value) {
    let n = name.to_ascii_lowercase();
    if DROPPED_HEADERS.contains(&n.as_str()) {
        return;
    }
    match value {
        Value::Null => {}
        Value::Array(items) => {
            for v in items.iter().filter(|v| !v.is_null()) {
                out.push(json!([n, text_of(v)]));
            }
        }
        v => out.push(json!([n, text_of(v)])),
    }
}

/// A RESPONSE frame's metadata and body.
pub type Answer = (Vec<u8>, Vec<u8>);

/// What a posted response becomes. Raw invocations pass through as JSON;
/// otherwise the function-URL rules: an object with `statusCode` gives the
/// status, headers, multi-value headers, cookies and body (base64-decoded
/// when `isBase64Encoded`); anything else is a 200 `application/json` body.
pub fn translate_response(posted: &[u8], raw: bool) -> Result<Answer, String> {
    let json_200 = || {
        let meta = json!({"status": 200, "headers": [["content-type", "application/json"]]});
        serde_json::to_vec(&meta).expect("a JSON value serialises")
    };
    let body = if posted.is_empty() {
        &b"null"[..]
    } else {
        posted
    };
    if raw {
        return Ok((json_200(), body.to_vec()));
    }
    let result: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        // Not JSON: delivered as the body, as Lambda does with a bare string.
        Err(_) => return Ok((json_200(), body.to_vec())),
    };
    let Value::Object(obj) = &result else {
        return Ok((json_200(), body.to_vec()));
    };
    let Some(code) = obj.get("statusCode") else {
        return Ok((json_200(), body.to_vec()));
    };
    let status = match code {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|s| s.fract() == 0.0 && (100.0..=999.0).contains(s))
    .ok_or_else(|| format!("invalid statusCode {code}"))? as u16;
    let mut headers = Vec::new();
    let multi = match obj.get("multiValueHeaders") {
        Some(Value::Object(m)) => Some(m),
        _ => None,
    };
    let in_multi = |k: &str| multi.is_some_and(|m| m.keys().any(|n| n.eq_ignore_ascii_case(k)));
    if let Some(Value::Object(h)) = obj.get("headers") {
        for (k, v) in h {
            if !in_multi(k) {
                push_header(&mut headers, k, v);
            }
        }
    }
    if let Some(m) = multi {
        for (k, v) in m {
            push_header(&mut headers, k, v);
        }
    }
    if let Some(Value::Array(cookies)) = obj.get("cookies") {
        for c in cookies.iter().filter(|c| !c.is_null()) {
            headers.push(json!(["set-cookie", text_of(c)]));
        }
    }
    let out_body = match obj.get("body") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) if obj.get("isBase64Encoded") == Some(&Value::Bool(true)) => {
            base64_decode(s).ok_or("body is not valid base64 (isBase64Encoded is true)")?
        }
        Some(Value::String(s)) => s.clone().into_bytes(),
        Some(v @ (Value::Object(_) | Value::Array(_))) => v.to_string().into_bytes(),
        Some(v) => text_of(v).into_bytes(),
    };
    let meta = json!({"status": status, "headers": headers});
    Ok((
        serde_json::to_vec(&meta).expect("a JSON value serialises"),
        out_body,
    ))
}

/// Content type of a streamed response that opens with an HTTP prelude:
/// `{"statusCode","headers","cookies"}` JSON, then [`PRELUDE_END`], then the body.
pub const HTTP_INTEGRATION_TYPE: &str = "application/vnd.awslambda.http-integration-response";
/// What ends the HTTP prelude of a streamed response.
pub const PRELUDE_END: [u8; 8] = [0; 8];
/// Longest HTTP prelude accepted.
pub const PRELUDE_BYTES_MAX: usize = 64 << 10;

/// STREAM_HEAD metadata for a streamed response: from its HTTP `prelude`
/// when it has one (status 200 unless it says otherwise), else 200 with the
/// posted `content_type` (`application/octet-stream` when none).
pub fn stream_head_meta(
    content_type: Option<&str>,
    prelude: Option<&[u8]>,
) -> Result<Vec<u8>, String> {
    let Some(prelude) = prelude else {
        let ct = content_type.unwrap_or("application/octet-stream");
        let meta = json!({"status": 200, "headers": [["content-type", ct]]});
        return Ok(serde_json::to_vec(&meta).expect("a JSON value serialises"));
    };
    let mut doc: Value = match serde_json::from_slice(prelude) {
        Ok(v @ Value::Object(_)) => v,
        _ => return Err("the HTTP prelude is not a JSON object".into()),
    };
    if doc.get("statusCode").is_none() {
        doc["statusCode"] = json!(200);
    }
    doc.as_object_mut().expect("an object").remove("body");
    let (meta, _) = translate_response(doc.to_string().as_bytes(), false)?;
    Ok(meta)
}

/// STREAM_END metadata from a streamed response's trailers: the error named
/// by `Lambda-Runtime-Function-Error-Type` (details in `-Error-Body`, base64
/// of the error document), else `{}`.
pub fn stream_end_meta(trailers: &[(String, String)], with_trace: bool) -> Vec<u8> {
    let field = |name: &str| {
        trailers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    };
    match field("lambda-runtime-function-error-type") {
        None => b"{}".to_vec(),
        Some(error_type) => {
            let body = field("lambda-runtime-function-error-body")
                .and_then(base64_decode)
                .unwrap_or_default();
            error_meta(&body, Some(error_type), with_trace)
        }
    }
}

/// ERROR / INIT_ERROR metadata from a posted error document. A body that is
/// not a JSON object is the message; the type then comes from the
/// `Lambda-Runtime-Function-Error-Type` header, else `Unhandled`. With
/// `with_trace`, `stackTrace` goes along as `trace` (raw invocations).
pub fn error_meta(posted: &[u8], header_type: Option<&str>, with_trace: bool) -> Vec<u8> {
    let doc: Option<Map<String, Value>> = match serde_json::from_slice(posted) {
        Ok(Value::Object(m)) => Some(m),
        _ => None,
    };
    let field = |k: &str| {
        doc.as_ref()
            .and_then(|d| d.get(k))
            .filter(|v| !v.is_null())
            .map(text_of)
    };
    let mut error_type = field("errorType")
        .or_else(|| header_type.map(str::to_string))
        .unwrap_or_else(|| "Unhandled".into());
    truncate_at_char(&mut error_type, ERROR_TYPE_MAX);
    let mut message = match &doc {
        Some(_) => field("errorMessage").unwrap_or_default(),
        None => String::from_utf8_lossy(posted).into_owned(),
    };
    truncate_at_char(&mut message, ERROR_MESSAGE_MAX);
    let mut meta = json!({"errorType": error_type, "errorMessage": message});
    if with_trace {
        if let Some(Value::Array(trace)) = doc.as_ref().and_then(|d| d.get("stackTrace")) {
            meta["trace"] = Value::Array(trace.iter().take(100).cloned().collect());
        }
    }
    let bytes = serde_json::to_vec(&meta).expect("a JSON value serialises");
    if bytes.len() <= hearth_protocol::META_BYTES_MAX {
        return bytes;
    }
    // Only the trace can take it over the frame limit (the type and message are
    // cut above, and escaping at most sextuples them): it goes.
    if let Some(m) = meta.as_object_mut() {
        m.remove("trace");
    }
    serde_json::to_vec(&meta).expect("a JSON value serialises")
}

/// Cuts `s` to at most `max` bytes, at a character boundary.
fn truncate_at_char(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// "2026-11-30T18:40:00.123Z".
pub fn iso_time(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, b)| acc | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(B64[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Standard or URL-safe base64, padding optional, whitespace ignored.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    let (mut acc, mut bits) = (0u32, 0u32);
    let mut padded = false;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => {
                padded = true;
                continue;
            }
            b' ' | b'\n' | b'\r' | b'\t' => continue,
            _ => return None,
        };
        if padded {
            return None;
        }
        acc = acc << 6 | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    (bits < 6).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Value {
        json!({"function": "fn1", "handler": "app.handler", "task_root": "/var/task",
               "memory_mb": 256, "timeout_ms": 3000, "env": {"AWS_REGION": "eu-west-1", "A": "1", "N": 5}})
    }

    #[test]
    fn routes_follow_the_api() {
        assert_eq!(
            route("GET", "/2018-06-01/runtime/invocation/next"),
            Route::Next
        );
        assert_eq!(
            route("POST", "/2018-06-01/runtime/invocation/abc-1/response"),
            Route::Response("abc-1".into())
        );
        assert_eq!(
            route("POST", "/2018-06-01/runtime/invocation/x/error"),
            Route::Error("x".into())
        );
        assert_eq!(
            route("POST", "/2018-06-01/runtime/init/error"),
            Route::InitError
        );
        assert_eq!(
            route("POST", "/2018-06-01/runtime/invocation/next"),
            Route::MethodNotAllowed
        );
        assert_eq!(
            route("GET", "/2018-06-01/runtime/invocation/x/response"),
            Route::MethodNotAllowed
        );
        for p in [
            "/",
            "/2018-06-01/runtime/invocation//response",
            "/2018-06-01/runtime/invocation/a/b/response",
            "/2020-01-01/runtime/invocation/next",
        ] {
            assert_eq!(route("POST", p), Route::NotFound, "{p}");
        }
    }

    #[test]
    fn hello_gives_the_function_and_its_environment() {
        let f = Function::from_hello(&hello());
        assert_eq!(f.arn, "arn:aws:lambda:eu-west-1:000000000000:function:fn1");
        assert_eq!((f.memory_mb, f.timeout_ms), (256, 3000));
        let env = f.environment(
            Kind::Python3,
            vec![
                ("PATH".into(), "/usr/bin".into()),
                ("HOME".into(), "/tmp".into()),
            ],
            "stream",
        );
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("AWS_LAMBDA_RUNTIME_API"), Some("127.0.0.1:9001"));
        assert_eq!(get("_HANDLER"), Some("app.handler"));
        assert_eq!(get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE"), Some("256"));
        assert_eq!(get("AWS_DEFAULT_REGION"), Some("eu-west-1"));
        assert_eq!(get("N"), Some("5"));
        assert_eq!(get("HOME"), Some("/tmp"));
        assert_eq!(get("PATH"), Some("/usr/local/bin:/usr/bin:/bin:/opt/bin"));
        assert_eq!(get("AWS_EXECUTION_ENV"), Some("AWS_Lambda_python3"));
        assert_eq!(env.iter().filter(|(k, _)| k == "PATH").count(), 1);
    }

    #[test]
    fn positional_invoke_metadata_reads_as_the_named_form() {
        let f = Function::from_hello(&hello());
        let headers = json!([["host", "h:1"], ["content-type", "text/plain"]]);
        let named = json!({"method": "POST", "path": "/p", "query": "a=1", "headers": headers,
            "source_ip": "10.0.0.1", "protocol": "HTTP/1.0", "request_id": "req-2",
            "time_ms": 1764466718000u64, "domain": "d.example", "deadline_ms": 1764466721000u64});
        let positional = json!([
            "POST",
            "/p",
            "a=1",
            headers,
            "10.0.0.1",
            "HTTP/1.0",
            "req-2",
            1764466718000u64,
            "d.example",
            0,
            1764466721000u64
        ]);
        let a = invocation(&named, b"x", 7, &f, 1, "T");
        let b = invocation(&positional, b"x", 7, &f, 1, "T");
        assert_eq!((a.event, a.headers), (b.event, b.headers));
        let ev: Value =
            serde_json::from_slice(&invocation(&positional, b"x", 7, &f, 1, "T").event).unwrap();
        assert_eq!(ev["requestContext"]["http"]["protocol"], "HTTP/1.0");
        assert_eq!(ev["requestContext"]["domainName"], "d.example");
        // raw 1: the body is the event, as with "raw": true.
        let mut raw = positional.clone();
        raw[9] = json!(1);
        assert_eq!(
            invocation(&raw, b"{\"k\":1}", 7, &f, 1, "T").event,
            b"{\"k\":1}"
        );
    }

    #[test]
    fn invoke_becomes_a_function_url_event() {
        let f = Function::from_hello(&hello());
        let meta = json!({"method": "POST", "path": "/a b", "query": "x=1&x=2&y=%41+b&z",
            "headers": [["Host", "h.example.com:8080"], ["cookie", "a=1; b=2"], ["x-r", "1"], ["x-r", "2"],
                        ["content-type", "text/plain"], ["user-agent", "ua"]],
            "source_ip": "10.0.0.1", "request_id": "req-1", "time_ms": 1764466718000u64, "deadline_ms": 1764466721000u64});
        let inv = invocation(&meta, "héllo".as_bytes(), 7, &f, 1, "T");
        assert_eq!(inv.request_id, "req-1");
        assert!(inv
            .headers
            .contains(&("Lambda-Runtime-Deadline-Ms".into(), "1764466721000".into())));
        assert!(inv
            .headers
            .contains(&("Lambda-Runtime-Invoked-Function-Arn".into(), f.arn.clone())));
        let ev: Value = serde_json::from_slice(&inv.event).unwrap();
        assert_eq!(ev["rawPath"], "/a b");
        assert_eq!(ev["cookies"], json!(["a=1", "b=2"]));
        assert_eq!(ev["headers"]["x-r"], "1,2");
        assert_eq!(
            ev["queryStringParameters"],
            json!({"x": "1,2", "y": "A b", "z": ""})
        );
        assert_eq!(ev["requestContext"]["domainPrefix"], "h");
        assert_eq!(ev["requestContext"]["http"]["method"], "POST");
        assert_eq!(ev["requestContext"]["time"], "30/Nov/2025:01:38:38 +0000");
        assert_eq!(ev["body"], "héllo");
        assert_eq!(ev["isBase64Encoded"], false);

        let bin = invocation(&json!({"headers": []}), &[0, 255, 1], 9, &f, 1000, "T");
        let ev: Value = serde_json::from_slice(&bin.event).unwrap();
        assert_eq!(bin.request_id, "9");
        assert_eq!(ev["body"], "AP8B");
        assert_eq!(ev["isBase64Encoded"], true);
        assert_eq!(ev["rawPath"], "/");
        assert!(bin
            .headers
            .contains(&("Lambda-Runtime-Deadline-Ms".into(), "4000".into())));

        let raw = invocation(
            &json!({"raw": true, "request_id": "r"}),
            br#"{"k":1}"#,
            3,
            &f,
            0,
            "T",
        );
        assert!(raw.raw);
        assert_eq!(raw.event, br#"{"k":1}"#);
    }

    #[test]
    fn results_translate_as_the_shim_does() {
        let (meta, body) = translate_response(
            br#"{"statusCode": 201, "headers": {"X-A": "1", "Content-Length": "9", "Set": "h"},
                 "multiValueHeaders": {"set": ["m1", "m2"]}, "cookies": ["c=1", "d=2"],
                 "body": "AAEC", "isBase64Encoded": true}"#,
            false,
        )
        .unwrap();
        let meta: Value = serde_json::from_slice(&meta).unwrap();
        assert_eq!(meta["status"], 201);
        assert_eq!(
            meta["headers"],
            json!([
                ["x-a", "1"],
                ["set", "m1"],
                ["set", "m2"],
                ["set-cookie", "c=1"],
                ["set-cookie", "d=2"]
            ])
        );
        assert_eq!(body, vec![0, 1, 2]);

        let (meta, body) =
            translate_response(br#"{"statusCode":"404","body":{"a":1}}"#, false).unwrap();
        assert_eq!(
            serde_json::from_slice::<Value>(&meta).unwrap()["status"],
            404
        );
        assert_eq!(body, br#"{"a":1}"#);

        for plain in [
            &br#"{"hello":"world"}"#[..],
            b"[1,2]",
            b"\"text\"",
            b"not json",
        ] {
            let (meta, body) = translate_response(plain, false).unwrap();
            let meta: Value = serde_json::from_slice(&meta).unwrap();
            assert_eq!(
                meta,
                json!({"status": 200, "headers": [["content-type", "application/json"]]})
            );
            assert_eq!(body, plain);
        }
        assert_eq!(translate_response(b"", false).unwrap().1, b"null");
        assert!(translate_response(br#"{"statusCode": 42}"#, false).is_err());
        assert!(translate_response(br#"{"statusCode": null}"#, false).is_err());
        assert!(translate_response(
            br#"{"statusCode":200,"body":"!!","isBase64Encoded":true}"#,
            false
        )
        .is_err());
        let (_, body) = translate_response(br#"{"statusCode": 200}"#, true).unwrap();
        assert_eq!(body, br#"{"statusCode": 200}"#);
    }

    #[test]
    fn error_metadata_stays_within_the_frame_limit() {
        // A long type is cut; a stack trace that would take the metadata over
        // the frame limit is dropped (the host would refuse the frame).
        let long_type = format!(r#"{{"errorType":"{}"}}"#, "T".repeat(ERROR_BYTES_MAX - 20));
        let meta = error_meta(long_type.as_bytes(), None, true);
        let m: Value = serde_json::from_slice(&meta).unwrap();
        assert_eq!(m["errorType"].as_str().unwrap().len(), ERROR_TYPE_MAX);
        // A document just under the posting limit, nearly all trace, and a long
        // type from the header: together just over the frame limit.
        let frame_len = (ERROR_BYTES_MAX - 100) / 100 - 3;
        let frame = format!("\"{}\"", "f".repeat(frame_len));
        let doc = format!(
            r#"{{"errorMessage":"m","stackTrace":[{}]}}"#,
            vec![frame; 100].join(",")
        );
        assert!(doc.len() < ERROR_BYTES_MAX);
        let header_type = "T".repeat(5000);
        let cut_type = &header_type[..ERROR_TYPE_MAX];
        let with_trace = json!({"errorType": cut_type, "errorMessage": "m",
            "trace": serde_json::from_str::<Value>(&doc).unwrap()["stackTrace"]});
        assert!(with_trace.to_string().len() > hearth_protocol::META_BYTES_MAX);
        let meta = error_meta(doc.as_bytes(), Some(&header_type), true);
        assert!(
            meta.len() <= hearth_protocol::META_BYTES_MAX,
            "{}",
            meta.len()
        );
        let m: Value = serde_json::from_slice(&meta).unwrap();
        assert_eq!(m, json!({"errorType": cut_type, "errorMessage": "m"}));
    }

    #[test]
    fn errors_carry_type_and_message() {
        let m: Value = serde_json::from_slice(&error_meta(
            br#"{"errorMessage":"boom","errorType":"ValueError","stackTrace":["a","b"]}"#,
            Some("Other"),
            false,
        ))
        .unwrap();
        assert_eq!(
            m,
            json!({"errorType": "ValueError", "errorMessage": "boom"})
        );
        let m: Value = serde_json::from_slice(&error_meta(
            br#"{"errorMessage":"x","stackTrace":["a"]}"#,
            None,
            true,
        ))
        .unwrap();
        assert_eq!(
            m,
            json!({"errorType": "Unhandled", "errorMessage": "x", "trace": ["a"]})
        );
        let m: Value =
            serde_json::from_slice(&error_meta(b"plain text", Some("Runtime.Custom"), false))
                .unwrap();
        assert_eq!(
            m,
            json!({"errorType": "Runtime.Custom", "errorMessage": "plain text"})
        );
    }

    #[test]
    fn base64_round_trips() {
        for n in 0..40usize {
            let data: Vec<u8> = (0..n).map(|i| (i * 37 + 11) as u8).collect();
            assert_eq!(base64_decode(&base64_encode(&data)).unwrap(), data);
        }
        assert_eq!(base64_encode(b"hello"), "aGVsbG8=");
        assert_eq!(base64_decode("aGVsbG8").unwrap(), b"hello");
        assert_eq!(base64_decode("aGV s\nbG8=").unwrap(), b"hello");
        assert!(base64_decode("aGVsbG8=x").is_none());
        assert!(base64_decode("a").is_none());
        assert!(base64_decode("a*").is_none());
    }

    #[test]
    fn iso_times() {
        assert_eq!(iso_time(1_764_466_718_123), "2025-11-30T01:38:38.123Z");
        assert_eq!(iso_time(0), "1970-01-01T00:00:00.000Z");
    }

    #[test]
    fn trace_ids_have_lambdas_shape() {
        let t = trace_id(1_700_000_000_123, [u64::MAX, 0x1234]);
        assert!(t.starts_with("Root=1-6553f100-"), "{t}");
        let root = t.split(';').next().unwrap();
        assert_eq!(root.len(), "Root=1-".len() + 8 + 1 + 24);
        assert!(t.ends_with(";Parent=0000000000001234;Sampled=0"));
    }
}
