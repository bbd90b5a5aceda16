//! Turns the runtime's stdout and stderr into LOG frames.
//!
//! Output is cut into lines (a line longer than [`LINE_BYTES_MAX`] is cut into
//! several), each tagged with the request running when it completed, and
//! queued until the relay has room on the channel. The queue is bounded by
//! [`PENDING_BYTES_MAX`]: past that, lines are dropped and a note saying how
//! many bytes were lost takes their place, so a chatty or stuck host never
//! blocks the runtime's writes.

use std::collections::VecDeque;

use std::os::fd::{AsRawFd, OwnedFd};

use crate::buf::ByteQueue;
use crate::protocol::{self, FrameType};
use crate::sys;

/// Longest line kept whole; longer lines are cut into pieces of this size.
pub const LINE_BYTES_MAX: usize = 16 * 1024;
/// Output held while the channel is busy or down; beyond it lines are dropped.
pub const PENDING_BYTES_MAX: usize = 256 * 1024;
/// Largest body of one LOG frame the agent writes.
pub const FRAME_BODY_BYTES_MAX: usize = 64 * 1024;

/// One queued LOG frame body: consecutive lines of one stream and request.
struct Entry {
    flags: u8,
    request_id: u32,
    body: Vec<u8>,
}

/// Captured output waiting to be framed, oldest first.
#[derive(Default)]
pub struct LogQueue {
    entries: VecDeque<Entry>,
    /// Bytes of runtime output queued (notes are not counted).
    bytes: usize,
    /// Bytes dropped since the last note, and the request they belonged to.
    dropped_bytes: u64,
    dropped_request_id: u32,
}

impl LogQueue {
    /// An empty queue.
    pub fn new() -> LogQueue {
        LogQueue::default()
    }

    /// True when there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty() && self.dropped_bytes == 0
    }

    /// Queues one line of output (newline included), or drops it when full.
    pub fn push_line(&mut self, flags: u8, request_id: u32, line: &[u8]) {
        if self.bytes + line.len() > PENDING_BYTES_MAX {
            if self.dropped_bytes == 0 {
                self.dropped_request_id = request_id;
            }
            self.dropped_bytes += line.len() as u64;
            return;
        }
        self.note_drops();
        self.bytes += line.len();
        self.append(flags, request_id, line);
    }

    /// Queues a note from the agent itself; notes are never dropped.
    pub fn push_note(&mut self, request_id: u32, text: &str) {
        self.note_drops();
        let mut line = format!("[hearth: {text}]").into_bytes();
        line.push(b'\n');
        self.append(protocol::LOG_STDERR, request_id, &line);
    }

    /// Encodes queued entries as LOG frames onto `out` until `out` holds at
    /// least `out_bytes_max` bytes or the queue is empty.
    pub fn drain_into(&mut self, out: &mut ByteQueue, out_bytes_max: usize) {
        let mut frame = Vec::new();
        while out.len() < out_bytes_max {
            let Some(e) = self.entries.pop_front() else {
                if self.dropped_bytes == 0 {
                    break;
                }
                self.note_drops();
                continue;
            };
            self.bytes = self.bytes.saturating_sub(e.body.len());
            frame.clear();
            protocol::encode(
                &mut frame,
                FrameType::Log,
                e.flags,
                e.request_id,
                b"",
                &e.body,
            );
            out.push(&frame);
        }
        if self.entries.is_empty() {
            // Notes are uncounted, so the running total can be off only while
            // entries remain; an empty queue resets it exactly.
            self.bytes = 0;
        }
    }

    fn note_drops(&mut self) {
        if self.dropped_bytes > 0 {
            let text = format!("[hearth: {} bytes of output dropped]\n", self.dropped_bytes);
            self.dropped_bytes = 0;
            self.append(
                protocol::LOG_STDERR,
                self.dropped_request_id,
                text.as_bytes(),
            );
        }
    }

    fn append(&mut self, flags: u8, request_id: u32, line: &[u8]) {
        if let Some(last) = self.entries.back_mut() {
            if last.flags == flags
                && last.request_id == request_id
                && last.body.len() + line.len() <= FRAME_BODY_BYTES_MAX
            {
                last.body.extend_from_slice(line);
                return;
            }
        }
        self.entries.push_back(Entry {
            flags,
            request_id,
            body: line.to_vec(),
        });
    }
}

/// Cuts one output stream into lines.
pub struct LineSplitter {
    /// LOG frame flags for this stream (`LOG_STDERR` or 0).
    pub flags: u8,
    partial: Vec<u8>,
}

impl LineSplitter {
    /// A splitter for the stream with the given LOG flags.
    pub fn new(flags: u8) -> LineSplitter {
        LineSplitter {
            flags,
            partial: Vec::new(),
        }
    }

    /// Takes bytes read from the stream; complete lines go to `queue`.
    pub fn push(&mut self, mut bytes: &[u8], request_id: u32, queue: &mut LogQueue) {
        while !bytes.is_empty() {
            let room = LINE_BYTES_MAX - self.partial.len();
            let window = &bytes[..bytes.len().min(room)];
            match window.iter().position(|&b| b == b'\n') {
                Some(i) => {
                    self.partial.extend_from_slice(&window[..=i]);
                    bytes = &bytes[i + 1..];
                    queue.push_line(self.flags, request_id, &self.partial);
                    self.partial.clear();
                }
                None => {
                    self.partial.extend_from_slice(window);
                    bytes = &bytes[window.len()..];
                    if self.partial.len() == LINE_BYTES_MAX {
                        self.flush(request_id, queue);
                    }
                }
            }
        }
    }

    /// Emits an unfinished line (adding the newline), e.g. before a response.
    pub fn flush(&mut self, request_id: u32, queue: &mut LogQueue) {
        if !self.partial.is_empty() {
            self.partial.push(b'\n');
            queue.push_line(self.flags, request_id, &self.partial);
            self.partial.clear();
        }
    }
}

/// One output pipe of the runtime and the lines read from it so far.
pub struct Capture {
    pub fd: Option<OwnedFd>,
    pub lines: LineSplitter,
}

impl Capture {
    /// The runtime's stdout and stderr, in that order.
    pub fn pair(stdout: OwnedFd, stderr: OwnedFd) -> [Capture; 2] {
        [
            Capture {
                fd: Some(stdout),
                lines: LineSplitter::new(0),
            },
            Capture {
                fd: Some(stderr),
                lines: LineSplitter::new(protocol::LOG_STDERR),
            },
        ]
    }

    /// Reads one chunk into `logs`, tagged `request_id`; false when nothing
    /// came (the pipe is empty, or closed: then it is dropped).
    pub fn read(&mut self, scratch: &mut [u8], request_id: u32, logs: &mut LogQueue) -> bool {
        let Some(fd) = self.fd.as_ref().map(|f| f.as_raw_fd()) else {
            return false;
        };
        match sys::read(fd, scratch) {
            Ok(0) => {
                self.lines.flush(request_id, logs);
                self.fd = None;
                false
            }
            Ok(n) => {
                self.lines.push(&scratch[..n], request_id, logs);
                true
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => false,
            Err(e) => {
                diag!("runtime output pipe: {e}");
                self.fd = None;
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Frame, FrameDecoder, LOG_STDERR};

    fn frames(q: &mut LogQueue) -> Vec<Frame> {
        let mut out = ByteQueue::new();
        q.drain_into(&mut out, usize::MAX);
        let mut d = FrameDecoder::new();
        d.push(out.as_slice());
        std::iter::from_fn(|| d.next_frame().unwrap()).collect()
    }

    #[test]
    fn lines_are_grouped_per_stream_and_request() {
        let mut q = LogQueue::new();
        let mut out = LineSplitter::new(0);
        let mut err = LineSplitter::new(LOG_STDERR);
        out.push(b"one\ntw", 7, &mut q);
        out.push(b"o\n", 7, &mut q);
        err.push(b"bad\n", 7, &mut q);
        out.push(b"three", 8, &mut q);
        out.flush(8, &mut q);
        let f = frames(&mut q);
        let got: Vec<(u8, u32, &[u8])> = f
            .iter()
            .map(|f| (f.flags, f.request_id, &f.body[..]))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, 7, &b"one\ntwo\n"[..]),
                (LOG_STDERR, 7, b"bad\n"),
                (0, 8, b"three\n")
            ]
        );
        assert!(q.is_empty());
    }

    #[test]
    fn long_lines_are_cut_at_the_line_limit() {
        let mut q = LogQueue::new();
        let mut s = LineSplitter::new(0);
        let long = vec![b'x'; LINE_BYTES_MAX * 2 + 10];
        s.push(&long, 1, &mut q);
        s.push(b"\n", 1, &mut q);
        let body: Vec<u8> = frames(&mut q).into_iter().flat_map(|f| f.body).collect();
        let lines: Vec<usize> = body.split(|&b| b == b'\n').map(|l| l.len()).collect();
        assert_eq!(lines, vec![LINE_BYTES_MAX, LINE_BYTES_MAX, 10, 0]);
    }

    #[test]
    fn overflow_drops_lines_and_says_how_many_bytes() {
        let mut q = LogQueue::new();
        let line = vec![b'y'; 1023];
        let mut s = LineSplitter::new(0);
        let lines = PENDING_BYTES_MAX / 1024 + 10;
        for _ in 0..lines {
            s.push(&line, 3, &mut q);
            s.push(b"\n", 3, &mut q);
        }
        let f = frames(&mut q);
        let kept: usize = f
            .iter()
            .filter(|f| f.flags == 0)
            .map(|f| f.body.len())
            .sum();
        assert_eq!(kept, PENDING_BYTES_MAX);
        let note = f.last().unwrap();
        assert_eq!(note.flags, LOG_STDERR);
        assert_eq!(note.request_id, 3);
        assert_eq!(
            String::from_utf8_lossy(&note.body),
            "[hearth: 10240 bytes of output dropped]\n"
        );
        // Once drained, the queue accepts output again, after any note.
        s.push(b"again\n", 4, &mut q);
        assert_eq!(frames(&mut q)[0].body, b"again\n");
    }

    #[test]
    fn drain_respects_the_output_budget() {
        let mut q = LogQueue::new();
        for rid in 1..=4 {
            q.push_line(0, rid, b"line\n");
        }
        let mut out = ByteQueue::new();
        q.drain_into(&mut out, 1);
        assert_eq!(out.len(), protocol::HEADER_BYTES + 5);
        assert!(!q.is_empty());
    }
}
