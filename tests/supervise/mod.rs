//! What the restart and crash-loop tests need beyond `tests/common`: a
//! `hearth serve` started as a supervisor would start it (a fixed port and state
//! dir, restarted at once after kill -9), the control-plane calls, and probes
//! for what a server may leave behind (cgroups, processes, mounts).
//!
//! Each test binary compiles this module separately and uses only part of it.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// How long a server may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(30);

fn agent() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/x86_64-unknown-linux-gnu/release/hearth-agent")
}

/// One `hearth serve` process.
/// The admin token every server of these tests runs with.
pub const ADMIN_TOKEN: &str = "supervise-admin-token";

pub struct Hearth {
    child: Option<Child>,
    pub pid: u32,
    pub addr: SocketAddr,
    /// When the process was spawned.
    pub spawned: Instant,
    /// How long it took to print its listening line.
    pub start_time: Duration,
    pub stderr_path: PathBuf,
}

impl Hearth {
    /// Starts `hearth serve --listen <listen> --state-dir <state> <extra>`, its
    /// stderr appended to `log`; `Err(stderr)` if it exits or stays silent.
    pub fn try_start(
        listen: &str,
        state: &Path,
        log: &Path,
        extra: &[&str],
    ) -> Result<Hearth, String> {
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .expect("open server log");
        let spawned = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
            .args([
                "serve",
                "--listen",
                listen,
                "--admin-token",
                ADMIN_TOKEN,
                "--state-dir",
            ])
            .arg(state)
            .args(extra)
            .env("HEARTH_AGENT", agent())
            .env_remove("HEARTH_ADMIN_TOKEN")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(stderr))
            .spawn()
            .expect("spawn hearth serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(a) = line.strip_prefix("hearth: listening on http://") {
                    let _ = tx.send(a.trim().to_string());
                }
            }
        });
        let addr = match rx.recv_timeout(START_TIMEOUT) {
            Ok(a) => a.parse().expect("listening address"),
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(std::fs::read_to_string(log).unwrap_or_default());
            }
        };
        Ok(Hearth {
            pid: child.id(),
            child: Some(child),
            addr,
            spawned,
            start_time: spawned.elapsed(),
            stderr_path: log.to_path_buf(),
        })
    }

    /// Like [`Hearth::try_start`]; panics with the server's stderr on failure.
    pub fn start(listen: &str, state: &Path, log: &Path, extra: &[&str]) -> Hearth {
        Hearth::try_start(listen, state, log, extra)
            .unwrap_or_else(|err| panic!("hearth serve --listen {listen} failed:\n{err}"))
    }

    /// The server log so far.
    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// kill -9, then reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM; waits up to 30 s for a clean exit and returns whether it was clean.
    pub fn term(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        // SAFETY: kill(2) on our own, unreaped child.
        unsafe { libc::kill(c.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = c.try_wait().expect("wait for hearth") {
                return status.success();
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Hearth {
    fn drop(&mut self) {
        self.term();
    }
}

/// A response: status and body.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    /// The body as JSON (panics if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }
}

/// One request on a fresh connection (`Connection: close`); `Err` when the
/// server is not there or the connection breaks before a whole response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout: Duration,
) -> std::io::Result<Reply> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    s.write_all(body)?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    parse(&buf).ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("incomplete response: {:?}", String::from_utf8_lossy(&buf)),
        )
    })
}

fn parse(buf: &[u8]) -> Option<Reply> {
    let mut fields = [httparse::EMPTY_HEADER; 64];
    let mut r = httparse::Response::new(&mut fields);
    let httparse::Status::Complete(len) = r.parse(buf).ok()? else {
        return None;
    };
    let cl: usize = r
        .headers
        .iter()
        .find(|h| h.name.eq_ignore_ascii_case("content-length"))
        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())?;
    (buf.len() >= len + cl).then(|| Reply {
        status: r.code.unwrap_or(0),
        body: buf[len..len + cl].to_vec(),
    })
}

/// Every control-plane call of these tests goes through here (the one place
/// to add an admin token).
pub fn control(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> std::io::Result<Reply> {
    let auth = format!("Bearer {ADMIN_TOKEN}");
    let mut headers: Vec<(&str, &str)> = content_type
        .map(|c| ("content-type", c))
        .into_iter()
        .collect();
    headers.push(("authorization", &auth));
    request(addr, method, path, &headers, body, Duration::from_secs(30))
}

/// Deploys a zip; the id on 201, else the reply.
pub fn deploy(addr: SocketAddr, zip: &[u8]) -> Result<String, String> {
    match control(addr, "POST", "/deploy", Some("application/zip"), zip) {
        Ok(r) if r.status == 201 => Ok(r.json()["functionId"].as_str().unwrap().to_string()),
        Ok(r) => Err(format!("{} {}", r.status, String::from_utf8_lossy(&r.body))),
        Err(e) => Err(e.to_string()),
    }
}

/// The ids `GET /functions` lists.
pub fn listed(addr: SocketAddr) -> Vec<String> {
    let r = control(addr, "GET", "/functions", None, b"").expect("GET /functions");
    assert_eq!(r.status, 200);
    let mut ids: Vec<String> = r.json()["functions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["functionId"].as_str().unwrap().to_string())
        .collect();
    ids.sort();
    ids
}

/// `GET /f/<id>/` with a short timeout.
pub fn invoke(addr: SocketAddr, id: &str) -> std::io::Result<Reply> {
    request(
        addr,
        "GET",
        &format!("/f/{id}/"),
        &[],
        b"",
        Duration::from_secs(5),
    )
}

/// Polls until `ok` holds or `deadline` passes; returns whether it held by
/// the deadline (a probe that succeeds only after it does not count).
pub fn until(deadline: Instant, mut ok: impl FnMut() -> bool) -> bool {
    loop {
        if ok() {
            return Instant::now() <= deadline;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// True if `name` is a sandbox cgroup of server `pid`: `<function id>-<pid>-<n>`.
fn is_group_of(name: &str, pid: u32) -> bool {
    let mut parts = name.split('-');
    matches!(
        (parts.next(), parts.next(), parts.next(), parts.next()),
        (Some(id), Some(p), Some(n), None)
            if id.len() == 16 && p == pid.to_string() && n.parse::<u64>().is_ok()
    )
}

/// Sandbox cgroup directories of server `pid`, on every mounted hierarchy.
pub fn cgroups_of(pid: u32) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let roots: Vec<PathBuf> = mounts
        .lines()
        .filter(|l| l.contains(" - cgroup "))
        .chain(mounts.lines().filter(|l| l.contains(" - cgroup2 ")))
        .filter_map(|l| l.split(' ').nth(4).map(PathBuf::from))
        .collect();
    let mut todo: Vec<(PathBuf, usize)> = roots.into_iter().map(|r| (r, 0)).collect();
    while let Some((dir, depth)) = todo.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if dir.file_name().is_some_and(|n| n == "hearth") && is_group_of(&name, pid) {
                found.push(e.path());
            } else if depth < 6 {
                todo.push((e.path(), depth + 1));
            }
        }
    }
    found.sort();
    found
}

/// Processes (pid, command) in a sandbox cgroup of server `pid`.
pub fn processes_of(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let groups = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        let ours = groups.lines().any(|l| {
            l.rsplit('/')
                .next()
                .is_some_and(|leaf| is_group_of(leaf, pid))
                && l.contains("/hearth/")
        });
        if ours {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            out.push((p, String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    out
}

/// Orphaned processes (pid, command) running this build's hearth binary: a
/// server's sandbox launchers (`hearth __sandbox`) left behind when it died
/// are re-parented to init (or to this test, should it be a subreaper).
/// Servers and launchers of other tests running beside this one have a live
/// parent (their test, their server), so they are not counted.
pub fn orphaned_hearth_processes() -> Vec<(u32, String)> {
    let me = Path::new(env!("CARGO_BIN_EXE_hearth"));
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if !std::fs::read_link(e.path().join("exe")).is_ok_and(|x| x == me) {
            continue;
        }
        // The parent pid is the second field after the command, which is in parentheses.
        let stat = std::fs::read_to_string(e.path().join("stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u32>().ok());
        if ppid == Some(1) || ppid == Some(std::process::id()) {
            let cmd = std::fs::read(e.path().join("cmdline")).unwrap_or_default();
            out.push((p, String::from_utf8_lossy(&cmd).replace('\0', " ")));
        }
    }
    out
}

/// Mount points (in this mount namespace) under `dir`.
pub fn mounts_under(dir: &Path) -> Vec<String> {
    let dir = dir.to_string_lossy().into_owned();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|m| m.starts_with(&dir))
        .map(String::from)
        .collect()
}

/// Waits up to `limit` for server `pid`'s sandbox cgroups and processes to be
/// gone; returns what is left.
pub fn leftovers_of(pid: u32, limit: Duration) -> (Vec<PathBuf>, Vec<(u32, String)>) {
    let deadline = Instant::now() + limit;
    loop {
        let (g, p) = (cgroups_of(pid), processes_of(pid));
        if (g.is_empty() && p.is_empty()) || Instant::now() >= deadline {
            return (g, p);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
