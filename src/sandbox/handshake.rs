//! The start-up exchange every backend performs on a new channel: send HELLO,
//! wait for READY (or INIT_ERROR), keeping the tail of the log output on the
//! way (an [`OutputTail`]: however much a runtime prints while loading, only
//! its last lines are kept).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

use crate::protocol::{self, FrameDecoder, FrameType};
use crate::sandbox::{InitLogs, StartError};
use crate::spec::FunctionSpec;
use crate::util::random::random_u64;
use crate::util::time::unix_time_ms;

/// The HELLO metadata for `spec` (also sent again after every snapshot restore).
pub fn hello_meta(spec: &FunctionSpec) -> Vec<u8> {
    let time_ms = unix_time_ms();
    let env: serde_json::Map<String, serde_json::Value> = spec
        .env
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "time_ms": time_ms,
        "function": spec.id,
        "handler": spec.handler,
        "task_root": "/var/task",
        "memory_mb": spec.memory_mb,
        "timeout_ms": spec.timeout_ms,
        "env": env,
        // Fresh randomness for the guest kernel of every restored clone.
        "seed0": random_u64(),
        "seed1": random_u64(),
        "seed2": random_u64(),
        "seed3": random_u64(),
    }))
    .expect("json of plain values")
}

/// Sends HELLO on `fd` and waits up to `timeout` for the runtime's answer.
/// Returns the init duration the runtime reported and its output lines.
pub fn hello(
    fd: BorrowedFd<'_>,
    spec: &FunctionSpec,
    timeout: Duration,
) -> Result<(f64, InitLogs), StartError> {
    hello_over(fd, fd, spec, timeout)
}

/// [`hello`] on a channel that reads from `fd` and writes to `tx` (the two
/// ends of a pipe pair; the same socket otherwise).
pub fn hello_over(
    fd: BorrowedFd<'_>,
    tx: BorrowedFd<'_>,
    spec: &FunctionSpec,
    timeout: Duration,
) -> Result<(f64, InitLogs), StartError> {
    let mut frame = Vec::new();
    protocol::encode(&mut frame, FrameType::Hello, 0, 0, &hello_meta(spec), &[]);
    let dup = |fd: BorrowedFd<'_>| {
        fd.try_clone_to_owned()
            .map(std::fs::File::from)
            .map_err(|e| StartError::io("dup channel", e))
    };
    dup(tx)?
        .write_all(&frame)
        .map_err(|e| StartError::io("send hello", e))?;
    let mut stream = dup(fd)?;
    let deadline = Instant::now() + timeout;
    let mut dec = FrameDecoder::new();
    let mut logs = OutputTail::new(
        INIT_TAIL_LINES_MAX,
        INIT_TAIL_BYTES_MAX,
        INIT_LINE_BYTES_MAX,
    );
    loop {
        while let Some(f) = dec.next_frame().map_err(StartError::Protocol)? {
            match f.kind {
                FrameType::Ready => {
                    let meta: serde_json::Value =
                        serde_json::from_slice(&f.meta).unwrap_or_default();
                    let init_ms = meta["init_ms"].as_f64().unwrap_or(0.0);
                    // As Lambda's log has it, whatever the runtime: one line per cold init.
                    logs.push(format!("INIT_REPORT Init Duration: {init_ms:.2} ms").as_bytes());
                    return Ok((init_ms, logs.into_lines()));
                }
                FrameType::InitError => {
                    return Err(init_error(
                        &f.meta,
                        "the handler failed to load",
                        logs.into_lines(),
                    ));
                }
                FrameType::Log => logs.push(&f.body),
                other => return Err(StartError::Unexpected(other)),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(StartError::NotReady { waited: timeout });
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid descriptor.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n <= 0 {
            continue;
        }
        let buf = dec.spare(64 * 1024);
        match stream.read(buf) {
            Ok(0) => {
                dec.filled(64 * 1024, 0);
                return Err(StartError::Exited {
                    output: logs.into_lines(),
                });
            }
            Ok(n) => dec.filled(64 * 1024, n),
            Err(e)
                if e.kind() == std::io::ErrorKind::Interrupted
                    || e.kind() == std::io::ErrorKind::WouldBlock =>
            {
                dec.filled(64 * 1024, 0)
            }
            Err(e) => return Err(StartError::io("read channel", e)),
        }
    }
}

/// Lines of [`drain_logs`] kept (the last ones).
pub const DRAIN_LINES_MAX: usize = 20;
/// Longest line of [`drain_logs`] kept; longer ones are cut.
pub const DRAIN_LINE_BYTES_MAX: usize = 500;

/// The deploy error an INIT_ERROR frame reports: its `errorType` and
/// `errorMessage` (`message` when it has none) and the runtime's output.
pub(crate) fn init_error(meta: &[u8], message: &str, logs: InitLogs) -> StartError {
    let meta: serde_json::Value = serde_json::from_slice(meta).unwrap_or_default();
    StartError::Init {
        error_type: meta["errorType"]
            .as_str()
            .unwrap_or("Runtime.InitError")
            .to_string(),
        message: meta["errorMessage"].as_str().unwrap_or(message).to_string(),
        logs,
    }
}

/// The last output lines waiting on an agent's log socket (direct mode), read
/// for up to `wait` (at most [`DRAIN_LINES_MAX`], each cut at
/// [`DRAIN_LINE_BYTES_MAX`] bytes): for the error message of an instance that
/// died starting up.
pub fn drain_logs(fd: BorrowedFd<'_>, wait: Duration) -> InitLogs {
    let deadline = Instant::now() + wait;
    let mut dec = FrameDecoder::new();
    let mut tail = OutputTail::new(
        DRAIN_LINES_MAX,
        DRAIN_LINES_MAX * DRAIN_LINE_BYTES_MAX,
        DRAIN_LINE_BYTES_MAX,
    );
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid descriptor.
        if unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) } <= 0 {
            break;
        }
        let buf = dec.spare(64 * 1024);
        // SAFETY: reading into the decoder's spare space.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        dec.filled(64 * 1024, n as usize);
        while let Ok(Some(f)) = dec.next_frame() {
            if f.kind == FrameType::Log {
                tail.push(&f.body);
            }
        }
    }
    tail.into_lines()
}

/// Lines of start-up output kept (the last ones), for the function's log and
/// the error of a failed start.
pub const INIT_TAIL_LINES_MAX: usize = 200;
/// Bytes of start-up output kept.
pub const INIT_TAIL_BYTES_MAX: usize = 64 * 1024;
/// Longest start-up line kept; longer ones are cut.
pub const INIT_LINE_BYTES_MAX: usize = 1024;

/// The last lines of some output, within a number of lines and bytes; what
/// falls out is counted. Each push does work bounded by the lines it keeps
/// plus one `memchr` pass over the rest, whatever the output holds.
pub struct OutputTail {
    lines: VecDeque<String>,
    bytes: usize,
    lines_max: usize,
    bytes_max: usize,
    line_bytes_max: usize,
    dropped_lines: u64,
    dropped_bytes: u64,
}

impl OutputTail {
    /// An empty tail keeping at most `lines_max` lines and `bytes_max` bytes,
    /// each line cut at `line_bytes_max` bytes.
    pub fn new(lines_max: usize, bytes_max: usize, line_bytes_max: usize) -> OutputTail {
        assert!(lines_max > 0 && line_bytes_max > 0 && bytes_max >= line_bytes_max);
        OutputTail {
            lines: VecDeque::new(),
            bytes: 0,
            lines_max,
            bytes_max,
            line_bytes_max,
            dropped_lines: 0,
            dropped_bytes: 0,
        }
    }

    /// Adds the lines of one LOG frame body (a frame holds whole lines, the
    /// last one possibly unfinished).
    pub fn push(&mut self, body: &[u8]) {
        if body.is_empty() {
            return;
        }
        let text = body.strip_suffix(b"\n").unwrap_or(body);
        // Only the end can be kept: the last `lines_max` lines within the
        // last `bytes_max` bytes. What comes before is counted, not split.
        let window = text.len().saturating_sub(self.bytes_max);
        let start = memchr::memrchr_iter(b'\n', &text[window..])
            .nth(self.lines_max - 1)
            .map_or(window, |i| window + i + 1);
        self.dropped_bytes += start as u64;
        self.dropped_lines += memchr::memchr_iter(b'\n', &text[..start]).count() as u64;
        for line in text[start..].split(|&b| b == b'\n') {
            self.push_line(line.strip_suffix(b"\r").unwrap_or(line));
        }
    }

    fn push_line(&mut self, line: &[u8]) {
        let head = &line[..line.len().min(self.line_bytes_max)];
        let mut kept = String::from_utf8_lossy(head).into_owned();
        let mut cut = kept.len().min(self.line_bytes_max);
        while !kept.is_char_boundary(cut) {
            cut -= 1;
        }
        kept.truncate(cut);
        self.bytes += kept.len();
        self.lines.push_back(kept);
        while self.lines.len() > self.lines_max || self.bytes > self.bytes_max {
            let old = self.lines.pop_front().expect("over a bound, so not empty");
            self.bytes -= old.len();
            self.dropped_lines += 1;
            self.dropped_bytes += old.len() as u64 + 1;
        }
    }

    /// The kept lines, oldest first, after a note of what was left out.
    pub fn into_lines(self) -> Vec<String> {
        let mut out = Vec::with_capacity(self.lines.len() + 1);
        if self.dropped_lines > 0 {
            out.push(format!(
                "[hearth: {} earlier lines ({} bytes) of output not kept]",
                self.dropped_lines, self.dropped_bytes
            ));
        }
        out.extend(self.lines);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_lines_of_a_flood() {
        let mut t = OutputTail::new(200, 64 * 1024, 1024);
        let mut frame = vec![b'\n'; 8 << 20];
        frame.extend_from_slice(b"last words\n");
        t.push(&frame);
        t.push(&frame);
        let lines = t.into_lines();
        assert_eq!(lines.len(), 201);
        assert_eq!(lines[200], "last words");
        assert_eq!(
            lines[0],
            format!(
                "[hearth: {} earlier lines ({} bytes) of output not kept]",
                2 * (8 << 20) - 198,
                2 * (8 << 20) - 188
            )
        );
    }

    #[test]
    fn the_tail_cuts_long_lines_and_keeps_its_byte_bound() {
        let mut t = OutputTail::new(200, 4096, 1024);
        let long = "é".repeat(2000);
        for _ in 0..10 {
            t.push(long.as_bytes());
        }
        let lines = t.into_lines();
        // 4 lines of 1024 bytes fit; a cut never splits a character.
        assert_eq!(lines.len(), 5);
        assert!(lines[1..]
            .iter()
            .all(|l| l.len() == 1024 && l.chars().all(|c| c == 'é')));
        let mut t = OutputTail::new(3, 4096, 1024);
        t.push(b"a\r\nb\n\nc");
        assert_eq!(
            t.into_lines(),
            vec![
                "[hearth: 1 earlier lines (3 bytes) of output not kept]",
                "b",
                "",
                "c"
            ]
        );
    }
}
