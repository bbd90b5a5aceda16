//! Server settings and every limit the engine enforces, with their defaults.
//!
//! Limits are named `<thing>_<unit>_max` and documented in README.md ("Limits").

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// How often the event loops run their timers (client deadlines, request
/// timeouts, keep-warm reaping, the scheduler's CPU samples and fit estimates).
pub const TICK: Duration = Duration::from_millis(100);

/// How a worker drives its sockets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IoMode {
    /// io_uring if it can be set up, else epoll.
    Auto,
    /// io_uring only (fail if unavailable).
    Uring,
    /// epoll through mio.
    Epoll,
}

/// The scheduling policy of the worker threads (`util::cpu::set_batch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum WorkerPolicy {
    /// The default policy, except while the core is crowded (every request
    /// waits behind a handler slower than its clients): then SCHED_BATCH.
    // The rule: functions::sched::preempt.
    Adaptive,
    /// Always the default policy: a woken worker preempts the instance on its core.
    Normal,
    /// Always SCHED_BATCH: a woken worker waits for the instance on its
    /// core to block or use up its slice.
    Batch,
}

/// Which sandbox backend runs instances.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// The best backend this host can run (see `hearth doctor`).
    Auto,
    /// Namespaced, seccomp-filtered, cgroup-limited processes.
    Process,
    /// QEMU microVMs restored from a migration snapshot.
    Qemu,
    /// Firecracker microVMs restored from a Full snapshot (needs KVM; see `hearth doctor`).
    Firecracker,
}

/// How a restored Firecracker microVM gets its memory from the snapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FcMemory {
    /// Firecracker maps the memory file privately itself (its File backend);
    /// before each restore hearth asks the kernel to read the function's
    /// working set into the page cache (the set is recorded by one Uffd
    /// restore after each new snapshot).
    File,
    /// The File backend without the working set: pages are read on fault.
    FileLazy,
    /// hearth maps the file and serves the guest's page faults over the
    /// userfaultfd Firecracker hands it (the Uffd backend); the pages the
    /// function's first invocation touched are installed before the VM resumes.
    Uffd,
    /// The Uffd backend without the working set: every page is faulted in lazily.
    UffdLazy,
}

/// HTTP limits of the front end.
#[derive(Clone, Debug)]
pub struct HttpLimits {
    /// Largest request head (request line + headers); more → 431.
    pub head_bytes_max: usize,
    /// Most header fields in one request; more → 431.
    pub headers_max: usize,
    /// Largest request body for invocations; more → 413 (Lambda's payload limit).
    pub body_bytes_max: u64,
    /// Largest `POST /deploy` body (the zip plus multipart overhead); more → 413.
    pub deploy_body_bytes_max: u64,
    /// Open connections per core; more are answered 503 and closed.
    pub connections_per_core_max: usize,
    /// Time allowed to read a request head once it has started, and between body reads; → 408.
    pub head_timeout: Duration,
    /// Time an idle keep-alive connection is kept open.
    pub keepalive_timeout: Duration,
    /// Bytes of responses buffered for a slow reader before the connection stops
    /// reading and parsing (pipelined requests wait).
    pub out_bytes_max: usize,
    /// Bytes of responses buffered on all connections of the server before no
    /// connection gets another request parsed; each core holds an equal share.
    pub out_bytes_total_max: usize,
    /// Bytes of request bodies held on all connections of the server for
    /// requests not yet answered whose client the head did not prove (function
    /// URLs, SigV4 service requests before their signature is checked); each
    /// core holds an equal share (with many cores, raise it: a share below a
    /// service API upload takes one only while the core holds no other). A
    /// body whose length cannot fit is refused with 503 before it is read, one
    /// that outgrows the room while arriving, mid-body (see `engine::conn`).
    pub in_bytes_total_max: usize,
    /// Bytes of those bodies one client address (an IPv6 client's /64) may hold
    /// across all cores; a body that would take it over gets the same 503
    /// (a lone body of any size is let in, as for a core's share).
    pub in_bytes_per_ip_max: usize,
    /// Total time to receive a request body, however fast it trickles in.
    pub body_timeout_max: Duration,
    /// Slowest average body rate accepted, bytes per second: a body must arrive by
    /// `head_timeout + received / body_rate_min` after it started (and within
    /// `body_timeout_max`); → 408.
    pub body_rate_min: u64,
    /// Open connections from one client address (an IPv6 client's /64) across all cores.
    pub connections_per_ip_max: usize,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits {
            head_bytes_max: 64 * 1024,
            headers_max: 100,
            body_bytes_max: 6 * 1024 * 1024,
            deploy_body_bytes_max: 50 * 1024 * 1024 + 64 * 1024,
            connections_per_core_max: 8192,
            head_timeout: Duration::from_secs(10),
            keepalive_timeout: Duration::from_secs(60),
            out_bytes_max: 8 * 1024 * 1024,
            out_bytes_total_max: 1024 * 1024 * 1024,
            in_bytes_total_max: 1024 * 1024 * 1024,
            in_bytes_per_ip_max: 128 * 1024 * 1024,
            body_timeout_max: Duration::from_secs(300),
            body_rate_min: 1024,
            connections_per_ip_max: 1024,
        }
    }
}

/// Everything `hearth serve` runs with.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub listen: SocketAddr,
    pub cores: usize,
    pub state_dir: PathBuf,
    pub io: IoMode,
    pub backend: BackendKind,
    pub http: HttpLimits,
    /// Grace period for in-flight requests at shutdown.
    pub shutdown_grace: Duration,
    /// Bearer token required by the control plane and `/metrics`; `None` leaves
    /// them open (allowed on loopback listens only).
    pub admin_token: Option<String>,
    /// A token that grants `/metrics` only.
    pub metrics_token: Option<String>,
    /// The access key id Lambda service API requests are signed with.
    pub aws_access_key_id: String,
    /// Its secret; `None`: the admin token.
    pub aws_secret_access_key: Option<String>,
    /// Idle time after which a warm instance is destroyed (scale to zero).
    pub keep_warm: Duration,
    /// Requests waiting per function (per core) beyond its concurrency; more → 429.
    pub queue_depth_max: usize,
    /// Move a client connection to the core holding its function's instance when
    /// the function cannot have one on every core (`engine::relocate`), or with a
    /// request spilled to another core's idle instance (`functions::sched::spill`).
    pub connection_moves: bool,
    /// Run an instance of a Node.js function with concurrency 1 on the next
    /// core's CPU, with V8's collector on helper threads on its worker's CPU
    /// (`--instances-on-own-cpu`, `--no-connection-moves` and `--no-pin` off,
    /// 2 or more workers and no more than CPUs; the process backend only; see
    /// `functions::sched::SchedConfig::instance_cpus`).
    pub instances_beside: bool,
    /// Pin worker threads to cores.
    pub pin: bool,
    /// The worker threads' scheduling policy: whether a worker woken (by a
    /// client's bytes, say) preempts the instance running on its core, or
    /// runs when that instance blocks or its time slice ends.
    pub worker_policy: WorkerPolicy,
    /// How long a worker may yield its CPU, instead of sleeping, while an
    /// instance on its core runs a request (`engine::spin`); zero: never.
    pub spin_wait: Duration,
    /// The CPU weight of all sandboxes together per CPU hearth may use, in
    /// default weights (one thread's), against the workers' and the host's
    /// other threads
    /// (`sandbox::process::cgroup::INSTANCES_CPU_WEIGHT_DEFAULT`).
    pub instances_cpu_weight: u64,
    /// Keep one initialised standby instance per function in use (process backend).
    pub standby: bool,
    /// Run Firecracker VMMs under the jailer (`sandbox::firecracker::jail`).
    pub jailer: bool,
    /// Process backend: the Runtime API through the agent's relay process rather than
    /// served by the worker cores (`sandbox::runtime_api`).
    pub runtime_api_relay: bool,
    /// Most standbys kept at once (the least recently used go first).
    pub standbys_max: usize,
    /// A function unused this long loses its standby (process backend).
    pub standby_idle: Duration,
    /// Sum of `memory_mb` over all instances alive or starting and all standbys, MiB;
    /// a deploy beyond it → 503, a scale-out waits, then 503 (`functions::budget`).
    pub instance_memory_max_mb: u64,
    /// Sum of the functions' code and artifacts on disk, MiB; a deploy beyond it → 507.
    pub functions_disk_max_mb: u64,
    /// Bytes of queued asynchronous events per function; more → 429.
    pub async_queue_bytes_max: u64,
    /// Bytes of all asynchronous queues and failed events together; an event beyond it → 429.
    pub async_disk_bytes_max: u64,
    /// Delay before the first retry of a failed asynchronous event, ms (doubling after).
    pub async_retry_base_ms: u64,
    /// Where failed asynchronous events are POSTed (`http://` only), if anywhere.
    pub async_failure_webhook: Option<String>,
    /// Memory backend of Firecracker restores.
    pub fc_memory: FcMemory,
}

/// Online CPU count (the default for `--cores`).
pub fn online_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
