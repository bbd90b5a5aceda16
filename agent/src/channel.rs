//! The byte stream to the host, whatever carries it.
//!
//! | transport          | used by             | when the host goes away                     |
//! |--------------------|---------------------|---------------------------------------------|
//! | inherited socket   | process sandbox     | the instance is over                        |
//! | virtio-serial port | QEMU                | port stays open; wait for the host to return |
//! | AF_VSOCK listener  | Firecracker         | accept the host's next connection           |
//!
//! The relay sees one connected fd (or none while waiting) and reports when
//! it lost the stream; each transport decides what "reconnect" means.

use std::fmt;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::sys::{self, cvt};

/// How often a disconnected virtio-serial port is checked for the host's
/// return. The port cannot signal that by itself: while the host is away
/// poll(2) reports POLLHUP continuously.
pub const PORT_RETRY_MS: i32 = 20;

/// Where the host channel comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChannelSpec {
    /// An already connected socket handed over by the launcher.
    InheritedFd(RawFd),
    /// The virtio-serial port with this name (`/sys/class/virtio-ports/*/name`).
    VirtioPort(String),
    /// Listen on this AF_VSOCK port; the host connects (Firecracker `CONNECT`).
    Vsock(u32),
}

impl fmt::Display for ChannelSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChannelSpec::InheritedFd(fd) => write!(f, "fd {fd}"),
            ChannelSpec::VirtioPort(name) => write!(f, "virtio-port:{name}"),
            ChannelSpec::Vsock(port) => write!(f, "vsock:{port}"),
        }
    }
}

/// What losing the stream means for the instance.
#[derive(Debug, PartialEq, Eq)]
pub enum Lost {
    /// No way back: the instance ends.
    Final,
    /// The channel waits for the host to come back.
    WillReconnect,
}

enum Transport {
    Inherited,
    VirtioPort { port: OwnedFd, state: PortState },
    Vsock { listener: OwnedFd },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PortState {
    Connected,
    /// Host away; check again every [`PORT_RETRY_MS`].
    Waiting,
    /// The current host connection sent garbage: read and discard until the
    /// host disconnects, so the next connection starts on a frame boundary.
    Discarding,
}

/// The host stream plus its reconnect policy.
pub struct Channel {
    spec: ChannelSpec,
    transport: Transport,
    /// The connected stream (inherited socket or accepted vsock connection).
    conn: Option<OwnedFd>,
}

impl Channel {
    /// Opens the channel. For a virtio port, waits up to `wait` for the port
    /// to appear (its driver probes asynchronously).
    pub fn open(spec: &ChannelSpec, wait: Duration) -> io::Result<Channel> {
        let transport = match spec {
            ChannelSpec::InheritedFd(fd) => {
                if !sys::is_socket(*fd).map_err(|e| annotate(e, &format!("channel fd {fd}")))? {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidInput,
                        format!("channel fd {fd} is not a socket"),
                    ));
                }
                sys::set_nonblocking(*fd, true)?;
                // The runtime must never inherit the host's end.
                sys::set_cloexec(*fd, true)?;
                // SAFETY: the launcher handed this fd to us to own.
                let conn = unsafe { OwnedFd::from_raw_fd(*fd) };
                return Ok(Channel {
                    spec: spec.clone(),
                    transport: Transport::Inherited,
                    conn: Some(conn),
                });
            }
            ChannelSpec::VirtioPort(name) => {
                let dev = wait_for_port(Path::new("/sys/class/virtio-ports"), name, wait)?;
                let port = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .custom_flags(libc::O_NONBLOCK)
                    .open(&dev)
                    .map_err(|e| annotate(e, &format!("open {}", dev.display())))?;
                Transport::VirtioPort {
                    port: port.into(),
                    state: PortState::Waiting,
                }
            }
            ChannelSpec::Vsock(port) => Transport::Vsock {
                listener: vsock_listen(*port)?,
            },
        };
        let mut ch = Channel {
            spec: spec.clone(),
            transport,
            conn: None,
        };
        ch.tick();
        Ok(ch)
    }

    /// The connected stream, if the host is there.
    pub fn conn(&self) -> Option<RawFd> {
        match &self.transport {
            Transport::VirtioPort {
                port,
                state: PortState::Connected,
            } => Some(port.as_raw_fd()),
            Transport::VirtioPort { .. } => None,
            _ => self.conn.as_ref().map(|c| c.as_raw_fd()),
        }
    }

    /// An extra fd to poll for readability: a pending vsock connection.
    pub fn accept_fd(&self) -> Option<RawFd> {
        match &self.transport {
            Transport::Vsock { listener } => Some(listener.as_raw_fd()),
            _ => None,
        }
    }

    /// How long the relay may sleep before calling [`Channel::tick`].
    pub fn tick_ms(&self) -> Option<i32> {
        match &self.transport {
            Transport::VirtioPort {
                state: PortState::Waiting | PortState::Discarding,
                ..
            } => Some(PORT_RETRY_MS),
            _ => None,
        }
    }

    /// Periodic work: a waiting virtio port checks whether the host is back;
    /// a discarding one throws away what the broken connection sent.
    /// Returns true when a new connection became usable.
    pub fn tick(&mut self) -> bool {
        let Transport::VirtioPort { port, state } = &mut self.transport else {
            return false;
        };
        let fd = port.as_raw_fd();
        match *state {
            PortState::Connected => false,
            PortState::Waiting => {
                if port_hung_up(fd) {
                    return false;
                }
                *state = PortState::Connected;
                true
            }
            PortState::Discarding => {
                let mut scratch = [0u8; 4096];
                loop {
                    match sys::read(fd, &mut scratch) {
                        Ok(0) => {
                            *state = PortState::Waiting;
                            return false;
                        }
                        Ok(_) => continue,
                        Err(_) => return false,
                    }
                }
            }
        }
    }

    /// Accepts a pending vsock connection; a new one supersedes the old (the
    /// host only reconnects after losing its side, e.g. a snapshot restore).
    /// Returns true when a new connection became usable.
    pub fn accept(&mut self) -> io::Result<bool> {
        let Transport::Vsock { listener } = &self.transport else {
            return Ok(false);
        };
        // SAFETY: accept4 with null address pointers only returns an fd.
        let fd = unsafe {
            libc::accept4(
                listener.as_raw_fd(),
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if fd < 0 {
            let err = io::Error::last_os_error();
            return if err.kind() == io::ErrorKind::WouldBlock {
                Ok(false)
            } else {
                Err(err)
            };
        }
        if self.conn.is_some() {
            diag!(
                "host opened a new connection on {}; dropping the previous one",
                self.spec
            );
        }
        // SAFETY: accept4 returned a fresh fd that nothing else owns.
        self.conn = Some(unsafe { OwnedFd::from_raw_fd(fd) });
        Ok(true)
    }

    /// The stream hit EOF or an error. `discard` says the host sent garbage,
    /// so whatever else the current connection sends must be ignored.
    pub fn lost(&mut self, discard: bool) -> Lost {
        match &mut self.transport {
            Transport::Inherited => {
                self.conn = None;
                Lost::Final
            }
            Transport::VirtioPort { state, .. } => {
                *state = if discard {
                    PortState::Discarding
                } else {
                    PortState::Waiting
                };
                Lost::WillReconnect
            }
            Transport::Vsock { .. } => {
                self.conn = None;
                Lost::WillReconnect
            }
        }
    }

    /// Human-readable name for diagnostics.
    pub fn spec(&self) -> &ChannelSpec {
        &self.spec
    }
}

/// True while the host side of a virtio-serial port is not connected.
fn port_hung_up(fd: RawFd) -> bool {
    let mut p = [libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    }];
    match sys::poll(&mut p, 0) {
        Ok(_) => p[0].revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0,
        Err(_) => true,
    }
}

/// Finds `/dev/vportNpM` whose sysfs `name` is `name`, waiting up to `wait`.
fn wait_for_port(sys_dir: &Path, name: &str, wait: Duration) -> io::Result<PathBuf> {
    let deadline = Instant::now() + wait;
    loop {
        if let Some(dev) = find_port(sys_dir, name) {
            if dev.exists() {
                return Ok(dev);
            }
        }
        if Instant::now() >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("no virtio-serial port named {name:?} under {} after {} ms (is virtio_console loaded and the port on the QEMU command line?)", sys_dir.display(), wait.as_millis()),
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn find_port(sys_dir: &Path, name: &str) -> Option<PathBuf> {
    for entry in fs::read_dir(sys_dir).ok()?.flatten() {
        let Ok(text) = fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if text.trim_end() == name {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

/// A non-blocking AF_VSOCK socket listening on `port` for any CID.
fn vsock_listen(port: u32) -> io::Result<OwnedFd> {
    // SAFETY: socket returns a new fd or -1.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    })
    .map_err(|e| annotate(e, "AF_VSOCK socket (is the vsock transport module loaded?)"))?;
    // SAFETY: fd is fresh and ours.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_vm is plain data.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
    addr.svm_port = port;
    addr.svm_cid = libc::VMADDR_CID_ANY;
    let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
    // SAFETY: the address pointer and length describe `addr`.
    cvt(unsafe { libc::bind(fd, (&addr as *const libc::sockaddr_vm).cast(), len) })
        .map_err(|e| annotate(e, &format!("bind vsock port {port}")))?;
    // SAFETY: listen on the socket we just bound.
    cvt(unsafe { libc::listen(fd, 4) })
        .map_err(|e| annotate(e, &format!("listen on vsock port {port}")))?;
    Ok(sock)
}

fn annotate(e: io::Error, what: &str) -> io::Error {
    io::Error::new(e.kind(), format!("{what}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtio_port_is_found_by_its_sysfs_name() {
        let dir = std::env::temp_dir().join(format!("hearth-agent-ports-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        for (port, name) in [
            ("vport1p1", "org.qemu.guest_agent.0"),
            ("vport1p2", "hearth.agent"),
        ] {
            fs::create_dir_all(dir.join(port)).unwrap();
            fs::write(dir.join(port).join("name"), format!("{name}\n")).unwrap();
        }
        assert_eq!(
            find_port(&dir, "hearth.agent"),
            Some(PathBuf::from("/dev/vport1p2"))
        );
        assert_eq!(find_port(&dir, "other"), None);
        let err = wait_for_port(&dir, "other", Duration::from_millis(30)).unwrap_err();
        assert!(
            err.to_string()
                .contains("no virtio-serial port named \"other\""),
            "{err}"
        );
        fs::remove_dir_all(&dir).unwrap();
    }
}
