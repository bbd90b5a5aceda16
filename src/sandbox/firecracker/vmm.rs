//! One Firecracker process: its private directory (API socket, vsock
//! socket, log), spawning it, reaching its API, noticing and logging its
//! death, and stopping it. Dropping a [`Vmm`] kills and reaps the process
//! and removes the directory.

use std::fmt;
use std::fs;
use std::io;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use super::api::{Api, ApiError};
use crate::sandbox::vmfiles::{socket_path_fits, tail};

/// Bytes of the VMM's log (its own lines and the guest console) quoted in errors.
const LOG_TAIL_BYTES: u64 = 2048;
/// The API socket, the vsock socket and the log inside a VMM's directory.
pub const API_SOCK: &str = "api.sock";
pub const VSOCK_SOCK: &str = "v.sock";
pub const LOG_FILE: &str = "firecracker.log";

/// Why a VMM did not do what was asked of it.
#[derive(Debug)]
pub enum VmmError {
    /// A host operation around the VMM failed; `what` names it.
    Io { what: String, err: io::Error },
    /// A socket path would not fit `sun_path`.
    PathTooLong(PathBuf),
    /// Firecracker could not be started.
    Start { bin: PathBuf, err: io::Error },
    /// Firecracker exited; the end of its log.
    Exited {
        status: ExitStatus,
        log_tail: String,
    },
    /// An API request failed.
    Api(ApiError),
    /// The agent's vsock port could not be reached.
    Vsock(io::Error),
}

impl fmt::Display for VmmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmmError::Io { what, err } => write!(f, "{what}: {err}"),
            VmmError::PathTooLong(p) => write!(
                f,
                "socket path {} is longer than a Unix socket address allows (107 bytes); use a shorter --state-dir",
                p.display()
            ),
            VmmError::Start { bin, err } => write!(f, "cannot start {}: {err}", bin.display()),
            VmmError::Exited { status, log_tail } => {
                write!(f, "firecracker exited ({status}){log_tail}")
            }
            VmmError::Api(e) => write!(f, "{e}"),
            VmmError::Vsock(e) => write!(f, "agent vsock: {e}"),
        }
    }
}

impl std::error::Error for VmmError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            VmmError::Io { err, .. } | VmmError::Start { err, .. } | VmmError::Vsock(err) => {
                Some(err)
            }
            VmmError::Api(e) => Some(e),
            _ => None,
        }
    }
}

/// A running Firecracker and its private directory.
pub struct Vmm {
    child: Child,
    dir: PathBuf,
    /// Shown in logs: the function and the instance's role.
    label: String,
    /// hearth killed it (its exit is no news), or its exit was logged.
    accounted: bool,
}

impl Vmm {
    /// Starts `firecracker --api-sock <dir>/api.sock` with `cwd` as its
    /// working directory (relative drive paths resolve there). A stale
    /// `dir` of an earlier VMM is removed first, sockets included.
    pub fn spawn(
        bin: &Path,
        dir: &Path,
        cwd: &Path,
        id: &str,
        label: String,
        core: Option<usize>,
    ) -> Result<Vmm, VmmError> {
        for name in [API_SOCK, VSOCK_SOCK] {
            let p = dir.join(name);
            if !socket_path_fits(&p) {
                return Err(VmmError::PathTooLong(p));
            }
        }
        let io_at = |what: String| move |err| VmmError::Io { what, err };
        let _ = fs::remove_dir_all(dir);
        fs::create_dir_all(dir).map_err(io_at(format!("create {}", dir.display())))?;
        let log_path = dir.join(LOG_FILE);
        let log =
            fs::File::create(&log_path).map_err(io_at(format!("create {}", log_path.display())))?;
        let log2 = log
            .try_clone()
            .map_err(io_at(format!("dup {}", log_path.display())))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--api-sock")
            .arg(dir.join(API_SOCK))
            .args(["--id", id, "--level", "Warning"])
            .current_dir(cwd)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            // Out of the terminal's process group: Ctrl-C is hearth's to handle.
            .process_group(0);
        // SAFETY: the closure runs between fork and exec and only makes
        // async-signal-safe system calls on plain data.
        unsafe {
            cmd.pre_exec(move || {
                // The VMM dies with the hearth thread that started it.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
                if let Some(core) = core {
                    let _ = crate::util::cpu::pin_thread(0, core);
                }
                Ok(())
            });
        }
        let child = cmd.spawn().map_err(|err| {
            let _ = fs::remove_dir_all(dir);
            VmmError::Start {
                bin: bin.to_path_buf(),
                err,
            }
        })?;
        Ok(Vmm {
            child,
            dir: dir.to_path_buf(),
            label,
            accounted: false,
        })
    }

    /// Its private directory (sockets, log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// `Err(Exited)` once the process has ended.
    pub fn check_alive(&mut self) -> Result<(), VmmError> {
        match self.child.try_wait() {
            Ok(Some(status)) => Err(VmmError::Exited {
                status,
                log_tail: self.log_tail(),
            }),
            _ => Ok(()),
        }
    }

    /// Connects to the API socket, waiting for Firecracker to make it.
    pub fn api(&mut self, deadline: Instant) -> Result<Api, VmmError> {
        let sock = self.dir.join(API_SOCK);
        loop {
            match Api::connect(&sock) {
                Ok(a) => return Ok(a),
                Err(err) => {
                    self.check_alive()?;
                    if Instant::now() >= deadline {
                        return Err(VmmError::Io {
                            what: format!("connect {}", sock.display()),
                            err,
                        });
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }

    /// The end of the VMM's log (its messages and the guest console), for errors.
    pub fn log_tail(&self) -> String {
        let t = tail(&self.dir.join(LOG_FILE), LOG_TAIL_BYTES);
        if t.trim().is_empty() {
            String::new()
        } else {
            format!("\n--- firecracker:\n{}", t.trim_end())
        }
    }

    /// SIGKILL, unless the process already ended by itself: then its exit
    /// status and the end of its log are logged, once.
    pub fn kill(&mut self) {
        if self.accounted {
            return;
        }
        self.accounted = true;
        match self.child.try_wait() {
            Ok(Some(status)) => eprintln!(
                "hearth: firecracker: VMM of {} (pid {}) died: {status}{}",
                self.label,
                self.child.id(),
                self.log_tail()
            ),
            _ => {
                let _ = self.child.kill();
            }
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.kill();
        let _ = self.child.wait();
        let _ = fs::remove_dir_all(&self.dir);
    }
}
