//! A bounded in-memory ring of a function's log lines (`GET /functions/<id>/logs`),
//! the per-instance intake that rate-limits what enters it, and the thread
//! that collects raw output from agents' log sockets.
//!
//! Output is untrusted: a function can send LOG frames of up to
//! `protocol::BODY_BYTES_MAX` (8 MiB) holding nothing but newlines, as fast as
//! it likes, on the core's event loop. So every step is bounded: one push
//! takes at most [`LOG_PUSH_LINES_MAX`] lines from the first
//! [`LOG_PUSH_BYTES_MAX`] bytes, a line is cut at [`LOG_LINE_BYTES_MAX`], the
//! ring never holds more than [`LOG_LINES_MAX`] lines or [`LOG_BYTES_MAX`]
//! bytes of text, and each instance's [`LogIntake`] is a token bucket. What
//! is left out is counted (per function in `/metrics`) and reported by one
//! note line at most every [`LOG_NOTE_INTERVAL`].

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Function;
use crate::protocol::{FrameDecoder, FrameType, LOG_STDERR};
use crate::util::time::unix_time_ms;

/// Lines kept per function.
pub const LOG_LINES_MAX: usize = 1000;
/// Bytes of message text kept per function.
pub const LOG_BYTES_MAX: usize = 1 << 20;
/// Longest line kept whole; longer lines are cut into pieces of this size
/// (the agent's limit too).
pub const LOG_LINE_BYTES_MAX: usize = 16 * 1024;
/// Bytes of one push (one LOG frame) split into lines (the shim's and the
/// agent's frames are no larger); the rest is dropped and counted.
pub const LOG_PUSH_BYTES_MAX: usize = 64 * 1024;
/// Lines taken from one push; the rest is dropped and counted.
pub const LOG_PUSH_LINES_MAX: usize = LOG_LINES_MAX;
/// Sustained log bytes per second one instance may add (per output route:
/// its channel and its agent's log socket each have a bucket).
pub const LOG_RATE_BYTES_PER_S: u64 = 1 << 20;
/// Bytes one instance may add at once after being quiet.
pub const LOG_BURST_BYTES: u64 = 2 << 20;
/// Sustained log lines per second one instance may add (per output route).
pub const LOG_RATE_LINES_PER_S: u64 = 5000;
/// Lines one instance may add at once after being quiet.
pub const LOG_BURST_LINES: u64 = 10_000;
/// Least time between two notes of dropped output from one instance.
pub const LOG_NOTE_INTERVAL: Duration = Duration::from_secs(1);

/// One captured line.
pub struct LogLine {
    pub time_ms: u64,
    /// Shared by consecutive lines of one request.
    pub request_id: Arc<str>,
    pub stderr: bool,
    pub message: Box<str>,
}

impl serde::Serialize for LogLine {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(4))?;
        m.serialize_entry("time_ms", &self.time_ms)?;
        m.serialize_entry("requestId", &*self.request_id)?;
        m.serialize_entry("stream", if self.stderr { "stderr" } else { "stdout" })?;
        m.serialize_entry("message", &*self.message)?;
        m.end()
    }
}

/// The newest lines of a function, oldest dropped first.
#[derive(Default)]
pub struct LogRing {
    lines: VecDeque<LogLine>,
    bytes: usize,
    /// Lines pushed out by newer ones.
    pub dropped: u64,
}

/// What one push took of its text.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Taken {
    /// Bytes of the text consumed (newlines included).
    pub bytes: usize,
    /// Lines added.
    pub lines: usize,
}

impl LogRing {
    /// Adds the lines of `text`, at most [`LOG_PUSH_LINES_MAX`] of them from
    /// its first [`LOG_PUSH_BYTES_MAX`] bytes (for the host's own messages;
    /// instance output goes through a [`LogIntake`]).
    pub fn push(&mut self, request_id: &str, stderr: bool, text: &[u8]) -> Taken {
        self.push_bounded(
            request_id,
            stderr,
            text,
            LOG_PUSH_LINES_MAX,
            LOG_PUSH_BYTES_MAX,
        )
    }

    /// Adds lines of `text` from its start until `lines_max` lines or
    /// `bytes_max` bytes are taken.
    pub fn push_bounded(
        &mut self,
        request_id: &str,
        stderr: bool,
        text: &[u8],
        lines_max: usize,
        bytes_max: usize,
    ) -> Taken {
        let time_ms = unix_time_ms();
        let mut rid: Option<Arc<str>> = None;
        split_lines(text, lines_max.min(LOG_PUSH_LINES_MAX), bytes_max, |line| {
            let rid = rid
                .get_or_insert_with(|| self.request_id(request_id))
                .clone();
            self.push_line(time_ms, rid, stderr, line);
        })
    }

    /// Adds lines printed while an instance started.
    pub fn extend_init(&mut self, lines: &[String]) {
        let time_ms = unix_time_ms();
        let rid = self.request_id("init");
        for l in lines.iter().take(LOG_LINES_MAX) {
            self.push_line(time_ms, rid.clone(), false, l.as_bytes());
        }
    }

    /// The kept lines, oldest first.
    pub fn lines(&self) -> impl Iterator<Item = &LogLine> {
        self.lines.iter()
    }

    /// The newest line's request id if it is `id`, so that lines share it.
    fn request_id(&self, id: &str) -> Arc<str> {
        match self.lines.back() {
            Some(l) if &*l.request_id == id => l.request_id.clone(),
            _ => Arc::from(id),
        }
    }

    /// Appends one line (cut at [`LOG_LINE_BYTES_MAX`]), first dropping the
    /// oldest ones as needed, so the ring never grows past its bounds.
    fn push_line(&mut self, time_ms: u64, request_id: Arc<str>, stderr: bool, line: &[u8]) {
        let line = &line[..line.len().min(LOG_LINE_BYTES_MAX)];
        let message: Box<str> = String::from_utf8_lossy(line).into();
        while !self.lines.is_empty()
            && (self.lines.len() >= LOG_LINES_MAX || self.bytes + message.len() > LOG_BYTES_MAX)
        {
            let old = self.lines.pop_front().expect("not empty");
            self.bytes -= old.message.len();
            self.dropped += 1;
        }
        self.bytes += message.len();
        self.lines.push_back(LogLine {
            time_ms,
            request_id,
            stderr,
            message,
        });
        debug_assert!(self.lines.len() <= LOG_LINES_MAX);
    }
}

/// Calls `each` with the lines of `text` (without `\n` or `\r\n`; a line
/// longer than [`LOG_LINE_BYTES_MAX`] comes in pieces of that size) from its
/// start, until `lines_max` lines or `bytes_max` bytes of `text` are taken.
/// The work is bounded by what is taken, not by the length of `text`.
pub fn split_lines(
    text: &[u8],
    lines_max: usize,
    bytes_max: usize,
    mut each: impl FnMut(&[u8]),
) -> Taken {
    let mut taken = Taken { bytes: 0, lines: 0 };
    while taken.bytes < text.len() && taken.lines < lines_max {
        let rest = &text[taken.bytes..];
        let window = &rest[..rest.len().min(LOG_LINE_BYTES_MAX)];
        let (line, used) = match memchr::memchr(b'\n', window) {
            Some(i) => (&window[..i], i + 1),
            None => (window, window.len()),
        };
        if taken.bytes + used > bytes_max {
            break;
        }
        each(line.strip_suffix(b"\r").unwrap_or(line));
        taken.bytes += used;
        taken.lines += 1;
    }
    taken
}

/// Lines in `text`: its newlines, plus an unfinished last line.
pub fn count_lines(text: &[u8]) -> u64 {
    let newlines = memchr::memchr_iter(b'\n', text).count() as u64;
    newlines + u64::from(text.last().is_some_and(|&b| b != b'\n'))
}

/// One instance's admission of output into its function's log: a token
/// bucket on bytes and one on lines, refilled with time, and the count of
/// what was dropped since the last note. Owned by whoever reads the
/// instance's output (the core's pool for its channel, the collector for its
/// log socket), so it needs no lock.
pub struct LogIntake {
    bytes: f64,
    lines: f64,
    refilled: Instant,
    dropped_lines: u64,
    dropped_bytes: u64,
    noted: Option<Instant>,
}

impl LogIntake {
    /// A full bucket.
    pub fn new(now: Instant) -> LogIntake {
        LogIntake {
            bytes: LOG_BURST_BYTES as f64,
            lines: LOG_BURST_LINES as f64,
            refilled: now,
            dropped_lines: 0,
            dropped_bytes: 0,
            noted: None,
        }
    }

    /// Takes one LOG frame body into `function`'s log, as far as the bucket
    /// and the per-push bounds allow; counts the rest (in the function's
    /// metrics too) and notes it in the log at most every
    /// [`LOG_NOTE_INTERVAL`]. Work: the lines taken plus one `memchr` pass
    /// over the rest.
    pub fn take(
        &mut self,
        function: &Function,
        request_id: &str,
        stderr: bool,
        body: &[u8],
        now: Instant,
    ) {
        self.refill(now);
        let lines_max = (self.lines as usize).min(LOG_PUSH_LINES_MAX);
        let bytes_max = (self.bytes as usize).min(LOG_PUSH_BYTES_MAX);
        let taken = if lines_max == 0 || bytes_max == 0 {
            Taken { bytes: 0, lines: 0 }
        } else {
            function
                .logs
                .lock()
                .unwrap()
                .push_bounded(request_id, stderr, body, lines_max, bytes_max)
        };
        self.lines -= taken.lines as f64;
        self.bytes -= taken.bytes as f64;
        let rest = &body[taken.bytes..];
        if !rest.is_empty() {
            let lines = count_lines(rest);
            self.dropped_lines += lines;
            self.dropped_bytes += rest.len() as u64;
            crate::metrics::add(&function.metrics.log_dropped_lines, lines);
            crate::metrics::add(&function.metrics.log_dropped_bytes, rest.len() as u64);
        }
        self.note_drops(function, now);
    }

    /// Notes the output dropped since the last note in the log, if there is
    /// some and the last note is [`LOG_NOTE_INTERVAL`] old. Called after each
    /// frame and now and then by the owner, so that drops are reported even
    /// when the instance falls silent.
    pub fn note_drops(&mut self, function: &Function, now: Instant) {
        let due = self
            .noted
            .is_none_or(|t| now.saturating_duration_since(t) >= LOG_NOTE_INTERVAL);
        if self.dropped_bytes > 0 && due {
            let note = format!(
                "[hearth: {} lines ({} bytes) of output dropped: over the log rate or size limit]",
                self.dropped_lines, self.dropped_bytes
            );
            function
                .logs
                .lock()
                .unwrap()
                .push("host", true, note.as_bytes());
            self.dropped_lines = 0;
            self.dropped_bytes = 0;
            self.noted = Some(now);
        }
    }

    fn refill(&mut self, now: Instant) {
        let s = now.saturating_duration_since(self.refilled).as_secs_f64();
        self.refilled = now;
        self.bytes = (self.bytes + s * LOG_RATE_BYTES_PER_S as f64).min(LOG_BURST_BYTES as f64);
        self.lines = (self.lines + s * LOG_RATE_LINES_PER_S as f64).min(LOG_BURST_LINES as f64);
    }
}

/// Reads the log sockets of instances whose agent sends raw output apart from
/// the channel (the process backend's direct mode) into their functions'
/// rings, on one thread for all of them. A socket leaves when it closes (its
/// instance died) or breaks the protocol; only LOG frames are accepted.
pub struct LogCollector {
    tx: std::sync::Mutex<std::sync::mpsc::Sender<(OwnedFd, Arc<Function>)>>,
    waker: mio::Waker,
}

const WAKE: mio::Token = mio::Token(usize::MAX);

impl LogCollector {
    /// Starts the collector thread.
    pub fn start() -> std::io::Result<LogCollector> {
        let poll = mio::Poll::new()?;
        let waker = mio::Waker::new(poll.registry(), WAKE)?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("hearth-logs".into())
            .spawn(move || collect(poll, rx))?;
        Ok(LogCollector {
            tx: std::sync::Mutex::new(tx),
            waker,
        })
    }

    /// Reads `socket` into `function`'s log ring until it closes.
    pub fn add(&self, socket: OwnedFd, function: Arc<Function>) {
        if self.tx.lock().unwrap().send((socket, function)).is_ok() {
            let _ = self.waker.wake();
        }
    }
}

/// One log socket: its function and what has been read of it.
struct Source {
    sock: mio::net::UnixStream,
    function: Arc<Function>,
    dec: FrameDecoder,
    /// What the instance may still add to the log.
    intake: LogIntake,
    /// The agent broke the protocol: the rest is read and thrown away. The
    /// socket stays open: closing it would tell the agent the host is gone,
    /// which stops the instance.
    discarding: bool,
}

/// Reads per socket and wakeup before the others get a turn.
const READS_PER_TURN: usize = 16;
const READ_BYTES: usize = 64 * 1024;

fn collect(mut poll: mio::Poll, rx: std::sync::mpsc::Receiver<(OwnedFd, Arc<Function>)>) {
    let mut socks: slab::Slab<Source> = slab::Slab::new();
    let mut events = mio::Events::with_capacity(64);
    // Sockets that still had data when their turn ended (edge-triggered).
    let mut again: Vec<usize> = Vec::new();
    let mut next_note = Instant::now() + LOG_NOTE_INTERVAL;
    loop {
        let now = Instant::now();
        if now >= next_note {
            for (_, src) in socks.iter_mut() {
                src.intake.note_drops(&src.function, now);
            }
            next_note = now + LOG_NOTE_INTERVAL;
        }
        let timeout = if again.is_empty() {
            next_note.saturating_duration_since(now)
        } else {
            Duration::ZERO
        };
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            // Never give up: exiting would close every socket, which stops
            // every instance. Back off and retry.
            if e.kind() != std::io::ErrorKind::Interrupted {
                eprintln!("hearth: log collector: poll: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
            continue;
        }
        let mut ready: Vec<usize> = std::mem::take(&mut again);
        for ev in events.iter() {
            if ev.token() == WAKE {
                while let Ok((fd, function)) = rx.try_recv() {
                    let std_sock = std::os::unix::net::UnixStream::from(fd);
                    if std_sock.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let mut sock = mio::net::UnixStream::from_std(std_sock);
                    let entry = socks.vacant_entry();
                    let key = entry.key();
                    if poll
                        .registry()
                        .register(&mut sock, mio::Token(key), mio::Interest::READABLE)
                        .is_ok()
                    {
                        entry.insert(Source {
                            sock,
                            function,
                            dec: FrameDecoder::new(),
                            intake: LogIntake::new(Instant::now()),
                            discarding: false,
                        });
                        // Output written before registration raised no edge.
                        ready.push(key);
                    }
                }
            } else if !ready.contains(&ev.token().0) {
                ready.push(ev.token().0);
            }
        }
        for k in ready {
            let Some(src) = socks.get_mut(k) else {
                continue;
            };
            match read_turn(src) {
                Turn::Drained => {}
                Turn::More => again.push(k),
                Turn::Closed => {
                    let mut src = socks.remove(k);
                    let _ = poll.registry().deregister(&mut src.sock);
                }
            }
        }
    }
}

enum Turn {
    /// Everything available was read.
    Drained,
    /// The turn ended with data left.
    More,
    /// End of file or a read error: the instance is gone.
    Closed,
}

/// Reads up to [`READS_PER_TURN`] chunks into the function's log ring.
fn read_turn(src: &mut Source) -> Turn {
    use std::io::Read;
    for _ in 0..READS_PER_TURN {
        let buf = src.dec.spare(READ_BYTES);
        let n = match src.sock.read(buf) {
            Ok(0) => return Turn::Closed,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                src.dec.filled(READ_BYTES, 0);
                if src.dec.pending() == 0 {
                    // Give back the room a large frame took.
                    src.dec = FrameDecoder::new();
                }
                return Turn::Drained;
            }
            Err(_) => return Turn::Closed,
        };
        src.dec.filled(READ_BYTES, n);
        if src.discarding {
            src.dec = FrameDecoder::new();
            continue;
        }
        loop {
            match src.dec.next_frame() {
                Ok(Some(fr)) if fr.kind == FrameType::Log => src.intake.take(
                    &src.function,
                    "",
                    fr.flags & LOG_STDERR != 0,
                    &fr.body,
                    Instant::now(),
                ),
                Ok(None) => break,
                Ok(Some(_)) | Err(_) => {
                    src.function.logs.lock().unwrap().push(
                        "host",
                        true,
                        b"an instance's agent sent something other than log frames on its log socket; its further raw output is discarded",
                    );
                    src.discarding = true;
                    src.dec = FrameDecoder::new();
                    break;
                }
            }
        }
    }
    Turn::More
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::FunctionSpec;

    fn function() -> Function {
        Function::new(
            FunctionSpec {
                id: "f".into(),
                handler: "index.handler".into(),
                memory_mb: 128,
                timeout_ms: 1000,
                concurrency: 1,
                env: Vec::new(),
                created_ms: 0,
                code_bytes: 0,
                backend: "process".into(),
                name: None,
                service: Default::default(),
                runtime: Default::default(),
            },
            "/nonexistent".into(),
            crate::functions::budget::Budget::new("instance memory", "MiB", 1 << 20),
        )
    }

    fn messages(f: &Function) -> Vec<String> {
        let ring = f.logs.lock().unwrap();
        ring.lines().map(|l| l.message.to_string()).collect()
    }

    #[test]
    fn lines_split_like_str_lines_and_long_ones_are_cut() {
        let mut got = Vec::new();
        let t = split_lines(b"a\r\n\nb", 10, usize::MAX, |l| got.push(l.to_vec()));
        assert_eq!(got, vec![b"a".to_vec(), b"".to_vec(), b"b".to_vec()]);
        assert_eq!(t, Taken { bytes: 5, lines: 3 });
        let long = vec![b'x'; LOG_LINE_BYTES_MAX + 3];
        let mut lens = Vec::new();
        split_lines(&long, 10, usize::MAX, |l| lens.push(l.len()));
        assert_eq!(lens, vec![LOG_LINE_BYTES_MAX, 3]);
    }

    #[test]
    fn a_push_stops_at_its_line_and_byte_bounds() {
        let t = split_lines(b"one\ntwo\nthree\n", 2, usize::MAX, |_| {});
        assert_eq!(t, Taken { bytes: 8, lines: 2 });
        // A line that does not fit in the byte budget is not taken.
        let t = split_lines(b"one\ntwo\n", 10, 6, |_| {});
        assert_eq!(t, Taken { bytes: 4, lines: 1 });
        assert_eq!(count_lines(b"two\nthree"), 2);
        assert_eq!(count_lines(b"\n\n"), 2);
        assert_eq!(count_lines(b""), 0);
    }

    #[test]
    fn the_ring_never_grows_past_its_bounds() {
        let mut ring = LogRing::default();
        for _ in 0..3 {
            ring.push("r", false, &vec![b'\n'; 64 * 1024]);
        }
        assert_eq!(ring.lines().count(), LOG_LINES_MAX);
        assert!(ring.lines.capacity() < 2 * LOG_LINES_MAX);
        let big = vec![b'y'; LOG_LINE_BYTES_MAX - 1];
        for _ in 0..200 {
            ring.push("r", true, &big);
        }
        assert!(ring.bytes <= LOG_BYTES_MAX);
        assert_eq!(
            ring.bytes,
            ring.lines().map(|l| l.message.len()).sum::<usize>()
        );
        // Consecutive lines of one request share its id.
        let mut it = ring.lines.iter().rev();
        let (a, b) = (it.next().unwrap(), it.next().unwrap());
        assert!(Arc::ptr_eq(&a.request_id, &b.request_id));
    }

    #[test]
    fn an_8_mib_frame_of_newlines_is_cut_counted_and_noted_once() {
        let f = function();
        let t0 = Instant::now();
        let mut intake = LogIntake::new(t0);
        let frame = vec![b'\n'; 8 << 20];
        intake.take(&f, "r1", false, &frame, t0);
        let m = messages(&f);
        assert_eq!(m.len(), LOG_LINES_MAX);
        assert_eq!(
            m.last().unwrap(),
            &format!(
                "[hearth: {} lines ({} bytes) of output dropped: over the log rate or size limit]",
                (8 << 20) - LOG_LINES_MAX,
                (8 << 20) - LOG_LINES_MAX
            )
        );
        let dropped = f
            .metrics
            .log_dropped_lines
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(dropped, (8 << 20) - LOG_LINES_MAX as u64);
        // More floods within the note interval add no note lines.
        for _ in 0..5 {
            intake.take(&f, "r1", false, &frame, t0);
        }
        let notes = messages(&f)
            .iter()
            .filter(|m| m.starts_with("[hearth:"))
            .count();
        assert_eq!(notes, 0);
        // The next output after the interval brings one note of all of them.
        intake.take(&f, "r1", false, b"later\n", t0 + LOG_NOTE_INTERVAL);
        let m = messages(&f);
        assert_eq!(m[m.len() - 2], "later");
        let five = 5 * ((8 << 20) - LOG_LINES_MAX);
        let note = m.last().unwrap();
        assert!(
            note.starts_with(&format!("[hearth: {five} lines")),
            "{note}"
        );
    }

    /// Waits up to 5 s for a line of `f`'s log that starts with `prefix`.
    fn wait_for(f: &Function, prefix: &str) -> bool {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if messages(f).iter().any(|m| m.starts_with(prefix)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[test]
    fn the_log_socket_refuses_oversized_frames_and_floods_are_bounded() {
        use std::io::Write;
        let collector = LogCollector::start().unwrap();
        // A flood: one frame of the largest body, nothing but newlines.
        let (mut agent, host) = std::os::unix::net::UnixStream::pair().unwrap();
        let f = Arc::new(function());
        collector.add(OwnedFd::from(host), f.clone());
        let mut wire = Vec::new();
        let body = vec![b'\n'; crate::protocol::BODY_BYTES_MAX];
        crate::protocol::encode(&mut wire, FrameType::Log, 0, 0, b"", &body);
        agent.write_all(&wire).unwrap();
        assert!(wait_for(&f, "[hearth: "), "{:?}", messages(&f).last());
        assert_eq!(messages(&f).len(), LOG_LINES_MAX);
        // A header announcing more than the protocol allows is refused at
        // once (nothing is buffered for it), and the rest is discarded.
        let (mut agent, host) = std::os::unix::net::UnixStream::pair().unwrap();
        let f = Arc::new(function());
        collector.add(OwnedFd::from(host), f.clone());
        let mut head = Vec::new();
        crate::protocol::encode(&mut head, FrameType::Log, 0, 0, b"", b"");
        head[12..16].copy_from_slice(&(1u32 << 30).to_le_bytes());
        agent.write_all(&head).unwrap();
        assert!(wait_for(&f, "an instance's agent sent something other"));
        let mut later = Vec::new();
        crate::protocol::encode(&mut later, FrameType::Log, 0, 0, b"", b"later\n");
        agent.write_all(&later).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(!messages(&f).iter().any(|m| m == "later"));
    }

    #[test]
    fn the_bucket_limits_an_instance_and_refills_with_time() {
        let f = function();
        let t0 = Instant::now();
        let mut intake = LogIntake::new(t0);
        let line = vec![b'z'; 1023];
        let mut frame = Vec::new();
        for _ in 0..60 {
            frame.extend_from_slice(&line);
            frame.push(b'\n');
        }
        // 60 KiB a frame: the 2 MiB burst takes 34 frames, then nothing.
        for _ in 0..100 {
            intake.take(&f, "", false, &frame, t0);
        }
        let taken = LOG_BURST_BYTES / 1024;
        let dropped = f
            .metrics
            .log_dropped_bytes
            .load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(dropped, 100 * 60 * 1024 - taken * 1024);
        // A second later a second's worth is taken again, and the drops noted.
        let pushed_out = f.logs.lock().unwrap().dropped;
        let before = pushed_out + messages(&f).len() as u64;
        intake.take(&f, "", false, b"back\n", t0 + Duration::from_secs(1));
        let m = messages(&f);
        assert_eq!(m[m.len() - 2], "back");
        assert!(m[m.len() - 1].starts_with("[hearth: "), "{:?}", m.last());
        let pushed_out = f.logs.lock().unwrap().dropped;
        assert_eq!(pushed_out + m.len() as u64, before + 2);
    }
}
