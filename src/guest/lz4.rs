//! A decoder for the LZ4 "legacy" stream format, the one Linux uses for an
//! LZ4-compressed kernel payload (`CONFIG_KERNEL_LZ4`).
//!
//! Layout: the magic `0x184C2102` (little-endian), then blocks, each a
//! little-endian `u32` compressed size followed by an independent LZ4 block
//! that expands to at most 8 MiB. The magic may appear again between blocks
//! (concatenated streams). Sans-IO: bytes in, bytes out.

use std::fmt;

/// First four bytes of a legacy stream.
pub const LEGACY_MAGIC: u32 = 0x184C_2102;
/// Largest decompressed size of one legacy block.
pub const BLOCK_BYTES_MAX: usize = 8 << 20;

/// Why a stream could not be decoded.
#[derive(Debug, PartialEq, Eq)]
pub enum Lz4Error {
    /// The stream does not start with [`LEGACY_MAGIC`].
    BadMagic(u32),
    /// A block header or block runs past the end of the input.
    Truncated { at: usize },
    /// A match points before the start of its block (or has offset 0).
    BadOffset { at: usize, offset: usize },
    /// The output would exceed the caller's limit.
    TooLarge { limit: usize },
}

impl fmt::Display for Lz4Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Lz4Error::BadMagic(m) => write!(
                f,
                "not an LZ4 legacy stream (magic {m:#010x}, expected {LEGACY_MAGIC:#010x})"
            ),
            Lz4Error::Truncated { at } => write!(f, "LZ4 stream truncated at byte {at}"),
            Lz4Error::BadOffset { at, offset } => {
                write!(f, "LZ4 match at byte {at} has invalid offset {offset}")
            }
            Lz4Error::TooLarge { limit } => {
                write!(f, "LZ4 output exceeds the limit of {limit} bytes")
            }
        }
    }
}

impl std::error::Error for Lz4Error {}

/// Decodes a whole legacy stream; the output may not exceed `out_bytes_max`.
pub fn decode_legacy(input: &[u8], out_bytes_max: usize) -> Result<Vec<u8>, Lz4Error> {
    let magic = read_u32(input, 0).ok_or(Lz4Error::Truncated { at: 0 })?;
    if magic != LEGACY_MAGIC {
        return Err(Lz4Error::BadMagic(magic));
    }
    let mut out = Vec::new();
    let mut at = 4;
    while at < input.len() {
        let size = read_u32(input, at).ok_or(Lz4Error::Truncated { at })?;
        at += 4;
        if size == LEGACY_MAGIC {
            continue;
        }
        let end = at
            .checked_add(size as usize)
            .filter(|&e| e <= input.len())
            .ok_or(Lz4Error::Truncated { at })?;
        let block_limit = (out.len() + BLOCK_BYTES_MAX).min(out_bytes_max);
        decode_block(&input[at..end], at, &mut out, block_limit, out_bytes_max)?;
        at = end;
    }
    Ok(out)
}

fn read_u32(b: &[u8], at: usize) -> Option<u32> {
    let bytes = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_le_bytes(bytes.try_into().expect("4 bytes")))
}

/// Appends one independent block to `out`. `base` is the block's position in
/// the stream (for error messages).
fn decode_block(
    block: &[u8],
    base: usize,
    out: &mut Vec<u8>,
    limit: usize,
    out_bytes_max: usize,
) -> Result<(), Lz4Error> {
    let start = out.len();
    let mut i = 0;
    let truncated = |i: usize| Lz4Error::Truncated { at: base + i };
    let too_large = Lz4Error::TooLarge {
        limit: out_bytes_max,
    };
    while i < block.len() {
        let token = block[i];
        i += 1;
        let mut literals = usize::from(token >> 4);
        if literals == 15 {
            literals += extended_length(block, &mut i).ok_or_else(|| truncated(i))?;
        }
        let lit_end = i.checked_add(literals).ok_or_else(|| truncated(i))?;
        let lit = block.get(i..lit_end).ok_or_else(|| truncated(i))?;
        if out.len() + lit.len() > limit {
            return Err(too_large);
        }
        out.extend_from_slice(lit);
        i = lit_end;
        if i == block.len() {
            break; // the last sequence has literals only
        }
        let off_bytes = block.get(i..i + 2).ok_or_else(|| truncated(i))?;
        let offset = usize::from(u16::from_le_bytes([off_bytes[0], off_bytes[1]]));
        if offset == 0 || offset > out.len() - start {
            return Err(Lz4Error::BadOffset {
                at: base + i,
                offset,
            });
        }
        i += 2;
        let mut len = usize::from(token & 15);
        if len == 15 {
            len += extended_length(block, &mut i).ok_or_else(|| truncated(i))?;
        }
        len += 4;
        if out.len() + len > limit {
            return Err(too_large);
        }
        let from = out.len() - offset;
        if offset >= len {
            out.extend_from_within(from..from + len);
        } else {
            // Overlapping copy: the match repeats bytes it is producing.
            for k in 0..len {
                let b = out[from + k];
                out.push(b);
            }
        }
    }
    Ok(())
}

/// Reads the 255-continued extra length that follows a nibble of 15.
fn extended_length(block: &[u8], i: &mut usize) -> Option<usize> {
    let mut n = 0usize;
    loop {
        let b = *block.get(*i)?;
        *i += 1;
        n = n.checked_add(usize::from(b))?;
        if b != 255 {
            return Some(n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream(blocks: &[&[u8]]) -> Vec<u8> {
        let mut s = LEGACY_MAGIC.to_le_bytes().to_vec();
        for b in blocks {
            s.extend_from_slice(&(b.len() as u32).to_le_bytes());
            s.extend_from_slice(b);
        }
        s
    }

    #[test]
    fn literals_and_overlapping_matches_decode() {
        // "abc", then a match of 9 at offset 3 ("abcabcabc"), then literal "!".
        let block: &[u8] = &[0x35, b'a', b'b', b'c', 3, 0, 0x10, b'!'];
        let out = decode_legacy(&stream(&[block]), 1 << 20).unwrap();
        assert_eq!(out, b"abcabcabcabc!");
    }

    #[test]
    fn long_lengths_use_continuation_bytes() {
        // 15 + 255 + 10 = 280 literal 'x' bytes, then a match of 15+4+1 = 20 at offset 1.
        let mut block = vec![0xFF, 255, 10];
        block.extend(std::iter::repeat_n(b'x', 280));
        block.extend_from_slice(&[1, 0, 1, 0x00]);
        let out = decode_legacy(&stream(&[&block]), 1 << 20).unwrap();
        assert_eq!(out.len(), 300);
        assert!(out.iter().all(|&b| b == b'x'));
    }

    #[test]
    fn blocks_are_independent_and_repeated_magic_is_skipped() {
        let a: &[u8] = &[0x20, b'h', b'i'];
        let mut s = stream(&[a]);
        s.extend_from_slice(&LEGACY_MAGIC.to_le_bytes());
        s.extend_from_slice(&3u32.to_le_bytes());
        s.extend_from_slice(a);
        assert_eq!(decode_legacy(&s, 100).unwrap(), b"hihi");
        // A match reaching back into the previous block is invalid.
        let b: &[u8] = &[0x10, b'z', 3, 0, 0x00];
        let err = decode_legacy(&stream(&[a, b]), 100).unwrap_err();
        assert!(
            matches!(err, Lz4Error::BadOffset { offset: 3, .. }),
            "{err}"
        );
    }

    #[test]
    fn bad_input_is_reported_not_panicked_on() {
        assert_eq!(
            decode_legacy(b"\x04\x22\x4d\x18", 10),
            Err(Lz4Error::BadMagic(0x184D_2204))
        );
        let truncated = stream(&[&[0x50, b'a']]);
        assert!(matches!(
            decode_legacy(&truncated, 10),
            Err(Lz4Error::Truncated { .. })
        ));
        let mut s = LEGACY_MAGIC.to_le_bytes().to_vec();
        s.extend_from_slice(&100u32.to_le_bytes());
        assert!(matches!(
            decode_legacy(&s, 10),
            Err(Lz4Error::Truncated { .. })
        ));
        let big: &[u8] = &[0x1F, b'a', 1, 0, 255, 255, 0];
        assert_eq!(
            decode_legacy(&stream(&[big]), 64),
            Err(Lz4Error::TooLarge { limit: 64 })
        );
    }
}
