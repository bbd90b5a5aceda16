//! The agent's runtime-API mode (`hearth-agent --runtime-api <kind>`): the
//! "runtime" on fd 3 for functions that are not Node.js. It speaks frames on
//! fd 3 exactly as the Node shim does, serves the Lambda Runtime API on
//! 127.0.0.1:9001, starts the function's bootstrap with the Lambda
//! environment on the first HELLO and translates between the two. What to
//! answer is decided by a `hearth_rapi::session::Session`; this file owns
//! the sockets, the bootstrap and the event loop.
//! READY goes out when the bootstrap first polls `/invocation/next`, so a
//! standby or snapshot holds an initialised runtime. The bootstrap's
//! stdout/stderr become LOG frames tagged with the invocation in flight.
//! When the bootstrap exits, so does this process, with its status.

use std::io::{self, Read};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

use hearth_rapi::session::{ConnId, Io, Session};

use crate::epoll::{Epoll, Ready};
use crate::protocol::{self, FrameDecoder, FrameType};
use crate::rapi::{self, Function, Kind};
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
    let _ = sys::set_defer_accept(listener.as_raw_fd(), 1);
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
        session: Session::new(kind, random_u64s()[0]),
        ends: Ends {
            epoll,
            channel,
            streams: Vec::new(),
            child: None,
            scratch: vec![0; 64 << 10].into_boxed_slice(),
            out: Vec::new(),
        },
        decoder: FrameDecoder::new(),
        listener,
        early_next: EarlyNext::default(),
    };
    match server.run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("hearth runtime-api: {e}");
            server.ends.kill_child();
            2
        }
    }
}

/// Bytes read from one Runtime API connection per turn of the loop, so a
/// streaming bootstrap is relayed at the pace the host takes it.
const CONN_READ_BYTES_MAX: usize = 256 << 10;

struct Child {
    pid: libc::pid_t,
    /// Registered in the event set (readable once the child exits): held, not read.
    _pidfd: OwnedFd,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

/// The mode's event loop: the sockets and the bootstrap around a [`Session`].
struct Server {
    session: Session,
    ends: Ends,
    decoder: FrameDecoder,
    listener: TcpListener,
    early_next: EarlyNext,
}

/// What the session acts on: the channel, the connections (by the session's
/// slot numbers) and the bootstrap, every fd registered once in one epoll set.
struct Ends {
    epoll: Epoll,
    channel: OwnedFd,
    streams: Vec<Option<TcpStream>>,
    child: Option<Child>,
    /// Where connection and output reads land: allocated once, as zeroing a
    /// fresh 64 KiB per read cost more than the rest of a read.
    scratch: Box<[u8]>,
    /// The encoding buffer of outgoing frames, kept between frames.
    out: Vec<u8>,
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
            self.ends.epoll.wait(&mut ready, -1)?;
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
                    self.ends
                        .pump_output(stderr, false, self.session.log_tag())?;
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
                self.ends.kill_child();
                return Ok(0);
            }
            if fixed[TOKEN_PIDFD as usize] {
                if let Some(code) = self.on_child_exit()? {
                    return Ok(code);
                }
            }
        }
    }

    /// Reads the channel and hands its frames to the session; false at end of file.
    fn on_channel(&mut self) -> io::Result<bool> {
        const CHUNK: usize = 64 << 10;
        loop {
            let got = sys::read(self.ends.channel.as_raw_fd(), self.decoder.spare(CHUNK));
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
            self.session.on_frame(
                &mut self.ends,
                frame.kind,
                frame.request_id,
                &frame.meta,
                frame.body,
            )?;
        }
    }

    /// The bootstrap exited: report it as Lambda does and give its status.
    fn on_child_exit(&mut self) -> io::Result<Option<i32>> {
        let Some(pid) = self.ends.child.as_ref().map(|c| c.pid) else {
            return Ok(None);
        };
        let mut status = 0;
        // SAFETY: waits for our own child without blocking.
        let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if r != pid {
            return Ok(None);
        }
        let exit = RuntimeExit::from_wait_status(status);
        let tag = self.session.log_tag();
        self.ends.pump_output(false, true, tag)?;
        self.ends.pump_output(true, true, tag)?;
        self.session
            .on_exit(&mut self.ends, &exit.lambda_message())?;
        self.ends.child = None;
        Ok(Some(match exit {
            RuntimeExit::Code(c) => c,
            RuntimeExit::Signal(s) => 128 + s,
        }))
    }

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
            // Over the limit: dropping `stream` closes it.
            let Some(i) = self.session.open() else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            if let Err(e) = self.ends.epoll.add(fd, TOKEN_CONN + i as u64) {
                drop(stream);
                self.session.closed(&mut self.ends, i);
                eprintln!("hearth runtime-api: {e}");
                continue;
            }
            let streams = &mut self.ends.streams;
            if streams.len() <= i {
                streams.resize_with(i + 1, || None);
            }
            streams[i] = Some(stream);
            self.on_conn(i)?;
        }
    }

    /// Reads connection `i` and serves what came. When that answered an
    /// invocation (202), the runtime's next `/next` is often already on its
    /// way: one more read, which costs a failed `recvfrom` when it is not
    /// there, serves it in this wake-up instead of the next.
    fn on_conn(&mut self, i: usize) -> io::Result<()> {
        if self.read_conn(i).is_none() {
            return Ok(());
        }
        if self.session.serve(&mut self.ends, i)? && self.early_next.try_now() {
            let got = self.read_conn(i);
            self.early_next.record(got.is_some_and(|n| n > 0));
            if got.is_some() {
                self.session.serve(&mut self.ends, i)?;
            }
        }
        Ok(())
    }

    /// Reads what connection `i` has into the session: the bytes read, `None`
    /// if it is gone.
    fn read_conn(&mut self, i: usize) -> Option<usize> {
        let mut read = 0;
        while read < CONN_READ_BYTES_MAX {
            let stream = self.ends.streams.get_mut(i)?.as_mut()?;
            match stream.read(&mut self.ends.scratch) {
                Ok(0) => {
                    // The runtime closed it (hyper's pool closes the spare connections
                    // it opens when a request races a connection's return to the pool,
                    // about one in five requests): close with a reset rather than a
                    // FIN, which would put its orphaned end through TIME_WAIT, the
                    // dearest part of the close.
                    let _ = linger_zero(stream.as_raw_fd());
                    self.session.closed(&mut self.ends, i);
                    return None;
                }
                Ok(n) => {
                    self.session.received(i, &self.ends.scratch[..n]);
                    read += n;
                    if n < self.ends.scratch.len() {
                        break; // drained, as above
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.session.closed(&mut self.ends, i);
                    return None;
                }
            }
        }
        Some(read)
    }
}

impl Ends {
    /// Turns what the bootstrap wrote into LOG frames tagged `tag`; with
    /// `to_end`, reads until end of file (the bootstrap is gone).
    fn pump_output(&mut self, stderr: bool, to_end: bool, tag: u32) -> io::Result<()> {
        let mut buf = std::mem::take(&mut self.scratch);
        let pumped = self.pump_into(&mut buf[..LOG_CHUNK], stderr, to_end, tag);
        self.scratch = buf;
        pumped
    }

    fn pump_into(
        &mut self,
        buf: &mut [u8],
        stderr: bool,
        to_end: bool,
        tag: u32,
    ) -> io::Result<()> {
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
                Ok(n) => self.frame(FrameType::Log, flags, tag, &[], &buf[..n])?,
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

    fn kill_child(&mut self) {
        if let Some(c) = self.child.take() {
            // SAFETY: our own child, not yet reaped; then reap it.
            unsafe {
                libc::kill(c.pid, libc::SIGKILL);
                libc::waitpid(c.pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

impl Io for Ends {
    fn frame(
        &mut self,
        kind: FrameType,
        flags: u8,
        id: u32,
        meta: &[u8],
        body: &[u8],
    ) -> io::Result<()> {
        let mut out = std::mem::take(&mut self.out);
        out.clear();
        protocol::encode(&mut out, kind, flags, id, meta, body);
        let written = write_all(self.channel.as_raw_fd(), &out, -1);
        if out.capacity() <= LOG_CHUNK * 2 {
            self.out = out;
        }
        written
    }

    fn write(&mut self, conn: ConnId, bytes: &[u8]) -> bool {
        match self.streams.get(conn).and_then(Option::as_ref) {
            Some(s) => write_all(s.as_raw_fd(), bytes, CLIENT_WRITE_TIMEOUT_MS).is_ok(),
            None => false,
        }
    }

    fn close(&mut self, conn: ConnId) {
        if let Some(slot) = self.streams.get_mut(conn) {
            *slot = None;
        }
    }

    fn spawn(&mut self, kind: Kind, f: &Function, argv: &[String]) -> io::Result<()> {
        let inherited: Vec<(String, String)> = std::env::vars().collect();
        let stream = log_stream_name(sys::realtime_ms(), random_u64s());
        let env = f.environment(kind, inherited, &stream);
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

    fn realtime_ms(&self) -> u64 {
        sys::realtime_ms()
    }
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

pub fn random_u64s() -> [u64; 2] {
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
pub fn log_stream_name(now_ms: u64, r: [u64; 2]) -> String {
    let date = rapi::iso_time(now_ms);
    format!(
        "{}/{}/{}/[$LATEST]{:016x}{:016x}",
        &date[..4],
        &date[5..7],
        &date[8..10],
        r[0],
        r[1]
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
    fn stream_names() {
        let s = log_stream_name(1_764_466_718_123, [1, 2]);
        assert_eq!(s, "2025/11/30/[$LATEST]00000000000000010000000000000002");
    }
}
