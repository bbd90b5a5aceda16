//! Table-driven CRC-32 checksums, reflected form: CRC-32 (the zlib/ISO-HDLC one, used by
//! AWS event-stream framing) and CRC-32C (Castagnoli, used by the async event log).

/// The 256-entry lookup table of a reflected CRC-32 with polynomial `poly`, built at compile time.
const fn table(poly: u32) -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { poly ^ (c >> 1) } else { c >> 1 };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

const CRC32: [u32; 256] = table(0xEDB8_8320);
const CRC32C: [u32; 256] = table(0x82F6_3B78);

fn run(table: &[u32; 256], bytes: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in bytes {
        c = table[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
    }
    !c
}

/// The CRC-32 (ISO-HDLC, as zlib computes it) of `bytes`.
pub fn crc32(bytes: &[u8]) -> u32 {
    run(&CRC32, bytes)
}

/// The CRC-32C (Castagnoli) of `bytes`.
pub fn crc32c(bytes: &[u8]) -> u32 {
    run(&CRC32C, bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_match_their_standard_check_values() {
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32c(b""), 0);
    }
}
