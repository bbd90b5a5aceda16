//! Events given up (retries exhausted, too old, refused by the service API),
//! each with the error of its last run: `<state>/async/<key>/failed.log`,
//! framed as the queue's segments, each record a JSON document.
//!
//! Bounded: past [`FAILED_KEPT_MAX`] × 2 records or [`FAILED_BYTES_MAX`]
//! bytes the file is rewritten (temporary file, fsync, rename) with the
//! newest records that fit in half of both. Its bytes are charged to the
//! server-wide disk budget of asynchronous events (`--async-disk-max-mb`),
//! shared with the queues: a record that does not fit is not kept.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::Value;

use super::log;
use crate::functions::budget::Budget;

/// Failed events kept per function (past twice as many, the oldest are dropped).
pub const FAILED_KEPT_MAX: usize = 1000;
/// Bytes of failed events kept per function.
pub const FAILED_BYTES_MAX: u64 = 64 << 20;

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

    /// The newest records kept (at most [`FAILED_KEPT_MAX`]: the file may
    /// hold up to twice as many until it is compacted), oldest first.
    pub fn list(&self) -> io::Result<Vec<Value>> {
        let all = match fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e),
        };
        let frames = log::frames(&all).0;
        let newest = &frames[frames.len().saturating_sub(self.kept_max)..];
        Ok(newest
            .iter()
            .filter_map(|(_, p)| serde_json::from_slice(p).ok())
            .collect())
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

    #[test]
    fn the_store_keeps_the_newest_records_within_its_bound() {
        let d = std::env::temp_dir().join(format!("hearth-failed-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        let mut s = FailedStore::open_bounded(&d, 10, 1 << 20, unbounded()).unwrap();
        for i in 0..21 {
            s.push(&serde_json::json!({ "n": i })).unwrap();
        }
        let kept = s.list().unwrap();
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
        let kept = s.list().unwrap();
        assert_eq!(kept.len(), 10);
        assert_eq!((&kept[0]["n"], &kept[9]["n"]), (&5.into(), &14.into()));
        let _ = fs::remove_dir_all(&d);
    }
}
