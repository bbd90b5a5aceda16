//! Fuzzes the multipart/form-data parser of `POST /deploy` with arbitrary bodies.
//!
//! Beyond "never panics": at most `PARTS_MAX` parts, each part's data a slice of the body, in
//! order and disjoint; a body rebuilt from the parts it yielded parses to the same parts.
#![no_main]

use hearth::control::multipart::{self, Part, PARTS_MAX, PART_HEADER_BYTES_MAX};
use libfuzzer_sys::fuzz_target;

/// Boundaries the first byte picks from; the last choice takes the boundary from the input.
const BOUNDARIES: [&str; 3] = [
    "b",
    "------------------------d74496d66958873e",
    "x y'()+_,./:=?-",
];

fuzz_target!(|input: &[u8]| {
    let Some((&knob, rest)) = input.split_first() else {
        return;
    };
    let (boundary, body) = match usize::from(knob) % (BOUNDARIES.len() + 1) {
        i if i < BOUNDARIES.len() => (BOUNDARIES[i].to_string(), rest),
        _ => {
            // "<boundary>\n<body>": also reaches the boundary checks and header parsing.
            let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            let text = String::from_utf8_lossy(&rest[..end]).into_owned();
            let _ = multipart::boundary(&text);
            (text, rest.get(end + 1..).unwrap_or_default())
        }
    };
    let Ok(parts) = multipart::parse(body, &boundary) else {
        return;
    };
    assert!(parts.len() <= PARTS_MAX);
    let base = body.as_ptr() as usize;
    let mut last_end = 0;
    for part in &parts {
        let start = part.data.as_ptr() as usize - base;
        assert!(start >= last_end && start + part.data.len() <= body.len());
        last_end = start + part.data.len();
    }
    let Some(rebuilt) = rebuild(&parts, &boundary) else {
        return;
    };
    let again = multipart::parse(&rebuilt, &boundary).expect("a rebuilt body parses");
    assert_eq!(again, parts);
});

/// The canonical encoding of `parts`; `None` if quoting pushed a header block over the limit.
fn rebuild(parts: &[Part<'_>], boundary: &str) -> Option<Vec<u8>> {
    let quote = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let mut body = Vec::new();
    for part in parts {
        body.extend_from_slice(format!("--{boundary}\r\n").as_bytes());
        let header_start = body.len();
        let mut line = format!("Content-Disposition: form-data; name={}", quote(&part.name));
        if let Some(filename) = &part.filename {
            line.push_str(&format!("; filename={}", quote(filename)));
        }
        body.extend_from_slice(line.as_bytes());
        body.extend_from_slice(b"\r\n");
        if let Some(content_type) = &part.content_type {
            body.extend_from_slice(format!("Content-Type: {content_type}\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        if body.len() - header_start > PART_HEADER_BYTES_MAX {
            return None;
        }
        body.extend_from_slice(part.data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    Some(body)
}
