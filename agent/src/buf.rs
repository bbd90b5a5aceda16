//! `ByteQueue`: a FIFO of bytes with cheap removal from the front, used for
//! every stream buffer in the relay.

use std::io;
use std::os::fd::RawFd;

use crate::sys;

/// An emptied queue whose allocation grew past this is shrunk back, so an
/// idle instance does not keep an 8 MiB frame's worth of memory per buffer.
const RETAINED_BYTES_MAX: usize = 1 << 20;

/// Bytes waiting to be consumed from the front.
#[derive(Default)]
pub struct ByteQueue {
    buf: Vec<u8>,
    head: usize,
}

impl ByteQueue {
    /// An empty queue.
    pub fn new() -> ByteQueue {
        ByteQueue::default()
    }

    /// Bytes queued.
    pub fn len(&self) -> usize {
        self.buf.len() - self.head
    }

    /// True when nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The queued bytes, oldest first.
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[self.head..]
    }

    /// Appends bytes at the back.
    pub fn push(&mut self, bytes: &[u8]) {
        self.compact();
        self.buf.extend_from_slice(bytes);
    }

    /// Drops `n` bytes from the front.
    pub fn consume(&mut self, n: usize) {
        assert!(
            n <= self.len(),
            "consume {n} of {} queued bytes",
            self.len()
        );
        self.head += n;
        if self.head == self.buf.len() {
            self.clear();
        }
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        self.buf.clear();
        self.head = 0;
        if self.buf.capacity() > RETAINED_BYTES_MAX {
            self.buf.shrink_to(RETAINED_BYTES_MAX / 16);
        }
    }

    /// Moves the first `n` bytes to the back of `dst`; swaps allocations
    /// instead of copying when that moves everything into an empty `dst`.
    pub fn move_front_to(&mut self, n: usize, dst: &mut ByteQueue) {
        assert!(n <= self.len());
        if dst.is_empty() && n == self.len() {
            std::mem::swap(self, dst);
            self.clear();
            return;
        }
        dst.push(&self.as_slice()[..n]);
        self.consume(n);
    }

    /// Reads at most `max` bytes from `fd` onto the back. `Ok(0)` is EOF.
    pub fn read_from(&mut self, fd: RawFd, max: usize) -> io::Result<usize> {
        self.compact();
        self.buf.reserve(max);
        let len = self.buf.len();
        let spare = self.buf.spare_capacity_mut();
        // SAFETY: `spare` has room for at least `max` bytes; read(2) initialises
        // exactly the `n` it reports, and only those are added to the length.
        let n = unsafe { sys::read_raw(fd, spare.as_mut_ptr().cast(), max)? };
        // SAFETY: the first `n` spare bytes were initialised by read(2) above.
        unsafe { self.buf.set_len(len + n) };
        Ok(n)
    }

    /// Writes as much of the front as `fd` takes in one call and drops it.
    pub fn write_to(&mut self, fd: RawFd) -> io::Result<usize> {
        let n = sys::write(fd, self.as_slice())?;
        self.consume(n);
        Ok(n)
    }

    /// Reclaims consumed space once it is at least half the buffer, so pushes
    /// stay amortised O(1) without unbounded growth.
    fn compact(&mut self) {
        if self.head > 0 && self.head * 2 >= self.buf.len() {
            self.buf.drain(..self.head);
            self.head = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_keeps_order_across_consumes_and_moves() {
        let mut a = ByteQueue::new();
        a.push(b"hello ");
        a.push(b"world");
        a.consume(6);
        assert_eq!(a.as_slice(), b"world");
        let mut b = ByteQueue::new();
        a.move_front_to(2, &mut b);
        assert_eq!(b.as_slice(), b"wo");
        a.move_front_to(3, &mut b);
        assert_eq!(b.as_slice(), b"world");
        assert!(a.is_empty());
        let mut c = ByteQueue::new();
        b.move_front_to(5, &mut c);
        assert_eq!(c.as_slice(), b"world");
        assert!(b.is_empty());
    }
}
