//! `hearth doctor`: what this host can run, and what to do about what it can't.

use std::path::Path;

/// One finding.
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    pub detail: String,
}

/// Host checks shared by every backend.
pub fn checks(_state_dir: &Path) -> Vec<Check> {
    let mut out = Vec::new();
    let uring = crate::engine::uring::probe();
    out.push(Check {
        name: "io_uring",
        ok: uring.is_ok(),
        detail: uring
            .err()
            .map(|e| format!("{e}; the engine falls back to epoll"))
            .unwrap_or_else(|| "available".into()),
    });
    let node = crate::sandbox::process_backend::find_node();
    out.push(Check {
        name: "node",
        ok: node.is_ok(),
        detail: node.map(|p| p.display().to_string()).unwrap_or_else(|e| e),
    });
    let agent = crate::sandbox::process_backend::find_agent();
    out.push(Check {
        name: "guest agent",
        ok: agent.is_ok(),
        detail: agent.map(|p| p.display().to_string()).unwrap_or_else(|e| e),
    });
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    out.push(Check {
        name: "process sandbox",
        ok: root,
        detail: if root { "root: user/pid/mount/net namespaces, seccomp, cgroups".into() } else { "needs root (it maps each instance to its own host uid and sets up cgroups); run hearth serve as root".into() },
    });
    out
}

/// Prints the report; never fails.
pub fn run(state_dir: &Path) -> Result<(), String> {
    for c in checks(state_dir) {
        println!(
            "{:<16} {:<4} {}",
            c.name,
            if c.ok { "ok" } else { "NO" },
            c.detail
        );
    }
    Ok(())
}
