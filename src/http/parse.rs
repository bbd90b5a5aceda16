//! Sans-IO HTTP/1.1 request parsing: one request head at a time ([`parse_head`]) and the
//! body that follows it ([`BodyDecoder`]).
//!
//! Nothing here reads a socket. The connection keeps a read buffer, calls [`parse_head`] until
//! it returns a [`Request`], drops the head bytes, then feeds the buffer to a [`BodyDecoder`]
//! until it reports the body done; whatever follows is the next pipelined request.
//!
//! `httparse` tokenises the request line and header fields. It is lenient where this server
//! must not be (it takes bare LF as a line end), so the strict checks live here:
//! - every line ends in CRLF; a bare LF is a 400;
//! - a header line without a colon, or a continuation line (obs-fold), is a 400;
//! - the target is origin-form (`/path?query`), absolute-form (`http(s)://authority/path`,
//!   reduced to its path and query; the authority, without any userinfo, replaces the
//!   `Host` value as RFC 9112 section 3.2.2 asks) or `*` (OPTIONS only);
//! - `Host` (RFC 9112 section 3.2): an HTTP/1.1 request without one, any request with more
//!   than one, or one whose value is not a host and optional port is a 400;
//! - version: `HTTP/1.0` and `HTTP/1.1` are served. Any other well-formed `HTTP/<d>.<d>`
//!   (`HTTP/0.9`, `HTTP/1.2`, `HTTP/2.0`, `HTTP/3.0`, ...) is a 505, except the exact HTTP/2
//!   connection preface line `PRI * HTTP/2.0`, which is a 400: the client is not speaking
//!   HTTP/1 at all. A version that is not of that shape (`HTTP/1.10`, `http/1.1`, none) is a 400;
//! - body framing follows RFC 9112 section 6, refusing every request-smuggling ambiguity:
//!   Content-Length with Transfer-Encoding, conflicting Content-Length values, Transfer-Encoding
//!   on HTTP/1.0 (400), and any transfer coding other than a lone `chunked` (501).
//!
//! Limits ([`Limits`]) bound every scan: the head parser never looks past `head_bytes_max`
//! bytes; a chunked body bounds its total size, its extensions and its trailer section.
//! Not enforced here (the caller's decision): `Expect` values other than `100-continue`,
//! which are simply not flagged.

use std::fmt;
use std::mem::MaybeUninit;

/// Limits applied while parsing; configured by whoever creates the connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest request head (request line, header fields, final CRLF) in bytes. Also bounds a
    /// chunked body's trailer section and, separately, its chunk extensions.
    pub head_bytes_max: usize,
    /// Most header fields one request may carry.
    pub headers_max: usize,
    /// Largest decoded request body in bytes.
    pub body_bytes_max: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            head_bytes_max: 64 * 1024,
            headers_max: 100,
            body_bytes_max: 6 * 1024 * 1024,
        }
    }
}

/// The HTTP versions this server speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// `HTTP/1.0`
    Http10,
    /// `HTTP/1.1`
    Http11,
}

/// How the request body is delimited on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BodyFraming {
    /// No Content-Length and no Transfer-Encoding: the request has no body.
    None,
    /// `Content-Length: n`.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
}

/// One parsed request head.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// Method as sent (case-sensitive), a valid token.
    pub method: String,
    /// Origin-form target `/path?query`; absolute-form targets are reduced to this; `*` for
    /// `OPTIONS *`.
    pub target: String,
    /// Protocol version of the request line.
    pub version: Version,
    /// Header fields in order: names lower-cased, values without surrounding whitespace,
    /// non-UTF-8 bytes replaced by U+FFFD.
    pub headers: Vec<(String, String)>,
    /// Whether the connection may stay open after this exchange.
    pub keep_alive: bool,
    /// `Expect: 100-continue` on an HTTP/1.1 request.
    pub expect_continue: bool,
    /// How the body that follows the head is framed.
    pub body: BodyFraming,
    /// `X-Hearth-Timing: 1`: the client asks for the answer's phase timings.
    pub timing: bool,
}

impl Request {
    /// Value of the first header field called `lower_name` (which must be lower case).
    pub fn header(&self, lower_name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(name, _)| name == lower_name)
            .map(|(_, value)| value.as_str())
    }

    /// Target up to (not including) the first `?`.
    pub fn path(&self) -> &str {
        match self.target.split_once('?') {
            Some((path, _)) => path,
            None => &self.target,
        }
    }

    /// Target after the first `?`; empty when there is none.
    pub fn query(&self) -> &str {
        match self.target.split_once('?') {
            Some((_, query)) => query,
            None => "",
        }
    }
}

/// Why a request could not be parsed. The connection answers with [`Error::status`] and closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Malformed or ambiguous request; the text says what was wrong.
    BadRequest(&'static str),
    /// A well-formed HTTP version other than 1.0 and 1.1.
    VersionNotSupported,
    /// The head, or a chunked body's trailer section, exceeds `head_bytes_max`.
    HeadTooLarge,
    /// More than `headers_max` header fields.
    TooManyHeaders,
    /// Body (declared or decoded) or chunk extensions exceed their limit.
    BodyTooLarge,
    /// A Transfer-Encoding other than exactly `chunked`.
    UnsupportedTransferEncoding,
}

impl Error {
    /// HTTP status code to answer with.
    pub fn status(&self) -> u16 {
        match self {
            Error::BadRequest(_) => 400,
            Error::VersionNotSupported => 505,
            Error::HeadTooLarge | Error::TooManyHeaders => 431,
            Error::BodyTooLarge => 413,
            Error::UnsupportedTransferEncoding => 501,
        }
    }

    /// Short human-readable reason, suitable for a response body.
    pub fn message(&self) -> &str {
        match self {
            Error::BadRequest(why) => why,
            Error::VersionNotSupported => "HTTP version not supported; send HTTP/1.1",
            Error::HeadTooLarge => "request head or trailer section exceeds the size limit",
            Error::TooManyHeaders => "too many header fields",
            Error::BodyTooLarge => "request body exceeds the size limit",
            Error::UnsupportedTransferEncoding => {
                "unsupported Transfer-Encoding; only \"chunked\" is accepted"
            }
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status(), self.message())
    }
}

impl std::error::Error for Error {}

/// Header slots kept on the stack; a `headers_max` above this uses a heap array instead.
const HEADER_SLOTS_STACK: usize = 128;

/// Parses one request head at the start of `buf`.
///
/// `Ok(None)`: the head is incomplete and `buf` is still within limits; call again with more
/// bytes. `Ok(Some((req, n)))`: the head is `buf[..n]` (including any empty lines before the
/// request line). `Err`: the connection must answer with `err.status()` and close.
/// Looks at no more than `limits.head_bytes_max` bytes of `buf`.
pub fn parse_head(buf: &[u8], limits: &Limits) -> Result<Option<(Request, usize)>, Error> {
    let window = &buf[..buf.len().min(limits.head_bytes_max)];
    let window_full = buf.len() >= limits.head_bytes_max;

    let mut stack_slots = [MaybeUninit::<httparse::Header<'_>>::uninit(); HEADER_SLOTS_STACK];
    let mut heap_slots: Vec<MaybeUninit<httparse::Header<'_>>>;
    let slots: &mut [MaybeUninit<httparse::Header<'_>>] =
        if limits.headers_max <= HEADER_SLOTS_STACK {
            &mut stack_slots[..limits.headers_max]
        } else {
            heap_slots = vec![MaybeUninit::uninit(); limits.headers_max];
            &mut heap_slots
        };

    let mut raw = httparse::Request::new(&mut []);
    match raw.parse_with_uninit_headers(window, slots) {
        Ok(httparse::Status::Complete(head_len)) => {
            build_request(window, &raw, head_len).map(|req| Some((req, head_len)))
        }
        Ok(httparse::Status::Partial) if window_full => Err(Error::HeadTooLarge),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(httparse::Error::TooManyHeaders) => Err(Error::TooManyHeaders),
        Err(cause) => explain_failure(window, cause, window_full),
    }
}

/// Turns httparse's complete (but lenient) parse into a [`Request`], applying the strict rules.
fn build_request(
    window: &[u8],
    raw: &httparse::Request<'_, '_>,
    head_len: usize,
) -> Result<Request, Error> {
    let (Some(method), Some(raw_target), Some(minor)) = (raw.method, raw.path, raw.version) else {
        // httparse promises all three on a complete parse; refuse rather than panic.
        return Err(Error::BadRequest("malformed request line"));
    };
    require_crlf_line_ends(window, method, raw_target, raw.headers, head_len)?;
    let version = if minor == 1 {
        Version::Http11
    } else {
        Version::Http10
    };
    let (target, authority) = normalise_target(method, raw_target)?;

    let mut headers = Vec::with_capacity(raw.headers.len());
    let mut host: Option<usize> = None;
    let mut content_length: Option<u64> = None;
    let mut transfer_encodings = 0usize;
    let mut chunked = false;
    let mut close = false;
    let mut keep_alive_token = false;
    let mut expect_continue = false;
    let mut timing = false;
    for field in raw.headers.iter() {
        let name = field.name;
        // httparse has already dropped the SP/HT around the value.
        let value = field.value;
        // Dispatch on length first: most fields are none of these five.
        match name.len() {
            14 if name.eq_ignore_ascii_case("content-length") => {
                let n = parse_content_length(value)?;
                if content_length.is_some_and(|seen| seen != n) {
                    return Err(Error::BadRequest("conflicting Content-Length values"));
                }
                content_length = Some(n);
            }
            17 if name.eq_ignore_ascii_case("transfer-encoding") => {
                transfer_encodings += 1;
                chunked = transfer_encodings == 1 && value.eq_ignore_ascii_case(b"chunked");
            }
            10 if name.eq_ignore_ascii_case("connection") => {
                for option in value.split(|&b| b == b',').map(trim_ows) {
                    close |= option.eq_ignore_ascii_case(b"close");
                    keep_alive_token |= option.eq_ignore_ascii_case(b"keep-alive");
                }
            }
            6 if name.eq_ignore_ascii_case("expect") => {
                expect_continue |= value.eq_ignore_ascii_case(b"100-continue");
            }
            15 if name.eq_ignore_ascii_case("x-hearth-timing") => timing = value == b"1",
            4 if name.eq_ignore_ascii_case("host") => {
                if host.is_some() {
                    return Err(Error::BadRequest("more than one Host header"));
                }
                if !is_host_value(value) {
                    return Err(Error::BadRequest("Host is not a host name and port"));
                }
                host = Some(headers.len());
            }
            _ => {}
        }
        headers.push((
            name.to_ascii_lowercase(),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }

    match (host, authority) {
        (None, _) if version == Version::Http11 => {
            return Err(Error::BadRequest("an HTTP/1.1 request needs a Host header"));
        }
        // An absolute-form target names the host; the header is ignored (RFC 9112 3.2.2).
        (Some(at), Some(authority)) => headers[at].1 = authority.to_owned(),
        (None, Some(authority)) => headers.push(("host".to_owned(), authority.to_owned())),
        _ => {}
    }

    let body = if transfer_encodings > 0 {
        if version == Version::Http10 {
            return Err(Error::BadRequest(
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        if content_length.is_some() {
            return Err(Error::BadRequest(
                "both Content-Length and Transfer-Encoding",
            ));
        }
        if !chunked {
            return Err(Error::UnsupportedTransferEncoding);
        }
        BodyFraming::Chunked
    } else {
        content_length.map_or(BodyFraming::None, BodyFraming::Length)
    };

    let keep_alive = match version {
        Version::Http11 => !close,
        Version::Http10 => keep_alive_token && !close,
    };
    Ok(Request {
        method: method.to_owned(),
        target,
        version,
        headers,
        keep_alive,
        expect_continue: expect_continue && version == Version::Http11,
        body,
        timing,
    })
}

/// Byte offset of `part` inside `whole`; `part` must be a sub-slice of `whole`.
fn offset_in(whole: &[u8], part: &[u8]) -> usize {
    let offset = (part.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize);
    debug_assert!(
        offset + part.len() <= whole.len(),
        "slice is not inside the buffer"
    );
    offset
}

/// httparse accepts a bare LF wherever CRLF belongs. Rather than rescanning the head, check
/// the one byte that ends each line: it sits right after the token httparse returned for it
/// (plus any trailing whitespace it trimmed from a header value).
fn require_crlf_line_ends(
    window: &[u8],
    method: &str,
    target: &str,
    fields: &[httparse::Header<'_>],
    head_len: usize,
) -> Result<(), Error> {
    const BARE_LF: Error = Error::BadRequest("bare LF where CRLF is required");
    // Empty lines before the request line (which httparse skips) must each be CRLF.
    let leading = &window[..offset_in(window, method.as_bytes())];
    if !leading.len().is_multiple_of(2) || leading.chunks_exact(2).any(|pair| pair != b"\r\n") {
        return Err(BARE_LF);
    }
    // Request line: target, SP, 8-byte version, then the line end.
    let version_end = offset_in(window, target.as_bytes()) + target.len() + 1 + 8;
    if window.get(version_end) != Some(&b'\r') {
        return Err(BARE_LF);
    }
    for field in fields {
        let colon = offset_in(window, field.name.as_bytes()) + field.name.len();
        let mut at = if field.value.is_empty() {
            colon + 1
        } else {
            offset_in(window, field.value) + field.value.len()
        };
        while matches!(window.get(at), Some(b' ' | b'\t')) {
            at += 1;
        }
        if window.get(at) != Some(&b'\r') {
            return Err(BARE_LF);
        }
    }
    // The head ends in an empty line; the byte before its LF is either its CR or the LF of
    // the previous line.
    if window.get(head_len.wrapping_sub(2)) != Some(&b'\r') {
        return Err(BARE_LF);
    }
    Ok(())
}

/// Checks the target's form and reduces absolute-form to origin-form; for absolute-form,
/// also returns the URI's authority without its userinfo (the request's host).
fn normalise_target<'t>(method: &str, target: &'t str) -> Result<(String, Option<&'t str>), Error> {
    // A fragment is the client's own business (RFC 9112 3.2): one sent anyway
    // would reach the function as part of the path or query.
    if target.contains('#') {
        return Err(Error::BadRequest(
            "a request target cannot hold a fragment (#)",
        ));
    }
    if target.starts_with('/') {
        return Ok((target.to_owned(), None));
    }
    if target == "*" {
        return if method == "OPTIONS" {
            Ok((target.to_owned(), None))
        } else {
            Err(Error::BadRequest(
                "target \"*\" is only allowed with OPTIONS",
            ))
        };
    }
    let after_scheme = strip_prefix_ignore_ascii_case(target, "http://")
        .or_else(|| strip_prefix_ignore_ascii_case(target, "https://"));
    let Some(rest) = after_scheme else {
        return Err(Error::BadRequest(
            "target must be an absolute path, an absolute http(s) URI, or \"*\"",
        ));
    };
    let authority_len = rest.find(['/', '?']).unwrap_or(rest.len());
    let authority = &rest[..authority_len];
    let host = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if host.is_empty() || !is_host_value(host.as_bytes()) {
        return Err(Error::BadRequest("absolute-form target without a host"));
    }
    let path_and_query = &rest[authority_len..];
    let origin_form = if path_and_query.starts_with('/') {
        path_and_query.to_owned()
    } else {
        // "http://host" or "http://host?q": the path is empty, which means "/".
        format!("/{path_and_query}")
    };
    Ok((origin_form, Some(host)))
}

/// Whether `value` can be a `Host` field value: the URI's host (a name, an IPv4 address
/// or a bracketed IP literal) and an optional port, so bytes from RFC 3986's unreserved,
/// sub-delims, `%`, `:`, `[` and `]`; empty is allowed (RFC 9112 3.2, a target without an
/// authority).
fn is_host_value(value: &[u8]) -> bool {
    value
        .iter()
        .all(|&b| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=:[]".contains(&b))
}

fn strip_prefix_ignore_ascii_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Parses one Content-Length field value: a decimal number, or a comma list of identical ones.
fn parse_content_length(value: &[u8]) -> Result<u64, Error> {
    let mut agreed: Option<u64> = None;
    for element in value.split(|&b| b == b',').map(trim_ows) {
        if element.is_empty() {
            return Err(Error::BadRequest("empty Content-Length"));
        }
        let mut n: u64 = 0;
        for &b in element {
            if !b.is_ascii_digit() {
                return Err(Error::BadRequest("Content-Length is not a decimal number"));
            }
            n = n
                .checked_mul(10)
                .and_then(|n| n.checked_add(u64::from(b - b'0')))
                .ok_or(Error::BadRequest("Content-Length overflows 64 bits"))?;
        }
        if agreed.is_some_and(|seen| seen != n) {
            return Err(Error::BadRequest("conflicting Content-Length values"));
        }
        agreed = Some(n);
    }
    agreed.ok_or(Error::BadRequest("empty Content-Length"))
}

fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// RFC 9110 `tchar`: the bytes of methods, header names and chunk-extension names.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Bytes allowed in a field value (and in a quoted string): HT, SP, VCHAR, obs-text.
fn is_field_value_byte(b: u8) -> bool {
    b == b'\t' || (b' '..=b'~').contains(&b) || b >= 0x80
}

/// Runs only after httparse rejected the head: walks it strictly, line by line, to name the
/// first fault precisely, and separates unsupported versions (505) from garbage (400).
fn explain_failure(
    window: &[u8],
    cause: httparse::Error,
    window_full: bool,
) -> Result<Option<(Request, usize)>, Error> {
    let mut start = 0;
    while window.get(start..start + 2) == Some(b"\r\n") {
        start += 2;
    }
    let Some(line_len) = window[start..].iter().position(|&b| b == b'\n') else {
        // httparse fails on a version as soon as it differs from 1.0/1.1; telling a 505 from
        // a 400 needs the whole line, so wait for it.
        return match cause {
            httparse::Error::Version if window_full => Err(Error::HeadTooLarge),
            httparse::Error::Version => Ok(None),
            _ => Err(httparse_fallback(cause)),
        };
    };
    check_request_line(&window[start..start + line_len])?;

    let mut start = start + line_len + 1;
    while let Some(line_len) = window[start..].iter().position(|&b| b == b'\n') {
        if check_header_line(&window[start..start + line_len])? {
            break;
        }
        start += line_len + 1;
    }
    Err(httparse_fallback(cause))
}

/// Strict check of a complete request line (without its LF).
fn check_request_line(line: &[u8]) -> Result<(), Error> {
    let Some(line) = line.strip_suffix(b"\r") else {
        return Err(Error::BadRequest("bare LF where CRLF is required"));
    };
    if line == b"PRI * HTTP/2.0" {
        return Err(Error::BadRequest(
            "HTTP/2 connection preface; this server speaks HTTP/1.1",
        ));
    }
    let mut parts = line.split(|&b| b == b' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Error::BadRequest(
            "request line is not METHOD SP target SP version",
        ));
    };
    if method.is_empty() || !method.iter().all(|&b| is_tchar(b)) {
        return Err(Error::BadRequest("invalid method token"));
    }
    if target.iter().any(|&b| b < 0x21 || b == 0x7f) {
        return Err(Error::BadRequest("control character in target"));
    }
    let Ok(target) = std::str::from_utf8(target) else {
        return Err(Error::BadRequest("target is not valid UTF-8"));
    };
    // Method is all tchar, so ASCII.
    normalise_target(std::str::from_utf8(method).unwrap_or(""), target)?;
    match version {
        b"HTTP/1.0" | b"HTTP/1.1" => Ok(()),
        [b'H', b'T', b'T', b'P', b'/', major, b'.', minor]
            if major.is_ascii_digit() && minor.is_ascii_digit() =>
        {
            Err(Error::VersionNotSupported)
        }
        _ => Err(Error::BadRequest("malformed HTTP version")),
    }
}

/// Strict check of a complete header line (without its LF); `Ok(true)` for the empty line
/// that ends the head.
fn check_header_line(line: &[u8]) -> Result<bool, Error> {
    let Some(line) = line.strip_suffix(b"\r") else {
        return Err(Error::BadRequest("bare LF where CRLF is required"));
    };
    let Some(&first) = line.first() else {
        return Ok(true);
    };
    if first == b' ' || first == b'\t' {
        return Err(Error::BadRequest("obsolete line folding in header"));
    }
    let Some(colon) = line.iter().position(|&b| b == b':') else {
        return Err(Error::BadRequest("header line without colon"));
    };
    if colon == 0 {
        return Err(Error::BadRequest("empty header name"));
    }
    if !line[..colon].iter().all(|&b| is_tchar(b)) {
        return Err(Error::BadRequest("invalid character in header name"));
    }
    if !line[colon + 1..].iter().all(|&b| is_field_value_byte(b)) {
        return Err(Error::BadRequest("invalid character in header value"));
    }
    Ok(false)
}

/// Message for a fault the strict walk did not locate (it lies in an incomplete line).
fn httparse_fallback(cause: httparse::Error) -> Error {
    Error::BadRequest(match cause {
        httparse::Error::HeaderName => "invalid character in header name",
        httparse::Error::HeaderValue => "invalid character in header value",
        httparse::Error::NewLine => "invalid line ending",
        httparse::Error::Token => "invalid method or target",
        httparse::Error::Version => "malformed HTTP version",
        httparse::Error::Status | httparse::Error::TooManyHeaders => "malformed request head",
    })
}

/// Incremental decoder for the body of one request.
#[derive(Debug, Clone)]
pub struct BodyDecoder {
    state: BodyState,
    /// Size of the chunk whose header line is being read.
    chunk_size: u64,
    /// Hex digits read so far for `chunk_size`.
    chunk_size_digits: u8,
    /// Sum of chunk sizes announced so far.
    chunked_bytes: u64,
    body_bytes_max: u64,
    /// Chunk-extension bytes and trailer-section bytes seen so far; each bounded by
    /// `meta_bytes_max`.
    extension_bytes: usize,
    trailer_bytes: usize,
    meta_bytes_max: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum BodyState {
    /// Content-Length body with this many bytes left.
    Length {
        remaining: u64,
    },
    /// Chunk size hex digits.
    Size,
    /// Whitespace after the size; only an extension may follow.
    SizeSpace,
    /// After `;`, before the extension name.
    ExtStart,
    ExtName,
    ExtAfterName,
    /// After `=`, before the value.
    ExtEquals,
    ExtToken,
    ExtQuoted,
    ExtQuotedEscape,
    ExtAfterValue,
    /// CR of the chunk header line seen.
    SizeLf,
    Data {
        remaining: u64,
    },
    DataCr,
    DataLf,
    TrailerLineStart,
    TrailerName,
    TrailerValue,
    TrailerLf,
    /// CR of the empty line that ends the chunked body seen.
    FinalLf,
    Done,
    Failed(Error),
}

impl BodyDecoder {
    /// Decoder for a body framed as `framing`. A declared length above `body_bytes_max` is
    /// refused here, before any body byte is read.
    pub fn new(framing: BodyFraming, limits: &Limits) -> Result<BodyDecoder, Error> {
        let state = match framing {
            BodyFraming::None | BodyFraming::Length(0) => BodyState::Done,
            BodyFraming::Length(n) if n > limits.body_bytes_max => {
                return Err(Error::BodyTooLarge);
            }
            BodyFraming::Length(n) => BodyState::Length { remaining: n },
            BodyFraming::Chunked => BodyState::Size,
        };
        Ok(BodyDecoder {
            state,
            chunk_size: 0,
            chunk_size_digits: 0,
            chunked_bytes: 0,
            body_bytes_max: limits.body_bytes_max,
            extension_bytes: 0,
            trailer_bytes: 0,
            meta_bytes_max: limits.head_bytes_max,
        })
    }

    /// Whether the whole body (for chunked: including trailers and the final CRLF) was read.
    pub fn is_done(&self) -> bool {
        self.state == BodyState::Done
    }

    /// Consumes a prefix of `input`, appending decoded body bytes to `out`; returns
    /// `(consumed, done)`. Until `done`, all of `input` is consumed; once done, the bytes after
    /// `consumed` belong to the next request. After an error, every call returns that error.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<(usize, bool), Error> {
        let mut at = 0;
        let result = loop {
            match self.state {
                BodyState::Done => break Ok((at, true)),
                BodyState::Failed(ref err) => break Err(err.clone()),
                BodyState::Length { remaining } | BodyState::Data { remaining } => {
                    let available = input.len() - at;
                    let take = remaining.min(available as u64) as usize;
                    out.extend_from_slice(&input[at..at + take]);
                    at += take;
                    let remaining = remaining - take as u64;
                    self.state = match (&self.state, remaining) {
                        (BodyState::Length { .. }, 0) => BodyState::Done,
                        (BodyState::Length { .. }, _) => BodyState::Length { remaining },
                        (_, 0) => BodyState::DataCr,
                        (_, _) => BodyState::Data { remaining },
                    };
                    if remaining > 0 {
                        break Ok((at, false));
                    }
                }
                _ => {
                    let Some(&byte) = input.get(at) else {
                        break Ok((at, false));
                    };
                    at += 1;
                    if let Err(err) = self.step(byte) {
                        self.state = BodyState::Failed(err.clone());
                        break Err(err);
                    }
                }
            }
        };
        debug_assert!(
            !matches!(result, Ok((consumed, done)) if consumed > input.len() || (!done && consumed != input.len())),
            "feed must consume all input until done, and never more than given"
        );
        result
    }

    /// Advances the chunked framing state machine by one byte.
    fn step(&mut self, b: u8) -> Result<(), Error> {
        const BARE_LF: Error = Error::BadRequest("bare LF in chunked body");
        use BodyState::*;
        match self.state {
            ExtStart | ExtName | ExtAfterName | ExtEquals | ExtToken | ExtQuoted
            | ExtQuotedEscape | ExtAfterValue => {
                self.extension_bytes += 1;
                if self.extension_bytes > self.meta_bytes_max {
                    return Err(Error::BodyTooLarge);
                }
            }
            TrailerLineStart | TrailerName | TrailerValue | TrailerLf | FinalLf => {
                self.trailer_bytes += 1;
                if self.trailer_bytes > self.meta_bytes_max {
                    return Err(Error::HeadTooLarge);
                }
            }
            _ => {}
        }
        self.state = match (&self.state, b) {
            (Size, _) if b.is_ascii_hexdigit() => {
                if self.chunk_size_digits == 16 {
                    return Err(Error::BadRequest("chunk size overflows 64 bits"));
                }
                self.chunk_size_digits += 1;
                // Lossless: at most 16 hex digits fit in a u64.
                self.chunk_size = self.chunk_size << 4 | u64::from(hex_value(b));
                Size
            }
            (Size, _) if self.chunk_size_digits == 0 => {
                return Err(Error::BadRequest("chunk size missing or not hexadecimal"));
            }
            (Size, b';') => ExtStart,
            (Size, b' ' | b'\t') => SizeSpace,
            (Size, b'\r') => SizeLf,
            (SizeSpace, b' ' | b'\t') => SizeSpace,
            (SizeSpace, b';') => ExtStart,

            (ExtStart, b' ' | b'\t') => ExtStart,
            (ExtStart, _) if is_tchar(b) => ExtName,
            (ExtName, _) if is_tchar(b) => ExtName,
            (ExtName, b' ' | b'\t') => ExtAfterName,
            (ExtName | ExtAfterName, b'=') => ExtEquals,
            (ExtAfterName, b' ' | b'\t') => ExtAfterName,
            (ExtEquals, b' ' | b'\t') => ExtEquals,
            (ExtEquals, b'"') => ExtQuoted,
            (ExtEquals | ExtToken, _) if is_tchar(b) => ExtToken,
            (ExtQuoted, b'"') => ExtAfterValue,
            (ExtQuoted, b'\\') => ExtQuotedEscape,
            (ExtQuoted | ExtQuotedEscape, _) if is_field_value_byte(b) => ExtQuoted,
            (ExtToken | ExtAfterValue, b' ' | b'\t') => ExtAfterValue,
            (ExtName | ExtAfterName | ExtToken | ExtAfterValue, b';') => ExtStart,
            (ExtName | ExtAfterName | ExtToken | ExtAfterValue, b'\r') => SizeLf,

            (SizeLf, b'\n') => {
                let size = self.chunk_size;
                self.chunk_size = 0;
                self.chunk_size_digits = 0;
                self.chunked_bytes = self.chunked_bytes.saturating_add(size);
                if self.chunked_bytes > self.body_bytes_max {
                    return Err(Error::BodyTooLarge);
                }
                if size == 0 {
                    TrailerLineStart
                } else {
                    Data { remaining: size }
                }
            }
            (SizeLf, _) => return Err(Error::BadRequest("CR without LF in chunk header")),

            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => Size,
            (DataCr, b'\n') => return Err(BARE_LF),
            (DataCr | DataLf, _) => {
                return Err(Error::BadRequest("missing CRLF after chunk data"));
            }

            (TrailerLineStart, b'\r') => FinalLf,
            (TrailerLineStart, b' ' | b'\t') => {
                return Err(Error::BadRequest("obsolete line folding in trailer"));
            }
            (TrailerLineStart | TrailerName, _) if is_tchar(b) => TrailerName,
            (TrailerName, b':') => TrailerValue,
            (TrailerName, b'\r') => {
                return Err(Error::BadRequest("trailer line without colon"));
            }
            (TrailerValue, b'\r') => TrailerLf,
            (TrailerValue, _) if is_field_value_byte(b) => TrailerValue,
            (TrailerLf, b'\n') => TrailerLineStart,
            (FinalLf, b'\n') => Done,

            (_, b'\n') => return Err(BARE_LF),
            (Size | SizeSpace, _) => return Err(Error::BadRequest("invalid chunk size line")),
            (
                ExtStart | ExtName | ExtAfterName | ExtEquals | ExtToken | ExtQuoted
                | ExtQuotedEscape | ExtAfterValue,
                _,
            ) => {
                return Err(Error::BadRequest("invalid chunk extension"));
            }
            (TrailerLineStart | TrailerName | TrailerValue, _) => {
                return Err(Error::BadRequest("invalid character in trailer field"));
            }
            (TrailerLf | FinalLf, _) => {
                return Err(Error::BadRequest("CR without LF in trailer section"));
            }
            (Length { .. } | Data { .. } | Done | Failed(_), _) => {
                unreachable!("feed handles {:?} without calling step", self.state)
            }
        };
        Ok(())
    }
}

fn hex_value(b: u8) -> u8 {
    match b {
        b'0'..=b'9' => b - b'0',
        b'a'..=b'f' => b - b'a' + 10,
        _ => b - b'A' + 10,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> Limits {
        Limits::default()
    }

    /// Parses a head that must be complete and valid.
    fn head(raw: &[u8]) -> (Request, usize) {
        match parse_head(raw, &limits()) {
            Ok(Some(parsed)) => parsed,
            other => panic!(
                "{:?} did not parse: {other:?}",
                String::from_utf8_lossy(raw)
            ),
        }
    }

    /// Error for a head that must be rejected.
    fn head_err(raw: &[u8]) -> Error {
        head_err_with(raw, &limits())
    }

    fn head_err_with(raw: &[u8], limits: &Limits) -> Error {
        match parse_head(raw, limits) {
            Err(err) => err,
            other => panic!(
                "{:?} was not rejected: {other:?}",
                String::from_utf8_lossy(raw)
            ),
        }
    }

    fn assert_bad_request(raw: &[u8], message: &'static str) {
        assert_eq!(
            head_err(raw),
            Error::BadRequest(message),
            "{:?}",
            String::from_utf8_lossy(raw)
        );
    }

    /// Decodes a whole body (which must complete) from `input`; returns (body, consumed).
    fn decode(framing: BodyFraming, input: &[u8]) -> Result<(Vec<u8>, usize), Error> {
        let mut decoder = BodyDecoder::new(framing, &limits())?;
        let mut out = Vec::new();
        let (consumed, done) = decoder.feed(input, &mut out)?;
        assert!(done, "body incomplete after {consumed} bytes");
        Ok((out, consumed))
    }

    fn chunked_err(input: &[u8]) -> Error {
        chunked_err_with(input, &limits())
    }

    fn chunked_err_with(input: &[u8], limits: &Limits) -> Error {
        let mut decoder = BodyDecoder::new(BodyFraming::Chunked, limits).unwrap();
        match decoder.feed(input, &mut Vec::new()) {
            Err(err) => err,
            other => panic!(
                "{:?} was not rejected: {other:?}",
                String::from_utf8_lossy(input)
            ),
        }
    }

    // ---- request line, headers, connection semantics ----

    #[test]
    fn simple_get_is_parsed_into_fields() {
        let raw = b"GET /fn/hello?x=1&y=2 HTTP/1.1\r\nHost: example\r\nAccept: */*\r\n\r\n";
        let (req, n) = head(raw);
        assert_eq!(n, raw.len());
        assert_eq!(req.method, "GET");
        assert_eq!(req.target, "/fn/hello?x=1&y=2");
        assert_eq!(req.path(), "/fn/hello");
        assert_eq!(req.query(), "x=1&y=2");
        assert_eq!(req.version, Version::Http11);
        assert_eq!(
            req.headers,
            [
                ("host".into(), "example".into()),
                ("accept".into(), "*/*".into())
            ]
        );
        assert_eq!(req.header("host"), Some("example"));
        assert_eq!(req.header("missing"), None);
        assert!(req.keep_alive);
        assert!(!req.expect_continue);
        assert_eq!(req.body, BodyFraming::None);
    }

    #[test]
    fn query_is_empty_without_question_mark() {
        let (req, _) = head(b"GET /a/b HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(req.path(), "/a/b");
        assert_eq!(req.query(), "");
        let (req, _) = head(b"GET /a? HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!((req.path(), req.query()), ("/a", ""));
    }

    #[test]
    fn header_returns_first_of_repeated_fields() {
        let (req, _) = head(b"GET / HTTP/1.1\r\nHost: h\r\nX-A: 1\r\nx-a: 2\r\n\r\n");
        assert_eq!(req.header("x-a"), Some("1"));
        assert_eq!(req.headers.len(), 3);
    }

    #[test]
    fn head_length_excludes_following_bytes() {
        let raw = b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 3\r\n\r\nabcGET";
        let (req, n) = head(raw);
        assert_eq!(&raw[n..], b"abcGET");
        assert_eq!(req.body, BodyFraming::Length(3));
    }

    #[test]
    fn every_strict_prefix_of_a_head_needs_more_bytes() {
        let raw = b"GET /x HTTP/1.1\r\nHost: a\r\nX-Long: some value\r\n\r\n";
        for end in 0..raw.len() {
            assert_eq!(
                parse_head(&raw[..end], &limits()),
                Ok(None),
                "prefix of {end} bytes"
            );
        }
        assert!(parse_head(raw, &limits()).unwrap().is_some());
    }

    #[test]
    fn leading_empty_lines_are_skipped_and_counted() {
        let raw = b"\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n\r\n";
        let (req, n) = head(raw);
        assert_eq!(n, raw.len());
        assert_eq!(req.target, "/");
    }

    #[test]
    fn header_names_are_lowercased_and_values_trimmed() {
        let (req, _) = head(
            b"GET / HTTP/1.1\r\nHost: h\r\nX-Mixed-CASE: \t inner  space \t \r\nEmpty:\r\nE2:   \r\n\r\n",
        );
        assert_eq!(
            req.headers,
            [
                ("host".into(), "h".into()),
                ("x-mixed-case".into(), "inner  space".into()),
                ("empty".into(), "".into()),
                ("e2".into(), "".into())
            ]
        );
    }

    #[test]
    fn non_utf8_header_values_are_converted_lossily() {
        let (req, _) = head(b"GET / HTTP/1.1\r\nHost: h\r\nX-Bin: a\xffb\xc3\xa9\r\n\r\n");
        assert_eq!(req.header("x-bin"), Some("a\u{fffd}b\u{e9}"));
    }

    #[test]
    fn http11_keeps_alive_unless_connection_close() {
        assert!(head(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n").0.keep_alive);
        assert!(
            !head(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(
            !head(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: Keep-Alive, CLOSE\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(
            !head(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: upgrade\r\nConnection: close\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(
            head(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: closed\r\n\r\n")
                .0
                .keep_alive
        );
    }

    #[test]
    fn http10_closes_unless_connection_keep_alive() {
        let (req, _) = head(b"GET / HTTP/1.0\r\n\r\n");
        assert_eq!(req.version, Version::Http10);
        assert!(!req.keep_alive);
        assert!(
            head(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(
            head(b"GET / HTTP/1.0\r\nconnection: foo , Keep-Alive\r\n\r\n")
                .0
                .keep_alive
        );
        assert!(
            !head(b"GET / HTTP/1.0\r\nConnection: keep-alive, close\r\n\r\n")
                .0
                .keep_alive
        );
    }

    #[test]
    fn expect_continue_is_flagged_only_on_http11() {
        assert!(
            head(b"PUT / HTTP/1.1\r\nHost: h\r\nExpect: 100-Continue\r\nContent-Length: 1\r\n\r\n")
                .0
                .expect_continue
        );
        assert!(
            !head(b"PUT / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 1\r\n\r\n")
                .0
                .expect_continue
        );
        assert!(
            !head(b"PUT / HTTP/1.1\r\nHost: h\r\nExpect: something-else\r\n\r\n")
                .0
                .expect_continue
        );
    }

    #[test]
    fn bare_lf_is_rejected_anywhere_in_the_head() {
        const BARE_LF: &str = "bare LF where CRLF is required";
        assert_bad_request(b"GET / HTTP/1.1\n\r\n", BARE_LF);
        assert_bad_request(b"GET / HTTP/1.1\r\nHost: a\n\r\n", BARE_LF);
        assert_bad_request(b"GET / HTTP/1.1\r\nHost: a  \n\r\n", BARE_LF);
        assert_bad_request(b"GET / HTTP/1.1\r\nHost:\n\r\n", BARE_LF);
        assert_bad_request(b"GET / HTTP/1.1\r\nHost: a\r\n\n", BARE_LF);
        assert_bad_request(b"GET / HTTP/1.1\n\n", BARE_LF);
        assert_bad_request(b"\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", BARE_LF);
        assert_bad_request(b"\r\n\nGET / HTTP/1.1\r\nHost: h\r\n\r\n", BARE_LF);
        // A bare LF in a line httparse rejects for another reason is named first.
        assert_bad_request(b"GET / HTTP/1.1\nbad line\r\n\r\n", BARE_LF);
    }

    #[test]
    fn cr_not_followed_by_lf_is_rejected() {
        assert_eq!(
            head_err(b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n").status(),
            400
        );
        assert_eq!(head_err(b"GET / HTTP/1.1\rX\r\n\r\n").status(), 400);
    }

    #[test]
    fn header_line_without_colon_is_rejected() {
        assert_bad_request(
            b"GET / HTTP/1.1\r\nHost example\r\n\r\n",
            "header line without colon",
        );
        assert_bad_request(
            b"GET / HTTP/1.1\r\nHost: a\r\nJunk\r\n\r\n",
            "header line without colon",
        );
    }

    #[test]
    fn obs_fold_continuation_line_is_rejected() {
        assert_bad_request(
            b"GET / HTTP/1.1\r\nHost: h\r\nX-A: one\r\n  two\r\n\r\n",
            "obsolete line folding in header",
        );
        assert_bad_request(
            b"GET / HTTP/1.1\r\nHost: h\r\nX-A: one\r\n\ttwo\r\n\r\n",
            "obsolete line folding in header",
        );
    }

    #[test]
    fn invalid_header_names_and_values_are_rejected() {
        assert_bad_request(
            b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
            "invalid character in header name",
        );
        assert_bad_request(
            b"GET / HTTP/1.1\r\nHost: h\r\n: a\r\n\r\n",
            "empty header name",
        );
        assert_bad_request(
            b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n",
            "invalid character in header value",
        );
        assert_bad_request(
            b"GET / HTTP/1.1\r\nHost: h\r\nX-A: a\x7fb\r\n\r\n",
            "invalid character in header value",
        );
    }

    #[test]
    fn invalid_method_token_is_rejected() {
        assert_bad_request(b"G(T / HTTP/1.1\r\nHost: h\r\n\r\n", "invalid method token");
        assert_bad_request(
            b"GE\"T / HTTP/1.1\r\nHost: h\r\n\r\n",
            "invalid method token",
        );
        assert_bad_request(
            b" GET / HTTP/1.1\r\nHost: h\r\n\r\n",
            "request line is not METHOD SP target SP version",
        );
        // The fault is visible before the line ends: no need to wait for the rest.
        assert_eq!(head_err(b"G(T /").status(), 400);
        // Custom token methods are fine and kept as sent.
        assert_eq!(
            head(b"m-SEARCH! / HTTP/1.1\r\nHost: h\r\n\r\n").0.method,
            "m-SEARCH!"
        );
    }

    #[test]
    fn request_line_with_wrong_spacing_is_rejected() {
        for raw in [
            &b"GET  / HTTP/1.1\r\nHost: h\r\n\r\n"[..],
            b"GET /  HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET / HTTP/1.1 \r\n\r\n",
            b"GET /\r\n\r\n",
            b"GET\r\n\r\n",
        ] {
            assert_eq!(
                head_err(raw).status(),
                400,
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }

    #[test]
    fn origin_form_target_is_kept_as_sent() {
        assert_eq!(
            head(b"GET //double/%20x?q=%2F HTTP/1.1\r\nHost: h\r\n\r\n")
                .0
                .target,
            "//double/%20x?q=%2F"
        );
    }

    #[test]
    fn absolute_form_target_is_reduced_to_path_and_query() {
        let cases: [(&[u8], &str, &str); 5] = [
            (
                b"GET http://example.com/a/b?c=d HTTP/1.1\r\nHost: h\r\n\r\n",
                "/a/b?c=d",
                "example.com",
            ),
            (
                b"GET HTTPS://example.com:8443/x HTTP/1.1\r\nHost: h\r\n\r\n",
                "/x",
                "example.com:8443",
            ),
            (
                b"GET http://example.com HTTP/1.1\r\nHost: h\r\n\r\n",
                "/",
                "example.com",
            ),
            (
                b"GET http://example.com?q=1 HTTP/1.1\r\nHost: h\r\n\r\n",
                "/?q=1",
                "example.com",
            ),
            (
                b"GET http://user@host/ HTTP/1.1\r\nHost: h\r\n\r\n",
                "/",
                "host",
            ),
        ];
        for (raw, target, host) in cases {
            let (req, _) = head(raw);
            // The URI's authority (without userinfo) is the host, not the Host field.
            assert_eq!(
                (req.target.as_str(), req.header("host")),
                (target, Some(host))
            );
            assert_eq!(req.headers.iter().filter(|(n, _)| n == "host").count(), 1);
        }
        // HTTP/1.0 may leave Host out; the URI still names the host.
        let (req, _) = head(b"GET http://[::1]:80/p HTTP/1.0\r\n\r\n");
        assert_eq!(req.header("host"), Some("[::1]:80"));
        assert_bad_request(
            b"GET http:///path HTTP/1.1\r\nHost: h\r\n\r\n",
            "absolute-form target without a host",
        );
        assert_bad_request(
            b"GET http://user@/path HTTP/1.1\r\nHost: h\r\n\r\n",
            "absolute-form target without a host",
        );
    }

    #[test]
    fn host_is_required_once_on_http11_and_must_be_a_host() {
        const MISSING: &str = "an HTTP/1.1 request needs a Host header";
        const TWICE: &str = "more than one Host header";
        const INVALID: &str = "Host is not a host name and port";
        assert_bad_request(b"GET / HTTP/1.1\r\n\r\n", MISSING);
        assert_bad_request(b"GET http://a/ HTTP/1.1\r\n\r\n", MISSING);
        assert_bad_request(b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", TWICE);
        assert_bad_request(b"GET / HTTP/1.1\r\nHost: a\r\nHOST: a\r\n\r\n", TWICE);
        assert_bad_request(b"GET / HTTP/1.0\r\nHost: a\r\nHost: a\r\n\r\n", TWICE);
        for bad in ["a b", "a/b", "u@a", "a\\b", "\"a\"", "a?b", "a#b", "\u{e9}"] {
            let raw = format!("GET / HTTP/1.1\r\nHost: {bad}\r\n\r\n");
            assert_bad_request(raw.as_bytes(), INVALID);
        }
        for good in [
            "",
            "a",
            "example.com:8080",
            "127.0.0.1",
            "[::1]:3000",
            "x_y-z.~%41",
        ] {
            let raw = format!("GET / HTTP/1.1\r\nHost: {good}\r\n\r\n");
            assert_eq!(head(raw.as_bytes()).0.header("host"), Some(good));
        }
        // HTTP/1.0 predates Host.
        assert_eq!(head(b"GET / HTTP/1.0\r\n\r\n").0.header("host"), None);
    }

    #[test]
    fn a_fragment_in_the_target_is_rejected() {
        const MSG: &str = "a request target cannot hold a fragment (#)";
        assert_bad_request(b"GET /f/x/p?q=1#frag HTTP/1.1\r\nHost: h\r\n\r\n", MSG);
        assert_bad_request(b"GET /f/x/p#frag?q=1 HTTP/1.1\r\nHost: h\r\n\r\n", MSG);
        assert_bad_request(b"GET http://host/p#f HTTP/1.1\r\nHost: h\r\n\r\n", MSG);
    }

    #[test]
    fn asterisk_target_is_only_for_options() {
        let (req, _) = head(b"OPTIONS * HTTP/1.1\r\nHost: h\r\n\r\n");
        assert_eq!(
            (req.target.as_str(), req.path(), req.query()),
            ("*", "*", "")
        );
        assert_bad_request(
            b"GET * HTTP/1.1\r\nHost: h\r\n\r\n",
            "target \"*\" is only allowed with OPTIONS",
        );
    }

    #[test]
    fn other_target_forms_are_rejected() {
        const MSG: &str = "target must be an absolute path, an absolute http(s) URI, or \"*\"";
        assert_bad_request(b"CONNECT example.com:443 HTTP/1.1\r\nHost: h\r\n\r\n", MSG);
        assert_bad_request(b"GET relative/path HTTP/1.1\r\nHost: h\r\n\r\n", MSG);
        assert_bad_request(b"GET ftp://host/x HTTP/1.1\r\nHost: h\r\n\r\n", MSG);
        assert_bad_request(b"GET ** HTTP/1.1\r\nHost: h\r\n\r\n", MSG);
    }

    #[test]
    fn control_characters_and_spaces_in_target_are_rejected() {
        for raw in [
            &b"GET /a\x01b HTTP/1.1\r\nHost: h\r\n\r\n"[..],
            b"GET /a\x7fb HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET /a\tb HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET /a\x00 HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET /a b HTTP/1.1\r\nHost: h\r\n\r\n",
            b"GET /a\rb HTTP/1.1\r\nHost: h\r\n\r\n",
        ] {
            assert_eq!(
                head_err(raw).status(),
                400,
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
        assert_bad_request(
            b"GET /a\x01b HTTP/1.1\r\nHost: h\r\n\r\n",
            "control character in target",
        );
        assert_bad_request(
            b"GET /a\xffb HTTP/1.1\r\nHost: h\r\n\r\n",
            "target is not valid UTF-8",
        );
        // UTF-8 paths pass through.
        assert_eq!(
            head("GET /caf\u{e9} HTTP/1.1\r\nHost: h\r\n\r\n".as_bytes())
                .0
                .target,
            "/caf\u{e9}"
        );
    }

    #[test]
    fn http2_preface_is_a_bad_request() {
        let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
        assert_bad_request(
            preface,
            "HTTP/2 connection preface; this server speaks HTTP/1.1",
        );
        // Partial preface: waits for the request line to end before judging it.
        assert_eq!(parse_head(&preface[..12], &limits()), Ok(None));
        assert_eq!(head_err(&preface[..16]).status(), 400);
    }

    #[test]
    fn well_formed_unserved_versions_get_505() {
        for version in [
            "HTTP/1.2", "HTTP/1.9", "HTTP/2.0", "HTTP/3.0", "HTTP/0.9", "HTTP/9.9",
        ] {
            let raw = format!("GET / {version}\r\nHost: a\r\n\r\n");
            assert_eq!(
                head_err(raw.as_bytes()),
                Error::VersionNotSupported,
                "{version}"
            );
            // Also when only the request line has arrived.
            let line = format!("GET / {version}\r\n");
            assert_eq!(
                head_err(line.as_bytes()),
                Error::VersionNotSupported,
                "{version}"
            );
            assert_eq!(
                parse_head(&line.as_bytes()[..line.len() - 2], &limits()),
                Ok(None)
            );
        }
        assert_eq!(
            head_err(b"PRI / HTTP/2.0\r\n\r\n"),
            Error::VersionNotSupported
        );
    }

    #[test]
    fn malformed_versions_get_400() {
        for version in [
            "HTTP/1.10",
            "HTTP/1",
            "http/1.1",
            "HTTP/x.y",
            "HTTP/11",
            "HTTP/1.1x",
            "HTTPS/1.1",
            "XYZ",
        ] {
            let raw = format!("GET / {version}\r\n\r\n");
            assert_eq!(head_err(raw.as_bytes()).status(), 400, "{version}");
        }
    }

    #[test]
    fn head_of_exactly_the_limit_is_accepted_and_one_more_byte_is_431() {
        let small = Limits {
            head_bytes_max: 40,
            ..limits()
        };
        let mut raw = b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad: ".to_vec();
        raw.resize(40 - 4, b'p');
        raw.extend_from_slice(b"\r\n\r\n");
        assert_eq!(raw.len(), 40);
        assert_eq!(parse_head(&raw, &small).unwrap().unwrap().1, 40);
        raw.insert(25, b'p');
        assert_eq!(head_err_with(&raw, &small), Error::HeadTooLarge);
    }

    #[test]
    fn incomplete_head_at_the_limit_is_431_and_below_it_needs_more() {
        let small = Limits {
            head_bytes_max: 64,
            ..limits()
        };
        let mut raw = b"GET / HTTP/1.1\r\nHost: h\r\nX-Pad: ".to_vec();
        raw.resize(63, b'p');
        assert_eq!(parse_head(&raw, &small), Ok(None));
        raw.push(b'p');
        assert_eq!(head_err_with(&raw, &small), Error::HeadTooLarge);
        // Far more bytes than the limit: still judged by the first head_bytes_max only.
        raw.resize(1 << 20, b'p');
        assert_eq!(head_err_with(&raw, &small), Error::HeadTooLarge);
        // A request line that never ends (here with an unserved version) is also bounded.
        let mut line = b"GET / HTTP/2.0".to_vec();
        line.resize(64, b'x');
        assert_eq!(head_err_with(&line, &small), Error::HeadTooLarge);
    }

    /// A head with `count` header fields: `Host` and `count - 1` others (none: HTTP/1.0).
    fn with_headers(count: usize) -> Vec<u8> {
        if count == 0 {
            return b"GET / HTTP/1.0\r\n\r\n".to_vec();
        }
        let mut raw = b"GET / HTTP/1.1\r\nHost: h\r\n".to_vec();
        for i in 1..count {
            raw.extend_from_slice(format!("X-H{i}: v\r\n").as_bytes());
        }
        raw.extend_from_slice(b"\r\n");
        raw
    }

    #[test]
    fn header_count_above_the_limit_is_431() {
        assert_eq!(head(&with_headers(100)).0.headers.len(), 100);
        assert_eq!(head_err(&with_headers(101)), Error::TooManyHeaders);
        let none = Limits {
            headers_max: 0,
            ..limits()
        };
        assert!(parse_head(&with_headers(0), &none).unwrap().is_some());
        assert_eq!(
            head_err_with(&with_headers(1), &none),
            Error::TooManyHeaders
        );
    }

    #[test]
    fn header_limit_above_the_stack_slots_uses_the_heap() {
        let many = Limits {
            headers_max: 300,
            ..limits()
        };
        assert_eq!(
            parse_head(&with_headers(300), &many)
                .unwrap()
                .unwrap()
                .0
                .headers
                .len(),
            300
        );
        assert_eq!(
            head_err_with(&with_headers(301), &many),
            Error::TooManyHeaders
        );
    }

    // ---- body framing in the head ----

    #[test]
    fn request_without_framing_headers_has_no_body_even_for_post() {
        assert_eq!(
            head(b"POST /fn HTTP/1.1\r\nHost: a\r\n\r\n").0.body,
            BodyFraming::None
        );
        assert_eq!(head(b"POST /fn HTTP/1.0\r\n\r\n").0.body, BodyFraming::None);
    }

    #[test]
    fn content_length_sets_length_framing() {
        assert_eq!(
            head(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 42\r\n\r\n")
                .0
                .body,
            BodyFraming::Length(42)
        );
        assert_eq!(
            head(b"POST / HTTP/1.1\r\nHost: h\r\ncontent-length:0\r\n\r\n")
                .0
                .body,
            BodyFraming::Length(0)
        );
        assert_eq!(
            head(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 007\r\n\r\n")
                .0
                .body,
            BodyFraming::Length(7)
        );
        let max = format!(
            "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n",
            u64::MAX
        );
        assert_eq!(head(max.as_bytes()).0.body, BodyFraming::Length(u64::MAX));
    }

    #[test]
    fn identical_content_lengths_are_accepted() {
        let (req, _) =
            head(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(req.body, BodyFraming::Length(5));
        let (req, _) = head(b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5 , 5,5\r\n\r\n");
        assert_eq!(req.body, BodyFraming::Length(5));
    }

    #[test]
    fn differing_content_lengths_are_rejected() {
        const MSG: &str = "conflicting Content-Length values";
        assert_bad_request(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            MSG,
        );
        assert_bad_request(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 6\r\n\r\n",
            MSG,
        );
        assert_bad_request(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 5, 6\r\n\r\n",
            MSG,
        );
    }

    #[test]
    fn malformed_content_length_is_rejected() {
        for value in [
            "abc",
            "-1",
            "+1",
            "",
            "1 2",
            "0x10",
            "1.0",
            "5,",
            ",5",
            "١",
            "18446744073709551616",
        ] {
            let raw = format!("POST / HTTP/1.1\r\nHost: h\r\nContent-Length: {value}\r\n\r\n");
            assert_eq!(head_err(raw.as_bytes()).status(), 400, "{value:?}");
        }
        assert_bad_request(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 99999999999999999999\r\n\r\n",
            "Content-Length overflows 64 bits",
        );
        assert_bad_request(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: -1\r\n\r\n",
            "Content-Length is not a decimal number",
        );
        assert_bad_request(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length:\r\n\r\n",
            "empty Content-Length",
        );
    }

    #[test]
    fn content_length_with_transfer_encoding_is_rejected() {
        const MSG: &str = "both Content-Length and Transfer-Encoding";
        assert_bad_request(
            b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            MSG,
        );
        assert_bad_request(
            b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            MSG,
        );
    }

    #[test]
    fn transfer_encoding_chunked_is_case_insensitive_with_ows() {
        for value in ["chunked", "Chunked", "CHUNKED", "  chunked\t"] {
            let raw = format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:{value}\r\n\r\n");
            assert_eq!(
                head(raw.as_bytes()).0.body,
                BodyFraming::Chunked,
                "{value:?}"
            );
        }
    }

    #[test]
    fn other_transfer_encodings_are_501() {
        for value in [
            "gzip",
            "gzip, chunked",
            "chunked, gzip",
            "identity",
            "chunked, chunked",
            "chunk",
            "",
        ] {
            let raw = format!("POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: {value}\r\n\r\n");
            assert_eq!(
                head_err(raw.as_bytes()),
                Error::UnsupportedTransferEncoding,
                "{value:?}"
            );
        }
        assert_eq!(
            head_err(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Error::UnsupportedTransferEncoding
        );
    }

    #[test]
    fn transfer_encoding_on_http10_is_rejected() {
        assert_bad_request(
            b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "Transfer-Encoding in an HTTP/1.0 request",
        );
    }

    #[test]
    fn errors_map_to_statuses_and_messages() {
        let cases = [
            (
                Error::BadRequest("header line without colon"),
                400,
                "header line without colon",
            ),
            (
                Error::VersionNotSupported,
                505,
                "HTTP version not supported; send HTTP/1.1",
            ),
            (
                Error::HeadTooLarge,
                431,
                "request head or trailer section exceeds the size limit",
            ),
            (Error::TooManyHeaders, 431, "too many header fields"),
            (
                Error::BodyTooLarge,
                413,
                "request body exceeds the size limit",
            ),
            (
                Error::UnsupportedTransferEncoding,
                501,
                "unsupported Transfer-Encoding; only \"chunked\" is accepted",
            ),
        ];
        for (err, status, message) in cases {
            assert_eq!((err.status(), err.message()), (status, message));
            assert_eq!(err.to_string(), format!("{status} {message}"));
        }
    }

    // ---- BodyDecoder ----

    #[test]
    fn no_body_and_empty_length_are_done_without_consuming() {
        for framing in [BodyFraming::None, BodyFraming::Length(0)] {
            let mut decoder = BodyDecoder::new(framing, &limits()).unwrap();
            assert!(decoder.is_done());
            let mut out = Vec::new();
            assert_eq!(
                decoder.feed(b"GET / HTTP/1.1\r\nHost: h\r\n", &mut out),
                Ok((0, true))
            );
            assert!(out.is_empty());
        }
    }

    #[test]
    fn length_body_is_read_across_feeds_and_stops_at_its_end() {
        let mut decoder = BodyDecoder::new(BodyFraming::Length(5), &limits()).unwrap();
        let mut out = Vec::new();
        assert_eq!(decoder.feed(b"", &mut out), Ok((0, false)));
        assert_eq!(decoder.feed(b"he", &mut out), Ok((2, false)));
        assert_eq!(decoder.feed(b"lloGET", &mut out), Ok((3, true)));
        assert_eq!(out, b"hello");
        assert_eq!(decoder.feed(b"more", &mut out), Ok((0, true)));
        assert_eq!(out, b"hello");
    }

    #[test]
    fn content_length_above_body_limit_is_413_before_reading() {
        let small = Limits {
            body_bytes_max: 10,
            ..limits()
        };
        assert!(BodyDecoder::new(BodyFraming::Length(10), &small).is_ok());
        assert_eq!(
            BodyDecoder::new(BodyFraming::Length(11), &small).unwrap_err(),
            Error::BodyTooLarge
        );
        assert_eq!(
            BodyDecoder::new(BodyFraming::Length(u64::MAX), &limits()).unwrap_err(),
            Error::BodyTooLarge
        );
    }

    #[test]
    fn chunked_body_is_decoded_and_bytes_after_it_are_left() {
        let input =
            b"4\r\nWiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\n\r\nGET / HTTP/1.1\r\nHost: h\r\n";
        let (body, consumed) = decode(BodyFraming::Chunked, input).unwrap();
        assert_eq!(body, b"Wikipedia in\r\n\r\nchunks.");
        assert_eq!(&input[consumed..], b"GET / HTTP/1.1\r\nHost: h\r\n");
    }

    #[test]
    fn chunk_sizes_are_hex_of_either_case_with_leading_zeros() {
        let mut input = b"0000000000000010\r\n".to_vec();
        input.extend_from_slice(&[b'x'; 16]);
        input.extend_from_slice(b"\r\na\r\n0123456789\r\nA\r\n0123456789\r\n00\r\n\r\n");
        let (body, _) = decode(BodyFraming::Chunked, &input).unwrap();
        assert_eq!(body.len(), 36);
    }

    #[test]
    fn chunk_extensions_are_accepted_and_ignored() {
        let input = b"3;name=value\r\nabc\r\n\
            2 ; a ; b = \"quoted; \\\"still\\\" quoted\" ;c=tok\r\nde\r\n\
            0;last\r\n\r\n";
        assert_eq!(decode(BodyFraming::Chunked, input).unwrap().0, b"abcde");
    }

    #[test]
    fn malformed_chunk_extensions_are_rejected() {
        for input in [
            &b"3;\r\nabc\r\n0\r\n\r\n"[..],
            b"3;=v\r\nabc\r\n0\r\n\r\n",
            b"3;a=\r\nabc\r\n0\r\n\r\n",
            b"3;a=\"open\r\nabc\r\n0\r\n\r\n",
            b"3;a=b c\r\nabc\r\n0\r\n\r\n",
            b"3;a=\"x\"y\r\nabc\r\n0\r\n\r\n",
            b"3;a\x00\r\nabc\r\n0\r\n\r\n",
        ] {
            assert_eq!(
                chunked_err(input),
                Error::BadRequest("invalid chunk extension"),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(
            chunked_err(b"3 \r\nabc\r\n0\r\n\r\n"),
            Error::BadRequest("invalid chunk size line")
        );
    }

    #[test]
    fn chunk_extensions_beyond_the_head_limit_are_413() {
        let small = Limits {
            head_bytes_max: 16,
            ..limits()
        };
        let mut input = b"1;".to_vec();
        input.extend_from_slice(&[b'e'; 16]); // ";" + 16 bytes: one over
        input.extend_from_slice(b"\r\nx\r\n0\r\n\r\n");
        assert_eq!(chunked_err_with(&input, &small), Error::BodyTooLarge);
        let fits = b"1;eeeeeeeeeeeeeee\r\nx\r\n0\r\n\r\n"; // exactly 16
        let mut decoder = BodyDecoder::new(BodyFraming::Chunked, &small).unwrap();
        assert_eq!(decoder.feed(fits, &mut Vec::new()), Ok((fits.len(), true)));
    }

    #[test]
    fn trailers_are_accepted_and_ignored() {
        let input = b"3\r\nabc\r\n0\r\nX-Checksum: 1234\r\nX-Empty:\r\n\r\nNEXT";
        let (body, consumed) = decode(BodyFraming::Chunked, input).unwrap();
        assert_eq!(body, b"abc");
        assert_eq!(&input[consumed..], b"NEXT");
    }

    #[test]
    fn malformed_trailers_are_rejected() {
        assert_eq!(
            chunked_err(b"0\r\nNoColon\r\n\r\n"),
            Error::BadRequest("trailer line without colon")
        );
        assert_eq!(
            chunked_err(b"0\r\nA: b\r\n c\r\n\r\n"),
            Error::BadRequest("obsolete line folding in trailer")
        );
        assert_eq!(
            chunked_err(b"0\r\nA b: c\r\n\r\n"),
            Error::BadRequest("invalid character in trailer field")
        );
        assert_eq!(
            chunked_err(b"0\r\nA: b\x00\r\n\r\n"),
            Error::BadRequest("invalid character in trailer field")
        );
        assert_eq!(
            chunked_err(b"0\r\nA: b\rc\r\n\r\n"),
            Error::BadRequest("CR without LF in trailer section")
        );
        assert_eq!(
            chunked_err(b"0\r\n\rX"),
            Error::BadRequest("CR without LF in trailer section")
        );
    }

    #[test]
    fn trailer_section_counts_against_the_head_limit() {
        let small = Limits {
            head_bytes_max: 20,
            ..limits()
        };
        // Trailer section "X-T: 12345678901\r\n\r\n" is exactly 20 bytes.
        let fits = b"0\r\nX-T: 12345678901\r\n\r\n";
        let mut decoder = BodyDecoder::new(BodyFraming::Chunked, &small).unwrap();
        assert_eq!(decoder.feed(fits, &mut Vec::new()), Ok((fits.len(), true)));
        assert_eq!(
            chunked_err_with(b"0\r\nX-T: 123456789012\r\n\r\n", &small),
            Error::HeadTooLarge
        );
        // An endless trailer line is cut off at the limit, not buffered.
        let mut endless = b"0\r\nX-T: ".to_vec();
        endless.resize(10_000, b'a');
        assert_eq!(chunked_err_with(&endless, &small), Error::HeadTooLarge);
    }

    #[test]
    fn chunk_size_wider_than_64_bits_is_400() {
        assert_eq!(
            chunked_err(b"10000000000000000\r\n"),
            Error::BadRequest("chunk size overflows 64 bits")
        );
        assert_eq!(
            chunked_err(b"00000000000000000\r\n"),
            Error::BadRequest("chunk size overflows 64 bits")
        );
        // Sixteen digits fit; this one is merely over the body limit.
        assert_eq!(chunked_err(b"FFFFFFFFFFFFFFFF\r\n"), Error::BodyTooLarge);
    }

    #[test]
    fn chunked_total_above_body_limit_is_413_before_the_data_arrives() {
        let small = Limits {
            body_bytes_max: 10,
            ..limits()
        };
        let mut decoder = BodyDecoder::new(BodyFraming::Chunked, &small).unwrap();
        let mut out = Vec::new();
        assert_eq!(decoder.feed(b"6\r\nabcdef\r\n", &mut out), Ok((11, false)));
        assert_eq!(decoder.feed(b"5\r\n", &mut out), Err(Error::BodyTooLarge));
        let exactly = b"6\r\nabcdef\r\n4\r\nghij\r\n0\r\n\r\n";
        let mut decoder = BodyDecoder::new(BodyFraming::Chunked, &small).unwrap();
        assert_eq!(
            decoder.feed(exactly, &mut Vec::new()),
            Ok((exactly.len(), true))
        );
    }

    #[test]
    fn invalid_chunk_sizes_are_rejected() {
        assert_eq!(
            chunked_err(b"g\r\n"),
            Error::BadRequest("chunk size missing or not hexadecimal")
        );
        assert_eq!(
            chunked_err(b"\r\n"),
            Error::BadRequest("chunk size missing or not hexadecimal")
        );
        assert_eq!(
            chunked_err(b"-1\r\n"),
            Error::BadRequest("chunk size missing or not hexadecimal")
        );
        assert_eq!(
            chunked_err(b" 1\r\n"),
            Error::BadRequest("chunk size missing or not hexadecimal")
        );
        assert_eq!(
            chunked_err(b"1x\r\n"),
            Error::BadRequest("invalid chunk size line")
        );
        assert_eq!(
            chunked_err(b"1\rx"),
            Error::BadRequest("CR without LF in chunk header")
        );
    }

    #[test]
    fn missing_crlf_after_chunk_data_is_rejected() {
        assert_eq!(
            chunked_err(b"3\r\nabcd\r\n0\r\n\r\n"),
            Error::BadRequest("missing CRLF after chunk data")
        );
        assert_eq!(
            chunked_err(b"3\r\nabc\rX0\r\n\r\n"),
            Error::BadRequest("missing CRLF after chunk data")
        );
        assert_eq!(
            chunked_err(b"3\r\nabc0\r\n\r\n"),
            Error::BadRequest("missing CRLF after chunk data")
        );
    }

    #[test]
    fn bare_lf_in_chunked_framing_is_rejected() {
        const BARE_LF: Error = Error::BadRequest("bare LF in chunked body");
        assert_eq!(chunked_err(b"3\nabc\r\n0\r\n\r\n"), BARE_LF);
        assert_eq!(chunked_err(b"3;ext\nabc\r\n0\r\n\r\n"), BARE_LF);
        assert_eq!(chunked_err(b"3\r\nabc\n0\r\n\r\n"), BARE_LF);
        assert_eq!(chunked_err(b"0\r\nA: b\n\r\n"), BARE_LF);
        assert_eq!(chunked_err(b"0\r\nA\n\r\n"), BARE_LF);
        assert_eq!(chunked_err(b"0\r\n\n"), BARE_LF);
    }

    #[test]
    fn decoder_keeps_failing_after_an_error() {
        let mut decoder = BodyDecoder::new(BodyFraming::Chunked, &limits()).unwrap();
        let mut out = Vec::new();
        let err = decoder.feed(b"zz", &mut out).unwrap_err();
        assert_eq!(decoder.feed(b"0\r\n\r\n", &mut out), Err(err));
        assert!(!decoder.is_done());
    }

    #[test]
    fn chunked_body_decodes_the_same_fed_one_byte_at_a_time() {
        let input = b"4;x=\"y\"\r\nWiki\r\n5\r\npedia\r\n0\r\nT: v\r\n\r\nrest";
        let mut decoder = BodyDecoder::new(BodyFraming::Chunked, &limits()).unwrap();
        let mut out = Vec::new();
        let mut at = 0;
        loop {
            let (consumed, done) = decoder.feed(&input[at..at + 1], &mut out).unwrap();
            at += consumed;
            if done {
                break;
            }
            assert_eq!(consumed, 1, "an unfinished body consumes all it is given");
        }
        assert_eq!(out, b"Wikipedia");
        assert_eq!(&input[at..], b"rest");
    }

    // ---- property tests ----

    /// What one connection's read loop would produce from `segments`: each completed request
    /// with its body, then the error that ended the connection, if any.
    #[derive(Debug, PartialEq)]
    struct Outcome {
        exchanges: Vec<(Request, Vec<u8>)>,
        error: Option<Error>,
        /// Bytes left unparsed at the end (an incomplete request).
        leftover: usize,
    }

    /// Simulates a connection: append each segment to the read buffer, then parse heads and
    /// bodies out of it for as long as it makes progress.
    fn read_loop<'a>(segments: impl IntoIterator<Item = &'a [u8]>, limits: &Limits) -> Outcome {
        let mut buf = Vec::new();
        let mut exchanges = Vec::new();
        let mut in_body: Option<(Request, BodyDecoder, Vec<u8>)> = None;
        for segment in segments {
            buf.extend_from_slice(segment);
            loop {
                let step = match in_body.take() {
                    None => match parse_head(&buf, limits) {
                        Ok(None) => break,
                        Ok(Some((req, n))) => {
                            assert!(n <= buf.len() && n > 0);
                            buf.drain(..n);
                            BodyDecoder::new(req.body, limits).map(|d| {
                                in_body = Some((req, d, Vec::new()));
                            })
                        }
                        Err(err) => Err(err),
                    },
                    Some((req, mut decoder, mut body)) => match decoder.feed(&buf, &mut body) {
                        Ok((consumed, done)) => {
                            assert!(consumed <= buf.len());
                            assert!(done || consumed == buf.len());
                            buf.drain(..consumed);
                            if done {
                                exchanges.push((req, body));
                                Ok(())
                            } else {
                                in_body = Some((req, decoder, body));
                                break;
                            }
                        }
                        Err(err) => Err(err),
                    },
                };
                if let Err(err) = step {
                    return Outcome {
                        exchanges,
                        error: Some(err),
                        leftover: buf.len(),
                    };
                }
            }
        }
        Outcome {
            exchanges,
            error: None,
            leftover: buf.len() + usize::from(in_body.is_some()),
        }
    }

    #[derive(Clone, Debug)]
    enum BodySpec {
        None,
        Length(Vec<u8>),
        Chunked {
            chunks: Vec<Vec<u8>>,
            extensions: bool,
            trailers: Vec<(String, String)>,
        },
    }

    #[derive(Clone, Debug)]
    struct RequestSpec {
        method: &'static str,
        target: String,
        http10: bool,
        connection: Option<&'static str>,
        /// (name as sent, value, whitespace before, whitespace after)
        headers: Vec<(String, String, &'static str, &'static str)>,
        body: BodySpec,
    }

    impl RequestSpec {
        fn wire(&self) -> Vec<u8> {
            let mut w = Vec::new();
            let version = if self.http10 { "HTTP/1.0" } else { "HTTP/1.1" };
            w.extend_from_slice(
                format!("{} {} {version}\r\nHost: h\r\n", self.method, self.target).as_bytes(),
            );
            for (name, value, before, after) in &self.headers {
                w.extend_from_slice(format!("{name}:{before}{value}{after}\r\n").as_bytes());
            }
            if let Some(connection) = self.connection {
                w.extend_from_slice(format!("Connection: {connection}\r\n").as_bytes());
            }
            match &self.body {
                BodySpec::None => w.extend_from_slice(b"\r\n"),
                BodySpec::Length(body) => {
                    w.extend_from_slice(
                        format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes(),
                    );
                    w.extend_from_slice(body);
                }
                BodySpec::Chunked {
                    chunks,
                    extensions,
                    trailers,
                } => {
                    w.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                    for chunk in chunks.iter().filter(|c| !c.is_empty()) {
                        let ext = if *extensions { ";n=\"v;\\\"\" ; k" } else { "" };
                        w.extend_from_slice(format!("{:X}{ext}\r\n", chunk.len()).as_bytes());
                        w.extend_from_slice(chunk);
                        w.extend_from_slice(b"\r\n");
                    }
                    w.extend_from_slice(b"0\r\n");
                    for (name, value) in trailers {
                        w.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
                    }
                    w.extend_from_slice(b"\r\n");
                }
            }
            w
        }

        fn expected_body(&self) -> Vec<u8> {
            match &self.body {
                BodySpec::None => Vec::new(),
                BodySpec::Length(body) => body.clone(),
                BodySpec::Chunked { chunks, .. } => chunks.concat(),
            }
        }

        /// Checks `req` against what was sent.
        fn check(&self, req: &Request) {
            assert_eq!(req.method, self.method);
            assert_eq!(req.target, self.target);
            assert_eq!(
                req.version,
                if self.http10 {
                    Version::Http10
                } else {
                    Version::Http11
                }
            );
            let mut headers: Vec<(String, String)> = [("host".to_owned(), "h".to_owned())]
                .into_iter()
                .chain(
                    self.headers
                        .iter()
                        .map(|(name, value, _, _)| (name.to_ascii_lowercase(), value.clone())),
                )
                .collect();
            if let Some(connection) = self.connection {
                headers.push(("connection".into(), connection.into()));
            }
            let framing = match &self.body {
                BodySpec::None => BodyFraming::None,
                BodySpec::Length(body) => {
                    headers.push(("content-length".into(), body.len().to_string()));
                    BodyFraming::Length(body.len() as u64)
                }
                BodySpec::Chunked { .. } => {
                    headers.push(("transfer-encoding".into(), "chunked".into()));
                    BodyFraming::Chunked
                }
            };
            assert_eq!(req.headers, headers);
            assert_eq!(req.body, framing);
            let keep_alive = match (self.http10, self.connection) {
                (_, Some("close")) => false,
                (true, Some("keep-alive")) => true,
                (http10, _) => !http10,
            };
            assert_eq!(req.keep_alive, keep_alive);
        }
    }

    fn body_bytes() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(any::<u8>(), 0..40)
    }

    fn request_spec() -> impl Strategy<Value = RequestSpec> {
        let header = (
            "X-[A-Za-z0-9-]{1,10}",
            "[!-~]([ -~]{0,15}[!-~])?",
            prop::sample::select(vec!["", " ", "  ", "\t", " \t"]),
            prop::sample::select(vec!["", " ", "\t "]),
        );
        let trailer = ("T-[a-z]{1,6}", "[!-~]{0,10}");
        let body = prop_oneof![
            Just(BodySpec::None),
            body_bytes().prop_map(BodySpec::Length),
            (
                proptest::collection::vec(body_bytes(), 0..4),
                any::<bool>(),
                proptest::collection::vec(trailer, 0..3)
            )
                .prop_map(|(chunks, extensions, trailers)| BodySpec::Chunked {
                    chunks,
                    extensions,
                    trailers
                }),
        ];
        (
            prop::sample::select(vec!["GET", "POST", "PUT", "DELETE", "PATCH"]),
            "/[a-z0-9/._-]{0,12}(\\?[a-z0-9=&%]{0,12})?",
            any::<bool>(),
            prop::sample::select(vec![None, Some("close"), Some("keep-alive")]),
            proptest::collection::vec(header, 0..5),
            body,
        )
            .prop_map(|(method, target, http10, connection, headers, body)| {
                // HTTP/1.0 cannot carry chunked bodies; send those as HTTP/1.1.
                let http10 = http10 && !matches!(body, BodySpec::Chunked { .. });
                RequestSpec {
                    method,
                    target,
                    http10,
                    connection,
                    headers,
                    body,
                }
            })
    }

    #[test]
    fn a_chunk_not_followed_by_crlf_is_refused() {
        // Found by the property test: one data byte, then NUL where CRLF belongs.
        let mut decoder = BodyDecoder::new(BodyFraming::Chunked, &limits()).unwrap();
        let mut out = Vec::new();
        assert!(decoder.feed(&[b'1', b'\r', b'\n', 0, 0], &mut out).is_err());
    }

    proptest! {
        #[test]
        fn split_stream_parses_the_same_as_whole_stream(
            specs in proptest::collection::vec(request_spec(), 1..5),
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..12),
        ) {
            let stream: Vec<u8> = specs.iter().flat_map(|s| s.wire()).collect();
            let whole = read_loop([&stream[..]], &limits());
            prop_assert_eq!(&whole.error, &None);
            prop_assert_eq!(whole.leftover, 0);
            prop_assert_eq!(whole.exchanges.len(), specs.len());
            for (spec, (req, body)) in specs.iter().zip(&whole.exchanges) {
                spec.check(req);
                prop_assert_eq!(body, &spec.expected_body());
            }

            let mut cuts: Vec<usize> = cuts.iter().map(|i| i.index(stream.len() + 1)).collect();
            cuts.push(0);
            cuts.push(stream.len());
            cuts.sort_unstable();
            let segments = cuts.windows(2).map(|w| &stream[w[0]..w[1]]);
            let split = read_loop(segments, &limits());
            prop_assert_eq!(split, whole);
        }

        #[test]
        fn byte_at_a_time_stream_parses_the_same_as_whole_stream(
            specs in proptest::collection::vec(request_spec(), 1..3),
        ) {
            let stream: Vec<u8> = specs.iter().flat_map(|s| s.wire()).collect();
            let whole = read_loop([&stream[..]], &limits());
            let bytewise = read_loop(stream.chunks(1), &limits());
            prop_assert_eq!(bytewise, whole);
        }

        #[test]
        fn parse_head_never_panics_on_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(Some((_, n))) = parse_head(&bytes, &limits()) {
                prop_assert!(n <= bytes.len());
            }
            let tiny = Limits { head_bytes_max: 24, headers_max: 2, body_bytes_max: 16 };
            let _ = read_loop(bytes.chunks(7), &tiny);
        }

        #[test]
        fn parse_head_never_panics_on_request_like_bytes(
            bytes in proptest::collection::vec(
                prop::sample::select(b"GET /HTP1.0\r\n:; \t\x00\x80aZ*?=\"\\chunked-lngtCotrasfe".to_vec()),
                0..200,
            ),
        ) {
            let _ = read_loop([&bytes[..]], &limits());
            let _ = read_loop(bytes.chunks(3), &Limits { head_bytes_max: 40, headers_max: 3, body_bytes_max: 8 });
        }

        #[test]
        fn body_decoder_never_panics_on_random_bytes(
            bytes in proptest::collection::vec(
                prop_oneof![any::<u8>(), prop::sample::select(b"0123456789abcdefABCDEF;=\"\\\r\n \t:".to_vec())],
                0..300,
            ),
            length in any::<u64>(),
        ) {
            for framing in [BodyFraming::Chunked, BodyFraming::Length(length % 64)] {
                let mut decoder = BodyDecoder::new(framing, &limits()).unwrap();
                let mut out = Vec::new();
                let mut at = 0;
                let mut failed = false;
                for piece in bytes.chunks(5) {
                    match decoder.feed(piece, &mut out) {
                        Ok((consumed, done)) => {
                            prop_assert!(consumed <= piece.len());
                            prop_assert!(done || consumed == piece.len());
                            at += consumed;
                            if done { break; }
                        }
                        // The request is refused; what was decoded before the
                        // bad byte is thrown away with it.
                        Err(_) => {
                            failed = true;
                            break;
                        }
                    }
                }
                prop_assert!(failed || out.len() <= at);
            }
        }

        #[test]
        fn mutated_valid_requests_never_panic_and_split_like_whole(
            specs in proptest::collection::vec(request_spec(), 1..3),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 1..6),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut stream: Vec<u8> = specs.iter().flat_map(|s| s.wire()).collect();
            for (at, byte, kind) in edits {
                let i = at.index(stream.len() + 1);
                match kind {
                    0 if i < stream.len() => stream[i] = byte,
                    1 if i < stream.len() => { stream.remove(i); }
                    _ => stream.insert(i, byte),
                }
            }
            let whole = read_loop([&stream[..]], &limits());
            let cut = cut.index(stream.len() + 1);
            let split = read_loop([&stream[..cut], &stream[cut..]], &limits());
            // Same requests and the same verdict (error messages may name a different first
            // fault when the bytes arrive in a different order of completeness).
            prop_assert_eq!(&split.exchanges, &whole.exchanges);
            prop_assert_eq!(split.error.map(|e| e.status()), whole.error.map(|e| e.status()));
        }
    }
}
