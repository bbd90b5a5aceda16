//! The agent's event loop: one poll(2) over the host channel, the runtime's
//! frame socket, its stdout/stderr pipes and the signalfd.
//!
//! * host -> runtime: bytes pass through as they arrive; [`HostStream`]
//!   watches the headers to learn which requests are in flight and to catch
//!   HELLOs (which set the wall clock).
//! * runtime -> host: only whole frames, so LOG frames can be put between
//!   them. The logs of a request are flushed before its RESPONSE/ERROR.
//! * stdout/stderr -> LOG frames tagged with the request in flight.
//! * SIGCHLD -> reap; the runtime's death ends the loop after telling the
//!   host (LOG note + ERROR for each request in flight).
//! * SIGTERM/SIGINT -> SIGTERM to the runtime, SIGKILL after a grace period.
//!
//! Memory is bounded: host bytes are read only while fewer than
//! [`TO_RUNTIME_BYTES_MAX`] wait for the runtime; runtime bytes only until the
//! front frame is whole and while fewer than [`TO_HOST_BYTES_SOFT_MAX`] wait
//! for the host, so each direction holds at most one frame plus one read.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use crate::buf::ByteQueue;
use crate::channel::{Channel, Lost};
use crate::frames::{self, HostEvent, HostStream};
use crate::json;
use crate::output::{Capture, LogQueue};
use crate::protocol::{self, FrameType};
use crate::reap::{self, Life, RuntimeExit, Signals};
use crate::runtime::Runtime;
use crate::sys;

/// Largest single read from any fd.
pub const READ_BYTES: usize = 64 * 1024;
/// Host bytes waiting for the runtime beyond which the host is not read.
pub const TO_RUNTIME_BYTES_MAX: usize = 64 * 1024;
/// Bytes waiting for the host beyond which no more frames or logs are queued.
pub const TO_HOST_BYTES_SOFT_MAX: usize = 64 * 1024;
/// Reads per pipe when draining output before an answer (bounds the time a
/// runaway writer can hold the answer back).
pub const DRAIN_READS_MAX: usize = 16;
/// Time between SIGTERM and SIGKILL on shutdown.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// Time a runtime that closed its frame socket gets to exit by itself.
pub const CLOSED_SOCKET_GRACE: Duration = Duration::from_secs(1);
/// Time spent pushing the final frames to the host after the runtime died.
pub const FINAL_FLUSH: Duration = Duration::from_secs(2);
/// Time allowed for a SIGKILLed runtime to be reaped when the host is gone.
pub const STOP_WAIT: Duration = Duration::from_secs(2);
/// Requests tracked as in flight; the host sends one at a time, so more
/// means it pipelines heavily and the oldest is forgotten.
pub const IN_FLIGHT_MAX: usize = 64;
/// The wall clock is stepped only when a HELLO's time differs by more.
pub const CLOCK_STEP_MIN_MS: u64 = 50;

/// Which backend the agent serves; decides a few policies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Process sandbox: setting the clock is expected to fail (EPERM).
    Process,
    /// microVM: the agent owns the guest's clock.
    Vm,
}

/// Why the loop ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The runtime is gone and the host has been told.
    RuntimeExited {
        exit: RuntimeExit,
        shutdown_requested: bool,
    },
    /// The host closed a channel that cannot reconnect.
    HostGone,
    /// The host broke the protocol on a channel that cannot reconnect.
    HostBroken(String),
    /// The loop itself failed (poll).
    Failed(String),
}

/// The relay state; see the module docs.
pub struct Relay {
    mode: Mode,
    channel: Channel,
    signals: Signals,
    life: Life,
    runtime_sock: Option<OwnedFd>,
    captures: [Capture; 2],
    host_in: HostStream,
    events: Vec<HostEvent>,
    to_runtime: ByteQueue,
    from_runtime: ByteQueue,
    to_host: ByteQueue,
    logs: LogQueue,
    in_flight: VecDeque<u32>,
    /// poll reported a hangup on an fd we were not reading; leave it out of
    /// the poll set until we read again (else poll would spin on POLLHUP).
    host_hup: bool,
    runtime_hup: bool,
    scratch: Vec<u8>,
    pollfds: Vec<libc::pollfd>,
}

impl Relay {
    /// A relay between `channel` and a freshly spawned `runtime`.
    pub fn new(mode: Mode, channel: Channel, signals: Signals, runtime: Runtime) -> Relay {
        Relay {
            mode,
            channel,
            signals,
            life: Life::new(runtime.handle),
            runtime_sock: runtime.channel,
            captures: Capture::pair(runtime.stdout, runtime.stderr),
            host_in: HostStream::new(),
            events: Vec::new(),
            to_runtime: ByteQueue::new(),
            from_runtime: ByteQueue::new(),
            to_host: ByteQueue::new(),
            logs: LogQueue::new(),
            in_flight: VecDeque::new(),
            host_hup: false,
            runtime_hup: false,
            scratch: vec![0; READ_BYTES],
            pollfds: Vec::with_capacity(6),
        }
    }

    /// Runs until the runtime has exited (and the host was told) or the host
    /// is gone for good.
    pub fn run(mut self) -> Outcome {
        loop {
            if let Some(exit) = self.life.exit {
                return self.finish(exit);
            }
            if let Some(outcome) = self.step() {
                self.stop_runtime();
                return outcome;
            }
        }
    }

    /// Kills the runtime and waits (bounded) until it is reaped, so no
    /// runtime outlives an agent that is not a namespace's PID 1.
    fn stop_runtime(&mut self) {
        self.life.kill();
        let deadline = Instant::now() + STOP_WAIT;
        while self.life.exit.is_none() && Instant::now() < deadline {
            self.life.exit = reap::reap_children(self.life.runtime.pid);
            if self.life.exit.is_none() {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    fn current_request(&self) -> u32 {
        self.in_flight.front().copied().unwrap_or(0)
    }

    /// One poll and everything it made ready.
    fn step(&mut self) -> Option<Outcome> {
        let host_fd = self.channel.conn();
        let rt_fd = self.runtime_sock.as_ref().map(|s| s.as_raw_fd());
        let want_host_read = host_fd.is_some() && self.to_runtime.len() < TO_RUNTIME_BYTES_MAX;
        let want_host_write = host_fd.is_some() && !self.to_host.is_empty();
        let want_rt_read = rt_fd.is_some()
            && host_fd.is_some()
            && self.to_host.len() < TO_HOST_BYTES_SOFT_MAX
            && frames::bytes_missing(self.from_runtime.as_slice()) > 0;
        let want_rt_write = rt_fd.is_some() && !self.to_runtime.is_empty();

        self.pollfds.clear();
        let sig_slot = push_poll(&mut self.pollfds, Some(self.signals.fd()), libc::POLLIN);
        let host_slot = if want_host_read || (want_host_write && !self.host_hup) {
            push_poll(
                &mut self.pollfds,
                host_fd,
                poll_events(want_host_read, want_host_write),
            )
        } else {
            None
        };
        let accept_slot = push_poll(&mut self.pollfds, self.channel.accept_fd(), libc::POLLIN);
        let rt_slot = if want_rt_read || (want_rt_write && !self.runtime_hup) {
            push_poll(
                &mut self.pollfds,
                rt_fd,
                poll_events(want_rt_read, want_rt_write),
            )
        } else {
            None
        };
        let out_slots: [Option<usize>; 2] = std::array::from_fn(|i| {
            let fd = self.captures[i].fd.as_ref().map(|f| f.as_raw_fd());
            push_poll(&mut self.pollfds, fd, libc::POLLIN)
        });

        let timeout_ms = self.poll_timeout_ms();
        if let Err(e) = sys::poll(&mut self.pollfds, timeout_ms) {
            return Some(Outcome::Failed(format!("poll: {e}")));
        }
        let ready =
            |slot: Option<usize>, pollfds: &[libc::pollfd]| slot.map_or(0, |i| pollfds[i].revents);
        let sig_ev = ready(sig_slot, &self.pollfds);
        let host_ev = ready(host_slot, &self.pollfds);
        let accept_ev = ready(accept_slot, &self.pollfds);
        let rt_ev = ready(rt_slot, &self.pollfds);
        let out_ev = [
            ready(out_slots[0], &self.pollfds),
            ready(out_slots[1], &self.pollfds),
        ];
        let readable = libc::POLLIN | libc::POLLHUP | libc::POLLERR;

        if sig_ev != 0 {
            self.life.on_signals(&self.signals, SHUTDOWN_GRACE);
        }
        if accept_ev != 0 {
            match self.channel.accept() {
                Ok(true) => self.connected(),
                Ok(false) => {}
                Err(e) => diag!("accept on {}: {e}", self.channel.spec()),
            }
        }
        if self.channel.tick() {
            self.connected();
        }
        if host_ev & readable != 0 {
            if want_host_read {
                if let Some(outcome) = self.read_host() {
                    return Some(outcome);
                }
            } else if host_ev & (libc::POLLHUP | libc::POLLERR) != 0 {
                self.host_hup = true;
            }
        }
        if rt_ev & readable != 0 {
            if want_rt_read {
                self.read_runtime();
            } else if rt_ev & (libc::POLLHUP | libc::POLLERR) != 0 {
                self.runtime_hup = true;
            }
        }
        for (i, ev) in out_ev.into_iter().enumerate() {
            if ev & readable != 0 {
                self.read_capture(i);
            }
        }

        self.pump_frames(TO_HOST_BYTES_SOFT_MAX);
        if self.channel.conn().is_some() && !self.logs.is_empty() {
            self.logs
                .drain_into(&mut self.to_host, TO_HOST_BYTES_SOFT_MAX);
        }
        self.flush_runtime();
        if let Some(outcome) = self.flush_host() {
            return Some(outcome);
        }
        self.life.kill_if_due();
        None
    }

    fn poll_timeout_ms(&self) -> i32 {
        match (self.channel.tick_ms(), self.life.poll_timeout_ms()) {
            (Some(a), -1) => a,
            (Some(a), b) => a.min(b),
            (None, b) => b,
        }
    }

    /// A new host connection: it starts on a frame boundary, and whatever was
    /// queued for the previous one is meaningless to it.
    fn connected(&mut self) {
        diag!("host connected on {}", self.channel.spec());
        self.host_in.reset();
        self.to_host.clear();
        self.host_hup = false;
    }

    fn read_host(&mut self) -> Option<Outcome> {
        let fd = self.channel.conn()?;
        let n = match sys::read(fd, &mut self.scratch) {
            Ok(0) => return self.host_lost("the host closed the channel", false),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
            Err(e) => return self.host_lost(&format!("read: {e}"), false),
        };
        self.host_hup = false;
        let fed = self
            .host_in
            .feed(&self.scratch[..n], &mut self.to_runtime, &mut self.events);
        let events = std::mem::take(&mut self.events);
        for ev in &events {
            match *ev {
                HostEvent::Hello { time_ms, ref seed } => {
                    self.sync_clock(time_ms);
                    if self.mode == Mode::Vm {
                        reseed_rng(seed);
                    }
                }
                HostEvent::Invoke { request_id } => {
                    if self.in_flight.len() == IN_FLIGHT_MAX {
                        let oldest = self.in_flight.pop_front();
                        diag!("more than {IN_FLIGHT_MAX} requests in flight; no longer tracking request {oldest:?}");
                    }
                    self.in_flight.push_back(request_id);
                }
            }
        }
        self.events = events;
        self.events.clear();
        match fed {
            Ok(()) => None,
            Err(e) => self.host_lost(&format!("protocol error from the host: {e}"), true),
        }
    }

    /// The host stream ended (EOF, error, or garbage when `broken`).
    fn host_lost(&mut self, why: &str, broken: bool) -> Option<Outcome> {
        match self.channel.lost(broken) {
            Lost::Final => Some(if broken {
                Outcome::HostBroken(why.to_string())
            } else {
                Outcome::HostGone
            }),
            Lost::WillReconnect => {
                diag!("{why}; waiting for the host on {}", self.channel.spec());
                if self.host_in.mid_frame() {
                    // The runtime holds part of a frame whose rest will never
                    // come; its stream cannot be resynchronised.
                    diag!("the host left in the middle of a frame; stopping the runtime");
                    self.life.kill();
                }
                self.host_in.reset();
                self.to_host.clear();
                None
            }
        }
    }

    fn sync_clock(&mut self, time_ms: Option<u64>) {
        let Some(host_ms) = time_ms else { return };
        let guest_ms = sys::realtime_ms();
        if host_ms.abs_diff(guest_ms) < CLOCK_STEP_MIN_MS {
            return;
        }
        match sys::set_realtime_ms(host_ms) {
            Ok(()) => diag!(
                "wall clock stepped by {} ms to the host's time",
                host_ms as i64 - guest_ms as i64
            ),
            Err(e) if self.mode == Mode::Process && e.raw_os_error() == Some(libc::EPERM) => {}
            Err(e) => diag!("cannot set the wall clock: {e}"),
        }
    }

    fn read_runtime(&mut self) {
        let Some(fd) = self.runtime_sock.as_ref().map(|s| s.as_raw_fd()) else {
            return;
        };
        match self.from_runtime.read_from(fd, READ_BYTES) {
            Ok(0) => self.runtime_closed("the runtime closed its frame socket"),
            Ok(_) => self.runtime_hup = false,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => self.runtime_closed(&format!("runtime frame socket: {e}")),
        }
    }

    fn runtime_closed(&mut self, why: &str) {
        self.runtime_sock = None;
        self.to_runtime.clear();
        if self.life.exit.is_none() && !self.life.shutdown_requested {
            diag!(
                "{why}; it has {} ms to exit",
                CLOSED_SOCKET_GRACE.as_millis()
            );
            let at = Instant::now() + CLOSED_SOCKET_GRACE;
            self.life.kill_at = Some(self.life.kill_at.map_or(at, |k| k.min(at)));
        }
    }

    /// Reads one chunk from an output pipe; returns false when nothing came.
    fn read_capture(&mut self, i: usize) -> bool {
        let rid = self.current_request();
        self.captures[i].read(&mut self.scratch, rid, &mut self.logs)
    }

    /// Takes in all output written so far, unfinished lines included.
    fn drain_captures(&mut self) {
        let rid = self.current_request();
        for i in 0..self.captures.len() {
            for _ in 0..DRAIN_READS_MAX {
                if !self.read_capture(i) {
                    break;
                }
            }
            self.captures[i].lines.flush(rid, &mut self.logs);
        }
    }

    /// Moves whole runtime frames to the host queue while it is below
    /// `to_host_bytes_max` and the host is connected.
    fn pump_frames(&mut self, to_host_bytes_max: usize) {
        while self.channel.conn().is_some() && self.to_host.len() < to_host_bytes_max {
            let header = match frames::complete_frame(self.from_runtime.as_slice()) {
                Ok(Some(h)) => h,
                Ok(None) => return,
                Err(e) => {
                    diag!("the runtime sent a bad frame ({e}); stopping it");
                    self.from_runtime.clear();
                    self.runtime_sock = None;
                    self.life.kill();
                    return;
                }
            };
            if matches!(
                header.kind,
                FrameType::Response | FrameType::Error | FrameType::StreamEnd
            ) {
                // Node writes console output synchronously to pipes, so all
                // output of this request is in the pipes by now.
                self.drain_captures();
                self.logs.drain_into(&mut self.to_host, usize::MAX);
                if let Some(pos) = self.in_flight.iter().position(|&r| r == header.request_id) {
                    self.in_flight.remove(pos);
                }
            }
            self.from_runtime
                .move_front_to(header.frame_len(), &mut self.to_host);
        }
    }

    fn flush_runtime(&mut self) {
        let Some(fd) = self.runtime_sock.as_ref().map(|s| s.as_raw_fd()) else {
            return;
        };
        while !self.to_runtime.is_empty() {
            match self.to_runtime.write_to(fd) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) => return self.runtime_closed(&format!("writing to the runtime: {e}")),
            }
        }
    }

    fn flush_host(&mut self) -> Option<Outcome> {
        let fd = self.channel.conn()?;
        while !self.to_host.is_empty() {
            match self.to_host.write_to(fd) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return None,
                Err(e) => return self.host_lost(&format!("write: {e}"), false),
            }
        }
        None
    }

    /// The runtime is gone: pass on what it said last, tell the host, and
    /// give the host a bounded time to take it all.
    fn finish(mut self, exit: RuntimeExit) -> Outcome {
        diag!("runtime {}", exit.describe());
        if let Some(fd) = self.runtime_sock.as_ref().map(|s| s.as_raw_fd()) {
            // Bounded: a child of the runtime may still hold the socket open.
            let reads_max =
                (protocol::HEADER_BYTES + protocol::META_BYTES_MAX + protocol::BODY_BYTES_MAX)
                    / READ_BYTES
                    + 2;
            for _ in 0..reads_max {
                match self.from_runtime.read_from(fd, READ_BYTES) {
                    Ok(n) if n > 0 => {}
                    _ => break,
                }
            }
        }
        self.drain_captures();
        self.pump_frames(usize::MAX);
        let rid = self.current_request();
        self.logs
            .push_note(rid, &format!("runtime {}", exit.describe()));
        self.logs.drain_into(&mut self.to_host, usize::MAX);
        let message = exit.lambda_message();
        let mut frame = Vec::new();
        for rid in self.in_flight.drain(..) {
            let mut meta = String::from(r#"{"errorType":"Runtime.ExitError","errorMessage":"#);
            json::push_string(&mut meta, &message);
            meta.push('}');
            protocol::encode(&mut frame, FrameType::Error, 0, rid, meta.as_bytes(), b"");
        }
        self.to_host.push(&frame);
        self.flush_host_until(Instant::now() + FINAL_FLUSH);
        Outcome::RuntimeExited {
            exit,
            shutdown_requested: self.life.shutdown_requested,
        }
    }

    fn flush_host_until(&mut self, deadline: Instant) {
        while !self.to_host.is_empty() {
            let Some(fd) = self.channel.conn() else {
                return;
            };
            match self.to_host.write_to(fd) {
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                diag!(
                    "host did not take the last {} bytes in time",
                    self.to_host.len()
                );
                return;
            }
            let mut p = [libc::pollfd {
                fd,
                events: libc::POLLOUT,
                revents: 0,
            }];
            let _ = sys::poll(&mut p, left.as_millis() as i32 + 1);
        }
    }
}

fn poll_events(read: bool, write: bool) -> libc::c_short {
    (if read { libc::POLLIN } else { 0 }) | (if write { libc::POLLOUT } else { 0 })
}

/// Adds `fd` to the poll set if there is one; returns its slot.
fn push_poll(
    fds: &mut Vec<libc::pollfd>,
    fd: Option<RawFd>,
    events: libc::c_short,
) -> Option<usize> {
    let fd = fd?;
    fds.push(libc::pollfd {
        fd,
        events,
        revents: 0,
    });
    Some(fds.len() - 1)
}

/// Mixes the host's random words into the kernel's pool and forces a reseed,
/// so VMs restored from one snapshot stop sharing the template's RNG state.
/// (V8's `Math.random` state inside the runtime is not reached by this.)
fn reseed_rng(seed: &[u64]) {
    if seed.is_empty() {
        return;
    }
    let bytes: Vec<u8> = seed.iter().flat_map(|w| w.to_le_bytes()).collect();
    let Ok(mut f) = std::fs::OpenOptions::new().write(true).open("/dev/urandom") else {
        diag!("cannot open /dev/urandom to reseed the RNG");
        return;
    };
    let _ = std::io::Write::write_all(&mut f, &bytes);
    // RNDRESEEDCRNG: make the CRNG pick up the new input now.
    const RNDRESEEDCRNG: libc::c_ulong = 0x5207;
    // SAFETY: an argument-less ioctl on a descriptor we own.
    if unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(&f), RNDRESEEDCRNG) } != 0 {
        diag!("RNDRESEEDCRNG: {}", std::io::Error::last_os_error());
    }
}
