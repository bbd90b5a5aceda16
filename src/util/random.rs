//! Random bits from the kernel (`getrandom(2)`): function ids, tokens, seeds for the guest and
//! the scheduler. Not for hot paths: each call is a system call.

use std::io;

/// Fills `buf` with random bytes, retrying short reads and interruptions.
pub fn fill(buf: &mut [u8]) -> io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: the pointer and length describe `rest`, which outlives the call.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n as usize;
    }
    Ok(())
}

/// 64 random bits. Panics if the kernel cannot provide them (it always can from Linux 3.17
/// once its pool is initialised).
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    if let Err(e) = fill(&mut b) {
        panic!("getrandom failed: {e}");
    }
    u64::from_ne_bytes(b)
}

/// `bytes` random bytes as lower-case hex (`2 * bytes` digits). Panics like [`random_u64`].
pub fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    if let Err(e) = fill(&mut b) {
        panic!("getrandom failed: {e}");
    }
    super::hex::encode(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_hex_has_two_digits_per_byte_and_differs_between_calls() {
        for bytes in [0, 1, 7, 8, 9, 32, 300] {
            let h = random_hex(bytes);
            assert_eq!(h.len(), 2 * bytes);
            assert!(h
                .bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c)));
        }
        assert_ne!(random_hex(16), random_hex(16));
        assert_ne!(random_u64(), random_u64());
    }

    #[test]
    fn fill_writes_to_the_end_of_the_buffer() {
        let mut buf = vec![0u8; 4096];
        fill(&mut buf).unwrap();
        assert!(buf[buf.len() - 64..].iter().any(|&b| b != 0));
    }
}
