//! The guest's boot artifacts, cached under names derived from their inputs:
//!
//! | artifact   | where                                     | inputs                              |
//! |------------|-------------------------------------------|-------------------------------------|
//! | initramfs  | `<state>/cache/guest/initramfs-<h>.cpio`  | agent binary, kernel modules        |
//! | runtime    | `<state>/cache/guest/runtime-<h>.ext4`    | the runtime root ([`crate::runtime`]: node, its libraries, shim, agent) |
//! | userland   | `<state>/cache/guest/userland-<h>.ext4`   | the userland of `provided` and `python3` functions ([`crate::runtime::root::VmUserland`]) |
//! | code       | `<fn dir>/code-<h>.ext4`                  | the function's `code/` tree         |
//!
//! A file is rebuilt only when no file of its name exists; builds go to a
//! temporary name and are renamed into place, so concurrent builders race
//! safely and a half-written image is never used. Old artifacts are kept:
//! snapshots name the exact files they were made with.
//!
//! Node.js functions keep their small runtime image; the userland image
//! (a glibc userland and Python 3, ~70 MiB) is built only when the first
//! function of another runtime needs it.

use std::fmt;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use sha2::{Digest, Sha256};

use super::ext4::{self, Ext4Error};
use super::initramfs::CpioWriter;
use super::kernel::{self, Kernel, KernelError};
use crate::runtime::{self, RuntimeError, RuntimeKind};

/// Bumped whenever what goes into the artifacts changes.
const LAYOUT_VERSION: &str = "hearth-guest-v2";
/// Where the agent is in the initramfs (the kernel runs `/init`).
pub const INIT_PATH: &str = "init";
/// The modules directory in the initramfs (the agent's `hearth.modules` default).
pub const MODULES_DIR: &str = "modules";
/// Files in a function's code tree that are hashed (bounded like the archive limits).
const CODE_ENTRIES_MAX: usize = 200_000;

/// Why an artifact could not be built.
#[derive(Debug)]
pub enum ImageError {
    Kernel(KernelError),
    /// The runtime root the runtime drive is made from.
    Runtime(RuntimeError),
    Ext4(Ext4Error),
    /// A function's code tree has more entries than hashing takes (`CODE_ENTRIES_MAX`).
    TooManyEntries(PathBuf),
    Io {
        path: PathBuf,
        err: io::Error,
    },
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageError::Kernel(e) => write!(f, "{e}"),
            ImageError::Runtime(e) => write!(f, "{e}"),
            ImageError::Ext4(e) => write!(f, "{e}"),
            ImageError::TooManyEntries(root) => write!(
                f,
                "{} has more than {CODE_ENTRIES_MAX} entries",
                root.display()
            ),
            ImageError::Io { path, err } => write!(f, "{}: {err}", path.display()),
        }
    }
}

impl std::error::Error for ImageError {}

impl From<KernelError> for ImageError {
    fn from(e: KernelError) -> Self {
        ImageError::Kernel(e)
    }
}

impl From<RuntimeError> for ImageError {
    fn from(e: RuntimeError) -> Self {
        ImageError::Runtime(e)
    }
}

impl From<Ext4Error> for ImageError {
    fn from(e: Ext4Error) -> Self {
        ImageError::Ext4(e)
    }
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |err| ImageError::Io {
        path: path.to_path_buf(),
        err,
    }
}

/// What every VM of this server boots: kernel, initramfs, runtime drive.
#[derive(Clone, Debug)]
pub struct Guest {
    pub kernel: Kernel,
    pub initramfs: PathBuf,
    pub runtime_image: PathBuf,
}

/// The artifact cache of a state directory.
pub fn cache_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("cache").join("guest")
}

/// Finds (or fetches) the kernel and builds what is missing of the initramfs
/// and runtime image; the runtime image holds the same runtime root
/// ([`crate::runtime`]) the process backend mounts.
pub fn prepare_guest(state_dir: &Path) -> Result<Guest, ImageError> {
    let kernel = kernel::ensure(state_dir)?;
    let cache = state_dir.join("cache");
    let root = runtime::ensure(&cache)?;
    let agent = runtime::find_static_agent()?;
    let guest_cache = cache_dir(state_dir);
    let runtime_image = runtime_image(&guest_cache, &root)?;
    let initramfs = initramfs(&guest_cache, &agent, &kernel)?;
    // Only the server calls this, once, holding the state-dir lock: nothing
    // else uses older artifacts (snapshots made with them are rebuilt).
    let pruned = runtime::root::prune_runtimes(&cache, &root)
        + prune(&guest_cache, &[&runtime_image, &initramfs]);
    if pruned > 0 {
        eprintln!(
            "hearth: removed {pruned} unused runtime root(s) and guest image(s) from {}",
            cache.display()
        );
    }
    Ok(Guest {
        kernel,
        initramfs,
        runtime_image,
    })
}

/// The read-only runtime drive made from `runtime_root` (a directory from
/// [`runtime::ensure`], whose name already
/// is a digest of its contents).
pub fn runtime_image(cache: &Path, runtime_root: &Path) -> Result<PathBuf, ImageError> {
    let mut h = Sha256::new();
    h.update(LAYOUT_VERSION);
    h.update(
        runtime_root
            .file_name()
            .unwrap_or_default()
            .as_encoded_bytes(),
    );
    let image = cache.join(format!("runtime-{}.ext4", super::short_hex(h)));
    if image.is_file() {
        return Ok(image);
    }
    fs::create_dir_all(cache).map_err(io_at(cache))?;
    // The agent moves /sys into the new root only if the image has a mount
    // point for it, and it finds the channel port through /sys.
    let extra: &[&str] = if runtime_root.join("sys").is_dir() {
        &[]
    } else {
        &["sys"]
    };
    ext4::make_image_with(runtime_root, &image, "hearth-runtime", extra)?;
    Ok(image)
}

/// The read-only runtime drive of `provided` and `python3` functions:
/// `<state>/cache/guest/userland-<h>.ext4`, made from the host's userland
/// ([`runtime::collect_vm_userland`]) unless an image of the same inputs
/// exists. The tree it is made from is built in a temporary directory and
/// removed afterwards; the image is written to a temporary name and renamed.
/// Building it removes older userland images (call it only where the server
/// holds the state directory's lock, as the VM backends do).
pub fn userland_image(state_dir: &Path) -> Result<PathBuf, ImageError> {
    let started = std::time::Instant::now();
    let userland = runtime::collect_vm_userland(&state_dir.join("cache"))?;
    let cache = cache_dir(state_dir);
    let mut h = Sha256::new();
    h.update(LAYOUT_VERSION);
    h.update(b"userland\0");
    h.update(userland.key.as_bytes());
    let image = cache.join(format!("userland-{}.ext4", super::short_hex(h)));
    if image.is_file() {
        return Ok(image);
    }
    fs::create_dir_all(&cache).map_err(io_at(&cache))?;
    remove_dead_trees(&cache);
    let tree = cache.join(format!("{USERLAND_TREE_PREFIX}{}", std::process::id()));
    let _ = fs::remove_dir_all(&tree);
    let built = userland.build(&tree).map_err(io_at(&tree)).and_then(|()| {
        ext4::make_image(&tree, &image, "hearth-userland")
            .map(drop)
            .map_err(ImageError::from)
    });
    let _ = fs::remove_dir_all(&tree);
    built?;
    let old = prune_matching(&cache, "userland-", ".ext4", &[&image]);
    eprintln!(
        "hearth: built the microVM userland image {} in {} ms: {} entries, {} MiB of files, {} MiB on disk{}",
        image.display(),
        started.elapsed().as_millis(),
        userland.entries(),
        userland.bytes >> 20,
        fs::metadata(&image).map(|m| m.blocks() * 512).unwrap_or(0) >> 20,
        if old > 0 { format!(" ({old} older one(s) removed)") } else { String::new() }
    );
    Ok(image)
}

/// The runtime drive of each runtime, for the VM backends (QEMU and
/// Firecracker alike): Node.js functions boot the server's runtime image,
/// `provided` and `python3` functions the userland image, built when the
/// first of them needs it ([`userland_image`]) and reused afterwards.
pub struct RuntimeDrives {
    state_dir: PathBuf,
    node: PathBuf,
    userland: Mutex<Option<PathBuf>>,
}

impl RuntimeDrives {
    /// Drives for a server on `state_dir` whose Node.js image is `guest`'s.
    pub fn new(state_dir: &Path, guest: &Guest) -> RuntimeDrives {
        RuntimeDrives {
            state_dir: state_dir.to_path_buf(),
            node: guest.runtime_image.clone(),
            userland: Mutex::new(None),
        }
    }

    /// The image a function of `runtime` boots as its runtime drive.
    pub fn for_runtime(&self, runtime: RuntimeKind) -> Result<PathBuf, ImageError> {
        if runtime.is_nodejs() {
            return Ok(self.node.clone());
        }
        // Held while building: a second function waits for the same image.
        let mut built = self.userland.lock().unwrap();
        if let Some(image) = built.as_ref() {
            return Ok(image.clone());
        }
        let image = userland_image(&self.state_dir)?;
        *built = Some(image.clone());
        Ok(image)
    }
}

/// Name of the temporary tree a userland image is made from, before the builder's pid.
const USERLAND_TREE_PREFIX: &str = ".userland-tree.tmp-";

/// Removes the userland trees of builders that died before removing them.
fn remove_dead_trees(cache: &Path) {
    let Ok(entries) = fs::read_dir(cache) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let dead = name
            .strip_prefix(USERLAND_TREE_PREFIX)
            .and_then(|pid| pid.parse::<u32>().ok())
            .is_some_and(|pid| {
                pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
            });
        if dead {
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Removes files in `dir` named `<prefix>…<suffix>` other than `keep`; returns how many went.
fn prune_matching(dir: &Path, prefix: &str, suffix: &str, keep: &[&Path]) -> usize {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with(prefix)
            && name.ends_with(suffix)
            && !keep.contains(&path.as_path())
            && fs::remove_file(&path).is_ok()
        {
            removed += 1;
        }
    }
    removed
}

/// Removes runtime images and initramfs files in `guest_cache` other than
/// `keep`; returns how many went.
pub fn prune(guest_cache: &Path, keep: &[&Path]) -> usize {
    prune_matching(guest_cache, "runtime-", ".ext4", keep)
        + prune_matching(guest_cache, "initramfs-", ".cpio", keep)
}

/// The initramfs: the agent as `/init`, the kernel's modules and their
/// load order in `/modules/order`, and `/dev/console` so that the kernel
/// gives init a console before devtmpfs is mounted.
pub fn initramfs(cache: &Path, agent: &Path, kernel: &Kernel) -> Result<PathBuf, ImageError> {
    let agent_bytes = fs::read(agent).map_err(io_at(agent))?;
    let mut h = Sha256::new();
    h.update(LAYOUT_VERSION);
    h.update(&agent_bytes);
    let mut modules = Vec::new();
    for m in &kernel.modules {
        let bytes = fs::read(m).map_err(io_at(m))?;
        let name = m
            .file_name()
            .expect("module paths name files")
            .to_string_lossy()
            .into_owned();
        h.update(name.as_bytes());
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(&bytes);
        modules.push((name, bytes));
    }
    let out = cache.join(format!("initramfs-{}.cpio", super::short_hex(h)));
    if out.is_file() {
        return Ok(out);
    }
    let mut w = CpioWriter::new(Vec::with_capacity(agent_bytes.len() + (4 << 20)));
    let cpio_err = |e: io::Error| ImageError::Io {
        path: out.clone(),
        err: e,
    };
    for d in ["dev", "proc", "sys", MODULES_DIR] {
        w.dir(d, 0o755).map_err(cpio_err)?;
    }
    w.char_device("dev/console", 0o600, 5, 1)
        .map_err(cpio_err)?;
    w.char_device("dev/null", 0o666, 1, 3).map_err(cpio_err)?;
    w.file(INIT_PATH, 0o755, &agent_bytes).map_err(cpio_err)?;
    let mut order = String::from("# load order (written by hearth)\n");
    for (name, bytes) in &modules {
        w.file(&format!("{MODULES_DIR}/{name}"), 0o644, bytes)
            .map_err(cpio_err)?;
        order.push_str(name);
        order.push('\n');
    }
    w.file(&format!("{MODULES_DIR}/order"), 0o644, order.as_bytes())
        .map_err(cpio_err)?;
    let bytes = w.finish().map_err(cpio_err)?;
    fs::create_dir_all(cache).map_err(io_at(cache))?;
    let tmp = cache.join(format!(".initramfs.tmp-{}", std::process::id()));
    fs::write(&tmp, &bytes)
        .and_then(|_| fs::rename(&tmp, &out))
        .map_err(io_at(&out))?;
    Ok(out)
}

/// The read-only code drive of a function: `<fn dir>/code-<h>.ext4` made
/// from `<fn dir>/code`.
pub fn code_image(fn_dir: &Path) -> Result<PathBuf, ImageError> {
    let code = fn_dir.join("code");
    let key = tree_digest(&code)?;
    let image = fn_dir.join(format!("code-{key}.ext4"));
    if image.is_file() {
        return Ok(image);
    }
    ext4::make_image(&code, &image, "hearth-code")?;
    Ok(image)
}

/// A digest of a tree: every entry's relative path, type, mode, and its
/// contents or link target, in sorted order.
pub fn tree_digest(root: &Path) -> Result<String, ImageError> {
    let mut h = Sha256::new();
    h.update(LAYOUT_VERSION);
    let mut todo = vec![PathBuf::new()];
    let mut count = 0usize;
    let mut buf = vec![0u8; 1 << 16];
    while let Some(rel) = todo.pop() {
        let dir = root.join(&rel);
        let mut entries: Vec<_> = fs::read_dir(&dir)
            .map_err(io_at(&dir))?
            .collect::<Result<_, _>>()
            .map_err(io_at(&dir))?;
        entries.sort_by_key(|e| e.file_name());
        // Pushed in reverse so the walk visits names in order.
        let mut subdirs = Vec::new();
        for e in entries {
            count += 1;
            if count > CODE_ENTRIES_MAX {
                return Err(ImageError::TooManyEntries(root.to_path_buf()));
            }
            let path = e.path();
            let m = fs::symlink_metadata(&path).map_err(io_at(&path))?;
            let name = rel.join(e.file_name());
            h.update(name.as_os_str().as_encoded_bytes());
            h.update([0]);
            h.update(m.mode().to_le_bytes());
            if m.file_type().is_symlink() {
                let t = fs::read_link(&path).map_err(io_at(&path))?;
                h.update(t.as_os_str().as_encoded_bytes());
            } else if m.is_file() {
                h.update(m.len().to_le_bytes());
                let mut f = fs::File::open(&path).map_err(io_at(&path))?;
                loop {
                    let n = f.read(&mut buf).map_err(io_at(&path))?;
                    if n == 0 {
                        break;
                    }
                    h.update(&buf[..n]);
                }
            } else if m.is_dir() {
                subdirs.push(name);
            }
            h.update([0xff]);
        }
        todo.extend(subdirs.into_iter().rev());
    }
    Ok(super::short_hex(h))
}

#[cfg(test)]
mod tests {

    #[test]
    fn prune_removes_only_unused_images() {
        let dir = std::env::temp_dir().join(format!("hearth-img-prune-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        for f in [
            "runtime-1.ext4",
            "runtime-2.ext4",
            "initramfs-1.cpio",
            "initramfs-2.cpio",
            "vmlinux-x",
        ] {
            fs::write(dir.join(f), "x").unwrap();
        }
        let (img, ird) = (dir.join("runtime-2.ext4"), dir.join("initramfs-1.cpio"));
        assert_eq!(prune(&dir, &[&img, &ird]), 2);
        let mut left: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, ["initramfs-1.cpio", "runtime-2.ext4", "vmlinux-x"]);
        fs::remove_dir_all(&dir).unwrap();
    }

    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn tree_digest_follows_contents_names_and_modes() {
        let base = std::env::temp_dir().join(format!("hearth-digest-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(base.join("a/b")).unwrap();
        fs::write(base.join("a/b/f.js"), "1").unwrap();
        fs::write(base.join("index.js"), "x").unwrap();
        let d1 = tree_digest(&base).unwrap();
        assert_eq!(d1, tree_digest(&base).unwrap());
        fs::write(base.join("a/b/f.js"), "2").unwrap();
        let d2 = tree_digest(&base).unwrap();
        assert_ne!(d1, d2);
        fs::set_permissions(base.join("index.js"), fs::Permissions::from_mode(0o600)).unwrap();
        assert_ne!(d2, tree_digest(&base).unwrap());
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn initramfs_holds_init_modules_and_their_order() {
        let base = std::env::temp_dir().join(format!("hearth-initrd-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).unwrap();
        let agent = base.join("agent");
        fs::write(&agent, b"\x7fELF agent").unwrap();
        let mut modules = Vec::new();
        for m in ["virtio_ring.ko", "virtio.ko"] {
            fs::write(base.join(m), m).unwrap();
            modules.push(base.join(m));
        }
        let k = Kernel {
            image: base.join("bz"),
            release: String::new(),
            modules,
            source: "test".into(),
        };
        let a = initramfs(&base.join("cache"), &agent, &k).unwrap();
        assert_eq!(a, initramfs(&base.join("cache"), &agent, &k).unwrap());
        let bytes = fs::read(&a).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        let ring = text.find("modules/virtio_ring.ko").unwrap();
        assert!(ring < text.find("modules/virtio.ko").unwrap());
        assert!(text.contains("virtio_ring.ko\nvirtio.ko\n"));
        assert!(text.contains("init\0"));
        // A different agent is a different archive.
        fs::write(&agent, b"\x7fELF agent 2").unwrap();
        assert_ne!(a, initramfs(&base.join("cache"), &agent, &k).unwrap());
        let _ = fs::remove_dir_all(&base);
    }
}
