//! Checks an unpacked code tree for ways out of it, following symlinks as the kernel does.
//! Shared by the zip property tests (tests/fuzz_props.rs) and the zip fuzz target
//! (fuzz/fuzz_targets/zip_check.rs), so both hold extraction to the same promise.

use std::fs;
use std::path::{Component, Path, PathBuf};

/// Where the kernel would take the absolute `path`, following symlinks; components past a
/// missing one are applied lexically. `None` when links nest deeper than the kernel follows
/// (it would refuse with ELOOP).
pub fn resolve(path: &Path, depth: u32) -> Option<PathBuf> {
    if depth > 40 {
        return None;
    }
    let mut at = PathBuf::from("/");
    let mut missing = false;
    for component in path.components() {
        match component {
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
            Component::ParentDir => {
                at.pop();
            }
            Component::Normal(name) => {
                at.push(name);
                if missing {
                    continue;
                }
                match fs::symlink_metadata(&at) {
                    Ok(meta) if meta.file_type().is_symlink() => {
                        let target = fs::read_link(&at).ok()?;
                        at.pop();
                        at = resolve(&at.join(target), depth + 1)?;
                    }
                    Ok(_) => {}
                    Err(_) => missing = true,
                }
            }
        }
    }
    Some(at)
}

/// Every path under `dir`, not following symlinks.
fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).expect("readable tree") {
        let path = entry.expect("readable entry").path();
        out.push(path.clone());
        if fs::symlink_metadata(&path)
            .expect("entry metadata")
            .is_dir()
        {
            walk(&path, out);
        }
    }
}

/// What a checked tree holds.
#[derive(Debug, Default)]
pub struct TreeSummary {
    /// Files, directories and symlinks under the root.
    pub paths: usize,
    /// Bytes of regular files.
    pub file_bytes: u64,
}

/// Err names the first path under `dest` that is neither a file, a directory nor a symlink,
/// or that resolves to somewhere outside `dest`.
pub fn check_tree(dest: &Path) -> Result<TreeSummary, String> {
    let root = fs::canonicalize(dest).map_err(|e| format!("{}: {e}", dest.display()))?;
    let mut paths = Vec::new();
    walk(&root, &mut paths);
    let mut summary = TreeSummary {
        paths: paths.len(),
        file_bytes: 0,
    };
    for path in &paths {
        let meta = fs::symlink_metadata(path).expect("entry metadata");
        let kind = meta.file_type();
        if !(kind.is_file() || kind.is_dir() || kind.is_symlink()) {
            return Err(format!("{} is a special file", path.display()));
        }
        if kind.is_file() {
            summary.file_bytes += meta.len();
        }
        if let Some(real) = resolve(path, 0) {
            if !real.starts_with(&root) {
                return Err(format!(
                    "{} resolves to {}, outside {}",
                    path.display(),
                    real.display(),
                    root.display()
                ));
            }
        }
    }
    Ok(summary)
}

/// Where scratch trees go: `/dev/shm` when there is one, since extraction ends with a `syncfs`
/// that on a disk would flush every other writer's data too; else the temp dir.
pub fn scratch_root() -> PathBuf {
    let shm = Path::new("/dev/shm");
    if fs::metadata(shm).map(|m| m.is_dir()).unwrap_or(false) {
        shm.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}
