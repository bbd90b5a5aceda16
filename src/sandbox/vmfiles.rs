//! File chores shared by the microVM backends (QEMU and Firecracker):
//! publishing snapshot files (fsync, rename, fsync the directory), removing
//! half-written ones, the most a deploy writes, warming the page cache for
//! restores, a Unix socket path's length check, and the private memory of a
//! VMM process.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// Longest Unix socket path (sun_path holds 108 bytes with the NUL).
pub const SOCKET_PATH_BYTES_MAX: usize = 107;

/// What a VM snapshot holds beyond guest memory, as a deploy counts it against
/// the functions' disk budget before writing: QEMU's device state and ROMs
/// (a few hundred KiB), Firecracker's state file (tens of KiB) and working
/// set (at most 512 KiB), the description. An allowance, not a check: the
/// deploy measures what was written and counts that.
pub const SNAPSHOT_STATE_BYTES_MAX: u64 = 16 << 20;

/// The most a VM backend's deploy writes into the function directory `dir`
/// (code unpacked in `dir/code`): the code image as mkfs sizes it, the guest
/// memory of `memory_mb` (the memory file, whole in the worst case) and
/// [`SNAPSHOT_STATE_BYTES_MAX`].
pub fn snapshot_bytes_max(dir: &Path, memory_mb: u32) -> u64 {
    // Unreadable code fails the image build before anything large is written.
    let code_image = crate::guest::ext4::measure(&dir.join("code"))
        .map(crate::guest::ext4::image_bytes)
        .unwrap_or(0);
    code_image
        .saturating_add(u64::from(memory_mb) << 20)
        .saturating_add(SNAPSHOT_STATE_BYTES_MAX)
}

/// Removes its files when dropped (after a successful rename they are gone already).
pub struct RemoveOnDrop(pub Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

/// Opens `path` for reading without following a symbolic link or blocking
/// on a FIFO, and checks that it is a plain file.
pub fn open_plain(path: &Path) -> io::Result<(fs::File, fs::Metadata)> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let m = f.metadata()?;
    if !m.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a plain file", path.display()),
        ));
    }
    Ok((f, m))
}

/// Fsyncs `tmp` and renames it to `dir/name`; returns its length. `tmp`
/// must be a plain file (a symbolic link is not followed, nor published).
pub fn publish(tmp: &Path, dir: &Path, name: &str) -> io::Result<u64> {
    let (f, m) = open_plain(tmp)?;
    f.sync_all()?;
    let len = m.len();
    fs::rename(tmp, dir.join(name))?;
    Ok(len)
}

/// Writes `bytes` to `dir/name` whole (temp file, fsync, rename) and makes
/// the directory's renames durable.
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(name))?;
    fs::File::open(dir)?.sync_all()
}

/// Asks the kernel to read `path` into the page cache ahead of the first
/// restore after a server start (restores map the guest memory file).
pub fn prefetch(path: &Path) {
    use std::os::fd::AsRawFd;
    if let Ok(f) = fs::File::open(path) {
        // SAFETY: fadvise on a descriptor we own; advice only.
        unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_WILLNEED) };
    }
}

/// Extra bytes a VM directory adds to its backend's run directory in socket
/// paths ("/<16 hex>-<role><seq>/agent.sock" and the like).
pub const RUN_DIR_SOCKET_SUFFIX_BYTES: usize = 48;

/// The run directory of a VM backend (VM directories: sockets, logs), empty
/// and private (mode 0700): `preferred` (in the state directory; an earlier
/// server's leftovers there are removed), or, if socket paths under it would
/// not fit `sun_path`, a fresh `<tmp>/hearth-<name>-XXXXXX` made by
/// `mkdtemp(3)`: never a directory another local user could have made first.
pub fn private_run_dir(preferred: &Path, name: &str) -> io::Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if preferred.as_os_str().len() + RUN_DIR_SOCKET_SUFFIX_BYTES <= SOCKET_PATH_BYTES_MAX {
        let _ = fs::remove_dir_all(preferred);
        fs::create_dir_all(preferred)?;
        fs::set_permissions(preferred, fs::Permissions::from_mode(0o700))?;
        return Ok(preferred.to_path_buf());
    }
    let template = std::env::temp_dir().join(format!("hearth-{name}-XXXXXX"));
    let mut bytes = template.into_os_string().into_encoded_bytes();
    bytes.push(0);
    // SAFETY: mkdtemp rewrites the NUL-terminated template in place.
    if unsafe { libc::mkdtemp(bytes.as_mut_ptr().cast()) }.is_null() {
        return Err(io::Error::last_os_error());
    }
    bytes.pop();
    // SAFETY: mkdtemp only replaced ASCII X's with ASCII characters.
    Ok(PathBuf::from(unsafe {
        std::ffi::OsString::from_encoded_bytes_unchecked(bytes)
    }))
}

/// Whether `path` fits a Unix socket address.
pub fn socket_path_fits(path: &Path) -> bool {
    path.as_os_str().len() <= SOCKET_PATH_BYTES_MAX
}

/// Private (anonymous) resident memory of process `pid`: pages still shared
/// with a memory file's page cache are not the instance's cost.
pub fn rss_anon_bytes(pid: i32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bound counts the whole guest memory, the state allowance and a
    /// code image at least as large as the code.
    #[test]
    fn a_snapshot_is_bounded_by_guest_memory_state_and_code_image() {
        let dir = std::env::temp_dir().join(format!("hearth-snapmax-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(dir.join("code")).unwrap();
        fs::write(dir.join("code/big"), vec![1u8; 3 << 20]).unwrap();
        let most = snapshot_bytes_max(&dir, 256);
        let without_code = (256 << 20) + SNAPSHOT_STATE_BYTES_MAX;
        assert!(most >= without_code + (3 << 20), "{most}");
        assert!(most <= without_code + (64 << 20), "{most}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn socket_paths_are_checked_against_sun_path() {
        assert!(socket_path_fits(Path::new(&"a".repeat(107))));
        assert!(!socket_path_fits(Path::new(&"a".repeat(108))));
    }

    /// A state directory too deep for socket paths gets a fresh private run
    /// directory in /tmp each time (never a name another user could take
    /// first); a short one gets its own, emptied and private.
    #[test]
    fn run_dirs_are_private_and_fresh() {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        let base = std::env::temp_dir().join(format!("hearth-rundir-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let short = base.join("run");
        fs::create_dir_all(&short).unwrap();
        fs::write(short.join("stale.log"), b"x").unwrap();
        assert_eq!(private_run_dir(&short, "t").unwrap(), short);
        assert_eq!(fs::read_dir(&short).unwrap().count(), 0);
        let deep = base.join("d".repeat(100));
        let (a, b) = (
            private_run_dir(&deep, "t").unwrap(),
            private_run_dir(&deep, "t").unwrap(),
        );
        assert_ne!(a, b);
        for d in [&short, &a, &b] {
            let m = fs::symlink_metadata(d).unwrap();
            assert!(m.is_dir());
            assert_eq!(m.permissions().mode() & 0o777, 0o700, "{}", d.display());
            // SAFETY: geteuid has no preconditions.
            assert_eq!(m.uid(), unsafe { libc::geteuid() });
        }
        assert!(a.starts_with(std::env::temp_dir()));
        assert!(a.to_string_lossy().contains("/hearth-t-"));
        assert!(socket_path_fits(
            &a.join("x".repeat(RUN_DIR_SOCKET_SUFFIX_BYTES))
        ));
        fs::remove_dir(&a).unwrap();
        fs::remove_dir(&b).unwrap();
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn atomic_writes_leave_no_temp_file_and_publish_takes_only_plain_files() {
        let dir = std::env::temp_dir().join(format!("hearth-vmfiles-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        write_atomic(&dir, "m.json", b"0123456789").unwrap();
        assert_eq!(fs::read(dir.join("m.json")).unwrap(), b"0123456789");
        assert!(!dir.join(".m.json.tmp").exists());
        fs::write(dir.join("t"), b"x").unwrap();
        assert_eq!(publish(&dir.join("t"), &dir, "p").unwrap(), 1);
        assert!(dir.join("p").is_file() && !dir.join("t").exists());
        // A link (say to a host file) is neither followed nor published.
        std::os::unix::fs::symlink("/etc/hostname", dir.join("l")).unwrap();
        assert!(publish(&dir.join("l"), &dir, "q").is_err());
        assert!(!dir.join("q").exists());
        {
            let _r = RemoveOnDrop(vec![dir.join("p")]);
        }
        assert!(!dir.join("p").exists());
        assert!(rss_anon_bytes(std::process::id() as i32).unwrap() > 0);
        fs::remove_dir_all(&dir).unwrap();
    }
}
