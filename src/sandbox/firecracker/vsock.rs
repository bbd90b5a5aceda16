//! The host end of the agent channel: Firecracker's hybrid vsock. hearth
//! connects to the VMM's Unix socket, writes `CONNECT <port>\n` in one
//! write, and once Firecracker answers `OK <host port>\n` the stream carries
//! the agent's frames, raw; the returned socket is then an ordinary channel
//! fd for the core's event loop. If nothing listens on the guest port yet,
//! Firecracker closes the socket: retried until the deadline.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// The guest port the agent listens on (`hearth.channel=vsock:<port>`).
pub const AGENT_PORT: u32 = 5000;
/// Longest handshake answer line read.
const ANSWER_BYTES_MAX: usize = 32;
/// Pause between attempts while the guest is not listening yet.
const RETRY: Duration = Duration::from_millis(20);

/// The `CONNECT` line for `port`.
pub fn connect_line(port: u32) -> String {
    format!("CONNECT {port}\n")
}

/// The host-side port of an `OK <port>` answer line (without its newline).
pub fn parse_ok(line: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(line).ok()?;
    text.strip_prefix("OK ")?.trim().parse().ok()
}

/// One attempt: `Ok(None)` when the guest is not listening (closed socket).
fn attempt(uds: &Path, port: u32, deadline: Instant) -> io::Result<Option<UnixStream>> {
    let mut s = UnixStream::connect(uds)?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    s.set_read_timeout(Some(left))?;
    s.write_all(connect_line(port).as_bytes())?;
    // Byte by byte: nothing after the newline belongs to the handshake.
    let mut line = Vec::with_capacity(ANSWER_BYTES_MAX);
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Ok(None),
            Ok(_) if b[0] == b'\n' => break,
            Ok(_) if line.len() < ANSWER_BYTES_MAX => line.push(b[0]),
            Ok(_) => return Err(io::Error::other("vsock handshake answer too long")),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
            Err(e) => return Err(e),
        }
    }
    if parse_ok(&line).is_none() {
        return Err(io::Error::other(format!(
            "vsock handshake answer {:?}",
            String::from_utf8_lossy(&line)
        )));
    }
    s.set_read_timeout(None)?;
    Ok(Some(s))
}

/// Connects to guest `port` through the VMM's socket `uds`, retrying until
/// `deadline` while the socket is missing or the guest does not listen;
/// `alive` is asked between attempts (a dead VMM ends the wait).
pub fn connect(
    uds: &Path,
    port: u32,
    deadline: Instant,
    mut alive: impl FnMut() -> io::Result<()>,
) -> io::Result<UnixStream> {
    loop {
        let err = match attempt(uds, port, deadline) {
            Ok(Some(s)) => return Ok(s),
            Ok(None) => io::Error::new(
                io::ErrorKind::ConnectionRefused,
                format!("nothing listens on guest vsock port {port}"),
            ),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound
                        | io::ErrorKind::ConnectionRefused
                        | io::ErrorKind::BrokenPipe
                ) =>
            {
                e
            }
            Err(e) => return Err(e),
        };
        alive()?;
        if Instant::now() + RETRY >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("{}: {err}", uds.display()),
            ));
        }
        std::thread::sleep(RETRY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn handshake_lines() {
        assert_eq!(connect_line(5000), "CONNECT 5000\n");
        assert_eq!(parse_ok(b"OK 1073741824"), Some(1073741824));
        assert_eq!(parse_ok(b"OK x"), None);
        assert_eq!(parse_ok(b"ERR"), None);
    }

    /// A stand-in for Firecracker's muxer: the first connection is closed
    /// (guest not listening yet), the second is accepted; bytes after the
    /// OK line stay in the stream.
    #[test]
    fn connect_retries_until_the_guest_listens() {
        let dir = std::env::temp_dir().join(format!("hearth-fcvsock-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let uds = dir.join("v.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        let muxer = std::thread::spawn(move || {
            for accept in [false, true] {
                let (mut s, _) = listener.accept().unwrap();
                let mut req = [0u8; 13];
                s.read_exact(&mut req).unwrap();
                assert_eq!(&req, b"CONNECT 5000\n");
                if accept {
                    s.write_all(b"OK 1073741824\nframe").unwrap();
                    let mut echo = [0u8; 2];
                    s.read_exact(&mut echo).unwrap();
                    return echo;
                }
            }
            unreachable!()
        });
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut s = connect(&uds, AGENT_PORT, deadline, || Ok(())).unwrap();
        let mut first = [0u8; 5];
        s.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"frame");
        s.write_all(b"hi").unwrap();
        assert_eq!(&muxer.join().unwrap(), b"hi");
        // A dead VMM ends the wait at once.
        std::fs::remove_file(&uds).unwrap();
        let err = connect(&uds, AGENT_PORT, deadline, || {
            Err(io::Error::other("vmm died"))
        })
        .unwrap_err();
        assert_eq!(err.to_string(), "vmm died");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
