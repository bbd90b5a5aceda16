//! The agent's runtime-API mode (`hearth-agent --runtime-api <kind>`): the
//! "runtime" on fd 3 for functions that are not Node.js. It speaks frames on
//! fd 3 exactly as the Node shim does, serves the Lambda Runtime API on
//! 127.0.0.1:9001, starts the function's bootstrap with the Lambda
//! environment on the first HELLO and translates between the two (`rapi`).
//! READY goes out when the bootstrap first polls `/invocation/next`, so a
//! standby or snapshot holds an initialised runtime. The bootstrap's
//! stdout/stderr become LOG frames tagged with the invocation in flight.
//! When the bootstrap exits, so does this process, with its status.

use std::cell::Cell;
use std::collections::VecDeque;
use std::io::{self, Read};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Instant;

use serde_json::Value;

use crate::epoll::{Epoll, Ready};
use crate::http::{self, BodyKind, Head, HttpError};
use crate::protocol::{self, FrameDecoder, FrameType};
use crate::rapi::{self, Function, Invocation, Kind, Route};
use crate::reap::RuntimeExit;
use crate::runtime::RUNTIME_CHANNEL_FD;
use crate::sys;

/// Longest a write to a Runtime API client may stall before it is dropped.
const CLIENT_WRITE_TIMEOUT_MS: i32 = 10_000;
/// LOG frame bodies are cut at this size.
const LOG_CHUNK: usize = 64 << 10;

/// Event-loop tokens of the fixed fds; connection `i` is `TOKEN_CONN + i`.
const TOKEN_CHANNEL: u64 = 0;
const TOKEN_LISTENER: u64 = 1;
const TOKEN_PIDFD: u64 = 2;
const TOKEN_STDOUT: u64 = 3;
const TOKEN_STDERR: u64 = 4;
const TOKEN_CONN: u64 = 16;

/// Runs the mode; returns the process exit status.
pub fn run(kind: Kind) -> i32 {
    // SAFETY: the agent started us with the frame socket on fd 3, ours to own.
    let channel = unsafe { OwnedFd::from_raw_fd(RUNTIME_CHANNEL_FD) };
    let _ = sys::set_cloexec(channel.as_raw_fd(), true);
    let listener = match TcpListener::bind(rapi::LISTEN_ADDR) {
        Ok(l) => l,
        Err(e) => {
            eprintln!(
                "hearth runtime-api: cannot listen on {}: {e}",
                rapi::LISTEN_ADDR
            );
            return 2;
        }
    };
    // Connections are reported when their first bytes arrive, not at the
    // handshake (after 1 s without any, they are reported anyway).
    let _ = set_defer_accept(listener.as_raw_fd(), 1);
    let epoll = listener
        .set_nonblocking(true)
        .and_then(|()| sys::set_nonblocking(channel.as_raw_fd(), true))
        .and_then(|()| Epoll::new())
        .and_then(|ep| {
            ep.add(channel.as_raw_fd(), TOKEN_CHANNEL)?;
            ep.add(listener.as_raw_fd(), TOKEN_LISTENER)?;
            Ok(ep)
        });
    let epoll = match epoll {
        Ok(ep) => ep,
        Err(e) => {
            eprintln!("hearth runtime-api: {e}");
            return 2;
        }
    };
    let mut server = Server {
        kind,
        epoll,
        channel,
        decoder: FrameDecoder::new(),
        listener,
        conns: Vec::new(),
        state: State::Waiting,
        function: None,
        init_error: None,
        started: Instant::now(),
        init_ms: 0.0,
        queue: VecDeque::new(),
        current: None,
        last_answered: None,
        parked: None,
        child: None,
        scratch: vec![0; 64 << 10].into_boxed_slice(),
        out: Cell::new(Vec::new()),
        rng: Cell::new(random_u64s()[0] | 1),
        answered: None,
        early_next: EarlyNext::default(),
    };
    match server.run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hearth runtime-api: {e}");
            server.kill_child();
            2
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// No HELLO yet.
    Waiting,
    /// The bootstrap runs and has not polled `/next` yet.
    Initialising,
    Ready,
    /// INIT_ERROR sent.
    Failed,
}

struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// The head of a request whose body is still arriving.
    head: Option<Head>,
    continue_sent: bool,
    /// The connection is to close once its current answer is written.
    closing: bool,
    /// The streamed response this connection is relaying, if any.
    relay: Option<StreamIn>,
}

/// A response posted in streaming mode (`Lambda-Runtime-Function-Response-Mode:
/// streaming`), relayed as STREAM_* frames while its body arrives.
struct StreamIn {
    frame_id: u32,
    request_id: String,
    /// A service API invocation: bytes pass as they are, with the trace of an error.
    raw: bool,
    body: http::BodyStream,
    content_type: Option<String>,
    /// The HTTP prelude read so far, while it is awaited.
    prelude: Option<Vec<u8>>,
    head_sent: bool,
}

/// Bytes read from one Runtime API connection per turn of the loop, so a
/// streaming bootstrap is relayed at the pace the host takes it.
const CONN_READ_BYTES_MAX: usize = 256 << 10;

/// Runtime API connections open at once. Runtime clients use one or two (a
/// pooled `/next` connection, sometimes a fresh one while it is returned to
/// the pool); a connection over the limit is closed as soon as it is
/// accepted, so a runtime cannot make the agent hold unbounded buffers.
pub const CONNS_MAX: usize = 64;

struct Child {
    pid: libc::pid_t,
    /// Registered in the event set (readable once the child exits): held, not read.
    _pidfd: OwnedFd,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

struct Server {
    kind: Kind,
    /// Every fd below, registered once under its token.
    epoll: Epoll,
    channel: OwnedFd,
    decoder: FrameDecoder,
    listener: TcpListener,
    conns: Vec<Option<Conn>>,
    state: State,
    function: Option<Function>,
    /// The INIT_ERROR metadata, also the ERROR of invocations after it.
    init_error: Option<Vec<u8>>,
    started: Instant,
    init_ms: f64,
    /// INVOKE frames not yet handed out: (frame id, meta, body).
    queue: VecDeque<(u32, Value, Vec<u8>)>,
    /// Handed out and not answered.
    current: Option<Invocation>,
    /// The request id of the last invocation answered (a second answer is a 403).
    last_answered: Option<String>,
    /// The connection waiting in `/next`.
    parked: Option<usize>,
    child: Option<Child>,
    /// Where connection reads land before they join a connection's buffer: allocated
    /// once, as zeroing a fresh 64 KiB per read cost more than the rest of a read.
    scratch: Box<[u8]>,
    /// The encoding buffer of outgoing frames, kept between frames.
    out: Cell<Vec<u8>>,
    /// State of the generator of trace ids (seeded from getrandom once: they
    /// need to be unique, not secret).
    rng: Cell<u64>,
    /// The connection whose request just answered an invocation (202), so
    /// one more read of it may find the runtime's next `/next` already there.
    answered: Option<usize>,
    early_next: EarlyNext,
}

/// Whether to look for the runtime's next `/next` right after a 202, in the
/// same wake-up, rather than wait for the event loop to report it. A look that
/// finds it saves a wake-up (an `epoll_wait` that sleeps, a context switch in
/// and out); one that does not costs a `recvfrom` failing with `EAGAIN`. How
/// soon a runtime asks again depends on it and on where the scheduler runs
/// it, so the choice follows recent outcomes: a find adds [`Self::HIT`] to a
/// score, a miss takes 1; at zero the look is only tried every
/// [`Self::PROBE_EVERY`]th answer, to notice when it would pay again.
#[derive(Default)]
struct EarlyNext {
    score: u8,
    skipped: u8,
}

impl EarlyNext {
    const HIT: u8 = 4;
    const SCORE_MAX: u8 = 32;
    const PROBE_EVERY: u8 = 16;

    /// Whether to look now.
    fn try_now(&mut self) -> bool {
        if self.score > 0 {
            return true;
        }
        self.skipped += 1;
        if self.skipped < Self::PROBE_EVERY {
            return false;
        }
        self.skipped = 0;
        true
    }

    /// The look found (`true`) or did not find the request.
    fn record(&mut self, found: bool) {
        self.score = match found {
            true => (self.score + Self::HIT).min(Self::SCORE_MAX),
            false => self.score.saturating_sub(1),
        };
    }
}

impl Server {
    fn run(&mut self) -> io::Result<i32> {
        let mut ready = Ready::new();
        let mut conns: Vec<usize> = Vec::with_capacity(crate::epoll::EVENTS_MAX);
        loop {
            self.epoll.wait(&mut ready, -1)?;
            let mut fixed = [false; TOKEN_CONN as usize];
            conns.clear();
            for token in ready.tokens() {
                match token.checked_sub(TOKEN_CONN) {
                    Some(i) => conns.push(i as usize),
                    None => fixed[token as usize] = true,
                }
            }
            // Output first, so lines written before an answer are sent before it.
            for (token, stderr) in [(TOKEN_STDOUT, false), (TOKEN_STDERR, true)] {
                if fixed[token as usize] {
                    self.pump_output(stderr, false)?;
                }
            }
            for &i in &conns {
                self.on_conn(i)?;
            }
            if fixed[TOKEN_LISTENER as usize] {
                self.accept()?;
            }
            if fixed[TOKEN_CHANNEL as usize] && !self.on_channel()? {
                // The host is gone.
                self.kill_child();
                return Ok(0);
            }
            if fixed[TOKEN_PIDFD as usize] {
                if let Some(code) = self.on_child_exit()? {
                    return Ok(code);
                }
            }
        }
    }

    // ----- frames -------------------------------------------------------

    /// Reads the channel; false at end of file.
    fn on_channel(&mut self) -> io::Result<bool> {
        const CHUNK: usize = 64 << 10;
        loop {
            let got = sys::read(self.channel.as_raw_fd(), self.decoder.spare(CHUNK));
            self.decoder.filled(CHUNK, *got.as_ref().unwrap_or(&0));
            match got {
                Ok(0) => return Ok(false),
                // A short read drained the socket: poll says when more comes.
                Ok(n) if n < CHUNK => break,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        loop {
            let frame = match self.decoder.next_frame() {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(true),
                Err(e) => return Err(io::Error::other(format!("protocol error: {e}"))),
            };
            let meta: Value = if frame.meta.is_empty() {
                Value::Object(Default::default())
            } else {
                serde_json::from_slice(&frame.meta)
                    .map_err(|e| io::Error::other(format!("frame metadata: {e}")))?
            };
            match frame.kind {
                FrameType::Hello => self.on_hello(&meta)?,
                FrameType::Invoke => {
                    if let Some(err) = &self.init_error {
                        let err = err.clone();
                        self.send(FrameType::Error, 0, frame.request_id, &err, &[])?;
                    } else {
                        self.queue.push_back((frame.request_id, meta, frame.body));
                        self.dispatch()?;
                    }
                }
                other => {
                    return Err(io::Error::other(format!(
                        "unexpected frame {other:?} from the host"
                    )))
                }
            }
        }
    }

    fn on_hello(&mut self, meta: &Value) -> io::Result<()> {
        match self.state {
            State::Waiting => {
                self.started = Instant::now();
                let f = Function::from_hello(meta);
                self.state = State::Initialising;
                if let Err(e) = self.spawn(&f) {
                    let cmd = self.kind.command(&f.task_root).join(" ");
                    let msg = format!("cannot start the runtime {cmd}: {e}");
                    self.fail_init("Runtime.InvalidEntrypoint", &msg)?;
                }
                self.function = Some(f);
            }
            State::Initialising => {}
            State::Ready => self.send_ready()?,
            State::Failed => {
                let err = self.init_error.clone().unwrap_or_default();
                self.send(FrameType::InitError, 0, 0, &err, &[])?;
            }
        }
        Ok(())
    }

    fn send_ready(&mut self) -> io::Result<()> {
        let meta = serde_json::json!({"init_ms": self.init_ms, "runtime": self.kind.name()});
        self.send(FrameType::Ready, 0, 0, meta.to_string().as_bytes(), &[])
    }

    fn fail_init(&mut self, error_type: &str, message: &str) -> io::Result<()> {
        let meta =
            serde_json::json!({"errorType": error_type, "errorMessage": message}).to_string();
        self.fail_init_meta(meta.into_bytes())
    }

    fn fail_init_meta(&mut self, meta: Vec<u8>) -> io::Result<()> {
        if self.state == State::Failed {
            return Ok(());
        }
        self.state = State::Failed;
        let report = format!(
            "{}\tundefined\tERROR\tInit failed \t{}\n",
            iso_time(sys::realtime_ms()),
            String::from_utf8_lossy(&meta)
        );
        self.send(
            FrameType::Log,
            protocol::LOG_STDERR,
            0,
            &[],
            report.as_bytes(),
        )?;
        self.send(FrameType::InitError, 0, 0, &meta, &[])?;
        for (id, _, _) in std::mem::take(&mut self.queue) {
            self.send(FrameType::Error, 0, id, &meta, &[])?;
        }
        self.init_error = Some(meta);
        Ok(())
    }

    fn send(
        &self,
        kind: FrameType,
        flags: u8,
        id: u32,
        meta: &[u8],
        body: &[u8],
    ) -> io::Result<()> {
        let mut out = self.out.take();
        out.clear();
        protocol::encode(&mut out, kind, flags, id, meta, body);
        let written = write_all(self.channel.as_raw_fd(), &out, -1);
        if out.capacity() <= LOG_CHUNK * 2 {
            self.out.set(out);
        }
        written
    }

    /// A fresh X-Ray trace id (splitmix64 over the seeded state).
    fn trace_id(&self, now_ms: u64) -> String {
        let next = || {
            let s = self.rng.get().wrapping_add(0x9e37_79b9_7f4a_7c15);
            self.rng.set(s);
            let z = (s ^ (s >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        rapi::trace_id(now_ms, [next(), next()])
    }

    // ----- the bootstrap ------------------------------------------------

    fn spawn(&mut self, f: &Function) -> io::Result<()> {
        let argv = self.kind.command(&f.task_root);
        let inherited: Vec<(String, String)> = std::env::vars().collect();
        let stream = log_stream_name(sys::realtime_ms(), random_u64s());
        let env = f.environment(self.kind, inherited, &stream);
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..])
            .env_clear()
            .envs(env)
            .current_dir(&f.task_root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: prctl is async-signal-safe; it only sets the child's death signal.
        unsafe {
            cmd.pre_exec(|| {
                sys::cvt(libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0))?;
                Ok(())
            });
        }
        let mut child = cmd.spawn()?;
        let pid = child.id() as libc::pid_t;
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) } as RawFd;
        if pidfd < 0 {
            let e = io::Error::last_os_error();
            // SAFETY: our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            return Err(e);
        }
        // SAFETY: pidfd_open returned a new descriptor that nothing else owns.
        let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
        let stdout: OwnedFd = child.stdout.take().expect("piped").into();
        let stderr: OwnedFd = child.stderr.take().expect("piped").into();
        for (fd, token) in [
            (&pidfd, TOKEN_PIDFD),
            (&stdout, TOKEN_STDOUT),
            (&stderr, TOKEN_STDERR),
        ] {
            sys::set_cloexec(fd.as_raw_fd(), true)?;
            sys::set_nonblocking(fd.as_raw_fd(), true)?;
            self.epoll.add(fd.as_raw_fd(), token)?;
        }
        self.child = Some(Child {
            pid,
            _pidfd: pidfd,
            stdout: Some(stdout),
            stderr: Some(stderr),
        });
        Ok(())
    }

    /// Turns what the bootstrap wrote into LOG frames; with `to_end`, reads
    /// until end of file (the bootstrap is gone).
    fn pump_output(&mut self, stderr: bool, to_end: bool) -> io::Result<()> {
        let mut buf = std::mem::take(&mut self.scratch);
        let pumped = self.pump_into(&mut buf[..LOG_CHUNK], stderr, to_end);
        self.scratch = buf;
        pumped
    }

    fn pump_into(&mut self, buf: &mut [u8], stderr: bool, to_end: bool) -> io::Result<()> {
        let tag = self.current.as_ref().map_or(0, |c| c.frame_id);
        let flags = if stderr { protocol::LOG_STDERR } else { 0 };
        loop {
            let Some(c) = &mut self.child else {
                return Ok(());
            };
            let slot = if stderr { &mut c.stderr } else { &mut c.stdout };
            let Some(fd) = slot else { return Ok(()) };
            match sys::read(fd.as_raw_fd(), buf) {
                Ok(0) => {
                    *slot = None;
                    return Ok(());
                }
                Ok(n) => self.send(FrameType::Log, flags, tag, &[], &buf[..n])?,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && to_end => {
                    let mut p = [pollfd(fd.as_raw_fd())];
                    if sys::poll(&mut p, 200)? == 0 {
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(_) => {
                    *slot = None;
                    return Ok(());
                }
            }
        }
    }

    /// The bootstrap exited: report it as Lambda does and give its status.
    fn on_child_exit(&mut self) -> io::Result<Option<i32>> {
        let Some(pid) = self.child.as_ref().map(|c| c.pid) else {
            return Ok(None);
        };
        let mut status = 0;
        // SAFETY: waits for our own child without blocking.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r != pid {
            return Ok(None);
        }
        let exit = RuntimeExit::from_wait_status(status);
        self.pump_output(false, true)?;
        self.pump_output(true, true)?;
        let message = exit.lambda_message();
        match self.state {
            State::Initialising | State::Waiting => {
                self.fail_init("Runtime.ExitError", &message)?;
            }
            _ => {
                if let Some(inv) = self.current.take() {
                    let meta = serde_json::json!({
                        "errorType": "Runtime.ExitError",
                        "errorMessage": format!("RequestId: {} Error: {message}", inv.request_id),
                    });
                    self.send(
                        FrameType::Error,
                        0,
                        inv.frame_id,
                        meta.to_string().as_bytes(),
                        &[],
                    )?;
                }
            }
        }
        self.child = None;
        Ok(Some(match exit {
            RuntimeExit::Code(c) => c,
            RuntimeExit::Signal(s) => 128 + s,
        }))
    }

    fn kill_child(&mut self) {
        if let Some(c) = self.child.take() {
            // SAFETY: our own child, not yet reaped; then reap it.
            unsafe {
                libc::kill(c.pid, libc::SIGKILL);
                libc::waitpid(c.pid, std::ptr::null_mut(), 0);
            }
        }
    }

    // ----- HTTP ----------------------------------------------------------

    /// Accepts the waiting connections and serves what each already sent:
    /// with TCP_DEFER_ACCEPT a connection is only reported once its first
    /// request (or its end) has arrived, so one wake-up serves both.
    fn accept(&mut self) -> io::Result<()> {
        loop {
            // SAFETY: accept4 with null address pointers only returns a new fd or -1.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
                )
            };
            if fd < 0 {
                return Ok(());
            }
            // SAFETY: accept4 returned a new connected socket that nothing else owns.
            let stream = unsafe { TcpStream::from_raw_fd(fd) };
            let slot = self.conns.iter().position(Option::is_none);
            if slot.is_none() && self.conns.len() >= CONNS_MAX {
                // Over the limit: dropping `stream` closes it.
                continue;
            }
            let _ = stream.set_nodelay(true);
            let i = slot.unwrap_or(self.conns.len());
            if self
                .epoll
                .add(stream.as_raw_fd(), TOKEN_CONN + i as u64)
                .is_err()
            {
                continue;
            }
            let conn = Conn {
                stream,
                buf: Vec::new(),
                head: None,
                continue_sent: false,
                closing: false,
                relay: None,
            };
            match slot {
                Some(i) => self.conns[i] = Some(conn),
                None => self.conns.push(Some(conn)),
            }
            self.on_conn(i)?;
        }
    }

    fn drop_conn(&mut self, i: usize) {
        let cut = self.conns[i].as_mut().and_then(|c| c.relay.take());
        if let Some(st) = cut {
            // The bootstrap hung up mid-stream: the invocation fails.
            let meta = serde_json::json!({"errorType": "Runtime.StreamError",
                "errorMessage": "the runtime closed its connection before the streamed response ended"});
            self.end_stream(st, meta.to_string().as_bytes());
        }
        self.conns[i] = None;
        if self.parked == Some(i) {
            self.parked = None;
        }
    }

    /// Reads connection `i` and serves what came. When that answered an
    /// invocation (202), the runtime's next `/next` is often already on its
    /// way: one more read, which costs a failed `recvfrom` when it is not
    /// there, serves it in this wake-up instead of the next.
    fn on_conn(&mut self, i: usize) -> io::Result<()> {
        self.answered = None;
        if self.read_conn(i).is_none() {
            return Ok(());
        }
        self.serve(i)?;
        if self.answered.take() == Some(i) && self.parked.is_none() && self.early_next.try_now() {
            let got = self.read_conn(i);
            self.early_next.record(got.is_some_and(|n| n > 0));
            if got.is_some() {
                self.serve(i)?;
            }
        }
        Ok(())
    }

    /// Reads what connection `i` has into its buffer: the bytes read, `None`
    /// if it is gone.
    fn read_conn(&mut self, i: usize) -> Option<usize> {
        let mut read = 0;
        while read < CONN_READ_BYTES_MAX {
            let c = self.conns[i].as_mut()?;
            match c.stream.read(&mut self.scratch) {
                Ok(0) => {
                    // The runtime closed it (hyper's pool closes the spare connections
                    // it opens when a request races a connection's return to the pool,
                    // about one in five requests): close with a reset rather than a
                    // FIN, which would put its orphaned end through TIME_WAIT, the
                    // dearest part of the close.
                    let _ = linger_zero(c.stream.as_raw_fd());
                    self.drop_conn(i);
                    return None;
                }
                Ok(n) => {
                    c.buf.extend_from_slice(&self.scratch[..n]);
                    read += n;
                    if n < self.scratch.len() {
                        break; // drained, as above
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.drop_conn(i);
                    return None;
                }
            }
        }
        Some(read)
    }

    /// Serves every complete request buffered on connection `i`.
    fn serve(&mut self, i: usize) -> io::Result<()> {
        while self.parked != Some(i) {
            let Some(c) = self.conns[i].as_mut() else {
                return Ok(());
            };
            if c.head.is_none() {
                match http::parse_head(&c.buf) {
                    Ok(Some(h)) => {
                        c.buf.drain(..h.len);
                        c.continue_sent = false;
                        c.head = Some(h);
                    }
                    Ok(None) => return Ok(()),
                    Err(e) => {
                        let (status, msg) = match e {
                            HttpError::Bad(why) => (400, why),
                            HttpError::HeadTooLarge => (431, "request head too large"),
                            HttpError::BodyTooLarge => (413, "request body too large"),
                        };
                        self.answer_and_close(i, status, "InvalidRequest", msg);
                        return Ok(());
                    }
                }
            }
            let c = self.conns[i].as_mut().expect("present");
            // Taken, not cloned (a clone per request was most of the allocations of
            // parsing it); put back while its body is still arriving.
            let head = c.head.take().expect("set above");
            let route = rapi::route(&head.method, &head.target);
            if c.relay.is_some() || is_streaming(&route, &head) {
                if !self.serve_stream(i, &route, &head)? {
                    if let Some(c) = self.conns[i].as_mut() {
                        c.head = Some(head);
                    }
                    return Ok(());
                }
                continue;
            }
            let max = match route {
                Route::Response(_) => rapi::RESPONSE_BYTES_MAX,
                Route::Error(_) | Route::InitError => rapi::ERROR_BYTES_MAX,
                _ => rapi::ERROR_BYTES_MAX,
            };
            let body = match http::parse_body(&c.buf, head.body, max) {
                Ok(Some((body, used))) => {
                    c.buf.drain(..used);
                    body
                }
                Ok(None) => {
                    let expects_continue = head.expects_continue();
                    c.head = Some(head);
                    if expects_continue && !c.continue_sent {
                        c.continue_sent = true;
                        let fd = c.stream.as_raw_fd();
                        if write_all(fd, http::CONTINUE, CLIENT_WRITE_TIMEOUT_MS).is_err() {
                            self.drop_conn(i);
                        }
                    }
                    return Ok(());
                }
                Err(HttpError::BodyTooLarge) => {
                    self.too_large(i, &route, &head)?;
                    return Ok(());
                }
                Err(e) => {
                    let msg = match e {
                        HttpError::Bad(why) => why,
                        _ => "malformed body",
                    };
                    self.answer_and_close(i, 400, "InvalidRequest", msg);
                    return Ok(());
                }
            };
            if head.close {
                self.conns[i].as_mut().expect("present").closing = true;
            }
            self.handle(i, route, &head, body)?;
        }
        Ok(())
    }

    /// Relays the streamed response posted on connection `i` as far as its
    /// body has arrived; true once it is complete and answered.
    fn serve_stream(&mut self, i: usize, route: &Route, head: &Head) -> io::Result<bool> {
        let c = self.conns[i].as_mut().expect("present");
        let mut st = match c.relay.take() {
            Some(st) => st,
            None => {
                let Route::Response(id) = route else {
                    unreachable!("only responses stream")
                };
                let Some(inv) = self.current.as_ref().filter(|c| &c.request_id == id) else {
                    let (status, kind, msg) = match self.last_answered.as_deref() == Some(id) {
                        true => (
                            403,
                            "InvalidStateTransition",
                            "the invocation was already answered",
                        ),
                        false => (400, "InvalidRequestID", "Invalid request ID"),
                    };
                    // Its body is never read: the connection closes.
                    self.answer_and_close(i, status, kind, msg);
                    return Ok(false);
                };
                let content_type = head.header("content-type").map(str::to_string);
                let prelude = !inv.raw
                    && content_type
                        .as_deref()
                        .is_some_and(|t| t.eq_ignore_ascii_case(rapi::HTTP_INTEGRATION_TYPE));
                if head.expects_continue()
                    && write_all(
                        c.stream.as_raw_fd(),
                        http::CONTINUE,
                        CLIENT_WRITE_TIMEOUT_MS,
                    )
                    .is_err()
                {
                    self.drop_conn(i);
                    return Ok(false);
                }
                StreamIn {
                    frame_id: inv.frame_id,
                    request_id: inv.request_id.clone(),
                    raw: inv.raw,
                    body: http::BodyStream::new(head.body),
                    content_type,
                    prelude: prelude.then(Vec::new),
                    head_sent: false,
                }
            }
        };
        let mut data = Vec::new();
        let fed = st.body.feed(&c.buf, &mut data);
        let used = *fed.as_ref().unwrap_or(&0);
        c.buf.drain(..used);
        if fed.is_err() {
            let meta = serde_json::json!({"errorType": "Runtime.StreamError",
                "errorMessage": "the streamed response body is malformed"});
            self.end_stream(st, meta.to_string().as_bytes());
            self.answer_and_close(i, 400, "InvalidRequest", "malformed streamed body");
            return Ok(false);
        }
        let done = st.body.is_done();
        if let Err(why) = self.relay_stream(&mut st, data, done) {
            let meta = serde_json::json!({"errorType": "Runtime.MalformedResponse",
                "errorMessage": why});
            self.end_stream(st, meta.to_string().as_bytes());
            self.answer_and_close(i, 400, "InvalidRequest", &why);
            return Ok(false);
        }
        if !done {
            self.conns[i].as_mut().expect("present").relay = Some(st);
            return Ok(false);
        }
        let meta = rapi::stream_end_meta(&st.body.trailers, st.raw);
        self.end_stream(st, &meta);
        let c = self.conns[i].as_mut().expect("present");
        c.head = None;
        c.closing |= head.close;
        self.reply(i, 202, br#"{"status":"OK"}"#)?;
        self.answered = Some(i);
        self.dispatch()?;
        Ok(true)
    }

    /// Sends the head (once known) and `data` as STREAM_CHUNKs; `done`: the
    /// body ended. `Err` says why the stream cannot go on.
    fn relay_stream(&self, st: &mut StreamIn, mut data: Vec<u8>, done: bool) -> Result<(), String> {
        let io = |e: io::Error| format!("writing to the host: {e}");
        if let Some(p) = st.prelude.as_mut() {
            p.append(&mut data);
            let end = p
                .windows(rapi::PRELUDE_END.len())
                .position(|w| w == rapi::PRELUDE_END);
            match end {
                Some(at) => {
                    let meta = rapi::stream_head_meta(None, Some(&p[..at]))?;
                    data = p.split_off(at + rapi::PRELUDE_END.len());
                    st.prelude = None;
                    self.send(FrameType::StreamHead, 0, st.frame_id, &meta, &[])
                        .map_err(io)?;
                    st.head_sent = true;
                }
                None if p.len() > rapi::PRELUDE_BYTES_MAX => {
                    return Err(format!(
                        "no end of the HTTP prelude in its first {} bytes",
                        rapi::PRELUDE_BYTES_MAX
                    ));
                }
                // A body that ended inside the prelude is sent as it is.
                None if done => data = st.prelude.take().expect("present"),
                None => return Ok(()),
            }
        }
        if !st.head_sent {
            let meta = rapi::stream_head_meta(st.content_type.as_deref(), None)?;
            self.send(FrameType::StreamHead, 0, st.frame_id, &meta, &[])
                .map_err(io)?;
            st.head_sent = true;
        }
        for piece in data.chunks(protocol::STREAM_CHUNK_BYTES_MAX) {
            self.send(FrameType::StreamChunk, 0, st.frame_id, &[], piece)
                .map_err(io)?;
        }
        Ok(())
    }

    /// Ends streamed response `st` with STREAM_END `meta` (or, failed before
    /// its head went out, an ERROR); the invocation is answered.
    fn end_stream(&mut self, st: StreamIn, meta: &[u8]) {
        let kind = match st.head_sent {
            true => FrameType::StreamEnd,
            false if meta == b"{}" => {
                let head =
                    rapi::stream_head_meta(st.content_type.as_deref(), None).expect("a plain head");
                let _ = self.send(FrameType::StreamHead, 0, st.frame_id, &head, &[]);
                FrameType::StreamEnd
            }
            false => FrameType::Error,
        };
        let _ = self.send(kind, 0, st.frame_id, meta, &[]);
        if self
            .current
            .as_ref()
            .is_some_and(|c| c.request_id == st.request_id)
        {
            self.current = None;
        }
        self.last_answered = Some(st.request_id);
    }

    /// A body over the limit: Lambda's 413; a response that big fails its invocation.
    fn too_large(&mut self, i: usize, route: &Route, head: &Head) -> io::Result<()> {
        let limit = match (route, head.body) {
            (Route::Response(_), _) => rapi::RESPONSE_BYTES_MAX,
            (_, BodyKind::Length(_) | BodyKind::Chunked) => rapi::ERROR_BYTES_MAX,
        };
        let msg = format!("Exceeded maximum allowed payload size ({limit} bytes).");
        if let Route::Response(id) = route {
            if self.current.as_ref().is_some_and(|c| &c.request_id == id) {
                let inv = self.current.take().expect("checked");
                let meta = serde_json::json!({
                    "errorType": "Function.ResponseSizeTooLarge",
                    "errorMessage": format!("Response payload size exceeded maximum allowed payload size ({limit} bytes)."),
                });
                self.send(
                    FrameType::Error,
                    0,
                    inv.frame_id,
                    meta.to_string().as_bytes(),
                    &[],
                )?;
                self.last_answered = Some(inv.request_id);
            }
            self.answer_and_close(i, 413, "Function.ResponseSizeTooLarge", &msg);
        } else {
            self.answer_and_close(i, 413, "RequestEntityTooLarge", &msg);
        }
        Ok(())
    }

    fn handle(&mut self, i: usize, route: Route, head: &Head, body: Vec<u8>) -> io::Result<()> {
        match route {
            Route::Next => {
                if self.current.is_some() {
                    return self.reply_error(
                        i,
                        403,
                        "InvalidStateTransition",
                        "an invocation is in progress: post its response or error first",
                    );
                }
                if self.state == State::Initialising {
                    self.init_ms = (self.started.elapsed().as_secs_f64() * 1e6).round() / 1e3;
                    self.state = State::Ready;
                    self.send_ready()?;
                }
                if let Some(old) = self.parked.replace(i) {
                    if old != i {
                        self.conns[old] = None;
                    }
                }
                self.dispatch()
            }
            Route::Response(id) | Route::Error(id) => {
                let is_response = head.target.ends_with("/response");
                let Some(inv) = self.current.as_ref().filter(|c| c.request_id == id) else {
                    return if self.last_answered.as_deref() == Some(id.as_str()) {
                        self.reply_error(
                            i,
                            403,
                            "InvalidStateTransition",
                            "the invocation was already answered",
                        )
                    } else {
                        self.reply_error(i, 400, "InvalidRequestID", "Invalid request ID")
                    };
                };
                let (frame_id, raw) = (inv.frame_id, inv.raw);
                if is_response {
                    match rapi::translate_response(&body, raw) {
                        Ok((meta, out)) if meta.len() <= protocol::META_BYTES_MAX => {
                            self.send(FrameType::Response, 0, frame_id, &meta, &out)?
                        }
                        Ok(_) => {
                            let meta = serde_json::json!({"errorType": "Runtime.MalformedResponse",
                                "errorMessage": "the response headers exceed the metadata limit"});
                            self.send(
                                FrameType::Error,
                                0,
                                frame_id,
                                meta.to_string().as_bytes(),
                                &[],
                            )?
                        }
                        Err(why) => {
                            let meta = serde_json::json!({"errorType": "Runtime.MalformedResponse",
                                "errorMessage": format!("cannot translate the handler result: {why}")});
                            self.send(
                                FrameType::Error,
                                0,
                                frame_id,
                                meta.to_string().as_bytes(),
                                &[],
                            )?
                        }
                    }
                } else {
                    let header = head.header("lambda-runtime-function-error-type");
                    let meta = rapi::error_meta(&body, header, raw);
                    self.send(FrameType::Error, 0, frame_id, &meta, &[])?;
                }
                self.current = None;
                self.last_answered = Some(id);
                self.reply(i, 202, br#"{"status":"OK"}"#)?;
                self.answered = Some(i);
                self.dispatch()
            }
            Route::InitError => {
                let header = head.header("lambda-runtime-function-error-type");
                let meta = rapi::error_meta(&body, header, false);
                if self.state == State::Initialising {
                    self.fail_init_meta(meta)?;
                    self.reply(i, 202, br#"{"status":"OK"}"#)
                } else {
                    self.reply_error(
                        i,
                        403,
                        "InvalidStateTransition",
                        "init/error is only accepted during init",
                    )
                }
            }
            Route::MethodNotAllowed => {
                self.reply_error(i, 405, "MethodNotAllowed", "method not allowed")
            }
            Route::NotFound => self.reply_error(i, 404, "NotFound", "no such Runtime API path"),
        }
    }

    /// Hands the next queued invocation to the parked `/next`, if both exist.
    fn dispatch(&mut self) -> io::Result<()> {
        if self.current.is_some() || self.state != State::Ready {
            return Ok(());
        }
        let Some(i) = self.parked else { return Ok(()) };
        let Some((frame_id, meta, body)) = self.queue.pop_front() else {
            return Ok(());
        };
        let f = self.function.as_ref().expect("ready implies HELLO");
        let now = sys::realtime_ms();
        let inv = rapi::invocation(&meta, &body, frame_id, f, now, &self.trace_id(now));
        let mut headers: Vec<(&str, &str)> = vec![("Content-Type", "application/json")];
        headers.extend(inv.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let bytes = http::response(200, &headers, &inv.event);
        self.parked = None;
        self.current = Some(inv);
        let c = self.conns[i].as_ref().expect("parked connections exist");
        if write_all(c.stream.as_raw_fd(), &bytes, CLIENT_WRITE_TIMEOUT_MS).is_err() {
            // The runtime will not see this invocation: fail it now.
            let inv = self.current.take().expect("set above");
            let meta = serde_json::json!({"errorType": "Runtime.InvalidState",
                "errorMessage": "the runtime's /next connection broke before the event was delivered"});
            self.send(
                FrameType::Error,
                0,
                inv.frame_id,
                meta.to_string().as_bytes(),
                &[],
            )?;
            self.drop_conn(i);
            return Ok(());
        }
        // Requests pipelined behind /next are served now.
        self.serve(i)
    }

    fn reply(&mut self, i: usize, status: u16, body: &[u8]) -> io::Result<()> {
        let Some(c) = self.conns[i].as_ref() else {
            return Ok(());
        };
        let bytes = http::response(status, &[("Content-Type", "application/json")], body);
        let closing = c.closing;
        if write_all(c.stream.as_raw_fd(), &bytes, CLIENT_WRITE_TIMEOUT_MS).is_err() || closing {
            self.drop_conn(i);
        }
        Ok(())
    }

    fn reply_error(
        &mut self,
        i: usize,
        status: u16,
        error_type: &str,
        msg: &str,
    ) -> io::Result<()> {
        self.reply(i, status, &rapi::error_doc(error_type, msg))
    }

    fn answer_and_close(&mut self, i: usize, status: u16, error_type: &str, msg: &str) {
        if let Some(c) = self.conns[i].as_mut() {
            c.closing = true;
        }
        let _ = self.reply_error(i, status, error_type, msg);
        self.drop_conn(i);
    }
}

/// Whether `head` posts a response in streaming mode.
fn is_streaming(route: &Route, head: &Head) -> bool {
    matches!(route, Route::Response(_))
        && head
            .header("lambda-runtime-function-response-mode")
            .is_some_and(|m| m.eq_ignore_ascii_case("streaming"))
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

/// Writes all of `buf` to a non-blocking fd, waiting for room up to
/// `timeout_ms` each time (-1: no limit).
fn write_all(fd: RawFd, mut buf: &[u8], timeout_ms: i32) -> io::Result<()> {
    while !buf.is_empty() {
        match sys::write(fd, buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let mut p = [libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                }];
                if sys::poll(&mut p, timeout_ms)? == 0 {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "write stalled"));
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// TCP_DEFER_ACCEPT: a listener reports a connection once data (or its end)
/// arrives, or after about `secs`.
fn set_defer_accept(fd: RawFd, secs: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt reads one c_int from the value we own.
    sys::cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&secs as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(drop)
}

/// SO_LINGER on with a zero timeout: `close` resets the connection.
fn linger_zero(fd: RawFd) -> io::Result<()> {
    let l = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt reads `size_of::<linger>()` bytes from the struct we own.
    sys::cvt(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&l as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    })
    .map(drop)
}

fn random_u64s() -> [u64; 2] {
    let mut b = [0u8; 16];
    // SAFETY: getrandom writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), libc::GRND_NONBLOCK) };
    if n != b.len() as isize {
        let t = sys::realtime_ms() ^ u64::from(std::process::id()) << 40;
        return [t, t.rotate_left(17) ^ 0x9e37_79b9_7f4a_7c15];
    }
    [
        u64::from_le_bytes(b[..8].try_into().expect("8 bytes")),
        u64::from_le_bytes(b[8..].try_into().expect("8 bytes")),
    ]
}

/// `2026/11/30/[$LATEST]<32 hex>`, as Lambda names log streams.
fn log_stream_name(now_ms: u64, r: [u64; 2]) -> String {
    let date = iso_time(now_ms);
    format!(
        "{}/{}/{}/[$LATEST]{:016x}{:016x}",
        &date[..4],
        &date[5..7],
        &date[8..10],
        r[0],
        r[1]
    )
}

/// "2026-11-30T18:40:00.123Z".
fn iso_time(ms: u64) -> String {
    let secs = (ms / 1000) as i64;
    let (y, m, d) = rapi::civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60,
        ms % 1000
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn early_next_looks_while_it_pays_and_probes_otherwise() {
        let mut e = EarlyNext::default();
        // Cold: one look in PROBE_EVERY.
        let looks = (0..32).filter(|_| e.try_now()).count();
        assert_eq!(looks, 2);
        // A find turns looking on; HIT misses in a row turn it off again.
        e.record(true);
        for _ in 0..EarlyNext::HIT {
            assert!(e.try_now());
            e.record(false);
        }
        assert!(!e.try_now());
        // One find in four keeps it on (4 - 3 > 0 per round).
        for _ in 0..10 {
            e.record(true);
            for _ in 0..3 {
                e.record(false);
            }
        }
        assert!(e.try_now());
    }

    #[test]
    fn times_and_stream_names() {
        assert_eq!(iso_time(1_764_466_718_123), "2025-11-30T01:38:38.123Z");
        assert_eq!(iso_time(0), "1970-01-01T00:00:00.000Z");
        let s = log_stream_name(1_764_466_718_123, [1, 2]);
        assert_eq!(s, "2025/11/30/[$LATEST]00000000000000010000000000000002");
    }
}
