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

use crate::control::archive::{self, ArchiveLimits};
use crate::control::{handler, multipart, settings};
use crate::engine::conn::ReplyTo;
use crate::engine::worker::Msg;
use crate::engine::Shared;
use crate::functions::budget::{self, Reservation};
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
#[derive(Default)]
pub struct Control {
    inflight: Arc<AtomicUsize>,
    shared: OnceLock<Arc<Shared>>,
}

impl Control {
    /// A control plane with no request in flight.
    pub fn new() -> Control {
        Control::default()
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
        let spawned = std::thread::Builder::new()
            .name("hearth-control".into())
            .spawn(move || {
                let (status, content_type, body) = handle(&shared, &req, &body);
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

/// Serves one control request. The engine has checked its head against
/// [`crate::control::auth::Guard`] before its body was read.
fn handle(shared: &Arc<Shared>, req: &Request, body: &[u8]) -> Answer {
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
        "runtime": f.spec.runtime.name(),
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
    let (spec, init_logs, held) = match result {
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
    let f = Arc::new(Function::new(spec, dir, shared.functions.memory.clone()));
    for r in held {
        f.hold(r);
    }
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

/// 503 for a deploy whose first instance does not fit in the memory budget.
fn memory_exhausted(shared: &Shared, memory_mb: u32) -> Answer {
    error(
        503,
        "memory_budget_exhausted",
        &format!(
            "cannot start the function's first instance: {}; delete functions or raise --instance-memory-max-mb",
            shared.functions.memory.explain(u64::from(memory_mb))
        ),
    )
}

/// 507 for a deploy that does not fit in the functions' disk budget; `why` says by how much.
fn disk_exhausted(why: &str) -> Answer {
    error(
        507,
        "insufficient_storage",
        &format!("{why}; delete functions or raise --functions-disk-max-mb"),
    )
}

/// Unpacks, checks and prepares a function in `staging`. Returns what the function
/// holds of the server's budgets (its disk space and, with a standby, its memory).
fn stage(
    shared: &Shared,
    staging: &Path,
    id: &str,
    code: &[u8],
    s: settings::DeploySettings,
) -> Result<(FunctionSpec, Vec<String>, Vec<Reservation>), Answer> {
    // The first instance (template or standby) must fit before anything is unpacked.
    let memory = shared
        .functions
        .memory
        .try_reserve(u64::from(s.memory_mb))
        .ok_or_else(|| memory_exhausted(shared, s.memory_mb))?;
    let disk = &shared.functions.disk;
    let mut limits = ArchiveLimits::default();
    let disk_bound = disk.remaining() < limits.unpacked_bytes_max;
    limits.unpacked_bytes_max = limits.unpacked_bytes_max.min(disk.remaining());
    let code_dir = staging.join("code");
    let extracted = archive::extract_zip(code, &code_dir, &limits).map_err(|e| {
        if disk_bound && e.code == "unpacked_too_large" {
            disk_exhausted(&format!(
                "the server's functions disk budget has {} of {} bytes left: {}",
                disk.remaining(),
                disk.max(),
                e.message
            ))
        } else {
            error(e.status, e.code, &e.message)
        }
    })?;
    let handler = handler::resolve(
        s.runtime,
        &*shared.functions.backend,
        &code_dir,
        s.handler.as_deref(),
    )
    .map_err(|(code, msg)| error(400, code, &msg))?;
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
        runtime: s.runtime,
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
            e => error(
                503,
                "sandbox_error",
                &format!("could not start the function: {e}"),
            ),
        })?;
    // What the function really occupies, artifacts and block rounding included.
    let on_disk = budget::disk_bytes(staging);
    let Some(disk) = disk.try_reserve(on_disk) else {
        shared.functions.backend.forget(id);
        return Err(disk_exhausted(&disk.explain(on_disk)));
    };
    let mut held = vec![disk];
    if shared.functions.backend.keeps_standby() {
        held.push(memory);
    }
    Ok((spec, logs, held))
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
        Ok(p) => {
            store::remove_tree(&p);
            f.release_held();
        }
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
