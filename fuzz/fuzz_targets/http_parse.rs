//! Fuzzes the HTTP/1.1 head parser and body decoder with arbitrary bytes.
//!
//! Beyond "never panics", it checks the promises the connection code relies on: counts never
//! exceed the input, a strict prefix of an accepted head needs more bytes, and a body decodes
//! to the same bytes and verdict whether fed at once or in small steps.
#![no_main]

use hearth::http::parse::{parse_head, BodyDecoder, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    // The first byte picks the limits and the step for incremental feeding, so that limit
    // paths and split inputs are reached as well.
    let Some((&knob, data)) = input.split_first() else {
        return;
    };
    let limits = if knob & 1 == 0 {
        Limits::default()
    } else {
        Limits {
            head_bytes_max: 256,
            headers_max: 4,
            body_bytes_max: 512,
        }
    };
    let step = usize::from(knob >> 1) + 1;

    let Ok(Some((req, head_len))) = parse_head(data, &limits) else {
        return;
    };
    assert!(
        head_len > 0 && head_len <= data.len(),
        "head length {head_len} of {}",
        data.len()
    );
    assert_eq!(
        parse_head(&data[..head_len - 1], &limits),
        Ok(None),
        "strict prefix of a head"
    );
    assert_eq!(
        parse_head(&data[..head_len], &limits),
        Ok(Some((req.clone(), head_len)))
    );

    let rest = &data[head_len..];
    let Ok(mut at_once) = BodyDecoder::new(req.body, &limits) else {
        return;
    };
    let mut in_steps = at_once.clone();

    let mut body_at_once = Vec::new();
    let verdict_at_once = at_once.feed(rest, &mut body_at_once);
    if let Ok((consumed, done)) = verdict_at_once {
        assert!(consumed <= rest.len());
        assert!(
            done || consumed == rest.len(),
            "unfinished body left input unconsumed"
        );
    }

    let mut body_in_steps = Vec::new();
    let mut at = 0;
    let verdict_in_steps = loop {
        let end = (at + step).min(rest.len());
        match in_steps.feed(&rest[at..end], &mut body_in_steps) {
            Ok((consumed, done)) => {
                assert!(consumed <= end - at);
                assert!(done || consumed == end - at);
                at += consumed;
                if done || end == rest.len() {
                    break Ok((at, done));
                }
            }
            Err(err) => break Err(err),
        }
    };

    assert_eq!(verdict_in_steps, verdict_at_once);
    if verdict_at_once.is_ok() {
        assert_eq!(body_in_steps, body_at_once);
    }
});
