//! A small blocking client for QEMU's machine protocol (QMP) on a Unix
//! socket: greeting, `qmp_capabilities`, then one command at a time.
//!
//! Each message is one line of JSON. Replies carry `return` or `error`;
//! asynchronous `event` lines may come in between and are skipped (the
//! callers poll state with `query-*` commands instead).

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// Longest line accepted from QEMU.
pub const LINE_BYTES_MAX: usize = 1 << 20;
/// How often [`Qmp::connect`] retries while the socket is not there yet.
const CONNECT_RETRY: Duration = Duration::from_millis(5);

/// A failed QMP exchange.
#[derive(Debug)]
pub enum QmpError {
    /// The socket could not be reached before the deadline.
    Connect { path: String, err: io::Error },
    /// Reading or writing failed, or QEMU closed the socket.
    Io(io::Error),
    /// No answer before the deadline.
    Timeout { command: String },
    /// QEMU sent something that is not a QMP message.
    Protocol(String),
    /// QEMU answered with an error.
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

impl fmt::Display for QmpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QmpError::Connect { path, err } => write!(f, "QMP socket {path}: {err}"),
            QmpError::Io(e) => write!(f, "QMP: {e}"),
            QmpError::Timeout { command } => write!(f, "QMP {command}: no answer in time"),
            QmpError::Protocol(m) => write!(f, "QMP: {m}"),
            QmpError::Command {
                command,
                class,
                desc,
            } => write!(f, "QMP {command} failed: {class}: {desc}"),
        }
    }
}

impl std::error::Error for QmpError {}

/// What one line from QEMU is.
#[derive(Debug, PartialEq)]
pub enum Message {
    Greeting,
    Return(Value),
    Error { class: String, desc: String },
    Event(String),
}

/// Classifies one line (sans-IO, for tests and the client).
pub fn parse_line(line: &str) -> Result<Message, QmpError> {
    let v: Value = serde_json::from_str(line)
        .map_err(|e| QmpError::Protocol(format!("bad JSON {line:?}: {e}")))?;
    if v.get("QMP").is_some() {
        Ok(Message::Greeting)
    } else if let Some(r) = v.get("return") {
        Ok(Message::Return(r.clone()))
    } else if let Some(e) = v.get("error") {
        Ok(Message::Error {
            class: e["class"].as_str().unwrap_or("?").to_string(),
            desc: e["desc"].as_str().unwrap_or("?").to_string(),
        })
    } else if let Some(ev) = v.get("event") {
        Ok(Message::Event(ev.as_str().unwrap_or("?").to_string()))
    } else {
        Err(QmpError::Protocol(format!("unexpected message {line:?}")))
    }
}

/// A connection in command mode.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects (retrying until `deadline` while QEMU has not made the
    /// socket yet), reads the greeting and enters command mode.
    pub fn connect(path: &Path, deadline: Instant) -> Result<Qmp, QmpError> {
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e)
                    if Instant::now() < deadline
                        && matches!(
                            e.kind(),
                            io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                        ) =>
                {
                    std::thread::sleep(CONNECT_RETRY)
                }
                Err(err) => {
                    return Err(QmpError::Connect {
                        path: path.display().to_string(),
                        err,
                    })
                }
            }
        };
        let writer = stream.try_clone().map_err(QmpError::Io)?;
        let mut q = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        match q.read_message("greeting", deadline)? {
            Message::Greeting => {}
            other => {
                return Err(QmpError::Protocol(format!(
                    "expected the greeting, got {other:?}"
                )))
            }
        }
        q.execute("qmp_capabilities", None, deadline)?;
        Ok(q)
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        deadline: Instant,
    ) -> Result<Value, QmpError> {
        let mut msg = json!({ "execute": command });
        if let Some(a) = arguments {
            msg["arguments"] = a;
        }
        let mut line = serde_json::to_vec(&msg).expect("json of plain values");
        line.push(b'\n');
        self.writer.write_all(&line).map_err(QmpError::Io)?;
        self.reply(command, deadline)
    }

    /// Gives QEMU a copy of `fd` under `name` (`getfd`, the descriptor sent
    /// with the command as SCM_RIGHTS), for commands that take `fd:<name>`.
    pub fn pass_fd(
        &mut self,
        name: &str,
        fd: BorrowedFd<'_>,
        deadline: Instant,
    ) -> Result<(), QmpError> {
        let msg = json!({ "execute": "getfd", "arguments": { "fdname": name } });
        let mut line = serde_json::to_vec(&msg).expect("json of plain values");
        line.push(b'\n');
        send_with_fd(&self.writer, &line, fd.as_raw_fd()).map_err(QmpError::Io)?;
        self.reply("getfd", deadline).map(drop)
    }

    /// Reads up to the answer of `command`, skipping events.
    fn reply(&mut self, command: &str, deadline: Instant) -> Result<Value, QmpError> {
        loop {
            match self.read_message(command, deadline)? {
                Message::Return(v) => return Ok(v),
                Message::Error { class, desc } => {
                    return Err(QmpError::Command {
                        command: command.to_string(),
                        class,
                        desc,
                    })
                }
                Message::Event(_) | Message::Greeting => continue,
            }
        }
    }

    /// The VM's run state (`query-status`): "running", "paused", "inmigrate", ...
    pub fn status(&mut self, deadline: Instant) -> Result<String, QmpError> {
        let v = self.execute("query-status", None, deadline)?;
        v["status"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| QmpError::Protocol(format!("query-status answered {v}")))
    }

    fn read_message(&mut self, command: &str, deadline: Instant) -> Result<Message, QmpError> {
        let mut line = String::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(QmpError::Timeout {
                    command: command.to_string(),
                });
            }
            self.reader
                .get_ref()
                .set_read_timeout(Some(left))
                .map_err(QmpError::Io)?;
            let before = line.len();
            match Read::take(&mut self.reader, (LINE_BYTES_MAX - before) as u64 + 1)
                .read_line(&mut line)
            {
                Ok(0) => {
                    return Err(QmpError::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("QEMU closed the QMP socket during {command}"),
                    )))
                }
                Ok(_) if line.ends_with('\n') => return parse_line(line.trim_end()),
                Ok(_) if line.len() > LINE_BYTES_MAX => {
                    return Err(QmpError::Protocol(format!(
                        "a line over {LINE_BYTES_MAX} bytes during {command}"
                    )))
                }
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    continue
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(QmpError::Io(e)),
            }
        }
    }
}

/// Writes all of `bytes` to `to`, `fd` attached to the first write as SCM_RIGHTS.
fn send_with_fd(to: &UnixStream, bytes: &[u8], fd: RawFd) -> io::Result<()> {
    let mut iov = libc::iovec {
        iov_base: bytes.as_ptr() as *mut libc::c_void,
        iov_len: bytes.len(),
    };
    let fd_bytes = std::mem::size_of::<RawFd>() as u32;
    // Room for one header and one descriptor, aligned for cmsghdr.
    let mut control = [0u64; 4];
    // SAFETY: a zeroed msghdr is empty; `control` holds CMSG_SPACE(4) bytes
    // (24 on 64-bit Linux); CMSG_* compute pointers into it; `iov` points
    // into `bytes`, which outlives the call.
    let sent = unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = libc::CMSG_SPACE(fd_bytes) as _;
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(fd_bytes) as _;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<RawFd>(), fd);
        libc::sendmsg(to.as_raw_fd(), &msg, libc::MSG_NOSIGNAL)
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut w = to;
    w.write_all(&bytes[sent as usize..])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn lines_are_classified() {
        assert_eq!(
            parse_line(r#"{"QMP": {"version": {}, "capabilities": []}}"#).unwrap(),
            Message::Greeting
        );
        assert_eq!(
            parse_line(r#"{"return": {"status": "paused", "running": false}}"#).unwrap(),
            Message::Return(json!({"status": "paused", "running": false}))
        );
        assert_eq!(
            parse_line(r#"{"error": {"class": "GenericError", "desc": "no"}}"#).unwrap(),
            Message::Error {
                class: "GenericError".into(),
                desc: "no".into()
            }
        );
        assert_eq!(
            parse_line(r#"{"event": "STOP", "timestamp": {}}"#).unwrap(),
            Message::Event("STOP".into())
        );
        assert!(parse_line("{}").is_err());
        assert!(parse_line("not json").is_err());
    }

    #[test]
    fn commands_skip_events_and_report_errors() {
        let dir = std::env::temp_dir().join(format!("hearth-qmp-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("qmp.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
                .unwrap();
            let mut line = String::new();
            for reply in [
                "{\"return\": {}}\n".to_string(),
                "{\"event\": \"RESUME\"}\n{\"return\": {\"status\": \"running\"}}\n".to_string(),
                "{\"error\": {\"class\": \"GenericError\", \"desc\": \"bad\"}}\n".to_string(),
            ] {
                line.clear();
                r.read_line(&mut line).unwrap();
                assert!(line.contains("execute"), "{line}");
                w.write_all(reply.as_bytes()).unwrap();
            }
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut q = Qmp::connect(&path, deadline).unwrap();
        assert_eq!(q.status(deadline).unwrap(), "running");
        let err = q.execute("cont", None, deadline).unwrap_err();
        assert!(err.to_string().contains("GenericError: bad"), "{err}");
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
