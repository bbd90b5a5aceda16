//! Fuzzes the frame decoders on both ends of the host <-> guest channel: hearth's
//! `protocol::FrameDecoder` and the guest agent's `HostStream` / `complete_frame` (compiled
//! from the agent's sources, as its own build does).
//!
//! The input is a stream fed in steps chosen by its first byte. Checks: no panic, no frame
//! over the limits, no more bytes yielded or passed on than came in, the decoder never holds
//! more than one frame's worth of bytes without a verdict, and frames that decoded re-encode to
//! the bytes they came from.
#![no_main]

use hearth::protocol::{encode, FrameDecoder, BODY_BYTES_MAX, HEADER_BYTES, META_BYTES_MAX};
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../agent/src/buf.rs"]
mod buf;
#[allow(dead_code)]
#[path = "../../agent/src/frames.rs"]
mod frames;
#[allow(dead_code)]
#[path = "../../agent/src/json.rs"]
mod json;
#[allow(dead_code)]
#[path = "../../agent/src/sys.rs"]
mod sys;
mod protocol {
    pub use hearth::protocol::*;
}

const FRAME_BYTES_MAX: usize = HEADER_BYTES + META_BYTES_MAX + BODY_BYTES_MAX;

fuzz_target!(|input: &[u8]| {
    let Some((&knob, stream)) = input.split_first() else {
        return;
    };
    let step = usize::from(knob % 32) + 1;

    // hearth's decoder, fed in steps; what it yields re-encodes to a prefix of the stream.
    let mut decoder = FrameDecoder::new();
    let mut reencoded = Vec::new();
    'feed: for piece in stream.chunks(step) {
        if knob & 0x80 == 0 {
            decoder.push(piece);
        } else {
            let want = piece.len() + 3;
            decoder.spare(want)[..piece.len()].copy_from_slice(piece);
            decoder.filled(want, piece.len());
        }
        loop {
            match decoder.next_frame() {
                Ok(Some(f)) => {
                    assert!(f.meta.len() <= META_BYTES_MAX && f.body.len() <= BODY_BYTES_MAX);
                    encode(
                        &mut reencoded,
                        f.kind,
                        f.flags,
                        f.request_id,
                        &f.meta,
                        &f.body,
                    );
                }
                Ok(None) => break,
                Err(_) => break 'feed,
            }
        }
        assert!(decoder.pending() < FRAME_BYTES_MAX);
    }
    assert!(
        stream.starts_with(&reencoded),
        "frames re-encode to the stream"
    );

    // The agent's host-stream tracker: passes on at most what came in, headers only whole.
    let mut host = frames::HostStream::new();
    let mut out = buf::ByteQueue::new();
    let mut events = Vec::new();
    let mut fed = 0;
    for piece in stream.chunks(step) {
        let result = host.feed(piece, &mut out, &mut events);
        fed += piece.len();
        assert!(out.len() <= fed);
        if result.is_err() {
            break;
        }
    }
    assert!(out.is_empty() || out.len() >= HEADER_BYTES);
    assert!(
        stream.starts_with(out.as_slice()),
        "the agent passes bytes on unchanged"
    );

    // The agent's runtime-side framing: complete only when whole.
    if let Ok(Some(h)) = frames::complete_frame(stream) {
        assert!(h.frame_len() <= stream.len());
    }
    assert!(frames::bytes_missing(stream) <= FRAME_BYTES_MAX);
    let _ = json::top_level_u64(stream, "time_ms");
});
