//! `multipart/form-data` (RFC 7578) over a body that is already fully buffered.
//!
//! Deploy bodies are small enough to hold in memory and are only parsed once, so this is a plain
//! function from bytes to borrowed parts rather than a streaming state machine. Part data is
//! never inspected: zips contain CRLF and "--" freely, and only the exact delimiter line
//! (CRLF, "--", boundary) ends a part.

use std::fmt;

/// Most parts accepted in one body.
pub const PARTS_MAX: usize = 64;
/// Largest header block of one part (its lines up to and including the blank line).
pub const PART_HEADER_BYTES_MAX: usize = 8 * 1024;
/// Longest boundary RFC 2046 allows.
const BOUNDARY_BYTES_MAX: usize = 70;

/// One part of a form: a field or an uploaded file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part<'a> {
    /// The `name` parameter of `Content-Disposition`.
    pub name: String,
    /// The `filename` parameter, present for file uploads.
    pub filename: Option<String>,
    /// The part's `Content-Type` header, if it had one.
    pub content_type: Option<String>,
    /// The part's bytes, borrowed from the body.
    pub data: &'a [u8],
}

/// Why a body is not well-formed multipart; the message says where.
#[derive(Debug)]
pub struct MultipartError(pub String);

impl fmt::Display for MultipartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MultipartError {}

/// The boundary of a `multipart/form-data; boundary=...` content type (quoted or not), or `None`
/// if the type is something else or the boundary is missing or invalid.
pub fn boundary(content_type: &str) -> Option<String> {
    let (media_type, params) = parse_header_value(content_type).ok()?;
    if !media_type.eq_ignore_ascii_case("multipart/form-data") {
        return None;
    }
    let (_, value) = params.into_iter().find(|(name, _)| name == "boundary")?;
    check_boundary(&value).ok()?;
    Some(value)
}

/// Splits `body` into its parts; at most [`PARTS_MAX`] parts, each header block at most
/// [`PART_HEADER_BYTES_MAX`] bytes. Text before the first boundary and after the last is ignored.
pub fn parse<'a>(body: &'a [u8], boundary: &str) -> Result<Vec<Part<'a>>, MultipartError> {
    check_boundary(boundary).map_err(MultipartError)?;
    let dash_boundary = format!("--{boundary}");
    let delimiter = format!("\r\n--{boundary}");

    // The first boundary may open the body or follow a preamble and a line break.
    let mut at = if body.starts_with(dash_boundary.as_bytes()) {
        dash_boundary.len()
    } else {
        let found = find(body, delimiter.as_bytes(), 0).ok_or_else(|| {
            MultipartError(format!("the body never contains the boundary '{boundary}'"))
        })?;
        found + delimiter.len()
    };

    let mut parts = Vec::new();
    loop {
        // After each boundary: "--" closes the body, otherwise optional padding and CRLF.
        if body[at..].starts_with(b"--") {
            return Ok(parts);
        }
        at = skip_boundary_line_end(body, at).ok_or_else(|| {
            MultipartError(format!(
                "boundary at byte {at} is not followed by a line break"
            ))
        })?;
        if parts.len() == PARTS_MAX {
            return Err(MultipartError(format!(
                "the body has more than {PARTS_MAX} parts"
            )));
        }
        let number = parts.len() + 1;

        let (headers, data_start) = split_headers(body, at, number)?;
        let data_end = find(body, delimiter.as_bytes(), data_start).ok_or_else(|| {
            MultipartError(format!(
                "part {number} is not closed by a boundary (the body may be truncated)"
            ))
        })?;
        parts.push(part_from_headers(
            headers,
            &body[data_start..data_end],
            number,
        )?);
        at = data_end + delimiter.len();
    }
}

/// RFC 2046: 1 to 70 characters, no line breaks (which also keeps the search below linear).
fn check_boundary(boundary: &str) -> Result<(), String> {
    if boundary.is_empty() || boundary.len() > BOUNDARY_BYTES_MAX {
        return Err(format!(
            "boundary must be 1 to {BOUNDARY_BYTES_MAX} bytes, got {}",
            boundary.len()
        ));
    }
    if boundary.bytes().any(|b| b.is_ascii_control()) {
        return Err("boundary contains a control character".into());
    }
    Ok(())
}

/// Position of the first `needle` (which starts with CR and holds no other CR) at or after `from`.
///
/// Candidates start at a CR; a comparison stops at the latest at the next CR in the haystack,
/// so every byte is looked at a bounded number of times.
fn find(haystack: &[u8], needle: &[u8], from: usize) -> Option<usize> {
    debug_assert!(needle.first() == Some(&b'\r'));
    let mut at = from;
    while at + needle.len() <= haystack.len() {
        let offset = haystack[at..haystack.len() - needle.len() + 1]
            .iter()
            .position(|&b| b == b'\r')?;
        at += offset;
        if haystack[at..].starts_with(needle) {
            return Some(at);
        }
        at += 1;
    }
    None
}

/// Skips the spaces or tabs allowed after a boundary, then the CRLF; the position after it.
fn skip_boundary_line_end(body: &[u8], mut at: usize) -> Option<usize> {
    while matches!(body.get(at), Some(b' ' | b'\t')) {
        at += 1;
    }
    body[at..].starts_with(b"\r\n").then_some(at + 2)
}

/// The header block starting at `at` and the position where the part's data starts.
fn split_headers(body: &[u8], at: usize, number: usize) -> Result<(&[u8], usize), MultipartError> {
    if body[at..].starts_with(b"\r\n") {
        return Ok((&body[at..at], at + 2));
    }
    let window_end = body.len().min(at + PART_HEADER_BYTES_MAX);
    match body[at..window_end]
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
    {
        Some(end) => Ok((&body[at..at + end], at + end + 4)),
        None if window_end - at == PART_HEADER_BYTES_MAX => Err(MultipartError(format!(
            "part {number} has a header block over {PART_HEADER_BYTES_MAX} bytes"
        ))),
        None => Err(MultipartError(format!(
            "part {number} ends inside its headers (the body may be truncated)"
        ))),
    }
}

fn part_from_headers<'a>(
    headers: &[u8],
    data: &'a [u8],
    number: usize,
) -> Result<Part<'a>, MultipartError> {
    let fail = |why: String| MultipartError(format!("part {number}: {why}"));
    let headers =
        std::str::from_utf8(headers).map_err(|_| fail("headers are not valid UTF-8".into()))?;
    let mut disposition = None;
    let mut content_type = None;
    for line in headers.split("\r\n").filter(|line| !line.is_empty()) {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| fail(format!("malformed header line '{line}'")))?;
        let value = value.trim();
        if name.trim().eq_ignore_ascii_case("content-disposition") {
            disposition.get_or_insert(value);
        } else if name.trim().eq_ignore_ascii_case("content-type") {
            content_type.get_or_insert(value);
        }
    }
    let disposition = disposition.ok_or_else(|| fail("no Content-Disposition header".into()))?;
    let (kind, params) = parse_header_value(disposition)
        .map_err(|why| fail(format!("Content-Disposition: {why}")))?;
    if !kind.eq_ignore_ascii_case("form-data") {
        return Err(fail(format!(
            "Content-Disposition is '{kind}', expected 'form-data'"
        )));
    }
    let param = |wanted: &str| {
        params
            .iter()
            .find(|(name, _)| name == wanted)
            .map(|(_, value)| value.clone())
    };
    let name = param("name").ok_or_else(|| fail("Content-Disposition has no name".into()))?;
    Ok(Part {
        name,
        filename: param("filename"),
        content_type: content_type.map(str::to_string),
        data,
    })
}

/// Splits `value; name=token; name="quoted \" string"` into the leading value and the
/// parameters (names lowercased, values unquoted and unescaped, in order).
fn parse_header_value(header: &str) -> Result<(String, Vec<(String, String)>), String> {
    let (head, mut rest) = match header.find(';') {
        Some(at) => (&header[..at], &header[at..]),
        None => (header, ""),
    };
    let mut params = Vec::new();
    loop {
        rest = rest.trim_start_matches(|c: char| c == ';' || c.is_ascii_whitespace());
        if rest.is_empty() {
            return Ok((head.trim().to_string(), params));
        }
        let name_end = rest.find(['=', ';']).unwrap_or(rest.len());
        let name = rest[..name_end].trim().to_ascii_lowercase();
        rest = &rest[name_end..];
        let Some(after_equals) = rest.strip_prefix('=') else {
            params.push((name, String::new()));
            continue;
        };
        let after_equals = after_equals.trim_start();
        let value;
        if let Some(quoted) = after_equals.strip_prefix('"') {
            let (unquoted, used) =
                unquote(quoted).ok_or_else(|| format!("unterminated quoted value for '{name}'"))?;
            value = unquoted;
            rest = &quoted[used..];
        } else {
            let end = after_equals.find(';').unwrap_or(after_equals.len());
            value = after_equals[..end].trim().to_string();
            rest = &after_equals[end..];
        }
        params.push((name, value));
    }
}

/// Reads a quoted string whose opening quote is already consumed; returns the unescaped text
/// and the number of bytes used, closing quote included.
fn unquote(quoted: &str) -> Option<(String, usize)> {
    let mut text = String::new();
    let mut chars = quoted.char_indices();
    while let Some((at, c)) = chars.next() {
        match c {
            '"' => return Some((text, at + 1)),
            '\\' => text.push(chars.next()?.1),
            c => text.push(c),
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CURL_BOUNDARY: &str = "------------------------d74496d66958873e";

    /// A body laid out the way `curl -F code=@fn.zip -F handler=app.handler` sends it.
    fn curl_body(zip: &[u8]) -> Vec<u8> {
        let mut body = Vec::new();
        body.extend_from_slice(format!("--{CURL_BOUNDARY}\r\n").as_bytes());
        body.extend_from_slice(
            b"Content-Disposition: form-data; name=\"code\"; filename=\"fn.zip\"\r\n",
        );
        body.extend_from_slice(b"Content-Type: application/zip\r\n\r\n");
        body.extend_from_slice(zip);
        body.extend_from_slice(format!("\r\n--{CURL_BOUNDARY}\r\n").as_bytes());
        body.extend_from_slice(b"Content-Disposition: form-data; name=\"handler\"\r\n\r\n");
        body.extend_from_slice(b"app.handler");
        body.extend_from_slice(format!("\r\n--{CURL_BOUNDARY}--\r\n").as_bytes());
        body
    }

    fn err(body: &[u8], boundary: &str) -> String {
        parse(body, boundary).expect_err("body should be refused").0
    }

    #[test]
    fn curl_upload_yields_file_and_field() {
        let zip = b"PK\x03\x04binary\r\n--not-the-boundary\r\n\r\n\x00\xff";
        let body = curl_body(zip);
        let parts = parse(&body, CURL_BOUNDARY).unwrap();
        assert_eq!(
            parts,
            vec![
                Part {
                    name: "code".into(),
                    filename: Some("fn.zip".into()),
                    content_type: Some("application/zip".into()),
                    data: zip,
                },
                Part {
                    name: "handler".into(),
                    filename: None,
                    content_type: None,
                    data: b"app.handler"
                },
            ]
        );
    }

    #[test]
    fn data_that_almost_contains_the_boundary_is_kept_whole() {
        let tricky = format!(
            "a\r\n--{}x\r\n--other\r\r\n-\r\n--{CURL_BOUNDARY}\r\r\n",
            &CURL_BOUNDARY[..20]
        );
        let tricky = tricky.replace(
            &format!("\r\n--{CURL_BOUNDARY}"),
            &format!("\n--{CURL_BOUNDARY}"),
        );
        let body = curl_body(tricky.as_bytes());
        assert_eq!(
            parse(&body, CURL_BOUNDARY).unwrap()[0].data,
            tricky.as_bytes()
        );
    }

    #[test]
    fn preamble_epilogue_and_padding_are_ignored() {
        let body = b"This is a preamble.\r\n--xyz  \t\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--xyz--\r\nepilogue --xyz\r\n";
        let parts = parse(body, "xyz").unwrap();
        assert_eq!(parts.len(), 1);
        assert_eq!((parts[0].name.as_str(), parts[0].data), ("a", &b"1"[..]));
    }

    #[test]
    fn empty_data_and_empty_header_blocks_are_allowed() {
        let body = b"--b\r\nContent-Disposition: form-data; name=\"e\"\r\n\r\n\r\n--b--";
        assert_eq!(parse(body, "b").unwrap()[0].data, b"");
        assert_eq!(parse(b"--b--\r\n", "b").unwrap(), vec![]);
        // A part with no headers at all has no name, which a form part needs.
        assert!(err(b"--b\r\n\r\ndata\r\n--b--", "b").contains("no Content-Disposition"));
    }

    #[test]
    fn quoted_names_are_unescaped() {
        let body = b"--b\r\ncontent-disposition: form-data; filename=\"C:\\\\dir\\\\a \\\"b\\\";c.zip\"; NAME=\"we\\\"ird; name\"\r\nCONTENT-TYPE: text/plain\r\n\r\nx\r\n--b--";
        let part = &parse(body, "b").unwrap()[0];
        assert_eq!(part.name, "we\"ird; name");
        assert_eq!(part.filename.as_deref(), Some("C:\\dir\\a \"b\";c.zip"));
        assert_eq!(part.content_type.as_deref(), Some("text/plain"));
    }

    #[test]
    fn truncated_bodies_are_refused() {
        let body = curl_body(b"zipdata");
        let closing = format!("\r\n--{CURL_BOUNDARY}--\r\n");
        let without_close = &body[..body.len() - closing.len()];
        assert!(err(without_close, CURL_BOUNDARY).contains("not closed"));
        assert!(
            err(&body[..30 + CURL_BOUNDARY.len()], CURL_BOUNDARY).contains("inside its headers")
        );
        assert!(err(&body[..CURL_BOUNDARY.len() + 2], CURL_BOUNDARY).contains("line break"));
        assert!(err(b"no boundary here", CURL_BOUNDARY).contains("never contains"));
        assert!(err(b"", "b").contains("never contains"));
    }

    #[test]
    fn boundary_followed_by_garbage_is_refused() {
        // The sender must pick a boundary that is not in the data, so this is an error, not data.
        assert!(err(b"--bx\r\n", "b").contains("line break"));
        let body = b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--bz\r\n--b--";
        assert!(err(body, "b").contains("line break"));
    }

    #[test]
    fn part_count_is_limited() {
        let body_with = |count: usize| {
            let mut body = String::new();
            for i in 0..count {
                body.push_str(&format!(
                    "--b\r\nContent-Disposition: form-data; name=\"f{i}\"\r\n\r\nv\r\n"
                ));
            }
            body.push_str("--b--\r\n");
            body
        };
        assert_eq!(
            parse(body_with(PARTS_MAX).as_bytes(), "b").unwrap().len(),
            PARTS_MAX
        );
        assert!(err(body_with(PARTS_MAX + 1).as_bytes(), "b").contains("more than 64 parts"));
    }

    #[test]
    fn header_block_size_is_limited() {
        let long = "x".repeat(PART_HEADER_BYTES_MAX);
        let body = format!(
            "--b\r\nContent-Disposition: form-data; name=\"a\"\r\nX-Pad: {long}\r\n\r\nv\r\n--b--"
        );
        assert!(err(body.as_bytes(), "b").contains("over 8192 bytes"));
        let fits = "x".repeat(PART_HEADER_BYTES_MAX - 100);
        let body = format!(
            "--b\r\nContent-Disposition: form-data; name=\"a\"\r\nX-Pad: {fits}\r\n\r\nv\r\n--b--"
        );
        assert_eq!(parse(body.as_bytes(), "b").unwrap()[0].data, b"v");
    }

    #[test]
    fn parts_need_a_form_data_disposition_with_a_name() {
        assert!(
            err(b"--b\r\nContent-Type: text/plain\r\n\r\nv\r\n--b--", "b")
                .contains("no Content-Disposition")
        );
        assert!(err(
            b"--b\r\nContent-Disposition: attachment; name=a\r\n\r\nv\r\n--b--",
            "b"
        )
        .contains("'attachment'"));
        assert!(err(
            b"--b\r\nContent-Disposition: form-data\r\n\r\nv\r\n--b--",
            "b"
        )
        .contains("no name"));
        assert!(err(
            b"--b\r\nContent-Disposition: form-data; name=\"a\r\n\r\nv\r\n--b--",
            "b"
        )
        .contains("unterminated"));
        assert!(err(b"--b\r\nno colon here\r\n\r\nv\r\n--b--", "b").contains("malformed header"));
    }

    #[test]
    fn invalid_boundaries_are_refused() {
        assert!(err(b"--\r\n", "").contains("1 to 70"));
        assert!(err(b"x", &"b".repeat(71)).contains("1 to 70"));
        assert!(err(b"x", "a\r\nb").contains("control"));
    }

    #[test]
    fn boundary_is_read_from_the_content_type() {
        assert_eq!(
            boundary("multipart/form-data; boundary=abc123").as_deref(),
            Some("abc123")
        );
        assert_eq!(
            boundary("Multipart/Form-Data;BOUNDARY=\"a b;c\"").as_deref(),
            Some("a b;c")
        );
        assert_eq!(
            boundary("multipart/form-data; charset=utf-8; boundary=\"q\\\"x\"").as_deref(),
            Some("q\"x")
        );
        assert_eq!(
            boundary(&format!("multipart/form-data; boundary={CURL_BOUNDARY}")).as_deref(),
            Some(CURL_BOUNDARY)
        );
        assert_eq!(boundary("multipart/form-data"), None);
        assert_eq!(boundary("multipart/form-data; boundary="), None);
        assert_eq!(
            boundary("multipart/form-data; boundary=\"unterminated"),
            None
        );
        assert_eq!(
            boundary(&format!("multipart/form-data; boundary={}", "b".repeat(71))),
            None
        );
        assert_eq!(boundary("multipart/mixed; boundary=abc"), None);
        assert_eq!(boundary("application/zip"), None);
    }

    proptest! {
        /// Any binary data that does not contain the delimiter comes back byte for byte, whatever
        /// the field names and however many parts there are.
        #[test]
        fn encoded_parts_round_trip(
            fields in prop::collection::vec(("[a-z\"\\\\ ;]{1,12}", prop::collection::vec(any::<u8>(), 0..300)), 0..6),
            boundary in "[A-Za-z0-9'()+_,./:=?-]{1,70}",
        ) {
            let delimiter = format!("\r\n--{boundary}");
            let mut body = b"preamble\r\n".to_vec();
            for (name, data) in &fields {
                prop_assume!(!data.windows(delimiter.len()).any(|w| w == delimiter.as_bytes()));
                let escaped = name.replace('\\', "\\\\").replace('"', "\\\"");
                body.extend_from_slice(format!("\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"{escaped}\"\r\n\r\n").as_bytes());
                body.extend_from_slice(data);
            }
            body.extend_from_slice(format!("\r\n--{boundary}--\r\nepilogue").as_bytes());
            let parts = parse(&body, &boundary).unwrap();
            prop_assert_eq!(parts.len(), fields.len());
            for (part, (name, data)) in parts.iter().zip(&fields) {
                prop_assert_eq!(&part.name, name);
                prop_assert_eq!(part.data, &data[..]);
            }
        }
    }
}
