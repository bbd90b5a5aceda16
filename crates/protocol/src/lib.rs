//! The host <-> guest wire protocol (see `include/hearth_protocol.h`).
//!
//! Sans-IO: [`FrameDecoder`] takes bytes and yields frames, [`encode`] appends
//! a frame to a buffer. Both ends use this crate: the server (as `hearth::protocol`)
//! and the static guest agent, so it depends on nothing but `std`.
//! `tests/mirrors.rs` checks that the C header and the Node.js shim
//! (`include/runtime/bootstrap.js`) agree with the constants here.

use std::fmt;

/// `"HT"`, little-endian, at the start of every frame.
pub const MAGIC: u16 = 0x4854;
/// The protocol's version. hearth and its guest agent are separate binaries
/// (the agent is a static build of its own) and must speak the same version:
/// the agent prints it in `--version` (`hearth-agent <crate version> (protocol
/// N)`) and hearth refuses an agent that prints another or none. Raised on
/// every change a peer of the previous version would misread: 2 made the
/// INVOKE metadata a positional array.
pub const VERSION: u16 = 2;
/// Bytes in a frame header.
pub const HEADER_BYTES: usize = 16;
/// Largest JSON metadata block accepted.
pub const META_BYTES_MAX: usize = 1 << 20;
/// Largest body accepted (above Lambda's 6 MiB payload limit).
pub const BODY_BYTES_MAX: usize = 8 << 20;
/// Largest frame an idle instance (no INVOKE of it outstanding) may send: a LOG
/// frame of output written outside any request, which runtimes and the agent
/// cut at 64 KiB of body. Anything else from an idle instance is unsolicited,
/// and the host retires the instance without reading further.
pub const IDLE_FRAME_BYTES_MAX: usize = HEADER_BYTES + (65 << 10);
/// Largest body of one STREAM_CHUNK frame: a runtime cuts larger writes.
pub const STREAM_CHUNK_BYTES_MAX: usize = 64 << 10;
/// Largest streamed answer, all chunks together (Lambda's 20 MiB soft limit
/// for streamed responses); the host ends a stream that goes past it.
pub const STREAM_BYTES_MAX: usize = 20 << 20;
/// The INVOKE metadata's fields, in the order of its positional form (a JSON
/// array; see `include/hearth_protocol.h`). `raw` is 1 or 0 there.
pub const INVOKE_META_FIELDS: [&str; 11] = [
    "method",
    "path",
    "query",
    "headers",
    "source_ip",
    "protocol",
    "request_id",
    "time_ms",
    "domain",
    "raw",
    "deadline_ms",
];

/// Frame types; numbers match `enum hearth_frame_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameType {
    /// host -> guest: wall clock and function settings; first frame on a connection.
    Hello = 1,
    /// host -> guest: one request.
    Invoke = 2,
    /// guest -> host: the handler is loaded and the instance can take requests.
    Ready = 16,
    /// guest -> host: loading the handler failed.
    InitError = 17,
    /// guest -> host: the answer to an invoke.
    Response = 18,
    /// guest -> host: the handler failed for an invoke.
    Error = 19,
    /// guest -> host: captured output.
    Log = 20,
    /// guest -> host: a streamed answer to an invoke begins; metadata as RESPONSE's.
    StreamHead = 21,
    /// guest -> host: the next bytes of a streamed answer.
    StreamChunk = 22,
    /// guest -> host: a streamed answer is complete, or failed (error metadata).
    StreamEnd = 23,
    /// guest -> host, when hearth serves the Runtime API itself: the runtime
    /// exited; the body is Lambda's words for its status.
    Exit = 24,
}

impl FrameType {
    /// Maps a wire byte to a type.
    pub fn from_u8(v: u8) -> Option<FrameType> {
        Some(match v {
            1 => FrameType::Hello,
            2 => FrameType::Invoke,
            16 => FrameType::Ready,
            17 => FrameType::InitError,
            18 => FrameType::Response,
            19 => FrameType::Error,
            20 => FrameType::Log,
            21 => FrameType::StreamHead,
            22 => FrameType::StreamChunk,
            23 => FrameType::StreamEnd,
            24 => FrameType::Exit,
            _ => return None,
        })
    }
}

/// Log frame flag: the output came from stderr.
pub const LOG_STDERR: u8 = 0x01;

/// A decoded frame. `meta` is JSON text (possibly empty), `body` raw bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameType,
    pub flags: u8,
    pub request_id: u32,
    pub meta: Vec<u8>,
    pub body: Vec<u8>,
}

/// A stream that cannot be decoded further.
#[derive(Debug, PartialEq, Eq)]
pub enum ProtocolError {
    BadMagic(u16),
    UnknownType(u8),
    MetaTooLarge(usize),
    BodyTooLarge(usize),
    ChunkTooLarge(usize),
}

impl fmt::Display for ProtocolError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ProtocolError::BadMagic(m) => {
                write!(f, "frame magic is {m:#06x}, expected {MAGIC:#06x}")
            }
            ProtocolError::UnknownType(t) => write!(f, "unknown frame type {t}"),
            ProtocolError::MetaTooLarge(n) => {
                write!(f, "frame metadata is {n} bytes, limit {META_BYTES_MAX}")
            }
            ProtocolError::BodyTooLarge(n) => {
                write!(f, "frame body is {n} bytes, limit {BODY_BYTES_MAX}")
            }
            ProtocolError::ChunkTooLarge(n) => {
                write!(
                    f,
                    "stream chunk is {n} bytes, limit {STREAM_CHUNK_BYTES_MAX}"
                )
            }
        }
    }
}

impl std::error::Error for ProtocolError {}

/// Appends one frame to `out`.
pub fn encode(
    out: &mut Vec<u8>,
    kind: FrameType,
    flags: u8,
    request_id: u32,
    meta: &[u8],
    body: &[u8],
) {
    debug_assert!(meta.len() <= META_BYTES_MAX && body.len() <= BODY_BYTES_MAX);
    debug_assert!(kind != FrameType::StreamChunk || body.len() <= STREAM_CHUNK_BYTES_MAX);
    out.reserve(HEADER_BYTES + meta.len() + body.len());
    out.extend_from_slice(&MAGIC.to_le_bytes());
    out.push(kind as u8);
    out.push(flags);
    out.extend_from_slice(&request_id.to_le_bytes());
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(meta);
    out.extend_from_slice(body);
}

/// The parsed fixed header of a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: FrameType,
    pub flags: u8,
    pub request_id: u32,
    pub meta_len: usize,
    pub body_len: usize,
}

impl Header {
    /// Bytes of the whole frame, header included.
    pub fn frame_len(&self) -> usize {
        HEADER_BYTES + self.meta_len + self.body_len
    }
}

/// Parses the header at the start of `buf`, if 16 bytes are there.
pub fn parse_header(buf: &[u8]) -> Result<Option<Header>, ProtocolError> {
    if buf.len() < HEADER_BYTES {
        return Ok(None);
    }
    let u32_at = |i: usize| u32::from_le_bytes([buf[i], buf[i + 1], buf[i + 2], buf[i + 3]]);
    let magic = u16::from_le_bytes([buf[0], buf[1]]);
    if magic != MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    let kind = FrameType::from_u8(buf[2]).ok_or(ProtocolError::UnknownType(buf[2]))?;
    let meta_len = u32_at(8) as usize;
    let body_len = u32_at(12) as usize;
    if meta_len > META_BYTES_MAX {
        return Err(ProtocolError::MetaTooLarge(meta_len));
    }
    if body_len > BODY_BYTES_MAX {
        return Err(ProtocolError::BodyTooLarge(body_len));
    }
    if kind == FrameType::StreamChunk && body_len > STREAM_CHUNK_BYTES_MAX {
        return Err(ProtocolError::ChunkTooLarge(body_len));
    }
    Ok(Some(Header {
        kind,
        flags: buf[3],
        request_id: u32_at(4),
        meta_len,
        body_len,
    }))
}

/// Accumulates stream bytes and yields whole frames.
///
/// The buffer holds the unread bytes at `start..end`; what lies past `end` is initialised
/// room that [`FrameDecoder::spare`] hands out again without zeroing it on every read.
#[derive(Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl FrameDecoder {
    /// A decoder with an empty buffer.
    pub fn new() -> FrameDecoder {
        FrameDecoder::default()
    }

    /// Adds bytes read from the stream.
    pub fn push(&mut self, bytes: &[u8]) {
        self.spare(bytes.len()).copy_from_slice(bytes);
        self.end += bytes.len();
    }

    /// Spare room to read into directly; call [`FrameDecoder::filled`] after.
    pub fn spare(&mut self, want: usize) -> &mut [u8] {
        self.compact();
        if self.buf.len() < self.end + want {
            self.buf.resize(self.end + want, 0);
        }
        &mut self.buf[self.end..self.end + want]
    }

    /// Marks `n` bytes of the last [`FrameDecoder::spare`] (of `want`) as read.
    pub fn filled(&mut self, want: usize, n: usize) {
        assert!(n <= want && self.end + want <= self.buf.len());
        self.end += n;
    }

    /// The next whole frame, if buffered.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtocolError> {
        let pending = &self.buf[self.start..self.end];
        let Some(h) = parse_header(pending)? else {
            return Ok(None);
        };
        if pending.len() < h.frame_len() {
            return Ok(None);
        }
        let meta = pending[HEADER_BYTES..HEADER_BYTES + h.meta_len].to_vec();
        let body = pending[HEADER_BYTES + h.meta_len..h.frame_len()].to_vec();
        self.start += h.frame_len();
        Ok(Some(Frame {
            kind: h.kind,
            flags: h.flags,
            request_id: h.request_id,
            meta,
            body,
        }))
    }

    /// Bytes buffered but not yet returned as frames.
    pub fn pending(&self) -> usize {
        self.end - self.start
    }

    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_into_spare_room_reuse_it_without_growing() {
        let mut wire = Vec::new();
        encode(&mut wire, FrameType::Invoke, 0, 9, b"{}", b"payload");
        let mut d = FrameDecoder::new();
        for round in 0..1000 {
            // A frame arrives in two reads, with a failed read (0 bytes) between.
            let (a, b) = wire.split_at(round % wire.len());
            for part in [a, &[][..], b] {
                let room = d.spare(4096);
                room[..part.len()].copy_from_slice(part);
                d.filled(4096, part.len());
            }
            let f = d.next_frame().unwrap().expect("a whole frame");
            assert_eq!((f.request_id, &f.body[..]), (9, &b"payload"[..]));
            assert_eq!(d.pending(), 0);
        }
        assert!(d.buf.len() <= 4096 + wire.len(), "{}", d.buf.len());
    }

    #[test]
    fn frames_survive_any_split() {
        let mut wire = Vec::new();
        encode(
            &mut wire,
            FrameType::Invoke,
            0,
            7,
            br#"{"method":"GET"}"#,
            b"\x00\xffbody",
        );
        encode(&mut wire, FrameType::Log, LOG_STDERR, 7, b"", b"line\n");
        for cut in 0..=wire.len() {
            let mut d = FrameDecoder::new();
            d.push(&wire[..cut]);
            let mut got = Vec::new();
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            d.push(&wire[cut..]);
            while let Some(f) = d.next_frame().unwrap() {
                got.push(f);
            }
            assert_eq!(got.len(), 2, "cut at {cut}");
            assert_eq!(got[0].body, b"\x00\xffbody");
            assert_eq!(got[1].flags, LOG_STDERR);
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors() {
        let mut wire = Vec::new();
        encode(&mut wire, FrameType::Response, 0, 1, b"", b"");
        wire[12..16].copy_from_slice(&(BODY_BYTES_MAX as u32 + 1).to_le_bytes());
        assert!(matches!(
            parse_header(&wire),
            Err(ProtocolError::BodyTooLarge(_))
        ));
        assert!(matches!(
            parse_header(b"GET / HTTP/1.1\r\n"),
            Err(ProtocolError::BadMagic(_))
        ));
        let mut chunk = Vec::new();
        encode(&mut chunk, FrameType::StreamChunk, 0, 1, b"", b"");
        chunk[12..16].copy_from_slice(&(STREAM_CHUNK_BYTES_MAX as u32 + 1).to_le_bytes());
        assert!(matches!(
            parse_header(&chunk),
            Err(ProtocolError::ChunkTooLarge(_))
        ));
        wire[0..2].copy_from_slice(&MAGIC.to_le_bytes());
        wire[2] = 99;
        assert_eq!(parse_header(&wire), Err(ProtocolError::UnknownType(99)));
    }
}
