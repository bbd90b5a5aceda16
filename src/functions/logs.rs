//! A bounded in-memory ring of a function's log lines (`GET /functions/<id>/logs`),
//! and the thread that collects raw output from agents' log sockets.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use super::Function;
use crate::protocol::{FrameDecoder, FrameType, LOG_STDERR};

/// Lines kept per function.
pub const LOG_LINES_MAX: usize = 1000;
/// Bytes kept per function.
pub const LOG_BYTES_MAX: usize = 1 << 20;

/// One captured line.
#[derive(serde::Serialize)]
pub struct LogLine {
    pub time_ms: u64,
    #[serde(rename = "requestId")]
    pub request_id: String,
    pub stream: &'static str,
    pub message: String,
}

/// The newest lines of a function, oldest dropped first.
#[derive(Default)]
pub struct LogRing {
    lines: VecDeque<LogLine>,
    bytes: usize,
    pub dropped: u64,
}

impl LogRing {
    /// Adds the lines of `text`.
    pub fn push(&mut self, request_id: &str, stderr: bool, text: &[u8]) {
        let time_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        for line in String::from_utf8_lossy(text).lines() {
            self.bytes += line.len();
            self.lines.push_back(LogLine {
                time_ms,
                request_id: request_id.to_string(),
                stream: if stderr { "stderr" } else { "stdout" },
                message: line.to_string(),
            });
        }
        while self.lines.len() > LOG_LINES_MAX || self.bytes > LOG_BYTES_MAX {
            let Some(old) = self.lines.pop_front() else {
                break;
            };
            self.bytes -= old.message.len();
            self.dropped += 1;
        }
    }

    /// Adds lines printed while an instance started.
    pub fn extend_init(&mut self, lines: &[String]) {
        for l in lines {
            self.push("init", false, l.as_bytes());
        }
    }

    /// The kept lines, oldest first.
    pub fn lines(&self) -> impl Iterator<Item = &LogLine> {
        self.lines.iter()
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
    loop {
        let timeout = (!again.is_empty()).then_some(std::time::Duration::ZERO);
        if let Err(e) = poll.poll(&mut events, timeout) {
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
                Ok(Some(fr)) if fr.kind == FrameType::Log => src
                    .function
                    .logs
                    .lock()
                    .unwrap()
                    .push("", fr.flags & LOG_STDERR != 0, &fr.body),
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
