//! What the QEMU-backend tests share: whether they can run here, the static
//! agent the guest images carry, and the instance VMs of a function.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hearth::guest::{ext4, kernel};

/// Longest wait for one answer: deploys boot a VM under emulation.
pub const SLOW: Duration = Duration::from_secs(180);

/// The static release agent (`tools/build-agent.sh release`).
pub fn static_agent() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("target/x86_64-unknown-linux-gnu/release/hearth-agent")
}

/// Why the QEMU backend cannot run here, if it cannot: QEMU, a guest kernel,
/// the static agent, Node.js, mkfs.ext4.
pub fn skip_reason() -> Option<String> {
    if let Err(e) = hearth::sandbox::qemu::find_qemu() {
        return Some(e);
    }
    let scratch = super::temp_dir("qemu-kernel-probe");
    let k = kernel::locate(&scratch);
    let _ = fs::remove_dir_all(&scratch);
    if let Err(e) = k {
        return Some(e.to_string());
    }
    if !static_agent().is_file() {
        return Some(format!(
            "{} is missing: run tools/build-agent.sh",
            static_agent().display()
        ));
    }
    if let Err(e) = hearth::runtime::find_node() {
        return Some(e.to_string());
    }
    if ext4::mkfs_path().is_none() {
        return Some("mkfs.ext4 is missing: install e2fsprogs".into());
    }
    None
}

/// Pids of the QEMU processes running instances of function `id` (templates excluded).
pub fn instance_vms(id: &str) -> Vec<i32> {
    let mut pids = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd);
        if cmd.contains("qemu-system")
            && cmd.contains("-incoming")
            && cmd.contains(&format!("/{id}-"))
        {
            pids.push(pid);
        }
    }
    pids
}

/// Polls `f` every 50 ms until it holds or `limit` passes; its last answer.
pub fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    f()
}
