//! AWS event-stream framing (`application/vnd.amazon.eventstream`), the
//! binary message format of the Lambda service API's
//! `InvokeWithResponseStream` answers: each message is a prelude (total
//! length, headers length, CRC32 of those 8 bytes), typed headers, a payload
//! and a CRC32 of everything before it, all integers big-endian.
//!
//! Only what hearth sends is written: events with string headers. A leaf,
//! pure and allocation-bounded by its input.

/// Content type of an event-stream HTTP body.
pub const CONTENT_TYPE: &str = "application/vnd.amazon.eventstream";
/// Header value type 7: a string (u16 length, UTF-8 bytes).
const TYPE_STRING: u8 = 7;
/// Prelude bytes: total length, headers length, prelude CRC.
const PRELUDE_BYTES: usize = 12;

/// One event message `event_type` with a payload of `content_type`.
pub fn event(event_type: &str, content_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut headers = Vec::with_capacity(64);
    for (name, value) in [
        (":event-type", event_type),
        (":content-type", content_type),
        (":message-type", "event"),
    ] {
        headers.push(name.len() as u8);
        headers.extend_from_slice(name.as_bytes());
        headers.push(TYPE_STRING);
        headers.extend_from_slice(&(value.len() as u16).to_be_bytes());
        headers.extend_from_slice(value.as_bytes());
    }
    let total = PRELUDE_BYTES + headers.len() + payload.len() + 4;
    let mut out = Vec::with_capacity(total);
    out.extend_from_slice(&(total as u32).to_be_bytes());
    out.extend_from_slice(&(headers.len() as u32).to_be_bytes());
    let prelude_crc = crc32(&out);
    out.extend_from_slice(&prelude_crc.to_be_bytes());
    out.extend_from_slice(&headers);
    out.extend_from_slice(payload);
    let message_crc = crc32(&out);
    out.extend_from_slice(&message_crc.to_be_bytes());
    out
}

/// A `PayloadChunk` event: the next bytes the function streamed.
pub fn payload_chunk(bytes: &[u8]) -> Vec<u8> {
    event("PayloadChunk", "application/octet-stream", bytes)
}

/// The `InvokeComplete` event that ends the stream: `error` is the error code
/// and details of a failed invocation, `log_result` the base64 log tail.
pub fn invoke_complete(error: Option<(&str, &str)>, log_result: Option<&str>) -> Vec<u8> {
    let mut v = serde_json::Map::new();
    if let Some((code, details)) = error {
        v.insert("ErrorCode".into(), code.into());
        v.insert("ErrorDetails".into(), details.into());
    }
    if let Some(log) = log_result {
        v.insert("LogResult".into(), log.into());
    }
    let payload = serde_json::Value::Object(v).to_string();
    event("InvokeComplete", "application/json", payload.as_bytes())
}

use crate::util::crc::crc32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_carry_lengths_crcs_and_headers() {
        let m = payload_chunk(b"hello");
        let u32_at = |i: usize| u32::from_be_bytes(m[i..i + 4].try_into().unwrap());
        assert_eq!(u32_at(0) as usize, m.len());
        assert_eq!(u32_at(8), crc32(&m[..8]));
        let headers_len = u32_at(4) as usize;
        let end = m.len() - 4;
        assert_eq!(u32_at(end), crc32(&m[..end]));
        assert_eq!(&m[PRELUDE_BYTES + headers_len..end], b"hello");
        let headers = &m[PRELUDE_BYTES..PRELUDE_BYTES + headers_len];
        assert_eq!(headers[0] as usize, ":event-type".len());
        assert_eq!(&headers[1..12], b":event-type");
        assert_eq!(headers[12], TYPE_STRING);
        assert_eq!(&headers[15..27], b"PayloadChunk");
        let done = invoke_complete(Some(("Unhandled", "boom")), None);
        let text = String::from_utf8_lossy(&done);
        assert!(text.contains(r#"{"ErrorCode":"Unhandled","ErrorDetails":"boom"}"#));
    }
}
