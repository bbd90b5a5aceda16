//! The epoll driver (through mio), for hosts where io_uring cannot be set up
//! or when `--io epoll` is given. Readiness-based and edge-triggered: reads and
//! writes happen directly until the socket would block.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token as MioToken};

use crate::engine::rapi::Role;
use crate::engine::spin::SpinWait;
use crate::engine::stream::{Kind, Stream};
use crate::engine::worker::{set_nonblocking, Token, Worker};
use crate::engine::{peer_of, AcceptBackoff};
use crate::util::sock::set_nodelay;

const LISTENER: MioToken = MioToken(usize::MAX - 1);
const WAKER: MioToken = MioToken(usize::MAX - 2);
/// Bytes read per read(2) call.
const READ_CHUNK: usize = 64 * 1024;

struct Driver {
    poll: Poll,
    buf: Vec<u8>,
}

impl Driver {
    /// Watches stream `tok`: its socket both ways, or a pipe pair's read end
    /// for reading and its write end for writing (both made non-blocking here;
    /// see `Action::Attach` in the worker).
    fn register(&self, s: &Stream, tok: Token) {
        let fds = if s.is_pipe() {
            set_nonblocking(s.raw());
            set_nonblocking(s.wraw());
            vec![
                (s.raw(), Interest::READABLE),
                (s.wraw(), Interest::WRITABLE),
            ]
        } else {
            vec![(s.raw(), Interest::READABLE | Interest::WRITABLE)]
        };
        for (fd, interest) in fds {
            let r = self
                .poll
                .registry()
                .register(&mut SourceFd(&fd), MioToken(tok), interest);
            if let Err(e) = r {
                eprintln!("hearth: epoll register: {e}");
            }
        }
    }

    /// Stops watching stream `s`'s descriptors.
    fn deregister(&self, s: &Stream) {
        let _ = self.poll.registry().deregister(&mut SourceFd(&s.raw()));
        if s.is_pipe() {
            let _ = self.poll.registry().deregister(&mut SourceFd(&s.wraw()));
        }
    }

    /// Reads until the socket would block, the stream pauses, or EOF. Unless
    /// `to_eof`, a read shorter than the buffer also ends it: the socket is
    /// drained, and data arriving later raises a new edge. That saves a read
    /// returning EAGAIN per request. `to_eof` is needed when the event carried
    /// the peer's FIN (no further edge will come for it) and when resuming a
    /// paused stream (whose edge was consumed without reading).
    fn read(&mut self, w: &mut Worker, tok: Token, to_eof: bool) {
        loop {
            let Some(s) = w.streams.get_mut(tok) else {
                return;
            };
            // A stream moving to another core is read there (nothing bounds
            // what would pile up here meanwhile).
            if s.dead || s.detaching {
                return;
            }
            if s.read_paused {
                s.readable_pending = true;
                return;
            }
            s.readable_pending = false;
            if matches!(s.kind, Kind::Rapi(_, Role::Listener)) {
                // An instance's Runtime API listener: readable means connections.
                let lfd = s.raw();
                while let Some(fd) = crate::sandbox::runtime_api::accept(lfd) {
                    w.rapi_accepted(tok, fd);
                }
                return;
            }
            // SAFETY: reading into our own buffer of READ_CHUNK bytes.
            let n = unsafe {
                libc::read(
                    s.raw(),
                    self.buf.as_mut_ptr() as *mut libc::c_void,
                    READ_CHUNK,
                )
            };
            if n > 0 {
                w.on_data(tok, &self.buf[..n as usize]);
                w.mark(tok);
                if !to_eof && (n as usize) < READ_CHUNK {
                    return;
                }
            } else if n == 0 {
                w.on_eof(tok);
                return;
            } else {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EAGAIN) => return,
                    Some(libc::EINTR) => continue,
                    _ => {
                        w.on_closed(tok);
                        return;
                    }
                }
            }
        }
    }

    /// Writes pending output, closes finished streams, resumes paused reads.
    fn service(&mut self, w: &mut Worker, tok: Token) {
        w.close_step(tok);
        let Some(s) = w.streams.get_mut(tok) else {
            return;
        };
        if s.detaching {
            if s.registered {
                self.deregister(s);
            }
            w.detached(tok);
            return;
        }
        if s.dead {
            self.deregister(s);
            w.free(tok);
            return;
        }
        let mut flushed = false;
        let mut written = 0;
        loop {
            // Output moves to `sending` and is consumed by offset: draining the
            // front of a large buffer after each partial write would copy it again
            // and again.
            if s.sent >= s.sending.len() {
                s.sending.clear();
                s.sent = 0;
                if s.wbuf.is_empty() {
                    break;
                }
                std::mem::swap(&mut s.sending, &mut s.wbuf);
            }
            let rest = &s.sending[s.sent..];
            let (ptr, len) = (rest.as_ptr() as *const libc::c_void, rest.len());
            // SAFETY: writing from our own buffer; MSG_NOSIGNAL avoids SIGPIPE
            // (a pipe whose reader left raises it too: hearth ignores it, as
            // Rust programs do, and gets EPIPE).
            let n = unsafe {
                if s.is_pipe() {
                    libc::write(s.wraw(), ptr, len)
                } else {
                    libc::send(s.raw(), ptr, len, libc::MSG_NOSIGNAL)
                }
            };
            if n >= 0 {
                s.sent += n as usize;
                written += n as usize;
                flushed = s.sent >= s.sending.len() && s.wbuf.is_empty();
            } else {
                match io::Error::last_os_error().raw_os_error() {
                    Some(libc::EAGAIN) => break,
                    Some(libc::EINTR) => continue,
                    _ => {
                        w.on_sent(tok, written);
                        w.on_closed(tok);
                        return;
                    }
                }
            }
        }
        if flushed {
            s.sending.clear();
            s.sent = 0;
        }
        let pending_read = !s.read_paused && s.readable_pending;
        w.on_sent(tok, written);
        if flushed {
            w.on_flushed(tok);
            w.mark(tok);
        }
        if pending_read {
            self.read(w, tok, true);
        }
    }
}

/// Runs `w` on epoll until it has drained after a shutdown.
pub fn run(w: &mut Worker, listener: OwnedFd, waker: RawFd, spin: SpinWait) -> io::Result<()> {
    let mut d = Driver {
        poll: Poll::new()?,
        buf: vec![0; READ_CHUNK],
    };
    let mut listener = Some(listener);
    let lfd = listener.as_ref().map(|l| l.as_raw_fd()).unwrap_or(-1);
    d.poll
        .registry()
        .register(&mut SourceFd(&lfd), LISTENER, Interest::READABLE)?;
    d.poll
        .registry()
        .register(&mut SourceFd(&waker), WAKER, Interest::READABLE)?;
    let mut events = Events::with_capacity(1024);
    let mut dirty = Vec::with_capacity(256);
    let mut last_tick = Instant::now();
    let mut accept_ready = false;
    let mut backoff = AcceptBackoff::default();
    loop {
        w.take_dirty(&mut dirty);
        while !dirty.is_empty() {
            for &tok in &dirty {
                if let Some(s) = w.streams.get_mut(tok) {
                    if !s.registered && !s.dead {
                        s.registered = true;
                        d.register(s, tok);
                        d.read(w, tok, false);
                    }
                }
                d.service(w, tok);
            }
            w.take_dirty(&mut dirty);
        }
        if w.draining && listener.is_some() {
            let _ = d.poll.registry().deregister(&mut SourceFd(&lfd));
            listener = None;
        }
        if w.finished() {
            return Ok(());
        }
        if accept_ready && listener.is_some() && w.can_accept() && backoff.allows(w.now) {
            accept_ready = accept_all(w, lfd, &mut backoff);
            if backoff.allows(w.now) {
                continue;
            }
        }
        let ready = !spin.is_off()
            && w.fns.running()
            && spin.wait(|| {
                d.poll.poll(&mut events, Some(Duration::ZERO)).is_ok() && !events.is_empty()
            });
        let waited = match ready {
            true => Ok(()),
            false => d
                .poll
                .poll(&mut events, Some(w.sleep_for(last_tick, Instant::now()))),
        };
        match waited {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
        w.now = Instant::now();
        for ev in events.iter() {
            match ev.token() {
                LISTENER => accept_ready = true,
                WAKER => {
                    let mut v = 0u64;
                    // SAFETY: draining the eventfd counter into a local.
                    unsafe { libc::read(waker, &mut v as *mut u64 as *mut libc::c_void, 8) };
                    w.on_wake();
                }
                MioToken(tok) => {
                    if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                        d.read(w, tok, ev.is_read_closed() || ev.is_error());
                    }
                    if ev.is_writable() {
                        w.mark(tok);
                    }
                }
            }
        }
        if accept_ready && listener.is_some() && backoff.allows(w.now) {
            accept_ready = accept_all(w, lfd, &mut backoff);
        }
        w.timers(&mut last_tick);
    }
}

/// Accepts until the backlog is empty, the core is full, or descriptors run out
/// (then `backoff` pauses accepting); returns true if connections may still be waiting.
fn accept_all(w: &mut Worker, lfd: RawFd, backoff: &mut AcceptBackoff) -> bool {
    loop {
        // SAFETY: accept4 fills at most `len` bytes of storage.
        let (fd, peer) = unsafe {
            let mut storage: libc::sockaddr_storage = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            let fd = libc::accept4(
                lfd,
                &mut storage as *mut _ as *mut libc::sockaddr,
                &mut len,
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            );
            (fd, peer_of(&storage))
        };
        if fd < 0 {
            let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
            return match errno {
                libc::EAGAIN => false,
                libc::EINTR | libc::ECONNABORTED => continue,
                _ => backoff.on_error(w.core, errno, w.now),
            };
        }
        // SAFETY: a new descriptor from accept4.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if !w.can_accept() {
            w.shed(fd);
            return true;
        }
        set_nodelay(fd.as_raw_fd());
        w.accepted(fd, peer.ip());
    }
}
