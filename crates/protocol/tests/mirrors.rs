//! The protocol is written down three times: this crate, the C header for runtime authors
//! (`include/hearth_protocol.h`) and the Node.js shim (`include/runtime/bootstrap.js`). These
//! tests read the other two as text and check that magic, header layout, frame type numbers,
//! flags and limits agree with the crate's constants.

use std::collections::BTreeMap;
use std::path::Path;

use hearth_protocol::{
    encode, FrameType, BODY_BYTES_MAX, HEADER_BYTES, IDLE_FRAME_BYTES_MAX, INVOKE_META_FIELDS,
    LOG_STDERR, MAGIC, META_BYTES_MAX, STREAM_BYTES_MAX, STREAM_CHUNK_BYTES_MAX, VERSION,
};

fn read_repo_file(relative: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(relative);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

/// Removes `/* ... */` and `// ...` comments (C text without such sequences in strings).
fn strip_comments(text: &str) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find("/*") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find("*/").expect("unterminated comment");
        rest = &rest[i + end + 2..];
    }
    out.push_str(rest);
    out.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Evaluates the integer expressions these files use: `16`, `0x4854u`, `(8u << 20)`.
fn eval(expr: &str) -> u64 {
    let expr = expr.trim().trim_start_matches('(').trim_end_matches(')');
    let number = |s: &str| {
        let s = s.trim().trim_end_matches(['u', 'U']);
        match s.strip_prefix("0x") {
            Some(hex) => u64::from_str_radix(hex, 16),
            None => s.parse(),
        }
        .unwrap_or_else(|e| panic!("{s:?} is not a number: {e}"))
    };
    match expr.split_once("<<") {
        Some((value, shift)) => number(value) << number(shift),
        None => number(expr),
    }
}

/// `InitError` -> `INIT_ERROR`.
fn screaming_snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

/// Every frame type the crate knows, by its upper-case name.
fn crate_frame_types() -> BTreeMap<String, u64> {
    (0..=u8::MAX)
        .filter_map(FrameType::from_u8)
        .map(|t| (screaming_snake(&format!("{t:?}")), u64::from(t as u8)))
        .collect()
}

/// The header's `#define NAME value` lines.
fn c_defines(header: &str) -> BTreeMap<String, u64> {
    header
        .lines()
        .filter_map(|l| l.trim().strip_prefix("#define "))
        .filter_map(|l| l.split_once(char::is_whitespace))
        .map(|(name, value)| (name.to_string(), eval(value)))
        .collect()
}

/// The body of `<keyword> <name> { ... }` in the header.
fn c_block<'a>(header: &'a str, opening: &str) -> &'a str {
    let start = header
        .find(opening)
        .unwrap_or_else(|| panic!("no `{opening}`"));
    let body = &header[start..];
    let open = body.find('{').expect("block opens");
    let close = body.find('}').expect("block closes");
    &body[open + 1..close]
}

#[test]
fn c_header_agrees_with_the_crate() {
    let header = strip_comments(&read_repo_file("include/hearth_protocol.h"));
    let defines = c_defines(&header);
    let define = |name: &str| {
        *defines
            .get(name)
            .unwrap_or_else(|| panic!("no #define {name}"))
    };
    assert_eq!(
        define("HEARTH_PROTO_MAGIC"),
        u64::from(MAGIC),
        "HEARTH_PROTO_MAGIC"
    );
    assert_eq!(
        define("HEARTH_PROTO_VERSION"),
        u64::from(VERSION),
        "HEARTH_PROTO_VERSION"
    );
    assert_eq!(
        define("HEARTH_META_MAX"),
        META_BYTES_MAX as u64,
        "HEARTH_META_MAX"
    );
    assert_eq!(
        define("HEARTH_BODY_MAX"),
        BODY_BYTES_MAX as u64,
        "HEARTH_BODY_MAX"
    );
    assert_eq!(
        define("HEARTH_STREAM_CHUNK_MAX"),
        STREAM_CHUNK_BYTES_MAX as u64,
        "HEARTH_STREAM_CHUNK_MAX"
    );
    assert_eq!(
        define("HEARTH_STREAM_MAX"),
        STREAM_BYTES_MAX as u64,
        "HEARTH_STREAM_MAX"
    );
    assert_eq!(
        define("HEARTH_IDLE_FRAME_MAX"),
        IDLE_FRAME_BYTES_MAX as u64,
        "HEARTH_IDLE_FRAME_MAX"
    );
    assert_eq!(
        define("HEARTH_LOG_STDERR"),
        u64::from(LOG_STDERR),
        "HEARTH_LOG_STDERR"
    );

    let c_types: BTreeMap<String, u64> = c_block(&header, "enum hearth_frame_type")
        .split(',')
        .filter_map(|entry| entry.split_once('='))
        .map(|(name, value)| {
            let name = name.trim();
            let name = name.strip_prefix("HEARTH_").unwrap_or(name);
            (name.to_string(), eval(value))
        })
        .collect();
    assert_eq!(c_types, crate_frame_types(), "enum hearth_frame_type");

    // The header struct: its fields in order, at the offsets `encode` writes them.
    let mut offsets = BTreeMap::new();
    let mut offset = 0;
    for field in c_block(&header, "struct hearth_frame_header").split(';') {
        let Some((ty, name)) = field.trim().split_once(char::is_whitespace) else {
            continue;
        };
        let size = match ty {
            "uint8_t" => 1,
            "uint16_t" => 2,
            "uint32_t" => 4,
            other => panic!("unexpected field type {other}"),
        };
        assert_eq!(offset % size, 0, "{name} is not naturally aligned");
        offsets.insert(name.trim().to_string(), (offset, size));
        offset += size;
    }
    assert_eq!(offset, HEADER_BYTES, "size of struct hearth_frame_header");

    let mut wire = Vec::new();
    encode(
        &mut wire,
        FrameType::Log,
        0xa5,
        0x0403_0201,
        b"meta",
        b"body!",
    );
    let field = |name: &str| {
        let (at, size) = offsets[name];
        let mut le = [0u8; 8];
        le[..size].copy_from_slice(&wire[at..at + size]);
        u64::from_le_bytes(le)
    };
    assert_eq!(field("magic"), u64::from(MAGIC));
    assert_eq!(field("type"), FrameType::Log as u64);
    assert_eq!(field("flags"), 0xa5);
    assert_eq!(field("request_id"), 0x0403_0201);
    assert_eq!(field("meta_len"), 4);
    assert_eq!(field("body_len"), 5);
}

#[test]
fn node_shim_agrees_with_the_crate() {
    // Line by line: the shim's strings hold `/*` (e.g. `*/*`), so no block-comment stripping.
    let shim = read_repo_file("include/runtime/bootstrap.js");
    let consts: BTreeMap<String, String> = shim
        .lines()
        .filter_map(|l| l.split("//").next()?.trim().strip_prefix("const "))
        .filter_map(|l| l.split_once('='))
        .map(|(name, value)| {
            let value = value.trim().trim_end_matches(';');
            (name.trim().to_string(), value.to_string())
        })
        .collect();
    let constant = |name: &str| {
        eval(
            consts
                .get(name)
                .unwrap_or_else(|| panic!("no const {name} in the shim")),
        )
    };
    assert_eq!(constant("MAGIC"), u64::from(MAGIC), "MAGIC in the shim");
    assert_eq!(
        constant("HEADER_LEN"),
        HEADER_BYTES as u64,
        "HEADER_LEN in the shim"
    );
    assert_eq!(
        constant("META_MAX"),
        META_BYTES_MAX as u64,
        "META_MAX in the shim"
    );
    assert_eq!(
        constant("BODY_MAX"),
        BODY_BYTES_MAX as u64,
        "BODY_MAX in the shim"
    );
    assert_eq!(
        constant("STREAM_CHUNK_MAX"),
        STREAM_CHUNK_BYTES_MAX as u64,
        "STREAM_CHUNK_MAX in the shim"
    );
    assert_eq!(
        constant("STREAM_MAX"),
        STREAM_BYTES_MAX as u64,
        "STREAM_MAX in the shim"
    );
    assert_eq!(
        constant("LOG_STDERR"),
        u64::from(LOG_STDERR),
        "LOG_STDERR in the shim"
    );

    let js_types: BTreeMap<String, u64> = consts
        .keys()
        .filter_map(|name| Some((name.strip_prefix("T_")?.to_string(), constant(name))))
        .collect();
    assert_eq!(js_types, crate_frame_types(), "T_* in the shim");
}

/// The shim reads the INVOKE metadata's positional form by index (`namedInvokeMeta`):
/// each field's index there is its place in [`INVOKE_META_FIELDS`], and the C header
/// lists them in that order.
#[test]
fn shim_and_header_read_the_invoke_metadata_in_the_crates_order() {
    let shim = read_repo_file("include/runtime/bootstrap.js");
    let body = shim
        .split("function namedInvokeMeta(a) {")
        .nth(1)
        .expect("namedInvokeMeta in the shim");
    let body = &body[..body.find("\n}").expect("end of namedInvokeMeta")];
    let mut seen = Vec::new();
    for line in body.lines() {
        let Some((name, rest)) = line.trim().split_once(": a[") else {
            continue;
        };
        let index: usize = rest[..rest.find(']').unwrap()].parse().unwrap();
        assert_eq!(INVOKE_META_FIELDS.get(index), Some(&name), "{line}");
        seen.push(index);
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..INVOKE_META_FIELDS.len()).collect::<Vec<_>>());
    let header = read_repo_file("include/hearth_protocol.h");
    let doc = header
        .split("HEARTH_INVOKE = 2,")
        .nth(1)
        .expect("INVOKE in the header");
    let doc = &doc[doc.find('[').unwrap()..doc.find("]:").unwrap()];
    let listed: Vec<String> = doc
        .replace("[[k,v],...]", "headers")
        .trim_start_matches('[')
        .split(',')
        .map(|f| f.trim().to_string())
        .collect();
    assert_eq!(listed, INVOKE_META_FIELDS);
}
