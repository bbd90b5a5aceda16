//! A level-triggered epoll set for the Runtime API mode's event loop: each fd
//! is registered once, under a caller-chosen token, instead of a poll(2) set
//! rebuilt (and allocated, and walked by the kernel) on every turn of the
//! loop. io_uring is not an option there: the process sandbox's seccomp
//! filter answers it with ENOSYS.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use crate::sys;

/// Most events taken from one wait; the rest stay ready for the next.
pub const EVENTS_MAX: usize = 32;

/// One epoll instance.
pub struct Epoll {
    fd: OwnedFd,
}

/// The tokens of the ready fds of one wait.
pub struct Ready {
    events: [libc::epoll_event; EVENTS_MAX],
    len: usize,
}

impl Ready {
    /// Room for one wait's events.
    pub fn new() -> Ready {
        Ready {
            events: [libc::epoll_event { events: 0, u64: 0 }; EVENTS_MAX],
            len: 0,
        }
    }

    /// The tokens reported by the last wait, in the kernel's order.
    pub fn tokens(&self) -> impl Iterator<Item = u64> + '_ {
        self.events[..self.len].iter().map(|e| e.u64)
    }
}

impl Epoll {
    /// A new, empty set (close-on-exec).
    pub fn new() -> io::Result<Epoll> {
        // SAFETY: epoll_create1 takes flags and returns a new fd or -1.
        let fd = sys::cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
        // SAFETY: the fd is fresh and owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        Ok(Epoll { fd })
    }

    /// Watches `fd` for readability (and hangups, which epoll always reports)
    /// under `token`. Closing the fd removes it from the set.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: epoll_ctl reads the event struct we own.
        sys::cvt(unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut ev) })
            .map(drop)
    }

    /// Waits up to `timeout_ms` (-1: no limit) and fills `ready`; an
    /// interrupted wait reports nothing ready.
    pub fn wait(&self, ready: &mut Ready, timeout_ms: i32) -> io::Result<()> {
        // SAFETY: the kernel writes at most EVENTS_MAX events into the array we own.
        let n = unsafe {
            libc::epoll_wait(
                self.fd.as_raw_fd(),
                ready.events.as_mut_ptr(),
                EVENTS_MAX as libc::c_int,
                timeout_ms,
            )
        };
        if n < 0 {
            ready.len = 0;
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::Interrupted => Ok(()),
                _ => Err(err),
            };
        }
        ready.len = n as usize;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_ready_fds_by_token_until_drained() {
        let ep = Epoll::new().unwrap();
        let (a, b) = sys::stream_socketpair().unwrap();
        let (c, _d) = sys::stream_socketpair().unwrap();
        ep.add(a.as_raw_fd(), 7).unwrap();
        ep.add(c.as_raw_fd(), 9).unwrap();
        let mut ready = Ready::new();
        ep.wait(&mut ready, 0).unwrap();
        assert_eq!(ready.tokens().count(), 0);
        sys::write(b.as_raw_fd(), b"x").unwrap();
        for _ in 0..2 {
            // Level-triggered: still ready while unread.
            ep.wait(&mut ready, 1000).unwrap();
            assert_eq!(ready.tokens().collect::<Vec<_>>(), [7]);
        }
        let mut buf = [0u8; 4];
        assert_eq!(sys::read(a.as_raw_fd(), &mut buf).unwrap(), 1);
        ep.wait(&mut ready, 0).unwrap();
        assert_eq!(ready.tokens().count(), 0);
        drop(b);
        ep.wait(&mut ready, 1000).unwrap();
        assert_eq!(
            ready.tokens().collect::<Vec<_>>(),
            [7],
            "a hangup is reported"
        );
    }
}
