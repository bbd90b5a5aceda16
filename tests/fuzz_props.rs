//! Property tests of the byte-level decoders an outsider can reach: the HTTP/1.1 parser, the
//! multipart parser, the zip checks and the frame decoders (hearth's and the guest agent's).
//!
//! This is the part of the fuzzing that runs on stable Rust in the normal `cargo test`; the
//! coverage-guided targets in `fuzz/` drive the same code with libFuzzer (`tools/fuzz.sh`).
//! Every property holds for any input: no panic, output bounded by the input and the limits,
//! and the same result whatever way the input is split, where the input can be split.
//!
//! The number of cases per property is proptest's: 256, or `PROPTEST_CASES`.

use std::fs;
use std::io::{Cursor, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

use hearth::control::archive::{extract_zip, ArchiveLimits};
use hearth::control::multipart::{self, Part, PARTS_MAX, PART_HEADER_BYTES_MAX};
use hearth::http::parse::{parse_head, BodyDecoder, BodyFraming, Limits};
use hearth::protocol::{
    encode, Frame, FrameDecoder, FrameType, BODY_BYTES_MAX, HEADER_BYTES, META_BYTES_MAX,
};
use proptest::prelude::*;
use proptest::sample::Index;

// The guest agent is a binary crate; its sans-IO frame tracking is compiled here from its own
// sources (with the modules it names through `crate::`), as the agent's tests compile ours.
#[allow(dead_code)]
#[path = "../agent/src/buf.rs"]
mod buf;
#[allow(dead_code)]
#[path = "../agent/src/frames.rs"]
mod frames;
#[allow(dead_code)]
#[path = "../agent/src/json.rs"]
mod json;
#[allow(dead_code)]
#[path = "../agent/src/sys.rs"]
mod sys;
mod protocol {
    pub use hearth::protocol::*;
}
#[path = "fuzz_support/tree.rs"]
mod tree;

// ------------------------------------------------------------------------------ helpers

/// Cuts `len` bytes at the given points; the segment boundaries, first 0 and last `len`.
fn cut_points(len: usize, cuts: &[Index]) -> Vec<usize> {
    let mut points: Vec<usize> = cuts.iter().map(|i| i.index(len + 1)).collect();
    points.push(0);
    points.push(len);
    points.sort_unstable();
    points
}

/// `bytes` split at the given points.
fn split<'a>(bytes: &'a [u8], cuts: &[Index]) -> Vec<&'a [u8]> {
    cut_points(bytes.len(), cuts)
        .windows(2)
        .map(|w| &bytes[w[0]..w[1]])
        .collect()
}

/// Bytes drawn mostly from `alphabet` (so the parsers get past their first checks), some from
/// anywhere.
fn bytes_like(alphabet: &'static [u8], len_max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(
        prop_oneof![
            4 => prop::sample::select(alphabet.to_vec()),
            1 => any::<u8>(),
        ],
        0..len_max,
    )
}

// ------------------------------------------------------------------------------ HTTP

/// Feeds `segments` to a body decoder; the decoded bytes, what was consumed in total, and the
/// verdict (done, or the error's status).
fn decode_body(
    framing: BodyFraming,
    limits: &Limits,
    segments: &[&[u8]],
) -> (Vec<u8>, usize, Result<bool, u16>) {
    let mut decoder = BodyDecoder::new(framing, limits).expect("framing within the limits");
    let mut out = Vec::new();
    let mut consumed_total = 0;
    for segment in segments {
        match decoder.feed(segment, &mut out) {
            Ok((consumed, done)) => {
                assert!(consumed <= segment.len(), "consumed past the input");
                assert!(
                    done || consumed == segment.len(),
                    "unfinished body left bytes"
                );
                consumed_total += consumed;
                if done {
                    return (out, consumed_total, Ok(true));
                }
            }
            Err(err) => return (out, consumed_total, Err(err.status())),
        }
    }
    (out, consumed_total, Ok(false))
}

/// A chunked body with these chunks (plus the last, empty one), optional extensions and
/// trailers.
fn chunked_wire(chunks: &[Vec<u8>], extension: bool, trailers: &[(String, String)]) -> Vec<u8> {
    let mut wire = Vec::new();
    for chunk in chunks.iter().filter(|c| !c.is_empty()) {
        wire.extend_from_slice(format!("{:X}", chunk.len()).as_bytes());
        if extension {
            wire.extend_from_slice(b" ;name=\"q\\\"v\";flag");
        }
        wire.extend_from_slice(b"\r\n");
        wire.extend_from_slice(chunk);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(b"0\r\n");
    for (name, value) in trailers {
        wire.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    wire.extend_from_slice(b"\r\n");
    wire
}

fn trailer() -> impl Strategy<Value = (String, String)> {
    ("T-[A-Za-z]{1,8}", "[!-~]([ -~]{0,12}[!-~])?")
}

proptest! {
    /// A chunked body cut anywhere decodes to the same bytes and stops at the same place,
    /// leaving the next request's bytes unread.
    #[test]
    fn chunked_body_split_anywhere_decodes_the_same(
        chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..6),
        extension in any::<bool>(),
        trailers in proptest::collection::vec(trailer(), 0..3),
        next in proptest::collection::vec(any::<u8>(), 0..20),
        cuts in proptest::collection::vec(any::<Index>(), 0..16),
    ) {
        let body = chunked_wire(&chunks, extension, &trailers);
        let mut stream = body.clone();
        stream.extend_from_slice(&next);
        let limits = Limits::default();
        let expected: Vec<u8> = chunks.concat();

        let whole = decode_body(BodyFraming::Chunked, &limits, &[&stream]);
        prop_assert_eq!(&whole, &(expected.clone(), body.len(), Ok(true)));
        let pieces = split(&stream, &cuts);
        let split = decode_body(BodyFraming::Chunked, &limits, &pieces);
        prop_assert_eq!(&split, &whole);
        let bytewise: Vec<&[u8]> = stream.chunks(1).collect();
        prop_assert_eq!(decode_body(BodyFraming::Chunked, &limits, &bytewise), whole);
    }

    /// A Content-Length body cut anywhere yields exactly its bytes, and nothing after them.
    #[test]
    fn length_body_split_anywhere_decodes_the_same(
        body in proptest::collection::vec(any::<u8>(), 1..400),
        next in proptest::collection::vec(any::<u8>(), 0..20),
        cuts in proptest::collection::vec(any::<Index>(), 0..16),
    ) {
        let mut stream = body.clone();
        stream.extend_from_slice(&next);
        let framing = BodyFraming::Length(body.len() as u64);
        let pieces = split(&stream, &cuts);
        let got = decode_body(framing, &Limits::default(), &pieces);
        prop_assert_eq!(got, (body.clone(), body.len(), Ok(true)));
    }

    /// Whatever the bytes, a chunked body never yields more than the body limit, nor more
    /// bytes than it consumed, and a split does not change the verdict.
    #[test]
    fn chunked_decoder_output_is_bounded(
        bytes in bytes_like(b"0123456789abcdefABCDEF;=\"\\\r\n \t:xT-", 600),
        body_bytes_max in 0u64..300,
        head_bytes_max in 1usize..200,
        cuts in proptest::collection::vec(any::<Index>(), 0..8),
    ) {
        let limits = Limits { head_bytes_max, headers_max: 8, body_bytes_max };
        let whole = decode_body(BodyFraming::Chunked, &limits, &[&bytes]);
        prop_assert!(whole.0.len() as u64 <= body_bytes_max, "{} bytes over a limit of {}", whole.0.len(), body_bytes_max);
        // Never more out than in (on an error the consumed count is not reported: all of it).
        let taken = if whole.2.is_ok() { whole.1 } else { bytes.len() };
        prop_assert!(whole.0.len() <= taken);
        let pieces = split(&bytes, &cuts);
        let split = decode_body(BodyFraming::Chunked, &limits, &pieces);
        prop_assert!(split.0.len() as u64 <= body_bytes_max);
        // A split may end before an error shows (more input needed), never after a success.
        match (&whole.2, &split.2) {
            (Ok(true), verdict) => prop_assert_eq!(verdict, &Ok(true)),
            (Err(a), Err(b)) => prop_assert_eq!(a, b),
            (_, Ok(true)) => prop_assert!(false, "split accepted what whole did not: {:?}", whole),
            _ => {}
        }
        if whole.2 == Ok(true) {
            prop_assert_eq!(&split.0, &whole.0);
        }
    }

    /// The head parser never panics, never claims more than it was given, and never asks for
    /// more bytes once it holds `head_bytes_max` of them: a connection's head buffer is bounded.
    #[test]
    fn head_parser_is_bounded_on_any_bytes(
        bytes in bytes_like(b"GET POST /a?b=c HTTP/1.1\r\n\r\nHost: x\r\ncontent-length: 12\r\ntransfer-encoding: chunked\r\n:\t \x00\x7f\x80", 400),
        head_bytes_max in 1usize..300,
        headers_max in 0usize..6,
    ) {
        let limits = Limits { head_bytes_max, headers_max, body_bytes_max: 1024 };
        match parse_head(&bytes, &limits) {
            Ok(Some((req, len))) => {
                prop_assert!(len > 0 && len <= bytes.len().min(head_bytes_max));
                prop_assert!(req.headers.len() <= headers_max);
                // A body the connection would read is within the limit, or refused up front.
                if let Ok(mut decoder) = BodyDecoder::new(req.body, &limits) {
                    let mut out = Vec::new();
                    let _ = decoder.feed(&bytes[len..], &mut out);
                    prop_assert!(out.len() as u64 <= limits.body_bytes_max);
                }
            }
            Ok(None) => prop_assert!(bytes.len() < head_bytes_max, "incomplete head at the limit"),
            Err(err) => prop_assert!((400..=505).contains(&err.status())),
        }
    }
}

// ------------------------------------------------------------------------------ multipart

/// One field of a form as a generator writes it.
#[derive(Clone, Debug)]
struct Field {
    name: String,
    filename: Option<String>,
    content_type: Option<String>,
    data: Vec<u8>,
    header_case: bool,
}

/// Data that leans on the delimiter: pieces of it (every prefix of "\r\n--boundary") cut in at
/// arbitrary points among random bytes, but never the whole delimiter.
fn delimiter_laden_data(delimiter: &[u8], pieces: &[(Index, u8)]) -> Vec<u8> {
    let mut data = Vec::new();
    for (prefix, byte) in pieces {
        let len = prefix.index(delimiter.len());
        data.extend_from_slice(&delimiter[..len]);
        data.push(*byte);
    }
    // The pieces can still line up into the whole delimiter: break each occurrence.
    while let Some(at) = data.windows(delimiter.len()).position(|w| w == delimiter) {
        data[at + delimiter.len() - 1] ^= 0x20;
    }
    data
}

fn quoted(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

fn multipart_body(boundary: &str, fields: &[Field], preamble: &[u8]) -> Vec<u8> {
    let mut body = preamble.to_vec();
    for (i, field) in fields.iter().enumerate() {
        // The first boundary may open the body or follow the preamble and a line break.
        if i > 0 || !preamble.is_empty() {
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(format!("--{boundary} \t\r\n").as_bytes());
        let disposition = if field.header_case {
            "CONTENT-disposition"
        } else {
            "Content-Disposition"
        };
        let mut line = format!("{disposition}: form-data; name={}", quoted(&field.name));
        if let Some(filename) = &field.filename {
            line.push_str(&format!("; filename={}", quoted(filename)));
        }
        body.extend_from_slice(line.as_bytes());
        body.extend_from_slice(b"\r\n");
        if let Some(content_type) = &field.content_type {
            body.extend_from_slice(format!("content-type:   {content_type}\r\n").as_bytes());
        }
        body.extend_from_slice(b"\r\n");
        body.extend_from_slice(&field.data);
    }
    body.extend_from_slice(
        format!("\r\n--{boundary}--\r\nepilogue\r\n--{boundary}\r\n").as_bytes(),
    );
    body
}

/// One multipart field to generate: name, file name, content type, where to
/// put pieces of the delimiter in its data (and which byte), and whether its
/// header names are written in upper case.
type FieldSpec = (
    String,
    Option<String>,
    Option<String>,
    Vec<(Index, u8)>,
    bool,
);

fn field_spec() -> impl Strategy<Value = FieldSpec> {
    (
        "[a-z\"\\\\ ;=é]{1,12}",
        proptest::option::of("[a-zA-Z0-9 ._\"\\\\;-]{0,16}"),
        proptest::option::of(
            prop::sample::select(vec!["application/zip", "text/plain; charset=utf-8"])
                .prop_map(String::from),
        ),
        proptest::collection::vec((any::<Index>(), any::<u8>()), 0..24),
        any::<bool>(),
    )
}

/// Checks what `multipart::parse` promises for any body: a bounded number of parts whose data
/// are disjoint slices of the body, in order.
fn check_parts(body: &[u8], parts: &[Part<'_>]) -> Result<(), TestCaseError> {
    prop_assert!(parts.len() <= PARTS_MAX);
    let base = body.as_ptr() as usize;
    let mut last_end = 0;
    for part in parts {
        let start = part.data.as_ptr() as usize - base;
        prop_assert!(
            start >= last_end && start + part.data.len() <= body.len(),
            "part data outside the body or out of order"
        );
        last_end = start + part.data.len();
    }
    Ok(())
}

proptest! {
    /// Fields come back exactly, however much of the delimiter their data contains and
    /// wherever those pieces fall.
    #[test]
    fn multipart_round_trips_data_laden_with_delimiter_pieces(
        boundary in "[A-Za-z0-9'()+_,./:=? -]{0,69}[A-Za-z0-9'()+_,./:=?-]",
        specs in proptest::collection::vec(field_spec(), 0..6),
        preamble in prop::sample::select(vec![&b""[..], b"preamble", b"\r\n", b"--"]),
    ) {
        let delimiter = format!("\r\n--{boundary}");
        let fields: Vec<Field> = specs
            .into_iter()
            .map(|(name, filename, content_type, pieces, header_case)| Field {
                name,
                filename,
                content_type,
                data: delimiter_laden_data(delimiter.as_bytes(), &pieces),
                header_case,
            })
            .collect();
        // A preamble of "--" + boundary would be read as the first boundary.
        let body = multipart_body(&boundary, &fields, preamble);
        let parts = multipart::parse(&body, &boundary).map_err(|e| TestCaseError::fail(format!("{e}: {:?}", String::from_utf8_lossy(&body))))?;
        check_parts(&body, &parts)?;
        prop_assert_eq!(parts.len(), fields.len());
        for (part, field) in parts.iter().zip(&fields) {
            prop_assert_eq!(&part.name, &field.name);
            prop_assert_eq!(&part.filename, &field.filename);
            prop_assert_eq!(&part.content_type, &field.content_type);
            prop_assert_eq!(part.data, &field.data[..]);
        }
    }

    /// A deploy body arrives in arbitrary reads, chunked: decoding the pieces and parsing the
    /// result gives the same parts as the body had.
    #[test]
    fn multipart_through_a_chunked_body_split_anywhere_is_the_same(
        specs in proptest::collection::vec(field_spec(), 1..4),
        chunk_sizes in proptest::collection::vec(1usize..64, 1..8),
        cuts in proptest::collection::vec(any::<Index>(), 0..16),
    ) {
        let boundary = "------------------------d74496d66958873e";
        let delimiter = format!("\r\n--{boundary}");
        let fields: Vec<Field> = specs
            .into_iter()
            .map(|(name, filename, content_type, pieces, header_case)| Field {
                name, filename, content_type, header_case,
                data: delimiter_laden_data(delimiter.as_bytes(), &pieces),
            })
            .collect();
        let body = multipart_body(boundary, &fields, b"");
        let mut chunks = Vec::new();
        let mut at = 0;
        for size in chunk_sizes.iter().cycle() {
            if at == body.len() { break; }
            let end = (at + size).min(body.len());
            chunks.push(body[at..end].to_vec());
            at = end;
        }
        let wire = chunked_wire(&chunks, false, &[]);
        let (decoded, _, verdict) = decode_body(BodyFraming::Chunked, &Limits::default(), &split(&wire, &cuts));
        prop_assert_eq!(verdict, Ok(true));
        prop_assert_eq!(&decoded, &body);
        let whole = multipart::parse(&body, boundary).unwrap();
        let pieced = multipart::parse(&decoded, boundary).unwrap();
        prop_assert_eq!(pieced, whole);
    }

    /// Any body and any boundary: no panic, parts within the limits and within the body.
    #[test]
    fn multipart_parse_is_bounded_on_any_bytes(
        body in bytes_like(b"--bnd\r\n\r\nContent-Disposition: form-data; name=\"x\"; filename=\\\"", 800),
        boundary in prop_oneof![Just("bnd".to_string()), "[ -~]{0,72}", ".{0,3}"],
    ) {
        if let Ok(parts) = multipart::parse(&body, &boundary) {
            check_parts(&body, &parts)?;
        }
        let _ = multipart::boundary(&format!("multipart/form-data; boundary={boundary}"));
    }

    /// Many parts and long header blocks hit the limits instead of growing without bound.
    #[test]
    fn multipart_limits_hold(parts in 0usize..(PARTS_MAX + 4), header_pad in 0usize..(PART_HEADER_BYTES_MAX + 64)) {
        let mut body = Vec::new();
        for _ in 0..parts {
            body.extend_from_slice(b"--b\r\nContent-Disposition: form-data; name=\"n\"\r\n\r\nv\r\n");
        }
        body.extend_from_slice(format!("--b\r\nX-Pad: {}\r\nContent-Disposition: form-data; name=\"last\"\r\n\r\nv\r\n--b--", "p".repeat(header_pad)).as_bytes());
        let header_bytes = "X-Pad: ".len() + header_pad + 2 + "Content-Disposition: form-data; name=\"last\"".len();
        match multipart::parse(&body, "b") {
            Ok(got) => {
                check_parts(&body, &got)?;
                prop_assert_eq!(got.len(), parts + 1);
                prop_assert!(header_bytes + 4 <= PART_HEADER_BYTES_MAX);
            }
            Err(e) => prop_assert!(parts + 1 > PARTS_MAX || header_bytes + 4 > PART_HEADER_BYTES_MAX, "{}", e),
        }
    }
}

// ------------------------------------------------------------------------------ zip checks

/// A directory under the system temp dir, removed on drop; `dest` is where code unpacks.
struct Scratch(PathBuf);

impl Scratch {
    fn new() -> Scratch {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = tree::scratch_root().join(format!(
            "hearth-fuzz-props-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    fn dest(&self) -> PathBuf {
        self.0.join("code")
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Wraps the shared tree check for proptest.
fn check_tree(dest: &Path) -> Result<tree::TreeSummary, TestCaseError> {
    tree::check_tree(dest).map_err(TestCaseError::fail)
}

/// What `extract_zip` promises whatever the archive: on success every created path and every
/// symlink stays inside `dest` and the content fits the limits; on failure nothing is left
/// behind. Either way nothing appears beside `dest`.
fn check_extraction(zip: &[u8], limits: &ArchiveLimits) -> Result<(), TestCaseError> {
    let scratch = Scratch::new();
    let dest = scratch.dest();
    let result = extract_zip(zip, &dest, limits);
    let beside: Vec<_> = fs::read_dir(&scratch.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    let Ok(extracted) = result else {
        prop_assert!(beside.is_empty(), "a refused archive left {:?}", beside);
        return Ok(());
    };
    prop_assert_eq!(beside, vec![std::ffi::OsString::from("code")]);
    let summary = check_tree(&dest)?;
    prop_assert!(summary.file_bytes <= extracted.unpacked_bytes);
    prop_assert_eq!(
        summary.paths,
        extracted.files + extracted.dirs + extracted.symlinks
    );
    prop_assert!(extracted.unpacked_bytes <= limits.unpacked_bytes_max);
    Ok(())
}

/// One entry of a generated archive.
#[derive(Clone, Debug)]
enum ZipItem {
    File(String, Vec<u8>, u32),
    Dir(String),
    Link(String, String),
}

/// Entry names: mostly plain components (so whole archives get accepted and the layout checks
/// are reached), sometimes a piece that matters to path safety.
fn zip_path(tails: bool) -> impl Strategy<Value = String> {
    let component = prop_oneof![
        40 => prop::sample::select(vec!["a", "b", "l", "m", "node_modules", "é"]),
        3 => Just("."),
        1 => prop::sample::select(vec!["..", "", "C:", "\\..", "a\0b"]),
    ];
    (
        proptest::collection::vec(component, 1..5),
        prop_oneof![20 => Just(""), 3 => Just("/"), 1 => Just("/..")]
            .prop_filter("a tail", move |t| tails || t.is_empty()),
        prop::bool::weighted(0.02),
    )
        .prop_map(|(parts, tail, absolute)| {
            format!(
                "{}{}{tail}",
                if absolute { "/" } else { "" },
                parts.join("/")
            )
        })
}

/// Symlink targets, where escapes come from: many ".." among names of other entries.
fn link_target() -> impl Strategy<Value = String> {
    let component = prop_oneof![
        4 => Just(".."),
        6 => prop::sample::select(vec!["a", "b", "l", "m", "node_modules"]),
        1 => prop::sample::select(vec![".", ""]),
    ];
    (
        proptest::collection::vec(component, 1..6),
        prop::bool::weighted(0.05),
    )
        .prop_map(|(parts, absolute)| {
            format!("{}{}", if absolute { "/" } else { "" }, parts.join("/"))
        })
}

fn zip_item() -> impl Strategy<Value = ZipItem> {
    prop_oneof![
        1 => (zip_path(true), proptest::collection::vec(any::<u8>(), 0..64), prop::sample::select(vec![0o644u32, 0o755, 0o4755]))
            .prop_map(|(name, data, mode)| ZipItem::File(name, data, mode)),
        1 => zip_path(true).prop_map(ZipItem::Dir),
        2 => (zip_path(false), link_target()).prop_map(|(name, target)| ZipItem::Link(name, target)),
    ]
}

fn build_zip(items: &[ZipItem]) -> Vec<u8> {
    use zip::write::SimpleFileOptions;
    let mut writer = zip::ZipWriter::new(Cursor::new(Vec::new()));
    let options = SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
    for item in items {
        // The writer refuses some names (duplicates): such an item is left out.
        let _ = match item {
            ZipItem::File(name, data, mode) => writer
                .start_file(name.as_str(), options.unix_permissions(*mode))
                .and_then(|()| writer.write_all(data).map_err(Into::into)),
            ZipItem::Dir(name) => writer.add_directory(name.as_str(), options),
            ZipItem::Link(name, target) => {
                writer.add_symlink(name.as_str(), target.as_str(), options)
            }
        };
    }
    writer.finish().unwrap().into_inner()
}

proptest! {
    /// Archives made of dangerous names and symlinks: whatever gets accepted stays inside the
    /// tree, and a refused archive leaves nothing behind.
    #[test]
    fn zip_checks_never_accept_an_escape(items in proptest::collection::vec(zip_item(), 1..8)) {
        let zip = build_zip(&items);
        check_extraction(&zip, &ArchiveLimits::default())?;
    }

    /// The same archives with bytes overwritten anywhere (headers, names, sizes): no panic,
    /// and the same promises.
    #[test]
    fn zip_checks_hold_on_corrupted_archives(
        items in proptest::collection::vec(zip_item(), 1..5),
        edits in proptest::collection::vec((any::<Index>(), any::<u8>()), 1..6),
        entries_max in 1usize..8,
    ) {
        let mut zip = build_zip(&items);
        for (at, byte) in &edits {
            let i = at.index(zip.len());
            zip[i] = *byte;
        }
        let limits = ArchiveLimits { compressed_bytes_max: 1 << 20, unpacked_bytes_max: 4096, entries_max, ratio_max: 50 };
        check_extraction(&zip, &limits)?;
    }
}

// ------------------------------------------------------------------------------ frames

fn frame_type() -> impl Strategy<Value = FrameType> {
    prop::sample::select(vec![
        FrameType::Hello,
        FrameType::Invoke,
        FrameType::Ready,
        FrameType::InitError,
        FrameType::Response,
        FrameType::Error,
        FrameType::Log,
        FrameType::StreamHead,
        FrameType::StreamChunk,
        FrameType::StreamEnd,
    ])
}

fn frame() -> impl Strategy<Value = Frame> {
    (
        frame_type(),
        any::<u8>(),
        any::<u32>(),
        proptest::collection::vec(any::<u8>(), 0..100),
        proptest::collection::vec(any::<u8>(), 0..300),
    )
        .prop_map(|(kind, flags, request_id, meta, body)| Frame {
            kind,
            flags,
            request_id,
            meta,
            body,
        })
}

fn wire_of(frames: &[Frame]) -> Vec<u8> {
    let mut wire = Vec::new();
    for f in frames {
        encode(&mut wire, f.kind, f.flags, f.request_id, &f.meta, &f.body);
    }
    wire
}

/// The largest number of bytes a decoder may hold without a frame to show for them.
const FRAME_BYTES_MAX: usize = HEADER_BYTES + META_BYTES_MAX + BODY_BYTES_MAX;

proptest! {
    /// Frames encoded and decoded come back identical, however the stream is cut, through
    /// either way of filling the decoder.
    #[test]
    fn frames_round_trip_split_anywhere(
        frames in proptest::collection::vec(frame(), 0..6),
        cuts in proptest::collection::vec(any::<Index>(), 0..16),
        use_spare in any::<bool>(),
    ) {
        let wire = wire_of(&frames);
        let mut decoder = FrameDecoder::new();
        let mut got = Vec::new();
        for piece in split(&wire, &cuts) {
            if use_spare {
                let want = piece.len() + 7;
                decoder.spare(want)[..piece.len()].copy_from_slice(piece);
                decoder.filled(want, piece.len());
            } else {
                decoder.push(piece);
            }
            while let Some(frame) = decoder.next_frame().unwrap() {
                got.push(frame);
            }
        }
        prop_assert_eq!(got, frames);
        prop_assert_eq!(decoder.pending(), 0);
    }

    /// Any bytes: no panic, frames within the limits, and the decoder never holds more than
    /// one frame's worth of bytes without yielding a frame or an error.
    #[test]
    fn frame_decoder_is_bounded_on_any_bytes(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..400),
            (proptest::collection::vec(frame(), 0..3), proptest::collection::vec((any::<Index>(), any::<u8>()), 0..4))
                .prop_map(|(frames, edits)| {
                    let mut wire = wire_of(&frames);
                    for (at, byte) in edits {
                        if !wire.is_empty() { let i = at.index(wire.len()); wire[i] = byte; }
                    }
                    wire
                }),
        ],
        cuts in proptest::collection::vec(any::<Index>(), 0..8),
    ) {
        let mut decoder = FrameDecoder::new();
        let mut yielded = 0;
        'feed: for piece in split(&bytes, &cuts) {
            decoder.push(piece);
            loop {
                match decoder.next_frame() {
                    Ok(Some(frame)) => {
                        prop_assert!(frame.meta.len() <= META_BYTES_MAX && frame.body.len() <= BODY_BYTES_MAX);
                        yielded += HEADER_BYTES + frame.meta.len() + frame.body.len();
                    }
                    Ok(None) => break,
                    Err(_) => break 'feed,
                }
            }
            prop_assert!(decoder.pending() < FRAME_BYTES_MAX);
        }
        prop_assert!(yielded <= bytes.len());
    }

    /// The agent's view of the host stream passes every byte of valid frames on unchanged and
    /// reports each INVOKE and HELLO once, however the stream is cut.
    #[test]
    fn agent_host_stream_passes_frames_split_anywhere(
        frames in proptest::collection::vec(
            (any::<bool>(), 1u32.., proptest::option::of(any::<u64>()), proptest::collection::vec(any::<u8>(), 0..200)),
            0..5,
        ),
        cuts in proptest::collection::vec(any::<Index>(), 0..16),
    ) {
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        for (hello, request_id, time_ms, body) in &frames {
            if *hello {
                let meta = match time_ms {
                    Some(t) => format!(r#"{{"handler":"a.b","env":{{"K":"[1,{{}}]"}},"time_ms":{t},"seed2":7}}"#),
                    None => r#"{"handler":"a.b"}"#.to_string(),
                };
                encode(&mut wire, FrameType::Hello, 0, 0, meta.as_bytes(), body);
                let seed = if time_ms.is_some() { vec![7] } else { Vec::new() };
                expected.push(frames::HostEvent::Hello { time_ms: *time_ms, seed });
            } else {
                encode(&mut wire, FrameType::Invoke, 0, *request_id, b"{}", body);
                expected.push(frames::HostEvent::Invoke { request_id: *request_id });
            }
        }
        let mut stream = frames::HostStream::new();
        let mut out = buf::ByteQueue::new();
        let mut events = Vec::new();
        for piece in split(&wire, &cuts) {
            stream.feed(piece, &mut out, &mut events).unwrap();
        }
        prop_assert_eq!(out.as_slice(), &wire[..]);
        prop_assert_eq!(events, expected);
        prop_assert!(!stream.mid_frame());
    }

    /// Any bytes from the host: no panic, never more bytes passed on than came in, and a
    /// header is passed on only whole.
    #[test]
    fn agent_host_stream_is_bounded_on_any_bytes(
        bytes in prop_oneof![
            proptest::collection::vec(any::<u8>(), 0..300),
            (proptest::collection::vec(frame(), 0..3), any::<Index>(), any::<u8>()).prop_map(|(frames, at, byte)| {
                let mut wire = wire_of(&frames);
                if !wire.is_empty() { let i = at.index(wire.len()); wire[i] = byte; }
                wire
            }),
        ],
        cuts in proptest::collection::vec(any::<Index>(), 0..8),
    ) {
        let mut stream = frames::HostStream::new();
        let mut out = buf::ByteQueue::new();
        let mut events = Vec::new();
        let mut fed = 0;
        for piece in split(&bytes, &cuts) {
            let result = stream.feed(piece, &mut out, &mut events);
            fed += piece.len();
            prop_assert!(out.len() <= fed);
            if result.is_err() { break; }
        }
        if !out.is_empty() {
            prop_assert!(out.len() >= HEADER_BYTES);
        }
        prop_assert!(events.len() <= out.len() / HEADER_BYTES);
    }

    /// What the agent reads from the runtime: a frame is reported complete only when all its
    /// bytes are there, and what is missing adds up to the frame.
    #[test]
    fn agent_complete_frame_agrees_with_the_encoder(
        frame in frame(),
        cut in any::<Index>(),
        noise in proptest::collection::vec(any::<u8>(), 0..40),
    ) {
        let wire = wire_of(std::slice::from_ref(&frame));
        let upstream = matches!(frame.kind, FrameType::Hello | FrameType::Invoke);
        let cut = cut.index(wire.len() + 1);
        let prefix = &wire[..cut];
        match frames::complete_frame(prefix) {
            Err(frames::StreamError::WrongDirection(kind)) => prop_assert!(upstream && kind == frame.kind && cut >= HEADER_BYTES),
            Err(e) => prop_assert!(false, "{}", e),
            Ok(Some(h)) => {
                prop_assert!(!upstream && cut == wire.len());
                prop_assert_eq!(h.frame_len(), wire.len());
            }
            Ok(None) => prop_assert!(cut < wire.len()),
        }
        // Until the header is in, only the header's bytes are known to be missing.
        let known = if cut < HEADER_BYTES { HEADER_BYTES } else { wire.len() };
        prop_assert_eq!(cut + frames::bytes_missing(prefix), known);
        if let Ok(Some(h)) = frames::complete_frame(&noise) {
            prop_assert!(h.frame_len() <= noise.len());
        }
        prop_assert!(frames::bytes_missing(&noise) <= FRAME_BYTES_MAX);
    }

    /// The agent's HELLO metadata reader takes any bytes without panicking.
    #[test]
    fn agent_json_reader_never_panics(
        meta in bytes_like(b"{}[]\":,0123456789.eE+-tfnul \\time_ms", 300),
    ) {
        let _ = json::top_level_u64(&meta, "time_ms");
    }
}

/// The tree check above is what makes the zip properties able to fail: it must see an escape.
#[test]
fn tree_check_sees_symlinks_and_paths_leading_out() {
    for (link, target) in [
        ("l", "../outside"),
        ("d/l", "../.."),
        ("d/l", "/etc"),
        ("m", "d/up/.."),
    ] {
        let scratch = Scratch::new();
        let dest = scratch.dest();
        fs::create_dir_all(dest.join("d")).unwrap();
        std::os::unix::fs::symlink("..", dest.join("d/up")).unwrap();
        assert!(check_tree(&dest).is_ok(), "d/up -> .. stays inside");
        std::os::unix::fs::symlink(target, dest.join(link)).unwrap();
        assert!(
            check_tree(&dest).is_err(),
            "{link} -> {target} was not seen to escape"
        );
    }
}
