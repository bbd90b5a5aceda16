//! A function's working set (REAP-style prefetch): the guest-memory pages
//! its first invocation after a restore touched, kept next to the snapshot
//! (`fc.ws`) and installed in one batch before later restores resume.
//!
//! Pure logic: turning faulted pages into sorted runs, the file format, and
//! cutting runs along the guest's memory regions into copies. Pages are
//! 4 KiB indices into the snapshot's memory file.

use std::fmt;
use std::path::Path;

use crate::sandbox::vmfiles::write_atomic;

/// The working-set file in the function directory.
pub const WS_FILE: &str = "fc.ws";
/// Guest page size the Uffd path serves (Firecracker without huge pages).
pub const PAGE_BYTES: u64 = 4096;
/// Most runs kept in one set; beyond it the largest gaps are closed first
/// (a set is never dropped for being fragmented). 64 Ki runs = 512 KiB file.
pub const RUNS_MAX: usize = 1 << 16;
/// Most pages one recording keeps (the rest of a huge first invocation is
/// faulted lazily on later restores): 1 GiB of guest memory.
pub const PAGES_MAX: usize = 1 << 18;
/// Gaps up to this many pages between two runs are copied too when the set
/// is installed: one larger copy costs less than two ioctls.
pub const GAP_FILL_PAGES: u32 = 2;

const MAGIC: &[u8; 8] = b"HEARTHWS";
const FORMAT: u32 = 1;
const HEADER_BYTES: usize = 8 + 4 + 4 + 8 + 8;

/// `pages` consecutive pages from page `first` of the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Run {
    pub first: u32,
    pub pages: u32,
}

impl Run {
    fn end(&self) -> u64 {
        self.first as u64 + self.pages as u64
    }
}

/// A recorded working set and the snapshot it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkSet {
    /// `created_ms` and `mem_bytes` of the snapshot it was recorded on: a
    /// rebuilt snapshot invalidates it.
    pub snapshot_created_ms: u64,
    pub mem_bytes: u64,
    /// Sorted, non-overlapping, non-adjacent.
    pub runs: Vec<Run>,
}

impl WorkSet {
    /// Pages in the set.
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|r| r.pages as u64).sum()
    }
}

/// Why a working-set file cannot be used.
#[derive(Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Shorter than its header, or its length disagrees with its run count.
    Length { bytes: usize, runs: u64 },
    /// Not a working-set file, or another format.
    Format,
    /// Recorded on another snapshot.
    Stale,
    /// Runs out of order, overlapping, empty or beyond the memory file.
    BadRun(usize),
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::Length { bytes, runs } => {
                write!(f, "{bytes} bytes do not hold {runs} runs")
            }
            DecodeError::Format => write!(f, "not a working-set file of format {FORMAT}"),
            DecodeError::Stale => write!(f, "recorded on another snapshot"),
            DecodeError::BadRun(i) => write!(f, "run {i} is out of order or out of range"),
        }
    }
}

/// Sorted runs of the pages in `pages` (any order, repeats allowed), at
/// most [`RUNS_MAX`] of them: if there are more, the smallest gaps are
/// filled until they fit.
pub fn runs_from_pages(pages: &mut [u32]) -> Vec<Run> {
    pages.sort_unstable();
    let mut runs: Vec<Run> = Vec::new();
    for &p in pages.iter() {
        match runs.last_mut() {
            Some(r) if r.end() > p as u64 => {}
            Some(r) if r.end() == p as u64 => r.pages += 1,
            _ => runs.push(Run { first: p, pages: 1 }),
        }
    }
    if runs.len() > RUNS_MAX {
        let mut gaps: Vec<u64> = runs
            .windows(2)
            .map(|w| w[1].first as u64 - w[0].end())
            .collect();
        gaps.sort_unstable();
        // Closing every gap up to this size leaves at most RUNS_MAX runs.
        let limit = gaps[runs.len() - RUNS_MAX - 1];
        runs = coalesce(&runs, limit);
    }
    runs
}

/// `runs` with every gap of at most `gap_pages` filled (merging its neighbours).
pub fn coalesce(runs: &[Run], gap_pages: u64) -> Vec<Run> {
    let mut out: Vec<Run> = Vec::with_capacity(runs.len());
    for &r in runs {
        match out.last_mut() {
            Some(last) if r.first as u64 - last.end() <= gap_pages => {
                last.pages = (r.end() - last.first as u64) as u32;
            }
            _ => out.push(r),
        }
    }
    out
}

/// The file's bytes: magic, format, run count, the snapshot's identity, runs (little-endian).
pub fn encode(ws: &WorkSet) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES + ws.runs.len() * 8);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT.to_le_bytes());
    out.extend_from_slice(&(ws.runs.len() as u32).to_le_bytes());
    out.extend_from_slice(&ws.snapshot_created_ms.to_le_bytes());
    out.extend_from_slice(&ws.mem_bytes.to_le_bytes());
    for r in &ws.runs {
        out.extend_from_slice(&r.first.to_le_bytes());
        out.extend_from_slice(&r.pages.to_le_bytes());
    }
    out
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// Reads a file written by [`encode`] for the snapshot made at
/// `snapshot_created_ms` with `mem_bytes` of guest memory, checking every run.
pub fn decode(
    bytes: &[u8],
    snapshot_created_ms: u64,
    mem_bytes: u64,
) -> Result<WorkSet, DecodeError> {
    if bytes.len() < HEADER_BYTES {
        return Err(DecodeError::Length {
            bytes: bytes.len(),
            runs: 0,
        });
    }
    if &bytes[..8] != MAGIC || u32_at(bytes, 8) != FORMAT {
        return Err(DecodeError::Format);
    }
    let n = u32_at(bytes, 12) as u64;
    if n > RUNS_MAX as u64 || bytes.len() as u64 != HEADER_BYTES as u64 + n * 8 {
        return Err(DecodeError::Length {
            bytes: bytes.len(),
            runs: n,
        });
    }
    let ws = WorkSet {
        snapshot_created_ms: u64_at(bytes, 16),
        mem_bytes: u64_at(bytes, 24),
        runs: (0..n as usize)
            .map(|i| Run {
                first: u32_at(bytes, HEADER_BYTES + i * 8),
                pages: u32_at(bytes, HEADER_BYTES + i * 8 + 4),
            })
            .collect(),
    };
    if ws.snapshot_created_ms != snapshot_created_ms || ws.mem_bytes != mem_bytes {
        return Err(DecodeError::Stale);
    }
    let pages_in_file = mem_bytes / PAGE_BYTES;
    let mut end = 0u64;
    for (i, r) in ws.runs.iter().enumerate() {
        // Runs are sorted and separated by at least one page; all inside the file.
        if r.pages == 0 || (i > 0 && (r.first as u64) <= end) || r.end() > pages_in_file {
            return Err(DecodeError::BadRun(i));
        }
        end = r.end();
    }
    Ok(ws)
}

/// Loads `dir/fc.ws` for this snapshot; `None` if absent, unreadable or stale
/// (a stale or damaged file is removed).
pub fn load(dir: &Path, snapshot_created_ms: u64, mem_bytes: u64) -> Option<WorkSet> {
    let path = dir.join(WS_FILE);
    let bytes = std::fs::read(&path).ok()?;
    match decode(&bytes, snapshot_created_ms, mem_bytes) {
        Ok(ws) => Some(ws),
        Err(e) => {
            eprintln!("hearth: firecracker: {} dropped: {e}", path.display());
            let _ = std::fs::remove_file(&path);
            None
        }
    }
}

/// Writes `dir/fc.ws` whole (temp file, fsync, rename).
pub fn store(dir: &Path, ws: &WorkSet) -> std::io::Result<()> {
    write_atomic(dir, WS_FILE, &encode(ws))
}

/// Where a guest-memory region lives: `size` bytes at `base` in the VMM's
/// address space, backed by the memory file from `offset`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Span {
    pub base: u64,
    pub size: u64,
    pub offset: u64,
}

/// One copy into the guest: `len` bytes from `src_offset` of the memory
/// file to `dst` in the VMM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Copy {
    pub dst: u64,
    pub src_offset: u64,
    pub len: u64,
}

/// The copies that install `runs`, cut at region boundaries; parts of runs
/// no region backs are left out.
pub fn copies(runs: &[Run], regions: &[Span]) -> Vec<Copy> {
    let mut out = Vec::new();
    for r in runs {
        let (start, end) = (r.first as u64 * PAGE_BYTES, r.end() * PAGE_BYTES);
        for g in regions {
            let (lo, hi) = (start.max(g.offset), end.min(g.offset + g.size));
            if lo < hi {
                out.push(Copy {
                    dst: g.base + (lo - g.offset),
                    src_offset: lo,
                    len: hi - lo,
                });
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(first: u32, pages: u32) -> Run {
        Run { first, pages }
    }

    #[test]
    fn faulted_pages_become_sorted_merged_runs() {
        let mut pages = vec![9, 3, 4, 5, 5, 100, 8, 3, 101];
        assert_eq!(
            runs_from_pages(&mut pages),
            [run(3, 3), run(8, 2), run(100, 2)]
        );
        assert_eq!(runs_from_pages(&mut []), []);
        assert_eq!(runs_from_pages(&mut [u32::MAX]), [run(u32::MAX, 1)]);
    }

    #[test]
    fn a_fragmented_set_is_bounded_by_filling_the_smallest_gaps() {
        // RUNS_MAX + 10 single pages: the first ten gaps are 1 page, the rest 3.
        let mut pages: Vec<u32> = (0..11).map(|i| i * 2).collect();
        pages.extend((1..RUNS_MAX as u32).map(|i| 20 + i * 4));
        let runs = runs_from_pages(&mut pages);
        assert!(runs.len() <= RUNS_MAX, "{}", runs.len());
        assert_eq!(runs[0], run(0, 21), "the 1-page gaps closed first");
        assert_eq!(runs[1], run(24, 1), "3-page gaps kept");
        let covered: u64 = runs.iter().map(|r| r.pages as u64).sum();
        assert!(covered >= pages.len() as u64);
    }

    #[test]
    fn small_gaps_are_filled_for_installing() {
        let runs = [run(0, 2), run(4, 1), run(10, 3), run(13, 0)];
        assert_eq!(coalesce(&runs, 2), [run(0, 5), run(10, 3)]);
        assert_eq!(coalesce(&runs, 0), [run(0, 2), run(4, 1), run(10, 3)]);
    }

    #[test]
    fn the_file_round_trips_and_checks_what_it_reads() {
        let ws = WorkSet {
            snapshot_created_ms: 77,
            mem_bytes: 64 * PAGE_BYTES,
            runs: vec![run(0, 2), run(10, 5), run(63, 1)],
        };
        let bytes = encode(&ws);
        assert_eq!(bytes.len(), HEADER_BYTES + 3 * 8);
        assert_eq!(decode(&bytes, 77, 64 * PAGE_BYTES), Ok(ws.clone()));
        assert_eq!(ws.pages(), 8);
        // Another snapshot, a cut file, another format.
        assert_eq!(decode(&bytes, 78, 64 * PAGE_BYTES), Err(DecodeError::Stale));
        assert_eq!(decode(&bytes, 77, 65 * PAGE_BYTES), Err(DecodeError::Stale));
        assert!(matches!(
            decode(&bytes[..bytes.len() - 1], 77, 64 * PAGE_BYTES),
            Err(DecodeError::Length { .. })
        ));
        let mut other = bytes.clone();
        other[0] = b'X';
        assert_eq!(decode(&other, 77, 0), Err(DecodeError::Format));
        // Runs past the end of memory, overlapping, adjacent or empty.
        for (runs, bad) in [
            (vec![run(0, 2), run(63, 2)], 1),
            (vec![run(5, 2), run(6, 1)], 1),
            (vec![run(5, 2), run(7, 1)], 1),
            (vec![run(5, 0)], 0),
        ] {
            let w = WorkSet { runs, ..ws.clone() };
            assert_eq!(
                decode(&encode(&w), 77, 64 * PAGE_BYTES),
                Err(DecodeError::BadRun(bad))
            );
        }
        // A run count beyond the bound is refused before anything is read.
        let mut huge = bytes[..HEADER_BYTES].to_vec();
        huge[12..16].copy_from_slice(&(RUNS_MAX as u32 + 1).to_le_bytes());
        assert!(matches!(
            decode(&huge, 77, 64 * PAGE_BYTES),
            Err(DecodeError::Length { .. })
        ));
    }

    #[test]
    fn stored_sets_are_read_back_and_stale_ones_removed() {
        let dir = std::env::temp_dir().join(format!("hearth-ws-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let ws = WorkSet {
            snapshot_created_ms: 5,
            mem_bytes: 8 * PAGE_BYTES,
            runs: vec![run(1, 3)],
        };
        store(&dir, &ws).unwrap();
        assert_eq!(load(&dir, 5, 8 * PAGE_BYTES), Some(ws));
        assert_eq!(load(&dir, 6, 8 * PAGE_BYTES), None);
        assert!(!dir.join(WS_FILE).exists(), "a stale set is removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn copies_follow_the_regions_that_back_the_file() {
        let p = PAGE_BYTES;
        // Two regions: file pages 0..4 at 0x10000, pages 4..8 at 0x90000.
        let regions = [
            Span {
                base: 0x10000,
                size: 4 * p,
                offset: 0,
            },
            Span {
                base: 0x90000,
                size: 4 * p,
                offset: 4 * p,
            },
        ];
        let c = copies(&[run(1, 1), run(3, 3), run(7, 5)], &regions);
        assert_eq!(
            c,
            [
                Copy {
                    dst: 0x10000 + p,
                    src_offset: p,
                    len: p
                },
                Copy {
                    dst: 0x10000 + 3 * p,
                    src_offset: 3 * p,
                    len: p
                },
                Copy {
                    dst: 0x90000,
                    src_offset: 4 * p,
                    len: 2 * p
                },
                Copy {
                    dst: 0x90000 + 3 * p,
                    src_offset: 7 * p,
                    len: p
                },
            ]
        );
    }
}
