//! The client side of the `hearth` command: a small blocking HTTP/1.1 client
//! for the server's API (deploy, invoke, ls, rm, logs).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

/// A response read by [`request`].
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

/// Largest answer head the client reads.
const HEAD_BYTES_MAX: usize = 64 * 1024;

/// Sends one request and reads its answer: the head with `httparse`, the body
/// by its `Content-Length` (or to the end of the connection when it has none).
pub fn request(
    server: &str,
    method: &str,
    path: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<HttpResponse, String> {
    let mut s = TcpStream::connect(server).map_err(|e| {
        format!("cannot connect to {server}: {e} (is `hearth serve` running? set --server)")
    })?;
    s.set_read_timeout(Some(Duration::from_secs(300))).ok();
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {server}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())
        .and_then(|_| s.write_all(body))
        .map_err(|e| format!("send: {e}"))?;
    let mut raw = Vec::with_capacity(4096);
    let mut chunk = [0u8; 16 * 1024];
    let (status, head_len, length) = loop {
        let mut fields = [httparse::EMPTY_HEADER; 64];
        let mut parsed = httparse::Response::new(&mut fields);
        match parsed.parse(&raw) {
            Ok(httparse::Status::Complete(n)) => {
                let status = parsed.code.ok_or("the server sent no status")?;
                let length = parsed
                    .headers
                    .iter()
                    .find(|h| h.name.eq_ignore_ascii_case("content-length"))
                    .map(|h| {
                        std::str::from_utf8(h.value)
                            .ok()
                            .and_then(|v| v.trim().parse::<usize>().ok())
                            .ok_or("the server sent a bad Content-Length")
                    })
                    .transpose()?;
                break (status, n, length);
            }
            Ok(httparse::Status::Partial) if raw.len() < HEAD_BYTES_MAX => {}
            Ok(httparse::Status::Partial) => {
                return Err("the server's answer head is too large".into())
            }
            Err(e) => return Err(format!("the server sent a malformed answer: {e}")),
        }
        let n = s.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("the server closed the connection before a complete answer head".into());
        }
        raw.extend_from_slice(&chunk[..n]);
    };
    let mut body = raw.split_off(head_len);
    match length {
        Some(len) => {
            while body.len() < len {
                let n = s.read(&mut chunk).map_err(|e| format!("read: {e}"))?;
                if n == 0 {
                    return Err(format!(
                        "the answer ended after {} of {len} body bytes",
                        body.len()
                    ));
                }
                body.extend_from_slice(&chunk[..n]);
            }
            body.truncate(len);
        }
        None => {
            s.read_to_end(&mut body).map_err(|e| format!("read: {e}"))?;
        }
    }
    Ok(HttpResponse {
        status,
        head: String::from_utf8_lossy(&raw).trim_end().to_string(),
        body,
    })
}

fn auth(token: Option<&str>) -> Vec<(String, String)> {
    token
        .map(|t| vec![("Authorization".to_string(), format!("Bearer {t}"))])
        .unwrap_or_default()
}

fn check(r: HttpResponse) -> Result<serde_json::Value, String> {
    let v: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null);
    if r.status >= 300 {
        let msg = v["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| String::from_utf8_lossy(&r.body).into_owned());
        return Err(format!("server answered {}: {msg}", r.status));
    }
    Ok(v)
}

/// Zips a directory in memory (files and symlinks; node_modules included).
pub fn zip_dir(dir: &Path) -> Result<(Vec<u8>, usize), String> {
    use zip::write::SimpleFileOptions;
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    let mut files = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&d)
            .map_err(|e| format!("{}: {e}", d.display()))?
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let p = e.path();
            let rel = p
                .strip_prefix(dir)
                .expect("under dir")
                .to_string_lossy()
                .into_owned();
            let ft = e.file_type().map_err(|e| e.to_string())?;
            if ft.is_symlink() {
                let target = std::fs::read_link(&p).map_err(|e| e.to_string())?;
                w.add_symlink(rel, target.to_string_lossy(), SimpleFileOptions::default())
                    .map_err(|e| e.to_string())?;
            } else if ft.is_dir() {
                w.add_directory(format!("{rel}/"), SimpleFileOptions::default())
                    .map_err(|e| e.to_string())?;
                stack.push(p);
            } else {
                use std::os::unix::fs::PermissionsExt;
                let mode = e
                    .metadata()
                    .map(|m| m.permissions().mode())
                    .unwrap_or(0o644);
                w.start_file(
                    rel,
                    SimpleFileOptions::default().unix_permissions(mode & 0o777),
                )
                .map_err(|e| e.to_string())?;
                w.write_all(&std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?)
                    .map_err(|e| e.to_string())?;
                files += 1;
            }
        }
    }
    let out = w.finish().map_err(|e| e.to_string())?.into_inner();
    Ok((out, files))
}

/// `hearth deploy`.
#[allow(clippy::too_many_arguments)]
pub fn deploy(
    server: &str,
    token: Option<&str>,
    path: &Path,
    handler: Option<String>,
    memory_mb: Option<u32>,
    timeout_ms: Option<u64>,
    concurrency: Option<u32>,
    env: &[String],
) -> Result<(), String> {
    let zip = if path.is_dir() {
        eprint!("packing {} ... ", path.display());
        let (zip, files) = zip_dir(path)?;
        eprintln!("{files} files, {} KiB", zip.len() / 1024);
        zip
    } else {
        std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?
    };
    let mut q: Vec<String> = Vec::new();
    let enc = |s: &str| {
        s.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect::<String>()
    };
    if let Some(h) = handler {
        q.push(format!("handler={}", enc(&h)));
    }
    if let Some(m) = memory_mb {
        q.push(format!("memory_mb={m}"));
    }
    if let Some(t) = timeout_ms {
        q.push(format!("timeout_ms={t}"));
    }
    if let Some(c) = concurrency {
        q.push(format!("concurrency={c}"));
    }
    if !env.is_empty() {
        let mut m = serde_json::Map::new();
        for kv in env {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| format!("--env {kv}: expected KEY=VALUE"))?;
            m.insert(k.to_string(), serde_json::Value::String(v.to_string()));
        }
        q.push(format!(
            "env={}",
            enc(&serde_json::Value::Object(m).to_string())
        ));
    }
    let target = if q.is_empty() {
        "/deploy".to_string()
    } else {
        format!("/deploy?{}", q.join("&"))
    };
    let mut headers = auth(token);
    headers.push(("Content-Type".into(), "application/zip".into()));
    eprintln!(
        "uploading {} KiB and initialising the function ...",
        zip.len() / 1024
    );
    let t = std::time::Instant::now();
    let v = check(request(server, "POST", &target, &headers, &zip)?)?;
    eprintln!("ready in {} ms", t.elapsed().as_millis());
    println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    Ok(())
}

/// `hearth invoke`.
pub fn invoke(
    server: &str,
    id: &str,
    path: &str,
    method: &str,
    data: Option<&str>,
    headers: &[String],
    include: bool,
) -> Result<(), String> {
    let body = match data {
        Some(d) if d.starts_with('@') => {
            std::fs::read(&d[1..]).map_err(|e| format!("{}: {e}", &d[1..]))?
        }
        Some(d) => d.as_bytes().to_vec(),
        None => Vec::new(),
    };
    let mut hs = Vec::new();
    for h in headers {
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| format!("-H {h}: expected 'Name: value'"))?;
        hs.push((k.trim().to_string(), v.trim().to_string()));
    }
    let path = if path.starts_with('/') {
        path.to_string()
    } else {
        format!("/{path}")
    };
    let r = request(
        server,
        &method.to_uppercase(),
        &format!("/f/{id}{path}"),
        &hs,
        &body,
    )?;
    if include {
        println!("{}\n", r.head);
    }
    std::io::stdout()
        .write_all(&r.body)
        .map_err(|e| e.to_string())?;
    if r.status >= 500 {
        return Err(format!("status {}", r.status));
    }
    Ok(())
}

/// `hearth ls`.
pub fn list(server: &str, token: Option<&str>) -> Result<(), String> {
    let v = check(request(server, "GET", "/functions", &auth(token), &[])?)?;
    println!(
        "{:<18} {:<20} {:>7} {:>9} {:>11}",
        "ID", "HANDLER", "MEM_MB", "INSTANCES", "INVOCATIONS"
    );
    for f in v["functions"].as_array().into_iter().flatten() {
        println!(
            "{:<18} {:<20} {:>7} {:>9} {:>11}",
            f["functionId"].as_str().unwrap_or(""),
            f["handler"].as_str().unwrap_or(""),
            f["memory_mb"],
            f["instances"],
            f["invocations"]
        );
    }
    Ok(())
}

/// `hearth rm`.
pub fn remove(server: &str, token: Option<&str>, id: &str) -> Result<(), String> {
    check(request(
        server,
        "DELETE",
        &format!("/functions/{id}"),
        &auth(token),
        &[],
    )?)?;
    println!("deleted {id}");
    Ok(())
}

/// `hearth logs`.
pub fn logs(server: &str, token: Option<&str>, id: &str) -> Result<(), String> {
    let v = check(request(
        server,
        "GET",
        &format!("/functions/{id}/logs"),
        &auth(token),
        &[],
    )?)?;
    for l in v["logs"].as_array().into_iter().flatten() {
        println!(
            "{} {:<36} {} {}",
            l["time_ms"],
            l["requestId"].as_str().unwrap_or(""),
            l["stream"].as_str().unwrap_or(""),
            l["message"].as_str().unwrap_or("")
        );
    }
    Ok(())
}
