//! The host side of Firecracker's Uffd memory backend: hearth serves the
//! restored guest's memory itself, from a read-only `mmap` of the
//! snapshot's memory file.
//!
//! On `PUT /snapshot/load` with `mem_backend {backend_type: "Uffd"}`,
//! Firecracker connects to a Unix socket hearth listens on and sends, in one
//! message, the userfaultfd covering guest memory (SCM_RIGHTS) and a JSON
//! list of the memory regions ([`receive`]). Before the VM resumes hearth can
//! install a working set in one batch ([`install`]); every other page is
//! copied in when the guest first touches it, by one fault thread shared by
//! all instances ([`register`]): an epoll over every instance's userfaultfd
//! and its Firecracker connection (which closes when the VMM dies, and then
//! the instance's state is freed). Pages of the file that are all zero are
//! mapped with UFFDIO_ZEROPAGE instead of copied. The fault thread records
//! the pages it serves for an instance that is recording its working set.
//!
//! Why one shared thread: a fault costs one 4 KiB copy and one ioctl; end to
//! end, wake-ups included, the unit test measured ~60 µs per fault (debug
//! build, loaded 2-core host), and a nested restore served ~2,500 faults by
//! READY: well under a second of this thread's time per restore, so one
//! thread is far from saturated at the restore rates a host sustains, while
//! a thread per instance would add a thread start to every restore and a
//! sleeping thread per instance. It is never a request core; its state is
//! bounded by the number of instances.

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use memmap2::Mmap;
use serde::Deserialize;

use super::workset::{self, Span, PAGES_MAX, PAGE_BYTES};

/// The socket Firecracker sends the userfaultfd on, in the VMM's directory.
pub const UFFD_SOCK: &str = "uffd.sock";
/// Largest region description accepted (Firecracker sends one line of JSON).
const REGIONS_BYTES_MAX: usize = 64 * 1024;
/// Most memory regions accepted.
const REGIONS_MAX: usize = 64;
/// Fault messages read per `read` call.
const MSGS_PER_READ: usize = 64;
/// Events taken per `epoll_wait`.
const EVENTS_MAX: usize = 64;
/// Most removed ranges remembered per guest (the balloon is off; this only
/// bounds a guest that keeps returning memory).
const REMOVED_MAX: usize = 4096;
/// Pages copied around a lazy fault (an aligned 64 KiB block): neighbours
/// are likely next, and one fault costs far more than copying them.
const FAULT_AROUND_PAGES: u64 = 16;
/// Times one fault is retried while the guest's mappings change (EAGAIN).
const RETRIES_MAX: u32 = 1000;

const fn ioc(dir: u64, nr: u64, size: u64) -> u64 {
    (dir << 30) | (size << 16) | (0xAA << 8) | nr
}
const IOC_READ_WRITE: u64 = 3;
/// `UFFDIO_COPY` (struct uffdio_copy, 40 bytes).
pub const UFFDIO_COPY: u64 = ioc(IOC_READ_WRITE, 0x03, 40);
/// `UFFDIO_ZEROPAGE` (struct uffdio_zeropage, 32 bytes).
pub const UFFDIO_ZEROPAGE: u64 = ioc(IOC_READ_WRITE, 0x04, 32);
const EVENT_PAGEFAULT: u8 = 0x12;
const EVENT_REMOVE: u8 = 0x15;
const EVENT_UNMAP: u8 = 0x16;

/// `struct uffd_msg`: the event and three words of its payload (for a page
/// fault: flags, address, thread id; for remove/unmap: start, end).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct UffdMsg {
    event: u8,
    _reserved1: u8,
    _reserved2: u16,
    _reserved3: u32,
    arg: [u64; 3],
}

#[repr(C)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
struct UffdioZeropage {
    start: u64,
    len: u64,
    mode: u64,
    zeropage: i64,
}

/// One region as Firecracker describes it (`page_size` in bytes; older
/// releases only sent `page_size_kib`, which also held bytes).
#[derive(Deserialize)]
struct RegionJson {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    #[serde(default)]
    page_size: Option<u64>,
    #[serde(default)]
    page_size_kib: Option<u64>,
}

/// The regions in Firecracker's message, checked against the memory file's length.
pub fn parse_regions(json: &[u8], file_bytes: u64) -> Result<Vec<Span>, String> {
    let list: Vec<RegionJson> =
        serde_json::from_slice(json).map_err(|e| format!("region list: {e}"))?;
    if list.is_empty() || list.len() > REGIONS_MAX {
        return Err(format!("{} memory regions", list.len()));
    }
    list.iter()
        .map(|r| {
            let page = r.page_size.or(r.page_size_kib).unwrap_or(PAGE_BYTES);
            if page != PAGE_BYTES {
                return Err(format!("pages of {page} bytes (only 4 KiB pages are served)"));
            }
            let end = r.offset.checked_add(r.size).filter(|&e| e <= file_bytes);
            if end.is_none() || r.size % PAGE_BYTES != 0 || r.base_host_virt_addr % PAGE_BYTES != 0
            {
                return Err(format!(
                    "region of {} bytes at file offset {} does not fit the {file_bytes}-byte memory file",
                    r.size, r.offset
                ));
            }
            Ok(Span {
                base: r.base_host_virt_addr,
                size: r.size,
                offset: r.offset,
            })
        })
        .collect()
}

/// What the VMM handed over: its userfaultfd, the regions, and the
/// connection it came on (closed by the kernel when the VMM exits).
pub struct Received {
    pub uffd: OwnedFd,
    pub regions: Vec<Span>,
    pub conn: UnixStream,
}

/// Waits until `deadline` for the VMM (process `pid`) to connect to
/// `listener` and send its userfaultfd and regions; `alive` reports a VMM
/// that died meanwhile.
pub fn receive(
    listener: &UnixListener,
    pid: i32,
    file_bytes: u64,
    deadline: Instant,
    mut alive: impl FnMut() -> io::Result<()>,
) -> io::Result<Received> {
    listener.set_nonblocking(true)?;
    let conn = loop {
        match listener.accept() {
            Ok((s, _)) => break s,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                alive()?;
                if Instant::now() >= deadline {
                    return Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "firecracker did not connect to the uffd socket",
                    ));
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            Err(e) => return Err(e),
        }
    };
    conn.set_nonblocking(false)?;
    let peer = peer_pid(&conn)?;
    if peer != pid {
        return Err(io::Error::other(format!(
            "uffd socket peer is pid {peer}, not the VMM {pid}"
        )));
    }
    conn.set_read_timeout(Some(
        deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1)),
    ))?;
    let mut buf = vec![0u8; REGIONS_BYTES_MAX];
    let (mut n, uffd) = recv_with_fd(&conn, &mut buf)?;
    let uffd = uffd.ok_or_else(|| io::Error::other("no userfaultfd in the VMM's message"))?;
    // The list is one write; read on only if it came in pieces.
    let regions = loop {
        match parse_regions(&buf[..n], file_bytes) {
            Ok(r) => break r,
            Err(_) if n < buf.len() && !buf[..n].ends_with(b"]") => {
                let got = (&conn).read(&mut buf[n..])?;
                if got == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
                n += got;
            }
            Err(e) => return Err(io::Error::other(e)),
        }
    };
    conn.set_read_timeout(None)?;
    Ok(Received {
        uffd,
        regions,
        conn,
    })
}

fn peer_pid(conn: &UnixStream) -> io::Result<i32> {
    let mut cred = libc::ucred {
        pid: 0,
        uid: 0,
        gid: 0,
    };
    let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `cred`, which is that large.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PEERCRED,
            (&mut cred as *mut libc::ucred).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(cred.pid)
}

/// One `recvmsg` into `buf`, keeping at most one passed descriptor.
fn recv_with_fd(conn: &UnixStream, buf: &mut [u8]) -> io::Result<(usize, Option<OwnedFd>)> {
    // Room for one control message holding one int, aligned as cmsghdr wants.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty header; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    let n = loop {
        // SAFETY: msg points at live buffers of the lengths it states.
        let n = unsafe { libc::recvmsg(conn.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
        if n >= 0 {
            break n as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    let mut fd = None;
    // SAFETY: the CMSG_* walk stays inside `control` as msg_controllen now bounds it.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                // One message may carry several descriptors: all are ours now,
                // the first is kept and any other closed (a protocol error).
                let data = (*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                let first: *const RawFd = libc::CMSG_DATA(c).cast();
                for i in 0..data / std::mem::size_of::<RawFd>() {
                    let owned = OwnedFd::from_raw_fd(std::ptr::read_unaligned(first.add(i)));
                    if fd.is_none() {
                        fd = Some(owned);
                    }
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n, fd))
}

/// The snapshot memory file, mapped read-only and shared by the clones
/// restored from it.
pub struct Memory {
    map: Mmap,
}

impl Memory {
    /// Maps `path` read-only: a plain file, not reached through a link.
    pub fn open(path: &Path) -> io::Result<Memory> {
        let (file, _) = crate::sandbox::vmfiles::open_plain(path)?;
        // SAFETY: the memory file is never written in place: a new snapshot
        // replaces it by rename, and this mapping keeps the old inode.
        let map = unsafe { Mmap::map(&file)? };
        Ok(Memory { map })
    }

    /// Its length in bytes.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Starts reading `len` bytes at `offset` into the page cache (advice
    /// only: failure changes nothing but speed).
    fn will_need(&self, offset: u64, len: u64) {
        let start = offset & !(PAGE_BYTES - 1);
        let end = (offset + len).min(self.len());
        if start < end {
            // SAFETY: the range lies inside this mapping, page-aligned at its start.
            unsafe {
                libc::madvise(
                    self.map.as_ptr().add(start as usize) as *mut _,
                    (end - start) as usize,
                    libc::MADV_WILLNEED,
                );
            }
        }
    }

    fn page(&self, offset: u64) -> &[u8] {
        &self.map[offset as usize..(offset + PAGE_BYTES) as usize]
    }
}

/// Whether a page is all zero (then it is mapped, not copied).
fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: every bit pattern is a valid u64; align_to splits off any unaligned ends.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// What one copy or zero-page ioctl did.
#[derive(Debug, PartialEq, Eq)]
enum Filled {
    /// The whole range is in place (pages already there skipped).
    Done,
    /// The one page asked for was already there (a repeated fault message).
    Present,
    /// `n` bytes went in, then the guest's mappings changed (EAGAIN): retry later.
    Again(u64),
    /// The range is no longer registered or the VMM is gone.
    Gone,
}

/// Copies `len` bytes from `src` into the guest at `dst`, skipping pages
/// that are already present (EEXIST).
fn copy(uffd: RawFd, mut dst: u64, mut src: *const u8, mut len: u64) -> io::Result<Filled> {
    let mut done = 0u64;
    while len > 0 {
        let mut c = UffdioCopy {
            dst,
            src: src as u64,
            len,
            mode: 0,
            copy: 0,
        };
        // SAFETY: `c` is a valid uffdio_copy; src..src+len lies in the file
        // mapping, which outlives the call; dst lies in a registered range.
        let rc = unsafe { libc::ioctl(uffd, UFFDIO_COPY as _, &mut c) };
        let copied = if rc == 0 { len } else { c.copy.max(0) as u64 };
        if rc == 0 {
            return Ok(Filled::Done);
        }
        let err = io::Error::last_os_error();
        let mut step = copied;
        match err.raw_os_error() {
            Some(libc::EEXIST) if done == 0 && copied == 0 && len == PAGE_BYTES => {
                return Ok(Filled::Present)
            }
            // The first page not copied is already there: go past it.
            Some(libc::EEXIST) => step += PAGE_BYTES,
            Some(libc::EAGAIN) if copied == 0 => return Ok(Filled::Again(done)),
            Some(libc::EAGAIN) => {}
            Some(libc::ENOENT | libc::ESRCH | libc::EFAULT) => return Ok(Filled::Gone),
            _ => return Err(err),
        }
        let step = step.min(len);
        done += step;
        dst += step;
        // SAFETY: step <= len, so src stays within the same mapping.
        src = unsafe { src.add(step as usize) };
        len -= step;
    }
    Ok(Filled::Done)
}

/// One copy of `len` bytes that stops at the first page already present
/// (or at a change of mappings); what it copied stays.
fn copy_until_present(uffd: RawFd, dst: u64, src: *const u8, len: u64) -> io::Result<()> {
    let mut c = UffdioCopy {
        dst,
        src: src as u64,
        len,
        mode: 0,
        copy: 0,
    };
    // SAFETY: as in `copy`: a valid uffdio_copy, the source inside the file
    // mapping, the destination inside a registered range.
    if unsafe { libc::ioctl(uffd, UFFDIO_COPY as _, &mut c) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST | libc::EAGAIN | libc::ENOENT | libc::ESRCH | libc::EFAULT) => Ok(()),
        _ => Err(err),
    }
}

/// Maps the zero page at `dst` (one page).
fn zeropage(uffd: RawFd, dst: u64) -> io::Result<Filled> {
    let mut z = UffdioZeropage {
        start: dst,
        len: PAGE_BYTES,
        mode: 0,
        zeropage: 0,
    };
    // SAFETY: `z` is a valid uffdio_zeropage for one page of a registered range.
    let rc = unsafe { libc::ioctl(uffd, UFFDIO_ZEROPAGE as _, &mut z) };
    if rc == 0 {
        return Ok(Filled::Done);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EEXIST) => Ok(Filled::Present),
        Some(libc::EAGAIN) => Ok(Filled::Again(0)),
        Some(libc::ENOENT | libc::ESRCH | libc::EFAULT) => Ok(Filled::Gone),
        _ => Err(err),
    }
}

/// Installs `runs` of the memory file into the guest before it runs:
/// contiguous pages go in as one copy. Returns the pages installed; a
/// range whose mappings change meanwhile is left to be faulted in.
pub fn install(
    uffd: &OwnedFd,
    mem: &Memory,
    regions: &[Span],
    runs: &[workset::Run],
) -> io::Result<u64> {
    let mut pages = 0;
    let runs = workset::coalesce(runs, workset::GAP_FILL_PAGES as u64);
    let copies: Vec<_> = workset::copies(&runs, regions)
        .into_iter()
        .filter(|c| c.src_offset + c.len <= mem.len())
        .collect();
    // Ask for every run's pages at once: a memory file that is not in the
    // page cache is then read in a few large requests, sorted by offset,
    // while the copies below wait only for the pages they need next.
    for c in &copies {
        mem.will_need(c.src_offset, c.len);
    }
    for c in copies {
        let src = mem.map[c.src_offset as usize..].as_ptr();
        match copy(uffd.as_raw_fd(), c.dst, src, c.len)? {
            Filled::Done => pages += c.len / PAGE_BYTES,
            Filled::Present => {}
            Filled::Again(n) => pages += n / PAGE_BYTES,
            Filled::Gone => break,
        }
    }
    Ok(pages)
}

/// Pages faulted in while recording (indices into the memory file), up to
/// [`PAGES_MAX`]; `None` once recording stopped.
type Recorder = Arc<Mutex<Option<Vec<u32>>>>;

/// One guest the fault thread serves.
struct Guest {
    uffd: OwnedFd,
    /// Firecracker's end is never closed while it lives: a hang-up means it exited.
    conn: UnixStream,
    mem: Arc<Memory>,
    regions: Vec<Span>,
    /// Ranges the guest gave back (balloon): served as zeros from then on.
    removed: Vec<(u64, u64)>,
    recorder: Option<Recorder>,
    faults: Arc<AtomicU64>,
}

impl Guest {
    fn removed(&self, addr: u64) -> bool {
        self.removed.iter().any(|&(s, e)| s <= addr && addr < e)
    }

    fn remember_removed(&mut self, start: u64, end: u64) {
        if self.removed.len() >= REMOVED_MAX {
            // Bounded: fold everything into one covering range (still only zeros
            // served where the guest removed memory, and pages it re-faults
            // outside the ranges are refilled from the file only if never removed).
            let lo = self.removed.iter().map(|r| r.0).min().unwrap_or(start);
            let hi = self.removed.iter().map(|r| r.1).max().unwrap_or(end);
            self.removed = vec![(lo.min(start), hi.max(end))];
        } else {
            self.removed.push((start, end));
        }
    }

    /// Serves one faulting page; `Again` when the guest's mappings are changing.
    fn fault(&self, addr: u64, served: &mut Vec<u32>) -> io::Result<Filled> {
        let page = addr & !(PAGE_BYTES - 1);
        let fd = self.uffd.as_raw_fd();
        let Some(g) = self
            .regions
            .iter()
            .find(|g| g.base <= page && page < g.base + g.size)
        else {
            // Not guest memory Firecracker described: zeros keep the thread from hanging.
            return zeropage(fd, page);
        };
        if self.removed(page) {
            return zeropage(fd, page);
        }
        let offset = g.offset + (page - g.base);
        let src = self.mem.page(offset);
        let filled = if is_zero(src) {
            zeropage(fd, page)?
        } else {
            copy(fd, page, src.as_ptr(), PAGE_BYTES)?
        };
        if filled == Filled::Done {
            match self.recorder {
                Some(_) => served.push((offset / PAGE_BYTES) as u32),
                None if self.removed.is_empty() => self.fault_around(g, page),
                None => {}
            }
        }
        Ok(filled)
    }

    /// After a fault at `page` (already served, its vCPU woken): the rest of
    /// its aligned block of [`FAULT_AROUND_PAGES`], up to the first page
    /// already present each way, so that neighbours touched next do not each
    /// pay a fault. Not while recording: the set must hold only pages touched.
    fn fault_around(&self, g: &Span, page: u64) {
        let block = FAULT_AROUND_PAGES * PAGE_BYTES;
        let start = (page & !(block - 1)).max(g.base);
        let end = (start + block).min(g.base + g.size);
        let fd = self.uffd.as_raw_fd();
        for (from, to) in [(page + PAGE_BYTES, end), (start, page)] {
            if from < to {
                let src = self.mem.map[(g.offset + (from - g.base)) as usize..].as_ptr();
                let _ = copy_until_present(fd, from, src, to - from);
            }
        }
    }

    /// Reads and serves every pending event. `Err` or `Ok(false)`: the VMM is gone.
    fn serve(&mut self) -> io::Result<bool> {
        let mut msgs = [UffdMsg::default(); MSGS_PER_READ];
        let mut served = Vec::new();
        let mut retry: Vec<(u64, u32)> = Vec::new();
        loop {
            // SAFETY: reads whole uffd_msg records into a buffer of that type.
            let n = unsafe {
                libc::read(
                    self.uffd.as_raw_fd(),
                    msgs.as_mut_ptr().cast(),
                    std::mem::size_of_val(&msgs),
                )
            };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock if retry.is_empty() => break,
                    io::ErrorKind::WouldBlock => {}
                    _ => return Err(e),
                }
            } else if n == 0 {
                return Ok(false);
            }
            let count = n.max(0) as usize / std::mem::size_of::<UffdMsg>();
            for m in &msgs[..count] {
                match m.event {
                    EVENT_PAGEFAULT => retry.push((m.arg[1], 0)),
                    EVENT_REMOVE | EVENT_UNMAP => self.remember_removed(m.arg[0], m.arg[1]),
                    _ => {}
                }
            }
            // Faults go after the removals read with them (EAGAIN means one is pending).
            let mut again = Vec::new();
            for (addr, tries) in retry.drain(..) {
                match self.fault(addr, &mut served)? {
                    Filled::Done => {
                        self.faults.fetch_add(1, Ordering::Relaxed);
                    }
                    Filled::Present => {}
                    Filled::Again(_) if tries < RETRIES_MAX => again.push((addr, tries + 1)),
                    Filled::Again(_) => {
                        return Err(io::Error::other(format!(
                            "page {addr:#x} still changing after {RETRIES_MAX} tries"
                        )))
                    }
                    Filled::Gone => return Ok(false),
                }
            }
            retry = again;
        }
        if let Some(rec) = &self.recorder {
            if let Some(pages) = rec.lock().unwrap().as_mut() {
                let room = PAGES_MAX.saturating_sub(pages.len());
                pages.extend(served.into_iter().take(room));
            }
        }
        Ok(true)
    }
}

/// The shared fault thread's table and epoll set.
struct FaultServer {
    epoll: crate::util::sys::Epoll,
    guests: Mutex<HashMap<u64, Guest>>,
    next_id: AtomicU64,
}

/// Tokens: guest id * 2 for its userfaultfd, + 1 for its connection.
fn token(id: u64, conn: bool) -> u64 {
    id * 2 + conn as u64
}

impl FaultServer {
    fn start() -> io::Result<&'static FaultServer> {
        let epoll = crate::util::sys::Epoll::new()?;
        let server: &'static FaultServer = Box::leak(Box::new(FaultServer {
            epoll,
            guests: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }));
        std::thread::Builder::new()
            .name("hearth-uffd".into())
            .spawn(move || server.run())?;
        Ok(server)
    }

    fn ctl(&self, op: i32, fd: RawFd, token: u64) -> io::Result<()> {
        self.epoll
            .ctl(op, fd, libc::EPOLLIN | libc::EPOLLRDHUP, token)
    }

    fn run(&self) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS_MAX];
        loop {
            let n = self.epoll.wait(&mut events);
            for ev in &events[..n] {
                let (tok, flags) = (ev.u64, ev.events);
                let id = tok / 2;
                let mut guests = self.guests.lock().unwrap();
                let Some(g) = guests.get_mut(&id) else {
                    continue;
                };
                let dead = if tok % 2 == 1 {
                    // Anything on Firecracker's connection: it hung up.
                    true
                } else if flags & (libc::EPOLLERR | libc::EPOLLHUP) as u32 != 0 {
                    true
                } else {
                    match g.serve() {
                        Ok(alive) => !alive,
                        Err(e) => {
                            eprintln!("hearth: firecracker: uffd of guest {id}: {e}");
                            true
                        }
                    }
                };
                if dead {
                    let g = guests.remove(&id).expect("present");
                    drop(guests);
                    self.forget(g);
                }
            }
        }
    }

    fn forget(&self, g: Guest) {
        let _ = self.ctl(libc::EPOLL_CTL_DEL, g.uffd.as_raw_fd(), 0);
        let _ = self.ctl(libc::EPOLL_CTL_DEL, g.conn.as_raw_fd(), 0);
    }
}

fn server() -> io::Result<&'static FaultServer> {
    static SERVER: OnceLock<Result<&'static FaultServer, String>> = OnceLock::new();
    SERVER
        .get_or_init(|| FaultServer::start().map_err(|e| e.to_string()))
        .clone()
        .map_err(|e| io::Error::other(format!("uffd fault thread: {e}")))
}

/// A guest served by the fault thread; dropping it stops serving and closes
/// the userfaultfd (drop it after the VMM is gone).
pub struct Registration {
    id: u64,
    recorder: Option<Recorder>,
    faults: Arc<AtomicU64>,
}

/// Hands a received guest to the fault thread; with `record` the pages it
/// faults in are kept until [`Registration::stop_recording`].
pub fn register(got: Received, mem: Arc<Memory>, record: bool) -> io::Result<Registration> {
    // The fault thread drains it until EAGAIN, and the kernel reports a
    // blocking userfaultfd to epoll as an error (Firecracker never reads it).
    // SAFETY: fcntl on a descriptor we own.
    let nonblocking = unsafe {
        let fd = got.uffd.as_raw_fd();
        let flags = libc::fcntl(fd, libc::F_GETFL);
        flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if !nonblocking {
        return Err(io::Error::last_os_error());
    }
    let server = server()?;
    let id = server.next_id.fetch_add(1, Ordering::Relaxed);
    let recorder = record.then(|| Arc::new(Mutex::new(Some(Vec::new()))));
    let faults = Arc::new(AtomicU64::new(0));
    let guest = Guest {
        uffd: got.uffd,
        conn: got.conn,
        mem,
        regions: got.regions,
        removed: Vec::new(),
        recorder: recorder.clone(),
        faults: faults.clone(),
    };
    let (ufd, cfd) = (guest.uffd.as_raw_fd(), guest.conn.as_raw_fd());
    // In the table before epoll can report it.
    server.guests.lock().unwrap().insert(id, guest);
    let added = server
        .ctl(libc::EPOLL_CTL_ADD, ufd, token(id, false))
        .and_then(|_| server.ctl(libc::EPOLL_CTL_ADD, cfd, token(id, true)));
    if let Err(e) = added {
        if let Some(g) = server.guests.lock().unwrap().remove(&id) {
            server.forget(g);
        }
        return Err(e);
    }
    Ok(Registration {
        id,
        recorder,
        faults,
    })
}

impl Registration {
    /// Stops recording and returns the pages recorded (once; `None` if this
    /// guest was not recording).
    pub fn stop_recording(&mut self) -> Option<Vec<u32>> {
        self.recorder.take()?.lock().unwrap().take()
    }

    /// Faults served so far.
    pub fn faults(&self) -> u64 {
        self.faults.load(Ordering::Relaxed)
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(server) = server() {
            let g = server.guests.lock().unwrap().remove(&self.id);
            if let Some(g) = g {
                server.forget(g);
            }
        }
    }
}

#[cfg(test)]
mod tests;
