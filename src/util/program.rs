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
