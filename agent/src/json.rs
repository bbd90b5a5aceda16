//! Just enough JSON for the relay: pull one number out of a HELLO's metadata
//! and write escaped strings, without parsing whole documents on the request
//! path. (The runtime-API mode, which must build and read whole events, uses
//! serde_json.)

/// The value of `key` at the top level of a JSON object when it is a
/// non-negative number (a fraction is truncated). `None` for anything else:
/// missing key, other type, malformed text.
pub fn top_level_u64(json: &[u8], key: &str) -> Option<u64> {
    let mut p = Cursor { s: json, i: 0 };
    p.ws();
    p.eat(b'{')?;
    loop {
        p.ws();
        if p.peek()? == b'}' {
            return None;
        }
        let name = p.string()?;
        p.ws();
        p.eat(b':')?;
        p.ws();
        if name == key.as_bytes() {
            return p.number();
        }
        p.skip_value()?;
        p.ws();
        match p.next()? {
            b',' => continue,
            _ => return None,
        }
    }
}

/// Appends `s` as a JSON string literal, quotes included.
pub fn push_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

struct Cursor<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Cursor<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }

    fn next(&mut self) -> Option<u8> {
        let c = self.peek()?;
        self.i += 1;
        Some(c)
    }

    fn eat(&mut self, want: u8) -> Option<()> {
        (self.next()? == want).then_some(())
    }

    fn ws(&mut self) {
        while matches!(self.peek(), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            self.i += 1;
        }
    }

    /// A string's raw bytes between the quotes (escapes left as written,
    /// which is fine for comparing against plain ASCII keys).
    fn string(&mut self) -> Option<&'a [u8]> {
        self.eat(b'"')?;
        let start = self.i;
        loop {
            match self.next()? {
                b'"' => return Some(&self.s[start..self.i - 1]),
                b'\\' => {
                    self.next()?;
                }
                _ => {}
            }
        }
    }

    fn number(&mut self) -> Option<u64> {
        let start = self.i;
        let mut value: u64 = 0;
        while let Some(c @ b'0'..=b'9') = self.peek() {
            value = value.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
            self.i += 1;
        }
        if self.i == start {
            return None;
        }
        if self.peek() == Some(b'.') {
            self.i += 1;
            while matches!(self.peek(), Some(b'0'..=b'9')) {
                self.i += 1;
            }
        }
        match self.peek() {
            Some(b'e' | b'E') => None,
            _ => Some(value),
        }
    }

    /// Skips one value of any type without recursion.
    fn skip_value(&mut self) -> Option<()> {
        let mut depth = 0usize;
        loop {
            match self.peek()? {
                b'"' => {
                    self.string()?;
                }
                b'{' | b'[' => {
                    depth += 1;
                    self.i += 1;
                }
                b'}' | b']' => {
                    if depth == 0 {
                        return Some(());
                    }
                    depth -= 1;
                    self.i += 1;
                }
                b',' if depth == 0 => return Some(()),
                _ => self.i += 1,
            }
            if depth == 0 && matches!(self.peek(), Some(b',' | b'}' | b']')) {
                return Some(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn time_ms_is_found_at_top_level_only() {
        let meta = br#"{"env":{"time_ms":1},"handler":"a\"time_ms\"","list":[{"x":[1,2]}],"time_ms":1712345678901,"memory_mb":128}"#;
        assert_eq!(top_level_u64(meta, "time_ms"), Some(1712345678901));
        assert_eq!(
            top_level_u64(br#" { "time_ms" : 12.75 } "#, "time_ms"),
            Some(12)
        );
        assert_eq!(
            top_level_u64(br#"{"a":true,"time_ms":5}"#, "time_ms"),
            Some(5)
        );
    }

    #[test]
    fn missing_or_odd_values_give_none() {
        assert_eq!(top_level_u64(b"", "time_ms"), None);
        assert_eq!(top_level_u64(b"{}", "time_ms"), None);
        assert_eq!(top_level_u64(br#"{"time_ms":"5"}"#, "time_ms"), None);
        assert_eq!(top_level_u64(br#"{"time_ms":-5}"#, "time_ms"), None);
        assert_eq!(top_level_u64(br#"{"time_ms":1e3}"#, "time_ms"), None);
        assert_eq!(
            top_level_u64(br#"{"time_ms":99999999999999999999999}"#, "time_ms"),
            None
        );
        assert_eq!(top_level_u64(br#"{"x":{"time_ms":5}"#, "time_ms"), None);
        assert_eq!(top_level_u64(b"[1,2]", "time_ms"), None);
    }

    #[test]
    fn strings_are_escaped() {
        let mut s = String::new();
        push_string(&mut s, "a\"b\\c\nd\u{1}é");
        assert_eq!(s, r#""a\"b\\c\nd\u0001é""#);
    }
}
