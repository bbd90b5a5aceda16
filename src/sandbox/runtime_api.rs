//! The Lambda Runtime API served by hearth itself (process backend, runtimes
//! other than Node.js): the runtime's HTTP connections to 127.0.0.1:9001 end in
//! hearth, not in a relay process inside the sandbox.
//!
//! The sandbox's agent (PID 1, in the sandbox's network namespace) binds the
//! listener and makes the bootstrap's stdout/stderr sockets before any code of
//! the function runs, and passes them in one SCM_RIGHTS message on the channel
//! ([`receive_fds`] checks what they are). [`start`] then serves the start-up
//! on a starter thread: HELLO (the agent starts the bootstrap on it), the
//! runtime's requests until its first `/next` (READY), as the relay did. What
//! comes out is a [`Served`]: the [`Session`] (crates/rapi) with every fd, which
//! the owning core's event loop drives from then on (`engine::worker`), and
//! which moves with the instance between cores.
//!
//! The agent keeps only the channel, on which it reports the bootstrap's exit
//! (an EXIT frame) before it exits itself.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use hearth_rapi::api::{Function, Kind};
use hearth_rapi::session::{ConnId, Io, Session};

use crate::protocol::{self, FrameDecoder, FrameType};
use crate::sandbox::handshake::{self, OutputTail};
use crate::sandbox::{InitLogs, StartError};
use crate::spec::FunctionSpec;

/// Longest a write to a Runtime API connection may stall during start-up
/// (and never past the start-up deadline).
const START_WRITE_TIMEOUT_MS: i32 = 10_000;
/// Connections accepted per turn of the start-up loop (a runtime connecting
/// without pause cannot keep one turn going).
const ACCEPTS_PER_TURN: usize = 64;
/// Bytes read from one fd per turn of the start-up loop.
const READ_BYTES: usize = 64 << 10;
/// LOG frame bodies are cut at this size (as the relay's).
pub const LOG_CHUNK_BYTES: usize = 64 << 10;

/// One instance's Runtime API as hearth serves it: the session and its fds.
pub struct Served {
    pub session: Session,
    /// To the agent: EXIT arrives here; end of file means the sandbox is gone.
    pub channel: OwnedFd,
    /// 127.0.0.1:9001 in the sandbox's network namespace.
    pub listener: OwnedFd,
    /// Open Runtime API connections, by the session's [`ConnId`].
    pub conns: Vec<Option<OwnedFd>>,
    /// The bootstrap's stdout and stderr (host ends of socket pairs).
    pub output: [Option<OwnedFd>; 2],
    /// Encoded frames for the scheduler not yet handed to it.
    pub frames: Vec<u8>,
    /// Bytes read from the channel and not yet decoded.
    pub channel_leftover: Vec<u8>,
    /// Answers queued on connections and not yet written (an instance moving
    /// between cores takes them along).
    pub conn_unsent: Vec<(ConnId, Vec<u8>)>,
}

/// Reads the agent's SCM_RIGHTS message (listener, stdout, stderr) from
/// `channel`, waiting up to `timeout`, and checks each fd is what it must be.
pub fn receive_fds(channel: BorrowedFd<'_>, timeout: Duration) -> Result<[OwnedFd; 3], StartError> {
    let fd = channel.as_raw_fd();
    let mut p = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid descriptor.
    if unsafe { libc::poll(&mut p, 1, timeout.as_millis() as i32) } <= 0 {
        return Err(StartError::NotReady { waited: timeout });
    }
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = [0u64; 16];
    // SAFETY: msghdr is plain data; zeroed is an empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: `msg` points at live buffers; CLOEXEC on every received fd.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(StartError::io(
            "receive runtime api fds",
            io::Error::last_os_error(),
        ));
    }
    if n == 0 {
        return Err(StartError::Exited { output: Vec::new() });
    }
    let mut got: Vec<OwnedFd> = Vec::new();
    // SAFETY: CMSG_* walk the control buffer the kernel filled (msg_controllen
    // says how much); every fd in an SCM_RIGHTS message is new and ours.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(c) as *const RawFd;
                let count = ((*c).cmsg_len as usize - libc::CMSG_LEN(0) as usize)
                    / std::mem::size_of::<RawFd>();
                for k in 0..count {
                    got.push(OwnedFd::from_raw_fd(std::ptr::read_unaligned(data.add(k))));
                }
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let bad = |what: String| StartError::io("runtime api fds", io::Error::other(what));
    if msg.msg_flags & libc::MSG_CTRUNC != 0 || got.len() != 3 {
        return Err(bad(format!("expected 3 descriptors, got {}", got.len())));
    }
    let [listener, out, err]: [OwnedFd; 3] = got.try_into().expect("3 checked");
    if sockopt(&listener, libc::SO_DOMAIN) != Some(libc::AF_INET)
        || sockopt(&listener, libc::SO_ACCEPTCONN) != Some(1)
    {
        return Err(bad("the first is not a listening TCP socket".into()));
    }
    for o in [&out, &err] {
        if sockopt(o, libc::SO_DOMAIN) != Some(libc::AF_UNIX) {
            return Err(bad("an output descriptor is not a Unix socket".into()));
        }
    }
    for f in [&listener, &out, &err] {
        set_nonblocking(f.as_raw_fd()).map_err(|e| StartError::io("runtime api fds", e))?;
    }
    Ok([listener, out, err])
}

/// Serves the start of a runtime of `kind` on `channel` (blocking, up to
/// `timeout`): sends HELLO, answers the runtime until its first `/next`.
/// Returns the session ready for invocations, the init duration and the
/// start-up output.
pub fn start(
    channel: OwnedFd,
    fds: [OwnedFd; 3],
    kind: Kind,
    spec: &FunctionSpec,
    timeout: Duration,
) -> Result<(Served, f64, InitLogs), StartError> {
    let [listener, out, err] = fds;
    set_nonblocking(channel.as_raw_fd()).map_err(|e| StartError::io("channel", e))?;
    // Every wait below ends by this deadline, within a turn too.
    let deadline = Instant::now() + timeout;
    let hello_meta = handshake::hello_meta(spec);
    let mut hello = Vec::new();
    protocol::encode(&mut hello, FrameType::Hello, 0, 0, &hello_meta, &[]);
    write_all(channel.as_raw_fd(), &hello, deadline)
        .map_err(|e| StartError::io("send hello", e))?;
    let mut served = Served {
        session: Session::new(kind, crate::util::random::random_u64()),
        channel,
        listener,
        conns: Vec::new(),
        output: [Some(out), Some(err)],
        frames: Vec::new(),
        channel_leftover: Vec::new(),
        conn_unsent: Vec::new(),
    };
    let mut run = Starting {
        served: &mut served,
        logs: OutputTail::new(
            handshake::INIT_TAIL_LINES_MAX,
            handshake::INIT_TAIL_BYTES_MAX,
            handshake::INIT_LINE_BYTES_MAX,
        ),
        decoder: FrameDecoder::new(),
        buf: vec![0; READ_BYTES],
        deadline,
    };
    run.on_hello(&hello_meta)?;
    loop {
        if let Some(done) = run.outcome()? {
            let logs = run.logs.into_lines();
            return Ok((served, done, logs));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(StartError::NotReady { waited: timeout });
        }
        run.turn(left)?;
    }
}

/// The start-up loop's state.
struct Starting<'a> {
    served: &'a mut Served,
    logs: OutputTail,
    decoder: FrameDecoder,
    buf: Vec<u8>,
    /// The end of start-up: no wait goes past it.
    deadline: Instant,
}

impl Starting<'_> {
    fn on_hello(&mut self, meta: &[u8]) -> Result<(), StartError> {
        let s = &mut *self.served;
        let mut io = StartIo {
            conns: &mut s.conns,
            frames: &mut s.frames,
            until: self.deadline,
        };
        s.session
            .on_frame(&mut io, FrameType::Hello, 0, meta, Vec::new())
            .map_err(|e| StartError::io("runtime api", e))
    }

    /// READY's init duration once the session sent it; INIT_ERROR as an error.
    fn outcome(&mut self) -> Result<Option<f64>, StartError> {
        let frames = std::mem::take(&mut self.served.frames);
        let mut dec = FrameDecoder::new();
        dec.push(&frames);
        while let Some(f) = dec.next_frame().map_err(StartError::Protocol)? {
            match f.kind {
                FrameType::Ready => {
                    let meta: serde_json::Value =
                        serde_json::from_slice(&f.meta).unwrap_or_default();
                    let init_ms = meta["init_ms"].as_f64().unwrap_or(0.0);
                    self.logs
                        .push(format!("INIT_REPORT Init Duration: {init_ms:.2} ms").as_bytes());
                    return Ok(Some(init_ms));
                }
                FrameType::InitError => {
                    let logs = std::mem::replace(&mut self.logs, OutputTail::new(1, 1, 1));
                    return Err(handshake::init_error(
                        &f.meta,
                        "the runtime failed to start",
                        logs.into_lines(),
                    ));
                }
                FrameType::Log => self.logs.push(&f.body),
                other => return Err(StartError::Unexpected(other)),
            }
        }
        Ok(None)
    }

    /// One poll over every fd and what it made ready.
    fn turn(&mut self, left: Duration) -> Result<(), StartError> {
        let s = &mut *self.served;
        let mut fds = vec![
            pollfd(s.channel.as_raw_fd()),
            pollfd(s.listener.as_raw_fd()),
        ];
        for o in &s.output {
            fds.push(pollfd(o.as_ref().map_or(-1, |f| f.as_raw_fd())));
        }
        for c in &s.conns {
            fds.push(pollfd(c.as_ref().map_or(-1, |f| f.as_raw_fd())));
        }
        let ms = left.as_millis().min(1000) as i32 + 1;
        // SAFETY: poll over the array we own; negative fds are ignored.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
        if n <= 0 {
            return Ok(());
        }
        let ready = |k: usize| fds[k].revents != 0;
        // Output first, so lines written before a request are kept before its effect.
        for k in 0..2 {
            if ready(2 + k) {
                self.read_output(k);
            }
        }
        for i in 0..fds.len() - 4 {
            if ready(4 + i) {
                self.read_conn(i)?;
            }
        }
        if ready(1) {
            self.accept()?;
        }
        if ready(0) {
            self.read_channel()?;
        }
        Ok(())
    }

    fn read_output(&mut self, k: usize) {
        let Some(fd) = &self.served.output[k] else {
            return;
        };
        match read(fd.as_raw_fd(), &mut self.buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Ok(0) | Err(_) => self.served.output[k] = None,
            Ok(n) => self.logs.push(&self.buf[..n]),
        }
    }

    fn read_conn(&mut self, i: ConnId) -> Result<(), StartError> {
        let s = &mut *self.served;
        let Some(fd) = s.conns.get(i).and_then(Option::as_ref) else {
            return Ok(());
        };
        let got = read(fd.as_raw_fd(), &mut self.buf);
        let mut io = StartIo {
            conns: &mut s.conns,
            frames: &mut s.frames,
            until: self.deadline,
        };
        match got {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Ok(0) | Err(_) => s.session.closed(&mut io, i),
            Ok(n) => {
                s.session.received(i, &self.buf[..n]);
                s.session
                    .serve(&mut io, i)
                    .map_err(|e| StartError::io("runtime api", e))?;
            }
        }
        Ok(())
    }

    fn accept(&mut self) -> Result<(), StartError> {
        for _ in 0..ACCEPTS_PER_TURN {
            if Instant::now() >= self.deadline {
                break;
            }
            let Some(fd) = accept(self.served.listener.as_raw_fd()) else {
                break;
            };
            let s = &mut *self.served;
            let Some(i) = s.session.open() else {
                continue; // over the limit: dropping closes it
            };
            if s.conns.len() <= i {
                s.conns.resize_with(i + 1, || None);
            }
            s.conns[i] = Some(fd);
            self.read_conn(i)?;
        }
        Ok(())
    }

    /// The agent's channel during start-up: EXIT (the bootstrap died) or its end.
    fn read_channel(&mut self) -> Result<(), StartError> {
        let s = &mut *self.served;
        let spare = self.decoder.spare(READ_BYTES);
        let got = read(s.channel.as_raw_fd(), spare);
        self.decoder.filled(READ_BYTES, *got.as_ref().unwrap_or(&0));
        let mut io = StartIo {
            conns: &mut s.conns,
            frames: &mut s.frames,
            until: self.deadline,
        };
        match got {
            Ok(0) => {
                s.session
                    .on_exit(&mut io, "Runtime exited without providing a reason")
                    .map_err(|e| StartError::io("runtime api", e))?;
                if s.frames.is_empty() {
                    return Err(StartError::Exited {
                        output: std::mem::replace(&mut self.logs, OutputTail::new(1, 1, 1))
                            .into_lines(),
                    });
                }
                Ok(())
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) => Err(StartError::io("read channel", e)),
            Ok(_) => {
                while let Some(f) = self.decoder.next_frame().map_err(StartError::Protocol)? {
                    if f.kind != FrameType::Exit {
                        return Err(StartError::Unexpected(f.kind));
                    }
                    let message = String::from_utf8_lossy(&f.body).into_owned();
                    s.session
                        .on_exit(&mut io, &message)
                        .map_err(|e| StartError::io("runtime api", e))?;
                }
                Ok(())
            }
        }
    }
}

/// The session's outputs during start-up: frames are collected, connection
/// writes block (within [`START_WRITE_TIMEOUT_MS`] and until `until`).
struct StartIo<'a> {
    conns: &'a mut Vec<Option<OwnedFd>>,
    frames: &'a mut Vec<u8>,
    until: Instant,
}

impl Io for StartIo<'_> {
    fn frame(
        &mut self,
        kind: FrameType,
        flags: u8,
        id: u32,
        meta: &[u8],
        body: &[u8],
    ) -> io::Result<()> {
        protocol::encode(self.frames, kind, flags, id, meta, body);
        Ok(())
    }

    fn write(&mut self, conn: ConnId, bytes: &[u8]) -> bool {
        match self.conns.get(conn).and_then(Option::as_ref) {
            Some(fd) => write_all(fd.as_raw_fd(), bytes, self.until).is_ok(),
            None => false,
        }
    }

    fn close(&mut self, conn: ConnId) {
        if let Some(slot) = self.conns.get_mut(conn) {
            *slot = None;
        }
    }

    /// The agent starts the bootstrap when it reads the same HELLO.
    fn spawn(&mut self, _kind: Kind, _f: &Function, _argv: &[String]) -> io::Result<()> {
        Ok(())
    }

    fn realtime_ms(&self) -> u64 {
        crate::util::time::unix_time_ms()
    }
}

fn pollfd(fd: RawFd) -> libc::pollfd {
    libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }
}

fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: reading into a buffer we own, at most its length.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Writes all of `buf` to a non-blocking fd, waiting for room up to
/// [`START_WRITE_TIMEOUT_MS`] each time and never past `until`.
fn write_all(fd: RawFd, mut buf: &[u8], until: Instant) -> io::Result<()> {
    while !buf.is_empty() {
        // SAFETY: writing from a buffer we own; MSG_NOSIGNAL avoids SIGPIPE.
        let n = unsafe { libc::send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL) };
        if n >= 0 {
            buf = &buf[n as usize..];
            continue;
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => {
                let left = until.saturating_duration_since(Instant::now());
                let ms = left.as_millis().min(START_WRITE_TIMEOUT_MS as u128) as i32;
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLOUT,
                    revents: 0,
                };
                // SAFETY: poll on one valid descriptor.
                if ms == 0 || unsafe { libc::poll(&mut p, 1, ms) } == 0 {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "write stalled"));
                }
            }
            _ => return Err(e),
        }
    }
    Ok(())
}

/// A waiting connection, non-blocking and close-on-exec, or `None`.
pub fn accept(listener: RawFd) -> Option<OwnedFd> {
    loop {
        // SAFETY: accept4 with null address pointers returns a new fd or -1.
        let fd = unsafe {
            libc::accept4(
                listener,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            )
        };
        if fd >= 0 {
            crate::util::sock::set_nodelay(fd);
            // SAFETY: a new descriptor from accept4, owned by nobody else.
            return Some(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return None;
        }
    }
}

fn sockopt(fd: &OwnedFd, name: libc::c_int) -> Option<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `v`.
    let r = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            name,
            (&mut v as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    (r == 0).then_some(v)
}

fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use std::os::unix::net::UnixStream;

    /// Sends one byte with `fds` attached, as the agent does.
    fn send_fds(to: &UnixStream, fds: &[RawFd]) {
        let payload = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: payload.as_ptr() as *mut libc::c_void,
            iov_len: 1,
        };
        let bytes = std::mem::size_of_val(fds);
        let mut control = [0u64; 16];
        // SAFETY: zeroed msghdr is empty; the control buffer has room for a
        // header and three fds; CMSG_* compute pointers into it.
        unsafe {
            let mut msg: libc::msghdr = std::mem::zeroed();
            msg.msg_iov = &mut iov;
            msg.msg_iovlen = 1;
            msg.msg_control = control.as_mut_ptr().cast();
            msg.msg_controllen = libc::CMSG_SPACE(bytes as u32) as _;
            let c = libc::CMSG_FIRSTHDR(&msg);
            (*c).cmsg_level = libc::SOL_SOCKET;
            (*c).cmsg_type = libc::SCM_RIGHTS;
            (*c).cmsg_len = libc::CMSG_LEN(bytes as u32) as _;
            std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
            assert_eq!(libc::sendmsg(to.as_raw_fd(), &msg, 0), 1);
        }
    }

    #[test]
    fn the_agents_descriptors_are_checked() {
        let wait = Duration::from_secs(1);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let (out, _o) = UnixStream::pair().unwrap();
        let (err, _e) = UnixStream::pair().unwrap();
        let (host, agent) = UnixStream::pair().unwrap();
        send_fds(
            &agent,
            &[listener.as_raw_fd(), out.as_raw_fd(), err.as_raw_fd()],
        );
        assert!(receive_fds(host.as_fd(), wait).is_ok());
        // A connected socket where the listener belongs, or too few descriptors: refused.
        send_fds(&agent, &[out.as_raw_fd(), out.as_raw_fd(), err.as_raw_fd()]);
        let e = receive_fds(host.as_fd(), wait).err().unwrap();
        assert!(e.to_string().contains("not a listening TCP socket"), "{e}");
        send_fds(&agent, &[listener.as_raw_fd()]);
        let e = receive_fds(host.as_fd(), wait).err().unwrap();
        assert!(
            e.to_string().contains("expected 3 descriptors, got 1"),
            "{e}"
        );
        // A frame instead of the descriptors (an agent without the mode).
        std::io::Write::write_all(&mut &agent, b"HRTH").unwrap();
        let e = receive_fds(host.as_fd(), wait).err().unwrap();
        assert!(e.to_string().contains("got 0"), "{e}");
    }

    /// A runtime that sends requests without end and never reads the answers
    /// cannot hold the starting thread past the start-up deadline: the
    /// answers' writes end with it (before, each write waited up to 10 s).
    #[test]
    fn a_runtime_that_never_reads_its_answers_fails_at_the_deadline() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let (out, _o) = UnixStream::pair().unwrap();
        let (err, _e) = UnixStream::pair().unwrap();
        let (host, _agent) = UnixStream::pair().unwrap();
        let runtime = std::thread::spawn(move || {
            let mut c = std::net::TcpStream::connect(addr).unwrap();
            c.set_write_timeout(Some(Duration::from_secs(30))).unwrap();
            let requests = b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n".repeat(256);
            while std::io::Write::write_all(&mut c, &requests).is_ok() {}
        });
        let spec = FunctionSpec {
            id: "0123456789abcdef".into(),
            handler: "bootstrap".into(),
            memory_mb: 128,
            timeout_ms: 3000,
            concurrency: 1,
            env: Vec::new(),
            created_ms: 0,
            code_bytes: 0,
            backend: "process".into(),
            name: None,
            service: Default::default(),
            runtime: Default::default(),
        };
        let fds = [listener.into(), out.into(), err.into()];
        let timeout = Duration::from_secs(1);
        let t = Instant::now();
        let r = start(host.into(), fds, Kind::Provided, &spec, timeout);
        let took = t.elapsed();
        assert!(
            matches!(r, Err(StartError::NotReady { .. })),
            "{:?}",
            r.err()
        );
        // Well below the 10 s a single write used to wait, with room for a
        // loaded machine past the 1 s deadline.
        assert!(
            took < timeout + Duration::from_secs(5),
            "start took {took:?}"
        );
        runtime.join().unwrap();
    }
}
