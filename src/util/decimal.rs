//! Unsigned integers as ASCII decimal digits without the formatting
//! machinery: for numbers written on every request (status codes, lengths,
//! deadlines), where `format!` showed up in instruction counts.

/// The digits of one number, held inline.
pub struct Decimal {
    buf: [u8; 20],
    start: usize,
}

impl Decimal {
    /// The digits.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// `n` in decimal (u64::MAX has 20 digits).
pub fn decimal(mut n: u64) -> Decimal {
    let mut buf = [0u8; 20];
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    Decimal { buf, start: i }
}

#[cfg(test)]
mod tests {
    use super::decimal;

    #[test]
    fn numbers_are_their_decimal_digits() {
        for n in [0, 7, 10, 200, 1_764_547_200_123, u64::MAX] {
            assert_eq!(decimal(n).as_bytes(), n.to_string().as_bytes());
        }
    }
}
