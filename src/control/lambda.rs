//! The Lambda service API (`/2015-03-31/functions…`), so the `aws` CLI, the
//! SDKs and other tools built on them manage hearth's functions unchanged
//! (`--endpoint-url http://127.0.0.1:3000`).
//!
//! Functions are named here (Lambda's `FunctionName`, or its ARN); each keeps
//! its hearth id too. A code or configuration change deploys a new function
//! under the same name: it is unpacked, initialised and snapshotted before
//! requests move to it, and the old one finishes what it has (see
//! [`plane::create`]). Answers and errors have the shapes botocore reads:
//! JSON bodies, errors as `{"Type","message","code"}` with Lambda's exception
//! names and statuses.
//!
//! Requests are signed with AWS Signature Version 4 ([`sigv4`]); which keys
//! are accepted is [`ServiceAuth`].

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::time::SystemTime;

use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::control::plane::{self, Answer, Code, Plane};
use crate::control::settings::{self, DeploySettings};
use crate::control::sigv4;
use crate::functions::names::{Alias, Index, ALIASES_PER_FUNCTION_MAX, VERSIONS_PER_FUNCTION_MAX};
use crate::functions::{Function, NameLock, Registry, ServiceInvoke};
use crate::http::parse::Request;
use crate::http::reply::Reply;
use crate::routes::LambdaOp;
use crate::spec::ServiceMeta;

/// The account id in ARNs (hearth has no accounts).
pub const ACCOUNT_ID: &str = "000000000000";
/// The region in ARNs when the request's signature names none.
pub const REGION_DEFAULT: &str = "us-east-1";
/// `ListFunctions` page size when `MaxItems` is not given, and its largest value.
pub const LIST_PAGE_DEFAULT: usize = 50;
pub const LIST_PAGE_MAX: usize = 10_000;

/// Who may use the service API.
#[derive(Clone, Debug)]
pub enum ServiceAuth {
    /// Anyone who reaches it (with `--no-admin-token`: loopback only, checked on the head).
    Open,
    /// Requests signed with this key pair (SigV4), or carrying the admin token as a bearer.
    Keys {
        access_key_id: String,
        secret_access_key: String,
        admin_token: String,
    },
}

impl ServiceAuth {
    /// Checks a request whose body has arrived.
    pub(super) fn check(&self, req: &Request, body: &[u8]) -> Result<(), Answer> {
        let ServiceAuth::Keys {
            access_key_id,
            secret_access_key,
            admin_token,
        } = self
        else {
            return Ok(());
        };
        let given = req.header("authorization").unwrap_or("");
        if let Some(token) = given.strip_prefix("Bearer ") {
            if crate::control::auth::constant_time_eq(
                token.trim().as_bytes(),
                admin_token.as_bytes(),
            ) {
                return Ok(());
            }
        }
        sigv4::verify(
            req,
            body,
            access_key_id,
            secret_access_key,
            SystemTime::now(),
        )
        .map_err(|e| lambda_error(403, "InvalidSignatureException", &e.0))
    }
}

/// A Lambda-shaped error: botocore takes the type from `code` (real Lambda
/// also sends it as `x-amzn-ErrorType`) and the text from `message`.
pub fn lambda_error(status: u16, error_type: &str, message: &str) -> Answer {
    let body = json!({ "Type": "User", "message": message, "code": error_type });
    let mut r = Reply::new(status, "application/json", body.to_string().into_bytes());
    r.headers.push((
        Cow::Borrowed("x-amzn-errortype"),
        Cow::Owned(error_type.to_string()),
    ));
    r
}

fn ok(status: u16, v: Value) -> Answer {
    Reply::new(status, "application/json", v.to_string().into_bytes())
}

/// 204, no body (`DeleteFunction`, `DryRun`, …).
pub(super) fn no_content() -> Answer {
    Reply::new(204, "application/json", Vec::new())
}

/// Serves one service API request (the head was let through by the guard).
pub(super) fn handle(plane: &Plane, op: LambdaOp<'_>, req: &Request, body: &[u8]) -> Answer {
    if let Err(a) = plane.service_auth.check(req, body) {
        return a;
    }
    let region = req
        .header("authorization")
        .and_then(|h| sigv4::parse_authorization(h).ok())
        .map(|a| a.region.to_string())
        .unwrap_or_else(|| REGION_DEFAULT.to_string());
    let cx = Cx { plane, region };
    let q = query_qualifier(req.query());
    let result = match op {
        LambdaOp::Create => cx.create(body),
        LambdaOp::List => cx.list(req.query()),
        LambdaOp::Get(n) => cx.with_q(n, &q, |f| Ok(ok(200, cx.get(&f)))),
        LambdaOp::GetConfiguration(n) => cx.with_q(n, &q, |f| Ok(ok(200, cx.configuration(&f)))),
        LambdaOp::UpdateCode(n) => cx.changing(n, |f, held| cx.update_code(&f, body, held)),
        LambdaOp::UpdateConfiguration(n) => {
            cx.changing(n, |f, held| cx.update_configuration(&f, body, held))
        }
        LambdaOp::Delete(n) => cx.delete(n, &q),
        LambdaOp::PutConcurrency(n) => cx.changing(n, |f, held| cx.put_concurrency(&f, body, held)),
        LambdaOp::GetConcurrency(n) => cx.with(n, |f| {
            Ok(ok(
                200,
                json!({ "ReservedConcurrentExecutions": f.spec.concurrency }),
            ))
        }),
        LambdaOp::PublishVersion(n) => cx.changing(n, |f, held| cx.publish_version(&f, held)),
        LambdaOp::ListVersions(n) => cx.with(n, |f| Ok(cx.list_versions(&f))),
        LambdaOp::CreateAlias(n) => cx.changing(n, |f, held| cx.create_alias(&f, body, held)),
        LambdaOp::ListAliases(n) => cx.with(n, |f| Ok(cx.list_aliases(&f))),
        LambdaOp::GetAlias(n, a) => cx.with(n, |f| cx.get_alias(&f, a)),
        LambdaOp::UpdateAlias(n, a) => cx.changing(n, |f, held| cx.update_alias(&f, a, body, held)),
        LambdaOp::DeleteAlias(n, a) => cx.changing(n, |_, held| cx.delete_alias(a, held)),
        op @ (LambdaOp::PutEventInvokeConfig(_)
        | LambdaOp::UpdateEventInvokeConfig(_)
        | LambdaOp::GetEventInvokeConfig(_)
        | LambdaOp::DeleteEventInvokeConfig(_)) => Ok(
            crate::control::lambda_event::event_invoke_config(plane, op, req, body),
        ),
        // Served on the request path by the engine (see `invoke_target`).
        LambdaOp::Invoke(_) | LambdaOp::InvokeStream(_) => {
            Err(lambda_error(500, "ServiceException", "misrouted Invoke"))
        }
    };
    result.unwrap_or_else(|a| a)
}

/// Checks an `Invoke` (signature, invocation type, payload) and finds the
/// function it names (`Qualifier` or a qualified name picks a version or an
/// alias). `DryRun` is answered here (204); `Event` (asynchronous) goes to
/// [`crate::control::lambda_event::accept`] before this.
pub(super) fn invoke_target(
    plane: &Plane,
    raw: &str,
    req: &Request,
    body: &[u8],
) -> Result<(String, ServiceInvoke), Answer> {
    plane.service_auth.check(req, body)?;
    let (name, qualifier) = function_name(raw)?;
    let qualifier = qualifier.or_else(|| query_qualifier(req.query()));
    let key = match &qualifier {
        Some(q) => format!("{name}:{q}"),
        None => name.clone(),
    };
    let not_found = || {
        lambda_error(
            404,
            "ResourceNotFoundException",
            &format!(
                "Function not found: arn:aws:lambda:{REGION_DEFAULT}:{ACCOUNT_ID}:function:{key}"
            ),
        )
    };
    let f = plane.functions.get(&key).ok_or_else(not_found)?;
    if !body.is_empty() && serde_json::from_slice::<serde::de::IgnoredAny>(body).is_err() {
        return Err(lambda_error(
            400,
            "InvalidRequestContentException",
            "Could not parse request body into json: the payload must be JSON",
        ));
    }
    match req
        .header("x-amz-invocation-type")
        .unwrap_or("RequestResponse")
    {
        "RequestResponse" => {}
        "DryRun" => return Err(no_content()),
        "Event" => {
            return Err(lambda_error(
                500,
                "ServiceException",
                "misrouted Event invocation",
            ))
        }
        other => {
            return Err(invalid(&format!(
                "X-Amz-Invocation-Type {other:?} is not one of RequestResponse, Event, DryRun"
            )))
        }
    }
    let invoke = ServiceInvoke {
        version: f
            .spec
            .service
            .version
            .map_or_else(|| "$LATEST".to_string(), |v| v.to_string()),
        tail: req
            .header("x-amz-log-type")
            .is_some_and(|t| t.eq_ignore_ascii_case("Tail")),
        ..ServiceInvoke::default()
    };
    Ok((f.spec.id.clone(), invoke))
}

/// One request's context: the plane and the region named in its signature.
struct Cx<'a> {
    plane: &'a Plane,
    region: String,
}

/// `CreateFunction`'s body (the fields hearth reads; others are ignored as
/// the real service ignores what it does not know of).
#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct FunctionInput {
    function_name: Option<String>,
    runtime: Option<String>,
    role: Option<String>,
    handler: Option<String>,
    description: Option<String>,
    timeout: Option<u64>,
    memory_size: Option<u32>,
    environment: Option<EnvironmentInput>,
    code: Option<CodeInput>,
    package_type: Option<String>,
}

impl FunctionInput {
    /// The settings given, as the deploy settings' key/value pairs (checked by
    /// [`settings::parse_settings`] like `POST /deploy`'s).
    fn setting_pairs(&self) -> Vec<(String, String)> {
        let mut pairs = Vec::new();
        let mut add = |key: &str, value: Option<String>| {
            pairs.extend(value.map(|v| (key.to_string(), v)));
        };
        add("runtime", self.runtime.clone());
        add("handler", self.handler.clone());
        add(
            "timeout_ms",
            self.timeout.map(|t| t.saturating_mul(1000).to_string()),
        );
        add("memory_mb", self.memory_size.map(|m| m.to_string()));
        add(
            "env",
            self.environment
                .as_ref()
                .map(|e| serde_json::to_string(&e.variables).expect("json")),
        );
        pairs
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct EnvironmentInput {
    variables: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct CodeInput {
    zip_file: Option<String>,
    s3_bucket: Option<String>,
    image_uri: Option<String>,
}

pub(super) fn invalid(message: &str) -> Answer {
    lambda_error(400, "InvalidParameterValueException", message)
}

pub(super) fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, Answer> {
    serde_json::from_slice(body).map_err(|e| {
        invalid(&format!(
            "the request body is not valid JSON for this operation: {e}"
        ))
    })
}

/// The zip bytes of a base64 `ZipFile`.
fn decode_zip(zip_file: Option<&str>) -> Result<Vec<u8>, Answer> {
    let text = zip_file.ok_or_else(|| {
        invalid("hearth takes code as ZipFile (base64 of a zip); S3 locations and images are not supported")
    })?;
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .map_err(|e| invalid(&format!("ZipFile is not valid base64: {e}")))
}

/// Base64 of the SHA-256 of `zip` (Lambda's `CodeSha256`).
fn code_sha256(zip: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(zip))
}

/// The name and qualifier of a `FunctionName` path parameter: a name, a
/// partial ARN (`<account>:function:<name>`) or a full ARN, each optionally
/// followed by `:<version or alias>`.
pub(super) fn function_name(raw: &str) -> Result<(String, Option<String>), Answer> {
    let decoded = percent_decode(raw);
    let mut parts: Vec<&str> = decoded.split(':').collect();
    if parts.len() >= 7 && parts[0] == "arn" {
        parts.drain(..6);
    } else if parts.len() >= 3 && parts[1] == "function" {
        parts.drain(..2);
    }
    match parts.as_slice() {
        [name] => Ok((name.to_string(), None)),
        [name, q] => Ok((name.to_string(), Some(q.to_string()))),
        _ => Err(invalid(&format!(
            "{decoded:?} is not a function name or ARN"
        ))),
    }
}

/// The `Qualifier` query parameter, if any.
pub(super) fn query_qualifier(query: &str) -> Option<String> {
    query
        .split('&')
        .filter_map(|p| p.split_once('='))
        .find(|(k, _)| *k == "Qualifier")
        .map(|(_, v)| percent_decode(v))
        .filter(|v| !v.is_empty())
}

/// Checks an alias name as Lambda does: 1–128 of letters, digits, `-`, `_`,
/// not all digits (those are versions) and not `$LATEST`.
fn check_alias_name(name: &str) -> Result<(), Answer> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        && !name.bytes().all(|b| b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(invalid(&format!(
            "alias name {name:?} is not valid: 1 to 128 letters, digits, '-' and '_', not only digits"
        )))
    }
}

fn percent_decode(s: &str) -> String {
    String::from_utf8_lossy(&sigv4::percent_decode(s)).into_owned()
}

/// Turns a hearth error answer (`{"error","code"}`) into Lambda's shape.
fn as_lambda(a: Answer) -> Answer {
    let v: Value = serde_json::from_slice(&a.body).unwrap_or(Value::Null);
    let message = v["error"].as_str().unwrap_or("request failed").to_string();
    let (status, kind) = match (a.status, v["code"].as_str().unwrap_or("")) {
        (507, _) => (400, "CodeStorageExceededException"),
        (409, _) => (409, "ResourceConflictException"),
        (413, _) => (413, "RequestTooLargeException"),
        (s @ 400..=499, _) => (
            if s == 422 { 400 } else { s.min(400) },
            "InvalidParameterValueException",
        ),
        (503, _) => (503, "ServiceException"),
        (_, _) => (500, "ServiceException"),
    };
    lambda_error(status, kind, &message)
}

impl Cx<'_> {
    fn arn(&self, name: &str) -> String {
        format!(
            "arn:aws:lambda:{}:{ACCOUNT_ID}:function:{name}",
            self.region
        )
    }

    /// The function name `raw` gives, for an operation on its `$LATEST`.
    fn unqualified(raw: &str) -> Result<String, Answer> {
        let (name, qualifier) = function_name(raw)?;
        if qualifier.as_deref().is_some_and(|q| q != "$LATEST") {
            return Err(invalid(&format!(
                "this operation takes the unqualified function name, not {raw:?}"
            )));
        }
        Ok(name)
    }

    /// Runs `op` on the `$LATEST` of the function `raw` names, or answers 404.
    fn with(
        &self,
        raw: &str,
        op: impl FnOnce(std::sync::Arc<Function>) -> Result<Answer, Answer>,
    ) -> Result<Answer, Answer> {
        // The name is decoded already: parsing it again would decode it a
        // second time, and `rv%253A1` would reach the published version 1.
        self.with_parts(&Self::unqualified(raw)?, None, op)
    }

    /// Like [`Cx::with`], for an operation that changes the function or what
    /// hangs off its name: `op` runs holding the name (see
    /// [`crate::functions::Registry::get_locked`]), on the function as the
    /// changes before it left it.
    fn changing(
        &self,
        raw: &str,
        op: impl FnOnce(std::sync::Arc<Function>, &NameLock<'_>) -> Result<Answer, Answer>,
    ) -> Result<Answer, Answer> {
        let name = Self::unqualified(raw)?;
        match self.plane.functions.get_locked(&name).map_err(name_busy)? {
            Some((f, held)) if f.spec.name.is_some() || crate::functions::valid_id(&name) => {
                op(f, &held)
            }
            _ => Err(self.not_found(&name)),
        }
    }

    fn not_found(&self, key: &str) -> Answer {
        lambda_error(
            404,
            "ResourceNotFoundException",
            &format!("Function not found: {}", self.arn(key)),
        )
    }

    /// Runs `op` on the function `raw` names, qualified in the name (an ARN's
    /// suffix) or by `query` (the `Qualifier` parameter), or answers 404.
    fn with_q(
        &self,
        raw: &str,
        query: &Option<String>,
        op: impl FnOnce(std::sync::Arc<Function>) -> Result<Answer, Answer>,
    ) -> Result<Answer, Answer> {
        let (name, qualifier) = function_name(raw)?;
        self.with_parts(&name, qualifier.as_ref().or(query.as_ref()), op)
    }

    /// Runs `op` on the function `name` (already decoded and split from any
    /// qualifier) at `qualifier`, or answers 404.
    fn with_parts(
        &self,
        name: &str,
        qualifier: Option<&String>,
        op: impl FnOnce(std::sync::Arc<Function>) -> Result<Answer, Answer>,
    ) -> Result<Answer, Answer> {
        let key = match qualifier {
            Some(q) => format!("{name}:{q}"),
            None => name.to_string(),
        };
        match self.plane.functions.get(&key) {
            Some(f) if f.spec.name.is_some() || crate::functions::valid_id(name) => op(f),
            _ => Err(self.not_found(&key)),
        }
    }

    /// `FunctionConfiguration` as the SDKs read it.
    fn configuration(&self, f: &Function) -> Value {
        let s = &f.spec;
        let name = s.name.clone().unwrap_or_else(|| s.id.clone());
        let (arn, version) = match s.service.version {
            Some(v) => (self.arn(&format!("{name}:{v}")), v.to_string()),
            None => (self.arn(&name), "$LATEST".to_string()),
        };
        let env: BTreeMap<&str, &str> = s
            .env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        json!({
            "FunctionName": name,
            "FunctionArn": arn,
            "Runtime": s.service.runtime.as_deref().unwrap_or("nodejs20.x"),
            "Role": s.service.role.as_deref().unwrap_or("arn:aws:iam::000000000000:role/hearth"),
            "Handler": s.handler,
            "CodeSize": s.code_bytes,
            "Description": s.service.description.as_deref().unwrap_or(""),
            "Timeout": s.timeout_ms.div_ceil(1000),
            "MemorySize": s.memory_mb,
            "LastModified": last_modified(s.created_ms),
            "CodeSha256": s.service.code_sha256.as_deref().unwrap_or(""),
            "Version": version,
            "Environment": { "Variables": env },
            "State": "Active",
            "LastUpdateStatus": "Successful",
            "PackageType": "Zip",
            "Architectures": ["x86_64"],
            "RevisionId": s.id,
        })
    }

    fn get(&self, f: &Function) -> Value {
        json!({
            "Configuration": self.configuration(f),
            "Code": { "RepositoryType": "hearth", "Location": "" },
            "Concurrency": { "ReservedConcurrentExecutions": f.spec.concurrency },
        })
    }

    /// Deploys under the name `held` holds and answers with the new configuration.
    fn deploy(
        &self,
        code: Code<'_>,
        settings: DeploySettings,
        service: ServiceMeta,
        status: u16,
        held: &NameLock<'_>,
    ) -> Result<Answer, Answer> {
        let f =
            plane::create(self.plane, code, settings, service, Some(held)).map_err(as_lambda)?;
        Ok(ok(status, self.configuration(&f)))
    }

    fn create(&self, body: &[u8]) -> Result<Answer, Answer> {
        let mut input: FunctionInput = parse(body)?;
        let name = input
            .function_name
            .as_deref()
            .ok_or_else(|| invalid("FunctionName is required"))?;
        let (name, qualifier) = function_name(name)?;
        if qualifier.is_some() {
            return Err(invalid("FunctionName must not carry a qualifier here"));
        }
        if input.package_type.as_deref().is_some_and(|p| p != "Zip") {
            return Err(invalid("hearth runs Zip packages only"));
        }
        let held = self.plane.functions.lock_name(&name).map_err(name_busy)?;
        if self.plane.functions.id_of(&name).is_some() {
            return Err(lambda_error(
                409,
                "ResourceConflictException",
                &format!("Function already exist: {name}"),
            ));
        }
        let code = input.code.take().unwrap_or_default();
        if code.s3_bucket.is_some() || code.image_uri.is_some() {
            return Err(invalid(
                "hearth takes code as ZipFile only (no S3 or image)",
            ));
        }
        let zip = decode_zip(code.zip_file.as_deref())?;
        let mut pairs = vec![("name".to_string(), name)];
        pairs.extend(input.setting_pairs());
        let settings = settings::parse_settings(&pairs).map_err(|m| invalid(&m))?;
        let service = ServiceMeta {
            runtime: input.runtime,
            role: input.role,
            description: input.description,
            code_sha256: Some(code_sha256(&zip)),
            version: None,
        };
        self.deploy(Code::Zip(&zip), settings, service, 201, &held)
    }

    fn list(&self, query: &str) -> Result<Answer, Answer> {
        let (mut marker, mut max) = (None, LIST_PAGE_DEFAULT);
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            match k {
                "Marker" => marker = Some(percent_decode(v)),
                "MaxItems" => {
                    max = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=LIST_PAGE_MAX).contains(n))
                        .ok_or_else(|| {
                            invalid(&format!("MaxItems must be from 1 to {LIST_PAGE_MAX}"))
                        })?
                }
                _ => {}
            }
        }
        let mut all: Vec<(String, std::sync::Arc<Function>)> = self
            .plane
            .functions
            .all()
            .into_iter()
            .filter(|f| f.spec.service.version.is_none())
            .map(|f| (f.spec.name.clone().unwrap_or_else(|| f.spec.id.clone()), f))
            .collect();
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let start = match &marker {
            Some(m) => all.partition_point(|(n, _)| n <= m),
            None => 0,
        };
        let page = &all[start..all.len().min(start + max)];
        let mut out = json!({
            "Functions": page.iter().map(|(_, f)| self.configuration(f)).collect::<Vec<_>>(),
        });
        if start + page.len() < all.len() {
            out["NextMarker"] = json!(page.last().map(|(n, _)| n.clone()));
        }
        Ok(ok(200, out))
    }

    /// The settings `f` was deployed with.
    fn settings_of(f: &Function) -> DeploySettings {
        let s = &f.spec;
        DeploySettings {
            handler: Some(s.handler.clone()),
            memory_mb: s.memory_mb,
            timeout_ms: s.timeout_ms,
            concurrency: s.concurrency,
            env: s.env.clone(),
            name: Some(s.name.clone().unwrap_or_else(|| s.id.clone())),
            runtime: s.runtime,
        }
    }

    /// A function deployed by id only gets its id as name, so that it can be replaced.
    fn replaceable(f: &Function) -> Result<(), Answer> {
        if f.spec.name.is_none() {
            return Err(lambda_error(
                409,
                "ResourceConflictException",
                &format!(
                    "function {} has no name; deploy it with a name to update it here",
                    f.spec.id
                ),
            ));
        }
        Ok(())
    }

    fn update_code(
        &self,
        f: &Function,
        body: &[u8],
        held: &NameLock<'_>,
    ) -> Result<Answer, Answer> {
        #[derive(Deserialize, Default)]
        #[serde(rename_all = "PascalCase", default)]
        struct Input {
            zip_file: Option<String>,
        }
        Self::replaceable(f)?;
        let input: Input = parse(body)?;
        let zip = decode_zip(input.zip_file.as_deref())?;
        let mut service = f.spec.service.clone();
        service.code_sha256 = Some(code_sha256(&zip));
        self.deploy(Code::Zip(&zip), Self::settings_of(f), service, 200, held)
    }

    fn update_configuration(
        &self,
        f: &Function,
        body: &[u8],
        held: &NameLock<'_>,
    ) -> Result<Answer, Answer> {
        Self::replaceable(f)?;
        let input: FunctionInput = parse(body)?;
        let mut settings = Self::settings_of(f);
        let pairs = input.setting_pairs();
        let given = settings::parse_settings(&pairs).map_err(|m| invalid(&m))?;
        for (key, _) in &pairs {
            match key.as_str() {
                "handler" => settings.handler = given.handler.clone(),
                "timeout_ms" => settings.timeout_ms = given.timeout_ms,
                "memory_mb" => settings.memory_mb = given.memory_mb,
                "env" => settings.env = given.env.clone(),
                "runtime" => settings.runtime = given.runtime,
                _ => {}
            }
        }
        let mut service = f.spec.service.clone();
        if input.runtime.is_some() {
            service.runtime = input.runtime;
        }
        if input.role.is_some() {
            service.role = input.role;
        }
        if input.description.is_some() {
            service.description = input.description;
        }
        self.deploy(Code::Copy(&f.code_dir()), settings, service, 200, held)
    }

    fn put_concurrency(
        &self,
        f: &Function,
        body: &[u8],
        held: &NameLock<'_>,
    ) -> Result<Answer, Answer> {
        #[derive(Deserialize)]
        #[serde(rename_all = "PascalCase")]
        struct Input {
            reserved_concurrent_executions: u32,
        }
        Self::replaceable(f)?;
        let input: Input = parse(body)?;
        let n = input.reserved_concurrent_executions;
        let pairs = [("concurrency".to_string(), n.to_string())];
        settings::parse_settings(&pairs)
            .map_err(|m| invalid(&format!("ReservedConcurrentExecutions: {m}")))?;
        let mut settings = Self::settings_of(f);
        settings.concurrency = n;
        plane::create(
            self.plane,
            Code::Copy(&f.code_dir()),
            settings,
            f.spec.service.clone(),
            Some(held),
        )
        .map_err(as_lambda)?;
        Ok(ok(200, json!({ "ReservedConcurrentExecutions": n })))
    }

    /// Retires unpublished functions on this thread (their in-flight
    /// requests finish), after telling the cores they are gone.
    fn retire(&self, gone: &[std::sync::Arc<Function>]) -> Result<(), Answer> {
        if gone.is_empty() {
            return Ok(());
        }
        (self.plane.changed)();
        let mut first_error = Ok(());
        for f in gone {
            if let Err(m) = plane::retire(&self.plane.functions, f) {
                first_error = first_error.and(Err(lambda_error(500, "ServiceException", &m)));
            }
        }
        first_error
    }

    /// `DeleteFunction`: without a qualifier the function, its versions and
    /// aliases; with a version, that version unless an alias routes to it.
    fn delete(&self, raw: &str, query: &Option<String>) -> Result<Answer, Answer> {
        let (name, qualifier) = function_name(raw)?;
        let qualifier = qualifier.or(query.clone()).filter(|q| q != "$LATEST");
        let not_found = || {
            lambda_error(
                404,
                "ResourceNotFoundException",
                &format!("Function not found: {}", self.arn(&name)),
            )
        };
        let functions = &self.plane.functions;
        // Held while the functions are unpublished, not while they drain.
        let (latest, held) = functions
            .get_locked(&name)
            .map_err(name_busy)?
            .filter(|(f, _)| f.spec.name.is_some())
            .ok_or_else(not_found)?;
        // The function's own name (`name` may be its id), for its version count.
        let whole = qualifier.is_none().then(|| held.name().to_string());
        let gone: Vec<_> = match qualifier {
            Some(q) if q.bytes().all(|b| b.is_ascii_digit()) => {
                let v = functions
                    .get(&format!("{name}:{q}"))
                    .ok_or_else(not_found)?;
                let users = functions.aliases_using(&name, &q);
                if !users.is_empty() {
                    return Err(lambda_error(
                        409,
                        "ResourceConflictException",
                        &format!("version {q} is used by alias(es) {}", users.join(", ")),
                    ));
                }
                let gone: Vec<_> = functions.remove(&v.spec.id, &held).into_iter().collect();
                // Its events and settings go with it: none is left for a
                // version that is gone (its number is never given again).
                if let Err(e) = functions
                    .async_events
                    .drop_qualifier(Registry::async_key(&v), &q)
                {
                    eprintln!("hearth: cannot drop the async settings of {name}:{q}: {e}");
                }
                gone
            }
            Some(q) => {
                return Err(invalid(&format!(
                    "{q:?} is an alias: delete it with DeleteAlias, or give a version"
                )))
            }
            None => {
                functions
                    .edit_aliases(&held, |_, aliases| {
                        aliases.clear();
                        Ok::<_, Answer>(())
                    })
                    .map_err(stored)??;
                // The function's own name (`name` may be its id).
                let mut gone: Vec<_> = functions
                    .versions(held.name())
                    .iter()
                    .filter_map(|v| functions.remove(&v.spec.id, &held))
                    .collect();
                gone.extend(functions.remove(&latest.spec.id, &held));
                functions.async_events.forget(held.name());
                gone
            }
        };
        drop(held);
        self.retire(&gone)?;
        if let Some(name) = whole {
            // Once its files are in the trash (see `Registry::forget_versions`).
            if let Err(e) = functions.forget_versions(&name) {
                eprintln!("hearth: cannot forget the version count of {name}: {e}");
            }
        }
        Ok(no_content())
    }

    fn publish_version(&self, f: &Function, held: &NameLock<'_>) -> Result<Answer, Answer> {
        Self::replaceable(f)?;
        let name = f.spec.name.clone().expect("checked by replaceable");
        let functions = &self.plane.functions;
        if functions.versions(&name).len() >= VERSIONS_PER_FUNCTION_MAX as usize {
            return Err(lambda_error(
                400,
                "CodeStorageExceededException",
                &format!("{name} already has {VERSIONS_PER_FUNCTION_MAX} versions"),
            ));
        }
        let next = functions.claim_version(held).map_err(|e| {
            lambda_error(
                500,
                "ServiceException",
                &format!("cannot store the version count of {name}: {e}"),
            )
        })?;
        let mut service = f.spec.service.clone();
        service.version = Some(next);
        self.deploy(
            Code::Copy(&f.code_dir()),
            Self::settings_of(f),
            service,
            201,
            held,
        )
    }

    fn list_versions(&self, f: &Function) -> Answer {
        let name = f.spec.name.clone().unwrap_or_else(|| f.spec.id.clone());
        let mut all = vec![self.configuration(f)];
        all.extend(
            self.plane
                .functions
                .versions(&name)
                .iter()
                .map(|v| self.configuration(v)),
        );
        ok(200, json!({ "Versions": all }))
    }

    fn alias_json(&self, name: &str, alias: &str, a: &Alias) -> Value {
        let mut v = json!({
            "AliasArn": self.arn(&format!("{name}:{alias}")),
            "Name": alias,
            "FunctionVersion": a.version,
            "Description": a.description,
            "RevisionId": format!("{:016x}", crate::util::random::random_u64()),
        });
        if let Some((extra, weight)) = &a.extra {
            v["RoutingConfig"] = json!({ "AdditionalVersionWeights": { extra.as_str(): weight } });
        }
        v
    }

    /// Reads `FunctionVersion`, `Description` and `RoutingConfig` onto `a`, checking them.
    fn apply_alias_input(
        index: &Index,
        name: &str,
        input: &AliasInput,
        a: &mut Alias,
    ) -> Result<(), Answer> {
        let exists = |v: &str| v == "$LATEST" || index.resolve(&format!("{name}:{v}")).is_some();
        if let Some(v) = &input.function_version {
            if !exists(v) {
                return Err(lambda_error(
                    404,
                    "ResourceNotFoundException",
                    &format!("version {v} of {name} does not exist"),
                ));
            }
            a.version = v.clone();
        }
        if let Some(d) = &input.description {
            a.description = d.clone();
        }
        if let Some(r) = &input.routing_config {
            let weights = &r.additional_version_weights;
            if weights.len() > 1 {
                return Err(invalid(
                    "RoutingConfig takes at most one additional version",
                ));
            }
            a.extra = match weights.iter().next() {
                None => None,
                Some((v, w)) => {
                    if !exists(v) || v == "$LATEST" {
                        return Err(invalid(&format!(
                            "additional version {v} does not exist (or is $LATEST)"
                        )));
                    }
                    if !(0.0..=1.0).contains(w) {
                        return Err(invalid("a routing weight must be from 0.0 to 1.0"));
                    }
                    Some((v.clone(), *w))
                }
            };
        }
        if a.extra.as_ref().is_some_and(|(v, _)| *v == a.version) {
            return Err(invalid(
                "the additional version must differ from FunctionVersion",
            ));
        }
        Ok(())
    }

    fn create_alias(
        &self,
        f: &Function,
        body: &[u8],
        held: &NameLock<'_>,
    ) -> Result<Answer, Answer> {
        Self::replaceable(f)?;
        let name = f.spec.name.clone().expect("checked");
        let input: AliasInput = parse(body)?;
        let alias = input
            .name
            .clone()
            .ok_or_else(|| invalid("Name is required"))?;
        check_alias_name(&alias)?;
        if input.function_version.is_none() {
            return Err(invalid("FunctionVersion is required"));
        }
        let a = self
            .plane
            .functions
            .edit_aliases(held, |index, aliases| {
                if aliases.contains_key(&alias) {
                    return Err(lambda_error(
                        409,
                        "ResourceConflictException",
                        &format!("Alias already exists: {alias}"),
                    ));
                }
                if aliases.len() >= ALIASES_PER_FUNCTION_MAX {
                    return Err(invalid(&format!(
                        "{name} already has {ALIASES_PER_FUNCTION_MAX} aliases"
                    )));
                }
                let mut a = Alias {
                    version: String::new(),
                    extra: None,
                    description: String::new(),
                };
                Self::apply_alias_input(index, &name, &input, &mut a)?;
                aliases.insert(alias.clone(), a.clone());
                Ok(a)
            })
            .map_err(stored)??;
        Ok(ok(201, self.alias_json(&name, &alias, &a)))
    }

    fn list_aliases(&self, f: &Function) -> Answer {
        let name = f.spec.name.clone().unwrap_or_default();
        let list: Vec<Value> = self
            .plane
            .functions
            .aliases(&name)
            .iter()
            .map(|(n, a)| self.alias_json(&name, n, a))
            .collect();
        ok(200, json!({ "Aliases": list }))
    }

    fn get_alias(&self, f: &Function, alias: &str) -> Result<Answer, Answer> {
        let name = f.spec.name.clone().unwrap_or_default();
        let aliases = self.plane.functions.aliases(&name);
        let a = aliases.get(alias).ok_or_else(|| {
            lambda_error(
                404,
                "ResourceNotFoundException",
                &format!("Alias not found: {}", self.arn(&format!("{name}:{alias}"))),
            )
        })?;
        Ok(ok(200, self.alias_json(&name, alias, a)))
    }

    fn update_alias(
        &self,
        f: &Function,
        alias: &str,
        body: &[u8],
        held: &NameLock<'_>,
    ) -> Result<Answer, Answer> {
        Self::replaceable(f)?;
        let name = f.spec.name.clone().expect("checked");
        let input: AliasInput = parse(body)?;
        let a = self
            .plane
            .functions
            .edit_aliases(held, |index, aliases| {
                let mut a = aliases.get(alias).cloned().ok_or_else(|| {
                    lambda_error(
                        404,
                        "ResourceNotFoundException",
                        &format!("Alias not found: {alias}"),
                    )
                })?;
                Self::apply_alias_input(index, &name, &input, &mut a)?;
                aliases.insert(alias.to_string(), a.clone());
                Ok(a)
            })
            .map_err(stored)??;
        Ok(ok(200, self.alias_json(&name, alias, &a)))
    }

    fn delete_alias(&self, alias: &str, held: &NameLock<'_>) -> Result<Answer, Answer> {
        let functions = &self.plane.functions;
        functions
            .edit_aliases(held, |_, aliases| {
                aliases.remove(alias);
                Ok::<_, Answer>(())
            })
            .map_err(stored)??;
        // Its events and settings go with it: an alias made anew under the
        // name must not inherit them.
        functions
            .async_events
            .drop_qualifier(held.name(), alias)
            .map_err(|e| {
                lambda_error(
                    500,
                    "ServiceException",
                    &format!("the alias is deleted, but not its async settings: {e}"),
                )
            })?;
        Ok(no_content())
    }
}

/// A failure to store aliases (nothing changed).
fn stored(e: std::io::Error) -> Answer {
    lambda_error(
        500,
        "ServiceException",
        &format!("cannot store the aliases: {e}"),
    )
}

/// `CreateAlias` / `UpdateAlias` bodies.
#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct AliasInput {
    name: Option<String>,
    function_version: Option<String>,
    description: Option<String>,
    routing_config: Option<RoutingInput>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase", default)]
struct RoutingInput {
    additional_version_weights: BTreeMap<String, f64>,
}

/// `created_ms` as Lambda's `LastModified` (`2026-11-30T18:00:00.000+0000`).
fn last_modified(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = crate::util::time::civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}+0000",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Lambda's answer while another change of the function is in progress.
pub(crate) fn name_busy(e: crate::functions::NameBusy) -> Answer {
    lambda_error(409, "ResourceConflictException", &e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_names_and_arns() {
        for (raw, name) in [
            ("my-fn", "my-fn"),
            (
                "arn%3Aaws%3Alambda%3Aus-east-1%3A000000000000%3Afunction%3Amy-fn",
                "my-fn",
            ),
            (
                "arn:aws:lambda:eu-west-1:123456789012:function:my-fn:$LATEST",
                "my-fn",
            ),
            ("123456789012:function:my-fn", "my-fn"),
        ] {
            assert_eq!(function_name(raw).unwrap().0, name, "{raw}");
        }
        assert_eq!(
            function_name("my-fn:prod").unwrap(),
            ("my-fn".to_string(), Some("prod".to_string()))
        );
        assert_eq!(
            function_name("arn:aws:lambda:eu-west-1:1:function:f:7")
                .unwrap()
                .1
                .as_deref(),
            Some("7")
        );
        assert_eq!(function_name("a:b:c:d").unwrap_err().status, 400);
        assert_eq!(
            query_qualifier("x=1&Qualifier=%24LATEST").as_deref(),
            Some("$LATEST")
        );
    }

    #[test]
    fn last_modified_is_lambdas_format() {
        assert_eq!(last_modified(0), "1970-01-01T00:00:00.000+0000");
        assert_eq!(
            last_modified(1_796_061_600_123),
            "2026-11-30T18:00:00.123+0000"
        );
        assert_eq!(
            last_modified(951_782_400_000),
            "2000-02-29T00:00:00.000+0000"
        );
    }

    #[test]
    fn hearth_errors_map_to_lambda_exceptions() {
        let map = |status, code| {
            let Reply {
                status: s, body, ..
            } = as_lambda(Reply::error(status, code, "why"));
            let v: Value = serde_json::from_slice(&body).unwrap();
            (
                s,
                v["code"].as_str().unwrap().to_string(),
                v["message"].as_str().unwrap().to_string(),
            )
        };
        assert_eq!(
            map(400, "bad_handler"),
            (400, "InvalidParameterValueException".into(), "why".into())
        );
        assert_eq!(map(422, "init_error").1, "InvalidParameterValueException");
        assert_eq!(map(413, "too_large").1, "RequestTooLargeException");
        assert_eq!(
            map(507, "insufficient_storage"),
            (400, "CodeStorageExceededException".into(), "why".into())
        );
        assert_eq!(map(503, "memory_budget_exhausted").1, "ServiceException");
    }
}
