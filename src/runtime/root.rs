//! The runtime root: the directory tree every process sandbox sees (read-only) as `/`,
//! and the VM backends pack into their runtime drive.
//!
//! It holds Node.js and exactly the shared libraries it and the agent link against (at the
//! same absolute paths as on the host, so the dynamic loader finds them without a cache), the
//! guest agent, the runtime shim, a minimal `/etc`, mount points for what the launcher mounts, and device
//! mount points. It is built once per distinct set of inputs under a content-derived name, in a
//! temporary directory that is renamed into place, so concurrent callers race safely and a
//! half-built tree is never used.

use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};

use sha2::{Digest, Sha256};

use crate::util::hex;

/// Bumped whenever the layout below changes, so old trees are not reused.
const LAYOUT_VERSION: &str = "hearth-runtime-root-v1";

/// Where the agent and shim live inside the root.
pub const AGENT_PATH: &str = "/hearth/agent";
pub const SHIM_PATH: &str = "/hearth/bootstrap.js";
pub const NODE_PATH: &str = "/usr/bin/node";

/// Empty directories the launcher mounts over.
const MOUNT_DIRS: &[&str] = &["proc", "tmp", "var/task", "dev"];
/// Host devices bind-mounted over empty files of the same name in `/dev`.
pub const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom"];
/// Symlinks in `/dev`.
const DEV_LINKS: &[(&str, &str)] = &[
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];

const ETC_FILES: &[(&str, &str)] = &[
    ("passwd", "root:x:0:0:root:/tmp:/usr/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n"),
    ("group", "root:x:0:\nnogroup:x:65534:\n"),
    ("hosts", "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"),
    ("nsswitch.conf", "passwd: files\ngroup: files\nhosts: files\n"),
];

/// Returns the runtime root for these inputs under `cache_dir`, building it if needed.
pub fn ensure_runtime(
    cache_dir: &Path,
    node: &Path,
    agent: &Path,
    shim: &Path,
) -> io::Result<PathBuf> {
    let node = fs::canonicalize(node).map_err(|e| annotate(e, "node binary", node))?;
    let agent = fs::canonicalize(agent).map_err(|e| annotate(e, "agent binary", agent))?;
    let shim = fs::canonicalize(shim).map_err(|e| annotate(e, "runtime shim", shim))?;
    // The agent may be static (musl) or link glibc like Node; either way its libraries come.
    let mut libs = shared_libraries(&node)?;
    for lib in shared_libraries(&agent)? {
        if !libs.contains(&lib) {
            libs.push(lib);
        }
    }

    let key = runtime_key(cache_dir, &node, &agent, &shim, &libs)?;
    build_once(cache_dir, "runtime", &key, |tmp| {
        build(tmp, &node, &agent, &shim, &libs)
    })
}

/// Builds `<cache_dir>/<prefix>-<key>` with `build` in a temporary directory renamed into
/// place, unless it exists; concurrent callers race safely.
fn build_once(
    cache_dir: &Path,
    prefix: &str,
    key: &str,
    build: impl FnOnce(&Path) -> io::Result<()>,
) -> io::Result<PathBuf> {
    let root = cache_dir.join(format!("{prefix}-{key}"));
    if root.is_dir() {
        return Ok(root);
    }
    fs::create_dir_all(cache_dir)?;

    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = cache_dir.join(format!(
        ".{prefix}-{key}.tmp-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&tmp);
    if let Err(e) = build(&tmp) {
        let _ = fs::remove_dir_all(&tmp);
        return Err(e);
    }
    match fs::rename(&tmp, &root) {
        Ok(()) => Ok(root),
        // Another caller renamed its identical tree into place first.
        Err(_) if root.is_dir() => {
            let _ = fs::remove_dir_all(&tmp);
            Ok(root)
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&tmp);
            Err(annotate(
                e,
                &format!("renaming the {prefix} root into"),
                &root,
            ))
        }
    }
}

/// A root for runtimes other than Node.js, and the host directories to bind over it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Userland {
    /// The tree: hearth's `/etc`, devices, mount points, the agent and the Python bootstrap.
    pub root: PathBuf,
    /// Host directories (of [`USERLAND_DIRS`]) the sandbox binds read-only at the same path.
    pub binds: Vec<PathBuf>,
}

/// Top-level host directories a userland root takes from the host: as the same symlink when
/// the host has a symlink there (merged /usr), else as a read-only bind mount.
pub const USERLAND_DIRS: &[&str] = &["usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32"];
/// Where the Python bootstrap lives inside a userland root.
pub const PYTHON_BOOTSTRAP_PATH: &str = "/hearth/bootstrap.py";

/// Returns the userland root for this agent and Python bootstrap under `cache_dir`, building
/// it if needed. Unlike the Node root it holds no host programs: the host's `/usr` (and
/// `/bin`, `/lib`… where they are not symlinks into it) are bound read-only over it, which
/// gives a bootstrap the host's glibc userland (a shell, curl, Python 3).
pub fn ensure_userland(cache_dir: &Path, agent: &Path, python: &Path) -> io::Result<Userland> {
    let agent = fs::canonicalize(agent).map_err(|e| annotate(e, "agent binary", agent))?;
    let python = fs::canonicalize(python).map_err(|e| annotate(e, "Python bootstrap", python))?;
    // (name, Some(link target) | None for a directory to bind)
    let mut entries = Vec::new();
    for name in USERLAND_DIRS {
        let host = Path::new("/").join(name);
        match fs::symlink_metadata(&host) {
            Ok(m) if m.file_type().is_symlink() => {
                entries.push((*name, Some(fs::read_link(&host)?)))
            }
            Ok(m) if m.is_dir() => entries.push((*name, None)),
            _ => {}
        }
    }
    let mut h = Sha256::new();
    h.update(LAYOUT_VERSION.as_bytes());
    h.update(b"userland\0");
    for (role, path) in [("agent", &agent), ("python", &python)] {
        h.update(role.as_bytes());
        h.update(content_digest(cache_dir, path)?);
    }
    for (name, link) in &entries {
        h.update(name.as_bytes());
        h.update([0]);
        if let Some(l) = link {
            h.update(l.as_os_str().as_encoded_bytes());
        }
        h.update([1]);
    }
    let key = hex::encode(&h.finalize()[..16]);
    let root = build_once(cache_dir, "userland", &key, |tmp| {
        build_userland(tmp, &agent, &python, &entries)
    })?;
    let binds = entries
        .iter()
        .filter(|(_, link)| link.is_none())
        .map(|(name, _)| Path::new("/").join(name))
        .collect();
    Ok(Userland { root, binds })
}

/// Removes runtime roots under `cache_dir` other than `keep` (left by builds
/// of node, the agent or the shim that are no longer used), and build
/// leftovers of processes that are gone. Call it only where nothing else
/// uses the cache: hearth does at start-up, holding the state-dir lock.
/// Returns how many directories went.
pub fn prune_runtimes(cache_dir: &Path, keep: &Path) -> usize {
    prune(cache_dir, "runtime", keep)
}

/// Removes userland roots other than `keep`, as [`prune_runtimes`] does runtime roots.
pub fn prune_userlands(cache_dir: &Path, keep: &Path) -> usize {
    prune(cache_dir, "userland", keep)
}

fn prune(cache_dir: &Path, prefix: &str, keep: &Path) -> usize {
    let Ok(entries) = fs::read_dir(cache_dir) else {
        return 0;
    };
    let mut removed = 0;
    for e in entries.flatten() {
        let path = e.path();
        let name = e.file_name().to_string_lossy().into_owned();
        let stale = if let Some(rest) = name
            .strip_prefix('.')
            .and_then(|n| n.strip_prefix(prefix))
            .and_then(|n| n.strip_prefix('-'))
        {
            // `.runtime-<key>.tmp-<pid>-<seq>`: a build in progress unless its process is gone.
            rest.split_once(".tmp-")
                .and_then(|(_, t)| t.split('-').next()?.parse::<u32>().ok())
                .is_some_and(|pid| {
                    pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
                })
        } else {
            name.strip_prefix(prefix)
                .is_some_and(|n| n.starts_with('-'))
                && path != keep
        };
        if stale && e.file_type().is_ok_and(|t| t.is_dir()) && fs::remove_dir_all(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn annotate(e: io::Error, what: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{what} {}: {e}", path.display()))
}

/// The libraries (and the dynamic loader) `binary` needs, as absolute paths, from `ldd`.
fn shared_libraries(binary: &Path) -> io::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .env("LC_ALL", "C")
        .output()
        .map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("running ldd (needed to find Node.js's libraries): {e}"),
            )
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // glibc's ldd says this on stderr (a static binary that is not PIE, a script).
        let err = String::from_utf8_lossy(&out.stderr);
        let no_libraries =
            |t: &str| t.contains("not a dynamic executable") || t.contains("statically linked");
        if no_libraries(&text) || no_libraries(&err) {
            return Ok(Vec::new());
        }
        return Err(io::Error::other(format!(
            "ldd {} failed: {}{}",
            binary.display(),
            text.trim(),
            err.trim()
        )));
    }
    parse_ldd(&text)
}

fn parse_ldd(text: &str) -> io::Result<Vec<PathBuf>> {
    let mut libs = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        let path = match line.split_once("=>") {
            Some((name, rest)) => {
                let rest = rest.trim();
                if rest.starts_with("not found") {
                    return Err(io::Error::other(format!(
                        "library {} not found",
                        name.trim()
                    )));
                }
                rest.split(" (").next().unwrap_or("")
            }
            None => line.split(" (").next().unwrap_or(""),
        };
        // linux-vdso.so.1 and friends have no file.
        if path.starts_with('/') {
            let p = PathBuf::from(path);
            if !libs.contains(&p) {
                libs.push(p);
            }
        }
    }
    Ok(libs)
}

/// A key over the inputs: full contents of node, agent and shim; path, size, mtime and inode
/// of each library (hashing every library on each start would cost more than it protects —
/// the package manager replaces them with new inodes).
fn runtime_key(
    cache_dir: &Path,
    node: &Path,
    agent: &Path,
    shim: &Path,
    libs: &[PathBuf],
) -> io::Result<String> {
    let mut h = Sha256::new();
    h.update(LAYOUT_VERSION.as_bytes());
    for (role, path) in [("node", node), ("agent", agent), ("shim", shim)] {
        h.update(role.as_bytes());
        h.update([0]);
        h.update(content_digest(cache_dir, path)?);
    }
    for lib in libs {
        let m = fs::metadata(lib).map_err(|e| annotate(e, "library", lib))?;
        h.update(lib.as_os_str().as_encoded_bytes());
        h.update([0]);
        h.update(m.len().to_le_bytes());
        h.update(m.mtime().to_le_bytes());
        h.update(m.mtime_nsec().to_le_bytes());
        h.update(m.ino().to_le_bytes());
    }
    Ok(hex::encode(&h.finalize()[..16]))
}

/// SHA-256 of a file's contents, remembered under `cache_dir/.digests` by the file's identity
/// (device, inode, size, mtime, ctime): hashing Node.js (~100 MB) takes 3 s in a debug build,
/// and any change to the file changes its ctime.
fn content_digest(cache_dir: &Path, path: &Path) -> io::Result<[u8; 32]> {
    let m = fs::metadata(path).map_err(|e| annotate(e, "reading", path))?;
    let mut id = Sha256::new();
    id.update(path.as_os_str().as_encoded_bytes());
    for v in [m.dev(), m.ino(), m.len()] {
        id.update(v.to_le_bytes());
    }
    for v in [m.mtime(), m.mtime_nsec(), m.ctime(), m.ctime_nsec()] {
        id.update(v.to_le_bytes());
    }
    let memo_dir = cache_dir.join(".digests");
    let memo = memo_dir.join(hex::encode(&id.finalize()));
    if let Ok(bytes) = fs::read(&memo) {
        if let Ok(digest) = <[u8; 32]>::try_from(bytes.as_slice()) {
            return Ok(digest);
        }
    }
    let mut h = Sha256::new();
    hash_file(&mut h, path)?;
    let digest: [u8; 32] = h.finalize().into();
    // Best effort: a missing memo only costs the hash again.
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = memo_dir.join(format!(
        ".tmp-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::create_dir_all(&memo_dir)
        .and_then(|_| fs::write(&tmp, digest))
        .and_then(|_| fs::rename(&tmp, &memo));
    let _ = fs::remove_file(&tmp);
    Ok(digest)
}

/// Feeds a file's length and whole contents into `h` (shared with the guest image builders).
pub(crate) fn hash_file(h: &mut Sha256, path: &Path) -> io::Result<()> {
    let mut f = fs::File::open(path)
        .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        len += n as u64;
        h.update(&buf[..n]);
    }
    h.update(len.to_le_bytes());
    Ok(())
}

fn mkdir(path: &Path) -> io::Result<()> {
    fs::create_dir_all(path).map_err(|e| annotate(e, "creating", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
}

/// Copies `src` to `dest` (creating parents), world-readable; executable if `src` is.
fn install(src: &Path, dest: &Path) -> io::Result<()> {
    if let Some(parent) = dest.parent() {
        mkdir_chain(parent)?;
    }
    fs::copy(src, dest).map_err(|e| annotate(e, &format!("copying {} to", src.display()), dest))?;
    let exec = fs::metadata(src)?.permissions().mode() & 0o111 != 0;
    fs::set_permissions(
        dest,
        fs::Permissions::from_mode(if exec { 0o755 } else { 0o644 }),
    )
}

/// Like `create_dir_all`, but every directory it creates gets mode 0755 regardless of umask.
fn mkdir_chain(path: &Path) -> io::Result<()> {
    if path.is_dir() {
        return Ok(());
    }
    if let Some(parent) = path.parent() {
        mkdir_chain(parent)?;
    }
    match fs::create_dir(path) {
        Err(e) if e.kind() != io::ErrorKind::AlreadyExists => {
            return Err(annotate(e, "creating", path))
        }
        _ => {}
    }
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))
}

fn write(path: &Path, contents: &str, mode: u32) -> io::Result<()> {
    fs::write(path, contents).map_err(|e| annotate(e, "writing", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
}

/// `root` joined with an absolute in-root path.
fn inside(root: &Path, abs: &Path) -> PathBuf {
    root.join(abs.strip_prefix("/").unwrap_or(abs))
}

fn build(root: &Path, node: &Path, agent: &Path, shim: &Path, libs: &[PathBuf]) -> io::Result<()> {
    mkdir(root)?;
    for d in MOUNT_DIRS.iter().chain(&["etc", "usr/bin", "hearth"]) {
        mkdir_chain(&root.join(d))?;
    }
    std::os::unix::fs::symlink("usr/bin", root.join("bin"))?;

    install(node, &inside(root, Path::new(NODE_PATH)))?;
    for lib in libs {
        install(lib, &inside(root, lib))?;
    }
    install(agent, &inside(root, Path::new(AGENT_PATH)))?;
    install(shim, &inside(root, Path::new(SHIM_PATH)))?;
    fs::set_permissions(
        inside(root, Path::new(SHIM_PATH)),
        fs::Permissions::from_mode(0o644),
    )?;

    populate_etc_and_dev(root)?;
    // The root and /tmp's mount point are plain 0755 directories; the tmpfs brings mode 1777.
    fs::set_permissions(root, fs::Permissions::from_mode(0o755))
}

fn build_userland(
    root: &Path,
    agent: &Path,
    python: &Path,
    entries: &[(&str, Option<PathBuf>)],
) -> io::Result<()> {
    mkdir(root)?;
    for d in MOUNT_DIRS.iter().chain(&["etc", "hearth"]) {
        mkdir_chain(&root.join(d))?;
    }
    for (name, link) in entries {
        match link {
            Some(target) => std::os::unix::fs::symlink(target, root.join(name))?,
            None => mkdir(&root.join(name))?,
        }
    }
    install(agent, &inside(root, Path::new(AGENT_PATH)))?;
    let py = inside(root, Path::new(PYTHON_BOOTSTRAP_PATH));
    install(python, &py)?;
    fs::set_permissions(&py, fs::Permissions::from_mode(0o644))?;
    populate_etc_and_dev(root)?;
    fs::set_permissions(root, fs::Permissions::from_mode(0o755))
}

/// Programs a microVM userland carries (found in `/usr/bin` or `/bin`; missing ones are left
/// out): a shell and the tools AWS's custom-runtime tutorial uses, curl, and Python 3.
pub const VM_PROGRAMS: &[&str] = &[
    "sh", "bash", "curl", "python3", "awk", "basename", "cat", "cp", "cut", "date", "dirname",
    "env", "false", "grep", "head", "id", "ls", "mkdir", "mktemp", "mv", "printf", "rm", "sed",
    "sleep", "sort", "tail", "tee", "test", "touch", "tr", "true", "uname", "wc", "xargs",
];
/// C runtime libraries a dynamically linked `bootstrap` may need beyond what [`VM_PROGRAMS`]
/// link, looked for in the directory of the shell's `libc.so.6`.
pub const VM_C_LIBRARIES: &[&str] = &[
    "libc.so.6",
    "libm.so.6",
    "libdl.so.2",
    "libpthread.so.0",
    "librt.so.1",
    "libresolv.so.2",
    "libnss_files.so.2",
    "libnss_dns.so.2",
    "libutil.so.1",
    "libanl.so.1",
    "libgcc_s.so.1",
    "libstdc++.so.6",
    "libz.so.1",
];
/// Entries of Python's standard library left out: its tests, GUI and IDE, pip's installer,
/// and the static library under `config-*`.
const PYTHON_STDLIB_SKIP: &[&str] = &[
    "test",
    "idlelib",
    "tkinter",
    "turtledemo",
    "ensurepip",
    "site-packages",
    "dist-packages",
];
/// Largest microVM userland (bytes of file contents) hearth builds an image from.
pub const VM_USERLAND_BYTES_MAX: u64 = 512 << 20;
/// Files of a microVM userland (programs, libraries, the standard library).
const VM_USERLAND_FILES_MAX: usize = 50_000;

/// The userland a microVM of a `provided` or `python3` function runs in, as collected from
/// the host: a glibc userland (a shell, curl, coreutils, the C libraries) and Python 3 with
/// its standard library, each at its host path; hearth's agent and Python bootstrap. A VM
/// cannot bind the host's `/usr` as the process sandbox does, so these are copied
/// ([`VmUserland::build`]) into a tree the guest image is made from.
#[derive(Debug)]
pub struct VmUserland {
    /// Regular files, at the same absolute path in the tree as on the host.
    files: Vec<PathBuf>,
    /// Symbolic links (path in the tree, target as on the host).
    links: Vec<(PathBuf, PathBuf)>,
    agent: PathBuf,
    python_bootstrap: PathBuf,
    /// Bytes of the files' contents.
    pub bytes: u64,
    /// Digest of everything the tree is made from (names its image).
    pub key: String,
}

/// Collects the microVM userland for this agent and Python bootstrap from the host (nothing
/// is copied yet): [`VM_PROGRAMS`], the libraries they and Python's extension modules link,
/// [`VM_C_LIBRARIES`], and the standard library of the Python `/usr/bin/python3` runs. The
/// key covers every file's path, size, mtime and inode (as for the Node root's libraries),
/// and the full contents of the agent and the bootstrap. Over [`VM_USERLAND_BYTES_MAX`] is an
/// error.
pub fn collect_vm_userland(
    cache_dir: &Path,
    agent: &Path,
    python_bootstrap: &Path,
) -> io::Result<VmUserland> {
    let agent = fs::canonicalize(agent).map_err(|e| annotate(e, "agent binary", agent))?;
    let python_bootstrap = fs::canonicalize(python_bootstrap)
        .map_err(|e| annotate(e, "Python bootstrap", python_bootstrap))?;
    let mut c = Collector::default();
    for name in USERLAND_DIRS {
        let host = Path::new("/").join(name);
        if fs::symlink_metadata(&host).is_ok_and(|m| m.file_type().is_symlink()) {
            c.links.push((host.clone(), fs::read_link(&host)?));
        }
    }
    let mut elves = Vec::new();
    for name in VM_PROGRAMS {
        let found = ["/usr/bin", "/bin"]
            .iter()
            .map(|d| Path::new(d).join(name))
            .find(|p| p.exists());
        match found {
            Some(p) => elves.extend(c.add(&p)?),
            None if *name == "sh" => {
                return Err(io::Error::other(
                    "no /bin/sh on this host for the microVM userland",
                ))
            }
            None => {}
        }
    }
    // The standard library of the Python that /usr/bin/python3 is.
    if let Ok(python) = fs::canonicalize("/usr/bin/python3") {
        let version = python
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
            .into_owned();
        let stdlib = Path::new("/usr/lib").join(&version);
        if version.starts_with("python3") && stdlib.is_dir() {
            elves.extend(c.add_tree(&stdlib)?);
        }
    }
    for elf in elves {
        for lib in shared_libraries(&elf)? {
            c.add(&lib)?;
        }
    }
    let libc_dir = shared_libraries(Path::new("/bin/sh"))?
        .into_iter()
        .find(|l| l.file_name().is_some_and(|n| n == "libc.so.6"))
        .and_then(|l| l.parent().map(Path::to_path_buf));
    if let Some(dir) = libc_dir {
        for name in VM_C_LIBRARIES {
            let lib = dir.join(name);
            if lib.exists() {
                c.add(&lib)?;
            }
        }
    }
    if c.bytes > VM_USERLAND_BYTES_MAX {
        return Err(io::Error::other(format!(
            "the microVM userland would hold {} MiB of files, over the {} MiB limit",
            c.bytes >> 20,
            VM_USERLAND_BYTES_MAX >> 20
        )));
    }
    let mut h = Sha256::new();
    h.update(LAYOUT_VERSION.as_bytes());
    h.update(b"vm-userland\0");
    for (role, path) in [("agent", &agent), ("python", &python_bootstrap)] {
        h.update(role.as_bytes());
        h.update(content_digest(cache_dir, path)?);
    }
    c.files.sort();
    c.links.sort();
    for f in &c.files {
        let m = fs::metadata(f).map_err(|e| annotate(e, "reading", f))?;
        h.update(f.as_os_str().as_encoded_bytes());
        h.update([0]);
        for v in [m.len(), m.mtime() as u64, m.mtime_nsec() as u64, m.ino()] {
            h.update(v.to_le_bytes());
        }
    }
    for (link, target) in &c.links {
        h.update(link.as_os_str().as_encoded_bytes());
        h.update([0]);
        h.update(target.as_os_str().as_encoded_bytes());
        h.update([1]);
    }
    Ok(VmUserland {
        files: c.files,
        links: c.links,
        agent,
        python_bootstrap,
        bytes: c.bytes,
        key: hex::encode(&h.finalize()[..16]),
    })
}

impl VmUserland {
    /// Copies the userland into a new directory `root` (which must not exist), with hearth's
    /// `/etc`, `/dev` entries and mount points (`/var/task`, `/tmp`, `/proc`, `/dev`, `/sys`).
    pub fn build(&self, root: &Path) -> io::Result<()> {
        mkdir(root)?;
        for d in MOUNT_DIRS.iter().chain(&["etc", "hearth", "sys"]) {
            mkdir_chain(&root.join(d))?;
        }
        // Shallow links first: `/bin -> usr/bin` before anything under it.
        let mut links: Vec<_> = self.links.iter().collect();
        links.sort_by_key(|(l, _)| l.components().count());
        for (link, target) in links {
            let at = inside(root, link);
            if let Some(parent) = at.parent() {
                mkdir_chain(parent)?;
            }
            std::os::unix::fs::symlink(target, &at).map_err(|e| annotate(e, "linking", &at))?;
        }
        for f in &self.files {
            install(f, &inside(root, f))?;
        }
        install(&self.agent, &inside(root, Path::new(AGENT_PATH)))?;
        let py = inside(root, Path::new(PYTHON_BOOTSTRAP_PATH));
        install(&self.python_bootstrap, &py)?;
        fs::set_permissions(&py, fs::Permissions::from_mode(0o644))?;
        populate_etc_and_dev(root)?;
        fs::set_permissions(root, fs::Permissions::from_mode(0o755))
    }

    /// How many files and links it holds.
    pub fn entries(&self) -> usize {
        self.files.len() + self.links.len()
    }
}

/// Gathers a [`VmUserland`]'s files and links without duplicates.
#[derive(Default)]
struct Collector {
    files: Vec<PathBuf>,
    links: Vec<(PathBuf, PathBuf)>,
    seen: std::collections::HashSet<PathBuf>,
    bytes: u64,
}

impl Collector {
    /// Adds the host file at `path`, under its directory's canonical path; a symbolic link is
    /// kept as one and its target added too. Returns the regular files added that may be ELF
    /// programs or libraries (whose libraries the caller adds).
    fn add(&mut self, path: &Path) -> io::Result<Vec<PathBuf>> {
        let mut added = Vec::new();
        let mut next = Some(path.to_path_buf());
        // A chain of links (python3 -> python3.11, awk -> /etc/alternatives/awk -> mawk).
        for _ in 0..16 {
            let Some(p) = next.take() else { break };
            let (Some(parent), Some(name)) = (p.parent(), p.file_name()) else {
                break;
            };
            let dir = fs::canonicalize(parent).map_err(|e| annotate(e, "resolving", parent))?;
            let at = dir.join(name);
            if !self.seen.insert(at.clone()) {
                break;
            }
            let m = fs::symlink_metadata(&at).map_err(|e| annotate(e, "reading", &at))?;
            if m.file_type().is_symlink() {
                let target = fs::read_link(&at)?;
                next = Some(dir.join(&target));
                self.links.push((at, target));
            } else if m.is_file() {
                self.push_file(at.clone(), m.len())?;
                added.push(at);
            }
        }
        Ok(added)
    }

    /// Adds a directory tree (Python's standard library) less [`PYTHON_STDLIB_SKIP`] and
    /// `config-*`; links inside are kept as links. Returns its shared objects.
    fn add_tree(&mut self, top: &Path) -> io::Result<Vec<PathBuf>> {
        let mut objects = Vec::new();
        let top = fs::canonicalize(top).map_err(|e| annotate(e, "resolving", top))?;
        let mut todo = vec![top.clone()];
        while let Some(dir) = todo.pop() {
            for e in fs::read_dir(&dir).map_err(|e| annotate(e, "reading", &dir))? {
                let e = e?;
                let name = e.file_name().to_string_lossy().into_owned();
                if dir == top
                    && (PYTHON_STDLIB_SKIP.contains(&name.as_str()) || name.starts_with("config-"))
                {
                    continue;
                }
                let path = e.path();
                let m = fs::symlink_metadata(&path)?;
                if m.is_dir() {
                    todo.push(path);
                } else if m.file_type().is_symlink() {
                    let target = fs::read_link(&path)?;
                    self.links.push((path, target));
                } else if m.is_file() {
                    if name.ends_with(".so") {
                        objects.push(path.clone());
                    }
                    self.seen.insert(path.clone());
                    self.push_file(path, m.len())?;
                }
            }
        }
        Ok(objects)
    }

    fn push_file(&mut self, path: PathBuf, len: u64) -> io::Result<()> {
        if self.files.len() >= VM_USERLAND_FILES_MAX {
            return Err(io::Error::other(format!(
                "the microVM userland would hold more than {VM_USERLAND_FILES_MAX} files"
            )));
        }
        self.bytes += len;
        self.files.push(path);
        Ok(())
    }
}

/// hearth's `/etc` files, and the device files and links of `/dev`.
fn populate_etc_and_dev(root: &Path) -> io::Result<()> {
    for (name, text) in ETC_FILES {
        write(&root.join("etc").join(name), text, 0o644)?;
    }
    let dev = root.join("dev");
    for d in DEVICES {
        write(&dev.join(d), "", 0o644)?;
    }
    for (name, target) in DEV_LINKS {
        std::os::unix::fs::symlink(target, dev.join(name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {

    #[test]
    fn prune_keeps_the_current_root_and_builds_in_progress() {
        let cache = std::env::temp_dir().join(format!("hearth-prune-{}", std::process::id()));
        let _ = fs::remove_dir_all(&cache);
        let dead_pid = 4_000_000; // above any pid_max
        for d in [
            "runtime-aaaa".to_string(),
            "runtime-bbbb".to_string(),
            format!(".runtime-cccc.tmp-{dead_pid}-0"),
            format!(".runtime-dddd.tmp-{}-0", std::process::id()),
            "guest".to_string(),
        ] {
            fs::create_dir_all(cache.join(d).join("usr")).unwrap();
        }
        fs::write(cache.join("bootstrap.js"), "x").unwrap();
        assert_eq!(prune_runtimes(&cache, &cache.join("runtime-bbbb")), 2);
        let mut left: Vec<String> = fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mine = format!(".runtime-dddd.tmp-{}-0", std::process::id());
        assert_eq!(
            left,
            [mine.as_str(), "bootstrap.js", "guest", "runtime-bbbb"]
        );
        fs::remove_dir_all(&cache).unwrap();
    }

    use super::*;

    #[test]
    fn ldd_output_yields_library_paths_and_the_loader() {
        let text = "\tlinux-vdso.so.1 (0x00007ffb1dc0f000)\n\
            \tlibdl.so.2 => /lib/x86_64-linux-gnu/libdl.so.2 (0x00007ffb1dbf6000)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007ffb1d61e000)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007ffb1dc11000)\n";
        let libs = parse_ldd(text).unwrap();
        assert_eq!(
            libs,
            vec![
                PathBuf::from("/lib/x86_64-linux-gnu/libdl.so.2"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn static_binaries_need_no_libraries() {
        assert!(parse_ldd("\tstatically linked\n").unwrap().is_empty());
    }

    #[test]
    fn ldd_missing_library_is_an_error() {
        let err = parse_ldd("\tlibfoo.so.1 => not found\n").unwrap_err();
        assert!(err.to_string().contains("libfoo.so.1"), "{err}");
    }

    #[test]
    fn userland_root_mirrors_the_hosts_top_level_directories() {
        let base = std::env::temp_dir().join(format!("hearth-userland-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).unwrap();
        let py = base.join("bootstrap.py");
        fs::write(&py, "# py\n").unwrap();
        let cache = base.join("cache");
        let u = ensure_userland(&cache, Path::new("/bin/sh"), &py).unwrap();
        assert_eq!(
            ensure_userland(&cache, Path::new("/bin/sh"), &py).unwrap(),
            u
        );
        assert!(u
            .root
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("userland-"));
        assert!(u.binds.contains(&PathBuf::from("/usr")));
        for name in USERLAND_DIRS {
            let host = Path::new("/").join(name);
            let inside = u.root.join(name);
            match fs::symlink_metadata(&host) {
                Ok(m) if m.file_type().is_symlink() => {
                    assert_eq!(
                        fs::read_link(&inside).unwrap(),
                        fs::read_link(&host).unwrap()
                    );
                }
                Ok(_) => {
                    assert!(
                        fs::read_dir(&inside).unwrap().next().is_none(),
                        "{name} is empty"
                    );
                    assert!(u.binds.contains(&host));
                }
                Err(_) => assert!(!inside.exists()),
            }
        }
        assert_eq!(
            fs::read_to_string(u.root.join("hearth/bootstrap.py")).unwrap(),
            "# py\n"
        );
        assert!(u.root.join("hearth/agent").is_file());
        assert!(u.root.join("etc/passwd").is_file());
        assert!(u.root.join("var/task").is_dir());
        // Pruning userlands leaves runtime roots alone, and the reverse.
        fs::create_dir_all(cache.join("runtime-x")).unwrap();
        fs::create_dir_all(cache.join("userland-old")).unwrap();
        assert_eq!(prune_userlands(&cache, &u.root), 1);
        assert!(u.root.is_dir() && cache.join("runtime-x").is_dir());
        assert_eq!(prune_runtimes(&cache, Path::new("/none")), 1);
        assert!(u.root.is_dir());
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn vm_userland_mirrors_host_paths_links_and_the_python_stdlib() {
        let base = std::env::temp_dir().join(format!("hearth-vmland-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).unwrap();
        let py = base.join("bootstrap.py");
        fs::write(&py, "# py\n").unwrap();
        let cache = base.join("cache");
        let u = collect_vm_userland(&cache, Path::new("/bin/sh"), &py).unwrap();
        assert_eq!(
            collect_vm_userland(&cache, Path::new("/bin/sh"), &py)
                .unwrap()
                .key,
            u.key,
            "same inputs, same key"
        );
        assert!(u.bytes > 0 && u.bytes <= VM_USERLAND_BYTES_MAX);
        // The shell: a file (or a link chain ending in one) at its canonical path.
        let sh = fs::canonicalize("/bin/sh").unwrap();
        assert!(u.files.contains(&sh), "{sh:?}");
        let libc = shared_libraries(Path::new("/bin/sh"))
            .unwrap()
            .into_iter()
            .find(|l| l.ends_with("libc.so.6"))
            .unwrap();
        let libc_at = fs::canonicalize(libc.parent().unwrap())
            .unwrap()
            .join("libc.so.6");
        assert!(u.files.contains(&libc_at), "{libc_at:?}");
        // Top-level links are kept as the host has them (merged /usr).
        if fs::symlink_metadata("/bin")
            .unwrap()
            .file_type()
            .is_symlink()
        {
            assert!(u
                .links
                .contains(&(PathBuf::from("/bin"), fs::read_link("/bin").unwrap())));
        }
        if let Ok(python) = fs::canonicalize("/usr/bin/python3") {
            assert!(u.files.contains(&python));
            let stdlib = Path::new("/usr/lib").join(python.file_name().unwrap());
            if stdlib.join("os.py").is_file() {
                assert!(u.files.contains(&stdlib.join("os.py")));
                assert!(!u
                    .files
                    .iter()
                    .any(|f| f.starts_with(stdlib.join("test"))
                        || f.starts_with(stdlib.join("idlelib"))));
            }
        }
        // A different bootstrap is a different key.
        fs::write(&py, "# py 2\n").unwrap();
        let other = collect_vm_userland(&cache, Path::new("/bin/sh"), &py).unwrap();
        assert_ne!(other.key, u.key);
        // The tree holds them at the same paths, with hearth's files and mount points.
        let root = base.join("tree");
        other.build(&root).unwrap();
        assert!(inside(&root, &sh).is_file());
        assert!(root.join("hearth/bootstrap.py").is_file() && root.join("hearth/agent").is_file());
        for d in ["var/task", "tmp", "proc", "dev", "sys"] {
            assert!(root.join(d).is_dir(), "{d}");
        }
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn runtime_root_is_built_once_and_reused() {
        let base = std::env::temp_dir().join(format!("hearth-rootfs-test-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        fs::create_dir_all(&base).unwrap();
        let shim = base.join("shim.js");
        fs::write(&shim, "// shim\n").unwrap();
        // /bin/sh stands in for node: a small dynamic executable.
        let sh = Path::new("/bin/sh");
        let cache = base.join("cache");
        let a = ensure_runtime(&cache, sh, sh, &shim).unwrap();
        let b = ensure_runtime(&cache, sh, sh, &shim).unwrap();
        assert_eq!(a, b);
        assert!(a.join("usr/bin/node").is_file());
        assert!(a.join("hearth/agent").is_file());
        assert_eq!(
            fs::read_to_string(a.join("hearth/bootstrap.js")).unwrap(),
            "// shim\n"
        );
        assert!(
            a.join("lib64/ld-linux-x86-64.so.2").is_file() || cfg!(not(target_arch = "x86_64"))
        );
        assert!(fs::read_to_string(a.join("etc/nsswitch.conf"))
            .unwrap()
            .contains("hosts: files"));
        assert_eq!(
            fs::read_link(a.join("bin")).unwrap(),
            PathBuf::from("usr/bin")
        );
        for d in ["proc", "tmp", "var/task", "dev"] {
            let m = fs::metadata(a.join(d)).unwrap();
            assert!(m.is_dir());
            assert_eq!(m.permissions().mode() & 0o7777, 0o755, "{d}");
        }
        // No temporary trees are left behind: one root plus the digest memos.
        let mut entries: Vec<String> = fs::read_dir(&cache)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        entries.sort();
        assert_eq!(entries.len(), 2, "{entries:?}");
        assert_eq!(entries[0], ".digests");

        // A different shim is a different root.
        fs::write(&shim, "// shim 2\n").unwrap();
        let c = ensure_runtime(&cache, sh, sh, &shim).unwrap();
        assert_ne!(a, c);
        let _ = fs::remove_dir_all(&base);
    }
}
