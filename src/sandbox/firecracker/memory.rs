//! Where a restored microVM's memory comes from (`--fc-memory`): the File
//! backend (Firecracker maps the snapshot's memory file itself) or the Uffd
//! backend (hearth serves it, [`super::uffd`]), and the function's working
//! set: which restore records it (always one through Uffd, whatever the
//! backend), storing it next to the snapshot, and on later restores either
//! installing it before the VM resumes (Uffd) or reading it into the page
//! cache while the VMM loads (File).

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::api::{self, Api, MemBackend};
use super::snapshot::SnapshotMeta;
use super::uffd::{self, Memory, Registration};
use super::vmm::{Vmm, VmmError};
use super::workset::{self, WorkSet, WS_FILE};
use super::Inner;
use crate::config::FcMemory;

/// What is known of a function's working set.
pub(super) enum WsSlot {
    /// None on disk: the next Uffd restore records one.
    Absent,
    /// An instance is recording it.
    Recording,
    /// Installed by every Uffd restore of the snapshot it was recorded on.
    Ready(Arc<WorkSet>),
    /// `--fc-memory file`: the restore that was to record it through Uffd
    /// failed (e.g. a host where the VMM may not create a userfaultfd); this
    /// function's File restores go on without a set until hearth restarts.
    Unrecordable,
}

/// Working sets by function id.
pub(super) type WorkSets = Arc<Mutex<HashMap<String, WsSlot>>>;

/// A restore's Uffd state, kept with the instance: the fault thread's
/// registration and, for the recording instance, where the set goes.
pub(super) struct UffdMemory {
    reg: Registration,
    recorder: Option<Recorder>,
}

impl UffdMemory {
    /// Page faults served so far.
    pub(super) fn faults(&self) -> u64 {
        self.reg.faults()
    }

    /// The instance answered its first request: the working set is complete.
    pub(super) fn answered(&mut self) {
        if let Some(rec) = self.recorder.take() {
            if let Some(pages) = self.reg.stop_recording() {
                rec.finish(pages);
            }
        }
    }
}

/// Stores the set the fault thread recorded for one function; dropped
/// unfinished (the instance died first), it lets the next restore record.
struct Recorder {
    sets: WorkSets,
    id: String,
    dir: PathBuf,
    snapshot_created_ms: u64,
    mem_bytes: u64,
    finished: bool,
}

impl Recorder {
    /// Writes the set off the calling thread (a request core).
    fn finish(mut self, mut pages: Vec<u32>) {
        self.finished = true;
        let (sets, id, dir) = (self.sets.clone(), self.id.clone(), self.dir.clone());
        let (created, mem_bytes) = (self.snapshot_created_ms, self.mem_bytes);
        let spawned = std::thread::Builder::new()
            .name("hearth-workset".into())
            .spawn(move || {
                let ws = WorkSet {
                    snapshot_created_ms: created,
                    mem_bytes,
                    runs: workset::runs_from_pages(&mut pages),
                };
                let slot = match workset::store(&dir, &ws) {
                    Ok(()) => {
                        eprintln!(
                            "hearth: firecracker: function {id}: working set recorded: {} pages in {} runs ({WS_FILE})",
                            ws.pages(),
                            ws.runs.len()
                        );
                        WsSlot::Ready(Arc::new(ws))
                    }
                    Err(e) => {
                        eprintln!("hearth: firecracker: function {id}: working set not stored: {e}");
                        WsSlot::Absent
                    }
                };
                let mut sets = sets.lock().unwrap();
                if let Some(s @ WsSlot::Recording) = sets.get_mut(&id) {
                    *s = slot;
                }
            });
        if spawned.is_err() {
            self.finished = false;
        }
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if !self.finished {
            let mut sets = self.sets.lock().unwrap();
            if let Some(s @ WsSlot::Recording) = sets.get_mut(&self.id) {
                *s = WsSlot::Absent;
            }
        }
    }
}

/// Gaps up to this many pages between two runs are read too when a working
/// set is read ahead for the File backend: fewer, larger requests.
const READ_AHEAD_GAP_PAGES: u64 = 32;

/// Reads the working set's pages of the memory file at `path` into the page
/// cache on a thread of its own (joined before the guest resumes), where the
/// File backend's guest finds them. A cold file is then read in a few large
/// requests sorted by offset, while the VMM loads, instead of one small read
/// per fault while the guest runs; a file already cached costs one call per
/// run. Advice only: an error costs speed, nothing else (`None`: no thread).
/// `trace`: the function's id, to log what was read and how long it took.
fn read_ahead(
    path: &Path,
    ws: Arc<WorkSet>,
    trace: Option<String>,
) -> Option<std::thread::JoinHandle<()>> {
    let path = path.to_path_buf();
    std::thread::Builder::new()
        .name("hearth-readahead".into())
        .spawn(move || {
            let t = Instant::now();
            let Ok(file) = std::fs::File::open(&path) else {
                return;
            };
            let runs = workset::coalesce(&ws.runs, READ_AHEAD_GAP_PAGES);
            for r in &runs {
                let off = r.first as u64 * workset::PAGE_BYTES;
                let len = r.pages as u64 * workset::PAGE_BYTES;
                // SAFETY: plain syscall on an open descriptor.
                unsafe {
                    libc::posix_fadvise(
                        file.as_raw_fd(),
                        off as libc::off_t,
                        len as libc::off_t,
                        libc::POSIX_FADV_WILLNEED,
                    );
                }
            }
            if let Some(id) = trace {
                eprintln!(
                    "hearth: firecracker: {id}: working set of {} pages read ahead in {} runs ({} us)",
                    ws.pages(),
                    runs.len(),
                    t.elapsed().as_micros()
                );
            }
        })
        .ok()
}

/// What a Uffd restore does with the working set.
enum Plan {
    Install(Arc<WorkSet>),
    Record(Recorder),
    Lazy,
}

impl Inner {
    /// Loads the snapshot into the fresh VMM behind `api` and resumes it;
    /// with Uffd the memory handling that the instance keeps. `uds` is the
    /// vsock socket as Firecracker names it ([`Vmm::vsock_paths`]).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn load_snapshot(
        &self,
        api: &mut Api,
        vmm: &mut Vmm,
        id: &str,
        dir: &Path,
        meta: &SnapshotMeta,
        uds: &Path,
        deadline: Instant,
    ) -> Result<Option<UffdMemory>, VmmError> {
        let mem_path = dir.join(&meta.mem);
        // Jailed, Firecracker is given names inside its root.
        let state = vmm.resource(&dir.join(&meta.state));
        let plan = self.plan(id, dir, meta);
        // The File backends load from the file; the one restore that records
        // the working set for them goes through Uffd like the Uffd backends.
        let file = matches!(self.memory, FcMemory::File | FcMemory::FileLazy);
        if file && !matches!(plan, Plan::Record(_)) {
            let mem = vmm.resource(&mem_path);
            let Plan::Install(ws) = plan else {
                let load = api::snapshot_load(&state, MemBackend::File(&mem), uds, true);
                api.put("/snapshot/load", &load, deadline)
                    .map_err(VmmError::Api)?;
                return Ok(None);
            };
            // The set is read while the VMM loads; the guest resumes once it is in.
            let reading = read_ahead(&mem_path, ws, self.trace.then(|| id.to_string()));
            let load = api::snapshot_load(&state, MemBackend::File(&mem), uds, false);
            let loaded = api.put("/snapshot/load", &load, deadline);
            if let Some(r) = reading {
                let _ = r.join();
            }
            loaded
                .and_then(|_| api.patch("/vm", &api::vm_state("Resumed"), deadline))
                .map_err(VmmError::Api)?;
            return Ok(None);
        }
        let recording = matches!(plan, Plan::Record(_));
        let loaded = self.load_uffd(api, vmm, id, &state, &mem_path, uds, plan, deadline);
        if file && recording {
            if let Err(e) = &loaded {
                eprintln!(
                    "hearth: firecracker: function {id}: its working set could not be recorded \
                     through Uffd ({e}); its File restores go on without one"
                );
                self.worksets
                    .lock()
                    .unwrap()
                    .insert(id.to_string(), WsSlot::Unrecordable);
            }
        }
        loaded
    }

    /// The Uffd part of [`Inner::load_snapshot`]: hearth receives the
    /// guest's memory, installs or records the working set as `plan` says,
    /// and resumes the VM.
    #[allow(clippy::too_many_arguments)]
    fn load_uffd(
        &self,
        api: &mut Api,
        vmm: &mut Vmm,
        id: &str,
        state: &Path,
        mem_path: &Path,
        uds: &Path,
        plan: Plan,
        deadline: Instant,
    ) -> Result<Option<UffdMemory>, VmmError> {
        let io = |what: &str, err: std::io::Error| VmmError::Io {
            what: what.to_string(),
            err,
        };
        let (sock_vm, sock) = vmm.uffd_paths();
        let listener = vmm
            .bind_uffd_socket()
            .map_err(|e| io("bind uffd socket", e))?;
        let load = api::snapshot_load(state, MemBackend::Uffd(&sock_vm), uds, false);
        api.send("PUT", "/snapshot/load", Some(&load), deadline)
            .map_err(VmmError::Api)?;
        let memory = Arc::new(Memory::open(mem_path).map_err(|e| io("map memory file", e))?);
        let got = uffd::receive(&listener, vmm.pid(), memory.len(), deadline, || {
            vmm.check_alive()
                .map_err(|e| std::io::Error::other(e.to_string()))
        })
        .map_err(|e| io("userfaultfd from firecracker", e))?;
        drop(listener);
        let _ = std::fs::remove_file(&sock);
        let t = Instant::now();
        let installed = match &plan {
            Plan::Install(ws) => uffd::install(&got.uffd, &memory, &got.regions, &ws.runs)
                .map_err(|e| io("install working set", e))?,
            _ => 0,
        };
        let recorder = match plan {
            Plan::Record(r) => Some(r),
            _ => None,
        };
        let reg = uffd::register(got, memory, recorder.is_some())
            .map_err(|e| io("serve guest memory", e))?;
        if self.trace && installed > 0 {
            eprintln!(
                "hearth: firecracker: {id}: working set of {installed} pages installed in {} us",
                t.elapsed().as_micros()
            );
        }
        api.answer("PUT /snapshot/load", deadline)
            .map_err(VmmError::Api)?;
        api.patch("/vm", &api::vm_state("Resumed"), deadline)
            .map_err(VmmError::Api)?;
        Ok(Some(UffdMemory { reg, recorder }))
    }

    /// Install the function's working set, record it, or neither.
    fn plan(&self, id: &str, dir: &Path, meta: &SnapshotMeta) -> Plan {
        if matches!(self.memory, FcMemory::UffdLazy | FcMemory::FileLazy) {
            return Plan::Lazy;
        }
        let mut sets = self.worksets.lock().unwrap();
        let slot = sets.entry(id.to_string()).or_insert_with(|| {
            match workset::load(dir, meta.created_ms, meta.mem_bytes) {
                Some(ws) => WsSlot::Ready(Arc::new(ws)),
                None => WsSlot::Absent,
            }
        });
        match slot {
            WsSlot::Ready(ws)
                if ws.snapshot_created_ms == meta.created_ms && ws.mem_bytes == meta.mem_bytes =>
            {
                Plan::Install(ws.clone())
            }
            WsSlot::Recording | WsSlot::Unrecordable => Plan::Lazy,
            _ => {
                *slot = WsSlot::Recording;
                Plan::Record(Recorder {
                    sets: self.worksets.clone(),
                    id: id.to_string(),
                    dir: dir.to_path_buf(),
                    snapshot_created_ms: meta.created_ms,
                    mem_bytes: meta.mem_bytes,
                    finished: false,
                })
            }
        }
    }

    /// A new snapshot of `id` is being made in `dir`: its old working set goes.
    pub(super) fn drop_working_set(&self, id: &str, dir: &Path) {
        self.worksets.lock().unwrap().remove(id);
        let _ = std::fs::remove_file(dir.join(WS_FILE));
    }
}
