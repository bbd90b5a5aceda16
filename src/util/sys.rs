//! Thin, checked wrappers of Linux system calls used in more than one place:
//! pidfds (signalling a process without racing pid reuse) and an epoll set.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// A pidfd on process `pid`; `None` when it is gone (or pidfds are missing).
pub fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: plain syscall; on success it returns a new descriptor that we own.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    // SAFETY: a non-negative result is a new descriptor nobody else owns.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Sends SIGKILL to the process `pidfd` refers to; best effort (a process
/// already gone is no error worth reporting).
pub fn pidfd_kill(pidfd: &OwnedFd) {
    // SAFETY: signals the process the pidfd refers to; no memory is passed.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<u8>(),
            0,
        )
    };
}

/// An epoll set whose events carry a `u64` token.
pub struct Epoll {
    fd: OwnedFd,
}

impl Epoll {
    /// A new, empty set (close-on-exec).
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: plain syscall; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Epoll { fd })
    }

    /// `epoll_ctl(op)` of `fd` for `events`, reported with `token`.
    pub fn ctl(&self, op: i32, fd: RawFd, events: i32, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: events as u32,
            u64: token,
        };
        // SAFETY: valid epoll and target descriptors, a valid event.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits without end for events; fills `events` and returns how many
    /// came (0 when interrupted by a signal).
    pub fn wait(&self, events: &mut [libc::epoll_event]) -> usize {
        let max = i32::try_from(events.len()).unwrap_or(i32::MAX);
        // SAFETY: the buffer holds `max` events.
        let n = unsafe { libc::epoll_wait(self.fd.as_raw_fd(), events.as_mut_ptr(), max, -1) };
        usize::try_from(n).unwrap_or(0)
    }
}
