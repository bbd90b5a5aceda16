//! The on-disk record format of the async event queue, sans I/O: framing with
//! a CRC-32C per record, so a torn or corrupt tail is found on recovery and
//! cut off, and the event and ack payloads.
//!
//! A frame is `[u32 payload length][u32 CRC-32C of the payload][payload]`,
//! little-endian. Segments (`seg-<n>.log`) hold [`EventRecord`]s, their ack
//! files (`seg-<n>.ack`) [`AckRecord`]s and [`RetryRecord`]s (told apart by
//! their length), a segment's cut file (`seg-<n>.cut`) one [`CutRecord`], the
//! failure store JSON documents.

/// Bytes before a frame's payload.
pub const FRAME_HEAD_BYTES: usize = 8;
/// Largest frame payload accepted when reading (an event of 1 MiB plus its header).
pub const FRAME_PAYLOAD_MAX: usize = 2 << 20;

use crate::util::crc::crc32c;

/// Appends one frame holding `payload` to `out`.
pub fn frame(out: &mut Vec<u8>, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c(payload).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Splits `bytes` into frame payloads with their offsets (of the frame head);
/// returns them and the length of the valid prefix. Everything after the
/// first short, oversized or mismatching frame is not trusted.
pub fn frames(bytes: &[u8]) -> (Vec<(usize, &[u8])>, usize) {
    let mut out = Vec::new();
    let mut at = 0;
    while bytes.len() - at >= FRAME_HEAD_BYTES {
        let len = u32::from_le_bytes(bytes[at..at + 4].try_into().expect("4 bytes")) as usize;
        let crc = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().expect("4 bytes"));
        let end = at + FRAME_HEAD_BYTES + len;
        if len > FRAME_PAYLOAD_MAX || end > bytes.len() {
            break;
        }
        let payload = &bytes[at + FRAME_HEAD_BYTES..end];
        if crc32c(payload) != crc {
            break;
        }
        out.push((at, payload));
        at = end;
    }
    (out, at)
}

/// One accepted event as stored in a segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventRecord {
    /// Its number in the queue (unique within the queue's segments).
    pub seq: u64,
    /// When it was accepted, ms since the epoch.
    pub accepted_ms: u64,
    /// The request id answered to the client.
    pub request_id: String,
    /// The version or alias invoked, "" for the unqualified function.
    pub qualifier: String,
    /// The payload as sent.
    pub body: Vec<u8>,
}

impl EventRecord {
    /// The payload of its frame: seq, time, two length-prefixed strings, body.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.accepted_ms.to_le_bytes());
        for s in [&self.request_id, &self.qualifier] {
            assert!(s.len() <= 255, "record string of {} bytes", s.len());
            out.push(s.len() as u8);
            out.extend_from_slice(s.as_bytes());
        }
        out.extend_from_slice(&self.body);
    }

    /// Reads a frame payload written by [`EventRecord::encode`].
    pub fn decode(p: &[u8]) -> Option<EventRecord> {
        let seq = u64::from_le_bytes(p.get(..8)?.try_into().ok()?);
        let accepted_ms = u64::from_le_bytes(p.get(8..16)?.try_into().ok()?);
        let mut at = 16;
        let mut strings = [String::new(), String::new()];
        for s in &mut strings {
            let n = usize::from(*p.get(at)?);
            *s = std::str::from_utf8(p.get(at + 1..at + 1 + n)?)
                .ok()?
                .to_string();
            at += 1 + n;
        }
        let [request_id, qualifier] = strings;
        Some(EventRecord {
            seq,
            accepted_ms,
            request_id,
            qualifier,
            body: p[at..].to_vec(),
        })
    }
}

/// An event done with (run, or given up and kept as failed): never run again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckRecord {
    /// The event's [`EventRecord::seq`].
    pub seq: u64,
}

impl AckRecord {
    /// The payload of its frame.
    pub fn encode(&self) -> [u8; 8] {
        self.seq.to_le_bytes()
    }

    /// Reads a frame payload written by [`AckRecord::encode`].
    pub fn decode(p: &[u8]) -> Option<AckRecord> {
        Some(AckRecord {
            seq: u64::from_le_bytes(p.try_into().ok()?),
        })
    }
}

/// A failed run of an event, to be retried: its attempts so far and when it
/// may run again, so that a restart neither runs it early nor gives it more
/// attempts than its settings allow. The last one of an event counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RetryRecord {
    /// The event's [`EventRecord::seq`].
    pub seq: u64,
    /// Failed runs so far.
    pub attempts: u32,
    /// Not to run before this time, ms since the epoch.
    pub not_before_ms: u64,
}

impl RetryRecord {
    /// Bytes of its frame payload (an [`AckRecord`]'s are 8).
    pub const BYTES: usize = 20;

    /// The payload of its frame.
    pub fn encode(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..8].copy_from_slice(&self.seq.to_le_bytes());
        out[8..12].copy_from_slice(&self.attempts.to_le_bytes());
        out[12..].copy_from_slice(&self.not_before_ms.to_le_bytes());
        out
    }

    /// Reads a frame payload written by [`RetryRecord::encode`].
    pub fn decode(p: &[u8]) -> Option<RetryRecord> {
        let p: &[u8; Self::BYTES] = p.try_into().ok()?;
        Some(RetryRecord {
            seq: u64::from_le_bytes(p[..8].try_into().ok()?),
            attempts: u32::from_le_bytes(p[8..12].try_into().ok()?),
            not_before_ms: u64::from_le_bytes(p[12..].try_into().ok()?),
        })
    }
}

/// Where to cut a segment (`seg-<n>.cut`): an append refused to its client
/// could not be cut back when it failed, so the next start cuts it off
/// before anything runs. It names the refused events, so a record that does
/// not match what lies behind `len` is known as stale.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CutRecord {
    /// The segment's length before the refused append.
    pub len: u64,
    /// The first and last [`EventRecord::seq`] of the refused events in it.
    pub seq_first: u64,
    pub seq_last: u64,
}

impl CutRecord {
    /// Bytes of its frame payload.
    pub const BYTES: usize = 24;

    /// The payload of its frame.
    pub fn encode(&self) -> [u8; Self::BYTES] {
        let mut out = [0u8; Self::BYTES];
        out[..8].copy_from_slice(&self.len.to_le_bytes());
        out[8..16].copy_from_slice(&self.seq_first.to_le_bytes());
        out[16..].copy_from_slice(&self.seq_last.to_le_bytes());
        out
    }

    /// Reads a frame payload written by [`CutRecord::encode`].
    pub fn decode(p: &[u8]) -> Option<CutRecord> {
        let p: &[u8; Self::BYTES] = p.try_into().ok()?;
        Some(CutRecord {
            len: u64::from_le_bytes(p[..8].try_into().ok()?),
            seq_first: u64::from_le_bytes(p[8..16].try_into().ok()?),
            seq_last: u64::from_le_bytes(p[16..].try_into().ok()?),
        })
    }

    /// Whether this record applies to the segment `log` (its valid frames):
    /// `len` is a frame boundary short of its end, and every event behind it
    /// is one of the refused ones.
    pub fn applies_to(&self, log: &[u8]) -> bool {
        let (frames, valid) = frames(log);
        let len = self.len as usize;
        if len >= log.len() || !(len == valid || frames.iter().any(|&(at, _)| at == len)) {
            return false;
        }
        frames.iter().filter(|&&(at, _)| at >= len).all(|(_, p)| {
            EventRecord::decode(p)
                .is_some_and(|e| (self.seq_first..=self.seq_last).contains(&e.seq))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(seq: u64, body: &[u8]) -> EventRecord {
        EventRecord {
            seq,
            accepted_ms: 1_700_000_000_000 + seq,
            request_id: format!("req-{seq}"),
            qualifier: if seq.is_multiple_of(2) {
                "live".into()
            } else {
                String::new()
            },
            body: body.to_vec(),
        }
    }

    #[test]
    fn events_round_trip_through_frames() {
        let mut log = Vec::new();
        let all: Vec<EventRecord> = (1..=3)
            .map(|i| event(i, &vec![b'x'; i as usize * 10]))
            .collect();
        for e in &all {
            let mut p = Vec::new();
            e.encode(&mut p);
            frame(&mut log, &p);
        }
        let (found, valid) = frames(&log);
        assert_eq!(valid, log.len());
        let back: Vec<EventRecord> = found
            .iter()
            .map(|(_, p)| EventRecord::decode(p).unwrap())
            .collect();
        assert_eq!(back, all);
    }

    #[test]
    fn acks_and_retries_are_told_apart_in_an_ack_file() {
        let retry = RetryRecord {
            seq: 7,
            attempts: 2,
            not_before_ms: 1_700_000_060_000,
        };
        let mut file = Vec::new();
        frame(&mut file, &retry.encode());
        frame(&mut file, &AckRecord { seq: 7 }.encode());
        let found = frames(&file).0;
        assert_eq!(RetryRecord::decode(found[0].1), Some(retry));
        assert_eq!(AckRecord::decode(found[0].1), None);
        assert_eq!(AckRecord::decode(found[1].1), Some(AckRecord { seq: 7 }));
        assert_eq!(RetryRecord::decode(found[1].1), None);
    }

    #[test]
    fn a_torn_or_corrupt_tail_is_cut_at_the_last_whole_frame() {
        let mut log = Vec::new();
        for i in 1..=3u64 {
            frame(&mut log, &AckRecord { seq: i }.encode());
        }
        let whole = log.len();
        let one = whole / 3;
        // Every cut inside the last frame keeps the first two.
        for cut in 2 * one..whole {
            let (found, valid) = frames(&log[..cut]);
            assert_eq!((found.len(), valid), (2, 2 * one), "cut at {cut}");
        }
        // A flipped bit in the second frame's payload drops it and what follows.
        let mut bad = log.clone();
        bad[one + FRAME_HEAD_BYTES] ^= 1;
        assert_eq!(frames(&bad).1, one);
        // An absurd length is not trusted either.
        let mut huge = log.clone();
        huge[one..one + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(frames(&huge).1, one);
    }
}
