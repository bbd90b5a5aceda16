//! A level-triggered epoll instance for one load-generating thread: a socket
//! stays readable until it is read, so one `read` per wake-up is enough (as in
//! wrk), and waits take nanosecond timeouts (`epoll_pwait2`) where the kernel
//! has them, so open-loop sends leave on time.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Most events taken from the kernel per wait.
pub const EVENTS_MAX: usize = 512;

/// An epoll file descriptor and its event buffer.
pub struct Poller {
    fd: OwnedFd,
    events: Vec<libc::epoll_event>,
    /// Whether `epoll_pwait2` is known to be missing (kernels before 5.11).
    no_pwait2: bool,
}

/// Readiness of one registered socket.
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    /// The token given at registration.
    pub token: usize,
    pub readable: bool,
    pub writable: bool,
    /// Error or hang-up.
    pub failed: bool,
}

impl Poller {
    /// A new epoll instance.
    pub fn new() -> io::Result<Poller> {
        // SAFETY: epoll_create1 takes no pointers; the result is checked.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Poller {
            // SAFETY: fd is a fresh descriptor this value alone owns.
            fd: unsafe { OwnedFd::from_raw_fd(fd) },
            events: vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_MAX],
            no_pwait2: false,
        })
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: usize, writable: bool) -> io::Result<()> {
        let mut flags = libc::EPOLLIN | libc::EPOLLRDHUP;
        if writable {
            flags |= libc::EPOLLOUT;
        }
        let mut ev = libc::epoll_event {
            events: flags as u32,
            u64: token as u64,
        };
        // SAFETY: ev is a valid epoll_event for the duration of the call.
        let rc = unsafe { libc::epoll_ctl(self.fd.as_raw_fd(), op, fd, &mut ev) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Watches `fd` for reads, and for writes when `writable`.
    pub fn add(&self, fd: RawFd, token: usize, writable: bool) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_ADD, fd, token, writable)
    }

    /// Changes whether `fd` is watched for writes.
    pub fn modify(&self, fd: RawFd, token: usize, writable: bool) -> io::Result<()> {
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, writable)
    }

    /// Waits up to `timeout`; returns how many events [`Poller::event`] holds.
    pub fn wait(&mut self, timeout: Duration) -> io::Result<usize> {
        loop {
            let rc = self.wait_once(timeout);
            if rc >= 0 {
                return Ok(rc as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }

    /// Event `i` of the last [`Poller::wait`].
    pub fn event(&self, i: usize) -> Ready {
        let ev = self.events[i];
        let flags = ev.events as i32;
        Ready {
            token: ev.u64 as usize,
            readable: flags & (libc::EPOLLIN | libc::EPOLLRDHUP) != 0,
            writable: flags & libc::EPOLLOUT != 0,
            failed: flags & (libc::EPOLLERR | libc::EPOLLHUP) != 0,
        }
    }

    fn wait_once(&mut self, timeout: Duration) -> i64 {
        let epfd = self.fd.as_raw_fd();
        let events = self.events.as_mut_ptr();
        if !self.no_pwait2 {
            let ts = libc::timespec {
                tv_sec: timeout.as_secs() as libc::time_t,
                tv_nsec: timeout.subsec_nanos() as libc::c_long,
            };
            // SAFETY: events has EVENTS_MAX slots and ts outlives the call; a
            // null signal mask leaves the mask alone.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_epoll_pwait2,
                    epfd,
                    events,
                    EVENTS_MAX as libc::c_int,
                    &ts as *const libc::timespec,
                    std::ptr::null::<libc::sigset_t>(),
                    0usize,
                )
            };
            if rc >= 0 || io::Error::last_os_error().raw_os_error() != Some(libc::ENOSYS) {
                return rc;
            }
            self.no_pwait2 = true;
        }
        let ms = timeout.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as libc::c_int;
        // SAFETY: events has EVENTS_MAX slots.
        unsafe { libc::epoll_wait(epfd, events, EVENTS_MAX as libc::c_int, ms) as i64 }
    }
}
