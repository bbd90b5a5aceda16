//! Direct mode (process sandbox with `--log-fd`): the runtime owns the host
//! channel and the agent stays off the request path. Its loop polls only the
//! runtime's stdout/stderr pipes, the signalfd and the log socket:
//!
//! * stdout/stderr -> LOG frames on the log socket, untagged (request id 0):
//!   the shim sends console output as LOG frames on the channel itself, so
//!   these pipes only carry raw writes (native code, child processes).
//! * SIGCHLD -> reap; the runtime's death ends the loop after a LOG note.
//!   The host learns of it when the channel closes (this process is PID 1:
//!   its exit takes down everything the runtime left behind).
//! * end of file on the log socket: the host is gone; stop the runtime.
//! * SIGTERM/SIGINT -> SIGTERM to the runtime, SIGKILL after a grace period.
//!
//! Memory is bounded: the pipes are read only while fewer than
//! [`TO_HOST_BYTES_SOFT_MAX`] bytes wait for the host, and the log queue
//! drops lines beyond its own limit (saying how many bytes).

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use crate::buf::ByteQueue;
use crate::output::{Capture, LineSplitter, LogQueue};
use crate::reap::{self, Life, RuntimeExit, Signals};
use crate::relay::{Outcome, FINAL_FLUSH, READ_BYTES, SHUTDOWN_GRACE, TO_HOST_BYTES_SOFT_MAX};
use crate::runtime::{Runtime, RuntimeHandle};
use crate::sys;

/// The supervisor's state; see the module docs.
pub struct Supervisor {
    log: OwnedFd,
    signals: Signals,
    life: Life,
    captures: [Capture; 2],
    logs: LogQueue,
    to_host: ByteQueue,
    scratch: Vec<u8>,
}

impl Supervisor {
    /// Supervises a runtime spawned in direct mode; `log` is the host's log socket.
    pub fn new(log: OwnedFd, signals: Signals, runtime: Runtime) -> io::Result<Supervisor> {
        sys::set_nonblocking(log.as_raw_fd(), true)?;
        Ok(Supervisor {
            log,
            signals,
            life: Life::new(runtime.handle),
            captures: Capture::pair(runtime.stdout, runtime.stderr),
            logs: LogQueue::new(),
            to_host: ByteQueue::new(),
            scratch: vec![0; READ_BYTES],
        })
    }

    /// Supervises a runtime whose output goes to the host another way (the
    /// host-served Runtime API's sockets): only its life and the log socket.
    pub fn without_output(
        log: OwnedFd,
        signals: Signals,
        runtime: RuntimeHandle,
    ) -> io::Result<Supervisor> {
        sys::set_nonblocking(log.as_raw_fd(), true)?;
        let none = |flags| Capture {
            fd: None,
            lines: LineSplitter::new(flags),
        };
        Ok(Supervisor {
            log,
            signals,
            life: Life::new(runtime),
            captures: [none(0), none(crate::protocol::LOG_STDERR)],
            logs: LogQueue::new(),
            to_host: ByteQueue::new(),
            scratch: vec![0; READ_BYTES],
        })
    }

    /// Runs until the runtime has exited or the host is gone.
    pub fn run(mut self) -> Outcome {
        loop {
            if let Some(exit) = self.life.exit {
                return self.finish(exit);
            }
            if let Err(why) = self.step() {
                self.life.kill();
                // PID 1 exiting kills the namespace; outside one (tests), reap.
                let deadline = Instant::now() + crate::relay::STOP_WAIT;
                while reap::reap_children(self.life.runtime.pid).is_none()
                    && Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return why;
            }
        }
    }

    /// One poll and everything it made ready.
    fn step(&mut self) -> Result<(), Outcome> {
        let log_fd = self.log.as_raw_fd();
        let room = self.to_host.len() < TO_HOST_BYTES_SOFT_MAX;
        let out = if self.to_host.is_empty() {
            0
        } else {
            libc::POLLOUT
        };
        let mut fds = Vec::with_capacity(4);
        fds.push(pollfd(self.signals.fd(), libc::POLLIN));
        // POLLIN: the host never writes here, so readable means end of file.
        fds.push(pollfd(log_fd, libc::POLLIN | out));
        let mut capture_slots = [None; 2];
        for (i, c) in self.captures.iter().enumerate() {
            if let (Some(fd), true) = (&c.fd, room) {
                capture_slots[i] = Some(fds.len());
                fds.push(pollfd(fd.as_raw_fd(), libc::POLLIN));
            }
        }
        sys::poll(&mut fds, self.life.poll_timeout_ms())
            .map_err(|e| Outcome::Failed(format!("poll: {e}")))?;

        if fds[0].revents != 0 {
            self.life.on_signals(&self.signals, SHUTDOWN_GRACE);
        }
        if fds[1].revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
            let mut b = [0u8; 64];
            match sys::read(log_fd, &mut b) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Ok(n) if n > 0 => {}
                _ => return Err(Outcome::HostGone),
            }
        }
        for (i, slot) in capture_slots.into_iter().enumerate() {
            if slot.is_some_and(|s| fds[s].revents != 0) {
                self.read_capture(i);
            }
        }
        self.logs
            .drain_into(&mut self.to_host, TO_HOST_BYTES_SOFT_MAX);
        self.flush()?;
        self.life.kill_if_due();
        Ok(())
    }

    /// Reads one chunk from an output pipe (untagged); false when nothing came.
    fn read_capture(&mut self, i: usize) -> bool {
        self.captures[i].read(&mut self.scratch, 0, &mut self.logs)
    }

    /// Writes queued LOG frames until the socket is full.
    fn flush(&mut self) -> Result<(), Outcome> {
        let fd = self.log.as_raw_fd();
        while !self.to_host.is_empty() {
            match self.to_host.write_to(fd) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(_) => return Err(Outcome::HostGone),
            }
        }
        Ok(())
    }

    /// The runtime is gone: pass on its last output and a note, within a bound.
    fn finish(mut self, exit: RuntimeExit) -> Outcome {
        diag!("runtime {}", exit.describe());
        for i in 0..self.captures.len() {
            for _ in 0..crate::relay::DRAIN_READS_MAX {
                if !self.read_capture(i) {
                    break;
                }
            }
            self.captures[i].lines.flush(0, &mut self.logs);
        }
        self.logs
            .push_note(0, &format!("runtime {}", exit.describe()));
        self.logs.drain_into(&mut self.to_host, usize::MAX);
        let deadline = Instant::now() + FINAL_FLUSH;
        while !self.to_host.is_empty() && Instant::now() < deadline {
            if self.flush().is_err() {
                break;
            }
            let mut p = [pollfd(self.log.as_raw_fd(), libc::POLLOUT)];
            let left = deadline.saturating_duration_since(Instant::now());
            let _ = sys::poll(&mut p, left.as_millis() as i32 + 1);
        }
        Outcome::RuntimeExited {
            exit,
            shutdown_requested: self.life.shutdown_requested,
        }
    }
}

fn pollfd(fd: i32, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}
