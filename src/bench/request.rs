//! The requests `hearth bench` sends: read from flags or a list file and
//! serialised once, before the run, into the exact bytes written per request.

use std::path::Path;

use super::args::Target;

/// Largest request body (from `-d`, `--body-file` or a list file), bytes.
pub const BODY_BYTES_MAX: usize = 64 << 20;
/// Most requests in a `--requests-file`.
pub const LIST_REQUESTS_MAX: usize = 10_000;
/// Most `-H` headers.
pub const HEADERS_MAX: usize = 100;

/// One request as the user described it.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestSpec {
    pub method: String,
    /// Path and query; `None` means the URL's.
    pub path: Option<String>,
    pub body: Vec<u8>,
}

/// A request ready to write.
#[derive(Debug, Clone)]
pub struct Raw {
    /// Head and body, as sent.
    pub bytes: Vec<u8>,
    /// HEAD requests get answers without a body whatever their headers say.
    pub is_head: bool,
}

/// Checks a method token (letters only, as HTTP methods are).
pub fn check_method(m: &str) -> Result<String, String> {
    if m.is_empty() || m.len() > 32 || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(format!("{m:?} is not an HTTP method"));
    }
    Ok(m.to_ascii_uppercase())
}

/// Parses `-H "Name: value"` flags.
pub fn parse_headers(raw: &[String]) -> Result<Vec<(String, String)>, String> {
    if raw.len() > HEADERS_MAX {
        return Err(format!("at most {HEADERS_MAX} -H headers"));
    }
    raw.iter()
        .map(|h| {
            let (name, value) = h
                .split_once(':')
                .ok_or_else(|| format!("header {h:?}: expected \"Name: value\""))?;
            let name = name.trim();
            let value = value.trim();
            if name.is_empty()
                || !name.bytes().all(|b| b.is_ascii_graphic() && b != b':')
                || value.bytes().any(|b| b == b'\r' || b == b'\n')
            {
                return Err(format!("header {h:?} is not a valid header line"));
            }
            Ok((name.to_string(), value.to_string()))
        })
        .collect()
}

/// Reads a body file, bounded by [`BODY_BYTES_MAX`].
pub fn read_body(path: &Path) -> Result<Vec<u8>, String> {
    let len = std::fs::metadata(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        .len();
    if len > BODY_BYTES_MAX as u64 {
        return Err(format!(
            "{} is {len} bytes; bodies are limited to {BODY_BYTES_MAX}",
            path.display()
        ));
    }
    std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

/// Reads a request list: "METHOD /path [@body-file | body text]" a line.
/// Body files are relative to the list's directory.
pub fn read_list(path: &Path) -> Result<Vec<RequestSpec>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let specs = parse_list(&text, |file| read_body(&dir.join(file)))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if specs.is_empty() {
        return Err(format!("{} lists no request", path.display()));
    }
    Ok(specs)
}

/// Parses the text of a request list; `load` reads `@file` bodies.
pub fn parse_list(
    text: &str,
    mut load: impl FnMut(&str) -> Result<Vec<u8>, String>,
) -> Result<Vec<RequestSpec>, String> {
    let mut specs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if specs.len() == LIST_REQUESTS_MAX {
            return Err(format!("more than {LIST_REQUESTS_MAX} requests"));
        }
        let mut parts = line.splitn(3, ' ');
        let method =
            check_method(parts.next().unwrap_or("")).map_err(|e| format!("line {}: {e}", n + 1))?;
        let path = parts
            .next()
            .filter(|p| p.starts_with('/'))
            .ok_or_else(|| format!("line {}: expected \"METHOD /path [body]\"", n + 1))?;
        let body = match parts.next().map(str::trim) {
            Some(b) if b.starts_with('@') => load(&b[1..])?,
            Some(b) => b.as_bytes().to_vec(),
            None => Vec::new(),
        };
        specs.push(RequestSpec {
            method,
            path: Some(path.to_string()),
            body,
        });
    }
    Ok(specs)
}

/// Serialises a request: request line, `Host` (unless given), the headers,
/// `Content-Length` when there is a body or the method usually carries one.
pub fn serialise(spec: &RequestSpec, target: &Target, headers: &[(String, String)]) -> Raw {
    let path = spec.path.as_deref().unwrap_or(&target.path);
    let mut head = format!("{} {path} HTTP/1.1\r\n", spec.method);
    let has = |name: &str| headers.iter().any(|(k, _)| k.eq_ignore_ascii_case(name));
    if !has("host") {
        head.push_str(&format!("Host: {}\r\n", target.host));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    let carries_body = matches!(spec.method.as_str(), "POST" | "PUT" | "PATCH");
    if (!spec.body.is_empty() || carries_body) && !has("content-length") {
        head.push_str(&format!("Content-Length: {}\r\n", spec.body.len()));
    }
    head.push_str("\r\n");
    let mut bytes = head.into_bytes();
    bytes.extend_from_slice(&spec.body);
    Raw {
        bytes,
        is_head: spec.method == "HEAD",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            addr: "127.0.0.1:8080".parse().unwrap(),
            host: "localhost:8080".into(),
            path: "/x".into(),
        }
    }

    #[test]
    fn a_get_has_host_and_no_length() {
        let spec = RequestSpec {
            method: "GET".into(),
            path: None,
            body: vec![],
        };
        let raw = serialise(&spec, &target(), &[("Accept".into(), "*/*".into())]);
        assert_eq!(
            String::from_utf8(raw.bytes).unwrap(),
            "GET /x HTTP/1.1\r\nHost: localhost:8080\r\nAccept: */*\r\n\r\n"
        );
        assert!(!raw.is_head);
    }

    #[test]
    fn a_post_carries_its_length_and_body() {
        let spec = RequestSpec {
            method: "POST".into(),
            path: Some("/greet".into()),
            body: b"{}".to_vec(),
        };
        let raw = serialise(&spec, &target(), &[("host".into(), "h".into())]);
        assert_eq!(
            String::from_utf8(raw.bytes).unwrap(),
            "POST /greet HTTP/1.1\r\nhost: h\r\nContent-Length: 2\r\n\r\n{}"
        );
    }

    #[test]
    fn lists_parse_methods_paths_and_bodies() {
        let text = "# comment\n\nGET /a\nPOST /b {\"x\":1}\nput /c @body.json\n";
        let specs = parse_list(text, |f| Ok(format!("<{f}>").into_bytes())).unwrap();
        assert_eq!(specs.len(), 3);
        assert_eq!(specs[0].path.as_deref(), Some("/a"));
        assert_eq!(specs[1].body, b"{\"x\":1}");
        assert_eq!(specs[2].method, "PUT");
        assert_eq!(specs[2].body, b"<body.json>");
        assert!(parse_list("GET nopath\n", |_| Ok(vec![])).is_err());
        assert!(parse_list("G3T /a\n", |_| Ok(vec![])).is_err());
    }

    #[test]
    fn headers_must_be_name_colon_value() {
        let h = parse_headers(&["X-A: 1".into(), "B:two words".into()]).unwrap();
        assert_eq!(h[1], ("B".into(), "two words".into()));
        assert!(parse_headers(&["novalue".into()]).is_err());
        assert!(parse_headers(&["Bad Name: x".into()]).is_err());
    }
}
