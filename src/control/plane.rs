//! The control plane: deploy, list, inspect, delete, logs.
//!
//! Requests arrive on a worker core and are handed to a short-lived control
//! thread (at most [`CONTROL_INFLIGHT_MAX`] at once, of which at most
//! [`CONTROL_CHANGES_MAX`] changes; more → 503), because a
//! deploy unpacks archives, writes files and boots a template instance. The
//! answer goes to the callback the engine passed with the request, which
//! carries it back to the core. Nothing here runs on the request path of
//! invocations, and nothing here knows the engine: the plane holds the
//! function registry and two callbacks, so no reference cycle ties it to the
//! engine's shared state.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::control::archive::{self, ArchiveLimits};
use crate::control::lambda::{self, ServiceAuth};
use crate::control::settings::DeploySettings;
use crate::control::{handler, multipart, settings};
use crate::functions::budget::{self, Reservation};
use crate::functions::{self, store, Function, NameLock, Registry, FUNCTIONS_MAX};
use crate::http::parse::Request;
use crate::http::reply::{json_error, Reply};
use crate::routes::{self, Route};
use crate::sandbox::StartError;
use crate::spec::{FunctionSpec, ServiceMeta};
use crate::util::time::unix_time_ms;

/// Control requests handled at the same time.
pub const CONTROL_INFLIGHT_MAX: usize = 16;
/// Of those, changes (any method but GET and HEAD). A deploy or code update
/// holds its thread through the template's init (up to 10 s in a process
/// sandbox, minutes on a VM) and a change of a busy name waits up to
/// [`functions::NAME_WAIT_MAX`] for it, so changes alone could take every
/// thread; the rest stay free for reads (list, get, logs), which an operator
/// needs most when deploys hang.
pub const CONTROL_CHANGES_MAX: usize = 12;

/// An answer: the one owned reply type, as every producer uses it.
pub type Answer = Reply;

fn error(status: u16, code: &str, message: &str) -> Answer {
    Reply::error(status, code, message)
}

fn json_answer(status: u16, v: serde_json::Value) -> Answer {
    Reply::new(
        status,
        "application/json",
        serde_json::to_vec_pretty(&v).expect("json"),
    )
}

/// Called once with a control request's answer, on the control thread.
pub type Done = Box<dyn FnOnce(Answer) + Send>;

/// What a control thread works with: the functions and how to tell the cores.
pub(super) struct Plane {
    pub(super) functions: Arc<Registry>,
    /// The address the server listens on (function URLs when a request has no Host).
    pub(super) listen: SocketAddr,
    /// Tells every core that functions were deployed or deleted.
    pub(super) changed: Box<dyn Fn() + Send + Sync>,
    /// Who may use the Lambda service API.
    pub(super) service_auth: ServiceAuth,
}

/// Handle held by the engine.
#[derive(Default)]
pub struct Control {
    inflight: Arc<AtomicUsize>,
    changes: Arc<AtomicUsize>,
    plane: OnceLock<Arc<Plane>>,
}

impl Control {
    /// Checks a service API `Invoke` on the worker that received it (it runs
    /// on the request path, not on a control thread) and says which function
    /// serves it; `Err` is the answer to send instead.
    pub fn service_invoke(
        &self,
        name: &str,
        req: &Request,
        body: &[u8],
    ) -> Result<(String, crate::functions::ServiceInvoke), Reply> {
        let plane = self.plane.get().expect("control plane started");
        lambda::invoke_target(plane, name, req, body)
    }

    /// Accepts a service API `Invoke` of type `Event` on the worker that
    /// received it: checked there, stored by the async committer, answered
    /// through `done` (202 once on disk); `Err` is the answer to send now.
    pub fn service_event(
        &self,
        name: &str,
        req: &Request,
        body: Vec<u8>,
        done: Done,
    ) -> Result<(), Reply> {
        let plane = self.plane.get().expect("control plane started");
        crate::control::lambda_event::accept(plane, name, req, body, done)
    }

    /// A control plane with no request in flight.
    pub fn new() -> Control {
        Control::default()
    }

    /// Connects the control plane to the running server: its functions, its
    /// address, and `changed`, which tells every core to refresh its view of
    /// the functions after a deploy or delete.
    pub fn start(
        &self,
        functions: Arc<Registry>,
        listen: SocketAddr,
        service_auth: ServiceAuth,
        changed: Box<dyn Fn() + Send + Sync>,
    ) {
        let _ = self.plane.set(Arc::new(Plane {
            functions,
            listen,
            changed,
            service_auth,
        }));
    }

    /// Handles a control request on a control thread and calls `done` with
    /// the answer there; `Err` carries a 503 body when too many are in flight
    /// (then `done` is dropped uncalled).
    pub fn submit(&self, req: Request, body: Vec<u8>, done: Done) -> Result<(), Vec<u8>> {
        let plane = self.plane.get().expect("control plane started").clone();
        let change = !matches!(req.method.as_str(), "GET" | "HEAD");
        let changing = match change {
            true => Some(
                Claim::take(&self.changes, CONTROL_CHANGES_MAX).ok_or_else(|| {
                    json_error(
                        "control_busy",
                        "too many deploys and other changes in progress, retry later",
                    )
                })?,
            ),
            false => None,
        };
        let claim = Claim::take(&self.inflight, CONTROL_INFLIGHT_MAX).ok_or_else(|| {
            json_error(
                "control_busy",
                "too many control requests in progress, retry later",
            )
        })?;
        let spawned = std::thread::Builder::new()
            .name("hearth-control".into())
            .spawn(move || {
                // Spawned by a worker, which may run as SCHED_BATCH
                // (`--worker-policy`): a deploy's first instance and the VMs
                // and snapshot builds it starts would inherit it from here.
                let _ = crate::util::cpu::set_batch(false);
                let _held = (claim, changing);
                done(handle(&plane, &req, &body));
            });
        // A thread that did not start dropped its claims with its closure.
        spawned
            .map(drop)
            .map_err(|_| json_error("control_busy", "could not start a control thread"))
    }
}

/// One place in an in-flight count, given back when dropped.
struct Claim(Arc<AtomicUsize>);

impl Claim {
    /// Takes a place in `count` while it is below `max`.
    fn take(count: &Arc<AtomicUsize>, max: usize) -> Option<Claim> {
        if count.fetch_add(1, Ordering::AcqRel) >= max {
            count.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Claim(count.clone()))
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Serves one control request. The engine has checked its head against
/// [`crate::control::auth::Guard`] before its body was read.
fn handle(shared: &Plane, req: &Request, body: &[u8]) -> Answer {
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
        Route::AsyncFailed(id) => {
            crate::control::lambda_event::failed_list(shared, id, req.query())
        }
        Route::Lambda(op) => lambda::handle(shared, op, req, body),
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

fn summary(shared: &Plane, f: &Function) -> serde_json::Value {
    let m = &f.metrics;
    let host = shared.listen;
    json!({
        "functionId": f.spec.id,
        "name": f.spec.name,
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
        "sent_ahead": m.requests_sent_ahead.load(Ordering::Relaxed),
        "artifacts": shared.functions.backend.artifacts(&f.dir),
    })
}

fn deploy(shared: &Plane, req: &Request, body: &[u8]) -> Answer {
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
    // A name's deploy replaces its function: one change of the name at a time.
    let held = match settings
        .name
        .as_deref()
        .map(|n| shared.functions.lock_name(n))
    {
        Some(Err(e)) => return error(409, "name_busy", &e.to_string()),
        Some(Ok(held)) => Some(held),
        None => None,
    };
    let f = match create(
        shared,
        Code::Zip(code),
        settings,
        ServiceMeta::default(),
        held.as_ref(),
    ) {
        Ok(f) => f,
        Err(a) => return a,
    };
    let id = &f.spec.id;
    let host = req
        .header("host")
        .map(str::to_string)
        .unwrap_or_else(|| shared.listen.to_string());
    json_answer(
        201,
        json!({
            "functionId": id,
            "name": f.spec.name,
            "status": "deployed",
            "snapshotReady": true,
            "url": format!("http://{host}/f/{id}"),
            "handler": f.spec.handler,
            "backend": f.spec.backend,
            "deploy_ms": started.elapsed().as_millis() as u64,
        }),
    )
}

/// Where a new function's code comes from.
pub(super) enum Code<'a> {
    /// A zip archive, checked and unpacked.
    Zip(&'a [u8]),
    /// The code directory of a deployed function, copied (a configuration change).
    Copy(&'a Path),
}

/// Unpacks, prepares and publishes a function. A function holding the same
/// name is replaced without downtime: requests by name move to the new one
/// once it is ready, the old one finishes what it has (in the background) and
/// is removed. On error nothing of the new function is left on disk.
///
/// A named function is created holding its name (`held`, see
/// [`Registry::lock_name`]), from the resolution of what it replaces or copies
/// to its publication.
pub(super) fn create(
    shared: &Plane,
    code: Code<'_>,
    settings: DeploySettings,
    service: ServiceMeta,
    held: Option<&NameLock<'_>>,
) -> Result<Arc<Function>, Answer> {
    debug_assert_eq!(
        held.map(NameLock::name),
        settings.name.as_deref(),
        "a named function is created holding its name"
    );
    let started = Instant::now();
    let replaces = service.version.is_none()
        && settings
            .name
            .as_deref()
            .is_some_and(|n| shared.functions.id_of(n).is_some());
    if shared.functions.len() >= FUNCTIONS_MAX && !replaces {
        return Err(error(
            409,
            "function_limit",
            &format!("this server already holds {FUNCTIONS_MAX} functions"),
        ));
    }
    let id = functions::new_id();
    let fdir = &shared.functions.functions_dir;
    let staging = store::staging_dir(fdir, &id).map_err(|e| {
        error(
            500,
            "io",
            &format!("cannot create a staging directory: {e}"),
        )
    })?;
    let (spec, init_logs, held) = stage(shared, &staging, &id, code, settings, service)
        .inspect_err(|_| store::remove_tree(&staging))?;
    let dir = store::publish(&staging, fdir, &id).map_err(|e| {
        store::remove_tree(&staging);
        shared.functions.backend.forget(&id);
        error(500, "io", &format!("cannot publish the function: {e}"))
    })?;
    let f = Arc::new(Function::new(spec, dir, shared.functions.memory.clone()));
    for r in held {
        f.hold(r);
    }
    f.logs.lock().unwrap().extend_init(&init_logs);
    let replaced = shared.functions.insert(f.clone());
    (shared.changed)();
    eprintln!(
        "hearth: deployed {id} ({}) in {} ms",
        f.spec.handler,
        started.elapsed().as_millis()
    );
    if let Some(old) = replaced {
        eprintln!(
            "hearth: {} replaces {} as {:?}",
            id,
            old.spec.id,
            f.spec.name.as_deref().unwrap_or("")
        );
        let functions = shared.functions.clone();
        let drained = std::thread::Builder::new()
            .name("hearth-retire".into())
            .spawn(move || {
                if let Err(e) = retire(&functions, &old) {
                    eprintln!("hearth: {e}");
                }
            });
        if let Err(e) = drained {
            eprintln!("hearth: cannot start a thread to remove the replaced function: {e}");
        }
    }
    Ok(f)
}

/// 503 for a deploy whose first instance does not fit in the memory budget.
fn memory_exhausted(shared: &Plane, memory_mb: u32) -> Answer {
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
    shared: &Plane,
    staging: &Path,
    id: &str,
    code: Code<'_>,
    s: DeploySettings,
    service: ServiceMeta,
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
    let extracted = match code {
        Code::Zip(zip) => archive::extract_zip(zip, &code_dir, &limits),
        Code::Copy(from) => archive::copy_tree(from, &code_dir, &limits),
    };
    let extracted = extracted.map_err(|e| {
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
        created_ms: unix_time_ms(),
        code_bytes: extracted.unpacked_bytes,
        backend: shared.functions.backend_name().to_string(),
        name: s.name,
        service,
        runtime: s.runtime,
    };
    store::write_meta(staging, &spec)
        .map_err(|e| error(500, "io", &format!("cannot write meta.json: {e}")))?;
    sync_filesystem(staging);
    // A backend that keeps what it makes as a standby reserves its share itself.
    let memory = (!shared.functions.backend.keeps_standby()).then_some(memory);
    // The most the backend may write (a VM's snapshot: its guest memory) must fit
    // before it writes anything; the reservation is trimmed to what it wrote below.
    let most = budget::disk_bytes(staging)
        .saturating_add(shared.functions.backend.prepare_bytes_max(&spec, staging));
    let Some(mut held) = disk.try_reserve(most) else {
        return Err(disk_exhausted(&disk.explain(most)));
    };
    let logs = shared
        .functions
        .backend
        .prepare(&spec, staging)
        .map_err(|e| match e {
            StartError::Init {
                error_type,
                message,
                logs,
            } => Reply::new(
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
    // What the function really occupies, artifacts and block rounding included
    // (more than estimated only if the backend's bound is wrong).
    let on_disk = budget::disk_bytes(staging);
    if !held.resize(on_disk) {
        shared.functions.backend.forget(id);
        return Err(disk_exhausted(&disk.explain(on_disk - held.amount())));
    }
    // A standby took its own share of the budget (`Backend::use_memory_budget`).
    drop(memory);
    Ok((spec, logs, vec![held]))
}

/// Flushes the staged files to disk before they are published (one syncfs
/// instead of an fsync per file of a large node_modules tree).
fn sync_filesystem(dir: &Path) {
    if let Ok(f) = std::fs::File::open(dir) {
        // SAFETY: syncfs on a descriptor we own.
        unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&f)) };
    }
}

/// Deletes a function. As Lambda's `DeleteFunction` without a qualifier,
/// deleting a name's current function also deletes its published versions,
/// its aliases and its queued asynchronous events.
///
/// As on the service API, an alias is not a thing to delete here (resolving
/// it would delete whichever version a weighted draw picked), and a version an
/// alias routes to stays until the alias is changed: either would leave the
/// alias pointing at nothing.
fn delete(shared: &Plane, id: &str) -> Answer {
    let functions = &shared.functions;
    if let Some((_, qualifier)) = id.split_once(':') {
        if qualifier != "$LATEST" && !qualifier.bytes().all(|b| b.is_ascii_digit()) {
            return error(
                400,
                "is_alias",
                &format!("{id:?} names an alias: delete the alias itself, or give a version"),
            );
        }
    }
    // Held while the function and its versions are unpublished, not while they drain.
    let (target, held) = match functions.get_locked(id) {
        Ok(Some(found)) => found,
        Ok(None) => return not_found(id),
        Err(e) => return error(409, "name_busy", &e.to_string()),
    };
    if let (Some(name), Some(version)) = (&target.spec.name, target.spec.service.version) {
        let version = version.to_string();
        let users = functions.aliases_using(name, &version);
        if !users.is_empty() {
            return error(
                409,
                "version_in_use",
                &format!(
                    "version {version} of {name} is used by alias(es) {}",
                    users.join(", ")
                ),
            );
        }
    }
    // By id from here: the key was resolved once, above.
    let Some(f) = functions.remove(&target.spec.id, &held) else {
        return not_found(id);
    };
    let mut gone = vec![f.clone()];
    if let (Some(name), None) = (&f.spec.name, f.spec.service.version) {
        if let Err(e) = functions.edit_aliases(&held, |_, aliases| {
            aliases.clear();
            Ok::<_, ()>(())
        }) {
            eprintln!("hearth: cannot remove the aliases of {name}: {e}");
        }
        gone.extend(
            functions
                .versions(name)
                .iter()
                .filter_map(|v| functions.remove(&v.spec.id, &held)),
        );
        functions.async_events.forget(name);
    } else if f.spec.name.is_none() {
        functions.async_events.forget(&f.spec.id);
    } else if let (Some(name), Some(version)) = (&f.spec.name, f.spec.service.version) {
        // A version's events and settings go with it: none is left for a
        // version that is gone (its number is never given again).
        if let Err(e) = functions
            .async_events
            .drop_qualifier(name, &version.to_string())
        {
            eprintln!("hearth: cannot drop the async settings of {name}:{version}: {e}");
        }
    }
    drop(held);
    (shared.changed)();
    for g in &gone {
        if let Err(m) = retire(functions, g) {
            return error(500, "io", &m);
        }
    }
    if let (Some(name), None) = (&f.spec.name, f.spec.service.version) {
        // Once its files are in the trash (see `Registry::forget_versions`).
        if let Err(e) = functions.forget_versions(name) {
            eprintln!("hearth: cannot forget the version count of {name}: {e}");
        }
    }
    let versions: Vec<&str> = gone[1..].iter().map(|g| g.spec.id.as_str()).collect();
    json_answer(
        200,
        json!({ "functionId": f.spec.id, "status": "deleted", "versionsDeleted": versions }),
    )
}

/// Removes an unpublished function once the cores are done with it: its
/// in-flight requests finish (bounded by its timeout), its instances go, then
/// its files and what it held of the budgets.
pub(super) fn retire(functions: &Registry, f: &Function) -> Result<(), String> {
    let deadline =
        Instant::now() + Duration::from_millis(f.spec.timeout_ms) + Duration::from_secs(5);
    while f.instances.load(Ordering::Acquire) > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let id = &f.spec.id;
    functions.backend.forget(id);
    match store::trash(&functions.functions_dir, id) {
        Ok(p) => {
            store::remove_tree(&p);
            f.release_held();
            Ok(())
        }
        Err(e) => Err(format!(
            "function {id} unpublished but its files remain: {e}"
        )),
    }
}
