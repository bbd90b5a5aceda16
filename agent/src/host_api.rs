//! Host-served Runtime API (process sandbox, `--runtime <kind> --host-serves-api`):
//! hearth's own event loop answers the runtime's HTTP, so no relay process sits
//! between them. The agent, as PID 1 inside the sandbox's network namespace,
//! only does what hearth cannot do from outside:
//!
//! 1. before anything of the function runs, binds 127.0.0.1:9001 and makes one
//!    socket pair each for the bootstrap's stdout and stderr, and sends hearth
//!    the listener and the host ends in one SCM_RIGHTS message on the channel
//!    (so nothing the function controls can take part in that message);
//! 2. reads HELLO from the channel and starts the bootstrap with Lambda's
//!    environment (its stdout/stderr are those sockets: hearth tags the lines
//!    with the request in flight, in order with the answers);
//! 3. supervises it like direct mode and, when it exits, sends an EXIT frame
//!    with Lambda's words for its status on the channel, then exits.

use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::protocol::{self, FrameDecoder, FrameType};
use crate::rapi::{self, Function, Kind};
use crate::runtime::{RuntimeHandle, RuntimeSpec, BASE_ENV};
use crate::runtime_api;
use crate::sys;

/// Longest wait for HELLO after the fds went out (hearth sends it at once).
const HELLO_WAIT: Duration = Duration::from_secs(30);
/// Largest HELLO accepted (function settings and environment).
const HELLO_BYTES_MAX: usize = 1 << 20;

/// The bootstrap started, and its process.
pub struct Started {
    pub handle: RuntimeHandle,
}

/// Steps 1 and 2 of the module docs on `channel` (blocking); returns the
/// running bootstrap.
pub fn start(channel: RawFd, kind: Kind, spec: &RuntimeSpec) -> io::Result<Started> {
    let listener = TcpListener::bind(rapi::LISTEN_ADDR)
        .map_err(|e| io::Error::other(format!("cannot listen on {}: {e}", rapi::LISTEN_ADDR)))?;
    sys::set_defer_accept(listener.as_raw_fd(), 1)?;
    let (out_host, out_guest) = sys::stream_socketpair()?;
    let (err_host, err_guest) = sys::stream_socketpair()?;
    send_fds(
        channel,
        &[
            listener.as_raw_fd(),
            out_host.as_raw_fd(),
            err_host.as_raw_fd(),
        ],
    )?;
    drop((listener, out_host, err_host));
    let f = read_hello(channel)?;
    let argv = kind.command(&f.task_root);
    let inherited: Vec<(String, String)> = BASE_ENV
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .chain(spec.extra_env.iter().cloned())
        .collect();
    let stream = runtime_api::log_stream_name(sys::realtime_ms(), runtime_api::random_u64s());
    let env = f.environment(kind, inherited, &stream);
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .env_clear()
        .envs(env)
        .current_dir(&f.task_root)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out_guest))
        .stderr(Stdio::from(err_guest))
        .process_group(0);
    // SAFETY: the closure runs in the forked child before exec and only makes
    // async-signal-safe system calls.
    unsafe {
        cmd.pre_exec(|| {
            // Nothing the agent holds (the channel above all) leaks into the runtime.
            libc::close_range(
                3,
                libc::c_uint::MAX,
                libc::CLOSE_RANGE_CLOEXEC as libc::c_int,
            );
            Ok(())
        });
    }
    let child = cmd
        .spawn()
        .map_err(|e| io::Error::other(format!("cannot start {}: {e}", argv.join(" "))))?;
    Ok(Started {
        handle: RuntimeHandle {
            pid: child.id() as libc::pid_t,
        },
    })
}

/// Step 3's report: one EXIT frame (blocking, best effort: hearth may be gone).
pub fn report_exit(channel: RawFd, message: &str) {
    let mut out = Vec::new();
    protocol::encode(&mut out, FrameType::Exit, 0, 0, &[], message.as_bytes());
    let _ = sys::set_nonblocking(channel, false);
    let mut buf = &out[..];
    while !buf.is_empty() {
        match sys::write(channel, buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

/// Reads frames until HELLO; anything else before it is a protocol error.
fn read_hello(channel: RawFd) -> io::Result<Function> {
    let deadline = Instant::now() + HELLO_WAIT;
    let mut dec = FrameDecoder::new();
    loop {
        if let Some(f) = dec
            .next_frame()
            .map_err(|e| io::Error::other(format!("protocol error: {e}")))?
        {
            if f.kind != FrameType::Hello {
                return Err(io::Error::other(format!(
                    "expected HELLO from the host, got {:?}",
                    f.kind
                )));
            }
            let meta: serde_json::Value = serde_json::from_slice(&f.meta)
                .map_err(|e| io::Error::other(format!("HELLO metadata: {e}")))?;
            return Ok(Function::from_hello(&meta));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        let mut p = [libc::pollfd {
            fd: channel,
            events: libc::POLLIN,
            revents: 0,
        }];
        if left.is_zero() || sys::poll(&mut p, left.as_millis() as i32 + 1)? == 0 {
            if left.is_zero() {
                return Err(io::Error::other("no HELLO from the host"));
            }
            continue;
        }
        const CHUNK: usize = 64 << 10;
        let got = sys::read(channel, dec.spare(CHUNK));
        dec.filled(CHUNK, *got.as_ref().unwrap_or(&0));
        match got {
            Ok(0) => return Err(io::Error::other("the host closed the channel")),
            Ok(_) if dec.pending() > HELLO_BYTES_MAX => {
                return Err(io::Error::other("HELLO over 1 MiB"))
            }
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            Err(e) => return Err(e),
        }
    }
}

/// One byte with `fds` attached as SCM_RIGHTS.
fn send_fds(channel: RawFd, fds: &[RawFd]) -> io::Result<()> {
    let payload = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    let fds_bytes = std::mem::size_of_val(fds);
    // SAFETY: CMSG_SPACE only computes a size.
    let space = unsafe { libc::CMSG_SPACE(fds_bytes as u32) } as usize;
    // u64 words keep the control buffer aligned for cmsghdr.
    let mut control = vec![0u64; space.div_ceil(8)];
    // SAFETY: msghdr is plain data; zeroed is a valid empty header.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = space as _;
    // SAFETY: the control buffer holds one header with room for `fds`
    // (CMSG_SPACE above); CMSG_* only compute pointers into it.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(fds_bytes as u32) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(c).cast(), fds.len());
    }
    loop {
        // SAFETY: `msg` points at live buffers for the duration of the call.
        let n = unsafe { libc::sendmsg(channel, &msg, libc::MSG_NOSIGNAL) };
        if n == 1 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => {
                let mut p = [libc::pollfd {
                    fd: channel,
                    events: libc::POLLOUT,
                    revents: 0,
                }];
                sys::poll(&mut p, 1000)?;
            }
            _ => return Err(e),
        }
    }
}
