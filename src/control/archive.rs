//! Checking and unpacking a user's code archive (the zip sent to `POST /deploy`).
//!
//! Work happens in two phases. The first reads only the central directory, the local headers and
//! the (tiny) symlink targets, and rejects the archive if anything about it is unsafe: its size,
//! entry count, names, symlink targets, declared sizes, compression ratios, overlapping or
//! colliding entries. Nothing touches the disk until that phase has passed. The second phase
//! inflates into a private sibling directory that is renamed onto `dest` at the end, counting the
//! bytes it really writes against the same limits: headers are trusted to reject early, never to
//! allow. Any error removes the sibling, so a failed deploy leaves nothing behind.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::ffi::CString;
use std::fmt;
use std::fs;
use std::io::{self, Cursor, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use zip::{CompressionMethod, ZipArchive};

use crate::util::{hex, random, time};

/// Compressed sizes below this count as this many bytes when a ratio is computed, so small
/// entries (a 20-byte deflate stream of 4 KiB of spaces) are not mistaken for bombs: any entry
/// may inflate to `ratio_max * 1 KiB` whatever its compressed size.
const RATIO_FLOOR_BYTES: u64 = 1024;
/// Longest entry name accepted, after normalisation (deep `node_modules/.pnpm` paths fit easily).
const NAME_BYTES_MAX: usize = 2048;
/// Longest single path component; Linux refuses longer ones anyway (NAME_MAX).
const COMPONENT_BYTES_MAX: usize = 255;
/// Most path components in an entry name. Each level is a directory to create (and a prefix
/// to look up while checking), and no real package nests anywhere near this deep.
const DEPTH_MAX: usize = 64;
/// Longest symlink target (PATH_MAX minus the terminating NUL).
const SYMLINK_TARGET_BYTES_MAX: u64 = 4095;
/// Size of the buffer entries are inflated through.
const COPY_CHUNK_BYTES: usize = 64 * 1024;

/// Zip file-type bits, as stored in the high half of the external attributes.
const S_IFMT: u32 = 0o170000;
const S_IFREG: u32 = 0o100000;
const S_IFDIR: u32 = 0o040000;
const S_IFLNK: u32 = 0o120000;

/// Limits applied to an uploaded archive; the defaults are Lambda's.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ArchiveLimits {
    /// Size of the zip itself.
    pub compressed_bytes_max: u64,
    /// Total bytes of file content once unpacked (symlink targets included).
    pub unpacked_bytes_max: u64,
    /// Entries in the central directory: files, directories and symlinks.
    pub entries_max: usize,
    /// Largest uncompressed/compressed ratio, per entry and for the whole archive.
    pub ratio_max: u64,
}

impl Default for ArchiveLimits {
    fn default() -> Self {
        ArchiveLimits {
            compressed_bytes_max: 50 * 1024 * 1024,
            unpacked_bytes_max: 250 * 1024 * 1024,
            entries_max: 20_000,
            ratio_max: 200,
        }
    }
}

/// What an extraction produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extracted {
    /// Regular files written.
    pub files: usize,
    /// Directories created, whether listed in the zip or implied by a file's path.
    pub dirs: usize,
    /// Symlinks created.
    pub symlinks: usize,
    /// Bytes of regular-file content actually written.
    pub unpacked_bytes: u64,
}

/// Why an archive was refused or could not be unpacked.
///
/// `status` is the HTTP status for the deploy response: 400 for a malformed or unsafe archive,
/// 413 for one over a limit, 500 (`code` "io") when the host failed to write it.
#[derive(Debug)]
pub struct ArchiveError {
    /// HTTP status to answer with.
    pub status: u16,
    /// Stable machine-readable reason: "not_a_zip", "too_large", "too_many_entries",
    /// "unsafe_path", "unsafe_symlink", "zip_bomb", "unpacked_too_large", "bad_entry", "io".
    pub code: &'static str,
    /// What was wrong, naming the entry or value.
    pub message: String,
}

impl ArchiveError {
    fn bad(code: &'static str, message: String) -> Self {
        ArchiveError {
            status: 400,
            code,
            message,
        }
    }

    fn too_big(code: &'static str, message: String) -> Self {
        ArchiveError {
            status: 413,
            code,
            message,
        }
    }

    fn io(what: String, err: io::Error) -> Self {
        ArchiveError {
            status: 500,
            code: "io",
            message: format!("{what}: {err}"),
        }
    }
}

impl fmt::Display for ArchiveError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}): {}", self.code, self.status, self.message)
    }
}

impl std::error::Error for ArchiveError {}

/// Copies a deployed function's code tree (unpacked and checked by
/// [`extract_zip`] before) to `dest`, within `limits`' byte and entry counts.
/// Symlinks are copied as links; nothing else but files and directories is
/// expected. Used when only a function's configuration changes.
pub fn copy_tree(
    src: &Path,
    dest: &Path,
    limits: &ArchiveLimits,
) -> Result<Extracted, ArchiveError> {
    let mut out = Extracted::default();
    copy_dir(src, dest, limits, &mut out)?;
    Ok(out)
}

fn copy_dir(
    src: &Path,
    dest: &Path,
    limits: &ArchiveLimits,
    out: &mut Extracted,
) -> Result<(), ArchiveError> {
    let io_err = |what: &str, p: &Path, e| ArchiveError::io(format!("{what} {}", p.display()), e);
    fs::create_dir(dest).map_err(|e| io_err("cannot create", dest, e))?;
    out.dirs += 1;
    let entries = fs::read_dir(src).map_err(|e| io_err("cannot read", src, e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_err("cannot read", src, e))?;
        if out.files + out.dirs + out.symlinks >= limits.entries_max {
            return Err(ArchiveError::too_big(
                "too_many_entries",
                format!("the code has more than {} entries", limits.entries_max),
            ));
        }
        let (from, to) = (entry.path(), dest.join(entry.file_name()));
        let kind = entry
            .file_type()
            .map_err(|e| io_err("cannot stat", &from, e))?;
        if kind.is_dir() {
            copy_dir(&from, &to, limits, out)?;
        } else if kind.is_symlink() {
            let target = fs::read_link(&from).map_err(|e| io_err("cannot read", &from, e))?;
            std::os::unix::fs::symlink(&target, &to)
                .map_err(|e| io_err("cannot create", &to, e))?;
            out.symlinks += 1;
        } else if kind.is_file() {
            let n = fs::copy(&from, &to).map_err(|e| io_err("cannot copy", &from, e))?;
            out.files += 1;
            out.unpacked_bytes += n;
            if out.unpacked_bytes > limits.unpacked_bytes_max {
                return Err(ArchiveError::too_big(
                    "unpacked_too_large",
                    format!(
                        "the code takes more than {} bytes",
                        limits.unpacked_bytes_max
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Checks the whole archive first (central directory: entry count, declared sizes, names, symlink
/// targets) and only then extracts into `dest`, which must not exist yet.
///
/// On any error, nothing is left at `dest`. Files get mode 0644 (0755 if any exec bit is set in
/// the zip), directories 0755; everything is owned by the current user. The layout is kept as
/// zipped: a single top-level folder is not unwrapped (Lambda does the same).
pub fn extract_zip(
    zip: &[u8],
    dest: &Path,
    limits: &ArchiveLimits,
) -> Result<Extracted, ArchiveError> {
    if fs::symlink_metadata(dest).is_ok() {
        return Err(ArchiveError::io(
            format!("cannot extract into {}", dest.display()),
            io::Error::from(io::ErrorKind::AlreadyExists),
        ));
    }
    let (mut archive, entries) = check(zip, limits)?;
    unpack(&mut archive, &entries, dest, limits)
}

/// One archive entry that passed the checks.
struct Entry {
    /// Position in the archive, for `ZipArchive::by_index`.
    index: usize,
    /// Normalised relative path: '/'-separated, no empty, "." or ".." components.
    path: String,
    kind: Kind,
    /// Declared uncompressed size.
    size_bytes: u64,
    /// Declared compressed size.
    compressed_bytes: u64,
}

enum Kind {
    Dir,
    File { executable: bool },
    Symlink { target: String },
}

/// What the central directory and local header say about one entry.
struct Listing {
    name: String,
    name_has_nul: bool,
    unix_mode: Option<u32>,
    method: CompressionMethod,
    encrypted: bool,
    size_bytes: u64,
    compressed_bytes: u64,
    header_start: u64,
    data_start: u64,
    central_start: u64,
}

type Archive<'z> = ZipArchive<Cursor<&'z [u8]>>;

/// Phase one: everything that can be decided before writing a byte.
fn check<'z>(
    zip: &'z [u8],
    limits: &ArchiveLimits,
) -> Result<(Archive<'z>, Vec<Entry>), ArchiveError> {
    if zip.is_empty() {
        return Err(ArchiveError::bad(
            "not_a_zip",
            "the archive is empty (0 bytes)".into(),
        ));
    }
    let zip_bytes = zip.len() as u64;
    if zip_bytes > limits.compressed_bytes_max {
        return Err(ArchiveError::too_big(
            "too_large",
            format!(
                "the archive is {zip_bytes} bytes, over the limit of {} bytes",
                limits.compressed_bytes_max
            ),
        ));
    }
    // Fail fast, before the zip reader allocates metadata for every declared entry.
    let last = last_end_record(zip)?;
    if last.entries > limits.entries_max as u64 {
        return Err(too_many_entries(last.entries, limits));
    }
    check_end_records(zip, limits)?;
    let mut archive = ZipArchive::new(Cursor::new(zip))
        .map_err(|e| ArchiveError::bad("not_a_zip", format!("not a readable zip archive: {e}")))?;
    if archive.len() > limits.entries_max {
        return Err(too_many_entries(archive.len() as u64, limits));
    }
    // The reader passes over a last record whose directory it cannot read to the one before it;
    // other tools read the last one (and fail, or list other entries). Only the directory that
    // record names, right before it, is accepted.
    let directory_start = archive.central_directory_start();
    if directory_start.checked_add(last.directory_bytes) != Some(last.at) {
        return Err(ArchiveError::bad(
            "not_a_zip",
            format!(
                "not a readable zip archive: the last end of central directory record names a directory of {} bytes ending at offset {}, but the zip reader read one at offset {directory_start}",
                last.directory_bytes, last.at
            ),
        ));
    }

    let mut listings = Vec::with_capacity(archive.len());
    for index in 0..archive.len() {
        listings.push(list_entry(&mut archive, index)?);
    }
    check_no_dropped_duplicates(zip, archive.central_directory_start(), &listings)?;
    check_no_overlap(&listings, archive.central_directory_start())?;

    let mut entries = Vec::with_capacity(listings.len());
    let mut declared_total_bytes: u64 = 0;
    for (index, listing) in listings.iter().enumerate() {
        let Some(entry) = classify(index, listing, limits)? else {
            continue;
        };
        declared_total_bytes = declared_total_bytes.saturating_add(entry.size_bytes);
        entries.push(entry);
    }
    if declared_total_bytes > limits.unpacked_bytes_max {
        return Err(ArchiveError::too_big(
            "unpacked_too_large",
            format!(
                "the archive declares {declared_total_bytes} bytes once unpacked, over the limit of {} bytes",
                limits.unpacked_bytes_max
            ),
        ));
    }
    if declared_total_bytes > ratio_bound(zip_bytes, limits) {
        return Err(ArchiveError::too_big(
            "zip_bomb",
            format!(
                "the archive inflates from {zip_bytes} to {declared_total_bytes} bytes, over the compression ratio limit of {}",
                limits.ratio_max
            ),
        ));
    }

    check_layout(&entries)?;
    // Directories implied by deep names are created too, so they count as entries: a small
    // zip of `d1/a/a/…/f` names would otherwise make tens of thousands of them.
    let files_and_links = entries
        .iter()
        .filter(|e| !matches!(e.kind, Kind::Dir))
        .count();
    let dirs = directories(&entries, limits.entries_max.saturating_sub(files_and_links));
    if files_and_links + dirs.len() > limits.entries_max {
        return Err(ArchiveError::too_big(
            "too_many_entries",
            format!(
                "the archive has more than {} entries counting the directories its paths imply",
                limits.entries_max
            ),
        ));
    }
    drop(dirs);
    for entry in &mut entries {
        if let Kind::Symlink { target } = &mut entry.kind {
            *target =
                read_symlink_target(&mut archive, entry.index, &entry.path, entry.size_bytes)?;
        }
    }
    let symlinks: HashSet<&str> = entries
        .iter()
        .filter(|e| matches!(e.kind, Kind::Symlink { .. }))
        .map(|e| e.path.as_str())
        .collect();
    for entry in &entries {
        if let Kind::Symlink { target } = &entry.kind {
            check_symlink_target(&entry.path, target, &symlinks)?;
        }
    }
    Ok((archive, entries))
}

fn too_many_entries(count: u64, limits: &ArchiveLimits) -> ArchiveError {
    ArchiveError::too_big(
        "too_many_entries",
        format!(
            "the archive has {count} entries, over the limit of {}",
            limits.entries_max
        ),
    )
}

/// Largest uncompressed size allowed for `compressed_bytes` of input.
fn ratio_bound(compressed_bytes: u64, limits: &ArchiveLimits) -> u64 {
    limits
        .ratio_max
        .saturating_mul(compressed_bytes.max(RATIO_FLOOR_BYTES))
}

/// The end of central directory record nearest the end of an archive (see [`last_end_record`]).
#[derive(Debug)]
struct EndRecord {
    /// Entries it declares (its zip64 record's count when it has one).
    entries: u64,
    /// Where the central directory it names ends: at its zip64 record when it has one, else at
    /// the record itself.
    at: u64,
    /// Size of the central directory it names.
    directory_bytes: u64,
}

/// The end-of-central-directory record nearest the end (zip64 if present).
///
/// Its count is checked before the zip reader parses the central directory, which allocates for
/// every record it lists. The record must be whole and its comment must fit in the file: a stray
/// or truncated signature after the real record (`PK\x05\x06` and two bytes) is skipped as the
/// zip reader skips it, so it cannot hide the real count. An archive with no such record in its
/// last 64 KiB + 22 bytes, or a zip64 locator that points at no zip64 record, is refused rather
/// than handed to the reader unchecked.
fn last_end_record(zip: &[u8]) -> Result<EndRecord, ArchiveError> {
    const EOCD: &[u8] = b"PK\x05\x06";
    const LOCATOR64: &[u8] = b"PK\x06\x07";
    const EOCD64: &[u8] = b"PK\x06\x06";
    const EOCD_BYTES: usize = 22;
    // The record is 22 bytes plus a comment of at most 64 KiB.
    let search_from = zip.len().saturating_sub(EOCD_BYTES + 0xFFFF);
    let tail = &zip[search_from..];
    let well_formed = |at: &usize| {
        let Some(record) = tail.get(*at..*at + EOCD_BYTES) else {
            return false;
        };
        let comment_bytes = usize::from(u16::from_le_bytes([record[20], record[21]]));
        at + EOCD_BYTES + comment_bytes <= tail.len()
    };
    let eocd = search_from
        + (0..tail.len().saturating_sub(3))
            .rev()
            .filter(|&at| &tail[at..at + 4] == EOCD)
            .find(well_formed)
            .ok_or_else(|| {
                ArchiveError::bad(
                    "not_a_zip",
                    "not a readable zip archive: no end of central directory record in the last 64 KiB".into(),
                )
            })?;
    let record = &zip[eocd..eocd + EOCD_BYTES];
    let count32 = u64::from(u16::from_le_bytes([record[10], record[11]]));
    let offset32 = u32::from_le_bytes(record[16..20].try_into().unwrap());
    let zip32 = EndRecord {
        entries: count32,
        at: eocd as u64,
        directory_bytes: u64::from(u32::from_le_bytes(record[12..16].try_into().unwrap())),
    };
    // As the zip reader decides which records to read.
    if count32 != 0xFFFF && offset32 != u32::MAX {
        return Ok(zip32);
    }
    let Some(locator) = eocd.checked_sub(20).map(|at| &zip[at..eocd]) else {
        return Ok(zip32);
    };
    if &locator[..4] != LOCATOR64 {
        return Ok(zip32);
    }
    let bad_zip64 = || {
        ArchiveError::bad(
            "not_a_zip",
            "not a readable zip archive: the zip64 locator does not point at a zip64 end of central directory record".into(),
        )
    };
    let eocd64_at = usize::try_from(u64::from_le_bytes(locator[8..16].try_into().unwrap()))
        .map_err(|_| bad_zip64())?;
    let eocd64 = eocd64_at
        .checked_add(56)
        .and_then(|end| zip.get(eocd64_at..end))
        .filter(|record| &record[..4] == EOCD64)
        .ok_or_else(bad_zip64)?;
    Ok(EndRecord {
        entries: u64::from_le_bytes(eocd64[32..40].try_into().unwrap()),
        at: eocd64_at as u64,
        directory_bytes: u64::from_le_bytes(eocd64[40..48].try_into().unwrap()),
    })
}

/// Holds every end of central directory record in the archive to the entry limit, not only the
/// last one.
///
/// When the zip reader cannot use the last record (its directory is not where it says, a central
/// record in it does not parse, its zip64 record is not found), it goes on to the record before
/// it, anywhere in the file, and parses as many central records as that one declares before
/// hearth sees any: a few bytes appended to an archive of a million central records would
/// otherwise cost hundreds of MiB and seconds of CPU. Each count is read where the reader reads
/// it: a zip32 record's entries on this disk (and in total), unless the record may be zip64 and a
/// zip64 locator precedes it (then the reader counts with a zip64 record, and every zip64 record
/// is checked). A stored archive inside the code counts too, when it lists more than the limit.
fn check_end_records(zip: &[u8], limits: &ArchiveLimits) -> Result<(), ArchiveError> {
    let max = limits.entries_max as u64;
    let over = |at: usize, count: u64| {
        if count <= max {
            return Ok(());
        }
        Err(ArchiveError::too_big(
            "too_many_entries",
            format!(
                "the end of central directory record at offset {at} declares {count} entries, over the limit of {max} (the zip reader reads an earlier record's directory when it cannot read the last one's)"
            ),
        ))
    };
    let u16_at = |at: usize| u64::from(u16::from_le_bytes([zip[at], zip[at + 1]]));
    let u32_at = |at: usize| u64::from(u32::from_le_bytes(zip[at..at + 4].try_into().unwrap()));
    let u64_at = |at: usize| u64::from_le_bytes(zip[at..at + 8].try_into().unwrap());
    // Compressed data is close to random, so the signatures turn up in it now and then (about
    // once per 4 GiB each). Only a record that names a central directory is one the reader
    // could read: a central header signature where its offset points, or right before it
    // (where the reader also looks, for archives with bytes prepended). A stray signature
    // passes this by chance about once in 2^31.
    let names_directory = |at: usize, size: u64, offset: u64| {
        let header_at = |start: u64| {
            usize::try_from(start)
                .ok()
                .and_then(|s| zip.get(s..s.checked_add(4)?))
                .is_some_and(|sig| sig == b"PK\x01\x02")
        };
        header_at(offset) || (at as u64).checked_sub(size).is_some_and(header_at)
    };
    for at in memchr::memmem::find_iter(zip, b"PK\x05\x06") {
        // The reader skips a record that is not whole, comment included.
        if at + 22 > zip.len() || at + 22 + u16_at(at + 20) as usize > zip.len() {
            continue;
        }
        let may_be_zip64 = u16_at(at + 10) == 0xFFFF || zip[at + 16..at + 20] == [0xFF; 4];
        if may_be_zip64 && at >= 20 && &zip[at - 20..at - 16] == b"PK\x06\x07" {
            continue;
        }
        if names_directory(at, u32_at(at + 12), u32_at(at + 16)) {
            over(at, u16_at(at + 8).max(u16_at(at + 10)))?;
        }
    }
    for at in memchr::memmem::find_iter(zip, b"PK\x06\x06") {
        if at + 56 <= zip.len() && names_directory(at, u64_at(at + 40), u64_at(at + 48)) {
            over(at, u64_at(at + 24).max(u64_at(at + 32)))?;
        }
    }
    Ok(())
}

fn list_entry(archive: &mut Archive<'_>, index: usize) -> Result<Listing, ArchiveError> {
    // Raw access parses the local header (and fails on a broken one) without inflating anything.
    let file = archive.by_index_raw(index).map_err(|e| {
        ArchiveError::bad("bad_entry", format!("entry #{index} cannot be read: {e}"))
    })?;
    Ok(Listing {
        name: file.name().to_string(),
        name_has_nul: file.name_raw().contains(&0),
        unix_mode: file.unix_mode(),
        method: file.compression(),
        encrypted: file.encrypted(),
        size_bytes: file.size(),
        compressed_bytes: file.compressed_size(),
        header_start: file.header_start(),
        data_start: file.data_start(),
        central_start: file.central_header_start(),
    })
}

/// Rejects archives that list the same name twice.
///
/// The zip reader keys entries by name and silently keeps only the last of a duplicated name,
/// so duplicates cannot be seen in its listing. They show up as a gap instead: the central
/// directory is one contiguous run of records, and a dropped record leaves a hole in it.
fn check_no_dropped_duplicates(
    zip: &[u8],
    directory_start: u64,
    listings: &[Listing],
) -> Result<(), ArchiveError> {
    let mut starts: Vec<u64> = listings.iter().map(|l| l.central_start).collect();
    starts.sort_unstable();
    let mut expected = directory_start;
    for start in starts {
        if start != expected {
            let name = central_record(zip, expected)
                .map(|(_, name)| name)
                .unwrap_or_else(|| format!("at offset {expected}"));
            return Err(ArchiveError::bad(
                "unsafe_path",
                format!("entry '{name}' appears more than once in the archive; a later copy would overwrite it"),
            ));
        }
        let (record_bytes, _) = central_record(zip, start).ok_or_else(|| {
            ArchiveError::bad(
                "not_a_zip",
                format!("central directory record at offset {start} is unreadable"),
            )
        })?;
        expected = start + record_bytes;
    }
    Ok(())
}

/// Length and name of the central directory record at `start`.
fn central_record(zip: &[u8], start: u64) -> Option<(u64, String)> {
    let start = usize::try_from(start).ok()?;
    let header = zip.get(start..start.checked_add(46)?)?;
    if &header[..4] != b"PK\x01\x02" {
        return None;
    }
    let field = |at: usize| usize::from(u16::from_le_bytes([header[at], header[at + 1]]));
    let (name_bytes, extra_bytes, comment_bytes) = (field(28), field(30), field(32));
    let name = zip.get(start + 46..start + 46 + name_bytes)?;
    Some((
        (46 + name_bytes + extra_bytes + comment_bytes) as u64,
        String::from_utf8_lossy(name).into_owned(),
    ))
}

/// Rejects entries whose bytes overlap another's or run into the central directory.
///
/// Overlapping entries are how the densest zip bombs reuse one compressed kernel many times;
/// an honest archive never has them.
fn check_no_overlap(listings: &[Listing], directory_start: u64) -> Result<(), ArchiveError> {
    let mut spans: Vec<(u64, u64, &str)> = Vec::with_capacity(listings.len());
    for listing in listings {
        let end = listing.data_start.saturating_add(listing.compressed_bytes);
        if end > directory_start {
            return Err(ArchiveError::bad(
                "bad_entry",
                format!(
                    "entry '{}' claims {} compressed bytes, which run past the end of the entry data",
                    listing.name, listing.compressed_bytes
                ),
            ));
        }
        spans.push((listing.header_start, end, &listing.name));
    }
    spans.sort_unstable();
    for pair in spans.windows(2) {
        let ((_, first_end, first), (second_start, _, second)) = (pair[0], pair[1]);
        if second_start < first_end {
            return Err(ArchiveError::too_big(
                "zip_bomb",
                format!("entries '{first}' and '{second}' share bytes in the archive (an overlapping-entry zip bomb)"),
            ));
        }
    }
    Ok(())
}

/// Validates one entry on its own; `None` for an entry naming the root directory ("./").
fn classify(
    index: usize,
    listing: &Listing,
    limits: &ArchiveLimits,
) -> Result<Option<Entry>, ArchiveError> {
    let name = &listing.name;
    let (path, trailing_slash) = normalize_name(name, listing.name_has_nul)?;
    if listing.encrypted {
        return Err(ArchiveError::bad(
            "bad_entry",
            format!("entry '{name}' is encrypted; upload an unencrypted zip"),
        ));
    }
    if !matches!(
        listing.method,
        CompressionMethod::Stored | CompressionMethod::Deflated
    ) {
        return Err(ArchiveError::bad(
            "bad_entry",
            format!(
                "entry '{name}' uses compression method {}; only stored and deflate are supported",
                listing.method
            ),
        ));
    }
    let mode = listing.unix_mode.unwrap_or(0);
    let kind = match mode & S_IFMT {
        S_IFLNK if trailing_slash => {
            return Err(ArchiveError::bad("bad_entry", format!("entry '{name}' is a symlink but its name ends in '/'")))
        }
        S_IFLNK => Kind::Symlink { target: String::new() },
        S_IFDIR => Kind::Dir,
        0 | S_IFREG if trailing_slash => Kind::Dir,
        0 | S_IFREG => Kind::File { executable: mode & 0o111 != 0 },
        other => {
            return Err(ArchiveError::bad(
                "bad_entry",
                format!("entry '{name}' is a special file (type bits {other:o}); only files, directories and symlinks are allowed"),
            ))
        }
    };
    if path.is_empty() {
        return match kind {
            Kind::Dir => Ok(None),
            _ => Err(ArchiveError::bad(
                "unsafe_path",
                format!("entry '{name}' names the archive root but is not a directory"),
            )),
        };
    }
    match kind {
        Kind::Dir if listing.size_bytes != 0 => {
            return Err(ArchiveError::bad(
                "bad_entry",
                format!("directory entry '{name}' carries {} bytes of data", listing.size_bytes),
            ))
        }
        Kind::Symlink { .. } if listing.size_bytes > SYMLINK_TARGET_BYTES_MAX => {
            return Err(ArchiveError::bad(
                "bad_entry",
                format!(
                    "symlink '{name}' has a {}-byte target, over the limit of {SYMLINK_TARGET_BYTES_MAX} bytes",
                    listing.size_bytes
                ),
            ))
        }
        _ => {}
    }
    if listing.size_bytes > ratio_bound(listing.compressed_bytes, limits) {
        return Err(ArchiveError::too_big(
            "zip_bomb",
            format!(
                "entry '{name}' inflates from {} to {} bytes, over the compression ratio limit of {}",
                listing.compressed_bytes, listing.size_bytes, limits.ratio_max
            ),
        ));
    }
    Ok(Some(Entry {
        index,
        path,
        kind,
        size_bytes: listing.size_bytes,
        compressed_bytes: listing.compressed_bytes,
    }))
}

/// Turns an entry name into a safe relative path, or says why it is not one.
///
/// Returns the path without its trailing '/' and whether there was one. "." components are
/// dropped (some tools write "./app.js"); everything that could leave the tree or mean something
/// else on another system is refused: "..", absolute paths, '\' (a Windows separator, so
/// "..\x" is an escape there), drive letters, NUL, empty components.
fn normalize_name(name: &str, has_nul: bool) -> Result<(String, bool), ArchiveError> {
    let unsafe_path = |why: &str| {
        ArchiveError::bad(
            "unsafe_path",
            format!("entry '{}' {why}", name.escape_debug()),
        )
    };
    if has_nul || name.contains('\0') {
        return Err(unsafe_path("contains a NUL byte"));
    }
    if name.contains('\\') {
        return Err(unsafe_path(
            "contains '\\'; zip paths must use '/' as the separator",
        ));
    }
    if name.starts_with('/') {
        return Err(unsafe_path("is an absolute path"));
    }
    let bytes = name.as_bytes();
    if bytes.len() >= 2 && bytes[0].is_ascii_alphabetic() && bytes[1] == b':' {
        return Err(unsafe_path("starts with a drive letter"));
    }
    let (body, trailing_slash) = match name.strip_suffix('/') {
        Some(body) => (body, true),
        None => (name, false),
    };
    let mut parts: Vec<&str> = Vec::new();
    for component in body.split('/') {
        match component {
            "" if body.is_empty() => {}
            "" => return Err(unsafe_path("has an empty path component")),
            "." => {}
            ".." => return Err(unsafe_path("contains a '..' component")),
            long if long.len() > COMPONENT_BYTES_MAX => {
                return Err(unsafe_path(&format!(
                    "has a component longer than {COMPONENT_BYTES_MAX} bytes"
                )))
            }
            ok => parts.push(ok),
        }
    }
    if parts.len() > DEPTH_MAX {
        return Err(ArchiveError::bad(
            "too_deep",
            format!(
                "entry '{}' is {} directories deep, over the limit of {DEPTH_MAX}",
                name.escape_debug(),
                parts.len()
            ),
        ));
    }
    let path = parts.join("/");
    if path.len() > NAME_BYTES_MAX {
        return Err(unsafe_path(&format!(
            "is longer than {NAME_BYTES_MAX} bytes"
        )));
    }
    Ok((path, trailing_slash))
}

/// Rejects two entries unpacking to the same path, and entries that would be created inside a
/// file or through a symlink (whatever the order of the entries in the archive).
fn check_layout(entries: &[Entry]) -> Result<(), ArchiveError> {
    let mut by_path: HashMap<&str, &Entry> = HashMap::with_capacity(entries.len());
    for entry in entries {
        if let Some(previous) = by_path.insert(&entry.path, entry) {
            return Err(ArchiveError::bad(
                "unsafe_path",
                format!(
                    "entries #{} and #{} both unpack to '{}'",
                    previous.index, entry.index, entry.path
                ),
            ));
        }
    }
    for entry in entries {
        for (at, _) in entry.path.match_indices('/') {
            let prefix = &entry.path[..at];
            match by_path.get(prefix).map(|e| &e.kind) {
                Some(Kind::File { .. }) => {
                    return Err(ArchiveError::bad(
                        "unsafe_path",
                        format!(
                            "entry '{}' would be created inside '{prefix}', which is a file",
                            entry.path
                        ),
                    ))
                }
                Some(Kind::Symlink { .. }) => {
                    return Err(ArchiveError::bad(
                        "unsafe_path",
                        format!(
                            "entry '{}' would be written through the symlink '{prefix}'",
                            entry.path
                        ),
                    ))
                }
                Some(Kind::Dir) | None => {}
            }
        }
    }
    Ok(())
}

fn read_symlink_target(
    archive: &mut Archive<'_>,
    index: usize,
    path: &str,
    size_bytes: u64,
) -> Result<String, ArchiveError> {
    let corrupt = |e: &dyn fmt::Display| {
        ArchiveError::bad("bad_entry", format!("symlink '{path}' is corrupt: {e}"))
    };
    let file = archive.by_index(index).map_err(|e| corrupt(&e))?;
    let mut target = Vec::new();
    // Read one byte past the limit so an entry lying about its size is still caught.
    file.take(SYMLINK_TARGET_BYTES_MAX + 1)
        .read_to_end(&mut target)
        .map_err(|e| corrupt(&e))?;
    if target.len() as u64 != size_bytes {
        return Err(corrupt(&format_args!(
            "target is {} bytes, header declares {size_bytes}",
            target.len()
        )));
    }
    String::from_utf8(target).map_err(|_| corrupt(&"target is not UTF-8"))
}

/// Checks that a symlink's target, resolved lexically from the link's directory, stays inside
/// the tree.
///
/// Lexical resolution matches the kernel's only while no component walked so far is itself a
/// symlink: after `d/up` -> "..", the path "d/up/.." is the parent of the tree's root, not `d`.
/// So a ".." that would step back out of another symlink in the archive is refused too.
/// Targets that name missing files are fine (Lambda allows dangling links).
fn check_symlink_target(
    link: &str,
    target: &str,
    symlinks: &HashSet<&str>,
) -> Result<(), ArchiveError> {
    let unsafe_symlink = |why: String| {
        ArchiveError::bad(
            "unsafe_symlink",
            format!("symlink '{link}' -> '{}' {why}", target.escape_debug()),
        )
    };
    if target.is_empty() {
        return Err(unsafe_symlink("has an empty target".into()));
    }
    if target.contains('\0') {
        return Err(unsafe_symlink("contains a NUL byte".into()));
    }
    if target.starts_with('/') {
        return Err(unsafe_symlink("is absolute".into()));
    }
    let mut stack: Vec<&str> = link.split('/').collect();
    stack.pop();
    for component in target.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                if stack.is_empty() {
                    return Err(unsafe_symlink("points outside the archive".into()));
                }
                for depth in 1..=stack.len() {
                    let walked = stack[..depth].join("/");
                    if symlinks.contains(walked.as_str()) {
                        return Err(unsafe_symlink(format!(
                            "uses '..' after passing through the symlink '{walked}'"
                        )));
                    }
                }
                stack.pop();
            }
            name => stack.push(name),
        }
    }
    Ok(())
}

/// Phase two: writes the checked entries into a private sibling of `dest`, then renames it.
fn unpack(
    archive: &mut Archive<'_>,
    entries: &[Entry],
    dest: &Path,
    limits: &ArchiveLimits,
) -> Result<Extracted, ArchiveError> {
    let staging = create_staging_dir(dest)?;
    let result = write_tree(archive, entries, &staging, limits).and_then(|extracted| {
        publish(&staging, dest)?;
        Ok(extracted)
    });
    if result.is_err() {
        // Best effort: the error being returned matters more than a failed cleanup.
        let _ = fs::remove_dir_all(&staging);
    }
    result
}

/// Creates `<dest>.partial-<random>` next to `dest`, readable only by us while it fills.
///
/// The name needs to be unique, not secret: creation is exclusive, so a name taken by someone
/// else is an error (retried), never a directory we write into.
fn create_staging_dir(dest: &Path) -> Result<PathBuf, ArchiveError> {
    let file_name = dest.file_name().ok_or_else(|| {
        ArchiveError::io(
            format!("cannot extract into {}", dest.display()),
            io::Error::from(io::ErrorKind::InvalidInput),
        )
    })?;
    let mut last_error = None;
    for _ in 0..4 {
        let mut staging_name = file_name.to_os_string();
        staging_name.push(format!(".partial-{}", random_hex()));
        let staging = dest.with_file_name(staging_name);
        match fs::DirBuilder::new().mode(0o700).create(&staging) {
            Ok(()) => return Ok(staging),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => last_error = Some(e),
            Err(e) => {
                return Err(ArchiveError::io(
                    format!("cannot create {}", staging.display()),
                    e,
                ))
            }
        }
    }
    Err(ArchiveError::io(
        format!(
            "cannot create a staging directory next to {}",
            dest.display()
        ),
        last_error.unwrap_or_else(|| io::Error::from(io::ErrorKind::AlreadyExists)),
    ))
}

/// 16 hex digits for a staging name; from the clock and pid if the kernel has no random bytes.
fn random_hex() -> String {
    let mut bytes = [0u8; 8];
    if random::fill(&mut bytes).is_err() {
        let nanos = time::since_unix_epoch().as_nanos() as u64;
        bytes = (nanos ^ (u64::from(std::process::id()) << 32)).to_le_bytes();
    }
    hex::encode(&bytes)
}

/// Every directory, listed or implied by a deeper name; sorted, so parents come before
/// children. Stops growing once it holds more than `stop_after`, for a caller that only
/// needs to know the count is over a limit.
fn directories(entries: &[Entry], stop_after: usize) -> BTreeSet<&str> {
    let mut dirs: BTreeSet<&str> = BTreeSet::new();
    for entry in entries {
        if matches!(entry.kind, Kind::Dir) {
            dirs.insert(&entry.path);
        }
        for (at, _) in entry.path.match_indices('/') {
            dirs.insert(&entry.path[..at]);
        }
        if dirs.len() > stop_after {
            break;
        }
    }
    dirs
}

fn write_tree(
    archive: &mut Archive<'_>,
    entries: &[Entry],
    root: &Path,
    limits: &ArchiveLimits,
) -> Result<Extracted, ArchiveError> {
    let mut extracted = Extracted::default();

    let dirs = directories(entries, usize::MAX);
    for dir in &dirs {
        let path = root.join(dir);
        fs::DirBuilder::new()
            .mode(0o755)
            .create(&path)
            .and_then(|()| fs::set_permissions(&path, fs::Permissions::from_mode(0o755)))
            .map_err(|e| {
                ArchiveError::io(format!("cannot create directory {}", path.display()), e)
            })?;
    }
    extracted.dirs = dirs.len();

    let mut buffer = vec![0u8; COPY_CHUNK_BYTES];
    for entry in entries {
        let Kind::File { executable } = entry.kind else {
            continue;
        };
        let written = write_file(
            archive,
            entry,
            root,
            &mut buffer,
            extracted.unpacked_bytes,
            limits,
        )?;
        let path = root.join(&entry.path);
        let mode = if executable { 0o755 } else { 0o644 };
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).map_err(|e| {
            ArchiveError::io(format!("cannot set permissions on {}", path.display()), e)
        })?;
        extracted.files += 1;
        extracted.unpacked_bytes += written;
    }

    // Links last: while files are written no symlink exists in the tree at all.
    for entry in entries {
        let Kind::Symlink { target } = &entry.kind else {
            continue;
        };
        let path = root.join(&entry.path);
        std::os::unix::fs::symlink(target, &path).map_err(|e| {
            ArchiveError::io(format!("cannot create symlink {}", path.display()), e)
        })?;
        extracted.symlinks += 1;
    }

    fs::set_permissions(root, fs::Permissions::from_mode(0o755)).map_err(|e| {
        ArchiveError::io(format!("cannot set permissions on {}", root.display()), e)
    })?;
    Ok(extracted)
}

/// Inflates one file, counting the bytes really produced; returns how many were written.
fn write_file(
    archive: &mut Archive<'_>,
    entry: &Entry,
    root: &Path,
    buffer: &mut [u8],
    unpacked_so_far_bytes: u64,
    limits: &ArchiveLimits,
) -> Result<u64, ArchiveError> {
    let path = root.join(&entry.path);
    let corrupt = |e: &dyn fmt::Display| {
        ArchiveError::bad(
            "bad_entry",
            format!("entry '{}' is corrupt: {e}", entry.path),
        )
    };
    // O_NOFOLLOW and create_new: never write through anything that is already there.
    let mut out = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| ArchiveError::io(format!("cannot create {}", path.display()), e))?;
    let mut reader = archive.by_index(entry.index).map_err(|e| corrupt(&e))?;
    let entry_cap_bytes = entry
        .size_bytes
        .min(ratio_bound(entry.compressed_bytes, limits));
    let mut written: u64 = 0;
    loop {
        let got = match reader.read(buffer) {
            Ok(0) => break,
            Ok(got) => got,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(corrupt(&e)),
        };
        written += got as u64;
        if written > entry_cap_bytes {
            return Err(ArchiveError::too_big(
                "zip_bomb",
                format!(
                    "entry '{}' inflates past {entry_cap_bytes} bytes (declared size {}, compressed size {}, ratio limit {})",
                    entry.path, entry.size_bytes, entry.compressed_bytes, limits.ratio_max
                ),
            ));
        }
        if unpacked_so_far_bytes + written > limits.unpacked_bytes_max {
            return Err(ArchiveError::too_big(
                "unpacked_too_large",
                format!(
                    "unpacking '{}' goes over the limit of {} bytes",
                    entry.path, limits.unpacked_bytes_max
                ),
            ));
        }
        out.write_all(&buffer[..got])
            .map_err(|e| ArchiveError::io(format!("cannot write {}", path.display()), e))?;
    }
    if written != entry.size_bytes {
        return Err(corrupt(&format_args!(
            "it holds {written} bytes but its header declares {}",
            entry.size_bytes
        )));
    }
    Ok(written)
}

/// Makes the staged tree durable, then moves it to `dest`.
///
/// Durability: one `syncfs` on the staging directory's filesystem instead of an fsync per file.
/// A `node_modules` tree has thousands of files and an fsync each costs seconds in total; deploys
/// are rare, so flushing the whole filesystem once is the cheaper way to know that every file is
/// on disk before the rename makes the tree visible. The parent directory is fsynced after the
/// rename so the new name itself survives a crash.
fn publish(staging: &Path, dest: &Path) -> Result<(), ArchiveError> {
    let staging_dir = fs::File::open(staging)
        .map_err(|e| ArchiveError::io(format!("cannot open {}", staging.display()), e))?;
    // SAFETY: the descriptor belongs to `staging_dir`, open for the duration of the call.
    if unsafe { libc::syncfs(std::os::fd::AsRawFd::as_raw_fd(&staging_dir)) } != 0 {
        return Err(ArchiveError::io(
            format!("cannot sync {}", staging.display()),
            io::Error::last_os_error(),
        ));
    }
    rename_noreplace(staging, dest).map_err(|e| {
        ArchiveError::io(
            format!("cannot rename {} to {}", staging.display(), dest.display()),
            e,
        )
    })?;
    let parent = match dest.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let synced = fs::File::open(parent).and_then(|dir| dir.sync_all());
    if let Err(e) = synced {
        let _ = fs::remove_dir_all(dest);
        return Err(ArchiveError::io(
            format!("cannot sync directory {}", parent.display()),
            e,
        ));
    }
    Ok(())
}

/// `rename` that fails instead of replacing an existing `to` (a plain rename would silently
/// replace an empty directory that appeared at `dest` meanwhile).
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let from_c = CString::new(from.as_os_str().as_bytes())?;
    let to_c = CString::new(to.as_os_str().as_bytes())?;
    // SAFETY: both pointers are valid NUL-terminated strings for the duration of the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        // Filesystems without RENAME_NOREPLACE: check, then rename (a small race, but only
        // with another deploy of the same id, which the caller serialises).
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            if fs::symlink_metadata(to).is_ok() {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
            fs::rename(from, to)
        }
        _ => Err(err),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use zip::write::SimpleFileOptions;
    use zip::ZipWriter;

    /// A scratch directory removed when the test ends.
    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            static NEXT: AtomicUsize = AtomicUsize::new(0);
            let dir = std::env::temp_dir().join(format!(
                "hearth-archive-{}-{}-{name}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            ));
            fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn dest(&self) -> PathBuf {
            self.0.join("code")
        }

        /// Asserts nothing was left behind: no `dest`, no staging directory.
        fn assert_empty(&self) {
            let left: Vec<_> = fs::read_dir(&self.0)
                .unwrap()
                .map(|e| e.unwrap().file_name())
                .collect();
            assert!(left.is_empty(), "left behind: {left:?}");
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    enum Item<'a> {
        File(&'a str, &'a [u8], u32),
        Dir(&'a str),
        Link(&'a str, &'a str),
    }

    fn build(items: &[Item<'_>]) -> Vec<u8> {
        let mut writer = ZipWriter::new(Cursor::new(Vec::new()));
        let options = SimpleFileOptions::default().compression_method(CompressionMethod::Deflated);
        for item in items {
            match item {
                Item::File(name, data, mode) => {
                    writer
                        .start_file(*name, options.unix_permissions(*mode))
                        .unwrap();
                    writer.write_all(data).unwrap();
                }
                Item::Dir(name) => writer.add_directory(*name, options).unwrap(),
                Item::Link(name, target) => writer.add_symlink(*name, *target, options).unwrap(),
            }
        }
        writer.finish().unwrap().into_inner()
    }

    /// Replaces every occurrence of `from` with `to` (same length) in the archive bytes.
    fn patch(zip: &mut [u8], from: &[u8], to: &[u8]) {
        assert_eq!(from.len(), to.len());
        let mut hits = 0;
        for at in 0..=zip.len() - from.len() {
            if &zip[at..at + from.len()] == from {
                zip[at..at + from.len()].copy_from_slice(to);
                hits += 1;
            }
        }
        assert!(
            hits >= 2,
            "expected the name in a local and a central header"
        );
    }

    /// A zip with one entry named `name` exactly, which the writer might not produce itself.
    fn zip_with_name(name: &[u8]) -> Vec<u8> {
        let placeholder = "q".repeat(name.len());
        let mut zip = build(&[Item::File(&placeholder, b"module.exports = 1;\n", 0o644)]);
        patch(&mut zip, placeholder.as_bytes(), name);
        zip
    }

    fn expect_err(zip: &[u8], limits: &ArchiveLimits, status: u16, code: &str) -> ArchiveError {
        let scratch = Scratch::new("err");
        let err = extract_zip(zip, &scratch.dest(), limits).expect_err("archive should be refused");
        assert_eq!((err.status, err.code), (status, code), "{err}");
        scratch.assert_empty();
        err
    }

    fn mode_of(path: &Path) -> u32 {
        fs::symlink_metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn files_dirs_and_modes_are_extracted_as_zipped() {
        let zip = build(&[
            Item::File("app.js", b"exports.handler = async () => 1;\n", 0o600),
            Item::File("bin/run", b"#!/bin/sh\necho hi\n", 0o744),
            Item::Dir("lib/"),
            Item::File("lib/util.js", b"module.exports = {};\r\n--\r\n", 0o664),
            Item::File("deep/er/still.txt", b"", 0o644),
        ]);
        let scratch = Scratch::new("ok");
        let dest = scratch.dest();
        let got = extract_zip(&zip, &dest, &ArchiveLimits::default()).unwrap();
        assert_eq!(
            got,
            Extracted {
                files: 4,
                dirs: 4,
                symlinks: 0,
                unpacked_bytes: 33 + 18 + 26
            }
        );
        assert_eq!(
            fs::read(dest.join("app.js")).unwrap(),
            b"exports.handler = async () => 1;\n"
        );
        assert_eq!(
            fs::read(dest.join("lib/util.js")).unwrap(),
            b"module.exports = {};\r\n--\r\n"
        );
        assert_eq!(fs::read(dest.join("deep/er/still.txt")).unwrap(), b"");
        assert_eq!(mode_of(&dest.join("app.js")), 0o644);
        assert_eq!(mode_of(&dest.join("bin/run")), 0o755);
        assert_eq!(mode_of(&dest.join("lib/util.js")), 0o644);
        for dir in ["", "bin", "lib", "deep", "deep/er"] {
            assert_eq!(mode_of(&dest.join(dir)), 0o755, "{dir}");
        }
        let siblings: Vec<_> = fs::read_dir(&scratch.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(siblings, vec![std::ffi::OsString::from("code")]);
    }

    #[test]
    fn single_top_level_folder_is_not_unwrapped() {
        let zip = build(&[Item::File("project/index.js", b"x", 0o644)]);
        let scratch = Scratch::new("layout");
        extract_zip(&zip, &scratch.dest(), &ArchiveLimits::default()).unwrap();
        assert!(scratch.dest().join("project/index.js").is_file());
    }

    #[test]
    fn symlink_inside_the_tree_is_created_as_a_symlink() {
        let zip = build(&[
            Item::File("node_modules/pkg/cli.js", b"#!/usr/bin/env node\n", 0o755),
            Item::Link("node_modules/.bin/pkg", "../pkg/cli.js"),
            Item::Link("here", "."),
        ]);
        let scratch = Scratch::new("link");
        let dest = scratch.dest();
        let got = extract_zip(&zip, &dest, &ArchiveLimits::default()).unwrap();
        assert_eq!((got.files, got.symlinks), (1, 2));
        let link = dest.join("node_modules/.bin/pkg");
        assert_eq!(fs::read_link(&link).unwrap(), Path::new("../pkg/cli.js"));
        assert_eq!(fs::read(&link).unwrap(), b"#!/usr/bin/env node\n");
    }

    #[test]
    fn symlinks_leaving_the_tree_are_refused() {
        for (link, target) in [
            ("a/evil", "../../etc/passwd"),
            ("evil", ".."),
            ("evil", "/etc/passwd"),
            ("a/b/evil", "../c/../../../x"),
        ] {
            let zip = build(&[Item::File("a/ok.js", b"1", 0o644), Item::Link(link, target)]);
            let err = expect_err(&zip, &ArchiveLimits::default(), 400, "unsafe_symlink");
            assert!(err.message.contains(link), "{err}");
        }
    }

    #[test]
    fn symlink_escaping_through_another_symlink_is_refused() {
        // d/e/up -> ".." is d itself, but "d/e/up/../.." is the parent of the tree's root.
        let zip = build(&[Item::Link("d/e/up", ".."), Item::Link("x", "d/e/up/../..")]);
        let err = expect_err(&zip, &ArchiveLimits::default(), 400, "unsafe_symlink");
        assert!(err.message.contains("d/e/up"), "{err}");
        // The first link on its own is fine.
        let scratch = Scratch::new("uplink");
        let zip = build(&[Item::Link("d/e/up", "..")]);
        extract_zip(&zip, &scratch.dest(), &ArchiveLimits::default()).unwrap();
    }

    #[test]
    fn entries_through_a_symlink_are_refused_in_either_order() {
        let link_first = build(&[
            Item::Link("lib", "real"),
            Item::File("lib/evil.js", b"1", 0o644),
        ]);
        let file_first = build(&[
            Item::File("lib/evil.js", b"1", 0o644),
            Item::Link("lib", "real"),
        ]);
        for zip in [link_first, file_first] {
            let err = expect_err(&zip, &ArchiveLimits::default(), 400, "unsafe_path");
            assert!(err.message.contains("symlink 'lib'"), "{err}");
        }
    }

    #[test]
    fn unsafe_names_are_refused() {
        for name in [
            &b"../evil.js"[..],
            b"a/../../evil",
            b"/abs/evil.js",
            b"..\\evil.js",
            b"lib\\..\\..\\x",
            b"C:/evil.js",
            b"c:evil.js",
            b"a\0b.js",
            b"a//b.js",
            b"a/./../../x",
        ] {
            let err = expect_err(
                &zip_with_name(name),
                &ArchiveLimits::default(),
                400,
                "unsafe_path",
            );
            assert!(err.message.starts_with("entry '"), "{err}");
        }
    }

    #[test]
    fn dot_components_are_dropped() {
        let scratch = Scratch::new("dots");
        extract_zip(
            &zip_with_name(b"./src/./app.js"),
            &scratch.dest(),
            &ArchiveLimits::default(),
        )
        .unwrap();
        assert!(scratch.dest().join("src/app.js").is_file());
    }

    #[test]
    fn duplicate_entries_are_refused() {
        // An exact duplicate, which the zip reader itself would silently collapse.
        let mut exact = build(&[
            Item::File("a.js", b"first", 0o644),
            Item::File("b.js", b"second", 0o644),
        ]);
        patch(&mut exact, b"b.js", b"a.js");
        let err = expect_err(&exact, &ArchiveLimits::default(), 400, "unsafe_path");
        assert!(
            err.message.contains("'a.js' appears more than once"),
            "{err}"
        );

        // Different names that unpack to the same path.
        let mut normalised = build(&[
            Item::File("a.js", b"1", 0o644),
            Item::File("qqqqqq", b"2", 0o644),
        ]);
        patch(&mut normalised, b"qqqqqq", b"./a.js");
        expect_err(&normalised, &ArchiveLimits::default(), 400, "unsafe_path");

        // A file that is also used as a directory.
        let nested = build(&[
            Item::File("a", b"1", 0o644),
            Item::File("a/b.js", b"2", 0o644),
        ]);
        let err = expect_err(&nested, &ArchiveLimits::default(), 400, "unsafe_path");
        assert!(err.message.contains("which is a file"), "{err}");
    }

    #[test]
    fn non_zips_are_refused() {
        let valid = build(&[Item::File("app.js", &[b'x'; 3000], 0o644)]);
        let random: Vec<u8> = (0..4096u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for bytes in [
            &b""[..],
            b"hello, world",
            &random,
            &valid[..valid.len() / 2],
            &valid[..valid.len() - 5],
        ] {
            expect_err(bytes, &ArchiveLimits::default(), 400, "not_a_zip");
        }
    }

    #[test]
    fn archive_over_the_compressed_limit_is_refused() {
        let zip = build(&[Item::File("app.js", b"x", 0o644)]);
        let limits = ArchiveLimits {
            compressed_bytes_max: zip.len() as u64 - 1,
            ..ArchiveLimits::default()
        };
        let err = expect_err(&zip, &limits, 413, "too_large");
        assert!(err.message.contains(&zip.len().to_string()), "{err}");
    }

    #[test]
    fn too_many_entries_are_refused() {
        let zip = build(&[
            Item::File("a", b"1", 0o644),
            Item::File("b", b"2", 0o644),
            Item::Dir("c/"),
            Item::Link("d", "a"),
        ]);
        let limits = ArchiveLimits {
            entries_max: 3,
            ..ArchiveLimits::default()
        };
        let err = expect_err(&zip, &limits, 413, "too_many_entries");
        assert!(err.message.contains("4 entries"), "{err}");
        let scratch = Scratch::new("four");
        let limits = ArchiveLimits {
            entries_max: 4,
            ..ArchiveLimits::default()
        };
        extract_zip(&zip, &scratch.dest(), &limits).unwrap();
    }

    /// A zip64 archive of one empty local entry and `records` central records for it that
    /// declares `declared` entries, followed by `trailer`.
    fn zip64_with_records(records: u64, declared: u64, trailer: &[u8]) -> Vec<u8> {
        let mut zip = b"PK\x03\x04\x14".to_vec();
        zip.resize(30, 0);
        let directory_start = zip.len() as u64;
        let mut record = b"PK\x01\x02\x1e\x03\x14".to_vec();
        record.resize(38, 0);
        record.extend_from_slice(&(0o100644u32 << 16).to_le_bytes());
        record.extend_from_slice(&0u32.to_le_bytes());
        for _ in 0..records {
            zip.extend_from_slice(&record);
        }
        let directory_bytes = zip.len() as u64 - directory_start;
        let eocd64_at = zip.len() as u64;
        zip.extend_from_slice(b"PK\x06\x06");
        zip.extend_from_slice(&44u64.to_le_bytes());
        zip.extend_from_slice(&[0x1e, 0x03, 45, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        for field in [declared, declared, directory_bytes, directory_start] {
            zip.extend_from_slice(&field.to_le_bytes());
        }
        zip.extend_from_slice(b"PK\x06\x07\0\0\0\0");
        zip.extend_from_slice(&eocd64_at.to_le_bytes());
        zip.extend_from_slice(&1u32.to_le_bytes());
        zip.extend_from_slice(b"PK\x05\x06");
        zip.extend_from_slice(&[0xff; 16]);
        zip.extend_from_slice(&[0, 0]);
        zip.extend_from_slice(trailer);
        zip
    }

    #[test]
    fn a_stray_end_record_signature_does_not_hide_the_entry_count() {
        // The shape of a real attack: many genuine central records and the signature of an end
        // record (without its body) appended, which the zip reader skips.
        let zip = zip64_with_records(40, 40, b"PK\x05\x06\0\0");
        assert_eq!(last_end_record(&zip).unwrap().entries, 40);
        // A count declared over the limit is refused from the end record alone: the zip reader
        // (which would find this directory inconsistent) never gets to allocate for it.
        let zip = zip64_with_records(2, 5_000_000, b"PK\x05\x06\0\0");
        let err = expect_err(&zip, &ArchiveLimits::default(), 413, "too_many_entries");
        assert!(err.message.contains("5000000 entries"), "{err}");
    }

    /// `zip` followed by an end of central directory record declaring one entry in a directory
    /// that cannot be where it says (at the record itself): the zip reader passes over it.
    fn with_a_broken_last_end_record(mut zip: Vec<u8>) -> Vec<u8> {
        let at = zip.len() as u32;
        zip.extend_from_slice(b"PK\x05\x06\0\0\0\0\x01\0\x01\0");
        zip.extend_from_slice(&46u32.to_le_bytes());
        zip.extend_from_slice(&at.to_le_bytes());
        zip.extend_from_slice(&[0, 0]);
        zip
    }

    #[test]
    fn the_directory_of_an_earlier_end_record_is_refused() {
        // Other tools read the last record and find no directory; the zip reader reads the one
        // before it, and would unpack its entry.
        let zip = with_a_broken_last_end_record(build(&[Item::File("app.js", b"1", 0o644)]));
        assert!(ZipArchive::new(Cursor::new(&zip[..])).is_ok_and(|a| a.len() == 1));
        let err = expect_err(&zip, &ArchiveLimits::default(), 400, "not_a_zip");
        assert!(err.message.contains("the zip reader read one"), "{err}");
        // An earlier record declaring more than the limit is refused before the reader parses
        // its directory.
        let zip = with_a_broken_last_end_record(zip64_with_records(40, 40, b""));
        let limits = ArchiveLimits {
            entries_max: 3,
            ..ArchiveLimits::default()
        };
        assert_eq!(last_end_record(&zip).unwrap().entries, 1);
        let err = expect_err(&zip, &limits, 413, "too_many_entries");
        assert!(err.message.contains("declares 40 entries"), "{err}");
    }

    #[test]
    fn end_record_signatures_in_file_data_are_only_content() {
        // Compressed data holds the signatures by chance now and then; with counts over the
        // limit and no directory where they point, they are not records anyone reads.
        let mut stray = b"PK\x05\x06\0\0\0\0\xff\x7f\xff\x7f".to_vec();
        stray.extend_from_slice(&[0x11; 8]);
        stray.extend_from_slice(&[0, 0]);
        stray.extend_from_slice(b"PK\x06\x06");
        stray.extend_from_slice(&[0x7f; 52]);
        let mut writer = ZipWriter::new(Cursor::new(Vec::new()));
        let stored = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
        writer.start_file("data.bin", stored).unwrap();
        writer.write_all(&stray).unwrap();
        let zip = writer.finish().unwrap().into_inner();
        let scratch = Scratch::new("stray");
        let got = extract_zip(&zip, &scratch.dest(), &ArchiveLimits::default()).unwrap();
        assert_eq!(got.files, 1);
    }

    #[test]
    fn a_zip32_count_is_read_where_the_zip_reader_reads_it() {
        // The reader parses as many records as the entries on this disk; the total is 1 here.
        let mut zip = build(&[
            Item::File("a", b"1", 0o644),
            Item::File("b", b"2", 0o644),
            Item::File("c", b"3", 0o644),
            Item::File("d", b"4", 0o644),
        ]);
        let eocd = zip.len() - 22;
        zip[eocd + 10..eocd + 12].copy_from_slice(&1u16.to_le_bytes());
        let limits = ArchiveLimits {
            entries_max: 3,
            ..ArchiveLimits::default()
        };
        let err = expect_err(&zip, &limits, 413, "too_many_entries");
        assert!(err.message.contains("declares 4 entries"), "{err}");
    }

    #[test]
    fn a_stored_archive_inside_is_only_content() {
        let inner = build(&[Item::File("x.js", b"1", 0o644), Item::Dir("d/")]);
        let mut writer = ZipWriter::new(Cursor::new(Vec::new()));
        let stored = SimpleFileOptions::default().compression_method(CompressionMethod::Stored);
        writer.start_file("vendor/inner.zip", stored).unwrap();
        writer.write_all(&inner).unwrap();
        writer.start_file("app.js", stored).unwrap();
        writer.write_all(b"exports.handler = 1;\n").unwrap();
        let zip = writer.finish().unwrap().into_inner();
        let scratch = Scratch::new("inner");
        let got = extract_zip(&zip, &scratch.dest(), &ArchiveLimits::default()).unwrap();
        assert_eq!(got.files, 2);
        assert_eq!(
            fs::read(scratch.dest().join("vendor/inner.zip")).unwrap(),
            inner
        );
    }

    #[test]
    fn an_archive_without_a_whole_end_record_is_refused() {
        let mut zip = build(&[Item::File("app.js", b"1", 0o644)]);
        zip.truncate(zip.len() - 4);
        let err = expect_err(&zip, &ArchiveLimits::default(), 400, "not_a_zip");
        assert!(err.message.contains("end of central directory"), "{err}");
        // A zip64 locator that points at nothing is refused too.
        let mut zip = zip64_with_records(1, 1, b"");
        let at = zip.len() - 22 - 12;
        zip[at..at + 8].copy_from_slice(&7u64.to_le_bytes());
        expect_err(&zip, &ArchiveLimits::default(), 400, "not_a_zip");
    }

    #[test]
    fn implied_directories_count_as_entries() {
        // Three files, and seven directories that no entry lists.
        let zip = build(&[
            Item::File("app.js", b"1", 0o644),
            Item::File("a/b/c/d.js", b"2", 0o644),
            Item::File("x/y/z/w/v.js", b"3", 0o644),
        ]);
        let limits = ArchiveLimits {
            entries_max: 9,
            ..ArchiveLimits::default()
        };
        let err = expect_err(&zip, &limits, 413, "too_many_entries");
        assert!(err.message.contains("imply"), "{err}");
        let scratch = Scratch::new("implied");
        let limits = ArchiveLimits {
            entries_max: 10,
            ..ArchiveLimits::default()
        };
        let extracted = extract_zip(&zip, &scratch.dest(), &limits).unwrap();
        assert_eq!((extracted.files, extracted.dirs), (3, 7));
    }

    #[test]
    fn names_deeper_than_the_limit_are_refused() {
        let deepest = format!("{}f.js", "a/".repeat(DEPTH_MAX - 1));
        let scratch = Scratch::new("deepest");
        extract_zip(
            &build(&[Item::File(&deepest, b"1", 0o644)]),
            &scratch.dest(),
            &ArchiveLimits::default(),
        )
        .unwrap();
        let too_deep = format!("a/{deepest}");
        let zip = build(&[Item::File(&too_deep, b"1", 0o644)]);
        let err = expect_err(&zip, &ArchiveLimits::default(), 400, "too_deep");
        assert!(err.message.contains("65 directories deep"), "{err}");
    }

    #[test]
    fn declared_unpacked_size_over_the_limit_is_refused() {
        let zip = build(&[
            Item::File("a.bin", &[7u8; 600], 0o644),
            Item::File("b.bin", &[9u8; 600], 0o644),
        ]);
        let limits = ArchiveLimits {
            unpacked_bytes_max: 1000,
            ..ArchiveLimits::default()
        };
        let err = expect_err(&zip, &limits, 413, "unpacked_too_large");
        assert!(err.message.contains("1200"), "{err}");
    }

    #[test]
    fn deflated_zeros_are_a_zip_bomb() {
        let mut writer = ZipWriter::new(Cursor::new(Vec::new()));
        writer
            .start_file("zeros.bin", SimpleFileOptions::default())
            .unwrap();
        let chunk = vec![0u8; 1024 * 1024];
        for _ in 0..50 {
            writer.write_all(&chunk).unwrap();
        }
        let zip = writer.finish().unwrap().into_inner();
        assert!(zip.len() < 1024 * 1024);
        let err = expect_err(&zip, &ArchiveLimits::default(), 413, "zip_bomb");
        assert!(err.message.contains("zeros.bin"), "{err}");
    }

    #[test]
    fn small_highly_compressible_files_are_not_bombs() {
        // 100 KiB of spaces deflates to a few hundred bytes, but stays under ratio * 1 KiB.
        let zip = build(&[Item::File("pad.txt", &[b' '; 100 * 1024], 0o644)]);
        let scratch = Scratch::new("pad");
        extract_zip(&zip, &scratch.dest(), &ArchiveLimits::default()).unwrap();
    }

    /// Offsets of the size fields of the first entry, in its local and central headers.
    fn size_field_offsets(zip: &[u8]) -> (usize, usize) {
        let mut archive = ZipArchive::new(Cursor::new(zip)).unwrap();
        let file = archive.by_index_raw(0).unwrap();
        (
            file.header_start() as usize + 22,
            file.central_header_start() as usize + 24,
        )
    }

    #[test]
    fn entry_inflating_past_its_declared_size_is_stopped_while_writing() {
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let mut zip = build(&[Item::File("big.bin", &data, 0o644)]);
        let (local, central) = size_field_offsets(&zip);
        // Headers now claim 1000 bytes, which passes every declared-size check.
        for at in [local, central] {
            zip[at..at + 4].copy_from_slice(&1000u32.to_le_bytes());
        }
        let err = expect_err(&zip, &ArchiveLimits::default(), 413, "zip_bomb");
        assert!(err.message.contains("inflates past 1000 bytes"), "{err}");
    }

    #[test]
    fn entry_shorter_than_declared_is_corrupt() {
        let mut zip = build(&[Item::File("short.txt", b"hello world", 0o644)]);
        let (local, central) = size_field_offsets(&zip);
        for at in [local, central] {
            zip[at..at + 4].copy_from_slice(&12u32.to_le_bytes());
        }
        expect_err(&zip, &ArchiveLimits::default(), 400, "bad_entry");
    }

    #[test]
    fn overlapping_entries_are_a_zip_bomb() {
        let mut zip = build(&[
            Item::File("a.txt", b"aaaa", 0o644),
            Item::File("b.txt", b"aaaa", 0o644),
        ]);
        let mut archive = ZipArchive::new(Cursor::new(&zip[..])).unwrap();
        let first_header = archive.by_index_raw(0).unwrap().header_start() as u32;
        let second_central = archive.by_index_raw(1).unwrap().central_header_start() as usize;
        drop(archive);
        // Point b.txt's central record at a.txt's local header.
        zip[second_central + 42..second_central + 46].copy_from_slice(&first_header.to_le_bytes());
        expect_err(&zip, &ArchiveLimits::default(), 413, "zip_bomb");
    }

    #[test]
    fn special_files_are_refused() {
        let mut zip = build(&[Item::File("fifo", b"", 0o644)]);
        let central = ZipArchive::new(Cursor::new(&zip[..]))
            .unwrap()
            .by_index_raw(0)
            .unwrap()
            .central_header_start();
        // External attributes: the unix mode lives in the high 16 bits; 0o010000 is a FIFO.
        let at = central as usize + 38;
        zip[at..at + 4].copy_from_slice(&((0o010644u32) << 16).to_le_bytes());
        let err = expect_err(&zip, &ArchiveLimits::default(), 400, "bad_entry");
        assert!(err.message.contains("special file"), "{err}");
    }

    #[test]
    fn existing_destination_is_left_untouched() {
        let scratch = Scratch::new("exists");
        let dest = scratch.dest();
        fs::create_dir(&dest).unwrap();
        fs::write(dest.join("keep"), b"mine").unwrap();
        let zip = build(&[Item::File("app.js", b"x", 0o644)]);
        let err = extract_zip(&zip, &dest, &ArchiveLimits::default()).unwrap_err();
        assert_eq!((err.status, err.code), (500, "io"));
        assert_eq!(fs::read(dest.join("keep")).unwrap(), b"mine");
        assert_eq!(fs::read_dir(&scratch.0).unwrap().count(), 1);
    }

    #[test]
    fn empty_archive_extracts_to_an_empty_directory() {
        let zip = build(&[]);
        let scratch = Scratch::new("empty");
        assert_eq!(
            extract_zip(&zip, &scratch.dest(), &ArchiveLimits::default()).unwrap(),
            Extracted::default()
        );
        assert_eq!(fs::read_dir(scratch.dest()).unwrap().count(), 0);
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn component() -> impl Strategy<Value = &'static str> {
            // Mostly plain names and "..", so that some archives pass and their links get checked.
            prop::sample::select(vec![
                "a", "b", "a", "b", "a", "b", "..", "..", ".", "", "\\", "..\\", "C:", "/",
            ])
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            /// Whatever the names and link targets, nothing appears outside `dest`, and a
            /// refused archive leaves nothing at all.
            #[test]
            fn nothing_is_ever_written_outside_dest(
                link in prop::collection::vec(component(), 1..5),
                target in prop::collection::vec(component(), 1..6),
                files in prop::collection::vec(prop::collection::vec(component(), 1..5), 0..4),
            ) {
                let scratch = Scratch::new("prop");
                let inner = scratch.0.join("inner");
                fs::create_dir(&inner).unwrap();
                let dest = inner.join("code");
                // The zip writer stores names verbatim, so hostile names need no patching here.
                let link = link.join("/");
                let target = target.join("/");
                let files: Vec<String> = files.iter().map(|parts| parts.join("/")).collect();
                let mut items = vec![Item::Link(&link, &target)];
                items.extend(files.iter().map(|name| Item::File(name, b"data", 0o644)));
                let names: HashSet<&str> = items.iter().map(|item| match item {
                    Item::Link(name, _) | Item::File(name, _, _) | Item::Dir(name) => *name,
                }).collect();
                // The writer refuses exact duplicates; those are covered by their own test.
                prop_assume!(names.len() == items.len());
                let zip = build(&items);

                let result = extract_zip(&zip, &dest, &ArchiveLimits::default());
                let outside: Vec<_> = fs::read_dir(&scratch.0).unwrap().map(|e| e.unwrap().file_name()).collect();
                prop_assert_eq!(outside, vec![std::ffi::OsString::from("inner")]);
                let beside: Vec<_> = fs::read_dir(&inner).unwrap().map(|e| e.unwrap().file_name()).collect();
                match result {
                    Ok(_) => {
                        prop_assert_eq!(beside, vec![std::ffi::OsString::from("code")]);
                        let root = fs::canonicalize(&dest).unwrap();
                        for name in &names {
                            // Anything that resolves at all resolves inside dest.
                            if let Ok(real) = fs::canonicalize(dest.join(name)) {
                                prop_assert!(real.starts_with(&root), "{} resolves to {:?}", name, real);
                            }
                        }
                    }
                    Err(_) => prop_assert!(beside.is_empty(), "{:?}", beside),
                }
            }

            /// Chains of symlinks that each look safe may still escape together (a link to ".."
            /// followed by ".." from elsewhere); whatever is accepted must resolve inside `dest`.
            #[test]
            fn accepted_symlinks_resolve_inside_dest(
                links in prop::collection::vec(
                    (
                        prop::collection::vec(prop::sample::select(vec!["a", "b"]), 1..4),
                        prop::collection::vec(prop::sample::select(vec!["a", "b", "..", "."]), 1..6),
                    ),
                    1..4,
                ),
            ) {
                let scratch = Scratch::new("links");
                let dest = scratch.dest();
                let links: Vec<(String, String)> =
                    links.iter().map(|(name, target)| (name.join("/"), target.join("/"))).collect();
                let items: Vec<Item<'_>> = links.iter().map(|(name, target)| Item::Link(name, target)).collect();
                let names: HashSet<&str> = links.iter().map(|(name, _)| name.as_str()).collect();
                prop_assume!(names.len() == links.len());
                if extract_zip(&build(&items), &dest, &ArchiveLimits::default()).is_ok() {
                    let root = fs::canonicalize(&dest).unwrap();
                    for (name, _) in &links {
                        let Ok(real) = fs::canonicalize(dest.join(name)) else { continue };
                        prop_assert!(real.starts_with(&root), "{} resolves to {:?}", name, real);
                    }
                }
            }
        }
    }
}
