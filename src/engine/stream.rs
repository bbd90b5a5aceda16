//! One socket owned by a worker: a client connection or an instance channel
//! (a socket, or a pair of pipes: `fd` reads and `wfd` writes).
//!
//! The logic appends to `wbuf` and consumes `rbuf`; the driver (io_uring or
//! epoll) owns the bookkeeping fields and is the only code that does I/O.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use crate::engine::conn::Conn;
use crate::functions::sched::InstId;

/// Empty buffers larger than this are freed rather than kept for reuse.
const BUF_KEEP_BYTES: usize = 256 * 1024;

/// What a stream is for.
// Clients are the many streams and channels the few (one per instance), so
// boxing the client state would cost an allocation per connection to save
// bytes on the channels.
#[allow(clippy::large_enum_variant)]
pub enum Kind {
    /// An HTTP client.
    Client(Conn),
    /// The channel to an instance's guest agent.
    Channel(InstId),
    /// One of the streams of an instance whose Runtime API this core serves.
    Rapi(InstId, crate::engine::rapi::Role),
}

/// A socket plus its buffers.
pub struct Stream {
    pub fd: OwnedFd,
    /// An instance channel made of pipes: the write end (`fd` is the read
    /// end). Pipes take `read`/`write` where sockets take `recv`/`send`.
    pub wfd: Option<OwnedFd>,
    /// Received bytes not yet consumed; consumption advances `rpos`.
    pub rbuf: Vec<u8>,
    pub rpos: usize,
    /// Bytes the logic wants sent.
    pub wbuf: Vec<u8>,
    /// The logic does not want more input for now (backpressure).
    pub read_paused: bool,
    /// Close once `wbuf` is flushed.
    pub closing: bool,
    pub kind: Kind,
    // Driver bookkeeping.
    /// Bytes handed to an in-flight send (io_uring), with the count already sent.
    pub sending: Vec<u8>,
    pub sent: usize,
    pub recv_buf: Vec<u8>,
    pub recv_inflight: bool,
    pub send_inflight: bool,
    /// The socket was shut down; the entry is freed once no operation is in flight.
    pub dead: bool,
    /// epoll: the socket became readable while reads were paused.
    pub readable_pending: bool,
    /// The stream is being handed to another core: the driver cancels its I/O and
    /// then calls `Worker::detached` instead of freeing it.
    pub detaching: bool,
    /// io_uring: a cancel for the in-flight recv was submitted.
    pub cancel_sent: bool,
    /// epoll: the descriptor is registered with the poller.
    pub registered: bool,
    /// A client whose last answer is written: our side is half-closed and input is
    /// discarded until EOF or this time, so the peer reads the answer instead of a reset.
    pub linger_until: Option<std::time::Instant>,
    /// The peer sent EOF: nothing more will be read, queued output is still delivered.
    pub peer_closed: bool,
    /// Bytes of answers in `wbuf`/`sending` counted against the core's output budget.
    pub out_counted: usize,
    /// When counted output last moved (queued from nothing, or partly sent).
    pub out_progress: Option<std::time::Instant>,
    /// Listed in `Worker::budget_paused`, waiting for the core's output budget.
    pub budget_wait: bool,
}

impl Stream {
    /// A new stream around `fd`.
    pub fn new(fd: OwnedFd, kind: Kind) -> Stream {
        Stream {
            fd,
            wfd: None,
            rbuf: Vec::new(),
            rpos: 0,
            wbuf: Vec::new(),
            read_paused: false,
            closing: false,
            kind,
            sending: Vec::new(),
            sent: 0,
            recv_buf: Vec::new(),
            recv_inflight: false,
            send_inflight: false,
            dead: false,
            readable_pending: false,
            linger_until: None,
            registered: false,
            detaching: false,
            cancel_sent: false,
            peer_closed: false,
            out_counted: 0,
            out_progress: None,
            budget_wait: false,
        }
    }

    /// A new instance channel over a pair of pipes.
    pub fn pipes(rx: OwnedFd, tx: OwnedFd, kind: Kind) -> Stream {
        Stream {
            wfd: Some(tx),
            ..Stream::new(rx, kind)
        }
    }

    /// The raw descriptor (the one read from).
    pub fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// The descriptor written to.
    pub fn wraw(&self) -> RawFd {
        self.wfd.as_ref().unwrap_or(&self.fd).as_raw_fd()
    }

    /// Whether the stream is a pair of pipes.
    pub fn is_pipe(&self) -> bool {
        self.wfd.is_some()
    }

    /// Unconsumed input.
    pub fn input(&self) -> &[u8] {
        &self.rbuf[self.rpos..]
    }

    /// Marks `n` input bytes consumed.
    pub fn consume(&mut self, n: usize) {
        self.rpos += n;
        debug_assert!(self.rpos <= self.rbuf.len());
        if self.rpos == self.rbuf.len() {
            self.rbuf.clear();
            self.rpos = 0;
            if self.rbuf.capacity() > BUF_KEEP_BYTES {
                // Room grown for one large frame or body is given back.
                self.rbuf = Vec::new();
            }
        }
    }

    /// Adds received bytes, compacting consumed space first.
    pub fn push_input(&mut self, bytes: &[u8]) {
        if self.rpos > 0 && self.rpos * 2 >= self.rbuf.len() {
            self.rbuf.drain(..self.rpos);
            self.rpos = 0;
        }
        self.rbuf.extend_from_slice(bytes);
    }

    /// Gives large, empty buffers back to the allocator: one big answer or body
    /// must not pin its memory for the rest of a keep-alive connection's life.
    pub fn trim(&mut self) {
        // `sending` is empty only when no send is in flight (the kernel may read
        // it until the completion); `recv_buf` is left alone for the same reason.
        for buf in [&mut self.wbuf, &mut self.sending] {
            if buf.is_empty() && buf.capacity() > BUF_KEEP_BYTES {
                *buf = Vec::new();
            }
        }
        if self.rpos == self.rbuf.len() && self.rbuf.capacity() > BUF_KEEP_BYTES {
            self.rbuf = Vec::new();
            self.rpos = 0;
        }
    }

    /// Output still to be written by the driver (queued or in flight).
    pub fn out_pending(&self) -> usize {
        self.wbuf.len() + self.sending.len() - self.sent
    }

    /// That output itself, in order.
    pub fn unsent(&self) -> Vec<u8> {
        [&self.sending[self.sent..], &self.wbuf[..]].concat()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn test_conn() -> Conn {
        Conn {
            serial: 1,
            peer: std::net::IpAddr::from([127, 0, 0, 1]),
            state: crate::engine::conn::ConnState::Idle,
            deadline: std::time::Instant::now(),
            phases: crate::engine::phases::Track::new(std::time::Instant::now()),
            moving: None,
            in_charge: 0,
            unacked_seen: 0,
        }
    }

    #[test]
    fn room_grown_for_a_large_frame_is_given_back_once_consumed() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut s = Stream::new(OwnedFd::from(a), Kind::Client(test_conn()));
        s.push_input(&vec![7u8; 8 << 20]);
        s.consume(4 << 20);
        assert!(s.rbuf.capacity() >= 8 << 20, "kept while input remains");
        s.consume(4 << 20);
        assert_eq!(s.rbuf.capacity(), 0);
        s.push_input(&[1; 100]);
        s.consume(100);
        assert!(s.rbuf.capacity() > 0, "small buffers are reused");
    }
}
