//! File chores shared by the microVM backends (QEMU and Firecracker):
//! publishing snapshot files (fsync, rename, fsync the directory), removing
//! half-written ones, warming the page cache for restores, quoting the end of
//! a VMM's log, a Unix socket path's length check, and the private memory of
//! a VMM process.

use std::fs;
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Longest Unix socket path (sun_path holds 108 bytes with the NUL).
pub const SOCKET_PATH_BYTES_MAX: usize = 107;

/// Removes its files when dropped (after a successful rename they are gone already).
pub struct RemoveOnDrop(pub Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = fs::remove_file(p);
        }
    }
}

/// Fsyncs `tmp` and renames it to `dir/name`; returns its length. `tmp`
/// must be a plain file (a symbolic link is not followed, nor published).
pub fn publish(tmp: &Path, dir: &Path, name: &str) -> io::Result<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(tmp)?;
    let m = f.metadata()?;
    if !m.file_type().is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not a plain file", tmp.display()),
        ));
    }
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

/// The last `bytes` of a file, lossily decoded.
pub fn tail(path: &Path, bytes: u64) -> String {
    let Ok(mut f) = fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(bytes)));
    let mut buf = Vec::new();
    let _ = f.take(bytes).read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
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

    #[test]
    fn socket_paths_are_checked_against_sun_path() {
        assert!(socket_path_fits(Path::new(&"a".repeat(107))));
        assert!(!socket_path_fits(Path::new(&"a".repeat(108))));
    }

    #[test]
    fn atomic_writes_leave_no_temp_file_and_publish_takes_only_plain_files() {
        let dir = std::env::temp_dir().join(format!("hearth-vmfiles-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        write_atomic(&dir, "m.json", b"0123456789").unwrap();
        assert_eq!(fs::read(dir.join("m.json")).unwrap(), b"0123456789");
        assert!(!dir.join(".m.json.tmp").exists());
        assert_eq!(tail(&dir.join("m.json"), 3), "789");
        assert_eq!(tail(&dir.join("none"), 3), "");
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
