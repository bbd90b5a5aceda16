//! Durable function state under `<state>/functions/`.
//!
//! Layout: `<id>/meta.json` (the [`FunctionSpec`]), `<id>/code/` (the unpacked
//! zip), plus backend artifacts. A deploy builds everything in
//! `.staging-<id>/` and publishes it with one `rename`, after fsyncing the
//! files and the parent directory, so a crash (even kill -9) leaves either a
//! whole function or a staging directory that the next start deletes.
//! Deleted functions are renamed to `.trash-<id>` first, then removed.
//!
//! `meta.json` holds the function's environment (its secrets), so the state
//! dir, `functions/` and each function directory are 0700 and `meta.json` is
//! 0600, created with those modes (no window in which they are wider).
//! [`lock_state_dir`] and [`load_all`] tighten what an older hearth left wider.
//! The code below a function directory stays world-readable: the sandbox's
//! uid reads it through a bind mount, which does not need the parents.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Mode of the state dir, `functions/` and each function directory.
pub const PRIVATE_DIR_MODE: u32 = 0o700;
/// Mode of `meta.json` (and the state-dir lock).
pub const PRIVATE_FILE_MODE: u32 = 0o600;

/// Creates `dir` and its missing parents with mode 0700 (whatever the umask),
/// and narrows `dir` itself to 0700 if it already existed wider.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(PRIVATE_DIR_MODE)
        .create(dir)?;
    tighten(dir, PRIVATE_DIR_MODE)
}

/// Removes permission bits beyond `mode` from `path` (never widens it).
fn tighten(path: &Path, mode: u32) -> io::Result<()> {
    let now = fs::metadata(path)?.permissions().mode() & 0o7777;
    if now & !mode != 0 {
        fs::set_permissions(path, fs::Permissions::from_mode(now & mode))?;
    }
    Ok(())
}

use crate::spec::FunctionSpec;

/// Loads every complete function; deletes staging and trash leftovers.
pub fn load_all(functions_dir: &Path) -> io::Result<Vec<(FunctionSpec, PathBuf)>> {
    create_private_dir(functions_dir)?;
    let mut out = Vec::new();
    for entry in fs::read_dir(functions_dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if name.starts_with(".staging-") || name.starts_with(".trash-") {
            eprintln!("hearth: removing leftover {}", path.display());
            remove_tree(&path);
            continue;
        }
        if !super::valid_id(&name) {
            continue;
        }
        // State dirs written by older versions: meta.json was 0644 under 0755 directories.
        if let Err(e) = tighten(&path, PRIVATE_DIR_MODE)
            .and_then(|_| tighten(&path.join("meta.json"), PRIVATE_FILE_MODE))
        {
            eprintln!(
                "hearth: cannot restrict the modes of {}: {e}",
                path.display()
            );
        }
        match fs::read(path.join("meta.json"))
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<FunctionSpec>(&b).map_err(|e| e.to_string()))
        {
            Ok(spec) if spec.id == name => out.push((spec, path)),
            Ok(_) => eprintln!(
                "hearth: skipping {}: meta.json names another id",
                path.display()
            ),
            Err(e) => eprintln!("hearth: skipping {}: {e}", path.display()),
        }
    }
    out.sort_by(|a, b| a.0.id.cmp(&b.0.id));
    Ok(out)
}

/// Writes `meta.json` into `dir` (temp file, fsync, rename).
pub fn write_meta(dir: &Path, spec: &FunctionSpec) -> io::Result<()> {
    let tmp = dir.join(".meta.json.tmp");
    // A leftover temp file may have another mode: start from none.
    let _ = fs::remove_file(&tmp);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE_MODE)
        .open(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(spec).expect("spec serialises"))?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join("meta.json"))?;
    fsync_dir(dir)
}

/// fsyncs a directory so renames inside it are durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// fsyncs every regular file under `dir` and the directories themselves.
pub fn fsync_tree(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let ft = entry.file_type()?;
        if ft.is_dir() {
            fsync_tree(&entry.path())?;
        } else if ft.is_file() {
            fs::File::open(entry.path())?.sync_all()?;
        }
    }
    fsync_dir(dir)
}

/// Publishes a staged function directory as `<functions_dir>/<id>`.
pub fn publish(staging: &Path, functions_dir: &Path, id: &str) -> io::Result<PathBuf> {
    let dest = functions_dir.join(id);
    fs::rename(staging, &dest)?;
    fsync_dir(functions_dir)?;
    Ok(dest)
}

/// A fresh staging directory for `id`.
pub fn staging_dir(functions_dir: &Path, id: &str) -> io::Result<PathBuf> {
    let p = functions_dir.join(format!(".staging-{id}"));
    create_private_dir(functions_dir)?;
    fs::DirBuilder::new().mode(PRIVATE_DIR_MODE).create(&p)?;
    Ok(p)
}

/// Moves a function directory aside (so a restart never loads it again) and returns the new path.
pub fn trash(functions_dir: &Path, id: &str) -> io::Result<PathBuf> {
    let from = functions_dir.join(id);
    let to = functions_dir.join(format!(".trash-{id}"));
    fs::rename(&from, &to)?;
    fsync_dir(functions_dir)?;
    Ok(to)
}

/// Best-effort recursive removal (logs failures).
pub fn remove_tree(path: &Path) {
    if let Err(e) = fs::remove_dir_all(path) {
        if e.kind() != io::ErrorKind::NotFound {
            eprintln!("hearth: could not remove {}: {e}", path.display());
        }
    }
}

/// Takes an exclusive lock on `<state>/hearth.lock` for the life of the process:
/// two servers on one state dir would publish, delete and snapshot over each other.
pub fn lock_state_dir(state_dir: &Path) -> io::Result<fs::File> {
    use std::os::fd::AsRawFd;
    // Before anything is written below it: a state dir made by an older hearth (or by
    // `mkdir`) is narrowed here, while it holds no new secret yet.
    create_private_dir(state_dir)?;
    let path = state_dir.join("hearth.lock");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(PRIVATE_FILE_MODE)
        .open(&path)?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!(
                "another hearth serve is using the state dir {} ({} is locked)",
                state_dir.display(),
                path.display()
            ),
        ));
    }
    Ok(f)
}
