//! A small sans-IO HTTP/1.1 server side for the Runtime API: request heads,
//! bodies (Content-Length or chunked) and responses, as pure functions over
//! byte slices. Only what a runtime client sends is understood; anything
//! else is a 400.

/// Longest request head (request line and headers) accepted.
pub const HEAD_BYTES_MAX: usize = 64 << 10;

/// A request line and its headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub method: String,
    /// The request target as sent (origin form: path and query).
    pub target: String,
    /// Header names lower-cased, values trimmed, in order.
    pub headers: Vec<(String, String)>,
    /// Bytes of the head, blank line included.
    pub len: usize,
    pub body: BodyKind,
    /// `Connection: close`, or HTTP/1.0 without keep-alive.
    pub close: bool,
}

impl Head {
    /// The first value of a header (name in lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The client waits for `100 Continue` before sending the body.
    pub fn expects_continue(&self) -> bool {
        self.header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"))
    }
}

/// How the body of a request is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Length(usize),
    Chunked,
}

/// Why a request cannot be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpError {
    /// Malformed; the text says what.
    Bad(&'static str),
    /// The head is over [`HEAD_BYTES_MAX`].
    HeadTooLarge,
    /// The body is over the caller's limit.
    BodyTooLarge,
}

/// Parses a request head at the start of `buf`; `Ok(None)` until it is complete.
pub fn parse_head(buf: &[u8]) -> Result<Option<Head>, HttpError> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return if buf.len() > HEAD_BYTES_MAX {
            Err(HttpError::HeadTooLarge)
        } else {
            Ok(None)
        };
    };
    if end + 4 > HEAD_BYTES_MAX {
        return Err(HttpError::HeadTooLarge);
    }
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| HttpError::Bad("head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::Bad("malformed request line"));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HttpError::Bad("malformed method"));
    }
    if !target.starts_with('/') {
        return Err(HttpError::Bad("request target must be a path"));
    }
    let http10 = match version {
        "HTTP/1.1" => false,
        "HTTP/1.0" => true,
        _ => return Err(HttpError::Bad("unsupported HTTP version")),
    };
    let mut headers = Vec::new();
    for l in lines {
        let (k, v) = l
            .split_once(':')
            .ok_or(HttpError::Bad("malformed header"))?;
        if k.is_empty() || k.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(HttpError::Bad("malformed header name"));
        }
        headers.push((k.to_ascii_lowercase(), v.trim().to_string()));
    }
    let mut head = Head {
        method: method.to_string(),
        target: target.to_string(),
        headers,
        len: end + 4,
        body: BodyKind::Length(0),
        close: http10,
    };
    if let Some(c) = head.header("connection") {
        let c = c.to_ascii_lowercase();
        if c.split(',').any(|t| t.trim() == "close") {
            head.close = true;
        } else if c.split(',').any(|t| t.trim() == "keep-alive") {
            head.close = false;
        }
    }
    let chunked = match head.header("transfer-encoding") {
        None => false,
        Some(te) if te.eq_ignore_ascii_case("chunked") => true,
        Some(_) => return Err(HttpError::Bad("unsupported transfer-encoding")),
    };
    let lengths: Vec<&str> = head
        .headers
        .iter()
        .filter(|(k, _)| k == "content-length")
        .map(|(_, v)| v.as_str())
        .collect();
    if chunked {
        if !lengths.is_empty() {
            return Err(HttpError::Bad("both content-length and chunked"));
        }
        head.body = BodyKind::Chunked;
    } else if let Some(first) = lengths.first() {
        if lengths.iter().any(|l| l != first) {
            return Err(HttpError::Bad("conflicting content-length"));
        }
        if first.is_empty() || !first.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HttpError::Bad("malformed content-length"));
        }
        let n = first
            .parse::<usize>()
            .map_err(|_| HttpError::Bad("malformed content-length"))?;
        head.body = BodyKind::Length(n);
    }
    Ok(Some(head))
}

/// Where the blank line ending a request head is in `buf`, searching from
/// `*scanned` (what earlier calls looked at already) on; `None` while it has
/// not arrived, with `*scanned` moved on. A head that arrives a byte at a time
/// is so searched once, not once per byte.
pub fn head_end(buf: &[u8], scanned: &mut usize) -> Option<usize> {
    let from = (*scanned).min(buf.len()).saturating_sub(3);
    match find(&buf[from..], b"\r\n\r\n") {
        Some(at) => Some(from + at),
        None => {
            *scanned = buf.len();
            None
        }
    }
}

/// Decodes a request body as it arrives, in whatever pieces it comes, taking
/// the bytes it decodes from the caller's buffer (sans-IO): a body is read
/// once however it is split, and what it holds is the decoded body alone.
#[derive(Debug)]
pub struct BodyStream {
    state: BodyState,
    /// The trailer fields of a chunked body, names lower-cased.
    pub trailers: Vec<(String, String)>,
    trailer_bytes: usize,
    /// Largest decoded body; more is [`HttpError::BodyTooLarge`].
    limit: usize,
    decoded: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyState {
    /// Bytes left of a Content-Length body.
    Length(usize),
    /// Expecting a chunk-size line.
    Size,
    /// Bytes left of the current chunk.
    Data(usize),
    /// Expecting the CRLF after a chunk.
    DataEnd,
    /// Reading trailer fields up to the blank line.
    Trailers,
    Done,
}

impl BodyStream {
    /// A decoder for a body framed as `kind`, of any size (the caller bounds it).
    pub fn new(kind: BodyKind) -> BodyStream {
        BodyStream::with_limit(kind, usize::MAX)
    }

    /// A decoder for a body framed as `kind` that fails once the body is known
    /// to exceed `limit` bytes: a Content-Length over it at the first feed, a
    /// chunk that would take it over at its size line.
    pub fn with_limit(kind: BodyKind, limit: usize) -> BodyStream {
        BodyStream {
            state: match kind {
                BodyKind::Length(0) => BodyState::Done,
                BodyKind::Length(n) => BodyState::Length(n),
                BodyKind::Chunked => BodyState::Size,
            },
            trailers: Vec::new(),
            trailer_bytes: 0,
            limit,
            decoded: 0,
        }
    }

    /// Whether the whole body (and its trailers) has been read.
    pub fn is_done(&self) -> bool {
        self.state == BodyState::Done
    }

    /// Decodes what it can of `buf`, appending body bytes to `out`; returns
    /// how many bytes of `buf` it used (the rest waits for more input).
    pub fn feed(&mut self, buf: &[u8], out: &mut Vec<u8>) -> Result<usize, HttpError> {
        let mut at = 0;
        loop {
            let rest = &buf[at..];
            match self.state {
                BodyState::Done => return Ok(at),
                BodyState::Length(n) if n > self.limit => return Err(HttpError::BodyTooLarge),
                BodyState::Length(n) | BodyState::Data(n) => {
                    let take = n.min(rest.len());
                    if take == 0 {
                        return Ok(at);
                    }
                    out.extend_from_slice(&rest[..take]);
                    at += take;
                    self.state = match (self.state, n - take) {
                        (BodyState::Length(_), 0) => BodyState::Done,
                        (BodyState::Length(_), left) => BodyState::Length(left),
                        (_, 0) => BodyState::DataEnd,
                        (_, left) => BodyState::Data(left),
                    };
                }
                BodyState::DataEnd => {
                    if rest.len() < 2 {
                        return Ok(at);
                    }
                    if &rest[..2] != b"\r\n" {
                        return Err(HttpError::Bad("chunk not followed by CRLF"));
                    }
                    at += 2;
                    self.state = BodyState::Size;
                }
                BodyState::Size => {
                    let Some(eol) = find(rest, b"\r\n") else {
                        return match rest.len() > 1024 {
                            true => Err(HttpError::Bad("malformed chunk size")),
                            false => Ok(at),
                        };
                    };
                    let line = std::str::from_utf8(&rest[..eol])
                        .map_err(|_| HttpError::Bad("malformed chunk size"))?;
                    let text = line.split(';').next().unwrap_or("").trim();
                    if text.is_empty() || text.len() > 15 {
                        return Err(HttpError::Bad("malformed chunk size"));
                    }
                    let size = usize::from_str_radix(text, 16)
                        .map_err(|_| HttpError::Bad("malformed chunk size"))?;
                    // At most 15 hex digits: the sum cannot overflow.
                    self.decoded += size;
                    if self.decoded > self.limit {
                        return Err(HttpError::BodyTooLarge);
                    }
                    at += eol + 2;
                    self.state = match size {
                        0 => BodyState::Trailers,
                        n => BodyState::Data(n),
                    };
                }
                BodyState::Trailers => {
                    let Some(eol) = find(rest, b"\r\n") else {
                        return match self.trailer_bytes + rest.len() > HEAD_BYTES_MAX {
                            true => Err(HttpError::HeadTooLarge),
                            false => Ok(at),
                        };
                    };
                    self.trailer_bytes += eol + 2;
                    if self.trailer_bytes > HEAD_BYTES_MAX {
                        return Err(HttpError::HeadTooLarge);
                    }
                    let line = std::str::from_utf8(&rest[..eol])
                        .map_err(|_| HttpError::Bad("malformed trailer"))?;
                    at += eol + 2;
                    if line.is_empty() {
                        self.state = BodyState::Done;
                        continue;
                    }
                    let (k, v) = line
                        .split_once(':')
                        .ok_or(HttpError::Bad("malformed trailer"))?;
                    self.trailers
                        .push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
                }
            }
        }
    }
}

/// A complete response with a Content-Length body.
pub fn response(status: u16, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(128 + body.len());
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason(status)).as_bytes());
    for (k, v) in headers {
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(v.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
    out.extend_from_slice(body);
    out
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        202 => "Accepted",
        400 => "Bad Request",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        _ => "Status",
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heads_parse_when_complete() {
        let req = b"POST /2018-06-01/runtime/invocation/abc/response HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nX-A:  b \r\n\r\nhello";
        assert_eq!(parse_head(&req[..20]).unwrap(), None);
        let head = parse_head(req).unwrap().unwrap();
        assert_eq!(head.method, "POST");
        assert_eq!(head.target, "/2018-06-01/runtime/invocation/abc/response");
        assert_eq!(head.header("x-a"), Some("b"));
        assert_eq!(head.body, BodyKind::Length(5));
        assert!(!head.close);
        let mut d = BodyStream::with_limit(head.body, 100);
        let mut out = Vec::new();
        assert_eq!(d.feed(&req[head.len..head.len + 3], &mut out), Ok(3));
        assert!(!d.is_done());
        assert_eq!(d.feed(&req[head.len + 3..], &mut out), Ok(2));
        assert!(d.is_done());
        assert_eq!(out, b"hello");
        let mut small = BodyStream::with_limit(head.body, 4);
        assert_eq!(
            small.feed(&req[head.len..], &mut Vec::new()),
            Err(HttpError::BodyTooLarge)
        );
    }

    #[test]
    fn the_end_of_a_head_is_searched_for_once() {
        let req = b"GET /x HTTP/1.1\r\nHost: y\r\n\r\nNEXT";
        let mut scanned = 0;
        for n in 0..req.len() - 4 {
            assert_eq!(head_end(&req[..n], &mut scanned), None, "{n}");
            assert_eq!(scanned, n);
        }
        assert_eq!(head_end(req, &mut scanned), Some(req.len() - 8));
        // Cut inside the blank line: found once the rest of it arrives.
        let mut scanned = 0;
        assert_eq!(head_end(&req[..req.len() - 6], &mut scanned), None);
        assert_eq!(head_end(req, &mut scanned), Some(req.len() - 8));
    }

    #[test]
    fn connection_and_expect_are_read() {
        let h = parse_head(b"GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(h.close);
        let h = parse_head(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.close);
        let h = parse_head(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 9\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.expects_continue());
    }

    #[test]
    fn chunked_bodies_decode_and_respect_the_limit() {
        let b = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let mut d = BodyStream::with_limit(BodyKind::Chunked, 11);
        let mut out = Vec::new();
        let used = d.feed(b, &mut out).unwrap();
        assert!(d.is_done());
        assert_eq!(out, b"hello world");
        assert_eq!(&b[used..], b"NEXT");
        let mut d = BodyStream::with_limit(BodyKind::Chunked, 8);
        let mut out = Vec::new();
        assert_eq!(d.feed(b, &mut out), Err(HttpError::BodyTooLarge));
        assert_eq!(
            out, b"hello",
            "the chunk over the limit is refused at its size line"
        );
        let mut d = BodyStream::with_limit(BodyKind::Chunked, 8);
        assert!(d.feed(b"zz\r\n", &mut Vec::new()).is_err());
        let mut d = BodyStream::with_limit(BodyKind::Chunked, 8);
        assert!(d.feed(b"2\r\nabXY", &mut Vec::new()).is_err());
        // Endless trailers stop at the head limit.
        let mut d = BodyStream::with_limit(BodyKind::Chunked, 8);
        let mut wire = b"0\r\n".to_vec();
        wire.extend(b"x:y\r\n".repeat(HEAD_BYTES_MAX / 5 + 1));
        assert_eq!(d.feed(&wire, &mut Vec::new()), Err(HttpError::HeadTooLarge));
    }

    #[test]
    fn streamed_bodies_decode_in_any_split_and_keep_their_trailers() {
        let wire = b"5\r\nhello\r\n6;x=1\r\n world\r\n0\r\nX-Err: boom\r\n\r\nNEXT";
        for cut in 0..wire.len() {
            let mut d = BodyStream::new(BodyKind::Chunked);
            let mut out = Vec::new();
            let used = d.feed(&wire[..cut], &mut out).unwrap();
            let mut rest = wire[used..].to_vec();
            let used2 = d.feed(&rest, &mut out).unwrap();
            rest.drain(..used2);
            assert!(d.is_done(), "cut {cut}");
            assert_eq!(out, b"hello world", "cut {cut}");
            assert_eq!(rest, b"NEXT", "cut {cut}");
            assert_eq!(d.trailers, [("x-err".to_string(), "boom".to_string())]);
        }
        let mut d = BodyStream::new(BodyKind::Length(3));
        let mut out = Vec::new();
        assert_eq!(d.feed(b"ab", &mut out).unwrap(), 2);
        assert_eq!(d.feed(b"cd", &mut out).unwrap(), 1);
        assert!(d.is_done());
        assert_eq!(out, b"abc");
        let mut bad = BodyStream::new(BodyKind::Chunked);
        assert!(bad.feed(b"2\r\nabXY", &mut Vec::new()).is_err());
    }

    #[test]
    fn malformed_heads_are_refused() {
        for bad in [
            &b"GET\r\n\r\n"[..],
            b"get / HTTP/1.1\r\n\r\n",
            b"GET x HTTP/1.1\r\n\r\n",
            b"GET / HTTP/2\r\n\r\n",
            b"GET / HTTP/1.1\r\nNoColon\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
            b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
        ] {
            assert!(
                matches!(parse_head(bad), Err(HttpError::Bad(_))),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        let huge = vec![b'a'; HEAD_BYTES_MAX + 1];
        assert_eq!(parse_head(&huge), Err(HttpError::HeadTooLarge));
    }

    #[test]
    fn responses_carry_a_length() {
        let r = response(202, &[("Content-Type", "application/json")], b"{}");
        assert_eq!(
            r,
            b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        );
    }
}
