//! Events given up (retries exhausted, too old, refused by the service API),
//! each with the error of its last run: `<state>/async/<key>/failed.log`,
//! framed as the queue's segments, each record a JSON document.
//!
//! Bounded: past [`FAILED_KEPT_MAX`] × 2 records or [`FAILED_BYTES_MAX`]
//! bytes the file is rewritten (temporary file, fsync, rename) with the
//! newest records that fit in half of both.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::log;

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
}

impl FailedStore {
    /// Opens the store in `dir`, cutting a torn tail.
    pub fn open(dir: &Path) -> io::Result<FailedStore> {
        FailedStore::open_bounded(dir, FAILED_KEPT_MAX, FAILED_BYTES_MAX)
    }

    /// The store of a new queue in `dir` (not made yet): empty, nothing read.
    pub fn new(dir: &Path) -> FailedStore {
        FailedStore {
            path: dir.join("failed.log"),
            records: 0,
            bytes: 0,
            kept_max: FAILED_KEPT_MAX,
            bytes_max: FAILED_BYTES_MAX,
        }
    }

    /// [`FailedStore::open`] with other bounds.
    fn open_bounded(dir: &Path, kept_max: usize, bytes_max: u64) -> io::Result<FailedStore> {
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
        Ok(FailedStore {
            path,
            records,
            bytes,
            kept_max,
            bytes_max,
        })
    }

    /// Appends `record` durably (before its event is acked).
    pub fn push(&mut self, record: &Value) -> io::Result<()> {
        let mut buf = Vec::new();
        log::frame(&mut buf, &serde_json::to_vec(record).expect("json"));
        let mut f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        f.write_all(&buf)?;
        f.sync_data()?;
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
        self.bytes = bytes;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_store_keeps_the_newest_records_within_its_bound() {
        let d = std::env::temp_dir().join(format!("hearth-failed-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        let mut s = FailedStore::open_bounded(&d, 10, 1 << 20).unwrap();
        for i in 0..21 {
            s.push(&serde_json::json!({ "n": i })).unwrap();
        }
        let kept = s.list().unwrap();
        assert_eq!(kept.len(), 10);
        assert_eq!(kept.last().unwrap()["n"], 20);
        assert_eq!(FailedStore::open(&d).unwrap().records, 10);
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn the_listing_holds_the_newest_records_before_a_compaction_too() {
        let d = std::env::temp_dir().join(format!("hearth-failed-list-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        let mut s = FailedStore::open_bounded(&d, 10, 1 << 20).unwrap();
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
