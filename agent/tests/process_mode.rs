//! End-to-end tests of the agent in process-sandbox mode: the agent runs as a
//! normal child process with one end of a socketpair on fd 3, and relays to
//! `fixtures/echo-runtime.js` under the system's Node.js; in direct mode
//! (`--log-fd 4`, a second socketpair) it hands fd 3 to the runtime instead.
//!
//! `HEARTH_AGENT_BIN=<path>` runs the suite against another build of the
//! agent, e.g. the static one from `tools/build-agent.sh`.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hearth_protocol::{encode, Frame, FrameDecoder, FrameType, LOG_STDERR};

const NODE: &str = "/usr/bin/node";
const IO_TIMEOUT: Duration = Duration::from_secs(20);

/// A running agent and the host end of its channel.
struct Agent {
    child: Child,
    host: Option<UnixStream>,
    /// Direct mode: the host end of the log socket.
    logs: Option<UnixStream>,
    decoder: FrameDecoder,
    stderr: Arc<Mutex<String>>,
    stderr_reader: Option<std::thread::JoinHandle<()>>,
}

impl Agent {
    fn start() -> Agent {
        Agent::start_with(false)
    }

    /// `direct`: with `--log-fd 4` (the runtime gets the channel itself).
    fn start_with(direct: bool) -> Agent {
        let (host, guest) = UnixStream::pair().unwrap();
        let (host_logs, guest_logs) = UnixStream::pair().unwrap();
        let guest_fds = [guest.as_raw_fd(), guest_logs.as_raw_fd()];
        let shim = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/echo-runtime.js");
        let mut cmd = Command::new(agent_bin());
        cmd.args(["--channel-fd", "3"]);
        if direct {
            cmd.args(["--log-fd", "4"]);
        }
        cmd.args(["--node", NODE, "--cwd", "/tmp", "--shim"])
            .arg(&shim)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                // Like the real sandbox, a user namespace without privileges
                // over the host: the agent's clock_settime must fail with
                // EPERM instead of changing this machine's clock.
                if libc::unshare(libc::CLONE_NEWUSER) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // fds 3 and 4, parked high first so neither dup2 closes the
                // other's source.
                let mut high = [0; 2];
                for (h, &fd) in high.iter_mut().zip(&guest_fds) {
                    *h = libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 10);
                    if *h < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                for (i, &h) in high.iter().enumerate() {
                    if libc::dup2(h, 3 + i as i32) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn hearth-agent");
        drop(guest);
        drop(guest_logs);
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        let stderr_reader = Some(std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n @ 1..) = pipe.read(&mut chunk) {
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&chunk[..n]));
            }
        }));
        host.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        host_logs.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        Agent {
            child,
            host: Some(host),
            logs: Some(host_logs),
            decoder: FrameDecoder::new(),
            stderr,
            stderr_reader,
        }
    }

    fn host(&mut self) -> &mut UnixStream {
        self.host.as_mut().expect("channel still open")
    }

    fn send(&mut self, kind: FrameType, request_id: u32, meta: &str, body: &[u8]) {
        let mut wire = Vec::new();
        encode(&mut wire, kind, 0, request_id, meta.as_bytes(), body);
        self.host().write_all(&wire).unwrap();
    }

    /// The next frame; `None` at end of stream.
    fn try_recv(&mut self) -> Option<Frame> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            if let Some(f) = self.decoder.next_frame().expect("agent sent a valid frame") {
                return Some(f);
            }
            let n = match self.host().read(&mut buf) {
                // A read on a socket with a receive timeout is not restarted
                // after a signal, whatever SA_RESTART says (signal(7)); CI saw
                // EINTR here once.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r.unwrap_or_else(|e| {
                    panic!(
                        "reading from the agent: {e}; agent said:\n{}",
                        self.diagnostics()
                    )
                }),
            };
            if n == 0 {
                assert_eq!(self.decoder.pending(), 0, "stream ended inside a frame");
                return None;
            }
            self.decoder.push(&buf[..n]);
        }
    }

    /// Direct mode: LOG frames from the log socket until `done` accepts
    /// them all; returns them.
    fn logs_until(&mut self, done: impl Fn(&[Frame]) -> bool) -> Vec<Frame> {
        let sock = self.logs.as_mut().expect("log socket open");
        let mut dec = FrameDecoder::new();
        let mut got: Vec<Frame> = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            while let Some(f) = dec.next_frame().expect("valid LOG frames") {
                assert_eq!(f.kind, FrameType::Log, "{f:?}");
                got.push(f);
            }
            if done(&got) {
                return got;
            }
            let n = match sock.read(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r.expect("read log socket"),
            };
            assert!(n > 0, "log socket closed early: {got:?}");
            dec.push(&buf[..n]);
        }
    }

    fn recv(&mut self) -> Frame {
        self.try_recv()
            .unwrap_or_else(|| panic!("channel closed early; agent said:\n{}", self.diagnostics()))
    }

    /// Frames up to and including the first one `last` accepts.
    fn recv_until(&mut self, last: impl Fn(&Frame) -> bool) -> Vec<Frame> {
        let mut got = Vec::new();
        loop {
            let f = self.recv();
            let done = last(&f);
            got.push(f);
            if done {
                return got;
            }
        }
    }

    /// HELLO (with a wall clock an hour behind, which the unprivileged
    /// agent must fail to apply quietly), then READY; returns the runtime process.
    fn hello(&mut self) -> Watched {
        let meta = format!(
            r#"{{"time_ms":{},"function":"fn-test","handler":"app.handler","env":{{}}}}"#,
            now_ms() - 3_600_000
        );
        self.send(FrameType::Hello, 0, &meta, b"");
        let ready = self.recv();
        assert_eq!(ready.kind, FrameType::Ready, "{ready:?}");
        let meta = String::from_utf8(ready.meta).unwrap();
        assert!(
            meta.contains(r#""function":"fn-test""#),
            "HELLO metadata reached the runtime: {meta}"
        );
        Watched::new(json_number(&meta, "pid").expect("READY carries the runtime pid") as i32)
    }

    fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Its stderr is complete once the reader saw end of file.
                if let Some(reader) = self.stderr_reader.take() {
                    reader.join().unwrap();
                }
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "agent still running after {within:?}; it said:\n{}",
                self.diagnostics()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn diagnostics(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn agent_bin() -> String {
    std::env::var("HEARTH_AGENT_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_hearth-agent").to_string())
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The number after `"key":` in flat JSON text.
fn json_number(text: &str, key: &str) -> Option<u64> {
    let at = text.find(&format!("\"{key}\":"))? + key.len() + 3;
    let digits: String = text[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect();
    digits.parse().ok()
}

/// The start time (clock ticks since boot) of process `pid`, if it exists.
fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 22; the command name (field 2) may hold spaces, so count from ')'.
    stat[stat.rfind(')')? + 2..]
        .split(' ')
        .nth(19)?
        .parse()
        .ok()
}

/// A process seen alive once; pids are reused quickly (pid_max may be
/// 32768), so "still there" means same pid *and* same start time.
struct Watched {
    pid: i32,
    start: u64,
}

impl Watched {
    fn new(pid: i32) -> Watched {
        Watched {
            pid,
            start: start_ticks(pid).expect("process is alive"),
        }
    }

    fn alive(&self) -> bool {
        start_ticks(self.pid) == Some(self.start)
    }
}

fn is_answer(rid: u32) -> impl Fn(&Frame) -> bool {
    move |f| matches!(f.kind, FrameType::Response | FrameType::Error) && f.request_id == rid
}

#[test]
fn hello_reaches_the_runtime_and_ready_comes_back() {
    let mut agent = Agent::start();
    let before_ms = now_ms();
    let runtime = agent.hello();
    assert!(runtime.alive());
    assert!(now_ms() >= before_ms, "the host clock must not move");
    assert!(
        !agent.diagnostics().contains("clock"),
        "EPERM on the clock is expected here: {}",
        agent.diagnostics()
    );
}

#[test]
fn invoke_round_trip_keeps_every_byte_value() {
    let mut agent = Agent::start();
    agent.hello();
    let small: Vec<u8> = (0..=255u8).collect();
    // A body far larger than any socket buffer, so it crosses in many pieces.
    let large: Vec<u8> = (0..=255u8).cycle().take(3 << 20).collect();
    for (rid, body) in [(1u32, &small), (2, &large), (3, &small)] {
        agent.send(
            FrameType::Invoke,
            rid,
            r#"{"method":"POST","path":"/echo","headers":[["x-a","b"]]}"#,
            body,
        );
        let frames = agent.recv_until(is_answer(rid));
        let answer = frames.last().unwrap();
        assert_eq!(answer.kind, FrameType::Response);
        assert_eq!(answer.body.len(), body.len());
        assert!(
            answer.body == *body,
            "body of request {rid} changed on the way"
        );
        let meta = String::from_utf8_lossy(&answer.meta);
        assert!(meta.contains(r#""path":"/echo""#), "{meta}");
    }
}

#[test]
fn output_becomes_log_frames_tagged_and_ahead_of_the_answer() {
    let mut agent = Agent::start();
    agent.hello();
    agent.send(FrameType::Invoke, 7, "{}", b"log");
    let frames = agent.recv_until(is_answer(7));
    let (answer, logs) = frames.split_last().unwrap();
    assert_eq!(
        (answer.kind, &answer.body[..]),
        (FrameType::Response, &b"logged"[..])
    );
    assert!(
        logs.iter()
            .all(|f| f.kind == FrameType::Log && f.request_id == 7),
        "{logs:?}"
    );
    let stream = |flags: u8| -> String {
        logs.iter()
            .filter(|f| f.flags == flags)
            .map(|f| String::from_utf8_lossy(&f.body).into_owned())
            .collect()
    };
    assert_eq!(stream(0), "out one\nout two\n");
    assert_eq!(stream(LOG_STDERR), "err one\n");

    // An unfinished line is still flushed, as a line, before the answer.
    agent.send(FrameType::Invoke, 8, "{}", b"partial");
    let frames = agent.recv_until(is_answer(8));
    assert_eq!(frames.len(), 2, "{frames:?}");
    assert_eq!(
        (frames[0].kind, frames[0].request_id, frames[0].flags),
        (FrameType::Log, 8, 0)
    );
    assert_eq!(frames[0].body, b"no newline here\n");
}

#[test]
fn runtime_exit_mid_request_sends_log_and_error_then_agent_exits() {
    let mut agent = Agent::start();
    let runtime = agent.hello();
    agent.send(FrameType::Invoke, 9, "{}", b"exit");
    let frames = agent.recv_until(is_answer(9));
    let (error, logs) = frames.split_last().unwrap();
    assert_eq!(error.kind, FrameType::Error);
    let meta = String::from_utf8_lossy(&error.meta);
    assert!(
        meta.contains(r#""errorType":"Runtime.ExitError""#),
        "{meta}"
    );
    assert!(meta.contains("exit status 3"), "{meta}");
    let text: String = logs
        .iter()
        .map(|f| String::from_utf8_lossy(&f.body).into_owned())
        .collect();
    assert!(text.contains("about to exit\n"), "{text}");
    let note = logs
        .iter()
        .find(|f| String::from_utf8_lossy(&f.body).contains("runtime exited with status 3"))
        .expect("exit note");
    assert_eq!((note.flags, note.request_id), (LOG_STDERR, 9));
    assert!(agent.try_recv().is_none(), "channel closes after the error");
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).code(), Some(1));
    assert!(!runtime.alive());
}

#[test]
fn host_closing_the_channel_stops_agent_and_runtime() {
    let mut agent = Agent::start();
    let runtime = agent.hello();
    agent.send(FrameType::Invoke, 5, "{}", b"hang");
    std::thread::sleep(Duration::from_millis(100));
    drop(agent.host.take());
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert!(
        !runtime.alive(),
        "runtime pid {} outlived the agent",
        runtime.pid
    );
    assert!(
        agent.diagnostics().contains("the host closed the channel"),
        "{}",
        agent.diagnostics()
    );
}

#[test]
fn sigterm_stops_the_runtime_and_the_agent_exits_cleanly() {
    let mut agent = Agent::start();
    let runtime = agent.hello();
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) };
    let frames = agent.recv_until(|f| {
        String::from_utf8_lossy(&f.body).contains("runtime killed by signal SIGTERM")
    });
    assert_eq!(frames.last().unwrap().kind, FrameType::Log);
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert!(!runtime.alive());
}

#[test]
fn output_flood_is_dropped_with_a_note_and_never_blocks_the_runtime() {
    let mut agent = Agent::start();
    agent.hello();
    let marker = std::env::temp_dir().join(format!("hearth-agent-flood-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    // The host reads nothing while the runtime writes 8 MiB; the runtime must
    // still get through its output (it creates the marker file when done).
    let meta = format!(r#"{{"marker":"{}"}}"#, marker.display());
    agent.send(FrameType::Invoke, 11, &meta, b"flood:8388608");
    let deadline = Instant::now() + IO_TIMEOUT;
    while !marker.exists() {
        assert!(
            Instant::now() < deadline,
            "runtime blocked on its output; agent said:\n{}",
            agent.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let read_from_ms = now_ms();
    let frames = agent.recv_until(is_answer(11));
    let answer = frames.last().unwrap();
    let done_ms = json_number(&String::from_utf8_lossy(&answer.meta), "flood_done_ms").unwrap();
    assert!(
        done_ms <= read_from_ms,
        "the runtime finished only once the host read ({done_ms} > {read_from_ms})"
    );
    let logs = &frames[..frames.len() - 1];
    assert!(logs
        .iter()
        .all(|f| f.kind == FrameType::Log && f.request_id == 11));
    let note = logs.iter().find_map(|f| {
        let text = String::from_utf8_lossy(&f.body);
        text.contains("bytes of output dropped]")
            .then(|| text.into_owned())
    });
    assert!(
        note.is_some(),
        "no drop note among {} log frames",
        logs.len()
    );
    let kept: usize = logs
        .iter()
        .filter(|f| f.flags == 0)
        .map(|f| f.body.len())
        .sum();
    assert!(kept < 8 << 20 && kept > 0, "kept {kept} bytes");
    let _ = std::fs::remove_file(&marker);
}

#[test]
fn garbage_from_the_host_ends_the_agent() {
    let mut agent = Agent::start();
    let runtime = agent.hello();
    agent
        .host()
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).code(), Some(2));
    assert!(!runtime.alive());
    assert!(
        agent.diagnostics().contains("protocol error from the host"),
        "{}",
        agent.diagnostics()
    );
}

#[test]
fn help_documents_the_flags() {
    let out = Command::new(agent_bin()).arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for flag in ["--channel-fd", "--node", "--shim", "--cwd", "--env"] {
        assert!(text.contains(flag), "{flag} missing from --help");
    }
    let out = Command::new(agent_bin()).output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(2),
        "no --channel-fd outside PID 1 is a usage error"
    );
}

#[test]
fn direct_mode_gives_the_runtime_the_channel_and_raw_output_the_log_socket() {
    let mut agent = Agent::start_with(true);
    let runtime = agent.hello();
    // The runtime answered HELLO itself; the agent kept no copy of the channel.
    assert!(
        std::fs::read_link(format!("/proc/{}/fd/3", agent.child.id())).is_err(),
        "the agent still holds fd 3"
    );
    assert!(runtime.alive());
    agent.send(FrameType::Invoke, 7, "{}", b"log");
    let answer = agent.recv();
    assert!(is_answer(7)(&answer), "{answer:?}");
    // The echo runtime writes to its stdout/stderr pipes: in direct mode those
    // lines arrive untagged on the log socket, not on the channel.
    let stream = |logs: &[Frame], flags: u8| -> String {
        logs.iter()
            .filter(|f| f.flags == flags)
            .map(|f| String::from_utf8_lossy(&f.body).into_owned())
            .collect()
    };
    let logs = agent.logs_until(|l| {
        stream(l, 0) == "out one\nout two\n" && stream(l, LOG_STDERR) == "err one\n"
    });
    assert!(logs.iter().all(|f| f.request_id == 0), "{logs:?}");
}

#[test]
fn direct_mode_runtime_exit_closes_the_channel_and_notes_it_on_the_log_socket() {
    let mut agent = Agent::start_with(true);
    let runtime = agent.hello();
    agent.send(FrameType::Invoke, 9, "{}", b"exit");
    assert!(
        agent.try_recv().is_none(),
        "the channel closes with the runtime"
    );
    let text_of = |logs: &[Frame]| -> String {
        logs.iter()
            .map(|f| String::from_utf8_lossy(&f.body).into_owned())
            .collect()
    };
    let logs = agent.logs_until(|l| text_of(l).contains("runtime exited with status 3"));
    let text = text_of(&logs);
    assert!(text.contains("about to exit\n"), "{text}");
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).code(), Some(1));
    assert!(!runtime.alive());
}

#[test]
fn direct_mode_host_closing_the_log_socket_stops_agent_and_runtime() {
    let mut agent = Agent::start_with(true);
    let runtime = agent.hello();
    drop(agent.logs.take());
    assert_eq!(agent.wait_exit(Duration::from_secs(10)).code(), Some(0));
    assert!(
        !runtime.alive(),
        "runtime pid {} outlived the agent",
        runtime.pid
    );
}
