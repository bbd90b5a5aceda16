//! The load-generating threads: each owns a share of the connections, a
//! [`Poller`] and its own [`Stats`], and runs until the measured window ends
//! or its share of `--requests` is answered. Nothing is shared between the
//! threads but the start time and two progress counters each.
//!
//! Closed loop: a connection sends its next request the moment an answer
//! completes, and latency runs from the write. Open loop: connection `i` of
//! `c` sends request `k` at `start + (i / c + k) * c / rate`; if the previous
//! answer is still outstanding the request leaves as soon as it is in, and its
//! latency still runs from the intended time, so a stalled server shows up in
//! the tail instead of silently slowing the load (coordinated omission).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mio::net::TcpStream;

use super::args::{Load, Plan, Stop};
use super::conn::{Event, ResponseReader};
use super::poller::Poller;
use super::stats::Stats;

/// How often timeouts and reconnects are checked.
const TICK: Duration = Duration::from_millis(10);
/// Pause before a failed connection is tried again.
const RECONNECT_DELAY: Duration = Duration::from_millis(10);

/// Counters a thread publishes for the live progress line.
#[derive(Default)]
#[repr(align(64))]
pub struct Progress {
    pub answers: AtomicU64,
    pub errors: AtomicU64,
}

/// The times every thread of one run shares.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// When load starts (warm-up included).
    pub start: Instant,
    /// When measuring starts (after the warm-up).
    pub measure_from: Instant,
    /// When the run ends; `None` for a `--requests` run.
    pub end: Option<Instant>,
}

/// One thread's share of the run.
pub struct Share {
    /// Index of this thread's first connection among all of them.
    pub first_conn: usize,
    pub conns: usize,
    /// Measured requests to issue (`--requests`), if counted.
    pub requests: Option<u64>,
}

/// What a thread hands back.
pub struct Outcome {
    pub stats: Stats,
    /// When its last measured answer came in.
    pub last_answer: Option<Instant>,
}

enum Phase {
    /// No socket; reconnect at this time.
    Down(Instant),
    Connecting,
    /// Connected, nothing outstanding.
    Ready,
    /// A request is being written (bytes sent so far) or awaits its answer.
    Busy {
        sent: usize,
    },
}

struct Conn {
    stream: Option<TcpStream>,
    phase: Phase,
    reader: ResponseReader,
    /// Index of the request to send next.
    next_req: usize,
    /// Index of the request in flight.
    req: usize,
    /// Where the latency of the request in flight runs from.
    origin: Instant,
    /// When the request in flight (or the connect) times out.
    deadline: Instant,
    /// Open loop: the intended send time of the next request.
    next_send: Instant,
    /// Whether the connection is watched for writes.
    watch_out: bool,
}

/// Runs one thread's share of a plan under `load` (a sweep passes each rate in turn).
pub fn run_thread(
    plan: &Plan,
    load: Load,
    window: Window,
    share: &Share,
    progress: &Progress,
) -> io::Result<Outcome> {
    let mut w = Worker::new(plan, load, window, share, progress)?;
    w.run()?;
    Ok(Outcome {
        stats: w.stats,
        last_answer: w.last_answer,
    })
}

struct Worker<'a> {
    plan: &'a Plan,
    window: Window,
    poller: Poller,
    conns: Vec<Conn>,
    stats: Stats,
    /// Measured requests still to issue, when counted.
    budget: Option<u64>,
    /// Open loop: time between two requests of one connection.
    interval: Option<Duration>,
    /// Open loop: connections waiting for their next send time.
    schedule: BinaryHeap<Reverse<(Instant, usize)>>,
    in_flight: usize,
    last_answer: Option<Instant>,
    /// Last time a connection was made or an answer came in.
    last_progress: Instant,
    progress: &'a Progress,
}

impl<'a> Worker<'a> {
    fn new(
        plan: &'a Plan,
        load: Load,
        window: Window,
        share: &Share,
        progress: &'a Progress,
    ) -> io::Result<Self> {
        let interval = match load {
            Load::Closed => None,
            Load::Open { rate_per_s } => Some(Duration::from_secs_f64(
                plan.connections as f64 / rate_per_s,
            )),
        };
        let conns = (0..share.conns)
            .map(|i| {
                let global = share.first_conn + i;
                // Spread the connections' schedules evenly over one interval.
                let offset = interval
                    .map(|iv| iv.mul_f64(global as f64 / plan.connections as f64))
                    .unwrap_or_default();
                Conn {
                    stream: None,
                    phase: Phase::Down(window.start),
                    reader: ResponseReader::new(plan.response_bytes_max),
                    next_req: global % plan.requests.len(),
                    req: 0,
                    origin: window.start,
                    deadline: window.start,
                    next_send: window.start + offset,
                    watch_out: false,
                }
            })
            .collect();
        Ok(Worker {
            plan,
            window,
            poller: Poller::new()?,
            conns,
            stats: Stats::new(),
            budget: share.requests,
            interval,
            schedule: BinaryHeap::new(),
            in_flight: 0,
            last_answer: None,
            last_progress: window.start,
            progress,
        })
    }

    fn run(&mut self) -> io::Result<()> {
        let mut next_tick = Instant::now();
        loop {
            let now = Instant::now();
            if self.finished(now) {
                return Ok(());
            }
            if now >= next_tick {
                self.tick(now);
                next_tick = now + TICK;
            }
            self.send_due(now);
            let mut wake = next_tick;
            if let Some(end) = self.window.end {
                wake = wake.min(end);
            }
            if let Some(Reverse((at, _))) = self.schedule.peek() {
                wake = wake.min(*at);
            }
            let n = self.poller.wait(wake.saturating_duration_since(now))?;
            for k in 0..n {
                let r = self.poller.event(k);
                self.on_ready(r.token, r.readable, r.writable, r.failed);
            }
            self.progress
                .answers
                .store(self.stats.answers(), Ordering::Relaxed);
            self.progress
                .errors
                .store(self.stats.errors.total(), Ordering::Relaxed);
        }
    }

    /// Whether this thread is done: the window is over, or its budget is
    /// spent and answered, or (counted runs) no connection was made and no
    /// answer came in for twice --timeout (a request times out, and its
    /// reconnect counts as movement, before that).
    fn finished(&self, now: Instant) -> bool {
        if let Some(end) = self.window.end {
            return now >= end;
        }
        if self.budget == Some(0) && self.in_flight == 0 {
            return true;
        }
        now.saturating_duration_since(self.last_progress) > self.plan.timeout * 2
    }

    fn measuring(&self, at: Instant) -> bool {
        at >= self.window.measure_from
    }

    /// Expires timed-out requests and connects, and reopens dropped connections.
    fn tick(&mut self, now: Instant) {
        for i in 0..self.conns.len() {
            match self.conns[i].phase {
                Phase::Down(at) if at <= now => self.connect(i, now),
                Phase::Connecting if self.conns[i].deadline <= now => {
                    self.count(now, |e| e.connect += 1);
                    self.drop_conn(i, now);
                }
                Phase::Busy { .. } if self.conns[i].deadline <= now => {
                    let origin = self.conns[i].origin;
                    self.count(origin, |e| e.timeout += 1);
                    self.drop_conn(i, now);
                }
                _ => {}
            }
        }
    }

    /// Counts an error of a request that started at `at` (warm-up ones are not).
    fn count(&mut self, at: Instant, f: impl FnOnce(&mut super::stats::Errors)) {
        if self.measuring(at) {
            f(&mut self.stats.errors);
        }
    }

    fn connect(&mut self, i: usize, now: Instant) {
        match TcpStream::connect(self.plan.target.addr) {
            Ok(s) => {
                if let Err(_e) = self.poller.add(s.as_raw_fd(), i, true) {
                    self.count(now, |e| e.connect += 1);
                    self.conns[i].phase = Phase::Down(now + RECONNECT_DELAY);
                    return;
                }
                let c = &mut self.conns[i];
                c.stream = Some(s);
                c.watch_out = true;
                c.phase = Phase::Connecting;
                c.deadline = now + self.plan.timeout;
                c.reader.reset();
            }
            Err(_) => {
                self.count(now, |e| e.connect += 1);
                self.conns[i].phase = Phase::Down(now + RECONNECT_DELAY);
            }
        }
    }

    /// Closes connection `i` (abandoning any request) and schedules a reconnect.
    fn drop_conn(&mut self, i: usize, now: Instant) {
        let c = &mut self.conns[i];
        if matches!(c.phase, Phase::Busy { .. }) {
            self.in_flight -= 1;
        }
        c.stream = None; // closing the socket also removes it from the poller
        c.reader.reset();
        c.phase = Phase::Down(now + RECONNECT_DELAY);
    }

    /// Open loop: sends every request whose time has come on a ready connection.
    fn send_due(&mut self, now: Instant) {
        while let Some(&Reverse((at, i))) = self.schedule.peek() {
            if at > now {
                break;
            }
            self.schedule.pop();
            if matches!(self.conns[i].phase, Phase::Ready) {
                self.next_request(i, now);
            }
        }
    }

    /// Connection `i` is ready: send its next request now (closed loop, or open
    /// loop when it is due) or schedule it.
    fn next_request(&mut self, i: usize, now: Instant) {
        if self.budget == Some(0) && self.measuring(now) {
            return;
        }
        let origin = match self.interval {
            None => now,
            Some(iv) => {
                let at = self.conns[i].next_send;
                if at > now {
                    self.schedule.push(Reverse((at, i)));
                    return;
                }
                self.conns[i].next_send = at + iv;
                at
            }
        };
        if let Some(b) = self.budget.as_mut() {
            if origin >= self.window.measure_from {
                if *b == 0 {
                    return;
                }
                *b -= 1;
            }
        }
        let c = &mut self.conns[i];
        c.req = c.next_req;
        c.next_req = (c.next_req + 1) % self.plan.requests.len();
        c.origin = origin;
        c.deadline = now + self.plan.timeout;
        c.phase = Phase::Busy { sent: 0 };
        c.reader.expect(self.plan.requests[c.req].is_head);
        self.in_flight += 1;
        self.write(i, now);
    }

    /// Writes what is left of connection `i`'s request.
    fn write(&mut self, i: usize, now: Instant) {
        let c = &mut self.conns[i];
        let Phase::Busy { sent } = c.phase else {
            return;
        };
        let bytes = &self.plan.requests[c.req].bytes;
        if sent == bytes.len() {
            return;
        }
        let stream = c.stream.as_ref().expect("a busy connection has a socket");
        match (&*stream).write(&bytes[sent..]) {
            Ok(n) => c.phase = Phase::Busy { sent: sent + n },
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => {
                let origin = c.origin;
                self.count(origin, |e| e.io += 1);
                self.drop_conn(i, now);
                return;
            }
        }
        let Phase::Busy { sent } = c.phase else {
            return;
        };
        let want_out = sent < bytes.len();
        if want_out != c.watch_out {
            c.watch_out = want_out;
            let fd = stream.as_raw_fd();
            let _ = self.poller.modify(fd, i, want_out);
        }
    }

    fn on_ready(&mut self, i: usize, readable: bool, writable: bool, failed: bool) {
        let now = Instant::now();
        match self.conns[i].phase {
            Phase::Down(_) => {}
            Phase::Connecting if writable || failed => self.connected(i, now),
            Phase::Connecting => {}
            Phase::Ready | Phase::Busy { .. } => {
                if writable {
                    self.write(i, now);
                }
                if readable || failed {
                    self.read(i);
                }
            }
        }
    }

    fn connected(&mut self, i: usize, now: Instant) {
        let c = &mut self.conns[i];
        let stream = c
            .stream
            .as_ref()
            .expect("a connecting connection has a socket");
        let ok = matches!(stream.take_error(), Ok(None)) && stream.peer_addr().is_ok();
        if !ok {
            self.count(now, |e| e.connect += 1);
            self.drop_conn(i, now);
            return;
        }
        let _ = stream.set_nodelay(true);
        c.watch_out = false;
        let _ = self.poller.modify(stream.as_raw_fd(), i, false);
        c.phase = Phase::Ready;
        self.last_progress = now;
        self.next_request(i, now);
    }

    fn read(&mut self, i: usize) {
        let c = &mut self.conns[i];
        let Some(stream) = c.stream.as_ref() else {
            return;
        };
        let event = match (&*stream).read(c.reader.spare()) {
            Ok(0) => match c.reader.eof() {
                Some(e) => Some(e),
                None => {
                    // The server closed an idle keep-alive connection.
                    self.drop_conn(i, Instant::now());
                    return;
                }
            },
            Ok(n) => {
                c.reader.filled(n);
                c.reader.poll()
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(_) => {
                let (busy, origin) = (c.reader.busy(), c.origin);
                if busy {
                    self.count(origin, |e| e.io += 1);
                }
                self.drop_conn(i, Instant::now());
                return;
            }
        };
        match event {
            None => {}
            Some(Event::Complete { status, close }) => self.answered(i, status, close),
            Some(Event::Malformed(_)) => {
                let origin = self.conns[i].origin;
                self.count(origin, |e| e.malformed += 1);
                self.drop_conn(i, Instant::now());
            }
        }
    }

    fn answered(&mut self, i: usize, status: u16, close: bool) {
        let now = Instant::now();
        let origin = self.conns[i].origin;
        self.in_flight -= 1;
        self.last_progress = now;
        if self.measuring(origin) && self.window.end.is_none_or(|end| now <= end) {
            let latency_us = now.saturating_duration_since(origin).as_micros() as u64;
            let second = now
                .saturating_duration_since(self.window.measure_from)
                .as_secs();
            self.stats.answer(status, latency_us, second as usize);
            if let Some(t) = self.conns[i].reader.take_timing() {
                self.stats.phases.record(&t, latency_us);
            }
            self.last_answer = Some(now);
        }
        self.conns[i].phase = Phase::Ready;
        if close {
            self.conns[i].stream = None;
            self.conns[i].reader.reset();
            self.connect(i, now);
        } else {
            self.next_request(i, now);
        }
    }
}

/// Splits `total` into `parts` near-equal shares, larger ones first.
pub fn split(total: u64, parts: usize) -> Vec<u64> {
    let parts = parts.max(1) as u64;
    (0..parts)
        .map(|i| total / parts + u64::from(i < total % parts))
        .collect()
}

/// The shares of a plan's threads.
pub fn shares(plan: &Plan) -> Vec<Share> {
    let conns = split(plan.connections as u64, plan.threads);
    let requests = match plan.stop {
        Stop::Requests(n) => split(n, plan.threads).into_iter().map(Some).collect(),
        Stop::After(_) => vec![None; plan.threads],
    };
    let mut first = 0;
    conns
        .into_iter()
        .zip(requests)
        .map(|(c, r)| {
            let s = Share {
                first_conn: first,
                conns: c as usize,
                requests: r,
            };
            first += c as usize;
            s
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_the_total() {
        assert_eq!(split(10, 3), vec![4, 3, 3]);
        assert_eq!(split(2, 4), vec![1, 1, 0, 0]);
        assert_eq!(split(7, 1), vec![7]);
    }
}
