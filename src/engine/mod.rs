//! The thread-per-core engine.
//!
//! `hearth serve` starts one worker thread per core. Each worker is pinned to
//! its CPU and owns an `SO_REUSEPORT` listener, a slab of streams (client
//! connections, instance channels and, for instances whose Lambda Runtime API
//! it serves ([`rapi`]), their listeners and runtime connections) and its
//! share of function instances.
//! The kernel spreads connections over the listeners; from then on a request
//! never leaves the core that accepted it. Workers run on io_uring
//! ([`uring`]) or, where it cannot be set up, on epoll through mio ([`epoll`]);
//! both drive the same [`worker::Worker`] logic.

pub mod conn;
pub mod cpu_meter;
pub mod epoll;
pub mod peers;
pub mod phases;
pub mod port;
pub mod rapi;
pub mod relocate;
pub mod spin;
pub mod stream;
pub mod streamed;
pub mod uring;
pub mod worker;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{IoMode, ServeConfig, WorkerPolicy};
use crate::metrics::CoreMetrics;
use crate::util::cpu;
use worker::{Msg, Worker};

/// State shared by all workers and the control plane.
pub struct Shared {
    pub cfg: ServeConfig,
    pub core_metrics: Vec<Arc<CoreMetrics>>,
    pub functions: Arc<crate::functions::Registry>,
    pub control: crate::control::Control,
    /// Who may use the control plane and `/metrics` (checked on request heads).
    pub guard: crate::control::auth::Guard,
    /// Open connections per client address, across cores.
    pub peers: peers::PeerTable,
    /// Each core's message queue (also held by the control plane's callbacks).
    pub inboxes: Arc<Inboxes>,
    pub shutdown: AtomicBool,
    /// Per core, client connections on their way to it from other cores
    /// (reserved against its connection limit until they arrive).
    pub incoming: Vec<std::sync::atomic::AtomicU64>,
}

impl Shared {
    /// Queues `msg` for `core` and wakes its loop.
    pub fn send(&self, core: usize, msg: Msg) {
        self.inboxes.send(core, msg);
    }

    /// Queues `msg` for `core` and wakes its loop; gives it back when that
    /// core's loop has ended.
    pub fn try_send(&self, core: usize, msg: Msg) -> Result<(), Msg> {
        self.inboxes.try_send(core, msg)
    }

    /// Sends a message built by `make` to every core.
    pub fn broadcast(&self, make: impl Fn() -> Msg) {
        self.inboxes.broadcast(make);
    }
}

/// The cores' message queues, each with the eventfd that wakes its loop.
/// Kept apart from [`Shared`] so that what holds it (the control plane's
/// callbacks) does not keep `Shared` alive in a cycle.
pub struct Inboxes {
    senders: Vec<Sender<Msg>>,
    wakers: Vec<OwnedFd>,
}

impl Inboxes {
    /// Queues `msg` for `core` and wakes its loop.
    pub fn send(&self, core: usize, msg: Msg) {
        let _ = self.try_send(core, msg);
    }

    /// Queues `msg` for `core` and wakes its loop; gives it back when that
    /// core's loop has ended.
    pub fn try_send(&self, core: usize, msg: Msg) -> Result<(), Msg> {
        self.senders[core].send(msg).map_err(|e| e.0)?;
        wake(self.wakers[core].as_raw_fd());
        Ok(())
    }

    /// Sends a message built by `make` to every core.
    pub fn broadcast(&self, make: impl Fn() -> Msg) {
        for core in 0..self.senders.len() {
            self.send(core, make());
        }
    }
}

fn wake(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writing 8 bytes from a valid u64 to an eventfd.
    unsafe { libc::write(fd, &one as *const u64 as *const libc::c_void, 8) };
}

/// Creates an eventfd used to wake a worker.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: plain syscall; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a non-blocking TCP listener with SO_REUSEPORT on `addr`.
pub fn listen(addr: SocketAddr, backlog: i32) -> io::Result<OwnedFd> {
    let domain = if addr.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: syscalls on descriptors we own; results checked.
    unsafe {
        let fd = libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        );
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let owned = OwnedFd::from_raw_fd(fd);
        let one: libc::c_int = 1;
        for opt in [libc::SO_REUSEADDR, libc::SO_REUSEPORT] {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                &one as *const _ as *const libc::c_void,
                4,
            );
        }
        let (storage, len) = sockaddr(addr);
        if libc::bind(fd, &storage as *const _ as *const libc::sockaddr, len) < 0 {
            return Err(io::Error::last_os_error());
        }
        if libc::listen(fd, backlog) < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(owned)
    }
}

fn sockaddr(addr: SocketAddr) -> (libc::sockaddr_storage, libc::socklen_t) {
    // SAFETY: sockaddr_storage is plain data; zeroed is a valid value.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let len = match addr {
        SocketAddr::V4(a) => {
            let sin = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: a.port().to_be(),
                sin_addr: libc::in_addr {
                    s_addr: u32::from_ne_bytes(a.ip().octets()),
                },
                sin_zero: [0; 8],
            };
            // SAFETY: sockaddr_in fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, sin) };
            std::mem::size_of::<libc::sockaddr_in>()
        }
        SocketAddr::V6(a) => {
            let sin6 = libc::sockaddr_in6 {
                sin6_family: libc::AF_INET6 as libc::sa_family_t,
                sin6_port: a.port().to_be(),
                sin6_flowinfo: 0,
                sin6_addr: libc::in6_addr {
                    s6_addr: a.ip().octets(),
                },
                sin6_scope_id: 0,
            };
            // SAFETY: sockaddr_in6 fits in sockaddr_storage.
            unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, sin6) };
            std::mem::size_of::<libc::sockaddr_in6>()
        }
    };
    (storage, len as libc::socklen_t)
}

/// The address a socket is bound to.
pub fn local_addr(fd: RawFd) -> io::Result<SocketAddr> {
    // SAFETY: getsockname fills at most `len` bytes of storage.
    unsafe {
        let mut storage: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getsockname(fd, &mut storage as *mut _ as *mut libc::sockaddr, &mut len) < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(peer_of(&storage))
    }
}

/// Decodes a socket address filled in by the kernel.
pub fn peer_of(storage: &libc::sockaddr_storage) -> SocketAddr {
    match storage.ss_family as i32 {
        libc::AF_INET6 => {
            // SAFETY: the family says this is a sockaddr_in6.
            let a = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            SocketAddr::new(IpAddr::from(a.sin6_addr.s6_addr), u16::from_be(a.sin6_port))
        }
        _ => {
            // SAFETY: AF_INET (or unknown, read as v4 for logging only).
            let a = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            SocketAddr::new(
                IpAddr::from(a.sin_addr.s_addr.to_ne_bytes()),
                u16::from_be(a.sin_port),
            )
        }
    }
}

/// Pauses accepting after an accept failed for lack of resources (descriptors,
/// memory). Retrying at once would spin: the listener stays ready while the
/// cause persists. Connections wait in the listen backlog meanwhile.
#[derive(Default)]
pub struct AcceptBackoff {
    until: Option<Instant>,
    logged_at: Option<Instant>,
}

impl AcceptBackoff {
    /// How long accepting pauses after a resource error.
    const PAUSE: Duration = Duration::from_millis(100);
    /// At most one log line per worker per this period.
    const LOG_EVERY: Duration = Duration::from_secs(1);

    /// Handles an accept error (`errno`); returns true if accepting should pause.
    pub fn on_error(&mut self, core: usize, errno: i32, now: Instant) -> bool {
        if !matches!(
            errno,
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
        ) {
            return false;
        }
        self.until = Some(now + Self::PAUSE);
        if self.logged_at.is_none_or(|t| now >= t + Self::LOG_EVERY) {
            self.logged_at = Some(now);
            eprintln!(
                "hearth: worker {core}: accept: {}; pausing accepts (raise the open-file limit)",
                io::Error::from_raw_os_error(errno)
            );
        }
        true
    }

    /// Whether accepting may go on at `now`.
    pub fn allows(&self, now: Instant) -> bool {
        self.until.is_none_or(|t| now >= t)
    }
}

fn pin_to(core: usize) {
    if let Err(e) = cpu::pin_thread(0, core % libc::CPU_SETSIZE as usize) {
        eprintln!("hearth: worker {core}: could not pin to cpu {core}: {e}");
    }
}

/// Blocks SIGINT/SIGTERM in the calling thread (and threads it spawns later).
fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset manipulation on a local set.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Descriptors needed besides client connections: listeners, rings, wakers,
/// instance channels, files.
const NOFILE_SPARE: u64 = 1024;

/// Raises the soft open-file limit to the hard one (the default soft limit, often
/// 1024, would cap connections far below `connections_per_core_max`); warns if
/// even the hard limit is below what the configured connection limits need.
fn raise_nofile_limit(needed: u64) {
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
        if lim.rlim_cur < needed {
            eprintln!(
                "hearth: open-file limit is {}, below the {needed} the connection limits need; \
                 raise it (ulimit -n / LimitNOFILE=) or lower --connections-per-core-max",
                lim.rlim_cur
            );
        }
    }
}

/// Runs the server until SIGINT/SIGTERM, then drains and returns.
pub fn serve(cfg: ServeConfig) -> io::Result<()> {
    let sigset = block_signals();
    // Large buffers (answers, bodies) get their own mappings and go back to the
    // system when freed. Without a fixed threshold glibc raises it after the first
    // large free, and later multi-megabyte buffers stay in the heap for good.
    // Fixing the threshold also fixes the heap's trim threshold, which would then
    // stay at 128 KiB and shrink and regrow the heap top (brk) under steady load;
    // small buffers are kept instead.
    // SAFETY: mallopt only tunes the allocator; called before other threads start.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 16 * 1024 * 1024);
    }
    // Function starvation is tracked in a 64-bit mask of cores.
    let cores = cfg.cores.clamp(1, 64);
    // The directory holding every sandbox weighs `instances_cpu_weight`
    // threads per CPU hearth may use (`cgroup::INSTANCES_CPU_WEIGHT_DEFAULT`):
    // the host's, not this server's cores, since every server on the host
    // shares that directory and would otherwise undo another's weight.
    let cpus = std::thread::available_parallelism().map_or(cores, |n| n.get());
    crate::sandbox::process::cgroup::set_parent_weight(
        (cpus as u64).saturating_mul(cfg.instances_cpu_weight),
    );
    raise_nofile_limit(
        (cores as u64)
            .saturating_mul(cfg.http.connections_per_core_max as u64)
            .saturating_add(NOFILE_SPARE),
    );
    // The state-dir lock first: holding it, any listener left on our port
    // without a live owner is a dead server's, which `ensure_free` waits out.
    let lock = crate::functions::store::lock_state_dir(&cfg.state_dir)?;
    port::ensure_free(cfg.listen)?;
    let first = listen(cfg.listen, 4096)?;
    let addr = local_addr(first.as_raw_fd())?;
    let mut listeners = vec![first];
    for _ in 1..cores {
        listeners.push(listen(addr, 4096)?);
    }
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    let mut wakers = Vec::new();
    for _ in 0..cores {
        let (tx, rx) = channel();
        senders.push(tx);
        receivers.push(rx);
        wakers.push(eventfd()?);
    }
    let functions = Arc::new(crate::functions::Registry::open(&cfg, lock)?);
    let inboxes = Arc::new(Inboxes { senders, wakers });
    let control = crate::control::Control::new();
    let changed = inboxes.clone();
    let service_auth = match &cfg.admin_token {
        None => crate::control::lambda::ServiceAuth::Open,
        Some(admin) => crate::control::lambda::ServiceAuth::Keys {
            access_key_id: cfg.aws_access_key_id.clone(),
            secret_access_key: cfg
                .aws_secret_access_key
                .clone()
                .unwrap_or_else(|| admin.clone()),
            admin_token: admin.clone(),
        },
    };
    control.start(
        functions.clone(),
        cfg.listen,
        service_auth,
        Box::new(move || changed.broadcast(|| Msg::FunctionsChanged)),
    );
    let io_mode = cfg.io;
    let pin = cfg.pin;
    let spin = spin::SpinWait::new(cfg.spin_wait);
    let grace = cfg.shutdown_grace;
    let shared = Arc::new(Shared {
        core_metrics: (0..cores)
            .map(|_| Arc::new(CoreMetrics::default()))
            .collect(),
        functions,
        control,
        guard: crate::control::auth::Guard {
            admin_token: cfg.admin_token.clone(),
            metrics_token: cfg.metrics_token.clone(),
            access_key_id: cfg.aws_access_key_id.clone(),
        },
        peers: peers::PeerTable::new(
            cfg.http.connections_per_ip_max,
            cfg.http.in_bytes_per_ip_max,
        ),
        inboxes,
        shutdown: AtomicBool::new(false),
        incoming: (0..cores)
            .map(|_| std::sync::atomic::AtomicU64::new(0))
            .collect(),
        cfg,
    });
    crate::functions::Registry::start_threads(
        &shared,
        |s| &s.functions,
        |s, core, started| {
            let msg = Msg::InstanceStarted(started);
            if let Err(Msg::InstanceStarted(started)) = s.inboxes.try_send(core, msg) {
                started.discard();
            }
        },
    );
    shared
        .functions
        .start_async_dispatch(addr, shared.cfg.admin_token.clone());
    let use_uring = match io_mode {
        IoMode::Epoll => false,
        IoMode::Uring => {
            uring::probe()?;
            true
        }
        IoMode::Auto => match uring::probe() {
            Ok(()) => true,
            Err(e) => {
                eprintln!("hearth: io_uring unavailable ({e}); using epoll");
                false
            }
        },
    };
    eprintln!(
        "hearth: {} worker(s) on {}, backend {}, state {}",
        cores,
        if use_uring { "io_uring" } else { "epoll" },
        shared.functions.backend_name(),
        shared.cfg.state_dir.display()
    );
    let mut threads = Vec::new();
    for (core, (listener, inbox)) in listeners.into_iter().zip(receivers).enumerate() {
        let shared = shared.clone();
        let t = std::thread::Builder::new()
            .name(format!("hearth-w{core}"))
            .spawn(move || {
                if pin {
                    pin_to(core);
                }
                let waker = shared.inboxes.wakers[core].as_raw_fd();
                let mut worker = Worker::new(core, shared, inbox);
                if worker.shared.cfg.worker_policy == WorkerPolicy::Batch {
                    worker.set_batch(true);
                }
                let r = if use_uring {
                    uring::run(&mut worker, listener, waker, spin)
                } else {
                    epoll::run(&mut worker, listener, waker, spin)
                };
                if let Err(e) = r {
                    eprintln!("hearth: worker {core} failed: {e}");
                }
                worker.shutdown_instances();
            })?;
        threads.push(t);
    }
    // Tests and scripts read this line to learn an ephemeral port.
    println!("hearth: listening on http://{addr}");
    use std::io::Write;
    let _ = std::io::stdout().flush();

    let mut sig: libc::c_int = 0;
    // SAFETY: sigwait on the set blocked above.
    unsafe { libc::sigwait(&sigset, &mut sig) };
    eprintln!(
        "hearth: signal {sig}: draining (up to {} ms)",
        grace.as_millis()
    );
    shared.shutdown.store(true, Ordering::SeqCst);
    shared.broadcast(|| Msg::Shutdown);
    let deadline = Instant::now() + grace;
    for t in threads {
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if t.is_finished() {
            let _ = t.join();
        }
    }
    shared.functions.shutdown();
    eprintln!("hearth: stopped");
    Ok(())
}
