//! Sans-IO views of the two frame streams the agent relays.
//!
//! * [`HostStream`] watches host -> runtime bytes as they pass: it validates
//!   each header, reports INVOKEs and HELLOs, and hands bytes on without
//!   waiting for whole frames (bodies can be 8 MiB).
//! * [`complete_frame`] finds whole runtime -> host frames, because the relay
//!   only ever forwards whole frames in that direction (LOG frames are slotted
//!   in between them).

use std::fmt;

use crate::buf::ByteQueue;
use crate::json;
use crate::protocol::{self, FrameType, Header, ProtocolError, HEADER_BYTES};

/// Something a frame stream must never contain.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamError {
    /// The header itself is unreadable (magic, type, lengths).
    Protocol(ProtocolError),
    /// A frame type that only flows the other way.
    WrongDirection(FrameType),
    /// An INVOKE without a request id (ids are nonzero by contract).
    ZeroRequestId,
}

impl fmt::Display for StreamError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StreamError::Protocol(e) => write!(f, "{e}"),
            StreamError::WrongDirection(t) => write!(
                f,
                "frame type {t:?} ({}) is not allowed in this direction",
                *t as u8
            ),
            StreamError::ZeroRequestId => write!(f, "INVOKE frame with request id 0"),
        }
    }
}

impl From<ProtocolError> for StreamError {
    fn from(e: ProtocolError) -> StreamError {
        StreamError::Protocol(e)
    }
}

/// What the host said that the agent itself acts on.
#[derive(Debug, PartialEq, Eq)]
pub enum HostEvent {
    /// A HELLO's metadata is complete; `time_ms` is its wall-clock reading,
    /// `seed` the host's fresh random words (`seed0`..`seed3`) for the kernel RNG.
    Hello {
        time_ms: Option<u64>,
        seed: Vec<u64>,
    },
    /// An INVOKE header passed; its answer will carry `request_id`.
    Invoke { request_id: u32 },
}

/// Tracks frame boundaries in the host -> runtime byte stream.
#[derive(Default)]
pub struct HostStream {
    header: [u8; HEADER_BYTES],
    header_have: usize,
    meta_left: usize,
    body_left: usize,
    /// Metadata of a HELLO being collected (at most `META_BYTES_MAX`).
    hello_meta: Option<Vec<u8>>,
}

impl HostStream {
    /// A tracker positioned at the start of a frame.
    pub fn new() -> HostStream {
        HostStream::default()
    }

    /// True when the runtime has been handed part of a frame (headers are
    /// held back until whole, so a partial header does not count).
    pub fn mid_frame(&self) -> bool {
        self.meta_left > 0 || self.body_left > 0
    }

    /// Forgets any partial frame (a new connection starts at a boundary).
    pub fn reset(&mut self) {
        *self = HostStream::default();
    }

    /// Takes bytes from the host. Bytes fit for the runtime are appended to
    /// `out` (a header only once all 16 bytes are in and valid); events are
    /// appended to `events`. After an error nothing more may be fed until
    /// [`HostStream::reset`]; bytes before the bad header were already passed on.
    pub fn feed(
        &mut self,
        mut input: &[u8],
        out: &mut ByteQueue,
        events: &mut Vec<HostEvent>,
    ) -> Result<(), StreamError> {
        while !input.is_empty() {
            if self.meta_left == 0 && self.body_left == 0 {
                let take = (HEADER_BYTES - self.header_have).min(input.len());
                self.header[self.header_have..self.header_have + take]
                    .copy_from_slice(&input[..take]);
                self.header_have += take;
                input = &input[take..];
                if self.header_have == HEADER_BYTES {
                    self.start_frame(out, events)?;
                }
            } else if self.meta_left > 0 {
                let take = self.meta_left.min(input.len());
                out.push(&input[..take]);
                if let Some(meta) = &mut self.hello_meta {
                    meta.extend_from_slice(&input[..take]);
                }
                self.meta_left -= take;
                input = &input[take..];
                if self.meta_left == 0 {
                    self.finish_meta(events);
                }
            } else {
                let take = self.body_left.min(input.len());
                out.push(&input[..take]);
                self.body_left -= take;
                input = &input[take..];
            }
        }
        Ok(())
    }

    fn start_frame(
        &mut self,
        out: &mut ByteQueue,
        events: &mut Vec<HostEvent>,
    ) -> Result<(), StreamError> {
        let h: Header =
            protocol::parse_header(&self.header)?.expect("16 header bytes are buffered");
        match h.kind {
            FrameType::Hello => self.hello_meta = Some(Vec::with_capacity(h.meta_len)),
            FrameType::Invoke if h.request_id == 0 => return Err(StreamError::ZeroRequestId),
            FrameType::Invoke => events.push(HostEvent::Invoke {
                request_id: h.request_id,
            }),
            other => return Err(StreamError::WrongDirection(other)),
        }
        out.push(&self.header);
        self.header_have = 0;
        self.meta_left = h.meta_len;
        self.body_left = h.body_len;
        if self.meta_left == 0 {
            self.finish_meta(events);
        }
        Ok(())
    }

    fn finish_meta(&mut self, events: &mut Vec<HostEvent>) {
        if let Some(meta) = self.hello_meta.take() {
            let seed = (0..4)
                .filter_map(|i| json::top_level_u64(&meta, &format!("seed{i}")))
                .collect();
            events.push(HostEvent::Hello {
                time_ms: json::top_level_u64(&meta, "time_ms"),
                seed,
            });
        }
    }
}

/// Header of the frame at the front of `buf` if all of it is buffered.
/// Frames a runtime may send: READY, INIT_ERROR, RESPONSE, ERROR, LOG, STREAM_*.
pub fn complete_frame(buf: &[u8]) -> Result<Option<Header>, StreamError> {
    let Some(h) = protocol::parse_header(buf)? else {
        return Ok(None);
    };
    if matches!(h.kind, FrameType::Hello | FrameType::Invoke) {
        return Err(StreamError::WrongDirection(h.kind));
    }
    Ok((buf.len() >= h.frame_len()).then_some(h))
}

/// Bytes still missing before the front frame of `buf` is whole (0 when it
/// is, or when the header is unreadable and the caller will hit the error).
pub fn bytes_missing(buf: &[u8]) -> usize {
    match protocol::parse_header(buf) {
        Ok(Some(h)) => h.frame_len().saturating_sub(buf.len()),
        Ok(None) => HEADER_BYTES - buf.len(),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::encode;

    fn host_wire() -> Vec<u8> {
        let mut wire = Vec::new();
        encode(
            &mut wire,
            FrameType::Hello,
            0,
            0,
            br#"{"handler":"x","time_ms":1700000000123}"#,
            b"",
        );
        let body: Vec<u8> = (0..=255u8).collect();
        encode(
            &mut wire,
            FrameType::Invoke,
            0,
            42,
            br#"{"method":"POST"}"#,
            &body,
        );
        encode(&mut wire, FrameType::Invoke, 0, 43, b"", b"");
        wire
    }

    #[test]
    fn host_stream_passes_every_byte_and_reports_events_for_any_split() {
        let wire = host_wire();
        for cut in 0..=wire.len() {
            let mut s = HostStream::new();
            let mut out = ByteQueue::new();
            let mut ev = Vec::new();
            s.feed(&wire[..cut], &mut out, &mut ev).unwrap();
            s.feed(&wire[cut..], &mut out, &mut ev).unwrap();
            assert_eq!(out.as_slice(), &wire[..], "cut at {cut}");
            assert_eq!(
                ev,
                vec![
                    HostEvent::Hello {
                        time_ms: Some(1700000000123),
                        seed: Vec::new(),
                    },
                    HostEvent::Invoke { request_id: 42 },
                    HostEvent::Invoke { request_id: 43 }
                ]
            );
            assert!(!s.mid_frame());
        }
    }

    #[test]
    fn host_stream_holds_back_partial_headers() {
        let wire = host_wire();
        let mut s = HostStream::new();
        let mut out = ByteQueue::new();
        let mut ev = Vec::new();
        s.feed(&wire[..10], &mut out, &mut ev).unwrap();
        assert!(out.is_empty());
        assert!(!s.mid_frame());
        s.feed(&wire[10..20], &mut out, &mut ev).unwrap();
        assert_eq!(out.len(), 16 + 4);
        assert!(s.mid_frame());
    }

    #[test]
    fn host_stream_rejects_bad_headers_without_forwarding_them() {
        let mut wire = Vec::new();
        encode(&mut wire, FrameType::Invoke, 0, 1, b"", b"ok");
        let good = wire.len();
        encode(&mut wire, FrameType::Response, 0, 1, b"", b"");
        let mut s = HostStream::new();
        let mut out = ByteQueue::new();
        let mut ev = Vec::new();
        let err = s.feed(&wire, &mut out, &mut ev).unwrap_err();
        assert_eq!(err, StreamError::WrongDirection(FrameType::Response));
        assert_eq!(out.as_slice(), &wire[..good]);

        let mut s = HostStream::new();
        let err = s
            .feed(
                b"GET / HTTP/1.1\r\nHost: x\r\n",
                &mut ByteQueue::new(),
                &mut ev,
            )
            .unwrap_err();
        assert!(matches!(
            err,
            StreamError::Protocol(ProtocolError::BadMagic(_))
        ));

        let mut zero = Vec::new();
        encode(&mut zero, FrameType::Invoke, 0, 0, b"", b"");
        let mut s = HostStream::new();
        assert_eq!(
            s.feed(&zero, &mut ByteQueue::new(), &mut ev),
            Err(StreamError::ZeroRequestId)
        );
    }

    #[test]
    fn complete_frame_waits_for_the_whole_frame() {
        let mut wire = Vec::new();
        encode(&mut wire, FrameType::Response, 0, 9, b"{}", b"body");
        for cut in 0..wire.len() {
            assert_eq!(complete_frame(&wire[..cut]).unwrap(), None, "cut at {cut}");
            assert_eq!(
                bytes_missing(&wire[..cut]),
                if cut < HEADER_BYTES {
                    HEADER_BYTES - cut
                } else {
                    wire.len() - cut
                }
            );
        }
        let h = complete_frame(&wire).unwrap().unwrap();
        assert_eq!(
            (h.kind, h.request_id, h.frame_len()),
            (FrameType::Response, 9, wire.len())
        );
        let mut hello = Vec::new();
        encode(&mut hello, FrameType::Hello, 0, 0, b"", b"");
        assert_eq!(
            complete_frame(&hello),
            Err(StreamError::WrongDirection(FrameType::Hello))
        );
    }
}
