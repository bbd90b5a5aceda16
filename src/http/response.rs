//! Writing HTTP/1.1 responses ([`Reply`]) into a connection's output buffer.

use crate::util::decimal::decimal;
use crate::util::time::since_unix_epoch;

pub use super::reply::json_error;
use super::reply::{Header, Reply};

/// Reason phrase for the status codes hearth sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        204 => "No Content",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        422 => "Unprocessable Content",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Caches the `Date` header value; refreshed at most once a second per core.
pub struct DateCache {
    secs: u64,
    text: [u8; 29],
}

impl Default for DateCache {
    fn default() -> Self {
        let mut c = DateCache {
            secs: u64::MAX,
            text: [b' '; 29],
        };
        c.refresh();
        c
    }
}

impl DateCache {
    /// Updates the cached text if the second changed.
    pub fn refresh(&mut self) {
        let now = since_unix_epoch().as_secs();
        if now != self.secs {
            self.secs = now;
            self.text = http_date(now);
        }
    }

    /// The IMF-fixdate text, e.g. `Fri, 27 Nov 2026 01:38:38 GMT`.
    pub fn get(&self) -> &[u8] {
        &self.text
    }
}

/// Formats Unix seconds as an IMF-fixdate (RFC 9110 §5.6.7).
pub fn http_date(secs: u64) -> [u8; 29] {
    const DAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (y, m, d) = crate::util::time::civil_from_days(days as i64);
    let mut out = [0u8; 29];
    let s = format!(
        "{}, {:02} {} {:04} {:02}:{:02}:{:02} GMT",
        DAYS[(days % 7) as usize],
        d,
        MONTHS[(m - 1) as usize],
        y,
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    );
    out.copy_from_slice(&s.as_bytes()[..29]);
    out
}

/// What a response says about the connection after it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Persistence {
    /// HTTP/1.1 keep-alive: nothing to say.
    KeepAlive,
    /// Kept, and said so (`Connection: keep-alive`, which an HTTP/1.0 client
    /// that asked for keep-alive needs to see).
    AnnounceKeepAlive,
    /// Closed after this response (`Connection: close`).
    Close,
}

/// Whether a response with `status` carries no body and no `Content-Length`
/// (RFC 9110 §8.6, RFC 9112 §6.3: 1xx, 204 and 304 end at their head; a body
/// after one would be read as the start of the next response).
pub fn is_bodiless(status: u16) -> bool {
    status < 200 || status == 204 || status == 304
}

/// Appends a complete response. `head_only` answers HEAD (length kept, body
/// omitted). The body of a status that cannot have one (see [`is_bodiless`]) is
/// dropped. `r.close` is the caller's to act on: `persistence` is what is written.
pub fn write(
    out: &mut Vec<u8>,
    date: &DateCache,
    r: &Reply,
    persistence: Persistence,
    head_only: bool,
) {
    write_head(out, date, r.status, &r.headers, r.body.len(), persistence);
    if !head_only && !is_bodiless(r.status) {
        out.extend_from_slice(&r.body);
    }
}

/// Appends a status line and headers with `Content-Length: body_len` (none for
/// a bodiless status).
pub fn write_head(
    out: &mut Vec<u8>,
    date: &DateCache,
    status: u16,
    headers: &[Header],
    body_len: usize,
    persistence: Persistence,
) {
    write_head_framed(out, date, status, headers, Some(body_len), persistence);
}

/// Appends the head of a streamed answer, whose length is not known: with
/// `Transfer-Encoding: chunked` when `chunked`, else the body ends when the
/// connection closes (`persistence` must then be [`Persistence::Close`]).
/// The body follows as [`write_chunk`]s and [`write_last_chunk`].
pub fn write_stream_head(
    out: &mut Vec<u8>,
    date: &DateCache,
    status: u16,
    headers: &[Header],
    chunked: bool,
    persistence: Persistence,
) {
    debug_assert!(chunked || persistence == Persistence::Close);
    write_head_framed(out, date, status, headers, None, persistence);
    if chunked && !is_bodiless(status) {
        // Before the blank line the head ends with.
        out.truncate(out.len() - 2);
        out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
    }
}

/// Appends one chunk of a chunked body (nothing for no bytes: an empty
/// chunk would end the body).
pub fn write_chunk(out: &mut Vec<u8>, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    out.extend_from_slice(format!("{:x}\r\n", bytes.len()).as_bytes());
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// Appends the last chunk that ends a chunked body (no trailers).
pub fn write_last_chunk(out: &mut Vec<u8>) {
    out.extend_from_slice(b"0\r\n\r\n");
}

/// [`write_head`] with `Content-Length` only when `body_len` is known.
fn write_head_framed(
    out: &mut Vec<u8>,
    date: &DateCache,
    status: u16,
    headers: &[Header],
    body_len: Option<usize>,
    persistence: Persistence,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    let mut num = decimal(status as u64);
    out.extend_from_slice(num.as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\nServer: hearth\r\nDate: ");
    out.extend_from_slice(date.get());
    out.extend_from_slice(b"\r\n");
    if let (false, Some(body_len)) = (is_bodiless(status), body_len) {
        out.extend_from_slice(b"Content-Length: ");
        num = decimal(body_len as u64);
        out.extend_from_slice(num.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (k, v) in headers {
        push_header(out, k, v.as_bytes());
    }
    match persistence {
        Persistence::KeepAlive => {}
        Persistence::AnnounceKeepAlive => push_header(out, "connection", b"keep-alive"),
        Persistence::Close => out.extend_from_slice(b"Connection: close\r\n"),
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends one header line; CR/LF in names or values are replaced so a handler
/// cannot split the response.
pub fn push_header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    out.extend(name.bytes().map(|b| {
        if b == b'\r' || b == b'\n' || b == b':' {
            b'_'
        } else {
            b
        }
    }));
    out.extend_from_slice(b": ");
    out.extend(
        value
            .iter()
            .map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }),
    );
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::borrow::Cow;

    #[test]
    fn dates_are_imf_fixdate() {
        assert_eq!(&http_date(0), b"Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(&http_date(1_795_743_518), b"Fri, 27 Nov 2026 01:38:38 GMT");
    }

    #[test]
    fn header_values_cannot_split_the_response() {
        let mut out = Vec::new();
        push_header(&mut out, "x-a\r\nx", b"1\r\nSet-Cookie: evil");
        assert_eq!(out, b"x-a__x: 1  Set-Cookie: evil\r\n");
    }

    #[test]
    fn bodiless_statuses_carry_neither_length_nor_body() {
        let date = DateCache::default();
        for status in [204, 304] {
            let mut out = Vec::new();
            let r = Reply {
                status,
                headers: Vec::new(),
                body: b"HTTP/1.1 200 OK\r\n\r\nsmuggled".to_vec(),
                close: false,
            };
            write(&mut out, &date, &r, Persistence::KeepAlive, false);
            let text = String::from_utf8(out).unwrap();
            assert!(!text.contains("Content-Length"), "{text}");
            assert!(text.ends_with("\r\n\r\n"), "{text}");
            assert!(!text.contains("smuggled"), "{text}");
        }
    }

    #[test]
    fn streamed_answers_are_chunked() {
        let date = DateCache::default();
        let mut out = Vec::new();
        let headers = [(Cow::Borrowed("x-a"), Cow::Borrowed("1"))];
        write_stream_head(&mut out, &date, 200, &headers, true, Persistence::KeepAlive);
        write_chunk(&mut out, b"hello, world");
        write_chunk(&mut out, b"");
        write_last_chunk(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(!text.contains("Content-Length"), "{text}");
        assert!(
            text.ends_with(
                "x-a: 1\r\nTransfer-Encoding: chunked\r\n\r\nc\r\nhello, world\r\n0\r\n\r\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn responses_carry_length_and_close() {
        let date = DateCache::default();
        let mut out = Vec::new();
        write(
            &mut out,
            &date,
            &Reply::new(404, "application/json", b"{}".to_vec()),
            Persistence::Close,
            false,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("\r\nContent-Length: 2\r\n"));
        assert!(text.contains("\r\nConnection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n{}"));
    }
}
