//! Finding an executable: an environment variable naming it, else a search of `PATH`
//! (node, qemu, firecracker, mkfs.ext4 and friends).

use std::path::{Path, PathBuf};

/// A program named by the environment variable `env` if set, else the first `name` on PATH.
pub fn find_program(env: &str, name: &str) -> Option<PathBuf> {
    match std::env::var_os(env) {
        Some(p) => Some(PathBuf::from(p)),
        None => which(name),
    }
}

/// The first `name` on PATH (`/usr/bin:/bin` when PATH is unset).
pub fn which(name: &str) -> Option<PathBuf> {
    std::env::var("PATH")
        .unwrap_or_else(|_| "/usr/bin:/bin".into())
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Writes an executable file at `path` holding `text`, for tests that run
/// scripts. A child process writes it: a descriptor this process held open
/// for writing would be inherited by whatever another test thread forks
/// meanwhile, and running the file while that child lives fails with ETXTBSY
/// ("Text file busy"; CI failed on it).
#[cfg(test)]
pub fn write_executable(path: &Path, text: &str) {
    let status = std::process::Command::new("sh")
        .args([
            "-c",
            "printf '%s' \"$1\" > \"$2\" && chmod 755 \"$2\"",
            "sh",
            text,
        ])
        .arg(path)
        .status()
        .expect("run sh");
    assert!(status.success(), "writing {}", path.display());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_finds_a_program_that_every_system_has() {
        let sh = which("sh").expect("sh is on PATH");
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{}", sh.display());
        assert_eq!(which("hearth-no-such-program-here"), None);
    }

    #[test]
    fn an_unset_override_falls_back_to_path() {
        assert_eq!(
            find_program("HEARTH_TEST_UNSET_PROGRAM_VARIABLE", "sh"),
            which("sh")
        );
    }
}
