//! Firecracker's control API: the request bodies hearth sends (plain data,
//! checked in tests), and a small blocking HTTP/1.1 client over the API's
//! Unix socket (requests with `Content-Length` bodies, one connection kept
//! per VMM; the control plane only, never on a request core).

use std::fmt;
use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Largest API answer read (Firecracker's are a few hundred bytes).
pub const RESPONSE_BYTES_MAX: usize = 64 * 1024;
/// The guest's vsock context id (any value >= 3; every clone keeps it, which
/// is fine: vsock is proxied per Firecracker process).
pub const GUEST_CID: u32 = 3;

/// `PUT /machine-config`.
pub fn machine_config(vcpus: u32, mem_mib: u32) -> Value {
    json!({ "vcpu_count": vcpus, "mem_size_mib": mem_mib, "smt": false })
}

/// `PUT /boot-source`: an ELF kernel, the initramfs, the command line.
pub fn boot_source(kernel: &Path, initrd: &Path, boot_args: &str) -> Value {
    json!({
        "kernel_image_path": kernel.display().to_string(),
        "initrd_path": initrd.display().to_string(),
        "boot_args": boot_args,
    })
}

/// `PUT /drives/<id>`: a read-only data drive (the guest sees drives as
/// `/dev/vda`, `/dev/vdb`... in the order they were added).
pub fn drive(id: &str, path: &Path) -> Value {
    json!({
        "drive_id": id,
        "path_on_host": path.display().to_string(),
        "is_root_device": false,
        "is_read_only": true,
    })
}

/// `PUT /vsock`: the device and the host-side Unix socket Firecracker binds.
pub fn vsock(uds: &Path) -> Value {
    json!({ "guest_cid": GUEST_CID, "uds_path": uds.display().to_string() })
}

/// `PUT /actions`.
pub fn action(kind: &str) -> Value {
    json!({ "action_type": kind })
}

/// `PATCH /vm`: `Paused` or `Resumed`.
pub fn vm_state(state: &str) -> Value {
    json!({ "state": state })
}

/// `PUT /snapshot/create`: a Full snapshot into these two files.
pub fn snapshot_create(state: &Path, mem: &Path) -> Value {
    json!({
        "snapshot_type": "Full",
        "snapshot_path": state.display().to_string(),
        "mem_file_path": mem.display().to_string(),
    })
}

/// Where a restored VM's memory comes from.
pub enum MemBackend<'a> {
    /// Firecracker maps this memory file privately.
    File(&'a Path),
    /// Firecracker sends its userfaultfd to the handler listening here.
    Uffd(&'a Path),
}

/// `PUT /snapshot/load`: the first request to a fresh process. The vsock
/// binds `uds` instead of the template's path; with `resume` the VM runs as
/// soon as it is loaded.
pub fn snapshot_load(state: &Path, mem: MemBackend<'_>, uds: &Path, resume: bool) -> Value {
    let (kind, path) = match mem {
        MemBackend::File(p) => ("File", p),
        MemBackend::Uffd(p) => ("Uffd", p),
    };
    json!({
        "snapshot_path": state.display().to_string(),
        "mem_backend": { "backend_type": kind, "backend_path": path.display().to_string() },
        "vsock_override": { "uds_path": uds.display().to_string() },
        "resume_vm": resume,
    })
}

/// A request the API refused or could not answer.
#[derive(Debug)]
pub enum ApiError {
    /// The socket failed; `what` names the request.
    Io { what: String, err: io::Error },
    /// An answer with an error status; Firecracker's `fault_message`.
    Status {
        what: String,
        status: u16,
        message: String,
    },
    /// The answer is not HTTP, or too large.
    BadResponse { what: String, why: String },
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ApiError::Io { what, err } => write!(f, "firecracker API {what}: {err}"),
            ApiError::Status {
                what,
                status,
                message,
            } => write!(f, "firecracker API {what}: {status} {message}"),
            ApiError::BadResponse { what, why } => write!(f, "firecracker API {what}: {why}"),
        }
    }
}

impl std::error::Error for ApiError {}

/// The request text for `method path` with a JSON body.
pub fn encode_request(method: &str, path: &str, body: Option<&Value>) -> Vec<u8> {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n");
    if !body.is_empty() || method != "GET" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    let mut out = req.into_bytes();
    out.extend_from_slice(body.as_bytes());
    out
}

/// What one answer holds, once complete: the status and the body.
#[derive(Debug, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

/// Parses an answer from the bytes read so far: `Ok(None)` while incomplete.
pub fn parse_response(buf: &[u8]) -> Result<Option<Response>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut r = httparse::Response::new(&mut headers);
    let head = match r.parse(buf).map_err(|e| format!("bad answer: {e}"))? {
        httparse::Status::Complete(n) => n,
        httparse::Status::Partial => return Ok(None),
    };
    let status = r.code.ok_or("answer without a status")?;
    let mut len = 0usize;
    for h in r.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or("bad Content-Length")?;
        }
    }
    if len > RESPONSE_BYTES_MAX {
        return Err(format!("answer body of {len} bytes"));
    }
    if buf.len() < head + len {
        return Ok(None);
    }
    Ok(Some(Response {
        status,
        body: buf[head..head + len].to_vec(),
    }))
}

/// Time left until `deadline` (at least 1 ms: a zero timeout means none).
fn left(deadline: Instant, now: Instant) -> Duration {
    deadline
        .saturating_duration_since(now)
        .max(Duration::from_millis(1))
}

/// A connection to one VMM's API socket.
pub struct Api {
    stream: UnixStream,
}

impl Api {
    /// Connects to `sock`.
    pub fn connect(sock: &Path) -> io::Result<Api> {
        Ok(Api {
            stream: UnixStream::connect(sock)?,
        })
    }

    /// Sends one request and waits until `deadline` for its answer; an
    /// error status becomes [`ApiError::Status`].
    pub fn call(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        deadline: Instant,
    ) -> Result<Response, ApiError> {
        self.send(method, path, body, deadline)?;
        self.answer(&format!("{method} {path}"), deadline)
    }

    /// Writes one request without waiting for its answer ([`Api::answer`]).
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        deadline: Instant,
    ) -> Result<(), ApiError> {
        let io_err = |err: io::Error| ApiError::Io {
            what: format!("{method} {path}"),
            err,
        };
        self.stream
            .set_write_timeout(Some(left(deadline, Instant::now())))
            .map_err(io_err)?;
        self.stream
            .write_all(&encode_request(method, path, body))
            .map_err(io_err)
    }

    /// Waits until `deadline` for the answer to the request sent last
    /// (`what` names it in errors).
    pub fn answer(&mut self, what: &str, deadline: Instant) -> Result<Response, ApiError> {
        let what = what.to_string();
        let io_err = |err: io::Error| ApiError::Io {
            what: what.clone(),
            err,
        };
        let mut buf = Vec::with_capacity(512);
        let mut chunk = [0u8; 4096];
        loop {
            match parse_response(&buf) {
                Ok(Some(r)) if r.status < 300 => return Ok(r),
                Ok(Some(r)) => {
                    let v: Value = serde_json::from_slice(&r.body).unwrap_or_default();
                    let message = v["fault_message"]
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| String::from_utf8_lossy(&r.body).into_owned());
                    return Err(ApiError::Status {
                        what,
                        status: r.status,
                        message,
                    });
                }
                Ok(None) if buf.len() <= RESPONSE_BYTES_MAX + 4096 => {}
                Ok(None) => {
                    return Err(ApiError::BadResponse {
                        what,
                        why: "answer too large".into(),
                    })
                }
                Err(why) => return Err(ApiError::BadResponse { what, why }),
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(io_err(io::ErrorKind::TimedOut.into()));
            }
            self.stream
                .set_read_timeout(Some(left(deadline, now)))
                .map_err(io_err)?;
            match self.stream.read(&mut chunk) {
                Ok(0) => return Err(io_err(io::ErrorKind::UnexpectedEof.into())),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_err(e)),
            }
        }
    }

    /// `PUT path` with a JSON body.
    pub fn put(&mut self, path: &str, body: &Value, deadline: Instant) -> Result<(), ApiError> {
        self.call("PUT", path, Some(body), deadline).map(drop)
    }

    /// `PATCH path` with a JSON body.
    pub fn patch(&mut self, path: &str, body: &Value, deadline: Instant) -> Result<(), ApiError> {
        self.call("PATCH", path, Some(body), deadline).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_carry_a_content_length_body() {
        let req = encode_request("PATCH", "/vm", Some(&vm_state("Paused")));
        let text = String::from_utf8(req).unwrap();
        assert!(text.starts_with("PATCH /vm HTTP/1.1\r\n"), "{text}");
        assert!(text.contains("Content-Length: 18\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\n{\"state\":\"Paused\"}"), "{text}");
        let get = String::from_utf8(encode_request("GET", "/version", None)).unwrap();
        assert!(!get.contains("Content-Length"), "{get}");
    }

    #[test]
    fn bodies_have_the_fields_firecracker_expects() {
        let load = snapshot_load(
            Path::new("/f/fc.state"),
            MemBackend::File(Path::new("/f/fc.mem")),
            Path::new("/run/1/v.sock"),
            true,
        );
        assert_eq!(
            load,
            json!({
                "snapshot_path": "/f/fc.state",
                "mem_backend": {"backend_type": "File", "backend_path": "/f/fc.mem"},
                "vsock_override": {"uds_path": "/run/1/v.sock"},
                "resume_vm": true
            })
        );
        let uffd = snapshot_load(
            Path::new("s"),
            MemBackend::Uffd(Path::new("/run/1/uffd.sock")),
            Path::new("v"),
            false,
        );
        assert_eq!(
            uffd["mem_backend"],
            json!({"backend_type": "Uffd", "backend_path": "/run/1/uffd.sock"})
        );
        assert_eq!(uffd["resume_vm"], false);
        assert_eq!(
            drive("code", Path::new("code-1.ext4")),
            json!({"drive_id": "code", "path_on_host": "code-1.ext4",
                   "is_root_device": false, "is_read_only": true})
        );
        assert_eq!(vsock(Path::new("/r/v.sock"))["guest_cid"], 3);
        assert_eq!(
            snapshot_create(Path::new("s"), Path::new("m"))["snapshot_type"],
            "Full"
        );
        assert_eq!(machine_config(1, 256)["mem_size_mib"], 256);
        let boot = boot_source(Path::new("/k/vmlinux"), Path::new("/k/i.cpio"), "quiet");
        assert_eq!(boot["kernel_image_path"], "/k/vmlinux");
        assert_eq!(boot["initrd_path"], "/k/i.cpio");
        assert_eq!(action("InstanceStart")["action_type"], "InstanceStart");
    }

    #[test]
    fn answers_parse_in_any_split() {
        let full = b"HTTP/1.1 400 \r\nServer: Firecracker API\r\nContent-Type: application/json\r\nContent-Length: 22\r\n\r\n{\"fault_message\":\"no\"}";
        for cut in 0..full.len() {
            assert_eq!(parse_response(&full[..cut]).unwrap(), None, "cut {cut}");
        }
        let r = parse_response(full).unwrap().unwrap();
        assert_eq!(r.status, 400);
        assert_eq!(r.body, b"{\"fault_message\":\"no\"}");
        let empty = parse_response(b"HTTP/1.1 204 \r\nServer: Firecracker API\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!((empty.status, empty.body.len()), (204, 0));
        assert!(parse_response(b"HTTP/1.1 200 \r\nContent-Length: 99999999\r\n\r\n").is_err());
        assert!(parse_response(b"garbage\r\n\r\n").is_err());
    }

    /// The client against a real socket: an error status carries the fault message.
    #[test]
    fn the_client_reports_fault_messages() {
        let dir = std::env::temp_dir().join(format!("hearth-fcapi-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("api.sock");
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let mut got = Vec::new();
            let mut b = [0u8; 1024];
            for answer in [
                "HTTP/1.1 204 \r\n\r\n".to_string(),
                "HTTP/1.1 400 \r\nContent-Length: 27\r\n\r\n{\"fault_message\":\"bad cid\"}"
                    .to_string(),
            ] {
                let n = s.read(&mut b).unwrap();
                got.extend_from_slice(&b[..n]);
                s.write_all(answer.as_bytes()).unwrap();
            }
            got
        });
        let mut api = Api::connect(&sock).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        api.put("/actions", &action("InstanceStart"), deadline)
            .unwrap();
        let err = api.put("/vsock", &vsock(&sock), deadline).unwrap_err();
        assert_eq!(err.to_string(), "firecracker API PUT /vsock: 400 bad cid");
        let sent = String::from_utf8(server.join().unwrap()).unwrap();
        assert!(sent.starts_with("PUT /actions HTTP/1.1"), "{sent}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
