//! The control plane: deploy, list, inspect, delete, logs.
//!
//! Requests arrive on a worker core and are handed to a short-lived control
//! thread (at most [`CONTROL_INFLIGHT_MAX`] at once; more → 503), because a
//! deploy unpacks archives, writes files and boots a template instance. The
//! answer goes back to the core as a message. Nothing here runs on the
//! request path of invocations.

use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::json;

use crate::config::ServeConfig;
use crate::control::archive::{self, ArchiveLimits};
use crate::control::{handler, multipart, settings};
use crate::engine::conn::ReplyTo;
use crate::engine::worker::Msg;
use crate::engine::Shared;
use crate::functions::{self, store, Function, FunctionSpec, FUNCTIONS_MAX};
use crate::http::parse::Request;
use crate::http::response::json_error;
use crate::routes::{self, Route};
use crate::sandbox::StartError;

/// Control requests handled at the same time.
pub const CONTROL_INFLIGHT_MAX: usize = 16;

/// An answer: status, content type, body.
type Answer = (u16, &'static str, Vec<u8>);

fn error(status: u16, code: &str, message: &str) -> Answer {
    (status, "application/json", json_error(code, message))
}

fn json_answer(status: u16, v: serde_json::Value) -> Answer {
    (
        status,
        "application/json",
        serde_json::to_vec_pretty(&v).expect("json"),
    )
}

/// Handle held by the engine.
pub struct Control {
    inflight: Arc<AtomicUsize>,
    admin_token: Option<String>,
    shared: OnceLock<Arc<Shared>>,
}

impl Control {
    /// A control plane for `cfg`.
    pub fn new(cfg: &ServeConfig) -> Control {
        Control {
            inflight: Arc::new(AtomicUsize::new(0)),
            admin_token: cfg.admin_token.clone(),
            shared: OnceLock::new(),
        }
    }

    /// Connects the control plane to the running server.
    pub fn start(&self, shared: Arc<Shared>) {
        functions::Registry::start_threads(&shared);
        let _ = self.shared.set(shared);
    }

    /// Queues a control request from `core`; `Err` carries a 503 body when busy.
    pub fn submit(
        &self,
        core: usize,
        to: ReplyTo,
        _peer: IpAddr,
        req: Request,
        body: Vec<u8>,
    ) -> Result<(), Vec<u8>> {
        let shared = self.shared.get().expect("control plane started").clone();
        if self.inflight.fetch_add(1, Ordering::AcqRel) >= CONTROL_INFLIGHT_MAX {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            return Err(json_error(
                "control_busy",
                "too many control requests in progress, retry later",
            ));
        }
        let inflight = self.inflight.clone();
        let token = self.admin_token.clone();
        let spawned = std::thread::Builder::new()
            .name("hearth-control".into())
            .spawn(move || {
                let (status, content_type, body) = handle(&shared, token.as_deref(), &req, &body);
                shared.send(
                    core,
                    Msg::Reply {
                        to,
                        status,
                        content_type,
                        body,
                    },
                );
                inflight.fetch_sub(1, Ordering::AcqRel);
            });
        if spawned.is_err() {
            self.inflight.fetch_sub(1, Ordering::AcqRel);
            return Err(json_error(
                "control_busy",
                "could not start a control thread",
            ));
        }
        Ok(())
    }
}

/// Compares without leaking where the first difference is.
fn constant_time_eq(given: &[u8], token: &[u8]) -> bool {
    // Time depends only on the token's length, not on where a guess goes wrong.
    let mut diff = given.len() ^ token.len();
    for (i, t) in token.iter().enumerate() {
        diff |= usize::from(given.get(i).copied().unwrap_or(0) ^ t);
    }
    diff == 0
}

fn authorised(token: Option<&str>, req: &Request) -> bool {
    let Some(token) = token else { return true };
    let given = req
        .header("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    constant_time_eq(given.trim().as_bytes(), token.as_bytes())
}

fn handle(shared: &Arc<Shared>, token: Option<&str>, req: &Request, body: &[u8]) -> Answer {
    if !authorised(token, req) {
        return error(
            401,
            "unauthorized",
            "this endpoint needs 'Authorization: Bearer <admin token>'",
        );
    }
    match routes::route(&req.method, req.path()) {
        Route::Deploy => deploy(shared, req, body),
        Route::ListFunctions => {
            let list: Vec<_> = shared
                .functions
                .all()
                .iter()
                .map(|f| summary(shared, f))
                .collect();
            json_answer(200, json!({ "functions": list }))
        }
        Route::GetFunction(id) => match shared.functions.get(id) {
            Some(f) => json_answer(200, summary(shared, &f)),
            None => not_found(id),
        },
        Route::DeleteFunction(id) => delete(shared, id),
        Route::Logs(id) => match shared.functions.get(id) {
            Some(f) => {
                let logs = f.logs.lock().unwrap();
                let lines: Vec<_> = logs.lines().collect();
                json_answer(
                    200,
                    json!({ "functionId": id, "dropped": logs.dropped, "logs": lines }),
                )
            }
            None => not_found(id),
        },
        _ => error(404, "not_found", "no such control endpoint"),
    }
}

fn not_found(id: &str) -> Answer {
    error(
        404,
        "function_not_found",
        &format!("no function with id {id}"),
    )
}

fn summary(shared: &Shared, f: &Function) -> serde_json::Value {
    let m = &f.metrics;
    let host = shared.cfg.listen;
    json!({
        "functionId": f.spec.id,
        "handler": f.spec.handler,
        "memory_mb": f.spec.memory_mb,
        "timeout_ms": f.spec.timeout_ms,
        "concurrency": f.spec.concurrency,
        "env": f.spec.env.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        "created_ms": f.spec.created_ms,
        "code_bytes": f.spec.code_bytes,
        "backend": f.spec.backend,
        "url": format!("http://{host}/f/{}", f.spec.id),
        "instances": f.instances.load(Ordering::Relaxed),
        "invocations": m.invocations.load(Ordering::Relaxed),
        "cold_starts": m.cold_starts.load(Ordering::Relaxed),
        "artifacts": shared.functions.backend.artifacts(&f.dir),
    })
}

fn deploy(shared: &Arc<Shared>, req: &Request, body: &[u8]) -> Answer {
    let started = Instant::now();
    let mut pairs = settings::parse_query(req.query());
    let content_type = req
        .header("content-type")
        .unwrap_or("")
        .to_ascii_lowercase();
    let code: &[u8] = if content_type.starts_with("multipart/form-data") {
        let Some(boundary) = multipart::boundary(req.header("content-type").unwrap_or("")) else {
            return error(
                400,
                "bad_multipart",
                "multipart/form-data without a boundary",
            );
        };
        let parts = match multipart::parse(body, &boundary) {
            Ok(p) => p,
            Err(e) => return error(400, "bad_multipart", &e.0),
        };
        let mut code = None;
        for p in parts {
            if p.name == "code" {
                code = Some(p.data);
            } else {
                pairs.push((p.name.clone(), String::from_utf8_lossy(p.data).into_owned()));
            }
        }
        match code {
            Some(c) => c,
            None => {
                return error(
                    400,
                    "missing_code",
                    "the multipart body has no 'code' field holding the zip",
                )
            }
        }
    } else if content_type.starts_with("application/zip")
        || content_type.starts_with("application/octet-stream")
        || content_type.starts_with("application/x-zip")
    {
        body
    } else {
        return error(
            415,
            "unsupported_media_type",
            "send the zip as multipart/form-data field 'code' or as an application/zip body",
        );
    };
    let settings = match settings::parse_settings(&pairs) {
        Ok(s) => s,
        Err(m) => return error(400, "bad_setting", &m),
    };
    if shared.functions.len() >= FUNCTIONS_MAX {
        return error(
            409,
            "function_limit",
            &format!("this server already holds {FUNCTIONS_MAX} functions"),
        );
    }
    let id = functions::new_id();
    let fdir = &shared.functions.functions_dir;
    let staging = match store::staging_dir(fdir, &id) {
        Ok(p) => p,
        Err(e) => {
            return error(
                500,
                "io",
                &format!("cannot create a staging directory: {e}"),
            )
        }
    };
    let result = stage(shared, &staging, &id, code, settings);
    let (spec, init_logs) = match result {
        Ok(x) => x,
        Err(a) => {
            store::remove_tree(&staging);
            return a;
        }
    };
    let dir = match store::publish(&staging, fdir, &id) {
        Ok(d) => d,
        Err(e) => {
            store::remove_tree(&staging);
            shared.functions.backend.forget(&id);
            return error(500, "io", &format!("cannot publish the function: {e}"));
        }
    };
    let f = Arc::new(Function::new(spec, dir));
    f.logs.lock().unwrap().extend_init(&init_logs);
    shared.functions.insert(f.clone());
    shared.broadcast(|| Msg::FunctionsChanged);
    let host = req
        .header("host")
        .map(str::to_string)
        .unwrap_or_else(|| shared.cfg.listen.to_string());
    eprintln!(
        "hearth: deployed {id} ({}) in {} ms",
        f.spec.handler,
        started.elapsed().as_millis()
    );
    json_answer(
        201,
        json!({
            "functionId": id,
            "status": "deployed",
            "snapshotReady": true,
            "url": format!("http://{host}/f/{id}"),
            "handler": f.spec.handler,
            "backend": f.spec.backend,
            "deploy_ms": started.elapsed().as_millis() as u64,
        }),
    )
}

/// Unpacks, checks and prepares a function in `staging`.
fn stage(
    shared: &Shared,
    staging: &Path,
    id: &str,
    code: &[u8],
    s: settings::DeploySettings,
) -> Result<(FunctionSpec, Vec<String>), Answer> {
    let code_dir = staging.join("code");
    let extracted = archive::extract_zip(code, &code_dir, &ArchiveLimits::default())
        .map_err(|e| error(e.status, e.code, &e.message))?;
    let handler = handler::resolve_handler(&code_dir, s.handler.as_deref())
        .map_err(|e| error(400, "bad_handler", &e.message))?;
    let spec = FunctionSpec {
        id: id.to_string(),
        handler,
        memory_mb: s.memory_mb,
        timeout_ms: s.timeout_ms,
        concurrency: s.concurrency,
        env: s.env,
        created_ms: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0),
        code_bytes: extracted.unpacked_bytes,
        backend: shared.functions.backend_name().to_string(),
    };
    store::write_meta(staging, &spec)
        .map_err(|e| error(500, "io", &format!("cannot write meta.json: {e}")))?;
    sync_filesystem(staging);
    let logs = shared
        .functions
        .backend
        .prepare(&spec, staging)
        .map_err(|e| match e {
            StartError::Init {
                error_type,
                message,
                logs,
            } => (
                422,
                "application/json",
                serde_json::to_vec(&json!({
                    "error": message,
                    "code": "init_error",
                    "errorType": error_type,
                    "logs": logs,
                }))
                .expect("json"),
            ),
            StartError::Sandbox(m) => error(
                503,
                "sandbox_error",
                &format!("could not start the function: {m}"),
            ),
        })?;
    Ok((spec, logs))
}

/// Flushes the staged files to disk before they are published (one syncfs
/// instead of an fsync per file of a large node_modules tree).
fn sync_filesystem(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        // SAFETY: syncfs on a descriptor we own.
        unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) };
    }
}

fn delete(shared: &Arc<Shared>, id: &str) -> Answer {
    let Some(f) = shared.functions.remove(id) else {
        return not_found(id);
    };
    shared.broadcast(|| Msg::FunctionsChanged);
    // In-flight requests finish (bounded by the function timeout), then instances go.
    let deadline =
        Instant::now() + Duration::from_millis(f.spec.timeout_ms) + Duration::from_secs(5);
    while f.instances.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    shared.functions.backend.forget(id);
    match store::trash(&shared.functions.functions_dir, id) {
        Ok(p) => store::remove_tree(&p),
        Err(e) => {
            return error(
                500,
                "io",
                &format!("function unpublished but its files remain: {e}"),
            )
        }
    }
    json_answer(200, json!({ "functionId": id, "status": "deleted" }))
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn token_compare_is_exact() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secre", b"secret"));
        assert!(!constant_time_eq(b"secrets", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
        assert!(!constant_time_eq(b"Secret", b"secret"));
    }
}
