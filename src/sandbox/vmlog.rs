//! Capped VMM logs: a VMM's stdout/stderr (for QEMU also the guest's serial
//! console) go into a pipe that hearth drains into a file holding at most
//! [`FILE_BYTES_MAX`] bytes — the first [`HEAD_BYTES`], a note of how much was
//! dropped, and the latest [`TAIL_BYTES`] or more — so that a guest writing to
//! its console without end cannot fill the state directory's filesystem,
//! while errors still quote the start and the end of what it printed.
//!
//! One thread drains every VM's pipes ([`open`]): an epoll over the read
//! ends. Quoting a log ([`VmLog::tail`]) first drains its pipe, so the last
//! words of a VMM that just died are in the quote.

use std::collections::HashMap;
use std::fs;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Bytes kept from the start of a log.
pub const HEAD_BYTES: u64 = 64 << 10;
/// Bytes of the latest output a log keeps at least, once it has been cut.
pub const TAIL_BYTES: u64 = 64 << 10;
/// Largest size of a log file on disk.
pub const FILE_BYTES_MAX: u64 = 256 << 10;
/// Bytes read from a pipe per `read`.
const READ_BYTES: usize = 64 << 10;
/// Reads from one pipe per wake-up of the drain thread, so that one flooding
/// VM does not hold the others back (epoll reports it again).
const READS_PER_TURN: usize = 16;
/// Events taken per `epoll_wait`.
const EVENTS_MAX: usize = 64;

// The kept tail never reaches back into the previous note.
const _: () = assert!(FILE_BYTES_MAX - HEAD_BYTES > TAIL_BYTES + READ_BYTES as u64 + 128);

/// A log file that keeps its first [`HEAD_BYTES`] and, once it would grow
/// past [`FILE_BYTES_MAX`], only the latest [`TAIL_BYTES`] after a note.
struct Capped {
    file: fs::File,
    /// Bytes in the file.
    len: u64,
    /// Bytes ever written to the log.
    received: u64,
}

impl Capped {
    fn append(&mut self, data: &[u8]) {
        let n = data.len() as u64;
        self.received += n;
        if self.len + n <= FILE_BYTES_MAX {
            if self.file.write_all_at(data, self.len).is_ok() {
                self.len += n;
            }
            return;
        }
        // Cut: head | note | the last TAIL_BYTES of (file after the head ++ data).
        let head = self.len.min(HEAD_BYTES);
        let from_file = TAIL_BYTES.saturating_sub(n).min(self.len - head);
        let mut kept = vec![0; from_file as usize];
        if self
            .file
            .read_exact_at(&mut kept, self.len - from_file)
            .is_err()
        {
            kept.clear();
        }
        let from_data = n.min(TAIL_BYTES) as usize;
        kept.extend_from_slice(&data[data.len() - from_data..]);
        let dropped = self.received - head - kept.len() as u64;
        let mut out = format!("\n[hearth: {dropped} bytes of output dropped]\n").into_bytes();
        out.extend_from_slice(&kept);
        let written = self.file.write_all_at(&out, head).is_ok();
        let len = if written {
            head + out.len() as u64
        } else {
            head
        };
        let _ = self.file.set_len(len);
        self.len = len;
    }
}

/// One log: its pipe's read end and its file.
struct Sink {
    read: OwnedFd,
    out: Capped,
    /// The pipe reported end-of-file (every writer is gone) or failed.
    closed: bool,
}

impl Sink {
    /// Moves what is in the pipe (at most `reads` reads) to the file; false
    /// once the pipe is done.
    fn pump(&mut self, buf: &mut [u8], reads: usize) -> bool {
        for _ in 0..reads {
            if self.closed {
                break;
            }
            // SAFETY: reads into a buffer we own, of its length.
            let r =
                unsafe { libc::read(self.read.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            match r {
                0 => self.closed = true,
                n if n > 0 => self.out.append(&buf[..n as usize]),
                _ => match io::Error::last_os_error().kind() {
                    io::ErrorKind::Interrupted => {}
                    io::ErrorKind::WouldBlock => break,
                    _ => self.closed = true,
                },
            }
        }
        !self.closed
    }
}

/// A VMM's log; dropping it stops draining (the file stays where it is).
pub struct VmLog {
    id: u64,
    sink: Arc<Mutex<Sink>>,
}

/// Creates (truncating, mode 0600) the log file `path` and a pipe whose read
/// end the drain thread moves into it; returns the log and the pipe's write
/// end, for the VMM's stdout/stderr (close-on-exec, blocking).
pub fn open(path: &Path) -> io::Result<(VmLog, OwnedFd)> {
    let file = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned by nothing else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // Only the read end: the VMM writes blocking (a full pipe slows it down).
    // SAFETY: fcntl on a descriptor we own.
    let nonblocking = unsafe {
        let flags = libc::fcntl(read.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(read.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if !nonblocking {
        return Err(io::Error::last_os_error());
    }
    let drain = drain()?;
    let id = drain.next_id.fetch_add(1, Ordering::Relaxed);
    let fd = read.as_raw_fd();
    let sink = Arc::new(Mutex::new(Sink {
        read,
        out: Capped {
            file,
            len: 0,
            received: 0,
        },
        closed: false,
    }));
    // In the table before epoll can report it.
    drain.sinks.lock().unwrap().insert(id, sink.clone());
    if let Err(e) = drain.ctl(libc::EPOLL_CTL_ADD, fd, id) {
        drain.sinks.lock().unwrap().remove(&id);
        return Err(e);
    }
    Ok((VmLog { id, sink }, write))
}

impl VmLog {
    /// The last `bytes` of the log (after draining its pipe), lossily decoded.
    pub fn tail(&self, bytes: u64) -> String {
        let mut s = self.sink.lock().unwrap();
        let mut buf = vec![0; READ_BYTES];
        // Bounded: a VMM still writing must not keep the caller here.
        s.pump(&mut buf, READS_PER_TURN);
        let from = s.out.len.saturating_sub(bytes);
        let mut out = vec![0; (s.out.len - from) as usize];
        match s.out.file.read_exact_at(&mut out, from) {
            Ok(()) => String::from_utf8_lossy(&out).into_owned(),
            Err(_) => String::new(),
        }
    }

    /// Bytes written to the log so far, kept or not.
    pub fn received(&self) -> u64 {
        self.sink.lock().unwrap().out.received
    }
}

impl Drop for VmLog {
    fn drop(&mut self) {
        let Ok(drain) = drain() else {
            return;
        };
        // One lock at a time: the drain thread takes the sink's, then the table's.
        let registered = drain.sinks.lock().unwrap().remove(&self.id).is_some();
        if registered {
            let s = self.sink.lock().unwrap();
            let _ = drain.ctl(libc::EPOLL_CTL_DEL, s.read.as_raw_fd(), self.id);
        }
    }
}

/// The drain thread's table and epoll set.
struct Drain {
    epoll: crate::util::sys::Epoll,
    sinks: Mutex<HashMap<u64, Arc<Mutex<Sink>>>>,
    next_id: AtomicU64,
}

impl Drain {
    fn start() -> io::Result<&'static Drain> {
        let epoll = crate::util::sys::Epoll::new()?;
        let drain: &'static Drain = Box::leak(Box::new(Drain {
            epoll,
            sinks: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }));
        std::thread::Builder::new()
            .name("hearth-vmlog".into())
            .spawn(move || drain.run())?;
        Ok(drain)
    }

    fn ctl(&self, op: i32, fd: RawFd, token: u64) -> io::Result<()> {
        self.epoll.ctl(op, fd, libc::EPOLLIN, token)
    }

    fn run(&self) {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; EVENTS_MAX];
        let mut buf = vec![0; READ_BYTES];
        loop {
            let n = self.epoll.wait(&mut events);
            for ev in &events[..n] {
                let id = ev.u64;
                let Some(sink) = self.sinks.lock().unwrap().get(&id).cloned() else {
                    continue;
                };
                let mut s = sink.lock().unwrap();
                if !s.pump(&mut buf, READS_PER_TURN) {
                    // Done: out of the set, or epoll reports the hang-up for ever.
                    let _ = self.ctl(libc::EPOLL_CTL_DEL, s.read.as_raw_fd(), id);
                    self.sinks.lock().unwrap().remove(&id);
                }
            }
        }
    }
}

fn drain() -> io::Result<&'static Drain> {
    static DRAIN: OnceLock<Result<&'static Drain, String>> = OnceLock::new();
    DRAIN
        .get_or_init(|| Drain::start().map_err(|e| e.to_string()))
        .clone()
        .map_err(|e| io::Error::other(format!("VMM log thread: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};

    fn temp(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("hearth-vmlog-{}-{name}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Waits until the drain thread has moved `bytes` into the log.
    fn wait_received(log: &VmLog, bytes: u64) {
        let t = Instant::now();
        while log.received() < bytes && t.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(log.received(), bytes);
    }

    #[test]
    fn a_flood_through_the_pipe_keeps_the_head_a_note_and_the_latest_output() {
        let dir = temp("flood");
        let path = dir.join("console.log");
        let (log, write) = open(&path).unwrap();
        // 4 MiB of numbered lines, from another thread as a VMM would.
        let input: Vec<u8> = (0..300_000u32)
            .flat_map(|i| format!("line {i:08}\n").into_bytes())
            .take(4 << 20)
            .collect();
        let total = input.len() as u64;
        let writer = {
            let input = input.clone();
            std::thread::spawn(move || {
                let mut w = fs::File::from(write);
                w.write_all(&input).unwrap();
            })
        };
        writer.join().unwrap();
        wait_received(&log, total);
        let on_disk = fs::read(&path).unwrap();
        assert!(on_disk.len() as u64 <= FILE_BYTES_MAX, "{}", on_disk.len());
        let head = HEAD_BYTES as usize;
        assert_eq!(on_disk[..head], input[..head]);
        let rest = &on_disk[head..];
        let text = String::from_utf8_lossy(rest);
        let note_end = rest
            .iter()
            .position(|&b| b == b'\n')
            .map(|i| i + 1)
            .unwrap();
        let note_end = note_end + rest[note_end..].iter().position(|&b| b == b'\n').unwrap() + 1;
        let kept = &rest[note_end..];
        assert!(kept.len() as u64 >= TAIL_BYTES, "{}", kept.len());
        assert_eq!(kept, &input[input.len() - kept.len()..]);
        let dropped = total - HEAD_BYTES - kept.len() as u64;
        assert!(
            text.starts_with(&format!("\n[hearth: {dropped} bytes of output dropped]\n")),
            "{}",
            &text[..80]
        );
        // The quote is the latest output.
        let t = log.tail(22);
        assert_eq!(t.as_bytes(), &input[input.len() - 22..]);
        drop(log);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn output_under_the_cap_is_kept_whole_and_quoted_at_once() {
        let dir = temp("small");
        let path = dir.join("firecracker.log");
        let (log, write) = open(&path).unwrap();
        let mut w = fs::File::from(write);
        w.write_all(b"starting\npanic: no init found\n").unwrap();
        // Quoting drains the pipe itself: no wait for the drain thread.
        assert!(log.tail(2048).ends_with("panic: no init found\n"));
        drop(w);
        wait_received(&log, 30);
        assert_eq!(
            fs::read(&path).unwrap(),
            b"starting\npanic: no init found\n"
        );
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        drop(log);
        fs::remove_dir_all(&dir).unwrap();
    }
}
