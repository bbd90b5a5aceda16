//! The runtime every instance runs, whatever the backend: Node.js, the static
//! guest agent and the shim, gathered into one runtime root.
//!
//! - [`SHIM`] and [`write_shim`]: the shim (`include/runtime/bootstrap.js`),
//!   built into the binary and written to `<state>/cache/bootstrap.js`.
//! - [`find_node`], [`find_static_agent`]: the host programs that go into the root.
//! - [`root`]: builds the root tree under a content-derived name, and prunes
//!   the roots of older builds.
//!
//! The process backend mounts the root read-only as each sandbox's `/`; the VM
//! backends pack the same tree into their read-only runtime drive
//! ([`crate::guest::images`]). Both get it from [`ensure`].
//!
//! Functions of other runtimes ([`RuntimeKind`]: `provided`, `python3`) run in a
//! userland root instead ([`ensure_userland`]): the agent, hearth's Python bootstrap
//! ([`PYTHON_BOOTSTRAP`], `include/runtime/bootstrap.py`) and the host's `/usr`
//! bound read-only; the agent serves them the Lambda Runtime API. MicroVMs cannot bind the
//! host's `/usr`: their image for these runtimes is copied from it ([`collect_vm_userland`]).

pub mod kind;
pub mod root;

pub use kind::RuntimeKind;

use std::fmt;
use std::fs;
use std::io::{self, Read, Seek};
use std::path::{Path, PathBuf};

use crate::util::program::find_program;

/// The shim, built into the binary so a deployed server needs no source tree.
pub const SHIM: &[u8] = include_bytes!("../../include/runtime/bootstrap.js");
/// The Python runtime's bootstrap (a Runtime API client), built in likewise.
pub const PYTHON_BOOTSTRAP: &[u8] = include_bytes!("../../include/runtime/bootstrap.py");

/// Why the runtime root could not be made.
#[derive(Debug)]
pub enum RuntimeError {
    /// A program the runtime needs (Node.js, the static agent) was not found;
    /// the text says what to install or set.
    Missing(String),
    /// The cache directory could not be created.
    Cache { path: PathBuf, err: io::Error },
    /// The shim could not be written to the cache.
    Shim { path: PathBuf, err: io::Error },
    /// Building the root tree failed.
    Build(io::Error),
}

impl fmt::Display for RuntimeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RuntimeError::Missing(m) => write!(f, "{m}"),
            RuntimeError::Cache { path, err } => write!(f, "create {}: {err}", path.display()),
            RuntimeError::Shim { path, err } => write!(f, "write {}: {err}", path.display()),
            RuntimeError::Build(e) => write!(f, "build the runtime root: {e}"),
        }
    }
}

impl std::error::Error for RuntimeError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            RuntimeError::Missing(_) => None,
            RuntimeError::Cache { err, .. } | RuntimeError::Shim { err, .. } => Some(err),
            RuntimeError::Build(e) => Some(e),
        }
    }
}

/// The runtime root for the programs this host has, under `cache`
/// (`<state>/cache`): writes the shim, finds Node.js and the static agent, and
/// builds the root unless a root of the same inputs exists. Older roots stay;
/// [`root::prune_runtimes`] removes them.
pub fn ensure(cache: &Path) -> Result<PathBuf, RuntimeError> {
    let shim = write_shim(cache)?;
    let agent = find_static_agent()?;
    let node = find_node()?;
    root::ensure_runtime(cache, &node, &agent, &shim).map_err(RuntimeError::Build)
}

/// The userland root for runtimes other than Node.js, under `cache`: writes the
/// Python bootstrap, finds the static agent, and builds the tree unless it exists.
pub fn ensure_userland(cache: &Path) -> Result<root::Userland, RuntimeError> {
    let python = write_cached(cache, "bootstrap.py", PYTHON_BOOTSTRAP)?;
    let agent = find_static_agent()?;
    root::ensure_userland(cache, &agent, &python).map_err(RuntimeError::Build)
}

/// What the microVM runtime image of the runtimes other than Node.js is made of, collected
/// from the host ([`root::collect_vm_userland`]): writes the Python bootstrap into `cache` and
/// finds the static agent. The guest images module builds the image from it.
pub fn collect_vm_userland(cache: &Path) -> Result<root::VmUserland, RuntimeError> {
    let python = write_cached(cache, "bootstrap.py", PYTHON_BOOTSTRAP)?;
    let agent = find_static_agent()?;
    root::collect_vm_userland(cache, &agent, &python).map_err(RuntimeError::Build)
}

/// Writes the shim to `<cache>/bootstrap.js` unless it is there already;
/// returns its path. The one place the shim reaches the disk.
pub fn write_shim(cache: &Path) -> Result<PathBuf, RuntimeError> {
    write_cached(cache, "bootstrap.js", SHIM)
}

/// Writes `bytes` to `<cache>/<name>` unless the file holds them already.
fn write_cached(cache: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, RuntimeError> {
    fs::create_dir_all(cache).map_err(|err| RuntimeError::Cache {
        path: cache.to_path_buf(),
        err,
    })?;
    let shim = cache.join(name);
    if fs::read(&shim).ok().as_deref() != Some(bytes) {
        let tmp = cache.join(format!(".{name}.tmp-{}", std::process::id()));
        fs::write(&tmp, bytes)
            .and_then(|_| fs::rename(&tmp, &shim))
            .map_err(|err| RuntimeError::Shim {
                path: shim.clone(),
                err,
            })?;
    }
    Ok(shim)
}

/// Finds Node.js: `$HEARTH_NODE` or `node` on PATH.
pub fn find_node() -> Result<PathBuf, RuntimeError> {
    find_program("HEARTH_NODE", "node").ok_or_else(|| {
        RuntimeError::Missing(
            "Node.js was not found on PATH: install nodejs (>= 18) or set HEARTH_NODE".into(),
        )
    })
}

/// The guest agent, which must run without shared libraries in a VM's
/// initramfs: a statically linked build (`tools/build-agent.sh`).
/// `$HEARTH_AGENT` if set (and not empty), else the first static one of: the
/// static build in the cargo target directory above the hearth binary, the
/// agent next to it (a plain `cargo build` also leaves a dynamic
/// `hearth-agent` there). Either way it must speak this build's wire protocol
/// ([`check_agent`]).
pub fn find_static_agent() -> Result<PathBuf, RuntimeError> {
    let agent = locate_agent()?;
    check_agent(&agent)?;
    Ok(agent)
}

fn locate_agent() -> Result<PathBuf, RuntimeError> {
    // An explicit choice is taken as given (the process backend can run a
    // dynamic agent whose libraries are in its root; microVMs cannot).
    if let Some(p) = agent_override(std::env::var_os("HEARTH_AGENT")) {
        return Ok(p);
    }
    let exe = std::env::current_exe().map_err(|e| RuntimeError::Missing(e.to_string()))?;
    let dir = exe.parent().unwrap_or(Path::new("/")).to_path_buf();
    // Where tools/build-agent.sh puts the static build, before a plain `cargo
    // build`'s dynamic one that may sit next to the hearth binary.
    let mut candidates = Vec::new();
    for up in [dir.join(".."), dir.join("../..")] {
        for profile in ["release", "debug"] {
            candidates.push(
                up.join("x86_64-unknown-linux-gnu")
                    .join(profile)
                    .join("hearth-agent"),
            );
        }
    }
    candidates.push(dir.join("hearth-agent"));
    let mut dynamic = Vec::new();
    for c in candidates.into_iter().filter(|p| p.is_file()) {
        match is_static_elf(&c) {
            Ok(true) => return Ok(c),
            Ok(false) => dynamic.push(c.display().to_string()),
            Err(e) => dynamic.push(format!("{} ({e})", c.display())),
        }
    }
    Err(RuntimeError::Missing(if dynamic.is_empty() {
        "the guest agent binary was not found: run tools/build-agent.sh or set HEARTH_AGENT".into()
    } else {
        format!(
            "no statically linked guest agent (dynamic: {}): run tools/build-agent.sh",
            dynamic.join(", ")
        )
    }))
}

/// Refuses an agent that speaks another wire protocol than this build, read
/// from its `--version` line. The agent is built apart from hearth (a static
/// binary), so a stale one is easy to end up with after an update, and would
/// misread frames silently (one from before protocol 2 reads every request as
/// empty); this turns that into an error at start-up that says what to do.
pub fn check_agent(agent: &Path) -> Result<(), RuntimeError> {
    let out = std::process::Command::new(agent)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .map_err(|e| {
            RuntimeError::Missing(format!(
                "cannot run the guest agent {} --version: {e}",
                agent.display()
            ))
        })?;
    let line = String::from_utf8_lossy(&out.stdout);
    let line = line.lines().next().unwrap_or("").trim();
    let ours = hearth_protocol::VERSION;
    let rebuild =
        "rebuild it with tools/build-agent.sh, or set HEARTH_AGENT to an agent of this build";
    let why = match agent_protocol(line) {
        _ if !out.status.success() => format!("`--version` failed ({})", out.status),
        Some(v) if v == ours => return Ok(()),
        Some(v) => format!("speaks wire protocol {v}, this hearth {ours}"),
        None => format!(
            "reports no wire protocol ({line:?}), so it predates protocol {ours} that this \
             hearth speaks"
        ),
    };
    Err(RuntimeError::Missing(format!(
        "the guest agent {} {why}: {rebuild}",
        agent.display()
    )))
}

/// The protocol number in an agent's `--version` line, `hearth-agent <version>
/// (protocol <N>)`.
fn agent_protocol(line: &str) -> Option<u16> {
    let rest = line.strip_prefix("hearth-agent ")?;
    let number = rest.split_once("(protocol ")?.1.strip_suffix(')')?;
    number.parse().ok()
}

/// `HEARTH_AGENT`'s value as a path; an empty value counts as unset (`VAR=
/// cmd`, or a script passing on a variable nobody set, means no choice).
fn agent_override(value: Option<std::ffi::OsString>) -> Option<PathBuf> {
    value.filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// True when the ELF file at `path` has no program interpreter (PT_INTERP).
pub fn is_static_elf(path: &Path) -> io::Result<bool> {
    let mut f = fs::File::open(path)?;
    let mut head = [0u8; 64];
    f.read_exact(&mut head)?;
    let bad = || {
        io::Error::new(
            io::ErrorKind::InvalidData,
            "not a 64-bit little-endian ELF file",
        )
    };
    if &head[..4] != b"\x7fELF" || head[4] != 2 || head[5] != 1 {
        return Err(bad());
    }
    let phoff = u64::from_le_bytes(head[0x20..0x28].try_into().expect("8 bytes"));
    let phentsize = usize::from(u16::from_le_bytes([head[0x36], head[0x37]]));
    let phnum = usize::from(u16::from_le_bytes([head[0x38], head[0x39]]));
    if phentsize < 4 || phnum > 256 {
        return Err(bad());
    }
    let mut table = vec![0u8; phentsize * phnum];
    f.seek(io::SeekFrom::Start(phoff))?;
    f.read_exact(&mut table)?;
    const PT_INTERP: u32 = 3;
    Ok(table
        .chunks(phentsize)
        .all(|ph| u32::from_le_bytes(ph[..4].try_into().expect("4 bytes")) != PT_INTERP))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_hearth_agent_is_no_choice() {
        assert_eq!(agent_override(None), None);
        assert_eq!(agent_override(Some("".into())), None);
        assert_eq!(
            agent_override(Some("/opt/hearth-agent".into())),
            Some(PathBuf::from("/opt/hearth-agent"))
        );
    }

    #[test]
    fn the_agent_protocol_is_read_from_its_version_line() {
        assert_eq!(agent_protocol("hearth-agent 0.1.0 (protocol 2)"), Some(2));
        assert_eq!(agent_protocol("hearth-agent x (protocol 17)"), Some(17));
        for line in [
            "hearth-agent 0.1.0",
            "",
            "true (GNU coreutils) 9.1",
            "hearth-agent 0.1.0 (protocol two)",
            "hearth-agent 0.1.0 (protocol 2",
        ] {
            assert_eq!(agent_protocol(line), None, "{line:?}");
        }
    }

    #[test]
    fn agents_of_another_protocol_are_refused() {
        let dir = std::env::temp_dir().join(format!("hearth-agent-check-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        let script = |name: &str, body: &str| {
            let p = dir.join(name);
            crate::util::program::write_executable(&p, &format!("#!/bin/sh\n{body}\n"));
            p
        };
        let ours = hearth_protocol::VERSION;
        let current = script(
            "current",
            &format!("echo 'hearth-agent 9 (protocol {ours})'"),
        );
        check_agent(&current).unwrap();
        let err = |p: &Path| check_agent(p).unwrap_err().to_string();
        let old = err(&script("old", "echo 'hearth-agent 0.1.0'"));
        assert!(
            old.contains("reports no wire protocol") && old.contains("build-agent"),
            "{old}"
        );
        let other = err(&script("other", "echo 'hearth-agent 9 (protocol 1)'"));
        assert!(
            other.contains(&format!("speaks wire protocol 1, this hearth {ours}")),
            "{other}"
        );
        let failed = err(&script(
            "failed",
            &format!("echo 'hearth-agent 9 (protocol {ours})'; exit 3"),
        ));
        assert!(failed.contains("exit status: 3"), "{failed}");
        let missing = err(&dir.join("absent"));
        assert!(missing.contains("cannot run"), "{missing}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_built_agent_speaks_this_protocol() {
        let agent = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("target/x86_64-unknown-linux-gnu/release/hearth-agent");
        if !agent.is_file() {
            eprintln!(
                "skipped: no static agent at {} (tools/build-agent.sh)",
                agent.display()
            );
            return;
        }
        check_agent(&agent).unwrap();
    }

    #[test]
    fn static_and_dynamic_executables_are_told_apart() {
        // /bin/sh is dynamic on every distribution hearth supports.
        assert!(!is_static_elf(Path::new("/bin/sh")).unwrap());
        assert!(is_static_elf(Path::new("/etc/hostname")).is_err());
    }

    #[test]
    fn the_shim_is_written_once_and_rewritten_when_it_differs() {
        let cache = std::env::temp_dir().join(format!("hearth-shim-{}", std::process::id()));
        let _ = fs::remove_dir_all(&cache);
        let shim = write_shim(&cache).unwrap();
        assert_eq!(shim, cache.join("bootstrap.js"));
        assert_eq!(fs::read(&shim).unwrap(), SHIM);
        fs::write(&shim, "stale").unwrap();
        write_shim(&cache).unwrap();
        assert_eq!(fs::read(&shim).unwrap(), SHIM);
        let left: Vec<_> = fs::read_dir(&cache).unwrap().flatten().collect();
        assert_eq!(left.len(), 1, "no temporary file stays behind");
        fs::remove_dir_all(&cache).unwrap();
    }
}
