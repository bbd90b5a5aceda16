//! The start-up exchange every backend performs on a new channel: send HELLO,
//! wait for READY (or INIT_ERROR), collecting log output on the way.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::functions::FunctionSpec;
use crate::protocol::{self, FrameDecoder, FrameType};
use crate::sandbox::{InitLogs, StartError};

/// The HELLO metadata for `spec` (also sent again after every snapshot restore).
pub fn hello_meta(spec: &FunctionSpec) -> Vec<u8> {
    let time_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let env: serde_json::Map<String, serde_json::Value> = spec
        .env
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
        .collect();
    serde_json::to_vec(&serde_json::json!({
        "time_ms": time_ms,
        "function": spec.id,
        "handler": spec.handler,
        "task_root": "/var/task",
        "memory_mb": spec.memory_mb,
        "timeout_ms": spec.timeout_ms,
        "env": env,
        // Fresh randomness for the guest kernel of every restored clone.
        "seed0": crate::functions::random_u64(),
        "seed1": crate::functions::random_u64(),
        "seed2": crate::functions::random_u64(),
        "seed3": crate::functions::random_u64(),
    }))
    .expect("json of plain values")
}

/// Sends HELLO on `fd` and waits up to `timeout` for the runtime's answer.
/// Returns the init duration the runtime reported and its output lines.
pub fn hello(
    fd: BorrowedFd<'_>,
    spec: &FunctionSpec,
    timeout: Duration,
) -> Result<(f64, InitLogs), StartError> {
    let mut frame = Vec::new();
    protocol::encode(&mut frame, FrameType::Hello, 0, 0, &hello_meta(spec), &[]);
    let file = fd
        .try_clone_to_owned()
        .map_err(|e| StartError::Sandbox(format!("dup channel: {e}")))?;
    let mut stream = std::fs::File::from(file);
    stream
        .write_all(&frame)
        .map_err(|e| StartError::Sandbox(format!("send hello: {e}")))?;
    let deadline = Instant::now() + timeout;
    let mut dec = FrameDecoder::new();
    let mut logs = Vec::new();
    loop {
        while let Some(f) = dec
            .next_frame()
            .map_err(|e| StartError::Sandbox(format!("agent protocol: {e}")))?
        {
            match f.kind {
                FrameType::Ready => {
                    let meta: serde_json::Value =
                        serde_json::from_slice(&f.meta).unwrap_or_default();
                    return Ok((meta["init_ms"].as_f64().unwrap_or(0.0), logs));
                }
                FrameType::InitError => {
                    let meta: serde_json::Value =
                        serde_json::from_slice(&f.meta).unwrap_or_default();
                    return Err(StartError::Init {
                        error_type: meta["errorType"]
                            .as_str()
                            .unwrap_or("Runtime.InitError")
                            .to_string(),
                        message: meta["errorMessage"]
                            .as_str()
                            .unwrap_or("the handler failed to load")
                            .to_string(),
                    });
                }
                FrameType::Log => {
                    logs.extend(String::from_utf8_lossy(&f.body).lines().map(str::to_string))
                }
                other => {
                    return Err(StartError::Sandbox(format!(
                        "agent sent {other:?} before ready"
                    )))
                }
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(StartError::Sandbox(format!(
                "runtime not ready after {} ms",
                timeout.as_millis()
            )));
        }
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid descriptor.
        let n = unsafe { libc::poll(&mut pfd, 1, left.as_millis().min(i32::MAX as u128) as i32) };
        if n <= 0 {
            continue;
        }
        let buf = dec.spare(64 * 1024);
        match stream.read(buf) {
            Ok(0) => {
                dec.filled(64 * 1024, 0);
                let tail = if logs.is_empty() {
                    String::new()
                } else {
                    format!(": {}", logs.join(" | "))
                };
                return Err(StartError::Sandbox(format!(
                    "instance exited during start-up{tail}"
                )));
            }
            Ok(n) => dec.filled(64 * 1024, n),
            Err(e)
                if e.kind() == std::io::ErrorKind::Interrupted
                    || e.kind() == std::io::ErrorKind::WouldBlock =>
            {
                dec.filled(64 * 1024, 0)
            }
            Err(e) => return Err(StartError::Sandbox(format!("read channel: {e}"))),
        }
    }
}

/// Lines of [`drain_logs`] kept (the last ones).
pub const DRAIN_LINES_MAX: usize = 20;

/// The last output lines waiting on an agent's log socket (direct mode), read
/// for up to `wait` (at most [`DRAIN_LINES_MAX`], each cut at 500 bytes): for
/// the error message of an instance that died starting up.
pub fn drain_logs(fd: BorrowedFd<'_>, wait: Duration) -> InitLogs {
    let deadline = Instant::now() + wait;
    let mut dec = FrameDecoder::new();
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mut pfd = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll on one valid descriptor.
        if unsafe { libc::poll(&mut pfd, 1, left.as_millis() as i32) } <= 0 {
            break;
        }
        let buf = dec.spare(64 * 1024);
        // SAFETY: reading into the decoder's spare space.
        let n = unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            break;
        }
        dec.filled(64 * 1024, n as usize);
        while let Ok(Some(f)) = dec.next_frame() {
            if f.kind == FrameType::Log {
                for l in String::from_utf8_lossy(&f.body).lines() {
                    let mut cut = l.len().min(500);
                    while !l.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    lines.push(l[..cut].to_string());
                }
                let excess = lines.len().saturating_sub(DRAIN_LINES_MAX);
                lines.drain(..excess);
            }
        }
    }
    lines
}
