//! The guest kernel: where it is found, how it is fetched, and the virtio
//! modules the guest agent loads from the initramfs.
//!
//! Sources, first match wins:
//! 1. `HEARTH_KERNEL=<bzImage>` (a user's kernel); its modules, if its virtio
//!    drivers are not built in, from `HEARTH_KERNEL_MODULES=<dir>` (searched
//!    recursively for the names in [`MODULE_ORDER`]).
//! 2. A fetched Debian kernel tree in `<state>/cache/kernel`, `$HEARTH_KERNEL_DIR`
//!    or [`SHARED_KERNEL_DIR`] (where `tools/fetch-kernel.sh` puts it by default):
//!    `<dir>/current` links to a `dpkg-deb -x` tree holding `boot/vmlinuz-<release>`
//!    and `lib/modules/<release>/kernel/**.ko`.
//! 3. Otherwise [`ensure`] fetches Debian's [`DEBIAN_PACKAGE`] into `<state>/cache/kernel`
//!    with `apt-get download` + `dpkg-deb -x` (nothing is installed on the host).

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

/// The Debian metapackage that names the current cloud kernel.
pub const DEBIAN_PACKAGE: &str = "linux-image-cloud-amd64";
/// Kernel trees shared by every state directory on the host.
pub const SHARED_KERNEL_DIR: &str = "/var/cache/hearth/kernel";
/// Modules the guest needs, in load order. `virtio_ring` must precede
/// `virtio` (Debian's modules.dep does not say so). Names missing from a
/// kernel are assumed built in.
pub const MODULE_ORDER: &[&str] = &[
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_blk",
    "virtio_console",
    "virtio_mmio",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
];

/// A kernel the microVMs can boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kernel {
    /// The bzImage (QEMU's `-kernel`).
    pub image: PathBuf,
    /// `uname -r` of the kernel when known (from the module tree), else empty.
    pub release: String,
    /// Module files in load order (empty when the drivers are built in).
    pub modules: Vec<PathBuf>,
    /// Where it came from, for logs and `hearth doctor`.
    pub source: String,
}

/// Why no kernel could be had.
#[derive(Debug)]
pub enum KernelError {
    /// Nothing found and fetching is not possible; the message says what to do.
    NotFound(String),
    /// A fetch step (apt-cache, apt-get download, dpkg-deb) failed.
    Fetch { step: String, detail: String },
    /// A file could not be read or written.
    Io { path: PathBuf, err: io::Error },
}

impl fmt::Display for KernelError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelError::NotFound(m) => write!(f, "{m}"),
            KernelError::Fetch { step, detail } => write!(
                f,
                "fetching the guest kernel: {step} failed: {detail} (run tools/fetch-kernel.sh, or set HEARTH_KERNEL)"
            ),
            KernelError::Io { path, err } => write!(f, "{}: {err}", path.display()),
        }
    }
}

impl std::error::Error for KernelError {}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> KernelError + '_ {
    move |err| KernelError::Io {
        path: path.to_path_buf(),
        err,
    }
}

/// Directories searched for a fetched kernel tree, in order.
pub fn search_dirs(state_dir: &Path) -> Vec<PathBuf> {
    let mut dirs = vec![state_dir.join("cache").join("kernel")];
    if let Ok(d) = std::env::var("HEARTH_KERNEL_DIR") {
        dirs.push(PathBuf::from(d));
    }
    dirs.push(PathBuf::from(SHARED_KERNEL_DIR));
    dirs
}

/// Finds a kernel without fetching: `HEARTH_KERNEL`, then the [`search_dirs`].
pub fn locate(state_dir: &Path) -> Result<Kernel, KernelError> {
    if let Ok(image) = std::env::var("HEARTH_KERNEL") {
        return user_kernel(
            Path::new(&image),
            std::env::var_os("HEARTH_KERNEL_MODULES")
                .as_deref()
                .map(Path::new),
        );
    }
    for dir in search_dirs(state_dir) {
        if let Some(k) = from_tree_dir(&dir)? {
            return Ok(k);
        }
    }
    Err(KernelError::NotFound(format!(
        "no guest kernel: run tools/fetch-kernel.sh (Debian's {DEBIAN_PACKAGE}, into {SHARED_KERNEL_DIR}) or set HEARTH_KERNEL=<bzImage>"
    )))
}

/// [`locate`], else fetch Debian's kernel into `<state>/cache/kernel`.
pub fn ensure(state_dir: &Path) -> Result<Kernel, KernelError> {
    match locate(state_dir) {
        Err(KernelError::NotFound(_)) => {
            let dir = state_dir.join("cache").join("kernel");
            eprintln!(
                "hearth: fetching the guest kernel ({DEBIAN_PACKAGE}) into {}",
                dir.display()
            );
            fetch(&dir)
        }
        other => other,
    }
}

/// A user-supplied bzImage, with modules from `modules_dir` if given.
pub fn user_kernel(image: &Path, modules_dir: Option<&Path>) -> Result<Kernel, KernelError> {
    if !image.is_file() {
        return Err(KernelError::NotFound(format!(
            "HEARTH_KERNEL={} is not a file",
            image.display()
        )));
    }
    let modules = match modules_dir {
        Some(d) => ordered_modules(d)?,
        None => Vec::new(),
    };
    Ok(Kernel {
        image: image.to_path_buf(),
        release: String::new(),
        modules,
        source: format!("HEARTH_KERNEL={}", image.display()),
    })
}

/// Reads `<dir>/current` if it is a complete kernel tree.
fn from_tree_dir(dir: &Path) -> Result<Option<Kernel>, KernelError> {
    let link = dir.join("current");
    if !link.is_dir() {
        return Ok(None);
    }
    // Resolved, so that snapshots name the exact tree (a later fetch moves `current`).
    let tree = fs::canonicalize(&link).map_err(io_at(&link))?;
    let modules_root = tree.join("lib").join("modules");
    let Some(release) = fs::read_dir(&modules_root).ok().and_then(|rd| {
        rd.flatten()
            .filter(|e| e.path().is_dir())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .max()
    }) else {
        return Ok(None);
    };
    let image = tree.join("boot").join(format!("vmlinuz-{release}"));
    if !image.is_file() {
        return Ok(None);
    }
    let modules = ordered_modules(&modules_root.join(&release))?;
    Ok(Some(Kernel {
        image,
        release,
        modules,
        source: tree.display().to_string(),
    }))
}

/// The [`MODULE_ORDER`] modules found under `dir`, in that order.
pub fn ordered_modules(dir: &Path) -> Result<Vec<PathBuf>, KernelError> {
    let mut by_name: HashMap<String, PathBuf> = HashMap::new();
    let mut todo = vec![dir.to_path_buf()];
    // Bounded walk: a module tree has a few thousand entries.
    let mut seen = 0usize;
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).map_err(io_at(&d))?.flatten() {
            seen += 1;
            if seen > 200_000 {
                return Err(KernelError::NotFound(format!(
                    "{} holds too many files to be a module tree",
                    dir.display()
                )));
            }
            let p = e.path();
            let Ok(ft) = e.file_type() else { continue };
            if ft.is_dir() {
                todo.push(p);
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            for ext in [".ko", ".ko.xz", ".ko.zst", ".ko.gz"] {
                if let Some(stem) = name.strip_suffix(ext) {
                    // Module names treat '-' and '_' alike.
                    by_name.insert(stem.replace('-', "_"), p.clone());
                }
            }
        }
    }
    Ok(MODULE_ORDER
        .iter()
        .filter_map(|m| by_name.get(*m).cloned())
        .collect())
}

/// Downloads Debian's cloud kernel package and unpacks it into `dir`
/// (`dir/<package>_<version>/`, linked as `dir/current`).
pub fn fetch(dir: &Path) -> Result<Kernel, KernelError> {
    let fail = |step: &str, detail: String| KernelError::Fetch {
        step: step.to_string(),
        detail,
    };
    fs::create_dir_all(dir).map_err(io_at(dir))?;
    let depends = run(Command::new("apt-cache").args(["depends", DEBIAN_PACKAGE]))
        .map_err(|e| fail("apt-cache depends", e))?;
    let package = depends
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-"))
        .ok_or_else(|| {
            fail(
                "apt-cache depends",
                format!("no linux-image dependency in {depends:?} (run apt-get update?)"),
            )
        })?
        .to_string();
    let work = dir.join(format!(".fetch-{}", std::process::id()));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work).map_err(io_at(&work))?;
    let result = (|| {
        run(Command::new("apt-get")
            .args(["download", "-q", &package])
            .current_dir(&work))
        .map_err(|e| fail("apt-get download", e))?;
        let deb = fs::read_dir(&work)
            .map_err(io_at(&work))?
            .flatten()
            .map(|e| e.path())
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| fail("apt-get download", "no .deb was written".into()))?;
        let stem = deb
            .file_stem()
            .expect("a .deb file has a stem")
            .to_string_lossy()
            .into_owned();
        let tree = work.join("tree");
        run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&tree))
            .map_err(|e| fail("dpkg-deb -x", e))?;
        let dest = dir.join(&stem);
        let _ = fs::remove_dir_all(&dest);
        fs::rename(&tree, &dest).map_err(io_at(&dest))?;
        let link_tmp = dir.join(".current.tmp");
        let _ = fs::remove_file(&link_tmp);
        std::os::unix::fs::symlink(&stem, &link_tmp).map_err(io_at(&link_tmp))?;
        fs::rename(&link_tmp, dir.join("current")).map_err(io_at(dir))?;
        Ok(())
    })();
    let _ = fs::remove_dir_all(&work);
    result?;
    from_tree_dir(dir)?.ok_or_else(|| {
        KernelError::NotFound(format!(
            "{package} unpacked into {} holds no boot/vmlinuz-* with lib/modules/*",
            dir.display()
        ))
    })
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| format!("cannot run {:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(format!(
            "{} {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Kernel {
    /// A digest of everything the guest boots from this kernel (image and
    /// modules), part of the names of images and snapshots built with it.
    pub fn digest(&self) -> io::Result<String> {
        let mut h = Sha256::new();
        crate::runtime::root::hash_file(&mut h, &self.image)?;
        for m in &self.modules {
            h.update(m.file_name().unwrap_or_default().as_encoded_bytes());
            crate::runtime::root::hash_file(&mut h, m)?;
        }
        Ok(super::short_hex(h))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("hearth-kernel-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn modules_come_back_in_load_order_whatever_the_tree_layout() {
        let d = temp("order");
        for rel in [
            "kernel/drivers/char/virtio_console.ko",
            "kernel/drivers/virtio/virtio.ko",
            "kernel/drivers/virtio/virtio_ring.ko",
            "kernel/drivers/block/virtio_blk.ko.xz",
            "kernel/drivers/net/unrelated.ko",
        ] {
            let p = d.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(&p, b"").unwrap();
        }
        let names: Vec<String> = ordered_modules(&d)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "virtio_ring.ko",
                "virtio.ko",
                "virtio_blk.ko.xz",
                "virtio_console.ko"
            ]
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn a_debian_tree_is_found_through_current() {
        let d = temp("tree");
        let rel = "6.1.0-99-cloud-amd64";
        let tree = d.join("linux-image_1");
        fs::create_dir_all(tree.join("boot")).unwrap();
        fs::write(tree.join("boot").join(format!("vmlinuz-{rel}")), b"bz").unwrap();
        let mods = tree
            .join("lib/modules")
            .join(rel)
            .join("kernel/drivers/virtio");
        fs::create_dir_all(&mods).unwrap();
        fs::write(mods.join("virtio.ko"), b"").unwrap();
        assert!(from_tree_dir(&d).unwrap().is_none(), "no current link yet");
        std::os::unix::fs::symlink("linux-image_1", d.join("current")).unwrap();
        let k = from_tree_dir(&d).unwrap().expect("kernel");
        assert_eq!(k.release, rel);
        assert!(k.image.ends_with(format!("boot/vmlinuz-{rel}")));
        assert_eq!(k.modules.len(), 1);
        let _ = fs::remove_dir_all(&d);
    }
}
