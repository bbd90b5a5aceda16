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

fn collect(mut poll: mio::Poll, rx: std::sync::mpsc::Receiver<(OwnedFd, Arc<Function>)>) {
    let mut socks: slab::Slab<(mio::net::UnixStream, Arc<Function>, FrameDecoder)> =
        slab::Slab::new();
    let mut events = mio::Events::with_capacity(64);
    loop {
        if let Err(e) = poll.poll(&mut events, None) {
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            eprintln!("hearth: log collector stopped: {e}");
            return;
        }
        for ev in events.iter() {
            if ev.token() == WAKE {
                while let Ok((fd, f)) = rx.try_recv() {
                    let std_sock = std::os::unix::net::UnixStream::from(fd);
                    if std_sock.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let mut sock = mio::net::UnixStream::from_std(std_sock);
                    let entry = socks.vacant_entry();
                    if poll
                        .registry()
                        .register(&mut sock, mio::Token(entry.key()), mio::Interest::READABLE)
                        .is_ok()
                    {
                        entry.insert((sock, f, FrameDecoder::new()));
                    }
                }
                continue;
            }
            let k = ev.token().0;
            let Some((sock, f, dec)) = socks.get_mut(k) else {
                continue;
            };
            if !drain(sock, f, dec) {
                let (mut sock, _, _) = socks.remove(k);
                let _ = poll.registry().deregister(&mut sock);
            }
        }
    }
}

/// Reads everything available; false when the socket is finished with.
fn drain(sock: &mut mio::net::UnixStream, f: &Function, dec: &mut FrameDecoder) -> bool {
    use std::io::Read;
    loop {
        let buf = dec.spare(64 * 1024);
        match sock.read(buf) {
            Ok(0) => return false,
            Ok(n) => dec.filled(64 * 1024, n),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                dec.filled(64 * 1024, 0);
                continue;
            }
            Err(_) => return false,
        }
        loop {
            match dec.next_frame() {
                Ok(Some(fr)) if fr.kind == FrameType::Log => {
                    f.logs
                        .lock()
                        .unwrap()
                        .push("", fr.flags & LOG_STDERR != 0, &fr.body)
                }
                Ok(Some(_)) | Err(_) => return false,
                Ok(None) => break,
            }
        }
    }
}
