//! Durable function state under `<state>/functions/`.
//!
//! Layout: `<id>/meta.json` (the [`FunctionSpec`]), `<id>/code/` (the unpacked
//! zip), plus backend artifacts. A deploy builds everything in
//! `.staging-<id>/` and publishes it with one `rename`, after fsyncing the
//! files and the parent directory, so a crash (even kill -9) leaves either a
//! whole function or a staging directory that the next start deletes.
//! Deleted functions are renamed to `.trash-<id>` first, then removed.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use super::FunctionSpec;

/// Loads every complete function; deletes staging and trash leftovers.
pub fn load_all(functions_dir: &Path) -> io::Result<Vec<(FunctionSpec, PathBuf)>> {
    fs::create_dir_all(functions_dir)?;
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
    let mut f = fs::File::create(&tmp)?;
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
    fs::create_dir_all(functions_dir)?;
    fs::create_dir(&p)?;
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
    fs::create_dir_all(state_dir)?;
    let path = state_dir.join("hearth.lock");
    let f = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
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
