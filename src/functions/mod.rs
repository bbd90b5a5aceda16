//! Functions: what is deployed ([`Registry`], durable under the state dir) and
//! how each core runs them ([`sched::CorePool`], a sans-IO scheduler the
//! engine's workers drive).
//!
//! The registry is control-plane state behind a lock. On the request path the
//! cores only read it, to resolve a function's name to its id, so whoever
//! writes it holds the lock for in-memory work only, never across the disk.
//! Each core keeps its own view (refreshed by a message when functions change)
//! and its own instances; only a function's instance count is shared (an
//! atomic), so its concurrency limit holds across cores.

pub mod async_events;
pub mod budget;
pub mod logs;
pub mod names;
pub mod sched;
pub mod starts;
pub mod store;

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::config::ServeConfig;
use crate::metrics::FunctionMetrics;
use crate::sandbox::{Backend, Instance, InstanceCpus, StartError};
use crate::spec::FunctionSpec;
use budget::{Budget, Reservation};
use names::Index;
use starts::StartJob;

pub use sched::{CorePool, ServiceInvoke};

/// Most functions one server holds (bounds metrics cardinality and memory).
pub const FUNCTIONS_MAX: usize = 1000;
/// Longest wait at shutdown for instance starts and destructions under way.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(5);

/// A deployed function as the server holds it.
pub struct Function {
    pub spec: FunctionSpec,
    /// `<state>/functions/<id>`: `meta.json`, `code/`, backend artifacts.
    pub dir: PathBuf,
    pub metrics: FunctionMetrics,
    /// Instances alive or starting, over all cores (the concurrency limit).
    pub instances: AtomicU32,
    /// Cores (bit per core) with queued requests that could not get an instance
    /// slot; cores holding instances hand idle ones over.
    pub starved: std::sync::atomic::AtomicU64,
    /// Per core, when the oldest request waiting there arrived (nanoseconds on the
    /// scheduler's monotonic scale); meaningful while the core's bit in `starved` is set.
    pub starved_since: [std::sync::atomic::AtomicU64; 64],
    /// Cores (bit per core) that hold an instance of it, are starting one, or
    /// have one handed to them: where a client connection goes when its own
    /// core cannot get one (see `CorePool::home_core`).
    pub homes: std::sync::atomic::AtomicU64,
    /// Cores (bit per core) holding an idle instance of it, ready for a
    /// request: where a request that would wait elsewhere may spill to (see
    /// `sched::spill`). Another core clears a bit when it sends a request
    /// there; the core itself sets and clears its own as instances park and
    /// leave.
    pub idle_on: std::sync::atomic::AtomicU64,
    /// Cores (bit per core) with requests of it queued: a core whose instance
    /// parks idle asks one of them for its oldest (see `sched::spill`).
    pub backlog: std::sync::atomic::AtomicU64,
    /// Set by `DELETE`: cores stop taking requests for it.
    pub deleted: AtomicBool,
    pub logs: Mutex<logs::LogRing>,
    /// The server's instance memory budget; each instance slot holds `memory_mb` of it.
    memory: Arc<Budget>,
    /// What the function holds for as long as it exists: its disk space. Released by [`Function::release_held`] when it is deleted.
    held: Mutex<Vec<Reservation>>,
}

/// Why [`Function::try_reserve`] gave no instance slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NoSlot {
    /// The function runs `concurrency` instances already.
    Concurrency,
    /// Another instance would exceed the server's instance memory budget.
    Memory,
}

impl Function {
    /// Reserves one instance slot: below the concurrency limit, and `memory_mb` of the
    /// server's memory budget. [`Function::release`] gives both back.
    pub fn try_reserve(&self) -> Result<(), NoSlot> {
        let limit = self.spec.concurrency;
        self.instances
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < limit).then_some(n + 1)
            })
            .map_err(|_| NoSlot::Concurrency)?;
        if !self.memory.try_take(u64::from(self.spec.memory_mb)) {
            self.instances.fetch_sub(1, Ordering::AcqRel);
            return Err(NoSlot::Memory);
        }
        Ok(())
    }

    /// Gives a slot back (its instance is gone or going: killed, handed to the reaper).
    pub fn release(&self) {
        let prev = self.instances.fetch_sub(1, Ordering::AcqRel);
        assert!(
            prev > 0,
            "instance count of {} went below zero",
            self.spec.id
        );
        self.memory.give(u64::from(self.spec.memory_mb));
    }

    /// Keeps `r` until the function is deleted.
    pub fn hold(&self, r: Reservation) {
        self.held.lock().unwrap().push(r);
    }

    /// Releases what the function held (its standby is destroyed, its files removed).
    pub fn release_held(&self) {
        self.held.lock().unwrap().clear();
    }

    /// The code directory mounted at /var/task.
    pub fn code_dir(&self) -> PathBuf {
        self.dir.join("code")
    }
}

/// A name held by [`Registry::lock_name`], released on drop.
pub struct NameLock<'a> {
    registry: &'a Registry,
    name: String,
}

impl NameLock<'_> {
    /// The name held.
    pub fn name(&self) -> &str {
        &self.name
    }
}

/// How long a control request waits for another change of the same function
/// name to finish before it is refused (409).
pub const NAME_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(30);

/// The function names some control request is changing (see
/// [`Registry::lock_name`]).
#[derive(Default)]
struct BusyNames {
    names: Mutex<HashSet<String>>,
    /// Signalled when a name is released.
    freed: Condvar,
}

impl BusyNames {
    /// Marks `name` busy once no one else has it, waiting at most `wait`.
    fn acquire(&self, name: &str, wait: std::time::Duration) -> Result<(), NameBusy> {
        let deadline = std::time::Instant::now() + wait;
        let mut names = self.names.lock().unwrap();
        while names.contains(name) {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return Err(NameBusy(name.to_string()));
            }
            names = self.freed.wait_timeout(names, left).unwrap().0;
        }
        names.insert(name.to_string());
        Ok(())
    }

    fn release(&self, name: &str) {
        self.names.lock().unwrap().remove(name);
        self.freed.notify_all();
    }
}

/// Another change of this function name held it for [`NAME_WAIT_MAX`].
#[derive(Debug)]
pub struct NameBusy(pub String);

impl std::fmt::Display for NameBusy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "another change of function {} has been in progress for over {} s; retry later",
            self.0,
            NAME_WAIT_MAX.as_secs()
        )
    }
}

impl Drop for NameLock<'_> {
    fn drop(&mut self) {
        self.registry.busy_names.release(&self.name);
    }
}

/// The outcome of starting an instance, sent to the core that asked.
pub struct Started {
    pub function: Arc<Function>,
    pub result: Result<Box<dyn Instance>, StartError>,
}

impl Started {
    /// Ends a start no core will take (the one that asked has stopped): the
    /// instance is destroyed and the slot reserved for it given back, as that
    /// core's scheduler would have done. Dropped, the instance would be torn
    /// down, but its concurrency slot and memory would stay reserved.
    pub fn discard(self) {
        self.function.release();
        if let Ok(inst) = self.result {
            inst.destroy();
        }
    }
}

/// All deployed functions, the backend that runs them, and the threads that
/// start and destroy instances.
pub struct Registry {
    pub functions_dir: PathBuf,
    map: RwLock<Index>,
    /// `<state>/aliases` (see [`names`]).
    aliases_dir: PathBuf,
    /// `<state>/versions`: the highest version number of each name (see [`names`]).
    versions_dir: PathBuf,
    pub backend: Box<dyn Backend>,
    /// Memory of all instances and standbys, MiB (`--instance-memory-max-mb`).
    pub memory: Arc<Budget>,
    /// Disk of all functions' code and artifacts, bytes (`--functions-disk-max-mb`).
    pub disk: Arc<Budget>,
    /// Asynchronous invocations: a durable queue per function (by name, or id).
    pub async_events: Arc<async_events::AsyncEvents>,
    /// Instance starts waiting or running (see [`starts`]).
    starts: Arc<starts::Starts>,
    reap_tx: Mutex<Sender<Box<dyn Instance>>>,
    reap_rx: Mutex<Option<Receiver<Box<dyn Instance>>>>,
    /// Reads instances' separate log sockets.
    logs: logs::LogCollector,
    /// Instance starts and destructions queued or under way; shutdown waits for none.
    pending: Mutex<usize>,
    /// Signalled when `pending` drops to zero.
    settled: Condvar,
    /// Names (an unnamed function: its id) whose functions a control request
    /// is changing; see [`Registry::lock_name`].
    busy_names: BusyNames,
    /// `<state>/hearth.lock`, held while the server runs.
    _lock: std::fs::File,
}

impl Registry {
    /// Opens the state dir, removes leftovers of interrupted deploys, loads every
    /// function. `lock` is the state-dir lock ([`store::lock_state_dir`]), kept
    /// for the registry's life.
    pub fn open(cfg: &ServeConfig, lock: std::fs::File) -> std::io::Result<Registry> {
        let backend = crate::sandbox::select(cfg)?;
        let functions_dir = cfg.state_dir.join("functions");
        let mut specs = store::load_all(&functions_dir)?;
        // Oldest first, so that of two under one name the newer keeps it.
        specs.sort_by_key(|(spec, _)| spec.created_ms);
        let memory = Budget::new("instance memory", "MiB", cfg.instance_memory_max_mb);
        backend.use_memory_budget(memory.clone());
        let disk = Budget::new(
            "functions disk",
            "bytes",
            cfg.functions_disk_max_mb.saturating_mul(1 << 20),
        );
        let mut map = Index::default();
        for (spec, dir) in specs {
            let f = Function::new(spec, dir, memory.clone());
            // What exists counts, even beyond a budget lowered since.
            f.hold(disk.reserve_over(budget::disk_bytes(&f.dir)));
            if let Some(older) = map.insert(Arc::new(f)) {
                // The server stopped between publishing a function's
                // replacement and removing it: finish the replacement.
                eprintln!(
                    "hearth: removing {} (replaced under the name {:?})",
                    older.spec.id,
                    older.spec.name.as_deref().unwrap_or("")
                );
                if let Ok(p) = store::trash(&functions_dir, &older.spec.id) {
                    store::remove_tree(&p);
                }
            }
        }
        for (b, unit) in [(&memory, "MiB"), (&disk, "bytes")] {
            if b.used() > b.max() {
                eprintln!(
                    "hearth: warning: loaded functions take {} {unit}, over the budget of {} {unit}; nothing new fits until some are deleted",
                    b.used(),
                    b.max()
                );
            }
        }
        if !map.by_id.is_empty() {
            eprintln!(
                "hearth: loaded {} function(s) from {}",
                map.by_id.len(),
                functions_dir.display()
            );
        }
        let aliases_dir = names::aliases_dir(&functions_dir);
        for (name, aliases) in names::load_aliases(&aliases_dir)? {
            map.set_aliases(&name, aliases);
        }
        let versions_dir = names::versions_dir(&functions_dir);
        for (name, high) in names::load_version_highs(&versions_dir)? {
            if map.resolve(&name).is_none() && map.versions(&name).is_empty() {
                // Its function's delete stopped after the files went, before
                // the count did: a function made anew under the name starts at 1.
                eprintln!("hearth: forgetting the version count of {name} (no such function)");
                if let Err(e) = names::store_version_high(&versions_dir, &name, None) {
                    eprintln!("hearth: cannot forget the version count of {name}: {e}");
                }
                continue;
            }
            map.set_version_high(&name, Some(high));
        }
        let async_events = Arc::new(async_events::AsyncEvents::open(
            &cfg.state_dir.join("async"),
            async_events::AsyncLimits {
                queue_bytes_max: cfg.async_queue_bytes_max,
                disk_bytes_max: cfg.async_disk_bytes_max,
                retry_base_ms: cfg.async_retry_base_ms,
                failure_webhook: cfg.async_failure_webhook.clone(),
            },
            |key| map.resolve(key).is_some(),
        )?);
        async_events.start_committer();
        let (reap_tx, reap_rx) = channel();
        Ok(Registry {
            functions_dir,
            aliases_dir,
            versions_dir,
            map: RwLock::new(map),
            backend,
            memory,
            disk,
            async_events,
            starts: starts::Starts::new(),
            reap_tx: Mutex::new(reap_tx),
            reap_rx: Mutex::new(Some(reap_rx)),
            logs: logs::LogCollector::start()?,
            pending: Mutex::new(0),
            settled: Condvar::new(),
            busy_names: BusyNames::default(),
            _lock: lock,
        })
    }

    /// Starts the starter and reaper threads and warms up loaded functions.
    /// The threads keep `owner` alive and find the registry in it with
    /// `registry`; `deliver` hands an instance start's outcome to the core
    /// that asked for it.
    pub fn start_threads<O: Send + Sync + 'static>(
        owner: &Arc<O>,
        registry: fn(&O) -> &Registry,
        deliver: fn(&O, usize, Started),
    ) {
        let reg = registry(owner);
        for f in reg.all() {
            reg.backend.restore(&f.spec, &f.dir);
        }
        let run_owner = owner.clone();
        reg.starts.start_threads(Box::new(move |job: StartJob| {
            let owner = &run_owner;
            let reg = registry(owner);
            let f = job.function;
            let result = if f.deleted.load(Ordering::Acquire) {
                Err(StartError::Deleted)
            } else {
                reg.backend
                    .start(&f.spec, &f.dir, job.cpus)
                    .map(|(mut inst, init_logs)| {
                        f.logs.lock().unwrap().extend_init(&init_logs);
                        if let Some(socket) = inst.take_log_channel() {
                            reg.logs.add(socket, f.clone());
                        }
                        inst
                    })
            };
            // To a core that has stopped, the start is discarded (the
            // instance destroyed) right here, before the job counts as done.
            let started = Started {
                function: f,
                result,
            };
            deliver(owner, job.core, started);
            reg.settle();
        }));
        let rx = reg
            .reap_rx
            .lock()
            .unwrap()
            .take()
            .expect("threads started once");
        let owner = owner.clone();
        std::thread::Builder::new()
            .name("hearth-reaper".into())
            .spawn(move || {
                while let Ok(inst) = rx.recv() {
                    inst.destroy();
                    registry(&owner).settle();
                }
            })
            .expect("spawn reaper thread");
    }

    /// Asks a starter thread for a new instance of `f` for `core`, to run on
    /// `cpus`.
    pub fn request_start(&self, core: usize, cpus: InstanceCpus, function: Arc<Function>) {
        *self.pending.lock().unwrap() += 1;
        self.starts.push(StartJob {
            core,
            cpus,
            function,
        });
    }

    /// Hands an instance to the reaper thread for destruction.
    pub fn destroy(&self, inst: Box<dyn Instance>) {
        *self.pending.lock().unwrap() += 1;
        let sent = self.reap_tx.lock().unwrap().send(inst);
        if let Err(unsent) = sent {
            unsent.0.destroy();
            self.settle();
        }
    }

    /// One start or destruction is done.
    fn settle(&self) {
        let mut n = self.pending.lock().unwrap();
        *n -= 1;
        if *n == 0 {
            self.settled.notify_all();
        }
    }

    /// The backend's name.
    pub fn backend_name(&self) -> &'static str {
        self.backend.name()
    }

    /// A function by id, or by (qualified) name when `key` is not an id; see
    /// [`names::Index::resolve`].
    pub fn get(&self, key: &str) -> Option<Arc<Function>> {
        let map = self.map.read().unwrap();
        let id = map.resolve(key)?;
        map.by_id.get(&id).cloned()
    }

    /// The id a (qualified) name resolves to now.
    pub fn id_of(&self, key: &str) -> Option<String> {
        self.map.read().unwrap().resolve(key)
    }

    /// The published versions of `name`, oldest first.
    pub fn versions(&self, name: &str) -> Vec<Arc<Function>> {
        self.map.read().unwrap().versions(name)
    }

    /// The aliases of `name`.
    pub fn aliases(&self, name: &str) -> BTreeMap<String, names::Alias> {
        self.map.read().unwrap().aliases(name)
    }

    /// The aliases of `name` that route to `version` (as their version or as
    /// the extra one of a weighted split): a version they use is not deleted.
    pub fn aliases_using(&self, name: &str, version: &str) -> Vec<String> {
        self.aliases(name)
            .into_iter()
            .filter(|(_, a)| {
                a.version == version || a.extra.as_ref().is_some_and(|(e, _)| e == version)
            })
            .map(|(alias, _)| alias)
            .collect()
    }

    /// Waits until no other control request changes the functions of `name`
    /// (for an unnamed function: its id), then holds the name until the guard
    /// drops. A request that changes a function resolves it, stages the change
    /// and publishes or unpublishes it all under its name's guard, so that
    /// deploys, code and configuration updates, publishing versions, deletes
    /// and alias edits of one name happen one after another, each on what the
    /// one before left (a delete is never undone by an update that began
    /// before it, a version is never published from removed files).
    /// Invocations never take it; a request holds one name at most.
    ///
    /// The wait is bounded by [`NAME_WAIT_MAX`] (then [`NameBusy`], a 409 to
    /// the client, who retries as it would with Lambda's "an update is in
    /// progress"): requests waiting on a slow change of one name cannot pile
    /// up on the control plane's threads.
    pub fn lock_name(&self, name: &str) -> Result<NameLock<'_>, NameBusy> {
        self.busy_names.acquire(name, NAME_WAIT_MAX)?;
        Ok(NameLock {
            registry: self,
            name: name.to_string(),
        })
    }

    /// What [`Registry::lock_name`] holds for `f`: its name, or its id when it has none.
    pub fn lock_key(f: &Function) -> &str {
        f.spec.name.as_deref().unwrap_or(&f.spec.id)
    }

    /// The function `key` names (see [`Registry::get`]) with its name held:
    /// resolved again once the name is held, so it is what the changes before
    /// left under `key`. `None`: nothing is there (any more).
    pub fn get_locked(&self, key: &str) -> Result<Option<(Arc<Function>, NameLock<'_>)>, NameBusy> {
        loop {
            let Some(f) = self.get(key) else {
                return Ok(None);
            };
            let held = Self::lock_key(&f).to_string();
            let lock = self.lock_name(&held)?;
            let Some(f) = self.get(key) else {
                return Ok(None);
            };
            if Self::lock_key(&f) == held {
                return Ok(Some((f, lock)));
            }
        }
    }

    /// Changes the aliases of the name `held` holds with `edit`, which sees
    /// the index (to check versions exist) and decides; they are stored before
    /// the change is visible. `edit` returning `Err` changes nothing; the outer
    /// error is a failure to store them (nothing changed either).
    ///
    /// The index is only read while `edit` decides and written once the file
    /// is stored: the cores read it for every invocation by name, and storing
    /// takes two fsyncs (milliseconds, or as long as the disk stalls). What
    /// `edit` saw stays true meanwhile, because the aliases and the versions
    /// of a name change only under its name's guard.
    pub fn edit_aliases<T, E>(
        &self,
        held: &NameLock<'_>,
        edit: impl FnOnce(&Index, &mut BTreeMap<String, names::Alias>) -> Result<T, E>,
    ) -> std::io::Result<Result<T, E>> {
        let name = held.name();
        let (aliases, out) = {
            let map = self.map.read().unwrap();
            let mut aliases = map.aliases(name);
            match edit(&map, &mut aliases) {
                Ok(out) => (aliases, out),
                Err(e) => return Ok(Err(e)),
            }
        };
        names::store_aliases(&self.aliases_dir, name, &aliases)?;
        self.map.write().unwrap().set_aliases(name, aliases);
        Ok(Ok(out))
    }

    /// Takes the next version number of the name `held` holds, storing it
    /// before it is used: a number once given is never given again, even if
    /// the version is deleted or its publish fails.
    pub fn claim_version(&self, held: &NameLock<'_>) -> std::io::Result<u32> {
        let name = held.name();
        let next = self.map.read().unwrap().version_high(name) + 1;
        names::store_version_high(&self.versions_dir, name, Some(next))?;
        self.map.write().unwrap().set_version_high(name, Some(next));
        Ok(next)
    }

    /// Forgets the version numbers of `name`, whose whole function was
    /// deleted and whose files are in the trash (a new function of that name
    /// publishes from 1 again). Only then: forgotten before, a server
    /// stopped in between would bring the function back without its count,
    /// and publish a number given before. Takes the name again (it was let
    /// go while the function drained); a function made anew under the name
    /// meanwhile keeps the count.
    pub fn forget_versions(&self, name: &str) -> Result<(), String> {
        let held = self.lock_name(name).map_err(|e| e.to_string())?;
        // What it reads stays true while the name is held.
        if self.map.read().unwrap().resolve(name).is_some() || !self.versions(name).is_empty() {
            return Ok(());
        }
        names::store_version_high(&self.versions_dir, held.name(), None)
            .map_err(|e| e.to_string())?;
        self.map.write().unwrap().set_version_high(name, None);
        Ok(())
    }

    /// Every function, sorted by id.
    pub fn all(&self) -> Vec<Arc<Function>> {
        let mut v: Vec<_> = self.map.read().unwrap().by_id.values().cloned().collect();
        v.sort_by(|a, b| a.spec.id.cmp(&b.spec.id));
        v
    }

    /// Number of functions.
    pub fn len(&self) -> usize {
        self.map.read().unwrap().by_id.len()
    }

    /// True when nothing is deployed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Publishes a newly deployed function (the caller broadcasts the change).
    /// A function that had its name is unpublished and returned: requests by
    /// name go to the new one from now on, the old one drains. It is marked
    /// deleted under the lock ([`Index::insert`]): a core whose view is
    /// refreshed from the new index never finds it live (such a view would
    /// keep serving the old code and starting instances of it beside the new).
    pub fn insert(&self, f: Arc<Function>) -> Option<Arc<Function>> {
        self.map.write().unwrap().insert(f)
    }

    /// Unpublishes a function (by id or qualified name) whose name `held`
    /// holds; returns it.
    pub fn remove(&self, key: &str, held: &NameLock<'_>) -> Option<Arc<Function>> {
        let mut map = self.map.write().unwrap();
        let id = map.resolve(key)?;
        let f = map.remove_id(&id)?;
        debug_assert_eq!(
            Self::lock_key(&f),
            held.name(),
            "removed without its name held"
        );
        f.deleted.store(true, Ordering::Release);
        Some(f)
    }

    /// Appends the per-function metric series.
    pub fn render_metrics(&self, out: &mut String) {
        let all = self.all();
        crate::metrics::render_functions(out, all.iter().map(|f| (f.spec.id.as_str(), &f.metrics)));
        self.async_events.render_metrics(out);
    }

    /// Starts running queued asynchronous events through the service API at
    /// `addr` (the server's own; a wildcard address is reached on loopback),
    /// with the admin token when the server has one.
    pub fn start_async_dispatch(
        self: &Arc<Self>,
        addr: std::net::SocketAddr,
        token: Option<String>,
    ) {
        let mut addr = addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(match addr {
                std::net::SocketAddr::V4(_) => std::net::Ipv4Addr::LOCALHOST.into(),
                std::net::SocketAddr::V6(_) => std::net::Ipv6Addr::LOCALHOST.into(),
            });
        }
        let me = Arc::downgrade(self);
        self.async_events.start_dispatch(
            async_events::dispatch::Target {
                addr,
                authorization: token.map(|t| format!("Bearer {t}")),
            },
            Box::new(move |key| Some(me.upgrade()?.get(key)?.spec.concurrency)),
        );
    }

    /// The key of `f`'s async queue: its name, or its id when it has none.
    pub fn async_key(f: &Function) -> &str {
        f.spec.name.as_deref().unwrap_or(&f.spec.id)
    }

    /// Releases backend resources at exit, after the instance starts and
    /// destructions under way (bounded by [`SHUTDOWN_WAIT`]): the backend stops
    /// starting new ones first, so queued starts fail fast.
    pub fn shutdown(&self) {
        self.backend.shutdown();
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        let mut n = self.pending.lock().unwrap();
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                eprintln!(
                    "hearth: {} instance start(s) or destruction(s) unfinished after {} ms at shutdown",
                    *n,
                    SHUTDOWN_WAIT.as_millis()
                );
                break;
            }
            n = self.settled.wait_timeout(n, left).unwrap().0;
        }
    }
}

impl Function {
    /// A function in `dir` whose instances draw on `memory`.
    pub fn new(spec: FunctionSpec, dir: PathBuf, memory: Arc<Budget>) -> Function {
        Function {
            spec,
            dir,
            metrics: FunctionMetrics::default(),
            instances: AtomicU32::new(0),
            starved: std::sync::atomic::AtomicU64::new(0),
            starved_since: std::array::from_fn(|_| std::sync::atomic::AtomicU64::new(0)),
            homes: std::sync::atomic::AtomicU64::new(0),
            idle_on: std::sync::atomic::AtomicU64::new(0),
            backlog: std::sync::atomic::AtomicU64::new(0),
            deleted: AtomicBool::new(false),
            logs: Mutex::new(logs::LogRing::default()),
            memory,
            held: Mutex::new(Vec::new()),
        }
    }
}

/// True if `id` has the shape of a function id (16 lower-case hex digits).
pub fn valid_id(id: &str) -> bool {
    id.len() == 16
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A new random function id.
pub fn new_id() -> String {
    format!("{:016x}", crate::util::random::random_u64())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    #[test]
    fn a_busy_name_is_waited_for_a_bounded_time() {
        let names = BusyNames::default();
        names.acquire("f", Duration::ZERO).unwrap();
        // Another name is free; the same one is not, until released.
        names.acquire("g", Duration::ZERO).unwrap();
        let t = Instant::now();
        assert!(names.acquire("f", Duration::from_millis(50)).is_err());
        assert!(t.elapsed() >= Duration::from_millis(50));
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(30));
                names.release("f");
            });
            names.acquire("f", Duration::from_secs(10)).unwrap();
        });
    }
}
