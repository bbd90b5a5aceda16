//! Read-only ext4 images made from a directory tree with `mkfs.ext4 -d`:
//! no root, no loop mounts. The file is sparse: free space costs no disk.
//!
//! Files keep the host's uid/gid and modes (`-d` copies them); the image's
//! root directory is owned by 0:0 (`-E root_owner=0:0`). hearth runs as root,
//! so everything in its images is root's.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::util::program::which;

/// Block size of every image.
pub const BLOCK_BYTES: u64 = 4096;
/// Entries a tree may hold (node_modules trees are large, but not this large).
pub const ENTRIES_MAX: u64 = 2_000_000;
/// Largest image made.
pub const IMAGE_BYTES_MAX: u64 = 64 << 30;
/// Attempts with a doubled size when mkfs runs out of room.
const ATTEMPTS_MAX: u32 = 3;

/// Why an image could not be made.
#[derive(Debug)]
pub enum Ext4Error {
    /// The source tree could not be walked.
    Walk { path: PathBuf, err: io::Error },
    /// The tree is over [`ENTRIES_MAX`] entries or [`IMAGE_BYTES_MAX`] bytes.
    TooLarge { path: PathBuf, what: String },
    /// `mkfs.ext4` is missing or failed.
    Mkfs { image: PathBuf, detail: String },
    /// The image file could not be created or renamed.
    Io { path: PathBuf, err: io::Error },
}

impl fmt::Display for Ext4Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Ext4Error::Walk { path, err } => write!(f, "reading {}: {err}", path.display()),
            Ext4Error::TooLarge { path, what } => {
                write!(f, "{} is too large for an image: {what}", path.display())
            }
            Ext4Error::Mkfs { image, detail } => {
                write!(f, "mkfs.ext4 for {}: {detail}", image.display())
            }
            Ext4Error::Io { path, err } => write!(f, "{}: {err}", path.display()),
        }
    }
}

impl std::error::Error for Ext4Error {}

/// What a tree needs: 4 KiB blocks of data and inodes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TreeSize {
    pub blocks: u64,
    pub entries: u64,
}

/// Counts the blocks and entries under `dir` (symlinks are not followed).
pub fn measure(dir: &Path) -> Result<TreeSize, Ext4Error> {
    let mut size = TreeSize::default();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        let rd = fs::read_dir(&d).map_err(|err| Ext4Error::Walk {
            path: d.clone(),
            err,
        })?;
        let mut names = 0u64;
        for e in rd {
            let e = e.map_err(|err| Ext4Error::Walk {
                path: d.clone(),
                err,
            })?;
            let m = e.metadata().map_err(|err| Ext4Error::Walk {
                path: e.path(),
                err,
            })?;
            size.entries += 1;
            names += e.file_name().len() as u64 + 12;
            if m.is_dir() {
                todo.push(e.path());
            } else if m.is_file() || m.file_type().is_symlink() {
                size.blocks += m.len().div_ceil(BLOCK_BYTES);
            }
            if size.entries > ENTRIES_MAX {
                return Err(Ext4Error::TooLarge {
                    path: dir.to_path_buf(),
                    what: format!("more than {ENTRIES_MAX} entries"),
                });
            }
        }
        // The directory's own blocks.
        size.blocks += 1 + names / BLOCK_BYTES;
    }
    Ok(size)
}

/// The image size for a tree: data with a margin for extent blocks and
/// fragmentation, inode tables, and fixed metadata. Generous on purpose:
/// unused space is a hole in a sparse file.
pub fn image_bytes(t: TreeSize) -> u64 {
    let data = t.blocks * BLOCK_BYTES;
    let bytes = data + data / 4 + inodes(t) * 256 + (16 << 20);
    bytes.div_ceil(1 << 20) * (1 << 20)
}

fn inodes(t: TreeSize) -> u64 {
    t.entries + t.entries / 8 + 64
}

/// Finds `mkfs.ext4` on PATH or in the sbin directories (not on every user's PATH).
pub fn mkfs_path() -> Option<PathBuf> {
    tool_path("mkfs.ext4")
}

/// Finds an e2fsprogs tool like [`mkfs_path`] does.
pub fn tool_path(name: &str) -> Option<PathBuf> {
    which(name).or_else(|| {
        ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.is_file())
    })
}

/// Makes `image` (written to a temporary name, then renamed) holding the
/// tree under `src`, labelled `label`. Returns the image's apparent size.
pub fn make_image(src: &Path, image: &Path, label: &str) -> Result<u64, Ext4Error> {
    make_image_with(src, image, label, &[])
}

/// [`make_image`], plus empty directories `extra_dirs` at the image's root.
pub fn make_image_with(
    src: &Path,
    image: &Path,
    label: &str,
    extra_dirs: &[&str],
) -> Result<u64, Ext4Error> {
    let mkfs = mkfs_path().ok_or_else(|| Ext4Error::Mkfs {
        image: image.to_path_buf(),
        detail: "mkfs.ext4 not found: install e2fsprogs".into(),
    })?;
    let tree = measure(src)?;
    let mut bytes = image_bytes(tree);
    let tmp = image.with_file_name(format!(
        ".{}.tmp-{}",
        image.file_name().unwrap_or_default().to_string_lossy(),
        std::process::id()
    ));
    let io_err = |path: &Path| {
        let path = path.to_path_buf();
        move |err| Ext4Error::Io { path, err }
    };
    for attempt in 1..=ATTEMPTS_MAX {
        if bytes > IMAGE_BYTES_MAX {
            return Err(Ext4Error::TooLarge {
                path: src.to_path_buf(),
                what: format!("needs {bytes} bytes, over {IMAGE_BYTES_MAX}"),
            });
        }
        let _ = fs::remove_file(&tmp);
        fs::File::create(&tmp)
            .and_then(|f| f.set_len(bytes))
            .map_err(io_err(&tmp))?;
        let out = Command::new(&mkfs)
            .args([
                "-q", "-F", "-t", "ext4", "-b", "4096", "-I", "256", "-m", "0",
            ])
            .arg("-N")
            .arg(inodes(tree).to_string())
            // Read-only images need no journal; no resize room either.
            .args(["-O", "^has_journal,^resize_inode", "-E", "root_owner=0:0"])
            .arg("-L")
            .arg(label)
            .arg("-d")
            .arg(src)
            .arg(&tmp)
            .env("LC_ALL", "C")
            .output()
            .map_err(|e| Ext4Error::Mkfs {
                image: image.to_path_buf(),
                detail: format!("cannot run {}: {e}", mkfs.display()),
            })?;
        if out.status.success() {
            if let Err(e) = add_dirs(&tmp, extra_dirs) {
                let _ = fs::remove_file(&tmp);
                return Err(e);
            }
            fs::rename(&tmp, image).map_err(io_err(image))?;
            return Ok(bytes);
        }
        let _ = fs::remove_file(&tmp);
        let msg = String::from_utf8_lossy(&out.stderr).trim().to_string();
        let out_of_room =
            msg.contains("Could not allocate") || msg.contains("No space") || msg.contains("inode");
        if !out_of_room || attempt == ATTEMPTS_MAX {
            return Err(Ext4Error::Mkfs {
                image: image.to_path_buf(),
                detail: format!("{} ({msg})", out.status),
            });
        }
        bytes *= 2;
    }
    unreachable!("the loop returns on its last attempt")
}

/// Adds empty root-owned 0755 directories to a finished image (mount points
/// the source tree lacks), with `debugfs -w`.
pub fn add_dirs(image: &Path, dirs: &[&str]) -> Result<(), Ext4Error> {
    let err = |detail: String| Ext4Error::Mkfs {
        image: image.to_path_buf(),
        detail,
    };
    let debugfs =
        tool_path("debugfs").ok_or_else(|| err("debugfs not found: install e2fsprogs".into()))?;
    for d in dirs {
        let out = Command::new(&debugfs)
            .arg("-w")
            .arg("-R")
            .arg(format!("mkdir {d}"))
            .arg(image)
            .env("LC_ALL", "C")
            .output()
            .map_err(|e| err(format!("cannot run debugfs: {e}")))?;
        // debugfs reports command errors on stderr but exits 0.
        let text = String::from_utf8_lossy(&out.stderr);
        let failed = text
            .lines()
            .any(|l| !l.starts_with("debugfs ") && !l.trim().is_empty());
        if !out.status.success() || failed {
            return Err(err(format!("debugfs mkdir {d}: {}", text.trim())));
        }
    }
    Ok(())
}

/// Runs `e2fsck -fn` on an image: Ok when the file system is clean.
pub fn check(image: &Path) -> Result<(), String> {
    let fsck = tool_path("e2fsck").ok_or("e2fsck not found: install e2fsprogs")?;
    let out = Command::new(fsck)
        .arg("-fn")
        .arg(image)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| format!("cannot run e2fsck: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "e2fsck -fn {}: {}\n{}{}",
            image.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// uid, gid and mode of `path` inside `image`, read with `debugfs`.
pub fn stat_in_image(image: &Path, path: &str) -> Result<(u32, u32, u32), String> {
    let debugfs = tool_path("debugfs").ok_or("debugfs not found: install e2fsprogs")?;
    let out = Command::new(debugfs)
        .arg("-R")
        .arg(format!("stat {path}"))
        .arg(image)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| format!("cannot run debugfs: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "Inode: 12   Type: regular    Mode:  0755   Flags: 0x80000"
    // "User:     0   Group:     0   Project:     0   Size: 123"
    let word_after = |key: &str| -> Option<u32> {
        let rest = &text[text.find(key)? + key.len()..];
        let w = rest.split_whitespace().next()?;
        if key == "Mode:" {
            u32::from_str_radix(w, 8).ok()
        } else {
            w.parse().ok()
        }
    };
    match (
        word_after("User:"),
        word_after("Group:"),
        word_after("Mode:"),
    ) {
        (Some(u), Some(g), Some(m)) => Ok((u, g, m)),
        _ => Err(format!(
            "debugfs stat {path} in {}: {}",
            image.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn sizes_grow_with_the_tree_and_round_to_mib() {
        let small = image_bytes(TreeSize {
            blocks: 1,
            entries: 1,
        });
        let big = image_bytes(TreeSize {
            blocks: 25_600,
            entries: 10_000,
        });
        assert_eq!(small % (1 << 20), 0);
        assert!(small >= 16 << 20);
        assert!(big > 100 << 20 && big < 160 << 20, "{big}");
    }

    #[test]
    fn an_image_holds_the_tree_and_passes_fsck() {
        if mkfs_path().is_none() || tool_path("e2fsck").is_none() {
            eprintln!("skipped: e2fsprogs not installed");
            return;
        }
        let base = std::env::temp_dir().join(format!("hearth-ext4-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let src = base.join("src");
        fs::create_dir_all(src.join("lib/deep")).unwrap();
        fs::write(src.join("index.js"), "exports.handler = async () => 1;\n").unwrap();
        fs::write(src.join("lib/deep/blob.bin"), vec![7u8; 300_000]).unwrap();
        std::os::unix::fs::symlink("lib/deep/blob.bin", src.join("link")).unwrap();
        let image = base.join("code.ext4");
        make_image_with(&src, &image, "code", &["sys"]).unwrap();
        check(&image).unwrap();
        let (_, _, sys_mode) = stat_in_image(&image, "/sys").unwrap();
        assert_eq!(sys_mode & 0o7777, 0o755);
        let (uid, _gid, mode) = stat_in_image(&image, "/index.js").unwrap();
        // SAFETY: geteuid has no preconditions.
        assert_eq!(uid, unsafe { libc::geteuid() });
        assert_eq!(
            mode & 0o777,
            fs::metadata(src.join("index.js")).unwrap().mode() & 0o777
        );
        let (root_uid, root_gid, _) = stat_in_image(&image, "/").unwrap();
        assert_eq!((root_uid, root_gid), (0, 0));
        assert!(stat_in_image(&image, "/lib/deep/blob.bin").is_ok());
        assert!(stat_in_image(&image, "/missing").is_err());
        // Sparse: far fewer bytes on disk than the apparent size.
        let m = fs::metadata(&image).unwrap();
        assert!(
            m.blocks() * 512 < m.len(),
            "{} on disk of {}",
            m.blocks() * 512,
            m.len()
        );
        let _ = fs::remove_dir_all(&base);
    }
}
