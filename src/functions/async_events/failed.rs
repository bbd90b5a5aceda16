//! Events given up (retries exhausted, too old, refused by the service API),
//! each with the error of its last run: `<state>/async/<key>/failed.log`,
//! framed as the queue's segments, each record a JSON document.
//!
//! Bounded: past [`FAILED_KEPT_MAX`] × 2 records or [`FAILED_BYTES_MAX`]
//! bytes the file is rewritten (temporary file, fsync, rename) with the
//! newest records that fit in half of both. Its bytes are charged to the
//! server-wide disk budget of asynchronous events (`--async-disk-max-mb`),
//! shared with the queues: a record that does not fit is not kept.
//!
//! A listing reads a page of at most [`LIST_BYTES_MAX`] of records, and of
//! the others only their frame heads, so it holds no more than that in
//! memory however large the file is.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::IgnoredAny;
use serde_json::Value;

use super::log;
use crate::functions::budget::Budget;
use crate::util::crc::crc32c;

/// Failed events kept per function (past twice as many, the oldest are dropped).
pub const FAILED_KEPT_MAX: usize = 1000;
/// Bytes of failed events kept per function.
pub const FAILED_BYTES_MAX: u64 = 64 << 20;
/// Bytes of records one listing reads and returns (a record is at most
/// [`log::FRAME_PAYLOAD_MAX`], so one always fits).
pub const LIST_BYTES_MAX: u64 = 8 << 20;

const _: () = assert!(LIST_BYTES_MAX >= (log::FRAME_HEAD_BYTES + log::FRAME_PAYLOAD_MAX) as u64);

/// One page of a function's failed events.
#[derive(Debug)]
pub struct Listing {
    /// A JSON array of the records, oldest first, as stored.
    pub records: Vec<u8>,
    /// How many records it holds (at most; one that does not read back is left out).
    pub listed: usize,
    /// Records kept before them, not listed: the next page skips `listed`
    /// more of the newest.
    pub older: usize,
}

impl Default for Listing {
    fn default() -> Self {
        Listing {
            records: b"[]".to_vec(),
            listed: 0,
            older: 0,
        }
    }
}

/// The offsets and frame lengths of the last `newest` frames of `file`,
/// read from their heads alone (up to the first that overruns the file or
/// the frame bound, as [`log::frames`] stops).
fn frame_heads(file: &File, newest: usize) -> io::Result<VecDeque<(u64, u64)>> {
    let end = file.metadata()?.len();
    let mut heads = VecDeque::with_capacity(newest.min(FAILED_KEPT_MAX) + 1);
    let mut at = 0u64;
    let mut head = [0u8; log::FRAME_HEAD_BYTES];
    while end - at >= log::FRAME_HEAD_BYTES as u64 {
        file.read_exact_at(&mut head, at)?;
        let len = u32::from_le_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        let frame = (log::FRAME_HEAD_BYTES + len) as u64;
        if len > log::FRAME_PAYLOAD_MAX || at + frame > end {
            break;
        }
        if heads.len() == newest {
            heads.pop_front();
        }
        heads.push_back((at, frame));
        at += frame;
    }
    Ok(heads)
}

/// The failure store of one function.
pub struct FailedStore {
    path: PathBuf,
    records: usize,
    bytes: u64,
    kept_max: usize,
    bytes_max: u64,
    /// The server-wide budget its `bytes` are charged to.
    disk: Arc<Budget>,
    /// Its queue was removed with its function: nothing more is written (a
    /// function made anew under the name has a store of its own at this path).
    gone: bool,
}

impl FailedStore {
    /// Opens the store in `dir`, cutting a torn tail; what it holds is
    /// charged to `disk` even beyond its ceiling.
    pub fn open(dir: &Path, disk: Arc<Budget>) -> io::Result<FailedStore> {
        FailedStore::open_bounded(dir, FAILED_KEPT_MAX, FAILED_BYTES_MAX, disk)
    }

    /// The store of a new queue in `dir` (not made yet): empty, nothing read.
    pub fn new(dir: &Path, disk: Arc<Budget>) -> FailedStore {
        FailedStore {
            path: dir.join("failed.log"),
            records: 0,
            bytes: 0,
            kept_max: FAILED_KEPT_MAX,
            bytes_max: FAILED_BYTES_MAX,
            disk,
            gone: false,
        }
    }

    /// [`FailedStore::open`] with other bounds.
    fn open_bounded(
        dir: &Path,
        kept_max: usize,
        bytes_max: u64,
        disk: Arc<Budget>,
    ) -> io::Result<FailedStore> {
        let path = dir.join("failed.log");
        let (records, bytes) = match fs::read(&path) {
            Ok(all) => {
                let (found, valid) = log::frames(&all);
                if valid < all.len() {
                    OpenOptions::new()
                        .write(true)
                        .open(&path)?
                        .set_len(valid as u64)?;
                }
                (found.len(), valid as u64)
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => (0, 0),
            Err(e) => return Err(e),
        };
        disk.take_over(bytes);
        Ok(FailedStore {
            path,
            records,
            bytes,
            kept_max,
            bytes_max,
            disk,
            gone: false,
        })
    }

    /// Appends `record` durably (before its event is acked). A record the
    /// server's disk budget has no room for is refused, nothing of it written.
    pub fn push(&mut self, record: &Value) -> io::Result<()> {
        if self.gone {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                "its function was deleted",
            ));
        }
        let mut buf = Vec::new();
        log::frame(&mut buf, &serde_json::to_vec(record).expect("json"));
        let charge = buf.len() as u64;
        if !self.disk.try_take(charge) {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                self.disk.explain(charge),
            ));
        }
        let len_before = self.bytes;
        let written = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .and_then(|mut f| {
                f.write_all(&buf)
                    .and_then(|()| f.sync_data())
                    .inspect_err(|_| {
                        // Nothing half-written stays for the next record to follow.
                        let _ = f.set_len(len_before);
                    })
            });
        if let Err(e) = written {
            self.disk.give(charge);
            return Err(e);
        }
        self.records += 1;
        self.bytes += buf.len() as u64;
        if self.records > 2 * self.kept_max || self.bytes > self.bytes_max {
            self.compact()?;
        }
        Ok(())
    }

    /// A page of the newest records kept (see [`Listing`]): the `skip`
    /// newest left out, then as many as fit in [`LIST_BYTES_MAX`], within
    /// the newest [`FAILED_KEPT_MAX`] (the file may hold up to twice as many
    /// until it is compacted). Only the frame heads of the others are read.
    pub fn list(&self, skip: usize) -> io::Result<Listing> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Listing::default()),
            Err(e) => return Err(e),
        };
        let heads = frame_heads(&file, self.kept_max)?;
        let window = heads.len().saturating_sub(skip);
        let mut first = window;
        let mut bytes = 0;
        while first > 0 && bytes + heads[first - 1].1 <= LIST_BYTES_MAX {
            first -= 1;
            bytes += heads[first].1;
        }
        let mut records = Vec::with_capacity(bytes as usize + (window - first) + 2);
        records.push(b'[');
        let mut frame = Vec::new();
        for &(offset, len) in heads.range(first..window) {
            frame.resize(len as usize, 0);
            file.read_exact_at(&mut frame, offset)?;
            let (head, payload) = frame.split_at(log::FRAME_HEAD_BYTES);
            let crc = u32::from_le_bytes(head[4..].try_into().expect("4 bytes"));
            // A record that does not read back as written JSON is left out.
            if crc32c(payload) != crc || serde_json::from_slice::<IgnoredAny>(payload).is_err() {
                continue;
            }
            if records.len() > 1 {
                records.push(b',');
            }
            records.extend_from_slice(payload);
        }
        records.push(b']');
        Ok(Listing {
            records,
            listed: window - first,
            older: first,
        })
    }

    /// Keeps the newest records within half of both bounds.
    fn compact(&mut self) -> io::Result<()> {
        let all = fs::read(&self.path)?;
        let frames = log::frames(&all).0;
        let (mut keep, mut bytes) = (0usize, 0u64);
        for (_, p) in frames.iter().rev() {
            let b = (log::FRAME_HEAD_BYTES + p.len()) as u64;
            if keep >= self.kept_max || bytes + b > self.bytes_max / 2 {
                break;
            }
            keep += 1;
            bytes += b;
        }
        let mut out = Vec::with_capacity(bytes as usize);
        for (_, p) in &frames[frames.len() - keep..] {
            log::frame(&mut out, p);
        }
        let tmp = self.path.with_extension("log.tmp");
        let mut f = File::create(&tmp)?;
        f.write_all(&out)?;
        f.sync_all()?;
        fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir)?.sync_all()?;
        }
        self.records = keep;
        self.disk.give(self.bytes - bytes);
        self.bytes = bytes;
        Ok(())
    }

    /// Its file is gone with its queue's directory: nothing is charged for it.
    pub fn removed(&mut self) {
        self.disk.give(std::mem::take(&mut self.bytes));
        self.records = 0;
        self.gone = true;
    }
}

impl Drop for FailedStore {
    /// Its file stays on disk but is no longer this server's to charge.
    fn drop(&mut self) {
        self.disk.give(std::mem::take(&mut self.bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unbounded() -> Arc<Budget> {
        Budget::new("async event disk", "bytes", u64::MAX)
    }

    fn listed(s: &FailedStore, skip: usize) -> Vec<Value> {
        serde_json::from_slice(&s.list(skip).unwrap().records).unwrap()
    }

    #[test]
    fn the_store_keeps_the_newest_records_within_its_bound() {
        let d = std::env::temp_dir().join(format!("hearth-failed-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        let mut s = FailedStore::open_bounded(&d, 10, 1 << 20, unbounded()).unwrap();
        for i in 0..21 {
            s.push(&serde_json::json!({ "n": i })).unwrap();
        }
        let kept = listed(&s, 0);
        assert_eq!(kept.len(), 10);
        assert_eq!(kept.last().unwrap()["n"], 20);
        assert_eq!(FailedStore::open(&d, unbounded()).unwrap().records, 10);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_failure_beyond_the_server_disk_cap_is_not_kept_nor_half_written() {
        let d = std::env::temp_dir().join(format!("hearth-failed-cap-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        let disk = Budget::new("async event disk", "bytes", 4096);
        let mut s = FailedStore::open(&d, disk.clone()).unwrap();
        let record = serde_json::json!({ "payload": "x".repeat(1500) });
        s.push(&record).unwrap();
        s.push(&record).unwrap();
        let len = fs::metadata(d.join("failed.log")).unwrap().len();
        let e = s.push(&record).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::StorageFull, "{e}");
        assert_eq!(fs::metadata(d.join("failed.log")).unwrap().len(), len);
        assert_eq!(disk.used(), len);
        drop(s);
        assert_eq!(disk.used(), 0, "a dropped store still charged");
        // Reopened, what it holds is charged again.
        let s = FailedStore::open(&d, disk.clone()).unwrap();
        assert_eq!((s.records, disk.used()), (2, len));
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn the_listing_holds_the_newest_records_before_a_compaction_too() {
        let d = std::env::temp_dir().join(format!("hearth-failed-list-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        let mut s = FailedStore::open_bounded(&d, 10, 1 << 20, unbounded()).unwrap();
        for i in 0..15 {
            s.push(&serde_json::json!({ "n": i })).unwrap();
        }
        assert_eq!(s.records, 15, "not compacted yet");
        let kept = listed(&s, 0);
        assert_eq!(kept.len(), 10);
        assert_eq!((&kept[0]["n"], &kept[9]["n"]), (&5.into(), &14.into()));
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_listing_reads_a_bounded_page_and_the_next_skips_it() {
        let d = std::env::temp_dir().join(format!("hearth-failed-page-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        let mut s = FailedStore::open(&d, unbounded()).unwrap();
        // 20 records of 1 MiB: 20 MiB on disk, more than a listing reads.
        let big = "x".repeat(1 << 20);
        for n in 0..20 {
            s.push(&serde_json::json!({ "n": n, "payload": big }))
                .unwrap();
        }
        let first = s.list(0).unwrap();
        assert!(
            first.records.len() as u64 <= LIST_BYTES_MAX,
            "{}",
            first.records.len()
        );
        assert_eq!((first.listed, first.older), (7, 13));
        let page: Vec<Value> = serde_json::from_slice(&first.records).unwrap();
        assert_eq!((&page[0]["n"], &page[6]["n"]), (&13.into(), &19.into()));
        let next = s.list(first.listed).unwrap();
        let page: Vec<Value> = serde_json::from_slice(&next.records).unwrap();
        assert_eq!((page.len(), next.older), (7, 6));
        assert_eq!(page[6]["n"], 12);
        assert!(listed(&s, 20).is_empty());
        let _ = fs::remove_dir_all(&d);
    }
}
