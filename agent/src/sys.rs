//! Thin, checked wrappers over the few libc calls the agent makes in more than
//! one place. Anything used by a single module lives in that module.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};

/// Turns a `-1`-style libc return into an `io::Result`.
pub fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// `read(2)`, retried on EINTR. `Ok(0)` is end of file.
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: the pointer and length describe `buf`, which we borrow mutably.
    unsafe { read_raw(fd, buf.as_mut_ptr(), buf.len()) }
}

/// `read(2)` into raw memory, retried on EINTR.
///
/// # Safety
/// `ptr` must be valid for writes of `len` bytes.
pub unsafe fn read_raw(fd: RawFd, ptr: *mut u8, len: usize) -> io::Result<usize> {
    loop {
        // SAFETY: the caller guarantees `ptr` is valid for `len` bytes of writes.
        let n = unsafe { libc::read(fd, ptr.cast(), len) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// `write(2)`, retried on EINTR. SIGPIPE is ignored by the Rust runtime, so a
/// closed peer shows up as `EPIPE`.
pub fn write(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: the pointer and length describe `buf`.
        let n = unsafe { libc::write(fd, buf.as_ptr().cast(), buf.len()) };
        if n >= 0 {
            return Ok(n as usize);
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Turns O_NONBLOCK on or off.
pub fn set_nonblocking(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: fcntl on an integer fd has no memory effects.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    let flags = if on {
        flags | libc::O_NONBLOCK
    } else {
        flags & !libc::O_NONBLOCK
    };
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFL, flags) }).map(drop)
}

/// Turns FD_CLOEXEC on or off.
pub fn set_cloexec(fd: RawFd, on: bool) -> io::Result<()> {
    // SAFETY: as above.
    let flags = cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) })?;
    let flags = if on {
        flags | libc::FD_CLOEXEC
    } else {
        flags & !libc::FD_CLOEXEC
    };
    // SAFETY: as above.
    cvt(unsafe { libc::fcntl(fd, libc::F_SETFD, flags) }).map(drop)
}

/// True if `fd` is open and refers to a socket.
pub fn is_socket(fd: RawFd) -> io::Result<bool> {
    // SAFETY: fstat writes into the zeroed struct we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into `st`.
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st.st_mode & libc::S_IFMT == libc::S_IFSOCK)
}

/// True if `fd` is open and refers to a pipe (or FIFO).
pub fn is_fifo(fd: RawFd) -> io::Result<bool> {
    // SAFETY: fstat writes into the zeroed struct we own.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes only into `st`.
    cvt(unsafe { libc::fstat(fd, &mut st) })?;
    Ok(st.st_mode & libc::S_IFMT == libc::S_IFIFO)
}

/// A connected pair of Unix stream sockets, both close-on-exec.
pub fn stream_socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1; 2];
    // SAFETY: socketpair writes two fds into the array we own.
    cvt(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both fds are fresh and owned by nobody else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// `poll(2)`; an interrupted wait counts as "nothing ready".
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: the pointer and length describe `fds`.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        let err = io::Error::last_os_error();
        return if err.kind() == io::ErrorKind::Interrupted {
            Ok(0)
        } else {
            Err(err)
        };
    }
    Ok(n as usize)
}

/// CLOCK_REALTIME in milliseconds since the Unix epoch.
pub fn realtime_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the struct we own.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000
}

/// Steps CLOCK_REALTIME to `ms` since the Unix epoch (needs CAP_SYS_TIME).
pub fn set_realtime_ms(ms: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (ms / 1000) as libc::time_t,
        tv_nsec: ((ms % 1000) * 1_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads the struct we own.
    cvt(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) }).map(drop)
}

/// TCP_DEFER_ACCEPT: a listener reports a connection once its first bytes
/// (or its end) arrive, or after about `secs`, so one wake-up of whoever
/// serves it accepts the connection and reads its request.
pub fn set_defer_accept(fd: RawFd, secs: libc::c_int) -> io::Result<()> {
    // SAFETY: setsockopt reads one c_int from the value we own.
    cvt(unsafe {
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
