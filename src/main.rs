//! The `hearth` command: the server (`serve`) and a client for its API.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use hearth::config::{self, BackendKind, FcMemory, HttpLimits, IoMode, ServeConfig, WorkerPolicy};

/// hearth: a self-hosted, Lambda-compatible serverless runtime.
///
/// Deploy a zip holding a Node.js handler, then invoke it over plain HTTP at
/// /f/<id>/<path>. Each function runs in isolated instances (process sandbox
/// or QEMU microVMs) that are initialised once and kept warm.
#[derive(Parser)]
#[command(name = "hearth", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve(ServeArgs),
    /// Deploy a directory or zip as a function.
    Deploy {
        /// A directory (zipped on the fly, node_modules included) or a .zip file.
        path: PathBuf,
        /// Lambda-style handler "file.export" (default: app.handler, index.handler, package.json main).
        #[arg(long)]
        handler: Option<String>,
        /// Memory limit per instance, MiB.
        #[arg(long)]
        memory_mb: Option<u32>,
        /// Time limit per invocation, ms.
        #[arg(long)]
        timeout_ms: Option<u64>,
        /// Most instances at once.
        #[arg(long)]
        concurrency: Option<u32>,
        /// Environment variable KEY=VALUE (repeatable).
        #[arg(long = "env", short = 'e')]
        env: Vec<String>,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Invoke a function and print the response body.
    Invoke {
        id: String,
        /// Path inside the function (default /).
        path: Option<String>,
        /// HTTP method.
        #[arg(short = 'X', long, default_value = "GET")]
        method: String,
        /// Request body ("@file" reads a file).
        #[arg(short = 'd', long)]
        data: Option<String>,
        /// Request header "Name: value" (repeatable).
        #[arg(short = 'H', long = "header")]
        headers: Vec<String>,
        /// Print the status line and headers too.
        #[arg(short = 'i', long)]
        include: bool,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// List deployed functions.
    Ls {
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Delete a function (waits for in-flight requests).
    Rm {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Show a function's recent log lines.
    Logs {
        id: String,
        #[command(flatten)]
        client: ClientArgs,
    },
    /// Report which backends can run on this host, and why not.
    Doctor {
        /// State directory (where images and caches live).
        #[arg(long, default_value = "./state")]
        state_dir: PathBuf,
    },
    /// Load-test an HTTP server (closed or open loop, HDR latency), or plot results.
    Bench(hearth::bench::BenchArgs),
    #[command(name = "__sandbox", hide = true)]
    Sandbox,
}

#[derive(clap::Args)]
struct ClientArgs {
    /// Server address.
    #[arg(long, env = "HEARTH_SERVER", default_value = "127.0.0.1:3000")]
    server: String,
    /// Admin token for the control plane (default: the one `hearth serve` keeps
    /// in <state-dir>/admin-token).
    #[arg(long, env = "HEARTH_ADMIN_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The server's state directory, where its admin token is read from when
    /// --token is not given.
    #[arg(long, env = "HEARTH_STATE_DIR", default_value = "./state")]
    state_dir: PathBuf,
}

impl ClientArgs {
    /// The token to send, if any.
    fn token(&self) -> Option<String> {
        hearth::control::auth::client_token(self.token.clone(), &self.state_dir)
    }
}

#[derive(clap::Args)]
struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is printed).
    #[arg(long, default_value = "127.0.0.1:3000")]
    listen: SocketAddr,
    /// Worker threads, one per core (default: all online cores).
    #[arg(long)]
    cores: Option<usize>,
    /// Where functions, images and caches are kept.
    #[arg(long, default_value = "./state")]
    state_dir: PathBuf,
    /// Socket I/O: io_uring, epoll, or auto (io_uring when it can be set up).
    #[arg(long, value_enum, env = "HEARTH_IO", default_value = "auto")]
    io: IoMode,
    /// Sandbox backend for instances (auto: the best this host can run; see `hearth doctor`).
    #[arg(long, value_enum, default_value = "auto")]
    backend: BackendKind,
    /// Bearer token required by deploy, delete, list, logs and /metrics.
    /// Default: generated on first start and kept in <state-dir>/admin-token
    /// (mode 0600), where the hearth CLI finds it.
    #[arg(long, env = "HEARTH_ADMIN_TOKEN", hide_env_values = true)]
    admin_token: Option<String>,
    /// Run the control plane without a token: anyone who can reach the port may
    /// deploy code. Refused unless --listen is a loopback address; requests must
    /// then name a loopback Host (no DNS rebinding) and come from no other origin.
    #[arg(long, conflicts_with = "admin_token")]
    no_admin_token: bool,
    /// A second token that grants GET /metrics only (for scrapers).
    #[arg(long, env = "HEARTH_METRICS_TOKEN", hide_env_values = true)]
    metrics_token: Option<String>,
    /// Access key id that Lambda service API requests (aws CLI, SDKs) must be
    /// signed with (AWS Signature Version 4).
    #[arg(long, env = "HEARTH_AWS_ACCESS_KEY_ID", default_value = "hearth")]
    aws_access_key_id: String,
    /// Its secret access key. Default: the admin token. With --no-admin-token
    /// the service API is open like the control plane (loopback only).
    #[arg(long, env = "HEARTH_AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    aws_secret_access_key: Option<String>,
    /// Largest invocation request body, bytes.
    #[arg(long, default_value_t = 6 * 1024 * 1024)]
    body_bytes_max: u64,
    /// Open connections per core before new ones are refused with 503.
    #[arg(long, default_value_t = 8192)]
    connections_per_core_max: usize,
    /// Time to receive a request head (and between body reads), ms; then 408.
    #[arg(long, default_value_t = 10_000)]
    head_timeout_ms: u64,
    /// Idle keep-alive connections are closed after this long, ms.
    #[arg(long, default_value_t = 60_000)]
    keepalive_timeout_ms: u64,
    /// Slowest average request-body rate accepted after the first
    /// --head-timeout-ms, bytes/s; slower bodies get 408.
    #[arg(long, default_value_t = 1024)]
    body_rate_min: u64,
    /// Longest time to receive one request body, ms; then 408.
    #[arg(long, default_value_t = 300_000)]
    body_timeout_ms: u64,
    /// Open connections from one client address (an IPv6 /64) across all cores;
    /// more are answered 503 and closed.
    #[arg(long, default_value_t = 1024)]
    connections_per_ip_max: usize,
    /// Answer bytes buffered for clients that do not read, over the whole server,
    /// before no connection gets another request parsed.
    #[arg(long, default_value_t = 1 << 30)]
    out_bytes_total_max: usize,
    /// Request body bytes held over the whole server for clients the request head
    /// did not authenticate (function URLs, SigV4 requests before their signature
    /// is checked), until answered; a body that cannot fit gets 503 (unread when
    /// its Content-Length shows it). Each core holds an equal share; with many
    /// cores raise it (a share below a 67 MiB service API upload takes one only
    /// while the core holds no other body).
    #[arg(long, default_value_t = 1 << 30)]
    in_bytes_total_max: usize,
    /// Of those request body bytes, what one client address (an IPv6 client's
    /// /64) may hold across all cores; more gets the same 503. A lone body of
    /// any size is let in.
    #[arg(long, default_value_t = 128 << 20)]
    in_bytes_per_ip_max: usize,
    /// Grace period for in-flight requests at SIGINT/SIGTERM, ms.
    #[arg(long, default_value_t = 10_000)]
    shutdown_grace_ms: u64,
    /// Idle instances are destroyed after this long, ms (scale to zero).
    #[arg(long, default_value_t = 300_000)]
    keep_warm_ms: u64,
    /// Requests that may wait per function and core beyond its concurrency; more get 429.
    #[arg(long, default_value_t = 100)]
    queue_depth_max: usize,
    /// Do not pin worker threads to cores.
    #[arg(long)]
    no_pin: bool,
    /// The worker threads' scheduling policy. normal: a worker woken by a
    /// client's bytes or an instance's answer preempts the instance running on
    /// its core. batch: SCHED_BATCH, it waits until the instance blocks or its
    /// time slice ends and serves what arrived meanwhile in one turn; measured
    /// (perf/RESULTS.md): Express 1.07-1.14x the requests per second at less host
    /// CPU per request, the trivial handler 0.94-1.00x, about twice the p99 at
    /// half load. adaptive: normal, and batch while the core is crowded (two
    /// ticks in a row with the CPU saturated, nearly every request queued and
    /// handlers running 100 µs or more), measured against normal: Express 1.16x on
    /// both cores and 1.05x per core, its p99 at half load unchanged, the trivial
    /// handler never batch; the metric hearth_worker_batch shows it.
    #[arg(long, value_enum, default_value = "adaptive")]
    worker_policy: WorkerPolicy,
    /// Same as --worker-policy batch (kept for existing command lines).
    #[arg(long, hide = true, conflicts_with = "worker_policy")]
    batch_workers: bool,
    /// While an instance it holds runs a request, a worker with nothing else
    /// to do yields its CPU for up to this long (µs) instead of sleeping, so the
    /// answer and clients' next requests find it awake: no wake-up per event. It
    /// sleeps as soon as a few yields in a row find nothing else to run (the
    /// instance waits on I/O of its own). Measured (perf/RESULTS.md): the trivial
    /// handler 1.33-1.39x the requests per second on both cores and a far shorter
    /// open-loop tail, Express within noise, a trivial function at concurrency 1
    /// 3-5 % slower. 0 turns it off; at most 10000.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    spin_wait_us: u64,
    /// The CPU weight of all instances together, per CPU, in threads' default
    /// weights: the cgroup directory holding every sandbox (of every server on
    /// the host) gets this x the CPUs hearth may use (cgroup v1 cpu.shares 1024
    /// each, v2 cpu.weight 100 each, within the kernel's range). At 1 the
    /// instances on an evenly loaded CPU weigh what its worker thread does.
    /// Measured (perf/RESULTS.md, "the instances' CPU weight"): against the
    /// kernel's default (all instances as one thread) the trivial handler no
    /// longer falls, by chance per run, into a slow mode (55-65k instead of
    /// 85-90k req/s). 2 or 4 gave more throughput (Express GET 1.14-1.36x,
    /// Express at concurrency 1 1.17-1.26x, per core 1.13-1.20x) for less host
    /// CPU per request, and a longer p99 at half load. 1 to 64.
    #[arg(long, default_value_t = hearth::sandbox::process::cgroup::INSTANCES_CPU_WEIGHT_DEFAULT, value_parser = clap::value_parser!(u64).range(1..=64))]
    instances_cpu_weight: u64,
    /// Do not move client connections between cores: neither to the core holding
    /// its function's instance when the function is limited to fewer instances than
    /// there are cores (the instance is handed between the cores in turns instead),
    /// nor with a request that would queue behind a busy instance while another
    /// core's instance is idle (it waits where it is).
    #[arg(long)]
    no_connection_moves: bool,
    /// Run every instance on its worker's CPU. By default (process backend) an
    /// instance of a Node.js function with concurrency 1, whose requests all go to
    /// the core holding it, runs its main thread on the next core's CPU, so that
    /// Node and the worker feeding it run side by side instead of taking turns on
    /// one CPU, and V8's collector on helper threads on the worker's CPU (its
    /// quota: 1.25 cores). Express at concurrency 1: 1.26-1.29x the requests per
    /// second, 1.00-1.04x bare single-process Express (perf/RESULTS.md, "V8's
    /// helpers on the worker's CPU"). Off by itself with --no-connection-moves,
    /// --no-pin, one worker or more workers than CPUs.
    #[arg(long)]
    instances_on_own_cpu: bool,
    /// Do not keep an initialised standby instance per function (process backend).
    #[arg(long)]
    no_standby: bool,
    /// Run every Firecracker VMM under Firecracker's jailer (--backend firecracker):
    /// a chroot of its own under <state-dir>/jail with the kernel, images and snapshot
    /// hard-linked in, a uid of its own (260001..268192, gid 260000), a cgroup v2 with the
    /// function's memory and one core per vCPU, and a new PID namespace.
    #[arg(long)]
    jailer: bool,
    /// Process backend, runtimes other than Node.js: serve the Lambda Runtime API through
    /// a relay process in each sandbox (the agent's --runtime-api mode) instead of on the
    /// worker cores themselves. For comparison; the microVM backends always relay.
    #[arg(long)]
    runtime_api_relay: bool,
    /// Most standbys kept at once (process backend): functions used most recently keep
    /// theirs; 0 keeps none.
    #[arg(long, default_value_t = hearth::sandbox::process::backend::STANDBYS_MAX_DEFAULT)]
    standbys_max: usize,
    /// A function that has not been deployed or started an instance for this long loses
    /// its standby (process backend); its next cold start is a full one.
    #[arg(long, default_value_t = hearth::sandbox::process::backend::STANDBY_IDLE_DEFAULT_MS)]
    standby_idle_ms: u64,
    /// Memory all instances may reserve together, MiB: the sum of memory_mb over instances
    /// alive or starting and standbys (default: 75% of RAM). A deploy that does not fit gets
    /// 503 memory_budget_exhausted; a scale-out waits for room, then 503.
    #[arg(long)]
    instance_memory_max_mb: Option<u64>,
    /// Disk all functions may use together (unpacked code and backend artifacts), MiB. A
    /// deploy that does not fit gets 507 insufficient_storage.
    #[arg(long, default_value_t = hearth::functions::budget::FUNCTIONS_DISK_MAX_MB_DEFAULT)]
    functions_disk_max_mb: u64,
    /// Disk one function's queue of asynchronous events (Event invocations) may use, MiB;
    /// an event beyond it gets 429 TooManyRequestsException.
    #[arg(long, default_value_t = 64)]
    async_queue_max_mb: u64,
    /// Disk all functions' asynchronous queues and kept failed events may use together,
    /// MiB; an event beyond it gets 429 TooManyRequestsException (nothing of it written),
    /// and an event given up beyond it is not kept (it is logged, and still sent to
    /// --async-failure-webhook).
    #[arg(long, default_value_t = hearth::functions::async_events::ASYNC_DISK_MAX_MB_DEFAULT)]
    async_disk_max_mb: u64,
    /// Delay before the first retry of a failed asynchronous event, ms; the second waits
    /// twice as long (Lambda: 1 and 2 minutes).
    #[arg(long, default_value_t = 60_000)]
    async_retry_base_ms: u64,
    /// POST each asynchronous event given up (with its error) to this http:// URL, once.
    /// Only the operator sets it: tenants cannot make hearth call URLs.
    #[arg(long)]
    async_failure_webhook: Option<String>,
    /// How Firecracker restores get guest memory. file: Firecracker maps the snapshot's
    /// memory file itself (clones share its page cache), and hearth reads the function's
    /// working set (the pages its first invocation after a restore touched, recorded by one
    /// restore through uffd) into the page cache while the VMM loads. uffd: hearth serves
    /// page faults from its own mapping of the memory file and installs the working set
    /// before the VM resumes (with --jailer too: the userfaultfd socket is bound inside each
    /// jail). file-lazy and uffd-lazy: the same without a working set. Default: file, the
    /// fastest measured (perf/RESULTS.md).
    #[arg(long, value_enum)]
    fc_memory: Option<FcMemory>,
}

fn main() -> ExitCode {
    // The sandbox launcher must stay single-threaded: dispatch before anything else.
    if std::env::args().nth(1).as_deref() == Some("__sandbox") {
        hearth::sandbox::process::launch::launcher_main();
    }
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(a) => serve(a),
        Command::Deploy {
            path,
            handler,
            memory_mb,
            timeout_ms,
            concurrency,
            env,
            client,
        } => hearth::cli::deploy(
            &client.server,
            client.token().as_deref(),
            &path,
            handler,
            memory_mb,
            timeout_ms,
            concurrency,
            &env,
        ),
        Command::Invoke {
            id,
            path,
            method,
            data,
            headers,
            include,
            client,
        } => hearth::cli::invoke(
            &client.server,
            &id,
            path.as_deref().unwrap_or("/"),
            &method,
            data.as_deref(),
            &headers,
            include,
        ),
        Command::Ls { client } => hearth::cli::list(&client.server, client.token().as_deref()),
        Command::Rm { id, client } => {
            hearth::cli::remove(&client.server, client.token().as_deref(), &id)
        }
        Command::Logs { id, client } => {
            hearth::cli::logs(&client.server, client.token().as_deref(), &id)
        }
        Command::Doctor { state_dir } => {
            absolute_state_dir(&state_dir).and_then(|d| hearth::doctor::run(&d))
        }
        Command::Bench(a) => hearth::bench::run(&a),
        Command::Sandbox => unreachable!("handled above"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hearth: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The state dir as an absolute path, resolved once at start-up: sandboxes and
/// microVMs get paths under it (runtime roots, code dirs, snapshots) that must
/// not depend on the working directory (`--state-dir ./state` is the default).
fn absolute_state_dir(dir: &std::path::Path) -> Result<PathBuf, String> {
    std::path::absolute(dir)
        .map_err(|e| format!("cannot resolve the state dir {}: {e}", dir.display()))
}

fn serve(a: ServeArgs) -> Result<(), String> {
    let state_dir = absolute_state_dir(&a.state_dir)?;
    let cores = a.cores.unwrap_or_else(config::online_cores).max(1);
    let cfg = ServeConfig {
        listen: a.listen,
        cores,
        state_dir,
        io: a.io,
        backend: a.backend,
        http: HttpLimits {
            body_bytes_max: a.body_bytes_max,
            connections_per_core_max: a.connections_per_core_max.max(1),
            head_timeout: Duration::from_millis(a.head_timeout_ms),
            keepalive_timeout: Duration::from_millis(a.keepalive_timeout_ms),
            body_rate_min: a.body_rate_min.max(1),
            body_timeout_max: Duration::from_millis(a.body_timeout_ms),
            connections_per_ip_max: a.connections_per_ip_max.max(1),
            out_bytes_total_max: a.out_bytes_total_max,
            in_bytes_total_max: a.in_bytes_total_max,
            in_bytes_per_ip_max: a.in_bytes_per_ip_max,
            ..HttpLimits::default()
        },
        shutdown_grace: Duration::from_millis(a.shutdown_grace_ms),
        admin_token: None,
        metrics_token: a.metrics_token.filter(|t| !t.is_empty()),
        aws_access_key_id: a.aws_access_key_id,
        aws_secret_access_key: a.aws_secret_access_key.filter(|t| !t.is_empty()),
        keep_warm: Duration::from_millis(a.keep_warm_ms),
        queue_depth_max: a.queue_depth_max.max(1),
        connection_moves: !a.no_connection_moves,
        // Only where a function's requests gather on one worker (connection
        // moves) and workers sit on their CPUs (pinned, more than one, no more
        // workers than CPUs: the next core's number could name no CPU). Read
        // here, on the main thread: a worker thread is pinned to one CPU and
        // would see one.
        instances_beside: !a.instances_on_own_cpu
            && !a.no_connection_moves
            && !a.no_pin
            && cores > 1
            && cores <= config::online_cores(),
        pin: !a.no_pin,
        worker_policy: if a.batch_workers {
            WorkerPolicy::Batch
        } else {
            a.worker_policy
        },
        spin_wait: Duration::from_micros(a.spin_wait_us),
        instances_cpu_weight: a.instances_cpu_weight,
        standby: !a.no_standby && a.standbys_max > 0,
        standbys_max: a.standbys_max,
        standby_idle: Duration::from_millis(a.standby_idle_ms.max(1)),
        jailer: a.jailer,
        runtime_api_relay: a.runtime_api_relay,
        instance_memory_max_mb: a
            .instance_memory_max_mb
            .unwrap_or_else(hearth::functions::budget::default_instance_memory_max_mb),
        functions_disk_max_mb: a.functions_disk_max_mb,
        async_queue_bytes_max: a.async_queue_max_mb.max(1).saturating_mul(1 << 20),
        async_disk_bytes_max: a.async_disk_max_mb.max(1).saturating_mul(1 << 20),
        async_retry_base_ms: a.async_retry_base_ms.max(1),
        async_failure_webhook: a.async_failure_webhook,
        fc_memory: a.fc_memory.unwrap_or(FcMemory::File),
    };
    if cfg.jailer && !matches!(cfg.backend, BackendKind::Firecracker | BackendKind::Auto) {
        return Err("--jailer runs Firecracker VMMs: it needs --backend firecracker".into());
    }
    if let Some(url) = &cfg.async_failure_webhook {
        hearth::functions::async_events::dispatch::parse_webhook(url)?;
    }
    std::fs::create_dir_all(&cfg.state_dir)
        .map_err(|e| format!("cannot create state dir {}: {e}", cfg.state_dir.display()))?;
    let mut cfg = cfg;
    cfg.admin_token = admin_token(
        a.admin_token.filter(|t| !t.is_empty()),
        a.no_admin_token,
        &cfg,
    )?;
    hearth::engine::serve(cfg).map_err(|e| e.to_string())
}

/// The control plane's token: the one given, the one stored in the state dir,
/// or a new one stored there; `None` only when asked for, on loopback.
fn admin_token(
    given: Option<String>,
    open: bool,
    cfg: &ServeConfig,
) -> Result<Option<String>, String> {
    if let Some(t) = given {
        return Ok(Some(t));
    }
    if open {
        if !cfg.listen.ip().is_loopback() {
            return Err(format!(
                "--no-admin-token is refused on {}: anyone who can reach it could deploy code; \
                 give --admin-token or listen on a loopback address",
                cfg.listen
            ));
        }
        eprintln!(
            "hearth: warning: the control plane has no admin token (--no-admin-token); \
             any local user or program can deploy code"
        );
        return Ok(None);
    }
    let token = hearth::control::auth::load_or_create_token(&cfg.state_dir)?;
    eprintln!(
        "hearth: admin token in {} (the hearth CLI reads it from there; other clients send \
         'Authorization: Bearer <token>')",
        hearth::control::auth::token_file(&cfg.state_dir).display()
    );
    Ok(Some(token))
}
