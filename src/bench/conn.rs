//! The client side of one HTTP/1.1 connection, sans I/O: the driver reads
//! socket bytes into [`ResponseReader::spare`], reports how many arrived, and
//! [`ResponseReader::poll`] says when an answer is complete (or malformed).
//! The head is parsed with `httparse`; bodies are framed by Content-Length,
//! chunked encoding or the end of the connection, and discarded as they are
//! counted, so the buffer only ever holds a head or a chunk-size line.

/// Largest answer head, bytes (also the read buffer's size).
pub const HEAD_BYTES_MAX: usize = 64 * 1024;
/// Most header fields in an answer head.
const HEADERS_MAX: usize = 64;

/// What the reader found in the bytes so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// An answer is complete. `close`: the server will close the connection.
    Complete { status: u16, close: bool },
    /// The answer cannot be parsed or breaks a limit; the connection is unusable.
    Malformed(&'static str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunk {
    /// Reading a chunk-size line.
    Size,
    /// Inside chunk data; bytes left.
    Data(u64),
    /// The CRLF after chunk data.
    DataEnd,
    /// Trailer lines after the last chunk, until an empty line.
    Trailers,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// No request outstanding.
    Idle,
    /// Waiting for (the rest of) a head.
    Head,
    /// Body bytes left.
    Length(u64),
    Chunked(Chunk),
    /// The body runs to the end of the connection.
    UntilClose,
}

/// Reads the answers of one connection; reused across requests and reconnects.
pub struct ResponseReader {
    buf: Box<[u8]>,
    /// Unparsed bytes are `buf[start..end]`.
    start: usize,
    end: usize,
    state: State,
    head_request: bool,
    status: u16,
    close: bool,
    /// Bytes of the current answer so far (head and body).
    answer_bytes: usize,
    answer_bytes_max: usize,
    /// The current answer's `Server-Timing` phases, if it had the header.
    timing: Option<super::timing::Sample>,
}

impl ResponseReader {
    /// A reader refusing answers larger than `answer_bytes_max`.
    pub fn new(answer_bytes_max: usize) -> Self {
        ResponseReader {
            buf: vec![0; HEAD_BYTES_MAX].into_boxed_slice(),
            start: 0,
            end: 0,
            state: State::Idle,
            head_request: false,
            status: 0,
            close: false,
            answer_bytes: 0,
            answer_bytes_max,
            timing: None,
        }
    }

    /// A request went out: expect its answer.
    pub fn expect(&mut self, head_request: bool) {
        self.state = State::Head;
        self.head_request = head_request;
        self.answer_bytes = 0;
        self.close = false;
        self.timing = None;
    }

    /// The phases the last complete answer reported in `Server-Timing`.
    pub fn take_timing(&mut self) -> Option<super::timing::Sample> {
        self.timing.take()
    }

    /// Forgets everything (the connection was reopened).
    pub fn reset(&mut self) {
        self.start = 0;
        self.end = 0;
        self.state = State::Idle;
    }

    /// Whether an answer is being waited for.
    pub fn busy(&self) -> bool {
        self.state != State::Idle
    }

    /// Room for the next read. Never empty: a full buffer means a head larger
    /// than [`HEAD_BYTES_MAX`], which [`ResponseReader::poll`] reports first.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// `n` bytes were read into [`ResponseReader::spare`].
    pub fn filled(&mut self, n: usize) {
        self.end += n;
        debug_assert!(self.end <= self.buf.len());
    }

    /// Processes the buffered bytes; `None` means more are needed.
    pub fn poll(&mut self) -> Option<Event> {
        loop {
            let before = self.start;
            let event = match self.state {
                State::Idle if self.start < self.end => Some(Event::Malformed(
                    "bytes arrived with no request outstanding",
                )),
                State::Idle => return None,
                State::Head => self.head(),
                State::Length(left) => {
                    let take = left.min((self.end - self.start) as u64);
                    self.consume(take as usize);
                    if take == left {
                        Some(self.done())
                    } else {
                        self.state = State::Length(left - take);
                        None
                    }
                }
                State::Chunked(c) => self.chunked(c),
                State::UntilClose => {
                    self.consume(self.end - self.start);
                    None
                }
            };
            if let Some(e) = event {
                return Some(e);
            }
            if self.answer_bytes > self.answer_bytes_max {
                return Some(self.fail("answer larger than --response-bytes-max"));
            }
            if self.start == before || self.start == self.end {
                if self.state == State::Head && self.end - self.start == self.buf.len() {
                    return Some(self.fail("answer head larger than 64 KiB"));
                }
                return None;
            }
        }
    }

    /// The server closed the connection: completes a body that runs to the
    /// end, otherwise reports the cut (`None` when nothing was outstanding).
    pub fn eof(&mut self) -> Option<Event> {
        match self.state {
            State::Idle => None,
            State::UntilClose => {
                self.close = true;
                Some(self.done())
            }
            _ => Some(self.fail("connection closed before the answer was complete")),
        }
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        self.answer_bytes += n;
    }

    fn done(&mut self) -> Event {
        self.state = State::Idle;
        Event::Complete {
            status: self.status,
            close: self.close,
        }
    }

    fn fail(&mut self, why: &'static str) -> Event {
        self.state = State::Idle;
        self.start = 0;
        self.end = 0;
        Event::Malformed(why)
    }

    fn head(&mut self) -> Option<Event> {
        let mut fields = [httparse::EMPTY_HEADER; HEADERS_MAX];
        let mut parsed = httparse::Response::new(&mut fields);
        let n = match parsed.parse(&self.buf[self.start..self.end]) {
            Ok(httparse::Status::Complete(n)) => n,
            Ok(httparse::Status::Partial) => return None,
            Err(_) => return Some(self.fail("unparsable answer head")),
        };
        let status = parsed.code.unwrap_or(0);
        let mut length = None;
        let mut chunked = false;
        let mut close = parsed.version == Some(0);
        for h in parsed.headers.iter() {
            if h.name.eq_ignore_ascii_case("content-length") {
                let v = std::str::from_utf8(h.value)
                    .ok()
                    .and_then(|v| v.trim().parse::<u64>().ok());
                match (v, length) {
                    (Some(v), None) => length = Some(v),
                    (Some(v), Some(old)) if v == old => {}
                    _ => return Some(self.fail("bad Content-Length")),
                }
            } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = h
                    .value
                    .rsplit(|&b| b == b',')
                    .next()
                    .is_some_and(|v| v.trim_ascii().eq_ignore_ascii_case(b"chunked"));
            } else if h.name.eq_ignore_ascii_case("connection") {
                close = h.value.eq_ignore_ascii_case(b"close");
            } else if h.name.eq_ignore_ascii_case("server-timing") {
                let t = self.timing.get_or_insert_with(Default::default);
                super::timing::parse_into(h.value, t);
            }
        }
        self.consume(n);
        if (100..200).contains(&status) && status != 101 {
            // An interim answer (100 Continue): the real one follows.
            return None;
        }
        self.status = status;
        self.close = close;
        let no_body = self.head_request || status == 204 || status == 304;
        self.state = if no_body {
            return Some(self.done());
        } else if chunked {
            State::Chunked(Chunk::Size)
        } else if let Some(len) = length {
            if len > self.answer_bytes_max as u64 {
                return Some(self.fail("answer larger than --response-bytes-max"));
            }
            if len == 0 {
                return Some(self.done());
            }
            State::Length(len)
        } else {
            State::UntilClose
        };
        None
    }

    fn chunked(&mut self, c: Chunk) -> Option<Event> {
        let avail = &self.buf[self.start..self.end];
        match c {
            Chunk::Data(left) => {
                let take = left.min(avail.len() as u64);
                self.consume(take as usize);
                self.state = State::Chunked(if take == left {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - take)
                });
                None
            }
            Chunk::DataEnd => {
                if avail.len() < 2 {
                    return None;
                }
                if &avail[..2] != b"\r\n" {
                    return Some(self.fail("chunk data not followed by CRLF"));
                }
                self.consume(2);
                self.state = State::Chunked(Chunk::Size);
                None
            }
            Chunk::Size => {
                let line_len = memchr::memchr(b'\n', avail)?;
                let line = avail[..line_len]
                    .strip_suffix(b"\r")
                    .unwrap_or(&avail[..line_len]);
                let digits = line.split(|&b| b == b';').next().unwrap_or(b"");
                let size = std::str::from_utf8(digits)
                    .ok()
                    .and_then(|d| u64::from_str_radix(d.trim(), 16).ok());
                let Some(size) = size else {
                    return Some(self.fail("bad chunk size"));
                };
                self.consume(line_len + 1);
                if size > self.answer_bytes_max as u64 {
                    return Some(self.fail("answer larger than --response-bytes-max"));
                }
                self.state = State::Chunked(if size == 0 {
                    Chunk::Trailers
                } else {
                    Chunk::Data(size)
                });
                None
            }
            Chunk::Trailers => {
                let line_len = memchr::memchr(b'\n', avail)?;
                let empty = line_len == 0 || (line_len == 1 && avail[0] == b'\r');
                self.consume(line_len + 1);
                if empty {
                    Some(self.done())
                } else {
                    None
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds `input` in pieces of `step` bytes; returns the events seen.
    fn feed(r: &mut ResponseReader, input: &[u8], step: usize) -> Vec<Event> {
        let mut events = Vec::new();
        for piece in input.chunks(step) {
            let mut rest = piece;
            while !rest.is_empty() {
                let spare = r.spare();
                let n = spare.len().min(rest.len());
                spare[..n].copy_from_slice(&rest[..n]);
                r.filled(n);
                rest = &rest[n..];
                while let Some(e) = r.poll() {
                    events.push(e);
                    if r.busy() || matches!(e, Event::Malformed(_)) {
                        break;
                    }
                    r.expect(false);
                }
            }
        }
        events
    }

    fn ok(status: u16) -> Event {
        Event::Complete {
            status,
            close: false,
        }
    }

    #[test]
    fn content_length_answers_complete_in_any_split() {
        let two = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 404 Not Found\r\ncontent-length: 5\r\n\r\nnope!";
        for step in 1..two.len() {
            let mut r = ResponseReader::new(1 << 20);
            r.expect(false);
            assert_eq!(
                feed(&mut r, two, step),
                vec![ok(200), ok(404)],
                "step {step}"
            );
        }
    }

    #[test]
    fn chunked_answers_complete_with_trailers_in_any_split() {
        let input = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4;ext=1\r\nWiki\r\n5\r\npedia\r\n0\r\nX-T: 1\r\n\r\n";
        for step in 1..input.len() {
            let mut r = ResponseReader::new(1 << 20);
            r.expect(false);
            assert_eq!(feed(&mut r, input, step), vec![ok(200)], "step {step}");
        }
    }

    #[test]
    fn bodies_without_length_end_with_the_connection() {
        let mut r = ResponseReader::new(1 << 20);
        r.expect(false);
        assert!(feed(&mut r, b"HTTP/1.0 200 OK\r\n\r\nsome body", 4).is_empty());
        assert_eq!(
            r.eof(),
            Some(Event::Complete {
                status: 200,
                close: true
            })
        );
    }

    #[test]
    fn head_requests_and_204_have_no_body() {
        let mut r = ResponseReader::new(1 << 20);
        r.expect(true);
        let events = feed(&mut r, b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", 7);
        assert_eq!(events, vec![ok(200)]);
        r.expect(false);
        assert_eq!(
            feed(&mut r, b"HTTP/1.1 204 No Content\r\n\r\n", 100),
            vec![ok(204)]
        );
    }

    #[test]
    fn interim_answers_are_skipped() {
        let mut r = ResponseReader::new(1 << 20);
        r.expect(false);
        let input =
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(feed(&mut r, input, 3), vec![ok(201)]);
    }

    #[test]
    fn connection_close_is_reported() {
        let mut r = ResponseReader::new(1 << 20);
        r.expect(false);
        let input = b"HTTP/1.1 503 Busy\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            feed(&mut r, input, 5),
            vec![Event::Complete {
                status: 503,
                close: true
            }]
        );
    }

    #[test]
    fn garbage_and_oversize_answers_are_malformed() {
        let mut r = ResponseReader::new(1 << 20);
        r.expect(false);
        assert!(matches!(
            feed(&mut r, b"HELLO THERE\r\n\r\n", 100)[..],
            [Event::Malformed(_)]
        ));
        let mut r = ResponseReader::new(10);
        r.expect(false);
        assert!(matches!(
            feed(
                &mut r,
                b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n",
                100
            )[..],
            [Event::Malformed(_)]
        ));
        let mut r = ResponseReader::new(1 << 20);
        r.expect(false);
        let huge = format!("HTTP/1.1 200 OK\r\nX: {}\r\n", "a".repeat(HEAD_BYTES_MAX));
        // The first full buffer is refused; the driver then drops the connection.
        let events = feed(&mut r, huge.as_bytes(), 4096);
        assert_eq!(
            events[0],
            Event::Malformed("answer head larger than 64 KiB")
        );
        let mut r = ResponseReader::new(1 << 20);
        r.expect(false);
        let bad_chunk = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n";
        assert!(matches!(
            feed(&mut r, bad_chunk, 100)[..],
            [Event::Malformed(_)]
        ));
    }

    #[test]
    fn a_cut_answer_is_reported_at_eof() {
        let mut r = ResponseReader::new(1 << 20);
        r.expect(false);
        assert!(feed(
            &mut r,
            b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nabc",
            100
        )
        .is_empty());
        assert!(matches!(r.eof(), Some(Event::Malformed(_))));
        assert_eq!(r.eof(), None, "nothing outstanding after the failure");
    }

    #[test]
    fn unsolicited_bytes_are_malformed() {
        let mut r = ResponseReader::new(1 << 20);
        let spare = r.spare();
        spare[..3].copy_from_slice(b"xyz");
        r.filled(3);
        assert!(matches!(r.poll(), Some(Event::Malformed(_))));
    }
}
