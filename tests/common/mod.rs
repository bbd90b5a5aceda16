//! Helpers shared by the integration tests: a real `hearth serve` process on an
//! ephemeral port ([`Server`]) and a raw-TCP HTTP/1.1 client ([`Client`]) that
//! lets a test send exactly the bytes it wants and see exactly what came back,
//! including whether the server closed the connection.
//!
//! Each test binary compiles this module separately and uses only part of it.
#![allow(dead_code)]

pub mod aws;
pub mod qemu;

use std::fs;
use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a server may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `Drop` waits after SIGTERM before it kills the server.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Default read timeout of client sockets: long enough for a loaded CI box,
/// short enough that a hung test fails instead of stalling the run.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the static guest agent lands after `tools/build-agent.sh`.
fn static_agent() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/x86_64-unknown-linux-gnu/release/hearth-agent")
}

/// A stand-in for the agent when the static one is not built, for servers whose
/// tests run no function: it only answers `--version` with this build's
/// protocol, which hearth checks at start-up.
fn placeholder_agent() -> PathBuf {
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("placeholder-agent");
    let script = format!(
        "#!/bin/sh\necho 'hearth-agent placeholder (protocol {})'\n",
        hearth::protocol::VERSION
    );
    if fs::read(&path).is_ok_and(|b| b == script.as_bytes()) {
        return path;
    }
    // Written under a name of its own and renamed into place: tests run in
    // parallel, and a file still open for writing cannot be run (ETXTBSY).
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let tmp = path.with_extension(format!(
        "tmp-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    fs::write(&tmp, script).expect("write the placeholder agent");
    fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod the placeholder agent");
    fs::rename(&tmp, &path).expect("place the placeholder agent");
    path
}

/// A fresh, empty directory under cargo's per-target scratch space.
pub fn temp_dir(label: &str) -> PathBuf {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "{label}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// A running `hearth serve` child process, stopped and cleaned up on drop.
pub struct Server {
    /// The address the server listens on.
    pub addr: SocketAddr,
    /// The temporary directory holding the state dir and the stderr log.
    pub dir: PathBuf,
    child: Option<Child>,
    stderr_path: PathBuf,
    /// The admin token the server runs with (given or generated), if any.
    pub token: Option<String>,
}

impl Server {
    /// Starts `hearth serve --listen 127.0.0.1:0 --state-dir <tmp> <args>`.
    pub fn start(args: &[&str]) -> Server {
        Server::start_with_env(args, &[])
    }

    /// Like [`Server::start`], with extra environment variables (which override
    /// the defaults chosen here, e.g. `HEARTH_AGENT`).
    pub fn start_with_env(args: &[&str], env: &[(&str, &str)]) -> Server {
        Server::start_with(args, env, |_| {})
    }

    /// Like [`Server::start_with_env`]; `configure` may adjust the command last
    /// (e.g. `pre_exec` to set resource limits).
    pub fn start_with(
        args: &[&str],
        env: &[(&str, &str)],
        configure: impl FnOnce(&mut Command),
    ) -> Server {
        let dir = temp_dir("server");
        let state = dir.join("state");
        let stderr_path = dir.join("stderr.log");
        let stderr = fs::File::create(&stderr_path).expect("create stderr log");
        let agent = static_agent();
        // The process backend builds a runtime root holding the agent at start-up, so
        // some file must be named even when no function will run.
        let agent = if agent.is_file() {
            agent
        } else {
            placeholder_agent()
        };
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth"));
        cmd.arg("serve").arg("--listen").arg("127.0.0.1:0");
        // A test may bring its own state dir (e.g. to restart on the same state).
        if !args.contains(&"--state-dir") {
            cmd.arg("--state-dir").arg(&state);
        }
        cmd.args(args)
            .env("HEARTH_AGENT", &agent)
            .env_remove("HEARTH_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr));
        for (k, v) in env {
            cmd.env(k, v);
        }
        configure(&mut cmd);
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", env!("CARGO_BIN_EXE_hearth")));

        // Read stdout on a thread so a server that never prints cannot hang the test;
        // the thread keeps draining stdout until the server exits.
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            for line in lines.by_ref() {
                let Ok(line) = line else { break };
                if let Some(addr) = line.strip_prefix("hearth: listening on http://") {
                    let _ = tx.send(addr.trim().to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(START_TIMEOUT) {
            Ok(a) => a,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "hearth serve {args:?} did not report its address; stderr:\n{}",
                    fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            }
        };
        let flag = |name: &str| {
            args.iter()
                .position(|a| *a == name)
                .and_then(|i| args.get(i + 1))
                .map(|v| v.to_string())
        };
        let token = if args.contains(&"--no-admin-token") {
            None
        } else if let Some(t) = flag("--admin-token") {
            Some(t)
        } else {
            // Generated by the server on its first start.
            let state = flag("--state-dir").map(PathBuf::from).unwrap_or(state);
            fs::read_to_string(state.join("admin-token"))
                .ok()
                .map(|t| t.trim().to_string())
        };
        Server {
            addr: addr
                .parse()
                .unwrap_or_else(|e| panic!("bad listening address {addr:?}: {e}")),
            dir,
            child: Some(child),
            stderr_path,
            token,
        }
    }

    /// The `Authorization` value the control plane wants ("" when it is open).
    pub fn auth(&self) -> String {
        self.token
            .as_ref()
            .map(|t| format!("Bearer {t}"))
            .unwrap_or_default()
    }

    /// One request on a new connection with the admin token (unless `headers`
    /// carries an `authorization` of its own): how tests reach the control plane.
    pub fn control(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        let auth = self.auth();
        let mut all = headers.to_vec();
        if !auth.is_empty()
            && !all
                .iter()
                .any(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        {
            all.push(("authorization", &auth));
        }
        self.connect().request(method, path, &all, body)
    }

    /// An `Authorization` header line for raw requests ("" when the control plane is open).
    pub fn auth_line(&self) -> String {
        self.token
            .as_ref()
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default()
    }

    /// The process id of the server.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server is running").id()
    }

    /// Everything the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Sends `sig` to the server.
    pub fn signal(&self, sig: i32) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.pid() as libc::pid_t, sig) };
    }

    /// Sends SIGTERM and waits for the server to exit (killing it after 30 s);
    /// returns its exit status and how long it took to exit.
    pub fn stop(&mut self) -> (ExitStatus, Duration) {
        let started = Instant::now();
        self.signal(libc::SIGTERM);
        let status = self.wait_exit(Duration::from_secs(30));
        (status, started.elapsed())
    }

    /// Waits up to `limit` for the server to exit, then kills it.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let child = self.child.as_mut().expect("server is running");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("wait for server") {
                self.child = None;
                return status;
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let status = child.wait().expect("wait for killed server");
                self.child = None;
                return status;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Opens a TCP connection to the server.
    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    /// Sends raw bytes on a new connection and returns everything the server
    /// sends back until it closes the connection (or [`READ_TIMEOUT`] passes).
    pub fn send(&self, bytes: &[u8]) -> Vec<u8> {
        let mut c = self.connect();
        c.write(bytes);
        c.read_to_close(READ_TIMEOUT).0
    }

    /// `GET <path>` on a new connection that asks to be closed, with the admin
    /// token when the server has one.
    pub fn get(&self, path: &str) -> Response {
        let mut c = self.connect();
        let auth = self.auth_line();
        c.write(
            format!("GET {path} HTTP/1.1\r\nHost: t\r\n{auth}Connection: close\r\n\r\n").as_bytes(),
        );
        c.response()
    }

    /// Asserts that `GET /healthz` answers 200 `ok` on a new connection.
    pub fn assert_healthy(&self) {
        let r = self.get("/healthz");
        assert_eq!(
            (r.status, r.body.as_slice()),
            (200, &b"ok"[..]),
            "server unhealthy; stderr:\n{}",
            self.stderr()
        );
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if self.child.is_some() {
            self.signal(libc::SIGTERM);
            self.wait_exit(STOP_GRACE);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }
}

/// A parsed HTTP/1.1 response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header fields in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    /// The first header called `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (panics if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.text()))
    }

    /// Asserts the body is exactly `{"error": <string>, "code": <code>}`.
    pub fn assert_json_error(&self, code: &str) {
        assert_eq!(
            self.header("content-type"),
            Some("application/json"),
            "{self:?}"
        );
        let v = self.json();
        let obj = v
            .as_object()
            .unwrap_or_else(|| panic!("not an object: {v}"));
        assert_eq!(obj.len(), 2, "unexpected fields in {v}");
        assert!(obj["error"].as_str().is_some_and(|s| !s.is_empty()), "{v}");
        assert_eq!(obj["code"], code, "{v}");
    }
}

/// A TCP connection to the IPv4 `addr`, made with plain socket calls so that
/// it can come from a chosen loopback `source` address (any 127.x.y.z works on
/// Linux) and have a small receive buffer (`rcvbuf`, set before connecting so
/// the window stays small).
pub fn connect_v4(
    addr: SocketAddr,
    source: Option<std::net::Ipv4Addr>,
    rcvbuf: Option<i32>,
) -> TcpStream {
    use std::os::fd::FromRawFd;
    let SocketAddr::V4(to) = addr else {
        panic!("connect_v4 needs an IPv4 server address, not {addr}")
    };
    let sin = |a: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(a).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let fail = |what: &str| panic!("{what} ({addr}): {}", std::io::Error::last_os_error());
    // SAFETY: plain socket calls on a descriptor this function owns (the
    // TcpStream closes it on every path); each address is a valid
    // `sockaddr_in` for the length given.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            fail("socket");
        }
        let stream = TcpStream::from_raw_fd(fd);
        if let Some(size) = rcvbuf {
            let p = (&size as *const i32).cast();
            if libc::setsockopt(fd, libc::SOL_SOCKET, libc::SO_RCVBUF, p, 4) != 0 {
                fail("SO_RCVBUF");
            }
        }
        if let Some(source) = source {
            let from = sin(source, 0);
            if libc::bind(fd, (&from as *const libc::sockaddr_in).cast(), len) != 0 {
                fail("bind");
            }
        }
        let dest = sin(*to.ip(), to.port());
        if libc::connect(fd, (&dest as *const libc::sockaddr_in).cast(), len) != 0 {
            fail("connect");
        }
        stream
    }
}

/// One client connection, with a buffer for bytes read past the last response.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    /// Connects to `addr` with a [`READ_TIMEOUT`] read timeout.
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect to {addr}: {e}"));
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects to the IPv4 `addr` from the loopback address `source` (any
    /// 127.x.y.z works on Linux), to look like another client to per-address limits.
    pub fn connect_from(addr: SocketAddr, source: std::net::Ipv4Addr) -> Client {
        let stream = connect_v4(addr, Some(source), None);
        stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    /// Writes all of `bytes`.
    pub fn write(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("write {} bytes: {e}", bytes.len()));
    }

    /// Writes `bytes`, tolerating a peer that already closed (returns false then).
    pub fn try_write(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }

    /// Reads once into the buffer; `Ok(0)` is EOF. A read a signal interrupted
    /// is tried again (with a receive timeout set, the kernel does not restart
    /// it whatever SA_RESTART says: signal(7)).
    fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 16 * 1024];
        let n = loop {
            match self.stream.read(&mut chunk) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r?,
            }
        };
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(n)
    }

    /// Reads one response to a non-HEAD request; panics on EOF or timeout.
    pub fn response(&mut self) -> Response {
        self.read_response(false)
    }

    /// Reads one response to a HEAD request (Content-Length but no body).
    pub fn head_response(&mut self) -> Response {
        self.read_response(true)
    }

    fn read_response(&mut self, head_only: bool) -> Response {
        loop {
            match parse_head(&self.buf) {
                Ok(Some(head)) => {
                    let len = if head_only || bodiless(head.status) {
                        0
                    } else {
                        head.content_length
                            .expect("response without Content-Length")
                    };
                    while self.buf.len() < head.len + len {
                        self.fill_or_panic("response body");
                    }
                    let body = self.buf[head.len..head.len + len].to_vec();
                    self.buf.drain(..head.len + len);
                    return Response {
                        status: head.status,
                        headers: head.headers,
                        body,
                    };
                }
                Ok(None) => self.fill_or_panic("response head"),
                Err(e) => panic!(
                    "unparsable response ({e}): {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
            }
        }
    }

    fn fill_or_panic(&mut self, what: &str) {
        match self.fill() {
            Ok(0) => panic!(
                "connection closed while reading the {what}; have {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
            Ok(_) => {}
            Err(e) => panic!(
                "reading the {what}: {e}; have {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
        }
    }

    /// Reads until the server closes the connection or `limit` passes. Returns the
    /// unread bytes (including any buffered) and whether the connection was closed
    /// (EOF or reset) within the limit.
    pub fn read_to_close(&mut self, limit: Duration) -> (Vec<u8>, bool) {
        let deadline = Instant::now() + limit;
        let closed = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break false;
            }
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.fill() {
                Ok(0) => break true,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    break false
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break true,
            }
        };
        self.stream.set_read_timeout(Some(READ_TIMEOUT)).unwrap();
        (std::mem::take(&mut self.buf), closed)
    }

    /// Asserts the server closes the connection within `limit` with nothing more to say.
    pub fn assert_closed(&mut self, limit: Duration) {
        let (rest, closed) = self.read_to_close(limit);
        assert!(
            closed,
            "connection still open after {limit:?}; unread: {:?}",
            String::from_utf8_lossy(&rest)
        );
        assert!(
            rest.is_empty(),
            "unexpected bytes before close: {:?}",
            String::from_utf8_lossy(&rest)
        );
    }

    /// Asserts the connection stays open (no bytes, no EOF) for `span`.
    pub fn assert_open(&mut self, span: Duration) {
        let (rest, closed) = self.read_to_close(span);
        assert!(
            !closed && rest.is_empty(),
            "expected an open, quiet connection; closed={closed}, got {:?}",
            String::from_utf8_lossy(&rest)
        );
    }
}

/// A parsed response head.
struct Head {
    status: u16,
    headers: Vec<(String, String)>,
    /// Bytes of the head, blank line included.
    len: usize,
    content_length: Option<usize>,
}

/// Parses the response head at the start of `buf`; `Ok(None)` if incomplete.
fn parse_head(buf: &[u8]) -> Result<Option<Head>, httparse::Error> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut parsed = httparse::Response::new(&mut fields);
    let httparse::Status::Complete(len) = parsed.parse(buf)? else {
        return Ok(None);
    };
    let headers: Vec<(String, String)> = parsed
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let content_length = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .map(|(_, v)| v.parse::<usize>().expect("numeric Content-Length"));
    Ok(Some(Head {
        status: parsed.code.expect("status code"),
        headers,
        len,
        content_length,
    }))
}

/// Statuses whose responses end at the head (RFC 9112 §6.3).
fn bodiless(status: u16) -> bool {
    status / 100 == 1 || status == 204 || status == 304
}

/// Parses every complete response in `bytes` (none of them to HEAD requests).
pub fn parse_responses(bytes: &[u8]) -> Vec<Response> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while !rest.is_empty() {
        let Ok(Some(head)) = parse_head(rest) else {
            panic!("incomplete response: {:?}", String::from_utf8_lossy(rest));
        };
        let len = if bodiless(head.status) {
            0
        } else {
            head.content_length.unwrap_or(0)
        };
        assert!(rest.len() >= head.len + len, "truncated body");
        out.push(Response {
            status: head.status,
            headers: head.headers,
            body: rest[head.len..head.len + len].to_vec(),
        });
        rest = &rest[head.len + len..];
    }
    out
}

/// Raises this process's soft open-file limit to at least `want` (up to the hard limit);
/// children started afterwards inherit it. Returns the soft limit now in force.
pub fn raise_nofile(want: u64) -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid rlimit struct.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        if lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
        lim.rlim_cur
    }
}

/// A directory under `tests/fixtures`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// A fixture directory zipped as `hearth deploy` would (node_modules included).
pub fn zip_fixture(name: &str) -> Vec<u8> {
    hearth::cli::zip_dir(&fixture(name)).expect("zip fixture").0
}

/// A zip of `files`, each given as name, contents and unix mode.
pub fn zip(files: &[(&str, &[u8], u32)]) -> Vec<u8> {
    let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for (name, data, mode) in files {
        let opts = zip::write::SimpleFileOptions::default().unix_permissions(*mode);
        w.start_file(*name, opts).unwrap();
        w.write_all(data).unwrap();
    }
    w.finish().unwrap().into_inner()
}

/// One control-plane request with the server's admin token (unless `headers` carries one).
pub fn control(
    s: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    s.control(method, path, headers, body)
}

/// One request on a fresh connection, without credentials.
pub fn anon(
    s: &Server,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    s.connect().request(method, path, headers, body)
}

/// `POST /deploy` of `zip` with the admin token; `query` (may be empty) carries the settings.
pub fn deploy_zip(s: &Server, zip: &[u8], query: &str) -> Response {
    let path = if query.is_empty() {
        "/deploy".to_string()
    } else {
        format!("/deploy?{query}")
    };
    s.control("POST", &path, &[("content-type", "application/zip")], zip)
}

/// Deploys `zip` with the settings in `query` and returns the function's id (panics unless 201).
pub fn deploy_ok(s: &Server, zip: &[u8], query: &str) -> String {
    let r = deploy_zip(s, zip, query);
    assert_eq!(
        r.status,
        201,
        "deploy {query}: {} / stderr:\n{}",
        r.text(),
        s.stderr()
    );
    r.json()["functionId"].as_str().unwrap().to_string()
}

/// Deploys the fixture directory `name` with the settings in `query` and returns its id
/// (panics unless 201).
pub fn deploy_fixture(s: &Server, name: &str, query: &str) -> String {
    deploy_ok(s, &zip_fixture(name), query)
}

/// Every value of header `name` in `r`, in order.
pub fn header_values<'a>(r: &'a Response, name: &str) -> Vec<&'a str> {
    r.headers
        .iter()
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .collect()
}

/// The names in directory `dir`, sorted (none if it cannot be read).
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Everything under the server's `state/functions` directory (published, staging, trash).
pub fn functions_on_disk(s: &Server) -> Vec<String> {
    dir_entries(&s.dir.join("state/functions"))
}

/// The admin token [`start_with_fixed_token`] gives its servers.
pub const FIXED_TOKEN: &str = "budget-and-sandbox-tests";

/// Starts a server with `args` and the admin token [`FIXED_TOKEN`], given explicitly so a
/// test holds with or without a generated default.
pub fn start_with_fixed_token(args: &[&str]) -> Server {
    let mut all = vec!["--admin-token", FIXED_TOKEN];
    all.extend_from_slice(args);
    Server::start(&all)
}

impl Client {
    /// Sends one request with a Content-Length body and reads its response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Response {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
        head.push_str("\r\n");
        self.write(head.as_bytes());
        self.write(body);
        self.response()
    }
}

/// Returns from the calling test, saying why, when functions cannot run on
/// the process backend here (see [`sandbox_skip_reason`]).
#[macro_export]
macro_rules! require_sandbox {
    () => {
        $crate::skip_if!($crate::common::sandbox_skip_reason());
    };
}

/// Returns from the calling test, saying why, when `$reason` (an `Option<String>`) is `Some`.
#[macro_export]
macro_rules! skip_if {
    ($reason:expr) => {
        if let Some(why) = $reason {
            eprintln!("skipped: {why}");
            return;
        }
    };
}

/// Why functions cannot run on the process backend here, if they cannot: it
/// needs root (user namespaces with uid maps, cgroups) and the static agent.
pub fn sandbox_skip_reason() -> Option<String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Some("the process sandbox needs root".into());
    }
    let agent = static_agent();
    if !agent.is_file() {
        return Some(format!(
            "{} is missing: run tools/build-agent.sh",
            agent.display()
        ));
    }
    None
}

/// Resident memory of process `pid`, KiB (0 if unreadable).
pub fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Sums the samples of `name` whose labels contain `label` (all cores).
pub fn metric_sum(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once(' '))
        .filter(|(series, _)| {
            series
                .strip_prefix(name)
                .is_some_and(|rest| rest.starts_with('{'))
                && series.contains(label)
        })
        .map(|(_, v)| {
            v.trim()
                .parse::<u64>()
                .unwrap_or_else(|e| panic!("{name}: {v}: {e}"))
        })
        .sum()
}

/// Peak resident memory of process `pid` so far (VmHWM), KiB (0 if unreadable).
pub fn peak_rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Waits up to `limit` for a thread of process `pid` to sleep in the kernel
/// function `wchan` (e.g. `wait_for_partner`: opening a FIFO nobody reads).
pub fn wait_for_wchan(pid: u32, wchans: &[&str], limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        let tasks = fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten();
        if tasks.flatten().any(|t| {
            fs::read_to_string(t.path().join("wchan")).is_ok_and(|w| wchans.contains(&w.trim()))
        }) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// The cgroup directory of process `pid` for `controller` and the contents
/// of its file `v1_file` (cgroup v1) or `v2_file` (v2), from
/// `/proc/<pid>/cgroup` and the mounted hierarchies.
pub fn cgroup_value(
    pid: i32,
    controller: &str,
    v1_file: &str,
    v2_file: &str,
) -> Option<(PathBuf, String)> {
    let own = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mounts = fs::read_to_string("/proc/self/mountinfo").ok()?;
    for line in own.lines() {
        let mut f = line.splitn(3, ':');
        let (_, controllers, path) = (f.next()?, f.next()?, f.next()?);
        let v1 = controllers.split(',').any(|c| c == controller);
        if !v1 && !controllers.is_empty() {
            continue;
        }
        for m in mounts.lines() {
            let Some((left, right)) = m.split_once(" - ") else {
                continue;
            };
            let (fields, super_opts): (Vec<&str>, Vec<&str>) =
                (left.split(' ').collect(), right.split(' ').collect());
            let mount_point = fields[4];
            let fits = if v1 {
                super_opts[0] == "cgroup" && super_opts[2].split(',').any(|o| o == controller)
            } else {
                super_opts[0] == "cgroup2"
            };
            let dir = Path::new(mount_point).join(path.trim_start_matches('/'));
            let file = if v1 { v1_file } else { v2_file };
            if let (true, Ok(value)) = (fits, fs::read_to_string(dir.join(file))) {
                return Some((dir, value.trim().to_string()));
            }
        }
    }
    None
}

/// The CPU cgroup directory of process `pid` and its quota (v1
/// `cpu.cfs_quota_us`, v2 `cpu.max`).
pub fn cpu_cgroup(pid: i32) -> Option<(PathBuf, String)> {
    cgroup_value(pid, "cpu", "cpu.cfs_quota_us", "cpu.max")
}

/// Every process below `pid` (children, their children, …), from
/// `/proc/<pid>/task/*/children`; processes that exit meanwhile are left out.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut found = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        let Ok(tasks) = fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in tasks.flatten() {
            let children = fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for c in children.split_whitespace().filter_map(|c| c.parse().ok()) {
                found.push(c);
                todo.push(c);
            }
        }
    }
    found
}
