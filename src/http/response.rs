//! Writing HTTP/1.1 responses into a connection's output buffer.

use std::io::Write;

use crate::util::time::since_unix_epoch;

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
    let (y, m, d) = civil_from_days(days as i64);
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

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A response being assembled for one request.
pub struct Response<'a> {
    pub status: u16,
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
}

/// Whether a response with `status` carries no body and no `Content-Length`
/// (RFC 9110 §8.6, RFC 9112 §6.3: 1xx, 204 and 304 end at their head; a body
/// after one would be read as the start of the next response).
pub fn is_bodiless(status: u16) -> bool {
    status < 200 || status == 204 || status == 304
}

/// Appends a complete response. `head_only` answers HEAD (length kept, body omitted).
/// `keep_alive == false` adds `Connection: close`. The body of a status that
/// cannot have one (see [`is_bodiless`]) is dropped.
pub fn write(
    out: &mut Vec<u8>,
    date: &DateCache,
    r: &Response<'_>,
    keep_alive: bool,
    head_only: bool,
) {
    write_head(out, date, r.status, r.headers, r.body.len(), keep_alive);
    if !head_only && !is_bodiless(r.status) {
        out.extend_from_slice(r.body);
    }
}

/// Appends a status line and headers with `Content-Length: body_len` (none for
/// a bodiless status).
pub fn write_head(
    out: &mut Vec<u8>,
    date: &DateCache,
    status: u16,
    headers: &[(&str, &str)],
    body_len: usize,
    keep_alive: bool,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    let mut num = itoa_buf(status as u64);
    out.extend_from_slice(num.as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\nServer: hearth\r\nDate: ");
    out.extend_from_slice(date.get());
    out.extend_from_slice(b"\r\n");
    if !is_bodiless(status) {
        out.extend_from_slice(b"Content-Length: ");
        num = itoa_buf(body_len as u64);
        out.extend_from_slice(num.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    for (k, v) in headers {
        push_header(out, k, v.as_bytes());
    }
    if !keep_alive {
        out.extend_from_slice(b"Connection: close\r\n");
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

/// A JSON error body: `{"error":"<message>","code":"<code>"}`.
pub fn json_error(code: &str, message: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(32 + message.len());
    let _ = write!(
        v,
        "{}",
        serde_json::json!({ "error": message, "code": code })
    );
    v
}

struct Itoa {
    buf: [u8; 20],
    start: usize,
}

impl Itoa {
    fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

fn itoa_buf(mut n: u64) -> Itoa {
    let mut buf = [0u8; 20];
    let mut i = 20;
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    Itoa { buf, start: i }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            let r = Response {
                status,
                headers: &[],
                body: b"HTTP/1.1 200 OK\r\n\r\nsmuggled",
            };
            write(&mut out, &date, &r, true, false);
            let text = String::from_utf8(out).unwrap();
            assert!(!text.contains("Content-Length"), "{text}");
            assert!(text.ends_with("\r\n\r\n"), "{text}");
            assert!(!text.contains("smuggled"), "{text}");
        }
    }

    #[test]
    fn responses_carry_length_and_close() {
        let date = DateCache::default();
        let mut out = Vec::new();
        write(
            &mut out,
            &date,
            &Response {
                status: 404,
                headers: &[("content-type", "application/json")],
                body: b"{}",
            },
            false,
            false,
        );
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with("HTTP/1.1 404 Not Found\r\n"));
        assert!(text.contains("\r\nContent-Length: 2\r\n"));
        assert!(text.contains("\r\nConnection: close\r\n"));
        assert!(text.ends_with("\r\n\r\n{}"));
    }
}
