//! The io_uring driver: one ring per worker, multishot accept, one recv and at
//! most one send in flight per stream, all submitted in one `io_uring_enter`
//! per loop turn together with the wait for completions.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Instant;

use io_uring::{cqueue, opcode, squeue, types, IoUring};

use crate::engine::rapi::Role;
use crate::engine::spin::SpinWait;
use crate::engine::stream::Kind;
use crate::engine::worker::{Token, Worker};
use crate::engine::{peer_of, AcceptBackoff};
use crate::util::sock::set_nodelay;

const RING_ENTRIES: u32 = 4096;
/// Bytes one recv may return on a client connection.
const CLIENT_RECV_BYTES: usize = 16 * 1024;
/// Bytes one recv may return on an instance channel (bodies up to 6 MiB pass through).
const CHANNEL_RECV_BYTES: usize = 256 * 1024;

const OP_ACCEPT: u64 = 1;
const OP_RECV: u64 = 2;
const OP_SEND: u64 = 3;
const OP_WAKE: u64 = 4;
/// Completion of a cancel request (nothing to do: the cancelled recv completes on its own).
const OP_CANCEL: u64 = 5;
const LISTENER: u64 = u64::MAX >> 8;

fn ud(tok: u64, op: u64) -> u64 {
    (tok << 8) | op
}

/// Checks that a ring with the features we use can be created.
pub fn probe() -> io::Result<()> {
    let ring = new_ring(8)?;
    let mut probe = io_uring::Probe::new();
    ring.submitter().register_probe(&mut probe)?;
    for (code, name) in [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::Recv::CODE, "recv"),
        (opcode::Send::CODE, "send"),
    ] {
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("io_uring lacks {name}"),
            ));
        }
    }
    if !ring.params().is_feature_ext_arg() {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "io_uring lacks EXT_ARG (kernel < 5.11)",
        ));
    }
    Ok(())
}

fn new_ring(entries: u32) -> io::Result<IoUring> {
    IoUring::builder()
        .setup_single_issuer()
        .setup_defer_taskrun()
        .setup_taskrun_flag()
        .build(entries)
        .or_else(|_| {
            IoUring::builder()
                .setup_single_issuer()
                .setup_coop_taskrun()
                .setup_taskrun_flag()
                .build(entries)
        })
        .or_else(|_| IoUring::new(entries))
}

struct Driver {
    ring: IoUring,
    listener: Option<OwnedFd>,
    accept_armed: bool,
    accept_backoff: AcceptBackoff,
    waker: RawFd,
    wake_buf: Box<u64>,
}

impl Driver {
    fn push(&mut self, e: squeue::Entry) {
        // SAFETY: every buffer referenced by an entry lives in a stream (or the driver)
        // that is not freed or reallocated until the entry's completion arrives.
        while unsafe { self.ring.submission().push(&e) }.is_err() {
            let _ = self.ring.submit();
        }
    }

    fn arm_accept(&mut self) {
        if let Some(l) = &self.listener {
            if !self.accept_armed {
                let e = opcode::AcceptMulti::new(types::Fd(l.as_raw_fd()))
                    .flags(libc::SOCK_CLOEXEC)
                    .build()
                    .user_data(ud(LISTENER, OP_ACCEPT));
                self.push(e);
                self.accept_armed = true;
            }
        }
    }

    fn arm_wake(&mut self) {
        let ptr = &mut *self.wake_buf as *mut u64 as *mut u8;
        let e = opcode::Read::new(types::Fd(self.waker), ptr, 8)
            .build()
            .user_data(ud(0, OP_WAKE));
        self.push(e);
    }

    /// Issues the I/O a stream needs after the logic touched it.
    fn service(&mut self, w: &mut Worker, tok: Token) {
        w.close_step(tok);
        let Some(s) = w.streams.get_mut(tok) else {
            return;
        };
        if s.detaching {
            if s.recv_inflight && !s.cancel_sent {
                s.cancel_sent = true;
                let e = opcode::AsyncCancel::new(ud(tok as u64, OP_RECV))
                    .build()
                    .user_data(ud(tok as u64, OP_CANCEL));
                self.push(e);
            }
            if !s.recv_inflight && !s.send_inflight {
                w.detached(tok);
            }
            return;
        }
        if s.dead {
            if !s.recv_inflight && !s.send_inflight {
                w.free(tok);
            } else if s.is_pipe() {
                // A pipe cannot be shut down: cancel what is in flight instead.
                if !s.cancel_sent {
                    s.cancel_sent = true;
                    let inflight = [(s.recv_inflight, OP_RECV), (s.send_inflight, OP_SEND)];
                    for (_, op) in inflight.into_iter().filter(|(busy, _)| *busy) {
                        let e = opcode::AsyncCancel::new(ud(tok as u64, op))
                            .build()
                            .user_data(ud(tok as u64, OP_CANCEL));
                        self.push(e);
                    }
                }
            } else {
                // Makes in-flight operations complete so the entry can be freed.
                // SAFETY: shutdown on a descriptor we own.
                unsafe { libc::shutdown(s.raw(), libc::SHUT_RDWR) };
            }
            return;
        }
        if !s.send_inflight && s.sending.is_empty() && !s.wbuf.is_empty() {
            std::mem::swap(&mut s.sending, &mut s.wbuf);
            s.sent = 0;
        }
        if !s.send_inflight && s.sent < s.sending.len() {
            let rest = &s.sending[s.sent..];
            let e = if s.is_pipe() {
                // Offset -1: a pipe has no position.
                opcode::Write::new(types::Fd(s.wraw()), rest.as_ptr(), rest.len() as u32)
                    .offset(u64::MAX)
                    .build()
            } else {
                opcode::Send::new(types::Fd(s.raw()), rest.as_ptr(), rest.len() as u32)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
            };
            let e = e.user_data(ud(tok as u64, OP_SEND));
            s.send_inflight = true;
            self.push(e);
        }
        let s = &mut w.streams[tok];
        if !s.recv_inflight && !s.read_paused && is_listener(&s.kind) {
            // An instance's Runtime API listener: one accept at a time, its
            // completion handled as this stream's "recv".
            let e = opcode::Accept::new(
                types::Fd(s.raw()),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(ud(tok as u64, OP_RECV));
            s.recv_inflight = true;
            self.push(e);
            return;
        }
        if !s.recv_inflight && !s.read_paused {
            let want = match s.kind {
                Kind::Client(_) => CLIENT_RECV_BYTES,
                Kind::Channel(_) | Kind::Rapi(..) => CHANNEL_RECV_BYTES,
            };
            if s.recv_buf.capacity() < want {
                s.recv_buf = Vec::with_capacity(want);
            }
            let (fd, buf) = (types::Fd(s.raw()), s.recv_buf.as_mut_ptr());
            let e = if s.is_pipe() {
                opcode::Read::new(fd, buf, want as u32)
                    .offset(u64::MAX)
                    .build()
            } else {
                opcode::Recv::new(fd, buf, want as u32).build()
            };
            let e = e.user_data(ud(tok as u64, OP_RECV));
            s.recv_inflight = true;
            self.push(e);
        }
    }

    fn on_accept(&mut self, w: &mut Worker, res: i32, flags: u32) {
        if !cqueue::more(flags) {
            self.accept_armed = false;
        }
        if res < 0 {
            // Once draining, the listener was shut down: the error is expected.
            if self.listener.is_some()
                && !self.accept_backoff.on_error(w.core, -res, w.now)
                && !matches!(
                    -res,
                    libc::EAGAIN | libc::EINTR | libc::ECONNABORTED | libc::ECANCELED
                )
            {
                let err = io::Error::from_raw_os_error(-res);
                eprintln!("hearth: worker {}: accept: {err}", w.core);
            }
            return;
        }
        // SAFETY: the kernel handed us a new descriptor.
        let fd = unsafe { OwnedFd::from_raw_fd(res) };
        if !w.can_accept() {
            w.shed(fd);
            return;
        }
        set_nodelay(fd.as_raw_fd());
        // SAFETY: getpeername fills at most `len` bytes.
        let peer = unsafe {
            let mut storage: libc::sockaddr_storage = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            libc::getpeername(
                fd.as_raw_fd(),
                &mut storage as *mut _ as *mut libc::sockaddr,
                &mut len,
            );
            peer_of(&storage)
        };
        if let Some(tok) = w.accepted(fd, peer.ip()) {
            self.service(w, tok);
        }
    }
}

/// Whether a stream is an instance's Runtime API listener (accepted, not read).
fn is_listener(kind: &Kind) -> bool {
    matches!(kind, Kind::Rapi(_, Role::Listener))
}

/// Runs `w` on io_uring until it has drained after a shutdown.
pub fn run(w: &mut Worker, listener: OwnedFd, waker: RawFd, spin: SpinWait) -> io::Result<()> {
    let mut d = Driver {
        ring: new_ring(RING_ENTRIES)?,
        listener: Some(listener),
        accept_armed: false,
        accept_backoff: AcceptBackoff::default(),
        waker,
        wake_buf: Box::new(0),
    };
    d.arm_accept();
    d.arm_wake();
    let mut dirty = Vec::with_capacity(256);
    let mut last_tick = Instant::now();
    loop {
        w.take_dirty(&mut dirty);
        while !dirty.is_empty() {
            for &tok in &dirty {
                d.service(w, tok);
            }
            w.take_dirty(&mut dirty);
        }
        if w.draining {
            if let Some(l) = d.listener.take() {
                // The in-flight multishot accept holds its own reference to the socket,
                // so closing our descriptor alone would leave it listening (and new
                // clients shed with 503). Shutting it down leaves the LISTEN state:
                // new connections are refused and the accept completes with an error.
                // SAFETY: shutdown on a descriptor we own.
                unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RD) };
            }
        }
        if w.finished() {
            return Ok(());
        }
        let mut ready = false;
        if !spin.is_off() && w.fns.running() {
            // Hand the kernel what this turn queued (the request for the
            // instance among it), then yield while the instance answers.
            let _ = d.ring.submit();
            ready = spin.wait(|| !d.ring.completion().is_empty() || d.ring.submission().taskrun())
                && !d.ring.submission().taskrun()
                && d.ring.submission().is_empty();
        }
        // Completions already in the queue, no task work pending and nothing
        // left to submit (the spin began with a submit): they are read below
        // without entering the kernel.
        if !ready {
            let ts = types::Timespec::from(w.sleep_for(last_tick, Instant::now()));
            let args = types::SubmitArgs::new().timespec(&ts);
            match d.ring.submitter().submit_with_args(1, &args) {
                Ok(_) => {}
                Err(e)
                    if e.raw_os_error() == Some(libc::ETIME)
                        || e.raw_os_error() == Some(libc::EINTR)
                        || e.raw_os_error() == Some(libc::EBUSY) => {}
                Err(e) => return Err(e),
            }
        }
        w.now = Instant::now();
        let mut cq = Vec::with_capacity(64);
        {
            let mut c = d.ring.completion();
            c.sync();
            for cqe in &mut c {
                cq.push((cqe.user_data(), cqe.result(), cqe.flags()));
            }
        }
        for (data, res, flags) in cq {
            let (tok, op) = ((data >> 8) as usize, data & 0xff);
            match op {
                OP_ACCEPT => d.on_accept(w, res, flags),
                OP_WAKE => {
                    w.on_wake();
                    d.arm_wake();
                }
                OP_RECV => {
                    let Some(s) = w.streams.get_mut(tok) else {
                        continue;
                    };
                    s.recv_inflight = false;
                    if is_listener(&s.kind) {
                        if res >= 0 {
                            // SAFETY: the kernel handed us a new descriptor.
                            let fd = unsafe { OwnedFd::from_raw_fd(res) };
                            if !s.dead {
                                w.rapi_accepted(tok, fd);
                            }
                        }
                        w.mark(tok);
                    } else if s.dead || (s.detaching && res <= 0) {
                        w.mark(tok);
                    } else if res > 0 {
                        let mut buf = std::mem::take(&mut s.recv_buf);
                        // SAFETY: the kernel initialised `res` bytes of the buffer's capacity.
                        unsafe { buf.set_len(res as usize) };
                        w.on_data(tok, &buf);
                        buf.clear();
                        if let Some(s) = w.streams.get_mut(tok) {
                            s.recv_buf = buf;
                        }
                        w.mark(tok);
                    } else if res == -libc::EAGAIN || res == -libc::EINTR {
                        w.mark(tok);
                    } else if res == 0 {
                        w.on_eof(tok);
                    } else {
                        w.on_closed(tok);
                    }
                }
                OP_SEND => {
                    let Some(s) = w.streams.get_mut(tok) else {
                        continue;
                    };
                    s.send_inflight = false;
                    if s.dead || (s.detaching && res < 0) {
                        w.mark(tok);
                    } else if res >= 0 {
                        s.sent += res as usize;
                        let mut flushed = false;
                        if s.sent >= s.sending.len() {
                            s.sending.clear();
                            s.sent = 0;
                            flushed = s.wbuf.is_empty();
                        }
                        w.on_sent(tok, res as usize);
                        if flushed {
                            w.on_flushed(tok);
                        }
                        w.mark(tok);
                    } else if res == -libc::EAGAIN || res == -libc::EINTR {
                        w.mark(tok);
                    } else {
                        w.on_closed(tok);
                    }
                }
                _ => {}
            }
        }
        w.timers(&mut last_tick);
        if !d.accept_armed && w.can_accept() && d.accept_backoff.allows(w.now) {
            d.arm_accept();
        }
    }
}
