//! Control groups for one sandbox: memory, pids and cpu limits, on cgroup v2 or v1.
//!
//! Each sandbox gets `hearth/<name>` below the cgroup hearth itself runs in (per hierarchy on
//! v1), so sandboxes stay inside whatever limits a supervisor (systemd, a container) put on
//! hearth. On v2 the "no internal processes" rule forbids enabling controllers below a cgroup
//! that holds processes, so there the `hearth` directory sits at the root of the hierarchy.
//!
//! Cgroups are best-effort: when a hierarchy or controller is missing, [`create`] returns what
//! it could set up plus a warning, and the sandbox runs with fewer limits.
//!
//! VMM processes (QEMU, Firecracker without the jailer) get groups made the same way, with
//! limits of their own ([`crate::sandbox::vmcgroup`]) and the same CPU contract
//! ([`cpu_settings`]).

use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Length of one CFS period; `cpu_millicores` are scaled to a quota per period.
pub const CPU_PERIOD_US: u64 = 100_000;
/// The kernel rejects quotas below 1 ms.
const CPU_QUOTA_MIN_US: u64 = 1_000;
/// How long [`Group::remove`] keeps retrying while the last tasks leave the cgroup.
pub const REMOVE_WAIT_MS: u64 = 2_000;

/// Which cgroup interface a [`Group`] uses.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub enum Version {
    V1,
    V2,
}

/// The limits applied to one sandbox.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub memory_bytes: u64,
    pub pids_max: u32,
    /// 1/1000 of a core per period; 0 = unlimited.
    pub cpu_millicores: u32,
    /// Start with the background CPU weight ([`Group::to_foreground`] ends it).
    pub cpu_background: bool,
}

/// The CPU weight of a sandbox doing background work (a standby initialising
/// while the cores serve requests), against the default of its siblings: a
/// sixteenth (cgroup v1 `cpu.shares` 64 of 1024, v2 `cpu.weight` 6 of 100).
/// Not zero: on a core saturated by k instances it still gets 1/(16k + 1) of
/// it. A heavy initialisation may then outlast its time limit; that refill
/// fails quietly and the function's next start makes its own instance at the
/// default weight. Measured with Express requests
/// at 6,400/s on two cores and four Node initialisations of the app in the
/// middle of a 6 s run: p99.9 29-31 ms at the default weight, 13-16 ms at
/// this one (15 ms with none).
pub const BACKGROUND_CPU_SHARES: u64 = 64;
/// [`BACKGROUND_CPU_SHARES`] on cgroup v2.
pub const BACKGROUND_CPU_WEIGHT: u64 = 6;
/// The kernel's default weights (v1 `cpu.shares`, v2 `cpu.weight`).
const DEFAULT_CPU_SHARES: u64 = 1024;
const DEFAULT_CPU_WEIGHT: u64 = 100;

/// The CPU weight of the `hearth` directory that holds every sandbox, per CPU
/// hearth may use, in default weights (one ordinary thread's): the default of
/// `serve --instances-cpu-weight`.
///
/// The kernel schedules that directory as one entity beside hearth's own
/// threads (v1) or beside the cgroup hearth runs in (v2), and splits its
/// weight between CPUs by where its load is. Left at the kernel's default
/// (one thread's weight for all of it), every instance on a core of a
/// two-core server together weighed about half its worker thread: a lone busy
/// instance got the CPU only when its worker slept, the worker's
/// `sched_yield` came back at once, and the core settled in a slow pattern
/// (the instance preempted at each answer instead of sleeping); the trivial
/// handler made 55–65k req/s in that pattern against 85–90k in the other, by
/// chance per run. At one per CPU the instances on an evenly loaded CPU weigh
/// what its worker does (`perf/RESULTS.md`, "the instances' CPU weight"). The
/// count is the host's CPUs, not a server's `--cores`: every server on the
/// host shares the directory, and each writes the weight.
pub const INSTANCES_CPU_WEIGHT_DEFAULT: u64 = 1;

/// The `hearth` directory's weight in default weights, set once at start
/// ([`set_parent_weight`]); 0 leaves the directory's weight as it is (tests
/// that make sandboxes directly).
static PARENT_WEIGHT: AtomicU64 = AtomicU64::new(0);

/// Sets the weight, in default weights, that [`create`] gives the directory
/// holding every sandbox: CPUs × `serve --instances-cpu-weight`.
pub fn set_parent_weight(units: u64) {
    PARENT_WEIGHT.store(units, Ordering::Relaxed);
}

/// What [`set_parent_weight`] set (0 when nothing did).
pub fn parent_weight() -> u64 {
    PARENT_WEIGHT.load(Ordering::Relaxed)
}

/// The weight file and value for the `hearth` directory at `units` default
/// weights, within the kernel's range (v1 shares 2..=262144, v2 weight
/// 1..=10000).
pub fn parent_cpu_weight(version: Version, units: u64) -> (&'static str, String) {
    let units = units.max(1);
    match version {
        Version::V1 => (
            "cpu.shares",
            DEFAULT_CPU_SHARES
                .saturating_mul(units)
                .clamp(2, 262_144)
                .to_string(),
        ),
        Version::V2 => (
            "cpu.weight",
            DEFAULT_CPU_WEIGHT
                .saturating_mul(units)
                .clamp(1, 10_000)
                .to_string(),
        ),
    }
}

/// Gives `parent` (the `hearth` directory) the weight [`set_parent_weight`]
/// set; best effort: a failure is a warning. Written with each new sandbox, since
/// the directory may have been made (or re-made) by that sandbox; servers
/// sharing one `hearth` directory leave the last writer's value.
fn weigh_parent(parent: &Path, version: Version, warnings: &mut Vec<String>) {
    let units = parent_weight();
    if units == 0 {
        return;
    }
    let (file, value) = parent_cpu_weight(version, units);
    if read_file(parent, file).is_some_and(|v| v.trim() == value) {
        return;
    }
    if let Err(e) = write_file(parent, file, &value) {
        warnings.push(format!(
            "cpu weight of {} not applied: {e}",
            parent.display()
        ));
    }
}

/// The cgroup directories of one sandbox.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub version: Version,
    /// Directory holding the memory controller's files (v2: the one directory).
    pub memory: Option<PathBuf>,
    /// Directory holding the pids controller's files.
    pub pids: Option<PathBuf>,
    /// Directory holding the cpu controller's files.
    pub cpu: Option<PathBuf>,
}

/// One line of /proc/self/mountinfo that mounts a cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct CgroupMount {
    /// The directory of the hierarchy that is mounted (not "/" inside a cgroup namespace).
    root: String,
    mount_point: PathBuf,
    v2: bool,
    /// v1: controllers bound to this hierarchy (from the super options).
    controllers: Vec<String>,
}

/// Undoes the octal escapes (`\040` for space, ...) of /proc/self/mountinfo.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn parse_mountinfo(text: &str) -> Vec<CgroupMount> {
    let mut out = Vec::new();
    for line in text.lines() {
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let l: Vec<&str> = left.split(' ').collect();
        let r: Vec<&str> = right.split(' ').collect();
        if l.len() < 5 || r.len() < 3 {
            continue;
        }
        let v2 = match r[0] {
            "cgroup2" => true,
            "cgroup" => false,
            _ => continue,
        };
        let controllers = if v2 {
            Vec::new()
        } else {
            r[2].split(',')
                .filter(|o| !o.contains('='))
                .map(str::to_owned)
                .collect()
        };
        out.push(CgroupMount {
            root: unescape_mountinfo(l[3]),
            mount_point: PathBuf::from(unescape_mountinfo(l[4])),
            v2,
            controllers,
        });
    }
    out
}

/// Parses /proc/self/cgroup into (controllers, path) pairs; v2 has an empty controller list.
fn parse_proc_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|line| {
            let mut it = line.splitn(3, ':');
            let _id = it.next()?;
            let ctrls = it.next()?;
            let path = it.next()?;
            let ctrls = ctrls
                .split(',')
                .filter(|c| !c.is_empty())
                .map(str::to_owned)
                .collect();
            Some((ctrls, path.to_owned()))
        })
        .collect()
}

/// The directory on the host that corresponds to cgroup `path` of a hierarchy mounted at `m`.
fn host_dir(m: &CgroupMount, path: &str) -> PathBuf {
    let rel = if m.root == "/" {
        path
    } else {
        path.strip_prefix(m.root.as_str()).unwrap_or(path)
    };
    m.mount_point.join(rel.trim_start_matches('/'))
}

fn write_file(dir: &Path, file: &str, value: &str) -> io::Result<()> {
    fs::write(dir.join(file), value).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("writing {value:?} to {}: {e}", dir.join(file).display()),
        )
    })
}

fn read_file(dir: &Path, file: &str) -> Option<String> {
    fs::read_to_string(dir.join(file)).ok()
}

/// Looks up `key` in a "key value" per-line file (memory.events, memory.oom_control, ...).
fn keyed_value(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let (k, v) = l.split_once(' ')?;
        if k == key {
            v.trim().parse().ok()
        } else {
            None
        }
    })
}

/// Makes `dir` (a fresh leaf); a stale leaf left by a crashed run with the same name is
/// removed first.
fn make_leaf(dir: &Path) -> io::Result<()> {
    if let Some(parent) = dir.parent() {
        fs::create_dir_all(parent)?;
    }
    match fs::create_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            fs::remove_dir(dir)?;
            fs::create_dir(dir)
        }
        r => r,
    }
}

fn cpu_quota_us(millicores: u32) -> u64 {
    (u64::from(millicores) * CPU_PERIOD_US / 1000).max(CPU_QUOTA_MIN_US)
}

/// The CPU contract of a sandbox as cgroup files and values, in the order they are
/// written: the quota of `cpu_millicores` per period (none when 0), and the background
/// weight when `cpu_background`. The jailer is given the v2 ones for a jailed VMM.
pub fn cpu_settings(version: Version, limits: &Limits) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if limits.cpu_millicores > 0 {
        let quota = cpu_quota_us(limits.cpu_millicores);
        match version {
            Version::V1 => {
                out.push(("cpu.cfs_period_us", CPU_PERIOD_US.to_string()));
                out.push(("cpu.cfs_quota_us", quota.to_string()));
            }
            Version::V2 => out.push(("cpu.max", format!("{quota} {CPU_PERIOD_US}"))),
        }
    }
    if limits.cpu_background {
        match version {
            Version::V1 => out.push(("cpu.shares", BACKGROUND_CPU_SHARES.to_string())),
            Version::V2 => out.push(("cpu.weight", BACKGROUND_CPU_WEIGHT.to_string())),
        }
    }
    out
}

/// Writes [`cpu_settings`] into `dir`. The quota must hold: its failure is the error. The
/// background weight is best effort: its failure is a warning.
fn configure_cpu(dir: &Path, version: Version, limits: &Limits) -> io::Result<Vec<String>> {
    let mut warnings = Vec::new();
    for (file, value) in cpu_settings(version, limits) {
        match write_file(dir, file, &value) {
            Err(e) if matches!(file, "cpu.shares" | "cpu.weight") => {
                warnings.push(format!("background cpu weight not applied: {e}"))
            }
            r => r?,
        }
    }
    Ok(warnings)
}

/// Creates and configures the cgroups of sandbox `name`. Returns the group (if any hierarchy
/// could be used) and warnings describing limits that could not be applied.
pub fn create(name: &str, limits: Limits) -> (Option<Group>, Vec<String>) {
    assert!(!name.is_empty() && !name.contains('/') && name != "." && name != "..");
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let mounts = parse_mountinfo(&mountinfo);
    let own = parse_proc_cgroup(&own);
    let mut warnings = Vec::new();

    if let Some(m) = mounts.iter().find(|m| m.v2 && v2_usable(&m.mount_point)) {
        match create_v2(&m.mount_point, name, limits) {
            Ok((g, w)) => {
                warnings.extend(w);
                return (Some(g), warnings);
            }
            Err(e) => warnings.push(format!(
                "cgroup v2 at {} not usable: {e}",
                m.mount_point.display()
            )),
        }
    }
    let (g, w) = create_v1(&mounts, &own, name, limits, &["memory", "pids", "cpu"]);
    warnings.extend(w);
    (g, warnings)
}

/// A cgroup2 hierarchy whose root offers the memory and pids controllers.
fn v2_usable(mount_point: &Path) -> bool {
    v2_offers(mount_point, &["memory", "pids"])
}

/// Whether the root of the cgroup2 hierarchy at `mount_point` offers every one of `controllers`.
fn v2_offers(mount_point: &Path, controllers: &[&str]) -> bool {
    let Some(c) = read_file(mount_point, "cgroup.controllers") else {
        return false;
    };
    let c: Vec<&str> = c.split_whitespace().collect();
    controllers.iter().all(|x| c.contains(x))
}

fn create_v2(mount_point: &Path, name: &str, limits: Limits) -> io::Result<(Group, Vec<String>)> {
    let mut warnings = Vec::new();
    let available = read_file(mount_point, "cgroup.controllers").unwrap_or_default();
    let has_cpu = available.split_whitespace().any(|c| c == "cpu");
    let enable = if has_cpu {
        "+memory +pids +cpu"
    } else {
        "+memory +pids"
    };
    let base = mount_point.join("hearth");
    fs::create_dir_all(&base)?;
    write_file(mount_point, "cgroup.subtree_control", enable)?;
    write_file(&base, "cgroup.subtree_control", enable)?;
    let dir = base.join(name);
    make_leaf(&dir)?;
    let configure = || -> io::Result<()> {
        write_file(&dir, "memory.max", &limits.memory_bytes.to_string())?;
        if dir.join("memory.swap.max").exists() {
            write_file(&dir, "memory.swap.max", "0")?;
        }
        // Kill the whole sandbox on OOM rather than one task of it.
        if dir.join("memory.oom.group").exists() {
            write_file(&dir, "memory.oom.group", "1")?;
        }
        write_file(&dir, "pids.max", &limits.pids_max.to_string())?;
        Ok(())
    };
    if let Err(e) = configure() {
        let _ = fs::remove_dir(&dir);
        return Err(e);
    }
    let cpu = if !has_cpu {
        if limits.cpu_millicores > 0 {
            warnings.push("cgroup v2 has no cpu controller: cpu_millicores not enforced".into());
        }
        None
    } else {
        match configure_cpu(&dir, Version::V2, &limits) {
            Ok(w) => warnings.extend(w),
            Err(e) => warnings.push(format!("cpu limit not applied: {e}")),
        }
        weigh_parent(&base, Version::V2, &mut warnings);
        Some(dir.clone())
    };
    let g = Group {
        version: Version::V2,
        memory: Some(dir.clone()),
        pids: Some(dir),
        cpu,
    };
    Ok((g, warnings))
}

fn create_v1(
    mounts: &[CgroupMount],
    own: &[(Vec<String>, String)],
    name: &str,
    limits: Limits,
    controllers: &[&str],
) -> (Option<Group>, Vec<String>) {
    let mut warnings = Vec::new();
    let mut g = Group {
        version: Version::V1,
        memory: None,
        pids: None,
        cpu: None,
    };
    for &controller in controllers {
        let Some(m) = mounts
            .iter()
            .find(|m| !m.v2 && m.controllers.iter().any(|c| c == controller))
        else {
            warnings.push(format!(
                "no cgroup v1 hierarchy with the {controller} controller"
            ));
            continue;
        };
        let own_path = own
            .iter()
            .find(|(c, _)| c.iter().any(|c| c == controller))
            .map(|(_, p)| p.as_str())
            .unwrap_or("/");
        let dir = host_dir(m, own_path).join("hearth").join(name);
        // A hierarchy that carries several controllers (cpu,cpuacct) is one directory.
        let shared = [&g.memory, &g.pids, &g.cpu]
            .into_iter()
            .flatten()
            .any(|d| *d == dir);
        if !shared {
            if let Err(e) = make_leaf(&dir) {
                warnings.push(format!("cannot create cgroup {}: {e}", dir.display()));
                continue;
            }
        }
        let r = match controller {
            "memory" => configure_v1_memory(&dir, limits.memory_bytes),
            "pids" => write_file(&dir, "pids.max", &limits.pids_max.to_string()),
            _ => configure_cpu(&dir, Version::V1, &limits).map(|w| warnings.extend(w)),
        };
        if let Err(e) = r {
            warnings.push(format!("{controller} limit not applied: {e}"));
            if !shared {
                let _ = fs::remove_dir(&dir);
            }
            continue;
        }
        // v1 charges TCP socket buffers to a cgroup only once this limit is set
        // (v2 always does): without it an instance's sockets could take host
        // memory up to the host-wide `tcp_mem` ceiling, outside its limit. Best
        // effort: the memory limit above is what must hold.
        let tcp = "memory.kmem.tcp.limit_in_bytes";
        if controller == "memory" && dir.join(tcp).exists() {
            if let Err(e) = write_file(&dir, tcp, &limits.memory_bytes.to_string()) {
                warnings.push(format!("socket buffer limit not applied: {e}"));
            }
        }
        match controller {
            "memory" => g.memory = Some(dir),
            "pids" => g.pids = Some(dir),
            _ => {
                if let Some(parent) = dir.parent() {
                    weigh_parent(parent, Version::V1, &mut warnings);
                }
                g.cpu = Some(dir)
            }
        }
    }
    if g.memory.is_none() && g.pids.is_none() && g.cpu.is_none() {
        return (None, warnings);
    }
    (Some(g), warnings)
}

fn configure_v1_memory(dir: &Path, bytes: u64) -> io::Result<()> {
    write_file(dir, "memory.limit_in_bytes", &bytes.to_string())?;
    // Without a memsw limit a sandbox could keep allocating by pushing pages to swap.
    if dir.join("memory.memsw.limit_in_bytes").exists() {
        write_file(dir, "memory.memsw.limit_in_bytes", &bytes.to_string())?;
    }
    // Best effort: some kernels refuse per-cgroup swappiness below a hierarchy.
    let _ = write_file(dir, "memory.swappiness", "0");
    Ok(())
}

impl Group {
    /// Every distinct directory of the group.
    pub fn dirs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = Vec::new();
        for d in [&self.memory, &self.pids, &self.cpu].into_iter().flatten() {
            if !v.contains(d) {
                v.push(d.clone());
            }
        }
        v
    }

    /// Whether the pids controller contains this sandbox.
    pub fn has_pids(&self) -> bool {
        self.pids.is_some()
    }

    /// Gives the group the default CPU weight again (it started with the
    /// background one, see [`Limits::cpu_background`]).
    pub fn to_foreground(&self) -> io::Result<()> {
        let Some(dir) = &self.cpu else {
            return Ok(());
        };
        match self.version {
            Version::V1 => write_file(dir, "cpu.shares", &DEFAULT_CPU_SHARES.to_string()),
            Version::V2 => write_file(dir, "cpu.weight", &DEFAULT_CPU_WEIGHT.to_string()),
        }
    }

    /// Moves process `pid` (all its threads) into every directory of the group.
    pub fn join(&self, pid: i32) -> io::Result<()> {
        for d in self.dirs() {
            write_file(&d, "cgroup.procs", &pid.to_string())?;
        }
        Ok(())
    }

    /// Opens `cgroup.procs` of every directory of the group for writing, for a child to
    /// join before it runs anything ([`join_self`] between fork and exec).
    pub fn open_procs(&self) -> io::Result<Vec<fs::File>> {
        self.dirs()
            .iter()
            .map(|d| {
                fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("cgroup.procs"))
                    .map_err(|e| {
                        io::Error::new(e.kind(), format!("{}/cgroup.procs: {e}", d.display()))
                    })
            })
            .collect()
    }

    /// Memory charged to the sandbox now (pages, page cache, tmpfs, kernel memory).
    pub fn memory_bytes(&self) -> Option<u64> {
        let dir = self.memory.as_ref()?;
        let file = match self.version {
            Version::V1 => "memory.usage_in_bytes",
            Version::V2 => "memory.current",
        };
        read_file(dir, file)?.trim().parse().ok()
    }

    /// Whether the kernel's OOM killer acted inside this group.
    pub fn oom_killed(&self) -> bool {
        let Some(dir) = self.memory.as_ref() else {
            return false;
        };
        match self.version {
            Version::V2 => read_file(dir, "memory.events")
                .and_then(|t| keyed_value(&t, "oom_kill"))
                .is_some_and(|n| n > 0),
            Version::V1 => {
                // `oom_kill` exists since Linux 4.13; before that, hitting the limit at all is
                // the best signal there is.
                match read_file(dir, "memory.oom_control").and_then(|t| keyed_value(&t, "oom_kill"))
                {
                    Some(n) => n > 0,
                    None => read_file(dir, "memory.failcnt")
                        .and_then(|t| t.trim().parse::<u64>().ok())
                        .is_some_and(|n| n > 0),
                }
            }
        }
    }

    /// Removes the group's directories, retrying for up to [`REMOVE_WAIT_MS`] while exiting
    /// tasks drain. Directories already gone count as removed.
    pub fn remove(&self) -> io::Result<()> {
        let deadline = Instant::now() + Duration::from_millis(REMOVE_WAIT_MS);
        let mut last_err = None;
        for d in self.dirs() {
            loop {
                match fs::remove_dir(&d) {
                    Ok(()) => break,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => break,
                    Err(e)
                        if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline =>
                    {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    Err(e) => {
                        last_err = Some(io::Error::new(
                            e.kind(),
                            format!("removing {}: {e}", d.display()),
                        ));
                        break;
                    }
                }
            }
        }
        match last_err {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Moves the calling process into the groups whose `cgroup.procs` files are open as `procs`
/// ([`Group::open_procs`]). Async-signal-safe (one `write` each): for a child between fork
/// and exec, so it is inside its limits before it runs a single instruction of its own.
pub fn join_self(procs: &[std::os::fd::RawFd]) -> io::Result<()> {
    for &fd in procs {
        // "0" is the writing process.
        // SAFETY: a write of a static one-byte buffer to a descriptor the caller keeps open.
        if unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) } != 1 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The name of the `n`th sandbox group of server `pid` for function `id`
/// (`<function id>-<server pid>-<n>`): what [`sweep_stale`] recognises.
pub fn server_group_name(id: &str, pid: u32, n: u32) -> String {
    format!("{id}-{pid}-{n}")
}

/// The server pid in `name` if it is exactly a [`server_group_name`]: a function
/// id of 16 lower-case hex digits, a pid, a number. Groups of any other shape
/// (sandboxes made directly with [`spawn`](super::spawn), by tests or another
/// tool) are not a server's and never swept.
fn server_pid(name: &str) -> Option<u32> {
    let mut parts = name.split('-');
    let (Some(id), Some(pid), Some(n), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let hex = |b: u8| b.is_ascii_digit() || (b'a'..=b'f').contains(&b);
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    if id.len() != 16 || !id.bytes().all(hex) || !digits(pid) || !digits(n) {
        return None;
    }
    pid.parse().ok()
}

/// Removes sandbox cgroups left behind by a hearth process that no longer runs
/// (killed before it could clean up). Only groups under `hearth/` named by
/// [`server_group_name`] with a dead pid are touched. Their processes are
/// orphans of the dead server (a sandbox still dying, or one busy enough not to
/// notice its channel closed): they are killed, and each such group is removed
/// once empty, waiting at most `wait` in all. A group holding a
/// process under a live `hearth serve` (a server in another pid namespace) is
/// left alone. Returns how many went.
pub fn sweep_stale(wait: Duration) -> usize {
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let own = parse_proc_cgroup(&fs::read_to_string("/proc/self/cgroup").unwrap_or_default());
    let mut parents = Vec::new();
    for m in parse_mountinfo(&mountinfo) {
        if m.v2 {
            parents.push(m.mount_point.join("hearth"));
        } else {
            for (controllers, path) in &own {
                if controllers.iter().any(|c| m.controllers.contains(c)) {
                    parents.push(host_dir(&m, path).join("hearth"));
                }
            }
        }
    }
    parents.sort();
    parents.dedup();
    // Groups whose processes were killed: removed once they drain.
    let mut draining = Vec::new();
    let mut removed = 0;
    for parent in parents {
        let Ok(entries) = fs::read_dir(&parent) else {
            continue;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(pid) = server_pid(&name) else {
                continue;
            };
            if Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
            match kill_orphans(&e.path(), &name) {
                Members::None if fs::remove_dir(e.path()).is_ok() => removed += 1,
                Members::None | Members::Supervised => {}
                Members::Killed => draining.push(e.path()),
            }
        }
    }
    let deadline = Instant::now() + wait;
    for dir in draining {
        loop {
            match fs::remove_dir(&dir) {
                Ok(()) => removed += 1,
                Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                }
                Err(_) => {}
            }
            break;
        }
    }
    removed
}

/// What [`kill_orphans`] found in a stale group.
enum Members {
    /// No process (visible in our pid namespace).
    None,
    /// Orphaned processes, now killed.
    Killed,
    /// A process under a live `hearth serve` (one in another pid namespace
    /// whose pid in the group's name means nothing here): left alone.
    Supervised,
}

/// SIGKILLs the processes of the stale cgroup directory `dir` (named `name`),
/// unless one of them descends from a live `hearth serve`. Each pid is pinned
/// with a pidfd and checked to be still in the group before the signal, so a
/// pid reused meanwhile is never hit.
fn kill_orphans(dir: &Path, name: &str) -> Members {
    let pids: Vec<i32> = read_file(dir, "cgroup.procs")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .filter(|&p| p > 0)
        .collect();
    if pids.is_empty() {
        return Members::None;
    }
    if pids.iter().any(|&p| under_live_server(p)) {
        return Members::Supervised;
    }
    let suffix = format!("/hearth/{name}");
    for pid in pids {
        let Some(fd) = crate::util::sys::pidfd_open(pid) else {
            continue;
        };
        let member = fs::read_to_string(format!("/proc/{pid}/cgroup"))
            .is_ok_and(|c| c.lines().any(|l| l.ends_with(&suffix)));
        if member {
            crate::util::sys::pidfd_kill(&fd);
        }
    }
    Members::Killed
}

/// True if an ancestor of `pid` is a `hearth serve` process.
fn under_live_server(pid: i32) -> bool {
    let mut p = pid;
    for _ in 0..64 {
        let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
            return false;
        };
        // The parent pid is the second field after the parenthesised command.
        let Some(ppid) = stat
            .rsplit_once(") ")
            .and_then(|(_, rest)| rest.split(' ').nth(1)?.parse::<i32>().ok())
        else {
            return false;
        };
        if ppid <= 1 {
            return false;
        }
        let cmd = fs::read(format!("/proc/{ppid}/cmdline")).unwrap_or_default();
        let mut args = cmd.split(|&b| b == 0);
        let exe = args.next().unwrap_or_default();
        if args.next() == Some(b"serve".as_slice())
            && Path::new(std::ffi::OsStr::from_bytes(exe))
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("hearth"))
        {
            return true;
        }
        p = ppid;
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTINFO: &str = "\
27 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpu\\054cpuacct rw,relatime - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
39 31 0:36 /ns /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";

    #[test]
    fn mountinfo_yields_cgroup_hierarchies_with_controllers() {
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(m.len(), 6);
        assert_eq!(
            m[1].mount_point,
            PathBuf::from("/sys/fs/cgroup/cpu,cpuacct")
        );
        assert_eq!(m[1].controllers, vec!["rw", "cpu", "cpuacct"]);
        assert_eq!(m[4].controllers, vec!["rw", "xattr"]);
        assert!(m[5].v2);
        assert_eq!(m[3].root, "/ns");
    }

    #[test]
    fn own_cgroup_paths_map_to_host_directories() {
        let own = parse_proc_cgroup("8:pids:/ns/a\n4:memory:/process_api/x\n0::/\n");
        assert_eq!(
            own[1],
            (vec!["memory".to_string()], "/process_api/x".to_string())
        );
        assert_eq!(own[2].0, Vec::<String>::new());
        let m = parse_mountinfo(MOUNTINFO);
        assert_eq!(
            host_dir(&m[2], "/process_api/x"),
            PathBuf::from("/sys/fs/cgroup/memory/process_api/x")
        );
        // A hierarchy mounted from /ns: the cgroup /ns/a is the directory `a` of the mount.
        assert_eq!(
            host_dir(&m[3], "/ns/a"),
            PathBuf::from("/sys/fs/cgroup/pids/a")
        );
        assert_eq!(host_dir(&m[2], "/"), PathBuf::from("/sys/fs/cgroup/memory"));
    }

    #[test]
    fn keyed_values_are_found_by_exact_key() {
        let t = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n";
        assert_eq!(keyed_value(t, "oom_kill"), Some(3));
        assert_eq!(keyed_value(t, "under_oom"), Some(0));
        assert_eq!(keyed_value(t, "oom"), None);
    }

    #[test]
    fn cpu_quota_scales_millicores_and_respects_the_kernel_minimum() {
        assert_eq!(cpu_quota_us(1000), 100_000);
        assert_eq!(cpu_quota_us(250), 25_000);
        assert_eq!(cpu_quota_us(2500), 250_000);
        assert_eq!(cpu_quota_us(1), 1_000);
    }

    #[test]
    fn the_cpu_contract_is_the_same_quota_and_weight_on_v1_and_v2() {
        let standby = Limits {
            memory_bytes: 1 << 30,
            pids_max: 256,
            cpu_millicores: 250,
            cpu_background: true,
        };
        let s = |k: &'static str, v: &str| (k, v.to_string());
        assert_eq!(
            cpu_settings(Version::V1, &standby),
            [
                s("cpu.cfs_period_us", "100000"),
                s("cpu.cfs_quota_us", "25000"),
                s("cpu.shares", "64")
            ]
        );
        assert_eq!(
            cpu_settings(Version::V2, &standby),
            [s("cpu.max", "25000 100000"), s("cpu.weight", "6")]
        );
        let unlimited = Limits {
            cpu_millicores: 0,
            cpu_background: false,
            ..standby
        };
        assert!(cpu_settings(Version::V2, &unlimited).is_empty());
    }

    #[test]
    fn the_parent_weight_is_counted_in_default_weights_within_the_kernel_range() {
        let w = |v, units| parent_cpu_weight(v, units).1;
        assert_eq!(parent_cpu_weight(Version::V1, 2).0, "cpu.shares");
        assert_eq!(w(Version::V1, 2), "2048");
        assert_eq!(w(Version::V1, 0), "1024");
        assert_eq!(w(Version::V1, 1000), "262144");
        assert_eq!(parent_cpu_weight(Version::V2, 2).0, "cpu.weight");
        assert_eq!(w(Version::V2, 8), "800");
        assert_eq!(w(Version::V2, 4096), "10000");
        assert_eq!(w(Version::V2, u64::MAX), "10000");
    }

    #[test]
    fn only_server_group_names_yield_a_server_pid() {
        let id = "0123456789abcdef";
        assert_eq!(server_pid(&server_group_name(id, 4242, 7)), Some(4242));
        // Sandboxes named by anyone else, e.g. the tests' `t<pid>-<n>`: the second
        // field is not a server's pid, and killing "orphans" there kills live sandboxes.
        for name in [
            "t4242-9",
            "t4242-9-1",
            "0123456789ABCDEF-4242-7",
            "0123456789abcde-4242-7",
            "0123456789abcdef-4242",
            "0123456789abcdef-4242-7-1",
            "0123456789abcdef-+4242-7",
            "0123456789abcdef--7",
            "0123456789abcdef-4242-x",
        ] {
            assert_eq!(server_pid(name), None, "{name}");
        }
    }
}
