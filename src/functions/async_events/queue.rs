//! One function's durable event queue: append-only segment files
//! (`seg-<n>.log`) beside their ack files (`seg-<n>.ack`), the events not yet
//! acked held in memory as positions, and recovery after a crash.
//!
//! An event is acked once it ran or was given up (and kept as failed); a
//! segment whose events are all acked is deleted, unless it is the one being
//! appended to and smaller than [`SEGMENT_IDLE_KEPT_BYTES`]. Appends are
//! fsynced before the client hears 202; acks are not (a lost ack only runs an
//! event again: delivery is at least once).
//!
//! Each event is charged its frame and room for its ack and retry records, against the
//! queue's own cap and the server-wide [`Budget`] of every queue and failure
//! store (`--async-disk-max-mb`), before anything of it is written; the charge
//! is returned when its segment is deleted. Each event not yet acked also
//! counts against the server-wide [`QUEUED_EVENTS_MAX`]: its position is held
//! in memory, and with tiny events the disk cap alone would allow tens of
//! millions of them.
//!
//! A failed run to be retried appends a [`RetryRecord`] (attempts, when due)
//! to the ack file, so a restart keeps the count and the backoff (at most
//! [`RETRIES_MAX`] per event, room charged with the event). Runs put off
//! without using an attempt (throttled, service errors) are not recorded:
//! one event may be put off thousands of times, and forgetting it only
//! restarts its short backoff; its age is kept in its event record.
//!
//! An append that fails is cut back off its segment before the client hears
//! the refusal; when even that cut fails, a cut record (`seg-<n>.cut`, see
//! [`CutRecord`]) is stored durably instead, and the next start cuts the
//! segment there before anything runs: a refused event never runs.
//!
//! Deleting a version or alias drops its events ([`Queue::drop_qualifier`]):
//! those waiting, those being stored and those running are acked at once, so
//! none of them runs once its target is gone (nor on an alias made again
//! under the name).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap, VecDeque};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::config::RETRIES_MAX;
use super::log::{self, AckRecord, CutRecord, EventRecord, RetryRecord, FRAME_HEAD_BYTES};
use crate::functions::budget::Budget;

/// A segment is closed to appends past this size (it is deleted once all its
/// events are acked).
pub const SEGMENT_BYTES_MAX: u64 = 4 << 20;
/// A segment whose events are all acked is deleted even while it is the one
/// appended to once it is this large, so a drained queue holds no more: a
/// smaller one stays, sparing a queue that drains event by event a new file
/// (and a directory fsync) per event.
pub const SEGMENT_IDLE_KEPT_BYTES: u64 = 64 << 10;
/// Bytes charged per event beyond its frame: its ack record and up to
/// [`RETRIES_MAX`] retry records in the ack file.
pub const ACK_ROOM_BYTES: u64 =
    (FRAME_HEAD_BYTES + 8 + RETRIES_MAX as usize * (FRAME_HEAD_BYTES + RetryRecord::BYTES)) as u64;

/// Events not yet acked, all queues together: each is a [`Pending`] in memory
/// (about 100 bytes), so this bounds that memory (to about 100 MiB) where
/// the disk cap would not for small events.
pub const QUEUED_EVENTS_MAX: u64 = 1 << 20;

/// The server-wide budgets every queue is charged to.
#[derive(Clone, Debug)]
pub struct Charges {
    /// Bytes of segment files and room for their acks (`--async-disk-max-mb`),
    /// shared with the failure stores.
    pub disk: Arc<Budget>,
    /// Events not yet acked ([`QUEUED_EVENTS_MAX`]).
    pub events: Arc<Budget>,
}

/// Counters and gauges of one queue (`/metrics`).
#[derive(Default)]
pub struct QueueMetrics {
    /// Events accepted (fsynced, answered 202).
    pub accepted: AtomicU64,
    /// Events whose handler ran without error.
    pub succeeded: AtomicU64,
    /// Runs that failed and were scheduled again.
    pub retried: AtomicU64,
    /// Events given up (retries exhausted, too old, refused) and kept as failed.
    pub failed: AtomicU64,
    /// Events queued, waiting to be retried or running.
    pub depth: AtomicU64,
}

/// An event not yet acked: where it is and how its delivery goes.
#[derive(Clone, Debug)]
pub struct Pending {
    pub seq: u64,
    /// The version or alias it invokes ("" for the unqualified function).
    pub qualifier: Arc<str>,
    /// Its segment and the offset of its frame there.
    segment: u64,
    offset: u64,
    payload_bytes: u32,
    /// When it was accepted, ms since the epoch.
    pub accepted_ms: u64,
    /// Failed runs so far.
    pub attempts: u32,
    /// Not to run before this time, ms since the epoch (retry backoff).
    pub not_before_ms: u64,
    /// Runs put off without using an attempt (throttled, service errors), for their backoff.
    pub deferrals: u32,
}

struct Segment {
    log: Arc<File>,
    ack: Option<File>,
    /// Length of its log file.
    bytes: u64,
    /// What it is charged: its log and room for its events' acks.
    charged: u64,
    /// Events of this segment not acked.
    live: usize,
}

struct State {
    segments: BTreeMap<u64, Segment>,
    next_segment: u64,
    next_seq: u64,
    /// Bytes charged for all segments (see [`Segment::charged`]).
    bytes: u64,
    ready: VecDeque<Pending>,
    /// Events waiting for their `not_before_ms`, the earliest due on top: a
    /// `take` with nothing due costs one look at the top, not a pass over all.
    delayed: BinaryHeap<Reverse<Delayed>>,
    /// Events taken and not yet finished, by seq.
    running: HashMap<u64, Pending>,
    /// Events written by an append that is syncing them (the lock is not
    /// held meanwhile), not yet ready.
    storing: Vec<Pending>,
    /// Those of `storing` a [`Queue::drop_qualifier`] acked: their append
    /// does not make them ready.
    dropped_while_storing: Vec<u64>,
    /// The directory exists, durably (a new queue makes it with its first segment).
    dir_made: bool,
    /// Why appends are refused until a restart: a failed append could not be
    /// cut off its segment, whose length on disk is then unknown.
    broken: Option<String>,
}

/// What one append put into one segment, to take it back if the append fails.
struct Written {
    segment: u64,
    /// The segment's length before.
    before: u64,
    buf: Vec<u8>,
    /// The seqs of the events in `buf`.
    seqs: Vec<u64>,
    /// Bytes charged for them.
    charged: u64,
}

/// A [`Pending`] in the delayed heap, ordered by when it is due (then by seq).
#[derive(Debug)]
struct Delayed(Pending);

impl Delayed {
    fn order(&self) -> (u64, u64) {
        (self.0.not_before_ms, self.0.seq)
    }
}

impl PartialEq for Delayed {
    fn eq(&self, other: &Self) -> bool {
        self.order() == other.order()
    }
}

impl Eq for Delayed {}

impl PartialOrd for Delayed {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Delayed {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.order().cmp(&other.order())
    }
}

/// Why an append was refused.
#[derive(Debug)]
pub enum AppendError {
    /// The queue holds its cap of bytes already.
    Full { bytes_max: u64 },
    /// The queues and failure stores of all functions hold the server's cap
    /// (`--async-disk-max-mb`) already.
    DiskFull { bytes_max: u64 },
    /// All queues together hold [`QUEUED_EVENTS_MAX`] events already.
    TooManyQueued { events_max: u64 },
    /// The queue was removed with its function.
    Removed,
    /// Writing or syncing failed.
    Io(io::Error),
}

/// One function's queue (see the module docs).
pub struct Queue {
    /// The function's name (or id, for a function without one).
    pub key: String,
    /// `<state>/async/<key>`.
    pub dir: PathBuf,
    state: Mutex<State>,
    /// Held through each append, write to fsync: appends run one at a time,
    /// so a failed one can be cut off its segments with nothing behind it.
    appending: Mutex<()>,
    removed: AtomicBool,
    /// The server-wide disk budget its segments are charged to.
    disk: Arc<Budget>,
    /// The server-wide count its events not yet acked are charged to.
    events: Arc<Budget>,
    /// Its counters.
    pub metrics: QueueMetrics,
    /// Failures a unit test makes the disk report.
    #[cfg(test)]
    faults: tests::Faults,
}

/// Events of `st` not acked.
fn live_events(st: &State) -> u64 {
    st.segments.values().map(|s| s.live as u64).sum()
}

fn segment_path(dir: &Path, n: u64, ext: &str) -> PathBuf {
    dir.join(format!("seg-{n:016}.{ext}"))
}

/// Reads a whole file and cuts off a torn or corrupt tail; returns the valid bytes.
fn read_trimmed(path: &Path) -> io::Result<Vec<u8>> {
    let mut bytes = fs::read(path)?;
    let (_, valid) = log::frames(&bytes);
    if valid < bytes.len() {
        eprintln!(
            "hearth: {}: cutting a torn or corrupt tail of {} bytes at offset {valid}",
            path.display(),
            bytes.len() - valid
        );
        OpenOptions::new()
            .write(true)
            .open(path)?
            .set_len(valid as u64)?;
        bytes.truncate(valid);
    }
    Ok(bytes)
}

/// The highest seq the ack and retry records in `acks` name (none: 0). An
/// ack may name an event that is not in its segment (refused as it was
/// stored, and dropped with its version meanwhile), so the segments alone
/// do not say which seqs were given.
fn seq_high_of_acks(acks: &[u8]) -> u64 {
    log::frames(acks)
        .0
        .iter()
        .filter_map(|(_, p)| {
            AckRecord::decode(p)
                .map(|a| a.seq)
                .or_else(|| RetryRecord::decode(p).map(|r| r.seq))
        })
        .max()
        .unwrap_or(0)
}

/// Applies and removes the cut record of segment `n` in `dir`, if there is
/// one (see [`CutRecord`]); returns the highest seq it names (none: 0). A
/// record that does not match the segment (applied already, or stale) cuts
/// nothing.
fn apply_cut(dir: &Path, n: u64) -> io::Result<u64> {
    let path = segment_path(dir, n, "cut");
    let bytes = match fs::read(&path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let record = log::frames(&bytes)
        .0
        .first()
        .and_then(|(_, p)| CutRecord::decode(p));
    let log_path = segment_path(dir, n, "log");
    match record {
        Some(cut) => {
            let log = fs::read(&log_path)?;
            if cut.applies_to(&log) {
                eprintln!(
                    "hearth: {}: cutting {} bytes at offset {}: events {}..={}, refused \
                     before the restart",
                    log_path.display(),
                    log.len() as u64 - cut.len,
                    cut.len,
                    cut.seq_first,
                    cut.seq_last
                );
                let f = OpenOptions::new().write(true).open(&log_path)?;
                f.set_len(cut.len)?;
                f.sync_all()?;
            } else if cut.len < log.len() as u64 {
                eprintln!(
                    "hearth: {}: ignoring a cut record that does not match the segment",
                    path.display()
                );
            }
        }
        None => eprintln!(
            "hearth: {}: ignoring a cut record that cannot be read",
            path.display()
        ),
    }
    fs::remove_file(&path)?;
    File::open(dir)?.sync_all()?;
    Ok(record.map_or(0, |c| c.seq_last))
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(path)
}

/// Makes `dir`, durably: its name must be on disk before events in it are acknowledged.
fn make_dir(dir: &Path) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    for d in dir.ancestors().skip(1).take(2) {
        File::open(d)?.sync_all()?;
    }
    Ok(())
}

impl Queue {
    /// A new, empty queue for `dir`, which does not exist yet: it is made
    /// with the first segment, so making the queue touches no disk.
    pub fn new(key: &str, dir: PathBuf, charges: Charges) -> Queue {
        Queue {
            key: key.to_string(),
            dir,
            state: Mutex::new(State {
                segments: BTreeMap::new(),
                next_segment: 1,
                next_seq: 1,
                bytes: 0,
                ready: VecDeque::new(),
                delayed: BinaryHeap::new(),
                running: HashMap::new(),
                storing: Vec::new(),
                dropped_while_storing: Vec::new(),
                dir_made: false,
                broken: None,
            }),
            appending: Mutex::new(()),
            removed: AtomicBool::new(false),
            disk: charges.disk,
            events: charges.events,
            metrics: QueueMetrics::default(),
            #[cfg(test)]
            faults: Default::default(),
        }
    }

    /// Opens (creating) the queue in `dir`, recovering what a previous run left:
    /// torn tails are cut, acked events dropped, fully acked old segments deleted.
    /// What it keeps is charged to `charges` even beyond their ceilings.
    pub fn open(key: &str, dir: PathBuf, charges: Charges) -> io::Result<Queue> {
        if !dir.is_dir() {
            make_dir(&dir)?;
        }
        let mut numbers = Vec::new();
        // The highest seq any record names: a new event's seq is above it.
        let mut seq_high = 0;
        for entry in fs::read_dir(&dir)? {
            let name = entry?.file_name();
            let name = name.to_string_lossy();
            if let Some(n) = name
                .strip_prefix("seg-")
                .and_then(|r| r.strip_suffix(".log"))
            {
                numbers.extend(n.parse::<u64>().ok());
            } else if let Some((n, ext)) = name
                .strip_prefix("seg-")
                .and_then(|r| r.split_once('.'))
                .filter(|(_, ext)| ["ack", "cut"].contains(ext))
            {
                // An ack file or cut record whose log was deleted (a crash
                // between the removals): gone before a new segment can take
                // the number.
                if let Ok(n) = n.parse::<u64>() {
                    if !segment_path(&dir, n, "log").exists() {
                        let path = segment_path(&dir, n, ext);
                        if ext == "ack" {
                            seq_high = seq_high.max(seq_high_of_acks(&fs::read(&path)?));
                        }
                        fs::remove_file(path)?;
                    }
                }
            } else if name.starts_with("seg-") && name.ends_with(".cut.tmp") {
                // A cut record never put in place: the server died before
                // it answered the refusal, so its append is as a crash in
                // the middle of an append leaves it (not acknowledged).
                fs::remove_file(dir.join(&*name))?;
            }
        }
        numbers.sort_unstable();
        let mut st = State {
            segments: BTreeMap::new(),
            next_segment: numbers.last().map_or(1, |n| n + 1),
            next_seq: 1,
            bytes: 0,
            ready: VecDeque::new(),
            delayed: BinaryHeap::new(),
            running: HashMap::new(),
            storing: Vec::new(),
            dropped_while_storing: Vec::new(),
            dir_made: true,
            broken: None,
        };
        let last = numbers.last().copied();
        let mut qualifiers: HashMap<String, Arc<str>> = HashMap::new();
        for n in numbers {
            let log_path = segment_path(&dir, n, "log");
            let ack_path = segment_path(&dir, n, "ack");
            seq_high = seq_high.max(apply_cut(&dir, n)?);
            let bytes = read_trimmed(&log_path)?;
            let mut acked = std::collections::HashSet::new();
            let mut retries: HashMap<u64, RetryRecord> = HashMap::new();
            if ack_path.exists() {
                let acks = read_trimmed(&ack_path)?;
                seq_high = seq_high.max(seq_high_of_acks(&acks));
                for (_, p) in log::frames(&acks).0 {
                    if let Some(a) = AckRecord::decode(p) {
                        acked.insert(a.seq);
                    } else if let Some(r) = RetryRecord::decode(p) {
                        retries.insert(r.seq, r);
                    }
                }
            }
            let mut live = 0;
            let frames = log::frames(&bytes).0;
            let charged = bytes.len() as u64 + frames.len() as u64 * ACK_ROOM_BYTES;
            for (offset, payload) in frames {
                let Some(e) = EventRecord::decode(payload) else {
                    continue;
                };
                st.next_seq = st.next_seq.max(e.seq + 1);
                if acked.contains(&e.seq) {
                    continue;
                }
                live += 1;
                let qualifier = qualifiers
                    .entry(e.qualifier)
                    .or_insert_with_key(|q| Arc::from(q.as_str()))
                    .clone();
                let retry = retries.get(&e.seq);
                let p = Pending {
                    seq: e.seq,
                    qualifier,
                    segment: n,
                    offset: offset as u64,
                    payload_bytes: payload.len() as u32,
                    accepted_ms: e.accepted_ms,
                    attempts: retry.map_or(0, |r| r.attempts),
                    not_before_ms: retry.map_or(0, |r| r.not_before_ms),
                    deferrals: 0,
                };
                match retry {
                    Some(_) => st.delayed.push(Reverse(Delayed(p))),
                    None => st.ready.push_back(p),
                }
            }
            if live == 0 && (Some(n) != last || bytes.len() as u64 >= SEGMENT_IDLE_KEPT_BYTES) {
                fs::remove_file(&log_path)?;
                let _ = fs::remove_file(&ack_path);
                continue;
            }
            let ack = if ack_path.exists() {
                Some(open_append(&ack_path)?)
            } else {
                None
            };
            st.bytes += charged;
            st.segments.insert(
                n,
                Segment {
                    log: Arc::new(open_append(&log_path)?),
                    ack,
                    bytes: bytes.len() as u64,
                    charged,
                    live,
                },
            );
        }
        st.next_seq = st.next_seq.max(seq_high + 1);
        let recovered = st.ready.len() + st.delayed.len();
        if recovered > 0 {
            eprintln!(
                "hearth: async queue {key}: {recovered} event(s) to run from before the restart \
                 ({} waiting for a retry)",
                st.delayed.len()
            );
        }
        let metrics = QueueMetrics::default();
        metrics.depth.store(recovered as u64, Ordering::Relaxed);
        charges.disk.take_over(st.bytes);
        charges.events.take_over(live_events(&st));
        Ok(Queue {
            key: key.to_string(),
            dir,
            state: Mutex::new(st),
            appending: Mutex::new(()),
            removed: AtomicBool::new(false),
            disk: charges.disk,
            events: charges.events,
            metrics,
            #[cfg(test)]
            faults: Default::default(),
        })
    }

    /// Appends `events` (qualifier, request id, body) and makes them durable
    /// (one fsync per segment written) before they can run. Each event gets
    /// its own outcome: those beyond `bytes_max` (this queue) or the server's
    /// disk budget are refused, and nothing of them is written. A write or
    /// fsync that fails refuses the whole batch and takes it back
    /// ([`Queue::take_back`]).
    pub fn append(
        &self,
        events: &[(&str, &str, &[u8])],
        now_ms: u64,
        bytes_max: u64,
    ) -> Vec<Result<(), AppendError>> {
        self.append_checked(events, now_ms, bytes_max, |_| true)
    }

    /// [`Queue::append`], refusing ([`AppendError::Removed`]) each event `i`
    /// whose target is gone: `still_there(i)` is asked under the lock
    /// [`Queue::drop_qualifier`] takes, so an event is either refused or
    /// stored before its version or alias is dropped (and dropped with it).
    pub fn append_checked(
        &self,
        events: &[(&str, &str, &[u8])],
        now_ms: u64,
        bytes_max: u64,
        still_there: impl Fn(usize) -> bool,
    ) -> Vec<Result<(), AppendError>> {
        // Uncontended in the server (its committer is the only writer).
        let _one_at_a_time = self.appending.lock().unwrap();
        let mut out: Vec<Result<(), AppendError>> = Vec::with_capacity(events.len());
        let mut written: Vec<Pending> = Vec::new();
        let mut parts: Vec<Written> = Vec::new();
        let mut to_sync: Vec<Arc<File>> = Vec::new();
        {
            let mut st = self.state.lock().unwrap();
            if self.removed.load(Ordering::Acquire) {
                return events.iter().map(|_| Err(AppendError::Removed)).collect();
            }
            if let Some(why) = &st.broken {
                let e = io::Error::other(format!(
                    "the queue in {} takes no events until hearth restarts: {why}",
                    self.dir.display()
                ));
                return self.fail_batch(events.len(), e);
            }
            let mut payload = Vec::new();
            let mut qualifier_arc: Option<Arc<str>> = None;
            for (i, &(qualifier, request_id, body)) in events.iter().enumerate() {
                if !still_there(i) {
                    out.push(Err(AppendError::Removed));
                    continue;
                }
                payload.clear();
                let seq = st.next_seq;
                EventRecord {
                    seq,
                    accepted_ms: now_ms,
                    request_id: request_id.to_string(),
                    qualifier: qualifier.to_string(),
                    body: body.to_vec(),
                }
                .encode(&mut payload);
                let frame_bytes = (FRAME_HEAD_BYTES + payload.len()) as u64;
                let charge = frame_bytes + ACK_ROOM_BYTES;
                if st.bytes + charge > bytes_max {
                    out.push(Err(AppendError::Full { bytes_max }));
                    continue;
                }
                if !self.disk.try_take(charge) {
                    let bytes_max = self.disk.max();
                    out.push(Err(AppendError::DiskFull { bytes_max }));
                    continue;
                }
                if !self.events.try_take(1) {
                    self.disk.give(charge);
                    let events_max = self.events.max();
                    out.push(Err(AppendError::TooManyQueued { events_max }));
                    continue;
                }
                let segment = match self.writable_segment(&mut st, frame_bytes) {
                    Ok(n) => n,
                    Err(e) => {
                        self.disk.give(charge);
                        self.events.give(1);
                        out.push(Err(AppendError::Io(e)));
                        continue;
                    }
                };
                if parts.last().is_none_or(|w| w.segment != segment) {
                    parts.push(Written {
                        segment,
                        before: st.segments[&segment].bytes,
                        buf: Vec::new(),
                        seqs: Vec::new(),
                        charged: 0,
                    });
                }
                let part = parts.last_mut().expect("pushed");
                part.seqs.push(seq);
                part.charged += charge;
                let offset = st.segments[&segment].bytes;
                log::frame(&mut part.buf, &payload);
                let seg = st.segments.get_mut(&segment).expect("segment");
                seg.bytes += frame_bytes;
                seg.charged += charge;
                seg.live += 1;
                st.bytes += charge;
                st.next_seq += 1;
                if qualifier_arc.as_deref() != Some(qualifier) {
                    qualifier_arc = Some(Arc::from(qualifier));
                }
                written.push(Pending {
                    seq,
                    qualifier: qualifier_arc.clone().expect("set"),
                    segment,
                    offset,
                    payload_bytes: payload.len() as u32,
                    accepted_ms: now_ms,
                    attempts: 0,
                    not_before_ms: 0,
                    deferrals: 0,
                });
                out.push(Ok(()));
            }
            for part in &parts {
                let seg = &st.segments[&part.segment];
                if let Err(e) = (&*seg.log).write_all(&part.buf) {
                    self.take_back(&mut st, &parts, &BTreeSet::new());
                    return self.fail_batch(events.len(), e);
                }
                to_sync.push(seg.log.clone());
            }
            st.storing.extend(written.iter().cloned());
        }
        let synced = to_sync.iter().try_for_each(|f| self.sync_log(f));
        let mut st = self.state.lock().unwrap();
        let mine: BTreeSet<u64> = written.iter().map(|p| p.seq).collect();
        st.storing.retain(|p| !mine.contains(&p.seq));
        // Those a drop took meanwhile are acked already.
        let mut taken = BTreeSet::new();
        st.dropped_while_storing.retain(|seq| {
            let is_mine = mine.contains(seq);
            if is_mine {
                taken.insert(*seq);
            }
            !is_mine
        });
        if let Err(e) = synced {
            self.take_back(&mut st, &parts, &taken);
            self.publish_depth(&st);
            drop(st);
            return self.fail_batch(events.len(), e);
        }
        self.metrics
            .accepted
            .fetch_add(written.len() as u64, Ordering::Relaxed);
        st.ready
            .extend(written.into_iter().filter(|p| !taken.contains(&p.seq)));
        self.publish_depth(&st);
        out
    }

    /// Undoes a failed append: each segment is cut back to its length before
    /// it and the events' charges are returned (`acked`: those a drop acked
    /// meanwhile, whose count it returned already), so nothing of the batch
    /// stays counted or on disk for a later read to trip over. Called
    /// holding `appending`, so nothing was appended behind the batch. A
    /// segment that cannot be cut keeps bytes its length in memory does not
    /// know of: a cut record is stored for it ([`Queue::record_cut`]), so the
    /// next start cuts them off before anything runs, and the queue takes no
    /// more appends (its events still run) until that restart.
    fn take_back(&self, st: &mut State, parts: &[Written], acked: &BTreeSet<u64>) {
        let last = st.segments.keys().next_back().copied();
        for part in parts.iter().rev() {
            let unacked = part.seqs.iter().filter(|s| !acked.contains(s)).count();
            // Gone: a drop acked all its events and deleted it (and returned its charge).
            let Some(seg) = st.segments.get_mut(&part.segment) else {
                continue;
            };
            debug_assert_eq!(seg.bytes, part.before + part.buf.len() as u64);
            seg.live -= unacked;
            self.events.give(unacked as u64);
            match self.cut_log(&seg.log, part.before) {
                Ok(()) => {
                    seg.bytes = part.before;
                    seg.charged -= part.charged;
                    st.bytes -= part.charged;
                    self.disk.give(part.charged);
                }
                Err(e) => {
                    // Its bytes stay charged: they are on disk until the segment goes.
                    eprintln!(
                        "hearth: async queue {}: cannot cut back a failed append ({e}); \
                         no more events are taken until hearth restarts",
                        self.key
                    );
                    if let Err(r) = self.record_cut(part) {
                        eprintln!(
                            "hearth: async queue {}: cannot record where to cut segment {} \
                             ({r}): its refused events {}..={} may run after a restart",
                            self.key,
                            part.segment,
                            part.seqs[0],
                            part.seqs[part.seqs.len() - 1]
                        );
                    }
                    st.broken = Some(format!("a failed append could not be undone: {e}"));
                }
            }
            let seg = &st.segments[&part.segment];
            if seg.live == 0 && (Some(part.segment) != last || seg.bytes >= SEGMENT_IDLE_KEPT_BYTES)
            {
                self.delete_segment(st, part.segment);
            }
        }
    }

    /// Stores, durably, where the next start is to cut the segment of
    /// `part` (see [`CutRecord`]): through a temporary file, so a record is
    /// whole or absent.
    fn record_cut(&self, part: &Written) -> io::Result<()> {
        let cut = CutRecord {
            len: part.before,
            seq_first: part.seqs[0],
            seq_last: part.seqs[part.seqs.len() - 1],
        };
        let mut buf = Vec::new();
        log::frame(&mut buf, &cut.encode());
        let path = segment_path(&self.dir, part.segment, "cut");
        let tmp = path.with_extension("cut.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&buf)?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        File::open(&self.dir)?.sync_all()
    }

    /// fsyncs the data of a segment's log.
    fn sync_log(&self, log: &File) -> io::Result<()> {
        #[cfg(test)]
        if self.faults.take_sync() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        log.sync_data()
    }

    /// Cuts a segment's log to `len` bytes.
    fn cut_log(&self, log: &File, len: u64) -> io::Result<()> {
        #[cfg(test)]
        if self.faults.take_cut() {
            return Err(io::Error::from_raw_os_error(libc::EIO));
        }
        log.set_len(len)
    }

    /// A batch that could not be stored: all `n` events are refused, and
    /// none of them runs (see [`Queue::take_back`]).
    fn fail_batch(&self, n: usize, e: io::Error) -> Vec<Result<(), AppendError>> {
        eprintln!("hearth: async queue {}: cannot store events: {e}", self.key);
        (0..n)
            .map(|_| Err(AppendError::Io(io::Error::new(e.kind(), e.to_string()))))
            .collect()
    }

    /// The segment to append `frame_bytes` to, opening a new one when the
    /// last is full (or there is none).
    fn writable_segment(&self, st: &mut State, frame_bytes: u64) -> io::Result<u64> {
        if let Some((&n, seg)) = st.segments.iter().next_back() {
            if seg.bytes == 0 || seg.bytes + frame_bytes <= SEGMENT_BYTES_MAX {
                return Ok(n);
            }
        }
        if !st.dir_made {
            make_dir(&self.dir)?;
            // A queue that could not be opened at start and stayed in place
            // (see `AsyncEvents::open`) is not written over.
            for entry in fs::read_dir(&self.dir)? {
                if entry?.file_name().to_string_lossy().starts_with("seg-") {
                    return Err(io::Error::other(format!(
                        "{} holds a queue that could not be opened",
                        self.dir.display()
                    )));
                }
            }
            st.dir_made = true;
        }
        let n = st.next_segment;
        let log = open_append(&segment_path(&self.dir, n, "log"))?;
        // The new file's name must be durable before events in it are acknowledged.
        File::open(&self.dir)?.sync_all()?;
        st.next_segment += 1;
        let closed = st.segments.iter().next_back().map(|(&n, s)| (n, s.live));
        st.segments.insert(
            n,
            Segment {
                log: Arc::new(log),
                ack: None,
                bytes: 0,
                charged: 0,
                live: 0,
            },
        );
        // The segment just closed may be done with already.
        if let Some((old, 0)) = closed {
            self.delete_segment(st, old);
        }
        Ok(n)
    }

    fn delete_segment(&self, st: &mut State, n: u64) {
        if let Some(seg) = st.segments.remove(&n) {
            st.bytes -= seg.charged;
            self.disk.give(seg.charged);
            // The log first: an ack file or cut record alone is removed at recovery.
            let _ = fs::remove_file(segment_path(&self.dir, n, "log"));
            let _ = fs::remove_file(segment_path(&self.dir, n, "ack"));
            let _ = fs::remove_file(segment_path(&self.dir, n, "cut"));
        }
    }

    /// Takes the next event due at `now_ms`, if fewer than `share` run, and
    /// reads it from its segment. The caller must [`Queue::finish`] it.
    pub fn take(&self, now_ms: u64, share: usize) -> Option<(Pending, EventRecord)> {
        let mut st = self.state.lock().unwrap();
        if st.running.len() >= share || self.removed.load(Ordering::Acquire) {
            return None;
        }
        // Due events join the ready ones (behind them), earliest due first.
        while st
            .delayed
            .peek()
            .is_some_and(|Reverse(d)| d.0.not_before_ms <= now_ms)
        {
            let Reverse(Delayed(p)) = st.delayed.pop().expect("peeked");
            st.ready.push_back(p);
        }
        loop {
            let p = st.ready.pop_front()?;
            let seg = &st.segments[&p.segment];
            let mut frame = vec![0u8; FRAME_HEAD_BYTES + p.payload_bytes as usize];
            let read = seg.log.read_exact_at(&mut frame, p.offset);
            let record = read
                .ok()
                .and_then(|()| log::frames(&frame).0.first().map(|(_, p)| p.to_vec()))
                .and_then(|payload| EventRecord::decode(&payload));
            match record {
                Some(r) => {
                    st.running.insert(p.seq, p.clone());
                    return Some((p, r));
                }
                None => {
                    eprintln!(
                        "hearth: async queue {}: event {} cannot be read back; dropped",
                        self.key, p.seq
                    );
                    self.ack_locked(&mut st, &p);
                }
            }
        }
    }

    /// The earliest time a delayed event is due, if any.
    pub fn next_due_ms(&self) -> Option<u64> {
        let st = self.state.lock().unwrap();
        st.delayed.peek().map(|Reverse(d)| d.0.not_before_ms)
    }

    /// True when events wait that are due at `now_ms`.
    pub fn has_due(&self, now_ms: u64) -> bool {
        let st = self.state.lock().unwrap();
        !st.ready.is_empty()
            || st
                .delayed
                .peek()
                .is_some_and(|Reverse(d)| d.0.not_before_ms <= now_ms)
    }

    /// A taken event is done with: acked (it ran, or was given up and kept),
    /// unless a drop acked it already.
    pub fn finish_ack(&self, p: &Pending) {
        let mut st = self.state.lock().unwrap();
        if st.running.remove(&p.seq).is_some() {
            self.ack_locked(&mut st, p);
        }
        self.publish_depth(&st);
    }

    /// A taken event goes back to wait until `p.not_before_ms`, unless a drop
    /// acked it meanwhile.
    pub fn finish_later(&self, p: Pending) {
        let mut st = self.state.lock().unwrap();
        if st.running.remove(&p.seq).is_some() && !self.removed.load(Ordering::Acquire) {
            st.delayed.push(Reverse(Delayed(p)));
        }
        self.publish_depth(&st);
    }

    /// A taken event whose run failed goes back to wait until
    /// `p.not_before_ms`, and its attempts and due time are recorded for a
    /// restart (unless a drop acked it meanwhile).
    pub fn finish_retry(&self, p: Pending) {
        let mut st = self.state.lock().unwrap();
        if st.running.remove(&p.seq).is_none() || self.removed.load(Ordering::Acquire) {
            return;
        }
        // Only RETRIES_MAX records were charged for; settings edited on disk
        // beyond it may retry more, unrecorded.
        if p.attempts <= RETRIES_MAX {
            let record = RetryRecord {
                seq: p.seq,
                attempts: p.attempts,
                not_before_ms: p.not_before_ms,
            };
            self.write_ack_file(&mut st, p.segment, &record.encode());
        }
        st.delayed.push(Reverse(Delayed(p)));
        self.publish_depth(&st);
    }

    /// The qualifiers its events not yet acked name ("" for the unqualified function).
    pub fn qualifiers(&self) -> BTreeSet<Arc<str>> {
        let st = self.state.lock().unwrap();
        let delayed = st.delayed.iter().map(|Reverse(d)| &d.0);
        st.ready
            .iter()
            .chain(delayed)
            .chain(st.running.values())
            .chain(&st.storing)
            .map(|p| p.qualifier.clone())
            .collect()
    }

    /// True while the event `seq` is taken and not dropped: its run may start.
    pub fn is_running(&self, seq: u64) -> bool {
        self.state.lock().unwrap().running.contains_key(&seq)
    }

    /// Drops every event of `qualifier` (its version or alias was deleted):
    /// those waiting, running or being stored are acked, durably, and none
    /// of them runs again (a run under way finishes; its outcome is not
    /// acted on). Returns how many were dropped.
    pub fn drop_qualifier(&self, qualifier: &str) -> usize {
        let mut st = self.state.lock().unwrap();
        if self.removed.load(Ordering::Acquire) {
            return 0;
        }
        let of = |p: &Pending| &*p.qualifier == qualifier;
        let mut gone: Vec<Pending> = Vec::new();
        let ready = std::mem::take(&mut st.ready);
        let (out, keep): (VecDeque<_>, VecDeque<_>) = ready.into_iter().partition(of);
        st.ready = keep;
        gone.extend(out);
        let delayed = std::mem::take(&mut st.delayed).into_vec();
        let (out, keep): (Vec<_>, Vec<_>) = delayed.into_iter().partition(|d| of(&d.0 .0));
        st.delayed = keep.into();
        gone.extend(out.into_iter().map(|d| d.0 .0));
        let running: Vec<u64> = st
            .running
            .values()
            .filter(|p| of(p))
            .map(|p| p.seq)
            .collect();
        for seq in running {
            gone.extend(st.running.remove(&seq));
        }
        let storing: Vec<Pending> = st.storing.iter().filter(|p| of(p)).cloned().collect();
        st.dropped_while_storing
            .extend(storing.iter().map(|p| p.seq));
        gone.extend(storing);
        for p in &gone {
            self.ack_locked(&mut st, p);
        }
        // Durably: after a crash none of them runs either.
        for seg in st.segments.values() {
            if let Some(f) = &seg.ack {
                if let Err(e) = f.sync_data() {
                    eprintln!("hearth: async queue {}: cannot sync acks: {e}", self.key);
                }
            }
        }
        if !gone.is_empty() {
            let _ = File::open(&self.dir).and_then(|d| d.sync_all());
        }
        self.publish_depth(&st);
        gone.len()
    }

    fn ack_locked(&self, st: &mut State, p: &Pending) {
        if self.removed.load(Ordering::Acquire) {
            return;
        }
        let last = st.segments.keys().next_back().copied();
        if !st.segments.contains_key(&p.segment) {
            return;
        }
        self.write_ack_file(st, p.segment, &AckRecord { seq: p.seq }.encode());
        let seg = st.segments.get_mut(&p.segment).expect("checked");
        seg.live -= 1;
        self.events.give(1);
        if seg.live == 0 && (Some(p.segment) != last || seg.bytes >= SEGMENT_IDLE_KEPT_BYTES) {
            self.delete_segment(st, p.segment);
        }
    }

    /// Appends one record to the ack file of `segment` (not synced: a lost
    /// record only runs an event again, or sooner).
    fn write_ack_file(&self, st: &mut State, segment: u64, payload: &[u8]) {
        let Some(seg) = st.segments.get_mut(&segment) else {
            return;
        };
        let mut buf = Vec::with_capacity(FRAME_HEAD_BYTES + payload.len());
        log::frame(&mut buf, payload);
        if seg.ack.is_none() {
            match open_append(&segment_path(&self.dir, segment, "ack")) {
                Ok(f) => seg.ack = Some(f),
                Err(e) => eprintln!(
                    "hearth: async queue {}: cannot open an ack file: {e}",
                    self.key
                ),
            }
        }
        if let Some(f) = &mut seg.ack {
            if let Err(e) = f.write_all(&buf) {
                eprintln!(
                    "hearth: async queue {}: cannot write to an ack file: {e}",
                    self.key
                );
            }
        }
    }

    fn publish_depth(&self, st: &State) {
        let depth = st.ready.len() + st.delayed.len() + st.running.len();
        self.metrics.depth.store(depth as u64, Ordering::Relaxed);
    }

    /// Bytes charged for its segments (their logs and room for their acks).
    pub fn bytes(&self) -> u64 {
        self.state.lock().unwrap().bytes
    }

    /// Events queued, delayed or running.
    pub fn depth(&self) -> u64 {
        self.metrics.depth.load(Ordering::Relaxed)
    }

    /// Drops everything (its function was deleted): nothing more is appended,
    /// taken or acked, and its directory goes.
    pub fn remove(&self) {
        let mut st = self.state.lock().unwrap();
        self.removed.store(true, Ordering::Release);
        st.ready.clear();
        st.delayed.clear();
        st.running.clear();
        self.events.give(live_events(&st));
        st.segments.clear();
        self.disk.give(std::mem::take(&mut st.bytes));
        self.publish_depth(&st);
        let _ = fs::remove_dir_all(&self.dir);
    }

    /// True once it has made its directory, or found it made (a queue made
    /// anew does so with its first segment, and only in a directory that
    /// holds no other queue's segments).
    pub fn made_dir(&self) -> bool {
        self.state.lock().unwrap().dir_made
    }

    /// True once [`Queue::remove`] ran.
    pub fn is_removed(&self) -> bool {
        self.removed.load(Ordering::Acquire)
    }
}

impl Drop for Queue {
    /// Its segments stay on disk (they are recovered at the next start) but
    /// are no longer this server's to charge.
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|e| e.into_inner());
        self.events.give(live_events(st));
        st.segments.clear();
        self.disk.give(std::mem::take(&mut st.bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Disk failures to report instead of doing the call, counted down.
    #[derive(Default)]
    pub(super) struct Faults {
        syncs: std::sync::atomic::AtomicU32,
        cuts: std::sync::atomic::AtomicU32,
    }

    impl Faults {
        fn take(n: &std::sync::atomic::AtomicU32) -> bool {
            n.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
        }
        pub(super) fn take_sync(&self) -> bool {
            Self::take(&self.syncs)
        }
        pub(super) fn take_cut(&self) -> bool {
            Self::take(&self.cuts)
        }
    }

    /// Budgets no test reaches.
    fn unbounded() -> Charges {
        Charges {
            disk: Budget::new("async event disk", "bytes", u64::MAX),
            events: Budget::new("queued async events", "events", u64::MAX),
        }
    }

    fn dir(label: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "hearth-queue-{label}-{}-{:x}",
            std::process::id(),
            crate::util::random::random_u64()
        ));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn push(q: &Queue, n: usize) {
        let body = b"{\"n\":1}";
        let events: Vec<(&str, &str, &[u8])> = (0..n).map(|_| ("", "rid", &body[..])).collect();
        assert!(q.append(&events, 1, u64::MAX).iter().all(|r| r.is_ok()));
    }

    #[test]
    fn unacked_events_come_back_after_a_reopen_and_acked_ones_do_not() {
        let d = dir("reopen");
        let q = Queue::open("f", d.clone(), unbounded()).unwrap();
        push(&q, 5);
        let (p1, r1) = q.take(0, 10).unwrap();
        assert_eq!(r1.body, b"{\"n\":1}");
        q.finish_ack(&p1);
        let (p2, _) = q.take(0, 10).unwrap();
        q.finish_ack(&p2);
        let _running = q.take(0, 10).unwrap(); // taken, never acked: runs again
        drop(q);
        let q = Queue::open("f", d.clone(), unbounded()).unwrap();
        let mut seqs = Vec::new();
        while let Some((p, _)) = q.take(0, 10) {
            seqs.push(p.seq);
        }
        assert_eq!(seqs, vec![3, 4, 5]);
        let _ = fs::remove_dir_all(&d);
    }

    /// Takes every ready event and puts it back to wait until `not_before_ms(seq)`.
    fn delay_all(q: &Queue, not_before_ms: impl Fn(u64) -> u64) {
        while let Some((mut p, _)) = q.take(0, usize::MAX) {
            p.not_before_ms = not_before_ms(p.seq);
            q.finish_later(p);
        }
    }

    #[test]
    fn dropping_a_qualifier_acks_its_waiting_and_running_events_for_good() {
        let d = dir("drop");
        let q = Queue::open("f", d.clone(), unbounded()).unwrap();
        let events: Vec<(&str, &str, &[u8])> = vec![
            ("1", "running", b"{}"),
            ("1", "delayed", b"{}"),
            ("live", "other", b"{}"),
            ("1", "ready", b"{}"),
            ("", "latest", b"{}"),
        ];
        assert!(q.append(&events, 1, u64::MAX).iter().all(Result::is_ok));
        let (running, _) = q.take(0, usize::MAX).unwrap();
        let (mut delayed, _) = q.take(0, usize::MAX).unwrap();
        delayed.not_before_ms = 1 << 50;
        q.finish_later(delayed);
        assert_eq!(q.drop_qualifier("1"), 3);
        assert_eq!(q.depth(), 2);
        assert!(!q.is_running(running.seq), "its run must not start");
        // The run under way ends; it is not queued again.
        q.finish_later(running.clone());
        q.finish_ack(&running);
        assert_eq!(q.depth(), 2);
        let left = |q: &Queue| -> Vec<String> {
            std::iter::from_fn(|| q.take(u64::MAX, usize::MAX))
                .map(|(_, r)| r.request_id)
                .collect()
        };
        assert_eq!(left(&q), ["other", "latest"]);
        drop(q);
        // Nor after a restart.
        let q = Queue::open("f", d.clone(), unbounded()).unwrap();
        assert_eq!(left(&q), ["other", "latest"]);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn events_not_yet_acked_are_bounded_in_number_across_queues() {
        let (da, db) = (dir("count-a"), dir("count-b"));
        let charges = Charges {
            events: Budget::new("queued async events", "events", 3),
            ..unbounded()
        };
        let a = Queue::open("a", da.clone(), charges.clone()).unwrap();
        let b = Queue::open("b", db.clone(), charges.clone()).unwrap();
        push(&a, 2);
        let one: Vec<(&str, &str, &[u8])> = vec![("", "r", b"{}")];
        assert!(b.append(&one, 1, u64::MAX)[0].is_ok());
        assert!(matches!(
            b.append(&one, 1, u64::MAX)[0],
            Err(AppendError::TooManyQueued { events_max: 3 })
        ));
        // An event done with makes room.
        let (p, _) = a.take(0, usize::MAX).unwrap();
        a.finish_ack(&p);
        assert!(b.append(&one, 1, u64::MAX)[0].is_ok());
        // A removed queue's events, and a closed one's, no longer count.
        b.remove();
        assert_eq!(charges.events.used(), 1);
        drop(a);
        assert_eq!(charges.events.used(), 0);
        // Reopened, what was not acked counts again.
        let a = Queue::open("a", da.clone(), charges.clone()).unwrap();
        assert_eq!((a.depth(), charges.events.used()), (1, 1));
        let _ = fs::remove_dir_all(&da);
    }

    #[test]
    fn a_retry_keeps_its_attempts_and_its_wait_across_a_restart() {
        let d = dir("retry");
        let q = Queue::open("f", d.clone(), unbounded()).unwrap();
        push(&q, 2);
        let (mut failed, _) = q.take(0, usize::MAX).unwrap();
        failed.attempts = 1;
        failed.not_before_ms = 1 << 50;
        q.finish_retry(failed.clone());
        // Put off without using an attempt: not recorded.
        let (mut throttled, _) = q.take(0, usize::MAX).unwrap();
        throttled.deferrals = 3;
        throttled.not_before_ms = 1 << 51;
        q.finish_later(throttled.clone());
        drop(q);
        let q = Queue::open("f", d.clone(), unbounded()).unwrap();
        assert_eq!(q.depth(), 2);
        let (p, _) = q.take(1000, usize::MAX).unwrap();
        assert_eq!((p.seq, p.attempts, p.deferrals), (throttled.seq, 0, 0));
        assert!(q.take(1000, usize::MAX).is_none(), "the retry ran early");
        assert_eq!(q.next_due_ms(), Some(1 << 50));
        let (p, _) = q.take(1 << 50, usize::MAX).unwrap();
        assert_eq!((p.seq, p.attempts), (failed.seq, 1));
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn an_event_whose_target_is_gone_as_it_is_stored_is_refused() {
        let d = dir("gone");
        let q = Queue::open("f", d.clone(), unbounded()).unwrap();
        let events: Vec<(&str, &str, &[u8])> = vec![("1", "a", b"{}"), ("2", "b", b"{}")];
        let out = q.append_checked(&events, 1, u64::MAX, |i| i == 1);
        assert!(matches!(out[0], Err(AppendError::Removed)));
        assert!(out[1].is_ok());
        assert_eq!(q.depth(), 1);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn delayed_events_come_due_in_order_behind_the_ready_ones() {
        let d = dir("due");
        let q = Queue::open("f", d.clone(), unbounded()).unwrap();
        push(&q, 4);
        // seq 1..=4 due at 40, 30, 20, 10.
        delay_all(&q, |seq| 50 - 10 * seq);
        assert_eq!(q.next_due_ms(), Some(10));
        push(&q, 1); // seq 5, ready now
        let (p, _) = q.take(25, usize::MAX).unwrap();
        assert_eq!(p.seq, 5, "a ready event goes before those coming due");
        q.finish_ack(&p);
        let mut seqs = Vec::new();
        while let Some((p, _)) = q.take(25, usize::MAX) {
            seqs.push(p.seq);
            q.finish_ack(&p);
        }
        assert_eq!(seqs, vec![4, 3], "due by 25 ms, earliest first");
        assert_eq!(q.next_due_ms(), Some(30));
        assert!(q.take(29, usize::MAX).is_none());
        let seqs: Vec<u64> = std::iter::from_fn(|| q.take(100, usize::MAX))
            .map(|(p, _)| p.seq)
            .collect();
        assert_eq!(seqs, vec![2, 1]);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_take_with_nothing_due_does_not_grow_with_the_events_waiting() {
        // With events waiting for a retry, each dispatcher round takes (and
        // asks when the next is due) with nothing due: that must not cost a
        // pass over all of them, or a deep queue of failing events costs CPU
        // quadratic in its length under the queue's lock.
        const TAKES: usize = 1000;
        let idle_takes = |n: usize| {
            let d = dir("idle");
            let q = Queue::open("f", d.clone(), unbounded()).unwrap();
            push(&q, n);
            delay_all(&q, |_| 1 << 50);
            let fastest = (0..5)
                .map(|_| {
                    let t = std::time::Instant::now();
                    for _ in 0..TAKES {
                        assert!(q.take(1, usize::MAX).is_none());
                        assert_eq!(q.next_due_ms(), Some(1 << 50));
                    }
                    t.elapsed()
                })
                .min()
                .unwrap();
            let _ = fs::remove_dir_all(&d);
            fastest
        };
        let small = idle_takes(1_000);
        let large = idle_takes(40_000);
        // A pass over the events makes it 40 times slower; allow noise.
        assert!(
            large < small * 4 + std::time::Duration::from_millis(5),
            "{TAKES} idle takes: {small:?} with 1,000 events waiting, {large:?} with 40,000"
        );
    }

    #[test]
    fn a_torn_append_is_cut_and_later_appends_survive() {
        let d = dir("torn");
        let q = Queue::open("f", d.clone(), unbounded()).unwrap();
        push(&q, 2);
        drop(q);
        let log = segment_path(&d, 1, "log");
        let len = fs::metadata(&log).unwrap().len();
        // Half a frame, as a crash in the middle of a write leaves it.
        let mut f = OpenOptions::new().append(true).open(&log).unwrap();
        f.write_all(&[7, 0, 0, 0, 1, 2]).unwrap();
        let q = Queue::open("f", d.clone(), unbounded()).unwrap();
        assert_eq!(fs::metadata(&log).unwrap().len(), len);
        push(&q, 1);
        drop(q);
        let q = Queue::open("f", d.clone(), unbounded()).unwrap();
        assert_eq!(q.depth(), 3);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn the_byte_cap_refuses_appends_and_done_segments_are_deleted() {
        let d = dir("cap");
        let q = Queue::open("f", d.clone(), unbounded()).unwrap();
        let body = vec![b'x'; 1 << 20];
        let one: Vec<(&str, &str, &[u8])> = vec![("", "r", &body)];
        for _ in 0..6 {
            assert!(q.append(&one, 1, 5 << 20)[0].is_ok() || q.bytes() > (4 << 20));
        }
        assert!(matches!(
            q.append(&one, 1, 5 << 20)[0],
            Err(AppendError::Full { .. })
        ));
        while let Some((p, _)) = q.take(0, 100) {
            q.finish_ack(&p);
        }
        push(&q, 1); // lands in a new segment once the first is full
        let segments = fs::read_dir(&d)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".log")
            })
            .count();
        assert!(segments <= 2, "{segments} segments left");
        assert!(q.bytes() < 5 << 20);
        let _ = fs::remove_dir_all(&d);
    }

    fn log_bytes(d: &Path) -> u64 {
        fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap())
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .map(|e| e.metadata().unwrap().len())
            .sum()
    }

    fn seqs_after_reopen(d: &Path) -> Vec<u64> {
        let q = Queue::open("f", d.to_path_buf(), unbounded()).unwrap();
        let mut seqs = Vec::new();
        while let Some((p, _)) = q.take(0, usize::MAX) {
            seqs.push(p.seq);
        }
        seqs
    }

    #[test]
    fn a_failed_sync_leaves_nothing_counted_or_written() {
        let d = dir("sync-fails");
        let charges = unbounded();
        let q = Queue::open("f", d.clone(), charges.clone()).unwrap();
        push(&q, 2);
        let (events, disk, bytes, len) = (
            charges.events.used(),
            charges.disk.used(),
            q.bytes(),
            log_bytes(&d),
        );
        q.faults.syncs.store(1, Ordering::Relaxed);
        let body: &[u8] = b"{}";
        let three: Vec<(&str, &str, &[u8])> = vec![("", "r", body); 3];
        let refused = q.append(&three, 1, u64::MAX);
        assert!(refused.iter().all(|r| matches!(r, Err(AppendError::Io(_)))));
        assert_eq!(charges.events.used(), events, "refused events stay counted");
        assert_eq!(charges.disk.used(), disk, "refused bytes stay charged");
        assert_eq!(q.bytes(), bytes);
        assert_eq!(log_bytes(&d), len, "refused events stay in the segment");
        assert_eq!(q.depth(), 2);
        push(&q, 1);
        drop(q);
        assert_eq!(seqs_after_reopen(&d), vec![1, 2, 6]);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn an_append_that_cannot_be_cut_back_stops_appends_and_never_runs() {
        let d = dir("cut-fails");
        let charges = unbounded();
        let q = Queue::open("f", d.clone(), charges.clone()).unwrap();
        push(&q, 1);
        q.faults.syncs.store(1, Ordering::Relaxed);
        q.faults.cuts.store(1, Ordering::Relaxed);
        assert!(q.append(&[("", "r", b"{}")], 1, u64::MAX)[0].is_err());
        assert_eq!(charges.events.used(), 1, "the refused event stays counted");
        let Err(AppendError::Io(e)) = &q.append(&[("", "r", b"{}")], 1, u64::MAX)[0] else {
            panic!("a broken queue took an event");
        };
        assert!(e.to_string().contains("until hearth restarts"), "{e}");
        let (p, _) = q.take(0, 10).expect("the stored event still runs");
        assert_eq!(p.seq, 1);
        q.finish_ack(&p);
        assert_eq!(charges.events.used(), 0);
        drop(q);
        // Its frame is whole on disk, but the client was refused it: a
        // restart cuts it off before anything runs.
        assert_eq!(seqs_after_reopen(&d), Vec::<u64>::new());
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_refused_append_that_could_not_be_cut_back_never_runs_after_a_restart() {
        let d = dir("cut-record");
        let q = Queue::open("f", d.clone(), unbounded()).unwrap();
        push(&q, 2);
        let (p, _) = q.take(0, 10).unwrap();
        q.finish_ack(&p);
        let len = log_bytes(&d);
        q.faults.syncs.store(1, Ordering::Relaxed);
        q.faults.cuts.store(1, Ordering::Relaxed);
        let body: &[u8] = b"{}";
        let refused = q.append(&[("", "r", body), ("", "r", body)], 1, u64::MAX);
        assert!(refused.iter().all(Result::is_err));
        assert!(log_bytes(&d) > len, "the refused events are on disk");
        drop(q);
        assert_eq!(seqs_after_reopen(&d), vec![2], "a refused event ran");
        assert_eq!(log_bytes(&d), len, "the refused events were not cut off");
        let cuts = fs::read_dir(&d)
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension() == Some("cut".as_ref()))
            .count();
        assert_eq!(cuts, 0, "the cut record stayed once applied");
        // The queue takes events again, and they survive the next restart.
        let q = Queue::open("f", d.clone(), unbounded()).unwrap();
        push(&q, 1);
        drop(q);
        assert_eq!(seqs_after_reopen(&d).len(), 2);
        let _ = fs::remove_dir_all(&d);
    }

    /// Writes a cut record for segment `n` of the queue in `d`.
    fn write_cut(d: &Path, n: u64, cut: log::CutRecord) {
        let mut buf = Vec::new();
        log::frame(&mut buf, &cut.encode());
        fs::write(segment_path(d, n, "cut"), buf).unwrap();
    }

    #[test]
    fn a_stale_cut_record_loses_no_event() {
        let d = dir("cut-stale");
        let q = Queue::open("f", d.clone(), unbounded()).unwrap();
        push(&q, 3);
        drop(q);
        let len = log_bytes(&d);
        // At the log's length or beyond it: applied already, or obsolete.
        for at in [len, len + 100] {
            write_cut(
                &d,
                1,
                log::CutRecord {
                    len: at,
                    seq_first: 3,
                    seq_last: 3,
                },
            );
            assert_eq!(seqs_after_reopen(&d), vec![1, 2, 3]);
            assert!(!segment_path(&d, 1, "cut").exists());
        }
        // Naming events that are not those behind its length, or a length
        // that is no frame boundary: not this segment's record.
        write_cut(
            &d,
            1,
            log::CutRecord {
                len: 0,
                seq_first: 7,
                seq_last: 9,
            },
        );
        assert_eq!(seqs_after_reopen(&d), vec![1, 2, 3]);
        write_cut(
            &d,
            1,
            log::CutRecord {
                len: 5,
                seq_first: 1,
                seq_last: 3,
            },
        );
        assert_eq!(seqs_after_reopen(&d), vec![1, 2, 3]);
        // Left from a segment that is gone: removed before a new segment
        // could take its number.
        write_cut(
            &d,
            2,
            log::CutRecord {
                len: 0,
                seq_first: 1,
                seq_last: 9,
            },
        );
        assert_eq!(seqs_after_reopen(&d), vec![1, 2, 3]);
        assert!(!segment_path(&d, 2, "cut").exists());
        assert_eq!(log_bytes(&d), len);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_seq_named_in_an_ack_file_is_not_given_again_after_a_restart() {
        let d = dir("seq-acked");
        let q = Queue::open("f", d.clone(), unbounded()).unwrap();
        push(&q, 2);
        while let Some((p, _)) = q.take(0, 10) {
            q.finish_ack(&p);
        }
        drop(q);
        // An event refused as it was stored and dropped with its version
        // meanwhile is acked, but it is not in the segment (its append was
        // cut back): the ack file names seq 3 beyond the segment's events.
        let mut ack = OpenOptions::new()
            .append(true)
            .open(segment_path(&d, 1, "ack"))
            .unwrap();
        let mut buf = Vec::new();
        log::frame(&mut buf, &AckRecord { seq: 3 }.encode());
        ack.write_all(&buf).unwrap();
        drop(ack);
        let q = Queue::open("f", d.clone(), unbounded()).unwrap();
        push(&q, 1);
        drop(q);
        let q = Queue::open("f", d.clone(), unbounded()).unwrap();
        assert_eq!(
            q.depth(),
            1,
            "the event accepted after the restart was lost"
        );
        let (p, _) = q.take(0, 10).unwrap();
        assert!(p.seq > 3, "seq {} was given again", p.seq);
        let _ = fs::remove_dir_all(&d);
    }

    /// A tmpfs of `bytes` at a new directory (root only), unmounted on drop.
    struct SmallFs(PathBuf);

    impl SmallFs {
        fn mount(bytes: u64) -> Option<SmallFs> {
            let d = dir("tmpfs");
            fs::create_dir_all(&d).unwrap();
            let ok = std::process::Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={bytes}"), "tmpfs"])
                .arg(&d)
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                let _ = fs::remove_dir(&d);
                eprintln!("skipped: cannot mount a tmpfs (needs root)");
                return None;
            }
            Some(SmallFs(d))
        }
    }

    impl Drop for SmallFs {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn a_full_disk_refuses_an_append_and_leaves_nothing_of_it() {
        let Some(small) = SmallFs::mount(256 << 10) else {
            return;
        };
        let d = small.0.join("q");
        let charges = unbounded();
        let q = Queue::open("f", d.clone(), charges.clone()).unwrap();
        let filler = small.0.join("filler");
        fs::write(&filler, vec![0u8; 64 << 10]).unwrap();
        let body = vec![b'x'; 20 << 10];
        let mut accepted = 0;
        let error = loop {
            assert!(accepted < 20, "the tmpfs never filled");
            match q.append(&[("", "r", &body)], 1, u64::MAX).pop().unwrap() {
                Ok(()) => accepted += 1,
                Err(AppendError::Io(e)) => break e,
                Err(e) => panic!("{e:?}"),
            }
        };
        assert_eq!(error.kind(), io::ErrorKind::StorageFull, "{error}");
        assert_eq!(charges.events.used(), accepted);
        assert_eq!(charges.disk.used(), q.bytes());
        let frame = log_bytes(&d) / accepted;
        assert_eq!(log_bytes(&d), accepted * frame, "a torn frame was left");
        fs::remove_file(&filler).unwrap();
        assert!(q.append(&[("", "r", &body)], 1, u64::MAX)[0].is_ok());
        drop(q);
        assert_eq!(seqs_after_reopen(&d).len() as u64, accepted + 1);
    }
}
