//! Asynchronous invocations (`X-Amz-Invocation-Type: Event`): a durable queue
//! per function, group commit, dispatch with retries, and the failures kept.
//!
//! - [`log`]: the record format (frames with a CRC, torn tails found).
//! - [`queue`]: one function's segments and ack files, recovery after a crash.
//! - [`config`]: `MaximumRetryAttempts` / `MaximumEventAgeInSeconds` per qualifier.
//! - [`failed`]: the bounded store of events given up, with their errors.
//! - [`dispatch`]: the dispatcher and the threads that run events.
//!
//! An accepted event goes from the engine core that received it to the
//! *committer* thread over a bounded channel (the core never blocks on the
//! disk): the committer takes every event waiting, appends them per function
//! and fsyncs once per segment written, then answers each (202) through the
//! callback the core passed. So concurrent accepts share one fsync (group
//! commit), and a 202 always means the event is on disk.

pub mod config;
pub mod dispatch;
pub mod failed;
pub mod log;
pub mod queue;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, OnceLock};

use config::{Configs, EventConfig};
use failed::FailedStore;
use queue::{AppendError, Charges, Queue, QUEUED_EVENTS_MAX};

use crate::functions::budget::{Budget, Reservation};

/// Largest event payload, bytes (as Lambda allows for asynchronous invocations).
pub const EVENT_BYTES_MAX: usize = 1 << 20;
/// Events accepted by the cores and not yet written; more → 429 at once.
pub const ACCEPT_PENDING_MAX: usize = 16_384;
/// Payload bytes of the events accepted and not yet written, held in memory
/// until the committer has stored them; more → 429 at once. Without it the
/// count alone would let [`ACCEPT_PENDING_MAX`] events of [`EVENT_BYTES_MAX`]
/// hold 16 GiB.
pub const ACCEPT_PENDING_BYTES_MAX: u64 = 64 << 20;
/// Events the committer writes in one batch (one fsync per segment).
pub const COMMIT_BATCH_MAX: usize = 4096;
/// Default of `--async-disk-max-mb`: disk all queues and failure stores may
/// use together, MiB.
pub const ASYNC_DISK_MAX_MB_DEFAULT: u64 = 4096;

/// The server's settings for asynchronous invocations.
#[derive(Clone, Debug)]
pub struct AsyncLimits {
    /// Bytes of queued events per function (`--async-queue-max-mb`); more → 429.
    pub queue_bytes_max: u64,
    /// Bytes of all functions' queues and failed events together
    /// (`--async-disk-max-mb`); an event beyond it → 429, a failure beyond it is not kept.
    pub disk_bytes_max: u64,
    /// The first retry's delay; each further retry doubles it (`--async-retry-base-ms`).
    pub retry_base_ms: u64,
    /// Where failed events are POSTed (`--async-failure-webhook`), set by the operator only.
    pub failure_webhook: Option<String>,
}

/// One function's queue with its settings and failures.
pub struct FunctionEvents {
    /// Its events.
    pub queue: Queue,
    configs: Mutex<Configs>,
    failed: Mutex<FailedStore>,
}

impl FunctionEvents {
    /// Opens the queue a previous run left in `dir`. Settings that cannot be
    /// parsed are set aside (`config.json.unreadable`) for the defaults.
    fn open(key: &str, dir: PathBuf, charges: &Charges) -> io::Result<FunctionEvents> {
        let configs = match config::load(&dir) {
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                let aside = dir.join("config.json.unreadable");
                std::fs::rename(dir.join("config.json"), &aside)?;
                eprintln!(
                    "hearth: the async settings of {key} cannot be read ({e}); \
                     using the defaults, the file is kept as {}",
                    aside.display()
                );
                Configs::new()
            }
            loaded => loaded?,
        };
        let queue = Queue::open(key, dir, charges.clone())?;
        let failed = FailedStore::open(&queue.dir, charges.disk.clone())?;
        Ok(FunctionEvents {
            queue,
            configs: Mutex::new(configs),
            failed: Mutex::new(failed),
        })
    }

    /// A new, empty queue for `dir`, which does not exist: nothing is read or
    /// written until its first event or setting is stored.
    fn new(key: &str, dir: PathBuf, charges: &Charges) -> FunctionEvents {
        FunctionEvents {
            failed: Mutex::new(FailedStore::new(&dir, charges.disk.clone())),
            queue: Queue::new(key, dir, charges.clone()),
            configs: Mutex::new(Configs::new()),
        }
    }

    /// The settings of `qualifier` ("" or `$LATEST`: the unqualified function), if set.
    pub fn config(&self, qualifier: &str) -> Option<EventConfig> {
        self.configs
            .lock()
            .unwrap()
            .get(config_key(qualifier))
            .copied()
    }

    /// Changes the settings of `qualifier` with `edit` (given the current ones,
    /// if any; returning `None` deletes them) and stores them durably.
    pub fn edit_config(
        &self,
        qualifier: &str,
        edit: impl FnOnce(Option<EventConfig>) -> Option<EventConfig>,
    ) -> io::Result<Option<EventConfig>> {
        let mut configs = self.configs.lock().unwrap();
        let mut next = configs.clone();
        let key = config_key(qualifier).to_string();
        match edit(next.get(&key).copied()) {
            Some(c) => next.insert(key.clone(), c),
            None => next.remove(&key),
        };
        config::store(&self.queue.dir, &next)?;
        *configs = next;
        Ok(configs.get(&key).copied())
    }

    /// A page of the events given up and kept, oldest first, the `skip`
    /// newest left out (see [`FailedStore::list`]).
    pub fn failed(&self, skip: usize) -> io::Result<failed::Listing> {
        self.failed.lock().unwrap().list(skip)
    }

    /// Drops the settings and events of the versions and aliases that are gone
    /// (`exists` says which `<key>:<qualifier>` are not): a server stopped
    /// between deleting one and dropping them left them behind.
    fn drop_gone_qualifiers(&self, exists: impl Fn(&str) -> bool) -> io::Result<()> {
        let configured: Vec<String> = self.configs.lock().unwrap().keys().cloned().collect();
        let queued = self.queue.qualifiers();
        let named = configured
            .iter()
            .map(String::as_str)
            .chain(queued.iter().map(|q| &**q));
        let gone: std::collections::BTreeSet<&str> = named
            .filter(|q| !q.is_empty() && *q != "$LATEST")
            .filter(|q| !exists(&format!("{}:{q}", self.queue.key)))
            .collect();
        for qualifier in gone {
            let dropped = self.queue.drop_qualifier(qualifier);
            eprintln!(
                "hearth: async queue {}: {qualifier} is gone; its settings and {dropped} event(s) dropped",
                self.queue.key
            );
            if self.config(qualifier).is_some() {
                self.edit_config(qualifier, |_| None)?;
            }
        }
        Ok(())
    }

    /// Drops its events, settings and failures with their directory (its function was deleted).
    fn remove(&self) {
        // The failure store first: no failure is kept in the directory once it is gone.
        self.failed.lock().unwrap().removed();
        self.queue.remove();
    }
}

fn config_key(qualifier: &str) -> &str {
    if qualifier.is_empty() {
        "$LATEST"
    } else {
        qualifier
    }
}

/// What the engine hears back once an event is stored (or refused).
pub type Accepted = Box<dyn FnOnce(Result<(), AppendError>) + Send>;

/// Whether the version or alias an event names is still there (asked by the
/// committer as it stores the event; see [`Queue::append_checked`]).
pub type StillThere = Box<dyn Fn() -> bool + Send>;

/// The committer has [`ACCEPT_PENDING_MAX`] events or
/// [`ACCEPT_PENDING_BYTES_MAX`] bytes of payloads waiting already.
#[derive(Debug)]
pub struct Backlogged;

/// An event on its way to the committer.
struct Submit {
    /// The queue it was accepted for (see [`AsyncEvents::queue_for`]).
    events: Arc<FunctionEvents>,
    qualifier: String,
    request_id: String,
    body: Vec<u8>,
    done: Accepted,
    still_there: StillThere,
    /// The body's share of [`ACCEPT_PENDING_BYTES_MAX`], returned once the
    /// committer is done with the event (or it was refused).
    _held: Reservation,
}

/// Every function's queue, the committer, and the dispatcher once started.
pub struct AsyncEvents {
    /// `<state>/async`.
    dir: PathBuf,
    /// The settings it runs with.
    pub limits: AsyncLimits,
    /// By key. An entry exists from a function's first event or setting
    /// until its delete; a deleted function's queue is never found again
    /// (a function created anew under its name gets a new one).
    queues: Mutex<BTreeMap<String, Arc<FunctionEvents>>>,
    submit_tx: SyncSender<Submit>,
    submit_rx: Mutex<Option<Receiver<Submit>>>,
    /// Payload bytes in the committer's channel ([`ACCEPT_PENDING_BYTES_MAX`]).
    pending_bytes: Arc<Budget>,
    /// Bytes of every queue's segments and every failure store
    /// (`--async-disk-max-mb`), and events of every queue not yet acked.
    charges: Charges,
    /// Wakes the dispatcher (new events, a run finished).
    wake: OnceLock<dispatch::Waker>,
    /// Queues that could not be read at start, charged to `charges.disk`
    /// until they are gone (see [`AsyncEvents::check_set_aside`]).
    set_aside: Mutex<Vec<SetAside>>,
    /// When [`AsyncEvents::check_set_aside`] last looked, ms since the epoch.
    set_aside_checked_ms: AtomicU64,
}

/// A queue that could not be read at start, and what it is charged.
#[derive(Debug)]
struct SetAside {
    /// Where it is: under `<dir>.unreadable`, or its own directory when it
    /// could not be moved there.
    path: PathBuf,
    /// The key whose queue directory it is, when it was left in place.
    in_place: Option<String>,
    /// Bytes charged to the disk budget for it (its size when found).
    bytes: u64,
}

/// A queue key must be a function name or id: it becomes a directory name.
fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 64
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// Whether the queue directory `dir` holds a segment file (one it cannot
/// list: assumed so).
fn holds_segments(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(entries) => entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("seg-")),
        Err(e) => e.kind() != io::ErrorKind::NotFound,
    }
}

/// `<dir>.unreadable`: where queues that cannot be opened are set aside.
fn unreadable_dir(dir: &Path) -> PathBuf {
    let mut aside = dir.as_os_str().to_owned();
    aside.push(".unreadable");
    PathBuf::from(aside)
}

/// Moves the queue of `key` under `dir`, which cannot be opened (`e`), out
/// of the way, so that the server starts and the function gets a new queue.
/// One that cannot be moved stays in place, and is returned to be charged
/// (one moved is found with the others set aside, [`sweep_unreadable`]).
fn set_aside(dir: &Path, key: &str, e: &io::Error) -> Option<SetAside> {
    let aside = unreadable_dir(dir).join(format!("{key}-{}", crate::util::time::unix_time_ms()));
    let moved = std::fs::create_dir_all(aside.parent().expect("joined"))
        .and_then(|()| std::fs::rename(dir.join(key), &aside));
    match moved {
        Ok(()) => {
            eprintln!(
                "hearth: the async queue of {key} cannot be opened ({e}); its events will not run: \
                 it is moved to {} (counted against --async-disk-max-mb; removed at a start {} \
                 days from now, or remove it)",
                aside.display(),
                UNREADABLE_KEPT_MS / DAY_MS
            );
            None
        }
        Err(m) => {
            let path = dir.join(key);
            eprintln!(
                "hearth: the async queue of {key} cannot be opened ({e}) nor moved aside ({m}); \
                 its function takes no asynchronous events until {} is repaired or removed \
                 (counted against --async-disk-max-mb meanwhile)",
                path.display()
            );
            let bytes = crate::functions::budget::disk_bytes(&path);
            Some(SetAside {
                path,
                in_place: Some(key.to_string()),
                bytes,
            })
        }
    }
}

/// A day, ms.
const DAY_MS: u64 = 24 * 3600 * 1000;
/// How long a queue set aside as unreadable is kept for an operator to look
/// at: a start later than that removes it.
pub const UNREADABLE_KEPT_MS: u64 = 7 * DAY_MS;
/// How often the queues set aside are looked at: the charge of one that is
/// gone (an operator removed it) is returned.
pub const UNREADABLE_CHECK_MS: u64 = 60 * 1000;

/// Removes the queues set aside under `aside` more than [`UNREADABLE_KEPT_MS`]
/// before `now_ms` (by the time in their name, `<key>-<ms>`; another name is
/// the operator's and stays); returns what stays, with its bytes on disk.
fn sweep_unreadable(aside: &Path, now_ms: u64) -> Vec<SetAside> {
    let Ok(entries) = std::fs::read_dir(aside) else {
        return Vec::new();
    };
    let mut kept = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let set_aside_ms = entry
            .file_name()
            .to_str()
            .and_then(|n| n.rsplit_once('-'))
            .and_then(|(_, ms)| ms.parse::<u64>().ok());
        if set_aside_ms.is_some_and(|ms| now_ms.saturating_sub(ms) > UNREADABLE_KEPT_MS) {
            eprintln!(
                "hearth: removing {}, set aside as unreadable over {} days ago",
                path.display(),
                UNREADABLE_KEPT_MS / DAY_MS
            );
            match std::fs::remove_dir_all(&path) {
                Ok(()) => continue,
                Err(e) => eprintln!("hearth: cannot remove {}: {e}", path.display()),
            }
        }
        let bytes = crate::functions::budget::disk_bytes(&path);
        kept.push(SetAside {
            path,
            in_place: None,
            bytes,
        });
    }
    kept
}

impl AsyncEvents {
    /// Opens every queue under `dir` (recovering them) whose function `exists`;
    /// the others' directories are removed (their functions were deleted), and
    /// so are the settings and events of versions and aliases that do not
    /// (`exists("<key>:<qualifier>")`).
    /// A queue that cannot be opened does not stop the server: it is logged
    /// and moved aside to `<dir>.unreadable/<key>-<ms>` (its events are not
    /// run), and its function starts with an empty queue; one that cannot be
    /// moved stays in place (and its function takes no events). What is set
    /// aside, moved or not, is charged to the disk budget until it is gone
    /// (see [`sweep_unreadable`], [`AsyncEvents::check_set_aside`]).
    pub fn open(
        dir: &Path,
        limits: AsyncLimits,
        exists: impl Fn(&str) -> bool,
    ) -> io::Result<AsyncEvents> {
        std::fs::create_dir_all(dir)?;
        let charges = Charges {
            disk: Budget::new("asynchronous event disk", "bytes", limits.disk_bytes_max),
            events: Budget::new("queued asynchronous events", "events", QUEUED_EVENTS_MAX),
        };
        let disk = &charges.disk;
        let mut queues = BTreeMap::new();
        let mut set_aside = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    eprintln!("hearth: cannot list {}: {e}", dir.display());
                    continue;
                }
            };
            let key = entry.file_name().to_string_lossy().into_owned();
            if !valid_key(&key) || !exists(&key) {
                eprintln!("hearth: removing the async queue of {key:?} (no such function)");
                let _ = std::fs::remove_dir_all(entry.path());
                continue;
            }
            let opened = FunctionEvents::open(&key, entry.path(), &charges)
                .and_then(|q| q.drop_gone_qualifiers(&exists).map(|()| q));
            match opened {
                Ok(q) => {
                    queues.insert(key, Arc::new(q));
                }
                Err(e) => set_aside.extend(self::set_aside(dir, &key, &e)),
            }
        }
        let aside = unreadable_dir(dir);
        let now_ms = crate::util::time::unix_time_ms();
        set_aside.extend(sweep_unreadable(&aside, now_ms));
        let aside_bytes: u64 = set_aside.iter().map(|s| s.bytes).sum();
        if aside_bytes > 0 {
            eprintln!(
                "hearth: {} async queue(s) that could not be read hold {aside_bytes} bytes, \
                 counted against --async-disk-max-mb until removed ({} and the queue \
                 directories named above)",
                set_aside.len(),
                aside.display()
            );
            disk.take_over(aside_bytes);
        }
        if disk.used() > disk.max() {
            eprintln!(
                "hearth: warning: the async queues and failed events take {} bytes, over \
                 --async-disk-max-mb ({} bytes); no event is accepted until they drain",
                disk.used(),
                disk.max()
            );
        }
        let (submit_tx, submit_rx) = sync_channel(ACCEPT_PENDING_MAX);
        Ok(AsyncEvents {
            dir: dir.to_path_buf(),
            limits,
            queues: Mutex::new(queues),
            submit_tx,
            submit_rx: Mutex::new(Some(submit_rx)),
            pending_bytes: Budget::new("async accept backlog", "bytes", ACCEPT_PENDING_BYTES_MAX),
            charges,
            wake: OnceLock::new(),
            set_aside: Mutex::new(set_aside),
            set_aside_checked_ms: AtomicU64::new(now_ms),
        })
    }

    /// Returns the charge of each queue set aside at start that is gone,
    /// looking at most once per [`UNREADABLE_CHECK_MS`] (the dispatcher
    /// calls it every round). One moved aside is gone once its directory
    /// is; one left in place once it holds no segment, or its function's
    /// new queue has made its own in that directory (which it does only
    /// when no segment is left there).
    pub fn check_set_aside(&self, now_ms: u64) {
        let checked_ms = self.set_aside_checked_ms.load(Relaxed);
        if now_ms.saturating_sub(checked_ms) < UNREADABLE_CHECK_MS {
            return;
        }
        self.set_aside_checked_ms.store(now_ms, Relaxed);
        let mut set_aside = self.set_aside.lock().unwrap();
        set_aside.retain(|s| {
            let gone = match &s.in_place {
                None => std::fs::symlink_metadata(&s.path)
                    .is_err_and(|e| e.kind() == io::ErrorKind::NotFound),
                Some(key) => {
                    !holds_segments(&s.path) || self.get(key).is_some_and(|q| q.queue.made_dir())
                }
            };
            if gone {
                eprintln!(
                    "hearth: {} is gone: its {} bytes no longer count against --async-disk-max-mb",
                    s.path.display(),
                    s.bytes
                );
                self.charges.disk.give(s.bytes);
            }
            !gone
        });
    }

    /// The queue of `key`, made (in memory only: see [`FunctionEvents::new`])
    /// if there is none, provided `exists` says its function is still there.
    /// `None`: it is not. `exists` is asked under the lock [`AsyncEvents::forget`]
    /// takes, and a delete unpublishes a function before it forgets its
    /// queue: so a queue handed out here either is forgotten by that delete
    /// (its events are refused, [`AppendError::Removed`]) or belongs to a
    /// function that exists now, never to one deleted meanwhile.
    pub fn queue_for(
        &self,
        key: &str,
        exists: impl FnOnce() -> bool,
    ) -> io::Result<Option<Arc<FunctionEvents>>> {
        if !valid_key(key) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{key:?} cannot name an async queue"),
            ));
        }
        let mut queues = self.queues.lock().unwrap();
        if !exists() {
            return Ok(None);
        }
        let q = queues.entry(key.to_string()).or_insert_with(|| {
            Arc::new(FunctionEvents::new(key, self.dir.join(key), &self.charges))
        });
        Ok(Some(q.clone()))
    }

    /// The queue of `key` if it has one.
    pub fn get(&self, key: &str) -> Option<Arc<FunctionEvents>> {
        self.queues.lock().unwrap().get(key).cloned()
    }

    /// Every queue, by key.
    pub fn all(&self) -> Vec<Arc<FunctionEvents>> {
        self.queues.lock().unwrap().values().cloned().collect()
    }

    /// Drops the settings and events of `qualifier` of the function `key`
    /// (the version or alias was deleted), so that one published or made
    /// anew under the same number or name starts with none; makes no queue.
    pub fn drop_qualifier(&self, key: &str, qualifier: &str) -> io::Result<()> {
        let Some(events) = self.get(key) else {
            return Ok(());
        };
        let dropped = events.queue.drop_qualifier(qualifier);
        if dropped > 0 {
            eprintln!(
                "hearth: async queue {key}: {dropped} event(s) of {qualifier} dropped with it"
            );
        }
        if events.config(qualifier).is_some() {
            events.edit_config(qualifier, |_| None)?;
        }
        Ok(())
    }

    /// Drops the queue of `key` with its events and settings (its function was deleted).
    pub fn forget(&self, key: &str) {
        let q = self.queues.lock().unwrap().remove(key);
        match q {
            Some(q) => q.remove(),
            None => {
                if valid_key(key) {
                    let _ = std::fs::remove_dir_all(self.dir.join(key));
                }
            }
        }
    }

    /// Hands an event for `events` (from [`AsyncEvents::queue_for`]) to the
    /// committer; `done` hears whether it was stored (not when `still_there`
    /// says its version or alias is gone as it is stored: [`AppendError::Removed`]). Never blocks: with
    /// [`ACCEPT_PENDING_MAX`] events or [`ACCEPT_PENDING_BYTES_MAX`] bytes of
    /// payloads waiting already, the event is refused at once ([`Backlogged`],
    /// and `done` is dropped).
    pub fn submit(
        &self,
        events: Arc<FunctionEvents>,
        qualifier: String,
        request_id: String,
        body: Vec<u8>,
        done: Accepted,
        still_there: StillThere,
    ) -> Result<(), Backlogged> {
        let held = self
            .pending_bytes
            .try_reserve(body.len() as u64)
            .ok_or(Backlogged)?;
        let s = Submit {
            events,
            qualifier,
            request_id,
            body,
            done,
            still_there,
            _held: held,
        };
        match self.submit_tx.try_send(s) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => Err(Backlogged),
        }
    }

    /// Starts the committer thread (events are accepted once it runs).
    pub fn start_committer(self: &Arc<Self>) {
        let rx = self
            .submit_rx
            .lock()
            .unwrap()
            .take()
            .expect("committer started once");
        let me = self.clone();
        std::thread::Builder::new()
            .name("hearth-async-commit".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < COMMIT_BATCH_MAX {
                        match rx.try_recv() {
                            Ok(s) => batch.push(s),
                            Err(_) => break,
                        }
                    }
                    me.commit(batch);
                }
            })
            .expect("spawn the async committer");
    }

    /// Writes a batch, one append (and fsync) per queue, and answers each
    /// event. An event whose queue was forgotten meanwhile (its function was
    /// deleted) is refused by the queue, not written anywhere else.
    fn commit(&self, batch: Vec<Submit>) {
        // By queue, not key: two queues of one key (a deleted function's and
        // its successor's) are two.
        let mut by_queue: HashMap<*const FunctionEvents, (Arc<FunctionEvents>, Vec<Submit>)> =
            HashMap::new();
        for s in batch {
            by_queue
                .entry(Arc::as_ptr(&s.events))
                .or_insert_with(|| (s.events.clone(), Vec::new()))
                .1
                .push(s);
        }
        let now_ms = crate::util::time::unix_time_ms();
        for (q, events) in by_queue.into_values() {
            let items: Vec<(&str, &str, &[u8])> = events
                .iter()
                .map(|s| {
                    (
                        s.qualifier.as_str(),
                        s.request_id.as_str(),
                        s.body.as_slice(),
                    )
                })
                .collect();
            let results =
                q.queue
                    .append_checked(&items, now_ms, self.limits.queue_bytes_max, |i| {
                        (events[i].still_there)()
                    });
            drop(items);
            for (s, r) in events.into_iter().zip(results) {
                (s.done)(r);
            }
        }
        self.wake_dispatcher();
    }

    fn wake_dispatcher(&self) {
        if let Some(w) = self.wake.get() {
            w.wake();
        }
    }

    /// Appends the async series of every queue to `/metrics` text.
    pub fn render_metrics(&self, out: &mut String) {
        type Get = fn(&queue::QueueMetrics) -> u64;
        let series: [(&str, &str, &str, Get); 5] = [
            (
                "hearth_async_events_accepted_total",
                "counter",
                "Events accepted (stored, answered 202).",
                |m| m.accepted.load(Relaxed),
            ),
            (
                "hearth_async_events_succeeded_total",
                "counter",
                "Events whose run succeeded.",
                |m| m.succeeded.load(Relaxed),
            ),
            (
                "hearth_async_events_retried_total",
                "counter",
                "Failed runs scheduled again.",
                |m| m.retried.load(Relaxed),
            ),
            (
                "hearth_async_events_failed_total",
                "counter",
                "Events given up and kept as failed.",
                |m| m.failed.load(Relaxed),
            ),
            (
                "hearth_async_queue_depth",
                "gauge",
                "Events queued, waiting for a retry or running.",
                |m| m.depth.load(Relaxed),
            ),
        ];
        let all = self.all();
        for (name, kind, help, get) in series {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            for q in &all {
                let _ = writeln!(
                    out,
                    "{name}{{function=\"{}\"}} {}",
                    q.queue.key,
                    get(&q.queue.metrics)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::channel;

    fn open(label: &str) -> (PathBuf, AsyncEvents) {
        open_with_disk(label, u64::MAX)
    }

    /// [`open`] with a server-wide disk cap of `disk_bytes_max`.
    fn open_with_disk(label: &str, disk_bytes_max: u64) -> (PathBuf, AsyncEvents) {
        let d = std::env::temp_dir().join(format!(
            "hearth-async-{label}-{}-{:x}",
            std::process::id(),
            crate::util::random::random_u64()
        ));
        let events = AsyncEvents::open(&d, test_limits(disk_bytes_max), |_| true).unwrap();
        (d, events)
    }

    /// No queue cap, a server-wide disk cap of `disk_bytes_max`, quick retries.
    fn test_limits(disk_bytes_max: u64) -> AsyncLimits {
        AsyncLimits {
            queue_bytes_max: u64::MAX,
            disk_bytes_max,
            retry_base_ms: 100,
            failure_webhook: None,
        }
    }

    /// A version or alias that is always there.
    fn there() -> StillThere {
        Box::new(|| true)
    }

    /// Submits `{}` for `events`; the receiver hears whether it was stored.
    fn submit(ev: &AsyncEvents, events: Arc<FunctionEvents>) -> Receiver<Result<(), AppendError>> {
        submit_body(ev, events, b"{}".to_vec())
    }

    /// Submits `body` for `events`; the receiver hears whether it was stored.
    fn submit_body(
        ev: &AsyncEvents,
        events: Arc<FunctionEvents>,
        body: Vec<u8>,
    ) -> Receiver<Result<(), AppendError>> {
        let (tx, rx) = channel();
        let done = Box::new(move |r| tx.send(r).unwrap());
        assert!(ev
            .submit(events, String::new(), "rid".into(), body, done, there())
            .is_ok());
        rx
    }

    /// Bytes of the files under `dir` (none: 0).
    fn bytes_under(dir: &Path) -> u64 {
        std::fs::read_dir(dir).map_or(0, |entries| {
            entries.map(|e| e.unwrap().metadata().unwrap().len()).sum()
        })
    }

    #[test]
    fn the_server_wide_disk_cap_refuses_events_of_every_function_and_writes_nothing() {
        const BODY: usize = 60 << 10;
        let (d, ev) = open_with_disk("disk-cap", 256 << 10);
        let a = ev.queue_for("a", || true).unwrap().unwrap();
        // Four events of 60 KiB fit in 256 KiB, the fifth does not.
        let stored: Vec<_> = (0..5)
            .map(|_| submit_body(&ev, a.clone(), vec![b'1'; BODY]))
            .collect();
        commit_waiting(&ev);
        let stored: Vec<_> = stored.iter().map(|rx| rx.recv().unwrap()).collect();
        assert!(stored[..4].iter().all(Result::is_ok), "{stored:?}");
        assert!(
            matches!(stored[4], Err(AppendError::DiskFull { bytes_max: 262_144 })),
            "{stored:?}"
        );
        let a_bytes = bytes_under(&d.join("a"));
        // Another function's event is refused too, and nothing of it is written.
        let b = ev.queue_for("b", || true).unwrap().unwrap();
        let refused = submit_body(&ev, b.clone(), vec![b'1'; BODY]);
        commit_waiting(&ev);
        assert!(matches!(
            refused.recv().unwrap(),
            Err(AppendError::DiskFull { .. })
        ));
        assert!(!d.join("b").exists(), "b's queue was made");
        assert_eq!(
            bytes_under(&d.join("a")),
            a_bytes,
            "a refused event was written"
        );
        // Once a's events are done with, their segment goes and its room is free.
        while let Some((p, _)) = a.queue.take(0, usize::MAX) {
            a.queue.finish_ack(&p);
        }
        assert_eq!(a.queue.bytes(), 0);
        let stored = submit_body(&ev, b, vec![b'1'; BODY]);
        commit_waiting(&ev);
        assert!(stored.recv().unwrap().is_ok());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_deleted_functions_disk_is_free_again() {
        const BODY: usize = 60 << 10;
        let (d, ev) = open_with_disk("disk-forget", 256 << 10);
        let a = ev.queue_for("a", || true).unwrap().unwrap();
        let stored: Vec<_> = (0..4)
            .map(|_| submit_body(&ev, a.clone(), vec![b'1'; BODY]))
            .collect();
        commit_waiting(&ev);
        assert!(stored.iter().all(|rx| rx.recv().unwrap().is_ok()));
        ev.forget("a");
        let b = ev.queue_for("b", || true).unwrap().unwrap();
        let stored: Vec<_> = (0..4)
            .map(|_| submit_body(&ev, b.clone(), vec![b'1'; BODY]))
            .collect();
        commit_waiting(&ev);
        assert!(stored.iter().all(|rx| rx.recv().unwrap().is_ok()));
        let _ = std::fs::remove_dir_all(&d);
    }

    /// Runs the committer's work on every event submitted so far.
    fn commit_waiting(ev: &AsyncEvents) {
        let rx = ev.submit_rx.lock().unwrap();
        let batch: Vec<Submit> = rx.as_ref().unwrap().try_iter().collect();
        ev.commit(batch);
    }

    #[test]
    fn the_accept_backlog_is_bounded_in_bytes_not_only_in_events() {
        let (d, ev) = open("backlog-bytes");
        let q = ev.queue_for("f", || true).unwrap().unwrap();
        let body = vec![b'1'; EVENT_BYTES_MAX];
        let fits = (ACCEPT_PENDING_BYTES_MAX / EVENT_BYTES_MAX as u64) as usize;
        assert!(fits < ACCEPT_PENDING_MAX, "the byte bound comes first");
        let mut answers = Vec::new();
        for _ in 0..fits {
            let (tx, rx) = channel();
            let done = Box::new(move |r| tx.send(r).unwrap());
            let sent = ev.submit(
                q.clone(),
                String::new(),
                "r".into(),
                body.clone(),
                done,
                there(),
            );
            assert!(sent.is_ok());
            answers.push(rx);
        }
        let refused = ev.submit(
            q.clone(),
            String::new(),
            "r".into(),
            body.clone(),
            Box::new(|_| {}),
            there(),
        );
        assert!(
            matches!(refused, Err(Backlogged)),
            "{fits} MiB are waiting already"
        );
        // Small events still fit, up to the bound in bytes.
        assert!(ev
            .submit(
                q.clone(),
                String::new(),
                "r".into(),
                Vec::new(),
                Box::new(|_| {}),
                there(),
            )
            .is_ok());
        // Once the committer has stored them, their bytes are free again.
        commit_waiting(&ev);
        assert!(answers.iter().all(|rx| rx.recv().unwrap().is_ok()));
        let rx = submit(&ev, q);
        commit_waiting(&ev);
        assert!(rx.recv().unwrap().is_ok());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_deleted_versions_settings_and_events_go_with_it() {
        let (d, ev) = open("drop-version");
        // Dropping a qualifier of a function without a queue makes none.
        ev.drop_qualifier("f", "1").unwrap();
        assert!(ev.get("f").is_none() && !d.join("f").exists());
        let q = ev.queue_for("f", || true).unwrap().unwrap();
        let setting = |retries_max| {
            Some(EventConfig {
                retries_max,
                ..EventConfig::default()
            })
        };
        q.edit_config("1", |_| setting(0)).unwrap();
        q.edit_config("", |_| setting(1)).unwrap();
        let (tx, rx) = channel();
        for qualifier in ["1", "1", ""] {
            let tx = tx.clone();
            let done = Box::new(move |r| tx.send(r).unwrap());
            let sent = ev.submit(
                q.clone(),
                qualifier.into(),
                "r".into(),
                b"{}".to_vec(),
                done,
                there(),
            );
            assert!(sent.is_ok());
        }
        commit_waiting(&ev);
        assert!(rx.try_iter().all(|r| r.is_ok()));
        ev.drop_qualifier("f", "1").unwrap();
        assert_eq!(q.config("1"), None);
        assert_eq!(q.config(""), setting(1));
        assert_eq!(q.queue.depth(), 1, "only the unqualified event is left");
        // Settings dropped durably: a restart does not bring them back.
        drop((q, ev));
        let limits = test_limits(u64::MAX);
        let ev = AsyncEvents::open(&d, limits, |_| true).unwrap();
        let q = ev.get("f").unwrap();
        assert_eq!((q.config("1"), q.queue.depth()), (None, 1));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_restart_drops_what_a_deleted_version_or_alias_left_behind() {
        let (d, ev) = open("drop-at-start");
        let q = ev.queue_for("f", || true).unwrap().unwrap();
        let setting = Some(EventConfig::default());
        for qualifier in ["", "1", "2", "live"] {
            q.edit_config(qualifier, |_| setting).unwrap();
        }
        let (tx, rx) = channel();
        for qualifier in ["", "1", "2", "old"] {
            let tx = tx.clone();
            let done = Box::new(move |r| tx.send(r).unwrap());
            let sent = ev.submit(
                q.clone(),
                qualifier.into(),
                "r".into(),
                b"{}".to_vec(),
                done,
                there(),
            );
            assert!(sent.is_ok());
        }
        commit_waiting(&ev);
        assert!(rx.try_iter().all(|r| r.is_ok()));
        drop((q, ev));
        // Stopped before it dropped what version 1 and aliases live and old
        // had: they are gone at the restart.
        let limits = test_limits(u64::MAX);
        let ev = AsyncEvents::open(&d, limits, |key| ["f", "f:2"].contains(&key)).unwrap();
        let q = ev.get("f").unwrap();
        let configured: Vec<Option<EventConfig>> =
            ["", "1", "2", "live"].map(|x| q.config(x)).to_vec();
        assert_eq!(configured, [setting, None, setting, None]);
        let queued: Vec<String> = q.queue.qualifiers().iter().map(|x| x.to_string()).collect();
        assert_eq!(queued, ["", "2"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_event_whose_version_is_deleted_before_it_is_stored_is_refused() {
        let (d, ev) = open("drop-before-stored");
        let q = ev.queue_for("f", || true).unwrap().unwrap();
        let (tx, rx) = channel();
        let done = Box::new(move |r| tx.send(r).unwrap());
        let gone = Box::new(|| false);
        assert!(ev
            .submit(
                q.clone(),
                "1".into(),
                "r".into(),
                b"{}".to_vec(),
                done,
                gone
            )
            .is_ok());
        commit_waiting(&ev);
        assert!(matches!(rx.recv().unwrap(), Err(AppendError::Removed)));
        assert_eq!(q.queue.depth(), 0);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_event_accepted_as_its_function_is_deleted_is_not_stored_for_its_successor() {
        let (d, ev) = open("deleted");
        // Accepted (the function exists), not yet written by the committer...
        let old = ev.queue_for("f", || true).unwrap().unwrap();
        let stored = submit(&ev, old);
        // ...when DeleteFunction forgets the queue, and a function is created
        // under the name again and gets an event of its own.
        ev.forget("f");
        let new = ev.queue_for("f", || true).unwrap().unwrap();
        let stored_new = submit(&ev, new.clone());
        commit_waiting(&ev);
        assert!(matches!(stored.recv().unwrap(), Err(AppendError::Removed)));
        assert!(stored_new.recv().unwrap().is_ok());
        assert_eq!(new.queue.depth(), 1, "only the new function's own event");
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn an_unreadable_queue_is_set_aside_and_the_others_open() {
        let (d, ev) = open("unreadable");
        drop(ev);
        // Settings that do not parse: the defaults, the events kept.
        std::fs::create_dir_all(d.join("bad-config")).unwrap();
        std::fs::write(d.join("bad-config/config.json"), "not json").unwrap();
        // A segment that cannot be read (a directory in its place).
        std::fs::create_dir_all(d.join("bad-segment/seg-0000000000000001.log")).unwrap();
        let charges = Charges {
            disk: Budget::new("async event disk", "bytes", u64::MAX),
            events: Budget::new("queued async events", "events", u64::MAX),
        };
        let ok = Queue::open("ok", d.join("ok"), charges).unwrap();
        assert!(ok.append(&[("", "r", b"{}")], 1, u64::MAX)[0].is_ok());
        drop(ok);
        let limits = test_limits(u64::MAX);
        let ev = AsyncEvents::open(&d, limits, |_| true).expect("the server starts");
        assert_eq!(ev.get("ok").unwrap().queue.depth(), 1);
        let bad = ev.get("bad-config").expect("opened with the defaults");
        assert_eq!(bad.config(""), None);
        assert!(d.join("bad-config/config.json.unreadable").is_file());
        assert!(ev.get("bad-segment").is_none());
        assert!(!d.join("bad-segment").exists());
        let mut aside = d.as_os_str().to_owned();
        aside.push(".unreadable");
        let aside = PathBuf::from(aside);
        let kept = std::fs::read_dir(&aside).unwrap().count();
        assert_eq!(kept, 1, "set aside, not deleted");
        assert!(
            ev.charges.disk.used() >= crate::functions::budget::disk_bytes(&aside) - 4096,
            "what is set aside is not charged"
        );
        // Its function takes events again, in a new queue.
        let q = ev.queue_for("bad-segment", || true).unwrap().unwrap();
        let stored = submit(&ev, q);
        commit_waiting(&ev);
        assert!(stored.recv().unwrap().is_ok());
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_dir_all(&aside);
    }

    #[test]
    fn no_queue_is_made_for_a_function_that_is_gone_nor_by_looking() {
        let (d, ev) = open("gone");
        assert!(ev.queue_for("f", || false).unwrap().is_none());
        assert!(ev.get("f").is_none());
        assert!(ev.all().is_empty());
        // A queue made for an event touches the disk with that event only.
        let q = ev.queue_for("g", || true).unwrap().unwrap();
        assert!(!d.join("g").exists());
        let stored = submit(&ev, q);
        commit_waiting(&ev);
        assert!(stored.recv().unwrap().is_ok());
        assert!(d.join("g").is_dir());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_queue_left_in_place_is_charged_until_it_is_gone() {
        let (d, ev) = open("in-place");
        drop(ev);
        // A segment that cannot be read, beside 64 KiB of another, and no
        // room to set the queue aside (a file where its directory goes).
        let bad = d.join("bad");
        std::fs::create_dir_all(bad.join("seg-0000000000000001.log")).unwrap();
        std::fs::write(bad.join("seg-0000000000000002.log"), vec![1u8; 64 << 10]).unwrap();
        let aside = unreadable_dir(&d);
        std::fs::write(&aside, "in the way").unwrap();
        let ev = AsyncEvents::open(&d, test_limits(u64::MAX), |_| true).unwrap();
        assert!(bad.exists(), "it was not left in place");
        let charged = ev.charges.disk.used();
        assert!(charged >= 64 << 10, "{charged} bytes charged");
        // Its function takes no events while it is there.
        let q = ev.queue_for("bad", || true).unwrap().unwrap();
        let refused = submit(&ev, q.clone());
        commit_waiting(&ev);
        assert!(matches!(refused.recv().unwrap(), Err(AppendError::Io(_))));
        // Removed by the operator: new events are stored, and a check (not
        // before a minute has passed) returns the charge.
        std::fs::remove_dir_all(&bad).unwrap();
        let stored = submit(&ev, q.clone());
        commit_waiting(&ev);
        assert!(stored.recv().unwrap().is_ok());
        let now = crate::util::time::unix_time_ms();
        ev.check_set_aside(now);
        assert_eq!(ev.charges.disk.used(), charged + q.queue.bytes());
        ev.check_set_aside(now + UNREADABLE_CHECK_MS);
        assert_eq!(ev.charges.disk.used(), q.queue.bytes());
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_file(&aside);
    }

    #[test]
    fn queues_set_aside_are_charged_and_removed_once_old() {
        let (d, ev) = open("aside-sweep");
        drop(ev);
        let aside = unreadable_dir(&d);
        let now = crate::util::time::unix_time_ms();
        let old = aside.join(format!("f-{}", now - UNREADABLE_KEPT_MS - 1000));
        let recent = aside.join(format!("g-{}", now - 1000));
        for dir in [&old, &recent] {
            std::fs::create_dir_all(dir).unwrap();
            std::fs::write(dir.join("seg-0000000000000001.log"), vec![1u8; 64 << 10]).unwrap();
        }
        let limits = test_limits(u64::MAX);
        let ev = AsyncEvents::open(&d, limits, |_| true).unwrap();
        assert!(!old.exists(), "an old queue set aside was kept");
        assert!(recent.exists(), "a recent queue set aside was removed");
        assert!(
            ev.charges.disk.used() >= 64 << 10,
            "{}",
            ev.charges.disk.used()
        );
        // Removed without a restart: the next check returns its charge. The
        // clock is read again: `open` counts the interval from its own start,
        // later than `now`.
        std::fs::remove_dir_all(&recent).unwrap();
        ev.check_set_aside(crate::util::time::unix_time_ms() + UNREADABLE_CHECK_MS);
        assert_eq!(ev.charges.disk.used(), 0);
        let _ = std::fs::remove_dir_all(&d);
        let _ = std::fs::remove_dir_all(&aside);
    }
}
